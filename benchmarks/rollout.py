"""Rollout speed of the built-in engine (``earl.engine.HFEngine``) on an Emu3-8B-shaped model, against HF ``generate``.

    python benchmarks/rollout.py --device cuda --out DIR              # GPU: Emu3-8B geometry, bf16, random weights
    python benchmarks/rollout.py --tiny --out DIR                     # CPU smoke test (seconds): tiny model, same code
    python benchmarks/rollout.py --device cuda --baseline-engine OLD_ENGINE.py ...   # also time an older engine.py

Workload (RL's, spec §A.10, §C.2, §C.4): each prompt is BOS + a 32x32 source image block (1,065 tokens) + an
instruction of 4-19 words + the RL prefill ``<|image start|>``; each completion is sampled at T = 1 (top-k
``--top-k``, default off as in RL) under the grid constraint keyed on the source's 32x32, i.e. the header
"32*32", IMG, 32 rows of 32 codes + EOL, EOF, EOI, EOS = 1,065 new tokens. The model is transformers'
``Emu3ForCausalLM`` with Emu3-8B's text sizes (32 layers, hidden 4,096, MLP 14,336, 32 heads, 8 KV heads,
vocabulary 184,622), random bf16 weights; the tokenizer has Emu3's vocabulary layout (151,643 regular tokens,
then the special and 32,768 visual tokens at Emu3's ids), so every id and length is the real one.

Runs, each timed wall-clock with ``torch.cuda.synchronize`` around the whole ``generate`` call (prefill, graph
capture and copies back included; a first short call, timed as ``warmup_s``, compiles):

* ``engine`` (CUDA graph, the default) for every ``--batches`` size, ``--attend-buckets`` value and
  ``--visual-heads`` and ``--compile`` value, whole completions (``--max-tokens`` sizes the static KV cache, as
  ``rl.max_response_tokens`` does; every completion ends at 1,065 tokens anyway), and ``baseline``
  (``--baseline-engine``, an ``engine.py`` of an earlier commit, with its defaults) for every ``--batches`` size:
  an A/B in one call, where the machine's speed cannot differ between the two;
* ``engine_eager`` (``cuda_graph=False``), ``hf_generate`` (transformers' ``generate``, dynamic cache, the same
  prompts and sampling, the same grid constraint as a ``LogitsProcessor``) and ``baseline`` (``--baseline-engine``,
  an ``engine.py`` of an earlier commit) for ``--short-batches`` with ``--short-tokens`` new tokens only: they are
  launch-bound at ~0.1 s per token, so whole completions would take minutes; their per-step time is (wall −
  prefill) / steps, with the prefill timed alone.

It also checks that every whole completion is a well-formed 32x32 block, that graph and eager decoding give the
same tokens (same seeds), measures device-to-device copy bandwidth, and derives the memory-bandwidth bound of a
decode step (weights + the KV cache the step attends over, read once). ``--profile`` records eager decode steps
(this engine's and the baseline's) with ``torch.profiler`` and reports device time per operator and step. Results: a table on stdout and
``rollout_results.json`` (``--out``).
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py shadows the standard library's `tokenize` while this folder is first on sys.path.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "steps"))

import argparse  # noqa: E402
import importlib.util
import json
import platform
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import Emu3ForCausalLM, Emu3TextConfig, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerFast

import earl.engine as engine_module
from earl.engine import GridConstraint, HFEngine, SamplingParams
from earl.layout import BOS, EOS, PAD, RL_PREFILL, SPECIAL_TOKENS, Layout, visual_token_strings

EMU3_BASE_VOCAB, EMU3_CODEBOOK = 151_643, 32_768
HEADS = {True: "visual", False: "whole"}  # HFEngine.visual_head, as the summary table prints it
WORDS = "make the red circle on the left blue and remove every small green triangle near the top edge please".split()


def build_layout(base_vocab: int, codebook: int) -> Layout:
    """A word-level tokenizer with Emu3's vocabulary layout: ``base_vocab`` regular tokens, specials, visual codes.

    Built here with ``tokenizers`` alone, as :mod:`earl.text_tokenizer` builds its own (digits one per token, then
    Emu3's special and visual tokens in Emu3's order), because that module pulls in the pipeline's dependencies
    (pydantic, datasets), which the GPU image lacks.
    """
    regular = [*"0123456789*", *(f"t{i}" for i in range(base_vocab - 11))]
    base = Tokenizer(models.WordLevel({token: i for i, token in enumerate(regular)}, unk_token="t0"))
    base.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    strings = [*SPECIAL_TOKENS, *visual_token_strings(codebook)]
    base.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in strings])
    return Layout(PreTrainedTokenizerFast(tokenizer_object=base, bos_token=BOS, eos_token=EOS, pad_token=PAD), codebook)


def build_model(args, layout: Layout, device: torch.device, dtype: torch.dtype):
    sizes = (
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        if args.tiny
        else dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=8)
    )
    config = Emu3TextConfig(
        vocab_size=layout.ids.visual_base + layout.ids.codebook_size, max_position_embeddings=9216, rope_theta=1e6,
        attention_dropout=0.0, pad_token_id=layout.ids.pad, bos_token_id=layout.ids.bos, eos_token_id=layout.ids.eos, **sizes,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Emu3ForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


def workload(layout: Layout, n: int, grid: tuple[int, int], seed: int = 0) -> list[list[int]]:
    """``n`` RL prompts: random source codes, instructions of 4-19 words (so the batch is left-padded)."""
    rng = np.random.default_rng(seed)
    return [
        layout.prompt(rng.integers(0, layout.ids.codebook_size, grid), " ".join(WORDS[: rng.integers(4, 20)]), RL_PREFILL)
        for _ in range(n)
    ]


class GridLogits(LogitsProcessor):
    """The engine's grid constraint as a transformers ``LogitsProcessor`` (for the ``generate`` baseline)."""

    def __init__(self, constraint: GridConstraint, prompt_length: int):
        self.constraint, self.prompt_length = constraint, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.prompt_length:
            self.constraint.advance(input_ids[:, -1])
        return self.constraint.mask_(scores)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: torch.device, fn):
    """(result, wall seconds, peak GiB allocated during ``fn``)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return result, seconds, peak


class Timers:
    """Seconds spent inside wrapped functions, by name, with ``sync()`` (of the device) around each call."""

    def __init__(self, sync):
        self.sync, self.seconds = sync, defaultdict(float)

    def wrap(self, fn, name):
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            self.sync()
            self.seconds[name() if callable(name) else name] += time.perf_counter() - start
            return result
        return timed

    def take(self) -> dict[str, float]:
        taken, self.seconds = dict(self.seconds), defaultdict(float)
        return taken


def left_padded(prompts: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(map(len, prompts))
    ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :], mask[i, longest - len(p) :] = torch.tensor(p), 1
    return ids.to(device), mask.to(device)


def engine_prefill_seconds(engine, prompts, grids, device) -> float:
    """The engine's prefill (and the choice of the first token): a ``generate`` call for one new token, warm."""
    params = engine_module.SamplingParams(max_tokens=1)
    timed(device, lambda: engine.generate(prompts, grids, params))  # warm-up
    return timed(device, lambda: engine.generate(prompts, grids, params))[1]


