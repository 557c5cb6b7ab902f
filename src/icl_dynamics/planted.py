"""Planted relations: the training data of the relations toy zoo, a positive control for the relation index.

A planted relation is a fixed random map from "head" words to "tail" words: one-to-one (each head its
own tail, like country -> capital) or many-to-one (several heads share a tail, like country ->
continent). A training sequence holds random filler tokens after a BOS and, for a few relations, two
*events* each: the tails of both events are mentioned early (positions 1 .. ``mention_end`` - 1), and
later each head appears in a block ``head marker tail``. At the marker only the head one position
back tells which of the mentioned tails comes next, so a head that attends from the marker to the
head token and whose OV circuit raises the tail is exactly what lowers the loss there -- what the
relation index measures. Both events of a relation have different tails, so the other tail is the
matched control of the relation index.

A *decoy* relation is a random map of a planted relation's shape whose words fill the same slots,
but the data carry nothing that links a decoy head to its tail: a sequence holding the decoy
mentions *every* decoy tail (so each decoy head co-occurs with its tail, and the mentions say nothing
about which heads follow) and the token after the decoy's marker is random filler. A head flagged
for the decoy is a false positive. (Mentioning only the decoy heads' own tails, as for planted
relations, would make a tail predict its head later on: a real, learnable association.) Planted
relations form the relation family ``planted``, decoys the family ``decoy``.

Planted relations are also learnable backwards: a mentioned tail makes its heads likelier later in
the sequence, so reverse-direction SIHs are expected for them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from icl_dynamics import io

if TYPE_CHECKING:
    import torch

PLANTED, DECOY = "planted", "decoy"
ONE_TO_ONE, MANY_TO_ONE = "one-to-one", "many-to-one"
BLOCK = 3  # head, marker, tail


@dataclass(frozen=True)
class RelationSpec:
    """A named relation's shape: how many head and tail words, and whether the data reward it."""

    name: str
    heads: int
    tails: int
    rewarded: bool

    @property
    def shape(self) -> str:
        return ONE_TO_ONE if self.heads == self.tails else MANY_TO_ONE


# a planted relation of each shape and a decoy of the many-to-one shape (a decoy mentions all its
# tails, so it needs few of them)
DEFAULT_SPECS = (
    RelationSpec("capital", 16, 16, True),
    RelationSpec("continent", 16, 4, True),
    RelationSpec("decoy", 16, 4, False),
)


@dataclass(frozen=True)
class PlantedRelation:
    """One relation's words and its map (``mapping[i]`` is the tail index of head ``i``)."""

    name: str
    family: str  # PLANTED (rewarded) or DECOY
    shape: str
    marker: str
    heads: tuple[str, ...]
    tails: tuple[str, ...]
    mapping: tuple[int, ...]

    def pairs(self) -> list[tuple[str, str]]:
        """(head word, tail word) of every head."""
        return [(h, self.tails[t]) for h, t in zip(self.heads, self.mapping)]


def make_relations(seed: int, specs: Sequence[RelationSpec] = DEFAULT_SPECS) -> list[PlantedRelation]:
    """The relations' words (``<name>_h00``, ``<name>_t00``, marker ``<name>_of``) and a random map
    drawn with ``seed``: a permutation (one-to-one) or equal-sized groups of heads per tail."""
    import torch  # here, not at the top: the zoo's definitions import this module and stay light

    gen = torch.Generator().manual_seed(seed)
    out = []
    for spec in specs:
        if not spec.name.replace("_", "").isalnum():
            raise ValueError(f"relation name {spec.name!r}: letters, digits and underscores only (one word token)")
        if spec.heads < spec.tails or spec.heads % spec.tails:
            raise ValueError(f"relation {spec.name!r}: {spec.heads} heads cannot map onto {spec.tails} tails "
                             "in equal groups")
        order = torch.randperm(spec.heads, generator=gen).tolist()
        mapping = [0] * spec.heads
        for rank, head in enumerate(order):
            mapping[head] = rank % spec.tails
        out.append(PlantedRelation(
            name=spec.name, family=PLANTED if spec.rewarded else DECOY, shape=spec.shape, marker=f"{spec.name}_of",
            heads=tuple(f"{spec.name}_h{i:02d}" for i in range(spec.heads)),
            tails=tuple(f"{spec.name}_t{i:02d}" for i in range(spec.tails)), mapping=tuple(mapping)))
    return out


