"""Rewards in VIEScore form: semantic consistency (SC) and perceptual quality (PQ) on 0-10, combined as
overall = sqrt(min SC · min PQ) (spec §C.6, §D.2).

The ``verifier`` scores an edit against the exact ground truth of the synthetic shapes world: SC is the share of
instructed changes the decoded image has, PQ the share of everything else it leaves as it was. An image that
could not be decoded (malformed block) scores 0, as in the original. The ``viescore`` judge (a VLM behind an
OpenAI-compatible endpoint) returns the same :class:`Score`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from PIL import Image

from earl import shapes


@dataclass(frozen=True)
class Score:
    sc: float  # min of the semantic-consistency scores, 0-10
    pq: float  # min of the perceptual-quality scores, 0-10
    failed: bool = False  # the judge gave no usable answer: the sample is excluded, never guessed
    subscores: tuple[float, ...] = ()  # VIEScore's (edit success, over-editing, naturalness, artifacts) when asked

    @property
    def overall(self) -> float:
        return math.sqrt(self.sc * self.pq)


ZERO = Score(0.0, 0.0)


class Verifier:
    """Programmatic judge of shapes edits: parses the decoded image and checks it with :func:`shapes.check_edit`."""

    needs_source_image = False  # it reads the scene ground truth instead

    def __init__(self, world_spec):
        self.world = shapes.WorldSpec.of(world_spec)

    def score(self, edited: Image.Image | None, row: dict) -> Score:
        """``row`` holds the example's ``source_scene`` and ``edit_spec`` (JSON strings, as the data step writes)."""
        if edited is None:
            return ZERO
        source = shapes.Scene.from_json(row["source_scene"])
        success, preservation = shapes.check_edit(source, json.loads(row["edit_spec"]), shapes.parse(edited, self.world))
        return Score(10.0 * success, 10.0 * preservation)

    def score_many(self, edited: list[Image.Image | None], rows: list[dict], sources: list[Image.Image] | None = None) -> list[Score]:
        """The judges' common interface; the verifier reads the scene ground truth, not the source image."""
        return [self.score(image, row) for image, row in zip(edited, rows)]
