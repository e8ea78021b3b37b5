"""SFT training-step throughput and model-FLOPs utilisation (MFU) of an Emu3-8B-shaped model.

    python benchmarks/sft.py --device cuda                  # GPU: all default variants, 8 of Emu3-8B's 32 layers
    python benchmarks/sft.py --tiny                         # CPU smoke test (seconds): tiny model, same code paths
    python benchmarks/sft.py --variants hf_padded varlen_fusedce --layers 4 --batch 4 --steps 5 --out /tmp/sft

The model is transformers' ``Emu3ForCausalLM`` with ``Emu3TextConfig``'s defaults (Emu3-8B: hidden 4096, MLP
14336, 32 heads, 8 KV heads, vocabulary 184,622), random weights, bf16 parameters, with fewer layers than 32
(``--layers``) so that weights, gradients and AdamW states fit one GPU. Every variant times full training steps
(forward, backward, gradient clipping, fused AdamW step) on the same examples, warm-up steps excluded, with
``torch.cuda.synchronize`` around each timed region. The examples mimic the project's SFT data: lengths drawn
uniformly from ``[--min-len, --seq]`` (an edit without CoT at 256x256 is ~2,150 tokens: two 32x33-token image
blocks plus instruction; CoT text makes it longer; ``sft.max_length`` is 3,000), the loss on the target only.

Variants (``--variants``; each a preset name or ``key=value,...`` of the fields below):

* ``hf_padded``   (a) plain HF: right-padded batch ``[batch, seq]`` with ``attention_mask``,
  ``model(input_ids, attention_mask, labels)``, SDPA, HF gradient checkpointing on every layer.
* ``packed_sdpa`` (b) padding-free: the batch's examples concatenated into one row with ``position_ids``
  restarting per example; HF's SDPA path builds a block-diagonal causal mask from the position ids
  (``masking_utils.find_packed_sequence_indices``; checked below against per-example runs).
* ``packed_varlen`` (b') the same packed row through flash attention's variable-length kernel
  (``torch.nn.attention.varlen``), registered as a transformers attention function: no mask, no wasted
  cross-example attention.
* ``varlen_fusedce`` (c) + a chunked linear + cross-entropy (:class:`ChunkedLinearCrossEntropy`): hidden states
  from ``model.model(...)``, logits computed ``--ce-chunk`` tokens at a time with the gradients taken in the same
  pass, so the ``[tokens, 184622]`` logits (and their fp32 copies) are never materialised; the per-chunk
  softmax/gradient arithmetic is one torch.compile'd function. ``varlen_fusedce_eager``: the same in eager fp32
  in-place passes.
* ``varlen_fusedce_half`` (d) + selective checkpointing: only every other layer is checkpointed.
* ``varlen_fusedce_nockpt`` (d) + no checkpointing (fits only because the model has few layers).
* ``varlen_fusedce_compile`` (d) + ``torch.compile`` of each layer's attention, MLP and norms (checkpointing on);
  ``..._compile_half``: and every other layer checkpointed; ``..._compile_nockpt``: whole layers compiled, no
  checkpointing. ``..._pad``: the same with the LM head's rows padded to a multiple of 64 inside the chunked loss
  (aligned rows of logits for cuBLAS).

Fields: ``layout`` padded|packed, ``attn`` sdpa|varlen, ``loss`` hf|fused|fused_eager, ``ckpt`` full|half|none,
``compile`` 0 (none) | 1 (attention, MLP, norms) | 2 (whole decoder layers), ``pad`` 0 | rows (LM head, fused loss).

FLOPs (the MFU numerator, per optimizer step, real tokens only: padding and checkpoint recomputation are not
counted): ``6 * N * tokens + attention``, where ``N`` = parameters of the decoder layers and the final norm plus
the LM-head matrix (``hidden x vocab``; the embedding lookup is no matmul and is excluded), and attention (QK^T
and PV, forward + backward = 3x forward) for an example of length ``L`` is ``6 * layers * hidden * L^2`` per
example -- the usual ``12 * layers * hidden * L`` per token, halved for the causal mask. MFU is against the H100
SXM dense bf16 peak, 989 TFLOP/s (``--peak``). ``--extrapolate K`` also times ``--extrapolate-variants`` with ``K`` layers
and extrapolates their step times linearly in the layer count to 32 layers (the full model's compute on one GPU;
memory, ZeRO sharding and communication aside).

Before timing it checks (and records) the chunked loss against autograd (float64), the compiled chunk path
against the eager one, the varlen kernel against per-example SDPA, packed rows against examples run separately,
the block-diagonal mask HF builds from packed position ids, and cuBLAS's rate for the layer and LM-head matmuls.

The script imports only torch and transformers. Results: a table on stdout and JSON (``--out DIR``).
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py shadows the standard library's `tokenize` while this folder is first on sys.path.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

import argparse  # noqa: E402
import gc
import inspect
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

H100_BF16_DENSE = 989.4e12
ATTN_NAME = "earl_varlen"

PRESETS = {
    "hf_padded": dict(layout="padded", attn="sdpa", loss="hf", ckpt="full", compile=0),
    "packed_sdpa": dict(layout="packed", attn="sdpa", loss="hf", ckpt="full", compile=0),
    "packed_varlen": dict(layout="packed", attn="varlen", loss="hf", ckpt="full", compile=0),
    "varlen_fusedce_eager": dict(layout="packed", attn="varlen", loss="fused_eager", ckpt="full", compile=0),
    "varlen_fusedce": dict(layout="packed", attn="varlen", loss="fused", ckpt="full", compile=0),
    "varlen_fusedce_half": dict(layout="packed", attn="varlen", loss="fused", ckpt="half", compile=0),
    "varlen_fusedce_nockpt": dict(layout="packed", attn="varlen", loss="fused", ckpt="none", compile=0),
    "varlen_fusedce_compile": dict(layout="packed", attn="varlen", loss="fused", ckpt="full", compile=1),
    "varlen_fusedce_compile_half": dict(layout="packed", attn="varlen", loss="fused", ckpt="half", compile=1),
    "varlen_fusedce_compile_nockpt": dict(layout="packed", attn="varlen", loss="fused", ckpt="none", compile=2),
}
for _spec in PRESETS.values():  # LM-head rows padded to a multiple of ``pad`` in the chunked loss; 0: none
    _spec["pad"] = 0
PRESETS |= {f"{name}_pad": {**spec, "pad": 64} for name, spec in PRESETS.items() if name.startswith("varlen_fusedce_compile")}
DEFAULT_VARIANTS = list(PRESETS)


def parse_variant(text: str) -> tuple[str, dict]:
    if text in PRESETS:
        return text, dict(PRESETS[text])
    spec = dict(PRESETS["hf_padded"])
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in spec:
            raise SystemExit(f"unknown variant {text!r}: presets {list(PRESETS)} or key=value of {list(spec)}")
        spec[key] = int(value) if key in ("compile", "pad") else value
    return text, spec


# ------------------------------------------------------------------------------------ variable-length attention

_VARLEN = None  # (function, causal kwargs, native GQA) once probed


def _varlen_fn():
    global _VARLEN
    if _VARLEN is None:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            _VARLEN = (None, {}, False)
            return _VARLEN
        params = inspect.signature(varlen_attn).parameters
        causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
        gqa = {"enable_gqa": True} if "enable_gqa" in params else {}
        _VARLEN = (varlen_attn, {**causal, **gqa}, bool(gqa))
    return _VARLEN


VARLEN_STATS = {"calls": 0, "cu_from_kwargs": 0, "cu_from_position_ids": 0, "kernel": None}
REPEAT_KV = {"on": None}  # None: try native GQA first (decided by the attention check)
USE_KERNEL = {"on": True}  # False when the kernel check failed: per-example SDPA (flash, is_causal) instead


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative example boundaries of one packed row (positions restart at 0 per example)."""
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == 0).flatten()
    cu = torch.cat([starts, torch.tensor([pos.numel()], device=pos.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: causal attention within each packed example, none across.

    query [1, Hq, T, D], key/value [1, Hkv, T, D] -> ([1, T, Hq, D], None). On CUDA it calls flash attention's
    variable-length kernel; elsewhere (the CPU smoke test) a per-example SDPA loop with the same semantics.
    """
    counting = not torch.compiler.is_compiling()  # counters would make dynamo recompile on every call
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if counting:
        VARLEN_STATS["calls"] += 1
        VARLEN_STATS["cu_from_kwargs" if cu is not None else "cu_from_position_ids"] += 1
    if cu is None:
        cu, max_len = cu_seqlens_from_position_ids(kwargs["position_ids"])
    b, hq, t, d = query.shape
    assert b == 1, "packed layout: one row"
    q = query[0].transpose(0, 1)  # [T, Hq, D]
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    fn, extra, native_gqa = _varlen_fn()
    if query.is_cuda and fn is not None and USE_KERNEL["on"]:
        dtype = q.dtype
        if dtype not in (torch.float16, torch.bfloat16):  # flash kernels take half precision only (the fp32 check)
            q, k, v = q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)
        hkv = k.shape[1]
        if hkv != hq and (REPEAT_KV["on"] or (REPEAT_KV["on"] is None and not native_gqa)):
            k = k.repeat_interleave(hq // hkv, dim=1)
            v = v.repeat_interleave(hq // hkv, dim=1)
            extra = {key_: val for key_, val in extra.items() if key_ != "enable_gqa"}
        if counting:
            VARLEN_STATS["kernel"] = "torch.nn.attention.varlen.varlen_attn"
        out = fn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_len, max_len, scale=scaling, **extra)
        out = out.to(dtype)
    else:
        if counting:
            VARLEN_STATS["kernel"] = "per-example SDPA loop (is_causal; no varlen kernel)"
        bounds = cu.tolist()
        outs = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            outs.append(
                F.scaled_dot_product_attention(
                    query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True, scale=scaling,
                    enable_gqa=key.shape[1] != hq,
                )
            )
        out = torch.cat(outs, dim=2)[0].transpose(0, 1)
    return out.unsqueeze(0), None


def register_varlen() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, varlen_attention)
    try:
        from transformers.masking_utils import AttentionMaskInterface

        AttentionMaskInterface.register(ATTN_NAME, lambda *args, **kwargs: None)
    except ImportError:  # older transformers: no mask interface to satisfy
        pass


def set_attention(model, name: str) -> None:
    configs = {id(model.config): model.config}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None:
            configs[id(config)] = config
    for config in configs.values():
        try:
            config._attn_implementation = name
        except Exception:  # noqa: BLE001  (a transformers version whose setter validates the name)
            config.__dict__["_attn_implementation_internal"] = name
        assert config._attn_implementation == name


# ----------------------------------------------------------------------------- chunked linear + cross-entropy


def _ce_chunk_math(logits, safe, m, count, vocab=None):
    """Loss sum and d(mean loss)/d(logits) of one chunk: one fused kernel pair under torch.compile. Columns from
    ``vocab`` on are padding (:class:`ChunkedLinearCrossEntropy`'s ``pad_to``): no probability, zero gradient."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if vocab is not None and vocab < x.shape[1]:
        x = x.masked_fill(torch.arange(x.shape[1], device=x.device)[None, :] >= vocab, float("-inf"))
    lse = torch.logsumexp(x, dim=-1)
    loss = ((lse - x.gather(1, safe[:, None]).squeeze(1)) * m).sum()
    hit = torch.arange(x.shape[1], device=x.device)[None, :] == safe[:, None]
    g = (torch.exp(x - lse[:, None]) - hit.to(x.dtype)) * (m.to(x.dtype) / count)[:, None]
    return loss, g.to(logits.dtype)


_CE_COMPILED = {}


def _ce_math(compiled: bool):
    if not compiled:
        return None
    if "fn" not in _CE_COMPILED:
        _CE_COMPILED["fn"] = torch.compile(_ce_chunk_math, dynamic=False)
    return _CE_COMPILED["fn"]


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of ``hidden @ weight.T`` against ``targets`` (-100 ignored), ``chunk`` rows at a time.

    The gradients are computed in the forward pass, chunk by chunk (softmax - one-hot, then two matmuls), so the
    full ``[tokens, vocab]`` logits never exist and nothing is recomputed: 3 matmuls per chunk, as in plain
    autograd. Logits come out of the matmul in the input dtype and are upcast per chunk, as HF's loss does.
    ``compiled``: the per-chunk softmax/gradient arithmetic as one torch.compile'd function (a few passes over
    bf16 logits) instead of eager in-place fp32 passes; the weight gradient accumulates in the weight's dtype
    through ``addmm_`` (eager: an fp32 buffer).
    ``pad_to``: the weight gets zero rows up to a multiple of this many (Emu3's 184,622 → 184,640 for 64), whose
    logits are masked out. With 184,622 columns the rows of the logits and of their gradient are not 16-byte
    aligned, and cuBLAS runs all three LM-head matmuls with its slow unaligned kernels.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, compiled=False, pad_to=0):
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 for bf16 inputs (float64 in the check)
        math_fn = _ce_math(compiled and hidden.is_cuda)
        vocab = weight.shape[0]
        width = -(-vocab // pad_to) * pad_to if pad_to else vocab
        rows = F.pad(weight, (0, 0, 0, width - vocab)) if width != vocab else weight  # [width, hidden]
        valid = targets != -100
        count = valid.sum().clamp(min=1).to(acc)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        gw_dtype = weight.dtype if math_fn is not None else acc
        grad_weight = torch.zeros(rows.shape, dtype=gw_dtype, device=weight.device) if weight.requires_grad else None
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h, t, m = hidden[s : s + chunk], targets[s : s + chunk], valid[s : s + chunk]
            safe = t.clamp(min=0)
            if math_fn is not None:
                part, g = math_fn(h @ rows.t(), safe, m, count, vocab)
                loss += part
            else:
                logits = (h @ rows.t()).to(acc)  # [c, width]
                logits[:, vocab:] = float("-inf")
                lse = torch.logsumexp(logits, dim=-1)
                loss += ((lse - logits.gather(1, safe[:, None]).squeeze(1)) * m).sum()
                if grad_hidden is None and grad_weight is None:
                    continue
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                g.scatter_add_(1, safe[:, None], torch.full_like(safe[:, None], -1, dtype=g.dtype))
                g.mul_((m.to(g.dtype) / count)[:, None])
                g = g.to(hidden.dtype)
                del logits
            if grad_hidden is not None:
                torch.mm(g, rows, out=grad_hidden[s : s + chunk])
            if grad_weight is not None:
                if grad_weight.dtype == g.dtype:
                    grad_weight.addmm_(g.t(), h)
                else:
                    grad_weight += (g.t() @ h).to(acc)
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight[:vocab])
        ctx.weight_dtype = weight.dtype
        return loss / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_out.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * grad_out).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None, None


# ------------------------------------------------------------------------------------------------ data


def make_examples(args, vocab: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels) per example; labels -100 on the prompt (source image + instruction)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(args.batch):
        n = int(torch.randint(args.min_len, args.seq + 1, (1,), generator=g))
        ids = torch.randint(0, vocab, (n,), generator=g)
        labels = ids.clone()
        labels[: min(args.prompt_len, n - 1)] = -100
        out.append((ids, labels))
    return out


def padded_batch(examples, seq: int, pad_id: int, device):
    b = len(examples)
    ids = torch.full((b, seq), pad_id, dtype=torch.long)
    labels = torch.full((b, seq), -100, dtype=torch.long)
    mask = torch.zeros((b, seq), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = x, y, 1
    return dict(input_ids=ids.to(device), labels=labels.to(device), attention_mask=mask.to(device))


def packed_batch(examples, device):
    ids = torch.cat([x for x, _ in examples])[None]
    labels = torch.cat([y for _, y in examples])[None].clone()
    pos = torch.cat([torch.arange(len(x)) for x, _ in examples])[None]
    lengths = torch.tensor([len(x) for x, _ in examples])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    # HF shifts labels by one: the first token of each example must not be the target of the previous one.
    labels[0, starts] = -100
    # The fused loss takes already-shifted targets: target[t] = labels[t + 1] within the row.
    targets = torch.cat([labels[0, 1:], torch.tensor([-100])])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
    return dict(
        input_ids=ids.to(device), labels=labels.to(device), position_ids=pos.to(device), targets=targets.to(device),
        cu_seq_lens=cu.to(device), max_len=int(lengths.max()),
    )


# ---------------------------------------------------------------------------------------------- model


def build_model(args, layers: int, device):
    from transformers import Emu3ForCausalLM, Emu3TextConfig

    if args.tiny:
        shape = dict(vocab_size=1000, hidden_size=64, intermediate_size=176, num_attention_heads=4,
                     num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    else:
        shape = {}
    config = Emu3TextConfig(
        **shape, num_hidden_layers=layers, max_position_embeddings=max(args.seq, 9216),
        attention_dropout=0.0, use_cache=False, tie_word_embeddings=False,
    )  # rope theta: Emu3TextConfig's default, 1e6
    config._attn_implementation = "sdpa"
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Emu3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.to(device=device, dtype=dtype)
    model.train()
    return model


def param_counts(model) -> dict:
    layers = sum(p.numel() for p in model.model.layers.parameters())
    norm = sum(p.numel() for p in model.model.norm.parameters())
    head = model.lm_head.weight.numel()
    embed = model.model.embed_tokens.weight.numel()
    return dict(layers=layers, final_norm=norm, lm_head=head, embedding=embed, N=layers + norm + head,
                total=sum(p.numel() for p in model.parameters()))


def step_flops(n_params: int, lengths: list[int], layers: int, hidden: int) -> dict:
    tokens = sum(lengths)
    dense = 6 * n_params * tokens
    attention = sum(6 * layers * hidden * L * L for L in lengths)  # causal: half of 12 * layers * hidden * L per token
    return dict(dense=dense, attention=attention, total=dense + attention)


def configure(model, spec: dict) -> None:
    set_attention(model, ATTN_NAME if spec["attn"] == "varlen" else "sdpa")
    if spec["ckpt"] == "none":
        model.activation_checkpointing_disable()
    else:
        model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=2 if spec["ckpt"] == "half" else 1)
    if spec["compile"]:
        torch._dynamo.config.recompile_limit = max(64, getattr(torch._dynamo.config, "recompile_limit", 8))
        for layer in model.model.layers:
            if spec["compile"] == 2:  # the whole decoder layer (residual adds fuse with the norms)
                layer.compile()
                continue
            for name in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
                getattr(layer, name).compile()


COMPILED_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")


def uncompile(model) -> None:
    for layer in model.model.layers:
        for module in [layer, *(getattr(layer, name) for name in COMPILED_PARTS)]:
            if getattr(module, "_compiled_call_impl", None) is not None:
                module._compiled_call_impl = None


def loss_of(model, spec: dict, batch: dict, chunk: int):
    if spec["layout"] == "padded":
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                     use_cache=False).loss
    extra = {}
    if spec["attn"] == "varlen":
        extra = dict(cu_seq_lens_q=batch["cu_seq_lens"], cu_seq_lens_k=batch["cu_seq_lens"],
                     max_length_q=batch["max_len"], max_length_k=batch["max_len"])
    if spec["loss"] == "hf":
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                     use_cache=False, **extra).loss
    hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                         **extra).last_hidden_state
    return ChunkedLinearCrossEntropy.apply(hidden[0], model.lm_head.weight, batch["targets"], chunk,
                                           spec["loss"] == "fused", spec["pad"])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------- checks


