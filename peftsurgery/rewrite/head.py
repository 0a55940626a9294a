"""Rule: a trainable task head on the model's final hidden states, for sequence classification (one real token:
`pool` first, last, or auto: the last on a causal model, whose first token has seen nothing else, else the first)
or token classification (every token the user gave). Used by p-tuning-v2 and task-head; stacks with any
other adapter (LoRA + task-head is the usual baseline).

Where it reads, by data flow, decided by one probe forward on the example inputs the sites were found with: the
output of the entry (the module that receives the token ids; an encoder returns its last hidden state there,
`last_hidden_state` or its first output), else the input of the model's output head (role `head`, e.g. a
causal LM's vocabulary projection), whichever is per token and as wide as the attention blocks write.

Positions are the user's: virtual tokens a prompt method put in the sequence are taken back out (they sit right
before each row's first real token, see inputs.Layout), and prefix methods add none. "First token" is the first
position the attention mask keeps (the first after left padding; position 0 without a mask), never a virtual one.

While the adapter is on, the model's forward returns a HeadOutput: a dict whose keys are also attributes, `logits`
((batch, labels) or (batch, sequence, labels)) and, when the call passed `labels=`, `loss` first (cross-entropy;
token labels of -100 and padded positions are ignored; with `num_items_in_batch=`, as the HF Trainer passes it,
the summed loss divided by it). Both keywords are taken out of the call: the base never sees them. So a plain
loop does `model(**batch).loss.backward()` and transformers' Trainer trains it as it is (give it
`label_names=["labels"]` for evaluation losses when the model's own forward takes no `labels`).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import one_line
from ..errors import SurgeryError
from ..sites import Site
from .base import Hooked, Rule, Switch
from .inputs import Layout

TASKS = ("sequence", "token")
POOLS = ("auto", "first", "last")   # the token a sequence head reads; auto: last on a causal model, else first


class HeadOutput(dict):
    """`loss` (when labels were given) and `logits`, as keys, attributes and (like transformers' outputs) by
    position."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, key):
        return list(self.values())[key] if isinstance(key, int) else super().__getitem__(key)

    def to_tuple(self) -> tuple:
        return tuple(self.values())


class TaskHead(nn.Module):
    """Dropout and a linear layer from the hidden width to the labels (BERT's initialisation: N(0, 0.02), 0)."""

    def __init__(self, dim: int, labels: int, dropout: float, device=None, dtype=None):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(dim, labels, device=device, dtype=dtype)
        with torch.no_grad():
            self.linear.weight.normal_(0, 0.02)
            self.linear.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(h.to(self.linear.weight.dtype)))


def hidden_of(out):
    """The per-token hidden states in a module's output: the tensor itself, `last_hidden_state`, or the first."""
    if isinstance(out, dict):
        out = out["last_hidden_state"] if "last_hidden_state" in out else next(iter(out.values()), None)
    elif isinstance(out, (tuple, list)):
        out = out[0] if out else None
    return out if isinstance(out, torch.Tensor) else None


class _First(Hooked):
    """A forward pre-hook (with kwargs) that runs before every pre-hook already on its module, so it sees the
    call as the user made it (prompt methods rewrite inputs in their own pre-hooks)."""

    def __init__(self, model: nn.Module, path: str, hook):
        model.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
        self.path, self.hook, self.acts = path, hook, False


