"""Every stage on a cache that mirrors a real Pythia repository, through the pipeline's own loaders.

The fixture (``icl_dynamics.pythia_format``) holds random GPT-NeoX weights stored as Pythia stores
them (fp16 ``pytorch_model.bin``, Pythia's key names, the published config) and the repository's
own tokenizer files. CI also runs this module alone against the oldest library versions that
``pyproject.toml`` declares (README, "Tests").
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PYTHIA_MODEL, PYTHIA_STEPS, REPO

from icl_dynamics import agenda, hub, relations
from icl_dynamics.cli import main
from icl_dynamics.icl_tasks import BASELINES
from icl_dynamics.io import read_provenance
from icl_dynamics.knowledge_graph import LETTERS
from icl_dynamics.models import load_checkpoint, load_tokenizer
from icl_dynamics.pythia_format import write_pythia_cache

pytestmark = pytest.mark.pythia_format

# Triplets the relations stage keeps on the AGENDA test split with the default settings (anchors on
# single tokens, whole abstracts), as with the tokenizer built directly from tokenizer.json: of the 4,398
# annotated relations, 2,646 on the entities' own words and all but the self-relations, duplicates and
# unmentioned entities as letters; 47,601 of spaCy's dependency arcs.
KEPT = {"kg": 2_646, "kg-letters": 4_398, "syntax": 47_601}
RECOVERED = {"kg": 14, "kg-letters": 42, "syntax": 713}  # kept only through spacing normalisation


def snapshot(cache: Path, step: int) -> Path:
    return hub.repo_cache_dir(PYTHIA_MODEL, cache) / "snapshots" / hub.cached_commit(PYTHIA_MODEL, f"step{step}", cache)


def run(*args: str) -> int:
    return main([str(a) for a in args])


def test_the_fixture_is_laid_out_and_stored_like_a_pythia_repository(pythia_cache: Path) -> None:
    snap = snapshot(pythia_cache, 1000)
    assert sorted(p.name for p in snap.iterdir()) == ["config.json", "pytorch_model.bin", "special_tokens_map.json",
                                                     "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((snap / "config.json").read_text())
    assert config["torch_dtype"] == "float16" and config["vocab_size"] == 50_304
    assert json.loads((snap / "tokenizer_config.json").read_text())["tokenizer_class"] == "GPTNeoXTokenizerFast"
    state = torch.load(snap / "pytorch_model.bin", weights_only=True)
    assert "embed_out.weight" in state and "lm_head.weight" not in state
    assert "gpt_neox.layers.0.attention.bias" in state and "gpt_neox.layers.1.attention.rotary_emb.inv_freq" in state
    assert state["gpt_neox.embed_in.weight"].dtype == torch.float16
    # step0 and step1 are byte-identical branches, as on the hub; the others differ
    assert snapshot(pythia_cache, 0) == snapshot(pythia_cache, 1) != snapshot(pythia_cache, 2)

    # the pipeline's loader: float16 files upcast exactly to float32 (auto), embed_out is the unembedding
    ckpt = load_checkpoint(PYTHIA_MODEL, 1000, cache_dir=pythia_cache, device="cpu")
    assert ckpt.model.dtype == torch.float32
    assert torch.equal(ckpt.model.get_output_embeddings().weight, state["embed_out.weight"].float())
    assert torch.equal(ckpt.model.gpt_neox.layers[1].attention.query_key_value.weight,
                       state["gpt_neox.layers.1.attention.query_key_value.weight"].float())
    assert ckpt.tokenizer("Hello world")["input_ids"] == [12092, 1533]  # shared/README's check
    assert ckpt.tokenizer.bos_token == ckpt.tokenizer.eos_token == "<|endoftext|>"


def test_word_spans_agree_with_the_tokenizer_file_whatever_the_loader_reports(neox_tokenizer, shared_dir) -> None:
    """transformers 5's AutoTokenizer puts the space before a word into the token's span; the
    relations stage must place anchors exactly as with the tokenizer file read directly."""
    from tokenizers import Tokenizer

    direct = Tokenizer.from_file(str(shared_dir / "data/tokenizers/gpt-neox-20b/tokenizer.json"))
    records = agenda.load_agenda(shared_dir / "data" / "agenda")[:50]
    for text in [agenda.surface_text(r) for r in records] + ["we present a B for C (D) and  E.\n F"]:
        encoded = relations.encode(text, neox_tokenizer, [])
        reference = direct.encode(text, add_special_tokens=False)
        assert encoded.token_ids == reference.ids
        assert encoded.offsets == [tuple(o) for o in reference.offsets]


def test_fetch_and_merge_flag_step1_as_a_benign_duplicate(pythia_cache: Path, tmp_path: Path) -> None:
    outs = []
    for step in PYTHIA_STEPS:
        outs.append(tmp_path / f"prov{step}.parquet")
        assert run("fetch", "--model", PYTHIA_MODEL, "--step", step, "--cache-dir", pythia_cache,
                   "--out", outs[-1]) == 0
    assert run("merge", "--stage", "provenance", "--out", tmp_path / "prov.parquet", *outs) == 0
    prov = pd.read_parquet(tmp_path / "prov.parquet").set_index("step")
    assert prov["weights_format"].eq("bin").all() and prov["hash_source"].eq("cache-etag").all()
    assert prov["duplicate_of_step"].isna().drop(1).all() and prov.loc[1, "duplicate_of_step"] == 0
    assert not prov["suspect"].any()


def test_a_branch_serving_another_steps_weights_is_suspect_on_both_steps(shared_dir, tmp_path, caplog) -> None:
    """pythia-2.8b's failure shape: an early branch serves the final step's weights."""
    cache = tmp_path / "hub"
    write_pythia_cache(cache, PYTHIA_MODEL, shared_dir, {0: 0, 1: 0, 2: 7, 1000: 3, 143000: 7})
    outs = []
    for step in (0, 1, 2, 1000, 143000):
        outs.append(tmp_path / f"prov{step}.parquet")
        assert run("fetch", "--model", PYTHIA_MODEL, "--step", step, "--cache-dir", cache, "--out", outs[-1]) == 0
    with caplog.at_level(logging.WARNING):
        assert run("merge", "--stage", "provenance", "--out", tmp_path / "prov.parquet", *outs) == 0
    prov = pd.read_parquet(tmp_path / "prov.parquet").set_index("step")
    assert prov["suspect"].to_dict() == {0: False, 1: False, 2: True, 1000: False, 143000: True}
    assert pd.isna(prov.loc[143000, "duplicate_of_step"])  # the genuine late step is not dropped as a copy
    assert list(prov.loc[2, "same_weights_as"]) == [143000]
    assert "step 143000 serves the same weights as non-consecutive step(s) 2: SUSPECT" in caplog.text


def test_float16_overflow_stops_the_stage_naming_model_step_stage_and_layer(shared_dir, tmp_path, caplog) -> None:
    """Layer 1's MLP scaled so that its output overflows float16 (as Pythia-70m's attention can)."""
    cache = tmp_path / "hub"
    write_pythia_cache(cache, PYTHIA_MODEL, shared_dir, [0], scale={"layers.1.mlp": 3e3})
    common = ["--model", PYTHIA_MODEL, "--step", "0", "--cache-dir", cache, "--device", "cpu", "--n-samples", "2"]
    with caplog.at_level(logging.ERROR):
        assert run("heads", *common, "--dtype", "float16", "--out", tmp_path / "h16.parquet") == 1
    assert (f"{PYTHIA_MODEL}@step0, stage heads: non-finite values (NaN/Inf) first appear in layer 1 (float16); "
            "rerun with dtype float32") in caplog.text
    assert not (tmp_path / "h16.parquet").exists()
    assert run("heads", *common, "--out", tmp_path / "auto.parquet") == 0  # auto = float32 does not overflow
    assert np.isfinite(pd.read_parquet(tmp_path / "auto.parquet")["prefix_matching"]).all()


def test_auto_precision_gives_the_float64_answer_on_fp16_weights(pythia_cache: Path, tmp_path: Path) -> None:
    """``auto`` (float32 from the float16 files) against float64 from the same files, per stage."""
    common = ["--model", PYTHIA_MODEL, "--step", "1000", "--cache-dir", pythia_cache, "--device", "cpu"]
    tables = {}
    for dtype in ("auto", "float64"):
        assert run("heads", *common, "--dtype", dtype, "--out", tmp_path / f"heads-{dtype}.parquet") == 0
        assert run("icl-tasks", *common, "--dtype", dtype, "--shots", "0", "5", "--n-prompts", "20",
                   "--out", tmp_path / f"icl-{dtype}.parquet") == 0
        tables[dtype] = [pd.read_parquet(tmp_path / f"{name}-{dtype}.parquet") for name in ("heads", "icl")]
    (heads, icl), (heads64, icl64) = tables["auto"], tables["float64"]
    for score in ("prefix_matching", "previous_token", "copying"):
        np.testing.assert_allclose(heads[score], heads64[score], rtol=0, atol=1e-6)
    pd.testing.assert_series_equal(icl["value"], icl64["value"])  # every top-1 token the same


@pytest.mark.full_workflow
def test_snakemake_end_to_end_on_the_pythia_format_fixture(pythia_cache: Path, shared_dir: Path, tmp_path: Path) -> None:
    """The default workflow (pythia schedule, dtype auto) on the fixture, offline: every stage runs
    through load_checkpoint/load_tokenizer, and the relations keep every triplet. The results folder's
    name has a space: every shell command quotes its paths."""
    import datasets
    import yaml

    steps = [0, 1, 1000]  # step1 serves step0's weights, as on the hub

    texts = tmp_path / "abstracts"  # a datasets directory, so the oldest declared datasets is exercised too
    records = agenda.load_agenda(shared_dir / "data" / "agenda")
    datasets.Dataset.from_dict({"text": [agenda.surface_text(r) for r in records]}).save_to_disk(str(texts))
    config = {
        "models": [PYTHIA_MODEL], "schedule": "pythia", "checkpoints": {"steps": steps},
        "device": "cpu", "dtype": "auto", "hf_cache": str(pythia_cache), "hub_offline": True, "results": "my results",
        "keep_weights": True,  # offline: nothing evicted could be fetched again
        "text": {"kind": "disk", "name": None, "path": str(texts), "n_docs": 40, "context": 128},
        "loss": {"early": 10, "late": 100, "bootstrap": 200},
        "induction": {"n_samples": 4},
        "icl_tasks": {"shots": [0, 1, 5, 20], "n_prompts": 10},
        "relations": {"agenda_dir": str(shared_dir / "data" / "agenda")},
        "ablation": {"n_docs": 8, "n_sequences": 8, "n_prompts": 4, "bootstrap": 200},
        "analysis": {"k": 1, "n_boot": 50, "n_perm": 99},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "--cores", "2", "-s", str(REPO / "workflow" / "Snakefile"),
               "-d", str(tmp_path), "--configfile", str(tmp_path / "config.yaml")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "my results" / PYTHIA_MODEL.replace("/", "--")
    summary = pd.read_parquet(out / "relations" / "summary.parquet").groupby("family")[["kept", "recovered"]].sum()
    assert summary["kept"].to_dict() == KEPT
    assert summary["recovered"].to_dict() == RECOVERED  # see the README
    triplets = pd.read_parquet(out / "relations" / "triplets.parquet")
    forward = triplets[triplets["direction"] == "forward"]
    assert forward.groupby("family").size().to_dict() == KEPT
    tokenizer = load_tokenizer(PYTHIA_MODEL, 0, cache_dir=pythia_cache)
    letters = forward.loc[forward["family"] == "kg-letters", "head_id"].unique()
    assert {tokenizer.decode([int(i)]).lstrip(" ") for i in letters} == set(LETTERS)
    words = forward[forward["family"] == "kg"]
    assert words["head_str"].str.strip().str.isalpha().mean() > 0.95 and not set(words["head_id"]) & set(letters)

    provenance = pd.read_parquet(out / "provenance.parquet").set_index("step")
    assert provenance.loc[1, "duplicate_of_step"] == 0 and not provenance["suspect"].any()
    heads = pd.read_parquet(out / "heads.parquet")
    assert len(heads) == len(steps) * 2 * 4 and heads["prefix_matching"].between(0, 1).all()
    icl = pd.read_parquet(out / "icl.parquet")
    assert set(icl["level"]) == {"loss_reduction", "format_compliance", "pattern_discovery"}
    assert len(icl[icl["level"] != "loss_reduction"]) == len(steps) * 4 * 4 * (3 + len(BASELINES))
    ri = pd.read_parquet(out / "relation_index.parquet")
    assert set(ri["family"]) == set(KEPT) and ri["events"].sum() > 0
    assert ri["ri"].dropna().between(0, 1).all()
    # the letters are negative controls under literal and source (never SIHs), an ordinary family under contextual
    negative = ri["family"].eq("kg-letters") & ri["variant"].isin(["literal", "source"])
    assert (ri["negative_control"] == negative).all() and not ri.loc[negative, "sih"].any()
    # the ablation stage on the real format: every head screened, each set's top 5 by the screen ablated alone,
    # and the top-5 induction heads (with their layer-matched controls) on all four cells, relation recall of
    # both families at the relation index's events
    ablation = pd.read_parquet(out / "ablation.parquet")
    singles = ablation[ablation["ablation"] == "head"]
    screened = singles[singles["method"] == "attribution"]
    assert len(screened.drop_duplicates(["step", "layer", "head"])) == len(steps) * 2 * 4
    exact = singles[(singles["method"] == "exact") & (singles["metric"] == "icl_score")]
    assert (exact.groupby("step").size() == 5).all() and set(exact["step"]) == set(steps)
    assert set(singles["task"][singles["level"] == "relation_recall"]) == set(KEPT)
    assert set(singles["shots"].dropna()) == {20} and (singles["events"] > 0).all()
    assert set(ablation.loc[ablation["ablation"] == "group", "group"]) >= {"induction"}
    assert read_provenance(out / "step1000" / "ablation.parquet")["groups"]["induction"]
    analysis = tmp_path / "my results" / "analysis"
    assert (analysis / "summary.parquet").exists() and (analysis / "figures" / "emergence_panel.png").exists()
    assert set(pd.read_parquet(analysis / "causal_correlation.parquet")["step"]) == {0, 1000}  # step 1 duplicates 0
    assert (analysis / "figures" / f"causal-{out.name}.png").exists()
    log = (tmp_path / "logs" / out.name / "step1000" / "score.log").read_text()
    assert "(torch.float32)" in log  # dtype auto
    runtime = read_provenance(out / "step1000" / "relation_index.parquet")["runtime"]
    assert runtime == {"device": "cpu", "dtype": "float32", "gpu": None, "cuda": None, "attn_implementation": "eager"}


@pytest.fixture
def cache_copy(pythia_cache: Path, tmp_path: Path) -> Path:
    """A private copy of the fixture cache (links kept) that a test may corrupt."""
    copy = tmp_path / "hub"
    shutil.copytree(pythia_cache, copy, symlinks=True)
    return copy


def fetched_row(cache: Path, step: int) -> dict:
    return hub.fetch_checkpoint(PYTHIA_MODEL, step, cache_dir=cache).row(step)


def test_stages_refuse_weights_that_differ_from_what_fetch_verified(cache_copy: Path) -> None:
    """Flipped bytes in a weights blob, and a snapshot relinked to another step's blob, both load
    silently in transformers; checked against the fetch stage's row they are refused, naming the file."""
    row = fetched_row(cache_copy, 2)
    load_checkpoint(PYTHIA_MODEL, 2, cache_dir=cache_copy, device="cpu", tokenizer=False, fetched=row)  # clean
    weights = snapshot(cache_copy, 2) / "pytorch_model.bin"
    blob = weights.resolve()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    with pytest.raises(hub.IntegrityError, match=f"pytorch_model.bin at .* has hash .*, but the fetch record says "
                                                 f"{row['sha256'][0]}"):
        load_checkpoint(PYTHIA_MODEL, 2, cache_dir=cache_copy, device="cpu", tokenizer=False, fetched=row)

    row = fetched_row(cache_copy, 1000)
    weights = snapshot(cache_copy, 1000) / "pytorch_model.bin"
    other = (snapshot(cache_copy, 0) / "pytorch_model.bin").resolve()
    weights.unlink()
    weights.symlink_to(os.path.relpath(other, weights.parent))
    assert load_checkpoint(PYTHIA_MODEL, 1000, cache_dir=cache_copy, device="cpu", tokenizer=False).model  # silent
    with pytest.raises(hub.IntegrityError, match="pytorch_model.bin .*links to blob"):
        load_checkpoint(PYTHIA_MODEL, 1000, cache_dir=cache_copy, device="cpu", tokenizer=False, fetched=row)


