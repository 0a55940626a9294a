"""Find sites and their roles from a captured op graph, by data flow.

Each tensor gets an *origin*: the set of producers (linear layers, attention ops, embeddings, model inputs) that
reach it without passing through another linear layer (an in-place write reaches later readers of the tensor it
writes), and a *source*: the model inputs that reach it through anything. From that:
- the linear(s) at the origin of an attention op's query / key / value are attn.q / attn.k / attn.v; one linear
  feeding all three is attn.qkv, keys and values only attn.kv; a linear feeding only those projections, which
  read nothing else, is a low-rank down-projection attn.q_a / attn.kv_a; key/value computed from other model
  inputs than the query makes it cross-attention (xattn.*);
- heads and head dim come from the query as the attention op sees it (batch, heads, seq, head_dim); key/value
  heads from the key, divided by any repeat on its way from the projections (grouped-query attention);
- a linear whose input comes from an attention op is attn.o;
- a linear outside the repeated blocks whose output reaches a model output is the head;
- a linear fed only by linears (not by the residual stream) that feed nothing else is mlp.down, and those (fed by
  the residual stream or a norm's output) are mlp.up, or mlp.gate when their path passes an activation; moe.* for
  stacked expert weights (one per expert); a single one whose output is cut into two parts multiplied together,
  one through an activation, is a fused mlp.gate_up, its parts' rows followed through the cuts (Site.parts);
- a linear whose scores reach a top-k choice is a mixture of experts' router;
- any other linear is `linear`, and a linear module that ran is never left out;
- base tensors a rule may train (kind "tensor"): a linear site's bias (role bias), a norm's weight (role norm,
  the 1-D parameter scaling x / rms(x) or a layer_norm's weight) and its bias (bias);
- an embedding indexed directly by a model input (the earliest one) is embed; that input carries the tokens.
"""
from __future__ import annotations

import math
import re

from torch import nn

from .capture import Graph, Op, linear_shape
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
        q, k, v = sin[0], sin[1], oin[-1]
        if len(score.shape) == 4 and len(g.ops[q].shape) == 4:  # (batch, heads, q, k) scores: q, k, v seen in
            d = g.ops[q].shape[-1]                                # that layout (einsum's may differ)
            q, k, v = (_as_heads(g, x, score.shape, n, f) for x, n, f in ((q, -2, d), (k, -1, d), (v, -1, None)))
        out.kind = "attention"
        out.extra.update(q=q, k=k, v=v, impl="eager", is_causal=False, mask=None,
                         scores=sm.name)  # the softmax's input holds the scores after any mask
        score.kind = "other"


def _as_heads(g: Graph, name: str, scores: tuple, seq: int, d: int | None) -> str:
    """A view node of `name` shaped (batch, heads, seq, d features; d None: its last dim), the heads counted from
    its size, where the scores are (batch, heads, q, k) and seq picks q (-2) or k (-1)."""
    shape = g.ops[name].shape
    if len(shape) != 4:
        return name
    b, s, d = scores[0], scores[seq], d or shape[-1]
    heads = math.prod(shape) // (b * s * d) if b * s * d else 0
    if (b, heads, s, d) == tuple(shape) or not heads or heads * b * s * d != math.prod(shape):
        return name
    view = Op(f"{name}.as_heads", "view", [name], g.ops[name].module, g.ops[name].stack, shape=(b, heads, s, d))
    g.ops[view.name] = view
    return view.name


def _descends(g: Graph, name: str, ancestor: str, depth: int = 6) -> bool:
    if name == ancestor:
        return True
    if depth == 0 or name not in g.ops:
        return False
    return any(_descends(g, i, ancestor, depth - 1) for i in g.ops[name].inputs)


