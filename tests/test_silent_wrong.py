"""Issue 25's silent wrong numbers, one row each: every case the issue found passing with exit 0 and
wrong numbers now stops with a non-zero exit and one line naming the file or checkpoint.

Each row corrupts a private copy of a hub-layout cache (the Pythia-format fixture or the toy zoo,
hard-linked, so a copy costs nothing; a corrupted blob is replaced, never written through the link)
or of a results folder made by the CLI, then runs the real command in-process. Rows marked
``flagged`` end in exit 0 by design: a branch that serves another step's weights is indistinguishable
from pythia-2.8b's published defect, which the project flags (``suspect``) and leaves out of the
analysis rather than refusing (README, "What comes out"); the row checks that it is flagged now
although the other step is never measured.

Every row was run once against the code before the fix (commit ed231de): each command exited 0 with
no error (the drip ran until the fake hub closed), so each row failed there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import PYTHIA_MODEL, SHARED

from icl_dynamics import hub
from icl_dynamics.checkpoints import model_slug
from icl_dynamics.cli import main
from icl_dynamics.toyzoo import TOY_MODEL_ID

TOY = ["--schedule", "toy"]
HEADS = ["--device", "cpu", "--n-tokens", "10", "--n-samples", "2"]


def copy_cache(src: Path, dst: Path) -> Path:
    """A private copy of a hub cache: links kept, blobs hard-linked (corrupt them with :func:`rewrite`)."""
    shutil.copytree(src, dst, symlinks=True, copy_function=os.link)
    return dst


def snapshot(cache: Path, model: str, step: int) -> Path:
    repo = hub.repo_cache_dir(model, cache)
    return repo / "snapshots" / (repo / "refs" / f"step{step}").read_text().strip()


def rewrite(path: Path, data: bytes) -> None:
    """Replace the content of the blob ``path`` links to, keeping its name (the hash it was fetched under)."""
    blob = path.resolve()
    blob.unlink()
    blob.write_bytes(data)


def mirror(cache: Path, model: str, step: int, name: str, data: bytes) -> None:
    """A bad mirror: ``data`` served as ``name`` of ``step`` under its own hash (a blob named by it)."""
    lfs = not name.endswith(".json")
    repo, link = hub.repo_cache_dir(model, cache), snapshot(cache, model, step) / name
    blob = repo / "blobs" / (hashlib.sha256(data).hexdigest() if lfs else hub.git_blob_sha1(data))
    if not blob.exists():
        blob.write_bytes(data)
    link.unlink()
    link.symlink_to(os.path.relpath(blob, link.parent))


def flipped(data: bytes, start: int, length: int) -> bytes:
    out = bytearray(data)
    for i in range(start, start + length):
        out[i] ^= 0xFF
    return bytes(out)


def safetensors_data_start(data: bytes) -> int:
    """Where a safetensors file's tensor data begins (after its 8-byte length and JSON header)."""
    return 8 + int.from_bytes(data[:8], "little")


def edited_json(path: Path, edit: Callable[[dict], None]) -> bytes:
    content = json.loads(path.read_text())
    edit(content)
    return json.dumps(content).encode()


@dataclass
class World:
    tmp: Path
    pythia: Path  # the session's Pythia-format cache (read only: copy it to corrupt it)
    toy: Path  # the toy zoo's hub (read only)
    pythia_text: Path  # text tokens of each, for the loss stage
    toy_text: Path
    results: Path  # a results folder of the Pythia-format model: steps 0, 2 and 1000, heads, loss and icl tasks
    toy_provenance: Path  # the toy zoo's merged provenance (another model)
    servers: list = field(default_factory=list)  # fake hubs a row started, closed after it

    def copy(self, which: str) -> Path:
        source = self.pythia if which == "pythia" else self.toy
        dst = self.tmp / f"{which}-{len(list(self.tmp.glob(which + '-*')))}"
        return copy_cache(source, dst)

    def results_copy(self) -> Path:
        """A copy of the results folder's per-checkpoint files (the merged tables left out)."""
        dst = self.tmp / f"results-{len(list(self.tmp.glob('results-*')))}"
        shutil.copytree(self.results, dst)
        for merged in (dst / model_slug(PYTHIA_MODEL)).glob("*.parquet"):
            merged.unlink()
        return dst / model_slug(PYTHIA_MODEL)