def test_eviction_removes_a_checkpoint_but_not_what_another_cached_one_shares(cache_copy: Path) -> None:
    """step0 and step1 are one commit in the fixture: evicting step0 drops only its branch, and step1
    still loads and verifies. Every step shares the tokenizer and config blobs: evicting step1 and
    step2 frees their weights but leaves step1000 whole. A second eviction of a step is a no-op."""
    repo = hub.repo_cache_dir(PYTHIA_MODEL, cache_copy)
    rows = {step: fetched_row(cache_copy, step) for step in PYTHIA_STEPS}
    assert rows[0]["commit"] == rows[1]["commit"]
    weights = {step: (snapshot(cache_copy, step) / "pytorch_model.bin").resolve() for step in (1, 2)}
    blobs = {p.name for p in (repo / "blobs").iterdir()}
    ours = {"downloaded_blobs": sorted(blobs), "revision_was_cached": False}  # a run that downloaded everything

    first = hub.evict_checkpoint(PYTHIA_MODEL, 0, rows[0]["commit"], cache_copy, fetched=ours)
    assert (first["deleted_blobs"], first["freed_bytes"]) == (0, 0)
    assert not (repo / "refs" / "step0").exists() and {p.name for p in (repo / "blobs").iterdir()} == blobs
    assert load_checkpoint(PYTHIA_MODEL, 1, cache_dir=cache_copy, device="cpu", fetched=rows[1]).tokenizer
    with pytest.raises(hub.CheckpointNotFound, match="step0 is not in the cache"):
        load_checkpoint(PYTHIA_MODEL, 0, cache_dir=cache_copy, device="cpu", fetched=rows[0])

    for step in (1, 2):
        size = weights[step].stat().st_size
        evicted = hub.evict_checkpoint(PYTHIA_MODEL, step, rows[step]["commit"], cache_copy, fetched=ours)
        assert (evicted["deleted_blobs"], evicted["freed_bytes"]) == (1, size) and not weights[step].exists()
        assert not (repo / "snapshots" / rows[step]["commit"]).exists()
    assert load_checkpoint(PYTHIA_MODEL, 1000, cache_dir=cache_copy, device="cpu", fetched=rows[1000]).tokenizer
    assert hub.evict_checkpoint(PYTHIA_MODEL, 2, rows[2]["commit"], cache_copy, fetched=ours)["deleted_blobs"] == 0


