"""SFT data: label masking, right padding, CoT layout, over-length handling and dataset mixing (spec §A.9, §B)."""

from __future__ import annotations

import json
from collections import Counter

import datasets
import numpy as np
import pytest
from transformers import DataCollatorForSeq2Seq

from conftest import tiny_config
from earl import layout as L
from earl.config import ConfigError, from_dict
from earl.sft import deepspeed_config, drop_long, examples, mixture


def rows(n: int, cot: str | None = None, size: int = 2) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    return datasets.Dataset.from_list([
        {
            "source_codes": rng.integers(0, 16, (size, size)).tolist(),
            "target_codes": rng.integers(0, 16, (size, size)).tolist(),
            "instruction": "make the red circle blue" if i % 2 else "add a green square at row 3, column 5",
            "cot": json.dumps({"cot": cot} if cot else {}),
        }
        for i in range(n)
    ])


def test_loss_covers_exactly_the_target(tiny_tokenizer):
    layout = L.Layout(tiny_tokenizer, 16)
    data = rows(2)
    ex = examples(data, layout, cot_keys=[])
    for row, ids, labels in zip(data, ex["input_ids"], ex["labels"]):
        prompt = [layout.ids.bos, *layout.image_block(np.array(row["source_codes"])), *layout.text(row["instruction"])]
        target = [*layout.image_block(np.array(row["target_codes"])), layout.ids.eos]
        assert ids == prompt + target
        assert labels == [-100] * len(prompt) + target  # BOI of the target block onwards, EOS included


def test_padding_is_on_the_right_with_ignored_labels(tiny_tokenizer):
    layout = L.Layout(tiny_tokenizer, 16)
    ex = examples(rows(2), layout, cot_keys=[])
    lengths = [len(x) for x in ex["input_ids"]]
    assert lengths[0] != lengths[1]
    batch = DataCollatorForSeq2Seq(tiny_tokenizer, padding=True, label_pad_token_id=-100)([ex[0], ex[1]])
    short = int(np.argmin(lengths))
    n = lengths[short]
    assert batch["input_ids"][short, :n].tolist() == ex[short]["input_ids"]  # content first ...
    assert (batch["input_ids"][short, n:] == layout.ids.pad).all()  # ... padding after it
    assert (batch["attention_mask"][short, n:] == 0).all() and (batch["attention_mask"][short, :n] == 1).all()
    assert (batch["labels"][short, n:] == -100).all()


def test_cot_target_layout(tiny_tokenizer):
    layout = L.Layout(tiny_tokenizer, 16)
    cot = "The red circle is at row 1, column 2 [8, 0, 16, 8]."
    data = rows(1, cot=cot)
    ex = examples(data, layout, cot_keys=["cot"])[0]
    target = [i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
    expected_text = " Let's think step by step. <|start thinking|> cot: " + cot + "<|end thinking|>"
    n_text = len(layout.text(expected_text))
    assert tiny_tokenizer.decode(target[:n_text]) == expected_text
    assert target[n_text:] == [*layout.image_block(np.array(data[0]["target_codes"])), layout.ids.eos]
    # without cot_keys the same row has no thinking text
    plain = examples(data, layout, cot_keys=[])[0]
    assert len(plain["input_ids"]) == len(ex["input_ids"]) - n_text


def test_cot_text_is_cut_at_1750_characters(tiny_tokenizer):
    layout = L.Layout(tiny_tokenizer, 16)
    ex = examples(rows(1, cot="x" * 5000), layout, cot_keys=["cot"])[0]
    target = [i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
    text = tiny_tokenizer.decode(target)
    thinking = text[len(L.COT_PREFIX): text.index(L.COT_SUFFIX)]
    assert len(thinking) == L.COT_MAX_CHARS


def test_over_length_examples_are_dropped_and_counted(tiny_tokenizer):
    layout = L.Layout(tiny_tokenizer, 16)
    ex = datasets.concatenate_datasets([examples(rows(3, size=2), layout, []), examples(rows(2, size=4), layout, [])])
    limit = max(len(x) for x in ex.select(range(3))["input_ids"])
    kept, dropped = drop_long(ex, limit)
    assert dropped == 2 and len(kept) == 3
    assert all(len(x) <= limit for x in kept["input_ids"])
    # nothing is truncated: every kept example still ends with a closed image block and EOS
    assert all(x[-3:] == [layout.ids.eof, layout.ids.eoi, layout.ids.eos] for x in kept["input_ids"])


def test_automatic_upsampling_brings_every_dataset_to_the_largest():
    pairs = mixture({"a": 100, "b": 30, "c": 7}, {"a": None, "b": None, "c": None}, seed=0)
    counts = Counter(name for name, _ in pairs)
    # coefficient = 100 / size: floor(c) full copies plus floor(size * frac(c)) extra rows
    assert counts == {"a": 100, "b": 30 * 3 + 10, "c": 7 * 14 + 2}
    b_rows = Counter(r for name, r in pairs if name == "b")
    assert set(b_rows.values()) <= {3, 4} and sum(v == 4 for v in b_rows.values()) == 10  # without replacement


def test_coefficients_repeat_and_subsample_as_the_original():
    pairs = mixture({"a": 50, "b": 40}, {"a": 2.5, "b": 0.25}, seed=1)
    counts = Counter(name for name, _ in pairs)
    assert counts == {"a": 125, "b": 10}
    assert len({r for name, r in pairs if name == "b"}) == 10
    assert [n for n, _ in pairs] != sorted(n for n, _ in pairs)  # shuffled
    assert mixture({"a": 50, "b": 40}, {"a": 2.5, "b": 0.25}, seed=1) == pairs  # seeded


def test_sampled_mixture_proportions_match_the_coefficients():
    """Drawing batches from the mixed epoch gives each dataset its share (chi-square, 3 dof, p = 0.001 bound)."""
    sizes, coefficients = {"a": 400, "b": 200, "c": 100, "d": 300}, {"a": 1.0, "b": 2.0, "c": 0.5, "d": 1.5}
    pairs = mixture(sizes, coefficients, seed=3)
    expected = {n: sizes[n] * coefficients[n] for n in sizes}
    total = sum(expected.values())
    rng = np.random.default_rng(7)
    draws = Counter(pairs[i][0] for i in rng.integers(0, len(pairs), 5000))
    chi2 = sum((draws[n] - 5000 * expected[n] / total) ** 2 / (5000 * expected[n] / total) for n in sizes)
    assert chi2 < 16.27


def test_stage_rejects_partial_coefficients(tmp_path):
    data = tiny_config(tmp_path)
    data["experiments"]["sft_s"]["sft"] = [{"datasets": {"shapes_s": 1.0, "shapes_c": None}}]
    with pytest.raises(ConfigError, match="experiments.sft_s.sft.0"):
        from_dict(data)


def test_unknown_deepspeed_stage_is_one_line(tmp_path):
    bad = tmp_path / "zero4.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    data = tiny_config(tmp_path)
    data["sft"]["deepspeed"] = str(bad)
    with pytest.raises(ConfigError, match=r"^sft\.deepspeed: .*zero4\.json has unknown ZeRO stage 4"):
        deepspeed_config(from_dict(data).sft)
    data["sft"]["deepspeed"] = str(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match=r"^sft\.deepspeed: cannot read .*missing\.json"):
        deepspeed_config(from_dict(data).sft)