def untrained_relations(words: dict[str, Sequence[str]], seed: int,
                    shapes: Sequence[tuple[str, str, str, str]] = (("animal_fruit", "animal", "fruit", "-"),
                                                                     ("profession_month", "profession", "month", ";")),
                    heads: int = 16, tails: int = 4) -> list[PlantedRelation]:
    """Relations over words a vocabulary already has (``words``: category -> words), for texts of a model
    that was never trained on them: for each ``(name, head category, tail category, marker)`` a random
    many-to-one map of ``heads`` words onto ``tails`` words, drawn with ``seed``, family ``planted`` (a
    sequence shows ``head marker tail``, so the relation index and the ablation's recall have events).
    The copy toy zoo never saw them, so the relation index should flag none: the demo's null control
    (the relations zoo's planted relations, which it was trained on, are the positive one)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for name, head_category, tail_category, marker in shapes:
        head_words = [words[head_category][i] for i in torch.randperm(len(words[head_category]), generator=gen)[:heads]]
        tail_words = [words[tail_category][i] for i in torch.randperm(len(words[tail_category]), generator=gen)[:tails]]
        if len(head_words) < heads or len(tail_words) < tails:
            raise ValueError(f"relation {name!r}: needs {heads} {head_category} and {tails} {tail_category} words")
        order = torch.randperm(heads, generator=gen).tolist()
        mapping = [0] * heads
        for rank, head in enumerate(order):
            mapping[head] = rank % tails
        out.append(PlantedRelation(name=name, family=PLANTED, shape=MANY_TO_ONE, marker=marker, heads=tuple(head_words),
                                   tails=tuple(tail_words), mapping=tuple(mapping)))
    return out


def relation_words(relations: Sequence[PlantedRelation]) -> list[str]:
    """Every head, tail and marker word, in a fixed order (they extend the toy vocabulary)."""
    return [w for r in relations for w in (*r.heads, *r.tails, r.marker)]


def relation_batch(gen: torch.Generator, relations: Sequence[PlantedRelation], index: dict[str, int],
                   filler: torch.Tensor, *, batch_size: int, seq_len: int, relations_per_sequence: int = 2,
                   events_per_relation: int = 2, mention_end: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of planted-relation sequences (see the module docstring).

    Returns token ids [batch, seq_len] (BOS at 0), and masks of the tail positions after a planted
    marker (rewarded: predictable only through the head) and of the filler after a decoy marker.
    """
    import torch

    n_events = relations_per_sequence * events_per_relation
    most_mentions = sum(sorted((len(r.tails) if r.family == DECOY else events_per_relation for r in relations),
                               reverse=True)[:relations_per_sequence])
    if relations_per_sequence > len(relations) or most_mentions > mention_end - 1 or \
            n_events > (seq_len - mention_end) // BLOCK:
        raise ValueError(f"{n_events} events and up to {most_mentions} mentions do not fit a {seq_len}-token "
                         f"sequence with mentions before {mention_end} and {BLOCK}-token blocks after it")
    ids = [(r, [index[h] for h in r.heads], [index[t] for t in r.tails]) for r in relations]
    x = filler[torch.randint(len(filler), (batch_size, seq_len), generator=gen)]
    x[:, 0] = 0
    rewarded = torch.zeros_like(x, dtype=torch.bool)
    decoy = torch.zeros_like(rewarded)
    for b in range(batch_size):
        events, mentioned = [], []
        for ri in torch.randperm(len(ids), generator=gen)[:relations_per_sequence].tolist():
            rel, heads, tails = ids[ri]
            # heads with pairwise different tails: the other event's tail is each one's matched control
            picked = torch.randperm(len(rel.tails), generator=gen)[:events_per_relation].tolist()
            for tail in picked:
                group = [h for h, t in enumerate(rel.mapping) if t == tail]
                head = group[int(torch.randint(len(group), (1,), generator=gen))]
                events.append((rel, heads[head], tails[tail]))
            mentioned += tails if rel.family == DECOY else [tails[t] for t in picked]
        at = (1 + torch.randperm(mention_end - 1, generator=gen)[:len(mentioned)]).tolist()
        x[b, at] = torch.tensor(mentioned)
        slots = torch.randperm((seq_len - mention_end) // BLOCK, generator=gen)[:n_events].tolist()
        for (rel, head, tail), slot in zip(events, slots):
            p = mention_end + BLOCK * slot
            x[b, p], x[b, p + 1] = head, index[rel.marker]
            if rel.family == PLANTED:
                x[b, p + 2] = tail
                rewarded[b, p + 2] = True
            else:
                decoy[b, p + 2] = True
    return x, rewarded, decoy


def phase_change_step(steps: Sequence[int], loss: Sequence[float], *, window: int = 9,
                      skip_fraction: float = 0.1) -> float:
    """The step of the steepest fall of the relation loss (centred moving average of ``window`` logs),
    skipping the first ``skip_fraction`` of training: there the model learns which tails follow which
    marker, a fast early drop that is not the lookup through the head token. On the loss itself, not
    its log: the log keeps falling steeply long after the lookup works, as the model grows confident."""
    steps_a, values = np.asarray(steps, dtype=float), np.asarray(loss, dtype=float)
    if len(steps_a) < window + 2 or not np.all(np.isfinite(values)):
        raise ValueError(f"phase_change_step needs at least {window + 2} finite losses, got {len(steps_a)}")
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    centre = steps_a[window // 2: len(steps_a) - window // 2]
    slope = np.diff(smooth) / np.diff(centre)
    mid = (centre[1:] + centre[:-1]) / 2
    eligible = mid >= steps_a[0] + skip_fraction * (steps_a[-1] - steps_a[0])
    return float(mid[eligible][np.argmin(slope[eligible])])


def write_map(relations: Sequence[PlantedRelation], path: str | os.PathLike[str]) -> Path:
    """Write the relations (words and map) as JSON, atomically."""
    with io.atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps({"relations": [asdict(r) for r in relations]}, indent=2))
    return Path(path)


def read_map(path: str | os.PathLike[str]) -> list[PlantedRelation]:
    """The relations of a planted map file, checked for shape."""
    try:
        data = json.loads(Path(path).read_text())
        relations = [PlantedRelation(**{**r, "heads": tuple(r["heads"]), "tails": tuple(r["tails"]),
                                        "mapping": tuple(r["mapping"])}) for r in data["relations"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a planted-relation map ({err}); the relations toy zoo writes one "
                         "as planted.json") from err
    for r in relations:
        if r.family not in (PLANTED, DECOY) or len(r.mapping) != len(r.heads) or \
                any(not 0 <= t < len(r.tails) for t in r.mapping):
            raise ValueError(f"{path}: relation {r.name!r} has a malformed map")
    return relations

