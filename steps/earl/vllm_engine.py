"""The ``vllm`` rollout engine (``rl.engine`` / ``evaluate.engine``: vllm) for paper scale, on vLLM 0.33.

It answers :meth:`HFEngine.generate <earl.engine.HFEngine.generate>`'s interface (prompts + grid sizes +
sampling parameters + seeds in, :class:`~earl.engine.Rollouts` out) with vLLM's offline ``LLM``, through
vLLM's supported extension points only (the original patched vLLM's model registry file and pushed weights
through V0 internals, spec §F.1):

- **Model.** vLLM 0.33 has no native Emu3 text model (only ``Emu3ForConditionalGeneration``, through its
  Transformers backend). Emu3's decoder is Llama's (RMSNorm, rotary, grouped-query attention, SiLU MLP, the
  same weight names; the dropout is off at inference), so :func:`register` maps the ``Emu3ForCausalLM``
  architecture to vLLM's ``LlamaForCausalLM`` with ``ModelRegistry.register_model``.
- **Grid constraint.** :class:`GridLogitsProcessor`, a batch-level custom logits processor on the interface of
  vLLM 0.33's default Model Runner V2 (``vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor``; that
  runner refuses the older ``vllm.v1.sample.logits_processor`` interface). Each request carries its H, W,
  header and prompt state in ``SamplingParams.extra_args`` (:class:`~earl.engine.GridRequest`), and the rule
  is the built-in engine's (:class:`~earl.engine.GridSlots` over :class:`~earl.engine.GridRule`).
- **Weights.** :meth:`VLLMEngine.sync_weights` loads the policy's current parameters into the engine after an
  optimizer step with ``LLM.collective_rpc("reload_weights", ...)`` (the worker's in-place reload, which runs
  the model's own ``load_weights``), then drops the prefix cache, whose KV came from the old weights.
- **Process.** The engine runs in the calling process: in a torchrun worker (the rl step) with vLLM's
  ``external_launcher`` executor, which puts each rank's engine on its own GPU (``LOCAL_RANK``) beside that
  rank's policy; elsewhere (evaluate) with the single-process executor. In-process, the registration above
  and the processor class reach vLLM's worker without a plugin package, and the weight reload hands over the
  policy's tensors without serialising them.
- **Seeds and log-probs.** One request per sequence with ``SamplingParams(seed=...)``: Model Runner V2 draws
  each token from (seed, position), so a sequence's samples do not depend on its batch. Log-probs are vLLM's
  ``processed_logprobs``: of the distribution the token was drawn from, after the grid mask, temperature and
  top-k/top-p, as the built-in engine's. They are not the policy's log-probs that GRPO trains on: the loss
  recomputes those with the policy (``earl.grpo.token_logprobs``, softmax over the text or the visual
  vocabulary) and uses only the engine's tokens.

vLLM 0.33 pins torch 2.14 and transformers < 5.21 and ships CUDA wheels only, so this module is importable only
in the vllm environment (``envs/vllm.yaml``, ``containers/vllm``); ``earl.engine.check_engine`` refuses
``engine: vllm`` elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from vllm import LLM, ModelRegistry
from vllm import SamplingParams as VLLMSamplingParams
from vllm.inputs import TokensPrompt
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcessor, LogitsProcRequestState

from earl.engine import GRID_ARG, GridRequest, GridRule, GridSlots, Rollouts, SamplingParams, sequence_seeds
from earl.layout import Layout, SpecialIds

ARCHITECTURE = "Emu3ForCausalLM"  # what transformers writes in config.json for every model the pipeline trains
LLAMA = "vllm.model_executor.models.llama:LlamaForCausalLM"


def register() -> None:
    """Run ``Emu3ForCausalLM`` checkpoints with vLLM's Llama implementation (lazily imported by vLLM)."""
    ModelRegistry.register_model(ARCHITECTURE, LLAMA)


