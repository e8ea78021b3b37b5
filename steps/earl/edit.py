"""``earl edit``: edit one image with a trained model, through the pipeline's own layout, engine and VQ code.

    earl edit --model results/rl/shapes_s+shapes_c-<hash> --image in.png --instruction "..." --out edit.png
    python -m earl.edit ...                                    (the same command)

``--model`` is a pipeline artifact (``results/sft/…`` or ``results/rl/…``: its VQ and its training data's image
area are found by following the manifests' ``inputs``) or a Hugging Face id / local directory of an
``Emu3ForCausalLM`` checkpoint with its tokenizer (then ``--vq`` is required, e.g. BAAI/Emu3-VisionTokenizer,
and the area defaults to 256²). The source is resized to that area (spec §A.3) and VQ-encoded; the prompt is
the evaluation one, ``BOS + block(source) + instruction + "<|image start|>H*W"`` (spec §D.3); the built-in
engine samples under the grid constraint (the source's H×W), and each completion's image block is VQ-decoded.
Sample ``i`` (1-based) is drawn with seed ``--seed + i - 1``: the same command gives the same images.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from transformers.utils import logging as transformers_logging

from earl import artifacts, heldout, vq as vq_codec
from earl.engine import HFEngine, SamplingParams
from earl.layout import EVAL_PREFILL, Layout
from earl.models import WeightsMismatch, load_lm, load_vq
from earl.text_tokenizer import load_text_tokenizer

HUB_IMAGE_AREA = 65536  # 256²: the area EARL's evaluation meant (its code says 65636, spec §A.3)
GAP = 8  # pixels around and between the tiles of --grid
# Below this many parameters a CPU run uses one thread: the default model's matmuls are too small to split, and on
# a 2-core machine shared with other jobs two threads made one 4-sample edit ~100× slower (9 s against 0.09 s).
SMALL_MODEL = 100_000_000


class EditError(Exception):
    """A problem with the command's inputs, reported as one line."""


def resolve(model: str, vq: str | None, image_area: int | None) -> tuple[str, str, int]:
    """(model, VQ, image area): from the artifact's manifest chain, or from the arguments for a hub model."""
    path = Path(model).expanduser()
    if (path / artifacts.MANIFEST).is_file():
        manifest = artifacts.read_manifest(path)
        if manifest.get("step") not in ("sft", "rl"):
            raise EditError(f"--model {model}: a {manifest.get('step')!r} artifact, not a model (sft or rl)")
        try:
            inputs = {p: artifacts.read_manifest(p) for p in artifacts.input_dirs(path)}
        except FileNotFoundError as error:
            raise EditError(f"--model {model}: {error}") from None
        if vq is None:
            found = [p for p, m in inputs.items() if m.get("step") == "vq"]
            if not found:
                raise EditError(f"--model {model}: its manifest names no VQ input; pass --vq")
            vq = str(found[0])
        if image_area is None:
            areas = {m["config"]["dataset"]["image_area"] for m in inputs.values() if m.get("step") == "tokenize"}
            if len(areas) != 1:
                raise EditError(f"--model {model}: its training data has image areas {sorted(areas)}; pass --image-area")
            image_area = areas.pop()
        return str(path), vq, int(image_area)
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1  # a hub id is <org>/<name>
    if (path.exists() and not path.is_dir()) or (not path.exists() and looks_local):
        raise EditError(f"--model {model}: no such model directory")
    if vq is None:
        raise EditError(f"--model {model}: not a pipeline artifact (no {artifacts.MANIFEST}), so --vq is required"
                        " (e.g. BAAI/Emu3-VisionTokenizer)")
    return model, vq, image_area or HUB_IMAGE_AREA


