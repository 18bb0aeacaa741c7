"""Every implementation of `keras_attnrnn.ops.larnn` against the reference:
outputs, final states and the gradients of every input, weight and initial
state, on odd sizes, masks, reverse and dropout masks; the registry's choice."""

import functools
import importlib
import logging

import keras
import numpy as np
import pytest

import keras_attnrnn
from helpers import BACKEND
from helpers import assert_close
from helpers import rel_error
from keras_attnrnn.ops import REGISTRY
from keras_attnrnn.ops.larnn import steps

REFERENCE = functools.partial(keras_attnrnn.ops.larnn, implementation="reference")
IMPLEMENTATIONS = [
    name
    for name in keras_attnrnn.ops.implementations("larnn", BACKEND, "cpu")
    if name != "reference"
]
STATE_NAMES = ("h", "c", "window", "valid")


def test_backend_has_a_fused_implementation():
    assert IMPLEMENTATIONS, f"no fused larnn implementation for {BACKEND}"


def weight_shapes(input_dim, units, window, positional=True, activation=True):
    """The SPEC §3.2 weights of a cell, by name."""
    memory = units + (keras_attnrnn.ops.larnn_positional_size(window) if positional else 0)
    shapes = {
        "query_kernel": (input_dim + units, units),
        "query_bias": (units,),
        "key_kernel": (memory, units),
        "key_bias": (units,),
        "value_kernel": (memory, units),
        "value_bias": (units,),
        "attention_output_kernel": (units, units),
        "attention_output_bias": (units,),
        "kernel": (input_dim, 4 * units),
        "recurrent_kernel": (units, 4 * units),
        "attention_kernel": (units, 4 * units),
        "bias": (4 * units,),
    }
    for norm in ("key", "value", "attention", "cell", "hidden"):
        if norm in ("key", "value") and not activation:
            continue
        shapes[f"{norm}_norm_gamma"] = (units,)
        shapes[f"{norm}_norm_beta"] = (units,)
    return shapes


def random_weights(rng, shapes):
    return {
        name: (
            rng.normal(size=shape) * 0.5 + (1.0 if name.endswith("gamma") else 0.0)
        ).astype("float32")
        for name, shape in shapes.items()
    }


def random_state(rng, batch, units, window):
    """A state with real cells and some empty slots; every row has at least
    one real slot, so that even a one-step case attends over several cells
    (with only the new cell, the query and key gradients are exactly 0)."""
    valid = rng.random((batch, window)) > 0.5
    valid[np.arange(batch), rng.integers(window, size=batch)] = True
    return [
        rng.normal(size=(batch, units)).astype("float32"),
        rng.normal(size=(batch, units)).astype("float32"),
        rng.normal(size=(batch, window * units)).astype("float32"),
        valid.astype("float32"),
    ]


def _mask(rng, batch, time):
    """Random holes; with several rows, the first fully masked, the last full."""
    mask = rng.random((batch, time)) > 0.3
    if batch > 1:
        mask[0, :] = False
        mask[-1, :] = True
    return mask


def _dropout_masks(rng, batch, units, window, heads):
    return (
        ((rng.random((batch, units)) > 0.3) / 0.7).astype("float32"),
        ((rng.random((batch, window, heads)) > 0.3) / 0.7).astype("float32"),
    )


def _loss(fn, names, heads, cotangents, mask, reverse, dropout):
    """`(loss, (outputs, *final_state))` of `fn` as a function of all arrays."""
    tensor = keras.ops.convert_to_tensor

    def loss(x, h, c, window, valid, *weights):
        outputs, final = fn(
            x,
            [h, c, window, valid],
            dict(zip(names, weights)),
            heads,
            mask=None if mask is None else tensor(mask),
            reverse=reverse,
            recurrent_dropout_mask=None if dropout is None else tensor(dropout[0]),
            attention_dropout_mask=None if dropout is None else tensor(dropout[1]),
        )
        total = keras.ops.sum(outputs * tensor(cotangents[0]))
        for value, cotangent in zip(final, cotangents[1:]):
            total = total + keras.ops.sum(value * tensor(cotangent))
        return total, (outputs, *final)

    return loss


