# Config validation, versioned paths and the step command line shared by all rules.
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "steps"))

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


def generated(names):
    return [str(p) for p in PATHS.generated(names)]


def all_targets():
    return [str(PATHS.tokenized(n)) for n in CFG.datasets] + [
        str(PATHS.text_tokenizer())
    ]
