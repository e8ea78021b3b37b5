"""Lock the pip packages of envs/<step>.yaml for the containers' platform: Linux x86_64, CPython 3.11.

    python envs/lock.py [STEP ...]        default: every envs/*.yaml

Writes envs/<step>.linux-64.lock.txt: every package the step needs, pinned, with the sha256 of the file pip
would install there, for `pip install --no-deps --require-hashes -r` (containers/<step>/*). pip's resolver
runs in dry-run mode against the package index for that platform, wheels only, so nothing is installed or
built and only metadata is fetched. A package published only as an sdist (deepspeed) is locked by its sdist's
hash; its runtime requirements are read from the metadata pip generates for it and resolved with the rest.

The pip configuration of the machine is ignored (PIP_CONFIG_FILE=/dev/null, no find-links), so a machine's
local CPU build of torch or a cap on torch versions does not leak into the lock: torch is PyPI's build.

There are no conda locks (envs/<step>.<platform>.pin.txt, `@EXPLICIT` lists of conda package URLs): they need
the conda channels, which the project's machines cannot reach. The conda env files pin the pip packages the
step names; python is 3.11.x from conda-forge.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ENVS = Path(__file__).resolve().parent
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(36, 16, -1)] + ["manylinux2014_x86_64", "linux_x86_64"]
SDIST_ONLY = {"deepspeed"}


def pip_requirements(env_file: Path) -> list[str]:
    spec = yaml.safe_load(env_file.read_text())
    for dep in spec["dependencies"]:
        if isinstance(dep, dict) and "pip" in dep:
            return [str(r).split("#")[0].strip() for r in dep["pip"]]
    return []


def pip(*args: str) -> dict:
    """Run pip's resolver (dry run) with the machine's pip configuration switched off; return its report."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--disable-pip-version-check", "--report", str(report),
               *(a.replace("{tmp}", tmp) for a in args)]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise SystemExit(f"pip failed: {' '.join(cmd)}\n{result.stderr}")
        return json.loads(report.read_text())


def sha256(item: dict) -> str:
    return item["download_info"]["archive_info"]["hashes"]["sha256"]


def lock(step: str) -> Path:
    requirements = pip_requirements(ENVS / f"{step}.yaml")
    name = lambda r: r.split("==")[0].split(">")[0].split("<")[0].strip().lower()  # noqa: E731
    sdists = [r for r in requirements if name(r) in SDIST_ONLY]
    wheels = [r for r in requirements if name(r) not in SDIST_ONLY]
    locked: dict[str, tuple[str, str]] = {}
    for requirement in sdists:
        # Metadata of an sdist comes from running its build: no isolation, so deepspeed's setup.py sees the
        # torch of this interpreter (or none) instead of a CUDA torch downloaded into a build environment.
        (item,) = pip("--no-deps", "--no-build-isolation", "--no-binary", name(requirement), requirement)["install"]
        meta = item["metadata"]
        locked[meta["name"].lower()] = (meta["version"], sha256(item))
        wheels += [r for r in meta.get("requires_dist", []) if "extra ==" not in r]
    report = pip(
        *(f"--platform={p}" for p in PLATFORMS), "--python-version=3.11", "--implementation=cp",
        "--only-binary=:all:", "--target={tmp}/target", *wheels,
    )
    for item in report["install"]:
        meta = item["metadata"]
        locked[meta["name"].lower().replace("_", "-")] = (meta["version"], sha256(item))
    out = ENVS / f"{step}.linux-64.lock.txt"
    lines = [
        f"# envs/{step}.yaml locked for Linux x86_64, CPython 3.11 by `python envs/lock.py {step}`; do not edit.",
        f"# pip install --no-deps --require-hashes -r envs/{step}.linux-64.lock.txt",
    ]
    for package in sorted(locked):
        version, digest = locked[package]
        lines.append(f"{package}=={version} \\\n    --hash=sha256:{digest}")
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str]) -> None:
    steps = argv or sorted(p.stem for p in ENVS.glob("*.yaml"))
    for step in steps:
        out = lock(step)
        print(f"{out.relative_to(ENVS.parent)}: {sum(1 for l in out.read_text().splitlines() if '==' in l and not l.startswith('#'))} packages")


if __name__ == "__main__":
    main(sys.argv[1:])
