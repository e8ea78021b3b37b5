"""Multi-GPU verification (issue 9): ZeRO-3 SFT sharded over the GPUs and GRPO on several ranks, through the
step CLIs themselves (``python -m earl.sft`` / ``python -m earl.rl``, which start their torchrun workers).

    python benchmarks/multigpu.py --results RESULTS --work DIR --out OUT [--parts check sft sft_small rl]

``RESULTS`` is the results root of a pipeline run of ``--config`` (default ``config/config.yaml``): the runs
read its vq, tokenizer, tokenized shards and (RL) the SFT model of ``sft_s__rl_sc``, and write their own outputs
under ``--work``. Every run's config is ``--config`` plus an overlay of ``benchmarks/multigpu/``:

* ``check``: GPUs, their links and packages, and an NCCL all-reduce with one process per GPU.
* ``sft``: ``sft_emu3_8b.yaml``, an Emu3-8B-shaped model (32 layers, hidden 4096, MLP 14336, 32/8 heads,
  vocabulary 184,622: 8.49 B parameters), random init under ``deepspeed.zero.Init``, bf16, ZeRO-3 over
  ``sft.num_processes`` GPUs, on the default's shapes edits. Then the saved 16-bit weights are loaded back and
  the validation loss is recomputed the Trainer's way (batches of ``per_device_train_batch_size`` rows in
  order, batch means averaged) and compared with the Trainer's last ``eval_loss``.
* ``sft_small``: the same with ``sft_small_1gpu.yaml`` (8 layers, one process, 2 accumulation steps, so every
  optimizer step sees the same 64 rows as the N-GPU run's), for the loss trend and per-GPU throughput.
* ``rl``: ``rl.yaml`` (``rl.num_processes`` ranks) uninterrupted; the same killed (SIGKILL of the whole process
  tree) once a checkpoint half-way exists and run again, which resumes; and the same on one rank. ``--rl-runs``
  picks among the three; ``--previous SUMMARY`` adds the runs of an earlier call (a 1-GPU machine, say) to the
  comparisons: metrics of the resumed and 1-rank runs against the uninterrupted one, speed-up and scaling.

NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``, ``NVSHMEM_DISABLE_NVLS=1``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``
unless set). ``--set KEY=VALUE ...`` is added to every step's config (e.g. tiny sizes for a CPU rehearsal). Results:
``summary.json`` and ``runs.tar.gz`` (logs, curves, metrics, manifests) in ``--out``, a table on stdout.
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py shadows the standard library's `tokenize` while this folder is first on sys.path.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tarfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OVERLAYS = REPO / "benchmarks" / "multigpu"
PEAK_TFLOPS = 989.4  # H100/H200 SXM dense bf16, the datasheet figure (as benchmarks/sft.py)
RL_KEYS = ("reward_mean", "reward_std", "well_formed", "finished", "zero_spread_groups", "loss", "policy_loss", "kl",
           "entropy", "grad_norm")


def configs(args, overlays: list[str]) -> list[str]:
    return [str(args.config), *(str(OVERLAYS / o) for o in overlays)]


def step_command(args, step: str, overlays: list[str], sets: list[str], out: Path, experiment: str) -> list[str]:
    return [sys.executable, "-m", f"earl.{step}", "--config", *configs(args, overlays), "--set", *sets, "--experiment", experiment,
            "--out", str(out)]


def run_logged(command: list[str], log: Path, kill_when: Path | None = None) -> tuple[int, float]:
    """Run ``command`` with its output in ``log``; with ``kill_when``, SIGKILL its whole process tree as soon as
    that file exists (torchrun's workers live in their own sessions). Returns (exit status, seconds)."""
    import psutil

    started = time.time()
    with log.open("a") as f:
        process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        while process.poll() is None:
            if kill_when is not None and kill_when.exists():
                parent = psutil.Process(process.pid)
                for victim in [parent, *parent.children(recursive=True)]:
                    try:
                        victim.kill()
                    except psutil.NoSuchProcess:
                        pass
                break
            time.sleep(0.2)
        code = process.wait()
    return code, time.time() - started


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open())) if path.exists() else []


def number(value) -> float | None:
    return float(value) if value not in (None, "") else None


# ------------------------------------------------------------------------------------------------ check


