"""Multitask prompt tuning (Wang et al., 2023): one shared prompt P* (num_tokens x hidden) and, per task k, factors
u_k (num_tokens x r) and v_k (r x hidden); task k's prompt is P* * (u_k @ v_k) (elementwise), prepended at the
input embedding like prompt tuning.

Source training: `tasks=polarity,spam,subj` (names, or a count: tasks=3 names them 0, 1, 2) on one adapter; a
mixed-task batch routes each row to its task with this module's route(), "ADAPTER:TASK" per row, which mixes with
every other routed adapter (peftsurgery.route). A row's loss reaches P* and its own task's u and v only (tasks not
in the batch get no gradient, not even zeros). Outside route() every row uses the adapter's current task, the
first unless set_task() chose another. Saved: P* as `weight`, each task's factors as `u.TASK` and `v.TASK`.

Target adaptation: `init=pretrained:DIR` starts P* from the shared prompt of the multitask adapter saved in DIR
and, with `factors=average` (the paper's choice, the default), every new task's u and v from the mean of the
source tasks' u and v; `factors=fresh` starts them at u v^T = 1 (the task prompt is P* itself), `factors=TASK`
from that source task's. P* and the factors all train, as in the paper.

Distillation from single-task teacher prompts into the source training (the paper's option): distillation_loss()
is KL(teacher || student) on the same rows' scores; the teachers are prompt-tuning adapters on the same model,
routed per row beside the student's "ADAPTER:TASK" rows (examples/multitask_prompt.py --distill); the paper's
second term, hidden_state_loss(), is the mean squared error between the same rows' hidden states (the prompt's
positions are already out of a model's outputs, so both line up with the user's tokens).
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import peftsurgery as ps
from peftsurgery import SurgeryError, hookimpl
from peftsurgery.checks import integer
from peftsurgery.rewrite import Prompt, check_text_init
from peftsurgery.rewrite.inputs import routed_entry

from .prompt_tuning import INITS, initial

__version__ = "1.0"
METHOD = "multitask-prompt-tuning"
PRETRAINED = "pretrained:"
NAME = re.compile(r"[A-Za-z0-9_-]+")


def task_names(tasks) -> list[str]:
    """tasks=3 (or "3") -> ["0", "1", "2"]; "polarity,spam" -> those names."""
    text = str(tasks).replace(" ", "")
    if text.isdigit():
        return [str(i) for i in range(int(text))]
    return text.split(",")


@dataclass
class MultitaskPromptTuningConfig:
    num_tokens: int = 20
    tasks: str = "1"        # task names, comma-separated, or how many (named 0, 1, ...)
    r: int = 1              # rank of each task's factors u v^T
    init: str = "vocab"     # P*: random | vocab | text (as prompt-tuning) | pretrained:DIR (a saved multitask adapter)
    text: str = ""          # token ids, comma-separated, for init=text
    factors: str = "average"   # with init=pretrained: average | fresh | a source task's name
    seed: int = 0

    def __post_init__(self):
        integer(METHOD, "num_tokens", self.num_tokens)
        integer(METHOD, "r", self.r)
        integer(METHOD, "seed", self.seed, least=None)
        names = task_names(self.tasks)
        if not names or not all(NAME.fullmatch(n) for n in names) or len(set(names)) != len(names):
            raise SurgeryError(f"{METHOD}: tasks must be a count or distinct names of letters, digits, _ and - "
                               f"separated by commas, got {self.tasks!r}")
        if str(self.init).startswith(PRETRAINED):
            if not self.init[len(PRETRAINED):]:
                raise SurgeryError(f"{METHOD}: init=pretrained:DIR needs the folder of a saved {METHOD} adapter")
        else:
            if self.init not in INITS:
                raise SurgeryError(f"{METHOD}: init must be one of {', '.join(INITS)} or {PRETRAINED}DIR, got "
                                   f"{self.init!r}")
            check_text_init(METHOD, self.init, self.text)
            if self.factors != "average":
                raise SurgeryError(f"{METHOD}: factors={self.factors!r} needs init={PRETRAINED}DIR (fresh factors "
                                   "start every task prompt at P* anyway)")
        if not NAME.fullmatch(str(self.factors)):
            raise SurgeryError(f"{METHOD}: factors must be average, fresh or a source task's name, got "
                               f"{self.factors!r}")


class TaskPrompts(nn.Module):
    """P* (`weight`, num_tokens x dim) and each task's factors u[task] (num_tokens x r), v[task] (r x dim)."""

    def __init__(self, weight: torch.Tensor, u: dict, v: dict):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.u = nn.ParameterDict({k: nn.Parameter(t) for k, t in u.items()})
        self.v = nn.ParameterDict({k: nn.Parameter(t) for k, t in v.items()})
        self.task = next(iter(u))   # the task of rows outside route() (set_task)
        self.rows = None            # inside this module's route(): each batch row's task (None: self.task)

    def prompt(self, task: str) -> torch.Tensor:
        return self.weight * (self.u[task] @ self.v[task])

    def forward(self, batch: int) -> torch.Tensor:
        return self.prompt(self.task).unsqueeze(0).expand(batch, -1, -1)

    def index(self, task: str) -> str:
        if task not in self.u:
            raise SurgeryError(f"no task {task!r} in this multitask prompt; its tasks: {', '.join(self.u)}")
        return task


