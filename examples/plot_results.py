"""Learning curves of the recorded IMDB runs: test accuracy per epoch.

Reads the JSON lines that `imdb_paper.py` appends (one per model and seed)
and draws, per model, the mean over its seeds with the min-max band, next to
the final accuracies the AttnRNN paper reports.

    python examples/plot_results.py                       # runs/imdb_paper.jsonl
    python examples/plot_results.py --results runs/imdb_paper.jsonl --output docs/img/imdb_paper.png

Needs matplotlib (`pip install "keras-attnrnn[plots]"`).
"""

import argparse
import collections
import os

import numpy as np
from _experiment import load_records

# Test accuracy the AttnRNN paper reports for its 10-epoch protocol.
PAPER = {"attnrnn": 0.8016, "gru": 0.7840, "lstm": 0.7744}


def curves(records):
    """{model: array (seeds, epochs)} of full (not --quick) runs."""
    by_model = collections.defaultdict(list)
    for r in records:
        if r.get("experiment") == "imdb_paper" and not r.get("quick"):
            by_model[r["model"]].append(r["test_accuracy"])
    result = {}
    for model, runs in by_model.items():
        epochs = min(len(run) for run in runs)
        result[model] = np.array([run[:epochs] for run in runs])
    return result


def plot(by_model, output):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4))
    for model, acc in sorted(by_model.items()):
        epochs = np.arange(1, acc.shape[1] + 1)
        line = axis.plot(epochs, acc.mean(0), "-o", ms=3,
                         label=f"{model} (mean of {len(acc)} seed{'s' * (len(acc) > 1)})")[0]
        axis.fill_between(epochs, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.2)
        if model in PAPER:
            axis.plot([10], [PAPER[model]], "*", ms=10, color=line.get_color(),
                      label=f"{model}, the paper's figure")
    axis.set_xlabel("epoch")
    axis.set_ylabel("test accuracy")
    axis.set_title("IMDB, AttnRNN paper protocol", fontsize=9)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=120)
    print(f"wrote {output}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="runs/imdb_paper.jsonl")
    parser.add_argument("--output", default="runs/imdb_paper.png")
    args = parser.parse_args(argv)
    by_model = curves(load_records(args.results))
    if not by_model:
        parser.error(f"no full imdb_paper runs in {args.results}")
    for model, acc in sorted(by_model.items()):
        final = ", ".join(f"{a:.4f}" for a in acc[:, -1])
        print(f"{model}: {len(acc)} seed(s), final test accuracy {final}; "
              f"best epoch mean {acc.mean(0).max():.4f} at epoch {acc.mean(0).argmax() + 1}")
    plot(by_model, args.output)


if __name__ == "__main__":
    main()
