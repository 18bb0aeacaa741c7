"""`keras_attnrnn.ops.aaren_scan`: every implementation against naive causal
softmax attention in NumPy float64 and the sequential recurrence, stability,
gradients against the reference, dispatch and bad input."""

import functools
import importlib

import keras
import numpy as np
import pytest

import aaren_naive
import keras_attnrnn
from helpers import BACKEND
from helpers import aaren_scan_loss
from helpers import assert_close
from helpers import to_numpy
from helpers import value_and_grads
from keras_attnrnn.ops import REGISTRY
from keras_attnrnn.ops.aaren_scan import chunked
from keras_attnrnn.ops.aaren_scan import reference

FUSED = [
    name
    for name in keras_attnrnn.ops.implementations("aaren_scan", BACKEND, "cpu")
    if name != "reference"
]
ALL = ["reference"] + FUSED
# The chunked scan's other form of its last merge (`fold`; each backend
# registers one), tested on every backend too.
_REGISTERED = getattr(chunked, f"{BACKEND}_chunked").keywords
_OTHER = {**_REGISTERED, "fold": not _REGISTERED.get("fold", False)}
OTHER_FORM = f"chunked(fold={_OTHER['fold']})"
FORMS = ALL + [OTHER_FORM]
STATE_NAMES = ("m", "u", "w")


def _compiled(fn, static=()):
    """`fn` compiled as a whole on jax (op-by-op dispatch compiles every
    primitive of the scan for each new shape: minutes instead of seconds)."""
    if BACKEND != "jax":
        return fn
    import jax

    return jax.jit(fn, static_argnames=static)


@functools.lru_cache(maxsize=None)
def _function(name):
    if name == OTHER_FORM:
        return _compiled(
            functools.partial(chunked.aaren_scan, **_OTHER), static=("reverse",)
        )
    return _compiled(
        next(
            impl
            for impl in REGISTRY.implementations("aaren_scan")
            if impl.name == name
        ).load(),
        static=("reverse",),
    )


def _run(name, scores, values, mask=None, initial_state=None, reverse=False):
    tensor = keras.ops.convert_to_tensor
    outputs, state = _function(name)(
        tensor(scores),
        tensor(values),
        initial_state=None
        if initial_state is None
        else tuple(tensor(x) for x in initial_state),
        mask=None if mask is None else tensor(mask),
        reverse=reverse,
    )
    return to_numpy(outputs), [to_numpy(x) for x in state]


def _inputs(rng, batch, time, heads, head_dim, scale=2.0):
    scores = (rng.normal(size=(batch, time, heads)) * scale).astype("float32")
    values = rng.normal(size=(batch, time, heads, head_dim)).astype("float32")
    return scores, values


def _state(rng, batch, heads, head_dim):
    """A non-empty state, except the first head of the first row (empty)."""
    m0 = rng.normal(size=(batch, heads)).astype("float32")
    u0 = rng.uniform(0.5, 3.0, size=(batch, heads)).astype("float32")
    w0 = rng.normal(size=(batch, heads, head_dim)).astype("float32") * u0[..., None]
    m0[0, 0], u0[0, 0], w0[0, 0] = 0.0, 0.0, 0.0
    return m0, u0, w0


def _holes(rng, batch, time):
    """Random holes; with several rows, the first fully masked."""
    mask = rng.random((batch, time)) > 0.3
    if batch > 1:
        mask[0] = False
    return mask


def test_backend_has_a_fused_implementation():
    assert FUSED == [f"{BACKEND}_chunked"]


# (batch, time, heads, head_dim, masked, initial_state, reverse): every T and
# B of the issue, several heads, each option in several cases.
CASES = [
    (1, 1, 2, 3, False, False, False),
    (3, 1, 2, 3, True, True, True),
    (3, 7, 3, 5, True, True, True),
    (1, 63, 1, 4, False, True, False),
    (3, 257, 2, 3, True, False, True),
    (3, 1000, 4, 2, True, True, False),
]


