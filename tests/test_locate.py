"""locate(): sites and roles found by data flow on HF models and on custom modules with arbitrary names."""
from __future__ import annotations

import importlib
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn

import peftsurgery as ps
from peftsurgery import SurgeryError
from peftsurgery.locate import RolesByNameWarning, UnreadWarning

try:
    from conftest import raises_one_line
except ImportError:  # tests/ collected as a package
    from tests.conftest import raises_one_line

V, D = 128, 32


# ---------------------------------------------------------------- tiny model factories (local to this file)
def llama(layers=2):
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128)).eval()


def qwen2():
    torch.manual_seed(0)
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(
        vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128)).eval()


def gpt2():
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=4, n_positions=128,
                                            bos_token_id=1, eos_token_id=2)).eval()


def bert():
    torch.manual_seed(0)
    return tf.BertModel(tf.BertConfig(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=128)).eval()


def t5():
    torch.manual_seed(0)
    return tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=V, d_model=D, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1)).eval()


def _split(t, h):
    B, T, E = t.shape
    return t.view(B, T, h, E // h).transpose(1, 2)


def _merge(t):
    B, H, T, d = t.shape
    return t.transpose(1, 2).reshape(B, T, H * d)


class SeparateSDPA(nn.Module):
    """Separate q/k/v linears with names that say nothing, calling F.scaled_dot_product_attention."""

    def __init__(self, d=D, h=4):
        super().__init__()
        self.h = h
        self.alpha, self.beta, self.gamma, self.delta = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        o = F.scaled_dot_product_attention(_split(self.alpha(x), self.h), _split(self.beta(x), self.h),
                                           _split(self.gamma(x), self.h), is_causal=True)
        return self.delta(_merge(o))


class FusedChunk(nn.Module):
    """One fused qkv linear split with chunk."""

    def __init__(self, d=D, h=4):
        super().__init__()
        self.h = h
        self.mix = nn.Linear(d, 3 * d)
        self.back = nn.Linear(d, d)

    def forward(self, x):
        a, b, c = self.mix(x).chunk(3, -1)
        return self.back(_merge(F.scaled_dot_product_attention(_split(a, self.h), _split(b, self.h),
                                                               _split(c, self.h))))


class FusedSplit(FusedChunk):
    """The same with torch.split and a causal mask from tril."""

    def forward(self, x):
        T = x.shape[1]
        a, b, c = self.mix(x).split(x.shape[-1], -1)
        m = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
        return self.back(_merge(F.scaled_dot_product_attention(_split(a, self.h), _split(b, self.h),
                                                               _split(c, self.h), attn_mask=m)))


class Eager(nn.Module):
    """matmul -> softmax -> matmul attention; causal=True masks with positions compared from arange."""

    def __init__(self, d=D, h=4, causal=False):
        super().__init__()
        self.h, self.causal = h, causal
        self.w1, self.w2, self.w3, self.w4 = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        q, k, v = (_split(w(x), self.h) for w in (self.w1, self.w2, self.w3))
        s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if self.causal:
            T = x.shape[1]
            pos = torch.arange(T, device=x.device)
            s = s.masked_fill(~(pos[:, None] >= pos[None, :]), float("-inf"))
        return self.w4(_merge(torch.softmax(s, -1) @ v))


class MHA(nn.Module):
    def __init__(self, d=D, h=4):
        super().__init__()
        self.att = nn.MultiheadAttention(d, h, batch_first=True)

    def forward(self, x):
        return self.att(x, x, x, need_weights=False)[0]


class Block(nn.Module):
    def __init__(self, mixer):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.mixer = mixer
        self.ff1, self.ff2 = nn.Linear(D, 64), nn.Linear(64, D)

    def forward(self, x):
        x = x + self.mixer(self.n1(x))
        return x + self.ff2(F.gelu(self.ff1(self.n2(x))))


class Net(nn.Module):
    def __init__(self, make, n=2):
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(V, D)
        self.stack = nn.ModuleList([Block(make()) for _ in range(n)])
        self.out = nn.Linear(D, V)

    def forward(self, ids):
        x = self.tok(ids)
        for b in self.stack:
            x = b(x)
        return self.out(x)


# ---------------------------------------------------------------- helpers
def roles(sm, block=None):
    """Roles of the linear, embedding and attention sites (base tensors are checked in test_bitfit.py)."""
    return {s.path: s.role for s in sm if (block is None or s.block == block) and s.kind != "tensor"}


def attention(sm):
    return [s for s in sm if s.kind == "attention"]


def assert_dataflow(sm):
    assert all("dataflow" in s.found_by for s in sm), {s.path: s.found_by for s in sm}


# ---------------------------------------------------------------- HF models
@pytest.fixture(scope="module")
def llama_map():
    m = llama()
    return m, ps.locate(m)


@pytest.mark.parametrize("factory", [llama, qwen2], ids=["llama", "qwen2"])
def test_llama_like_roles(factory):
    m = factory()
    sm = ps.locate(m)
    assert_dataflow(sm)
    for b in (0, 1):
        p = f"model.layers.{b}"
        assert roles(sm, b) == {
            f"{p}.self_attn": "attn",
            f"{p}.self_attn.q_proj": "attn.q", f"{p}.self_attn.k_proj": "attn.k",
            f"{p}.self_attn.v_proj": "attn.v", f"{p}.self_attn.o_proj": "attn.o",
            f"{p}.mlp.gate_proj": "mlp.gate", f"{p}.mlp.up_proj": "mlp.up", f"{p}.mlp.down_proj": "mlp.down"}
    assert sm.by_path("model.embed_tokens").role == "embed"
    assert sm.by_path("model.embed_tokens").kind == "embedding"
    assert sm.by_path("lm_head").role == "head"
    for a in attention(sm):
        assert (a.heads, a.kv_heads, a.head_dim, a.causal) == (4, 2, 8, True)
        assert a.inputs["q"].endswith("q_proj") and a.inputs["k"].endswith("k_proj")
        assert a.inputs["v"].endswith("v_proj") and a.inputs["o"].endswith("o_proj")
    q = sm.by_path("model.layers.0.self_attn.k_proj")
    assert (q.in_features, q.out_features) == (32, 16)  # grouped-query: 2 kv heads x 8
    assert sm.encoder_decoder is False
    assert sm.entry == "model"


def test_llama_repeated_blocks_all_mapped():
    sm = ps.locate(llama(layers=6))
    assert sorted({s.block for s in sm if s.block is not None}) == list(range(6))
    for b in range(6):
        assert sorted(s.role for s in sm if s.block == b) == sorted(
            ["attn", "attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "norm", "norm"])
    assert len(sm) == 6 * 10 + 3   # and the embedding, the final norm, the head
    assert_dataflow(sm)


def test_gpt2_conv1d_fused_qkv():
    sm = ps.locate(gpt2())
    assert_dataflow(sm)
    for b in (0, 1):
        p = f"transformer.h.{b}"
        assert roles(sm, b) == {f"{p}.attn": "attn", f"{p}.attn.c_attn": "attn.qkv", f"{p}.attn.c_proj": "attn.o",
                                f"{p}.mlp.c_fc": "mlp.up", f"{p}.mlp.c_proj": "mlp.down"}
    qkv = sm.by_path("transformer.h.0.attn.c_attn")
    assert (qkv.kind, qkv.in_features, qkv.out_features) == ("linear", 32, 96)  # Conv1D weight is (in, out)
    assert sm.by_path("transformer.wte").role == "embed"
    assert sm.by_path("lm_head").role == "head"
    for a in attention(sm):
        assert (a.heads, a.kv_heads, a.head_dim, a.causal) == (4, 4, 8, True)


def test_bert_encoder():
    sm = ps.locate(bert())
    assert_dataflow(sm)
    for b in (0, 1):
        p = f"encoder.layer.{b}"
        r = roles(sm, b)
        assert r[f"{p}.attention.self"] == "attn"
        assert r[f"{p}.attention.self.query"] == "attn.q"
        assert r[f"{p}.attention.self.key"] == "attn.k"
        assert r[f"{p}.attention.self.value"] == "attn.v"
        assert r[f"{p}.attention.output.dense"] == "attn.o"
        assert r[f"{p}.intermediate.dense"] == "mlp.up"
        assert r[f"{p}.output.dense"] == "mlp.down"
    assert sm.by_path("embeddings.word_embeddings").role == "embed"
    for a in attention(sm):
        assert (a.heads, a.kv_heads, a.head_dim, a.causal) == (4, 4, 8, False)
    assert sm.encoder_decoder is False


def test_the_entry_holds_the_layers_the_embeddings_go_on_to():
    """ESM's embeddings module takes the attention mask itself (token dropout), yet holds no layer after the
    embedding: a prompt put in there and taken out of its output never reached the encoder (any prompt gave the
    base's outputs, with no gradient). The entry is the innermost module around the embedding taking the mask
    that holds an attention site."""
    torch.manual_seed(0)
    model = tf.EsmForMaskedLM(tf.EsmConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, pad_token_id=0, mask_token_id=3,
                                           position_embedding_type="rotary")).eval()
    ids = torch.randint(4, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        base = model(**kw).logits
    assert ps.locate(model).entry == "esm"
    ps.apply(model, "prompt-tuning", num_tokens=3, init="random")
    prompt, = [p for p in model.parameters() if p.requires_grad]
    out = model(**kw).logits
    assert out.shape == base.shape and not torch.allclose(out, base)
    out.pow(2).mean().backward()
    assert prompt.grad.abs().sum() > 0


@pytest.mark.parametrize("arch,up,down", [
    ("albert", "albert.encoder.albert_layer_groups.0.albert_layers.0.ffn",
     "albert.encoder.albert_layer_groups.0.albert_layers.0.ffn_output"),
    ("wav2vec2", "wav2vec2.encoder.layers.1.feed_forward.intermediate_dense",
     "wav2vec2.encoder.layers.1.feed_forward.output_dense")])
def test_feed_forward_where_the_residual_stream_comes_from_linears(arch, up, down):
    """ALBERT's residual stream starts at a linear (embedding_hidden_mapping_in), wav2vec2's at its feature
    projection: the feed-forward up-projection reads only linears there too, yet it reads the stream, not a
    chain of its own block's linears."""
    try:
        from zoo import FACTORIES
    except ImportError:
        from tests.zoo import FACTORIES
    sm = ps.locate(FACTORIES[arch]())
    assert (sm.by_path(up).role, sm.by_path(down).role) == ("mlp.up", "mlp.down")


def test_t5_cross_attention():
    sm = ps.locate(t5())
    assert_dataflow(sm)
    assert sm.encoder_decoder is True
    for b in (0, 1):
        e, d = f"encoder.block.{b}.layer", f"decoder.block.{b}.layer"
        r = roles(sm)
        for x in "qkvo":
            assert r[f"{e}.0.SelfAttention.{x}"] == f"attn.{x}"
            assert r[f"{d}.0.SelfAttention.{x}"] == f"attn.{x}"
            assert r[f"{d}.1.EncDecAttention.{x}"] == f"xattn.{x}"
        assert r[f"{e}.1.DenseReluDense.wi"] == "mlp.up" and r[f"{e}.1.DenseReluDense.wo"] == "mlp.down"
        assert r[f"{d}.2.DenseReluDense.wi"] == "mlp.up" and r[f"{d}.2.DenseReluDense.wo"] == "mlp.down"
        assert sm.by_path(f"{e}.0.SelfAttention").causal is False
        assert sm.by_path(f"{d}.0.SelfAttention").causal is True
        x = sm.by_path(f"{d}.1.EncDecAttention")
        assert (x.role, x.causal, x.heads, x.head_dim) == ("xattn", False, 4, 8)
    assert sm.by_path("lm_head").role == "head"
    assert sum(s.role == "embed" for s in sm) == 1


# ---------------------------------------------------------------- custom modules with arbitrary names
def test_custom_separate_qkv_sdpa():
    sm = ps.locate(Net(SeparateSDPA))
    assert_dataflow(sm)
    for b in (0, 1):
        p = f"stack.{b}"
        assert roles(sm, b) == {f"{p}.mixer": "attn", f"{p}.mixer.alpha": "attn.q", f"{p}.mixer.beta": "attn.k",
                                f"{p}.mixer.gamma": "attn.v", f"{p}.mixer.delta": "attn.o",
                                f"{p}.ff1": "mlp.up", f"{p}.ff2": "mlp.down"}
    for a in attention(sm):
        assert (a.heads, a.kv_heads, a.head_dim, a.causal) == (4, 4, 8, True)
    assert sm.by_path("tok").role == "embed" and sm.by_path("out").role == "head"


@pytest.mark.parametrize("mixer,causal", [(FusedChunk, False), (FusedSplit, True)], ids=["chunk", "split+tril"])
def test_custom_fused_qkv(mixer, causal):
    sm = ps.locate(Net(mixer))
    assert_dataflow(sm)
    for b in (0, 1):
        assert roles(sm, b) == {f"stack.{b}.mixer": "attn", f"stack.{b}.mixer.mix": "attn.qkv",
                                f"stack.{b}.mixer.back": "attn.o", f"stack.{b}.ff1": "mlp.up",
                                f"stack.{b}.ff2": "mlp.down"}
    for a in attention(sm):
        assert (a.heads, a.kv_heads, a.head_dim, a.causal) == (4, 4, 8, causal)


@pytest.mark.parametrize("causal", [False, True])
def test_custom_eager_attention(causal):
    sm = ps.locate(Net(lambda: Eager(causal=causal)))
    assert_dataflow(sm)
    for b in (0, 1):
        p = f"stack.{b}.mixer"
        assert {k: v for k, v in roles(sm, b).items() if k.startswith(p)} == {
            p: "attn", f"{p}.w1": "attn.q", f"{p}.w2": "attn.k", f"{p}.w3": "attn.v", f"{p}.w4": "attn.o"}
    for a in attention(sm):
        assert a.impl == "eager"
        assert (a.heads, a.kv_heads, a.head_dim, a.causal) == (4, 4, 8, causal)


def test_custom_multihead_attention():
    sm = ps.locate(Net(MHA))
    assert_dataflow(sm)
    for b in (0, 1):
        p = f"stack.{b}.mixer.att"
        qkv, o = sm.by_path(f"{p}.in_proj_weight"), sm.by_path(f"{p}.out_proj.weight")
        assert (qkv.kind, qkv.role, qkv.in_features, qkv.out_features) == ("param-linear", "attn.qkv", 32, 96)
        assert (o.kind, o.role, o.in_features, o.out_features) == ("param-linear", "attn.o", 32, 32)
        a = sm.by_path(p)
        assert (a.kind, a.heads, a.kv_heads, a.head_dim) == ("attention", 4, 4, 8)
    assert roles(sm, 0)["stack.0.ff1"] == "mlp.up" and roles(sm, 0)["stack.0.ff2"] == "mlp.down"


def test_custom_lora_on_param_linear_runs():
    """LoRA attaches to nn.MultiheadAttention's in_proj_weight (no linear module there) and changes outputs."""
    m = Net(MHA)
    ids = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        base = m(ids)
    ps.apply(m, "lora", targets="attn.qkv,attn.o", r=2)
    assert len(ps.inspect(m)) == 4
    with torch.no_grad():
        # B starts at zero (allclose: a parametrized weight takes MHA off its fused fast path)
        torch.testing.assert_close(m(ids), base, rtol=0, atol=1e-6)
        for p in m._peftsurgery.parameters():
            p.add_(0.1)
        assert not torch.allclose(m(ids), base)
        with ps.disabled(m):
            torch.testing.assert_close(m(ids), base, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- selectors
def _sel(sm, selector, kinds=("linear", "param-linear")):
    return [s.path for s in sm.select(selector, kinds)]


def test_selector_roles(llama_map):
    _, sm = llama_map
    assert _sel(sm, "attn.q,attn.v") == [f"model.layers.{b}.self_attn.{x}_proj" for b in (0, 1) for x in "qv"]
    assert {sm.by_path(p).role for p in _sel(sm, "mlp.*")} == {"mlp.gate", "mlp.up", "mlp.down"}


def test_selector_glob(llama_map):
    _, sm = llama_map
    got = _sel(sm, "attn.*")
    assert len(got) == 8 and {sm.by_path(p).role for p in got} == {"attn.q", "attn.k", "attn.v", "attn.o"}
    assert _sel(sm, "attn", ("attention",)) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]


def test_selector_all_linear_excludes_head(llama_map):
    _, sm = llama_map
    got = _sel(sm, "all-linear")
    assert len(got) == 14 and "lm_head" not in got
    assert "lm_head" in _sel(sm, "head")


def test_selector_blocks(llama_map):
    m = llama(layers=4)
    sm = ps.locate(m)
    got = _sel(sm, "attn.q,blocks:0-1")
    assert got == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    got = _sel(sm, "blocks:3")
    assert len(got) == 7 and all(sm.by_path(p).block == 3 for p in got)


def test_selector_path(llama_map):
    _, sm = llama_map
    assert _sel(sm, "path:*q_proj*") == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_selector_nothing_lists_roles(llama_map):
    m, sm = llama_map
    with pytest.raises(SurgeryError) as e:
        sm.select("xattn.q", ("linear", "param-linear"))
    msg = str(e.value)
    assert "\n" not in msg
    for r in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "head"):
        assert r in msg
    with pytest.raises(SurgeryError, match="roles here"):
        ps.apply(m, "lora", targets="path:*nothing*")


# ---------------------------------------------------------------- a 1.1B Llama on the meta device
def test_meta_1b_llama_locates_and_applies():
    cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4)
    with torch.device("meta"):
        m = tf.LlamaForCausalLM(cfg)
    sm = ps.locate(m)
    s = sm.summary()["roles"]
    assert s == {"attn": 22, "attn.q": 22, "attn.k": 22, "attn.v": 22, "attn.o": 22, "mlp.gate": 22,
                 "mlp.up": 22, "mlp.down": 22, "embed": 1, "head": 1, "norm": 2 * 22 + 1}
    a = sm.by_path("model.layers.21.self_attn")
    assert (a.heads, a.kv_heads, a.head_dim, a.causal) == (32, 4, 64, True)
    ps.apply(m, "lora", targets="all-linear", r=8)
    assert len(ps.inspect(m)) == 22 * 7
    per_block = 8 * ((2048 + 2048) * 2 + (2048 + 256) * 2 + (2048 + 5632) * 2 + (5632 + 2048))
    assert ps.budget(m)["trainable"] == 22 * per_block
    assert all(p.device.type == "meta" for p in m._peftsurgery.parameters())


class _BranchesOnValues(nn.Module):
    """Branches on a tensor's value, which torch.export cannot capture with traced tensors alone."""

    def __init__(self, d=16):
        super().__init__()
        self.emb = nn.Embedding(32, d)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj, self.head = nn.Linear(d, d), nn.Linear(d, 32)
        self.register_buffer("calls", torch.zeros(()))

    def look(self, h):
        return float(h.sum()) > 1e9   # data-dependent Python control flow

    def forward(self, input_ids):
        h = self.emb(input_ids)
        self.calls.add_(1)
        if self.look(h):
            h = h * 2
        a = F.scaled_dot_product_attention(self.q_proj(h)[:, None], self.k_proj(h)[:, None], self.v_proj(h)[:, None])
        return self.head(h + self.out_proj(a[:, 0]))


class _Untraceable(_BranchesOnValues):
    """Reads a tensor's values through NumPy: no tracer sees through that."""

    def look(self, h):
        return float(np.asarray(h.detach()).sum()) > 1e9


def test_a_branch_on_values_is_decided_by_the_example_inputs_and_roles_come_from_data_flow(recwarn):
    """LED, Longformer and FSMT check their padding by value: torch.export fails there, and roles used to be
    guessed from names (no attention, bias or norm sites). Exported again with the real values carried beside the
    traced ones, the branch these inputs take is followed; the model is not changed by it."""
    m = _BranchesOnValues().eval()
    sm = ps.locate(m)
    assert sm.method == "real_export" and all(s.found_by == "real_export+dataflow" for s in sm)
    assert {s.path: s.role for s in sm if s.kind != "tensor"} == {
        "emb": "embed", "q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v", "out_proj": "attn.o",
        "head": "head", "": "attn"}
    assert not [w for w in recwarn if issubclass(w.category, RolesByNameWarning)]
    assert m.calls.item() == 0


GUESSED = {   # models whose inputs the guesses used to get wrong
    "resnet": lambda: tf.ResNetForImageClassification(tf.ResNetConfig(   # no image_size in its config
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3)),
    "ast": lambda: tf.ASTForAudioClassification(tf.ASTConfig(   # a spectrogram, frames first, not raw audio
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, max_length=32,
        num_mel_bins=16, frequency_stride=4, time_stride=4, patch_size=8, num_labels=3)),
    "speech_to_text": lambda: tf.Speech2TextForConditionalGeneration(tf.Speech2TextConfig(   # features frames first
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, input_feat_per_channel=16,
        conv_channels=32, max_source_positions=64, max_target_positions=64)),
}


@pytest.mark.parametrize("arch", GUESSED)
def test_guessed_inputs_run_images_without_a_size_spectrograms_and_frames_first_features(arch):
    torch.manual_seed(0)
    model = GUESSED[arch]().eval()
    kw = importlib.import_module("peftsurgery.locate").example_inputs(model)
    with torch.no_grad():
        model(**kw)
    assert ps.locate(model).method == "export"


def test_hooks_fallback_finds_sites_by_name_and_says_so():
    with pytest.warns(RolesByNameWarning) as caught:
        sm = ps.locate(_Untraceable().eval())
    assert sm.method == "hooks"
    assert {s.path: s.role for s in sm} == {"emb": "embed", "q_proj": "attn.q", "k_proj": "attn.k",
                                            "v_proj": "attn.v", "out_proj": "attn.o", "head": "head"}
    assert all(s.found_by == "hooks+name" for s in sm)
    assert sm.summary()["found_by"] == {"hooks+name": 6}
    [w] = caught
    msg = str(w.message)
    assert "\n" not in msg and w.filename == __file__  # points at the caller of locate
    assert "roles of _Untraceable's 6 sites were guessed from module names" in msg
    assert "by_export: RuntimeError" in msg and "by_real_export: RuntimeError" in msg and "by_fx: ValueError" in msg
    assert "example_inputs" in msg and "strict=True" in msg


def test_a_selector_matching_nothing_on_roles_from_names_says_why():
    """The name fallback finds no attention, bias or norm sites: a selector asking for them says that this is
    why, not only that nothing matched."""
    m = _Untraceable().eval()
    with pytest.warns(RolesByNameWarning):
        raises_one_line(lambda: ps.apply(m, "bitfit"), "matches no tensor site", "guessed from module names",
                        "example_inputs", "path:")


def test_hooks_fallback_is_quiet_apart_from_the_warning(capsys):
    with pytest.warns(RolesByNameWarning):
        ps.locate(_Untraceable().eval())
    out, err = capsys.readouterr()
    assert out == "" and err == ""  # no partial graphs or log lines from the failed traces


def test_strict_refuses_roles_from_names():
    m = _Untraceable().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SurgeryError) as e:
            ps.locate(m, strict=True)
    msg = str(e.value)
    assert "\n" not in msg and "can only be guessed from module names" in msg and "numpy() is not supported" in msg


