"""Shared tiny-model factories (random weights, vocab 128, eval mode, torch.manual_seed(0))."""
import torch
import transformers as tf

VOCAB = 128


def _build(config_cls, model_cls, overrides, **defaults):
    torch.manual_seed(0)
    cfg = config_cls(**{**defaults, **overrides})
    return model_cls(cfg).eval()


def tiny_llama(**overrides):
    return _build(tf.LlamaConfig, tf.LlamaForCausalLM, overrides, vocab_size=VOCAB, hidden_size=32,
                  intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, attn_implementation="sdpa")


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
