"""GRPO maths as the paper's code runs it (spec §C.7, §C.8): group advantages, split log-softmax, k3 KL, token mean.

On-policy REINFORCE with group z-scored advantages: one optimizer update per rollout batch, so the PPO ratio
is 1 and clipping never acts (spec §G). For each completion token t of sample i in group g:

    A_i      = (r_i − mean_g r) / (std_g r + ε)                    population std, ε = 1e-4
    k3_t     = exp(ref_t − logπ_t) − (ref_t − logπ_t) − 1           ≥ 0, unbiased for KL(π‖ref)
    ℓ_t      = −logπ_t · A_i + β · k3_t
    loss     = Σ_t ℓ_t / T                                          T = completion tokens of the whole batch

With separate vocabularies, a visual token's log-probability is normalised over the visual codes only and any
other token's over the text/special ids only (the grid constraint decides which kind comes next anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from earl.layout import SpecialIds


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(r − group mean) / (group population std + eps) for rewards laid out group after group.

    ``valid`` (bool) leaves samples out of their group's statistics (a judge that gave no answer); their
    advantage is 0.
    """
    groups = rewards.view(-1, group_size)
    weight = torch.ones_like(groups) if valid is None else valid.view(-1, group_size).to(groups.dtype)
    count = weight.sum(dim=1, keepdim=True).clamp(min=1)
    mean = (groups * weight).sum(dim=1, keepdim=True) / count
    std = (((groups - mean) ** 2 * weight).sum(dim=1, keepdim=True) / count).sqrt()
    return ((groups - mean) / (std + eps) * weight).view(-1)


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π‖ref) per token: exp(ref − logπ) − (ref − logπ) − 1."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def token_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_length: int, ids: SpecialIds,
    temperature: float = 1.0, separate_vocabs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities [B, C] of the last ``completion_length`` tokens of each row, and their entropy [B, C].

    Only the completion's logits are computed (``logits_to_keep``), and the log-softmax runs over the visual
    slice or the text slice per token, so the full-vocabulary log-softmax is never materialised twice.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        logits_to_keep=completion_length + 1, use_cache=False,
    ).logits[:, :-1].float() / temperature
    targets = input_ids[:, -completion_length:]
    base, end = ids.visual_base, ids.visual_base + ids.codebook_size
    if not separate_vocabs:
        logp_all = torch.log_softmax(logits, -1)
        return logp_all.gather(-1, targets[..., None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)
    visual = (targets >= base) & (targets < end)
    logp_visual = torch.log_softmax(logits[..., base:end], -1)
    logp_text = torch.log_softmax(logits[..., :base], -1)
    picked_visual = logp_visual.gather(-1, (targets - base).clamp(0, end - base - 1)[..., None]).squeeze(-1)
    picked_text = logp_text.gather(-1, targets.clamp(max=base - 1)[..., None]).squeeze(-1)
    entropy_visual = -(logp_visual.exp() * logp_visual).sum(-1)
    entropy_text = -(logp_text.exp() * logp_text).sum(-1)
    return torch.where(visual, picked_visual, picked_text), torch.where(visual, entropy_visual, entropy_text)


@dataclass
class LossParts:
    loss: torch.Tensor  # Σ ℓ_t / total_tokens: this micro-batch's share of the token mean
    policy: float  # Σ −logπ·A / total_tokens
    kl: float  # Σ k3 / total_tokens


def grpo_loss(
    logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, beta: float,
    total_tokens: int | float,
) -> LossParts:
    """ℓ summed over this micro-batch's completion tokens (``mask``), divided by the batch-wide token count."""
    policy = -logp * advantages[:, None]
    kl = k3(logp, ref_logp)
    per_token = (policy + beta * kl) * mask
    return LossParts(
        loss=per_token.sum() / total_tokens,
        policy=float((policy.detach() * mask).sum() / total_tokens),
        kl=float((kl.detach() * mask).sum() / total_tokens),
    )
