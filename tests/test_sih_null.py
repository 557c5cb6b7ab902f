"""The SIH flag stays silent on noise: random-init models, through the pipeline's loaders."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import PYTHIA_MODEL

from icl_dynamics import relations
from icl_dynamics.checkpoints import PYTHIA_STEPS
from icl_dynamics.models import load_checkpoint
from icl_dynamics.pythia_format import write_pythia_cache
from icl_dynamics.relation_index import score_relation_index

N_MODELS = 20


@pytest.fixture(scope="module")
def random_models(shared_dir, tmp_path_factory):
    """N_MODELS random-init Pythia-format checkpoints (one seed per branch) in one hub cache."""
    cache = tmp_path_factory.mktemp("null") / "hub"
    steps = PYTHIA_STEPS[:N_MODELS]
    write_pythia_cache(cache, PYTHIA_MODEL, shared_dir, {step: 100 + i for i, step in enumerate(steps)})
    return cache, steps


@pytest.fixture(scope="module")
def relation_tables(agenda_relations):
    """Every family's triplets (kg, kg-letters, syntax) of the first 300 AGENDA abstracts, built with the
    Pythia-format tokenizer (the random models' own files)."""
    return agenda_relations


def _score_random_model(cache, relation_tables, step: int) -> pd.DataFrame:
    """The pre-registered cells (argmax gate, source variant) of one random-init model, on one thread."""
    import torch

    torch.set_num_threads(1)
    model = load_checkpoint(PYTHIA_MODEL, step, cache_dir=cache, device="cpu", tokenizer=False).model
    return pd.DataFrame(score_relation_index(model, *relation_tables, gates=("argmax",), variants=("source",)))


def test_the_sih_flag_is_silent_on_random_init_models(random_models, relation_tables):
    """Family-wise alpha 0.05 for the pre-registered gate and variant (argmax, source): at most 2 of 20
    random-init models may flag any cell, of the kg and syntax families, and at most 2 may flag a negative
    control (kg-letters, tested as its own Holm family). (Before letters were shuffled per abstract, 8 of
    20 did: a random head's fixed preference among letters passed for a CONJUNCTION effect.)"""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    cache, steps = random_models
    # one model per core; spawned, not forked: this process already runs torch's threads
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(partial(_score_random_model, cache, relation_tables), steps))
    flagged, controls, tested = {}, {}, []
    for step, rows in zip(steps, results):
        tested.append(rows.loc[rows["sih_status"] != "insufficient", "family"].value_counts())
        if rows["sih"].any():
            flagged[step] = rows.loc[rows["sih"], ["layer", "head", "relation", "direction", "p_adjusted"]]
        if rows["negative_control_flagged"].any():
            controls[step] = rows.loc[rows["negative_control_flagged"], ["layer", "head", "relation", "direction"]]
    # the test had cells to flag: 2 layers x 4 heads x (7 + 7 + 7) relations x 2 directions, most tested
    assert min(t.get("kg", 0) for t in tested) > 20 and min(t.get("syntax", 0) for t in tested) > 50
    assert min(t.get("kg-letters", 0) for t in tested) > 20
    assert len(flagged) <= 2, flagged
    assert len(controls) <= 2, controls


