"""The shapes world: exact render/parse round trips, deterministic data, and a verifier that can tell edits apart."""

from __future__ import annotations

import io
import itertools
import json
from dataclasses import replace

import numpy as np
import pytest

from earl import shapes
from earl.config import ShapesSource
from earl.shapes import EDIT_TYPES, Obj, Scene, WorldSpec

SPEC = WorldSpec()
FAMILY_TYPES = {f: {t for t, g in EDIT_TYPES.items() if g == f} for f in "SC"}


@pytest.fixture(scope="module")
def rows():
    """Enough rows of each family that every edit type appears."""
    return {family: shapes.generate(SPEC, family, 150, seed=7) for family in "SC"}


def edits(rows):
    for row in rows["S"] + rows["C"]:
        yield Scene.from_json(row["source_scene"]), json.loads(row["edit_spec"]), Scene.from_json(row["target_scene"])


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def full_spec(**overrides) -> WorldSpec:
    """Busier scenes than the default, to exercise crowded grids."""
    return WorldSpec(**{"min_objects": 0, "max_objects": 20, **overrides})


# ------------------------------------------------------------------------------------------- palette, shapes


def test_palette_is_well_separated():
    colors = np.array(list(shapes.PALETTE.values()), float)
    distances = np.sqrt(((colors[:, None] - colors[None]) ** 2).sum(-1))
    assert distances[~np.eye(len(colors), dtype=bool)].min() >= 120
    named = {"red", "green", "blue", "yellow", "purple", "orange", "cyan", "white", "black", "gray"}
    assert named <= set(shapes.PALETTE)


@pytest.mark.parametrize("cell_px", [8, 9, 12, 16, 24, 32])
def test_shapes_are_distinct_and_big_enough(cell_px):
    masks = {s: shapes.shape_mask(s, cell_px) for s in shapes.SHAPES}
    for a, b in itertools.combinations(shapes.SHAPES, 2):
        assert (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum() < 0.75, (a, b)
    for mask in masks.values():
        assert mask.shape == (cell_px, cell_px)
        assert mask.mean() > shapes.EMPTY_FRACTION + 0.05  # far from the empty-cell threshold


def test_shapes_at_8_px():
    assert shapes.shape_mask("square", 8)[1:7, 1:7].all() and shapes.shape_mask("square", 8).sum() == 36
    triangle = shapes.shape_mask("triangle", 8)
    assert triangle.sum(1).tolist() == [0, 2, 2, 4, 4, 6, 6, 0]  # upward: widening rows
    assert triangle.sum(1).tolist() == triangle[:, ::-1].sum(1).tolist()
    circle = shapes.shape_mask("circle", 8)
    assert circle.sum(1).tolist() == [4, 6, 8, 8, 8, 8, 6, 4] and (circle == circle.T).all()


# ------------------------------------------------------------------------------------------- scenes


def test_scene_sorts_objects_and_json_is_canonical():
    a, b = Obj("circle", "red", 2, 3), Obj("square", "blue", 0, 5)
    scene = Scene(4, 6, "white", (a, b))
    assert scene.objects == (b, a)
    assert scene == Scene(4, 6, "white", (b, a))
    assert scene.to_json() == Scene(4, 6, "white", (b, a)).to_json()
    assert Scene.from_json(scene.to_json()) == scene
    data = json.loads(scene.to_json())
    assert data["objects"][0] == {"col": 5, "color": "blue", "row": 0, "shape": "square"}
    assert list(data) == sorted(data)


def test_scene_json_round_trip_random():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = shapes.sample_scene(rng, full_spec())
        assert Scene.from_json(scene.to_json()) == scene


@pytest.mark.parametrize(
    "objects, message",
    [
        ((Obj("square", "red", 0, 0), Obj("circle", "blue", 0, 0)), "share a cell"),
        ((Obj("square", "red", 4, 0),), "outside"),
        ((Obj("square", "red", 0, -1),), "outside"),
    ],
)
def test_invalid_scenes_raise(objects, message):
    with pytest.raises(ValueError, match=message):
        Scene(4, 4, "white", objects)


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="hexagon"):
        Obj("hexagon", "red", 0, 0)
    with pytest.raises(ValueError, match="teal"):
        Obj("square", "teal", 0, 0)


# ------------------------------------------------------------------------------------------- render / parse


def test_render_pixels():
    scene = Scene(2, 3, "black", (Obj("square", "red", 1, 2),))
    pixels = np.asarray(shapes.render(scene, 8))
    assert pixels.shape == (16, 24, 3) and pixels.dtype == np.uint8
    assert (pixels[:8] == 0).all() and (pixels[8:, :16] == 0).all()
    assert (pixels[9:15, 17:23] == (255, 0, 0)).all() and (pixels[8, 16:] == 0).all()


