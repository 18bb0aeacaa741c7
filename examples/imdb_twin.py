"""The PyTorch reference and the Keras port, from the same weights, on the same batches.

The AttnRNN paper's IMDB protocol (`imdb_paper.py`): the plain-PyTorch model
(`torch_reference_model`, PyTorch's initializers) and the Keras model
(`keras_model`, `AttnRNN` with `initialization="reference"`) are drawn from
`--seed`; the weights of the side `--init` names are copied into the other,
and both train on the same batches in the same order (one permutation per
epoch from NumPy's `--seed`): PyTorch with `torch.optim.Adam`, Keras with
`model.train_on_batch` and `--optimizer` (`torch_adam`, PyTorch's epsilon
placement, or `adam`, Keras's). Printed and recorded: the loss and the
gradient of every weight on the first batch, side by side (the same math
gives the same numbers up to float32 rounding), then every step's training
loss of both, and every `--every` steps how far apart their weights are
(the largest difference of a weight over how far PyTorch's training has
moved it: 0 when the two agree, 1 when they differ as much as they moved). When the two leave the loss plateau at the same step, the
difference between their learning curves over seeds is in the seeds (the
draws of the initial weights and the batch order), not in the port.

    KERAS_BACKEND=jax python examples/imdb_twin.py --seed 4 --steps 392
    KERAS_BACKEND=jax python examples/imdb_twin.py --seed 4 --steps 392 --init keras
    python examples/imdb_twin.py --quick        # 2000 reviews, 10 steps
"""

import argparse
import time

import numpy as np

from imdb_paper import encode
from imdb_paper import keras_model
from imdb_paper import torch_reference_model

# Keras weight (by the layer's variable name) <- PyTorch parameter, and
# whether the PyTorch matrix is transposed (Linear keeps (out, in)).
WEIGHTS = {
    "embeddings": ("embedding.weight", False),
    "query_kernel": ("cell.query.weight", True),
    "query_bias": ("cell.query.bias", False),
    "output_kernel": ("cell.output.weight", True),
    "output_bias": ("cell.output.bias", False),
    "gate_kernel": ("cell.gate.weight", True),
    "gate_bias": ("cell.gate.bias", False),
    "gamma": ("cell.norm.weight", False),
    "beta": ("cell.norm.bias", False),
    "kernel": ("fc.weight", True),
    "bias": ("fc.bias", False),
}


def pairs(keras_model_, torch_model):
    """[(keras variable, torch parameter name, transposed)] for every weight."""
    params = dict(torch_model.named_parameters())
    result = []
    for variable in keras_model_.weights:
        name, transposed = WEIGHTS[variable.name]
        assert tuple(params[name].shape[::-1] if transposed else params[name].shape) == \
            tuple(variable.shape), (variable.path, name)
        result.append((variable, name, transposed))
    assert len(result) == len(params), "every PyTorch parameter has its Keras weight"
    return result


def torch_value(param, transposed):
    """A copy (`.numpy()` shares the parameter's memory, which training changes)."""
    value = param.detach().numpy().copy()
    return value.T if transposed else value


def moved_apart(keras_value, torch_value_, initial):
    """max |Keras - PyTorch| / max |PyTorch - initial|: 0 when the two
    trainings agree, 1 when they differ as much as training moved the weight."""
    return float(np.abs(keras_value - torch_value_).max()
                 / max(np.abs(torch_value_ - initial).max(), 1e-12))


