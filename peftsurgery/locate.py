"""locate(model) -> SiteMap: capture the computation, analyse it, map repeated blocks."""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import time
import warnings
from collections import OrderedDict

import torch
from torch import nn

from . import capture
from .analyze import analyse
from .checks import one_line
from .errors import SurgeryError
from .sites import CONTAINER, Site, SiteMap

SEQ = 8


class RolesByNameWarning(UserWarning):
    """Some roles were guessed from module names: neither torch.export nor torch.fx captured the model."""


class UnreadWarning(UserWarning):
    """Some parameters are used only inside a part of the forward the analysis cannot enter: they have no sites."""


def _setting(cfg, name: str):
    """A config value, from the config itself or else from one of its sub-configs (CLIP's vision_config)."""
    value = getattr(cfg, name, None)
    if value is None and cfg is not None:
        value = next((getattr(sub, name) for sub in vars(cfg).values()
                      if hasattr(sub, "to_dict") and getattr(sub, name, None) is not None), None)
    return value


def _samples(cfg) -> int:
    """Raw audio samples that a convolutional feature encoder (conv_kernel / conv_stride) turns into SEQ frames."""
    n = SEQ
    for k, s in reversed(list(zip(_setting(cfg, "conv_kernel") or (), _setting(cfg, "conv_stride") or ()))):
        n = (n - 1) * s + k
    return n if n > SEQ else 400 * SEQ


def example_inputs(model: nn.Module) -> dict:
    """Small inputs built from the forward signature and the config, on the model's device (meta models get meta
    tensors): token ids (and an all-ones attention mask), pixel values (config image_size / num_channels), log-mel
    features (num_mel_bins x 2 * max_source_positions), raw audio, decoder ids for encoder-decoders, and
    use_cache=False."""
    params = inspect.signature(model.forward).parameters
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = next((q.dtype for q in model.parameters() if q.is_floating_point()), torch.float32)
    cfg = getattr(model, "config", None)
    kw: dict = {}
    if "input_ids" in params:
        kw["input_ids"] = torch.ones(1, SEQ, dtype=torch.long, device=device)
        if "attention_mask" in params:   # some models build a missing one only when not traced
            kw["attention_mask"] = torch.ones(1, SEQ, dtype=torch.long, device=device)
    # images of the config's size (else 64 x 64, which a ConvNet's stride-32 stem still leaves pixels of)
    size = _setting(cfg, "image_size") or (64 if cfg is not None else None)
    # a model that takes images (or sounds) as placeholder tokens in input_ids (Llava-, Qwen2-Audio-like) runs on
    # the ids alone
    in_text = any(_setting(cfg, k) is not None for k in ("image_token_id", "image_token_index"))
    heard = any(_setting(cfg, k) is not None for k in ("audio_token_id", "audio_token_index"))
    if "pixel_values" in params and size and not in_text:
        hw = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        kw["pixel_values"] = torch.zeros(1, _setting(cfg, "num_channels") or 3, *hw, dtype=dtype, device=device)
    bins = _setting(cfg, "num_mel_bins")
    if "input_features" in params and bins and not heard:
        frames = 2 * (_setting(cfg, "max_source_positions") or SEQ)
        kw["input_features"] = torch.zeros(1, bins, frames, dtype=dtype, device=device)
    elif "input_features" in params and not heard and (per := _setting(cfg, "input_feat_per_channel")):
        # frames first (Speech2Text): enough for its convolutional subsampling to leave SEQ of them
        frames = SEQ * 2 ** len(_setting(cfg, "conv_kernel_sizes") or (1, 1))
        kw["input_features"] = torch.zeros(1, frames, per * (_setting(cfg, "input_channels") or 1), dtype=dtype,
                                           device=device)
    if "input_values" in params and not kw:
        if bins and _setting(cfg, "max_length"):   # a spectrogram, frames first (Audio Spectrogram Transformer)
            kw["input_values"] = torch.zeros(1, _setting(cfg, "max_length"), bins, dtype=dtype, device=device)
        else:   # raw audio
            kw["input_values"] = torch.zeros(1, _samples(cfg), dtype=dtype, device=device)
    if kw:
        if getattr(cfg, "is_encoder_decoder", False) and "decoder_input_ids" in params:
            kw["decoder_input_ids"] = torch.ones(1, SEQ // 2, dtype=torch.long, device=device)
        takes_more = any(q.kind == q.VAR_KEYWORD for q in params.values())
        # **kwargs reaching a decoder (whose setting may be in a sub-config: Llava's text_config)
        if "use_cache" in params or (takes_more and _setting(cfg, "use_cache") is not None):
            kw["use_cache"] = False
        return kw
    first = next((n for n, q in params.items() if q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)), None)
    if first is None:
        raise SurgeryError(f"cannot guess inputs for {type(model).__name__}.forward: pass example_inputs")
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return {first: torch.ones(1, SEQ, dtype=torch.long, device=device)}
        if capture.is_linear_module(m):
            return {first: torch.zeros(1, SEQ, capture.linear_shape(m)[0], device=device, dtype=m.weight.dtype)}
        if isinstance(m, nn.MultiheadAttention):
            return {first: torch.zeros(1, SEQ, m.embed_dim, device=device)}
    raise SurgeryError(f"cannot guess inputs for {type(model).__name__}: pass example_inputs")


