"""PEFT's adapter format both ways (peftsurgery/peftformat.py), against PEFT 0.21.2 itself.

Round trips PEFT -> ours -> PEFT: PEFT saves a folder (random values in every trainable tensor, so nothing is
trivially zero), peftsurgery.load reads it, peftsurgery.save(format="peft") writes it back, and PEFT's
PeftModel.from_pretrained loads that. The tensors come back bit-exact, PEFT computes bit-identical logits from
the copy, and ours computes PEFT's logits (to 1e-5) wherever the two conventions agree. On T5 they do not agree
everywhere, by design (README "Saved adapters"): those tests check the parts that agree and the warning.
"""
from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from conftest import raises_one_line, tiny_gpt2, tiny_llama, tiny_llama_4bit, tiny_t5
from zoo import FACTORIES
from safetensors.torch import load_file, save_file

import peftsurgery as ps
from peftsurgery.peftformat import PeftFormatWarning

peft = pytest.importorskip("peft")

P = 3
IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
DEC = torch.tensor([[0, 4, 5, 6], [0, 7, 8, 9]])
BASES = {}


def base(kind: str):
    """One tiny model per kind, located once (deep copies keep the site map)."""
    if kind not in BASES:
        BASES[kind] = {"llama": tiny_llama, "gpt2": tiny_gpt2, "t5": tiny_t5, "bloom": FACTORIES["bloom"]}[kind]()
        ps.sitemap(BASES[kind])
    return copy.deepcopy(BASES[kind])


def logits(model, kind):
    with torch.no_grad():
        if kind == "t5":
            return model(input_ids=IDS, decoder_input_ids=DEC).logits
        return model(input_ids=IDS).logits


def task(kind):
    return "SEQ_2_SEQ_LM" if kind == "t5" else "CAUSAL_LM"


def peft_folder(kind, config, path, model=None, prepare=None):
    """PEFT's own folder for `config` on the tiny `kind` model, every trainable tensor random (then `prepare(ref)`)."""
    ref = peft.get_peft_model(model if model is not None else base(kind), config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in ref.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    if prepare is not None:
        prepare(ref)
    ref.eval()
    ref.save_pretrained(str(path))
    return ref


def through_ours(kind, folder, out):
    """PEFT folder -> peftsurgery -> PEFT folder; (ours, PEFT's logits from its own folder, PEFT's logits from
    the copy, warnings)."""
    ours = base(kind)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ps.load(ours, str(folder))
        ps.save(ours, str(out), format="peft")
    want = logits(peft.PeftModel.from_pretrained(base(kind), str(folder)).eval(), kind)
    back = logits(peft.PeftModel.from_pretrained(base(kind), str(out)).eval(), kind)
    notes = [str(w.message) for w in caught if issubclass(w.category, PeftFormatWarning)]
    return ours, want, back, notes


def tensors(folder):
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def config(folder):
    with open(os.path.join(folder, "adapter_config.json")) as f:
        return json.load(f)


def assert_bit_exact(a, b):
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- LoRA
LORA = {
    # rsLoRA and per-module rank / alpha patterns (regular expressions matched at the end of module paths)
    "llama": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"],
                  rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={r"layers\.0\..*v_proj": 3}),
    # PEFT's GPT-2 default target is the fused c_attn (Conv1D, weights stored (in, out)): q, k and v together,
    # as our default attn.q,attn.v is on a fused projection
    "gpt2": dict(r=4, lora_alpha=16, fan_in_fan_out=True),
    # T5's default q and v include the cross-attention's q and v
    "t5": dict(r=2, lora_alpha=4, lora_dropout=0.1),
}


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_lora_round_trip(kind, tmp_path):
    peft_folder(kind, peft.LoraConfig(task_type=task(kind), **LORA[kind]), tmp_path / "peft")
    ours, want, back, notes = through_ours(kind, tmp_path / "peft", tmp_path / "back")
    assert not notes
    assert_bit_exact(tmp_path / "peft", tmp_path / "back")
    assert (want - logits(base(kind), kind)).abs().max() > 1e-2  # the adapter matters
    assert torch.equal(back, want)
    close(logits(ours, kind), want)
    theirs, again = config(tmp_path / "peft"), config(tmp_path / "back")
    for key in ("r", "lora_alpha", "use_rslora", "lora_dropout", "fan_in_fan_out", "task_type"):
        assert again[key] == theirs[key], key
    if kind == "llama":  # patterns come back per module (full paths)
        assert again["rank_pattern"] == {"model.layers.1.self_attn.q_proj": 2}
        assert again["alpha_pattern"] == {"model.layers.0.self_attn.v_proj": 3}
        assert len(ps.adapters(ours)["default"].records) == 3  # one low-rank rule per (rank, alpha)
    if kind == "gpt2":
        assert again["fan_in_fan_out"] is True
        assert sorted(again["target_modules"]) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
        assert ps.adapters(ours)["default"].config.targets == "attn.qkv"


