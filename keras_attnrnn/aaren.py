"""Aaren: softmax attention of a learned query over every prefix, as an RNN.

Feng et al., "Attention as an RNN" (arXiv 2405.13956, 2024); the math is
SPEC §3.3 and docs/aaren.md. `AarenCell` is the recurrent form (one step, a
state of constant size), `Aaren` the parallel form (a prefix scan over the
whole sequence, `keras_attnrnn.ops.aaren_scan`), and `AarenBlock` the paper's
drop-in for self-attention in a Transformer block.
"""

import math

import keras
from keras import constraints
from keras import initializers
from keras import ops
from keras import regularizers

from keras_attnrnn import _base
from keras_attnrnn.ops import aaren_scan
from keras_attnrnn.ops.aaren_scan.reference import aaren_step

# Weight groups: the Keras argument prefix of each weight.
_GROUPS = {
    "query": "query",
    "key_kernel": "kernel",
    "value_kernel": "kernel",
    "output_kernel": "kernel",
    "key_bias": "bias",
    "value_bias": "bias",
    "output_bias": "bias",
}
_PREFIXES = ("query", "kernel", "bias")


def _serialize(kind, value):
    module = {
        "initializer": initializers,
        "regularizer": regularizers,
        "constraint": constraints,
    }[kind]
    return module.serialize(value)