@pytest.mark.parametrize("implementation", FORMS)
@pytest.mark.parametrize(
    "batch, time, heads, head_dim, masked, initial_state, reverse", CASES
)
def test_equals_naive_softmax_attention(
    implementation, batch, time, heads, head_dim, masked, initial_state, reverse, rng
):
    scores, values = _inputs(rng, batch, time, heads, head_dim)
    mask = _holes(rng, batch, time) if masked else None
    state0 = _state(rng, batch, heads, head_dim) if initial_state else None
    outputs, state = _run(implementation, scores, values, mask, state0, reverse)
    expected = aaren_naive.prefix_attention(scores, values, mask, state0, reverse)
    rec_outputs, expected_state = aaren_naive.recurrence(
        scores, values, mask, state0, reverse
    )
    # The two float64 ground truths agree: the recurrence is attention.
    np.testing.assert_allclose(rec_outputs, expected, rtol=1e-9, atol=1e-9)
    assert_close(outputs, expected, 1e-5, "outputs")
    for name, got, want in zip(STATE_NAMES, state, expected_state):
        assert_close(got, want, 1e-5, f"final {name}")
    if masked and batch > 1:
        # The fully masked first row keeps its initial state: every output
        # is w0 / u0 (zeros for an empty head), and the state is unchanged.
        m0, u0, w0 = state0 if initial_state else [np.zeros_like(x) for x in state]
        held = np.where(
            u0[0, :, None] > 0, w0[0] / np.where(u0[0] > 0, u0[0], 1)[:, None], 0
        )
        np.testing.assert_allclose(
            outputs[0], np.broadcast_to(held, outputs[0].shape), rtol=1e-6, atol=0
        )
        np.testing.assert_array_equal(state[1][0], u0[0])
        np.testing.assert_array_equal(state[0][0], np.where(u0[0] > 0, m0[0], 0))


@pytest.mark.parametrize("implementation", FORMS)
def test_stability(implementation, rng):
    """One row per hard case: scores 1e3 apart, all -1e4, around +1e4, a
    fully masked row, random holes after a long masked prefix."""
    batch, time, heads, head_dim = 5, 150, 2, 3
    scores, values = _inputs(rng, batch, time, heads, head_dim)
    scores[0] = rng.integers(-3, 4, size=scores[0].shape) * 1000.0
    scores[1] = -1e4
    scores[2] = 1e4 + rng.normal(size=scores[2].shape)
    mask = np.ones((batch, time), bool)
    mask[3] = False
    mask[4] = rng.random(time) > 0.8
    mask[4, :40] = False
    for case_mask in (None, mask):
        outputs, state = _run(implementation, scores, values, case_mask)
        expected = aaren_naive.prefix_attention(scores, values, case_mask)
        _, expected_state = aaren_naive.recurrence(scores, values, case_mask)
        assert np.all(np.isfinite(outputs))
        assert all(np.all(np.isfinite(x)) for x in state)
        assert_close(outputs, expected, 1e-5, "outputs")
        for name, got, want in zip(STATE_NAMES, state, expected_state):
            assert_close(got, want, 1e-5, f"final {name}")
    # Zeros before the first valid step; a masked step repeats the last
    # output; a fully masked row ends in the empty (all-zeros) state.
    seen = np.cumsum(mask, 1) > 0
    np.testing.assert_array_equal(outputs[~seen], 0.0)
    rows, steps = np.nonzero(~mask[:, 1:] & seen[:, :-1])
    np.testing.assert_allclose(
        outputs[rows, steps + 1], outputs[rows, steps], rtol=1e-6, atol=1e-7
    )
    for x in state:
        np.testing.assert_array_equal(x[3], 0.0)


def _grads(loss, args):
    """`helpers.value_and_grads`; on jax the value and gradients are one
    compiled program (differentiating through a jitted function compiles
    its forward and backward separately)."""
    if BACKEND != "jax":
        return value_and_grads(loss, args)
    import jax

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))(*args)
    return float(value), [to_numpy(g) for g in grads]


@pytest.mark.parametrize("implementation", FUSED + [OTHER_FORM])
@pytest.mark.parametrize(
    "batch, time, heads, head_dim, masked, reverse",
    [
        (1, 1, 2, 3, False, False),
        (3, 7, 3, 5, True, True),
        (3, 63, 2, 3, False, True),
        (3, 257, 1, 4, True, False),
    ],
)
def test_gradients_match_reference(
    implementation, batch, time, heads, head_dim, masked, reverse, rng
):
    """Every input's gradient, the initial state's included, through the
    outputs and the final state."""
    scores, values = _inputs(rng, batch, time, heads, head_dim)
    args = [scores, values, *_state(rng, batch, heads, head_dim)]
    mask = _holes(rng, batch, time) if masked else None
    cotangents = [
        rng.normal(size=shape).astype("float32")
        for shape in (values.shape, args[2].shape, args[3].shape, args[4].shape)
    ]
    reference_loss = aaren_scan_loss(reference.aaren_scan, mask, reverse, cotangents)
    _, expected = _grads(reference_loss, args)
    loss = aaren_scan_loss(_function(implementation), mask, reverse, cotangents)
    _, grads = _grads(loss, args)
    for name, g, e in zip(("scores", "values", "m0", "u0", "w0"), grads, expected):
        assert np.all(np.isfinite(g)), name
        assert_close(g, e, 1e-5, f"grad of {name}")


