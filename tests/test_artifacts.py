"""Versioned paths and atomic publishing."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from earl import artifacts
from earl.config import from_dict

DEFAULT = yaml.safe_load(open("config/config.yaml"))


def paths_of(data) -> artifacts.Paths:
    return artifacts.Paths(from_dict(data))


def all_paths(p: artifacts.Paths) -> dict[str, str]:
    names = p.config.datasets
    return {
        **{f"data/{n}": str(p.data(n)) for n in names},
        **{f"tokenized/{n}": str(p.tokenized(n)) for n in names},
        "vq": str(p.vq()),
        "tokenizer": str(p.text_tokenizer()),
    }


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if before[k] != after[k]}


def test_hash_is_stable_and_order_independent():
    assert artifacts.stable_hash({"a": 1, "b": [1, 2]}) == artifacts.stable_hash({"b": [1, 2], "a": 1})
    assert artifacts.stable_hash({"a": 1}) != artifacts.stable_hash({"a": 2})


def test_tokenize_only_change_moves_only_that_dataset():
    data = copy.deepcopy(DEFAULT)
    before = all_paths(paths_of(data))
    data["datasets"]["shapes_c"]["on_bad_row"] = "skip"
    assert changed(before, all_paths(paths_of(data))) == {"tokenized/shapes_c"}


def test_data_change_propagates_downstream_only():
    data = copy.deepcopy(DEFAULT)
    data["vq"]["datasets"] = data["text_tokenizer"]["datasets"] = ["shapes_s"]
    before = all_paths(paths_of(data))
    data["datasets"]["shapes_c"]["source"]["seed"] = 99
    assert changed(before, all_paths(paths_of(data))) == {"data/shapes_c", "tokenized/shapes_c"}


def test_vq_change_moves_everything_encoded_with_it():
    data = copy.deepcopy(DEFAULT)
    before = all_paths(paths_of(data))
    data["vq"]["steps"] += 1
    assert changed(before, all_paths(paths_of(data))) == {"vq", "tokenizer", "tokenized/shapes_s", "tokenized/shapes_c"}


def test_worker_count_does_not_version_outputs():
    data = copy.deepcopy(DEFAULT)
    before = all_paths(paths_of(data))
    data["tokenize"]["workers"] = 1
    assert changed(before, all_paths(paths_of(data))) == set()


def test_artifact_dir_publishes_only_with_manifest(tmp_path):
    out = tmp_path / "step-0123456789"
    with pytest.raises(RuntimeError, match="without writing manifest.json"):
        with artifacts.artifact_dir(out) as work:
            (work / "part.txt").write_text("half")
    assert not out.exists() and (tmp_path / "step-0123456789.partial" / "part.txt").exists()

    with artifacts.artifact_dir(out) as work:  # the rerun finds its partial work
        assert (work / "part.txt").read_text() == "half"
        artifacts.write_manifest(work, step="demo", config={"x": 1}, inputs=[], rows=3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["step"] == "demo" and manifest["rows"] == 3
    assert manifest["config_hash"] == artifacts.stable_hash({"x": 1})
    assert {"torch", "transformers", "datasets"} <= set(manifest["versions"])
    assert not (tmp_path / "step-0123456789.partial").exists()


def test_crash_inside_step_leaves_nothing_that_looks_complete(tmp_path):
    out = tmp_path / "step-0123456789"
    with pytest.raises(KeyboardInterrupt):
        with artifacts.artifact_dir(out) as work:
            artifacts.write_manifest(work, step="demo", config={}, inputs=[])
            raise KeyboardInterrupt
    assert not out.exists()


def test_atomic_file_leaves_no_partial_file(tmp_path):
    target = tmp_path / "shard.parquet"
    with pytest.raises(ValueError):
        with artifacts.atomic_file(target) as tmp:
            tmp.write_bytes(b"half")
            raise ValueError
    assert list(tmp_path.iterdir()) == []