def first_batch_gradients(model, torch_model, matched, x, y):
    """{name: relative difference of the two gradients} and the two losses."""
    import jax
    import keras
    import torch
    import torch.nn.functional as F

    from _experiment import rel_error

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss(trainable, non_trainable):
        logits, _ = model.stateless_call(trainable, non_trainable, x, training=True)
        return loss_fn(y, logits)

    value, grads = jax.value_and_grad(loss)(
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables])
    torch_model.zero_grad()
    torch_loss = F.cross_entropy(torch_model(torch.from_numpy(x).long()),
                                 torch.from_numpy(y).long())
    torch_loss.backward()
    params = dict(torch_model.named_parameters())
    by_variable = {id(v): g for v, g in zip(model.trainable_variables, grads)}
    differences = {}
    for variable, name, transposed in matched:
        differences[variable.name] = rel_error(np.asarray(by_variable[id(variable)]),
                                               torch_value(params[name].grad, transposed))
    return float(value), float(torch_loss.detach()), differences


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=392, help="training steps (196 an epoch)")
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--units", type=int, default=128)
    parser.add_argument("--maxlen", type=int, default=200)
    parser.add_argument("--optimizer", default="torch_adam", choices=["adam", "torch_adam"])
    parser.add_argument("--init", default="torch", choices=["torch", "keras"],
                        help="which side draws the initial weights (from --seed)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--results", default="runs/imdb_twin.jsonl")
    parser.add_argument("--quick", action="store_true", help="2000 reviews, 10 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.every = 10, 5

    # torch.optim imports torch._dynamo, which imports triton where it is
    # installed: loaded after jax has compiled, triton's LLVM aborts the
    # process ("inconsistency in registered CommandLine options").
    import torch
    import torch._dynamo  # noqa: F401
    import keras

    if keras.config.backend() != "jax":
        parser.error("the first batch's gradients are taken with jax: KERAS_BACKEND=jax")

    from _experiment import TorchAdam
    from _experiment import record

    (x_train, y_train), _, vocab_size = encode(args.data_dir, args.maxlen, args.quick)
    torch.manual_seed(args.seed)
    torch_model = torch_reference_model(vocab_size, args.units)
    keras.utils.set_random_seed(args.seed)
    model = keras_model("attnrnn", vocab_size, args.units, args.maxlen, "reference")
    matched = pairs(model, torch_model)
    params = dict(torch_model.named_parameters())
    for variable, name, transposed in matched:
        if args.init == "torch":
            variable.assign(torch_value(params[name], transposed))
        else:
            value = keras.ops.convert_to_numpy(variable)
            with torch.no_grad():
                params[name].copy_(torch.from_numpy(value.T if transposed else value))

    rng = np.random.default_rng(args.seed)
    batches = []
    while len(batches) < args.steps:
        order = rng.permutation(len(x_train))
        batches += [order[i:i + 128] for i in range(0, len(order), 128)]
    batches = batches[:args.steps]

    x0, y0 = x_train[batches[0]], y_train[batches[0]].astype("int32")
    keras_loss, torch_loss, gradients = first_batch_gradients(model, torch_model, matched,
                                                              x0, y0)
    print(f"first batch: loss Keras {keras_loss:.7f}, PyTorch {torch_loss:.7f}")
    for name, difference in gradients.items():
        print(f"  gradient of {name}: relative difference {difference:.1e}")

    adam = TorchAdam if args.optimizer == "torch_adam" else keras.optimizers.Adam
    model.compile(adam(1e-3, epsilon=1e-8),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    optimizer = torch.optim.Adam(torch_model.parameters(), lr=1e-3)
    losses = {"keras": [], "torch": []}
    weight_difference = []
    initial = {n: torch_value(params[n], t) for _, n, t in matched}
    start = time.perf_counter()
    for step, batch in enumerate(batches, 1):
        x, y = x_train[batch], y_train[batch].astype("int32")
        losses["keras"].append(float(model.train_on_batch(x, y)))
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(torch_model(torch.from_numpy(x).long()),
                                                 torch.from_numpy(y).long())
        loss.backward()
        optimizer.step()
        losses["torch"].append(float(loss.detach()))
        if step % args.every == 0 or step == len(batches):
            # Each weight's difference over how far PyTorch's training moved it.
            worst = max(moved_apart(keras.ops.convert_to_numpy(v), torch_value(params[n], t),
                                    initial[n]) for v, n, t in matched)
            weight_difference.append((step, worst))
            window = slice(step - args.every, step)
            print(f"step {step}: loss (mean of {args.every}) Keras "
                  f"{np.mean(losses['keras'][window]):.4f}, PyTorch "
                  f"{np.mean(losses['torch'][window]):.4f}; weights apart {worst:.2f}",
                  flush=True)
    if args.results:
        record(args.results, experiment="imdb_twin", seed=args.seed, steps=args.steps,
               optimizer=args.optimizer, init=args.init, quick=args.quick, units=args.units,
               maxlen=args.maxlen, first_batch_loss={"keras": keras_loss, "torch": torch_loss},
               first_batch_gradient_difference=gradients, losses=losses,
               weight_difference=weight_difference,
               wall_seconds=time.perf_counter() - start, torch=torch.__version__)
    return losses


if __name__ == "__main__":
    main()
