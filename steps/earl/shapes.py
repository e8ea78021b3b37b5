"""The embedded default dataset: a procedural shapes world with exact, checkable edits.

A scene is a ``rows x cols`` grid of ``cell_px``-pixel cells on a flat background; each cell holds at most one
object (a shape in a colour). Everything is grid-aligned, flat-filled and noise-free because Emu3's VQ turns
every 8x8 pixel patch into one code: with ``cell_px=8`` one object is one image token, so a tiny model can learn
the edits in minutes on CPU. Because the scenes are symbolic, every edit has exact ground truth:
:func:`parse` reads a (VQ-reconstructed) image back into a :class:`Scene`, and :func:`check_edit` scores it
against the instruction, which gives the verifier reward of the RL stage without a learned judge.

Two families, as in the paper: ``S`` (simple: recolor, add, remove, background) and ``C`` (complex: relative
moves and additions, counting, swaps). Grid coordinates are 0-based in code and 1-based in text.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (128, 0, 128),
    "orange": (255, 128, 0),
    "cyan": (0, 255, 255),
    "brown": (128, 64, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
EDIT_TYPES: dict[str, str] = {
    "recolor": "S",
    "add": "S",
    "remove": "S",
    "background": "S",
    "move_relative": "C",
    "add_relative": "C",
    "count": "C",
    "swap": "C",
}
# relation -> (row step, column step, wording in an instruction)
RELATIONS: dict[str, tuple[int, int, str]] = {
    "left of": (0, -1, "to the left of"),
    "right of": (0, 1, "to the right of"),
    "above": (-1, 0, "above"),
    "below": (1, 0, "below"),
}
EMPTY_FRACTION = 0.15  # a cell with fewer object pixels than this is empty (the triangle fills 33-38% at 8k px)
MAX_TRIES = 1000  # scenes sampled for one edit before the spec is declared unable to produce it
BACKGROUND = "background"  # key of the background in an edit's changes, beside (row, col) cell keys


# ------------------------------------------------------------------------------------------------ scenes


@dataclass(frozen=True)
class Obj:
    """One object: a shape filling one grid cell in one palette colour."""

    shape: str
    color: str
    row: int
    col: int

    def __post_init__(self) -> None:
        _known(self.shape, SHAPES, "shape")
        _known(self.color, PALETTE, "colour")

    @property
    def cell(self) -> tuple[int, int]:
        return self.row, self.col

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A grid of objects on a background. Objects are kept sorted by (row, col), so equal scenes compare equal."""

    rows: int
    cols: int
    background: str
    objects: tuple[Obj, ...] = ()

    def __post_init__(self) -> None:
        _known(self.background, PALETTE, "colour")
        objects = tuple(sorted(self.objects, key=lambda o: o.cell))
        object.__setattr__(self, "objects", objects)
        for o in objects:
            if not (0 <= o.row < self.rows and 0 <= o.col < self.cols):
                raise ValueError(f"{o.name} at {o.cell} is outside the {self.rows}x{self.cols} grid")
        cells = [o.cell for o in objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share a cell in {cells}")

    def at(self, row: int, col: int) -> Obj | None:
        return next((o for o in self.objects if o.cell == (row, col)), None)

    def empty_cells(self) -> list[tuple[int, int]]:
        """Empty cells in reading order (row by row, left to right)."""
        taken = {o.cell for o in self.objects}
        return [(r, c) for r in range(self.rows) for c in range(self.cols) if (r, c) not in taken]

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): identical scenes give identical strings."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Scene:
        data = json.loads(text)
        return cls(data["rows"], data["cols"], data["background"], tuple(Obj(**o) for o in data["objects"]))


def _known(name: str, allowed, what: str) -> None:
    if name not in allowed:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(allowed)}")


# ------------------------------------------------------------------------------------------------ spec


