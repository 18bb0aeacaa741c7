"""A small registry of op implementations, chosen per call.

Each op (``"attnrnn"``, ``"larnn"``, ``"aaren_scan"``) has implementations keyed
by backend (``"jax"``, ``"tensorflow"``, ``"torch"``, or ``"*"`` for any) and
device kind (``"cpu"``, ``"gpu"``, or ``"*"``). Each has a priority, an
availability check (is its library importable, is there a GPU) and a per-call
``supports(call)`` check returning ``(ok, reason)``.

Selection, for a call on a given backend and device:

* ``mode`` is ``"reference"``: the portable reference implementation.
* ``mode`` is ``"fused"``: the highest-priority available fused
  implementation that supports the call; if there is none, a ``ValueError``
  saying why each candidate declined.
* ``mode`` is the name of one implementation: that one, or a ``ValueError``.
* ``mode`` is ``"auto"`` or ``None``: the environment variable
  ``KERAS_ATTNRNN_IMPLEMENTATION`` if set, else the highest-priority fused
  implementation that supports the call, else the reference; if even the
  reference declines, ``NotImplementedError`` (a layer then runs its generic
  loop, as ``keras.layers.GRU`` does when cuDNN declines).

The choice is logged once per distinct outcome (logger ``keras_attnrnn.ops``)
and readable with :func:`selected`. This module imports neither Keras nor any
backend: implementations are loaded lazily, by module and function name, when
they are chosen.
"""

import dataclasses
import importlib
import importlib.util
import logging
import os
from typing import Callable

ENV_VAR = "KERAS_ATTNRNN_IMPLEMENTATION"
MODES = ("auto", "reference", "fused")

logger = logging.getLogger("keras_attnrnn.ops")


def _always(*args, **kwargs):
    return True, ""


FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def float_dtype(call):
    """A `supports` check: the call's dtype is a float dtype."""
    if call["dtype"] in FLOAT_DTYPES:
        return True, ""
    return False, f"dtype {call['dtype']} is not a float dtype"


def untraced(check):
    """A `supports` check for native kernels: declines a call that torch is
    tracing into a graph (export, compile; see `_dispatch.traced`), then
    asks `check`."""

    def supports(call):
        if call.get("traced"):
            return False, (
                "the call is being traced (export or compile), which cannot "
                "capture a native kernel"
            )
        return check(call)

    return supports


