"""Multitask prompt tuning (plugins/multitask_prompt_tuning.py): task k's prompt is P* * (u_k v_k); rows of a
mixed-task batch are routed to their tasks ("ADAPTER:TASK") and each computes what it computes alone with its
task; a row's gradient reaches P* and its own task's factors only; a target adapter starts from a saved P*; the
same tensors give PEFT's logits, and PEFT's folders convert both ways."""
import copy
import os

import pytest
import torch
from conftest import VOCAB, raises_one_line, tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from test_route_prompts import _row_loss, batch

import peftsurgery as ps
from peftsurgery.peftformat import PeftFormatWarning
from peftsurgery.surgery import CONTAINER
from peftsurgery_plugins import multitask_prompt_tuning as mpt

METHOD = "multitask-prompt-tuning"
TASKS = ["pol", "spam", "subj"]


def gpt2():
    return tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def module(model, name="mt"):
    return mpt._module(model, name)


def moved(model, name="mt", seed=7):
    """Every tensor of the adapter moved far from its start, so each task's prompt differs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith(f"{CONTAINER}.{name}."):
                p.copy_(p + torch.randn(p.shape, generator=g) * 0.5)
    return model


def mixed(factory):
    """A multitask adapter (3 tasks, 3 tokens), a prompt-tuning adapter of 5 tokens and a LoRA, all moved."""
    model = factory()
    ps.apply(model, METHOD, name="mt", num_tokens=3, tasks=",".join(TASKS), r=2, init="random")
    ps.apply(model, "prompt-tuning", name="p5", num_tokens=5, init="random", seed=1)
    ps.apply(model, "lora", name="l", r=2, targets="all-linear")
    for n in ("mt", "p5", "l"):
        moved(model, n, seed=len(n))
    return model.eval()


def alone(model, name, task, fn):
    """fn() with only adapter `name` on (None: none), running task `task` of the multitask adapter."""
    before = {n: a.switch.on for n, a in ps.adapters(model).items()}
    ps.set_active(model, [] if name is None else [name])
    if task is not None:
        mpt.set_task(model, "mt", task)
    try:
        return fn()
    finally:
        mpt.set_task(model, "mt", TASKS[0])
        for n, a in ps.adapters(model).items():
            a.switch.on = before[n]


ROWS = ["mt:pol", "p5", "mt:subj", None, "l", "mt:spam", "mt:pol", "mt"]   # bare "mt": its current task (pol)


def parts(name):
    adapter, _, task = (name or "").partition(":")
    return adapter or None, task or (TASKS[0] if adapter == "mt" else None)


@pytest.mark.parametrize("side", ["left", "right", "none"])
@pytest.mark.parametrize("factory", [tiny_llama, gpt2])
def test_each_row_of_a_mixed_task_batch_matches_it_alone(factory, side):
    model = mixed(factory)
    seqs, ids, mask = batch([5, 7, 3, 6, 4, 7, 2, 6], side)
    with torch.no_grad(), mpt.route(model, ROWS):
        got = model(input_ids=ids, attention_mask=mask).logits
    assert got.shape == (len(ROWS), ids.shape[1], VOCAB)
    with torch.no_grad():
        plain = [alone(model, None, None, lambda: model(input_ids=s[None]).logits[0]) for s in seqs]
        for i, (s, n) in enumerate(zip(seqs, ROWS)):
            want = alone(model, *parts(n), lambda: model(input_ids=s[None]).logits[0])
            row = got[i] if mask is None else got[i][mask[i].bool()]
            torch.testing.assert_close(row, want, atol=1e-5, rtol=0, msg=lambda m: f"row {i} ({n}): {m}")
            if n is not None:
                assert (want - plain[i]).abs().max() > 1e-3, n   # the adapter changes the row
        # the tasks differ from each other on the same tokens
        s = seqs[1]
        outs = [alone(model, "mt", t, lambda: model(input_ids=s[None]).logits[0]) for t in TASKS]
        assert min((a - b).abs().max() for a, b in [(outs[0], outs[1]), (outs[1], outs[2])]) > 1e-3
    assert module(model).rows is None and module(model).task == "pol"   # nothing left behind


def test_generate_with_the_cache_matches_each_row_alone():
    model = mixed(tiny_llama)
    seqs, ids, mask = batch([5, 7, 3, 6, 4, 7, 2, 6], "left", seed=1)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), mpt.route(model, ROWS):
        got = model.generate(ids, attention_mask=mask, **kw)
    with torch.no_grad():
        for i, (s, n) in enumerate(zip(seqs, ROWS)):
            want = alone(model, *parts(n), lambda: model.generate(s[None], attention_mask=torch.ones_like(s[None]),
                                                                  **kw))
            assert got.sequences[i, ids.shape[1]:].tolist() == want.sequences[0, len(s):].tolist(), (i, n)
            for step, (a, b) in enumerate(zip(got.logits, want.logits)):
                torch.testing.assert_close(a[i], b[0], atol=1e-5, rtol=0, msg=lambda m: f"row {i} step {step}: {m}")


@pytest.mark.parametrize("factory", [tiny_llama, gpt2])
def test_a_rows_gradient_reaches_the_shared_prompt_and_its_own_tasks_factors_only(factory):
    model = mixed(factory).train()
    rows = ["mt:pol", "p5", "mt:subj", None, "mt:pol"]    # spam is not in the batch, nor is the LoRA
    seqs, ids, mask = batch([5, 7, 3, 6, 4], "left", seed=2)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with mpt.route(model, rows):
        logits = model(input_ids=ids, attention_mask=mask).logits
    sum(_row_loss(logits[i], ids[i], mask[i]) for i in range(len(rows))).backward()
    got = {n: p.grad for n, p in params.items()}
    for n, g in got.items():   # not even zeros for what no row used: an optimizer skips them
        if n.endswith((".u.spam", ".v.spam")) or n.startswith(f"{CONTAINER}.l."):
            assert g is None, n
        else:
            assert g is not None and g.any(), n
    assert not any(p.grad is not None for p in model.parameters() if not p.requires_grad)
    for p in params.values():
        p.grad = None
    for s, n in zip(seqs, rows):   # the reference: each row by itself with its task
        if n is not None:
            alone(model, *parts(n), lambda: _row_loss(model(input_ids=s[None]).logits[0], s).backward())
    for name, p in params.items():
        if p.grad is None:
            assert got[name] is None, name
        else:
            torch.testing.assert_close(got[name], p.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_base_frozen_and_bit_identical_through_a_step_save_load_exact_budget_equals_built(tmp_path):
    model = tiny_llama()
    base = {n: t.clone() for n, t in model.state_dict().items()}
    ids = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    ps.apply(model, METHOD, name="mt", num_tokens=4, tasks=3, r=2)
    box = model._modules[CONTAINER]["mt"]
    dim = model.config.hidden_size
    want = 4 * dim + 3 * 2 * (4 + dim)
    assert ps.budget(model)["adapters"]["mt"] == want == sum(p.numel() for p in box.parameters())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{CONTAINER}.mt.{n}" for n, _ in box.named_parameters()}
    start = {n: p.detach().clone() for n, p in box.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with mpt.route(model, ["mt:0", "mt:2", "mt:2"]):
        model(input_ids=ids).logits.pow(2).mean().backward()
    opt.step()
    assert all(torch.equal(base[n], t) for n, t in model.state_dict().items() if n in base)
    changed = {n for n, p in box.named_parameters() if not torch.equal(start[n], p)}
    assert changed == {"0.model/embed_tokens.weight", "0.model/embed_tokens.u.0", "0.model/embed_tokens.v.0",
                       "0.model/embed_tokens.u.2", "0.model/embed_tokens.v.2"}   # task 1 not in the batch
    with torch.no_grad(), ps.disabled(model):
        assert torch.equal(model(input_ids=ids).logits, before)

    mpt.set_task(model, "mt", "2")
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    ps.save(model, str(tmp_path / "a"), name="mt")
    saved = load_file(os.path.join(tmp_path, "a", "adapter.safetensors"))
    assert sorted(k.split(".", 2)[2] for k in saved) == ["u.0", "u.1", "u.2", "v.0", "v.1", "v.2", "weight"]
    fresh = ps.load(tiny_llama(), str(tmp_path / "a"))
    mpt.set_task(fresh, "default", "2")
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, trained)


def source(tmp_path, tasks="pol,spam", r=1, num_tokens=4):
    model = moved(tiny_llama(), "default")
    ps.apply(model, METHOD, num_tokens=num_tokens, tasks=tasks, r=r, init="random")
    moved(model, "default")
    path = str(tmp_path / "source")
    ps.save(model, path)
    return path, module(model, "default")


def test_target_starts_from_the_saved_shared_prompt(tmp_path):
    path, src = source(tmp_path)
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    for factors in ("average", "fresh", "spam"):
        model = ps.apply(tiny_llama(), METHOD, name="t", num_tokens=4, tasks="target", init=f"pretrained:{path}",
                         factors=factors)
        m = module(model, "t")
        assert torch.equal(m.weight, src.weight)   # P* itself
        u, v = {"average": (torch.stack(list(src.u.values())).mean(0), torch.stack(list(src.v.values())).mean(0)),
                "fresh": (torch.ones(4, 1), torch.ones(1, 32)),
                "spam": (src.u["spam"], src.v["spam"])}[factors]
        assert torch.equal(m.u["target"], u) and torch.equal(m.v["target"], v)
        if factors == "fresh":   # the task prompt starts as P* itself
            assert torch.equal(m.prompt("target"), src.weight)
    # and it keeps training: P* and the new factors all have gradients
    model(input_ids=ids).logits.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.any() for p in m.parameters())


def test_refusals_are_one_line_and_leave_the_model_as_it_was(tmp_path):
    path, _ = source(tmp_path, r=2)
    model = tiny_llama()
    state = {n: t.clone() for n, t in model.state_dict().items()}
    hooks = [(m, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()]
    apply = lambda **kw: ps.apply(model, METHOD, **kw)   # noqa: E731
    raises_one_line(lambda: apply(tasks="a,a"), "tasks must be")
    raises_one_line(lambda: apply(tasks="a:b"), "tasks must be")
    raises_one_line(lambda: apply(factors="fresh"), "needs init=pretrained:DIR")
    raises_one_line(lambda: apply(init="zeros"), "init must be one of")
    raises_one_line(lambda: apply(init="pretrained:"), "needs the folder")
    raises_one_line(lambda: apply(init=f"pretrained:{tmp_path}/none"), "not a directory")
    raises_one_line(lambda: apply(num_tokens=5, init=f"pretrained:{path}"), "set num_tokens=4")
    raises_one_line(lambda: apply(num_tokens=4, init=f"pretrained:{path}"), "rank-2", "set r=2")
    raises_one_line(lambda: apply(num_tokens=4, r=2, init=f"pretrained:{path}", factors="nope"), "no task 'nope'")
    wide = tiny_llama(hidden_size=48, head_dim=12)
    raises_one_line(lambda: ps.apply(wide, METHOD, num_tokens=4, r=2, init=f"pretrained:{path}"), "width 32")
    lora = str(tmp_path / "lora")
    ps.save(ps.apply(tiny_llama(), "lora"), lora)
    raises_one_line(lambda: apply(init=f"pretrained:{lora}"), "holds a lora adapter")
    assert not ps.adapters(model)
    assert all(torch.equal(state[n], t) for n, t in model.state_dict().items())
    assert all(dict(m._forward_hooks) == f and dict(m._forward_pre_hooks) == p for m, f, p in hooks)

    ps.apply(model, METHOD, name="mt", tasks="a,b")
    ps.apply(model, "lora", name="l")
    raises_one_line(lambda: mpt.set_task(model, "mt", "c"), "no task 'c'", "a, b")
    raises_one_line(lambda: mpt.route(model, ["mt:c"]).__enter__(), "no task 'c'")
    raises_one_line(lambda: mpt.route(model, ["l:a"]).__enter__(), "'l' is not a multitask-prompt-tuning adapter")
    assert module(model).rows is None


def test_distillation_from_teacher_prompts_routed_beside_the_students_rows():
    """KL(teacher || student) by hand; the teachers (prompt-tuning adapters) and the student's task rows share one
    routed batch; the loss reaches the student's P* and factors only, never a teacher."""
    import torch.nn.functional as F
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    want = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(mpt.distillation_loss(s, t), want)
    torch.testing.assert_close(mpt.distillation_loss(s, t, 2.0),
                               4 * F.kl_div((s / 2).log_softmax(-1), (t / 2).log_softmax(-1), log_target=True,
                                            reduction="batchmean"))
    assert float(mpt.distillation_loss(t, t)) == 0.0
    raises_one_line(lambda: mpt.distillation_loss(s, t[:, :2]), "differ")
    model = tiny_llama()
    ps.apply(model, METHOD, name="mt", tasks="a,b", num_tokens=3)
    for task in ("a", "b"):
        ps.apply(model, "prompt-tuning", name=f"teacher-{task}", num_tokens=3, init="random", seed=len(task))
    ids = torch.randint(3, VOCAB, (4, 5), generator=torch.Generator().manual_seed(0))
    rows = ["a", "b", "b", "a"]
    with torch.no_grad(), mpt.route(model, [f"teacher-{r}" for r in rows]):
        teacher = model(input_ids=ids).logits[:, -1]
    with mpt.route(model, [f"mt:{r}" for r in rows]):
        student = model(input_ids=ids).logits[:, -1]
    mpt.distillation_loss(student, teacher).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(".mt." in n for n in grads), grads


