"""Discovering methods: every plugin, built-in or third-party, comes from the "peftsurgery" entry-point group."""
from __future__ import annotations

import dataclasses
import typing
from importlib.metadata import entry_points

import pluggy

from . import hookspecs
from .errors import SurgeryError

GROUP = "peftsurgery"
_pm: pluggy.PluginManager | None = None


def manager() -> pluggy.PluginManager:
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager(GROUP)
        pm.add_hookspecs(hookspecs)
        for ep in entry_points(group=GROUP):
            if pm.get_plugin(ep.name) is None:
                pm.register(ep.load(), name=ep.name)
        _pm = pm
    return _pm


def reload() -> None:
    """Forget discovered plugins (after installing one in the running process)."""
    global _pm
    _pm = None


def names() -> list[str]:
    return sorted(n for n, _ in manager().list_name_plugin())


class Method:
    """One plugin, seen through its hooks."""

    def __init__(self, name: str):
        pm = manager()
        plugin = pm.get_plugin(name)
        if plugin is None:
            raise SurgeryError(f"no method named {name!r}; installed: {', '.join(names()) or 'none'}")
        self.name, self.plugin = name, plugin
        others = [p for n, p in pm.list_name_plugin() if n != name]
        self._call = lambda hook, **kw: pm.subset_hook_caller(hook, remove_plugins=others)(**kw)
        self.version = _version(plugin)

    @property
    def config_class(self):
        return self._call("peftsurgery_config")

    def describe(self) -> str:
        return self._call("peftsurgery_describe") or ""

    def config(self, values: dict | None = None):
        """A validated config from keyword values (strings from the command line are converted)."""
        cls = self.config_class
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = dict(values or {})
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise SurgeryError(f"{self.name} has no option {unknown[0]!r}; options: {', '.join(fields)}")
        hints = typing.get_type_hints(cls)
        conv = {k: _convert(k, v, hints.get(k)) for k, v in values.items()}
        try:
            return cls(**conv)
        except SurgeryError:
            raise
        except (TypeError, ValueError) as e:
            raise SurgeryError(f"{self.name}: {e}") from None

    def rules(self, config, sites):
        return self._call("peftsurgery_rules", config=config, sites=sites)

    def budget(self, config, sites) -> int:
        return int(self._call("peftsurgery_budget", config=config, sites=sites))

    def learning_rate(self, config) -> float:
        """The method's own default (peftsurgery_learning_rate), else 1e-3."""
        lr = self._call("peftsurgery_learning_rate", config=config)
        return 1e-3 if lr is None else float(lr)


def _version(plugin) -> str:
    v = getattr(plugin, "__version__", None)
    if v:
        return str(v)
    try:
        from importlib.metadata import packages_distributions, version
        top = getattr(plugin, "__name__", "").split(".")[0]
        dists = packages_distributions().get(top) or []
        return version(dists[0]) if dists else "0"
    except Exception:
        return "0"


def _convert(key: str, value, hint):
    """Convert a command-line string to the field's type; other values pass through."""
    if not isinstance(value, str) or hint in (str, None):
        return value
    base = typing.get_origin(hint) or hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if base is typing.Union or str(base) == "types.UnionType":
        if value.lower() in ("none", "null", ""):
            return None
        base = args[0] if args else str
    try:
        if base is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base in (int, float):
            return base(value)
    except ValueError:
        raise SurgeryError(f"option {key}={value!r} is not a valid {base.__name__}") from None
    return value
