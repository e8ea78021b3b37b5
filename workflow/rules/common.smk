# Config validation, versioned paths and the step command line shared by all rules.
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

STEPS = Path(workflow.basedir) / "steps"
sys.path.insert(0, str(STEPS))
# Jobs run this checkout's step package whether or not it is installed (manifests record its git commit): every
# job's shell puts it first on PYTHONPATH, inside a container or on a cluster node too (Snakemake's own prefix
# is `set -euo pipefail;`, kept).
shell.prefix(
    "set -euo pipefail; export PYTHONPATH="
    + shlex.quote(str(STEPS))
    + "${{PYTHONPATH:+:$PYTHONPATH}}; "  # braces doubled: Snakemake formats the prefix with each command
)

from earl.artifacts import Paths
from earl.config import ConfigError, from_dict

try:
    # Defaults are the models' job: jsonschema would inject every branch's defaults into a union.
    validate(
        config,
        Path(workflow.basedir) / "workflow/schemas/config.schema.yaml",
        set_default=False,
    )
except WorkflowError as error:
    # jsonschema's report is pages long; the models below name the key in one line.
    try:
        from_dict(config)
    except ConfigError as one_line:
        raise WorkflowError(str(one_line)) from None
    raise
try:
    CFG = from_dict(config)
except ConfigError as error:
    raise WorkflowError(str(error)) from None

PATHS = Paths(CFG)
RESULTS = CFG.results
LOGS = f"{RESULTS}/logs"
# The step CLIs re-read the same config files (and --config overrides) Snakemake was given.
STEP_ARGS = shlex.join(
    ["--config", *map(str, workflow.configfiles)]
    + (
        ["--set", *workflow.config_settings.config_args]
        if workflow.config_settings.config_args
        else []
    )
)


wildcard_constraints:
    dataset="[A-Za-z0-9_]+",
    version="[0-9a-f]{10}",
    run="[A-Za-z0-9_+]+-[0-9a-f]{10}",


# Versioned SFT output name -> (an experiment, stage index) that defines it.
SFT_RUNS = {
    PATHS.sft(name, stage).name: (name, stage)
    for name, experiment in CFG.experiments.items()
    for stage in range(len(experiment.sft))
}
# Versioned RL output name -> an experiment that defines it.
RL_RUNS = {
    PATHS.rl(name).name: name
    for name, experiment in CFG.experiments.items()
    if experiment.rl is not None
}
# Versioned evaluation name -> an (experiment, benchmark) that defines it.
EVAL_RUNS = {
    PATHS.evaluate(name, bench).name: (name, bench)
    for name in CFG.experiments
    for bench in CFG.benchmarks_of(name)
}


def judge_gpus(judge):
    """GPUs of a judge server the step starts in its own job (reward/judge `serve`), on top of its own."""
    return judge.serve.gpus if getattr(judge, "serve", None) else 0


def generated(names):
    return [str(p) for p in PATHS.generated(names)]


def all_targets():
    return (
        [str(PATHS.tokenized(n)) for n in CFG.datasets]
        + [str(PATHS.text_tokenizer())]
        + [str(PATHS.sft(name)) for name in CFG.experiments]
        + [str(PATHS.rl(name)) for name in RL_RUNS.values()]
        + ([str(PATHS.report())] if EVAL_RUNS else [])
    )


# Inputs of the training and evaluation rules, by versioned output name.
def sft_inputs(wildcards):
    experiment, stage = SFT_RUNS[wildcards.run]
    this = CFG.experiments[experiment].sft[stage]
    inputs = {
        "tokenized": [str(PATHS.tokenized(name)) for name in this.datasets],
        "tokenizer": str(PATHS.text_tokenizer()),
        "vq": str(PATHS.vq()),
    }
    if stage > 0:
        inputs["parent"] = str(PATHS.sft(experiment, stage - 1))
    return inputs


def rl_inputs(wildcards):
    experiment = RL_RUNS[wildcards.run]
    return {
        "sft": str(PATHS.sft(experiment)),
        "tokenized": [
            str(PATHS.tokenized(n)) for n in CFG.experiments[experiment].rl.datasets
        ],
        "tokenizer": str(PATHS.text_tokenizer()),
        "vq": str(PATHS.vq()),
    }


def evaluate_inputs(wildcards):
    experiment, benchmark = EVAL_RUNS[wildcards.run]
    return {
        "model": str(PATHS.model(experiment)),
        "tokenized": sorted(
            {str(PATHS.tokenized(p.dataset)) for p in CFG.benchmarks[benchmark].parts}
        ),
        "tokenizer": str(PATHS.text_tokenizer()),
        "vq": str(PATHS.vq()),
    }


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
