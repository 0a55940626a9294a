"""The task layer: templates and verbalizers (pattern-verbalizer pairs) that turn a language model into a
classifier. It sits beside the surgery core, which knows nothing of it; `peftsurgery train` / `eval` and
peftsurgery.train use it.

A Template places the input fields, literal text, the answer slot and soft tokens:

    "Review: {text}\\nSentiment:"             causal LM: the answer is the next token(s) (no {answer}: at the end)
    "{text} It was {answer}."                masked LM: {answer} becomes the tokenizer's mask token(s)
    "{soft:3}{text}{soft} Question: {text_b}?{answer}"   soft tokens anywhere, in runs; {text_b} for pairs

A Verbalizer maps each label to one or several words (" great", " very good"). A word's score is the sum (or the
mean, score="mean") of its tokens' log-probabilities at the answer slot: a causal LM reads each token after the
prompt and the word's earlier tokens, a masked LM puts one mask per token and reads each mask, an
encoder-decoder reads the decoder's output from its start token. A label's score combines its words' scores:
their mean (combine="mean", as PET) or the log of their summed probabilities (combine="logsumexp"). When every
word is one token, the words' logits stand in for their log-probabilities: they differ by a per-row constant,
which changes neither the argmax nor the cross-entropy over labels (and keeps the scores of the one-token causal
case exactly what they always were).

Truncation cuts input fields only (the longest first, from its end), never the template, soft tokens or the answer
slot. Batches pad on either side (padding_side); a row scores the same alone or in any batch: the attention mask
hides padding and position ids count real tokens only, where the model takes them.

Soft tokens ({soft}, {soft:N}) are positions a method fills with trainable embeddings: Batch.soft marks them.
A rule that fills them declares `fills_soft_tokens = True` and reads the mask of the batch being scored with
soft_tokens_of(model) (all False for a template without soft tokens: such a rule then refuses rather than do
nothing); a template with soft tokens scored with no such rule active is an error.
"""
from __future__ import annotations

import bisect
import contextlib
import copy
import inspect
import re
from dataclasses import dataclass

import torch

from .errors import SurgeryError

KINDS = ("causal", "masked", "seq2seq")
FIELDS = ("text", "text_b")
SCORES = ("sum", "mean")
COMBINES = ("mean", "logsumexp")
PADDING = ("left", "right")
_PLACEHOLDER = re.compile(r"\{(\w+)(?::(\d+))?\}")
SOFT_TOKENS = "_peftsurgery_soft_tokens"   # model attribute holding the soft-token mask while a batch runs


class Template:
    """A parsed template: literal text, {text}, {text_b}, one {answer}, {soft} / {soft:N}. Without {answer} the
    answer slot is at the end. Other {name}s are an error; other braces are literal text."""

    def __init__(self, text: str):
        if not isinstance(text, str):
            raise SurgeryError(f"a template is a string, got {type(text).__name__}")
        self.text = text
        parts, at = [], 0
        for m in _PLACEHOLDER.finditer(text):
            name, n = m.group(1), m.group(2)
            if m.start() > at:
                parts.append(("lit", text[at:m.start()]))
            at = m.end()
            if name == "soft":
                if n is not None and int(n) < 1:
                    raise SurgeryError(f"{m.group(0)} in template {text!r}: give at least one soft token")
                parts.append(("soft", int(n or 1)))
            elif n is not None:
                raise SurgeryError(f"{m.group(0)} in template {text!r}: only {{soft:N}} takes a count")
            elif name in FIELDS:
                parts.append(("field", name))
            elif name == "answer":
                parts.append(("answer", None))
            else:
                raise SurgeryError(f"unknown placeholder {m.group(0)} in template {text!r}; use {{text}}, "
                                   "{text_b}, {answer}, {soft} or {soft:N}")
        if at < len(text):
            parts.append(("lit", text[at:]))
        if ("field", "text") not in parts:
            raise SurgeryError(f"template {text!r} has no {{text}} placeholder")
        answers = [i for i, p in enumerate(parts) if p[0] == "answer"]
        if len(answers) > 1:
            raise SurgeryError(f"template {text!r} has {len(answers)} {{answer}} slots; give one")
        if not answers:
            parts.append(("answer", None))
        self.parts = parts
        self.fields = tuple(dict.fromkeys(v for k, v in parts if k == "field"))
        self.soft = sum(v for k, v in parts if k == "soft")
        self.answer_last = parts[-1][0] == "answer"

    def __repr__(self):
        return f"Template({self.text!r})"


