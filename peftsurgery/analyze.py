"""Find sites and their roles from a captured op graph, by data flow.

Each tensor gets an *origin*: the set of producers (linear layers, attention ops, embeddings, model inputs) that
reach it without passing through another linear layer. From that:
- the linear(s) at the origin of an attention op's query / key / value are attn.q / attn.k / attn.v; one linear
  feeding all three is attn.qkv; key/value fed from a different tensor than the query makes it cross-attention;
- a linear whose input comes from an attention op is attn.o;
- a linear outside the repeated blocks whose output reaches a model output is the head;
- a linear fed only by other linears (not by the residual stream) is mlp.down, and those are mlp.up, or mlp.gate
  when their path passes an activation;
- an embedding indexed directly by a model input (the earliest one) is embed; that input carries the tokens.
"""
from __future__ import annotations

import re

from torch import nn

from .capture import Graph, Op
from .sites import Site, block_of

PRODUCERS = ("linear", "attention", "embedding", "input")


def _eager_attention(g: Graph) -> None:
    """Rewrite matmul -> softmax -> matmul chains into attention ops with q, k, v inputs."""
    consumers: dict[str, list[str]] = {}
    for op in g.ops.values():
        for i in op.inputs:
            consumers.setdefault(i, []).append(op.name)
    for sm in [o for o in g.ops.values() if o.kind == "softmax"]:
        # back from the softmax to the score matmul
        score, frontier, seen = None, list(sm.inputs), set()
        while frontier and score is None:
            name = frontier.pop(0)
            if name in seen or name not in g.ops:
                continue
            seen.add(name)
            o = g.ops[name]
            if o.kind == "matmul":
                score = o
            elif o.kind not in PRODUCERS:
                frontier.extend(o.inputs)
        # forward from the softmax to the matmul with the values
        out, frontier, seen = None, [sm.name], set()
        while frontier and out is None:
            name = frontier.pop(0)
            for c in consumers.get(name, []):
                if c in seen:
                    continue
                seen.add(c)
                o = g.ops[c]
                if o.kind == "matmul":
                    out = o
                    break
                if o.kind in ("view", "other"):
                    frontier.append(c)
        if score is None or out is None:
            continue
        sin = [i for i in score.inputs if g.ops[i].kind != "param"][-2:]
        oin = [i for i in out.inputs if i != sm.name and not _descends(g, i, sm.name)]
        if len(sin) < 2 or not oin:
            continue
        out.kind = "attention"
        out.extra.update(q=sin[0], k=sin[1], v=oin[-1], impl="eager", is_causal=False, mask=None,
                         scores=sm.name)  # the softmax's input holds the scores after any mask
        score.kind = "other"


def _descends(g: Graph, name: str, ancestor: str, depth: int = 6) -> bool:
    if name == ancestor:
        return True
    if depth == 0 or name not in g.ops:
        return False
    return any(_descends(g, i, ancestor, depth - 1) for i in g.ops[name].inputs)


def origins(g: Graph) -> tuple[dict[str, frozenset], dict[str, frozenset]]:
    """origin[node]: producers reaching it; act[node]: linears reaching it through an activation."""
    origin: dict[str, frozenset] = {}
    act: dict[str, frozenset] = {}
    empty = frozenset()
    for op in g.ops.values():  # nodes are in topological order
        if op.kind in PRODUCERS:
            origin[op.name] = frozenset([op.name])
            act[op.name] = empty
            continue
        o = empty.union(*(origin.get(i, empty) for i in op.inputs))
        a = empty.union(*(act.get(i, empty) for i in op.inputs))
        if op.kind == "activation":
            a = a | frozenset(x for x in o if g.ops[x].kind == "linear")
        origin[op.name], act[op.name] = o, a
    return origin, act


def _strip(g: Graph, name: str) -> str:
    while name in g.ops and g.ops[name].kind == "view" and g.ops[name].inputs:
        name = g.ops[name].inputs[0]
    return name


