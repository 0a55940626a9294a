"""IA3 (plugins/ia3.py) and the rules it is built from: output scaling (also of a slice of a fused projection),
input scaling, and slice sites (SiteMap.slices / select).

Parity with PEFT 0.21.2's IA3: the same vectors give the same logits and the same trainable-parameter count, on
Llama (separate k/v) and GPT-2 (fused c_attn, Conv1D with transposed weights)."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from torch import nn

import peftsurgery as ps
from peftsurgery import SurgeryError
from peftsurgery.rewrite import Scale
from peftsurgery.sites import CONTAINER

try:
    from conftest import tiny_llama_4bit
    from test_core import assert_same, snapshot
    from zoo import FACTORIES
except ImportError:  # tests/ collected as a package
    from tests.conftest import tiny_llama_4bit
    from tests.test_core import assert_same, snapshot
    from tests.zoo import FACTORIES

peft = pytest.importorskip("peft")

V = 128
IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def llama():
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)).eval()


def gpt2():
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                            bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()


def logits(model, **kw):
    with torch.no_grad():
        return model(IDS, attention_mask=MASK, **kw).logits


def vectors(model, name="default"):
    """Our built vectors by site path."""
    return {k.replace("/", "."): m.weight for rec in model._modules[CONTAINER][name] for k, m in rec.items()}


def randomize(model, seed=3, name="default"):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in vectors(model, name).values():
            v.copy_(torch.rand(v.shape, generator=g) + 0.5)


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def peft_ia3(base, targets, feedforward, fan_in_fan_out=False):
    ref = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(
        target_modules=targets, feedforward_modules=feedforward, fan_in_fan_out=fan_in_fan_out)).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if hasattr(mod, "ia3_l") and "default" in mod.ia3_l:
                mod.ia3_l["default"].copy_(torch.rand(mod.ia3_l["default"].shape, generator=g) + 0.5)
    return ref


def peft_vectors(ref) -> dict[str, torch.Tensor]:
    return {n.removeprefix("base_model.model."): m.ia3_l["default"].detach().flatten()
            for n, m in ref.named_modules() if hasattr(m, "ia3_l") and "default" in m.ia3_l}


# ---------------------------------------------------------------- parity with PEFT

@pytest.mark.parametrize("factory,targets,feedforward,ours", [
    (llama, ["k_proj", "v_proj", "down_proj"], ["down_proj"], {}),
    (gpt2, ["c_attn", "mlp.c_proj"], ["mlp.c_proj"], {"targets": "attn.qkv"}),
], ids=["llama", "gpt2"])
def test_parity_with_peft(factory, targets, feedforward, ours):
    """PEFT's IA3 for GPT-2 scales the whole c_attn (queries too): ours does with targets=attn.qkv."""
    base = factory()
    ref = peft_ia3(base, targets, feedforward, fan_in_fan_out=factory is gpt2)
    mine = ps.apply(copy.deepcopy(base), "ia3", **ours)
    theirs = peft_vectors(ref)
    got = vectors(mine)
    assert got.keys() == theirs.keys() and len(got) == (6 if factory is llama else 4)
    with torch.no_grad():
        for path, v in theirs.items():
            got[path].copy_(v)
    assert trainable(mine) == trainable(ref) == ps.budget(mine)["trainable"]
    want = logits(ref)
    assert (want - logits(base)).abs().max() > 1e-2   # the vectors matter
    torch.testing.assert_close(logits(mine), want, rtol=0, atol=1e-5)
    ps.merge(mine)
    ref.merge_adapter()
    torch.testing.assert_close(logits(mine), logits(ref), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(mine), want, rtol=0, atol=1e-5)


