"""Aaren against causal `keras.layers.MultiHeadAttention`: time and memory.

One command measures, per backend, side by side in one run (each model in a
new process of its own, after warm-up, over several repeats):

* the training step (forward + backward + SGD update, `train_on_batch`) of
  `Input((T, D)) -> layer -> MSE`, for `Aaren(D, num_heads, return_sequences=True)`
  and for `MultiHeadAttention(num_heads, key_dim=D // num_heads)` called with
  `use_causal_mask=True` (same width and heads); its time (min and median)
  and the peak memory growth from before its first call (compilation
  included) to its last (GPU: the device allocator's peak; CPU: the resident
  set, sampled every millisecond by a thread);
* the streaming step of a stateful `Aaren` at batch 1: the time of one
  one-token call (a direct layer call) after `--stream-short - 1` and after
  `T - 1` tokens, and the size of the state it carries.

and prints the ratios SPEC §6 bounds (Aaren >= 10x faster; memory <= 1/10 of
MHA on jax and tensorflow, <= 1x on torch; streaming at T within 10% of the
step at `--stream-short`).

    python benchmarks/aaren_vs_mha.py                     # B=8, T=4096, D=128, 4 heads
    python benchmarks/aaren_vs_mha.py --backends torch --time 1024
    python benchmarks/aaren_vs_mha.py --batch 2 --time 64 --width 16 --repeats 2   # smoke test
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time

BACKENDS = ("jax", "tensorflow", "torch")


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory growth over a `with` block, in bytes."""

    def __init__(self, backend):
        self.backend = backend
        self.device = _device_kind(backend)
        self.peak = None

    def __enter__(self):
        if self.device == "gpu":
            self._start = _gpu_reset_and_read(self.backend)
        else:
            self._start = _rss_bytes()
            self._max = self._start
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._max = max(self._max, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device == "gpu":
            self.peak = _gpu_peak(self.backend) - self._start
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, _rss_bytes())
            self.peak = self._max - self._start


def _device_kind(backend):
    if backend == "torch":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    if backend == "jax":
        import jax

        return "gpu" if jax.default_backend() in ("gpu", "cuda") else "cpu"
    import tensorflow as tf

    return "gpu" if tf.config.list_logical_devices("GPU") else "cpu"


def _gpu_reset_and_read(backend):
    if backend == "torch":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.reset_memory_stats("GPU:0")
        return tf.config.experimental.get_memory_info("GPU:0")["current"]
    import jax

    # jax has no reset: its peak is a high-water mark since the start.
    return jax.devices()[0].memory_stats()["bytes_in_use"]


def _gpu_peak(backend):
    if backend == "torch":
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.config.experimental.get_memory_info("GPU:0")["peak"]
    import jax

    return jax.devices()[0].memory_stats()["peak_bytes_in_use"]


def _timed(fn, warmup, repeats, warmup_seconds=2.0):
    """(min, median) seconds of `fn()` over `repeats` calls, after at least
    `warmup` calls and `warmup_seconds` (a fresh torch process runs its first
    second or so of small steps tens of times slower)."""
    start = time.perf_counter()
    done = 0
    while done < warmup or time.perf_counter() - start < warmup_seconds:
        fn()
        done += 1
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[0], times[len(times) // 2]


def _sync(value):
    """Waits for an asynchronous result (jax dispatches asynchronously)."""
    import keras

    for leaf in keras.tree.flatten(value):
        keras.ops.convert_to_numpy(leaf)
    return value


class _CausalMHA:
    """`MultiHeadAttention` as self-attention with a causal mask."""

    def __new__(cls, width, heads):
        import keras

        class CausalSelfAttention(keras.layers.Layer):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                self.attention = keras.layers.MultiHeadAttention(
                    heads, key_dim=width // heads
                )

            def build(self, input_shape):
                self.attention.build(input_shape, input_shape)

            def call(self, x):
                return self.attention(x, x, use_causal_mask=True)

        return CausalSelfAttention()


def _train_step_model(name, args):
    import keras

    import keras_attnrnn

    inputs = keras.Input((args.time, args.width), batch_size=args.batch)
    if name == "aaren":
        layer = keras_attnrnn.Aaren(
            args.width, num_heads=args.heads, return_sequences=True
        )
    else:
        layer = _CausalMHA(args.width, args.heads)
    model = keras.Model(inputs, layer(inputs))
    model.compile(keras.optimizers.SGD(1e-3), "mse")
    return model


def measure_train_step(name, args, backend):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, args.time, args.width)).astype("float32")
    y = rng.normal(size=x.shape).astype("float32")
    model = _train_step_model(name, args)
    step = lambda: _sync(model.train_on_batch(x, y))  # noqa: E731
    # From the first call (compilation included) to the last: on the CPU,
    # memory freed by a warm-up step stays resident in the allocator, so a
    # later step alone shows little growth. Each model runs in a process of
    # its own (`main`), so neither inherits memory the other freed.
    with PeakMemory(backend) as memory:
        best, median = _timed(step, args.warmup, args.repeats)
    return {"min_s": best, "median_s": median, "peak_bytes": memory.peak}


