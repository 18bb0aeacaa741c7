"""Attention-based recurrent layers for Keras 3, on jax, tensorflow and torch.

Cells run in `keras.layers.RNN`; the layers of the same names run a fused
implementation from `keras_attnrnn.ops`, chosen per backend and device.
"""

import importlib.util

if importlib.util.find_spec("keras_attnrnn.ops") is None:
    # `ops/` lies beside this package in a source checkout and becomes
    # `keras_attnrnn.ops` only when installed (pyproject.toml's package-dir).
    raise ImportError(
        "keras_attnrnn.ops was not found: this keras_attnrnn is a source "
        "checkout that is not installed. Install it with `pip install -e .` "
        "in the repository root."
    )

from keras_attnrnn import datasets
from keras_attnrnn import ops
from keras_attnrnn.aaren import Aaren
from keras_attnrnn.aaren import AarenBlock
from keras_attnrnn.aaren import AarenCell
from keras_attnrnn.attnrnn import AttnRNN
from keras_attnrnn.attnrnn import AttnRNNCell
from keras_attnrnn.larnn import LARNN
from keras_attnrnn.larnn import LARNNCell
from keras_attnrnn.streaming import streaming_initial_state
from keras_attnrnn.streaming import streaming_step

__version__ = "0.1.0"

__all__ = [
    "Aaren",
    "AarenBlock",
    "AarenCell",
    "AttnRNN",
    "AttnRNNCell",
    "LARNN",
    "LARNNCell",
    "datasets",
    "ops",
    "streaming_initial_state",
    "streaming_step",
]
