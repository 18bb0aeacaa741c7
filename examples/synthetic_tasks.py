"""The AttnRNN paper's synthetic long-range tasks: adding problem and copy memory.

Adding problem: two channels of length T, values drawn from U(0, 1) and a 0/1
marker channel with exactly two markers at distinct random positions; the
target is the sum of the two marked values (MSE loss, MAE reported).

Copy memory (the paper's variant): T/3 symbols drawn from 1..6, then T/3 - 1
silence symbols (7), a delimiter (0) and T/3 more silences; at every step the
model outputs a symbol, which must be silence except in the last T/3 steps,
where it must recall the T/3 symbols in order. Accuracy is measured on those
last T/3 steps (chance: 1/6).

Every model (AttnRNN, GRU, LSTM; H = 128) trains from scratch on fresh random
batches with Adam(1e-3) and gradient clipping at norm 1.0, and is evaluated on
a fixed test set of 1,000 sequences every `--eval-every` steps; the best test
figure and the whole curve are recorded.

    python examples/synthetic_tasks.py adding --lengths 50,100,200,400
    python examples/synthetic_tasks.py copy --lengths 30,60,90,120
    python examples/synthetic_tasks.py adding --quick

Each run (task, model, length, seed) checkpoints at every evaluation under
`--runs-dir` (default runs/): the weights with the optimizer's state, the
batch generator's state, the curve; `--resume` continues an interrupted run
and skips finished ones (docs/results.md, "Resumable runs").
"""

import argparse
import os

import numpy as np

from _experiment import Run
from _experiment import add_run_arguments
from _experiment import fingerprint
from _experiment import rng_state
from _experiment import run_config
from _experiment import set_rng_state
from _experiment import stop_if_asked


def adding_batch(rng, n, length):
    values = rng.random((n, length)).astype("float32")
    markers = np.zeros((n, length), "float32")
    first = rng.integers(0, length, n)
    second = (first + rng.integers(1, length, n)) % length  # distinct
    rows = np.arange(n)
    markers[rows, first] = 1
    markers[rows, second] = 1
    target = values[rows, first] + values[rows, second]
    return np.stack([values, markers], -1), target[:, None].astype("float32")


def copy_batch(rng, n, length):
    third = length // 3
    symbols = rng.integers(1, 7, (n, third))
    x = np.full((n, length), 7, "int32")
    x[:, :third] = symbols
    x[:, 2 * third - 1] = 0  # the delimiter
    y = np.full((n, length), 7, "int32")
    y[:, length - third:] = symbols
    return x, y


def build(task, name, length, units):
    import keras

    import keras_attnrnn

    sequences = task == "copy"
    recurrent = {
        "attnrnn": lambda: keras_attnrnn.AttnRNN(units, return_sequences=sequences),
        "gru": lambda: keras.layers.GRU(units, return_sequences=sequences),
        "lstm": lambda: keras.layers.LSTM(units, return_sequences=sequences),
    }[name]()
    if task == "adding":
        layers = [keras.Input((length, 2)), recurrent, keras.layers.Dense(1)]
        loss, metrics = "mse", ["mae"]
    else:
        layers = [
            keras.Input((length,), dtype="int32"),
            keras.layers.Embedding(8, units),
            recurrent,
            keras.layers.Dense(8),
        ]
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        metrics = []
    model = keras.Sequential(layers)
    model.compile(keras.optimizers.Adam(1e-3, clipnorm=1.0), loss, metrics=metrics)
    return model


def evaluate(task, model, x, y, length):
    prediction = model.predict(x, batch_size=500, verbose=0)
    if task == "adding":
        return float(np.abs(prediction - y).mean())
    recall = slice(length - length // 3, length)
    return float((prediction[:, recall].argmax(-1) == y[:, recall]).mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("task", choices=["adding", "copy"])
    parser.add_argument("--lengths", default=None)
    parser.add_argument("--models", default="attnrnn,gru,lstm")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--units", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--results", default=None)
    parser.add_argument("--quick", action="store_true", help="short sequences, 60 steps")
    add_run_arguments(parser)
    args = parser.parse_args()
    import keras

    default = {"adding": "50,100,200,400", "copy": "30,60,90,120"}[args.task]
    lengths = [int(v) for v in (args.lengths or default).split(",")]
    if args.quick:
        lengths, args.steps, args.eval_every = lengths[:1], 60, 30
    make = adding_batch if args.task == "adding" else copy_batch
    results = args.results or f"runs/{args.task}.jsonl"
    better = min if args.task == "adding" else max
    for length in lengths:
        test_x, test_y = make(np.random.default_rng(12345), 1000, length)
        for name in args.models.split(","):
            config = dict(run_config(args, drop=["models", "lengths"]), model=name,
                          length=length)
            run = Run(args.task, f"{name}-T{length}-seed{args.seed}", config,
                      args.runs_dir, args.resume)
            if run.skip(results):
                continue
            keras.utils.set_random_seed(args.seed)
            rng = np.random.default_rng(args.seed)
            model = build(args.task, name, length, args.units)
            curve = []
            if run.done:
                # The last evaluation's checkpoint: the weights with the
                # optimizer's state (built first, as BackupAndRestore does),
                # the batch generator, the global RNGs.
                model.optimizer.build(model.trainable_variables)
                model.load_weights(os.path.join(run.dir, run.state["files"][0]))
                set_rng_state(run.state["rng"], model)
                rng.bit_generator.state = run.state["batch_rng"]
                if fingerprint(model) != run.state["fingerprint"]:
                    raise RuntimeError(f"{run.dir}: the restored weights differ")
                curve = [tuple(point) for point in run.state["curve"]]
                run.resumed()
            for step in range(run.done + 1, args.steps + 1):
                model.train_on_batch(*make(rng, args.batch_size, length))
                if step % args.eval_every == 0:
                    curve.append((step, evaluate(args.task, model, test_x, test_y, length)))
                    print(f"{args.task} T={length} {name} step {step}: "
                          f"{'MAE' if args.task == 'adding' else 'accuracy'} {curve[-1][1]:.4f}",
                          flush=True)
                    weights = f"step-{step:06d}.weights.h5"
                    model.save_weights(os.path.join(run.dir, weights))
                    run.write_state(step, curve, rng_state(model), fingerprint(model),
                                    files=[weights], batch_rng=rng.bit_generator.state)
                    stop_if_asked(len(curve))
            best = better(v for _, v in curve)
            run.record(results, experiment=args.task, model=name, length=length,
                       seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                       curve=curve, best=best, final=curve[-1][1],
                       wall_seconds=run.wall_seconds(), quick=args.quick)


if __name__ == "__main__":
    main()
