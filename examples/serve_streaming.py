"""Serve a recurrent layer token by token from an exported streaming step.

For each model (AttnRNN, LARNN, Aaren), builds a small layer (random
weights; or the first AttnRNN/LARNN/Aaren layer of a `.keras` file given with
`--load`), computes its outputs for a whole sequence in Keras, exports its
streaming step (`keras_attnrnn.streaming_step`: one token and the state in,
the output and the new state out) with `model.export`, then feeds the
sequence to the artifact one token at a time in its own runtime (the LiteRT
interpreter, ONNX Runtime, ...) and prints how far its outputs are from
Keras's. Exits with status 1 when an artifact disagrees (relative error
above `--tolerance`) or a format fails to export or run.

    KERAS_BACKEND=tensorflow python examples/serve_streaming.py           # LiteRT and ONNX Runtime
    KERAS_BACKEND=tensorflow python examples/serve_streaming.py --formats litert,onnx,tf_saved_model,openvino
    KERAS_BACKEND=torch python examples/serve_streaming.py                # ONNX Runtime and torch.export
    KERAS_BACKEND=jax python examples/serve_streaming.py --models larnn,aaren --formats tf_saved_model
    KERAS_BACKEND=tensorflow python examples/serve_streaming.py --load model.keras --models attnrnn

Offline; needs the runtimes of the formats it serves (`pip install
onnxruntime ai-edge-litert tf2onnx onnx`, not dependencies of the package).
A format whose runtime or exporter is missing is reported and skipped. On
jax no format serves all three models (docs/export.md, "Streaming"), so by
default only the Keras step runs there.
"""

import argparse
import os
import sys
import tempfile
import time

import keras
import numpy as np

import keras_attnrnn
from _experiment import rel_error
from _runtimes import SUFFIX
from _runtimes import missing_modules
from _runtimes import open_artifact

MODELS = {
    "attnrnn": lambda units, heads, window: keras_attnrnn.AttnRNN(
        units, num_heads=heads, return_sequences=True),
    "larnn": lambda units, heads, window: keras_attnrnn.LARNN(
        units, window=window, num_heads=heads, return_sequences=True),
    "aaren": lambda units, heads, window: keras_attnrnn.Aaren(
        units, num_heads=heads, return_sequences=True),
}
LAYER_TYPES = {
    "attnrnn": keras_attnrnn.AttnRNNCell,
    "larnn": keras_attnrnn.LARNNCell,
    "aaren": keras_attnrnn.AarenCell,
}
# The formats tried by default, by backend (docs/export.md, "Streaming", lists
# every format that serves the step; `_runtimes.NEEDS`, what each needs).
DEFAULT_FORMATS = {"tensorflow": ["litert", "onnx"], "torch": ["onnx", "torch"],
                   "jax": ["onnx"]}


def open_step(fmt, path, output_names):
    """A function running the exported step at `path` in its own runtime
    (`_runtimes.open_artifact`, one thread).

    It takes the dict of NumPy inputs (`"inputs"` and the state by name) and
    returns the dict of NumPy outputs (`"outputs"` and `"new_<state>"`).
    `output_names`: the step's output names in Keras's flattened order
    (sorted), for artifacts that do not keep them (ONNX from torch).
    """
    # ONNX from torch numbers its outputs (in Keras's flattened order) and
    # drops inputs the step does not read (Aaren's previous output).
    return open_artifact(fmt, path, threads=1, output_names=output_names)


def input_signature(step):
    """The step's inputs with their batch size, by name: Keras's default
    signature leaves the batch open, and torch's exporters then trace a
    batch of 1."""
    return [{name: keras.InputSpec(shape=tuple(t.shape), dtype=t.dtype, name=name)
             for name, t in step.input.items()}]


def serve(call, sequence, state):
    """Feeds `sequence` (batch, time, features) one token at a time: the
    outputs (batch, time, units), the final state and the seconds per token."""
    state = dict(state)
    outputs, times = [], []
    for t in range(sequence.shape[1]):
        start = time.perf_counter()
        result = call({"inputs": sequence[:, t], **state})
        times.append(time.perf_counter() - start)
        state = {name: result["new_" + name] for name in state}
        outputs.append(result["outputs"])
    return np.stack(outputs, axis=1), state, float(np.median(times))


