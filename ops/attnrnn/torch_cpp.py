"""AttnRNN on torch (CPU) with the step loops in C++ (`torch_cpu.cpp`).

The extension is compiled with `torch.utils.cpp_extension` the first time it
is used on a machine (it needs a C++ compiler and `ninja`; about a minute) and
cached by torch (`TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`).
If it cannot be built, `available()` says why and the registry falls back to
the pure-Python `torch_cpu` implementation.
"""

import logging
import os
import shutil

import torch

from keras_attnrnn.ops.attnrnn.reference import LAYER_NORM_EPSILON

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_cpu.cpp")
_extension = None
_error = None


def _load():
    global _extension, _error
    if _extension is None and _error is None:
        try:
            from torch.utils import cpp_extension

            logging.getLogger("keras_attnrnn.ops").info(
                "building the AttnRNN CPU extension (once per machine)"
            )
            _extension = cpp_extension.load(
                name="keras_attnrnn_attnrnn_cpu",
                sources=[_SOURCE],
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
    if call["dtype"] not in ("float16", "bfloat16", "float32", "float64"):
        return False, f"dtype {call['dtype']} is not a float dtype"
    return True, ""


class _AttnRNN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, w_hq, b_hq, w_o, b_o, w_ga, gamma, beta, mask, meta):
        num_heads, reverse, epsilon = meta
        ext = _load()
        (hs, q, p, o, u, a, z, rhat, rstd) = ext.forward(
            x, h0, w_hq, b_hq, w_o, b_o, w_ga, gamma, beta, mask,
            num_heads, reverse, epsilon,
        )
        ctx.meta = (num_heads, reverse)
        ctx.save_for_backward(
            x, h0, hs, q, p, o, u, a, z, rhat, rstd, w_hq, w_o, w_ga, gamma, beta, mask
        )
        return hs, (hs[0] if reverse else hs[-1])

    @staticmethod
    def backward(ctx, d_hs, d_last):
        num_heads, reverse = ctx.meta
        (x, h0, hs, q, p, o, u, a, z, rhat, rstd,
         w_hq, w_o, w_ga, gamma, beta, mask) = ctx.saved_tensors
        dx, dh0, dhw, du, dcand = _load().backward(
            d_hs, d_last, x, h0, hs, q, p, u, z, rhat, rstd,
            w_hq, w_o, w_ga, gamma, beta, mask, num_heads, reverse,
        )
        e = x.shape[-1]
        if reverse:
            h_prev = torch.cat([hs[1:], h0[None]])
        else:
            h_prev = torch.cat([h0[None], hs[:-1]])
        rows = lambda v: v.reshape(-1, v.shape[-1])  # noqa: E731
        dhw, du, dcand = rows(dhw), rows(du), rows(dcand)
        d_w_hq = torch.mm(rows(h_prev).t(), dhw)
        d_w_o = torch.mm(rows(o).t(), du)
        d_w_ga = torch.mm(rows(a).t(), dhw[:, e:])
        d_gamma = (dcand * rows(rhat)).sum(0)
        return (dx, dh0, d_w_hq, dhw.sum(0), d_w_o, du.sum(0), d_w_ga,
                d_gamma, dcand.sum(0), None, None)


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
