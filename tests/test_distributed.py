"""Beyond one process (peftsurgery/distributed.py, integrations.save_adapters): two ranks on the CPU with gloo,
forked from the test so that nothing is imported again. For LoRA, prompt tuning and QLoRA under
DistributedDataParallel, and LoRA and prompt tuning under FSDP2 (fully_shard): only the adapters train, every
rank's gradient is the same, every rank's base stays bit-identical, the sites are located on rank 0 only, and the
adapter rank 0 saves (sharded tensors gathered) equals a single-process run on the same global batch."""
import json
import multiprocessing
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import peftsurgery
from peftsurgery.distributed import decode, encode, shared_sitemap
try:
    import distributed_worker as worker
    from conftest import raises_one_line, tiny_gpt2, tiny_llama
except ImportError:  # tests/ collected as a package
    from tests import distributed_worker as worker
    from tests.conftest import raises_one_line, tiny_gpt2, tiny_llama

TIMEOUT = 150   # seconds for all cases; a rank stuck in a collective gives up after 60 (the process group's timeout)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Runs every case on two forked ranks once; returns the folder holding their adapters and reports."""
    out = tmp_path_factory.mktemp("ranks")
    ctx = multiprocessing.get_context("fork")
    init = f"file://{out}/store"   # a file store: no port to pick
    procs = [ctx.Process(target=worker.main, args=(str(out), list(worker.CASES), r, 2, init)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=TIMEOUT)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = [open(os.path.join(d, f)).read() for d, _, fs in os.walk(out) for f in fs if f.startswith("error")]
    assert [p.exitcode for p in procs] == [0, 0] and not errors, errors
    return out


def reference(case):
    """The same method, seed and steps in one process on the whole global batch."""
    model = worker.build(case)
    worker.train(model)
    att = peftsurgery.adapters(model)["default"]
    return model, {f"{i}.{k}": t.detach() for i, r in enumerate(att.records) for k, t in r.state()[0].items()}


@pytest.mark.parametrize("case", list(worker.CASES))
def test_two_ranks_train_like_one_process(ranks, case):
    check_ranks(ranks, case)


def test_accelerate_launch_starts_the_same_ranks(tmp_path):
    """The README's `accelerate launch --multi_gpu --num_processes 2` line, run on the CPU: two ranks (gloo) that
    train as one process does."""
    pytest.importorskip("accelerate")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           os.path.join(root, "tests", "distributed_worker.py"), str(tmp_path), "ddp-lora"]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    check_ranks(tmp_path, "ddp-lora")


def check_ranks(ranks, case):
    """Each rank's report, and the adapter rank 0 saved against one process on the whole global batch."""
    reports = [json.loads((ranks / case / f"rank{r}.json").read_text()) for r in range(2)]
    model, want = reference(case)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    for r, rep in enumerate(reports):
        assert rep["trainable"] == trainable and rep["adapters_only"], r
        assert rep["base_unchanged"] and rep["base_as_rank0"], r
        assert rep["located"] == (1 if r == 0 else 0), r   # rank 1 received rank 0's sites
        assert rep["grads_same"] is (True if case.startswith("ddp") else None)
        assert rep["sharded"] is case.startswith("fsdp")
        assert rep["as_built"] is (True if "meta" in case else None), r   # deferred init: as built in one process
    got = load_file(str(ranks / case / "adapter.safetensors"))
    assert got.keys() == want.keys()
    for k, t in want.items():
        torch.testing.assert_close(got[k], t, rtol=1e-5, atol=1e-6)
    untrained = worker.build(case)
    state = peftsurgery.adapters(untrained)["default"]
    assert any(not torch.equal(got[f"{i}.{k}"], t) for i, r in enumerate(state.records)
               for k, t in r.state()[0].items())   # the ranks did train
    meta = json.loads((ranks / case / "adapter.json").read_text())
    assert meta["base"]["fingerprint"] == peftsurgery.sitemap(model).fingerprint()


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_sitemap_travels_without_pickle(factory):
    model = factory()
    sm = peftsurgery.sitemap(model)
    back = decode(encode(sm))
    assert back == sm and back.fingerprint() == sm.fingerprint() and back.layouts == sm.layouts
    assert back.inputs.keys() == sm.inputs.keys()
    assert all(torch.equal(v, back.inputs[k]) if isinstance(v, torch.Tensor) else v == back.inputs[k]
               for k, v in sm.inputs.items())
    assert shared_sitemap(factory()).sites == sm.sites   # no process group: located here


def test_example_inputs_that_cannot_travel_are_refused():
    sm = peftsurgery.sitemap(tiny_llama())
    sm.inputs = {**sm.inputs, "cache": object()}
    raises_one_line(lambda: encode(sm), "cannot be sent to the other ranks", "cache")
