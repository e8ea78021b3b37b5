"""Config validation: one-line errors naming the key, both shipped configs valid, schema file in sync."""

from __future__ import annotations

import copy

import pytest
import yaml

from earl import config as cfg
from earl.cli_util import read_config

DEFAULT = yaml.safe_load(open("config/config.yaml"))


def error_of(data) -> str:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.from_dict(data)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("path", ["config/config.yaml", "config/paper.yaml"])
def test_shipped_configs_are_valid(path):
    cfg.load(path)


def test_generated_schema_file_is_in_sync():
    assert yaml.safe_load(open(cfg.SCHEMA_PATH)) == cfg.json_schema(), "run: python -m earl.config schema > workflow/schemas/config.schema.yaml"


def test_unknown_key_is_named():
    data = copy.deepcopy(DEFAULT)
    data["datasets"]["shapes_s"]["source"]["colours"] = ["red"]
    assert "datasets.shapes_s.source.shapes.colours: unknown key" in error_of(data)


def test_wrong_type_is_named_with_value():
    data = copy.deepcopy(DEFAULT)
    data["tokenize"]["shards"] = "many"
    message = error_of(data)
    assert "tokenize.shards" in message and "'many'" in message


def test_missing_required_key_is_named():
    data = copy.deepcopy(DEFAULT)
    del data["vq"]["steps"]
    assert "config error at vq.train.steps: Field required" in error_of(data)


def test_unknown_dataset_reference_is_named():
    data = copy.deepcopy(DEFAULT)
    data["experiments"]["sft_s"]["sft"][0]["datasets"] = {"nope": 1.0}
    assert "experiments.sft_s names unknown dataset 'nope'" in error_of(data)


def test_dataset_names_cannot_break_paths():
    data = copy.deepcopy(DEFAULT)
    data["datasets"]["bad-name"] = data["datasets"].pop("shapes_c")
    assert "datasets.bad-name" in error_of(data)


def test_later_config_files_and_overrides_win(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("tokenize: {shards: 7}\n")
    merged = read_config(["config/config.yaml", str(overlay)], ["results=elsewhere"])
    assert merged.tokenize.shards == 7 and merged.tokenize.workers == 2 and merged.results == "elsewhere"


def test_early_stopping_needs_checkpoints():
    data = copy.deepcopy(DEFAULT)
    data["sft"]["save_steps"] = None
    assert cfg.from_dict(data).sft.save_steps is None  # no checkpoints: allowed without early stopping
    data["sft"]["early_stopping_patience"] = 3
    assert "early_stopping_patience needs save_steps" in error_of(data)


def test_vq_sharpening_needs_merged_codes():
    data = copy.deepcopy(DEFAULT)
    data["vq"]["merge_synonyms"] = False
    assert "vq.train: Value error, sharpen needs merge_synonyms: true" in error_of(data)
    del data["vq"]["sharpen"]
    assert cfg.from_dict(data).vq.sharpen is None  # neither: allowed


def test_multigpu_benchmark_overlays_are_valid():
    overlays = ["benchmarks/multigpu/sft_emu3_8b.yaml", "benchmarks/multigpu/sft_small_1gpu.yaml"]
    big = read_config(["config/config.yaml", overlays[0]], [])
    small = read_config(["config/config.yaml", *overlays], [])
    assert big.sft.architecture["num_hidden_layers"] == 32 and small.sft.architecture["num_hidden_layers"] == 8
    assert big.sft.architecture["vocab_size"] == small.sft.architecture["vocab_size"] == 184622
    assert big.sft.per_device_train_batch_size * big.sft.num_processes == (
        small.sft.per_device_train_batch_size * small.sft.num_processes * small.sft.gradient_accumulation_steps)
    assert read_config(["config/config.yaml", "benchmarks/multigpu/rl.yaml"], []).rl.num_processes == 2
