"""Choosing the learning rate on held-out training data (peftsurgery.train.holdout_split / choose_lr, `peftsurgery
train --lr auto`), on the tiny random Llama and word-level tokenizer of test_train.py."""
import json

import pytest
import torch
from safetensors.torch import load_file

import peftsurgery
import peftsurgery.train as train
from peftsurgery import hookimpl
from peftsurgery.cli import main
from peftsurgery.registry import Method
from peftsurgery.train import Example, choose_lr, holdout_split, write_jsonl

from conftest import raises_one_line, tiny_llama_4bit
from test_train import TEMPLATE, cloze, correct_by_hand, examples, tiny_model, tokenizer

LORA = {"r": 4, "targets": "all-linear"}
# on this model and data (96 examples, 8 epochs of batch 8) lora learns the task at 3e-3 (95% held out) and
# not at 1e-9 (the untrained model's 50%): the best rate is known
GOOD, NOTHING = 3e-3, 1e-9


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_holdout_split_is_exact_stratified_and_keeps_texts_on_one_side():
    exs = [Example(f"a{i}", "a") for i in range(30)] + [Example(f"b{i}", "b") for i in range(5)]
    exs += [Example("a3", "a"), Example("b1", "b"), Example("b1", "a")]   # repeated texts (one relabelled)
    rest, held = holdout_split(exs, fraction=0.2, least=2, seed=0)
    # per label: max(least, round(fraction * distinct texts)): a has 30 texts -> 6, b has 5 -> 2 (the least)
    assert len({e.text for e in held if e.text.startswith("a")}) == 6
    assert len({e.text for e in held if e.text.startswith("b")}) == 2
    assert not {e.text for e in rest} & {e.text for e in held}                # a text is on one side only
    assert sorted(map(repr, rest + held)) == sorted(map(repr, exs))           # nothing lost, nothing added
    assert rest == [e for e in exs if e in rest] and held == [e for e in exs if e in held]   # order kept
    assert holdout_split(exs, seed=0) == (rest, held)                          # the seed fixes it
    assert holdout_split(exs, seed=1)[1] != held
    # every held-out text's examples follow it ("b1" held means its relabelled copy is too)
    held_texts = {e.text for e in held}
    assert all((e.text in held_texts) == (e in held) for e in exs)


@pytest.mark.parametrize("kwargs,needles", [
    ({"fraction": 0.2, "least": 2}, ["label 'b'", "holds out 2 of the 3", "give at least 4 examples per label"]),
    ({"fraction": 0.0}, ["fraction in (0, 1)"]),
    ({"fraction": 1.0}, ["fraction in (0, 1)"]),
    ({"least": 0}, ["least >= 1"]),
])
def test_holdout_split_refuses_too_little_data_and_bad_settings(kwargs, needles):
    exs = [Example(f"a{i}", "a") for i in range(20)] + [Example(f"b{i}", "b") for i in range(3)]
    raises_one_line(lambda: holdout_split(exs, **kwargs), *needles)


def test_choose_lr_picks_the_best_held_out_accuracy_from_one_start_and_leaves_the_model_as_it_was(monkeypatch):
    model, task, exs = tiny_model(), cloze(["neg", "pos"]), examples(96)
    before = state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rest, held = holdout_split(exs, seed=0)
    starts, trained_on, by_hand, real_fit = [], [], [], train.fit

    def fit(model, task, examples, *args, **kw):   # what each trial starts from and trains on
        starts.append({k: v.clone() for k, v in model.state_dict().items() if "_peftsurgery" in k})
        trained_on.append(list(examples))
        out = real_fit(model, task, examples, *args, **kw)
        by_hand.append(correct_by_hand(model, held) / len(held))   # the held-out accuracy, counted by hand
        return out
    monkeypatch.setattr(train, "fit", fit)
    result = choose_lr(model, task, exs, "lora", [GOOD, NOTHING], epochs=8, batch_size=8, seed=0, **LORA)
    monkeypatch.undo()
    grid = result["grid"]
    assert [g["lr"] for g in grid] == [NOTHING, GOOD]                          # tried in ascending order
    assert [g["held_out_accuracy"] for g in grid] == by_hand
    assert by_hand[1] - by_hand[0] >= 0.3 and result["lr"] == GOOD             # the best one, by a wide margin
    assert (result["train"], result["held_out"], result["default"]) == (len(rest), len(held), 5e-4)
    assert trained_on == [rest, rest]                                          # never a held-out example
    assert all(torch.equal(starts[0][k], starts[1][k]) for k in starts[0])     # both trials from one start
    after = state(model)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and not peftsurgery.adapters(model)


