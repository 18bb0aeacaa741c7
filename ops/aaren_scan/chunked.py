"""Aaren's prefix scan in blocks, in `keras.ops`: the fused implementation of
every backend.

The steps are cut into blocks of `chunk` steps. Inside a block every prefix
is exact causal softmax of the fixed query: with mloc_t the running max of
the block's scores, step i weighs exp(s_i - mloc_t) in prefix t (<= 1, and 1
for the max, so no 0/0); a (C, C) weight matrix per block and head gives the
block's prefix states (mloc, uloc, weights @ w). The block totals, with the
initial state as an extra leaf in front, go through a doubling scan
(`reference.combine`, one leaf per block). The state before each block is
then combined with the block's prefix states, divided by u: the outputs
(`_outputs`: `combine` elementwise, or folded into the block matmul).

Work and memory O(t * C), no per-step loop, float32 accumulation for 16-bit
inputs. A single step (streaming) skips the blocks. On tensorflow the time
dimension may be unknown when a graph is traced (the padding is computed at
run time, the block scan becomes a `while_loop` of gathers, which XLA
compiles too).

Shapes: b batch, t time, n heads, k head dim, N blocks, C steps per block.
"""

import functools

import keras
import numpy as np
from keras import ops

from keras_attnrnn.ops.aaren_scan.reference import accumulation
from keras_attnrnn.ops.aaren_scan.reference import combine
from keras_attnrnn.ops.aaren_scan.reference import enter
from keras_attnrnn.ops.aaren_scan.reference import leave
from keras_attnrnn.ops.aaren_scan.reference import lowest
from keras_attnrnn.ops.aaren_scan.reference import safe_divide
from keras_attnrnn.ops.aaren_scan.reference import safe_inverse


def _shift(x, shift, fill):
    """x moved `shift` blocks later along axis 2, `fill` in front."""
    if isinstance(shift, int):
        widths = [[0, 0], [0, 0], [shift, 0]] + [[0, 0]] * (len(x.shape) - 3)
        return ops.pad(x[:, :, :-shift], widths, constant_values=fill)
    # (A gather: XLA needs static slice sizes.)
    source = ops.arange(ops.shape(x)[2]) - shift
    before = ops.take(x, ops.maximum(source, 0), axis=2)
    front = ops.reshape(source >= 0, (-1,) + (1,) * (len(x.shape) - 3))
    return ops.where(front, before, fill)


def _scan_blocks(states, neg):
    """Inclusive scan of (m, u, w) along axis 2, by doubling (Hillis-Steele):
    log2(N) combines of whole (short) tensors, fewer ops than an
    associative scan (which matters in eager torch)."""
    fills = (neg, 0.0, 0.0)

    def step(shift, states):
        before = tuple(_shift(x, shift, f) for x, f in zip(states, fills))
        return combine(before, states)

    blocks = states[0].shape[2]
    if blocks is not None:
        shift = 1
        while shift < blocks:
            states = step(shift, states)
            shift *= 2
        return states
    # A tensorflow graph with an unknown number of blocks: a while loop,
    # bounded (N < 2^31) as XLA needs.
    blocks = ops.shape(states[0])[2]
    _, *states = ops.while_loop(
        lambda shift, *_: shift < blocks,
        lambda shift, *states: (shift * 2, *step(shift, states)),
        (ops.ones((), "int32"), *states),
        maximum_iterations=31,
    )
    return tuple(states)


def _running_max(m):
    """cummax over the last (static) axis, by doubling (log2 C maxima)."""
    neg = lowest(keras.backend.standardize_dtype(m.dtype))
    widths = [[0, 0]] * (len(m.shape) - 1)
    shift = 1
    while shift < m.shape[-1]:
        shifted = ops.pad(m[..., :-shift], widths + [[shift, 0]], constant_values=neg)
        m = ops.maximum(m, shifted)
        shift *= 2
    return m


def _block_weights(m, valid, low):
    """The softmax weights inside each block, unnormalized.

    m: (b, n, N, C) scores (lowest where masked); valid: (b, 1, N, C)
    booleans, or None when every step counts. Returns the running max
    mloc (b, n, N, C) and weights (b, n, N, C, C) with
    weights[..., t, i] = exp(s_i - mloc_t) for valid i <= t, else 0.
    """
    chunk = m.shape[-1]
    # The running max only bounds the exponents: a prefix's state has the
    # same value for any bound, so the bound needs no derivative (and the
    # doubling no backward pass; `_totals` gives the final m its own).
    m_run = ops.stop_gradient(_running_max(m))
    keep = ops.convert_to_tensor(np.tril(np.ones((chunk, chunk), bool)))
    if valid is not None:
        keep = ops.logical_and(keep, valid[..., None, :])
    logits = m[..., None, :] - m_run[..., None]
    return m_run, ops.exp(ops.where(keep, logits, low))


def _totals(m, u_loc, weights, w):
    """Each block's total state: its last prefix, whose bound (the running
    max, a constant) is the block's max m; times e^(sg(m) - m), which is 1
    in value and gives m its derivative (sg: stop_gradient)."""
    m_max = ops.max(m, axis=-1)
    rescale = ops.exp(ops.stop_gradient(m_max) - m_max)
    w_last = ops.matmul(weights[..., -1:, :], w)[..., 0, :]
    return m_max, u_loc[..., -1] * rescale, w_last * rescale[..., None]


