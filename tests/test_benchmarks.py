"""Benchmark scripts run end to end on CPU with a tiny model (smoke test; their numbers come from the GPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, TINY_MODEL, step
from earl import artifacts
from earl.cli_util import read_config


def test_sft_benchmark_smoke(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sft.py"), "--tiny", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    result = json.loads((tmp_path / "sft_results.json").read_text())
    assert result["variants"] and all(v.get("tokens_per_s", 1) > 0 for v in result["variants"])
    assert result["checks"]


def test_rollout_benchmark_smoke(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "rollout.py"), "--tiny", "--edits", "3", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    result = json.loads((tmp_path / "rollout_results.json").read_text())
    whole = [r for r in result["runs"] if "generated_tokens" in r]
    assert whole and all(r["tokens_per_s"] > 0 and r["well_formed"] == 1.0 for r in whole)
    assert {r["run"] for r in result["runs"]} >= {"engine_eager", "hf_generate"}
    assert result["checks"]["graph_equals_eager_tokens"]
    edits = next(r for r in result["runs"] if r["run"] == "edits_end_to_end")
    assert edits["pngs"] == edits["edits"] == 3 and (tmp_path / "edit_0.png").read_bytes()[:4] == b"\x89PNG"
    phases = [edits[f"{phase}_s"] for phase in ("vq_encode", "engine", "vq_decode", "png")]
    assert min(phases) > 0 and 0 < edits["prefill_s"] < edits["engine_s"]
    assert sum(phases) + edits["other_s"] == pytest.approx(edits["seconds"], abs=0.02) and edits["other_s"] >= 0


def test_rl_step_benchmark_smoke(tmp_path):
    """benchmarks/rl_step.py at test size: paper.yaml's rl section (bf16 autocast over fp32 master weights, a bf16
    engine copy, gradient checkpointing) through earl.rl.iteration_step, judged over HTTP, every phase timed."""
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "rl_step.py"), "--tiny", "--iterations", "2", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    result = json.loads((tmp_path / "rl_step_results.json").read_text())
    facts = result["facts"]
    assert facts["policy_dtype"] == "torch.float32" and facts["engine_dtype"] == "torch.bfloat16" and facts["gradient_checkpointing"]
    assert len(result["iterations"]) == 2
    for row in result["iterations"]:
        assert row["well_formed"] == 1.0 and row["judge_failures"] == 0 and row["grad_norm"] > 0
        phases = ["rollout_s", "vq_decode_s", "judge_client_s", "reference_logprobs_s", "policy_logprobs_s", "optimizer_step_s", "sync_s"]
        assert all(row[k] > 0 for k in phases) and row["backward_and_rest_s"] > 0
        assert sum(row[k] for k in phases) + row["backward_and_rest_s"] <= row["step_s"]


def test_vq_benchmark_smoke(tmp_path):
    """benchmarks/tokenize.py vq at test size on CPU: every eager variant, the pipeline helpers, the agreement rows."""
    args = ["vq", "--device", "cpu", "--tiny", "--px", "32", "--batch", "2", "--images", "4", "--reps", "1", "--compile-batch"]
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tokenize.py"), *args, "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "vq_results.json").read_text())["rows"]
    model = {(r["variant"], r["what"]) for r in rows if r["bench"] == "vq_model"}
    assert model == {(v, w) for v in ("class", "fold", "fold_cl") for w in ("encode", "decode")}
    fp32 = next(r for r in rows if r["bench"] == "vq_agreement" and r["dtype"].startswith("fp32"))
    assert fp32["fold"] == fp32["fold_cl"] == 1.0 and fp32["decode_finite"]
    assert fp32["decode_rel_diff"]["class_b16~fold"] < 1e-5 and fp32["decode_rel_diff"]["class_b4~fold_cl"] < 1e-5
    assert len([r for r in rows if r["bench"] == "vq_pipeline"]) == 2


@pytest.mark.slow
def test_multigpu_benchmark_smoke(tiny_pipeline, tmp_path):
    """benchmarks/multigpu.py on CPU at test size: ZeRO-3 SFT on 2 gloo ranks with the reload check, GRPO on 2
    ranks, killed and resumed, and on 1 rank (its numbers come from the GPUs)."""
    root, _, config_file, _ = tiny_pipeline
    model = {**TINY_MODEL, "vocab_size": 1024}  # replaces the overlay's Emu3 sizes; more ids than the tokenizer's
    sets = [f"sft.architecture.{k}={v}" for k, v in model.items()] + [
        "sft.bf16=false", "sft.max_steps=4", "sft.eval_steps=2", "sft.logging_steps=1", "sft.validation_size=4",
        "sft.per_device_train_batch_size=2", "sft.threads_per_process=1", "sft.quality_check=null",
        "rl.num_iterations=4", "rl.save_every=2", "rl.threads_per_process=1",
    ]
    start = artifacts.Paths(read_config([config_file], sets)).sft("sft_s__rl_sc")  # the RL runs' SFT model
    assert step("sft", config_file, start, "--experiment", "sft_s__rl_sc", "--set", *sets).returncode == 0
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "multigpu.py"), "--config", config_file, "--results", str(root / "results"),
         "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--parts", "sft", "rl", "--set", *sets],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    sft = summary["sft"]
    assert sft["exit"] == 0 and sft["world_size"] == 2 and sft["global_step"] == 4
    assert sft["reload"]["relative_difference"] < 1e-5  # the published weights give the Trainer's last eval loss
    rl = summary["rl"]
    assert all(run["exit"] == 0 for run in rl["runs"].values()) and rl["runs"]["n_resumed"]["killed_exit"] == -9
    assert all(m["equal"] == 4 for k, m in rl["resumed_vs_uninterrupted"].items() if k != "iterations")
    assert all(m["max_abs_diff"] < 1e-4 for k, m in rl["one_vs_n_ranks"].items() if k != "iterations")
    assert (tmp_path / "out" / "runs.tar.gz").is_file()


def test_sft_sweep_smoke(tiny_pipeline, tmp_path):
    """benchmarks/sft_sweep.py: dump a tokenized split through the layout, then two tiny configurations at once."""
    _, _, config_file, _ = tiny_pipeline
    sweep, npz = str(REPO / "benchmarks" / "sft_sweep.py"), str(tmp_path / "sweep.npz")
    result = subprocess.run([sys.executable, sweep, "dump", "--config", config_file, "--out", npz],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    tiny = {"layers": 1, "hidden": 32, "ff": 64, "heads": 2, "kv": 1, "steps": 3, "batch": 4, "evals": [2]}
    configs = [f"a={json.dumps(tiny)}", f"b={json.dumps({**tiny, 'theta': 50.0})}"]
    result = subprocess.run([sys.executable, sweep, "run", "--data", npz, "--device", "cpu", "--out", str(tmp_path / "out"),
                             "--configs", *configs], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [json.loads(line) for line in (tmp_path / "out" / "summary.jsonl").read_text().splitlines()]
    assert [r["name"] for r in runs] == ["a", "b"] and runs[1]["config"]["theta"] == 50.0
    for r in runs:
        assert sorted(r["evals"], key=int) == ["2", "3"]
        kinds = {k for k in r["evals"]["3"] if k != "loss"}
        assert kinds == set(np.load(npz)["validation_type"]) and kinds <= {"recolor", "add", "remove", "background"}
        assert all(0.0 <= v <= 1.0 for k in kinds for v in r["evals"]["3"][k].values() if v is not None)