def _signature(m: nn.Module) -> tuple:
    return (type(m),) + tuple((n, type(x).__name__) for n, x in m.named_modules()) + \
        tuple((n, tuple(p.shape), p.dtype) for n, p in m.named_parameters())


def _repeated_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList, list[int], dict[int, list[int]]]]:
    """ModuleLists of repeated blocks: (path, list, representative indices, rep -> all members)."""
    found, taken = [], []
    for path, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 2 or any(path.startswith(t + ".") for t in taken):
            continue
        groups: OrderedDict = OrderedDict()
        for i, child in enumerate(m):
            groups.setdefault(_signature(child), []).append(i)
        if len(groups) < len(m):
            reps = [members[0] for members in groups.values()]
            found.append((path, m, sorted(reps), {members[0]: members for members in groups.values()}))
            taken.append(path)
    return found


def _rename(site: Site, path: str, old: int, new: int) -> Site:
    a, b = f"{path}.{old}", f"{path}.{new}"
    sub = lambda p: (b + p[len(a):]) if p and (p == a or p.startswith(a + ".")) else p
    s = Site(**{**site.__dict__, "inputs": {k: sub(v) for k, v in site.inputs.items()}})
    s.path, s.producer, s.consumer, s.runner = sub(site.path), sub(site.producer), sub(site.consumer), sub(site.runner)
    if s.stack == path:
        s.block = new
    return s


@contextlib.contextmanager
def _quiet():
    """Silence torch's warnings, log lines and printed partial graphs while tracing: a failed trace is reported
    once, by locate."""
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(before)


@contextlib.contextmanager
def _loop_free(model: nn.Module):
    """Mixture-of-experts layers that transformers runs as a Python loop over the experts hit (a data-dependent
    loop no tracer follows) are traced with its batched implementation instead: the same stacked weights, used
    the same way (the sites found hold for either)."""
    cfgs = {id(c): c for m in model.modules() if getattr(c := getattr(m, "config", None), "_experts_implementation",
                                                                 None) == "eager"}
    for c in cfgs.values():
        c._experts_implementation = "batched_mm"
    try:
        yield
    finally:
        for c in cfgs.values():
            c._experts_implementation = "eager"


@contextlib.contextmanager
def _hooks_kept(model: nn.Module):
    """transformers installs its output-capturing forward hooks once, at the first forward that records hidden
    states, on the modules present then. A trace with the repeated lists shortened would leave the other layers
    without them for good (DPT's neck then got 2 hidden states of 4): what a trace installs is taken off again, to
    be installed at the model's next forward."""
    flag = "_output_capturing_hooks_installed"
    before = [(m, set(m._forward_hooks), flag in m.__dict__) for m in model.modules()]
    try:
        yield
    finally:
        if any(flag in m.__dict__ and not had for m, _, had in before):
            for m, hooks, had in before:
                for k in set(m._forward_hooks) - hooks:
                    del m._forward_hooks[k]
                    m._forward_hooks_with_kwargs.pop(k, None)
                    m._forward_hooks_always_called.pop(k, None)
                if not had:
                    m.__dict__.pop(flag, None)


def _traced(how, model: nn.Module, kwargs: dict) -> capture.Graph:
    if how is capture.by_hooks:  # runs the model for real: its warnings are the user's to see
        return how(model, kwargs)
    with _quiet(), _loop_free(model):
        return how(model, kwargs)


def _capture(model: nn.Module, kwargs: dict) -> tuple[capture.Graph, list[str]]:
    """The graph of the first way that works, and why the ways before it failed."""
    errors = []
    for how in (capture.by_export, capture.by_real_export, capture.by_fx, capture.by_hooks):
        try:
            return _traced(how, model, kwargs), errors
        except Exception as e:  # each way fails on some models; the next one is tried
            errors.append(f"{how.__name__}: {one_line(e, 120)}")
    raise SurgeryError("could not capture the model (" + "; ".join(errors) + "); pass example_inputs that run it")


