"""Prefix keys/values where attention is computed in a module's own code (products and a softmax), in
nn.MultiheadAttention, and with keys and values of different head sizes (latent attention), checked against
references computed by other means: the keys/values put in the model's own cache, nn.MultiheadAttention's own
bias_k/bias_v, and attention written out by hand with the prefix concatenated. The zoo (tests/test_zoo.py) runs
the usual checks (train, disabled, save/load, generate, padding, remove) on gptj, bloom, deberta_v2, mha_net,
einsum_lm and deepseek_v3."""
from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
import transformers as tf
from torch import nn

import peftsurgery as ps
from peftsurgery import SurgeryError
from peftsurgery.rewrite import attention
from peftsurgery.rewrite import prefix as prefix_rule
from peftsurgery.sites import CONTAINER

try:
    from conftest import raises_one_line
    from test_core import assert_same, snapshot
    from test_zoo import fresh, inputs
    from zoo import V
except ImportError:  # tests/ collected as a package
    from tests.conftest import raises_one_line
    from tests.test_core import assert_same, snapshot
    from tests.test_zoo import fresh, inputs
    from tests.zoo import V


def prefixes(model) -> dict:
    """Site path -> (key, value), each (kv_heads, tokens, head size), of the default adapter."""
    rec = ps.adapters(model)["default"].records[0]
    return {s.path: tuple(t.detach() for t in rec.built[s.path]()) for s in rec.sites}


def perturb(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model._modules[CONTAINER].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


# ---------------------------------------------------------------- GPT-J: the prefix is what the cache would hold

def test_gptj_prefix_equals_the_same_keys_and_values_in_its_cache():
    """GPT-J's own `_attn` (matmul, mask added, softmax, matmul): the prefix added at its products gives what the
    base gives with the prefix as past keys/values (after rotary: the cache holds rotated keys) at positions 0..2,
    the real tokens after them (as the entry hook places them), with left padding in one row."""
    model = fresh("gptj")
    ps.apply(model, "prefix-tuning", num_tokens=3, init="random")
    perturb(model)
    ids = torch.randint(3, V, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        cache = tf.DynamicCache()
        for i, (k, v) in enumerate(prefixes(model).values()):
            cache.update(k.expand(2, -1, -1, -1).clone(), v.expand(2, -1, -1, -1).clone(), i)
        with ps.disabled(model):
            want = model(input_ids=ids, attention_mask=torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], 1),
                         position_ids=pos + 3, past_key_values=cache).logits
            base = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert not torch.allclose(got, base, atol=1e-3)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=1e-4)