def check(args) -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(),
            "names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    for name in ("transformers", "deepspeed", "datasets", "accelerate", "pydantic", "pyarrow", "openai", "tokenizers"):
        module = __import__(name)
        info[name] = getattr(module, "__version__", "?")
    if info["gpus"]:
        topology = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True).stdout
        info["topology"] = [line for line in topology.splitlines() if line.strip()]
    info["work_disk_free_gib"] = round(shutil.disk_usage(args.work).free / 2**30, 1)
    nproc = max(1, info["gpus"])
    code, seconds = run_logged([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
                                str(Path(__file__).resolve()), "--allreduce"], args.work / "allreduce.log")
    info["allreduce"] = (args.work / "allreduce.log").read_text().strip().splitlines()[-1] if code == 0 else f"failed ({code})"
    info["allreduce_s"] = round(seconds, 1)
    print(json.dumps(info), flush=True)
    return info


def allreduce() -> None:
    """One process per GPU (NCCL; gloo without GPUs): the sum of every rank's (rank + 1) and a 1 GiB all-reduce's rate."""
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    device = "cuda" if cuda else "cpu"
    small = torch.full((4,), float(rank + 1), device=device)
    dist.all_reduce(small)
    expected = size * (size + 1) / 2
    big = torch.ones(2**28 if cuda else 2**20, device=device)  # 1 GiB of float32 on GPUs
    for _ in range(2):
        dist.all_reduce(big)
    if cuda:
        torch.cuda.synchronize()
    started = time.time()
    for _ in range(5):
        dist.all_reduce(big)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.time() - started) / 5
    # bus bandwidth as nccl-tests defines it for all-reduce: bytes * 2 (n - 1) / n / time
    busbw = big.numel() * 4 * 2 * (size - 1) / size / seconds / 1e9
    if rank == 0:
        print(f"ranks {size}: sum {small[0].item():.0f} (expected {expected:.0f}), {big.numel() * 4 / 2**30:.3g} GiB "
              f"all-reduce {seconds * 1e3:.1f} ms, bus bandwidth {busbw:.0f} GB/s", flush=True)
    dist.destroy_process_group()


# -------------------------------------------------------------------------------------------------- SFT


def run_sft(args, name: str, overlays: list[str]) -> dict:
    out = args.work / name
    command = step_command(args, "sft", overlays, [f"results={args.results}", *args.set], out, "sft_s")
    code, seconds = run_logged(command, args.work / f"{name}.log")
    result = {"run": name, "overlays": overlays, "exit": code, "wall_s": round(seconds, 1)}
    if code == 0:
        result.update(sft_summary(out))
        result["reload"] = reload_check(args, overlays, out, result)
    print(json.dumps(result), flush=True)
    return result


