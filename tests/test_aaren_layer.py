"""AarenCell, Aaren and AarenBlock as Keras layers: the cell in
`keras.layers.RNN`, the parallel layer in every mode and stateful streaming
all equal naive causal softmax attention in NumPy float64 with the same
weights; masks, state, serialization, bad input."""

import importlib

import keras
import numpy as np
import pytest

import aaren_naive
import keras_attnrnn
from helpers import BACKEND
from helpers import assert_close
from helpers import run_in_subprocess
from helpers import run_layer_test
from helpers import to_numpy
from keras_attnrnn.ops import REGISTRY

MODES = ["reference"] + [
    n for n in keras_attnrnn.ops.implementations("aaren_scan", BACKEND, "cpu")
    if n != "reference"
]
# Most tests share these sizes: on jax every new shape of an eager call
# compiles each primitive again, so shared shapes keep the suite fast.
B, T, D, UNITS, HEADS = 2, 9, 4, 8, 2


def _x(rng, batch=B, time=T, features=D):
    return rng.normal(size=(batch, time, features)).astype("float32")


def _weights(layer):
    return {v.path.split("/")[-1]: to_numpy(v) for v in layer.weights}


def _randomize(layer, rng):
    """Random weights (not the default init: catches swapped weights), with
    a query large enough to make the attention peaked."""
    values = []
    for v in layer.weights:
        scale = 2.0 if v.path.endswith("query") else 0.5
        values.append(rng.normal(size=v.shape).astype("float32") * scale)
    layer.set_weights(values)


def _predict(model, x):
    return [to_numpy(o) for o in keras.tree.flatten(model.predict_on_batch(x))]


def _apply(layer, x, mask=None):
    """`layer(x, mask=mask)` as NumPy arrays (a list). On jax, compiled as a
    whole: eager jax compiles every primitive for each new shape, which costs
    seconds per call here."""
    if BACKEND != "jax":
        return [to_numpy(o) for o in keras.tree.flatten(layer(x, mask=mask))]
    import jax

    @jax.jit
    def run(trainable, non_trainable, x, mask):
        return layer.stateless_call(trainable, non_trainable, x, mask=mask)[0]

    outputs = run(
        [v.value for v in layer.trainable_variables],
        [v.value for v in layer.non_trainable_variables],
        x,
        mask,
    )
    return [to_numpy(o) for o in keras.tree.flatten(outputs)]


@pytest.mark.parametrize("kind", ["cell", "layer", "block"])
def test_layer_behaviours(kind):
    if kind == "cell":
        make = lambda **kw: keras_attnrnn.AarenCell(UNITS, num_heads=HEADS, **kw)  # noqa: E731
    elif kind == "layer":
        make = lambda **kw: keras_attnrnn.Aaren(  # noqa: E731
            UNITS, num_heads=HEADS, return_sequences=True, **kw
        )
    else:
        make = lambda **kw: keras_attnrnn.AarenBlock(  # noqa: E731
            UNITS, num_heads=HEADS, intermediate_dim=12, **kw
        )
    features = UNITS if kind == "block" else D
    run_layer_test(
        make, (B, T, features), cell=kind == "cell", expected_output_shape=(B, T, UNITS)
    )


def test_weight_names_shapes_and_parameter_count():
    layer = keras_attnrnn.Aaren(12, num_heads=3)
    layer.build((None, None, 5))
    shapes = {v.path.split("/")[-1]: tuple(v.shape) for v in layer.weights}
    assert shapes == {
        "query": (3, 4),
        "key_kernel": (5, 12),
        "key_bias": (12,),
        "value_kernel": (5, 12),
        "value_bias": (12,),
        "output_kernel": (12, 12),
        "output_bias": (12,),
    }
    cell_layer = keras.layers.RNN(keras_attnrnn.AarenCell(12, num_heads=3))
    cell_layer.build((None, None, 5))
    assert layer.count_params() == cell_layer.count_params() == 12 + 2 * 60 + 3 * 12 + 144
    state_sizes = [tuple(s.shape) for s in keras_attnrnn.AarenCell(12, num_heads=3).get_initial_state(2)]
    assert state_sizes == [(2, 12), (2, 12), (2, 3), (2, 3)]