def load(model: str, vq: str, device: str, trust_remote_code: bool = False):
    """(model, layout, VQ) on ``device``; every failure is an :class:`EditError` naming what failed."""
    try:
        lm = load_lm(model).to(device).eval()
    except (OSError, ValueError, WeightsMismatch) as error:
        raise EditError(f"--model {model}: cannot load: {str(error).strip().splitlines()[0]}") from None
    try:
        tokenizer = load_text_tokenizer(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise EditError(f"--model {model}: cannot load its tokenizer: {str(error).strip().splitlines()[0]}") from None
    try:
        codec = load_vq(vq).to(device)
    except (OSError, ValueError, WeightsMismatch) as error:
        raise EditError(f"--vq {vq}: cannot load: {str(error).strip().splitlines()[0]}") from None
    try:
        layout = Layout(tokenizer, codec.config.codebook_size)
    except ValueError as error:
        raise EditError(f"--model {model}: {error}") from None
    return lm, layout, codec


def open_source(path: Path, area: int) -> Image.Image:
    """The source image resized to ``area`` pixels (spec §A.3)."""
    try:
        with Image.open(path) as image:
            image.load()
            return vq_codec.resize_to_area(image, area)
    except (OSError, ValueError) as error:  # missing, unreadable, not an image (PIL's UnidentifiedImageError is an OSError)
        raise EditError(f"--image {path}: cannot read image ({type(error).__name__}: {error})") from None


def sample_paths(out: Path, samples: int) -> list[Path]:
    """``--out`` itself for one sample, else ``<stem>-1<suffix>`` … ``<stem>-N<suffix>``."""
    return [out] if samples == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, samples + 1)]