class _RowTaskPrompts:
    """Under route(): (B, P, dim), row i the prompt of its (module, task) right-aligned, zeros before a shorter
    one and for rows on no multitask prompt. Only the tasks of this batch are computed (and trained)."""

    def __init__(self, pairs: list, index: torch.Tensor, P: int):
        self.pairs, self.index, self.P = pairs, index, P

    def __call__(self, batch: int) -> torch.Tensor:
        vs = [m.prompt(t) for m, t in self.pairs]
        table = [torch.cat([v.new_zeros(self.P - v.shape[0], v.shape[1]), v]) for v in vs]
        return torch.stack(table + [vs[0].new_zeros(self.P, vs[0].shape[1])])[self.index]


class MultitaskPrompt(Prompt):
    """The shared prompt and per-task factors at the input embedding. `source`: a saved adapter folder to start
    from (read in check(), dropped after build())."""

    def __init__(self, num_tokens: int, tasks: list[str], r: int, init, source: str | None = None,
                 factors: str = "average", seed: int = 0, targets: str = "embed"):
        super().__init__(num_tokens, init, None, targets)
        self.tasks, self.r, self.source, self.factors, self.seed = tasks, r, source, factors, seed
        self.start = None

    def check(self, model, sites):
        if self.source:
            self.start = read_source(self.source, self.num_tokens, self.r, self.factors)
            dim = model.get_submodule(sites[0].path).weight.shape[1]
            if self.start[0].shape[1] != dim:
                raise SurgeryError(f"{self.source} holds a prompt of width {self.start[0].shape[1]}, this model's "
                                   f"embeddings have {dim}; start from a prompt trained on this model")

    def build(self, model, sites, sitemap):
        emb = model.get_submodule(sites[0].path)
        w = emb.weight
        if self.start is not None:
            weight, u0, v0 = self.start
        else:
            with torch.no_grad():
                weight = self.init(emb, self.num_tokens) if self.init else torch.zeros(self.num_tokens, w.shape[1])
            g = torch.Generator().manual_seed(self.seed)
            # u v^T = 1 (the task prompt is P*); with r > 1 the rank components must start apart to differ
            u0 = torch.ones(self.num_tokens, self.r)
            noise = torch.randn(self.r, w.shape[1], generator=g) if self.r > 1 else torch.zeros(1, w.shape[1])
            v0 = (1 + 0.02 * noise) / self.r
        self.init = self.start = None   # used once; the rule stays on the model and must pickle
        put = dict(device=w.device, dtype=w.dtype)
        return {sites[0].path: TaskPrompts(weight.detach().to(**put).clone(),
                                           {t: u0.to(**put).clone() for t in self.tasks},
                                           {t: v0.to(**put).clone() for t in self.tasks})}

    def route(self, model, entries, rows, cache):
        """Row i gets its (adapter, task) prompt; rows of other adapters or the base none."""
        mods = {}
        for slot, sites, built in entries:
            mods[slot] = built[sites[0].path]
        slots = rows.tolist()
        for m in mods.values():
            if m.rows is not None and len(m.rows) != len(slots):
                raise SurgeryError(f"route was given {len(m.rows)} names but {len(slots)} rows; give one per row")
        keys = [(s, mods[s].rows[i] if mods[s].rows is not None and mods[s].rows[i] else mods[s].task)
                if s in mods else None for i, s in enumerate(slots)]
        present = sorted({k for k in keys if k is not None})
        if not present:
            return []
        lens = [mods[k[0]].weight.shape[0] if k else 0 for k in keys]
        index = torch.tensor([present.index(k) if k else len(present) for k in keys], device=rows.device)
        entry = routed_entry(model, rows, cache)
        entry.add_prompts(model, entries[0][1][0].path,
                          _RowTaskPrompts([(mods[s], t) for s, t in present], index, max(lens)), lens)
        return entry.hooks(model)

    def loading(self, settings):
        return MultitaskPrompt(self.num_tokens, self.tasks, self.r, None, None, self.factors, self.seed,
                               self.targets)

    def describe(self, site, built):
        return (f"{self.num_tokens} virtual tokens prepended to the embeddings: a shared prompt times each of "
                f"{len(self.tasks)} tasks' rank-{self.r} factors")


