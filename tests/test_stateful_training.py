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


@pytest.mark.parametrize("mode", ["auto", "reference"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_stateful_gradients_equal_initial_state_gradients(name, mode):
    """One training step of a stateful layer moves its weights exactly as the
    same step of the same layer given that state as `initial_state`."""
    rng = np.random.default_rng(1)
    keras.utils.set_random_seed(1)
    stateful = keras.Sequential([keras.Input((3, 8), batch_size=2), LAYERS[name](mode),
                                 keras.layers.Dense(1)])
    layer = stateful.layers[0]
    layer(rng.normal(size=(2, 5, 8)).astype("float32"))  # a state to carry in
    state = [to_numpy(s) for s in layer.states]
    assert any(np.abs(s).max() > 0 for s in state)

    config = layer.get_config() | {"stateful": False, "name": None}
    twin = type(layer).from_config(config)
    x_in = keras.Input((3, 8), batch_size=2)
    s_in = [keras.Input(batch_shape=s.shape) for s in state]
    given = keras.Model([x_in, *s_in], keras.layers.Dense(1)(twin(x_in, initial_state=s_in)))
    for a, b in zip(stateful.weights, given.weights):
        b.assign(to_numpy(a))  # a copy: jax donates the buffers of a step

    x = rng.normal(size=(2, 3, 8)).astype("float32")
    y = rng.normal(size=(2, 1)).astype("float32")
    before = [to_numpy(w) for w in stateful.trainable_weights]
    for model in (stateful, given):
        model.compile(keras.optimizers.SGD(1.0), "mse")
    stateful.train_on_batch(x, y)
    given.train_on_batch([x, *state], y)
    for w0, a, b in zip(before, stateful.trainable_weights, given.trainable_weights):
        step, expected = w0 - to_numpy(a), w0 - to_numpy(b)
        if np.abs(expected).max() > 0:
            assert np.abs(step - expected).max() <= 1e-5 * np.abs(expected).max(), a.path
        else:
            np.testing.assert_array_equal(step, expected, err_msg=a.path)
    assert np.abs(before[0] - to_numpy(stateful.trainable_weights[0])).max() > 0
