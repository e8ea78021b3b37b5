"""The workflow passes `snakemake --lint` on both configs and `snakefmt --check`, as part of the test suite, so CI
(`.ci/run` → `make test`) fails on a new lint or an unformatted rule file (`make lint` runs the same by hand)."""

from __future__ import annotations

import subprocess

import pytest

from conftest import REPO


@pytest.mark.parametrize("config", ["config.yaml", "paper.yaml"])
def test_snakemake_lint_is_clean(config, tmp_path):
    result = subprocess.run(
        ["snakemake", "--lint", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
         "--configfile", str(REPO / "config" / config)],
        capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Lints for" not in output, output[-4000:]


def test_rule_files_are_snakefmt_formatted():
    result = subprocess.run(
        ["snakefmt", "--check", "--diff", "Snakefile", "workflow/rules"], cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