def test_eviction_deletes_only_what_this_run_downloaded(cache_copy: Path) -> None:
    """A shared cache: a revision that was cached before the run fetched it stays whole, a fetch with no
    record of its downloads deletes nothing, and otherwise only the blobs the fetch downloaded go -- also
    for the cache's last revision, whose other blobs (someone else's) stay in place."""
    repo = hub.repo_cache_dir(PYTHIA_MODEL, cache_copy)
    rows = {step: fetched_row(cache_copy, step) for step in PYTHIA_STEPS}
    blobs = {p.name for p in (repo / "blobs").iterdir()}
    weights = {step: (snapshot(cache_copy, step) / "pytorch_model.bin").resolve() for step in PYTHIA_STEPS}

    for fetched in ({"downloaded_blobs": sorted(blobs), "revision_was_cached": True}, None, {}):
        kept = hub.evict_checkpoint(PYTHIA_MODEL, 2, rows[2]["commit"], cache_copy, fetched=fetched)
        assert kept["deleted_blobs"] == 0 and kept["kept"], kept
        assert (repo / "refs" / "step2").exists() and {p.name for p in (repo / "blobs").iterdir()} == blobs
    assert load_checkpoint(PYTHIA_MODEL, 2, cache_dir=cache_copy, device="cpu", fetched=rows[2]).tokenizer

    # step2's fetch downloaded its weights only (the tokenizer and config were someone else's)
    only_weights = {"downloaded_blobs": [weights[2].name], "revision_was_cached": False}
    for step in (0, 1, 1000):  # leave step2 the cache's last revision
        hub.evict_checkpoint(PYTHIA_MODEL, step, rows[step]["commit"], cache_copy,
                             fetched={"downloaded_blobs": [weights[step].name], "revision_was_cached": False})
    last = hub.evict_checkpoint(PYTHIA_MODEL, 2, rows[2]["commit"], cache_copy, fetched=only_weights)
    assert last["deleted_blobs"] == 1 and not weights[2].exists() and not (repo / "refs" / "step2").exists()
    left = {p.name for p in (repo / "blobs").iterdir()}
    assert left == blobs - {w.name for w in weights.values()} and left, left  # tokenizer and config blobs stay


