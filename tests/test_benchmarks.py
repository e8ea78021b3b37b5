"""Benchmark scripts run end to end on CPU with a tiny model (smoke test; their numbers come from the GPU)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_sft_benchmark_smoke(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sft.py"), "--tiny", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    result = json.loads((tmp_path / "sft_results.json").read_text())
    assert result["variants"] and all(v.get("tokens_per_s", 1) > 0 for v in result["variants"])
    assert result["checks"]


def test_rollout_benchmark_smoke(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "rollout.py"), "--tiny", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    result = json.loads((tmp_path / "rollout_results.json").read_text())
    whole = [r for r in result["runs"] if "generated_tokens" in r]
    assert whole and all(r["tokens_per_s"] > 0 and r["well_formed"] == 1.0 for r in whole)
    assert {r["run"] for r in result["runs"]} >= {"engine_eager", "hf_generate"}
    assert result["checks"]["graph_equals_eager_tokens"]
