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
from .rewrite import SVD, LowRank, MagnitudeDirection, Prefix, Prompt, Quantize, Scale, ScaleInput
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


# ---------------------------------------------------------------------------------------------------- LoRA, DoRA
INERT_INITS = (True, False, "gaussian", "orthogonal", "eva")   # initialisations that leave the base weights as they are
LORA_PARTS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "M"}


def _ours(dora: bool) -> dict[str, str]:
    """Our state names of a site's LoRA factors and DoRA magnitude (DoRA's factors are in its LowRank branch)."""
    inner = "branch." if dora else ""
    return {"A": f"{inner}A.weight", "B": f"{inner}B.weight", "M": "magnitude"}


def _module(att: Attached, s: Site, sm: SiteMap, what: str) -> str:
    """The module path PEFT names for a site of `att`: whole linears only (slices of fused projections and weights
    used inside another module are refused)."""
    if s.fused:
        raise SurgeryError(f"adapter {att.name!r} puts {what} on {s.role}, a slice of the fused {s.fused}, and "
                           f"PEFT's {what} adapts whole modules; apply {att.method} with "
                           f"targets={sm.by_path(s.fused).role} to export it")
    if s.kind != "linear":
        raise SurgeryError(f"adapter {att.name!r} has {what} on {s.path}, a weight used inside another module, "
                           "which PEFT reaches only through target_parameters; save it in peftsurgery's format")
    return s.path


def _conv(model: nn.Module, paths) -> bool:
    """Whether any of these linears is transformers' Conv1D (PEFT's fan_in_fan_out)."""
    from .capture import Conv1D
    return bool(Conv1D) and any(isinstance(model.get_submodule(p), Conv1D) for p in paths)


def _check_lora_options(cfg: dict, directory: str) -> None:
    if cfg.get("bias", "none") != "none":
        raise SurgeryError(f"{directory} trains biases (bias={cfg['bias']!r}), which peftsurgery's LoRA does not "
                           "hold; use a PEFT adapter with bias='none'")
    init = cfg.get("init_lora_weights", True)
    if init not in INERT_INITS:
        raise SurgeryError(f"{directory} was initialised with init_lora_weights={init!r}, which changes the base "
                           "weights; convert it to a plain LoRA in PEFT (path_initial_model_for_weight_conversion)")


