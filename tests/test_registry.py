import importlib
import json
import logging
import pkgutil
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

import fedllm
from fedllm.cli import list_plugins
from fedllm.recipe import recipe_from_dict
from fedllm.registry import ALL, STRATEGIES, PluginError, PluginGroup, Registry


def test_fedllm_list_shows_every_plugin_with_options_and_defaults():
    text = list_plugins()
    for registry in ALL.values():
        for name in registry.names():
            assert f"  {name}:" in text
    assert "mu: float = 0.01" in text and "tiny-llama" in text


def test_the_constructor_signature_is_the_option_schema():
    reg = Registry("widget")

    @reg.register("w")
    class Widget:
        """A widget."""

        def __init__(self, size: int, colour: str = "red"):
            self.size, self.colour = size, colour

    built = reg.build({"name": "w", "size": "3"})
    assert (built.size, built.colour) == (3, "red")
    assert [o.describe() for o in reg.options("w")] == ["size: int  (required)", "colour: str = 'red'"]


def test_the_registry_imports_no_fedllm_module():
    # plugins reach the registry through entry points, so the registry sits below every plugin
    import ast

    import fedllm.registry

    tree = ast.parse(Path(fedllm.registry.__file__).read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [("." * n.level) + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.startswith(("fedllm", "."))]


OPTIONAL_EXTRAS = {"flwr", "cryptography", "lm_eval"}  # what pyproject's optional extras bring


def test_every_built_in_plugin_is_found_after_a_fresh_import():
    code = "import json\nfrom fedllm.registry import ALL\nprint(json.dumps({k: r.names() for k, r in ALL.items()}))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    fresh = json.loads(out.stdout.strip().splitlines()[-1])  # only the registry imported: entry points bring the rest
    for module in pkgutil.walk_packages(fedllm.__path__, "fedllm.", onerror=lambda name: None):  # every module here
        if not module.name.endswith("__main__"):
            try:
                importlib.import_module(module.name)
            except ModuleNotFoundError as err:  # a module of an optional extra (fedllm[flower], fedllm[eval])
                if err.name.split(".")[0] not in OPTIONAL_EXTRAS:
                    raise
    for kind, registry in ALL.items():
        built_in = [n for n in registry.names() if registry.get(n).__module__.startswith("fedllm.")]  # not the tests'
        assert sorted(built_in) == fresh[kind]
    assert {"ferret", "scaffold", "dp_fedavg", "rqm", "dirichlet", "uniform", "sign_flip"} <= {n for v in fresh.values() for n in v}


def test_a_plugin_that_fails_to_import_names_its_entry_point(monkeypatch):
    import fedllm.registry

    broken = EntryPoint(name="broken", value="no_such_package.plugins", group="fedllm.plugins")
    monkeypatch.setattr(fedllm.registry, "entry_points", lambda group: [broken])
    group = PluginGroup("fedllm.plugins")
    for _ in range(2):  # and again on the next lookup, not a confusing 'unknown strategy'
        with pytest.raises(PluginError) as err:
            group.load()
        text = str(err.value)
        assert "'broken = no_such_package.plugins'" in text and "No module named 'no_such_package'" in text
        assert "\n" not in text


def test_a_deprecated_alias_builds_the_same_strategy_and_warns_once_with_the_new_name(caplog):
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        old = STRATEGIES.build({"name": "fedavg_m", "beta": 0.3})
    new = STRATEGIES.build({"name": "fedavg_client_momentum", "beta": 0.3})
    assert type(old) is type(new) and old.beta == new.beta == 0.3
    [warning] = [r.getMessage() for r in caplog.records]
    assert "'fedavg_m' is deprecated" in warning and "'fedavg_client_momentum'" in warning and "\n" not in warning
    assert "fedavg_m" not in STRATEGIES.names() and "  fedavg_m:" not in list_plugins()  # fedllm list: the new name only
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        recipe = recipe_from_dict({"strategy": {"name": "fedavg_m"}})
    assert recipe.strategy["name"] == "fedavg_client_momentum" and len(caplog.records) == 1  # the run records the new name


def test_an_alias_cannot_take_a_registered_name():
    reg = Registry("widget")
    reg.register("new", deprecated_aliases=("old",))(dict)
    for name in ("new", "old"):
        with pytest.raises(ValueError, match=f"widget '{name}' is registered twice"):
            reg.register(name)(list)
    assert reg.names() == ["new"] and reg.get("old") is dict