def test_lora_without_patterns_saves_in_our_format_too(tmp_path):
    peft_folder("gpt2", peft.LoraConfig(r=4, lora_alpha=16, fan_in_fan_out=True), tmp_path / "peft")
    ours = base("gpt2")
    ps.load(ours, str(tmp_path / "peft"))
    ps.save(ours, str(tmp_path / "ours"))
    again = base("gpt2")
    ps.load(again, str(tmp_path / "ours"))
    assert torch.equal(logits(again, "gpt2"), logits(ours, "gpt2"))


def test_lora_with_patterns_refuses_our_format(tmp_path):
    peft_folder("llama", peft.LoraConfig(**LORA["llama"]), tmp_path / "peft")
    ours = base("llama")
    ps.load(ours, str(tmp_path / "peft"))
    raises_one_line(lambda: ps.save(ours, str(tmp_path / "ours")), "per-module ranks", "format='peft'")
    assert not (tmp_path / "ours").exists()


# ---------------------------------------------------------------- DoRA
DORA = {
    # rsLoRA and patterns: one DoRA rule per (rank, alpha)
    "llama": dict(r=4, lora_alpha=8, use_dora=True, use_rslora=True, target_modules=["q_proj", "v_proj"],
                  rank_pattern={"layers.1.self_attn.q_proj": 2}),
    # PEFT's fused c_attn (Conv1D): the magnitude has one entry per output feature of all of q, k and v, as ours
    "gpt2": dict(r=4, lora_alpha=16, use_dora=True, fan_in_fan_out=True),
    # T5's default q and v include the cross-attention's
    "t5": dict(r=4, lora_alpha=8, use_dora=True),
}


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_dora_round_trip(kind, tmp_path):
    peft_folder(kind, peft.LoraConfig(task_type=task(kind), **DORA[kind]), tmp_path / "peft")
    ours, want, back, notes = through_ours(kind, tmp_path / "peft", tmp_path / "back")
    assert not notes
    assert_bit_exact(tmp_path / "peft", tmp_path / "back")
    assert (want - logits(base(kind), kind)).abs().max() > 1e-2
    assert torch.equal(back, want)
    close(logits(ours, kind), want)
    att = ps.adapters(ours)["default"]
    assert att.method == "dora" and config(tmp_path / "back")["use_dora"] is True
    mag = tensors(tmp_path / "back")
    if kind == "gpt2":
        assert att.config.targets == "attn.qkv"
        assert mag["base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"].shape == (96,)
    elif kind == "t5":
        assert len([k for k in mag if k.endswith("lora_magnitude_vector")]) == 12   # q, v: 2 x 2 self + 2 cross
    else:
        assert len(att.records) == 2 and config(tmp_path / "back")["rank_pattern"] == {
            "model.layers.1.self_attn.q_proj": 2}


