"""Why AttnRNN and LARNN plateaued in a Keras pipeline, measured.

Trains the README's model (Keras's default `Embedding(mask_zero=True)`, the
recurrent layer, `Dense(1, sigmoid)`, Adam 1e-3, batch 32) on the quick IMDB
subset (8000 reviews, 100 tokens, 64 units) for `--steps` steps, once per
initialization, and every `--every` steps records on a fixed probe batch:

* the training loss (mean of the last `--every` steps);
* the gradient norm of each weight group (the embedding, the cell's weights,
  the head);
* the RMS of the input next to the RMS of the state;
* AttnRNN: the mean gate z and the entropy of the 4-token attention;
  LARNN: the RMS of the three parts of the gates' pre-activation
  (x·kernel, h·recurrent_kernel and, by difference, a·attention_kernel).

    KERAS_BACKEND=jax python examples/training_dynamics.py --model attnrnn
    KERAS_BACKEND=jax python examples/training_dynamics.py --model larnn
    # -> docs/img/training_dynamics_<model>.png and a JSON line per run

Gradients are taken with `jax.value_and_grad` over `model.stateless_call`
(Keras's documented jax training loop), so this script needs the jax
backend; the layers compute the same on every backend.
"""

import argparse
import json
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

import keras_attnrnn  # noqa: E402
from keras_attnrnn.ops import attnrnn_step_parts  # noqa: E402
from imdb import build_model  # noqa: E402
from imdb import load  # noqa: E402

# The initializations compared: the package's defaults, and the ones the
# layers had before (AttnRNN: the public code's; LARNN: LayerNorm gammas 1).
RUNS = {
    "attnrnn": {
        "default": lambda u: keras_attnrnn.AttnRNN(u),
        "reference": lambda u: keras_attnrnn.AttnRNN(u, initialization="reference"),
    },
    "larnn": {
        "default": lambda u: keras_attnrnn.LARNN(u),
        "gammas 1": lambda u: keras_attnrnn.LARNN(u, gamma_initializer="ones"),
    },
}


def group_of(path):
    name = path.split("/")[-1]
    if "embedding" in path:
        return "embedding"
    if path.split("/")[-2].startswith("dense"):
        return "head"
    if name in ("gamma", "beta") or name.endswith(("_gamma", "_beta")):
        return "layer norms"
    if name in ("gate_kernel", "gate_bias", "kernel", "recurrent_kernel",
                "attention_kernel", "bias"):
        return "gates"
    return "attention"


def rms(v):
    return float(np.sqrt(np.mean(np.square(v))))


def probe_attnrnn(model, ids):
    """Input and state RMS, mean gate, attention entropy over the probe."""
    embedding, layer = model.layers[0], model.layers[1]
    x = ops.convert_to_numpy(embedding(ids))
    mask = ids != 0
    cell = layer.cell
    h = ops.full((ids.shape[0], cell.units), cell.initial_state_value)
    states, gates, entropies = [], [], []
    for t in range(ids.shape[1]):
        h_new, p, z = attnrnn_step_parts(
            h, x[:, t], *cell.step_weights(), num_heads=cell.num_heads
        )
        keep = mask[:, t]
        p, z = ops.convert_to_numpy(p)[keep], ops.convert_to_numpy(z)[keep]
        gates.append(z.mean())
        entropies.append(float(-(p * np.log(p + 1e-12)).sum(-1).mean()))
        h = ops.where(keep[:, None], h_new, h)
        states.append(ops.convert_to_numpy(h)[keep])
    return {
        "input_rms": rms(x[mask]),
        "state_rms": rms(np.concatenate(states)),
        "gate_mean": float(np.mean(gates)),
        "attention_entropy": float(np.mean(entropies)),  # log 4 = 1.386 is uniform
    }


def probe_larnn(model, ids):
    """Input and state RMS and the three parts of the gate pre-activation."""
    embedding, layer = model.layers[0], model.layers[1]
    x = embedding(ids)
    mask = ids != 0
    seq = keras.layers.RNN(layer.cell, return_sequences=True)
    hs = ops.convert_to_numpy(seq(x, mask=ops.convert_to_tensor(mask)))
    x = ops.convert_to_numpy(x)
    previous = np.concatenate([np.zeros_like(hs[:, :1]), hs[:, :-1]], axis=1)
    cell = layer.cell
    from_x = x @ ops.convert_to_numpy(cell.kernel)
    from_h = previous @ ops.convert_to_numpy(cell.recurrent_kernel)
    return {
        "input_rms": rms(x[mask]),
        "state_rms": rms(hs[mask]),
        "gates_from_input_rms": rms(from_x[mask]),
        "gates_from_state_rms": rms(from_h[mask]),
    }


