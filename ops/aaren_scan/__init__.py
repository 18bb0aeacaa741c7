"""Aaren's prefix attention as one op, dispatched to the best implementation.

`aaren_scan` computes, for every step t of a sequence and every head, softmax
attention of a fixed (learned) query over the prefix 0..t:

    o_t = sum_{i <= t} exp(s_i) v_i / sum_{i <= t} exp(s_i)

where s_i are the query's scores against the keys and v_i the values
(Feng et al., "Attention as an RNN", arXiv 2405.13956; SPEC §3.3). The state of
a head is (m, u, w): the running max m of the scores, u = sum exp(s_i - m) and
w = sum exp(s_i - m) v_i; u == 0 means "empty" whatever m holds, so the
all-zeros state is the empty state.

Shapes: b batch, t time, n heads, k head dim.

Implementations (all with the signature of `reference.aaren_scan`):

| name | backend | device | what |
|---|---|---|---|
| `reference` | any | any | `keras.ops.associative_scan` over the (m, u, w) leaves |
| `jax_chunked` | jax | any | `chunked.py`: exact softmax in blocks of 16 steps, a doubling scan over the blocks |
| `tensorflow_chunked` | tensorflow | any | the same function, blocks of 32 (and a dynamic time dimension) |
| `torch_chunked` | torch | any | the same function, blocks of 16, the last merge folded into the block matmul (`fold=True`) |
| `torch_triton` | torch | gpu (CUDA) | Triton kernels, forward and backward (`torch_triton.py`); self-checked against the reference on first use; so far run only in Triton's interpreter (docs/triton.md) |

The three chunked names are one `keras.ops` function (`chunked.aaren_scan`)
with each backend's block size and form of the last merge. Block sizes: measured on 2 CPU cores at b=8,
t=4096, n=4, k=32, forward and backward (16 beat 64 by 1.5-2.5x on jax and
torch; tensorflow was flat from 32 to 64). The (C, C) weights of a block
cost O(t * C) per head against O(t * k) for the values, so small blocks win
unless a device wants big matrix products.
"""

from keras_attnrnn.ops import _dispatch
from keras_attnrnn.ops import _triton
from keras_attnrnn.ops.registry import REGISTRY
from keras_attnrnn.ops.registry import Implementation
from keras_attnrnn.ops.registry import float_dtype
from keras_attnrnn.ops.registry import importable
from keras_attnrnn.ops.registry import untraced

OP = "aaren_scan"

REGISTRY.register(
    Implementation(
        op=OP,
        name="reference",
        module="keras_attnrnn.ops.aaren_scan.reference",
        function="aaren_scan",
        fused=False,
        priority=0,
    )
)


def _known_mismatch(a, b):
    return a is not None and b is not None and a != b


def _check_shapes(scores, values, initial_state, mask):
    if len(scores.shape) != 3:
        raise ValueError(
            "Received an invalid value for argument `scores`, expected a 3D "
            f"tensor (batch, timesteps, heads), got shape {tuple(scores.shape)}."
        )
    if len(values.shape) != 4 or any(
        _known_mismatch(a, b) for a, b in zip(values.shape[:3], scores.shape)
    ):
        raise ValueError(
            "Received an invalid value for argument `values`, expected a 4D "
            "tensor (batch, timesteps, heads, head_dim) matching `scores` "
            f"of shape {tuple(scores.shape)}, got shape {tuple(values.shape)}."
        )
    batch, _, heads, head_dim = values.shape
    if initial_state is not None:
        expected = ((batch, heads), (batch, heads), (batch, heads, head_dim))
        if not isinstance(initial_state, (list, tuple)) or len(
            initial_state
        ) != 3 or any(
            len(s.shape) != len(e)
            or any(_known_mismatch(a, b) for a, b in zip(s.shape, e))
            for s, e in zip(initial_state, expected)
        ):
            got = (
                [tuple(s.shape) for s in initial_state]
                if isinstance(initial_state, (list, tuple))
                else initial_state
            )
            raise ValueError(
                "Received an invalid value for argument `initial_state`, "
                "expected a tuple (m, u, w) of shapes (batch, heads), "
                f"(batch, heads), (batch, heads, head_dim) = {expected}, "
                f"got {got}."
            )
    if mask is not None and (
        len(mask.shape) != 2
        or any(_known_mismatch(a, b) for a, b in zip(mask.shape, scores.shape))
    ):
        raise ValueError(
            "Received an invalid value for argument `mask`, expected shape "
            f"(batch, timesteps) = {tuple(scores.shape[:2])}, got "
            f"{tuple(mask.shape)}."
        )