# ---------------------------------------------------------------- AdaLoRA
def allocate(ref):
    """What PEFT's final allocation leaves: a rank_pattern mask (init_r booleans) per module, the dropped triplets'
    E zeroed. Module 0 keeps none, module 1 all, the others 4 of 6 at varying positions."""
    pattern = {}
    for i, (n, p) in enumerate((n, p) for n, p in ref.base_model.model.named_parameters() if ".lora_E." in n):
        mask = [i == 1 or (i > 0 and (j + i) % 3 != 0) for j in range(p.shape[0])]
        pattern[n] = mask
        with torch.no_grad():
            p.masked_fill_(~torch.tensor(mask)[:, None], 0.0)
    ref.peft_config["default"].rank_pattern = pattern


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_adalora_round_trip(kind, tmp_path):
    """PEFT saves only the triplets its masks keep, so its masks map to our per-site ranks and come back as
    the same counts (True first: once saved PEFT reads only the count); a module keeping none included."""
    import shutil
    cfg = peft.AdaLoraConfig(task_type=task(kind), init_r=6, target_r=3, lora_alpha=12, total_step=20, tinit=2,
                             tfinal=3, deltaT=2, orth_reg_weight=0.3,
                             **({"target_modules": ["q_proj", "v_proj"]} if kind == "llama" else {}))
    peft_folder(kind, cfg, tmp_path / "peft", prepare=allocate)
    ours, want, back, notes = through_ours(kind, tmp_path / "peft", tmp_path / "back")
    assert not notes
    assert_bit_exact(tmp_path / "peft", tmp_path / "back")
    assert (want - logits(base(kind), kind)).abs().max() > 1e-2
    assert torch.equal(back, want)
    # PEFT scales by alpha / (init_r + 1e-5), ours by alpha / init_r: within 1e-5 on Llama and GPT-2; T5 (no
    # 1/sqrt(d) in its attention) amplifies that to about 1e-4, so there PEFT is compared at our scale
    ref = peft.PeftModel.from_pretrained(base(kind), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        for m in ref.modules():
            if hasattr(m, "ranknum") and "default" in m.ranknum:
                m.ranknum["default"].fill_(6 - 1e-5)     # PEFT divides lora_alpha by ranknum + 1e-5
    close(logits(ours, kind), logits(ref, kind))
    if kind != "t5":
        close(logits(ours, kind), want)
    theirs, again = config(tmp_path / "peft"), config(tmp_path / "back")
    counts = {k: sum(v) for k, v in theirs["rank_pattern"].items()}
    assert {k: sum(v) for k, v in again["rank_pattern"].items()} == {k: c for k, c in counts.items() if c < 6}
    assert all(v == sorted(v, reverse=True) for v in again["rank_pattern"].values())
    assert sorted(counts.values())[0] == 0 and max(counts.values()) == 6
    att = ps.adapters(ours)["default"]
    assert att.records[0].state()[1]["ranks"] == {k[:-len(".lora_E")]: c for k, c in counts.items()}
    for key in ("init_r", "target_r", "lora_alpha", "tinit", "tfinal", "deltaT", "orth_reg_weight"):
        assert again[key] == theirs[key], key
    if kind == "gpt2":
        assert att.config.targets == "attn.qkv" and again["fan_in_fan_out"] is True
    if kind != "llama":
        return
    ps.save(ours, str(tmp_path / "ours"))   # our format keeps the ranks
    assert torch.equal(logits(ps.load(base("llama"), str(tmp_path / "ours")), "llama"), logits(ours, "llama"))
    for name, rank_pattern, needles in [
            ("count", {**theirs["rank_pattern"], "model.layers.0.self_attn.q_proj.lora_E": [True] * 6},
             ("model.layers.0.self_attn.q_proj", "6 triplets")),
            ("length", {"model.layers.0.self_attn.q_proj.lora_E": [True] * 5}, ("init_r=6",)),
            ("alpha", None, ("lora_alpha",))]:
        folder = tmp_path / name
        shutil.copytree(tmp_path / "peft", folder)
        edit(folder, **({"rank_pattern": rank_pattern} if rank_pattern else {"lora_alpha": 0}))
        refused(base("llama"), folder, *needles)


# ---------------------------------------------------------------- IA3
@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_ia3_round_trip(kind, tmp_path):
    """PEFT's defaults: Llama's k_proj, v_proj (outputs) and down_proj (input); GPT-2's whole c_attn (queries
    included, our attn.qkv) and mlp.c_proj (input); T5's k, v (self- and cross-attention) and wo (input)."""
    peft_folder(kind, peft.IA3Config(task_type=task(kind), fan_in_fan_out=kind == "gpt2"), tmp_path / "peft")
    ours, want, back, notes = through_ours(kind, tmp_path / "peft", tmp_path / "back")
    assert not notes
    assert_bit_exact(tmp_path / "peft", tmp_path / "back")
    assert (want - logits(base(kind), kind)).abs().max() > 1e-2
    assert torch.equal(back, want)
    close(logits(ours, kind), want)
    att = ps.adapters(ours)["default"]
    assert (att.config.targets, att.config.feedforward) == {
        "gpt2": ("attn.qkv", "mlp.down"), "t5": ("attn.k,attn.v,xattn.k,xattn.v", "mlp.down")}.get(
        kind, ("attn.k,attn.v", "mlp.down"))
    if kind == "llama":   # which modules scale their input comes from feedforward_modules, as in PEFT
        edit(tmp_path / "peft", feedforward_modules=["k_proj"])
        refused(base("llama"), tmp_path / "peft", "model.layers.0.mlp.down_proj", "(1, 64)", "needs (32, 1)")


# ---------------------------------------------------------------- prompt tuning
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_prompt_tuning_round_trip(kind, tmp_path):
    peft_folder(kind, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P), tmp_path / "peft")
    ours, want, back, notes = through_ours(kind, tmp_path / "peft", tmp_path / "back")
    assert not notes
    assert_bit_exact(tmp_path / "peft", tmp_path / "back")
    assert torch.equal(back, want)
    close(logits(ours, kind), want[:, P:])  # PEFT's logits include the virtual positions


