"""Validation before anything is touched: method configs (peftsurgery.checks) and plugins that break the hook
contract, whether discovered through entry points or registered directly. Every error is one line."""
from __future__ import annotations

import dataclasses
import math

import pytest

import peftsurgery as ps
from peftsurgery import hookimpl, registry
from peftsurgery.cli import main
from peftsurgery.registry import Method
from peftsurgery.rewrite import LowRank

from conftest import raises_one_line as one_line, tiny_llama


# ---------------------------------------------------------------- method configs
@pytest.mark.parametrize("plugin,values,needles", [
    ("lora", {"alpha": math.nan}, ["alpha", "finite number above 0"]),
    ("lora", {"alpha": math.inf}, ["alpha", "inf"]),
    ("lora", {"alpha": 0}, ["alpha", "above 0"]),
    ("lora", {"alpha": -8.0}, ["alpha", "above 0"]),
    ("lora", {"alpha": True}, ["alpha", "True"]),
    ("lora", {"alpha": None}, ["alpha", "None"]),
    ("lora", {"alpha": [16]}, ["alpha", "[16]"]),
    ("lora", {"r": True}, ["r must be a positive integer", "True"]),
    ("lora", {"r": 2.0}, ["r must be a positive integer"]),
    ("lora", {"dropout": math.nan}, ["dropout", "[0, 1)"]),
    ("lora", {"dropout": True}, ["dropout", "[0, 1)"]),
    ("lora", {"dropout": None}, ["dropout", "[0, 1)"]),
    ("lora", {"rslora": 1}, ["rslora", "true or false"]),
    ("lora", {"targets": 5}, ["targets", "selector"]),
    ("adapter", {"bottleneck": True}, ["bottleneck", "positive integer"]),
    ("adapter", {"targets": ""}, ["targets", "selector"]),
    ("prompt-tuning", {"num_tokens": True}, ["num_tokens", "positive integer"]),
    ("prompt-tuning", {"seed": False}, ["seed", "an integer"]),
    ("prefix-tuning", {"num_tokens": True}, ["num_tokens", "positive integer"]),
    ("prefix-tuning", {"projection": True}, ["projection", "0 or a positive integer"]),
    ("prefix-tuning", {"seed": 1.5}, ["seed", "an integer"]),
    # text would be ignored by any init but text
    ("prompt-tuning", {"init": "vocab", "text": "5,6"}, ["prompt-tuning", "init=text", "not init=vocab"]),
    ("prefix-tuning", {"init": "random", "text": "5"}, ["prefix-tuning", "init=text", "not init=random"]),
    ("multitask-prompt-tuning", {"init": "vocab", "text": "5"}, ["multitask-prompt-tuning", "init=text"]),
    ("prompt-tuning", {"init": "text", "text": ""}, ["prompt-tuning", "init=text needs text"]),
    # strings as the command line passes them: converted to the field's type, then checked
    ("lora", {"alpha": "nan"}, ["alpha", "nan"]),
    ("lora", {"alpha": "inf"}, ["alpha", "inf"]),
    ("lora", {"alpha": "-inf"}, ["alpha", "inf"]),
    ("lora", {"dropout": "nan"}, ["dropout", "nan"]),
    ("lora", {"r": "nan"}, ["r='nan'", "int"]),
    ("lora", {"r": "true"}, ["r='true'", "int"]),
], ids=lambda v: v if isinstance(v, str) else ("-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict)
                                              else None))
def test_config_values_refused(plugin, values, needles):
    one_line(lambda: Method(plugin).config(values), *needles)


def test_good_config_values_pass():
    cfg = Method("lora").config({"r": "4", "alpha": "0.5", "dropout": "0", "rslora": "true"})
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.rslora) == (4, 0.5, 0.0, True)
    assert Method("prefix-tuning").config({"projection": 0, "seed": -3}).projection == 0
    assert Method("lora").config({"alpha": 8}).alpha == 8  # an int is a number


# ---------------------------------------------------------------- plugins registered directly
@dataclasses.dataclass
class Cfg:
    r: int = 2


class Good:
    @hookimpl
    def peftsurgery_config(self):
        return Cfg

    @hookimpl
    def peftsurgery_rules(self, config, sites):
        return [LowRank("attn.q", config.r, 4.0)]

    @hookimpl
    def peftsurgery_budget(self, config, sites):
        return sum(config.r * (s.in_features + s.out_features) for s in sites.select("attn.q", LowRank.kinds))


class Misspelled(Good):
    @hookimpl
    def peftsurgery_rule(self, config, sites):
        return []


class NoBudget:
    peftsurgery_config = Good.peftsurgery_config
    peftsurgery_rules = Good.peftsurgery_rules


def returning(hook, value):
    """A Good plugin whose `hook` returns `value`."""
    return type("Returns", (Good,), {hook: hookimpl(lambda self, **kw: value)})()


