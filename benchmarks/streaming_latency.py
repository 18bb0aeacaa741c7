"""Per-token latency and memory of exported streaming steps, against a
causal Transformer decoder step with a growing key/value cache.

For AttnRNN, LARNN and Aaren (width D, `num_heads` heads, LARNN's default
window of 16), exports `keras_attnrnn.streaming_step` (one token and the
state in, the output and the new state out); for the Transformer, a decoder
step of `keras.layers.MultiHeadAttention` (same width and heads, its own
query/key/value/output projections): the token's query attends over the
cached keys and values of every earlier token and its own, and the step
returns the caches with its key and value appended. All are exported from
the tensorflow backend to ONNX and LiteRT, batch 1, float32, and each
(model, runtime, position) runs in a process of its own that imports only
NumPy and the runtime (ONNX Runtime with one thread; the LiteRT interpreter
with one thread and its default XNNPACK delegate):

* the state at position P: for our models the state after P tokens, stepped
  in the runtime; for the Transformer, caches of P random keys and values
  (the step's time and memory depend on their size, not their values);
* `--warmup` steps from there, thrown away, then `--steps` timed steps from
  there again, each output state fed back (the Transformer's caches grow to
  P + steps); the median time per token;
* the bytes of the state the step takes (the caches for the Transformer) at
  position P, and the process's peak resident memory (VmHWM).

Before timing, every exported step is checked token by token against its
Keras layer on a short sequence (the Transformer against
`MultiHeadAttention(x, x, use_causal_mask=True)`).

    taskset -c 1 nice -n 5 python benchmarks/streaming_latency.py
    python benchmarks/streaming_latency.py --width 16 --positions 8,64 --steps 20   # smoke test

Needs onnxruntime, tf2onnx, onnx and ai-edge-litert (not dependencies).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

MODELS = ("attnrnn", "larnn", "aaren", "transformer")
RUNTIMES = ("onnxruntime", "litert")
SUFFIX = {"onnxruntime": ".onnx", "litert": ".tflite"}
FORMAT = {"onnxruntime": "onnx", "litert": "litert"}
CACHES = ("key_cache", "value_cache")
EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")


# --- child: NumPy and one runtime only -------------------------------------

def open_runtime(runtime, path):
    """(call, input names): `call(feed)` runs the artifact, dict to dict,
    on one thread."""
    sys.path.insert(0, EXAMPLES)
    from _runtimes import open_artifact

    call = open_artifact(FORMAT[runtime], path, threads=1)
    return call, call.inputs


def peak_rss_bytes():
    """This process's peak resident memory (VmHWM): unlike ru_maxrss, not
    inherited from the parent that forked it before exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args):
    initial = dict(np.load(args.state))
    rng = np.random.default_rng(0)
    call, inputs = open_runtime(args.runtime, args.artifact)
    position, features = args.position, args.features

    def run(state, steps, times=None):
        for _ in range(steps):
            token = rng.normal(size=(1, features)).astype("float32")
            feed = {"inputs": token, **{n: state[n] for n in state if n in inputs}}
            begin = time.perf_counter()
            out = call(feed)
            elapsed = time.perf_counter() - begin
            state = {n: np.asarray(out["new_" + n]) for n in state}
            if times is not None:
                times.append(elapsed)
        return state

    if args.model == "transformer":
        shape = initial["key_cache"].shape  # (1, 0, heads, head_dim)
        at_position = {n: rng.normal(size=(shape[0], position) + shape[2:]).astype("float32")
                       for n in CACHES}
    else:
        at_position = run(initial, position)
    # Warm-up from the state at the position, thrown away: every position
    # is timed after the same number of warm-up calls.
    run(at_position, args.warmup)
    times = []
    run(at_position, args.steps, times)
    print(json.dumps({
        "median_s": float(np.median(times)),
        "p10_s": float(np.percentile(times, 10)),
        "p90_s": float(np.percentile(times, 90)),
        "state_bytes": int(sum(at_position[n].nbytes for n in at_position if n in inputs)),
        "peak_rss_bytes": peak_rss_bytes(),
    }))


# --- parent: Keras on tensorflow exports and checks --------------------------