def test_shuffled_tails_flag_nothing_on_a_trained_toy_checkpoint(toy_zoo, agenda_dir):
    """Triplets whose tail is moved to a random visible content token carry no relation: the trained
    toy zoo's induction and copying heads must not pass for semantic induction heads on them."""
    from icl_dynamics.toyzoo import TOY_MODEL_ID, TOY_STEPS

    ckpt = load_checkpoint(TOY_MODEL_ID, TOY_STEPS[-1], cache_dir=toy_zoo / "hub", device="cpu")
    tables = relations.build_relations(agenda_dir, ckpt.tokenizer, syntax_texts=[])
    seqs, trips = tables.sequences.to_pandas(), tables.triplets.to_pandas()
    rng = np.random.default_rng(0)
    tokens = dict(zip(seqs["sequence_id"], seqs["token_ids"]))
    masks = dict(zip(seqs["sequence_id"], seqs["function_mask"]))
    shuffled = []
    for t in trips.itertuples(index=False):
        ids, mask = tokens[t.sequence_id], masks[t.sequence_id]
        o = int(rng.choice([k for k in range(len(ids)) if not mask[k] and ids[k] != ids[t.s]]))
        shuffled.append({**t._asdict(), "o": o, "head_id": int(ids[t.s]), "tail_id": int(ids[o])})
    with pytest.warns(UserWarning, match="beyond max_len=64"):  # the toy's context is 64 tokens
        rows = pd.DataFrame(score_relation_index(ckpt.model, seqs, pd.DataFrame(shuffled), gates=("argmax",),
                                                 variants=("source", "literal")))
    assert (rows["sih_status"] != "insufficient").sum() > 40  # cells were tested
    # the toy tokenizer knows letters, not AGENDA's words: these are kg-letters cells, negative controls under
    # source and literal, tested as their own Holm family; none passes it
    assert set(rows["family"]) == {"kg-letters"} and rows["negative_control"].all()
    assert not rows["sih"].any() and not rows["negative_control_flagged"].any()
    # the margin rule this test replaced (RI above both unmatched controls by 0.05, >= 20 events) fires here
    margin_rule = (rows["events"] >= 20) & (rows["ri"] - rows[["control_tenth", "control_random"]].max(axis=1) > 0.05)
    assert margin_rule.any()


N_FAMILY_MODELS = 4
FAMILY_DOCUMENTS = 150  # of the AGENDA_SUBSET abstracts


def _score_random_olmo(cache, model_id, relation_tables, step: int) -> pd.DataFrame:
    import torch

    torch.set_num_threads(1)
    model = load_checkpoint(model_id, step, cache_dir=cache, device="cpu", tokenizer=False).model
    return pd.DataFrame(score_relation_index(model, *relation_tables, gates=("argmax",), variants=("source",)))


@pytest.mark.parametrize("family", ["olmo", "olmo2"])
def test_the_sih_flag_is_silent_on_random_init_olmo_models(family, shared_dir, tmp_path, relation_tables):
    """The same null on OLMo-1 and OLMo-2: N_FAMILY_MODELS random-init models of the family, saved as its
    repository saves them and loaded by load_checkpoint, scored on the same triplets (their ids, from the
    GPT-NeoX tokenizer, are tokens of both vocabularies; a random model knows none of them), the first
    FAMILY_DOCUMENTS abstracts. At most 1 of 4 may flag anything: with a family-wise alpha of 0.05 per model,
    P(2 or more of 4) = 0.014."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    from icl_dynamics.olmo_format import olmo_branch, write_olmo_cache

    model_id = {"olmo": "allenai/OLMo-null-hf", "olmo2": "allenai/OLMo-2-null"}[family]
    steps = [1000 * (i + 1) for i in range(N_FAMILY_MODELS)]
    write_olmo_cache(tmp_path / "hub", model_id, shared_dir, family,
                     {olmo_branch(family, step): 200 + i for i, step in enumerate(steps)})
    seqs, trips = relation_tables
    seqs = seqs[seqs["document_id"] < FAMILY_DOCUMENTS]
    tables = (seqs, trips[trips["sequence_id"].isin(seqs["sequence_id"])])
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(partial(_score_random_olmo, tmp_path / "hub", model_id, tables), steps))
    flagged = {step: rows.loc[rows["sih"], ["layer", "head", "relation", "direction"]]
               for step, rows in zip(steps, results) if rows["sih"].any()}
    controls = [step for step, rows in zip(steps, results) if rows["negative_control_flagged"].any()]
    tested = [rows.loc[rows["sih_status"] != "insufficient", "family"].value_counts() for rows in results]
    assert min(t.get("kg", 0) for t in tested) > 20 and min(t.get("syntax", 0) for t in tested) > 50
    assert len(flagged) <= 1, flagged
    assert len(controls) <= 1, controls
