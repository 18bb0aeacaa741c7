"""What the Triton kernels share: availability, the first-call self-check.

The Triton implementations (`ops/aaren_scan/torch_triton.py`,
`ops/attnrnn/torch_triton.py`) serve the torch backend on CUDA devices. This
module imports neither torch nor triton at import time: the registry asks
`SelfChecked(...)()` (an `available` check) only when such an implementation
is a candidate for a call, that is on torch with a CUDA tensor.

The first time it is asked, the check

1. looks for triton (`importlib.util.find_spec`, nothing imported),
2. asks torch for a CUDA device (under Triton's interpreter,
   ``TRITON_INTERPRET=1``, it runs on the CPU instead),
3. runs the kernel module's `self_check(device)`: it compiles the kernels on
   a small random case, runs them with their backward, and returns the
   relative error of every output and gradient against the portable
   reference;
4. declines, with the reason logged (WARNING, logger ``keras_attnrnn.ops``),
   if anything raised or an error is above the module's `SELF_CHECK_TOLERANCE`.

The result is cached for the process (`reset()` forgets it). Under Triton's
interpreter (``TRITON_INTERPRET=1``) the same kernels run on CPU tensors,
which is how the tests check them on a machine without a GPU.
"""

import importlib
import importlib.util
import logging
import os

logger = logging.getLogger("keras_attnrnn.ops")


def interpreted():
    """Are Triton kernels run by Triton's interpreter (``TRITON_INTERPRET=1``)?"""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in (
        "1", "true", "on", "yes",
    )


def triton_importable():
    """(ok, reason): is triton installed (without importing it)?"""
    if importlib.util.find_spec("triton") is None:
        return False, (
            "triton is not installed (`pip install keras-attnrnn[triton]`)"
        )
    return True, ""


def _traced():
    """Is torch tracing this call (`_dispatch.traced`, without Keras)?"""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch
    import torch.compiler

    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def relative_error(actual, expected):
    """max |actual - expected| / max |expected|, for torch tensors."""
    expected = expected.detach().double()
    actual = actual.detach().double().to(expected.device)
    if actual.shape != expected.shape:
        raise ValueError(
            f"shape {tuple(actual.shape)} differs from the reference's "
            f"{tuple(expected.shape)}"
        )
    if expected.numel() == 0:
        return 0.0
    scale = max(float(expected.abs().max()), 1e-12)
    return float((actual - expected).abs().max()) / scale


def run_self_check(name, check, device, tolerance):
    """Runs `check(device)` and judges it: `(ok, reason)`.

    Args:
        name: the implementation's name, for the messages.
        check: `(device) -> dict` of relative errors by what was compared.
        device: the torch device to run on (``"cuda"``, or ``"cpu"`` under
            the interpreter).
        tolerance: the largest relative error accepted.

    Returns:
        `(True, "")`, or `(False, reason)`; a decline is logged.
    """
    import torch

    try:
        # Whatever context the first call comes in (inference, no_grad),
        # the check runs the backward too.
        with torch.inference_mode(False), torch.enable_grad():
            errors = check(device)
    except Exception as error:  # a compile error, a launch failure, ...
        reason = (
            f"its self-check on {device} failed: {type(error).__name__}: "
            f"{str(error).strip()[:300]}"
        )
    else:
        bad = {k: e for k, e in errors.items() if not e <= tolerance}
        if not bad:
            logger.info(
                "%s: self-check on %s passed (largest relative error %.1e)",
                name, device, max(errors.values(), default=0.0),
            )
            return True, ""
        listed = ", ".join(f"{k} {e:.2e}" for k, e in bad.items())
        reason = (
            f"its self-check on {device} disagreed with the reference "
            f"(relative errors above {tolerance:.0e}: {listed})"
        )
    logger.warning("%s declined: %s", name, reason)
    return False, reason


class SelfChecked:
    """An `available` check for a Triton implementation (see the module).

    Args:
        name: the implementation's name.
        module: the module with `self_check(device)` and
            `SELF_CHECK_TOLERANCE`, imported on first use.
    """

    def __init__(self, name, module):
        self.name = name
        self.module = module
        self._result = None

    def reset(self):
        self._result = None

    def __call__(self):
        if self._result is None:
            if _traced():
                # (Not cached: a later eager call runs the check.)
                return False, (
                    "the call is being traced (export or compile), where its "
                    "self-check cannot run"
                )
            self._result = self._check()
        return self._result

    def _check(self):
        ok, reason = triton_importable()
        if not ok:
            return ok, reason
        if importlib.util.find_spec("torch") is None:
            return False, "torch is not installed"
        import torch

        if interpreted():
            # Triton's interpreter runs the kernels on CPU tensors.
            device = "cpu"
        elif torch.cuda.is_available():
            device = "cuda"
        else:
            return False, "no CUDA device is available to torch"
        try:
            module = importlib.import_module(self.module)
        except Exception as error:  # triton present but broken, ...
            reason = (
                f"its kernels could not be imported: {type(error).__name__}: "
                f"{str(error).strip()[:300]}"
            )
            logger.warning("%s declined: %s", self.name, reason)
            return False, reason
        return run_self_check(
            self.name, module.self_check, device, module.SELF_CHECK_TOLERANCE
        )
