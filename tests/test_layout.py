"""The Emu3 sequence format: exact paper ids, block lengths, SFT/RL layouts and the inverse parse."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from earl import layout
from earl.layout import Layout, MalformedImage

PAPER_IDS = dict(pad=151643, eol=151846, eof=151847, bos=151849, eos=151850, img=151851, boi=151852, eoi=151853)


def test_paper_special_ids(paper_tokenizer):
    ids = layout.SpecialIds.from_tokenizer(paper_tokenizer, 32768)
    assert {k: getattr(ids, k) for k in PAPER_IDS} == PAPER_IDS
    assert ids.visual_base == 151854
    assert paper_tokenizer.convert_tokens_to_ids("<|visual token 032767|>") == 184621
    assert len(paper_tokenizer) == 184622


def test_32x32_block_is_1065_tokens_with_5_header_tokens(paper_tokenizer):
    lay = Layout(paper_tokenizer, 32768)
    grid = np.arange(32 * 32).reshape(32, 32) * 31 % 32768
    block = lay.image_block(grid)
    assert len(block) == 1065
    assert block[0] == PAPER_IDS["boi"] and block[6] == PAPER_IDS["img"]  # BOI, "3","2","*","3","2", IMG
    assert paper_tokenizer.convert_ids_to_tokens(block[1:6]) == ["3", "2", "*", "3", "2"]  # digits split
    assert block[7:7 + 32] == [151854 + int(c) for c in grid[0]]
    assert block[7 + 32] == PAPER_IDS["eol"]
    assert block[-3:] == [PAPER_IDS["eol"], PAPER_IDS["eof"], PAPER_IDS["eoi"]]


@pytest.mark.parametrize("shape", [(1, 1), (8, 8), (27, 37), (32, 32)])
def test_round_trip_ids_grid_ids(tiny_tokenizer, shape):
    lay = Layout(tiny_tokenizer, 16)
    grid = np.random.default_rng(0).integers(0, 16, size=shape)
    block = lay.image_block(grid)
    np.testing.assert_array_equal(lay.parse_grid(block), grid)
    assert lay.image_block(lay.parse_grid(block)) == block


def test_sft_example_masks_exactly_the_prompt(tiny_tokenizer):
    lay = Layout(tiny_tokenizer, 16)
    src, tgt = np.zeros((2, 3), int), np.ones((2, 3), int)
    ids, labels = lay.sft_example(src, "make the red circle blue", tgt)
    prompt = [lay.ids.bos, *lay.image_block(src), *lay.text("make the red circle blue")]
    target = [*lay.image_block(tgt), lay.ids.eos]
    assert ids == prompt + target
    assert labels == [-100] * len(prompt) + target


def test_cot_target_layout(tiny_tokenizer):
    lay = Layout(tiny_tokenizer, 16)
    cot = layout.cot_text({"grounding": "  the red circle [8, 8, 16, 16] ", "thinking": "recolor it", "unused": "x"},
                          ["grounding", "thinking"])
    assert cot == "grounding: the red circle [8, 8, 16, 16] thinking: recolor it"
    ids, labels = lay.sft_example(np.zeros((1, 1), int), "go", np.ones((1, 1), int), cot=cot)
    target = [t for t in labels if t != -100]
    think = lay.text(" Let's think step by step. <|start thinking|> " + cot + "<|end thinking|>")
    assert target == think + lay.image_block(np.ones((1, 1), int)) + [lay.ids.eos]
    assert ids[-len(target):] == target


def test_cot_text_is_cut_at_1750_characters():
    assert len(layout.cot_text({"k": "x" * 5000}, ["k"])) == 1750


def test_prompt_prefill_with_header(tiny_tokenizer):
    lay = Layout(tiny_tokenizer, 16)
    src = np.zeros((3, 4), int)
    ids = lay.prompt(src, "remove the blue triangle", layout.EVAL_PREFILL)
    assert ids[: 1 + len(lay.image_block(src))] == [lay.ids.bos, *lay.image_block(src)]
    assert ids[-4:] == [lay.ids.boi, *lay.text("3*4")]
    assert lay.prompt(src, "go")[-1] == lay.ids.boi  # RL prefill: the model writes the header


def test_instruction_fill_fixes_the_source_to_target_distance(tiny_tokenizer, tmp_path):
    src, tgt = np.zeros((2, 3), int), np.ones((2, 3), int)
    short, long = "go", "add a green square at row 3, column 5"

    def distances(lay):  # BOI of the source block -> BOI of the target block (SFT), and RL prompt lengths
        starts = [ids.index(lay.ids.boi, 2) for ids, _ in (lay.sft_example(src, i, tgt) for i in (short, long))]
        return set(starts), {len(lay.prompt(src, i)) for i in (short, long)}

    plain_sft, plain_rl = distances(Layout(tiny_tokenizer, 16))
    assert len(plain_sft) == 2 and len(plain_rl) == 2  # Emu3's layout: the distance follows the instruction
    tiny_tokenizer.save_pretrained(tmp_path / "plain")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "plain")
    tokenizer.init_kwargs["instruction_tokens"] = 14  # as the text_tokenizer step sets it
    tokenizer.save_pretrained(tmp_path / "filled")  # the setting travels with the tokenizer
    lay = Layout(AutoTokenizer.from_pretrained(tmp_path / "filled"), 16)
    filled_sft, filled_rl = distances(lay)
    assert len(filled_sft) == 1 and len(filled_rl) == 1
    ids, labels = lay.sft_example(src, short, tgt)
    block = 1 + len(lay.image_block(src))
    assert ids[block:block + 14] == [lay.ids.fill] * (14 - len(lay.text(short))) + lay.text(short)
    assert labels[:block + 14] == [-100] * (block + 14)
    assert lay.prompt(src, short)[block:block + 14] == ids[block:block + 14]  # RL and SFT prompts agree
    with pytest.raises(ValueError, match="more than the tokenizer's instruction_tokens=14"):
        lay.prompt(src, long + " and then another one at row 1, column 1")


def test_parse_completion_after_prefill_and_cot(tiny_tokenizer):
    lay = Layout(tiny_tokenizer, 16)
    grid = np.arange(6).reshape(2, 3)
    completion = lay.text("some reasoning") + lay.image_block(grid)[1:] + [lay.ids.eos]
    np.testing.assert_array_equal(lay.parse_grid(completion), grid)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda b, ids: [t for t in b if t != ids.img], "no <|image token|>"),
        (lambda b, ids: b[:-2], "no EOF"),
        (lambda b, ids: b[:-1], "not followed by <|image end|>"),
        (lambda b, ids: b[:7] + b[8:], "ragged"),
        (lambda b, ids: b[:7] + [ids.bos] + b[8:], "non-visual"),
        (lambda b, ids: b[:-4] + b[-2:], "not closed by EOL"),
    ],
)
def test_malformed_blocks_raise_with_reason(tiny_tokenizer, mutate, reason):
    lay = Layout(tiny_tokenizer, 16)
    block = lay.image_block(np.arange(6).reshape(2, 3))
    with pytest.raises(MalformedImage, match=reason):
        lay.parse_grid(mutate(block, lay.ids))


def test_codes_outside_codebook_are_rejected(tiny_tokenizer):
    with pytest.raises(ValueError, match="VQ codes must lie in"):
        Layout(tiny_tokenizer, 16).image_block(np.full((2, 2), 16))


def test_non_emu3_vocabulary_is_rejected(tiny_tokenizer):
    with pytest.raises(ValueError, match="visual tokens are not contiguous|has no token"):
        layout.SpecialIds.from_tokenizer(tiny_tokenizer, 17)
