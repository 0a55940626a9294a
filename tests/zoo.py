"""Tiny-config factories for the architecture zoo (tests/test_zoo.py): random weights, vocab 128, one or two
layers, eval mode, torch.manual_seed(0). Hidden 64 and linear input widths multiples of 64 (or not of 16), so
that bitsandbytes' 4-bit layers take them on every CPU (see conftest.tiny_llama_4bit); the hand-written TokensLM
and MHANet are 16 wide. No model hub: every model is built from its config."""
from __future__ import annotations

import math

import torch
import transformers as tf
from torch import nn

try:
    from conftest import VOCAB
    from test_core import MHANet, TokensLM
    from test_properties import CustomLM
except ImportError:  # tests/ collected as a package
    from tests.conftest import VOCAB
    from tests.test_core import MHANet, TokensLM
    from tests.test_properties import CustomLM

V = VOCAB
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def hf(config_cls, model_cls, **values):
    def build():
        torch.manual_seed(0)
        return getattr(tf, model_cls)(getattr(tf, config_cls)(**values)).eval()
    build.__name__ = model_cls
    return build


def module(make, name=None):
    def build():
        torch.manual_seed(0)
        return make().eval()
    build.__name__ = name or make.__name__
    return build


# Llama-style decoders: hidden 64, heads 4 x 16, 2 key/value heads, MLP 128 (every width a multiple of 64)
LLAMA_LIKE = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, **IDS)
ENCODER = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=128, **IDS)