@pytest.mark.parametrize("cell_px", [8, 16])
def test_parse_inverts_render(cell_px):
    spec = full_spec(cell_px=cell_px, rows=6, cols=7, colors=("red", "green", "blue", "yellow", "purple", "orange"))
    rng = np.random.default_rng(cell_px)
    for _ in range(100):
        scene = shapes.sample_scene(rng, spec)
        image = shapes.render(scene, cell_px)
        assert image.mode == "RGB" and image.size == (7 * cell_px, 6 * cell_px)
        assert shapes.parse(image, spec) == scene
        assert shapes.parse(np.asarray(image), spec) == scene


@pytest.mark.parametrize("cell_px", [8, 16])
def test_parse_is_robust_to_pixel_noise(cell_px):
    spec = full_spec(cell_px=cell_px)
    rng = np.random.default_rng(1)
    for _ in range(100):
        scene = shapes.sample_scene(rng, spec)
        pixels = np.asarray(shapes.render(scene, cell_px), float)
        noisy = np.clip(pixels + rng.normal(0, 10, pixels.shape), 0, 255).astype(np.uint8)
        assert shapes.parse(noisy, spec) == scene


def test_parse_reads_a_faint_speck_as_empty_and_a_wrong_size_as_error():
    pixels = np.asarray(shapes.render(Scene(8, 8, "white"), 8)).copy()
    pixels[3:5, 3:5] = (255, 0, 0)  # 4 of 64 pixels: noise, not an object
    assert shapes.parse(pixels, SPEC).objects == ()
    with pytest.raises(ValueError, match="expected"):
        shapes.parse(pixels[:, :60], SPEC)


# ------------------------------------------------------------------------------------------- spec


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"colors": ("red", "white")}, "'white'"),
        ({"backgrounds": ("black", "blue")}, "'blue'"),
        ({"colors": ("red", "teal")}, "teal"),
        ({"shapes": ("square", "star")}, "star"),
        ({"edit_types": ("recolor", "rotate")}, "rotate"),
        ({"edit_types": {"recolor": 2.0, "rotate": 1.0}}, "rotate"),
        ({"edit_types": {"recolor": 1.0, "add": 0.0}}, "'add' has weight 0.0"),
        ({"min_objects": 5, "max_objects": 4}, "min_objects"),
        ({"cell_px": 4}, "cell_px"),
    ],
)
def test_bad_specs_raise_naming_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        WorldSpec(**overrides)


def test_overlapping_palettes_raise_through_duck_typed_config():
    source = ShapesSource(kind="shapes", family="S", seed=1, splits={"train": 1}, colors=["red", "gray"],
                          backgrounds=["white", "gray"])
    with pytest.raises(ValueError, match="'gray'"):
        shapes.generate(source, "S", 1, 0)


def test_pydantic_config_is_accepted():
    source = ShapesSource(kind="shapes", family="C", seed=1, splits={"train": 4}, colors=["red", "blue"],
                          backgrounds=["black"], edit_types=["swap"], min_objects=2)
    rows = shapes.generate(source, source.family, 4, source.seed)
    assert [r["edit_type"] for r in rows] == ["swap"] * 4
    assert shapes.parse(rows[0]["source_image"], source) == Scene.from_json(rows[0]["source_scene"])


def test_edit_type_weights_set_the_type_frequencies():
    # 600 S edits at weights 3:1:2 (remove absent): binomial standard errors ~0.02, so 0.07 is a 3.5-sigma margin
    source = ShapesSource(kind="shapes", family="S", seed=3, splits={"train": 1}, colors=["red", "blue"],
                          backgrounds=["white", "black"], edit_types={"recolor": 3, "add": 1, "background": 2})
    types = [row["edit_type"] for row in shapes.generate(source, "S", 600, 0)]
    share = {t: types.count(t) / len(types) for t in set(types)}
    assert set(share) == {"recolor", "add", "background"}
    for edit_type, expected in (("recolor", 0.5), ("add", 1 / 6), ("background", 1 / 3)):
        assert abs(share[edit_type] - expected) < 0.07, share


def test_edit_types_of_another_family_or_impossible_edits_raise():
    with pytest.raises(ValueError, match="'swap' is of family C"):
        shapes.generate(WorldSpec(edit_types=("swap",)), "S", 1, 0)
    with pytest.raises(ValueError, match="no valid 'swap'"):
        shapes.generate(WorldSpec(edit_types=("swap",), max_objects=1), "C", 1, 0)
    with pytest.raises(ValueError, match="no valid 'background'"):
        shapes.generate(WorldSpec(backgrounds=("white",), edit_types=("background",)), "S", 1, 0)


# ------------------------------------------------------------------------------------------- generate