@_base.serializable
class AarenCell(keras.layers.Layer, _base.DropoutMasks):
    """Cell class for the Aaren layer: attention as an RNN, one step at a time.

    Each head has a learned query vector q (input-independent). At every
    step the input x gives keys k = x W_k + b_k and values v = x W_v + b_v
    (split into `num_heads` heads) and the score s = <q, k> / sqrt(d_h) of
    each head. The output is softmax attention of q over all the steps seen
    so far, o_t = sum_i exp(s_i) v_i / sum_i exp(s_i), heads concatenated,
    then y = o W_o + b_o. The cell computes it in constant memory from the
    state (m, u, w) of each head: the running max m of the scores,
    u = sum exp(s_i - m) and w = sum exp(s_i - m) v_i.

    The state is flattened as `[y, w, m, u]`, shapes `(batch, units)`,
    `(batch, units)`, `(batch, num_heads)`, `(batch, num_heads)`: the last
    output first (Keras's masked loops read `states[0]` as the previous
    output). u == 0 means "no step seen yet", so the all-zeros state (Keras's
    default initial state, and what `reset_state()` assigns) is the empty
    state.

    This cell processes one step; `keras.layers.RNN(AarenCell(...))` runs it
    over a sequence with the generic Keras loop, and `Aaren` computes the
    same outputs for all steps at once with a parallel prefix scan.

    Args:
        units: Positive integer, dimensionality of the output (and of the
            keys and values).
        num_heads: Positive integer dividing `units`, the number of heads.
            Default: 4.
        query_initializer: Initializer for `query`, shape
            `(num_heads, units // num_heads)`. Default: `"random_normal"`
            (stddev 0.05: attention starts close to a running mean).
        kernel_initializer: Initializer for `key_kernel`, `value_kernel` and
            `output_kernel`. Default: `"glorot_uniform"`.
        bias_initializer: Initializer for `key_bias`, `value_bias` and
            `output_bias`. Default: `"zeros"`.
        query_regularizer, kernel_regularizer, bias_regularizer:
            Regularizers of the same weight groups. Default: `None`.
        query_constraint, kernel_constraint, bias_constraint: Constraints of
            the same weight groups. Default: `None`.
        dropout: Float in [0, 1), fraction of the input units to drop (one
            mask for the whole sequence).
        seed: Random seed for dropout.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: A 2D tensor, with shape `(batch, features)`.
        states: The list `[y, w, m, u]` of the previous step.
        training: Python boolean, whether dropout applies.

    Returns:
        `(output, [y, w, m, u])`, output `(batch, units)` (equal to y).

    Example:

    >>> inputs = np.random.random((32, 10, 8)).astype("float32")
    >>> rnn = keras.layers.RNN(keras_attnrnn.AarenCell(16))
    >>> rnn(inputs).shape
    (32, 16)
    >>> rnn = keras.layers.RNN(
    ...     keras_attnrnn.AarenCell(16, num_heads=2),
    ...     return_sequences=True,
    ...     return_state=True)
    >>> whole_sequence_output, y, w, m, u = rnn(inputs)
    >>> whole_sequence_output.shape, w.shape, m.shape
    ((32, 10, 16), (32, 16), (32, 2))
    """

    def __init__(
        self,
        units,
        num_heads=4,
        query_initializer="random_normal",
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        query_regularizer=None,
        kernel_regularizer=None,
        bias_regularizer=None,
        query_constraint=None,
        kernel_constraint=None,
        bias_constraint=None,
        dropout=0.0,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = _base.check_positive_int("units", units)
        self.num_heads = _base.check_heads(units, num_heads)
        self.head_dim = units // num_heads
        for prefix, initializer, regularizer, constraint in (
            ("query", query_initializer, query_regularizer, query_constraint),
            (
                "kernel",
                kernel_initializer,
                kernel_regularizer,
                kernel_constraint,
            ),
            ("bias", bias_initializer, bias_regularizer, bias_constraint),
        ):
            setattr(self, f"{prefix}_initializer", initializers.get(initializer))
            setattr(self, f"{prefix}_regularizer", regularizers.get(regularizer))
            setattr(self, f"{prefix}_constraint", constraints.get(constraint))
        self.dropout = _base.check_rate("dropout", dropout)
        self.recurrent_dropout = 0.0
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed=seed)
        self.state_size = [units, units, num_heads, num_heads]
        self.output_size = units

    def _add(self, name, shape):
        group = _GROUPS[name]
        return self.add_weight(
            name=name,
            shape=shape,
            initializer=_base.weight_initializer(
                getattr(self, f"{group}_initializer"), len(self.weights)
            ),
            regularizer=getattr(self, f"{group}_regularizer"),
            constraint=getattr(self, f"{group}_constraint"),
        )

    def build(self, input_shape):
        _base.check_step_input(self, input_shape)
        self.input_dim = input_dim = input_shape[-1]
        units = self.units
        self.query = self._add("query", (self.num_heads, self.head_dim))
        self.key_kernel = self._add("key_kernel", (input_dim, units))
        self.key_bias = self._add("key_bias", (units,))
        self.value_kernel = self._add("value_kernel", (input_dim, units))
        self.value_bias = self._add("value_bias", (units,))
        self.output_kernel = self._add("output_kernel", (units, units))
        self.output_bias = self._add("output_bias", (units,))

    def score_projection(self):
        """`(kernel (d, n), bias (n,))` with x @ kernel + bias = the scores.

        <q, x W_k + b_k> / sqrt(d_h) per head is linear in x: folding the
        query into the key kernel gives every step's scores without
        computing the keys.
        """
        heads, head_dim = self.num_heads, self.head_dim
        scale = 1.0 / math.sqrt(head_dim)
        query = ops.cast(self.query, self.compute_dtype)
        kernel = ops.reshape(self.key_kernel, (-1, heads, head_dim))
        kernel = ops.sum(kernel * query, axis=-1) * scale
        bias = ops.reshape(self.key_bias, (heads, head_dim))
        bias = ops.sum(bias * query, axis=-1) * scale
        return kernel, bias

    def call(self, inputs, states, training=False):
        _base.check_step_input(self, inputs.shape, self.input_dim)
        y, w, m, u = states
        if training and self.dropout > 0:
            inputs = inputs * self.get_dropout_mask(inputs)
        score_kernel, score_bias = self.score_projection()
        scores = ops.matmul(inputs, score_kernel) + score_bias
        values = ops.matmul(inputs, self.value_kernel) + self.value_bias
        heads = (-1, self.num_heads, self.head_dim)
        o, (m, u, w) = aaren_step(
            (m, u, ops.reshape(w, heads)),
            scores,
            ops.reshape(values, heads),
        )
        o = ops.reshape(o, (-1, self.units))
        y = ops.matmul(o, self.output_kernel) + self.output_bias
        return y, [y, ops.reshape(w, (-1, self.units)), m, u]

    def get_initial_state(self, batch_size=None):
        return [
            ops.zeros((batch_size, size), dtype=self.compute_dtype)
            for size in self.state_size
        ]

    def get_config(self):
        config = {
            "units": self.units,
            "num_heads": self.num_heads,
            "dropout": self.dropout,
            "seed": self.seed,
        }
        for prefix in _PREFIXES:
            for kind in ("initializer", "regularizer", "constraint"):
                config[f"{prefix}_{kind}"] = _serialize(
                    kind, getattr(self, f"{prefix}_{kind}")
                )
        return {**super().get_config(), **config}


