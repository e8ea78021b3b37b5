"""The ``rl`` step: GRPO from an SFT checkpoint on tokenized RL pools (spec §C).

    python -m earl.rl --config config/config.yaml --experiment sft_s__rl_sc --out results/rl/<name>-<hash>

checks its inputs, then runs ``rl.num_processes`` torchrun workers. Every worker owns a rollout engine and a
slice of each iteration's prompts; gradients and metrics are summed over ranks, so the update and the logged
numbers equal a single-process run on the same data. One iteration (spec §C.10):

    prompts   ← episodes_per_iteration / G rows of the mixed pool, drawn from a generator seeded by (seed, it)
    rollouts  ← G samples per prompt at temperature T under the grid constraint of the source's H×W
    rewards   ← judge(decoded image) as sqrt(min SC · min PQ); unfinished or malformed → 0; judge failure → masked
    A         ← (r − group mean) / (group std + ε)
    loss      ← token mean of −logπ·A + β·k3(ref, logπ) over every completion token of the iteration
    one AdamW step (clipped), metrics, held-out reward every eval_every, checkpoint every save_every

The sampler is a pure function of (seed, iteration), and a checkpoint holds model, optimizer and iteration,
so a run killed at any point and resumed ends with the weights of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers import Emu3ForCausalLM, GenerationConfig

from earl import artifacts, heldout, layout as layout_mod
from earl.cli_util import peak_gpu_memory_gib, run_distributed
from earl.config import Config, ConfigError
from earl.engine import SamplingParams, check_engine, make_engine
from earl.grpo import group_advantages, grpo_loss, token_logprobs
from earl.models import fingerprint, load_checked, load_vq
from earl.judge import check_judge, make_judge, served
from earl.sft import load_tokenized, mixture
from earl.text_tokenizer import load_text_tokenizer

CHECKPOINTS = "checkpoints"
METRICS = ["iteration", "reward_mean", "reward_std", "well_formed", "finished", "zero_spread_groups", "judge_failures",
           "loss", "policy_loss", "kl", "entropy", "grad_norm", "rollout_tokens_per_second", "step_time",
           "time_rollout", "time_reward", "time_update", "time_sync", "heldout_reward"]


# ------------------------------------------------------------------------------------------ set-up


def make_reward(config: Config, name: str):
    """The configured judge for rows of dataset ``name``."""
    return make_judge(config.rl.reward, config.datasets[name].source, "rl.reward")


class Pool:
    """The RL prompts: every dataset's train rows, mixed like SFT data (spec §B.3, §C.3)."""

    def __init__(self, config: Config, stage, layout: layout_mod.Layout):
        self.rows = {name: load_tokenized(config, name, "train") for name in stage.datasets}
        self.pairs = mixture({n: len(d) for n, d in self.rows.items()}, stage.datasets, config.rl.seed)
        self.layout, self.prefill = layout, config.rl.assistant_prefill

    def draw(self, iteration: int, count: int, seed: int) -> list[tuple[str, dict]]:
        """``count`` distinct pool entries for ``iteration``: the same on every rank and on every rerun."""
        picks = np.random.default_rng([seed, iteration]).choice(len(self.pairs), count, replace=False)
        return [(self.pairs[i][0], self.rows[self.pairs[i][0]][self.pairs[i][1]]) for i in picks]

    def prompt(self, row: dict) -> tuple[list[int], tuple[int, int]]:
        source = np.asarray(row["source_codes"])
        return self.layout.prompt(source, row["instruction"], self.prefill), source.shape


def batch_tensors(prompts: list[list[int]], completions: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[left-padded prompt ; right-padded completion] ids, attention mask, completion mask (spec §C.8)."""
    width_p, width_c = max(map(len, prompts)), max(map(len, completions))
    ids = torch.full((len(prompts), width_p + width_c), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, width_p - len(p) : width_p] = torch.tensor(p)
        ids[i, width_p : width_p + len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, width_p - len(p) : width_p + len(c)] = 1
    return ids, mask, mask[:, width_p:].float()


# ------------------------------------------------------------------------------------- distributed


def world() -> tuple[int, int]:
    """This worker's rank and the number of workers; several workers join one group, gloo for the metrics (CPU
    tensors) and NCCL for the gradients on GPUs. A vllm engine built later in the worker shares the group."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over workers. One worker has nothing to add, even where the vllm engine made it a group of one."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
    return values


