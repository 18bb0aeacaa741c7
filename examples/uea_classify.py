"""UEA multivariate time series classification: Aaren, LARNN, GRU or LSTM.

JapaneseVowels (12 LPC channels, 7-29 steps, 9 speakers; the series are
padded and the masks passed to the recurrent layers) and BasicMotions
(accelerometer + gyroscope, 6 channels x 100 steps, 4 activities), with the
archive's own train/test split (`keras_attnrnn.datasets.uea`). The channels
are standardized with statistics of the real (unpadded) training steps; a
shuffled part of the training set is held out to select the model (early
stopping on the validation loss, best weights restored), and the test set is
used once.

With `--folds K` the model is selected by stratified K-fold cross-validation
instead: K models, each trained on K-1 folds with early stopping on the held
out fold's loss, give K best epochs; a fresh model is then trained on the
whole training set for their median, and the test set is used once. On
BasicMotions (40 training series) a single 20% split leaves 8 series to stop
on; the folds use every series once for validation.

Models (`--model`):
* `aaren`: a dense embedding, `--blocks` `AarenBlock`s, then `Aaren`, whose
  last output is its learned queries' attention over every real step;
* `larnn`: `keras_attnrnn.LARNN(units, window=16, num_heads=4)`;
* `gru`, `lstm`: `keras.layers.GRU` / `keras.layers.LSTM`.
Each ends in a softmax layer.

    python examples/uea_classify.py --dataset JapaneseVowels --model aaren --quick
    python examples/uea_classify.py --dataset BasicMotions --model larnn
    python examples/uea_classify.py --dataset BasicMotions --model larnn --folds 5

Any backend: `KERAS_BACKEND=jax|tensorflow|torch python examples/...`. The data
is read from `KERAS_ATTNRNN_DATA` (or `--data-dir`), else the Keras cache.
Each run appends a JSON line to `--results` (default runs/uea.jsonl) and
checkpoints after every epoch under `--runs-dir` (default runs/), the best
epoch's weights in a file: `--resume` continues an interrupted run and skips
a finished one (docs/results.md, "Resumable runs"); with `--folds`, each
fold is a run of its own (its line in `<runs-dir>/uea/folds.jsonl`).
"""

import argparse
import os
import sys
import time

import keras
import numpy as np

import keras_attnrnn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _experiment import Run  # noqa: E402
from _experiment import add_run_arguments  # noqa: E402
from _experiment import run_config  # noqa: E402

DATASETS = ("JapaneseVowels", "BasicMotions")
MODELS = ("aaren", "larnn", "gru", "lstm")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=DATASETS, default="JapaneseVowels")
    parser.add_argument("--model", choices=MODELS, default="aaren")
    parser.add_argument("--units", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--patience", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--validation-split", type=float, default=0.2)
    parser.add_argument("--folds", type=int, default=None,
                        help="select the number of epochs by stratified K-fold "
                        "cross-validation, then train on the whole training set "
                        "(instead of --validation-split)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--results", default="runs/uea.jsonl")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: 32 units, 3 epochs (20 on BasicMotions, "
                        "which has 40 training series)")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    if args.folds is not None and args.folds < 2:
        parser.error(f"--folds must be at least 2, got {args.folds}")
    if args.quick:
        args.units = 32
        args.epochs = 20 if args.dataset == "BasicMotions" else 3
    return args


def standardize(x_train, mask_train, *others):
    """Per-channel mean and std of the real training steps; padding stays 0."""
    real = x_train[mask_train]
    mean, std = real.mean(0), real.std(0) + 1e-6
    return [
        np.where(mask[..., None], (x - mean) / std, 0.0).astype("float32")
        for x, mask in [(x_train, mask_train), *others]
    ]


def stratified_folds(labels, folds, seed):
    """The fold (0 .. folds-1) of each series: every class's series shuffled
    and dealt to the folds in turn, the next class starting where the last
    left off, so that folds differ in size by at most one series and in each
    class's count by at most one."""
    counts = np.bincount(labels)
    if counts[counts > 0].min() < folds:
        raise ValueError(
            f"folds={folds}: a class has only {counts[counts > 0].min()} training series"
        )
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype="int64")
    dealt = 0
    for label in np.flatnonzero(counts):
        members = rng.permutation(np.flatnonzero(labels == label))
        fold[members] = (dealt + np.arange(len(members))) % folds
        dealt += len(members)
    return fold


