"""Real Snakemake runs: the DAG, versioned reruns, config errors before any job, the paper dry run."""

from __future__ import annotations

import re
import subprocess

import pytest

from conftest import REPO, tiny_config, write_config

pytestmark = pytest.mark.slow


def snakemake_command(workdir, *args: str) -> list[str]:
    return ["snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2", *args]


def snakemake(workdir, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(snakemake_command(workdir, *args), capture_output=True, text=True, timeout=timeout)


def planned_jobs(result: subprocess.CompletedProcess) -> dict[str, int]:
    """Rule -> job count from the 'Job stats' table of a dry run."""
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    if "Nothing to be done" in output:
        return {}
    table = output.split("Job stats:")[1].split("Reasons:")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


def test_pipeline_runs_and_a_data_change_reruns_only_its_downstream(tmp_path):
    data = tiny_config(tmp_path / "results", **{"vq.datasets": ["shapes_s"], "text_tokenizer.datasets": ["shapes_s"]})
    config = write_config(tmp_path / "config.yaml", data)
    first = snakemake(tmp_path, "--configfile", config)
    assert first.returncode == 0, first.stderr
    outputs = sorted(p.relative_to(tmp_path / "results").as_posix() for p in (tmp_path / "results").glob("*/*") if (p / "manifest.json").is_file())
    assert [o.split("-")[0] for o in outputs] == [
        "data/shapes_c", "data/shapes_s", "evaluate/shapes_c", "evaluate/shapes_c", "evaluate/shapes_s",
        "evaluate/shapes_s", "rl/shapes_s+shapes_c", "sft/shapes_s", "tokenized/shapes_c", "tokenized/shapes_s",
        "tokenizer/bpe", "vq/train",
    ]  # two experiments x two benchmarks
    report = tmp_path / "results" / "report"
    assert (report / "manifest.json").is_file() and (report / "table2.csv").is_file()
    assert planned_jobs(snakemake(tmp_path, "--configfile", config, "-n")) == {}  # nothing left to do

    data["datasets"]["shapes_c"]["source"]["seed"] += 1
    config = write_config(tmp_path / "config.yaml", data)
    # SFT(S) does not read shapes_c, so only its data, its shards, the RL(S+C) job, every evaluation of the
    # RL model and of the shapes_c benchmark, and the report rerun; SFT(S) on shapes_s keeps its evaluation
    assert planned_jobs(snakemake(tmp_path, "--configfile", config, "-n")) == {
        "all": 1, "data": 1, "tokenize": 1, "rl": 1, "evaluate": 3, "report": 1,
    }
    untouched = {p: p.stat().st_mtime_ns for p in (tmp_path / "results").glob("*/*/*.parquet") if "shapes_s" in str(p)}
    second = snakemake(tmp_path, "--configfile", config)
    assert second.returncode == 0, second.stderr
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched


def test_config_error_stops_before_any_job(tmp_path):
    data = tiny_config(tmp_path / "results")
    data["tokenize"]["shards"] = "two"
    result = snakemake(tmp_path, "--configfile", write_config(tmp_path / "config.yaml", data))
    assert result.returncode != 0
    assert "config error at tokenize.shards: Input should be a valid integer" in result.stderr
    assert not (tmp_path / "results").exists()


def test_paper_config_plans_its_dag_without_gpu_or_network(tmp_path):
    result = snakemake(tmp_path, "--configfile", str(REPO / "config" / "paper.yaml"), "-n")
    # SFT(S) is shared by its own row, the three SFT(S)->RL rows and the two-stage rows' first stage; 11
    # distinct final models (4 SFT, 7 RL) x the registry's 6 benchmarks; 8 training + 7 benchmark datasets
    assert planned_jobs(result) == {
        "all": 1, "text_tokenizer": 1, "tokenize": 15, "vq": 1, "sft": 4, "rl": 7, "evaluate": 66, "report": 1,
    }
    for rule, gpus in (("sft", 4), ("rl", 4), ("evaluate", 1)):
        blocks = [b for b in result.stdout.split("rule ")[1:] if b.startswith(f"{rule}:")]
        assert blocks and all(f"gpu={gpus}" in b for b in blocks), rule
