"""Roles, heads and sites by data flow on architectures beyond the first five (issue #11 §3): Falcon's matmul
linears, fused projections under grouped / multi-query attention, DeepSeek-V3's latent attention, Mamba's
projections, Whisper's decoder embedding; and the capture forms behind them on small custom modules."""
from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn

import peftsurgery as ps

V = 128
LINEARS = ("linear", "param-linear")


def _tiny(config_cls, model_cls, **kw):
    torch.manual_seed(0)
    return model_cls(config_cls(vocab_size=V, **kw)).eval()


def falcon(**kw):
    return _tiny(tf.FalconConfig, tf.FalconForCausalLM, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 **kw)


def bigcode():
    return _tiny(tf.GPTBigCodeConfig, tf.GPTBigCodeForCausalLM, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                 multi_query=True, bos_token_id=1, eos_token_id=2)


def phi3():
    return _tiny(tf.Phi3Config, tf.Phi3ForCausalLM, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                 eos_token_id=2, bos_token_id=1)


def qwen2():
    return _tiny(tf.Qwen2Config, tf.Qwen2ForCausalLM, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def gpt2():
    return _tiny(tf.GPT2Config, tf.GPT2LMHeadModel, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                 bos_token_id=1, eos_token_id=2)


def deepseek_v3(nope=4, v=8):
    """Multi-head latent attention (q_a/q_b, kv_a_proj_with_mqa/kv_b), one dense layer and one MoE layer."""
    return _tiny(tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM, hidden_size=32, intermediate_size=64,
                 moe_intermediate_size=16, num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4,
                 num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                 n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=nope,
                 v_head_dim=v, max_position_embeddings=64)


def mamba():
    return _tiny(tf.MambaConfig, tf.MambaForCausalLM, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2,
                 conv_kernel=4, time_step_rank=4)


def whisper():
    return _tiny(tf.WhisperConfig, tf.WhisperForConditionalGeneration, d_model=32, encoder_layers=2,
                 decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                 decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16, max_target_positions=32,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)


def roles(sm, block=0):
    """Roles of the linear, embedding and attention sites (base tensors are checked in test_bitfit.py)."""
    return {s.path: s.role for s in sm if s.block in (None, block) and s.kind != "tensor"}


def attention(sm):
    return [s for s in sm if s.kind == "attention"]


def linear_paths(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def assert_every_linear_is_a_site(model, sm):
    paths = {s.path for s in sm}
    missing = [p for p in linear_paths(model) if p not in paths and p + ".weight" not in paths]
    assert not missing, missing


# ---------------------------------------------------------------- Falcon: x @ W.T linears, fused qkv heads
@pytest.mark.parametrize("cfg,kv", [(dict(multi_query=True), 1), (dict(multi_query=False), 4),
                                    (dict(new_decoder_architecture=True, num_kv_heads=2), 2)],
                         ids=["multi-query", "multi-head", "new-architecture-gqa"])
def test_falcon_matmul_linears_and_fused_heads(cfg, kv):
    m = falcon(**cfg)
    sm = ps.locate(m)
    assert_every_linear_is_a_site(m, sm)
    h = "transformer.h.0"
    r = roles(sm)
    assert (r[f"{h}.self_attention.query_key_value"], r[f"{h}.self_attention.dense"],
            r[f"{h}.mlp.dense_h_to_4h"], r[f"{h}.mlp.dense_4h_to_h"], r["lm_head"]) == (
        "attn.qkv", "attn.o", "mlp.up", "mlp.down", "head")
    assert all(s.found_by == "export+dataflow" and s.kind != "param-linear" for s in sm)
    for a in attention(sm):
        assert (a.role, a.heads, a.kv_heads, a.head_dim, a.causal) == ("attn", 4, kv, 8, True)


# ---------------------------------------------------------------- heads from the attention op's own shapes
@pytest.mark.parametrize("factory,expect", [
    (bigcode, (4, 1, 8)), (phi3, (4, 2, 8)), (qwen2, (4, 2, 8)), (gpt2, (4, 4, 8)),
    (deepseek_v3, (4, 4, 8)), (lambda: deepseek_v3(nope=8, v=8), (4, 4, 12))],
    ids=["gpt-bigcode-mq", "phi3", "qwen2-gqa", "gpt2", "deepseek-v3", "deepseek-v3-v-dim"])
def test_heads_and_kv_heads_match_the_config(factory, expect):
    sm = ps.locate(factory())
    atts = attention(sm)
    assert len(atts) == 2
    for a in atts:
        assert (a.heads, a.kv_heads, a.head_dim) == expect
        assert a.role == "attn" and a.causal


@pytest.mark.parametrize("factory", [bigcode, phi3, deepseek_v3], ids=["gpt-bigcode-mq", "phi3", "deepseek-v3"])
def test_prefix_tuning_runs_with_fused_or_grouped_projections(factory):
    m = factory()
    ids = torch.randint(3, V, (1, 6))
    ps.apply(m, "prefix-tuning", num_tokens=3)
    assert m(input_ids=ids).logits.shape == (1, 6, V)


# ---------------------------------------------------------------- DeepSeek-V3: latent attention
def test_deepseek_v3_latent_attention_roles():
    m = deepseek_v3(nope=8, v=8)
    sm = ps.locate(m)
    a = "model.layers.0.self_attn"
    r = roles(sm)
    assert {k[len(a) + 1:]: v for k, v in r.items() if k.startswith(a + ".")} == {
        "q_a_proj": "attn.q_a", "q_b_proj": "attn.q", "kv_a_proj_with_mqa": "attn.kv_a", "kv_b_proj": "attn.kv",
        "o_proj": "attn.o"}
    att = sm.by_path(a)
    assert (att.role, att.head_dim, att.v_head_dim) == ("attn", 12, 8)
    assert att.inputs == {"q": f"{a}.q_b_proj", "k": f"{a}.kv_b_proj", "v": f"{a}.kv_b_proj", "o": f"{a}.o_proj"}
    assert not any(s.role.startswith("xattn") for s in sm) and not sm.encoder_decoder
    paths = lambda sel: {s.path for s in sm.select(sel, LINEARS) if s.block == 0}
    assert paths("attn.*") == {f"{a}.{n}" for n in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                                                     "o_proj")}
    assert paths("attn.*") <= paths("all-linear")
    # keys/values fused per head (k's rotary part comes from kv_a): attn.v cannot be cut out of kv_b_proj as a
    # slice, which is said in one line rather than widened to the whole projection; attn.kv takes it whole
    with pytest.raises(ps.SurgeryError, match="attn.v is part of the fused .*kv_b_proj .*target attn.kv"):
        paths("attn.q,attn.v")
    assert paths("attn.q,attn.kv") == {f"{a}.q_b_proj", f"{a}.kv_b_proj"}
    assert paths("attn.q_a,attn.kv_a") == {f"{a}.q_a_proj", f"{a}.kv_a_proj_with_mqa"}
    assert_every_linear_is_a_site(m, sm)


def test_t5_cross_attention_stays_cross():
    torch.manual_seed(0)
    m = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                  num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                                                  eos_token_id=1)).eval()
    sm = ps.locate(m)
    for d in ("encoder.block.0.layer.0.SelfAttention", "decoder.block.0.layer.0.SelfAttention"):
        assert sm.by_path(d).role == "attn"
    assert sm.by_path("decoder.block.0.layer.1.EncDecAttention").role == "xattn"
    assert sm.by_path("decoder.block.1.layer.1.EncDecAttention").role == "xattn"   # the query has seen both
    assert roles(sm)["decoder.block.0.layer.1.EncDecAttention.k"] == "xattn.k"
    assert (sm.entry, sm.decoder_entry, sm.decoder_embed) == ("encoder", "decoder", "decoder.embed_tokens")