def test_generate_is_deterministic():
    a, b = (shapes.generate(SPEC, "C", 12, seed=3) for _ in range(2))
    other = shapes.generate(SPEC, "C", 12, seed=4)
    def strip(rows):
        return [{k: v for k, v in r.items() if not k.endswith("_image")} for r in rows]

    assert strip(a) == strip(b)
    assert [png(r[k]) for r in a for k in ("source_image", "target_image")] == \
           [png(r[k]) for r in b for k in ("source_image", "target_image")]
    assert strip(other) != strip(a)
    assert [png(r["source_image"]) for r in other] != [png(r["source_image"]) for r in a]


def test_rows_have_the_dataset_columns(rows):
    row = rows["S"][0]
    assert set(row) == {"id", "source_image", "target_image", "instruction", "edit_type", "family", "source_scene",
                        "target_scene", "edit_spec", "cot"}
    assert row["id"] == "S-7-000000" and rows["C"][12]["id"] == "C-7-000012"
    for family in "SC":
        for r in rows[family]:
            assert r["family"] == family and EDIT_TYPES[r["edit_type"]] == family
            assert r["source_image"].size == (64, 64) and r["source_image"].mode == "RGB"
            assert shapes.parse(r["source_image"], SPEC) == Scene.from_json(r["source_scene"])
            assert shapes.parse(r["target_image"], SPEC) == Scene.from_json(r["target_scene"])
            assert json.loads(r["edit_spec"])["type"] == r["edit_type"]


def test_every_edit_type_is_produced_with_paraphrases(rows):
    for family in "SC":
        assert {r["edit_type"] for r in rows[family]} == FAMILY_TYPES[family]
    for edit_type in EDIT_TYPES:
        instructions = [r["instruction"] for r in rows[EDIT_TYPES[edit_type]] if r["edit_type"] == edit_type]
        assert len({i.split()[0] for i in instructions}) >= 2, edit_type  # paraphrases start differently


def test_targets_pass_the_verifier_and_sources_fail_it(rows):
    for source, spec, target in edits(rows):
        assert shapes.check_edit(source, spec, target) == (1.0, 1.0), spec
        assert shapes.check_edit(source, spec, source) == (0.0, 1.0), spec
        assert target != source


def test_referenced_objects_are_unique_and_where_the_spec_says(rows):
    for source, spec, _ in edits(rows):
        named = spec.get("objects", [])
        if spec["type"] in ("recolor", "remove", "move_relative"):
            named = [spec["object"]]
        if "anchor" in spec:
            named = named + [spec["anchor"]]
        for o in (Obj(**d) for d in named):
            assert source.at(*o.cell) == o
            assert [p.name for p in source.objects].count(o.name) == 1, (spec, source)
        if spec["type"] in ("add", "add_relative"):
            assert source.at(spec["object"]["row"], spec["object"]["col"]) is None


def test_instructions_and_cot_name_what_the_spec_says(rows):
    for row in rows["S"] + rows["C"]:
        spec, text, cot = json.loads(row["edit_spec"]), row["instruction"], row["cot"]
        if "object" in spec:
            assert f"{spec['object']['color']} {spec['object']['shape']}" in text
        if spec["type"] == "add":
            o = spec["object"]
            assert f"row {o['row'] + 1}, column {o['col'] + 1}" in text  # 1-based in text
            assert f"[{o['col'] * 8}, {o['row'] * 8}, {o['col'] * 8 + 8}, {o['row'] * 8 + 8}]" in cot
        if spec["type"] == "recolor":
            assert text.endswith(spec["to"])
        if spec["type"] == "move_relative":
            rel = shapes.RELATIONS[spec["relation"]][2]
            assert f" {rel} the {spec['anchor']['color']} {spec['anchor']['shape']}" in text
            assert f"row {spec['to']['row'] + 1}, column {spec['to']['col'] + 1}" in cot
        if spec["type"] == "count":
            assert str(spec["n"]) in text or ("one", "two")[spec["n"] - 1] in text


def test_move_relative_lands_next_to_the_anchor(rows):
    for source, spec, target in edits(rows):
        if spec["type"] == "move_relative":
            dr, dc, _ = shapes.RELATIONS[spec["relation"]]
            to = (spec["anchor"]["row"] + dr, spec["anchor"]["col"] + dc)
            assert (spec["to"]["row"], spec["to"]["col"]) == to
            assert target.at(*to).name == Obj(**spec["object"]).name
            assert target.at(spec["object"]["row"], spec["object"]["col"]) is None


# ------------------------------------------------------------------------------------------- verifier


SOURCE = Scene(4, 4, "white", (Obj("circle", "red", 1, 1), Obj("square", "blue", 2, 3), Obj("triangle", "green", 0, 0)))
RED_CIRCLE = {"shape": "circle", "color": "red", "row": 1, "col": 1}
BLUE_SQUARE = {"shape": "square", "color": "blue", "row": 2, "col": 3}


