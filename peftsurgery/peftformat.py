"""PEFT's adapter format (adapter_config.json + adapter_model.safetensors, as PEFT 0.21 writes it), both ways.

Reading turns a PEFT folder into what peftsurgery's own loader takes (method, config, tensors keyed
"rule.site/path.param", and rules where the method's config cannot express them), so loading a PEFT folder gets
every check and the all-or-nothing attach of io.load. Writing turns an attached adapter into a folder that
PEFT's `PeftModel.from_pretrained` loads. Tensors are matched to sites by module path (PEFT keys are
"base_model.model.<module path>.<name>"); nothing here depends on a model's class or names.

One PEFT method maps to one of ours through one `Mapping` in MAPPINGS: `to_ours` and `to_peft`. Everything a
mapping does not understand is refused in one line; nothing is unpickled (adapter_model.bin is refused).
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import SurgeryError
from .rewrite import LowRank, Prefix, Prompt, Quantize
from .sites import Site, SiteMap
from .surgery import Attached, _get, _key, sitemap

CONFIG, WEIGHTS, PICKLE = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PREFIX = "base_model.model."
UNSET = (None, False, "", "none", {}, [])     # a PEFT option left at one of these is not in use


class PeftFormatWarning(UserWarning):
    """A PEFT folder loads (or an adapter exports) but computes differently there, or needs something the
    folder cannot hold; the message says what."""


@dataclass
class Converted:
    """A PEFT adapter in peftsurgery's terms, ready for io.load."""
    method: str
    config: dict
    tensors: dict[str, torch.Tensor]
    rules: list | None = None      # None: the method's own rules for `config`
    notes: list[str] = field(default_factory=list)


def is_peft(directory: str) -> bool:
    """A folder in PEFT's format (and not in ours)."""
    return os.path.isdir(directory) and not os.path.exists(os.path.join(directory, "adapter.json")) and (
        os.path.exists(os.path.join(directory, CONFIG)) or os.path.exists(os.path.join(directory, PICKLE)))