def run(args: list) -> int:
    return main([str(a) for a in args])


def fetch(model: str, step: int, cache: Path, out: Path, schedule: list[str] = ()) -> Path:
    assert run(["fetch", "--model", model, "--step", step, *schedule, "--cache-dir", cache, "--out", out]) == 0
    return out


@pytest.fixture(scope="module")
def world(pythia_cache: Path, toy_zoo: Path, tmp_path_factory) -> World:
    tmp = tmp_path_factory.mktemp("silent")
    agenda = tmp / "agenda.jsonl"  # natural text for the Pythia-format model
    from icl_dynamics.agenda import load_agenda, surface_text

    agenda.write_text("".join(json.dumps({"text": surface_text(r)}) + "\n" for r in load_agenda(SHARED / "data/agenda")[:50]))
    texts = {}
    for name, model, cache, source, schedule in (("pythia", PYTHIA_MODEL, pythia_cache, agenda, []),
                                                 ("toy", TOY_MODEL_ID, toy_zoo / "hub", toy_zoo / "text.jsonl", TOY)):
        texts[name] = tmp / f"{name}-text.parquet"
        assert run(["tokenize-text", "--model", model, "--step", 0, *schedule, "--cache-dir", cache, "--kind", "jsonl",
                    "--path", source, "--n-docs", 4, "--context", 64, "--out", texts[name]]) == 0
    folder = tmp / "results" / model_slug(PYTHIA_MODEL)
    for step in (0, 2, 1000):
        out = folder / f"step{step}"
        fetch(PYTHIA_MODEL, step, pythia_cache, out / "provenance.parquet")
        assert run(["score", "--model", PYTHIA_MODEL, "--step", step, "--cache-dir", pythia_cache, "--device", "cpu",
                    "--provenance", out / "provenance.parquet", "--stages", "heads", "loss", "icl-tasks",
                    "--text-tokens", texts["pythia"], "--loss-early", 4, "--loss-late", 60, "--loss-bootstrap", 100,
                    "--heads-n-tokens", 10, "--heads-n-samples", 2, "--icl-tasks-shots", 0, 1, 2, 3, 4, 5,
                    "--icl-tasks-n-prompts", 2, "--out-dir", out]) == 0
    for stage, parts in (("heads", ["heads"]), ("icl", ["loss", "icl_tasks"]), ("provenance", ["provenance"])):
        inputs = [folder / f"step{s}" / f"{p}.parquet" for s in (0, 2, 1000) for p in parts]
        assert run(["merge", "--stage", stage, "--out", folder / f"{stage}.parquet", *inputs]) == 0
    toy_folder = tmp / "results" / model_slug(TOY_MODEL_ID)
    for step in (0, 100):
        fetch(TOY_MODEL_ID, step, toy_zoo / "hub", toy_folder / f"step{step}" / "provenance.parquet", TOY)
    assert run(["merge", "--stage", "provenance", "--schedule", "toy", "--out", toy_folder / "provenance.parquet",
                *[toy_folder / f"step{s}" / "provenance.parquet" for s in (0, 100)]]) == 0
    return World(tmp, pythia_cache, toy_zoo / "hub", texts["pythia"], texts["toy"], tmp / "results",
                 toy_folder / "provenance.parquet")


# --- the rows: each returns (arguments, a fragment of the one error line) ----------------------------------


def config_edited(w: World, key: str, value, extra: list) -> tuple[list, str]:
    cache = w.copy("toy")
    prov = fetch(TOY_MODEL_ID, 1000, cache, w.tmp / f"prov-{cache.name}.parquet", TOY)
    config = snapshot(cache, TOY_MODEL_ID, 1000) / "config.json"
    rewrite(config, edited_json(config, lambda c: c.update({key: value})))
    return (["heads", "--model", TOY_MODEL_ID, "--step", 1000, *TOY, "--cache-dir", cache, "--provenance", prov,
             *HEADS, *extra, "--out", w.tmp / f"{cache.name}.parquet"],
            "@step1000: config.json")