class _Runner:
    """The hooks of one head: pre() on the model records the user's call and takes `labels` out, grab() keeps the
    hidden states at the source, post() on the model turns them into the output."""

    def __init__(self, head: TaskHead, switch: Switch, task: str, mode: str, ids: str, params: list[str],
                 pool: str = "first"):
        self.head, self.switch, self.task, self.mode, self.ids, self.params = head, switch, task, mode, ids, params
        self.pool = pool
        self.calls: list = []   # one entry per running call of the model (None: the adapter was off)

    def pre(self, module, args, kwargs):
        if not self.switch.on:
            self.calls.append(None)
            return None
        for k, h in module._forward_hooks.items():  # this head's output hook runs after every other one
            if h == self.post:
                module._forward_hooks.move_to_end(k)
                break
        given = {**dict(zip(self.params, args)), **kwargs}
        x = given.get(self.ids)
        x = given.get("inputs_embeds") if x is None else x
        mask = given.get("attention_mask")
        call = {"hidden": None, "labels": kwargs.get("labels"), "items": kwargs.get("num_items_in_batch"),
                "S": x.shape[1] if isinstance(x, torch.Tensor) and x.dim() >= 2 else None,
                "mask": mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None}
        self.calls.append(call)
        if "labels" in kwargs or "num_items_in_batch" in kwargs:
            return args, {k: v for k, v in kwargs.items() if k not in ("labels", "num_items_in_batch")}
        return None

    def grab(self, module, args, out=None):
        call = self.calls[-1] if self.calls else None
        if call is not None and call["hidden"] is None:
            call["hidden"] = hidden_of(out) if self.mode == "output" else (args[0] if args else None)

    def post(self, module, args, out):
        call = self.calls.pop() if self.calls else None
        if call is None or out is None:   # off, or the forward raised
            return None
        h = call["hidden"]
        if not isinstance(h, torch.Tensor) or h.dim() != 3:
            raise SurgeryError("task head: the hidden states it reads were not computed in this call (the model "
                               "took another path than on its example inputs); call the model with token ids")
        B, S = h.shape[0], call["S"] or h.shape[1]
        mask = call["mask"]
        if mask is not None and tuple(mask.shape) != (B, S):
            mask = None
        if h.shape[1] > S:   # a prompt method's virtual tokens: back out
            h = Layout(mask, B, S, h.shape[1] - S, h.device).keep(h, 1)
        elif h.shape[1] < S:
            raise SurgeryError(f"task head: the model's hidden states have {h.shape[1]} positions for {S} input "
                               "tokens; it cannot label them")
        if self.task == "sequence" and self.pool == "first":
            first = (mask.cumsum(-1) == 0).sum(-1).clamp(max=S - 1) if mask is not None else \
                torch.zeros(B, dtype=torch.long, device=h.device)
            h = h[torch.arange(B, device=h.device), first]
        elif self.task == "sequence":   # the last position the mask keeps, either padding side
            last = (S - 1 - mask.flip(-1).cumsum(-1).eq(0).sum(-1)).clamp(min=0) if mask is not None else \
                torch.full((B,), S - 1, dtype=torch.long, device=h.device)
            h = h[torch.arange(B, device=h.device), last.to(h.device)]
        logits = self.head(h)
        if call["labels"] is None:
            return HeadOutput(logits=logits)
        return HeadOutput(loss=self.loss(logits, call["labels"], mask, call["items"]), logits=logits)

    def loss(self, logits, labels, mask, items):
        N = logits.shape[-1]
        want = tuple(logits.shape[:-1])
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != want or labels.is_floating_point():
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise SurgeryError(f"task head ({self.task}): labels must be class indices of shape {want} "
                               f"({'one per row' if self.task == 'sequence' else 'one per token, -100 to skip'}), "
                               f"got {shape}")
        labels = labels.to(logits.device)
        if self.task == "token" and mask is not None:
            labels = labels.masked_fill(mask.to(labels.device) == 0, -100)
        bad = (labels >= N) | ((labels < 0) & (labels != -100))
        if bool(bad.any()):
            raise SurgeryError(f"task head: label {int(labels[bad][0])} is outside 0..{N - 1} (labels={N}); "
                               "use -100 for tokens without a label")
        loss = F.cross_entropy(logits.reshape(-1, N).float(), labels.reshape(-1), ignore_index=-100,
                               reduction="sum" if items is not None else "mean")
        return loss / items if items is not None else loss


