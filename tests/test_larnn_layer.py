"""LARNNCell and LARNN as Keras layers: SPEC §3.2 against a NumPy float64
implementation written here from the equations, arguments, weights, masks,
state, dropout, serialization, and agreement between the cell in
`keras.layers.RNN`, the fused layer and every implementation."""

import math

import keras
import numpy as np
import pytest

import keras_attnrnn
from helpers import BACKEND
from helpers import assert_close
from helpers import run_in_subprocess
from helpers import run_layer_test
from helpers import to_numpy

MODES = ["reference"] + [
    n for n in keras_attnrnn.ops.implementations("larnn", BACKEND, "cpu")
    if n != "reference"
]


# --- SPEC §3.2 in NumPy float64 ----------------------------------------------


def _elu(v):
    return np.where(v > 0, v, np.expm1(np.minimum(v, 0.0)))


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def _positions(k):
    """PE(p) of the slots, oldest (p = k) first: cos over i = 1..b, then sin
    over i = 2..b+1, b = ceil(log2(4k))."""
    b = math.ceil(math.log2(4 * k))
    rows = []
    for p in range(k, 0, -1):
        cos = [math.cos(2 * math.pi * p / 2**i) for i in range(1, b + 1)]
        sin = [math.sin(2 * math.pi * p / 2**i) for i in range(2, b + 2)]
        rows.append(cos + sin)
    return np.array(rows)


def numpy_larnn(x, state, w, heads, positional, activation, mask=None):
    """outputs (b, t, e) and the final [h, c, window, valid], float64."""
    w = {name: np.asarray(v, "float64") for name, v in w.items()}
    h, c, window, valid = [np.array(s, "float64") for s in state]
    batch, time, _ = x.shape
    units = h.shape[1]
    k = valid.shape[1]
    size = units // heads

    def norm(v, name):
        mean = v.mean(-1, keepdims=True)
        var = ((v - mean) ** 2).mean(-1, keepdims=True)
        return (v - mean) / np.sqrt(var + 1e-5) * w[f"{name}_gamma"] + w[f"{name}_beta"]

    outputs = np.zeros((batch, time, units))
    for t in range(time):
        xt = x[:, t].astype("float64")
        q = _elu(np.concatenate([xt, h], 1) @ w["query_kernel"] + w["query_bias"])
        memory = window.reshape(batch, k, units)
        if positional:
            pe = np.broadcast_to(_positions(k), (batch,) + _positions(k).shape)
            memory = np.concatenate([memory, pe], -1)
        keys = memory @ w["key_kernel"] + w["key_bias"]
        values = memory @ w["value_kernel"] + w["value_bias"]
        if activation:
            keys, values = norm(_elu(keys), "key_norm"), norm(_elu(values), "value_norm")
        live = valid > 0.5
        live[:, -1] = True
        attended = np.zeros((batch, units))
        for i in range(heads):
            part = slice(i * size, (i + 1) * size)
            scores = np.einsum("bd,bkd->bk", q[:, part], keys[:, :, part]) / math.sqrt(size)
            scores = np.where(live, scores, -np.inf)
            e = np.exp(scores - scores.max(1, keepdims=True))
            attended[:, part] = np.einsum("bk,bkd->bd", e / e.sum(1, keepdims=True), values[:, :, part])
        a = norm(_elu(attended @ w["attention_output_kernel"] + w["attention_output_bias"]), "attention_norm")
        z = xt @ w["kernel"] + h @ w["recurrent_kernel"] + a @ w["attention_kernel"] + w["bias"]
        zi, zf, zg, zo = np.split(z, 4, axis=1)
        c_new = norm(_sigmoid(zi) * np.tanh(zg) + _sigmoid(zf) * c, "cell_norm")
        h_new = norm(_sigmoid(zo) * _elu(c_new), "hidden_norm")
        new = [
            h_new,
            c_new,
            np.concatenate([window[:, units:], c_new], 1),
            np.concatenate([live[:, 1:], np.ones((batch, 1))], 1),
        ]
        keep = np.ones((batch, 1), bool) if mask is None else mask[:, t : t + 1]
        h, c, window, valid = [np.where(keep, n, o) for n, o in zip(new, [h, c, window, valid])]
        outputs[:, t] = h
    return outputs, [h, c, window, valid]


# --- helpers -----------------------------------------------------------------


