"""LARNN: an LSTM-like cell that attends over a window of its recent cell states.

Chevalier, "LARNN: Linear Attention Recurrent Neural Network" (arXiv
1808.05578, 2018). The math is SPEC §3.2: the paper's model, with LayerNorm
for every normalization and one bias per gate block; docs/larnn.md lists how
it differs from the public PyTorch code and why.
"""

import keras
from keras import constraints
from keras import initializers
from keras import ops
from keras import regularizers

from keras_attnrnn import _base
from keras_attnrnn.ops import larnn as larnn_op
from keras_attnrnn.ops import LARNN_WEIGHT_NAMES as WEIGHT_NAMES
from keras_attnrnn.ops import larnn_positional_size as positional_size
from keras_attnrnn.ops import larnn_step

# Weight groups: the Keras argument prefix of each weight.
_GROUPS = {
    "query_kernel": "attention",
    "key_kernel": "attention",
    "value_kernel": "attention",
    "attention_output_kernel": "attention",
    "attention_kernel": "attention",
    "kernel": "kernel",
    "recurrent_kernel": "recurrent",
}
_PREFIXES = ("kernel", "recurrent", "attention", "bias", "gamma", "beta")
_NORMS = ("key_norm", "value_norm", "attention_norm", "cell_norm", "hidden_norm")
# The norms whose outputs enter the gates beside the input start small by
# default (`gamma_initializer=None`); see docs/larnn.md, "Initialization".
SMALL_GAMMA_NORMS = ("attention_norm", "hidden_norm")
SMALL_GAMMA = 0.1


def _group(name):
    if name in _GROUPS:
        return _GROUPS[name]
    if name.endswith("_gamma"):
        return "gamma"
    if name.endswith("_beta"):
        return "beta"
    return "bias"


