# Stage 4: one model's figures (PNG and PDF side by side) in results/<model>/figures/.


rule figures:
    input:
        heads=f"{RESULTS}/{{model}}/heads.parquet",
        icl=f"{RESULTS}/{{model}}/icl.parquet",
        loss_curve=f"{RESULTS}/{{model}}/loss_curve.parquet",
        relation_index=f"{RESULTS}/{{model}}/relation_index.parquet",
        provenance=f"{RESULTS}/{{model}}/provenance.parquet",
    output:
        report(
            directory(f"{RESULTS}/{{model}}/figures"),
            patterns=["{name}.png"],
            caption="../report/model_figures.rst",
            category="Per model",
            subcategory="{model}",
        ),
    conda:
        "../envs/icl-dynamics.yaml"
    log:
        "logs/{model}/figures.log",
    params:
        steps=(
            "--heatmap-steps " + " ".join(map(str, config["figures"]["heatmap_steps"]))
            if config["figures"]["heatmap_steps"]
            else ""
        ),
        top_k=config["figures"]["top_k"],
    shell:
        "icl-dynamics figures --heads {input.heads} --icl {input.icl} --loss-curve {input.loss_curve} "
        "--relation-index {input.relation_index} --provenance {input.provenance} "
        "{params.steps} --top-k {params.top_k} --out-dir {output} 2> {log}"
