"""Cost of the ablation stage (issues 15 and 29) on a randomly initialised Pythia-shaped model, against a plain
forward pass over the same evaluation sets, with the gradient screen and without it.

Builds the stage's three evaluation sets as the score job does at its default sizes (the first 32
documents of 512 tokens cut after token 500, 64 relation sequences per family of the AGENDA test
split, 20 prompts per task at 20 shots), then times, in one process on one model:

* ``forward``: one plain forward pass over every evaluation sequence (same batches), logits included;
* ``exact only``: every head mean-ablated alone plus two groups of ``--group-size`` heads with ``--draws``
  layer-matched controls each (the stage before issue 29: ``ablation_table(..., exact_heads=None,
  screen_steps=0)``);
* ``screen + exact``: the stage as it runs now: every head estimated by the gradient screen
  (``--screen-steps`` path points), the screen's ``--exact-heads`` top heads per set and the same groups and
  controls ablated exactly.

Prints one table: per shape and way, the exact ablations, the work in full-forward-pass equivalents (a
backward pass counted as one forward), seconds, and seconds / forward (the measured cost in passes).
``--memory``: instead, per shape, what one batch of ``--batch-size`` x 500 tokens keeps for the screen's
backward pass (float32, eager attention; counted on PyTorch's meta device, so no weights are made and any
size runs anywhere). Needs ``benchmarks/.data`` (``python benchmarks/score_checkpoint.py prepare``).

    python benchmarks/ablation.py --shapes 14m 70m --device cpu
    python benchmarks/ablation.py --memory --shapes 14m 70m 160m 410m 1b 1.4b 2.8b
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


def run(shape: str, args: argparse.Namespace) -> list[dict]:
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
    rows = []
    ways = {"screen + exact": dict(exact_heads=args.exact_heads, screen_steps=args.screen_steps),
            "exact only": dict(exact_heads=None, screen_steps=0)}
    for way in args.ways:
        sync(device)
        start = time.perf_counter()
        table = ablation_table(model, evaluations, groups, draws=args.draws, batch_size=args.batch_size, n_boot=1000,
                               **ways[way])
        sync(device)
        seconds = time.perf_counter() - start
        cost = table.attrs["cost"]
        exact = table[table["method"] == "exact"]  # one row per ablation and evaluation set (the tasks: 2 levels)
        exact = exact.assign(set=exact["level"].replace("pattern_discovery", "format_compliance")).drop_duplicates(
            ["set", "ablation", "layer", "head", "group", "draw"])
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append({"shape": shape, "heads": f"{layers}x{heads}", "way": way,
                     "exact": len(exact[exact["ablation"] != "importance"]), "tokens": cost.tokens,
                     "passes": cost.passes, "forward_s": forward, "ablation_s": seconds,
                     "measured_passes": seconds / forward})
    return rows


def memory(shapes: list[str], batch_size: int) -> None:
    """What the screen's backward pass keeps, per shape: every tensor autograd saves in one forward pass over a
    batch of ``batch_size`` x 500 tokens (the ICL score's documents, the longest sequences), counted once per
    storage, float32, eager attention, parameters frozen as the screen freezes them."""
    import torch
    from relation_index import model_config
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    print(f"{'shape':>6} {'parameters':>10} {'weights GiB':>11} {'kept for backward GiB':>21}")
    for shape in shapes:
        with torch.device("meta"):
            model = GPTNeoXForCausalLM(GPTNeoXConfig(**model_config(shape))).eval()
        model.set_attn_implementation("eager")
        for p in model.parameters():
            p.requires_grad_(False)
        kept: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            base = t._base if t._base is not None else t  # a view shares its base's storage
            kept[id(base)] = base.numel() * base.element_size()
            return t

        def leaf(_module, args):
            return (args[0] if args[0].requires_grad else args[0].detach().requires_grad_(True), *args[1:])

        handles = [layer.attention.dense.register_forward_pre_hook(leaf) for layer in model.gpt_neox.layers]
        ids = torch.zeros((batch_size, 500), dtype=torch.long, device="meta")
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.gpt_neox(input_ids=ids)
        for handle in handles:
            handle.remove()
        params = sum(p.numel() for p in model.parameters())
        print(f"{shape:>6} {params / 1e6:>9.0f}M {params * 4 / 2**30:>11.2f} {sum(kept.values()) / 2**30:>21.2f}")


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
    p.add_argument("--exact-heads", type=int, default=5, help="the screen's top heads ablated exactly, per set")
    p.add_argument("--screen-steps", type=int, default=2)
    p.add_argument("--ways", nargs="+", default=["screen + exact", "exact only"],
                   choices=["screen + exact", "exact only"])
    p.add_argument("--memory", action="store_true", help="print what the screen's backward keeps, per shape")
    args = p.parse_args(argv)
    if args.memory:
        memory(args.shapes, args.batch_size)
        return
    print(f"{'shape':>6} {'heads':>6} {'way':>15} {'exact':>6} {'tokens':>7} {'passes':>7} {'forward s':>9} "
          f"{'ablation s':>10} {'ablation/forward':>16}", flush=True)
    for shape in args.shapes:
        for r in run(shape, args):  # each shape's rows as soon as they are measured
            print(f"{r['shape']:>6} {r['heads']:>6} {r['way']:>15} {r['exact']:>6} {r['tokens']:>7} "
                  f"{r['passes']:>7.1f} {r['forward_s']:>9.2f} {r['ablation_s']:>10.1f} {r['measured_passes']:>16.1f}",
                  flush=True)
    print("exact: ablations run exactly (per evaluation set for the screen's heads; groups and controls on every "
          "set); passes: work in full-forward-pass equivalents with shared prefixes, a backward pass counted as one "
          "forward; ablation/forward: measured seconds over one plain forward pass")


if __name__ == "__main__":
    main()