class Verbalizer:
    """Labels (in order: the class indices) and their words. `words` maps a label to a word or a list of words;
    a label not in it gets " " + label. score: "sum" or "mean" of a word's token log-probabilities; combine:
    "mean" of a label's word scores, or "logsumexp" (the log of the words' summed probabilities)."""

    def __init__(self, labels: list[str], words: dict | None = None, score: str = "sum", combine: str = "mean"):
        self.labels = [str(lab) for lab in labels]
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise SurgeryError(f"labels must be distinct and at least one, got {self.labels}")
        words = dict(words or {})
        unknown = sorted(set(words) - set(self.labels))
        if unknown:
            raise SurgeryError(f"label word given for {unknown[0]!r}, which is not a label of the data "
                               f"({', '.join(self.labels)})")
        if score not in SCORES:
            raise SurgeryError(f"unknown verbalizer score {score!r}; use one of {', '.join(SCORES)}")
        if combine not in COMBINES:
            raise SurgeryError(f"unknown verbalizer combine {combine!r}; use one of {', '.join(COMBINES)}")
        self.score, self.combine = score, combine
        self.words = {}
        for lab in self.labels:
            ws = words.get(lab, " " + lab)
            ws = [ws] if isinstance(ws, str) else list(ws)
            if not ws or not all(isinstance(w, str) and w.strip() for w in ws):
                raise SurgeryError(f"label {lab!r} needs non-empty words, got {ws!r}")
            self.words[lab] = ws

    def to_json(self) -> dict:
        return {"labels": self.labels, "score": self.score, "combine": self.combine,
                "words": {lab: ws[0] if len(ws) == 1 else ws for lab, ws in self.words.items()}}


