"""Slices of a fused gate_up (Phi-3's gate_up_proj: output cut in two halves, act(gate) * up, then down): the fused
linear is `mlp.gate_up`, and the exact roles `mlp.gate` / `mlp.up` pick its parts as slice sites, their rows
followed by data flow through the cuts of its output (SiteMap.slices, analyze._gate_up). Rules taking slices act
on those rows only; the others refuse naming the fused projection; layouts the cuts do not describe are refused."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn

import peftsurgery as ps
from peftsurgery import SurgeryError
from peftsurgery.analyze import analyse
from peftsurgery.capture import by_fx
from peftsurgery.rewrite import LowRank, Scale
from peftsurgery.sites import CONTAINER

try:
    from test_core import assert_same, snapshot
except ImportError:  # tests/ collected as a package
    from tests.test_core import assert_same, snapshot

V = 128
IDS = torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(1))
FUSED = "model.layers.{}.mlp.gate_up_proj"
ROWS = {"gate": (0, 128), "up": (128, 256)}


def phi3():
    torch.manual_seed(0)
    return tf.Phi3ForCausalLM(tf.Phi3Config(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, original_max_position_embeddings=128, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)).eval()


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def randomize(model, name, seed=3):
    """Adapter values away from their start, as training leaves them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model._modules[CONTAINER][name].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


class GatedLM(nn.Module):
    """A feed-forward with one linear giving the gate and the up parts, cut in various ways."""

    def __init__(self, layout, dim=16, inner=32):
        super().__init__()
        self.layout, self.inner = layout, inner
        self.emb = nn.Embedding(V, dim)
        self.up = nn.Linear(dim, 2 * inner)
        self.down = nn.Linear(2 * inner if layout == "gelu" else inner, dim)
        self.head = nn.Linear(dim, V)

    def forward(self, input_ids):
        x = self.emb(input_ids)
        h, n = self.up(x), self.inner
        if self.layout == "gelu":   # GPT-2's GELU written out: the whole output times a function of it
            return self.head(x + self.down(0.5 * h * (1.0 + torch.tanh(0.8 * (h + 0.044715 * h.pow(3))))))
        if self.layout == "gate-first":
            g, u = h.chunk(2, dim=-1)
        elif self.layout == "up-first":     # Phi-4-multimodal's audio MLP: up_states, gate = ....chunk(2)
            u, g = h.chunk(2, dim=-1)
        elif self.layout == "sliced":
            g, u = h[..., :n], h[..., n:]
        elif self.layout == "split":
            u, g = torch.split(h, n, dim=-1)
        elif self.layout == "strided":      # gate and up interleaved feature by feature
            g, u = h[..., ::2], h[..., 1::2]
        else:                               # "pairs": the same, through a reshape
            g, u = h.view(h.shape[0], h.shape[1], n, 2).unbind(-1)
        return self.head(x + self.down(F.silu(g) * u))


def gated(layout):
    torch.manual_seed(0)
    return GatedLM(layout).eval()


SLICEABLE = {"gate-first": {"gate": (0, 32), "up": (32, 64)}, "up-first": {"gate": (32, 64), "up": (0, 32)},
             "sliced": {"gate": (0, 32), "up": (32, 64)}, "split": {"gate": (32, 64), "up": (0, 32)}}


# ---------------------------------------------------------------- sites

def test_phi3_gate_up_is_fused_and_its_parts_are_slices():
    sm = ps.sitemap(phi3())
    fused = [FUSED.format(b) for b in (0, 1)]
    assert [(s.path, s.parts) for s in sm if s.role == "mlp.gate_up"] == [(f, ROWS) for f in fused]
    assert {s.role for s in sm if s.role.startswith("mlp.")} == {"mlp.gate_up", "mlp.down"}
    for part, rule in (("gate", Scale), ("up", LowRank)):
        got = sm.select(f"mlp.{part}", rule.kinds)
        assert [(s.path, s.role, s.fused, s.rows, s.in_features, s.out_features) for s in got] == [
            (f"{f}:{part}", f"mlp.{part}", f, ROWS[part], 64, 128) for f in fused]
    # globs, all-linear and the fused role pick whole linears only
    assert {s.path for s in sm.select("mlp.*", LowRank.kinds)} == set(fused) | {
        f"model.layers.{b}.mlp.down_proj" for b in (0, 1)}
    assert not any(s.fused for s in sm.select("all-linear", LowRank.kinds))
    assert [s.path for s in sm.select("mlp.gate_up,blocks:1", LowRank.kinds)] == [fused[1]]