def _randomize(layer, rng):
    """Random weights (not the default init: catches swapped weights)."""
    for v in layer.weights:
        value = rng.normal(size=v.shape) * 0.4
        if v.path.endswith("gamma"):
            value += 1.0
        v.assign(value.astype("float32"))


def _weights_by_name(layer):
    return {v.path.split("/")[-1]: to_numpy(v) for v in layer.weights}


def _pair(units, rng, input_dim, cell_kwargs, **rnn_kwargs):
    """The cell in keras.layers.RNN and LARNN in every mode, equal weights."""
    generic = keras.layers.RNN(keras_attnrnn.LARNNCell(units, **cell_kwargs), **rnn_kwargs)
    fused = {
        mode: keras_attnrnn.LARNN(units, implementation=mode, **cell_kwargs, **rnn_kwargs)
        for mode in MODES
    }
    generic.build((None, None, input_dim))
    _randomize(generic, rng)
    for layer in fused.values():
        layer.build((None, None, input_dim))
        layer.set_weights(generic.get_weights())
    return generic, fused


def _random_state(rng, batch, units, window):
    return [
        rng.normal(size=(batch, units)).astype("float32"),
        rng.normal(size=(batch, units)).astype("float32"),
        rng.normal(size=(batch, window * units)).astype("float32"),
        (rng.random((batch, window)) > 0.5).astype("float32"),
    ]


NUMPY_CASES = [
    # (time, window, positional, heads, activation, random initial state):
    # T = 1, 5, 40 with the window not yet full, full, wrapped.
    (1, 16, True, 1, True, True),
    (5, 3, True, 1, True, True),
    (5, 16, False, 3, True, False),
    (40, 16, True, 3, True, True),
    (5, 1, True, 1, True, False),
    (5, 3, False, 3, False, True),
]


@pytest.mark.parametrize(
    "time, window, positional, heads, activation, random_state",
    NUMPY_CASES,
    ids=[
        f"t{t}-k{k}-{'pe' if p else 'nope'}-n{n}-{'act' if a else 'plain'}-"
        f"{'state' if s else 'zeros'}"
        for t, k, p, n, a, s in NUMPY_CASES
    ],
)
def test_matches_numpy(time, window, positional, heads, activation, random_state, rng):
    units, batch, input_dim = 6, 2, 4
    cell_kwargs = dict(
        window=window,
        num_heads=heads,
        use_positional_encoding=positional,
        activation_on_keys_and_values=activation,
    )
    generic, fused = _pair(
        units, rng, input_dim, cell_kwargs, return_sequences=True, return_state=True
    )
    x = rng.normal(size=(batch, time, input_dim)).astype("float32")
    state = _random_state(rng, batch, units, window) if random_state else None
    zeros = [np.zeros((batch, s), "float32") for s in generic.cell.state_size]
    expected = numpy_larnn(
        x, state or zeros, _weights_by_name(generic), heads, positional, activation
    )
    expected = [expected[0], *expected[1]]
    names = ("outputs", "h", "c", "window", "valid")
    for label, layer in [("cell", generic), *fused.items()]:
        got = layer(x) if state is None else layer(x, initial_state=state)
        for g, e, name in zip(got, expected, names):
            assert_close(to_numpy(g), e, 1e-4, f"{label} {name}")
        if label != "cell":
            assert keras_attnrnn.ops.selected("larnn") == label


# --- Keras behaviours ----------------------------------------------------------


@pytest.mark.parametrize("cell", [True, False], ids=["cell", "layer"])
def test_layer_behaviours(cell):
    kwargs = dict(window=3, num_heads=2)
    if cell:
        make = lambda **kw: keras_attnrnn.LARNNCell(8, **kwargs, **kw)  # noqa: E731
    else:
        make = lambda **kw: keras_attnrnn.LARNN(  # noqa: E731
            8, return_sequences=True, **kwargs, **kw
        )
    run_layer_test(make, (3, 6, 5), cell=cell, expected_output_shape=(3, 6, 8))


def _parameter_count(d, e, k, positional=True, activation=True):
    memory = e + (2 * math.ceil(math.log2(4 * k)) if positional else 0)
    norms = 5 if activation else 3
    return (
        (d + e) * e + e  # query
        + 2 * (memory * e + e)  # key, value
        + e * e + e  # attention output
        + d * 4 * e + e * 4 * e + e * 4 * e + 4 * e  # gates
        + norms * 2 * e
    )


