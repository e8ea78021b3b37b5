"""The ``sft`` step: supervised fine-tuning of Emu3 on tokenized edits (spec §B).

    python -m earl.sft --config config/config.yaml --experiment sft_s --stage 0 --out results/sft/<name>-<hash>

checks the config and inputs in the calling process (one-line errors before anything starts), then launches
``sft.num_processes`` workers on this node with torchrun (``torch.distributed.run``), each running the training.

Reads the tokenized datasets of one SFT stage of an experiment, mixes them with the stage's coefficients (spec
§B.3), builds ``BOS + source block + instruction | [CoT] + target block + EOS`` with the loss on the target
only (:meth:`earl.layout.Layout.sft_example`), right-pads, and trains with transformers' Trainer under DeepSpeed
ZeRO-3 (or plain DDP) with the paper's optimiser and schedule. Over-length examples are dropped and counted,
never truncated into broken image blocks. The Trainer's own checkpoints make a killed run resume where it
stopped. The result is a ``save_pretrained`` directory of :class:`~transformers.Emu3ForCausalLM` (weights,
config, tokenizer, generation config), the training curves, a quality check on held-out edits, and the manifest.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
import warnings
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import (
    DataCollatorForSeq2Seq,
    EarlyStoppingCallback,
    Emu3ForCausalLM,
    Emu3TextConfig,
    GenerationConfig,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from transformers.trainer_utils import get_last_checkpoint

from earl import artifacts, heldout, layout as layout_mod
from earl.cli_util import peak_gpu_memory_gib, run_distributed, start_deepspeed_comm
from earl.config import SFT, Config, ConfigError, Stage
from earl.engine import HFEngine, SamplingParams
from earl.models import WeightsMismatch, fingerprint, load_checked, load_lm, load_vq
from earl.rewards import Verifier
from earl.sources import DataError
from earl.text_tokenizer import load_text_tokenizer

CHECKPOINTS = "checkpoints"
REPO = Path(__file__).resolve().parents[2]  # the checkout, where config/deepspeed/*.json live


# ------------------------------------------------------------------------------------------- the data


def mixture(sizes: dict[str, int], coefficients: dict[str, float | None], seed: int) -> list[tuple[str, int]]:
    """(dataset, row) pairs of one epoch, mixed as the original did (spec §B.3), then shuffled.

    No coefficients (all null): each dataset is upsampled to the largest (coefficient = max size / size).
    A coefficient c repeats the dataset floor(c) times and adds a random floor(size · frac(c)) rows without
    replacement; c < 1 is a random subsample of floor(size · c) rows.
    """
    rng = np.random.default_rng(seed)
    if all(c is None for c in coefficients.values()):
        largest = max(sizes.values())
        coefficients = {name: largest / sizes[name] for name in coefficients}
    pairs = []
    for name, coefficient in coefficients.items():
        size, whole = sizes[name], int(math.floor(coefficient))
        rows = list(range(size)) * whole
        rows += rng.choice(size, int(math.floor(size * (coefficient - whole))), replace=False).tolist()
        pairs += [(name, int(r)) for r in rows]
    order = rng.permutation(len(pairs))
    return [pairs[i] for i in order]


def examples(rows: datasets.Dataset, layout: layout_mod.Layout, cot_keys: list[str]) -> datasets.Dataset:
    """Token ids and labels of every row (prompt masked to -100)."""

    def one(row: dict) -> dict:
        cot = layout_mod.cot_text(json.loads(row["cot"] or "{}"), cot_keys) if cot_keys else None
        input_ids, labels = layout.sft_example(
            np.asarray(row["source_codes"]), row["instruction"], np.asarray(row["target_codes"]), cot or None
        )
        return {"input_ids": input_ids, "labels": labels}

    return rows.map(one, remove_columns=rows.column_names, desc="sft examples")


def drop_long(data: datasets.Dataset, max_length: int) -> tuple[datasets.Dataset, int]:
    """Drop (and count) examples longer than ``max_length``: a truncated image block would teach broken output."""
    keep = [i for i, n in enumerate(map(len, data["input_ids"])) if n <= max_length]
    return data.select(keep), len(data) - len(keep)


class TargetLogitsCollator(DataCollatorForSeq2Seq):
    """Right-padded batches whose model call computes logits from the first supervised position on only.

    The loss covers the target alone, so the prompt's logits are waste: a fifth of the default model's FLOPs per token
    are its LM head, and Emu3's 184,622 columns make its largest activation. The batch asks for ``logits_to_keep`` = the
    positions from the one that predicts the batch's first target token to the end, and carries the labels of
    those positions only, which the model's causal-LM loss shifts as usual: the same loss as full logits.
    """

    def __call__(self, features, return_tensors=None):
        batch = super().__call__(features, return_tensors)
        first = int((batch["labels"] != -100).any(0).int().argmax()) - 1  # ≥ 0: BOS is never a target
        batch["logits_to_keep"] = torch.arange(first, batch["labels"].shape[1])
        batch["labels"] = batch["labels"][:, first:]
        return batch


def load_tokenized(config: Config, name: str, split: str) -> datasets.Dataset:
    directory = artifacts.Paths(config).tokenized(name)
    files = sorted(str(p) for p in directory.glob(f"{split}-*.parquet"))
    if not files:
        raise DataError(f"{directory}: no tokenized {split!r} shards (run the tokenize rule first)")
    return datasets.load_dataset("parquet", data_files=files, split="train")


def stage_data(config: Config, stage: Stage, layout: layout_mod.Layout) -> tuple[datasets.Dataset, datasets.Dataset, dict]:
    """The mixed training set, the validation set (``validation_size`` split evenly), and counts for the manifest."""
    spec = config.sft
    train, validation, stats = {}, [], {}
    per_dataset = max(1, spec.validation_size // len(stage.datasets))
    for name in stage.datasets:
        train[name], dropped = drop_long(examples(load_tokenized(config, name, "train"), layout, stage.cot_keys), spec.max_length)
        held = examples(load_tokenized(config, name, "validation"), layout, stage.cot_keys)
        held, dropped_validation = drop_long(held, spec.max_length)
        pick = np.random.default_rng(spec.seed).permutation(len(held))[:per_dataset]
        validation.append(held.select(sorted(pick.tolist())))
        stats[name] = {"train_rows": len(train[name]), "dropped_over_length": dropped + dropped_validation}
    pairs = mixture({n: len(d) for n, d in train.items()}, stage.datasets, spec.seed)
    for name in train:
        stats[name]["mixed_rows"] = sum(1 for n, _ in pairs if n == name)
    offsets = np.cumsum([0, *[len(d) for d in train.values()]])
    start = dict(zip(train, offsets.tolist()))
    mixed = datasets.concatenate_datasets(list(train.values())).select([start[n] + r for n, r in pairs])
    return mixed, datasets.concatenate_datasets(validation), stats


# ------------------------------------------------------------------------------------------ the model


def start_model(config: Config, tokenizer, ids: layout_mod.SpecialIds, parent: Path | None) -> Emu3ForCausalLM:
    """The previous stage's output, the configured checkpoint, or a new seeded model from ``architecture``.

    Dropout comes from config either way, so SFT and RL agree (spec §F.12).
    """
    spec = config.sft
    set_seed(spec.seed)
    if parent is not None or spec.model is not None:
        source = parent or spec.model
        try:
            return load_lm(source, None if parent else spec.revision, attention_dropout=spec.dropout)
        except OSError as error:
            raise ConfigError(f"sft.model: cannot load {source!r}: {str(error).splitlines()[0]}") from None
        except WeightsMismatch as error:
            raise ConfigError(f"sft.model: {error}") from None
    if spec.architecture is None:
        raise ConfigError("sft.architecture: required when sft.model is null")
    architecture = dict(spec.architecture)
    vocab_size = architecture.pop("vocab_size", len(tokenizer))
    if vocab_size < len(tokenizer):
        raise ConfigError(f"sft.architecture.vocab_size: {vocab_size} is smaller than the tokenizer's {len(tokenizer)} ids")
    text_config = Emu3TextConfig(
        **architecture, vocab_size=vocab_size, pad_token_id=ids.pad, bos_token_id=ids.bos,
        eos_token_id=ids.eos, attention_dropout=spec.dropout,
    )
    # _from_config, not the constructor: under ZeRO-3 (TrainingArguments and DeepSpeed's communicator started
    # first, in train) transformers builds the model inside deepspeed.zero.Init, so each rank only ever holds
    # its shard, initialised on its own device.
    return Emu3ForCausalLM._from_config(text_config)


def deepspeed_config(spec: SFT) -> str | None:
    """Path of the DeepSpeed JSON, checked for a known ZeRO stage before any process starts training."""
    if spec.deepspeed is None:
        return None
    path = Path(spec.deepspeed)
    if not path.is_absolute() and not path.exists() and (REPO / path).exists():
        path = REPO / path  # a path of this repository (config/deepspeed/...), run from another directory
    try:
        ds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"sft.deepspeed: cannot read {path}: {error}") from None
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"sft.deepspeed: {path} has unknown ZeRO stage {stage!r} (0, 1, 2 or 3)")
    return str(path)


# -------------------------------------------------------------------------------------- training loop


class CurvesCallback(TrainerCallback):
    """Training curves as CSV (loss, eval loss, learning rate, grad norm, tokens/s) beside TensorBoard's."""

    FIELDS = ("step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second", "time")

    def __init__(self, path: Path):
        self.path, self.last = path, None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now, seen = time.time(), state.num_input_tokens_seen
        rate = None
        if self.last is not None and now > self.last[0] and seen > self.last[1]:
            rate = (seen - self.last[1]) / (now - self.last[0])
        if "loss" in logs:
            self.last = (now, seen)
        row = {**{k: logs.get(k) for k in self.FIELDS}, "step": state.global_step, "epoch": state.epoch,
               "tokens_per_second": rate, "time": now}
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)