@pytest.mark.parametrize("implementation", FUSED + [OTHER_FORM])
def test_gradients_are_finite_in_extreme_cases(implementation, rng):
    scores, values = _inputs(rng, 3, 70, 2, 3)
    scores[0] = -1e4
    scores[1] = (rng.integers(-3, 4, size=scores[1].shape) * 1000.0).astype("float32")
    mask = rng.random((3, 70)) > 0.5
    mask[2] = False
    args = [scores, values, *[np.zeros_like(x) for x in _state(rng, 3, 2, 3)]]
    cotangents = [np.ones(values.shape, "float32")] + [
        np.ones(x.shape, "float32") for x in args[2:]
    ]
    loss = aaren_scan_loss(_function(implementation), mask, False, cotangents)
    _, grads = _grads(loss, args)
    for name, g in zip(("scores", "values", "m0", "u0", "w0"), grads):
        assert np.all(np.isfinite(g)), name
    # Masked steps and the fully masked row get no gradient.
    np.testing.assert_array_equal(grads[0][~mask], 0.0)
    np.testing.assert_array_equal(grads[1][~mask], 0.0)


@pytest.mark.parametrize(
    "implementation, dtype",
    [(FUSED[0], "float16"), (FUSED[0], "bfloat16")],
)
def test_16_bit_inputs_accumulate_in_float32(implementation, dtype, rng):
    scores, values = _inputs(rng, 2, 130, 2, 4)
    tensor = keras.ops.convert_to_tensor
    outputs, state = _function(implementation)(
        tensor(scores, dtype=dtype), tensor(values, dtype=dtype)
    )
    assert keras.backend.standardize_dtype(outputs.dtype) == dtype
    assert all(keras.backend.standardize_dtype(x.dtype) == dtype for x in state)
    rounded = [to_numpy(tensor(x, dtype=dtype)).astype("float32") for x in (scores, values)]
    expected = aaren_naive.prefix_attention(*rounded)
    got = to_numpy(outputs).astype("float32")
    assert np.all(np.isfinite(got))
    # Only the output's own rounding: accumulating in 16 bits over 130 steps
    # would be far worse.
    assert_close(got, expected, 1e-2 if dtype == "float16" else 1e-1, dtype)


@pytest.mark.parametrize("mode", ["auto", "fused"] + ALL)
def test_spy_the_reported_implementation_ran(mode, monkeypatch, rng):
    """The registry's report is the function that actually ran."""
    expected = FUSED[0] if mode in ("auto", "fused") else mode
    impl = next(i for i in REGISTRY.implementations("aaren_scan") if i.name == expected)
    module = importlib.import_module(impl.module)
    calls = []
    original = getattr(module, impl.function)

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, impl.function, spy)
    scores, values = _inputs(rng, 2, 5, 2, 3)
    op = _compiled(
        lambda s, v: keras_attnrnn.ops.aaren_scan(s, v, implementation=mode)
    )
    op(scores, values)
    assert keras_attnrnn.ops.selected("aaren_scan") == expected
    assert calls, f"{expected} was reported but did not run"


def test_env_variable_selects_reference(monkeypatch, rng):
    monkeypatch.setenv("KERAS_ATTNRNN_IMPLEMENTATION", "reference")
    # (A fresh function: a jit cache hit would skip the dispatch.)
    _compiled(lambda s, v: keras_attnrnn.ops.aaren_scan(s, v))(
        *_inputs(rng, 1, 4, 2, 3)
    )
    assert keras_attnrnn.ops.selected("aaren_scan") == "reference"


def test_fused_declines_integer_inputs_with_a_reason(rng):
    scores = np.zeros((1, 4, 2), "int32")
    values = np.zeros((1, 4, 2, 3), "int32")
    with pytest.raises(ValueError, match="not a float dtype"):
        keras_attnrnn.ops.aaren_scan(scores, values, implementation="fused")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scores": np.zeros((2, 5), "float32")}, "scores.*3D"),
        ({"values": np.zeros((2, 5, 6), "float32")}, "values.*4D"),
        ({"values": np.zeros((2, 5, 3, 4), "float32")}, "values.*(2, 5, 2)"),
        ({"initial_state": (np.zeros((2, 2)), np.zeros((2, 2)))}, "initial_state"),
        (
            {"initial_state": (np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 2, 3)))},
            "initial_state.*head_dim",
        ),
        ({"mask": np.ones((2, 4), bool)}, "mask.*\\(2, 5\\)"),
        ({"mask": np.ones((2, 5, 1), bool)}, "mask"),
        ({"implementation": "cuda"}, "implementation.*cuda"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {
        "scores": np.zeros((2, 5, 2), "float32"),
        "values": np.zeros((2, 5, 2, 4), "float32"),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        keras_attnrnn.ops.aaren_scan(**args)