def check_fused_ce() -> dict:
    """Chunked loss and gradients against autograd of the plain formula, float64 on the CPU."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(37, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (37,), generator=g)
    t[::5] = -100
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=-100)
    gh_ref, gw_ref = torch.autograd.grad(ref * 1.7, (h, w))
    rel = lambda a, b: float((a - b).detach().norm() / b.detach().norm())  # noqa: E731
    res = {}
    for pad_to in (0, 16):  # 50 rows, padded to 64
        out = ChunkedLinearCrossEntropy.apply(h, w, t, 8, False, pad_to)
        gh, gw = torch.autograd.grad(out * 1.7, (h, w))
        res[f"pad{pad_to}"] = dict(loss=rel(out, ref), grad_hidden=rel(gh, gh_ref), grad_weight=rel(gw, gw_ref))
    res["ok"] = max(v for part in res.values() for v in part.values()) < 1e-10
    logits = (h @ w.t()).detach().requires_grad_()
    ref_sum = F.cross_entropy(logits, t, ignore_index=-100, reduction="sum")
    (ref_g,) = torch.autograd.grad(F.cross_entropy(logits, t, ignore_index=-100), logits)
    part, g = _ce_chunk_math(logits.detach(), t.clamp(min=0), t != -100, (t != -100).sum().to(h.dtype))
    res["chunk_math"] = dict(loss=rel(part, ref_sum), grad_logits=rel(g, ref_g))
    res["ok"] = res["ok"] and max(res["chunk_math"].values()) < 1e-10
    return res


def check_fused_ce_compiled(device) -> dict:
    """The compiled (bf16, CUDA) chunk path against the eager fp32 one, on random data."""
    if device.type != "cuda":
        return dict(skipped="no CUDA")
    g = torch.Generator(device=device).manual_seed(4)
    h = torch.randn(700, 256, device=device, generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(5003, 256, device=device, generator=g) * 0.05).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, 5003, (700,), device=device, generator=g)
    t[::7] = -100
    out = {}
    for compiled, pad_to in ((False, 0), (True, 0), (True, 64)):  # 5,003 rows: padded to 5,056
        loss = ChunkedLinearCrossEntropy.apply(h, w, t, 256, compiled, pad_to)
        out[compiled, pad_to] = (loss, *torch.autograd.grad(loss, (h, w)))
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
    res = {f"pad{pad_to}": dict(zip(["loss", "grad_hidden", "grad_weight"], [rel(a, b) for a, b in zip(out[True, pad_to], out[False, 0])]))
           for pad_to in (0, 64)}
    res["ok"] = max(v for part in res.values() for v in part.values()) < 2e-2
    return res


def gemm_probe(args, device) -> dict:
    """bf16 TFLOP/s of the forward matmuls of one layer and the LM head at this step's token count (cuBLAS)."""
    if device.type != "cuda" or args.tiny:
        return dict(skipped="CUDA, full size only")
    m = args.batch * (args.min_len + args.seq) // 2
    shapes = dict(q_o=(4096, 4096), k_v=(4096, 1024), gate_up=(4096, 14336), down=(14336, 4096), lm_head=(4096, 184622),
                  lm_head_pad64=(4096, 184640))
    weight = dict(q_o=2, k_v=2, gate_up=2, down=1, lm_head=0, lm_head_pad64=0)  # per layer
    res, flops_layer, time_layer = dict(tokens=m), 0.0, 0.0
    for name, (k, n) in shapes.items():
        a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, k, device=device, dtype=torch.bfloat16).t()  # as nn.Linear and the chunked loss: x @ W.T
        for _ in range(3):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        torch.cuda.synchronize(device)
        t = start.elapsed_time(end) / 10 / 1e3
        res[name] = round(2 * m * k * n / t / 1e12, 1)
        flops_layer += weight[name] * 2 * m * k * n
        time_layer += weight[name] * t
        del a, b
    res["layer_weighted"] = round(flops_layer / time_layer / 1e12, 1)
    free(device)
    return res


