"""The examples and experiment scripts run end to end in quick mode (CI's
smoke test), on this backend, each in its own process."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from helpers import BACKEND
from helpers import REPO
from helpers import read_jsonl
from helpers import run_example

EXAMPLES = os.path.join(REPO, "examples")


def test_imdb_quick(tmp_path):
    # Batch 128 instead of the example's 32 keeps CI short (Keras's loop on
    # torch); the AttnRNN cell with its default initialization still learns:
    # 74% on jax with these settings, where the public code's initialization
    # stayed near chance (docs/attnrnn.md, "Initialization").
    out = run_example("imdb.py", "--quick", "--batch-size", "128",
                      "--output", str(tmp_path / "imdb.keras"))
    accuracy = float(re.search(r"test accuracy: ([0-9.]+)", out).group(1))
    assert 0.62 < accuracy <= 1.0, out[-2000:]
    assert "reloaded predictions match: True" in out
    assert os.path.exists(tmp_path / "imdb.keras")


@pytest.mark.skipif(BACKEND != "jax", reason="imdb_twin.py takes its gradients with jax")
def test_imdb_twin_trains_the_reference_and_the_port_alike(tmp_path):
    """The PyTorch reference and the Keras port from the same weights: the
    same first-batch loss and gradients, the same losses for 10 steps."""
    results = tmp_path / "twin.jsonl"
    run_example("imdb_twin.py", "--quick", "--maxlen", "50", "--results", str(results))
    (row,) = read_jsonl(results)
    loss = row["first_batch_loss"]
    assert abs(loss["keras"] - loss["torch"]) < 1e-5 * loss["torch"], loss
    gradients = row["first_batch_gradient_difference"]
    assert len(gradients) == 11 and max(gradients.values()) < 1e-4, gradients
    keras_losses, torch_losses = row["losses"]["keras"], row["losses"]["torch"]
    assert len(keras_losses) == len(torch_losses) == 10
    np.testing.assert_allclose(keras_losses, torch_losses, rtol=1e-3)


@pytest.mark.slow
def test_etth1_forecast_quick():
    out = run_example("etth1_forecast.py", "--quick", "--horizon", "96")
    found = re.search(r"horizon 96: test MSE ([0-9.]+), MAE ([0-9.]+)", out)
    mse, mae = float(found.group(1)), float(found.group(2))
    # One epoch on a sixteenth of the windows: well short of the published
    # figures, but far better than predicting the last value blindly.
    assert 0 < mse < 1.5 and 0 < mae < 1.0, (mse, mae)
    assert "529 training, 697 validation, 2785 test windows" in out
    assert f"aaren_scan implementation: {BACKEND}_chunked" in out


@pytest.mark.slow
@pytest.mark.parametrize(
    "dataset, model", [("JapaneseVowels", "aaren"), ("BasicMotions", "larnn")]
)
def test_uea_classify_quick(dataset, model):
    out = run_example("uea_classify.py", "--quick", "--dataset", dataset, "--model", model)
    accuracy = float(
        re.search(rf"{model} on {dataset}: test accuracy ([0-9.]+)", out).group(1)
    )
    chance = 1 / 9 if dataset == "JapaneseVowels" else 1 / 4
    assert chance < accuracy <= 1.0, accuracy


def test_uea_stratified_folds_deal_each_class_evenly():
    sys.path.insert(0, EXAMPLES)
    try:
        from uea_classify import stratified_folds
    finally:
        sys.path.remove(EXAMPLES)
    labels = np.random.default_rng(0).permutation(np.repeat([0, 1, 3, 4], [10, 10, 7, 13]))
    fold = stratified_folds(labels, 5, seed=3)
    assert sorted(np.bincount(fold, minlength=5)) == [8, 8, 8, 8, 8]
    for label in (0, 1, 3, 4):
        counts = np.bincount(fold[labels == label], minlength=5)
        assert counts.max() - counts.min() <= 1, (label, counts)
    assert not np.array_equal(fold, stratified_folds(labels, 5, seed=4))
    with pytest.raises(ValueError, match="folds=8: a class has only 7 training series"):
        stratified_folds(labels, 8, seed=3)


@pytest.mark.slow
def test_imdb_paper_protocol_quick(tmp_path):
    results = str(tmp_path / "paper.jsonl")
    out = run_example("imdb_paper.py", "--quick", "--results", results)
    assert re.search(r"attnrnn seed 1: test accuracy per epoch", out), out[-2000:]
    (run,) = read_jsonl(results)
    assert run["experiment"] == "imdb_paper" and run["model"] == "attnrnn"
    assert all(0.0 <= a <= 1.0 for a in run["test_accuracy"]), run


@pytest.mark.slow
def test_imdb_standard_pipeline_quick(tmp_path):
    results = str(tmp_path / "standard.jsonl")
    run_example("imdb_standard.py", "--quick", "--models", "attnrnn,gru,aaren",
                "--results", results)
    runs = read_jsonl(results)
    assert [r["model"] for r in runs] == ["attnrnn", "gru", "aaren"]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in runs), runs


@pytest.mark.slow
@pytest.mark.parametrize("task", ["adding", "copy"])
def test_synthetic_task_quick(task, tmp_path):
    results = str(tmp_path / f"{task}.jsonl")
    run_example("synthetic_tasks.py", task, "--quick", "--models", "attnrnn",
                "--results", results)
    (run,) = read_jsonl(results)
    assert run["experiment"] == task and run["model"] == "attnrnn"
    assert len(run["curve"]) == 2 and all(v >= 0.0 for _, v in run["curve"]), run


def test_plot_results_draws_mean_and_spread_over_seeds(tmp_path):
    pytest.importorskip("matplotlib")  # the [plots] extra, in [all]
    results = tmp_path / "paper.jsonl"
    runs = [("attnrnn", 1, [0.5, 0.7, 0.8]), ("attnrnn", 2, [0.6, 0.8, 0.9]),
            ("gru", 1, [0.55, 0.75, 0.78]), ("gru", 1, [0.9])]
    with open(results, "w") as f:
        for model, seed, acc in runs:
            quick = len(acc) == 1  # a smoke run: left out of the curves
            f.write(json.dumps(dict(experiment="imdb_paper", model=model, seed=seed,
                                    quick=quick, test_accuracy=acc)) + "\n")
    output = tmp_path / "curves.png"
    out = run_example("plot_results.py", "--results", str(results), "--output", str(output))
    assert "attnrnn: 2 seed(s), final test accuracy 0.8000, 0.9000; " \
           "best epoch mean 0.8500 at epoch 3" in out, out
    assert "gru: 1 seed(s), final test accuracy 0.7800" in out, out
    assert output.stat().st_size > 10_000


def test_plot_results_draws_the_twin_runs(tmp_path):
    pytest.importorskip("matplotlib")
    results = tmp_path / "twin.jsonl"
    losses = {"keras": [0.7] * 30 + [0.5] * 10, "torch": [0.7] * 20 + [0.4] * 20}
    with open(results, "w") as f:
        f.write(json.dumps(dict(experiment="imdb_twin", seed=3, init="torch", quick=False,
                                losses=losses, weight_difference=[[20, 0.1], [40, 0.9]])) + "\n")
    output = tmp_path / "twin.png"
    out = run_example("plot_results.py", "--results", str(results), "--output", str(output))
    assert "seed 3, torch's draws: final loss (mean of 20) Keras 0.6000, PyTorch 0.4000" in out
    assert output.stat().st_size > 10_000


def test_plot_results_draws_etth1_by_horizon(tmp_path):
    pytest.importorskip("matplotlib")
    results = tmp_path / "etth1.jsonl"
    with open(results, "w") as f:
        for mixer, horizon, seed, mse in [("aaren", 96, 1, 0.40), ("aaren", 336, 1, 0.48),
                                          ("softmax", 96, 1, 0.39), ("aaren", 96, 2, 0.9)]:
            f.write(json.dumps(dict(
                experiment="etth1", model=mixer, horizon=horizon, seed=seed,
                quick=seed == 2, test_mse=mse, test_mae=mse / 2, best_epoch=3,
                history=dict(val_loss=[1.0, 0.9, 0.8]))) + "\n")
    output = tmp_path / "etth1.png"
    out = run_example("plot_results.py", "--results", str(results), "--output", str(output))
    assert "aaren horizon 336 seed 1: test MSE 0.4800, MAE 0.2400 (best epoch 3)" in out, out
    assert "softmax horizon 96 seed 1: test MSE 0.3900" in out, out
    assert "seed 2" not in out, out  # the quick run is left out
    assert output.stat().st_size > 10_000


# torch.optim.Adam's steps, run in a process of its own: torch and TensorFlow
# in one process can crash (a segfault in torch.optim on the tensorflow
# backend, seen on this project's machines).
TORCH_ADAM = """
import sys
import numpy as np
import torch
data = np.load(sys.argv[1])
weight = torch.nn.Parameter(torch.tensor(data["w0"]))
reference = torch.optim.Adam([weight], lr=1e-3, eps=1e-8)
for g in data["grads"]:
    weight.grad = torch.tensor(g)
    reference.step()