def test_xglm_scores_clamped_by_an_elementwise_max_take_the_prefix():
    """XGLM's own attention (bmm, mask added, torch.max against the dtype's lowest value, softmax, bmm) was refused
    as never reaching a softmax; its first layer's output now equals attention over the prefix and its keys written
    out by hand."""
    torch.manual_seed(0)
    model = tf.XGLMForCausalLM(tf.XGLMConfig(vocab_size=V, d_model=64, ffn_dim=128, num_layers=2, attention_heads=4,
                                             max_position_embeddings=128, pad_token_id=0)).eval()
    ps.apply(model, "prefix-tuning", num_tokens=3, init="random")
    perturb(model)
    att, seen = model.model.layers[0].self_attn, {}
    hook = att.register_forward_hook(lambda m, a, kw, out: seen.update(x=kw.get("hidden_states", a and a[0]),
                                                                        out=out[0]), with_kwargs=True)
    ids = torch.randint(3, V, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids)
        hook.remove()
        x, (pk, pv) = seen["x"], prefixes(model)["model.layers.0.self_attn"]
        B, T, H, d = *x.shape[:2], 4, 16
        q, k, v = ((f(x) * s).view(B, T, H, d).transpose(1, 2)
                   for f, s in ((att.q_proj, att.scaling), (att.k_proj, 1), (att.v_proj, 1)))
        scores = q @ torch.cat([pk.expand(B, -1, -1, -1), k], 2).transpose(-1, -2)
        scores[..., 3:] = scores[..., 3:].masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        o = scores.softmax(-1) @ torch.cat([pv.expand(B, -1, -1, -1), v], 2)
        want = att.out_proj(o.transpose(1, 2).reshape(B, T, H * d))
    torch.testing.assert_close(seen["out"], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gptj", "bloom"])
def test_vocab_init_records_the_keys_and_values_the_model_caches(arch):
    """init=vocab reads keys/values at the score and value products: for these tokens they are what the model's
    cache holds (GPT-J: rotated keys; Bloom: keys before its (batch * heads, head_dim, seq) layout)."""
    model = fresh(arch)
    ps.apply(model, "prefix-tuning", num_tokens=4, init="vocab", seed=3)
    ids = torch.randint(0, V, (1, 4), generator=torch.Generator().manual_seed(3))
    with ps.disabled(model), torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    for i, (k, v) in enumerate(prefixes(model).values()):
        ck, cv = cache.layers[i].keys[0], cache.layers[i].values[0]
        torch.testing.assert_close(k, ck, atol=1e-6, rtol=0)
        torch.testing.assert_close(v, cv, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- nn.MultiheadAttention

class MHA(nn.Module):
    def __init__(self, need_weights=False, bias_kv=False):
        super().__init__()
        torch.manual_seed(0)
        self.need_weights = need_weights
        self.embed = nn.Embedding(V, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True, add_bias_kv=bias_kv)
        self.head = nn.Linear(16, V)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        pad = None if attention_mask is None else attention_mask == 0
        return self.head(h + self.attn(h, h, h, key_padding_mask=pad, need_weights=self.need_weights)[0])


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_prefix_equals_its_own_bias_kv(need_weights):
    """nn.MultiheadAttention with add_bias_kv appends one key and one value after the in-projection: one prefix
    token with that key and value computes the same (keys carry no positions), with a padding mask, through the
    attention call inside F.multi_head_attention_forward (need_weights=False) or its own bmm-softmax-bmm
    (need_weights=True); disabled, the module takes its fast path again and gives the base exactly."""
    ref = MHA(bias_kv=True).eval()
    model = MHA(need_weights).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(ref.state_dict()[name])
        ref.attn.bias_k.normal_()
        ref.attn.bias_v.normal_()
    ids = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        base = model(ids, mask)
    ps.apply(model, "prefix-tuning", num_tokens=1, init="random", example_inputs={"input_ids": ids})
    with torch.no_grad():
        kv = ps.adapters(model)["default"].records[0].built["_kv"].kv
        kv[0, 0] = ref.attn.bias_k.view(2, 1, 8)
        kv[0, 1] = ref.attn.bias_v.view(2, 1, 8)
        torch.testing.assert_close(model(ids, mask), ref(ids, mask), atol=1e-5, rtol=1e-4)
        with ps.disabled(model):
            assert torch.equal(model(ids, mask), base)


# ---------------------------------------------------------------- attention written by hand

class Handmade(nn.Module):
    """(batch * heads) rows: an ALiBi-like bias through baddbmm, a padding mask by masked_fill, a causal mask
    buffer's slice by Tensor.where, a float mask multiplied in, dropout and a dtype round trip on the way."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.register_buffer("slopes", torch.tensor([0.5, 0.25, 0.125, 0.0625]), persistent=False)
        self.register_buffer("causal", torch.ones(32, 32, dtype=torch.bool).tril(), persistent=False)
        self.drop = nn.Dropout(0.1)

    def forward(self, x, mask):
        B, S, D = x.shape
        H, d = self.heads, D // self.heads
        q, k, v = (t.view(B, S, H, d).transpose(1, 2).reshape(B * H, S, d) for t in self.qkv(x).split(D, -1))
        bias = (self.slopes[:, None] * mask.cumsum(-1)[:, None, :]).reshape(B * H, 1, S)
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=d ** -0.5).view(B, H, S, -1)
        scores = scores.masked_fill(mask[:, None, None, :] == 0, -1e9) * mask[:, None, None, :].float()
        scores = scores.where(self.causal[:S, :S], -1e9)
        probs = self.drop(scores.double().softmax(dim=-1).float()).view(B * H, S, -1)
        return self.out(torch.bmm(probs, v).view(B, H, S, d).transpose(1, 2).reshape(B, S, D))

    def reference(self, x, mask, pk, pv, seated=False):
        """The same with the prefix concatenated: bias 0, visible, kept by where, multiplied by 1. Seated: the
        prefix keys at the positions right before each row's first real token (the bias counts the mask's ones: the
        prefix 1..P after the left padding, the real tokens from P + 1)."""
        B, S, D = x.shape
        H, d, P = self.heads, D // self.heads, pk.shape[1]
        q, k, v = (t.view(B, S, H, d).transpose(1, 2) for t in self.qkv(x).split(D, -1))
        k, v = torch.cat([pk.expand(B, -1, -1, -1), k], 2), torch.cat([pv.expand(B, -1, -1, -1), v], 2)
        pos = mask.cumsum(-1)
        if seated:
            pos, before = torch.where(pos > 0, pos + P, pos), torch.arange(1, P + 1.0)
        else:
            before = torch.zeros(P)
        slopes = self.slopes[:, None, None]
        scores = q @ k.transpose(-1, -2) * d ** -0.5 + torch.cat(
            [slopes * before.expand(B, 1, 1, P), slopes * pos[:, None, None, :]], -1)
        full = torch.cat([torch.ones(B, P, dtype=mask.dtype), mask], 1)[:, None, None, :]
        scores = scores.masked_fill(full == 0, -1e9) * full.float()
        scores = scores.where(torch.cat([torch.ones(S, P, dtype=torch.bool), self.causal[:S, :S]], 1), -1e9)
        return self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, D))


class HandmadeLM(nn.Module):
    def __init__(self, attention=Handmade):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.attn, self.head = nn.Embedding(V, 32), attention(), nn.Linear(32, V)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return self.head(h + self.attn(h, mask))


def handmade_inputs():
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("seated", [True, False], ids=["seated", "in-front"])
def test_every_tensor_combined_with_the_scores_gets_the_neutral_value_in_the_prefix_columns(seated, monkeypatch):
    """Seated (the model adds a position bias): the prefix keys get the bias of the positions right before each
    row's first real token, after its left padding. In front (as where a prefix cannot be seated: forced here),
    every tensor combined with the scores gets the value that leaves a score as it is, and that is said."""
    model = HandmadeLM().eval()
    kw = handmade_inputs()
    with torch.no_grad():
        base = model(**kw)
    if not seated:
        monkeypatch.setattr(prefix_rule, "seated", lambda *a: {})
        with pytest.warns(UserWarning, match="prefix keys in Handmade get no position bias"):
            ps.apply(model, "prefix-tuning", num_tokens=3, init="random", example_inputs=kw)
    else:
        ps.apply(model, "prefix-tuning", num_tokens=3, init="random", example_inputs=kw)
        assert "seated before the first real token" in ps.inspect(model)[0]["what"]
    perturb(model)
    (pk, pv), = prefixes(model).values()
    assert pk.shape == (4, 3, 8)
    with torch.no_grad():
        h = model.embed(kw["input_ids"])
        want = model.head(h + model.attn.reference(h, kw["attention_mask"], pk, pv, seated))
        # seated, the padding (before the prefix) does not see it: only the real tokens' outputs agree
        real = kw["attention_mask"].bool() if seated else torch.ones_like(kw["attention_mask"], dtype=torch.bool)
        torch.testing.assert_close(model(**kw)[real], want[real], atol=1e-5, rtol=1e-4)
        with ps.disabled(model):
            assert torch.equal(model(**kw), base)
    model.train()  # dropout on the wider probabilities; gradients reach the prefix
    model(**kw).sum().backward()
    grads = [p.grad for p in model._modules[CONTAINER].parameters()]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


class VectorsLM(HandmadeLM):
    """The handmade attention fed vectors, not token ids: no sequence of tokens to seat a prefix in."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 32)

    def forward(self, features, attention_mask):
        h = self.embed(features)
        return self.head(h + self.attn(h, attention_mask))


def test_a_position_bias_the_prefix_does_not_get_is_said():
    """With no token ids to sit among, the prefix stays in front of the keys, without position bias: said once."""
    kw = {"features": torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0)),
          "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    with pytest.warns(UserWarning, match=r"prefix keys in Handmade get no position bias") as seen:
        ps.apply(VectorsLM().eval(), "prefix-tuning", num_tokens=2, init="random", example_inputs=kw)
    assert len({str(w.message) for w in seen if "position bias" in str(w.message)}) == 1