# the schedulers that end at a floor, and what transformers calls the floor there
MIN_LR_RATE = {"cosine_with_min_lr": "min_lr_rate", "warmup_stable_decay": "min_lr_ratio"}


def scheduler_kwargs(spec: SFT) -> dict:
    """``lr_scheduler_kwargs`` plus ``min_lr`` as a rate of the peak LR, for the schedulers that take a floor.

    A rate, because DeepSpeed's ZeRO-3 optimizer wrapper has no ``defaults`` to read the base LR from.
    """
    kwargs = dict(spec.lr_scheduler_kwargs)
    if spec.lr_scheduler_type in MIN_LR_RATE:
        kwargs[MIN_LR_RATE[spec.lr_scheduler_type]] = spec.min_lr / spec.learning_rate
    return kwargs


def training_args(spec: SFT, work: Path, use_cpu: bool) -> TrainingArguments:
    early = spec.early_stopping_patience is not None
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(work / "tensorboard"))  # transformers 5 reads it from here
    return TrainingArguments(
        output_dir=str(work / CHECKPOINTS),
        per_device_train_batch_size=spec.per_device_train_batch_size,
        per_device_eval_batch_size=spec.per_device_train_batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        learning_rate=spec.learning_rate,
        lr_scheduler_type=spec.lr_scheduler_type,
        lr_scheduler_kwargs=scheduler_kwargs(spec),
        warmup_steps=spec.warmup_steps,
        adam_beta1=spec.adam_beta1,
        adam_beta2=spec.adam_beta2,
        adam_epsilon=spec.adam_epsilon,
        weight_decay=spec.weight_decay,
        max_grad_norm=spec.max_grad_norm,
        bf16=spec.bf16,
        num_train_epochs=spec.num_train_epochs,
        max_steps=spec.max_steps,
        eval_strategy="steps",
        eval_steps=spec.eval_steps,
        save_strategy="steps" if spec.save_steps else "no",
        **({"save_steps": spec.save_steps} if spec.save_steps else {}),
        save_total_limit=spec.save_total_limit,
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        logging_steps=spec.logging_steps,
        report_to=spec.report_to,
        include_num_input_tokens_seen="non_padding",
        activation_checkpointing=spec.gradient_checkpointing,
        deepspeed=deepspeed_config(spec),
        seed=spec.seed,
        data_seed=spec.seed,
        use_cpu=use_cpu,
        dataloader_num_workers=0,
        disable_tqdm=False,
        save_only_model=False,
    )