def test_no_leakage_between_trials_even_when_apply_swaps_the_base_modules():
    """qlora drops the float weights at apply and remove() gives back dequantized ones: each trial must still start
    from the original base, so a rate's figures are those it gets when tried alone, and the base ends bit-identical."""
    task, exs = cloze(["neg", "pos"]), examples(32)
    model = tiny_llama_4bit()
    before = state(model)
    both = choose_lr(model, task, exs, "qlora", [1e-3, 1e-2], epochs=1)["grid"]
    after = state(model)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    alone = choose_lr(tiny_llama_4bit(), task, exs, "qlora", [1e-2], epochs=1)["grid"]
    assert both[1] == alone[0]


def test_ties_go_to_the_lower_loss_then_to_the_default(monkeypatch):
    model, task, exs = tiny_model(), cloze(["neg", "pos"]), examples(32)
    figures = iter([(0.5, 0.7), (0.5, 0.6), (0.25, 0.1)])
    monkeypatch.setattr(train, "_score", lambda *a, **k: next(figures))
    assert choose_lr(model, task, exs, "lora", [1e-4, 2e-4, 3e-4], epochs=1, **LORA)["lr"] == 2e-4
    monkeypatch.setattr(train, "_score", lambda *a, **k: (0.5, 0.7))
    assert choose_lr(model, task, exs, "lora", None, epochs=1, **LORA)["lr"] == 5e-4     # lora's default
    assert choose_lr(model, task, exs, "lora", [3e-4, 1e-4], epochs=1, **LORA)["lr"] == 1e-4


def test_a_failing_trial_leaves_the_model_bit_identical(monkeypatch):
    model, task, exs = tiny_model(), cloze(["neg", "pos"]), examples(32)
    before = state(model)

    def broken(*a, **k):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(train, "_score", broken)
    with pytest.raises(RuntimeError):
        choose_lr(model, task, exs, "lora", [1e-3], epochs=1, **LORA)
    assert not peftsurgery.adapters(model)
    after = state(model)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_choose_lr_errors_are_one_line():
    model, task, exs = tiny_model(), cloze(["neg", "pos"]), examples(32)
    raises_one_line(lambda: choose_lr(model, task, exs, "lora", [], **LORA), "at least one learning rate")
    raises_one_line(lambda: choose_lr(model, task, exs, "lora", [1e-3, -1.0], **LORA), "each rate", "-1.0")
    raises_one_line(lambda: choose_lr(model, task, exs[:6], "lora", **LORA), "give at least 4 examples per label")
    raises_one_line(lambda: choose_lr(model, task, exs + [Example("good", "maybe")] * 4, "lora", **LORA),
                    "'maybe'", "no label word")
    peftsurgery.apply(model, "lora", **LORA)
    raises_one_line(lambda: choose_lr(model, task, exs, "lora", **LORA), "remove the attached adapters (default)")


class Rates:
    """lora, declaring the rates to try."""

    def __init__(self, rates):
        self.rates = rates
        self.lora = Method("lora").plugin

    @hookimpl
    def peftsurgery_config(self):
        return self.lora.peftsurgery_config()

    @hookimpl
    def peftsurgery_rules(self, config, sites):
        return self.lora.peftsurgery_rules(config, sites)

    @hookimpl
    def peftsurgery_budget(self, config, sites):
        return self.lora.peftsurgery_budget(config, sites)

    @hookimpl
    def peftsurgery_learning_rates(self, config):
        return self.rates