class _RefusesTracing(nn.Module):
    """Runs on real tensors only, and says so with braces in its message."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(4, 4)

    def forward(self, x):
        if type(x) is not torch.Tensor:
            raise RuntimeError("no {tracing} of {x}")
        return self.up(x)


def test_capture_errors_with_braces_are_quoted_as_they_are():
    with pytest.warns(RolesByNameWarning, match=r"RuntimeError: no \{tracing\} of \{x\}"):
        ps.locate(_RefusesTracing(), {"x": torch.zeros(2, 4)})
    with pytest.raises(SurgeryError, match=r"by_fx: RuntimeError: no \{tracing\}"):
        ps.locate(_RefusesTracing(), {"x": torch.zeros(2, 4)}, strict=True)


def test_data_flow_gives_no_warning_and_strict_passes(llama_map):
    m, sm = llama_map
    with warnings.catch_warnings():
        warnings.simplefilter("error", RolesByNameWarning)
        assert ps.locate(m, strict=True).fingerprint() == sm.fingerprint()
    assert sm.summary()["found_by"] == {"export+dataflow": len(sm)}


def _granite_moe():
    torch.manual_seed(0)
    return tf.GraniteMoeForCausalLM(tf.GraniteMoeConfig(
        vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)).eval()


def _long_t5():
    torch.manual_seed(0)
    return tf.LongT5ForConditionalGeneration(tf.LongT5Config(
        vocab_size=V, d_model=D, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0)).eval()


def _llava():
    torch.manual_seed(0)
    text = dict(model_type="llama", vocab_size=V + 4, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    vision = dict(model_type="clip_vision_model", hidden_size=D, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, image_size=16, patch_size=8)
    return tf.LlavaForConditionalGeneration(tf.LlavaConfig(text_config=text, vision_config=vision,
                                                           image_token_index=V)).eval()


@pytest.mark.parametrize("factory,roles", [
    # its forward takes use_cache only through **kwargs: without use_cache=False export met the cache in the output
    (_granite_moe, {"attn.q", "moe.up", "moe.down", "router"}),
    # the same, its use_cache setting in a sub-config (text_config): roles had been guessed from names
    (_llava, {"attn", "attn.q", "mlp.up", "norm"}),
    # builds a missing attention mask only when not traced: without one in the inputs, export met None
    (_long_t5, {"attn.q", "xattn.q", "mlp.up", "mlp.down"}),
])
def test_guessed_inputs_let_export_capture_models_that_needed_a_mask_or_no_cache(factory, roles):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RolesByNameWarning)
        sm = ps.locate(factory(), strict=True)
    assert set(sm.summary()["found_by"]) == {"export+dataflow"}
    assert roles <= {s.role for s in sm.sites}


class _GradBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class _NoGradRegion(nn.Module):
    """A block run inside `with torch.no_grad()` in the forward (as Reformer's reversible layers are), another inside
    autocast, a third in an autocast region inside the no_grad one."""

    def __init__(self):
        super().__init__()
        self.embed, self.a, self.b, self.c, self.d = nn.Embedding(V, D), *(_GradBlock() for _ in range(4))
        self.head = nn.Linear(D, V)

    def forward(self, input_ids):
        h = self.a(self.embed(input_ids))
        with torch.no_grad():
            h = self.b(h)
            with torch.autocast("cpu", enabled=False):
                h = self.d(h)
        with torch.autocast("cpu", enabled=False):
            h = self.c(h)
        return self.head(h)


def test_layers_in_a_no_grad_or_autocast_region_are_located_by_data_flow():
    """export wraps such a region in a higher-order op with a graph of its own; its layers had no sites at all (and
    Reformer's 12 projections none), without a word. A region inside a region comes in line too (it had kept the
    enclosing one out)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sm = ps.locate(_NoGradRegion().eval(), strict=True)
    roles = {s.path: (s.role, s.found_by) for s in sm.sites}
    for block in "abcd":
        assert roles[f"{block}.up"] == ("mlp.up", "export+dataflow")
        assert roles[f"{block}.down"] == ("mlp.down", "export+dataflow")


class _Branching(nn.Module):
    """A forward choosing between two blocks with torch.cond: each branch is a graph of its own."""

    def __init__(self):
        super().__init__()
        self.embed, self.a, self.b, self.c = nn.Embedding(V, D), *(_GradBlock() for _ in range(3))
        self.head = nn.Linear(D, V)

    def forward(self, input_ids):
        h = self.a(self.embed(input_ids))
        h = torch.cond(h.sum() > 0, lambda t: self.b(t), lambda t: self.c(t), (h,))
        return self.head(h)


def test_layers_the_analysis_cannot_enter_are_named_in_a_warning():
    """Layers used only inside a graph of their own (torch.cond's branches, a region that cannot come in line) get
    no sites: that is said, naming their parameters, instead of passing in silence."""
    torch.manual_seed(0)
    with pytest.warns(UnreadWarning, match=r"8 parameters of _Branching \(b\.down\.bias, .*no method changes them"):
        sm = ps.locate(_Branching().eval())
    paths = {s.path for s in sm.sites}
    assert {"a.up", "a.down", "head"} <= paths and not any(p.startswith(("b.", "c.")) for p in paths)


class _NoResidualBlock(nn.Module):
    """Zamba's shared block in small: a projection, a norm, then a gated feed-forward with no residual stream
    around it; `lowrank` adds a down-up pair without an activation beside it (as Zamba2's adapters)."""

    def __init__(self, lowrank: bool):
        super().__init__()
        self.embed, self.proj, self.norm = nn.Embedding(V, D), nn.Linear(D, D), nn.RMSNorm(D)
        self.gate, self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.a, self.b = nn.Linear(D, 4), nn.Linear(4, D)
        self.lowrank, self.head = lowrank, nn.Linear(D, V)

    def forward(self, input_ids):
        h = self.norm(self.proj(self.embed(input_ids)))
        out = self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))
        if self.lowrank:
            out = out + self.b(self.a(self.norm(out)))
        return self.head(out)