def origins(g: Graph) -> tuple[dict[str, frozenset], dict[str, frozenset], dict[str, frozenset]]:
    """origin[node]: producers reaching it; act[node]: linears reaching it through an activation; src[node]: the
    model inputs reaching it through anything. An in-place write reaches later readers of the tensor written."""
    origin: dict[str, frozenset] = {}
    act: dict[str, frozenset] = {}
    src: dict[str, frozenset] = {}
    empty = frozenset()
    for op in g.ops.values():  # nodes are in topological order
        src[op.name] = frozenset([op.name]) if op.kind == "input" else empty.union(*(src.get(i, empty)
                                                                                   for i in op.inputs))
        if op.kind in PRODUCERS:
            origin[op.name] = frozenset([op.name])
            act[op.name] = empty
            continue
        o = empty.union(*(origin.get(i, empty) for i in op.inputs))
        a = empty.union(*(act.get(i, empty) for i in op.inputs))
        if op.kind == "activation":
            a = a | frozenset(x for x in o if g.ops[x].kind == "linear")
        origin[op.name], act[op.name] = o, a
        w = op.extra.get("writes")
        if w in origin and w != op.name:
            origin[w], act[w], src[w] = origin[w] | o, act[w] | a, src[w] | src[op.name]
    return origin, act, src


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
    origin, act, src = origins(g)
    ops = g.ops
    lin = lambda names: sorted({n for n in names if ops[n].kind == "linear"})
    role: dict[str, str] = {}          # linear op name -> role
    sites: dict[str, Site] = {}
    feeds: dict[str, set] = {}         # linear -> the linears it feeds (without passing another linear)
    for name, op in ops.items():
        for s in (lin(origin.get(op.inputs[0], ())) if op.kind == "linear" and op.inputs else ()):
            feeds.setdefault(s, set()).add(name)
    fed_by_linears = lambda name: _fed_by_linears(g, origin, name)

    def add_linear(name: str, r: str) -> None:
        op = ops[name]
        if op.site in sites:
            return
        i, o = op.extra["features"]
        st, bl = block_of(op.site)
        experts = op.extra.get("experts")
        if experts and r.startswith("mlp."):  # a feed-forward run once per expert
            r = "moe." + r[4:]
        sites[op.site] = Site(op.site, op.site_kind, r, found, bl, st, i, o,
                              producer=_producer(g, op), consumer=None,
                              runner=op.module if op.site_kind == "param-linear" else None, experts=experts)
        role[name] = r

    # a router: a linear whose scores reach a choice (top-k) before any other linear; it picks among experts
    # (JetMoE's query experts among them) but projects nothing
    indexed = {x for op in ops.values() if op.kind == "embedding" and op.extra.get("index")
               for x in src.get(op.extra["index"], ())}
    content = lambda node: frozenset(x for x in src.get(node, ()) if ops[x].extra.get("float") or x in indexed)
    routers = {n for op in ops.values() if op.extra.get("choice") and op.inputs
               for n in lin(origin.get(op.inputs[0], ()))}
    for a in [o for o in ops.values() if o.kind == "attention"]:
        full = {x: set(lin(origin.get(a.extra[x], ()))) - routers for x in "qkv"}
        if not all(full.values()):
            continue
        proj = set().union(*full.values())
        # low-rank down-projections (DeepSeek's q_a_proj, kv_a_proj_with_mqa): linears that feed only these
        # projections, which read nothing else (the residual stream never reaches them directly)
        down: dict[str, set] = {}
        for m in proj:
            if fed_by_linears(m):
                for d in lin(origin[ops[m].inputs[0]]):
                    if feeds.get(d, set()) <= proj:
                        down.setdefault(d, set()).add(m)
        part = {x: (full[x] - down.keys()) or full[x] for x in "qkv"}
        # key/value from another sequence than the query (decided by the model inputs each comes from that carry a
        # sequence: ids an embedding reads, features, states; not a mask, which may reach the keys alone)
        pre = "xattn" if content(a.extra["q"]) != content(a.extra["k"]) else "attn"
        for n in sorted(set().union(*part.values())):
            add_linear(n, f"{pre}.{''.join(x for x in 'qkv' if n in part[x])}")
        for d in sorted(down.keys() - set().union(*part.values())):
            add_linear(d, f"{pre}.{''.join(x for x in 'qkv' if d in full[x] or down[d] & part[x])}_a")
        o_names = [n for n, op in ops.items() if op.kind == "linear" and op.inputs
                   and a.name in origin.get(op.inputs[0], ())]
        for n in o_names:
            add_linear(n, f"{pre}.o")
        q, k, v = (sorted(part[x]) for x in "qkv")
        path = a.module or ops[q[0]].extra.get("owner", "")
        if path in sites:
            continue
        qs, ks, vs = (ops[a.extra[x]].shape for x in "qkv")
        head_dim = qs[-1] if qs else None
        if len(qs) == 4 and len(ks) == 4:
            # (batch, heads, seq, head_dim): keys may be repeated for grouped-query attention before the op
            heads, kv_heads = qs[-3], ks[-3] // _repeats(g, a.extra["k"], origin, proj)
            if not kv_heads or heads % kv_heads:
                kv_heads = ks[-3]
        else:  # (batch * heads, seq, head_dim): from the projections' widths
            qfeat, kfeat = ops[q[0]].extra["features"][1], ops[k[0]].extra["features"][1]
            if q == k:  # fused: the projection holds q, k and v
                qfeat = kfeat = qfeat // 3
            heads = qfeat // head_dim if head_dim else None
            kv_heads = kfeat // head_dim if head_dim else None
        st, bl = block_of(path)
        sites[path] = Site(path, "attention", pre, found, bl, st, heads=heads, kv_heads=kv_heads,
                           head_dim=head_dim, v_head_dim=vs[-1] if vs else head_dim, causal=_causal(g, a),
                           inputs={"q": ops[q[0]].site, "k": ops[k[0]].site, "v": ops[v[0]].site,
                                   "o": ops[o_names[0]].site if o_names else None},
                           impl=a.extra.get("impl"))

    # the head: a linear outside the repeated blocks whose output reaches a model output directly, and no block
    # (an input projection's output reaches the output too, along the residual stream, when there is no head)
    for out in g.outputs:
        for n in lin(origin.get(out, ())):
            if not _in_blocks(model, ops[n].site) and not any(_in_blocks(model, ops[f].site) for f in feeds.get(n, ())):
                add_linear(n, "head")

    for n in sorted(routers):
        add_linear(n, "router")

    # feed-forward: a linear fed only by linears (not by the residual stream) that feed nothing else; not a token
    # mixer's projections, whose outputs pass a convolution or a running sum over the sequence in a block without
    # attention (a gated delta net's, a short convolution's; Segformer's feed-forward, beside attention, has a
    # convolution of its own)
    gates = {_strip(g, op.inputs[0]) for op in ops.values() if op.kind == "activation" and op.inputs}
    attended = {block_of(p) for p, site in sites.items() if site.kind == "attention"}
    mixed = {x for op in ops.values() if op.extra.get("mixes_positions") for i in op.inputs
             for x in origin.get(i, ()) if block_of(ops[x].site) not in attended}
    for name, op in ops.items():
        if op.kind != "linear" or name in role or not fed_by_linears(name):
            continue
        if name in gates:
            continue   # its output goes straight into an activation: a gate (a gated norm's bottleneck), not a down
        ups = origin[op.inputs[0]]
        # (after a norm, only a pair with an activation between is a feed-forward: not Zamba2's low-rank adapters)
        if all(role.get(s) in (None, "mlp.up", "mlp.gate") and feeds[s] == {name} and s not in mixed and (
                not fed_by_linears(s) or (_after_norm(g, ops[s].inputs[0]) and act.get(op.inputs[0]))) for s in ups):
            gated = act.get(op.inputs[0], frozenset())
            for s in sorted(ups):
                if s in role:
                    continue
                parts = _gate_up(g, origin, act, s, op.inputs[0]) if len(ups) == 1 and not ops[s].extra.get(
                    "experts") else None   # (stacked experts' fused gate_up: not sliced yet)
                if parts is not None:   # a fused gate_up: its gate and up parts are slices (SiteMap.slices)
                    add_linear(s, "mlp.gate_up")
                    if sites[ops[s].site].role == "mlp.gate_up":
                        sites[ops[s].site].parts = parts
                else:
                    add_linear(s, "mlp.gate" if (s in gated and len(ups) > 1 and len(ups - gated) > 0) else "mlp.up")
            add_linear(name, "mlp.down")

    for name, op in ops.items():
        if op.kind == "linear" and name not in role:
            add_linear(name, "linear")
    # base tensors a rule may train: the biases of linear sites, the weights and biases of norms
    for op in ops.values():
        own = [(op.extra["bias"], "bias")] if "bias" in op.extra and op.site in sites else []
        for fqn, r in own + [(f, "norm") for f in op.extra.get("norm", ())] + \
                [(f, "bias") for f in op.extra.get("norm_bias", ())]:
            if fqn not in sites:
                st, bl = block_of(fqn)
                n = model.get_parameter(fqn).numel()
                sites[fqn] = Site(fqn, "tensor", r, found, bl, st, out_features=n, runner=op.module,
                                  producer=op.site if r == "bias" and op.site else None)
    # a linear module that ran with no op recognised as its weight's use is still a site
    for path in g.ran:
        if path not in sites and path + ".weight" not in sites:
            st, bl = block_of(path)
            i, o = linear_shape(model.get_submodule(path))
            sites[path] = Site(path, "linear", "linear", g.method + "+module", bl, st, i, o)

    # the input embedding: an embedding indexed directly by a model input (the earliest such input), whatever
    # that input is called
    entry = {}
    indexed = {_strip(g, op.extra.get("index") or ""): op for op in ops.values()
               if op.kind == "embedding" and op.site_kind == "embedding"}
    for name in g.user_inputs:
        op = indexed.get(name)
        if op is None:
            continue
        if entry:   # later inputs indexing an embedding: token types, an encoder-decoder's decoder ids
            entry["later"].append((op.stack, op.site))
            continue
        st, bl = block_of(op.site)
        mod = model.get_submodule(op.site)
        sites.setdefault(op.site, Site(op.site, "embedding", "embed", found, bl, st,
                                       mod.num_embeddings, mod.embedding_dim))
        entry = {"stack": op.stack, "input": name, "later": []}
    _consumers(g, sites)
    return list(sites.values()), entry


