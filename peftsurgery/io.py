"""Adapters on disk: adapter.safetensors plus adapter.json. Writes are atomic; nothing is ever unpickled."""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import shutil
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .errors import SurgeryError
from .registry import Method
from .surgery import _get, _key, adapters, attach, sitemap

WEIGHTS, CONFIG = "adapter.safetensors", "adapter.json"
FORMAT = 1


def save(model: nn.Module, directory: str, name: str = "default") -> str:
    """Write one attached adapter to `directory` (created or replaced atomically)."""
    att = _get(model, name)
    tensors, overrides = {}, {}
    for i, (r, b) in enumerate(zip(att.rules, att.built)):
        state, over = r.export(b)
        overrides.update(over)
        for key, params in state.items():
            for pname, t in params.items():
                tensors[f"{i}.{_key(key)}.{pname}"] = t.detach().to("cpu").contiguous()
    cfg = {**dataclasses.asdict(att.config), **overrides}
    meta = {"format": FORMAT, "method": att.method.name, "method_version": att.method.version,
            "peftsurgery_version": __version__, "config": cfg,
            "base": {"fingerprint": sitemap(model).fingerprint(), "class": type(model).__name__},
            "trainable_parameters": att.budget}
    with atomic_dir(directory) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"method": att.method.name})
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
        raise SurgeryError(f"{directory} holds no adapter ({CONFIG} and {WEIGHTS} are needed)")
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


def load(model: nn.Module, directory: str, name: str | None = None, trainable: bool = False) -> nn.Module:
    """Attach a saved adapter to `model` (under its saved name or `name`). Fails, leaving the model untouched,
    when the adapter was made for another architecture or its files are damaged."""
    meta, tensors = read(directory)
    name = name or "default"
    if name in adapters(model):
        raise SurgeryError(f"an adapter named {name!r} is already attached; pass another name")
    method = Method(meta["method"])
    sm = sitemap(model)
    want, have = meta["base"]["fingerprint"], sm.fingerprint()
    if want != have:
        raise SurgeryError(f"{directory} was made for a different architecture ({meta['base'].get('class')}, "
                           f"fingerprint {want}; this model is {type(model).__name__}, {have}); "
                           "load it onto the model it was trained for")
    cfg = method.config(_no_init(meta["config"], method))
    attach(model, method, cfg, name)
    att = adapters(model)[name]
    try:
        expected = {}  # the tensors save() writes, as views of the new adapter's parameters
        for i, (r, b) in enumerate(zip(att.rules, att.built)):
            for key, params in r.export(b)[0].items():
                for pname, t in params.items():
                    expected[f"{i}.{_key(key)}.{pname}"] = t
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or extra:
            raise SurgeryError(f"{directory} does not match method {method.name} on this model "
                               f"({'missing ' + missing[0] if missing else 'unexpected ' + extra[0]})")
        for k, t in expected.items():
            if tuple(t.shape) != tuple(tensors[k].shape):
                raise SurgeryError(f"{directory}: {k} has shape {tuple(tensors[k].shape)}, expected {tuple(t.shape)}")
        with torch.no_grad():
            for k, t in expected.items():
                t.copy_(tensors[k])
    except Exception:
        from .surgery import remove
        remove(model, name)
        raise
    if not trainable:
        for b in att.built:
            for m in b.values():
                m.requires_grad_(False)
    return model


def _no_init(config: dict, method: Method) -> dict:
    """Loading overwrites every value, so skip costly or data-dependent initialisation where the config has it."""
    fields = {f.name for f in dataclasses.fields(method.config_class)}
    out = {k: v for k, v in config.items() if k in fields}
    if "init" in fields:
        out["init"] = "random"
    return out