def test_gpt2_default_scales_only_the_key_and_value_slices():
    """Ours by default (the paper): k and v slices of c_attn, 2 x 32 per block; that is PEFT's c_attn vector with
    its query part left at ones."""
    base = gpt2()
    ref = peft_ia3(base, ["c_attn", "mlp.c_proj"], ["mlp.c_proj"], fan_in_fan_out=True)
    with torch.no_grad():
        for n, m in ref.named_modules():
            if n.endswith("attn.c_attn") and hasattr(m, "ia3_l"):
                m.ia3_l["default"][:32] = 1.0
    mine = ps.apply(copy.deepcopy(base), "ia3")
    got = vectors(mine)
    assert sorted(got) == sorted(f"transformer.h.{b}.{x}" for b in (0, 1)
                                 for x in ("attn.c_attn:k", "attn.c_attn:v", "mlp.c_proj"))
    with torch.no_grad():
        for path, v in peft_vectors(ref).items():
            if path.endswith("c_attn"):
                got[path + ":k"].copy_(v[32:64])
                got[path + ":v"].copy_(v[64:])
            else:
                got[path].copy_(v)
    assert trainable(mine) == trainable(ref) - 2 * 32 == 2 * (32 + 32 + 128)
    torch.testing.assert_close(logits(mine), logits(ref), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- merge

@pytest.mark.parametrize("factory", [llama, gpt2], ids=["llama", "gpt2"])
def test_merge_round_trip(factory):
    model = ps.apply(factory(), "ia3")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith(CONTAINER)}
    randomize(model)
    want = logits(model)
    ps.merge(model)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(logits(model), want, rtol=0, atol=1e-5)
    ps.unmerge(model)
    after = dict(model.named_parameters())
    for n, t in before.items():
        torch.testing.assert_close(after[n], t, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model), want, rtol=0, atol=1e-5)
    ps.remove(model)   # the merge and unmerge round trip is exact up to rounding
    torch.testing.assert_close(logits(model), logits(factory()), rtol=0, atol=1e-5)


@pytest.mark.parametrize("factory,down,width", [(llama, "model.layers.0.mlp.down_proj", 64),
                                                (gpt2, "transformer.h.0.mlp.c_proj", 128)], ids=["linear", "conv1d"])
def test_input_scaling_merges_into_the_weight_columns(factory, down, width):
    model = ps.apply(factory(), "ia3")
    m = model.get_submodule(down)
    w, b = m.weight.detach().clone(), m.bias.detach().clone() if m.bias is not None else None
    randomize(model)
    v = vectors(model)[down].detach()
    assert v.shape == (width,) and not torch.equal(v, torch.ones_like(v))   # the down-projection's inputs
    ps.merge(model)
    want = w * (v[:, None] if factory is gpt2 else v[None, :])   # Conv1D keeps (in, out)
    torch.testing.assert_close(m.weight.detach(), want, rtol=0, atol=0)
    assert b is None or torch.equal(m.bias, b)   # the input scale leaves the bias alone


def test_output_slice_merges_into_its_rows_only():
    model = ps.apply(gpt2(), "ia3")
    m = model.transformer.h[0].attn.c_attn          # Conv1D: (in 32, out 96)
    w, b = m.weight.detach().clone(), m.bias.detach().clone()
    randomize(model)
    k, v = (vectors(model)[f"transformer.h.0.attn.c_attn:{x}"].detach() for x in "kv")
    ps.merge(model)
    f = torch.cat([torch.ones(32), k, v])
    torch.testing.assert_close(m.weight.detach(), w * f[None, :], rtol=0, atol=0)
    torch.testing.assert_close(m.bias.detach(), b * f, rtol=0, atol=0)


def test_merge_onto_a_quantized_base_is_refused_in_one_line():
    model = tiny_llama_4bit()
    ps.apply(model, "qlora", name="q", r=2, targets="attn.q", quantize="mlp.down")
    ps.apply(model, "ia3", name="i")
    randomize(model, name="i")
    snap = snapshot(model)
    with pytest.raises(SurgeryError, match=r"down_proj has a quantized base .*merge onto a float copy") as e:
        ps.merge(model, "i")
    assert "\n" not in str(e.value)
    assert_same(model, snap)


