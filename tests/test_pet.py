"""PET (peftsurgery/pet.py, `peftsurgery pet`): pattern weights are the patterns' accuracies before training,
the soft labels are what the saved pattern adapters give, the final classifier trains on them with the soft
cross-entropy, and the base comes out unchanged."""
import json

import pytest
import torch
from test_train import WORDMAP, examples, tiny_model, tokenizer

from conftest import raises_one_line
import peftsurgery as ps
from peftsurgery.cli import main
from peftsurgery.pet import Distill, label_scores, pet, soft_labels
from peftsurgery.tasks import Task, Verbalizer
from peftsurgery.train import evaluate, read_examples, write_jsonl

PATTERNS = ["Review: {text}\nSentiment:", "{text}\nSentiment:"]


def tasks():
    return [Task(tokenizer(), p, Verbalizer(["pos", "neg"], WORDMAP)) for p in PATTERNS]


def test_soft_labels_are_the_weighted_mean_over_the_temperature():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    want = ((0.75 * a + 0.25 * b) / 2).softmax(-1)
    torch.testing.assert_close(soft_labels([a, b], [0.75, 0.25], 2.0), want)
    torch.testing.assert_close(soft_labels([a, b], [0.0, 0.0], 1.0), ((a + b) / 2).softmax(-1))


def test_the_pipeline(tmp_path):
    model = tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    labelled, unlabelled, test = examples(32, seed=1), examples(24, seed=2), examples(16, seed=3)
    weights = [evaluate(tiny_model(), t, labelled) for t in tasks()]
    report = pet(model, tokenizer(), tasks(), labelled, unlabelled, "lora", {"r": 2}, epochs=2, batch_size=8,
                 lr=1e-2, final_epochs=8, final_lr=3e-2, test=test, out=str(tmp_path), temperature=0.25)
    assert [r["weight"] for r in report["pvps"]] == weights
    scores = []
    for j, t in enumerate(tasks()):   # the saved pattern adapters give the soft labels and the accuracies
        m = ps.load(tiny_model(), str(tmp_path / f"pvp-{j}"))
        scores.append(label_scores(m, t, unlabelled))
        assert report["pvps"][j]["accuracy"] == evaluate(m, t, test)
    torch.testing.assert_close(report["soft_labels"], soft_labels(scores, weights, 0.25))
    assert sorted(ps.adapters(model)) == ["final"]   # the pattern adapters were removed
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())
    distill = Distill(tokenizer())
    assert report["final_accuracy"] == distill.accuracy(model, test, ["pos", "neg"])
    again = ps.load(tiny_model(), str(tmp_path / "final"))
    with torch.no_grad():
        torch.testing.assert_close(distill.logits(again, test), distill.logits(model, test))
    # the distillation loss is the soft cross-entropy, and training lowered it on the unlabelled set
    rows = list(zip(unlabelled, report["soft_labels"]))
    with torch.no_grad():
        q = report["soft_labels"]
        want = -(q * distill.logits(model, unlabelled).log_softmax(-1)).sum(-1).mean()
        torch.testing.assert_close(distill.loss(model, rows), want)
        fresh = ps.apply(tiny_model(), "task-head", name="final", task="sequence", labels=2)
        assert float(distill.loss(model, rows)) < float(distill.loss(fresh, rows)) - 0.03   # 0.62 against 0.69


def test_the_final_classifier_learns_the_labelled_examples_too_when_asked(monkeypatch):
    """final_labelled: the distillation rows are the unlabelled texts with their soft labels, then the labelled
    examples with their own labels one-hot; without it the soft-labelled texts only (the paper's)."""
    import peftsurgery.pet as pet_module
    seen, real = [], pet_module.fit
    monkeypatch.setattr(pet_module, "fit", lambda model, task, rows, *a, **k: (
        seen.append(list(rows)) if isinstance(task, Distill) else None, real(model, task, rows, *a, **k))[1])
    labelled, unlabelled = examples(8, seed=1), examples(6, seed=2)
    for flag, n in ((False, 6), (True, 14)):
        report = pet(tiny_model(), tokenizer(), tasks(), labelled, unlabelled, "lora", {"r": 2}, epochs=1,
                     batch_size=8, final_epochs=1, final_labelled=flag)
        rows = seen[-1]
        assert len(rows) == n and [e for e, _ in rows[:6]] == unlabelled
        torch.testing.assert_close(torch.stack([t for _, t in rows[:6]]), report["soft_labels"])
        assert [e for e, _ in rows[6:]] == (labelled if flag else [])
        assert all(t.tolist() == [float(lab == e.label) for lab in ("pos", "neg")] for e, t in rows[6:])


def test_a_failed_final_stage_leaves_the_model_bare():
    model = tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ps.SurgeryError, match="r"):   # the final adapter's option is refused after the head is on
        pet(model, tokenizer(), tasks(), examples(8), examples(4), "lora", {"r": 2}, epochs=1, batch_size=8,
            final_plugin="lora", final_config={"r": 0})
    assert not ps.adapters(model)
    assert model.state_dict().keys() == base.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())