class LoraMapping(Mapping):
    """PEFT LoRA (rsLoRA, rank_pattern, alpha_pattern) <-> lora; with use_dora <-> dora (the magnitude vector
    lora_magnitude_vector is ours, one entry per output feature in both); qlora and a 4-bit dora export their
    float part."""
    peft_type = "LORA"
    methods = ("lora", "qlora", "dora")
    known = frozenset({"r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform",
                       "layers_pattern", "fan_in_fan_out", "use_rslora", "rank_pattern", "alpha_pattern",
                       "init_lora_weights", "bias", "megatron_core", "qalora_group_size", "loftq_config", "use_dora"})

    def check(self, cfg, directory):
        _check_lora_options(cfg, directory)

    def to_ours(self, cfg, tensors, sm, model, directory):
        r, alpha, rs = cfg.get("r", 8), cfg.get("lora_alpha", 8), bool(cfg.get("use_rslora"))
        dora = bool(cfg.get("use_dora"))
        rank_p, alpha_p = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        want = {"A", "B", "M"} if dora else {"A", "B"}
        factors: dict[str, dict[str, torch.Tensor]] = {}
        for k, t in tensors.items():
            m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)", k)
            if m is None or LORA_PARTS[m.group(2)] not in want:
                raise SurgeryError(f"{directory} holds {k}, which is not a {'DoRA' if dora else 'LoRA'} tensor of a "
                                   f"linear layer; peftsurgery reads lora_A/lora_B weights"
                                   f"{' and lora_magnitude_vector' if dora else ''} only")
            factors.setdefault(m.group(1), {})[LORA_PARTS[m.group(2)]] = t
        if not factors:
            raise SurgeryError(f"{directory} holds no LoRA factors; save the PEFT adapter again")
        groups: dict[tuple, list[str]] = {}
        for path, f in factors.items():
            if set(f) != want:
                lacks = sorted(want - set(f))[0]
                raise SurgeryError(f"{directory} has no {next(k for k, v in LORA_PARTS.items() if v == lacks)} for "
                                   f"{path}; save the PEFT adapter again")
            _site(sm, path, "DoRA" if dora else "LoRA", directory, ("linear",))
            rank = rank_p.get(_pattern_key(rank_p, path, directory), r)
            if f["A"].dim() != 2 or f["A"].shape[0] != rank:
                raise SurgeryError(f"{directory}: lora_A of {path} has shape {tuple(f['A'].shape)}, not rank {rank} "
                                   "as the config says; save the PEFT adapter again")
            a = alpha_p.get(_pattern_key(alpha_p, path, directory), alpha)
            groups.setdefault((rank, a), []).append(path)
        config = {"r": r, "alpha": alpha, "dropout": cfg.get("lora_dropout", 0.0), "rslora": rs}
        rule_type, names = (MagnitudeDirection if dora else LowRank), _ours(dora)
        ours, rules = {}, []
        for i, ((gr, ga), paths) in enumerate(groups.items()):
            rules.append(rule_type(_selector(paths, sm, rule_type.kinds), gr, ga, config["dropout"], rs))
            for p in paths:
                for part, t in factors[p].items():
                    ours[f"{i}.{_key(p)}.{names[part]}"] = t
        method = "dora" if dora else "lora"
        if len(groups) == 1:   # one rank and alpha: the method's own config says it all
            (gr, ga), paths = next(iter(groups.items()))
            return Converted(method, {**config, "r": gr, "alpha": ga, "targets": rules[0].targets}, ours)
        config["targets"] = _selector([p for ps in groups.values() for p in ps], sm, rule_type.kinds)
        return Converted(method, config, ours, rules)

    def to_peft(self, att, sm, model):
        recs = [r for r in att.records if not isinstance(r.rule, Quantize)]
        dora = bool(recs) and isinstance(recs[0].rule, MagnitudeDirection)
        rule_type = MagnitudeDirection if dora else LowRank
        if not recs or not all(type(r.rule) is rule_type for r in recs):
            raise SurgeryError(f"adapter {att.name!r} ({att.method}) has rules other than "
                               f"{'DoRA reparametrisations' if dora else 'low-rank branches'}; save it in "
                               "peftsurgery's format")
        if len(recs) != len(att.records):
            q = att.config
            warn(f"adapter {att.name!r}: PEFT keeps 4-bit quantization out of the adapter; load the base with "
                 f"transformers' BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', "
                 f"bnb_4bit_use_double_quant={getattr(q, 'double_quant', True)}) before PeftModel.from_pretrained")
        rs = bool(getattr(att.config, "rslora", False))
        r0, a0 = att.config.r, att.config.alpha
        what, names = ("DoRA" if dora else "LoRA"), _ours(dora)
        tensors, ranks, alphas, dropout = {}, {}, {}, 0.0
        for rec in recs:
            state, _ = rec.state()
            rule = rec.rule.lowrank if dora else rec.rule
            norm = math.sqrt(rule.r) if rs else rule.r   # scale = alpha / norm
            alpha = a0 if rule.scale == a0 / norm else float(f"{rule.scale * norm:.12g}")
            dropout = rule.dropout
            for s in rec.sites:
                path = _module(att, s, sm, what)
                ranks[path], alphas[path] = rule.r, alpha
                for theirs, part in LORA_PARTS.items():
                    if part != "M" or dora:
                        tensors[f"{PREFIX}{path}.{theirs}"] = state[f"{_key(s.path)}.{names[part]}"]
        cfg = {"r": r0, "lora_alpha": a0, "lora_dropout": dropout, "use_rslora": rs, "target_modules": sorted(ranks),
               "rank_pattern": {p: v for p, v in ranks.items() if v != r0},
               "alpha_pattern": {p: v for p, v in alphas.items() if v != a0},
               "fan_in_fan_out": _conv(model, ranks), "bias": "none", "use_dora": dora, "init_lora_weights": True}
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


