# Stage 5: emergence of each ICL level, formation of each head, their relation (all models at once),
# the figures, and what `snakemake --report report.html` shows.

ANALYSIS = config["analysis"]
ANALYSIS_DIR = f"{RESULTS}/analysis"
ANALYSIS_TABLES = ["emergence", "formation", "relation", "summary"]
CATEGORY = "Emergence and formation"
# relation families of the relation index: AGENDA's, the relations toy zoo's planted map, or the copy zoo's
# relations it was never trained on (family planted, no decoy)
RI_FAMILIES = (
    (["planted", "decoy"] if config["schedule"] != "toy" else ["planted"])
    if config["relations"]["planted_map"]
    else ["kg", "syntax"]
)


rule analyze:
    input:
        icl=expand(f"{RESULTS}/{{model}}/icl.parquet", model=MODELS),
        heads=expand(f"{RESULTS}/{{model}}/heads.parquet", model=MODELS),
        relation_index=expand(f"{RESULTS}/{{model}}/relation_index.parquet", model=MODELS),
        provenance=expand(f"{RESULTS}/{{model}}/provenance.parquet", model=MODELS),
    output:
        tables=expand(f"{ANALYSIS_DIR}/{{table}}.parquet", table=ANALYSIS_TABLES),
        summary=report(f"{ANALYSIS_DIR}/summary.csv", caption="../report/emergence_summary.rst", category=CATEGORY),
        panel=report(
            f"{ANALYSIS_DIR}/figures/emergence_panel.png", caption="../report/emergence_panel.rst", category=CATEGORY
        ),
        scatter=report(
            f"{ANALYSIS_DIR}/figures/formation_vs_emergence.png",
            caption="../report/formation_vs_emergence.rst",
            category=CATEGORY,
        ),
        correlation=report(
            f"{ANALYSIS_DIR}/figures/correlation_map.png", caption="../report/correlation_map.rst", category=CATEGORY
        ),
        heatmaps=report(
            expand(f"{ANALYSIS_DIR}/figures/ri_heatmaps-{{model}}-{{family}}.png", model=MODELS, family=RI_FAMILIES),
            caption="../report/ri_heatmaps.rst",
            category="Relation index",
        ),
    log:
        "logs/analyze.log",
    conda:
        "../envs/icl-dynamics.yaml"
    threads: 4
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output.tables[0]),
        options=" ".join(
            [
                f"--shots {ANALYSIS['shots']}" if ANALYSIS["shots"] is not None else "",
                "--per-task" if ANALYSIS["per_task"] else "",
                f"--ri-direction {ANALYSIS['ri_direction']} --ri-gate {ANALYSIS['ri_gate']}",
                f"--ri-variant {ANALYSIS['ri_variant']} --ri-tau {config['relation_index']['tau']}",
                f"--k {ANALYSIS['k']} --n-boot {ANALYSIS['n_boot']} --n-perm {ANALYSIS['n_perm']}",
                f"--top-k {ANALYSIS['top_k']} --seed {ANALYSIS['seed']} --ri-families {' '.join(RI_FAMILIES)}",
                "--include-suspect" if ANALYSIS["include_suspect"] else "",
            ]
        ),
    shell:
        "icl-dynamics analyze --icl {input.icl:q} --heads {input.heads:q} --relation-index {input.relation_index:q} "
        "--provenance {input.provenance:q} {params.options} --out-dir {params.out_dir:q} > {log:q} 2>&1"


# the report's front page (the Snakefile's report: description): this run's result in words, the headline figure first
FRONT_PAGE = f"{ANALYSIS_DIR}/front_page.rst"


