"""Export from the torch backend: `model.export(path, format="torch")` writes a
`torch.export` program that `torch.export.load` runs with Keras's outputs.

The fused layers' native kernels (the AttnRNN C++ loop, LARNN's
`autograd.Function`) cannot be traced: while torch traces, they decline and
a traceable implementation serves the call, so export needs no setting.
"""

import os
import sys

import keras
import pytest

import keras_attnrnn
from helpers import BACKEND
from helpers import assert_close
from helpers import export_and_run
from helpers import skip_unless_installed
from helpers import to_numpy

# The runtimes are called as examples/export_matrix.py (docs/export.md's
# table) calls them.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from _runtimes import NEEDS  # noqa: E402
from export_matrix import SUFFIX  # noqa: E402
from export_matrix import _run_artifact  # noqa: E402

pytestmark = pytest.mark.skipif(
    BACKEND != "torch", reason="torch.export runs on the torch backend"
)

BATCH, TIME, FEATURES = 2, 5, 4

# export_matrix.py's layers, returning every step's output.
LAYERS = {
    "AttnRNN": lambda: keras_attnrnn.AttnRNN(8, num_heads=2, return_sequences=True),
    "LARNN": lambda: keras_attnrnn.LARNN(8, window=3, num_heads=2, return_sequences=True),
    "Aaren": lambda: keras_attnrnn.Aaren(8, num_heads=2, return_sequences=True),
}
CELLS = {
    "RNN(AttnRNNCell)": lambda: keras.layers.RNN(
        keras_attnrnn.AttnRNNCell(8, num_heads=2), return_sequences=True
    ),
    "RNN(LARNNCell)": lambda: keras.layers.RNN(
        keras_attnrnn.LARNNCell(8, window=3, num_heads=2), return_sequences=True
    ),
    "RNN(AarenCell)": lambda: keras.layers.RNN(
        keras_attnrnn.AarenCell(8, num_heads=2), return_sequences=True
    ),
}
# The cells of docs/export.md's torch table that work, besides "torch".
WORKS = {
    "onnx": ["RNN(AttnRNNCell)", "AttnRNN", "RNN(LARNNCell)", "LARNN",
             "RNN(AarenCell)", "Aaren"],
    "openvino": ["RNN(AttnRNNCell)", "AttnRNN", "RNN(LARNNCell)", "LARNN",
                 "RNN(AarenCell)", "Aaren"],
    "litert": ["RNN(AttnRNNCell)", "AttnRNN", "RNN(LARNNCell)", "LARNN",
               "RNN(AarenCell)", "Aaren"],
}
NATIVE = {"AttnRNN": ("attnrnn", "torch_cpp"), "LARNN": ("larnn", "torch_cpu")}


def _implementation(op, name):
    from keras_attnrnn.ops import REGISTRY

    return {impl.name: impl for impl in REGISTRY.implementations(op)}[name]


@pytest.mark.parametrize("name", list(LAYERS))
def test_torch_export_runs_in_torch(name, tmp_path, rng):
    from keras_attnrnn import ops as kops

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((TIME, FEATURES), batch_size=BATCH),
        LAYERS[name](),
        keras.layers.Dense(2),
    ])
    x = rng.normal(size=(BATCH, TIME, FEATURES)).astype("float32")
    expected = to_numpy(model(x))
    if name in NATIVE:
        op, native = NATIVE[name]
        # The eager call ran the native kernel, unless it could not build.
        available, _ = _implementation(op, native).available()
        assert kops.selected(op) == (native if available else "reference")
    path = str(tmp_path / ("model" + SUFFIX["torch"]))
    spec = keras.InputSpec(shape=(BATCH, TIME, FEATURES), dtype="float32")
    model.export(path, format="torch", verbose=False, input_signature=[spec])
    if name in NATIVE:
        # While torch traced, the native kernel declined.
        assert kops.selected(op) == "reference"
    got = _run_artifact("torch", path, x)
    assert_close(got, expected, 1e-5, f"{name} torch.export")
    # The eager layer afterwards runs its native kernel again.
    if name in NATIVE:
        model(x)
        assert kops.selected(op) == (native if available else "reference")


def test_traced_call_declines_native_kernels():
    """The registry sees `traced` in a call while torch compiles, and the
    native kernels decline it with a reason."""
    import torch

    from keras_attnrnn.ops import _dispatch

    assert _dispatch.traced() is False
    seen = []

    def f(x):
        seen.append(_dispatch.traced())
        return x + 1

    torch.compile(f, backend="eager", fullgraph=False)(torch.ones(2))
    assert seen == [True]
    impl = _implementation("larnn", "torch_cpu")
    ok, why = impl.supports({"dtype": "float32", "recurrent_dropout": False, "traced": True})
    assert not ok and "traced" in why


@pytest.mark.parametrize(
    "fmt, name", [(fmt, name) for fmt, names in WORKS.items() for name in names]
)
def test_export_runs_in_its_runtime(fmt, name, tmp_path, rng):
    """ONNX Runtime, OpenVINO and LiteRT run the exported model with Keras's
    outputs (their packages are not dependencies: skipped without)."""
    skip_unless_installed(NEEDS["torch"][fmt])
    got, expected = export_and_run({**LAYERS, **CELLS}[name], fmt, tmp_path, rng,
                                   BATCH, TIME, FEATURES)
    assert_close(got, expected, 1e-5, f"{name} {fmt}")