def tokenizer_rotated(w: World) -> tuple[list, str]:
    cache = w.copy("toy")
    prov = fetch(TOY_MODEL_ID, 1000, cache, w.tmp / f"prov-{cache.name}.parquet", TOY)
    path = snapshot(cache, TOY_MODEL_ID, 1000) / "tokenizer.json"

    def rotate(tokenizer: dict) -> None:  # every ordinary token's id moves to the next one's
        vocab = tokenizer["model"]["vocab"]
        special = {t["content"] for t in tokenizer["added_tokens"]}
        words = [w for w in vocab if w not in special]
        ids = [vocab[w] for w in words]
        vocab.update(zip(words, ids[1:] + ids[:1]))

    rewrite(path, edited_json(path, rotate))
    return (["icl-tasks", "--model", TOY_MODEL_ID, "--step", 1000, *TOY, "--cache-dir", cache, "--provenance", prov,
             "--device", "cpu", "--shots", 0, 3, "--n-prompts", 5, "--out", w.tmp / f"{cache.name}.parquet"],
            "@step1000: tokenizer.json")


def tokenizer_missing(w: World) -> tuple[list, str]:
    cache = w.copy("pythia")
    (snapshot(cache, PYTHIA_MODEL, 1000) / "tokenizer.json").unlink()
    return (["fetch", "--model", PYTHIA_MODEL, "--step", 1000, "--cache-dir", cache,
             "--out", w.tmp / f"{cache.name}.parquet"], "tokenizer.json missing from the cached snapshot")


def by_hand(w: World, which: str, corrupt: Callable[[Path, Path], None], name: str) -> tuple[list, str]:
    """A stage run by hand, without --provenance, on a cache whose step-1000 blob changed after the fetch."""
    cache = w.copy(which)
    model = PYTHIA_MODEL if which == "pythia" else TOY_MODEL_ID
    corrupt(cache, snapshot(cache, model, 1000))
    schedule = [] if which == "pythia" else TOY
    return (["heads", "--model", model, "--step", 1000, *schedule, "--cache-dir", cache, *HEADS,
             "--out", w.tmp / f"{cache.name}.parquet"], f"@step1000: {name}")


def flip_safetensors(cache: Path, snap: Path) -> None:
    data = (snap / "model.safetensors").read_bytes()
    rewrite(snap / "model.safetensors", flipped(data, safetensors_data_start(data), 1024))


