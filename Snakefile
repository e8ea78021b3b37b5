# earl-pipeline: EARL (arXiv 2508.01119) as a Snakemake workflow.
#
#   snakemake --cores 2                                  embedded default (config/config.yaml), CPU, minutes
#   snakemake -n --configfile config/paper.yaml          plan the paper-scale DAG
#
# DAG: data -> vq -> text_tokenizer -> tokenize -> sft -> rl -> evaluate -> report.
# Every rule is a thin call of one step CLI in steps/earl; paths are versioned by config hashes (earl.artifacts).
from snakemake.utils import min_version

min_version("9.0")


# A --configfile on the command line replaces the default instead of being merged into it,
# so a paper run never inherits the default's toy datasets.
if not workflow.configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/software.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/tokenize.smk"
include: "workflow/rules/sft.smk"
include: "workflow/rules/rl.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        all_targets(),