@pytest.mark.parametrize(
    "kwargs", [{}, {"use_positional_encoding": False}, {"activation_on_keys_and_values": False}]
)
def test_weights_names_and_count(kwargs):
    layer = keras_attnrnn.LARNN(8, window=3, num_heads=2, **kwargs)
    layer.build((None, None, 5))
    cell_layer = keras.layers.RNN(keras_attnrnn.LARNNCell(8, window=3, num_heads=2, **kwargs))
    cell_layer.build((None, None, 5))
    names = {v.path.split("/")[-1]: tuple(v.shape) for v in layer.weights}
    positional = kwargs.get("use_positional_encoding", True)
    activation = kwargs.get("activation_on_keys_and_values", True)
    memory = 8 + (2 * 4 if positional else 0)  # P = 2 ceil(log2 12) = 8
    expected = {
        "query_kernel": (13, 8), "query_bias": (8,),
        "key_kernel": (memory, 8), "key_bias": (8,),
        "value_kernel": (memory, 8), "value_bias": (8,),
        "attention_output_kernel": (8, 8), "attention_output_bias": (8,),
        "kernel": (5, 32), "recurrent_kernel": (8, 32),
        "attention_kernel": (8, 32), "bias": (32,),
    }
    for norm in ("key_norm", "value_norm", "attention_norm", "cell_norm", "hidden_norm"):
        if activation or norm not in ("key_norm", "value_norm"):
            expected[f"{norm}_gamma"] = expected[f"{norm}_beta"] = (8,)
    assert names == expected
    count = _parameter_count(5, 8, 3, positional, activation)
    assert layer.count_params() == cell_layer.count_params() == count
    assert layer.cell.state_size == [8, 8, 24, 3]


@pytest.mark.parametrize("unit_forget_bias", [True, False])
def test_default_initializers(unit_forget_bias):
    layer = keras_attnrnn.LARNN(8, window=3, unit_forget_bias=unit_forget_bias)
    layer.build((None, None, 5))
    w = _weights_by_name(layer)
    np.testing.assert_array_equal(w["bias"][8:16], 1.0 if unit_forget_bias else 0.0)
    np.testing.assert_array_equal(w["bias"][:8], 0.0)
    np.testing.assert_array_equal(w["bias"][16:], 0.0)
    for name in ("query_bias", "key_bias", "attention_output_bias", "cell_norm_beta"):
        np.testing.assert_array_equal(w[name], 0.0)
    for name in ("hidden_norm", "attention_norm"):  # they feed the gates: small
        np.testing.assert_array_equal(w[f"{name}_gamma"], np.float32(0.1))
    for name in ("key_norm", "value_norm", "cell_norm"):
        np.testing.assert_array_equal(w[f"{name}_gamma"], 1.0)
    # orthogonal recurrent kernel: (8, 32) with orthonormal rows
    u = w["recurrent_kernel"]
    np.testing.assert_allclose(u @ u.T, np.eye(8), atol=1e-5)
    # glorot_uniform: limit sqrt(6 / (fan_in + fan_out))
    limit = math.sqrt(6 / (13 + 8))
    assert limit * 0.8 < np.abs(w["query_kernel"]).max() <= limit


def test_gamma_initializer_applies_to_every_norm_and_round_trips():
    layer = keras_attnrnn.LARNN(8, window=3, gamma_initializer="ones")
    layer.build((None, None, 5))
    w = _weights_by_name(layer)
    for name in ("key_norm", "value_norm", "attention_norm", "cell_norm", "hidden_norm"):
        np.testing.assert_array_equal(w[f"{name}_gamma"], 1.0)
    again = keras_attnrnn.LARNN.from_config(keras_attnrnn.LARNN(8, window=3).get_config())
    again.build((None, None, 5))
    np.testing.assert_array_equal(_weights_by_name(again)["hidden_norm_gamma"], np.float32(0.1))


@pytest.mark.parametrize("go_backwards", [False, True], ids=["fwd", "backwards"])
def test_fused_layer_equals_cell_in_rnn_with_masks(go_backwards, rng):
    generic, fused = _pair(
        8, rng, 5, dict(window=3, num_heads=2),
        return_sequences=True, return_state=True, go_backwards=go_backwards,
    )
    x = rng.normal(size=(3, 6, 5)).astype("float32")
    mask = rng.random((3, 6)) > 0.3
    mask[0] = False  # a fully masked row
    expected = [to_numpy(v) for v in generic(x, mask=mask)]
    for mode, layer in fused.items():
        got = [to_numpy(v) for v in layer(x, mask=mask)]
        for g, e, what in zip(got, expected, ("outputs", "h", "c", "window", "valid")):
            assert_close(g, e, 1e-5, f"{mode} {what}")
        assert keras_attnrnn.ops.selected("larnn") == mode
    # The fully masked row keeps the initial (all-zeros) state.
    np.testing.assert_array_equal(expected[3][0], 0.0)


