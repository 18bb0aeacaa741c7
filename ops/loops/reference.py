"""The portable driver: `keras.ops.scan` over a model's `forward_step`.

The backend differentiates the steps (no hand-written backward): this is the
ground truth the fused drivers are tested against, and the implementation
any backend and device can run.
"""

import keras
from keras import ops


def run(model, x, state0, w, mask, extras, reverse, config):
    """Same contract as the other drivers (see `ops/loops/__init__.py`)."""
    # keras.ops.scan on tensorflow stacks only outputs shaped like the carry.
    whole_carry = keras.config.backend() == "tensorflow"

    def step(carry, xs_t):
        x_t, m_t = (xs_t, None) if mask is None else xs_t
        carry, ys = model.forward_step(tuple(carry), (x_t, m_t), w, extras, config)
        return carry, carry if whole_carry else ys[0]

    xs = x if mask is None else (x, mask)
    final, outputs = ops.scan(step, tuple(state0), xs, reverse=reverse)
    if whole_carry:
        outputs = outputs[0]
    return outputs, tuple(final)
