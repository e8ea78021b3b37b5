"""Tokenization throughput.

    python benchmarks/tokenize.py step [--config config/config.yaml]   # the tokenize step, 1 vs 2 workers (CPU)
    python benchmarks/tokenize.py vq --device cuda                      # real-size Emu3VQVAE encode/decode (GPU)
    python benchmarks/tokenize.py vq --device cpu --tiny --px 32 ...    # the same, tiny, as a smoke test

``step`` runs ``python -m earl.tokenize`` on the default config's first dataset, as the pipeline does, and
reports images/s (source + target images encoded) per worker count. ``vq`` builds transformers' Emu3VQVAE with
BAAI/Emu3-VisionTokenizer's architecture (random weights: speed does not depend on them) and times encode and
decode of 256×256 images in bf16, the unmodified class beside earl.vq's fast path (the code path of the tokenize
step and the RL decoder) in one process, with the agreement of their codes (see ``bench_vq``). It imports only
torch, transformers, numpy, PIL and earl.vq. Results go to stdout as one JSON line per measurement and a table
last; copy them into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os
import sys

# This file's name shadows the standard library's `tokenize` (which torch and inspect import) while its
# folder is first on sys.path: drop the folder before anything else is imported.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

import argparse  # noqa: E402
import json
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "steps"))


def bench_step(config_path: str, workers: list[int]) -> None:
    from earl.artifacts import Paths, read_manifest
    from earl.cli_util import read_config

    config = read_config([config_path], [])
    paths = Paths(config)
    name = next(iter(config.datasets))
    needed = [str(paths.data(n)) for n in config.datasets if config.datasets[n].source.kind == "shapes"] + [str(paths.vq())]
    subprocess.run(["snakemake", "-s", str(REPO / "Snakefile"), "--cores", "2", *needed, "--configfile", config_path],
                   check=True, cwd=REPO, capture_output=True)
    for n in workers:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "earl.tokenize", "--config", config_path, "--dataset", name,
                            "--out", f"{tmp}/out", "--set", f"tokenize.workers={n}"], check=True, cwd=REPO, capture_output=True)
            seconds = time.perf_counter() - start
            rows = sum(s["rows"] for s in read_manifest(Path(tmp) / "out")["splits"].values())
        images = 2 * rows
        print(json.dumps({"bench": "tokenize_step", "dataset": name, "workers": n, "images": images,
                          "seconds": round(seconds, 2), "images_per_s": round(images / seconds, 1)}))


def bench_vq(device: str, batch_sizes: list[int], n_images: int, compile_batches: list[int], tiny: bool,
             px: int, reps: int, budget_s: float, out: Path | None, skip: set[str] = frozenset()) -> None:
    """The unmodified ``Emu3VQVAE.encode``/``decode`` beside earl.vq's fast path, in one process on one model.

    vq_model: tensors on the device in and out (the network alone), per batch size and variant:
      class            ``vq.encode`` / ``vq.decode`` as transformers ships them
      fold             ``encode_pixels`` / ``decode_codes`` as earl.vq calls them: the 2D stack once per image
      fold_cl          the same with channels-last activations
      fold_compile     ``fold`` with ``compile=True`` (``first_call_s`` holds the compilation)
      fold_cl_compile  ``fold_cl`` with ``compile=True``
    vq_pipeline: PIL images → code grids → PIL images through earl.vq.encode/decode, against the helpers before the
      fast path (the class, per-image ``to_pixels`` and transfers).
    vq_agreement: share of equal codes against the class in bf16 and in fp32 (TF32 off), the relative difference
      of decoded pixels from the same codes, and, as the yardstick of rounding, the class against itself (bf16 vs
      fp32; fp32 at another batch size, which makes cuDNN pick other kernels).
    ``skip``: any of "model", "pipeline", "compile" (the fp32 and agreement rows always run).
    """
    import copy
    import statistics

    import numpy as np
    import torch
    from PIL import Image
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    from earl import vq as V

    started = time.perf_counter()
    cuda = device.startswith("cuda")
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if out is not None:
            with open(out / "vq.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def peak_gib() -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None

    def reset_peak() -> None:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    torch.manual_seed(0)
    config = Emu3VQVAEConfig(**TINY_VQ) if tiny else Emu3VQVAEConfig()  # default: BAAI/Emu3-VisionTokenizer's shape
    with torch.device(device):
        vq = Emu3VQVAE(config).to(torch.bfloat16).eval()
    grid = px // vq.spatial_scale_factor
    info = {"bench": "vq_setup", "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "dtype": "bf16", "px": px, "grid": [grid, grid],
            "tiny": tiny, "attn": vq.config._attn_implementation}
    emit(info)

    gen = torch.Generator(device).manual_seed(0)  # uniform-noise images, as floats the way to_pixels makes them
    pixels = V._levels().to(device)[torch.randint(0, 256, (n_images, 3, px, px), generator=gen, device=device)]
    sizes = torch.tensor([[px, px]] * n_images)

    def chunks(fn, data, batch):
        return torch.cat([fn(data[i : i + batch]) for i in range(0, len(data), batch)])

    cl = torch.channels_last
    variants = {
        "class": (lambda x: torch.stack(vq.encode(x, image_sizes=sizes[: len(x)]).image_tokens), vq.decode),
        "fold": (lambda x: V.encode_pixels(vq, x), lambda c: V.decode_codes(vq, c)),
        "fold_cl": (lambda x: V.encode_pixels(vq, x, memory_format=cl), lambda c: V.decode_codes(vq, c, memory_format=cl)),
        "fold_compile": (lambda x: V.encode_pixels(vq, x, compile=True), lambda c: V.decode_codes(vq, c, compile=True)),
        "fold_cl_compile": (lambda x: V.encode_pixels(vq, x, compile=True, memory_format=cl),
                            lambda c: V.decode_codes(vq, c, compile=True, memory_format=cl)),
    }
    with torch.inference_mode():
        codes = chunks(variants["class"][0], pixels, 32)  # the class's bf16 codes: decode's input, the reference

    @torch.inference_mode()
    def measure(name: str, what: str, fn, data, batch: int) -> dict:
        reset_peak()
        sync()
        start = time.perf_counter()
        fn(data[:batch])  # warm-up: cuDNN plans, allocator, compilation
        sync()
        first = time.perf_counter() - start
        times = []
        for _ in range(reps):
            sync()
            start = time.perf_counter()
            for i in range(0, len(data) - batch + 1, batch):
                fn(data[i : i + batch])
            sync()
            times.append(time.perf_counter() - start)
        done = (len(data) // batch) * batch
        return {"bench": "vq_model", "variant": name, "what": what, "batch": batch, "images": done, "reps": reps,
                "images_per_s": round(done / statistics.median(times), 1), "spread": round(max(times) / min(times) - 1, 3),
                "first_call_s": round(first, 2), "peak_memory_gib": peak_gib()}

    def time_variant(name: str, batch: int) -> None:
        enc, dec = variants[name]
        emit(measure(name, "encode", enc, pixels, batch))
        emit(measure(name, "decode", dec, codes, batch))

    # 1. the network alone, eager
    for batch in batch_sizes if "model" not in skip else []:
        for name in ("class", "fold", "fold_cl"):
            time_variant(name, batch)

    # 2. the pipeline's helpers, PIL in and out
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8)) for _ in range(n_images)]
    pipeline_batch = max(batch_sizes)

    @torch.inference_mode()
    def old_encode(batch: int) -> list[np.ndarray]:  # earl.vq.encode before the fast path
        grids = []
        for s in range(0, len(images), batch):
            x = torch.stack([V.to_pixels(img) for img in images[s : s + batch]]).to(device, vq.dtype)
            grids += [t.cpu().numpy().astype(np.int64) for t in vq.encode(x, image_sizes=sizes[: len(x)]).image_tokens]
        return grids

    @torch.inference_mode()
    def old_decode(grids: list[np.ndarray], batch: int) -> list[Image.Image]:  # earl.vq.decode before the fast path
        decoded = []
        for s in range(0, len(grids), batch):
            decoded += [V.to_image(p) for p in vq.decode(torch.from_numpy(np.stack(grids[s : s + batch])).to(device))]
        return decoded

    def timed(fn):
        fn()
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        return result, time.perf_counter() - start

    def pipeline(name: str, enc, dec, decode_grids: list | None = None) -> tuple[list, list]:
        """Times ``enc`` and then ``dec`` of ``decode_grids`` (default: ``enc``'s grids)."""
        reset_peak()
        grids, enc_s = timed(enc)
        decoded, dec_s = timed(lambda: dec(grids if decode_grids is None else decode_grids))
        emit({"bench": "vq_pipeline", "variant": name, "batch": pipeline_batch, "images": len(images),
              "encode_images_per_s": round(len(images) / enc_s, 1), "decode_images_per_s": round(len(images) / dec_s, 1),
              "peak_memory_gib": peak_gib()})
        return grids, decoded

    def pipeline_agreement(name: str, grids: list, decoded: list) -> None:
        diff = [np.asarray(a, np.int16) - np.asarray(b, np.int16) for a, b in zip(old_images, decoded)]  # same codes
        emit({"bench": "vq_agreement", "dtype": "bf16", "what": "pipeline", "variant": name, "images": len(images),
              "reference": "class (previous earl.vq helpers)",
              "codes_equal": float(np.mean(np.concatenate([(a == b).ravel() for a, b in zip(old_grids, grids)]))),
              "decoded_bytes_equal": float(np.mean(np.concatenate([(d == 0).ravel() for d in diff]))),
              "decoded_max_abs_diff": int(max(np.abs(d).max() for d in diff))})

    if "pipeline" not in skip:
        old_grids, old_images = pipeline("class (previous earl.vq helpers)", lambda: old_encode(pipeline_batch),
                                         lambda g: old_decode(g, pipeline_batch))
        pipeline_agreement("earl.vq", *pipeline("earl.vq", lambda: V.encode(vq, images, pipeline_batch),
                                                lambda g: V.decode(vq, g, pipeline_batch), old_grids))

    # 3. float32 with TF32 off: the class, against itself at another batch size and against the fold
    @torch.inference_mode()
    def fp32_agreement(n32: int) -> torch.Tensor:
        """Emits the fp32 row; returns the fp32 class's codes of the first ``n32`` images."""
        vq32 = copy.deepcopy(vq).float()
        enc32 = {"class": lambda x: torch.stack(vq32.encode(x, image_sizes=sizes[: len(x)]).image_tokens),
                 "fold": lambda x: V.encode_pixels(vq32, x), "fold_cl": lambda x: V.encode_pixels(vq32, x, memory_format=cl)}
        codes32 = chunks(enc32["class"], pixels[:n32], 16)
        row = {"bench": "vq_agreement", "dtype": "fp32 (TF32 off)", "what": "model", "images": n32,
               "reference": "class fp32, batch 16",
               "class_batch_4": (chunks(enc32["class"], pixels[:n32], 4) == codes32).double().mean().item()}
        for name in ("fold", "fold_cl"):
            row[name] = (chunks(enc32[name], pixels[:n32], 16) == codes32).double().mean().item()
        # decoded pixels of the same 16 grids, each pair's ||a - b|| / ||b||: class at 16 and at 4 grids a call
        # (64 and 16 frames), the fold (16 frames), and the class in bf16
        c16 = codes32[:16]
        decoded = {"class_b16": vq32.decode(c16), "class_b4": chunks(vq32.decode, c16, 4), "fold": V.decode_codes(vq32, c16),
                   "fold_cl": V.decode_codes(vq32, c16, memory_format=cl), "class_bf16": vq.decode(c16).float()}
        names = list(decoded)
        row["decode_finite"] = all(bool(d.isfinite().all()) for d in decoded.values())
        row["decode_rel_diff"] = {f"{a}~{b}": (decoded[a] - decoded[b]).norm().item() / decoded[b].norm().item()
                                  for i, a in enumerate(names) for b in names[i + 1 :]}
        diff = (decoded["class_b16"] - decoded["class_b4"]).flatten(1).norm(dim=1)
        row["class_b16~class_b4_per_image"] = [round(x, 6) for x in (diff / decoded["class_b4"].flatten(1).norm(dim=1)).tolist()]
        emit(row)
        return codes32

    if cuda:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    n32 = min(n_images, 64)
    codes32 = fp32_agreement(n32)
    if cuda:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        torch.cuda.empty_cache()

    # 4. bf16 agreement with the class in bf16 (all images) and in fp32 (the first n32)
    def agreement(names: list[str], batch: int = 32) -> None:
        batch = min(batch, n_images)
        row = {"bench": "vq_agreement", "dtype": "bf16", "what": "model", "images": n_images, "batch": batch,
               "reference": "class bf16; _vs_fp32: class fp32",
               "class_vs_fp32": (codes[:n32] == codes32).double().mean().item()}
        with torch.inference_mode():
            ref = vq.decode(codes[:batch]).float()
            for name in names:
                enc, dec = variants[name]
                got = chunks(enc, pixels, batch)
                row[name] = (got == codes).double().mean().item()
                row[f"{name}_vs_fp32"] = (got[:n32] == codes32).double().mean().item()
                row[f"{name}_decode_rel_diff"] = ((dec(codes[:batch]).float() - ref).norm() / ref.norm()).item()
        emit(row)

    agreement(["fold", "fold_cl"])

    # 5. torch.compile (a new batch size or layout recompiles): last, within the time budget
    compiled = [("fold_compile", b) for b in compile_batches] + [("fold_cl_compile", b) for b in compile_batches[:1]]
    for name, batch in compiled if "compile" not in skip else []:
        if time.perf_counter() - started > budget_s:
            emit({"bench": "vq_skipped", "what": f"{name} batch {batch}", "elapsed_s": round(time.perf_counter() - started)})
            continue
        time_variant(name, batch)
        agreement([name], batch)
        if name == "fold_compile" and batch == pipeline_batch and "pipeline" not in skip:
            pipeline_agreement("earl.vq compile=True", *pipeline(
                "earl.vq compile=True", lambda: V.encode(vq, images, pipeline_batch, compile=True),
                lambda g: V.decode(vq, g, pipeline_batch, compile=True), old_grids))

    # summary: images/s per variant and batch, and the ratio to the class measured above
    model = [r for r in rows if r["bench"] == "vq_model"]
    base = {(r["what"], r["batch"]): r["images_per_s"] for r in model if r["variant"] == "class"}
    print(f"\n{'variant':<16} {'what':<7} {'batch':>5} {'img/s':>8} {'x class':>8} {'peak GiB':>9} {'first s':>8}")
    for r in model:
        ratio = r["images_per_s"] / base[(r["what"], r["batch"])] if (r["what"], r["batch"]) in base else float("nan")
        print(f"{r['variant']:<16} {r['what']:<7} {r['batch']:>5} {r['images_per_s']:>8} {ratio:>8.2f} "
              f"{r['peak_memory_gib'] if r['peak_memory_gib'] is not None else '-':>9} {r['first_call_s']:>8}")
    for r in rows:
        if r["bench"] in ("vq_pipeline", "vq_agreement", "vq_skipped"):
            print(json.dumps(r))
    print(f"total {time.perf_counter() - started:.0f} s")
    if out is not None:
        (out / "vq_results.json").write_text(json.dumps({"setup": info, "rows": rows}, indent=1))


# A few-hundred-k-parameter Emu3VQVAE with the real one's structure (temporal factor 4, temporal res blocks,
# mid-block attention): the CPU smoke test of this benchmark.
TINY_VQ = dict(codebook_size=64, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 1, 1, 1],
               num_res_blocks=1, attn_resolutions=[3], hidden_size=32, temporal_downsample_factor=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    step = sub.add_parser("step")
    step.add_argument("--config", default="config/config.yaml")
    step.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    vq = sub.add_parser("vq")
    vq.add_argument("--device", default="cuda")
    vq.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    vq.add_argument("--images", type=int, default=128, help="images per timed pass (and for the agreement rates)")
    vq.add_argument("--compile-batch", type=int, nargs="*", default=[32], help="batch sizes timed with torch.compile")
    vq.add_argument("--reps", type=int, default=3, help="timed passes per measurement (the median is reported)")
    vq.add_argument("--px", type=int, default=256, help="image side")
    vq.add_argument("--tiny", action="store_true", help="a tiny VQ of the same structure (CPU smoke test)")
    vq.add_argument("--budget", type=float, default=400, help="seconds after which compile measurements are skipped")
    vq.add_argument("--out", type=Path, help="folder for vq.jsonl and vq_results.json")
    vq.add_argument("--skip", nargs="*", default=[], choices=["model", "pipeline", "compile"], help="parts left out")
    args = parser.parse_args()
    if args.what == "step":
        bench_step(args.config, args.workers)
    else:
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
        bench_vq(args.device, args.batch, args.images, args.compile_batch, args.tiny, args.px, args.reps, args.budget,
                 args.out, set(args.skip))


if __name__ == "__main__":
    main()
