"""Behaviour users rely on (design.md), for every built-in method: padding invariance, outputs on the user's
tokens, cached generation equal to uncached greedy decoding, gradient checkpointing, folded prefix saves, BERT
with token_type_ids, T5 generation."""
from __future__ import annotations

import gc
import json
import os
import weakref

import pytest
import torch
import transformers as tf
from torch import nn
from safetensors import safe_open

import peftsurgery as ps

V = 128
PAD = 0


# ---------------------------------------------------------------- tiny model factories (local to this file)
def llama(layers=2):
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD, bos_token_id=1,
        eos_token_id=2)).eval()


def gpt2():
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                            bos_token_id=1, eos_token_id=2, pad_token_id=PAD)).eval()


def bert():
    torch.manual_seed(0)
    return tf.BertModel(tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=128)).eval()


def t5():
    torch.manual_seed(0)
    return tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1)).eval()


METHODS = {
    "lora": {"r": 4},
    "adapter": {"bottleneck": 4},
    "prompt-tuning": {"num_tokens": 3},
    "prefix-tuning": {"num_tokens": 3},
}
GPT2_TARGETS = {"lora": {"targets": "attn.qkv"}}


def adapted(factory, method, **extra):
    """Apply a method and move its parameters away from their (often output-preserving) start values."""
    cfg = {**METHODS[method], **(GPT2_TARGETS.get(method, {}) if factory is gpt2 else {}), **extra}
    m = ps.apply(factory(), method, **cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m._peftsurgery.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return m


SEQS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23]]


def padded(seqs, side):
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(L - len(s), L) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = torch.tensor(s), 1
    return ids, mask


def follow_mask(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def all_methods(fn):
    return pytest.mark.parametrize("method", list(METHODS))(fn)


# ---------------------------------------------------------------- padding
@all_methods
@pytest.mark.parametrize("side", ["left", "right"])
def test_llama_padded_batch_equals_alone(method, side):
    m = adapted(llama, method)
    ids, mask = padded(SEQS, side)
    with torch.no_grad():
        alone = [m(torch.tensor([s])).logits[0] for s in SEQS]
        batch = m(ids, attention_mask=mask).logits
    assert batch.shape == (len(SEQS), ids.shape[1], V)
    for i in range(len(SEQS)):
        torch.testing.assert_close(batch[i][mask[i].bool()], alone[i], rtol=1e-4, atol=1e-5)


@all_methods
@pytest.mark.parametrize("side", ["left", "right"])
def test_gpt2_padded_batch_equals_alone(method, side):
    """GPT-2 has absolute positions: base GPT-2 is only padding-invariant when position ids follow the mask (as
    generate() passes them); with them, every method keeps each sequence's logits."""
    m = adapted(gpt2, method)
    ids, mask = padded(SEQS, side)
    with torch.no_grad():
        alone = [m(torch.tensor([s])).logits[0] for s in SEQS]
        batch = m(ids, attention_mask=mask, position_ids=follow_mask(mask)).logits
    assert batch.shape == (len(SEQS), ids.shape[1], V)
    for i in range(len(SEQS)):
        torch.testing.assert_close(batch[i][mask[i].bool()], alone[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning"])
def test_gpt2_virtual_tokens_right_padding_without_position_ids(method):
    """Right padding needs no position ids at all, virtual tokens or not."""
    m = adapted(gpt2, method)
    ids, mask = padded(SEQS, "right")
    with torch.no_grad():
        alone = [m(torch.tensor([s])).logits[0] for s in SEQS]
        batch = m(ids, attention_mask=mask).logits
    for i in range(len(SEQS)):
        torch.testing.assert_close(batch[i][mask[i].bool()], alone[i], rtol=1e-4, atol=1e-5)


@all_methods
def test_t5_padded_batch_equals_alone(method):
    m = adapted(t5, method)
    ids, mask = padded(SEQS, "right")
    dec = torch.tensor([[0, 3, 4, 5]] * len(SEQS))
    with torch.no_grad():
        batch = m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        for i, s in enumerate(SEQS):
            alone = m(input_ids=torch.tensor([s]), decoder_input_ids=dec[:1]).logits[0]
            torch.testing.assert_close(batch[i], alone, rtol=1e-4, atol=1e-5)
    assert batch.shape == (len(SEQS), 4, V)


# ---------------------------------------------------------------- outputs line up with the user's tokens
@all_methods
def test_llama_outputs_have_base_shape_and_labels_need_no_padding(method):
    m = adapted(llama, method)
    base = llama()
    ids, mask = padded(SEQS, "left")
    with torch.no_grad():
        ref = base(ids, attention_mask=mask, output_hidden_states=True)
        out = m(ids, attention_mask=mask, output_hidden_states=True)
    assert out.logits.shape == ref.logits.shape
    assert len(out.hidden_states) == len(ref.hidden_states)
    assert [h.shape for h in out.hidden_states] == [h.shape for h in ref.hidden_states]
    labels = ids.masked_fill(mask == 0, -100)
    loss = m(ids, attention_mask=mask, labels=labels).loss
    assert loss.ndim == 0 and torch.isfinite(loss)
    # the loss is the base model's formula on the logits we return, i.e. labels line up with the user's tokens
    logits = m(ids, attention_mask=mask).logits
    expect = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                                               ignore_index=-100)
    torch.testing.assert_close(loss, expect)


@all_methods
def test_gpt2_outputs_have_base_shape(method):
    m = adapted(gpt2, method)
    ids = torch.tensor([SEQS[0]])
    with torch.no_grad():
        out = m(ids, labels=ids, output_hidden_states=True)
    assert out.logits.shape == (1, len(SEQS[0]), V)
    assert all(h.shape == (1, len(SEQS[0]), 32) for h in out.hidden_states)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:]))


