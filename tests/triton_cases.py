"""The Triton kernels (torch backend, CUDA devices) against the reference:
the cases `test_triton.py` runs in a fresh process.

Triton's interpreter (``TRITON_INTERPRET=1``) must be on before triton is
first imported (its own library functions, `tl.sum` and the like, are
kernels chosen at import time), and on torch Keras imports triton as soon
as it is installed: so `test_triton.py` runs this file with the variable
set from the start. Without a CUDA device the kernels then run on CPU
tensors: that checks their math, masks and pointer arithmetic, not their
speed, nor that the GPU compiler lowers them the same way (a separate case
compiles them for sm_90 without running them). With a CUDA device and
``TRITON_INTERPRET`` unset, the same cases run the compiled kernels on the
GPU.
"""

import importlib
import logging

import pytest

from helpers import BACKEND

if BACKEND != "torch":
    pytest.skip("the Triton kernels serve the torch backend", allow_module_level=True)
torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import aaren_naive  # noqa: E402
import keras_attnrnn  # noqa: E402
from helpers import aaren_scan_loss  # noqa: E402
from helpers import assert_close  # noqa: E402
from helpers import run_in_subprocess  # noqa: E402
from helpers import to_numpy  # noqa: E402
from helpers import value_and_grads  # noqa: E402
from keras_attnrnn.ops import REGISTRY  # noqa: E402
from keras_attnrnn.ops import _dispatch  # noqa: E402
from keras_attnrnn.ops import _triton  # noqa: E402
from keras_attnrnn.ops.aaren_scan import reference as aaren_reference  # noqa: E402
from keras_attnrnn.ops.aaren_scan import torch_triton as aaren_triton  # noqa: E402
from keras_attnrnn.ops.attnrnn import torch_triton as attnrnn_triton  # noqa: E402
from test_attnrnn_ops import NAMES as ATTNRNN_NAMES  # noqa: E402
from test_attnrnn_ops import REFERENCE as ATTNRNN_REFERENCE  # noqa: E402
from test_attnrnn_ops import _arrays as attnrnn_arrays  # noqa: E402
from test_attnrnn_ops import _mask as attnrnn_mask  # noqa: E402
from test_attnrnn_ops import run_op as run_attnrnn  # noqa: E402

if _triton.interpreted():
    DEVICE = "cpu"
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(aaren_triton._forward_kernel, InterpretedFunction):
        pytest.skip(
            "TRITON_INTERPRET was set after triton was imported: run "
            "tests/test_triton.py, which runs these cases in a fresh process",
            allow_module_level=True,
        )
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip(
        "TRITON_INTERPRET is off and there is no CUDA device",
        allow_module_level=True,
    )
if DEVICE != "cpu":
    torch.set_default_device(DEVICE)


def _impl(op, name):
    return next(i for i in REGISTRY.implementations(op) if i.name == name)


@pytest.fixture
def launches(monkeypatch):
    """Spies on every kernel launch of the Triton modules: the kernels' names."""
    names = []

    def spy_on(module):
        original = module._launch

        def spy(kernel, grid, *args, **meta):
            names.append(kernel.fn.__name__)
            return original(kernel, grid, *args, **meta)

        monkeypatch.setattr(module, "_launch", spy)

    spy_on(aaren_triton)
    spy_on(attnrnn_triton)
    return names


# --- Aaren ------------------------------------------------------------------


def _aaren_inputs(rng, batch, time, heads, head_dim, masked, state):
    scores = (rng.normal(size=(batch, time, heads)) * 2.0).astype("float32")
    values = rng.normal(size=(batch, time, heads, head_dim)).astype("float32")
    mask = None
    if masked:
        mask = rng.random((batch, time)) > 0.3
        if batch > 1:
            mask[0] = False  # a fully masked row
    initial = None
    if state:
        m0 = rng.normal(size=(batch, heads)).astype("float32")
        u0 = rng.uniform(0.5, 3.0, size=(batch, heads)).astype("float32")
        w0 = rng.normal(size=(batch, heads, head_dim)).astype("float32") * u0[..., None]
        # The first head of the last row starts empty.
        m0[-1, 0], u0[-1, 0], w0[-1, 0] = 0.0, 0.0, 0.0
        initial = (m0, u0, w0)
    return scores, values, mask, initial