def encoder_states(model, prompt_rows=0):
    """T5's encoder output on IDS, the first prompt_rows positions (PEFT's virtual tokens) dropped."""
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=torch.ones_like(IDS), decoder_input_ids=DEC,
                    output_hidden_states=True).encoder_last_hidden_state
    return out[:, prompt_rows:]


@pytest.mark.parametrize("kind,encoder", [("llama", "MLP"), ("llama", "LSTM"), ("gpt2", "MLP"), ("t5", "MLP")])
def test_p_tuning_loads_as_its_folded_prompt(kind, encoder, tmp_path):
    """PEFT's P-tuning folder holds its encoder's output: loaded as a prompt-tuning adapter it gives PEFT's logits,
    and exports as PEFT prompt tuning with the same vectors and logits (on T5 the encoder's half, as prompt
    tuning's)."""
    cfg = peft.PromptEncoderConfig(task_type=task(kind), num_virtual_tokens=P, encoder_hidden_size=12,
                                   encoder_reparameterization_type=encoder)
    ref = peft_folder(kind, cfg, tmp_path / "peft")
    ours, want, back, notes = through_ours(kind, tmp_path / "peft", tmp_path / "back")
    assert ps.adapters(ours)["default"].method == "prompt-tuning"
    assert config(tmp_path / "back")["peft_type"] == "PROMPT_TUNING"
    theirs = tensors(tmp_path / "peft")["prompt_embeddings"]
    assert torch.equal(tensors(tmp_path / "back")["prompt_embeddings"], theirs[:P])
    assert torch.equal(back, want)
    if kind == "t5":
        assert len(notes) == 2 and all("decoder" in n for n in notes)
        close(encoder_states(ours), encoder_states(ref, P))
    else:
        assert not notes
        close(logits(ours, kind), want[:, P:])