@pytest.mark.parametrize("arch, where", [("bart", ("model.encoder", "model.decoder")), ("bert", ("bert", "")),
                                         ("whisper", ("model.decoder", ""))])
def test_a_decoder_stack_is_found_by_its_token_ids(arch, where):
    """The decoder's stack: another model input indexes an embedding in a module beside the entry. BERT's token
    types index an embedding inside the entry (none); Whisper's only token ids are the decoder's (the entry)."""
    from test_zoo import fresh
    sm = ps.locate(fresh(arch))
    assert (sm.entry, sm.decoder_entry) == where


class TwoInputs(nn.Module):
    """Keys/values from a second input (memory) after separate norms: cross-attention, whatever the names."""

    def __init__(self, d=32, h=4):
        super().__init__()
        self.h, self.n1, self.n2 = h, nn.LayerNorm(d), nn.LayerNorm(d)
        self.a, self.b, self.c, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, memory):
        split = lambda t: t.view(t.shape[0], t.shape[1], self.h, -1).transpose(1, 2)
        out = nn.functional.scaled_dot_product_attention(split(self.a(self.n1(x))), split(self.b(self.n2(memory))),
                                                         split(self.c(self.n2(memory))))
        return self.o(out.transpose(1, 2).flatten(2))


def test_cross_attention_is_decided_by_model_inputs():
    sm = ps.locate(TwoInputs(), {"x": torch.zeros(1, 6, 32), "memory": torch.zeros(1, 6, 32)})
    assert roles(sm) == {"": "xattn", "a": "xattn.q", "b": "xattn.k", "c": "xattn.v", "o": "xattn.o"}


# ---------------------------------------------------------------- Mamba: every linear, no invented roles
def test_mamba_every_linear_is_a_site_with_plain_roles():
    m = mamba()
    sm = ps.locate(m)
    assert_every_linear_is_a_site(m, sm)
    mixer = "backbone.layers.0.mixer"
    r = roles(sm)
    assert {k: r[f"{mixer}.{k}"] for k in ("in_proj", "x_proj", "dt_proj.weight", "out_proj")} == dict.fromkeys(
        ("in_proj", "x_proj", "dt_proj.weight", "out_proj"), "linear")
    dt = sm.by_path(f"{mixer}.dt_proj.weight")   # used as dt_proj.weight @ x by the mixer, not by dt_proj itself
    assert (dt.kind, dt.in_features, dt.out_features, dt.runner) == ("param-linear", 4, 64, mixer)
    assert r["lm_head"] == "head" and r["backbone.embeddings"] == "embed"
    assert not attention(sm) and all(s.found_by == "export+dataflow" for s in sm)
    ps.apply(m, "lora", r=2, targets="all-linear")   # the probe forward proves every site, dt_proj's too


