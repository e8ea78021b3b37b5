"""The ``text_tokenizer`` step: an Emu3-structured text tokenizer, saved in Hugging Face format.

Paper scale copies Emu3's own tokenizer from the checkpoint. The embedded default trains a small byte-level
BPE on the datasets' instructions and CoT texts and appends Emu3's special tokens in Emu3's order, followed by
one token per VQ code, so :mod:`earl.layout` finds the same strings (and, on a 151,643-token base vocabulary,
the same ids) as with the real tokenizer. Digits are split one per token, as in Emu3's pre-tokenizer, so a
header like ``8*8`` is three tokens.

    python -m earl.text_tokenizer --config config/config.yaml --out results/tokenizer/<hash>
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from earl import artifacts, layout
from earl.cli_util import run_step
from earl.config import BPETokenizer, Config
from earl.sources import load_split
from earl.models import load_vq


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )


def add_emu3_tokens(tokenizer: Tokenizer, codebook_size: int) -> None:
    """Append Emu3's special tokens and the visual-code tokens, in Emu3's order, after the regular vocabulary."""
    strings = [*layout.SPECIAL_TOKENS, *layout.visual_token_strings(codebook_size)]
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in strings])


def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """The HF tokenizer object every step loads (padding on the right: the original padded left by mistake)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=layout.BOS,
        eos_token=layout.EOS,
        pad_token=layout.PAD,
        padding_side="right",
    )


def train_bpe(texts: Iterable[str], vocab_size: int, codebook_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with ``vocab_size`` regular tokens, then Emu3's special and visual tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    add_emu3_tokens(tokenizer, codebook_size)
    return wrap(tokenizer)


def corpus(config: Config, spec: BPETokenizer) -> Iterable[str]:
    """Instructions and CoT texts of the configured training splits."""
    for name in spec.datasets:
        columns = config.datasets[name].columns
        data = load_split(config, name, spec.split)
        for row in data.select_columns([columns.instruction, *columns.cot]):
            yield from (str(v) for v in row.values() if v)


def load_text_tokenizer(path: str | Path, revision: str | None = None, trust_remote_code: bool = False):
    return AutoTokenizer.from_pretrained(str(path), revision=revision, trust_remote_code=trust_remote_code)


def build(config: Config, out: Path) -> None:
    spec = config.text_tokenizer
    paths = artifacts.Paths(config)
    vq_dir = paths.vq()
    codebook_size = load_vq(vq_dir).config.codebook_size
    with artifacts.artifact_dir(out) as work:
        if spec.kind == "bpe":
            tokenizer = train_bpe(corpus(config, spec), spec.vocab_size, codebook_size)
        else:
            tokenizer = load_text_tokenizer(spec.path, spec.revision, spec.trust_remote_code)
        ids = layout.SpecialIds.from_tokenizer(tokenizer, codebook_size)  # fails early on a non-Emu3 vocabulary
        if spec.instruction_tokens is not None:  # saved in tokenizer_config.json: every later Layout reads it
            tokenizer.init_kwargs["instruction_tokens"] = spec.instruction_tokens
        tokenizer.save_pretrained(work)
        artifacts.write_manifest(
            work, step="text_tokenizer", config=spec, inputs=[vq_dir, *paths.generated(getattr(spec, "datasets", []))],
            vocab_size=len(tokenizer), special_ids=json.loads(json.dumps(ids.__dict__)),
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m earl.text_tokenizer", description=__doc__)
    run_step(parser, build, argv)


if __name__ == "__main__":
    main()
