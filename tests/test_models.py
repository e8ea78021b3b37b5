"""Loading guards: a wrong class must not silently give random weights."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Emu3Config, Emu3ForCausalLM, Emu3ForConditionalGeneration, Emu3TextConfig

from earl import artifacts
from earl.models import WeightsMismatch, fingerprint, load_checked, load_lm

TINY_TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
TINY_VQ = dict(codebook_size=16, base_channels=32, channel_multiplier=[1, 1, 1, 1], num_res_blocks=1,
               attn_resolutions=[], temporal_downsample_factor=1, hidden_size=32)


@pytest.fixture
def saved_conditional(tmp_path):
    torch.manual_seed(0)
    model = Emu3ForConditionalGeneration(Emu3Config(text_config=TINY_TEXT, vq_config=TINY_VQ, vocabulary_map={}))
    model.save_pretrained(tmp_path)
    artifacts.write_manifest(tmp_path, step="sft", config={}, inputs=[], fingerprint=fingerprint(model))
    return tmp_path, model


def test_concrete_class_loads_the_saved_weights(saved_conditional):
    path, model = saved_conditional
    loaded = load_checked(Emu3ForConditionalGeneration, path)
    assert fingerprint(loaded) == fingerprint(model)


def test_auto_class_on_conditional_checkpoint_is_caught(saved_conditional):
    path, _ = saved_conditional
    with pytest.raises(WeightsMismatch, match="fingerprint"):
        load_checked(AutoModelForCausalLM, path)


def test_changed_files_are_caught(saved_conditional):
    path, model = saved_conditional
    other = Emu3ForConditionalGeneration(model.config)
    other.save_pretrained(path)  # same class and shapes, different weights: the manifest no longer matches
    with pytest.raises(WeightsMismatch):
        load_checked(Emu3ForConditionalGeneration, path)


def test_load_lm_reads_an_artifact_and_refuses_a_checkpoint_missing_weights(saved_conditional, tmp_path):
    torch.manual_seed(0)
    lm = Emu3ForCausalLM(Emu3TextConfig(**TINY_TEXT))
    lm.save_pretrained(tmp_path / "lm")
    artifacts.write_manifest(tmp_path / "lm", step="sft", config={}, inputs=[], fingerprint=fingerprint(lm))
    assert fingerprint(load_lm(tmp_path / "lm")) == fingerprint(lm)  # with a manifest: checked, not a tuple
    model, info = load_checked(Emu3ForCausalLM, tmp_path / "lm", output_loading_info=True)
    assert fingerprint(model) == fingerprint(lm) and not info["missing_keys"]
    path, _ = saved_conditional
    (path / artifacts.MANIFEST).unlink()  # no fingerprint to compare: the missing keys must still be caught
    with pytest.raises(WeightsMismatch, match="not an Emu3ForCausalLM checkpoint"):
        load_lm(path)
