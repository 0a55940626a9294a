"""The core's promises under composition and failure: one record per applied rule, changes undone by module path,
every change all-or-nothing, everything attached picklable, and the core never writing a plugin's config."""
from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import stat

import pytest
import torch
from torch import nn

import peftsurgery as ps
from peftsurgery import SurgeryError, hookimpl
from peftsurgery.rewrite import Hooked, Prefix, Rule, record_kv
from peftsurgery.surgery import CONTAINER

try:
    from conftest import VOCAB, tiny_gpt2, tiny_llama, tiny_llama_4bit
except ImportError:  # tests/ collected as a package
    from tests.conftest import VOCAB, tiny_gpt2, tiny_llama, tiny_llama_4bit

IDS = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))


def out(model, **kw):
    with torch.no_grad():
        o = model(input_ids=IDS, **kw)
    return o if isinstance(o, torch.Tensor) else o.logits


def snapshot(model):
    """Everything a failed operation must leave as it was: tensors, module types, hooks, trainability."""
    return ({n: t.detach().clone() for n, t in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()},
            {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_same(model, snap):
    tensors, types, hooks, grads = snapshot(model)
    assert types == snap[1] and hooks == snap[2] and grads == snap[3]
    assert tensors.keys() == snap[0].keys()
    assert [n for n in tensors if not torch.equal(tensors[n], snap[0][n])] == []


def randomize(model, name, seed=5):
    """Nonzero trainable values, as training would leave them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model._modules[CONTAINER][name].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


# ---------------------------------------------------------------- stacking under quantization

def test_removing_lora_under_a_later_quantized_base_takes_its_hook_along():
    """LoRA on attn.q, then qlora quantizing attn.q, then removing the LoRA: its hook must leave the 4-bit module
    that replaced the one it was put on (it used to keep running there)."""
    model = tiny_llama_4bit()
    ps.apply(model, "lora", name="lo", r=2, targets="attn.q")
    randomize(model, "lo")
    ps.apply(model, "qlora", name="q", r=2, targets="attn.v", quantize="attn.q,attn.v")
    ps.remove(model, "lo")
    reference = tiny_llama_4bit()
    ps.apply(reference, "qlora", name="q", r=2, targets="attn.v", quantize="attn.q,attn.v")
    with ps.disabled(model), ps.disabled(reference):
        assert torch.equal(out(model), out(reference))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert not q_proj._forward_hooks
    ps.remove(model)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------- prompt outputs trimmed where they were extended

def test_prompt_trims_attention_maps_and_never_heads():
    """4 heads and 1 token + 3 virtual tokens: the attention maps' heads axis has the extended length; only the
    query and key axes may be trimmed, to the user's (S, S)."""
    model = tiny_llama(attn_implementation="eager")
    ids = IDS[:, :1]
    with torch.no_grad():
        base = model(input_ids=ids, output_attentions=True, output_hidden_states=True)
    ps.apply(model, "prompt-tuning", num_tokens=3)
    with torch.no_grad():
        got = model(input_ids=ids, output_attentions=True, output_hidden_states=True)
    assert got.logits.shape == base.logits.shape
    assert [a.shape for a in got.attentions] == [a.shape for a in base.attentions] == [(2, 4, 1, 1)] * 2
    assert [h.shape for h in got.hidden_states] == [h.shape for h in base.hidden_states]


# ---------------------------------------------------------------- all or nothing

def test_failed_qlora_load_leaves_the_float_model_bit_identical(tmp_path):
    model = tiny_llama_4bit()
    ps.apply(model, "qlora", r=2)
    ps.save(model, tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "adapter.json").read_text())
    meta["config"]["r"] = 4   # the tensors no longer fit
    (tmp_path / "q" / "adapter.json").write_text(json.dumps(meta))
    fresh = tiny_llama_4bit()
    snap = snapshot(fresh)
    with pytest.raises(SurgeryError, match="shape"):
        ps.load(fresh, str(tmp_path / "q"))
    assert_same(fresh, snap)
    assert ps.adapters(fresh) == {}


def test_refused_merge_merges_no_site():
    """attn.q is float, attn.v is 4-bit (from a qlora underneath): merging a LoRA on both is refused before the
    first site is folded."""
    model = tiny_llama_4bit()
    ps.apply(model, "qlora", name="q", r=2, targets="attn.v", quantize="attn.v")
    ps.apply(model, "lora", name="lo", r=2, targets="attn.q,attn.v")
    randomize(model, "lo")
    before, snap = out(model), snapshot(model)
    with pytest.raises(SurgeryError, match="quantized"):
        ps.merge(model, "lo")
    assert_same(model, snap)
    assert torch.equal(out(model), before)
    assert not any(r.merged for r in ps.adapters(model)["lo"].records)


class _Tied(nn.Module):
    """Two linears holding one weight tensor (tied, as Zamba's shared block is in every hybrid layer)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.l1, self.l2, self.l3 = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.l2.weight = self.l1.weight
        self.head = nn.Linear(16, 32)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for lin in (self.l1, self.l2, self.l3):
            h = h + torch.relu(lin(h))
        return self.head(h)


@pytest.mark.parametrize("method,targets", [("lora", "path:l1,path:l2"), ("lora", "path:l1"), ("ia3", "path:l2"),
                                            ("dora", "path:l1")])
def test_merge_into_a_tied_weight_is_refused_and_merges_nothing(method, targets):
    """A weight two modules hold: merging a site's update into it would change the other module too (and two
    sites' updates added up in it, silently: each linear computed W + dW1 + dW2). Refused in one line naming both,
    before anything is folded; an untied site merges."""
    torch.manual_seed(0)
    model = _Tied().eval()
    ids = torch.randint(0, 32, (2, 6))
    ps.apply(model, method, name="t", targets=targets, **({"r": 2} if method != "ia3" else {"feedforward": ""}))
    ps.apply(model, "lora", name="free", r=2, targets="path:l3")
    randomize(model, "t")
    randomize(model, "free")
    with torch.no_grad():
        before = model(ids)
    snap = snapshot(model)
    with pytest.raises(SurgeryError, match=r"cannot be merged: .*(l1|l2) is also (l1|l2)'s \(tied weights\).*keep the "
                                           r"adapter unmerged") as e:
        ps.merge(model)
    assert "\n" not in str(e.value)
    assert_same(model, snap)
    assert not any(r.merged for a in ps.adapters(model).values() for r in a.records)
    ps.merge(model, "free")
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, atol=1e-5, rtol=0)


class Exploding(Rule):
    """A rule that hooks its first site, then fails on the second."""

    def build(self, model, sites, sitemap):
        return {"v": nn.Linear(2, 2)}

    def attach(self, model, sites, built, switch, sitemap):
        yield Hooked(model, sites[0].path, lambda m, a, o: o)
        raise RuntimeError("boom")


@dataclasses.dataclass
class ExplodingConfig:
    targets: str = "attn.q"


class ExplodingPlugin:
    @hookimpl
    def peftsurgery_config(self):
        return ExplodingConfig

    @hookimpl
    def peftsurgery_rules(self, config, sites):
        return [Exploding(config.targets)]

    @hookimpl
    def peftsurgery_budget(self, config, sites):
        return 6


def test_apply_failing_half_way_undoes_what_it_made(registered):
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        ps.apply(model, registered(ExplodingPlugin(), "test-exploding"))
    assert_same(model, snap)
    assert ps.adapters(model) == {} and CONTAINER not in model._modules


@dataclasses.dataclass
class NothingConfig:
    targets: str = "attn.q"


class NothingPlugin:
    @hookimpl
    def peftsurgery_config(self):
        return NothingConfig

    @hookimpl
    def peftsurgery_rules(self, config, sites):
        return [Quiet(config.targets)]

    @hookimpl
    def peftsurgery_budget(self, config, sites):
        return 0


class Quiet(Rule):
    def attach(self, model, sites, built, switch, sitemap):
        return iter(())


def test_a_method_building_no_parameters_is_refused(registered):
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(SurgeryError, match="no trainable parameters"):
        ps.apply(model, registered(NothingPlugin(), "test-nothing"))
    assert_same(model, snap)


def test_rank_larger_than_a_targeted_linear_is_refused():
    model = tiny_llama()   # k_proj and v_proj map 32 -> 16
    with pytest.raises(SurgeryError, match=r"r=17 is larger than the smaller side of .*k_proj"):
        ps.apply(model, "lora", r=17, targets="attn.k")
    ps.apply(model, "lora", r=16, targets="attn.k")


def test_rank_larger_than_a_linear_all_linear_picks_is_said_and_kept():
    """A wide selector may pick a narrow linear (a mixture's 1-output gate): it is kept at rank r, as PEFT does,
    and said; named by role it is refused (above)."""
    model = tiny_llama()   # k_proj and v_proj map 32 -> 16
    with pytest.warns(UserWarning, match=r"r=17 is larger than the smaller side of 4 linear\(s\) 'all-linear' "
                                         r"picks \(model\.layers\.0\.self_attn\.k_proj \(32->16\)"):
        ps.apply(model, "lora", r=17, targets="all-linear")
    k = ps.adapters(model)["default"].records[0].built["model.layers.0.self_attn.k_proj"]
    assert k.A.weight.shape == (17, 32) and k.B.weight.shape == (16, 17)
    assert ps.budget(model)["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- picklable and deep-copyable

METHODS = [("lora", {"r": 2, "targets": "all-linear"}), ("adapter", {"bottleneck": 4}),
           ("prompt-tuning", {"num_tokens": 3}), ("prefix-tuning", {"num_tokens": 3, "projection": 8}),
           ("prefix-tuning", {"num_tokens": 2}), ("qlora", {"r": 2})]


@pytest.mark.parametrize("method,cfg", METHODS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(METHODS)])
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_deepcopy_and_torch_save_with_each_method_attached(method, cfg, factory):
    if method == "qlora" and factory is tiny_gpt2:
        pytest.skip("qlora on GPT-2 is covered in test_quantize")
    model = tiny_llama_4bit() if method == "qlora" else factory()
    base = out(model)
    ps.apply(model, method, **cfg)
    randomize(model, "default")
    want = out(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for twin in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        assert torch.equal(out(twin), want)
        with ps.disabled(twin):
            with ps.disabled(model):
                assert torch.equal(out(twin), out(model))
        ps.remove(twin)   # undoing the copy's changes leaves the original alone
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in twin.modules())
        assert torch.equal(out(model), want)
        if method != "qlora":
            assert torch.equal(out(twin), base)


# ---------------------------------------------------------------- requires_grad and names of bare weights

class MHANet(nn.Module):
    """A bare-weight linear site: nn.MultiheadAttention's in_proj_weight."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        return self.head(h + self.attn(h, h, h, need_weights=False)[0])


def test_bare_weight_keeps_its_name_and_remove_restores_requires_grad():
    model = MHANet().eval()
    model.embed.requires_grad_(False)   # the user's own choice, given back by remove
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    base = out(model)
    ps.apply(model, "lora", r=2, targets="all-linear")
    assert any(r.sites[0].kind == "param-linear" for r in ps.adapters(model)["default"].records)
    names = {n for n, _ in model.named_parameters() if not n.startswith(CONTAINER)}
    assert names == set(grads)   # base parameter names are unchanged
    randomize(model, "default")
    trained = out(model)
    assert not torch.equal(trained, base)
    ps.merge(model)
    torch.testing.assert_close(out(model), trained, atol=1e-6, rtol=0)
    ps.unmerge(model)
    ps.remove(model)
    torch.testing.assert_close(out(model), base, atol=1e-6, rtol=0)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


# ---------------------------------------------------------------- the core never writes a plugin's config

@dataclasses.dataclass
class OddPrefixConfig:
    """A prefix method whose options are named unlike the built-in one's."""
    length: int = 2
    mlp_width: int = 8
    start: str = "vocab"


class OddPrefix:
    @hookimpl
    def peftsurgery_config(self):
        return OddPrefixConfig

    @hookimpl
    def peftsurgery_rules(self, config, sites):
        def init(model, chosen):
            return record_kv(model, chosen, {"input_ids": torch.arange(config.length)[None] + 3})
        return [Prefix("attn", config.length, config.mlp_width, init if config.start == "vocab" else None)]

    @hookimpl
    def peftsurgery_budget(self, config, sites):
        chosen = sites.select("attn", Prefix.kinds)
        per_token = sum(2 * s.kv_heads * s.head_dim for s in chosen)
        dim, h = sites.select("embed", ("embedding",))[0].out_features, config.mlp_width
        return config.length * dim + dim * h + h + h * per_token + per_token if h else config.length * per_token


def test_third_party_prefix_with_other_option_names_reloads_exactly(registered, tmp_path):
    name = registered(OddPrefix(), "test-odd-prefix")
    model = tiny_llama()
    ps.apply(model, name)
    randomize(model, "default")
    want = out(model)
    ps.save(model, tmp_path / "odd")
    saved = json.loads((tmp_path / "odd" / "adapter.json").read_text())
    assert saved["config"] == {"length": 2, "mlp_width": 8, "start": "vocab"}   # as the user gave it
    fresh = tiny_llama()
    ps.load(fresh, str(tmp_path / "odd"))
    torch.testing.assert_close(out(fresh), want, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- what a saved adapter says is checked

def _saved(tmp_path):
    model = tiny_llama()
    ps.apply(model, "lora", r=2)
    ps.save(model, tmp_path / "a")
    return tmp_path / "a"


def _edit(path, **changes):
    meta = json.loads((path / "adapter.json").read_text())
    meta.update(changes)
    (path / "adapter.json").write_text(json.dumps(meta))


def test_format_and_method_version_are_checked_on_load(tmp_path):
    path = _saved(tmp_path)
    _edit(path, format=99)
    fresh = tiny_llama()
    snap = snapshot(fresh)
    with pytest.raises(SurgeryError, match="upgrade peftsurgery"):
        ps.load(fresh, str(path))
    _edit(path, format=2, method_version="2.0")
    with pytest.raises(SurgeryError, match="major version"):
        ps.load(fresh, str(path))
    assert_same(fresh, snap)
    _edit(path, method_version="1.7")
    with pytest.warns(UserWarning, match="saved by lora 1.7"):
        ps.load(fresh, str(path))


def test_saved_folder_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = _saved(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755


# ---------------------------------------------------------------- every rule proves it ran

class TokensLM(nn.Module):
    """Its forward takes `tokens`, not `input_ids`, and mixes positions with one attention; `spare` never runs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.mix, self.head = nn.Embedding(VOCAB, 16), nn.Linear(16, 16), nn.Linear(16, VOCAB)
        self.spare = nn.Linear(16, 16)

    def forward(self, tokens):
        h = self.mix(self.emb(tokens))
        h = h + torch.nn.functional.scaled_dot_product_attention(h[:, None], h[:, None], h[:, None],
                                                                 is_causal=True)[:, 0]
        return self.head(torch.relu(h))


class Unreachable(Rule):
    """Claims the `mix` site but hooks the module that never runs."""

    def build(self, model, sites, sitemap):
        return {"v": nn.Linear(1, 1)}

    def attach(self, model, sites, built, switch, sitemap):
        yield Hooked(model, "spare", lambda m, a, o: o + 1)


@dataclasses.dataclass
class UnreachableConfig:
    targets: str = "path:mix"


class UnreachablePlugin:
    @hookimpl
    def peftsurgery_config(self):
        return UnreachableConfig

    @hookimpl
    def peftsurgery_rules(self, config, sites):
        return [Unreachable(config.targets)]

    @hookimpl
    def peftsurgery_budget(self, config, sites):
        return 2


def _refused(model, match, *args, **kw):
    snap = snapshot(model)
    with pytest.raises(SurgeryError, match=match) as e:
        ps.apply(model, *args, **kw)
    assert "\n" not in str(e.value)
    assert_same(model, snap)
    assert ps.adapters(model) == {} and CONTAINER not in model._modules


def test_a_rule_whose_site_never_runs_is_refused(registered):
    _refused(TokensLM().eval(), r"Unreachable did not act at spare: its hook never ran",
             registered(UnreachablePlugin(), "test-unreachable"))


def test_prompt_finds_the_token_argument_by_data_flow():
    """The model's forward takes `tokens`, not `input_ids`: the prompt used to apply, compute the base output and
    leave nothing to train."""
    model = TokensLM().eval()
    ids = IDS
    with torch.no_grad():
        base = model(ids)
    ps.apply(model, "prompt-tuning", num_tokens=3)
    assert ps.sitemap(model).token_input == "tokens"
    got = model(ids)
    assert got.shape == base.shape and not torch.equal(got, base)
    got.sum().backward()
    assert all(p.grad is not None and p.grad.any() for p in model.parameters() if p.requires_grad)
    with ps.disabled(model), torch.no_grad():
        assert torch.equal(model(ids), base)


def test_prefix_on_multihead_attention_acts_not_a_silent_no_op():
    """nn.MultiheadAttention computes attention inside multi_head_attention_forward: the prefix used to apply and
    do nothing; it now reaches the attention there (exactness against MHA's own add_bias_kv: test_eager_prefix)."""
    model = MHANet().eval()
    base = out(model)
    ps.apply(model, "prefix-tuning", init="random", num_tokens=2)
    assert not torch.allclose(out(model), base)
    with ps.disabled(model):
        assert torch.equal(out(model), base)


# ---------------------------------------------------------------- virtual tokens right before the first real token

def test_prompt_sits_after_left_padding_even_without_attention():
    """Mamba has no attention to mask the pads: a prompt placed before them made a left-padded row compute
    something else than the row alone (0.14 off). Virtual tokens go right before the row's first real token."""
    import transformers as tf
    torch.manual_seed(0)
    model = tf.MambaForCausalLM(tf.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2,
                                               expand=2, conv_kernel=4)).eval()
    ps.apply(model, "prompt-tuning", num_tokens=3)
    randomize(model, "default", seed=1)
    row = torch.tensor([[5, 6, 7, 8]])
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = model(input_ids=row).logits
        both = model(input_ids=ids, attention_mask=mask).logits
    assert both.shape == (2, 6, VOCAB)
    torch.testing.assert_close(both[0, 2:], alone[0], atol=1e-5, rtol=0)
