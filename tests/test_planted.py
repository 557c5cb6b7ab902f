"""The relations toy zoo: planted relations, the positive control of the relation index over training."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from icl_dynamics import emergence, planted
from icl_dynamics.models import load_checkpoint, load_tokenizer
from icl_dynamics.relation_index import score_relation_index
from icl_dynamics.relations import build_planted_relations, read_texts
from icl_dynamics.toyzoo import RELATIONS_MODEL_ID, TOY_RELATIONS, toy_vocabulary, training_batch, zoo_config

CFG = zoo_config(TOY_RELATIONS)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
STEPS = CFG.steps


def test_maps_have_their_shapes_and_follow_the_seed():
    relations = planted.make_relations(CFG.seed)
    assert {r.family for r in relations} == {planted.PLANTED, planted.DECOY}
    for r in relations:
        counts = Counter(r.mapping)
        assert sorted(counts) == list(range(len(r.tails)))  # every tail has a head
        assert set(counts.values()) == {len(r.heads) // len(r.tails)}  # equal groups; 1 each when one-to-one
    shapes = Counter((r.family, r.shape) for r in relations)
    assert shapes == {(planted.PLANTED, planted.ONE_TO_ONE): 1, (planted.PLANTED, planted.MANY_TO_ONE): 1,
                      (planted.DECOY, planted.MANY_TO_ONE): 1}
    assert planted.make_relations(CFG.seed) == relations
    assert [r.mapping for r in planted.make_relations(CFG.seed + 1)] != [r.mapping for r in relations]


def test_batches_plant_the_documented_layout():
    relations = CFG.relations()
    vocab = toy_vocabulary(CFG)
    by_marker = {r.marker: r for r in relations}
    x, masks = training_batch(torch.Generator().manual_seed(0), CFG, vocab, relations)
    words = [[vocab[i] for i in row] for row in x.tolist()]
    relation_words = set(planted.relation_words(relations))
    n_events = CFG.relations_per_sequence * CFG.events_per_relation
    for b, row in enumerate(words):
        markers = [p for p, w in enumerate(row) if w in by_marker]
        assert len(markers) == n_events and row[0] == "<|endoftext|>"
        tails_seen = {}
        for p in markers:
            rel = by_marker[row[p]]
            head = row[p - 1]
            tail = dict(rel.pairs())[head]
            assert tail in row[1:CFG.mention_end]  # the tail is mentioned early
            tails_seen.setdefault(rel.name, set()).add(tail)
            if rel.family == planted.PLANTED:
                assert row[p + 1] == tail and masks["relation_loss"][b, p + 1]
            else:
                assert row[p + 1] not in relation_words and masks["decoy_loss"][b, p + 1]
        # both events of a relation have different tails: each other's matched control
        assert all(len(t) == CFG.events_per_relation for t in tails_seen.values())
        # mentions: the planted events' tails only; every tail of a decoy in the sequence
        mentioned = Counter(w for w in row[1:CFG.mention_end] if w in relation_words)
        expected = Counter()
        for rel in relations:
            if rel.name in tails_seen:
                expected.update(tails_seen[rel.name] if rel.family == planted.PLANTED else rel.tails)
        assert mentioned == expected
    assert int(masks["relation_loss"].sum() + masks["decoy_loss"].sum()) == len(words) * n_events


def test_phase_change_is_the_steepest_late_drop():
    steps = np.arange(0, 2000, 10)
    rng = np.random.default_rng(0)
    early = 3.0 * np.exp(-steps / 30.0)  # the fast early drop the estimate must skip
    late = 1.8 / (1 + np.exp((steps - 1234) / 25.0)) + 0.02
    loss = (early + late) * np.exp(rng.normal(0, 0.05, len(steps)))
    assert abs(planted.phase_change_step(steps, loss) - 1234) < 30
    with pytest.raises(ValueError, match="finite"):
        planted.phase_change_step(steps[:5], loss[:5])


def test_relation_tables_hold_every_co_mentioned_pair(toy_zoo_relations):
    """Through the pipeline's tokenizer loader: one triplet per planted pair whose two words occur,
    at their first mentions, counted independently from the raw texts."""
    tokenizer = load_tokenizer(RELATIONS_MODEL_ID, 0, cache_dir=toy_zoo_relations / "hub")
    texts = read_texts(toy_zoo_relations / "relations.jsonl")
    relations = planted.read_map(toy_zoo_relations / "planted.json")
    assert relations == CFG.relations()
    tables = build_planted_relations(toy_zoo_relations / "planted.json", texts, tokenizer)
    expected = Counter()
    for text in texts:
        words = text.split(" ")
        for r in relations:
            expected[r.name] += sum(h in words and t in words for h, t in r.pairs())
    summary = tables.summary.to_pandas()
    kept = summary[summary["reason"] == ""].set_index("relation")["kept"]
    assert kept.to_dict() == dict(expected) and min(expected.values()) > 200
    assert (summary["dropped"] == 0).all()
    seqs = tables.sequences.to_pandas().set_index("sequence_id")
    trips = tables.triplets.to_pandas()
    fwd = trips[trips["direction"] == "forward"]
    family = {r.name: r.family for r in relations}
    assert (fwd["family"] == fwd["relation"].map(family)).all()
    for t in fwd.itertuples():
        ids = list(seqs.loc[t.sequence_id, "token_ids"])
        assert (ids[t.s], ids[t.o]) == (t.head_id, t.tail_id)
        assert ids.index(t.head_id) == t.s and ids.index(t.tail_id) == t.o  # first mentions
        assert dict(next(r for r in relations if r.name == t.relation).pairs())[t.head_str.strip()] == t.tail_str.strip()


@pytest.fixture(scope="module")
def planted_ri(toy_zoo_relations) -> pd.DataFrame:
    """The relation index (argmax gate, source variant) of every checkpoint of the relations zoo,
    through the pipeline's loaders and relation tables."""
    cache = toy_zoo_relations / "hub"
    tokenizer = load_tokenizer(RELATIONS_MODEL_ID, 0, cache_dir=cache)
    tables = build_planted_relations(toy_zoo_relations / "planted.json",
                                     read_texts(toy_zoo_relations / "relations.jsonl"), tokenizer)
    rows = []
    for step in STEPS:
        model = load_checkpoint(RELATIONS_MODEL_ID, step, cache_dir=cache, device="cpu", tokenizer=False).model
        out = score_relation_index(model, tables.sequences, tables.triplets, gates=("argmax",), variants=("source",))
        rows += [{"model": RELATIONS_MODEL_ID, "step": step, "tokens": step * CFG.tokens_per_step, **r} for r in out]
    return pd.DataFrame(rows)


