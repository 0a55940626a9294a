"""Sites (places in a model a rule can rewrite), the SiteMap that holds them, and selectors over it."""
from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace

from .errors import SurgeryError

CONTAINER = "_peftsurgery"   # the submodule holding attached adapters: never a site itself
# attn.kv: one projection giving keys and values (the query has its own); attn.q_a / attn.kv_a: low-rank
# down-projections feeding the query / key-value projections (DeepSeek's multi-head latent attention)
LINEAR_ROLES = ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.kv", "attn.o", "attn.q_a", "attn.kv_a",
                "xattn.q", "xattn.k", "xattn.v", "xattn.qkv", "xattn.kv", "xattn.o", "xattn.q_a", "xattn.kv_a",
                "mlp.up", "mlp.gate", "mlp.gate_up", "mlp.down", "moe.up", "moe.gate", "moe.down", "router", "linear",
                "head")
OUT_OF_ALL_LINEAR = ("head", "router")   # selected only by name: the output head, a mixture's router


@dataclass
class Site:
    """One rewritable place.

    kind: "linear" (a module whose forward is a linear map), "param-linear" (a linear op on a weight parameter
    of a module that is not itself a linear layer, such as nn.MultiheadAttention's in_proj_weight),
    "embedding" or "attention" (the module that calls an attention op).
    found_by: how it was found, e.g. "export+dataflow", "fx+dataflow", "hooks+name", or "export+module" (a linear
    module that ran but whose weight's use was not recognised in the graph: role `linear`).
    """
    path: str
    kind: str
    role: str
    found_by: str
    block: int | None = None
    stack: str | None = None
    in_features: int | None = None
    out_features: int | None = None
    # attention sites
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None                     # of queries and keys
    v_head_dim: int | None = None                   # of values (differs from head_dim in DeepSeek's MLA)
    causal: bool | None = None
    impl: str | None = None                         # attention: how it is computed (sdpa, eager)
    inputs: dict = field(default_factory=dict)      # attention: {"q": path, "k": path, "v": path, "o": path}
    producer: str | None = None                     # what feeds the site in the captured graph
    consumer: str | None = None                     # what the site feeds
    runner: str | None = None                       # param-linear: the module whose forward uses the weight
    experts: int | None = None                      # a stacked (experts, out, in) weight: one linear per expert
    # a slice of a fused projection (attn.k inside attn.qkv): path is "FUSED:k", kind and in_features the fused
    # site's, out_features the slice's width; rows are its (start, stop) in the fused output's features
    fused: str | None = None
    rows: tuple | None = None
    # a fused gate_up (mlp.gate_up): {"gate": (start, stop), "up": (start, stop)} of its output features, followed
    # by data flow through the cuts of its output, or why its parts cannot be told apart
    parts: dict | str | None = None

    def short(self) -> str:
        if self.kind == "attention":
            return f"{self.heads}h/{self.kv_heads}kv x {self.head_dim}{' causal' if self.causal else ''}"
        if self.in_features is not None:
            return f"{f'{self.experts} x ' if self.experts else ''}{self.in_features}->{self.out_features}"
        return ""


def block_of(path: str) -> tuple[str | None, int | None]:
    """The repeated-block stack and index of a path: 'model.layers.3.mlp' -> ('model.layers', 3)."""
    m = re.match(r"^(.*?)\.(\d+)(?:\.|$)", path)
    return (m.group(1), int(m.group(2))) if m else (None, None)


