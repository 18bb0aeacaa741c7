"""Plots of the recorded runs: IMDB learning curves, ETTh1 errors by horizon.

IMDB (`imdb_paper.py`'s JSON lines, one per model and seed): per model (and
initialization and optimizer, where recorded), the test accuracy per epoch,
the mean over its seeds with the min-max band, next to the final accuracies
the AttnRNN paper reports; beside it, each run's training loss per 20 steps.

ETTh1 (`etth1_forecast.py`'s lines): the test MSE and MAE of each mixer by
horizon (mean over seeds, each seed a dot), with the published Aaren figure
at horizon 336; beside it, each run's validation MSE per epoch.

    python examples/plot_results.py                       # runs/imdb_paper.jsonl
    python examples/plot_results.py --results runs/imdb_paper.jsonl --output docs/img/imdb_paper.png
    python examples/plot_results.py --results docs/results/etth1.jsonl --output docs/img/etth1.png
    python examples/plot_results.py --results docs/results/imdb_twin.jsonl --output docs/img/imdb_twin.png

imdb_twin (`imdb_twin.py`'s lines): per run, both sides' training loss
(mean of 20 steps) and how far apart their weights are.

imdb_standard (`imdb_standard.py`'s lines): per model, the validation
accuracy per epoch (mean over seeds, min-max band) and each seed's test
accuracy.

UEA (`uea_classify.py`'s lines, with or without `--folds`): per dataset, each
seed's test accuracy per model, and with cross-validation the folds' mean
held-out accuracy beside it.

    python examples/plot_results.py --results docs/results/imdb_standard.jsonl --output docs/img/imdb_standard.png
    python examples/plot_results.py --results docs/results/uea_cv.jsonl --output docs/img/uea_cv.png

Needs matplotlib (`pip install "keras-attnrnn[plots]"`).
"""

import argparse
import collections
import os

import numpy as np
from _experiment import load_records
from _experiment import window_means

# Test accuracy the AttnRNN paper reports for its 10-epoch protocol.
PAPER = {"attnrnn": 0.8016, "gru": 0.7840, "lstm": 0.7744}
# The Aaren paper's ETTh1 figure (input 96, horizon 336, multivariate).
PAPER_ETTH1 = {336: {"test_mse": 0.65, "test_mae": 0.55}}


def label(record):
    """The model, with its initialization and optimizer where recorded."""
    extra = [f"{record['initialization']} init"] if record.get("initialization") else []
    if record.get("initial_draws") == "shared":
        # Before 1b2cfba: one initializer instance drew equal query and
        # output kernels (docs/attnrnn.md, "Initialization").
        extra.append("equal q/o kernels")
    if record.get("optimizer", "adam") != "adam":
        extra.append(record["optimizer"])
    return record["model"] + (f" ({', '.join(extra)})" if extra else "")


def runs_by_label(records):
    """{label: [record, ...]} of full (not --quick) runs."""
    result = collections.defaultdict(list)
    for r in records:
        if r.get("experiment") == "imdb_paper" and not r.get("quick"):
            result[label(r)].append(r)
    return dict(result)


def curves(runs):
    """{label: array (seeds, epochs)} of `runs_by_label`'s runs."""
    result = {}
    for name, runs in runs.items():
        epochs = min(len(r["test_accuracy"]) for r in runs)
        result[name] = np.array([r["test_accuracy"][:epochs] for r in runs])
    return result


