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

from dataclasses import dataclass

import torch
from transformers import StaticCache

from earl.layout import Layout, SpecialIds


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
        self.head = torch.where(entered, -1, torch.where(in_header, self.head + 1, torch.where(tokens == self.ids.boi, 1, -1)))
        self.pos = torch.where(self.pos > 0, self.pos + 1, entered.long())


def _continued(prompt: list[int], header: list[int]) -> int:
    """Index of the next header token if ``prompt`` ends with a (non-empty) prefix of ``header``, else -1."""
    for k in range(len(header) - 1, 0, -1):
        if prompt[-k:] == header[:k]:
            return k
    return -1


def sample(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row, each from its own generator; return it and its log-probability under the
    (constrained, tempered, top-k) distribution it was drawn from.

    One generator per sequence makes a sequence's samples depend only on its own seed, never on which other
    sequences share its batch or its rank: the same run on 1 or N processes, or with another batch size, samples
    the same completions.
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
    probs = logp.exp()
    token = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


class HFEngine:
    """The built-in engine: batched decoding with the model's forward over a pre-allocated KV cache."""

    def __init__(self, model, layout: Layout, batch_size: int = 64):
        self.model, self.layout, self.ids, self.batch_size = model, layout, layout.ids, batch_size

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], grids: list[tuple[int, int]], params: SamplingParams, seeds: list[int] | None = None
    ) -> Rollouts:
        """Complete every prompt once; ``grids[i]`` is the (H, W) the constraint enforces for prompt ``i``.

        ``seeds[i]`` seeds sequence ``i``'s sampler (default: ``params.seed + i``).
        """
        seeds = [params.seed + i for i in range(len(prompts))] if seeds is None else seeds
        generators = [torch.Generator(device=self.model.device).manual_seed(int(s)) for s in seeds]
        parts = [
            self._batch(prompts[i : i + self.batch_size], grids[i : i + self.batch_size], params, generators[i : i + self.batch_size])
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

    def _batch(self, prompts, grids, params: SamplingParams, generators) -> Rollouts:
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

        tokens = torch.full((n, params.max_tokens), self.ids.pad, dtype=torch.long, device=device)
        logprobs = torch.zeros((n, params.max_tokens), device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        lengths = torch.zeros(n, dtype=torch.long, device=device)
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache,
            cache_position=torch.arange(longest, device=device), use_cache=True, logits_to_keep=1,
        )
        next_position = position[:, -1] + 1
        steps = 0
        for t in range(params.max_tokens):
            logits = out.logits[:, -1, :].float()
            if params.grid_constraint:
                constraint.mask_(logits)
            token, logp = sample(logits, params, generators)
            token = torch.where(done, self.ids.pad, token)
            tokens[:, t], logprobs[:, t] = token, torch.where(done, 0.0, logp)
            lengths += (~done).long()
            done |= token == self.ids.eos
            constraint.advance(token)
            steps = t + 1
            if bool(done.all()) or t + 1 == params.max_tokens:
                break
            mask[:, longest + t] = 1
            out = model(
                input_ids=token[:, None], attention_mask=mask, position_ids=next_position[:, None],
                past_key_values=cache, cache_position=torch.tensor([longest + t], device=device), use_cache=True,
            )
            next_position = next_position + 1
        return Rollouts(tokens[:, :steps].cpu(), logprobs[:, :steps].float().cpu(), lengths.cpu(), done.cpu())