# ------------------------------------------------------------------------------------------- checkpoints


def latest_checkpoint(work: Path) -> Path | None:
    done = sorted((work / CHECKPOINTS).glob("iter_*/state.json"))
    return done[-1].parent if done else None


def save_checkpoint(work: Path, iteration: int, policy, optimizer, rank: int) -> None:
    """``iter_N/`` with weights, optimizer and the next iteration; state.json is written last (the commit point)."""
    if rank != 0:
        return
    directory = work / CHECKPOINTS / f"iter_{iteration:06d}"
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"model": policy.state_dict(), "optimizer": optimizer.state_dict()}, directory / "state.pt")
    artifacts.write_text_atomic(directory / "state.json", json.dumps({"next_iteration": iteration + 1}))
    for old in sorted((work / CHECKPOINTS).glob("iter_*"))[:-2]:  # keep the newest two
        for f in old.iterdir():
            f.unlink()
        old.rmdir()


def load_models(sft_dir: Path, spec, device: str):
    """The policy and the frozen reference, both from the SFT checkpoint, without dropout (§F.12).

    The policy is fp32 whatever dtype SFT saved: its weights are AdamW's master weights, and an update of the
    paper's lr 3e-6 is far below bf16's resolution (2**-8 relative), so bf16 weights would round it away. With
    ``rl.bf16`` the forward passes run under bf16 autocast and the reference is kept in bf16.
    """
    policy = load_checked(Emu3ForCausalLM, sft_dir, attention_dropout=0.0, dtype=torch.float32).to(device)
    if spec.gradient_checkpointing:
        policy.activation_checkpointing_enable()
    reference = load_checked(Emu3ForCausalLM, sft_dir, attention_dropout=0.0).to(device, compute_dtype(spec))
    return policy, reference.eval().requires_grad_(False)


def make_optimizer(policy, spec) -> torch.optim.AdamW:
    return torch.optim.AdamW(policy.parameters(), lr=spec.learning_rate, betas=(spec.adam_beta1, spec.adam_beta2),
                             eps=spec.adam_epsilon, weight_decay=spec.weight_decay)


def compute_dtype(spec) -> torch.dtype:
    return torch.bfloat16 if spec.bf16 else torch.float32


# ------------------------------------------------------------------------------------------- the loop


def heldout_reward(config: Config, engine, layout, vq, rows_by_name, rewards_of: dict) -> dict[str, list[heldout.Sample]]:
    """Greedy held-out edits of the pool's datasets by the rollout engine's current weights, scored by the
    training reward (same code as SFT's check)."""
    params = SamplingParams(max_tokens=config.rl.max_response_tokens, temperature=0.0)
    return {
        name: heldout.score_edits(rewards_of[name], vq, rows, heldout.edit_rows(engine, layout, vq, rows, config.evaluate.assistant_prefill, params))
        for name, rows in rows_by_name.items()
    }


def autocast(spec, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.bf16)


