"""route()'s triton kernel for decoding steps (peftsurgery/rewrite/kernels.py). It runs on CUDA devices; here, on
the CPU, under triton's interpreter (TRITON_INTERPRET=1, read when a kernel is defined, hence a fresh process).
Skipped where triton is not installed (requirements-test.txt installs it)."""
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import peftsurgery
from peftsurgery.rewrite import kernels

from conftest import tiny_llama

HERE = os.path.dirname(os.path.abspath(__file__))
needs_triton = pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")


def _interpreted(code: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH",
                                                                                                     "")])}
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                         timeout=600, cwd=HERE)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


@needs_triton
def test_the_kernel_gives_each_token_its_own_slots_update_up_to_that_slots_rank():
    out = _interpreted("""
        import torch
        from peftsurgery.rewrite import kernels
        g = torch.Generator().manual_seed(0)
        for dt, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2.0)):
            S, IN, R, OUT = 5, 200, 24, 300   # sizes that are no multiple of the kernel's blocks
            A, B = torch.randn(S, IN, R, generator=g).to(dt), torch.randn(S, R, OUT, generator=g).to(dt)
            ranks = torch.tensor([24, 8, 16, 3, 0], dtype=torch.int32)
            # columns past a slot's rank hold values the kernel must not read (a pool's are zeros)
            idx = torch.tensor([0, 1, 4, 2, 3, 0, 1])
            x = torch.randn(len(idx), IN, generator=g).to(dt)
            wide = torch.randn(len(idx), OUT + 50, generator=g).to(dt)
            out = wide[:, 10:10 + OUT]   # a slice of a fused projection's output: not contiguous
            got = kernels.gathered(x, A, B, ranks, idx, out)
            keep = (torch.arange(R)[None] < ranks[:, None]).to(dt)   # (slots, R)
            Ak, Bk = A * keep[:, None, :], B * keep[:, :, None]
            want = out.float() + torch.einsum("ti,tir,tro->to", x.float(), Ak[idx].float(), Bk[idx].float())
            assert got.dtype == dt and got.shape == out.shape
            err = float((got.float() - want).abs().max())
            assert err <= tol, (dt, err)
            assert torch.equal(got[2], out[2])   # slot 4 has rank 0: the base row, unchanged
            print(dt, err)
        """)
    assert out.count("torch.") == 2


@needs_triton
def test_routed_decoding_steps_through_the_kernel_give_the_torch_paths_logits():
    out = _interpreted("""
        import torch
        import peftsurgery
        from peftsurgery.rewrite import kernels
        from conftest import tiny_gpt2, tiny_llama
        from test_routing import _with_adapters

        calls = []
        real = kernels.gathered
        kernels.gathered = lambda *a: calls.append(1) or real(*a)
        for factory in (tiny_llama, tiny_gpt2):   # gpt2: q/k/v are slices of one fused projection
            model = _with_adapters(factory(), ["a", "b", "c"], ranks=[4, 2, 8])
            rows = ["a", "b", None, "c", "a", "c"]
            ids = torch.randint(0, 128, (len(rows), 7), generator=torch.Generator().manual_seed(2))
            nxt = torch.randint(0, 128, (len(rows), 1), generator=torch.Generator().manual_seed(3))
            got = {}
            for on in (True, False):
                kernels.ENABLED = on
                with torch.no_grad(), peftsurgery.route(model, rows):
                    cache = model(input_ids=ids, use_cache=True).past_key_values
                    n = len(calls)
                    got[on] = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits
                    assert (len(calls) > n) == on, (factory.__name__, on)   # the step ran the kernel, or not
            err = float((got[True] - got[False]).abs().max())
            assert err < 1e-5, (factory.__name__, err)
            print(factory.__name__, err)
        """)
    assert "tiny_llama" in out and "tiny_gpt2" in out


def test_a_kernel_that_cannot_run_warns_once_and_the_torch_path_serves(monkeypatch):
    model = tiny_llama()
    for i, n in enumerate(["a", "b"]):
        peftsurgery.apply(model, "lora", name=n, r=4)
        with torch.no_grad():
            for b in peftsurgery.adapters(model)[n].records[0].built.values():
                b.B.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(i))
    model.eval()
    ids = torch.randint(0, 128, (3, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), peftsurgery.route(model, ["a", "b", None]):
        want = model(input_ids=ids).logits
    monkeypatch.setattr(kernels, "usable", lambda x: kernels.ENABLED)
    monkeypatch.setattr(kernels, "ENABLED", True)

    def broken(*a):
        raise RuntimeError("no kernel here")
    monkeypatch.setattr(kernels, "gathered", broken)
    with torch.no_grad(), peftsurgery.route(model, ["a", "b", None]):
        with pytest.warns(UserWarning, match="triton low-rank kernel failed .*no kernel here.*torch path"):
            got = model(input_ids=ids).logits
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # once: the kernels are off from then on
            again = model(input_ids=ids).logits
    assert kernels.ENABLED is False
    assert torch.equal(got, want) and torch.equal(again, want)
