"""LARNN in portable `keras.ops`: the ground truth of every implementation.

Shapes: b batch, t time, d input features, e units (H), n heads, e = n * h,
k window slots, P positional features (0 without positional encoding).

The state is `[h (b, e), c (b, e), window (b, k * e), valid (b, k)]`; the
window holds the k most recent cell states, oldest first, and `valid` flags
the slots that hold a real past cell. The newest slot always counts as valid,
so the all-zeros state is the initial state: one valid zero cell.

One step (SPEC §3.2), from (h, c, window, valid) and the input x (b, d):

    M = [window cells, PE(p)]                        (b, k, e + P), p = k .. 1
    q = elu([x, h] @ query_kernel + query_bias)
    K = LN_k(elu(M @ key_kernel + key_bias))         (b, k, e)
    V = LN_v(elu(M @ value_kernel + value_bias))     (b, k, e)
    per head: softmax over the valid slots of <q, K> / sqrt(h), times V
    a = LN_a(elu(heads @ attention_output_kernel + attention_output_bias))
    z = x @ kernel + h @ recurrent_kernel + a @ attention_kernel + bias
    c' = LN_c(sigmoid(z_i) * tanh(z_g) + sigmoid(z_f) * c)
    h' = LN_h(sigmoid(z_o) * elu(c'))
    window' = window without its oldest cell, then c'; the output is h'.

The step is written once (`larnn_step`) and shared by `LARNNCell` and the
scan below, which computes the input projections of all steps before the
loop (`project_inputs`).
"""

import keras
import numpy as np
from keras import ops

LAYER_NORM_EPSILON = 1e-5
# A score no valid slot reaches: masked slots get a softmax weight of 0.
_MASKED_SCORE = -1e9

WEIGHT_NAMES = (
    "query_kernel",
    "query_bias",
    "key_kernel",
    "key_bias",
    "value_kernel",
    "value_bias",
    "attention_output_kernel",
    "attention_output_bias",
    "kernel",
    "recurrent_kernel",
    "attention_kernel",
    "bias",
    "key_norm_gamma",
    "key_norm_beta",
    "value_norm_gamma",
    "value_norm_beta",
    "attention_norm_gamma",
    "attention_norm_beta",
    "cell_norm_gamma",
    "cell_norm_beta",
    "hidden_norm_gamma",
    "hidden_norm_beta",
)
"""The weights of a LARNN cell, by their SPEC names.

The key and value norms exist only with `activation_on_keys_and_values=True`.
"""

KEY_VALUE_NORMS = (
    "key_norm_gamma",
    "key_norm_beta",
    "value_norm_gamma",
    "value_norm_beta",
)


def positional_size(window):
    """P = 2 * ceil(log2(4 * window)), the number of positional features."""
    return 2 * (4 * window - 1).bit_length()


def positional_features(window):
    """(k, P) NumPy float64: PE(p) of each slot, oldest (p = k) first.

    PE(p) = [cos(2 pi p / 2^i), i = 1..b] ++ [sin(2 pi p / 2^i), i = 2..b+1],
    b = ceil(log2(4k)); the newest slot has p = 1.
    """
    bits = positional_size(window) // 2
    p = np.arange(window, 0, -1, dtype="float64")[:, None]
    cos = np.cos(2 * np.pi * p / 2.0 ** np.arange(1, bits + 1))
    sin = np.sin(2 * np.pi * p / 2.0 ** np.arange(2, bits + 2))
    return np.concatenate([cos, sin], axis=1)


def effective_valid(valid):
    """(b, k) booleans: the flags, with the newest slot always valid."""
    flags = ops.greater(valid[:, :-1], 0.5)
    newest = ops.ones_like(valid[:, -1:], dtype="bool")
    return ops.concatenate([flags, newest], axis=-1)


def layer_norm(v, gamma, beta, epsilon=LAYER_NORM_EPSILON):
    return ops.layer_normalization(v, gamma, beta, epsilon=epsilon)


