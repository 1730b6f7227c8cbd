"""Partial-LoRA (InternLM-XComposer2): reference -> kernels -> launch -> function -> module."""
from .function import PLoRAFunction, plora_linear
from .module import PLoRALinear
from .reference import plora_linear_reference

__all__ = ["PLoRAFunction", "PLoRALinear", "plora_linear", "plora_linear_reference"]
