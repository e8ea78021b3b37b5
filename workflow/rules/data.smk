# Inputs of tokenize: generated datasets, the VQ image tokenizer and the text tokenizer.


rule data:
    output:
        directory(f"{RESULTS}/data/{{dataset}}-{{version}}"),
    log:
        f"{LOGS}/data/{{dataset}}-{{version}}.log",
    conda:
        conda_env("data")
    container:
        container_image("data")
    params:
        config=STEP_ARGS,
    shell:
        "python -m earl.data {params.config} --dataset {wildcards.dataset} --out {output} > {log} 2>&1"


rule vq:
    input:
        generated(getattr(CFG.vq, "datasets", [])),
    output:
        directory(f"{RESULTS}/vq/{{kind}}-{{version}}"),
    log:
        f"{LOGS}/vq/{{kind}}-{{version}}.log",
    conda:
        conda_env("vq")
    container:
        container_image("vq")
    threads: getattr(CFG.vq, "threads", 1)
    params:
        config=STEP_ARGS,
    shell:
        "python -m earl.vq {params.config} --out {output} > {log} 2>&1"


rule text_tokenizer:
    input:
        generated(getattr(CFG.text_tokenizer, "datasets", [])),
        vq=str(PATHS.vq()),
    output:
        directory(f"{RESULTS}/tokenizer/{{kind}}-{{version}}"),
    log:
        f"{LOGS}/tokenizer/{{kind}}-{{version}}.log",
    conda:
        conda_env("tokenize")
    container:
        container_image("tokenize")
    params:
        config=STEP_ARGS,
    shell:
        "python -m earl.text_tokenizer {params.config} --out {output} > {log} 2>&1"
