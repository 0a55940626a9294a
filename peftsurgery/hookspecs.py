"""The hooks a method plugin implements. A plugin is a module (or object) registered under the entry-point
group "peftsurgery"; the entry point's name is the method's name. Implement each hook with
`@peftsurgery.hookimpl`. peftsurgery_config, peftsurgery_rules and peftsurgery_budget are required; a plugin
with a hook not declared here, a missing required hook or a hook whose arguments differ is reported as broken
(`peftsurgery plugins`) and refused with a one-line error when used, as is a hook returning the wrong type.
`peftsurgery.checks` has one-line checks for config values (integer, positive, fraction, flag, selector).

Training-time hooks are methods of a rule (peftsurgery.rewrite.Rule), not plugin hooks; a rule without them (or
with the attribute set to None) costs nothing. The training loop calls two framework-neutral entry points, and
peftsurgery.train and peftsurgery.integrations.SurgeryTrainer (Hugging Face) call them for you:
  rule.extra_loss(sites, built) -> tensor or None
      a term added to the training loss: loss = task_loss + peftsurgery.extra_loss(model), before backward().
  rule.after_step(sites, built, step, total) -> None
      run by peftsurgery.step(model, step, total) after each optimizer.step() and before zero_grad(), so the
      gradients are still there; `step` counts optimizer steps done (1..total) and `total` is the run's length,
      for schedules. It may change the rule's modules in place (under no_grad).
Only active adapters' rules take part; step() refuses a merged adapter, and refuses to run when some rule has an
extra loss that extra_loss(model) was not asked for since the previous step. A rule whose effective shape changes
during training (ranks masked away) saves what it has become through state() and rebuilds it in loading()."""
import pluggy

hookspec = pluggy.HookspecMarker("peftsurgery")
hookimpl = pluggy.HookimplMarker("peftsurgery")


@hookspec(firstresult=True)
def peftsurgery_config():
    """Return the method's configuration class: a dataclass whose fields have defaults and types, and whose
    __post_init__ raises peftsurgery.SurgeryError for invalid values (checked before the model is touched)."""


@hookspec(firstresult=True)
def peftsurgery_rules(config, sites):
    """Return the list of rewrite rules (instances from peftsurgery.rewrite) that realise the method with this
    config. `sites` is the model's SiteMap; rules choose their sites with selectors."""


@hookspec(firstresult=True)
def peftsurgery_budget(config, sites):
    """Return the exact number of trainable parameters the method adds, computed from the SiteMap alone
    (sites.select(selector, kinds) gives the sites a selector picks). The core builds the rules, counts what
    they created and refuses the result if the two differ."""


@hookspec(firstresult=True)
def peftsurgery_describe():
    """Return a one-line description of the method (shown by `peftsurgery plugins`)."""


@hookspec(firstresult=True)
def peftsurgery_learning_rate(config):
    """Optional: the AdamW learning rate the method trains well with under this config, used by
    `peftsurgery train` (and peftsurgery.train) when none is given. Methods without it get 1e-3."""


@hookspec(firstresult=True)
def peftsurgery_learning_rates(config):
    """Optional: the learning rates `peftsurgery train --lr auto` (peftsurgery.train.choose_lr) tries under this
    config, a non-empty list of positive numbers. Methods without it get their default rate times 1/3, 1 and 3."""