def _gate_up(g: Graph, origin: dict, act: dict, fused: str, into: str) -> dict | str | None:
    """How the output of the linear `fused` reaches `into` (the down-projection's input, fed by it alone): as a
    product of two parts of its output features side by side, one through an activation (the gate) and one not
    (the up part): {"gate": (start, stop), "up": (start, stop)}; a string saying why not, when it is such a
    product but of parts the cuts on the way do not describe (interleaved, reshaped); None when its output is not
    cut into parts (a plain up-projection: GELU written out multiplies the whole output by a function of it).
    Each node's rows: the (start, stop) of the fused output's last dim it holds, followed through views that cut
    the last dim (capture's "cut") and elementwise ops; "?" where they are lost."""
    ops = g.ops
    rows: dict[str, tuple | dict | str] = {fused: (0, ops[fused].extra["features"][1])}
    gating = False
    for name, op in ops.items():
        if name in rows or fused not in origin.get(name, ()) or op.kind in PRODUCERS:
            continue
        ins = [i for i in op.inputs if i in rows]
        if not ins:
            continue
        cut, base = op.extra.get("cut"), rows[ins[0]]
        if op.kind == "view":
            if isinstance(cut, list):
                rows[name] = base                            # a split: its getitems cut
            elif isinstance(cut, tuple) and isinstance(base, tuple) and cut[1] <= base[1] - base[0]:
                rows[name] = (base[0] + cut[0], base[0] + cut[1])
            elif isinstance(base, dict) and cut == (0, (ops[ins[0]].shape or (-1,))[-1]):
                rows[name] = base                            # the product, moved or cast
            else:
                rows[name] = "?"
            continue
        if any(ops[i].shape != op.shape for i in ins):       # not elementwise on those features
            rows[name] = "?"
            continue
        vals = [rows[i] for i in ins]
        gate = [i for i in ins if fused in act.get(i, ())]
        if op.extra.get("product") and len(ins) == 2 and len(gate) == 1 and not vals[0] == vals[1] == rows[fused] \
                and not any(isinstance(v, dict) for v in vals):   # act(one part) * another part
            gating = True
            g_rows, u_rows = vals[ins.index(gate[0])], vals[1 - ins.index(gate[0])]
            apart = "?" not in vals and (g_rows[1] <= u_rows[0] or u_rows[1] <= g_rows[0])
            rows[name] = {"gate": g_rows, "up": u_rows} if apart else "?"
            continue
        distinct = [v for k, v in enumerate(vals) if v not in vals[:k]]
        rows[name] = distinct[0] if len(distinct) == 1 else "?"
    out = rows.get(into)
    width = ops[fused].extra["features"][1]
    if isinstance(out, dict) and out["gate"][1] - out["gate"][0] + out["up"][1] - out["up"][0] == width:
        return out
    if not gating:
        return None
    return "its outputs are not a gate part and an up part side by side (interleaved, or cut in a way not followed)"