def load_layer(path, kind):
    """The first layer of the `.keras` file at `path` whose cell is `kind`."""
    model = keras.saving.load_model(path)
    for layer in model._flatten_layers(include_self=False):
        if isinstance(getattr(layer, "cell", None), LAYER_TYPES[kind]):
            return layer
    raise ValueError(f"Received an invalid value for argument `--load`: {path} holds no "
                     f"{kind} layer.")


def whole_sequence(layer):
    """`layer` itself, or a twin with its weights that returns every step's
    output (a loaded layer may return the last one only, or be stateful)."""
    if layer.return_sequences and not (layer.return_state or layer.stateful):
        return layer
    config = dict(layer.get_config(), return_sequences=True, return_state=False,
                  stateful=False)
    twin = type(layer).from_config(config)
    twin.build((None, None, layer.cell.input_dim))
    twin.set_weights(layer.get_weights())
    return twin


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    backend = keras.config.backend()
    parser.add_argument("--formats", default=",".join(DEFAULT_FORMATS[backend]),
                        help="comma-separated, of " + ", ".join(SUFFIX))
    parser.add_argument("--load", default=None, help="a .keras file to stream a layer of")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--features", type=int, default=6)
    parser.add_argument("--units", type=int, default=16)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--window", type=int, default=4, help="LARNN's window")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    keras.utils.set_random_seed(args.seed)
    failed = False
    with tempfile.TemporaryDirectory() as directory:
        for kind in args.models.split(","):
            if args.load:
                layer = load_layer(args.load, kind)
                features = layer.cell.input_dim
            else:
                layer = MODELS[kind](args.units, args.heads, args.window)
                features = args.features
                layer.build((None, None, features))
                # Weights larger than the initializers' so that every part of
                # the step (gates, attention, norms) moves the outputs.
                layer.set_weights([rng.normal(size=w.shape).astype("float32") * 0.5
                                   for w in layer.get_weights()])
            sequence = rng.normal(size=(args.batch, args.tokens, features)).astype("float32")
            expected = keras.ops.convert_to_numpy(whole_sequence(layer)(sequence))
            step = keras_attnrnn.streaming_step(layer, batch_size=args.batch)
            state = keras_attnrnn.streaming_initial_state(layer, args.batch)
            state_bytes = sum(a.nbytes for a in state.values())
            shapes = ", ".join(f"{n} {tuple(a.shape)}" for n, a in state.items())
            print(f"{kind}: state {shapes}, {state_bytes} bytes at every step")
            # Keras itself, token by token.
            got, _, seconds = serve(
                lambda feed: {k: keras.ops.convert_to_numpy(v) for k, v in step(feed).items()},
                sequence, state)
            error = rel_error(got, expected)
            failed |= not error <= args.tolerance
            print(f"  keras step: {args.tokens} tokens, relative error {error:.1e} against the "
                  f"layer on the whole sequence, {seconds * 1e3:.3f} ms/token")
            for fmt in [f for f in args.formats.split(",") if f]:
                missing = missing_modules(backend, fmt)
                if missing:
                    print(f"  {fmt}: skipped (needs {', '.join(missing)}, not installed)")
                    continue
                path = os.path.join(directory, f"{kind}_step{SUFFIX[fmt]}")
                try:
                    step.export(path, format=fmt, verbose=False,
                                input_signature=input_signature(step))
                    call = open_step(fmt, path, sorted(step.output))
                    got, final, seconds = serve(call, sequence, state)
                except Exception as error:
                    lines = [line for line in str(error).strip().splitlines() if line.strip()]
                    first = f"{type(error).__name__}: {lines[0][:160] if lines else ''}"
                    if isinstance(error, ImportError):  # not installed
                        print(f"  {fmt}: skipped ({first})")
                    else:
                        print(f"  {fmt}: FAILS ({first})")
                        failed = True
                    continue
                error = rel_error(got, expected)
                agrees = error <= args.tolerance
                constant = all(final[n].shape == state[n].shape for n in state)
                failed |= not (agrees and constant)
                print(f"  {fmt}: {args.tokens} tokens, relative error {error:.1e} against "
                      f"the Keras layer ({'agrees' if agrees else 'DISAGREES'}), state shapes "
                      f"{'constant' if constant else 'CHANGED'}, "
                      f"{seconds * 1e3:.3f} ms/token", flush=True)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
