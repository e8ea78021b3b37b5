"""The vllm rollout engine (earl.vllm_engine) against the built-in one, on a small Emu3ForCausalLM saved the
way the pipeline saves its models.

Runs only where vLLM is importable (the vllm environment: envs/vllm.yaml, containers/vllm) and a GPU is
present; elsewhere pytest reports these tests as skipped. The parts of the engine that need no vLLM (the grid
rule on a pool of slots, the per-request arguments, the refusal outside the vllm environment) are tested in
test_engine.py, test_rl.py and test_evaluate.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")
if not torch.cuda.is_available():
    pytest.skip("vLLM's engine needs a GPU", allow_module_level=True)

from conftest import random_emu3  # noqa: E402
from vllm import ModelRegistry  # noqa: E402

from earl.engine import HFEngine, SamplingParams  # noqa: E402
from earl.layout import Layout  # noqa: E402
from earl.vllm_engine import ARCHITECTURE, VLLMEngine  # noqa: E402

GRIDS = [(3, 4), (2, 5), (4, 1), (1, 3)]


@pytest.fixture(scope="module")
def policy(tiny_tokenizer, tmp_path_factory):
    """A random model whose logits have wide margins (lm_head scaled up), so bf16 rounding in two different
    kernels cannot flip a greedy choice; saved in bf16 as the pipeline's models are."""
    layout = Layout(tiny_tokenizer, 16)
    model = random_emu3(layout, len(tiny_tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512).to(torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    path = tmp_path_factory.mktemp("vllm") / "model"
    model.save_pretrained(path)
    return model.cuda().eval(), layout, path


@pytest.fixture(scope="module")
def engine(policy):
    model, layout, path = policy
    return VLLMEngine(path, layout, gpu_memory_utilization=0.3, max_model_len=512, policy=model)


def prompts(layout, prefill: str) -> list[list[int]]:
    words = ["make the red circle blue", "remove the blue triangle", "add a green square at row 3, column 5"]
    rng = np.random.default_rng(1)
    return [layout.prompt(rng.integers(0, 16, g), words[i % 3], prefill) for i, g in enumerate(GRIDS)]


def test_emu3_checkpoints_run_as_vllm_llama(engine):
    assert ARCHITECTURE in ModelRegistry.get_supported_archs()


@pytest.mark.parametrize("prefill", ["<|image start|>", "<|image start|>{H}*{W}"])
def test_greedy_edits_equal_the_built_in_engine(policy, engine, prefill):
    model, layout, _ = policy
    batch = prompts(layout, prefill)
    params = SamplingParams(max_tokens=60, temperature=0.0)
    ours = engine.generate(batch, GRIDS, params)
    built_in = HFEngine(model, layout, batch_size=4).generate(batch, GRIDS, params)
    assert [ours.completion(i) for i in range(4)] == [built_in.completion(i) for i in range(4)]
    assert torch.equal(ours.finished, built_in.finished) and bool(ours.finished.all())


@pytest.mark.parametrize("prefill", ["<|image start|>", "<|image start|>{H}*{W}"])
def test_every_sample_is_a_well_formed_block_of_the_source_grid(policy, engine, prefill):
    _, layout, _ = policy
    batch = prompts(layout, prefill) * 4
    rollouts = engine.generate(batch, GRIDS * 4, SamplingParams(max_tokens=80, seed=3))
    for i, grid in enumerate(GRIDS * 4):
        sequence = batch[i] + rollouts.completion(i)
        assert rollouts.finished[i] and sequence[-3:] == [layout.ids.eof, layout.ids.eoi, layout.ids.eos]
        start = len(sequence) - 1 - sequence[::-1].index(layout.ids.boi)
        assert layout.parse_grid(sequence[start:]).shape == grid
        assert sequence[start + 1 : start + 4] == layout.text(f"{grid[0]}*{grid[1]}")  # header agrees with grid
        lengths = int(rollouts.lengths[i])
        assert torch.isfinite(rollouts.logprobs[i, :lengths]).all() and (rollouts.logprobs[i, :lengths] <= 0).all()


def test_seeds_decide_the_samples(policy, engine):
    _, layout, _ = policy
    batch = prompts(layout, "<|image start|>")
    params = SamplingParams(max_tokens=40, seed=5)
    first, again = engine.generate(batch, GRIDS, params), engine.generate(batch, GRIDS, params)
    other = engine.generate(batch, GRIDS, SamplingParams(max_tokens=40, seed=6))
    assert torch.equal(first.tokens, again.tokens)
    assert not torch.equal(first.tokens, other.tokens)


def test_logprobs_are_of_the_distribution_sampled_from(policy, engine):
    """Without the constraint, one token at T=1.5 within top-k 6: log-softmax of the model's tempered top-k logits."""
    model, layout, _ = policy
    prompt = prompts(layout, "")[0]
    params = SamplingParams(max_tokens=1, temperature=1.5, top_k=6, grid_constraint=False, seed=11)
    rollouts = engine.generate([prompt] * 8, [GRIDS[0]] * 8, params, seeds=list(range(8)))
    with torch.no_grad():
        logits = model(torch.tensor([prompt], device="cuda")).logits[0, -1].float() / 1.5
    top = torch.topk(logits, 6)
    expected = dict(zip(top.indices.tolist(), torch.log_softmax(top.values, -1).tolist()))
    for i in range(8):
        token = int(rollouts.tokens[i, 0])
        assert rollouts.logprobs[i, 0].item() == pytest.approx(expected[token], abs=0.05)  # bf16 logits


def test_synced_weights_are_the_policy_s(policy, engine):
    """After an optimizer-like change of the policy, sync_weights makes vLLM sample from the changed weights."""
    model, layout, _ = policy
    batch = prompts(layout, "<|image start|>")
    params = SamplingParams(max_tokens=60, temperature=0.0)
    before = engine.generate(batch, GRIDS, params)
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    try:
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * p.float().std().to(p.dtype))
        engine.sync_weights()
        changed = engine.generate(batch, GRIDS, params)
        expected = HFEngine(model, layout, batch_size=4).generate(batch, GRIDS, params)
        assert [changed.completion(i) for i in range(4)] == [expected.completion(i) for i in range(4)]
        assert [changed.completion(i) for i in range(4)] != [before.completion(i) for i in range(4)]
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(saved[name])
        engine.sync_weights()
