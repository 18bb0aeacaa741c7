"""AttnRNN against the public PyTorch code, through the golden files.

../shared/golden holds outputs and gradients of the public AttnRNN code
(float64, random weights) in our weight names. The cell in `keras.layers.RNN`
and the fused `AttnRNN` layer (every implementation) must reproduce them.
"""

import glob
import os

import keras
import numpy as np
import pytest

import keras_attnrnn
from helpers import BACKEND
from helpers import FLOAT64_BACKENDS
from helpers import SHARED
from helpers import assert_close
from helpers import layer_value_and_grads

GOLDEN = sorted(glob.glob(os.path.join(SHARED, "golden", "attnrnn_*.npz")))
WEIGHTS = (
    "input_kernel",
    "input_bias",
    "query_kernel",
    "query_bias",
    "output_kernel",
    "output_bias",
    "gate_kernel",
    "gate_bias",
    "gamma",
    "beta",
)
# float32 reproduces the float64 reference to ~1e-6; float64 to ~1e-12.
TOLERANCE = {"float32": 2e-5, "float64": 1e-10}
DTYPES = ["float32"] + (["float64"] if BACKEND in FLOAT64_BACKENDS else [])


def test_golden_files_are_present():
    assert len(GOLDEN) >= 2, f"no golden files in {SHARED}/golden"


def _layers(case):
    units, heads = int(case["units"]), int(case["num_heads"])
    yield "cell", lambda dtype: keras.layers.RNN(
        keras_attnrnn.AttnRNNCell(units, num_heads=heads, dtype=dtype),
        return_sequences=True,
        return_state=True,
        dtype=dtype,
    )
    for name in keras_attnrnn.ops.implementations("attnrnn", BACKEND, "cpu"):
        yield name, lambda dtype, name=name: keras_attnrnn.AttnRNN(
            units,
            num_heads=heads,
            return_sequences=True,
            return_state=True,
            implementation=name,
            dtype=dtype,
        )


def _cases():
    for path in GOLDEN:
        case = dict(np.load(path))
        for kind, make in _layers(case):
            for dtype in DTYPES:
                yield pytest.param(
                    path, make, dtype, id=f"{os.path.basename(path)}-{kind}-{dtype}"
                )


@pytest.mark.parametrize("path, make_layer, dtype", list(_cases()))
def test_matches_public_reference(path, make_layer, dtype):
    case = dict(np.load(path))
    x = case["x"].astype(dtype)
    h0 = case.get("initial_state")
    h0 = None if h0 is None else h0.astype(dtype)
    layer = make_layer(dtype)
    layer.build(x.shape)
    names = [v.path.split("/")[-1] for v in layer.weights]
    assert sorted(names) == sorted(w for w in WEIGHTS if w in case)
    for variable, name in zip(layer.weights, names):
        variable.assign(case[name].astype(dtype))

    cotangents = [
        case["cotangent_outputs"].astype(dtype),
        case["cotangent_final_state"].astype(dtype),
    ]
    (outputs, final_state), gx, gh0, gw = layer_value_and_grads(
        layer, x, h0, cotangents
    )
    tol = TOLERANCE[dtype]
    assert_close(outputs, case["outputs"], tol, "outputs")
    assert_close(final_state, case["final_state"], tol, "final_state")
    assert_close(gx, case["grad_x"], tol, "grad_x")
    if h0 is not None:
        assert_close(gh0, case["grad_initial_state"], tol, "grad_initial_state")
    for name in names:
        assert_close(gw[name], case[f"grad_{name}"], tol, f"grad_{name}")