@dataclass
class Batch:
    """What the model runs on, and where the answer is read.

    Sequence s (a row of input_ids) belongs to example row_of[s]; several sequences serve one example when its
    words need different inputs (a causal LM's multi-token words, a masked LM's mask counts). Score entry k reads
    token tok[k] at position pos[k] of sequence seq[k] (of the decoder for an encoder-decoder) and adds to word
    score pair[k] = example * words + word. soft marks soft-token positions (filled by a method)."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    soft: torch.Tensor
    row_of: torch.Tensor
    seq: torch.Tensor
    pos: torch.Tensor
    tok: torch.Tensor
    pair: torch.Tensor
    targets: torch.Tensor
    decoder_ids: torch.Tensor | None = None     # without the start token, right-padded
    decoder_mask: torch.Tensor | None = None

    def soft_positions(self) -> list[list[int]]:
        """Per sequence, the positions of its soft tokens, in order."""
        return [row.nonzero().flatten().tolist() for row in self.soft]


def chat_around(tokenizer, turns: list[dict] = ()) -> tuple[str, str]:
    """(chat text before, after) the user's last message, written after `turns` (earlier user / assistant turns)
    by the tokenizer's chat template up to the assistant's answer."""
    mark = "\ue000peftsurgery\ue000"    # a private-use character run no template writes
    text = tokenizer.apply_chat_template([*turns, {"role": "user", "content": mark}], tokenize=False,
                                         add_generation_prompt=True)
    if not isinstance(text, str) or text.count(mark) != 1:
        raise SurgeryError("the tokenizer's chat template does not write the user's message once; leave --chat out")
    before, after = text.split(mark)
    return before, after


class Task:
    """A template and a verbalizer over a tokenizer, for one kind of model: "causal", "masked" (BERT/RoBERTa
    style: the answer slot is mask tokens) or "seq2seq" (the answer is the decoder's output). max_length counts
    every token a sequence holds (special, soft, answer tokens included)."""

    def __init__(self, tokenizer, template: str | Template, verbalizer: Verbalizer, kind: str = "causal",
                 max_length: int = 256, padding_side: str = "left", chat: bool = False):
        if tokenizer is None:
            raise SurgeryError("a cloze classifier needs the model's tokenizer; give a model folder (or GGUF) "
                               "that holds one")
        if kind not in KINDS:
            raise SurgeryError(f"unknown model kind {kind!r}; use one of {', '.join(KINDS)}")
        if padding_side not in PADDING:
            raise SurgeryError(f"unknown padding side {padding_side!r}; use left or right")
        if not isinstance(max_length, int) or max_length < 1:
            raise SurgeryError(f"max_length must be a positive integer, got {max_length!r}")
        self.tokenizer, self.kind, self.max_length, self.padding_side = tokenizer, kind, max_length, padding_side
        self.template = template if isinstance(template, Template) else Template(template)
        self.verbalizer = verbalizer
        if kind != "masked" and not self.template.answer_last:
            raise SurgeryError(f"template {self.template.text!r}: a {kind} model writes the answer after the whole "
                               "input, so {answer} must end the template (or be left out)")
        self.mask_id = getattr(tokenizer, "mask_token_id", None)
        if kind == "masked" and (self.mask_id is None or not getattr(tokenizer, "mask_token", None)):
            raise SurgeryError("a masked LM task needs a tokenizer with a mask token; this one has none")
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = getattr(tokenizer, "eos_token_id", None) if pad is None else pad
        self.pad_id = 0 if pad is None else int(pad)
        self.prefix, self.suffix = _specials(tokenizer)
        if kind == "causal":
            self.suffix = []   # the answer follows the prompt directly
        self.chat = bool(chat)
        if self.chat:
            self._chat_parts()
        # a causal LM reads a word where the text goes on: after white space (a template ending in a newline, a chat's
        # assistant turn) without the word's leading space, as render() writes it and as the text would tokenize
        # (and a field right before the answer loses its trailing white space, so the word reads the same after
        # any example's text)
        parts = self.template.parts
        bare = kind == "causal" and len(parts) > 1 and parts[-2][0] == "lit" and parts[-2][1][-1:].isspace()
        self.trimmed = len(parts) - 2 if kind == "causal" and len(parts) > 1 and parts[-2][0] == "field" else None
        self.words, label_of = [], []   # every word of every label: token ids, and its label's index
        seen = {}
        for i, lab in enumerate(verbalizer.labels):
            for w in verbalizer.words[lab]:
                ids = tuple(tokenizer.encode(w.lstrip() if bare else w, add_special_tokens=False))
                if not ids:
                    raise SurgeryError(f"label word {w!r} of {lab!r} is no token in this tokenizer; pick another")
                if ids in seen and seen[ids] != lab:
                    raise SurgeryError(f"labels {seen[ids]!r} and {lab!r} have the same word tokens {list(ids)}")
                seen[ids] = lab
                self.words.append(ids)
                label_of.append(i)
        self.label_of = torch.tensor(label_of)
        self.single = all(len(w) == 1 for w in self.words)
        self.context = None    # example -> text written before the template, never cut (icl.py's demonstrations)

    def _chat_parts(self):
        """chat=True: the template is the user's message of the tokenizer's chat template and the answer opens the
        assistant's turn, so the parts become (chat text before the message, the template without its answer slot,
        the chat text after it up to the assistant's turn, the answer slot); the chat text holds the special tokens."""
        if self.kind != "causal":
            raise SurgeryError(f"chat templates are for causal (chat) models, not {self.kind} ones; leave --chat out")
        if not getattr(self.tokenizer, "chat_template", None):
            raise SurgeryError("this tokenizer has no chat template; leave --chat out, or use a chat model's tokenizer")
        before, after = chat_around(self.tokenizer)
        self.template = copy.copy(self.template)
        self.template.parts = [("lit", before), *self.template.parts[:-1], ("lit", after), ("answer", None)]
        self.prefix, self.suffix = [], []    # the chat text has its own special tokens

    @property
    def labels(self) -> list[str]:
        return self.verbalizer.labels

    def render(self, e, answer: str = "") -> str:
        """Example e written out as text (a chat task's chat text included), `answer` in the answer slot (a label
        word's leading space dropped after white space); soft tokens are left out."""
        text = ""
        for i, (kind, value) in enumerate(self.template.parts):
            if kind == "lit":
                text += value
            elif kind == "field":
                text += self._field(e, i, value)
            elif kind == "answer":
                text += answer.lstrip() if text[-1:].isspace() else answer
        return text

    def to_json(self) -> dict:
        return {"template": self.template.text, **self.verbalizer.to_json(), "kind": self.kind,
                "max_length": self.max_length, "padding_side": self.padding_side, "chat": self.chat}

    # ---- encoding ---------------------------------------------------------------------------------------------

    def encode(self, examples) -> Batch:
        """The padded batch for `examples` (objects with .text, .label and, for {text_b}, .text_b)."""
        seqs = []   # (tokens [(id, owner)], decoder ids, entries [(pos, tok, word)], example index)
        for r, e in enumerate(examples):
            seqs += [(*s, r) for s in self._sequences(e)]
        L = max(len(s[0]) for s in seqs)
        S = len(seqs)
        ids = torch.full((S, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((S, L), dtype=torch.long)
        soft = torch.zeros((S, L), dtype=torch.bool)
        Ld = max(len(s[1]) for s in seqs) if self.kind == "seq2seq" else 0
        dec = torch.full((S, Ld), self.pad_id, dtype=torch.long)
        dmask = torch.zeros((S, Ld), dtype=torch.long)
        seq, pos, tok, pair = [], [], [], []
        for s, (tokens, d, entries, r) in enumerate(seqs):
            off = L - len(tokens) if self.padding_side == "left" else 0
            ids[s, off:off + len(tokens)] = torch.tensor([t for t, _ in tokens], dtype=torch.long)
            mask[s, off:off + len(tokens)] = 1
            soft[s, off:off + len(tokens)] = torch.tensor([o == "soft" for _, o in tokens])
            if d:
                dec[s, :len(d)] = torch.tensor(d, dtype=torch.long)
                dmask[s, :len(d)] = 1
            for p, t, j in entries:
                seq.append(s)
                pos.append(p if self.kind == "seq2seq" else p + off)
                tok.append(t)
                pair.append(r * len(self.words) + j)
        targets = torch.tensor([self.labels.index(e.label) if e.label in self.labels else -1 for e in examples])
        long = lambda x: torch.tensor(x, dtype=torch.long)
        return Batch(ids, mask, soft, long([s[3] for s in seqs]), long(seq), long(pos), long(tok), long(pair),
                     targets, dec if self.kind == "seq2seq" else None, dmask if self.kind == "seq2seq" else None)

    def _sequences(self, e):
        """(tokens, decoder ids, entries) for one example: what each word is read from."""
        words = self.words
        if self.kind == "masked":
            lengths = sorted({len(w) for w in words})
            keep = self._keep(self._prompt(e, lengths[-1]), self.max_length)
            out = []
            for m in lengths:
                tokens = _cut(self._prompt(e, m), keep)
                slots = [i for i, (_, o) in enumerate(tokens) if o == "answer"]
                if len(slots) != m or any(tokens[i][0] != self.mask_id for i in slots):
                    raise SurgeryError(f"the tokenizer does not keep {self.tokenizer.mask_token!r} as one token "
                                       "per mask; give a tokenizer whose mask token is a special token")
                out.append((tokens, [], [(slots[k], t, j) for j, w in enumerate(words) if len(w) == m
                                         for k, t in enumerate(w)]))
            return out
        longest = max(len(w) for w in words) - 1
        if self.kind == "causal":
            tokens = self._prompt(e, 0)
            tokens = _cut(tokens, self._keep(tokens, self.max_length - longest))
            n = len(tokens) - 1
            if self.single:
                return [(tokens, [], [(n, w[0], j) for j, w in enumerate(words)])]
            return [(tokens + [(t, "answer") for t in w[:-1]], [], [(n + k, t, j) for k, t in enumerate(w)])
                    for j, w in enumerate(words)]
        tokens = self._prompt(e, 0)   # seq2seq: the encoder reads the prompt, the decoder writes the answer
        tokens = _cut(tokens, self._keep(tokens, self.max_length))
        if self.single:
            return [(tokens, [], [(0, w[0], j) for j, w in enumerate(words)])]
        return [(tokens, list(w[:-1]), [(k, t, j) for k, t in enumerate(w)]) for j, w in enumerate(words)]

    def _prompt(self, e, masks: int) -> list[tuple[int, object]]:
        """The template for example e as (token id, owner): owner is the part index of a field's tokens, "soft",
        "answer" (mask tokens), or None (template text and special tokens). Runs of text between soft tokens are
        each tokenized as one string, so the tokens are those of the whole rendered text."""
        out = [(t, None) for t in self.prefix]
        run = [] if self.context is None else [(self.context(e), None)]
        for i, (kind, value) in enumerate(self.template.parts + [("soft", 0)]):
            if kind == "lit":
                run.append((value, None))
            elif kind == "field":
                run.append((self._field(e, i, value), i))
            elif kind == "answer" and masks:
                run.append((self.tokenizer.mask_token * masks, "answer"))
            elif kind == "soft":
                out += _tokenize(self.tokenizer, run)
                out += [(self.pad_id, "soft")] * value
                run = []
        return out + [(t, None) for t in self.suffix]

    def _field(self, e, i: int, name: str) -> str:
        """Field `name` (template part i) of example e as written into the prompt."""
        text = getattr(e, name, None)
        if text is None:
            raise SurgeryError(f"the template uses {{{name}}} but an example has no {name}; give examples with a "
                               f"{name!r} field")
        return str(text).rstrip() if i == self.trimmed else str(text)

    def _keep(self, tokens, limit: int) -> dict:
        """How many tokens each field keeps so that `tokens` fit in `limit`: the longest field is cut first."""
        counts = {}
        for _, o in tokens:
            if isinstance(o, int):
                counts[o] = counts.get(o, 0) + 1
        excess = len(tokens) - limit
        fixed = len(tokens) - sum(counts.values())
        if fixed > limit:
            demos = " and demonstrations" if self.context is not None else ""
            raise SurgeryError(f"the template with its special, soft and answer tokens{demos} takes "
                               f"{fixed + self.max_length - limit} tokens, more than max_length {self.max_length}; "
                               f"shorten the template{demos and ', give fewer --shots'} or raise --max-length")
        while excess > 0:
            longest = max(counts, key=lambda o: counts[o])
            counts[longest] -= 1
            excess -= 1
        return counts

    # ---- scoring ----------------------------------------------------------------------------------------------

    def scores(self, model, batch: Batch) -> torch.Tensor:
        """(examples, labels): each label's score (see the module's docstring)."""
        found = kind_of(model)
        if found is not None and found != self.kind:
            raise SurgeryError(f"this task is for a {self.kind} model but the model is {found}; give the model "
                               f"kind (--model-kind {found})")
        dev = next(model.parameters()).device
        params = _params(model)
        kwargs = {"input_ids": batch.input_ids.to(dev), "attention_mask": batch.attention_mask.to(dev)}
        pos = batch.pos.to(dev)
        if self.kind == "seq2seq":
            start = getattr(getattr(model, "config", None), "decoder_start_token_id", None)
            if start is None:
                raise SurgeryError("the encoder-decoder model's config has no decoder_start_token_id; set it")
            S = batch.input_ids.shape[0]
            kwargs["decoder_input_ids"] = torch.cat([torch.full((S, 1), int(start)), batch.decoder_ids], 1).to(dev)
            kwargs["decoder_attention_mask"] = torch.cat([torch.ones((S, 1), dtype=torch.long),
                                                          batch.decoder_mask], 1).to(dev)
        elif "position_ids" in params:   # positions count real tokens only: a row scores the same in any batch
            kwargs["position_ids"] = (kwargs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        if self.kind == "causal" and "logits_to_keep" in params:
            keep = batch.input_ids.shape[1] - int(batch.pos.min())
            kwargs["logits_to_keep"] = keep
            pos = pos - (batch.input_ids.shape[1] - keep)
        with _soft_tokens(model, batch.soft):
            out = model(**kwargs)
        if isinstance(out, dict) and "logits" not in out:
            raise SurgeryError(f"{type(model).__name__} gives no logits; use a model with a language-model head")
        logits = out if torch.is_tensor(out) else out["logits"] if isinstance(out, dict) else out[0]
        seq, tok = batch.seq.to(dev), batch.tok.to(dev)
        if self.single:
            picked = logits[seq, pos, tok].float()
        else:
            picked = logits[seq, pos].float().log_softmax(-1).gather(-1, tok[:, None])[:, 0]
        n, W = len(batch.targets), len(self.words)
        pair = batch.pair.to(dev)
        word = torch.zeros(n * W, device=dev).index_add(0, pair, picked)
        if self.verbalizer.score == "mean":
            word = word / torch.zeros(n * W, device=dev).index_add(0, pair, torch.ones_like(picked))
        word = word.view(n, W)
        label_of = self.label_of.to(dev)
        if self.verbalizer.combine == "logsumexp":
            return torch.stack([word[:, label_of == i].logsumexp(-1) for i in range(len(self.labels))], -1)
        count = torch.zeros(len(self.labels), device=dev).index_add(0, label_of, torch.ones(W, device=dev))
        return torch.zeros(n, len(self.labels), device=dev).index_add(1, label_of, word) / count


def kind_of(model) -> str | None:
    """"seq2seq" for an encoder-decoder config, else "causal" / "masked" by whether the model can generate;
    None when the model says neither (a plain nn.Module)."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "seq2seq"
    can = getattr(model, "can_generate", None)
    return None if not callable(can) else "causal" if can() else "masked"


def soft_tokens_of(model, take: bool = False) -> torch.Tensor | None:
    """While a batch is scored: its soft-token mask (bool, input_ids' shape; all False when the template has no
    soft tokens), for the rule that fills them; None outside scoring. take=True also removes it, so that a later
    call in the same forward (an encoder-decoder's decoder embedding) sees none."""
    return model.__dict__.pop(SOFT_TOKENS, None) if take else model.__dict__.get(SOFT_TOKENS)


@contextlib.contextmanager
def _soft_tokens(model, soft: torch.Tensor):
    from .surgery import adapters
    if bool(soft.any()) and not any(getattr(r.rule, "fills_soft_tokens", False) for a in adapters(model).values()
                                    if a.switch.on for r in a.records):
        raise SurgeryError("the template has soft tokens ({soft}) but no active method fills them; apply one "
                           "that does, or take {soft} out of the template")
    object.__setattr__(model, SOFT_TOKENS, soft.to(next(model.parameters()).device))
    try:
        yield
    finally:
        model.__dict__.pop(SOFT_TOKENS, None)


def _tokenize(tokenizer, run: list[tuple[str, object]]) -> list[tuple[int, object]]:
    """Token ids of the concatenated strings of `run`, each owned by the segment holding its last character (a
    fast tokenizer's offsets); a tokenizer without offsets tokenizes each segment on its own."""
    run = [(s, o) for s, o in run if s]
    if not run:
        return []
    if not getattr(tokenizer, "is_fast", False):
        return [(t, o) for s, o in run for t in tokenizer.encode(s, add_special_tokens=False)]
    text = "".join(s for s, _ in run)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ends, at = [], 0
    for s, _ in run:
        at += len(s)
        ends.append(at)
    return [(t, run[bisect.bisect_right(ends, b - 1)][1] if b > a else None)
            for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]


def _cut(tokens, keep: dict):
    """tokens without each field's tokens past its first keep[field]."""
    seen, out = {}, []
    for t, o in tokens:
        if isinstance(o, int):
            seen[o] = seen.get(o, 0) + 1
            if seen[o] > keep[o]:
                continue
        out.append((t, o))
    return out


def _specials(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (e.g. [CLS] / [SEP], <s>)."""
    for probe in ("a", "x", "0"):
        core = list(tokenizer.encode(probe, add_special_tokens=False))
        full = list(tokenizer.encode(probe))
        for i in range(len(full) - len(core) + 1):
            if core and full[i:i + len(core)] == core:
                return full[:i], full[i + len(core):]
    raise SurgeryError("cannot tell which special tokens this tokenizer adds around a text")


def _params(model) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()
