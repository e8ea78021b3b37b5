"""One GRPO iteration of the rl step at Emu3-8B widths, timed phase by phase (issue 8, item 3).

    python benchmarks/rl_step.py --device cuda --layers 8 --out DIR     # GPU: Emu3-8B widths, random weights
    python benchmarks/rl_step.py --tiny --out DIR                        # CPU smoke test (seconds): same code

It runs ``earl.rl.iteration_step``, the function the rl step runs every iteration, with ``config/paper.yaml``'s
``rl`` section (16 prompts × G = 8 at T = 1 under the grid constraint, log-probs and backward in micro-batches
of ``per_device_batch_size``, bf16 autocast over fp32 master weights, gradient checkpointing, k3 KL), the
built-in engine (``rl.engine: hf``) and:

* policy and reference: ``Emu3ForCausalLM`` with Emu3-8B's widths (hidden 4,096, MLP 14,336, 32 / 8 heads,
  vocabulary 184,622) and ``--layers`` of its 32 layers, random weights saved in bf16 as SFT leaves them, then
  loaded by ``earl.rl.load_models``. All 32 layers do not fit one GPU: fp32 master weights, gradients and AdamW's
  two moments are 16 bytes a parameter (136 GB at 8.5 B) before the reference, the engine's bf16 copy and the
  KV cache. The per-layer work (everything but the embedding and the LM head) scales with ``--layers``.
* VQ: ``Emu3VQVAE`` with Emu3-VisionTokenizer's configuration (random weights; bf16 on the GPU): every 32×32
  completion and source is decoded to a 256×256 image, as the judge needs.
* judge: ``earl.judge.VIEScoreJudge``, the paper's reward client, against ``tests/fake_judge.py`` started by
  ``rl.reward.serve`` on 127.0.0.1, which answers at once with scores drawn from a hash of the edited image (so a
  group's rewards differ and the gradient is not zero): the client's own cost (PNG encoding, 256 requests,
  parsing), not a VLM's latency.
* prompts: random 32×32 source blocks and instructions (``benchmarks/rollout.py``'s workload).

Phases per iteration: iteration_step's own wall-clock split (``time_rollout``, ``time_reward``, ``time_update``,
``time_sync``: pushing the fp32 master weights into the engine's bf16 copy), refined by timers wrapped around
the helpers it calls (with a device synchronisation on each side): VQ decode within the reward; reference
log-probs, policy log-probs and the optimizer step within the update, whose remainder is the backward pass
(recomputation included), gradient clipping and batch assembly. ``--iterations`` are run; the table gives each,
the JSON (``rl_step_results.json`` in ``--out``) the same and the run's facts.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# benchmarks/tokenize.py shadows the standard library's `tokenize` while this folder is first on sys.path.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
sys.path.insert(0, os.path.join(REPO, "steps"))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from unittest import mock  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from earl import heldout, rl  # noqa: E402
from earl.cli_util import read_config  # noqa: E402
from earl.engine import make_engine  # noqa: E402
from earl.judge import VIEScoreJudge, served  # noqa: E402


def load_rollout():
    """benchmarks/rollout.py, whose model, layout, VQ and workload builders this benchmark shares."""
    spec = importlib.util.spec_from_file_location("bench_rollout", os.path.join(HERE, "rollout.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class RandomPool:
    """What iteration_step asks of ``earl.rl.Pool``, over random source blocks and instructions of ``words``."""

    def __init__(self, layout, grid: tuple[int, int], prefill: str, words: list[str], rows: int = 64):
        rng = np.random.default_rng(0)
        self.layout, self.grid, self.prefill = layout, grid, prefill
        self.rows = [{"source_codes": rng.integers(0, layout.ids.codebook_size, grid),
                      "instruction": " ".join(words[: rng.integers(4, 20)])} for _ in range(rows)]

    def draw(self, iteration: int, count: int, seed: int) -> list[tuple[str, dict]]:
        picks = np.random.default_rng([seed, iteration]).choice(len(self.rows), count, replace=False)
        return [("random", self.rows[i]) for i in picks]

    def prompt(self, row: dict) -> tuple[list[int], tuple[int, int]]:
        return self.layout.prompt(row["source_codes"], row["instruction"], self.prefill), self.grid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model and VQ, 4x4 grids, 8 episodes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=8, help="of Emu3-8B's 32 decoder layers")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides of paper.yaml")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.tiny:
        args.device = "cpu"
    rollout = load_rollout()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    grid = (4, 4) if args.tiny else (32, 32)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="rl_step_"))

    judge = json.dumps({"command": f"{sys.executable} {REPO}/tests/fake_judge.py --by-image --port {{port}}"})
    sets = ["rl.engine=hf", "rl.reward.base_url=null", f"rl.reward.serve={judge}", "rl.reward.cache=false",
            "rl.max_response_tokens=1100"]  # a 32x32 block is 1,065 tokens; the cache is sized by this
    if args.tiny:
        sets += ["rl.episodes_per_iteration=8", "rl.generations_per_sample=4", "rl.per_device_batch_size=4",
                 "rl.max_response_tokens=40", "rl.rollout_batch_size=8"]
    config = read_config([os.path.join(REPO, "config", "paper.yaml")], sets + args.set)
    spec = config.rl

    start = time.perf_counter()
    layout = rollout.build_layout(64 if args.tiny else rollout.EMU3_BASE_VOCAB, 16 if args.tiny else rollout.EMU3_CODEBOOK)
    rollout.build_model(args, layout, device, torch.bfloat16 if device.type == "cuda" else torch.float32).save_pretrained(work / "sft")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    policy, reference = rl.load_models(work / "sft", spec, device)
    optimizer = rl.make_optimizer(policy, spec)
    vq = rollout.build_vq(args.tiny, layout, device, dtype)
    engine = make_engine("hf", layout, None, spec.rollout_batch_size, spec.vllm_gpu_memory_utilization, policy=policy,
                         dtype=reference.dtype)
    pool = RandomPool(layout, grid, spec.assistant_prefill, rollout.WORDS)
    facts = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
        layers=policy.config.num_hidden_layers, parameters=sum(p.numel() for p in policy.parameters()),
        policy_dtype=str(policy.dtype), compute_dtype=str(reference.dtype), engine_dtype=str(engine.model.dtype),
        gradient_checkpointing=policy.is_activation_checkpointing, episodes=spec.episodes_per_iteration,
        group=spec.generations_per_sample, micro_batch=spec.per_device_batch_size,
        rollout_batch=spec.rollout_batch_size, setup_s=round(time.perf_counter() - start, 1),
        engine_weight_bytes=sum(p.numel() * p.element_size() for p in engine.model.parameters()) if engine.weights_from else 0,
    )
    print(json.dumps(facts), flush=True)

    timers = rollout.Timers(lambda: rollout.sync(device))
    phase = lambda: "reference_logprobs" if not torch.is_grad_enabled() else "policy_logprobs"  # noqa: E731
    optimizer.step = timers.wrap(optimizer.step, "optimizer_step")
    results = dict(facts=facts, iterations=[])
    with contextlib.ExitStack() as stack:
        stack.enter_context(served(spec.reward, work / "judge.log", "rl.reward"))
        stack.enter_context(mock.patch.object(rl, "token_logprobs", timers.wrap(rl.token_logprobs, phase)))
        stack.enter_context(mock.patch.object(heldout, "decode_all", timers.wrap(heldout.decode_all, "vq_decode")))
        rewards_of = {"random": VIEScoreJudge(spec.reward, None)}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for iteration in range(args.iterations):
            metrics = rl.iteration_step(config, pool, iteration, policy, reference, optimizer, engine, vq, rewards_of, 0, 1)
            inner = timers.take()
            row = dict(
                iteration=iteration, step_s=metrics["step_time"], rollout_s=metrics["time_rollout"],
                rollout_tokens_per_s=metrics["rollout_tokens_per_second"], reward_s=metrics["time_reward"],
                vq_decode_s=inner.get("vq_decode", 0.0), judge_client_s=metrics["time_reward"] - inner.get("vq_decode", 0.0),
                update_s=metrics["time_update"], reference_logprobs_s=inner.get("reference_logprobs", 0.0),
                policy_logprobs_s=inner.get("policy_logprobs", 0.0), optimizer_step_s=inner.get("optimizer_step", 0.0),
                sync_s=metrics["time_sync"], well_formed=metrics["well_formed"], judge_failures=metrics["judge_failures"],
                kl=metrics["kl"], grad_norm=metrics["grad_norm"],
            )
            row["backward_and_rest_s"] = row["update_s"] - row["reference_logprobs_s"] - row["policy_logprobs_s"] - row["optimizer_step_s"]
            row["sync_gb_per_s"] = facts["engine_weight_bytes"] / row["sync_s"] / 1e9 if facts["engine_weight_bytes"] else None
            results["iterations"].append(row)
            print(json.dumps(row), flush=True)
    results["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    (out / "rl_step_results.json").write_text(json.dumps(results, indent=1))
    keys = ["step_s", "rollout_s", "vq_decode_s", "judge_client_s", "reference_logprobs_s", "policy_logprobs_s",
            "backward_and_rest_s", "optimizer_step_s", "sync_s"]
    print("\n" + "".join(f"{k[:-2]:>20}" for k in ["it  "] + keys))
    for row in results["iterations"]:
        print(f"{row['iteration']:>20}" + "".join(f"{row[k]:>20.3f}" for k in keys))
    print(f"peak GiB {results['peak_gib']}")


if __name__ == "__main__":
    main()