def test_input_scale_merge_refused_while_a_lora_reads_that_input():
    model = llama()
    ps.apply(model, "ia3", name="i")
    ps.apply(model, "lora", name="lo", r=2, targets="mlp.down")
    snap = snapshot(model)
    with pytest.raises(SurgeryError, match=r"down_proj a _Branch hook of another adapter reads the input"):
        ps.merge(model, "i")
    assert_same(model, snap)
    ps.merge(model, "lo")        # the LoRA merged first (its update saw the scaled input): then the scale merges
    want = logits(model)
    ps.merge(model, "i")
    torch.testing.assert_close(logits(model), want, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- slices of fused projections

@pytest.mark.parametrize("arch,q,kv", [("gpt2", 64, 64), ("phi3", 64, 32), ("gpt_bigcode", 64, 16),
                                       ("falcon", 64, 16)])
def test_slice_widths_come_from_the_attention(arch, q, kv):
    """Grouped- and multi-query fused projections hold a wider q than k and v (not equal thirds); scaling the k
    slice by c is scaling those rows of the fused weight (and bias) by c."""
    model = FACTORIES[arch]()
    sm = ps.sitemap(model)
    got = sm.select("attn.q,attn.k,attn.v,blocks:0", Scale.kinds)
    fused = got[0].fused
    assert [(s.path, s.role, s.out_features, s.rows) for s in got] == [
        (f"{fused}:q", "attn.q", q, (0, q)), (f"{fused}:k", "attn.k", kv, (q, q + kv)),
        (f"{fused}:v", "attn.v", kv, (q + kv, q + 2 * kv))]
    ids = torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(model)
    ps.apply(model, "ia3", targets="attn.k,blocks:0", feedforward="mlp.down,blocks:0")
    with torch.no_grad():
        vectors(model)[f"{fused}:k"].fill_(1.7)
        m = reference.get_submodule(fused)
        rows = slice(q, q + kv)
        if arch == "gpt2":      # Conv1D: (in, out)
            m.weight[:, rows] *= 1.7
        else:
            m.weight[rows] *= 1.7
        if getattr(m, "bias", None) is not None:
            m.bias[rows] *= 1.7
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method,cfg", [("adapter", {"targets": "attn.k"}), ("ia3", {"feedforward": "attn.v"}),
                                        ("qlora", {"quantize": "attn.q", "targets": "mlp.up"})])
def test_a_rule_that_cannot_act_on_a_slice_names_the_fused_projection(method, cfg):
    model = gpt2()
    snap = snapshot(model)
    with pytest.raises(SurgeryError, match=r"is a slice of the fused transformer\.h\.0\.attn\.c_attn \(attn\.qkv\) "
                                           r"and this rule acts on whole linears only; target attn\.qkv") as e:
        ps.apply(model, method, **cfg)
    assert "\n" not in str(e.value)
    assert_same(model, snap)
    assert ps.adapters(model) == {}


@pytest.mark.parametrize("arch,match", [
    ("bloom", r"attn\.k cannot be cut out of the fused transformer\.h\.0\.self_attention\.query_key_value "
              r"\(attn\.qkv\): its outputs do not hold q in 0:64, k in 64:128, v in 128:192"),
    ("gpt_neox", r"attn\.k cannot be cut out of the fused gpt_neox\.layers\.0\.attention\.query_key_value"),
    ("deepseek_v3", r"attn\.k is part of the fused model\.layers\.0\.self_attn\.kv_b_proj \(attn\.kv\), but its "
                    r"\d+ outputs are not k .* and v .* side by side; target attn\.kv"),
])
def test_parts_that_cannot_be_told_apart_are_refused_never_widened(arch, match):
    """Bloom and GPT-NeoX interleave q, k, v per head: the probe forward finds the blocks the widths give are not
    them. DeepSeek's kv_b_proj holds per-head key parts without rotary dims: the widths do not add up."""
    model = FACTORIES[arch]()
    ps.sitemap(model)
    snap = snapshot(model)
    with pytest.raises(SurgeryError, match=match) as e:
        ps.apply(model, "ia3")
    assert "\n" not in str(e.value)
    assert_same(model, snap)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


