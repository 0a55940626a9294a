"""Instruction tuning (supervised fine-tuning) with any method: the loss is the next-token cross-entropy on the
response tokens only (prompt and padding masked out), averaged over those tokens. Beside the task layer; the loop
is peftsurgery.train.fit (a task with its own `loss`), `peftsurgery sft` its command.

Data, JSONL: {"instruction": ..., "response": ...} (an optional "input" follows the instruction after a blank
line), or {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}, which needs the tokenizer's
chat template and trains on every assistant turn. Plain rows are written as "{instruction}\\n\\n{input}\\n\\n" + the
response, or, with chat=True, as a user turn and an assistant turn of the chat template. Every sequence ends with
the tokenizer's end-of-sequence token (trained, so the model learns to stop). Sequences longer than max_length lose
their end (a response cut short is still trained on what is left); a prompt that leaves no response token is an
error naming the row.

Packing (packing=True, `--packing`): the rows of a batch are laid first-fit, longest first, into as few sequences
of max_length as hold them; each row attends to its own tokens only (a block-diagonal causal 4-D mask) and its
positions restart at 0, so the loss and gradients are those of the rows unpacked, with less padding computed. The
first batch is scored both ways once: a model that mixes packed rows (it ignores a 4-D mask or position ids) is
an error, not a silently different loss.
"""
from __future__ import annotations

import json
import os
import weakref

import torch

from .errors import SurgeryError
from .tasks import _params
from .train import evaluating


def read_sft(path: str) -> list[dict]:
    """The rows of an instruction JSONL file, checked."""
    if not os.path.isfile(path):
        raise SurgeryError(f"{path} is not a file; give a .jsonl of instruction/response or messages rows")
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise SurgeryError(f"{path}:{n} is not JSON; give one object per line") from None
            ok = isinstance(row, dict) and (
                (isinstance(row.get("instruction"), str) and isinstance(row.get("response"), str)) or
                (isinstance(row.get("messages"), list) and row["messages"] and all(
                    isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and
                    isinstance(m.get("content"), str) for m in row["messages"]) and
                 any(m["role"] == "assistant" for m in row["messages"])))
            if not ok:
                raise SurgeryError(f"{path}:{n} needs instruction and response strings, or messages (role, content) "
                                   "with an assistant turn")
            rows.append(row)
    if not rows:
        raise SurgeryError(f"{path} holds no rows")
    return rows


