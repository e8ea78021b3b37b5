"""The built-in rollout engine: HF-identical greedy output, exact sampling distribution, the grid constraint."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from transformers import StaticCache

import earl.engine as engine_module
from conftest import random_emu3
from earl.config import ConfigError
from earl.engine import (
    DONE_CHECK_EVERY, GridConstraint, GridRequest, GridRule, GridSlots, HFEngine, SamplingParams, check_engine, continued,
    grid_header, make_engine,
)
from earl.layout import Layout


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    layout = Layout(tiny_tokenizer, 16)
    model = random_emu3(layout, len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return model.eval(), layout


def prompts(layout, n: int, shape=(3, 4)) -> list[list[int]]:
    rng = np.random.default_rng(1)
    words = ["make the red circle blue", "remove the blue triangle", "add a green square at row 3, column 5"]
    return [layout.prompt(rng.integers(0, 16, shape), words[i % 3] * (1 + i % 2)) for i in range(n)]


def test_greedy_equals_hf_generate_with_left_padded_batches(tiny):
    model, layout = tiny
    batch = prompts(layout, 5)
    assert len({len(p) for p in batch}) > 1
    rollouts = HFEngine(model, layout, batch_size=3).generate(
        batch, [(3, 4)] * 5, SamplingParams(max_tokens=12, temperature=0.0, grid_constraint=False)
    )
    for i, prompt in enumerate(batch):
        expected = model.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=layout.ids.pad,
            eos_token_id=layout.ids.eos,
        )[0, len(prompt):].tolist()
        assert rollouts.completion(i) == expected


def test_prompts_prefilled_in_slices_give_the_same_greedy_completions(tiny):
    model, layout = tiny
    batch = prompts(layout, 4)
    params = SamplingParams(max_tokens=10, temperature=0.0, grid_constraint=False)
    whole = HFEngine(model, layout, batch_size=4).generate(batch, [(3, 4)] * 4, params)
    sliced = HFEngine(model, layout, batch_size=4, prefill_tokens=4 * 7).generate(batch, [(3, 4)] * 4, params)
    assert max(map(len, batch)) > 3 * 7  # several slices, the last one partial
    assert torch.equal(whole.tokens, sliced.tokens)
    assert torch.allclose(whole.logprobs, sliced.logprobs, atol=1e-5)


def test_attending_over_the_filled_slots_only_gives_the_whole_cache_s_samples(tiny):
    """Decode steps read the filled part of the cache rounded up to ``attend_bucket`` slots, a width that grows
    during the completion; the masked empty slots never mattered, so tokens and log-probs stay those of attending
    over the whole static cache."""
    model, layout = tiny
    batch = prompts(layout, 4)
    params = SamplingParams(max_tokens=30, seed=5)
    whole = HFEngine(model, layout, batch_size=4, attend_bucket=10_000).generate(batch, [(3, 4)] * 4, params)
    bucketed = HFEngine(model, layout, batch_size=4, attend_bucket=4).generate(batch, [(3, 4)] * 4, params)
    assert int(whole.lengths.max()) > 2 * 4  # the width changed several times
    assert torch.equal(whole.tokens, bucketed.tokens)
    assert torch.allclose(whole.logprobs, bucketed.logprobs, atol=1e-5)


def test_the_visual_head_samples_what_the_whole_vocabulary_would(tiny):
    """Once every unfinished row is inside its image block, a step computes only the LM head's visual rows:
    the same tokens and log-probabilities as masking the whole vocabulary, and the whole head stops running
    within a status check of the last row opening its image."""
    model, layout = tiny
    model = copy.deepcopy(model)
    whole = model.lm_head
    model.lm_head = torch.nn.Linear(whole.in_features, whole.out_features, bias=True)  # a bias, sliced as well
    with torch.no_grad():
        model.lm_head.weight.copy_(whole.weight)
        model.lm_head.bias.copy_(torch.randn(whole.out_features, generator=torch.Generator().manual_seed(0)) * 0.1)
        model.lm_head.bias[layout.ids.boi] = 1.0  # rows open their images after some free text
    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    grids = [(6, 7), (5, 8), (8, 4), (7, 7)] * 2
    batch = [layout.prompt(np.zeros(g, dtype=int), "make the red circle blue", "") for g in grids]  # no prefill
    params = SamplingParams(max_tokens=200, seed=3, top_k=5)
    masked = HFEngine(model, layout, batch_size=8, visual_head=False).generate(batch, grids, params)
    whole_head_calls = len(calls)  # the prefill's last logits, then every decode step
    calls.clear()
    visual = HFEngine(model, layout, batch_size=8).generate(batch, grids, params)
    assert masked.finished.all()
    assert torch.equal(masked.tokens, visual.tokens)
    assert torch.allclose(masked.logprobs, visual.logprobs, atol=1e-5)
    opened = [masked.completion(i).index(layout.ids.boi) for i in range(len(batch)) if layout.ids.boi in masked.completion(i)]
    assert len(set(opened)) > 1 and max(opened) > 0
    assert max(opened) < len(calls) <= max(opened) + 1 + DONE_CHECK_EVERY < whole_head_calls
    prefilled = [layout.prompt(np.zeros(g, dtype=int), "make the red circle blue", "<|image start|>") for g in grids]
    greedy = SamplingParams(max_tokens=200, temperature=0.0)
    assert torch.equal(HFEngine(model, layout, batch_size=8, visual_head=False).generate(prefilled, grids, greedy).tokens,
                       HFEngine(model, layout, batch_size=8).generate(prefilled, grids, greedy).tokens)


def test_the_cache_holds_only_the_slots_a_constrained_completion_can_reach(tiny, monkeypatch):
    """With the image opened in every prompt, the grid fixes each completion's length: a generous ``max_tokens``
    (evaluation's 3,000) costs no cache memory and changes no token. Free text first: ``max_tokens`` it is.
    Either way the slots are rounded up to a multiple of ``attend_bucket`` (aligned attention widths), plus
    one slot never written."""
    model, layout = tiny
    rounded = lambda slots: -(-slots // 8) * 8 + 1  # noqa: E731
    sizes = []
    monkeypatch.setattr(engine_module, "StaticCache", lambda **kw: sizes.append(kw["max_cache_len"]) or StaticCache(**kw))
    grids = [(3, 4), (2, 5), (4, 1)]
    for prefill, written in (("<|image start|>", lambda header: 1), ("<|image start|>{H}*{W}", lambda header: len(header) - 1)):
        batch = [layout.prompt(np.zeros(g, dtype=int), "make the red circle blue", prefill) for g in grids]
        longest_completion = max(  # the rest of the header, H rows of W codes + EOL, EOF, EOI, EOS
            len(h) - written(h) + rows * (cols + 1) + 3 for h, (rows, cols) in zip([grid_header(layout, g) for g in grids], grids)
        )
        exact = HFEngine(model, layout, attend_bucket=8).generate(batch, grids, SamplingParams(max_tokens=longest_completion, seed=2))
        roomy = HFEngine(model, layout, attend_bucket=8).generate(batch, grids, SamplingParams(max_tokens=3000, seed=2))
        assert sizes[-2:] == [rounded(max(map(len, batch)) + longest_completion)] * 2
        assert torch.equal(exact.tokens, roomy.tokens) and bool(roomy.finished.all())
        assert int(roomy.lengths.max()) == longest_completion
    free = [layout.prompt(np.zeros(g, dtype=int), "make the red circle blue", "") for g in grids]
    HFEngine(model, layout, attend_bucket=8).generate(free, grids, SamplingParams(max_tokens=50, seed=2))
    assert sizes[-1] == rounded(max(map(len, free)) + 50)


def test_engine_of_another_dtype_samples_from_a_copy_that_sync_weights_refreshes(tiny):
    """rl.bf16: the engine decodes with a bf16 copy of the fp32 policy; each sync_weights() pushes the update."""
    model, layout = tiny
    policy = copy.deepcopy(model)
    engine = make_engine("hf", layout, None, 4, 0.5, policy=policy, dtype=torch.bfloat16)
    assert engine.model is not policy and engine.model.dtype == torch.bfloat16

    def same_weights() -> bool:
        return all(torch.equal(e, p.to(torch.bfloat16)) for e, p in zip(engine.model.state_dict().values(), policy.state_dict().values()))

    assert same_weights()
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(1.5)
    assert not same_weights()
    engine.sync_weights()
    assert same_weights()
    batch = [layout.prompt(np.zeros((3, 4), dtype=int), "make the red circle blue", "<|image start|>")] * 2
    rollouts = engine.generate(batch, [(3, 4)] * 2, SamplingParams(max_tokens=40, seed=1))
    assert rollouts.finished.all() and torch.isfinite(rollouts.logprobs).all()
    assert make_engine("hf", layout, None, 4, 0.5, policy=policy, dtype=torch.float32).model is policy


def test_fused_projections_sample_what_the_layers_as_written_do(tiny):
    """fuse: q/k/v and gate/up as one matmul each, over weights that the model's own projections now view: the
    same tokens and log-probabilities, the model's own forward unchanged, no second copy, sync_weights reaching
    the fused tensors."""
    model, layout = tiny
    model = copy.deepcopy(model)
    batch = prompts(layout, 3)
    params = SamplingParams(max_tokens=30, seed=5, grid_constraint=False)
    before = model(torch.tensor([batch[0]])).logits
    plain = HFEngine(model, layout, batch_size=3, fuse=False).generate(batch, [(3, 4)] * 3, params)
    fused = HFEngine(model, layout, batch_size=3, fuse=True).generate(batch, [(3, 4)] * 3, params)
    assert torch.equal(plain.tokens, fused.tokens)
    assert torch.allclose(plain.logprobs, fused.logprobs, atol=1e-5)
    assert torch.allclose(model(torch.tensor([batch[0]])).logits, before, atol=1e-6)
    attn = model.model.layers[0].self_attn
    qkv = engine_module._fused_weights(model.model.layers[0])["qkv"]
    assert attn.k_proj.weight.data_ptr() == qkv.data_ptr() + attn.q_proj.weight.numel() * qkv.element_size()
    assert engine_module._fused_weights(model.model.layers[0])["qkv"] is qkv  # found in place, not copied again
    source = copy.deepcopy(model)
    with torch.no_grad():
        source.model.layers[0].self_attn.v_proj.weight.add_(1.0)
    HFEngine(model, layout, fuse=True, weights_from=source)
    assert torch.equal(qkv[-attn.v_proj.weight.shape[0]:], source.model.layers[0].self_attn.v_proj.weight)


def test_make_engine_never_fuses_the_module_being_trained(tiny, monkeypatch):
    """The policy is saved with save_pretrained, which refuses weights that share memory. Compiled (as on CUDA),
    where the engine fuses by default."""
    model, layout = tiny
    policy = copy.deepcopy(model)
    monkeypatch.setattr(engine_module, "HFEngine", functools.partial(HFEngine, compile=True))
    engine = make_engine("hf", layout, None, 4, 0.5, policy=policy)
    assert engine.model is policy and not engine.fuse
    engine.generate(prompts(layout, 2), [(3, 4)] * 2, SamplingParams(max_tokens=4))
    attn = policy.model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() != attn.k_proj.weight.untyped_storage().data_ptr()


@pytest.mark.parametrize("prefill", ["<|image start|>", "<|image start|>{H}*{W}", ""])
def test_grid_constraint_makes_every_sample_a_well_formed_block(tiny, prefill):
    """Even an untrained model writes exactly the source's H×W block, with RL's, eval's or no prefill."""
    model, layout = tiny
    grids = [(3, 4), (2, 5), (4, 1)] * 4
    batch = [layout.prompt(np.zeros(g, dtype=int), "make the red circle blue", prefill) for g in grids]
    rollouts = HFEngine(model, layout, batch_size=8).generate(batch, grids, SamplingParams(max_tokens=200, seed=3))
    opened = 0
    for i, grid in enumerate(grids):
        sequence = batch[i] + rollouts.completion(i)
        if layout.ids.boi not in sequence[len(batch[i]) - 6 :]:
            assert not prefill  # without a prefill the model writes free text until it opens the image itself
            continue
        opened += 1
        assert rollouts.finished[i]
        assert sequence[-3:] == [layout.ids.eof, layout.ids.eoi, layout.ids.eos]
        start = len(sequence) - 1 - sequence[::-1].index(layout.ids.boi)
        assert layout.parse_grid(sequence[start:]).shape == grid
        assert sequence[start + 1 : start + 4] == layout.text(f"{grid[0]}*{grid[1]}")  # header agrees with grid
        assert torch.isfinite(rollouts.logprobs[i, : rollouts.lengths[i]]).all()
        assert (rollouts.logprobs[i, : rollouts.lengths[i]] <= 0).all()
    assert opened == len(grids) or not prefill


def test_constraint_allows_exactly_the_spec_tokens_at_every_position(tiny):
    _, layout = tiny
    ids, vocab = layout.ids, layout.ids.visual_base + 16
    header = [ids.boi, *layout.text("2*3"), ids.img]
    constraint = GridConstraint(ids, torch.tensor([[2, 3]]), [header], [[ids.bos, 5, 6]], vocab)
    visual = set(range(ids.visual_base, ids.visual_base + 16))

    def allowed() -> set[int]:
        logits = torch.zeros(1, vocab)
        return set(torch.isfinite(constraint.mask_(logits))[0].nonzero().flatten().tolist())

    # before <|image start|>: any text or special token, no visual code
    assert allowed() == set(range(vocab)) - visual
    constraint.advance(torch.tensor([7]))
    assert allowed() == set(range(vocab)) - visual
    body = [visual] * 3 + [{ids.eol}] + [visual] * 3 + [{ids.eol}]
    expected = [{t} for t in header[1:]] + body + [{ids.eof}, {ids.eoi}, {ids.eos}, {ids.pad}]
    constraint.advance(torch.tensor([ids.boi]))  # the model opens the image: header, IMG, rows, end forced
    for want in expected:
        assert allowed() == want
        constraint.advance(torch.tensor([min(want)]))


def test_prompt_ending_inside_the_header_continues_it(tiny):
    _, layout = tiny
    ids, vocab = layout.ids, layout.ids.visual_base + 16
    header = [ids.boi, *layout.text("2*3"), ids.img]
    for prefill_length, first in ((1, header[1]), (len(header) - 1, ids.img)):
        constraint = GridConstraint(ids, torch.tensor([[2, 3]]), [header], [[ids.bos, 5, *header[:prefill_length]]], vocab)
        logits = constraint.mask_(torch.zeros(1, vocab))
        assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [first]


def test_slot_pool_applies_the_batch_constraint_s_rule_to_every_slot_at_every_step(tiny):
    """The vllm engine's shape of the constraint (a pool of slots, rows reordered every step, tokens read from a
    history, a preempted sequence recomputed) allows exactly what GridConstraint allows the same sequence."""
    _, layout = tiny
    ids, vocab, steps = layout.ids, layout.ids.visual_base + 16, 24
    rng = np.random.default_rng(0)
    grids = [(2, 3), (1, 2), (3, 1)]
    prompts = [layout.prompt(np.zeros(g, dtype=int), "make the red circle blue", prefill)
               for g, prefill in zip(grids, ["<|image start|>", "<|image start|>{H}*{W}", ""])]
    # each sequence alone under GridConstraint, a random allowed token per step (the free-text one opens its
    # image after three words)
    expected, generated = [], []
    for prompt, grid in zip(prompts, grids):
        constraint = GridConstraint(ids, torch.tensor([grid]), [grid_header(layout, grid)], [prompt], vocab)
        masks, tokens = [], []
        for t in range(steps):
            masks.append(torch.isfinite(constraint.mask_(torch.zeros(1, vocab)))[0])
            choice = ids.boi if t == 3 and grid == grids[2] else rng.choice(masks[-1].nonzero().flatten().numpy())
            tokens.append(int(choice))
            constraint.advance(torch.tensor([tokens[-1]]))
        expected.append(masks)
        generated.append(tokens)
    assert all(ids.eos in tokens for tokens in generated)  # every walk went through a whole image block

    pool = GridSlots(GridRule(ids, vocab, "cpu"), slots=6)
    slot_of = [4, 1, 2]  # slot 0 holds a sequence without the constraint
    history = torch.zeros(6, 200, dtype=torch.int32)  # vLLM's all_token_ids: prompt, then generated tokens
    starts = {0: 5}
    requests = {}
    for slot, prompt, grid, tokens in zip(slot_of, prompts, grids, generated):
        history[slot, : len(prompt) + steps] = torch.tensor(prompt + tokens)
        starts[slot] = len(prompt)
        requests[slot] = GridRequest.from_args(GridRequest.of(layout, prompt, grid).to_args())  # via extra_args
        assert pool.add(slot, requests[slot])
    assert not pool.add(0, None)
    pool.flush()
    for t in range(steps):
        if t == 10:  # preempted and recomputed: re-added, each slot folds its 10 tokens at once
            for slot in slot_of:
                pool.add(slot, requests[slot])
            pool.flush()
        order = np.array([4, 0, 1, 2] if t % 2 else [2, 1, 0, 4])
        pool.fold(order, np.full(4, t), history, np.array([starts[s] for s in order]))
        allowed = torch.isfinite(pool.mask_(torch.zeros(4, vocab), order))
        for row, slot in enumerate(order.tolist()):
            want = torch.ones(vocab, dtype=torch.bool) if slot == 0 else expected[slot_of.index(slot)][t]
            assert torch.equal(allowed[row], want), (t, slot)


def test_grid_request_carries_grid_header_and_prompt_state(tiny):
    _, layout = tiny
    header = grid_header(layout, (3, 4))
    eval_prompt = layout.prompt(np.zeros((3, 4), dtype=int), "remove the blue triangle", "<|image start|>{H}*{W}")
    request = GridRequest.of(layout, eval_prompt, (3, 4))
    assert (request.rows, request.cols, request.header) == (3, 4, header)
    assert request.head == continued(eval_prompt, header) == len(header) - 1  # the prefill stops before IMG
    assert GridRequest.from_args(request.to_args()) == request
    for bad in ({"rows": 3, "cols": 4, "header": header}, {**request.to_args(), "header": header * 4},
                {**request.to_args(), "head": len(header)}, {**request.to_args(), "rows": 0}):
        with pytest.raises(ValueError, match="earl_grid"):
            GridRequest.from_args(bad)


def test_top_p_needs_the_vllm_engine(tiny):
    model, layout = tiny
    with pytest.raises(ConfigError, match=r"^rl\.top_p: 0\.9 needs engine: vllm"):
        check_engine("hf", 0.9, "rl")
    check_engine("hf", 1.0, "rl")
    with pytest.raises(ValueError, match="top-p"):
        HFEngine(model, layout).generate(prompts(layout, 1), [(3, 4)], SamplingParams(max_tokens=2, top_p=0.9))


def test_sampling_matches_the_model_distribution(tiny):
    """One sampled token per row, many rows: frequencies follow softmax(logits / T) within top-k (chi-square)."""
    model, layout = tiny
    prompt = prompts(layout, 1)[0]
    n, temperature, top_k = 4000, 1.5, 6
    params = SamplingParams(max_tokens=1, temperature=temperature, top_k=top_k, grid_constraint=False, seed=11)
    rollouts = HFEngine(model, layout, batch_size=n).generate([prompt] * n, [(3, 4)] * n, params)
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1] / temperature
    top = torch.topk(logits, top_k)
    probs = torch.softmax(top.values, -1).numpy()
    counts = np.array([(rollouts.tokens[:, 0] == t).sum().item() for t in top.indices.tolist()])
    assert counts.sum() == n  # nothing outside the top k
    chi2 = (((counts - n * probs) ** 2) / (n * probs)).sum()
    assert chi2 < 20.5  # 5 degrees of freedom, p = 0.001
    # the returned log-probabilities are those of the sampling distribution
    expected = dict(zip(top.indices.tolist(), torch.log_softmax(top.values, -1).tolist()))
    assert rollouts.logprobs[0, 0].item() == pytest.approx(expected[rollouts.tokens[0, 0].item()], abs=1e-5)