def prefill_seconds(model, prompts, layout, max_tokens, device) -> float:
    """One prefill as transformers' ``generate`` runs it (and this engine did up to ``5270155``): left-padded
    batch, fresh static cache, slices of the engine's size, the model's forward, last logits."""
    from transformers import StaticCache

    ids, mask = left_padded(prompts, layout.ids.pad, device)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    full = torch.nn.functional.pad(mask, (0, max_tokens))
    chunk = max(1, HFEngine(model, layout).prefill_tokens // len(prompts))

    def run():
        cache = StaticCache(config=model.config, max_cache_len=full.shape[1])
        with torch.no_grad():
            for start in range(0, ids.shape[1], chunk):
                end = min(start + chunk, ids.shape[1])
                model(input_ids=ids[:, start:end], attention_mask=full, position_ids=position[:, start:end],
                      past_key_values=cache, cache_position=torch.arange(start, end, device=device), use_cache=True, logits_to_keep=1)

    timed(device, run)  # warm-up
    return timed(device, run)[1]


def hf_generate(model, prompts, layout, grid, params: SamplingParams, device):
    ids, mask = left_padded(prompts, layout.ids.pad, device)
    header = [layout.ids.boi, *layout.text(f"{grid[0]}*{grid[1]}"), layout.ids.img]
    constraint = GridConstraint(
        layout.ids, torch.tensor([grid] * len(prompts), device=device), [header] * len(prompts), prompts, model.config.vocab_size
    )
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=params.max_tokens, min_new_tokens=0, do_sample=True,
            temperature=params.temperature, top_k=max(params.top_k, 0), top_p=1.0,
            logits_processor=LogitsProcessorList([GridLogits(constraint, ids.shape[1])]),
            pad_token_id=layout.ids.pad, eos_token_id=layout.ids.eos,
        )