def read_source(directory: str, num_tokens: int, r: int, factors: str):
    """(P*, u, v) to start from, out of a saved multitask adapter: factors averaged over its tasks, fresh, or one
    task's."""
    _, tensors = ps.read_adapter(directory, METHOD)
    parts = {}
    for k, t in tensors.items():
        rest = k.split(".", 2)[2]   # "0.<site>.weight" / "0.<site>.u.TASK"
        parts[rest] = t.float()
    weight = parts["weight"]
    if weight.shape[0] != num_tokens:
        raise SurgeryError(f"{directory} holds {weight.shape[0]} virtual tokens; set num_tokens={weight.shape[0]}")
    us = {k[2:]: t for k, t in parts.items() if k.startswith("u.")}
    vs = {k[2:]: t for k, t in parts.items() if k.startswith("v.")}
    if factors == "fresh":
        return weight, torch.ones(num_tokens, r), torch.ones(r, weight.shape[1]) / r
    source_r = next(iter(us.values())).shape[1]
    if source_r != r:
        raise SurgeryError(f"{directory} holds rank-{source_r} factors; set r={source_r} or factors=fresh")
    if factors == "average":
        return weight, torch.stack(list(us.values())).mean(0), torch.stack(list(vs.values())).mean(0)
    if factors not in us:
        raise SurgeryError(f"{directory} has no task {factors!r} (its tasks: {', '.join(us)}); set factors to one "
                           "of them, average or fresh")
    return weight, us[factors], vs[factors]


def _module(model, name: str) -> TaskPrompts:
    att = ps.adapters(model).get(name)
    if att is None or att.method != METHOD:
        raise SurgeryError(f"{name!r} is not a {METHOD} adapter on this model; give ADAPTER:TASK for those only")
    return next(m for rec in att.records for m in rec.built.values() if isinstance(m, TaskPrompts))


def set_task(model, name: str, task: str) -> None:
    """Rows outside route() use task `task` of multitask adapter `name`."""
    m = _module(model, name)
    m.task = m.index(str(task))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) between two score sets for the same rows (class scores or vocabulary logits, over
    the last dimension), both divided by `temperature`, times its square (the gradient's scale then does not
    shrink with it), averaged over rows. The teacher gets no gradient."""
    if student.shape != teacher.shape:
        raise SurgeryError(f"student scores {tuple(student.shape)} and teacher scores {tuple(teacher.shape)} differ; "
                           "score the same rows with the same labels")
    if not temperature > 0:
        raise SurgeryError(f"the temperature must be above 0, got {temperature!r}")
    t = (teacher.detach().float() / temperature).log_softmax(-1)
    s = (student.float() / temperature).log_softmax(-1)
    return F.kl_div(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), log_target=True,
                    reduction="batchmean") * temperature ** 2


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between two hidden-state tensors for the same rows, (batch, positions, width), averaged
    over the positions where `mask` (batch, positions; e.g. the attention mask) is nonzero and over the width. The
    teacher gets no gradient."""
    if student.shape != teacher.shape:
        raise SurgeryError(f"student hidden states {tuple(student.shape)} and teacher hidden states "
                           f"{tuple(teacher.shape)} differ; take both from the same rows and layer")
    err = (student.float() - teacher.detach().float()).pow(2).mean(-1)
    if mask is None:
        return err.mean()
    if mask.shape != err.shape:
        raise SurgeryError(f"mask {tuple(mask.shape)} does not match the hidden states' (batch, positions) "
                           f"{tuple(err.shape)}; pass the attention mask of the same batch")
    keep = mask.to(err.dtype)
    if not keep.sum() > 0:
        raise SurgeryError("the mask keeps no position; pass the attention mask of the same batch")
    return (err * keep).sum() / keep.sum()


@contextlib.contextmanager
def route(model, names):
    """peftsurgery.route() where rows on a multitask adapter name their task, "ADAPTER:TASK" (a bare "ADAPTER":
    its current task); other names as peftsurgery.route takes them."""
    names = [names] if isinstance(names, str) else list(names)
    plain, tasks = [], {}
    for i, n in enumerate(names):
        a, sep, t = n.partition(":") if isinstance(n, str) else (n, "", "")
        plain.append(a)
        if sep:
            tasks.setdefault(a, {})[i] = t
    mods = {a: _module(model, a) for a in tasks}
    for a, m in mods.items():
        m.rows = [m.index(tasks[a][i]) if i in tasks[a] else None for i in range(len(names))]
    try:
        with ps.route(model, plain):
            yield model
    finally:
        for m in mods.values():
            m.rows = None


@hookimpl
def peftsurgery_config():
    return MultitaskPromptTuningConfig


@hookimpl
def peftsurgery_describe():
    return "Multitask prompt tuning: a shared prompt times per-task rank-r factors, prepended at the input embedding"


@hookimpl
def peftsurgery_rules(config, sites):
    pretrained = str(config.init).startswith(PRETRAINED)
    return [MultitaskPrompt(config.num_tokens, task_names(config.tasks), config.r,
                            None if pretrained else initial(config),
                            config.init[len(PRETRAINED):] if pretrained else None, config.factors, config.seed)]


@hookimpl
def peftsurgery_budget(config, sites):
    dim = sites.select("embed", Prompt.kinds)[0].out_features
    return config.num_tokens * dim + len(task_names(config.tasks)) * config.r * (config.num_tokens + dim)


@hookimpl
def peftsurgery_learning_rate(config):
    return 1e-3   # prompt-tuning's default (not tuned for this method)
