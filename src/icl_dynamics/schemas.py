"""The tables the measurement stages write, as explicit pyarrow schemas.

They live apart from the code that computes them (which needs torch) so that merging, figures,
notebooks and the results README's check read and validate tables without loading a model.
"""

from __future__ import annotations

import pyarrow as pa

# every step-indexed table begins with these: the model, the checkpoint and the tokens it had seen
CHECKPOINT_FIELDS = (
    pa.field("model", pa.string(), nullable=False),
    pa.field("step", pa.int64(), nullable=False),
    pa.field("tokens", pa.int64(), nullable=False),
)
HEAD_FIELDS = (pa.field("layer", pa.int32(), nullable=False), pa.field("head", pa.int32(), nullable=False))

ATTENTION_SCORES = ("prefix_matching", "previous_token")
SCORES = (*ATTENTION_SCORES, "copying")

# induction scores per head (icl_dynamics.induction)
INDUCTION_SCHEMA = pa.schema(
    [
        *CHECKPOINT_FIELDS,
        *HEAD_FIELDS,
        *(
            pa.field(f"{score}{suffix}", pa.float64(), nullable=False)
            for score in SCORES
            for suffix in ("", "_se", "_control")
        ),
        pa.field("n_samples", pa.int32(), nullable=False),
    ]
)

