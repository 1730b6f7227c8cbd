"""mPLUG-Owl3 Hyper Attention: reference -> kernels -> launch -> function -> module."""
from .function import HyperAttentionFunction, hyper_attention, hyper_attention_varlen, visual_kv
from .module import HyperAttention, HyperAttentionCache, StaticHyperAttentionCache
from .reference import hyper_attention_reference, hyper_attention_varlen_reference, visual_kv_reference

__all__ = ["HyperAttention", "HyperAttentionCache", "HyperAttentionFunction", "hyper_attention",
           "hyper_attention_reference", "hyper_attention_varlen", "hyper_attention_varlen_reference",
           "StaticHyperAttentionCache", "visual_kv", "visual_kv_reference"]
