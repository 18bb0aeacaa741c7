"""Attention-based recurrent layers for Keras 3, on jax, tensorflow and torch.

Cells run in `keras.layers.RNN`; the layers of the same names run a fused
implementation from `keras_attnrnn.ops`, chosen per backend and device.
"""

import importlib.util
import os
import sys

if importlib.util.find_spec("keras_attnrnn.ops") is None:
    # A source checkout on sys.path (e.g. `python` started in the repository
    # root): `ops/` lies beside this package and is only installed as
    # `keras_attnrnn.ops` by pip (pyproject.toml's package-dir). Load it from
    # there under that name.
    _ops_dir = os.path.join(os.path.dirname(os.path.dirname(__file__)), "ops")
    _spec = importlib.util.spec_from_file_location(
        "keras_attnrnn.ops",
        os.path.join(_ops_dir, "__init__.py"),
        submodule_search_locations=[_ops_dir],
    )
    sys.modules["keras_attnrnn.ops"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["keras_attnrnn.ops"])

from keras_attnrnn import datasets  # noqa: E402
from keras_attnrnn import ops  # noqa: E402
from keras_attnrnn.aaren import Aaren  # noqa: E402
from keras_attnrnn.aaren import AarenBlock
from keras_attnrnn.aaren import AarenCell
from keras_attnrnn.attnrnn import AttnRNN
from keras_attnrnn.attnrnn import AttnRNNCell
from keras_attnrnn.larnn import LARNN
from keras_attnrnn.larnn import LARNNCell

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
]
