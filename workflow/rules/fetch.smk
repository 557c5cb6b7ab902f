# Stage 1: one job per (model, step) puts the checkpoint into the HF cache and verifies it.
# With schedule "toy" or "toy-relations" that toy zoo is trained first and serves as the (offline) hub cache.
# With keep_weights false, a checkpoint's weights leave the cache once its score job is done (evict),
# and the fetch of the i-th checkpoint (models in order, steps ascending) waits for the eviction of
# the (i - max_cached_checkpoints)-th: at most that many checkpoints are in the cache at once.

TOY_ZOO = f"{config['toy_zoo']['dir']}/zoo.json"
# the relations zoo also writes its planted map and the texts the relations stage reads
TOY_ZOO_PLANTED = [f"{config['toy_zoo']['dir']}/{name}" for name in ("planted.json", "relations.jsonl")]


rule toy_zoo:
    output:
        TOY_ZOO,
        TOY_ZOO_PLANTED if config["schedule"] == "toy-relations" else [],
    log:
        "logs/toy_zoo.log",
    conda:
        "../envs/icl-dynamics.yaml"
    params:
        out=lambda wildcards, output: os.path.dirname(output[0]),
        seed=config["toy_zoo"]["seed"],
        kind=config["schedule"],
    shell:
        "icl-dynamics toy-zoo --kind {params.kind} --out {params.out} --seed {params.seed} > {log} 2>&1"


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
    shell:
        cli("fetch {params.flags} --attempts {params.attempts} --timeout {params.timeout} --out {output}")
        + " > {log} 2>&1"
