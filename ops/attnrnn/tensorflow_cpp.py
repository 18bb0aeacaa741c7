"""AttnRNN on tensorflow (CPU) with the step loops in C++ (`tensorflow_cpu.cc`).

Two custom ops built from `attnrnn_cpu.h` (the loops torch's extension uses
too), their matmuls Eigen contractions on TensorFlow's intra-op thread pool.
The library is compiled with the system C++ compiler against TensorFlow's
headers the first time it is used on a machine (about a minute) and cached in
`$KERAS_ATTNRNN_CACHE` (default `~/.cache/keras_attnrnn`), keyed by the
sources, the TensorFlow version and the CPU model (it is built for the host
CPU). A custom op cannot run inside XLA: in an XLA-compiled function
`supports()` declines and the `tensorflow_loop` implementation serves.
"""

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess

import tensorflow as tf

from keras_attnrnn.ops.attnrnn import steps
from keras_attnrnn.ops.attnrnn.reference import LAYER_NORM_EPSILON

_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCES = [os.path.join(_HERE, "tensorflow_cpu.cc"), os.path.join(_HERE, "attnrnn_cpu.h")]
_library = None
_error = None


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _library_path():
    digest = hashlib.sha256()
    for path in _SOURCES:
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(tf.__version__.encode())
    digest.update(_cpu_model().encode())
    cache = os.environ.get("KERAS_ATTNRNN_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "keras_attnrnn"
    )
    return os.path.join(cache, f"attnrnn_tensorflow_{digest.hexdigest()[:16]}.so")


def _build(path):
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time per machine
        if os.path.exists(path):
            return
        logging.getLogger("keras_attnrnn.ops").info(
            "building the AttnRNN tensorflow op (once per machine)"
        )
        tmp = f"{path}.{os.getpid()}.tmp"
        command = [
            compiler, "-std=c++17", "-shared", "-fPIC", "-O3", "-march=native",
            "-w", _SOURCES[0], "-o", tmp, f"-I{_HERE}",
            *tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags(),
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip()[-400:])
        os.replace(tmp, path)


def _load():
    global _library, _error
    if _library is None and _error is None:
        try:
            path = _library_path()
            if not os.path.exists(path):
                _build(path)
            _library = tf.load_op_library(path)
        except Exception as error:
            _error = f"{type(error).__name__}: {str(error).strip()[:300]}"
    return _library


def available():
    """(ok, reason): can the op be built (or is it already)?"""
    if _load() is None:
        return False, f"the AttnRNN tensorflow op could not be built ({_error})"
    return True, ""


def _in_xla_function():
    try:  # tensorflow's own test; not public, so fail open
        from tensorflow.python.ops import control_flow_util

        return control_flow_util.GraphOrParentsInXlaContext(
            tf.compat.v1.get_default_graph()
        )
    except Exception:
        return False


def supports(call):
    if call["recurrent_dropout"]:
        return False, "recurrent dropout is not fused (the reference serves it)"
    if call["dtype"] not in ("float16", "bfloat16", "float32", "float64"):
        return False, f"dtype {call['dtype']} is not a float dtype"
    if _in_xla_function():
        return False, "inside an XLA-compiled function, where custom ops cannot run"
    return True, ""


def _recurrence(x, h0, w_hq, b_hq, w_o, b_o, w_ga, gamma, beta, mask, num_heads, reverse, epsilon):
    library = _load()

    @tf.custom_gradient
    def run(x, h0, w_hq, b_hq, w_o, b_o, w_ga, gamma, beta):
        weights = (w_hq, b_hq, w_o, b_o, w_ga, gamma, beta)
        saved = library.keras_attnrnn_forward(
            x, h0, *weights, mask, num_heads=num_heads, reverse=reverse, epsilon=epsilon
        )
        hs = saved[0]

        def grad(d_hs, d_last):
            dx, dh0, dhw, du, dcand = library.keras_attnrnn_backward(
                d_hs, d_last, x, h0, *saved, *weights, mask,
                num_heads=num_heads, reverse=reverse,
            )
            _, _, _, o, _, a, _, rhat, _ = saved
            d_weights = steps.packed_weight_grads(
                h0, hs, o, a, rhat, dhw, du, dcand, reverse
            )
            return (dx, dh0, *d_weights)

        return (hs, hs[0] if reverse else hs[-1]), grad

    return run(x, h0, w_hq, b_hq, w_o, b_o, w_ga, gamma, beta)


def attnrnn(
    inputs,
    initial_state,
    query_kernel,
    query_bias,
    output_kernel,
    output_bias,
    gate_kernel,
    gate_bias,
    gamma,
    beta,
    num_heads,
    input_kernel=None,
    input_bias=None,
    mask=None,
    reverse=False,
    recurrent_dropout_mask=None,
    epsilon=LAYER_NORM_EPSILON,
):
    """Same contract as `reference.attnrnn` (no recurrent dropout)."""
    inputs = tf.convert_to_tensor(inputs)
    dtype = inputs.dtype
    compute = tf.float32 if dtype in (tf.float16, tf.bfloat16) else dtype

    def cast(v):
        return tf.cast(tf.convert_to_tensor(v), compute)

    x = cast(inputs)
    if input_kernel is not None:
        x = tf.matmul(x, cast(input_kernel)) + cast(input_bias)
    units = query_kernel.shape[-1]
    gate_kernel = cast(gate_kernel)
    m = tf.zeros((0,), tf.bool)
    if mask is not None:
        m = tf.transpose(tf.cast(mask, tf.bool))
    hs, h_last = _recurrence(
        tf.transpose(x, (1, 0, 2)),
        cast(initial_state),
        tf.concat([cast(query_kernel), gate_kernel[:units]], 1),
        tf.concat([cast(query_bias), cast(gate_bias)], 0),
        cast(output_kernel),
        cast(output_bias),
        gate_kernel[units:],
        cast(gamma),
        cast(beta),
        m,
        num_heads,
        bool(reverse),
        float(epsilon),
    )
    return tf.cast(tf.transpose(hs, (1, 0, 2)), dtype), tf.cast(h_last, dtype)
