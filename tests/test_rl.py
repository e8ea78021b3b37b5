"""The rl step through its CLI: GRPO iterations, exact resume after kill -9, 2 ranks = 1 rank, one-line errors."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import Emu3ForCausalLM

from conftest import REPO, kill_step_when, step, write_config
from earl import artifacts
from earl.config import from_dict
from earl.rl import load_models
from test_sft import sft_config


@pytest.fixture(scope="module")
def sft_done(tiny_pipeline):
    """A tiny SFT checkpoint of the `sft_s__rl_sc` experiment to start RL from."""
    root, data, _, _ = tiny_pipeline
    config_file, paths = sft_config(root, data, "rl-base", max_steps=4, quality_check=None)
    result = step("sft", config_file, paths.sft("sft_s__rl_sc"), "--experiment", "sft_s__rl_sc")
    assert result.returncode == 0, result.stderr[-3000:]
    return root, config_file


def rl_config(root, config_file: str, name: str, **rl) -> tuple[str, artifacts.Paths]:
    config = yaml.safe_load(open(config_file))
    config["rl"].update(rl)
    return write_config(root / f"{name}.yaml", config), artifacts.Paths(from_dict(config))


def rl(config_file: str, out, experiment: str = "sft_s__rl_sc") -> subprocess.CompletedProcess:
    return step("rl", config_file, out, "--experiment", experiment)


def metrics(out) -> list[dict]:
    return list(csv.DictReader(open(out / "metrics.csv")))


@pytest.mark.parametrize("precision", [{}, {"bf16": True, "gradient_checkpointing": True}], ids=["fp32", "bf16"])
def test_rl_runs_grpo_iterations_and_reports_heldout_rewards(sft_done, precision):
    root, config_file = sft_done
    rl_file, paths = rl_config(root, config_file, f"rl-basic-{len(precision)}", **precision)
    out = paths.rl("sft_s__rl_sc")
    result = rl(rl_file, out)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(out)
    assert [int(r["iteration"]) for r in rows] == [0, 1, 2, 3]
    assert all(float(r["well_formed"]) == 1.0 for r in rows)  # the grid constraint holds for every completion
    assert rows[1]["heldout_reward"] != "" and rows[0]["heldout_reward"] == ""
    manifest = artifacts.read_manifest(out)
    held = manifest["heldout"]
    assert set(held["sft"]) == set(held["rl"]) == {"shapes_s", "shapes_c"}
    assert held["improvement"]["shapes_s"]["delta"] == pytest.approx(
        held["rl"]["shapes_s"]["overall"] - held["sft"]["shapes_s"]["overall"]
    )
    saved = load_file(out / "model.safetensors")  # published in the compute dtype, as evaluation runs it
    assert {t.dtype for t in saved.values()} == {torch.bfloat16 if precision else torch.float32}


def test_policy_is_fp32_master_weights_even_from_a_bf16_checkpoint(sft_done, tmp_path):
    """A bf16 SFT checkpoint (paper scale) gives an fp32 policy: one AdamW step of the paper's lr 3e-6 moves it,
    where the same step on the bf16 weights themselves would round almost every update away."""
    root, config_file = sft_done
    sft_dir = artifacts.Paths(from_dict(yaml.safe_load(open(config_file)))).sft("sft_s__rl_sc")
    Emu3ForCausalLM.from_pretrained(sft_dir, dtype=torch.bfloat16).save_pretrained(tmp_path)
    spec = from_dict(yaml.safe_load(open(rl_config(root, config_file, "rl-bf16", bf16=True, gradient_checkpointing=True)[0]))).rl
    policy, reference = load_models(tmp_path, spec, "cpu")
    assert policy.dtype == torch.float32 and reference.dtype == torch.bfloat16
    assert policy.is_activation_checkpointing and not reference.training and not any(p.requires_grad for p in reference.parameters())

    def moved_share(model) -> float:
        before = [p.detach().clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        torch.optim.AdamW(model.parameters(), lr=3e-6, weight_decay=0.0).step()
        return float(sum((a != b).sum() for a, b in zip(before, model.parameters())) / sum(p.numel() for p in before))

    assert moved_share(policy) > 0.99
    assert moved_share(reference.requires_grad_(True)) < 0.1


def scored_by_image(server) -> dict:
    """``rl.reward`` of the judge that scores each edited image differently (conftest's ``scoring_server``)."""
    return {"kind": "viescore", "model": "by-image", "base_url": f"http://127.0.0.1:{server.server_address[1]}/v1"}  # own cache keys


def test_killed_rl_resumes_to_the_same_weights(sft_done, scoring_server):
    root, config_file = sft_done
    judge = scored_by_image(scoring_server)
    ref_file, ref_paths = rl_config(root, config_file, "rl-ref", save_every=1, eval_every=None, num_iterations=12, reward=judge)
    assert rl(ref_file, ref_paths.rl("sft_s__rl_sc")).returncode == 0
    # the same run, writing elsewhere, killed after its second checkpoint
    kill_file, paths = rl_config(root, config_file, "rl-kill", save_every=1, eval_every=None, num_iterations=12, reward=judge)
    kill_out = root / "rl-killed" / paths.rl("sft_s__rl_sc").name
    partial = kill_out.with_name(kill_out.name + ".partial")
    kill_step_when("rl", kill_file, kill_out, partial / "checkpoints" / "iter_000001" / "state.json",
                   "--experiment", "sft_s__rl_sc")
    assert not kill_out.exists()
    assert rl(kill_file, kill_out).returncode == 0
    resumed, uninterrupted = load_file(str(kill_out / "model.safetensors")), load_file(str(ref_paths.rl("sft_s__rl_sc") / "model.safetensors"))
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=1e-5, atol=1e-6)