class EinsumAttention(nn.Module):
    """Attention written by hand: a fused qkv projection split by chunk, einsum score and value products, and a
    causal mask buffer sliced to the keys and applied with torch.where."""

    def __init__(self, dim: int, heads: int, max_len: int = 64):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.register_buffer("causal", torch.ones(max_len, max_len, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = (t.view(B, S, self.heads, -1) for t in self.qkv(x).chunk(3, dim=-1))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        scores = torch.where(self.causal[:S, :S], scores, torch.finfo(scores.dtype).min)
        return self.out(torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, S, -1))


class EinsumLM(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(V, dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.attns = nn.ModuleList(EinsumAttention(dim, heads) for _ in range(layers))
        self.head = nn.Linear(dim, V)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for norm, attn in zip(self.norms, self.attns):
            h = h + attn(norm(h))
        return self.head(h)


FACTORIES = {
    # ---- decoders people fine-tune
    "llama": hf("LlamaConfig", "LlamaForCausalLM", **LLAMA_LIKE, head_dim=16),
    "qwen2": hf("Qwen2Config", "Qwen2ForCausalLM", **LLAMA_LIKE),
    "qwen3": hf("Qwen3Config", "Qwen3ForCausalLM", **LLAMA_LIKE, head_dim=16),
    "mistral": hf("MistralConfig", "MistralForCausalLM", **LLAMA_LIKE, head_dim=16, sliding_window=None),
    "gemma": hf("GemmaConfig", "GemmaForCausalLM", **LLAMA_LIKE, head_dim=16),
    "gemma2": hf("Gemma2Config", "Gemma2ForCausalLM", **LLAMA_LIKE, head_dim=16, sliding_window=64),
    "phi": hf("PhiConfig", "PhiForCausalLM", **{k: v for k, v in LLAMA_LIKE.items()
                                                   if k != "num_key_value_heads"}),
    "phi3": hf("Phi3Config", "Phi3ForCausalLM", **LLAMA_LIKE, original_max_position_embeddings=128),
    "gpt2": hf("GPT2Config", "GPT2LMHeadModel", vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=128,
               **IDS),
    "gptj": hf("GPTJConfig", "GPTJForCausalLM", vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=128,
               rotary_dim=8, **IDS),
    "gpt_neox": hf("GPTNeoXConfig", "GPTNeoXForCausalLM", vocab_size=V, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128, **IDS),
    "opt": hf("OPTConfig", "OPTForCausalLM", vocab_size=V, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64, **IDS),
    "falcon": hf("FalconConfig", "FalconForCausalLM", vocab_size=V, hidden_size=64, num_hidden_layers=2,
                 num_attention_heads=4, new_decoder_architecture=False, multi_query=True, **IDS),
    "bloom": hf("BloomConfig", "BloomForCausalLM", vocab_size=V, hidden_size=64, n_layer=2, n_head=4, **IDS),
    "gpt_bigcode": hf("GPTBigCodeConfig", "GPTBigCodeForCausalLM", vocab_size=V, n_embd=64, n_layer=2, n_head=4,
                      n_positions=128, multi_query=True, **IDS),
    "stablelm": hf("StableLmConfig", "StableLmForCausalLM", **LLAMA_LIKE),
    "starcoder2": hf("Starcoder2Config", "Starcoder2ForCausalLM", **LLAMA_LIKE, sliding_window=None),
    "olmo": hf("OlmoConfig", "OlmoForCausalLM", **LLAMA_LIKE),
    "cohere": hf("CohereConfig", "CohereForCausalLM", **LLAMA_LIKE),
    "granite": hf("GraniteConfig", "GraniteForCausalLM", **LLAMA_LIKE),
    "gemma3": hf("Gemma3TextConfig", "Gemma3ForCausalLM", **LLAMA_LIKE, head_dim=16),
    "xglm": hf("XGLMConfig", "XGLMForCausalLM", vocab_size=V, d_model=64, ffn_dim=128, num_layers=2,
               attention_heads=4, max_position_embeddings=128, **IDS),   # scores clamped by torch.max
    # ---- mixtures of experts
    "mixtral": hf("MixtralConfig", "MixtralForCausalLM", **LLAMA_LIKE, head_dim=16, num_local_experts=4,
                  num_experts_per_tok=2, sliding_window=None),
    "qwen3_moe": hf("Qwen3MoeConfig", "Qwen3MoeForCausalLM", **LLAMA_LIKE, head_dim=16, num_experts=4,
                    num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1),
    "deepseek_v3": hf("DeepseekV3Config", "DeepseekV3ForCausalLM", **{**LLAMA_LIKE, "num_key_value_heads": 4},
                      moe_intermediate_size=64, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                      n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=64, kv_lora_rank=64,
                      qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16),  # keys 24, values 16
    "qwen2_moe": hf("Qwen2MoeConfig", "Qwen2MoeForCausalLM", **LLAMA_LIKE, num_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=64, shared_expert_intermediate_size=64),   # a 64 -> 1 shared-expert gate
    "granitemoe": hf("GraniteMoeConfig", "GraniteMoeForCausalLM", **LLAMA_LIKE, num_local_experts=4,
                     num_experts_per_tok=2),   # use_cache only through **kwargs
    # ---- encoder-decoders
    "longt5": hf("LongT5Config", "LongT5ForConditionalGeneration", vocab_size=V, d_model=64, d_kv=16, d_ff=128,
                 num_layers=2, num_decoder_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                 eos_token_id=1),   # builds a missing mask only when not traced; casts wo's input to its dtype
    "t5": hf("T5Config", "T5ForConditionalGeneration", vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=2,
             num_decoder_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
    "bart": hf("BartConfig", "BartForConditionalGeneration", vocab_size=V, d_model=64, encoder_layers=1,
               decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
               decoder_ffn_dim=128, max_position_embeddings=128, decoder_start_token_id=2, **IDS),
    "mt5": hf("MT5Config", "MT5ForConditionalGeneration", vocab_size=V, d_model=64, d_kv=16, d_ff=128,
              num_layers=1, num_decoder_layers=1, num_heads=4, decoder_start_token_id=0, pad_token_id=0,
              eos_token_id=1),
    "whisper": hf("WhisperConfig", "WhisperForConditionalGeneration", vocab_size=V, d_model=64, encoder_layers=1,
                  decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                  decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=16, max_target_positions=32,
                  decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  suppress_tokens=[], begin_suppress_tokens=[]),
    # ---- encoders
    "bert": hf("BertConfig", "BertForMaskedLM", **ENCODER),
    "roberta": hf("RobertaConfig", "RobertaForMaskedLM", **{**ENCODER, "max_position_embeddings": 130}),
    "distilbert": hf("DistilBertConfig", "DistilBertForMaskedLM", vocab_size=V, dim=64, n_layers=2, n_heads=4,
                     hidden_dim=128, max_position_embeddings=128, pad_token_id=0),
    "albert": hf("AlbertConfig", "AlbertForMaskedLM", **ENCODER, embedding_size=64),
    "electra": hf("ElectraConfig", "ElectraForMaskedLM", **ENCODER, embedding_size=64),
    "deberta_v2": hf("DebertaV2Config", "DebertaV2ForMaskedLM", **ENCODER, relative_attention=True, position_buckets=16,
                     pos_att_type=["p2c", "c2p"]),
    # ---- vision and speech
    "vit": hf("ViTConfig", "ViTForImageClassification", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=128, image_size=16, patch_size=8, num_channels=3, num_labels=3),
    "clip": hf("CLIPConfig", "CLIPModel", projection_dim=64,
               text_config=dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                num_attention_heads=4, max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
                                eos_token_id=2),
               vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                  image_size=16, patch_size=8, num_channels=3)),
    "wav2vec2": hf("Wav2Vec2Config", "Wav2Vec2ForCTC", vocab_size=V, hidden_size=64, num_hidden_layers=2,
                   num_attention_heads=4, intermediate_size=128, conv_dim=(32, 64), conv_stride=(5, 2),
                   conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                   mask_time_prob=0.0, do_stable_layer_norm=False),
    # ---- state space
    "mamba": hf("MambaConfig", "MambaForCausalLM", vocab_size=V, hidden_size=64, state_size=8,
                num_hidden_layers=2, expand=2, conv_kernel=4, **IDS),
    "mamba2": hf("Mamba2Config", "Mamba2ForCausalLM", vocab_size=V, hidden_size=64, num_heads=8, head_dim=16,
                 state_size=8, num_hidden_layers=2, n_groups=1, chunk_size=16, **IDS),   # cache_params of states
    # ---- hand-written modules
    "custom_lm": module(lambda: CustomLM(heads=4, kv_heads=2, head_dim=16, width=128), "CustomLM"),
    "tokens_lm": module(TokensLM),
    "mha_net": module(MHANet),
    "einsum_lm": module(EinsumLM),
}
