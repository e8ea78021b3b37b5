"""The evaluate step through its CLI: per-sample results and metrics that agree, the rollout engine's own edits,
chunked resume after kill -9, the VIEScore judge over HTTP with its answer cache and counted failures."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from transformers import Emu3ForCausalLM

from conftest import REPO, kill_step_when, step, write_config
from earl import artifacts, heldout, layout as layout_mod
from earl.config import from_dict
from earl.engine import HFEngine, SamplingParams
from earl.evaluate import benchmark_rows, unique_ids
from earl.models import load_checked, load_vq
from earl.text_tokenizer import load_text_tokenizer
from test_sft import sft_config


@pytest.fixture(scope="module")
def sft_model(tiny_pipeline):
    """A tiny SFT(S) checkpoint: the final model of experiment ``sft_s``."""
    root, data, _, _ = tiny_pipeline
    config_file, paths = sft_config(root, data, "eval-base", max_steps=4, quality_check=None)
    result = step("sft", config_file, paths.sft("sft_s"), "--experiment", "sft_s")
    assert result.returncode == 0, result.stderr[-3000:]
    return root, config_file


def eval_config(root, config_file: str, name: str, **evaluate) -> tuple[str, artifacts.Paths, dict]:
    config = yaml.safe_load(open(config_file))
    config["evaluate"].update(evaluate)
    return write_config(root / f"{name}.yaml", config), artifacts.Paths(from_dict(config)), config


def evaluate(config_file: str, out, benchmark: str = "shapes_s", experiment: str = "sft_s"):
    return step("evaluate", config_file, out, "--experiment", experiment, "--benchmark", benchmark)


def test_evaluate_writes_samples_images_and_metrics_that_agree(sft_model):
    root, config_file = sft_model
    file, paths, config = eval_config(root, config_file, "eval-basic", samples_per_prompt=2, batch_size=4)
    out = paths.evaluate("sft_s", "shapes_s")
    result = evaluate(file, out)
    assert result.returncode == 0, result.stderr[-3000:]
    samples = pd.read_parquet(out / "samples.parquet")
    rows = benchmark_rows(from_dict(config), "shapes_s")
    side = int(config["datasets"]["shapes_s"]["image_area"] ** 0.5)
    assert len(samples) == 2 * len(rows)
    assert samples.groupby("row")["sample"].apply(sorted).tolist() == [[0, 1]] * len(rows)
    assert set(samples["task"]) == set(rows["edit_type"])
    for record in samples.itertuples():
        assert (out / record.source_image).is_file() and (out / record.target_image).is_file()
        assert (record.image is not None) == record.well_formed
        if record.image is not None:
            assert Image.open(out / record.image).size == (side, side)
    metrics = json.loads((out / "metrics.json").read_text())
    judged = samples[~samples["failed"]]
    assert metrics["n"] == len(samples) and metrics["rows"] == len(rows) and metrics["judge_failures"] == 0
    assert metrics["overall"]["mean"] == pytest.approx(judged["overall"].mean())
    assert metrics["overall"]["ci_low"] <= metrics["overall"]["mean"] <= metrics["overall"]["ci_high"]
    for task, group in judged.groupby("task"):
        assert metrics["by_task"][task]["sc"]["mean"] == pytest.approx(group["sc"].mean())
    assert "edit_success" not in metrics  # the verifier has no VIEScore sub-scores
    # two experiments ending in the same model share one evaluation (versioned by the model, not the name)
    data = yaml.safe_load(open(file))
    data["experiments"]["sft_s_again"] = {"label": "the same SFT, named twice", "sft": data["experiments"]["sft_s"]["sft"]}
    twice = artifacts.Paths(from_dict(data))
    assert twice.evaluate("sft_s_again", "shapes_s") == twice.evaluate("sft_s", "shapes_s") == out
    assert twice.evaluate("sft_s__rl_sc", "shapes_s") != out


def test_evaluate_edits_are_the_rollout_engines(sft_model):
    """Greedy evaluation equals the engine's greedy edits of the same prompts: one generation code path."""
    root, config_file = sft_model
    file, paths, data = eval_config(root, config_file, "eval-greedy", temperature=0.0, batch_size=3, samples_per_prompt=1)
    out = paths.evaluate("sft_s", "shapes_c")
    assert evaluate(file, out, "shapes_c").returncode == 0
    config = from_dict(data)
    model = load_checked(Emu3ForCausalLM, paths.sft("sft_s")).eval()
    layout = layout_mod.Layout(load_text_tokenizer(paths.text_tokenizer()), artifacts.read_manifest(paths.vq())["codebook_size"])
    vq = load_vq(paths.vq())
    rows = [dict(r) for r in benchmark_rows(config, "shapes_c")]
    params = SamplingParams(max_tokens=data["evaluate"]["max_tokens"], temperature=0.0)
    expected = heldout.edit_rows(HFEngine(model, layout, 16), layout, vq, rows, data["evaluate"]["assistant_prefill"], params)
    samples = pd.read_parquet(out / "samples.parquet").sort_values("row")
    for image, record in zip(expected, samples.itertuples()):
        assert (image is None) == (record.image is None)
        if image is not None:
            assert np.array_equal(np.asarray(image), np.asarray(Image.open(out / record.image)))


