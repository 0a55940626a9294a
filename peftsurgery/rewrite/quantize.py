"""Rule: quantize the base weights of linears (nn.Linear and its subclasses computing F.linear, and transformers'
Conv1D as GPT-2 uses it) to 4-bit NormalFloat (NF4) through bitsandbytes.

The float weights are dropped (that is the memory saving); removing the rule puts back float modules of the
original class and dtype holding the dequantized weights, not the original ones."""
from __future__ import annotations

import functools
import inspect
import logging
import re
import sys
import warnings

import torch
from torch import nn

from ..errors import SurgeryError
from .base import Rule, Swapped, carry_hooks

COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)   # what bitsandbytes' 4-bit layer computes in

# On a CPU with AVX512-BF16, importing bitsandbytes without the optional `kernels` package logs "Failed to load CPU
# gemm_4bit_forward from kernels-community ..." (bitsandbytes then uses its own kernel; the layers built here do
# not take that path at all). Exactly that message is dropped; everything else the logger says still shows. This
# only helps when peftsurgery is imported before bitsandbytes (importing transformers' Trainer imports it too).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community"))


class Quantize(Rule):
    """compute_dtype: the dtype the 4-bit layers compute in; None means each linear's original weight dtype."""
    kinds = ("linear",)
    phase = 0

    def __init__(self, targets: str, double_quant: bool = True, compute_dtype: torch.dtype | None = None):
        super().__init__(targets)
        if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
            raise SurgeryError(f"compute_dtype must be None or one of {', '.join(map(str, COMPUTE_DTYPES))}, "
                               f"got {compute_dtype!r}")
        self.double_quant, self.compute_dtype = double_quant, compute_dtype
        self.kept: dict[str, str] = {}   # selected linears left in float, and why (see check)

    def check(self, model, sites):
        bnb = _bnb()
        # linears the model's own code needs in float stay in float, and the user is told: those transformers keeps
        # in float32 (_keep_in_fp32_modules: T5 casts the input of its feed-forward `wo` to that weight's dtype), and,
        # unless `quantize` names their role or path, those whose weight the code around them uses as a tensor
        # (Gemma-3n clamps one in place and multiplies by another in training; Mamba's CUDA path hands its
        # projections' weights to a fused kernel), where a 4-bit weight would break or compute garbage
        keep = set(getattr(model, "_keep_in_fp32_modules", None) or ()) | set(
            getattr(model, "_keep_in_fp32_modules_strict", None) or ())
        named = {t.strip() for t in self.targets.split(",")}
        fp32 = [s.path for s in sites if keep & set(s.path.split("."))]
        read = [s.path for s in sites if s.path not in fp32 and s.role not in named and f"path:{s.path}" not in named
                and _weight_read(model, s.path)]
        self.kept = {**dict.fromkeys(fp32, f"{type(model).__name__} keeps it in float32 (_keep_in_fp32_modules)"),
                     **dict.fromkeys(read, "the code around it uses its weight as a tensor, bypassing the linear, "
                                           "where a 4-bit weight breaks (name its role or path in quantize to "
                                           "quantize it anyway)")}
        for paths in (fp32, read):
            if paths:
                warnings.warn(f"quantization leaves {len(paths)} linears in float: {self.kept[paths[0]]}, e.g. "
                              f"{paths[0]}", stacklevel=2)
        for s in sites:
            if s.path in self.kept:
                continue
            m = model.get_submodule(s.path)
            if _is_quantized(bnb, m):
                continue
            out = "; leave it out of quantize (a selector without it, e.g. attn.*,mlp.*)"
            if type(m) not in _float_classes() and not _computes_linear(m):
                why = (f"it is a {type(m).__name__}, which is neither nn.Linear, transformers' Conv1D, nor an "
                       "nn.Linear subclass computing F.linear(x, weight, bias) (checked on a random input)" + out)
            elif (w := _out_in(m)).device.type == "meta":
                why = "it is on the meta device; load real weights before quantizing"
            elif w.dtype not in COMPUTE_DTYPES:
                why = f"its weights are {w.dtype}; bitsandbytes quantizes float32, bfloat16 and float16 only" + out
            elif w.numel() == 2:  # one packed byte, which bitsandbytes then takes for a transposed weight
                why = "its weight is 1 x 2 (or 2 x 1), which bitsandbytes' 4-bit layer cannot multiply" + out
            elif not _round_trips(bnb, w.shape[1], w.dtype, w.device):
                why = (f"bitsandbytes on this machine dequantizes 4-bit weights {w.shape[1]} wide wrongly (seen on "
                       "CPUs with AVX-512 for widths that are multiples of 16 but not of 64); leave it out of quantize")
            else:
                continue
            raise SurgeryError(f"cannot quantize {s.path}: {why}")

    def attach(self, model, sites, built, switch, sitemap):
        bnb = _bnb()
        for s in sites:
            parent_path, _, name = s.path.rpartition(".")
            parent = model.get_submodule(parent_path)
            old = getattr(parent, name)
            if _is_quantized(bnb, old) or s.path in self.kept:
                continue
            w = _out_in(old)
            compute = self.compute_dtype or w.dtype
            new = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=old.bias is not None, compute_dtype=compute,
                                    compress_statistics=self.double_quant, quant_type="nf4", device=w.device)
            new.weight = bnb.nn.Params4bit(w.contiguous(), requires_grad=False, quant_type="nf4",
                                           compress_statistics=self.double_quant)
            if old.bias is not None:  # kept in the compute dtype: bitsandbytes would otherwise cast it in place
                new.bias = nn.Parameter(old.bias.detach().to(compute, copy=True), requires_grad=False)
            # bitsandbytes' CPU inference packing (taken on CPUs with AVX512-BF16 at an eval forward without grad)
            # refuses out_features % 32 or in_features % 64, computes in bfloat16 whatever compute_dtype says, and
            # leaves weights that later forwards with grad and dequantize_4bit misread (bitsandbytes 0.50.2):
            # keep every layer on the dequantize-and-matmul path, which takes any shape
            new.support_avx512bf16_for_cpu = False
            new.peftsurgery_float_class = type(old)
            new = new.to(w.device)  # quantizes
            carry_hooks(old, new)
            setattr(parent, name, new)  # the float weights go once the apply is proven: saving memory is the point
            yield _Quantized(s.path, old)

    def route(self, model, entries, rows, cache):
        return []  # the quantized base is shared by every row

    def describe(self, site, built):
        if site.path in self.kept:
            return f"left in float: {self.kept[site.path]}"
        return f"base weights quantized to nf4{' (double quant)' if self.double_quant else ''}"


