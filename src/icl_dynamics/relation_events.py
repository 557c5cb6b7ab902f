"""The relation index's inputs: the relations stage's tables checked and indexed per sequence, with
every triplet's opportunities and controls fixed before any model runs.

Per sequence (BOS prepended when asked): the candidate ids in order of first candidate appearance
(``exclude_function_words``: an id counts from its first position not flagged as a function word),
the tenth-token control, the random control of every query position, and per triplet its first
opportunity (the first j >= max(s, o) with the tail a candidate), its group (family, relation,
direction), its token pair (the second cluster dimension of the SIH test) and two matched controls:

* ``matched`` (the ``literal`` and ``source`` variants, x = a raw embedding, where only the token id
  matters): a token of the tail's kind with no relation to the head (:func:`matched_controls`).
* ``matched_position`` (the ``contextual`` variant, x = the head's real value input at s, which
  carries what the tokens before s wrote there): the same kind, and in the same position class
  relative to s as the tail (:func:`position_class`). Without this a tail that directly precedes its
  head (57 % of forward amod triplets, every reverse dobj/pobj one) is raised by any head reading a
  previous-token head's output, and the matched control, almost never adjacent, is not.

The same inputs give the same indices, whatever the batch size or the order of the sequences.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from icl_dynamics.relations import KG, KG_LETTERS

DIRECTIONS = ("forward", "reverse")
SEQUENCE_COLUMNS = ("sequence_id", "document_id", "family", "token_ids", "function_mask")
TRIPLET_COLUMNS = ("sequence_id", "family", "relation", "direction", "s", "o", "head_id", "tail_id")
# columns of IndexedSequence.triplets
TRIPLET_FIELDS = ("s", "start", "group", "tail", "head", "matched", "matched_position", "pair")
AFTER = -1  # position class of a token seen only after the head position (up to the horizon)


@dataclass
class IndexedSequence:
    """One sequence as the relation index scores it."""

    sequence_id: int
    document: int  # source document: the cluster of the significance test
    tokens: np.ndarray  # [n] int64
    uniq: np.ndarray  # [U] candidate ids, in order of first candidate appearance
    first: np.ndarray  # [U] first candidate position of each uniq id
    tenth: tuple[int, int] | None  # (position, uniq index) of the tenth-token control
    random: np.ndarray  # [n] uniq index of the random control at each j (-1 before any candidate)
    position_uniq: np.ndarray  # [n] uniq index of the token at each position (-1: never a candidate)
    # [m, len(TRIPLET_FIELDS)] int64 of live triplets: s, first opportunity j, group, tail, head and the two
    # matched controls' uniq indices (-1: none), and the token pair's index
    triplets: np.ndarray


def random_control_draws(seed: int, sequence_id: int, n: int) -> np.ndarray:
    """The uniform draws u_j (j = 0..n-1) that pick each position's random control candidate."""
    return np.random.default_rng([seed, sequence_id]).random(n)


def as_frame(table: pa.Table | pd.DataFrame, columns: Sequence[str], what: str) -> pd.DataFrame:
    """The table as a DataFrame, or a KeyError naming the columns it lacks."""
    frame = table.to_pandas() if isinstance(table, pa.Table) else table
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise KeyError(f"{what} table lacks columns {missing} (has {list(frame.columns)})")
    return frame


