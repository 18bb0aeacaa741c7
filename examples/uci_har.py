"""Human activity recognition on UCI HAR with LARNN (the LARNN paper's task).

The setup of Chevalier (2018): the 9 raw inertial signals of each 2.56 s
window (128 steps, standardized with the training set's per-channel mean and
deviation), a dense ELU projection 9 -> units at every step, LARNN layers,
the last step's output, and a softmax over the 6 activities. Trains on the
official training subjects (10% held out to pick the best epoch), then
reports the test accuracy once.

    python examples/uci_har.py                       # LARNN, 2 layers
    python examples/uci_har.py --layers 1 --epochs 5

Any backend: `KERAS_BACKEND=jax|tensorflow|torch python examples/uci_har.py`.
The data ("UCI HAR Dataset", the folder or its zip) is read from
`<data dir>/uci_har/`, the data dir being `--data-dir`, else
`KERAS_ATTNRNN_DATA`, else the Keras cache, where the official archive is
downloaded when it is absent and the network is reachable.
"""

import argparse
import sys
import time

import keras
import numpy as np

import keras_attnrnn
from keras_attnrnn.datasets import uci_har


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Without the data, the script says where to put it and exits "
        "with status 2.",
    )
    parser.add_argument("--units", type=int, default=32, help="H (default 32)")
    parser.add_argument("--layers", type=int, default=2, help="stacked LARNNs")
    parser.add_argument("--window", type=int, default=16, help="k (default 16)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--no-positional-encoding", action="store_true")
    parser.add_argument("--dropout", type=float, default=0.2,
                        help="dropout after each LARNN layer")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--implementation", default="auto",
                        help="auto, reference, fused or a registered name")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--output", default="uci_har_larnn.keras",
                        help="where to save the best model")
    return parser.parse_args(argv)


def build_model(args, channels=len(uci_har.SIGNALS), classes=len(uci_har.LABELS)):
    inputs = keras.Input((None, channels))
    x = keras.layers.Dense(args.units, activation="elu")(inputs)
    for layer in range(args.layers):
        x = keras_attnrnn.LARNN(
            args.units,
            window=args.window,
            num_heads=args.heads,
            use_positional_encoding=not args.no_positional_encoding,
            return_sequences=layer < args.layers - 1,
            implementation=args.implementation,
            seed=args.seed + layer,
        )(x)
        x = keras.layers.Dropout(args.dropout, seed=args.seed)(x)
    outputs = keras.layers.Dense(classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        keras.optimizers.Adam(args.learning_rate),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    try:
        (x_train, y_train), (x_test, y_test) = uci_har.load_data(args.data_dir)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)
    mean = x_train.mean(axis=(0, 1))
    std = x_train.std(axis=(0, 1)) + 1e-8
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    order = np.random.default_rng(args.seed).permutation(len(x_train))
    held_out = order[: max(1, len(order) // 10)]
    kept = order[len(held_out):]

    model = build_model(args)
    model.summary()
    start = time.time()
    model.fit(
        x_train[kept],
        y_train[kept],
        validation_data=(x_train[held_out], y_train[held_out]),
        epochs=args.epochs,
        batch_size=args.batch_size,
        callbacks=[
            keras.callbacks.ModelCheckpoint(
                args.output, monitor="val_accuracy", save_best_only=True
            )
        ],
        verbose=2,
    )
    print(f"trained in {time.time() - start:.0f} s; best model: {args.output}")
    best = keras.saving.load_model(args.output)
    _, accuracy = best.evaluate(x_test, y_test, batch_size=args.batch_size, verbose=0)
    print(
        f"test accuracy {accuracy:.4f} ({len(x_test)} windows, backend "
        f"{keras.config.backend()}, implementation "
        f"{keras_attnrnn.ops.selected('larnn')})"
    )
    return accuracy


if __name__ == "__main__":
    main()
