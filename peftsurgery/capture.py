"""Capture a model's computation into a tiny op graph (the IR the analysis reads).

Three ways, tried in order: torch.export (non-strict), torch.fx symbolic tracing, forward hooks. The first two
give data flow; hooks give only the linear layers that ran and their shapes, so their roles come from names.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

try:  # transformers' GPT-2 style linear with a transposed weight
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is optional
    Conv1D = ()

ACTIVATIONS = {"silu", "gelu", "relu", "tanh", "sigmoid", "elu", "leaky_relu", "hardswish", "mish", "softplus",
               "gelu_", "relu_", "silu_"}
MATMULS = {"matmul", "bmm", "baddbmm", "mm", "einsum"}
# matmuls over groups of rows, each group with its own weight (mixture-of-experts kernels): (rows, in) x (E, in, out)
GROUPED = {"grouped_mm", "_grouped_mm", "grouped_mm_fallback"}
# normalisation ops: the positions of their weight and bias arguments
NORMS = {"layer_norm": (2, 3), "native_layer_norm": (2, 3), "rms_norm": (2,), "group_norm": (2, 3)}
MOVES = {"mul", "_to_copy", "to", "type_as", "float", "view", "reshape", "expand", "contiguous"}  # rsqrt to weight
PICKS = {"index", "select", "getitem"}   # ops picking one expert's weight out of a stacked (E, out, in) parameter
# ops that only move or relabel data: looking through them keeps a tensor's identity
VIEWS = {"view", "reshape", "transpose", "permute", "t", "numpy_T", "mT", "mH", "adjoint", "contiguous", "unsqueeze",
         "squeeze", "expand", "expand_as", "broadcast_to", "clone",
         "_to_copy", "to", "detach", "alias", "flatten", "unflatten", "dropout", "type_as", "float", "_unsafe_view",
         "select", "getitem", "split", "chunk", "unbind", "slice", "narrow"}
FLIPS = {"t", "numpy_T", "mT", "mH", "adjoint", "transpose", "permute"}   # on a 2-D weight: swap its two sides
# ops that copy a tensor several times over (grouped-query attention repeats keys/values with one of these)
REPEATS = {"expand", "expand_as", "broadcast_to", "repeat", "repeat_interleave", "tile"}
# ops that mix a tensor along the positions of the sequence (a convolution wider than one position, a running sum)
CONVS = {"convolution", "conv1d", "conv2d", "conv3d", "_convolution"}
RUNNING = {"cumsum", "cumprod", "logcumsumexp", "cummax", "cummin"}
COPIES = {"clone", "_to_copy", "to", "contiguous", "float", "type_as", "dropout"}   # views that may not alias


def is_linear_module(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (bool(Conv1D) and isinstance(m, Conv1D))


def linear_shape(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    return m.weight.shape[0], m.weight.shape[1]  # Conv1D stores (in, out)


@dataclass
class Op:
    name: str
    kind: str                  # input | param | linear | embedding | attention | softmax | matmul | activation | view | output | other
    inputs: list[str]
    module: str = ""           # innermost module path that ran it
    stack: tuple = ()          # module paths, outermost first
    site: str = ""             # linear / embedding: the site path
    site_kind: str = ""        # linear | param-linear | embedding
    shape: tuple = ()
    extra: dict = field(default_factory=dict)


@dataclass
class Graph:
    ops: dict[str, Op]
    outputs: list[str]
    user_inputs: list[str]
    method: str
    ran: list[str] = field(default_factory=list)   # linear modules whose forward ran (each must become a site)
    unread: list[str] = field(default_factory=list)   # parameters read only inside regions left out of the graph


def _base_name(target) -> str:
    """aten.linear.default -> linear; torch.nn.functional.linear -> linear; 'softmax' (a method) -> softmax."""
    if isinstance(target, str):
        return target
    if target is operator.getitem:
        return "getitem"
    if target is operator.matmul:
        return "matmul"
    name = getattr(target, "__name__", str(target))
    if hasattr(target, "_schema"):  # an aten OpOverload
        name = target._schema.name.split("::")[-1]
    return name.split(".")[0]


def _flat_nodes(args) -> list:
    out = []
    for a in args:
        if isinstance(a, torch.fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(_flat_nodes(a))
        elif isinstance(a, dict):
            out.extend(_flat_nodes(list(a.values())))
    return out


def _shape(node) -> tuple:
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    shape = getattr(val, "shape", None)
    try:
        return tuple(int(d) for d in shape) if shape is not None else ()
    except Exception:
        return ()


def _aliased(n: torch.fx.Node) -> str:
    """The tensor a view shares its storage with (an in-place write to the view changes it)."""
    while n.op in ("call_function", "call_method") and n.args and isinstance(n.args[0], torch.fx.Node):
        name = _base_name(n.target)
        if name not in VIEWS or name in COPIES:
            break
        n = n.args[0]
    return n.name


SPLITS = {"split", "chunk", "split_with_sizes", "tensor_split", "unbind"}
KEEPS_LAST = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "unsqueeze", "squeeze", "expand",
              "expand_as", "broadcast_to"}   # the last dim passes through when its size is unchanged


def _cut(n: torch.fx.Node, name: str, ops: dict) -> tuple | list | str:
    """What a view does to the last dim of its first input: the (start, stop) of it that its output's last dim
    holds (all of it when another dim is cut or moved), a list of those for a split (its getitems pick one), or
    "?" when its output's last dim is not one contiguous range of the input's (a stride, a pick, a reshape)."""
    args = list(n.args)
    x = args[0] if args else None
    shape = _shape(x) if isinstance(x, torch.fx.Node) else ()
    parent = ops.get(x.name) if isinstance(x, torch.fx.Node) else None
    if name == "getitem" and parent is not None and isinstance(pieces := parent.extra.get("cut"), list):
        if len(pieces) == 1:   # a split along another dim: every piece holds all of the last dim
            return pieces[0]
        return pieces[args[1]] if isinstance(args[1], int) and -len(pieces) <= args[1] < len(pieces) else "?"
    if not shape:
        return "?"
    size, last = shape[-1], len(shape) - 1
    full = (0, size)
    arg = lambda i, key, default=None: args[i] if len(args) > i else n.kwargs.get(key, default)
    is_last = lambda d: isinstance(d, int) and d % len(shape) == last
    if name in COPIES or name in ("detach", "alias"):
        return full
    if name in KEEPS_LAST:
        return full if _shape(n)[-1:] == (size,) else "?"
    if name in ("transpose", "permute"):
        dims = args[1:] if name == "transpose" else (arg(1, "dims") or ())
        moved = any(is_last(d) for d in dims) if name == "transpose" else not (dims and is_last(list(dims)[-1]))
        return "?" if moved else full
    if name in FLIPS:   # t, mT, ...: the last two dims swap
        return "?"
    if name in ("slice", "narrow"):
        if not is_last(arg(1, "dim", 0)):
            return full
        start = arg(2, "start", 0) or 0
        stop = start + arg(3, "length") if name == "narrow" else arg(3, "end", size)
        stop = size if stop is None else stop
        if arg(4, "step", 1) not in (None, 1) or not isinstance(start, int) or not isinstance(stop, int):
            return "?"
        start, stop = (v + size if v < 0 else v for v in (start, stop))
        return (max(0, min(start, size)), max(0, min(stop, size)))
    if name in SPLITS:
        spec = None if name == "unbind" else args[1] if len(args) > 1 else next(
            (v for k, v in n.kwargs.items() if k != "dim"), None)
        if not is_last(arg(1, "dim", 0) if name == "unbind" else arg(2, "dim", 0)):
            return [full]
        if name == "unbind" or not isinstance(spec, (int, list, tuple)):
            return "?"
        if isinstance(spec, int):   # chunk: n pieces of ceil(size / n); split: pieces of spec; tensor_split: n
            step = -(-size // spec) if name == "chunk" else spec
            sizes = [size // spec + (i < size % spec) for i in range(spec)] if name == "tensor_split" else \
                [min(step, size - i) for i in range(0, size, step)]
        elif name == "tensor_split":   # split before these indices
            ends = [min(max(i, 0), size) for i in spec] + [size]
            sizes = [b - a for a, b in zip([0] + ends[:-1], ends)]
        else:
            sizes = list(spec)
        ends = [sum(sizes[:i + 1]) for i in range(len(sizes))]
        return [(e - w, e) for w, e in zip(sizes, ends)]
    if name in ("select", "getitem"):   # one index: of dim 0 (getitem) or of dim `dim` (select)
        index = args[1] if len(args) > 1 else None
        if name == "select":
            return "?" if is_last(arg(1, "dim", 0)) else full
        if isinstance(index, int):
            return full if len(shape) > 1 else "?"
        if isinstance(index, tuple) and all(i is Ellipsis or isinstance(i, (int, slice)) for i in index):
            on_last = index[-1] if (Ellipsis in index or len(index) == len(shape)) and index else slice(None)
            if isinstance(on_last, slice) and on_last.step in (None, 1):
                a, b = (0 if on_last.start is None else on_last.start), (size if on_last.stop is None else on_last.stop)
                a, b = (v + size if v < 0 else v for v in (a, b))
                return (max(0, min(a, size)), max(0, min(b, size)))
        return "?"
    return "?"


def from_fx(gm: torch.fx.GraphModule, model: nn.Module, method: str, param_of: dict[str, str],
            user_inputs: list[str]) -> Graph:
    """Turn an fx graph (from export or symbolic_trace) into the IR. param_of maps a node name to a parameter FQN."""
    modules = dict(model.named_modules(remove_duplicate=False))
    params = dict(model.named_parameters(remove_duplicate=False))
    ops: dict[str, Op] = {}
    outputs: list[str] = []

    def param_through(n):
        """The parameter FQN a node is, looking through views (weights are often transposed first) and picks of
        one expert's weight, and how many times it was transposed on the way."""
        seen = flips = 0
        while isinstance(n, torch.fx.Node) and seen < 8:
            if n.name in param_of:
                return param_of[n.name], flips
            if n.op == "get_attr":
                return str(n.target), flips
            name = _base_name(n.target) if n.op in ("call_function", "call_method") else ""
            if (name in VIEWS or name in PICKS) and n.args:
                flips += name in FLIPS
                n = n.args[0]
                seen += 1
                continue
            return None, 0
        return None, 0

    def vector(n):
        """The 1-D parameter a node is (through views and adding a constant: Gemma's norms scale by 1 + w)."""
        while isinstance(n, torch.fx.Node) and n.op == "call_function" and _base_name(n.target) == "add" and \
                len(n.args) == 2 and not isinstance(n.args[1], torch.fx.Node):
            n = n.args[0]
        fqn = param_through(n)[0] if isinstance(n, torch.fx.Node) else None
        return fqn if fqn is not None and params.get(fqn) is not None and params[fqn].dim() == 1 else None

    normed: set[str] = set()
    roots: set[str] = set()   # square roots (a norm may divide by one)
    for n in gm.graph.nodes:
        ins = [a.name for a in _flat_nodes((n.args, n.kwargs))]
        stack_meta = n.meta.get("nn_module_stack") or {}
        stack = tuple(v[0] for v in stack_meta.values() if v[0])
        module = stack[-1] if stack else ""
        op = Op(n.name, "other", ins, module, stack, shape=_shape(n))
        if n.op == "placeholder":
            op.kind = "param" if n.name in param_of else ("input" if n.name in user_inputs else "param")
            if isinstance(val := n.meta.get("val"), torch.Tensor):
                op.extra["float"] = val.is_floating_point()
        elif n.op == "get_attr":
            op.kind = "param"
        elif n.op == "output":
            op.kind = "output"
            outputs = ins
        elif n.op == "call_module":
            mod = modules.get(str(n.target))
            op.module = str(n.target)
            op.stack = stack + (op.module,)
            if mod is not None and is_linear_module(mod):
                op.kind, op.site, op.site_kind = "linear", op.module, "linear"
                op.extra["features"] = linear_shape(mod)
                op.inputs = ins[:1]
                if getattr(mod, "bias", None) is not None:
                    op.extra["bias"] = f"{op.module}.bias"
            elif isinstance(mod, nn.Embedding):
                op.kind, op.site, op.site_kind = "embedding", op.module, "embedding"
                op.extra["index"] = ins[0] if ins else None
            elif type(mod).__name__.lower() in ACTIVATIONS or isinstance(mod, (nn.SiLU, nn.GELU, nn.ReLU, nn.Tanh)):
                op.kind = "activation"
        elif n.op in ("call_function", "call_method"):
            name = _base_name(n.target)
            if n.op == "call_function" and n.target in (F.scaled_dot_product_attention,):
                name = "scaled_dot_product_attention"
            args = list(n.args)
            if name in {"linear", "addmm", "mm", "matmul", "bmm"} | GROUPED and len(args) >= 2:
                # the weight of a linear map: F.linear(x, W), addmm(b, x, W.t()), x @ W.T (FalconLinear) or, as
                # the left operand, W @ x (Mamba's dt_proj); seen through views such as a transpose or a slice.
                # Experts: a stacked (E, out, in) weight, one expert's picked (F.linear(x, W[e]), bmm(W[ids], x))
                # or all of them in a grouped matmul
                w_arg, x_arg = (args[2], args[1]) if name == "addmm" else (args[1], args[0])
                fqn, flips = param_through(w_arg)
                left = name in ("mm", "matmul", "bmm") and fqn is None
                if left:
                    w_arg, x_arg = args[0], args[1]
                    fqn, flips = param_through(w_arg)
                w = params.get(fqn) if fqn is not None else None
                if w is not None and w.dim() in (2, 3):
                    owner = fqn.rsplit(".", 1)[0] if "." in fqn else ""
                    # a module site only when that linear module's own forward ran this op
                    mod = modules.get(module)
                    if mod is not None and is_linear_module(mod) and mod.weight is w:
                        op.kind, op.site, op.site_kind = "linear", module, "linear"
                        op.extra["features"] = linear_shape(mod)
                    else:
                        # W as stored maps (in, out) = W.shape reversed when used as F.linear does (W @ x counts
                        # the same); each transpose on the way swaps that
                        as_linear = (name == "linear" or left) == (flips % 2 == 0)
                        op.kind, op.site, op.site_kind = "linear", fqn, "param-linear"
                        op.extra["features"] = (w.shape[-1], w.shape[-2]) if as_linear else (w.shape[-2], w.shape[-1])
                        op.extra["owner"] = owner
                        if w.dim() == 3:
                            op.extra["experts"] = w.shape[0]
                    op.inputs = [x_arg.name] if isinstance(x_arg, torch.fx.Node) else []
                    b_arg = args[2] if name == "linear" and len(args) > 2 else args[0] if name == "addmm" else None
                    bias = param_through(b_arg)[0] if isinstance(b_arg, torch.fx.Node) else None
                    if bias is not None and params.get(bias) is not None and params[bias].dim() == 1:
                        op.extra["bias"] = bias
                elif name != "linear":
                    op.kind = "matmul"
            elif name == "embedding" and args:
                fqn = param_through(args[0])[0]
                mod = modules.get(module)
                if isinstance(mod, nn.Embedding):
                    op.kind, op.site, op.site_kind = "embedding", module, "embedding"
                elif fqn:
                    op.kind, op.site, op.site_kind = "embedding", fqn, "param-embedding"
                idx = args[1] if len(args) > 1 else None
                op.extra["index"] = idx.name if isinstance(idx, torch.fx.Node) else None
                op.inputs = [op.extra["index"]] if op.extra["index"] else []
            elif name == "scaled_dot_product_attention":
                op.kind = "attention"
                names = [a.name if isinstance(a, torch.fx.Node) else None for a in args[:3]]
                mask = args[3] if len(args) > 3 else n.kwargs.get("attn_mask")
                causal = args[5] if len(args) > 5 else n.kwargs.get("is_causal", False)
                op.extra.update(q=names[0], k=names[1], v=names[2], is_causal=bool(causal),
                                mask=mask.name if isinstance(mask, torch.fx.Node) else None, impl="sdpa")
            elif name in ("softmax", "_softmax", "_safe_softmax"):
                op.kind = "softmax"
            elif name in MATMULS:
                op.kind = "matmul"
            elif name in ACTIVATIONS:
                op.kind = "activation"
            elif name in VIEWS:
                op.kind = "view"
                try:
                    op.extra["cut"] = _cut(n, name, ops)
                except (TypeError, ValueError, IndexError, ZeroDivisionError):   # symbolic sizes, odd arguments
                    op.extra["cut"] = "?"
            elif name in ("arange",):
                op.kind = "arange"
            elif name == "topk":   # a choice among scores (a mixture-of-experts router picks its experts)
                op.extra["choice"] = True
            elif name in NORMS:    # a normalisation op taking its weight and bias as arguments
                for key, i in zip(("norm", "norm_bias"), NORMS[name]):
                    op.extra[key] = [f for f in [vector(args[i]) if i < len(args) else None] if f is not None]
            elif name in ("tril", "triu", "le", "lt", "ge", "gt"):
                op.kind = "compare"
                op.extra["triangle"] = name in ("tril", "triu")
            # a norm written out (RMSNorm, LayerNorm): x * rsqrt(mean(x^2) + eps) (or pow(., -0.5), or x divided by
            # a sqrt), then times a weight (plus a bias)
            after_rsqrt = any(a.name in normed for a in _flat_nodes(args))
            over_root = lambda i: len(args) > i and isinstance(args[i], torch.fx.Node) and args[i].name in roots
            if name == "sqrt":
                roots.add(n.name)
            if (name == "rsqrt" or name == "pow" and len(args) > 1 and args[1] == -0.5 or name in MOVES and after_rsqrt
                    or name == "div" and over_root(1) or name == "reciprocal" and over_root(0)):
                normed.add(n.name)
            if name == "mul" and after_rsqrt:
                op.extra["norm"] = [f for a in args if (f := vector(a)) is not None]
            elif name == "add" and any(ops[a.name].extra.get("norm") for a in _flat_nodes(args) if a.name in ops):
                op.extra["norm_bias"] = [f for a in args if (f := vector(a)) is not None]
            if name in REPEATS:
                op.extra["repeat"] = True
            if name in RUNNING or name in CONVS and _wider_than_one(args):
                op.extra["mixes_positions"] = True
            if name in ("mul", "mul_"):
                op.extra["product"] = True
            if args and isinstance(args[0], torch.fx.Node) and (
                    n.target is operator.setitem or name.endswith("_") and not name.endswith("__")):
                op.extra["writes"] = _aliased(args[0])  # in place: what it writes reaches later readers of that tensor
        ops[n.name] = op
    ran = {p for op in ops.values() for p in op.stack if p in modules and is_linear_module(modules[p])}
    return Graph(ops, outputs, user_inputs, method, sorted(ran))