@pytest.mark.parametrize("time, batch, heads", [(1, 1, 2), (7, 3, 3), (63, 1, 1), (257, 3, 2), (1000, 3, 4)])
def test_every_form_equals_naive_attention(time, batch, heads, rng):
    """RNN(AarenCell), Aaren, and stateful streaming one token per call all
    give causal softmax attention with the same weights. (Every
    implementation of the scan, the reference's included, is checked at
    these sizes in test_aaren_ops.py, and in the layer with masks below.)"""
    units, features = 4 * heads, 5
    x = rng.normal(size=(batch, time, features)).astype("float32")
    cell_rnn = keras.layers.RNN(
        keras_attnrnn.AarenCell(units, num_heads=heads), return_sequences=True
    )
    cell_rnn.build(x.shape)
    _randomize(cell_rnn, rng)
    expected = aaren_naive.aaren_layer(x, _weights(cell_rnn), heads)
    assert_close(_apply(cell_rnn, x)[0], expected, 1e-5, "RNN(AarenCell)")
    layer = keras_attnrnn.Aaren(units, num_heads=heads, return_sequences=True)
    layer.build(x.shape)
    layer.set_weights(cell_rnn.get_weights())
    assert_close(_apply(layer, x)[0], expected, 1e-5, "Aaren")
    assert keras_attnrnn.ops.selected("aaren_scan") == MODES[-1]
    if time > 257:
        return  # 1000 single-step calls would add time, not coverage
    stream = keras_attnrnn.Aaren(
        units, num_heads=heads, return_sequences=True, stateful=True
    )
    stream.build((batch, 1, features))
    stream.set_weights(cell_rnn.get_weights())
    # (Direct calls: a stateful layer inside a compiled jax `predict` does
    # not carry its state over, in Keras itself; see docs/aaren.md.)
    steps = [to_numpy(stream(x[:, t : t + 1])) for t in range(time)]
    assert_close(np.concatenate(steps, axis=1), expected, 1e-5, "streaming")
    # The state stays (batch, units), (batch, units), (batch, heads) x 2.
    assert [tuple(s.shape) for s in stream.states] == [
        (batch, units), (batch, units), (batch, heads), (batch, heads)
    ]


@pytest.mark.parametrize("go_backwards", [False, True], ids=["fwd", "backwards"])
def test_masks_equal_naive_attention(go_backwards, rng):
    """Random holes, a long masked prefix and a fully masked row: masked
    steps repeat the last output, zeros before the first valid step."""
    units, heads = UNITS, HEADS
    x = _x(rng, batch=3)
    mask = rng.random((3, T)) > 0.4
    mask[0] = False
    mask[1, :5] = False
    cell_rnn = keras.layers.RNN(
        keras_attnrnn.AarenCell(units, num_heads=heads),
        return_sequences=True,
        return_state=True,
        go_backwards=go_backwards,
    )
    cell_rnn.build(x.shape)
    _randomize(cell_rnn, rng)
    expected = aaren_naive.aaren_layer(
        x, _weights(cell_rnn), heads, mask, go_backwards
    )
    generic = _apply(cell_rnn, x, mask)
    assert_close(generic[0], expected, 1e-5, "RNN(AarenCell)")
    for mode in MODES:
        layer = keras_attnrnn.Aaren(
            units,
            num_heads=heads,
            return_sequences=True,
            return_state=True,
            go_backwards=go_backwards,
            implementation=mode,
        )
        layer.build(x.shape)
        layer.set_weights(cell_rnn.get_weights())
        got = _apply(layer, x, mask)
        assert_close(got[0], expected, 1e-5, f"{mode} outputs")
        for what, g, e in zip(("y", "w", "m", "u"), got[1:], generic[1:]):
            assert_close(g, e, 1e-5, f"{mode} final {what}")
        np.testing.assert_array_equal(got[0][0], 0.0)  # fully masked row
        np.testing.assert_array_equal(got[4][0], 0.0)  # its state stays empty
        assert np.all(np.isfinite(got[0]))


def test_stateful_continues_and_resets(rng):
    layer = keras_attnrnn.Aaren(UNITS, num_heads=HEADS, stateful=True, return_sequences=True)
    whole = keras_attnrnn.Aaren(UNITS, num_heads=HEADS, return_sequences=True)
    x = _x(rng, time=2 * T)
    layer(x[:, :1])
    whole(x[:, :1])
    _randomize(layer, rng)
    whole.set_weights(layer.get_weights())
    expected = to_numpy(whole(x))
    layer.reset_state()
    for state in layer.states:
        np.testing.assert_array_equal(to_numpy(state), 0.0)
    first = to_numpy(layer(x[:, :T]))
    second = to_numpy(layer(x[:, T:]))
    assert_close(np.concatenate([first, second], 1), expected, 1e-5, "continued")
    layer.reset_state()
    assert_close(to_numpy(layer(x)), expected, 1e-5, "after reset")