def build_model(args, steps, channels, classes):
    series = keras.Input((steps, channels), name="series")
    mask = keras.Input((steps,), dtype="bool", name="mask")
    if args.model == "aaren":
        h = keras.layers.Dense(args.units)(series)
        for _ in range(args.blocks):
            h = keras_attnrnn.AarenBlock(
                args.units, num_heads=args.heads, dropout=args.dropout, seed=args.seed
            )(h, mask=mask)
        h = keras_attnrnn.Aaren(args.units, num_heads=args.heads)(h, mask=mask)
    elif args.model == "larnn":
        h = keras_attnrnn.LARNN(args.units, window=16, num_heads=4)(series, mask=mask)
    elif args.model == "gru":
        h = keras.layers.GRU(args.units)(series, mask=mask)
    else:
        h = keras.layers.LSTM(args.units)(series, mask=mask)
    h = keras.layers.Dropout(args.dropout, seed=args.seed)(h)
    outputs = keras.layers.Dense(classes, activation="softmax")(h)
    model = keras.Model([series, mask], outputs, name=f"{args.model}_classifier")
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def cross_validate(args, inputs, labels, steps, channels, classes):
    """Trains one model per fold, early stopping on the held-out fold's loss;
    each fold's best epoch, loss and accuracy there. Each fold is its own
    resumable run (a finished one is read back, not trained again)."""
    fold_of = stratified_folds(labels, args.folds, args.seed)
    fold_results = os.path.join(args.runs_dir, "uea", "folds.jsonl")
    found = []
    for k in range(args.folds):
        name = f"{args.dataset}-{args.model}-seed{args.seed}-fold{k}of{args.folds}"
        run = Run("uea", name, {**run_config(args), "fold": k},
                  args.runs_dir, args.resume)
        if not run.skip(fold_results):
            train, held_out = fold_of != k, fold_of == k
            keras.utils.set_random_seed(args.seed)
            model = build_model(args, steps, channels, classes)
            history = run.fit(
                model,
                {key: value[train] for key, value in inputs.items()},
                labels[train],
                validation_data=(
                    {key: value[held_out] for key, value in inputs.items()},
                    labels[held_out],
                ),
                epochs=args.epochs,
                batch_size=args.batch_size,
                monitor="val_loss",
                mode="min",
                patience=args.patience,
            )
            best = run.state["best_epoch"]
            run.record(fold_results, experiment="uea_fold", dataset=args.dataset,
                       model=args.model, seed=args.seed, fold=k, best_epoch=best,
                       val_loss=history["val_loss"][best - 1],
                       val_accuracy=history["val_accuracy"][best - 1],
                       series=int(held_out.sum()), history=history)
        row = run.finished_record
        print(f"fold {k}: best epoch {row['best_epoch']}, validation accuracy "
              f"{row['val_accuracy']:.4f} on {row['series']} series")
        found.append({key: row[key] for key in ("fold", "best_epoch", "val_loss",
                                                 "val_accuracy", "series")})
    return found


def main(argv=None):
    args = parse_args(argv)
    name = f"{args.dataset}-{args.model}-seed{args.seed}"
    if args.folds:
        name += f"-cv{args.folds}"
    run = Run("uea", name, run_config(args), args.runs_dir, args.resume)
    if run.skip(args.results):
        return None
    keras.utils.set_random_seed(args.seed)
    print(f"Keras {keras.version()}, backend {keras.config.backend()}")
    (x_train, y_train, m_train), (x_test, y_test, m_test) = (
        keras_attnrnn.datasets.uea.load_data(args.dataset, data_dir=args.data_dir)
    )
    classes = keras_attnrnn.datasets.uea.class_names(args.dataset, args.data_dir)
    x_train, x_test = standardize(x_train, m_train, (x_test, m_test))
    # The files are sorted by class: shuffle before holding out validation.
    order = np.random.default_rng(args.seed).permutation(len(x_train))
    x_train, y_train, m_train = x_train[order], y_train[order], m_train[order]
    steps, channels = x_train.shape[1:]
    lengths = np.concatenate([m_train.sum(1), m_test.sum(1)])
    print(
        f"{args.dataset}: {len(x_train)} training and {len(x_test)} test series, "
        f"{channels} channels, {lengths.min()}-{lengths.max()} steps, "
        f"{len(classes)} classes"
    )
    inputs = {"series": x_train, "mask": m_train}
    start = time.perf_counter()
    if args.folds:
        folds = cross_validate(args, inputs, y_train, steps, channels, len(classes))
        epochs = int(round(np.median([f["best_epoch"] for f in folds])))
        print(f"{args.folds}-fold best epochs {[f['best_epoch'] for f in folds]}: "
              f"training on all {len(x_train)} series for {epochs} epochs")
        keras.utils.set_random_seed(args.seed)
        model = build_model(args, steps, channels, len(classes))
        history = run.fit(model, inputs, y_train, epochs=epochs,
                          batch_size=args.batch_size)
        selection = {"folds": folds, "epochs": epochs,
                     "cv_accuracy": float(np.mean([f["val_accuracy"] for f in folds]))}
    else:
        model = build_model(args, steps, channels, len(classes))
        model.summary()
        # Early stopping on the validation loss, the best epoch's weights
        # loaded at the end (EarlyStopping(patience, restore_best_weights=True),
        # kept in files so that it survives a resume).
        history = run.fit(
            model, inputs, y_train,
            validation_split=args.validation_split,
            epochs=args.epochs,
            batch_size=args.batch_size,
            monitor="val_loss",
            mode="min",
            patience=args.patience,
        )
        selection = {"best_epoch": run.state["best_epoch"]}
    train_time = time.perf_counter() - start
    _, accuracy = model.evaluate(
        {"series": x_test, "mask": m_test}, y_test, batch_size=256, verbose=0
    )
    print(
        f"{args.model} on {args.dataset}: test accuracy {accuracy:.4f} "
        f"(training {train_time:.0f} s, seed {args.seed})"
    )
    run.record(args.results, experiment="uea", dataset=args.dataset, model=args.model,
               seed=args.seed, config=run.config, history=history, **selection,
               test_accuracy=float(accuracy),
               wall_seconds=run.wall_seconds(), quick=args.quick)
    return accuracy


if __name__ == "__main__":
    main()