@dataclass(frozen=True)
class WorldSpec:
    """What the generator needs. :meth:`of` accepts any object with these attributes (e.g. the pydantic config)."""

    rows: int = 8
    cols: int = 8
    cell_px: int = 8
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow")
    backgrounds: tuple[str, ...] = ("white", "black", "gray")
    shapes: tuple[str, ...] = SHAPES
    min_objects: int = 1
    max_objects: int = 4
    # None: every type of the requested family, equally often; a list: these types, equally often; a mapping:
    # type -> relative weight (e.g. fewer of the trivial background edits, more of the hard ones)
    edit_types: tuple[str, ...] | Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.edit_types, Mapping):  # stored as ((type, weight), ...) so the spec stays hashable
            object.__setattr__(self, "edit_types", tuple((t, float(w)) for t, w in self.edit_types.items()))
        for name in ("colors", "backgrounds", "shapes", "edit_types"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        for name in ("colors", "backgrounds", "shapes"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        for color in self.colors + self.backgrounds:
            _known(color, PALETTE, "colour")
        for shape in self.shapes:
            _known(shape, SHAPES, "shape")
        for color in self.colors:
            if color in self.backgrounds:  # an object would vanish into its background, and parse could not tell
                raise ValueError(f"colour {color!r} is both an object colour and a background colour")
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"grid {self.rows}x{self.cols} must have at least one cell")
        if self.cell_px < 8:
            raise ValueError(f"cell_px={self.cell_px}: the shapes are distinguishable from 8 px up")
        if not 0 <= self.min_objects <= self.max_objects <= self.rows * self.cols:
            raise ValueError(f"need 0 <= min_objects <= max_objects <= {self.rows * self.cols} cells, "
                             f"got {self.min_objects}, {self.max_objects}")
        if self.edit_types is not None:
            if not self.edit_types:
                raise ValueError("edit_types must not be empty (null means every type of the family)")
            for edit_type, weight in self._weighted_types():
                _known(edit_type, EDIT_TYPES, "edit type")
                if not (weight > 0 and math.isfinite(weight)):
                    raise ValueError(f"edit type {edit_type!r} has weight {weight}; weights must be positive")

    @classmethod
    def of(cls, spec: Any) -> WorldSpec:
        """Validated copy of any object with WorldSpec's attribute names."""
        if isinstance(spec, cls):
            return spec
        return cls(**{f.name: getattr(spec, f.name) for f in fields(cls)})

    def _weighted_types(self) -> tuple[tuple[str, float], ...]:
        """The configured edit types as (type, weight) pairs; a plain list weighs every type 1."""
        return tuple(t if isinstance(t, tuple) else (t, 1.0) for t in self.edit_types or ())

    def types_for(self, family: str) -> tuple[tuple[str, ...], np.ndarray]:
        """The edit types to sample for ``family`` and their probabilities; a type of another family is an error."""
        if family not in set(EDIT_TYPES.values()):
            raise ValueError(f"unknown family {family!r}; known: S, C")
        weighted = self._weighted_types() or tuple((t, 1.0) for t, f in EDIT_TYPES.items() if f == family)
        for edit_type, _ in weighted:
            if EDIT_TYPES[edit_type] != family:
                raise ValueError(f"edit type {edit_type!r} is of family {EDIT_TYPES[edit_type]}, not {family}")
        weights = np.array([w for _, w in weighted])
        return tuple(t for t, _ in weighted), weights / weights.sum()


# ------------------------------------------------------------------------------------------------ pixels


@functools.cache
def shape_mask(shape: str, cell_px: int) -> np.ndarray:
    """Boolean ``cell_px x cell_px`` mask of a shape, sampled at pixel centres (no anti-aliasing).

    The square and the triangle keep a margin of ``cell_px / 8`` rounded up (1 px at 8, so the shapes scale with
    the cell and stay apart at every size: pairwise IoU <= 0.71); the disk fills the whole cell,
    because at 8 px a disk inside the square's box would differ from the square by only its 4 corner pixels.
    """
    _known(shape, SHAPES, "shape")
    margin = math.ceil(cell_px / 8)
    y, x = np.mgrid[0:cell_px, 0:cell_px] + 0.5
    centre = cell_px / 2
    inside = (y > margin) & (y < cell_px - margin) & (x > margin) & (x < cell_px - margin)
    if shape == "square":
        mask = inside
    elif shape == "circle":
        mask = (x - centre) ** 2 + (y - centre) ** 2 <= centre**2
    else:  # upward triangle: apex at the top of the margin box, base along its bottom
        height = cell_px - 2 * margin
        half_width = (y + 0.5 - margin) / height * (centre - margin)  # at the pixel row's lower edge
        mask = inside & (np.abs(x - centre) <= half_width)
    mask.flags.writeable = False
    return mask


def render(scene: Scene, cell_px: int) -> Image.Image:
    """The scene as an RGB image of ``(cols * cell_px, rows * cell_px)`` pixels."""
    pixels = np.empty((scene.rows * cell_px, scene.cols * cell_px, 3), np.uint8)
    pixels[:] = PALETTE[scene.background]
    for o in scene.objects:
        cell = pixels[o.row * cell_px:(o.row + 1) * cell_px, o.col * cell_px:(o.col + 1) * cell_px]
        cell[shape_mask(o.shape, cell_px)] = PALETTE[o.color]
    return Image.fromarray(pixels)


def parse(image: Image.Image | np.ndarray, spec: Any) -> Scene:
    """Read an image of ``spec``'s world back into a scene; the inverse of :func:`render`.

    Robust to VQ reconstruction noise because every decision is a nearest-palette-colour or best-overlap choice:
    the background is the background colour most pixels are nearest to; a pixel belongs to an object if it is
    nearer to some object colour than to the background; a cell with under ``EMPTY_FRACTION`` such pixels is
    empty; otherwise its colour is the object colour nearest to their mean and its shape the template of
    highest IoU. ``image`` is a PIL image or an ``H x W x 3`` array in 0-255.
    """
    world = WorldSpec.of(spec)
    rows, cols, px = world.rows, world.cols, world.cell_px
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, np.float32)
    if pixels.shape != (rows * px, cols * px, 3):
        raise ValueError(f"image is {pixels.shape}, expected {(rows * px, cols * px, 3)} for a {rows}x{cols} grid")
    backgrounds = np.array([PALETTE[c] for c in world.backgrounds], np.float32)
    colors = np.array([PALETTE[c] for c in world.colors], np.float32)
    dist_bg = _sq_dist(pixels, backgrounds)
    dist_color = _sq_dist(pixels, colors)
    nearest = np.concatenate([dist_bg, dist_color], -1).argmin(-1)
    b = int(np.bincount(nearest.ravel(), minlength=len(backgrounds))[: len(backgrounds)].argmax())
    foreground = dist_bg[..., b] > dist_color.min(-1)

    cell_masks, cell_pixels = _by_cell(foreground, px), _by_cell(pixels, px)
    templates = np.stack([shape_mask(s, px) for s in world.shapes])
    objects = []
    for r, c in zip(*np.nonzero(cell_masks.sum((2, 3)) >= EMPTY_FRACTION * px * px)):
        mask = cell_masks[r, c]
        mean = cell_pixels[r, c][mask].mean(0)
        color = world.colors[int(((colors - mean) ** 2).sum(-1).argmin())]
        iou = (templates & mask).sum((1, 2)) / (templates | mask).sum((1, 2))
        objects.append(Obj(world.shapes[int(iou.argmax())], color, int(r), int(c)))
    return Scene(rows, cols, world.backgrounds[b], tuple(objects))


