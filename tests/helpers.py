"""Test helpers shared by the whole suite (backend-agnostic)."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np

BACKEND = keras.config.backend()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get(
    "KERAS_ATTNRNN_SHARED", os.path.join(os.path.dirname(REPO), "shared")
)
# Keras computes float64 as float64 only on tensorflow: its dtype rules map
# float64 to float32 on torch, and jax needs jax_enable_x64.
FLOAT64_BACKENDS = ("tensorflow",)


def rel_error(actual, expected):
    """max |actual - expected| / max |expected| (flash-linear-attention's)."""
    actual = np.asarray(actual, dtype="float64")
    expected = np.asarray(expected, dtype="float64")
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(np.abs(expected).max(), 1e-12) if expected.size else 1.0
    return float(np.abs(actual - expected).max() / scale) if actual.size else 0.0


def assert_close(actual, expected, tol, what=""):
    err = rel_error(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def float32_noise(fn, args, rng):
    """How much `value_and_grads(fn, args)` moves under an ulp of input noise.

    Long recurrences (and LayerNorm over few units) amplify float32 rounding;
    two correct float32 implementations that round differently then differ by
    about this much. Returns the largest relative change over all gradients.
    """
    eps = np.finfo("float32").eps
    _, grads = value_and_grads(fn, args)
    noisy = [
        None if a is None else a * (1 + eps * rng.standard_normal(a.shape)).astype(a.dtype)
        for a in args
    ]
    _, noisy_grads = value_and_grads(fn, noisy)
    return max(
        rel_error(n, g) for n, g in zip(noisy_grads, grads) if g is not None
    )


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def value_and_grads(fn, args):
    """Value of `fn(*args)` (a scalar) and its gradients w.r.t. all `args`.

    `args` are NumPy arrays (or None, passed through with a None gradient).
    Uses the current backend's autodiff directly.
    """
    live = [i for i, a in enumerate(args) if a is not None]
    if BACKEND == "jax":
        import jax

        def wrapped(*xs):
            full = list(args)
            for i, x in zip(live, xs):
                full[i] = x
            return fn(*full)

        value, grads = jax.value_and_grad(wrapped, argnums=tuple(range(len(live))))(
            *[jax.numpy.asarray(args[i]) for i in live]
        )
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        full = list(args)
        watched = [tf.constant(args[i]) for i in live]
        with tf.GradientTape() as tape:
            for t in watched:
                tape.watch(t)
            for i, t in zip(live, watched):
                full[i] = t
            value = fn(*full)
        grads = tape.gradient(value, watched)
    elif BACKEND == "torch":
        import torch

        full = list(args)
        tensors = [torch.tensor(args[i], requires_grad=True) for i in live]
        for i, t in zip(live, tensors):
            full[i] = t
        value = fn(*full)
        grads = torch.autograd.grad(value, tensors, allow_unused=True)
    else:
        raise NotImplementedError(BACKEND)
    out = [None] * len(args)
    for i, g in zip(live, grads):
        out[i] = None if g is None else to_numpy(g)
    return float(to_numpy(value)), out


def layer_value_and_grads(layer, inputs, initial_state=None, cotangents=()):
    """Runs a built `layer` statelessly on NumPy inputs.

    Returns:
        `(outputs, grad_inputs, grad_initial_state, grad_weights)`: the
        flattened outputs as NumPy arrays, and the gradients of
        `sum(outputs[i] * cotangents[i])` with respect to the inputs, the
        initial state (None when not given) and each trainable weight (a dict
        by weight name).
    """
    weights = layer.trainable_variables
    names = [v.path.split("/")[-1] for v in weights]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def call(x, h0, *ws):
        kwargs = {} if h0 is None else {"initial_state": [h0]}
        out, _ = layer.stateless_call(list(ws), non_trainable, x, **kwargs)
        return keras.tree.flatten(out)

    values = [to_numpy(w.value) for w in weights]
    tensor = keras.ops.convert_to_tensor
    outputs = call(
        tensor(inputs),
        None if initial_state is None else tensor(initial_state),
        *[tensor(v) for v in values],
    )
    outputs = [to_numpy(o) for o in outputs]

    def loss(x, h0, *ws):
        return sum(
            keras.ops.sum(o * keras.ops.convert_to_tensor(c, dtype=o.dtype))
            for o, c in zip(call(x, h0, *ws), cotangents)
        )

    _, grads = value_and_grads(loss, [inputs, initial_state] + values)
    return outputs, grads[0], grads[1], dict(zip(names, grads[2:]))


def run_in_subprocess(code, backend=None, env=None, timeout=600):
    """Runs Python `code` in a fresh process; returns its stdout's last line.

    The last printed line is parsed as JSON.
    """
    full_env = dict(os.environ)
    full_env["KERAS_BACKEND"] = backend or BACKEND
    full_env.update(env or {})
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=os.path.dirname(REPO),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
