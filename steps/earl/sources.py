"""Reading a configured dataset split as a Hugging Face ``datasets.Dataset``, whatever its origin.

A ``shapes`` dataset is the parquet the ``data`` rule generated; a ``hub`` dataset is a Hugging Face dataset
id (pinned revision) or a local directory of parquet files, matched like the original ``*{split}*.parquet``
(spec §A.1). Image columns are returned undecoded (``{"bytes", "path"}``) so a corrupt image fails on its
own row with a message that names it, instead of inside a library iterator.
"""

from __future__ import annotations

import io
from pathlib import Path

import datasets
from PIL import Image

from earl.artifacts import Paths
from earl.config import Config


class DataError(ValueError):
    """Bad input data, described in one line naming the dataset, split, file, column or row."""


def split_files(path: Path, split: str, patterns: list[str] | None) -> list[str]:
    """Sorted parquet files of one split in a local directory."""
    globs = [p.format(split=split) for p in patterns] if patterns else [f"**/*{split}*.parquet"]
    files = sorted({str(f) for g in globs for f in Path(path).glob(g)})
    if not files:
        raise DataError(f"no parquet files for split {split!r} under {path} (patterns {globs})")
    return files


def load_split(config: Config, name: str, split: str) -> datasets.Dataset:
    """One split of a configured dataset, with image columns left as undecoded bytes."""
    dataset = config.datasets[name]
    source = dataset.source
    if source.kind == "shapes":
        data = datasets.load_dataset("parquet", data_files=split_files(Paths(config).data(name), split, None), split="train")
    elif Path(source.path).is_dir():
        data = datasets.load_dataset("parquet", data_files=split_files(Path(source.path), split, source.data_files), split="train")
    else:  # a Hugging Face dataset id: the same loader the original used, pinned by revision
        files = {split: [p.format(split=split) for p in source.data_files]} if source.data_files else None
        data = datasets.load_dataset(source.path, revision=source.revision, data_files=files, split=split)
    columns = dataset.columns
    wanted = {
        "columns.source_image": columns.source_image,
        "columns.instruction": columns.instruction,
        "columns.target_image": columns.target_image,
        "columns.id": columns.id,
        **{f"columns.cot[{i}]": key for i, key in enumerate(columns.cot)},
        **{f"columns.keep[{i}]": key for i, key in enumerate(columns.keep)},
    }
    for key, column in wanted.items():
        if column is not None and column not in data.column_names:
            raise DataError(
                f"dataset {name!r} split {split!r}: column {column!r} ({key}) not found; it has {data.column_names}"
            )
    for column in (columns.source_image, columns.target_image):
        if column is not None:
            if not isinstance(data.features[column], datasets.Image):
                raise DataError(f"dataset {name!r}: column {column!r} is {data.features[column]}, not an image")
            data = data.cast_column(column, datasets.Image(decode=False))
    return data


def open_image(cell: dict | None, where: str) -> Image.Image:
    """Decode one undecoded ``datasets.Image`` cell to RGB, or raise a :class:`DataError` naming the row."""
    if not cell or not (cell.get("bytes") or cell.get("path")):
        raise DataError(f"{where}: image is missing")
    try:
        image = Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"])
        image.load()
    except Exception as error:  # PIL raises many types for corrupt data; all mean the same here
        raise DataError(f"{where}: cannot decode image ({type(error).__name__}: {error})") from None
    return image.convert("RGB")