# the ICL levels: loss reduction (icl) and the synthetic tasks (icl_tasks)
ICL_SCHEMA = pa.schema(
    [
        *CHECKPOINT_FIELDS,
        pa.field("level", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("shots", pa.int32()),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
        pa.field("ci_low", pa.float64(), nullable=False),
        pa.field("ci_high", pa.float64(), nullable=False),
        pa.field("n", pa.int64(), nullable=False),
        pa.field("chance", pa.float64()),
    ]
)
"""One row per (model, step, level, task, shots, metric); ``shots`` and ``chance`` are null for loss rows."""

# the natural-text documents, tokenised once per model (icl)
TEXT_TOKENS_SCHEMA = pa.schema(
    [
        pa.field("doc_index", pa.int64(), nullable=False),
        pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
    ]
)

# the per-token loss curve (icl)
LOSS_CURVE_SCHEMA = pa.schema(
    [
        *CHECKPOINT_FIELDS,
        pa.field("position", pa.int32(), nullable=False),
        pa.field("loss", pa.float64(), nullable=False),
        pa.field("ci_low", pa.float64(), nullable=False),
        pa.field("ci_high", pa.float64(), nullable=False),
        pa.field("n_docs", pa.int64(), nullable=False),
    ]
)
"""Mean next-token loss of the token at ``position`` (predicted from the tokens before it)."""

# the relation index per head and relation (icl_dynamics.relation_index)
RELATION_INDEX_SCHEMA = pa.schema(
    [
        *CHECKPOINT_FIELDS,
        *HEAD_FIELDS,
        pa.field("family", pa.string(), nullable=False),
        pa.field("relation", pa.string(), nullable=False),
        pa.field("direction", pa.string(), nullable=False),
        pa.field("gate", pa.string(), nullable=False),
        pa.field("variant", pa.string(), nullable=False),
        pa.field("tau", pa.float64()),  # null for the argmax gate
        pa.field("ri", pa.float64()),  # null (NaN) when the head never qualified
        pa.field("ri_se", pa.float64()),  # two-way cluster-robust SE (documents, token pairs); null below 2 clusters
        pa.field("events", pa.int64(), nullable=False),  # qualifying events with a defined score
        pa.field("passes", pa.int64(), nullable=False),  # opportunities passing the gate
        pa.field("opportunities", pa.int64(), nullable=False),  # (triplet, j) with the tail in C_j
        pa.field("pass_rate", pa.float64()),  # passes / opportunities
        pa.field("ri_per_opportunity", pa.float64()),  # sum of a / opportunities
        pa.field("triplets", pa.int64(), nullable=False),  # triplets with >= 1 opportunity
        pa.field("triplets_qualified", pa.int64(), nullable=False),  # triplets with >= 1 event
        pa.field("control_matched", pa.float64()),  # mean score of the matched control (same kind of token)
        pa.field("control_matched_events", pa.int64(), nullable=False),
        pa.field("control_tenth", pa.float64()),
        pa.field("control_tenth_events", pa.int64(), nullable=False),
        pa.field("control_random", pa.float64()),
        pa.field("control_random_events", pa.int64(), nullable=False),
        # the SIH test: RI against each control, paired per event, clustered by document and token pair
        pa.field("effect", pa.float64()),  # primary effect: mean of (a - matched control) over its events
        pa.field("effect_se", pa.float64()),  # its cluster-robust (CR2) standard error
        pa.field("effect_tenth", pa.float64()),  # mean of (a - tenth-token control) over its events
        pa.field("effect_tenth_se", pa.float64()),
        pa.field("effect_random", pa.float64()),  # mean of (a - random control) over its events
        pa.field("effect_random_se", pa.float64()),
        # clusters behind the test: the fewer of documents and token pairs, the fewest over the controls
        pa.field("clusters", pa.int64(), nullable=False),
        pa.field("effective_clusters", pa.float64(), nullable=False),  # the same, as Kish effective counts
        pa.field("p_value", pa.float64()),  # one-sided, the largest of the three controls' p
        pa.field("p_adjusted", pa.float64()),  # Holm over the tested cells of the (gate, variant) (see below)
        # sih | not significant | insufficient | negative control
        pa.field("sih_status", pa.string(), nullable=False),
        pa.field("sih", pa.bool_(), nullable=False),
        # a negative control (kg-letters under literal/source): never an SIH, tested as its own Holm family
        pa.field("negative_control", pa.bool_(), nullable=False),
        pa.field("negative_control_flagged", pa.bool_(), nullable=False),  # it passed that test: a broken test
        # the margin gate's statistic, attention on the argmax key / on the runner-up, over every query
        # of the scored sequences: this head's median and 95th percentile, and the 95th percentile over
        # all heads (the paper's tau = 2.2 was its model's 95th percentile), to judge tau per model
        pa.field("ratio_p50", pa.float64()),
        pa.field("ratio_p95", pa.float64()),
        pa.field("ratio_p95_model", pa.float64()),
        # parameters of the scoring and of the SIH rule, repeated on every row so that merged
        # tables (which drop file metadata) stay self-describing
        pa.field("exclude_function_words", pa.bool_(), nullable=False),
        pa.field("control_position", pa.int32(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("alpha", pa.float64(), nullable=False),
        pa.field("min_clusters", pa.int64(), nullable=False),
        pa.field("bos", pa.bool_(), nullable=False),  # sequences scored with <|endoftext|> prepended
    ]
)
"""One row per (model, step, layer, head, family, relation, direction, gate, variant)."""

# the causal check: effect of mean-ablating a head, or a group of heads, on relation recall and ICL
# (icl_dynamics.ablation)
ABLATION_SCHEMA = pa.schema(
    [
        *CHECKPOINT_FIELDS,
        # head | group | control (a group's layer-matched null) | importance (a group over the mean of its controls)
        pa.field("ablation", pa.string(), nullable=False),
        # exact (the model run with the heads mean-ablated) | attribution (the gradient screen's estimate)
        pa.field("method", pa.string(), nullable=False),
        *(f.with_nullable(True) for f in HEAD_FIELDS),  # the ablated head; null for groups and controls
        pa.field("group", pa.string()),  # the group's name (a control: the group it is matched to); null for heads
        pa.field("draw", pa.int32()),  # the control's seeded draw; null otherwise
        pa.field("heads", pa.list_(pa.string()), nullable=False),  # every ablated head, as "L<layer>H<head>"
        pa.field("level", pa.string(), nullable=False),  # relation_recall | loss_reduction | format_compliance | ...
        pa.field("task", pa.string(), nullable=False),  # relation family, text source or synthetic task
        pa.field("shots", pa.int32()),  # the tasks' shot count; null otherwise
        pa.field("metric", pa.string(), nullable=False),  # tail_logprob | icl_score | format_compliance | ...
        pa.field("value", pa.float64(), nullable=False),  # effect: mean over units of ablated minus clean
        pa.field("ci_low", pa.float64(), nullable=False),  # percentile bootstrap over units (95%)
        pa.field("ci_high", pa.float64(), nullable=False),
        pa.field("baseline", pa.float64(), nullable=False),  # the clean (unablated) mean
        pa.field("n", pa.int64(), nullable=False),  # units: documents (recall, ICL score) or prompts (tasks)
        pa.field("events", pa.int64(), nullable=False),  # reads behind them (relation events, documents, prompts)
    ]
)
"""One row per (model, step, ablated head or group or control draw, level, task, shots, metric)."""

# the score job's per-checkpoint tables (step<N>/<name>.parquet) by name
STAGE_TABLES: dict[str, pa.Schema] = {
    "heads": INDUCTION_SCHEMA,
    "loss": ICL_SCHEMA,
    "loss_curve": LOSS_CURVE_SCHEMA,
    "icl_tasks": ICL_SCHEMA,
    "relation_index": RELATION_INDEX_SCHEMA,
    "ablation": ABLATION_SCHEMA,
}