def load_module(path: str, name: str):
    """A Python file as module ``name``: an older ``engine.py`` (``--baseline-engine``), or a sibling benchmark."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def use_attention(module) -> None:
    """Make ``module``'s decode attention the registered one: an engine.py registers its own under the name that
    every engine.py uses, so loading ``--baseline-engine`` replaces this engine's."""
    if hasattr(module, "ATTENTION"):
        transformers.AttentionInterface.register(module.ATTENTION, module._attention)


def bandwidth_gbs(device: torch.device) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), median of 10 copies of 2 GiB."""
    if device.type != "cuda":
        return float("nan")
    src = torch.randn(2**29, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * 2**31 / float(np.median(times[2:])) / 1e9


def step_bytes(model, n: int, attended_slots: float) -> float:
    """Bytes a decode step must read at least: every weight but the embedding table, n embedding rows, the KV cache."""
    config = model.config
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "embed_tokens" not in name)
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 2
    return weights + n * config.hidden_size * 2 + n * attended_slots * kv_per_token


def profile(engine, prompts, grids, params_of, out: Path | None, name: str) -> list[dict]:
    """Device time per operator and decode step, from eager ``generate`` calls of 8 and 24 tokens: their
    difference is 16 decode steps without the prefill. Largest first."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    totals = []
    for tokens in (8, 24):
        with torch_profile(activities=activities) as prof:
            engine.generate(prompts, grids, params_of(tokens))
        totals.append({e.key: (e.count, (e.device_time_total if cuda else e.cpu_time_total) / 1e3) for e in prof.key_averages()})
        if out and tokens == 24:
            (out / f"profile_{name}.txt").write_text(prof.key_averages().table(sort_by="device_time_total" if cuda else "cpu_time_total", row_limit=50))
    rows = [
        dict(op=op[:90], calls_per_step=(count - totals[0].get(op, (0, 0))[0]) / 16, ms_per_step=(ms - totals[0].get(op, (0, 0))[1]) / 16)
        for op, (count, ms) in totals[1].items()
    ]
    return sorted(rows, key=lambda r: -r["ms_per_step"])[:30]


def build_vq(tiny: bool, layout: Layout, device: torch.device, dtype: torch.dtype):
    """``Emu3VQVAE`` with Emu3-VisionTokenizer's configuration and random weights, or (``tiny``)
    benchmarks/tokenize.py's tiny VQ with the tiny layout's codebook."""
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    sizes = {}
    if tiny:
        sizes = {**load_module(os.path.join(HERE, "tokenize.py"), "bench_tokenize").TINY_VQ, "codebook_size": layout.ids.codebook_size}
    with torch.device(device):
        return Emu3VQVAE(Emu3VQVAEConfig(**sizes)).to(dtype).eval()


