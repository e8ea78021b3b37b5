"""A step image built for real (podman, a debootstrapped Debian 12) runs its step. Opt-in: EARL_CONTAINER_TEST=1.

Heavy (a Debian bootstrap, apt and pip inside the builds; about 75 s for `data` on 2 cores from nothing), so CI does not run
it by default; run it after changing containers/ or the data env:
    EARL_CONTAINER_TEST=1 nice -n 19 python -m pytest tests/test_containers.py
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import REPO, tiny_config, write_config

pytestmark = [
    pytest.mark.containers,
    pytest.mark.skipif(os.environ.get("EARL_CONTAINER_TEST") != "1", reason="opt-in: EARL_CONTAINER_TEST=1"),
]


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
