"""Slices of fused projections: a rule acting on `attn.k` inside a fused `attn.qkv` (or on `mlp.gate` inside a
fused `mlp.gate_up`) acts on rows (start, stop) of its output only (see SiteMap.slices). A gate_up's rows were
followed by data flow through the cuts of its output; q, k and v's widths come from the attention's shapes, so
before building on such a slice confirm() checks by a probe forward that the fused output really holds its parts
side by side in the order q, k, v: with the value rows zeroed, the model's outputs must not depend on the other
rows (attention over zero values is zero), and with the key rows zeroed not on the query rows (zero keys give
uniform attention). A layout the widths cannot describe (heads interleaved,
as in Bloom and GPT-NeoX) fails, and the rule refuses in one line naming the fused projection."""
from __future__ import annotations

import torch
from torch import nn

from ..capture import Conv1D, is_linear_module
from ..errors import SurgeryError
from ..sites import Site, SiteMap


def fused_weight(model: nn.Module, path: str) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """(weight, bias or None, transposed) of the fused projection at `path`: a linear module (Conv1D's weight
    is (in, out)) or a bare weight parameter (stored (out, in) unless its shape says otherwise; no bias known)."""
    try:
        m = model.get_submodule(path)
        if not is_linear_module(m):
            raise SurgeryError(f"{path} is a {type(m).__name__}, not a linear layer; locate the model again")
        bias = m.bias if isinstance(getattr(m, "bias", None), torch.Tensor) else None
        return m.weight, bias, bool(Conv1D) and isinstance(m, Conv1D)
    except AttributeError:
        owner, _, name = path.rpartition(".")
        try:
            w = getattr(model.get_submodule(owner), name)
        except AttributeError:
            raise SurgeryError(f"{path} is not in this model; locate it again") from None
        return w, None, False


def into(out: torch.Tensor, rows: tuple, fn) -> torch.Tensor:
    """`out` with features rows[0]:rows[1] replaced by fn(those features)."""
    a, b = rows
    return torch.cat([out[..., :a], fn(out[..., a:b]), out[..., b:]], -1)


def apart(hook, rows: tuple | None) -> bool:
    """Whether a hook acts on output features disjoint from `rows` (both slices): the two then commute."""
    other = getattr(hook, "rows", None)
    return rows is not None and other is not None and (other[1] <= rows[0] or rows[1] <= other[0])


def confirm(model: nn.Module, sites: list[Site], sitemap: SiteMap) -> None:
    """Raise SurgeryError unless each fused projection that `sites` slice holds its parts where the slices say
    (probed once per site map; on the meta device nothing runs, so nothing is probed there)."""
    fused = dict.fromkeys(s.fused for s in sites if s.fused and sitemap.by_path(s.fused).parts is None)
    todo = [f for f in fused if f not in sitemap.layouts]   # (a gate_up's parts were followed by data flow)
    if todo and not _on_meta(model):
        if not sitemap.inputs:
            raise SurgeryError(f"no example inputs to confirm where q, k and v lie in {todo[0]}; locate the model "
                               "with example_inputs")
        for f in todo:
            w = fused_weight(model, f)[0]
            if not w.dtype.is_floating_point:
                raise SurgeryError(f"cannot confirm where q, k and v lie in {f}: its weight is quantized ({w.dtype}); "
                                   "apply this before quantizing it, or target the whole projection")
        parts = {f: {p.role.rpartition(".")[2]: p.rows for p in sitemap.slices()[f]} for f in todo}
        if _independent(model, sitemap.inputs, parts):
            sitemap.layouts.update(dict.fromkeys(todo))
        else:  # one at a time, to name the projection that fails
            for f in todo:
                ok = _independent(model, sitemap.inputs, {f: parts[f]})
                sitemap.layouts[f] = None if ok else (
                    "its outputs do not hold " + ", ".join(f"{x} in {a}:{b}" for x, (a, b) in parts[f].items()) +
                    " (heads interleaved?)")
    for f in fused:
        why = sitemap.layouts.get(f)
        if why:
            role = sitemap.by_path(f).role
            raise SurgeryError(f"{next(s.role for s in sites if s.fused == f)} cannot be cut out of the fused {f} "
                               f"({role}): {why}; target {role} to act on the whole projection")


def _on_meta(model: nn.Module) -> bool:
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "meta"


def _independent(model: nn.Module, inputs: dict, parts: dict[str, dict[str, tuple]]) -> bool:
    """For every fused projection at once: with its v rows zeroed, do the outputs ignore its other rows (q and k
    scaled randomly)? And with its k rows zeroed, do they ignore its q rows (for attn.qkv)?"""
    g = torch.Generator().manual_seed(0)
    for zero, vary in (("v", "qk"), ("k", "q")):
        if not any(x in p for p in parts.values() for x in vary):
            continue
        runs = []
        for scaled in (False, True):
            factors = {}
            for f, p in parts.items():
                w, _, transposed = fused_weight(model, f)
                v = torch.ones(w.shape[1] if transposed else w.shape[0], dtype=w.dtype)
                for x, (a, b) in p.items():
                    if x == zero:
                        v[a:b] = 0
                    elif scaled and x in vary:
                        v[a:b] = torch.rand(b - a, generator=g).to(w.dtype) + 0.5
                factors[f] = v
            runs.append(_run_scaled(model, inputs, factors))
        if len(runs[0]) != len(runs[1]) or not all(torch.equal(a, b) for a, b in zip(*runs)):
            return False
    return True


def _run_scaled(model: nn.Module, inputs: dict, factors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The model's output tensors with each fused projection's output features multiplied by its factors (through
    its weight and bias, put back bit for bit afterwards)."""
    saved = []
    was = model.training
    dev = next((p.device for p in model.parameters()), None)
    kw = {k: v.to(dev) if isinstance(v, torch.Tensor) and dev is not None else v for k, v in inputs.items()}
    try:
        with torch.no_grad():
            for f, v in factors.items():
                w, bias, transposed = fused_weight(model, f)
                saved += [(t, t.detach().clone()) for t in (w, bias) if t is not None]
                v = v.to(w.device)
                w.mul_(v[None, :] if transposed else v[:, None])
                if bias is not None:
                    bias.mul_(v.to(bias.dtype))
            model.eval()
            return [t.clone() for t in _tensors(model(**kw))]
    finally:
        model.train(was)
        with torch.no_grad():
            for t, copy in saved:
                t.copy_(copy)


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []
