"""The package's front door: a source checkout that was never installed
fails to import with a message that says how to install it."""

import subprocess
import sys

from helpers import REPO


def test_uninstalled_checkout_raises_import_error_naming_pip_install():
    # -S: no site-packages, so no editable install maps `keras_attnrnn.ops`
    # to `ops/`; the repository root is the working directory, as when
    # `python` is started there.
    result = subprocess.run(
        [sys.executable, "-S", "-c", "import keras_attnrnn"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "pip install -e ." in result.stderr
