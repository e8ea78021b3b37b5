"""Rollout engines: prompts + grid sizes + sampling parameters in, completions with log-probs out.

Every step that generates (the SFT quality check, GRPO rollouts, evaluation, ``earl edit``) calls
``engine.generate``, so there is one generation code path; :func:`make_engine` builds the configured one
(``rl.engine``, ``evaluate.engine``). The built-in ``hf`` engine runs the model's own forward over a
pre-allocated :class:`~transformers.StaticCache` (no per-token cache growth), samples on the model's device,
and applies the grid constraint as an O(1)-per-token state update (spec §C.4) instead of the original's
re-scan of the whole history at every token. The ``vllm`` engine (:mod:`earl.vllm_engine`, paper scale) runs
in vLLM's own environment and applies the same rule (:class:`GridRule`) through :class:`GridSlots`.

Grid constraint (spec §C.4), O(1) state per token: before the image only text and special tokens are allowed
(no visual codes); once ``<|image start|>`` is there (generated or pre-filled), the header ``H*W`` and
``<|image token|>`` are forced, then exactly W visual codes and EOL per row, H rows, then EOF, EOI and EOS.
The original left the header digits free, so a model could write a header that disagreed with the grid it
was forced into; here header and grid always agree.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from transformers import AttentionInterface, Emu3ForCausalLM, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.emu3.modeling_emu3 import apply_rotary_pos_emb

from earl.config import ConfigError
from earl.layout import Layout, SpecialIds
from earl.models import load_checked

DONE_CHECK_EVERY = 16  # decode steps between checks that every sequence has finished (each check waits for the device)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature == 0`` is greedy decoding; ``top_k`` -1 and ``top_p`` 1 keep every token
    (the built-in engine has no top-p and refuses any other value)."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int = -1
    grid_constraint: bool = True
    seed: int = 0
    top_p: float = 1.0


@dataclass
class Rollouts:
    """Completions of one :meth:`Engine.generate` call, right-padded with PAD.

    ``tokens[i, :lengths[i]]`` is completion ``i`` (its EOS included when ``finished[i]``); ``logprobs`` are
    the log-probabilities of those tokens under the distribution they were sampled from (after the grid
    constraint, temperature, top-k and top-p), not the policy's: GRPO recomputes those (``earl.grpo``).
    """

    tokens: torch.Tensor  # [N, T] int64
    logprobs: torch.Tensor  # [N, T] float32, 0 after the end
    lengths: torch.Tensor  # [N] int64
    finished: torch.Tensor  # [N] bool: ended with EOS

    def completion(self, i: int) -> list[int]:
        return self.tokens[i, : self.lengths[i]].tolist()

    @classmethod
    def of(cls, completions: list[list[int]], logprobs: list[list[float]], finished: list[bool], pad: int) -> Rollouts:
        """Rollouts from per-sequence lists (an engine that returns sequences one by one)."""
        width = max(map(len, completions), default=0)
        return cls(
            tokens=torch.tensor([c + [pad] * (width - len(c)) for c in completions], dtype=torch.long).view(len(completions), width),
            logprobs=torch.tensor([lp + [0.0] * (width - len(lp)) for lp in logprobs], dtype=torch.float32).view(len(completions), width),
            lengths=torch.tensor([len(c) for c in completions], dtype=torch.long),
            finished=torch.tensor(finished, dtype=torch.bool),
        )


class GridState(NamedTuple):
    """Where N sequences stand in the grid constraint, one row each (spec §C.4).

    ``header[n]`` is BOI, the digits of "H*W" and IMG for sequence ``n`` (PAD-padded); ``head[n]`` points at the
    next header token to force (-1: free text before the image); ``pos[n]`` counts tokens since IMG (0: not in
    the image); ``rows[n]``, ``cols[n]`` are its H and W.
    """

    header: torch.Tensor  # [N, K]
    head: torch.Tensor  # [N]
    pos: torch.Tensor  # [N]
    rows: torch.Tensor  # [N]
    cols: torch.Tensor  # [N]


class GridRule:
    """Which tokens a sequence may emit next, and where a token moves it: the one home of the grid constraint.

    Pure functions of a :class:`GridState`, so the built-in engine (:class:`GridConstraint`, a fixed batch
    updated in place) and the vllm engine (a pool of request slots that sequences enter and leave, see
    :class:`GridSlots`) apply the same rule, each with O(1) work per token.
    """

    def __init__(self, ids: SpecialIds, vocab_size: int, device: torch.device | str):
        self.ids = ids
        self.col = torch.arange(vocab_size, device=device)
        self.visual = (self.col >= ids.visual_base) & (self.col < ids.visual_base + ids.codebook_size)

    def forced(self, state: GridState) -> torch.Tensor:
        """The token each sequence must emit next, or -1 where any visual code (or, before the image, any text) may."""
        ids, pos = self.ids, state.pos
        width, end = state.cols + 1, (state.cols + 1) * state.rows
        forced = torch.where(state.head >= 0, state.header.gather(1, state.head.clamp(min=0)[:, None]).squeeze(1), -1)
        forced = torch.where((pos > 0) & (pos % width == 0) & (pos <= end), ids.eol, forced)
        for offset, token in ((1, ids.eof), (2, ids.eoi), (3, ids.eos)):
            forced = torch.where(pos == end + offset, token, forced)
        return torch.where(pos > end + 3, ids.pad, forced)

    @staticmethod
    def free_text(state: GridState) -> torch.Tensor:
        """[N] whether each sequence is still before its image (any text token allowed, no visual code)."""
        return (state.pos == 0) & (state.head < 0)

    def allowed(self, state: GridState) -> torch.Tensor:
        """[N, vocab] mask of the tokens each sequence may emit next: outside free text, one forced token or any
        visual code."""
        forced = self.forced(state)
        free_text = self.free_text(state)[:, None]
        return torch.where(free_text, ~self.visual, torch.where((forced < 0)[:, None], self.visual, self.col == forced[:, None]))

    def advanced(self, state: GridState, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``head`` and ``pos`` after each sequence emitted ``tokens[n]``."""
        entered = tokens == self.ids.img
        head = torch.where(entered, -1, torch.where(state.head >= 0, state.head + 1, torch.where(tokens == self.ids.boi, 1, -1)))
        return head, torch.where(state.pos > 0, state.pos + 1, entered.long())


