"""The Aaren examples run end to end in quick mode (CI's smoke test), per
backend. About 20-40 s each on 2 cores: kept out of the unit-test files."""

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


@pytest.mark.slow
def test_etth1_forecast_quick():
    out = run_example("etth1_forecast.py", "--quick", "--horizon", "96")
    found = re.search(r"horizon 96: test MSE ([0-9.]+), MAE ([0-9.]+)", out)
    mse, mae = float(found.group(1)), float(found.group(2))
    # One epoch on a sixteenth of the windows: well short of the published
    # figures, but far better than predicting the last value blindly.
    assert 0 < mse < 1.5 and 0 < mae < 1.0, (mse, mae)
    assert "529 training, 697 validation, 2785 test windows" in out
    assert f"aaren_scan implementation: {BACKEND}_chunked" in out


@pytest.mark.slow
@pytest.mark.parametrize(
    "dataset, model", [("JapaneseVowels", "aaren"), ("BasicMotions", "larnn")]
)
def test_uea_classify_quick(dataset, model):
    out = run_example("uea_classify.py", "--quick", "--dataset", dataset, "--model", model)
    accuracy = float(
        re.search(rf"{model} on {dataset}: test accuracy ([0-9.]+)", out).group(1)
    )
    chance = 1 / 9 if dataset == "JapaneseVowels" else 1 / 4
    assert chance < accuracy <= 1.0, accuracy
