"""Every weight of a layer draws its own initial values.

A Keras random initializer keeps one seed and draws the same values at every
call: one instance used for two weights gave an AttnRNN equal query and
output kernels, and LARNN and Aaren equal key and value kernels (and the
AarenBlock's two feedforward kernels the same draws, reshaped), until each
weight got its own clone (`_base.weight_initializer`)."""

import itertools

import keras
import numpy as np
import pytest

import keras_attnrnn
from helpers import to_numpy

UNITS, FEATURES = 8, 6
LAYERS = {
    "AttnRNN": lambda **kw: keras_attnrnn.AttnRNN(UNITS, num_heads=2, **kw),
    "AttnRNN reference": lambda **kw: keras_attnrnn.AttnRNN(
        UNITS, num_heads=2, initialization="reference", **kw),
    "LARNN": lambda **kw: keras_attnrnn.LARNN(UNITS, window=3, num_heads=2, **kw),
    "Aaren": lambda **kw: keras_attnrnn.Aaren(UNITS, num_heads=2, **kw),
    "AarenBlock": lambda **kw: keras_attnrnn.AarenBlock(UNITS, num_heads=2, **kw),
    "AttnRNNCell": lambda **kw: keras.layers.RNN(
        keras_attnrnn.AttnRNNCell(UNITS, num_heads=2, **kw)),
    "LARNNCell": lambda **kw: keras.layers.RNN(
        keras_attnrnn.LARNNCell(UNITS, window=3, num_heads=2, **kw)),
    "AarenCell": lambda **kw: keras.layers.RNN(
        keras_attnrnn.AarenCell(UNITS, num_heads=2, **kw)),
}


def _weights(name, **kwargs):
    layer = LAYERS[name](**kwargs)
    features = UNITS if name == "AarenBlock" else FEATURES
    layer.build((None, None, features))
    # By the weight's place in the layer (a second layer's paths are renumbered).
    return {f"{i}:{w.name}": to_numpy(w).ravel() for i, w in enumerate(layer.weights)}


def _same_draws(a, b):
    """Whether two weights hold the same random draws up to scale (one
    initializer called twice, with the same or another shape)."""
    n = min(a.size, b.size)
    if n < 2 or a[:n].std() == 0 or b[:n].std() == 0:
        return False  # constants (zeros, ones) are alike by design
    return np.allclose(a[:n] / np.abs(a[:n]).max(), b[:n] / np.abs(b[:n]).max())


@pytest.mark.parametrize("seeded", [False, True], ids=["unseeded", "seeded"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_no_two_weights_share_their_draws(name, seeded):
    keras.utils.set_random_seed(1)
    kwargs = {}
    if seeded:  # one seeded instance given for a whole group of weights
        kwargs["kernel_initializer"] = keras.initializers.GlorotUniform(seed=3)
    weights = _weights(name, **kwargs)
    shared = [(p, q) for (p, a), (q, b) in itertools.combinations(weights.items(), 2)
              if _same_draws(a, b)]
    assert not shared, f"{name}: equal initial draws in {shared}"


def test_larnn_gate_bias_parts_draw_their_own():
    """LARNN's gate bias [input, forget (ones), cell and output] draws its
    two random parts from two clones of `bias_initializer`."""
    keras.utils.set_random_seed(1)
    (bias,) = [v for k, v in _weights("LARNN", bias_initializer="random_uniform").items()
               if k.endswith(":bias")]
    first, forget, rest = bias[:UNITS], bias[UNITS:2 * UNITS], bias[2 * UNITS:]
    np.testing.assert_array_equal(forget, 1.0)
    assert first.std() > 0 and not _same_draws(first, rest)


@pytest.mark.parametrize("name", ["AttnRNN", "LARNN", "AarenBlock"])
def test_initial_weights_are_reproducible(name):
    keras.utils.set_random_seed(5)
    first = _weights(name)
    keras.utils.set_random_seed(5)
    second = _weights(name)
    for path in first:
        np.testing.assert_array_equal(first[path], second[path], err_msg=path)
    # The weights of a seeded initializer are the same whatever the global
    # seed (the unseeded ones are not).
    seeded = dict(kernel_initializer=keras.initializers.GlorotUniform(seed=3))
    keras.utils.set_random_seed(6)
    a = _weights(name, **seeded)
    keras.utils.set_random_seed(7)
    b = _weights(name, **seeded)
    same = [p for p in a if a[p].std() > 0 and np.array_equal(a[p], b[p])]
    moved = [p for p in a if a[p].std() > 0 and not np.array_equal(a[p], b[p])]
    assert same and moved, (same, moved)
