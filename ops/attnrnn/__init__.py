"""The AttnRNN recurrence as one op, dispatched to the best implementation.

Implementations (all with the signature of `reference.attnrnn`):

| name | backend | device | what |
|---|---|---|---|
| `reference` | any | any | `keras.ops.scan` over `attnrnn_step` |
| `jax_scan` | jax | any | `lax.scan` with a hand-written VJP (`jax.py`) |
| `tensorflow_loop` | tensorflow | any | XLA while loops, custom gradient (`tensorflow.py`) |
| `torch_cpp` | torch | cpu | C++ step loops built on first use (`torch_cpp.py`) |
| `torch_cpu` | torch | cpu | the same in Python, when C++ cannot be built (`torch.py`) |
"""

import importlib.util

from keras_attnrnn.ops import _dispatch
from keras_attnrnn.ops.registry import REGISTRY
from keras_attnrnn.ops.registry import Implementation
from keras_attnrnn.ops.registry import float_dtype
from keras_attnrnn.ops.registry import importable

OP = "attnrnn"

REGISTRY.register(
    Implementation(
        op=OP,
        name="reference",
        module="keras_attnrnn.ops.attnrnn.reference",
        function="attnrnn",
        fused=False,
        priority=0,
    )
)


def _check_shapes(inputs, initial_state, num_heads, units, mask, input_kernel):
    if len(inputs.shape) != 3:
        raise ValueError(
            "Received an invalid value for argument `inputs`, expected a 3D "
            "tensor (batch, timesteps, features), got shape "
            f"{tuple(inputs.shape)}."
        )
    if not isinstance(num_heads, int) or num_heads <= 0 or units % num_heads:
        raise ValueError(
            "Received an invalid value for argument `num_heads`, expected a "
            f"positive divisor of units={units}, got {num_heads}."
        )
    features = inputs.shape[-1]
    expected = units if input_kernel is None else input_kernel.shape[0]
    if features is not None and features != expected:
        raise ValueError(
            "Received an invalid value for argument `inputs`, expected "
            f"{expected} features on the last axis, got shape "
            f"{tuple(inputs.shape)}."
        )
    if len(initial_state.shape) != 2 or initial_state.shape[-1] != units:
        raise ValueError(
            "Received an invalid value for argument `initial_state`, expected "
            f"shape (batch, {units}), got {tuple(initial_state.shape)}."
        )
    if mask is not None and (
        len(mask.shape) != 2
        or any(
            m is not None and i is not None and m != i
            for m, i in zip(mask.shape, inputs.shape[:2])
        )
    ):
        raise ValueError(
            "Received an invalid value for argument `mask`, expected shape "
            f"(batch, timesteps) = {tuple(inputs.shape[:2])}, got "
            f"{tuple(mask.shape)}."
        )


def attnrnn(
    inputs,
    initial_state,
    query_kernel,
    query_bias,
    output_kernel,
    output_bias,
    gate_kernel,
    gate_bias,
    gamma,
    beta,
    num_heads,
    input_kernel=None,
    input_bias=None,
    mask=None,
    reverse=False,
    recurrent_dropout_mask=None,
    epsilon=1e-5,
    implementation=None,
):
    """Runs AttnRNN (SPEC §3.1) over a whole sequence.

    Shapes: b batch, t time, d input features, e units.

    Args:
        inputs: (b, t, d) inputs; projected by `input_kernel` (d, e) and
            `input_bias` (e,) when given, used as they are when d == e.
        initial_state: (b, e).
        query_kernel, output_kernel: (e, e); gate_kernel: (2e, e);
        query_bias, output_bias, gate_bias, gamma, beta: (e,).
        num_heads: heads of the attention over the 4 context tokens.
        mask: optional (b, t) booleans; masked steps keep the state.
        reverse: process the steps from last to first; the outputs stay
            aligned with the inputs.
        recurrent_dropout_mask: optional (b, e) multiplier of h where h enters
            the query and the gate.
        epsilon: LayerNorm epsilon.
        implementation: `None`/"auto", "reference", "fused" or the name of a
            registered implementation (see `keras_attnrnn.ops.REGISTRY`).

    Returns:
        `(outputs, final_state)`: (b, t, e) and (b, e).
    """
    (
        inputs,
        initial_state,
        query_kernel,
        query_bias,
        output_kernel,
        output_bias,
        gate_kernel,
        gate_bias,
        gamma,
        beta,
        input_kernel,
        input_bias,
        mask,
        recurrent_dropout_mask,
    ) = _dispatch.as_tensors(
        inputs,
        initial_state,
        query_kernel,
        query_bias,
        output_kernel,
        output_bias,
        gate_kernel,
        gate_bias,
        gamma,
        beta,
        input_kernel,
        input_bias,
        mask,
        recurrent_dropout_mask,
    )
    units = query_kernel.shape[-1]
    _check_shapes(inputs, initial_state, num_heads, units, mask, input_kernel)
    call = {
        "dtype": _dispatch.dtype_name(inputs),
        "batch": inputs.shape[0],
        "time": inputs.shape[1],
        "input_dim": inputs.shape[2],
        "units": units,
        "num_heads": num_heads,
        "mask": mask is not None,
        "reverse": reverse,
        "recurrent_dropout": recurrent_dropout_mask is not None,
    }
    fn = _dispatch.dispatch(OP, implementation, inputs, call)
    return fn(
        inputs,
        initial_state,
        query_kernel,
        query_bias,
        output_kernel,
        output_bias,
        gate_kernel,
        gate_bias,
        gamma,
        beta,
        num_heads,
        input_kernel=input_kernel,
        input_bias=input_bias,
        mask=mask,
        reverse=reverse,
        recurrent_dropout_mask=recurrent_dropout_mask,
        epsilon=epsilon,
    )


def _fused_supports(call):
    if call["recurrent_dropout"]:
        return False, "recurrent dropout is not fused (the reference serves it)"
    return float_dtype(call)


REGISTRY.register(
    Implementation(
        op=OP,
        name="jax_scan",
        module="keras_attnrnn.ops.attnrnn.jax",
        function="attnrnn",
        backends=("jax",),
        priority=10,
        available=importable("jax"),
        supports=_fused_supports,
    )
)

REGISTRY.register(
    Implementation(
        op=OP,
        name="tensorflow_loop",
        module="keras_attnrnn.ops.attnrnn.tensorflow",
        function="attnrnn",
        backends=("tensorflow",),
        priority=10,
        available=importable("tensorflow"),
        supports=_fused_supports,
    )
)

REGISTRY.register(
    Implementation(
        op=OP,
        name="torch_cpu",
        module="keras_attnrnn.ops.attnrnn.torch",
        function="attnrnn",
        backends=("torch",),
        devices=("cpu",),
        priority=10,
        available=importable("torch"),
        supports=_fused_supports,
    )
)


def _lazy(module, backend, name):
    """A forwarder to `<module>.<name>` that imports nothing at startup."""

    def call(*args):
        if importlib.util.find_spec(backend) is None:
            return False, f"{backend} is not installed"
        return getattr(importlib.import_module(module), name)(*args)

    return call


_TORCH_CPP = "keras_attnrnn.ops.attnrnn.torch_cpp"
REGISTRY.register(
    Implementation(
        op=OP,
        name="torch_cpp",
        module=_TORCH_CPP,
        function="attnrnn",
        backends=("torch",),
        devices=("cpu",),
        priority=20,
        available=_lazy(_TORCH_CPP, "torch", "available"),
        supports=_lazy(_TORCH_CPP, "torch", "supports"),
    )
)
