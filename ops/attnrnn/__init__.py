"""The AttnRNN recurrence as one op, dispatched to the best implementation.

The front door (`attnrnn`) checks the arguments and does the shared
preparation once: 16-bit inputs cast to float32, the input projection, the
time-major layout, the weights packed (`steps.prepare`). An implementation is
a loop driver over the model's one math (`steps.py`), called as
`fn(x, state0, w, mask, extras, reverse, config)` (see `ops/loops/`):

| name | backend | device | what |
|---|---|---|---|
| `reference` | any | any | `keras.ops.scan` over `steps.forward_step`, autodiff |
| `jax_scan` | jax | any | `lax.scan` with the hand-written VJP of `steps.py` |
| `tensorflow_loop` | tensorflow | any | XLA while loops, the same VJP |
| `torch_cpp` | torch | cpu | C++ step loops built on first use (`torch_cpp.py`) |
| `torch_triton` | torch | gpu (CUDA) | persistent Triton kernels, forward and backward (`torch_triton.py`); self-checked against the reference on first use; so far run only in Triton's interpreter (docs/triton.md) |

Without a C++ compiler `torch_cpp` declines, saying why, and torch runs the
reference (a Python `torch_cpu` copy of the math was 1.25x slower than
`torch_cpp` and was removed; docs/benchmarks.md).
"""

import importlib.util

from keras import ops

from keras_attnrnn.ops import _dispatch
from keras_attnrnn.ops import _triton
from keras_attnrnn.ops import loops
from keras_attnrnn.ops.attnrnn import steps
from keras_attnrnn.ops.registry import REGISTRY
from keras_attnrnn.ops.registry import Implementation
from keras_attnrnn.ops.registry import float_dtype
from keras_attnrnn.ops.registry import register_drivers
from keras_attnrnn.ops.registry import untraced

OP = "attnrnn"



def _check_shapes(inputs, initial_state, num_heads, units, mask, input_kernel):
    invalid = _dispatch.invalid
    if len(inputs.shape) != 3:
        raise invalid(
            "inputs", "a 3D tensor (batch, timesteps, features)",
            f"shape {tuple(inputs.shape)}",
        )
    if not isinstance(num_heads, int) or num_heads <= 0 or units % num_heads:
        raise invalid("num_heads", f"a positive divisor of units={units}", num_heads)
    expected = units if input_kernel is None else input_kernel.shape[0]
    if inputs.shape[-1] is not None and inputs.shape[-1] != expected:
        raise invalid(
            "inputs", f"{expected} features on the last axis",
            f"shape {tuple(inputs.shape)}",
        )
    if len(initial_state.shape) != 2 or initial_state.shape[-1] != units:
        raise invalid(
            "initial_state", f"shape (batch, {units})",
            tuple(initial_state.shape),
        )
    _dispatch.check_mask(mask, inputs)


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
    inputs, initial_state, input_kernel, input_bias, mask, dropout = (
        _dispatch.as_tensors(
            inputs, initial_state, input_kernel, input_bias, mask,
            recurrent_dropout_mask,
        )
    )
    weights = _dispatch.as_tensors(
        query_kernel, query_bias, output_kernel, output_bias, gate_kernel,
        gate_bias, gamma, beta,
    )
    units = weights[0].shape[-1]
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
        "recurrent_dropout": dropout is not None,
    }
    fn = _dispatch.dispatch(OP, implementation, inputs, call)
    dtype, cast = _dispatch.compute_cast(inputs)
    x = cast(inputs)
    if input_kernel is not None:
        x = ops.matmul(x, cast(input_kernel)) + cast(input_bias)
    hs, (h_last,) = fn(
        loops.time_major(x),
        (cast(initial_state),),
        steps.prepare(*map(cast, weights)),
        _dispatch.time_major_mask(mask),
        (cast(dropout),),
        bool(reverse),
        (num_heads, float(epsilon)),
    )
    return ops.cast(loops.time_major(hs), dtype), ops.cast(h_last, dtype)


def _fused_supports(call):
    if call["recurrent_dropout"]:
        return False, "recurrent dropout is not fused (the reference serves it)"
    return float_dtype(call)


register_drivers(OP, "keras_attnrnn.ops.attnrnn.steps", _fused_supports)


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
        supports=untraced(_lazy(_TORCH_CPP, "torch", "supports")),
    )
)


# The Triton kernels' limit (`torch_triton` reads it from here): the
# recurrent weights of one program stay on chip. Compiled for sm_90 (on a
# CPU, tests/triton_cases.py), units padded to 64 need 78 KB (forward) and
# 160 KB (backward) of shared memory, 128 would need 287 and 582 KB, above
# the 227 KB of an H100/H200.
TRITON_MAX_UNITS = 64
_TORCH_TRITON = "keras_attnrnn.ops.attnrnn.torch_triton"


def _triton_supports(call):
    if call["recurrent_dropout"]:
        return False, "recurrent dropout is not fused (the reference serves it)"
    if call["dtype"] not in ("float16", "bfloat16", "float32"):
        return False, f"dtype {call['dtype']} is not float16/bfloat16/float32"
    if call["units"] > TRITON_MAX_UNITS:
        return False, (
            f"units={call['units']} is above the kernels' {TRITON_MAX_UNITS} "
            "(the recurrent weights must stay on chip)"
        )
    sizes = (call["time"], call["batch"])
    if all(isinstance(n, int) for n in sizes) and (
        sizes[0] * sizes[1] * 2 * call["units"] >= 2**31
    ):
        return False, "time * batch * 2 * units is not below 2**31 (32-bit offsets)"
    return True, ""


REGISTRY.register(
    Implementation(
        op=OP,
        name="torch_triton",
        module=_TORCH_TRITON,
        function="attnrnn",
        backends=("torch",),
        devices=("gpu",),
        priority=20,
        available=_triton.SelfChecked("attnrnn/torch_triton", _TORCH_TRITON),
        supports=untraced(_triton_supports),
    )
)