def test_same_seed_same_samples(tiny):
    model, layout = tiny
    engine = HFEngine(model, layout, batch_size=4)
    batch = prompts(layout, 4)
    first = engine.generate(batch, [(3, 4)] * 4, SamplingParams(max_tokens=30, seed=5))
    again = engine.generate(batch, [(3, 4)] * 4, SamplingParams(max_tokens=30, seed=5))
    other = engine.generate(batch, [(3, 4)] * 4, SamplingParams(max_tokens=30, seed=6))
    assert torch.equal(first.tokens, again.tokens)
    assert not torch.equal(first.tokens, other.tokens)


def test_the_compiled_layers_sample_what_the_eager_ones_do(tiny):
    """``compile=True`` (CUDA's default) calls every decoder layer through one compiled function: the same tokens
    and log-probabilities as the layers run as written, and two compilations (prefill slices, decode steps) serve
    both layers, two batch sizes, every prefill slice (the first one included: the cache exists before it) and
    every attention width, the last one (the whole cache but its spare slot) included."""
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    model, layout = tiny
    model = copy.deepcopy(model)  # compile fuses its projections in place (HFEngine's fuse follows compile)
    params = SamplingParams(max_tokens=30, seed=3, grid_constraint=False)
    compiled = HFEngine(model, layout, batch_size=4, attend_bucket=4, compile=True, prefill_tokens=4 * 7)  # sliced
    for n in (2, 3):  # 2 is also the model's KV-head count: the batch size must not be taken for it
        batch = prompts(layout, n)
        eager = HFEngine(model, layout, batch_size=n, attend_bucket=4).generate(batch, [(3, 4)] * n, params)
        fast = compiled.generate(batch, [(3, 4)] * n, params)
        assert int(eager.lengths.max()) == params.max_tokens  # every width up to the whole cache was used
        assert torch.equal(eager.tokens, fast.tokens)
        assert torch.allclose(eager.logprobs, fast.logprobs, atol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2
