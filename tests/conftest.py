import getpass
import logging
import os
import tempfile

# On jax, XLA compiles the same small programs again and again: in each test's
# fresh layer, in each xdist worker and in each example's or load check's
# subprocess (which inherit this environment). A persistent compilation cache
# shared by all of them compiles each program once per machine; the cache key
# covers the program, the compile options and the jax version. Set before the
# first import of keras (and so of jax).
_JAX_CACHE = os.path.join(tempfile.gettempdir(), f"keras_attnrnn_jax_cache_{getpass.getuser()}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _JAX_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# xdist runs a worker per core, and each worker's (and each of its example
# subprocesses') torch and TensorFlow thread pools would take every core:
# oversubscribed pools spin, and two torch IMDB smoke runs side by side took
# 335 s each instead of 68 s on a 2-core machine. Share the cores instead.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
# Torch only: on tensorflow, a worker that then imported torch crashed.
if _WORKERS > 1 and os.environ.get("KERAS_BACKEND") == "torch":
    _THREADS = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, _THREADS)
# The example smoke runs checkpoint under runs/ (issue 14): keep them out of the clone.
os.environ.setdefault(
    "KERAS_ATTNRNN_RUNS_DIR", tempfile.mkdtemp(prefix="keras_attnrnn_runs_")
)

import pytest  # noqa: E402

from helpers import SHARED  # noqa: E402

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
    header = f"keras {keras.version()}, backend {keras.config.backend()}"
    if keras.config.backend() == "jax":
        header += f", jax compilation cache {os.environ['JAX_COMPILATION_CACHE_DIR']}"
    return header
