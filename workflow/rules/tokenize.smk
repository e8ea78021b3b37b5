# VQ-encode every dataset's splits into parquet shards (one job per dataset, sharded inside).


rule tokenize:
    input:
        data=lambda w: generated([w.dataset]),
        vq=str(PATHS.vq()),
    output:
        directory(f"{RESULTS}/tokenized/{{dataset}}-{{version}}"),
    log:
        f"{LOGS}/tokenize/{{dataset}}-{{version}}.log",
    threads: CFG.tokenize.workers * CFG.tokenize.threads_per_worker
    shell:
        "python -m earl.tokenize {STEP_ARGS} --dataset {wildcards.dataset} --out {output} > {log} 2>&1"