class PTuningMapping(PromptMapping):
    """PEFT P-tuning -> prompt-tuning: PEFT saves its prompt encoder's output (folded), virtual tokens in front of
    the input as prompt tuning's, so the same vectors load as a prompt-tuning adapter (exported back as PEFT prompt
    tuning: same logits). Our p-tuning places soft tokens by a template, which PEFT's format cannot say."""
    peft_type = "P_TUNING"
    methods = ()
    known = PromptMapping.known | {"encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers",
                                   "encoder_dropout"}


ENC_DEC_MPT = ("PEFT's multitask prompt tuning on an encoder-decoder also puts task prompts before the decoder's "
               "tokens, which peftsurgery's multitask-prompt-tuning (encoder input only) cannot hold")


class MultitaskPromptMapping(Mapping):
    """PEFT multitask prompt tuning <-> multitask-prompt-tuning: the shared prompt (prompt_embeddings) and each
    task's factors, stacked by task id in PEFT (prefix_task_cols (tasks, tokens, r), prefix_task_rows (tasks, r,
    dim)), one u.TASK / v.TASK per task name in ours (PEFT's task ids are our tasks 0, 1, ... in order)."""
    peft_type = "MULTITASK_PROMPT_TUNING"
    methods = ("multitask-prompt-tuning",)
    prompt_learning = True
    known = PromptMapping.known | {"num_tasks", "num_ranks", "prompt_tuning_init_task",
                                   "prompt_tuning_init_state_dict_path"}

    def to_ours(self, cfg, tensors, sm, model, directory):
        if sm.encoder_decoder:
            raise SurgeryError(f"{directory}: {ENC_DEC_MPT}; use it with PEFT, or train ours on this model")
        parts = ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows")
        if sorted(tensors) != sorted(parts):
            raise SurgeryError(f"{directory}: expected the tensors {', '.join(parts)}, found "
                               f"{', '.join(sorted(tensors))}; save the PEFT adapter again")
        t, cols, rows = (tensors[k] for k in parts)
        n = cfg.get("num_virtual_tokens")
        if not isinstance(n, int) or t.dim() != 2 or t.shape[0] != n or cols.dim() != 3 or \
                cols.shape[:2] != rows.shape[:1] + (n,) or rows.shape[1:] != (cols.shape[2], t.shape[1]):
            raise SurgeryError(f"{directory}: prompt_embeddings {tuple(t.shape)}, prefix_task_cols "
                               f"{tuple(cols.shape)} and prefix_task_rows {tuple(rows.shape)} do not fit "
                               f"num_virtual_tokens={n!r}; save the PEFT adapter again")
        key = _key(Prompt(n, None).select(sm)[0].path)
        ours = {f"0.{key}.weight": t}
        for i in range(cols.shape[0]):
            ours[f"0.{key}.u.{i}"], ours[f"0.{key}.v.{i}"] = cols[i], rows[i]
        return Converted("multitask-prompt-tuning", {"num_tokens": n, "tasks": str(cols.shape[0]),
                                                     "r": cols.shape[2], "init": "random"}, ours)

    def to_peft(self, att, sm, model):
        rec = _one_record(att, Prompt)
        if sm.encoder_decoder:
            raise SurgeryError(f"adapter {att.name!r}: {ENC_DEC_MPT}; save it in peftsurgery's format")
        state, _ = rec.state()
        key, tasks = _key(rec.sites[0].path), rec.rule.tasks
        if tasks != [str(i) for i in range(len(tasks))]:
            warn(f"adapter {att.name!r}: PEFT numbers tasks, so {', '.join(tasks)} become task_ids "
                 f"0..{len(tasks) - 1} in that order")
        t = state[f"{key}.weight"]
        cols = torch.stack([state[f"{key}.u.{k}"] for k in tasks])
        rows = torch.stack([state[f"{key}.v.{k}"] for k in tasks])
        return {"num_virtual_tokens": t.shape[0], "token_dim": t.shape[1], "num_transformer_submodules": 1,
                "prompt_tuning_init": "RANDOM", "num_tasks": len(tasks), "num_ranks": cols.shape[2]}, {
            "prompt_embeddings": t, "prefix_task_cols": cols, "prefix_task_rows": rows}