def edits_end_to_end(model, layout: Layout, n: int, tiny: bool, device: torch.device, dtype: torch.dtype, png_threads: int,
                     out: Path | None) -> dict:
    """``n`` edits the way ``earl edit`` and the evaluator make them, timed from source pixels to PNG bytes: VQ
    encode of ``n`` random 256×256 images (Emu3-VisionTokenizer's shape, random weights), the evaluation prompt
    (header pre-filled), one batch through the engine with spec §D.3's sampling (T = 1, top-k 2,048,
    ``evaluate.max_tokens`` 3,000 of cache room), VQ decode, PNG encoding in ``png_threads`` threads. The engine's
    prefill of the same prompts is timed apart afterwards (``prefill_s``, inside ``engine_s``)."""
    from PIL import Image

    from earl import heldout, vq as vq_codec
    from earl.layout import EVAL_PREFILL

    vq = build_vq(tiny, layout, device, dtype)
    px = 32 if tiny else 256
    rng = np.random.default_rng(7)
    images = [Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8)) for _ in range(n)]
    params = SamplingParams(max_tokens=40 if tiny else 3000, temperature=1.0, top_k=2048, seed=0)
    engine = HFEngine(model, layout, batch_size=n)

    timers = Timers(lambda: sync(device))
    encode = timers.wrap(vq_codec.encode, "vq_encode")
    to_png = timers.wrap(vq_codec.png_bytes, "png")
    engine.generate = timers.wrap(engine.generate, "engine")  # edit_rows runs it between encode and decode
    decode = vq_codec.decode
    rows = []

    def run() -> list[bytes]:
        grids = encode(vq, images, batch_size=n)
        rows[:] = [{"source_codes": codes, "instruction": " ".join(WORDS[: 4 + i % 16])} for i, codes in enumerate(grids)]
        return to_png(heldout.edit_rows(engine, layout, vq, rows, EVAL_PREFILL, params), png_threads)

    vq_codec.decode = timers.wrap(decode, "vq_decode")  # what heldout.edit_rows calls after the engine
    try:
        timed(device, run)  # warm-up: cuDNN autotuning, allocator
        timers.take()
        pngs, seconds, peak = timed(device, run)
    finally:
        vq_codec.decode = decode
    phases = timers.take()
    prompts = [layout.prompt(np.asarray(r["source_codes"]), r["instruction"], EVAL_PREFILL) for r in rows]
    prefill = engine_prefill_seconds(engine, prompts, [np.shape(r["source_codes"]) for r in rows], device)
    if out:
        (out / "edit_0.png").write_bytes(pngs[0])
    split = {f"{name}_s": round(value, 4) for name, value in phases.items()}  # the tiny smoke test takes milliseconds
    rest = seconds - sum(phases.values())  # prompts, grid parsing
    return dict(run="edits_end_to_end", edits=n, pngs=len(pngs), seconds=round(seconds, 4), **split, other_s=round(rest, 4),
                prefill_s=round(prefill, 4), png_threads=png_threads, peak_gib=round(peak, 2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, 4x4 grid, 16 codes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="*", default=[16, 32, 64, 128])
    parser.add_argument("--short-batches", type=int, nargs="*", default=[16, 64])
    parser.add_argument("--edits", type=int, default=0, help="also time this many edits end to end (256x256 pixels "
                        "in, PNG out: VQ encode, engine, VQ decode)")
    parser.add_argument("--png-threads", type=int, default=os.cpu_count(), help="threads encoding the edits' PNGs")
    parser.add_argument("--short-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[1100], help="static cache room per completion; "
                        "with several values the largest --short-batches size runs once per extra value")
    parser.add_argument("--attend-buckets", type=int, nargs="+", default=[128], help="HFEngine.attend_bucket values "
                        "to time whole completions with (one larger than the cache: attend over all of it)")
    parser.add_argument("--visual-heads", nargs="+", choices=["on", "off"], default=["on"], help="HFEngine.visual_head "
                        "values to time whole completions with (off: the whole vocabulary at every step)")
    parser.add_argument("--compile", nargs="+", choices=["on", "off"], default=["on"], help="HFEngine.compile values to "
                        "time whole completions with (on: the decoder layers through torch.compile, CUDA's default)")
    parser.add_argument("--fuse", nargs="+", choices=["on", "off"], default=["on"], help="HFEngine.fuse values to time "
                        "whole completions with (on: q/k/v and gate/up as one matmul each, CUDA's default)")
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--baseline-engine", help="an engine.py (e.g. of an earlier commit) to time beside this one")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.tiny:
        args.device, args.batches, args.short_batches, args.short_tokens, args.max_tokens = "cpu", [2, 4], [2], 6, [40]
        args.edits = min(args.edits, 3)
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    grid = (4, 4) if args.tiny else (32, 32)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    layout = build_layout(64 if args.tiny else EMU3_BASE_VOCAB, 16 if args.tiny else EMU3_CODEBOOK)
    model = build_model(args, layout, device, dtype)
    completion = len(layout.text(f"{grid[0]}*{grid[1]}")) + 1 + grid[0] * (grid[1] + 1) + 3
    info = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
        parameters=sum(p.numel() for p in model.parameters()), layers=model.config.num_hidden_layers,
        completion_tokens=completion, setup_s=round(time.perf_counter() - t0, 1), top_k=args.top_k,
    )
    print(json.dumps(info), flush=True)
    bandwidth = bandwidth_gbs(device)
    results: dict = dict(info=info, bandwidth_gbs=bandwidth, runs=[], checks={})

    def record(run: dict) -> None:
        run["at_s"] = round(time.perf_counter() - t0, 1)  # since the start: where a call's time went
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
        if out:
            (out / "rollout_results.json").write_text(json.dumps(results, indent=1))

    # -- checks first (small): graph and eager decoding agree token for token (well-formedness: below, per run)
    check_prompts = workload(layout, 8, grid, seed=99)
    def sampling(tokens: int, module=engine_module):
        """The workload's sampling (T = 1, ``--top-k``, ``--seed``) for ``tokens`` new tokens, as ``module``'s
        SamplingParams (this engine's or ``--baseline-engine``'s)."""
        return module.SamplingParams(max_tokens=tokens, temperature=1.0, top_k=args.top_k, seed=args.seed)

    check = sampling(48)
    eager = HFEngine(model, layout, batch_size=8, cuda_graph=False).generate(check_prompts, [grid] * 8, check)
    graphed = HFEngine(model, layout, batch_size=8).generate(check_prompts, [grid] * 8, check)
    results["checks"]["graph_equals_eager_tokens"] = bool(torch.equal(eager.tokens, graphed.tokens))
    results["checks"]["graph_vs_eager_max_logprob_diff"] = float((eager.logprobs - graphed.logprobs).abs().max())
    # compiled (fused element-wise work, written-out attention) vs the decoder as written, greedy: bf16 rounding
    # differs, so the two may part at near-ties, but the log-prob of the most likely token stays comparable (two
    # samples at T = 1 part at once on random weights, and their log-probs are those of different tokens)
    greedy = engine_module.SamplingParams(max_tokens=48, temperature=0.0)
    compiled = HFEngine(model, layout, batch_size=8, cuda_graph=False).generate(check_prompts, [grid] * 8, greedy)
    uncompiled = HFEngine(model, layout, batch_size=8, cuda_graph=False, compile=False).generate(check_prompts, [grid] * 8, greedy)
    results["checks"]["compiled_vs_uncompiled_greedy_equal_tokens"] = float((compiled.tokens == uncompiled.tokens).float().mean())
    # at the first chosen token (the header before it is forced: log-prob 0)
    first = int((uncompiled.logprobs != 0).all(0).nonzero()[0])
    results["checks"]["compiled_vs_uncompiled_first_greedy_logprob_diff"] = float((compiled.logprobs[:, first] - uncompiled.logprobs[:, first]).abs().max())
    results["checks"]["checks_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(results["checks"]), flush=True)

    def well_formed(prompts, rollouts) -> float:
        good = 0
        for i in range(len(prompts)):
            try:
                good += bool(rollouts.finished[i]) and layout.parse_grid(rollouts.completion(i)).shape == grid
            except ValueError:
                pass
        return good / len(prompts)

    # -- the engine (CUDA graph where available), and the baseline engine with its defaults, whole completions
    baseline = load_module(args.baseline_engine, "baseline_engine") if args.baseline_engine else None
    heads = [v == "on" for v in args.visual_heads]
    compiles = [c == "on" for c in args.compile]
    fuses = [f == "on" for f in args.fuse]
    plans = [(n, args.max_tokens[0], b, v, c, f, "engine") for n in args.batches for c in compiles for f in fuses
             for b in args.attend_buckets for v in heads]
    plans += [(max(args.short_batches), m, args.attend_buckets[0], heads[0], compiles[0], fuses[0], "engine") for m in args.max_tokens[1:]]
    plans += [(n, args.max_tokens[0], None, None, None, None, "baseline") for n in args.batches if baseline]
    for n, max_tokens, bucket, visual, compiled, fused, source in plans:
        prompts = workload(layout, n, grid, seed=n)
        module = baseline if source == "baseline" else engine_module
        use_attention(module)
        params = sampling(max_tokens, module)
        if source == "baseline":
            engine = baseline.HFEngine(model, layout, batch_size=n)
        else:
            engine = HFEngine(model, layout, batch_size=n, attend_bucket=bucket, visual_head=visual, compile=compiled, fuse=fused)
        # compiles (once), at this batch's prefill slices too
        warmup = timed(device, lambda: engine.generate(prompts, [grid] * n, sampling(3, module)))[1]
        try:
            rollouts, seconds, peak = timed(device, lambda: engine.generate(prompts, [grid] * n, params))
        except torch.OutOfMemoryError as error:
            record(dict(run=source, batch=n, max_tokens=max_tokens, error=f"out of memory: {str(error)[:200]}"))
            continue
        prefill = (prefill_seconds(model, prompts, layout, max_tokens, device) if source == "baseline"
                   else engine_prefill_seconds(engine, prompts, [grid] * n, device))
        steps = int(rollouts.lengths.max())
        generated = int(rollouts.lengths.sum())
        longest = max(map(len, prompts))
        per_step = (seconds - prefill) / steps
        full_cache = step_bytes(model, n, longest + max_tokens)
        filled = step_bytes(model, n, longest + steps / 2)
        record(dict(
            run=source if device.type == "cuda" else f"{source}_eager", batch=n, max_tokens=max_tokens, attend_bucket=bucket,
            visual_head=visual, compile=compiled, fuse=fused, warmup_s=round(warmup, 1),
            prompt_tokens=longest,
            steps=steps, generated_tokens=generated, seconds=round(seconds, 3), prefill_s=round(prefill, 3),
            decode_ms_per_step=round(per_step * 1e3, 3), tokens_per_s=round(generated / seconds, 1),
            decode_tokens_per_s=round(n / per_step, 1), sequences_per_s=round(n / seconds, 3),
            seconds_per_128=round(seconds * 128 / n, 2), peak_gib=round(peak, 2), well_formed=well_formed(prompts, rollouts),
            bound_tokens_per_s_full_cache=round(n * bandwidth * 1e9 / full_cache, 1),
            bound_tokens_per_s_filled_cache=round(n * bandwidth * 1e9 / filled, 1),
        ))
        del rollouts

    # -- launch-bound paths: a few tokens each, per-step time from (wall - prefill) / steps
    for n in args.short_batches:
        prompts = workload(layout, n, grid, seed=n)
        params = sampling(args.short_tokens)
        hf_prefill = prefill_seconds(model, prompts, layout, args.max_tokens[0], device)
        runners = {"hf_generate": lambda: hf_generate(model, prompts, layout, grid, params, device)}
        if device.type == "cuda":
            engine = HFEngine(model, layout, batch_size=n, cuda_graph=False)
            runners["engine_eager"] = lambda: engine.generate(prompts, [grid] * n, params)
        if baseline:
            old = baseline.HFEngine(model, layout, batch_size=n)
            old_params = sampling(args.short_tokens, baseline)
            runners["baseline"] = lambda: old.generate(prompts, [grid] * n, old_params)
        for name, fn in runners.items():
            use_attention(baseline if name == "baseline" else engine_module)
            _, seconds, peak = timed(device, fn)
            prefill = engine_prefill_seconds(engine, prompts, [grid] * n, device) if name == "engine_eager" else hf_prefill
            per_step = (seconds - prefill) / args.short_tokens
            record(dict(
                run=name, batch=n, new_tokens=args.short_tokens, seconds=round(seconds, 3), prefill_s=round(prefill, 3),
                decode_ms_per_step=round(per_step * 1e3, 3), decode_tokens_per_s=round(n / per_step, 1), peak_gib=round(peak, 2),
            ))

    use_attention(engine_module)
    if args.edits:
        record(edits_end_to_end(model, layout, args.edits, args.tiny, device, dtype, args.png_threads, out))

    if args.profile:
        n = max(args.short_batches)
        prompts = workload(layout, n, grid, seed=n)
        engine = HFEngine(model, layout, batch_size=n, cuda_graph=False)
        results["profile_engine_eager"] = profile(engine, prompts, [grid] * n, sampling, out, "engine_eager")
        if baseline:
            use_attention(baseline)
            old = baseline.HFEngine(model, layout, batch_size=n)
            results["profile_baseline"] = profile(old, prompts, [grid] * n, lambda t: sampling(t, baseline), out, "baseline")
        record(dict(run="profile", batch=n))
        for key in ("profile_engine_eager", "profile_baseline"):
            for row in results.get(key, [])[:12]:
                print(f"{key:<22}{row['ms_per_step']:>9.3f} ms{row['calls_per_step']:>8.1f}  {row['op']}")

    print(f"\n{'run':<15}{'batch':>6}{'bucket':>8}{'head':>8}{'compile':>8}{'fuse':>6}{'tokens':>8}{'s':>9}{'ms/step':>9}{'decode tok/s':>14}{'s/128 seq':>11}{'GiB':>7}")
    for r in results["runs"]:
        if "decode_ms_per_step" in r:
            print(f"{r['run']:<15}{r['batch']:>6}{r.get('attend_bucket') or '':>8}{HEADS.get(r.get('visual_head'), ''):>8}{ {True: 'on', False: 'off'}.get(r.get('compile'), ''):>8}{ {True: 'on', False: 'off'}.get(r.get('fuse'), ''):>6}{r.get('generated_tokens', r.get('new_tokens', 0)):>8}{r['seconds']:>9.2f}"
                  f"{r['decode_ms_per_step']:>9.2f}{r['decode_tokens_per_s']:>14.1f}{r.get('seconds_per_128', float('nan')):>11.2f}"
                  f"{r['peak_gib']:>7.1f}")
    for r in results["runs"]:
        if r["run"] == "edits_end_to_end":
            print(f"{r['edits']} edits end to end (pixels in, PNG out): {r['seconds']:.2f} s (VQ encode {r['vq_encode_s']:.2f}, "
                  f"engine {r['engine_s']:.2f} of which prefill {r['prefill_s']:.2f}, VQ decode {r['vq_decode_s']:.2f}, "
                  f"PNG {r['png_s']:.2f} in {r['png_threads']} threads, other {r['other_s']:.2f})")
    print(f"copy bandwidth {bandwidth:.0f} GB/s; checks {results['checks']}")


if __name__ == "__main__":
    main()
