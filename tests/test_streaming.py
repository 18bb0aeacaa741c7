"""The streaming step (`keras_attnrnn.streaming_step`): fed a sequence one
token at a time, each new state into the next step, it gives the layer's
outputs for the whole sequence, with a state of constant size; exported, it
does the same in its own runtime (ONNX Runtime, LiteRT, torch.export,
TensorFlow), called as examples/serve_streaming.py calls it."""

import os
import sys

import keras
import numpy as np
import pytest

import keras_attnrnn
from helpers import BACKEND
from helpers import assert_close
from helpers import to_numpy

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from _runtimes import missing_modules  # noqa: E402
from serve_streaming import SUFFIX  # noqa: E402
from serve_streaming import input_signature  # noqa: E402
from serve_streaming import open_step  # noqa: E402
from serve_streaming import serve  # noqa: E402

BATCH, TIME, FEATURES, UNITS = 2, 7, 5, 6

LAYERS = {
    "AttnRNN": lambda **kw: keras_attnrnn.AttnRNN(UNITS, num_heads=2, **kw),
    "LARNN": lambda **kw: keras_attnrnn.LARNN(UNITS, window=3, num_heads=2, **kw),
    "Aaren": lambda **kw: keras_attnrnn.Aaren(UNITS, num_heads=2, **kw),
    "RNN(AttnRNNCell)": lambda **kw: keras.layers.RNN(
        keras_attnrnn.AttnRNNCell(UNITS, num_heads=2), **kw),
    "RNN(LARNNCell)": lambda **kw: keras.layers.RNN(
        keras_attnrnn.LARNNCell(UNITS, window=3, num_heads=2), **kw),
    "RNN(AarenCell)": lambda **kw: keras.layers.RNN(
        keras_attnrnn.AarenCell(UNITS, num_heads=2), **kw),
}
MODELS = ["AttnRNN", "LARNN", "Aaren"]
STATE_SIZES = {
    "AttnRNN": {"h": UNITS},
    "LARNN": {"h": UNITS, "c": UNITS, "window": 3 * UNITS, "valid": 3},
    "Aaren": {"y": UNITS, "w": UNITS, "m": 2, "u": 2},
}


def _layer(name, seed=0, **kwargs):
    """A built layer returning every step, with weights large enough that
    every part of the step moves the outputs."""
    layer = LAYERS[name](return_sequences=True, **kwargs)
    layer.build((None, None, FEATURES))
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.normal(size=w.shape).astype("float32") * 0.5
                       for w in layer.get_weights()])
    return layer


def _sequence(seed=1, batch=BATCH, time=TIME):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, time, FEATURES)).astype("float32")


def _keras_call(step):
    return lambda feed: {k: to_numpy(v) for k, v in step(feed).items()}


@pytest.mark.parametrize("name", list(LAYERS))
def test_stepping_token_by_token_equals_the_layer(name):
    layer = _layer(name)
    x = _sequence()
    expected = to_numpy(layer(x))
    step = keras_attnrnn.streaming_step(layer)
    state = keras_attnrnn.streaming_initial_state(layer, BATCH)
    kind = name.replace("RNN(", "").replace("Cell)", "")
    assert {n: s.shape for n, s in state.items()} == {
        n: (BATCH, size) for n, size in STATE_SIZES[kind].items()}
    got, final, _ = serve(_keras_call(step), x, state)
    assert_close(got, expected, 1e-5, name)
    # The state keeps its size, whatever the number of tokens.
    assert {n: s.shape for n, s in final.items()} == {n: s.shape for n, s in state.items()}
    # And it moved: the test would not pass with a step that ignores it.
    assert any(not np.allclose(final[n], state[n]) for n in state)


@pytest.mark.parametrize("name", MODELS)
def test_the_step_uses_the_layers_own_weights(name):
    layer = _layer(name)
    step = keras_attnrnn.streaming_step(layer)
    assert {id(v) for v in step.weights} == {id(v) for v in layer.weights}
    x = _sequence(time=2)
    state = keras_attnrnn.streaming_initial_state(layer, BATCH)
    before, _, _ = serve(_keras_call(step), x, state)
    # Training the layer afterwards changes what the step computes.
    layer.set_weights([w * 1.5 for w in layer.get_weights()])
    after, _, _ = serve(_keras_call(step), x, state)
    assert_close(after, to_numpy(layer(x)), 1e-5, name)
    assert not np.allclose(before, after)


@pytest.mark.parametrize("name", MODELS)
def test_skipping_a_masked_token_equals_the_masked_layer(name):
    layer = _layer(name)
    x = _sequence(batch=1)
    mask = np.array([[True, False, True, True, False, False, True]])
    expected = to_numpy(layer(x, mask=mask))[:, mask[0]]
    step = keras_attnrnn.streaming_step(layer, batch_size=1)
    state = keras_attnrnn.streaming_initial_state(layer, 1)
    got, _, _ = serve(_keras_call(step), x[:, mask[0]], state)
    assert_close(got, expected, 1e-5, name)


