"""Does mean-ablating a head at position 0 (the attention sink every later head reads) change which heads
the causal check ranks first? Measured on both toy zoos at every checkpoint (issue 24, item 7).

For each zoo and checkpoint, every head is mean-ablated alone on the ablation stage's evaluation sets at the
toy configs' sizes (the ICL score on 32 documents, loss at token 60 minus token 4; the synthetic tasks at 5
shots, 20 prompts each; relation recall on the relations zoo's planted relations, 64 sequences), twice:

* ``all``: the output replaced at every position by its mean over every real position;
* ``keep first``: position 0 keeps its own output and the mean is taken over the other positions.

Prints per zoo and metric: the Spearman correlation across heads of the two effect vectors (its lowest and
median over checkpoints), how many checkpoints change the top head and the top-2 set, and the largest
absolute difference of an effect. Needs the zoos (``icl-dynamics toy-zoo --kind ... --out ...``):

    python benchmarks/ablation_first_position.py --toy-zoo resources/toy-zoo --relations-zoo resources/toy-zoo-relations
"""

from __future__ import annotations

import argparse
from pathlib import Path


def evaluations(zoo: Path, ckpt, planted: bool) -> list:
    from icl_dynamics.evaluation_sets import toy_zoo_sets

    return toy_zoo_sets(zoo, ckpt.model, ckpt.tokenizer, planted=planted)


def measure(zoo: Path, model_id: str, planted: bool):
    import numpy as np
    import pandas as pd
    from scipy import stats

    from icl_dynamics.ablation import head_ablation_effects
    from icl_dynamics.models import load_checkpoint
    from icl_dynamics.toyzoo import read_manifest

    rows = []
    for step in read_manifest(zoo)["config"]["steps"]:
        ckpt = load_checkpoint(model_id, step, cache_dir=zoo / "hub", device="cpu")
        sets = evaluations(zoo, ckpt, planted)
        both = {keep: head_ablation_effects(ckpt.model, sets, n_boot=1, keep_first=keep) for keep in (False, True)}
        for (metric, task), a in both[False].groupby(["metric", "task"]):
            b = both[True].set_index(["metric", "task", "layer", "head"]).loc[
                [(metric, task, la, h) for la, h in zip(a["layer"], a["head"])], "value"].to_numpy()
            x = a["value"].to_numpy()
            top = lambda v, k: set(np.argsort(-np.abs(v))[:k])  # noqa: E731  the heads that matter most
            rho = stats.spearmanr(x, b).statistic if np.ptp(x) > 0 and np.ptp(b) > 0 else np.nan
            rows.append({"step": step, "metric": metric, "task": task, "rho": rho,
                         "top1_changed": top(x, 1) != top(b, 1), "top2_changed": top(x, 2) != top(b, 2),
                         "max_abs_diff": float(np.max(np.abs(x - b)))})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toy-zoo", type=Path, required=True)
    parser.add_argument("--relations-zoo", type=Path, required=True)
    args = parser.parse_args()
    from icl_dynamics.toyzoo import RELATIONS_MODEL_ID, TOY_MODEL_ID

    for name, zoo, model_id, planted in (("toy", args.toy_zoo, TOY_MODEL_ID, False),
                                         ("toy-relations", args.relations_zoo, RELATIONS_MODEL_ID, True)):
        got = measure(zoo, model_id, planted)
        summary = got.groupby(["metric", "task"]).agg(
            checkpoints=("step", "size"), rho_min=("rho", "min"), rho_median=("rho", "median"),
            top1_changed=("top1_changed", "sum"), top2_changed=("top2_changed", "sum"),
            max_abs_diff=("max_abs_diff", "max"))
        print(f"\n{name} zoo: every head mean-ablated at all positions vs. position 0 kept")
        print(summary.to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