def test_prompt_tuning_t5(tmp_path):
    """PEFT stores 2 x num_virtual_tokens rows on an encoder-decoder and its prompt tuning reads the first half
    (the encoder's); the decoder then attends to the virtual tokens' encoder outputs, which ours trims. So: the
    encoder half round-trips bit-exact, the encoders agree on the real tokens, and loading says how it differs."""
    ref = peft_folder("t5", peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P),
                      tmp_path / "peft")
    ours, want, back, notes = through_ours("t5", tmp_path / "peft", tmp_path / "back")
    assert len(notes) == 2 and all("decoder" in n for n in notes)  # load and export both say so
    theirs, again = tensors(tmp_path / "peft")["prompt_embeddings"], tensors(tmp_path / "back")["prompt_embeddings"]
    assert theirs.shape == (2 * P, 32) and torch.equal(again, theirs[:P])
    assert config(tmp_path / "back")["num_transformer_submodules"] == 1
    assert torch.equal(back, want)
    got = encoder_states(ours)
    assert got.shape == (2, IDS.shape[1], 32)
    close(got, encoder_states(ref, P))


def test_multitask_prompt_tuning_round_trip_gpt2(tmp_path):
    """Llama's round trip is in test_mpt.py; here GPT-2, each row of the batch with its own task."""
    from peftsurgery_plugins import multitask_prompt_tuning as mpt
    cfg = peft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, num_tasks=3, num_ranks=2)
    ref = peft_folder("gpt2", cfg, tmp_path / "peft")
    ours = ps.load(base("gpt2"), str(tmp_path / "peft"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PeftFormatWarning)
        ps.save(ours, str(tmp_path / "back"), format="peft")
    assert_bit_exact(tmp_path / "peft", tmp_path / "back")
    tasks = torch.tensor([2, 0])
    again = peft.PeftModel.from_pretrained(base("gpt2"), str(tmp_path / "back")).eval()
    with torch.no_grad():
        want = ref(input_ids=IDS, task_ids=tasks).logits
        assert torch.equal(again(input_ids=IDS, task_ids=tasks).logits, want)
        assert (want[0] - ref(input_ids=IDS, task_ids=tasks.flip(0)).logits[0]).abs().max() > 1e-3
        with mpt.route(ours, [f"default:{int(t)}" for t in tasks]):
            close(ours(input_ids=IDS).logits, want[:, P:])


def test_multitask_prompt_tuning_t5_refused_both_ways(tmp_path):
    """On an encoder-decoder PEFT's multitask prompt tuning also prefixes the decoder's input with task prompts
    (its second half of rows), which ours cannot hold: refused in one line each way, nothing attached."""
    cfg = peft.MultitaskPromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P, num_tasks=2, num_ranks=2)
    peft_folder("t5", cfg, tmp_path / "peft")
    model = base("t5")
    refused(model, tmp_path / "peft", "before the decoder's tokens")
    ours = ps.apply(base("t5"), "multitask-prompt-tuning", num_tokens=P, tasks=2)
    raises_one_line(lambda: ps.save(ours, str(tmp_path / "x"), format="peft"), "before the decoder's tokens",
                    "peftsurgery's format")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- prefix tuning
@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bloom"])
def test_prefix_tuning_round_trip(kind, projection, tmp_path):
    """Bloom: PEFT's prefix is past keys and values under an attention mask grown by P, from which Bloom builds
    its ALiBi, so the prefix has the positions before the real tokens; ours, seated there, agrees."""
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection,
                                  encoder_hidden_size=12)
    peft_folder(kind, cfg, tmp_path / "peft")
    ours, want, back, notes = through_ours(kind, tmp_path / "peft", tmp_path / "back")
    assert not notes
    assert_bit_exact(tmp_path / "peft", tmp_path / "back")
    assert (want - logits(base(kind), kind)).abs().max() > 1e-2
    assert torch.equal(back, want)
    close(logits(ours, kind), want)
    again = config(tmp_path / "back")
    assert (again["prefix_projection"], again["encoder_hidden_size"] if projection else 0) == (projection, 12 * projection)
    assert again["num_layers"] == 2 and again["token_dim"] == config(tmp_path / "peft")["token_dim"]
    assert ps.adapters(ours)["default"].config.projection == (12 if projection else 0)


