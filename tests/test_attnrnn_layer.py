"""AttnRNNCell and AttnRNN as Keras layers: arguments, shapes, masks, state,
serialization, and agreement between the cell, the fused layer and every
implementation."""

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
    n for n in keras_attnrnn.ops.implementations("attnrnn", BACKEND, "cpu")
    if n != "reference"
]


def _random_like(layer, rng):
    """Random weights (not the default init: catches swapped weights)."""
    layer.set_weights(
        [rng.normal(size=w.shape).astype("float32") * 0.4 for w in layer.get_weights()]
    )


def _pair(units, heads, rng, input_dim, **kwargs):
    """The cell in keras.layers.RNN and the fused layer, with equal weights."""
    generic = keras.layers.RNN(
        keras_attnrnn.AttnRNNCell(units, num_heads=heads), **kwargs
    )
    fused = {
        mode: keras_attnrnn.AttnRNN(units, num_heads=heads, implementation=mode, **kwargs)
        for mode in MODES
    }
    x = np.zeros((1, 2, input_dim), "float32")
    generic(x)
    _random_like(generic, rng)
    for layer in fused.values():
        layer(x)
        layer.set_weights(generic.get_weights())
    return generic, fused


@pytest.mark.parametrize("cell", [True, False], ids=["cell", "layer"])
def test_layer_behaviours(cell):
    if cell:
        make = lambda **kw: keras_attnrnn.AttnRNNCell(12, num_heads=3, **kw)  # noqa: E731
    else:
        make = lambda **kw: keras_attnrnn.AttnRNN(  # noqa: E731
            12, num_heads=3, return_sequences=True, **kw
        )
    run_layer_test(make, (4, 7, 5), cell=cell, expected_output_shape=(4, 7, 12))


@pytest.mark.parametrize("input_dim, expected", [(16, 4 * 16**2 + 5 * 16), (5, 5 * 16 + 4 * 16**2 + 6 * 16)])
def test_parameter_count(input_dim, expected):
    cell_layer = keras.layers.RNN(keras_attnrnn.AttnRNNCell(16))
    cell_layer.build((None, None, input_dim))
    fused = keras_attnrnn.AttnRNN(16)
    fused.build((None, None, input_dim))
    assert cell_layer.count_params() == expected
    assert fused.count_params() == expected


def test_weight_names_and_identity_input():
    same = keras_attnrnn.AttnRNN(8)
    same.build((None, None, 8))
    other = keras_attnrnn.AttnRNN(8)
    other.build((None, None, 3))
    names = lambda layer: sorted(v.path.split("/")[-1] for v in layer.weights)  # noqa
    base = ["beta", "gamma", "gate_bias", "gate_kernel", "output_bias",
            "output_kernel", "query_bias", "query_kernel"]
    assert names(same) == base
    assert names(other) == sorted(base + ["input_bias", "input_kernel"])


def _initial_weights(**kwargs):
    layer = keras_attnrnn.AttnRNN(64, **kwargs)
    layer.build((None, None, 32))
    return {v.path.split("/")[-1]: to_numpy(v) for v in layer.weights}


def _assert_pytorch_uniform(w, names_and_fan_ins):
    for name, fan_in in names_and_fan_ins:
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(w[name]).max() <= bound, name
        assert np.abs(w[name]).max() > 0.8 * bound, name  # uniform over the range


_SHARED = [("input_kernel", 32), ("input_bias", 32), ("query_kernel", 64),
           ("query_bias", 64), ("output_kernel", 64), ("output_bias", 64),
           ("gate_kernel", 128)]


def test_reference_initialization_is_pytorch_linear():
    w = _initial_weights(initialization="reference")
    _assert_pytorch_uniform(w, _SHARED + [("gate_bias", 128)])
    np.testing.assert_array_equal(w["gamma"], 1)
    np.testing.assert_array_equal(w["beta"], 0)
    # Two cells with default initializers do not share their draws.
    other = _initial_weights(initialization="reference")
    assert not np.allclose(other["query_kernel"], w["query_kernel"])