# ---------------------------------------------------------------- Whisper: the decoder's tokens
def test_whisper_decoder_embedding_and_attention_kinds():
    m = whisper()
    inputs = {"input_features": torch.zeros(1, 8, 32), "decoder_input_ids": torch.ones(1, 4, dtype=torch.long),
              "use_cache": False}
    sm = ps.locate(m, inputs)
    assert [s.path for s in sm if s.role == "embed"] == ["model.decoder.embed_tokens"]
    assert sm.token_input == "decoder_input_ids"
    assert not any("conv" in s.path for s in sm)   # the encoder's conv front-end is no site
    assert sm.by_path("model.encoder.layers.0.self_attn").role == "attn"
    assert sm.by_path("model.decoder.layers.0.self_attn").role == "attn"
    assert sm.by_path("model.decoder.layers.0.encoder_attn").role == "xattn"
    assert roles(sm)["model.decoder.layers.0.encoder_attn.k_proj"] == "xattn.k"
    assert roles(sm)["model.encoder.layers.0.fc2"] == "mlp.down"
    assert_every_linear_is_a_site(m, sm)


# ---------------------------------------------------------------- capture forms on custom modules
class Forms(nn.Module):
    """Weights used as linear maps four ways, outside any nn.Linear forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 16)
        self.kept = nn.Parameter(torch.randn(16, 12))   # stored (in, out): x @ W
        self.left = nn.Linear(12, 6)                    # used as W @ x^T by the parent

    def forward(self, x):
        h = x @ self.lin.weight.T            # x @ W.T in the parent's forward
        h = h @ self.kept
        return (self.left.weight @ h.transpose(1, 2)).transpose(1, 2)


def test_weights_used_as_linear_maps_have_their_shapes():
    sm = ps.locate(Forms(), {"x": torch.zeros(1, 5, 8)})
    got = {s.path: (s.kind, s.in_features, s.out_features, s.runner) for s in sm}
    assert got == {"lin.weight": ("param-linear", 8, 16, ""), "kept": ("param-linear", 16, 12, ""),
                   "left.weight": ("param-linear", 12, 6, "")}


class InPlaceKey(nn.Module):
    """The key assembled by writing into a new tensor (as DeepSeek-V3's expand_kv does)."""

    def __init__(self, d=32, h=4):
        super().__init__()
        self.h = h
        self.q, self.k1, self.k2, self.v, self.o = (nn.Linear(d, d // 2 if i in (1, 2) else d) for i in range(5))

    def forward(self, x):
        split = lambda t: t.view(t.shape[0], t.shape[1], self.h, -1).transpose(1, 2)
        a, b = split(self.k1(x)), split(self.k2(x))
        k = a.new_empty(*a.shape[:-1], a.shape[-1] * 2)
        k[..., : a.shape[-1]].copy_(a)
        k[..., a.shape[-1]:].copy_(b)
        out = nn.functional.scaled_dot_product_attention(split(self.q(x)), k, split(self.v(x)))
        return self.o(out.transpose(1, 2).flatten(2))


def test_in_place_writes_carry_data_flow():
    sm = ps.locate(InPlaceKey(), {"x": torch.zeros(1, 6, 32)})
    r = roles(sm)
    assert r == {"": "attn", "q": "attn.q", "k1": "attn.k", "k2": "attn.k", "v": "attn.v", "o": "attn.o"}
    assert (sm.by_path("").heads, sm.by_path("").kv_heads, sm.by_path("").head_dim) == (4, 4, 8)


class Scaled(nn.Linear):
    """A linear layer whose weight reaches the op through arithmetic: no op is recognised as its use."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight * 0.5, self.bias)


def test_a_linear_module_that_ran_is_never_dropped():
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), Scaled(16, 8))
    sm = ps.locate(net, {"input": torch.zeros(1, 3, 8)})
    assert [s.path for s in sm if s.kind != "tensor"] == ["0", "2"]
    s = sm.by_path("2")
    assert (s.kind, s.role, s.found_by, s.in_features, s.out_features) == ("linear", "linear", "export+module", 16, 8)


def test_prefix_on_keys_and_values_of_two_head_sizes():
    m = deepseek_v3(nope=8, v=8)   # keys 12 features per head (8 + rope 4), values 8
    ps.apply(m, "prefix-tuning", num_tokens=2)
    atts = [s for s in ps.sitemap(m) if s.kind == "attention"]
    assert ps.budget(m)["trainable"] == sum(2 * s.kv_heads * (12 + 8) for s in atts)