@_base.serializable
class LARNNCell(keras.layers.Layer, _base.DropoutMasks):
    """Cell class for the LARNN layer.

    An LSTM cell whose gates also see an attention read of its own past: the
    cell keeps a window of its `window` most recent cell states. At each
    step a query computed from the input and the hidden state attends, with
    `num_heads` heads, over keys and values computed from the window's cells
    (each with features of its position in the window concatenated); the
    attention result a enters the LSTM gates beside the input and the hidden
    state:

    ```
    q = elu([x, h] W_q + b_q)
    K, V = LN(elu([cells, positions] W_k + b_k)), LN(elu([...] W_v + b_v))
    a = LN(elu(MultiHeadAttention(q, K, V) W_o + b_o))
    i, f, g, o = split(x W + h U + a W_a + b)
    c' = LN(sigmoid(i) * tanh(g) + sigmoid(f) * c)
    h' = LN(sigmoid(o) * elu(c'))
    ```

    then c' enters the window, which drops its oldest cell. The state is
    `[h, c, window, valid]` with shapes `(batch, units)`, `(batch, units)`,
    `(batch, window * units)` (oldest cell first) and `(batch, window)` (1
    where a slot holds a real past cell). The window starts with one zero
    cell, so the attention always has a slot to read; Keras's all-zeros
    initial state is exactly that state.

    This cell processes one step; `keras.layers.RNN(LARNNCell(...))` runs it
    with the generic Keras loop, and `LARNN` runs the same computation with a
    fused implementation.

    Args:
        units: Positive integer, dimensionality of the output and the cell.
        window: Positive integer, the number of recent cell states attended
            to (k). Default: 16.
        num_heads: Positive integer dividing `units`, the number of attention
            heads. Default: 4.
        use_positional_encoding: Boolean, concatenate to each window cell the
            features `[cos(2 pi p / 2^i)] ++ [sin(2 pi p / 2^(i+1))]` of its
            position p (1 = newest), `2 * ceil(log2(4 * window))` of them.
            Default: `True`.
        activation_on_keys_and_values: Boolean, keys and values are
            `LayerNorm(elu(.))` of their projections; `False`: the plain
            projections (and no key and value norms). Default: `True`.
        attention_dropout: Float in [0, 1), fraction of the attention weights
            to drop (one mask per sequence over slots and heads, as Keras
            draws its recurrent dropout masks). Default: 0.
        unit_forget_bias: Boolean, add 1 to the forget gate's bias at
            initialization, as `keras.layers.LSTMCell`. Default: `True`.
        kernel_initializer: Initializer for `kernel`, the input part of the
            gates. Default: `"glorot_uniform"`.
        recurrent_initializer: Initializer for `recurrent_kernel`, the
            hidden-state part of the gates. Default: `"orthogonal"`.
        attention_initializer: Initializer for `query_kernel`, `key_kernel`,
            `value_kernel`, `attention_output_kernel` and `attention_kernel`
            (the attention part of the gates). Default: `"glorot_uniform"`.
        bias_initializer: Initializer for the biases. Default: `"zeros"`.
        gamma_initializer: Initializer for the LayerNorm scales (all five
            norms). Default (`None`): 0.1 for `hidden_norm` and
            `attention_norm`, whose outputs enter the gates beside the input,
            and ones for the key, value and cell norms. Layer-normed, h and
            the attention read would otherwise start about 30 times larger
            than typical inputs (Keras's `Embedding` gives ±0.05), which then
            barely move the gates; see docs/larnn.md, "Initialization".
            `"ones"` gives the plain LayerNorm initialization everywhere.
        beta_initializer: Initializer for the LayerNorm offsets. Default:
            `"zeros"`.
        kernel_regularizer, recurrent_regularizer, attention_regularizer,
        bias_regularizer, gamma_regularizer, beta_regularizer: Regularizers
            of the same weight groups. Default: `None`.
        kernel_constraint, recurrent_constraint, attention_constraint,
        bias_constraint, gamma_constraint, beta_constraint: Constraints of the
            same weight groups. Default: `None`.
        dropout: Float in [0, 1), fraction of the input units to drop.
        recurrent_dropout: Float in [0, 1), fraction of the hidden-state units
            to drop where h enters the query and the gates.
        seed: Random seed for dropout.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: A 2D tensor, with shape `(batch, features)`.
        states: The list `[h, c, window, valid]` of the previous step.
        training: Python boolean, whether dropout applies.

    Returns:
        `(h, [h, c, window, valid])`, the output and the new state.

    Example:

    >>> inputs = np.random.random((32, 10, 8)).astype("float32")
    >>> rnn = keras.layers.RNN(keras_attnrnn.LARNNCell(16, window=4))
    >>> rnn(inputs).shape
    (32, 16)
    >>> rnn = keras.layers.RNN(
    ...     keras_attnrnn.LARNNCell(16, window=4),
    ...     return_sequences=True,
    ...     return_state=True)
    >>> whole_sequence_output, h, c, window, valid = rnn(inputs)
    >>> whole_sequence_output.shape
    (32, 10, 16)
    >>> window.shape
    (32, 64)
    """

    def __init__(
        self,
        units,
        window=16,
        num_heads=4,
        use_positional_encoding=True,
        activation_on_keys_and_values=True,
        attention_dropout=0.0,
        unit_forget_bias=True,
        kernel_initializer="glorot_uniform",
        recurrent_initializer="orthogonal",
        attention_initializer="glorot_uniform",
        bias_initializer="zeros",
        gamma_initializer=None,
        beta_initializer="zeros",
        kernel_regularizer=None,
        recurrent_regularizer=None,
        attention_regularizer=None,
        bias_regularizer=None,
        gamma_regularizer=None,
        beta_regularizer=None,
        kernel_constraint=None,
        recurrent_constraint=None,
        attention_constraint=None,
        bias_constraint=None,
        gamma_constraint=None,
        beta_constraint=None,
        dropout=0.0,
        recurrent_dropout=0.0,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = _base.check_positive_int("units", units)
        self.window = _base.check_positive_int("window", window)
        self.num_heads = _base.check_heads(units, num_heads)
        self.use_positional_encoding = bool(use_positional_encoding)
        self.activation_on_keys_and_values = bool(
            activation_on_keys_and_values
        )
        self.attention_dropout = _base.check_rate(
            "attention_dropout", attention_dropout
        )
        self.unit_forget_bias = bool(unit_forget_bias)
        groups = {
            "kernel": (kernel_initializer, kernel_regularizer, kernel_constraint),
            "recurrent": (
                recurrent_initializer,
                recurrent_regularizer,
                recurrent_constraint,
            ),
            "attention": (
                attention_initializer,
                attention_regularizer,
                attention_constraint,
            ),
            "bias": (bias_initializer, bias_regularizer, bias_constraint),
            "gamma": (gamma_initializer, gamma_regularizer, gamma_constraint),
            "beta": (beta_initializer, beta_regularizer, beta_constraint),
        }
        for prefix, (initializer, regularizer, constraint) in groups.items():
            setattr(self, f"{prefix}_initializer", initializers.get(initializer))
            setattr(self, f"{prefix}_regularizer", regularizers.get(regularizer))
            setattr(self, f"{prefix}_constraint", constraints.get(constraint))
        self.dropout = _base.check_rate("dropout", dropout)
        self.recurrent_dropout = _base.check_rate(
            "recurrent_dropout", recurrent_dropout
        )
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed=seed)
        self.state_size = [
            self.units,
            self.units,
            self.window * self.units,
            self.window,
        ]
        self.output_size = self.units

    def _add(self, name, shape, initializer=None):
        group = _group(name)
        if group == "gamma" and self.gamma_initializer is None:
            initializer = initializers.Constant(
                SMALL_GAMMA if name[: -len("_gamma")] in SMALL_GAMMA_NORMS else 1.0
            )
        return self.add_weight(
            name=name,
            shape=shape,
            initializer=_base.weight_initializer(
                initializer or getattr(self, f"{group}_initializer"),
                len(self.weights),
            ),
            regularizer=getattr(self, f"{group}_regularizer"),
            constraint=getattr(self, f"{group}_constraint"),
        )

    def _gate_bias_initializer(self, shape, dtype=None):
        # Two clones for the two drawn parts (`_base.weight_initializer`):
        # one instance would draw the same values at the start of both.
        first, rest = (
            _base.weight_initializer(self.bias_initializer, 1000 + i)
            for i in range(2)
        )
        if not self.unit_forget_bias:
            return first(shape, dtype=dtype)
        units = self.units
        return ops.concatenate(
            [
                first((units,), dtype=dtype),
                ops.ones((units,), dtype=dtype),
                rest((2 * units,), dtype=dtype),
            ]
        )

    def build(self, input_shape):
        _base.check_step_input(self, input_shape)
        self.input_dim = input_dim = input_shape[-1]
        units = self.units
        memory = units + (
            positional_size(self.window) if self.use_positional_encoding else 0
        )
        self.query_kernel = self._add("query_kernel", (input_dim + units, units))
        self.query_bias = self._add("query_bias", (units,))
        self.key_kernel = self._add("key_kernel", (memory, units))
        self.key_bias = self._add("key_bias", (units,))
        self.value_kernel = self._add("value_kernel", (memory, units))
        self.value_bias = self._add("value_bias", (units,))
        self.attention_output_kernel = self._add(
            "attention_output_kernel", (units, units)
        )
        self.attention_output_bias = self._add("attention_output_bias", (units,))
        self.kernel = self._add("kernel", (input_dim, 4 * units))
        self.recurrent_kernel = self._add("recurrent_kernel", (units, 4 * units))
        self.attention_kernel = self._add("attention_kernel", (units, 4 * units))
        self.bias = self._add(
            "bias", (4 * units,), initializer=self._gate_bias_initializer
        )
        for norm in _NORMS:
            if norm in ("key_norm", "value_norm") and not (
                self.activation_on_keys_and_values
            ):
                continue
            setattr(self, f"{norm}_gamma", self._add(f"{norm}_gamma", (units,)))
            setattr(self, f"{norm}_beta", self._add(f"{norm}_beta", (units,)))

    def step_weights(self):
        """The weights by their SPEC names, the form `ops.larnn` takes."""
        return {
            name: getattr(self, name)
            for name in WEIGHT_NAMES
            if getattr(self, name, None) is not None
        }

    def get_attention_dropout_mask(self, state):
        """The (batch, window, num_heads) attention dropout mask, drawn once."""
        if (
            getattr(self, "_attention_dropout_mask", None) is None
            and self.attention_dropout > 0
        ):
            ones = ops.expand_dims(ops.ones_like(state[:, :1]), -1) * ops.ones(
                (1, self.window, self.num_heads), dtype=state.dtype
            )
            self._attention_dropout_mask = keras.random.dropout(
                ones, rate=self.attention_dropout, seed=self.seed_generator
            )
        return getattr(self, "_attention_dropout_mask", None)

    def get_recurrent_dropout_mask(self, step_input):
        # keras.layers.RNN draws a cell's masks before its loop by calling
        # this with the first state; the attention mask is drawn with them.
        self.get_attention_dropout_mask(step_input)
        return super().get_recurrent_dropout_mask(step_input)

    def reset_recurrent_dropout_mask(self):
        super().reset_recurrent_dropout_mask()
        self._attention_dropout_mask = None

    def dropout_masks(self, h, training):
        """(recurrent, attention) dropout masks for a call, or Nones."""
        recurrent = attention = None
        if training and self.recurrent_dropout > 0:
            recurrent = self.get_recurrent_dropout_mask(h)
        if training and self.attention_dropout > 0:
            attention = self.get_attention_dropout_mask(h)
        return recurrent, attention

    def call(self, inputs, states, training=False):
        _base.check_step_input(self, inputs.shape, self.input_dim)
        h, c, window, valid = states
        if training and self.dropout > 0:
            inputs = inputs * self.get_dropout_mask(inputs)
        recurrent_mask, attention_mask = self.dropout_masks(h, training)
        x_query = (
            ops.matmul(inputs, self.query_kernel[: self.input_dim])
            + self.query_bias
        )
        x_gates = ops.matmul(inputs, self.kernel) + self.bias
        new_states = larnn_step(
            x_query,
            x_gates,
            h,
            c,
            window,
            valid,
            self.step_weights(),
            self.num_heads,
            recurrent_dropout_mask=recurrent_mask,
            attention_dropout_mask=attention_mask,
        )
        return new_states[0], list(new_states)

    def get_initial_state(self, batch_size=None):
        return [
            ops.zeros((batch_size, size), dtype=self.compute_dtype)
            for size in self.state_size
        ]

    def get_config(self):
        config = {
            "units": self.units,
            "window": self.window,
            "num_heads": self.num_heads,
            "use_positional_encoding": self.use_positional_encoding,
            "activation_on_keys_and_values": (
                self.activation_on_keys_and_values
            ),
            "attention_dropout": self.attention_dropout,
            "unit_forget_bias": self.unit_forget_bias,
            "dropout": self.dropout,
            "recurrent_dropout": self.recurrent_dropout,
            "seed": self.seed,
        }
        for prefix in _PREFIXES:
            config[f"{prefix}_initializer"] = initializers.serialize(
                getattr(self, f"{prefix}_initializer")
            )
            config[f"{prefix}_regularizer"] = regularizers.serialize(
                getattr(self, f"{prefix}_regularizer")
            )
            config[f"{prefix}_constraint"] = constraints.serialize(
                getattr(self, f"{prefix}_constraint")
            )
        return {**super().get_config(), **config}


