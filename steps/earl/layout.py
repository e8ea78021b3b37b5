"""The Emu3 editing sequence format: the only module that knows how images and text become token ids.

Every step (tokenize, sft, rl, evaluate, edit) builds and parses sequences through :class:`Layout`, so a
change of format happens here once. Layout (spec §A.9, §A.10, §C.2, §D.3):

    image block  = BOI "{H}*{W}" IMG  v(0,0) … v(0,W-1) EOL … v(H-1,W-1) EOL  EOF EOI
    SFT prompt   = BOS + block(source) + instruction                       (no loss)
    SFT target   = [CoT prefix + CoT text + "<|end thinking|>"] + block(target) + EOS   (loss)
    RL/eval      = BOS + block(source) + (instruction + prefill)           (instruction and prefill tokenized jointly)
A tokenizer saved with ``instruction_tokens = N`` (the embedded default's) left-fills every instruction with
FILL tokens to exactly N tokens, so the target block always starts the same distance after the source block
(see :meth:`Layout.instruction`); Emu3's own tokenizer has no such setting and sequences are as above.

Special-token ids are looked up in the tokenizer by their Emu3 strings, never hard-coded: with Emu3's own
tokenizer they are the paper's ids (PAD 151643 … visual k → 151854 + k); the embedded default's small
tokenizer has the same strings in the same order at smaller ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD = "<|endoftext|>"
EOL = "<|extra_200|>"
EOF = "<|extra_201|>"
BOS = "<|extra_203|>"
EOS = "<|extra_204|>"
IMG = "<|image token|>"
BOI = "<|image start|>"
EOI = "<|image end|>"
VISUAL = "<|visual token {:06d}|>"
FILL = "<|extra_0|>"  # left-fills instructions to the tokenizer's ``instruction_tokens``; unused by Emu3 itself

# Emu3's special tokens follow the regular BPE vocabulary in exactly this order (spec §1).
EXTRA_COUNT = 205
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD,
    "<|im_start|>",
    "<|im_end|>",
    *(f"<|extra_{i}|>" for i in range(EXTRA_COUNT)),
    IMG,
    BOI,
    EOI,
)

COT_PREFIX = " Let's think step by step. <|start thinking|> "
COT_SUFFIX = "<|end thinking|>"
COT_MAX_CHARS = 1750
RL_PREFILL = BOI  # RL: the model writes the "H*W" header itself (spec §C.2)
EVAL_PREFILL = BOI + "{H}*{W}"  # evaluation pre-fills the header (spec §D.3)
THINK_PREFILL = " Let's think step by step. <|start thinking|>"


def visual_token_strings(codebook_size: int) -> list[str]:
    """The visual-token strings, in code order, that follow :data:`SPECIAL_TOKENS` in an Emu3 vocabulary."""
    return [VISUAL.format(k) for k in range(codebook_size)]


class MalformedImage(ValueError):
    """Generated ids do not contain a well-formed image block."""


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the structural tokens, read from a tokenizer."""

    pad: int
    eol: int
    eof: int
    bos: int
    eos: int
    img: int
    boi: int
    eoi: int
    fill: int
    visual_base: int
    codebook_size: int

    @classmethod
    def from_tokenizer(cls, tokenizer, codebook_size: int) -> SpecialIds:
        """Look every structural token up by its string and check that the visual codes are contiguous."""

        def tid(token: str) -> int:
            ids = tokenizer.convert_tokens_to_ids([token])
            if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer has no token {token!r}: not an Emu3-style vocabulary")
            return int(ids[0])

        base = tid(VISUAL.format(0))
        last = tid(VISUAL.format(codebook_size - 1))
        if last != base + codebook_size - 1:
            raise ValueError(
                f"visual tokens are not contiguous: code 0 -> {base}, code {codebook_size - 1} -> {last}"
            )
        return cls(
            pad=tid(PAD),
            eol=tid(EOL),
            eof=tid(EOF),
            bos=tid(BOS),
            eos=tid(EOS),
            img=tid(IMG),
            boi=tid(BOI),
            eoi=tid(EOI),
            fill=tid(FILL),
            visual_base=base,
            codebook_size=codebook_size,
        )


def cot_text(cot: dict[str, str], keys: list[str]) -> str:
    """CoT text of spec §A.9: each requested key as "key: value" joined by spaces, cut at 1,750 characters."""
    parts = [f"{key}: {str(cot[key]).strip()}" for key in keys if cot.get(key)]
    return " ".join(parts)[:COT_MAX_CHARS]