def flops_per_token(config: dict) -> tuple[float, float]:
    """Parameters N of the matmuls (decoder layers + LM head; the embedding lookup is no matmul) and 6 N."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * (h // config["num_attention_heads"])
    n = layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + h * config["vocab_size"]
    return n, 6.0 * n


def sft_summary(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    config = json.loads((out / "config.json").read_text())
    rows = read_csv(out / "curves.csv")
    logs = [r for r in rows if r["loss"]]
    evals = [r for r in rows if r["eval_loss"]]
    eval_steps = {int(r["step"]) for r in evals}
    # steady state: intervals between two loss logs with no evaluation inside, the first one (warm-up) left out
    step_s, rates = [], []
    for a, b in zip(logs[1:], logs[2:]):
        s0, s1 = int(a["step"]), int(b["step"])
        if not any(s0 < e <= s1 for e in eval_steps):
            step_s.append((float(b["time"]) - float(a["time"])) / (s1 - s0))
            if b["tokens_per_second"]:
                rates.append(float(b["tokens_per_second"]))
    world = manifest["world_size"]
    n, per_token = flops_per_token(config)
    tokens_s = statistics.median(rates) if rates else None
    return {
        "parameters": manifest["parameters"], "matmul_parameters": n, "world_size": world,
        "global_step": manifest["global_step"], "train_runtime_s": manifest["train"].get("train_runtime"),
        "peak_gpu_memory_gib": manifest.get("peak_gpu_memory_gib"),
        "step_s_median": statistics.median(step_s) if step_s else None,
        "tokens_per_s_median": tokens_s,
        "mfu": tokens_s * per_token / (world * PEAK_TFLOPS * 1e12) if tokens_s else None,
        "loss": [(int(r["step"]), float(r["loss"])) for r in logs],
        "eval_loss": [(int(r["step"]), float(r["eval_loss"])) for r in evals],
    }


def reload_check(args, overlays: list[str], out: Path, summary: dict) -> dict:
    """Load the published weights (whole tensors) on one device and recompute the last evaluation."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Emu3ForCausalLM

    from earl import artifacts, layout as layout_mod
    from earl.cli_util import read_config
    from earl.sft import stage_data
    from earl.text_tokenizer import load_text_tokenizer

    started = time.time()
    config = read_config(configs(args, overlays), [f"results={args.results}", *args.set])
    paths = artifacts.Paths(config)
    tokenizer = load_text_tokenizer(paths.text_tokenizer())
    layout = layout_mod.Layout(tokenizer, artifacts.read_manifest(paths.vq())["codebook_size"])
    _, validation, _ = stage_data(config, config.experiments["sft_s"].sft[0], layout)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    model, info = Emu3ForCausalLM.from_pretrained(str(out), dtype="auto", device_map=device, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    batch, losses = config.sft.per_device_train_batch_size, []
    with torch.no_grad():
        for start in range(0, len(validation), batch):
            rows = [validation[i] for i in range(start, min(start + batch, len(validation)))]
            inputs = {k: v.to(device) for k, v in collate(rows).items()}
            losses += [model(**inputs).loss.item()] * len(rows)
    loss = sum(losses) / len(losses)
    trainer = summary["eval_loss"][-1][1]
    return {"dtype": str(model.dtype), "validation_rows": len(validation), "eval_loss_reloaded": loss,
            "eval_loss_trainer": trainer, "relative_difference": abs(loss - trainer) / abs(trainer),
            "seconds": round(time.time() - started, 1)}


# --------------------------------------------------------------------------------------------------- RL


def run_rl(args) -> dict:
    from earl.cli_util import read_config

    experiment = "sft_s__rl_sc"
    sets = [f"results={args.results}", *args.set]
    spec = read_config(configs(args, ["rl.yaml"]), sets).rl
    ranks = spec.num_processes
    kill_after = spec.save_every * (spec.num_iterations // spec.save_every // 2) - 1  # a checkpoint half-way
    runs = {}

    def one(name: str, extra: list[str], kill: int | None = None) -> dict:
        out = args.work / name
        command = step_command(args, "rl", ["rl.yaml"], sets + extra, out, experiment)
        record = {"run": name}
        if kill is not None:
            ready = out.with_name(out.name + ".partial") / "checkpoints" / f"iter_{kill:06d}" / "state.json"
            code, seconds = run_logged(command, args.work / f"{name}.log", kill_when=ready)
            record.update(killed_after_s=round(seconds, 1), killed_exit=code,
                          logged_before_kill=len(read_csv(out.with_name(out.name + ".partial") / "metrics.csv")))
        code, seconds = run_logged(command, args.work / f"{name}.log")
        record.update(exit=code, wall_s=round(seconds, 1))
        if code == 0:
            manifest = json.loads((out / "manifest.json").read_text())
            rows = read_csv(out / "metrics.csv")
            steady = rows[2:] or rows  # the first two iterations warm up
            record.update(world_size=manifest["world_size"], peak_gpu_memory_gib=manifest.get("peak_gpu_memory_gib"),
                          iterations=len(rows), step_s_median=statistics.median(float(r["step_time"]) for r in steady),
                          rollout_tokens_per_s_median=statistics.median(float(r["rollout_tokens_per_second"]) for r in steady),
                          heldout=manifest["heldout"]["improvement"]["all"], metrics=rows)
        print(json.dumps({k: v for k, v in record.items() if k != "metrics"}), flush=True)
        return record

    plan = {"n": (f"rl_{ranks}", [], None), "n_resumed": (f"rl_{ranks}_killed", [], kill_after),
            "one": ("rl_1", ["rl.num_processes=1", "rl.gpus=1"], None)}
    runs = {name: one(*plan[name]) for name in args.rl_runs}
    for name, record in (args.previous or {}).get("rl", {}).get("runs", {}).items():
        runs.setdefault(name, {**record, "from_previous_call": True})  # e.g. 1-GPU runs made on another machine
    result = {"ranks": ranks, "kill_after_iteration": kill_after, "runs": runs}
    done = {name for name, r in runs.items() if r.get("exit") == 0}
    if {"n", "n_resumed"} <= done:
        result["resumed_vs_uninterrupted"] = compare(runs["n"]["metrics"], runs["n_resumed"]["metrics"])
    if {"n", "one"} <= done:
        result["one_vs_n_ranks"] = compare(runs["one"]["metrics"], runs["n"]["metrics"])
        one_s, n_s = runs["one"]["step_s_median"], runs["n"]["step_s_median"]
        result["speedup"] = one_s / n_s
        result["scaling_efficiency"] = one_s / (ranks * n_s)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}), flush=True)
    return result


