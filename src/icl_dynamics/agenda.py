"""The AGENDA knowledge-graph dataset (Koncel-Kedziorski et al., NAACL 2019), test split.

The pipeline takes the preprocessed test split from the public ``rikdz/GraphWriter`` repository
at pinned commits, checks each file's sha256 before anything reads it, and parses it into
:class:`AgendaRecord` rows: 1,000 lower-cased, PTB-tokenised scientific abstracts whose entity
mentions are ``<type_k>`` placeholders (``k`` indexes the row's entity list) with their
``head relation tail`` triples. A wrong checksum names the file; a malformed row names its line.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from icl_dynamics.io import sha256_file, write_bytes_atomic

GRAPHWRITER_REPO = "rikdz/GraphWriter"
RAW_URL = "https://raw.githubusercontent.com/{repo}/{commit}/data/{name}"
TSV_NAME = "preprocessed.test.tsv"
VOCAB_NAME = "relations.vocab"


@dataclass(frozen=True)
class PinnedFile:
    """One file of the GraphWriter repository at an immutable commit, with its sha256."""

    name: str
    commit: str
    sha256: str

    @property
    def url(self) -> str:
        return RAW_URL.format(repo=GRAPHWRITER_REPO, commit=self.commit, name=self.name)


# Commits at which the file versions below are stored (found in a code index of the repository);
# the sha256 sums are those of shared/README.md, so a commit that served other bytes would fail.
AGENDA_FILES = (
    PinnedFile(TSV_NAME, "97889a565344cd0535e12b95289fd0f5b51f0531",
               "0fd6b6ac1d1c9343f91eb617102a2b8a1850d0eded966b17e396942b57979553"),
    PinnedFile(VOCAB_NAME, "b4d637dfe71a6e04283fe7932bc4999bde3ae260",
               "f16d77dddb940e1da652c893e959219186871fc7da4a80c4a8443ae652988da7"),
)

PLACEHOLDER = re.compile(r"<([a-z]+)_(\d+)>")
ENTITY_TYPE = re.compile(r"<([a-z]+)>")

# PTB escapes in AGENDA text -> the characters a model sees in ordinary text.
PTB_TOKENS = {"-lrb-": "(", "-rrb-": ")", "-lsb-": "[", "-rsb-": "]", "-lcb-": "{", "-rcb-": "}",
              "``": '"', "''": '"'}
_NO_SPACE_BEFORE = frozenset({",", ".", ";", ":", "?", "!", ")", "]", "}", "%",
                              "'s", "n't", "'ve", "'re", "'ll", "'d", "'m"})
_NO_SPACE_AFTER = frozenset({"(", "[", "{"})


class AgendaError(ValueError):
    """The AGENDA files are missing, corrupt or malformed."""


class ChecksumError(AgendaError):
    """A file's sha256 differs from the pinned one (corrupt, truncated or another version)."""


class AgendaFormatError(AgendaError):
    """A row of the TSV (or the relation vocabulary) does not have the documented format."""


@dataclass(frozen=True)
class Relation:
    """One annotated triple: entity ``head`` --relation--> entity ``tail`` (indices into the entity list)."""

    head: int
    relation: str
    tail: int


@dataclass(frozen=True)
class AgendaRecord:
    """One abstract: its entities and types, relations, and tokens with ``<type_k>`` placeholders."""

    index: int
    line: int
    title: str
    entities: tuple[str, ...]
    entity_types: tuple[str, ...]
    relations: tuple[Relation, ...]
    tokens: tuple[str, ...]

    def mention(self, token: str) -> int | None:
        """Entity index of a placeholder token, ``None`` for an ordinary word."""
        match = PLACEHOLDER.fullmatch(token)
        return int(match.group(2)) if match else None


def _check_digest(label: str, got: str, pinned: PinnedFile) -> None:
    if got != pinned.sha256:
        raise ChecksumError(
            f"{label}: sha256 {got} differs from the pinned {pinned.sha256} "
            f"({GRAPHWRITER_REPO}@{pinned.commit[:12]} data/{pinned.name}); the file is corrupt, "
            "truncated or another version -- delete it and fetch again"
        )


def verify_agenda(directory: str | os.PathLike[str]) -> Path:
    """Check that ``directory`` holds both AGENDA files with their pinned sha256; return it."""
    directory = Path(directory)
    for pinned in AGENDA_FILES:
        path = directory / pinned.name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; run fetch_agenda({str(directory)!r}) or point the config at a copy")
        _check_digest(str(path), sha256_file(path), pinned)
    return directory


def _download(url: str, *, retries: int, timeout: float, backoff: float) -> bytes:
    """GET ``url`` with urllib, retrying network errors and server errors (not 4xx)."""
    attempt = 0
    while True:
        attempt += 1
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt >= retries:
                raise ConnectionError(f"could not download {url}: HTTP {exc.code} (attempt {attempt} of {retries})") from exc
        except (urllib.error.URLError, OSError) as exc:
            if attempt >= retries:
                raise ConnectionError(f"could not download {url} after {attempt} attempts: {exc}") from exc
        time.sleep(backoff * 2 ** (attempt - 1))