def test_hidden_state_distillation_term():
    """The paper's second term: MSE of the same rows' hidden states over the mask's positions, by hand; on a routed
    left-padded batch the prompt positions are out of the hidden states, so teacher and student line up with the
    user's tokens, and the term's gradient reaches the student only."""
    s, t = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    torch.testing.assert_close(mpt.hidden_state_loss(s, t), ((s - t) ** 2).mean())
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    want = sum(((s[b, i] - t[b, i]) ** 2).mean() for b in range(2) for i in range(3) if mask[b, i]) / 5
    torch.testing.assert_close(mpt.hidden_state_loss(s, t, mask), want)
    assert float(mpt.hidden_state_loss(t, t, mask)) == 0.0
    raises_one_line(lambda: mpt.hidden_state_loss(s, t[:, :2]), "differ")
    raises_one_line(lambda: mpt.hidden_state_loss(s, t, mask[:, :2]), "does not match")
    raises_one_line(lambda: mpt.hidden_state_loss(s, t, torch.zeros_like(mask)), "keeps no position")
    model = tiny_llama()
    ps.apply(model, METHOD, name="mt", tasks="a,b", num_tokens=3)
    for task in ("a", "b"):
        ps.apply(model, "prompt-tuning", name=f"teacher-{task}", num_tokens=2 + len(task), init="random", seed=1)
    ids = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    rows = ["a", "b", "a"]
    with torch.no_grad(), mpt.route(model, [f"teacher-{r}" for r in rows]):
        teacher = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    with mpt.route(model, [f"mt:{r}" for r in rows]):
        student = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    assert student.shape == teacher.shape == (3, 5, model.config.hidden_size)
    mpt.hidden_state_loss(student, teacher, mask).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(".mt." in n for n in grads), grads


