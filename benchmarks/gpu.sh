#!/usr/bin/env bash
# The GPU benchmark (issue 12): seconds per checkpoint of the score job for pythia-160m and -1.4b
# shapes, the relation index against a plain forward pass over the same tokens, and the ablation
# stage's cost (issues 15, 29: gradient screen + exact against exact only) on the 160m shape. For a machine
# with a GPU, PyTorch, transformers, pandas, pyarrow and scipy, no network and nothing of ours
# installed (the package runs from src/). It needs benchmarks/.data, made beforehand where ../shared
# and spaCy are:  python benchmarks/score_checkpoint.py prepare   (then carry benchmarks/.data).
#
#   bash benchmarks/gpu.sh              # results, tables and a relation-index profile in $OUT
#   DEVICE=cpu SHAPES=14m ABLATION_SHAPES=14m bash benchmarks/gpu.sh   # the CPU dry run
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export ICL_SHARED="$PWD/benchmarks/.data/shared"  # Pythia's config and tokenizer files, copied by prepare
OUT="${OUT:-/tmp/icl-dynamics-gpu-bench}"
DEVICE="${DEVICE:-cuda}"
SHAPES="${SHAPES:-160m 1.4b}"
ABLATION_SHAPES="${ABLATION_SHAPES:-160m}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
if [ ! -f benchmarks/.data/relations/triplets.parquet ]; then
    echo "benchmarks/.data is missing: run 'python benchmarks/score_checkpoint.py prepare' where ../shared is" >&2
    exit 1
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PYTHON" benchmarks/score_checkpoint.py run --shapes $SHAPES --device "$DEVICE" --repeats 2 --profile "$OUT"
    for shape in $SHAPES; do
        echo
        "$PYTHON" benchmarks/relation_index.py --shape "$shape" --device "$DEVICE" --n-sequences 0 --repeats 1 \
            --relations-dir benchmarks/.data/relations
    done
    echo  # the ablation stage (issues 15, 29) at its default sizes: the screen + exact against exact only
    "$PYTHON" benchmarks/ablation.py --shapes $ABLATION_SHAPES --device "$DEVICE"
} 2>&1 | tee "$OUT/gpu-bench.txt"
