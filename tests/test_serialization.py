""".keras files across backends, and broken files."""

import os
import traceback
import zipfile

import keras
import numpy as np
import pytest

import keras_attnrnn
from helpers import BACKEND
from helpers import assert_close
from helpers import run_in_subprocess
from helpers import to_numpy

BACKENDS = ("jax", "tensorflow", "torch")


def _branches():
    """Every layer and cell of the package, as (name, layer) on (b, t, 6)."""
    branches = [
        ("attnrnn", keras_attnrnn.AttnRNN(8, num_heads=2, return_sequences=True)),
        ("attnrnn_cell", keras.layers.RNN(
            keras_attnrnn.AttnRNNCell(6, num_heads=3), return_sequences=True)),
    ]
    if hasattr(keras_attnrnn, "LARNN"):
        branches += [
            ("larnn", keras_attnrnn.LARNN(8, window=3, num_heads=2, return_sequences=True)),
            ("larnn_cell", keras.layers.RNN(
                keras_attnrnn.LARNNCell(6, window=2, num_heads=3), return_sequences=True)),
        ]
    if hasattr(keras_attnrnn, "Aaren"):
        branches += [
            ("aaren", keras_attnrnn.Aaren(8, num_heads=2, return_sequences=True)),
            ("aaren_cell", keras.layers.RNN(
                keras_attnrnn.AarenCell(6, num_heads=3), return_sequences=True)),
        ]
    if hasattr(keras_attnrnn, "AarenBlock"):
        branches.append(("aaren_block", keras_attnrnn.AarenBlock(6, num_heads=2)))
    return branches


def _model():
    inputs = keras.Input((None, 6))
    outputs = [layer(inputs) for _, layer in _branches()]
    return keras.Model(inputs, outputs)


def _randomize(model, rng):
    model.set_weights(
        [rng.normal(size=w.shape).astype("float32") * 0.3 for w in model.get_weights()]
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    rng = np.random.default_rng(7)
    folder = tmp_path_factory.mktemp("saved")
    model = _model()
    _randomize(model, rng)
    x = rng.normal(size=(2, 5, 6)).astype("float32")
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    expected = [to_numpy(o) for o in model(x)]
    path = str(folder / "model.keras")
    model.save(path)
    np.save(folder / "x.npy", x)
    np.save(folder / "mask.npy", mask)
    return folder, path, expected


@pytest.mark.parametrize("target", BACKENDS)
def test_load_on_every_backend_in_a_new_process(saved, target):
    folder, path, expected = saved
    got = run_in_subprocess(
        f"""
        import json, numpy as np, keras
        import keras_attnrnn
        model = keras.saving.load_model({path!r}, safe_mode=True)
        x = np.load({str(folder / 'x.npy')!r})
        print(json.dumps([keras.ops.convert_to_numpy(o).tolist() for o in model(x)]))
        """,
        backend=target,
    )
    assert len(got) == len(expected)
    for name, g, e in zip([n for n, _ in _branches()], got, expected):
        assert_close(np.array(g), e, 1e-5, f"{name} saved on {BACKEND}, loaded on {target}")


def _assert_raised_by_keras(error):
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if os.sep + "keras_attnrnn" + os.sep in f.filename
            or os.sep + "ops" + os.sep in f.filename and "keras" not in f.filename]
    assert not ours, f"the error came from our code: {ours[-1]}"


def test_truncated_file_gives_a_keras_error(saved, tmp_path):
    _, path, _ = saved
    data = open(path, "rb").read()
    broken = tmp_path / "truncated.keras"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception) as info:
        keras.saving.load_model(str(broken), safe_mode=True)
    _assert_raised_by_keras(info.value)


def test_corrupted_weights_give_a_keras_error(saved, tmp_path):
    _, path, _ = saved
    broken = tmp_path / "corrupted.keras"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith(".h5"):
                data = data[:64] + bytes(len(data) - 64)
            dst.writestr(item, data)
    with pytest.raises(Exception) as info:
        keras.saving.load_model(str(broken), safe_mode=True)
    _assert_raised_by_keras(info.value)


def test_unsafe_lambda_is_refused_even_with_our_layers(tmp_path):
    inputs = keras.Input((None, 4))
    x = keras_attnrnn.AttnRNN(4, num_heads=2)(inputs)
    model = keras.Model(inputs, keras.layers.Lambda(lambda v: v * 2)(x))
    path = str(tmp_path / "lambda.keras")
    model.save(path)
    with pytest.raises(ValueError, match="(?i)lambda|unsafe|safe_mode"):
        keras.saving.load_model(path, safe_mode=True)