def test_disabled_gives_base_outputs():
    base = llama()
    ids, mask = padded(SEQS, "left")
    with torch.no_grad():
        ref = base(ids, attention_mask=mask).logits
        for method in METHODS:
            m = adapted(llama, method)
            assert not torch.allclose(m(ids, attention_mask=mask).logits, ref)
            with ps.disabled(m):
                assert torch.equal(m(ids, attention_mask=mask).logits, ref), method


# ---------------------------------------------------------------- cached generation == uncached greedy
def greedy(m, ids, mask, n, position_ids=False):
    """Uncached greedy decoding: the whole sequence through forward at every step. Like generate(), a row that
    has emitted the end-of-sequence token gets padding from then on."""
    eos = m.config.eos_token_id
    done = torch.zeros(ids.shape[0], 1, dtype=torch.bool)
    for _ in range(n):
        kw = {"position_ids": follow_mask(mask)} if position_ids else {}
        with torch.no_grad():
            nxt = m(ids, attention_mask=mask, use_cache=False, **kw).logits[:, -1].argmax(-1, keepdim=True)
        if eos is not None:
            nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
            done |= torch.isin(nxt, torch.tensor(eos if isinstance(eos, list) else [eos]))
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


@all_methods
@pytest.mark.parametrize("factory", [llama, gpt2])
def test_generate_matches_uncached_greedy(method, factory):
    m = adapted(factory, method)
    for ids, mask in [(torch.tensor([SEQS[0]]), torch.ones(1, len(SEQS[0]), dtype=torch.long)),
                      padded(SEQS, "left")]:
        with torch.no_grad():
            got = m.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
        # GPT-2's absolute positions follow the mask in generate(); the reference passes them alike
        assert got.tolist() == greedy(m, ids, mask, 6, position_ids=factory is gpt2).tolist()


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning"])
def test_t5_generate(method):
    m = adapted(t5, method)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        got = m.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        dec = torch.tensor([[0]])
        for _ in range(5):
            nxt = m(input_ids=ids, decoder_input_ids=dec, use_cache=False).logits[:, -1:].argmax(-1)
            dec = torch.cat([dec, nxt], 1)
        with ps.disabled(m):
            plain = m.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
            plain_logits = m(input_ids=ids, decoder_input_ids=dec).logits
        base = t5()
        base_plain = base.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert got.tolist() == dec.tolist()
    assert torch.equal(plain, base_plain)   # disabled: the base model's own generation
    with torch.no_grad():
        assert torch.equal(plain_logits, base(input_ids=ids, decoder_input_ids=dec).logits)
    labels = torch.tensor([[3, 4, 5]])
    out = m(input_ids=ids, labels=labels)
    assert out.logits.shape == (1, 3, V) and out.encoder_last_hidden_state.shape == (1, 5, 32)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits[0], labels[0]))


