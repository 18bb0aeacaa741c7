"""What the registry needs to know about a call: the backend and the device."""

import keras

from keras_attnrnn.ops.registry import REGISTRY


def device_kind(tensor):
    """"cpu" or "gpu" (or "tpu"): where `tensor` lives, or will be computed."""
    backend = keras.config.backend()
    if backend == "torch":
        device = getattr(tensor, "device", None)
        kind = getattr(device, "type", "cpu")
        return "gpu" if kind == "cuda" else kind
    if backend == "jax":
        import jax

        kind = jax.default_backend()
        return "gpu" if kind in ("gpu", "cuda", "rocm") else kind
    if backend == "tensorflow":
        import tensorflow as tf

        device = getattr(tensor, "device", "") or ""
        if device:
            return "gpu" if ":GPU:" in device.upper() else "cpu"
        return "gpu" if tf.config.list_logical_devices("GPU") else "cpu"
    return "cpu"


def traced():
    """Is this call being traced into a graph by torch (`torch.export`,
    `torch.onnx.export`, `torch.compile`, `torch.jit.trace`)? Native kernels
    (C++ extensions, `autograd.Function`s with Python loops) cannot be
    captured there: they decline, and a traceable implementation serves the
    call (so `model.export` picks one itself)."""
    if keras.config.backend() != "torch":
        return False
    import torch
    import torch.compiler

    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def dispatch(op, implementation, reference_tensor, call):
    """Chooses the implementation of `op` for this call and returns its function."""
    backend = keras.config.backend()
    device = device_kind(reference_tensor)
    call = dict(call, backend=backend, device=device, traced=traced())
    return REGISTRY.select(op, backend, device, call, implementation).load()


def dtype_name(tensor):
    return keras.backend.standardize_dtype(tensor.dtype)


def as_tensors(*values):
    """Backend tensors for Keras variables and arrays (None stays None)."""
    return [None if v is None else keras.ops.convert_to_tensor(v) for v in values]


def compute_cast(tensor):
    """`(dtype, cast)`: `tensor`'s dtype, and a cast to the dtype the loops
    compute in (float32 for 16-bit inputs; None stays None)."""
    dtype = dtype_name(tensor)
    compute = "float32" if dtype in ("float16", "bfloat16") else dtype

    def cast(v):
        return None if v is None else keras.ops.cast(v, compute)

    return dtype, cast


def time_major_mask(mask):
    """(b, t) -> (t, b, 1) booleans, as the loops take it; None stays None."""
    if mask is None:
        return None
    return keras.ops.expand_dims(
        keras.ops.transpose(keras.ops.cast(mask, "bool")), -1
    )


def invalid(name, expected, got):
    """The Keras-style error for argument `name`."""
    return ValueError(
        f"Received an invalid value for argument `{name}`, expected "
        f"{expected}, got {got}."
    )


def check_mask(mask, inputs):
    """Raises unless `mask` is None or (batch, timesteps) like `inputs`."""
    if mask is not None and (
        len(mask.shape) != 2
        or any(
            m is not None and i is not None and m != i
            for m, i in zip(mask.shape, inputs.shape[:2])
        )
    ):
        raise invalid(
            "mask", f"shape (batch, timesteps) = {tuple(inputs.shape[:2])}",
            f"shape {tuple(mask.shape)}",
        )