def test_prefix_tuning_bloom_left_padding(tmp_path):
    """A row padded on the left: PEFT's ALiBi counts positions from the mask (the prefix's ones first, the pads
    after), ours seats the prefix right before the first real token; both give the padded row's real tokens the
    logits of the unpadded row."""
    ref = peft_folder("bloom", peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P), tmp_path / "p")
    ours = base("bloom")
    ps.load(ours, str(tmp_path / "p"))
    ids, mask = IDS.clone(), torch.ones_like(IDS)
    ids[0, :2], mask[0, :2] = 0, 0
    with torch.no_grad():
        want, got = (m(input_ids=ids, attention_mask=mask).logits for m in (ref, ours))
        alone = ours(input_ids=IDS[:1, 2:]).logits
    close(got[mask.bool()], want[mask.bool()])
    close(got[0, 2:], alone[0])


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_prefix_tuning_t5(projection, tmp_path):
    """PEFT's prefix on an encoder-decoder reaches the decoder's self-attention only, decoder layer i reading
    PEFT's layer 2i mod num_layers (both decoder layers of a 2-layer T5 read layer 0; layer 1's slot is read by
    none and comes back as zeros). T5's relative position bias sees the prefix as positions before the decoder's
    tokens under PEFT (past keys and values), and ours seats it there: the two agree, bias and all."""
    t5 = base("t5")
    ref = peft_folder("t5", peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P,
                                                    prefix_projection=projection, encoder_hidden_size=12),
                      tmp_path / "peft", model=copy.deepcopy(t5))
    ours = copy.deepcopy(t5)
    with pytest.warns(PeftFormatWarning, match="decoder's self-attention only"):
        ps.load(ours, str(tmp_path / "peft"))
    assert [r["site"] for r in ps.inspect(ours)] == ["decoder.block.0.layer.0.SelfAttention",
                                                     "decoder.block.1.layer.0.SelfAttention"]
    want = logits(ref, "t5")
    assert (want - logits(t5, "t5")).abs().max() > 1e-2
    close(logits(ours, "t5"), want)
    with pytest.warns(PeftFormatWarning):
        ps.save(ours, str(tmp_path / "back"), format="peft")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(t5), str(tmp_path / "back")).eval()
    saved = peft.PeftModel.from_pretrained(copy.deepcopy(t5), str(tmp_path / "peft")).eval()   # projection folded
    assert torch.equal(logits(back, "t5"), logits(saved, "t5"))
    theirs = tensors(tmp_path / "peft")["prompt_embeddings"].view(P, 2, 2, -1)   # (tokens, layer, k/v, ...)
    again = tensors(tmp_path / "back")["prompt_embeddings"].view(P, 2, 2, -1)
    assert torch.equal(again[:, 0], theirs[:, 0]) and not again[:, 1].any()


def test_prefix_tuning_t5_default_targets_refuse_export(tmp_path):
    ours = ps.apply(base("t5"), "prefix-tuning", num_tokens=P, init="random")  # encoder, decoder and cross
    raises_one_line(lambda: ps.save(ours, str(tmp_path / "x"), format="peft"),
                    "decoder's self-attention", "path:decoder.block.0.layer.0.SelfAttention")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- ours -> PEFT