def _in_blocks(model: nn.Module, path: str) -> bool:
    """Whether a path lies in a repeated block: under a numbered child of a ModuleList, or of a Sequential of
    several modules of one kind that hold modules of their own (not `Sequential(Flatten, Linear)`, Bit's
    classifier)."""
    parts = path.split(".")
    for i in range(1, len(parts)):
        if parts[i].isdigit():
            try:
                parent = model.get_submodule(".".join(parts[:i]))
            except AttributeError:
                return True
            kids = list(parent.children())
            if isinstance(parent, nn.ModuleList) or len(kids) > 1 and len({type(k) for k in kids}) == 1 and any(
                    next(k.children(), None) is not None for k in kids):
                return True
    return False


def _after_norm(g: Graph, name: str) -> bool:
    """Whether a tensor is a norm's output (through views): a feed-forward after a norm starts a stage of its own
    even where no residual stream reaches it (Zamba's shared block: attention, norm, feed-forward)."""
    op = g.ops.get(_strip(g, name))
    return op is not None and ("norm" in op.extra or "norm_bias" in op.extra)


def _fed_by_linears(g: Graph, origin: dict, name: str) -> bool:
    """A linear whose input comes only from other linears of its own block, not from the residual stream (which
    may also come from linears only: earlier blocks' outputs and a projection of the embeddings, as in ALBERT
    and wav2vec2)."""
    op = g.ops[name]
    src = origin.get(op.inputs[0], ()) if op.inputs else ()
    here = block_of(op.site)
    return bool(src) and all(g.ops[s].kind == "linear" and block_of(g.ops[s].site) == here for s in src)


def _repeats(g: Graph, name: str, origin: dict, proj: set) -> int:
    """How many times a tensor repeats what the projections proj computed: walking back along its widest input
    that comes from them, the product of the growth at each repeat (expand, repeat, repeat_interleave)."""
    numel = lambda shape: math.prod(shape) if shape else 0
    factor = 1
    for _ in range(64):
        op = g.ops.get(name)
        if op is None or op.kind in PRODUCERS:
            break
        ins = [i for i in op.inputs if origin.get(i, frozenset()) & proj]
        if not ins:
            break
        name = max(ins, key=lambda i: numel(g.ops[i].shape))
        if op.extra.get("repeat") and numel(op.shape) > numel(g.ops[name].shape) > 0:
            factor *= numel(op.shape) // numel(g.ops[name].shape)
    return factor


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
               (r"(o_proj|out_proj|(^|\.)o$)", "attn.o"), (r"gate_?up", "mlp.gate_up"), (r"gate", "mlp.gate"),
               (r"(up|fc1)", "mlp.up"), (r"(down|fc2)", "mlp.down"), (r"head", "head")]


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