def prepare_sequences(
    sequences: pa.Table | pd.DataFrame,
    triplets: pa.Table | pd.DataFrame,
    *,
    exclude_function_words: bool,
    control_position: int,
    seed: int,
    max_len: int,
    bos_id: int | None,
) -> tuple[list[IndexedSequence], list[tuple[str, str, str]], int]:
    """Check the inputs against the relations contract and index them per sequence (with ``bos_id``
    prepended when given: positions shift by one, the BOS is never a candidate nor a head position).
    Returns the sequences with a live triplet, the groups (family, relation, direction) in index order
    and the number of distinct token pairs (t_s, t_o)."""
    seqs = as_frame(sequences, SEQUENCE_COLUMNS, "sequences")
    trips = as_frame(triplets, TRIPLET_COLUMNS, "triplets")
    # plain Python strings: Arrow-backed string columns are slow to iterate per sequence
    trips = trips.astype({c: object for c in ("family", "relation", "direction")})
    if seqs["sequence_id"].duplicated().any():
        dup = seqs.loc[seqs["sequence_id"].duplicated(), "sequence_id"].iloc[0]
        raise ValueError(f"sequences: sequence_id {dup} appears more than once")
    bad_dir = set(trips["direction"]) - set(DIRECTIONS)
    if bad_dir:
        raise ValueError(f"triplets: unknown direction(s) {sorted(bad_dir)}; expected {DIRECTIONS}")
    keys = sorted(set(zip(trips["family"], trips["relation"], trips["direction"])))
    group_of = {key: g for g, key in enumerate(keys)}
    by_seq = {sid: rows for sid, rows in trips.groupby("sequence_id", sort=False)}
    unknown = set(by_seq) - set(seqs["sequence_id"])
    if unknown:
        raise KeyError(f"triplets refer to sequence_id(s) not in the sequences table: {sorted(unknown)[:5]}")

    prepared, truncated = [], 0
    pair_of: dict[tuple[int, int], int] = {}
    for row in seqs.itertuples(index=False):
        rows = by_seq.get(row.sequence_id)
        if rows is None:
            continue
        sid = int(row.sequence_id)
        tokens = np.asarray(row.token_ids, dtype=np.int64)
        mask = np.asarray(row.function_mask, dtype=bool)
        if tokens.shape != mask.shape:
            raise ValueError(f"sequence {sid}: {len(tokens)} token_ids but {len(mask)} function_mask entries")
        s, o = rows["s"].to_numpy(np.int64), rows["o"].to_numpy(np.int64)
        if (s < 0).any() or (o < 0).any() or (s >= len(tokens)).any() or (o >= len(tokens)).any():
            raise ValueError(f"sequence {sid}: triplet position outside 0..{len(tokens) - 1}")
        ids = (tokens[s], tokens[o])
        head, tail = rows["head_id"].to_numpy(np.int64), rows["tail_id"].to_numpy(np.int64)
        ok = (ids[0] == head) & (ids[1] == tail)
        ok |= (rows["direction"].to_numpy() == "reverse") & (ids[0] == tail) & (ids[1] == head)
        if not ok.all():
            bad = rows.iloc[int(np.argmin(ok))]
            raise ValueError(
                f"sequence {sid}: triplet {bad['relation']} s={bad['s']} o={bad['o']} names ids "
                f"{bad['head_id']}/{bad['tail_id']} but the tokens there are {tokens[bad['s']]}/{tokens[bad['o']]}"
            )
        if bos_id is not None:
            tokens, mask, s, o = np.concatenate([[bos_id], tokens]), np.concatenate([[True], mask]), s + 1, o + 1
        if len(tokens) > max_len:
            keep = np.maximum(s, o) < max_len
            truncated += int((~keep).sum())
            rows, s, o = rows[keep], s[keep], o[keep]
            tokens, mask = tokens[:max_len], mask[:max_len]
            if not len(rows):
                continue
        pairs = np.asarray([pair_of.setdefault(key, len(pair_of)) for key in zip(tokens[s].tolist(), tokens[o].tolist())],
                           dtype=np.int64)
        seq = _index_sequence(sid, int(row.document_id), tokens, mask, rows, s, o, pairs, group_of,
                              exclude_function_words=exclude_function_words,
                              control_position=control_position + (bos_id is not None), seed=seed,
                              bos=bos_id is not None)
        if len(seq.triplets):
            prepared.append(seq)
    if truncated:
        warnings.warn(f"{truncated} triplets lie beyond max_len={max_len} tokens and were dropped", stacklevel=3)
    return prepared, keys, len(pair_of)


def _index_sequence(
    sid: int, document: int, tokens: np.ndarray, mask: np.ndarray, rows: pd.DataFrame, s: np.ndarray, o: np.ndarray,
    pairs: np.ndarray, group_of: Mapping[tuple[str, str, str], int], *, exclude_function_words: bool,
    control_position: int, seed: int, bos: bool,
) -> IndexedSequence:
    n = len(tokens)
    content = ~mask if exclude_function_words else np.ones(n, dtype=bool)
    content[0] &= not bos
    positions = np.flatnonzero(content)
    uniq, first_idx = np.unique(tokens[positions], return_index=True)
    order = np.argsort(positions[first_idx], kind="stable")
    uniq, first = uniq[order], positions[first_idx][order]
    index = {int(t): u for u, t in enumerate(uniq)}
    later = positions[positions >= min(control_position, n - 1)]
    tenth = (int(later[0]), index[int(tokens[later[0]])]) if len(later) else None
    visible = np.searchsorted(first, np.arange(n), side="right")  # |C_j|
    draws = random_control_draws(seed, sid, n)
    random = np.where(visible > 0, np.floor(draws * visible).astype(np.int64), -1)
    groups = [group_of[key] for key in zip(rows["family"], rows["relation"], rows["direction"])]
    position_uniq = np.asarray([index.get(int(t), -1) for t in tokens], dtype=np.int64)
    tail, head = position_uniq[o], position_uniq[s]
    matched, by_position = matched_controls(tokens, rows, s, o, index, first, seed=seed, sequence_id=sid,
                                            skip=int(bos))
    # opportunities: j >= max(s, o) with the tail in C_j; a tail that is never a candidate has none
    start = np.maximum(np.maximum(s, o), np.append(first, n)[tail])
    live = start < n
    trip = np.stack([s, start, np.asarray(groups, np.int64), tail, head, matched, by_position, pairs], axis=1)[live]
    return IndexedSequence(sid, document, tokens, uniq, first, tenth, random, position_uniq, trip)