def _pyplot():
    """matplotlib's pyplot, drawing to files (no screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, output):
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=120)
    print(f"wrote {output}")


def plot(by_model, output, runs):
    plt = _pyplot()

    with_loss = any("step_loss_20" in r for rs in runs.values() for r in rs)
    fig, axes = plt.subplots(1, 2 if with_loss else 1, figsize=(11 if with_loss else 6, 4))
    axis = axes[0] if with_loss else axes
    colors = {}
    for model, acc in sorted(by_model.items()):
        epochs = np.arange(1, acc.shape[1] + 1)
        line = axis.plot(epochs, acc.mean(0), "-o", ms=3,
                         label=f"{model} (mean of {len(acc)} seed{'s' * (len(acc) > 1)})")[0]
        axis.fill_between(epochs, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.2)
        colors[model] = line.get_color()
        paper = PAPER.get(runs[model][0]["model"])
        if paper is not None and acc.shape[1] >= 10:
            axis.plot([10], [paper], "*", ms=10, color=line.get_color(),
                      label=f"{model}, the paper's figure")
    axis.set_xlabel("epoch")
    axis.set_ylabel("test accuracy")
    axis.set_title("IMDB, AttnRNN paper protocol", fontsize=9)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    if with_loss:
        for name, rs in sorted(runs.items()):
            for r in rs:
                if "step_loss_20" in r:
                    loss = r["step_loss_20"]
                    axes[1].plot(20 * np.arange(1, len(loss) + 1), loss, lw=0.8,
                                 color=colors.get(name), alpha=0.8)
        axes[1].set_xlabel("training step (one line per seed, colors as left)")
        axes[1].set_ylabel("training loss, mean of 20 steps")
        axes[1].set_ylim(0, 0.8)
        axes[1].grid(True, alpha=0.3)
    _save(fig, output)


def plot_etth1(records, output):
    """Test MSE and MAE by horizon per mixer; validation MSE per epoch."""
    plt = _pyplot()

    runs = collections.defaultdict(list)
    for r in records:
        if r.get("experiment") == "etth1" and not r.get("quick"):
            # Runs before the initial-weights fix apart (docs/results.md).
            shared = r.get("initial_draws") == "shared"
            runs[r["model"] + (" (equal k/v kernels)" if shared else "")].append(r)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    colors = {}
    for mixer, rs in sorted(runs.items()):
        horizons = sorted({r["horizon"] for r in rs})
        for axis, metric in zip(axes[:2], ("test_mse", "test_mae")):
            values = [[r[metric] for r in rs if r["horizon"] == h] for h in horizons]
            line = axis.plot(horizons, [np.mean(v) for v in values], "-o", ms=4,
                             color=colors.get(mixer), label=mixer)[0]
            colors[mixer] = line.get_color()
            for h, v in zip(horizons, values):
                axis.plot([h] * len(v), v, ".", color=line.get_color(), alpha=0.5)
        for r in rs:
            val = r["history"]["val_loss"]
            axes[2].plot(np.arange(1, len(val) + 1), val, lw=0.9, color=colors[mixer],
                         alpha=0.8)
            axes[2].annotate(str(r["horizon"]), (len(val), val[-1]), fontsize=6,
                             color=colors[mixer])
    for axis, metric in zip(axes[:2], ("test_mse", "test_mae")):
        for h, figures in PAPER_ETTH1.items():
            axis.plot([h], [figures[metric]], "*", ms=10, color="k",
                      label="Aaren, the paper's figure")
        axis.set_xlabel("horizon")
        axis.set_ylabel(metric.replace("_", " "))
        axis.set_title("ETTh1, input 96 (mean over seeds; dots: seeds)", fontsize=9)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    axes[2].set_xlabel("epoch (one line per run, labelled by horizon)")
    axes[2].set_ylabel("validation MSE")
    axes[2].grid(True, alpha=0.3)
    _save(fig, output)
    return runs


def plot_twin(records, output):
    """Both sides' training loss per 20 steps, and their weights' distance."""
    plt = _pyplot()

    runs = [r for r in records if r.get("experiment") == "imdb_twin" and not r.get("quick")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r, style in zip(runs, ("-", "--", ":", "-.")):
        what = f"seed {r['seed']}, {r['init']}'s draws"
        for side, color in (("torch", "C4"), ("keras", "C1")):
            loss = window_means(r["losses"][side], 20)
            axes[0].plot(20 * np.arange(1, len(loss) + 1), loss, style, color=color,
                         label=f"{'PyTorch' if side == 'torch' else 'Keras'}, {what}")
        steps, apart = zip(*r["weight_difference"])
        axes[1].plot(steps, apart, style, color="k", label=what)
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel("training loss, mean of 20 steps")
    axes[0].set_title("the reference and the port from the same weights and batches",
                      fontsize=9)
    axes[1].set_xlabel("training step")
    axes[1].set_ylabel("max |Keras - PyTorch| / max |PyTorch - initial|")
    axes[1].set_title("how far apart the weights are (1: as far as they moved)", fontsize=9)
    for axis in axes:
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    _save(fig, output)
    return runs


def _by(records, experiment, key):
    """{key(record): [record, ...]} of the full runs of one experiment."""
    groups = collections.defaultdict(list)
    for r in records:
        if r.get("experiment") == experiment and not r.get("quick"):
            groups[key(r)].append(r)
    return dict(groups)


def _seed_dots(axis, values_by_model, color=None, marker="o", label=None, offset=0.0):
    """One column per model: a dot per seed and a bar at the mean."""
    for x, (model, values) in enumerate(values_by_model):
        xs = np.full(len(values), x + offset)
        axis.plot(xs, values, marker, ms=5, color=color or f"C{x}", alpha=0.7,
                  fillstyle="full" if marker == "o" else "none",
                  label=label if x == 0 else None)
        axis.plot([x + offset - 0.15, x + offset + 0.15], [np.mean(values)] * 2, "-",
                  color=color or f"C{x}", lw=2)
    axis.set_xticks(range(len(values_by_model)))
    axis.set_xticklabels([model for model, _ in values_by_model], fontsize=8)


def plot_imdb_standard(records, output):
    """Validation accuracy per epoch per model; each seed's test accuracy."""
    plt = _pyplot()

    runs = _by(records, "imdb_standard", lambda r: r["model"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    models = sorted(runs, key=lambda m: -np.mean([r["test_accuracy"] for r in runs[m]]))
    for x, model in enumerate(models):
        epochs = min(len(r["history"]["val_accuracy"]) for r in runs[model])
        val = np.array([r["history"]["val_accuracy"][:epochs] for r in runs[model]])
        steps = np.arange(1, epochs + 1)
        axes[0].plot(steps, val.mean(0), "-o", ms=3, color=f"C{x}",
                     label=f"{model} (mean of {len(val)} seed{'s' * (len(val) > 1)})")
        axes[0].fill_between(steps, val.min(0), val.max(0), color=f"C{x}", alpha=0.2)
        axes[0].set_xticks(steps)
    _seed_dots(axes[1], [(m, [r["test_accuracy"] for r in runs[m]]) for m in models])
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("validation accuracy (5,000 held-out training reviews)")
    axes[0].set_title("IMDB, standard Keras pipeline", fontsize=9)
    axes[0].legend(fontsize=7)
    axes[1].set_ylabel("test accuracy (dots: seeds, bar: mean)")
    axes[1].set_title("the best validation epoch's weights, test set once", fontsize=9)
    for axis in axes:
        axis.grid(True, alpha=0.3)
    _save(fig, output)
    return runs


def plot_uea(records, output):
    """Per dataset, each seed's test accuracy per model (and the CV accuracy)."""
    plt = _pyplot()

    runs = _by(records, "uea", lambda r: (r["dataset"], r["model"]))
    datasets = sorted({dataset for dataset, _ in runs})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for axis, dataset in zip(axes[0], datasets):
        models = sorted(model for d, model in runs if d == dataset)
        _seed_dots(axis, [(m, [r["test_accuracy"] for r in runs[dataset, m]]) for m in models],
                   color="C0", label="test (dots: seeds, bar: mean)", offset=-0.1)
        cv = [(m, [r["cv_accuracy"] for r in runs[dataset, m]]) for m in models
              if all("cv_accuracy" in r for r in runs[dataset, m])]
        if len(cv) == len(models):
            _seed_dots(axis, cv, color="C1", marker="s", offset=0.1,
                       label="cross-validation (held-out folds, mean per seed)")
        axis.set_title(f"UEA {dataset}", fontsize=9)
        axis.set_ylabel("accuracy")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    _save(fig, output)
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="runs/imdb_paper.jsonl")
    parser.add_argument("--output", default="runs/imdb_paper.png")
    args = parser.parse_args(argv)
    records = load_records(args.results)
    if any(r.get("experiment") == "imdb_twin" for r in records):
        for r in plot_twin(records, args.output):
            print(f"seed {r['seed']}, {r['init']}'s draws: final loss (mean of 20) Keras "
                  f"{np.mean(r['losses']['keras'][-20:]):.4f}, PyTorch "
                  f"{np.mean(r['losses']['torch'][-20:]):.4f}")
        return
    if any(r.get("experiment") == "etth1" for r in records):
        runs = plot_etth1(records, args.output)
        for mixer, rs in sorted(runs.items()):
            for r in sorted(rs, key=lambda r: (r["horizon"], r["seed"])):
                print(f"{mixer} horizon {r['horizon']} seed {r['seed']}: test MSE "
                      f"{r['test_mse']:.4f}, MAE {r['test_mae']:.4f} (best epoch "
                      f"{r['best_epoch']})")
        if not runs:
            parser.error(f"no full etth1 runs in {args.results}")
        return
    if any(r.get("experiment") == "imdb_standard" for r in records):
        runs = plot_imdb_standard(records, args.output)
        for model, rs in sorted(runs.items()):
            print(f"{model}: test accuracy "
                  + ", ".join(f"{r['test_accuracy']:.4f}" for r in rs)
                  + f"; mean {np.mean([r['test_accuracy'] for r in rs]):.4f}")
        if not runs:
            parser.error(f"no full imdb_standard runs in {args.results}")
        return
    if any(r.get("experiment") == "uea" for r in records):
        runs = plot_uea(records, args.output)
        for (dataset, model), rs in sorted(runs.items()):
            print(f"{dataset} {model}: test accuracy "
                  + ", ".join(f"{r['test_accuracy']:.4f}" for r in rs))
        if not runs:
            parser.error(f"no full uea runs in {args.results}")
        return
    runs = runs_by_label(records)
    by_model = curves(runs)
    if not by_model:
        parser.error(f"no full imdb_paper runs in {args.results}")
    for model, acc in sorted(by_model.items()):
        final = ", ".join(f"{a:.4f}" for a in acc[:, -1])
        print(f"{model}: {len(acc)} seed(s), final test accuracy {final}; "
              f"best epoch mean {acc.mean(0).max():.4f} at epoch {acc.mean(0).argmax() + 1}")
    plot(by_model, args.output, runs)


if __name__ == "__main__":
    main()
