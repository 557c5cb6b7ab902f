"""Benchmark of the relation-index stage on a randomly initialised Pythia-shaped model (``--shape``, default 70m).

Compares, over the same AGENDA relation sequences (same batches, sorted by length):

* ``matmul``: the machine's matmul FLOP/s in ``--dtype`` (best of several square products), the yardstick;
* ``forward``: plain LM forward passes (``model(input_ids)``, default attention, logits included);
* ``capture``: base-model forward passes with eager attention and a no-op pattern reducer (the
  floor under any stage that reads attention patterns);
* ``relation-index``: :func:`icl_dynamics.relation_index.score_relation_index` with both gates and
  all three variants.

Each stage runs in its own process so its peak RSS is its own, and is timed ``--repeats`` times
(the fastest counts: the machine may be shared). Prints one table; seconds per checkpoint are
extrapolated to the whole relation set from the measured tokens/s.

    python benchmarks/relation_index.py --n-sequences 60
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ICL_SHARED", REPO.parent / "shared"))


def model_config(shape: str) -> dict:
    """The GPT-NeoX config of ``pythia-<shape>`` (14m ... 12b): Pythia's published config, resized."""
    from icl_dynamics.pythia_format import PythiaShape, pythia_config

    return {k: v for k, v in pythia_config(SHARED, PythiaShape.named(shape)).items() if k != "torch_dtype"}


def relation_tables(relations_dir: Path, agenda_dir: Path, tokenizer_path: Path):
    """The relations stage's sequences and triplets tables, built (and kept) on first use."""
    import pyarrow.parquet as pq

    if not (relations_dir / "triplets.parquet").exists():
        from transformers import PreTrainedTokenizerFast

        from icl_dynamics.relations import build_relations, write_relations

        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_path))
        write_relations(build_relations(agenda_dir, tokenizer), relations_dir)
    return pq.read_table(relations_dir / "sequences.parquet"), pq.read_table(relations_dir / "triplets.parquet")


