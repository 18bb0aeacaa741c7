"""The UCI HAR loader, on small synthetic folders of the standard layout."""

import os
import zipfile

import numpy as np
import pytest

from keras_attnrnn.datasets import uci_har

SIZES = {"train": 5, "test": 3}


def _write_folder(root, rng):
    """A small "UCI HAR Dataset" folder; returns what each split holds."""
    folder = os.path.join(root, uci_har.FOLDER)
    expected = {}
    for split, n in SIZES.items():
        signals = os.path.join(folder, split, "Inertial Signals")
        os.makedirs(signals)
        x = rng.normal(size=(n, uci_har.STEPS, 9)).astype("float32")
        labels = rng.integers(1, 7, size=n)
        for i, name in enumerate(uci_har.SIGNALS):
            # The UCI files: two spaces, then each value as "%.7e".
            np.savetxt(
                os.path.join(signals, f"{name}_{split}.txt"),
                x[..., i],
                fmt="%15.7e",
                delimiter=" ",
            )
        np.savetxt(os.path.join(folder, split, f"y_{split}.txt"), labels, fmt="%d")
        expected[split] = (x, labels - 1)
    return folder, expected


@pytest.fixture
def data_dir(tmp_path, monkeypatch, rng):
    """`<tmp>/data/uci_har/UCI HAR Dataset`, and a private Keras cache."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.delenv("KERAS_ATTNRNN_DATA", raising=False)
    root = tmp_path / "data" / "uci_har"
    root.mkdir(parents=True)
    _, expected = _write_folder(str(root), rng)
    return str(tmp_path / "data"), expected


def _check(loaded, expected):
    for (x, y), split in zip(loaded, ("train", "test")):
        x_expected, y_expected = expected[split]
        assert x.dtype == np.float32 and x.shape == (SIZES[split], 128, 9)
        assert y.dtype == np.int64
        np.testing.assert_allclose(x, x_expected, rtol=1e-6)
        np.testing.assert_array_equal(y, y_expected)
        assert y.min() >= 0 and y.max() <= 5


def test_reads_the_standard_folder(data_dir):
    path, expected = data_dir
    _check(uci_har.load_data(data_dir=path), expected)


def test_data_folder_from_the_environment(data_dir, monkeypatch):
    path, expected = data_dir
    monkeypatch.setenv("KERAS_ATTNRNN_DATA", path)
    _check(uci_har.load_data(), expected)


def test_signals_are_loaded_in_the_order_asked(data_dir):
    path, expected = data_dir
    (x, _), _ = uci_har.load_data(path, signals=("total_acc_z", "body_acc_x"))
    np.testing.assert_allclose(x[..., 0], expected["train"][0][..., 8], rtol=1e-6)
    np.testing.assert_allclose(x[..., 1], expected["train"][0][..., 0], rtol=1e-6)


@pytest.mark.parametrize("nested", [False, True], ids=["zip", "nested-zip"])
def test_reads_the_zip_into_the_keras_cache(tmp_path, monkeypatch, rng, nested):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    folder, expected = _write_folder(str(tmp_path / "src"), rng)
    data = tmp_path / "data" / "uci_har"
    data.mkdir(parents=True)
    inner = tmp_path / uci_har.ARCHIVES[0]
    with zipfile.ZipFile(inner, "w") as archive:
        for base, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(base, name)
                archive.write(path, os.path.relpath(path, str(tmp_path / "src")))
    if nested:  # the UCI repository's current download wraps the zip
        with zipfile.ZipFile(data / uci_har.ARCHIVES[1], "w") as archive:
            archive.write(inner, uci_har.ARCHIVES[0])
    else:
        os.replace(inner, data / uci_har.ARCHIVES[0])
    _check(uci_har.load_data(data_dir=str(tmp_path / "data")), expected)
    # The data folder is left as it was; the unpacked copy is in the cache.
    assert sorted(os.listdir(data)) == [uci_har.ARCHIVES[1 if nested else 0]]
    assert uci_har.dataset_folder(str(tmp_path / "data")).startswith(
        str(tmp_path / "keras")
    )


def test_missing_data_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(uci_har, "ORIGIN", (tmp_path / "nowhere.zip").as_uri())
    with pytest.raises(FileNotFoundError) as error:
        uci_har.load_data(data_dir=str(tmp_path / "empty"))
    message = str(error.value)
    assert os.path.join(str(tmp_path / "empty"), "uci_har") in message
    assert "UCI HAR Dataset" in message and "KERAS_ATTNRNN_DATA" in message


def test_rejects_unknown_signals(data_dir):
    with pytest.raises(ValueError, match="`signals`.*body_acc_w"):
        uci_har.load_data(data_dir[0], signals=("body_acc_w",))


def test_rejects_inconsistent_files(data_dir):
    path = os.path.join(data_dir[0], "uci_har", uci_har.FOLDER, "test", "y_test.txt")
    np.savetxt(path, [1, 2], fmt="%d")
    with pytest.raises(ValueError, match="3 windows.*2 labels"):
        uci_har.load_data(data_dir[0])
    np.savetxt(path, [1, 2, 7], fmt="%d")
    with pytest.raises(ValueError, match="not in 1..6"):
        uci_har.load_data(data_dir[0])


def _example():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "uci_har.py")
    spec = importlib.util.spec_from_file_location("uci_har_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_trains_and_reports_test_accuracy(data_dir, tmp_path):
    output = str(tmp_path / "har.keras")
    accuracy = _example().main([
        "--data-dir", data_dir[0], "--epochs", "1", "--units", "8",
        "--window", "4", "--heads", "2", "--layers", "1", "--batch-size", "8",
        "--output", output,
    ])
    assert 0.0 <= accuracy <= 1.0
    assert os.path.exists(output)


def test_example_without_data_exits_with_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(uci_har, "ORIGIN", (tmp_path / "nowhere.zip").as_uri())
    with pytest.raises(SystemExit) as exit_info:
        _example().main(["--data-dir", str(tmp_path / "empty")])
    assert exit_info.value.code == 2
    assert "uci_har" in capsys.readouterr().err
