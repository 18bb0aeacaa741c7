"""Small helpers shared by the experiment scripts in examples/.

Results are appended as JSON lines (one per run: the config, per-epoch
history, the final figures, wall time and machine), so long experiments can
run in parts and be summarized and plotted afterwards.

Every run also checkpoints as it goes, under `<runs-dir>/<experiment>/<run>/`
(`Run`), so that a process that is stopped can be resumed by another with
`--resume`; docs/results.md, "Resumable runs", describes the layout and what
is restored.
"""

import base64
import fcntl
import glob
import hashlib
import json
import os
import platform
import random
import shutil
import sys
import time
import uuid

import keras
import numpy as np


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


def rel_error(actual, expected):
    """max |actual - expected| / max |expected| (flash-linear-attention's
    measure, as tests/helpers.py's)."""
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))


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
    """Appends one run to the JSON-lines file at `path`; returns the fields."""
    fields.setdefault("backend", keras.config.backend())
    fields.setdefault("keras", keras.version())
    fields.setdefault("machine", machine())
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(fields) + "\n")
    print(f"recorded in {path}")
    return fields


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


# ---------------------------------------------------------------------------
# Resumable runs (issue 14)
#
# Layout of one run, `<runs-dir>/<experiment>/<name>-<config hash>/`:
#   run.json          the experiment, the run's name and config, its run_id
#   backup/           keras.callbacks.BackupAndRestore's files (model weights
#                     with the optimizer's state, and the epoch), double
#                     checkpointed: latest.weights.h5 and its previous copy
#   state.json        written last at each checkpoint: epochs (or steps) done,
#                     the curve so far, the RNG states, the best value and
#                     the name of the best weights' file, `resumed_at`, the
#                     wall time spent, a fingerprint of the weights
#   best-NNNN.weights.h5   the best epoch's weights (model selection)
#   step-NNNNNN.weights.h5 / checkpoint-NNNN.pt   hand-written checkpoints
#                     (synthetic_tasks.py's train_on_batch loop; the plain
#                     PyTorch reference), named by state.json
#   record.json       the JSON line of the finished run
# state.json is replaced atomically and names the files it needs, so a
# process killed at any point leaves a consistent checkpoint (or the one
# before it).

STOP_AFTER = "KERAS_ATTNRNN_STOP_AFTER"  # testing: exit after checkpoint N


def add_run_arguments(parser):
    parser.add_argument("--runs-dir", default=os.environ.get("KERAS_ATTNRNN_RUNS_DIR", "runs"),
                        help="checkpoints go to <runs-dir>/<experiment>/<run>/ (default: "
                        "$KERAS_ATTNRNN_RUNS_DIR, else runs/)")
    parser.add_argument("--resume", action="store_true",
                        help="continue each run from its last checkpoint and skip "
                        "finished runs (without it a run's folder is cleared)")


def run_config(args, drop=()):
    """The arguments that define a run: all but where things are written."""
    skip = {"results", "runs_dir", "resume", "data_dir", *drop}
    return {k: v for k, v in sorted(vars(args).items()) if k not in skip}


def _write_json(path, value):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def seed_generator_states(model):
    """The state variables of every `keras.random.SeedGenerator` in `model`
    (dropout's): `save_weights` leaves them out."""
    return [v for v in model.variables if v.name == "seed_generator_state"]


def rng_state(model=None):
    """The global random states a training loop draws from, as JSON values.

    NumPy's and Python's global generators (Keras's data adapter shuffles
    arrays with `np.random.permutation` on jax and numpy), torch's global
    generator where torch is loaded (the torch backend's DataLoader sampler
    and the PyTorch reference draw from it) and the model's seed generators.
    TensorFlow's `tf.data` shuffle is not here: with the seed Keras sets it
    repeats the same permutation every epoch, in every process
    (docs/results.md, "Resumable runs").
    """
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }
    if "torch" in sys.modules:
        import torch

        state["torch"] = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
    if model is not None:
        state["seed_generators"] = [
            keras.ops.convert_to_numpy(v).tolist() for v in seed_generator_states(model)
        ]
    return state


def set_rng_state(state, model=None):
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype="uint32"), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "torch" in state:
        import torch

        torch.set_rng_state(torch.frombuffer(
            bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8
        ))
    if model is not None:
        variables = seed_generator_states(model)
        saved = state.get("seed_generators", [])
        assert len(variables) == len(saved), (len(variables), len(saved))
        for v, value in zip(variables, saved):
            v.assign(np.asarray(value, dtype=keras.backend.standardize_dtype(v.dtype)))


def fingerprint(model):
    """SHA-1 of the model's weights and the optimizer's variables, in order."""
    digest = hashlib.sha1()
    optimizer = getattr(model, "optimizer", None)
    variables = list(model.weights) + (list(optimizer.variables) if optimizer else [])
    for v in variables:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(v)).tobytes())
    return digest.hexdigest()


