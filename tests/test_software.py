"""Per-step software: every rule names a conda env file and a container image; env files, locks and
containers agree with each other and with pyproject.toml's pins."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tomllib

import pytest
import yaml

from conftest import REPO

ENVS = REPO / "envs"
STEPS = ["data", "vq", "tokenize", "sft", "rl", "evaluate", "report", "vllm"]
# vllm 0.33.0 pins torch 2.14.0 and transformers < 5.21 (envs/vllm.yaml)
VLLM_OWN = {"torch", "transformers", "vllm"}

RULES_SOFTWARE = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import (ConfigSettings, OutputSettings, ResourceSettings, StorageSettings,
                                      WorkflowSettings)
repo, config, workdir = map(Path, sys.argv[1:])
with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
    wf = api.workflow(resource_settings=ResourceSettings(), config_settings=ConfigSettings(configfiles=[config]),
                      storage_settings=StorageSettings(), workflow_settings=WorkflowSettings(),
                      snakefile=repo / "Snakefile", workdir=workdir)
    print(json.dumps({r.name: [r.conda_env and str(r.conda_env), r.container_img, bool(r.shellcmd)]
                      for r in wf._workflow.rules}))
"""


def pins(requirements) -> dict[str, str]:
    out = {}
    for requirement in requirements:
        match = re.match(r"^\s*([A-Za-z0-9_.\-]+)==([^\s#;\\]+)", str(requirement))
        if match:
            out[match[1].lower().replace("_", "-")] = match[2]
    return out


def env_pins(step: str) -> dict[str, str]:
    spec = yaml.safe_load((ENVS / f"{step}.yaml").read_text())
    assert "python=3.11" in spec["dependencies"], step
    (pip,) = [d["pip"] for d in spec["dependencies"] if isinstance(d, dict)]
    return pins(pip)


def rules_software(tmp_path, **env) -> dict[str, list]:
    result = subprocess.run(
        [sys.executable, "-c", RULES_SOFTWARE, str(REPO), str(REPO / "config" / "paper.yaml"), str(tmp_path)],
        capture_output=True, text=True, timeout=120, env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("step", STEPS)
def test_env_lock_and_container_of_each_step_agree_with_pyproject(step):
    project = pins(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])
    env = env_pins(step)
    locked = pins((ENVS / f"{step}.linux-64.lock.txt").read_text().splitlines())
    for package, version in env.items():
        if package in project and not (step == "vllm" and package in VLLM_OWN):
            assert version == project[package], (step, package, version, project[package])
        assert locked.get(package) == version, (step, package, "lock out of date: python envs/lock.py " + step)
    lock_name = f"envs/{step}.linux-64.lock.txt"
    for build_file in ("Containerfile", "apptainer.def"):
        assert lock_name in (REPO / "containers" / step / build_file).read_text(), (step, build_file)


def test_every_rule_names_its_conda_env_and_container(tmp_path):
    software = rules_software(tmp_path)
    assert {"data", "vq", "text_tokenizer", "tokenize"} <= set(software)
    for rule, (conda, container, has_shell) in software.items():
        if not has_shell:
            continue
        step = os.path.basename(conda).removesuffix(".yaml")
        assert step in STEPS and os.path.dirname(conda) == str(ENVS), (rule, conda)
        assert container == str(REPO / "containers" / "images" / f"earl-{step}.sif"), (rule, container)

    registry = rules_software(tmp_path, EARL_CONTAINERS="docker://registry.example/earl/")
    lock = (ENVS / "tokenize.linux-64.lock.txt").read_bytes()
    tag = hashlib.sha256(lock).hexdigest()[:12]
    assert registry["tokenize"][1] == f"docker://registry.example/earl/earl-tokenize:{tag}"
