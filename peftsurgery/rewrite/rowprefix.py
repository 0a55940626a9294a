"""route() for prefixes: row i of a batch gets the keys/values of its own adapter's prefix (see surgery.route).

At each attention site one editor prepends, per row, its adapter's keys and values right-aligned in P key slots
(P: the longest prefix of the batch); the slots before a shorter prefix, or all P for a row without one, are
masked out, so each row attends to exactly what it attends to alone. Positions follow from one entry hook for
the batch (inputs.RoutedEntry).
"""
from __future__ import annotations

import torch

from ..errors import SurgeryError
from .attention import NO_MASK, Intercepted, extend_mask, repeat_heads
from .inputs import routed_entry
from .prefix import extended


def route_prefixes(model, entries, rows: torch.Tensor, cache: dict) -> list:
    """The changes giving each row its prefix: entries are (slot, sites, built) of the routed prefix adapters."""
    slots = rows.tolist()
    present = sorted({s for s in slots if any(s == e[0] for e in entries)})
    if not present:
        return []
    where, by_site, lens = {}, {}, {}
    for slot, sites, built in entries:
        if slot not in present:
            continue
        for s in sites:
            if slot in by_site.setdefault(s.path, {}):
                raise SurgeryError("route() cannot give a row two prefixes of one adapter; route it by itself")
            by_site[s.path][slot], where[s.path] = built[s.path], s
        with torch.no_grad():
            lens[slot] = built[sites[0].path]()[0].shape[-2]
    row_lens = [lens.get(s, 0) for s in slots]
    index = torch.tensor([present.index(s) if s in lens else len(present) for s in slots], device=rows.device)
    changes = []
    for path, sources in by_site.items():
        if len(sources) != len(present):
            raise SurgeryError(f"route() cannot mix prefix adapters on different attention sites ({path} has "
                               f"{len(sources)} of {len(present)}); route them in separate batches")
        s = where[path]
        editor = _RowPrefixes(path, [sources[p] for p in present], index, row_lens, bool(s.causal))
        changes.append(Intercepted(model, path, editor, s.impl or "", s.heads))
    if any(x.role == "embed" for x in cache["call"]["sitemap"]):
        entry = routed_entry(model, rows, cache)
        entry.add_prefixes(row_lens)
        changes += entry.hooks(model)
    return changes


class _RowPrefixes:
    """Attention editor: row i gets sources[index[i]] (index len(sources): none), right-aligned in P slots."""

    def __init__(self, path: str, sources: list, index: torch.Tensor, lens: list[int], causal: bool):
        self.path, self.sources, self.index, self.causal, self.P = path, sources, index, causal, max(lens)
        lens_t = torch.tensor(lens, device=index.device).view(-1, 1)
        # (B, P) which slots a row attends to, when rows differ
        self.visible = None if len(set(lens)) == 1 else torch.arange(self.P, device=index.device) >= self.P - lens_t

    def _table(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """(B, heads, P, dim): the rows' keys (or values), zeros before a shorter prefix and for no prefix."""
        P, t = self.P, parts[0]
        padded = [torch.cat([x.new_zeros(x.shape[0], P - x.shape[1], x.shape[2]), x], 1) for x in parts]
        return torch.stack(padded + [t.new_zeros(t.shape[0], P, t.shape[2])])[self.index]

    def apart(self):
        """Each row's keys and values in the P slots, and the slots it sees, to be attended apart
        (attention._apart)."""
        kvs = [src() for src in self.sources]
        return self._table([x[0] for x in kvs]), self._table([x[1] for x in kvs]), self.visible

    def __call__(self, module, q, k, v, mask, kwargs):
        B, H, P = k.shape[0], k.shape[1], self.P
        if B != self.index.shape[0]:
            raise SurgeryError(f"route was given {self.index.shape[0]} adapter names but {self.path} sees a batch "
                               f"of {B} rows; give one name per row")
        pk, pv, _ = self.apart()
        pk, pv = repeat_heads(pk, H), repeat_heads(pv, H)
        old = k.shape[-2]
        k, v = torch.cat([pk.to(k.dtype), k], -2), torch.cat([pv.to(v.dtype), v], -2)
        causal = bool(kwargs.get("is_causal")) or (mask is None and getattr(module, "is_causal", self.causal)
                                                    and self.causal)
        if self.visible is None:
            mask = extend_mask(mask, q, k.shape[-2], P, causal)
        else:
            if kwargs.get(NO_MASK):
                raise SurgeryError(f"route() cannot mix prefixes of different lengths (or rows without one) at "
                                   f"{self.path}: its attention is written in its own code, where no per-row mask can "
                                   "be added; route rows with prefixes of one length")
            mask = self._mask(mask, q, old, causal)
        return k, v, mask, extended(kwargs, mask, old, P)

    def _mask(self, mask, q, n: int, causal: bool) -> torch.Tensor:
        """The (B, heads, queries, P + keys) mask: each row's visible slots, then `mask` (None: causal over the n
        keys, or all visible)."""
        B, Q = q.shape[0], q.shape[-2]
        if mask is None:
            full = torch.ones(Q, n, dtype=torch.bool, device=q.device)
            mask = (full.tril(n - Q) if causal else full)[None, None]
        elif mask.dim() != 4:
            raise SurgeryError(f"route() cannot mask prefix slots per row at {self.path}: its attention mask is "
                               f"{mask.dim()}-d, not (batch, heads, queries, keys); route rows with prefixes of one "
                               "length")
        pad = self.visible[:, None, None, :].expand(B, mask.shape[1], mask.shape[2], self.P)
        if mask.dtype != torch.bool:
            pad = torch.zeros(pad.shape, dtype=mask.dtype, device=mask.device).masked_fill(
                ~pad, torch.finfo(mask.dtype).min)
        return torch.cat([pad, mask.expand(B, -1, -1, -1)], -1)
