"""Small helpers shared by the experiment scripts in examples/.

Results are appended as JSON lines (one per run: the config, per-epoch
history, the final figures, wall time and machine), so long experiments can
run in parts and be summarized and plotted afterwards.
"""

import json
import os
import platform
import time

import keras


def machine():
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                cpu,
            )
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


class EpochClock(keras.callbacks.Callback):
    """Records each epoch's wall time into the history."""

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = time.perf_counter() - self._start


class StepLoss(keras.callbacks.Callback):
    """Records the training loss of every step, all epochs in order.

    Keras reports the running mean of the loss over the epoch after each
    batch; the loss of batch i is recovered as i * mean_i - (i - 1) *
    mean_(i-1) (exact for equal batches; the epoch's last, smaller batch is
    weighted by its size in Keras's mean, so its value is approximate).
    `means(every)` gives the means of consecutive windows of steps.
    """

    def __init__(self):
        super().__init__()
        self.losses = []

    def on_epoch_begin(self, epoch, logs=None):
        self._previous = 0.0

    def on_train_batch_end(self, batch, logs=None):
        mean = float(logs["loss"])
        self.losses.append((batch + 1) * mean - batch * self._previous)
        self._previous = mean

    def means(self, every=20):
        return window_means(self.losses, every)


def window_means(values, every=20):
    """Means of consecutive groups of `every` values (the last one dropped if short)."""
    n = len(values) // every * every
    return [sum(values[i : i + every]) / every for i in range(0, n, every)]


class TorchAdam(keras.optimizers.Adam):
    """Adam with PyTorch's epsilon: inside the bias correction.

    Keras's Adam divides by sqrt(v) + epsilon and folds the bias correction
    into the step size; PyTorch divides by sqrt(v / (1 - beta_2^t)) +
    epsilon. Where gradients are far below epsilon (early in training, for
    embedding rows and weights the loss barely reaches) PyTorch's steps are
    larger by 1 / sqrt(1 - beta_2^t): 2.4x at step 200. This is Keras's
    Adam with its epsilon scaled by sqrt(1 - beta_2^t) at each step, the
    same update as `torch.optim.Adam` (amsgrad and weight decay off).
    """

    def update_step(self, gradient, variable, learning_rate):
        ops = keras.ops
        lr = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        step = ops.cast(self.iterations + 1, variable.dtype)
        correction_1 = 1 - ops.power(ops.cast(self.beta_1, variable.dtype), step)
        correction_2 = 1 - ops.power(ops.cast(self.beta_2, variable.dtype), step)
        m = self._momentums[self._get_variable_index(variable)]
        v = self._velocities[self._get_variable_index(variable)]
        self.assign_add(m, ops.multiply(ops.subtract(gradient, m), 1 - self.beta_1))
        self.assign_add(
            v, ops.multiply(ops.subtract(ops.square(gradient), v), 1 - self.beta_2)
        )
        denominator = ops.sqrt(ops.divide(v, correction_2)) + self.epsilon
        self.assign_sub(variable, ops.divide(ops.multiply(lr, m), correction_1 * denominator))


def record(path, **fields):
    """Appends one run to the JSON-lines file at `path`."""
    fields.setdefault("backend", keras.config.backend())
    fields.setdefault("keras", keras.version())
    fields.setdefault("machine", machine())
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(fields) + "\n")
    print(f"recorded in {path}")


def load_records(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def history_lists(history):
    return {k: [float(v) for v in vs] for k, vs in history.history.items()}


def summarize(path, key="test_accuracy", by=("experiment", "backend", "model")):
    """Prints the mean, the values and the seeds of `key` per group of runs."""
    groups = {}
    for run in load_records(path):
        value = run[key][-1] if isinstance(run[key], list) else run[key]
        groups.setdefault(tuple(run.get(k) for k in by), []).append((run.get("seed"), value))
    print(" | ".join(by) + f" | mean {key} | values (seed)")
    for group, runs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        mean = sum(v for _, v in runs) / len(runs)
        values = ", ".join(f"{v:.4f} ({seed})" for seed, v in runs)
        print(" | ".join(map(str, group)) + f" | {mean:.4f} | {values}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Summarize a results file.")
    parser.add_argument("command", choices=["summarize"])
    parser.add_argument("path")
    parser.add_argument("--key", default="test_accuracy")
    parser.add_argument("--by", default="experiment,backend,model")
    args = parser.parse_args()
    summarize(args.path, args.key, tuple(args.by.split(",")))
