"""IMDB sentiment classification with AttnRNN.

The model of the package's README: an embedding with `mask_zero=True`, the
AttnRNN cell in `keras.layers.RNN` (or the fused `AttnRNN` layer with
`--fused`), and a sigmoid output. Trains on the official 25k training reviews
(20% held out for validation), reports the test accuracy, saves a `.keras`
file and checks that it loads back with the same predictions.

    python examples/imdb.py --quick      # a small subset, for a smoke test
    python examples/imdb.py              # 20k words, 200 tokens, 3 epochs

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
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--units", type=int, default=None, help="128 (64 with --quick)")
    parser.add_argument("--num-words", type=int, default=20000)
    parser.add_argument("--maxlen", type=int, default=None, help="200 (100 with --quick)")
    parser.add_argument("--fused", action="store_true",
                        help="use the fused AttnRNN layer instead of RNN(AttnRNNCell)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--train-size", type=int, default=None,
                        help="use only the first N training reviews")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--output", default="imdb_attnrnn.keras")
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


def build_model(args):
    recurrent = (
        keras_attnrnn.AttnRNN(args.units)
        if args.fused
        else keras.layers.RNN(keras_attnrnn.AttnRNNCell(args.units))
    )
    model = keras.Sequential([
        keras.Input((None,), dtype="int32"),
        # N(0, 1) embeddings, as PyTorch's nn.Embedding in the reference code:
        # AttnRNN uses its input as is when its size equals `units`, and
        # Keras's default uniform(-0.05, 0.05) leaves it tiny next to the
        # layer-normed state; the cell then learns very slowly.
        keras.layers.Embedding(
            args.num_words,
            args.units,
            mask_zero=True,
            embeddings_initializer=keras.initializers.RandomNormal(stddev=1.0),
        ),
        recurrent,
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate, epsilon=1e-8),
        loss="binary_crossentropy",
        metrics=["accuracy"],
    )
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
    model.fit(
        x_train,
        y_train,
        validation_split=0.2,
        epochs=args.epochs,
        batch_size=args.batch_size,
    )
    train_time = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    print(f"test accuracy: {accuracy:.4f} (training {train_time:.0f} s)")

    model.save(args.output)
    reloaded = keras.saving.load_model(args.output)
    probe = x_test[:64]
    same = np.allclose(
        model.predict(probe, verbose=0), reloaded.predict(probe, verbose=0), atol=1e-5
    )
    print(f"saved {os.path.abspath(args.output)}; reloaded predictions match: {same}")
    if not same:
        raise SystemExit("the reloaded model does not reproduce the predictions")
    if keras_attnrnn.ops.selected("attnrnn"):
        print(f"fused implementation: {keras_attnrnn.ops.selected('attnrnn')}")


if __name__ == "__main__":
    main()