def test_a_feed_forward_after_a_norm_without_a_residual_stream_is_found():
    """Its inputs come from linears only (through the norm), which had made its gate, up and down plain `linear`
    (Zamba's shared block); a down-up pair without an activation after a norm stays `linear`."""
    torch.manual_seed(0)
    roles = {s.path: s.role for s in ps.locate(_NoResidualBlock(True).eval(), strict=True).sites}
    assert (roles["gate"], roles["up"], roles["down"]) == ("mlp.gate", "mlp.up", "mlp.down")
    assert (roles["a"], roles["b"]) == ("linear", "linear")


def _dpt():
    torch.manual_seed(0)
    cfg = tf.DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, image_size=32,
                       patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 16, 32, 32],
                       fusion_hidden_size=16, head_hidden_size=16)
    return tf.DPTForDepthEstimation(cfg).eval()


def test_locate_leaves_no_output_capturing_hooks_on_a_shortened_model():
    """transformers installs its hidden-state hooks at the first forward that records them, on the layers present:
    locate's trace of one layer of each kind had left DPT's other layers without them, so its neck failed (4 hidden
    states wanted, 2 got) in locate and in every later forward, even of the bare model."""
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = _dpt()(pixel_values=pixels).predicted_depth
    model = _dpt()
    sm = ps.locate(model)
    assert sum(s.role.startswith("attn.") for s in sm.sites) >= 16   # q, k, v, o of all 4 layers
    assert not any(m._forward_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels).predicted_depth, want)