def test_attnrnn_starts_from_its_initial_state_value():
    layer = keras_attnrnn.AttnRNN(UNITS, num_heads=2, initial_state_value=0.25)
    layer.build((None, None, FEATURES))
    state = keras_attnrnn.streaming_initial_state(layer, 3)
    np.testing.assert_array_equal(state["h"], np.full((3, UNITS), 0.25, "float32"))
    aaren = _layer("Aaren")
    assert all(not s.any() for s in keras_attnrnn.streaming_initial_state(aaren).values())


def test_a_cell_streams_as_its_layer_does():
    layer = _layer("LARNN")
    x = _sequence()
    step = keras_attnrnn.streaming_step(layer.cell)
    got, _, _ = serve(_keras_call(step), x,
                      keras_attnrnn.streaming_initial_state(layer.cell, BATCH))
    assert_close(got, to_numpy(layer(x)), 1e-5)
    assert step.name == "larnn_cell_step"


def test_batch_size_declares_the_input_shapes():
    step = keras_attnrnn.streaming_step(_layer("Aaren"), batch_size=3, name="serve")
    assert step.name == "serve"
    assert {n: tuple(t.shape) for n, t in step.input.items()} == {
        "inputs": (3, FEATURES), "y": (3, UNITS), "w": (3, UNITS), "m": (3, 2), "u": (3, 2)}
    assert sorted(step.output) == ["new_m", "new_u", "new_w", "new_y", "outputs"]


@pytest.mark.parametrize(
    "make, argument, message",
    [
        (lambda: keras.layers.Dense(3), "layer", "got Dense"),
        (lambda: keras.layers.GRU(3), "layer", "got GRU"),
        (lambda: keras_attnrnn.Aaren(UNITS, num_heads=2), "layer", "is not built"),
        (lambda: _layer("AttnRNN", go_backwards=True), "layer", "go_backwards=True"),
        (lambda: _layer("Aaren"), "batch_size", "got 0"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(make, argument, message):
    kwargs = {"batch_size": 0} if argument == "batch_size" else {}
    with pytest.raises(ValueError, match=f"argument `{argument}`.*{message}"):
        keras_attnrnn.streaming_step(make(), **kwargs)


def test_bad_initial_state_batch_size_raises():
    with pytest.raises(ValueError, match="argument `batch_size`.*got None"):
        keras_attnrnn.streaming_initial_state(_layer("Aaren"), batch_size=None)
    with pytest.raises(ValueError, match="argument `batch_size`.*got 1.5"):
        keras_attnrnn.streaming_initial_state(_layer("Aaren"), batch_size=1.5)


# The formats whose artifacts serve every model token by token, by backend
# (docs/export.md, "Streaming"), with what they need installed.
EXPORTS = {
    "tensorflow": ["onnx", "litert"],
    "torch": ["onnx", "torch", "litert"],
    "jax": ["onnx", "tf_saved_model"],
}
EXPORT_CASES = [
    (name, fmt)
    for fmt in EXPORTS[BACKEND]
    for name in MODELS
    # SavedModel through jax2tf: AttnRNN's erf does not load in TensorFlow
    # 2.21 (docs/export.md).
    if not (BACKEND == "jax" and fmt == "tf_saved_model" and name == "AttnRNN")
]


@pytest.mark.parametrize("name, fmt", EXPORT_CASES)
def test_exported_step_serves_the_sequence_in_its_runtime(name, fmt, tmp_path):
    missing = missing_modules(BACKEND, fmt)
    if missing:
        pytest.skip(f"{fmt} needs {', '.join(missing)}, not installed (export extras, docs/export.md)")
    layer = _layer(name)
    x = _sequence()
    expected = to_numpy(layer(x))
    step = keras_attnrnn.streaming_step(layer, batch_size=BATCH)
    state = keras_attnrnn.streaming_initial_state(layer, BATCH)
    # Keras's torch exporters need the model to have been called once.
    step({"inputs": x[:, 0], **state})
    path = str(tmp_path / f"{name}_step{SUFFIX[fmt]}")
    step.export(path, format=fmt, verbose=False, input_signature=input_signature(step))
    got, final, _ = serve(open_step(fmt, path, sorted(step.output)), x, state)
    assert_close(got, expected, 1e-5, f"{name} {fmt}")
    assert {n: s.shape for n, s in final.items()} == {n: s.shape for n, s in state.items()}
    # The artifact's last state is the layer's (return_state).
    keras_final = _layer(name, return_state=True)(x)[1:]
    for n, value in zip(state, keras_final):
        assert_close(final[n], to_numpy(value), 1e-5, f"{name} {fmt} state {n}")