def check_varlen_kernel(device) -> dict:
    """varlen attention (output and input gradients) against per-example SDPA in fp32, on random data."""
    if device.type != "cuda":
        return dict(skipped="no CUDA")
    fn, extra, native = _varlen_fn()
    if fn is None:
        return dict(ok=False, error="torch.nn.attention.varlen not available")
    lengths = [300, 1, 517, 128]
    hq, hkv, d = 8, 2, 128
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    g = torch.Generator(device=device).manual_seed(2)
    T = sum(lengths)
    q = torch.randn(1, hq, T, d, device=device, generator=g, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, hkv, T, d, device=device, generator=g, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, hkv, T, d, device=device, generator=g, dtype=torch.bfloat16, requires_grad=True)
    go = torch.randn(1, T, hq, d, device=device, generator=g, dtype=torch.bfloat16)
    refs = []
    bounds = cu.tolist()
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    for s, e in zip(bounds[:-1], bounds[1:]):
        refs.append(F.scaled_dot_product_attention(qf[:, :, s:e], kf[:, :, s:e], vf[:, :, s:e], is_causal=True,
                                                   enable_gqa=True))
    ref = torch.cat(refs, 2).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref, (qf, kf, vf), go.float())
    result = dict(native_gqa_api=native)
    for repeat in ([False, True] if REPEAT_KV["on"] is None else [REPEAT_KV["on"]]):
        REPEAT_KV["on"] = repeat
        try:
            out, _ = varlen_attention(None, q, k, v, None, scaling=d ** -0.5, cu_seq_lens_q=cu, max_length_q=max(lengths))
            grads = torch.autograd.grad(out, (q, k, v), go)
            errs = [float((out.float() - ref).norm() / ref.norm())]
            errs += [float((a.float() - b).norm() / b.norm()) for a, b in zip(grads, ref_grads)]
            ok = all(math.isfinite(x) and x < 2e-2 for x in errs)
            result[f"repeat_kv={repeat}"] = dict(rel_err_out_dq_dk_dv=errs, ok=ok)
        except Exception as error:  # noqa: BLE001
            ok = False
            result[f"repeat_kv={repeat}"] = dict(error=f"{type(error).__name__}: {str(error)[:300]}")
        if ok:
            result["ok"], result["repeat_kv"] = True, repeat
            return result
    REPEAT_KV["on"] = True
    USE_KERNEL["on"] = False
    result["ok"] = False
    result["fallback"] = "per-example SDPA loop"
    return result


