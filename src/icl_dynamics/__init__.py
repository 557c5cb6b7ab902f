"""icl-dynamics: how in-context learning and (semantic) induction heads arise during training.

The Python API (README, "Python API"): :func:`load_results` reads any table of a results folder,
:func:`fetch` puts a checkpoint into the hub cache and verifies it, :func:`load_checkpoint` loads it
(checked against the fetch's row with ``fetched=``), :func:`score` runs a stage on it. They are imported on
first use, so ``import icl_dynamics`` (and the CLI's light commands) never load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "fetch", "load_checkpoint", "load_results", "score"]
# the public functions, by the module that defines them
_API = {"load_results": "icl_dynamics.results", "fetch": "icl_dynamics.hub",
        "load_checkpoint": "icl_dynamics.models", "score": "icl_dynamics.stages"}

if TYPE_CHECKING:
    from icl_dynamics.hub import fetch
    from icl_dynamics.models import load_checkpoint
    from icl_dynamics.results import load_results
    from icl_dynamics.stages import score


def __getattr__(name: str) -> Any:
    """The public API's functions, each imported from its module when first asked for."""
    if name not in _API:
        raise AttributeError(f"module 'icl_dynamics' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
