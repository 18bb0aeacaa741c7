"""IMDB sentiment classification with AttnRNN.

The model of the package's README, with Keras's defaults everywhere but the
recurrent layer: `Embedding(mask_zero=True)` with its default initializer,
the AttnRNN cell in `keras.layers.RNN` (or the fused `AttnRNN` layer with
`--layer fused`), a sigmoid output, `"adam"`, batch size 32, the best
epoch's weights kept (early stopping on the validation accuracy). Trains on
the official 25k training reviews (20% held out for validation), reports the
test accuracy, saves a `.keras` file and checks that it loads back with the
same predictions. `--layer gru|lstm|larnn` swaps in another recurrent layer,
to compare in the same script.

    python examples/imdb.py --quick      # 8000 reviews, 100 tokens, 64 units
    python examples/imdb.py              # 20k words, 200 tokens, 128 units, 3 epochs

Any backend: `KERAS_BACKEND=jax|tensorflow|torch python examples/imdb.py`.
The data is read from `KERAS_ATTNRNN_DATA` (or `--data-dir`), else from the
Keras cache, downloading the official archive there if needed.
"""

import argparse
import os
import time

import keras
import numpy as np

import keras_attnrnn


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: 8000 reviews, 100 tokens, 64 units (unless given)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--units", type=int, default=None, help="128 (64 with --quick)")
    parser.add_argument("--num-words", type=int, default=20000)
    parser.add_argument("--maxlen", type=int, default=None, help="200 (100 with --quick)")
    parser.add_argument("--layer", default="cell", choices=sorted(LAYERS),
                        help="cell: RNN(AttnRNNCell), as the README (default); "
                        "fused: AttnRNN; gru, lstm: Keras's; larnn: LARNN")
    parser.add_argument("--train-size", type=int, default=None,
                        help="use only the first N training reviews")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--output", default="imdb_attnrnn.keras")
    parser.add_argument("--results", default=None,
                        help="append the run (config, curves, test accuracy) to this JSON-lines file")
    args = parser.parse_args()
    args.maxlen = args.maxlen or (100 if args.quick else 200)
    args.units = args.units or (64 if args.quick else 128)
    if args.quick:
        args.train_size = args.train_size or 8000
    return args


def load(args):
    (x_train, y_train), (x_test, y_test) = keras_attnrnn.datasets.imdb.load_data(
        num_words=args.num_words, data_dir=args.data_dir
    )
    if args.train_size:
        x_train, y_train = x_train[: args.train_size], y_train[: args.train_size]
    if args.quick:
        x_test, y_test = x_test[:1000], y_test[:1000]
    pad = lambda x: keras.utils.pad_sequences(  # noqa: E731
        x, maxlen=args.maxlen, padding="post", truncating="post"
    )
    return (pad(x_train), y_train), (pad(x_test), y_test)


LAYERS = {
    "cell": lambda units: keras.layers.RNN(keras_attnrnn.AttnRNNCell(units)),
    "fused": lambda units: keras_attnrnn.AttnRNN(units),
    "larnn": lambda units: keras_attnrnn.LARNN(units),
    "gru": lambda units: keras.layers.GRU(units),
    "lstm": lambda units: keras.layers.LSTM(units),
}


def build_model(args, make_layer=None):
    """The README's model, compiled; `make_layer(units)` defaults to `--layer`'s."""
    model = keras.Sequential([
        keras.Input((None,), dtype="int32"),
        keras.layers.Embedding(args.num_words, args.units, mask_zero=True),
        (make_layer or LAYERS[args.layer])(args.units),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    model.compile("adam", "binary_crossentropy", metrics=["accuracy"])
    return model


def main():
    args = parse_args()
    keras.utils.set_random_seed(args.seed)
    print(f"Keras {keras.version()}, backend {keras.config.backend()}")
    (x_train, y_train), (x_test, y_test) = load(args)
    print(f"{len(x_train)} training and {len(x_test)} test reviews, "
          f"{args.num_words} words, {args.maxlen} tokens")
    model = build_model(args)
    model.summary()
    start = time.perf_counter()
    history = model.fit(
        x_train,
        y_train,
        validation_split=0.2,
        epochs=args.epochs,
        batch_size=args.batch_size,
        # Model selection on the validation split: the best epoch's weights.
        callbacks=[keras.callbacks.EarlyStopping(
            "val_accuracy", patience=1, restore_best_weights=True
        )],
    )
    train_time = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    print(f"test accuracy: {accuracy:.4f} ({args.layer}, training {train_time:.0f} s)")
    if args.results:
        from _experiment import record

        record(args.results, experiment="imdb_readme", model=args.layer, seed=args.seed,
               quick=args.quick, units=args.units, maxlen=args.maxlen,
               train_size=args.train_size, epochs=args.epochs, test_accuracy=float(accuracy),
               val_accuracy=[float(v) for v in history.history["val_accuracy"]],
               train_loss=[float(v) for v in history.history["loss"]],
               train_seconds=train_time)

    model.save(args.output)
    reloaded = keras.saving.load_model(args.output)
    probe = x_test[:64]
    same = np.allclose(
        model.predict(probe, verbose=0), reloaded.predict(probe, verbose=0), atol=1e-5
    )
    print(f"saved {os.path.abspath(args.output)}; reloaded predictions match: {same}")
    if not same:
        raise SystemExit("the reloaded model does not reproduce the predictions")
    for op in ("attnrnn", "larnn"):
        if keras_attnrnn.ops.selected(op):
            print(f"fused implementation: {keras_attnrnn.ops.selected(op)}")


if __name__ == "__main__":
    main()
