"""The Triton kernels, run by `triton_cases.py` in a fresh process.

Triton's interpreter has to be switched on (``TRITON_INTERPRET=1``) before
triton is first imported, and on the torch backend Keras imports triton as
soon as it is installed, so this process (whose conftest imported Keras)
cannot interpret kernels. It runs `triton_cases.py` once in a new pytest
process, with ``TRITON_INTERPRET=1`` when there is no CUDA device, and
reports each of its test functions here: one test below per function there,
passing when every case of it passed (none skipped).

Skipped on the jax and tensorflow backends and where triton is missing.
"""

import ast
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import pytest

from helpers import BACKEND
from helpers import REPO

if BACKEND != "torch":
    pytest.skip("the Triton kernels serve the torch backend", allow_module_level=True)
torch = pytest.importorskip("torch")
pytest.importorskip("triton")

CASES = os.path.join(REPO, "tests", "triton_cases.py")


def _functions():
    with open(CASES) as f:
        tree = ast.parse(f.read())
    return [
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    ]


def _run_cases(xml):
    """Runs triton_cases.py once, its JUnit report in `xml`; the tail of
    its output."""
    env = dict(os.environ, KERAS_BACKEND="torch")
    if "TRITON_INTERPRET" not in env and not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "-p", "no:xdist", f"--junitxml={xml}", CASES,
        ],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=900,
    )
    return f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """`{function: [(case id, outcome, text)]}` from one run of the cases,
    shared by the xdist workers of this session (the first one runs it)."""
    from filelock import FileLock  # (a dependency of torch)

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this session's, common to its workers
    xml = root / "triton_cases.xml"
    summary = ""
    with FileLock(str(xml) + ".lock"):
        if not xml.exists():
            summary = _run_cases(xml)
    if not xml.exists():
        pytest.fail(f"the cases did not run:\n{summary}")
    outcomes = {}
    for case in ElementTree.parse(xml).iter("testcase"):
        name = case.get("name")
        outcome, text = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag
                text = (child.get("message") or "") + "\n" + (child.text or "")
        outcomes.setdefault(name.split("[")[0], []).append((name, outcome, text))
    return outcomes, summary


@pytest.mark.parametrize("function", _functions())
def test_triton(function, report):
    outcomes, summary = report
    cases = outcomes.get(function)
    assert cases, f"{function} did not run in triton_cases.py:\n{summary}"
    bad = [(name, outcome, text) for name, outcome, text in cases if outcome != "passed"]
    assert not bad, "\n\n".join(f"{n}: {o}\n{t[-3000:]}" for n, o, t in bad)
