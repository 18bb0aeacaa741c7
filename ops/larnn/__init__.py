"""The LARNN recurrence as one op, dispatched to the best implementation.

The front door (`larnn`) checks the arguments and does the shared
preparation once: 16-bit inputs cast to float32, the weights packed and the
input projections of all steps hoisted (`steps.prepare`), the window's cells
projected for the keys and values (`steps.initial_carry`), the time-major
layout. An implementation is a loop driver over the model's one math
(`steps.py`), called as `fn(x, state0, w, mask, extras, reverse, config)`
(see `ops/loops/`):

| name | backend | device | what |
|---|---|---|---|
| `reference` | any | any | `keras.ops.scan` over `steps.forward_step`, autodiff |
| `jax_scan` | jax | any | `lax.scan` with the hand-written VJP of `steps.py` |
| `tensorflow_loop` | tensorflow | any | XLA while loops, the same VJP |
| `torch_cpu` | torch | cpu | raw torch loops in a `torch.autograd.Function` (`torch.py`) |

Every implementation projects each cell for the keys and values once, when
it enters the window, and keeps the projections in the loop carry (see
`steps.py` and docs/larnn.md).
"""

from keras import ops

from keras_attnrnn.ops import _dispatch
from keras_attnrnn.ops import loops
from keras_attnrnn.ops.larnn import steps
from keras_attnrnn.ops.larnn.steps import KEY_VALUE_NORMS
from keras_attnrnn.ops.larnn.steps import LAYER_NORM_EPSILON
from keras_attnrnn.ops.larnn.steps import WEIGHT_NAMES
from keras_attnrnn.ops.larnn.steps import positional_size
from keras_attnrnn.ops.registry import REGISTRY
from keras_attnrnn.ops.registry import Implementation
from keras_attnrnn.ops.registry import float_dtype
from keras_attnrnn.ops.registry import importable
from keras_attnrnn.ops.registry import register_drivers
from keras_attnrnn.ops.registry import untraced

OP = "larnn"
_invalid = _dispatch.invalid


