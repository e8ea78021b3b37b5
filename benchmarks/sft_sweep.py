"""How fast does a tiny Emu3 learn the default's edits? An SFT sweep on the GPU, one process per configuration.

    python benchmarks/sft_sweep.py dump --config config/config.yaml --dataset shapes_s --out sweep.npz   # CPU
    python benchmarks/sft_sweep.py run --data sweep.npz --out OUT --configs base='{"steps": 1500}' \\
        bs64='{"steps": 3000, "batch": 64}' L6='{"steps": 3000, "layers": 6}'                          # GPU

``dump`` turns a pipeline run's tokenized train split and 200 validation rows into SFT sequences through
``earl.layout`` (so the tokenizer's ``instruction_tokens`` fill applies) and saves them as one ``.npz``, so that
``run`` needs only torch and transformers (the GPU machine has neither ``datasets`` nor ``pydantic``).
``run`` trains a fresh ``Emu3ForCausalLM`` per configuration with ``DEFAULTS`` (the pipeline default's recipe of an
earlier commit, kept so that recorded sweep commands mean what they meant) plus the configuration's overrides:
AdamW (0.9, ``beta2``), warm-up then cosine to ``min_lr``, clip 5, loss on the target only, over the first
``train_rows`` training rows (all by default). All configurations run
at once on one device; at each of ``evals`` steps ``run`` measures teacher-forced accuracy on the validation rows,
per edit type: ``copy`` on the cells the edit left alone, ``edit`` on the cells it changed, ``kept`` the share of
rows with every cell it left alone right (what the verifier's preservation of 1 needs), ``all_cells`` the share
of rows with every cell right. Minutes of 2-core CPU budget are a few thousand steps here, so the sweep says which
recipe learns the edits within the default's budget before a 10-minute CPU run is spent on it
(benchmarks/RESULTS.md).
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# benchmarks/tokenize.py shadows the standard library's `tokenize` while this folder is first on sys.path.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

DEFAULTS = dict(layers=4, hidden=128, ff=384, heads=4, kv=2, theta=200.0, lr=3e-3, batch=32, weight_decay=0.1,
                warmup=50, min_lr=1e-4, seed=42, tie=False, init=0.02, beta2=0.95, decay=None,
                train_rows=None, evals=[500, 1000, 1500, 2000, 3000])


def dump(config_path: str, dataset: str, out: str, validation_rows: int = 200) -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "steps"))
    from earl import artifacts, layout, sft
    from earl.cli_util import read_config
    from earl.text_tokenizer import load_text_tokenizer

    config = read_config([config_path], [])
    paths = artifacts.Paths(config)
    lay = layout.Layout(load_text_tokenizer(paths.text_tokenizer()), artifacts.read_manifest(paths.vq())["codebook_size"])
    arrays = {}
    for split, n in (("train", None), ("validation", validation_rows)):
        rows = sft.load_tokenized(config, dataset, split)
        rows = rows.select(range(min(n or len(rows), len(rows))))
        seqs = [lay.sft_example(np.asarray(r["source_codes"]), r["instruction"], np.asarray(r["target_codes"]))
                for r in rows]
        width = max(len(ids) for ids, _ in seqs)
        arrays[f"{split}_x"] = np.array([ids + [lay.ids.pad] * (width - len(ids)) for ids, _ in seqs])
        arrays[f"{split}_y"] = np.array([labels + [-100] * (width - len(labels)) for _, labels in seqs])
        arrays[f"{split}_type"] = np.array(rows["edit_type"])
        arrays[f"{split}_changed"] = np.array([np.ravel(r["source_codes"]) != np.ravel(r["target_codes"]) for r in rows])
    arrays["meta"] = np.array([len(lay.tokenizer), lay.ids.pad, lay.ids.bos, lay.ids.eos, lay.ids.visual_base,
                               lay.ids.codebook_size])
    np.savez_compressed(out, **arrays)
    print(f"{out}: {len(arrays['train_x'])} train / {len(arrays['validation_x'])} validation sequences of "
          f"{arrays['train_x'].shape[1]} tokens")


def lr_at(step: int, c: dict) -> float:
    """Linear warm-up, then cosine to ``min_lr``: over all later steps, or (``decay``, a share of the steps) held at
    ``lr`` until the last ``decay`` of them, as transformers' ``warmup_stable_decay`` does."""
    if step < c["warmup"]:
        return c["lr"] * (step + 1) / c["warmup"]
    start = c["steps"] - round(c["decay"] * c["steps"]) if c["decay"] else c["warmup"]
    if step < start:
        return c["lr"]
    progress = (step - start) / max(1, c["steps"] - start)
    return c["min_lr"] + (c["lr"] - c["min_lr"]) * 0.5 * (1 + math.cos(math.pi * progress))