class InstructionTask:
    """Encodes instruction rows for a causal LM and gives the response-only loss (peftsurgery.train.fit calls
    loss(model, rows))."""

    def __init__(self, tokenizer, max_length: int = 512, chat: bool = False, packing: bool = False):
        if tokenizer is None:
            raise SurgeryError("instruction tuning needs the model's tokenizer; give a model folder (or GGUF) with one")
        if not isinstance(max_length, int) or max_length < 2:
            raise SurgeryError(f"max_length must be an integer of at least 2, got {max_length!r}")
        if chat and not getattr(tokenizer, "chat_template", None):
            raise SurgeryError("this tokenizer has no chat template; leave --chat out")
        self.tokenizer, self.max_length, self.chat, self.packing = tokenizer, max_length, chat, packing
        self.checked = None    # packing: (the model, its adapters) whose first batch scored packed as unpacked
        self.eos = getattr(tokenizer, "eos_token_id", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad = int(pad if pad is not None else self.eos if self.eos is not None else 0)

    def prompt(self, row: dict) -> str:
        """The text before the response of a plain row."""
        text = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        if self.chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return text + "\n\n"

    def _pieces(self, row: dict) -> list[tuple[str, bool]]:
        """(text, trained) pieces of a row, in order."""
        if "messages" not in row:
            return [(self.prompt(row), False), (row["response"], True)]
        if not getattr(self.tokenizer, "chat_template", None):
            raise SurgeryError("rows with messages need a tokenizer with a chat template")
        pieces, done = [], ""
        for i, m in enumerate(row["messages"]):   # each turn's text: the template up to it minus the text before
            upto = self.tokenizer.apply_chat_template(row["messages"][:i + 1], tokenize=False)
            if not upto.startswith(done):
                raise SurgeryError("the tokenizer's chat template rewrites earlier turns; give instruction/response "
                                   "rows instead")
            if m["role"] == "assistant" and i:   # its header (the generation prompt) is not trained, its text is
                head = self.tokenizer.apply_chat_template(row["messages"][:i], tokenize=False,
                                                          add_generation_prompt=True)
                if head.startswith(done) and upto.startswith(head):
                    pieces.append((head[len(done):], False))
                    done = head
            pieces.append((upto[len(done):], m["role"] == "assistant"))
            done = upto
        return pieces

    def tokens(self, row: dict) -> tuple[list[int], list[int]]:
        """(input ids, labels: -100 where not trained), cut to max_length."""
        ids, labels = [], []
        specials = not self.chat and "messages" not in row    # chat text holds its own special tokens
        for k, (text, trained) in enumerate(self._pieces(row)):
            piece = self.tokenizer.encode(text, add_special_tokens=specials and k == 0)
            ids += piece
            labels += piece if trained else [-100] * len(piece)
        if self.eos is not None and (not ids or ids[-1] != self.eos):
            ids.append(self.eos)
            labels.append(self.eos)
        ids, labels = ids[:self.max_length], labels[:self.max_length]
        if all(x == -100 for x in labels[1:]):
            raise SurgeryError(f"a row's prompt fills max_length {self.max_length} and leaves no response token "
                               f"({str(row)[:60]}...); raise --max-length or shorten it")
        return ids, labels

    def encode(self, rows: list[dict], packing: bool | None = None) -> dict:
        """Right-padded input_ids, attention_mask and labels; packed (see the module's docstring): input_ids,
        labels, position_ids and a boolean (sequences, length, length) mask of what each token attends to."""
        seqs = [self.tokens(r) for r in rows]
        if self.packing if packing is None else packing:
            return self._packed(seqs)
        L = max(len(i) for i, _ in seqs)
        ids = torch.full((len(seqs), L), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        labels = torch.full((len(seqs), L), -100, dtype=torch.long)
        for s, (i, lab) in enumerate(seqs):
            ids[s, :len(i)], mask[s, :len(i)], labels[s, :len(i)] = torch.tensor(i), 1, torch.tensor(lab)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def _packed(self, seqs: list[tuple[list[int], list[int]]]) -> dict:
        room, bins = [], []   # first fit, longest first
        for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0])):
            n = len(seqs[i][0])
            j = next((j for j, r in enumerate(room) if r >= n), None)
            if j is None:
                room.append(self.max_length)
                bins.append([])
                j = len(bins) - 1
            room[j] -= n
            bins[j].append(i)
        S, L = len(bins), self.max_length - min(room)
        ids = torch.full((S, L), self.pad, dtype=torch.long)
        labels = torch.full((S, L), -100, dtype=torch.long)
        pos = torch.zeros((S, L), dtype=torch.long)
        seg = torch.full((S, L), -1, dtype=torch.long)
        for s, b in enumerate(bins):
            at = 0
            for k, i in enumerate(b):
                tok, lab = seqs[i]
                n = len(tok)
                ids[s, at:at + n], labels[s, at:at + n] = torch.tensor(tok), torch.tensor(lab)
                labels[s, at] = -100    # a row's first token is no target (unpacked, nothing precedes it)
                pos[s, at:at + n], seg[s, at:at + n] = torch.arange(n), k
                at += n
        allowed = (seg[:, :, None] == seg[:, None, :]) & torch.ones(L, L, dtype=torch.bool).tril()
        allowed |= torch.eye(L, dtype=torch.bool)    # padding attends to itself: no empty softmax row
        return {"input_ids": ids, "labels": labels, "position_ids": pos, "attends": allowed}

    def loss(self, model, rows: list[dict]) -> torch.Tensor:
        """Mean next-token cross-entropy over the response tokens of `rows`."""
        total, count = self.summed_loss(model, rows)
        return total / count

    def summed_loss(self, model, rows: list[dict]) -> tuple[torch.Tensor, int]:
        """(summed next-token cross-entropy over the response tokens of `rows`, their number)."""
        if self.packing and self.checked != _packing_key(model):
            self._check_packing(model, rows)
        return self._summed_loss(model, self.encode(rows))

    def _summed_loss(self, model, batch: dict) -> tuple[torch.Tensor, int]:
        dev = next(model.parameters()).device
        if "attends" in batch:
            dtype = _dtype(model)
            mask = torch.zeros(batch["attends"].shape, dtype=dtype).masked_fill(~batch["attends"],
                                                                                   torch.finfo(dtype).min)
            out = model(input_ids=batch["input_ids"].to(dev), attention_mask=mask[:, None].to(dev),
                        position_ids=batch["position_ids"].to(dev))
        else:
            out = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev))
        logits = (out["logits"] if isinstance(out, dict) else out.logits if hasattr(out, "logits") else out[0])
        target = batch["labels"][:, 1:].to(dev)
        total = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                  target.reshape(-1), ignore_index=-100, reduction="sum")
        return total, int((target != -100).sum())

    def _check_packing(self, model, rows: list[dict]) -> None:
        if "position_ids" not in _params(model):
            raise SurgeryError(f"{type(model).__name__}.forward takes no position_ids, so packed rows cannot restart "
                               "their positions; leave --packing out")
        with evaluating(model):
            try:
                packed, n = self._summed_loss(model, self.encode(rows, packing=True))
            except RuntimeError as e:   # e.g. an adapter that adds tokens to each sequence (prompt tuning)
                raise SurgeryError(f"this model with its adapters cannot run packed rows ({str(e).splitlines()[0]}"
                                   "); leave --packing out") from None
            plain, m = self._summed_loss(model, self.encode(rows, packing=False))
        tol = 1e-3 if _dtype(model) == torch.float32 else 2e-2
        if n != m or not abs(float(packed) - float(plain)) <= tol * max(1.0, abs(float(plain))):
            raise SurgeryError(f"{type(model).__name__} mixes packed rows (summed loss {float(packed):.4f} packed, "
                               f"{float(plain):.4f} apart): it or an adapter on it ignores a 4-D attention mask; "
                               "leave --packing out")
        self.checked = _packing_key(model)