class Layout:
    """Builds and parses Emu3 editing sequences for one tokenizer and VQ codebook."""

    def __init__(self, tokenizer, codebook_size: int):
        self.tokenizer = tokenizer
        self.ids = SpecialIds.from_tokenizer(tokenizer, codebook_size)
        self.instruction_tokens: int | None = tokenizer.init_kwargs.get("instruction_tokens")

    def text(self, text: str) -> list[int]:
        """Token ids of plain text; special-token strings inside it are recognised, BOS/EOS never added."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def image_block(self, grid: np.ndarray) -> list[int]:
        """BOI "H*W" IMG rows-with-EOL EOF EOI for an H×W grid of VQ codes."""
        grid = np.asarray(grid)
        if grid.ndim != 2 or grid.size == 0:
            raise ValueError(f"image grid must be a non-empty 2-D array, got shape {grid.shape}")
        if grid.min() < 0 or grid.max() >= self.ids.codebook_size:
            raise ValueError(f"VQ codes must lie in [0, {self.ids.codebook_size}), got [{grid.min()}, {grid.max()}]")
        rows, cols = grid.shape
        body = np.empty((rows, cols + 1), dtype=np.int64)
        body[:, :cols] = grid + self.ids.visual_base
        body[:, cols] = self.ids.eol
        return [self.ids.boi, *self.text(f"{rows}*{cols}"), self.ids.img, *body.ravel().tolist(), self.ids.eof, self.ids.eoi]

    def sft_example(
        self, source: np.ndarray, instruction: str, target: np.ndarray, cot: str | None = None
    ) -> tuple[list[int], list[int]]:
        """(input_ids, labels) with the prompt masked to -100 (spec §A.9, §B.1).

        Prompt and target are tokenized separately so no token crosses the seam.
        """
        prompt = [self.ids.bos, *self.image_block(source), *self.instruction(instruction)]
        target_ids = self.text(COT_PREFIX + cot + COT_SUFFIX) if cot else []
        target_ids += [*self.image_block(target), self.ids.eos]
        return prompt + target_ids, [-100] * len(prompt) + target_ids

    def prompt(self, source: np.ndarray, instruction: str, prefill: str = RL_PREFILL) -> list[int]:
        """RL/eval prompt: BOS + block(source) + (instruction + prefill).

        ``prefill`` may contain ``{H}`` and ``{W}``, filled with the source grid's rows and columns.
        """
        rows, cols = np.asarray(source).shape
        fill = self._fill(instruction, len(self.text(instruction)))
        return [self.ids.bos, *self.image_block(source), *fill, *self.text(instruction + prefill.format(H=rows, W=cols))]

    def instruction(self, text: str) -> list[int]:
        """The instruction's ids, left-filled with FILL to ``instruction_tokens`` when the tokenizer sets it.

        Why: to copy an untouched cell the model must attend from each target cell to the same cell of the
        source, a fixed distance back only if the instruction between them has a fixed length. A tiny model
        trained for minutes did not learn the variable distance (it drew an empty grid in the new background,
        greedy cell accuracy 0.89 = the share of empty cells, after 2,200 steps); with the distance fixed it
        copied 99 % of the cells after 900 steps (benchmarks/RESULTS.md).
        """
        ids = self.text(text)
        return self._fill(text, len(ids)) + ids

    def _fill(self, text: str, length: int) -> list[int]:
        if self.instruction_tokens is None:
            return []
        if length > self.instruction_tokens:
            raise ValueError(f"instruction {text!r} has {length} tokens, more than the tokenizer's "
                             f"instruction_tokens={self.instruction_tokens}")
        return [self.ids.fill] * (self.instruction_tokens - length)

    def is_visual(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask of visual-code tokens (the ones whose log-softmax runs over the visual vocabulary)."""
        ids = np.asarray(ids)
        return (ids >= self.ids.visual_base) & (ids < self.ids.visual_base + self.ids.codebook_size)

    def parse_grid(self, ids) -> np.ndarray:
        """Inverse of :meth:`image_block`: the H×W code grid of the first IMG … EOI span in ``ids``.

        Only the span after IMG is read, so this works on full blocks, on completions whose header was
        pre-filled, and on completions preceded by CoT text. Raises :class:`MalformedImage` with the reason.
        """
        ids = np.asarray(ids, dtype=np.int64).ravel()
        starts = np.flatnonzero(ids == self.ids.img)
        if starts.size == 0:
            raise MalformedImage("no <|image token|> in the generated ids")
        body = ids[starts[0] + 1 :]
        ends = np.flatnonzero(body == self.ids.eof)
        if ends.size == 0:
            raise MalformedImage("image block has no EOF: generation stopped inside the image")
        body, tail = body[: ends[0]], body[ends[0] + 1 :]
        if tail.size == 0 or tail[0] != self.ids.eoi:
            raise MalformedImage("EOF is not followed by <|image end|>")
        if body.size == 0 or body[-1] != self.ids.eol:
            raise MalformedImage("last image row is not closed by EOL")
        rows = np.split(body, np.flatnonzero(body == self.ids.eol) + 1)[:-1]
        widths = {row.size - 1 for row in rows}
        if len(widths) != 1 or 0 in widths:
            raise MalformedImage(f"ragged image rows: widths {sorted(widths)}")
        grid = np.stack([row[:-1] for row in rows])
        if not self.is_visual(grid).all():
            bad = grid[~self.is_visual(grid)][0]
            raise MalformedImage(f"non-visual token id {bad} inside the image rows")
        return grid - self.ids.visual_base
