"""OLMo-1 and OLMo-2 through the pipeline's own loaders, on caches that mirror their hub repositories
(``icl_dynamics.olmo_format``), and the whole Snakemake workflow on the OLMo-2 one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import OLMO_MODELS, REPO, olmo_fixture_branches
from fakehub import FakeHub
from huggingface_hub import constants
from safetensors import safe_open
from tokenizers import Tokenizer

from icl_dynamics import agenda, hub, relations
from icl_dynamics.cli import main
from icl_dynamics.icl_tasks import TASKS, label_separator, label_token_ids, make_prompts
from icl_dynamics.models import load_checkpoint, load_tokenizer

pytestmark = pytest.mark.pythia_format  # the real-format tests: CI runs them on the oldest libraries too

TOKENIZER = {"olmo": "olmo-1", "olmo2": "olmo-2"}
STEP = {"olmo": 1000, "olmo2": 1000}
# Relations the relations stage keeps on the whole AGENDA test split with each family's tokenizer (the
# GPT-NeoX tokenizer's are in test_pythia_format.KEPT): the knowledge-graph families, whose anchors must be one
# token. README, "Model families", reports them with the syntax family's.
KEPT_KG = {"olmo2": {"kg": 2_644, "kg-letters": 4_398}}


def snapshot(cache: Path, model_id: str, branch: str) -> Path:
    return hub.repo_cache_dir(model_id, cache) / "snapshots" / hub.cached_commit(model_id, branch, cache)


@pytest.mark.parametrize("family", ["olmo", "olmo2"])
def test_the_fixture_is_laid_out_like_the_familys_repository(olmo_caches, shared_dir, family):
    cache, model_id = olmo_caches[family], OLMO_MODELS[family]
    branch = [b for b in olmo_fixture_branches(family) if f"step{STEP[family]}-" in b and "stage2" not in b][0]
    files = sorted(p.name for p in snapshot(cache, model_id, branch).iterdir())
    weights = (["model.safetensors"] if family == "olmo" else
               ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"])
    tokenizer_files = ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    extra = [] if family == "olmo" else ["merges.txt", "vocab.json"]
    assert files == sorted(["config.json", "generation_config.json", *weights, *tokenizer_files, *extra])
    config = json.loads((snapshot(cache, model_id, branch) / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["vocab_size"] == (50_304 if family == "olmo" else 100_352)
    assert config["architectures"] == ["OlmoForCausalLM" if family == "olmo" else "Olmo2ForCausalLM"]
    keys, dtypes = [], set()
    for name in (w for w in weights if w.endswith(".safetensors")):
        with safe_open(snapshot(cache, model_id, branch) / name, "pt") as f:
            keys += list(f.keys())
            dtypes |= {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.float32} and "model.embed_tokens.weight" in keys
    assert ("lm_head.weight" in keys) == (family == "olmo2")  # OLMo-1B ties its embeddings, OLMo-2 does not
    if family == "olmo2":
        assert "model.layers.1.self_attn.q_norm.weight" in keys and "model.layers.0.post_feedforward_layernorm.weight" in keys

    ckpt = load_checkpoint(model_id, STEP[family], cache_dir=cache, device="cpu")  # found by its step
    assert type(ckpt.model).__name__ == config["architectures"][0] and ckpt.model.dtype == torch.float32
    tok = ckpt.tokenizer
    direct = Tokenizer.from_file(str(shared_dir / "data" / "tokenizers" / TOKENIZER[family] / "tokenizer.json"))
    for text in (" We propose a neural network", "Hello world", "a B (C) and  D.\n E"):
        assert tok(text)["input_ids"] == direct.encode(text, add_special_tokens=False).ids  # nothing added
    assert tok.eos_token_id == ckpt.model.config.eos_token_id and tok.pad_token_id == ckpt.model.config.pad_token_id
    if family == "olmo":
        assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (50279, 1, None)
    else:
        assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (100257, 100277, 100257)
        assert tok.convert_ids_to_tokens(direct.encode(" We propose a neural network").ids) == [
            "ĠWe", "Ġpropose", "Ġa", "Ġneural", "Ġnetwork"]  # shared/README's check
    # the ICL tasks' labels: OLMo-2's BPE never merges a digit with the space before it, so its queries end ": "
    prompt = make_prompts(TASKS[3], 2)[0].text
    assert label_separator(tok, prompt) == ("" if family == "olmo" else " ")
    assert tok.convert_ids_to_tokens(label_token_ids(tok, 9, prompt))[:2] == (["Ġ0", "Ġ1"] if family == "olmo"
                                                                              else ["0", "1"])
    # the relations stage places anchors on the words of the tokenizer file's own spans (OLMo-2's file keeps the
    # space before a word in its span, OLMo-1's trims it), whatever the loader reports
    records = agenda.load_agenda(shared_dir / "data" / "agenda")[:20]
    for text in [agenda.surface_text(r) for r in records]:
        encoded = relations.encode(text, tok, [])
        reference = direct.encode(text, add_special_tokens=False)
        assert encoded.token_ids == reference.ids
        assert encoded.offsets == relations.word_offsets(text, reference.offsets)


def test_a_checkpoint_is_fetched_by_its_branch_and_merged_by_the_hub_schedule(olmo_caches, tmp_path):
    """fetch (offline, from the cache) names the branch the record gives the step; merge reads the same record."""
    cache, model_id = olmo_caches["olmo2"], OLMO_MODELS["olmo2"]
    record = tmp_path / "branches.json"
    with FakeHub(cache) as server:
        env = dict(ENDPOINT=server.endpoint, HF_HUB_OFFLINE=False)
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setattr(constants, key, value)
            assert main(["branches", "--model", model_id, "--out", str(record)]) == 0
    outs = []
    for step in (150, 1000):
        outs.append(tmp_path / f"prov{step}.parquet")
        assert main(["fetch", "--model", model_id, "--step", str(step), "--cache-dir", str(cache), "--schedule",
                     str(record), "--out", str(outs[-1])]) == 0
    assert main(["merge", "--stage", "provenance", "--schedule", str(record), "--out", str(tmp_path / "p.parquet"),
                 *map(str, outs)]) == 0
    prov = pd.read_parquet(tmp_path / "p.parquet").set_index("step")
    assert prov["revision"].to_dict() == {150: "step150-tokens1B", 1000: "stage1-step1000-tokens3B"}
    assert prov["weights_format"].eq("safetensors").all()
    assert prov["files"].map(list).tolist() == [["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]] * 2
    assert prov.loc[1000, "tokens"] == pytest.approx(1000 * 512 * 4096, rel=1 / 210)
    assert main(["fetch", "--model", model_id, "--step", "1001", "--cache-dir", str(cache), "--schedule", str(record),
                 "--out", str(tmp_path / "x.parquet")]) == 1


@pytest.mark.parametrize("family", ["olmo", "olmo2"])
def test_the_stages_score_each_family_through_the_cli(olmo_caches, family, tmp_path):
    """The heads and ICL-task stages by hand on each family's fixture (the oldest declared libraries run this;
    the whole workflow below runs on the newest): the copying score is the architecture layer's on the
    checkpoint load_checkpoint gives, and the tasks' labels are the family's single tokens."""
    from icl_dynamics.icl_tasks import TASKS
    from icl_dynamics.induction import ov_copying_scores

    cache, model_id = olmo_caches[family], OLMO_MODELS[family]
    record = tmp_path / "branches.json"
    from icl_dynamics.schedules import write_record

    write_record({"record_version": 1, "model": model_id, "listed_at": "", "endpoint": "", "huggingface_hub": "",
                  "branches": {name: "0" * 40 for name in olmo_fixture_branches(family)}}, record)
    common = ["--model", model_id, "--step", str(STEP[family]), "--cache-dir", str(cache), "--schedule", str(record),
              "--device", "cpu"]
    assert main(["heads", *common, "--n-samples", "2", "--out", str(tmp_path / "heads.parquet")]) == 0
    assert main(["icl-tasks", *common, "--shots", "0", "2", "--n-prompts", "4",
                 "--out", str(tmp_path / "icl.parquet")]) == 0
    heads = pd.read_parquet(tmp_path / "heads.parquet").sort_values(["layer", "head"])
    model = load_checkpoint(model_id, STEP[family], cache_dir=cache, device="cpu", tokenizer=False).model
    np.testing.assert_allclose(heads["copying"].to_numpy(), ov_copying_scores(model).ravel(), atol=1e-9)
    icl = pd.read_parquet(tmp_path / "icl.parquet")
    assert set(icl["task"]) >= {task.name for task in TASKS} and icl["value"].notna().all()


@pytest.fixture(scope="module")
def olmo2_workflow(olmo_caches, shared_dir, tmp_path_factory):
    """The default workflow on the OLMo-2 fixture, offline, once for every test that reads it: schedule hub
    (the branches listed from the fake hub first, as a run does once per model), three stage-1 checkpoints,
    every stage on small settings; the knowledge-graph relations on the whole AGENDA test split, the syntax
    family on 40 abstracts."""
    import yaml

    cache, model_id = olmo_caches["olmo2"], OLMO_MODELS["olmo2"]
    work = tmp_path_factory.mktemp("olmo2-workflow")
    record = work / "results" / model_id.replace("/", "--") / "branches.json"
    with FakeHub(cache) as server, pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "ENDPOINT", server.endpoint)
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        assert main(["branches", "--model", model_id, "--out", str(record)]) == 0
    abstracts = [agenda.surface_text(r) for r in agenda.load_agenda(shared_dir / "data" / "agenda")]
    (work / "abstracts.txt").write_text("\n\n".join(abstracts[:60]))
    (work / "syntax.txt").write_text("\n\n".join(abstracts[:40]))
    config = {
        "models": [model_id], "schedule": "hub", "checkpoints": {"steps": [150, 1000, 2000]},
        "device": "cpu", "dtype": "auto", "hf_cache": str(cache), "hub_offline": True, "results": "results",
        "keep_weights": True,
        "text": {"kind": "text", "name": None, "path": str(work / "abstracts.txt"), "n_docs": 8, "context": 64},
        "loss": {"early": 4, "late": 60, "bootstrap": 100},
        "induction": {"n_samples": 2, "n_tokens": 10},
        "icl_tasks": {"shots": [0, 2], "n_prompts": 4},
        "relations": {"agenda_dir": str(shared_dir / "data" / "agenda"), "syntax_texts": str(work / "syntax.txt")},
        "ablation": {"n_docs": 4, "n_sequences": 4, "n_prompts": 2, "draws": 1, "bootstrap": 100},
        "analysis": {"k": 1, "n_boot": 20, "n_perm": 99},
        "figures": {"top_k": 1},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "--cores", "2", "-s", str(REPO / "workflow" / "Snakefile"), "-d", str(work),
               "--configfile", str(work / "config.yaml")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "results", model_id


@pytest.mark.full_workflow
def test_every_stage_runs_on_the_olmo2_fixture(olmo2_workflow):
    results, model_id = olmo2_workflow
    out = results / model_id.replace("/", "--")
    summary = pd.read_parquet(out / "relations" / "summary.parquet").groupby("family")["kept"].sum()
    assert {k: summary[k] for k in KEPT_KG["olmo2"]} == KEPT_KG["olmo2"] and summary["syntax"] > 0
    provenance = pd.read_parquet(out / "provenance.parquet").set_index("step")
    assert provenance["revision"].to_dict() == {150: "step150-tokens1B", 1000: "stage1-step1000-tokens3B",
                                                2000: "stage1-step2000-tokens5B"}
    assert not provenance["suspect"].any() and provenance["duplicate_of_step"].isna().all()
    tokens = provenance["tokens"]
    assert tokens.is_monotonic_increasing and tokens[2000] == 2 * tokens[1000]  # step x tokens per step, not names
    heads = pd.read_parquet(out / "heads.parquet")
    assert len(heads) == 3 * 2 * 4 and heads["prefix_matching"].between(0, 1).all()
    assert heads["copying"].between(-1, 1).all() and heads["copying"].abs().max() > 0
    icl = pd.read_parquet(out / "icl.parquet")
    assert set(icl["level"]) == {"loss_reduction", "format_compliance", "pattern_discovery"}
    ri = pd.read_parquet(out / "relation_index.parquet")
    assert {"kg", "kg-letters", "syntax"} <= set(ri["family"]) and ri["events"].sum() > 0
    assert ri["ri"].dropna().between(0, 1).all() and set(ri["variant"]) == {"literal", "source", "contextual"}
    ablation = pd.read_parquet(out / "ablation.parquet")
    assert set(ablation["step"]) == {150, 1000, 2000} and np.isfinite(ablation["value"]).all()
    assert (ablation.loc[ablation["ablation"] == "head", "value"].abs() > 0).any()
    assert (out / "figures").is_dir() and any((out / "figures").iterdir())
    assert (results / "analysis" / "emergence.parquet").is_file()
    assert (results / "analysis" / "causal_correlation.parquet").is_file()


@pytest.mark.full_workflow
def test_the_olmo2_workflow_scores_match_the_loaded_checkpoint(olmo2_workflow, olmo_caches):
    """The heads table's copying score of the workflow is the architecture layer's on the checkpoint loaded in
    Python (the same weights, found by step), and the relation index was scored with the EOS prepended."""
    from icl_dynamics.induction import ov_copying_scores

    results, model_id = olmo2_workflow
    heads = pd.read_parquet(results / model_id.replace("/", "--") / "heads.parquet")
    ckpt = load_checkpoint(model_id, 1000, cache_dir=olmo_caches["olmo2"], device="cpu", tokenizer=False)
    expected = ov_copying_scores(ckpt.model)
    at = heads[heads["step"] == 1000].sort_values(["layer", "head"])
    np.testing.assert_allclose(at["copying"].to_numpy(), expected.ravel(), atol=1e-9)
    assert load_tokenizer(model_id, 2000, cache_dir=olmo_caches["olmo2"]).eos_token_id == 100257