# ---------------------------------------------------------------------------------------------------- prefix tuning
ENC_DEC_PREFIX = ("PEFT's prefix tuning on an encoder-decoder reaches the decoder's self-attention only (decoder "
                  "layer i reads PEFT layer 2i mod num_layers)")


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


# ---------------------------------------------------------------------------------------------------- AdaLoRA
# PEFT's option: (ours, PEFT's default); the rank schedule and its regulariser act in training only
ADALORA_OPTIONS = {"init_r": ("init_r", 12), "target_r": ("target_r", 8), "tinit": ("t_init", 0),
                   "tfinal": ("t_final", 0), "deltaT": ("delta_t", 1), "beta1": ("beta1", 0.85),
                   "beta2": ("beta2", 0.85), "orth_reg_weight": ("orth_reg_weight", 0.5),
                   "lora_alpha": ("alpha", 8), "lora_dropout": ("dropout", 0.0)}


class AdaLoraMapping(Mapping):
    """PEFT AdaLoRA <-> adalora: lora_B, lora_E (r x 1), lora_A are our P, E (r), Q. A saved PEFT AdaLoRA holds
    per module only the triplets its rank_pattern mask (init_r booleans) keeps, in order; ours holds the triplets
    that count and each site's rank. So a mask maps to its count, and a rank k < init_r exports as k True then
    False (PEFT reads only the count once saved). Both scale by lora_alpha / init_r (PEFT adds 1e-5 to init_r)."""
    peft_type = "ADALORA"
    methods = ("adalora",)
    known = frozenset({*ADALORA_OPTIONS, "r", "total_step", "rank_pattern", "target_modules", "exclude_modules",
                       "layers_to_transform", "layers_pattern", "fan_in_fan_out", "init_lora_weights", "bias",
                       "megatron_core", "qalora_group_size", "loftq_config"})

    def check(self, cfg, directory):
        _check_lora_options(cfg, directory)
        if not isinstance(cfg.get("lora_alpha", 8), (int, float)) or cfg.get("lora_alpha", 8) <= 0:
            raise SurgeryError(f"{directory} has lora_alpha={cfg.get('lora_alpha')!r}, where PEFT's AdaLoRA then "
                               "scales by the kept rank; save it with a positive lora_alpha")

    def to_ours(self, cfg, tensors, sm, model, directory):
        from .registry import Method
        init_r = cfg.get("init_r", ADALORA_OPTIONS["init_r"][1])
        masks = {}
        for k, v in (cfg.get("rank_pattern") or {}).items():
            if not k.endswith(".lora_E") or not isinstance(v, list) or len(v) != init_r or \
                    not all(isinstance(b, bool) for b in v):
                raise SurgeryError(f"{directory}: rank_pattern entry {k!r} is not a mask of init_r={init_r} "
                                   "booleans for a module's lora_E; save the PEFT adapter again")
            masks[k[:-len(".lora_E")]] = sum(v)
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for k, t in tensors.items():
            m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.lora_([ABE])", k)
            if m is None:
                raise SurgeryError(f"{directory} holds {k}, which is not an AdaLoRA tensor of a linear layer; "
                                   "peftsurgery reads lora_A/lora_B/lora_E only")
            parts.setdefault(m.group(1), {})[m.group(2)] = t
        if not parts or set(masks) - set(parts):
            raise SurgeryError(f"{directory} holds no AdaLoRA tensors for "
                               f"{(sorted(set(masks) - set(parts)) or ['any module'])[0]}; save the PEFT adapter again")
        ours, ranks = {}, {}
        for path, f in parts.items():
            s = _site(sm, path, "AdaLoRA", directory, ("linear",))
            k = masks.get(path, init_r)
            if set(f) != {"A", "B", "E"} or tuple(f["A"].shape) != (k, s.in_features) or \
                    tuple(f["B"].shape) != (s.out_features, k) or tuple(f["E"].shape) != (k, 1):
                raise SurgeryError(f"{directory}: lora_A/lora_B/lora_E of {path} do not hold the {k} triplets of a "
                                   f"{s.in_features}->{s.out_features} linear its config says; load it onto the "
                                   "model it was made for, or save it again")
            ranks[path] = k
            ours.update({f"0.{_key(path)}.P": f["B"], f"0.{_key(path)}.E": f["E"].reshape(k),
                         f"0.{_key(path)}.Q": f["A"]})
        config = {ours: cfg.get(theirs, default) for theirs, (ours, default) in ADALORA_OPTIONS.items()}
        config["targets"] = _selector(list(parts), sm, SVD.kinds)
        method = Method("adalora")
        rules = [r.loading({"ranks": ranks}) for r in method.rules(method.config(config), sm)]
        return Converted("adalora", config, ours, rules)

    def to_peft(self, att, sm, model):
        rec = _one_record(att, SVD)
        state, settings = rec.state()
        init_r, c = rec.rule.r, att.config
        tensors, pattern = {}, {}
        for s in rec.sites:
            path, key = _module(att, s, sm, "AdaLoRA"), _key(s.path)
            k = settings["ranks"][s.path]
            tensors.update({f"{PREFIX}{path}.lora_A": state[f"{key}.Q"], f"{PREFIX}{path}.lora_B": state[f"{key}.P"],
                            f"{PREFIX}{path}.lora_E": state[f"{key}.E"].reshape(k, 1)})
            if k < init_r:
                pattern[f"{path}.lora_E"] = [True] * k + [False] * (init_r - k)
        paths = [s.path for s in rec.sites]
        cfg = {theirs: getattr(c, ours) for theirs, (ours, _) in ADALORA_OPTIONS.items()}
        # PEFT requires a schedule length; the smallest it accepts (ours takes it from the training loop)
        return {**cfg, "init_r": init_r, "total_step": c.t_init + c.t_final + 1, "rank_pattern": pattern or None,
                "target_modules": sorted(paths), "fan_in_fan_out": _conv(model, paths), "bias": "none",
                "init_lora_weights": True}, tensors


