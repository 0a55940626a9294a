"""Mixtures of experts: stacked (experts, out, in) weights are sites found by data flow (moe.up / moe.gate /
moe.down, one linear per expert), the router is router and stays out of all-linear, and a low-rank update per
expert trains, merges, saves and matches PEFT's LoRA on target_parameters."""
import pytest
import torch

import peftsurgery as ps
from peftsurgery.rewrite import LowRank

from zoo import FACTORIES

MOE = ("qwen3_moe", "mixtral", "deepseek_v3")
IMPLS = ("grouped_mm", "batched_mm", "eager")   # transformers' ways of running the experts


def ids():
    return torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))


def moe_model(arch, impl="grouped_mm"):
    m = FACTORIES[arch]()
    m.config._experts_implementation = impl
    return m


def randomize(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("arch", MOE)
def test_experts_are_sites_by_data_flow(arch):
    m = moe_model(arch)
    sm = ps.locate(m)
    experts = [s for s in sm if s.role.startswith("moe.") and s.role != "router"]
    stacked = {n: p for n, p in m.named_parameters() if p.dim() == 3}
    assert {s.path for s in experts} == set(stacked)
    for s in experts:
        w = stacked[s.path]
        assert s.kind == "param-linear" and s.experts == w.shape[0] and s.found_by == "export+dataflow"
        assert {s.in_features, s.out_features} == set(w.shape[1:])
        assert s.runner == s.path.rsplit(".", 1)[0]   # the experts module runs them
    ups = [s for s in experts if s.role == "moe.up"]
    downs = [s for s in experts if s.role == "moe.down"]
    assert len(ups) == len(downs) > 0 and all(u.out_features == 2 * d.in_features for u, d in zip(ups, downs))
    routers = sm.select("router", ("linear", "param-linear"))
    assert len(routers) == len(downs) and all(r.out_features == downs[0].experts for r in routers)
    # the router is picked only by name: all-linear holds the experts but not the router
    picked = {s.path for s in sm.select("all-linear", LowRank.kinds)}
    assert {s.path for s in experts} <= picked and not picked & {r.path for r in routers}


def test_a_router_picking_query_experts_is_a_router_not_a_query_projection():
    """JetMoE's attention has query experts picked by a router: the router's scores reach the queries (as the
    experts' weights), so the router was labelled attn.q and default LoRA trained it. A linear whose scores reach a
    top-k choice is a router, wherever its choice leads."""
    import transformers as tf
    torch.manual_seed(0)
    model = tf.JetMoeForCausalLM(tf.JetMoeConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=1, num_key_value_heads=2, kv_channels=8,
        intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0)).eval()
    roles = {s.path: s.role for s in ps.locate(model) if "router" in s.path}
    assert roles == {"model.layers.0.mlp.router.layer": "router",
                     "model.layers.0.self_attention.experts.router.layer": "router"}
    ps.apply(model, "lora", r=4)
    assert not any("router" in r["site"] for r in ps.inspect(model))


@pytest.mark.parametrize("arch", MOE)
def test_lora_on_experts_whatever_runs_them(arch):
    """Each of transformers' expert implementations (a grouped matmul, batched matmuls, a loop over the experts
    hit) is located alike, starts as the base, computes the same adapted outputs, merges exactly."""
    outs = []
    for impl in IMPLS:
        m = moe_model(arch, impl)
        x = ids()
        base = m(input_ids=x).logits
        ps.apply(m, "lora", r=2, targets="moe.*")
        rec = ps.adapters(m)["default"].records[0]
        assert {s.role for s in rec.sites} == {"moe.up", "moe.down"}
        assert ps.budget(m)["trainable"] == sum(LowRank.size(s, 2) for s in rec.sites)
        assert torch.equal(m(input_ids=x).logits, base)           # B starts at zero
        randomize(m)
        tuned = m(input_ids=x).logits
        assert (tuned - base).abs().max() > 1e-3
        with ps.disabled(m):
            assert torch.equal(m(input_ids=x).logits, base)
        ps.merge(m)
        torch.testing.assert_close(m(input_ids=x).logits, tuned, atol=1e-5, rtol=0)
        ps.unmerge(m)
        ps.remove(m)
        torch.testing.assert_close(m(input_ids=x).logits, base, atol=1e-5, rtol=0)
        outs.append(tuned)
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-5, rtol=0)


def test_experts_train_save_and_load(tmp_path):
    m = moe_model("qwen3_moe")
    x = ids()
    ps.apply(m, "lora", r=2, targets="moe.*,router")
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        m(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in m.named_parameters() if n in frozen)
    trained = m(input_ids=x).logits
    ps.save(m, tmp_path / "a")
    fresh = moe_model("qwen3_moe")
    ps.load(fresh, tmp_path / "a")
    assert torch.equal(fresh(input_ids=x).logits, trained)


def test_same_logits_as_peft_target_parameters():
    peft = pytest.importorskip("peft")
    ref_model = moe_model("qwen3_moe")
    pm = peft.get_peft_model(ref_model, peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    randomize(pm)
    x = ids()
    want = pm(input_ids=x).logits
    lora = {n: p for n, p in pm.named_parameters() if "lora_" in n}

    m = moe_model("qwen3_moe")
    ps.apply(m, "lora", r=2, alpha=4, targets="moe.*")
    rec = ps.adapters(m)["default"].records[0]
    with torch.no_grad():
        for s in rec.sites:
            layer = s.path.split(".mlp.")[0].removeprefix("model.")
            inner = ".base_layer" if s.role == "moe.up" else ""   # PEFT nests the second target around the first
            key = f"base_model.model.model.{layer}.mlp.experts{inner}.lora_%s.default.weight"
            a, b = lora[key % "A"], lora[key % "B"]
            E, r = s.experts, 2
            branch = rec.built[s.path]
            branch.A.weight.copy_(a.reshape(E, r, -1))
            branch.B.weight.copy_(b.reshape(b.shape[0], r, E).permute(2, 0, 1))
    torch.testing.assert_close(m(input_ids=x).logits, want, atol=1e-5, rtol=0)
