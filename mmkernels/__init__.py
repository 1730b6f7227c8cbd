"""mmkernels: fused GPU kernels for multimodal LLMs.

Operators (each in ``mmkernels/ops/<op>/``: reference, Triton kernels, launcher, autograd, module):

* :func:`plora_linear` / :class:`PLoRALinear` -- Partial-LoRA linear (InternLM-XComposer2).
* :class:`MoE` / :func:`moe_route` / :func:`moe_route_topk` / :func:`moe_ffn` / :func:`grouped_gemm` -- mixture of
  experts (MoE-LLaVA; :mod:`mmkernels.transformers` plugs them into transformers' MoE models).
* :func:`hyper_attention` / :func:`hyper_attention_varlen` / :func:`visual_kv` / :class:`HyperAttention` --
  mPLUG-Owl3 hyper attention (gated / joint cross-attention with MI-RoPE; padded or packed samples).

Backends: ``reference`` (plain PyTorch) and ``triton``; see :mod:`mmkernels.backend`.
"""
from ._interpreter import interpreter_enabled  # noqa: F401  (applies the interpreter's bf16 fix first)
from ._extension import HAS_C, build_info, has_op
from ._library import DoubleBackwardError
from .backend import get_backend, use_backend
from .ops.plora import PLoRAFunction, PLoRALinear, plora_linear, plora_linear_reference
from .ops.moe import MoE, MoERouting, grouped_gemm, moe_ffn, moe_route, moe_route_topk
from .ops.hyper_attention import (HyperAttention, HyperAttentionCache, StaticHyperAttentionCache, hyper_attention,
                                  hyper_attention_reference, hyper_attention_varlen, hyper_attention_varlen_reference,
                                  visual_kv, visual_kv_reference)

__version__ = "0.1.0"

__all__ = [
    "HAS_C", "build_info", "has_op", "get_backend", "use_backend", "interpreter_enabled", "DoubleBackwardError",
    "plora_linear", "plora_linear_reference", "PLoRALinear", "PLoRAFunction",
    "MoE", "MoERouting", "grouped_gemm", "moe_ffn", "moe_route", "moe_route_topk",
    "hyper_attention", "hyper_attention_reference", "hyper_attention_varlen", "hyper_attention_varlen_reference",
    "visual_kv", "visual_kv_reference", "HyperAttention",
    "HyperAttentionCache", "StaticHyperAttentionCache",
]
