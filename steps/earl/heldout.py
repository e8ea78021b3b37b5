"""Held-out editing quality: generate edits for tokenized rows, decode them, score them, summarise per edit type.

One implementation serves the SFT step's quality check, GRPO's held-out reward and the evaluate step, so the
numbers in every manifest and table come from the same generation (:mod:`earl.engine`), decoding (the VQ) and
scoring (:mod:`earl.rewards`) code. The copy-the-source baseline is scored through the same path: it keeps
everything and performs no edit, so a model that edits must beat its overall score.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from earl import vq as vq_codec
from earl.engine import Rollouts
from earl.layout import Layout, MalformedImage
from earl.rewards import Score


@dataclass(frozen=True)
class Sample:
    """One scored edit (a row of the per-sample results)."""

    id: str
    edit_type: str
    well_formed: bool  # a parseable image block of the source's grid size, finished with EOS
    sc: float
    pq: float
    overall: float
    failed: bool  # the judge gave no usable answer (excluded from the means)
    # VIEScore's four answers (Table 7); None for the verifier, which measures SC and PQ directly
    edit_success: float | None = None
    overedit: float | None = None
    looks_natural: float | None = None
    no_artifact: float | None = None


def grid_or_reason(layout: Layout, rollouts: Rollouts, i: int, shape: tuple[int, int]) -> tuple[np.ndarray | None, str | None]:
    """Completion ``i``'s code grid and None, or None and why it is not a well-formed image of ``shape``."""
    try:
        grid = layout.parse_grid(rollouts.completion(i))
    except MalformedImage as error:
        return None, str(error)
    if grid.shape != tuple(shape):
        return None, f"image grid {grid.shape[0]}x{grid.shape[1]}, expected {shape[0]}x{shape[1]}"
    if not bool(rollouts.finished[i]):
        return None, "no EOS after the image block"
    return grid, None


def grids_of(layout: Layout, rollouts: Rollouts, shapes: list[tuple[int, int]]) -> list[np.ndarray | None]:
    """The code grid of each completion, or None where it is malformed, unfinished or of the wrong size."""
    return [grid_or_reason(layout, rollouts, i, shape)[0] for i, shape in enumerate(shapes)]


def decode_all(vq, grids: list[np.ndarray | None], batch_size: int = 64) -> list[Image.Image | None]:
    """VQ-decode the well-formed grids; None stays None."""
    present = vq_codec.decode(vq, [g for g in grids if g is not None], batch_size) if any(g is not None for g in grids) else []
    images = iter(present)
    return [next(images) if g is not None else None for g in grids]


def score_rows(rows: list[dict], images: list[Image.Image | None], scores: list[Score]) -> list[Sample]:
    return [
        Sample(str(row["id"]), str(row.get("edit_type", "all")), image is not None, s.sc, s.pq, s.overall, s.failed,
               *(s.subscores or (None,) * 4))
        for row, image, s in zip(rows, images, scores)
    ]


def edit_rows_explained(engine, layout: Layout, vq, rows: list[dict], prefill: str, params, seeds: list[int] | None = None
                        ) -> tuple[list[Image.Image | None], list[str | None]]:
    """One edit per row (``source_codes``, ``instruction``), constrained to its source's grid, decoded; None where
    malformed, with the reason in the second list.

    ``prefill`` may hold ``{H}`` and ``{W}`` (the eval prefill of spec §D.3); ``seeds[i]`` seeds sequence ``i``
    (default ``params.seed + i``).
    """
    if not rows:
        return [], []
    sources = [np.asarray(r["source_codes"]) for r in rows]
    prompts = [layout.prompt(s, r["instruction"], prefill) for s, r in zip(sources, rows)]
    shapes = [s.shape for s in sources]
    rollouts = engine.generate(prompts, shapes, params, seeds)
    grids, reasons = zip(*(grid_or_reason(layout, rollouts, i, shape) for i, shape in enumerate(shapes)))
    return decode_all(vq, list(grids)), list(reasons)


def edit_rows(engine, layout: Layout, vq, rows: list[dict], prefill: str, params, seeds: list[int] | None = None) -> list[Image.Image | None]:
    """One edit per tokenized row, constrained to its source's grid, decoded; None where malformed."""
    return edit_rows_explained(engine, layout, vq, rows, prefill, params, seeds)[0]


def judge_rows(reward, vq, rows: list[dict], images: list[Image.Image | None]) -> list[Score]:
    """``reward.score_many``, decoding the source images only for a judge that looks at them."""
    sources = decode_all(vq, [np.asarray(r["source_codes"]) for r in rows]) if reward.needs_source_image else None
    return reward.score_many(images, rows, sources)


def score_edits(reward, vq, rows: list[dict], images: list[Image.Image | None]) -> list[Sample]:
    return score_rows(rows, images, judge_rows(reward, vq, rows, images))


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (0 for fewer than two values)."""
    if not values:
        return math.nan, math.nan
    array = np.asarray(values, dtype=np.float64)
    se = float(array.std(ddof=1) / math.sqrt(len(array))) if len(array) > 1 else 0.0
    return float(array.mean()), se


def summarize(samples: list[Sample]) -> dict:
    """Overall and per-edit-type means (with standard errors) of the scores; judge failures are excluded and counted.

    ``success`` is the share of edits with full semantic consistency (SC = 10), ``preservation`` the mean PQ / 10.
    """

    def stats(group: list[Sample]) -> dict:
        scored = [s for s in group if not s.failed]
        overall, overall_se = mean_se([s.overall for s in scored])
        return {
            "n": len(group),
            "judge_failures": len(group) - len(scored),
            "well_formed": float(np.mean([s.well_formed for s in group])) if group else math.nan,
            "overall": overall,
            "overall_se": overall_se,
            "success": mean_se([float(s.sc == 10.0) for s in scored])[0],
            "preservation": mean_se([s.pq / 10.0 for s in scored])[0],
        }

    by_type = defaultdict(list)
    for s in samples:
        by_type[s.edit_type].append(s)
    return {**stats(samples), "by_edit_type": {t: stats(g) for t, g in sorted(by_type.items())}}


def records(samples: list[Sample]) -> list[dict]:
    return [asdict(s) for s in samples]
