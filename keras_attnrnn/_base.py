"""What the cells and fused layers of keras_attnrnn share."""

import keras
from keras import ops

from keras_attnrnn.ops.registry import REGISTRY


def serializable(cls):
    """Registers `cls` for `.keras` files under the package name."""
    return keras.saving.register_keras_serializable(package="keras_attnrnn")(
        cls
    )


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"Received an invalid value for argument `{name}`, expected a "
            f"positive integer, got {value!r}."
        )
    return value


def check_heads(units, num_heads):
    check_positive_int("num_heads", num_heads)
    if units % num_heads:
        raise ValueError(
            "Received an invalid value for argument `num_heads`, expected a "
            f"divisor of units={units}, got {num_heads}."
        )
    return num_heads


def check_rate(name, value):
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(
            f"Received an invalid value for argument `{name}`, expected a "
            f"float in [0, 1), got {value!r}."
        )
    return float(value)


def check_step_input(layer, inputs_shape, input_dim=None):
    """Validates the (batch, features) shape a cell receives."""
    if len(inputs_shape) != 2 or inputs_shape[-1] is None:
        raise ValueError(
            f"Received an invalid value for argument `inputs` of {layer.name}: "
            "a cell expects (batch, features) with a known number of "
            f"features (a layer: (batch, timesteps, features)), got shape "
            f"{tuple(inputs_shape)}."
        )
    if input_dim is not None and inputs_shape[-1] != input_dim:
        raise ValueError(
            f"Received an invalid value for argument `inputs` of {layer.name}: "
            f"it was built for {input_dim} features, got shape "
            f"{tuple(inputs_shape)}."
        )


def _shape(value):
    return tuple(getattr(value, "shape", None) or ops.shape(value))


def check_mask(mask, inputs_shape):
    """Validates the (batch, timesteps) boolean or integer mask of a layer."""
    for m in mask if isinstance(mask, (list, tuple)) else [mask]:
        if m is None:
            continue
        dtype = keras.backend.standardize_dtype(m.dtype)
        if dtype != "bool" and not dtype.startswith(("int", "uint")):
            raise ValueError(
                "Received an invalid value for argument `mask`, expected a "
                "boolean (or integer 0/1) tensor of shape (batch, timesteps), "
                f"got dtype {dtype}."
            )
        shape = _shape(m)
        if len(shape) != 2 or any(
            a is not None and b is not None and a != b
            for a, b in zip(shape, inputs_shape[:2])
        ):
            raise ValueError(
                "Received an invalid value for argument `mask`, expected "
                f"shape (batch, timesteps) = {tuple(inputs_shape[:2])}, got "
                f"shape {shape}."
            )


def check_initial_state(cell, initial_state, batch_size):
    """Validates an explicit `initial_state` against `cell.state_size`.

    Returns it as a list.
    """
    sizes = cell.state_size
    sizes = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes]
    states = (
        list(initial_state)
        if isinstance(initial_state, (list, tuple))
        else [initial_state]
    )
    expected = [(batch_size, size) for size in sizes]
    got = [_shape(s) for s in states]
    if len(got) != len(expected) or any(
        len(g) != 2
        or any(a is not None and b is not None and a != b for a, b in zip(g, e))
        for g, e in zip(got, expected)
    ):
        raise ValueError(
            "Received an invalid value for argument `initial_state`, expected "
            f"a list of {len(expected)} tensor(s) of shapes {expected}, got "
            f"shapes {got}."
        )
    return states


def weight_initializer(initializer, draw):
    """`initializer` for one weight: a clone that draws values of its own.

    A Keras random initializer keeps one seed (a default one when none is
    given) and draws the same values at every call, so one instance used for
    two weights of one shape gives them equal initial values (an AttnRNN's
    query and output kernels, a LARNN's or an Aaren's key and value kernels
    were equal before this). As Keras's `MultiHeadAttention` does for its
    sublayers, each weight gets a clone built from the config: an unseeded
    initializer then draws a default seed of its own (from Python's `random`,
    which `keras.utils.set_random_seed` seeds), and an integer seed is offset
    by `draw`, the weight's place in its layer, so that a seeded layer stays
    reproducible and its weights still differ. Initializers without a seed
    (constants) and plain functions are used as they are.
    """
    if not isinstance(initializer, keras.initializers.Initializer):
        return initializer
    config = initializer.get_config()
    seed = config.get("seed")
    if "seed" not in config or not (seed is None or isinstance(seed, int)):
        return initializer  # no draws, or a SeedGenerator, which advances itself
    if seed is not None:
        config["seed"] = seed + draw
    return initializer.__class__.from_config(config)


def pytorch_linear_bias(fan_in, seed=None):
    """PyTorch's `Linear` bias initialization: uniform in ±1/sqrt(fan_in)."""
    limit = 1.0 / fan_in**0.5
    return keras.initializers.RandomUniform(-limit, limit, seed=seed)


def pytorch_linear_kernel(seed=None):
    """PyTorch's `Linear` weight initialization: uniform in ±1/sqrt(fan_in)."""
    return keras.initializers.VarianceScaling(
        1.0 / 3.0, "fan_in", "uniform", seed=seed
    )


