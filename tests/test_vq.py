"""earl.vq: Emu3's resize rule, pixel conversion, encode/decode helpers, and the VQ-VAE training objective."""

from __future__ import annotations

import types
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Emu3VQVAE, Emu3VQVAEConfig

from earl import vq as V


def tiny_vq(seed=0, codebook_size=16, num_res_blocks=0, temporal_downsample_factor=1) -> Emu3VQVAE:
    """A few-hundred-k-parameter Emu3VQVAE with the real one's 8× downsampling."""
    torch.manual_seed(seed)
    config = Emu3VQVAEConfig(
        codebook_size=codebook_size, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 1, 1, 1],
        num_res_blocks=num_res_blocks, attn_resolutions=[], hidden_size=32,
        temporal_downsample_factor=temporal_downsample_factor,
    )
    return Emu3VQVAE(config)


def shapes_images(n, size=32, seed=0) -> list[Image.Image]:
    """Flat backgrounds with a few flat-colour squares, each inside one 8×8 cell."""
    rng = np.random.default_rng(seed)
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 255, 255], [0, 0, 0], [128] * 3])
    images = []
    for _ in range(n):
        a = np.broadcast_to(palette[rng.integers(4, 7)], (size, size, 3)).copy()
        for cell in rng.choice((size // 8) ** 2, 3, replace=False):
            r, c = divmod(int(cell), size // 8)
            a[r * 8 + 1 : r * 8 + 7, c * 8 + 1 : c * 8 + 7] = palette[rng.integers(4)]
        images.append(Image.fromarray(a.astype(np.uint8)))
    return images


def edit_pairs(n, size=32, seed=0) -> list[tuple[Image.Image, Image.Image]]:
    """(source, target) pairs: the target is the source with one cell repainted, the rest untouched."""
    pairs = []
    for k, img in enumerate(shapes_images(n, size, seed)):
        a = np.asarray(img).copy()
        r, c = divmod(k % ((size // 8) ** 2), size // 8)
        a[r * 8 + 2 : r * 8 + 6, c * 8 + 2 : c * 8 + 6] = (255, 0, 255)
        pairs.append((img, Image.fromarray(a)))
    return pairs


def cfg(**overrides):
    """The attributes train_vq reads (the pipeline passes its ``config.vq``)."""
    values = dict(steps=30, batch_size=4, lr=3e-3, seed=0, commitment_cost=0.25, dead_code_steps=5)
    return types.SimpleNamespace(**{**values, **overrides})


# ------------------------------------------------------------------------------------------ pixels


@pytest.mark.parametrize(
    "size, area, resized, grid",
    [((512, 512), 65536, (256, 256), (32, 32)), ((1024, 768), 65536, (296, 222), (27, 37)), ((64, 64), 4096, (64, 64), (8, 8))],
)
def test_resize_to_area_and_grid_shape(size, area, resized, grid):
    img = Image.new("RGB", size, (10, 20, 30))
    out = V.resize_to_area(img, area)
    assert out.size == resized  # PIL sizes are (width, height)
    assert V.grid_shape(*out.size) == grid


def test_resize_at_its_own_area_is_identity():
    img = shapes_images(1, size=64)[0]
    assert np.array_equal(np.asarray(V.resize_to_area(img, 64 * 64)), np.asarray(img))


def test_grid_shape_is_what_the_encoder_produces():
    vq = tiny_vq()
    (codes,) = V.encode(vq, [V.resize_to_area(Image.new("RGB", (1024, 768)), 296 * 222)])
    assert codes.shape == V.grid_shape(296, 222) == (27, 37)


def test_pixels_round_trip_exactly():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))
    pixels = V.to_pixels(img)
    assert pixels.shape == (3, 16, 24) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert np.array_equal(np.asarray(V.to_image(pixels)), np.asarray(img))
    assert V.to_pixels(Image.new("RGB", (1, 1), (0, 255, 128))).flatten().tolist() == pytest.approx([-1, 1, 1 / 255], abs=1e-6)


def test_to_image_clips():
    assert np.asarray(V.to_image(torch.tensor([-3.0, 3.0, 0.0]).view(3, 1, 1))).tolist() == [[[0, 255, 128]]]


# ------------------------------------------------------------------------------------------- codes


def test_encode_and_decode_helpers_equal_the_class_methods():
    vq = tiny_vq()
    images = shapes_images(3, size=32) + shapes_images(2, size=16, seed=1) + shapes_images(1, size=32, seed=2)
    grids = V.encode(vq, images, batch_size=2)
    for img, grid in zip(images, grids):
        pixels = V.to_pixels(img)[None]
        (expected,) = vq.encode(pixels, image_sizes=torch.tensor([pixels.shape[-2:]])).image_tokens
        assert grid.dtype == np.int64 and np.array_equal(grid, expected.numpy())
    decoded = V.decode(vq, grids, batch_size=2)
    for grid, img in zip(grids, decoded):
        assert img.size == (8 * grid.shape[1], 8 * grid.shape[0])
        with torch.no_grad():
            expected = V.to_image(vq.decode(torch.from_numpy(grid)[None])[0])
        assert np.array_equal(np.asarray(img), np.asarray(expected))


def full_tiny_vq(temporal_downsample_factor: int, seed: int = 0) -> Emu3VQVAE:
    """A tiny Emu3VQVAE with every part of the real one's computation: temporal down/upsampling and temporal res
    blocks (BatchNorm with moved running statistics), mid-block attention, 64 codes."""
    torch.manual_seed(seed)
    vq = Emu3VQVAE(Emu3VQVAEConfig(
        codebook_size=64, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 1, 1, 1],
        num_res_blocks=1, attn_resolutions=[3], hidden_size=32, temporal_downsample_factor=temporal_downsample_factor,
    )).eval()
    for module in vq.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return vq


@pytest.mark.parametrize("temporal_downsample_factor", [1, 2, 4])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fast_encode_gives_the_codes_of_the_class(temporal_downsample_factor, memory_format):
    """The 2D stack once per image instead of once per repeated frame: exactly encode()'s codes."""
    vq = full_tiny_vq(temporal_downsample_factor)
    for height, width in [(32, 32), (24, 40), (30, 21)]:
        pixels = torch.rand(4, 3, height, width) * 2 - 1
        with torch.no_grad():
            expected = torch.stack(vq.encode(pixels, image_sizes=torch.tensor([[height, width]] * 4)).image_tokens)
            codes = V.encode_pixels(vq, pixels, memory_format=memory_format)
        assert codes.dtype == torch.int64 and codes.shape == (4, height // 8, width // 8)
        assert torch.equal(codes, expected)
        assert len(codes.unique()) > 4  # not a degenerate model that maps everything to one code


@pytest.mark.parametrize("temporal_downsample_factor", [1, 2, 4])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fast_decode_gives_the_pixels_of_the_class(temporal_downsample_factor, memory_format):
    """The 2D stack on frame 0 alone, the frame decode() returns for an image: decode()'s pixels up to rounding."""
    vq = full_tiny_vq(temporal_downsample_factor, seed=1)
    codes = torch.randint(0, 64, (3, 4, 5))
    with torch.no_grad():
        expected = vq.decode(codes)
        pixels = V.decode_codes(vq, codes, memory_format=memory_format)
    assert pixels.shape == expected.shape == (3, 3, 32, 40)
    assert (pixels - expected).norm() / expected.norm() < 1e-5
    assert torch.allclose(pixels, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_encode_and_decode_helpers_equal_the_class_with_temporal_layers():
    """earl.vq.encode/decode (PIL in and out, batched by size) against the class, temporal factor 4."""
    vq = full_tiny_vq(4, seed=2)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(32, 32)] * 3 + [(24, 40)] * 2]
    grids = V.encode(vq, images, batch_size=2)
    decoded = V.decode(vq, grids, batch_size=2)
    for img, grid, out in zip(images, grids, decoded):
        pixels = V.to_pixels(img)[None]
        with torch.no_grad():
            (expected,) = vq.encode(pixels, image_sizes=torch.tensor([pixels.shape[-2:]])).image_tokens
            reference = np.asarray(V.to_image(vq.decode(torch.from_numpy(grid)[None])[0]), dtype=np.int16)
        assert grid.dtype == np.int64 and np.array_equal(grid, expected.numpy())
        assert np.abs(np.asarray(out, dtype=np.int16) - reference).max() <= 1  # a rounding step at most


def test_pixel_batch_is_to_pixels_exactly():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)) for _ in range(3)] + [Image.new("L", (10, 6), 7)]
    batch = V.pixel_batch(images, "cpu")
    assert batch.dtype == torch.float32 and batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.stack([V.to_pixels(img) for img in images]))


