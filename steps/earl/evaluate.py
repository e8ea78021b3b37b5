"""The ``evaluate`` step: one experiment's final model on one benchmark of the registry (spec §D).

    python -m earl.evaluate --config config/config.yaml --experiment sft_s__rl_sc --benchmark shapes_s \\
        --out results/evaluate/<benchmark>-<hash>

One evaluator for every benchmark (the original had six copy-pasted scripts, spec §F.13): the registry entry
says which tokenized rows, how they are sampled and how they are labelled; everything else is shared.

    rows     ← the benchmark's parts, concatenated; shuffle(sample_seed).select(range(sample)) when sampled
    edits    ← samples_per_prompt edits per row from the rollout engine (evaluate.engine), prompt prefilled with the
               header (``<|image start|>H*W``, §D.3), T and top-k as configured, grid constraint on; sequence
               (row k, sample j) is seeded by ``seed + k·samples_per_prompt + j``, so results do not depend on
               batching, and two models see the same random numbers (a paired comparison)
    scores   ← the judge (verifier or VIEScore through its answer cache); a malformed edit scores 0 without
               asking; a judge failure is counted and excluded, never guessed
    metrics  ← mean SC, PQ and overall = sqrt(SC·PQ) with 95 % bootstrap intervals, overall and per task

Work goes in chunks; each chunk's PNGs and rows are written before its parquet file appears, so a killed job
resumes at the first missing chunk. Outputs: ``samples.parquet`` (one row per edit), ``metrics.json``,
``images/`` (edits), ``sources/`` and ``targets/`` (what the judge and the report show), ``manifest.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from earl import artifacts, heldout, layout as layout_mod, vq as vq_codec
from earl.cli_util import run_step
from earl.config import Config, ConfigError
from earl.engine import SamplingParams, check_engine, make_engine
from earl.judge import AnswerCache, check_judge, make_judge, served
from earl.models import load_vq
from earl.sft import load_tokenized
from earl.stats import mean_ci
from earl.text_tokenizer import load_text_tokenizer

SUBSCORES = ("edit_success", "overedit", "looks_natural", "no_artifact")


def benchmark_rows(config: Config, benchmark: str) -> datasets.Dataset:
    """The benchmark's tokenized rows in registry order, with ``task`` and ``part`` columns, sampled as the paper."""
    spec = config.benchmarks[benchmark]
    parts = []
    for index, part in enumerate(spec.parts):
        rows = load_tokenized(config, part.dataset, part.split)
        tasks = rows[spec.task_column] if spec.task_column else [part.task or "all"] * len(rows)
        rows = rows.remove_columns([c for c in ("task", "part") if c in rows.column_names])  # a kept `task` is replaced
        parts.append(rows.add_column("task", [str(t) for t in tasks]).add_column("part", [index] * len(rows)))
    common = sorted(set.intersection(*(set(p.column_names) for p in parts)))  # parts may keep different columns
    rows = datasets.concatenate_datasets([p.select_columns(common) for p in parts])
    if spec.sample is not None and spec.sample < len(rows):  # as the original: shuffle(seed=42).select(range(1000))
        rows = rows.shuffle(seed=spec.sample_seed).select(range(spec.sample))
    return rows


def unique_ids(ids: list[str]) -> list[str]:
    """Row ids made unique (``id#2``, ...) so per-sample results join one-to-one across models."""
    seen = Counter()
    out = []
    for row_id in ids:
        seen[row_id] += 1
        out.append(row_id if seen[row_id] == 1 else f"{row_id}#{seen[row_id]}")
    return out


