"""The data → vq → text_tokenizer → tokenize steps through their CLIs, on test-size data."""

from __future__ import annotations

import hashlib
import json
import shutil

import datasets
import numpy as np
import pytest
from PIL import Image

from conftest import step, write_config
from earl import artifacts, tokenize
from earl.config import from_dict
from earl.layout import Layout
from earl.models import load_vq
from earl.text_tokenizer import load_text_tokenizer
from earl.vq import encode, resize_to_area


def digest(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.parquet"))}


@pytest.fixture
def built(tiny_pipeline):
    return tiny_pipeline


def test_tokenized_shards_hold_the_vq_codes_of_the_data(built):
    root, data, config_file, paths = built
    out = root / "tok"
    assert step("tokenize", config_file, out, "--dataset", "shapes_s").returncode == 0
    manifest = artifacts.read_manifest(out)
    assert manifest["splits"]["train"] == {"rows": 24, "skipped": 0, "skipped_rows": []}
    assert sorted(digest(out)) == [f"{s}-{i:05d}-of-00002.parquet" for s in ("test", "train", "validation") for i in (0, 1)]
    shards = datasets.load_dataset("parquet", data_files=sorted(str(p) for p in out.glob("train-*.parquet")), split="train")
    source = datasets.load_dataset("parquet", data_files=str(paths.data("shapes_s") / "train.parquet"), split="train")
    assert shards["id"] == source["id"] and shards["instruction"] == source["instruction"]
    assert shards["edit_type"] == source["edit_type"]
    vq = load_vq(paths.vq())
    world = data["datasets"]["shapes_s"]["source"]
    expected = encode(vq, [resize_to_area(img, data["datasets"]["shapes_s"]["image_area"]) for img in source["target_image"][:5]])
    for row, grid in zip(shards.select(range(5)), expected):
        np.testing.assert_array_equal(np.array(row["target_codes"]), grid)
        assert np.array(row["source_codes"]).shape == (world["rows"], world["cols"])
    # the shards feed the layout directly: an SFT example builds from a row
    layout = Layout(load_text_tokenizer(paths.text_tokenizer()), vq.config.codebook_size)
    ids, labels = layout.sft_example(np.array(shards[0]["source_codes"]), shards[0]["instruction"], np.array(shards[0]["target_codes"]))
    block = 1 + 3 + 1 + world["rows"] * (world["cols"] + 1) + 2  # BOI "H*W" IMG rows EOF EOI
    assert len(ids) == len(labels) > 2 * block
    # the configured instruction length is saved with the tokenizer, and every instruction is filled to it
    n = data["text_tokenizer"]["instruction_tokens"]
    assert layout.instruction_tokens == n
    assert ids[1 + block + n] == layout.ids.boi and ids[1 + block + n - len(layout.text(shards[0]["instruction"])) - 1] == layout.ids.fill


def test_output_does_not_depend_on_workers_and_is_deterministic(built):
    root, data, config_file, _ = built
    one, two, again = root / "w1", root / "w2", root / "w1again"
    assert step("tokenize", config_file, one, "--dataset", "shapes_c", "--set", "tokenize.workers=1").returncode == 0
    assert step("tokenize", config_file, two, "--dataset", "shapes_c", "--set", "tokenize.workers=2").returncode == 0
    assert step("tokenize", config_file, again, "--dataset", "shapes_c", "--set", "tokenize.workers=1").returncode == 0
    assert digest(one) == digest(two) == digest(again)


def test_shard_count_changes_files_not_rows(built):
    root, data, config_file, _ = built
    for shards in (1, 3):
        assert step("tokenize", config_file, root / f"s{shards}", "--dataset", "shapes_s", "--set", f"tokenize.shards={shards}").returncode == 0
    rows = [
        datasets.load_dataset("parquet", data_files=sorted(str(p) for p in (root / f"s{n}").glob("train-*.parquet")), split="train").to_list()
        for n in (1, 3)
    ]
    assert rows[0] == rows[1]


def test_resume_skips_finished_shards(built):
    root, data, config_file, _ = built
    out = root / "resume"
    partial = root / "resume.partial"
    assert step("tokenize", config_file, out, "--dataset", "shapes_s").returncode == 0
    shutil.move(out, partial)  # as if killed after every shard was written but before publishing
    (partial / "manifest.json").unlink()
    (partial / "train-00001-of-00002.parquet").unlink()
    stamp = (partial / "train-00000-of-00002.parquet").stat().st_mtime_ns
    assert step("tokenize", config_file, out, "--dataset", "shapes_s").returncode == 0
    assert (out / "train-00000-of-00002.parquet").stat().st_mtime_ns == stamp  # kept, not redone
    assert (out / "train-00001-of-00002.parquet").exists() and not partial.exists()


def corrupt_copy(paths, root, name="shapes_s"):
    """A local parquet directory like a Hub dataset's, with row 3's source image replaced by junk bytes."""
    table = datasets.load_dataset("parquet", data_files=str(paths.data(name) / "train.parquet"), split="train")
    table = table.cast_column("source_image", datasets.Image(decode=False))
    rows = table.to_list()
    rows[3]["source_image"] = {"bytes": b"not a png", "path": None}
    local = root / "corrupt"
    local.mkdir(exist_ok=True)
    datasets.Dataset.from_list(rows, features=table.features).to_parquet(str(local / "train-00000.parquet"))
    return local


def hub_config(root, data, local, **dataset_overrides):
    config = json.loads(json.dumps(data))
    config["datasets"]["local"] = {
        "source": {"kind": "hub", "path": str(local)},
        "columns": {**data["datasets"]["shapes_s"]["columns"], **dataset_overrides.pop("columns", {})},
        "splits": ["train"], "image_area": 4096, **dataset_overrides,
    }
    return write_config(root / f"hub-{len(dataset_overrides)}.yaml", config)


def test_corrupt_image_is_named_in_one_line(built):
    root, data, _, paths = built
    config_file = hub_config(root, data, corrupt_copy(paths, root))
    result = step("tokenize", config_file, root / "bad", "--dataset", "local")
    assert result.returncode == 1
    row_id = datasets.load_dataset("parquet", data_files=str(paths.data("shapes_s") / "train.parquet"), split="train")[3]["id"]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: dataset 'local' split 'train' row 3 (id {row_id}) column 'source_image': cannot decode image")
    assert "Traceback" not in result.stderr
    assert not (root / "bad").exists()


def test_corrupt_row_is_skipped_and_counted_when_asked(built):
    root, data, _, paths = built
    config_file = hub_config(root, data, corrupt_copy(paths, root), on_bad_row="skip")
    assert step("tokenize", config_file, root / "skip", "--dataset", "local").returncode == 0
    stats = artifacts.read_manifest(root / "skip")["splits"]["train"]
    assert stats["rows"] == 23 and stats["skipped"] == 1 and stats["skipped_rows"][0]["row"] == 3


def test_missing_column_is_named_in_one_line(built):
    root, data, _, paths = built
    config_file = hub_config(root, data, corrupt_copy(paths, root), columns={"instruction": "edit_prompt"})
    result = step("tokenize", config_file, root / "nocol", "--dataset", "local")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: dataset 'local' split 'train': column 'edit_prompt' (columns.instruction) not found")


def test_wrong_config_type_is_one_line(built):
    root, data, config_file, _ = built
    result = step("tokenize", config_file, root / "typo", "--dataset", "shapes_s", "--set", "tokenize.shards=two")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: config error at tokenize.shards: Input should be a valid integer, unable to parse string as an integer (got 'two')"]


def test_cot_boxes_are_rescaled_with_the_image():
    assert tokenize.rescale_boxes("obj [10, 20.5, -4, 40] and [1,2,3,4]", 0.5, 2.0) == "obj [5, 41, -2, 80] and [0, 4, 2, 8]"


def test_resize_rule_worked_numbers():
    assert resize_to_area(Image.new("RGB", (1024, 768)), 65536).size == (296, 222)
    assert resize_to_area(Image.new("RGB", (512, 512)), 65536).size == (256, 256)


def test_paper_kinds_load_pretrained_vq_and_tokenizer_from_local_paths(built):
    """Paper mode's loaders (`kind: pretrained`, HF id or path) on local copies: same weights, same vocabulary."""
    root, data, _, paths = built
    config = json.loads(json.dumps(data))
    config["vq"] = {"kind": "pretrained", "path": str(paths.vq())}
    config["text_tokenizer"] = {"kind": "pretrained", "path": str(paths.text_tokenizer())}
    config_file = write_config(root / "paper-kinds.yaml", config)
    pretrained = artifacts.Paths(from_dict(config))
    for name, out in (("vq", pretrained.vq()), ("text_tokenizer", pretrained.text_tokenizer())):
        result = step(name, config_file, out)
        assert result.returncode == 0, result.stderr
    assert artifacts.read_manifest(pretrained.vq())["fingerprint"] == artifacts.read_manifest(paths.vq())["fingerprint"]
    assert load_text_tokenizer(pretrained.text_tokenizer()).get_vocab() == load_text_tokenizer(paths.text_tokenizer()).get_vocab()
