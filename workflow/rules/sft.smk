# Supervised fine-tuning: one job per distinct SFT stage. Experiments whose stages (and sft section) agree
# resolve to the same versioned path, so they share one job and one artifact.


rule sft:
    input:
        unpack(sft_inputs),
    output:
        directory(f"{RESULTS}/sft/{{run}}"),
    log:
        f"{LOGS}/sft/{{run}}.log",
    conda:
        conda_env("sft")
    container:
        container_image("sft")
    threads: CFG.sft.num_processes * CFG.sft.threads_per_process
    resources:
        gpu=CFG.sft.gpus,
    params:
        config=STEP_ARGS,
        experiment=lambda w: SFT_RUNS[w.run][0],
        stage=lambda w: SFT_RUNS[w.run][1],
        omp=CFG.sft.threads_per_process,
    shell:
        # earl.sft checks its inputs, then starts sft.num_processes torchrun workers in this one job
        "OMP_NUM_THREADS={params.omp} python -m earl.sft {params.config}"
        " --experiment {params.experiment} --stage {params.stage} --out {output} > {log} 2>&1"
