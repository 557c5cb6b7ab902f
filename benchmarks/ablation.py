"""Cost of the ablation stage (issue 15) on a randomly initialised Pythia-shaped model, against a plain
forward pass over the same evaluation sets.

Builds the stage's three evaluation sets as the score job does at its default sizes (the first 32
documents of 512 tokens cut after token 500, 64 relation sequences per family of the AGENDA test
split, 20 prompts per task at 20 shots), then times, in one process on one model:

* ``forward``: one plain forward pass over every evaluation sequence (same batches), logits included;
* ``ablation``: :func:`icl_dynamics.ablation.ablation_table`, every head alone plus two groups of
  ``--group-size`` heads with ``--draws`` layer-matched controls each, as the stage runs it.

Prints one table per shape: ablations, evaluation tokens, the work in full-forward-pass equivalents
(with the shared prefixes, and as separate passes), seconds, and seconds / forward (the measured cost
in passes). Needs ``benchmarks/.data`` (``python benchmarks/score_checkpoint.py prepare``).

    python benchmarks/ablation.py --shapes 14m 70m --device cpu
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "benchmarks" / ".data"
sys.path.insert(0, str(REPO / "benchmarks"))


def evaluation_sets(model, tokenizer, args: argparse.Namespace) -> list:
    import pyarrow.parquet as pq
    import torch

    from icl_dynamics.ablation import icl_score_set, icl_task_set, relation_recall_set

    docs = torch.tensor(pq.read_table(DATA / "text_tokens.parquet").column("token_ids").to_pylist()[:args.n_docs])
    relations = DATA / "relations"
    return [relation_recall_set(model.config, pq.read_table(relations / "sequences.parquet"),
                                pq.read_table(relations / "triplets.parquet"), n_sequences=args.n_sequences),
            icl_score_set(docs, early=50, late=500, task="random tokens"),
            icl_task_set(tokenizer, shots=args.shots, n_prompts=args.n_prompts)]


def forward_seconds(model, evaluations: list, batch_size: int, device) -> float:
    """One plain forward pass (with logits) over every evaluation sequence, in the stage's own batches."""
    import torch
    from relation_index import sync

    from icl_dynamics.ablation import _batches

    start = time.perf_counter()
    with torch.inference_mode():
        for evaluation in evaluations:
            for ids, mask, *_ in _batches(evaluation, batch_size, device):
                model(input_ids=ids, attention_mask=mask)
    sync(device)
    return time.perf_counter() - start


def run(shape: str, args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from relation_index import random_model, sync
    from transformers import PreTrainedTokenizerFast

    from icl_dynamics.ablation import ablation_table
    from icl_dynamics.models import resolve_device
    from icl_dynamics.pythia_format import TOKENIZER_SOURCES

    device = resolve_device(args.device)
    model = random_model(device, shape, args.dtype)
    model.set_attn_implementation("eager")  # what load_checkpoint gives the pipeline
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(DATA / "shared" / TOKENIZER_SOURCES["tokenizer.json"]))
    evaluations = evaluation_sets(model, tokenizer, args)
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    rng = np.random.default_rng(0)
    all_heads = [(layer, head) for layer in range(layers) for head in range(heads)]
    picks = rng.choice(len(all_heads), size=2 * args.group_size, replace=False)
    groups = {"sih": [all_heads[i] for i in picks[:args.group_size]],
              "induction": [all_heads[i] for i in picks[args.group_size:]]}
    forward_seconds(model, evaluations, args.batch_size, device)  # warm-up
    forward = min(forward_seconds(model, evaluations, args.batch_size, device) for _ in range(args.repeats))
    sync(device)
    start = time.perf_counter()
    table = ablation_table(model, evaluations, groups, draws=args.draws, batch_size=args.batch_size, n_boot=1000)
    sync(device)
    seconds = time.perf_counter() - start
    cost = table.attrs["cost"]
    ablations = table.drop_duplicates(["ablation", "layer", "head", "group", "draw"]).shape[0]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"shape": shape, "heads": f"{layers}x{heads}", "ablations": ablations, "tokens": cost.tokens,
            "passes": cost.passes, "unshared": cost.unshared_passes, "forward_s": forward, "ablation_s": seconds,
            "measured_passes": seconds / forward}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["14m", "70m"])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--n-docs", type=int, default=32)
    p.add_argument("--n-sequences", type=int, default=64)
    p.add_argument("--n-prompts", type=int, default=20)
    p.add_argument("--shots", type=int, default=20)
    p.add_argument("--group-size", type=int, default=5)
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="timed forward passes (the fastest counts)")
    args = p.parse_args(argv)
    rows = [run(shape, args) for shape in args.shapes]
    print(f"{'shape':>6} {'heads':>6} {'ablations':>9} {'tokens':>7} {'passes':>7} {'unshared':>8} "
          f"{'forward s':>9} {'ablation s':>10} {'ablation/forward':>16}")
    for r in rows:
        print(f"{r['shape']:>6} {r['heads']:>6} {r['ablations']:>9} {r['tokens']:>7} {r['passes']:>7.1f} "
              f"{r['unshared']:>8.1f} {r['forward_s']:>9.2f} {r['ablation_s']:>10.1f} {r['measured_passes']:>16.1f}")
    print("passes: work in full-forward-pass equivalents with shared prefixes (unshared: one pass per ablation "
          "plus the clean one); ablation/forward: measured seconds over one plain forward pass")


if __name__ == "__main__":
    main()