def test_an_attention_computing_its_own_products_beside_one_that_dispatches_in_its_file_gets_its_prefix():
    """BigBirdPegasus's modelling file reads transformers' attention registry (its decoder attention dispatches),
    but its encoder attention computes its own score and value products: it used to be given the registry's
    interception, which never saw a call, and prefix tuning was refused. Each class is now judged by its own code."""
    torch.manual_seed(0)
    model = tf.BigBirdPegasusForConditionalGeneration(tf.BigBirdPegasusConfig(
        vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, block_size=4,
        num_random_blocks=2, decoder_start_token_id=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    enc, dec = model.model.encoder.layers[0].self_attn.self, model.model.decoder.layers[0].self_attn
    assert not attention._dispatches(enc) and attention._dispatches(dec)
    ids = torch.randint(3, V, (2, 8), generator=torch.Generator().manual_seed(0))
    kw = dict(input_ids=ids, decoder_input_ids=ids[:, :4])
    with torch.no_grad():
        base = model.model.encoder(input_ids=ids).last_hidden_state
    ps.apply(model, "prefix-tuning", num_tokens=3, init="random")
    assert {r["site"] for r in ps.inspect(model)} >= {"model.encoder.layers.0.self_attn.self",
                                                     "model.decoder.layers.0.self_attn"}
    perturb(model)
    with torch.no_grad():
        assert not torch.allclose(model.model.encoder(input_ids=ids).last_hidden_state, base)
        with ps.disabled(model):
            assert torch.equal(model.model.encoder(input_ids=ids).last_hidden_state, base)
    model(**kw).logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model._modules[CONTAINER].parameters())


def test_a_look_for_a_bias_in_one_thread_neither_takes_nor_silences_another_threads_finding():
    """While one thread's apply looks for a position bias (note_bias records), a model in another thread whose
    prefix cannot be seated still gets its warning, and the look's record holds nothing of it."""
    kw = {"features": torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0)),
          "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    attention.look.found = []   # as prefix tuning's look sets it, here in the main thread
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            other = threading.Thread(target=ps.apply, args=(VectorsLM().eval(), "prefix-tuning"),
                                     kwargs=dict(num_tokens=2, init="random", example_inputs=kw))
            other.start()
            other.join()
        assert attention.look.found == []
        assert any("prefix keys in Handmade get no position bias" in str(w.message) for w in seen)
    finally:
        attention.look.found = None


