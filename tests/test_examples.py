"""The examples run end to end in quick mode (CI's smoke test), per backend."""

import os
import re
import subprocess
import sys

import pytest

from helpers import BACKEND
from helpers import REPO


def run_example(script, *args, timeout=600):
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_imdb_quick(tmp_path):
    out = run_example("imdb.py", "--quick", "--output", str(tmp_path / "imdb.keras"))
    accuracy = float(re.search(r"test accuracy: ([0-9.]+)", out).group(1))
    assert 0.0 <= accuracy <= 1.0
    assert "reloaded predictions match: True" in out
    assert os.path.exists(tmp_path / "imdb.keras")
