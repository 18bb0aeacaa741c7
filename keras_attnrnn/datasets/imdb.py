"""IMDB movie reviews (Maas et al., ACL 2011), read from the original archives.

25,000 train and 25,000 test reviews, 12,500 positive (label 1) and 12,500
negative (label 0) in each split. Three forms:

* `load_text()`: the raw review texts, in the official order (per split,
  `pos/` then `neg/`, each sorted by file name as a string).
* `load_data()`: the integer form of `keras.datasets.imdb.load_data`, rebuilt
  from the raw text: lowercase, punctuation replaced by spaces (the
  characters of ``FILTERS``), whitespace split, each word mapped to its rank
  in Keras's word index, unknown words dropped; shuffled with
  `numpy.random.RandomState(seed)` (train, then test, one generator);
  `start_char`, `oov_char` and `index_from` as Keras. The labels match Keras's
  `imdb.npz` exactly and about 99% of its sequences token for token (a few
  index words differ).
* `extract()`: the unpacked `aclImdb/{train,test}/{pos,neg}/` tree, for
  `keras.utils.text_dataset_from_directory`.

The files are `imdb/aclImdb_v1_train.tar.gz` and `imdb/aclImdb_v1_test.tar.gz`
(or the official `imdb/aclImdb_v1.tar.gz`, or an unpacked `imdb/aclImdb/`)
and `imdb/imdb_word_index.json` in the data folder (see `_files.py`).
"""

import json
import os
import re
import tarfile

import numpy as np

from keras_attnrnn.datasets import _files

DATASET = "imdb"
ORIGIN = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
WORD_INDEX_ORIGIN = (
    "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
    "imdb_word_index.json"
)
WORD_INDEX_MD5 = "bfafd718b763782e994055a2d397834f"
SPLIT_ARCHIVES = {
    "train": "aclImdb_v1_train.tar.gz",
    "test": "aclImdb_v1_test.tar.gz",
}
OFFICIAL_ARCHIVE = "aclImdb_v1.tar.gz"
WORD_INDEX = "imdb_word_index.json"
FILTERS = '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\t\n'
_HINT = (
    "aclImdb_v1_train.tar.gz and aclImdb_v1_test.tar.gz, or the official "
    "aclImdb_v1.tar.gz, and imdb_word_index.json"
)
_MEMBER = re.compile(r"(?:^|/)aclImdb/(train|test)/(pos|neg)/([^/]+\.txt)$")
_TRANSLATE = str.maketrans({c: " " for c in FILTERS})
SPLITS = ("train", "test")


def _sources(data_dir):
    """Where the reviews of each split are: {split: (kind, path)}."""
    names = [*SPLIT_ARCHIVES.values(), OFFICIAL_ARCHIVE, "aclImdb"]
    found = _files.find(DATASET, names, data_dir)
    sources = {}
    for split in SPLITS:
        if SPLIT_ARCHIVES[split] in found:
            sources[split] = ("tar", found[SPLIT_ARCHIVES[split]])
        elif OFFICIAL_ARCHIVE in found:
            sources[split] = ("tar", found[OFFICIAL_ARCHIVE])
        elif os.path.isdir(os.path.join(found.get("aclImdb", ""), split)):
            sources[split] = ("dir", found["aclImdb"])
    if len(sources) < len(SPLITS):
        archive = _files.download(
            DATASET, OFFICIAL_ARCHIVE, ORIGIN, data_dir=data_dir, hint=_HINT
        )
        for split in SPLITS:
            sources.setdefault(split, ("tar", archive))
    return sources


def _read_reviews(kind, path, split):
    """{(label_name, file_name): text} of one split."""
    reviews = {}
    if kind == "dir":
        for label in ("pos", "neg"):
            folder = os.path.join(path, split, label)
            for name in os.listdir(folder):
                if name.endswith(".txt"):
                    with open(os.path.join(folder, name), "rb") as f:
                        reviews[label, name] = f.read().decode("utf-8")
        return reviews
    with tarfile.open(path, "r:gz") as archive:
        for member in archive:
            match = _MEMBER.search(member.name)
            if match and match.group(1) == split and member.isfile():
                text = archive.extractfile(member).read().decode("utf-8")
                reviews[match.group(2), match.group(3)] = text
    return reviews


def _ordered_reviews(data_dir):
    """Per split, [(label_name, file_name, text)] in the official order."""
    sources = _sources(data_dir)
    result = {}
    for split in SPLITS:
        reviews = _read_reviews(*sources[split], split)
        if not reviews:
            raise ValueError(
                f"No {split} reviews were found in {sources[split][1]}."
            )
        result[split] = [
            (label, name, reviews[label, name])
            for label in ("pos", "neg")
            for name in sorted(n for lab, n in reviews if lab == label)
        ]
    return result


