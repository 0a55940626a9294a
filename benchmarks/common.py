"""Shared machinery: devices, seeded models and data, interleaved timing, memory, result rows."""
from __future__ import annotations

import contextlib
import copy
import statistics
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Ctx:
    device: str = "cpu"
    quick: bool = False
    reps: int = 0            # timed repetitions per candidate (0: the case's default)
    warmup: int = 0          # untimed ones first (0: the case's default)
    scale: str = ""          # "1b": TinyLlama-1.1B's shape (cases.sizes)
    backend: str = "inductor"   # torch.compile's backend in case 9 ("eager": tracing only, a smoke run)

    @property
    def dtype(self) -> torch.dtype:
        """bfloat16 for the 1.1B shape on a GPU (how such a model is served), float32 otherwise."""
        return torch.bfloat16 if self.scale == "1b" and self.device.startswith("cuda") else torch.float32

    def n(self, full: int, quick: int) -> int:
        return self.reps or (quick if self.quick else full)

    def w(self, full: int = 3, quick: int = 1) -> int:
        return self.warmup or (quick if self.quick else full)


@dataclass
class Result:
    """What one case reports: rows of medians (ours against the peer), targets, and free-form facts."""
    case: str
    title: str
    setup: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)
    targets: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)

    def row(self, metric: str, unit: str, ours, peft=None, **more):
        ratio = (ours / peft) if (ours is not None and peft not in (None, 0)) else None
        self.rows.append({"metric": metric, "unit": unit, "ours": ours, "peft": peft, "ratio": ratio, **more})
        return ratio

    def target(self, name: str, value, limit, better: str = "<=", note: str = ""):
        met = None if value is None else (value <= limit if better == "<=" else value >= limit)
        self.targets.append({"name": name, "value": value, "limit": limit, "better": better, "met": met,
                             "note": note})

    def to_json(self) -> dict:
        return {"case": self.case, "title": self.title, "setup": self.setup, "rows": self.rows,
                "targets": self.targets, "extra": self.extra, "errors": self.errors}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def clock(device: str) -> float:
    sync(device)
    return time.perf_counter()