def accuracy(model, x, y, types, changed, vocab_range) -> dict:
    """Teacher-forced accuracy of the visual tokens, per edit type: untouched cells, edited cells, whole grids."""
    import torch

    model.eval()
    with torch.no_grad():
        right = (model(input_ids=x).logits[:, :-1].argmax(-1) == y[:, 1:]).cpu().numpy()
    model.train()
    target = y[:, 1:].cpu().numpy()
    visual = (target >= vocab_range[0]) & (target < vocab_range[1])
    result = {}
    for kind in sorted(set(types)):
        copy, edit, kept, whole = [], [], [], []
        for r in np.flatnonzero(types == kind):
            cells, moved = right[r][visual[r]], changed[r]
            copy += [cells[~moved].mean()] if (~moved).any() else []
            edit += [cells[moved].mean()] if moved.any() else []
            kept.append(cells[~moved].all())
            whole.append(cells.all())
        result[kind] = {name: round(float(np.mean(v)), 3) if v else None
                        for name, v in (("copy", copy), ("edit", edit), ("kept", kept), ("all_cells", whole))}
    return result


def train(name: str, data: str, device: str, **overrides) -> dict:
    import torch
    from transformers import Emu3ForCausalLM, Emu3TextConfig

    c = {**DEFAULTS, **overrides}
    d = np.load(data)
    vocab, pad, bos, eos, visual_base, codebook = map(int, d["meta"])
    torch.manual_seed(c["seed"])
    model = Emu3ForCausalLM(Emu3TextConfig(
        hidden_size=c["hidden"], intermediate_size=c["ff"], num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"], num_key_value_heads=c["kv"], max_position_embeddings=512, vocab_size=vocab,
        pad_token_id=pad, bos_token_id=bos, eos_token_id=eos, attention_dropout=0.0, tie_word_embeddings=c["tie"],
        initializer_range=c["init"],
        rope_parameters={"rope_type": "default", "rope_theta": c["theta"]})).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=c["lr"], betas=(0.9, c["beta2"]), eps=1e-6,
                                  weight_decay=c["weight_decay"])
    x, y = (torch.tensor(d[k][: c["train_rows"]], device=device) for k in ("train_x", "train_y"))
    vx, vy = (torch.tensor(d[k], device=device) for k in ("validation_x", "validation_y"))
    rng, order = np.random.default_rng(c["seed"]), np.empty(0, dtype=np.int64)
    result, start = {"name": name, "config": c, "evals": {}}, time.time()
    for step in range(c["steps"]):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, c)
        if len(order) < c["batch"]:
            order = rng.permutation(len(x))
        batch, order = torch.from_numpy(order[: c["batch"]]).to(device), order[c["batch"]:]
        loss = model(input_ids=x[batch], labels=y[batch]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        if step + 1 in c["evals"] or step + 1 == c["steps"]:
            result["evals"][step + 1] = {"loss": round(loss.item(), 4), **accuracy(
                model, vx, vy, d["validation_type"], d["validation_changed"], (visual_base, visual_base + codebook))}
    result["seconds"] = round(time.time() - start, 1)
    return result


def run(data: str, configs: dict[str, dict], out: Path, device: str) -> list[dict]:
    """Every configuration in its own process, all at once; each result appended to ``out/summary.jsonl`` as it is
    collected, so a sweep cut short by a time limit keeps the configurations that finished."""
    out.mkdir(parents=True, exist_ok=True)
    procs = {name: subprocess.Popen([sys.executable, __file__, "one", "--data", data, "--device", device, "--name",
                                     name, "--config", json.dumps(c)], stdout=subprocess.PIPE, text=True)
             for name, c in configs.items()}
    results = []
    with open(out / "summary.jsonl", "w") as f:
        for name, proc in procs.items():
            stdout, _ = proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"configuration {name!r} failed (exit {proc.returncode})")
            r = json.loads(stdout.strip().splitlines()[-1])
            f.write(json.dumps(r) + "\n")
            f.flush()
            results.append(r)
            last = r["evals"][max(r["evals"], key=int)]
            edits = ", ".join(f"{k} {v['edit']}/{v['kept']}" for k, v in last.items() if isinstance(v, dict))
            print(f"{r['name']}: {r['seconds']} s, step {max(map(int, r['evals']))}: loss {last['loss']}; "
                  f"edited cells / rows kept: {edits}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("dump", help="tokenized split -> SFT sequences (.npz), on the machine with the pipeline")
    p.add_argument("--config", default="config/config.yaml")
    p.add_argument("--dataset", default="shapes_s")
    p.add_argument("--out", required=True)
    p = sub.add_parser("run", help="train every configuration at once, one process each")
    p.add_argument("--data", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--configs", nargs="+", required=True, metavar="NAME=JSON",
                   help=f"overrides of {sorted(DEFAULTS)} plus the required 'steps'")
    p = sub.add_parser("one", help=argparse.SUPPRESS)
    for flag in ("--data", "--device", "--name", "--config"):
        p.add_argument(flag, required=True)
    args = parser.parse_args()
    if args.command == "dump":
        dump(args.config, args.dataset, args.out)
    elif args.command == "run":
        run(args.data, {k: json.loads(v) for k, v in (c.split("=", 1) for c in args.configs)}, args.out, args.device)
    else:
        print(json.dumps(train(args.name, args.data, args.device, **json.loads(args.config))), flush=True)


if __name__ == "__main__":
    main()
