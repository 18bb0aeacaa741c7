"""IMDB with the AttnRNN paper's own protocol (the public code's script).

The protocol of the paper's IMDB table: whitespace tokens of the raw review
text (no lowercasing, punctuation kept), a vocabulary of every training token,
the first 200 tokens, post padding with 0 (unknown test words are 0 too), no
mask, the last step's output, N(0, 1) embeddings, H = 128, a 2-logit softmax
head, Adam(1e-3), batch 128, 10 epochs, and the **test** accuracy reported
after every epoch: this reproduces the paper's protocol, which has no
validation split (our standard pipeline, `imdb_standard.py`, has one).

    python examples/imdb_paper.py --model attnrnn --seeds 1,2,3
    python examples/imdb_paper.py --model torch_reference --seeds 1,2,3
    python examples/imdb_paper.py --model gru            # or lstm
    python examples/imdb_paper.py --quick                # smoke test

`torch_reference` trains an independent plain-PyTorch port of the model (SPEC
§3.1, PyTorch's default initializers, the public code's training loop) to give
the reference learning curve under the same protocol on the same machine.
Each run appends a JSON line to `--results` (default
runs/imdb_paper.jsonl). Each run checkpoints after every epoch under
`--runs-dir` (default runs/): `--resume` continues an interrupted run from
its last epoch and skips finished ones (docs/results.md, "Resumable runs").
"""

import argparse
import os
import random
import time

import numpy as np

from _experiment import EpochClock
from _experiment import Run
from _experiment import StepLoss
from _experiment import TorchAdam
from _experiment import stop_if_asked
from _experiment import add_run_arguments
from _experiment import run_config
from _experiment import window_means


def encode(data_dir, maxlen, quick):
    import keras_attnrnn

    (train_texts, train_y), (test_texts, test_y) = keras_attnrnn.datasets.imdb.load_text(
        data_dir=data_dir
    )
    if quick:
        rng = np.random.default_rng(0)
        tr, te = rng.permutation(len(train_texts))[:2000], rng.permutation(len(test_texts))[:1000]
        train_texts, train_y = [train_texts[i] for i in tr], train_y[tr]
        test_texts, test_y = [test_texts[i] for i in te], test_y[te]
    vocab = {"<PAD>": 0}
    for text in train_texts:
        for word in text.split():
            vocab.setdefault(word, len(vocab))

    def to_ids(texts):
        ids = np.zeros((len(texts), maxlen), dtype="int32")
        for i, text in enumerate(texts):
            words = [vocab.get(w, 0) for w in text.split()[:maxlen]]
            ids[i, : len(words)] = words
        return ids

    return (to_ids(train_texts), train_y), (to_ids(test_texts), test_y), len(vocab)


def keras_model(kind, vocab_size, units, maxlen, initialization="reference"):
    """The Keras model of the protocol: N(0, 1) embeddings, the recurrent
    layer (`attnrnn` with `initialization`, `gru`, `lstm`), a 2-logit head
    with PyTorch's `Linear` initialization."""
    import keras

    import keras_attnrnn

    torch_linear = keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform")
    recurrent = {
        "attnrnn": lambda: keras_attnrnn.AttnRNN(units, initialization=initialization),
        "gru": lambda: keras.layers.GRU(units),
        "lstm": lambda: keras.layers.LSTM(units),
    }[kind]()
    return keras.Sequential([
        keras.Input((maxlen,), dtype="int32"),
        keras.layers.Embedding(
            vocab_size, units,
            embeddings_initializer=keras.initializers.RandomNormal(stddev=1.0),
        ),
        recurrent,
        keras.layers.Dense(
            2,
            kernel_initializer=torch_linear,
            bias_initializer=keras.initializers.RandomUniform(-units**-0.5, units**-0.5),
        ),
    ])


