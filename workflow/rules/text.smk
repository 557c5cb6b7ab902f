# ICL level 1's natural text: selected and tokenised once per model, with the tokenizer of the first
# measured checkpoint, and reused by the score job of every checkpoint.


rule tokenize_text:
    input:
        provenance=first_provenance,
    output:
        f"{RESULTS}/{{model}}/text_tokens.parquet",
    log:
        "logs/{model}/tokenize_text.log",
    localrule: NETWORK_LOCAL  # a hub dataset is downloaded here
    conda:
        "../envs/icl-dynamics.yaml"
    params:
        flags=lambda wc: checkpoint_flags(wc.model, steps_of(wc.model)[0], device=False),
        text=text_flags(),
    shell:
        cli("tokenize-text {params.flags} --provenance {input.provenance:q} {params.text} --out {output:q}")
        + " > {log:q} 2>&1"
