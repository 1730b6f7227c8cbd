"""Pure-PyTorch reference for Partial-LoRA (PLoRA), mirroring InternLM-XComposer2's ``PLoRA.forward``.

Original (XComposer2 ``build_mlp.py``, a subclass of ``nn.Linear``)::

    res = super().forward(x)                                   # base GEMM on all rows
    part_x = x[im_mask]                                        # gather the visual rows
    res[im_mask] += Plora_B(Plora_A(lora_dropout(part_x))) * lora_scaling

With no visual row the original runs the LoRA on ``x[:1]`` and multiplies by 0 so that
``Plora_A``/``Plora_B`` stay in the autograd graph.  Here the gather of an empty selection does the
same job (the LoRA runs on zero rows, and the gradients of A and B come out as zero tensors, not
None) without touching row 0, so a non-finite first row cannot leak NaN into the output.

Works for any floating dtype (float64 for gradcheck) and any device.  A 1-D ``x [K]`` is one token
whose ``im_mask`` is 0-d.  On the ``meta`` device (shape inference, no data) the visual rows cannot be
gathered -- ``x[im_mask]`` needs the mask's values -- so the LoRA term is computed densely and
selected with ``torch.where``: same shape and dtype, no data-dependent op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._validation import check_shape, check_tensor


def plora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           lora_a: torch.Tensor, lora_b: torch.Tensor, im_mask: torch.Tensor,
                           scaling: float = 1.0, dropout_p: float = 0.0, training: bool = False,
                           dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ weight.T + bias``; ``y[im_mask] += scaling * (dropout(x[im_mask]) @ lora_a.T) @ lora_b.T``.

    ``dropout_mask`` (bool, shape of ``x``, True = keep) replaces the random draw when given, so a
    kernel's seeded dropout can be compared exactly; it only matters when ``training`` and
    ``dropout_p > 0``.
    """
    if dropout_mask is not None:
        check_tensor("dropout_mask", dropout_mask, dtypes=(torch.bool,))
        check_shape("dropout_mask", dropout_mask, x.shape, "the shape of x, True = keep")
    if x.dim() == 1:  # one token: a 0-d mask selects it or not; gather/scatter need a row dimension
        keep = dropout_mask.reshape(1, -1) if dropout_mask is not None else None
        return plora_linear_reference(x.unsqueeze(0), weight, bias, lora_a, lora_b, im_mask.reshape(1), scaling,
                                      dropout_p, training, keep).squeeze(0)
    res = F.linear(x, weight, bias)
    if any(t is not None and t.device.type == "meta" for t in (x, weight, bias, lora_a, lora_b, im_mask)):
        lora = F.linear(F.linear(x, lora_a), lora_b) * scaling
        return torch.where(im_mask.unsqueeze(-1), res + lora, res)
    part_x = x[im_mask]
    if training and dropout_p > 0:
        if dropout_mask is None:
            part_x = F.dropout(part_x, p=dropout_p, training=True)
        else:
            keep = dropout_mask[im_mask]
            scale = 0.0 if dropout_p >= 1 else 1.0 / (1.0 - dropout_p)
            part_x = part_x * keep.to(part_x.dtype) * scale
    lora = F.linear(F.linear(part_x, lora_a), lora_b) * scaling
    return res.index_put((im_mask,), lora, accumulate=True)
