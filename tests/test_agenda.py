"""AGENDA test split: checksums, parsing against hand-checked rows, corrupt copies, fetching (no network)."""

from __future__ import annotations

import hashlib
import io as stdio
import shutil
import urllib.error
from collections import Counter
from pathlib import Path

import pytest

from icl_dynamics import agenda

VOCAB = ("USED-FOR", "CONJUNCTION", "FEATURE-OF", "PART-OF", "COMPARE", "EVALUATE-FOR", "HYPONYM-OF")


@pytest.fixture(scope="module")
def records(agenda_dir: Path) -> list[agenda.AgendaRecord]:
    return agenda.load_agenda(agenda_dir)


def _copy(agenda_dir: Path, dest: Path) -> Path:
    dest.mkdir()
    for pinned in agenda.AGENDA_FILES:
        shutil.copy(agenda_dir / pinned.name, dest / pinned.name)
        (dest / pinned.name).chmod(0o644)
    return dest


def _replace_line(path: Path, number: int, edit) -> None:
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[number - 1] = edit(lines[number - 1])
    path.write_text("\n".join(lines), encoding="utf-8")


def test_shared_copy_verifies_and_has_1000_abstracts(agenda_dir: Path, records) -> None:
    assert agenda.verify_agenda(agenda_dir) == agenda_dir
    vocab = agenda.parse_relation_vocab((agenda_dir / agenda.VOCAB_NAME).read_text(encoding="utf-8"))
    assert vocab == VOCAB
    assert len(records) == 1000
    assert [r.line for r in records] == list(range(1, 1001))


def test_hand_checked_rows(records) -> None:
    first = records[0]
    assert first.title.startswith("Hierarchical Semantic Classification : Word Sense Disambiguation")
    assert first.entities == (
        "task-specific and background data", "lexical semantic classification problems",
        "word sense disambiguation task", "hierarchical learning architecture",
        "task-specific training data", "background data", "learning architecture",
    )
    assert first.entity_types == ("<material>", "<task>", "<task>", "<method>", "<material>", "<material>", "<method>")
    # "we present a <method_6> for <task_1> ..." : learning architecture USED-FOR the classification problems
    assert first.relations == (agenda.Relation(6, "USED-FOR", 1),)
    assert first.tokens[:5] == ("we", "present", "a", "<method_6>", "for")
    assert first.mention("<method_6>") == 6 and first.mention("present") is None
    assert agenda.surface_text(first).startswith(
        "we present a learning architecture for lexical semantic classification problems that supplements "
        'task-specific training data with background data encoding general " world knowledge ". the learning'
    )
    # "2 0 3 ; 7 2 1": distribution-free ... bounds USED-FOR non-bayesian stochastic bandit;
    # reward distributions FEATURE-OF stochastic multi-armed bandit problem
    second = records[1]
    assert second.relations == (agenda.Relation(2, "USED-FOR", 3), agenda.Relation(7, "FEATURE-OF", 1))
    assert second.entities[7] == "reward distributions" and second.entities[1] == "stochastic multi-armed bandit problem"
    last = records[-1]
    assert last.line == 1000
    assert last.title == "Particle swarm optimization based channel identification in cross-ambiguity domain ."
    assert len(last.relations) == 5
    # "1 4 3": particle swarm optimization COMPARE pso based technique
    assert last.relations[1] == agenda.Relation(1, "COMPARE", 3)
    assert (last.entities[1], last.entities[3]) == ("particle swarm optimization", "pso based technique")


def test_relation_counts_match_a_plain_reading_of_the_file(agenda_dir: Path, records) -> None:
    expected = Counter()
    for row in (agenda_dir / agenda.TSV_NAME).read_text(encoding="utf-8").splitlines():
        numbers = row.split("\t")[3].replace(";", " ").split()
        expected.update(VOCAB[int(r)] for r in numbers[1::3])
    got = Counter(rel.relation for r in records for rel in r.relations)
    assert got == expected
    assert sum(got.values()) == 4525 and set(got) == set(VOCAB)