def test_two_ranks_equal_one_rank(sft_done, scoring_server):
    root, config_file = sft_done
    judge = scored_by_image(scoring_server)
    one_file, paths = rl_config(root, config_file, "rl-one", num_iterations=2, eval_every=None, reward=judge)
    two_file, _ = rl_config(root, config_file, "rl-two", num_iterations=2, eval_every=None, num_processes=2, reward=judge)
    one_out, two_out = root / "rl-one-out", root / "rl-two-out"
    assert rl(one_file, one_out).returncode == 0
    result = rl(two_file, two_out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert artifacts.read_manifest(two_out)["world_size"] == 2
    assert all(float(r["zero_spread_groups"]) < 1 and float(r["grad_norm"]) > 0 for r in metrics(one_out))  # a signal
    for r in metrics(one_out):  # the phases are measured, and they are parts of the step
        phases = [float(r[k]) for k in ("time_rollout", "time_reward", "time_update", "time_sync")]
        assert min(phases) >= 0 and phases[0] > 0 and phases[2] > 0 and sum(phases) <= float(r["step_time"])
    for a, b in zip(metrics(one_out), metrics(two_out)):
        for key in ("reward_mean", "reward_std", "well_formed", "zero_spread_groups", "loss", "kl", "entropy", "grad_norm"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-6), key
    one, two = load_file(str(one_out / "model.safetensors")), load_file(str(two_out / "model.safetensors"))
    start = load_file(str(paths.sft("sft_s__rl_sc") / "model.safetensors"))
    assert any(not torch.equal(start[k], one[k]) for k in start)  # the policy moved
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-6)


def test_experiment_without_rl_stage_is_one_line(sft_done):
    root, config_file = sft_done
    result = rl(config_file, root / "rl-none", experiment="sft_s")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --experiment 'sft_s' is not an experiment with an rl stage")


def test_rl_with_a_viescore_judge_over_http(sft_done, server):
    """The rl step scores with a VLM judge behind a local chat-completions server that fails 30 % of requests."""
    root, config_file = sft_done
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    judge = {"kind": "viescore", "model": "judge", "base_url": url, "timeout_s": 0.5, "backoff_s": 0.01, "max_concurrency": 8}
    rl_file, _ = rl_config(root, config_file, "rl-judge", num_iterations=2, eval_every=None, reward=judge)
    out = root / "rl-judge-out"
    result = rl(rl_file, out)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(out)
    assert len(rows) == 2 and all(float(r["reward_mean"]) > 0 for r in rows)
    assert server.requests > 2 * 8 * 2  # SC + PQ for every sample of both iterations, plus retries and held-out


def test_rl_serves_its_own_judge_for_the_whole_run(sft_done):
    """`rl.reward.serve`: the launcher starts the judge before torchrun's workers and stops it after them."""
    import psutil

    root, config_file = sft_done
    command = f"{sys.executable} {REPO / 'tests' / 'fake_judge.py'} --port {{port}}"
    judge = {"kind": "viescore", "model": "judge", "serve": {"command": command, "ready_timeout_s": 60}, "cache": False}
    rl_file, _ = rl_config(root, config_file, "rl-serve", num_iterations=2, eval_every=None, reward=judge)
    out = root / "rl-serve-out"
    result = rl(rl_file, out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [float(r["reward_mean"]) for r in metrics(out)] == [pytest.approx(6 ** 0.5 * 7 ** 0.5)] * 2  # sqrt(6·7)
    assert (out / "judge_server.log").is_file()
    assert not [p for p in psutil.process_iter(["cmdline"]) if "fake_judge.py" in " ".join(p.info["cmdline"] or [])]


def test_judge_url_without_v1_stops_rl_before_training(sft_done):
    root, config_file = sft_done
    judge = {"kind": "viescore", "model": "judge", "base_url": "http://127.0.0.1:9"}
    rl_file, _ = rl_config(root, config_file, "rl-badurl", reward=judge)
    result = rl(rl_file, root / "rl-badurl-out")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: rl.reward.base_url: 'http://127.0.0.1:9' must end in /v1 (e.g. http://judge-host:8000/v1)"
    )


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here: the engine runs")
def test_vllm_engine_outside_its_environment_is_refused_not_silently_replaced(sft_done):
    root, config_file = sft_done
    rl_file, _ = rl_config(root, config_file, "rl-vllm", engine="vllm")
    result = rl(rl_file, root / "rl-vllm-out")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: rl.engine: 'vllm' needs the vllm package, which is not installed here; "
        "run the step in the vllm environment (envs/vllm.yaml, containers/vllm)"
    )
    assert not (root / "rl-vllm-out").exists() and not (root / "rl-vllm-out.partial").exists()