def _outputs(before, m_loc, u_loc, weights, w, fold):
    """Every prefix's output: the state before its block `before` (M, U, W)
    combined with the block's prefix (mloc, uloc, weights @ w) by
    `combine`, divided by the total u.

    With m = max(M, mloc), a = e^(M - m) / u and b = e^(mloc - m) / u, the
    output is a W + b (weights @ w). With `fold`, that is one matmul of
    [b weights, a] by [w; W] and no (C, k)-sized prefix state is formed
    (faster in eager torch, where each pass over a tensor is a kernel);
    without, the elementwise form, which XLA fuses into one pass.
    """
    m_in, u_in, w_in = before
    if not fold:
        w_loc = ops.matmul(weights, w)
        state = (m_in, u_in, w_in[..., None, :])
        return combine(state, (m_loc, u_loc, w_loc), divide=True)[2]
    m = ops.maximum(m_in, m_loc)
    e_in = ops.exp(m_in - m)
    e_loc = ops.exp(m_loc - m)
    inverse = safe_inverse(u_in * e_in + u_loc * e_loc)
    factors = ops.concatenate(
        [weights * (e_loc * inverse)[..., None], (e_in * inverse)[..., None]],
        axis=-1,
    )
    return ops.matmul(factors, ops.concatenate([w, w_in[..., None, :]], axis=-2))


def _one_step(scores, values, initial_state, mask, compute, cast):
    """A single step (streaming): one `combine`, no blocks."""
    s, v = cast(scores[:, 0]), cast(values[:, 0])
    if initial_state is None:
        initial_state = (ops.zeros_like(s), ops.zeros_like(s), ops.zeros_like(v))
    state = enter(initial_state, cast)
    if mask is None:
        # After a valid step u >= min(1, u0) > 0: a plain division (each
        # keras op costs microseconds in eager torch).
        m, u, w = combine(state, (s, 1.0, v))
        return (w / u[..., None])[:, None], (m, u, w)
    valid = ops.cast(mask[:, :1], compute)
    masked = ops.where(valid > 0, s, ops.full_like(s, lowest(compute)))
    m, u, w = combine(state, (masked, valid, v * valid[..., None]))
    return safe_divide(w, u)[:, None], (m, u, w)


def aaren_scan(
    scores, values, initial_state=None, mask=None, reverse=False, chunk=16,
    fold=False,
):
    """Same contract as `reference.aaren_scan`; `chunk`: steps per block;
    `fold`: the last merge as one matmul (see `_outputs`)."""
    dtype, compute, cast = accumulation(values)
    time = values.shape[1]
    if time == 1:
        outputs, final = _one_step(
            scores, values, initial_state, mask, compute, cast
        )
        return leave(outputs, final, dtype)
    neg = lowest(compute)
    # (A tensor: a Python float would be float32 on torch.)
    low = ops.convert_to_tensor(neg, compute)
    # Head-major: (b, n, t) and (b, n, t, k).
    m = ops.swapaxes(cast(scores), 1, 2)
    w = ops.transpose(cast(values), (0, 2, 1, 3))
    valid = None
    if mask is not None:
        valid = ops.cast(mask, "bool")[:, None, :]
        m = ops.where(valid, m, low)
    if reverse:
        m, w = ops.flip(m, 2), ops.flip(w, 2)
        valid = None if valid is None else ops.flip(valid, 2)
    if initial_state is None:
        u0 = ops.zeros_like(m[:, :, 0])
        initial_state = (u0, u0, ops.zeros_like(w[:, :, 0]))
    m0, u0, w0 = enter(initial_state, cast)
    batch, heads, steps, head_dim = ops.shape(w)
    chunk = chunk if time is None else min(chunk, time)
    # (Non-negative operands: tf2onnx turns an integer floor division into
    # ONNX's truncating Div, which differs for negative ones.)
    pad = (steps + chunk - 1) // chunk * chunk - steps
    if time is None or pad:
        if valid is None:
            valid = ops.ones_like(m[:, :1], dtype="bool")
        m = ops.pad(m, [[0, 0], [0, 0], [0, pad]], constant_values=neg)
        valid = ops.pad(valid, [[0, 0], [0, 0], [0, pad]], constant_values=False)
        w = ops.pad(w, [[0, 0], [0, 0], [0, pad], [0, 0]])
    # (Through a flat view: torch then lays the scores out head-major,
    # and the block weights come out as the matmul wants them.)
    m = ops.reshape(ops.reshape(m, (-1,)), (batch, heads, -1, chunk))
    w = ops.reshape(w, (batch, heads, -1, chunk, head_dim))
    if valid is not None:
        valid = ops.reshape(valid, (batch, 1, -1, chunk))
    m_loc, weights = _block_weights(m, valid, low)
    u_loc = ops.sum(weights, -1)
    totals = tuple(
        ops.concatenate([x0[:, :, None], x], axis=2)
        for x0, x in zip((m0, u0, w0), _totals(m, u_loc, weights, w))
    )
    m_c, u_c, w_c = _scan_blocks(totals, neg)
    before = (m_c[:, :, :-1, None], u_c[:, :, :-1, None], w_c[:, :, :-1])
    outputs = _outputs(before, m_loc, u_loc, weights, w, fold)
    outputs = ops.reshape(outputs, (batch, heads, -1, head_dim))[:, :, :steps]
    final = (m_c[:, :, -1], u_c[:, :, -1], w_c[:, :, -1])
    if reverse:
        outputs = ops.flip(outputs, 2)
    return leave(ops.transpose(outputs, (0, 2, 1, 3)), final, dtype)


# The registered implementations: the block size per backend (see the
# table in __init__.py).
jax_chunked = functools.partial(aaren_scan, chunk=16)
tensorflow_chunked = functools.partial(aaren_scan, chunk=32)
torch_chunked = functools.partial(aaren_scan, chunk=16, fold=True)