def interleave(cands: dict, reps: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Run each candidate `warmup` times untimed, then `reps` times, alternating candidates (the order rotates
    each round so none always runs first). A candidate is a callable returning {phase: seconds}."""
    names = list(cands)
    for _ in range(warmup):
        for n in names:
            cands[n]()
    out: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    for i in range(reps):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            for phase, t in cands[n]().items():
                out[n].setdefault(phase, []).append(t)
    return out


def med(samples: dict, name: str, phase: str):
    xs = samples.get(name, {}).get(phase)
    return statistics.median(xs) if xs else None


def llama(hidden=512, layers=4, heads=8, kv_heads=None, inter=1376, vocab=32000, device="cpu", seed=0,
          meta=False, dtype=torch.float32):
    """A Llama-style causal LM with random weights, deterministic for a seed (sdpa attention)."""
    import transformers as tf
    cfg = tf.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads or heads, intermediate_size=inter, vocab_size=vocab,
                         max_position_embeddings=2048, attn_implementation="sdpa")
    if meta:
        with torch.device("meta"):
            return tf.LlamaForCausalLM(cfg)
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(cfg).to(device, dtype)


def tokens(batch: int, seq: int, vocab: int, device: str, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(device)


def clone(model):
    return copy.deepcopy(model)


def linear_targets(model) -> list[tuple[int, int]]:
    """(d_in, d_out) of every nn.Linear in the decoder blocks (what all-linear selects: not the head)."""
    return [(m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"]


def flop_ideal(r: int, shapes) -> float:
    """Extra forward FLOPs of rank-r branches on these linears, over the linears' own: sum r(din+dout)/sum din dout."""
    return sum(r * (i + o) for i, o in shapes) / sum(i * o for i, o in shapes)


def branch_bytes(r: int, shapes, tokens: int, elem: int) -> dict[str, int]:
    """The bytes rank-r branches on these linears must move in a training step, each matrix read or written once:
    forward reads x and adds into the output (read + write), backward reads the output's gradient and x (for A's
    gradient) and adds into x's gradient (read + write); plus the factors, their gradients and the rank-r
    intermediates (h, and its gradient), each written and read once."""
    fwd = bwd = 0
    for i, o in shapes:
        small = r * (i + o) + 2 * tokens * r   # A and B; h written then read
        fwd += tokens * (i + 2 * o) + small
        bwd += tokens * (o + i + 2 * i) + 2 * small   # and the factors' gradients, h's gradient
    return {"forward": fwd * elem, "backward": bwd * elem}


def matmul_rate(device: str, tokens: int, shapes, dtype=torch.float32, reps: int = 5) -> float:
    """FLOP/s of the dense products x W^T at these linear shapes and token count, the best of `reps`: the rate a
    branch's arithmetic could at most reach here (its products are thinner, so this floor is optimistic)."""
    ws = [torch.randn(o, i, device=device, dtype=dtype) for i, o in shapes]
    xs = [torch.randn(tokens, w.shape[1], device=device, dtype=dtype) for w in ws]
    best = float("inf")
    for _ in range(reps):
        t0 = clock(device)
        for x, w in zip(xs, ws):
            x @ w.t()
        best = min(best, clock(device) - t0)
    return sum(2 * tokens * w.shape[0] * w.shape[1] for w in ws) / best


def branch_flops(r: int, shapes, tokens: int) -> int:
    """FLOPs of rank-r branches on these linears in a training step: forward x A^T then h B^T, backward B's and
    A's gradients and the two products carrying the gradient back to x (six products of T x r x (in or out))."""
    return sum(6 * tokens * r * (i + o) for i, o in shapes)


def bandwidth(device: str, mib_size: int = 256, reps: int = 5) -> float:
    """Bytes per second of a large copy (read + write), the best of `reps`: the memory-traffic floor's rate."""
    a = torch.empty(mib_size << 18, device=device).uniform_()
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(reps):
        t0 = clock(device)
        b.copy_(a)
        best = min(best, clock(device) - t0)
    return 2 * a.numel() * a.element_size() / best


@contextlib.contextmanager
def saved_activations(model):
    """Counts the bytes autograd saves for backward during the block (each storage once, the model's own
    parameters and buffers excluded): the activation memory of a training step, on any device."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            try:
                st = t.untyped_storage()
                if st.data_ptr() not in own:
                    seen[st.data_ptr()] = st.nbytes()
            except (RuntimeError, NotImplementedError):
                pass
        return t

    box = {"bytes": 0}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield box
    box["bytes"] = sum(seen.values())


def trainable_bytes(model) -> int:
    """Trainable parameters, their gradients and AdamW's two moments."""
    return 4 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def peak_cuda(device: str, fn) -> int | None:
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def train_step(model, opt, batch: dict, device: str):
    """One timed training step: {forward, backward, optimizer, step} in seconds."""
    t0 = clock(device)
    loss = model(**batch).loss
    t1 = clock(device)
    loss.backward()
    t2 = clock(device)
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    t3 = clock(device)
    return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "step": t3 - t0}


def floor_inputs_require_grad(model):
    """The floor: a frozen model whose backward still runs through every layer (as it must for adapters). A zero
    scalar parameter added to the embedding output makes everything after it require grad: the backward of PEFT's
    enable_input_require_grads (which calls requires_grad_ on that output in a hook), without the graph break
    that call is under torch.compile. A model compiled with breaks beside ours (same class, same code) had made
    ours run its training step uncompiled in case 9."""
    for p in model.parameters():
        p.requires_grad_(False)
    emb = model.get_input_embeddings()
    emb.floor_zero = torch.nn.Parameter(torch.zeros((), device=emb.weight.device, dtype=emb.weight.dtype))
    emb.register_forward_hook(lambda m, i, o: o + m.floor_zero)
    return model


def mib(n):
    return None if n is None else n / 2 ** 20
