"""Offline-first loaders for the datasets of the examples.

Each loader reads `<data folder>/<dataset>/`: the `data_dir` argument, else
the `KERAS_ATTNRNN_DATA` environment variable, else the Keras cache, where the
files are downloaded from their official source when absent.
"""

from keras_attnrnn.datasets import etth1
from keras_attnrnn.datasets import imdb
from keras_attnrnn.datasets import uea
from keras_attnrnn.datasets import uci_har

__all__ = ["etth1", "imdb", "uci_har", "uea"]
