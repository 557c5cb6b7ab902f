# icl-dynamics: how in-context learning and induction heads arise over training checkpoints.
# Run: snakemake --cores 8 --workflow-profile workflow/profiles/local   (see README.md)

from snakemake.exceptions import WorkflowError

from icl_dynamics.checkpoints import model_slug, parameter_count, unslug
from icl_dynamics.config import ConfigError, validate_config
from icl_dynamics.stages import STAGES


configfile: "config.yaml"


try:
    config = validate_config(config, workflow.source_path("workflow/schemas/config.schema.yaml"))
except ConfigError as exc:
    raise WorkflowError(f"invalid configuration: {exc}")

RESULTS = config["results"]
MODELS = [model_slug(m) for m in config["models"]]
STEPS = config["steps"]


include: "workflow/rules/common.smk"
include: "workflow/rules/fetch.smk"
include: "workflow/rules/text.smk"
include: "workflow/rules/relations.smk"
include: "workflow/rules/score.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/analysis.smk"


rule all:
    default_target: True
    input:
        expand(f"{RESULTS}/{{model}}/figures", model=MODELS),
        expand(f"{RESULTS}/{{model}}/{{stage}}.parquet", model=MODELS, stage=MERGED),
        expand(f"{RESULTS}/{{model}}/relations/summary.parquet", model=MODELS),
        rules.analyze.output,
        rules.causal.output,
        [] if KEEP_WEIGHTS else [evicted(model, step) for model in MODELS for step in steps_of(model)],