def keras_run(args, seed, data, run):
    import keras

    import keras_attnrnn

    (x_train, y_train), (x_test, y_test), vocab_size = data
    keras.utils.set_random_seed(seed)
    model = keras_model(args.model, vocab_size, args.units, args.maxlen, args.initialization)
    adam = TorchAdam if args.optimizer == "torch_adam" else keras.optimizers.Adam
    model.compile(
        adam(1e-3, epsilon=1e-8),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    steps = StepLoss()
    h = run.fit(
        model, x_train, y_train, batch_size=128, epochs=args.epochs, shuffle=True,
        validation_data=(x_test, y_test),  # the paper's protocol: test each epoch
        callbacks=[EpochClock(), steps], step_loss=steps, verbose=2,
    )
    return {
        "test_accuracy": h["val_accuracy"],
        "train_loss": h["loss"],
        "step_loss_20": window_means(run.step_losses(), 20),
        "epoch_seconds": h["epoch_seconds"],
        "implementation": keras_attnrnn.ops.selected("attnrnn"),
    }


def torch_reference_model(vocab_size, units, heads=4):
    """The plain-PyTorch port of SPEC §3.1 (the public code's model) with
    PyTorch's default initializers: embedding, the cell over every step from
    h0 = 0.001, a 2-logit head on the last state."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.query = nn.Linear(units, units)
            self.output = nn.Linear(units, units)
            self.gate = nn.Linear(2 * units, units)
            self.norm = nn.LayerNorm(units)

        def forward(self, h, x):
            b = h.shape[0]
            context = torch.stack([h, x, h + x, h * x], 1).view(b, 4, heads, -1)
            q = self.query(h).view(b, 1, heads, -1)
            scores = (q * context).sum(-1) / (units // heads) ** 0.5
            o = (scores.softmax(1).unsqueeze(-1) * context).sum(1).reshape(b, units)
            a = F.gelu(self.output(o))
            z = torch.sigmoid(self.gate(torch.cat([h, a], -1)))
            return z * self.norm(a + h) + (1 - z) * h

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(vocab_size, units)
            self.cell = Cell()
            self.fc = nn.Linear(units, 2)

        def forward(self, ids):
            x = self.embedding(ids)
            h = torch.full((ids.shape[0], units), 0.001)
            for t in range(ids.shape[1]):
                h = self.cell(h, x[:, t])
            return self.fc(h)

    return Model()


def torch_reference_run(args, seed, data, run):
    """Trains `torch_reference_model` with the public code's loop."""
    import torch
    import torch.nn.functional as F

    (x_train, y_train), (x_test, y_test), vocab_size = data
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = torch_reference_model(vocab_size, args.units)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x_train).long(), torch.from_numpy(y_train).long()
    xs, ys = torch.from_numpy(x_test).long(), torch.from_numpy(y_test).long()
    result = {"test_accuracy": [], "train_loss": [], "epoch_seconds": []}
    all_losses = []
    if run.done:
        # The checkpoint: model, optimizer, the RNG states, the curve so far.
        saved = torch.load(os.path.join(run.dir, run.state["files"][0]), weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["torch_rng"])
        np.random.set_state(saved["numpy_rng"])
        random.setstate(saved["python_rng"])
        result, all_losses = saved["result"], saved["all_losses"]
        run.resumed()
    for epoch in range(run.done, args.epochs):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(xt))
        losses = []
        for i in range(0, len(xt), 128):
            batch = order[i : i + 128]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(xt[batch]), yt[batch])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            all_losses.append(losses[-1])
        model.eval()
        with torch.no_grad():
            correct = sum(
                (model(xs[i : i + 256]).argmax(1) == ys[i : i + 256]).sum().item()
                for i in range(0, len(xs), 256)
            )
        result["test_accuracy"].append(correct / len(xs))
        result["train_loss"].append(float(np.mean(losses)))
        result["epoch_seconds"].append(time.perf_counter() - start)
        print(f"epoch {epoch + 1}: loss {result['train_loss'][-1]:.4f}, "
              f"test accuracy {result['test_accuracy'][-1]:.4f}", flush=True)
        name = f"checkpoint-{epoch + 1:04d}.pt"
        torch.save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "epoch": epoch + 1, "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(), "python_rng": random.getstate(),
            "result": result, "all_losses": all_losses,
        }, os.path.join(run.dir, name + ".tmp"))
        os.replace(os.path.join(run.dir, name + ".tmp"), os.path.join(run.dir, name))
        run.write_state(
            epoch + 1,
            [{"epoch": i + 1, **{k: v[i] for k, v in result.items()}}
             for i in range(epoch + 1)],
            None, files=[name],
        )
        stop_if_asked(epoch + 1)
    result["step_loss_20"] = window_means(all_losses, 20)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="attnrnn",
                        choices=["attnrnn", "gru", "lstm", "torch_reference"])
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--units", type=int, default=128)
    parser.add_argument("--initialization", default="reference",
                        choices=["reference", "default"],
                        help="AttnRNN's initialization (reference: the public code's)")
    parser.add_argument("--optimizer", default="adam", choices=["adam", "torch_adam"],
                        help="Keras's Adam, or Adam with PyTorch's epsilon placement")
    parser.add_argument("--maxlen", type=int, default=200)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--results", default="runs/imdb_paper.jsonl")
    parser.add_argument("--quick", action="store_true", help="2000/1000 reviews, 1 epoch")
    add_run_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        args.epochs = 1
    data = encode(args.data_dir, args.maxlen, args.quick)
    print(f"vocabulary: {data[2]} tokens; {len(data[0][0])} train, {len(data[1][0])} test")
    for seed in [int(s) for s in args.seeds.split(",")]:
        run = Run("imdb_paper", f"{args.model}-seed{seed}",
                  dict(run_config(args, drop=["seeds"]), seed=seed),
                  args.runs_dir, args.resume)
        if run.skip(args.results):
            continue
        train = torch_reference_run if args.model == "torch_reference" else keras_run
        result = train(args, seed, data, run)
        print(f"{args.model} seed {seed}: test accuracy per epoch "
              + " ".join(f"{a:.4f}" for a in result["test_accuracy"]))
        extra = {"initialization": args.initialization} if args.model == "attnrnn" else {}
        if args.model != "torch_reference":
            extra["optimizer"] = args.optimizer
        run.record(args.results, experiment="imdb_paper", model=args.model, seed=seed,
                   **extra, epochs=args.epochs, quick=args.quick,
                   wall_seconds=run.wall_seconds(), **result)


if __name__ == "__main__":
    main()
