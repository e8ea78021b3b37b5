"""The ``tokenize`` step: (source, instruction, target[, CoT]) rows → VQ code grids in parquet shards.

    python -m earl.tokenize --config config/config.yaml --dataset shapes_s --out results/tokenized/<name>-<hash>

Per split, rows are cut into ``tokenize.shards`` contiguous index ranges (spec §F.6: the original ran four
processes over the *whole* dataset racing on one JSON list). Each shard is written once, atomically, as
``<split>-<i>-of-<n>.parquet``; ``tokenize.workers`` processes share the shards, so the output never depends on
the number of workers, and a rerun after a crash skips the shards already written. Images are resized to the
configured area keeping the aspect ratio (spec §A.3), encoded with the VQ, and CoT boxes are rescaled (§A.4).
Text is not tokenized here: the layout (with or without CoT, SFT or RL prompt) is applied by the consuming step.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
from collections import Counter
from pathlib import Path

import datasets
import torch
from tqdm import tqdm

from earl import artifacts
from earl.cli_util import run_step
from earl.config import Config
from earl.models import load_vq
from earl.sources import DataError, load_split, open_image
from earl.vq import encode, resize_to_area

BOX = re.compile(r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]")
GRID = datasets.Sequence(datasets.Sequence(datasets.Value("int32")))


def rescale_boxes(text: str, sx: float, sy: float) -> str:
    """Scale every ``[x1, y1, x2, y2]`` in ``text`` to the resized image (spec §A.4), written ``[a, b, c, d]``."""

    def scale(match: re.Match) -> str:
        x1, y1, x2, y2 = (float(v) for v in match.groups())
        return f"[{round(x1 * sx)}, {round(y1 * sy)}, {round(x2 * sx)}, {round(y2 * sy)}]"

    return BOX.sub(scale, text)


def shard_ranges(n_rows: int, n_shards: int) -> list[range]:
    return [range(i * n_rows // n_shards, (i + 1) * n_rows // n_shards) for i in range(n_shards)]


def shard_path(directory: Path, split: str, index: int, n_shards: int) -> Path:
    return directory / f"{split}-{index:05d}-of-{n_shards:05d}.parquet"


def output_features(config: Config, name: str, data: datasets.Dataset) -> datasets.Features:
    columns = config.datasets[name].columns
    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "instruction": datasets.Value("string"),
            "source_codes": GRID,
            "target_codes": GRID,
            "cot": datasets.Value("string"),
            **{key: data.features[key] for key in columns.keep},
        }
    )


def tokenize_rows(config: Config, name: str, split: str, rows: datasets.Dataset, offset: int, vq) -> tuple[dict, list]:
    """Encode a block of rows; returns the output columns and the skipped rows (when ``on_bad_row: skip``)."""
    dataset = config.datasets[name]
    columns, area = dataset.columns, dataset.image_area
    out = {key: [] for key in ("id", "instruction", "source_codes", "target_codes", "cot", *columns.keep)}
    skipped, sources, targets = [], [], []
    for local, row in enumerate(rows):
        index = offset + local
        row_id = str(row[columns.id]) if columns.id else str(index)
        where = f"dataset {name!r} split {split!r} row {index} (id {row_id})"
        try:
            source = open_image(row[columns.source_image], f"{where} column {columns.source_image!r}")
            target = open_image(row[columns.target_image], f"{where} column {columns.target_image!r}") if columns.target_image else None
            instruction = row[columns.instruction]
            if isinstance(instruction, list):  # e.g. OmniEdit's edited_prompt_list: the original used element 0
                instruction = instruction[0] if instruction else ""
            if not isinstance(instruction, str) or not instruction.strip():
                raise DataError(f"{where} column {columns.instruction!r}: instruction is empty")
        except DataError as error:
            if dataset.on_bad_row == "error":
                raise
            skipped.append({"row": index, "id": row_id, "reason": str(error)})
            continue
        resized = resize_to_area(source, area)
        sx, sy = resized.width / source.width, resized.height / source.height
        cot = {key: rescale_boxes(str(row[key]), sx, sy) for key in columns.cot if row[key]}
        sources.append(resized)
        targets.append(resize_to_area(target, area) if target is not None else None)
        out["id"].append(row_id)
        out["instruction"].append(instruction.removeprefix(columns.instruction_prefix).strip())
        out["cot"].append(json.dumps(cot, sort_keys=True))
        for key in columns.keep:
            out[key].append(row[key])
    batch = config.tokenize.batch_size
    out["source_codes"] = [g.tolist() for g in encode(vq, sources, batch)]
    present = [t for t in targets if t is not None]
    encoded = iter(encode(vq, present, batch))
    out["target_codes"] = [next(encoded).tolist() if t is not None else None for t in targets]
    return out, skipped


def tokenize_shard(config: Config, name: str, split: str, index: int, work: Path) -> None:
    """Write one shard (and its stats sidecar) atomically; the parquet file appearing is the commit point."""
    torch.set_num_threads(config.tokenize.threads_per_worker)
    n_shards = config.tokenize.shards
    data = load_split(config, name, split)
    rows = shard_ranges(len(data), n_shards)[index]
    device = config.tokenize.device
    if device == "cuda":  # spread shards over the node's GPUs, one worker process per shard at a time
        device = f"cuda:{index % torch.cuda.device_count()}"
    vq = load_vq(artifacts.Paths(config).vq()).to(device)
    out, skipped = tokenize_rows(config, name, split, data.select(rows), rows.start, vq)
    path = shard_path(work, split, index, n_shards)
    grids = Counter(f"{len(g)}x{len(g[0])}" for g in out["source_codes"])
    sidecar = {"rows": len(out["id"]), "skipped": skipped, "source_grids": grids}
    artifacts.write_text_atomic(path.with_suffix(".json"), json.dumps(sidecar))
    with artifacts.atomic_file(path) as tmp:
        datasets.Dataset.from_dict(out, features=output_features(config, name, data)).to_parquet(str(tmp))


def _run(job: tuple) -> None:
    tokenize_shard(*job)


def build(config: Config, out: Path, dataset: str) -> None:
    if dataset not in config.datasets:
        raise DataError(f"--dataset {dataset!r} is not in config.datasets ({sorted(config.datasets)})")
    spec = config.tokenize
    paths = artifacts.Paths(config)
    inputs = [paths.vq(), *paths.generated([dataset])]
    with artifacts.artifact_dir(out) as work:
        jobs = [
            (config, dataset, split, i, work)
            for split in config.datasets[dataset].splits
            for i in range(spec.shards)
            if not shard_path(work, split, i, spec.shards).exists()  # resume: finished shards are kept
        ]
        if spec.workers == 1 or len(jobs) <= 1:
            for job in tqdm(jobs, desc=f"tokenize {dataset}", unit="shard"):
                _run(job)
        else:
            with multiprocessing.get_context("spawn").Pool(min(spec.workers, len(jobs))) as pool:
                for _ in tqdm(pool.imap_unordered(_run, jobs), total=len(jobs), desc=f"tokenize {dataset}", unit="shard"):
                    pass
        stats, grids = {}, Counter()
        for split in config.datasets[dataset].splits:
            sidecars = [json.loads(shard_path(work, split, i, spec.shards).with_suffix(".json").read_text()) for i in range(spec.shards)]
            skipped = [s for sidecar in sidecars for s in sidecar["skipped"]]
            for sidecar in sidecars:
                grids.update(sidecar["source_grids"])
            stats[split] = {"rows": sum(s["rows"] for s in sidecars), "skipped": len(skipped), "skipped_rows": skipped[:100]}
        artifacts.write_manifest(
            work, step="tokenize", config={"dataset": config.datasets[dataset], "tokenize": spec}, inputs=inputs,
            dataset=dataset, splits=stats, shards=spec.shards, source_grids=dict(sorted(grids.items())),
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m earl.tokenize", description=__doc__)
    parser.add_argument("--dataset", required=True, help="dataset name in config.datasets")
    run_step(parser, build, argv, dataset=None)


if __name__ == "__main__":
    main()
