"""Numerical parity with the reference implementation, PEFT 0.21.2, on identical tiny base models.

PEFT's weights are copied into ours (after giving the zero-started parts random values, so the comparison is
not trivial); logits must then agree to 1e-5.

Where the two differ by design: PEFT gives left-padded sequences positions that do not follow the attention mask,
so with prompts or prefixes on a rotary model its left-padded logits depend on the amount of padding. Ours do not
(design.md: "virtual tokens behave as if they sat immediately before the first real token"); there the test
checks that our left-padded logits equal PEFT's logits for the same sequence without padding.
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

import peftsurgery as ps

peft = pytest.importorskip("peft")

V, P = 128, 4
ATOL = 1e-5


def llama():
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)).eval()


def gpt2():
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                            bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()


def branches(model):
    return model._peftsurgery["default"][0]


def close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
RIGHT = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
LEFT_IDS = torch.tensor([[0, 0, 11, 12, 13, 14]])
LEFT = torch.tensor([[0, 0, 1, 1, 1, 1]])


# ---------------------------------------------------------------- LoRA
@pytest.mark.parametrize("factory,targets,ours_targets,n_sites", [
    (llama, ["q_proj", "v_proj"], "attn.q,attn.v", 4),
    (gpt2, ["c_attn"], "attn.qkv", 2),
], ids=["llama", "gpt2"])
def test_lora_parity(factory, targets, ours_targets, n_sites):
    base = factory()
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
        fan_in_fan_out=factory is gpt2)).eval()
    ours = ps.apply(copy.deepcopy(base), "lora", r=4, alpha=8, targets=ours_targets)
    g = torch.Generator().manual_seed(3)
    copied = 0
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if not (hasattr(mod, "lora_A") and "default" in mod.lora_A):
                continue
            mod.lora_B["default"].weight.normal_(generator=g)
            path = name.removeprefix("base_model.model.")
            b = branches(ours)[path.replace(".", "/")]
            assert b.A.weight.shape == mod.lora_A["default"].weight.shape
            b.A.weight.copy_(mod.lora_A["default"].weight)
            b.B.weight.copy_(mod.lora_B["default"].weight)
            assert b.scale == mod.scaling["default"]
            copied += 1
    assert copied == n_sites == len(branches(ours))
    with torch.no_grad():
        want = ref(IDS, attention_mask=RIGHT).logits
        assert (want - base(IDS, attention_mask=RIGHT).logits).abs().max() > 1e-2  # the update matters
        close(ours(IDS, attention_mask=RIGHT).logits, want)
        close(ours(IDS).logits, ref(IDS).logits)
        ps.merge(ours)
        close(ours(IDS).logits, ref(IDS).logits)


# ---------------------------------------------------------------- prompt tuning
@pytest.fixture(scope="module")
def prompt_pair():
    base = llama()
    ref = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P)).eval()
    ours = ps.apply(copy.deepcopy(base), "prompt-tuning", num_tokens=P)
    with torch.no_grad():
        w = ref.prompt_encoder["default"].embedding.weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(4)))
        branches(ours)["model/embed_tokens"].weight.copy_(w)
    return ref, ours


def test_prompt_tuning_parity_no_mask(prompt_pair):
    ref, ours = prompt_pair
    with torch.no_grad():
        want = ref(IDS).logits
        assert want.shape == (2, P + IDS.shape[1], V)  # PEFT's logits include the virtual positions
        got = ours(IDS).logits
    assert got.shape == (2, IDS.shape[1], V)
    close(got, want[:, P:])


def test_prompt_tuning_parity_right_padding(prompt_pair):
    ref, ours = prompt_pair
    with torch.no_grad():
        want = ref(IDS, attention_mask=RIGHT).logits[:, P:]
        got = ours(IDS, attention_mask=RIGHT).logits
    real = RIGHT.bool()
    close(got[real], want[real])


def test_prompt_tuning_left_padding_equals_reference_unpadded(prompt_pair):
    ref, ours = prompt_pair
    with torch.no_grad():
        want = ref(LEFT_IDS[:, 2:]).logits[:, P:]
        got = ours(LEFT_IDS, attention_mask=LEFT).logits
    close(got[:, 2:], want)


# ---------------------------------------------------------------- prefix tuning
@pytest.fixture(scope="module")
def prefix_pair():
    base = llama()
    ref = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=False)).eval()
    ours = ps.apply(copy.deepcopy(base), "prefix-tuning", num_tokens=P, init="random")
    layers, kv_heads, head_dim = 2, 2, 8
    with torch.no_grad():
        w = ref.prompt_encoder["default"].embedding.weight
        assert w.shape == (P, layers * 2 * kv_heads * head_dim)
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(5)))
        kv = w.view(P, layers * 2, kv_heads, head_dim)
        for layer in range(layers):
            site = branches(ours)[f"model/layers/{layer}/self_attn"]
            assert site.key.shape == (kv_heads, P, head_dim)
            site.key.copy_(kv[:, 2 * layer].transpose(0, 1))
            site.value.copy_(kv[:, 2 * layer + 1].transpose(0, 1))
    return base, ref, ours


def test_prefix_tuning_parity_no_mask(prefix_pair):
    base, ref, ours = prefix_pair
    with torch.no_grad():
        want = ref(IDS).logits
        assert want.shape == (2, IDS.shape[1], V)
        assert (want - base(IDS).logits).abs().max() > 1e-2
        close(ours(IDS).logits, want)


def test_prefix_tuning_parity_with_mask(prefix_pair):
    _, ref, ours = prefix_pair
    with torch.no_grad():
        want = ref(IDS, attention_mask=RIGHT).logits
        got = ours(IDS, attention_mask=RIGHT).logits
    real = RIGHT.bool()
    close(got[real], want[real])
    with torch.no_grad():
        close(ours(IDS, attention_mask=torch.ones_like(IDS)).logits, ref(IDS, attention_mask=torch.ones_like(IDS)).logits)


def test_prefix_tuning_left_padding_equals_reference_unpadded(prefix_pair):
    _, ref, ours = prefix_pair
    with torch.no_grad():
        want = ref(LEFT_IDS[:, 2:]).logits
        got = ours(LEFT_IDS, attention_mask=LEFT).logits
    close(got[:, 2:], want)


def test_prefix_tuning_generate_matches_reference(prefix_pair):
    _, ref, ours = prefix_pair
    ids = IDS[:1]
    with torch.no_grad():
        want = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                            pad_token_id=0)
        got = ours.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                            pad_token_id=0)
    assert got.tolist() == want.tolist()