def test_default_layer_on_masked_variable_length_batches():
    """Right padding with a mask gives the unpadded result (what
    Embedding(mask_zero=True) and the UEA examples rely on): each row's
    output is the output after its last real step."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 12, 12)).astype("float32")
    lengths = np.array([12, 7, 3])
    layer = keras_attnrnn.LARNN(16, window=16, num_heads=4, return_sequences=True)
    unpadded = to_numpy(layer(x))
    mask = np.arange(12) < lengths[:, None]
    padded = x * mask[..., None] + 5.0 * ~mask[..., None]  # garbage padding
    got = to_numpy(layer(padded, mask=mask))
    for i, n in enumerate(lengths):
        assert_close(got[i, :n], unpadded[i, :n], 1e-5, f"length {n}")
        # Masked steps repeat the last real output.
        assert_close(got[i, n:], np.broadcast_to(unpadded[i, n - 1], got[i, n:].shape), 1e-6, "repeat")


@pytest.mark.parametrize("mode", MODES[-1:])
def test_stateful_continues_and_resets(mode, rng):
    layer = keras_attnrnn.LARNN(
        8, window=3, num_heads=2, stateful=True, implementation=mode
    )
    whole = keras_attnrnn.LARNN(8, window=3, num_heads=2)
    x = rng.normal(size=(3, 6, 5)).astype("float32")
    layer.build(x.shape)
    whole.build(x.shape)
    whole.set_weights(layer.get_weights())
    layer(x[:, :2])
    second = to_numpy(layer(x[:, 2:]))
    expected = to_numpy(whole(x))
    assert_close(second, expected, 1e-5, "stateful continuation")
    valid = to_numpy(layer.states[3])
    np.testing.assert_array_equal(valid, 1.0)  # the window is full after 6 steps
    layer.reset_state()
    for state in layer.states:
        np.testing.assert_array_equal(to_numpy(state), 0.0)
    assert_close(to_numpy(layer(x)), expected, 1e-5, "after reset")


def test_bidirectional_and_stacked_cells(rng):
    cell = lambda **kw: keras_attnrnn.LARNNCell(8, window=3, num_heads=2, **kw)  # noqa
    bi = keras.layers.Bidirectional(keras.layers.RNN(cell()))
    x = rng.normal(size=(3, 6, 5)).astype("float32")
    bi.build(x.shape)
    bi_fused = keras.layers.Bidirectional(keras_attnrnn.LARNN(8, window=3, num_heads=2))
    bi_fused.build(x.shape)
    _randomize(bi, rng)
    bi_fused.set_weights(bi.get_weights())
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], bool)
    expected = to_numpy(bi(x, mask=mask))
    assert expected.shape == (3, 16)
    assert_close(to_numpy(bi_fused(x, mask=mask)), expected, 1e-5, "bidirectional")

    stacked = keras.layers.RNN(
        keras.layers.StackedRNNCells([cell(), keras_attnrnn.LARNNCell(6, window=2, num_heads=3)]),
        return_state=True,
    )
    out, *states = stacked(x)
    assert to_numpy(out).shape == (3, 6)
    shapes = [tuple(to_numpy(s).shape) for s in keras.tree.flatten(states)]
    assert shapes == [(3, 8), (3, 8), (3, 24), (3, 3), (3, 6), (3, 6), (3, 12), (3, 2)]
    first = keras_attnrnn.LARNN(8, window=3, num_heads=2, return_sequences=True)
    second = keras_attnrnn.LARNN(6, window=2, num_heads=3)
    first.build(x.shape)
    second.build((3, 6, 8))
    n_first = len(first.get_weights())
    first.set_weights(stacked.get_weights()[:n_first])
    second.set_weights(stacked.get_weights()[n_first:])
    assert_close(to_numpy(second(first(x))), to_numpy(out), 1e-5, "stacked")


def test_return_state_and_initial_state(rng):
    layer = keras_attnrnn.LARNN(
        8, window=3, num_heads=2, return_sequences=True, return_state=True
    )
    x = rng.normal(size=(3, 6, 5)).astype("float32")
    seq, h, c, window, valid = layer(x)
    np.testing.assert_allclose(to_numpy(seq)[:, -1], to_numpy(h))
    np.testing.assert_allclose(to_numpy(window)[:, -8:], to_numpy(c))
    zeros = [np.zeros((3, n), "float32") for n in (8, 8, 24, 3)]
    assert_close(to_numpy(layer(x, initial_state=zeros)[0]), to_numpy(seq), 1e-6, "zeros")
    # Continuing from a returned state is running the longer sequence.
    first = layer(x[:, :2])
    rest = layer(x[:, 2:], initial_state=list(first[1:]))
    assert_close(to_numpy(rest[0]), to_numpy(seq)[:, 2:], 1e-5, "continued")


@pytest.mark.parametrize("fused", [False, True], ids=["cell", "layer"])
def test_dropout(fused, rng):
    kwargs = dict(
        window=3, num_heads=2, dropout=0.4, recurrent_dropout=0.3,
        attention_dropout=0.3, seed=3,
    )
    layer = (
        keras_attnrnn.LARNN(8, **kwargs)
        if fused
        else keras.layers.RNN(keras_attnrnn.LARNNCell(8, **kwargs))
    )
    x = rng.normal(size=(3, 6, 5)).astype("float32")
    inference = to_numpy(layer(x))
    trained = to_numpy(layer(x, training=True))
    assert not np.allclose(trained, inference)
    assert np.all(np.isfinite(trained))
    # And inside a compiled training step (a jax scan must not draw randomness).
    model = keras.Sequential([keras.Input((6, 5)), layer, keras.layers.Dense(1)])
    model.compile("adam", "mse")
    history = model.fit(x, np.ones((3, 1)), epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_dropout_masks_are_shared_by_cell_and_fused_layer(rng):
    """keras.layers.RNN draws the masks before the loop, from the cell's seed
    generator, for the generic and the fused loop alike: with equal seeds
    they compute the same thing (all three masks, or the outputs differ)."""
    kwargs = dict(
        window=3, num_heads=2, seed=7, dropout=0.3, recurrent_dropout=0.3,
        attention_dropout=0.3,
    )
    generic = keras.layers.RNN(keras_attnrnn.LARNNCell(8, **kwargs), return_sequences=True)
    fused = keras_attnrnn.LARNN(8, return_sequences=True, **kwargs)
    x = rng.normal(size=(3, 6, 5)).astype("float32")
    generic.build(x.shape)
    fused.build(x.shape)
    fused.set_weights(generic.get_weights())
    fused.cell.seed_generator.state.assign(generic.cell.seed_generator.state.value)
    expected = to_numpy(generic(x, training=True))
    assert_close(to_numpy(fused(x, training=True)), expected, 1e-5, "dropout")


def test_trains_on_masked_integer_sequences():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.integers(1, 50, size=(64, 12))
    x[::2, 8:] = 0
    # The label is the last real token's: a model that ignores the mask sees
    # padding there on half the rows.
    last = np.where(x[:, -1] > 0, x[:, -1], x[:, 7])
    y = (last > 25).astype("float32")
    model = keras.Sequential([
        keras.Input((None,), dtype="int32"),
        keras.layers.Embedding(50, 5, mask_zero=True),
        keras_attnrnn.LARNN(8, window=3, num_heads=2),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    model.compile(keras.optimizers.Adam(1e-2), "binary_crossentropy")
    history = model.fit(x, y, epochs=3, batch_size=32, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert keras_attnrnn.ops.selected("larnn") == MODES[-1]


def test_unroll_runs_the_generic_loop_and_agrees(rng):
    layer = keras_attnrnn.LARNN(8, window=3, num_heads=2, return_sequences=True)
    unrolled = keras_attnrnn.LARNN(8, window=3, num_heads=2, unroll=True, return_sequences=True)
    x = rng.normal(size=(3, 6, 5)).astype("float32")
    layer.build(x.shape)
    unrolled.build(x.shape)
    unrolled.set_weights(layer.get_weights())
    expected = to_numpy(layer(x))
    keras_attnrnn.ops.REGISTRY.reset()
    assert_close(to_numpy(unrolled(x)), expected, 1e-5, "unrolled")
    assert keras_attnrnn.ops.selected("larnn") is None


def test_save_and_load_in_a_new_process(tmp_path, rng):
    model = keras.Sequential([
        keras.Input((None, 6)),
        keras_attnrnn.LARNN(
            8, window=3, num_heads=2, return_sequences=True,
            use_positional_encoding=False, attention_dropout=0.1,
        ),
        keras.layers.RNN(keras_attnrnn.LARNNCell(8, window=2, num_heads=4)),
    ])
    x = rng.normal(size=(2, 5, 6)).astype("float32")
    _randomize(model, rng)
    expected = to_numpy(model(x))
    path = str(tmp_path / "model.keras")
    np.save(tmp_path / "x.npy", x)
    model.save(path)
    got = run_in_subprocess(f"""
        import json, numpy as np, keras
        import keras_attnrnn
        model = keras.saving.load_model({path!r}, safe_mode=True)
        layer = model.layers[0]
        assert type(layer) is keras_attnrnn.LARNN, type(layer)
        assert layer.window == 3 and not layer.use_positional_encoding
        assert layer.attention_dropout == 0.1
        x = np.load({str(tmp_path / 'x.npy')!r})
        print(json.dumps(keras.ops.convert_to_numpy(model(x)).tolist()))
    """)
    assert_close(np.array(got), expected, 1e-6, "reloaded outputs")


def test_config_round_trip_keeps_every_argument():
    layer = keras_attnrnn.LARNN(
        8, window=3, num_heads=2, use_positional_encoding=False,
        activation_on_keys_and_values=False, attention_dropout=0.2,
        unit_forget_bias=False, attention_initializer="he_normal",
        attention_regularizer="l2", gamma_constraint="non_neg",
        dropout=0.1, recurrent_dropout=0.2, seed=4, implementation="reference",
        return_state=True,
    )
    config = layer.get_config()
    rebuilt = keras_attnrnn.LARNN.from_config(config)
    assert rebuilt.get_config() == config
    assert rebuilt.window == 3 and rebuilt.num_heads == 2
    assert not rebuilt.activation_on_keys_and_values
    assert isinstance(rebuilt.attention_initializer, keras.initializers.HeNormal)
    assert rebuilt.implementation == "reference"
    rebuilt.build((None, None, 5))
    assert len(rebuilt.losses) == 5  # l2 on the five attention kernels


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: keras_attnrnn.LARNNCell(8, window=0), "`window`.*0"),
        (lambda: keras_attnrnn.LARNN(8, window=-2), "`window`.*-2"),
        (lambda: keras_attnrnn.LARNN(8, window=2.5), "`window`.*2.5"),
        (lambda: keras_attnrnn.LARNN(10, num_heads=4), "`num_heads`.*4"),
        (lambda: keras_attnrnn.LARNNCell(6, num_heads=4), "`num_heads`.*4"),
        (lambda: keras_attnrnn.LARNNCell(0), "`units`.*0"),
        (lambda: keras_attnrnn.LARNN(8, implementation="cudnn"), "implementation.*cudnn"),
        (lambda: keras_attnrnn.LARNN(8, attention_dropout=1.0), "`attention_dropout`.*1.0"),
        (lambda: keras_attnrnn.LARNN(8, dropout=-0.1), "`dropout`.*-0.1"),
        (lambda: keras_attnrnn.LARNN(8, implementation="fused", unroll=True), "unroll"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("fused", [False, True], ids=["cell", "layer"])
def test_bad_inputs(fused):
    layer = (
        keras_attnrnn.LARNN(8, window=3, num_heads=2)
        if fused
        else keras.layers.RNN(keras_attnrnn.LARNNCell(8, window=3, num_heads=2))
    )
    with pytest.raises(ValueError, match="(ndim|rank|3D|inputs)"):
        layer(np.zeros((3, 5), "float32"))
    with pytest.raises(ValueError, match="(ndim|rank|3D|inputs)"):
        layer(np.zeros((3, 6, 4, 5), "float32"))
    layer(np.zeros((3, 6, 5), "float32"))
    with pytest.raises(ValueError, match="(5|features|axis -1)"):
        layer(np.zeros((3, 6, 4), "float32"))


def test_cell_rejects_a_rank_3_step_input():
    cell = keras_attnrnn.LARNNCell(8, window=2)
    with pytest.raises(ValueError, match="`inputs`.*\\(batch, features\\)"):
        cell.build((2, 3, 8))