def stop_if_asked(count):
    """The testing hook: exit at once, as a killed process would."""
    if os.environ.get(STOP_AFTER) == str(count):
        print(f"{STOP_AFTER}={count}: exiting after checkpoint {count}", flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)


class Run:
    """One run's folder: checkpoints, the curve so far, the finished record.

    `Run(experiment, name, config, runs_dir, resume)` uses
    `<runs_dir>/<experiment>/<name>-<hash of config and backend>/`; without
    `resume` an existing folder is cleared first. A process holds the run's
    lock (`<name>.lock` beside the folder) until it exits, so a second
    process on the same run fails at once instead of mixing checkpoints.
    """

    def __init__(self, experiment, name, config, runs_dir="runs", resume=False):
        config = dict(config, backend=keras.config.backend())
        key = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode())
        self.experiment, self.config = experiment, config
        self.name = f"{name}-{key.hexdigest()[:8]}"
        self.dir = os.path.join(runs_dir, experiment, self.name)
        self.backup_dir = os.path.join(self.dir, "backup")
        os.makedirs(os.path.dirname(self.dir), exist_ok=True)
        self._lock = open(f"{self.dir}.lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{self.dir}: another process is running this run") from None
        if not resume and os.path.exists(self.dir):
            shutil.rmtree(self.dir)
        os.makedirs(self.dir, exist_ok=True)
        info = _read_json(self._path("run.json"))
        if info is None:
            info = {"experiment": experiment, "name": self.name, "config": config,
                    "run_id": uuid.uuid4().hex[:12], "created": time.time()}
            _write_json(self._path("run.json"), info)
        elif json.loads(json.dumps(config, default=str)) != info["config"]:
            raise ValueError(f"{self.dir}: its run.json has another config")
        self.run_id = info["run_id"]
        self.state = _read_json(self._path("state.json"))
        self._started = time.perf_counter()
        self._spent = self.state["wall_seconds"] if self.state else 0.0

    def _path(self, *names):
        return os.path.join(self.dir, *names)

    # -- the finished run -------------------------------------------------

    @property
    def finished(self):
        return os.path.exists(self._path("record.json"))

    @property
    def finished_record(self):
        """The finished run's record (its JSON line), else None."""
        return _read_json(self._path("record.json"))

    def skip(self, results):
        """True (and the record made sure of in `results`) if finished."""
        if not self.finished:
            return False
        fields = self.finished_record
        if not any(r.get("run_id") == self.run_id for r in load_records(results)):
            # Killed between record.json and the results file.
            record(results, **fields)
        print(f"{self.dir}: finished, skipped (--resume)", flush=True)
        return True

    def record(self, results, **fields):
        """Writes record.json, then appends the same line to `results`."""
        fields.setdefault("backend", keras.config.backend())
        fields.setdefault("keras", keras.version())
        fields.setdefault("machine", machine())
        fields.update(run_id=self.run_id, run_dir=self.dir,
                      resumed_at=self.resumed_at)
        _write_json(self._path("record.json"), fields)
        fields = record(results, **fields)
        # The previous epoch's copies only served a resume.
        for path in glob.glob(os.path.join(self.backup_dir, "*.bkp")):
            os.remove(path)
        return fields

    # -- the state of an unfinished run ------------------------------------

    @property
    def resumed_at(self):
        return list(self.state["resumed_at"]) if self.state else []

    @property
    def done(self):
        """Epochs (or steps) done by the checkpoint in hand."""
        return self.state["done"] if self.state else 0

    def wall_seconds(self):
        """Wall time of the kept work: every process's up to its last
        checkpoint, this one's up to now."""
        return self._spent + time.perf_counter() - self._started

    def write_state(self, done, curve, rng, fingerprint=None, files=(), **extra):
        """Replaces state.json (last: it names the files it needs, `files`,
        and the files of the folder's other checkpoints are then removed)."""
        state = dict(self.state or {"resumed_at": []})
        state.update(done=done, curve=curve, rng=rng, fingerprint=fingerprint,
                     files=list(files), wall_seconds=self.wall_seconds(), **extra)
        _write_json(self._path("state.json"), state)
        self.state = state
        for pattern in ("best-*.weights.h5", "step-*.weights.h5", "checkpoint-*.pt"):
            for path in glob.glob(self._path(pattern)):
                if os.path.basename(path) not in state["files"]:
                    os.remove(path)

    def resumed(self):
        """Marks that this process continues the checkpoint in hand."""
        if self.state and self.state["done"] > 0:
            self.state["resumed_at"] = self.resumed_at + [self.state["done"]]
            print(f"{self.dir}: resumed after {self.state['done']}", flush=True)

    # -- Keras's fit ----------------------------------------------------------

    def _reconcile_backup(self):
        """Makes BackupAndRestore's files agree with state.json.

        state.json is written after BackupAndRestore's files at each epoch;
        a process killed in between left them one epoch ahead: go back to
        their previous copy (or, after the first epoch, to no backup).
        """
        meta = _read_json(os.path.join(self.backup_dir, "training_metadata.json"))
        ahead = meta["epoch"] if meta else 0
        if ahead == self.done:
            return
        latest = os.path.join(self.backup_dir, "latest.weights.h5")
        metadata = os.path.join(self.backup_dir, "training_metadata.json")
        previous = _read_json(f"{metadata}.bkp")
        if ahead == self.done + 1 and self.done == 0:
            shutil.rmtree(self.backup_dir)
        elif ahead == self.done + 1 and previous and previous["epoch"] == self.done:
            shutil.copyfile(f"{latest}.bkp", latest)
            shutil.copyfile(f"{metadata}.bkp", metadata)
        else:
            raise RuntimeError(
                f"{self.dir}: the backup is at epoch {ahead}, state.json at "
                f"{self.done}; run without --resume to start over"
            )

    def fit(self, model, *args, epochs, monitor=None, mode="min", patience=None,
            callbacks=(), step_loss=None, **kwargs):
        """`model.fit`, checkpointed after every epoch and resumable.

        With `monitor`, the best epoch's weights (by `mode`) are kept in a
        file and loaded at the end, and with `patience` training stops as
        `EarlyStopping(monitor, patience, restore_best_weights=True)` would;
        both survive a resume. `step_loss`, a `StepLoss` among `callbacks`,
        has its per-step losses kept in the curve. Returns `history()`.
        """
        self._reconcile_backup()
        backup = keras.callbacks.BackupAndRestore(
            self.backup_dir, double_checkpoint=True, delete_checkpoint=False
        )
        state = _RunCheckpoint(self, epochs, monitor, mode, patience, step_loss)
        model.fit(*args, epochs=epochs, callbacks=[backup, *callbacks, state], **kwargs)
        if monitor is not None and self.state and self.state.get("best_file"):
            model.load_weights(self._path(self.state["best_file"]))
        return self.history()

    def history(self):
        """The curve as lists by key, like `History.history`."""
        curve = self.state["curve"] if self.state else []
        keys = [k for k in (curve[0] if curve else {}) if k not in ("epoch", "step_loss")]
        return {k: [entry[k] for entry in curve] for k in keys}

    def step_losses(self):
        curve = self.state["curve"] if self.state else []
        return [loss for entry in curve for loss in entry.get("step_loss", [])]


