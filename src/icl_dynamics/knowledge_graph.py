"""Knowledge-graph triplets from AGENDA's annotated relations, two ways.

``kg`` (the default family): **the abstract keeps its entity words.** A relation (head entity, r, tail
entity) becomes a triplet at the first mentions of its two entities (in the abstract, or in the first
sentence mentioning both): the head token is the *last* content word of the head mention, the tail
token the *first* content word of the tail mention (content: not a spaCy stop word or punctuation, the
function-word rule of :func:`relations.function_mask`). Under ``anchor="single"`` that word must be one
token; under ``"first"`` the tail is its first sub-token and the head the *last* sub-token of its word.
The head sits where the model has read the whole head mention; the tail is the token that starts the
tail mention, the one a head raising "what this entity is related to" would raise. The text is the
syntax family's (entity words restored, spacing normalised), so the tokens are the model's ordinary ones.

``kg-letters`` (the paper's construction, kept as a **negative control**): every entity mention becomes
one capital letter, a permutation per abstract (:func:`assign_letters`). The letter of a tail then
carries no information a head could know: with shuffled letters an oracle that memorises every
(relation, head letter -> tail letter) pair of half the abstracts recovers nothing on the other half,
and in order of mention (the paper's) what it recovers is the order of mention. Under the ``source`` and
``literal`` variants (x = a letter's raw embedding) tail and matched control are exchangeable, so a head
flagged there means the test is broken; :mod:`icl_dynamics.relation_index` treats those cells so.

Both keep the annotated direction (``forward``) and its ``reverse``, count every dropped relation with
its reason, and use the same spacing normalisation as every family (:func:`relations.space_words`).
"""

from __future__ import annotations

import string
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from icl_dynamics import agenda
from icl_dynamics.relations import (
    ANCHORS,
    DUPLICATE,
    KG,
    KG_LETTERS,
    NOT_IN_SENTENCE,
    NOT_IN_TEXT,
    SELF_RELATION,
    SENTENCE_END,
    UNITS,
    Encoded,
    Rows,
    Spaced,
    anchor_position,
    check_option,
    encode,
    space_words,
    spacy_words,
    unit_text,
)

# Capital letters that are English words (A, I) or very common abbreviations (E, N, S, W: e.g.,
# compass points) are never used as entity anchors -- the exclusion the OLMo-2 replication used.
EXCLUDED_LETTERS = "AEINSW"
LETTERS = tuple(c for c in string.ascii_uppercase if c not in EXCLUDED_LETTERS)

NO_LETTER = "no letter left"
NO_CONTENT_WORD = "mention has no content word"

# the anchor rule of each end of a word triplet, per ``anchor`` option: (head mode, tail mode)
WORD_ANCHOR_MODES = {"single": ("single", "single"), "first": ("last", "first")}


# ----------------------------------------------------------------------------- shared


def _relation_drop_reason(record: agenda.AgendaRecord, rel: agenda.Relation, mentioned: set[str],
                          seen: set[tuple[str, str, str]], key: tuple[str, str, str], early: str) -> str:
    """Why an annotated relation cannot become a triplet of ``key`` (head, relation, tail) ("" when it can);
    ``early``: a family's own reason, checked once both entities are known to be mentioned."""
    if rel.head == rel.tail:
        return SELF_RELATION
    if not {record.entities[rel.head], record.entities[rel.tail]} <= mentioned:
        return NOT_IN_TEXT
    if early:
        return early
    if key[0] == key[2]:  # two entity entries with the same words (or letter)
        return SELF_RELATION
    if key in seen:
        return DUPLICATE
    return ""


def _mentioned(record: agenda.AgendaRecord) -> set[str]:
    return {record.entities[k] for k in map(record.mention, record.tokens) if k is not None}