@pytest.mark.parametrize(
    "batch, time, heads, head_dim, masked, state, reverse",
    [
        (1, 1, 1, 3, False, False, False),
        (3, 1, 2, 5, True, True, True),
        (3, 7, 2, 5, True, True, True),
        (3, 7, 1, 5, False, False, False),
        (2, 33, 3, 4, True, True, False),
        (1, 63, 2, 17, False, True, True),
    ],
)
def test_aaren_matches_reference(
    batch, time, heads, head_dim, masked, state, reverse, rng, launches
):
    """Outputs, the final (m, u, w), and the gradients of the scores, the
    values and the initial state, through the outputs and the final state."""
    scores, values, mask, initial = _aaren_inputs(
        rng, batch, time, heads, head_dim, masked, state
    )
    tensor = keras.ops.convert_to_tensor
    results = {}
    for name, fn in (("triton", aaren_triton.aaren_scan), ("reference", aaren_reference.aaren_scan)):
        outputs, final = fn(
            tensor(scores),
            tensor(values),
            initial_state=None if initial is None else tuple(map(tensor, initial)),
            mask=None if mask is None else tensor(mask),
            reverse=reverse,
        )
        results[name] = [to_numpy(outputs)] + [to_numpy(x) for x in final]
    for what, got, want in zip(("outputs", "m", "u", "w"), results["triton"], results["reference"]):
        assert np.all(np.isfinite(got)), what
        assert_close(got, want, 1e-5, what)
    assert launches == ["_forward_kernel"]

    args = [scores, values] + ([] if initial is None else list(initial))
    cotangents = [
        rng.normal(size=x.shape).astype("float32") for x in results["reference"]
    ]
    _, expected = value_and_grads(
        aaren_scan_loss(aaren_reference.aaren_scan, mask, reverse, cotangents, state), args
    )
    _, grads = value_and_grads(
        aaren_scan_loss(aaren_triton.aaren_scan, mask, reverse, cotangents, state), args
    )
    assert launches[-1] == "_backward_kernel"
    for what, g, e in zip(("scores", "values", "m0", "u0", "w0"), grads, expected):
        assert np.all(np.isfinite(g)), what
        assert_close(g, e, 1e-5, f"gradient of {what}")
    if masked:
        assert np.all(grads[0][~mask] == 0) and np.all(grads[1][~mask] == 0)