class _RunCheckpoint(keras.callbacks.Callback):
    """After BackupAndRestore: the curve, RNG and best weights of `Run.fit`."""

    def __init__(self, run, epochs, monitor, mode, patience, step_loss):
        super().__init__()
        self.run, self.epochs = run, epochs
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.step_loss = step_loss

    def on_train_begin(self, logs=None):
        run, model = self.run, self.model
        self.curve = list(run.state["curve"]) if run.state else []
        if not run.state or run.state["done"] == 0:
            return
        # BackupAndRestore has loaded the weights and set the first epoch.
        set_rng_state(run.state["rng"], model)
        found = fingerprint(model)
        if found != run.state["fingerprint"]:
            raise RuntimeError(
                f"{run.dir}: the restored weights differ from those of epoch "
                f"{run.state['done']} ({found} != {run.state['fingerprint']})"
            )
        run.resumed()
        if run.state.get("stopped"):
            model._initial_epoch = self.epochs  # early stopping had ended it

    def on_epoch_begin(self, epoch, logs=None):
        self._first_step = len(self.step_loss.losses) if self.step_loss else 0

    def on_epoch_end(self, epoch, logs=None):
        run, model = self.run, self.model
        entry = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}}
        if self.step_loss is not None:
            entry["step_loss"] = self.step_loss.losses[self._first_step:]
        self.curve.append(entry)
        state = run.state or {}
        best, best_epoch, best_file = (
            state.get("best"), state.get("best_epoch"), state.get("best_file")
        )
        stopped = False
        if self.monitor is not None and self.monitor in entry:
            value = entry[self.monitor]
            if best is None or (value < best if self.mode == "min" else value > best):
                best, best_epoch = value, epoch + 1
                best_file = f"best-{epoch + 1:04d}.weights.h5"
                model.save_weights(run._path(best_file))
            if (self.patience is not None and epoch > 0
                    and epoch + 1 - best_epoch >= self.patience):
                model.stop_training = stopped = True
        run.write_state(
            epoch + 1, self.curve, rng_state(model), fingerprint(model),
            files=[best_file] if best_file else [], best=best, best_epoch=best_epoch,
            best_file=best_file, monitor=self.monitor, stopped=stopped,
        )
        stop_if_asked(epoch + 1)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Summarize a results file.")
    parser.add_argument("command", choices=["summarize"])
    parser.add_argument("path")
    parser.add_argument("--key", default="test_accuracy")
    parser.add_argument("--by", default="experiment,backend,model")
    args = parser.parse_args()
    summarize(args.path, args.key, tuple(args.by.split(",")))