# ------------------------------------------------------------------------------------ quality check


def quality_check(config: Config, stage: Stage, model: Emu3ForCausalLM, layout: layout_mod.Layout) -> dict | None:
    """Greedy and T=1 edits of held-out rows, scored by the verifier, next to the copy-the-source baseline."""
    check = config.sft.quality_check
    names = [n for n in stage.datasets if config.datasets[n].source.kind == "shapes"]
    if check is None or not names:
        return None
    vq = load_vq(artifacts.Paths(config).vq())
    engine = HFEngine(model.eval(), layout, check.batch_size)
    report = {}
    for name in names:
        rows = load_tokenized(config, name, check.split)
        rows = [rows[i] for i in range(min(check.samples, len(rows)))]
        verifier = Verifier(config.datasets[name].source)
        result = {}
        for label, temperature in (("greedy", 0.0), ("sampled", 1.0)):
            params = SamplingParams(max_tokens=check.max_tokens, temperature=temperature, seed=config.sft.seed)
            images = heldout.edit_rows(engine, layout, vq, rows, config.evaluate.assistant_prefill, params)
            result[label] = heldout.summarize(heldout.score_edits(verifier, vq, rows, images))
        copies = heldout.decode_all(vq, [np.asarray(r["source_codes"]) for r in rows])
        result["copy_source"] = heldout.summarize(heldout.score_edits(verifier, vq, rows, copies))
        report[name] = result
    return report


