"""Property tests (hypothesis) of the three fused layers: over random batch
sizes, lengths, widths, head counts and masks (fully masked rows, holes),
the outputs are finite and the fused layer (implementation="auto"), its
portable reference (implementation="reference") and the cell in
`keras.layers.RNN` agree, given the same weights; float16 inputs to a
float32 layer give what their float32 values give.

Cheap and reproducible: few examples, derandomized (the same examples on
every run)."""

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import keras_attnrnn
from helpers import BACKEND
from helpers import assert_close
from helpers import to_numpy

TOL = 1e-4

# On jax every example compiles four XLA programs (the cell's loop, "auto",
# "reference", float16 inputs), about a second each: fewer examples there
# keep this file within its CI budget.
PROPERTY_SETTINGS = settings(
    max_examples=6 if BACKEND == "jax" else 15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _cell_and_layer(model, units, heads, window):
    if model == "attnrnn":
        return (
            lambda: keras_attnrnn.AttnRNNCell(units, num_heads=heads),
            lambda **kw: keras_attnrnn.AttnRNN(units, num_heads=heads, **kw),
        )
    if model == "larnn":
        kwargs = dict(window=window, num_heads=heads)
        return (
            lambda: keras_attnrnn.LARNNCell(units, **kwargs),
            lambda **kw: keras_attnrnn.LARNN(units, **kwargs, **kw),
        )
    return (
        lambda: keras_attnrnn.AarenCell(units, num_heads=heads),
        lambda **kw: keras_attnrnn.Aaren(units, num_heads=heads, **kw),
    )


def _randomize(layer, rng):
    """Random weights, not the default init (catches swapped weights); the
    LayerNorm scales of LARNN stay around 1."""
    for v in layer.weights:
        value = rng.normal(size=v.shape) * 0.5
        if v.path.endswith("gamma"):
            value += 1.0
        v.assign(value.astype("float32"))


@st.composite
def problems(draw, model):
    batch = draw(st.integers(1, 3), label="batch")
    time = draw(st.integers(1, 12), label="time")
    features = draw(st.integers(1, 6), label="features")
    heads = draw(st.integers(1, 3), label="heads")
    units = heads * draw(st.integers(1, 3), label="head_dim")
    window = draw(st.integers(1, 4), label="window") if model == "larnn" else None
    kind = draw(st.sampled_from(["none", "holes", "holes+empty_row"]), label="mask")
    mask = None
    if kind != "none":
        flat = draw(
            st.lists(st.booleans(), min_size=batch * time, max_size=batch * time),
            label="mask_bits",
        )
        mask = np.array(flat, bool).reshape(batch, time)
        if kind == "holes+empty_row":
            mask[draw(st.integers(0, batch - 1), label="empty_row")] = False
    go_backwards = draw(st.booleans(), label="go_backwards")
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    return dict(
        batch=batch, time=time, features=features, heads=heads, units=units,
        window=window, mask=mask, go_backwards=go_backwards, seed=seed,
    )


def _outputs(layer, x, mask):
    """`layer(x, mask=mask)` as NumPy arrays. On jax, the same call compiled
    as a whole: eager jax compiles every primitive for each new shape."""
    if BACKEND == "jax":
        import jax

        outputs = jax.jit(lambda x, mask: layer(x, mask=mask))(x, mask)
    else:
        outputs = layer(x, mask=mask)
    return [to_numpy(o) for o in keras.tree.flatten(outputs)]


def _not_yet_seen(mask, go_backwards):
    """(b, t) booleans, in the order of the returned outputs (the processing
    order): no valid step has been processed yet."""
    if mask is None:
        return None
    ordered = mask[:, ::-1] if go_backwards else mask
    return np.cumsum(ordered, axis=1) == 0


def _check(model, p):
    rng = np.random.default_rng(p["seed"])
    make_cell, make_layer = _cell_and_layer(model, p["units"], p["heads"], p["window"])
    rnn_kwargs = dict(
        return_sequences=True, return_state=True, go_backwards=p["go_backwards"]
    )
    shape = (p["batch"], p["time"], p["features"])
    x = rng.normal(size=shape).astype("float32")
    mask = p["mask"]

    generic = keras.layers.RNN(make_cell(), **rnn_kwargs)
    generic.build(shape)
    _randomize(generic, rng)
    weights = generic.get_weights()
    expected = _outputs(generic, x, mask)
    assert expected[0].shape == (p["batch"], p["time"], p["units"])
    # Before a row's first valid step, a fused layer repeats the initial
    # output state (states[0]: AttnRNN's h0 = 0.001, zeros for LARNN and
    # Aaren) on every backend. Keras's generic loop gives zeros there on
    # tensorflow and torch but states[0] on jax, so the cell is compared
    # with the fused layer only from the first valid step on.
    unseen = _not_yet_seen(mask, p["go_backwards"])
    first_output = to_numpy(generic.cell.get_initial_state(p["batch"])[0])
    if unseen is not None:
        expected[0] = np.where(unseen[..., None], first_output[:, None], expected[0])

    results = {}
    for mode in ("auto", "reference"):
        layer = make_layer(implementation=mode, **rnn_kwargs)
        layer.build(shape)
        layer.set_weights(weights)
        got = results[mode] = _outputs(layer, x, mask)
        assert len(got) == len(expected)
        for i, (g, e) in enumerate(zip(got, expected)):
            assert np.all(np.isfinite(g)), f"{mode} output {i} not finite"
            assert_close(g, e, TOL, f"{mode} output {i} vs the cell in RNN")
        if mode == "auto":
            # float16 inputs are cast to the float32 compute dtype: the
            # result is that of the float16 values, computed in float32.
            x16 = x.astype("float16")
            half = _outputs(layer, x16, mask)
            exact = _outputs(layer, x16.astype("float32"), mask)
            for i, (h, e) in enumerate(zip(half, exact)):
                assert h.dtype == np.float32, h.dtype
                assert np.all(np.isfinite(h)), f"float16 output {i} not finite"
                assert_close(h, e, TOL, f"float16 inputs, output {i}")
    for i, (a, r) in enumerate(zip(results["auto"], results["reference"])):
        assert_close(a, r, TOL, f"auto vs reference, output {i}")


@pytest.mark.parametrize("model", ["attnrnn", "larnn", "aaren"])
@PROPERTY_SETTINGS
@given(data=st.data())
def test_fused_equals_reference_and_cell(model, data):
    _check(model, data.draw(problems(model), label="problem"))
