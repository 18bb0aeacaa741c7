"""Experiment runs resume across processes (issue 14, examples/_experiment.py).

A run killed after a checkpoint (`KERAS_ATTNRNN_STOP_AFTER=k`: the process
exits with `os._exit` right after writing checkpoint k, as a killed one
would) and resumed by a new process with `--resume` ends with the same
weights, bit for bit, and the same curve as the run that was never
interrupted, on every backend: the weights and the optimizer's state come
back from Keras's `BackupAndRestore`, and the NumPy/Python/torch RNGs, the
dropout seed generators, the best epoch and its weights from the run's
state. The uninterrupted run and the first part of the interrupted one run
one after the other in a process; the resumed part in a fresh process,
where the finished run is skipped, as a script's later runs are after a
kill (so each run is also checked not to depend on the runs before it in
its process).
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from helpers import BACKEND
from helpers import REPO
from helpers import read_jsonl

EXAMPLES = os.path.join(REPO, "examples")

# Run.fit on a tiny model with everything a resume must restore: shuffled
# batches, dropout in the recurrent layer and after it, Adam's state, the
# best epoch's weights (model selection on val_loss), early stopping's
# patience and the per-step losses of StepLoss. Two runs with the same
# config, "full" and "cut"; "cut" is killed after epoch --cut-after.
FIT_DRIVER = textwrap.dedent("""
    import argparse, os, sys
    sys.path.insert(0, sys.argv.pop(1))
    import keras, numpy as np
    import keras_attnrnn
    from _experiment import (STOP_AFTER, EpochClock, Run, StepLoss, add_run_arguments,
                             fingerprint)

    parser = argparse.ArgumentParser()
    parser.add_argument("--results")
    parser.add_argument("--cut-after", default=None)
    add_run_arguments(parser)
    args = parser.parse_args()
    for name in ("full", "cut"):
        if name == "cut" and args.cut_after:
            os.environ[STOP_AFTER] = args.cut_after
        run = Run("tiny", name, {"epochs": 5}, args.runs_dir, args.resume)
        if run.skip(args.results):
            continue
        keras.utils.set_random_seed(1)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(40, 5, 3)).astype("float32")
        y = (x[:, :, 0].sum(1) > 0).astype("int32")
        model = keras.Sequential([
            keras.Input((5, 3)),
            keras_attnrnn.AttnRNN(8, dropout=0.3),
            keras.layers.Dropout(0.3, seed=2),
            keras.layers.Dense(2, activation="softmax"),
        ])
        model.compile(keras.optimizers.Adam(3e-2), "sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        steps = StepLoss()
        history = run.fit(model, x, y, batch_size=8, epochs=5, shuffle=True,
                          validation_split=0.25, monitor="val_loss", patience=3,
                          callbacks=[EpochClock(), steps], step_loss=steps, verbose=0)
        run.record(args.results, name=name, history=history, step_loss=run.step_losses(),
                   best_epoch=run.state["best_epoch"], final_fingerprint=fingerprint(model),
                   final_loss=float(model.evaluate(x, y, verbose=0)[0]))
""")

# examples/imdb_paper.py's own training functions (the Keras model, or the
# plain PyTorch reference) on tiny token data; the same two runs.
PAPER_DRIVER = textwrap.dedent("""
    import argparse, os, sys
    sys.path.insert(0, sys.argv.pop(1))
    import numpy as np
    import imdb_paper
    from _experiment import STOP_AFTER, Run, add_run_arguments

    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--results")
    parser.add_argument("--cut-after", default=None)
    add_run_arguments(parser)
    args = parser.parse_args()
    args.units, args.maxlen, args.epochs = 8, 6, 3
    args.initialization, args.optimizer = "reference", "torch_adam"
    rng = np.random.default_rng(0)
    data = ((rng.integers(0, 30, (2600, 6)).astype("int32"), rng.integers(0, 2, 2600)),
            (rng.integers(0, 30, (100, 6)).astype("int32"), rng.integers(0, 2, 100)), 30)
    train = imdb_paper.torch_reference_run if args.model == "torch_reference" \\
        else imdb_paper.keras_run
    for name in ("full", "cut"):
        if name == "cut" and args.cut_after:
            os.environ[STOP_AFTER] = args.cut_after
        run = Run("imdb_paper", f"{args.model}-{name}", {}, args.runs_dir, args.resume)
        if not run.skip(args.results):
            run.record(args.results, name=name, **train(args, 1, data, run))
""")


def run_python(args, expect=0, stop_after=None, timeout=300):
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    env.pop("KERAS_ATTNRNN_STOP_AFTER", None)
    if stop_after is not None:
        env["KERAS_ATTNRNN_STOP_AFTER"] = str(stop_after)
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                            env=env, timeout=timeout)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def run_dir(runs_dir, experiment, prefix):
    root = os.path.join(runs_dir, experiment)
    (found,) = [d for d in os.listdir(root)
                if d.startswith(prefix + "-") and os.path.isdir(os.path.join(root, d))]
    return os.path.join(root, found)


def h5_arrays(path):
    arrays = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
    return arrays


def assert_same_h5(a, b):
    a, b = h5_arrays(a), h5_arrays(b)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def without_times(run):
    """A record less what differs between two equal runs."""
    drop = {"name", "run_id", "run_dir", "resumed_at", "wall_seconds", "epoch_seconds"}
    run = {k: v for k, v in run.items() if k not in drop}
    if isinstance(run.get("history"), dict):
        run["history"] = {k: v for k, v in run["history"].items() if k != "epoch_seconds"}
    return run


def full_and_resumed(results):
    runs = read_jsonl(results)
    assert [r["name"] for r in runs] == ["full", "cut"], runs
    return runs


def test_fit_resumed_after_a_kill_equals_the_uninterrupted_run(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(FIT_DRIVER)
    runs, results = str(tmp_path / "runs"), str(tmp_path / "results.jsonl")
    common = [str(driver), EXAMPLES, "--runs-dir", runs, "--results", results]

    out = run_python(common + ["--cut-after", "2"], expect=3)
    assert "exiting after checkpoint 2" in out
    cut = run_dir(runs, "tiny", "cut")
    assert not os.path.exists(os.path.join(cut, "record.json"))
    with open(os.path.join(cut, "state.json")) as f:
        assert json.load(f)["done"] == 2
    assert len(read_jsonl(results)) == 1

    out = run_python(common + ["--resume"])
    assert "full" in out and "finished, skipped" in out, out
    assert "resumed after 2" in out, out
    full, resumed = full_and_resumed(results)
    assert full["resumed_at"] == [] and resumed["resumed_at"] == [2]
    # Epochs not repeated, the whole curve, every value equal (both on the
    # same machine, so exactly), the final (best epoch's) weights.
    assert len(full["history"]["loss"]) >= 4
    assert len(full["step_loss"]) == 4 * len(full["history"]["loss"])
    assert without_times(resumed) == without_times(full)
    # The last epoch's checkpoint (weights and optimizer) and the best
    # epoch's weights, bit for bit.
    for name in ("backup/latest.weights.h5", f"best-{full['best_epoch']:04d}.weights.h5"):
        assert_same_h5(os.path.join(cut, name), os.path.join(run_dir(runs, "tiny", "full"), name))

    # Finished: skipped on --resume, nothing recorded twice.
    out = run_python(common + ["--resume"])
    assert out.count("finished, skipped") == 2
    assert len(read_jsonl(results)) == 2


@pytest.mark.parametrize("model", ["attnrnn", "torch_reference"])
def test_imdb_paper_training_resumes_exactly(model, tmp_path):
    if model == "torch_reference" and BACKEND != "torch":
        pytest.skip("plain PyTorch: the same on every Keras backend, run once")
    driver = tmp_path / "driver.py"
    driver.write_text(PAPER_DRIVER)
    runs, results = str(tmp_path / "runs"), str(tmp_path / "results.jsonl")
    common = [str(driver), EXAMPLES, "--model", model, "--runs-dir", runs,
              "--results", results]
    run_python(common + ["--cut-after", "1"], expect=3)
    out = run_python(common + ["--resume"])
    assert "resumed after 1" in out, out
    full, resumed = full_and_resumed(results)
    assert resumed["resumed_at"] == [1] and len(resumed["test_accuracy"]) == 3
    # 3 epochs of 21 steps: 3 windows of 20 steps, across epochs.
    assert len(full["step_loss_20"]) == 3
    assert without_times(resumed) == without_times(full)


def test_synthetic_task_resumes_exactly(tmp_path):
    """synthetic_tasks.py's own train_on_batch loop, checkpointed at each
    evaluation: the script itself, uninterrupted, then killed and resumed."""
    runs, results = str(tmp_path / "runs"), str(tmp_path / "adding.jsonl")
    common = [os.path.join(EXAMPLES, "synthetic_tasks.py"), "adding", "--lengths", "6",
              "--models", "gru", "--units", "4", "--batch-size", "16", "--steps", "6",
              "--eval-every", "2", "--results", results]
    run_python(common + ["--runs-dir", str(tmp_path / "full")])
    run_python(common + ["--runs-dir", runs], expect=3, stop_after=1)
    out = run_python(common + ["--runs-dir", runs, "--resume"])
    assert "resumed after 2" in out, out
    full, resumed = read_jsonl(results)
    assert resumed["resumed_at"] == [2] and [s for s, _ in resumed["curve"]] == [2, 4, 6]
    assert without_times(resumed) == without_times(full)
    name = "step-000006.weights.h5"
    assert_same_h5(os.path.join(run_dir(runs, "adding", "gru-T6-seed1"), name),
                   os.path.join(run_dir(str(tmp_path / "full"), "adding", "gru-T6-seed1"), name))


def test_cross_validated_uea_run_resumes_exactly(tmp_path):
    """uea_classify.py --folds: each fold a run of its own, then the refit on
    the whole training set. Killed inside the first fold and resumed, every
    figure equals the uninterrupted run's; finished folds are read back, not
    trained again."""
    full_runs, runs = str(tmp_path / "full"), str(tmp_path / "runs")
    results = str(tmp_path / "uea.jsonl")
    common = [os.path.join(EXAMPLES, "uea_classify.py"), "--quick", "--folds", "2",
              "--units", "8", "--results", results]
    run_python(common + ["--runs-dir", full_runs])
    run_python(common + ["--runs-dir", runs], expect=3, stop_after=2)
    out = run_python(common + ["--runs-dir", runs, "--resume"])
    assert "resumed after 2" in out, out
    full, resumed = read_jsonl(results)
    assert [f["fold"] for f in full["folds"]] == [0, 1]
    assert full["epochs"] == round(np.median([f["best_epoch"] for f in full["folds"]]))
    assert len(full["history"]["loss"]) == full["epochs"]
    assert without_times(resumed) == without_times(full)
    folds = read_jsonl(os.path.join(runs, "uea", "folds.jsonl"))
    assert [f["fold"] for f in folds] == [0, 1] and folds[0]["resumed_at"] == [2]
    # Only the refit lost: the folds are read back and the refit redone.
    shutil.rmtree(run_dir(full_runs, "uea", "JapaneseVowels-aaren-seed1-cv2"))
    out = run_python(common + ["--runs-dir", full_runs, "--resume"])
    assert out.count("finished, skipped (--resume)") == 2, out
    assert without_times(read_jsonl(results)[-1]) == without_times(full)


@pytest.fixture
def experiment():
    sys.path.insert(0, EXAMPLES)
    import _experiment

    yield _experiment
    sys.path.remove(EXAMPLES)


def tiny_model(keras):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dropout(0.5, seed=1), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    return model


def test_run_folder_cleared_without_resume_and_locked(experiment, tmp_path):
    run = experiment.Run("unit", "a", {"x": 1}, str(tmp_path))
    open(os.path.join(run.dir, "stale"), "w").close()
    with pytest.raises(RuntimeError, match="another process"):
        experiment.Run("unit", "a", {"x": 1}, str(tmp_path), resume=True)
    run._lock.close()  # as at the process's exit
    kept = experiment.Run("unit", "a", {"x": 1}, str(tmp_path), resume=True)
    assert os.path.exists(os.path.join(kept.dir, "stale")) and kept.run_id == run.run_id
    kept._lock.close()
    fresh = experiment.Run("unit", "a", {"x": 1}, str(tmp_path))
    assert not os.path.exists(os.path.join(fresh.dir, "stale")) and fresh.run_id != run.run_id
    fresh._lock.close()


def test_kill_between_backup_and_state_rolls_back_one_epoch(experiment, tmp_path):
    """Killed after BackupAndRestore wrote epoch 2 but before state.json:
    the resume goes back to the backup's previous copy (epoch 1) and redoes
    epoch 2, to the same weights; weights that do not match the state's
    fingerprint are refused."""
    import keras

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 4)).astype("float32"), rng.normal(size=(32, 1))

    def fit(epochs):
        run = experiment.Run("unit", "b", {}, str(tmp_path), resume=True)
        model = tiny_model(keras)
        try:
            run.fit(model, x, y, epochs=epochs, batch_size=8, verbose=0)
        finally:
            run._lock.close()
        return run, model

    run, _ = fit(1)
    state_1 = open(os.path.join(run.dir, "state.json")).read()
    run, model = fit(2)
    expected = experiment.fingerprint(model)
    with open(os.path.join(run.dir, "state.json"), "w") as f:
        f.write(state_1)
    run, model = fit(2)
    assert run.resumed_at == [1] and run.done == 2 and len(run.history()["loss"]) == 2
    assert experiment.fingerprint(model) == expected

    state = json.load(open(os.path.join(run.dir, "state.json")))
    state["fingerprint"] = "0" * 40
    with open(os.path.join(run.dir, "state.json"), "w") as f:
        json.dump(state, f)
    with pytest.raises(RuntimeError, match="restored weights differ"):
        fit(3)
