"""Every implementation of `keras_attnrnn.ops.attnrnn` against the reference:
outputs, final state and every gradient, on odd sizes, masks and reverse."""

import functools
import logging

import keras
import numpy as np
import pytest

import keras_attnrnn
from helpers import BACKEND
from helpers import assert_close
from helpers import float32_noise
from helpers import rel_error
from helpers import value_and_grads
from keras_attnrnn.ops import REGISTRY

IMPLEMENTATIONS = [
    name
    for name in keras_attnrnn.ops.implementations("attnrnn", BACKEND, "cpu")
    if name != "reference"
]
REFERENCE = functools.partial(keras_attnrnn.ops.attnrnn, implementation="reference")
NAMES = (
    "inputs",
    "initial_state",
    "query_kernel",
    "query_bias",
    "output_kernel",
    "output_bias",
    "gate_kernel",
    "gate_bias",
    "gamma",
    "beta",
    "input_kernel",
    "input_bias",
)


def test_backend_has_a_fused_implementation():
    assert IMPLEMENTATIONS, f"no fused attnrnn implementation for {BACKEND}"


def _arrays(rng, batch, time, features, units):
    shapes = [
        (batch, time, features),
        (batch, units),
        (units, units),
        (units,),
        (units, units),
        (units,),
        (2 * units, units),
        (units,),
        (units,),
        (units,),
    ]
    if features != units:
        shapes += [(features, units), (units,)]
    arrays = [rng.normal(size=s).astype("float32") * 0.5 for s in shapes]
    arrays[8] += 1.0  # gamma around 1
    return arrays


def _mask(rng, batch, time):
    """Random holes; with several rows, the first fully masked, the last full."""
    mask = rng.random((batch, time)) > 0.3
    if batch > 1:
        mask[0, :] = False
        mask[-1, :] = True
    return mask


def _loss(fn, num_heads, mask, reverse, cot_out, cot_state, n_args):
    def loss(*args):
        kwargs = {}
        if n_args == 12:
            kwargs = {"input_kernel": args[10], "input_bias": args[11]}
        outputs, state = fn(
            *args[:10],
            num_heads,
            mask=None if mask is None else keras.ops.convert_to_tensor(mask),
            reverse=reverse,
            **kwargs,
        )
        return keras.ops.sum(
            outputs * keras.ops.convert_to_tensor(cot_out)
        ) + keras.ops.sum(state * keras.ops.convert_to_tensor(cot_state))

    return loss


def run_op(fn, args, heads, mask, reverse, cot_out, cot_state):
    """(outputs, final state, loss, gradients) of the op `fn` on `args`
    (NumPy arrays; with 12 of them the input projection is fused), the loss
    being `_loss`'s."""
    tensors = [keras.ops.convert_to_tensor(a) for a in args]
    outputs, state = fn(
        *tensors[:10],
        heads,
        input_kernel=None if len(args) == 10 else tensors[10],
        input_bias=None if len(args) == 10 else tensors[11],
        mask=None if mask is None else keras.ops.convert_to_tensor(mask),
        reverse=reverse,
    )
    value, grads = value_and_grads(
        _loss(fn, heads, mask, reverse, cot_out, cot_state, len(args)), args
    )
    return (keras.ops.convert_to_numpy(outputs), keras.ops.convert_to_numpy(state),
            value, grads)


CASES = [
    # (batch, time, features, units, heads)
    (1, 1, 12, 12, 3),
    (3, 7, 5, 12, 3),
    (3, 63, 10, 10, 5),
    (1, 63, 7, 6, 1),
    (3, 7, 6, 6, 2),
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("batch, time, features, units, heads", CASES)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_matches_reference(
    implementation, batch, time, features, units, heads, masked, reverse, rng
):
    args = _arrays(rng, batch, time, features, units)
    mask = _mask(rng, batch, time) if masked else None
    cot_out = rng.normal(size=(batch, time, units)).astype("float32")
    cot_state = rng.normal(size=(batch, units)).astype("float32")
    fused = functools.partial(keras_attnrnn.ops.attnrnn, implementation=implementation)

    (ref_out, ref_state, _, ref_grads), (out, state, _, grads) = [
        run_op(fn, args, heads, mask, reverse, cot_out, cot_state)
        for fn in (REFERENCE, fused)
    ]
    assert_close(out, ref_out, 1e-5, "outputs")
    assert_close(state, ref_state, 1e-5, "final_state")
    tol, why = 1e-5, ""
    if any(rel_error(g, r) > tol for g, r in zip(grads, ref_grads)):
        # Gradients through long chains amplify float32 rounding: allow a few
        # times this case's own noise floor (the change an ulp of input noise
        # makes), which a real bug exceeds by orders of magnitude.
        noise = float32_noise(
            _loss(REFERENCE, heads, mask, reverse, cot_out, cot_state, len(args)),
            args,
            rng,
        )
        tol, why = max(tol, 8 * noise), f" (noise floor {noise:.1e})"
    for name, g, ref_g in zip(NAMES, grads, ref_grads):
        assert_close(g, ref_g, tol, f"grad of {name}{why}")
    if mask is not None and batch > 1:
        # Masked steps keep the state: a fully masked row never moves.
        np.testing.assert_array_equal(
            out[0], np.broadcast_to(args[1][0], out[0].shape)
        )


@pytest.mark.parametrize("mode", ["auto", "fused"] + IMPLEMENTATIONS)
def test_spy_the_reported_implementation_ran(mode, monkeypatch):
    """The registry's report is the function that actually ran."""
    import importlib

    expected = mode if mode in IMPLEMENTATIONS else IMPLEMENTATIONS[0]
    impl = next(
        i for i in REGISTRY.implementations("attnrnn") if i.name == expected
    )
    module = importlib.import_module(impl.module)
    calls = []
    original = getattr(module, impl.function)

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, impl.function, spy)
    layer = keras_attnrnn.AttnRNN(8, num_heads=2, implementation=mode)
    layer(np.random.rand(2, 5, 3).astype("float32"))
    assert keras_attnrnn.ops.selected("attnrnn") == expected
    assert calls, f"{expected} was reported but did not run"