def test_default_initialization_differs_from_reference_in_gate_bias_and_gamma():
    w = _initial_weights()
    _assert_pytorch_uniform(w, _SHARED)
    np.testing.assert_array_equal(w["gate_bias"], np.float32(-2.0))
    np.testing.assert_array_equal(w["gamma"], np.float32(0.1))
    np.testing.assert_array_equal(w["beta"], 0)


def test_explicit_initializers_override_the_initialization():
    w = _initial_weights(initialization="reference", gamma_initializer="zeros",
                         gate_bias_initializer=keras.initializers.Constant(1.5))
    np.testing.assert_array_equal(w["gamma"], 0)
    np.testing.assert_array_equal(w["gate_bias"], np.float32(1.5))
    # bias_initializer leaves the gate bias to gate_bias_initializer.
    w = _initial_weights(bias_initializer="ones")
    np.testing.assert_array_equal(w["query_bias"], 1)
    np.testing.assert_array_equal(w["gate_bias"], np.float32(-2.0))


def test_initialization_round_trips_through_config():
    layer = keras_attnrnn.AttnRNN(8, initialization="reference")
    config = layer.get_config()
    assert config["initialization"] == "reference"
    again = keras_attnrnn.AttnRNN.from_config(config)
    again.build((None, None, 8))
    np.testing.assert_array_equal(to_numpy(again.cell.gamma), 1)
    cell = keras_attnrnn.AttnRNNCell.from_config(keras_attnrnn.AttnRNNCell(8).get_config())
    cell.build((None, 8))
    np.testing.assert_array_equal(to_numpy(cell.gamma), np.float32(0.1))


def test_unknown_initialization_is_a_value_error():
    with pytest.raises(ValueError, match="initialization.*'pytorch'"):
        keras_attnrnn.AttnRNNCell(8, initialization="pytorch")


