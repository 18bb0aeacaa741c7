"""Run an exported artifact in its own runtime, with NumPy in and out.

One opener for the scripts that run what `model.export` writes
(`export_matrix.py`, `serve_streaming.py`, `benchmarks/streaming_latency.py`).
It imports only NumPy and the runtime of the format asked for: no Keras, no
keras_attnrnn, so an artifact is checked the way a server would run it.
"""

import importlib.util

import numpy as np

# The modules that `model.export(format=...)` on each backend and the
# format's runtime here need (none of them a dependency: the `export*`
# extras of pyproject.toml).
NEEDS = {
    "tensorflow": {"tf_saved_model": (), "onnx": ("tf2onnx", "onnxruntime"),
                   "openvino": ("openvino",), "litert": ("ai_edge_litert",)},
    # SavedModel through jax2tf; ONNX through jax2onnx.
    "jax": {"tf_saved_model": ("tensorflow",), "onnx": ("jax2onnx", "onnxruntime"),
            "openvino": ("openvino",)},
    "torch": {"onnx": ("onnx", "onnxruntime"), "openvino": ("openvino",),
              "litert": ("litert_torch", "ai_edge_litert"), "torch": ()},
}


def missing_modules(backend, fmt):
    """The modules exporting to `fmt` on `backend` and running it need that
    are not installed (none for a format without an entry: its export then
    fails with Keras's own error)."""
    needs = NEEDS[backend].get(fmt, ())
    return [m for m in needs if importlib.util.find_spec(m) is None]


# The file name ending `model.export` expects for each format.
SUFFIX = {"tf_saved_model": "", "onnx": ".onnx", "openvino": ".xml", "litert": ".tflite",
          "torch": ".pt2"}


def open_artifact(fmt, path, threads=None, output_names=None):
    """A function running the artifact at `path` in `fmt`'s runtime.

    Args:
        fmt: the `model.export` format: `"tf_saved_model"` (TensorFlow's
            `tf.saved_model.load`), `"onnx"` (ONNX Runtime), `"openvino"`,
            `"litert"` (the LiteRT interpreter) or `"torch"`
            (`torch.export.load`).
        path: the artifact.
        threads: the runtime's threads for ONNX Runtime, OpenVINO and LiteRT
            (their defaults when None).
        output_names: the outputs' names in the model's flattened order
            (Keras's: sorted keys), for ONNX files that number their outputs
            instead of naming them (torch's exporter, which also gives one
            name to two outputs that are the same tensor).

    Returns:
        `call(feed) -> {name: array}`. `feed` is a dict of NumPy arrays by
        input name (inputs the artifact does not have are ignored), or one
        array for an artifact with one input. A single-tensor output is
        named `"output_0"` where the runtime gives it no name. `call.inputs`
        lists the input names where the runtime has them.
    """
    if fmt == "tf_saved_model":
        import tensorflow as tf

        loaded = tf.saved_model.load(path)
        # The serving signature names the inputs of a model with several
        # (a dict); `serve` itself takes the model's input structure.
        signature = loaded.signatures.get("serving_default")
        names = list(signature.structured_input_signature[1]) if signature else None

        def call(feed):
            if isinstance(feed, dict):
                keep = names if names and set(names) <= set(feed) else list(feed)
                out = loaded.serve({k: tf.constant(feed[k]) for k in keep})
            else:
                out = loaded.serve(tf.constant(feed))
            return _named(out, lambda v: v.numpy())

        call.runtime = loaded  # its variables live as long as the function
    elif fmt == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = threads
        session = onnxruntime.InferenceSession(path, options,
                                               providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        keys = outputs
        if output_names is not None and not set(outputs) <= set(output_names):
            keys = list(output_names)

        def call(feed):
            feed = _feed(feed, names)
            return dict(zip(keys, session.run(outputs, feed)))

    elif fmt == "openvino":
        import openvino

        # float32 inference: on CPUs with AMX or AVX-512 BF16 OpenVINO
        # otherwise computes in bfloat16.
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        compiled = openvino.Core().compile_model(path, "CPU", config)
        request = compiled.create_infer_request()
        names = [name for port in compiled.inputs for name in port.get_names()]

        def call(feed):
            feed = [feed] if not isinstance(feed, dict) else {
                k: v for k, v in feed.items() if k in names}
            out = {}
            for port, value in request.infer(feed).items():
                # Outputs that are one tensor (AttnRNN's output and new
                # state) come back as one port with every name.
                for name in sorted(port.get_names()) or ["output_0"]:
                    out[name] = np.array(value)
            return out

    elif fmt == "litert":
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=path, num_threads=threads)
        runner = interpreter.get_signature_runner()
        names = list(runner.get_input_details())
        # litert-torch names a dict input's entries args_0_<key>.
        keys = {n: n[len("args_0_"):] if n.startswith("args_0_") else n for n in names}

        def call(feed):
            if isinstance(feed, dict):
                feed = {n: feed[k] for n, k in keys.items()}
            else:
                feed = _feed(feed, names)
            return {k: np.asarray(v) for k, v in runner(**feed).items()}

        call.runtime = interpreter  # kept alive with the function
    elif fmt == "torch":
        import torch

        module = torch.export.load(path).module()
        names = None

        def call(feed):
            if isinstance(feed, dict):
                feed = {k: torch.from_numpy(v) for k, v in feed.items()}
            else:
                feed = torch.from_numpy(feed)
            with torch.no_grad():
                out = module(feed)
            return _named(out, lambda v: v.detach().numpy())

    else:
        raise ValueError(f"Received an invalid value for argument `fmt`: {fmt!r}.")
    call.inputs = names
    return call


def _feed(feed, names):
    """`feed` as a dict of the artifact's inputs."""
    if not isinstance(feed, dict):
        return {names[0]: feed}
    return {k: feed[k] for k in names}


def _named(out, to_numpy):
    """A runtime's outputs (a dict or one tensor) as a dict of arrays."""
    if isinstance(out, dict):
        return {k: to_numpy(v) for k, v in out.items()}
    return {"output_0": to_numpy(out)}
