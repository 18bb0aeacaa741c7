"""Which layer exports to which format on this backend: a probe.

For every layer (the cells in `keras.layers.RNN` and the fused layers) and
every format `model.export` offers on the current backend, exports a small
model, runs the artifact in its own runtime (TensorFlow, ONNX Runtime,
OpenVINO, the LiteRT interpreter, `torch.export.load`) and compares its
outputs with Keras's. Prints one markdown row per layer and format:
"works (relative error)" or the first line of the error. Appends the rows to
`--results` as JSON lines when given.

    KERAS_BACKEND=tensorflow python examples/export_matrix.py
    KERAS_BACKEND=torch python examples/export_matrix.py --formats onnx,torch

Needs the runtimes: `pip install onnxruntime openvino ai-edge-litert tf2onnx
onnx` (not dependencies of the package).
"""

import argparse
import os
import tempfile
import traceback

import keras
import numpy as np
from _experiment import record
from _experiment import rel_error
from _runtimes import SUFFIX
from _runtimes import open_artifact

import keras_attnrnn

BATCH, TIME, FEATURES, UNITS = 2, 5, 4, 8

LAYERS = {
    "RNN(AttnRNNCell)": lambda: keras.layers.RNN(keras_attnrnn.AttnRNNCell(UNITS, num_heads=2)),
    "AttnRNN": lambda: keras_attnrnn.AttnRNN(UNITS, num_heads=2),
    "RNN(LARNNCell)": lambda: keras.layers.RNN(
        keras_attnrnn.LARNNCell(UNITS, window=3, num_heads=2)),
    "LARNN": lambda: keras_attnrnn.LARNN(UNITS, window=3, num_heads=2),
    "RNN(AarenCell)": lambda: keras.layers.RNN(keras_attnrnn.AarenCell(UNITS, num_heads=2)),
    "Aaren": lambda: keras_attnrnn.Aaren(UNITS, num_heads=2),
}
FORMATS = {
    "tensorflow": ["tf_saved_model", "onnx", "openvino", "litert"],
    "jax": ["tf_saved_model", "onnx", "openvino"],
    "torch": ["onnx", "openvino", "litert", "torch"],
}


def _run_artifact(fmt, path, x):
    """The artifact's (first) output on `x`, from the format's own runtime."""
    return next(iter(open_artifact(fmt, path)(x).values()))


def probe(name, fmt, directory):
    """(works, detail) for one layer and format."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((TIME, FEATURES), batch_size=BATCH), LAYERS[name](),
                              keras.layers.Dense(2)])
    x = np.random.default_rng(0).normal(size=(BATCH, TIME, FEATURES)).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x))
    path = os.path.join(directory, name.replace("(", "_").replace(")", "") + "_" + fmt
                        + SUFFIX[fmt])
    try:
        # The input's shape, batch included: Keras's torch export otherwise
        # traces a batch of 1 and specializes to it.
        spec = keras.InputSpec(shape=(BATCH, TIME, FEATURES), dtype="float32")
        model.export(path, format=fmt, verbose=False, input_signature=[spec])
        got = _run_artifact(fmt, path, x)
    except Exception as error:  # the probe reports, it does not stop
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        first = lines[0][:160] if lines else ""
        return False, f"{type(error).__name__}: {first}", traceback.format_exc()
    error = rel_error(got, expected)
    return error <= 1e-4, f"relative error {error:.1e}", ""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--formats", default=None,
                        help="comma-separated (default: every format of the backend)")
    parser.add_argument("--layers", default=None, help=f"comma-separated of {list(LAYERS)}")
    parser.add_argument("--results", default=None, help="append JSON lines here")
    parser.add_argument("--traceback", action="store_true")
    args = parser.parse_args(argv)
    backend = keras.config.backend()
    formats = args.formats.split(",") if args.formats else FORMATS[backend]
    layers = args.layers.split(",") if args.layers else list(LAYERS)
    print(f"| layer | format | backend | works | detail |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as directory:
        for name in layers:
            for fmt in formats:
                works, detail, trace = probe(name, fmt, directory)
                print(f"| {name} | {fmt} | {backend} | {'yes' if works else 'no'} | {detail} |",
                      flush=True)
                if args.traceback and trace:
                    print(trace)
                if args.results:
                    record(args.results, experiment="export_matrix", layer=name, format=fmt,
                           works=works, detail=detail)


if __name__ == "__main__":
    main()