def test_to_images_is_to_image_of_each():
    pixels = torch.rand(3, 3, 5, 7) * 2.4 - 1.2
    assert [np.asarray(a).tolist() for a in V.to_images(pixels)] == [np.asarray(V.to_image(p)).tolist() for p in pixels]


def test_png_bytes_are_the_files_pil_writes_whatever_the_threads(tmp_path):
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (16 + i, 24, 3), dtype=np.uint8)) for i in range(5)]
    serial, threaded = V.png_bytes(images), V.png_bytes(images, threads=3)
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
        assert serial[i] == threaded[i] == (tmp_path / f"{i}.png").read_bytes()
    assert V.png_bytes([]) == []
    V.write_pngs({tmp_path / f"w{i}.png": image for i, image in enumerate(images)}, threads=2)
    assert [(tmp_path / f"w{i}.png").read_bytes() for i in range(5)] == serial


# --------------------------------------------------------------------------------------- objective


@pytest.mark.parametrize("temporal_downsample_factor", [1, 4])
def test_vq_loss_codes_and_reconstruction_are_encode_and_decode(temporal_downsample_factor):
    """After some training (codebook re-seeded, BatchNorm statistics moved), in eval mode the objective's codes
    are encode()'s and its straight-through reconstruction is decode(codes)."""
    vq = tiny_vq(num_res_blocks=1, temporal_downsample_factor=temporal_downsample_factor)
    V.train_vq(vq, edit_pairs(8, size=16), cfg(steps=6, batch_size=2, dead_code_steps=2))
    assert not vq.training
    pixels = torch.rand(3, 3, 24, 40) * 2 - 1
    with torch.no_grad():
        _, metrics, codes, _ = V.vq_loss(vq, pixels)
        expected = vq.encode(pixels, image_sizes=torch.tensor([[24, 40]] * 3)).image_tokens
        video, _, _, _ = V.autoencode(vq, pixels)
        decoded = vq.decode(codes)
    assert codes.shape == (3, 3, 5)
    assert torch.equal(codes, torch.stack(expected))
    assert torch.allclose(video[:, 0], decoded, atol=1e-5)
    assert metrics["used"] == len(codes.unique())


