"""Held-out scoring: the verifier reward in VIEScore form, malformed completions, per-edit-type summaries."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from earl import heldout, shapes
from earl.engine import Rollouts
from earl.layout import Layout
from earl.rewards import Score, Verifier

WORLD = shapes.WorldSpec(rows=4, cols=4, colors=("red", "blue"), backgrounds=("white", "black"),
                         shapes=("square", "circle"), max_objects=3)


def example(edit_type: str = "recolor"):
    source = shapes.Scene(4, 4, "white", (shapes.Obj("square", "red", 0, 0), shapes.Obj("circle", "blue", 2, 3)))
    if edit_type == "recolor":
        spec = {"type": "recolor", "object": {"shape": "square", "color": "red", "row": 0, "col": 0}, "to": "blue"}
    else:
        spec = {"type": "remove", "object": {"shape": "circle", "color": "blue", "row": 2, "col": 3}}
    row = {"id": edit_type, "edit_type": edit_type, "source_scene": source.to_json(), "edit_spec": json.dumps(spec)}
    return source, spec, row


def test_verifier_scores_the_right_edit_ten_and_the_copy_zero_consistency():
    source, spec, row = example()
    verifier = Verifier(WORLD)
    done = verifier.score(shapes.render(shapes.apply_edit(source, spec), 8), row)
    assert (done.sc, done.pq, done.overall) == (10.0, 10.0, 10.0)
    copy = verifier.score(shapes.render(source, 8), row)
    assert (copy.sc, copy.pq, copy.overall) == (0.0, 10.0, 0.0)
    # the edit done, but the other object lost: PQ counts the background and the untouched object
    damaged = verifier.score(shapes.render(shapes.Scene(4, 4, "white", (shapes.Obj("square", "blue", 0, 0),)), 8), row)
    assert damaged.sc == 10.0 and damaged.pq == pytest.approx(5.0) and damaged.overall == pytest.approx(math.sqrt(50))
    assert verifier.score(None, row) == Score(0.0, 0.0)


def test_malformed_unfinished_and_wrong_size_completions_have_no_grid(tiny_tokenizer):
    layout = Layout(tiny_tokenizer, 16)
    good = layout.image_block(np.ones((2, 2), dtype=int)) + [layout.ids.eos]
    cut = good[:6]
    wrong = layout.image_block(np.ones((2, 3), dtype=int)) + [layout.ids.eos]
    width = max(map(len, (good, cut, wrong)))
    tokens = torch.tensor([c + [layout.ids.pad] * (width - len(c)) for c in (good, cut, wrong, good)])
    rollouts = Rollouts(tokens, torch.zeros(tokens.shape), torch.tensor([len(good), len(cut), len(wrong), len(good)]),
                        torch.tensor([True, False, True, False]))
    grids = heldout.grids_of(layout, rollouts, [(2, 2)] * 4)
    assert grids[0].tolist() == [[1, 1], [1, 1]]
    assert grids[1:] == [None, None, None]  # cut off, 2x3 instead of 2x2, no EOS


def test_summary_means_standard_errors_and_failures_per_edit_type():
    samples = [
        heldout.Sample("a", "recolor", True, 10.0, 10.0, 10.0, False),
        heldout.Sample("b", "recolor", True, 0.0, 10.0, 0.0, False),
        heldout.Sample("c", "remove", False, 0.0, 0.0, 0.0, False),
        heldout.Sample("d", "remove", True, 10.0, 4.0, math.sqrt(40), False),
        heldout.Sample("e", "remove", True, 0.0, 0.0, 0.0, True),  # judge failure: excluded, counted
    ]
    summary = heldout.summarize(samples)
    assert summary["n"] == 5 and summary["judge_failures"] == 1
    assert summary["overall"] == pytest.approx(np.mean([10.0, 0.0, 0.0, math.sqrt(40)]))
    assert summary["overall_se"] == pytest.approx(np.std([10.0, 0.0, 0.0, math.sqrt(40)], ddof=1) / 2)
    assert summary["well_formed"] == pytest.approx(0.8)
    recolor, remove = summary["by_edit_type"]["recolor"], summary["by_edit_type"]["remove"]
    assert (recolor["success"], recolor["preservation"], recolor["overall"]) == (0.5, 1.0, 5.0)
    assert (remove["n"], remove["judge_failures"], remove["success"]) == (3, 1, 0.5)
    assert remove["preservation"] == pytest.approx(0.2)