def test_the_final_head_is_any_sequence_head_plugin(tmp_path):
    """head="p-tuning-v2": the final classifier is P-tuning v2's head with its deep prompts, saved as that method
    and giving the same logits when loaded; a head plugin without a sequence task is refused before any change."""
    model = tiny_model()
    test = examples(8, seed=3)
    report = pet(model, tokenizer(), tasks(), examples(8), examples(8, seed=2), "lora", {"r": 2}, epochs=1,
                 batch_size=8, final_epochs=1, test=test, out=str(tmp_path), head="p-tuning-v2",
                 head_config={"num_tokens": 3})
    assert sorted(ps.adapters(model)) == ["final"] and ps.adapters(model)["final"].method == "p-tuning-v2"
    assert json.loads((tmp_path / "final" / "adapter.json").read_text())["config"]["num_tokens"] == 3
    again, distill = ps.load(tiny_model(), str(tmp_path / "final")), Distill(tokenizer())
    assert report["final_accuracy"] == distill.accuracy(again, test, ["pos", "neg"])
    with torch.no_grad():
        torch.testing.assert_close(distill.logits(again, test), distill.logits(model, test))
    bare = tiny_model()
    raises_one_line(lambda: pet(bare, tokenizer(), tasks(), examples(8), examples(4), "lora", {"r": 2}, epochs=1,
                                batch_size=8, head="lora"), "final head 'lora'",
                    "(p-tuning-v2, task-head)")   # the installed plugins that take a sequence task, found by asking
    assert not ps.adapters(bare)


def test_mistakes(tmp_path):
    raises_one_line(lambda: pet(tiny_model(), tokenizer(), tasks()[:1], examples(4), examples(4)), "at least 2")
    raises_one_line(lambda: pet(ps.apply(tiny_model(), "lora"), tokenizer(), tasks(), examples(4), examples(4)),
                    "bare model", "default")
    other = Task(tokenizer(), "{text}", Verbalizer(["neg", "pos"], WORDMAP))
    raises_one_line(lambda: pet(tiny_model(), tokenizer(), [tasks()[0], other], examples(4), examples(4)),
                    "same labels")
    (tmp_path / "u.jsonl").write_text('{"txt": 1}\n')
    raises_one_line(lambda: read_examples(str(tmp_path / "u.jsonl"), labelled=False), "JSON object with text")
    (tmp_path / "u.txt").write_text("good film\n\nawful plot\n")
    assert [e.text for e in read_examples(str(tmp_path / "u.txt"), labelled=False)] == ["good film", "awful plot"]
    (tmp_path / "u.csv").write_text("text\ngood film\n")    # a CSV's lines are not texts: refused, not read raw
    raises_one_line(lambda: read_examples(str(tmp_path / "u.csv"), labelled=False), "give a .jsonl of texts")


def test_cli(tmp_path, capsys):
    path = tmp_path / "model"
    tiny_model().save_pretrained(path)
    tokenizer().save_pretrained(path)
    write_jsonl(examples(16, seed=1), str(tmp_path / "train.jsonl"))
    write_jsonl(examples(8, seed=3), str(tmp_path / "test.jsonl"))
    (tmp_path / "u.txt").write_text("\n".join(e.text for e in examples(16, seed=2)) + "\n")
    common = [str(path), "--data", str(tmp_path / "train.jsonl"), "--unlabelled", str(tmp_path / "u.txt"),
              "--label=pos=positive", "--label=neg=negative", "--quiet", "--epochs", "1", "--final-epochs", "1"]
    assert main(["pet", *common, *sum([["--pattern", p] for p in PATTERNS], []), "--eval-data",
                 str(tmp_path / "test.jsonl"), "--final-plugin", "lora", "--final-labelled", "-o", str(tmp_path / "pet")]) == 0
    out = capsys.readouterr().out
    assert "ensemble" in out and "final classifier" in out
    record = json.loads((tmp_path / "pet" / "pet.json").read_text())
    assert len(record["pvps"]) == 2 and 0 <= record["final_accuracy"] <= 1 and record["final_head"] == "task-head"
    assert sorted(p.name for p in (tmp_path / "pet").iterdir()) == ["final", "final-adapter", "pet.json",
                                                                     "pvp-0", "pvp-1"]
    assert main(["pet", *common, "--pattern", PATTERNS[0], "-o", str(tmp_path / "x")]) == 2
    assert "two or more --pattern" in capsys.readouterr().err
    assert main(["pet", *common, *sum([["--pattern", p] for p in PATTERNS], []), "--final-head", "lora",
                 "-o", str(tmp_path / "y")]) == 2
    assert "final head 'lora'" in capsys.readouterr().err and not (tmp_path / "y").exists()
