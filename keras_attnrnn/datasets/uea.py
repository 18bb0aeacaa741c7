"""Datasets of the UEA multivariate time series classification archive.

Read from the archive's sktime `.ts` files, `uea/<Name>/<Name>_TRAIN.ts` and
`uea/<Name>/<Name>_TEST.ts` in the data folder (see `_files.py`; when absent
they are downloaded from timeseriesclassification.com into the Keras cache).
The archive's own train/test split is kept. Class labels, strings in the
files, are mapped to 0..C-1 in the order of the `@classLabel` header line.
Series of different lengths (e.g. JapaneseVowels, 7 to 29 steps) are padded
at the end to a common length, with a mask marking the real steps.

Example:

>>> (x_train, y_train, mask_train), (x_test, y_test, mask_test) = (
...     keras_attnrnn.datasets.uea.load_data("JapaneseVowels"))
>>> x_train.shape, y_train[:3], mask_train.sum(axis=1)[:3]
((270, 29, 12), array([0, 0, 0]), array([20, 26, 22]))
>>> keras_attnrnn.datasets.uea.class_names("BasicMotions")
['Standing', 'Running', 'Walking', 'Badminton']
"""

import os
import zipfile

import numpy as np

from keras_attnrnn.datasets import _files

DATASET = "uea"
ORIGIN = "https://timeseriesclassification.com/aeon-toolkit/{name}.zip"
SPLITS = ("TRAIN", "TEST")


def read_ts(path):
    """Parses one sktime `.ts` file.

    Returns:
        `(series, labels, header)`: a list of (t_i, c) float64 arrays (NaN
        for the missing values written "?"), the label strings, and the
        header (`{"problemname": ..., "classlabel": [...], ...}`, keys in
        lower case).
    """
    header = {}
    series, labels = [], []
    in_data = False
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if not in_data:
                if not line.startswith("@"):
                    raise ValueError(f"{path}:{number}: expected a header line, got {line[:40]!r}.")
                key, _, rest = line[1:].partition(" ")
                key = key.lower()
                if key == "data":
                    in_data = True
                elif key == "classlabel":
                    flag, *names = rest.split()
                    header[key] = names if flag.lower() == "true" else None
                else:
                    header[key] = rest.strip()
                continue
            if header.get("timestamps", "false").lower() == "true":
                raise ValueError(f"{path}: time-stamped .ts files are not supported.")
            *dims, label = line.split(":")
            if header.get("classlabel") is None:
                dims.append(label)
                label = None
            channels = [
                np.array(
                    [np.nan if v == "?" else float(v) for v in dim.split(",")]
                )
                for dim in dims
            ]
            if len({len(c) for c in channels}) != 1:
                raise ValueError(
                    f"{path}:{number}: the dimensions of a case differ in length."
                )
            series.append(np.stack(channels, axis=-1))
            labels.append(label)
    if not in_data:
        raise ValueError(f"{path}: no @data section.")
    return series, labels, header


def _paths(name, data_dir):
    names = [f"{name}/{name}_{split}.ts" for split in SPLITS]
    found = _files.find(DATASET, names, data_dir)
    if len(found) < len(names):
        archive = _files.download(
            DATASET,
            f"{name}.zip",
            ORIGIN.format(name=name),
            data_dir=data_dir,
            hint=f"{name}/{name}_TRAIN.ts and {name}/{name}_TEST.ts",
        )
        target = os.path.join(_files.keras_cache_data_dir(), DATASET, name)
        os.makedirs(target, exist_ok=True)
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                base = os.path.basename(member)
                if base in {os.path.basename(n) for n in names}:
                    with open(os.path.join(target, base), "wb") as out:
                        out.write(zf.read(member))
        found = _files.find(DATASET, names, data_dir)
        if len(found) < len(names):
            raise FileNotFoundError(
                f"{archive} does not hold {name}_TRAIN.ts and {name}_TEST.ts."
            )
    return [found[n] for n in names]


def class_names(name, data_dir=None):
    """The class labels in the order of the `@classLabel` header line."""
    return read_ts(_paths(name, data_dir)[0])[2]["classlabel"]


def pad(series, maxlen=None, pad_value=0.0, dtype="float32"):
    """`(x, mask)`: series (t_i, c) padded at the end to (n, maxlen, c).

    `maxlen` defaults to the longest series; a longer one is an error.
    """
    longest = max(len(s) for s in series)
    maxlen = longest if maxlen is None else maxlen
    if longest > maxlen:
        raise ValueError(
            f"Received maxlen={maxlen}, but a series has {longest} steps; "
            "nothing is truncated."
        )
    x = np.full((len(series), maxlen, series[0].shape[-1]), pad_value, dtype)
    mask = np.zeros((len(series), maxlen), bool)
    for i, s in enumerate(series):
        x[i, : len(s)] = s
        mask[i, : len(s)] = True
    return x, mask


def load_data(name, data_dir=None, maxlen=None, pad_value=0.0, dtype="float32"):
    """A UEA dataset's train and test splits.

    Args:
        name: The archive's name of the dataset, e.g. `"JapaneseVowels"`,
            `"BasicMotions"`.
        data_dir: Folder holding `uea/<name>/`; default: the
            `KERAS_ATTNRNN_DATA` environment variable, else the Keras cache.
        maxlen: Length to pad every series to. Default: the longest series
            of either split.
        pad_value: Value of the padded steps. Default: 0.
        dtype: Float dtype of the series. Default: `"float32"`.

    Returns:
        `((x_train, y_train, mask_train), (x_test, y_test, mask_test))`: x
        (n, maxlen, channels), y (n,) int labels in 0..C-1 in the order of
        the `@classLabel` header, mask (n, maxlen) booleans, True for real
        steps.
    """
    parsed = [read_ts(path) for path in _paths(name, data_dir)]
    classes = parsed[0][2].get("classlabel")
    if not classes:
        raise ValueError(f"{name} has no class labels (@classLabel false).")
    index = {label: i for i, label in enumerate(classes)}
    longest = max(len(s) for series, _, _ in parsed for s in series)
    if maxlen is not None and maxlen < longest:
        raise ValueError(
            f"Received maxlen={maxlen}, but {name} has series of {longest} "
            "steps; nothing is truncated."
        )
    maxlen = longest if maxlen is None else maxlen
    result = []
    for series, labels, _ in parsed:
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise ValueError(
                f"{name}: labels {unknown} are not in the @classLabel header "
                f"{classes}."
            )
        x, mask = pad(series, maxlen, pad_value, dtype)
        y = np.array([index[label] for label in labels], "int64")
        result.append((x, y, mask))
    return tuple(result)
