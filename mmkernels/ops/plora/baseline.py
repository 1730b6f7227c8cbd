"""InternLM-XComposer2's ``PLoRA`` module, as published: the baseline the benchmarks time and the
checkpoint layout the tests load.  Not used by the kernels."""
import torch
from torch import nn


class XComposerPLoRA(nn.Linear):
    """InternLM-XComposer2's ``PLoRA`` (``build_mlp.py``), forward copied verbatim.

    Includes the host-synchronising ``torch.sum(im_mask) > 0`` check and, when no row is visual,
    the LoRA run on ``x[:, :1]`` multiplied by 0 (keeps Plora_A/B in the autograd graph).
    ``x`` is ``[B, L, C]`` and ``im_mask`` ``[B, L]`` as in the model.
    """

    def __init__(self, in_features, out_features, bias=False, device=None, dtype=None,
                 lora_r=8, lora_alpha=16, lora_dropout=0.05, lora_len=0, **kwargs):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.lora_r = lora_r
        self.lora_alpha = lora_alpha
        self.lora_len = lora_len
        if lora_dropout > 0.:
            self.lora_dropout = nn.Dropout(p=lora_dropout)
        else:
            self.lora_dropout = lambda x: x
        self.lora_scaling = self.lora_alpha / self.lora_r
        self.Plora_A = nn.Linear(in_features, self.lora_r, bias=False, device=device, dtype=dtype)
        self.Plora_B = nn.Linear(self.lora_r, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, x, im_mask=None):
        res = super().forward(x)
        if im_mask is not None:
            if torch.sum(im_mask) > 0:
                part_x = x[im_mask]
                res[im_mask] += self.Plora_B(self.Plora_A(self.lora_dropout(part_x))) * self.lora_scaling
            else:
                part_x = x[:, :1]
                res[:, :1] += self.Plora_B(self.Plora_A(self.lora_dropout(part_x))) * 0
        return res
