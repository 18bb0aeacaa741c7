"""The ops registry on its own, with fake implementations."""

import logging
import sys
import types

import pytest

from keras_attnrnn.ops.registry import ENV_VAR
from keras_attnrnn.ops.registry import Implementation
from keras_attnrnn.ops.registry import Registry

MODULE = "fake_op_module_for_registry_tests"


@pytest.fixture
def registry(monkeypatch):
    module = types.ModuleType(MODULE)
    for name in ("reference", "fast", "faster", "gpu_only"):
        setattr(module, name, lambda name=name: name)
    monkeypatch.setitem(sys.modules, MODULE, module)
    monkeypatch.delenv(ENV_VAR, raising=False)
    registry = Registry()

    def add(name, priority, fused=True, **kwargs):
        registry.register(
            Implementation(
                op="op", name=name, module=MODULE, function=name,
                priority=priority, fused=fused, **kwargs,
            )
        )

    add("reference", 0, fused=False)
    add("fast", 10, backends=("jax", "torch"))
    add(
        "faster", 20, backends=("jax",),
        supports=lambda call: (not call.get("mask"), "masks are not supported"),
    )
    add("gpu_only", 30, backends=("jax",), devices=("gpu",))
    return registry


def select(registry, mode=None, backend="jax", device="cpu", **call):
    return registry.select("op", backend, device, call, mode).name


def test_auto_takes_the_highest_priority_that_supports_the_call(registry):
    assert select(registry) == "faster"
    assert select(registry, mask=True) == "fast"
    assert select(registry, device="gpu") == "gpu_only"
    assert select(registry, backend="torch") == "fast"
    assert select(registry, backend="tensorflow") == "reference"
    assert registry.selected("op") == "reference"


def test_explicit_modes(registry):
    assert select(registry, "reference") == "reference"
    assert select(registry, "fused") == "faster"
    assert select(registry, "fast") == "fast"
    chosen = registry.select("op", "jax", "cpu", {}, "fast")
    assert chosen.load()() == "fast"


def test_fused_that_cannot_serve_raises_with_the_reasons(registry):
    with pytest.raises(ValueError, match="no implementation for backend 'tensorflow'"):
        select(registry, "fused", backend="tensorflow")
    registry.register(
        Implementation(op="op2", name="reference", module=MODULE,
                       function="reference", fused=False)
    )
    registry.register(
        Implementation(op="op2", name="fast", module=MODULE, function="fast",
                       supports=lambda call: (False, "never"))
    )
    with pytest.raises(ValueError, match="fast: never"):
        registry.select("op2", "jax", "cpu", {}, "fused")


def test_a_named_implementation_that_does_not_serve_raises(registry):
    with pytest.raises(ValueError, match="'faster'.*'torch'"):
        select(registry, "faster", backend="torch")
    with pytest.raises(ValueError, match="masks are not supported"):
        select(registry, "faster", mask=True)


def test_auto_raises_not_implemented_when_even_the_reference_declines(registry):
    registry.register(
        Implementation(op="op3", name="reference", module=MODULE, function="reference",
                       fused=False, supports=lambda call: (False, "int inputs"))
    )
    with pytest.raises(NotImplementedError, match="int inputs"):
        registry.select("op3", "jax", "cpu", {}, "auto")


def test_unavailable_implementations_are_skipped(registry):
    registry.register(
        Implementation(op="op", name="missing", module=MODULE, function="fast",
                       priority=99, available=lambda: (False, "lib not installed"))
    )
    assert select(registry) == "faster"
    with pytest.raises(ValueError, match="lib not installed"):
        select(registry, "missing")


def test_environment_variable(registry, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "reference")
    assert select(registry) == "reference"
    assert select(registry, "auto") == "reference"
    assert select(registry, "fast") == "fast"  # an explicit choice wins
    monkeypatch.setenv(ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=f"{ENV_VAR}.*nonsense"):
        select(registry)


def test_unknown_names_raise(registry):
    with pytest.raises(ValueError, match="implementation.*'cudnn'"):
        registry.check_mode("op", "cudnn")
    with pytest.raises(ValueError, match="Unknown op 'nope'"):
        registry.implementations("nope")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(
            Implementation(op="op", name="fast", module=MODULE, function="fast")
        )


def test_choice_is_logged_once_and_rejections_are_explained(registry, caplog):
    with caplog.at_level(logging.INFO, logger="keras_attnrnn.ops"):
        for _ in range(3):
            select(registry, mask=True)
    records = [r for r in caplog.records if r.name == "keras_attnrnn.ops"]
    assert len(records) == 1
    assert "'fast'" in records[0].getMessage()
    assert "faster declined: masks are not supported" in records[0].getMessage()


def test_registry_module_imports_neither_keras_nor_a_backend():
    import subprocess

    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('registry', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "bad = [m for m in ('keras', 'jax', 'tensorflow', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    import keras_attnrnn.ops.registry as registry_module

    subprocess.run([sys.executable, "-c", code, registry_module.__file__], check=True)
