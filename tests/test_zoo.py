"""The architecture zoo (issue #11, "Any model, for real"): every built-in method on 47 architectures, each built
tiny from its config (tests/zoo.py), checked the same way:

  apply      apply works (its probe forward included), only the adapter trains, the forward keeps the base's shape
  identity   every method but prompt / prefix tuning starts as the identity (qlora: its own disabled() output,
             which stays near the float base: cosine > 0.9)
  train      one AdamW step leaves every base tensor bit-identical and moves the adapter
  disabled   disabled() gives the base outputs exactly, with the adapter moved away from its start
  save_load  save, then load onto a fresh identical model: identical outputs
  merge      lora, ia3, dora, bitfit, adalora: merged outputs close to unmerged, unmerge gives them back
  generate   causal LMs: generate() with its cache = greedy decoding without a cache
  padding    prompt / prefix tuning on causal LMs: a row padded on the left gives the same last-token logits as alone
  remove     remove() restores the base exactly (qlora: the dequantized base, as documented)

A method that cannot work on an architecture must refuse in one line (REFUSED, with the reason); a check that
fails on a bug is an xfail(strict=True) cell of XFAIL with the reason, so that fixing it turns the cell red until
the entry goes. `python tests/test_zoo.py` prints the README's "Architectures" table from these tables.

Each model is built and located once per session; every test works on a deep copy (which keeps the site map), so
the whole zoo costs about one locate per architecture."""
from __future__ import annotations

import copy
import functools
import inspect
import sys

import pytest
import torch

import peftsurgery as ps
from peftsurgery import SurgeryError
from peftsurgery.sites import CONTAINER

try:
    from test_core import assert_same, snapshot
    from zoo import FACTORIES, V
except ImportError:  # tests/ collected as a package
    from tests.test_core import assert_same, snapshot
    from tests.zoo import FACTORIES, V

METHODS = {"lora": dict(r=4), "qlora": dict(r=2), "adapter": dict(bottleneck=4),
           "prompt-tuning": dict(num_tokens=3), "prefix-tuning": dict(num_tokens=3),
           "ia3": {}, "dora": dict(r=4), "bitfit": dict(norms=True), "adalora": dict(init_r=4, target_r=2)}
MERGEABLE = ("lora", "ia3", "dora", "bitfit", "adalora")   # identity at init and an exact merge round trip

# architecture -> family: causal (decoder LMs: cached generation, left padding), seq2seq, encoder, vision,
# audio, custom (hand-written nn.Modules)
ARCHS = {
    "llama": "causal", "qwen2": "causal", "qwen3": "causal", "mistral": "causal", "gemma": "causal",
    "gemma2": "causal", "phi": "causal", "phi3": "causal", "gpt2": "causal", "gptj": "causal",
    "gpt_neox": "causal", "opt": "causal", "falcon": "causal", "bloom": "causal", "gpt_bigcode": "causal",
    "stablelm": "causal", "starcoder2": "causal", "olmo": "causal", "cohere": "causal", "granite": "causal",
    "gemma3": "causal", "xglm": "causal",
    "mixtral": "causal", "qwen3_moe": "causal", "deepseek_v3": "causal", "qwen2_moe": "causal", "granitemoe": "causal",
    "t5": "seq2seq", "bart": "seq2seq", "mt5": "seq2seq", "whisper": "seq2seq", "longt5": "seq2seq",
    "bert": "encoder", "roberta": "encoder", "distilbert": "encoder", "albert": "encoder", "electra": "encoder",
    "deberta_v2": "encoder",
    "vit": "vision", "clip": "vision", "wav2vec2": "audio",
    "mamba": "causal", "mamba2": "causal",
    "custom_lm": "custom", "tokens_lm": "custom", "mha_net": "custom", "einsum_lm": "custom",
}
assert set(ARCHS) == set(FACTORIES)