def iteration_step(config: Config, pool: Pool, iteration: int, policy, reference, optimizer, engine, vq, rewards_of: dict,
                   rank: int, size: int) -> dict:
    """One GRPO iteration on this rank's share of the prompts; returns metrics summed over ranks."""
    spec, ids = config.rl, pool.layout.ids
    group = spec.generations_per_sample
    started = time.time()
    prompt_count = spec.episodes_per_iteration // group
    mine = list(range(prompt_count))[rank::size]
    everyone = pool.draw(iteration, prompt_count, spec.seed)
    drawn = [everyone[k] for k in mine]
    prompts, grids = zip(*(pool.prompt(row) for _, row in drawn))
    prompts = [p for p in prompts for _ in range(group)]
    grids = [g for g in grids for _ in range(group)]
    policy.eval()
    params = SamplingParams(spec.max_response_tokens, spec.temperature, spec.top_k, spec.grid_constraint, top_p=spec.top_p)
    # each sample's seed names (iteration, prompt, sample), so any number of ranks samples the same completions
    seeds = [int(np.random.SeedSequence([spec.seed, iteration, k, j]).generate_state(1)[0]) for k in mine for j in range(group)]
    rollouts = engine.generate(prompts, grids, params, seeds)
    rollout_time = time.time() - started

    mark = time.time()
    parsed = heldout.grids_of(pool.layout, rollouts, grids)
    images = heldout.decode_all(vq, parsed)
    rows = [row for _, row in drawn for _ in range(group)]
    names = [name for name, _ in drawn for _ in range(group)]
    scores = [None] * len(rows)
    for name in set(names):  # one judge call per dataset, concurrent inside
        mine = [k for k, n in enumerate(names) if n == name]
        for k, score in zip(mine, heldout.judge_rows(rewards_of[name], vq, [rows[k] for k in mine], [images[k] for k in mine])):
            scores[k] = score
    rewards = torch.tensor([s.overall for s in scores])
    judged = torch.tensor([not s.failed for s in scores], dtype=torch.float)
    advantages = group_advantages(rewards, group, spec.advantage_eps, valid=judged.bool())
    reward_time, mark = time.time() - mark, time.time()

    completions = [rollouts.completion(k) for k in range(len(prompts))]
    total_tokens = all_sum(torch.tensor(float(sum(len(c) * j for c, j in zip(completions, judged.tolist())))))
    policy.train()
    optimizer.zero_grad(set_to_none=True)
    sums = torch.zeros(6)
    for start in range(0, len(prompts), spec.per_device_batch_size):
        part = slice(start, start + spec.per_device_batch_size)
        input_ids, attention, completion_mask = batch_tensors(prompts[part], completions[part], ids.pad)
        input_ids, attention = input_ids.to(policy.device), attention.to(policy.device)
        completion_mask = completion_mask.to(policy.device) * judged[part, None].to(policy.device)
        width = completion_mask.shape[1]
        with torch.no_grad(), autocast(spec, policy.device):
            ref_logp, _ = token_logprobs(reference, input_ids, attention, width, ids, spec.temperature,
                                         spec.separate_language_and_vision_vocabs)
        with autocast(spec, policy.device):
            logp, entropy = token_logprobs(policy, input_ids, attention, width, ids, spec.temperature,
                                           spec.separate_language_and_vision_vocabs)
        parts = grpo_loss(logp, ref_logp, advantages[part].to(policy.device), completion_mask, spec.kl_coeff, total_tokens.item())
        parts.loss.backward()
        sums += torch.tensor([parts.loss.item(), parts.policy, parts.kl,
                              float((entropy.detach() * completion_mask).sum() / total_tokens), 0.0, 0.0])
    for p in policy.parameters():
        if p.grad is not None:
            all_sum(p.grad)
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), spec.max_grad_norm)
    optimizer.step()
    update_time, mark = time.time() - mark, time.time()
    engine.sync_weights()  # the next rollouts sample from the updated policy
    sync_time = time.time() - mark

    groups = rewards.view(-1, group)
    flat = (groups.max(1).values - groups.min(1).values) < 1e-6
    counts = torch.tensor([
        float(rewards.sum()), float((rewards**2).sum()), float(len(rewards)),
        float(sum(g is not None for g in parsed)), float(rollouts.finished.sum()), float(flat.sum()), float(len(groups)),
        float(len(scores) - judged.sum()), float(rollouts.lengths.sum()), rollout_time,
    ])
    sums, counts = all_sum(sums), all_sum(counts)
    n = counts[2]
    mean = counts[0] / n
    return {
        "iteration": iteration, "reward_mean": float(mean), "reward_std": float((counts[1] / n - mean**2).clamp(min=0).sqrt()),
        "well_formed": float(counts[3] / n), "finished": float(counts[4] / n), "zero_spread_groups": float(counts[5] / counts[6]),
        "judge_failures": int(counts[7]), "loss": float(sums[0]), "policy_loss": float(sums[1]), "kl": float(sums[2]),
        "entropy": float(sums[3]), "grad_norm": float(grad_norm), "rollout_tokens_per_second": float(counts[8] / max(counts[9] / size, 1e-9)),
        "step_time": time.time() - started,
        # this rank's wall clock per phase: sampling; parse + VQ decode + judge; log-probs + backward + optimizer
        # (gradient all-reduce included); pushing the new weights to the rollout engine
        "time_rollout": rollout_time, "time_reward": reward_time, "time_update": update_time, "time_sync": sync_time,
    }


