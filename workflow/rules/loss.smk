# Stage 2b: ICL level 1 (loss reduction). Text is selected and tokenised once per model, with the
# tokenizer of the first measured checkpoint, and reused at every checkpoint.

LOSS = config["loss"]


rule tokenize_text:
    input:
        provenance_of(STEPS[0]),
    output:
        f"{RESULTS}/{{model}}/text_tokens.parquet",
    conda:
        "../envs/icl-dynamics.yaml"
    log:
        "logs/{model}/tokenize_text.log",
    params:
        flags=lambda wc: checkpoint_flags(wc.model, STEPS[0], device=False),
        text=text_flags(),
    shell:
        cli("tokenize-text {params.flags} {params.text} --out {output}") + " 2> {log}"


rule loss:
    input:
        provenance_of("{step}"),
        text_tokens=f"{RESULTS}/{{model}}/text_tokens.parquet",
    output:
        scores=f"{RESULTS}/{{model}}/step{{step}}/loss.parquet",
        curve=f"{RESULTS}/{{model}}/step{{step}}/loss_curve.parquet",
    conda:
        "../envs/icl-dynamics.yaml"
    log:
        "logs/{model}/step{step}/loss.log",
    params:
        flags=lambda wc: checkpoint_flags(wc.model, wc.step),
        loss=(
            f"--early {LOSS['early']} --late {LOSS['late']} --batch-size {LOSS['batch_size']} "
            f"--bootstrap {LOSS['bootstrap']}"
        ),
    resources:
        gpu=1,
    shell:
        cli(
            "loss {params.flags} --text-tokens {input.text_tokens} {params.loss} "
            "--out {output.scores} --out-curve {output.curve}"
        ) + " 2> {log}"
