"""In-context learning (peftsurgery/icl.py, `peftsurgery eval --shots`): what the model reads is the
demonstrations written with the template and then the query; the draw is per query (a row scores the same in any
batch); balanced and similar selections pick what they say; calibration is log p - log p(content-free)."""

import pytest
import torch
from test_train import TEMPLATE, WORDMAP, examples, tiny_model, tokenizer

from conftest import raises_one_line
from peftsurgery.cli import main
from peftsurgery.icl import InContext
from peftsurgery.tasks import Task, Verbalizer
from peftsurgery.train import Example, evaluate, write_jsonl

POOL = examples(40, seed=1)


def task(**kw):
    return Task(tokenizer(), TEMPLATE, Verbalizer(["pos", "neg"], WORDMAP), "causal", **kw)


def test_the_model_reads_the_demonstrations_then_the_query():
    icl = InContext(task(), POOL, shots=3, seed=5)
    q = Example("the film was good", "pos")
    demos = icl.demonstrations(q)
    assert len(demos) == 3 and len(set(demos)) == 3 and all(d in POOL for d in demos)
    text = "".join(f"Review: {d.text}\nSentiment:{WORDMAP[d.label]}\n\n" for d in demos) + \
        "Review: the film was good\nSentiment:"
    ids = icl.encode([q]).input_ids[0]
    assert ids.tolist() == tokenizer().encode(text)
    assert icl.demonstrations(q) == demos and InContext(task(), POOL, 3, seed=6).demonstrations(q) != demos


def test_a_query_is_never_its_own_demonstration_and_scores_alike_in_any_batch():
    model = tiny_model()
    icl = InContext(task(), POOL, shots=4, seed=0)
    assert all(POOL[0] not in icl.demonstrations(POOL[0]) for _ in range(3))
    with torch.no_grad():
        alone = icl.scores(model, icl.encode([POOL[3]]))
        batch = icl.scores(model, icl.encode([POOL[7], POOL[3], Example("a", "neg")]))
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=0)


def test_balanced_takes_the_labels_in_turn_and_similar_the_nearest():
    model = tiny_model()
    for k in (4, 5):
        for q in POOL[:5]:
            labels = [d.label for d in InContext(task(), POOL, k, "balanced").demonstrations(q)]
            assert abs(labels.count("pos") - labels.count("neg")) <= 1
    icl = InContext(task(), POOL, 3, "similar", model=model)
    emb = model.get_input_embeddings().weight.detach()
    vec = lambda t: torch.nn.functional.normalize(emb[tokenizer().encode(t)].mean(0), dim=0)
    q = Example("good good film", "pos")
    by_hand = sorted(POOL, key=lambda e: float(vec(e.text) @ vec(q.text)))[-3:]   # nearest last
    assert icl.demonstrations(q) == by_hand


def test_calibration_is_relative_to_the_content_free_input_behind_the_same_demonstrations():
    model = tiny_model()
    icl = InContext(task(), POOL, 2, seed=3, calibrate=True)
    qs = [Example("the plot was awful", "neg"), Example("lovely acting", "pos")]
    plain = InContext(task(), POOL, 2, seed=3)
    t = task()
    with torch.no_grad():
        got = icl.scores(model, icl.encode(qs))
        for i, q in enumerate(qs):
            t.context = lambda e, q=q: plain.context(q)
            s = t.scores(model, t.encode([q, Example("N/A", q.label)])).log_softmax(-1)
            torch.testing.assert_close(got[i], s[0] - s[1], atol=1e-5, rtol=0)
    assert evaluate(model, icl, POOL[:6]) in [i / 6 for i in range(7)]


def test_mistakes_are_one_line():
    raises_one_line(lambda: InContext(task(), POOL, 0), "--shots must be a positive integer")
    zero = InContext(task(), [], 0, calibrate=True)   # zero-shot calibration: no context, the N/A twin
    q = Example("good film", "pos")
    both = zero.encode([q]).inner
    assert both.input_ids[0][both.attention_mask[0].bool()].tolist() == task().encode([q]).input_ids[0].tolist()
    raises_one_line(lambda: InContext(task(), POOL[:3], 3), "pool of at least 4", "fewer --shots")
    raises_one_line(lambda: InContext(task(), POOL, 2, "nearest"), "unknown demonstration selection")
    raises_one_line(lambda: InContext(task(), POOL, 2, "similar"), "need the model")
    raises_one_line(lambda: InContext(task(), POOL + [Example("x", "meh")], 2), "label 'meh'")
    dup = [Example("good film", "pos")] * 3 + POOL[:1]
    raises_one_line(lambda: InContext(task(), dup, 2).demonstrations(dup[0]), "other than the query")
    icl = InContext(task(max_length=20), POOL, 8)
    raises_one_line(lambda: icl.encode(POOL[:1]), "and demonstrations", "fewer --shots")


