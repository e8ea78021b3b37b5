"""The sft step through its CLI: ZeRO-3 training on CPU, the published checkpoint, resume after kill -9, 2 ranks."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from transformers import Emu3ForCausalLM

from conftest import kill_step_when, orphaned_shm, step, write_config
from earl import artifacts
from earl.config import from_dict
from earl.models import load_checked

def sft_config(root, data: dict, name: str, **sft) -> tuple[str, artifacts.Paths]:
    """``data`` (conftest's tiny config) with ``sft`` overrides, written to ``root/<name>.yaml``."""
    config = json.loads(json.dumps(data))
    config["sft"].update(sft)
    return write_config(root / f"{name}.yaml", config), artifacts.Paths(from_dict(config))


def sft(config_file: str, out, experiment: str = "sft_s", stage: int = 0, **popen) -> subprocess.CompletedProcess:
    return step("sft", config_file, out, "--experiment", experiment, "--stage", str(stage), **popen)


def weights(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_sft_publishes_a_checked_checkpoint_with_curves_and_quality(tiny_pipeline):
    root, data, _, _ = tiny_pipeline
    config_file, paths = sft_config(root, data, "sft-basic")
    out = paths.sft("sft_s")
    result = sft(config_file, out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not out.with_name(out.name + ".partial").exists()
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "curves.csv"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    manifest = artifacts.read_manifest(out)
    model = load_checked(Emu3ForCausalLM, out)  # checks the fingerprint the manifest recorded
    assert manifest["global_step"] == 6 and manifest["data"]["shapes_s"]["train_rows"] == 24
    assert model.config.attention_dropout == 0.0 and model.config.hidden_size == 32
    quality = manifest["quality"]["shapes_s"]
    assert set(quality) == {"greedy", "sampled", "copy_source"}
    assert quality["copy_source"]["well_formed"] == 1.0 and quality["greedy"]["n"] == 4
    curves = (out / "curves.csv").read_text().splitlines()
    assert curves[0].startswith("step,epoch,loss,eval_loss,learning_rate,grad_norm,tokens_per_second")
    assert len(curves) > 6


def test_killed_run_resumes_to_the_same_weights(tiny_pipeline):
    root, data, _, _ = tiny_pipeline
    reference_file, reference = sft_config(root, data, "sft-ref", max_steps=120, save_steps=4, eval_steps=1000)
    assert sft(reference_file, reference.sft("sft_s")).returncode == 0
    # the same run in another results root, killed (whole process group, like a node failure) after a checkpoint
    data = json.loads(json.dumps(data))
    data["results"] = str(root / "killed-results")
    config_file, paths = sft_config(root, data, "sft-kill", max_steps=120, save_steps=4, eval_steps=1000)
    out = paths.sft("sft_s")
    assert out.name == reference.sft("sft_s").name  # same config, same versioned name
    for name in ("tokenized/shapes_s", "tokenizer", "vq"):  # share the inputs
        for src in (root / "results").glob(f"{name}*"):
            (root / "killed-results" / src.relative_to(root / "results")).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(src, root / "killed-results" / src.relative_to(root / "results"))
    partial = out.with_name(out.name + ".partial")
    leaked_before = orphaned_shm()
    kill_step_when("sft", config_file, out, partial / "checkpoints" / "checkpoint-8" / "trainer_state.json",
                   "--experiment", "sft_s")
    assert not out.exists() and partial.is_dir()  # nothing looks finished
    assert orphaned_shm() <= leaked_before  # a killed run leaves no shared memory behind either
    steps_done = max(int(p.name.split("-")[1]) for p in (partial / "checkpoints").glob("checkpoint-*"))
    assert steps_done < 120
    result = sft(config_file, out)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed, uninterrupted = weights(out), weights(reference.sft("sft_s"))
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=1e-5, atol=1e-6)


def test_two_processes_train_one_zero3_model(tiny_pipeline):
    root, data, _, _ = tiny_pipeline
    data = json.loads(json.dumps(data))
    config_file, paths = sft_config(root, data, "sft-two", num_processes=2, per_device_train_batch_size=2,
                                    bf16=True)  # DeepSpeed's bf16 as paper.yaml trains (the default is fp32)
    out = paths.sft("sft_s")
    leaked_before = orphaned_shm()
    result = sft(config_file, out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert orphaned_shm() <= leaked_before  # each rank's DeepSpeed all-reduce buffer went with it
    manifest = artifacts.read_manifest(out)
    assert manifest["world_size"] == 2 and manifest["global_step"] == 6
    load_checked(Emu3ForCausalLM, out)  # ZeRO-3 gathered the shards of both ranks into whole tensors


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("sft.model=/nonexistent/emu3", "error: sft.model: checkpoint directory '/nonexistent/emu3' does not exist"),
        ("sft.deepspeed=config/deepspeed/none.json", "error: sft.deepspeed: cannot read config/deepspeed/none.json"),
    ],
)
def test_bad_sft_config_fails_in_one_line_before_training(tiny_pipeline, setting, message):
    root, data, _, _ = tiny_pipeline
    config_file, _ = sft_config(root, data, "sft-bad")
    result = step("sft", config_file, root / "never", "--experiment", "sft_s", "--set", setting)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in result.stderr
    assert not (root / "never").exists() and not (root / "never.partial").exists()


def test_experiments_with_the_same_stages_share_one_sft_artifact(tiny_pipeline):
    _, data, _, _ = tiny_pipeline
    config = json.loads(json.dumps(data))
    config["experiments"] = {
        "a": {"sft": [{"datasets": {"shapes_s": 1.0}}]},
        "b": {"sft": [{"datasets": {"shapes_s": 1.0}}], "rl": {"datasets": {"shapes_c": None}}},
        "two_stage": {"sft": [{"datasets": {"shapes_s": 1.0}}, {"datasets": {"shapes_c": 1.0}}]},
        "c_only": {"sft": [{"datasets": {"shapes_c": 1.0}}]},
    }
    paths = artifacts.Paths(from_dict(config))
    assert paths.sft("a") == paths.sft("b") == paths.sft("two_stage", 0)
    assert paths.sft("two_stage").name.startswith("shapes_c-")
    assert paths.sft("two_stage") != paths.sft("c_only")  # stage 2 starts from stage 1's weights
    config["sft"]["learning_rate"] = 1e-3
    assert artifacts.Paths(from_dict(config)).sft("a") != paths.sft("a")


@pytest.mark.parametrize(
    ("schedule", "kwargs", "middle"),
    [("cosine_with_min_lr", {}, None), ("warmup_stable_decay", {"num_decay_steps": 20}, 3e-3)],
)
def test_the_trainer_schedule_ends_at_min_lr(tmp_path, schedule, kwargs, middle):
    """``min_lr`` reaches the Trainer as the schedule's own rate argument, whichever schedule ends at a floor."""
    from transformers import get_scheduler

    from earl.config import SFT
    from earl.sft import training_args

    spec = SFT(model=None, learning_rate=3e-3, min_lr=3e-5, lr_scheduler_type=schedule, lr_scheduler_kwargs=kwargs,
               warmup_steps=5, max_steps=100, deepspeed=None, early_stopping_patience=None)
    args = training_args(spec, tmp_path, use_cpu=True)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(100),
                              num_training_steps=100, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    rates = [scheduler.get_last_lr()[0]]
    for _ in range(100):
        optimizer.step()
        scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    assert rates[5] == pytest.approx(3e-3)
    assert rates[100] == pytest.approx(3e-5) and min(rates[5:]) == pytest.approx(3e-5)
    if middle is not None:  # warmup_stable_decay holds the peak until its decay steps
        assert rates[79] == pytest.approx(middle) and rates[81] < middle


def test_target_logits_collator_gives_the_full_logits_loss(tiny_tokenizer):
    """The batch asks for logits from the position before its first target token only; the causal-LM loss over
    those equals the loss over every position, for rows whose prompts differ in length (right-padded)."""
    import numpy as np
    from transformers import DataCollatorForSeq2Seq

    from conftest import random_emu3
    from earl.layout import Layout
    from earl.sft import TargetLogitsCollator

    layout = Layout(tiny_tokenizer, 16)
    rng = np.random.default_rng(0)
    rows = [layout.sft_example(rng.integers(0, 16, (h, h)), text, rng.integers(0, 16, (h, h)), cot=cot)
            for h, text, cot in [(3, "make the red circle blue", None), (2, "remove it", "the blue triangle goes"),
                                 (2, "add a green square at row 3, column 5", None)]]
    features = [{"input_ids": ids, "labels": labels} for ids, labels in rows]
    model = random_emu3(layout, len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2).eval()
    full = DataCollatorForSeq2Seq(tiny_tokenizer, padding=True, label_pad_token_id=-100)(features, "pt")
    kept = TargetLogitsCollator(tiny_tokenizer, padding=True, label_pad_token_id=-100)(features, "pt")

    first_target = min(next(i for i, t in enumerate(labels) if t != -100) for _, labels in rows)
    assert kept["logits_to_keep"].tolist() == list(range(first_target - 1, full["input_ids"].shape[1]))
    assert torch.equal(kept["labels"], full["labels"][:, first_target - 1:])
    with torch.no_grad():
        reference, target_only = model(**full), model(**kept)
    assert target_only.logits.shape[1] == full["input_ids"].shape[1] - first_target + 1
    assert torch.allclose(target_only.loss, reference.loss, rtol=1e-6, atol=1e-7)
    assert torch.allclose(target_only.logits, reference.logits[:, first_target - 1:])