def check_packing(args, device) -> dict:
    """A small Emu3 model: packed rows (HF SDPA path and varlen) must give each example's own logits.

    Also records what HF's SDPA path passes to ``scaled_dot_product_attention`` for the packed row (mask shape,
    whether it is block-diagonal-causal or ``is_causal`` across the whole row).
    """
    from transformers import Emu3ForCausalLM, Emu3TextConfig
    import transformers.integrations.sdpa_attention as sdpa_mod

    config = Emu3TextConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2, attention_dropout=0.0, use_cache=False, max_position_embeddings=512)
    config._attn_implementation = "sdpa"
    torch.manual_seed(3)
    model = Emu3ForCausalLM(config).to(device=device, dtype=torch.float32).eval()
    lengths = [23, 7, 41]
    exs = [(torch.randint(3, 300, (n,)), torch.randint(3, 300, (n,))) for n in lengths]
    batch = packed_batch(exs, device)
    seen = []
    original = sdpa_mod.torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, *a, **kw):
        seen.append(dict(mask=None if attn_mask is None else attn_mask.detach().clone(), is_causal=kw.get("is_causal")))
        return original(q, k, v, attn_mask, *a, **kw)

    res = {}
    with torch.no_grad():
        separate = torch.cat([model(input_ids=x[None].to(device)).logits[0] for x, _ in exs])
        sdpa_mod.torch.nn.functional.scaled_dot_product_attention = spy
        try:
            packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        finally:
            sdpa_mod.torch.nn.functional.scaled_dot_product_attention = original
        res["sdpa_packed_max_abs_diff"] = float((packed - separate).abs().max())
        T = sum(lengths)
        doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)
        want = (doc[:, None] == doc[None, :]) & torch.ones(T, T, dtype=torch.bool, device=device).tril()
        if seen and seen[0]["mask"] is not None:
            m = seen[0]["mask"]
            mb = m if m.dtype == torch.bool else m > -1
            res["sdpa_mask"] = dict(shape=list(m.shape), dtype=str(m.dtype),
                                    block_diagonal_causal=bool((mb[0, 0] == want).all()))
        else:
            res["sdpa_mask"] = dict(shape=None, is_causal=seen[0]["is_causal"] if seen else None,
                                    block_diagonal_causal=False)
        set_attention(model, ATTN_NAME)
        try:
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                        cu_seq_lens_q=batch["cu_seq_lens"], cu_seq_lens_k=batch["cu_seq_lens"],
                        max_length_q=batch["max_len"], max_length_k=batch["max_len"]).logits[0]
            res["varlen_packed_max_abs_diff"] = float((out - separate).abs().max())
            # derived from position_ids alone (no cu_seq_lens kwargs)
            out2 = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
            res["varlen_from_position_ids_max_abs_diff"] = float((out2 - separate).abs().max())
        except Exception as error:  # noqa: BLE001
            res["varlen_error"] = f"{type(error).__name__}: {str(error)[:300]}"
    scale = float(separate.abs().max())
    res["logits_scale"] = scale
    # fp32 model; on CUDA the varlen kernel computes attention in bf16, hence its looser tolerance
    res["sdpa_packed_ok"] = res["sdpa_packed_max_abs_diff"] < 1e-3 * max(1.0, scale)
    tol = (1e-3 if device.type == "cpu" else 3e-2) * max(1.0, scale)
    res["varlen_packed_ok"] = max(res.get("varlen_packed_max_abs_diff", math.inf),
                                  res.get("varlen_from_position_ids_max_abs_diff", math.inf)) < tol
    del model
    return res