@dataclass
class SiteMap:
    sites: list[Site]
    method: str                      # capture used: export, fx or hooks
    entry: str = ""                  # module whose forward receives the token ids (prompt methods hook it)
    entry_params: tuple = ()         # names that forward accepts
    token_input: str = ""            # the model's forward argument that carries the token ids (by data flow)
    decoder_entry: str = ""          # an encoder-decoder's decoder stack, taking the decoder's token ids ("": none)
    decoder_embed: str = ""          # the embedding those ids index
    encoder_decoder: bool = False
    seconds: float = 0.0
    inputs: dict = field(default_factory=dict, repr=False, compare=False)   # the example inputs it was found with
    layouts: dict = field(default_factory=dict, repr=False, compare=False)  # fused path -> None (slices confirmed
    #                                                 by a probe forward, see rewrite/slices.py) or why they are not

    def run(self, model):
        """One forward of `model` on the example inputs (moved to its device), in eval mode and without
        gradients, and its output; the training mode comes back after. What the model raises propagates."""
        import torch
        dev = next((p.device for p in model.parameters()), None)
        inputs = {k: v.to(dev) if isinstance(v, torch.Tensor) and dev is not None else v
                  for k, v in self.inputs.items()}
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                return model(**inputs)
        finally:
            model.train(was)

    def __iter__(self):
        return iter(self.sites)

    def __len__(self):
        return len(self.sites)

    def by_path(self, path: str) -> Site:
        for s in self.sites:
            if s.path == path:
                return s
        raise KeyError(path)

    def roles(self) -> list[str]:
        return sorted({s.role for s in self.sites})

    def fingerprint(self) -> str:
        """A hash of the architecture as the sites see it: paths, roles and shapes."""
        rows = sorted((s.path, s.kind, s.role.replace(".gate_up", ".up"), s.in_features, s.out_features, s.heads,
                       s.kv_heads, s.head_dim) for s in self.sites if s.kind != "tensor")
        # (base tensors, and the role mlp.gate_up, formerly mlp.up, came later: old files load)
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]

    def summary(self) -> dict:
        """Counts: sites, sites per role, sites per way found (found_by; "+name" means guessed from names)."""
        count = lambda values: {v: values.count(v) for v in sorted(set(values))}
        return {"sites": len(self.sites), "roles": count([s.role for s in self.sites]),
                "found_by": count([s.found_by for s in self.sites])}

    def to_json(self) -> dict:
        return {"method": self.method, "entry": self.entry, "encoder_decoder": self.encoder_decoder,
                "fingerprint": self.fingerprint(), "sites": [asdict(s) for s in self.sites]}

    def slices(self) -> dict[str, list[Site] | str]:
        """Per fused projection (attn.qkv: q, k, v; attn.kv: k, v; mlp.gate_up: gate, up), keyed by its path:
        its parts as slice sites, or why it cannot be sliced. Widths come from the attention that reads it
        (heads x head_dim for q, kv_heads x head_dim for k, kv_heads x v_head_dim for v), the parts side by side
        in that order; rules confirm that order with a probe forward before building (rewrite/slices.py). A
        gate_up's rows were followed by data flow (Site.parts), nothing to confirm."""
        by = {s.path: s for s in self.sites}
        out: dict[str, list[Site] | str] = {}
        for f in self.sites:
            if f.role.endswith(".gate_up") and f.kind in ("linear", "param-linear"):
                pre = f.role.split(".")[0]
                out[f.path] = f.parts if isinstance(f.parts, str) else (
                    "its parts were not followed by data flow (roles from names)") if not f.parts else [
                    replace(f, path=f"{f.path}:{x}", role=f"{pre}.{x}", out_features=b - a, fused=f.path,
                            rows=(a, b), parts=None) for x, (a, b) in f.parts.items()]
        for a in self.sites:
            for path in dict.fromkeys(a.inputs.get(x) for x in "qkv") if a.kind == "attention" else ():
                f = by.get(path)
                if f is None or path in out or not f.role.endswith((".qkv", ".kv")):
                    continue
                pre, parts = f.role.split(".")
                shape = {"q": (a.heads, a.head_dim), "k": (a.kv_heads, a.head_dim), "v": (a.kv_heads, a.v_head_dim)}
                widths = [shape[x][0] * shape[x][1] if None not in shape[x] else 0 for x in parts]
                shared = set(widths) == {f.out_features}   # one output read as q, k and v alike: each is all of it
                if not shared and (0 in widths or sum(widths) != f.out_features):
                    out[path] = (f"its {f.out_features} outputs are not " + " and ".join(
                        f"{x} ({shape[x][0]} x {shape[x][1]})" for x in parts) + f" of {a.path} side by side")
                    continue
                ends = widths if shared else [sum(widths[:i + 1]) for i in range(len(parts))]
                out[path] = [replace(f, path=f"{path}:{x}", role=f"{pre}.{x}", out_features=w, fused=path,
                                     rows=(e - w, e)) for x, w, e in zip(parts, widths, ends)]
        return out

    def select(self, selector: str, kinds: tuple[str, ...]) -> list[Site]:
        """Sites of the given kinds matching a selector; raises SurgeryError listing what exists if none do.

        A selector is comma-separated terms. Role terms are globs over roles (`attn.q`, `attn.*`, `mlp.*`),
        `all-linear` (every linear except the output head and a mixture of experts' router) or `all`; `path:GLOB`
        matches module paths; these are united. `blocks:A-B` (or `blocks:N`) keeps only sites in those repeated
        blocks. The exact roles `attn.q`, `attn.k`, `attn.v` (and `xattn.*`) also pick that part of a fused
        `attn.qkv` / `attn.kv` projection as a slice site (see slices()), for rules whose kinds include "slice";
        for other rules, or where the parts cannot be told apart, that is an error naming the fused projection
        (never the whole projection instead). Globs, `all-linear` and paths pick whole linears only.
        """
        pool = [s for s in self.sites if s.kind in kinds]
        sliced = self.slices()
        terms = [t.strip() for t in selector.split(",") if t.strip()]
        if not terms:
            raise SurgeryError("empty selector: give roles such as attn.q,attn.v or all-linear")
        blocks = None
        picked: dict[str, Site] = {}
        refused: list[tuple[Site, str]] = []
        for t in terms:
            if t.startswith("blocks:"):
                blocks = (blocks or set()) | _parse_blocks(t[7:])
                continue
            hits = [s for s in pool if _term_matches(t, s)]
            for f in pool:
                parts = sliced.get(f.path)
                pre, _, whole = f.role.partition(".")
                if parts is None or t not in (f"{pre}.{x}" for x in (whole.split("_") if "_" in whole else whole)):
                    continue
                if isinstance(parts, str):
                    refused.append((f, f"{t} is part of the fused {f.path} ({f.role}), but {parts}; target "
                                       f"{f.role} to act on the whole projection"))
                elif "slice" not in kinds:
                    refused.append((f, f"{t} is a slice of the fused {f.path} ({f.role}) and this rule acts on "
                                       f"whole linears only; target {f.role} to act on the whole projection"))
                else:
                    hits += [p for p in parts if p.role == t]
            picked.update((s.path, s) for s in hits)
        inside = lambda s: blocks is None or s.block in blocks
        for f, why in refused:
            if inside(f):
                raise SurgeryError(why)
        if not picked and blocks is not None and all(t.startswith("blocks:") for t in terms):
            picked = {s.path: s for s in pool}
        cands = [c for s in pool for c in [s, *(p for p in sliced.get(s.path, ()) if isinstance(p, Site))]]
        out = [s for s in cands if s.path in picked and inside(s)]
        if not out:
            roles = sorted({s.role for s in pool})
            paths = [s.path for s in pool][:6]
            hint = "; roles were guessed from module names, as torch.export and torch.fx could not capture " \
                "this model (attention, biases and norms are then not found): pass example_inputs they can run " \
                "or select by path:" if self.method == "hooks" else ""
            if not pool and "embedding" in kinds:   # what prompt methods need and vision, audio, hashed ids lack
                hint += "; an embedding site is a table the token ids index themselves: models fed images or " \
                    "audio, or ids hashed first (CANINE), have none: use a method that changes linear layers"
            raise SurgeryError(
                f"selector {selector!r} matches no {'/'.join(k for k in kinds if k != 'slice')} site; roles here: "
                f"{', '.join(roles) or 'none'}; paths like: {', '.join(paths) or 'none'}{hint}")
        return out


def _parse_blocks(spec: str) -> set[int]:
    try:
        out: set[int] = set()
        for part in spec.split("+"):
            a, _, b = part.partition("-")
            out |= set(range(int(a), int(b or a) + 1))
        return out
    except ValueError:
        raise SurgeryError(f"bad block range {spec!r}: write blocks:0-3 or blocks:5") from None


def _term_matches(term: str, s: Site) -> bool:
    if term.startswith("path:"):
        return fnmatch.fnmatchcase(s.path, term[5:])
    if term == "all":
        return True
    if term == "all-linear":
        return s.kind in ("linear", "param-linear") and s.role not in OUT_OF_ALL_LINEAR
    return fnmatch.fnmatchcase(s.role, term) or (s.kind == "attention" and fnmatch.fnmatchcase(s.role + ".x", term))