# ---------------------------------------------------------------- PEFT
peft = pytest.importorskip("peft")


def peft_pair(tasks=3, n=4, r=2):
    base = tiny_llama()
    ref = peft.get_peft_model(copy.deepcopy(base), peft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=n, num_tasks=tasks, num_ranks=r)).eval()
    enc = ref.prompt_encoder["default"]
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in (enc.embedding.weight, enc.prefix_task_cols, enc.prefix_task_rows):
            p.copy_(torch.randn(p.shape, generator=g))
    return base, ref, enc


def test_same_tensors_give_pefts_logits_per_row_task():
    base, ref, enc = peft_pair()
    ours = ps.apply(copy.deepcopy(base), METHOD, num_tokens=4, tasks=3, r=2)
    m = module(ours, "default")
    with torch.no_grad():
        m.weight.copy_(enc.embedding.weight)
        for i in range(3):
            m.u[str(i)].copy_(enc.prefix_task_cols[i])
            m.v[str(i)].copy_(enc.prefix_task_rows[i])
    ids = torch.randint(3, VOCAB, (4, 6), generator=torch.Generator().manual_seed(2))
    task_ids = torch.tensor([2, 0, 1, 2])
    with torch.no_grad():
        want = ref(input_ids=ids, task_ids=task_ids).logits
        assert want.shape == (4, 4 + 6, VOCAB)   # PEFT's logits include the virtual positions
        with mpt.route(ours, [f"default:{int(t)}" for t in task_ids]):
            got = ours(input_ids=ids).logits
    torch.testing.assert_close(got, want[:, 4:], atol=1e-5, rtol=0)
    assert (want[0] - want[1]).abs().max() > 1e-3


def test_peft_folder_round_trip(tmp_path):
    _, ref, enc = peft_pair()
    ref.save_pretrained(str(tmp_path / "peft"))
    ours = ps.load(tiny_llama(), str(tmp_path / "peft"))
    ids = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(3))
    task_ids = torch.tensor([1, 2, 0])
    with torch.no_grad():
        want = ref(input_ids=ids, task_ids=task_ids).logits[:, 4:]
        with mpt.route(ours, [f"default:{int(t)}" for t in task_ids]):
            torch.testing.assert_close(ours(input_ids=ids).logits, want, atol=1e-5, rtol=0)
    ps.save(ours, str(tmp_path / "back"), format="peft")
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("peft", "back"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    again = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "back")).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, task_ids=task_ids).logits[:, 4:], want)

    named = ps.apply(tiny_llama(), METHOD, tasks="pol,spam", num_tokens=2)
    with pytest.warns(PeftFormatWarning, match="pol, spam become task_ids 0..1"):
        ps.save(named, str(tmp_path / "named"), format="peft")