def test_initial_state_and_return_state(rng):
    """Running a sequence in two calls, the state of the first passed to the
    second, equals running it at once."""
    layer = keras_attnrnn.Aaren(
        UNITS, num_heads=HEADS, return_sequences=True, return_state=True
    )
    x = _x(rng, time=2 * T)
    whole, *final = layer(x)
    head, *state = layer(x[:, :T])
    tail, *state = layer(x[:, T:], initial_state=state)
    assert_close(to_numpy(tail), to_numpy(whole)[:, T:], 1e-5, "continued")
    for got, want in zip(state, final):
        assert_close(to_numpy(got), to_numpy(want), 1e-5, "final state")
    np.testing.assert_allclose(to_numpy(final[0]), to_numpy(whole)[:, -1], rtol=1e-6)


def test_go_backwards_equals_reversed_input(rng):
    forward = keras_attnrnn.Aaren(UNITS, num_heads=HEADS, return_sequences=True)
    backwards = keras_attnrnn.Aaren(
        UNITS, num_heads=HEADS, return_sequences=True, go_backwards=True
    )
    x = _x(rng)
    forward(x)
    backwards(x)
    backwards.set_weights(forward.get_weights())
    assert_close(to_numpy(backwards(x)), to_numpy(forward(x[:, ::-1])), 1e-6, "")


def test_unroll_runs_the_cell_and_agrees(rng):
    layer = keras_attnrnn.Aaren(UNITS, num_heads=HEADS, return_sequences=True)
    unrolled = keras_attnrnn.Aaren(UNITS, num_heads=HEADS, return_sequences=True, unroll=True)
    x = _x(rng)
    layer(x)
    unrolled(x)
    unrolled.set_weights(layer.get_weights())
    REGISTRY.reset()
    assert_close(to_numpy(unrolled(x)), to_numpy(layer(x)), 1e-5, "unrolled")
    REGISTRY.reset()
    unrolled(x)
    assert keras_attnrnn.ops.selected("aaren_scan") is None


@pytest.mark.parametrize("mode", ["auto"] + MODES)
def test_spy_the_layer_runs_the_reported_implementation(mode, monkeypatch, rng):
    expected = MODES[-1] if mode == "auto" else mode
    impl = next(i for i in REGISTRY.implementations("aaren_scan") if i.name == expected)
    module = importlib.import_module(impl.module)
    calls = []
    original = getattr(module, impl.function)
    monkeypatch.setattr(
        module,
        impl.function,
        lambda *a, **k: calls.append(1) or original(*a, **k),
    )
    keras_attnrnn.Aaren(UNITS, num_heads=HEADS, implementation=mode)(_x(rng))
    assert keras_attnrnn.ops.selected("aaren_scan") == expected
    assert calls, f"{expected} was reported but did not run"


@pytest.mark.parametrize("mode", MODES)
def test_dynamic_time_dimension(mode, rng):
    """One compiled model (`predict`), sequences of several lengths."""
    inputs = keras.Input((None, D))
    layer = keras_attnrnn.Aaren(
        UNITS, num_heads=HEADS, return_sequences=True, implementation=mode
    )
    model = keras.Model(inputs, layer(inputs))
    _randomize(layer, rng)
    for time in (T, 70, 5, 1):
        x = _x(rng, time=time)
        expected = aaren_naive.aaren_layer(x, _weights(layer), HEADS)
        assert_close(_predict(model, x)[0], expected, 1e-5, f"T={time}")


