# Relation triplets (KG from AGENDA, syntax from spaCy; or the relations toy zoo's planted map),
# once per model's tokenizer; they do not depend on the checkpoint, so every relation-index job of
# the model reuses them.

RELATIONS = config["relations"]
AGENDA_DIR = RELATIONS["agenda_dir"] or "resources/agenda"
PLANTED = RELATIONS["planted_map"]


if not RELATIONS["agenda_dir"] and not PLANTED:

    rule fetch_agenda:
        output:
            f"{AGENDA_DIR}/preprocessed.test.tsv",
            f"{AGENDA_DIR}/relations.vocab",
        log:
            "logs/fetch_agenda.log",
        localrule: NETWORK_LOCAL
        conda:
            "../envs/icl-dynamics.yaml"
        params:
            dest=lambda wildcards, output: os.path.dirname(output[0]),
        shell:
            "icl-dynamics fetch-agenda --dest {params.dest:q} > {log:q} 2>&1"


rule relations:
    input:
        provenance=first_provenance,
        planted_or_agenda=(
            [PLANTED, RELATIONS["planted_texts"]]
            if PLANTED
            else [f"{AGENDA_DIR}/preprocessed.test.tsv", f"{AGENDA_DIR}/relations.vocab"]
        ),
    output:
        multiext(f"{RESULTS}/{{model}}/relations/", "sequences.parquet", "triplets.parquet", "summary.parquet"),
    log:
        "logs/{model}/relations.log",
    conda:
        "../envs/icl-dynamics.yaml"
    params:
        flags=lambda wc: checkpoint_flags(wc.model, steps_of(wc.model)[0], device=False),
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
        options=(
            f"--planted-map {shlex.quote(PLANTED)} --planted-texts {shlex.quote(RELATIONS['planted_texts'])}"
            if PLANTED
            else " ".join(
                [
                    f"--agenda-dir {shlex.quote(AGENDA_DIR)} --unit {RELATIONS['unit']}",
                    f"--anchor {RELATIONS['anchor']} --spacy-model {shlex.quote(RELATIONS['spacy_model'])}",
                    "" if RELATIONS["kg_letters"] else "--no-kg-letters",
                    f"--syntax-column {shlex.quote(RELATIONS['syntax_column'])}",
                    f"--syntax-split {shlex.quote(RELATIONS['syntax_split'])}",
                    (f"--syntax-texts {shlex.quote(RELATIONS['syntax_texts'])}" if RELATIONS["syntax_texts"] else ""),
                ]
            )
        ),
    shell:
        cli("relations {params.flags} --provenance {input.provenance:q} {params.options} --out-dir {params.out_dir:q}")
        + " > {log:q} 2>&1"