def _wider_than_one(args) -> bool:
    """Whether a convolution's kernel (its second argument) spans more than one position (or is of unknown size)."""
    val = args[1].meta.get("val") if len(args) > 1 and isinstance(args[1], torch.fx.Node) else None
    return not isinstance(val, torch.Tensor) or any(k != 1 for k in val.shape[2:])


def by_export(model: nn.Module, kwargs: dict, method: str = "export") -> Graph:
    import torch.fx.config as fx_config
    # the analysis never reads stack traces; recording them is ~15% of export (the switch is new in torch 2.13)
    before = getattr(fx_config, "do_not_emit_stack_traces", None)
    if before is not None:
        fx_config.do_not_emit_stack_traces = True
    try:
        ep = torch.export.export(model, (), kwargs, strict=False)
    finally:
        if before is not None:
            fx_config.do_not_emit_stack_traces = before
    sig = ep.graph_signature
    param_of = dict(sig.inputs_to_parameters)
    for k, v in getattr(sig, "inputs_to_buffers", {}).items():
        param_of.setdefault(k, v)
    user = [s for s in sig.user_inputs]
    gm = _inline_regions(ep.graph_module)
    graph = from_fx(gm, model, method, param_of, user)
    params = dict(model.named_parameters(remove_duplicate=False))
    graph.unread = sorted(param_of[n.name] for n in gm.graph.nodes if n.op == "placeholder" and param_of.get(
        n.name) in params and n.users and all(_enclosed(u, gm) for u in n.users))
    return graph


