"""The ``data`` step: generate a ``shapes`` dataset's splits as Hugging Face parquet.

    python -m earl.data --config config/config.yaml --dataset shapes_s --out results/data/<name>-<hash>

Rows have the columns of the real editing datasets (source image, instruction, target image, CoT text, edit
type) plus the exact scene descriptions a verifier checks edits against (:mod:`earl.shapes`). Output is a pure
function of the dataset's ``source`` config: same seed, byte-identical files.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import datasets

from earl import artifacts, shapes
from earl.cli_util import run_step
from earl.config import Config
from earl.sources import DataError

FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "source_image": datasets.Image(),
        "instruction": datasets.Value("string"),
        "target_image": datasets.Image(),
        "edit_type": datasets.Value("string"),
        "family": datasets.Value("string"),
        "source_scene": datasets.Value("string"),
        "target_scene": datasets.Value("string"),
        "edit_spec": datasets.Value("string"),
        "cot": datasets.Value("string"),
    }
)


def split_seed(seed: int, split: str) -> int:
    """Independent, reproducible seed per split, so adding a split never changes the others."""
    return int(artifacts.stable_hash(seed, split), 16) % 2**31


def build(config: Config, out: Path, dataset: str) -> None:
    if dataset not in config.datasets or config.datasets[dataset].source.kind != "shapes":
        raise DataError(f"--dataset {dataset!r} is not a 'shapes' dataset of this config")
    source = config.datasets[dataset].source
    with artifacts.artifact_dir(out) as work:
        counts = {}
        for split, n in source.splits.items():
            rows = shapes.generate(source, source.family, n, split_seed(source.seed, split))
            with artifacts.atomic_file(work / f"{split}.parquet") as tmp:
                datasets.Dataset.from_list(rows, features=FEATURES).to_parquet(str(tmp))
            counts[split] = dict(sorted(Counter(row["edit_type"] for row in rows).items()))
        artifacts.write_manifest(work, step="data", config=source, inputs=[], dataset=dataset, edit_types=counts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m earl.data", description=__doc__)
    parser.add_argument("--dataset", required=True, help="dataset name in config.datasets")
    run_step(parser, build, argv, dataset=None)


if __name__ == "__main__":
    main()
