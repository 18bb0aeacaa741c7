"""Bad call arguments of the fused layers: each is a `ValueError` naming the
argument and the value received, on every implementation (nothing is
silently broadcast, cast or truncated). What `test_*_layer.py` already
checks (bad constructor arguments, the input rank, Aaren's mask of the wrong
length) is not repeated here."""

import re

import keras
import numpy as np
import pytest

import keras_attnrnn
from helpers import to_numpy

B, T, D, UNITS = 2, 3, 5, 8

MODELS = {
    "attnrnn": lambda **kw: keras_attnrnn.AttnRNN(UNITS, num_heads=2, **kw),
    "larnn": lambda **kw: keras_attnrnn.LARNN(UNITS, window=2, num_heads=2, **kw),
    "aaren": lambda **kw: keras_attnrnn.Aaren(UNITS, num_heads=2, **kw),
}
OPS = {"attnrnn": "attnrnn", "larnn": "larnn", "aaren": "aaren_scan"}
CASES = [
    pytest.param(model, mode, id=f"{model}-{mode}")
    for model in MODELS
    for mode in ("reference", "auto")
]


def _built(model, mode):
    layer = MODELS[model](implementation=mode, return_sequences=True)
    layer.build((None, None, D))
    return layer


def _x():
    return np.random.default_rng(0).normal(size=(B, T, D)).astype("float32")


MASK_SHAPES = {
    "time": (B, T + 1),
    "batch": (B + 1, T),
    "rank3": (B, T, 1),
    "rank1": (B * T,),
}


@pytest.mark.parametrize(
    "model, mode, shape",
    [
        pytest.param(model, mode, shape, id=f"{model}-{mode}-{name}")
        for model in MODELS
        for mode in ("reference", "auto")
        for name, shape in MASK_SHAPES.items()
        # (Aaren's wrong length: test_aaren_layer.py::test_bad_mask_shape.)
        if not (model == "aaren" and name == "time")
    ],
)
def test_mask_of_the_wrong_shape(model, mode, shape):
    layer = _built(model, mode)
    with pytest.raises(ValueError, match="`mask`.*" + re.escape(str(shape))):
        layer(_x(), mask=np.ones(shape, bool))


@pytest.mark.parametrize("model, mode", CASES)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_mask_of_a_float_dtype(model, mode, dtype):
    layer = _built(model, mode)
    # (Keras casts a float mask to the layer's float dtype before `call`.)
    with pytest.raises(ValueError, match="`mask`.*got dtype float"):
        layer(_x(), mask=np.ones((B, T), dtype))


@pytest.mark.parametrize("model, mode", CASES)
def test_integer_mask_is_a_boolean_mask(model, mode):
    """The check above rejects floats only: 0/1 integers are a mask."""
    layer = _built(model, mode)
    mask = np.array([[1, 0, 1], [0, 1, 1]])
    expected = to_numpy(layer(_x(), mask=mask.astype(bool)))
    np.testing.assert_allclose(to_numpy(layer(_x(), mask=mask.astype("int32"))), expected)


def _states(model, batch, bump=0, drop=0):
    sizes = MODELS[model]().cell.state_size
    sizes = sizes if isinstance(sizes, list) else [sizes]
    states = [np.zeros((batch, s + bump), "float32") for s in sizes]
    return states[: len(states) - drop]


@pytest.mark.parametrize("model, mode", CASES)
@pytest.mark.parametrize(
    "which", ["units", "batch", "count", "rank"],
)
def test_initial_state_of_the_wrong_shape(model, mode, which):
    layer = _built(model, mode)
    if which == "units":
        states = _states(model, B, bump=1)
        bad = tuple(states[0].shape)
    elif which == "batch":
        states = _states(model, B + 1)
        bad = tuple(states[0].shape)
    elif which == "count":
        states = _states(model, B, drop=1) or [np.zeros((B, UNITS), "float32")] * 2
        bad = [tuple(s.shape) for s in states]
    else:
        states = [s[None] for s in _states(model, B)]
        bad = tuple(states[0].shape)
    # The layer runs with the right states...
    layer(_x(), initial_state=_states(model, B))
    # ...and names the argument and what it received otherwise.
    with pytest.raises(ValueError, match=re.escape("`initial_state`") + ".*" + re.escape(str(bad))):
        layer(_x(), initial_state=states)


@pytest.mark.parametrize("model, mode", CASES + [
    pytest.param(m, "fused", id=f"{m}-fused") for m in MODELS
])
def test_feature_size_other_than_the_built_one(model, mode):
    layer = _built(model, mode)
    layer(_x())
    bad = np.zeros((B, T, D + 2), "float32")
    with pytest.raises(ValueError, match=re.escape("`inputs`") + ".*" + re.escape(str(bad.shape))):
        layer(bad)


@pytest.mark.parametrize("model", MODELS)
def test_unknown_implementation_lists_each_choice_once(model):
    with pytest.raises(ValueError) as info:
        MODELS[model](implementation="cuDNN")
    message = str(info.value)
    assert "`implementation`" in message and "'cuDNN'" in message
    choices = re.search(r"expected one of (\[.*?\])", message).group(1)
    names = re.findall(r"'([^']+)'", choices)
    assert len(names) == len(set(names)), names
    assert set(keras_attnrnn.ops.implementations(OPS[model])) <= set(names)


def test_aaren_block_rejects_an_unknown_implementation():
    with pytest.raises(ValueError, match="`implementation`.*'cuDNN'"):
        keras_attnrnn.AarenBlock(UNITS, implementation="cuDNN")


def test_symbolic_masks_are_checked_too():
    """A float mask is caught when the model is built, not at run time."""
    inputs = keras.Input((T, D))
    mask = keras.Input((T,), dtype="float32")
    with pytest.raises(ValueError, match="`mask`.*dtype float32"):
        MODELS["attnrnn"]()(inputs, mask=mask)
