"""Aaren's prefix scan in portable `keras.ops`: the ground truth of every
implementation.

Shapes: b batch, t time, n heads, k head dim.

Each step is a leaf (m, u, w) = (s_t, 1, v_t) (a masked step: the empty leaf
(-big, 0, 0)); the initial state is one more leaf in front. The inclusive
prefix scan of the leaves under `combine` (SPEC §3.3) gives every prefix's
state; its output is w / u. An empty state's m is replaced by the lowest
float before it enters the scan, so `max` never picks it and every exponent
is <= 0: nothing overflows, and an empty state is the identity of `combine`.

The scan runs on the states packed as one tensor [m, u, w] (b, t, n, k + 2):
a third of the slicing of three separate tensors (jax compiles it twice as
fast), and the form tensorflow's `scan` needs.
"""

import keras
import numpy as np
from keras import ops


def compute_dtype(dtype):
    """Accumulation dtype: float32 for 16-bit inputs."""
    return "float32" if dtype in ("float16", "bfloat16") else dtype


def accumulation(values):
    """`(dtype, compute, cast)`: the dtype of `values`, the dtype to
    accumulate in, and a cast to it that skips tensors of values' dtype when
    that is the compute dtype (each keras op costs microseconds in eager
    torch, and a streaming step is a few dozen)."""
    dtype = keras.backend.standardize_dtype(values.dtype)
    compute = compute_dtype(dtype)
    native = values.dtype if compute == dtype else None

    def cast(x):
        if native is not None and x.dtype == native:
            return x
        return ops.cast(x, compute)

    return dtype, compute, cast


def lowest(dtype):
    """The m of an empty state inside a scan (exp(lowest - m) == 0)."""
    return float(np.finfo(dtype).min)


def combine(a, b, divide=False):
    """(m, u, w) + (m, u, w), broadcasting; w has one more axis (k).

    With `divide`, the third result is the output w / u instead of w (0
    where u == 0): the small factors are divided, so w sees one pass.
    """
    m_a, u_a, w_a = a
    m_b, u_b, w_b = b
    m = ops.maximum(m_a, m_b)
    e_a = ops.exp(m_a - m)
    e_b = ops.exp(m_b - m)
    u = u_a * e_a + u_b * e_b
    if divide:
        inverse = safe_inverse(u)
        e_a, e_b = e_a * inverse, e_b * inverse
    # (Indexing, not expand_dims: inside tensorflow's associative_scan in a
    # graph the ranks are unknown.)
    return m, u, w_a * e_a[..., None] + w_b * e_b[..., None]


def pack(m, u, w):
    """(m, u, w) -> one tensor [m, u, w] on the last axis."""
    return ops.concatenate([m[..., None], u[..., None], w], axis=-1)


def unpack(state):
    return state[..., 0], state[..., 1], state[..., 2:]


def combine_packed(a, b):
    return pack(*combine(unpack(a), unpack(b)))


def enter(state, cast):
    """`(m, u, w)` cast with `cast` (see `accumulation`), an empty head's m
    set to the lowest float (the form a scan takes)."""
    m, u, w = (cast(x) for x in state)
    neg = lowest(keras.backend.standardize_dtype(m.dtype))
    return ops.where(u > 0, m, ops.full_like(m, neg)), u, w


def leave(outputs, state, dtype):
    """The results in `dtype`, an empty head's final m as 0."""
    m, u, w = state
    results = (outputs, ops.where(u > 0, m, 0.0), u, w)
    if keras.backend.standardize_dtype(outputs.dtype) != dtype:
        results = tuple(ops.cast(x, dtype) for x in results)
    return results[0], results[1:]


def safe_inverse(u):
    """1 / u, 0 where u == 0 (an empty state), with finite gradients."""
    nonempty = u > 0
    return ops.where(nonempty, 1.0 / ops.where(nonempty, u, 1.0), 0.0)


def safe_divide(w, u):
    """w / u per head, 0 where u == 0 (an empty state), with finite gradients."""
    return w * safe_inverse(u)[..., None]


def aaren_scan(scores, values, initial_state=None, mask=None, reverse=False):
    """The prefix scan with `keras.ops.associative_scan`.

    Args:
        scores: (b, t, n).
        values: (b, t, n, k).
        initial_state: optional `(m, u, w)`, (b, n), (b, n), (b, n, k).
        mask: optional (b, t) booleans; a masked step is the empty leaf.
        reverse: process t-1 .. 0 (outputs stay aligned with the inputs).

    Returns:
        (outputs (b, t, n, k), (m, u, w) after the last processed step).
    """
    dtype, compute, cast = accumulation(values)
    s, v = cast(scores), cast(values)
    neg = lowest(compute)
    if mask is None:
        leaves = pack(s, ops.ones_like(s), v)
    else:
        valid = ops.cast(mask, "bool")[..., None]
        u = ops.cast(valid, compute) * ops.ones_like(s)
        leaves = pack(ops.where(valid, s, ops.full_like(s, neg)), u, v * u[..., None])
    if reverse:
        leaves = ops.flip(leaves, axis=1)
    if initial_state is None:
        first = ops.zeros_like(leaves[:, 0])
        first = pack(first[..., 0] + neg, first[..., 1], first[..., 2:])
    else:
        first = pack(*enter(initial_state, cast))
    if values.shape[1] is not None:
        leaves = ops.concatenate([first[:, None], leaves], axis=1)
        states = ops.associative_scan(combine_packed, leaves, axis=1)
        # (In a tensorflow graph its output loses its static shape.)
        states = ops.reshape(states, ops.shape(leaves))[:, 1:]
    else:
        # Only a tensorflow graph traced with an unknown number of steps
        # gets here: its `associative_scan` needs a static length. The
        # sequential scan of the same operator gives the same states.
        def step(state, leaf):
            state = combine_packed(state, leaf)
            return state, state

        leaves = ops.moveaxis(leaves, 1, 0)
        _, states = ops.scan(step, first, leaves)
        # (Its output loses its rank when the length is unknown.)
        states = ops.moveaxis(ops.reshape(states, ops.shape(leaves)), 0, 1)
    m, u, w = unpack(states)
    outputs = safe_divide(w, u)
    if reverse:
        outputs = ops.flip(outputs, axis=1)
    return leave(outputs, (m[:, -1], u[:, -1], w[:, -1]), dtype)


def aaren_step(state, scores, values):
    """One step of the recurrence (the streaming form, and `AarenCell`).

    Args:
        state: `(m, u, w)`, (b, n), (b, n), (b, n, k); all zeros is empty.
        scores: (b, n) the step's scores.
        values: (b, n, k) the step's values.

    Returns:
        `(output, new_state)`: output (b, n, k) = w' / u', and (m', u', w').
    """
    dtype, _, cast = accumulation(values)
    m, u, w = combine(enter(state, cast), (cast(scores), 1.0, cast(values)))
    return leave(safe_divide(w, u), (m, u, w), dtype)