def _by_cell(a: np.ndarray, px: int) -> np.ndarray:
    """``(rows * px, cols * px, ...)`` -> ``(rows, cols, px, px, ...)``."""
    return a.reshape(a.shape[0] // px, px, a.shape[1] // px, px, *a.shape[2:]).swapaxes(1, 2)


def _sq_dist(pixels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    return ((pixels[..., None, :] - palette) ** 2).sum(-1)


# ------------------------------------------------------------------------------------------------ edits


@dataclass(frozen=True)
class Edit:
    """A source scene, an instruction, the target scene, and the structured ground truth the verifier checks."""

    edit_type: str
    family: str
    instruction: str
    source: Scene
    target: Scene
    spec: dict


def sample_scene(rng: np.random.Generator, spec: Any) -> Scene:
    """A random scene: ``min_objects..max_objects`` objects in distinct random cells."""
    world = WorldSpec.of(spec)
    n = int(rng.integers(world.min_objects, world.max_objects + 1))
    cells = rng.choice(world.rows * world.cols, size=n, replace=False)
    objects = tuple(Obj(_pick(rng, world.shapes), _pick(rng, world.colors), *divmod(int(i), world.cols)) for i in cells)
    return Scene(world.rows, world.cols, _pick(rng, world.backgrounds), objects)


def sample_edit(rng: np.random.Generator, spec: Any, family: str) -> Edit:
    """A random edit of ``family``: an edit type, then source scenes until one admits a valid edit of that type."""
    world = WorldSpec.of(spec)
    types, probabilities = world.types_for(family)
    edit_type = types[int(rng.choice(len(types), p=probabilities))]
    for _ in range(MAX_TRIES):
        source = sample_scene(rng, world)
        edit_spec = _SAMPLERS[edit_type](rng, world, source)
        if edit_spec is not None:
            instruction = _pick(rng, _TEMPLATES[edit_type]).format(**_words(edit_spec))
            return Edit(edit_type, family, instruction, source, apply_edit(source, edit_spec), edit_spec)
    raise ValueError(f"no valid {edit_type!r} edit in {MAX_TRIES} scenes of {world}; allow more objects or colours")


def apply_edit(source: Scene, edit_spec: dict) -> Scene:
    """The target scene: ``source`` with the edit's changes applied."""
    background = source.background
    objects = {o.cell: o for o in source.objects}
    for key, value in _changes(source, edit_spec).items():
        if key == BACKGROUND:
            background = value
        elif value is None:
            del objects[key]
        else:
            objects[key] = value
    return Scene(source.rows, source.cols, background, tuple(objects.values()))


def check_edit(source: Scene, instruction_spec: dict, result: Scene) -> tuple[float, float]:
    """Programmatic verifier: ``(edit_success, preservation)``, each in [0, 1].

    ``edit_success`` is the fraction of the instructed changes (cells, or the background) that ``result`` has.
    ``preservation`` is the fraction of the things the edit must not touch that ``result`` leaves as they were:
    the background and every untouched cell occupied in ``source`` or in ``result``. Cells empty in both are
    left out, so that a spurious or lost object weighs as much in a sparse scene as in a full one. A count edit
    accepts its new objects in any cells that were empty.
    """
    if instruction_spec["type"] == "count":
        kind, n = instruction_spec["object"], instruction_spec["n"]
        added = [o.cell for o in result.objects
                 if source.at(*o.cell) is None and (o.color, o.shape) == (kind["color"], kind["shape"])]
        touched = set(added[:n])
        success = len(touched) / n
    else:
        changes = _changes(source, instruction_spec)
        touched = set(changes)
        success = sum(_content(result, key) == value for key, value in changes.items()) / len(changes)
    keep = (_keys(source) | _keys(result)) - touched
    preservation = sum(_content(result, key) == _content(source, key) for key in keep) / len(keep) if keep else 1.0
    return success, preservation


def _keys(scene: Scene) -> set:
    return {BACKGROUND} | {o.cell for o in scene.objects}


def _content(scene: Scene, key) -> Obj | str | None:
    return scene.background if key == BACKGROUND else scene.at(*key)


def _changes(source: Scene, edit_spec: dict) -> dict:
    """What the edit must make true: ``{(row, col): Obj or None (empty), BACKGROUND: colour}``."""
    kind = edit_spec["type"]
    if kind == "background":
        return {BACKGROUND: edit_spec["to"]}
    if kind == "count":  # new objects go to the first empty cells in reading order: a rule a model can learn
        shape, color = edit_spec["object"]["shape"], edit_spec["object"]["color"]
        return {cell: Obj(shape, color, *cell) for cell in source.empty_cells()[: edit_spec["n"]]}
    if kind == "swap":
        a, b = (Obj(**o) for o in edit_spec["objects"])
        return {a.cell: replace(b, row=a.row, col=a.col), b.cell: replace(a, row=b.row, col=b.col)}
    o = Obj(**edit_spec["object"])
    if kind == "recolor":
        return {o.cell: replace(o, color=edit_spec["to"])}
    if kind in ("add", "add_relative"):
        return {o.cell: o}
    if kind == "remove":
        return {o.cell: None}
    if kind == "move_relative":
        to = edit_spec["to"]
        return {o.cell: None, (to["row"], to["col"]): replace(o, row=to["row"], col=to["col"])}
    raise ValueError(f"unknown edit type {kind!r}")


def _pick(rng: np.random.Generator, options):
    """One of ``options``, as the plain Python object (never a numpy scalar, so it stays JSON-serialisable)."""
    return options[int(rng.integers(len(options)))]


def _unique(scene: Scene) -> list[Obj]:
    names = [o.name for o in scene.objects]
    return [o for o in scene.objects if names.count(o.name) == 1]


def _neighbour(scene: Scene, anchor: Obj, relation: str) -> tuple[int, int] | None:
    """The empty in-bounds cell at ``relation`` of ``anchor``, or None."""
    dr, dc, _ = RELATIONS[relation]
    row, col = anchor.row + dr, anchor.col + dc
    inside = 0 <= row < scene.rows and 0 <= col < scene.cols
    return (row, col) if inside and scene.at(row, col) is None else None


# Samplers: a valid edit spec of their type for the given source, or None if the source admits none. Every
# object an instruction names must be unique by (colour, shape) in the source, so the instruction is unambiguous.


def _recolor(rng, world: WorldSpec, scene: Scene) -> dict | None:
    options = [(o, color) for o in _unique(scene) for color in world.colors if color != o.color]
    if not options:
        return None
    o, color = _pick(rng, options)
    return {"type": "recolor", "object": asdict(o), "to": color}


def _add(rng, world: WorldSpec, scene: Scene) -> dict | None:
    empty = scene.empty_cells()
    if not empty:
        return None
    row, col = _pick(rng, empty)
    return {"type": "add", "object": asdict(Obj(_pick(rng, world.shapes), _pick(rng, world.colors), row, col))}


def _remove(rng, world: WorldSpec, scene: Scene) -> dict | None:
    options = _unique(scene)
    return {"type": "remove", "object": asdict(_pick(rng, options))} if options else None


def _background(rng, world: WorldSpec, scene: Scene) -> dict | None:
    options = [b for b in world.backgrounds if b != scene.background]
    return {"type": "background", "from": scene.background, "to": _pick(rng, options)} if options else None


def _move_relative(rng, world: WorldSpec, scene: Scene) -> dict | None:
    unique = _unique(scene)
    options = [(o, anchor, rel, cell) for o in unique for anchor in unique if anchor != o
               for rel in RELATIONS if (cell := _neighbour(scene, anchor, rel))]
    if not options:
        return None
    o, anchor, rel, (row, col) = _pick(rng, options)
    return {"type": "move_relative", "object": asdict(o), "anchor": asdict(anchor), "relation": rel,
            "to": {"row": row, "col": col}}


def _add_relative(rng, world: WorldSpec, scene: Scene) -> dict | None:
    options = [(anchor, rel, cell) for anchor in _unique(scene) for rel in RELATIONS
               if (cell := _neighbour(scene, anchor, rel))]
    if not options:
        return None
    anchor, rel, (row, col) = _pick(rng, options)
    new = Obj(_pick(rng, world.shapes), _pick(rng, world.colors), row, col)
    return {"type": "add_relative", "object": asdict(new), "anchor": asdict(anchor), "relation": rel}


def _count(rng, world: WorldSpec, scene: Scene) -> dict | None:
    kinds = sorted({(o.color, o.shape) for o in scene.objects})
    most = min(2, len(scene.empty_cells()))
    if not kinds or most < 1:
        return None
    color, shape = _pick(rng, kinds)
    return {"type": "count", "object": {"color": color, "shape": shape}, "n": int(rng.integers(1, most + 1))}


def _swap(rng, world: WorldSpec, scene: Scene) -> dict | None:
    unique = _unique(scene)
    options = [(a, b) for i, a in enumerate(unique) for b in unique[i + 1:]]
    if not options:
        return None
    return {"type": "swap", "objects": [asdict(o) for o in _pick(rng, options)]}


_SAMPLERS = {
    "recolor": _recolor,
    "add": _add,
    "remove": _remove,
    "background": _background,
    "move_relative": _move_relative,
    "add_relative": _add_relative,
    "count": _count,
    "swap": _swap,
}

# A few paraphrases per type, so a text model does not learn one fixed sentence per edit.
_TEMPLATES = {
    "recolor": ("make the {obj} {to}", "change the color of the {obj} to {to}", "paint the {obj} {to}"),
    "add": ("add a {new} at {cell}", "put a {new} at {cell}", "place a {new} in {cell}"),
    "remove": ("remove the {obj}", "delete the {obj}", "take away the {obj}"),
    "background": ("change the background to {to}", "make the background {to}", "set the background color to {to}"),
    "move_relative": ("move the {obj} {rel} the {anchor}", "put the {obj} {rel} the {anchor}",
                      "place the {obj} {rel} the {anchor}"),
    "add_relative": ("add a {new} {rel} the {anchor}", "put a {new} {rel} the {anchor}",
                     "place a {new} {rel} the {anchor}"),
    "count": ("add {n} more {things}", "add {n_word} more {things}", "put {n} more {things} in the picture"),
    "swap": ("swap the {obj} and the {other}", "exchange the positions of the {obj} and the {other}",
             "switch the {obj} with the {other}"),
}


def _words(edit_spec: dict) -> dict[str, str]:
    """The phrases the instruction templates of ``edit_spec``'s type fill in."""
    words = {"to": edit_spec["to"]} if edit_spec["type"] in ("recolor", "background") else {}
    if "relation" in edit_spec:
        words["rel"] = RELATIONS[edit_spec["relation"]][2]
        words["anchor"] = Obj(**edit_spec["anchor"]).name
    if "objects" in edit_spec:
        words["obj"], words["other"] = (Obj(**o).name for o in edit_spec["objects"])
    elif edit_spec["type"] == "count":
        n = edit_spec["n"]
        kind = edit_spec["object"]
        words.update(n=str(n), n_word=("one", "two")[n - 1], things=f"{kind['color']} {kind['shape']}{'s' * (n > 1)}")
    elif "object" in edit_spec:
        o = Obj(**edit_spec["object"])
        words.update(obj=o.name, new=o.name, cell=_cell_text(o.cell))
    return words


def _cell_text(cell: tuple[int, int]) -> str:
    return f"row {cell[0] + 1}, column {cell[1] + 1}"


# ------------------------------------------------------------------------------------------------ CoT


def cot_text(edit: Edit, cell_px: int) -> str:
    """A short, exact reasoning text: where the referenced objects are (cell and pixel box), then what changes.

    Boxes are ``[x1, y1, x2, y2]`` in pixels, PIL convention (``x2``, ``y2`` exclusive), of the whole cell.
    """
    def where(cell: tuple[int, int]) -> str:
        return f"{_cell_text(cell)} {_box(cell, cell_px)}"

    spec, source = edit.spec, edit.source
    rest = "everything else stays unchanged."
    kind = spec["type"]
    if kind == "background":
        objects = _things(len(source.objects), "object")
        return f"The background is {spec['from']}. It becomes {spec['to']}; the {objects} stay as they are."
    if kind == "count":
        name = f"{spec['object']['color']} {spec['object']['shape']}"
        have = [o.cell for o in source.objects if o.name == name]
        new = list(_changes(source, spec))
        return (f"There {_be(len(have))} {_things(len(have), name)}, at {'; '.join(map(where, have))}. The first "
                f"{_things(len(new), 'empty cell')} in reading order {_be(len(new))} {'; '.join(map(where, new))}. "
                f"A {name} goes in each, making {_things(len(have) + len(new), name)}; {rest}")
    if kind == "swap":
        a, b = (Obj(**o) for o in spec["objects"])
        return f"The {a.name} is at {where(a.cell)}. The {b.name} is at {where(b.cell)}. They exchange cells; {rest}"
    o = Obj(**spec["object"])
    if kind == "recolor":
        return f"The {o.name} is at {where(o.cell)}. It becomes {spec['to']}; {rest}"
    if kind == "add":
        return f"The cell at {where(o.cell)} is empty. A {o.name} goes there; {rest}"
    if kind == "remove":
        return f"The {o.name} is at {where(o.cell)}. That cell becomes empty {source.background} background; {rest}"
    anchor = Obj(**spec["anchor"])
    rel = RELATIONS[spec["relation"]][2]
    target = (spec["to"]["row"], spec["to"]["col"]) if kind == "move_relative" else o.cell
    text = f"The {anchor.name} is at {where(anchor.cell)}. The cell {rel} it, at {where(target)}, is empty. "
    if kind == "move_relative":
        return f"The {o.name} is at {where(o.cell)}. {text}The {o.name} moves there; {rest}"
    return f"{text}A {o.name} goes there; {rest}"


def _things(n: int, name: str) -> str:
    return f"{n} {name}{'s' * (n != 1)}"


def _be(n: int) -> str:
    return "is" if n == 1 else "are"


def _box(cell: tuple[int, int], cell_px: int) -> str:
    row, col = cell
    return f"[{col * cell_px}, {row * cell_px}, {(col + 1) * cell_px}, {(row + 1) * cell_px}]"


# ------------------------------------------------------------------------------------------------ dataset


def generate(spec: Any, family: str, n: int, seed: int) -> list[dict]:
    """``n`` dataset rows of ``family``, a pure function of its arguments (same seed: byte-identical PNGs)."""
    world = WorldSpec.of(spec)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        edit = sample_edit(rng, world, family)
        rows.append({
            "id": f"{family}-{seed}-{i:06d}",
            "source_image": render(edit.source, world.cell_px),
            "target_image": render(edit.target, world.cell_px),
            "instruction": edit.instruction,
            "edit_type": edit.edit_type,
            "family": edit.family,
            "source_scene": edit.source.to_json(),
            "target_scene": edit.target.to_json(),
            "edit_spec": json.dumps(edit.spec, sort_keys=True, separators=(",", ":")),
            "cot": cot_text(edit, world.cell_px),
        })
    return rows