# (architecture, method) -> options beside METHODS' (a model without the default target roles)
OPTIONS = {
    **{(arch, "lora"): dict(targets="all-linear") for arch in ("mamba", "mamba2")},
    **{(arch, "adapter"): dict(targets="path:*out_proj") for arch in ("mamba", "mamba2")},
    # mixtures of experts: LoRA on every expert too (stacked weights, one update per expert)
    ("qwen3_moe", "lora"): dict(targets="attn.q,attn.v,moe.*"),
    **{(arch, "lora"): dict(targets="attn.q,attn.v,moe.*") for arch in ("mixtral", "qwen2_moe", "granitemoe")},
    ("deepseek_v3", "lora"): dict(targets="attn.q,attn.kv,moe.*"),
    # q, k, v interleaved per head in the fused projection (DeepSeek: k and v per head in kv_b_proj): no slices
    # to cut out, so the whole projection, as PEFT targets it
    ("bloom", "lora"): dict(targets="attn.qkv"),
    ("gpt_neox", "lora"): dict(targets="attn.qkv"),
    ("bloom", "ia3"): dict(targets="attn.qkv"),
    ("gpt_neox", "ia3"): dict(targets="attn.qkv"),
    ("bloom", "adalora"): dict(targets="attn.qkv"),
    ("gpt_neox", "adalora"): dict(targets="attn.qkv"),
    ("deepseek_v3", "ia3"): dict(targets="attn.kv"),
    ("deepseek_v3", "dora"): dict(targets="attn.q,attn.kv"),
    ("deepseek_v3", "adalora"): dict(targets="attn.q,attn.kv"),
    # DoRA normalises whole weight rows: it acts on whole linears, so the fused projection itself, as PEFT does
    **{(arch, "dora"): dict(targets="attn.qkv") for arch in ("bloom", "gpt2", "gpt_bigcode", "gpt_neox", "falcon",
                                                              "phi3", "einsum_lm", "tokens_lm")},
    # no feed-forward down-projection to scale: the experts' stacked weights, or no feed-forward at all
    **{(arch, "ia3"): dict(feedforward="") for arch in ("mixtral", "qwen3_moe", "granitemoe", "einsum_lm",
                                                         "tokens_lm")},
    **{(arch, m): dict(targets="all-linear") for arch in ("mamba", "mamba2") for m in ("dora", "adalora")},
}

# (architecture, method) -> (regex of the one-line SurgeryError, why): the method cannot work there
REFUSED = {
    ("mha_net", "adapter"): ("matches no linear site", "`attn.o` is `out_proj`'s bare weight inside "
                                                       "`nn.MultiheadAttention`, no module output to follow"),
    **{(arch, "prefix-tuning"): ("matches no attention site", "no attention") for arch in ("mamba", "mamba2")},
    ("longt5", "prefix-tuning"): ("no attention call at .* could be intercepted", "its local attention attends "
                                  "block by block, to keys no single score product holds"),
    **{("mha_net", m): ("matches no linear site", "q, k, v come from `nn.MultiheadAttention`'s bare "
                        "`in_proj_weight`: no linear module whose output or weight rows the method acts on")
       for m in ("ia3", "dora")},
    **{(arch, "ia3"): ("matches no linear site", "no attention keys/values or feed-forward down-projection to scale")
       for arch in ("mamba", "mamba2")},
    ("olmo", "bitfit"): ("matches no tensor site", "no biases, and its norms have no weights"),
    ("vit", "prompt-tuning"): ("matches no embedding site", "no token embedding (patches)"),
    ("wav2vec2", "prompt-tuning"): ("matches no embedding site", "no token embedding (raw audio)"),
}

# methods not run on an architecture, and why
NOT_RUN = {
    ("tokens_lm", "qlora"): "widths of 16: bitsandbytes on AVX-512 CPUs refuses them (see README qlora)",
    ("mha_net", "qlora"): "widths of 16: bitsandbytes on AVX-512 CPUs refuses them (see README qlora)",
}

# (architecture, method) -> (checks that fail, or "*" for all; the bug)
XFAIL: dict = {}


CHECKS = ("apply", "identity", "train", "disabled", "save_load", "merge", "generate", "padding", "remove")


def applies(check: str, arch: str, method: str) -> bool:
    family = ARCHS[arch]
    return {"identity": method in MERGEABLE + ("adapter", "qlora"), "merge": method in MERGEABLE,
            "generate": family == "causal",
            "padding": family == "causal" and method in ("prompt-tuning", "prefix-tuning")}.get(check, True)


def bug(check: str, arch: str, method: str) -> str | None:
    checks, why = XFAIL.get((arch, method), ((), None))
    return why if checks == "*" or check in checks else None


def cells(check: str):
    for arch in ARCHS:
        for method in METHODS:
            if (arch, method) in REFUSED or (arch, method) in NOT_RUN or not applies(check, arch, method):
                continue
            why = bug(check, arch, method)
            marks = [pytest.mark.xfail(strict=True, reason=why)] if why else []
            yield pytest.param(arch, method, id=f"{arch}-{method}", marks=marks)


def each(check: str):
    return pytest.mark.parametrize("arch,method", list(cells(check)))


# ---------------------------------------------------------------- models, inputs and outputs

