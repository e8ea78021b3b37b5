"""Versioned artifact paths, manifests and atomic writes.

Every step writes into ``results/<step>/<name>-<hash>/`` where ``<hash>`` covers the step's own config section
and the hashes of its inputs (which are in their paths). Changing a dataset therefore changes the path of its
tokenized shards and of everything trained on them, while untouched branches keep their paths, so Snakemake
reruns exactly the affected jobs. The Snakefile and the step CLIs compute paths with the same :class:`Paths`.

A step never leaves a directory that looks complete without being complete: it works in ``<dir>.partial/``
(which also holds resumable progress) and renames it to ``<dir>`` only after writing ``manifest.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from earl.config import Config

HASH_CHARS = 10
MANIFEST = "manifest.json"
TRACKED_PACKAGES = ("earl-pipeline", "torch", "transformers", "tokenizers", "datasets", "pyarrow", "numpy", "pillow")


def stable_hash(*parts: Any) -> str:
    """Short sha256 of a canonical JSON rendering (sorted keys), stable across runs and machines."""
    payload = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=_plain)
    return hashlib.sha256(payload.encode()).hexdigest()[:HASH_CHARS]


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return value.as_posix()
    raise TypeError(f"cannot hash {type(value).__name__}")


# How much of a GPU the vllm engine takes is a resource setting, like tokenize.workers: left out of the versions.
RESOURCE_SETTINGS = {"vllm_gpu_memory_utilization"}


def versioned(section: BaseModel) -> dict:
    """The part of a config section that versions its step's output."""
    return section.model_dump(mode="json", exclude=RESOURCE_SETTINGS)


class Paths:
    """Artifact directories of one config: the DAG's file names, shared by the Snakefile and the steps."""

    def __init__(self, config: Config):
        self.config = config
        self.root = Path(config.results)

    def data(self, name: str) -> Path:
        """Generated parquet splits of a ``shapes`` dataset."""
        return self.root / "data" / f"{name}-{stable_hash(self.config.datasets[name].source)}"

    def generated(self, names) -> list[Path]:
        """Data directories of those named datasets the pipeline generates (a hub dataset is read in place)."""
        return [self.data(n) for n in names if self.config.datasets[n].source.kind == "shapes"]

    def vq(self) -> Path:
        vq = self.config.vq
        inputs = [p.name for p in self.generated(getattr(vq, "datasets", []))]
        return self.root / "vq" / f"{vq.kind}-{stable_hash(vq, inputs)}"

    def text_tokenizer(self) -> Path:
        tok = self.config.text_tokenizer
        inputs = [p.name for p in self.generated(getattr(tok, "datasets", []))]
        return self.root / "tokenizer" / f"{tok.kind}-{stable_hash(tok, inputs, self.vq().name)}"

    def tokenized(self, name: str) -> Path:
        dataset = self.config.datasets[name]
        own = {"dataset": dataset, "tokenize": self.config.tokenize.model_dump(exclude={"workers"})}
        inputs = [p.name for p in self.generated([name])]
        return self.root / "tokenized" / f"{name}-{stable_hash(own, inputs, self.vq().name)}"

    def sft(self, experiment: str, stage: int = -1) -> Path:
        """Output of SFT stage ``stage`` (default: the last) of ``experiment``.

        Named by what it is trained on, not by the experiment, so two experiments with the same SFT stages
        (and the same sft section) share one artifact.
        """
        stages = self.config.experiments[experiment].sft
        stage = stage % len(stages)
        this = stages[stage]
        inputs = [self.tokenized(n).name for n in this.datasets] + [self.text_tokenizer().name]
        parent = self.sft(experiment, stage - 1).name if stage > 0 else None
        label = "+".join(this.datasets)
        return self.root / "sft" / f"{label}-{stable_hash(self.config.sft, this, inputs, parent)}"

    def rl(self, experiment: str) -> Path:
        """GRPO output of ``experiment``: named by its RL pool, versioned by the SFT start, pool and rl section."""
        stage = self.config.experiments[experiment].rl
        inputs = [self.sft(experiment).name, *(self.tokenized(n).name for n in stage.datasets)]
        label = "+".join(stage.datasets)
        return self.root / "rl" / f"{label}-{stable_hash(versioned(self.config.rl), stage, inputs)}"

    def model(self, experiment: str) -> Path:
        """The experiment's final model: its RL output, or its last SFT stage when it has no RL."""
        return self.rl(experiment) if self.config.experiments[experiment].rl else self.sft(experiment)

    def evaluate(self, experiment: str, benchmark: str) -> Path:
        """Edits and scores of the experiment's final model on one benchmark.

        Versioned by the model, not the experiment: experiments ending in the same model share the evaluation.
        """
        bench = self.config.benchmarks[benchmark]
        inputs = [self.model(experiment).name, self.vq().name, *(self.tokenized(p.dataset).name for p in bench.parts)]
        return self.root / "evaluate" / f"{benchmark}-{stable_hash(versioned(self.config.evaluate), bench, inputs)}"

    def report(self) -> Path:
        """Tables, figures and sample grids of every experiment: one report per results root, rebuilt in place."""
        return self.root / "report"