def select(sequences, triplets, n_sequences: int):
    """The first ``n_sequences / 2`` sequences with triplets of each family (all when 0)."""
    seqs, trips = sequences.to_pandas(), triplets.to_pandas()
    seqs = seqs[seqs.sequence_id.isin(set(trips.sequence_id))]
    if n_sequences:
        seqs = seqs.sort_values("sequence_id").groupby("family").head(max(1, n_sequences // 2))
    return seqs, trips[trips.sequence_id.isin(set(seqs.sequence_id))]


def random_model(device, shape: str, dtype: str):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from icl_dynamics.models import resolve_dtype

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(**model_config(shape))).eval().to(device, resolve_dtype(dtype))


def batches(seqs, batch_size: int, device):
    """Padded (input_ids, attention_mask) batches in the order the relation-index stage uses."""
    import torch

    ordered = sorted(zip(seqs.sequence_id, seqs.token_ids), key=lambda x: (-len(x[1]), x[0]))
    for i in range(0, len(ordered), batch_size):
        chunk = [list(ids) for _, ids in ordered[i : i + batch_size]]
        t = max(map(len, chunk))
        ids = torch.zeros((len(chunk), t), dtype=torch.long)
        mask = torch.zeros((len(chunk), t), dtype=torch.long)
        for b, row in enumerate(chunk):
            ids[b, : len(row)], mask[b, : len(row)] = torch.tensor(row), 1
        yield ids.to(device), mask.to(device)


def forward_flops(shapes, config: dict, *, lm_head: bool) -> float:
    """Matmul FLOPs of GPT-NeoX forward passes over padded batches of ``shapes`` [(B, T)]."""
    d, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    total = 0.0
    for b, t in shapes:
        total += layers * (2 * b * t * 12 * d * d + 4 * b * t * t * d)  # QKV, out, MLP; QK^T and AV
        total += 2 * b * t * d * vocab if lm_head else 0
    return total


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_stage(stage: str, model, seqs, trips, args: argparse.Namespace, device, shapes, out: dict) -> float:
    """Run one stage's work once; return its forward-pass matmul FLOPs."""
    import torch

    from icl_dynamics.attention import capture_attention
    from icl_dynamics.relation_index import score_relation_index

    if stage == "forward":
        with torch.inference_mode():
            for ids, mask in batches(seqs, args.batch_size, device):
                model(input_ids=ids, attention_mask=mask)
        return forward_flops(shapes, model_config(args.shape), lm_head=True)
    if stage == "capture":
        with torch.inference_mode(), capture_attention(model, lambda layer, pattern: None):
            for ids, mask in batches(seqs, args.batch_size, device):
                model.base_model(input_ids=ids, attention_mask=mask)
        return forward_flops(shapes, model_config(args.shape), lm_head=False)
    if stage == "relation-index":
        out["rows"] = len(score_relation_index(model, seqs, trips, batch_size=args.batch_size))
        return forward_flops(shapes, model_config(args.shape), lm_head=False)
    raise ValueError(f"unknown stage {stage!r}")


def run_stage(stage: str, args: argparse.Namespace) -> dict:
    """Run one stage in this process; return its measurements."""
    import torch

    from icl_dynamics.models import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    out: dict = {"stage": stage, "device": str(device), "threads": torch.get_num_threads()}
    if stage == "matmul":
        from icl_dynamics.models import resolve_dtype

        n = 8192 if device.type == "cuda" else 2048
        dtype = resolve_dtype(args.dtype)
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        best = float("inf")
        for _ in range(6):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(3):
                a @ b
            sync(device)
            best = min(best, (time.perf_counter() - t0) / 3)
        out.update(seconds=best, flops=2.0 * n**3)
    else:
        seqs, trips = select(*relation_tables(args.relations_dir, args.agenda_dir, args.tokenizer), args.n_sequences)
        model = random_model(device, args.shape, args.dtype)
        shapes = [tuple(ids.shape) for ids, _ in batches(seqs, args.batch_size, "cpu")]
        tokens = int(sum(map(len, seqs.token_ids)))
        warm_ids, warm_mask = next(batches(seqs.tail(2), 2, device))
        with torch.inference_mode():
            model(input_ids=warm_ids, attention_mask=warm_mask)
        timings = []
        for _ in range(args.repeats):
            sync(device)
            t0 = time.perf_counter()
            flops = timed_stage(stage, model, seqs, trips, args, device, shapes, out)
            sync(device)
            timings.append(time.perf_counter() - t0)
        out.update(seconds=min(timings), flops=flops, tokens=tokens, sequences=len(seqs),
                   triplets=len(trips), padded_tokens=sum(b * t for b, t in shapes))
        if device.type == "cuda":
            out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-sequences", type=int, default=60, help="sequences, half per family (0: all)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per stage; the fastest is reported")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--shape", default="70m", help="Pythia size whose shape the random model takes (14m ... 12b)")
    parser.add_argument("--dtype", default="auto", help="auto (float32) | float16 | bfloat16, for every stage")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--relations-dir", type=Path, default=Path("/tmp/icl-dynamics-bench/relations"),
                        help="sequences/triplets Parquet of the relations stage (built here when missing)")
    parser.add_argument("--agenda-dir", type=Path, default=SHARED / "data" / "agenda")
    parser.add_argument("--tokenizer", type=Path,
                        default=SHARED / "data" / "tokenizers" / "gpt-neox-20b" / "tokenizer.json")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        print(json.dumps(run_stage(args.stage, args)))
        return

    relation_tables(args.relations_dir, args.agenda_dir, args.tokenizer)  # build once, outside the timings
    all_seqs, _ = select(*relation_tables(args.relations_dir, args.agenda_dir, args.tokenizer), 0)
    all_tokens = int(sum(map(len, all_seqs.token_ids)))
    results = {}
    for stage in ("matmul", "forward", "capture", "relation-index"):
        cmd = [sys.executable, __file__, "--stage", stage, *(argv if argv is not None else sys.argv[1:])]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"stage {stage} failed:\n{done.stderr}")
        results[stage] = json.loads(done.stdout.strip().splitlines()[-1])
    peak = results["matmul"]["flops"] / results["matmul"]["seconds"]
    ri = results["relation-index"]
    print(f"device {ri['device']} ({ri['threads']} threads); {ri['sequences']} sequences, {ri['tokens']} tokens "
          f"({ri['padded_tokens']} padded), {ri['triplets']} triplets; {ri['rows']} result rows; "
          f"{args.dtype} matmul peak {peak / 1e9:.1f} GFLOP/s; shape pythia-{args.shape}")
    header = f"{'stage':<15}{'seconds':>9}{'tokens/s':>10}{'GFLOP':>9}{'GFLOP/s':>9}{'of peak':>9}" \
             f"{'s/ckpt*':>9}{'vs fwd':>8}{'RSS MB':>8}"
    print(header)
    print("-" * len(header))
    fwd = results["forward"]["seconds"]
    for stage in ("forward", "capture", "relation-index"):
        r = results[stage]
        rate = r["tokens"] / r["seconds"]
        line = (f"{stage:<15}{r['seconds']:>9.2f}{rate:>10.0f}{r['flops'] / 1e9:>9.0f}"
                f"{r['flops'] / r['seconds'] / 1e9:>9.1f}{r['flops'] / r['seconds'] / peak:>9.1%}"
                f"{all_tokens / rate:>9.0f}{r['seconds'] / fwd:>8.2f}{r['peak_rss_mb']:>8.0f}")
        if "gpu_peak_mb" in r:
            line += f"  GPU peak {r['gpu_peak_mb']:.0f} MB"
        print(line)
    print(f"* seconds per checkpoint extrapolated to the full relation set ({len(all_seqs)} sequences, "
          f"{all_tokens} tokens). FLOPs count the forward matmuls only (the LM head for 'forward').")
    rate = ri["tokens"] / ri["seconds"]
    print(f"summary: relation index {ri['seconds'] / fwd:.2f}x a forward pass over the same tokens (target <= 3x), "
          f"{rate:.0f} tokens/s, {ri['flops'] / ri['seconds'] / peak:.1%} of the measured matmul FLOP/s; "
          f"pythia-{args.shape} shape, {args.dtype}, {ri['device']}")


if __name__ == "__main__":
    main()