@functools.cache
def pristine(arch: str) -> torch.nn.Module:
    """Built and located once; tests never touch it, only copies."""
    model = FACTORIES[arch]()
    ps.sitemap(model)
    return model


def fresh(arch: str) -> torch.nn.Module:
    return copy.deepcopy(pristine(arch))


@functools.cache
def _inputs(arch: str) -> dict:
    """The example inputs locate guessed, as a batch of 2 with random token ids and random features."""
    g = torch.Generator().manual_seed(1)
    kw = {}
    for k, v in ps.sitemap(pristine(arch)).inputs.items():
        if isinstance(v, torch.Tensor) and k.endswith("attention_mask"):
            v = torch.ones((2, *v.shape[1:]), dtype=v.dtype)
        elif isinstance(v, torch.Tensor) and not v.is_floating_point():
            v = torch.randint(3, V, (2, *v.shape[1:]), generator=g)
        elif isinstance(v, torch.Tensor):
            v = torch.randn((2, *v.shape[1:]), generator=g)
        kw[k] = v
    return kw


def inputs(arch: str) -> dict:
    return dict(_inputs(arch))


def main(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "logits_per_image", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    return out[0]


def run(model, kw) -> torch.Tensor:
    with torch.no_grad():
        return main(model(**kw)).detach().clone()


@functools.cache
def _base_out(arch: str) -> torch.Tensor:
    return run(pristine(arch), inputs(arch))


def base_state(model) -> dict:
    items = list(model.named_parameters()) + list(model.named_buffers())
    return {n: t.detach().clone() for n, t in items if not n.startswith(CONTAINER + ".")}


def applied(arch: str, method: str, model=None):
    model = fresh(arch) if model is None else model
    torch.manual_seed(123)   # adapter initialisation draws from the global generator
    return ps.apply(model, method, **METHODS[method], **OPTIONS.get((arch, method), {}))


def reference(arch: str, method: str, model) -> torch.Tensor:
    """What disabled() must give: the base's outputs (qlora: its quantized base, taken right after apply)."""
    if method == "qlora":
        with ps.disabled(model):
            return run(model, inputs(arch))
    return _base_out(arch)


def perturb(model, seed=5):
    """Move every adapter parameter away from its (often output-preserving) start, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model._modules[CONTAINER].parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)


# ---------------------------------------------------------------- the checks

@each("apply")
def test_apply(arch, method):
    model = applied(arch, method)
    assert ps.sitemap(model).inputs, "no example inputs: the probe forward did not run"
    adapter = {n for n, _ in model._modules[CONTAINER].named_parameters()}
    assert adapter and ps.budget(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"{CONTAINER}.{n}" for n in adapter}
    out = run(model, inputs(arch))
    assert out.shape == _base_out(arch).shape and torch.isfinite(out).all()


@each("identity")
def test_identity(arch, method):
    model = applied(arch, method)
    ref = reference(arch, method, model)
    assert torch.equal(run(model, inputs(arch)), ref)
    if method == "qlora":   # and the quantized base is the float base up to NF4's error, not something else
        assert torch.cosine_similarity(ref.flatten(), _base_out(arch).flatten(), 0) > 0.9


@each("train")
def test_train(arch, method):
    model = applied(arch, method)
    before = base_state(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    target = torch.randn(_base_out(arch).shape, generator=torch.Generator().manual_seed(7))
    loss = (main(model(**inputs(arch))).float() - target).pow(2).mean()
    loss.backward()
    opt.step()
    model.eval()
    after = base_state(model)
    assert after.keys() == before.keys()
    assert [n for n in before if not torch.equal(before[n], after[n])] == []
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters() if n in start)


@each("disabled")
def test_disabled(arch, method):
    model = applied(arch, method)
    ref = reference(arch, method, model)
    perturb(model)
    assert not torch.equal(run(model, inputs(arch)), ref), "the moved adapter changes nothing"
    with ps.disabled(model):
        assert torch.equal(run(model, inputs(arch)), ref)


@each("save_load")
def test_save_load(arch, method, tmp_path):
    model = applied(arch, method)
    perturb(model)
    ps.save(model, str(tmp_path / "a"))
    # trainable like the saved one: torch's matmul folds a non-contiguous input differently when the weight
    # requires grad, which moves Mamba's x_proj output by one rounding step
    other = ps.load(fresh(arch), str(tmp_path / "a"), trainable=True)
    assert torch.equal(run(other, inputs(arch)), run(model, inputs(arch)))


@each("merge")
def test_merge(arch, method):
    model = applied(arch, method)
    perturb(model)
    unmerged = run(model, inputs(arch))
    ps.merge(model)
    torch.testing.assert_close(run(model, inputs(arch)), unmerged, atol=1e-5, rtol=1e-4)
    ps.unmerge(model)
    torch.testing.assert_close(run(model, inputs(arch)), unmerged, atol=1e-5, rtol=1e-4)


def _without_eos(model, logits):
    eos = model.generation_config.eos_token_id
    if eos is not None:
        logits[..., torch.tensor(eos if isinstance(eos, list) else [eos])] = float("-inf")
    return logits


@each("generate")
def test_generate(arch, method):
    """Greedy, 4 tokens (end of sequence suppressed, as min_new_tokens does), two rows without padding."""
    model = applied(arch, method)
    perturb(model)
    _generates_as_greedy(model)


def _generates_as_greedy(model):
    ids = torch.randint(3, V, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                             do_sample=False, pad_token_id=0)
        want = ids
        for _ in range(4):
            logits = model(input_ids=want, attention_mask=torch.ones_like(want), use_cache=False).logits[:, -1]
            want = torch.cat([want, _without_eos(model, logits).argmax(-1, keepdim=True)], 1)
    assert got.tolist() == want.tolist()


def test_prompt_generation_finds_a_cache_of_recurrent_states_by_what_it_is():
    """Mamba-2 decodes with its cache under `cache_params`, which has states but no length, and no attention mask
    after the first step: the prompt used to be prepended again at every step (tokens 2-4 went astray)."""
    import transformers as tf
    torch.manual_seed(0)
    model = tf.Mamba2ForCausalLM(tf.Mamba2Config(vocab_size=V, hidden_size=64, num_heads=8, head_dim=16,
                                                 state_size=8, num_hidden_layers=2, n_groups=1, chunk_size=16,
                                                 pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    ps.apply(model, "prompt-tuning", num_tokens=3)
    perturb(model)
    _generates_as_greedy(model)


def test_prompt_generation_reads_the_cache_length_past_a_first_layer_without_tokens():
    """MiniMax keeps its first (linear-attention) layer's state outside the cache's layers, so the cache's length
    read at layer 0 is 0 while it holds the tokens: the prompt was prepended again at every step."""
    import transformers as tf
    torch.manual_seed(0)
    model = tf.MiniMaxForCausalLM(tf.MiniMaxConfig(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, block_size=4,
        layer_types=["linear_attention", "full_attention"], max_position_embeddings=128, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)).eval()
    ps.apply(model, "prompt-tuning", num_tokens=3)
    perturb(model)
    _generates_as_greedy(model)


def test_prompt_takes_position_ids_with_one_row_per_rotary_section():
    """Multimodal rotary embeddings take position ids of shape (sections, batch, tokens), which generate() passes
    (Qwen3.5's, Qwen2-VL's): the prompt's positions were joined onto them as a (batch, tokens) block, a crash."""
    import transformers as tf
    torch.manual_seed(0)
    text = dict(vocab_size=V + 4, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                eos_token_id=2, layer_types=["full_attention"])
    vision = dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64, patch_size=8)
    model = tf.Qwen3_5ForConditionalGeneration(tf.Qwen3_5Config(
        text_config=text, vision_config=vision, image_token_id=V, video_token_id=V + 1, vision_start_token_id=V + 2,
        vision_end_token_id=V + 3)).eval()
    ps.apply(model, "prompt-tuning", num_tokens=3)
    perturb(model)
    ids = torch.randint(3, V, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = model(input_ids=ids, position_ids=torch.arange(5).expand(3, 2, 5)).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    _generates_as_greedy(model)


def _last_logits(model, ids, mask):
    kw = {"attention_mask": mask}
    if "position_ids" in inspect.signature(model.forward).parameters:   # absolute positions follow the mask
        kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **kw).logits[:, -1]


