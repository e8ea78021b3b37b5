"""Whole `snakemake` runs of the tiny default pipeline, from nothing to GRPO: two runs from scratch make the same
bytes, and a run killed with SIGKILL in the middle of a rule leaves nothing that looks finished and is resumed by
the next run, from the rule's own checkpoint, to the result of an uninterrupted run.

The runs stop at rl (no `all`): the evaluate and report rules have no step module on this branch yet.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re

import pytest

from conftest import kill_tree_when, tiny_config, write_config
from earl import artifacts
from earl.config import from_dict
from test_workflow import planned_jobs, snakemake, snakemake_command

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("from_scratch")]

# `results` relative to each run's directory (-d), so two runs record the same paths in their manifests.
# A checkpoint every GRPO iteration, so the kill below lands between two of them.
CONFIG = tiny_config("results", **{"rl.num_iterations": 8, "rl.save_every": 1})
PATHS = artifacts.Paths(from_dict(CONFIG))
RL = str(PATHS.rl("sft_s__rl_sc"))
TARGETS = sorted({RL, *(str(PATHS.sft(name)) for name in CONFIG["experiments"])})

# Files whose bytes two runs from scratch must agree on (globs relative to a run's directory; each must match).
REPRODUCIBLE_FILES = [
    "results/report/*.csv",
    "results/evaluate/*/samples.parquet",
    "results/data/*/*.parquet",
    "results/tokenized/*/*.parquet",
    "results/tokenized/*/*-of-*.json",
    "results/tokenizer/*/tokenizer.json",
    "results/vq/*/model.safetensors",
    "results/sft/*/model.safetensors",
    "results/rl/*/model.safetensors",
]


def run(root, *args: str):
    return snakemake(root, "--configfile", write_config(root / "config.yaml", CONFIG), *args)


def run_from_scratch(root):
    """The whole default DAG, evaluation and report included."""
    result = run(root)
    assert result.returncode == 0, result.stderr[-4000:]
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run from scratch."""
    return run_from_scratch(tmp_path_factory.mktemp("reference"))


def digests(root, pattern: str) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.glob(pattern)}


def comparable(root, directory: str) -> dict:
    """A manifest without its timings; its input hashes are checked against this run's input manifests."""
    manifest = artifacts.read_manifest(root / directory)
    recorded = manifest["inputs"]
    assert artifacts.input_hashes([root / p for p in recorded]) == {str(root / p): h for p, h in recorded.items()}, directory
    return artifacts.identity(manifest)


def finished(root) -> list[str]:
    return sorted(p.parent.relative_to(root).as_posix() for p in root.glob("results/*/*/manifest.json"))


def test_two_runs_from_scratch_make_the_same_artifacts(reference, tmp_path):
    second = run_from_scratch(tmp_path)
    for pattern in REPRODUCIBLE_FILES:
        files = digests(reference, pattern)
        assert files, f"{pattern} matches nothing: the list is out of date"
        assert digests(second, pattern) == files, pattern
    assert finished(second) == finished(reference)
    for directory in finished(reference):
        assert comparable(second, directory) == comparable(reference, directory), directory
    trained = [d for d in finished(reference) if d.startswith(("results/sft/", "results/rl/"))]
    assert len(trained) == 2 and all(artifacts.read_manifest(reference / d)["fingerprint"] for d in trained)


def test_kill_9_mid_rule_leaves_nothing_finished_and_the_next_run_resumes_it(reference, tmp_path):
    config = write_config(tmp_path / "config.yaml", CONFIG)
    partial = tmp_path / f"{RL}.partial"
    # Snakemake and the rl job's process tree die together, like a node failure, after GRPO's second checkpoint
    kill_tree_when(snakemake_command(tmp_path, "--configfile", config, "--", *TARGETS),
                   partial / "checkpoints" / "iter_000001" / "state.json", timeout=600)

    # nothing of rl looks finished; every other published output is
    assert not (tmp_path / RL).exists() and not (partial / "manifest.json").exists()
    outputs = [p for p in tmp_path.glob("results/*/*") if p.parent.name != "logs"]
    assert all((p / "manifest.json").is_file() for p in outputs if not p.name.endswith(".partial"))
    last = max(partial.glob("checkpoints/iter_*/state.json"))
    killed_at = json.loads(last.read_text())["next_iteration"]
    assert 0 < killed_at < CONFIG["rl"]["num_iterations"]

    # Snakemake's lock outlives a killed Snakemake: the next run must --unlock first (README, "Crashes, reruns and reproducibility")
    locked = run(tmp_path, "--", *TARGETS)
    assert locked.returncode != 0 and "--unlock" in locked.stderr, locked.stderr[-2000:]
    assert run(tmp_path, "--unlock").returncode == 0
    # the rl output is missing, so a plain run redoes only that job: no --rerun-incomplete needed
    assert planned_jobs(run(tmp_path, "-n", "--", *TARGETS)) == {"rl": 1}
    rerun = run(tmp_path, "--", *TARGETS)
    assert rerun.returncode == 0, rerun.stderr[-4000:]

    # it resumed: GRPO's progress bar starts at the killed run's next iteration, not at 0
    log = (tmp_path / "results" / "logs" / "rl" / f"{PATHS.rl('sft_s__rl_sc').name}.log").read_text()
    started = re.search(r"grpo:\s+\d+%\|[^|]*\| (\d+)/(\d+) ", log)
    assert started and (int(started[1]), int(started[2])) == (killed_at, CONFIG["rl"]["num_iterations"]), log[-2000:]
    # ... to exactly the uninterrupted run's weights, with one metrics row per iteration
    assert (tmp_path / RL / "model.safetensors").read_bytes() == (reference / RL / "model.safetensors").read_bytes()
    with open(tmp_path / RL / "metrics.csv") as metrics:
        assert [int(row["iteration"]) for row in csv.DictReader(metrics)] == list(range(CONFIG["rl"]["num_iterations"]))
    assert not partial.exists()
