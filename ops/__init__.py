"""Functional forms of the recurrences, each dispatched through a registry.

`keras_attnrnn.ops.attnrnn(...)` runs a whole sequence through the
implementation chosen for the call: a backend's fused implementation when one
is available and supports the call, else the portable `keras.ops` reference.
See `registry.py` for how the choice is made, and `selected(op)` for which
implementation ran last:

>>> keras_attnrnn.ops.selected("attnrnn")
'jax_scan'
"""

from keras_attnrnn.ops.aaren_scan import aaren_scan
from keras_attnrnn.ops.attnrnn import attnrnn
from keras_attnrnn.ops.attnrnn.steps import attnrnn_step
from keras_attnrnn.ops.attnrnn.steps import attnrnn_step_parts
from keras_attnrnn.ops.larnn import larnn
from keras_attnrnn.ops.larnn.steps import WEIGHT_NAMES as LARNN_WEIGHT_NAMES
from keras_attnrnn.ops.larnn.steps import larnn_step
from keras_attnrnn.ops.larnn.steps import positional_features as larnn_positional_features
from keras_attnrnn.ops.larnn.steps import positional_size as larnn_positional_size
from keras_attnrnn.ops.registry import ENV_VAR
from keras_attnrnn.ops.registry import REGISTRY
from keras_attnrnn.ops.registry import Implementation


def selected(op):
    """The name of the implementation last chosen for `op`, or None."""
    return REGISTRY.selected(op)


def implementations(op, backend=None, device=None):
    """The names of `op`'s implementations, highest priority first."""
    return [impl.name for impl in REGISTRY.implementations(op, backend, device)]


__all__ = [
    "ENV_VAR",
    "REGISTRY",
    "Implementation",
    "aaren_scan",
    "attnrnn",
    "attnrnn_step",
    "attnrnn_step_parts",
    "implementations",
    "LARNN_WEIGHT_NAMES",
    "larnn",
    "larnn_positional_features",
    "larnn_positional_size",
    "larnn_step",
    "selected",
]
