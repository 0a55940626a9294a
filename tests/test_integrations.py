"""The Hugging Face Trainer integration (peftsurgery/integrations.py): adapter-only checkpoints and save_model(),
exact resume from them, and the two worked examples (examples/trainer.py, examples/plain_loop.py) on tiny models."""
import importlib.util
import json
import os
import warnings

import pytest
import torch

import peftsurgery
from peftsurgery import SurgeryError
from peftsurgery.integrations import SurgeryTrainer, load_adapters, save_adapters
try:
    from conftest import VOCAB, raises_one_line, tiny_llama
except ImportError:  # tests/ collected as a package
    from tests.conftest import VOCAB, raises_one_line, tiny_llama

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}


def ids(seed, batch=1, length=8):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def data(n=16):
    return [{"input_ids": ids(i)[0], "labels": ids(i)[0]} for i in range(n)]


def lora(**cfg):
    torch.manual_seed(7)
    return peftsurgery.apply(tiny_llama(), "lora", **{"r": 2, "dropout": 0.1, **cfg})


def trainer(model, out, steps, save_steps=None, **kw):
    from transformers import TrainingArguments
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, lr_scheduler_type="linear", use_cpu=True, report_to=[],
                             save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                             logging_steps=1, disable_tqdm=True, seed=0, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SurgeryTrainer(model=model, args=args, train_dataset=data())


def tensors(model, name="default"):
    att = peftsurgery.adapters(model)[name]
    return {f"{i}.{k}": t.detach().clone() for i, r in enumerate(att.records) for k, t in r.state()[0].items()}


def losses(t):
    return [(h["step"], h["loss"]) for h in t.state.log_history if "loss" in h]


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(input_ids=x).logits


# ---- adapter-only checkpoints ------------------------------------------------------------------------------------

def test_checkpoints_and_save_model_hold_only_the_adapter(tmp_path):
    model = lora()
    t = trainer(model, tmp_path / "run", steps=2, save_steps=2)
    t.train()
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert set(os.listdir(ckpt)) == {"adapter.safetensors", "adapter.json"} | TRAINER_FILES
    size = (ckpt / "adapter.safetensors").stat().st_size
    trainable = peftsurgery.budget(model)["trainable"]
    base_bytes = 4 * peftsurgery.budget(model)["base"]
    assert 4 * trainable <= size < 4 * trainable + 4096 and size * 20 < base_bytes
    meta = json.loads((ckpt / "adapter.json").read_text())
    assert meta["method"] == "lora" and meta["base"]["fingerprint"] == peftsurgery.sitemap(model).fingerprint()
    x = ids(99, batch=2)
    want = logits(model, x)
    assert torch.equal(logits(peftsurgery.load(tiny_llama(), str(ckpt)), x), want)

    t.save_model()   # into the output folder, beside the checkpoints, which stay
    run = tmp_path / "run"
    assert {"adapter.safetensors", "adapter.json", "training_args.bin", "checkpoint-2"} == set(os.listdir(run))
    assert torch.equal(logits(peftsurgery.load(tiny_llama(), str(run)), x), want)


def test_several_adapters_save_and_load_in_place(tmp_path):
    model = lora()
    peftsurgery.apply(model, "prompt-tuning", name="p", num_tokens=3)
    save_adapters(model, str(tmp_path))
    assert {"adapter.json", "adapter.safetensors", "p"} <= set(os.listdir(tmp_path))
    assert json.loads((tmp_path / "p" / "adapter.json").read_text())["method"] == "prompt-tuning"
    saved = {n: tensors(model, n) for n in ("default", "p")}
    params = [id(p) for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    load_adapters(model, str(tmp_path))
    assert [id(p) for p in model.parameters()] == params   # written in place: an optimizer stays valid
    for n, want in saved.items():
        got = tensors(model, n)
        assert all(torch.equal(got[k], v) for k, v in want.items())


def test_resume_refuses_another_adapter(tmp_path):
    save_adapters(lora(), str(tmp_path))
    raises_one_line(lambda: load_adapters(lora(r=4), str(tmp_path)), "other options", "resume with")
    raises_one_line(lambda: load_adapters(lora(alpha=3.0), str(tmp_path)), "other options")
    raises_one_line(lambda: load_adapters(tiny_llama(), str(tmp_path)), "no peftsurgery adapter", "apply")
    raises_one_line(lambda: load_adapters(lora(), str(tmp_path / "none")), "not a directory")
    torch.manual_seed(0)
    ada = peftsurgery.apply(tiny_llama(), "adalora", init_r=4, target_r=2)
    save_adapters(ada, str(tmp_path / "ada"))
    raises_one_line(lambda: load_adapters(ada, str(tmp_path / "ada")), "cannot resume exactly", "peftsurgery.load")
    raises_one_line(lambda: save_adapters(tiny_llama(), str(tmp_path / "x")), "no peftsurgery adapter")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_resume_from_an_adapter_checkpoint_is_exact(tmp_path, accumulate):
    """6 steps straight against 3, an adapter-only checkpoint, and a new Trainer on a new model resuming: the
    same adapter tensors and the same losses (dropout on, so the RNG state must come back too)."""
    straight = lora()
    t1 = trainer(straight, tmp_path / "a", steps=6, save_steps=3, gradient_accumulation_steps=accumulate)
    t1.train()
    resumed = lora()
    with torch.no_grad():   # a different starting point, so only the checkpoint can make them equal
        for p in resumed.parameters():
            if p.requires_grad:
                p.normal_()
    t2 = trainer(resumed, tmp_path / "b", steps=6, save_steps=3, gradient_accumulation_steps=accumulate)
    t2.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    want, got = tensors(straight), tensors(resumed)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert not all(torch.equal(want[k], tensors(lora())[k]) for k in want)   # it did train
    assert losses(t2) == losses(t1) and len(losses(t1)) == 6
    base = tiny_llama()
    assert all(torch.equal(p, base.get_parameter(n)) for n, p in resumed.named_parameters()
               if not n.startswith("_peftsurgery."))


def test_resume_with_true_picks_the_last_checkpoint(tmp_path):
    t1 = trainer(lora(), tmp_path, steps=4, save_steps=2)
    t1.train()
    model = lora()
    t2 = trainer(model, tmp_path, steps=4, save_steps=2)
    t2.train(resume_from_checkpoint=True)   # checkpoint-4: nothing left to do, the adapter is its
    saved = peftsurgery.load(tiny_llama(), str(tmp_path / "checkpoint-4"))
    assert all(torch.equal(v, tensors(saved)[k]) for k, v in tensors(model).items())


# ---- the worked examples -------------------------------------------------------------------------------------------

def _example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["trainer", "plain_loop"])
def test_example_runs_on_a_tiny_model(tmp_path, name):
    result = _example(name).main(["--tiny", "--out", str(tmp_path), "--steps", "4"])
    assert result["reloaded_equal"] and result["base_unchanged"]
    assert result["losses"][-1] < result["losses"][0]
    assert os.path.isfile(os.path.join(result["adapter"], "adapter.safetensors"))
    assert not any(f.endswith(("model.safetensors", "pytorch_model.bin")) for _, _, fs in os.walk(tmp_path)
                   for f in fs)