class _Quantized(Swapped):
    """A linear swapped for its 4-bit form. Until the apply is proven (settle) the float linear is kept, so that a
    failed apply puts it back exactly; after that, undo gives a dequantized one. The probe also proves that the
    4-bit layer got a float input: a model that casts the input to the weight's dtype (LongT5's feed-forward, not
    marked _keep_in_fp32_modules) would hand it its packed bytes' dtype and compute garbage."""

    def __init__(self, path: str, original: nn.Module):
        super().__init__(path, self._back)
        self.original = original

    def _back(self, now: nn.Module) -> nn.Module:
        return _dequantized(now) if self.original is None else self.original

    def settle(self):
        self.original = None

    def watch(self, model):
        dtypes = []
        handle = model.get_submodule(self.path).register_forward_pre_hook(
            lambda m, args: dtypes.append(args[0].dtype if args and isinstance(args[0], torch.Tensor) else None))

        def verdict():
            handle.remove()
            if not dtypes:
                return "the module put there never ran"
            bad = next((d for d in dtypes if d is not None and not d.is_floating_point), None)
            return bad and (f"its input arrives as {bad}: the model casts it to the 4-bit weight's storage dtype; "
                            "leave this linear's role out of quantize")
        return verdict


def _bnb():
    try:
        import bitsandbytes
    except ImportError:
        raise SurgeryError("quantization needs bitsandbytes: pip install 'peftsurgery[quant]'") from None
    return bitsandbytes


_ROUND_TRIP: dict = {}


