"""AttnRNN on torch (CPU) with the step loops in C++ (`torch_cpu.cpp`).

The extension is compiled with `torch.utils.cpp_extension` the first time it
is used on a machine (it needs a C++ compiler and `ninja`; about a minute) and
cached by torch (`TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`).
If it cannot be built, `available()` says why and the registry falls back to
the pure-Python `torch_cpu` implementation.
"""

import hashlib
import logging
import os
import shutil

import torch

from keras_attnrnn.ops.attnrnn import steps
from keras_attnrnn.ops.attnrnn.reference import LAYER_NORM_EPSILON

_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCES = [os.path.join(_HERE, "torch_cpu.cpp"), os.path.join(_HERE, "attnrnn_cpu.h")]
_extension = None
_error = None


def _source_hash():
    digest = hashlib.sha256()
    for path in _SOURCES:
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


def _load():
    global _extension, _error
    if _extension is None and _error is None:
        try:
            from torch.utils import cpp_extension

            logging.getLogger("keras_attnrnn.ops").info(
                "building the AttnRNN CPU extension (once per machine)"
            )
            _extension = cpp_extension.load(
                # The sources' hash in the name: a changed header is rebuilt.
                name=f"keras_attnrnn_attnrnn_cpu_{_source_hash()}",
                sources=_SOURCES[:1],
                extra_include_paths=[_HERE],
                extra_cflags=["-O3", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as error:  # a missing compiler, ninja, headers...
            _error = f"{type(error).__name__}: {str(error).strip()[:300]}"
    return _extension


def available():
    """(ok, reason): can the extension be built (or is it already)?"""
    missing = [tool for tool in ("c++", "ninja") if shutil.which(tool) is None]
    if missing and _extension is None:
        return False, (
            f"{' and '.join(missing)} not found; `pip install ninja` and a C++ "
            "compiler build the AttnRNN CPU extension"
        )
    if _load() is None:
        return False, f"the AttnRNN CPU extension failed to build ({_error})"
    return True, ""


def supports(call):
    if call["recurrent_dropout"]:
        return False, "recurrent dropout is not fused (the reference serves it)"
    if call["dtype"] not in ("float16", "bfloat16", "float32"):
        # float64: Keras's torch ops compute it in float32 (keras dtype rules).
        return False, f"dtype {call['dtype']} is not float16/bfloat16/float32"
    return True, ""


class _AttnRNN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, w_hq, b_hq, w_o, b_o, w_ga, gamma, beta, mask, meta):
        num_heads, reverse, epsilon = meta
        saved = _load().forward(
            x, h0, w_hq, b_hq, w_o, b_o, w_ga, gamma, beta, mask,
            num_heads, reverse, epsilon,
        )
        ctx.meta = (num_heads, reverse)
        ctx.save_for_backward(
            x, h0, *saved, w_hq, b_hq, w_o, b_o, w_ga, gamma, beta, mask
        )
        hs = saved[0]
        return hs, (hs[0] if reverse else hs[-1])

    @staticmethod
    def backward(ctx, d_hs, d_last):
        num_heads, reverse = ctx.meta
        x, h0, *rest = ctx.saved_tensors
        saved, (w_hq, b_hq, w_o, b_o, w_ga, gamma, beta, mask) = rest[:9], rest[9:]
        hs, _, _, o, _, a, _, rhat, _ = saved
        dx, dh0, dhw, du, dcand = _load().backward(
            d_hs, d_last, x, h0, *saved,
            w_hq, b_hq, w_o, b_o, w_ga, gamma, beta, mask, num_heads, reverse,
        )
        d_weights = steps.packed_weight_grads(h0, hs, o, a, rhat, dhw, du, dcand, reverse)
        return (dx, dh0, *d_weights, None, None)


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
    epsilon=LAYER_NORM_EPSILON,
):
    """Same contract as `reference.attnrnn` (no recurrent dropout)."""
    dtype = inputs.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    cast = lambda v: v.to(compute)  # noqa: E731
    x = cast(inputs)
    if input_kernel is not None:
        x = torch.matmul(x, cast(input_kernel)) + cast(input_bias)
    units = query_kernel.shape[-1]
    gate_kernel = cast(gate_kernel)
    m = torch.empty(0, dtype=torch.bool)
    if mask is not None:
        m = mask.to(torch.bool).t().contiguous()
    hs, h_last = _AttnRNN.apply(
        x.transpose(0, 1).contiguous(),
        cast(initial_state),
        torch.cat([cast(query_kernel), gate_kernel[:units]], 1),
        torch.cat([cast(query_bias), cast(gate_bias)]),
        cast(output_kernel),
        cast(output_bias),
        gate_kernel[units:],
        cast(gamma),
        cast(beta),
        m,
        (num_heads, bool(reverse), float(epsilon)),
    )
    return hs.transpose(0, 1).to(dtype), h_last.to(dtype)