def test_kmeans_pp_spreads_over_clusters():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    points = (centres[:, None] + 0.01 * torch.randn(4, 50, 2)).reshape(-1, 2)
    picked = V.kmeans_pp(points, centres[:0], 4, np.random.default_rng(0))
    assert sorted(torch.cdist(picked, centres).argmin(dim=1).tolist()) == [0, 1, 2, 3]
    extra = V.kmeans_pp(points, centres[:3], 1, np.random.default_rng(0))  # the one cluster not yet covered
    assert torch.cdist(extra, centres).argmin().item() == 3


# ---------------------------------------------------------------------------------------- training


def test_training_lowers_the_loss_and_is_deterministic():
    pairs = edit_pairs(8)
    runs = []
    for _ in range(2):
        vq = tiny_vq(seed=1)
        history = V.train_vq(vq, pairs, cfg(steps=30))
        runs.append((vq.state_dict(), history))
    (weights, history), (weights2, history2) = runs
    assert len(history) == 30 and {"loss", "mse", "codebook", "commitment", "used", "perplexity", "live"} <= history[0].keys()
    assert np.mean([h["loss"] for h in history[-5:]]) < 0.5 * np.mean([h["loss"] for h in history[:5]])
    assert history == history2
    assert all(torch.equal(weights[k], weights2[k]) for k in weights)