class _ConvMixer(nn.Module):
    """A block whose projections mix positions through a convolution over the sequence (LFM2's short convolution,
    a gated delta net's) or a running sum, without attention, then a feed-forward; with `attend`, the mixer is
    attention and the feed-forward holds a convolution of its own (Segformer's)."""

    def __init__(self, attend: bool, running: bool = False):
        super().__init__()
        self.embed, self.attend, self.running = nn.Embedding(V, D), attend, running
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.inp, self.out = nn.Linear(D, D), nn.Linear(D, D)
        self.conv = nn.Conv1d(2 * D, 2 * D, 3, groups=2 * D, padding=2)
        self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.head = nn.Linear(D, V)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        n = h.shape[1]
        if self.attend:
            split = lambda t: t.view(t.shape[0], n, 4, D // 4).transpose(1, 2)
            a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), is_causal=True)
            h = h + self.out(a.transpose(1, 2).reshape(h.shape))
            u = self.up(h)
            h = h + self.down(F.gelu(self.conv(u.transpose(1, 2))[..., :n].transpose(1, 2)))
        else:
            x = self.inp(h)
            conv = lambda t: self.conv(torch.cat([t, t], -1).transpose(1, 2))[..., :n].transpose(1, 2)[..., :D]
            mixed = x.cumsum(1) if self.running else conv(x)
            h = h + self.out(mixed * torch.sigmoid(x))
            h = h + self.down(F.gelu(self.up(h)))
        return self.head(h)