def _seen_a_valid_step(mask, reverse):
    """(b, t) booleans: a valid step has been processed at or before t."""
    count = ops.cast(mask, "int32")
    if reverse:
        return ops.flip(ops.cumsum(ops.flip(count, 1), axis=1), 1) > 0
    return ops.cumsum(count, axis=1) > 0


@_base.serializable
class Aaren(_base.FusedRNN):
    """Aaren layer: attention as an RNN, all steps at once by a prefix scan.

    Computes what `keras.layers.RNN(AarenCell(units))` computes: at each step
    t, softmax attention of a learned query (one per head) over the steps
    0..t, then an output projection. The projections of all steps are done at
    once, the attention of every prefix comes from one parallel prefix scan
    (`keras_attnrnn.ops.aaren_scan`, the fastest implementation available for
    the backend and device; a chunked scan: O(t) time and memory, no
    (t, t) matrix), then the output projection. The weights have the cell's
    names and shapes, so they move between `Aaren` and
    `keras.layers.RNN(AarenCell)`.

    Streaming: with `stateful=True`, feeding one step per call runs the
    recurrent form, in constant memory and constant time per step however
    many steps came before; the outputs are those of the whole sequence in
    one call. `reset_state()` starts a new sequence (the all-zeros state is
    the empty state).

    Args:
        units: Positive integer, dimensionality of the output.
        num_heads: Positive integer dividing `units`. Default: 4.
        query_initializer, kernel_initializer, bias_initializer:
            Initializers of the weight groups, as in `AarenCell`.
        query_regularizer, kernel_regularizer, bias_regularizer:
            Regularizers, as in `AarenCell`.
        activity_regularizer: Regularizer of the layer's output.
        query_constraint, kernel_constraint, bias_constraint: Constraints, as
            in `AarenCell`.
        dropout: Float in [0, 1), fraction of the input units to drop.
        seed: Random seed for dropout.
        return_sequences: Boolean, return the whole sequence of outputs
            rather than the last one. Default: `False`.
        return_state: Boolean, also return the final state `[y, w, m, u]`.
            Default: `False`.
        go_backwards: Boolean, process the sequence backwards (each output
            attends to the steps after it) and return the reversed sequence.
            Default: `False`.
        stateful: Boolean, carry the final state of each batch over to the
            next batch (streaming). Default: `False`.
        unroll: Boolean, run the generic unrolled Keras loop instead of the
            scan. Default: `False`.
        implementation: `"auto"` (default: the env variable
            `KERAS_ATTNRNN_IMPLEMENTATION` if set, else the best available
            implementation), `"reference"` (the portable
            `keras.ops.associative_scan`), `"fused"` (a backend-specific
            implementation, or a `ValueError` saying why none can serve the
            call), or the name of a registered implementation
            (`keras_attnrnn.ops.implementations("aaren_scan")`).

    Call arguments:
        inputs: A 3D tensor `(batch, timesteps, features)`.
        mask: Boolean tensor `(batch, timesteps)`; masked steps are left out
            of the attention and repeat the previous output (the initial
            output state, zeros by default, before the first valid step).
        training: Python boolean, whether dropout applies.
        initial_state: List `[y, w, m, u]` of tensors `(batch, units)`,
            `(batch, units)`, `(batch, num_heads)`, `(batch, num_heads)`;
            by default the empty (all-zeros) state.

    Returns:
        `(batch, units)`, or `(batch, timesteps, units)` with
        `return_sequences`; with `return_state`, followed by the four state
        tensors.

    Example:

    >>> inputs = np.random.random((32, 10, 8)).astype("float32")
    >>> layer = keras_attnrnn.Aaren(16)
    >>> layer(inputs).shape
    (32, 16)
    >>> layer = keras_attnrnn.Aaren(16, return_sequences=True)
    >>> whole = layer(inputs)
    >>> whole.shape
    (32, 10, 16)

    Streaming the same sequence one step per call gives the same outputs,
    with a state of constant size:

    >>> stream = keras_attnrnn.Aaren(16, return_sequences=True, stateful=True)
    >>> stream.build(inputs.shape)
    >>> stream.set_weights(layer.get_weights())
    >>> steps = [stream(inputs[:, t : t + 1]) for t in range(10)]
    >>> streamed = keras.ops.concatenate(steps, axis=1)
    >>> bool(keras.ops.all(keras.ops.abs(streamed - whole) < 1e-5))
    True
    >>> [tuple(s.shape) for s in stream.states]
    [(32, 16), (32, 16), (32, 4), (32, 4)]
    >>> stream.reset_state()  # the next call starts a new sequence
    """

    op = "aaren_scan"

    def __init__(
        self,
        units,
        num_heads=4,
        query_initializer="random_normal",
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        query_regularizer=None,
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        query_constraint=None,
        kernel_constraint=None,
        bias_constraint=None,
        dropout=0.0,
        seed=None,
        return_sequences=False,
        return_state=False,
        go_backwards=False,
        stateful=False,
        unroll=False,
        implementation="auto",
        **kwargs,
    ):
        cell = AarenCell(
            units,
            num_heads=num_heads,
            query_initializer=query_initializer,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            query_regularizer=query_regularizer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            query_constraint=query_constraint,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            dropout=dropout,
            seed=seed,
            dtype=kwargs.get("dtype"),
            trainable=kwargs.get("trainable", True),
            name="aaren_cell",
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
        if sequences.shape[-1] != cell.input_dim:
            raise ValueError(
                f"Received an invalid value for argument `inputs` of "
                f"{self.name}: it was built for {cell.input_dim} features, "
                f"got shape {tuple(sequences.shape)}."
            )
        sequences = self.input_dropout(sequences, training)
        y0, w0, m0, u0 = initial_state
        batch, time = ops.shape(sequences)[0], ops.shape(sequences)[1]
        heads, head_dim = cell.num_heads, cell.head_dim
        score_kernel, score_bias = cell.score_projection()
        scores = ops.matmul(sequences, score_kernel) + score_bias
        values = ops.matmul(sequences, cell.value_kernel) + cell.value_bias
        outputs, (m, u, w) = aaren_scan(
            scores,
            ops.reshape(values, (batch, time, heads, head_dim)),
            initial_state=(m0, u0, ops.reshape(w0, (batch, heads, head_dim))),
            mask=mask,
            reverse=self.go_backwards,
            implementation=self.implementation,
        )
        outputs = ops.reshape(outputs, (batch, time, cell.units))
        outputs = ops.matmul(outputs, cell.output_kernel) + cell.output_bias
        if mask is not None:
            # Before this call's first valid step the output repeats the
            # previous one, y0 (as Keras's masked loops do).
            seen = _seen_a_valid_step(mask, self.go_backwards)
            outputs = ops.where(
                ops.expand_dims(seen, -1), outputs, ops.expand_dims(y0, 1)
            )
        last = outputs[:, 0] if self.go_backwards else outputs[:, -1]
        return outputs, [last, ops.reshape(w, (batch, cell.units)), m, u]

    units = _base.cell_property("units")
    num_heads = _base.cell_property("num_heads")
    dropout = _base.cell_property("dropout")
    query_initializer = _base.cell_property("query_initializer")
    kernel_initializer = _base.cell_property("kernel_initializer")
    bias_initializer = _base.cell_property("bias_initializer")
    query_regularizer = _base.cell_property("query_regularizer")
    kernel_regularizer = _base.cell_property("kernel_regularizer")
    bias_regularizer = _base.cell_property("bias_regularizer")
    query_constraint = _base.cell_property("query_constraint")
    kernel_constraint = _base.cell_property("kernel_constraint")
    bias_constraint = _base.cell_property("bias_constraint")


@_base.serializable
class AarenBlock(keras.layers.Layer):
    """A Transformer encoder block with Aaren in place of self-attention.

    The block of the paper's experiments: Aaren (causal attention of learned
    queries over the prefix, as an RNN), a residual connection and a
    LayerNorm, then a position-wise feed-forward network with its own
    residual connection and LayerNorm. Post-norm by default
    (`x = LN(x + Aaren(x))`, `x = LN(x + FF(x))`), pre-norm with
    `normalize_first=True` (`x = x + Aaren(LN(x))`, `x = x + FF(LN(x))`).
    The input width must equal `units`. Blocks stack; masks pass through.
    With `stateful=True` the block streams one step per call, as `Aaren`
    does (everything else in the block is position-wise).

    Args:
        units: Positive integer, the width of the block (input and output).
        num_heads: Positive integer dividing `units`, Aaren's heads.
            Default: 4.
        intermediate_dim: Positive integer, the hidden width of the
            feed-forward network. Default: `4 * units`.
        dropout: Float in [0, 1), dropout rate of the Aaren and feed-forward
            outputs before each residual sum. Default: 0.
        activation: Activation of the feed-forward hidden layer.
            Default: `"relu"`.
        layer_norm_epsilon: Float, the LayerNorms' epsilon. Default: 1e-5.
        normalize_first: Boolean, pre-norm instead of post-norm.
            Default: `False`.
        query_initializer: Initializer of Aaren's queries. Default:
            `"random_normal"`.
        kernel_initializer: Initializer of every kernel. Default:
            `"glorot_uniform"`.
        bias_initializer: Initializer of every bias. Default: `"zeros"`.
        go_backwards: Boolean, Aaren attends to the steps after each step
            instead. Default: `False`.
        stateful: Boolean, stream: carry Aaren's state over to the next
            call. Default: `False`.
        implementation: Aaren's `implementation` (see `Aaren`).
        seed: Random seed for dropout.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: A 3D tensor `(batch, timesteps, units)`.
        mask: Boolean tensor `(batch, timesteps)`, passed to Aaren and on to
            the next layer.
        training: Python boolean, whether dropout applies.

    Returns:
        A tensor `(batch, timesteps, units)`.

    Example:

    >>> inputs = keras.Input((96, 7))
    >>> x = keras.layers.Dense(32)(inputs)
    >>> x = keras_attnrnn.AarenBlock(32, num_heads=4)(x)
    >>> x = keras_attnrnn.AarenBlock(32, num_heads=4)(x)
    >>> outputs = keras.layers.Dense(7)(x[:, -1])
    >>> model = keras.Model(inputs, outputs)
    >>> model(np.zeros((2, 96, 7), "float32")).shape
    (2, 7)
    """

    def __init__(
        self,
        units,
        num_heads=4,
        intermediate_dim=None,
        dropout=0.0,
        activation="relu",
        layer_norm_epsilon=1e-5,
        normalize_first=False,
        query_initializer="random_normal",
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        go_backwards=False,
        stateful=False,
        implementation="auto",
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = _base.check_positive_int("units", units)
        self.num_heads = _base.check_heads(units, num_heads)
        self.intermediate_dim = _base.check_positive_int(
            "intermediate_dim",
            4 * units if intermediate_dim is None else intermediate_dim,
        )
        self.dropout = _base.check_rate("dropout", dropout)
        self.activation = keras.activations.get(activation)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.normalize_first = bool(normalize_first)
        self.query_initializer = initializers.get(query_initializer)
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.go_backwards = bool(go_backwards)
        self.stateful = bool(stateful)
        self.implementation = implementation
        self.seed = seed
        self.supports_masking = True
        policy = self.dtype_policy

        def dense(draw):
            # Each sublayer its own clones of the initializers (see
            # `_base.weight_initializer`): one instance would draw the same
            # values, reshaped, for the two feedforward kernels.
            return dict(
                kernel_initializer=_base.weight_initializer(
                    self.kernel_initializer, draw
                ),
                bias_initializer=_base.weight_initializer(
                    self.bias_initializer, draw
                ),
                dtype=policy,
            )

        self.aaren = Aaren(
            units,
            num_heads=num_heads,
            query_initializer=self.query_initializer,
            return_sequences=True,
            go_backwards=go_backwards,
            stateful=stateful,
            implementation=implementation,
            name="aaren",
            **dense(0),
        )
        self.attention_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=policy, name="attention_norm"
        )
        self.attention_dropout = keras.layers.Dropout(
            self.dropout, seed=seed, dtype=policy, name="attention_dropout"
        )
        self.intermediate_dense = keras.layers.Dense(
            self.intermediate_dim,
            activation=self.activation,
            name="intermediate_dense",
            **dense(100),
        )
        self.output_dense = keras.layers.Dense(
            units, name="output_dense", **dense(200)
        )
        self.feedforward_dropout = keras.layers.Dropout(
            self.dropout, seed=seed, dtype=policy, name="feedforward_dropout"
        )
        self.feedforward_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon,
            dtype=policy,
            name="feedforward_norm",
        )

    def build(self, input_shape):
        if len(input_shape) != 3 or input_shape[-1] != self.units:
            raise ValueError(
                f"Received an invalid value for argument `inputs` of "
                f"{self.name}: expected (batch, timesteps, units={self.units}) "
                f"(the residual sums need the input width to be `units`), "
                f"got shape {tuple(input_shape)}."
            )
        self.aaren.build(input_shape)
        self.attention_norm.build(input_shape)
        self.intermediate_dense.build(input_shape)
        self.output_dense.build(
            tuple(input_shape[:-1]) + (self.intermediate_dim,)
        )
        self.feedforward_norm.build(input_shape)

    def call(self, inputs, mask=None, training=False):
        x = inputs
        h = self.attention_norm(x) if self.normalize_first else x
        h = self.aaren(h, mask=mask, training=training)
        if self.go_backwards:
            # Keras returns a backwards RNN's outputs in its processing order.
            h = ops.flip(h, axis=1)
        x = x + self.attention_dropout(h, training=training)
        if not self.normalize_first:
            x = self.attention_norm(x)
        h = self.feedforward_norm(x) if self.normalize_first else x
        h = self.output_dense(self.intermediate_dense(h))
        x = x + self.feedforward_dropout(h, training=training)
        if not self.normalize_first:
            x = self.feedforward_norm(x)
        return x

    def compute_mask(self, inputs, mask=None):
        return mask

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def reset_state(self):
        """Starts a new sequence when `stateful=True`."""
        self.aaren.reset_state()

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "num_heads": self.num_heads,
            "intermediate_dim": self.intermediate_dim,
            "dropout": self.dropout,
            "activation": keras.activations.serialize(self.activation),
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "normalize_first": self.normalize_first,
            "query_initializer": initializers.serialize(self.query_initializer),
            "kernel_initializer": initializers.serialize(
                self.kernel_initializer
            ),
            "bias_initializer": initializers.serialize(self.bias_initializer),
            "go_backwards": self.go_backwards,
            "stateful": self.stateful,
            "implementation": self.implementation,
            "seed": self.seed,
        }
