"""GRPO maths against hand-computed values (spec §C.7, §C.8)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import random_emu3
from earl.grpo import group_advantages, grpo_loss, k3, token_logprobs
from earl.layout import Layout


def test_advantages_are_group_z_scores_with_population_std():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    adv = group_advantages(rewards, group_size=4, eps=1e-4)
    # group 1: mean 3, population std sqrt(3.5); group 2: all equal -> exactly 0, not NaN
    std = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 4)
    expected = [(r - 3) / (std + 1e-4) for r in (1.0, 2.0, 3.0, 6.0)] + [0.0] * 4
    assert adv.tolist() == pytest.approx(expected)


def test_failed_judgements_are_left_out_of_their_group():
    rewards = torch.tensor([1.0, 3.0, 99.0, 0.0])
    adv = group_advantages(rewards, group_size=4, eps=0.0, valid=torch.tensor([True, True, False, True]))
    # statistics of {1, 3, 0}: mean 4/3, population std sqrt(14/9)
    mean, std = 4 / 3, math.sqrt(((1 - 4 / 3) ** 2 + (3 - 4 / 3) ** 2 + (4 / 3) ** 2) / 3)
    assert adv.tolist() == pytest.approx([(1 - mean) / std, (3 - mean) / std, 0.0, (0 - mean) / std])


def test_k3_is_zero_at_equality_and_matches_the_formula():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.0, -1.0, -3.0])
    assert k3(logp, ref).tolist() == pytest.approx([0.0, math.e - 1 - 1, math.exp(-2.5) + 2.5 - 1])
    assert (k3(logp, ref) >= 0).all()


def test_loss_is_a_token_mean_over_the_whole_batch():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    beta = 0.1
    # micro-batches of one row each, normalised by the 3 completion tokens of the whole batch, add up to the mean
    parts = [grpo_loss(logp[i : i + 1], ref[i : i + 1], adv[i : i + 1], mask[i : i + 1], beta, 3) for i in range(2)]
    whole = grpo_loss(logp, ref, adv, mask, beta, 3)
    hand = (-(-1.0) * 2 + -(-2.0) * 2 + beta * (math.e - 2) + -(-0.5) * -1.0) / 3
    assert whole.loss.item() == pytest.approx(hand)
    assert sum(p.loss.item() for p in parts) == pytest.approx(hand)
    assert whole.kl == pytest.approx((math.e - 2) / 3)
    whole.loss.backward()
    assert logp.grad[0, 2] == 0 and logp.grad[1, 1] == 0  # padding gets no gradient


def test_split_log_softmax_normalises_visual_and_text_tokens_separately(tiny_tokenizer):
    layout = Layout(tiny_tokenizer, 16)
    model = random_emu3(layout, len(tiny_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1).eval()
    base = layout.ids.visual_base
    completion = [base + 3, layout.ids.eol, base + 15, layout.ids.eos]
    input_ids = torch.tensor([[layout.ids.bos, base + 1, base + 2, *completion]])
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        logp, entropy = token_logprobs(model, input_ids, mask, len(completion), layout.ids)
        logits = model(input_ids).logits[0, -len(completion) - 1 : -1]
    for t, token in enumerate(completion):
        if token >= base:
            expected = torch.log_softmax(logits[t, base : base + 16], -1)[token - base]
        else:
            expected = torch.log_softmax(logits[t, :base], -1)[token]
        assert logp[0, t].item() == pytest.approx(expected.item(), abs=1e-5)
    assert (entropy[0, [0, 2]] <= math.log(16) + 1e-5).all()  # a visual token's entropy is over 16 codes
    full, _ = token_logprobs(model, input_ids, mask, len(completion), layout.ids, separate_vocabs=False)
    assert (full <= logp + 1e-6).all()  # normalising over fewer tokens can only raise the probability
