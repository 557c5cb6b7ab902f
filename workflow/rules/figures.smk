# Stage 4: figures (PNG and PDF side by side).

FIGURES = ["prefix_matching_heatmap", "top_heads_vs_icl"]


rule figures:
    input:
        heads=f"{RESULTS}/{{model}}/heads.parquet",
        icl=f"{RESULTS}/{{model}}/icl.parquet",
        provenance=f"{RESULTS}/{{model}}/provenance.parquet",
    output:
        expand(f"{RESULTS}/{{{{model}}}}/figures/{{figure}}.{{ext}}", figure=FIGURES, ext=["png", "pdf"]),
    conda:
        "../envs/icl-dynamics.yaml"
    log:
        "logs/{model}/figures.log",
    params:
        out_dir=f"{RESULTS}/{{model}}/figures",
        steps=(
            "--heatmap-steps " + " ".join(map(str, config["figures"]["heatmap_steps"]))
            if config["figures"]["heatmap_steps"]
            else ""
        ),
        top_k=config["figures"]["top_k"],
    shell:
        "icl-dynamics figures --heads {input.heads} --icl {input.icl} --provenance {input.provenance} "
        "{params.steps} --top-k {params.top_k} --out-dir {params.out_dir} 2> {log}"
