"""Export from the jax backend: ONNX (through jax2onnx) for every layer and
cell, and a SavedModel (through jax2tf) for LARNN and Aaren, each run in its
own runtime with Keras's outputs. jax2onnx, onnxruntime and TensorFlow are
not dependencies of the jax backend: the tests skip without them."""

import os
import sys

import pytest

from helpers import BACKEND
from helpers import assert_close
from helpers import export_and_run
from helpers import skip_unless_installed

# The layers and runtimes of examples/export_matrix.py (docs/export.md's table).
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from _runtimes import NEEDS  # noqa: E402
from export_matrix import BATCH  # noqa: E402
from export_matrix import FEATURES  # noqa: E402
from export_matrix import LAYERS  # noqa: E402
from export_matrix import TIME  # noqa: E402

pytestmark = pytest.mark.skipif(BACKEND != "jax", reason="exports from the jax backend")

# The cells of docs/export.md's jax table that work.
WORKS = {
    "onnx": list(LAYERS),
    # AttnRNN's erf is written by jax 0.10 as a StableHLO composite that
    # TensorFlow 2.21 cannot read (docs/export.md).
    "tf_saved_model": [name for name in LAYERS if "AttnRNN" not in name],
}


@pytest.mark.parametrize(
    "fmt, name", [(fmt, name) for fmt, names in WORKS.items() for name in names]
)
def test_export_runs_in_its_runtime(fmt, name, tmp_path, rng):
    skip_unless_installed(NEEDS["jax"][fmt])
    got, expected = export_and_run(LAYERS[name], fmt, tmp_path, rng, BATCH, TIME, FEATURES)
    assert_close(got, expected, 1e-5, f"{name} {fmt}")