def analyse(g: Graph, model: nn.Module) -> tuple[list[Site], dict]:
    """Sites found in a graph, and facts about the model's entry (which input the embedding reads)."""
    found = g.method + "+dataflow"
    if g.method == "hooks":
        return _by_names(g, model), {}
    _eager_attention(g)
    origin, act = origins(g)
    ops = g.ops
    lin = lambda names: sorted({n for n in names if ops[n].kind == "linear"})
    role: dict[str, str] = {}          # linear op name -> role
    sites: dict[str, Site] = {}

    def add_linear(name: str, r: str) -> None:
        op = ops[name]
        if op.site in sites:
            return
        i, o = op.extra["features"]
        st, bl = block_of(op.site)
        sites[op.site] = Site(op.site, op.site_kind, r, found, bl, st, i, o,
                              producer=_producer(g, op), consumer=None,
                              runner=op.module if op.site_kind == "param-linear" else None)
        role[name] = r

    attn_ops = [o for o in ops.values() if o.kind == "attention"]
    for a in attn_ops:
        q, k, v = (lin(origin.get(a.extra[x], ())) for x in ("q", "k", "v"))
        if not (q and k and v):
            continue
        qin = {_strip(g, ops[n].inputs[0]) for n in q if ops[n].inputs}
        kin = {_strip(g, ops[n].inputs[0]) for n in k if ops[n].inputs}
        pre = "xattn" if qin and kin and qin.isdisjoint(kin) else "attn"
        if q == k == v:
            for n in q:
                add_linear(n, f"{pre}.qkv")
        else:
            for names, r in ((q, "q"), (k, "k"), (v, "v")):
                for n in names:
                    add_linear(n, f"{pre}.{r}")
        o_names = [n for n, op in ops.items() if op.kind == "linear" and op.inputs
                   and a.name in origin.get(op.inputs[0], ())]
        for n in o_names:
            add_linear(n, f"{pre}.o")
        path = a.module or ops[q[0]].extra.get("owner", "")
        if path in sites:
            continue
        qs = ops[a.extra["q"]].shape
        head_dim = qs[-1] if qs else None
        qfeat, kfeat = ops[q[0]].extra["features"][1], ops[k[0]].extra["features"][1]
        if q == k:  # fused: the projection holds q, k and v
            qfeat = kfeat = qfeat // 3
        heads = qfeat // head_dim if head_dim else None
        kv_heads = kfeat // head_dim if head_dim else None
        st, bl = block_of(path)
        sites[path] = Site(path, "attention", pre, found, bl, st, heads=heads, kv_heads=kv_heads,
                           head_dim=head_dim, causal=_causal(g, a),
                           inputs={"q": ops[q[0]].site, "k": ops[k[0]].site, "v": ops[v[0]].site,
                                   "o": ops[o_names[0]].site if o_names else None},
                           impl=a.extra.get("impl"))

    # the head: a linear outside the repeated blocks whose output reaches a model output directly
    for out in g.outputs:
        for n in lin(origin.get(out, ())):
            if block_of(ops[n].site)[1] is None:
                add_linear(n, "head")

    # feed-forward: a linear fed only by linears (not by the residual stream)
    for name, op in ops.items():
        if op.kind != "linear" or name in role or not op.inputs:
            continue
        src = origin.get(op.inputs[0], frozenset())
        if src and all(ops[s].kind == "linear" and role.get(s) in (None, "mlp.up", "mlp.gate") for s in src):
            gated = act.get(op.inputs[0], frozenset())
            for s in sorted(src):
                if s not in role:
                    add_linear(s, "mlp.gate" if (s in gated and len(src) > 1 and len(src - gated) > 0) else "mlp.up")
            add_linear(name, "mlp.down")

    for name, op in ops.items():
        if op.kind == "linear" and name not in role:
            add_linear(name, "linear")

    # the input embedding: an embedding indexed directly by a model input (the earliest such input), whatever
    # that input is called
    entry = {}
    indexed = {_strip(g, op.extra.get("index") or ""): op for op in ops.values()
               if op.kind == "embedding" and op.site_kind == "embedding"}
    for name in g.user_inputs:
        op = indexed.get(name)
        if op is not None:
            st, bl = block_of(op.site)
            mod = model.get_submodule(op.site)
            sites.setdefault(op.site, Site(op.site, "embedding", "embed", found, bl, st,
                                           mod.num_embeddings, mod.embedding_dim))
            entry = {"stack": op.stack, "input": name}
            break
    _consumers(g, sites)
    return list(sites.values()), entry


def _producer(g: Graph, op: Op) -> str | None:
    if not op.inputs:
        return None
    src = g.ops.get(_strip(g, op.inputs[0]))
    return (src.module or src.name) if src else None


def _consumers(g: Graph, sites: dict[str, Site]) -> None:
    by_site = {op.name: op.site for op in g.ops.values() if op.site}
    for op in g.ops.values():
        for i in op.inputs:
            s = by_site.get(_strip(g, i))
            if s in sites and sites[s].consumer is None and op.module and op.module != s:
                sites[s].consumer = op.module


def _causal(g: Graph, a: Op) -> bool:
    if a.extra.get("is_causal"):
        return True
    # an explicit mask built by comparing positions (tril/triu or <= between aranges) is causal
    mask = a.extra.get("mask") or a.extra.get("scores")
    if not mask:
        return False
    seen, frontier = set(), [mask]
    while frontier:
        name = frontier.pop()
        if name in seen or name not in g.ops or len(seen) > 400:
            continue
        seen.add(name)
        op = g.ops[name]
        if op.kind == "compare" and (op.extra.get("triangle") or
                                     len(op.inputs) == 2 and all(_from_arange(g, i) for i in op.inputs)):
            return True
        if op.kind not in ("linear", "attention", "embedding"):
            frontier.extend(op.inputs)
    return False


def _from_arange(g: Graph, name: str, depth: int = 12) -> bool:
    op = g.ops.get(name)
    if op is None or depth == 0 or op.kind in ("input", "param", "linear", "embedding"):
        return False
    return op.kind == "arange" or any(_from_arange(g, i, depth - 1) for i in op.inputs)


_NAME_ROLES = [(r"(^|[._])(q|query|q_proj)$", "attn.q"), (r"(^|[._])(k|key|k_proj)$", "attn.k"),
               (r"(^|[._])(v|value|v_proj)$", "attn.v"), (r"(qkv|in_proj)", "attn.qkv"),
               (r"(o_proj|out_proj|(^|\.)o$)", "attn.o"), (r"gate", "mlp.gate"), (r"(up|fc1)", "mlp.up"),
               (r"(down|fc2)", "mlp.down"), (r"head", "head")]


def _by_names(g: Graph, model: nn.Module) -> list[Site]:
    """Last resort when no data flow could be captured: roles from module names."""
    sites = []
    for op in g.ops.values():
        st, bl = block_of(op.site)
        if op.kind == "linear":
            r = next((r for pat, r in _NAME_ROLES if re.search(pat, op.site.lower())), "linear")
            i, o = op.extra["features"]
            sites.append(Site(op.site, "linear", r, "hooks+name", bl, st, i, o))
        elif op.kind == "embedding" and not any(s.role == "embed" for s in sites):
            m = model.get_submodule(op.site)
            sites.append(Site(op.site, "embedding", "embed", "hooks+name", bl, st, m.num_embeddings, m.embedding_dim))
    return sites
