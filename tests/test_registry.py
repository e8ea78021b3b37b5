"""The paper's benchmark registry (config/paper.yaml) loads each benchmark from small local parquet files with the
real dataset's schema and file layout: column mapping, instruction lists and prefixes, missing targets, task labels
and the paper's sampling rule. The paper's loading path runs unchanged; only ``source.path`` points at a local
copy, the VQ is the tiny pipeline's (read through the ``pretrained`` branch) and images are small."""

from __future__ import annotations

import io
import json

import datasets
import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import REPO
from earl import artifacts, tokenize, vq as vq_step
from earl.config import from_dict
from earl.evaluate import benchmark_rows

ROWS = 12


def png(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


IMAGE = datasets.Image()
TEXT = datasets.Value("string")
# Each benchmark's real columns (spec §D.1) and the file its loader reads, relative to the dataset root.
FIXTURES = {
    "omniedit_dev": ("data/dev-00000-of-00001.parquet", {
        "omni_edit_id": (TEXT, lambda i: f"omni-{i}"), "task": (TEXT, lambda i: ["swap", "removal", "style"][i % 3]),
        "src_img": (IMAGE, png), "edited_img": (IMAGE, lambda i: png(1000 + i)),
        "edited_prompt_list": (datasets.Sequence(TEXT), lambda i: [f"make it {i}", f"alternative {i}"]),
    }),
    "emuedit_test": ("data/test-00000-of-00001.parquet", {
        "image": (IMAGE, png), "instruction": (TEXT, lambda i: f"add a hat {i}"),
        "task": (TEXT, lambda i: ["add", "color", "text"][i % 3]), "idx": (datasets.Value("int64"), lambda i: 100 + i),
        "input_caption": (TEXT, lambda i: "a photo"), "output_caption": (TEXT, lambda i: "a photo with a hat"),
    }),
    "aurora_bench": ("data/test-00000-of-00001.parquet", {
        "input": (IMAGE, png), "instruction": (TEXT, lambda i: f"move the cup {i}"),
        "source": (TEXT, lambda i: ["kubric", "action-genome", "something"][i % 3]),
    }),
    "magicbrush_test": ("benchmarks/magicbrush-test-00000.parquet", {
        "input": (IMAGE, png), "mask": (IMAGE, lambda i: png(2000 + i)), "output": (IMAGE, lambda i: png(3000 + i)),
        "instruction": (TEXT, lambda i: f"let the dog wear glasses {i}"),
    }),
    "vismin_counting": ("data/train/counting-00001.parquet", {
        "source_image": (IMAGE, png), "edited_image": (IMAGE, lambda i: png(4000 + i)),
        "edit_instruction": (TEXT, lambda i: f"edit_instruction: add one more apple {i}"), "id": (TEXT, lambda i: f"c{i}"),
    }),
    "vismin_relation": ("data/train/relation-00001.parquet", {
        "source_image": (IMAGE, png), "edited_image": (IMAGE, lambda i: png(5000 + i)),
        "edit_instruction": (TEXT, lambda i: f"edit_instruction: put the cat left of the box {i}"), "id": (TEXT, lambda i: f"r{i}"),
    }),
    "i2ebench": ("benchmarks/i2ebench-dataset.parquet", {
        "image": (IMAGE, png), "instruction": (TEXT, lambda i: f"remove the rain {i}"),
        "task": (TEXT, lambda i: ["rain", "counting", "haze"][i % 3]),
    }),
}


@pytest.fixture(scope="module")
def paper_benchmarks(tiny_pipeline, tmp_path_factory):
    """config/paper.yaml's benchmarks, each read from a local copy and tokenized by the tokenize step."""
    root, _, _, tiny_paths = tiny_pipeline
    here = tmp_path_factory.mktemp("registry")
    paper = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    used = {part["dataset"] for bench in paper["benchmarks"].values() for part in bench["parts"]}
    assert used == set(FIXTURES)  # every registry dataset has a fixture, and no fixture is stale
    for name, (relative, columns) in FIXTURES.items():
        path = here / name / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        features = datasets.Features({c: f for c, (f, _) in columns.items()})
        table = {c: [make(i) for i in range(ROWS)] for c, (_, make) in columns.items()}
        datasets.Dataset.from_dict(table, features=features).to_parquet(str(path))
        paper["datasets"][name]["source"]["path"] = str(here / name)
        paper["datasets"][name]["image_area"] = 1024  # 32x32 px -> 4x4 codes: small, same code path
    paper["datasets"] = {n: d for n, d in paper["datasets"].items() if n in used}
    paper.update(results=str(here / "results"), experiments={})
    paper["vq"] = {"kind": "pretrained", "path": str(tiny_paths.vq())}
    paper["tokenize"].update(shards=2, workers=1, device="cpu", batch_size=8)
    config = from_dict(paper)
    paths = artifacts.Paths(config)
    vq_step.build(config, paths.vq())
    for name in used:
        tokenize.build(config, paths.tokenized(name), name)
    return config


def test_every_paper_benchmark_loads_from_its_real_schema(paper_benchmarks):
    config = paper_benchmarks
    expected_rows = {"vismin": 2 * ROWS}
    width, height = vq_step.resize_to_area(Image.new("RGB", (56, 40)), 1024).size
    for name, bench in config.benchmarks.items():
        rows = benchmark_rows(config, name)
        assert len(rows) == expected_rows.get(name, min(ROWS, bench.sample or ROWS)), name
        grids = {np.asarray(g).shape for g in rows["source_codes"]}
        assert grids == {(height // 8, width // 8)}, name
        has_target = config.datasets[bench.parts[0].dataset].columns.target_image is not None
        assert all((t is not None) == has_target for t in rows["target_codes"]), name
        assert all(i and not i.startswith("edit_instruction:") for i in rows["instruction"]), name
    omni = benchmark_rows(config, "omniedit")
    assert omni["instruction"][:2] == ["make it 0", "make it 1"]  # element 0 of edited_prompt_list
    assert omni["task"][:3] == ["swap", "removal", "style"] and omni["id"][0] == "omni-0"
    vismin = benchmark_rows(config, "vismin")
    assert vismin["task"] == ["counting"] * ROWS + ["relation"] * ROWS
    assert vismin["instruction"][0] == "add one more apple 0"
    assert set(benchmark_rows(config, "aurora")["task"]) == {"kubric", "action-genome", "something"}
    assert set(benchmark_rows(config, "magicbrush")["task"]) == {"all"}
    manifest = artifacts.read_manifest(artifacts.Paths(config).tokenized("emuedit_test"))
    assert manifest["splits"]["test"]["rows"] == ROWS and json.dumps(manifest)


def test_sampled_benchmarks_take_the_papers_subset(paper_benchmarks):
    """EmuEdit and I2EBench: ``shuffle(seed=42).select(range(n))`` of the rows, as the original scripts did."""
    data = paper_benchmarks.model_dump(mode="json")
    data["benchmarks"]["emuedit"]["sample"] = 5
    config = from_dict(data)
    ids = [str(100 + i) for i in range(ROWS)]
    order = datasets.Dataset.from_dict({"id": ids}).shuffle(seed=42).select(range(5))["id"]
    assert benchmark_rows(config, "emuedit")["id"] == order
    assert order != ids[:5]
