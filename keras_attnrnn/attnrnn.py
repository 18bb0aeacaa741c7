"""AttnRNN: a single-gate RNN whose update is attention between state and input.

"AttnRNN: An Efficient Recurrent Neural Network Model Based on Attention
Mechanism" (2025); the math follows the public PyTorch code
(liluoyi666/Important_Memories-AttnRNN, models/AttnRNN.py), see SPEC §3.1 and
docs/attnrnn.md.
"""

import keras
from keras import constraints
from keras import initializers
from keras import ops
from keras import regularizers

from keras_attnrnn import _base
from keras_attnrnn.ops import attnrnn as attnrnn_op
from keras_attnrnn.ops import attnrnn_step

# Weight groups: the Keras argument prefix of each weight.
_GROUPS = {
    "input_kernel": "kernel",
    "query_kernel": "recurrent",
    "output_kernel": "recurrent",
    "gate_kernel": "recurrent",
    "input_bias": "bias",
    "query_bias": "bias",
    "output_bias": "bias",
    "gate_bias": "gate_bias",
    "gamma": "gamma",
    "beta": "beta",
}
_PREFIXES = ("kernel", "recurrent", "bias", "gamma", "beta")

# The initializations `initialization=` names. "default" trains in an
# ordinary Keras pipeline; "reference" is the public code's (PyTorch
# `Linear` and `LayerNorm` defaults). They differ in two weights only; see
# docs/attnrnn.md, "Initialization".
INITIALIZATIONS = ("default", "reference")
DEFAULT_GATE_BIAS = -2.0
DEFAULT_GAMMA = 0.1


def _initialization_defaults(initialization, units):
    """(gate_bias_initializer, gamma_initializer) of an initialization."""
    if initialization not in INITIALIZATIONS:
        raise ValueError(
            "Received an invalid value for argument `initialization`, "
            f"expected one of {INITIALIZATIONS}, got {initialization!r}."
        )
    if initialization == "reference":
        return _base.pytorch_linear_bias(2 * units), initializers.Ones()
    return (
        initializers.Constant(DEFAULT_GATE_BIAS),
        initializers.Constant(DEFAULT_GAMMA),
    )


