# The report: the paper's tables and figures rebuilt from every evaluation, training curves and sample grids.


rule report:
    input:
        evaluations=[str(PATHS.evaluate(e, b)) for e, b in EVAL_RUNS.values()],
        models=sorted({str(PATHS.model(e)) for e, _ in EVAL_RUNS.values()}),
    output:
        directory(str(PATHS.report())),
    log:
        f"{LOGS}/report.log",
    conda:
        conda_env("report")
    container:
        container_image("report")
    params:
        config=STEP_ARGS,
    shell:
        "python -m earl.report build {params.config} --out {output} > {log} 2>&1"