def grid_figure(source: Image.Image, edits: list[Image.Image | None], instruction: str, scale: int = 0) -> Image.Image:
    """Source | sample 1 … N side by side (nearest-neighbour ``scale``×, 0: tiles of ~192 px), the instruction above.

    The source is shown cropped to what the VQ grid covers (8·cols × 8·rows); a malformed sample is a grey tile
    marked "no image". Width: ``GAP + (N + 1) · (scale · 8·cols + GAP)``.
    """
    width, height = (source.width // 8) * 8, (source.height // 8) * 8
    scale = scale or max(1, 192 // max(width, height))
    tile_w, tile_h = width * scale, height * scale
    try:
        font = ImageFont.load_default(size=14)
    except (OSError, ValueError):  # Pillow without FreeType: the bitmap font
        font = ImageFont.load_default()
    line_h = 18
    columns = len(edits) + 1
    canvas_w = GAP + columns * (tile_w + GAP)
    lines = _wrap(f"instruction: {instruction}", font, canvas_w - 2 * GAP)
    top = GAP + line_h * len(lines) + GAP
    canvas = Image.new("RGB", (canvas_w, top + tile_h + GAP + line_h + GAP), "white")
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(lines):
        draw.text((GAP, GAP + k * line_h), line, fill="black", font=font)
    tiles = [source.crop((0, 0, width, height)), *edits]
    for k, tile in enumerate(tiles):
        x = GAP + k * (tile_w + GAP)
        if tile is None:
            draw.rectangle((x, top, x + tile_w - 1, top + tile_h - 1), fill=(200, 200, 200))
            draw.text((x + 4, top + 4), "no image", fill="black", font=font)
        else:
            canvas.paste(tile.resize((tile_w, tile_h), Image.Resampling.NEAREST), (x, top))
        draw.text((x, top + tile_h + GAP // 2), "source" if k == 0 else f"sample {k}", fill="black", font=font)
    return canvas


def _wrap(text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width:
            lines.append(line)
            candidate = word
        line = candidate
    return [*lines, line]


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise EditError(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    model, vq, area = resolve(args.model, args.vq, args.image_area)
    source = open_source(args.image, area)  # before loading anything: a bad path fails at once
    lm, layout, codec = load(model, vq, args.device, args.trust_remote_code)
    if args.device == "cpu":
        torch.set_num_threads(args.threads or (1 if lm.num_parameters() < SMALL_MODEL else torch.get_num_threads()))
    loaded = time.perf_counter()
    codes = vq_codec.encode(codec, [source])[0]
    max_tokens = args.max_tokens or len(layout.image_block(codes)) + 1  # the whole block and EOS
    params = SamplingParams(max_tokens, 0.0 if args.greedy else args.temperature, args.top_k, seed=args.seed)
    rows = [{"source_codes": codes, "instruction": args.instruction}] * args.samples
    engine = HFEngine(lm, layout, batch_size=args.samples)
    edits, reasons = heldout.edit_rows_explained(engine, layout, codec, rows, EVAL_PREFILL, params)
    generated = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    kept = {}  # path → image
    for i, (path, image, reason) in enumerate(zip(sample_paths(args.out, args.samples), edits, reasons), start=1):
        if image is None:
            print(f"earl edit: sample {i} (seed {args.seed + i - 1}): malformed output, no image written: {reason}",
                  file=sys.stderr)
            continue
        kept[path] = image
    vq_codec.write_pngs(kept, torch.get_num_threads())
    written = list(kept)
    if args.grid is not None:
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        grid_figure(source, edits, args.instruction, args.grid_scale).save(args.grid, format="PNG")
    rows_, cols = codes.shape
    print(f"earl edit: {len(written)}/{args.samples} sample(s) written ({', '.join(map(str, written)) or 'none'}); "
          f"{rows_}x{cols} grid, {8 * cols}x{8 * rows_} px; {time.perf_counter() - started:.2f} s "
          f"(loading {loaded - started:.2f} s, encode + generate + decode {generated - loaded:.2f} s, on {args.device}"
          f"{f', {torch.get_num_threads()} thread(s)' if args.device == 'cpu' else ''})",
          file=sys.stderr)
    return 0 if written else 1


def parser(prog: str = "earl edit") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="results/{sft,rl}/<name>-<hash>, or a Hugging Face id / local path")
    p.add_argument("--image", required=True, type=Path, help="the source image (any format PIL reads)")
    p.add_argument("--instruction", required=True, help="the edit instruction")
    p.add_argument("--out", required=True, type=Path, help="output PNG (several samples: <stem>-1.png … <stem>-N.png)")
    p.add_argument("--samples", type=_positive, default=1, help="number of samples (default 1)")
    p.add_argument("--grid", type=Path, help="also write source | sample 1 … N side by side, captioned, to this PNG")
    p.add_argument("--grid-scale", type=int, default=0, help="nearest-neighbour upscaling of --grid tiles (0: ~192 px tiles)")
    p.add_argument("--seed", type=int, default=0, help="seed of sample 1; sample i uses seed + i - 1 (default 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0, spec §D.3)")
    p.add_argument("--top-k", type=int, default=2048, help="top-k sampling (default 2048, spec §D.3; ≤ 0: off)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (temperature 0)")
    p.add_argument("--vq", help="VQ tokenizer directory or hub id (default: the artifact's VQ input)")
    p.add_argument("--image-area", type=_positive, help="resize area in pixels (default: the training data's, or 65536)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=_positive, help="CPU threads (default: 1 for a model under 100 M parameters, else all)")
    p.add_argument("--max-tokens", type=_positive, help="generation limit (default: the source grid's block length + 1)")
    p.add_argument("--trust-remote-code", action="store_true", help="for a hub tokenizer shipped as code (Emu3's own)")
    return p


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def main(argv: list[str] | None = None, prog: str = "earl edit") -> None:
    args = parser(prog).parse_args(argv)
    transformers_logging.disable_progress_bar()  # no "Loading weights" bars or loading reports around the one-line
    transformers_logging.set_verbosity_error()  # report: a checkpoint with missing weights is refused in one line
    try:
        code = run(args)
    except EditError as error:
        sys.exit(f"error: {error}")
    sys.exit(code)


if __name__ == "__main__":
    main(prog="python -m earl.edit")