@pytest.mark.parametrize("eager", [False, True], ids=["sdpa", "eager"])
def test_t5_is_seated_in_encoder_and_decoder(eager, recwarn):
    """T5's relative bias is found beside sdpa's mask, and beside the float padding mask eager T5 hands its
    attention (that mask, looked at first, used to settle the question for the site and hide the bias). Encoder and
    decoder self-attention sit in their own sequences; cross-attention keeps the prefix in front (its keys are the
    encoder's outputs, T5 adds no bias there); nothing is said."""
    model = fresh("t5")
    kw = {}
    if eager:
        model.set_attn_implementation("eager")
        ids = torch.randint(3, V, (2, 8), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        kw = {"example_inputs": {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids[:, :4],
                                 "use_cache": False}}
    ps.apply(model, "prefix-tuning", num_tokens=2, init="random", **kw)
    where = {r["site"]: "seated" in r["what"] for r in ps.inspect(model)}
    assert where == {s: "EncDecAttention" not in s for s in where} and len(where) == 6
    assert not [w for w in recwarn if "position bias" in str(w.message)]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gptj", "mha_net", "einsum_lm", "handmade"])
def test_masks_are_not_taken_for_a_position_bias(arch, recwarn):
    if arch == "handmade":   # the same products, masks and bias as above, the bias all zero
        model, kw = HandmadeLM().eval(), {"example_inputs": handmade_inputs()}
        model.attn.slopes.zero_()
    else:
        model, kw = fresh(arch), {}
    ps.apply(model, "prefix-tuning", num_tokens=2, init="random", **kw)
    assert not [w for w in recwarn if "position bias" in str(w.message)]


class TwoProducts(Handmade):
    """Scores summed from two products (keys split in two parts): no single place for prefix keys."""

    def forward(self, x, mask):
        B, S, D = x.shape
        q, k, v = (t.view(B, S, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(D, -1))
        scores = q[..., :4] @ k[..., :4].transpose(-1, -2) + q[..., 4:] @ k[..., 4:].transpose(-1, -2)
        return self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, D))


