"""Shared fixtures: Emu3-structured tokenizers and a test-size pipeline built locally, step runners, and a fake
chat-completions judge on 127.0.0.1 (nothing is downloaded in tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path


import pytest
import yaml
from tokenizers import Tokenizer, models

import fake_judge
from earl import artifacts, text_tokenizer
from earl.config import from_dict

REPO = Path(__file__).resolve().parents[1]
# Step CLIs and Snakemake run as subprocesses: make them import this checkout's package, whichever checkout
# an editable install last pointed at.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "steps"), os.environ.get("PYTHONPATH")]))
PAPER_BASE_VOCAB = 151643  # regular BPE ids of Emu3's (Qwen) tokenizer: 0 … 151642
PAPER_CODEBOOK = 32768
TINY_MODEL = {  # an Emu3ForCausalLM of a few thousand parameters: tests check behaviour, not quality
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
    "num_key_value_heads": 1, "max_position_embeddings": 256,
}


def random_emu3(layout, vocab_size: int, **sizes):
    """A randomly initialised (seed 0) Emu3ForCausalLM of the given sizes that speaks ``layout``'s special ids,
    without dropout: the model the engine and GRPO tests generate and score with."""
    import torch
    from transformers import Emu3ForCausalLM, Emu3TextConfig

    torch.manual_seed(0)
    return Emu3ForCausalLM(Emu3TextConfig(
        vocab_size=vocab_size, attention_dropout=0.0, pad_token_id=layout.ids.pad, bos_token_id=layout.ids.bos,
        eos_token_id=layout.ids.eos, **sizes,
    ))


@pytest.fixture(scope="session")
def paper_tokenizer():
    """A tokenizer with Emu3's vocabulary structure and size: 151,643 regular tokens, then the specials."""
    regular = [*"0123456789*", *(f"t{i}" for i in range(PAPER_BASE_VOCAB - 11))]
    base = Tokenizer(models.WordLevel({token: i for i, token in enumerate(regular)}, unk_token="t0"))
    base.pre_tokenizer = text_tokenizer.pre_tokenizer()
    text_tokenizer.add_emu3_tokens(base, PAPER_CODEBOOK)
    return text_tokenizer.wrap(base)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The embedded default's kind of tokenizer: byte-level BPE on a few instructions, 16 VQ codes."""
    corpus = ["make the red circle blue", "add a green square at row 3, column 5", "remove the blue triangle"] * 20
    return text_tokenizer.train_bpe(corpus, vocab_size=300, codebook_size=16)


def tiny_config(results, **overrides) -> dict:
    """The default config at test size: few examples, a few VQ steps; same datasets, same code paths."""
    data = yaml.safe_load(open(REPO / "config" / "config.yaml"))
    data["results"] = str(results)
    for dataset in data["datasets"].values():
        dataset["source"]["splits"] = {"train": 24, "validation": 6, "test": 6}
    data["vq"].update(steps=4, batch_size=8, threads=1)
    data["vq"]["sharpen"].update(steps=2, images_per_step=8)
    data["tokenize"].update(shards=2, workers=1, batch_size=8)
    data["text_tokenizer"]["instruction_tokens"] = 32  # a BPE trained on 48 instructions merges less: up to 24 tokens measured
    data["sft"].update(
        architecture=TINY_MODEL, per_device_train_batch_size=4, max_steps=6, eval_steps=3, save_steps=3,
        logging_steps=1, validation_size=4, num_processes=1, threads_per_process=1, save_total_limit=None,
        quality_check={"split": "test", "samples": 4, "batch_size": 4, "max_tokens": 60},
    )
    data["rl"].update(
        episodes_per_iteration=8, generations_per_sample=4, per_device_batch_size=4, num_iterations=4, save_every=2,
        eval_every=2, heldout_samples=4, rollout_batch_size=8, threads_per_process=1,
    )
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return data


def write_config(path, data) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def step(name: str, config: str, out, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m earl.<name>`` as a rule would."""
    return subprocess.run([sys.executable, "-m", f"earl.{name}", "--config", config, "--out", str(out), *extra],
                          capture_output=True, text=True, env=env)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """data, vq, text_tokenizer and tokenize of both default datasets at test size, through the step CLIs.

    Returns (root, config dict, config file, Paths). Tests write their own outputs under ``root``.
    """
    root = tmp_path_factory.mktemp("pipeline")
    data = tiny_config(root / "results")
    config_file = write_config(root / "config.yaml", data)
    paths = artifacts.Paths(from_dict(data))
    jobs = [("data", paths.data(n), "--dataset", n) for n in data["datasets"]]
    jobs += [("vq", paths.vq()), ("text_tokenizer", paths.text_tokenizer())]
    jobs += [("tokenize", paths.tokenized(n), "--dataset", n) for n in data["datasets"]]
    for name, out, *extra in jobs:
        result = step(name, config_file, out, *extra)
        assert result.returncode == 0, result.stderr
    return root, data, config_file, paths


def kill_tree_when(command: list[str], ready, timeout: float = 300, **popen) -> None:
    """Start ``command``, wait until the file ``ready`` exists, then SIGKILL its whole process tree, like a node
    failure. The tree is listed first and its root killed first, so no survivor sees a child die and cleans up
    (Snakemake would record a failed job); torchrun's workers live in their own sessions, so a process group is
    not enough."""
    import psutil

    process = subprocess.Popen(
        command, **{"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, **popen}, start_new_session=True
    )
    deadline = time.time() + timeout
    while not Path(ready).exists():
        assert process.poll() is None and time.time() < deadline, f"{command[:3]} ended before {ready} appeared"
        time.sleep(0.05)
    parent = psutil.Process(process.pid)
    for victim in [parent, *parent.children(recursive=True)]:
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()


def kill_step_when(name: str, config: str, out, ready, *extra: str, timeout: float = 300) -> None:
    """Start ``python -m earl.<name>`` as a rule would and kill its process tree once ``ready`` exists."""
    kill_tree_when([sys.executable, "-m", f"earl.{name}", "--config", config, "--out", str(out), *extra], ready,
                   timeout=timeout)


def orphaned_shm() -> set[Path]:
    """DeepSpeed all-reduce buffers in /dev/shm that no live process maps: RAM lost until the machine reboots."""
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(line.split(maxsplit=5)[-1] for line in maps.read_text().splitlines() if "/dev/shm/" in line)
        except OSError:  # the process ended while being read
            pass
    return {path for path in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*") if str(path) not in mapped}


def serve(**kwargs):
    httpd = fake_judge.make_server(0, **kwargs)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()


@pytest.fixture
def server():
    yield from serve(fault_rate=0.3)


@pytest.fixture
def scoring_server():
    """A judge without faults whose scores depend on the edited image: GRPO gets a learning signal in every
    iteration (a test-size model's edits all score 0 with the verifier), the same on any number of ranks."""
    yield from serve(fault_rate=0.0, by_image=True)