rule front_page:
    input:
        tables=rules.analyze.output.tables,
        panel=rules.analyze.output.panel,
        provenance=expand(f"{RESULTS}/{{model}}/provenance.parquet", model=MODELS),
    output:
        FRONT_PAGE,
    log:
        "logs/front_page.log",
    localrule: True
    conda:
        "../envs/icl-dynamics.yaml"
    params:
        tables=lambda wildcards, input: {os.path.basename(p).split(".")[0]: p for p in input.tables},
        top_k=ANALYSIS["top_k"],
    shell:
        "icl-dynamics front-page --summary {params.tables[summary]:q} --emergence {params.tables[emergence]:q} "
        "--formation {params.tables[formation]:q} --provenance {input.provenance:q} --figure {input.panel:q} "
        "--top-k {params.top_k} --out {output:q} > {log:q} 2>&1"


# the ablations over training: do the flagged heads carry relation recall and ICL (icl_dynamics.causal)
CAUSAL_TABLES = ["causal_correlation", "causal_series", "causal_emergence", "causal_order"]


rule causal:
    input:
        ablation=expand(f"{RESULTS}/{{model}}/ablation.parquet", model=MODELS),
        heads=expand(f"{RESULTS}/{{model}}/heads.parquet", model=MODELS),
        relation_index=expand(f"{RESULTS}/{{model}}/relation_index.parquet", model=MODELS),
        provenance=expand(f"{RESULTS}/{{model}}/provenance.parquet", model=MODELS),
        emergence=f"{ANALYSIS_DIR}/emergence.parquet",
    output:
        tables=expand(f"{ANALYSIS_DIR}/{{table}}.parquet", table=CAUSAL_TABLES),
        figures=report(
            expand(f"{ANALYSIS_DIR}/figures/causal-{{model}}.png", model=MODELS),
            caption="../report/causal.rst",
            category="Causal check",
        ),
    log:
        "logs/causal.log",
    conda:
        "../envs/icl-dynamics.yaml"
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output.tables[0]),
        options=" ".join(
            [
                f"--ri-direction {ANALYSIS['ri_direction']} --ri-gate {ANALYSIS['ri_gate']}",
                f"--ri-variant {ANALYSIS['ri_variant']} --k {ANALYSIS['k']} --n-boot {ANALYSIS['n_boot']}",
                f"--seed {ANALYSIS['seed']}",
                "--include-suspect" if ANALYSIS["include_suspect"] else "",
            ]
        ),
    shell:
        "icl-dynamics causal --ablation {input.ablation:q} --heads {input.heads:q} "
        "--relation-index {input.relation_index:q} --provenance {input.provenance:q} --emergence {input.emergence:q} "
        "{params.options} --out-dir {params.out_dir:q} > {log:q} 2>&1"


# seed groups: each group's runs side by side, pooled over runs, with a group verdict (icl_dynamics.seed_groups)
GROUPS = config["groups"]
GROUP_DIR = f"{ANALYSIS_DIR}/groups"
GROUP_TABLES = ["group_midpoints", "group_lags", "group_sources"]


rule groups:
    input:
        summary=f"{ANALYSIS_DIR}/summary.parquet",
    output:
        tables=expand(f"{GROUP_DIR}/{{table}}.parquet", table=GROUP_TABLES),
        forest=report(f"{GROUP_DIR}/figures/lag_forest.png", caption="../report/lag_forest.rst", category="Seed groups"),
        sizes=report(f"{GROUP_DIR}/figures/sizes.png", caption="../report/group_sizes.rst", category="Seed groups"),
        midpoints=report(
            expand(f"{GROUP_DIR}/figures/midpoints-{{group}}.png", group=list(GROUPS)),
            caption="../report/group_midpoints.rst",
            category="Seed groups",
        ),
    log:
        "logs/groups.log",
    conda:
        "../envs/icl-dynamics.yaml"
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output.tables[0]),
        groups=" ".join(
            "--group " + " ".join(shlex.quote(v) for v in [name, spec["varies"], *spec["runs"]])
            for name, spec in GROUPS.items()
        ),
    shell:
        "icl-dynamics groups --summary {input.summary:q} {params.groups} --out-dir {params.out_dir:q} > {log:q} 2>&1"