def gradient_function(loss):
    """`args -> (aux, grads)` as NumPy, by the backend's autodiff.

    Like `helpers.value_and_grads`, but it also returns the loss's auxiliary
    outputs, and on jax it is compiled once per function and shapes: each
    eager jax call of a scan compiles it again, and XLA's CPU compiler is
    what most of this file's time would go to otherwise.
    """
    numpy = keras.ops.convert_to_numpy
    if BACKEND == "jax":
        import jax

        compiled = {}

        def run(args):
            if "fn" not in compiled:
                compiled["fn"] = jax.jit(
                    jax.value_and_grad(
                        loss, argnums=tuple(range(len(args))), has_aux=True
                    )
                )
            (_, aux), grads = compiled["fn"](*args)
            return [numpy(a) for a in aux], [numpy(g) for g in grads]

        return run

    def run(args):
        if BACKEND == "tensorflow":
            import tensorflow as tf

            tensors = [tf.constant(a) for a in args]
            with tf.GradientTape() as tape:
                tape.watch(tensors)
                total, aux = loss(*tensors)
            grads = tape.gradient(total, tensors)
        else:
            import torch

            tensors = [torch.tensor(a, requires_grad=True) for a in args]
            total, aux = loss(*tensors)
            grads = torch.autograd.grad(total, tensors, allow_unused=True)
        # A gradient the backend reports as unconnected is zero.
        grads = [
            np.zeros_like(a) if g is None else numpy(g)
            for g, a in zip(grads, args)
        ]
        return [numpy(a) for a in aux], grads

    return run


def noise_floor(run, args, rng):
    """How much the gradients move under an ulp of input noise (see
    `helpers.float32_noise`), with a compiled `gradient_function`."""
    eps = np.finfo("float32").eps
    _, grads = run(args)
    noisy = [a * (1 + eps * rng.standard_normal(a.shape)).astype(a.dtype) for a in args]
    _, noisy_grads = run(noisy)
    return max(rel_error(n, g) for n, g in zip(noisy_grads, grads))


CASES = [
    # (batch, time, features, units, heads, window, positional, activation,
    #  masked, reverse, dropout)
    (1, 1, 4, 6, 3, 3, True, True, False, False, False),
    (3, 7, 5, 6, 3, 3, True, True, True, True, False),
    (3, 20, 5, 6, 2, 16, True, True, True, False, True),
    (1, 63, 3, 6, 1, 1, False, True, False, True, False),
    (2, 8, 5, 4, 2, 3, True, False, False, False, True),
]


def _case_id(case):
    b, t, d, e, n, k, pos, act, masked, rev, drop = case
    return (
        f"b{b}-t{t}-d{d}-e{e}-n{n}-k{k}"
        + ("-pe" if pos else "-nope")
        + ("-act" if act else "-plain")
        + ("-mask" if masked else "")
        + ("-rev" if rev else "")
        + ("-dropout" if drop else "")
    )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_reference(implementation, case, rng):
    batch, time, features, units, heads, window, pos, act, masked, rev, drop = case
    shapes = weight_shapes(features, units, window, pos, act)
    names = list(shapes)
    weights = random_weights(rng, shapes)
    state = random_state(rng, batch, units, window)
    x = rng.normal(size=(batch, time, features)).astype("float32")
    mask = _mask(rng, batch, time) if masked else None
    dropout = _dropout_masks(rng, batch, units, window, heads) if drop else None
    cotangents = [rng.normal(size=(batch, time, units)).astype("float32")] + [
        rng.normal(size=s.shape).astype("float32") for s in state
    ]
    args = [x, *state, *[weights[n] for n in names]]
    arg_names = ["inputs", *STATE_NAMES, *names]
    fused = functools.partial(keras_attnrnn.ops.larnn, implementation=implementation)
    run_reference = gradient_function(
        _loss(REFERENCE, names, heads, cotangents, mask, rev, dropout)
    )
    run_fused = gradient_function(
        _loss(fused, names, heads, cotangents, mask, rev, dropout)
    )
    (ref_out, *ref_final), ref_grads = run_reference(args)
    (out, *final), grads = run_fused(args)
    assert_close(out, ref_out, 1e-5, "outputs")
    for name, value, expected in zip(STATE_NAMES, final, ref_final):
        assert_close(value, expected, 1e-5, f"final {name}")

    # One weight adds the same <q, b> to every slot's score of a head, which
    # the softmax ignores: key_norm_beta with the activations and LayerNorms,
    # key_bias without them (K = M @ key_kernel + key_bias). Its true gradient
    # is 0, so both sides are rounding noise, whose size differs between
    # CPUs' instruction sets; check it against the scale of the largest
    # weight gradient instead of comparing noise with noise.
    i = arg_names.index("key_norm_beta" if act else "key_bias")
    scale = max(np.abs(g).max() for g in ref_grads[len(STATE_NAMES) + 1:])
    for g in (grads[i], ref_grads[i]):
        assert np.abs(g).max() <= 1e-5 * scale, arg_names[i]
    del arg_names[i], grads[i], ref_grads[i]
    tol, why = 1e-5, ""
    if any(rel_error(g, r) > tol for g, r in zip(grads, ref_grads)):
        # Gradients through long chains (and LayerNorm over few units)
        # amplify float32 rounding: allow a few times this case's own noise
        # floor, which a real bug exceeds by orders of magnitude.
        noise = noise_floor(run_reference, args, rng)
        tol, why = max(tol, 8 * noise), f" (noise floor {noise:.1e})"
    for name, g, r in zip(arg_names, grads, ref_grads):
        assert_close(g, r, tol, f"grad of {name}{why}")
    if mask is not None and batch > 1:
        # Masked steps keep the state: a fully masked row never moves, and
        # its flags' gradient passes straight through.
        np.testing.assert_array_equal(out[0], np.broadcast_to(state[0][0], out[0].shape))
        np.testing.assert_array_equal(final[2][0], state[2][0])
        np.testing.assert_allclose(grads[4][0], cotangents[4][0])


