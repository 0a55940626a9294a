"""peftsurgery: parameter-efficient fine-tuning of any PyTorch model by model surgery."""
from .errors import SurgeryError
from .locate import locate
from .sites import Site, SiteMap

__version__ = "0.1.0"
from .hookspecs import hookimpl
from .io import load, read_adapter, save
from .surgery import (adapters, apply, budget, disabled, extra_loss, inspect, merge, remove, route, set_active, sitemap,
                      step, unmerge)

__all__ = ["SurgeryError", "Site", "SiteMap", "locate", "hookimpl", "apply", "save", "load", "merge", "unmerge",
           "disabled", "inspect", "budget", "remove", "set_active", "adapters", "sitemap", "route",
           "extra_loss", "step", "read_adapter"]