def test_the_grid_is_the_plugins_else_a_ladder_around_its_default(registered):
    m = Method("lora")
    assert m.learning_rates(m.config({})) == pytest.approx([5e-4 / 3, 5e-4, 1.5e-3])
    m = Method("prompt-tuning")                                    # its own, as the README documents
    assert m.learning_rates(m.config({})) == [1e-3, 3e-3, 1e-2, 3e-2]
    m = Method(registered(Rates([3e-2, 1e-3, 1e-3]), "test-rates"))
    assert m.learning_rates(m.config({})) == [1e-3, 3e-2]
    for bad, shown in [([], "[]"), ("fast", "'fast'"), ([1e-3, 0], "0")]:
        m = Method(registered(Rates(bad), f"test-rates-{len(shown)}"))
        raises_one_line(lambda: m.learning_rates(m.config({})), "peftsurgery_learning_rates", shown, "above 0",
                        "fix the plugin")


# ---- command line -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("auto")
    tiny_model().save_pretrained(d / "model")
    tokenizer().save_pretrained(d / "model")
    exs = examples(96)
    write_jsonl(exs, str(d / "train.jsonl"))
    write_jsonl(examples(32, seed=1), str(d / "test.jsonl"))
    return d


def _train(files, out, lr, capsys, *extra):
    code = main(["train", str(files / "model"), "--plugin", "lora", "--set", "r=4", "--targets", "all-linear",
                 "--data", str(files / "train.jsonl"), "--eval-data", str(files / "test.jsonl"), "--template",
                 TEMPLATE.replace("\n", "\\n"), "--label", "pos=positive", "--label", "neg=negative", "--epochs",
                 "8", "--batch-size", "8", "--lr", lr, "--json", "-o", str(out), *extra])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    return stdout, err, json.loads(stdout.strip().splitlines()[-2])


def test_cli_lr_auto_reports_the_grid_then_trains_on_everything_as_a_direct_run_would(files, tmp_path, capsys):
    stdout, err, row = _train(files, tmp_path / "auto", f"{NOTHING},{GOOD}", capsys)
    search = row["lr_search"]
    assert row["lr"] == search["lr"] == GOOD and [g["lr"] for g in search["grid"]] == [NOTHING, GOOD]
    assert search["train"] + search["held_out"] == 96 and row["steps"] == 8 * 12      # final run: all 96 examples
    assert "chosen" in stdout and "now training on all 96" in stdout
    assert f"lr {GOOD:.3g}: held-out accuracy" in err                                     # progress per trial
    assert json.load(open(tmp_path / "auto" / "train.json"))["results"]["lr_search"] == search
    _, _, direct = _train(files, tmp_path / "direct", str(GOOD), capsys, "--quiet")
    assert "lr_search" not in direct and direct["accuracy"] == row["accuracy"]
    a, b = (load_file(str(tmp_path / d / "adapter.safetensors")) for d in ("auto", "direct"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)               # bit-identical adapter


@pytest.mark.parametrize("lr,extra,message", [
    ("auto", ["--ensemble", "2"], "--lr auto does not combine with --ensemble"),
    ("fast", [], "'fast' is not a rate above 0"),
    ("1e-3,-1", [], "is not a rate above 0"),
    ("0", [], "is not a rate above 0"),
])
def test_cli_lr_errors_are_one_line(files, tmp_path, capsys, lr, extra, message):
    code = main(["train", str(files / "model"), "--plugin", "lora", "--data", str(files / "train.jsonl"), "--lr", lr,
                 *extra, "--quiet", "-o", str(tmp_path / "o")])
    err = capsys.readouterr()[1]
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_cli_lr_auto_with_too_little_data_is_one_line(files, tmp_path, capsys):
    write_jsonl(examples(6), str(tmp_path / "few.jsonl"))
    code = main(["train", str(files / "model"), "--plugin", "lora", "--data", str(tmp_path / "few.jsonl"), "--lr",
                 "auto", "--label", "pos=positive", "--label", "neg=negative", "--quiet", "-o", str(tmp_path / "o")])
    err = capsys.readouterr()[1]
    assert code == 2 and len(err.strip().splitlines()) == 1 and "or a fixed learning rate" in err, err
    assert not (tmp_path / "o").exists()