def _check(inputs, initial_state, weights, num_heads, mask):
    """Validates shapes; returns (units, window, positional, activation)."""
    if len(inputs.shape) != 3:
        raise _invalid(
            "inputs", "a 3D tensor (batch, timesteps, features)",
            f"shape {tuple(inputs.shape)}",
        )
    if not isinstance(initial_state, (list, tuple)) or len(initial_state) != 4:
        raise _invalid(
            "initial_state", "a list [h, c, window, valid] of 4 tensors",
            repr(initial_state)[:200],
        )
    missing = [
        name
        for name in WEIGHT_NAMES
        if name not in KEY_VALUE_NORMS and weights.get(name) is None
    ]
    if missing:
        raise _invalid("weights", f"tensors for {missing}", sorted(weights))
    h0, c0, window0, valid0 = initial_state
    units = weights["attention_output_kernel"].shape[-1]
    if (
        isinstance(num_heads, bool)
        or not isinstance(num_heads, int)
        or num_heads <= 0
        or units % num_heads
    ):
        raise _invalid(
            "num_heads", f"a positive divisor of units={units}", num_heads
        )
    if len(valid0.shape) != 2 or not valid0.shape[-1]:
        raise _invalid(
            "initial_state", "valid flags of shape (batch, window >= 1)",
            f"shape {tuple(valid0.shape)}",
        )
    slots = valid0.shape[-1]
    for name, value, size in (
        ("h", h0, units),
        ("c", c0, units),
        ("window", window0, slots * units),
    ):
        if len(value.shape) != 2 or value.shape[-1] != size:
            raise _invalid(
                "initial_state", f"{name} of shape (batch, {size})",
                f"shape {tuple(value.shape)}",
            )
    input_dim = weights["kernel"].shape[0]
    if inputs.shape[-1] is not None and inputs.shape[-1] != input_dim:
        raise _invalid(
            "inputs", f"{input_dim} features on the last axis",
            f"shape {tuple(inputs.shape)}",
        )
    if weights["query_kernel"].shape[0] != input_dim + units:
        raise _invalid(
            "weights", f"query_kernel with {input_dim + units} rows",
            f"shape {tuple(weights['query_kernel'].shape)}",
        )
    rows = weights["key_kernel"].shape[0]
    if rows not in (units, units + positional_size(slots)):
        raise _invalid(
            "weights",
            f"key_kernel with {units} rows, or {units + positional_size(slots)}"
            f" with positional encoding for window={slots}",
            f"shape {tuple(weights['key_kernel'].shape)}",
        )
    _dispatch.check_mask(mask, inputs)
    activation = weights.get("key_norm_gamma") is not None
    return units, slots, rows != units, activation


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
    implementation=None,
):
    """Runs LARNN (SPEC §3.2) over a whole sequence.

    Shapes: b batch, t time, d input features, e units, k window slots,
    n heads, P positional features.

    Args:
        inputs: (b, t, d).
        initial_state: `[h, c, window, valid]`: (b, e), (b, e), (b, k * e)
            (the k most recent cells, oldest first) and (b, k) (1 where a
            slot holds a real cell; the newest slot always counts as valid,
            so all zeros is the initial state).
        weights: a mapping from the weight names of `LARNNCell` (SPEC §3.2,
            `keras_attnrnn.ops.larnn.steps.WEIGHT_NAMES`) to tensors. Positional encoding is on
            when `key_kernel` has e + P rows (P = 2 ceil(log2 4k)), off when
            it has e; keys and values are `LN(elu(.))` when the key and value
            norms are given, plain projections when they are absent.
        num_heads: n, dividing e.
        mask: optional (b, t) booleans; masked steps keep the state.
        reverse: process the steps from last to first; the outputs stay
            aligned with the inputs.
        recurrent_dropout_mask: optional (b, e) multiplier of h where h
            enters the query and the gates.
        attention_dropout_mask: optional (b, k, n) multiplier of the
            attention weights (slot, head).
        epsilon: LayerNorm epsilon.
        implementation: `None`/"auto", "reference", "fused" or the name of a
            registered implementation (see `keras_attnrnn.ops.REGISTRY`).

    Returns:
        `(outputs, [h, c, window, valid])`: (b, t, e) and the final state.
    """
    weights = {
        name: value
        for name, value in zip(
            WEIGHT_NAMES,
            _dispatch.as_tensors(*[weights.get(n) for n in WEIGHT_NAMES]),
        )
        if value is not None
    }
    inputs, mask, recurrent_dropout_mask, attention_dropout_mask = (
        _dispatch.as_tensors(
            inputs, mask, recurrent_dropout_mask, attention_dropout_mask
        )
    )
    if isinstance(initial_state, (list, tuple)):
        initial_state = _dispatch.as_tensors(*initial_state)
    units, slots, positional, activation = _check(
        inputs, initial_state, weights, num_heads, mask
    )
    if getattr(getattr(inputs, "device", None), "type", None) == "meta":
        # torch infers a model's output shapes by running it on "meta"
        # tensors, which hold no values: no loop is needed for the shapes.
        outputs = inputs.new_zeros(tuple(inputs.shape[:2]) + (units,))
        return outputs, [s.new_zeros(s.shape) for s in initial_state]
    call = {
        "dtype": _dispatch.dtype_name(inputs),
        "batch": inputs.shape[0],
        "time": inputs.shape[1],
        "input_dim": inputs.shape[2],
        "units": units,
        "num_heads": num_heads,
        "window": slots,
        "positional_encoding": positional,
        "activation_on_keys_and_values": activation,
        "mask": mask is not None,
        "reverse": reverse,
        "recurrent_dropout": recurrent_dropout_mask is not None,
        "attention_dropout": attention_dropout_mask is not None,
    }
    fn = _dispatch.dispatch(OP, implementation, inputs, call)
    dtype, cast = _dispatch.compute_cast(inputs)
    weights = {name: cast(value) for name, value in weights.items()}
    w, input_kernel, input_bias = steps.prepare(
        weights, inputs.shape[-1], slots
    )
    x = ops.matmul(cast(inputs), input_kernel) + input_bias
    hs, final = fn(
        loops.time_major(x),
        steps.initial_carry(*map(cast, initial_state), w),
        w,
        _dispatch.time_major_mask(mask),
        (cast(recurrent_dropout_mask), cast(attention_dropout_mask)),
        bool(reverse),
        (num_heads, float(epsilon), activation),
    )
    final = [ops.cast(v, dtype) for v in steps.final_state(final)]
    return ops.cast(loops.time_major(hs), dtype), final


register_drivers(OP, "keras_attnrnn.ops.larnn.steps")

REGISTRY.register(
    Implementation(
        op=OP,
        name="torch_cpu",
        module="keras_attnrnn.ops.larnn.torch",
        function="larnn",
        backends=("torch",),
        devices=("cpu",),
        priority=10,
        available=importable("torch"),
        supports=untraced(float_dtype),
    )
)
