"""Test helpers shared by the whole suite (backend-agnostic)."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

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


def aaren_scan_loss(fn, mask, reverse, cotangents, with_state=True):
    """A scalar function of `(scores, values, *initial_state)`: an Aaren
    scan `fn`'s outputs and final state, each summed against its cotangent
    (`cotangents`: outputs', then the state's), so that its gradients are
    the scan's vector-Jacobian product. Without `with_state` the scan starts
    from its default state and the function takes `(scores, values)`."""

    def loss(scores, values, *state):
        tensor = keras.ops.convert_to_tensor
        outputs, final = fn(
            scores,
            values,
            initial_state=tuple(state) if with_state else None,
            mask=None if mask is None else tensor(mask),
            reverse=reverse,
        )
        total = keras.ops.sum(outputs * tensor(cotangents[0]))
        for x, c in zip(final, cotangents[1:]):
            total = total + keras.ops.sum(x * tensor(c))
        return total

    return loss


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


def _flat_outputs(outputs):
    return [to_numpy(o) for o in keras.tree.flatten(outputs)]


def run_layer_test(
    make_layer,
    input_shape,
    *,
    cell=False,
    expected_output_shape=None,
    mixed_precision=True,
    seed=0,
):
    """Checks what every layer and cell of the package must do.

    `make_layer(**overrides)` builds a fresh layer (or cell, with `cell=True`:
    it is then run in `keras.layers.RNN(cell, return_sequences=True)`).
    Checks: config round-trip (and Keras serialization); eager and symbolic
    calls agree in shape, with a static and a dynamic time dimension; a layer
    rebuilt from its config with the same weights gives the same outputs; one
    training step runs with finite loss and changes the weights; under the
    `mixed_float16` and `mixed_bfloat16` policies the outputs are finite and
    close to float32.
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=input_shape).astype("float32")
    def wrap(layer):
        if not cell:
            return layer
        return keras.layers.RNN(
            layer, return_sequences=True, dtype=layer.dtype_policy
        )


    original = make_layer()
    config = original.get_config()
    rebuilt = type(original).from_config(config)
    assert rebuilt.get_config() == config
    serialized = keras.saving.serialize_keras_object(original)
    assert type(keras.saving.deserialize_keras_object(serialized)) is type(original)

    layer = wrap(original)
    eager = _flat_outputs(layer(x))
    if expected_output_shape is not None:
        assert eager[0].shape == tuple(expected_output_shape), eager[0].shape
    twin = wrap(rebuilt)
    twin(x)
    twin.set_weights(layer.get_weights())
    for a, b in zip(_flat_outputs(twin(x)), eager):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    for time in (input_shape[1], None):
        inputs = keras.Input((time,) + tuple(input_shape[2:]))
        symbolic = wrap(make_layer())(inputs)
        for s, e in zip(keras.tree.flatten(symbolic), eager):
            assert tuple(s.shape[1:]) == tuple(
                None if (time is None and i == 0 and len(e.shape) == 3) else d
                for i, d in enumerate(e.shape[1:])
            ), (s.shape, e.shape)

    inputs = keras.Input(tuple(input_shape[1:]))
    out = keras.tree.flatten(wrap(make_layer())(inputs))[0]
    out = keras.layers.Dense(1)(keras.layers.Flatten()(out))
    model = keras.Model(inputs, out)
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    before = [to_numpy(w) for w in model.trainable_weights]
    history = model.fit(
        x, rng.normal(size=(input_shape[0], 1)).astype("float32"),
        epochs=2, batch_size=input_shape[0], verbose=0,
    )
    assert np.all(np.isfinite(history.history["loss"]))
    after = [to_numpy(w) for w in model.trainable_weights]
    assert any(not np.allclose(a, b) for a, b in zip(before, after))

    if mixed_precision:
        for policy, tol in (("mixed_float16", 2e-2), ("mixed_bfloat16", 1e-1)):
            mixed = wrap(make_layer(dtype=policy))
            mixed(x)
            mixed.set_weights(layer.get_weights())
            for m, e in zip(_flat_outputs(mixed(x)), eager):
                m = m.astype("float32")
                assert np.all(np.isfinite(m)), policy
                err = np.abs(m - e).max() / max(np.abs(e).max(), 1e-6)
                assert err <= tol, f"{policy}: relative error {err:.2e} > {tol}"


def run_example(script, *args, timeout=600):
    """Runs `examples/<script>` on this backend in a new process; its stdout."""
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def read_jsonl(path):
    """The records of a JSON-lines file the experiment scripts append to."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def skip_unless_installed(modules):
    """Skips the test when any of `modules` is not installed (the export
    runtimes and converters are not dependencies)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (not a dependency)")


def export_and_run(make_layer, fmt, folder, rng, batch=2, time=5, features=4):
    """(artifact's outputs, Keras's) of `Sequential([Input, make_layer(),
    Dense(2)])` exported to `fmt` in `folder` and run in its own runtime as
    examples/export_matrix.py runs it (docs/export.md's tables)."""
    sys.path.insert(0, os.path.join(REPO, "examples"))
    from export_matrix import SUFFIX
    from export_matrix import _run_artifact

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((time, features), batch_size=batch),
        make_layer(),
        keras.layers.Dense(2),
    ])
    x = rng.normal(size=(batch, time, features)).astype("float32")
    expected = to_numpy(model(x))
    path = os.path.join(str(folder), "model" + SUFFIX[fmt])
    # The batch in the signature: Keras's torch exporters otherwise trace a
    # batch of 1 and specialize to it.
    spec = keras.InputSpec(shape=(batch, time, features), dtype="float32")
    model.export(path, format=fmt, verbose=False, input_signature=[spec])
    return _run_artifact(fmt, path, x), expected