np.save(sys.argv[2], weight.detach().numpy())
"""


def test_torch_adam_is_pytorch_adam(tmp_path):
    """examples/_experiment.TorchAdam takes torch.optim.Adam's steps, also
    where gradients are far below epsilon (where Keras's Adam differs)."""
    pytest.importorskip("torch")
    import sys

    import keras

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    from _experiment import TorchAdam

    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(7,)).astype("float32")
    grads = [(rng.normal(size=7) * 10.0 ** rng.integers(-12, 0)).astype("float32")
             for _ in range(40)]
    ours, keras_adam = keras.Variable(w0.copy()), keras.Variable(w0.copy())
    for optimizer, variable in ((TorchAdam(1e-3, epsilon=1e-8), ours),
                                (keras.optimizers.Adam(1e-3, epsilon=1e-8), keras_adam)):
        for g in grads:
            optimizer.apply_gradients([(keras.ops.convert_to_tensor(g), variable)])
    np.savez(tmp_path / "steps.npz", w0=w0, grads=np.stack(grads))
    subprocess.run([sys.executable, "-c", TORCH_ADAM, str(tmp_path / "steps.npz"),
                    str(tmp_path / "expected.npy")], check=True, timeout=300)
    expected = np.load(tmp_path / "expected.npy")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(ours), expected, atol=3e-7)
    # Keras's own Adam is measurably off here, which is why TorchAdam exists.
    assert np.abs(keras.ops.convert_to_numpy(keras_adam) - expected).max() > 3e-6