def test_aaren_is_stable_in_extreme_cases(rng):
    """Scores 1e3 apart, all -1e4, around +1e4, a fully masked row, a long
    masked prefix: the outputs equal float64 attention, nothing is NaN."""
    batch, time, heads, head_dim = 5, 40, 2, 3
    scores, values, _, _ = _aaren_inputs(rng, batch, time, heads, head_dim, False, False)
    scores[0] = rng.integers(-3, 4, size=scores[0].shape) * 1000.0
    scores[1] = -1e4
    scores[2] = 1e4 + rng.normal(size=scores[2].shape)
    mask = np.ones((batch, time), bool)
    mask[3] = False
    mask[4] = rng.random(time) > 0.7
    mask[4, :20] = False
    tensor = keras.ops.convert_to_tensor
    s, v = tensor(scores), tensor(values)
    s.requires_grad_(True)
    v.requires_grad_(True)
    outputs, final = aaren_triton.aaren_scan(s, v, mask=tensor(mask))
    expected = aaren_naive.prefix_attention(scores, values, mask)
    _, expected_final = aaren_naive.recurrence(scores, values, mask)
    assert_close(to_numpy(outputs), expected, 1e-5, "outputs")
    for what, got, want in zip("muw", final, expected_final):
        assert_close(to_numpy(got), want, 1e-5, f"final {what}")
    total = outputs.sum() + sum(x.sum() for x in final)
    ds, dv = torch.autograd.grad(total, [s, v])
    assert torch.isfinite(ds).all() and torch.isfinite(dv).all()
    assert np.all(to_numpy(ds)[~mask] == 0) and np.all(to_numpy(dv)[~mask] == 0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_aaren_16_bit_inputs_accumulate_in_float32(dtype, rng):
    scores, values, _, _ = _aaren_inputs(rng, 2, 40, 2, 4, False, False)
    tensor = keras.ops.convert_to_tensor
    outputs, final = aaren_triton.aaren_scan(
        tensor(scores, dtype=dtype), tensor(values, dtype=dtype)
    )
    assert keras.backend.standardize_dtype(outputs.dtype) == dtype
    assert all(keras.backend.standardize_dtype(x.dtype) == dtype for x in final)
    rounded = [to_numpy(tensor(x, dtype=dtype)).astype("float32") for x in (scores, values)]
    assert_close(
        to_numpy(outputs).astype("float32"),
        aaren_naive.prefix_attention(*rounded),
        1e-2 if dtype == "float16" else 1e-1,
        dtype,
    )


def test_aaren_rejects_a_too_large_head_dim():
    values = torch.zeros((1, 2, 1, aaren_triton.MAX_HEAD_DIM + 1))
    with pytest.raises(ValueError, match="`values`.*head dim of at most 256"):
        aaren_triton.aaren_scan(torch.zeros((1, 2, 1)), values)


# --- AttnRNN -----------------------------------------------------------------


@pytest.fixture
def on_a_gpu(monkeypatch, fresh_checks):
    """Calls look as if their tensors were on a GPU (the interpreter runs
    CPU tensors), so the registry offers the Triton implementations."""
    device_kind = _dispatch.device_kind
    monkeypatch.setattr(
        _dispatch, "device_kind",
        lambda tensor: "gpu" if device_kind(tensor) == "cpu" else device_kind(tensor),
    )


@pytest.mark.parametrize(
    "batch, time, features, units, heads, masked, reverse",
    [
        (1, 1, 12, 12, 3, False, False),
        (3, 7, 5, 5, 1, True, False),
        (3, 7, 5, 5, 5, False, True),
        (3, 7, 6, 10, 5, True, True),
        (17, 4, 4, 6, 2, True, False),
    ],
)
def test_attnrnn_matches_reference(
    batch, time, features, units, heads, masked, reverse, rng, on_a_gpu, launches
):
    """Through the op's front door (projection, packing, time-major layout):
    outputs, final state and the gradients of the inputs, the initial state
    and every weight, against the reference."""
    args = attnrnn_arrays(rng, batch, time, features, units)
    mask = attnrnn_mask(rng, batch, time) if masked else None
    cot_out = rng.normal(size=(batch, time, units)).astype("float32")
    cot_state = rng.normal(size=(batch, units)).astype("float32")

    def triton_op(*args, **kwargs):
        return keras_attnrnn.ops.attnrnn(*args, implementation="torch_triton", **kwargs)

    results = [
        run_attnrnn(fn, args, heads, mask, reverse, cot_out, cot_state)
        for fn in (ATTNRNN_REFERENCE, triton_op)
    ]
    assert keras_attnrnn.ops.selected("attnrnn") == "torch_triton"
    assert "_forward_kernel" in launches and "_backward_kernel" in launches
    (ref_out, ref_state, _, ref_grads), (out, state, _, grads) = results
    assert_close(out, ref_out, 1e-5, "outputs")
    assert_close(state, ref_state, 1e-5, "final state")
    for name, g, e in zip(ATTNRNN_NAMES, grads, ref_grads):
        assert np.all(np.isfinite(g)), name
        assert_close(g, e, 1e-5, f"gradient of {name}")
    if masked and batch > 1:
        # A fully masked row keeps its initial state.
        np.testing.assert_array_equal(out[0], np.broadcast_to(args[1][0], out[0].shape))


def test_attnrnn_declines_what_it_does_not_cover(on_a_gpu, rng):
    """Recurrent dropout and too many units are declined with a reason;
    auto mode then runs the reference."""
    args = [keras.ops.convert_to_tensor(a) for a in attnrnn_arrays(rng, 2, 3, 4, 4)]
    dropout = keras.ops.ones((2, 4))
    with pytest.raises(ValueError, match="torch_triton: recurrent dropout"):
        keras_attnrnn.ops.attnrnn(
            *args, 2, recurrent_dropout_mask=dropout, implementation="torch_triton"
        )
    keras_attnrnn.ops.attnrnn(*args, 2, recurrent_dropout_mask=dropout)
    assert keras_attnrnn.ops.selected("attnrnn") == "reference"
    big = [
        keras.ops.convert_to_tensor(a)
        for a in attnrnn_arrays(rng, 1, 1, 4, attnrnn_triton.MAX_UNITS + 2)
    ]
    with pytest.raises(ValueError, match=f"torch_triton: units={attnrnn_triton.MAX_UNITS + 2} is above"):
        keras_attnrnn.ops.attnrnn(
            *big[:10], 2, input_kernel=big[10], input_bias=big[11],
            implementation="torch_triton",
        )


def test_attnrnn_layer_trains_on_the_kernels(on_a_gpu, launches, rng):
    """`keras_attnrnn.AttnRNN` in a model: a training step runs the Triton
    forward and backward and changes the weights."""
    x = rng.normal(size=(3, 5, 4)).astype("float32")
    y = rng.normal(size=(3, 1)).astype("float32")
    model = keras.Sequential(
        [keras.Input((5, 4)), keras_attnrnn.AttnRNN(6, num_heads=2), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    before = [to_numpy(w) for w in model.trainable_weights]
    history = model.fit(x, y, epochs=1, batch_size=3, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert keras_attnrnn.ops.selected("attnrnn") == "torch_triton"
    assert "_backward_kernel" in launches
    after = [to_numpy(w) for w in model.trainable_weights]
    assert all(not np.allclose(a, b) for a, b in zip(before, after))


# --- Registration and the self-check ------------------------------------------

OPS = [("aaren_scan", "torch_triton"), ("attnrnn", "torch_triton")]


@pytest.fixture
def fresh_checks():
    """Each test runs the self-checks anew (they are cached per process)."""
    for op, name in OPS:
        _impl(op, name).available.reset()
    yield
    for op, name in OPS:
        _impl(op, name).available.reset()


@pytest.mark.parametrize("op, name", OPS)
def test_registered_for_torch_on_gpus_only(op, name):
    impl = _impl(op, name)
    assert impl.backends == ("torch",) and impl.devices == ("gpu",)
    assert name not in keras_attnrnn.ops.implementations(op, "torch", "cpu")
    assert keras_attnrnn.ops.implementations(op, "torch", "gpu")[0] == name
    for backend in ("jax", "tensorflow"):
        assert name not in keras_attnrnn.ops.implementations(op, backend, "gpu")


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_registration_imports_no_kernel(backend):
    """Importing the package registers the Triton implementations without
    importing them, nor triton (on torch, Keras itself imports triton when
    it is installed)."""
    result = run_in_subprocess(
        """
        import json, sys
        import keras_attnrnn
        from keras_attnrnn.ops import REGISTRY
        names = [i.name for op in REGISTRY.ops() for i in REGISTRY.implementations(op)]
        print(json.dumps({
            "triton": "triton" in sys.modules,
            "kernels": sorted(m for m in sys.modules if m.endswith(".torch_triton")),
            "names": names,
        }))
        """,
        backend=backend,
    )
    assert result["kernels"] == []
    if backend == "jax":
        assert not result["triton"]
    assert result["names"].count("torch_triton") == len(OPS)


@pytest.mark.parametrize("op, name", OPS)
def test_self_check_passes_here(op, name, fresh_checks, caplog):
    caplog.set_level(logging.INFO, logger="keras_attnrnn.ops")
    # The first call may come under no_grad (inference): the check still
    # runs the backward.
    with torch.no_grad():
        assert _impl(op, name).available() == (True, "")
    assert "self-check on" in caplog.text and "passed" in caplog.text


def _corrupt(fn):
    def corrupted(*args, **kwargs):
        outputs, state = fn(*args, **kwargs)
        return outputs * 1.001, state  # (each op returns (outputs, state))

    return corrupted


@pytest.mark.parametrize("op, name", OPS)
def test_self_check_declines_a_wrong_result(op, name, fresh_checks, monkeypatch, caplog):
    module = importlib.import_module(_impl(op, name).module)
    monkeypatch.setattr(module, _impl(op, name).function, _corrupt(getattr(module, _impl(op, name).function)))
    ok, reason = _impl(op, name).available()
    assert not ok
    assert "disagreed with the reference" in reason and "outputs" in reason, reason
    assert f"{op}/{name} declined" in caplog.text
    # Cached: asked again, the same answer without running again.
    monkeypatch.undo()
    assert _impl(op, name).available() == (ok, reason)


@pytest.mark.parametrize("op, name", OPS)
def test_self_check_declines_a_kernel_that_raises(op, name, fresh_checks, monkeypatch):
    module = importlib.import_module(_impl(op, name).module)

    def broken(kernel, grid, *args, **meta):
        raise RuntimeError("PTX JIT compilation failed")

    monkeypatch.setattr(module, "_launch", broken)
    ok, reason = _impl(op, name).available()
    assert not ok and "RuntimeError: PTX JIT compilation failed" in reason, reason


@pytest.mark.parametrize("op, name", OPS)
def test_self_check_declines_without_cuda_or_triton(op, name, fresh_checks, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _impl(op, name).available() == (False, "no CUDA device is available to torch")
    _impl(op, name).available.reset()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda module, *a: None if module == "triton" else find_spec(module, *a),
    )
    ok, reason = _impl(op, name).available()
    assert not ok and "triton is not installed" in reason


def test_aaren_selected_on_a_gpu_device(fresh_checks, monkeypatch, launches, rng):
    """Through the op's front door: on a "gpu" device (faked here: the
    interpreter runs CPU tensors) auto mode picks the Triton scan, and its
    kernels run forward and backward."""
    device_kind = _dispatch.device_kind
    monkeypatch.setattr(
        _dispatch, "device_kind",
        lambda tensor: "gpu" if device_kind(tensor) == "cpu" else device_kind(tensor),
    )
    scores, values, mask, _ = _aaren_inputs(rng, 2, 9, 2, 3, True, False)
    tensor = keras.ops.convert_to_tensor
    v = tensor(values)
    v.requires_grad_(True)
    outputs, _ = keras_attnrnn.ops.aaren_scan(tensor(scores), v, mask=tensor(mask))
    assert keras_attnrnn.ops.selected("aaren_scan") == "torch_triton"
    launches.clear()  # (the self-check's own launches)
    outputs, _ = keras_attnrnn.ops.aaren_scan(tensor(scores), v, mask=tensor(mask))
    outputs.sum().backward()
    assert launches == ["_forward_kernel", "_backward_kernel"]
    expected = aaren_naive.prefix_attention(scores, values, mask)
    assert_close(to_numpy(outputs), expected, 1e-5, "outputs")
    # float64 is declined with its reason.
    with pytest.raises(ValueError, match="torch_triton: dtype float64"):
        keras_attnrnn.ops.aaren_scan(
            torch.zeros((1, 2, 1), dtype=torch.float64),
            torch.zeros((1, 2, 1, 3), dtype=torch.float64),
            implementation="torch_triton",
        )


# --- Compiled for a GPU (without one) ----------------------------------------

# The shared memory of one block on sm_90 (H100, H200): 227 KB.
SM90_SHARED_MEMORY = 232448


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Triton compiles every kernel to a cubin for sm_90 (H100/H200) on this
    machine, in a process without the interpreter, at the largest sizes the
    registry lets through: the kernels are valid Triton for the GPU compiler
    (types, loop-carried values, dot shapes) and fit in its shared memory.
    Nothing is run."""
    result = run_in_subprocess(
        """
        import inspect, json, os
        os.environ.pop("TRITON_INTERPRET", None)
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from keras_attnrnn.ops.aaren_scan import torch_triton as aaren
        from keras_attnrnn.ops.attnrnn import torch_triton as attnrnn

        def compile(kernel, meta, ints, floats=()):
            signature = {}
            for name in inspect.signature(kernel.fn).parameters:
                if name.endswith("_ptr"):
                    signature[name] = "*i8" if name.startswith(("valid", "mask")) else "*fp32"
                elif name in meta:
                    signature[name] = "constexpr"
                else:
                    signature[name] = "fp32" if name in floats else "i32"
            source = ASTSource(fn=kernel, signature=signature, constexprs=meta)
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
            assert len(compiled.asm["cubin"]) > 1000
            return compiled.metadata.shared

        shared = {}
        meta = aaren._meta(aaren.MAX_HEAD_DIM, True, True)
        for kernel in (aaren._forward_kernel, aaren._backward_kernel):
            shared[f"aaren {kernel.fn.__name__}"] = compile(kernel, meta, ("T", "N", "K"))
        meta = attnrnn._meta(attnrnn.MAX_UNITS, 4, True, False)
        for kernel in (attnrnn._forward_kernel, attnrnn._backward_kernel):
            shared[f"attnrnn {kernel.fn.__name__}"] = compile(
                kernel, meta, ("T", "B", "e", "dh"), ("scale", "eps")
            )
        print(json.dumps(shared))
        """,
        env={"TRITON_DEFAULT_FP_FUSION": "1"},
    )
    assert len(result) == 4, result
    for kernel, shared in result.items():
        assert shared <= SM90_SHARED_MEMORY, (kernel, shared)