def test_dead_code_reseeding_keeps_more_codes_in_use():
    """At a high LR many codes fall out of use; re-seeding them from current latents brings them back."""
    pairs = edit_pairs(8)
    images = [img for pair in pairs for img in pair]
    used, reseeded = {}, {}
    for dead_code_steps in (5, 10**9):  # 10**9: never checked, never re-seeded
        vq = tiny_vq(seed=1, codebook_size=32)
        history = V.train_vq(vq, pairs, cfg(steps=30, lr=1e-2, dead_code_steps=dead_code_steps))
        used[dead_code_steps] = len(np.unique(np.concatenate([g.ravel() for g in V.encode(vq, images)])))
        reseeded[dead_code_steps] = sum(h["reseeded"] for h in history)
    assert reseeded[5] > 0 and reseeded[10**9] == 0
    assert used[5] > used[10**9] > 1


def test_unchanged_cells():
    source, target = (V.to_pixels(img)[None] for img in edit_pairs(1)[0])
    mask = V.unchanged_cells(source, target, 8)[0]
    assert mask.shape == (4, 4) and not mask[0, 0] and mask.sum() == 15  # only the repainted cell changed


def test_recoded_fraction_is_zero_for_identical_pairs_only():
    vq = tiny_vq(seed=2)
    pairs = edit_pairs(4)
    assert V.recoded_fraction(vq, [(a, a) for a, _ in pairs]) == 0.0
    assert 0.0 <= V.recoded_fraction(vq, pairs) <= 1.0


def code_votes(vq, images) -> dict[int, Counter]:
    """For each code, how often ``encode`` gave it to each exact cell patch."""
    votes: dict[int, Counter] = {}
    for (code, patch), n in V.cell_code_counts(V.encode(vq, images), [V.cell_patches(img, 8) for img in images]).items():
        votes.setdefault(code, Counter())[patch] = n
    return votes


def test_code_entropy_counts_codes_per_distinct_cell():
    red, blue = (np.full((8, 16, 3), c, np.uint8) for c in ((255, 0, 0), (0, 0, 255)))
    images = [Image.fromarray(red), Image.fromarray(red), Image.fromarray(blue)]  # 1x2 grids of one colour each
    same = [np.array([[3, 3]]), np.array([[3, 3]]), np.array([[5, 5]])]
    split = [np.array([[3, 3]]), np.array([[4, 4]]), np.array([[5, 5]])]  # red cells: codes 3 and 4, half each
    assert V.code_entropy(images, same, 8) == 0.0
    assert V.code_entropy(images, split, 8) == pytest.approx(4 / 6)  # 4 of 6 cells carry 1 bit


def test_merge_synonyms_centres_black_cells_too():
    # a black cell's bytes end in NULs, which numpy's bytes comparison drops: the grouping must not depend on it
    vq = tiny_vq(codebook_size=64)
    images = [Image.fromarray(np.full((16, 16, 3), value, np.uint8)) for value in (0, 255) for _ in range(4)]
    V.merge_synonyms(vq, images)
    codebook = vq.quantize.embedding.weight.detach()
    assert torch.isfinite(codebook).all()
    patches = [p for img in images for p in V.cell_patches(img, 8).flat]
    latents = torch.cat(V.cell_latents(vq, images))
    majority = {code: counts.most_common(1)[0][0] for code, counts in code_votes(vq, images).items()}
    assert any(patch.endswith(b"\x00") for patch in majority.values())
    for code, patch in majority.items():
        assert torch.allclose(codebook[code], latents[[i for i, p in enumerate(patches) if p == patch]].mean(0), atol=1e-5)


