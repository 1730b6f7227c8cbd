"""Mixture of experts (MoE-LLaVA / DeepSpeed MoE): reference -> kernels -> launch -> function -> module."""
from .function import MoERouting, grouped_gemm, moe_ffn, moe_route, moe_route_topk
from .module import MoE
from .reference import capacity_for, deepspeed_einsum_moe, moe_ffn_reference, route_reference

__all__ = ["MoE", "MoERouting", "grouped_gemm", "moe_ffn", "moe_route", "moe_route_topk", "capacity_for",
           "deepspeed_einsum_moe", "moe_ffn_reference", "route_reference"]