@pytest.mark.parametrize("capture", ["export", "fx"])
@pytest.mark.parametrize("layout", [*SLICEABLE, "strided", "pairs", "gelu"])
def test_layouts_followed_by_data_flow(layout, capture):
    """The gate is the part that passes the activation, wherever it lies; a gate and up cut feature by feature
    (or through a reshape) cannot be told apart by the cuts and is refused; a GELU written out is no gate."""
    model = gated(layout)
    if capture == "export":
        site = ps.sitemap(model).by_path("up")
    else:
        site = next(s for s in analyse(by_fx(model, {"input_ids": IDS}), model)[0] if s.path == "up")
    if layout == "gelu":
        assert (site.role, site.parts) == ("mlp.up", None)
    elif layout in SLICEABLE:
        assert (site.role, site.parts) == ("mlp.gate_up", SLICEABLE[layout])
    else:
        assert site.role == "mlp.gate_up" and "not a gate part and an up part side by side" in site.parts


@pytest.mark.parametrize("layout", SLICEABLE)
def test_scaling_the_gate_slice_scales_those_rows_of_the_weight(layout):
    """The rows found are where the gate really is: ia3 on mlp.gate = the fused weight's (and bias') gate rows
    scaled by the vector."""
    model, reference = gated(layout), gated(layout)
    ps.apply(model, "ia3", targets="mlp.gate", feedforward="")
    a, b = SLICEABLE[layout]["gate"]
    v = torch.rand(b - a, generator=torch.Generator().manual_seed(2)) + 0.5
    with torch.no_grad():
        next(model._modules[CONTAINER]["default"].parameters()).copy_(v)
        reference.up.weight[a:b] *= v[:, None]
        reference.up.bias[a:b] *= v
        torch.testing.assert_close(model(IDS), reference(IDS), rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", ["strided", "pairs"])
def test_parts_the_cuts_cannot_describe_are_refused_never_widened(layout):
    model = gated(layout)
    ps.sitemap(model)
    snap = snapshot(model)
    with pytest.raises(SurgeryError, match=r"^lora option targets='mlp\.gate': mlp\.gate is part of the fused up "
                                           r"\(mlp\.gate_up\), but its outputs "
                                           r"are not a gate part and an up part side by side .*; target mlp\.gate_up "
                                           r"to act on the whole projection$") as e:
        ps.apply(model, "lora", targets="mlp.gate", r=2)
    assert "\n" not in str(e.value)
    assert_same(model, snap)
    assert ps.adapters(model) == {}
    ps.apply(model, "lora", targets="mlp.gate_up", r=2)   # the whole projection works
    assert {k for rec in model._modules[CONTAINER]["default"] for k in rec} == {"up"}


# ---------------------------------------------------------------- rules on the slices of Phi-3's gate_up

@pytest.mark.parametrize("method,cfg,part", [
    ("ia3", {"targets": "mlp.gate", "feedforward": ""}, "gate"),
    ("lora", {"targets": "mlp.gate", "r": 4}, "gate"),
    ("lora", {"targets": "mlp.up", "r": 4}, "up"),
    ("adalora", {"targets": "mlp.up", "init_r": 4, "target_r": 2}, "up"),
])
def test_a_slice_rule_acts_on_its_rows_only(method, cfg, part):
    """At init the model is the base, bit for bit; after a training step the fused linear's other rows are still
    exactly the base linear's on the same input, its own rows are not."""
    base = phi3()
    model = ps.apply(copy.deepcopy(base), method, **cfg)
    assert {k.replace("/", ".") for rec in model._modules[CONTAINER]["default"] for k in rec} == {
        f"{FUSED.format(b)}:{part}" for b in (0, 1)}
    assert torch.equal(logits(model), logits(base))
    seen = []
    for b in (0, 1):
        model.get_submodule(FUSED.format(b)).register_forward_hook(lambda m, a, out: seen.append((m, a[0], out)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(IDS).logits.pow(2).mean().backward()
    opt.step()
    seen.clear()
    logits(model)
    mine, other = slice(*ROWS[part]), slice(*ROWS["gate" if part == "up" else "up"])
    for m, x, out in seen:
        plain = F.linear(x, m.weight)
        assert torch.equal(out[..., other], plain[..., other])
        assert (out[..., mine] - plain[..., mine]).abs().max() > 1e-6
    assert all(torch.equal(p, q) for p, q in zip(base.parameters(), (model.get_parameter(n) for n, _ in
                                                                      base.named_parameters())))


@pytest.mark.parametrize("method,cfg,part", [
    ("ia3", {"targets": "mlp.up", "feedforward": ""}, "up"),
    ("lora", {"targets": "mlp.gate", "r": 4}, "gate"),
])
def test_merge_folds_into_the_slice_rows_and_unmerge_restores(method, cfg, part):
    model = ps.apply(phi3(), method, **cfg)
    randomize(model, "default")
    before = {b: model.get_submodule(FUSED.format(b)).weight.detach().clone() for b in (0, 1)}
    want = logits(model)
    ps.merge(model)
    torch.testing.assert_close(logits(model), want, rtol=0, atol=1e-5)
    mine, other = slice(*ROWS[part]), slice(*ROWS["gate" if part == "up" else "up"])
    for b, w in before.items():
        now = model.get_submodule(FUSED.format(b)).weight
        assert torch.equal(now[other], w[other]) and not torch.equal(now[mine], w[mine])
    ps.unmerge(model)
    torch.testing.assert_close(logits(model), want, rtol=0, atol=1e-5)
    for b, w in before.items():
        torch.testing.assert_close(model.get_submodule(FUSED.format(b)).weight, w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method,cfg", [("ia3", {"targets": "mlp.gate,attn.v", "feedforward": "mlp.down"}),
                                        ("lora", {"targets": "mlp.up,mlp.gate", "r": 2})])
def test_save_load_of_gate_up_slices_is_exact(tmp_path, method, cfg):
    model = ps.apply(phi3(), method, **cfg)
    randomize(model, "default")
    ps.save(model, str(tmp_path / "a"))
    other = ps.load(phi3(), str(tmp_path / "a"))
    assert torch.equal(logits(other), logits(model))
    assert not torch.equal(logits(other), logits(phi3()))


@pytest.mark.parametrize("method,cfg,opt,part", [("dora", {"targets": "mlp.gate"}, "targets", "gate"),
                                                 ("adapter", {"targets": "mlp.up"}, "targets", "up"),
                                                 ("ia3", {"targets": "attn.k", "feedforward": "mlp.gate"},
                                                  "feedforward", "gate"),
                                                 ("qlora", {"quantize": "mlp.up", "targets": "attn.o"}, "quantize",
                                                  "up")])
def test_a_rule_that_cannot_act_on_a_slice_names_the_fused_gate_up(method, cfg, opt, part):
    model = phi3()
    ps.sitemap(model)
    snap = snapshot(model)
    with pytest.raises(SurgeryError, match=rf"^{method} option {opt}='mlp\.{part}': mlp\.{part} is a slice of the "
                                           r"fused model\.layers\.0\.mlp\.gate_up_proj "
                                           r"\(mlp\.gate_up\) and this rule acts on whole linears only; target "
                                           r"mlp\.gate_up to act on the whole projection$") as e:
        ps.apply(model, method, **cfg)
    assert "\n" not in str(e.value)
    assert_same(model, snap)
    assert ps.adapters(model) == {}


def test_merges_on_shared_rows_come_out_in_reverse_order():
    """A scale and a low-rank update merged into the same rows do not commute: unmerging the scale while the
    update merged after it stays in would leave the weights off by its update; it is refused, and unmerging
    everything takes them out last-in first-out, back to the base weights."""
    base = phi3()
    model = ps.apply(copy.deepcopy(base), "ia3", name="s", targets="mlp.up", feedforward="")
    ps.apply(model, "lora", name="l", targets="mlp.up", r=2)
    for name in ("s", "l"):
        randomize(model, name)
    want = logits(model)
    ps.merge(model, "s")
    ps.merge(model, "l")
    torch.testing.assert_close(logits(model), want, rtol=0, atol=1e-5)
    snap = snapshot(model)
    with pytest.raises(SurgeryError, match=r"^the weights of model\.layers\.0\.mlp\.gate_up_proj changed after this "
                                           r"adapter was merged: adapter 'l' was merged into them since and does not "
                                           r"commute with it; unmerge that adapter first$"):
        ps.unmerge(model, "s")
    assert_same(model, snap)
    ps.unmerge(model)
    torch.testing.assert_close(logits(model), want, rtol=0, atol=1e-5)
    for (n, p), q in zip(model.named_parameters(), base.parameters()):
        if not n.startswith(CONTAINER):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)

