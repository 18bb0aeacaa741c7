"""IMDB with a standard Keras pipeline: AttnRNN, LARNN and Aaren against GRU and LSTM.

The official 25k/25k split; `TextVectorization` (lowercase, punctuation
stripped, the `--max-tokens` most frequent training words) adapted on the
training texts only; `Embedding(mask_zero=True)` so padding is masked; 5,000
training reviews held out for validation. Every model gets the same
embedding, width, optimizer and epoch budget; the weights of the epoch with
the best validation accuracy are kept, and the test set is used once, at the
end.

    python examples/imdb_standard.py --models attnrnn,gru,lstm,larnn,aaren --seeds 1
    python examples/imdb_standard.py --quick

`larnn`: `LARNN(units)` (window 16, 4 heads); `aaren`: `Aaren(units)` (4
heads), whose last output is its learned query's attention over every
review token.

Each run appends a JSON line to `--results` (default runs/imdb_standard.jsonl).
Each run checkpoints after every epoch under `--runs-dir` (default runs/),
the best epoch's weights in a file: `--resume` continues an interrupted run
and skips finished ones (docs/results.md, "Resumable runs").
"""

import argparse

import numpy as np

from _experiment import EpochClock
from _experiment import Run
from _experiment import add_run_arguments
from _experiment import run_config


def prepare(args):
    import keras

    import keras_attnrnn

    (texts, labels), (test_texts, test_labels) = keras_attnrnn.datasets.imdb.load_text(
        data_dir=args.data_dir
    )
    order = np.random.default_rng(0).permutation(len(texts))
    texts, labels = [texts[i] for i in order], labels[order]
    n_val = 5000
    if args.quick:
        texts, labels = texts[:3000], labels[:3000]
        test_texts, test_labels = test_texts[::25], test_labels[::25]
        n_val = 500
    vectorize = keras.layers.TextVectorization(
        max_tokens=args.max_tokens, output_sequence_length=args.maxlen
    )
    vectorize.adapt(texts[n_val:], batch_size=1024)
    encode = lambda t: keras.ops.convert_to_numpy(vectorize(t)).astype("int32")  # noqa
    return (
        (encode(texts[n_val:]), labels[n_val:]),
        (encode(texts[:n_val]), labels[:n_val]),
        (encode(test_texts), test_labels),
    )


def build(args, name):
    import keras

    import keras_attnrnn

    recurrent = {
        "attnrnn": lambda: keras_attnrnn.AttnRNN(args.units, dropout=args.dropout),
        "gru": lambda: keras.layers.GRU(args.units, dropout=args.dropout),
        "lstm": lambda: keras.layers.LSTM(args.units, dropout=args.dropout),
        "larnn": lambda: keras_attnrnn.LARNN(args.units, dropout=args.dropout),
        "aaren": lambda: keras_attnrnn.Aaren(args.units, dropout=args.dropout),
    }[name]()
    initializer = (
        keras.initializers.RandomNormal(stddev=1.0)
        if args.embedding_init == "normal"
        else "uniform"
    )
    model = keras.Sequential([
        keras.Input((None,), dtype="int32"),
        keras.layers.Embedding(
            args.max_tokens, args.units, mask_zero=True,
            embeddings_initializer=initializer,
        ),
        recurrent,
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    model.compile(
        keras.optimizers.Adam(args.learning_rate, epsilon=1e-8),
        "binary_crossentropy",
        metrics=["accuracy"],
    )
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="attnrnn,gru,lstm")
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--units", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=20000)
    parser.add_argument("--maxlen", type=int, default=256)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--embedding-init", choices=["normal", "uniform"], default="normal")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--results", default="runs/imdb_standard.jsonl")
    parser.add_argument("--quick", action="store_true", help="3000 reviews, 1 epoch")
    add_run_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.maxlen = 1, 64
    import keras

    train, val, test = prepare(args)
    print(f"{len(train[0])} train, {len(val[0])} validation, {len(test[0])} test reviews")
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.models.split(","):
            config = dict(run_config(args, drop=["models", "seeds"]), model=name, seed=seed)
            run = Run("imdb_standard", f"{name}-seed{seed}", config,
                      args.runs_dir, args.resume)
            if run.skip(args.results):
                continue
            keras.utils.set_random_seed(seed)
            model = build(args, name)
            # The best validation epoch's weights, kept in a file and loaded
            # at the end (EarlyStopping(restore_best_weights=True) without
            # stopping early, but surviving a resume).
            h = run.fit(
                model, *train, validation_data=val, epochs=args.epochs,
                batch_size=args.batch_size, monitor="val_accuracy", mode="max",
                callbacks=[EpochClock()], verbose=2,
            )
            _, test_accuracy = model.evaluate(*test, batch_size=256, verbose=0)
            print(f"{name} seed {seed}: best validation {max(h['val_accuracy']):.4f} "
                  f"(epoch {int(np.argmax(h['val_accuracy'])) + 1}), test {test_accuracy:.4f}")
            run.record(args.results, experiment="imdb_standard", model=name, seed=seed,
                       config={k: v for k, v in vars(args).items()
                               if k not in ("results", "data_dir", "runs_dir", "resume")},
                       history=h, test_accuracy=float(test_accuracy),
                       wall_seconds=run.wall_seconds())


if __name__ == "__main__":
    main()