# ------------------------------------------------------------------------------------------- manifests


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


# Manifest facts that say when or how fast a step ran, not what it made.
VOLATILE = frozenset({"created", "train_runtime", "train_samples_per_second", "train_steps_per_second"})


def identity(manifest: Any) -> Any:
    """A manifest without its :data:`VOLATILE` facts: equal for two runs that made the same thing."""
    if isinstance(manifest, dict):
        return {k: identity(v) for k, v in manifest.items() if k not in VOLATILE}
    if isinstance(manifest, list):
        return [identity(v) for v in manifest]
    return manifest


def input_hashes(inputs: list[Path]) -> dict[str, str]:
    """Hash of each input's manifest identity, so a manifest names exactly what it was built from, and a rerun
    from scratch that made the same inputs records the same hashes."""
    return {
        str(p): hashlib.sha256(json.dumps(identity(read_manifest(Path(p))), sort_keys=True).encode()).hexdigest()[:16]
        for p in inputs
    }


def write_manifest(directory: Path, *, step: str, config: Any, inputs: list[Path], **facts: Any) -> dict:
    """Write ``manifest.json``: the step, its config and hash, input hashes, versions, git commit, facts."""
    manifest = {
        "step": step,
        "config": json.loads(json.dumps(config, default=_plain)),
        "config_hash": stable_hash(config),
        "inputs": input_hashes(inputs),
        "versions": _versions(),
        "git_commit": _git_commit(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **facts,
    }
    write_text_atomic(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return manifest


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a finished artifact: {MANIFEST} missing")
    return json.loads(path.read_text())


def input_dirs(directory: Path) -> list[Path]:
    """The input artifacts a manifest names, found where they were recorded (relative to the working directory
    or absolute) or else beside ``directory`` in its results root (``<root>/<step>/<name>``), e.g. a results
    tree copied or read from another checkout."""
    directory = Path(directory)
    found = []
    for recorded in read_manifest(directory)["inputs"]:
        path = Path(recorded)
        candidates = [path, directory.parent.parent / path.parent.name / path.name]
        hit = next((c for c in candidates if (c / MANIFEST).is_file()), None)
        if hit is None:
            raise FileNotFoundError(f"{directory}: input {recorded} not found (looked in {', '.join(map(str, candidates))})")
        found.append(hit)
    return found


# --------------------------------------------------------------------------------------- atomic writes


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``path`` only if the block finishes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def artifact_dir(path: Path) -> Iterator[Path]:
    """Work in ``<path>.partial/`` (kept across crashes for resuming) and publish it as ``<path>`` at the end.

    The caller must write the manifest inside the block; a directory without one is never published.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    yield partial
    if not (partial / MANIFEST).is_file():
        raise RuntimeError(f"{partial}: step finished without writing {MANIFEST}")
    if path.exists():  # a stale output (e.g. Snakemake forced a rerun): replace it as a whole
        shutil.rmtree(path)
    os.replace(partial, path)
