"""UCI HAR: Human Activity Recognition Using Smartphones (Anguita et al. 2012).

30 subjects wearing a smartphone on the waist, six activities, windows of
2.56 s at 50 Hz (128 steps). 7,352 train and 2,947 test windows, split by
subject. The LARNN paper uses the raw "Inertial Signals": 9 channels, in the
order of `SIGNALS` (body acceleration, gyroscope, total acceleration, each
x, y, z), labels 1-6 mapped to 0-5 (`LABELS`).

The files are the standard "UCI HAR Dataset" folder, or its zip, in
`<data folder>/uci_har/` (see `_files.py` for the data folder):

    uci_har/UCI HAR Dataset/{train,test}/y_{split}.txt
    uci_har/UCI HAR Dataset/{train,test}/Inertial Signals/<signal>_{split}.txt

or `uci_har/UCI HAR Dataset.zip` (what the UCI repository calls the data,
also found inside its newer `human+activity+recognition+using+smartphones.zip`,
which works too). When none is found, the official archive is downloaded
into the Keras cache; a zip is unpacked into the Keras cache, never into the
data folder.
"""

import os
import shutil
import tempfile
import zipfile

import numpy as np

from keras_attnrnn.datasets import _files

DATASET = "uci_har"
FOLDER = "UCI HAR Dataset"
ARCHIVES = (
    "UCI HAR Dataset.zip",
    "human+activity+recognition+using+smartphones.zip",
)
ORIGIN = (
    "https://archive.ics.uci.edu/static/public/240/"
    "human+activity+recognition+using+smartphones.zip"
)
SIGNALS = (
    "body_acc_x",
    "body_acc_y",
    "body_acc_z",
    "body_gyro_x",
    "body_gyro_y",
    "body_gyro_z",
    "total_acc_x",
    "total_acc_y",
    "total_acc_z",
)
LABELS = (
    "WALKING",
    "WALKING_UPSTAIRS",
    "WALKING_DOWNSTAIRS",
    "SITTING",
    "STANDING",
    "LAYING",
)
STEPS = 128
SPLITS = ("train", "test")
_HINT = f"the '{FOLDER}' folder, or '{ARCHIVES[0]}'"


def _unpack(archive, destination):
    """Extracts the `FOLDER` tree of `archive` (maybe in a nested zip)."""
    with zipfile.ZipFile(archive) as outer:
        names = outer.namelist()
        members = [n for n in names if n.startswith(FOLDER + "/")]
        if members:
            outer.extractall(destination, members=members)
            return
        nested = [n for n in names if n.endswith(ARCHIVES[0])]
        if not nested:
            raise ValueError(
                f"{archive} holds neither a '{FOLDER}/' folder nor "
                f"'{ARCHIVES[0]}'."
            )
        with tempfile.TemporaryDirectory() as tmp:
            inner = outer.extract(nested[0], tmp)
            _unpack(inner, destination)


def _extracted(archive):
    """The `FOLDER` unpacked from `archive` into the Keras cache."""
    stamp = os.stat(archive)
    key = f"{os.path.basename(archive)}-{stamp.st_size}-{int(stamp.st_mtime)}"
    root = os.path.join(_files.cache_dir(DATASET), key)
    done = os.path.join(root, ".complete")
    if not os.path.exists(done):
        shutil.rmtree(root, ignore_errors=True)
        _unpack(archive, root)
        open(done, "w").close()
    return os.path.join(root, FOLDER)


def dataset_folder(data_dir=None):
    """The path of the "UCI HAR Dataset" folder, unpacked if need be.

    Args:
        data_dir: folder holding `uci_har/`; default: `KERAS_ATTNRNN_DATA`,
            else the Keras cache (downloading the official archive if
            needed).

    Raises:
        FileNotFoundError: the data is nowhere and cannot be downloaded; the
            message says where to put it.
    """
    found = _files.find(DATASET, (FOLDER,) + ARCHIVES, data_dir)
    if FOLDER in found and os.path.isdir(found[FOLDER]):
        return found[FOLDER]
    for name in ARCHIVES:
        if name in found:
            return _extracted(found[name])
    archive = _files.download(
        DATASET, ARCHIVES[1], ORIGIN, data_dir=data_dir, hint=_HINT
    )
    return _extracted(archive)


def _read_matrix(path, columns=None):
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: the '{FOLDER}' folder is incomplete."
        )
    values = np.fromfile(path, sep=" ")
    if columns is None:
        return values
    if values.size % columns:
        raise ValueError(
            f"{path} does not hold rows of {columns} values "
            f"({values.size} values)."
        )
    return values.reshape(-1, columns)


def _load_split(folder, split, signals):
    y = _read_matrix(os.path.join(folder, split, f"y_{split}.txt")).astype(
        "int64"
    )
    if y.size and (y.min() < 1 or y.max() > len(LABELS)):
        raise ValueError(
            f"The {split} labels of {folder} are not in 1..{len(LABELS)}."
        )
    channels = []
    for signal in signals:
        path = os.path.join(
            folder, split, "Inertial Signals", f"{signal}_{split}.txt"
        )
        channels.append(_read_matrix(path, STEPS).astype("float32"))
        if len(channels[-1]) != len(y):
            raise ValueError(
                f"{path} has {len(channels[-1])} windows, but y_{split}.txt "
                f"has {len(y)} labels."
            )
    return np.stack(channels, axis=-1), y - 1


def load_data(data_dir=None, signals=SIGNALS):
    """Loads the raw inertial signals of UCI HAR, with the official split.

    Args:
        data_dir: folder holding `uci_har/` (see `dataset_folder`).
        signals: the channels to load, in this order; default: all nine of
            `SIGNALS`, the LARNN paper's input.

    Returns:
        `((x_train, y_train), (x_test, y_test))`: float32 arrays
        (windows, 128, channels) and int64 labels in 0..5 (`LABELS[y]`).
    """
    unknown = [s for s in signals if s not in SIGNALS]
    if unknown or not signals:
        raise ValueError(
            "Received an invalid value for argument `signals`, expected a "
            f"non-empty sequence of names from {SIGNALS}, got {signals!r}."
        )
    folder = dataset_folder(data_dir)
    return tuple(_load_split(folder, split, signals) for split in SPLITS)
