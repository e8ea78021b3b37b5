"""What every step CLI shares: ``--config`` (validated on load) and ``--out``, and one-line errors.

A rule calls ``python -m earl.<step> --config <file> --out <dir>``; the step validates the config itself
(so running it by hand is as safe as through Snakemake) and turns expected failures (bad config, bad data)
into one line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from earl.config import Config, from_dict, read_yaml, ConfigError
from earl.sources import DataError


def read_config(paths: list[str], overrides: list[str]) -> Config:
    """Merge one or more YAML files (later wins, like Snakemake's --configfile) and KEY=VALUE overrides."""
    data: dict = {}
    for path in paths:
        data = _merge(data, read_yaml(path))
    for item in overrides:
        key, _, value = item.partition("=")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return from_dict(data)


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def run_step(parser: argparse.ArgumentParser, build: Callable[..., Any], argv: list[str] | None, **extra) -> Any:
    """Parse the shared arguments and return ``build(config, out, **extra_args)``, with one-line errors."""
    parser.add_argument("--config", nargs="+", required=True, help="config YAML file(s), later files win")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    parser.add_argument("--out", required=True, type=Path, help="the step's versioned output directory")
    args = parser.parse_args(argv)
    try:
        config = read_config(args.config, args.set)
        kwargs = {k: getattr(args, k) for k in extra}
        return build(config, args.out, **kwargs)
    except (ConfigError, DataError) as error:
        sys.exit(f"error: {error}")


def run_distributed(parser: argparse.ArgumentParser, module: str, check: Callable[..., int], train: Callable[..., None],
                    argv: list[str] | None, around: Callable[[Config, Path], contextlib.AbstractContextManager] | None = None,
                    **extra) -> None:
    """A training step's CLI: in the calling process, ``check`` the config and inputs (one-line errors before
    anything starts) and start its returned number of torchrun workers on this node, each running ``module``
    again, inside ``around(config, out)`` (e.g. a judge server the step runs itself); inside a worker
    (``LOCAL_RANK`` set), run ``train``."""
    argv = sys.argv[1:] if argv is None else argv
    if "LOCAL_RANK" in os.environ:
        # DeepSpeed's CPU accelerator reads its device count from LOCAL_SIZE (set by its own launcher, not by
        # torchrun) and otherwise runs `numactl` in a subprocess on every ZeRO-3 gradient reduction: ~9 % of a
        # default SFT step on 2 cores (py-spy, benchmarks/RESULTS.md)
        os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))
        run_step(parser, train, argv, **extra)
        leave_process_group()
        return
    try:
        nproc, config, out = run_step(parser, lambda c, o, **kw: (check(c, o, **kw), c, o), argv, **extra)
    except FileNotFoundError as error:  # an input without its manifest: not built, or not finished
        sys.exit(f"error: {error}")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun  # imported here: the other steps need no torch.distributed

    try:
        with around(config, out) if around else contextlib.nullcontext():
            torchrun([f"--nproc_per_node={nproc}", "--standalone", "-m", module, *argv])
    except ChildFailedError:
        sys.exit(1)  # the worker has printed its own one-line error (or traceback) above
    except ConfigError as error:
        sys.exit(f"error: {error}")


def leave_process_group() -> None:
    """Wait for every worker, then shut this one's process group down before the interpreter exits.

    Without it a worker that finished first (a rank that does not save) exited with gloo's threads still
    running, and now and then died in their destructor ("terminate called without an active exception",
    exit -6) after its work was done, failing the whole run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def start_deepspeed_comm() -> None:
    """Start DeepSpeed's communicator now, not lazily inside the Trainer, and unlink its shared-memory names.

    Now: ``deepspeed.zero.Init`` (a ZeRO-3 model built shard by shard) asks the communicator for the world
    size, and accelerate starts it on GPUs but not on CPU. Unlink: with ``LOCAL_SIZE`` set
    (``run_distributed``), DeepSpeed's CPU accelerator all-reduces through one 66 MB ``/dev/shm`` file per rank,
    named after the rendezvous, and never unlinks it; each CPU run left its files in RAM until a day of runs
    filled the machine and CI ran out of memory. A mapping outlives its name, so once every rank has opened
    every other rank's file (the barrier) the names can go, and a run killed later leaves nothing behind.
    """
    import deepspeed
    import deepspeed.comm as ds_dist

    deepspeed.init_distributed()
    ds_dist.barrier()
    master = f"{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}"
    Path("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{master}_{ds_dist.get_rank()}").unlink(missing_ok=True)


def peak_gpu_memory_gib() -> list[float] | None:
    """Every rank's peak GPU memory so far (``torch.cuda.max_memory_allocated``, GiB), in rank order; a
    collective, so every rank calls it. None without CUDA."""
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        return None
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    if not dist.is_initialized():
        return [peak]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, peak)
    return everyone