def fetch_agenda(
    dest_dir: str | os.PathLike[str], *, retries: int = 4, timeout: float = 60.0, backoff: float = 2.0
) -> Path:
    """Download the pinned AGENDA files into ``dest_dir`` (skipping verified ones) and verify them."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    for pinned in AGENDA_FILES:
        target = dest / pinned.name
        if target.is_file() and sha256_file(target) == pinned.sha256:
            continue
        data = _download(pinned.url, retries=retries, timeout=timeout, backoff=backoff)
        _check_digest(pinned.url, hashlib.sha256(data).hexdigest(), pinned)
        write_bytes_atomic(target, data)
    return verify_agenda(dest)


def prepare_agenda(local_dir: str | os.PathLike[str] | None, resources_dir: str | os.PathLike[str]) -> Path:
    """The config's local copy when given (verified only), else the fetched copy under ``resources_dir``."""
    return verify_agenda(local_dir) if local_dir else fetch_agenda(resources_dir)


def parse_relation_vocab(text: str, *, path: str = VOCAB_NAME) -> tuple[str, ...]:
    """Relation names, one per line, in index order."""
    names = tuple(text.splitlines())
    for number, name in enumerate(names, start=1):
        if not name.strip() or name != name.strip():
            raise AgendaFormatError(f"{path} line {number}: relation name {name!r} is empty or padded")
    if len(set(names)) != len(names) or not names:
        raise AgendaFormatError(f"{path}: relation names must be unique and non-empty, got {names}")
    return names


def _parse_row(row: str, number: int, index: int, vocab: Sequence[str], path: str) -> AgendaRecord:
    def fail(problem: str) -> AgendaFormatError:
        return AgendaFormatError(f"{path} line {number}: {problem}")

    columns = row.split("\t")
    if len(columns) != 6:
        raise fail(f"expected 6 tab-separated columns (title, entities, types, relations, abstract, order), found {len(columns)}")
    title, entity_col, type_col, relation_col, abstract, _order = columns
    entities = tuple(e.strip() for e in entity_col.split(" ; "))
    types = tuple(type_col.split())
    if any(not e for e in entities):
        raise fail("empty entity in the entity list")
    if len(entities) != len(types):
        raise fail(f"{len(entities)} entities but {len(types)} entity types")
    for kind in types:
        if not ENTITY_TYPE.fullmatch(kind):
            raise fail(f"entity type {kind!r} is not of the form <name>")
    relations = []
    for triple in relation_col.split(";"):
        parts = triple.split()
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise fail(f"relation {triple.strip()!r} is not three non-negative integers 'head relation tail'")
        head, rel, tail = map(int, parts)
        if head >= len(entities) or tail >= len(entities):
            raise fail(f"relation {triple.strip()!r} names entity {max(head, tail)}; the row has {len(entities)} entities")
        if rel >= len(vocab):
            raise fail(f"relation {triple.strip()!r} names relation type {rel}; {VOCAB_NAME} has {len(vocab)}")
        relations.append(Relation(head, vocab[rel], tail))
    tokens = tuple(abstract.split())
    if not tokens:
        raise fail("empty abstract")
    for token in tokens:
        match = PLACEHOLDER.fullmatch(token)
        if match:
            k = int(match.group(2))
            if k >= len(entities):
                raise fail(f"placeholder {token} names entity {k}; the row has {len(entities)} entities")
            if types[k] != f"<{match.group(1)}>":
                raise fail(f"placeholder {token} has type {match.group(1)!r} but entity {k} is {types[k]}")
    return AgendaRecord(index, number, title, entities, types, tuple(relations), tokens)


def parse_agenda(text: str, vocab: Sequence[str], *, path: str = TSV_NAME) -> list[AgendaRecord]:
    """Parse the TSV text into records, raising :class:`AgendaFormatError` with the line number."""
    rows = text.split("\n")
    if rows and rows[-1] == "":
        rows.pop()
    records = []
    for number, row in enumerate(rows, start=1):
        if not row.strip():
            raise AgendaFormatError(f"{path} line {number}: empty row")
        records.append(_parse_row(row, number, len(records), vocab, path))
    if not records:
        raise AgendaFormatError(f"{path}: no rows")
    return records


def load_agenda(directory: str | os.PathLike[str], *, verify: bool = True) -> list[AgendaRecord]:
    """Verify (unless told not to) and parse the AGENDA test split in ``directory``."""
    directory = verify_agenda(directory) if verify else Path(directory)
    vocab_path, tsv_path = directory / VOCAB_NAME, directory / TSV_NAME
    vocab = parse_relation_vocab(vocab_path.read_text(encoding="utf-8"), path=str(vocab_path))
    return parse_agenda(tsv_path.read_text(encoding="utf-8"), vocab, path=str(tsv_path))


def detokenize(tokens: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """Join PTB tokens into ordinary text (brackets restored, no space before punctuation).

    Returns the text and each token's character span in it, so callers can locate what they put in.
    """
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    position = 0
    previous = None
    for raw in tokens:
        token = PTB_TOKENS.get(raw, raw)
        if previous is not None and token not in _NO_SPACE_BEFORE and previous not in _NO_SPACE_AFTER:
            pieces.append(" ")
            position += 1
        pieces.append(token)
        spans.append((position, position + len(token)))
        position += len(token)
        previous = token
    return "".join(pieces), spans


def surface_tokens(record: AgendaRecord) -> list[str]:
    """The abstract's tokens with every placeholder replaced by its entity's words."""
    out: list[str] = []
    for token in record.tokens:
        k = record.mention(token)
        out.extend(record.entities[k].split() if k is not None else [token])
    return out


def surface_text(record: AgendaRecord) -> str:
    """The abstract as ordinary text with entity mentions restored (what the syntax parse reads)."""
    return detokenize(surface_tokens(record))[0]
