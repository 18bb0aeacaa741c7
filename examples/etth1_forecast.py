"""ETTh1 multivariate forecasting with Aaren blocks.

The standard protocol of the long-horizon forecasting literature (Informer,
Autoformer, Time-Series-Library; see `keras_attnrnn.datasets.etth1`): input
96 hours of the 7 channels, forecast the next 96, 192, 336 or 720 hours;
train/validation/test split by time, a scaler fitted on the training rows,
MSE and MAE on the scaled test set. The model is selected on the validation
loss (early stopping, best weights restored) and the test set is used once.

The model, channel-independent as PatchTST: each channel's window is
normalized by its own mean and standard deviation (RevIN without the affine
part), each step embedded by a dense layer, passed through a stack of
`AarenBlock`s (Aaren in place of self-attention in a Transformer encoder
block), flattened and mapped linearly to the horizon; the normalization is
then undone. `--mixer softmax` swaps Aaren for causal softmax attention
(`keras.layers.MultiHeadAttention`) in the same block, for comparison.

    python examples/etth1_forecast.py --quick              # a smoke test, < 1 min
    python examples/etth1_forecast.py --horizon 336        # the published setting
    python examples/etth1_forecast.py --horizon 336 --mixer softmax

Any backend: `KERAS_BACKEND=jax|tensorflow|torch python examples/...`. The data
is read from `KERAS_ATTNRNN_DATA` (or `--data-dir`), else the Keras cache.
Each run appends a JSON line to `--results` (default runs/etth1.jsonl) and
checkpoints after every epoch under `--runs-dir` (default runs/), the best
epoch's weights in a file: `--resume` continues an interrupted run and skips
a finished one (docs/results.md, "Resumable runs").
"""

import argparse
import os
import sys
import time

import keras
from keras import ops

import keras_attnrnn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _experiment import Run  # noqa: E402
from _experiment import add_run_arguments  # noqa: E402
from _experiment import run_config  # noqa: E402

CHANNELS = 7


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--horizon", type=int, default=336, choices=[96, 192, 336, 720])
    parser.add_argument("--input-length", type=int, default=96)
    parser.add_argument("--mixer", choices=["aaren", "softmax"], default="aaren")
    parser.add_argument("--units", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--train-stride", type=int, default=1,
                        help="use every N-th training window")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--results", default="runs/etth1.jsonl")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: small model, 1 epoch, every 16th training "
                        "and 4th validation window")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.units, args.blocks, args.epochs = 16, 1, 1
        args.train_stride, args.learning_rate = 16, 1e-3
    return args


def softmax_block(h, units, heads, intermediate_dim, dropout, seed):
    """The same Transformer block with causal softmax attention."""
    a = keras.layers.MultiHeadAttention(heads, units // heads, seed=seed)(
        h, h, use_causal_mask=True
    )
    h = keras.layers.LayerNormalization(epsilon=1e-5)(
        h + keras.layers.Dropout(dropout, seed=seed)(a)
    )
    f = keras.layers.Dense(intermediate_dim, activation="relu")(h)
    f = keras.layers.Dropout(dropout, seed=seed)(keras.layers.Dense(units)(f))
    return keras.layers.LayerNormalization(epsilon=1e-5)(h + f)


def build_model(args):
    length, horizon = args.input_length, args.horizon
    inputs = keras.Input((length, CHANNELS))
    mean = ops.mean(inputs, axis=1, keepdims=True)
    std = ops.sqrt(ops.var(inputs, axis=1, keepdims=True) + 1e-5)
    x = (inputs - mean) / std
    # One sequence per channel: (batch * channels, length, 1).
    x = ops.reshape(ops.transpose(x, (0, 2, 1)), (-1, length, 1))
    h = keras.layers.Dense(args.units)(x)
    for _ in range(args.blocks):
        if args.mixer == "aaren":
            h = keras_attnrnn.AarenBlock(
                args.units,
                num_heads=args.heads,
                intermediate_dim=2 * args.units,
                dropout=args.dropout,
                seed=args.seed,
            )(h)
        else:
            h = softmax_block(
                h, args.units, args.heads, 2 * args.units, args.dropout, args.seed
            )
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dropout(args.dropout, seed=args.seed)(h)
    y = keras.layers.Dense(horizon)(h)  # (batch * channels, horizon)
    y = ops.transpose(ops.reshape(y, (-1, CHANNELS, horizon)), (0, 2, 1))
    outputs = y * std + mean
    model = keras.Model(inputs, outputs, name=f"{args.mixer}_forecaster")
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss="mse",
        metrics=["mae"],
    )
    return model


def main(argv=None):
    args = parse_args(argv)
    run = Run("etth1", f"{args.mixer}-h{args.horizon}-seed{args.seed}", run_config(args),
              args.runs_dir, args.resume)
    if run.skip(args.results):
        return None
    keras.utils.set_random_seed(args.seed)
    print(f"Keras {keras.version()}, backend {keras.config.backend()}")
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (
        keras_attnrnn.datasets.etth1.load_data(
            args.input_length, args.horizon, data_dir=args.data_dir
        )
    )
    x_train, y_train = x_train[:: args.train_stride], y_train[:: args.train_stride]
    if args.quick:
        x_val, y_val = x_val[::4], y_val[::4]
    print(
        f"ETTh1, input {args.input_length}, horizon {args.horizon}: "
        f"{len(x_train)} training, {len(x_val)} validation, {len(x_test)} test windows"
    )
    model = build_model(args)
    model.summary()
    start = time.perf_counter()
    # Early stopping on the validation loss, the best epoch's weights loaded
    # at the end (EarlyStopping(patience, restore_best_weights=True), kept in
    # files so that it survives a resume).
    history = run.fit(
        model,
        x_train,
        y_train,
        validation_data=(x_val, y_val),
        epochs=args.epochs,
        batch_size=args.batch_size,
        shuffle=True,
        monitor="val_loss",
        mode="min",
        patience=args.patience,
    )
    train_time = time.perf_counter() - start
    mse, mae = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    print(
        f"{args.mixer}, horizon {args.horizon}: test MSE {mse:.4f}, MAE {mae:.4f} "
        f"(scaled; training {train_time:.0f} s, seed {args.seed})"
    )
    implementation = None
    if args.mixer == "aaren":
        implementation = keras_attnrnn.ops.selected("aaren_scan")
        print(f"aaren_scan implementation: {implementation}")
    run.record(args.results, experiment="etth1", model=args.mixer, horizon=args.horizon,
               seed=args.seed, config=run.config, history=history,
               best_epoch=run.state["best_epoch"], test_mse=float(mse), test_mae=float(mae),
               implementation=implementation, wall_seconds=run.wall_seconds(), quick=args.quick)
    return mse, mae


if __name__ == "__main__":
    main()
