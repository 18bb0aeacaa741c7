"""Training-step time of AttnRNN and LARNN against Keras's GRU and LSTM.

One command measures, per backend (each in its own process), every model side
by side: a `train_on_batch` (forward, backward, Adam) of
`Input((T, d)) -> layer -> Dense(1)`, after warm-up, min and median of several
repeats. Printed as a table of times and of the ratios SPEC §6 bounds.

    python benchmarks/rnn_train_step.py                      # B=128, T=200, d=H=128
    python benchmarks/rnn_train_step.py --backends jax --batch 64 --time 400
    python benchmarks/rnn_train_step.py --sweep docs/img/attnrnn_sweep.png

Keras's GRU and LSTM on torch are Python loops taking seconds a step: they get
fewer repeats (`--slow-repeats`).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

MODELS = {
    # name: (what, family)
    "gru": "keras.layers.GRU",
    "lstm": "keras.layers.LSTM",
    "attnrnn_cell": "keras.layers.RNN(AttnRNNCell)",
    "attnrnn_reference": "AttnRNN(implementation='reference')",
    "attnrnn": "AttnRNN (auto: fused)",
    "larnn_cell": "keras.layers.RNN(LARNNCell)",
    "larnn_reference": "LARNN(implementation='reference')",
    "larnn": "LARNN (auto: fused)",
}
SLOW_ON_TORCH = ("gru", "lstm", "attnrnn_cell", "larnn_cell")


def make_layer(name, units, window):
    import keras

    import keras_attnrnn

    if name == "gru":
        return keras.layers.GRU(units)
    if name == "lstm":
        return keras.layers.LSTM(units)
    if name == "attnrnn_cell":
        return keras.layers.RNN(keras_attnrnn.AttnRNNCell(units))
    if name == "attnrnn_reference":
        return keras_attnrnn.AttnRNN(units, implementation="reference")
    if name == "attnrnn":
        return keras_attnrnn.AttnRNN(units)
    if name == "larnn_cell":
        return keras.layers.RNN(keras_attnrnn.LARNNCell(units, window=window))
    if name == "larnn_reference":
        return keras_attnrnn.LARNN(units, window=window, implementation="reference")
    if name == "larnn":
        return keras_attnrnn.LARNN(units, window=window)
    raise ValueError(name)


def child(args):
    import keras
    import numpy as np

    import keras_attnrnn

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, args.time, args.features)).astype("float32")
    y = rng.normal(size=(args.batch, 1)).astype("float32")
    result = {"backend": keras.config.backend(), "times": {}, "implementation": {}}
    for name in args.models.split(","):
        if name.startswith("larnn") and not hasattr(keras_attnrnn, "LARNN"):
            continue
        model = keras.Sequential([
            keras.Input((args.time, args.features)),
            make_layer(name, args.units, args.window),
            keras.layers.Dense(1),
        ])
        model.compile(keras.optimizers.Adam(1e-3), "mse")
        slow = keras.config.backend() == "torch" and name in SLOW_ON_TORCH
        keras_attnrnn.ops.REGISTRY.reset()
        best, median = common.time_call(
            lambda: model.train_on_batch(x, y),
            warmup=1 if slow else 2,
            repeats=args.slow_repeats if slow else args.repeats,
        )
        result["times"][name] = {"min": best, "median": median}
        op = "larnn" if name.startswith("larnn") else "attnrnn"
        if op in keras_attnrnn.ops.REGISTRY.ops():
            result["implementation"][name] = keras_attnrnn.ops.selected(op)
    common.emit(result)


def table(results, args):
    header = ["model"] + [r["backend"] for r in results]
    rows = []
    for name, what in MODELS.items():
        row = [f"{what}" + ("" if name == "gru" else "")]
        for r in results:
            t = r.get("times", {}).get(name)
            impl = r.get("implementation", {}).get(name)
            cell = common.fmt_seconds(t["min"]) if t else "-"
            if impl and name in ("attnrnn", "larnn"):
                cell += f" ({impl})"
            row.append(cell)
        rows.append(row)

    def ratio(r, a, b):
        t = r.get("times", {})
        return common.fmt_ratio(t.get(a, {}).get("min"), t.get(b, {}).get("min"))

    for label, a, b in [
        ("AttnRNN / GRU (bound <= 1.0x)", "attnrnn", "gru"),
        ("AttnRNN fused / generic cell loop (torch bound <= 0.33x)", "attnrnn", "attnrnn_cell"),
        ("AttnRNN fused / reference (bound <= 0.5x)", "attnrnn", "attnrnn_reference"),
        ("LARNN / LSTM (bound <= 2.0x)", "larnn", "lstm"),
        ("LARNN fused / generic cell loop", "larnn", "larnn_cell"),
        ("LARNN fused / reference (bound <= 0.5x)", "larnn", "larnn_reference"),
    ]:
        rows.append([f"**{label}**"] + [ratio(r, a, b) for r in results])
    return common.markdown_table(header, rows)


def sweep(args):
    """AttnRNN (fused) and GRU training step against T and against B."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, (key, values) in zip(
        axes, [("time", [50, 100, 200, 400]), ("batch", [16, 32, 64, 128, 256])]
    ):
        for backend in args.backends.split(","):
            for name, style in (("attnrnn", "-o"), ("gru", "--s")):
                if backend == "torch" and name == "gru":
                    continue  # seconds per step; see the table instead
                times = []
                for value in values:
                    child_args = _child_args(args, models=name, **{key: value})
                    r = common.run_child(__file__, backend, child_args)
                    times.append(r.get("times", {}).get(name, {}).get("min"))
                axis.plot(values, times, style, label=f"{name} ({backend})")
        axis.set_xlabel("T (B=%d)" % args.batch if key == "time" else "B (T=%d)" % args.time)
        axis.set_ylabel("training step (s)")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    fig.suptitle(f"AttnRNN vs GRU, d=H={args.units}: {common.machine()}", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.sweep)), exist_ok=True)
    fig.savefig(args.sweep, dpi=120)
    print(f"wrote {args.sweep}")


def _child_args(args, models=None, time=None, batch=None):
    return [
        "--models", models or args.models,
        "--batch", str(batch or args.batch),
        "--time", str(time or args.time),
        "--features", str(args.features),
        "--units", str(args.units),
        "--window", str(args.window),
        "--repeats", str(args.repeats),
        "--slow-repeats", str(args.slow_repeats),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backends", default="jax,tensorflow,torch")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--time", type=int, default=200)
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--units", type=int, default=128)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slow-repeats", type=int, default=2)
    parser.add_argument("--sweep", default=None, help="write a PNG of time vs T and B")
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.sweep:
        return sweep(args)
    results = []
    for backend in args.backends.split(","):
        print(f"measuring {backend} ...", flush=True)
        r = common.run_child(__file__, backend, _child_args(args))
        r.setdefault("backend", backend)
        results.append(r)
    print()
    print(f"Training step, B={args.batch}, T={args.time}, d={args.features}, "
          f"H={args.units}, LARNN window {args.window}; min of {args.repeats} "
          f"after warm-up ({args.slow_repeats} for Keras's GRU/LSTM and the "
          f"generic loop on torch). {common.machine()}.")
    print()
    print(table(results, args))
    for r in results:
        if "error" in r:
            print(f"{r['backend']}: {r['error']}")


if __name__ == "__main__":
    main()