@each("padding")
def test_padding(arch, method):
    model = applied(arch, method)
    perturb(model)
    g = torch.Generator().manual_seed(4)
    row, other = torch.randint(3, V, (1, 5), generator=g), torch.randint(3, V, (1, 7), generator=g)
    ids = torch.cat([torch.cat([torch.zeros(1, 2, dtype=torch.long), row], 1), other])
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    alone = _last_logits(model, row, torch.ones_like(row))
    torch.testing.assert_close(_last_logits(model, ids, mask)[:1], alone, atol=1e-5, rtol=1e-4)


@each("remove")
def test_remove(arch, method):
    model = fresh(arch)
    types = {n: type(m) for n, m in model.named_modules()}
    before = base_state(model)
    applied(arch, method, model)
    ref = reference(arch, method, model)
    perturb(model)
    ps.remove(model)
    assert ps.adapters(model) == {} and CONTAINER not in model._modules
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    if method == "qlora":   # the float weights were dropped at apply: the dequantized 4-bit base comes back
        torch.testing.assert_close(run(model, inputs(arch)), ref, atol=1e-5, rtol=0)
    else:
        after = base_state(model)
        assert [n for n in before if not torch.equal(before[n], after[n])] == []
        assert torch.equal(run(model, inputs(arch)), ref)