def larnn_step(
    x_query,
    x_gates,
    h,
    c,
    window,
    valid,
    weights,
    num_heads,
    positions=None,
    activation_on_keys_and_values=True,
    recurrent_dropout_mask=None,
    attention_dropout_mask=None,
    epsilon=LAYER_NORM_EPSILON,
):
    """One LARNN step (SPEC §3.2).

    Args:
        x_query: (b, e), x @ query_kernel[:d] + query_bias.
        x_gates: (b, 4e), x @ kernel + bias.
        h, c: (b, e); window: (b, k * e), oldest first; valid: (b, k).
        weights: a mapping from the names of `WEIGHT_NAMES` to tensors.
        num_heads: n, dividing e.
        positions: (k, P) positional features (`positional_features`), or
            None without positional encoding.
        recurrent_dropout_mask: optional (b, e) multiplier of h where h
            enters a linear map (the query and the gates).
        attention_dropout_mask: optional (b, k, n) multiplier of the
            attention weights.

    Returns:
        The new state `(h, c, window, valid)`; h is the step's output.
    """
    units = h.shape[-1]
    slots = valid.shape[-1]
    head_size = units // num_heads
    hd = h if recurrent_dropout_mask is None else h * recurrent_dropout_mask
    query_kernel = weights["query_kernel"]
    q = ops.elu(x_query + ops.matmul(hd, query_kernel[-units:]))

    cells = ops.reshape(window, (-1, slots, units))
    memory = cells
    if positions is not None:
        pe = ops.broadcast_to(
            ops.cast(positions, cells.dtype)[None],
            (ops.shape(cells)[0],) + tuple(positions.shape),
        )
        memory = ops.concatenate([cells, pe], axis=-1)
    keys = ops.matmul(memory, weights["key_kernel"]) + weights["key_bias"]
    values = ops.matmul(memory, weights["value_kernel"]) + weights["value_bias"]
    if activation_on_keys_and_values:
        keys = layer_norm(
            ops.elu(keys),
            weights["key_norm_gamma"],
            weights["key_norm_beta"],
            epsilon,
        )
        values = layer_norm(
            ops.elu(values),
            weights["value_norm_gamma"],
            weights["value_norm_beta"],
            epsilon,
        )
    keys = ops.reshape(keys, (-1, slots, num_heads, head_size))
    values = ops.reshape(values, (-1, slots, num_heads, head_size))
    queries = ops.reshape(q, (-1, 1, num_heads, head_size))
    scores = ops.sum(queries * keys, axis=-1) / float(head_size) ** 0.5
    live = ops.expand_dims(effective_valid(valid), -1)  # (b, k, 1)
    scores = ops.where(live, scores, _MASKED_SCORE)
    if slots == 1:  # one slot, always valid: its weight is 1
        weights_ = ops.ones_like(scores)
    else:
        weights_ = ops.softmax(scores, axis=1)  # (b, k, n), over the slots
    if attention_dropout_mask is not None:
        weights_ = weights_ * attention_dropout_mask
    heads = ops.sum(ops.expand_dims(weights_, -1) * values, axis=1)
    heads = ops.reshape(heads, (-1, units))
    a = layer_norm(
        ops.elu(
            ops.matmul(heads, weights["attention_output_kernel"])
            + weights["attention_output_bias"]
        ),
        weights["attention_norm_gamma"],
        weights["attention_norm_beta"],
        epsilon,
    )

    z = (
        x_gates
        + ops.matmul(hd, weights["recurrent_kernel"])
        + ops.matmul(a, weights["attention_kernel"])
    )
    z_i, z_f, z_g, z_o = ops.split(z, 4, axis=-1)
    c_new = layer_norm(
        ops.sigmoid(z_i) * ops.tanh(z_g) + ops.sigmoid(z_f) * c,
        weights["cell_norm_gamma"],
        weights["cell_norm_beta"],
        epsilon,
    )
    h_new = layer_norm(
        ops.sigmoid(z_o) * ops.elu(c_new),
        weights["hidden_norm_gamma"],
        weights["hidden_norm_beta"],
        epsilon,
    )
    window_new = ops.concatenate([window[:, units:], c_new], axis=-1)
    flags = ops.cast(effective_valid(valid)[:, 1:], valid.dtype)
    valid_new = ops.concatenate([flags, ops.ones_like(valid[:, :1])], axis=-1)
    return h_new, c_new, window_new, valid_new


def project_inputs(inputs, weights):
    """(b, t, d) -> the query part (b, t, e) and the gates part (b, t, 4e)."""
    input_dim = inputs.shape[-1]
    x_query = (
        ops.matmul(inputs, weights["query_kernel"][:input_dim])
        + weights["query_bias"]
    )
    x_gates = ops.matmul(inputs, weights["kernel"]) + weights["bias"]
    return x_query, x_gates


def larnn(
    inputs,
    initial_state,
    weights,
    num_heads,
    mask=None,
    reverse=False,
    recurrent_dropout_mask=None,
    attention_dropout_mask=None,
    epsilon=LAYER_NORM_EPSILON,
):
    """The whole LARNN recurrence with `keras.ops.scan`.

    Args:
        inputs: (b, t, d).
        initial_state: `[h, c, window, valid]`, (b, e), (b, e), (b, k * e),
            (b, k).
        weights: a mapping from the names of `WEIGHT_NAMES` to tensors;
            positional encoding is on when `key_kernel` has e + P rows,
            `activation_on_keys_and_values` when the key norm is present.
        num_heads: n.
        mask: optional (b, t) booleans; a masked step keeps the state.
        reverse: process t-1 .. 0 (outputs stay aligned with the inputs).

    Returns:
        `(outputs (b, t, e), [h, c, window, valid])`; outputs[:, i] is h
        after step i.
    """
    h0, c0, window0, valid0 = initial_state
    slots = valid0.shape[-1]
    units = h0.shape[-1]
    positions = None
    if weights["key_kernel"].shape[0] != units:
        positions = positional_features(slots)
    activation = weights.get("key_norm_gamma") is not None
    x_query, x_gates = project_inputs(inputs, weights)
    xs = (
        ops.transpose(x_query, (1, 0, 2)),
        ops.transpose(x_gates, (1, 0, 2)),
    )
    if mask is not None:
        xs = xs + (ops.expand_dims(ops.transpose(ops.cast(mask, "bool")), -1),)

    def step(state, xs_t):
        new = larnn_step(
            xs_t[0],
            xs_t[1],
            *state,
            weights,
            num_heads,
            positions,
            activation,
            recurrent_dropout_mask,
            attention_dropout_mask,
            epsilon,
        )
        if mask is not None:
            new = tuple(ops.where(xs_t[2], n, s) for n, s in zip(new, state))
        return new, new if whole_state else new[0]

    # keras.ops.scan on tensorflow stacks outputs shaped like the carry only.
    whole_state = keras.config.backend() == "tensorflow"
    state = (h0, c0, window0, valid0)
    final, outputs = ops.scan(step, state, xs, reverse=reverse)
    if whole_state:
        outputs = outputs[0]
    return ops.transpose(outputs, (1, 0, 2)), list(final)