def train(config: Config, out: Path, experiment: str) -> None:
    spec, stage = config.rl, config.experiments[experiment].rl
    torch.set_num_threads(spec.threads_per_process)  # torchrun would leave each worker one thread
    rank, size = world()
    paths = artifacts.Paths(config)
    sft_dir = paths.sft(experiment)
    torch.manual_seed(spec.seed)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    policy, reference = load_models(sft_dir, spec, device)
    optimizer = make_optimizer(policy, spec)
    tokenizer = load_text_tokenizer(paths.text_tokenizer())
    layout = layout_mod.Layout(tokenizer, artifacts.read_manifest(paths.vq())["codebook_size"])
    vq = load_vq(paths.vq()).to(device)
    pool = Pool(config, stage, layout)
    rewards_of = {name: make_reward(config, name) for name in stage.datasets}
    engine = make_engine(spec.engine, layout, sft_dir, spec.rollout_batch_size, spec.vllm_gpu_memory_utilization,
                         spec.model_context_size, policy, dtype=reference.dtype)
    held = {}
    for name in stage.datasets:
        rows = load_tokenized(config, name, spec.heldout_split)
        held[name] = [rows[i] for i in range(min(spec.heldout_samples, len(rows)))]

    work = out.with_name(out.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    start, before = 0, None
    if rank == 0 and (work / "heldout_sft.json").exists():
        before = {n: [heldout.Sample(**s) for s in v] for n, v in json.loads((work / "heldout_sft.json").read_text()).items()}
    elif rank == 0:  # the engine still samples from the SFT weights
        before = heldout_reward(config, engine, layout, vq, held, rewards_of)
        artifacts.write_text_atomic(work / "heldout_sft.json", json.dumps({n: heldout.records(v) for n, v in before.items()}))
    if (last := latest_checkpoint(work)) is not None:
        state = torch.load(last / "state.pt", map_location=device, weights_only=True)
        policy.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        engine.sync_weights()
        start = json.loads((last / "state.json").read_text())["next_iteration"]
    if rank == 0:
        forget_after(work / "metrics.csv", start)  # rows a killed run logged after its last checkpoint
    writer = SummaryWriter(str(work / "tensorboard")) if rank == 0 else None
    bar = tqdm(range(start, spec.num_iterations), initial=start, total=spec.num_iterations, desc="grpo",
               unit="it", disable=rank != 0, mininterval=5)
    for iteration in bar:
        metrics = iteration_step(config, pool, iteration, policy, reference, optimizer, engine, vq, rewards_of, rank, size)
        if rank == 0 and spec.eval_every and (iteration + 1) % spec.eval_every == 0:
            report = heldout_reward(config, engine, layout, vq, held, rewards_of)
            metrics["heldout_reward"] = float(np.mean([s.overall for samples in report.values() for s in samples]))
        if rank == 0:
            log_metrics(work / "metrics.csv", writer, metrics)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}", kl=f"{metrics['kl']:.4f}", refresh=False)
        if (iteration + 1) % spec.save_every == 0 or iteration + 1 == spec.num_iterations:
            save_checkpoint(work, iteration, policy, optimizer, rank)
    peak_memory = peak_gpu_memory_gib()  # all ranks
    if rank != 0:
        return
    writer.close()
    after = heldout_reward(config, engine, layout, vq, held, rewards_of)
    policy.to(compute_dtype(spec)).save_pretrained(work)  # fp32 master weights stay in the iter_N checkpoints
    tokenizer.save_pretrained(work)
    GenerationConfig(bos_token_id=layout.ids.bos, eos_token_id=layout.ids.eos, pad_token_id=layout.ids.pad).save_pretrained(work)
    saved = load_checked(Emu3ForCausalLM, work)
    inputs = [sft_dir, *(paths.tokenized(n) for n in stage.datasets), paths.text_tokenizer(), paths.vq()]
    with artifacts.artifact_dir(out) as work:
        artifacts.write_manifest(
            work, step="rl", config={"rl": spec, "stage": stage}, inputs=inputs, experiment=experiment,
            fingerprint=fingerprint(saved), iterations=spec.num_iterations, world_size=size, peak_gpu_memory_gib=peak_memory,
            informative_groups=1.0 - float(np.mean([float(r["zero_spread_groups"]) for r in csv.DictReader((work / "metrics.csv").open())])),
            heldout={
                "sft": {n: heldout.summarize(v) for n, v in before.items()},
                "rl": {n: heldout.summarize(v) for n, v in after.items()},
                "improvement": improvement(before, after),
            },
        )


