# VQ-encode every dataset's splits into parquet shards (one job per dataset, sharded inside).


rule tokenize:
    input:
        data=lambda w: generated([w.dataset]),
        vq=str(PATHS.vq()),
    output:
        directory(f"{RESULTS}/tokenized/{{dataset}}-{{version}}"),
    log:
        f"{LOGS}/tokenize/{{dataset}}-{{version}}.log",
    conda:
        conda_env("tokenize")
    container:
        container_image("tokenize")
    threads: CFG.tokenize.workers * CFG.tokenize.threads_per_worker
    resources:
        # one GPU per worker on CUDA: the job holds them all, the step spreads shards over them
        gpu=CFG.tokenize.workers if CFG.tokenize.device == "cuda" else 0,
    params:
        config=STEP_ARGS,
    shell:
        "python -m earl.tokenize {params.config} --dataset {wildcards.dataset} --out {output} > {log} 2>&1"
