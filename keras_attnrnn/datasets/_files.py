"""Where dataset files are found, downloaded and cached.

A dataset's files are looked for in `<data folder>/<dataset>/`, the data
folder being, in order: the `data_dir` argument, the `KERAS_ATTNRNN_DATA`
environment variable, the Keras cache (`$KERAS_HOME/datasets/keras_attnrnn`,
`~/.keras` by default). Files absent everywhere are downloaded into the Keras
cache from their official source with `keras.utils.get_file`. Files derived
from them (extracted archives, encoded arrays) go into the Keras cache too,
never into the data folder, which may be read-only.
"""

import os

import keras

ENV_VAR = "KERAS_ATTNRNN_DATA"


def keras_home():
    return os.environ.get("KERAS_HOME") or os.path.join(
        os.path.expanduser("~"), ".keras"
    )


def keras_cache_data_dir():
    """The data folder inside the Keras cache."""
    return os.path.join(keras_home(), "datasets", "keras_attnrnn")


def data_dirs(data_dir=None):
    """The data folders to look in, in order."""
    dirs = [data_dir or os.environ.get(ENV_VAR) or keras_cache_data_dir()]
    if dirs[0] != keras_cache_data_dir():
        dirs.append(keras_cache_data_dir())
    return [os.path.abspath(os.path.expanduser(d)) for d in dirs]


def cache_dir(*parts):
    """A folder for derived files (created on demand)."""
    path = os.path.join(keras_cache_data_dir(), "cache", *parts)
    os.makedirs(path, exist_ok=True)
    return path


def find(dataset, names, data_dir=None):
    """The first existing `<data folder>/<dataset>/<name>` for each name.

    Returns:
        A dict name -> path (names not found are absent).
    """
    found = {}
    for folder in data_dirs(data_dir):
        for name in names:
            path = os.path.join(folder, dataset, name)
            if name not in found and os.path.exists(path):
                found[name] = path
    return found


def download(dataset, name, origin, file_hash=None, data_dir=None, hint=""):
    """Downloads `origin` into the Keras cache, or explains what to do."""
    try:
        return keras.utils.get_file(
            fname=name,
            origin=origin,
            file_hash=file_hash,
            cache_dir=keras_home(),
            cache_subdir=os.path.join("datasets", "keras_attnrnn", dataset),
        )
    except Exception as error:
        looked = ", ".join(
            os.path.join(folder, dataset) for folder in data_dirs(data_dir)
        )
        raise FileNotFoundError(
            f"The {dataset} dataset was not found and could not be "
            f"downloaded from {origin} ({type(error).__name__}: {error}). "
            f"Looked in: {looked}. Put the files there ({hint}), or pass "
            f"`data_dir=` or set {ENV_VAR} to the folder that holds "
            f"`{dataset}/`."
        ) from error
