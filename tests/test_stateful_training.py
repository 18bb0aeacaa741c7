"""Stateful fused layers train: `RNN.call` assigns the final states into the
state variables in place after the loop, which on torch broke the backward
pass of an op that had saved them (keras-team/keras#23462; issue 12)."""

import keras
import numpy as np
import pytest

import keras_attnrnn
from helpers import to_numpy

LAYERS = {
    "attnrnn": lambda mode: keras_attnrnn.AttnRNN(8, num_heads=2, stateful=True,
                                                  implementation=mode),
    "larnn": lambda mode: keras_attnrnn.LARNN(8, window=3, num_heads=2, stateful=True,
                                              implementation=mode),
    "aaren": lambda mode: keras_attnrnn.Aaren(8, num_heads=2, stateful=True,
                                              implementation=mode),
}


@pytest.mark.parametrize("mode", ["auto", "reference"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_stateful_layer_trains_and_carries_its_state(name, mode):
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3, 8), batch_size=2), LAYERS[name](mode),
                              keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    layer = model.layers[0]
    before = [to_numpy(w) for w in layer.weights]
    x = rng.normal(size=(2, 3, 8)).astype("float32")
    y = np.ones((2, 1), "float32")
    losses = [float(model.train_on_batch(x, y)) for _ in range(3)]
    assert all(np.isfinite(losses)), losses
    assert any(not np.allclose(b, to_numpy(w)) for b, w in zip(before, layer.weights))
    if keras.config.backend() == "jax":
        # Keras's compiled jax steps do not write an RNN's state variables
        # back (keras.layers.GRU(stateful=True) keeps zeros there too): the
        # state carries over in direct calls, tested in the layers' tests.
        return
    state = to_numpy(layer.states[0])
    assert np.abs(state).max() > 0  # the state moved on from its start
    layer.reset_state()
    assert not np.allclose(to_numpy(layer.states[0]), state)