def aaren_scan(
    scores,
    values,
    initial_state=None,
    mask=None,
    reverse=False,
    implementation=None,
):
    """Softmax attention of a fixed query over every prefix (SPEC §3.3).

    The inclusive prefix scan of the leaves (s_t, 1, v_t) under the
    associative operator

        (m_a, u_a, w_a) + (m_b, u_b, w_b) = (m, u_a e^(m_a - m) + u_b e^(m_b - m),
                                             w_a e^(m_a - m) + w_b e^(m_b - m)),
        m = max(m_a, m_b),

    starting from `initial_state`. Accumulation is float32 for 16-bit inputs.
    No NaN or inf comes out for any finite scores, fully masked rows or t = 1.

    Shapes: b batch, t time, n heads, k head dim.

    Args:
        scores: (b, t, n) the query's score of each step, per head.
        values: (b, t, n, k) the value of each step, per head.
        initial_state: optional `(m, u, w)`, shapes (b, n), (b, n), (b, n, k);
            `None` or all zeros is the empty state.
        mask: optional (b, t) booleans; a masked step is the identity (the
            state carries over and its output repeats the previous one, zeros
            before the first valid step of an empty state).
        reverse: process the steps from last to first; the outputs stay
            aligned with the inputs.
        implementation: `None`/"auto", "reference", "fused" or the name of a
            registered implementation (see `keras_attnrnn.ops.REGISTRY`).

    Returns:
        `(outputs, final_state)`: outputs (b, t, n, k), the attention output
        after each step (w / u, zeros while the state is empty), and the
        state `(m, u, w)` after the last processed step (m is 0 for an empty
        head, so an empty state is all zeros).

    Example:

    >>> scores = np.random.normal(size=(2, 5, 4)).astype("float32")
    >>> values = np.random.normal(size=(2, 5, 4, 8)).astype("float32")
    >>> outputs, (m, u, w) = keras_attnrnn.ops.aaren_scan(scores, values)
    >>> outputs.shape, m.shape, w.shape
    ((2, 5, 4, 8), (2, 4), (2, 4, 8))
    """
    scores, values, mask = _dispatch.as_tensors(scores, values, mask)
    if initial_state is not None:
        initial_state = tuple(_dispatch.as_tensors(*initial_state))
    _check_shapes(scores, values, initial_state, mask)
    call = {
        "dtype": _dispatch.dtype_name(values),
        "batch": values.shape[0],
        "time": values.shape[1],
        "num_heads": values.shape[2],
        "head_dim": values.shape[3],
        "mask": mask is not None,
        "reverse": bool(reverse),
        "initial_state": initial_state is not None,
    }
    fn = _dispatch.dispatch(OP, implementation, values, call)
    return fn(
        scores,
        values,
        initial_state=initial_state,
        mask=mask,
        reverse=reverse,
    )


for _backend in ("jax", "tensorflow", "torch"):
    REGISTRY.register(
        Implementation(
            op=OP,
            name=f"{_backend}_chunked",
            module="keras_attnrnn.ops.aaren_scan.chunked",
            function=f"{_backend}_chunked",
            backends=(_backend,),
            priority=10,
            available=importable(_backend),
            supports=float_dtype,
        )
    )


# The Triton kernel's limit (`torch_triton` reads it from here).
TRITON_MAX_HEAD_DIM = 256
_TRITON = "keras_attnrnn.ops.aaren_scan.torch_triton"


def _triton_supports(call):
    if call["dtype"] not in ("float16", "bfloat16", "float32"):
        return False, f"dtype {call['dtype']} is not float16/bfloat16/float32"
    if call["head_dim"] is not None and call["head_dim"] > TRITON_MAX_HEAD_DIM:
        return False, (
            f"head_dim {call['head_dim']} is above the kernel's "
            f"{TRITON_MAX_HEAD_DIM}"
        )
    return True, ""


REGISTRY.register(
    Implementation(
        op=OP,
        name="torch_triton",
        module=_TRITON,
        function="aaren_scan",
        backends=("torch",),
        devices=("gpu",),
        priority=20,
        available=_triton.SelfChecked("aaren_scan/torch_triton", _TRITON),
        supports=untraced(_triton_supports),
    )
)