def _unit_spans(marks: Sequence[tuple[Any, int, int, int]], unit: str, length: int) -> list[tuple[int, int]]:
    """Character spans of the sequences: the whole text, or each sentence (from its words' ``marks``)."""
    if unit == "abstract":
        return [(0, length)]
    last = max((sent for _, sent, _, _ in marks), default=-1)
    return [(min(a for _, s, a, _ in marks if s == sent), max(b for _, s, _, b in marks if s == sent))
            for sent in range(last + 1)]


def _chosen(record: agenda.AgendaRecord, rows: Rows, family: str, firsts: Sequence[dict[str, Any]],
            key_of: Callable[[agenda.Relation], tuple[str, str, str]],
            early: Callable[[agenda.Relation], str] = lambda rel: "") -> list[tuple[agenda.Relation, int]]:
    """The relations that become triplets, with the unit holding both first mentions; counts the rest."""
    mentioned, seen, chosen = _mentioned(record), set(), []
    for rel in record.relations:
        key = key_of(rel)
        reason = _relation_drop_reason(record, rel, mentioned, seen, key, early(rel))
        if not reason:
            where = next((u for u, found in enumerate(firsts) if key[0] in found and key[2] in found), None)
            reason = NOT_IN_SENTENCE if where is None else ""
        if reason:
            rows.drop(family, rel.relation, rel.relation, reason)
        else:
            seen.add(key)
            chosen.append((rel, where))
    return chosen


def _sequences(rows: Rows, text: Spaced, units: Sequence[tuple[int, int]], used: Sequence[int], *,
               family: str, document_id: int, source: str, unit: str, tokenizer: PreTrainedTokenizerBase,
               make_doc: Callable[[str], Any]) -> dict[int, tuple[int, Encoded, int, frozenset[int]]]:
    """Encode and add the sequence of each unit in ``used``: unit -> (sequence id, encoding, shift, added)."""
    out = {}
    for u in used:
        sequence, shift, added = unit_text(text.text, *units[u], text.inserted)
        encoded = encode(sequence, tokenizer, spacy_words(make_doc(sequence)))
        sequence_id = rows.add_sequence(document_id=document_id, source=source, unit=unit, family=family,
                                        text=sequence, encoded=encoded)
        out[u] = (sequence_id, encoded, shift, added)
    return out


# ----------------------------------------------------------------------------- entity words (``kg``)


@dataclass(frozen=True)
class Mention:
    """One entity mention in the spaced surface text: its words' character spans and its sentence."""

    surface: str  # the entity's words (entities with the same words are one entity)
    sentence: int
    words: tuple[tuple[int, int], ...]


def mention_text(record: agenda.AgendaRecord) -> tuple[Spaced, list[Mention], list[tuple[Any, int, int, int]]]:
    """The abstract with entity words restored (the syntax family's text, spacing normalised) and every
    entity mention in it; also ``(None, sentence, start, end)`` per word, for sentence units."""
    tokens: list[str] = []
    owner: list[int | None] = []  # the placeholder (index into record.tokens) each word came from
    sentence_of: list[int] = []
    sentence = 0
    for index, token in enumerate(record.tokens):
        k = record.mention(token)
        words = record.entities[k].split() if k is not None else [token]
        tokens.extend(words)
        owner.extend([index if k is not None else None] * len(words))
        sentence_of.extend([sentence] * len(words))
        if token in SENTENCE_END:
            sentence += 1
    text, spans = agenda.detokenize(tokens)
    spaced = space_words(text)
    at = spaced.index
    placed = [(at[a], at[b - 1] + 1) for a, b in spans]
    mentions: dict[int, list[int]] = {}
    for w, index in enumerate(owner):
        if index is not None:
            mentions.setdefault(index, []).append(w)
    out = [Mention(record.entities[record.mention(record.tokens[index])], sentence_of[ws[0]],
                   tuple(placed[w] for w in ws)) for index, ws in mentions.items()]
    marks = [(None, sent, a, b) for sent, (a, b) in zip(sentence_of, placed)]
    return spaced, out, marks