def locate(model: nn.Module, example_inputs: dict | tuple | None = None, strict: bool = False) -> SiteMap:
    """Find the sites of a model. example_inputs: kwargs for forward (a dict) or positional args (a tuple).

    When neither torch.export nor torch.fx captures the model, roles come from module names (found_by
    "hooks+name"): that is announced with a RolesByNameWarning, or refused with a SurgeryError if strict."""
    t0 = time.perf_counter()
    if example_inputs is None:
        kwargs = globals()["example_inputs"](model)
    elif isinstance(example_inputs, dict):
        kwargs = dict(example_inputs)
    else:
        names = [n for n in inspect.signature(model.forward).parameters]
        kwargs = dict(zip(names, example_inputs))
    was_training = model.training
    model.eval()
    try:
        with _hooks_kept(model):
            sites, entry, graph, errors, lists = _analysed(model, kwargs)
    finally:
        model.train(was_training)
    _named(model, sites, errors, strict)
    if graph.unread:
        some = ", ".join(graph.unread[:3]) + (", ..." if len(graph.unread) > 3 else "")
        warnings.warn(f"{len(graph.unread)} parameters of {type(model).__name__} ({some}) are used only inside a part "
                      "of its forward the analysis cannot enter (a no_grad or autocast block it could not put in line, "
                      "torch.cond's branches): their layers have no sites and no method changes them; move that code "
                      "out of the block to adapt it", UnreadWarning, stacklevel=2)
    # map the representatives' sites to every block of their kind
    for path, _, reps, members in lists:
        out = []
        for s in sites:
            moved = False
            for k, r in enumerate(reps):
                if s.path.startswith(f"{path}.{k}.") or s.path == f"{path}.{k}":
                    out.extend(_rename(s, path, k, j) for j in members[r])
                    moved = True
                    break
            if not moved:
                out.append(s)
        sites = out
    sites = [s for s in sites if s.path.split(".")[0] != CONTAINER]  # attached adapters are not sites
    order = {p: i for i, (p, _) in enumerate(model.named_modules(remove_duplicate=False))}
    sites.sort(key=lambda s: (order.get(s.path, order.get(s.path.rsplit(".", 1)[0], 0)), s.path))
    ent = _entry(model, entry.get("stack", ()), sites)
    fwd = inspect.signature(model.get_submodule(ent).forward).parameters if ent is not None else {}
    cfg = getattr(model, "config", None)
    # a second module taking token ids beside the entry (not inside it, not around it): a decoder's stack
    later = ((_entry(model, st, sites), site) for st, site in entry.get("later", ()))
    second, embed = next(((p, site) for p, site in later
                          if p and ent and p != ent and not p.startswith(ent + ".") and not ent.startswith(p + ".")),
                         ("", ""))
    return SiteMap(sites, graph.method, entry=ent or "", entry_params=tuple(fwd), token_input=entry.get("input", ""),
                   decoder_entry=second, decoder_embed=embed,
                   encoder_decoder=bool(getattr(cfg, "is_encoder_decoder", False)) or any(
                       s.role.startswith("xattn") for s in sites),
                   seconds=time.perf_counter() - t0, inputs=kwargs)


def _analysed(model: nn.Module, kwargs: dict):
    """Sites and entry from the graph of one block of each kind (the representatives of each repeated list), else
    of the whole model; the graph, why the ways to capture it failed, and the lists shortened."""
    lists = _repeated_lists(model)
    saved = [(ml, ml._modules) for _, ml, _, _ in lists]
    graph, errors = None, []
    try:
        # analyse one block of each kind: keep only representatives in each repeated list
        for _, ml, reps, _ in lists:
            ml._modules = OrderedDict((str(k), ml._modules[str(r)]) for k, r in enumerate(reps))
        if lists:
            try:
                with _hooks_kept(model):
                    graph = _traced(capture.by_export, model, kwargs)
            except Exception:
                graph = None
            if graph is not None:   # read while the representatives stand at the paths the graph names
                sites, entry = analyse(graph, model)
    finally:
        for ml, mods in saved:
            ml._modules = mods
    if graph is None:
        lists = []
        graph, errors = _capture(model, kwargs)
        sites, entry = analyse(graph, model)
    return sites, entry, graph, errors, lists


def _named(model: nn.Module, sites: list[Site], errors: list[str], strict: bool) -> None:
    """Announce (or, if strict, refuse) roles that came from module names rather than data flow."""
    named = [s for s in sites if s.found_by.endswith("+name")]
    if not named:
        return
    what = lambda verb: (f"roles of {type(model).__name__}'s {len(named)} sites {verb} guessed from module names: "
                         f"torch.export and torch.fx could not capture it ({'; '.join(errors)})")
    fix = "make its forward traceable by torch.export or pass example_inputs that run it"
    if strict:
        raise SurgeryError(f"{what('can only be')}; {fix} (strict refuses the guess)")
    warnings.warn(f"{what('were')}; check them, {fix}, or use strict=True (--strict) to refuse",
                  RolesByNameWarning, stacklevel=3)


def _entry(model: nn.Module, stack: tuple, sites: list[Site]) -> str | None:
    """The innermost module around the embedding whose forward takes an attention mask and holds layers the
    embeddings go on to (an attention site, else a linear one), so that virtual tokens put in there pass through
    them (an embeddings module taking the mask, as ESM's, holds none); else the root."""
    held = [s.path for s in sites if s.kind == "attention"] or \
        [s.path for s in sites if s.kind == "linear" and not s.path.startswith(f"{stack[-1] if stack else ''}.")]
    for path in reversed(stack[:-1]):
        try:
            m = model.get_submodule(path)
        except AttributeError:
            continue
        if "attention_mask" in inspect.signature(m.forward).parameters and \
                any(p.startswith(f"{path}.") for p in held):
            return path
    return ""