def _round_trips(bnb, width: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether bitsandbytes' dequantization here gives back what NF4 encodes for weights `width` wide (checked once
    per width, dtype and device kind, on fixed random weights, without touching torch's global generator)."""
    key = (width, dtype, device.type)
    if key not in _ROUND_TRIP:
        F = bnb.functional
        w = torch.randn(64, width, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
        codes = q.view(torch.uint8).reshape(-1, 1).long()
        expected = state.code[torch.cat([codes >> 4, codes & 15], 1).reshape(-1)[:w.numel()]] * \
            state.absmax.repeat_interleave(64)[:w.numel()]
        got = F.dequantize_4bit(q, state).reshape(-1).float()
        _ROUND_TRIP[key] = bool(((got - expected).abs() <= 1e-2 * expected.abs() + 1e-6).all())
    return _ROUND_TRIP[key]


def _weight_read(model: nn.Module, path: str) -> bool:
    """Whether the code of the module holding this linear (any method but initialisation) uses the linear's weight
    as a tensor, not only its dtype, device or shape: writes it in place (`self.NAME.weight.data.clamp_(...)`),
    multiplies by it, or tests it, bypassing the linear's forward."""
    parent_path, _, name = path.rpartition(".")
    return _reads(type(model.get_submodule(parent_path)), name)


@functools.lru_cache(maxsize=None)
def _reads(cls: type, name: str) -> bool:
    use = re.compile(rf"\b{re.escape(name)}\.weight\b(?!\s*\.\s*(dtype|device|shape|size|ndim|requires_grad|is_\w+|"
                     rf"_is_hf_initialized)\b)")
    for c in cls.__mro__:
        if c in (nn.Module, object):
            break
        for attr, fn in vars(c).items():
            if inspect.isfunction(fn) and "init" not in attr and "reset" not in attr:
                try:
                    if use.search(inspect.getsource(fn)):
                        return True
                except (OSError, TypeError):   # no source (built at run time)
                    continue
    return False


def _is_quantized(bnb, m: nn.Module) -> bool:
    return isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def _out_in(m: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features): Conv1D stores it transposed."""
    return m.weight.detach() if isinstance(m, nn.Linear) else m.weight.detach().t()


def _float_classes() -> tuple[type, ...]:
    """nn.Linear, and transformers' Conv1D (weight stored as (in, out)) when transformers is loaded."""
    conv = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return (nn.Linear,) + ((conv,) if conv else ())


def _computes_linear(m: nn.Module) -> bool:
    """An nn.Linear subclass with a forward of its own (Falcon's computes x @ W.T + b) that computes exactly what
    F.linear does, on a fixed random input (its hooks not run)."""
    if not isinstance(m, nn.Linear) or m.weight.device.type == "meta" or not m.weight.is_floating_point():
        return False
    x = torch.randn(3, m.in_features, generator=torch.Generator().manual_seed(0)).to(m.weight)
    with torch.no_grad():
        try:
            got = type(m).forward(m, x)
        except Exception:   # a forward wanting other shapes (DeepSeek-V4's grouped linear) computes something else
            return False
        want = torch.nn.functional.linear(x, m.weight, m.bias)
    return isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(got, want, 1e-4, 1e-5)


def _dequantized(q: nn.Module) -> nn.Module:
    """A float module of the class the 4-bit layer replaced (nn.Linear, a subclass of it computing F.linear, or
    Conv1D), in the original weight dtype, computing what the 4-bit layer computes (quantization is lossy: the
    original weights are gone); Swapped carries the hooks over."""
    import bitsandbytes as bnb
    w = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)  # in the original dtype
    cls = getattr(q, "peftsurgery_float_class", nn.Linear)
    linear = issubclass(cls, nn.Linear)
    with torch.device("meta"):
        m = nn.Linear(q.in_features, q.out_features, q.bias is not None) if linear else \
            cls(q.out_features, q.in_features)
    m.__class__ = cls   # a subclass of nn.Linear differing only in forward (checked when quantized)
    m.weight = nn.Parameter(w if linear else w.t().contiguous(), requires_grad=False)
    if q.bias is not None:
        m.bias = nn.Parameter(q.bias.detach().to(w.dtype, copy=True), requires_grad=False)
    return m