def _content_word(encoded: Encoded, words: Sequence[tuple[int, int]], *, last: bool) -> tuple[int, int] | None:
    """The last (or first) word of a mention that is not a function word: a word is one when every token
    it overlaps is a function token (the relation index's candidate rule)."""
    for a, b in (reversed(words) if last else words):
        covering = [i for i, (x, y) in enumerate(encoded.offsets) if y > x and x < b and y > a]
        if covering and not all(encoded.function_mask[i] for i in covering):
            return a, b
    return None


def kg_word_rows(
    records: Sequence[agenda.AgendaRecord],
    tokenizer: PreTrainedTokenizerBase,
    make_doc: Callable[[str], Any],
    *,
    unit: str = "abstract",
    anchor: str = "single",
    source: str = "agenda-test",
    first_id: int = 0,
) -> Rows:
    """KG triplets on the entities' own words (family ``kg``; the module docstring): sequences, triplets
    and the count of every dropped relation by reason. ``make_doc`` is spaCy's tokenizer (function flags)."""
    check_option("unit", unit, UNITS)
    check_option("anchor", anchor, ANCHORS)
    head_mode, tail_mode = WORD_ANCHOR_MODES[anchor]
    rows = Rows(tokenizer, first_id)
    for document_id, record in enumerate(records):
        text, mentions, marks = mention_text(record)
        units = _unit_spans(marks, unit, len(text.text))
        firsts: list[dict[str, Mention]] = [{} for _ in units]  # first mention of each entity per unit
        for mention in mentions:
            firsts[mention.sentence if unit == "sentence" else 0].setdefault(mention.surface, mention)
        words = record.entities
        chosen = _chosen(record, rows, KG, firsts, lambda rel: (words[rel.head], rel.relation, words[rel.tail]))
        used = sorted({where for _, where in chosen})
        encoded_units = _sequences(rows, text, units, used, family=KG, document_id=document_id, source=source,
                                   unit=unit, tokenizer=tokenizer, make_doc=make_doc)
        for rel, where in chosen:
            sequence_id, encoded, shift, added = encoded_units[where]
            ends = []
            for k, last, mode in ((rel.head, True, head_mode), (rel.tail, False, tail_mode)):
                spans = [(a - shift, b - shift) for a, b in firsts[where][words[k]].words]
                word = _content_word(encoded, spans, last=last)
                ends.append(((None, NO_CONTENT_WORD), False) if word is None else
                            (anchor_position(encoded.offsets, *word, mode), word[0] - 1 in added))
            (head, head_recovered), (tail, tail_recovered) = ends
            rows.pair(sequence_id, encoded, KG, rel.relation, rel.relation, head, tail,
                      recovered=head_recovered or tail_recovered)
    return rows


# ----------------------------------------------------------------------------- letters (``kg-letters``)


def assign_letters(record: agenda.AgendaRecord, letters: Sequence[str] = LETTERS, *,
                   shuffle: bool = True) -> dict[int, str]:
    """Letter of each mentioned entity (entity index -> letter); deterministic per abstract.

    Entities with the same words share a letter. Which entities get one: those in (non-self)
    relations first, then the rest, each in order of first mention, until the letters run out. Which
    letter each gets: a permutation of ``letters`` drawn per abstract (seeded by its text), not the
    alphabet in order of mention. In order of mention, the letters of related entities would follow a
    pattern shared by every abstract (a CONJUNCTION "B and C" joins consecutive letters), so a
    head's fixed preference among letters, even a random head's, would pass for a relation effect
    that recurs in every document. Shuffled per abstract, that preference averages out over
    documents, the clusters of the SIH test (tested on random-init models). ``shuffle=False`` gives the
    paper's order of mention, for that comparison only.
    """
    first: dict[str, int] = {}
    for position, token in enumerate(record.tokens):
        k = record.mention(token)
        if k is not None:
            first.setdefault(record.entities[k], position)
    related = {record.entities[k] for r in record.relations if r.head != r.tail for k in (r.head, r.tail)}
    order = sorted(first, key=lambda surface: (surface not in related, first[surface]))
    seed = zlib.crc32(" ".join(record.tokens).encode("utf-8"))
    shuffled = [letters[i] for i in np.random.default_rng(seed).permutation(len(letters))] if shuffle else letters
    by_surface = dict(zip(order, shuffled))
    return {k: by_surface[e] for k, e in enumerate(record.entities) if e in by_surface}