def build_steps(width, heads, features, directory, check_tokens):
    """Exports every model's step for every runtime; returns
    {model: {"state": path of the initial state .npz, runtime: artifact}}."""
    import keras

    import keras_attnrnn

    sys.path.insert(0, EXAMPLES)
    from _experiment import rel_error
    from serve_streaming import input_signature
    from serve_streaming import serve

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, check_tokens, features)).astype("float32")
    layers = {
        "attnrnn": keras_attnrnn.AttnRNN(width, num_heads=heads, return_sequences=True),
        "larnn": keras_attnrnn.LARNN(width, num_heads=heads, return_sequences=True),
        "aaren": keras_attnrnn.Aaren(width, num_heads=heads, return_sequences=True),
    }
    built = {}
    for name, layer in layers.items():
        expected = keras.ops.convert_to_numpy(layer(x))
        step = keras_attnrnn.streaming_step(layer, batch_size=1)
        state = keras_attnrnn.streaming_initial_state(layer, 1)
        built[name] = (step, state, expected)
    step, state, expected = transformer_step(width, heads, features, x)
    built["transformer"] = (step, state, expected)
    paths, checks = {}, {}
    for name, (step, state, expected) in built.items():
        paths[name] = {"state": os.path.join(directory, f"{name}_state.npz")}
        np.savez(paths[name]["state"], **state)
        for runtime in RUNTIMES:
            path = os.path.join(directory, f"{name}{SUFFIX[runtime]}")
            signature = input_signature(step)
            if name == "transformer":  # the caches' length varies
                signature = [{k: keras.InputSpec(shape=(1, None) + tuple(s.shape[2:]),
                                                 dtype=s.dtype, name=k)
                              if k in CACHES else s for k, s in signature[0].items()}]
            step.export(path, format=FORMAT[runtime], verbose=False,
                        input_signature=signature)
            paths[name][runtime] = path
            call, _ = open_runtime(runtime, path)
            got, _, _ = serve(call, x, state)
            checks[(name, runtime)] = rel_error(got, expected)
    return paths, checks