def importable(module):
    """An `available` check: `module` (a backend) can be imported."""

    def check():
        if importlib.util.find_spec(module) is None:
            return False, f"{module} is not installed"
        return True, ""

    return check


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One implementation of an op.

    Attributes:
        op: the op's name, e.g. ``"attnrnn"``.
        name: a unique name, e.g. ``"jax_scan"``; usable as ``implementation=``.
        module: the module that holds the function (imported on first use).
        function: the function's name in that module. It is looked up at
            every call, so a test may replace it to spy on it.
        backends: Keras backends it serves, or ``("*",)`` for all.
        devices: device kinds it serves (``"cpu"``, ``"gpu"``), or ``("*",)``.
        priority: higher wins among those that support a call.
        fused: ``False`` only for the portable reference.
        available: ``() -> (ok, reason)``: can it run on this machine at all.
        supports: ``(call: dict) -> (ok, reason)``: can it serve this call.
    """

    op: str
    name: str
    module: str
    function: str
    backends: tuple = ("*",)
    devices: tuple = ("*",)
    priority: int = 0
    fused: bool = True
    available: Callable = _always
    supports: Callable = _always

    def serves(self, backend, device):
        return ("*" in self.backends or backend in self.backends) and (
            "*" in self.devices or device in self.devices
        )

    def load(self):
        return getattr(importlib.import_module(self.module), self.function)


class Registry:
    def __init__(self):
        self._implementations = {}
        self._selected = {}
        self._logged = set()

    def register(self, implementation):
        ops = self._implementations.setdefault(implementation.op, {})
        if implementation.name in ops:
            raise ValueError(
                f"An implementation named {implementation.name!r} is already "
                f"registered for op {implementation.op!r}."
            )
        ops[implementation.name] = implementation
        return implementation

    def ops(self):
        return sorted(self._implementations)

    def implementations(self, op, backend=None, device=None):
        """The implementations of `op`, highest priority first.

        With `backend` (and `device`), only those that serve it.
        """
        impls = self._get_op(op).values()
        if backend is not None:
            impls = [
                impl
                for impl in impls
                if impl.serves(backend, device if device else "cpu")
            ]
        return sorted(impls, key=lambda impl: -impl.priority)

    def names(self, op):
        return [impl.name for impl in self.implementations(op)]

    def _get_op(self, op):
        if op not in self._implementations:
            raise ValueError(
                f"Unknown op {op!r}. Known ops: {self.ops()}."
            )
        return self._implementations[op]

    def _choices(self, op):
        """The valid `implementation` values of `op`, each named once."""
        return list(MODES) + [n for n in self.names(op) if n not in MODES]

    def check_mode(self, op, mode):
        """Raises `ValueError` unless `mode` is a valid choice for `op`."""
        if mode is None or mode in MODES or mode in self._get_op(op):
            return mode
        raise ValueError(
            "Received an invalid value for argument `implementation`, "
            f"expected one of {self._choices(op)}, got {mode!r}."
        )

    def resolve_mode(self, op, mode):
        """`mode`, with "auto"/None replaced by the environment variable."""
        self.check_mode(op, mode)
        if mode in (None, "auto"):
            env = os.environ.get(ENV_VAR, "").strip()
            if env:
                if env not in MODES and env not in self._get_op(op):
                    raise ValueError(
                        f"Received an invalid value for environment "
                        f"variable {ENV_VAR}, expected one of "
                        f"{self._choices(op)}, got {env!r}."
                    )
                mode = env
            else:
                mode = "auto"
        return mode

    def select(self, op, backend, device, call, mode=None):
        """Chooses the implementation of `op` for one call.

        Args:
            op: the op's name.
            backend: the Keras backend, e.g. ``"jax"``.
            device: the device kind, ``"cpu"`` or ``"gpu"``.
            call: a dict describing the call, passed to ``supports``.
            mode: ``"auto"``, ``"reference"``, ``"fused"``, an
                implementation's name, or ``None`` (same as ``"auto"``).

        Returns:
            The chosen `Implementation`.

        Raises:
            ValueError: for an unknown mode, or for ``"fused"``,
                ``"reference"`` or a named implementation that cannot serve
                the call.
            NotImplementedError: in "auto" mode, when no implementation
                serves the call.
        """
        mode = self.resolve_mode(op, mode)
        candidates = self.implementations(op, backend, device)
        reference = [impl for impl in candidates if not impl.fused]
        rejected = []
        chosen = None
        if mode == "reference":
            pool = reference
        elif mode == "fused":
            pool = [impl for impl in candidates if impl.fused]
        elif mode == "auto":
            pool = [impl for impl in candidates if impl.fused] + reference
        else:
            pool = [impl for impl in candidates if impl.name == mode]
            if not pool:
                raise ValueError(
                    f"Implementation {mode!r} of op {op!r} does not serve "
                    f"backend {backend!r} on device {device!r}. "
                    "Pass implementation='auto' to let the registry choose."
                )
        for impl in pool:
            ok, reason = impl.available()
            if ok:
                ok, reason = impl.supports(call)
            if ok:
                chosen = impl
                break
            rejected.append((impl.name, reason))
        if chosen is None:
            reasons = "; ".join(f"{n}: {r}" for n, r in rejected) or (
                f"no implementation for backend {backend!r} on {device!r}"
            )
            if mode == "auto":
                # The caller (a layer) may still run its generic loop.
                raise NotImplementedError(
                    f"No implementation of op {op!r} serves this call "
                    f"({reasons})."
                )
            raise ValueError(
                f"implementation={mode!r} was requested for op {op!r}, but "
                f"it cannot serve this call ({reasons}). Pass "
                "implementation='auto' to fall back to the reference."
            )
        self._record(op, chosen, mode, backend, device, rejected)
        return chosen

    def _record(self, op, chosen, mode, backend, device, rejected):
        self._selected[op] = chosen.name
        key = (op, chosen.name, mode, backend, device, tuple(rejected))
        if key not in self._logged:
            self._logged.add(key)
            why = "; ".join(f"{n} declined: {r}" for n, r in rejected)
            logger.info(
                "%s: using %r (mode=%r, backend=%r, device=%r)%s",
                op,
                chosen.name,
                mode,
                backend,
                device,
                f"; {why}" if why else "",
            )

    def selected(self, op):
        """The name of the implementation last chosen for `op`, or None."""
        self._get_op(op)
        return self._selected.get(op)

    def reset(self):
        """Forgets the recorded choices (tests use it between cases)."""
        self._selected.clear()
        self._logged.clear()


REGISTRY = Registry()


def register_drivers(op, module, supports=float_dtype):
    """Registers the portable `reference` and the fused `jax_scan` and
    `tensorflow_loop` of `op`: the loop drivers (`ops/loops/`) bound to the
    steps module `module`, which names them so."""
    REGISTRY.register(
        Implementation(op, "reference", module, "reference", fused=False)
    )
    for name, backend in (("jax_scan", "jax"), ("tensorflow_loop", "tensorflow")):
        REGISTRY.register(
            Implementation(
                op,
                name,
                module,
                name,
                backends=(backend,),
                priority=10,
                available=importable(backend),
                supports=supports,
            )
        )