# ---------------------------------------------------------------------------------------------- timing


def run_variant(model, name, spec, examples, args, device, layers, flops, counts) -> dict:
    rec = dict(variant=name, **spec, layers=layers)
    configure(model, spec)
    if spec["layout"] == "padded":
        batch = padded_batch(examples, args.seq, model.config.pad_token_id, device)
    else:
        batch = packed_batch(examples, device)
    rec["positions_computed"] = int(batch["input_ids"].numel())
    rec["examples"] = len(examples)
    flops = step_flops(counts["N"], [len(x) for x, _ in examples], layers, model.config.hidden_size)
    if spec["attn"] == "varlen" and device.type == "cuda" and REPEAT_KV["on"] is None:
        REPEAT_KV["on"] = True  # the kernel check did not run: be safe
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1, fused=fused)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fb, op, losses = [], [], []
    t_start = time.perf_counter()
    for step in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        loss = loss_of(model, spec, batch, args.ce_chunk)
        loss.backward()
        sync(device)
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 5.0, foreach=fused)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        t2 = time.perf_counter()
        losses.append(float(loss.detach()))
        if step == args.warmup - 1 or (args.warmup == 0 and step == 0):
            rec["warmup_s"] = time.perf_counter() - t_start
        if step >= args.warmup:
            fb.append(t1 - t0)
            op.append(t2 - t1)
    steps = [a + b for a, b in zip(fb, op)]
    step_s = statistics.median(steps)
    tokens = sum(len(x) for x, _ in examples)
    rec.update(
        tokens=tokens, step_s=step_s, step_s_all=steps, fwd_bwd_s=statistics.median(fb), optim_s=statistics.median(op),
        tokens_per_s=tokens / step_s, tflops=flops["total"] / step_s / 1e12, mfu=flops["total"] / step_s / args.peak,
        loss_first=losses[0], loss_last=losses[-1], flops=flops,
    )
    # Gradient accumulation over 8 micro-batches (the paper's setting): the optimizer runs once per 8 fwd+bwd.
    acc = 8
    t_acc = acc * rec["fwd_bwd_s"] + rec["optim_s"]
    rec["tokens_per_s_accum8"] = acc * tokens / t_acc
    rec["mfu_accum8"] = acc * flops["total"] / t_acc / args.peak
    if device.type == "cuda":
        rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del opt, loss, batch
    for p in params:
        p.grad = None
    if spec["compile"]:
        uncompile(model)
    free(device)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (Emu3-8B has 32)")
    ap.add_argument("--seq", type=int, default=3000, help="max example length = padded row length")
    ap.add_argument("--min-len", type=int, default=2150, help="shortest example")
    ap.add_argument("--prompt-len", type=int, default=1090, help="tokens without loss (source image + instruction)")
    ap.add_argument("--batch", type=int, default=4, help="examples per micro-batch (paper: 4 per GPU)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--variants", nargs="+", default=None,
                    help=f"default: {' '.join(DEFAULT_VARIANTS)} (without the compile one under --tiny)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--lr", type=float, default=0.0,
                    help="0 keeps the weights identical across variants (so their losses must agree); the fused "
                         "AdamW kernel does the same work at any lr")
    ap.add_argument("--ce-chunk", type=int, default=8192, help="tokens per chunk of the fused linear+CE")
    ap.add_argument("--peak", type=float, default=H100_BF16_DENSE, help="peak FLOP/s for MFU")
    ap.add_argument("--extrapolate", type=int, default=0, help="also time --extrapolate-variants with this many layers")
    ap.add_argument("--extrapolate-variants", nargs="+", default=["varlen_fusedce"])
    ap.add_argument("--time-budget", type=float, default=1e9, help="skip variants that would start after this many s")
    ap.add_argument("--out", default=None, help="directory for sft_results.json")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, seconds")
    args = ap.parse_args()
    if args.tiny:
        args.seq, args.min_len, args.prompt_len, args.batch = 64, 40, 20, 3
        args.steps, args.warmup, args.ce_chunk = min(args.steps, 2), min(args.warmup, 1), 50
        if args.layers == 8:
            args.layers = 2
        if args.device == "cuda" and not torch.cuda.is_available():
            args.device = "cpu"
    device = torch.device(args.device)
    if args.variants is None:
        args.variants = [v for v in DEFAULT_VARIANTS if not (args.tiny and PRESETS[v]["compile"])]
    variants = [parse_variant(v) for v in args.variants]
    t_begin = time.perf_counter()

    import transformers

    register_varlen()
    env = dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
               device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu")
    result = dict(env=env, args=vars(args), variants=[])
    out_dir = Path(args.out) if args.out else None

    def save():
        if out_dir:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "sft_results.json").write_text(json.dumps(result, indent=1))

    print(json.dumps(env), flush=True)
    result["checks"] = dict(fused_ce=check_fused_ce(), varlen_kernel=check_varlen_kernel(device))
    try:
        result["checks"]["gemm_tflops"] = gemm_probe(args, device)
    except Exception as error:  # noqa: BLE001
        result["checks"]["gemm_tflops"] = dict(error=f"{type(error).__name__}: {str(error)[:200]}")
    try:
        result["checks"]["fused_ce_compiled"] = check_fused_ce_compiled(device)
    except Exception as error:  # noqa: BLE001
        result["checks"]["fused_ce_compiled"] = dict(ok=False, error=f"{type(error).__name__}: {str(error)[:400]}")
    try:
        result["checks"]["packing"] = check_packing(args, device)
    except Exception as error:  # noqa: BLE001
        result["checks"]["packing"] = dict(error=f"{type(error).__name__}: {str(error)[:400]}")
    print("checks:", json.dumps(result["checks"]), flush=True)
    save()

    def run_all(layers, todo):
        model = build_model(args, layers, device)
        counts = param_counts(model)
        examples = make_examples(args, model.config.vocab_size)
        lengths = [len(x) for x, _ in examples]
        flops = step_flops(counts["N"], lengths, layers, model.config.hidden_size)
        meta = dict(layers=layers, hidden=model.config.hidden_size, vocab=model.config.vocab_size, params=counts,
                    lengths=lengths, flops_per_step=flops)
        result.setdefault("models", []).append(meta)
        print(json.dumps(meta), flush=True)
        recs = []
        for name, spec in todo:
            if time.perf_counter() - t_begin > args.time_budget:
                rec = dict(variant=name, layers=layers, skipped="time budget")
            else:
                rec, subset, notes = None, examples, []
                while rec is None:
                    error_text, oom = None, False
                    try:
                        rec = run_variant(model, name, spec, subset, args, device, layers, flops, counts)
                    except Exception as error:  # noqa: BLE001
                        oom = isinstance(error, torch.OutOfMemoryError)
                        first = (str(error).splitlines() or [""])[0][:300]
                        error_text = f"{'OOM' if oom else type(error).__name__} with {len(subset)} examples: {first}"
                    if error_text is None:
                        break
                    # out of the except block: the failed step's tensors are unreachable now, so this frees them
                    for p in model.parameters():
                        p.grad = None
                    uncompile(model)
                    free(device)
                    notes.append(error_text)
                    if oom and len(subset) > 1 and len(notes) == 1:  # retry once with half the micro-batch
                        subset = subset[: len(subset) // 2]
                    else:
                        rec = dict(variant=name, layers=layers, error="; ".join(notes))
                if notes and "error" not in rec:
                    rec["note"] = "; ".join(notes)
            rec["varlen_stats"] = dict(VARLEN_STATS)
            recs.append(rec)
            result["variants"].append(rec)
            save()
            print(json.dumps({k: v for k, v in rec.items() if k != "step_s_all"}), flush=True)
        del model
        free(device)
        return recs, meta

    extrapolating = bool(args.extrapolate) and args.extrapolate != args.layers
    if extrapolating:  # first: cheap, and not squeezed out by compile time
        small_recs, _ = run_all(args.extrapolate, [parse_variant(v) for v in args.extrapolate_variants])
    main_recs, main_meta = run_all(args.layers, variants)
    result["extrapolated_32_layers"] = []
    for small in small_recs if extrapolating else []:
        name = small["variant"]
        big = next((r for r in main_recs if r["variant"] == name and "step_s" in r), None)
        if not big or "step_s" not in small or small["examples"] != args.batch or big["examples"] != args.batch:
            continue
        dl = args.layers - args.extrapolate
        lin = lambda key: small[key] + (big[key] - small[key]) / dl * (32 - args.extrapolate)  # noqa: E731
        t32, fb32, op32 = lin("step_s"), lin("fwd_bwd_s"), lin("optim_s")
        n32 = main_meta["params"]["N"] + (32 - args.layers) * (main_meta["params"]["layers"] // args.layers)
        flops32 = step_flops(n32, main_meta["lengths"], 32, main_meta["hidden"])
        result["extrapolated_32_layers"].append(dict(
            variant=name, from_layers=[args.extrapolate, args.layers], per_layer_s=(big["step_s"] - small["step_s"]) / dl,
            step_s=t32, N=n32, flops=flops32, tokens_per_s=big["tokens"] / t32,
            mfu=flops32["total"] / t32 / args.peak, mfu_accum8=8 * flops32["total"] / (8 * fb32 + op32) / args.peak,
        ))
    save()
    result["wall_s"] = time.perf_counter() - t_begin
    save()

    print("\n| variant | layers | examples | tokens | positions | tokens/s | step s (fwd+bwd / opt) | peak GiB | TFLOP/s | MFU | MFU accum 8 | loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["variants"]:
        if "step_s" not in r:
            print(f"| {r['variant']} | {r['layers']} | | | | {r.get('error') or r.get('skipped')} | | | | | | |")
            continue
        print(f"| {r['variant']} | {r['layers']} | {r['examples']} | {r['tokens']} | {r['positions_computed']} | {r['tokens_per_s']:,.0f} | "
              f"{r['step_s']:.3f} ({r['fwd_bwd_s']:.3f} / {r['optim_s']:.3f}) | {r.get('peak_mem_gib', float('nan')):.1f} | "
              f"{r['tflops']:.0f} | {100 * r['mfu']:.1f} % | {100 * r['mfu_accum8']:.1f} % | {r['loss_first']:.4f} |")
    for e in result["extrapolated_32_layers"]:
        print(f"extrapolated to 32 layers ({e['variant']}, from {e['from_layers']}): step {e['step_s']:.3f} s "
              f"({e['per_layer_s'] * 1e3:.1f} ms/layer), {e['tokens_per_s']:,.0f} tokens/s, MFU {100 * e['mfu']:.1f} % "
              f"(accum 8: {100 * e['mfu_accum8']:.1f} %), N = {e['N'] / 1e9:.2f} B")
    print(f"wall {result['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
