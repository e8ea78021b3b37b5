"""Rollout engines: prompts + grid sizes + sampling parameters in, completions with log-probs out.

Every step that generates (the SFT quality check, GRPO rollouts, evaluation, ``earl edit``) calls
:meth:`Engine.generate`, so there is one generation code path. The built-in ``hf`` engine runs the model's own
forward over a pre-allocated :class:`~transformers.StaticCache` (no per-token cache growth), samples on the
model's device, and applies the grid constraint as an O(1)-per-token state update (spec §C.4) instead of the
original's re-scan of the whole history at every token.

Grid constraint (spec §C.4), O(1) state per token: before the image only text and special tokens are allowed
(no visual codes); once ``<|image start|>`` is there (generated or pre-filled), the header ``H*W`` and
``<|image token|>`` are forced, then exactly W visual codes and EOL per row, H rows, then EOF, EOI and EOS.
The original left the header digits free, so a model could write a header that disagreed with the grid it
was forced into; here header and grid always agree.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from earl.layout import Layout, SpecialIds

DONE_CHECK_EVERY = 16  # decode steps between checks that every sequence has finished (each check waits for the device)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature == 0`` is greedy decoding."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int = -1
    grid_constraint: bool = True
    seed: int = 0


@dataclass
class Rollouts:
    """Completions of one :meth:`Engine.generate` call, right-padded with PAD.

    ``tokens[i, :lengths[i]]`` is completion ``i`` (its EOS included when ``finished[i]``); ``logprobs`` are
    the log-probabilities of those tokens under the distribution they were sampled from (after the grid
    constraint, temperature and top-k).
    """

    tokens: torch.Tensor  # [N, T] int64
    logprobs: torch.Tensor  # [N, T] float32, 0 after the end
    lengths: torch.Tensor  # [N] int64
    finished: torch.Tensor  # [N] bool: ended with EOS

    def completion(self, i: int) -> list[int]:
        return self.tokens[i, : self.lengths[i]].tolist()


class GridConstraint:
    """Per-sequence state machine forcing an H×W image block; O(1) state update per token.

    ``header[i]`` is BOI, the digits of "H*W" and IMG for sequence ``i``; ``head[i]`` points at the next header
    token to force (-1: free text before the image); ``pos[i]`` counts tokens since IMG (0: not in the image).
    The state is updated in place, so a captured CUDA graph that reads and writes it stays valid.
    """

    def __init__(self, ids: SpecialIds, grids: torch.Tensor, headers: list[list[int]], prompts: list[list[int]], vocab_size: int):
        self.ids = ids
        device = grids.device
        self.rows, self.cols = grids[:, 0], grids[:, 1]
        width = max(map(len, headers))
        self.header = torch.tensor([h + [ids.pad] * (width - len(h)) for h in headers], device=device)
        # a prompt that ends inside the header (e.g. the prefill "<|image start|>8*8") continues it
        self.head = torch.tensor([_continued(p, h) for p, h in zip(prompts, headers)], device=device)
        self.pos = torch.zeros(len(grids), dtype=torch.long, device=device)
        col = torch.arange(vocab_size, device=device)
        self.visual = (col >= ids.visual_base) & (col < ids.visual_base + ids.codebook_size)
        self.col = col

    def forced(self) -> torch.Tensor:
        """The token each sequence must emit next, or -1 where any visual code (or, before the image, any text) may."""
        width, end = self.cols + 1, (self.cols + 1) * self.rows
        pos = self.pos
        forced = torch.where(self.head >= 0, self.header.gather(1, self.head.clamp(min=0)[:, None]).squeeze(1), -1)
        forced = torch.where((pos > 0) & (pos % width == 0) & (pos <= end), self.ids.eol, forced)
        for offset, token in ((1, self.ids.eof), (2, self.ids.eoi), (3, self.ids.eos)):
            forced = torch.where(pos == end + offset, token, forced)
        return torch.where(pos > end + 3, self.ids.pad, forced)

    def mask_(self, logits: torch.Tensor) -> torch.Tensor:
        """Set the logits of every disallowed token to -inf, in place."""
        forced = self.forced()
        free_text = ((self.pos == 0) & (self.head < 0))[:, None]
        allowed = torch.where(
            free_text, ~self.visual, torch.where((forced < 0)[:, None], self.visual, self.col == forced[:, None])
        )
        return logits.masked_fill_(~allowed, float("-inf"))

    def advance(self, tokens: torch.Tensor) -> None:
        """Move every sequence past its just-sampled token."""
        entered = tokens == self.ids.img
        in_header = self.head >= 0
        self.head.copy_(torch.where(entered, -1, torch.where(in_header, self.head + 1, torch.where(tokens == self.ids.boi, 1, -1))))
        self.pos.copy_(torch.where(self.pos > 0, self.pos + 1, entered.long()))


def _continued(prompt: list[int], header: list[int]) -> int:
    """Index of the next header token if ``prompt`` ends with a (non-empty) prefix of ``header``, else -1."""
    for k in range(len(header) - 1, 0, -1):
        if prompt[-k:] == header[:k]:
            return k
    return -1


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
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
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
    the same scores, no copy. Prefill (more than one query token) goes to transformers' own SDPA function.
    """
    batch, heads, length, dim = query.shape
    if length > 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, 1, heads, dim), None


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
    """

    def __init__(self, model, layout: Layout, batch_size: int = 64, cuda_graph: bool = True, prefill_tokens: int = 32768):
        self.model, self.layout, self.ids, self.batch_size = model, layout, layout.ids, batch_size
        self.cuda_graph, self.prefill_tokens = cuda_graph, prefill_tokens

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], grids: list[tuple[int, int]], params: SamplingParams, seeds: list[int] | None = None
    ) -> Rollouts:
        """Complete every prompt once; ``grids[i]`` is the (H, W) the constraint enforces for prompt ``i``.

        ``seeds[i]`` seeds sequence ``i``'s sampler (default: ``params.seed + i``; taken modulo 2**32).
        """
        seeds = [params.seed + i for i in range(len(prompts))] if seeds is None else seeds
        seeds = [int(s) % (1 << 32) for s in seeds]
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
        total = longest + params.max_tokens
        # Left padding aligns every prompt's last token at the same cache slot.
        ids = torch.full((n, longest), self.ids.pad, dtype=torch.long)
        mask = torch.zeros((n, total), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, longest - len(prompt) :] = torch.tensor(prompt)
            mask[i, longest - len(prompt) : longest] = 1
        ids, mask = ids.to(device), mask.to(device)
        position = (mask[:, :longest].cumsum(-1) - 1).clamp(min=0)
        cache = StaticCache(config=model.config, max_cache_len=total)
        headers = [[self.ids.boi, *self.layout.text(f"{h}*{w}"), self.ids.img] for h, w in grids]
        constraint = GridConstraint(self.ids, torch.tensor(grids, device=device), headers, prompts, model.config.vocab_size)
        chunk = max(1, self.prefill_tokens // n)
        for start in range(0, longest, chunk):
            end = min(start + chunk, longest)
            out = model(
                input_ids=ids[:, start:end], attention_mask=mask, position_ids=position[:, start:end], past_key_values=cache,
                cache_position=torch.arange(start, end, device=device), use_cache=True, logits_to_keep=1,
            )
        # The decode step's buffers: written in place, never re-bound, so a captured graph keeps seeing them.
        seeds_t = torch.tensor(seeds, dtype=torch.long, device=device)
        tokens = torch.full((n, params.max_tokens), self.ids.pad, dtype=torch.long, device=device)
        logprobs = torch.zeros((n, params.max_tokens), device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        lengths = torch.zeros(n, dtype=torch.long, device=device)
        step = torch.zeros((), dtype=torch.long, device=device)  # index of the token being chosen
        token = torch.zeros(n, dtype=torch.long, device=device)
        next_position = position[:, -1:] + 1
        attend = mask[:, None, None, :].bool().contiguous()  # the 4-D mask is passed as is: no mask building per step

        def choose(logits: torch.Tensor) -> None:
            logits = logits[:, -1, :].float()
            if params.grid_constraint:
                constraint.mask_(logits)
            chosen, logp = sample(logits, params, seeds_t, step)
            token.copy_(torch.where(done, self.ids.pad, chosen))
            tokens.index_copy_(1, step[None], token[:, None])
            logprobs.index_copy_(1, step[None], torch.where(done, 0.0, logp)[:, None])
            lengths.add_((~done).long())
            done.logical_or_(token == self.ids.eos)
            constraint.advance(token)
            step.add_(1)

        def decode() -> None:
            slot = step + (longest - 1)  # the cache slot of the token chosen last
            attend.index_fill_(-1, slot[None], True)
            out = model(
                input_ids=token[:, None], attention_mask=attend, position_ids=next_position, past_key_values=cache,
                cache_position=slot[None], use_cache=True,
            )
            next_position.add_(1)
            choose(out.logits)

        choose(out.logits)
        graph, use_graph = None, self.cuda_graph and device.type == "cuda"
        for t in range(1, params.max_tokens):
            if graph is not None:
                graph.replay()
            elif use_graph:
                graph = _captured(decode)  # runs step 1, then records the step for the rest
            else:
                decode()
            if t % DONE_CHECK_EVERY == 0 and bool(done.all()):
                break
        steps = int(lengths.max())
        return Rollouts(tokens[:, :steps].cpu(), logprobs[:, :steps].cpu(), lengths.cpu(), done.cpu())


def _captured(step) -> torch.cuda.CUDAGraph:
    """Run ``step`` once on a side stream (the warm-up that capture needs), then record it as a CUDA graph.

    Recording runs nothing; every replay of the returned graph runs ``step`` once more.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph
