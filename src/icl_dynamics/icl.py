"""ICL level 1, loss reduction: the per-token loss curve and Olsson et al.'s ICL score.

Natural text of the model's training distribution is tokenised once per tokenizer (a fixed,
seeded, recorded selection of documents with at least ``context`` tokens, cut to ``context``) and
reused at every checkpoint. The ICL score is the loss at token ``late`` minus the loss at token
``early`` (500 and 50 in Olsson et al. 2022), averaged over documents; more negative means the model
uses its context more. Intervals are percentile bootstraps over documents.

All three ICL levels write the long table :data:`icl_dynamics.schemas.ICL_SCHEMA`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from icl_dynamics.models import check_context


@dataclass(frozen=True)
class TextSource:
    """Where the natural text comes from: a hub dataset, a local ``datasets`` directory, JSONL or text."""

    kind: str  # "hub" | "disk" | "jsonl" | "text"
    name: str | None = None  # hub dataset id
    path: str | None = None  # local file or directory
    split: str = "train"
    column: str = "text"

    def label(self) -> str:
        """A short name for the ``task`` column."""
        return self.name if self.kind == "hub" else Path(self.path or "").name


def iter_texts(source: TextSource) -> Iterator[str]:
    """Yield the documents of ``source`` in their stored order."""
    if source.kind in ("hub", "disk"):
        import datasets

        ds = (datasets.load_dataset(source.name, split=source.split) if source.kind == "hub"
              else datasets.load_from_disk(source.path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[source.split]
        if source.column not in ds.column_names:
            raise KeyError(f"text column {source.column!r} not in dataset columns {ds.column_names}")
        yield from ds[source.column]
    elif source.kind == "jsonl":
        with open(_existing(source.path)) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)[source.column]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ValueError(f"{source.path}:{lineno}: expected a JSON object with {source.column!r}: {exc}") from exc
    elif source.kind == "text":
        # Documents separated by blank lines.
        text = Path(_existing(source.path)).read_text()
        yield from (doc.strip() for doc in text.split("\n\n") if doc.strip())
    else:
        raise ValueError(f"unknown text source kind {source.kind!r}; choose hub, disk, jsonl or text")


def _existing(path: str | None) -> str:
    if not path or not Path(path).exists():
        raise FileNotFoundError(f"text source {path!r} does not exist")
    return path


def select_documents(
    texts: Sequence[str] | Iterator[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    context: int,
    n_docs: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Tokenise, keep documents of at least ``context`` tokens, draw ``n_docs`` of them with ``seed``.

    Returns rows ``{doc_index, token_ids}`` (cut to ``context``) in source order, so the selection
    is fixed by (source, tokenizer, context, n_docs, seed) alone.
    """
    eligible = []
    for index, text in enumerate(tqdm(texts, desc="tokenising", mininterval=5)):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= context:
            eligible.append((index, ids[:context]))
    if len(eligible) < n_docs:
        raise ValueError(f"only {len(eligible)} documents have at least {context} tokens; asked for {n_docs}")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(eligible), size=n_docs, replace=False).tolist())
    return [{"doc_index": eligible[i][0], "token_ids": eligible[i][1]} for i in chosen]


@torch.no_grad()
def per_token_losses(model: PreTrainedModel, docs: torch.Tensor, *, batch_size: int = 8,
                     progress: bool = False) -> np.ndarray:
    """[n_docs, context] next-token losses; column 0 (nothing to predict from) is NaN."""
    device = next(model.parameters()).device
    n, context = docs.shape
    check_context(model, context, "the text documents (text.context)")
    out = np.full((n, context), np.nan)
    for start in tqdm(range(0, n, batch_size), desc="loss", disable=not progress, mininterval=5):
        batch = docs[start:start + batch_size].to(device)
        logits = model(batch).logits[:, :-1].float()
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        out[start:start + batch_size, 1:] = losses.double().cpu().numpy()
    return out


def bootstrap_mean(values: np.ndarray, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                   expanded: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over axis 0 and its percentile bootstrap interval (resampling rows).

    ``expanded``: Hesterberg's expanded percentile interval (2015), the percentiles at
    Phi(-sqrt(n / (n - 1)) t_{n-1}) instead of (1 - level) / 2, which undoes the plain interval's
    narrowness with few rows (the bootstrap's variance is (n - 1) / n of the sample's, and it has
    normal rather than t tails): a mean of 32 rows covers ~0.95 instead of ~0.91.
    """
    values = np.asarray(values, dtype=float)
    n = values.shape[0]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    boots = values[idx].mean(axis=1)
    alpha = (1 - level) / 2
    if expanded and n > 1:
        alpha = float(stats.norm.cdf(-np.sqrt(n / (n - 1)) * stats.t.ppf(1 - alpha, n - 1)))
    return values.mean(axis=0), np.quantile(boots, alpha, axis=0), np.quantile(boots, 1 - alpha, axis=0)


def loss_reduction(losses: np.ndarray, *, early: int, late: int, n_boot: int = 1000,
                   seed: int = 0) -> tuple[list[dict], dict]:
    """Loss-curve rows (position, loss, CI) and the ICL-score row fields from per-token losses."""
    n_docs, context = losses.shape
    if not 1 <= early < late < context:
        raise ValueError(f"ICL score needs 1 <= early < late < context; got early={early}, late={late}, context={context}")
    mean, low, high = bootstrap_mean(losses[:, 1:], n_boot=n_boot, seed=seed)
    curve = [{"position": p + 1, "loss": float(m), "ci_low": float(lo), "ci_high": float(hi), "n_docs": n_docs}
             for p, (m, lo, hi) in enumerate(zip(mean, low, high))]
    score, s_low, s_high = bootstrap_mean(losses[:, late] - losses[:, early], n_boot=n_boot, seed=seed)
    icl = {"level": "loss_reduction", "metric": "icl_score", "shots": None, "chance": None,
           "value": float(score), "ci_low": float(s_low), "ci_high": float(s_high), "n": n_docs}
    return curve, icl