class Interleaved(nn.Module):
    """A fused qkv laid out per head (q_h, k_h, v_h, ...) or as blocks (q, k, v), F.scaled_dot_product_attention."""

    def __init__(self, per_head: bool, heads=2, dim=16):
        super().__init__()
        self.emb = nn.Embedding(V, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.o = nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 32), nn.Linear(32, dim)
        self.head = nn.Linear(dim, V)
        self.per_head, self.heads = per_head, heads

    def forward(self, input_ids):
        x = self.emb(input_ids)
        B, S, D = x.shape
        h, d = self.heads, D // self.heads
        qkv = self.qkv(x)
        if self.per_head:
            q, k, v = qkv.view(B, S, h, 3, d).unbind(3)
        else:
            q, k, v = (t.view(B, S, h, d) for t in qkv.split(D, -1))
        a = nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, S, D))
        x = x + self.down(torch.relu(self.up(x)))
        return self.head(x)


@pytest.mark.parametrize("per_head", [False, True], ids=["blocks", "per-head"])
def test_the_probe_tells_blocks_from_heads_interleaved(per_head):
    torch.manual_seed(0)
    model = Interleaved(per_head).eval()
    assert ps.sitemap(model).by_path("qkv").role == "attn.qkv"
    if per_head:
        with pytest.raises(SurgeryError, match=r"attn\.k cannot be cut out of the fused qkv \(attn\.qkv\)"):
            ps.apply(model, "ia3")
        ps.apply(model, "ia3", targets="attn.qkv")   # the whole projection works
        assert vectors(model)["qkv"].shape == (48,)
    else:
        ps.apply(model, "ia3")
        assert {k: v.shape[0] for k, v in vectors(model).items()} == {"qkv:k": 16, "qkv:v": 16, "down": 32}


def test_save_load_of_slices(tmp_path):
    model = ps.apply(gpt2(), "ia3")
    randomize(model)
    ps.save(model, str(tmp_path / "a"))
    other = ps.load(gpt2(), str(tmp_path / "a"))
    assert torch.equal(logits(other), logits(model))


def test_budget_declared_equals_built_with_and_without_slices():
    for factory, cfg in ((gpt2, {}), (gpt2, {"targets": "attn.qkv,attn.o"}), (llama, {"feedforward": "mlp.*"})):
        model = ps.apply(factory(), "ia3", **cfg)
        assert ps.budget(model)["trainable"] == trainable(model) > 0


# ---------------------------------------------------------------- low-rank branches on slices

def _branches(model, name):
    return {k.replace("/", "."): b for rec in model._modules[CONTAINER][name] for k, b in rec.items()}


@pytest.mark.parametrize("factory,fused,width", [(gpt2, "transformer.h.{}.attn.c_attn", 32),
                                                 (lambda: MHANetDefault(), "attn.in_proj_weight", 16)],
                         ids=["gpt2-conv1d", "mha-bare-weight"])
