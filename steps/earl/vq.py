"""Images ↔ Emu3 VQ code grids, and training a small ``Emu3VQVAE`` from scratch.

Emu3 (and EARL) turn an image into an ``rows × cols`` grid of codebook indices with ``Emu3VQVAE``: 8× spatial
downsampling, one code per 8×8 pixel cell. At paper scale the pretrained ``BAAI/Emu3-VisionTokenizer`` is
loaded; the embedded default trains a small one here. transformers' class only has inference (``encode`` /
``decode``), so the VQ-VAE objective below is written over the class's own submodules, mirroring every permute
and reshape of ``Emu3VQVAE.encode`` / ``decode``: the codes a model trained here was trained on are exactly the
codes ``Emu3VQVAE.encode`` returns. The rest of the pipeline encodes and decodes through ``encode`` / ``decode``
below, which run the unmodified class's submodules and weights but skip the copies of a still image that the
class's temporal repeat makes (``encode_pixels``, ``decode_codes``): 4× less work for Emu3's tokenizer, the
class's codes in float32 on CPU (tests/test_vq.py) and, measured in bf16 on an H200, bit for bit.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import math
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm
from transformers import Emu3VQVAE, Emu3VQVAEConfig

from earl import shapes

# The step's own modules (config, artifacts, datasets) are imported where the step uses them, so the codec above
# them imports with torch, transformers and PIL alone (e.g. on a GPU machine for benchmarks/tokenize.py vq).

# -------------------------------------------------------------------------------------------- pixels


def resize_to_area(img: Image.Image, area: int) -> Image.Image:
    """Scale to about ``area`` pixels keeping the aspect ratio (spec §A.3), e.g. 1024×768 at 256² → 296×222.

    No snapping to multiples of 8: the encoder floors, so a 222-pixel side gives 27 rows and the last 6 pixel
    rows are not represented (``grid_shape``). PIL's default resampling (bicubic for RGB), as the original.
    """
    img = img.convert("RGB")
    scale = math.sqrt(area / (img.width * img.height))
    return img.resize((round(img.width * scale), round(img.height * scale)))


def grid_shape(width: int, height: int, factor: int = 8) -> tuple[int, int]:
    """(rows, cols) of the code grid of a ``width × height`` image: each stride-2 conv floors the size."""
    return height // factor, width // factor


def to_pixels(img: Image.Image) -> torch.Tensor:
    """RGB image → float [3, H, W] in [-1, 1] (Emu3's processor: rescale 1/255, normalise mean 0.5, std 0.5)."""
    x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - 0.5) / 0.5


def to_image(pixels: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] → RGB image. Rounds where Emu3's postprocess truncates: float32 ``to_pixels`` puts
    a quarter of the 256 levels a hair below the integer, so truncating would not invert ``to_pixels``."""
    return to_images(pixels[None])[0]


def to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] → RGB images, as ``to_image``. The float32 arithmetic runs where ``pixels`` are and
    one uint8 batch crosses to the host (the same IEEE operations on either device, so the same bytes)."""
    x = ((pixels.detach().float() * 0.5 + 0.5) * 255.0).round().clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).cpu().numpy()]