def test_our_adapters_export_to_peft(tmp_path):
    """Adapters made here (trained values, an MLP projection folded away) load in PEFT with the same logits."""
    g = torch.Generator().manual_seed(11)
    for kind, method, options, skip in [("gpt2", "lora", {"r": 4, "targets": "attn.qkv"}, 0),
                                        ("llama", "prefix-tuning", {"num_tokens": P, "projection": 8}, 0),
                                        ("gpt2", "prompt-tuning", {"num_tokens": P}, P),
                                        ("llama", "dora", {"r": 2}, 0),
                                        ("gpt2", "dora", {"r": 2, "targets": "attn.qkv"}, 0),
                                        ("llama", "ia3", {}, 0),
                                        # attn.k, attn.v slices of c_attn: PEFT's c_attn vector, ones for queries
                                        ("gpt2", "ia3", {}, 0)]:
        ours = ps.apply(base(kind), method, **options)
        with torch.no_grad():
            for p in ours.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        ps.save(ours, str(tmp_path / method), format="peft")
        theirs = peft.PeftModel.from_pretrained(base(kind), str(tmp_path / method)).eval()
        close(logits(ours, kind), logits(theirs, kind)[:, skip:])


def test_our_adalora_exports_its_ranks(tmp_path):
    """Our saved AdaLoRA holds each site's kept triplets; PEFT gets init_r-long masks with those counts (GPT-2's
    c_attn and mlp.c_proj are Conv1D), loads them with the same logits, and reading PEFT's folder gives them back."""
    ours = ps.apply(base("gpt2"), "adalora", init_r=4, target_r=2, targets="attn.qkv,mlp.down")
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for i, b in enumerate(ps.adapters(ours)["default"].records[0].built.values()):
            b.keep.copy_(torch.tensor([i != 1 and (j + i) % 3 != 0 for j in range(4)]))   # site 1 keeps none
            b.mask()
    ps.save(ours, str(tmp_path / "a"), format="peft")
    theirs = peft.PeftModel.from_pretrained(base("gpt2"), str(tmp_path / "a")).eval()
    close(logits(ours, "gpt2"), logits(theirs, "gpt2"))
    ranks = ps.adapters(ours)["default"].records[0].state()[1]["ranks"]
    assert sorted(ranks.values()) == [0, 2, 2, 3]
    pattern = config(tmp_path / "a")["rank_pattern"]
    assert {k[:-len(".lora_E")]: sum(v) for k, v in pattern.items()} == ranks
    assert all(len(v) == 4 for v in pattern.values())
    again = ps.load(base("gpt2"), str(tmp_path / "a"))
    assert ps.adapters(again)["default"].records[0].state()[1]["ranks"] == ranks
    assert torch.equal(logits(again, "gpt2"), logits(ours, "gpt2"))


def test_qlora_exports_its_lora_and_says_where_the_quantization_goes(tmp_path):
    model = tiny_llama_4bit()
    ours = ps.apply(copy.deepcopy(model), "qlora", r=2, targets="attn.q,attn.v", quantize="attn.q,attn.v")
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.normal_()
    with pytest.warns(PeftFormatWarning, match="BitsAndBytesConfig"):
        ps.save(ours, str(tmp_path / "q"), format="peft")
    cfg, got = config(tmp_path / "q"), tensors(tmp_path / "q")
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and len(got) == 8
    branch = ps.adapters(ours)["default"].records[1].built["model.layers.0.self_attn.q_proj"]
    assert torch.equal(got["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"], branch.B.weight)
    peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "q"))  # a float base takes it too


# ---------------------------------------------------------------- refusals, all or nothing
def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not ps.adapters(model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def edit(folder, **changes):
    cfg = config(folder)
    cfg.update(changes)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)


@pytest.fixture(scope="module")
def llama_lora(tmp_path_factory):
    path = tmp_path_factory.mktemp("peft") / "lora"
    peft_folder("llama", peft.LoraConfig(r=4, lora_alpha=8), path)
    return path


def refused(model, folder, *needles):
    before = snapshot(model)
    raises_one_line(lambda: ps.load(model, str(folder)), *needles)
    assert_untouched(model, before)