def _packing_key(model) -> tuple:
    """What a packing check holds for: this model object (a weak reference, so a new model at a freed address is
    checked again) with these adapters attached (an adapter added later may ignore the 4-D mask)."""
    from .surgery import adapters
    return weakref.ref(model), tuple(adapters(model))


def _dtype(model) -> torch.dtype:
    """The dtype the model computes in (its input embedding's), float32 where it has none."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    return w.dtype if w is not None and w.is_floating_point() else torch.float32


def held_out_loss(model, task: InstructionTask, rows: list[dict], batch_size: int = 8) -> float:
    """Mean response-token loss over `rows` (weighted by their response tokens)."""
    total, count = 0.0, 0
    with evaluating(model):
        for i in range(0, len(rows), batch_size):
            s, n = task.summed_loss(model, rows[i:i + batch_size])
            total, count = total + float(s), count + n
    return total / count


def respond(model, task: InstructionTask, rows: list[dict], max_new_tokens: int = 64) -> list[str]:
    """Greedy responses to plain rows' prompts (their responses unused)."""
    tok, dev = task.tokenizer, next(model.parameters()).device
    out = []
    with evaluating(model):
        for row in rows:
            ids = torch.tensor([tok.encode(task.prompt(row), add_special_tokens=not task.chat)], device=dev)
            new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=task.pad)[0, ids.shape[1]:]
            out.append(tok.decode(new, skip_special_tokens=True))
    return out
