"""Tokenization throughput.

    python benchmarks/tokenize.py step [--config config/config.yaml]   # the tokenize step, 1 vs 2 workers (CPU)
    python benchmarks/tokenize.py vq --device cuda                      # real-size Emu3VQVAE encode/decode (GPU)

``step`` runs ``python -m earl.tokenize`` on the default config's first dataset, as the pipeline does, and
reports images/s (source + target images encoded) per worker count. ``vq`` builds transformers' Emu3VQVAE with
BAAI/Emu3-VisionTokenizer's architecture (random weights: speed does not depend on them) and times encode and
decode of 256×256 images in bf16 through earl.vq, the code path of the tokenize step and the RL decoder.
Results go to stdout as one JSON line per measurement; copy them into benchmarks/RESULTS.md.
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


def bench_vq(device: str, batch_sizes: list[int], n_images: int) -> None:
    import numpy as np
    import torch
    from PIL import Image
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    from earl.vq import decode, encode

    torch.manual_seed(0)
    vq = Emu3VQVAE(Emu3VQVAEConfig()).to(device, torch.bfloat16).eval()  # BAAI/Emu3-VisionTokenizer's shape
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(n_images)]

    def timed(fn):
        fn()  # warm-up: cuDNN autotuning, allocator
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    for batch in batch_sizes:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        grids, enc_s = timed(lambda: encode(vq, images, batch))
        _, dec_s = timed(lambda: decode(vq, grids, batch))
        memory = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
        print(json.dumps({"bench": "vq", "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                          "dtype": "bf16", "px": 256, "grid": list(grids[0].shape), "batch": batch, "images": n_images,
                          "encode_images_per_s": round(n_images / enc_s, 1), "decode_images_per_s": round(n_images / dec_s, 1),
                          "peak_memory_gib": None if memory is None else round(memory, 2)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    step = sub.add_parser("step")
    step.add_argument("--config", default="config/config.yaml")
    step.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    vq = sub.add_parser("vq")
    vq.add_argument("--device", default="cuda")
    vq.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    vq.add_argument("--images", type=int, default=256)
    args = parser.parse_args()
    if args.what == "step":
        bench_step(args.config, args.workers)
    else:
        bench_vq(args.device, args.batch, args.images)


if __name__ == "__main__":
    main()