@pytest.mark.parametrize("init", ["random", "vocab"])
def test_scores_from_two_products_are_refused_in_one_line(init):
    model = HandmadeLM(TwoProducts).eval()
    snap = snapshot(model)
    with pytest.raises(SurgeryError, match="made by 2 products, not one") as e:
        ps.apply(model, "prefix-tuning", num_tokens=2, init=init, example_inputs=handmade_inputs())
    assert "\n" not in str(e.value)
    assert_same(model, snap)
    assert ps.adapters(model) == {} and CONTAINER not in model._modules


def test_removed_and_deep_copied_prefixes_leave_no_mode_behind():
    model = HandmadeLM().eval()
    kw = handmade_inputs()
    with torch.no_grad():
        base = model(**kw)
    ps.apply(model, "prefix-tuning", num_tokens=2, init="random", example_inputs=kw)
    perturb(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(twin(**kw), model(**kw)) and not torch.equal(model(**kw), base)
    ps.remove(model)
    assert not model.attn._forward_pre_hooks and not model.attn.__dict__.get("_peftsurgery_editors")
    with torch.no_grad():
        assert torch.equal(model(**kw), base)


# ---------------------------------------------------------------- keys and values of two head sizes

def test_latent_attention_prefix_has_keys_and_values_of_their_own_head_sizes(tmp_path):
    """DeepSeek-V3 (the zoo's config: keys 16 + 8 rotary = 24 features per head, values 16): prefix keys 24 wide,
    values 16, in one tensor; with the MLP reparameterisation as well; the budget is what was built; saved and
    loaded exactly."""
    model = fresh("deepseek_v3")
    att = ps.sitemap(model).by_path("model.layers.0.self_attn")
    assert (att.head_dim, att.v_head_dim) == (24, 16)
    ps.apply(model, "prefix-tuning", num_tokens=3, init="random")
    (p,) = [p for p in model.parameters() if p.requires_grad]
    assert p.shape == (2, 4, 3, 24 + 16)   # layers, kv heads, tokens, key + value features
    assert all((k.shape, v.shape) == ((4, 3, 24), (4, 3, 16)) for k, v in prefixes(model).values())
    assert ps.budget(model)["trainable"] == 2 * 4 * 3 * (24 + 16)
    assert "values 4x16" in ps.inspect(model)[0]["what"]
    mlp = fresh("deepseek_v3")
    ps.apply(mlp, "prefix-tuning", num_tokens=3, projection=8, init="random")
    assert all((k.shape, v.shape) == ((4, 3, 24), (4, 3, 16)) for k, v in prefixes(mlp).values())
    perturb(mlp)
    ids = torch.randint(3, V, (2, 5), generator=torch.Generator().manual_seed(6))
    ps.save(mlp, str(tmp_path / "a"))
    back = ps.load(fresh("deepseek_v3"), str(tmp_path / "a"))
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, mlp(input_ids=ids).logits)


# ---------------------------------------------------------------- seated prefixes: position biases over the keys

def alibi_model(arch):
    """Causal LMs that add ALiBi to their scores: bloom (zoo), MPT and Falcon with alibi=True, built tiny."""
    if arch == "bloom":
        return fresh("bloom")
    torch.manual_seed(0)
    if arch == "mpt":
        return tf.MptForCausalLM(tf.MptConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=V,
                                              expansion_ratio=2)).eval()
    return tf.FalconForCausalLM(tf.FalconConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                                vocab_size=V, alibi=True)).eval()