def grid_header(layout: Layout, grid: tuple[int, int]) -> list[int]:
    """BOI, the tokens of "H*W" and IMG: what the constraint forces once a sequence opens its image."""
    rows, cols = grid
    return [layout.ids.boi, *layout.text(f"{rows}*{cols}"), layout.ids.img]


class GridConstraint:
    """The grid constraint over one batch of sequences, state updated in place (O(1) per token).

    A prompt that ends inside the header (e.g. the prefill "<|image start|>8*8") continues it. The state
    tensors are updated in place, so a captured CUDA graph that reads and writes them stays valid.
    """

    def __init__(self, ids: SpecialIds, grids: torch.Tensor, headers: list[list[int]], prompts: list[list[int]], vocab_size: int):
        device = grids.device
        self.rule = GridRule(ids, vocab_size, device)
        width = max(map(len, headers))
        self.state = GridState(
            header=torch.tensor([h + [ids.pad] * (width - len(h)) for h in headers], device=device),
            head=torch.tensor([continued(p, h) for p, h in zip(prompts, headers)], device=device),
            pos=torch.zeros(len(grids), dtype=torch.long, device=device),
            rows=grids[:, 0],
            cols=grids[:, 1],
        )

    def forced(self) -> torch.Tensor:
        return self.rule.forced(self.state)

    def mask_(self, logits: torch.Tensor) -> torch.Tensor:
        """Set the logits of every disallowed token to -inf, in place."""
        return logits.masked_fill_(~self.rule.allowed(self.state), float("-inf"))

    def advance(self, tokens: torch.Tensor) -> None:
        """Move every sequence past its just-sampled token."""
        head, pos = self.rule.advanced(self.state, tokens)
        self.state.head.copy_(head)
        self.state.pos.copy_(pos)


def continued(prompt: list[int], header: list[int]) -> int:
    """Index of the next header token if ``prompt`` ends with a (non-empty) prefix of ``header``, else -1."""
    for k in range(len(header) - 1, 0, -1):
        if prompt[-k:] == header[:k]:
            return k
    return -1


def tokens_left(header: list[int], head: int, grid: tuple[int, int]) -> int | None:
    """How many tokens a sequence about to emit ``header[head]`` has left: the rest of the header, H rows of W
    codes and EOL, then EOF, EOI and EOS. None before the image (``head`` -1): free text comes first, of any length."""
    if head < 0:
        return None
    rows, cols = grid
    return len(header) - head + rows * (cols + 1) + 3