def test_zero_state_is_one_valid_zero_cell(rng):
    """All zeros and [0, 0, zero cells, flags of the newest slot only] agree."""
    shapes = weight_shapes(3, 4, 3)
    weights = random_weights(rng, shapes)
    x = rng.normal(size=(2, 5, 3)).astype("float32")
    zeros = [np.zeros((2, 4), "float32"), np.zeros((2, 4), "float32"),
             np.zeros((2, 12), "float32"), np.zeros((2, 3), "float32")]
    flagged = [z.copy() for z in zeros]
    flagged[3][:, -1] = 1.0
    for implementation in ["reference"] + IMPLEMENTATIONS:
        a = keras_attnrnn.ops.larnn(x, zeros, weights, 2, implementation=implementation)
        b = keras_attnrnn.ops.larnn(x, flagged, weights, 2, implementation=implementation)
        assert_close(keras.ops.convert_to_numpy(a[0]), keras.ops.convert_to_numpy(b[0]), 1e-6, implementation)
        # After one step the window holds the zero cell and the new one.
        valid = keras.ops.convert_to_numpy(
            keras_attnrnn.ops.larnn(x[:, :1], zeros, weights, 2, implementation=implementation)[1][3]
        )
        np.testing.assert_array_equal(valid, [[0, 1, 1], [0, 1, 1]])


def test_float16_inputs(rng):
    """16-bit inputs are computed in float32 by the fused implementations."""
    shapes = weight_shapes(3, 6, 4)
    weights = random_weights(rng, shapes)
    x = rng.normal(size=(2, 6, 3)).astype("float32")
    state = random_state(rng, 2, 6, 4)
    expected = keras.ops.convert_to_numpy(
        keras_attnrnn.ops.larnn(x, state, weights, 3, implementation="reference")[0]
    )
    half = lambda v: keras.ops.cast(v, "float16")  # noqa: E731
    for implementation in IMPLEMENTATIONS:
        out, final = keras_attnrnn.ops.larnn(
            half(x), [half(s) for s in state],
            {n: half(v) for n, v in weights.items()}, 3,
            implementation=implementation,
        )
        assert keras.backend.standardize_dtype(out.dtype) == "float16"
        assert all(keras.backend.standardize_dtype(v.dtype) == "float16" for v in final)
        assert_close(keras.ops.convert_to_numpy(out).astype("float32"), expected, 2e-2, implementation)


@pytest.mark.parametrize("mode", ["auto", "fused"] + IMPLEMENTATIONS)
def test_spy_the_reported_implementation_ran(mode, monkeypatch):
    """The registry's report is the function that actually ran."""
    expected = mode if mode in IMPLEMENTATIONS else IMPLEMENTATIONS[0]
    impl = next(i for i in REGISTRY.implementations("larnn") if i.name == expected)
    module = importlib.import_module(impl.module)
    calls = []
    original = getattr(module, impl.function)

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, impl.function, spy)
    layer = keras_attnrnn.LARNN(8, window=3, num_heads=2, implementation=mode)
    layer(np.random.rand(2, 5, 3).astype("float32"))
    assert keras_attnrnn.ops.selected("larnn") == expected
    assert calls, f"{expected} was reported but did not run"