# --------------------------------------------------------------------------------------------- step


def check(config: Config, out: Path, experiment: str, stage: int) -> int:
    """Everything that can be wrong before training starts, as one-line errors; returns the process count."""
    if experiment not in config.experiments:
        raise ConfigError(f"--experiment {experiment!r} is not in config.experiments ({sorted(config.experiments)})")
    stages = config.experiments[experiment].sft
    if not 0 <= stage < len(stages):
        raise ConfigError(f"--stage {stage}: experiment {experiment!r} has {len(stages)} SFT stage(s)")
    deepspeed_config(config.sft)
    model = config.sft.model
    if model is not None and model.startswith((".", "/", "~")) and not Path(model).expanduser().is_dir():
        raise ConfigError(f"sft.model: checkpoint directory {model!r} does not exist")  # not a hub id: a path
    paths = artifacts.Paths(config)
    needed = [*(paths.tokenized(n) for n in stages[stage].datasets), paths.text_tokenizer(), paths.vq()]
    for directory in needed + ([paths.sft(experiment, stage - 1)] if stage > 0 else []):
        artifacts.read_manifest(directory)  # a missing or unfinished input names itself
    return config.sft.num_processes


def train(config: Config, out: Path, experiment: str, stage: int) -> None:
    """One torchrun worker: train, save (all ranks), then rank 0 checks quality and publishes the artifact."""
    stages = config.experiments[experiment].sft
    paths = artifacts.Paths(config)
    spec, this = config.sft, stages[stage]
    torch.set_num_threads(spec.threads_per_process)  # torchrun would leave each worker one thread
    parent = paths.sft(experiment, stage - 1) if stage > 0 else None
    tokenizer = load_text_tokenizer(paths.text_tokenizer())
    codebook_size = artifacts.read_manifest(paths.vq())["codebook_size"]
    layout = layout_mod.Layout(tokenizer, codebook_size)
    work = out.with_name(out.name + ".partial")
    (work / CHECKPOINTS).mkdir(parents=True, exist_ok=True)  # every rank lists it below; the Trainer makes it on rank 0 only

    args = training_args(spec, work, use_cpu=not torch.cuda.is_available())
    if spec.deepspeed is not None:
        start_deepspeed_comm()
    with args.main_process_first(desc="sft examples"):
        train_set, validation, data_stats = stage_data(config, this, layout)
    model = start_model(config, tokenizer, layout.ids, parent)
    callbacks = [CurvesCallback(work / "curves.csv")]
    if spec.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(spec.early_stopping_patience))
    trainer = Trainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=validation, processing_class=tokenizer,
        data_collator=TargetLogitsCollator(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=callbacks,
    )
    # DeepSpeed 0.19 calls collectives torch 2.13 deprecated, ~30 times a step: the log would be all warnings
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    result = trainer.train(resume_from_checkpoint=get_last_checkpoint(str(work / CHECKPOINTS)))
    peak_memory = peak_gpu_memory_gib()  # all ranks, before the save gathers whole tensors
    trainer.save_model(str(work))  # all ranks: ZeRO-3 gathers the sharded weights
    if not trainer.is_world_process_zero():
        return
    unset_hf_deepspeed_config()  # reloads below must build whole tensors, not ZeRO-3 partitions
    tokenizer.save_pretrained(work)
    GenerationConfig(bos_token_id=layout.ids.bos, eos_token_id=layout.ids.eos, pad_token_id=layout.ids.pad).save_pretrained(work)
    inputs = [*(paths.tokenized(n) for n in this.datasets), paths.text_tokenizer(), paths.vq(), *([parent] if parent else [])]
    saved = load_checked(Emu3ForCausalLM, work)  # what the next step will load, not what is in memory
    with artifacts.artifact_dir(out) as work:
        artifacts.write_manifest(
            work, step="sft", config={"sft": spec, "stage": this, "stage_index": stage}, inputs=inputs,
            experiment=experiment, fingerprint=fingerprint(saved), parameters=saved.num_parameters(),
            data=data_stats, train=result.metrics, global_step=trainer.state.global_step,
            best_checkpoint=trainer.state.best_model_checkpoint, quality=quality_check(config, this, saved, layout),
            world_size=int(os.environ.get("WORLD_SIZE", 1)), peak_gpu_memory_gib=peak_memory,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m earl.sft", description=__doc__)
    parser.add_argument("--experiment", required=True, help="experiment name in config.experiments")
    parser.add_argument("--stage", type=int, default=0, help="index of the SFT stage (two-stage SFT: 0, then 1)")
    run_distributed(parser, "earl.sft", check, train, argv, experiment=None, stage=None)


if __name__ == "__main__":
    main()
