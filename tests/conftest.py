"""Shared tiny-model factories (random weights, vocab 128, eval mode, torch.manual_seed(0)) and the hypothesis
profiles: `ci` (the default: derandomized, the same examples on every run) and `deep` (hundreds of random
examples; select it with PEFTSURGERY_HYPOTHESIS=deep, see README "Tests")."""
import os

import pytest
import torch
import transformers as tf
from hypothesis import HealthCheck, Phase, settings

from peftsurgery import SurgeryError
from peftsurgery.registry import manager

# No shrinking by default: each example costs a model export (~0.5 s) and shrinking a failure can take many
# minutes; the falsifying example is still printed. PEFTSURGERY_PROPERTY_SHRINK=1 turns it on.
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate] + (
    [Phase.shrink] if os.environ.get("PEFTSURGERY_PROPERTY_SHRINK") else [])
_COMMON = dict(deadline=None, database=None, phases=_PHASES, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
settings.register_profile("ci", derandomize=True, max_examples=6, **_COMMON)
settings.register_profile("deep", derandomize=False, max_examples=300, **_COMMON)
settings.load_profile(os.environ.get("PEFTSURGERY_HYPOTHESIS", "ci"))

VOCAB = 128


def _build(config_cls, model_cls, overrides, **defaults):
    torch.manual_seed(0)
    cfg = config_cls(**{**defaults, **overrides})
    return model_cls(cfg).eval()


def tiny_llama(**overrides):
    return _build(tf.LlamaConfig, tf.LlamaForCausalLM, overrides, vocab_size=VOCAB, hidden_size=32,
                  intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, attn_implementation="sdpa")


def tiny_llama_4bit(**overrides):
    """A tiny Llama whose linears bitsandbytes' 4-bit layers take on every CPU (in_features 64 or 128: on CPUs
    with AVX-512, widths that are multiples of 16 but not of 64 are refused, see README qlora)."""
    return tiny_llama(**{"hidden_size": 64, "intermediate_size": 128, "head_dim": 16, **overrides})


def tiny_qwen2(**overrides):
    return _build(tf.Qwen2Config, tf.Qwen2ForCausalLM, overrides, vocab_size=VOCAB, hidden_size=32,
                  intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, attn_implementation="sdpa")


def tiny_gpt2(**overrides):
    return _build(tf.GPT2Config, tf.GPT2LMHeadModel, overrides, vocab_size=VOCAB, n_embd=32, n_layer=2,
                  n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0,
                  attn_implementation="sdpa")


def tiny_bert(**overrides):
    return _build(tf.BertConfig, tf.BertModel, overrides, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
                  attn_implementation="sdpa")


def tiny_t5(**overrides):
    return _build(tf.T5Config, tf.T5ForConditionalGeneration, overrides, vocab_size=VOCAB, d_model=32, d_kv=8,
                  d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                  attn_implementation="sdpa")


def raises_one_line(fn, *needles) -> str:
    """fn() raises a one-line SurgeryError containing every needle; returns the message."""
    with pytest.raises(SurgeryError) as e:
        fn()
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


@pytest.fixture
def registered():
    """register(plugin, name) as tests and users do, unregistered afterwards; returns the name."""
    names = []

    def register(plugin, name):
        manager().register(plugin, name=name)
        names.append(name)
        return name
    yield register
    for n in names:
        manager().unregister(name=n)
