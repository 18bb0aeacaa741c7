"""Finite-difference gradient checks of the three fused layers in float64.

Central differences (eps = 1e-6) on tiny problems against the backend's
autodiff through the fused op (custom gradients included): d(loss)/d(inputs)
entry by entry, and for every weight a few entries plus one random direction
over the whole tensor. Every tensorflow implementation of each op is checked.

float64 is honoured only on tensorflow (Keras maps float64 to float32 on
torch, and on jax without `jax_enable_x64`), where the same differences in
float32 would measure rounding noise, not the gradient; so these tests run
on tensorflow only. The other backends' gradients are checked against
tensorflow's float64 in the `test_*_ops.py` files.
"""

import keras
import numpy as np
import pytest

import keras_attnrnn
from helpers import BACKEND
from helpers import FLOAT64_BACKENDS
from helpers import to_numpy

pytestmark = pytest.mark.skipif(
    BACKEND not in FLOAT64_BACKENDS,
    reason=f"float64 is not honoured on the {BACKEND} backend (Keras computes "
    "it as float32 there); finite differences need float64",
)

EPS = 1e-6
TOL = 1e-6  # relative to the largest gradient entry of the tensor checked

MODELS = {
    # (layer factory, input features, time steps)
    "attnrnn": (
        lambda **kw: keras_attnrnn.AttnRNN(4, num_heads=2, **kw), 3, 4
    ),
    "larnn": (
        lambda **kw: keras_attnrnn.LARNN(4, window=2, num_heads=2, **kw), 3, 4
    ),
    "aaren": (lambda **kw: keras_attnrnn.Aaren(6, num_heads=2, **kw), 3, 5),
}
OPS = {"attnrnn": "attnrnn", "larnn": "larnn", "aaren": "aaren_scan"}


def _cases():
    for model, op in OPS.items():
        names = keras_attnrnn.ops.implementations(op, "tensorflow", "cpu")
        for name in ["auto"] + sorted(set(names)):
            yield pytest.param(model, name, id=f"{model}-{name}")


class _Problem:
    """A float64 layer with random weights, its inputs, mask and a random
    cotangent: loss = sum of every output times its cotangent."""

    def __init__(self, model, implementation, masked, rng):
        import tensorflow as tf

        self.tf = tf
        make, features, time = MODELS[model]
        self.layer = make(
            implementation=implementation,
            return_sequences=True,
            return_state=True,
            dtype="float64",
        )
        self.x = rng.normal(size=(2, time, features))
        self.layer.build(self.x.shape)
        for v in self.layer.weights:
            value = rng.normal(size=v.shape) * 0.5
            if v.path.endswith("gamma"):
                value += 1.0
            v.assign(value)
        self.mask = None
        if masked:
            # A hole, and a row whose first step is masked.
            self.mask = np.ones((2, time), bool)
            self.mask[0, 1] = False
            self.mask[1, 0] = False
        self.weights = [to_numpy(v) for v in self.layer.trainable_variables]
        self.names = [v.path.split("/")[-1] for v in self.layer.trainable_variables]
        self.non_trainable = [v.value for v in self.layer.non_trainable_variables]
        shapes = [o.shape for o in self._outputs(self.x, self.weights)]
        self.cotangents = [rng.normal(size=s) for s in shapes]

    def _outputs(self, x, weights):
        outputs, _ = self.layer.stateless_call(
            [self.tf.constant(w, self.tf.float64) for w in weights]
            if not isinstance(weights[0], self.tf.Tensor)
            else weights,
            self.non_trainable,
            x if isinstance(x, self.tf.Tensor) else self.tf.constant(x),
            mask=self.mask,
        )
        return keras.tree.flatten(outputs)

    def loss(self, x, weights):
        outputs = self._outputs(x, weights)
        assert all(o.dtype == self.tf.float64 for o in outputs)
        return sum(
            self.tf.reduce_sum(o * c) for o, c in zip(outputs, self.cotangents)
        )

    def compiled_loss(self, x, weights):
        """`loss` as one traced graph (the differences call it many times)."""
        if not hasattr(self, "_compiled"):
            self._compiled = self.tf.function(self.loss)
        tf = self.tf
        return self._compiled(tf.constant(x), [tf.constant(w) for w in weights])

    def grads(self):
        tf = self.tf
        x = tf.constant(self.x)
        weights = [tf.constant(w) for w in self.weights]
        with tf.GradientTape() as tape:
            tape.watch([x] + weights)
            loss = self.loss(x, weights)
        grads = tape.gradient(loss, [x] + weights)
        return [None if g is None else g.numpy() for g in grads]

    def numeric(self, which, direction):
        """Central difference of the loss along `direction` of argument
        `which` (0: the inputs, i > 0: weight i - 1)."""

        def at(sign):
            x = self.x + sign * EPS * direction if which == 0 else self.x
            weights = list(self.weights)
            if which > 0:
                weights[which - 1] = weights[which - 1] + sign * EPS * direction
            return float(self.compiled_loss(x, weights))

        plus, minus = at(1), at(-1)
        # What rounding alone can make of the difference quotient.
        roundoff = 8 * np.finfo("float64").eps * max(abs(plus), 1.0) / EPS
        return (plus - minus) / (2 * EPS), roundoff


def _check_entries(problem, which, analytic, indices, what):
    scale = max(np.abs(analytic).max(), 1e-3)
    for index in indices:
        direction = np.zeros(analytic.shape)
        direction[index] = 1.0
        numeric, roundoff = problem.numeric(which, direction)
        error = max(abs(numeric - analytic[index]) - roundoff, 0.0) / scale
        assert error <= TOL, (
            f"{what}{list(index)}: autodiff {analytic[index]:.10g}, "
            f"finite differences {numeric:.10g}, relative error {error:.2e}"
        )


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("model, implementation", list(_cases()))
def test_gradients_match_finite_differences(model, implementation, masked, rng):
    problem = _Problem(model, implementation, masked, rng)
    grads = problem.grads()
    ran = keras_attnrnn.ops.selected(OPS[model])
    if implementation != "auto":
        assert ran == implementation, (ran, implementation)

    # The inputs, every entry.
    assert grads[0] is not None and np.abs(grads[0]).max() > 0
    indices = list(np.ndindex(*grads[0].shape))
    _check_entries(problem, 0, grads[0], indices, "d loss / d inputs")

    # Every weight: two random entries and one random direction.
    for i, (name, analytic) in enumerate(zip(problem.names, grads[1:]), 1):
        assert analytic is not None, f"no gradient for {name}"
        flat = rng.choice(analytic.size, size=min(2, analytic.size), replace=False)
        indices = [np.unravel_index(j, analytic.shape) for j in flat]
        _check_entries(problem, i, analytic, indices, f"d loss / d {name}")
        direction = rng.normal(size=analytic.shape)
        numeric, roundoff = problem.numeric(i, direction)
        projected = float(np.sum(analytic * direction))
        # |<g, v>| <= |g| |v|: the error is relative to that bound.
        scale = max(np.linalg.norm(analytic) * np.linalg.norm(direction), 1e-3)
        error = max(abs(numeric - projected) - roundoff, 0.0) / scale
        assert error <= TOL, (
            f"d loss / d {name} along a random direction: autodiff "
            f"{projected:.10g}, finite differences {numeric:.10g}, relative "
            f"error {error:.2e}"
        )