def _enclosed(n: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    """Whether a node runs a graph of its own (a region left out of line, torch.cond's branches), which the
    analysis does not enter."""
    return n.op == "call_function" and _graph_arg(n, gm) is not None


def _graph_arg(n: torch.fx.Node, gm: torch.fx.GraphModule) -> int | None:
    """The position of the argument naming a graph of the node's own (a higher-order op's), or None."""
    return next((i for i, a in enumerate(n.args) if isinstance(a, torch.fx.Node) and a.op == "get_attr"
                 and isinstance(getattr(gm, a.target, None), torch.fx.GraphModule)), None)


def _inline_regions(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The regions export wraps in a higher-order op with a graph of their own (a `with torch.no_grad()` or autocast
    block in the forward, as Reformer's layers have) put back in line, so that their layers are analysed like the
    others (from_fx reads one graph: those layers had no sites); a region's own regions first. A region holding
    constants of its own, or whose results are read other than one by one, stays."""
    g = gm.graph
    for n in [n for n in g.nodes if n.op == "call_function" and getattr(n.target, "_name", "") in
              ("wrap_with_set_grad_enabled", "wrap_with_autocast")]:
        at = _graph_arg(n, gm)
        sub = _inline_regions(getattr(gm, n.args[at].target)) if at is not None else None
        if (sub is None or any(x.op == "get_attr" for x in sub.graph.nodes)
                or not all(u.target is operator.getitem for u in n.users)):
            continue
        env = dict(zip([x for x in sub.graph.nodes if x.op == "placeholder"], n.args[at + 1:]))
        outs = ()
        with g.inserting_before(n):
            for x in sub.graph.nodes:
                if x.op == "output":
                    outs = x.args[0] if isinstance(x.args[0], (tuple, list)) else (x.args[0],)
                elif x.op != "placeholder":
                    env[x] = g.node_copy(x, lambda y: env[y])
        outs = [env.get(o, o) for o in outs]
        for u in list(n.users):
            u.replace_all_uses_with(outs[u.args[1]])
            g.erase_node(u)
        holder = n.args[at]
        g.erase_node(n)
        if not holder.users:   # the node naming its graph, which would keep an enclosing region out of line
            g.erase_node(holder)
    return gm


def by_real_export(model: nn.Module, kwargs: dict) -> Graph:
    """torch.export with real tensors carried beside the traced ones (what torch.export.draft_export does, without
    the trace log it writes to the temporary folder): a branch on a tensor's value (LED's and Longformer's padding
    checks) is decided by the example inputs' real values instead of failing, so the graph holds the path these
    inputs take, which is all the analysis reads."""
    from torch._functorch import config
    with config.patch(fake_tensor_propagate_real_tensors=True, generate_fake_kernels_from_real_mismatches=True):
        return by_export(model, kwargs, method="real_export")


def by_fx(model: nn.Module, kwargs: dict) -> Graph:
    gm = torch.fx.symbolic_trace(model, concrete_args=None)
    ShapeProp(gm).run(*[kwargs[n.target] for n in gm.graph.nodes if n.op == "placeholder"])
    user = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return from_fx(gm, model, "fx", {}, user)


class ShapeProp(torch.fx.Interpreter):
    """Records each node's output shape (what export gives for free)."""

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            n.meta["val"] = out
        return out


def by_hooks(model: nn.Module, kwargs: dict) -> Graph:
    """Run the model once with forward hooks on linear, embedding and attention-like modules.

    No data flow is seen this way: the analysis falls back to names for roles.
    """
    ops: dict[str, Op] = {}
    handles = []

    def rec(path):
        def hook(m, args, out):
            kind = "embedding" if isinstance(m, nn.Embedding) else (
                "linear" if is_linear_module(m) else "attention")
            op = Op(f"{path}#{len(ops)}", kind, [], path, (path,), site=path, site_kind=kind)
            if kind == "linear":
                op.extra["features"] = linear_shape(m)
            if kind == "attention":
                op.extra.update(impl="module", heads=getattr(m, "num_heads", None), embed=getattr(m, "embed_dim", None))
            ops.setdefault(path, op)
        return hook

    for path, mod in model.named_modules():
        if is_linear_module(mod) or isinstance(mod, (nn.Embedding, nn.MultiheadAttention)):
            handles.append(mod.register_forward_hook(rec(path)))
    try:
        with torch.no_grad():
            model(**kwargs)
    finally:
        for h in handles:
            h.remove()
    return Graph(ops, [], list(kwargs), "hooks")
