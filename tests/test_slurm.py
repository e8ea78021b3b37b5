"""A real SLURM run: a one-node cluster on this machine (tests/slurm/cluster.sh), the slurm profile, sbatch.

The cluster has no accounting, so Snakemake asks squeue for job states; its node has two GRES "gpu" backed by
no device, so SLURM schedules and checks a GPU job's layout (one task holding N GPUs) while nothing uses them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from conftest import REPO, tiny_config, write_config
from earl.artifacts import Paths
from earl.config import from_dict

pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
# Settings for a cluster without accounting (README, "Running on SLURM"), and short status intervals for a test.
NO_ACCOUNTING = [
    "--slurm-status-command", "squeue",
    "--slurm-no-account",
    "--slurm-init-seconds-before-status-checks", "1",
    "--seconds-between-status-checks", "2",
]


def run_group(cmd: list[str], timeout: float, **kwargs) -> tuple[int, str]:
    """Run cmd in its own process group; on timeout TERM, then KILL, the whole group (daemons included)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # cluster.sh stops its child, then its daemons
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout} s:\n{out[-6000:]}")
    return proc.returncode, out


def test_data_rules_run_as_slurm_jobs_through_the_profile(tmp_path):
    data = tiny_config(tmp_path / "results")
    config = write_config(tmp_path / "config.yaml", data)
    targets = [str(p) for p in Paths(from_dict(data)).generated(data["datasets"])]
    jobs_out = tmp_path / "scontrol-jobs.txt"
    command = [
        str(CLUSTER),
        "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
        "--profile", str(REPO / "workflow" / "profiles" / "slurm"),
        "--configfile", config, *NO_ACCOUNTING,
        # The profile's sizes are the paper's; this node has 4000 MB. Both jobs take the node's 2 CPUs (threads,
        # as tokenize and sft have); shapes_s also takes its 2 GPUs (the layout of tokenize and sft).
        "--set-resources", "data:mem_mb=1000", "data:runtime=10",
        "data:gpu=2 if wildcards.dataset == 'shapes_s' else 0",
        "--set-threads", "data=2",
        "--", *targets,
    ]
    started = time.monotonic()
    rc, out = run_group(command, timeout=600, env={**os.environ, "EARL_SLURM_JOBS_OUT": str(jobs_out)})
    elapsed = time.monotonic() - started
    if rc == 77:
        pytest.skip(out.strip().splitlines()[-1])
    assert rc == 0, out[-6000:]
    print(f"slurm run: {elapsed:.1f} s")

    for target in targets:
        assert (tmp_path / target / "manifest.json").is_file(), target
    assert len(re.findall(r"submitted with SLURM jobid \d+", out)) == 2, out[-3000:]

    # What SLURM itself recorded for the two jobs (scontrol keeps finished jobs for MinJobAge).
    jobs = {}
    for line in jobs_out.read_text().splitlines():
        fields = dict(re.findall(r"([\w/:]+)=(\S*)", line))
        if "rule_data" in fields.get("Comment", ""):
            dataset = "shapes_s" if "shapes_s" in fields["Comment"] else "shapes_c"
            jobs[dataset] = fields
    assert set(jobs) == {"shapes_s", "shapes_c"}, jobs_out.read_text()
    for dataset, job in jobs.items():
        assert job["JobState"] == "COMPLETED", (dataset, job)
        # one task with the rule's threads as CPUs: a launcher (torchrun) inside it starts the ranks
        assert (job["NumTasks"], job["CPUs/Task"]) == ("1", "2"), (dataset, job)
    # both GPUs, allocated to that one task; none to the CPU job
    assert (jobs["shapes_s"].get("TresPerJob"), jobs["shapes_s"].get("JOB_GRES")) == ("gres:gpu:2", "gpu:2"), jobs
    assert "JOB_GRES" not in jobs["shapes_c"] or jobs["shapes_c"]["JOB_GRES"] == "(null)", jobs["shapes_c"]