@pytest.mark.parametrize("arch,method,match", [pytest.param(a, m, r[0], id=f"{a}-{m}")
                                               for (a, m), r in REFUSED.items()])
def test_refused_in_one_line(arch, method, match):
    model = fresh(arch)
    snap = snapshot(model)
    with pytest.raises(SurgeryError, match=match) as e:
        applied(arch, method, model)
    assert "\n" not in str(e.value)
    assert_same(model, snap)
    assert ps.adapters(model) == {} and CONTAINER not in model._modules


# ---------------------------------------------------------------- inputs of other modalities, prefixes beside them

@pytest.mark.parametrize("arch,keys", [
    ("llama", {"input_ids", "attention_mask", "use_cache"}),
    ("t5", {"input_ids", "attention_mask", "decoder_input_ids", "use_cache"}),
    ("vit", {"pixel_values"}), ("clip", {"input_ids", "attention_mask", "pixel_values"}), ("wav2vec2", {"input_values"}),
    ("whisper", {"input_features", "decoder_input_ids", "use_cache"}), ("tokens_lm", {"tokens"}),
])
def test_example_inputs_follow_the_signature_and_config(arch, keys):
    kw = ps.sitemap(pristine(arch)).inputs
    assert set(kw) == keys and kw.get("use_cache", False) is False
    cfg = getattr(pristine(arch), "config", None)
    if "pixel_values" in kw:
        size = cfg.vision_config.image_size if arch == "clip" else cfg.image_size
        assert kw["pixel_values"].shape == (1, 3, size, size)
    if "input_features" in kw:
        assert kw["input_features"].shape == (1, cfg.num_mel_bins, 2 * cfg.max_source_positions)


@pytest.mark.parametrize("arch", ["clip", "whisper"])
def test_prefix_vocab_init_runs_the_model_with_its_other_inputs(arch):
    """init=vocab runs the model on token ids; CLIP also needs pixels, Whisper audio features (it used to crash on
    them missing). An attention over those (CLIP's vision tower: 5 positions, Whisper's encoder: 16) saw fewer
    positions than the 7 virtual tokens: its keys/values are repeated to fill them."""
    model = fresh(arch)
    ps.apply(model, "prefix-tuning", num_tokens=7, init="vocab")
    for rec in ps.adapters(model)["default"].records:
        for path, m in rec.built.items():
            if not path.startswith("_"):
                k, v = m()
                assert k.shape[1] == 7 and torch.isfinite(k).all() and k.abs().sum() > 0
    with torch.no_grad():
        assert main(model(**inputs(arch))).shape == _base_out(arch).shape


# ---------------------------------------------------------------- the README table

def markdown() -> str:
    """README "Architectures": per architecture and method, works / refused / xfail (with the failing checks),
    the reasons as numbered notes under the table."""
    notes: list[str] = []

    def note(text: str) -> int:
        if text not in notes:
            notes.append(text)
        return notes.index(text) + 1

    lines = ["| architecture | class | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
    for arch in ARCHS:
        row = []
        for method in METHODS:
            opts = ", ".join(f"{k}={v}" for k, v in OPTIONS.get((arch, method), {}).items())
            if (arch, method) in REFUSED:
                row.append(f"refused [{note(REFUSED[arch, method][1])}]")
            elif (arch, method) in NOT_RUN:
                row.append(f"not run [{note(NOT_RUN[arch, method])}]")
            elif (arch, method) in XFAIL:
                checks, why = XFAIL[arch, method]
                failing = [c for c in CHECKS if applies(c, arch, method) and (checks == "*" or c in checks)]
                row.append(f"**xfail** {'all checks' if checks == '*' else ', '.join(failing)} [{note(why)}]")
            else:
                row.append("works" + (f" (`{opts}`)" if opts else ""))
        lines.append(f"| {arch} | `{FACTORIES[arch].__name__}` | " + " | ".join(row) + " |")
    lines.append("")
    lines += [f"{i}. {text}" for i, text in enumerate(notes, 1)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(print(markdown()))