def train(args, model_name, init_name, data):
    import jax

    (x, y), (xt, yt) = data
    y = y.astype("float32")
    keras.utils.set_random_seed(args.seed)
    model = build_model(args, RUNS[model_name][init_name])
    optimizer = model.optimizer  # "adam": Adam(1e-3), as the README's
    loss_fn = keras.losses.BinaryCrossentropy()
    optimizer.build(model.trainable_variables)
    groups = [group_of(v.path) for v in model.trainable_variables]

    def loss_of(trainable, non_trainable, xb, yb):
        pred, non_trainable = model.stateless_call(trainable, non_trainable, xb, training=True)
        return loss_fn(yb[:, None], pred), non_trainable

    @jax.jit
    def step(trainable, non_trainable, opt_vars, xb, yb):
        (loss, non_trainable), grads = jax.value_and_grad(loss_of, has_aux=True)(
            trainable, non_trainable, xb, yb
        )
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
        return loss, grads, trainable, non_trainable, opt_vars

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    opt_vars = [v.value for v in optimizer.variables]
    rng = np.random.default_rng(args.seed)
    probe = xt[:64]
    probe_fn = probe_attnrnn if model_name == "attnrnn" else probe_larnn
    rows, losses, order = [], [], np.array([], "int64")
    for i in range(args.steps + 1):
        if i % args.every == 0:
            for v, value in zip(model.trainable_variables, trainable):
                v.assign(value)
            row = {"step": i, "loss": float(np.mean(losses)) if losses else None}
            row.update(probe_fn(model, probe))
            if i:  # the last step's gradients, per weight group
                norms = [float(np.sqrt(np.sum(np.square(np.asarray(g))))) for g in grads]
                row["grad_norm"] = {
                    g: float(np.sqrt(sum(n**2 for n, gg in zip(norms, groups) if gg == g)))
                    for g in dict.fromkeys(groups)
                }
            rows.append(row)
            losses = []
            print(json.dumps({"init": init_name, **row}), flush=True)
        if i == args.steps:
            break
        if len(order) < args.batch_size:
            order = np.concatenate([order, rng.permutation(len(x))])
        batch, order = order[: args.batch_size], order[args.batch_size:]
        loss, grads, trainable, non_trainable, opt_vars = step(
            trainable, non_trainable, opt_vars, x[batch], y[batch]
        )
        losses.append(float(loss))
    for v, value in zip(model.trainable_variables, trainable):
        v.assign(value)
    _, accuracy = model.evaluate(xt, yt, verbose=0)
    print(f"{model_name} ({init_name}): test accuracy after {args.steps} steps: {accuracy:.4f}")
    return {"rows": rows, "test_accuracy": float(accuracy)}


def plot(model_name, results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (["loss", "scale", "gate_mean", "attention_entropy", "grad:embedding", "grad:gates"]
            if model_name == "attnrnn" else
            ["loss", "scale", "gates_from", "grad:attention", "grad:embedding", "grad:gates"])
    titles = {
        "loss": "training loss (mean of each window)",
        "scale": "RMS: input (dashed) and state (solid)",
        "gate_mean": "mean gate z",
        "attention_entropy": "attention entropy (log 4 = uniform)",
        "gates_from": "gate pre-activation RMS: from x (dashed), from h (solid)",
        "grad:embedding": "gradient norm: embedding",
        "grad:gates": "gradient norm: gate weights",
        "grad:attention": "gradient norm: attention weights",
    }
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, key in zip(axes.flat, keys):
        for (init, result), color in zip(results.items(), ("C0", "C3")):
            rows = result["rows"]
            steps = [r["step"] for r in rows]
            label = f"{init} ({result['test_accuracy']:.1%} test)"
            if key == "scale":
                ax.plot(steps, [r["state_rms"] for r in rows], color=color, label=label)
                ax.plot(steps, [r["input_rms"] for r in rows], color=color, ls="--")
                ax.set_yscale("log")
            elif key == "gates_from":
                ax.plot(steps, [r["gates_from_state_rms"] for r in rows], color=color, label=label)
                ax.plot(steps, [r["gates_from_input_rms"] for r in rows], color=color, ls="--")
                ax.set_yscale("log")
            elif key.startswith("grad:"):
                g = key[5:]
                rs = [r for r in rows if "grad_norm" in r]
                ax.plot([r["step"] for r in rs], [r["grad_norm"][g] for r in rs],
                        color=color, label=label)
                ax.set_yscale("log")
            else:
                rs = [r for r in rows if r.get(key) is not None]
                ax.plot([r["step"] for r in rs], [r[key] for r in rs], color=color, label=label)
        ax.set_title(titles[key], fontsize=10)
        ax.set_xlabel("training step (batch 32)")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=9)
    fig.suptitle(f"{model_name}: README model, quick IMDB subset, Keras defaults but the layer")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="attnrnn", choices=sorted(RUNS))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--units", type=int, default=64)
    parser.add_argument("--maxlen", type=int, default=100)
    parser.add_argument("--train-size", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--plot", default=None, help="default docs/img/training_dynamics_<model>.png")
    parser.add_argument("--results", default="runs/training_dynamics.jsonl")
    # imdb.py's quick subset and model: 20k words, the first 1000 test reviews.
    parser.set_defaults(num_words=20000, quick=True)
    args = parser.parse_args()
    if keras.config.backend() != "jax":
        raise SystemExit("training_dynamics.py takes gradients with jax: run it with KERAS_BACKEND=jax")
    data = load(args)
    results = {name: train(args, args.model, name, data) for name in RUNS[args.model]}
    from _experiment import record

    record(args.results, experiment="training_dynamics", model=args.model, seed=args.seed,
           steps=args.steps, runs=results)
    plot(args.model, results, args.plot or f"docs/img/training_dynamics_{args.model}.png")


if __name__ == "__main__":
    main()
