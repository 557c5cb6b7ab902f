"""icl-dynamics: how in-context learning and (semantic) induction heads arise during training."""

__version__ = "0.1.0"