def scene_with(*objects, background="white") -> Scene:
    return Scene(4, 4, background, objects)


def test_wrong_recolor_scores_lower():
    spec = {"type": "recolor", "object": RED_CIRCLE, "to": "blue"}
    right = shapes.apply_edit(SOURCE, spec)
    assert right.at(1, 1) == Obj("circle", "blue", 1, 1)
    wrong_colour = replace(right, objects=tuple(replace(o, color="yellow") if o.cell == (1, 1) else o
                                                for o in right.objects))
    assert shapes.check_edit(SOURCE, spec, wrong_colour) == (0.0, 1.0)
    also_moved = replace(right, objects=tuple(replace(o, row=3) if o.name == "blue square" else o
                                              for o in right.objects))
    success, preservation = shapes.check_edit(SOURCE, spec, also_moved)
    assert success == 1.0 and preservation == pytest.approx(2 / 4)  # background, green ok; blue lost and misplaced
    assert shapes.check_edit(SOURCE, spec, replace(right, background="black")) == (1.0, pytest.approx(2 / 3))


def test_move_relative_partial_credit():
    spec = {"type": "move_relative", "object": RED_CIRCLE, "anchor": BLUE_SQUARE, "relation": "left of",
            "to": {"row": 2, "col": 2}}
    target = shapes.apply_edit(SOURCE, spec)
    assert target.at(2, 2) == Obj("circle", "red", 2, 2) and target.at(1, 1) is None
    copied = replace(target, objects=target.objects + (Obj("circle", "red", 1, 1),))  # added, not moved
    assert shapes.check_edit(SOURCE, spec, copied) == (0.5, 1.0)
    wrong_side = scene_with(Obj("triangle", "green", 0, 0), Obj("square", "blue", 2, 3), Obj("circle", "red", 1, 3))
    assert shapes.check_edit(SOURCE, spec, wrong_side) == (0.5, pytest.approx(3 / 4))


def test_swap_and_background_and_remove():
    swap = {"type": "swap", "objects": [RED_CIRCLE, BLUE_SQUARE]}
    swapped = shapes.apply_edit(SOURCE, swap)
    assert swapped.at(1, 1).name == "blue square" and swapped.at(2, 3).name == "red circle"
    assert shapes.check_edit(SOURCE, swap, swapped) == (1.0, 1.0)
    half = scene_with(Obj("triangle", "green", 0, 0), Obj("circle", "red", 2, 3))  # moved one, lost the other
    assert shapes.check_edit(SOURCE, swap, half) == (0.5, 1.0)

    background = {"type": "background", "from": "white", "to": "gray"}
    recoloured_all = replace(SOURCE, background="gray", objects=(Obj("circle", "red", 1, 1),))
    assert shapes.check_edit(SOURCE, background, recoloured_all) == (1.0, pytest.approx(1 / 3))

    remove = {"type": "remove", "object": RED_CIRCLE}
    spurious = replace(shapes.apply_edit(SOURCE, remove), objects=shapes.apply_edit(SOURCE, remove).objects
                       + (Obj("square", "yellow", 3, 3),))
    assert shapes.check_edit(SOURCE, remove, spurious) == (1.0, pytest.approx(3 / 4))


def test_count_accepts_any_empty_cells_but_checks_the_count():
    source = scene_with(Obj("circle", "red", 1, 1), Obj("circle", "red", 3, 3), Obj("square", "blue", 0, 0))
    spec = {"type": "count", "object": {"color": "red", "shape": "circle"}, "n": 2}
    target = shapes.apply_edit(source, spec)
    assert [o.cell for o in target.objects if o.name == "red circle"] == [(0, 1), (0, 2), (1, 1), (3, 3)]
    elsewhere = replace(source, objects=source.objects + (Obj("circle", "red", 2, 0), Obj("circle", "red", 3, 2)))
    assert shapes.check_edit(source, spec, elsewhere) == (1.0, 1.0)
    one_short = replace(source, objects=source.objects + (Obj("circle", "red", 2, 0),))
    assert shapes.check_edit(source, spec, one_short) == (0.5, 1.0)
    wrong_kind = replace(source, objects=source.objects + (Obj("circle", "blue", 2, 0), Obj("circle", "red", 2, 1)))
    assert shapes.check_edit(source, spec, wrong_kind) == (0.5, pytest.approx(4 / 5))
    three = replace(elsewhere, objects=elsewhere.objects + (Obj("circle", "red", 2, 2),))
    assert shapes.check_edit(source, spec, three) == (1.0, pytest.approx(4 / 5))
    moved_existing = scene_with(Obj("circle", "red", 1, 2), Obj("circle", "red", 3, 3), Obj("square", "blue", 0, 0))
    assert shapes.check_edit(source, spec, moved_existing)[1] < 1.0