@pytest.mark.parametrize("extra", [[], ["--calibrate", "--shot-selection", "balanced"]])
def test_cli(tmp_path, capsys, extra):
    from test_train import tiny_model as build
    path = tmp_path / "model"
    build().save_pretrained(path)
    tokenizer().save_pretrained(path)
    write_jsonl(POOL, str(tmp_path / "pool.jsonl"))
    write_jsonl(examples(10, seed=2), str(tmp_path / "test.jsonl"))
    common = [str(path), "--data", str(tmp_path / "test.jsonl"), "--template", TEMPLATE, "--label=pos=positive",
              "--label=neg=negative", "--quiet"]
    assert main(["eval", *common, "--shots", "2", "--shots-from", str(tmp_path / "pool.jsonl"), *extra]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main(["eval", *common, "--shots", "2"]) == 2
    assert "--shots K and --shots-from FILE together" in capsys.readouterr().err
    assert main(["eval", *common, "--calibrate"]) == 0   # zero-shot calibration


# ---- instruction (chat) templates ------------------------------------------------------------------------------
CHAT = ("{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def chat_tokenizer():
    tok = tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|end|>", "<|assistant|>"]})
    tok.chat_template = CHAT
    return tok


def test_a_chat_task_writes_the_template_as_the_users_message_and_reads_the_assistants_answer():
    tok = chat_tokenizer()
    t = Task(tok, "Is this review positive or negative?\n{text}", Verbalizer(["pos", "neg"], WORDMAP), chat=True)
    q = Example("the film was good", "pos")
    want = tok.apply_chat_template([{"role": "user", "content": "Is this review positive or negative?\n"
                                                                "the film was good"}],
                                   add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    ids = t.encode([q]).input_ids[0].tolist()
    assert ids == list(want) and ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert t.to_json()["chat"] is True and t.template.text == "Is this review positive or negative?\n{text}"
    long = Task(tok, "{text}", Verbalizer(["pos", "neg"], WORDMAP), max_length=8, chat=True)
    cut = long.encode([Example("the film was good and the acting lovely", "pos")]).input_ids[0].tolist()
    assert len(cut) == 8 and cut[0] == tok.convert_tokens_to_ids("<|user|>") and cut[-2:] == \
        tok.convert_tokens_to_ids(["<|end|>", "<|assistant|>"])   # only the text is cut


def test_chat_mistakes_are_one_line():
    v = Verbalizer(["pos", "neg"], WORDMAP)
    raises_one_line(lambda: Task(tokenizer(), "{text}", v, chat=True), "no chat template")
    raises_one_line(lambda: Task(chat_tokenizer(), "{text}", v, "seq2seq", chat=True), "causal")


def test_chat_demonstrations_are_earlier_turns_answered_by_the_assistant():
    tok = chat_tokenizer()
    t = Task(tok, "Is this review positive or negative?\n{text}", Verbalizer(["pos", "neg"], WORDMAP), chat=True)
    icl = InContext(t, POOL, shots=2, seed=1, calibrate=True)
    q = Example("the film was good", "pos")
    turns = [m for d in icl.demonstrations(q) for m in (
        {"role": "user", "content": f"Is this review positive or negative?\n{d.text}"},
        {"role": "assistant", "content": WORDMAP[d.label].lstrip()})]
    for text, row in (("the film was good", 0), ("N/A", 1)):   # the query, then its content-free twin
        want = tok.apply_chat_template(turns + [{"role": "user", "content": f"Is this review positive or "
                                                 f"negative?\n{text}"}], add_generation_prompt=True, tokenize=True)
        want = want["input_ids"] if hasattr(want, "keys") else want
        batch = icl.encode([q]).inner
        assert batch.input_ids[row][batch.attention_mask[row].bool()].tolist() == list(want)
    zero = InContext(t, POOL, 0, calibrate=True)   # zero-shot calibration in a chat: the chat text stays
    assert zero.encode([q]).inner.input_ids[0].tolist() == t.encode([q]).input_ids[0].tolist()
    model = tiny_model()
    model.resize_token_embeddings(len(tok))
    with torch.no_grad():
        alone = icl.scores(model, icl.encode([q]))
        batch = icl.scores(model, icl.encode([POOL[5], q]))
    torch.testing.assert_close(batch[1:], alone, atol=1e-5, rtol=0)


# ---- chain of thought ------------------------------------------------------------------------------------------
def test_chain_of_thought_scores_the_labels_after_the_models_own_rationale():
    from peftsurgery.cot import CUE, TRIGGER, chain_of_thought, rationales
    model, t = tiny_model(), task()
    qs = [Example("the film was good", "pos"), Example("awful plot", "neg"), Example("a dull story", "neg")]
    got = chain_of_thought(model, t, qs, max_new_tokens=5, batch_size=2)
    prompts = [f"Review: {q.text}\nSentiment: {CUE}" for q in qs]
    written = [s["rationale"] for s in got["samples"]]
    for p, w in zip(prompts, written):   # in a left-padded batch, what greedy generation writes for it alone
        ids = torch.tensor([tokenizer().encode(p)])
        with torch.no_grad():
            new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=5, pad_token_id=t.pad_id)[0, ids.shape[1]:]
        assert w == tokenizer().decode(new, skip_special_tokens=True) == rationales(model, t, [p], 5)[0]
    answer = Task(tokenizer(), "{text}\n" + TRIGGER, t.verbalizer, "causal")
    want = evaluate(model, answer, [Example(p + r, q.label) for p, r, q in zip(prompts, written, qs)])
    assert got["accuracy"] == want and len(written) == 3 and all(written)
    raises_one_line(lambda: chain_of_thought(model, t, qs, max_new_tokens=0), "--cot-tokens")


def test_cli_cot(tmp_path, capsys):
    path = tmp_path / "model"
    tiny_model().save_pretrained(path)
    tokenizer().save_pretrained(path)
    write_jsonl(examples(4, seed=2), str(tmp_path / "test.jsonl"))
    common = [str(path), "--data", str(tmp_path / "test.jsonl"), "--template", TEMPLATE, "--label=pos=positive",
              "--label=neg=negative", "--quiet"]
    assert main(["eval", *common, "--cot", "--cot-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("rationale:") == 3 and "accuracy" in out
    assert main(["eval", *common, "--cot", "--shots", "2", "--shots-from", str(tmp_path / "test.jsonl")]) == 2
