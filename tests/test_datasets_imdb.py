"""keras_attnrnn.datasets.imdb on a synthetic archive and on the real data."""

import io
import json
import os
import tarfile

import keras
import numpy as np
import pytest

from keras_attnrnn.datasets import imdb

REVIEWS = {
    ("train", "pos", "10_9.txt"): "Great film! Loved it.",
    ("train", "pos", "2_8.txt"): "A <br /> great, great zorblax film.",
    ("train", "neg", "0_1.txt"): "Awful. Never again!",
    ("test", "pos", "1_10.txt"): "Loved the film.",
    ("test", "neg", "3_2.txt"): "Never. Awful film.",
}
WORD_INDEX = {"film": 1, "great": 2, "loved": 3, "awful": 4, "never": 5,
              "a": 6, "it": 7, "again": 8, "the": 9, "br": 10}


def _add(archive, name, text):
    data = text.encode()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _write_dataset(folder, layout):
    root = folder / "imdb"
    root.mkdir(parents=True)
    (root / "imdb_word_index.json").write_text(json.dumps(WORD_INDEX))
    if layout == "split":
        for split in ("train", "test"):
            with tarfile.open(root / f"aclImdb_v1_{split}.tar.gz", "w:gz") as a:
                for (s, label, name), text in REVIEWS.items():
                    if s == split:
                        _add(a, f"aclImdb/{s}/{label}/{name}", text)
    elif layout == "official":
        with tarfile.open(root / "aclImdb_v1.tar.gz", "w:gz") as a:
            for (s, label, name), text in REVIEWS.items():
                _add(a, f"aclImdb/{s}/{label}/{name}", text)
            _add(a, "aclImdb/train/unsup/0_0.txt", "unlabelled, ignored")
    else:
        for (s, label, name), text in REVIEWS.items():
            path = root / "aclImdb" / s / label
            path.mkdir(parents=True, exist_ok=True)
            (path / name).write_text(text)


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    home = tmp_path / "keras_home"
    monkeypatch.setenv("KERAS_HOME", str(home))
    monkeypatch.delenv("KERAS_ATTNRNN_DATA", raising=False)
    return home


@pytest.mark.parametrize("layout", ["split", "official", "extracted"])
def test_raw_text_in_the_official_order(tmp_path, keras_home, layout):
    _write_dataset(tmp_path / "data", layout)
    (train_x, train_y), (test_x, test_y) = imdb.load_text(data_dir=tmp_path / "data")
    # pos then neg; file names sorted as strings ("10_9" before "2_8").
    assert train_x == [REVIEWS["train", "pos", "10_9.txt"],
                       REVIEWS["train", "pos", "2_8.txt"],
                       REVIEWS["train", "neg", "0_1.txt"]]
    np.testing.assert_array_equal(train_y, [1, 1, 0])
    assert test_x == [REVIEWS["test", "pos", "1_10.txt"], REVIEWS["test", "neg", "3_2.txt"]]
    np.testing.assert_array_equal(test_y, [1, 0])


def test_integer_form_follows_keras(tmp_path, keras_home, monkeypatch):
    _write_dataset(tmp_path / "data", "split")
    monkeypatch.setenv("KERAS_ATTNRNN_DATA", str(tmp_path / "data"))
    assert imdb.tokenize("A <br /> great, great zorblax film.") == [
        "a", "br", "great", "great", "zorblax", "film"]
    (x_train, y_train), (x_test, y_test) = imdb.load_data(seed=0)
    ranks = {
        "10_9": [2, 1, 3, 7], "2_8": [6, 10, 2, 2, 1], "0_1": [4, 5, 8],
        "1_10": [3, 9, 1], "3_2": [5, 4, 1],
    }
    order = np.arange(3)
    rng = np.random.RandomState(0)
    rng.shuffle(order)
    expected = [[1] + [w + 3 for w in ranks[k]] for k in ("10_9", "2_8", "0_1")]
    # As Keras: with num_words=None the largest index (here "br", 10 + 3) is
    # itself replaced by oov_char.
    expected = [[2 if w == 13 else w for w in s] for s in expected]
    assert [list(s) for s in x_train] == [expected[i] for i in order]
    np.testing.assert_array_equal(y_train, np.array([1, 1, 0])[order])
    # num_words and oov_char as Keras: words with index >= num_words become 2.
    (x_small, _), _ = imdb.load_data(num_words=6, seed=0)
    assert all(w < 6 or w == 2 for s in x_small for w in s)
    # maxlen drops the sequences of maxlen or more tokens, as Keras does.
    (x_short, y_short), _ = imdb.load_data(maxlen=5, seed=0)
    assert [len(s) for s in x_short] == [4]
    with pytest.raises(ValueError, match="maxlen"):
        imdb.load_data(maxlen=2)
    # Derived files live in the Keras cache, not beside the data.
    assert os.path.exists(keras_home / "datasets" / "keras_attnrnn" / "cache" / "imdb" / "imdb_ranks.npz")
    assert sorted(os.listdir(tmp_path / "data" / "imdb")) == [
        "aclImdb_v1_test.tar.gz", "aclImdb_v1_train.tar.gz", "imdb_word_index.json"]


def test_extract_for_text_dataset_from_directory(tmp_path, keras_home):
    _write_dataset(tmp_path / "data", "split")
    root = imdb.extract(data_dir=tmp_path / "data")
    assert sorted(os.listdir(os.path.join(root, "train", "pos"))) == ["10_9.txt", "2_8.txt"]
    assert os.listdir(os.path.join(root, "test", "neg")) == ["3_2.txt"]
    assert str(root).startswith(str(keras_home))


def test_missing_files_give_a_clear_error(tmp_path, keras_home, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(FileNotFoundError, match="(?s)imdb.*network unreachable.*KERAS_ATTNRNN_DATA"):
        imdb.load_text(data_dir=tmp_path / "nowhere")


def test_real_data_matches_keras_imdb():
    """The Keras integer form rebuilt from the raw archives in ../shared/data."""
    if not os.environ.get("KERAS_ATTNRNN_DATA"):
        pytest.fail("KERAS_ATTNRNN_DATA is not set and ../shared/data is missing")
    (x_train, y_train), (x_test, y_test) = imdb.load_data()
    assert len(x_train) == len(x_test) == 25000
    assert y_train.sum() == y_test.sum() == 12500
    # The first training sequence and labels of Keras's imdb.npz.
    assert list(x_train[0][:16]) == [1, 14, 22, 16, 43, 530, 973, 1622, 1385,
                                     65, 458, 4468, 66, 3941, 4, 173]
    np.testing.assert_array_equal(y_train[:10], [1, 0, 0, 1, 0, 0, 1, 0, 1, 0])
    (x_words, _), _ = imdb.load_data(num_words=20000)
    assert max(max(s) for s in x_words) == 19999
