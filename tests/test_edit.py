"""`earl edit` through its CLI on a tiny SFT artifact: PNG size, seeded samples, the grid figure, greedy = the
engine's greedy decoding, malformed output, one-line errors, the manifest chain and the console script."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tomllib

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from conftest import REPO, step
from earl import artifacts, edit, vq as vq_codec
from earl.engine import HFEngine, SamplingParams
from earl.layout import EVAL_PREFILL
from test_sft import sft_config

INSTRUCTION = "remove the blue circle"
# the test-size pipeline keeps the default config's image area (the default: 32x32 px, a 4x4 grid)
AREA = yaml.safe_load(open(REPO / "config" / "config.yaml"))["datasets"]["shapes_s"]["image_area"]
SIDE = int(AREA**0.5)


@pytest.fixture(scope="module")
def sft_model(tiny_pipeline, tmp_path_factory):
    """(SFT artifact, a source image file from the tiny data's test split, the pipeline's Paths)."""
    root, data, _, paths = tiny_pipeline
    config_file, sft_paths = sft_config(root, data, "edit-base", max_steps=4, quality_check=None)
    out = sft_paths.sft("sft_s")
    if not (out / artifacts.MANIFEST).is_file():
        result = step("sft", config_file, out, "--experiment", "sft_s")
        assert result.returncode == 0, result.stderr[-3000:]
    row = pq.read_table(paths.data("shapes_s") / "test.parquet").slice(0, 1).to_pylist()[0]
    image = tmp_path_factory.mktemp("edit") / "source.png"
    Image.open(io.BytesIO(row["source_image"]["bytes"])).save(image)
    return out, image, paths


def earl_edit(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "earl.edit", "--device", "cpu", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


def source_grid(image, area: int = AREA) -> tuple[int, int]:
    resized = vq_codec.resize_to_area(Image.open(image), area)
    return vq_codec.grid_shape(resized.width, resized.height)


def test_one_sample_is_a_png_of_the_source_grid_size(sft_model, tmp_path):
    model, image, _ = sft_model
    result = earl_edit("--model", model, "--image", image, "--instruction", INSTRUCTION, "--out", tmp_path / "e.png")
    assert result.returncode == 0, result.stderr[-3000:]
    rows, cols = source_grid(image)
    with Image.open(tmp_path / "e.png") as png:
        assert png.format == "PNG" and png.size == (8 * cols, 8 * rows) == (SIDE, SIDE)
    assert "1/1 sample(s) written" in result.stderr


def test_seeded_samples_are_reproducible_and_differ_and_the_grid_has_one_tile_each(sft_model, tmp_path):
    model, image, _ = sft_model
    runs = []
    for name in ("a", "b"):
        result = earl_edit("--model", model, "--image", image, "--instruction", INSTRUCTION, "--samples", 3,
                           "--seed", 0, "--out", tmp_path / name / "e.png", "--grid", tmp_path / name / "grid.png",
                           "--grid-scale", 1)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append([(tmp_path / name / f"e-{i}.png").read_bytes() for i in (1, 2, 3)])
        assert not (tmp_path / name / "e.png").exists()
    assert runs[0] == runs[1]  # same seed, same bytes
    # T = 1 over an untrained model's near-uniform code distribution: three identical grids would be a bug
    assert len(set(runs[0])) == 3
    with Image.open(tmp_path / "a" / "grid.png") as grid:
        assert grid.width == edit.GAP + 4 * (SIDE + edit.GAP)  # source | sample 1 | sample 2 | sample 3
    assert (tmp_path / "a" / "grid.png").read_bytes() == (tmp_path / "b" / "grid.png").read_bytes()


def test_greedy_equals_the_engines_greedy_decoding(sft_model, tmp_path):
    model, image, _ = sft_model
    result = earl_edit("--model", model, "--image", image, "--instruction", INSTRUCTION, "--greedy",
                       "--out", tmp_path / "g.png")
    assert result.returncode == 0, result.stderr[-3000:]
    # the same thing by hand, straight from the engine
    path, vq_path, area = edit.resolve(str(model), None, None)
    lm, layout, vq = edit.load(path, vq_path, "cpu")
    codes = vq_codec.encode(vq, [vq_codec.resize_to_area(Image.open(image), area)])[0]
    prompt = layout.prompt(codes, INSTRUCTION, EVAL_PREFILL)
    rollouts = HFEngine(lm, layout).generate([prompt], [codes.shape], SamplingParams(200, temperature=0.0))
    expected = vq_codec.decode(vq, [layout.parse_grid(rollouts.completion(0))])[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g.png")), np.asarray(expected))


def test_malformed_output_is_reported_and_writes_no_image(sft_model, tmp_path):
    model, image, _ = sft_model
    result = earl_edit("--model", model, "--image", image, "--instruction", INSTRUCTION, "--samples", 2,
                       "--max-tokens", 5, "--out", tmp_path / "m.png", "--grid", tmp_path / "grid.png")
    assert result.returncode == 1
    assert "sample 1 (seed 0): malformed output, no image written: image block has no EOF" in result.stderr
    assert "sample 2 (seed 1): malformed output" in result.stderr
    assert not list(tmp_path.glob("m*.png"))
    assert (tmp_path / "grid.png").is_file()  # the figure shows the two failures as grey "no image" tiles


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--image": "{tmp}/missing.png"}, "error: --image {tmp}/missing.png: cannot read image (FileNotFoundError"),
        ({"--image": "{tmp}/text.png"}, "error: --image {tmp}/text.png: cannot read image (UnidentifiedImageError"),
        ({"--model": "/nonexistent/model"}, "error: --model /nonexistent/model: no such model directory"),
        ({"--model": "{vq}"}, "error: --model {vq}: a 'vq' artifact, not a model (sft or rl)"),
        ({"--model": "{tmp}"}, "error: --model {tmp}: not a pipeline artifact (no manifest.json), so --vq is required"),
        ({"--model": "{tmp}", "--vq": "{vq}"}, "error: --model {tmp}: cannot load:"),
    ],
)
def test_bad_inputs_fail_in_one_line_naming_them(sft_model, tmp_path, change, message):
    model, image, paths = sft_model
    (tmp_path / "text.png").write_text("not an image")
    fill = {"tmp": tmp_path, "vq": paths.vq()}
    args = {"--model": model, "--image": image, **{k: v.format(**fill) for k, v in change.items()}}
    result = earl_edit(*(x for kv in args.items() for x in kv), "--instruction", INSTRUCTION, "--out", tmp_path / "x.png")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.format(**fill)), result.stderr[-3000:]
    assert not (tmp_path / "x.png").exists()


def test_an_rl_artifact_finds_its_vq_and_image_area_through_the_manifests(sft_model, tmp_path):
    model, _, paths = sft_model
    rl = tmp_path / "results" / "rl" / "shapes_s+shapes_c-x"
    rl.mkdir(parents=True)
    tokenized = [paths.tokenized("shapes_s"), paths.tokenized("shapes_c")]
    artifacts.write_manifest(rl, step="rl", config={}, inputs=[model, *tokenized, paths.text_tokenizer(), paths.vq()])
    assert edit.resolve(str(rl), None, None) == (str(rl), str(paths.vq()), AREA)
    assert edit.resolve(str(rl), "other-vq", 4096) == (str(rl), "other-vq", 4096)
    # inputs recorded relative to a working directory that is gone: found beside the artifact in its results root
    results = model.parent.parent
    moved = results / "rl" / "moved-x"
    moved.mkdir(parents=True)
    manifest = artifacts.write_manifest(moved, step="rl", config={}, inputs=[paths.vq(), *tokenized])
    manifest["inputs"] = {f"gone/{p.parent.name}/{p.name}": h for p, h in zip([paths.vq(), *tokenized], manifest["inputs"].values())}
    (moved / artifacts.MANIFEST).write_text(json.dumps(manifest))
    assert edit.resolve(str(moved), None, None) == (str(moved), str(paths.vq()), AREA)
    # a hub model: --vq required, area 256²
    assert edit.resolve("BAAI/Emu3-Stage1", "BAAI/Emu3-VisionTokenizer", None)[2] == 65536


def test_the_earl_console_script_dispatches_to_edit():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"earl": "earl.cli:main"}
    run = lambda *a: subprocess.run([sys.executable, "-c", "from earl.cli import main; main()", *a],  # noqa: E731
                                    capture_output=True, text=True)
    assert run("edit", "--help").returncode == 0 and "usage: earl edit" in run("edit", "--help").stdout
    unknown = run("paint")
    assert unknown.returncode == 1 and "earl: unknown command 'paint'" in unknown.stderr
    assert "edit" in run().stdout