def test_detokenize_restores_brackets_and_spans() -> None:
    tokens = ["we", "use", "-lrb-", "b", "-rrb-", ",", "c", "'s", "''", "d", "''", "."]
    text, spans = agenda.detokenize(tokens)
    assert text == 'we use (b), c\'s " d ".'
    assert [text[a:b] for a, b in spans] == ["we", "use", "(", "b", ")", ",", "c", "'s", '"', "d", '"', "."]


def test_truncated_file_fails_checksum_and_parse(agenda_dir: Path, tmp_path: Path) -> None:
    copy = _copy(agenda_dir, tmp_path / "agenda")
    tsv = copy / agenda.TSV_NAME
    text = tsv.read_text(encoding="utf-8")
    lines = text.split("\n")
    cut = len("\n".join(lines[:399])) + 1 + lines[399].index("\t") + 5  # inside the entity column of line 400
    tsv.write_text(text[:cut], encoding="utf-8")
    with pytest.raises(agenda.ChecksumError, match=r"preprocessed\.test\.tsv.*truncated"):
        agenda.verify_agenda(copy)
    with pytest.raises(agenda.ChecksumError):
        agenda.load_agenda(copy)
    with pytest.raises(agenda.AgendaFormatError, match=r"line 400: expected 6 tab-separated columns"):
        agenda.load_agenda(copy, verify=False)


def test_wrong_checksum_names_the_file_and_pinned_sum(agenda_dir: Path, tmp_path: Path) -> None:
    copy = _copy(agenda_dir, tmp_path / "agenda")
    vocab = copy / agenda.VOCAB_NAME
    vocab.write_text(vocab.read_text(encoding="utf-8").replace("USED-FOR", "USED-FOX"), encoding="utf-8")
    pinned = dict((p.name, p) for p in agenda.AGENDA_FILES)[agenda.VOCAB_NAME]
    with pytest.raises(agenda.ChecksumError, match=rf"relations\.vocab: sha256 .* differs from the pinned {pinned.sha256}"):
        agenda.verify_agenda(copy)


def test_missing_file_is_reported(agenda_dir: Path, tmp_path: Path) -> None:
    copy = _copy(agenda_dir, tmp_path / "agenda")
    (copy / agenda.VOCAB_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="relations.vocab is missing"):
        agenda.verify_agenda(copy)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda row: row.replace("\t6 0 1\t", "\t6 0 99\t"), r"line 1: relation '6 0 99' names entity 99; the row has 7 entities"),
        (lambda row: row.replace("\t6 0 1\t", "\t6 7 1\t"), r"line 1: relation '6 7 1' names relation type 7"),
        (lambda row: row.replace("\t6 0 1\t", "\t6 0\t"), r"line 1: relation '6 0' is not three"),
        (lambda row: row.replace("<method_6>", "<method_12>", 1), r"line 1: placeholder <method_12> names entity 12"),
        (lambda row: row.replace("<method_6>", "<task_6>", 1), r"line 1: placeholder <task_6> has type 'task'"),
        (lambda row: row.replace("\t<material> <task>", "\t<material>", 1), r"line 1: 7 entities but 6 entity types"),
        (lambda row: row.rsplit("\t", 1)[0], r"line 1: expected 6 tab-separated columns"),
    ],
)
def test_bad_rows_name_their_line(agenda_dir: Path, edit, message: str) -> None:
    text = (agenda_dir / agenda.TSV_NAME).read_text(encoding="utf-8")
    first, rest = text.split("\n", 1)
    agenda.parse_agenda(first, VOCAB)  # the unedited row parses
    with pytest.raises(agenda.AgendaFormatError, match=message):
        agenda.parse_agenda(edit(first) + "\n" + rest, VOCAB)