def test_killed_evaluation_resumes_to_the_same_results(sft_model):
    root, config_file = sft_model
    ref_file, ref_paths, _ = eval_config(root, config_file, "eval-ref", batch_size=1)
    ref = ref_paths.evaluate("sft_s", "shapes_s")
    assert evaluate(ref_file, ref).returncode == 0
    killed = root / "eval-killed" / ref.name
    partial = killed.with_name(killed.name + ".partial")
    kill_step_when("evaluate", ref_file, killed, partial / "chunks" / "0000001.parquet",
                   "--experiment", "sft_s", "--benchmark", "shapes_s")
    assert not killed.exists() and not (partial / "samples.parquet").exists()
    assert evaluate(ref_file, killed).returncode == 0
    pd.testing.assert_frame_equal(pd.read_parquet(killed / "samples.parquet"), pd.read_parquet(ref / "samples.parquet"))


def test_viescore_judging_is_cached_and_failures_are_counted(sft_model, server, monkeypatch):
    root, config_file = sft_model
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    judge = {"kind": "viescore", "model": "judge-test", "base_url": url, "max_attempts": 1, "timeout_s": 1.0,
             "backoff_s": 0.0, "max_concurrency": 4, "api_key_env": "EARL_TEST_JUDGE_KEY"}
    monkeypatch.setenv("EARL_TEST_JUDGE_KEY", "secret-test-key")
    file, paths, data = eval_config(root, config_file, "eval-judge", judge=judge, samples_per_prompt=3)
    out = paths.evaluate("sft_s", "shapes_s")
    assert evaluate(file, out).returncode == 0
    samples = pd.read_parquet(out / "samples.parquet")
    metrics = json.loads((out / "metrics.json").read_text())
    manifest = artifacts.read_manifest(out)
    failed = int(samples["failed"].sum())
    assert 0 < failed < len(samples)  # a 30 % fault rate with one attempt per question
    assert metrics["judge_failures"] == failed and metrics["overall"]["n"] == len(samples) - failed
    judged = samples[~samples["failed"]]
    assert set(judged["sc"]) == {6.0} and set(judged["pq"]) == {7.0}  # min([8, 6]), min([9, 7])
    assert set(judged["edit_success"]) == {8.0} and metrics["no_artifact"]["mean"] == 7.0
    assert manifest["judge_requests"] == server.requests
    assert "secret-test-key" not in (root / "eval-judge.yaml").read_text() + json.dumps(manifest)
    # a rerun asks again only the questions that failed; a fault-free server then fails none
    first = server.requests
    server.fault_rate = 0.0
    rerun = root / "eval-judge-rerun" / out.name
    assert evaluate(file, rerun).returncode == 0
    again = artifacts.read_manifest(rerun)
    answered = 2 * (len(samples) - failed)  # SC and PQ of every judged edit
    assert again["judge_cache_hits"] >= answered and again["judge_requests"] == server.requests - first
    assert server.requests - first <= 2 * failed and again["judge_failures"] == 0


def test_unique_ids_keep_first_and_number_repeats():
    assert unique_ids(["a", "b", "a", "a"]) == ["a", "b", "a#2", "a#3"]


def test_evaluate_refuses_an_unknown_benchmark(sft_model):
    root, config_file = sft_model
    file, paths, _ = eval_config(root, config_file, "eval-bad")
    result = evaluate(file, root / "x", "nope")
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith("error: --benchmark 'nope'")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here: the engine runs")
def test_evaluate_refuses_the_vllm_engine_outside_its_environment(sft_model):
    root, config_file = sft_model
    file, _, _ = eval_config(root, config_file, "eval-vllm", engine="vllm")
    result = evaluate(file, root / "y")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: evaluate.engine: 'vllm' needs the vllm package, which is not installed here; "
        "run the step in the vllm environment (envs/vllm.yaml, containers/vllm)"
    )


def test_evaluate_starts_and_stops_its_own_judge_server(sft_model):
    """`evaluate.judge.serve`: the step runs the judge server for its lifetime (here the fake judge as a command)."""
    import psutil

    root, config_file = sft_model
    command = f"{sys.executable} {REPO / 'tests' / 'fake_judge.py'} --port {{port}}"
    judge = {"kind": "viescore", "model": "judge-test", "serve": {"command": command, "ready_timeout_s": 60}, "cache": False}
    file, paths, _ = eval_config(root, config_file, "eval-serve", judge=judge)
    out = paths.evaluate("sft_s", "shapes_s")
    result = evaluate(file, out)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = artifacts.read_manifest(out)
    edits = json.loads((out / "metrics.json").read_text())["n"]
    assert manifest["judge_requests"] == 2 * edits and manifest["judge_failures"] == 0  # SC and PQ of every edit
    assert (out / "judge_server.log").is_file()  # the server's log is kept with the output
    assert not [p for p in psutil.process_iter(["cmdline"]) if "fake_judge.py" in " ".join(p.info["cmdline"] or [])]
    # a server that dies before answering is one line naming its log
    judge["serve"]["command"] = "echo no GPU here; exit 3"
    file, paths, _ = eval_config(root, config_file, "eval-serve-dead", judge=judge)
    result = evaluate(file, paths.evaluate("sft_s", "shapes_s"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: evaluate.judge.serve: the judge server exited with status 3 (log: ")
