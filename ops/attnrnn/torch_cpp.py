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

from keras_attnrnn.ops import loops
from keras_attnrnn.ops.attnrnn import steps

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
        flat = lambda v: v.reshape(-1, v.shape[-1])  # noqa: E731
        d_w = steps.packed_grads(
            *map(flat, (loops.previous(hs, h0, reverse), o, a, rhat, dhw, du, dcand))
        )
        return (dx, dh0, *[d_w[name] for name in _WEIGHTS], None, None)


_WEIGHTS = ("hq_kernel", "hq_bias", "output_kernel", "output_bias", "gate_a_kernel", "gamma", "beta")


def attnrnn(x, state0, w, mask, extras, reverse, config):
    """See `ops/loops/__init__.py` (no recurrent dropout)."""
    num_heads, epsilon = config
    m = torch.empty(0, dtype=torch.bool) if mask is None else mask[..., 0].contiguous()
    hs, h_last = _AttnRNN.apply(
        x.contiguous(),
        state0[0],
        *[w[name] for name in _WEIGHTS],
        m,
        (num_heads, bool(reverse), float(epsilon)),
    )
    return hs, (h_last,)