class Head(Rule):
    """A task head (task "sequence" or "token", `labels` classes, dropout before the linear layer)."""
    kinds = ()
    phase = 3
    tasks = TASKS
    pools = POOLS

    def __init__(self, task: str, labels: int, dropout: float = 0.1, pool: str = "auto"):
        super().__init__("")
        if task not in TASKS:
            raise SurgeryError(f"task head: task must be one of {', '.join(TASKS)}, got {task!r}")
        if pool not in POOLS:
            raise SurgeryError(f"task head: pool must be one of {', '.join(POOLS)}, got {pool!r}")
        self.task, self.labels, self.dropout, self.pool = task, labels, dropout, pool
        self.mode = "output"

    @staticmethod
    def width(sitemap) -> int | None:
        """The width of the residual stream: what the last attention's output projection writes, else the
        embedding's width."""
        out = [s for s in sitemap if s.role == "attn.o" and s.out_features] or \
              [s for s in sitemap if s.role == "embed" and s.out_features]
        return out[-1].out_features if out else None

    @staticmethod
    def budget(sitemap, labels: int) -> int:
        """The head's trainable parameters on this model (weights and biases)."""
        return ((Head.width(sitemap) or 0) + 1) * labels

    def select(self, sitemap):
        if sitemap.encoder_decoder:
            raise SurgeryError("task head: this is an encoder-decoder model; the head reads an encoder's (or a "
                               "decoder-only model's) last hidden states, so give it the encoder alone")
        if sitemap.entry is None:
            raise SurgeryError("task head: no module receiving the token ids was found; the head needs a model "
                               "taking input_ids")
        if not Head.width(sitemap):
            raise SurgeryError("task head: no attention output projection or embedding tells the hidden width; "
                               "the head needs a transformer")
        if self.pool == "auto":   # a causal model's first token has seen nothing else
            self.pool = "last" if any(s.kind == "attention" and s.causal for s in sitemap) else "first"
        return [Site(path=sitemap.entry, kind="hidden", role="hidden", found_by="probe",
                     out_features=Head.width(sitemap))]

    def build(self, model, sites, sitemap):
        site = sites[0]
        path, self.mode = _probe(model, sitemap, site.out_features)
        site.path, site.role = path, ("hidden" if self.mode == "output" else "head.input")
        p = next(model.parameters())
        dtype = p.dtype if p.dtype.is_floating_point else torch.float32
        return {path: TaskHead(site.out_features, self.labels, self.dropout, p.device, dtype)}

    def attach(self, model, sites, built, switch, sitemap):
        site = sites[0]
        params = list(inspect.signature(model.forward).parameters)
        ids = sitemap.token_input if sitemap.token_input in params else "input_ids"
        run = _Runner(built[site.path], switch, self.task, self.mode, ids, params, self.pool)
        yield _First(model, "", run.pre)
        yield Hooked(model, site.path, run.grab, pre=self.mode == "input", acts=False)
        yield Hooked(model, "", run.post, always_call=True)

    def state(self, built):
        tensors, _ = super().state(built)
        return tensors, {"pool": self.pool}

    def loading(self, settings):
        # adapters saved before the pool existed read the first token
        return Head(self.task, self.labels, self.dropout, settings.get("pool", "first"))

    def describe(self, site, built):
        where = "its output" if self.mode == "output" else "its input"
        what = f"the {self.pool} real token" if self.task == "sequence" else "every token"
        return f"{self.task} classification head ({self.labels} labels) on {what}, reading {where}"


def _per_token(t, B: int, S: int, width: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 3 and t.is_floating_point() and t.shape[0] == B and \
        t.shape[1] >= S and t.shape[2] == width


def _probe(model: nn.Module, sitemap, width: int) -> tuple[str, str]:
    """(path, "output" or "input"): where the final per-token hidden states are, found by running the model once
    on its example inputs with temporary hooks on the entry (its output) and the output heads (their input)."""
    entry = sitemap.entry
    heads = [s.path for s in sitemap if s.role == "head" and s.kind == "linear"]
    tok = sitemap.inputs.get(sitemap.token_input or "input_ids")
    dev = next((p.device for p in model.parameters()), None)
    if not isinstance(tok, torch.Tensor) or tok.dim() != 2 or dev is None or dev.type == "meta":
        return entry, "output"   # cannot run here: the entry, checked when the model runs
    B, S = tok.shape
    seen: dict = {}
    def keep(key, value):   # a hook returning None changes nothing
        seen.setdefault(key, value)

    handles = [model.get_submodule(entry).register_forward_hook(
        lambda m, a, out: keep((entry, "output"), hidden_of(out)))]
    for path in heads:
        handles.append(model.get_submodule(path).register_forward_pre_hook(
            lambda m, a, path=path: keep((path, "input"), a[0] if a else None)))
    try:
        sitemap.run(model)
    except Exception as e:
        raise SurgeryError(f"task head: could not run {type(model).__name__} on its example inputs to find its "
                           f"hidden states ({one_line(e, 120)}); pass example_inputs that run it") from None
    finally:
        for h in handles:
            h.remove()
    for key in [(entry, "output")] + [(p, "input") for p in heads]:
        if _per_token(seen.get(key), B, S, width):
            return key
    raise SurgeryError(f"task head: found no per-token hidden states {width} wide, neither in what "
                       f"{entry or 'the model'} (receiving the token ids) returns nor at an output head's input; "
                       "the head needs a model that computes them")