@pytest.fixture(scope="module")
def located():
    model = tiny_llama()
    ps.sitemap(model)
    return model


def test_misspelled_hook_is_named(registered, located):
    name = registered(Misspelled(), "test-misspelled")
    msg = one_line(lambda: Method(name), "plugin 'test-misspelled'", "'peftsurgery_rule'",
                   "did you mean peftsurgery_rules?", "fix the plugin")
    one_line(lambda: ps.apply(located, name), msg)
    assert ps.adapters(located) == {}


def test_missing_budget_hook_is_named(registered, located):
    name = registered(NoBudget(), "test-no-budget")
    one_line(lambda: ps.apply(located, name), "plugin 'test-no-budget'", "'peftsurgery_budget'", "missing")
    assert ps.adapters(located) == {}


@pytest.mark.parametrize("hook,value,needle", [
    ("peftsurgery_rules", None, "returned None"),
    ("peftsurgery_rules", LowRank("attn.q", 2, 4.0), "returned a LowRank"),
    ("peftsurgery_rules", [LowRank], "Rule instances"),
    ("peftsurgery_rules", ["attn.q"], "returned ['attn.q']"),
    ("peftsurgery_budget", None, "returned None"),
    ("peftsurgery_budget", True, "returned True"),
    ("peftsurgery_budget", 512.0, "returned 512.0"),
    ("peftsurgery_budget", "512", "returned '512'"),
    ("peftsurgery_config", Cfg(), "dataclass"),
    ("peftsurgery_config", dict, "dataclass"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_hook_results_are_checked(registered, located, hook, value, needle):
    name = registered(returning(hook, value), f"test-returns-{hook}")
    one_line(lambda: ps.apply(located, name), f"plugin '{name}'", f"hook '{hook}'", needle, "fix the plugin")
    assert ps.adapters(located) == {}
    assert not any(m._forward_hooks for m in located.modules())


def test_learning_rate_result_is_checked(registered):
    name = registered(returning("peftsurgery_learning_rate", "fast"), "test-lr")
    one_line(lambda: Method(name).learning_rate(Cfg()), "plugin 'test-lr'", "peftsurgery_learning_rate", "'fast'")


def test_valid_direct_plugin_still_works(registered):
    name = registered(Good(), "test-good")
    model = ps.apply(tiny_llama(), name)
    assert ps.budget(model)["adapters"]["default"] == 2 * 2 * (32 + 32)


# ---------------------------------------------------------------- plugins found through entry points
class FakeEntryPoint:
    def __init__(self, name, value, load):
        self.name, self.value, self._load = name, value, load

    def load(self):
        return self._load()


def _fails_to_import():
    raise ModuleNotFoundError("No module named 'missing_dep'")


class BadSignature(Good):
    @hookimpl
    def peftsurgery_budget(self, config, site_map):
        return 0


BROKEN = {
    "x-import": (_fails_to_import, ["cannot import x_pkg.plugin", "missing_dep"]),
    "x-misspelled": (Misspelled, ["'peftsurgery_rule'", "did you mean peftsurgery_rules?"]),
    "x-no-budget": (NoBudget, ["'peftsurgery_budget'", "missing"]),
    "x-signature": (BadSignature, ["peftsurgery_budget", "site_map"]),
}


@pytest.fixture
def discovered(monkeypatch):
    real = registry.entry_points
    fakes = [FakeEntryPoint(n, "x_pkg.plugin", load) for n, (load, _) in BROKEN.items()]
    monkeypatch.setattr(registry, "entry_points", lambda group: [*real(group=group), *fakes])
    registry.reload()
    yield
    monkeypatch.undo()
    registry.reload()


def test_broken_plugins_are_recorded_and_others_work(discovered):
    assert {"lora", "adapter", "prefix-tuning"} <= set(registry.names())
    assert not set(BROKEN) & set(registry.names())
    broken = registry.broken()
    assert set(broken) == set(BROKEN)
    for name, (_, needles) in BROKEN.items():
        msg = one_line(lambda: Method(name), f"plugin '{name}'", *needles)
        assert msg == broken[name]
    assert list(ps.adapters(ps.apply(tiny_llama(), "lora", r=2))) == ["default"]


def test_cli_plugins_shows_broken_with_reason(discovered, capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "r=8" in rows["lora"]
    for name, (_, needles) in BROKEN.items():
        assert "BROKEN" in rows[name] and all(n in rows[name] for n in needles), rows[name]


def test_cli_apply_with_broken_plugin_is_one_line(discovered, capsys, tmp_path):
    code = main(["apply", "tiny-llama", "--plugin", "x-misspelled", "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "did you mean peftsurgery_rules?" in err
    assert not (tmp_path / "x").exists()
