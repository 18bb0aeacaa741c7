"""Training the fused layers on several devices (issue 15).

Each check fits a small model (one fused layer and a Dense(1) head) for two
SGD steps on one device and, from the same initial weights, on two devices,
and compares the final weights. The device count has to be fixed before the
backend initializes, so each backend's check runs in a fresh process (all
three layers in one process, since a process costs ~10 s to start).

- jax: `keras.distribution.DataParallel` over 2 virtual CPU devices
  (`XLA_FLAGS=--xla_force_host_platform_device_count=2`).
- tensorflow: `tf.distribute.MirroredStrategy` over 2 logical CPUs.
- torch: Keras 3 has no distribution API for torch, so there is nothing to
  test.
"""

import numpy as np
import pytest

from helpers import BACKEND, assert_close, run_in_subprocess

LAYERS = ("AttnRNN", "LARNN", "Aaren")

# Shared by both subprocesses: `SETUP` (backend specific) defines
# `distributed()`, a context manager under which Keras trains on 2 devices,
# and `device_info()`, facts about it for the parent to check.
_COMMON = """
import contextlib
import json

import keras
import numpy as np

import keras_attnrnn

BATCH, TIME, FEATURES, STEPS = 8, 6, 5, 2
rng = np.random.default_rng(0)
x = rng.normal(size=(BATCH * STEPS, TIME, FEATURES)).astype("float32")
y = rng.normal(size=(BATCH * STEPS, 1)).astype("float32")


def make_layer(name):
    if name == "AttnRNN":
        return keras_attnrnn.AttnRNN(8, num_heads=2)
    if name == "LARNN":
        return keras_attnrnn.LARNN(8, window=3, num_heads=2)
    return keras_attnrnn.Aaren(8, num_heads=2)


def build(name):
    inputs = keras.Input((TIME, FEATURES))
    outputs = keras.layers.Dense(1)(make_layer(name)(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(learning_rate=0.1), "mse")
    return model


def train(name, initial, scope=None):
    with scope or contextlib.nullcontext():
        model = build(name)
        model.set_weights(initial)
        history = model.fit(
            x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0
        )
        extra = device_info(model) if scope is not None else None
    return model, history, extra


results = {}
for name in %r:
    keras.utils.set_random_seed(0)
    initial = build(name).get_weights()
    single, h1, _ = train(name, initial)
    multi, h2, info = train(name, initial, distributed())
    results[name] = {
        "initial": [w.tolist() for w in initial],
        "single": [w.tolist() for w in single.get_weights()],
        "multi": [w.tolist() for w in multi.get_weights()],
        "steps": [
            int(keras.ops.convert_to_numpy(m.optimizer.iterations))
            for m in (single, multi)
        ],
        "loss": [h1.history["loss"], h2.history["loss"]],
        "info": info,
    }
print(json.dumps(results))
""" % (LAYERS,)

_JAX_SETUP = """
import jax
import keras


def distributed():
    devices = jax.devices()
    return keras.distribution.DataParallel(devices=devices).scope()


def device_info(model):
    distribution = keras.distribution.distribution()
    kernel = model.trainable_variables[0].value
    return {
        "devices": len(jax.devices()),
        "platform": jax.devices()[0].platform,
        "mesh_shape": list(distribution.device_mesh.shape),
        "variable_devices": len(kernel.sharding.device_set),
    }
"""

_TF_SETUP = """
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def distributed():
    return strategy.scope()


def device_info(model):
    kernel = model.trainable_variables[0]
    return {
        "devices": len(tf.config.list_logical_devices("CPU")),
        "replicas": strategy.num_replicas_in_sync,
        "in_strategy": tf.distribute.has_strategy(),
        "variable_devices": len(getattr(kernel.value, "values", [kernel.value])),
    }
"""


def _check(results):
    assert set(results) == set(LAYERS), results.keys()
    for name in LAYERS:
        r = results[name]
        assert r["steps"] == [2, 2], (name, r["steps"])
        initial, single, multi = (
            [np.asarray(w, dtype="float32") for w in r[k]]
            for k in ("initial", "single", "multi")
        )
        assert len(single) == len(multi) == len(initial)
        # Training moved the weights (of the fused layer, not just the head):
        # all weights but the head's kernel and bias belong to the layer.
        layer_initial = np.concatenate([w.ravel() for w in initial[:-2]])
        layer_single = np.concatenate([w.ravel() for w in single[:-2]])
        moved = np.abs(layer_single - layer_initial).max() / np.abs(layer_initial).max()
        assert moved > 1e-3, (name, moved)
        # Relative to each weight's own scale, floored at 1e-2 (the weights
        # are O(0.1..1)): Aaren's key_bias shifts every score of a head by
        # the same amount, which the softmax cancels, so its gradient is
        # rounding noise and the weight stays ~1e-11, differently rounded on
        # 1 and 2 devices.
        for k, (s, m) in enumerate(zip(single, multi)):
            scale = max(np.abs(s).max(), 1e-2)
            err = np.abs(m - s).max() / scale
            assert err <= 1e-5, f"{name} weight {k}, 2 devices vs 1: {err:.3e}"
        assert_close(
            np.concatenate([m.ravel() for m in multi]),
            np.concatenate([s.ravel() for s in single]),
            1e-5,
            f"{name}: all weights, 2 devices vs 1",
        )
        np.testing.assert_allclose(r["loss"][1], r["loss"][0], rtol=1e-5)


@pytest.mark.skipif(
    BACKEND != "jax",
    reason="keras.distribution.DataParallel is checked in the jax backend's "
    "run only (torch: Keras 3 has no multi-device distribution API)",
)
def test_jax_data_parallel_matches_one_device():
    results = run_in_subprocess(
        _JAX_SETUP + _COMMON,
        backend="jax",
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    )
    _check(results)
    for name in LAYERS:
        info = results[name]["info"]
        assert info["devices"] == 2, (name, info)
        assert info["mesh_shape"] == [2], (name, info)
        assert info["variable_devices"] == 2, (name, info)


@pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="tf.distribute.MirroredStrategy is checked in the tensorflow "
    "backend's run only (torch: Keras 3 has no multi-device distribution API)",
)
def test_tf_mirrored_strategy_matches_one_device():
    results = run_in_subprocess(_TF_SETUP + _COMMON, backend="tensorflow")
    _check(results)
    for name in LAYERS:
        info = results[name]["info"]
        assert info["devices"] == 2, (name, info)
        assert info["replicas"] == 2, (name, info)
        assert info["in_strategy"], (name, info)
        assert info["variable_devices"] == 2, (name, info)