def test_export_matrix_probes_the_backend_native_format(tmp_path):
    """export_matrix.py exports Aaren in the format its backend needs no extra
    runtime for, runs the artifact and reports it as working."""
    fmt = "torch" if BACKEND == "torch" else "tf_saved_model"
    results = tmp_path / "export.jsonl"
    out = run_example("export_matrix.py", "--layers", "Aaren", "--formats", fmt,
                      "--results", str(results))
    assert re.search(rf"\| Aaren \| {fmt} \| {BACKEND} \| yes \| relative error", out), out
    (row,) = read_jsonl(results)
    assert row["works"] and row["format"] == fmt and row["backend"] == BACKEND


def test_serve_streaming_agrees_with_keras_token_by_token():
    """serve_streaming.py exports each model's streaming step in the formats
    its backend serves every model in, and each artifact, fed one token at a
    time, gives the layer's outputs for the whole sequence."""
    formats = {"tensorflow": ["litert", "onnx"], "torch": ["onnx", "torch"],
               "jax": []}[BACKEND]
    out = run_example("serve_streaming.py", "--tokens", "8")
    for model in ("attnrnn", "larnn", "aaren"):
        # The model's line and the indented lines under it.
        block = re.search(rf"^{model}: state .*\n((?:  .*\n)*)", out, re.M).group(1)
        error = float(re.search(r"keras step: 8 tokens, relative error ([0-9.e+-]+)",
                                block).group(1))
        assert error <= 1e-5, out
        for fmt in formats:
            found = re.search(rf"  {fmt}: (?:8 tokens, relative error ([0-9.e+-]+) .*"
                              rf"\(agrees\), state shapes constant|skipped)", block)
            assert found, out
            assert found.group(1) is None or float(found.group(1)) <= 1e-5, out