@pytest.mark.parametrize("running", [False, True], ids=["convolution", "running_sum"])
def test_a_token_mixers_projections_are_not_a_feed_forward(running):
    """Their outputs pass a convolution or a running sum over the sequence in a block without attention: they were
    labelled mlp.up / mlp.down (Qwen3.5's and OLMo-hybrid's gated delta nets, LFM2's short convolutions, xLSTM,
    RecurrentGemma), so the defaults naming feed-forward roles (adapter's mlp.down, ia3's) acted on the token mixer."""
    torch.manual_seed(0)
    roles = {s.path: s.role for s in ps.locate(_ConvMixer(False, running).eval(), strict=True).sites}
    assert (roles["inp"], roles["out"], roles["up"], roles["down"]) == ("linear", "linear", "mlp.up", "mlp.down")


def test_a_feed_forward_with_a_convolution_beside_attention_stays_a_feed_forward():
    torch.manual_seed(0)
    roles = {s.path: s.role for s in ps.locate(_ConvMixer(True).eval(), strict=True).sites}
    assert (roles["q"], roles["out"], roles["up"], roles["down"]) == ("attn.q", "attn.o", "mlp.up", "mlp.down")


class _MaskedKeys(nn.Module):
    """Self-attention whose keys and values are computed from the hidden states with padding zeroed by the mask
    (Inkling runs them through a short convolution masked so), the queries from the states as they are."""

    def __init__(self):
        super().__init__()
        self.embed, self.q, self.k, self.v = nn.Embedding(V, D), nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.o, self.head = nn.Linear(D, D), nn.Linear(D, V)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        kv = h * attention_mask[..., None].to(h.dtype)
        split = lambda t: t.view(*t.shape[:2], 4, D // 4).transpose(1, 2)
        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(kv)), split(self.v(kv)), is_causal=True)
        return self.head(h + self.o(a.transpose(1, 2).reshape(h.shape)))


