"""Export for serving (tensorflow): `model.export(path)` writes a SavedModel;
`tf.saved_model.load` gives back Keras's outputs, in a new process that does
not import keras_attnrnn where the graph uses only TensorFlow ops. ONNX
(`format="onnx"`) where tf2onnx and onnxruntime are installed (they are not
dependencies of this package). See docs/getting_started.md, "Export"."""

import importlib.util

import keras
import numpy as np
import pytest

import keras_attnrnn
from helpers import BACKEND
from helpers import assert_close
from helpers import run_in_subprocess
from helpers import to_numpy

pytestmark = pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="Keras exports SavedModels (and ONNX via tf2onnx) from the "
    "tensorflow backend",
)

D = 5


def _model(layer):
    model = keras.Sequential(
        [keras.Input((None, D)), layer, keras.layers.Dense(2)]
    )
    rng = np.random.default_rng(0)
    model.set_weights(
        [rng.normal(size=w.shape).astype("float32") * 0.5 for w in model.get_weights()]
    )
    return model


LAYERS = {
    "cell_in_rnn": lambda: keras.layers.RNN(
        keras_attnrnn.AttnRNNCell(8, num_heads=2), return_sequences=True
    ),
    # The fused layer: TensorFlow's own ops only (XLA while loops).
    "attnrnn": lambda: keras_attnrnn.AttnRNN(8, num_heads=2, return_sequences=True),
    "larnn": lambda: keras_attnrnn.LARNN(
        8, window=3, num_heads=2, return_sequences=True
    ),
    "aaren": lambda: keras_attnrnn.Aaren(8, num_heads=2, return_sequences=True),
}
STREAM_BATCH, STREAM_TIME = 2, 6