@pytest.mark.parametrize("arch", ["bloom", "mpt", "falcon_alibi"])
def test_a_seated_prefix_sits_right_before_the_first_real_token(arch):
    """Keys and values recorded from tokens t (init=text; causal, so they do not depend on what follows) give on x
    what the base gives on t followed by x: the prefix has the positions right before x's first real token, also
    after left padding, and cached generate equals uncached. Put in front of the keys instead (no bias for them)
    the logits differ by about 1e-3 here."""
    model = alibi_model(arch)
    t, x = [5, 9, 11], torch.tensor([[7, 8, 12, 13, 14]])
    with torch.no_grad():
        want = model(input_ids=torch.cat([torch.tensor([t]), x], 1)).logits[:, len(t):]
    ps.apply(model, "prefix-tuning", num_tokens=3, init="text", text="5,9,11")
    assert all("seated" in r["what"] for r in ps.inspect(model))
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), x], 1)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, want, atol=1e-5, rtol=1e-4)
        got = model(input_ids=padded, attention_mask=(padded > 0).long()).logits[:, 2:]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        both = torch.cat([padded, torch.cat([x, torch.tensor([[20, 21]])], 1)])
        mask = torch.cat([(padded > 0).long(), torch.ones(1, 7, dtype=torch.long)])
        cached = model.generate(input_ids=both, attention_mask=mask, max_new_tokens=4, do_sample=False)
        plain = model.generate(input_ids=both, attention_mask=mask, max_new_tokens=4, do_sample=False,
                               use_cache=False)
    assert torch.equal(cached, plain)


def test_a_seated_prefix_shares_the_sequence_with_no_other_virtual_tokens():
    """Two adapters placing tokens before the first real token would move each other's: refused in one line,
    either order, the model as it was."""
    model = fresh("bloom")
    ps.apply(model, "prompt-tuning", name="prompt", num_tokens=2)
    snap = snapshot(model)
    raises_one_line(lambda: ps.apply(model, "prefix-tuning", name="prefix", num_tokens=2, init="random"),
                    "seated in the sequence", "remove the other adapter")
    assert_same(model, snap)
    model = fresh("bloom")
    ps.apply(model, "prefix-tuning", name="prefix", num_tokens=2, init="random")
    snap = snapshot(model)
    raises_one_line(lambda: ps.apply(model, "prompt-tuning", name="prompt", num_tokens=2), "seated in the sequence")
    assert_same(model, snap)