def test_block_is_a_transformer_block_around_aaren(rng):
    block = keras_attnrnn.AarenBlock(UNITS, num_heads=HEADS, intermediate_dim=12)
    x = _x(rng, features=UNITS)
    block.build(x.shape)
    _randomize(block, rng)
    w = {v.path: to_numpy(v) for v in block.weights}
    get = lambda suffix: next(v for k, v in w.items() if k.endswith(suffix))  # noqa

    def layer_norm(v, name):
        mean = v.mean(-1, keepdims=True)
        var = v.var(-1, keepdims=True)
        return (v - mean) / np.sqrt(var + 1e-5) * get(f"{name}/gamma") + get(f"{name}/beta")

    aaren = aaren_naive.aaren_layer(x, _weights(block.aaren), HEADS)
    h = layer_norm(x + aaren, "attention_norm")
    ff = np.maximum(h @ get("intermediate_dense/kernel") + get("intermediate_dense/bias"), 0)
    ff = ff @ get("output_dense/kernel") + get("output_dense/bias")
    expected = layer_norm(h + ff, "feedforward_norm")
    assert_close(_apply(block, x)[0], expected, 1e-5, "post-norm block")
    # Masks reach Aaren and pass on to the next layer.
    mask = np.ones((B, T), bool)
    mask[1, 6:] = False
    masked = _apply(block, x, mask)[0]
    unpadded = _apply(block, np.concatenate([x[1:, :6], x[:1, 6:]], 1))[0]
    assert_close(masked[1:, :6], unpadded[:, :6], 1e-5, "masked block")
    assert to_numpy(block.compute_mask(x, mask)).tolist() == mask.tolist()


@pytest.mark.parametrize("go_backwards", [False, True], ids=["causal", "anticausal"])
def test_block_sees_only_one_side(go_backwards, rng):
    """Each output depends on the steps up to it (after it, backwards)."""
    block = keras_attnrnn.AarenBlock(UNITS, num_heads=HEADS, go_backwards=go_backwards)
    x = _x(rng, features=UNITS)
    block.build(x.shape)
    changed = x.copy()
    changed[:, 4] += 1.0
    before, after = _apply(block, x)[0], _apply(block, changed)[0]
    moved = np.abs(after - before).max(axis=(0, 2)) > 1e-6
    expected = np.arange(T) <= 4 if go_backwards else np.arange(T) >= 4
    np.testing.assert_array_equal(moved, expected)


def test_block_streams_like_the_whole_sequence(rng):
    x = _x(rng, features=UNITS)
    block = keras_attnrnn.AarenBlock(UNITS, num_heads=HEADS, normalize_first=True)
    block(x)
    stream = keras_attnrnn.AarenBlock(UNITS, num_heads=HEADS, normalize_first=True, stateful=True)
    stream(x[:, :1])
    stream.set_weights(block.get_weights())
    stream.reset_state()
    steps = np.concatenate([to_numpy(stream(x[:, t : t + 1])) for t in range(T)], 1)
    assert_close(steps, to_numpy(block(x)), 1e-5, "streamed block")