def _export_stream(path, rng):
    """A stateful Aaren exported with a `serve` endpoint (one step per call)
    and a `reset_state` endpoint; returns its inputs and the outputs Keras
    computes for the whole sequence at once."""
    batch = STREAM_BATCH
    layer = keras_attnrnn.Aaren(8, num_heads=2, return_sequences=True, stateful=True)
    stream = keras.Sequential(
        [keras.Input(batch_shape=(batch, 1, D)), layer, keras.layers.Dense(3)]
    )
    whole = keras.Sequential([
        keras.Input((None, D)),
        keras_attnrnn.Aaren(8, num_heads=2, return_sequences=True),
        keras.layers.Dense(3),
    ])
    whole.set_weights(
        [rng.normal(size=w.shape).astype("float32") * 0.5 for w in whole.get_weights()]
    )
    stream.set_weights(whole.get_weights())
    x = rng.normal(size=(batch, STREAM_TIME, D)).astype("float32")

    archive = keras.export.ExportArchive()
    archive.track(stream)
    archive.add_endpoint(
        "serve",
        stream.__call__,
        input_signature=[keras.InputSpec(shape=(batch, 1, D), dtype="float32")],
    )

    def reset_state():
        layer.reset_state()
        return keras.ops.zeros(())

    archive.add_endpoint("reset_state", reset_state, input_signature=[])
    archive.write_out(path, verbose=False)
    return x, to_numpy(whole(x))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every SavedModel of this file, reloaded in one new process that does
    not import keras_attnrnn: ({name: Keras outputs}, {name: reloaded})."""
    root = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 7, D)).astype("float32")
    np.save(root / "x.npy", x)
    expected = {}
    for kind, make in LAYERS.items():
        model = _model(make())
        expected[kind] = to_numpy(model(x))
        expected[kind + "/short"] = to_numpy(model(x[:2, :4]))
        model.export(str(root / kind), format="tf_saved_model", verbose=False)
    stream_x, expected["stream"] = _export_stream(str(root / "stream"), rng)
    np.save(root / "stream_x.npy", stream_x)
    got = run_in_subprocess(f"""
        import json, os, sys
        import numpy as np, tensorflow as tf
        root = {str(root)!r}
        x = np.load(os.path.join(root, "x.npy"))
        out = {{}}
        for kind in {list(LAYERS)!r}:
            loaded = tf.saved_model.load(os.path.join(root, kind))
            out[kind] = loaded.serve(tf.constant(x)).numpy().tolist()
            # Another batch size and length: the signature is (None, None, d).
            out[kind + "/short"] = loaded.serve(tf.constant(x[:2, :4])).numpy().tolist()
        loaded = tf.saved_model.load(os.path.join(root, "stream"))
        x = np.load(os.path.join(root, "stream_x.npy"))
        for run in ("stream", "stream/after_reset"):
            steps = [loaded.serve(tf.constant(x[:, t : t + 1])).numpy()
                     for t in range(x.shape[1])]
            out[run] = np.concatenate(steps, 1).tolist()
            loaded.reset_state()
        assert "keras_attnrnn" not in sys.modules
        print(json.dumps(out))
    """)
    expected["stream/after_reset"] = expected["stream"]
    return expected, {k: np.array(v) for k, v in got.items()}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_saved_model_reloads_in_a_new_process(kind, exported):
    expected, got = exported
    for key in (kind, kind + "/short"):
        assert_close(got[key], expected[key], 1e-5, f"{key} SavedModel")


def test_streaming_aaren_saved_model(exported):
    """The stateful Aaren's SavedModel, fed one step per call in a new
    process, streams the outputs Keras computes for the whole sequence at
    once; after its `reset_state` endpoint, again."""
    expected, got = exported
    for key in ("stream", "stream/after_reset"):
        assert got[key].shape == (STREAM_BATCH, STREAM_TIME, 3)
        assert_close(got[key], expected[key], 1e-5, key)


@pytest.mark.skipif(
    importlib.util.find_spec("tf2onnx") is None
    or importlib.util.find_spec("onnxruntime") is None,
    reason="ONNX export needs tf2onnx and onnxruntime (not dependencies)",
)
@pytest.mark.parametrize("kind", list(LAYERS))
def test_onnx_export(kind, tmp_path):
    """Every layer converts to ONNX and runs in ONNX Runtime with Keras's
    outputs: the fused AttnRNN and LARNN trace their loops without XLA for
    tf2onnx (which cannot convert a call of an XLA-compiled function)."""
    import onnxruntime

    model = _model(LAYERS[kind]())
    x = np.random.default_rng(4).normal(size=(3, 7, D)).astype("float32")
    expected = to_numpy(model(x))  # (Keras exports only a called model.)
    path = str(tmp_path / "model.onnx")
    model.export(path, format="onnx", verbose=False)
    session = onnxruntime.InferenceSession(path)
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert_close(got, expected, 1e-5, f"{kind} ONNX")


@pytest.mark.skipif(
    importlib.util.find_spec("ai_edge_litert") is None,
    reason="LiteRT export runs in ai-edge-litert's interpreter (not a dependency)",
)
@pytest.mark.parametrize("kind", list(LAYERS))
def test_litert_export(kind, tmp_path):
    """Every layer, the fused AttnRNN and LARNN included (their loops give
    their TensorArrays' element shapes), runs in the LiteRT interpreter with
    Keras's outputs."""
    from ai_edge_litert.interpreter import Interpreter

    model = _model(LAYERS[kind]())
    x = np.random.default_rng(5).normal(size=(3, 7, D)).astype("float32")
    expected = to_numpy(model(x))
    # A SavedModel first, for any batch and length: a later trace must not
    # reuse its loops' general shapes (they made LiteRT need Flex ops).
    model.export(str(tmp_path / "saved"), format="tf_saved_model", verbose=False)
    path = str(tmp_path / "model.tflite")
    model.export(path, format="litert", verbose=False,
                 input_signature=[keras.InputSpec(shape=x.shape, dtype="float32")])
    interpreter = Interpreter(model_path=path)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    assert_close(got, expected, 1e-5, f"{kind} LiteRT")