def test_route_refuses_seated_prefixes():
    model = fresh("bloom")
    ps.apply(model, "prefix-tuning", name="a", num_tokens=2, init="random")
    ps.apply(model, "lora", name="b", targets="mlp.up")
    ids = torch.randint(3, V, (2, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(SurgeryError, match="route\\(\\) does not serve prefixes seated"):
        with ps.route(model, ["a", "b"]):
            model(input_ids=ids)


@pytest.mark.parametrize("terms", [["c2p"], ["p2c"], ["p2c", "c2p"]])
def test_deberta_reading_the_placeholders_keys_is_said(terms, recwarn):
    """DeBERTa's position-to-content term (p2c) multiplies the keys apart from the score product, so the seated
    placeholders' own keys reach it: seen at apply (outputs differ with what the placeholders hold) and said. Its
    content-to-position term (c2p) reads only queries: nothing to say."""
    torch.manual_seed(0)
    model = tf.DebertaV2ForMaskedLM(tf.DebertaV2Config(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        relative_attention=True, position_buckets=16, pos_att_type=terms)).eval()
    ps.apply(model, "prefix-tuning", num_tokens=3, init="random")
    said = [w for w in recwarn if "reads the seated placeholders' own keys" in str(w.message)]
    assert len(said) == ("p2c" in terms)
    assert all("seated" in r["what"] for r in ps.inspect(model))


def test_t5_decoder_alone_is_seated_without_a_word(recwarn):
    """A prefix on the decoder's self-attention only (PEFT's choice): only the decoder stack gets placeholders at
    apply, so the encoder's, which no prefix would swap, are not held against it; nothing is said, and the
    encoder's outputs are the base's."""
    model = fresh("t5")
    kw = inputs("t5")
    with torch.no_grad():
        base = model(**kw).encoder_last_hidden_state
    targets = ",".join(f"path:decoder.block.{i}.layer.0.SelfAttention" for i in range(2))
    ps.apply(model, "prefix-tuning", num_tokens=2, init="random", targets=targets)
    assert [r["site"] for r in ps.inspect(model) if "seated" in r["what"]] == targets.replace("path:", "").split(",")
    assert not [w for w in recwarn if "seated placeholders" in str(w.message)]
    with torch.no_grad():
        assert torch.equal(model(**kw).encoder_last_hidden_state, base)


@pytest.mark.parametrize("fails_at", [1, 3])
def test_a_failing_look_for_a_position_bias_leaves_nothing_behind(fails_at, monkeypatch):
    """The forwards that decide where a prefix sits make their interceptions one by one; when making one fails
    (the second site of the first look, or the seated look's first site) those made before are undone too, and
    apply goes on: after remove, no module holds an editor or a wrapped forward."""
    model = fresh("bloom")
    made, real = [0], prefix_rule.Intercepted

    def failing(*args, **kwargs):
        made[0] += 1
        if made[0] == fails_at + 1:
            raise RuntimeError("cannot intercept here")
        return real(*args, **kwargs)
    monkeypatch.setattr(prefix_rule, "Intercepted", failing)
    ps.apply(model, "prefix-tuning", num_tokens=2, init="random")
    monkeypatch.setattr(prefix_rule, "Intercepted", real)
    ps.remove(model)
    left = [n for n, m in model.named_modules() if m.__dict__.get("_peftsurgery_editors") or "forward" in m.__dict__]
    assert left == []


class _MaskedSoftmax(torch.autograd.Function):
    """A softmax that zeroes masked probabilities in place and keeps them for its own backward (SEW-D's and
    DeBERTa v1's XSoftmax)."""

    @staticmethod
    def forward(ctx, scores, masked):
        probs = scores.masked_fill(masked, -1e9).softmax(-1)
        probs.masked_fill_(masked, 0)
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx, grad):
        probs, = ctx.saved_tensors
        return probs * (grad - (grad * probs).sum(-1, keepdim=True)), None


class InPlaceSoftmax(Handmade):
    def forward(self, x, mask):
        B, S, D = x.shape
        H, d = self.heads, D // self.heads
        q, k, v = (t.view(B, S, H, d).transpose(1, 2) for t in self.qkv(x).split(D, -1))
        probs = _MaskedSoftmax.apply(q @ k.transpose(-1, -2) * d ** -0.5, (mask == 0)[:, None, None, :])
        return self.out((probs @ v).transpose(1, 2).reshape(B, S, D))


def test_a_softmax_writing_in_place_inside_an_autograd_function_trains_with_the_prefix():
    """The calls between the score and value products are replayed with the prefix columns, outside the autograd
    Function that ran them: its in-place write then broke the backward (SEW-D with prefix tuning). The prefix's
    gradients are those of the same attention written out with the prefix concatenated."""
    model = HandmadeLM(InPlaceSoftmax)
    kw = handmade_inputs()
    ps.apply(model, "prefix-tuning", num_tokens=3, init="random", example_inputs=kw)
    perturb(model)
    params = list(model._modules[CONTAINER].parameters())
    got = torch.autograd.grad(model(**kw).pow(2).mean(), params)
    rec = ps.adapters(model)["default"].records[0]
    (pk, pv), = (rec.built[s.path]() for s in rec.sites)   # functions of the parameters
    h = model.embed(kw["input_ids"])
    B, S, D = h.shape
    full = torch.cat([torch.ones(B, 3, dtype=torch.long), kw["attention_mask"]], 1)
    q, k, v = (t.view(B, S, 4, 8).transpose(1, 2) for t in model.attn.qkv(h).split(D, -1))
    k, v = torch.cat([pk.expand(B, -1, -1, -1), k], 2), torch.cat([pv.expand(B, -1, -1, -1), v], 2)
    probs = (q @ k.transpose(-1, -2) * 8 ** -0.5).masked_fill((full == 0)[:, None, None, :], -1e9).softmax(-1)
    want = model.head(h + model.attn.out((probs @ v).transpose(1, 2).reshape(B, S, D)))
    for a, b in zip(got, torch.autograd.grad(want.pow(2).mean(), params)):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