def test_a_weights_file_missing_a_tensor_is_refused(cache_copy: Path) -> None:
    """transformers initialises a tensor missing from the file at random and goes on; the loader refuses."""
    snap = snapshot(cache_copy, 2)
    state = torch.load(snap / "pytorch_model.bin", weights_only=True)
    del state["gpt_neox.layers.1.attention.dense.weight"]
    buf = io.BytesIO()
    torch.save(state, buf)
    files = {p.name: p.read_bytes() for p in snap.iterdir() if p.name != "pytorch_model.bin"}
    hub.write_snapshot(cache_copy, PYTHIA_MODEL, ["step5"], {**files, "pytorch_model.bin": buf.getvalue()},
                       ["pytorch_model.bin"])
    row = fetched_row(cache_copy, 5)  # fetch verifies the file's hash: the file is intact, just incomplete
    with pytest.raises(hub.IntegrityError, match=r"missing: gpt_neox\.layers\.1\.attention\.dense\.weight"):
        load_checkpoint(PYTHIA_MODEL, 5, cache_dir=cache_copy, device="cpu", tokenizer=False, fetched=row)


def test_inputs_longer_than_the_context_are_refused_naming_the_key(pythia_cache: Path) -> None:
    """Rotary GPT-NeoX runs past max_position_embeddings and returns numbers for untrained positions."""
    from icl_dynamics.icl import per_token_losses
    from icl_dynamics.induction import Probe, induction_rows
    from icl_dynamics.models import ContextError

    ckpt = load_checkpoint(PYTHIA_MODEL, 2, cache_dir=pythia_cache, device="cpu")
    ckpt.model.config.max_position_embeddings = 64
    with pytest.raises(ContextError, match=r"induction\.n_tokens.*101 tokens.*context of 64"):
        induction_rows(ckpt.model, ckpt.tokenizer, Probe(n_tokens=25, n_samples=1))
    with pytest.raises(ContextError, match=r"text\.context.*65 tokens"):
        per_token_losses(ckpt.model, torch.zeros((1, 65), dtype=torch.long))
    assert per_token_losses(ckpt.model, torch.zeros((1, 64), dtype=torch.long)).shape == (1, 64)
