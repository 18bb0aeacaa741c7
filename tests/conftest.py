import logging
import os

import pytest

from helpers import SHARED

# The offline datasets of the project machines, unless the caller chose.
if os.path.isdir(os.path.join(SHARED, "data")):
    os.environ.setdefault("KERAS_ATTNRNN_DATA", os.path.join(SHARED, "data"))


@pytest.fixture(autouse=True)
def _fresh_registry_choices():
    """Each test sees only the implementation choices it made itself."""
    from keras_attnrnn.ops import REGISTRY

    REGISTRY.reset()
    yield


@pytest.fixture
def rng(request):
    """A NumPy generator seeded by the test's name: fresh, but reproducible."""
    import zlib

    import numpy as np

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def pytest_report_header(config):
    import keras

    logging.getLogger("keras_attnrnn.ops").setLevel(logging.INFO)
    return f"keras {keras.version()}, backend {keras.config.backend()}"
