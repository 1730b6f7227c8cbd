"""The torch-native MoE layer: the strongest plain-PyTorch peer of :class:`mmkernels.MoE`.

What a user writes in ~30 lines of PyTorch for a dropless top-k MoE (no capacity, no second-expert
sampling): router softmax, top-k, stable argsort of the expert ids, gather, ``torch._grouped_mm``,
bias, activation (GELU-tanh for phi-2, SwiGLU for StableLM-2: whatever ``moe.activation`` names),
``torch._grouped_mm``, bias, scale by the combine weight, ``index_add_``.  It reads the *same*
parameters as the :class:`mmkernels.MoE` it is given (``gate_weight``, ``w1 [E, F1, H]``, ``b1``,
``w2 [E, H, F]``, ``b2``), so gradients land in that module's parameters.

``torch._grouped_mm`` exists in recent torch and runs on CUDA (sm_90 CUTLASS kernels, bf16) and, in
some releases, on CPU for bf16/fp16; where it does not (no such op, an unsupported device or dtype,
strides not 16-byte aligned) the layer runs a per-expert loop of ``matmul`` instead (one host sync
for the group sizes) and says so: :func:`torch_native_moe` returns the path that ran.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from mmkernels.ops.moe.reference import GATED_ACTIVATIONS, elementwise_activation

from .harness import dtype_name, error_line

GROUPED = "torch._grouped_mm"
LOOP = "per-expert matmul loop"


@functools.lru_cache(maxsize=None)
def _probe(device_type: str, index, dtype: torch.dtype) -> str | None:
    """None when ``torch._grouped_mm`` runs (2-D x 3-D with offsets, forward + backward) on this
    device and dtype, else why not."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    try:
        a = torch.randn(24, 16, device=device, dtype=dtype, requires_grad=True)
        # b as the callers pass it: [E, N, K] weights viewed as [E, K, N] (column-major)
        b = torch.randn(3, 8, 16, device=device, dtype=dtype).transpose(-2, -1).requires_grad_(True)
        offs = torch.tensor([8, 8, 24], device=device, dtype=torch.int32)
        out = torch._grouped_mm(a, b, offs=offs)
        out.backward(torch.randn_like(out))   # (a zero-stride grad, e.g. from .sum(), is not supported)
    except Exception as e:  # noqa: BLE001 -- any failure means "use the loop", and says why
        return f"torch._grouped_mm fails on {device_type} {dtype_name(dtype)}: " \
               f"{error_line(e, 160)}"
    return None


def grouped_mm_unavailable(device, dtype, *widths: int) -> str | None:
    """Why ``torch._grouped_mm`` cannot run here (None when it can): missing op, device/dtype
    unsupported (probed once), or a width whose row stride is not a multiple of 16 bytes."""
    device = torch.device(device)
    why = _probe(device.type, device.index, dtype)
    if why is None:
        bad = [w for w in widths if (w * torch.finfo(dtype).bits // 8) % 16]
        if bad:
            why = f"torch._grouped_mm needs 16-byte-aligned strides; widths {bad} in {dtype} are not"
    return why


def _gmm(a, b_nk, offs, counts, use_grouped):
    """``a[rows of e] @ b_nk[e].T`` per group (``offs``: int32 cumulative ends, ``counts``: host list
    for the loop)."""
    if use_grouped:
        return torch._grouped_mm(a, b_nk.transpose(-2, -1), offs=offs)
    return torch.cat([p @ w.t() for p, w in zip(a.split(counts), b_nk.unbind(0))])


def torch_native_moe(x: torch.Tensor, moe, use_grouped: bool | None = None):
    """``(y [..., H], path)``: the dropless top-``moe.k`` MoE of ``moe``'s weights in plain PyTorch.
    ``use_grouped=None`` picks ``torch._grouped_mm`` when it runs here, else the loop."""
    H, E, k = moe.hidden_size, moe.w1.shape[0], moe.k
    x2 = x.reshape(-1, H)
    if use_grouped is None:
        use_grouped = grouped_mm_unavailable(x.device, x.dtype, H, moe.w1.shape[1], moe.w2.shape[2]) is None
    probs = F.linear(x2.float(), moe.gate_weight.float()).softmax(-1)         # router softmax (fp32)
    top_w, top_i = probs.topk(k, dim=-1)                                      # [S, k]
    top_w = top_w / top_w.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).eps)
    flat = top_i.reshape(-1)
    order = torch.argsort(flat, stable=True)                                  # rows grouped by expert
    token, expert = order // k, flat[order]
    counts_t = torch.bincount(flat, minlength=E)
    offs = counts_t.cumsum(0).to(torch.int32)
    counts = None if use_grouped else counts_t.tolist()                       # the loop's one host sync
    z = _gmm(x2[token], moe.w1, offs, counts, use_grouped)                    # gather, first GEMM
    if moe.b1 is not None:
        z = z + moe.b1[expert]
    if moe.activation in GATED_ACTIVATIONS:                                   # w1 stacks [gate; up]
        gate, up = z.chunk(2, dim=-1)
        h = elementwise_activation(GATED_ACTIVATIONS[moe.activation], gate) * up
    else:
        h = elementwise_activation(moe.activation, z)
    o = _gmm(h, moe.w2, offs, counts, use_grouped)                            # second GEMM
    if moe.b2 is not None:
        o = o + moe.b2[expert]
    o = o * top_w.reshape(-1)[order, None].to(o.dtype)                        # combine weight
    y = torch.zeros_like(x2).index_add_(0, token, o)
    return y.reshape(x.shape), GROUPED if use_grouped else LOOP