def kg_text(record: agenda.AgendaRecord,
            lettered: dict[int, str]) -> tuple[Spaced, list[tuple[str, int, int, int]]]:
    """The abstract with lettered mentions as letters (other mentions keep their words), spacing
    normalised by :func:`relations.space_words`.

    Returns the text and, per sentence-split token, ``(letter or "", sentence, start, end)`` in it.
    """
    tokens: list[str] = []
    letter_of: list[str] = []
    sentence_of: list[int] = []
    sentence = 0
    for token in record.tokens:
        k = record.mention(token)
        words = [lettered[k]] if k in lettered else (record.entities[k].split() if k is not None else [token])
        tokens.extend(words)
        letter_of.extend([lettered.get(k, "") if k is not None else ""] * len(words))
        sentence_of.extend([sentence] * len(words))
        if token in SENTENCE_END:
            sentence += 1
    text, spans = agenda.detokenize(tokens)
    spaced = space_words(text)
    at = spaced.index
    return spaced, [(letter, sent, at[a], at[b - 1] + 1) for letter, sent, (a, b) in zip(letter_of, sentence_of, spans)]


def kg_letter_rows(
    records: Sequence[agenda.AgendaRecord],
    tokenizer: PreTrainedTokenizerBase,
    make_doc: Callable[[str], Any],
    *,
    unit: str = "abstract",
    source: str = "agenda-test",
    letters: Sequence[str] = LETTERS,
    shuffle: bool = True,
    first_id: int = 0,
) -> Rows:
    """The paper's letter construction (family ``kg-letters``, a negative control: the module docstring);
    ``make_doc`` is spaCy's tokenizer (for flags). Every abstract gets a sequence, related or not.
    ``shuffle=False``: letters in order of mention, as the paper assigns them (see :func:`assign_letters`)."""
    check_option("unit", unit, UNITS)
    rows = Rows(tokenizer, first_id)
    for document_id, record in enumerate(records):
        lettered = assign_letters(record, letters, shuffle=shuffle)
        text, marks = kg_text(record, lettered)
        units = _unit_spans(marks, unit, len(text.text))
        firsts: list[dict[str, tuple[int, int]]] = [{} for _ in units]  # first mention of each letter per unit
        for letter, sent, a, b in marks:
            if letter:
                firsts[sent if unit == "sentence" else 0].setdefault(letter, (a, b))
        chosen = _chosen(
            record, rows, KG_LETTERS, firsts,
            lambda rel: (lettered.get(rel.head, ""), rel.relation, lettered.get(rel.tail, "")),
            early=lambda rel: NO_LETTER if rel.head not in lettered or rel.tail not in lettered else "")
        used = sorted({where for _, where in chosen}) if unit == "sentence" else [0]
        encoded_units = _sequences(rows, text, units, used, family=KG_LETTERS, document_id=document_id,
                                   source=source, unit=unit, tokenizer=tokenizer, make_doc=make_doc)
        for rel, where in chosen:
            sequence_id, encoded, shift, added = encoded_units[where]
            spans = [(a - shift, b - shift) for a, b in (firsts[where][lettered[k]] for k in (rel.head, rel.tail))]
            head, tail = (anchor_position(encoded.offsets, a, b, "single") for a, b in spans)
            rows.pair(sequence_id, encoded, KG_LETTERS, rel.relation, rel.relation, head, tail,
                      recovered=any(a - 1 in added for a, _ in spans))
    return rows
