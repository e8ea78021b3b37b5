# Evaluation: one job per (final model, benchmark). Experiments that end in the same model share the job.


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        directory(f"{RESULTS}/evaluate/{{run}}"),
    log:
        f"{LOGS}/evaluate/{{run}}.log",
    conda:
        conda_env("vllm" if CFG.evaluate.engine == "vllm" else "evaluate")
    container:
        container_image("vllm" if CFG.evaluate.engine == "vllm" else "evaluate")
    threads: CFG.evaluate.threads
    resources:
        gpu=CFG.evaluate.gpus + judge_gpus(CFG.evaluate.judge),
    params:
        config=STEP_ARGS,
        experiment=lambda w: EVAL_RUNS[w.run][0],
        benchmark=lambda w: EVAL_RUNS[w.run][1],
    shell:
        "OMP_NUM_THREADS={threads} python -m earl.evaluate {params.config}"
        " --experiment {params.experiment} --benchmark {params.benchmark} --out {output} > {log} 2>&1"