def test_the_relation_index_flags_the_planted_relations_and_only_them(planted_ri):
    ri = planted_ri
    assert (ri["sih_status"] != "insufficient").mean() > 0.5  # most cells were tested
    assert not ri.loc[ri["step"] == 0, "sih"].any()  # nothing at random init
    final = ri[(ri["step"] == STEPS[-1]) & (ri["direction"] == "forward") & (ri["family"] == planted.PLANTED)]
    assert final.groupby("relation")["sih"].any().to_dict() == {"capital": True, "continent": True}
    # the decoy: its words in the same slots, never linked by the data -- never flagged, at any step
    # or in either direction, though tested in half its cells (132 of 256; the others are heads
    # that never attend to a decoy head token from enough documents)
    decoy = ri[ri["family"] == planted.DECOY]
    assert (decoy["sih_status"] != "insufficient").sum() >= 100
    assert not decoy["sih"].any()


def test_formation_lands_on_the_phase_change_of_the_relation_loss(planted_ri, toy_zoo_relations):
    """The formation analysis times each planted relation's flagged heads within one checkpoint of
    the phase change in the training loss on the planted tails."""
    training = pd.read_parquet(toy_zoo_relations / "training.parquet")
    phase = planted.phase_change_step(training["step"], training["relation_loss"])
    grid = np.asarray(STEPS)
    i = int(np.searchsorted(grid, phase)) - 1  # the phase change lies between grid[i] and grid[i + 1]
    assert 1 <= i < len(grid) - 2, (phase, grid)  # checkpoints before, during and after it
    low, high = grid[i - 1], grid[i + 2]
    heads = pd.DataFrame(columns=emergence.HEADS_COLUMNS)
    traj = emergence.head_trajectories(heads, planted_ri)
    formation = emergence.formation_table(traj, n_boot=50)
    final = planted_ri[(planted_ri["step"] == STEPS[-1]) & planted_ri["sih"] & (planted_ri["direction"] == "forward")
                       & (planted_ri["family"] == planted.PLANTED)]
    for relation, flagged in final.groupby("relation"):
        located = formation[formation["score"] == f"{emergence.RI_PREFIX}{relation}"].merge(
            flagged[["layer", "head"]], on=["layer", "head"])
        assert len(located), relation
        assert located["transition_step"].between(low, high).all(), (relation, phase, located["transition_step"])


