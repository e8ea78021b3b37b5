# GRPO: one job per experiment with an rl stage; experiments with the same SFT start and RL settings share it.


rule rl:
    input:
        unpack(rl_inputs),
    output:
        directory(f"{RESULTS}/rl/{{run}}"),
    log:
        f"{LOGS}/rl/{{run}}.log",
    conda:
        conda_env("vllm" if CFG.rl.engine == "vllm" else "rl")
    container:
        container_image("vllm" if CFG.rl.engine == "vllm" else "rl")
    threads: CFG.rl.num_processes * CFG.rl.threads_per_process
    resources:
        gpu=CFG.rl.gpus + judge_gpus(CFG.rl.reward),
    params:
        config=STEP_ARGS,
        experiment=lambda w: RL_RUNS[w.run],
        omp=CFG.rl.threads_per_process,
    shell:
        # earl.rl checks its inputs, then starts rl.num_processes torchrun workers in this one job
        "OMP_NUM_THREADS={params.omp} python -m earl.rl {params.config}"
        " --experiment {params.experiment} --out {output} > {log} 2>&1"