def position_class(positions: np.ndarray, s: int) -> int:
    """Where a token stands relative to the head position ``s``, as the head's value input at s can see
    it, from the token's sorted ``positions`` in the sequence: the distance class of its last occurrence
    before s -- 0 for s - 1, then 1 for s - 2, 2 for 3-4 back, 3 for 5-8, ... (ceil(log2 distance)) --
    or :data:`AFTER` when it occurs only after s, where nothing of it reaches s."""
    k = int(np.searchsorted(positions, s)) - 1
    return int(s - positions[k] - 1).bit_length() if k >= 0 else AFTER


def matched_controls(tokens: np.ndarray, rows: pd.DataFrame, s: np.ndarray, o: np.ndarray,
                     index: Mapping[int, int], first: np.ndarray, *, seed: int, sequence_id: int,
                     skip: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each triplet's two matched controls (uniq indices, -1 when there is none): a token of the same kind
    as its tail that the relations give no link to its head (method notes §2.5 and §9.11), and the same
    restricted to the tail's :func:`position_class` relative to s (the ``contextual`` variant's control).

    Same kind: for ``kg-letters``, any entity letter of the sequence (a head or tail of one of its
    triplets); for ``kg``, a tail of the same family and direction (any relation: an entity mention's
    first content word, or for reverse triplets its last); for every other family (syntax, planted), a
    tail of the same relation (dependency label) and direction. Excluded: the triplet's own head and
    tail tokens and every token a triplet of the sequence links to the head token. It must be a
    candidate visible from the first opportunity on (first candidate position <= max(s, o)). Positions
    below ``skip`` (a prepended BOS) are no occurrence. Each is drawn uniformly, in order of first
    appearance, one draw per triplet in table order, with ``numpy.random.default_rng([seed, sequence_id,
    1])`` (``2`` for the position-matched one): the two share their pools, not their draws.
    """
    family, relation, direction = (rows[c].to_numpy() for c in ("family", "relation", "direction"))
    head_tok, tail_tok = tokens[s], tokens[o]
    linked: dict[int, set[int]] = {}
    for h, t in zip(head_tok.tolist(), tail_tok.tolist()):
        linked.setdefault(h, set()).add(t)
        linked.setdefault(t, set()).add(h)
    letters = family == KG_LETTERS
    entities = set(head_tok[letters].tolist()) | set(tail_tok[letters].tolist())
    # each triplet's pool of same-kind tails, built once per kind (a mask over every row per triplet was
    # quadratic in the sequence's triplets: 60% of the relation-index stage on AGENDA)
    kind = list(zip(family.tolist(), direction.tolist(), np.where(family == KG, "", relation).tolist()))
    tails_of: dict[tuple, set[int]] = {}
    for key, t in zip(kind, tail_tok.tolist()):
        tails_of.setdefault(key, set()).add(t)
    rng, rng_position = (np.random.default_rng([seed, sequence_id, stream]) for stream in (1, 2))
    out, out_position = np.full(len(rows), -1, dtype=np.int64), np.full(len(rows), -1, dtype=np.int64)
    order = np.argsort(tokens[skip:], kind="stable")  # every position of each id
    ids, starts = np.unique(tokens[skip:][order], return_index=True)
    occurrences = dict(zip(ids.tolist(), np.split(order + skip, starts[1:])))
    for i in range(len(rows)):
        pool = (entities if letters[i] else tails_of[kind[i]]) - ({int(head_tok[i]), int(tail_tok[i])}
                                                                 | linked[int(head_tok[i])])
        horizon = max(s[i], o[i])
        eligible = sorted(index[t] for t in pool if t in index and first[index[t]] <= horizon)
        if not eligible:
            continue
        out[i] = eligible[int(rng.integers(len(eligible)))]
        at = position_class(occurrences[int(tail_tok[i])], int(s[i]))
        same = [u for u in eligible if position_class(occurrences[int(tokens[first[u]])], int(s[i])) == at]
        if same:
            out_position[i] = same[int(rng_position.integers(len(same)))]
    return out, out_position
