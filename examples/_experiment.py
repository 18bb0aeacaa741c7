"""Small helpers shared by the experiment scripts in examples/.

Results are appended as JSON lines (one per run: the config, per-epoch
history, the final figures, wall time and machine), so long experiments can
run in parts and be summarized and plotted afterwards.
"""

import json
import os
import platform
import time

import keras


def machine():
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                cpu,
            )
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


class EpochClock(keras.callbacks.Callback):
    """Records each epoch's wall time into the history."""

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = time.perf_counter() - self._start


def record(path, **fields):
    """Appends one run to the JSON-lines file at `path`."""
    fields.setdefault("backend", keras.config.backend())
    fields.setdefault("keras", keras.version())
    fields.setdefault("machine", machine())
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(fields) + "\n")
    print(f"recorded in {path}")


def load_records(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def history_lists(history):
    return {k: [float(v) for v in vs] for k, vs in history.history.items()}