@_base.serializable
class LARNN(_base.FusedRNN):
    """LARNN layer: the LARNN cell over a sequence, with a fused loop.

    Computes what `keras.layers.RNN(LARNNCell(units, ...))` computes, with
    the input projections done once for all steps, each cell projected for
    the keys and values once when it enters the window, and the time loop run
    by the fastest implementation of `keras_attnrnn.ops.larnn` available for
    the backend and device (a compiled scan on jax and tensorflow, a raw
    torch loop with a hand-written backward on torch), the way
    `keras.layers.LSTM` uses cuDNN. The weights have the cell's names and
    shapes, so they can be moved between `LARNN` and
    `keras.layers.RNN(LARNNCell)`.

    Args:
        units: Positive integer, dimensionality of the output and the cell.
        window: Positive integer, the number of recent cell states attended
            to. Default: 16.
        num_heads: Positive integer dividing `units`. Default: 4.
        use_positional_encoding: Boolean, as in `LARNNCell`. Default: `True`.
        activation_on_keys_and_values: Boolean, as in `LARNNCell`. Default:
            `True`.
        attention_dropout: Float in [0, 1), as in `LARNNCell`. Default: 0.
        unit_forget_bias: Boolean, as in `LARNNCell`. Default: `True`.
        kernel_initializer, recurrent_initializer, attention_initializer,
        bias_initializer, gamma_initializer, beta_initializer: Initializers
            of the weight groups, as in `LARNNCell`.
        kernel_regularizer, recurrent_regularizer, attention_regularizer,
        bias_regularizer, gamma_regularizer, beta_regularizer: Regularizers,
            as in `LARNNCell`.
        activity_regularizer: Regularizer of the layer's output.
        kernel_constraint, recurrent_constraint, attention_constraint,
        bias_constraint, gamma_constraint, beta_constraint: Constraints, as
            in `LARNNCell`.
        dropout: Float in [0, 1), fraction of the input units to drop.
        recurrent_dropout: Float in [0, 1), fraction of the hidden-state units
            to drop where h enters the query and the gates.
        seed: Random seed for dropout.
        return_sequences: Boolean, return the whole sequence of outputs
            rather than the last one. Default: `False`.
        return_state: Boolean, also return the final state
            `[h, c, window, valid]`. Default: `False`.
        go_backwards: Boolean, process the sequence backwards and return the
            reversed sequence. Default: `False`.
        stateful: Boolean, carry the final state of each batch over to the
            next batch; `reset_state()` restores the initial state.
        unroll: Boolean, run the generic unrolled Keras loop instead of the
            fused op. Default: `False`.
        implementation: `"auto"` (default: the env variable
            `KERAS_ATTNRNN_IMPLEMENTATION` if set, else the best available
            implementation), `"reference"` (the portable `keras.ops` scan),
            `"fused"` (a backend-specific implementation, or a `ValueError`
            saying why none can serve the call), or the name of a registered
            implementation (`keras_attnrnn.ops.implementations("larnn")`).

    Call arguments:
        inputs: A 3D tensor `(batch, timesteps, features)`.
        mask: Boolean tensor `(batch, timesteps)`; masked steps keep the state
            and repeat the previous output.
        training: Python boolean, whether dropout applies.
        initial_state: List `[h, c, window, valid]`; by default all zeros
            (one valid zero cell in the window).

    Returns:
        `(batch, units)`, or `(batch, timesteps, units)` with
        `return_sequences`; with `return_state`, followed by the four final
        states.

    Example:

    >>> inputs = np.random.random((32, 10, 8)).astype("float32")
    >>> layer = keras_attnrnn.LARNN(16, window=4)
    >>> layer(inputs).shape
    (32, 16)
    >>> layer = keras_attnrnn.LARNN(16, window=4, return_sequences=True,
    ...                             return_state=True)
    >>> whole_sequence_output, h, c, window, valid = layer(inputs)
    >>> whole_sequence_output.shape
    (32, 10, 16)
    >>> valid.shape
    (32, 4)
    """

    op = "larnn"

    def __init__(
        self,
        units,
        window=16,
        num_heads=4,
        use_positional_encoding=True,
        activation_on_keys_and_values=True,
        attention_dropout=0.0,
        unit_forget_bias=True,
        kernel_initializer="glorot_uniform",
        recurrent_initializer="orthogonal",
        attention_initializer="glorot_uniform",
        bias_initializer="zeros",
        gamma_initializer=None,
        beta_initializer="zeros",
        kernel_regularizer=None,
        recurrent_regularizer=None,
        attention_regularizer=None,
        bias_regularizer=None,
        gamma_regularizer=None,
        beta_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        recurrent_constraint=None,
        attention_constraint=None,
        bias_constraint=None,
        gamma_constraint=None,
        beta_constraint=None,
        dropout=0.0,
        recurrent_dropout=0.0,
        seed=None,
        return_sequences=False,
        return_state=False,
        go_backwards=False,
        stateful=False,
        unroll=False,
        implementation="auto",
        **kwargs,
    ):
        cell = LARNNCell(
            units,
            window=window,
            num_heads=num_heads,
            use_positional_encoding=use_positional_encoding,
            activation_on_keys_and_values=activation_on_keys_and_values,
            attention_dropout=attention_dropout,
            unit_forget_bias=unit_forget_bias,
            kernel_initializer=kernel_initializer,
            recurrent_initializer=recurrent_initializer,
            attention_initializer=attention_initializer,
            bias_initializer=bias_initializer,
            gamma_initializer=gamma_initializer,
            beta_initializer=beta_initializer,
            kernel_regularizer=kernel_regularizer,
            recurrent_regularizer=recurrent_regularizer,
            attention_regularizer=attention_regularizer,
            bias_regularizer=bias_regularizer,
            gamma_regularizer=gamma_regularizer,
            beta_regularizer=beta_regularizer,
            kernel_constraint=kernel_constraint,
            recurrent_constraint=recurrent_constraint,
            attention_constraint=attention_constraint,
            bias_constraint=bias_constraint,
            gamma_constraint=gamma_constraint,
            beta_constraint=beta_constraint,
            dropout=dropout,
            recurrent_dropout=recurrent_dropout,
            seed=seed,
            dtype=kwargs.get("dtype"),
            trainable=kwargs.get("trainable", True),
            name="larnn_cell",
        )
        super().__init__(
            cell,
            implementation=implementation,
            return_sequences=return_sequences,
            return_state=return_state,
            go_backwards=go_backwards,
            stateful=stateful,
            unroll=unroll,
            activity_regularizer=activity_regularizer,
            **kwargs,
        )

    def fused_loop(self, sequences, initial_state, mask, training):
        cell = self.cell
        sequences = self.input_dropout(sequences, training)
        recurrent_mask, attention_mask = cell.dropout_masks(
            initial_state[0], training
        )
        return larnn_op(
            sequences,
            initial_state,
            cell.step_weights(),
            cell.num_heads,
            mask=mask,
            reverse=self.go_backwards,
            recurrent_dropout_mask=recurrent_mask,
            attention_dropout_mask=attention_mask,
            implementation=self.implementation,
        )

    units = _base.cell_property("units")
    window = _base.cell_property("window")
    num_heads = _base.cell_property("num_heads")
    use_positional_encoding = _base.cell_property("use_positional_encoding")
    activation_on_keys_and_values = _base.cell_property(
        "activation_on_keys_and_values"
    )
    attention_dropout = _base.cell_property("attention_dropout")
    unit_forget_bias = _base.cell_property("unit_forget_bias")
    dropout = _base.cell_property("dropout")
    recurrent_dropout = _base.cell_property("recurrent_dropout")
    kernel_initializer = _base.cell_property("kernel_initializer")
    recurrent_initializer = _base.cell_property("recurrent_initializer")
    attention_initializer = _base.cell_property("attention_initializer")
    bias_initializer = _base.cell_property("bias_initializer")
    gamma_initializer = _base.cell_property("gamma_initializer")
    beta_initializer = _base.cell_property("beta_initializer")
    kernel_regularizer = _base.cell_property("kernel_regularizer")
    recurrent_regularizer = _base.cell_property("recurrent_regularizer")
    attention_regularizer = _base.cell_property("attention_regularizer")
    bias_regularizer = _base.cell_property("bias_regularizer")
    gamma_regularizer = _base.cell_property("gamma_regularizer")
    beta_regularizer = _base.cell_property("beta_regularizer")
    kernel_constraint = _base.cell_property("kernel_constraint")
    recurrent_constraint = _base.cell_property("recurrent_constraint")
    attention_constraint = _base.cell_property("attention_constraint")
    bias_constraint = _base.cell_property("bias_constraint")
    gamma_constraint = _base.cell_property("gamma_constraint")
    beta_constraint = _base.cell_property("beta_constraint")