def read(directory: str, model: nn.Module, sm: SiteMap) -> Converted:
    """Convert the PEFT adapter in `directory` for this model; one-line SurgeryError for anything not mapped."""
    cpath, wpath = os.path.join(directory, CONFIG), os.path.join(directory, WEIGHTS)
    if not os.path.exists(wpath):
        if os.path.exists(os.path.join(directory, PICKLE)):
            raise SurgeryError(f"{directory} holds {PICKLE}, a pickle, which peftsurgery never loads; convert it "
                               "where it was made: load it with PEFT and save_pretrained(dir, safe_serialization=True)")
        raise SurgeryError(f"{directory} has {CONFIG} but no {WEIGHTS}; save the PEFT adapter again")
    try:
        with open(cpath) as f:
            cfg = json.load(f)
        peft_type = cfg["peft_type"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise SurgeryError(f"{cpath} is corrupted (not a PEFT adapter config); save the adapter again") from None
    try:
        tensors = load_file(wpath)
    except (SafetensorError, OSError, ValueError) as e:
        raise SurgeryError(f"{wpath} is corrupted ({str(e).splitlines()[0][:80]}); save the adapter again") from None
    mapping = next((m for m in MAPPINGS if m.peft_type == peft_type), None)
    if mapping is None:
        raise SurgeryError(f"{directory} is a PEFT {peft_type} adapter; peftsurgery reads PEFT's "
                           f"{', '.join(m.peft_type for m in MAPPINGS)} so far")
    if cfg.get("modules_to_save"):
        raise SurgeryError(f"{directory} trains full copies of {', '.join(cfg['modules_to_save'])} "
                           "(PEFT modules_to_save), which no peftsurgery rule holds yet; save the PEFT adapter "
                           "without modules_to_save")
    mapping.check(cfg, directory)
    for k, v in cfg.items():
        if k not in mapping.known and k not in COMMON and v not in UNSET:
            raise SurgeryError(f"{directory}: PEFT option {k}={v!r} is not supported by peftsurgery; "
                               "use a PEFT adapter without it")
    task = cfg.get("task_type")
    if mapping.prompt_learning and (task == "SEQ_2_SEQ_LM") != sm.encoder_decoder:
        raise SurgeryError(f"{directory} was made for {'an' if task == 'SEQ_2_SEQ_LM' else 'a non'}-encoder-"
                           f"decoder model (task_type {task}), this {type(model).__name__} is "
                           f"{'' if sm.encoder_decoder else 'not '}one; load it onto the model it was made for")
    return mapping.to_ours(cfg, tensors, sm, model, directory)


def save(model: nn.Module, directory: str, name: str = "default") -> str:
    """Write adapter `name` as a PEFT folder (created or replaced atomically)."""
    from .io import atomic_dir
    att = _get(model, name)
    mapping = next((m for m in MAPPINGS if att.method in m.methods), None)
    if mapping is None:
        raise SurgeryError(f"method {att.method} has no counterpart in PEFT's adapter format (it maps "
                           f"{', '.join(n for m in MAPPINGS for n in m.methods)}); save it in peftsurgery's format")
    sm = sitemap(model)
    cfg, tensors = mapping.to_peft(att, sm, model)
    cfg = {"peft_type": mapping.peft_type, "task_type": _task_type(model, sm), "inference_mode": True,
           "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
           "modules_to_save": None, **cfg}
    with atomic_dir(directory) as tmp:
        save_file({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()},
                  os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
    return os.path.abspath(directory)


def _task_type(model: nn.Module, sm: SiteMap) -> str | None:
    """PEFT's task_type, which picks the PeftModel class that applies prompts: from the sites, not names."""
    if not hasattr(model, "config"):
        return None   # not a transformers model: PEFT's plain PeftModel
    if sm.encoder_decoder:
        return "SEQ_2_SEQ_LM"
    attn = [s for s in sm if s.kind == "attention"]
    return "CAUSAL_LM" if attn and all(s.causal for s in attn) else "FEATURE_EXTRACTION"


def warn(note: str) -> None:
    """From a mapping's to_peft: the warning points at the caller of peftsurgery.save."""
    warnings.warn(note, PeftFormatWarning, stacklevel=5)


# fields every PEFT config has that change nothing a loaded adapter computes
COMMON = {"peft_type", "task_type", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
          "auto_mapping", "modules_to_save"}


def _selector(paths: list[str], sm: SiteMap, kinds: tuple[str, ...]) -> str:
    """A selector choosing exactly these sites: by roles where the roles choose no others, else by path."""
    roles = ",".join(sorted({sm.by_path(p).role for p in paths}))
    try:
        if {s.path for s in sm.select(roles, kinds)} == set(paths):
            return roles
    except SurgeryError:
        pass
    return ",".join(f"path:{p}" for p in paths)


def _site(sm: SiteMap, path: str, what: str, directory: str, kinds: tuple[str, ...]) -> Site:
    try:
        s = sm.by_path(path)
    except KeyError:
        raise SurgeryError(f"{directory} targets {path}, which this model does not have; load it onto the model "
                           "it was made for") from None
    if s.kind not in kinds:
        raise SurgeryError(f"{directory} puts {what} on {path}, a {s.kind} site here; peftsurgery holds {what} on "
                           f"{'/'.join(kinds)} sites only")
    return s


def _prompt_tensor(tensors: dict, directory: str) -> torch.Tensor:
    extra = sorted(set(tensors) - {"prompt_embeddings"})
    if "prompt_embeddings" not in tensors or extra:
        raise SurgeryError(f"{directory}: expected one tensor prompt_embeddings, found "
                           f"{(extra or ['none'])[0]}; save the PEFT adapter again")
    return tensors["prompt_embeddings"]


def _one_record(att: Attached, rule_type: type):
    recs = [r for r in att.records if r.rule.phase]
    if len(recs) != 1 or not isinstance(recs[0].rule, rule_type):
        raise SurgeryError(f"adapter {att.name!r} ({att.method}) is not made of one {rule_type.__name__} rule; "
                           "save it in peftsurgery's format")
    return recs[0]


class Mapping:
    """One PEFT method <-> our methods. `known`: the PEFT config fields it reads or knows to be harmless (any
    other field set to a value in use is refused)."""
    peft_type = ""
    methods: tuple[str, ...] = ()
    known: frozenset = frozenset()
    prompt_learning = False

    def check(self, cfg: dict, directory: str) -> None:
        """Refuse, with a specific message, options that have one (before the generic check of unknown ones)."""

    def to_ours(self, cfg: dict, tensors: dict, sm: SiteMap, model: nn.Module, directory: str) -> Converted:
        raise NotImplementedError

    def to_peft(self, att: Attached, sm: SiteMap, model: nn.Module) -> tuple[dict, dict]:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------- LoRA
INERT_INITS = (True, False, "gaussian", "orthogonal", "eva")   # initialisations that leave the base weights as they are


class LoraMapping(Mapping):
    """PEFT LoRA (rsLoRA, rank_pattern, alpha_pattern) <-> lora; qlora exports its LoRA part."""
    peft_type = "LORA"
    methods = ("lora", "qlora")
    known = frozenset({"r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform",
                       "layers_pattern", "fan_in_fan_out", "use_rslora", "rank_pattern", "alpha_pattern",
                       "init_lora_weights", "bias", "megatron_core", "qalora_group_size", "loftq_config"})

    def check(self, cfg, directory):
        if cfg.get("use_dora"):
            raise SurgeryError(f"{directory} is a DoRA adapter (use_dora), which peftsurgery does not read yet")
        if cfg.get("bias", "none") != "none":
            raise SurgeryError(f"{directory} trains biases (bias={cfg['bias']!r}), which peftsurgery's LoRA does not "
                               "hold; use a PEFT adapter with bias='none'")
        init = cfg.get("init_lora_weights", True)
        if init not in INERT_INITS:
            raise SurgeryError(f"{directory} was initialised with init_lora_weights={init!r}, which changes the base "
                               "weights; convert it to a plain LoRA in PEFT (path_initial_model_for_weight_conversion)")

    def to_ours(self, cfg, tensors, sm, model, directory):
        r, alpha, rs = cfg.get("r", 8), cfg.get("lora_alpha", 8), bool(cfg.get("use_rslora"))
        rank_p, alpha_p = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        factors: dict[str, dict[str, torch.Tensor]] = {}
        for k, t in tensors.items():
            m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.lora_([AB])\.weight", k)
            if m is None:
                raise SurgeryError(f"{directory} holds {k}, which is not a LoRA factor of a linear layer; "
                                   "peftsurgery reads lora_A/lora_B weights only")
            factors.setdefault(m.group(1), {})[m.group(2)] = t
        if not factors:
            raise SurgeryError(f"{directory} holds no LoRA factors; save the PEFT adapter again")
        groups: dict[tuple, list[str]] = {}
        for path, f in factors.items():
            if set(f) != {"A", "B"}:
                raise SurgeryError(f"{directory} has lora_{next(iter(f))} but not its pair for {path}; save the "
                                   "PEFT adapter again")
            _site(sm, path, "LoRA", directory, ("linear",))
            want = rank_p.get(_pattern_key(rank_p, path, directory), r)
            if f["A"].dim() != 2 or f["A"].shape[0] != want:
                raise SurgeryError(f"{directory}: lora_A of {path} has shape {tuple(f['A'].shape)}, not rank {want} "
                                   "as the config says; save the PEFT adapter again")
            a = alpha_p.get(_pattern_key(alpha_p, path, directory), alpha)
            groups.setdefault((want, a), []).append(path)
        config = {"r": r, "alpha": alpha, "dropout": cfg.get("lora_dropout", 0.0), "rslora": rs}
        ours, rules = {}, []
        for i, ((gr, ga), paths) in enumerate(groups.items()):
            sel = _selector(paths, sm, LowRank.kinds)
            rules.append(LowRank(sel, gr, ga, config["dropout"], rs))
            for p in paths:
                ours[f"{i}.{_key(p)}.A.weight"] = factors[p]["A"]
                ours[f"{i}.{_key(p)}.B.weight"] = factors[p]["B"]
        if len(groups) == 1:   # one rank and alpha: the lora method's own config says it all
            (gr, ga), paths = next(iter(groups.items()))
            return Converted("lora", {**config, "r": gr, "alpha": ga, "targets": rules[0].targets}, ours)
        config["targets"] = _selector([p for ps in groups.values() for p in ps], sm, LowRank.kinds)
        return Converted("lora", config, ours, rules)

    def to_peft(self, att, sm, model):
        from .capture import Conv1D
        recs = [r for r in att.records if not isinstance(r.rule, Quantize)]
        if not recs or not all(isinstance(r.rule, LowRank) for r in recs):
            raise SurgeryError(f"adapter {att.name!r} ({att.method}) has rules other than low-rank branches; save "
                               "it in peftsurgery's format")
        if len(recs) != len(att.records):
            q = att.config
            warn(f"adapter {att.name!r}: PEFT keeps 4-bit quantization out of the adapter; load the base with "
                 f"transformers' BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', "
                 f"bnb_4bit_use_double_quant={getattr(q, 'double_quant', True)}) before PeftModel.from_pretrained")
        rs = bool(getattr(att.config, "rslora", False))
        r0, a0 = att.config.r, att.config.alpha
        tensors, ranks, alphas, conv, dropout = {}, {}, {}, False, 0.0
        for rec in recs:
            state, _ = rec.state()
            rule = rec.rule
            norm = math.sqrt(rule.r) if rs else rule.r   # scale = alpha / norm
            alpha = a0 if rule.scale == a0 / norm else float(f"{rule.scale * norm:.12g}")
            dropout = rule.dropout
            for s in rec.sites:
                if s.kind != "linear":
                    raise SurgeryError(f"adapter {att.name!r} has a branch on {s.path}, a weight used inside another "
                                       "module, which PEFT's LoRA reaches only through target_parameters; save it "
                                       "in peftsurgery's format")
                conv |= bool(Conv1D) and isinstance(model.get_submodule(s.path), Conv1D)
                ranks[s.path], alphas[s.path] = rule.r, alpha
                for ours, theirs in (("A", "lora_A"), ("B", "lora_B")):
                    tensors[f"{PREFIX}{s.path}.{theirs}.weight"] = state[f"{_key(s.path)}.{ours}.weight"]
        cfg = {"r": r0, "lora_alpha": a0, "lora_dropout": dropout, "use_rslora": rs, "target_modules": sorted(ranks),
               "rank_pattern": {p: v for p, v in ranks.items() if v != r0},
               "alpha_pattern": {p: v for p, v in alphas.items() if v != a0},
               "fan_in_fan_out": conv, "bias": "none", "use_dora": False, "init_lora_weights": True}
        return cfg, tensors


def _pattern_key(patterns: dict, path: str, directory: str) -> str:
    """PEFT's rule for rank_pattern / alpha_pattern: the first key that, as a regular expression, matches the end
    of the module path at a dot boundary."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", path):
                return key
        except re.error:
            raise SurgeryError(f"{directory}: pattern {key!r} is not a valid regular expression; fix the "
                               "PEFT config") from None
    return path


# ---------------------------------------------------------------------------------------------------- prompt tuning
ENC_DEC_PROMPT = ("PEFT's prompt tuning on an encoder-decoder lets the decoder attend to the virtual tokens' "
                  "encoder outputs; peftsurgery trims them, so the decoder's outputs differ (the encoder's agree)")


class PromptMapping(Mapping):
    """PEFT prompt tuning <-> prompt-tuning: the (num_virtual_tokens, dim) vectors at the input embedding. On an
    encoder-decoder PEFT stores 2 x num_virtual_tokens rows and reads only the first half (the encoder's)."""
    peft_type = "PROMPT_TUNING"
    methods = ("prompt-tuning",)
    prompt_learning = True
    known = frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                       "num_layers", "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                       "tokenizer_kwargs"})

    def to_ours(self, cfg, tensors, sm, model, directory):
        t = _prompt_tensor(tensors, directory)
        n = cfg.get("num_virtual_tokens")
        if not isinstance(n, int) or t.dim() != 2 or t.shape[0] < n:
            raise SurgeryError(f"{directory}: prompt_embeddings of shape {tuple(t.shape)} does not hold "
                               f"num_virtual_tokens={n!r} vectors; save the PEFT adapter again")
        embed = Prompt(n, None).select(sm)[0]
        notes = [f"{directory}: {ENC_DEC_PROMPT}"] if sm.encoder_decoder else []
        return Converted("prompt-tuning", {"num_tokens": n, "init": "random"},
                         {f"0.{_key(embed.path)}.weight": t[:n]}, notes=notes)

    def to_peft(self, att, sm, model):
        rec = _one_record(att, Prompt)
        state, _ = rec.state()
        path = rec.sites[0].path
        if set(state) != {f"{_key(path)}.weight"}:
            raise SurgeryError(f"adapter {att.name!r} runs its prompt through an encoder, which PEFT's prompt "
                               "tuning does not hold; save it in peftsurgery's format")
        if sm.encoder_decoder:
            warn(f"adapter {att.name!r}: {ENC_DEC_PROMPT}")
        t = state[f"{_key(path)}.weight"]
        # one submodule: PEFT allocates num_virtual_tokens rows only (its decoder half is never read by prompt tuning)
        return {"num_virtual_tokens": t.shape[0], "token_dim": t.shape[1], "num_transformer_submodules": 1,
                "prompt_tuning_init": "RANDOM"}, {"prompt_embeddings": t}


# ---------------------------------------------------------------------------------------------------- prefix tuning
ENC_DEC_PREFIX = ("PEFT's prefix tuning on an encoder-decoder reaches the decoder's self-attention only (decoder "
                  "layer i reads PEFT layer 2i mod num_layers); the model's own position bias (T5's relative bias) "
                  "sees the prefix as positions before the decoder's tokens under PEFT and is zero for it here, so "
                  "outputs agree only where that bias is zero")


def _prefix_sites(sm: SiteMap) -> list[Site]:
    """The attention sites PEFT's prefix reaches, in layer order: every self-attention of a decoder-only model;
    the decoder's (causal) self-attention of an encoder-decoder."""
    return [s for s in sm if s.kind == "attention" and s.role == "attn" and (s.causal or not sm.encoder_decoder)]


def _slot(i: int, layers: int, enc_dec: bool) -> int:
    """Which of PEFT's layers site i reads: PEFT doubles an encoder-decoder's (tokens, layers, 2, ...) tensor
    along the layers and hands each decoder layer the next 4 entries, so decoder layer i gets layer 2i mod L."""
    return (2 * i) % layers if enc_dec else i


class PrefixMapping(Mapping):
    """PEFT prefix tuning (with or without projection) <-> prefix-tuning. PEFT saves the prefix as past_key_values,
    (num_virtual_tokens, num_layers * 2 * kv_heads * head_dim) with keys and values of a layer side by side; with
    prefix_projection it saves the MLP's output, as peftsurgery does, so the MLP itself never travels."""
    peft_type = "PREFIX_TUNING"
    methods = ("prefix-tuning",)
    prompt_learning = True
    known = frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                       "num_layers", "encoder_hidden_size", "prefix_projection"})

    def to_ours(self, cfg, tensors, sm, model, directory):
        t = _prompt_tensor(tensors, directory)
        n, layers = cfg.get("num_virtual_tokens"), cfg.get("num_layers")
        sites = _prefix_sites(sm)
        if len(sites) != layers:
            raise SurgeryError(f"{directory} holds prefixes for {layers} layers, this model has {len(sites)} "
                               f"{'decoder ' if sm.encoder_decoder else ''}self-attention layers; load it onto the "
                               "model it was made for")
        subs = cfg.get("num_transformer_submodules") or (2 if sm.encoder_decoder else 1)
        if subs != (2 if sm.encoder_decoder else 1):
            raise SurgeryError(f"{directory} has num_transformer_submodules={subs}, which PEFT's prefix tuning does "
                               "not use on this kind of model; save the PEFT adapter with the default")
        kvh, hd = sites[0].kv_heads, sites[0].head_dim
        if any((s.kv_heads, s.head_dim) != (kvh, hd) for s in sites) or tuple(t.shape) != (n, layers * 2 * kvh * hd):
            raise SurgeryError(f"{directory}: prompt_embeddings has shape {tuple(t.shape)}, this model's "
                               f"{layers} layers of {kvh} x {hd} keys need ({n}, {layers * 2 * kvh * hd}); load it "
                               "onto the model it was made for")
        kv = t.view(n, 2 * layers, kvh, hd)
        ours = {}
        for i, s in enumerate(sites):
            j = _slot(i, layers, sm.encoder_decoder)
            ours[f"0.{_key(s.path)}.key"] = kv[:, 2 * j].transpose(0, 1).contiguous()
            ours[f"0.{_key(s.path)}.value"] = kv[:, 2 * j + 1].transpose(0, 1).contiguous()
        config = {"num_tokens": n, "init": "random", "targets": _selector([s.path for s in sites], sm, Prefix.kinds),
                  "projection": int(cfg.get("encoder_hidden_size") or 0) if cfg.get("prefix_projection") else 0}
        return Converted("prefix-tuning", config, ours,
                         notes=[f"{directory}: {ENC_DEC_PREFIX}"] if sm.encoder_decoder else [])

    def to_peft(self, att, sm, model):
        rec = _one_record(att, Prefix)
        sites = _prefix_sites(sm)
        if [s.path for s in rec.sites] != [s.path for s in sites]:
            where = "the decoder's self-attention" if sm.encoder_decoder else "every self-attention"
            raise SurgeryError(f"adapter {att.name!r} puts prefixes on other attention sites than PEFT does "
                               f"({where}); apply prefix-tuning with targets="
                               f"{_selector([s.path for s in sites], sm, Prefix.kinds)} to export it")
        kvh, hd = sites[0].kv_heads, sites[0].head_dim
        if any((s.kv_heads, s.head_dim) != (kvh, hd) for s in sites):
            raise SurgeryError(f"adapter {att.name!r}: PEFT's prefix has one key shape for all layers, this model's "
                               "attention layers differ; save it in peftsurgery's format")
        state, _ = rec.state()
        n, layers = state[f"{_key(sites[0].path)}.key"].shape[1], len(sites)
        kv = torch.zeros(n, 2 * layers, kvh, hd, dtype=state[f"{_key(sites[0].path)}.key"].dtype)
        owner: dict[int, str] = {}
        for i, s in enumerate(sites):
            j = _slot(i, layers, sm.encoder_decoder)
            k, v = (state[f"{_key(s.path)}.{x}"].transpose(0, 1) for x in ("key", "value"))
            if j in owner and not (torch.equal(kv[:, 2 * j], k) and torch.equal(kv[:, 2 * j + 1], v)):
                raise SurgeryError(f"adapter {att.name!r}: PEFT's layout gives {owner[j]} and {s.path} one prefix "
                                   "(decoder layer i reads layer 2i mod num_layers) and they differ here; save it "
                                   "in peftsurgery's format")
            owner[j] = s.path
            kv[:, 2 * j], kv[:, 2 * j + 1] = k, v
        if sm.encoder_decoder:
            warn(f"adapter {att.name!r}: {ENC_DEC_PREFIX}")
        projection = getattr(att.config, "projection", 0)
        return {"num_virtual_tokens": n, "num_layers": layers, "token_dim": kvh * hd, "num_attention_heads": kvh,
                "num_transformer_submodules": 2 if sm.encoder_decoder else 1, "prefix_projection": bool(projection),
                "encoder_hidden_size": projection or kvh * hd}, {"prompt_embeddings": kv.reshape(n, -1)}


MAPPINGS: tuple[Mapping, ...] = (LoraMapping(), PromptMapping(), PrefixMapping())