def improvement(before: dict[str, list[heldout.Sample]], after: dict[str, list[heldout.Sample]]) -> dict:
    """RL − SFT held-out overall per dataset and over all, with the paired standard error (same rows, same order)."""
    def paired(b: list[heldout.Sample], a: list[heldout.Sample]) -> dict:
        delta, se = heldout.mean_se([y.overall - x.overall for x, y in zip(b, a)])
        return {"delta": delta, "se": se, "z": delta / se if se > 0 else None}

    result = {name: paired(before[name], after[name]) for name in after}
    result["all"] = paired([s for n in after for s in before[n]], [s for n in after for s in after[n]])
    return result


def forget_after(path: Path, iteration: int) -> None:
    if path.exists():
        rows = list(csv.DictReader(path.open()))
        keep = [r for r in rows if int(r["iteration"]) < iteration]
        if len(keep) != len(rows):
            with artifacts.atomic_file(path) as tmp, tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, METRICS)
                writer.writeheader()
                writer.writerows(keep)


def log_metrics(path: Path, writer: SummaryWriter, metrics: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        out = csv.DictWriter(f, METRICS)
        if new:
            out.writeheader()
        out.writerow(metrics)
    for key, value in metrics.items():
        if key != "iteration":
            writer.add_scalar(f"rl/{key}", value, metrics["iteration"])


# ---------------------------------------------------------------------------------------------- step


def check(config: Config, out: Path, experiment: str) -> int:
    if experiment not in config.experiments or config.experiments[experiment].rl is None:
        with_rl = sorted(n for n, e in config.experiments.items() if e.rl is not None)
        raise ConfigError(f"--experiment {experiment!r} is not an experiment with an rl stage ({with_rl})")
    paths = artifacts.Paths(config)
    stage = config.experiments[experiment].rl
    for directory in [paths.sft(experiment), *(paths.tokenized(n) for n in stage.datasets), paths.vq(), paths.text_tokenizer()]:
        artifacts.read_manifest(directory)
    check_judge(config.rl.reward, [config.datasets[n].source for n in stage.datasets], "rl.reward")
    check_engine(config.rl.engine, config.rl.top_p, "rl")
    return config.rl.num_processes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m earl.rl", description=__doc__)
    parser.add_argument("--experiment", required=True, help="experiment name in config.experiments (with an rl stage)")
    run_distributed(parser, "earl.rl", check, train, argv, experiment=None,
                    around=lambda config, out: served(config.rl.reward, out.with_name(out.name + ".partial") / "judge_server.log", "rl.reward"))


if __name__ == "__main__":
    main()
