"""On the toy zoo: induction heads form and the ICL score drops together (midpoints within one checkpoint)."""

import json

import pandas as pd
import torch

from icl_dynamics import emergence
from icl_dynamics.icl import loss_reduction, per_token_losses, select_documents
from icl_dynamics.induction import Probe, induction_rows
from icl_dynamics.models import load_checkpoint
from icl_dynamics.toyzoo import TOY_MODEL_ID, TOY_STEPS, ToyConfig


def test_head_formation_and_icl_emergence_coincide_on_the_toy_zoo(toy_zoo):
    tokens_per_step = ToyConfig().tokens_per_step
    texts = [json.loads(line)["text"] for line in (toy_zoo / "text.jsonl").read_text().splitlines()]
    heads, icl, docs = [], [], None
    for step in TOY_STEPS:
        ckpt = load_checkpoint(TOY_MODEL_ID, step, cache_dir=toy_zoo / "hub", device="cpu")
        if docs is None:
            chosen = select_documents(texts, ckpt.tokenizer, context=64, n_docs=200, seed=0)
            docs = torch.tensor([d["token_ids"] for d in chosen])
        stamp = {"model": TOY_MODEL_ID, "step": step, "tokens": step * tokens_per_step}
        heads += [{**stamp, **row} for row in induction_rows(ckpt.model, ckpt.tokenizer, Probe(n_tokens=15))]
        _, score = loss_reduction(per_token_losses(ckpt.model, docs, batch_size=50), early=4, late=60, n_boot=300)
        icl.append({**stamp, **score, "task": "toy-text"})
    tables = emergence.analyze(pd.DataFrame(icl), pd.DataFrame(heads), k=2, n_boot=100, n_perm=199)

    emerged = tables["emergence"].set_index("metric").loc["icl_score"]
    formation = tables["formation"]
    top = formation[(formation["score"] == "prefix_matching") & (formation["final_rank"] == 1)].iloc[0]
    grid = list(TOY_STEPS)
    assert emerged["onset_step"] in (925, 950, 975, 1000, 1050)  # the phase change seen in training
    # heads and ICL are compared on their transition midpoints (the onset only gates the fit)
    lo, hi = sorted([top["transition_step"], emerged["transition_step"]])
    between = [s for s in grid if lo < s < hi]
    assert len(between) <= 1
    summary = tables["summary"]
    # the toy's 8 heads are all in the top 10, so the class has one head set, 'all' (no top10 row)
    assert not (summary["head_set"] == "top10").any()
    row = summary[(summary["subject"] == "induction") & (summary["head_set"] == "all")
                  & (summary["metric"] == "icl_score")].iloc[0]
    assert row["order"] == "with"