# ---------------------------------------------------------------- gradient checkpointing trains
@pytest.mark.parametrize("method,extra", [(k, {}) for k in METHODS] + [("prefix-tuning", {"projection": 8})],
                         ids=list(METHODS) + ["prefix-tuning-projection"])
def test_gradient_checkpointing_trains(method, extra):
    ids, mask = padded(SEQS, "right")
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for checkpointing in (False, True):
        m = adapted(llama, method, **extra)
        if checkpointing:
            m.gradient_checkpointing_enable()
            assert m.is_gradient_checkpointing
        m.train()
        loss = m(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        named = {n: p for n, p in m.named_parameters() if p.requires_grad}
        assert named and all(n.startswith("_peftsurgery.") for n in named)
        assert all(p.grad is None for n, p in m.named_parameters() if not p.requires_grad)
        grads.append({n: p.grad for n, p in named.items()})
    for n, g in grads[1].items():
        assert g is not None and g.abs().sum() > 0, n
        torch.testing.assert_close(g, grads[0][n], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- prefix reparameterisation folds on save
def test_prefix_projection_saves_folded(tmp_path):
    m = adapted(llama, "prefix-tuning", projection=16)
    ids, mask = padded(SEQS, "left")
    with torch.no_grad():
        ref = m(ids, attention_mask=mask).logits
    ps.save(m, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    assert meta["config"]["projection"] == 16   # the user's config is saved as given, the MLP folded away
    assert meta["trainable_parameters"] == ps.budget(m)["trainable"]
    back = ps.load(llama(), str(tmp_path / "ad"))
    assert ps.adapters(back)["default"].config.projection == 16
    assert ps.adapters(back)["default"].records[0].rule.projection == 0
    n_folded = 3 * 2 * (2 * 2 * 8)  # tokens x layers x (key + value) x kv_heads x head_dim
    assert ps.budget(back)["trainable"] == n_folded
    with torch.no_grad():
        torch.testing.assert_close(back(ids, attention_mask=mask).logits, ref, rtol=1e-5, atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["ad"]


def test_prefix_keys_values_are_one_tensor_saved_per_site(tmp_path):
    """All layers' keys and values live in one parameter (one tensor for the optimizer); the file keeps a key and
    a value per site, and inspect() gives each site its share."""
    m = adapted(llama, "prefix-tuning")
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0].shape == (2, 2, 2, 3, 8)  # layers, k/v, kv_heads, tokens, dim
    ps.save(m, tmp_path / "ad")
    names = sorted(safe_open(str(tmp_path / "ad" / "adapter.safetensors"), "pt").keys())
    assert names == [f"0.model/layers/{i}/self_attn.{t}" for i in (0, 1) for t in ("key", "value")]
    assert [r["params"] for r in ps.inspect(m) if r["rule"] == "Prefix"] == [2 * 2 * 3 * 8] * 2
    back = ps.load(llama(), str(tmp_path / "ad"))
    torch.testing.assert_close(ps.adapters(back)["default"].records[0].built["_kv"].kv, trainable[0], rtol=0, atol=0)


# ---------------------------------------------------------------- BERT with token_type_ids
@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning"])
def test_bert_token_type_ids(method):
    base = bert()
    m = adapted(bert, method)
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    tt = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    with torch.no_grad():
        ref = base(input_ids=ids, token_type_ids=tt, attention_mask=mask, output_hidden_states=True)
        out = m(input_ids=ids, token_type_ids=tt, attention_mask=mask, output_hidden_states=True)
        alone = m(input_ids=ids[1:, :3], token_type_ids=tt[1:, :3])
    assert out.last_hidden_state.shape == ref.last_hidden_state.shape == (2, 5, 32)
    assert out.pooler_output.shape == ref.pooler_output.shape
    assert [h.shape for h in out.hidden_states] == [h.shape for h in ref.hidden_states]
    assert not torch.allclose(out.last_hidden_state, ref.last_hidden_state)
    # the padded row equals the same sentence alone, and token types reach the real tokens
    torch.testing.assert_close(out.last_hidden_state[1, :3], alone.last_hidden_state[0], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        other = m(input_ids=ids, token_type_ids=torch.zeros_like(tt), attention_mask=mask)
    assert not torch.allclose(other.last_hidden_state, out.last_hidden_state)


# ---------------------------------------------------------------- the prefix mask, built once per forward
def test_extended_mask_matches_causal_plus_prefix_and_is_reused_only_while_valid():
    from peftsurgery.rewrite.attention import extend_mask
    q = torch.zeros(1, 4, 5, 8)
    for Q, K, n in [(5, 5, 3), (2, 7, 3)]:  # a prompt; a continuation with cached keys
        got = extend_mask(None, q[:, :, :Q], K + n, n, causal=True)
        want = torch.cat([torch.ones(Q, n, dtype=torch.bool), torch.ones(Q, K, dtype=torch.bool).tril(K - Q)], -1)
        assert torch.equal(got[0, 0], want)
        assert extend_mask(None, q[:, :, :Q], K + n, n, causal=True) is got  # the next layer reuses it
    assert extend_mask(None, q, 8, 3, causal=False) is None
    m = torch.zeros(2, 1, 5, 5)
    a = extend_mask(m, q, 8, 3, causal=True)
    assert a.shape == (2, 1, 5, 8) and torch.equal(a[..., 3:], m) and not a[..., :3].any()
    assert extend_mask(m, q, 8, 3, causal=True) is a
    m[0, 0, 0, 0] = float("-inf")  # changed in place: extended anew
    b = extend_mask(m, q, 8, 3, causal=True)
    assert b is not a and b[0, 0, 0, 3] == float("-inf")
    assert extend_mask(m.clone(), q, 8, 3, causal=True) is not b  # another tensor, even if equal
    gone = weakref.ref(b)
    del a, b, m
    gc.collect()
    assert gone() is None  # an extended mask is not kept beyond the life of the mask it extends


# ---------------------------------------------------------------- prefix keys attended apart while decoding
@pytest.mark.parametrize("kernel", ["cpu-flash", "recomputed"])
@pytest.mark.parametrize("mask_kind", ["bool", "additive -inf", "additive lowest"])
@pytest.mark.parametrize("per_row", [False, True])
def test_a_decoding_step_attended_apart_equals_attention_over_both(monkeypatch, kernel, mask_kind, per_row):
    """attention._own + _merged, one query per row, against softmax attention over the added keys followed by the
    call's own: grouped-query heads (8 query heads, 2 cache heads, 1 prefix head), a padded row, a row whose own
    keys are all masked out (it attends to the added keys alone), and per-row added keys of which a row sees some
    or, for one row, none (its own keys alone)."""
    from peftsurgery.rewrite import attention
    if kernel == "recomputed":
        monkeypatch.setattr(attention, "_FLASH_CPU", None)
    g = torch.Generator().manual_seed(0)
    b, h, kvh, L, n, d = 4, 8, 2, 7, 3, 16
    q, key, value = (torch.randn(*s_, generator=g) for s_ in ((b, h, 1, d), (b, kvh, L, d), (b, kvh, L, d)))
    seen = torch.ones(b, 1, 1, L, dtype=torch.bool)
    seen[1, ..., :3] = False   # padding
    seen[2] = False            # none of its own keys
    if per_row:
        pk, pv = torch.randn(b, 1, n, d, generator=g), torch.randn(b, 1, n, d, generator=g)
        visible = torch.tensor([[True, True, True], [False, True, True], [True, False, True], [False] * 3])
    else:
        pk, pv, visible = torch.randn(1, n, d, generator=g), torch.randn(1, n, d, generator=g), None
    mask = {"bool": seen, "additive -inf": torch.zeros(seen.shape).masked_fill(~seen, float("-inf")),
            "additive lowest": torch.zeros(seen.shape).masked_fill(~seen, torch.finfo(torch.float32).min)}[mask_kind]
    def own():   # the model's own attention over its keys, as transformers' sdpa function returns it
        return torch.nn.functional.scaled_dot_product_attention(
            q, key.repeat_interleave(h // kvh, 1), value.repeat_interleave(h // kvh, 1), attn_mask=mask).transpose(1, 2)

    out, lse = attention._own(own, q, key, value, mask, None)
    got = attention._merged(out, lse, q, None, pk, pv, visible)
    keys, values = (torch.cat([x.expand(b, 1, n, d).repeat_interleave(kvh, 1), y], -2).repeat_interleave(h // kvh, 1)
                    for x, y in ((pk, key), (pv, value)))
    sees = torch.cat([torch.ones(b, 1, 1, n, dtype=torch.bool) if visible is None else visible[:, None, None],
                      seen], -1)
    scores = (q @ keys.transpose(-1, -2) * d ** -0.5).masked_fill(~sees, float("-inf"))
    want = (scores.softmax(-1) @ values).transpose(1, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel", ["cpu-flash", "recomputed"])
@pytest.mark.parametrize("arch,adapters", [("llama", 1), ("llama", 2), ("falcon", 1)])
def test_decoding_attends_prefix_apart_from_the_cache_as_if_prepended(monkeypatch, arch, adapters, kernel):
    """A decoding step (one query per row, no gradients) attends to the prefix apart from the cached keys and merges
    the two by log-sum-exp, copying nothing into the cache's tensors: the logits are those of prepending the prefix
    (the path every other call takes), with left padding, grouped-query heads and two prefix adapters at once; at
    transformers' attention registry (llama) and at a module's own F.scaled_dot_product_attention call (falcon).
    The log-sum-exp over the cache comes from the CPU's flash kernel, or (other devices) from the scores computed
    again beside the model's own attention."""
    from peftsurgery.rewrite import attention
    from zoo import FACTORIES
    flash = attention._FLASH_CPU
    assert flash is not None   # this torch has the kernel the CPU path relies on
    flashed = []
    monkeypatch.setattr(attention, "_FLASH_CPU", None if kernel == "recomputed" else
                        lambda *a, **kw: flashed.append(1) or flash(*a, **kw))
    m = llama() if arch == "llama" else FACTORIES[arch]()
    for i in range(adapters):
        ps.apply(m, "prefix-tuning", name=f"p{i}", num_tokens=3 + i, init="random")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, 1.0, generator=g)   # a prefix large enough to matter
    ids = torch.randint(3, V, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[2, :4] = 0
    steps = [torch.randint(3, V, (3, 1), generator=g) for _ in range(3)]

    def decode():
        out = []
        with torch.no_grad():
            cache = m(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
            am = mask
            for t in steps:
                am = torch.cat([am, torch.ones_like(t)], 1)
                res = m(input_ids=t, attention_mask=am, past_key_values=cache, use_cache=True)
                out.append(res.logits)
        return torch.cat(out, 1)

    calls = []
    merged = attention._merged
    monkeypatch.setattr(attention, "_merged", lambda *a: calls.append(a) or merged(*a))
    got = decode()
    assert len(calls) == 2 * len(steps)   # every layer of every step took it, none of the prompt's calls
    assert len(flashed) == (len(calls) if kernel == "cpu-flash" else 0)
    assert calls[0][-2].shape[-2] == sum(3 + i for i in range(adapters))   # every adapter's keys
    monkeypatch.setattr(attention, "_apart", lambda *a: None)   # the reference: prepended, as in training
    want = decode()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with ps.disabled(m):
        assert (decode() - want).abs().max() > 1e-2   # the prefix matters here


# ---------------------------------------------------------------- a prompt attended apart from the cache
def _prompt_decode(m, ids, mask, steps, fill):
    """Logits of a prefill and decoding steps (each step's token after the mask), and the cache's length after the
    prefill: with fill, an empty cache is passed to the prefill (as generate() does); without, the model makes
    its own."""
    kw = {"past_key_values": tf.DynamicCache(config=m.config)} if fill else {}
    with torch.no_grad():
        out = m(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
        cache, logits, held = out.past_key_values, [out.logits], out.past_key_values.get_seq_length()
        for t in steps:
            mask = torch.cat([mask, torch.ones_like(t)], 1)
            logits.append(m(input_ids=t, attention_mask=mask, past_key_values=cache, use_cache=True).logits)
    return torch.cat(logits, 1), held


@pytest.mark.parametrize("arch", ["llama", "gpt2", "falcon", "mixtral"])
def test_decoding_attends_a_prompt_apart_from_the_cache_as_in_the_sequence(monkeypatch, arch):
    """Prompt tuning on a causal decoder: a prefill given an empty cache runs the prompt alone once and every layer
    adds its keys and values as a prefix's, so the cache holds the real tokens only and each decoding step attends
    to the prompt apart, merged by log-sum-exp. The logits are those of the prompt in the sequence (what a model
    that makes its own cache, and training, compute), with left padding and grouped-query heads (llama), absolute
    position embeddings (gpt2), attention in the model's own code (falcon) and a mixture of experts (mixtral); the
    same after a deep copy of the model."""
    import copy

    from peftsurgery.rewrite import attention
    from zoo import FACTORIES
    m = llama() if arch == "llama" else gpt2() if arch == "gpt2" else FACTORIES[arch]()
    ps.apply(m, "prompt-tuning", num_tokens=4, init="random")
    with torch.no_grad():
        next(m._peftsurgery.parameters()).normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    assert "attended apart from the cache" in ps.inspect(m)[0]["what"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[2, :4] = 0
    steps = [torch.randint(3, V, (3, 1), generator=g) for _ in range(3)]
    calls = []
    merged = attention._merged
    monkeypatch.setattr(attention, "_merged", lambda *a: calls.append(a) or merged(*a))
    got, held = _prompt_decode(m, ids, mask, steps, fill=True)
    layers = m.config.num_hidden_layers
    assert held == 6 and len(calls) == layers * len(steps)   # the prompt is not in the cache; every step merged it
    want, held = _prompt_decode(m, ids, mask, steps, fill=False)
    assert held == 6 + 4 and len(calls) == layers * len(steps)   # in the sequence: cached, nothing merged
    real = torch.cat([mask] + [torch.ones_like(t) for t in steps], 1).bool()   # what padding positions give differs
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(_prompt_decode(copy.deepcopy(m), ids, mask, steps, fill=True)[0][real], want[real],
                               atol=1e-5, rtol=0)
    with ps.disabled(m):
        assert (_prompt_decode(m, ids, mask, steps, fill=True)[0] - want)[real].abs().max() > 1e-2   # it matters


def test_a_prompt_trained_through_a_cache_stays_in_the_sequence():
    """With gradients the prompt is in the sequence even where a cache is filled: its gradient is the one of a call
    without a cache."""
    m = adapted(llama, "prompt-tuning")
    ids = torch.tensor([SEQS[0]])
    prompt = next(m._peftsurgery.parameters())
    grads = []
    for kw in ({"past_key_values": tf.DynamicCache(config=m.config), "use_cache": True}, {"use_cache": False}):
        prompt.grad = None
        m(input_ids=ids, **kw).logits.sum().backward()
        grads.append(prompt.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=0)


def _jamba():
    torch.manual_seed(0)
    return tf.JambaForCausalLM(tf.JambaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=4, mamba_d_state=8,
        mamba_expand=2, mamba_dt_rank=8, use_mamba_kernels=False, pad_token_id=PAD, bos_token_id=1,
        eos_token_id=2)).eval()


def _windowed():
    torch.manual_seed(0)
    return tf.MistralForCausalLM(tf.MistralConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=12, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)).eval()


@pytest.mark.parametrize("make,dtype", [(bert, "float32"), (_jamba, "float32"), (_jamba, "bfloat16"),
                                        (_windowed, "float32"), ("bloom", "float32")],
                         ids=["bidirectional", "recurrent layers", "recurrent layers, bf16", "sliding window", "alibi"])
def test_a_prompt_stays_in_the_sequence_where_apart_would_compute_otherwise(make, dtype):
    """Where attending to the prompt apart would change what the model computes, the prompt stays in the sequence
    (and in the cache): the prompt sees the real tokens (BERT), reaches them through a recurrent state as well
    (Jamba's Mamba layers; in bfloat16 too, where that is within rounding of the prompt's whole effect), leaves a
    sliding window (of 12 tokens: longer than the example inputs, so apply sees no difference; generation goes
    past it), or gets a position bias (ALiBi)."""
    from zoo import FACTORIES
    m = (FACTORIES[make]() if isinstance(make, str) else make()).to(getattr(torch, dtype))
    ps.apply(m, "prompt-tuning", num_tokens=3, init="random")
    assert "apart" not in ps.inspect(m)[0]["what"]
    if make is not bert and dtype == "float32":
        ids, mask = torch.tensor([SEQS[0]]), torch.ones(1, len(SEQS[0]), dtype=torch.long)
        with torch.no_grad():
            got = m.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
        assert got.tolist() == greedy(m, ids, mask, 8).tolist()


def test_two_prompts_at_once_are_one_prompt_of_both():
    """Two prompt adapters on at once put their tokens in front of each other and both are taken out of the outputs
    (the last one placed first; the first prompt's positions stayed in the logits before): the logits are those of
    one prompt holding the second's vectors then the first's, with left padding, also through a cache."""
    m, one = llama(), llama()
    ps.apply(m, "prompt-tuning", name="p", num_tokens=4, init="random")
    ps.apply(m, "prompt-tuning", name="o", num_tokens=2, init="random", seed=1)
    w = {n: next(iter(ps.adapters(m)[n].records[0].built.values())).weight for n in ("p", "o")}
    ps.apply(one, "prompt-tuning", num_tokens=6)
    with torch.no_grad():
        next(one._peftsurgery.parameters()).copy_(torch.cat([w["o"], w["p"]]))
    ids, mask = padded(SEQS, "left")
    real = mask.bool()
    with torch.no_grad():
        for kw in ({}, {"past_key_values": tf.DynamicCache(config=m.config), "use_cache": True}):
            got = m(input_ids=ids, attention_mask=mask, **kw).logits
            assert got.shape == (*ids.shape, V)
            torch.testing.assert_close(got[real], one(input_ids=ids, attention_mask=mask).logits[real], atol=1e-5,
                                       rtol=0)


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning"])
def test_generate_in_several_threads_at_once_is_generate_alone(method):
    """Threads generating on one model at once (a server) each get what generating alone gives: what a call holds
    at the entry (its layout, its padding, a prompt run alone for its keys and values, the keys and values it adds)
    is per thread. With one flag for the whole model, a thread recording its prompt made the others run without it."""
    import threading
    m = adapted(llama, method)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(3, V, (2, 5 + i), generator=g) for i in range(6)]

    def gen(ids):
        with torch.no_grad():
            return m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                              do_sample=False, pad_token_id=PAD)
    want = [gen(x) for x in inputs]
    for _ in range(3):
        got = [None] * len(inputs)
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, gen(inputs[i]))) for i in range(len(inputs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(a is not None and torch.equal(a, b) for a, b in zip(got, want))


def _git():
    torch.manual_seed(0)
    cfg = tf.GitConfig(vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                          num_attention_heads=4, image_size=16, patch_size=8),
                       vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)
    return tf.GitForCausalLM(cfg).eval()


def _voxtral():
    torch.manual_seed(0)
    text = dict(model_type="llama", vocab_size=132, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return tf.VoxtralForConditionalGeneration(tf.VoxtralConfig(
        text_config=text, audio_token_id=128,
        audio_config=dict(model_type="voxtral_encoder", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=4, num_mel_bins=16, max_source_positions=16, head_dim=16))).eval()


@pytest.mark.parametrize("make, media", [(_git, "pixel_values"), (_voxtral, "input_features")], ids=["git", "voxtral"])
def test_media_beside_the_token_ids_are_refused_not_lost(make, media):
    """An image's or a sound's features passed beside the ids, which the virtual tokens turn into embeddings:
    Voxtral and Qwen2-Audio merge their sound only when given the ids (it was ignored: the same logits for any
    sound), GIT puts its image's tokens in front (16 logits for 13, shifted). Located on the ids alone (a model
    taking sounds as placeholder tokens among the ids runs without them), the call with media is refused in one
    line; apply refuses them among the example inputs, leaving the model as it was."""
    g = torch.Generator().manual_seed(0)
    model = make()
    ids = torch.randint(3, 128, (2, 12), generator=g)
    if media == "input_features":
        ids[:, 2:10] = 128   # the sound's placeholder tokens (8 per 32 frames)
        features = torch.randn(2, 16, 32, generator=g)
    else:
        features = torch.randn(2, 3, 16, 16, generator=g)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ps.SurgeryError, match=rf"prompt-tuning: \w+ is given {media} beside the token ids") as e:
        ps.apply(model, "prompt-tuning", num_tokens=3, example_inputs={"input_ids": ids, media: features,
                                                                      "use_cache": False})
    assert "\n" not in str(e.value) and not ps.adapters(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    ps.apply(model, "prompt-tuning", num_tokens=3, example_inputs={"input_ids": ids[:, 10:], "use_cache": False})
    with torch.no_grad():
        assert model(input_ids=ids[:, 10:]).logits.shape[:2] == (2, 2)
        with pytest.raises(ps.SurgeryError, match="call it with token ids alone"):
            model(input_ids=ids, **{media: features})
        assert model(input_ids=ids[:, 10:]).logits.shape[:2] == (2, 2)   # nothing left pending


class _OwnTokens(nn.Module):
    """Puts two learned tokens of its own in front of the embedded ids (as models with register tokens do)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.own = torch.nn.Embedding(V, 32), torch.nn.Parameter(torch.randn(1, 2, 32))
        self.qkv, self.head = torch.nn.Linear(32, 96), torch.nn.Linear(32, V)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        h = torch.cat([self.own.expand(h.shape[0], -1, -1), h], 1)
        q, k, v = (t.view(*h.shape[:2], 4, 8).transpose(1, 2) for t in self.qkv(h).split(32, -1))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(h + a.transpose(1, 2).reshape(h.shape))


def test_a_model_adding_positions_of_its_own_around_the_prompt_is_refused_not_misread():
    """Where the entry returns more positions than the tokens and virtual tokens it was given, where the virtual
    tokens sit in its outputs is unknown: refused in one line, the model left as it was."""
    model = _OwnTokens().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ps.SurgeryError, match=r"prompt-tuning: _OwnTokens returned 13 positions for 8 tokens and 3 "
                                              r"virtual ones: it adds positions of its own") as e:
        ps.apply(model, "prompt-tuning", num_tokens=3, example_inputs={"input_ids": torch.ones(1, 8, dtype=torch.long)})
    assert "\n" not in str(e.value) and not ps.adapters(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_model_taking_sounds_as_placeholder_tokens_is_located_on_the_ids_alone():
    """The guessed example inputs held a sound's features with no placeholder tokens among the ids, on which the
    bare model fails: every method was refused on Voxtral and Qwen2-Audio."""
    from peftsurgery.locate import example_inputs
    model = _voxtral()
    assert set(example_inputs(model)) == {"input_ids", "attention_mask", "use_cache"}
    ps.apply(model, "lora")
    assert any(r["role"] == "attn.q" for r in ps.inspect(model))


class _DictLM(nn.Module):
    """Returns a plain dict, as some hand-written models do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.qkv, self.head = nn.Embedding(V, 16), nn.Linear(16, 48), nn.Linear(16, V)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        q, k, v = (t.view(*h.shape[:2], 2, 8).transpose(1, 2) for t in self.qkv(h).split(16, -1))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        return {"logits": self.head(h + a.reshape(h.shape))}


def test_prompt_tuning_on_a_model_returning_a_plain_dict():
    """The entry's output is read for its positions by its first value (a dict has no item 0)."""
    model = _DictLM()
    ps.apply(model, "prompt-tuning", num_tokens=2, example_inputs={"input_ids": torch.ones(1, 5, dtype=torch.long)})
    assert model(input_ids=torch.ones(2, 5, dtype=torch.long))["logits"].shape == (2, 5, V)
