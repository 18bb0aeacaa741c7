"""ETTh1, Electricity Transformer Temperature, hourly (Zhou et al., AAAI 2021).

17,420 hourly rows from 2016-07-01 of seven channels: six loads (HUFL, HULL,
MUFL, MULL, LUFL, LULL) and the oil temperature (OT). The conventions of the
forecasting literature (Informer, Autoformer, Time-Series-Library), for an
input length L:

* splits by row: train [0, 8640), validation [8640 - L, 11520), test
  [11520 - L, 14400) (12, 4 and 4 months of 30 days; each later split starts
  L rows early so that its first window's target follows the previous
  split);
* a `StandardScaler` (mean and population standard deviation per channel)
  fitted on the train rows only, applied to every split; metrics (MSE, MAE)
  on the scaled values of all seven channels (the "M" setting);
* windows with stride 1: the input is L consecutive rows, the target the H
  rows that follow.

The file is `etth1/ETTh1.csv` in the data folder (see `_files.py`),
downloaded from the ETDataset repository when absent.

Example:

>>> (x_train, y_train), (x_val, y_val), (x_test, y_test) = (
...     keras_attnrnn.datasets.etth1.load_data(input_length=96, horizon=336))
>>> x_train.shape, y_train.shape, x_test.shape
((8209, 96, 7), (8209, 336, 7), (2545, 96, 7))
"""

import numpy as np

from keras_attnrnn.datasets import _files

DATASET = "etth1"
FILE = "ETTh1.csv"
ORIGIN = (
    "https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/"
    "ETT-small/ETTh1.csv"
)
MD5 = "8381763947c85f4be6ac456c508460d6"
COLUMNS = ("HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT")
TRAIN_END = 12 * 30 * 24
VAL_END = TRAIN_END + 4 * 30 * 24
TEST_END = VAL_END + 4 * 30 * 24
SPLITS = ("train", "val", "test")


def _path(data_dir):
    found = _files.find(DATASET, [FILE], data_dir)
    if FILE in found:
        return found[FILE]
    return _files.download(
        DATASET, FILE, ORIGIN, file_hash=MD5, data_dir=data_dir, hint=FILE
    )


def load_frame(data_dir=None):
    """The raw table: `(dates, values)`.

    Returns:
        dates: (17420,) strings "YYYY-MM-DD HH:MM:SS".
        values: (17420, 7) float64, the columns of `COLUMNS`, unscaled.
    """
    path = _path(data_dir)
    with open(path) as f:
        header = f.readline().strip().split(",")
    if tuple(header[1:]) != COLUMNS:
        raise ValueError(
            f"{path} is not ETTh1: expected the columns date,"
            f"{','.join(COLUMNS)}, got {','.join(header)}."
        )
    dates = np.loadtxt(path, delimiter=",", skiprows=1, usecols=0, dtype=str)
    values = np.loadtxt(
        path, delimiter=",", skiprows=1, usecols=range(1, 1 + len(COLUMNS))
    )
    return dates, values


def split_bounds(input_length):
    """`{split: (start, end)}` rows of each split for this input length."""
    if input_length < 1 or input_length > TRAIN_END:
        raise ValueError(
            "Received an invalid value for argument `input_length`, expected "
            f"an integer in [1, {TRAIN_END}], got {input_length!r}."
        )
    return {
        "train": (0, TRAIN_END),
        "val": (TRAIN_END - input_length, VAL_END),
        "test": (VAL_END - input_length, TEST_END),
    }


def scaler(data_dir=None):
    """`(mean, std)` per channel, fitted on the train rows only."""
    train = load_frame(data_dir)[1][:TRAIN_END]
    return train.mean(axis=0), train.std(axis=0)


def load_splits(input_length=96, data_dir=None, dtype="float32"):
    """The scaled rows of each split.

    Returns:
        `({"train": rows, "val": rows, "test": rows}, (mean, std))`: rows
        (n, 7) standardized with the train rows' mean and std (population),
        and that scaler (to undo it: `rows * std + mean`).
    """
    values = load_frame(data_dir)[1]
    mean, std = values[:TRAIN_END].mean(axis=0), values[:TRAIN_END].std(axis=0)
    scaled = (values - mean) / std
    rows = {
        split: scaled[start:end].astype(dtype)
        for split, (start, end) in split_bounds(input_length).items()
    }
    return rows, (mean, std)


def windows(rows, input_length, horizon):
    """`(x, y)`: every window of `input_length` rows and the `horizon` after.

    x: (n, input_length, c), y: (n, horizon, c), n = len(rows) -
    input_length - horizon + 1 (copies, so they can be shuffled and fed).
    """
    if horizon < 1:
        raise ValueError(
            "Received an invalid value for argument `horizon`, expected a "
            f"positive integer, got {horizon!r}."
        )
    count = len(rows) - input_length - horizon + 1
    if count < 1:
        raise ValueError(
            f"Received input_length={input_length} and horizon={horizon}: "
            f"longer than the {len(rows)} rows of the split."
        )
    view = np.lib.stride_tricks.sliding_window_view(
        rows, input_length + horizon, axis=0
    )  # (count, c, input_length + horizon)
    view = np.swapaxes(view, 1, 2)
    return (
        np.ascontiguousarray(view[:, :input_length]),
        np.ascontiguousarray(view[:, input_length:]),
    )


def load_data(input_length=96, horizon=96, data_dir=None, dtype="float32"):
    """The windows of the three standard splits, scaled.

    Args:
        input_length: Positive integer L, the steps the model sees.
            Default: 96.
        horizon: Positive integer H, the steps to forecast (the literature
            uses 96, 192, 336 and 720). Default: 96.
        data_dir: Folder holding `etth1/ETTh1.csv`; default: the
            `KERAS_ATTNRNN_DATA` environment variable, else the Keras cache.
        dtype: Float dtype of the arrays. Default: `"float32"`.

    Returns:
        `((x_train, y_train), (x_val, y_val), (x_test, y_test))`: x
        (n, L, 7) and y (n, H, 7), standardized with the train rows' scaler
        (`scaler()`); n = 8640 - L - H + 1 for train and 2881 - H for the
        validation and test splits.
    """
    rows, _ = load_splits(input_length, data_dir, dtype)
    return tuple(windows(rows[split], input_length, horizon) for split in SPLITS)