# ---------------------------------------------------------------------------------------------------- IA3
class IA3Mapping(Mapping):
    """PEFT IA3 <-> ia3: ia3_l of a module (out, 1) scales its output (our Scale), of a feedforward module (1, in)
    its input (our ScaleInput). Export writes a scaled slice of a fused projection (GPT-2's attn.k inside c_attn)
    as the whole module's vector with ones on the other features, which computes the same."""
    peft_type = "IA3"
    methods = ("ia3",)
    known = frozenset({"target_modules", "feedforward_modules", "fan_in_fan_out", "init_ia3_weights",
                       "exclude_modules", "layers_to_transform", "layers_pattern"})

    def to_ours(self, cfg, tensors, sm, model, directory):
        ff = cfg.get("feedforward_modules") or []
        try:   # PEFT's rule: a string is a regular expression for the whole path, a list suffixes
            is_ff = (lambda p: bool(re.fullmatch(ff, p))) if isinstance(ff, str) else \
                (lambda p: any(p.endswith(x) for x in ff))
            is_ff("")
        except (re.error, TypeError):
            raise SurgeryError(f"{directory}: feedforward_modules={ff!r} is neither a regular expression nor a list "
                               "of module names; fix the PEFT config") from None
        out, inp = [], []
        vectors = {}
        for k, t in tensors.items():
            m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.ia3_l", k)
            if m is None:
                raise SurgeryError(f"{directory} holds {k}, which is not an IA3 vector; peftsurgery reads ia3_l only")
            path = m.group(1)
            s = _site(sm, path, "IA3", directory, ("linear",))
            feed = is_ff(path)
            shape = (1, s.in_features) if feed else (s.out_features, 1)
            if tuple(t.shape) != shape:
                raise SurgeryError(f"{directory}: ia3_l of {path} has shape {tuple(t.shape)}, this "
                                   f"{'feedforward ' if feed else ''}module needs {shape}; load it onto the model "
                                   "it was made for")
            (inp if feed else out).append(path)
            vectors[path] = t.reshape(-1)
        if not vectors:
            raise SurgeryError(f"{directory} holds no IA3 vectors; save the PEFT adapter again")
        rules, ours, config = [], {}, {}
        for field_name, rule_type, paths in (("targets", Scale, out), ("feedforward", ScaleInput, inp)):
            if paths:
                config[field_name] = _selector(paths, sm, rule_type.kinds)
                ours.update({f"{len(rules)}.{_key(p)}.weight": vectors[p] for p in paths})
                rules.append(rule_type(config[field_name]))
        # both kinds: the ia3 config says it all; one kind only: its rule alone (the config keeps its default)
        return Converted("ia3", config, ours, None if len(rules) == 2 else rules)

    def to_peft(self, att, sm, model):
        recs = [r for r in att.records if r.rule.phase]
        if not recs or not all(type(r.rule) in (Scale, ScaleInput) for r in recs):
            raise SurgeryError(f"adapter {att.name!r} ({att.method}) has rules other than IA3 scalings; save it in "
                               "peftsurgery's format")
        vectors: dict[str, torch.Tensor] = {}
        covered: dict[str, torch.Tensor] = {}
        feed: set[str] = set()
        for rec in recs:
            state, _ = rec.state()
            inp = isinstance(rec.rule, ScaleInput)
            for s in rec.sites:
                v = state[f"{_key(s.path)}.weight"].detach()
                path = s.fused or _module(att, s, sm, "IA3")
                n = len(v) if s.fused is None or inp else sm.by_path(s.fused).out_features
                a, b = s.rows or (0, n)
                if path in vectors and (inp or path in feed or bool(covered[path][a:b].any())):
                    raise SurgeryError(f"adapter {att.name!r} scales {path} twice (its input and output, or the "
                                       "same features), where PEFT's IA3 has one vector per module; save it in "
                                       "peftsurgery's format")
                if path not in vectors:
                    vectors[path] = torch.ones(n, dtype=v.dtype, device=v.device)
                    covered[path] = torch.zeros(n, dtype=torch.bool)
                vectors[path][a:b], covered[path][a:b] = v, True
                if inp:
                    feed.add(path)
        tensors = {f"{PREFIX}{p}.ia3_l": v.view(1, -1) if p in feed else v.view(-1, 1) for p, v in vectors.items()}
        ff: list | str = sorted(feed)
        if any(p.endswith(x) for p in vectors if p not in feed for x in ff):   # PEFT matches list entries as suffixes
            ff = "|".join(re.escape(p) for p in ff)
        return {"target_modules": sorted(vectors), "feedforward_modules": ff,
                "fan_in_fan_out": _conv(model, vectors), "init_ia3_weights": True}, tensors


MAPPINGS: tuple[Mapping, ...] = (LoraMapping(), AdaLoraMapping(), IA3Mapping(), PromptMapping(), PTuningMapping(),
                                  PrefixMapping(), MultitaskPromptMapping())
