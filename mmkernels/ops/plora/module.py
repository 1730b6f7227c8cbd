"""``PLoRALinear``: a drop-in for InternLM-XComposer2's ``PLoRA`` module."""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from ..._validation import check_float, check_int
from .function import plora_linear


class PLoRALinear(nn.Linear):
    """Linear layer with a Partial-LoRA update on visual tokens (InternLM-XComposer2 ``PLoRA``).

    Like the original it *is* an ``nn.Linear`` (``weight``, ``bias``) with two bias-free
    sub-layers ``Plora_A`` (``in -> r``) and ``Plora_B`` (``r -> out``), so XComposer2 checkpoints
    load unchanged (keys ``weight``, ``bias``, ``Plora_A.weight``, ``Plora_B.weight``).

    Defaults follow the released checkpoints (r = alpha = 256, dropout 0.05), not the class's
    unused constructor defaults.  Initialisation: W0/b0 as ``nn.Linear``, ``Plora_A`` Kaiming-uniform,
    ``Plora_B`` zeros, so a fresh layer equals its base linear (the original's init is a no-op that
    leaves W0 uninitialised; real weights come from checkpoints either way).

    ``forward(x, im_mask=None)``: ``x [..., in]``, ``im_mask`` bool ``x.shape[:-1]`` (0-d for a single
    token ``x [in]``), or that mask flattened to 1-D (``[B*N]`` for ``x [B, N, in]``), which
    XComposer2.5's PLoRA accepts through ``im_mask.view(-1)``.  ``im_mask=None`` is the original's text-only call: the base linear alone, so
    ``Plora_A``/``Plora_B`` get no gradient (None), whereas an all-False mask gives them zero gradients.
    Under ``torch.autocast`` every GEMM runs in the autocast dtype, as the original's ``nn.Linear`` calls
    do.  Builds and runs on the ``meta`` device (shape only).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, lora_r: int = 256,
                 lora_alpha: float = 256, lora_dropout: float = 0.05, device=None, dtype=None):
        lora_r = check_int("lora_r", lora_r, low=1)
        check_float("lora_alpha", lora_alpha)
        check_float("lora_dropout", lora_dropout, low=0.0, high=1.0)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.lora_r = lora_r
        self.lora_alpha = lora_alpha
        self.lora_scaling = lora_alpha / lora_r
        self.lora_dropout_p = float(lora_dropout)
        self.Plora_A = nn.Linear(in_features, lora_r, bias=False, device=device, dtype=dtype)
        self.Plora_B = nn.Linear(lora_r, out_features, bias=False, device=device, dtype=dtype)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.Plora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.Plora_B.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, lora_r: int = 256, lora_alpha: float = 256,
                    lora_dropout: float = 0.05) -> "PLoRALinear":
        """Wrap an existing ``nn.Linear``: the new module shares its ``weight``/``bias`` Parameters."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, lora_r=lora_r,
                     lora_alpha=lora_alpha, lora_dropout=lora_dropout, device=w.device, dtype=w.dtype)
        module.weight = linear.weight
        if linear.bias is not None:
            module.bias = linear.bias
        return module

    def forward(self, x: torch.Tensor, im_mask: torch.Tensor | None = None) -> torch.Tensor:
        if im_mask is None:  # as the original: the base linear alone, Plora_A/B outside the graph (grads None)
            return F.linear(x, self.weight, self.bias)
        if isinstance(im_mask, torch.Tensor) and im_mask.dim() == 1 and x.dim() > 2 \
                and im_mask.numel() == math.prod(x.shape[:-1]):
            im_mask = im_mask.view(x.shape[:-1])     # XComposer2.5's flattened mask, row-major like x
        # under torch.autocast plora_linear runs every GEMM in autocast's dtype, as the original does
        return plora_linear(x, self.weight, self.bias, self.Plora_A.weight, self.Plora_B.weight, im_mask,
                            scaling=self.lora_scaling, dropout_p=self.lora_dropout_p, training=self.training)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, lora_r={self.lora_r}, lora_alpha={self.lora_alpha}, "
                f"lora_dropout={self.lora_dropout_p}")
