"""Loop drivers: one per backend, shared by every model.

A model's math lives once, in `keras.ops`, in its `steps` module (see
`ops/attnrnn/steps.py`, `ops/larnn/steps.py`); a driver only runs it. The
drivers take the model's steps module and time-major tensors:

    hs, final = driver.run(model, x, state0, w, mask, extras, reverse, config)

* `x`: (t, b, ...) the projected inputs; `state0`: a tuple of (b, ...) state
  tensors; `w`: a dict of the step's (packed) weights; `mask`: (t, b, 1)
  booleans or None; `extras`: a tuple of constants the steps read (dropout
  masks, entries may be None); `reverse`: process t-1 .. 0; `config`: a
  hashable tuple of the model's static settings.
* `hs`: (t, b, ...) the first output of every step; `final`: the last
  carry, a tuple like `state0`.

A steps module provides:

* `forward_step(carry, (x_t, m_t), w, extras, config) -> (carry, ys_t)`;
  `ys_t[0]` is the step's output.
* `residuals(x, state0, ys, final)`: what the backward pass reads.
* `backward_setup(residuals, mask, w, cotangents, config, reverse)
  -> (carry, xs)`,
  where `cotangents` is `(d_hs, d_final)`.
* `backward_step(carry, xs_t, w, extras, config) -> (carry, ys_t)`, run in
  the opposite order of the forward.
* `backward_finish(residuals, mask, w, extras, carry, ys, config, reverse)
  -> (dx, d_state0, d_w)`: the gradients of x, of `state0` (a tuple) and of
  `w` (a dict with w's keys).

`reference` runs `forward_step` under `keras.ops.scan` and lets the backend
differentiate it; `jax` (`lax.scan` with a `jax.custom_vjp`) and
`tensorflow` (XLA-compiled while loops with a `tf.custom_gradient`) run the
hand-written backward. The helpers below are the loops' shared plumbing.
"""

from keras import ops


def previous(values, first, reverse):
    """The value before each step, time-major, from the values after it."""
    first = ops.expand_dims(first, 0)
    if reverse:
        return ops.concatenate([values[1:], first], axis=0)
    return ops.concatenate([first, values[:-1]], axis=0)


def rows(v):
    """(t, b, ...) -> (t * b, ...): every step's rows as one batch."""
    return ops.reshape(v, (-1,) + tuple(v.shape[2:]))


def time_major(v):
    """(b, t, ...) <-> (t, b, ...)."""
    return ops.swapaxes(v, 0, 1)


def drivers(model):
    """`(reference, jax_scan, tensorflow_loop)`: the drivers bound to the
    steps module `model`, each importing its backend on first call."""

    def reference(*args):
        from keras_attnrnn.ops.loops import reference as driver

        return driver.run(model, *args)

    def jax_scan(*args):
        from keras_attnrnn.ops.loops import jax as driver

        return driver.run(model, *args)

    def tensorflow_loop(*args):
        from keras_attnrnn.ops.loops import tensorflow as driver

        return driver.run(model, *args)

    return reference, jax_scan, tensorflow_loop
