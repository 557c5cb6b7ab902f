"""Loss reduction (ICL level 1): per-token losses, the ICL score and its bootstrap interval."""

import json

import numpy as np
import pytest
import torch
from conftest import PYTHIA_MODEL, tiny_neox

from icl_dynamics.icl import (
    TextSource,
    bootstrap_mean,
    iter_texts,
    loss_reduction,
    per_token_losses,
    select_documents,
)
from icl_dynamics.models import load_checkpoint


def test_per_token_losses_match_float64_cross_entropy():
    model = tiny_neox(vocab_size=50, seed=4)
    docs = torch.randint(0, 50, (5, 12), generator=torch.Generator().manual_seed(0))
    losses = per_token_losses(model, docs, batch_size=2)
    assert np.isnan(losses[:, 0]).all()
    with torch.no_grad():
        logp = torch.log_softmax(model.double()(docs).logits, dim=-1)
    for d in range(5):
        for i in range(1, 12):
            assert losses[d, i] == pytest.approx(-logp[d, i - 1, docs[d, i]].item(), abs=1e-5)


def test_icl_score_is_late_minus_early_loss_averaged_over_documents():
    rng = np.random.default_rng(0)
    losses = rng.normal(3.0, 0.1, size=(40, 20))
    losses[:, 15] -= 1.0  # token 15 is one nat easier than token 3
    curve, icl = loss_reduction(losses, early=3, late=15, n_boot=500)
    assert icl["value"] == pytest.approx(np.mean(losses[:, 15] - losses[:, 3]))
    assert icl["ci_low"] < icl["value"] < icl["ci_high"]
    assert -1.2 < icl["ci_low"] and icl["ci_high"] < -0.8
    assert icl["n"] == 40 and icl["metric"] == "icl_score" and icl["level"] == "loss_reduction"
    assert [c["position"] for c in curve] == list(range(1, 20))
    assert curve[14]["loss"] == pytest.approx(losses[:, 15].mean())


def test_bootstrap_interval_matches_normal_theory():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, size=(400, 1))
    mean, low, high = bootstrap_mean(x, n_boot=2000, seed=0)
    half = 1.96 * x.std(ddof=1) / np.sqrt(400)
    assert high[0] - low[0] == pytest.approx(2 * half, rel=0.15)
    assert low[0] < mean[0] < high[0]


def test_icl_indices_must_fit_the_context():
    with pytest.raises(ValueError, match="early < late < context"):
        loss_reduction(np.zeros((3, 10)), early=5, late=10)


def test_document_selection_is_seeded_and_skips_short_documents(neox_tokenizer):
    texts = [f"word {i} " * (5 if i % 3 == 0 else 40) for i in range(30)]
    a = select_documents(texts, neox_tokenizer, context=32, n_docs=5, seed=1)
    b = select_documents(texts, neox_tokenizer, context=32, n_docs=5, seed=1)
    c = select_documents(texts, neox_tokenizer, context=32, n_docs=5, seed=2)
    assert a == b and a != c
    assert all(d["doc_index"] % 3 != 0 and len(d["token_ids"]) == 32 for d in a)
    assert [d["doc_index"] for d in a] == sorted(d["doc_index"] for d in a)
    with pytest.raises(ValueError, match="only 20 documents have at least 32 tokens; asked for 25"):
        select_documents(texts, neox_tokenizer, context=32, n_docs=25, seed=0)


def test_jsonl_source_reports_the_bad_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + "{not json\n")
    texts = iter_texts(TextSource("jsonl", path=str(path)))
    assert next(texts) == "fine"
    with pytest.raises(ValueError, match=r"docs.jsonl:2: expected a JSON object with 'text'"):
        next(texts)
    with pytest.raises(FileNotFoundError):
        next(iter_texts(TextSource("jsonl", path=str(tmp_path / "missing.jsonl"))))


def test_text_file_source_splits_on_blank_lines(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("first doc\nstill first\n\nsecond\n\n\n")
    assert list(iter_texts(TextSource("text", path=str(path)))) == ["first doc\nstill first", "second"]


def test_loss_reduction_on_agenda_text_with_the_gpt_neox_tokenizer(agenda_dir, neox_tokenizer, pythia_cache, tmp_path):
    from icl_dynamics.agenda import load_agenda, surface_text

    texts = [surface_text(r) for r in load_agenda(agenda_dir)]
    path = tmp_path / "agenda.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    docs = select_documents(iter_texts(TextSource("jsonl", path=str(path))), neox_tokenizer,
                            context=128, n_docs=24, seed=3)
    assert len(docs) == 24
    for doc in docs[:5]:  # the selected tokens are the start of the abstract they index
        assert texts[doc["doc_index"]].startswith(neox_tokenizer.decode(doc["token_ids"][:20]))
    model = load_checkpoint(PYTHIA_MODEL, 2, cache_dir=pythia_cache, device="cpu", tokenizer=False).model
    losses = per_token_losses(model, torch.tensor([d["token_ids"] for d in docs]), batch_size=8)
    curve, icl = loss_reduction(losses, early=10, late=100, n_boot=500)
    assert len(curve) == 127
    # an untrained model predicts (almost) uniformly: loss log(V) everywhere, no in-context learning
    assert all(abs(c["loss"] - np.log(50_304)) < 0.1 for c in curve)
    assert icl["ci_low"] < 0 < icl["ci_high"] and abs(icl["value"]) < 0.05