def evaluate_chunk(config: Config, benchmark: str, rows: list[dict], first: int, engine, layout, vq, judges: dict, work: Path) -> pd.DataFrame:
    """Edit, decode, save and score the rows ``first .. first+len(rows)``; returns their per-sample results."""
    spec = config.evaluate
    n = spec.samples_per_prompt
    repeated = [row for row in rows for _ in range(n)]
    seeds = [spec.seed + (first + k) * n + j for k in range(len(rows)) for j in range(n)]
    params = SamplingParams(max_tokens=spec.max_tokens, temperature=spec.temperature, top_k=spec.top_k, seed=spec.seed,
                            top_p=spec.top_p)
    images = heldout.edit_rows(engine, layout, vq, repeated, spec.assistant_prefill, params, seeds)
    scores = [None] * len(repeated)
    by_part = defaultdict(list)
    for i, row in enumerate(repeated):
        by_part[row["part"]].append(i)
    for part, members in by_part.items():
        for i, score in zip(members, heldout.judge_rows(judges[part], vq, [repeated[i] for i in members], [images[i] for i in members])):
            scores[i] = score
    samples = heldout.score_rows([{**row, "edit_type": row["task"]} for row in repeated], images, scores)
    sources = heldout.decode_all(vq, [np.asarray(r["source_codes"]) for r in rows])
    targets = heldout.decode_all(vq, [np.asarray(r["target_codes"]) if r["target_codes"] is not None else None for r in rows])
    files = {}  # path → image, written below as a batch (PNG encoding in spec.threads threads)
    records = []
    for i, (row, image, sample) in enumerate(zip(repeated, images, samples)):
        k, j = first + i // n, i % n
        name = f"{k:05d}"
        if j == 0:
            files[work / "sources" / f"{name}.png"] = sources[i // n]
            if targets[i // n] is not None:
                files[work / "targets" / f"{name}.png"] = targets[i // n]
        if image is not None:
            files[work / "images" / f"{name}-{j}.png"] = image
        record = asdict(sample)
        record.pop("edit_type")
        records.append({
            **record, "row": k, "sample": j, "task": row["task"], "instruction": row["instruction"],
            "image": f"images/{name}-{j}.png" if image is not None else None,
            "source_image": f"sources/{name}.png",
            "target_image": f"targets/{name}.png" if targets[i // n] is not None else None,
        })
    vq_codec.write_pngs(files, spec.threads)
    return pd.DataFrame.from_records(records)


def metrics(frame: pd.DataFrame, resamples: int, seed: int) -> dict:
    """Means with 95 % bootstrap intervals over the judged samples; failures counted and excluded."""

    def block(group: pd.DataFrame) -> dict:
        judged = group[~group["failed"]]
        out = {
            "n": int(len(group)),
            "judge_failures": int(group["failed"].sum()),
            "well_formed": float(group["well_formed"].mean()) if len(group) else math.nan,
        }
        for key in ("overall", "sc", "pq", *SUBSCORES):
            values = judged[key].dropna()
            if key in ("overall", "sc", "pq") or len(values):
                out[key] = mean_ci(values.to_numpy(), resamples, seed)
        return out

    return {**block(frame), "by_task": {task: block(group) for task, group in sorted(frame.groupby("task"))}}


def build(config: Config, out: Path, experiment: str, benchmark: str) -> None:
    check(config, out, experiment, benchmark)
    spec, paths = config.evaluate, artifacts.Paths(config)
    torch.set_num_threads(spec.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = paths.model(experiment)
    layout = layout_mod.Layout(load_text_tokenizer(paths.text_tokenizer()), artifacts.read_manifest(paths.vq())["codebook_size"])
    vq = load_vq(paths.vq()).to(device)
    bench = config.benchmarks[benchmark]
    cache = AnswerCache(Path(config.results) / "cache" / "judge")
    rows = benchmark_rows(config, benchmark)
    engine = make_engine(spec.engine, layout, model_dir, spec.batch_size, spec.vllm_gpu_memory_utilization, device=device)
    per_chunk = max(1, spec.batch_size // spec.samples_per_prompt)
    with artifacts.artifact_dir(out) as work, served(spec.judge, work / "judge_server.log", "evaluate.judge"):
        judges = {i: make_judge(spec.judge, config.datasets[p.dataset].source, "evaluate.judge", cache) for i, p in enumerate(bench.parts)}
        for sub in ("images", "sources", "targets", "chunks"):
            (work / sub).mkdir(exist_ok=True)
        starts = range(0, len(rows), per_chunk)
        for first in tqdm(starts, desc=f"evaluate {experiment} on {benchmark}", unit="chunk"):
            chunk = work / "chunks" / f"{first:07d}.parquet"
            if chunk.exists():  # resume: finished chunks are kept
                continue
            part = [rows[i] for i in range(first, min(first + per_chunk, len(rows)))]
            frame = evaluate_chunk(config, benchmark, part, first, engine, layout, vq, judges, work)
            with artifacts.atomic_file(chunk) as tmp:
                frame.to_parquet(tmp, index=False)
        frame = pd.concat([pd.read_parquet(work / "chunks" / f"{first:07d}.parquet") for first in starts], ignore_index=True)
        ids = unique_ids([str(i) for i in rows["id"]])
        frame["id"] = [ids[k] for k in frame["row"]]
        with artifacts.atomic_file(work / "samples.parquet") as tmp:
            frame.to_parquet(tmp, index=False)
        result = {
            "benchmark": benchmark, "family": bench.family, "paper_column": bench.paper_column, "model": str(model_dir),
            "experiment": experiment, "rows": len(rows), **metrics(frame, spec.bootstrap_resamples, spec.seed),
        }
        artifacts.write_text_atomic(work / "metrics.json", json.dumps(result, indent=2, sort_keys=True) + "\n")
        judge_requests = sum(getattr(j, "requests", 0) for j in judges.values())
        inputs = [model_dir, paths.vq(), paths.text_tokenizer(), *sorted({paths.tokenized(p.dataset) for p in bench.parts})]
        artifacts.write_manifest(
            work, step="evaluate", config={"evaluate": spec, "benchmark": bench}, inputs=inputs, experiment=experiment,
            benchmark=benchmark, rows=len(rows), overall=result["overall"], judge_failures=result["judge_failures"],
            judge_requests=judge_requests, judge_cache_hits=cache.hits,
        )


def check(config: Config, out: Path, experiment: str, benchmark: str) -> None:
    """One-line errors for a wrong name, an engine this environment cannot run, a judge without an endpoint or a
    missing input."""
    if experiment not in config.experiments:
        raise ConfigError(f"--experiment {experiment!r} is not in config.experiments ({sorted(config.experiments)})")
    if benchmark not in config.benchmarks_of(experiment):
        raise ConfigError(f"--benchmark {benchmark!r} is not a benchmark of experiment {experiment!r} ({config.benchmarks_of(experiment)})")
    check_engine(config.evaluate.engine, config.evaluate.top_p, "evaluate")
    check_judge(config.evaluate.judge, [config.datasets[p.dataset].source for p in config.benchmarks[benchmark].parts], "evaluate.judge")
    paths = artifacts.Paths(config)
    needed = [paths.model(experiment), paths.vq(), paths.text_tokenizer(), *(paths.tokenized(p.dataset) for p in config.benchmarks[benchmark].parts)]
    for directory in needed:
        artifacts.read_manifest(directory)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m earl.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="experiment name in config.experiments")
    parser.add_argument("--benchmark", required=True, help="benchmark name in config.benchmarks")
    try:
        run_step(parser, build, argv, experiment=None, benchmark=None)
    except FileNotFoundError as error:  # an input without its manifest: not built, or not finished
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
