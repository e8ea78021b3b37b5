"""Loading models so that a wrong class or a missing file can never silently yield random weights.

transformers happily builds a model with freshly initialised weights when a checkpoint's keys do not match
the class (e.g. ``AutoModelForCausalLM`` on a saved ``Emu3ForConditionalGeneration`` directory builds an
``Emu3ForCausalLM`` whose weights are all random). So every artifact that holds weights records a
:func:`fingerprint` in its manifest, and :func:`load_checked` loads with a concrete class and compares.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import Emu3ForCausalLM, Emu3VQVAE, PreTrainedModel

from earl.artifacts import MANIFEST, read_manifest


class WeightsMismatch(RuntimeError):
    """Loaded weights differ from the ones the artifact's manifest recorded."""


@torch.no_grad()
def fingerprint(model: torch.nn.Module) -> str:
    """Hash of every tensor's name, shape and float64 sums: one cheap pass, sensitive to any re-initialisation."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to(torch.float64)
        digest.update(f"{name}:{tuple(tensor.shape)}:{t.sum().item():.10e}:{t.abs().sum().item():.10e};".encode())
    return digest.hexdigest()[:16]


def load_checked(cls: type[PreTrainedModel], path: str | Path, revision: str | None = None, **kwargs) -> PreTrainedModel:
    """``cls.from_pretrained`` plus a check against the fingerprint in ``manifest.json`` when there is one.

    With ``output_loading_info=True`` it returns (model, info), as ``from_pretrained`` does.
    """
    loaded = cls.from_pretrained(str(path), revision=revision, **kwargs)
    model = loaded[0] if kwargs.get("output_loading_info") else loaded
    if (Path(path) / MANIFEST).is_file():
        expected = read_manifest(Path(path)).get("fingerprint")
        actual = fingerprint(model)
        if expected is not None and actual != expected:
            raise WeightsMismatch(
                f"{path}: loaded {type(model).__name__} weights have fingerprint {actual}, manifest says {expected}"
                " (wrong model class, or files changed after the step wrote them)"
            )
    return loaded


def load_vq(path: str | Path, revision: str | None = None) -> Emu3VQVAE:
    """The Emu3 VQ tokenizer, in eval mode (it is frozen everywhere but in the ``vq`` rule)."""
    return load_checked(Emu3VQVAE, path, revision).eval()


def load_lm(path: str | Path, revision: str | None = None, **kwargs) -> Emu3ForCausalLM:
    """An ``Emu3ForCausalLM`` whose weights were all read from ``path``: :func:`load_checked`, and a checkpoint
    that lacks any of the class's weights (which transformers would initialise randomly) is refused."""
    model, info = load_checked(Emu3ForCausalLM, path, revision, output_loading_info=True, **kwargs)
    missing = sorted(info["missing_keys"])  # a set in transformers 5
    if missing:
        raise WeightsMismatch(
            f"{str(path)!r} is not an Emu3ForCausalLM checkpoint ({len(missing)} weights missing, e.g. {missing[0]})"
        )
    return model