def test_bad_index_in_a_local_copy_is_reported_with_its_line(agenda_dir: Path, tmp_path: Path) -> None:
    copy = _copy(agenda_dir, tmp_path / "agenda")
    _replace_line(copy / agenda.TSV_NAME, 2, lambda row: row.replace("\t2 0 3 ; 7 2 1\t", "\t2 0 3 ; 8 2 1\t"))
    with pytest.raises(agenda.ChecksumError):
        agenda.load_agenda(copy)
    with pytest.raises(agenda.AgendaFormatError, match=r"preprocessed\.test\.tsv line 2: relation '8 2 1' names entity 8"):
        agenda.load_agenda(copy, verify=False)


def test_empty_row_and_bad_vocab() -> None:
    with pytest.raises(agenda.AgendaFormatError, match="line 2: empty row"):
        agenda.parse_agenda("a\tb\t<x>\t0 0 0\tw\t1\n\nmore", VOCAB)
    with pytest.raises(agenda.AgendaFormatError, match="line 2"):
        agenda.parse_relation_vocab("USED-FOR\n\nPART-OF")


class _FakeWeb:
    """urlopen stand-in serving the shared files by pinned URL; ``failures`` URLErrors come first."""

    def __init__(self, agenda_dir: Path, failures: int = 0, corrupt: bool = False) -> None:
        self.files = {p.url: (agenda_dir / p.name).read_bytes() for p in agenda.AGENDA_FILES}
        self.failures, self.corrupt, self.calls = failures, corrupt, []

    def __call__(self, url: str, timeout: float):
        self.calls.append(url)
        if self.failures:
            self.failures -= 1
            raise urllib.error.URLError("connection reset")
        data = self.files[url]
        return stdio.BytesIO(data[:-10] if self.corrupt else data)


def test_fetch_downloads_pinned_urls_with_retries(agenda_dir: Path, tmp_path: Path, monkeypatch) -> None:
    web = _FakeWeb(agenda_dir, failures=2)
    monkeypatch.setattr(agenda.urllib.request, "urlopen", web)
    monkeypatch.setattr(agenda.time, "sleep", lambda s: None)
    dest = agenda.fetch_agenda(tmp_path / "resources" / "agenda")
    assert sorted(p.name for p in dest.iterdir()) == [agenda.TSV_NAME, agenda.VOCAB_NAME]
    for pinned in agenda.AGENDA_FILES:
        assert hashlib.sha256((dest / pinned.name).read_bytes()).hexdigest() == pinned.sha256
        assert pinned.url == f"https://raw.githubusercontent.com/rikdz/GraphWriter/{pinned.commit}/data/{pinned.name}"
    assert len(web.calls) == 4  # two failures, then one download per file
    # verified files are not downloaded again
    web.calls.clear()
    assert agenda.prepare_agenda(None, dest) == dest and web.calls == []
    # a configured local copy is only verified
    assert agenda.prepare_agenda(agenda_dir, tmp_path / "unused") == agenda_dir and web.calls == []


def test_fetch_rejects_corrupt_download_and_writes_nothing(agenda_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(agenda.urllib.request, "urlopen", _FakeWeb(agenda_dir, corrupt=True))
    dest = tmp_path / "agenda"
    with pytest.raises(agenda.ChecksumError, match="raw.githubusercontent.com/rikdz/GraphWriter"):
        agenda.fetch_agenda(dest)
    assert list(dest.iterdir()) == []


def test_fetch_gives_up_after_retries(agenda_dir: Path, tmp_path: Path, monkeypatch) -> None:
    web = _FakeWeb(agenda_dir, failures=100)
    monkeypatch.setattr(agenda.urllib.request, "urlopen", web)
    monkeypatch.setattr(agenda.time, "sleep", lambda s: None)
    with pytest.raises(ConnectionError, match="after 3 attempts"):
        agenda.fetch_agenda(tmp_path / "agenda", retries=3)
    assert len(web.calls) == 3

    calls = []

    def not_found(url: str, timeout: float):
        calls.append(url)
        raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)

    monkeypatch.setattr(agenda.urllib.request, "urlopen", not_found)
    with pytest.raises(ConnectionError, match="HTTP 404"):
        agenda.fetch_agenda(tmp_path / "agenda", retries=3)
    assert len(calls) == 1  # a client error is not retried