@dataclass(frozen=True)
class GridRequest:
    """One sequence's grid constraint as plain data: what travels with a vllm request in
    ``SamplingParams.extra_args[GRID_ARG]`` (vLLM's per-request custom arguments)."""

    rows: int
    cols: int
    header: list[int]  # grid_header(layout, (rows, cols))
    head: int  # continued(prompt, header): where the prompt leaves the header

    @classmethod
    def of(cls, layout: Layout, prompt: list[int], grid: tuple[int, int]) -> GridRequest:
        header = grid_header(layout, grid)
        return cls(int(grid[0]), int(grid[1]), header, continued(prompt, header))

    def to_args(self) -> dict:
        return {"rows": self.rows, "cols": self.cols, "header": list(self.header), "head": self.head}

    @classmethod
    def from_args(cls, args: dict) -> GridRequest:
        """Read :meth:`to_args`' dict back; ValueError (vLLM's way of refusing a request) if it is not one."""
        try:
            request = cls(int(args["rows"]), int(args["cols"]), [int(t) for t in args["header"]], int(args["head"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{GRID_ARG}: expected rows, cols, header and head, got {args!r}") from error
        if request.rows < 1 or request.cols < 1 or not 2 <= len(request.header) <= HEADER_WIDTH or request.head >= len(request.header):
            raise ValueError(f"{GRID_ARG}: not a grid constraint: {args!r}")
        return request


GRID_ARG = "earl_grid"  # the SamplingParams.extra_args key of a GridRequest
HEADER_WIDTH = 16  # room for BOI, the tokens of "H*W" and IMG (6 for a 64×64 grid with Emu3's tokenizer)


class GridSlots:
    """The grid constraint over a pool of request slots that sequences enter and leave: the shape of a vLLM
    batch-level logits processor (``vllm_engine.GridLogitsProcessor`` is a thin shell around it).

    A sequence is added to a slot (:meth:`add`, staged on the host) and the staged slots reach the device in
    :meth:`flush`, once per step. Each step, :meth:`fold` moves every slot past the tokens its sequence
    produced since the last step, read from the engine's token history: one token per decode step, several
    after a preempted request is recomputed, none during prefill. :meth:`mask_` then masks each logits row by
    its slot's state. Slots whose sequence has no constraint are left alone.
    """

    def __init__(self, rule: GridRule, slots: int):
        self.rule = rule
        device = rule.col.device
        self.state = GridState(
            header=torch.full((slots, HEADER_WIDTH), rule.ids.pad, dtype=torch.long, device=device),
            head=torch.full((slots,), -1, dtype=torch.long, device=device),
            pos=torch.zeros(slots, dtype=torch.long, device=device),
            rows=torch.ones(slots, dtype=torch.long, device=device),
            cols=torch.ones(slots, dtype=torch.long, device=device),
        )
        self.enabled = np.zeros(slots, dtype=bool)
        self.folded = np.zeros(slots, dtype=np.int64)  # tokens of each slot's sequence already in its state
        self.staged: dict[int, GridRequest] = {}

    def add(self, slot: int, request: GridRequest | None) -> bool:
        """A new sequence in ``slot`` (its previous occupant is forgotten); returns whether it is constrained."""
        self.enabled[slot] = request is not None
        self.folded[slot] = 0
        self.staged.pop(slot, None)
        if request is not None:
            self.staged[slot] = request
        return request is not None

    def flush(self) -> None:
        """Write the staged sequences' initial states to the device."""
        if not self.staged:
            return
        pad, device = self.rule.ids.pad, self.state.head.device
        slots = torch.tensor(list(self.staged), device=device)
        requests = list(self.staged.values())
        initial = GridState(
            header=torch.tensor([r.header + [pad] * (HEADER_WIDTH - len(r.header)) for r in requests], device=device),
            head=torch.tensor([r.head for r in requests], device=device),
            pos=torch.zeros(len(requests), dtype=torch.long, device=device),
            rows=torch.tensor([r.rows for r in requests], device=device),
            cols=torch.tensor([r.cols for r in requests], device=device),
        )
        for current, value in zip(self.state, initial):
            current.index_copy_(0, slots, value)
        self.staged.clear()

    def fold(self, slots: np.ndarray, produced: np.ndarray, history: torch.Tensor, starts: np.ndarray) -> None:
        """Advance each constrained ``slots[b]`` to ``produced[b]`` generated tokens, the ``j``-th of which is
        ``history[slot, starts[b] + j]`` (vLLM: its token history and prompt lengths)."""
        keep = self.enabled[slots]
        slots, produced, starts = slots[keep], np.maximum(produced[keep], 0), starts[keep]
        done = self.folded[slots]
        device = self.state.head.device
        for step in range(int((produced - done).max(initial=0))):
            move = done + step < produced
            at = torch.as_tensor(slots[move], device=device)
            tokens = history[at, torch.as_tensor(starts[move] + done[move] + step, device=device)].long()
            head, pos = self.rule.advanced(GridState(*(t[at] for t in self.state)), tokens)
            self.state.head[at], self.state.pos[at] = head, pos
        self.folded[slots] = np.maximum(done, produced)

    def mask_(self, logits: torch.Tensor, slots: np.ndarray) -> torch.Tensor:
        """Set to -inf, in place, every token that row ``b``'s sequence (in ``slots[b]``) may not emit next."""
        rows = np.flatnonzero(self.enabled[slots])
        if len(rows) == 0:
            return logits
        device = logits.device
        at = torch.as_tensor(slots[rows], device=device)
        allowed = self.rule.allowed(GridState(*(t[at] for t in self.state)))
        rows_t = torch.as_tensor(rows, device=device)
        logits[rows_t] = logits[rows_t].masked_fill(~allowed, float("-inf"))
        return logits


_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32 family: xor-shift-multiply, multipliers below 2**31).

    Values stay in [0, 2**32) inside int64 and every product stays under 2**63, so the arithmetic is exact and
    identical on every device.
    """
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def uniforms(seeds: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """One float64 uniform in [0, 1) per sequence, a pure function of (its seed, the token index ``step``).

    A counter-based generator instead of a ``torch.Generator`` per sequence: a sequence's samples still depend
    only on its own seed (not on its batch, its rank or the batch size), but drawing them is a few element-wise
    operations on the device for the whole batch, which a CUDA graph can capture, instead of one sampling
    launch per sequence.
    """
    bits = _hash32(_hash32(_hash32(seeds) ^ step))
    return (bits >> 8).double() / float(1 << 24)


def sample(logits: torch.Tensor, params: SamplingParams, seeds: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row and return it with its log-probability under the (constrained, tempered, top-k)
    distribution it was drawn from.

    Inverse-CDF sampling with :func:`uniforms`: the token is the first whose cumulative probability exceeds
    ``u * total``; a token of probability 0 never has a cumulative probability above that of its predecessor,
    so it is never drawn. The cumulative sum is in float64 so that ``u * total`` stays below the total.
    """
    if params.temperature == 0:
        logp = torch.log_softmax(logits, -1)
        token = logits.argmax(-1)
        return token, logp.gather(-1, token[:, None]).squeeze(-1)
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1, sorted=False).values.amin(-1, keepdim=True)  # no sort of the k
        logits = logits.masked_fill(logits < kth, float("-inf"))
    logp = torch.log_softmax(logits, -1)
    cdf = logp.exp().double().cumsum(-1)
    target = uniforms(seeds, step) * cdf[:, -1]
    token = torch.searchsorted(cdf, target[:, None], right=True).squeeze(-1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


ATTENTION = "earl_engine"


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """SDPA that reads each KV head once while decoding.

    transformers' SDPA path copies every KV head ``heads / kv_heads`` times (``repeat_kv``) whenever there is a
    mask, i.e. the whole static cache four times over per layer and step for Emu3's 32/8 heads. For one query
    token the query heads that share a KV head are instead folded into the query-length axis of that KV head:
    the same scores, no copy. Only the first ``attention_mask.shape[-1]`` cache slots are read: the engine passes
    the mask of the slots filled so far (rounded up to ``attend_bucket``), not of the whole static cache. Prefill
    (more than one query token) goes to transformers' own SDPA function, over the filled slots too.

    Inside ``torch.compile`` (``HFEngine(compile=...)``) the decode attention is written out instead
    (:func:`_decode_attention`): Inductor fuses mask and softmax between two cuBLAS matmuls, which on an H200
    read the cache at 3.5-3.7 TB/s against 2.9 for cuDNN's masked SDPA kernel (batch 128, 1,664 slots;
    benchmarks/RESULTS.md). Run op by op, SDPA's one kernel is the faster of the two.
    """
    batch, heads, length, dim = query.shape
    # the mask covers the cache slots a step attends over: the filled part, rounded up (HFEngine)
    key, value = key[:, :, : attention_mask.shape[-1]], value[:, :, : attention_mask.shape[-1]]
    if length > 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    if torch.compiler.is_compiling():
        out = _decode_attention(grouped, key, value, attention_mask, dim**-0.5 if scaling is None else scaling)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, 1, heads, dim), None


def _decode_attention(query, key, value, mask, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v with the numerics of transformers' eager attention: scores in the model's
    dtype, softmax in float32. The widths the engine passes are multiples of 8 slots: with rows of scores that
    are not 16-byte aligned, cuBLAS ran both matmuls with its slow align-2 kernels (24 against 15 ms per step)."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, -1, dtype=torch.float32).to(value.dtype), value)


AttentionInterface.register(ATTENTION, _attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


@contextmanager
def _engine_attention(model):
    """Run ``model`` with :func:`_attention` inside the block and give it back its own implementation after."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous


class HFEngine:
    """The built-in engine: batched decoding with the model's forward over a pre-allocated KV cache.

    ``cuda_graph``: on a CUDA model, capture each batch's decode step as one CUDA graph (default); off, every
    step is launched op by op, as on CPU. ``prefill_tokens``: the prompts go through the model in slices of at
    most this many tokens (rows × slice length), because one pass over a whole batch of 1,100-token prompts
    needs ~4 GiB per MLP activation at batch 128, which with the KV cache does not fit an 80 GB GPU.
    ``attend_bucket``: a decode step attends over the cache slots filled so far rounded up to a multiple of this,
    not over the whole static cache (half of which is empty on average), with one CUDA graph per length. Keep it
    a multiple of 8: the compiled attention's matmuls are fast only on 16-byte aligned rows.
    The static cache holds each batch's longest prompt plus ``max_tokens`` slots, or fewer when every prompt has
    opened its image (RL's and evaluation's prefills): then the grid fixes every completion's length, and a
    generous ``max_tokens`` (evaluation's 3,000) costs no memory.
    ``visual_head``: once every unfinished sequence is inside its image block (with the grid constraint on), each
    next token is either forced (EOL, EOF, ...; log-probability 0 under the constrained distribution) or any of
    the ``codebook_size`` visual codes, so the step computes only the LM head's visual rows (32,768 of Emu3's
    184,622) and samples among them; off, every step computes and masks the whole vocabulary. Same tokens and
    log-probabilities either way.
    ``compile``: decode steps call every decoder layer through one ``torch.compile``d function, which fuses a
    layer's element-wise work (RMSNorm, RoPE, SiLU, residuals) into a few kernels instead of ~30 small ones;
    ``None`` (default): on a CUDA device, where a decode step is that many small launches. On CPU it is off by
    default: the default pipeline's GRPO spends 147 of 521 s in rollouts, where ~30 % faster steps would about
    pay for the 15-25 s compilation, and Inductor needs a C++ compiler there. One compilation with dynamic
    shapes serves every layer, batch size and attention width. ``TORCH_COMPILE_DISABLE=1`` in a step's
    environment turns it off without a code change (torch's own switch).
    ``fuse``: each layer's q/k/v projections run as one matmul, and gate/up as one (:func:`_fused_layer`): at
    decode batch sizes a matmul costs mostly its weight read and a fixed latency, so four matmuls a layer instead
    of seven saved 0.26 ms of a 9.4 ms step at batch 50 on an H200 (benchmarks/RESULTS.md). The model's q/k/v
    (gate/up) weights become views of one tensor, in place: same parameters, same memory, and ``sync_weights``
    and an optimizer still reach them, but ``save_pretrained`` refuses tensors that share memory, so a model
    that is saved later must not be fused (``make_engine`` fuses only the models it owns). ``None`` (default):
    as ``compile``.
    """

    def __init__(self, model, layout: Layout, batch_size: int = 64, cuda_graph: bool = True, prefill_tokens: int = 32768,
                 attend_bucket: int = 128, visual_head: bool = True, weights_from: torch.nn.Module | None = None,
                 compile: bool | None = None, fuse: bool | None = None):
        self.model, self.layout, self.ids, self.batch_size = model, layout, layout.ids, batch_size
        self.cuda_graph, self.prefill_tokens, self.attend_bucket = cuda_graph, prefill_tokens, attend_bucket
        self.visual_head = visual_head
        self.weights_from = weights_from
        self.compile = model.device.type == "cuda" if compile is None else compile
        self.fuse = self.compile if fuse is None else fuse
        self._compiled_layer = None
        self.sync_weights()

    def _layer_call(self):
        """How a step calls a decoder layer: as is, or (``compile``) through one compiled function that every
        layer shares. Regional compilation: one layer is traced once. Compiling the whole decoder (32 unrolled
        layers) took more than 5 minutes on the GPU machine's host; this takes seconds."""
        if not self.compile:
            return _call_layer
        if self._compiled_layer is None:
            compiled = torch.compile(_call_layer, dynamic=True)

            def run(layer, hidden, **inputs):
                # Without duck shaping a batch of 128 rows stays a size of its own instead of being taken for the
                # head size 128 (and compiled for that batch size only).
                with torch.fx.experimental._config.patch(use_duck_shape=False):
                    return compiled(layer, hidden, **inputs)

            self._compiled_layer = run
        return self._compiled_layer

    @torch.no_grad()
    def sync_weights(self) -> None:
        """Copy the trained module's weights into ``model`` when it is a copy of them (``weights_from``: e.g. a
        bf16 copy of fp32 master weights); without ``weights_from`` the engine samples with the very module the
        optimizer updates, and there is nothing to push."""
        if self.weights_from is not None:
            torch._foreach_copy_(list(self.model.parameters()), list(self.weights_from.parameters()))

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], grids: list[tuple[int, int]], params: SamplingParams, seeds: list[int] | None = None
    ) -> Rollouts:
        """Complete every prompt once; ``grids[i]`` is the (H, W) the constraint enforces for prompt ``i``.

        ``seeds[i]`` seeds sequence ``i``'s sampler (default: ``params.seed + i``; taken modulo 2**32).
        """
        if params.top_p != 1.0:
            raise ValueError(f"top_p={params.top_p}: the built-in engine has no top-p sampling (engine: vllm has)")
        seeds = sequence_seeds(params, len(prompts), seeds)
        with _engine_attention(self.model):
            parts = [
                self._batch(prompts[i : i + self.batch_size], grids[i : i + self.batch_size], params, seeds[i : i + self.batch_size])
                for i in range(0, len(prompts), self.batch_size)
            ]
        width = max(p.tokens.shape[1] for p in parts)
        pad = lambda t, value: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)  # noqa: E731
        return Rollouts(
            tokens=torch.cat([pad(p.tokens, self.ids.pad) for p in parts]),
            logprobs=torch.cat([pad(p.logprobs, 0.0) for p in parts]),
            lengths=torch.cat([p.lengths for p in parts]),
            finished=torch.cat([p.finished for p in parts]),
        )

    def _batch(self, prompts, grids, params: SamplingParams, seeds: list[int]) -> Rollouts:
        model, device = self.model, self.model.device
        n, longest = len(prompts), max(map(len, prompts))
        headers = [grid_header(self.layout, grid) for grid in grids]
        max_tokens = params.max_tokens
        left = [tokens_left(h, continued(p, h), g) for p, h, g in zip(prompts, headers, grids)]
        if params.grid_constraint and None not in left:  # every length is known: no cache slot that none can reach
            max_tokens = min(max_tokens, max(left))
        bucketed = lambda count: -(-count // self.attend_bucket) * self.attend_bucket  # noqa: E731 (rounded up)
        # Left padding aligns every prompt's last token at the same cache slot. A decode step attends over the
        # slots written so far rounded up to a multiple of ``attend_bucket`` slots, counted from slot 0: widths
        # that are multiples of 8 keep the attention's rows 16-byte aligned, which cuBLAS needs for its fast
        # kernels. Cache and mask have one slot more than the widest step, never written nor attended: every
        # step then reads a strict prefix of them (a strided view), so one compiled layer function (``compile``)
        # serves every width, the last one included.
        slots = bucketed(longest + max_tokens) + 1
        ids = torch.full((n, longest), self.ids.pad, dtype=torch.long)
        mask = torch.zeros((n, slots), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, longest - len(prompt) :] = torch.tensor(prompt)
            mask[i, longest - len(prompt) : longest] = 1
        ids, mask = ids.to(device), mask.to(device)
        position = (mask[:, :longest].cumsum(-1) - 1).clamp(min=0)
        cache = StaticCache(config=model.config, max_cache_len=slots)
        # allocated here, not lazily inside the first (compiled) prefill call, where it would cost a compiled graph of
        # its own and transformers could not mark the cache's addresses static for the CUDA graphs
        decoder, head, call_layer = model.get_decoder(), model.get_output_embeddings(), self._layer_call()
        cache.early_initialization(n, model.config.num_key_value_heads, decoder.layers[0].self_attn.head_dim, model.dtype,
                                   device)
        constraint = GridConstraint(self.ids, torch.tensor(grids, device=device), headers, prompts, model.config.vocab_size)
        attend = mask[:, None, None, :].bool().contiguous()  # the 4-D mask is passed as is: no mask building per step
        layer_caches = [_OneLayer(layer) for layer in cache.layers]
        fused = [_fused_weights(layer) if self.fuse else {} for layer in decoder.layers]

        def forward(inputs: torch.Tensor, positions: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
            """The decoder (embedding, layers, final norm) over ``inputs`` [n, q], written to the next q cache slots
            and attending where ``attention`` [n, 1, q, width] allows; the hidden state of the last position."""
            hidden = decoder.embed_tokens(inputs)
            rope = decoder.rotary_emb(hidden, position_ids=positions)
            for layer, layer_cache, weights in zip(decoder.layers, layer_caches, fused):
                hidden = call_layer(layer, hidden, attention_mask=attention, position_embeddings=rope, position_ids=positions,
                                    past_key_values=layer_cache, **weights)
            return decoder.norm(hidden[:, -1])

        # Prefill, in slices of the prompts, through the same layer calls as decoding (compiled where they are):
        # causal, over the slots filled so far; a left-padding position sees itself, so no row is all masked.
        chunk, slot = max(1, self.prefill_tokens // n), torch.arange(slots, device=device)
        for start in range(0, longest, chunk):
            end = min(start + chunk, longest)
            width, query = bucketed(end), slot[start:end, None]
            visible = (attend[..., :width] & (slot[:width] <= query)) | (slot[:width] == query)
            last = forward(ids[:, start:end], position[:, start:end], visible)
        # The decode step's buffers: written in place, never re-bound, so a captured graph keeps seeing them.
        seeds_t = torch.tensor(seeds, dtype=torch.long, device=device)
        tokens = torch.full((n, max_tokens), self.ids.pad, dtype=torch.long, device=device)
        logprobs = torch.zeros((n, max_tokens), device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        lengths = torch.zeros(n, dtype=torch.long, device=device)
        step = torch.zeros((), dtype=torch.long, device=device)  # index of the token being chosen
        token = torch.zeros(n, dtype=torch.long, device=device)
        next_position = position[:, -1:] + 1
        codes = slice(self.ids.visual_base, self.ids.visual_base + self.ids.codebook_size)
        visual_rows = head.weight[codes]  # a view: sync_weights' in-place copies reach it
        visual_bias = None if head.bias is None else head.bias[codes]

        def commit(chosen: torch.Tensor, logp: torch.Tensor) -> None:
            token.copy_(torch.where(done, self.ids.pad, chosen))
            tokens.index_copy_(1, step[None], token[:, None])
            logprobs.index_copy_(1, step[None], torch.where(done, 0.0, logp)[:, None])
            lengths.add_((~done).long())
            done.logical_or_(token == self.ids.eos)
            constraint.advance(token)
            step.add_(1)

        def choose(logits: torch.Tensor) -> None:
            """The next token from the whole vocabulary, masked by the grid constraint."""
            logits = logits.float()
            if params.grid_constraint:
                constraint.mask_(logits)
            commit(*sample(logits, params, seeds_t, step))

        def choose_in_image(hidden: torch.Tensor) -> None:
            """The next token of sequences that are all inside their image block: forced, or a visual code."""
            logits = torch.nn.functional.linear(hidden, visual_rows, visual_bias).float()
            code, logp = sample(logits, params, seeds_t, step)
            forced = constraint.forced()
            commit(torch.where(forced >= 0, forced, code + self.ids.visual_base), torch.where(forced >= 0, 0.0, logp))

        def decode(width: int, in_image: bool) -> None:
            """One token per sequence: the decoder's forward for one query token."""
            attend.index_fill_(-1, (step + (longest - 1))[None], True)  # the cache slot of the token chosen last
            hidden = forward(token[:, None], next_position, attend[..., :width])
            next_position.add_(1)
            choose_in_image(hidden) if in_image else choose(head(hidden))

        def status() -> tuple[bool, bool]:
            """(every sequence finished, the visual head serves every unfinished one): one wait for the device."""
            finished, in_text = torch.stack([done.all(), (GridRule.free_text(constraint.state) & ~done).any()]).tolist()
            return finished, params.grid_constraint and self.visual_head and not in_text

        choose(head(last))  # the prefill's last logits: the whole vocabulary
        use_graph = self.cuda_graph and device.type == "cuda"
        graphs, pool = {}, torch.cuda.graph_pool_handle() if use_graph else None
        in_image = status()[1]  # sequences never leave their image block once in it: checked every few steps
        for t in range(1, max_tokens):
            # step t reads slots 0 .. longest - 1 + t: attend over that many, rounded up to a bucket
            width = bucketed(longest + t)
            key = (width, in_image)
            if key in graphs:
                graphs[key].replay()
            elif use_graph:  # runs step t, then records the step for the rest of this bucket
                graphs[key] = _captured(lambda: decode(width, in_image), pool)
            else:
                decode(width, in_image)
            if t % DONE_CHECK_EVERY == 0:
                finished, in_image = status()
                if finished:
                    break
        steps = int(lengths.max())
        return Rollouts(tokens[:, :steps].cpu(), logprobs[:, :steps].cpu(), lengths.cpu(), done.cpu())


def _call_layer(layer, hidden: torch.Tensor, qkv: torch.Tensor | None = None, gate_up: torch.Tensor | None = None,
                **inputs) -> torch.Tensor:
    """A decoder layer's forward with the layer as an argument: compiled, one trace serves every layer. With
    ``qkv`` and ``gate_up`` (:func:`_fused_weights`), :func:`_fused_layer` instead."""
    if qkv is None:
        return layer(hidden, **inputs)
    return _fused_layer(layer, qkv, gate_up, hidden, **inputs)


def _fused_layer(layer, qkv: torch.Tensor, gate_up: torch.Tensor, hidden: torch.Tensor, attention_mask: torch.Tensor,
                 position_embeddings: tuple[torch.Tensor, torch.Tensor], past_key_values, **_) -> torch.Tensor:
    """``Emu3DecoderLayer.forward`` without dropout (rollouts sample the model as evaluated), with q/k/v computed
    by one matmul and gate/up by another."""
    attn, mlp = layer.self_attn, layer.mlp
    batch, length, _ = hidden.shape
    heads = (attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0], attn.v_proj.weight.shape[0])
    query, key, value = (
        x.view(batch, length, -1, attn.head_dim).transpose(1, 2)
        for x in torch.nn.functional.linear(layer.input_layernorm(hidden), qkv).split(heads, dim=-1)
    )
    query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
    key, value = past_key_values.update(key, value, attn.layer_idx)
    out, _ = _attention(attn, query, key, value, attention_mask, scaling=attn.scaling)
    hidden = hidden + attn.o_proj(out.reshape(batch, length, -1))
    gate, up = torch.nn.functional.linear(layer.post_attention_layernorm(hidden), gate_up).chunk(2, dim=-1)
    return hidden + mlp.down_proj(mlp.act_fn(gate) * up)


def _fused_weights(layer) -> dict[str, torch.Tensor]:
    """The layer's q/k/v weights as one tensor and its gate/up weights as another, for :func:`_fused_layer`.

    The first call concatenates them and makes each projection's weight a view of its rows (``.data``: the same
    Parameter objects); later calls find the views in place and return their tensors without copying. A layer
    whose projections have biases is refused: Emu3's have none.
    """
    attn, mlp = layer.self_attn, layer.mlp
    groups = {"qkv": (attn.q_proj, attn.k_proj, attn.v_proj), "gate_up": (mlp.gate_proj, mlp.up_proj)}
    if any(linear.bias is not None for linears in groups.values() for linear in linears):
        raise ValueError("HFEngine(fuse=True): the decoder's projections have biases; use fuse=False")
    out = {}
    for name, linears in groups.items():
        fused = getattr(layer, f"_earl_{name}", None)
        rows = [linear.weight.shape[0] for linear in linears]
        if not (fused is not None and all(
                linear.weight.data_ptr() == part.data_ptr() and linear.weight.shape == part.shape
                for linear, part in zip(linears, fused.split(rows)))):
            fused = torch.cat([linear.weight.detach() for linear in linears])
            for linear, part in zip(linears, fused.split(rows)):
                linear.weight.data = part
            setattr(layer, f"_earl_{name}", fused)
        out[name] = fused
    return out


class _OneLayer:
    """One layer's part of a :class:`~transformers.StaticCache`, as that layer's attention calls it
    (``update(key, value, layer_idx)``). It ignores ``layer_idx``, which is what lets one compiled function serve
    every layer: nothing in a layer's trace depends on which layer it is."""

    def __init__(self, layer):
        self.layer = layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.layer.update(key_states, value_states, *args, **kwargs)


def _captured(step, pool) -> torch.cuda.CUDAGraph:
    """Run ``step`` once on a side stream (the warm-up that capture needs), then record it as a CUDA graph.

    Recording runs nothing; every replay of the returned graph runs ``step`` once more. One memory ``pool`` serves
    all of a batch's graphs: they replay one after another, never together.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        step()
    return graph


def sequence_seeds(params: SamplingParams, count: int, seeds: list[int] | None) -> list[int]:
    """Each sequence's seed, in [0, 2**32): ``seeds`` as given, or ``params.seed + i`` for sequence ``i``."""
    seeds = [params.seed + i for i in range(count)] if seeds is None else seeds
    return [int(s) % (1 << 32) for s in seeds]


def check_engine(kind: str, top_p: float, section: str) -> None:
    """Refuse, in one line and before any work, sampling settings that this environment's engine cannot honour.

    The vllm engine needs vLLM, which pins its own torch and transformers and ships CUDA wheels only, so it
    lives in its own environment; a step run elsewhere with ``engine: vllm`` stops here instead of deep
    inside training.
    """
    if kind == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            f"{section}.engine: 'vllm' needs the vllm package, which is not installed here; "
            "run the step in the vllm environment (envs/vllm.yaml, containers/vllm)"
        )
    if kind == "hf" and top_p != 1.0:
        raise ConfigError(f"{section}.top_p: {top_p} needs engine: vllm (the built-in engine has no top-p sampling)")


def make_engine(kind: str, layout: Layout, model_dir: Path, batch_size: int, gpu_memory_utilization: float,
                max_model_len: int | None = None, policy: torch.nn.Module | None = None, device: str = "cpu",
                dtype: torch.dtype | None = None):
    """The rollout engine ``kind`` (``rl.engine``, ``evaluate.engine``) for the model saved in ``model_dir``.

    ``policy``: the module being trained (rl), which the engine samples from after each ``sync_weights()``;
    without it the engine only reads ``model_dir`` (evaluate), and the built-in engine loads it on ``device``
    (in ``dtype``, or the dtype it was saved in).
    ``dtype``: the built-in engine samples from a copy of ``policy`` in this dtype where it differs from the
    policy's (bf16 rollouts of fp32 master weights). ``batch_size`` is the built-in engine's;
    ``gpu_memory_utilization`` and ``max_model_len`` are vLLM's.
    """
    if kind == "vllm":
        from earl.vllm_engine import VLLMEngine  # importable only in the vllm environment (check_engine)

        return VLLMEngine(model_dir, layout, gpu_memory_utilization, max_model_len, policy)
    if policy is None:  # the engine's own model: fused where compiled (HFEngine's default)
        return HFEngine(load_checked(Emu3ForCausalLM, model_dir).to(device=device, dtype=dtype).eval(), layout, batch_size)
    if dtype is None or dtype == policy.dtype:
        return HFEngine(policy, layout, batch_size, fuse=False)  # the module being trained, and saved: not fused
    with torch.device(policy.device):
        copy = Emu3ForCausalLM._from_config(policy.config, dtype=dtype).eval()
    return HFEngine(copy, layout, batch_size, weights_from=policy)