def test_a_mask_reaching_the_keys_alone_does_not_make_self_attention_cross_attention():
    """Cross-attention is told by the model inputs that carry a sequence (ids an embedding reads, features, states):
    the mask reaching Inkling's keys but not its queries had made its self-attention xattn.*, and every default
    naming attn.* was refused."""
    torch.manual_seed(0)
    roles = {s.path: s.role for s in ps.locate(_MaskedKeys().eval(), strict=True).sites}
    assert (roles["q"], roles["k"], roles["v"], roles["o"], roles[""]) == ("attn.q", "attn.k", "attn.v", "attn.o",
                                                                          "attn")


class _GatedNorm(nn.Module):
    """A norm whose output is scaled by a gate computed by a small two-layer network (AXK2's gated norm; Kimi's
    output gate), then a feed-forward."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm = nn.Embedding(V, D), nn.RMSNorm(D)
        self.fc1, self.fc2 = nn.Linear(D, 8), nn.Linear(8, D)
        self.up, self.down, self.head = nn.Linear(D, 2 * D), nn.Linear(2 * D, D), nn.Linear(D, V)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        n = self.norm(h)
        n = n * torch.sigmoid(self.fc2(F.silu(self.fc1(n))))
        return self.head(h + self.down(F.gelu(self.up(n))))


def test_a_gates_bottleneck_is_not_a_feed_forward():
    """Its second layer's output goes straight into an activation (the gate), where a feed-forward's goes back to
    the residual stream: it had been mlp.up / mlp.down, so feed-forward defaults acted on it."""
    torch.manual_seed(0)
    roles = {s.path: s.role for s in ps.locate(_GatedNorm().eval(), strict=True).sites}
    assert (roles["fc1"], roles["fc2"], roles["up"], roles["down"]) == ("linear", "linear", "mlp.up", "mlp.down")


class _Classifier(nn.Module):
    """Blocks in a ModuleList, then a classifier in a Sequential(Flatten, Linear) (ResNet's, Bit's); with
    `head=False`, an input projection and no head at all (Siglip2's vision model, Parakeet's encoder)."""

    def __init__(self, head: bool):
        super().__init__()
        self.proj = nn.Linear(8, D)
        self.blocks = nn.ModuleList(_GradBlock() for _ in range(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(4 * D, 3)) if head else None

    def forward(self, features):
        h = self.proj(features)
        for b in self.blocks:
            h = b(h)
        return self.classifier(h) if self.classifier is not None else h


@pytest.mark.parametrize("head", [True, False], ids=["sequential_head", "no_head"])
def test_the_head_is_told_by_blocks_not_by_numbers_in_its_path(head):
    """`classifier.1` had been read as block 1 of `classifier`, so the output layer was `linear` (selector `head`
    matched nothing, all-linear adapted it); an input projection feeding the blocks, whose output reaches the model's
    output along the residual stream, had been the head of a model without one."""
    torch.manual_seed(0)
    sm = ps.locate(_Classifier(head).eval(), example_inputs={"features": torch.randn(1, 4, 8)}, strict=True)
    roles = {s.path: s.role for s in sm.sites}
    assert roles["proj"] == "linear" and roles["blocks.0.up"] == "mlp.up"
    assert (roles.get("classifier.1") == "head") is head and list(roles.values()).count("head") == int(head)
