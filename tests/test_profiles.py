"""The profiles plan the paper DAG with no SLURM, GPU or network: GPUs, CPUs, partitions and sizes per rule."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.slow

PAPER = REPO / "config" / "paper.yaml"
PAPER_CFG = yaml.safe_load(PAPER.read_text())
# GPUs (resource `gpu`, which the slurm plugin turns into --gpus) and threads (--cpus-per-task) each job of a
# GPU rule must ask for on the paper config; other rules ask for no GPU.
GPUS = {
    "tokenize": PAPER_CFG["tokenize"]["workers"] if PAPER_CFG["tokenize"]["device"] == "cuda" else 0,
    "sft": PAPER_CFG["sft"].get("gpus", 0),
    "rl": PAPER_CFG["rl"].get("gpus", 0),
    "evaluate": PAPER_CFG["evaluate"].get("gpus", 0),
}
THREADS = {
    "tokenize": PAPER_CFG["tokenize"]["workers"] * PAPER_CFG["tokenize"]["threads_per_worker"],
    "sft": PAPER_CFG["sft"].get("num_processes", 1) * PAPER_CFG["sft"].get("threads_per_process", 1),
    "rl": PAPER_CFG["rl"].get("num_processes", 1) * PAPER_CFG["rl"].get("threads_per_process", 1),
    "evaluate": PAPER_CFG["evaluate"].get("threads", 1),
}
# Rules the slurm profile sends to EARL_SLURM_GPU_PARTITION.
GPU_PARTITION_RULES = {"tokenize", "sft", "rl", "evaluate"}


def plan(tmp_path, profile: str, *args: str, env: dict[str, str] | None = None) -> list[dict]:
    """The jobs of a dry run: rule, threads and resources of each, as Snakemake prints them."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EARL_")}
    environ.update(HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", **(env or {}))
    result = subprocess.run(
        ["snakemake", "-n", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
         "--profile", str(REPO / "workflow" / "profiles" / profile), *args],
        capture_output=True, text=True, timeout=300, env=environ,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    jobs = []
    for block in re.split(r"^(?=(?:local)?rule \w+:$)", result.stdout + result.stderr, flags=re.M)[1:]:
        fields = dict(re.findall(r"^    (\w+): (.*)$", block, re.M))
        resources = dict(item.split("=", 1) for item in fields.get("resources", "").split(", ") if "=" in item)
        jobs.append({
            "rule": re.match(r"(?:local)?rule (\w+):", block)[1],
            "threads": int(fields.get("threads", 1)),
            "resources": resources,
        })
    assert jobs, result.stdout[-2000:]
    return jobs


def test_slurm_profile_gives_gpu_rules_their_gpus_and_cpus_as_one_task(tmp_path):
    # A dry run caps threads at --cores (1 unless given); a SLURM run does not cap them.
    jobs = plan(tmp_path, "slurm", "--configfile", str(PAPER), "--cores", "1024")
    rules = {job["rule"] for job in jobs}
    assert "tokenize" in rules  # and sft, once it is in the DAG
    for job in jobs:
        resources = job["resources"]
        if job["rule"] == "all":
            continue
        assert int(resources["runtime"]) > 0 and int(resources["mem_mb"]) > 0, job
        assert "gpus" not in resources, job  # the plugin's sbatch reads `gpu`; `gpus` reaches only the inner srun
        assert "tasks" not in resources, job  # with GPUs the plugin would make it --ntasks-per-gpu
        assert "slurm_partition" not in resources and "slurm_account" not in resources, job  # none set: defaults
        assert int(resources.get("gpu", 0)) == GPUS.get(job["rule"], 0), job
        if job["rule"] in THREADS:
            assert job["threads"] == THREADS[job["rule"]], job
    assert GPUS["tokenize"] > 0  # the paper tokenizes on GPUs


def test_slurm_profile_takes_partitions_and_account_from_the_environment(tmp_path):
    env = {"EARL_SLURM_PARTITION": "cpu_q", "EARL_SLURM_GPU_PARTITION": "gpu_q", "EARL_SLURM_ACCOUNT": "proj1"}
    jobs = [j for j in plan(tmp_path, "slurm", "--configfile", str(PAPER), env=env) if j["rule"] != "all"]
    assert {j["rule"] for j in jobs} >= {"vq", "text_tokenizer", "tokenize"}
    for job in jobs:
        partition = "gpu_q" if job["rule"] in GPU_PARTITION_RULES else "cpu_q"
        assert (job["resources"]["slurm_partition"], job["resources"]["slurm_account"]) == (partition, "proj1"), job


def test_local_profile_plans_the_default_on_the_cpu(tmp_path):
    jobs = plan(tmp_path, "local", "--configfile", str(REPO / "config" / "config.yaml"), env={"EARL_GPUS": "0"})
    assert {j["rule"] for j in jobs} >= {"data", "vq", "text_tokenizer", "tokenize"}
    assert all(int(j["resources"].get("gpu", 0)) == 0 for j in jobs)  # the default tokenizes on the CPU
