# The report: the paper's tables and figures rebuilt from every evaluation, training curves and sample grids.
# `snakemake --report report.html` catalogues its figures and tables (captions: workflow/report/).


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