class GridLogitsProcessor(LogitsProcessor):
    """The grid constraint as a vLLM batch-level logits processor: a shell that maps Model Runner V2's calls
    onto :class:`~earl.engine.GridSlots`.

    vLLM builds processors from classes, so the layout's special ids are a class attribute, bound by
    :func:`grid_processor`. The token history comes from the runner's on-device ``all_token_ids``; the number
    of tokens each sequence has produced is known on the host (sequence length minus prompt length), so a
    step folds exactly the new tokens without waiting for the device.
    """

    ids: SpecialIds

    def __init__(self, vllm_config, req_states: LogitsProcRequestState):
        self.req_states = req_states
        self.slots = GridSlots(GridRule(self.ids, req_states.vocab_size, req_states.device), req_states.max_num_reqs)

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Refuse a malformed grid argument when the request is admitted, not in the sampler."""
        args = (sampling_params.extra_args or {}).get(GRID_ARG)
        if args is not None:
            GridRequest.from_args(args)

    def add_request(self, req_idx: int, sampling_params) -> bool:
        args = (sampling_params.extra_args or {}).get(GRID_ARG)
        return self.slots.add(req_idx, GridRequest.from_args(args) if args is not None else None)

    def apply_staged_writes(self) -> None:
        self.slots.flush()

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        # One logits row per request (no speculative decoding), in batch order.
        slots = ctx.idx_mapping_np
        prompt_lengths = self.req_states.prompt_len.np[slots].astype(np.int64)
        produced = ctx.seq_lens_upper_bound_np.astype(np.int64) - prompt_lengths
        self.slots.fold(slots, produced, self.req_states.all_token_ids.gpu, prompt_lengths)
        return self.slots.mask_(logits, slots)


def grid_processor(ids: SpecialIds) -> type[GridLogitsProcessor]:
    """:class:`GridLogitsProcessor` for one layout's special ids (a class: vLLM instantiates it in its worker)."""
    return type(GridLogitsProcessor.__name__, (GridLogitsProcessor,), {"ids": ids})


def _executor() -> str:
    """vLLM's executor, always in this process (see the module docstring).

    ``external_launcher`` switches vLLM's engine-core subprocess off by itself; the single-process executor
    needs ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which vLLM reads when the engine is built.
    """
    if "LOCAL_RANK" in os.environ:  # a torchrun worker
        return "external_launcher"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return "uni"


class VLLMEngine:
    """vLLM's ``LLM`` behind the rollout-engine interface.

    ``model_dir`` is read by vLLM (config and safetensors as the pipeline saved them); ``policy``, when given,
    is the module being trained, whose parameters :meth:`sync_weights` loads. ``max_model_len`` caps prompt +
    completion (``rl.model_context_size``; None: the model's own limit); ``gpu_memory_utilization`` is the
    share of the GPU vLLM may fill with weights and KV cache (the rest is the trainer's).
    """

    def __init__(self, model_dir: Path, layout: Layout, gpu_memory_utilization: float, max_model_len: int | None = None,
                 policy: torch.nn.Module | None = None):
        register()
        self.layout, self.ids, self.policy = layout, layout.ids, policy
        self.llm = LLM(
            model=str(model_dir),
            skip_tokenizer_init=True,  # token ids in, token ids out: the pipeline's Layout owns the text
            generation_config="vllm",  # stop only at the layout's EOS (stop_token_ids), as the built-in engine
            logits_processors=[grid_processor(layout.ids)],
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,  # the G samples of a prompt share its KV
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            distributed_executor_backend=_executor(),
        )

    @torch.no_grad()
    def sync_weights(self) -> None:
        """Make the next :meth:`generate` sample from the policy's current weights."""
        weights = [(name, parameter.detach()) for name, parameter in self.policy.named_parameters()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def generate(
        self, prompts: list[list[int]], grids: list[tuple[int, int]], params: SamplingParams, seeds: list[int] | None = None
    ) -> Rollouts:
        """Complete every prompt once, as :meth:`earl.engine.HFEngine.generate`."""
        requests = [
            VLLMSamplingParams(
                temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=seed,
                max_tokens=params.max_tokens, stop_token_ids=[self.ids.eos], logprobs=0, detokenize=False,
                extra_args={GRID_ARG: GridRequest.of(self.layout, prompt, grid).to_args()} if params.grid_constraint else None,
            )
            for prompt, grid, seed in zip(prompts, grids, sequence_seeds(params, len(prompts), seeds))
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], requests, use_tqdm=False)
        completions = [output.outputs[0] for output in outputs]
        return Rollouts.of(
            [list(c.token_ids) for c in completions],
            [[step[token].logprob for step, token in zip(c.logprobs, c.token_ids)] for c in completions],
            [c.finish_reason == "stop" for c in completions],
            self.ids.pad,
        )