@_base.serializable
class AttnRNNCell(keras.layers.Layer, _base.DropoutMasks):
    """Cell class for the AttnRNN layer.

    At each step the state h and the input x (projected to `units` when the
    input size differs) form four context tokens [h, x, h + x, h * x]. A
    query computed from h attends over them with `num_heads` heads (the
    tokens serve as keys and values as they are); the attention output goes
    through a dense layer and an exact GELU to give a, and a single gate
    z = sigmoid([h, a] W + b) mixes LayerNorm(a + h) into the state:
    h' = z * LayerNorm(a + h) + (1 - z) * h. The output is h'.

    This cell processes one step; `keras.layers.RNN(AttnRNNCell(...))` runs
    it over a sequence with the generic Keras loop, and `AttnRNN` runs the
    same computation with a fused implementation.

    Args:
        units: Positive integer, dimensionality of the state and output.
        num_heads: Positive integer dividing `units`, the number of
            attention heads. Default: 4.
        initial_state_value: Float, the value the initial state is filled
            with when none is given (0.001, as in the reference code).
        kernel_initializer: Initializer for `input_kernel`, the input
            projection (created only when the input size differs from
            `units`). Default: uniform in ±1/sqrt(fan_in), as PyTorch's
            `Linear` (`VarianceScaling(1/3, "fan_in", "uniform")`).
        recurrent_initializer: Initializer for `query_kernel`,
            `output_kernel` and `gate_kernel`. Default: as
            `kernel_initializer`.
        bias_initializer: Initializer for the biases but the gate's.
            Default (`None`): uniform in ±1/sqrt(fan_in) of each bias's
            kernel, as PyTorch.
        gate_bias_initializer: Initializer for `gate_bias`. Default
            (`None`): from `initialization`, the constant -2 (the gate
            starts mostly closed, z ≈ 0.12, so the state keeps most of
            itself from step to step, as LSTM's unit forget bias does).
        gamma_initializer: Initializer for the LayerNorm scale. Default
            (`None`): from `initialization`, the constant 0.1 (the state
            starts on the scale of typical inputs, such as Keras's
            `Embedding`, rather than 30 times larger).
        beta_initializer: Initializer for the LayerNorm offset. Default:
            `"zeros"`.
        initialization: `"default"` or `"reference"`, where
            `gate_bias_initializer` and `gamma_initializer` are not given.
            `"default"` is made to train in an ordinary Keras pipeline;
            `"reference"` is the public code's initialization (PyTorch's:
            the gate bias uniform in ±1/sqrt(2 * units), gamma ones), for
            reproducing the paper. The other weights start the same in
            both. See docs/attnrnn.md, "Initialization".
        kernel_regularizer, recurrent_regularizer, bias_regularizer,
        gamma_regularizer, beta_regularizer: Regularizers of the same weight
            groups. Default: `None`.
        kernel_constraint, recurrent_constraint, bias_constraint,
        gamma_constraint, beta_constraint: Constraints of the same weight
            groups. Default: `None`.
        dropout: Float in [0, 1), fraction of the input units to drop.
        recurrent_dropout: Float in [0, 1), fraction of the state units to
            drop where the state enters the query and the gate.
        seed: Random seed for dropout.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: A 2D tensor, with shape `(batch, features)`.
        states: A list holding one 2D tensor of shape `(batch, units)`, the
            state of the previous step.
        training: Python boolean, whether dropout applies.

    Returns:
        `(output, [new_state])`, both `(batch, units)` and equal.

    Example:

    >>> inputs = np.random.random((32, 10, 8)).astype("float32")
    >>> rnn = keras.layers.RNN(keras_attnrnn.AttnRNNCell(16))
    >>> rnn(inputs).shape
    (32, 16)
    >>> rnn = keras.layers.RNN(
    ...     keras_attnrnn.AttnRNNCell(16),
    ...     return_sequences=True,
    ...     return_state=True)
    >>> whole_sequence_output, final_state = rnn(inputs)
    >>> whole_sequence_output.shape
    (32, 10, 16)
    >>> final_state.shape
    (32, 16)
    """

    def __init__(
        self,
        units,
        num_heads=4,
        initial_state_value=0.001,
        kernel_initializer=None,
        recurrent_initializer=None,
        bias_initializer=None,
        gate_bias_initializer=None,
        gamma_initializer=None,
        beta_initializer="zeros",
        initialization="default",
        kernel_regularizer=None,
        recurrent_regularizer=None,
        bias_regularizer=None,
        gamma_regularizer=None,
        beta_regularizer=None,
        kernel_constraint=None,
        recurrent_constraint=None,
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
        self.num_heads = _base.check_heads(units, num_heads)
        self.initial_state_value = float(initial_state_value)
        self.kernel_initializer = initializers.get(
            kernel_initializer or _base.pytorch_linear_kernel()
        )
        self.recurrent_initializer = initializers.get(
            recurrent_initializer or _base.pytorch_linear_kernel()
        )
        self.bias_initializer = (
            None if bias_initializer is None
            else initializers.get(bias_initializer)
        )
        gate_bias_default, gamma_default = _initialization_defaults(
            initialization, units
        )
        self.initialization = initialization
        self.gate_bias_initializer = initializers.get(
            gate_bias_initializer or gate_bias_default
        )
        self.gamma_initializer = initializers.get(
            gamma_initializer or gamma_default
        )
        self.beta_initializer = initializers.get(beta_initializer)
        for prefix, value in (
            ("kernel", kernel_regularizer),
            ("recurrent", recurrent_regularizer),
            ("bias", bias_regularizer),
            ("gamma", gamma_regularizer),
            ("beta", beta_regularizer),
        ):
            setattr(self, f"{prefix}_regularizer", regularizers.get(value))
        for prefix, value in (
            ("kernel", kernel_constraint),
            ("recurrent", recurrent_constraint),
            ("bias", bias_constraint),
            ("gamma", gamma_constraint),
            ("beta", beta_constraint),
        ):
            setattr(self, f"{prefix}_constraint", constraints.get(value))
        self.dropout = _base.check_rate("dropout", dropout)
        self.recurrent_dropout = _base.check_rate(
            "recurrent_dropout", recurrent_dropout
        )
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed=seed)
        self.state_size = self.units
        self.output_size = self.units
        self.input_kernel = None
        self.input_bias = None

    def _add(self, name, shape, fan_in=None):
        group = _GROUPS[name]
        initializer = getattr(self, f"{group}_initializer")
        if group == "bias" and initializer is None:
            initializer = _base.pytorch_linear_bias(fan_in)
        group = "bias" if group == "gate_bias" else group
        return self.add_weight(
            name=name,
            shape=shape,
            initializer=_base.weight_initializer(initializer, len(self.weights)),
            regularizer=getattr(self, f"{group}_regularizer"),
            constraint=getattr(self, f"{group}_constraint"),
        )

    def build(self, input_shape):
        _base.check_step_input(self, input_shape)
        self.input_dim = input_dim = input_shape[-1]
        units = self.units
        if input_dim != units:
            self.input_kernel = self._add("input_kernel", (input_dim, units))
            self.input_bias = self._add("input_bias", (units,), input_dim)
        self.query_kernel = self._add("query_kernel", (units, units))
        self.query_bias = self._add("query_bias", (units,), units)
        self.output_kernel = self._add("output_kernel", (units, units))
        self.output_bias = self._add("output_bias", (units,), units)
        self.gate_kernel = self._add("gate_kernel", (2 * units, units))
        self.gate_bias = self._add("gate_bias", (units,), 2 * units)
        self.gamma = self._add("gamma", (units,))
        self.beta = self._add("beta", (units,))

    def step_weights(self):
        """The recurrent weights, in the order of `attnrnn_step`."""
        return (
            self.query_kernel,
            self.query_bias,
            self.output_kernel,
            self.output_bias,
            self.gate_kernel,
            self.gate_bias,
            self.gamma,
            self.beta,
        )

    def call(self, inputs, states, training=False):
        _base.check_step_input(self, inputs.shape, self.input_dim)
        h = states[0] if isinstance(states, (list, tuple)) else states
        if training and self.dropout > 0:
            inputs = inputs * self.get_dropout_mask(inputs)
        recurrent_mask = None
        if training and self.recurrent_dropout > 0:
            recurrent_mask = self.get_recurrent_dropout_mask(h)
        x = inputs
        if self.input_kernel is not None:
            x = ops.matmul(x, self.input_kernel) + self.input_bias
        h = attnrnn_step(
            h,
            x,
            *self.step_weights(),
            num_heads=self.num_heads,
            recurrent_dropout_mask=recurrent_mask,
        )
        return h, [h] if isinstance(states, (list, tuple)) else h

    def get_initial_state(self, batch_size=None):
        return [
            ops.full(
                (batch_size, self.units),
                self.initial_state_value,
                dtype=self.compute_dtype,
            )
        ]

    def get_config(self):
        config = {
            "units": self.units,
            "num_heads": self.num_heads,
            "initial_state_value": self.initial_state_value,
            "initialization": self.initialization,
            "gate_bias_initializer": initializers.serialize(
                self.gate_bias_initializer
            ),
            "dropout": self.dropout,
            "recurrent_dropout": self.recurrent_dropout,
            "seed": self.seed,
        }
        for prefix in _PREFIXES:
            config[f"{prefix}_initializer"] = (
                None
                if getattr(self, f"{prefix}_initializer") is None
                else initializers.serialize(
                    getattr(self, f"{prefix}_initializer")
                )
            )
            config[f"{prefix}_regularizer"] = regularizers.serialize(
                getattr(self, f"{prefix}_regularizer")
            )
            config[f"{prefix}_constraint"] = constraints.serialize(
                getattr(self, f"{prefix}_constraint")
            )
        return {**super().get_config(), **config}


