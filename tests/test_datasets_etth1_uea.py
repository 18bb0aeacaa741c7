"""The ETTh1 and UEA loaders on the real files of the data folder."""

import os

import keras
import numpy as np
import pytest

from keras_attnrnn.datasets import etth1
from keras_attnrnn.datasets import uea


def _raw_etth1():
    path = os.path.join(os.environ["KERAS_ATTNRNN_DATA"], "etth1", "ETTh1.csv")
    return np.loadtxt(path, delimiter=",", skiprows=1, usecols=range(1, 8))


@pytest.mark.parametrize(
    "input_length, horizon, sizes",
    [(96, 96, (8449, 2785, 2785)), (96, 336, (8209, 2545, 2545)), (48, 720, (7873, 2161, 2161))],
)
def test_etth1_standard_split_sizes(input_length, horizon, sizes):
    splits = etth1.load_data(input_length, horizon)
    for (x, y), n in zip(splits, sizes):
        assert x.shape == (n, input_length, 7) and y.shape == (n, horizon, 7)
        assert x.dtype == y.dtype == np.float32


def test_etth1_scaler_is_fit_on_train_rows_only():
    raw = _raw_etth1()
    assert raw.shape == (17420, 7)
    mean, std = etth1.scaler()
    np.testing.assert_allclose(mean, raw[:8640].mean(0))
    np.testing.assert_allclose(std, raw[:8640].std(0))
    # Not the statistics of all rows (the test period differs).
    assert np.abs(mean - raw[:14400].mean(0)).max() > 0.1
    rows, (mean2, std2) = etth1.load_splits(96)
    np.testing.assert_array_equal(mean, mean2)
    np.testing.assert_allclose(rows["train"].mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(rows["train"].std(0), 1, atol=1e-4)
    assert np.abs(rows["test"].mean(0)).max() > 0.1
    expected = ((raw - mean) / std).astype("float32")
    np.testing.assert_array_equal(rows["val"], expected[8640 - 96 : 11520])
    np.testing.assert_array_equal(rows["test"], expected[11520 - 96 : 14400])


def test_etth1_windows_follow_each_other():
    raw = _raw_etth1()
    mean, std = etth1.scaler()
    scaled = ((raw - mean) / std).astype("float32")
    (x, y), (xv, yv), (xt, yt) = etth1.load_data(96, 192)
    np.testing.assert_array_equal(x[0], scaled[:96])
    np.testing.assert_array_equal(y[0], scaled[96:288])
    np.testing.assert_array_equal(x[5], scaled[5:101])
    np.testing.assert_array_equal(x[-1], scaled[8640 - 288 : 8640 - 192])
    np.testing.assert_array_equal(y[-1][-1], scaled[8639])
    # A later split's first target follows the previous split's rows.
    np.testing.assert_array_equal(yv[0][0], scaled[8640])
    np.testing.assert_array_equal(yt[0][0], scaled[11520])
    np.testing.assert_array_equal(yt[-1][-1], scaled[14399])


def test_etth1_bad_arguments():
    with pytest.raises(ValueError, match="horizon.*0"):
        etth1.load_data(96, 0)
    with pytest.raises(ValueError, match="input_length.*0"):
        etth1.load_data(0, 96)
    with pytest.raises(ValueError, match="input_length=96 and horizon=3000"):
        etth1.load_data(96, 3000)


def test_missing_files_give_a_clear_error(tmp_path, monkeypatch):
    """No file anywhere and no network: an error that says where to put it
    (the download is simulated failing, and the cache is a temporary one)."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(FileNotFoundError, match="etth1.*ETTh1.csv.*KERAS_ATTNRNN_DATA"):
        etth1.load_data(data_dir=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="uea.*BasicMotions_TRAIN.ts"):
        uea.load_data("BasicMotions", data_dir=str(tmp_path / "empty"))


def test_uea_japanese_vowels_labels_and_masks():
    (x, y, mask), (xt, yt, mt) = uea.load_data("JapaneseVowels")
    assert x.shape == (270, 29, 12) and xt.shape == (370, 29, 12)
    assert uea.class_names("JapaneseVowels") == [str(i) for i in range(1, 10)]
    # Label "1" is 0, ..., "9" is 8; 30 training utterances per speaker.
    np.testing.assert_array_equal(np.bincount(y), [30] * 9)
    np.testing.assert_array_equal(np.bincount(yt), [31, 35, 88, 44, 29, 24, 40, 50, 29])
    lengths = np.concatenate([mask.sum(1), mt.sum(1)])
    assert lengths.min() == 7 and lengths.max() == 29
    # Masks are a prefix of True; padding is zeros.
    np.testing.assert_array_equal(mask, np.arange(29) < mask.sum(1, keepdims=True))
    assert np.all(x[~mask] == 0) and np.all(np.abs(x[mask]).sum(-1) > 0)
    first_line = _first_data_line("JapaneseVowels", "TRAIN")
    dims = first_line.split(":")[:-1]
    assert len(dims) == 12 and mask[0].sum() == len(dims[0].split(","))
    np.testing.assert_allclose(x[0, : mask[0].sum(), 1], [float(v) for v in dims[1].split(",")])
    padded, padded_mask = uea.load_data("JapaneseVowels", maxlen=32, pad_value=-1.0)[0][::2]
    assert padded.shape == (270, 32, 12) and np.all(padded[~padded_mask] == -1.0)
    with pytest.raises(ValueError, match="maxlen=20.*29 steps"):
        uea.load_data("JapaneseVowels", maxlen=20)


def test_uea_basic_motions_label_order_follows_the_header():
    (x, y, mask), (xt, yt, mt) = uea.load_data("BasicMotions")
    assert x.shape == (40, 100, 6) and xt.shape == (40, 100, 6)
    assert mask.all() and mt.all()
    names = uea.class_names("BasicMotions")
    assert names == ["Standing", "Running", "Walking", "Badminton"]
    label = _first_data_line("BasicMotions", "TRAIN").split(":")[-1]
    assert y[0] == names.index(label)
    np.testing.assert_array_equal(np.bincount(y), [10] * 4)


def test_read_ts_variable_lengths_missing_values_and_label_order(tmp_path):
    path = tmp_path / "Toy_TRAIN.ts"
    path.write_text(
        "# a comment\n@problemName Toy\n@timeStamps false\n@missing true\n"
        "@univariate false\n@dimensions 2\n@equalLength false\n"
        "@classLabel true b a\n@data\n"
        "1,2,3:4,5,6:a\n7,?:8,9:b\n"
    )
    series, labels, header = uea.read_ts(str(path))
    assert header["classlabel"] == ["b", "a"] and header["problemname"] == "Toy"
    assert labels == ["a", "b"]
    np.testing.assert_array_equal(series[0], [[1, 4], [2, 5], [3, 6]])
    assert np.isnan(series[1][1, 0]) and series[1][1, 1] == 9
    x, mask = uea.pad(series)
    assert x.shape == (2, 3, 2)
    np.testing.assert_array_equal(mask, [[True, True, True], [True, True, False]])
    path.write_text("@classLabel true a\n@data\n1,2:3:a\n")
    with pytest.raises(ValueError, match="differ in length"):
        uea.read_ts(str(path))


def _first_data_line(name, split):
    path = os.path.join(
        os.environ["KERAS_ATTNRNN_DATA"], "uea", name, f"{name}_{split}.ts"
    )
    with open(path) as f:
        lines = iter(f)
        for line in lines:
            if line.strip().lower() == "@data":
                return next(lines).strip()
