"""Seconds per checkpoint of the score job (one process: imports, load, every stage, write) on
random Pythia-shaped checkpoints, as the workflow runs it.

Two steps, because the machine that times may lack ../shared and spaCy (the GPU machine does):

    python benchmarks/score_checkpoint.py prepare            # here: copies what the run needs
    python benchmarks/score_checkpoint.py run --shapes 160m 1.4b --device cuda

``prepare`` writes ``benchmarks/.data/`` (git-ignored, ~10 MB): Pythia's tokenizer and config files
from ../shared, the relation tables of the AGENDA test split with that tokenizer (the default
measurement set's relations stage) and 200 documents of 512 random token ids (the loss stage's
input; its cost does not depend on the text). ``run`` writes each shape as a hub-layout cache
(float16 ``pytorch_model.bin`` under Pythia's key names, as on the hub), fetches it (offline: the
hash check), then times ``icl-dynamics score`` with the default options as a fresh process,
``--repeats`` times (the first pays CUDA's start-up and a cold page cache). It prints one table and a
summary line; the score log's own breakdown (import, inputs, load, each stage, write) says where the
time goes. ``--profile DIR`` also writes a torch profile of the relation-index stage of the first shape.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "benchmarks" / ".data"
SHARED = Path(os.environ.get("ICL_SHARED", REPO.parent / "shared"))
MODEL = "EleutherAI/pythia-bench"
STEP = 1000
PHASES = re.compile(r"scored in ([\d.]+) s: (.*)$", re.M)


def prepare(data: Path) -> None:
    """Copy the tokenizer and config files, build the relation tables and the random documents."""
    import numpy as np
    from transformers import PreTrainedTokenizerFast

    from icl_dynamics import io
    from icl_dynamics.agenda import verify_agenda
    from icl_dynamics.pythia_format import CONFIG_SOURCE, TOKENIZER_SOURCES
    from icl_dynamics.relations import build_relations, write_relations
    from icl_dynamics.schemas import TEXT_TOKENS_SCHEMA

    for source in (*TOKENIZER_SOURCES.values(), CONFIG_SOURCE):
        (data / "shared" / source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SHARED / source, data / "shared" / source)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(SHARED / TOKENIZER_SOURCES["tokenizer.json"]))
    write_relations(build_relations(verify_agenda(SHARED / "data" / "agenda"), tokenizer), data / "relations")
    rng = np.random.default_rng(0)
    docs = rng.integers(10, 50_000, size=(200, 512), dtype=np.int32)
    io.write_rows({"doc_index": list(range(len(docs))), "token_ids": [d.tolist() for d in docs]}, TEXT_TOKENS_SCHEMA,
                  data / "text_tokens.parquet",
                  meta={"source": {"kind": "text", "name": None, "path": "random-tokens", "split": "train",
                                   "column": "text"}})
    print(f"prepared {data}")


def cli(*args: str) -> list[str]:
    """The icl-dynamics command line, installed or not (PYTHONPATH=src on a bare machine)."""
    return [sys.executable, "-m", "icl_dynamics.cli", *args]


def run(args: argparse.Namespace) -> None:
    import torch

    from icl_dynamics.pythia_format import PythiaShape, write_pythia_cache

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    import transformers

    print(f"machine: {gpu}, {os.cpu_count()} CPUs; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"device {args.device}, dtype {args.dtype}")
    header = f"{'shape':<7}{'params':>8}{'write':>8}{'fetch':>8}{'run':>5}{'wall s':>9}  breakdown (score log)"
    print(header)
    print("-" * (len(header) + 60))
    summary = []
    for shape_name in args.shapes:
        shape = PythiaShape.named(shape_name)
        with tempfile.TemporaryDirectory(prefix="icl-bench-") as tmp:
            cache, out = Path(tmp) / "hub", Path(tmp) / "out"
            start = time.perf_counter()
            write_pythia_cache(cache, MODEL, args.data / "shared", {STEP: STEP}, shape=shape)
            written = time.perf_counter() - start
            common = ["--model", MODEL, "--step", str(STEP), "--cache-dir", str(cache)]
            start = time.perf_counter()
            subprocess.run(cli("fetch", *common, "--out", str(out / "provenance.parquet")), env=env, check=True,
                           capture_output=True)
            fetched = time.perf_counter() - start
            params = _parameters(args.data / "shared", shape)
            for repeat in range(1, args.repeats + 1):
                command = cli("score", *common, "--device", args.device, "--dtype", args.dtype, "--provenance",
                              str(out / "provenance.parquet"), "--text-tokens", str(args.data / "text_tokens.parquet"),
                              "--relations-dir", str(args.data / "relations"), "--out-dir", str(out))
                start = time.perf_counter()
                done = subprocess.run(command, env=env, capture_output=True, text=True)
                wall = time.perf_counter() - start
                if done.returncode:
                    sys.exit(f"score failed on {shape_name}:\n{done.stderr[-3000:]}")
                phases = PHASES.search(done.stderr)
                print(f"{shape_name:<7}{params / 1e6:>7.0f}M{written:>8.1f}{fetched:>8.1f}{repeat:>5}{wall:>9.1f}  "
                      f"{phases.group(2) if phases else '?'}")
                summary.append((shape_name, wall))
            if args.profile and shape_name == args.shapes[0]:
                profile_relation_index(cache, args, Path(args.profile) / f"relation_index_{shape_name}.txt")
    best = {name: min(w for n, w in summary if n == name) for name in args.shapes}
    print("summary: " + ", ".join(f"pythia-{name} {wall:.1f} s per checkpoint" for name, wall in best.items())
          + f" (best of {args.repeats}, wall incl. process start and load; {gpu})")


def _parameters(shared: Path, shape) -> int:
    """Parameters of the model of ``shape`` (built on the meta device: no memory, no time)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from icl_dynamics.pythia_format import pythia_config

    config = {k: v for k, v in pythia_config(shared, shape).items() if k != "torch_dtype"}
    with torch.device("meta"):
        return sum(p.numel() for p in GPTNeoXForCausalLM(GPTNeoXConfig(**config)).parameters())


def profile_relation_index(cache: Path, args: argparse.Namespace, out: Path) -> None:
    """Where the relation index's time goes: torch's profiler, ops sorted by their own device time."""
    import pyarrow.parquet as pq
    import torch
    from torch.profiler import ProfilerActivity, profile

    from icl_dynamics.models import load_checkpoint
    from icl_dynamics.relation_index import score_relation_index

    ckpt = load_checkpoint(MODEL, STEP, cache_dir=cache, device=args.device, dtype=args.dtype, tokenizer=False)
    sequences, triplets = (pq.read_table(args.data / "relations" / f"{n}.parquet") for n in ("sequences", "triplets"))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        score_relation_index(ckpt.model, sequences, triplets)
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(prof.key_averages().table(sort_by=key, row_limit=25))
    print(f"relation-index profile: {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="copy the inputs into benchmarks/.data (needs ../shared and spaCy)")
    p.add_argument("--data", type=Path, default=DATA)
    p = sub.add_parser("run", help="time the score job per shape")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--shapes", nargs="+", default=["160m", "1.4b"], help="Pythia sizes (14m ... 12b)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--profile", default=None, help="folder for the relation-index profile of the first shape")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.data)
    else:
        if not (args.data / "relations" / "triplets.parquet").exists():
            sys.exit(f"{args.data} is not prepared: run `python benchmarks/score_checkpoint.py prepare` first")
        run(args)


if __name__ == "__main__":
    main()
