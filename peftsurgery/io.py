"""Adapters on disk: adapter.safetensors plus adapter.json. Writes are atomic; nothing is ever unpickled."""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import shutil
import tempfile
import warnings

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__, peftformat
from .errors import SurgeryError
from .registry import Method
from .surgery import Attached, _check_name, _count, _get, attach, prepare, sitemap

WEIGHTS, CONFIG = "adapter.safetensors", "adapter.json"
FORMAT = 2   # 2: per-rule settings under "rules"; 1 (no settings) still loads
FORMATS = ("peftsurgery", "peft")


def save(model: nn.Module, directory: str, name: str = "default", format: str = "peftsurgery") -> str:
    """Write one attached adapter to `directory` (created or replaced atomically). format="peft" writes PEFT's
    adapter_config.json + adapter_model.safetensors (see peftformat.py) instead of peftsurgery's own files."""
    if format not in FORMATS:
        raise SurgeryError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format == "peft":
        return peftformat.save(model, directory, name)
    att = _get(model, name)
    made = len(Method(att.method).rules(att.config, sitemap(model)))
    if made != len(att.records):  # e.g. a PEFT LoRA with per-module ranks: loading would rebuild other rules
        raise SurgeryError(f"adapter {name!r} holds {len(att.records)} rules where method {att.method}'s options make "
                           f"{made} (e.g. per-module ranks or alphas from a PEFT folder); save it with format='peft'")
    tensors, settings = {}, []
    for i, rec in enumerate(att.records):
        state, rule_settings = rec.state()
        settings.append(rule_settings)
        tensors.update({f"{i}.{k}": t.detach().to("cpu").contiguous() for k, t in state.items()})
    meta = {"format": FORMAT, "method": att.method, "method_version": att.method_version,
            "peftsurgery_version": __version__, "config": dataclasses.asdict(att.config), "rules": settings,
            "base": {"fingerprint": sitemap(model).fingerprint(), "class": type(model).__name__},
            "trainable_parameters": att.budget}
    with atomic_dir(directory) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"method": att.method})
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(meta, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
    return os.path.abspath(directory)


@contextlib.contextmanager
def atomic_dir(directory: str):
    """Yield a temporary folder beside `directory`; when the block ends without error it replaces `directory`
    in one step, otherwise it is removed and `directory` is left as it was."""
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the folder it becomes follows the umask like any other
    try:
        yield tmp
        _swap_in(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(new: str, target: str) -> None:
    """Put directory `new` at `target`; an existing target is replaced in one atomic step where the OS can."""
    if not os.path.exists(target):
        os.rename(new, target)
        return
    if not os.path.isdir(target):
        raise SurgeryError(f"{target} exists and is not a directory; choose another output path")
    try:  # Linux renameat2(RENAME_EXCHANGE): both names swap at once
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.renameat2(-100, new.encode(), -100, target.encode(), 2) == 0:
            return  # the old adapter is now at `new` and is removed by the caller
    except (AttributeError, OSError):
        pass
    old = target + ".old"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


def read(directory: str) -> tuple[dict, dict]:
    """(metadata, tensors) of a saved adapter, with one-line errors for missing or damaged files."""
    cpath, wpath = os.path.join(directory, CONFIG), os.path.join(directory, WEIGHTS)
    if not os.path.isdir(directory):
        raise SurgeryError(f"{directory} is not a directory; give the folder an adapter was saved to")
    if not os.path.exists(cpath) or not os.path.exists(wpath):
        raise SurgeryError(f"{directory} holds no adapter ({CONFIG} and {WEIGHTS}, or PEFT's "
                           f"{peftformat.CONFIG} and {peftformat.WEIGHTS}, are needed)")
    try:
        with open(cpath) as f:
            meta = json.load(f)
        meta["method"], meta["config"], meta["base"]["fingerprint"]  # noqa: B018 - required keys
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise SurgeryError(f"{cpath} is corrupted (not an adapter config); save the adapter again") from None
    try:
        tensors = load_file(wpath)
    except (SafetensorError, OSError, ValueError) as e:
        raise SurgeryError(f"{wpath} is corrupted ({str(e).splitlines()[0][:80]}); save the adapter again") from None
    return meta, tensors


def _check_base(directory: str, meta: dict, sm, model_class: str | None, what: str = "load it onto") -> None:
    want, have = meta["base"]["fingerprint"], sm.fingerprint()
    if want != have:
        this = f"this model is {model_class}, {have}" if model_class else f"this model's is {have}"
        raise SurgeryError(f"{directory} was made for a different architecture ({meta['base'].get('class')}, "
                           f"fingerprint {want}; {this}); {what} the model it was trained for")


def read_adapter(directory: str, method: str, sites=None) -> tuple[dict, dict]:
    """(config, tensors) of an adapter `method` saved to `directory`, for a plugin that starts a new adapter from
    it (init=pretrained:DIR). One-line errors for a missing or damaged folder, another method and, given the
    model's SiteMap `sites`, another architecture."""
    meta, tensors = read(directory)
    if meta["method"] != method:
        raise SurgeryError(f"{directory} holds a {meta['method']} adapter; init=pretrained needs a {method} one")
    if sites is not None:
        _check_base(directory, meta, sites, None, "start from an adapter of")
    return meta["config"], tensors


def load(model: nn.Module, directory: str, name: str | None = None, trainable: bool = False,
         example_inputs=None) -> nn.Module:
    """Attach a saved adapter to `model` (under `name`, default "default"). Everything is checked before the
    model changes (format, method and its version, architecture, every tensor's name, shape and dtype): a
    failure leaves the model as it was. example_inputs: as for apply, for models whose inputs cannot be guessed.
    A folder in PEFT's format (adapter_config.json + adapter_model.safetensors) is converted first (peftformat.py)
    and then loads the same way."""
    name = name or "default"
    if peftformat.is_peft(directory):
        _check_name(model, name)
        sm = sitemap(model, example_inputs)
        conv = peftformat.read(directory, model, sm)
        model = _attach_saved(model, directory, Method(conv.method), conv.config, None, conv.tensors, name,
                              trainable, sm, conv.rules)
        for note in conv.notes:
            warnings.warn(note, peftformat.PeftFormatWarning, stacklevel=2)
        return model
    meta, tensors = read(directory)
    _check_name(model, name)
    if not isinstance(meta.get("format"), int) or meta["format"] > FORMAT:
        raise SurgeryError(f"{directory} has adapter format {meta.get('format')!r}, newer than this peftsurgery "
                           f"reads ({FORMAT}); upgrade peftsurgery")
    method = Method(meta["method"])
    _check_version(directory, meta, method)
    sm = sitemap(model, example_inputs)
    _check_base(directory, meta, sm, type(model).__name__)
    return _attach_saved(model, directory, method, meta["config"], meta.get("rules"), tensors, name, trainable, sm)


def _attach_saved(model, directory, method, config, settings, tensors, name, trainable, sm, rules=None):
    """Build the method's rules for `config` (or the `rules` given), check `tensors` fit them exactly, write
    them in and attach; nothing on the model changes before every check has passed."""
    fields = {f.name for f in dataclasses.fields(method.config_class)}
    cfg = method.config({k: v for k, v in config.items() if k in fields})
    rules = rules if rules is not None else method.rules(cfg, sm)
    settings = settings or [{}] * len(rules)
    if len(settings) != len(rules):
        raise SurgeryError(f"{directory} holds {len(settings)} rules but method {method.name} now makes "
                           f"{len(rules)}; save the adapter again with this version")
    records = prepare(model, [r.loading(st) for r, st in zip(rules, settings)], sm)
    expected = {f"{i}.{k}": t for i, rec in enumerate(records) for k, t in rec.state()[0].items()}
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise SurgeryError(f"{directory} does not match method {method.name} on this model "
                           f"({'missing ' + missing[0] if missing else 'unexpected ' + extra[0]})")
    for k, t in expected.items():
        if tuple(t.shape) != tuple(tensors[k].shape) or t.dtype.is_floating_point != tensors[k].dtype.is_floating_point:
            raise SurgeryError(f"{directory}: {k} has shape {tuple(tensors[k].shape)} ({tensors[k].dtype}), "
                               f"expected {tuple(t.shape)} ({t.dtype}); the file does not fit this config")
    with torch.no_grad():
        for k, t in expected.items():
            t.copy_(tensors[k])
    written = {f"{i}.{k}": t for i, rec in enumerate(records) for k, t in rec.state()[0].items()}
    unwritten = [k for k, t in written.items() if not torch.equal(t.detach().cpu(), tensors[k].to(t.dtype))]
    if unwritten:
        raise SurgeryError(f"{method.name} cannot be loaded: its rule's state() gives a copy, not a view, of "
                           f"{unwritten[0]}, so the saved value cannot be written back; fix the rule")
    att = Attached(name, method.name, method.version, cfg, records, budget=_count(records))
    attach(model, att, sm)
    if not trainable:
        for rec in records:
            for m in rec.built.values():
                m.requires_grad_(False)
    return model


def _check_version(directory: str, meta: dict, method: Method) -> None:
    """A different major version of the method refuses; a different minor one warns."""
    saved, now = str(meta.get("method_version", "0")), method.version
    if saved == now:
        return
    if saved.split(".")[0] != now.split(".")[0]:
        raise SurgeryError(f"{directory} was saved by {method.name} {saved}, this is {now} (another major "
                           f"version); load it with {method.name} {saved} or train it again")
    warnings.warn(f"{directory} was saved by {method.name} {saved}; loading it with {now}", stacklevel=2)