def test_merge_synonyms_leaves_one_code_per_patch():
    vq, images = tiny_vq(codebook_size=64), shapes_images(40, size=48)
    before = code_votes(vq, images)
    entropy_before = V.code_entropy(images, V.encode(vq, images), 8)
    majority = [counts.most_common(1)[0][0] for counts in before.values()]
    assert len(set(majority)) < len(majority)  # the encoder sees the whole image: equal cells get several codes
    facts, grids = V.merge_synonyms(vq, images)
    assert all(np.array_equal(a, b) for a, b in zip(grids, V.encode(vq, images), strict=True))  # the codes now
    after = code_votes(vq, images)
    majority = [counts.most_common(1)[0][0] for counts in after.values()]
    assert len(set(majority)) == len(majority)  # no two codes left standing for the same patch
    assert V.code_entropy(images, V.encode(vq, images), 8) < 0.5 * entropy_before
    assert facts["codes_used"] == len(before) and facts["codes_kept"] == len(after) and set(after) < set(before)
    # a fixed point: a second merge re-encodes once, finds the same codes and stops
    assert V.merge_synonyms(vq, images)[0] == {**facts, "codes_used": len(after), "rounds": 2}


def test_merge_synonyms_out_of_rounds_returns_the_codes_after_its_last_move():
    vq, images = tiny_vq(codebook_size=64), shapes_images(20, size=48)
    before = V.encode(vq, images)
    facts, grids = V.merge_synonyms(vq, images, max_rounds=1)
    now = V.encode(vq, images)
    assert facts["rounds"] == 1 and any(not np.array_equal(a, b) for a, b in zip(before, now))  # the round moved codes
    assert all(np.array_equal(a, b) for a, b in zip(grids, now, strict=True))


def test_sharpening_teaches_the_encoder_each_cells_merged_code_and_leaves_the_codes_and_decoder_alone():
    vq, images = tiny_vq(codebook_size=64), shapes_images(40, size=48)
    _, grids = V.merge_synonyms(vq, images)
    targets = V.patch_codes(vq, images)
    fixed = {name: p.detach().clone() for name, p in vq.named_parameters() if not name.startswith(("encoder.", "quant_conv."))}
    facts = V.sharpen_encoder(vq, images, types.SimpleNamespace(steps=40, images_per_step=16, lr=1e-3, temperature=0.01, shuffle_cells=0.0), seed=0,
                              grids=grids)
    miscoded = sum(int((g != t).sum()) for g, t in zip(V.encode(vq, images), targets))
    assert facts["cells"] == 40 * 36 and facts["miscoded_after"] == miscoded
    assert facts["miscoded_before"] > 100 and miscoded == 0  # an untrained encoder, merged: many cells, then none
    for name, p in vq.named_parameters():
        if name in fixed:
            assert torch.equal(p, fixed[name]), name  # the decoder still renders each code as it did


def test_shuffle_cells_reorders_each_images_own_cells_with_their_labels():
    pixels, rows, cols = torch.randn(4, 3, 24, 32), 3, 4
    labels = torch.arange(4 * rows * cols).reshape(4, rows, cols)  # each cell's own id: where it came from
    x, y = V.shuffle_cells(pixels, labels, 3, torch.Generator().manual_seed(0))
    cells = lambda t: t.reshape(len(t), 3, rows, 8, cols, 8).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, 8, 8)  # noqa: E731
    assert torch.equal(cells(x), cells(pixels)[y.flatten()])  # every cell's label moved with its pixels
    for i in range(3):  # a permutation of the image's own cells, not the identity
        assert sorted(y[i].flatten().tolist()) == sorted(labels[i].flatten().tolist()) and not torch.equal(y[i], labels[i])
    assert torch.equal(x[3], pixels[3]) and torch.equal(y[3], labels[3])  # past `count`: untouched
    same = V.shuffle_cells(pixels, labels, 0, torch.Generator())
    assert same[0] is pixels and same[1] is labels
    with pytest.raises(ValueError, match="not whole 3x4 grids"):
        V.shuffle_cells(pixels[:, :, :20], labels, 1, torch.Generator())  # 20 rows of pixels: no whole 8-px cells