def test_snakemake_demo_runs_on_the_relations_zoo(toy_zoo_relations, tmp_path):
    """config/toy-relations.yaml drives the whole workflow on this zoo (three checkpoints): planted
    triplets instead of AGENDA's, and the planted-relation figures in the report. The checkpoints
    come from a fake hub on 127.0.0.1 serving the zoo, into an empty cache, with keep_weights false
    and max_cached_checkpoints 2: polled while the workflow runs, the cache never holds the weights
    of more than 2 of the run's checkpoints, and none once every checkpoint is scored. The cache is
    shared: two revisions someone else fetched into it before (one of them a step this run scores)
    are still there afterwards, whole."""
    import os
    import subprocess
    import sys

    from conftest import run_toy_workflow
    from fakehub import FakeHub

    steps = [0, 1100, STEPS[-1]]
    cache = tmp_path / "hf-cache"
    repo = cache / "models--icl-dynamics--toy-neox-relations"
    theirs = [1100, 200]  # fetched by another user before the run; 1100 is one the run scores, 200 is not

    def cached_weights() -> int:
        """The run's checkpoints whose weights are in the cache now (a snapshot linking to a weights blob)."""
        try:
            return sum(any(f.name in WEIGHT_FILES and f.exists() for f in snap.iterdir())
                       for snap in (repo / "snapshots").iterdir() if snap.name not in before)
        except FileNotFoundError:  # not created yet, or a snapshot evicted while we looked
            return 0

    with FakeHub(toy_zoo_relations / "hub") as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf-home")}
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            env.pop(key, None)
        for step in theirs:
            subprocess.run([sys.executable, "-m", "icl_dynamics.cli", "fetch", "--model", RELATIONS_MODEL_ID,
                            "--step", str(step), "--schedule", "toy-relations", "--cache-dir", str(cache),
                            "--out", str(tmp_path / f"theirs{step}.parquet")], env=env, check=True,
                           capture_output=True, timeout=300)
        before = {p.name: {f.name: f.resolve() for f in p.iterdir()} for p in (repo / "snapshots").iterdir()}
        seeded = len(hub.requests)
        command, most = run_toy_workflow(
            "toy-relations.yaml", toy_zoo_relations, steps, tmp_path,
            {"planted_map": str(toy_zoo_relations / "planted.json"),
             "planted_texts": str(toy_zoo_relations / "relations.jsonl")},
            hub_endpoint=hub.endpoint, max_cached=2, watch=cached_weights)
    assert 1 <= most <= 2, most
    downloads = [path for method, path in hub.requests[seeded:] if method == "GET" and path.startswith("/__cdn__/")]
    assert len(downloads) == len(steps) - 1  # the run's checkpoints' weights came from the hub once, but 1100's
    weight_blobs = [b for b in repo.glob("blobs/*") if b.stat().st_size > 100_000]  # the toy's are ~0.5 MB
    assert cached_weights() == 0 and len(weight_blobs) == len(theirs)
    assert sorted(p.name for p in repo.glob("snapshots/*")) == sorted(before)  # theirs, and nothing of ours
    for name, files in before.items():  # every file of theirs still there, the same blob
        assert {f.name: f.resolve() for f in (repo / "snapshots" / name).iterdir()} == files
        assert all(blob.is_file() for blob in files.values())
    assert {(repo / "refs" / f"step{s}").read_text() for s in theirs} == set(before)
    evicted = json.loads((tmp_path / "results" / "icl-dynamics--toy-neox-relations" / "step1100" /
                          "weights_evicted.json").read_text())
    assert evicted["deleted_blobs"] == 0 and "before this run" in evicted["kept"]

    out = tmp_path / "results" / "icl-dynamics--toy-neox-relations"
    summary = pd.read_parquet(out / "relations" / "summary.parquet")
    assert set(summary["family"]) == {planted.PLANTED, planted.DECOY}
    ri = pd.read_parquet(out / "relation_index.parquet")
    assert sorted(ri["step"].unique()) == steps and set(ri["relation"]) == {"capital", "continent", "decoy"}
    flagged = ri[ri["sih"] & (ri["gate"] == "argmax") & (ri["variant"] == "source") & (ri["direction"] == "forward")]
    assert set(flagged.loc[flagged["step"] == STEPS[-1], "relation"]) == {"capital", "continent"}
    figures = out / "figures"
    assert (figures / "icl-dynamics--toy-neox-relations_planted_control.png").stat().st_size > 1000
    analysis = tmp_path / "results" / "analysis"
    assert {"sih:planted", "sih:decoy"} <= set(pd.read_parquet(analysis / "summary.parquet")["subject"])
    for family in ("planted", "decoy"):
        assert (analysis / "figures" / f"ri_heatmaps-icl-dynamics--toy-neox-relations-{family}.png").exists()

    report = subprocess.run([*command, "--report", str(tmp_path / "report.html")], capture_output=True, text=True,
                            timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    html = (tmp_path / "report.html").read_text(errors="replace")
    assert "planted_control.png" in html and "ri_heatmaps-icl-dynamics--toy-neox-relations-planted.png" in html