def test_refusals_leave_the_model_untouched(llama_lora, tmp_path):
    import shutil
    refused(base("gpt2"), llama_lora, "model.layers.0.self_attn.q_proj", "does not have")
    refused(tiny_llama(hidden_size=48, head_dim=8), llama_lora, "shape")   # found only once rules are built
    for name, changes, needles in [
            ("loha", {"peft_type": "LOHA"}, ("LOHA", "LORA, ADALORA, IA3, PROMPT_TUNING, P_TUNING, PREFIX_TUNING")),
            ("dora", {"use_dora": True}, ("no lora_magnitude_vector", "model.layers.0.self_attn.q_proj")),
            ("mts", {"modules_to_save": ["lm_head"]}, ("modules_to_save", "lm_head")),
            ("bias", {"bias": "all"}, ("bias='none'",)),
            ("pissa", {"init_lora_weights": "pissa"}, ("changes the base weights",)),
            ("unknown", {"layer_replication": [[0, 1]]}, ("layer_replication",)),
            ("rank", {"r": 3}, ("rank 3",))]:
        folder = tmp_path / name
        shutil.copytree(llama_lora, folder)
        edit(folder, **changes)
        refused(base("llama"), folder, *needles)


def test_pickles_are_refused_with_the_way_to_convert(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04not read")
    refused(base("llama"), folder, "pickle", "never loads", "safe_serialization=True")


def test_damaged_and_mismatched_folders(llama_lora, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{not json")
    save_file({"x": torch.zeros(1)}, str(folder / "adapter_model.safetensors"))
    refused(base("llama"), folder, "corrupted")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1}))
    refused(base("llama"), folder, "holds x")
    prefix = tmp_path / "prefix"
    peft_folder("llama", peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P), prefix)
    refused(tiny_llama(num_hidden_layers=3), prefix, "2 layers", "3")
    refused(base("t5"), prefix, "encoder-decoder")


def test_export_refusals(tmp_path):
    ours = ps.apply(base("gpt2"), "adapter", bottleneck=4)
    raises_one_line(lambda: ps.save(ours, str(tmp_path / "a"), format="peft"), "adapter", "no counterpart")
    raises_one_line(lambda: ps.save(ours, str(tmp_path / "a"), format="onnx"), "peftsurgery, peft")
    part = ps.apply(base("llama"), "prefix-tuning", num_tokens=P, init="random", targets="attn,blocks:0")
    raises_one_line(lambda: ps.save(part, str(tmp_path / "a"), format="peft"), "every self-attention")
    for method, options in [("lora", {}), ("adalora", {"init_r": 4, "target_r": 2})]:   # GPT-2's q, v slices
        sliced = ps.apply(base("gpt2"), method, **options)
        raises_one_line(lambda: ps.save(sliced, str(tmp_path / "a"), format="peft"), "slice of the fused",
                        "targets=attn.qkv")
    twice = ps.apply(base("gpt2"), "ia3", targets="attn.qkv,attn.k")
    raises_one_line(lambda: ps.save(twice, str(tmp_path / "a"), format="peft"),
                    "scales transformer.h.0.attn.c_attn twice")
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------- command line
def test_cli_export_both_ways_and_merge(tmp_path, capsys):
    from peftsurgery.cli import main
    from peftsurgery.zoo import load_model
    peft_folder("llama", peft.LoraConfig(r=4, lora_alpha=8), tmp_path / "peft", model=load_model("tiny-llama")[0])
    assert main(["export", "tiny-llama", str(tmp_path / "peft"), "--format", "peftsurgery", "-o",
                 str(tmp_path / "ours")]) == 0
    assert (tmp_path / "ours" / "adapter.json").exists()
    assert main(["export", "tiny-llama", str(tmp_path / "ours"), "-o", str(tmp_path / "back")]) == 0
    assert_bit_exact(tmp_path / "peft", tmp_path / "back")
    assert main(["merge", "tiny-llama", str(tmp_path / "peft"), "-o", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    (tmp_path / "peft" / "adapter_model.safetensors").rename(tmp_path / "peft" / "adapter_model.bin")
    assert main(["export", "tiny-llama", str(tmp_path / "peft"), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("peftsurgery: error: ") and "safe_serialization=True" in err[0]
