"""A step image built for real (podman, a debootstrapped Debian 12) runs its step and makes the same bytes as the
step run outside it. CI runs it (marker `containers`).

The slowest test: a Debian bootstrap, apt and pip inside the builds, 149 s for `data` on 2 busy cores from an
empty image store (podman, runc and debootstrap already installed; 5 s once podman has the images cached, as a
machine that keeps /var/lib/containers does). Skipped where it cannot run (not root); alone:
    nice -n 19 python -m pytest tests/test_containers.py
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import REPO, step, tiny_config, write_config

pytestmark = pytest.mark.containers


def test_data_image_runs_the_data_step(tmp_path):
    config = write_config(tmp_path / "config.yaml", tiny_config(tmp_path / "results"))
    out = tmp_path / "results" / "data" / "shapes_s"
    result = subprocess.run(
        [str(REPO / "tests" / "containers" / "build_and_run.sh"), "data",
         "python", "-m", "earl.data", "--config", config, "--dataset", "shapes_s", "--out", str(out)],
        capture_output=True, text=True, timeout=1800, env={**os.environ, "EARL_CONTAINER_OUT": str(tmp_path)},
    )
    if result.returncode == 77:
        pytest.skip(result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr[-4000:]
    manifest = json.loads((out / "manifest.json").read_text())
    # the image's own Python (Debian 12's 3.11) and the lock's versions, not this machine's
    assert manifest["versions"]["python"] == "3.11.2"
    assert manifest["versions"]["datasets"] == "5.2.0" and manifest["versions"]["pyarrow"] == "26.0.1"
    # and the same data as the step run outside, byte for byte
    outside = tmp_path / "outside"
    assert step("data", config, outside, "--dataset", "shapes_s").returncode == 0
    splits = sorted(p.name for p in out.glob("*.parquet"))
    assert splits == sorted(p.name for p in outside.glob("*.parquet")) and splits
    assert all((out / name).read_bytes() == (outside / name).read_bytes() for name in splits)