@_base.serializable
class AttnRNN(_base.FusedRNN):
    """AttnRNN layer: the AttnRNN cell over a sequence, with a fused loop.

    Computes what `keras.layers.RNN(AttnRNNCell(units))` computes, with the
    input projection done once for all steps and the time loop run by the
    fastest implementation of `keras_attnrnn.ops.attnrnn` available for the
    backend and device (a compiled scan on jax and tensorflow, a fused CPU
    loop on torch; see `docs/registry.md`), the way `keras.layers.GRU` uses
    cuDNN. The weights have the cell's names and shapes, so they can be
    moved between `AttnRNN`, `keras.layers.RNN(AttnRNNCell)` and the public
    reference code.

    Args:
        units: Positive integer, dimensionality of the state and output.
        num_heads: Positive integer dividing `units`. Default: 4.
        initial_state_value: Float the default initial state is filled with.
            Default: 0.001.
        kernel_initializer, recurrent_initializer, bias_initializer,
        gate_bias_initializer, gamma_initializer, beta_initializer:
            Initializers of the weight groups, as in `AttnRNNCell`.
        initialization: `"default"` (made to train in an ordinary Keras
            pipeline) or `"reference"` (the public code's PyTorch
            initialization), as in `AttnRNNCell`.
        kernel_regularizer, recurrent_regularizer, bias_regularizer,
        gamma_regularizer, beta_regularizer: Regularizers, as in
            `AttnRNNCell`.
        activity_regularizer: Regularizer of the layer's output.
        kernel_constraint, recurrent_constraint, bias_constraint,
        gamma_constraint, beta_constraint: Constraints, as in `AttnRNNCell`.
        dropout: Float in [0, 1), fraction of the input units to drop.
        recurrent_dropout: Float in [0, 1), fraction of the state units to
            drop where the state enters the query and the gate.
        seed: Random seed for dropout.
        return_sequences: Boolean, return the whole sequence of outputs
            rather than the last one. Default: `False`.
        return_state: Boolean, also return the final state. Default: `False`.
        go_backwards: Boolean, process the sequence backwards and return the
            reversed sequence. Default: `False`.
        stateful: Boolean, carry the final state of each batch over to the
            next batch. `reset_state()` restores `initial_state_value`.
        unroll: Boolean, run the generic unrolled Keras loop instead of the
            fused op. Default: `False`.
        implementation: `"auto"` (default: the env variable
            `KERAS_ATTNRNN_IMPLEMENTATION` if set, else the best available
            implementation), `"reference"` (the portable `keras.ops` scan),
            `"fused"` (a backend-specific implementation, or a `ValueError`
            saying why none can serve the call), or the name of a registered
            implementation (`keras_attnrnn.ops.implementations("attnrnn")`).

    Call arguments:
        inputs: A 3D tensor `(batch, timesteps, features)`.
        mask: Boolean tensor `(batch, timesteps)`; masked steps keep the state
            and repeat the previous output.
        training: Python boolean, whether dropout applies.
        initial_state: List with one tensor `(batch, units)`; by default a
            tensor filled with `initial_state_value`.

    Returns:
        `(batch, units)`, or `(batch, timesteps, units)` with
        `return_sequences`; with `return_state`, followed by the final state.

    Example:

    >>> inputs = np.random.random((32, 10, 8)).astype("float32")
    >>> layer = keras_attnrnn.AttnRNN(16)
    >>> layer(inputs).shape
    (32, 16)
    >>> layer = keras_attnrnn.AttnRNN(16, return_sequences=True,
    ...                               return_state=True)
    >>> whole_sequence_output, final_state = layer(inputs)
    >>> whole_sequence_output.shape
    (32, 10, 16)
    >>> final_state.shape
    (32, 16)
    """

    op = "attnrnn"

    def __init__(
        self,
        units,
        num_heads=4,
        initial_state_value=0.001,
        kernel_initializer=None,
        recurrent_initializer=None,
        bias_initializer=None,
        gate_bias_initializer=None,
        gamma_initializer=None,
        beta_initializer="zeros",
        initialization="default",
        kernel_regularizer=None,
        recurrent_regularizer=None,
        bias_regularizer=None,
        gamma_regularizer=None,
        beta_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        recurrent_constraint=None,
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
        cell = AttnRNNCell(
            units,
            num_heads=num_heads,
            initial_state_value=initial_state_value,
            kernel_initializer=kernel_initializer,
            recurrent_initializer=recurrent_initializer,
            bias_initializer=bias_initializer,
            gate_bias_initializer=gate_bias_initializer,
            gamma_initializer=gamma_initializer,
            beta_initializer=beta_initializer,
            initialization=initialization,
            kernel_regularizer=kernel_regularizer,
            recurrent_regularizer=recurrent_regularizer,
            bias_regularizer=bias_regularizer,
            gamma_regularizer=gamma_regularizer,
            beta_regularizer=beta_regularizer,
            kernel_constraint=kernel_constraint,
            recurrent_constraint=recurrent_constraint,
            bias_constraint=bias_constraint,
            gamma_constraint=gamma_constraint,
            beta_constraint=beta_constraint,
            dropout=dropout,
            recurrent_dropout=recurrent_dropout,
            seed=seed,
            dtype=kwargs.get("dtype"),
            trainable=kwargs.get("trainable", True),
            name="attn_rnn_cell",
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
        recurrent_mask = None
        if training and cell.recurrent_dropout > 0:
            recurrent_mask = cell.get_recurrent_dropout_mask(initial_state[0])
        outputs, state = attnrnn_op(
            sequences,
            initial_state[0],
            *cell.step_weights(),
            cell.num_heads,
            input_kernel=cell.input_kernel,
            input_bias=cell.input_bias,
            mask=mask,
            reverse=self.go_backwards,
            recurrent_dropout_mask=recurrent_mask,
            implementation=self.implementation,
        )
        return outputs, [state]

    def reset_state(self):
        if self.states is not None:
            for variable in self.states:
                variable.assign(
                    ops.full_like(variable.value, self.initial_state_value)
                )

    units = _base.cell_property("units")
    num_heads = _base.cell_property("num_heads")
    initial_state_value = _base.cell_property("initial_state_value")
    dropout = _base.cell_property("dropout")
    recurrent_dropout = _base.cell_property("recurrent_dropout")
    kernel_initializer = _base.cell_property("kernel_initializer")
    recurrent_initializer = _base.cell_property("recurrent_initializer")
    bias_initializer = _base.cell_property("bias_initializer")
    gate_bias_initializer = _base.cell_property("gate_bias_initializer")
    initialization = _base.cell_property("initialization")
    gamma_initializer = _base.cell_property("gamma_initializer")
    beta_initializer = _base.cell_property("beta_initializer")
    kernel_regularizer = _base.cell_property("kernel_regularizer")
    recurrent_regularizer = _base.cell_property("recurrent_regularizer")
    bias_regularizer = _base.cell_property("bias_regularizer")
    gamma_regularizer = _base.cell_property("gamma_regularizer")
    beta_regularizer = _base.cell_property("beta_regularizer")
    kernel_constraint = _base.cell_property("kernel_constraint")
    recurrent_constraint = _base.cell_property("recurrent_constraint")
    bias_constraint = _base.cell_property("bias_constraint")
    gamma_constraint = _base.cell_property("gamma_constraint")
    beta_constraint = _base.cell_property("beta_constraint")
