# Stage 1: one job per (model, step) puts the checkpoint into the HF cache and verifies it.
# With schedule "toy" or "toy-relations" that toy zoo is trained first and serves as the (offline) hub cache.
# With keep_weights false, what a checkpoint's fetch downloaded leaves the cache once its score job is
# done (evict), and the fetch of a model's i-th checkpoint (steps ascending) waits for the eviction of
# its (i - max_cached_checkpoints)-th: at most that many checkpoints per model are in the cache at once.

TOY_ZOO = f"{config['toy_zoo']['dir']}/zoo.json"
# a zoo also writes a relation map and the texts the relations stage reads (the relations zoo its planted
# relations, the copy zoo its decoys): outputs of the zoo's job when the configuration reads them
TOY_ZOO_PLANTED = [f"{config['toy_zoo']['dir']}/{name}" for name in ("planted.json", "relations.jsonl")]
READS_ZOO_MAP = config["schedule"] != "pythia" and config["relations"]["planted_map"] == TOY_ZOO_PLANTED[0]


rule toy_zoo:
    output:
        TOY_ZOO,
        f"{config['toy_zoo']['dir']}/training.parquet",  # its training curve (the relations zoo's control figure)
        TOY_ZOO_PLANTED if READS_ZOO_MAP else [],
    log:
        "logs/toy_zoo.log",
    conda:
        "../envs/icl-dynamics.yaml"
    params:
        out=lambda wildcards, output: os.path.dirname(output[0]),
        seed=config["toy_zoo"]["seed"],
        kind=config["schedule"],
    shell:
        "icl-dynamics toy-zoo --kind {params.kind} --out {params.out:q} --seed {params.seed} > {log:q} 2>&1"


rule fetch_slot:
    input:
        previous_eviction,
    output:
        touch(f"{RESULTS}/{{model}}/step{{step}}/fetch_slot"),
    localrule: True


rule fetch:
    input:
        TOY_ZOO if config["schedule"] in ("toy", "toy-relations") else [],
        fetch_turn,
    output:
        f"{RESULTS}/{{model}}/step{{step}}/provenance.parquet",
    log:
        "logs/{model}/step{step}/fetch.log",
    retries: 1
    localrule: NETWORK_LOCAL
    conda:
        "../envs/icl-dynamics.yaml"
    resources:
        hub=1,
    params:
        flags=lambda wc: checkpoint_flags(wc.model, wc.step, device=False),
        attempts=config["fetch"]["attempts"],
        timeout=config["fetch"]["timeout"],
        min_rate=config["fetch"]["min_rate"],
    shell:
        cli(
            "fetch {params.flags} --attempts {params.attempts} --timeout {params.timeout} "
            "--min-rate {params.min_rate} --out {output:q}"
        )
        + " > {log:q} 2>&1"