@pytest.mark.parametrize("go_backwards", [False, True], ids=["fwd", "backwards"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_fused_layer_equals_cell_in_rnn(go_backwards, masked, rng):
    generic, fused = _pair(
        10, 5, rng, 6, return_sequences=True, return_state=True, go_backwards=go_backwards
    )
    x = rng.normal(size=(3, 9, 6)).astype("float32")
    mask = rng.random((3, 9)) > 0.3 if masked else None
    expected = [to_numpy(v) for v in generic(x, mask=mask)]
    for mode, layer in fused.items():
        got = [to_numpy(v) for v in layer(x, mask=mask)]
        for g, e, what in zip(got, expected, ("outputs", "state")):
            assert_close(g, e, 1e-5, f"{mode} {what}")
        assert keras_attnrnn.ops.selected("attnrnn") == mode


def test_unroll_runs_the_generic_loop_and_agrees(rng):
    generic, fused = _pair(8, 2, rng, 8, return_sequences=True)
    unrolled = keras_attnrnn.AttnRNN(8, num_heads=2, unroll=True, return_sequences=True)
    x = rng.normal(size=(2, 5, 8)).astype("float32")
    unrolled(x)
    unrolled.set_weights(generic.get_weights())
    keras_attnrnn.ops.REGISTRY.reset()
    assert_close(to_numpy(unrolled(x)), to_numpy(generic(x)), 1e-5, "unrolled")
    assert keras_attnrnn.ops.selected("attnrnn") is None


def test_right_padding_with_mask_gives_the_unpadded_result(rng):
    """What Embedding(mask_zero=True) relies on, for the cell and every mode."""
    generic, fused = _pair(12, 4, rng, 12)
    emb_rng = np.random.default_rng(1)
    table = emb_rng.normal(size=(30, 12)).astype("float32")
    lengths = [5, 9, 1]
    for layer in [generic, *fused.values()]:
        model_in = keras.Input((None,), dtype="int32")
        embedded = keras.layers.Embedding(30, 12, mask_zero=True)
        out = layer(embedded(model_in))
        model = keras.Model(model_in, out)
        embedded.set_weights([table])
        for n in lengths:
            tokens = emb_rng.integers(1, 30, size=(1, n))
            padded = np.concatenate([tokens, np.zeros((1, 12 - n), "int64")], 1)
            assert_close(
                to_numpy(model(padded)), to_numpy(model(tokens)), 1e-5, f"len {n}"
            )


def test_go_backwards_equals_reversed_input(rng):
    _, fused = _pair(8, 2, rng, 4, return_sequences=True)
    backwards = keras_attnrnn.AttnRNN(8, num_heads=2, go_backwards=True, return_sequences=True)
    x = rng.normal(size=(2, 6, 4)).astype("float32")
    backwards(x)
    layer = fused[MODES[-1]]
    backwards.set_weights(layer.get_weights())
    assert_close(
        to_numpy(backwards(x)), to_numpy(layer(x[:, ::-1])), 1e-6, "go_backwards"
    )


@pytest.mark.parametrize("mode", MODES)
def test_stateful_continues_and_resets(mode, rng):
    layer = keras_attnrnn.AttnRNN(8, num_heads=2, stateful=True, implementation=mode)
    whole = keras_attnrnn.AttnRNN(8, num_heads=2)
    x = rng.normal(size=(3, 10, 4)).astype("float32")
    layer(x[:, :1])
    whole(x[:, :1])
    layer.reset_state()
    whole.set_weights(layer.get_weights())
    layer(x[:, :4])
    second = to_numpy(layer(x[:, 4:]))
    assert_close(second, to_numpy(whole(x)), 1e-5, "stateful continuation")
    layer.reset_state()
    np.testing.assert_allclose(to_numpy(layer.states[0]), 0.001)
    assert_close(to_numpy(layer(x)), to_numpy(whole(x)), 1e-5, "after reset")


def test_bidirectional_and_stacked_cells(rng):
    bi = keras.layers.Bidirectional(keras.layers.RNN(keras_attnrnn.AttnRNNCell(8, num_heads=2)))
    x = rng.normal(size=(2, 6, 5)).astype("float32")
    assert to_numpy(bi(x)).shape == (2, 16)
    bi_fused = keras.layers.Bidirectional(keras_attnrnn.AttnRNN(8, num_heads=2))
    bi_fused(x)
    bi_fused.set_weights(bi.get_weights())
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    assert_close(to_numpy(bi_fused(x, mask=mask)), to_numpy(bi(x, mask=mask)), 1e-5, "bidirectional")

    stacked = keras.layers.RNN(
        keras.layers.StackedRNNCells(
            [keras_attnrnn.AttnRNNCell(8, num_heads=2), keras_attnrnn.AttnRNNCell(6, num_heads=3)]
        ),
        return_state=True,
    )
    out, *states = stacked(x)
    assert to_numpy(out).shape == (2, 6)
    assert [tuple(to_numpy(s).shape) for s in keras.tree.flatten(states)] == [(2, 8), (2, 6)]
    first = keras.layers.RNN(keras_attnrnn.AttnRNNCell(8, num_heads=2), return_sequences=True)
    second = keras.layers.RNN(keras_attnrnn.AttnRNNCell(6, num_heads=3))
    second(first(x))
    first.set_weights(stacked.get_weights()[:10])
    second.set_weights(stacked.get_weights()[10:])
    assert_close(to_numpy(second(first(x))), to_numpy(out), 1e-5, "stacked")


def test_return_state_and_initial_state(rng):
    layer = keras_attnrnn.AttnRNN(8, num_heads=2, return_sequences=True, return_state=True)
    x = rng.normal(size=(2, 5, 8)).astype("float32")
    h0 = rng.normal(size=(2, 8)).astype("float32")
    seq, state = layer(x, initial_state=[h0])
    assert to_numpy(seq).shape == (2, 5, 8)
    np.testing.assert_allclose(to_numpy(seq)[:, -1], to_numpy(state))
    default_seq, _ = layer(x)
    explicit_seq, _ = layer(x, initial_state=[np.full((2, 8), 0.001, "float32")])
    assert_close(to_numpy(default_seq), to_numpy(explicit_seq), 1e-6, "default state")
    assert not np.allclose(to_numpy(seq), to_numpy(default_seq))


@pytest.mark.parametrize("fused", [False, True], ids=["cell", "layer"])
def test_dropout(fused, rng):
    kwargs = dict(num_heads=2, dropout=0.5, recurrent_dropout=0.3, seed=3)
    layer = (
        keras_attnrnn.AttnRNN(8, **kwargs)
        if fused
        else keras.layers.RNN(keras_attnrnn.AttnRNNCell(8, **kwargs))
    )
    x = rng.normal(size=(4, 6, 5)).astype("float32")
    inference = to_numpy(layer(x))
    np.testing.assert_array_equal(inference, to_numpy(layer(x, training=False)))
    trained = to_numpy(layer(x, training=True))
    assert not np.allclose(trained, inference)
    assert np.all(np.isfinite(trained))
    # And inside a compiled training step (a jax scan must not draw randomness).
    model = keras.Sequential([keras.Input((6, 5)), layer, keras.layers.Dense(1)])
    model.compile("adam", "mse")
    history = model.fit(x, np.ones((4, 1)), epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_trains_on_masked_integer_sequences():
    rng = np.random.default_rng(0)
    x = rng.integers(1, 50, size=(64, 12))
    x[::2, 8:] = 0
    y = (x[:, 0] > 25).astype("float32")
    model = keras.Sequential([
        keras.Input((None,), dtype="int32"),
        keras.layers.Embedding(50, 16, mask_zero=True),
        keras_attnrnn.AttnRNN(16),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    model.compile(keras.optimizers.Adam(1e-2), "binary_crossentropy")
    history = model.fit(x, y, epochs=6, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_save_and_load_in_a_new_process(tmp_path, rng):
    model = keras.Sequential([
        keras.Input((None, 6)),
        keras_attnrnn.AttnRNN(8, num_heads=2, return_sequences=True),
        keras.layers.RNN(keras_attnrnn.AttnRNNCell(8, num_heads=4)),
    ])
    x = rng.normal(size=(2, 5, 6)).astype("float32")
    expected = to_numpy(model(x))
    path = str(tmp_path / "model.keras")
    np.save(tmp_path / "x.npy", x)
    model.save(path)
    got = run_in_subprocess(f"""
        import json, numpy as np, keras
        import keras_attnrnn
        model = keras.saving.load_model({path!r}, safe_mode=True)
        x = np.load({str(tmp_path / 'x.npy')!r})
        print(json.dumps(keras.ops.convert_to_numpy(model(x)).tolist()))
    """)
    assert_close(np.array(got), expected, 1e-6, "reloaded outputs")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: keras_attnrnn.AttnRNNCell(0), "units.*0"),
        (lambda: keras_attnrnn.AttnRNN(-3), "units.*-3"),
        (lambda: keras_attnrnn.AttnRNN(2.5), "units.*2.5"),
        (lambda: keras_attnrnn.AttnRNN(10, num_heads=4), "num_heads.*4"),
        (lambda: keras_attnrnn.AttnRNNCell(10, num_heads=0), "num_heads.*0"),
        (lambda: keras_attnrnn.AttnRNN(8, implementation="cudnn"), "implementation.*cudnn"),
        (lambda: keras_attnrnn.AttnRNN(8, dropout=1.5), "dropout.*1.5"),
        (lambda: keras_attnrnn.AttnRNN(8, implementation="fused", unroll=True), "unroll"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("fused", [False, True], ids=["cell", "layer"])
def test_bad_inputs(fused):
    layer = (
        keras_attnrnn.AttnRNN(8)
        if fused
        else keras.layers.RNN(keras_attnrnn.AttnRNNCell(8))
    )
    with pytest.raises(ValueError, match="(ndim|rank|3D|inputs)"):
        layer(np.zeros((2, 8), "float32"))
    layer(np.zeros((2, 3, 8), "float32"))
    with pytest.raises(ValueError, match="(8|features|axis -1)"):
        layer(np.zeros((2, 3, 5), "float32"))