def png_bytes(images: list[Image.Image], threads: int = 1) -> list[bytes]:
    """Each image as PNG file bytes (PIL's default settings), ``threads`` images at a time.

    PIL releases the GIL while zlib compresses, so threads encode in parallel: a batch of decoded edits is
    written in ~1/``threads`` of the time on a GPU node's cores. The bytes do not depend on ``threads``.
    """

    def one(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    if threads <= 1 or len(images) <= 1:
        return [one(image) for image in images]
    with ThreadPoolExecutor(min(threads, len(images))) as pool:
        return list(pool.map(one, images))


def write_pngs(files: dict[Path, Image.Image], threads: int = 1) -> None:
    """Write each image to its path as PNG, encoded ``threads`` at a time (:func:`png_bytes`)."""
    for path, data in zip(files, png_bytes(list(files.values()), threads)):
        path.write_bytes(data)


@functools.cache
def _levels() -> torch.Tensor:
    """``to_pixels`` of the 256 byte values (float32 [256]): indexing it with bytes is ``to_pixels`` exactly."""
    return to_pixels(Image.fromarray(np.arange(256, dtype=np.uint8).repeat(3).reshape(1, 256, 3)))[0, 0]


def pixel_batch(images: list[Image.Image], device: torch.device | str) -> torch.Tensor:
    """Equal-size RGB images → float32 [B, 3, H, W] on ``device``, equal to stacking ``to_pixels`` of each.

    The bytes cross to the device (a quarter of float32's) and become floats there by table look-up, in one
    transfer per batch. The result is a [B, 3, H, W] view of [B, H, W, 3] floats (channels-last strides).
    """
    data = torch.from_numpy(np.stack([np.asarray(img.convert("RGB")) for img in images])).to(device)
    return _levels().to(device)[data.int()].permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------- codes


def _compiled(fn: Callable, compile: bool) -> Callable:
    """``fn`` itself, or its ``torch.compile`` (made once per process; a flag, as compiling the real-size VQ's 2D
    stacks took 16-43 s per stack and input shape on an H200, which only long runs win back)."""
    return _compile(fn) if compile else fn


@functools.cache
def _compile(fn: Callable) -> Callable:
    return torch.compile(fn)


def _encoder_frames(encoder, pixels: torch.Tensor) -> torch.Tensor:
    """The per-frame 2D part of ``Emu3VQVAEEncoder.forward`` (its first lines), on [N, 3, H, W] frames."""
    hidden = encoder.middle_block(encoder.down_block(encoder.conv_in(pixels)))
    hidden = encoder.norm_out(hidden)
    hidden = hidden * torch.sigmoid(hidden)  # the class's expression (not F.silu), so bf16 rounds the same
    return encoder.conv_out(hidden)


def _decoder_frames(decoder, hidden: torch.Tensor, quant: torch.Tensor) -> torch.Tensor:
    """The per-frame 2D part of ``Emu3VQVAEDecoder.forward`` (its last lines), on [N, C, h, w] frames."""
    hidden = decoder.up_block(decoder.middle_block(decoder.conv_in(hidden), quant), quant)
    hidden = decoder.norm_out(hidden, quant)
    hidden = hidden * torch.sigmoid(hidden)
    return decoder.conv_out(hidden)


def encode_pixels(vq: Emu3VQVAE, pixels: torch.Tensor, compile: bool = False,
                  memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """[B, 3, H, W] pixels in [-1, 1] → int64 [B, H // 8, W // 8] codes: ``Emu3VQVAE.encode`` of still images,
    through the class's own submodules and weights, with the per-frame work done once per image.

    ``encode`` repeats a still image T = ``temporal_downsample_factor`` times along time and runs the encoder's
    2D stack (convolutions, GroupNorms, attention: all of its cost) on each of the T identical frames. Here the
    2D stack runs on one frame per image and its latent (``latent_channels`` × h × w, 4 × 32 × 32 for Emu3) is
    repeated T times before the encoder's own temporal convolutions, ``quant_conv`` and nearest-code search. So
    the codes are ``encode``'s up to float rounding (tests/test_vq.py: equal in float32 on CPU), at 1/T of the
    cost. The temporal layers are not folded into 2D ones (summing kernel slices over the identical frames):
    they work on the small latent, and the class's modules stay the reference.

    ``memory_format``: the 2D stack's activation layout. NCHW, the class's own, is the default: in the benchmark's
    bf16 runs on an H200 it gave the class's codes and pixels bit for bit and was faster than channels-last in
    eager mode (benchmarks/RESULTS.md). ``compile``: ``torch.compile`` the 2D stack (inductor fuses the norms and
    activations; about 1.7x faster again there, but its bf16 rounding differs from eager's, so its codes differ
    from the class's as much as the class's bf16 codes differ from its float32 ones).
    """
    encoder, temporal = vq.encoder, vq.config.temporal_downsample_factor
    frames = _compiled(_encoder_frames, compile)(encoder, pixels.to(vq.dtype).contiguous(memory_format=memory_format))
    hidden = frames.unsqueeze(2).repeat(1, 1, temporal, 1, 1)  # [B, C, T, h, w], the layout forward() builds
    for conv in encoder.time_conv:
        hidden = conv(hidden)
        hidden = hidden * torch.sigmoid(hidden)
    for layer in encoder.time_res_stack:
        hidden = layer(hidden)
    latent = vq.quant_conv(hidden).permute(0, 2, 1, 3, 4)  # [B, T = 1, C, h, w]
    return vq.quantize(latent)[:, 0]


def decode_codes(vq: Emu3VQVAE, codes: torch.Tensor, compile: bool = False,
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """int64 [B, h, w] codes → [B, 3, 8h, 8w] pixels: ``Emu3VQVAE.decode`` of image codes, through the class's
    submodules and weights, computing only the frame ``decode`` returns.

    ``decode`` runs the latent through the decoder's temporal layers, which turn one latent frame into T, then its
    2D stack (all of its cost) on all T frames, and returns frame 0 for an image. Each frame goes through the 2D
    stack on its own (GroupNorm, attention and convolutions are per frame), so here the temporal layers run as in
    the class and the 2D stack on frame 0 alone: the same pixels up to float rounding, at 1/T of the cost.
    ``memory_format`` and ``compile`` as in ``encode_pixels``.
    """
    decoder = vq.decoder
    quant = vq.quantize.embedding(codes).permute(0, 3, 1, 2).unsqueeze(2)  # [B, C, T = 1, h, w]
    hidden = torch.cat((vq.post_quant_conv(quant), quant))  # forward() runs both through its temporal layers
    for layer in decoder.time_res_stack:
        hidden = layer(hidden)
    for layer in decoder.time_conv:
        hidden = layer(hidden)
        hidden = hidden * torch.sigmoid(hidden)
    hidden, quant = (x.contiguous(memory_format=memory_format) for x in hidden[:, :, 0].chunk(2))  # frame 0
    return _compiled(_decoder_frames, compile)(decoder, hidden, quant)


def _same_shape_batches(sizes: list[tuple], batch_size: int) -> list[list[int]]:
    """Indices grouped by size (first-seen order), cut into batches: only equal sizes can be stacked."""
    groups: dict[tuple, list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(size, []).append(i)
    return [g[s : s + batch_size] for g in groups.values() for s in range(0, len(g), batch_size)]


@torch.inference_mode()
def encode(vq: Emu3VQVAE, images: list[Image.Image], batch_size: int = 16, compile: bool = False) -> list[np.ndarray]:
    """Each image's int64 [rows, cols] code grid, in input order: ``Emu3VQVAE.encode``'s, by ``encode_pixels``."""
    grids: list[np.ndarray] = [None] * len(images)  # type: ignore[list-item]
    for batch in _same_shape_batches([img.size for img in images], batch_size):
        codes = encode_pixels(vq, pixel_batch([images[i] for i in batch], vq.device), compile)
        for i, grid in zip(batch, codes.cpu().numpy()):
            grids[i] = grid
    return grids


@torch.inference_mode()
def decode(vq: Emu3VQVAE, grids: list[np.ndarray], batch_size: int = 16, compile: bool = False) -> list[Image.Image]:
    """Each [rows, cols] code grid's image (8·rows × 8·cols pixels), in input order: ``Emu3VQVAE.decode``'s, by
    ``decode_codes``."""
    images: list[Image.Image] = [None] * len(grids)  # type: ignore[list-item]
    for batch in _same_shape_batches([np.shape(g) for g in grids], batch_size):
        codes = torch.from_numpy(np.stack([np.asarray(grids[i], dtype=np.int64) for i in batch])).to(vq.device)
        for i, img in zip(batch, to_images(decode_codes(vq, codes, compile))):
            images[i] = img
    return images


# ------------------------------------------------------------------------------------------ objective


def latents(vq: Emu3VQVAE, pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] → pre-quantisation latents z [B, T, C, h, w], exactly as ``Emu3VQVAE.encode`` computes
    them (a still image is repeated ``temporal_downsample_factor`` times along time; T = 1 after the encoder)."""
    video = pixels.to(vq.dtype).unsqueeze(1).repeat(1, vq.config.temporal_downsample_factor, 1, 1, 1)
    hidden = vq.encoder(video)  # [B, T, C, h, w]
    return vq.quant_conv(hidden.permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)


def autoencode(vq: Emu3VQVAE, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """encoder → quant_conv → nearest code → straight-through → post_quant_conv → decoder.

    Returns (video [B, T·tdf, 3, H, W], z [B, T, h, w, C], e = codebook[codes] same shape, codes [B, h, w]).
    The straight-through ``z + sg(e − z)`` equals ``e`` going forward, so the decoder sees what ``decode(codes)``
    gives it, while the reconstruction gradient reaches the encoder as if quantisation were the identity.
    """
    z = latents(vq, pixels)
    codes = vq.quantize(z)  # [B, T, h, w]: the class's own nearest-neighbour search, hence encode()'s codes
    z = z.permute(0, 1, 3, 4, 2)  # as Emu3VQVAEVectorQuantizer: channels last
    e = vq.quantize.embedding(codes)
    quant = (z + (e - z).detach()).permute(0, 4, 1, 2, 3)  # [B, C, T, h, w], as decode() builds it
    post_quant = vq.post_quant_conv(quant)
    video = vq.decoder(post_quant.permute(0, 2, 1, 3, 4), quant.permute(0, 2, 1, 3, 4))
    batch, temporal, height, width = codes.shape
    video = video.reshape(batch, temporal * vq.config.temporal_downsample_factor, vq.config.out_channels,
                          height * vq.spatial_scale_factor, width * vq.spatial_scale_factor)
    return video, z, e, codes.squeeze(1)


def vq_loss(vq: Emu3VQVAE, pixels: torch.Tensor, commitment_cost: float = 0.25) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
    """The VQ-VAE objective (van den Oord et al. 2017): reconstruction + ||sg(z) − e||² + β·||z − sg(e)||².

    The codebook term pulls the chosen codes towards the encoder outputs, the commitment term keeps the encoder
    from drifting away from its codes. Reconstruction is MSE + L1 over every decoded frame (the input is the
    image repeated along time, so is the target): MSE fits colours fast, L1 keeps flat regions and edges crisp.
    Returns (loss, float metrics, codes [B, h, w], latents z [B, T, h, w, C]).
    """
    video, z, e, codes = autoencode(vq, pixels)
    target = pixels.to(video.dtype).unsqueeze(1).expand_as(video)
    mse, l1 = F.mse_loss(video, target), F.l1_loss(video, target)
    codebook, commitment = F.mse_loss(e, z.detach()), F.mse_loss(z, e.detach())
    loss = mse + l1 + codebook + commitment_cost * commitment
    metrics = {"loss": loss.item(), "mse": mse.item(), "l1": l1.item(), "codebook": codebook.item(),
               "commitment": commitment.item(), **usage(codes, vq.config.codebook_size)}
    return loss, metrics, codes, z


def unchanged_cells(source: torch.Tensor, target: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, h, w] mask of the ``factor``-px tiles whose pixels an edit left exactly as they were."""
    same = (source == target).all(dim=1).float()  # [B, H, W]
    return F.avg_pool2d(same.unsqueeze(1), factor).squeeze(1) == 1.0


def usage(codes: torch.Tensor, codebook_size: int) -> dict:
    """Codebook usage of a batch: codes used, and perplexity exp(H) (= codebook size when all are equally used)."""
    p = torch.bincount(codes.flatten(), minlength=codebook_size).double() / codes.numel()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"used": int((p > 0).sum()), "perplexity": entropy.exp().item()}


# ------------------------------------------------------------------------------------------- training

WARMUP = 0.05  # fraction of steps with linear LR warm-up
MIN_LR = 0.1  # cosine decays to this fraction of cfg.lr


def lr_at(step: int, cfg) -> float:
    """Linear warm-up, then cosine decay to MIN_LR·lr: the end of training settles the codes encode() returns."""
    warmup = max(1, round(WARMUP * cfg.steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (MIN_LR + (1 - MIN_LR) * 0.5 * (1 + math.cos(math.pi * progress)))


def kmeans_pp(points: torch.Tensor, centres: torch.Tensor, n: int, rng: np.random.Generator) -> torch.Tensor:
    """``n`` new centres drawn from ``points`` [N, C] by k-means++ D² sampling, given existing ``centres``.

    Each draw favours points far from every centre so far, so the codes spread over the latents actually
    produced, rare cells included (a uniform sample would spend most codes on background). Falls back to
    uniform when every point already coincides with a centre.
    """
    pts, centres = points.detach().double().cpu(), centres.detach().double().cpu()
    d2 = torch.cdist(pts, centres).min(dim=1).values ** 2 if len(centres) else torch.full((len(pts),), math.inf)
    chosen = []
    for _ in range(n):
        w = d2.numpy() if torch.isfinite(d2).all() and d2.sum() > 0 else np.ones(len(pts))
        i = int(rng.choice(len(pts), p=w / w.sum()))
        chosen.append(i)
        d2 = torch.minimum(d2, ((pts - pts[i]) ** 2).sum(dim=1))
    return points[chosen]


def _flat(z: torch.Tensor) -> torch.Tensor:
    """[B, T, C, h, w] latents → [B·T·h·w, C] vectors, the codebook's space."""
    return z.permute(0, 1, 3, 4, 2).reshape(-1, z.shape[2])


def train_vq(vq: Emu3VQVAE, pairs: list[tuple[Image.Image, Image.Image]], cfg,
             log: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Train ``vq`` in place on equal-size (source, target) image pairs of edits; returns one metrics dict per step.

    Both images of a pair are reconstructed (the pairs are what the VQ will tokenize).

    Trains in train mode (the temporal blocks' BatchNorm uses batch statistics) and leaves the model in eval
    mode, where ``encode``/``decode`` run and where ``vq_loss``'s codes are exactly ``encode``'s.

    ``cfg`` needs ``steps, batch_size`` (pairs), ``lr, seed, commitment_cost, dead_code_steps``. Deterministic on CPU for a
    given seed and initial weights: batch order comes from a numpy Generator (fresh permutation per epoch).

    Codebook collapse, the usual VQ failure (a few codes take every cell, the rest never get a gradient), is
    guarded against twice: at step 0 the codebook is k-means++-seeded from the encoder's latents of the first
    batch; every ``dead_code_steps`` steps the codes unused since the last check are re-seeded, by the same D²
    sampling, from the current batch's latents that the live codes represent worst.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    data = torch.stack([torch.stack([to_pixels(a), to_pixels(b)]) for a, b in pairs]).to(vq.device, vq.dtype)
    batch_size = min(cfg.batch_size, len(data))
    codebook = vq.quantize.embedding.weight
    # no weight decay: it would pull unused and rare codes towards 0, away from the latents they stand for.
    # foreach: on CPU torch's default is a loop over the ~100 small tensors, 13 % of a step; same updates bit for bit
    optimizer = torch.optim.AdamW(vq.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0, foreach=True)
    counts = torch.zeros(len(codebook), dtype=torch.long, device=codebook.device)  # use since the last check
    order, history = np.empty(0, dtype=np.int64), []
    vq.train()
    for step in range(cfg.steps):
        if len(order) < batch_size:
            order = rng.permutation(len(data))
        pair, order = data[torch.from_numpy(order[:batch_size])], order[batch_size:]
        batch = torch.cat([pair[:, 0], pair[:, 1]])  # sources, then targets
        reseeded = 0
        if step == 0:
            with torch.no_grad():
                codebook.copy_(kmeans_pp(_flat(latents(vq, batch)), codebook[:0], len(codebook), rng))
        elif step % cfg.dead_code_steps == 0:
            dead = (counts == 0).nonzero().flatten()
            if len(dead):
                with torch.no_grad():
                    codebook[dead] = kmeans_pp(_flat(latents(vq, batch)), codebook[counts > 0], len(dead), rng)
                reseeded = len(dead)
            counts.zero_()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, metrics, codes, _ = vq_loss(vq, batch, cfg.commitment_cost)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        counts += torch.bincount(codes.flatten(), minlength=len(counts))
        live = int((counts > 0).sum())  # codes used since the last dead-code check
        history.append({"step": step, "lr": lr, "reseeded": reseeded, "live": live, **metrics})
        if log is not None:
            log(step, history[-1])
    vq.eval()
    return history


def cell_patches(img: Image.Image, factor: int) -> np.ndarray:
    """The exact pixels of each code's ``factor × factor`` cell, as bytes: a [rows, cols] object array."""
    a = np.asarray(img.convert("RGB"))
    rows, cols = grid_shape(img.width, img.height, factor)
    cells = a[: rows * factor, : cols * factor].reshape(rows, factor, cols, factor, 3).swapaxes(1, 2)
    patches = np.empty((rows, cols), dtype=object)
    for r in range(rows):
        for c in range(cols):
            patches[r, c] = cells[r, c].tobytes()
    return patches


def cell_code_counts(codes: list[np.ndarray], patches: list[np.ndarray]) -> Counter:
    """How often each (code, exact cell patch) pair occurs, over images' code grids and their
    :func:`cell_patches`: the joint counts behind merging and H(code | cell)."""
    return Counter((int(code), patch) for grid, cells in zip(codes, patches) for code, patch in zip(grid.flat, cells.flat))


def cell_latents(vq: Emu3VQVAE, images: list[Image.Image], batch_size: int = 64) -> list[torch.Tensor]:
    """Each image's pre-quantisation latents as [rows·cols, C], cells in reading order (as :func:`cell_patches`)."""
    out: list[torch.Tensor] = [None] * len(images)  # type: ignore[list-item]
    with torch.no_grad():
        for batch in _same_shape_batches([img.size for img in images], batch_size):
            for i, z in zip(batch, latents(vq, pixel_batch([images[i] for i in batch], vq.device))):
                out[i] = _flat(z[None])
    return out


def merge_synonyms(vq: Emu3VQVAE, images: list[Image.Image], max_rounds: int = 20) -> tuple[dict, list[np.ndarray]]:
    """One code per distinct cell: retire the codes that stand for the same pixels as a more used code, and move
    each survivor to the mean latent of the cells it stands for.

    The encoder's mid-block attention and GroupNorm see the whole image, so the latent of a cell drifts with
    what else is in the picture, and dead-code re-seeding hands the spare codes to that drift: a trained default
    VQ spent ~60-75 codes on each empty background and re-coded half of the cells an edit left untouched, which
    turns a one-object edit into a rewrite of the whole grid for the model that learns it. Here each code's
    cells in ``images`` vote for the exact pixel patch it stands for (its most frequent one); among codes that
    stand for the same patch the most used one stays, and every other code is moved far outside the latents, so
    ``encode``'s nearest-code search gives their cells to the survivors. Each survivor then moves to the mean
    latent of all cells showing its patch (a k-means step whose clusters are the distinct patches), which gives it
    the drifted cells that sat nearer another code: in the default VQ that took the cells coded as another
    object from 0.17 % to 0.05 % and the objects kept by decode(encode()) from 99.2 % to 100 % on S (RESULTS.md).
    Repeated until the codes settle. Label-free (pixels only) and in place. Returns the facts for the manifest
    and the codes ``encode`` now gives ``images`` (the last round's, which :func:`sharpen_encoder` starts from).
    """
    patches = [cell_patches(img, vq.spatial_scale_factor) for img in images]  # fixed: computed once, used every round
    cells_of: dict[bytes, list[int]] = {}  # patch -> its cells' rows in z (a dict: numpy's bytes compare drops trailing NULs)
    for i, patch in enumerate(p for cells in patches for p in cells.flat):
        cells_of.setdefault(patch, []).append(i)
    z = torch.cat(cell_latents(vq, images))
    codebook = vq.quantize.embedding.weight
    first_used, retired, previous = None, set(), None
    for rounds in range(1, max_rounds + 1):
        grids = encode(vq, images)
        codes = np.concatenate([grid.ravel() for grid in grids])
        votes: dict[int, dict[bytes, int]] = {}
        for (code, patch), n in cell_code_counts(grids, patches).items():
            votes.setdefault(code, {})[patch] = n
        first_used = len(votes) if first_used is None else first_used
        if previous is not None and np.array_equal(codes, previous):
            break
        previous = codes
        survivor: dict[bytes, tuple[int, int]] = {}  # patch -> (uses, code) of its most used code
        for code, counts in votes.items():
            patch = max(counts, key=counts.get)
            survivor[patch] = max(survivor.get(patch, (0, -1)), (sum(counts.values()), code))
        keep = sorted(code for _, code in survivor.values())
        newly = sorted(set(range(len(codebook))) - set(keep) - retired)  # unused codes too: cells go to survivors only
        with torch.no_grad():
            codebook[newly] = RETIRED_SCALE * codebook[keep].abs().max()
            for patch, (_, code) in survivor.items():
                codebook[code] = z[cells_of[patch]].mean(0)
        retired.update(newly)
    else:  # out of rounds: the codes were moved after the last encode
        grids = encode(vq, images)
    return {"codes_used": first_used, "codes_kept": len(votes), "rounds": rounds}, grids


RETIRED_SCALE = 1e3  # retired codes sit this many codebook radii away: never the nearest code of any latent


def patch_codes(vq: Emu3VQVAE, images: list[Image.Image], grids: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Each cell's code by its pixels: the code that cells showing the same exact patch get most often.

    After :func:`merge_synonyms` this is the one code per distinct cell that ``encode`` gives all but a few cells.
    """
    grids = encode(vq, images) if grids is None else grids
    patches = [cell_patches(img, vq.spatial_scale_factor) for img in images]
    best: dict[bytes, tuple[int, int]] = {}  # patch -> (count, code)
    for (code, patch), n in cell_code_counts(grids, patches).items():
        best[patch] = max(best.get(patch, (0, -1)), (n, code))
    return [np.vectorize(lambda patch: best[patch][1], otypes=[np.int64])(cells) for cells in patches]


def sharpen_encoder(vq: Emu3VQVAE, images: list[Image.Image], cfg, seed: int,
                    grids: list[np.ndarray] | None = None) -> dict:
    """Fine-tune the encoder until each cell's latent is nearest the code of its pixels; codebook and decoder fixed.

    After :func:`merge_synonyms` the decoder renders every cell exactly from its patch's code, but the encoder's
    whole-image attention and GroupNorm still push a few cells nearer another code, depending on what else is in
    the picture: 0.1 % of the default world's cells, each one an object decoded as another shape. Here the
    encoder (and ``quant_conv``) learn to classify each cell's latent as its :func:`patch_codes` code, by
    cross-entropy over ``-d² / τ`` to the codes in use. τ is a small fraction (``cfg.temperature``) of their
    median squared spacing, so cells well inside their code's region add nothing and the near misses drive the
    update (at τ = 0.2 of the spacing, the soft probabilities of every cell pulled the shared encoder around and
    the errors grew 4-13-fold: benchmarks/RESULTS.md). Eval mode throughout, so normalisation behaves as in
    ``encode``. ``cfg`` needs ``steps, images_per_step, lr, temperature, shuffle_cells`` (the fraction of each step's
    images shown through :func:`shuffle_cells`); ``grids``: ``images``' codes now, when the caller has them
    (:func:`merge_synonyms` does). Returns the cells of ``images`` coded as another
    patch's code before and after.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator(vq.device).manual_seed(seed)
    grids = encode(vq, images) if grids is None else grids
    targets = patch_codes(vq, images, grids)
    in_use = sorted({int(code) for grid in targets for code in grid.flat})
    index = np.full(len(vq.quantize.embedding.weight), -1)
    index[in_use] = np.arange(len(in_use))
    labels = torch.from_numpy(np.stack([index[t] for t in targets])).to(vq.device)  # [N, h, w]: rows of `codes`
    pixels = torch.stack([to_pixels(img) for img in images]).to(vq.device, vq.dtype)
    codes = vq.quantize.embedding.weight.detach()[in_use]  # [K, C], fixed
    spacing = torch.cdist(codes, codes).square()
    tau = cfg.temperature * spacing[spacing > 0].median()
    optimizer = torch.optim.AdamW([*vq.encoder.parameters(), *vq.quant_conv.parameters()], lr=cfg.lr, weight_decay=0.0,
                                  foreach=True)  # as train_vq's
    vq.eval()
    order = np.empty(0, dtype=np.int64)
    for _ in range(cfg.steps):
        if len(order) < cfg.images_per_step:
            order = rng.permutation(len(pixels))
        batch, order = torch.from_numpy(order[: cfg.images_per_step]).to(vq.device), order[cfg.images_per_step:]
        x, y = shuffle_cells(pixels[batch], labels[batch], round(cfg.shuffle_cells * len(batch)), generator)
        z = _flat(latents(vq, x))  # [B·h·w, C], cells in reading order like y
        loss = F.cross_entropy(-torch.cdist(z, codes).square() / tau, y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    before, after = (sum(int((g != t).sum()) for g, t in zip(codes_of, targets)) for codes_of in (grids, encode(vq, images)))
    return {"cells": int(labels.numel()), "miscoded_before": before, "miscoded_after": after}


def shuffle_cells(pixels: torch.Tensor, labels: torch.Tensor, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` images, each with its own cells in a random order; each cell's label moves with it.

    The encoder sees beyond a cell (3×3 convolutions, the mid-block attention), so a patch it codes right in every
    training picture can still get another code in an arrangement the data never had: the default world lost
    one validation object that way (benchmarks/RESULTS.md). A shuffled image keeps its background and objects
    and shows each patch beside new neighbours and at new places. Shuffling cells across images instead (mixed
    backgrounds) left 206 training cells miscoded, against 8 without shuffling and 25 with this.
    """
    if count == 0:
        return pixels, labels
    n, channels, height, width = pixels[:count].shape
    rows, cols = labels.shape[1:]
    f = height // rows
    if (height, width) != (rows * f, cols * f):
        raise ValueError(f"shuffle_cells: {height}x{width}-pixel images are not whole {rows}x{cols} grids of cells")
    cells = pixels[:count].reshape(n, channels, rows, f, cols, f).permute(0, 2, 4, 1, 3, 5).reshape(n, rows * cols, channels, f, f)
    order = torch.stack([torch.randperm(rows * cols, generator=generator, device=cells.device) for _ in range(n)])
    shuffled = cells[torch.arange(n, device=cells.device)[:, None], order]
    shuffled = shuffled.reshape(n, rows, cols, channels, f, f).permute(0, 3, 1, 4, 2, 5).reshape(n, channels, height, width)
    moved = labels[:count].reshape(n, rows * cols).gather(1, order).reshape(n, rows, cols)
    return torch.cat([shuffled, pixels[count:]]), torch.cat([moved, labels[count:]])


# ----------------------------------------------------------------------------------------------- step
# python -m earl.vq --config config/config.yaml --out results/vq/<kind>-<hash>


def split_pairs(config, name: str, split: str) -> list[tuple[Image.Image, Image.Image]]:
    """(source, target) images of one dataset split, resized to the dataset's area as tokenize will."""
    from earl.sources import DataError, load_split, open_image

    dataset = config.datasets[name]
    columns = (dataset.columns.source_image, dataset.columns.target_image)
    if columns[1] is None:
        raise DataError(f"vq: dataset {name!r} has no target_image column; VQ training needs edit pairs")
    data = load_split(config, name, split).select_columns(list(columns))
    return [
        tuple(
            resize_to_area(open_image(row[c], f"dataset {name!r} split {split!r} row {i} column {c!r}"), dataset.image_area)
            for c in columns
        )
        for i, row in enumerate(data)
    ]


def recoded_fraction(vq: Emu3VQVAE, pairs: list[tuple[Image.Image, Image.Image]], codes: list[np.ndarray] | None = None) -> float:
    """Share of the cells an edit left untouched whose code nevertheless changed (0 for a perfectly local VQ).

    ``codes``: the pairs' codes, source and target interleaved as ``encode`` returns them for the flattened
    pairs, when the caller has them already.
    """
    codes = encode(vq, [img for pair in pairs for img in pair]) if codes is None else codes
    sources, targets = codes[0::2], codes[1::2]
    recoded = total = 0
    for (a, b), ca, cb in zip(pairs, sources, targets):
        mask = unchanged_cells(to_pixels(a)[None], to_pixels(b)[None], vq.spatial_scale_factor)[0].numpy()
        recoded, total = recoded + int((ca != cb)[mask].sum()), total + int(mask.sum())
    return recoded / max(1, total)


def object_report(vq: Emu3VQVAE, pairs: list[tuple[Image.Image, Image.Image]], world) -> dict:
    """How well decode(encode(image)) keeps each object of a generated ``shapes`` dataset, and how local edits stay.

    Reconstructions are parsed back into scenes (:func:`earl.shapes.parse`) and compared with the parse of the
    originals (which equals the generator's scene exactly): per object, is it still there with its colour and
    shape; per image, the background and the whole scene. ``unchanged_cells_recoded`` is
    :func:`recoded_fraction` over the edit pairs, ``code_bits_per_cell`` :func:`code_entropy`.
    """
    images = [img for pair in pairs for img in pair]
    codes = encode(vq, images)
    decoded = decode(vq, codes)
    truth = [shapes.parse(img, world) for img in images]
    recon = [shapes.parse(img, world) for img in decoded]
    kept = [(o, r.at(*o.cell)) for t, r in zip(truth, recon) for o in t.objects]
    n = max(1, len(kept))
    return {
        "images": len(images),
        "objects": len(kept),
        "object_kept": sum(got == o for o, got in kept) / n,
        "colour_kept": sum(got is not None and got.color == o.color for o, got in kept) / n,
        "shape_kept": sum(got is not None and got.shape == o.shape for o, got in kept) / n,
        "background_kept": sum(t.background == r.background for t, r in zip(truth, recon)) / len(images),
        "scene_exact": sum(t == r for t, r in zip(truth, recon)) / len(images),
        "mean_abs_error": float(np.mean([np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean()
                                         for a, b in zip(images, decoded)])),
        "unchanged_cells_recoded": recoded_fraction(vq, pairs, codes),
        "code_bits_per_cell": code_entropy(images, codes, vq.spatial_scale_factor),
    }


def code_entropy(images: list[Image.Image], codes: list[np.ndarray], factor: int) -> float:
    """H(code | cell pixels) in bits: 0 when every distinct cell always gets the same code (what the LM wants)."""
    by_patch: dict[bytes, dict[int, int]] = {}
    for (code, patch), n in cell_code_counts(codes, [cell_patches(img, factor) for img in images]).items():
        by_patch.setdefault(patch, {})[code] = n
    total = sum(sum(c.values()) for c in by_patch.values())
    return -sum(n * math.log2(n / sum(c.values())) for c in by_patch.values() for n in c.values()) / max(1, total)


def build(config, out) -> None:
    from earl import artifacts
    from earl.models import fingerprint

    spec = config.vq
    paths = artifacts.Paths(config)
    with artifacts.artifact_dir(out) as work:
        facts = {}
        if spec.kind == "pretrained":
            vq = Emu3VQVAE.from_pretrained(spec.path, revision=spec.revision)
            inputs = []
        else:
            torch.set_num_threads(spec.threads)
            torch.manual_seed(spec.seed)
            model = spec.model.model_dump()
            vq = Emu3VQVAE(Emu3VQVAEConfig(**model, hidden_size=model["base_channels"] * model["channel_multiplier"][-1]))
            pairs = [pair for name in spec.datasets for pair in split_pairs(config, name, spec.split)]
            with tqdm(total=spec.steps, desc="train vq", unit="step", mininterval=5) as bar:
                history = train_vq(vq, pairs, spec, log=lambda step, m: bar.update() or bar.set_postfix(
                    loss=f"{m['loss']:.4f}", used=m["used"], refresh=False))
            images = [img for pair in pairs for img in pair]
            if spec.merge_synonyms:
                facts["synonyms"], grids = merge_synonyms(vq, images)
            if spec.sharpen is not None:  # config: only after merge_synonyms
                facts["sharpen"] = sharpen_encoder(vq, images, spec.sharpen, spec.seed, grids)
            with artifacts.atomic_file(work / "history.csv") as tmp, open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(history[0]))
                writer.writeheader()
                writer.writerows(history)
            facts["final"] = history[-1]
            facts["reconstruction"] = {
                name: object_report(vq, split_pairs(config, name, spec.report_split), config.datasets[name].source)
                for name in spec.datasets
                if config.datasets[name].source.kind == "shapes" and spec.report_split in config.datasets[name].splits
            }
            inputs = paths.generated(spec.datasets)
        vq.save_pretrained(work)
        artifacts.write_manifest(work, step="vq", config=spec, inputs=inputs, fingerprint=fingerprint(vq),
                                 codebook_size=vq.config.codebook_size, **facts)


def main(argv: list[str] | None = None) -> None:
    from earl.cli_util import run_step

    run_step(argparse.ArgumentParser(prog="python -m earl.vq", description=__doc__), build, argv)


if __name__ == "__main__":
    main()
