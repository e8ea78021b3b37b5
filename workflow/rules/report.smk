# The report: the paper's tables and figures rebuilt from every evaluation, training curves and sample grids.
# `snakemake --report report.html` catalogues its figures and tables (captions: workflow/report/).


def report_inputs(wildcards=None):
    """Every directory earl.report reads: evaluations, each SFT stage (curves.csv), each RL run (metrics.csv)."""
    experiments = {e for e, _ in EVAL_RUNS.values()}
    return {
        "evaluations": [str(PATHS.evaluate(e, b)) for e, b in EVAL_RUNS.values()],
        "sft": sorted(
            {
                str(PATHS.sft(e, stage))
                for e in experiments
                for stage in range(len(CFG.experiments[e].sft))
            }
        ),
        "rl": sorted({str(PATHS.rl(e)) for e in experiments if CFG.experiments[e].rl}),
    }


rule report:
    input:
        unpack(report_inputs),
    output:
        report(
            directory(str(PATHS.report())),
            patterns=["{name}.png", "{name}.html"],
            caption="../report/report.rst",
            category="Report",
            labels={"file": "{name}"},
        ),
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