def measure_streaming(args):
    """One-token calls of a stateful Aaren after a short and a long prefix.

    Direct layer calls: a stateful layer inside a compiled jax `predict`
    does not carry its state over (Keras itself; `GRU` behaves the same).
    """
    import keras
    import numpy as np

    import keras_attnrnn

    rng = np.random.default_rng(0)
    layer = keras_attnrnn.Aaren(
        args.width, num_heads=args.heads, stateful=True, return_sequences=True
    )
    layer.build((1, None, args.width))
    token = rng.normal(size=(1, 1, args.width)).astype("float32")
    result = {}
    for prefix in (args.stream_short, args.time):
        layer.reset_state()
        history = rng.normal(size=(1, prefix - 1, args.width)).astype("float32")
        if prefix > 1:
            _sync(layer(history))
        step = lambda: _sync(layer(token))  # noqa: E731
        best, median = _timed(step, args.warmup, args.stream_repeats)
        state_bytes = sum(
            int(np.prod(s.shape)) * 4 for s in layer.states
        )
        result[str(prefix)] = {
            "min_s": best,
            "median_s": median,
            "state_bytes": state_bytes,
        }
    return result


def child(args):
    import keras

    backend = keras.config.backend()
    result = {"backend": backend, "device": _device_kind(backend)}
    if args.child == "stream":
        result["stream"] = measure_streaming(args)
    else:
        try:
            result[args.child] = measure_train_step(args.child, args, backend)
        except Exception as error:  # e.g. out of memory: still report the rest
            result[args.child] = {"error": f"{type(error).__name__}: {error}"[:300]}
    if args.child != "mha":
        import keras_attnrnn

        result["implementation"] = keras_attnrnn.ops.selected("aaren_scan")
    print(json.dumps(result), flush=True)


def _run_backend(backend, argv):
    """Aaren, MHA and streaming, each in a new process on `backend`."""
    merged = {}
    for part in ("aaren", "mha", "stream"):
        result = _run_child(backend, [f"--child={part}", *argv])
        if "error" in result:
            return {"backend": backend, "error": f"{part}: {result['error']}"}
        merged.update(result)
    return merged


def _run_child(backend, argv):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *argv],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["failed"])[-1]
        return {"backend": backend, "error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ms(value):
    return "-" if value is None else f"{value * 1000:.1f} ms"


def _mb(value):
    return "-" if value is None else f"{value / 2**20:.0f} MiB"


def _ratio(a, b):
    return "-" if not a or not b else f"{a / b:.2f}"


def report(results, args):
    print(
        f"B={args.batch}, T={args.time}, D={args.width}, heads={args.heads}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} "
        f"cores; median of {args.repeats} after >= {args.warmup} warm-up calls and 2 s"
    )
    header = (
        "| backend | Aaren step | MHA step | MHA / Aaren time (>= 10) "
        "| Aaren peak | MHA peak | Aaren / MHA memory (<= 0.1 jax, tf; <= 1 torch) "
        f"| stream @{args.stream_short} | stream @{args.time} | ratio (<= 1.1) "
        "| state |"
    )
    print(header)
    print("|" + "---|" * 11)
    for r in results:
        if "error" in r:
            print(f"| {r['backend']} | error: {r['error']} |")
            continue
        a, m = r["aaren"], r["mha"]
        short = r["stream"][str(args.stream_short)]["median_s"]
        long = r["stream"][str(args.time)]["median_s"]
        print(
            f"| {r['backend']} ({r['device']}, {r['implementation']}) "
            f"| {_ms(a.get('median_s'))} | {_ms(m.get('median_s'))} "
            f"| {_ratio(m.get('median_s'), a.get('median_s'))} "
            f"| {_mb(a.get('peak_bytes'))} | {_mb(m.get('peak_bytes'))} "
            f"| {_ratio(a.get('peak_bytes'), m.get('peak_bytes'))} "
            f"| {_ms(short)} | {_ms(long)} | {_ratio(long, short)} "
            f"| {r['stream'][str(args.time)]['state_bytes']} B |"
        )
        for name in ("aaren", "mha"):
            if "error" in r[name]:
                print(f"  {r['backend']} {name}: {r[name]['error']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--time", type=int, default=4096)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stream-short", type=int, default=64)
    parser.add_argument("--stream-repeats", type=int, default=50)
    parser.add_argument("--child", choices=("aaren", "mha", "stream"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    forwarded = [
        f"--{key.replace('_', '-')}={value}"
        for key, value in vars(args).items()
        if key not in ("backends", "child")
    ]
    results = [_run_backend(b, forwarded) for b in args.backends.split(",")]
    report(results, args)


if __name__ == "__main__":
    main()