def test_reference_mode_runs_the_reference(monkeypatch):
    calls = []
    original = steps.reference
    monkeypatch.setattr(
        steps, "reference", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    layer = keras_attnrnn.LARNN(8, window=3, num_heads=2, implementation="reference")
    layer(np.random.rand(2, 5, 3).astype("float32"))
    assert keras_attnrnn.ops.selected("larnn") == "reference"
    assert calls


def test_building_and_training_a_model_never_runs_the_reference(monkeypatch):
    """Keras infers a model's output shapes by running it symbolically (on
    torch, on "meta" tensors): that must not fall back to the reference's
    step-by-step loop either."""
    calls = []
    original = steps.reference
    monkeypatch.setattr(
        steps, "reference", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    inputs = keras.Input((40, 3))
    hidden = keras_attnrnn.LARNN(8, window=3, num_heads=2)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    model.compile("sgd", "mse")
    model.fit(np.zeros((2, 40, 3)), np.zeros((2, 1)), verbose=0)
    assert not calls
    assert keras_attnrnn.ops.selected("larnn") in IMPLEMENTATIONS


def test_env_variable_selects_reference(monkeypatch, caplog):
    monkeypatch.setenv("KERAS_ATTNRNN_IMPLEMENTATION", "reference")
    with caplog.at_level(logging.INFO, logger="keras_attnrnn.ops"):
        keras_attnrnn.LARNN(8, window=2, num_heads=2)(
            np.random.rand(2, 5, 3).astype("float32")
        )
    assert keras_attnrnn.ops.selected("larnn") == "reference"
    assert "larnn: using 'reference'" in caplog.text


def test_layer_argument_wins_over_env_variable(monkeypatch):
    monkeypatch.setenv("KERAS_ATTNRNN_IMPLEMENTATION", "reference")
    layer = keras_attnrnn.LARNN(8, window=2, num_heads=2, implementation="fused")
    layer(np.random.rand(2, 5, 3).astype("float32"))
    assert keras_attnrnn.ops.selected("larnn") in IMPLEMENTATIONS


def test_fused_mode_that_cannot_serve_raises():
    shapes = weight_shapes(3, 4, 2)
    weights = {n: np.zeros(s, "int32") for n, s in shapes.items()}
    state = [np.zeros((2, 4), "int32"), np.zeros((2, 4), "int32"),
             np.zeros((2, 8), "int32"), np.zeros((2, 2), "int32")]
    with pytest.raises(ValueError, match="int32 is not a float dtype"):
        keras_attnrnn.ops.larnn(
            np.zeros((2, 5, 3), "int32"), state, weights, 2, implementation="fused"
        )


def _op_args(**overrides):
    units, window, features = 8, 3, 5
    args = {
        "inputs": np.zeros((2, 4, features), "float32"),
        "initial_state": [
            np.zeros((2, units), "float32"),
            np.zeros((2, units), "float32"),
            np.zeros((2, window * units), "float32"),
            np.zeros((2, window), "float32"),
        ],
        "weights": {
            n: np.zeros(s, "float32")
            for n, s in weight_shapes(features, units, window).items()
        },
        "num_heads": 2,
    }
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"inputs": np.zeros((2, 5), "float32")}, "`inputs`.*3D"),
        ({"inputs": np.zeros((2, 4, 7), "float32")}, "`inputs`.*5 features"),
        ({"num_heads": 3}, "`num_heads`.*3"),
        ({"num_heads": 0}, "`num_heads`.*0"),
        ({"mask": np.ones((2, 5), bool)}, "`mask`"),
        ({"initial_state": [np.zeros((2, 8), "float32")] * 2}, "`initial_state`"),
        (
            {"initial_state": [np.zeros((2, 8), "float32")] * 3
             + [np.zeros((2, 3), "float32")]},
            "`initial_state`.*window of shape \\(batch, 24\\)",
        ),
        (
            {"initial_state": [np.zeros((2, 8), "float32")] * 2
             + [np.zeros((2, 0), "float32"), np.zeros((2, 0), "float32")]},
            "`initial_state`.*window >= 1",
        ),
        (
            {"weights": {n: np.zeros(s, "float32")
                         for n, s in weight_shapes(5, 8, 16).items()}},
            "`weights`.*key_kernel",
        ),
        ({"weights": {"kernel": np.zeros((5, 32), "float32")}}, "`weights`.*query_kernel"),
    ],
)
def test_op_rejects_bad_arguments(overrides, match):
    with pytest.raises(ValueError, match=match):
        keras_attnrnn.ops.larnn(**_op_args(**overrides))