def test_trains_a_masked_stack_of_blocks():
    """Padded integer sequences: is the mean token of the unpadded part high?"""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.integers(1, 30, size=(64, T))
    x[::2, 6:] = 0
    y = (x.sum(1) / (x > 0).sum(1) > 15).astype("float32")
    model = keras.Sequential([
        keras.Input((None,), dtype="int32"),
        keras.layers.Embedding(30, UNITS, mask_zero=True),
        keras_attnrnn.AarenBlock(UNITS, num_heads=HEADS, dropout=0.1, seed=1),
        keras_attnrnn.AarenBlock(UNITS, num_heads=HEADS, normalize_first=True),
        keras_attnrnn.Aaren(UNITS, num_heads=HEADS),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    model.compile(keras.optimizers.Adam(2e-2), "binary_crossentropy")
    history = model.fit(x, y, epochs=10, batch_size=64, verbose=0)
    assert history.history["loss"][-1] < 0.7 * history.history["loss"][0]


def test_dropout(rng):
    layer = keras_attnrnn.Aaren(UNITS, num_heads=HEADS, dropout=0.5, seed=3)
    x = _x(rng)
    inference = to_numpy(layer(x))
    np.testing.assert_array_equal(inference, to_numpy(layer(x, training=False)))
    trained = to_numpy(layer(x, training=True))
    assert not np.allclose(trained, inference)
    assert np.all(np.isfinite(trained))


def test_bidirectional_and_stacked_cells(rng):
    x = _x(rng)
    bi = keras.layers.Bidirectional(keras.layers.RNN(keras_attnrnn.AarenCell(UNITS, num_heads=HEADS)))
    bi_fused = keras.layers.Bidirectional(keras_attnrnn.Aaren(UNITS, num_heads=HEADS))
    bi.build(x.shape)
    bi_fused.build(x.shape)
    bi_fused.set_weights(bi.get_weights())
    expected = _apply(bi, x)[0]
    assert expected.shape == (B, 2 * UNITS)
    assert_close(_apply(bi_fused, x)[0], expected, 1e-5, "bidirectional")
    stacked = keras.layers.RNN(
        keras.layers.StackedRNNCells(
            [keras_attnrnn.AarenCell(UNITS, num_heads=HEADS), keras_attnrnn.AarenCell(6, num_heads=3)]
        )
    )
    stacked.build(x.shape)
    first = keras_attnrnn.Aaren(UNITS, num_heads=HEADS, return_sequences=True)
    second = keras_attnrnn.Aaren(6, num_heads=3)
    first.build(x.shape)
    second.build((B, T, UNITS))
    first.set_weights(stacked.get_weights()[:7])
    second.set_weights(stacked.get_weights()[7:])
    expected = _apply(stacked, x)[0]
    assert_close(_apply(second, _apply(first, x)[0])[0], expected, 1e-5, "stacked")


def test_save_and_load_in_a_new_process(tmp_path, rng):
    inputs = keras.Input((None, 6))
    x = keras_attnrnn.AarenBlock(6, num_heads=2, intermediate_dim=8)(inputs)
    x = keras_attnrnn.Aaren(8, num_heads=2, return_sequences=True, implementation="reference")(x)
    x = keras.layers.RNN(keras_attnrnn.AarenCell(4, num_heads=4))(x)
    model = keras.Model(inputs, x)
    data = rng.normal(size=(2, 5, 6)).astype("float32")
    expected = to_numpy(model(data))
    path = str(tmp_path / "model.keras")
    np.save(tmp_path / "x.npy", data)
    model.save(path)
    got = run_in_subprocess(f"""
        import json, numpy as np, keras
        import keras_attnrnn
        model = keras.saving.load_model({path!r}, safe_mode=True)
        x = np.load({str(tmp_path / 'x.npy')!r})
        print(json.dumps(np.asarray(model.predict_on_batch(x)).tolist()))
    """)
    assert_close(np.array(got), expected, 1e-6, "reloaded outputs")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: keras_attnrnn.AarenCell(0), "units.*0"),
        (lambda: keras_attnrnn.Aaren(2.5), "units.*2.5"),
        (lambda: keras_attnrnn.Aaren(10, num_heads=4), "num_heads.*4"),
        (lambda: keras_attnrnn.AarenCell(10, num_heads=0), "num_heads.*0"),
        (lambda: keras_attnrnn.AarenBlock(10, num_heads=3), "num_heads.*3"),
        (lambda: keras_attnrnn.AarenBlock(8, intermediate_dim=0), "intermediate_dim.*0"),
        (lambda: keras_attnrnn.Aaren(8, implementation="cudnn"), "implementation.*cudnn"),
        (lambda: keras_attnrnn.Aaren(8, dropout=1.5), "dropout.*1.5"),
        (lambda: keras_attnrnn.AarenBlock(8, dropout=-0.1), "dropout.*-0.1"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("kind", ["cell", "layer"])
def test_bad_inputs(kind):
    layer = (
        keras_attnrnn.Aaren(8)
        if kind == "layer"
        else keras.layers.RNN(keras_attnrnn.AarenCell(8))
    )
    with pytest.raises(ValueError, match="(ndim|rank|3D|inputs)"):
        layer(np.zeros((2, 8), "float32"))
    layer(np.zeros((2, 3, 8), "float32"))
    with pytest.raises(ValueError, match="inputs.*8 features"):
        layer(np.zeros((2, 3, 5), "float32"))


@pytest.mark.parametrize("mode", MODES)
def test_bad_mask_shape(mode):
    # (Only the fused layer sees the mask: the generic Keras loop of
    # RNN(AarenCell) does not check its shape.)
    layer = keras_attnrnn.Aaren(8, implementation=mode)
    with pytest.raises(ValueError, match="mask.*\\(2, 3\\).*\\(2, 4\\)"):
        layer(np.zeros((2, 3, 8), "float32"), mask=np.ones((2, 4), bool))


def test_block_rejects_a_width_other_than_units():
    with pytest.raises(ValueError, match="inputs.*units=8.*\\(2, 3, 5\\)"):
        keras_attnrnn.AarenBlock(8)(np.zeros((2, 3, 5), "float32"))
