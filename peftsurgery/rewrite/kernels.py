"""Triton kernels for route()'s decoding steps: each token's low-rank update from its own adapter's factors, read
from the stacked pool inside the kernel (no per-row copies of the factors), in two launches per linear: shrink
h = x A[slot], expand out + h B[slot], each slot read only up to its own rank (mixed ranks cost their own bytes,
not the largest's). Used where triton imports and the tensors are on a CUDA device, or on the CPU under
TRITON_INTERPRET=1 (triton's interpreter, which the tests run); everywhere else route() keeps its torch path.
Set `ENABLED = False` to keep the torch path on a GPU too (the benchmark compares the two)."""
from __future__ import annotations

import os
import warnings

import torch

try:
    import triton
    import triton.language as tl
except ImportError:   # triton is optional: the torch path needs nothing of it
    triton = None

ENABLED = True
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"   # triton reads it when a kernel is defined (import time)


def usable(x: torch.Tensor) -> bool:
    return ENABLED and triton is not None and (x.is_cuda or (_INTERPRET and x.device.type == "cpu"))


def failed(e: Exception) -> None:
    """A kernel that cannot run here (a triton or driver that cannot build it) turns the kernels off, visibly."""
    global ENABLED
    ENABLED = False
    warnings.warn(f"route(): the triton low-rank kernel failed ({type(e).__name__}: {e}); using the torch path from "
                  "now on", stacklevel=3)


if triton is not None:
    @triton.jit
    def _shrink(x, A, ranks, idx, h, IN, R, sx, BK: tl.constexpr, BR: tl.constexpr):
        t = tl.program_id(0)
        s = tl.load(idx + t).to(tl.int64)
        rank = tl.load(ranks + s)
        r = tl.arange(0, BR)
        acc = tl.zeros((BR,), dtype=tl.float32)
        for k0 in range(0, IN, BK):
            k = k0 + tl.arange(0, BK)
            xk = tl.load(x + t * sx + k, mask=k < IN, other=0.0).to(tl.float32)
            a = tl.load(A + s * IN * R + k[:, None] * R + r[None, :],
                        mask=(k[:, None] < IN) & (r[None, :] < rank), other=0.0)
            acc += tl.sum(xk[:, None] * a.to(tl.float32), axis=0)
        tl.store(h + t * BR + r, acc)

    @triton.jit
    def _expand(h, B, ranks, idx, out, res, OUT, R, so_t, so_n, BN: tl.constexpr, BR: tl.constexpr):
        t = tl.program_id(0)
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        s = tl.load(idx + t).to(tl.int64)
        rank = tl.load(ranks + s)
        r = tl.arange(0, BR)
        hv = tl.load(h + t * BR + r)
        b = tl.load(B + s * R * OUT + r[:, None] * OUT + n[None, :],
                    mask=(r[:, None] < rank) & (n[None, :] < OUT), other=0.0)
        y = tl.sum(hv[:, None] * b.to(tl.float32), axis=0)
        o = tl.load(out + t * so_t + n * so_n, mask=n < OUT, other=0.0)
        tl.store(res + t * OUT + n, (o.to(tl.float32) + y).to(res.dtype.element_ty), mask=n < OUT)


def gathered(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, ranks: torch.Tensor, idx: torch.Tensor,
             out: torch.Tensor) -> torch.Tensor:
    """out + (x A[idx]) B[idx] token by token, in out's dtype (fp32 accumulation): x (tokens, in); A (slots, in,
    R) and B (slots, R, out) contiguous; ranks (slots,) int32, each slot's columns of A (rows of B) past its rank
    never read; idx (tokens,) the slot of each token; out (tokens, out), any strides."""
    n_tok, d_in = x.shape
    R, d_out = B.shape[1], B.shape[2]
    BR = max(16, triton.next_power_of_2(R))
    h = torch.empty(n_tok, BR, device=x.device, dtype=torch.float32)
    x = x.contiguous()
    _shrink[(n_tok,)](x, A, ranks, idx, h, d_in, R, x.stride(0), BK=128, BR=BR)
    res = torch.empty(n_tok, d_out, device=out.device, dtype=out.dtype)
    BN = 128
    _expand[(n_tok, triton.cdiv(d_out, BN))](h, B, ranks, idx, out, res, d_out, R, out.stride(0), out.stride(1),
                                             BN=BN, BR=BR)
    return res