def _keras_dropout_rnn_cell():
    """Keras's own dropout-cell mixin, found through the public `GRUCell`.

    `keras.layers.RNN` creates a cell's dropout masks before its time loop,
    where drawing random numbers is safe on every backend (inside a jax scan
    it is not), but only for instances of this class, which is not public.
    We find it by name and use it as a marker only: `DropoutMasks` defines
    every method it has. If a future Keras drops it, our fused layers still
    create their masks before the loop; only the generic `keras.layers.RNN`
    loop on jax would then not support dropout.
    """
    for klass in keras.layers.GRUCell.__mro__:
        if klass.__name__ == "DropoutRNNCell":
            return klass
    return object


class DropoutMasks(_keras_dropout_rnn_cell()):
    """Dropout masks drawn once per sequence and reused at every step.

    A cell using it has `dropout`, `recurrent_dropout` and `seed_generator`.
    """

    def _create_dropout_mask(self, step_input, rate):
        return keras.random.dropout(
            ops.ones_like(step_input), rate=rate, seed=self.seed_generator
        )

    def get_dropout_mask(self, step_input):
        if getattr(self, "_dropout_mask", None) is None and self.dropout > 0:
            self._dropout_mask = self._create_dropout_mask(
                step_input, self.dropout
            )
        return getattr(self, "_dropout_mask", None)

    def get_recurrent_dropout_mask(self, step_input):
        if (
            getattr(self, "_recurrent_dropout_mask", None) is None
            and self.recurrent_dropout > 0
        ):
            self._recurrent_dropout_mask = self._create_dropout_mask(
                step_input, self.recurrent_dropout
            )
        return getattr(self, "_recurrent_dropout_mask", None)

    def reset_dropout_mask(self):
        self._dropout_mask = None

    def reset_recurrent_dropout_mask(self):
        self._recurrent_dropout_mask = None


def cell_property(name):
    """A read-only property of a fused layer that reads its cell's attribute."""
    return property(lambda self: getattr(self.cell, name))


_LAYER_KEYS = ("name", "trainable", "dtype")


class FusedRNN(keras.layers.RNN):
    """A `keras.layers.RNN` whose time loop is one op from the registry.

    Subclasses set `op` (the registry's op name) and implement
    `fused_loop(sequences, initial_state, mask, training)`, which returns
    `(outputs, final_states)` with `outputs` (b, t, units) aligned with the
    inputs (the op processes them backwards itself when `go_backwards`).
    This class turns that into what `keras.layers.RNN` expects (processing
    order, `zero_output_for_mask`) and falls back to the generic loop of
    `keras.layers.RNN` when `unroll=True` or when, in "auto" mode, no
    implementation can serve the call.
    """

    op = None

    def __init__(self, cell, implementation="auto", **kwargs):
        super().__init__(cell, **kwargs)
        self.input_spec = keras.layers.InputSpec(ndim=3)
        self.implementation = REGISTRY.check_mode(self.op, implementation)
        if self.implementation == "fused" and self.unroll:
            raise ValueError(
                "implementation='fused' cannot be combined with unroll=True, "
                "which asks for the generic unrolled loop. Pass "
                "implementation='auto' or unroll=False."
            )

    def fused_loop(self, sequences, initial_state, mask, training):
        raise NotImplementedError

    def input_dropout(self, sequences, training):
        """`sequences` times the cell's input dropout mask (one per call, the
        same for every step, as the cell draws it), when training."""
        if training and self.cell.dropout > 0:
            keep = self.cell.get_dropout_mask(sequences[:, 0, :])
            sequences = sequences * ops.expand_dims(keep, 1)
        return sequences

    def inner_loop(self, sequences, initial_state, mask, training=False):
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        if not self.unroll:
            initial_state = list(initial_state)
            if self.stateful:
                # `RNN.call` assigns the final states into the state
                # variables in place after the loop; on torch an op that
                # saved the variables' tensors for backward would then see
                # them modified (keras-team/keras#23462). Keras copies them
                # first in its own loop; so do we.
                initial_state = [ops.copy(s) for s in initial_state]
            try:
                outputs, states = self.fused_loop(
                    sequences, initial_state, mask, training
                )
            except NotImplementedError:
                pass
            else:
                if self.go_backwards:
                    outputs = ops.flip(outputs, axis=1)
                    if mask is not None:
                        mask = ops.flip(mask, axis=1)
                if mask is not None and self.zero_output_for_mask:
                    keep = ops.expand_dims(ops.cast(mask, "bool"), -1)
                    outputs = ops.where(keep, outputs, ops.zeros_like(outputs))
                return outputs[:, -1], outputs, states
        return super().inner_loop(
            sequences, initial_state, mask=mask, training=training
        )

    def _check_call(self, sequences, initial_state, mask):
        if mask is not None:
            check_mask(mask, sequences.shape)
        if initial_state is not None:
            initial_state = check_initial_state(
                self.cell, initial_state, sequences.shape[0]
            )
        return initial_state

    def compute_output_spec(
        self, sequences, initial_state=None, mask=None, training=False
    ):
        # Symbolic calls (functional models) check what `call` checks.
        self._check_call(sequences, initial_state, mask)
        return super().compute_output_spec(
            sequences, initial_state=initial_state, mask=mask, training=training
        )

    def call(self, sequences, initial_state=None, mask=None, training=False):
        initial_state = self._check_call(sequences, initial_state, mask)
        return super().call(
            sequences, mask=mask, training=training, initial_state=initial_state
        )

    def get_config(self):
        config = super().get_config()
        del config["cell"]
        cell_config = {
            key: value
            for key, value in self.cell.get_config().items()
            if key not in _LAYER_KEYS
        }
        return {**config, **cell_config, "implementation": self.implementation}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