def test_recurrent_dropout_falls_back_to_reference_with_a_reason(caplog):
    layer = keras_attnrnn.AttnRNN(8, num_heads=2, recurrent_dropout=0.5, seed=1)
    x = np.random.rand(2, 5, 3).astype("float32")
    with caplog.at_level(logging.INFO, logger="keras_attnrnn.ops"):
        layer(x, training=True)
    assert keras_attnrnn.ops.selected("attnrnn") == "reference"
    assert "recurrent dropout" in caplog.text
    # Without training there is no dropout mask: the fused path serves it.
    layer(x, training=False)
    assert keras_attnrnn.ops.selected("attnrnn") in IMPLEMENTATIONS


def test_fused_mode_that_cannot_serve_raises():
    layer = keras_attnrnn.AttnRNN(
        8, num_heads=2, recurrent_dropout=0.5, implementation="fused"
    )
    with pytest.raises(ValueError, match="recurrent dropout"):
        layer(np.random.rand(2, 5, 3).astype("float32"), training=True)


def test_env_variable_selects_reference(monkeypatch):
    monkeypatch.setenv("KERAS_ATTNRNN_IMPLEMENTATION", "reference")
    keras_attnrnn.AttnRNN(8, num_heads=2)(np.random.rand(2, 5, 3).astype("float32"))
    assert keras_attnrnn.ops.selected("attnrnn") == "reference"


def test_layer_argument_wins_over_env_variable(monkeypatch):
    monkeypatch.setenv("KERAS_ATTNRNN_IMPLEMENTATION", "reference")
    layer = keras_attnrnn.AttnRNN(8, num_heads=2, implementation="fused")
    layer(np.random.rand(2, 5, 3).astype("float32"))
    assert keras_attnrnn.ops.selected("attnrnn") in IMPLEMENTATIONS


def test_bad_env_variable(monkeypatch):
    monkeypatch.setenv("KERAS_ATTNRNN_IMPLEMENTATION", "cudnn")
    with pytest.raises(ValueError, match="KERAS_ATTNRNN_IMPLEMENTATION.*cudnn"):
        keras_attnrnn.AttnRNN(8, num_heads=2)(
            np.random.rand(2, 5, 3).astype("float32")
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"inputs": np.zeros((2, 5), "float32")}, "inputs.*3D"),
        ({"inputs": np.zeros((2, 5, 7), "float32")}, "inputs.*8 features"),
        ({"initial_state": np.zeros((2, 4), "float32")}, "initial_state"),
        ({"mask": np.ones((2, 4), bool)}, "mask"),
        ({"num_heads": 3}, "num_heads.*3"),
    ],
)
def test_op_rejects_bad_arguments(kwargs, match):
    units = 8
    args = {
        "inputs": np.zeros((2, 5, 8), "float32"),
        "initial_state": np.zeros((2, units), "float32"),
        "query_kernel": np.zeros((units, units), "float32"),
        "query_bias": np.zeros((units,), "float32"),
        "output_kernel": np.zeros((units, units), "float32"),
        "output_bias": np.zeros((units,), "float32"),
        "gate_kernel": np.zeros((2 * units, units), "float32"),
        "gate_bias": np.zeros((units,), "float32"),
        "gamma": np.zeros((units,), "float32"),
        "beta": np.zeros((units,), "float32"),
        "num_heads": 2,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        keras_attnrnn.ops.attnrnn(**args)