def transformer_step(width, heads, features, x):
    """A causal MultiHeadAttention decoder step with a key/value cache:
    (step model, empty caches, the layer's causal outputs on `x`)."""
    import keras
    from keras import ops

    head_dim = width // heads
    mha = keras.layers.MultiHeadAttention(heads, key_dim=head_dim, output_shape=width)
    expected = keras.ops.convert_to_numpy(mha(x, x, use_causal_mask=True))

    class CachedAttentionStep(keras.layers.Layer):
        """One decoder step of `mha`: the token's query over the cached
        keys and values and its own; returns the grown caches."""

        def call(self, token, key_cache, value_cache):
            token = ops.expand_dims(token, 1)  # (b, 1, features)
            query = mha.query_dense(token)  # (b, 1, heads, head_dim)
            key_cache = ops.concatenate([key_cache, mha.key_dense(token)], axis=1)
            value_cache = ops.concatenate([value_cache, mha.value_dense(token)], axis=1)
            # (b, heads, 1, t): every cached token is in the past.
            scores = ops.matmul(ops.transpose(query, (0, 2, 1, 3)),
                                ops.transpose(key_cache, (0, 2, 3, 1)))
            weights = ops.softmax(scores / float(np.sqrt(head_dim)), axis=-1)
            attended = ops.matmul(weights, ops.transpose(value_cache, (0, 2, 1, 3)))
            output = mha.output_dense(ops.transpose(attended, (0, 2, 1, 3)))
            return output[:, 0], key_cache, value_cache

    inputs = {
        "inputs": keras.Input((features,), batch_size=1, name="inputs"),
        "key_cache": keras.Input((None, heads, head_dim), batch_size=1, name="key_cache"),
        "value_cache": keras.Input((None, heads, head_dim), batch_size=1,
                                   name="value_cache"),
    }
    output, keys, values = CachedAttentionStep(name="cached_attention")(
        inputs["inputs"], inputs["key_cache"], inputs["value_cache"])
    step = keras.Model(inputs, {"outputs": output, "new_key_cache": keys,
                                "new_value_cache": values}, name="transformer_step")
    # The empty cache holds one token's worth of nothing: ONNX Runtime and
    # LiteRT take a zero-length axis.
    empty = np.zeros((1, 0, heads, head_dim), "float32")
    return step, {"key_cache": empty, "value_cache": empty.copy()}, expected


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--runtime", help=argparse.SUPPRESS)
    parser.add_argument("--artifact", help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    parser.add_argument("--position", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--positions", default="64,4096")
    parser.add_argument("--steps", type=int, default=300, help="timed steps per position")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of every configuration; the table gives their median")
    parser.add_argument("--check-tokens", type=int, default=16)
    parser.add_argument("--results", default=None, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    args.features = args.width
    if args.child:
        return child(args)
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if os.environ["KERAS_BACKEND"] != "tensorflow":
        sys.exit("streaming_latency.py exports from the tensorflow backend "
                 "(ONNX through tf2onnx, LiteRT); run it with KERAS_BACKEND=tensorflow.")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import machine

    positions = [int(p) for p in args.positions.split(",")]
    rows = {}
    with tempfile.TemporaryDirectory() as directory:
        paths, checks = build_steps(args.width, args.heads, args.features, directory,
                                    args.check_tokens)
        print(f"# {machine()}; affinity: {sorted(os.sched_getaffinity(0))}")
        print(f"# width {args.width}, {args.heads} heads, batch 1, float32; "
              f"{args.steps} timed steps after {args.warmup} warm-up steps, median; "
              f"median (and range) of {args.repeats} runs")
        for (name, runtime), error in checks.items():
            ok = "ok" if error <= 1e-5 else "DISAGREES"
            print(f"# check: {name} {runtime}: {args.check_tokens} tokens, relative "
                  f"error {error:.1e} against Keras ({ok})")
        runs = {}
        # Every configuration once per round, `--repeats` rounds: a slow spell
        # of the machine then falls on every configuration alike.
        for _ in range(args.repeats):
            for name in MODELS:
                for runtime in RUNTIMES:
                    for position in positions:
                        command = [sys.executable, os.path.abspath(__file__), "--child",
                                   "--model", name, "--runtime", runtime,
                                   "--artifact", paths[name][runtime],
                                   "--state", paths[name]["state"],
                                   "--position", str(position), "--width", str(args.width),
                                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
                        result = subprocess.run(command, capture_output=True, text=True,
                                                timeout=1800)
                        if result.returncode:
                            raise RuntimeError(f"{name} {runtime} {position}: "
                                               + result.stderr[-2000:])
                        runs.setdefault((name, runtime, position), []).append(
                            json.loads(result.stdout.strip().splitlines()[-1]))
        for key, results in runs.items():
            medians = sorted(r["median_s"] for r in results)
            rows[key] = dict(results[0], median_s=medians[len(medians) // 2],
                             run_medians_s=medians,
                             peak_rss_bytes=max(r["peak_rss_bytes"] for r in results))
    print_table(rows, positions)
    if args.results:
        with open(args.results, "w") as f:
            json.dump([dict(model=m, runtime=r, position=p, **v)
                       for (m, r, p), v in rows.items()], f, indent=1)


def print_table(rows, positions):
    print("\n| model | runtime | position | µs/token (range) | vs Transformer | "
          f"vs itself at {positions[0]} | state bytes | vs Transformer | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for runtime in RUNTIMES:
        for name in MODELS:
            for position in positions:
                row = rows[(name, runtime, position)]
                base = rows[("transformer", runtime, position)]
                first = rows[(name, runtime, positions[0])]
                low, high = row["run_medians_s"][0], row["run_medians_s"][-1]
                print(f"| {name} | {runtime} | {position} | {row['median_s'] * 1e6:.1f} "
                      f"({low * 1e6:.0f}-{high * 1e6:.0f}) | "
                      f"{row['median_s'] / base['median_s']:.2f}x | "
                      f"{row['median_s'] / first['median_s']:.2f}x | "
                      f"{row['state_bytes']:,} | "
                      f"{row['state_bytes'] / base['state_bytes']:.4f}x | "
                      f"{row['peak_rss_bytes'] / 2**20:.1f} |")


if __name__ == "__main__":
    main()
