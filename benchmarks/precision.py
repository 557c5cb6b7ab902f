"""How far each stage's answer moves when the model computes in float16, bfloat16 or float32.

Every dtype is compared with float64 computed from the same fp16 files (a Pythia-format cache built
here: random weights of the chosen Pythia shape, see ``icl_dynamics.pythia_format``), and, with
``--toy-zoo``, on the trained toy zoo's last checkpoint, whose heads and ICL are real. Per stage:

* heads: largest |difference| of any head's prefix-matching, previous-token or copying score;
* loss: |difference| of the ICL score, largest |difference| of the mean per-token loss;
* icl_tasks: share of prompts whose top-1 token changes, largest |difference| of a row's value;
* relation_index: share of (head, relation, gate, variant) cells whose event count changes,
  largest |difference| of RI where both are defined.

Runs on the CPU or the GPU (``--device``); CPU half precision rounds like the GPU's but may
accumulate differently, so GPU numbers are the ones to quote for GPU runs.

    python benchmarks/precision.py --shape 70m --n-sequences 200 [--toy-zoo resources/toy-zoo]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ICL_SHARED", REPO.parent / "shared"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from icl_dynamics import agenda, icl, icl_tasks, induction, relations  # noqa: E402
from icl_dynamics.models import load_checkpoint, load_tokenizer  # noqa: E402
from icl_dynamics.pythia_format import PythiaShape, write_pythia_cache  # noqa: E402
from icl_dynamics.relation_index import score_relation_index  # noqa: E402

MODEL = "EleutherAI/pythia-random"
DTYPES = ("float64", "float32", "bfloat16", "float16")


def measure(model_id: str, step: int, cache: Path, texts: list[str], relation_tables, args) -> dict[str, dict]:
    """Every stage's raw outputs per dtype."""
    out = {}
    for dtype in DTYPES:
        ckpt = load_checkpoint(model_id, step, cache_dir=cache, device=args.device, dtype=dtype)
        start = time.perf_counter()
        probe = induction.Probe(n_tokens=min(25, (ckpt.model.config.max_position_embeddings - 1) // 4))
        heads = pd.DataFrame(induction.induction_rows(ckpt.model, ckpt.tokenizer, probe))
        docs = icl.select_documents(texts, ckpt.tokenizer, context=args.context, n_docs=args.n_docs, seed=0)
        losses = icl.per_token_losses(ckpt.model, torch.tensor([d["token_ids"] for d in docs]))
        shots = [s for s in (0, 1, 5, 20) if s <= args.max_shots]
        prompts = [p for t in icl_tasks.TASKS for s in shots for p in icl_tasks.make_prompts(t, s, 25)]
        ids = [ckpt.tokenizer.encode(p.text, add_special_tokens=False) for p in prompts]
        top1 = icl_tasks.next_token_logits(ckpt.model, ids).argmax(-1).numpy()
        tasks = pd.DataFrame(icl_tasks.evaluate_tasks(ckpt.model, ckpt.tokenizer, shots=shots, n_prompts=25))
        ri = pd.DataFrame(score_relation_index(ckpt.model, *relation_tables)) if relation_tables else None
        out[dtype] = dict(heads=heads, losses=losses, top1=top1, tasks=tasks, ri=ri,
                          seconds=time.perf_counter() - start)
        print(f"  {model_id}@{step} {dtype}: {out[dtype]['seconds']:.1f} s", file=sys.stderr)
    return out


def compare(results: dict[str, dict], early: int, late: int) -> list[dict]:
    ref = results["float64"]
    rows = []
    ref_score = np.mean(ref["losses"][:, late] - ref["losses"][:, early])
    for dtype in DTYPES[1:]:
        got = results[dtype]
        scores = ["prefix_matching", "previous_token", "copying"]
        row = {
            "dtype": dtype,
            "heads max|d|": float(np.abs(got["heads"][scores].to_numpy() - ref["heads"][scores].to_numpy()).max()),
            "ICL score |d|": float(abs(np.mean(got["losses"][:, late] - got["losses"][:, early]) - ref_score)),
            "loss curve max|d|": float(np.nanmax(np.abs(np.nanmean(got["losses"], 0) - np.nanmean(ref["losses"], 0)))),
            "top-1 changed": float((got["top1"] != ref["top1"]).mean()),
            "task value max|d|": float((got["tasks"]["value"] - ref["tasks"]["value"]).abs().max()),
        }
        if ref["ri"] is not None:
            changed = got["ri"]["events"].to_numpy() != ref["ri"]["events"].to_numpy()
            both = got["ri"]["ri"].notna() & ref["ri"]["ri"].notna()
            row["RI cells: events changed"] = f"{changed.sum()}/{len(changed)}"
            row["RI max|d|"] = float((got["ri"]["ri"] - ref["ri"]["ri"])[both].abs().max())
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="70m", help="Pythia size whose shape the random model takes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-sequences", type=int, default=200, help="relation sequences scored (0 = all)")
    parser.add_argument("--n-docs", type=int, default=40)
    parser.add_argument("--toy-zoo", default=None, help="a built toy zoo directory (icl-dynamics toy-zoo)")
    args = parser.parse_args()

    texts = [agenda.surface_text(r) for r in agenda.load_agenda(SHARED / "data" / "agenda")]
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "hub"
        write_pythia_cache(cache, MODEL, SHARED, [1000], shape=PythiaShape.named(args.shape))
        tables = relations.build_relations(SHARED / "data" / "agenda", load_tokenizer(MODEL, 1000, cache_dir=cache))
        seqs, trips = tables.sequences.to_pandas(), tables.triplets.to_pandas()
        if args.n_sequences:
            seqs = seqs[seqs.sequence_id.isin(trips.sequence_id)].groupby("family").head(args.n_sequences // 2)
            trips = trips[trips.sequence_id.isin(seqs.sequence_id)]
        args.context, args.max_shots = 256, 20
        report = [{"model": f"random pythia-{args.shape}", **r}
                  for r in compare(measure(MODEL, 1000, cache, texts, (seqs, trips), args), early=10, late=200)]
    if args.toy_zoo:
        from icl_dynamics.toyzoo import TOY_MODEL_ID, TOY_STEPS

        zoo = Path(args.toy_zoo)
        toy_texts = pd.read_json(zoo / "text.jsonl", lines=True)["text"].tolist()
        args.context, args.max_shots, args.n_docs = 64, 5, 200
        report += [{"model": "toy zoo (trained)", **r}
                   for r in compare(measure(TOY_MODEL_ID, TOY_STEPS[-1], zoo / "hub", toy_texts, None, args),
                                    early=4, late=60)]
    table = pd.DataFrame(report)
    print(f"Agreement with float64 from the same fp16 files, device {args.device}, torch {torch.__version__}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2e}"))


if __name__ == "__main__":
    main()