def compare(a: list[dict], b: list[dict]) -> dict:
    """Per metric: iterations whose values are equal, and the largest absolute difference."""
    pairs = list(zip(a, b))
    report = {"iterations": len(pairs)}
    for key in RL_KEYS:
        diffs = [abs(float(x[key]) - float(y[key])) for x, y in pairs]
        report[key] = {"equal": sum(d == 0 for d in diffs), "max_abs_diff": max(diffs) if diffs else None}
    return report


# ------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--allreduce", action="store_true", help=argparse.SUPPRESS)  # a torchrun worker of `check`
    parser.add_argument("--config", type=Path, default=REPO / "config" / "config.yaml", help="the pipeline config of --results")
    parser.add_argument("--results", type=Path, help="results root of a pipeline run (its inputs)")
    parser.add_argument("--work", type=Path, help="where the runs write (the 8B checkpoint needs ~17 GB)")
    parser.add_argument("--out", type=Path, help="summary.json and runs.tar.gz")
    parser.add_argument("--parts", nargs="+", default=["check", "sft", "sft_small", "rl"],
                        choices=["check", "sft", "sft_small", "rl"])
    parser.add_argument("--rl-runs", nargs="+", default=["n", "n_resumed", "one"], choices=["n", "n_resumed", "one"],
                        help="rl part: on rl.num_processes ranks, the same killed and resumed, on one rank")
    parser.add_argument("--previous", type=lambda p: json.loads(Path(p).read_text()), metavar="SUMMARY",
                        help="summary.json of an earlier call: its rl runs join the comparisons (e.g. 1 GPU elsewhere)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    args = parser.parse_args()
    if args.allreduce:
        allreduce()
        return
    if None in (args.results, args.work, args.out):
        parser.error("--results, --work and --out are required")
    for name, value in (("NCCL_NVLS_ENABLE", "0"), ("NVSHMEM_DISABLE_NVLS", "1"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")):
        os.environ.setdefault(name, value)  # no NVLink multicast on shared GPU hosts
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "steps"), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(REPO / "steps"))
    args.results, args.work = args.results.resolve(), args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "set": args.set}
    jobs = {"check": lambda: check(args), "sft": lambda: run_sft(args, "sft_8b", ["sft_emu3_8b.yaml"]),
            "sft_small": lambda: run_sft(args, "sft_small", ["sft_emu3_8b.yaml", "sft_small_1gpu.yaml"]),
            "rl": lambda: run_rl(args)}
    for part in args.parts:
        started = time.time()
        try:
            summary[part] = jobs[part]()
        except Exception as error:  # record it and go on with the next part
            summary[part] = {"error": f"{type(error).__name__}: {error}"}
            print(f"{part}: {summary[part]['error']}", flush=True)
        summary[part + "_s"] = round(time.time() - started, 1)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
        with tarfile.open(args.out / "runs.tar.gz", "w:gz") as tar:  # after every part: a later one may not end
            for path in sorted(args.work.rglob("*")):
                if path.is_file() and path.suffix in (".log", ".csv", ".json") and path.stat().st_size < 20e6:
                    tar.add(path, arcname=str(path.relative_to(args.work)))
    print(table(summary))


def table(summary: dict) -> str:
    lines = ["| run | ranks | step s | tokens/s | MFU | peak GiB per rank | wall s |", "|---|---:|---:|---:|---:|---|---:|"]
    for part in ("sft", "sft_small"):
        r = summary.get(part, {})
        if r.get("global_step"):
            lines.append(f"| {r['run']} | {r['world_size']} | {r['step_s_median']:.3f} | {r['tokens_per_s_median'] or 0:,.0f} | "
                         f"{(r['mfu'] or 0) * 100:.1f} % | {r['peak_gpu_memory_gib']} | {r['wall_s']} |")
    for r in summary.get("rl", {}).get("runs", {}).values():
        if r.get("step_s_median") is not None:
            lines.append(f"| {r['run']} | {r['world_size']} | {r['step_s_median']:.3f} | {r['rollout_tokens_per_s_median']:,.0f} rollout | "
                         f"| {r['peak_gpu_memory_gib']} | {r['wall_s']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