def test_lora_default_acts_on_the_q_and_v_slices_only(factory, fused, width):
    """The LoRA default `attn.q,attn.v` on a fused projection: one branch per slice, B as wide as the slice.
    Each equals a LoRA on the whole projection whose B is zero outside the slice's rows; merge adds into those
    rows only."""
    base = factory()
    blocks = (0, 1) if "{}" in fused else (None,)
    paths = [fused.format(b) for b in blocks]
    model = ps.apply(copy.deepcopy(base), "lora", name="s", r=2)
    assert ps.budget(model)["adapters"]["s"] == len(paths) * 2 * 2 * (width + width)
    for x in "qv":    # two whole-projection LoRAs, each standing in for one slice
        ps.apply(model, "lora", name=f"w{x}", r=2, targets="attn.qkv")
    start = {"q": 0, "v": 2 * width}
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for path in paths:
            for x in "qv":
                s = _branches(model, "s")[f"{path}:{x}"]
                assert s.B.weight.shape == (width, 2)
                s.B.weight.copy_(torch.randn(s.B.weight.shape, generator=g))
                w = _branches(model, f"w{x}")[path]
                w.A.weight.copy_(s.A.weight)
                w.B.weight.zero_()
                w.B.weight[start[x]:start[x] + width] = s.B.weight
    ids = torch.randint(3, V, (2, 6), generator=torch.Generator().manual_seed(6))
    run = lambda: model(ids) if not hasattr(model, "config") else model(ids).logits
    with torch.no_grad():
        ps.set_active(model, ["s"])
        slices = run()
        ps.set_active(model, ["wq", "wv"])
        torch.testing.assert_close(run(), slices, rtol=0, atol=1e-5)
        with ps.disabled(model):
            assert (run() - slices).abs().max() > 1e-3   # the branches matter
        ps.set_active(model, ["s"])
        weights = {p: w.detach().clone() for p, w in base.named_parameters()}
        ps.merge(model, "s")
        torch.testing.assert_close(run(), slices, rtol=0, atol=1e-5)
        now = dict(model.named_parameters())
        names = {p: p if p.endswith("weight") else p + ".weight" for p in paths}
        assert {p for p, w in weights.items() if not torch.equal(now[p], w)} == set(names.values())
        k = slice(width, 2 * width)   # the key rows did not move (Conv1D: columns)
        for n in names.values():
            assert torch.equal(*((t[:, k] if "c_attn" in n else t[k]) for t in (now[n], weights[n])))


class MHANetDefault(nn.Module):
    """nn.MultiheadAttention: its in_proj_weight is a bare fused (3 * 16, 16) weight."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(V, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, V)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        return self.head(h + self.attn(h, h, h, need_weights=False)[0])


def test_route_gives_rows_their_slice_loras():
    model = gpt2()
    g = torch.Generator().manual_seed(1)
    for n in ("a", "b"):
        ps.apply(model, "lora", name=n, r=2)
        with torch.no_grad():
            for b in _branches(model, n).values():
                b.B.weight.copy_(torch.randn(b.B.weight.shape, generator=g) * 0.3)
    ids = torch.randint(3, V, (3, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with ps.route(model, ["a", "b", None]):
            got = model(ids).logits
        for i, n in enumerate(["a", "b"]):
            ps.set_active(model, [n])
            torch.testing.assert_close(got[i:i + 1], model(ids[i:i + 1]).logits, rtol=0, atol=1e-5)
        with ps.disabled(model):   # the base's row in the same batch (alone, CPU kernels may round differently)
            assert torch.equal(got[2:], model(ids).logits[2:])


def test_either_part_can_be_left_out_but_not_both():
    """targets="" or feedforward="" leaves that scaling out (a PEFT IA3 with only one kind then saves in our format
    too); both empty is a one-line error."""
    from zoo import FACTORIES
    for empty, kept in (("feedforward", "attn.k"), ("targets", "mlp.down")):
        m = FACTORIES["llama"]()
        ps.apply(m, "ia3", **{empty: ""})
        assert {s.role for r in ps.adapters(m)["default"].records for s in r.sites} == {kept} | (
            {"attn.v"} if kept == "attn.k" else set())
    with pytest.raises(ps.SurgeryError, match="both empty") as e:
        ps.apply(FACTORIES["llama"](), "ia3", targets="", feedforward="")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("arch", ["bloom", "gpt_neox"])
@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_low_rank_methods_refuse_interleaved_slices_alike(arch, method):
    """The layout probe runs in the core for whichever rule acts on a slice: AdaLoRA's rule built its own branches
    without it and trained rows 0:64 and 128:192 of an interleaved q/k/v as if they were the queries and values."""
    model = FACTORIES[arch]()
    ps.sitemap(model)
    snap = snapshot(model)
    with pytest.raises(SurgeryError, match=r"attn\.q cannot be cut out of the fused .*query_key_value \(attn\.qkv\): "
                                           r"its outputs do not hold q in 0:64") as e:
        ps.apply(model, method)
    assert "\n" not in str(e.value)
    assert_same(model, snap)
