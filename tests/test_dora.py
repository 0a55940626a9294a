"""DoRA (plugins/dora.py) and the weight reparametrisation rule kind (peftsurgery/rewrite/reparam.py): parity with
PEFT 0.21.2 `use_dora=True` on Llama and GPT-2 (Conv1D), 4-bit bases, merge round trips, per-row routing, saving."""
from __future__ import annotations

import copy

import pytest
import torch

import peftsurgery as ps
from peftsurgery.surgery import CONTAINER

from conftest import raises_one_line, tiny_gpt2, tiny_llama, tiny_llama_4bit

peft = pytest.importorskip("peft")

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


def built(model, name="default"):
    """The DecomposedWeight modules of an adapter's DoRA rule, keyed by linear path."""
    return next(r.built for r in ps.adapters(model)[name].records if r.rule.mergeable)


def perturb(model, name="default", seed=5):
    """Move an adapter away from its start (B = 0, m = |W|), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in built(model, name).values():
            d.branch.B.weight.normal_(std=0.2, generator=g)
            d.magnitude.mul_(1 + 0.1 * torch.randn(d.magnitude.shape, generator=g))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def base_tensors(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items() if not n.startswith(CONTAINER)}


# ---------------------------------------------------------------- parity with PEFT
@pytest.mark.parametrize("factory,targets,ours_targets,n_sites", [
    (tiny_llama, ["q_proj", "v_proj"], "attn.q,attn.v", 4),
    (tiny_gpt2, ["c_attn", "c_fc"], "attn.qkv,mlp.up", 4),
], ids=["llama", "gpt2-conv1d"])
def test_parity_with_peft_logits_gradients_and_merge(factory, targets, ours_targets, n_sites):
    base = factory()
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_dora=True, fan_in_fan_out=factory is tiny_gpt2)).eval()
    ours = ps.apply(copy.deepcopy(base), "dora", r=4, alpha=8, targets=ours_targets)
    mods = built(ours)
    g = torch.Generator().manual_seed(3)
    pairs = []
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if not (hasattr(mod, "lora_A") and "default" in mod.lora_A):
                continue
            d = mods[name.removeprefix("base_model.model.")]
            m = mod.lora_magnitude_vector["default"].weight
            torch.testing.assert_close(d.magnitude, m, atol=1e-6, rtol=0)  # both start at the base rows' norms
            mod.lora_B["default"].weight.normal_(std=0.3, generator=g)
            m.mul_(1 + 0.2 * torch.randn(m.shape, generator=g))
            assert d.branch.scale == mod.scaling["default"]
            d.branch.A.weight.copy_(mod.lora_A["default"].weight)
            d.branch.B.weight.copy_(mod.lora_B["default"].weight)
            d.magnitude.copy_(m)
            pairs.append((d, mod))
    assert len(pairs) == n_sites == len(mods)
    # gradients agree: the weight norm is a constant to autograd on both sides (first, before a no-grad pass
    # could leave a norm without gradient in a cache)
    for model in (ref, ours):
        model(input_ids=IDS, labels=IDS).loss.backward()
    for d, mod in pairs:
        for mine, theirs in ((d.branch.A.weight, mod.lora_A["default"].weight),
                             (d.branch.B.weight, mod.lora_B["default"].weight),
                             (d.magnitude, mod.lora_magnitude_vector["default"].weight)):
            assert theirs.grad.abs().max() > 0
            torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-5, rtol=1e-4)
    want = logits(ref)
    assert (want - logits(base)).abs().max() > 1e-2   # the update matters
    torch.testing.assert_close(logits(ours), want, atol=1e-5, rtol=0)
    ps.merge(ours)
    torch.testing.assert_close(logits(ours), want, atol=1e-5, rtol=0)
    ref.merge_adapter()
    torch.testing.assert_close(logits(ours), logits(ref), atol=1e-5, rtol=0)


def test_norm_is_detached_gradient_flows_to_factors_and_magnitude():
    model = ps.apply(tiny_llama(), "dora", r=2, targets="attn.v")
    perturb(model)
    d = next(iter(built(model).values()))
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in d.parameters())
    v = model.get_submodule(next(iter(built(model))))
    assert v.weight.grad is None and not v.weight.requires_grad


# ---------------------------------------------------------------- identity, frozen base, training
@pytest.mark.parametrize("factory,targets", [(tiny_llama, "all-linear"), (tiny_gpt2, "all-linear")],
                         ids=["llama", "gpt2"])
def test_identity_at_init_frozen_base_and_training(factory, targets):
    model = factory()
    base, before = logits(model), base_tensors(model)
    ps.apply(model, "dora", r=2, targets=targets, dropout=0.1)
    assert torch.equal(logits(model), base)   # B = 0 and m = |W|: exactly the base
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(CONTAINER + ".") for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
    model.eval()
    after = base_tensors(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert (logits(model) - base).abs().max() > 1e-4
    with ps.disabled(model):
        assert torch.equal(logits(model), base)


# ---------------------------------------------------------------- 4-bit base
def test_four_bit_base_starts_as_it_trains_and_matches_float_dora_on_the_dequantized_base():
    model = tiny_llama_4bit()
    ps.apply(model, "dora", r=2, targets="all-linear", quantize="all-linear")
    q = model.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "Linear4bit"
    with ps.disabled(model):
        quantized = logits(model)
    torch.testing.assert_close(logits(model), quantized, atol=1e-6, rtol=0)   # m starts from the 4-bit rows
    before = base_tensors(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
    model.eval()
    assert all(not torch.equal(start[n], p) for n, p in model.named_parameters() if n in start)
    after = base_tensors(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    got = logits(model)
    assert (got - quantized).abs().max() > 1e-4
    raises_one_line(lambda: ps.merge(model), "quantized base", "float copy")
    # the same adapter on a float model holding the dequantized 4-bit weights computes the same
    ref = copy.deepcopy(model)
    state = {k: v.detach().clone() for k, v in ref._peftsurgery["default"].state_dict().items()}
    ps.remove(ref)
    ps.apply(ref, "dora", r=2, targets="all-linear")
    ref._peftsurgery["default"][0].load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()
                                                    if k.startswith("1.")})
    assert type(ref.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    torch.testing.assert_close(logits(ref), got, atol=1e-5, rtol=0)


def test_four_bit_base_quantized_by_an_earlier_rule_is_read_dequantized():
    """A base already quantized (here by qlora on other linears' targets) is read dequantized: identity at init."""
    model = tiny_llama_4bit()
    ps.apply(model, "qlora", name="q", r=2, targets="mlp.*", quantize="all-linear")
    out = logits(model)
    ps.apply(model, "dora", name="d", r=2, targets="attn.q,attn.v")
    torch.testing.assert_close(logits(model), out, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- merge
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_merge_unmerge_round_trip(factory):
    model = factory()
    originals = base_tensors(model)
    ps.apply(model, "dora", r=3, alpha=6.0, targets="all-linear", rslora=True)
    perturb(model)
    unmerged = logits(model)
    q = model.get_submodule(next(iter(built(model))))
    hooks = list(q._forward_hooks.items())
    ps.merge(model)
    assert not q._forward_hooks   # the merged linear runs bare
    assert any(not torch.equal(originals[n], t) for n, t in base_tensors(model).items())
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)
    ps.unmerge(model)
    assert list(q._forward_hooks.items()) == hooks
    for n, t in base_tensors(model).items():
        torch.testing.assert_close(t, originals[n], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)


def test_unmerge_refused_once_another_adapter_merged_into_the_same_weight():
    model = tiny_llama()
    ps.apply(model, "dora", name="d", r=2, targets="attn.v")
    perturb(model, "d")
    ps.merge(model, "d")
    ps.apply(model, "lora", name="l", r=2, targets="attn.v")
    with torch.no_grad():
        for b in ps.adapters(model)["l"].records[0].built.values():
            b.B.weight.normal_(std=0.1, generator=torch.Generator().manual_seed(1))
    ps.merge(model, "l")
    weights = base_tensors(model)
    raises_one_line(lambda: ps.unmerge(model, "d"), "changed after", "unmerge that adapter first")
    assert all(torch.equal(weights[n], t) for n, t in base_tensors(model).items())
    ps.unmerge(model, "l")
    ps.unmerge(model, "d")


def test_a_second_dora_over_a_merged_one_is_refused_and_an_unmerged_one_blocks_the_weight_it_reads():
    """A DoRA reads the weight: attached over another's merge, that unmerge would change what it computes, so it is
    refused in one line (model untouched); attached beside an unmerged one, neither may merge or unmerge under
    the other."""
    model = tiny_llama()
    ps.apply(model, "dora", name="a", r=2, targets="attn.v")
    perturb(model, "a")
    ps.merge(model, "a")
    weights, out = base_tensors(model), logits(model)
    raises_one_line(lambda: ps.apply(model, "dora", name="b", r=2, targets="attn.v"), "merged into",
                    "unmerge it first")
    assert set(ps.adapters(model)) == {"a"} and torch.equal(logits(model), out)
    assert all(torch.equal(weights[n], t) for n, t in base_tensors(model).items())
    ps.unmerge(model, "a")
    ps.apply(model, "dora", name="b", r=2, targets="attn.v")
    perturb(model, "b")
    raises_one_line(lambda: ps.merge(model, "a"), "reads the weight this merge would change")


# ---------------------------------------------------------------- stacking refusals
def test_refused_behind_another_adapters_hook_model_untouched():
    model = tiny_llama()
    ps.apply(model, "lora", name="l", r=2, targets="attn.v")
    hooks = {n: len(m._forward_hooks) for n, m in model.named_modules()}
    out = logits(model)
    raises_one_line(lambda: ps.apply(model, "dora", name="d", targets="attn.q,attn.v"),
                    "v_proj", "apply it before that adapter")
    assert set(ps.adapters(model)) == {"l"}
    assert {n: len(m._forward_hooks) for n, m in model.named_modules()} == hooks
    assert torch.equal(logits(model), out)
    # the other order works: the LoRA attached after acts on DoRA's output, and may not merge in front of it
    fresh = ps.apply(tiny_llama(), "dora", name="d", r=2, targets="attn.v")
    ps.apply(fresh, "lora", name="l", r=2, targets="attn.v")
    raises_one_line(lambda: ps.merge(fresh, "l"), "merge or remove that adapter first")


@pytest.mark.parametrize("cfg,needles", [
    ({"r": 0}, ("dora", "r")),
    ({"quantize": 3}, ("dora", "quantize")),
    ({"dropout": 1.0}, ("dora", "dropout")),
    ({"r": 100}, ("r=100", "larger than")),
    ({"targets": "nothing.here"}, ("matches no",)),
])
def test_config_errors_are_one_line(cfg, needles):
    model = tiny_llama()
    raises_one_line(lambda: ps.apply(model, "dora", **cfg), *needles)
    assert not ps.adapters(model)


# ---------------------------------------------------------------- save / load
@pytest.mark.parametrize("quantize", ["", "all-linear"], ids=["float", "4bit"])
def test_save_load_is_exact(tmp_path, quantize):
    factory = tiny_llama_4bit if quantize else tiny_llama
    model = ps.apply(factory(), "dora", r=2, targets="attn.q,attn.v,mlp.down", quantize=quantize)
    perturb(model)
    want = logits(model)
    ps.save(model, str(tmp_path / "a"))
    fresh = ps.load(factory(), str(tmp_path / "a"))
    assert torch.equal(logits(fresh), want)


# ---------------------------------------------------------------- route
def _alone(model, ids, name):
    if name is None:
        with ps.disabled(model):
            return model(input_ids=ids).logits
    before = {n: a.switch.on for n, a in ps.adapters(model).items()}
    ps.set_active(model, [name])
    try:
        return model(input_ids=ids).logits
    finally:
        for n, a in ps.adapters(model).items():
            a.switch.on = before[n]


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("seq", [1, 7])   # 1: the low-rank rule's dense path for few tokens per row
def test_route_each_row_equals_it_alone(factory, seq):
    model = factory()
    base_model = factory()
    for i, (name, r) in enumerate((("a", 2), ("b", 4), ("c", 3))):
        ps.apply(model, "dora", name=name, r=r, alpha=2.0 * r + i, targets="all-linear")
        perturb(model, name, seed=i)
    ps.apply(model, "lora", name="l", r=2, targets="all-linear")   # attached after the DoRAs: adds to them
    with torch.no_grad():
        for b in ps.adapters(model)["l"].records[0].built.values():
            b.B.weight.normal_(std=0.2, generator=torch.Generator().manual_seed(9))
    rows = ["a", "b", None, "c", "a", "l", "b"]
    ids = torch.randint(0, 128, (len(rows), seq), generator=torch.Generator().manual_seed(seq))
    with torch.no_grad():
        with ps.route(model, rows):
            got = model(input_ids=ids).logits
        base = base_model(input_ids=ids).logits
        for i, n in enumerate(rows):
            if n is None:
                assert torch.equal(got[i], base[i])
                continue
            torch.testing.assert_close(got[i:i + 1], _alone(model, ids[i:i + 1], n), atol=1e-5, rtol=0,
                                       msg=lambda m: f"row {i} ({n}): {m}")
            assert (got[i] - base[i]).abs().max() > 1e-3


def test_route_trains_every_routed_adapter():
    model = tiny_llama()
    for name in ("a", "b"):
        ps.apply(model, "dora", name=name, r=2, targets="attn.q,attn.v")
        perturb(model, name)
    model.train()
    with ps.route(model, ["b", "a", None]):
        model(input_ids=IDS[:1].expand(3, -1), labels=IDS[:1].expand(3, -1)).loss.backward()
    for name in ("a", "b"):
        assert all(p.grad is not None and p.grad.abs().max() > 0 for d in built(model, name).values()
                   for p in d.parameters())


def test_deepcopies_and_pickles_with_the_model():
    import pickle
    model = ps.apply(tiny_gpt2(), "dora", r=2, targets="all-linear")
    perturb(model)
    want = logits(model)   # fills the norm caches, which travel along
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(logits(other), want)
        ps.merge(other)
        torch.testing.assert_close(logits(other), want, atol=1e-5, rtol=0)
        ps.unmerge(other)
        torch.testing.assert_close(logits(other), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("make", [tiny_llama, tiny_llama_4bit], ids=["float", "4bit"])
def test_a_linear_with_an_all_zero_weight_row_is_refused(make):
    """Such a row has no direction: its scale m / ||W + dW|| was 0/0 from the first forward, so the model's outputs
    were wrong (NaN on xLSTM, whose gate projections start at zero) after an apply that passed its probe."""
    torch.manual_seed(0)
    model = make()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[3].zero_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = {"quantize": "attn.*,mlp.*"} if make is tiny_llama_4bit else {}
    raises_one_line(lambda: ps.apply(model, "dora", **kw), "model.layers.0.self_attn.q_proj has 1 all-zero weight rows",
                    "leave it out of targets")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and not ps.adapters(model)
    ps.apply(model, "dora", targets="attn.v", **kw)   # the other linears are fine
    assert torch.isfinite(model(input_ids=torch.tensor([[3, 4, 5]])).logits).all()