def flip_bin(cache: Path, snap: Path) -> None:
    data = (snap / "pytorch_model.bin").read_bytes()
    rewrite(snap / "pytorch_model.bin", flipped(data, len(data) // 2, 64))


def step900_over_step1000(cache: Path, snap: Path) -> None:
    for name in ("model.safetensors", "pytorch_model.bin"):
        rewrite(snap / name, (snapshot(cache, TOY_MODEL_ID, 900) / name).read_bytes())


def bad_mirror_flipped(w: World) -> tuple[list, str]:
    cache = w.copy("toy")
    data = (snapshot(cache, TOY_MODEL_ID, 1000) / "model.safetensors").read_bytes()
    mirror(cache, TOY_MODEL_ID, 1000, "model.safetensors", flipped(data, safetensors_data_start(data), 1024))
    prov = fetch(TOY_MODEL_ID, 1000, cache, w.tmp / f"prov-{cache.name}.parquet", TOY)  # the hashes agree
    return (["loss", "--model", TOY_MODEL_ID, "--step", 1000, *TOY, "--cache-dir", cache, "--provenance", prov,
             "--device", "cpu", "--text-tokens", w.toy_text, "--early", 4, "--late", 60, "--bootstrap", 100,
             "--out", w.tmp / f"{cache.name}.parquet", "--out-curve", w.tmp / f"{cache.name}-curve.parquet"],
            "mean loss")


def bad_mirror_int32(w: World) -> tuple[list, str]:
    import torch
    from safetensors.torch import load, save

    cache = w.copy("toy")
    state = load((snapshot(cache, TOY_MODEL_ID, 1000) / "model.safetensors").read_bytes())
    name = "gpt_neox.layers.0.attention.dense.weight"
    state[name] = (state[name] * 100).round().to(dtype=torch.int32)
    mirror(cache, TOY_MODEL_ID, 1000, "model.safetensors", save(state, metadata={"format": "pt"}))
    prov = fetch(TOY_MODEL_ID, 1000, cache, w.tmp / f"prov-{cache.name}.parquet", TOY)
    return (["heads", "--model", TOY_MODEL_ID, "--step", 1000, *TOY, "--cache-dir", cache, "--provenance", prov,
             *HEADS, "--out", w.tmp / f"{cache.name}.parquet"], f"{name} (int32)")


def resaved_weights_of_another_step(w: World) -> tuple[list, str]:
    """step 1000's branch serves step 900's weights re-saved (other bytes, the same function)."""
    from safetensors.torch import load, save

    cache = w.copy("toy")
    state = load((snapshot(cache, TOY_MODEL_ID, 900) / "model.safetensors").read_bytes())
    mirror(cache, TOY_MODEL_ID, 1000, "model.safetensors", save(state, metadata={"format": "pt", "mirror": "yes"}))
    folder = w.tmp / f"results-{cache.name}" / model_slug(TOY_MODEL_ID)
    for step in (900, 1000):
        prov = fetch(TOY_MODEL_ID, step, cache, folder / f"step{step}" / "provenance.parquet", TOY)
        assert run(["heads", "--model", TOY_MODEL_ID, "--step", step, *TOY, "--cache-dir", cache, "--provenance", prov,
                    *HEADS, "--out", folder / f"step{step}" / "heads.parquet"]) == 0
    return (["merge", "--stage", "heads", "--schedule", "toy", "--out", folder / "heads.parquet",
             *[folder / f"step{s}" / "heads.parquet" for s in (900, 1000)]],
            "give the same outputs on the fixed probe")


def wrong_ref(w: World) -> tuple[list, str]:
    """refs/step1000 points at step 900's commit; step 900 is cached but not measured (flagged, exit 0)."""
    cache = w.copy("toy")
    hub._write_ref(TOY_MODEL_ID, "step1000", snapshot(cache, TOY_MODEL_ID, 900).name, cache)
    provs = [fetch(TOY_MODEL_ID, step, cache, w.tmp / f"prov-{cache.name}-{step}.parquet", TOY) for step in (800, 1000)]
    return (["merge", "--stage", "provenance", "--schedule", "toy", "--out", w.tmp / f"{cache.name}.parquet", *provs],
            "step 1000 serves the same weights as non-consecutive step(s) 900 (cached, not measured): SUSPECT")


def table_edit(w: World, edit: Callable[[pa.Table], pa.Table], fragment: str) -> tuple[list, str]:
    """A merge whose step-2 heads table was edited (its provenance kept)."""
    folder = w.results_copy()
    path = folder / "step2" / "heads.parquet"
    table = pq.read_table(path)
    pq.write_table(edit(table).replace_schema_metadata(table.schema.metadata), path)
    return (["merge", "--stage", "heads", "--out", folder / "heads.parquet",
             *[folder / f"step{s}" / "heads.parquet" for s in (0, 2, 1000)]], fragment)


def set_column(table: pa.Table, name: str, value) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(name), pa.array([value] * table.num_rows, table.schema.field(name).type))


def rescored_with_other_options(w: World) -> tuple[list, str]:
    folder = w.results_copy()
    prov = folder / "step2" / "provenance.parquet"
    assert run(["heads", "--model", PYTHIA_MODEL, "--step", 2, "--cache-dir", w.pythia, "--provenance", prov,
                "--device", "cpu", "--n-tokens", 5, "--n-samples", 2, "--out", folder / "step2" / "heads.parquet"]) == 0
    return (["merge", "--stage", "heads", "--out", folder / "heads.parquet",
             *[folder / f"step{s}" / "heads.parquet" for s in (0, 2, 1000)]],
            "were measured with different heads options (probe.n_tokens=10 vs 5)")


def analyze(w: World, provenance: Path, extra: list, fragment: str) -> tuple[list, str]:
    folder = w.results / model_slug(PYTHIA_MODEL)
    return (["analyze", "--icl", folder / "icl.parquet", "--heads", folder / "heads.parquet", "--provenance",
             provenance, "--k", 0, "--n-boot", 10, "--n-perm", 99, *extra,
             "--out-dir", w.tmp / f"analysis-{len(list(w.tmp.glob('analysis-*')))}"], fragment)


def dripping_download(w: World, monkeypatch) -> tuple[list, str]:
    from fakehub import FakeHub, Fault
    from test_network import point_hub_at

    server = FakeHub(w.toy).__enter__()
    w.servers.append(server)
    point_hub_at(monkeypatch, server.endpoint)
    server.faults.append(Fault("drip", match="/__cdn__/", times=1000, seconds=0.2))
    return (["fetch", "--model", TOY_MODEL_ID, "--step", 1000, *TOY, "--cache-dir", w.tmp / "drip-cache",
             "--attempts", 2, "--timeout", 1, "--out", w.tmp / "drip.parquet"],
            "below the minimum transfer rate")


ROWS: dict[str, Callable] = {
    # 1. files other than the weights were trusted after a clean fetch (the workflow's own --provenance)
    "config.json edited after fetch (layer_norm_eps)": lambda w, mp: config_edited(w, "layer_norm_eps", 1.0, []),
    "config.json edited after fetch (max_position_embeddings past the context)":
        lambda w, mp: config_edited(w, "max_position_embeddings", 4096, ["--n-tokens", 100]),
    "tokenizer.json ids rotated after fetch": lambda w, mp: tokenizer_rotated(w),
    "tokenizer.json missing at fetch": lambda w, mp: tokenizer_missing(w),
    # 2. stages run by hand verified nothing without --provenance
    "by hand: flipped bytes in model.safetensors": lambda w, mp: by_hand(w, "toy", flip_safetensors, "model.safetensors"),
    "by hand: flipped bytes in pytorch_model.bin": lambda w, mp: by_hand(w, "pythia", flip_bin, "pytorch_model.bin"),
    "by hand: step 900's bytes over step 1000's blob":
        lambda w, mp: by_hand(w, "toy", step900_over_step1000, "model.safetensors"),
    # 3. wrong content under its own name passed an offline fetch
    "bad mirror: flipped bytes in safetensors under their own hash": lambda w, mp: bad_mirror_flipped(w),
    "bad mirror: a tensor stored as int32": lambda w, mp: bad_mirror_int32(w),
    "wrong ref: step 1000 points at step 900's commit, 900 not measured (flagged)": lambda w, mp: wrong_ref(w),
    "another step's weights re-saved under step 1000": lambda w, mp: resaved_weights_of_another_step(w),
    # 4. merge and analyze checked schemas, not content
    "merge: a heads table without rows": lambda w, mp: table_edit(w, lambda t: t.slice(0, 0), "has no rows"),
    "merge: prefix_matching all NaN":
        lambda w, mp: table_edit(w, lambda t: set_column(t, "prefix_matching", float("nan")),
                                 "column 'prefix_matching' is NaN in every row"),
    "merge: a step file naming another model":
        lambda w, mp: table_edit(w, lambda t: set_column(t, "model", "EleutherAI/pythia-other"),
                                 "its rows are EleutherAI/pythia-other@step2, but the file lies in the folder of"),
    "analyze: a merged table of another model (its provenance: which steps to leave out)":
        lambda w, mp: analyze(w, w.toy_provenance, [], "the merged tables name different models"),
    "merge: a step rescored by hand with other options": lambda w, mp: rescored_with_other_options(w),
    "analyze: analysis.shots 7 where the tasks measured 0-5":
        lambda w, mp: analyze(w, w.results / model_slug(PYTHIA_MODEL) / "provenance.parquet", ["--shots", 7],
                              "analysis shots 7 (analysis.shots / --shots) were not measured"),
    # 5. a download that drips hung
    "fetch: a download that drips": dripping_download,
}
FLAGGED = {"wrong ref: step 1000 points at step 900's commit, 900 not measured (flagged)"}


@pytest.fixture
def servers(world):
    yield
    while world.servers:
        world.servers.pop().__exit__(None, None, None)


@pytest.mark.parametrize("row", ROWS)
def test_each_silent_wrong_case_now_stops_with_one_line(row, world, servers, monkeypatch, caplog):
    assert len(ROWS) >= 16
    args, fragment = ROWS[row](world, monkeypatch)
    caplog.clear()
    outcome: list[int] = []
    with caplog.at_level(logging.WARNING):
        worker = threading.Thread(target=lambda: outcome.append(run(args)), daemon=True)
        worker.start()
        worker.join(timeout=120)
    assert outcome, f"{row}: still running after 120 s"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    if row in FLAGGED:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert outcome == [0] and not errors and any(fragment in w for w in warnings), (outcome, errors, warnings)
        merged = pq.read_table(args[args.index("--out") + 1]).to_pylist()
        assert {r["step"]: r["suspect"] for r in merged} == {800: False, 1000: True}
        return
    assert outcome == [1] and len(errors) == 1, (outcome, errors)
    assert fragment in errors[0] and "\n" not in errors[0] and not errors[0].startswith("unexpected"), errors[0]
    if "--out" in args:  # nothing was written
        assert not Path(args[args.index("--out") + 1]).exists()


def test_the_warnings_about_duplicate_weights_name_the_steps(world, tmp_path, caplog):
    """The merge's warning names the steps and the weights; the analysis names each checkpoint it leaves out."""
    import pandas as pd

    from icl_dynamics.cli import _log_left_out

    provs = [fetch(PYTHIA_MODEL, step, world.pythia, tmp_path / f"prov{step}.parquet") for step in (0, 1, 2)]
    with caplog.at_level(logging.WARNING):
        assert run(["merge", "--stage", "provenance", "--out", tmp_path / "prov.parquet", *provs]) == 0
        _log_left_out(pd.read_parquet(tmp_path / "prov.parquet"), include_suspect=False)
    digest = pq.read_table(provs[0]).column("weights_digest")[0].as_py()[:12]
    assert f"{PYTHIA_MODEL} step 1 serves the same weights as step 0 (benign: consecutive checkpoints; weights " \
           f"digest {digest})" in caplog.text
    assert f"{PYTHIA_MODEL} step 1 is left out: it serves the same weights as step 0" in caplog.text


def test_the_heatmap_families_must_be_known_and_one_measured(caplog):
    """The workflow asks for kg and syntax; the toy zoo's tokenizer keeps no syntax triplet, so its heatmap is
    drawn empty (a warning says why), and so are both when neither was measured (the toy zoo's tokenizer on
    AGENDA keeps only kg-letters triplets): the rest of the analysis stands. A family no stage makes is refused."""
    import pandas as pd

    from icl_dynamics.validation import ContentError, check_analysis_options

    icl = pd.DataFrame({"model": ["m"], "task": ["text"], "shots": [None]})
    ri = pd.DataFrame({"model": ["m"], "family": ["kg"], "direction": ["forward"], "gate": ["argmax"],
                       "variant": ["source"]})
    with caplog.at_level(logging.WARNING):
        check_analysis_options(icl, icl[["model"]], ri, families=["kg", "syntax"], gate="argmax")
    assert "the relation index has no syntax rows" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_analysis_options(icl, icl[["model"]], ri, families=["planted", "decoy"])
    assert "no planted rows" in caplog.text and "no decoy rows" in caplog.text
    with pytest.raises(ContentError, match="relation family sytnax .* is none the relations stage makes"):
        check_analysis_options(icl, icl[["model"]], ri, families=["sytnax"])
    with pytest.raises(ContentError, match="relation index gate margin .* was not measured"):
        check_analysis_options(icl, icl[["model"]], ri, gate="margin")
