"""Prompt ensembling (peftsurgery.ensemble, `peftsurgery train --ensemble K`): k prompts trained in one routed
batch, each example replicated across them, combined by the mean of probabilities or a majority vote."""
import json

import torch

import peftsurgery as ps
from peftsurgery.cli import main
from peftsurgery.ensemble import Ensemble, apply_ensemble, evaluate_ensemble
from peftsurgery.train import fit, loss_of, write_jsonl

from conftest import raises_one_line
from test_train import TEMPLATE, WORDMAP, cloze, examples, tiny_model, tokenizer


def ensembled(k=3):
    model = tiny_model()
    names = apply_ensemble(model, "prompt-tuning", k, num_tokens=2, init="vocab")
    return model, Ensemble(cloze(["neg", "pos"]), names)


def test_each_replica_scores_what_its_member_scores_alone_and_the_loss_averages_them():
    model, ens = ensembled()
    exs = examples(5, seed=1)
    assert ens.names == ["ensemble-0", "ensemble-1", "ensemble-2"]
    with torch.no_grad():
        got = ens.scores(model, ens.encode(exs))
        assert got.shape == (5 * 3, 2)
        alone = []
        for j, n in enumerate(ens.names):
            ps.set_active(model, [n])
            alone.append(ens.task.scores(model, ens.task.encode(exs)))
            torch.testing.assert_close(got[j::3], alone[-1], atol=1e-5, rtol=0)
        assert not torch.allclose(alone[0], alone[1])   # the members start apart (seeds 0, 1, 2)
    ps.set_active(model, ens.names)
    members = []
    for n in ens.names:
        ps.set_active(model, [n])
        members.append(loss_of(model, ens.task, exs))
    ps.set_active(model, ens.names)
    torch.testing.assert_close(loss_of(model, ens, exs), torch.stack(members).mean(), atol=1e-6, rtol=1e-6)


def test_mean_of_probabilities_and_majority_vote():
    ens = Ensemble(None, ["a", "b", "c"])
    p = torch.tensor([[[0.99, 0.01], [0.4, 0.6], [0.4, 0.6]],     # mean picks 0, the vote 1
                      [[0.2, 0.8], [0.3, 0.7], [0.9, 0.1]]])      # both pick 1
    scores = p.log().view(6, 2)
    assert ens.combine(scores, "mean").argmax(-1).tolist() == [0, 1]
    torch.testing.assert_close(ens.combine(scores, "mean").exp(), p.mean(1))
    assert ens.combine(scores, "vote").argmax(-1).tolist() == [1, 1]
    tie = Ensemble(None, ["a", "b"])   # one vote each: the higher mean probability wins
    assert tie.combine(torch.tensor([[0.9, 0.1], [0.45, 0.55]]).log(), "vote").argmax(-1).tolist() == [0]
    raises_one_line(lambda: Ensemble(None, ["a", "b"], "median"), "mean, vote")
    raises_one_line(lambda: Ensemble(None, ["a"]), "at least 2 members")


def test_training_moves_every_member_and_evaluation_combines_them():
    model, ens = ensembled()
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    fit(model, ens, examples(24), epochs=1, batch_size=8, lr=1e-2)
    moved = {n for n, p in model.named_parameters() if n in start and not torch.equal(p, start[n])}
    assert {n.split(".")[1] for n in moved} == set(ens.names)
    test = examples(10, seed=5)
    res = evaluate_ensemble(model, ens, test, batch_size=4)
    targets = torch.tensor([ens.labels.index(e.label) for e in test])
    for key, how in (("accuracy", "mean"), ("accuracy_vote", "vote")):
        assert res[key] == (ens.predict(model, test, how) == targets).float().mean().item()
    for j, n in enumerate(ens.names):
        ps.set_active(model, [n])
        with torch.no_grad():
            pred = ens.task.scores(model, ens.task.encode(test)).argmax(-1)
        assert res["member_accuracy"][j] == (pred == targets).float().mean().item()


def test_apply_ensemble_is_all_or_nothing():
    model = tiny_model()
    raises_one_line(lambda: apply_ensemble(model, "prompt-tuning", 1), "at least 2 members")
    ps.apply(model, "lora", name="ensemble-1")
    raises_one_line(lambda: apply_ensemble(model, "prompt-tuning", 3, num_tokens=2), "'ensemble-1'")
    assert list(ps.adapters(model)) == ["ensemble-1"]


def test_members_that_start_identical_are_refused():
    """init=text does not depend on the seed: every member would start from the same prompt and, trained on the
    same replicated batches, stay that prompt. Refused in one line, nothing left attached."""
    model = tiny_model()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    raises_one_line(lambda: apply_ensemble(model, "prompt-tuning", 3, num_tokens=2, init="text", text="5,6"),
                    "start identical")
    assert ps.adapters(model) == {}
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())


def test_cli_train_ensemble_then_eval(tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    tokenizer().save_pretrained(model_dir)
    exs = examples(40)
    write_jsonl(exs[:24], str(tmp_path / "train.jsonl"))
    write_jsonl(exs[24:], str(tmp_path / "test.jsonl"))
    out = tmp_path / "ens"
    labels = [f"--label={k}={w.strip()}" for k, w in WORDMAP.items()]
    assert main(["train", str(model_dir), "--plugin", "prompt-tuning", "--set", "num_tokens=2", "--ensemble", "3",
                 "--data", str(tmp_path / "train.jsonl"), "--eval-data", str(tmp_path / "test.jsonl"),
                 "--template", TEMPLATE, *labels, "--epochs", "1", "--batch-size", "8", "-o", str(out), "--quiet",
                 "--json"]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-2])
    saved = json.loads((out / "train.json").read_text())
    assert saved["ensemble"] == ["ensemble-0", "ensemble-1", "ensemble-2"] and saved["combine"] == "mean"
    assert all((out / n).is_dir() for n in saved["ensemble"])   # one folder per member
    assert main(["eval", str(model_dir), "--adapter", str(out), "--data", str(tmp_path / "test.jsonl"), "--quiet",
                 "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("accuracy", "accuracy_vote", "member_accuracy"):
        assert evaluated[key] == trained[key], key