def load_text(data_dir=None):
    """Loads the raw reviews of the official 25k/25k split.

    Args:
        data_dir: folder holding `imdb/`; default: `KERAS_ATTNRNN_DATA`, else
            the Keras cache (downloading the official archive if needed).

    Returns:
        `((train_texts, train_labels), (test_texts, test_labels))`: lists of
        strings and int64 arrays (1 positive, 0 negative), per split the
        `pos/` reviews then the `neg/` ones, each sorted by file name.
    """
    reviews = _ordered_reviews(data_dir)
    return tuple(
        (
            [text for _, _, text in reviews[split]],
            np.array(
                [int(label == "pos") for label, _, _ in reviews[split]],
                dtype="int64",
            ),
        )
        for split in SPLITS
    )


def get_word_index(data_dir=None):
    """Keras's IMDB word index: a dict word -> rank (1 = most frequent)."""
    found = _files.find(DATASET, [WORD_INDEX], data_dir)
    path = found.get(WORD_INDEX) or _files.download(
        DATASET,
        WORD_INDEX,
        WORD_INDEX_ORIGIN,
        file_hash=WORD_INDEX_MD5,
        data_dir=data_dir,
        hint=_HINT,
    )
    with open(path) as f:
        return json.load(f)


def tokenize(text):
    """Keras's text standardization: lowercase, filters to spaces, split."""
    return text.lower().translate(_TRANSLATE).split()


def _encoded(data_dir):
    """Per split, word ranks of each review (flat array + offsets), cached."""
    path = os.path.join(_files.cache_dir(DATASET), "imdb_ranks.npz")
    if os.path.exists(path):
        with np.load(path) as cached:
            return {key: cached[key] for key in cached.files}
    word_index = get_word_index(data_dir)
    arrays = {}
    for split, (texts, labels) in zip(SPLITS, load_text(data_dir)):
        ranks = [
            [word_index[w] for w in tokenize(text) if w in word_index]
            for text in texts
        ]
        lengths = [len(r) for r in ranks]
        arrays[f"{split}_ranks"] = np.fromiter(
            (w for r in ranks for w in r), dtype="int32", count=sum(lengths)
        )
        arrays[f"{split}_offsets"] = np.cumsum([0] + lengths).astype("int64")
        arrays[f"{split}_labels"] = labels
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return arrays


def load_data(
    num_words=None,
    skip_top=0,
    maxlen=None,
    seed=113,
    start_char=1,
    oov_char=2,
    index_from=3,
    data_dir=None,
):
    """Loads IMDB in the integer form of `keras.datasets.imdb.load_data`.

    Args:
        num_words: keep the `num_words` most frequent words, the others
            become `oov_char`. `None` keeps all.
        skip_top: the `skip_top` most frequent words also become `oov_char`.
        maxlen: if given, sequences of `maxlen` or more words are dropped
            (what Keras's `load_data` does).
        seed: seed of the shuffle.
        start_char: index marking the start of a sequence (1).
        oov_char: index of words cut by `num_words`/`skip_top` (2).
        index_from: ranks are offset by this (3).
        data_dir: folder holding `imdb/` (see `load_text`).

    Returns:
        `((x_train, y_train), (x_test, y_test))`: object arrays of lists of
        ints, and int64 label arrays.
    """
    arrays = _encoded(data_dir)
    rng = np.random.RandomState(seed)
    splits = []
    for split in SPLITS:
        ranks, offsets = arrays[f"{split}_ranks"], arrays[f"{split}_offsets"]
        seqs = [
            ranks[offsets[i] : offsets[i + 1]].tolist()
            for i in range(len(offsets) - 1)
        ]
        labels = arrays[f"{split}_labels"]
        order = np.arange(len(seqs))
        rng.shuffle(order)
        seqs = [seqs[i] for i in order]
        labels = labels[order]
        if start_char is not None:
            seqs = [[start_char] + [w + index_from for w in s] for s in seqs]
        elif index_from:
            seqs = [[w + index_from for w in s] for s in seqs]
        if maxlen:
            keep = [i for i, s in enumerate(seqs) if len(s) < maxlen]
            seqs, labels = [seqs[i] for i in keep], labels[keep]
            if not seqs:
                raise ValueError(
                    "Received an invalid value for argument `maxlen`: no "
                    f"{split} sequence is shorter than maxlen={maxlen}."
                )
        splits.append((seqs, labels))
    if not num_words:
        # As Keras: the largest index itself then becomes `oov_char`.
        num_words = max(max(s) for seqs, _ in splits for s in seqs if s)
    result = []
    for seqs, labels in splits:
        if oov_char is not None:
            seqs = [
                [w if skip_top <= w < num_words else oov_char for w in s]
                for s in seqs
            ]
        else:
            seqs = [[w for w in s if skip_top <= w < num_words] for s in seqs]
        x = np.empty(len(seqs), dtype="object")
        x[:] = seqs
        result.append((x, labels))
    return tuple(result)


def extract(data_dir=None):
    """Unpacks the reviews into the cache; returns the `aclImdb` folder.

    The folder holds `train/{pos,neg}` and `test/{pos,neg}` (no unlabelled
    reviews), ready for `keras.utils.text_dataset_from_directory`.
    """
    root = os.path.join(_files.cache_dir(DATASET), "aclImdb")
    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return root
    for split, reviews in _ordered_reviews(data_dir).items():
        for label, name, text in reviews:
            folder = os.path.join(root, split, label)
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                f.write(text)
    open(done, "w").close()
    return root
