"""The Hyper Attention custom ops, their autograd formula, and the public functional API.

Two ops in the ``mmkernels`` namespace (Triton kernels on CUDA, the Triton interpreter on CPU):

* ``hyper_attention_layout(image_positions, cu_images, L_q, L_k, T, inclusive) -> layout``: the hyper
  mask's block classification data (int32, see ``kernels.py``), computed once per forward;
* ``hyper_attention_fwd(q, k, v, k_vis, v_vis, image_positions, cu_images, gate, key_padding_mask,
  gated, inclusive, scale, save_parts, layout=None) -> (out, o_text, o_vis, lse)``;
* ``hyper_attention_bwd(grad_out, ..., out, o_text, o_vis, lse, gated, inclusive, scale, layout=None)
  -> (dq, dk, dv, dk_vis, dv_vis, dgate)``.

``layout`` must be the layout op's result for the same ``image_positions``, ``cu_images``, shapes and
visibility (the kernels trust it); None computes it inside the op.  The public function computes it
once and passes it to both, so the backward reuses the forward's classification.

:class:`HyperAttentionFunction` states the gradient once; it is registered as the autograd formula
of ``hyper_attention_fwd`` so eager mode, ``torch.compile`` and ``torch.library.opcheck`` agree.
"""
from __future__ import annotations

import torch

from ..._library import define_op
from ..._utils import autocast_dtype
from ..._validation import (FLOAT_DTYPES, check_float, check_int, check_same_device, check_same_dtype,
                             check_shape, check_tensor)
from ...backend import get_backend, require_triton, resolve_backend
from . import launch
from .reference import MODES, VISIBILITIES, hyper_attention_reference, hyper_attention_varlen_reference

INDEX_DTYPES = (torch.int32, torch.int64)
TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)


def _layout_impl(image_positions, cu_images, L_q, L_k, T, inclusive):
    require_triton(cu_images.device)
    return launch.hyper_layout(image_positions, cu_images, L_q, L_k, T, inclusive)


def _layout_fake(image_positions, cu_images, L_q, L_k, T, inclusive):
    return cu_images.new_empty(((cu_images.shape[0] - 1) * L_q + 2 * image_positions.shape[0],), dtype=torch.int32)


hyper_attention_layout_op = define_op(
    "hyper_attention_layout",
    "(Tensor image_positions, Tensor cu_images, SymInt L_q, SymInt L_k, SymInt T, bool inclusive) -> Tensor",
    _layout_impl, _layout_fake)


def _forward_impl(q, k, v, k_vis, v_vis, image_positions, cu_images, gate, key_padding_mask, gated, inclusive,
                  scale, save_parts, layout=None):
    require_triton(q.device, q.dtype)
    return launch.hyper_forward(q, k, v, k_vis, v_vis, image_positions, cu_images, gate, key_padding_mask,
                                gated, inclusive, scale, save_parts, layout)


def _forward_fake(q, k, v, k_vis, v_vis, image_positions, cu_images, gate, key_padding_mask, gated, inclusive,
                  scale, save_parts, layout=None):
    B, Lq, H, _ = q.shape
    parts = (lambda: q.new_empty(q.shape)) if (save_parts and gated) else (lambda: q.new_empty(0))
    return (q.new_empty(q.shape), parts(), parts(),
            q.new_empty((2 if gated else 1, B, H, Lq), dtype=torch.float32))


def _backward_impl(grad_out, q, k, v, k_vis, v_vis, image_positions, cu_images, gate, key_padding_mask, out, o_t,
                   o_v, lse, gated, inclusive, scale, layout=None):
    require_triton(q.device, q.dtype)
    return launch.hyper_backward(grad_out, q, k, v, k_vis, v_vis, image_positions, cu_images, gate,
                                 key_padding_mask, out, o_t, o_v, lse, gated, inclusive, scale, layout)


def _backward_fake(grad_out, q, k, v, k_vis, v_vis, image_positions, cu_images, gate, key_padding_mask, out, o_t,
                   o_v, lse, gated, inclusive, scale, layout=None):
    dgate = gate.new_empty(gate.shape) if (gated and gate is not None) else q.new_empty(0)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), k_vis.new_empty(k_vis.shape),
            v_vis.new_empty(v_vis.shape), dgate)


hyper_attention_fwd_op = define_op(
    "hyper_attention_fwd",
    "(Tensor q, Tensor k, Tensor v, Tensor k_vis, Tensor v_vis, Tensor image_positions, Tensor cu_images, "
    "Tensor? gate, Tensor? key_padding_mask, bool gated, bool inclusive, float scale, bool save_parts, "
    "Tensor? layout=None) -> (Tensor, Tensor, Tensor, Tensor)",
    _forward_impl, _forward_fake)

hyper_attention_bwd_op = define_op(
    "hyper_attention_bwd",
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor k_vis, Tensor v_vis, Tensor image_positions, "
    "Tensor cu_images, Tensor? gate, Tensor? key_padding_mask, Tensor out, Tensor o_text, Tensor o_vis, "
    "Tensor lse, bool gated, bool inclusive, float scale, Tensor? layout=None) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    _backward_impl, _backward_fake, backward_of="hyper_attention")


class HyperAttentionFunction(torch.autograd.Function):
    """Autograd of the fused Hyper Attention (math in ``kernels.py``, backward section)::

        per part x:  dV = P^T dO_x,  dS = P * (dO_x V^T - rowsum(dO_x * O_x)),  dQ = s dS K,  dK = s dS^T Q
        gated:       dO_t = (1 - sigmoid(g)) dO,  dO_v = sigmoid(g) dO,  dg = dO (o_v - o_t) sigmoid'(g)
                     (on rows that see an image; elsewhere dO_t = dO, dO_v = dg = 0)
        joint:       one part over [visual ; text] keys with the joint lse.
    """

    @staticmethod
    def forward(q, k, v, k_vis, v_vis, image_positions, cu_images, gate, key_padding_mask, gated, inclusive, scale,
                save_parts, layout=None):
        return hyper_attention_fwd_op(q, k, v, k_vis, v_vis, image_positions, cu_images, gate, key_padding_mask,
                                      gated, inclusive, scale, save_parts, layout)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (q, k, v, k_vis, v_vis, image_positions, cu_images, gate, key_padding_mask, gated, inclusive, scale,
         save_parts, *rest) = inputs
        layout = rest[0] if rest else None
        out, o_t, o_v, lse = output
        ctx.save_for_backward(q, k, v, k_vis, v_vis, image_positions, cu_images, gate, key_padding_mask, out, o_t,
                              o_v, lse, layout)
        ctx.gated, ctx.inclusive, ctx.scale = gated, inclusive, scale
        ctx.n_inputs = len(inputs)

    @staticmethod
    def backward(ctx, grad_out, grad_ot, grad_ov, grad_lse):
        (q, k, v, k_vis, v_vis, image_positions, cu_images, gate, key_padding_mask, out, o_t, o_v,
         lse, layout) = ctx.saved_tensors
        need = ctx.needs_input_grad
        if grad_out is None or not any(need[:5] + (need[7],)):
            return (None,) * ctx.n_inputs
        dq, dk, dv, dkv, dvv, dg = hyper_attention_bwd_op(
            grad_out, q, k, v, k_vis, v_vis, image_positions, cu_images, gate, key_padding_mask, out, o_t, o_v,
            lse, ctx.gated, ctx.inclusive, ctx.scale, layout)
        grads = [g if flag else None for g, flag in zip((dq, dk, dv, dkv, dvv), need[:5])]
        dgate = dg if (ctx.gated and need[7]) else None
        return (*grads, None, None, dgate) + (None,) * (ctx.n_inputs - 8)


torch.library.register_autograd("mmkernels::hyper_attention_fwd", HyperAttentionFunction.backward,
                                setup_context=HyperAttentionFunction.setup_context)


# --------------------------------------------------------------------------- validation
#
# The dense and the packed (varlen) functions share these checks; each raises a ValueError/TypeError
# naming the argument.

def _check_offsets(name: str, offsets: torch.Tensor, total: int, what: str) -> None:
    """Values of a ``[S+1]`` offsets tensor (copied to the host by the caller): 0 first, monotone
    non-decreasing, ``total`` last (``what`` says what ``total`` counts)."""
    if offsets.numel() and int(offsets[0]) != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0]={int(offsets[0])}")
    if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"{name} must be monotone non-decreasing, got {offsets.tolist()}")
    if offsets.numel() and int(offsets[-1]) != total:
        raise ValueError(f"{name} must end at {what}, got {int(offsets[-1])}")


def _check_metadata_values(image_positions: torch.Tensor, cu_images: torch.Tensor, N: int, Lk) -> None:
    """Value checks of the image layout (one host sync; skipped while torch.compile traces).  ``Lk``:
    the key length of every sample (an int) or of each sample (a host tensor ``[S]``)."""
    cu = cu_images.detach().to("cpu", torch.int64)
    pos = image_positions.detach().to("cpu", torch.int64)
    _check_offsets("cu_images", cu, N, f"the number of images N={N} (k_vis.shape[0])")
    if not pos.numel():
        return
    if isinstance(Lk, torch.Tensor):   # per sample: each image inside its own sample
        for b in range(cu.numel() - 1):
            p = pos[int(cu[b]):int(cu[b + 1])]
            if p.numel() and (int(p.min()) < 0 or int(p.max()) >= int(Lk[b])):
                raise ValueError(f"image_positions must lie inside their sample, in [0, L_k) of the sample "
                                 f"(sample {b}: L_k={int(Lk[b])}), got {p.tolist()}")
    elif int(pos.min()) < 0 or int(pos.max()) >= Lk:
        raise ValueError(f"image_positions must lie inside the sample, in [0, L_k={Lk}), got min "
                         f"{int(pos.min())}, max {int(pos.max())}")
    for b in range(cu.numel() - 1):
        p = pos[int(cu[b]):int(cu[b + 1])]
        if p.numel() > 1 and bool((p[1:] <= p[:-1]).any()):
            raise ValueError(f"image_positions must be strictly increasing within a sample; sample {b} has "
                             f"{p.tolist()}")


def _check_mode(mode: str, visibility: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if visibility not in VISIBILITIES:
        raise ValueError(f"visibility must be one of {VISIBILITIES}, got {visibility!r}")


def _check_head_dim(q: torch.Tensor) -> int:
    D = q.shape[-1]
    if D < 1:
        raise ValueError(f"q must have a positive head dim D, got shape {tuple(q.shape)}")
    return D


def _check_heads(H: int, Hkv: int) -> None:
    if Hkv < 1 or H % Hkv != 0:
        raise ValueError(f"the number of query heads H={H} must be a multiple of the key/value heads H_kv={Hkv}")


def _check_images(k_vis, v_vis, image_positions, cu_images, Hkv: int, D: int, n_samples: int, samples: str) -> int:
    """Shapes of the visual keys/values and their metadata; returns the number of images N."""
    if k_vis.shape[2] != Hkv or k_vis.shape[3] != D:
        raise ValueError(f"k_vis must have shape (N, T, H_kv={Hkv}, D={D}), got {tuple(k_vis.shape)}")
    check_shape("v_vis", v_vis, k_vis.shape, "the shape of k_vis")
    N = k_vis.shape[0]
    if image_positions.shape[0] != N:
        raise ValueError(f"image_positions must have shape ({N},) (one per image of k_vis), "
                         f"got {tuple(image_positions.shape)}")
    if cu_images.shape[0] != n_samples + 1:
        raise ValueError(f"cu_images must have shape ({n_samples + 1},) ({samples}+1 offsets), "
                         f"got {tuple(cu_images.shape)}")
    return N


def _check_gate(mode: str, gate, H: int, D: int, rows: tuple, rows_name: str):
    """The gate of ``mode``: required in gated mode, a ``[H*D]`` vector or broadcastable to
    ``(*rows, H, D)`` (``rows_name`` names those dims); None in joint mode.  Returns
    ``[("gate", gate)]`` for the dtype/device checks, or ``[]``."""
    if mode == "gated":
        full = (*rows, H, D)
        if gate is None:
            raise ValueError(f"gate is required in mode='gated' (a [H*D] vector or a tensor broadcastable to "
                             f"[{rows_name}, H, D])")
        check_tensor("gate", gate, dtypes=FLOAT_DTYPES)
        shape = (H, D) if (gate.dim() == 1 and gate.numel() == H * D) else tuple(gate.shape)
        try:
            ok = torch.broadcast_shapes(shape, full) == full
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"gate must be a [H*D]={H * D} vector or broadcastable to [{rows_name}, H, D]="
                             f"{full}, got shape {tuple(gate.shape)}")
        return [("gate", gate)]
    if gate is not None:
        raise ValueError("gate must be None in mode='joint': the joint (v2, 241101) softmax has no gate; "
                         "pass mode='gated' to mix the two parts with sigmoid(gate)")
    return []


def _check_same_kind(floats, ints, scale) -> None:
    """One dtype for the floating inputs, one device for everything, a non-negative scale."""
    check_same_dtype(floats)
    check_same_device(floats + ints)
    if scale is not None:
        check_float("scale", scale, low=0.0)


def _validate(q, k, v, k_vis, v_vis, image_positions, cu_images, mode, gate, visibility, key_padding_mask, scale,
              check_metadata=True):
    for name, t in (("q", q), ("k", k), ("v", v), ("k_vis", k_vis), ("v_vis", v_vis)):
        check_tensor(name, t, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("image_positions", image_positions, ndim=1, dtypes=INDEX_DTYPES)
    check_tensor("cu_images", cu_images, ndim=1, dtypes=INDEX_DTYPES)
    _check_mode(mode, visibility)
    B, Lq, H, _ = q.shape
    D = _check_head_dim(q)
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must have shape (B={B}, L_k, H_kv, D={D}) to match q, got {tuple(k.shape)}")
    Lk, Hkv = k.shape[1], k.shape[2]
    check_shape("v", v, k.shape, "the shape of k")
    _check_heads(H, Hkv)
    if Lq > Lk:
        raise ValueError(f"q has L_q={Lq} rows but k only L_k={Lk}: the queries must be the last L_q of the keys")
    N = _check_images(k_vis, v_vis, image_positions, cu_images, Hkv, D, B, "B")
    floats = [("q", q), ("k", k), ("v", v), ("k_vis", k_vis), ("v_vis", v_vis)]
    floats += _check_gate(mode, gate, H, D, (B, Lq), "B, L_q")
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,))
        check_shape("key_padding_mask", key_padding_mask, (B, Lk), f"B={B}, L_k={Lk}")
    _check_same_kind(floats, [("image_positions", image_positions), ("cu_images", cu_images),
                              ("key_padding_mask", key_padding_mask)], scale)
    if check_metadata and not torch.compiler.is_compiling() and not _is_meta(q):
        _check_metadata_values(image_positions, cu_images, N, Lk)


def _is_meta(t: torch.Tensor) -> bool:
    """Meta tensors (``torch.device("meta")`` model construction) carry shapes only: the public
    functions then run the registered op, whose meta kernel is the fake (shape-inference) one."""
    return t.device.type == "meta"


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def hyper_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_vis: torch.Tensor, v_vis: torch.Tensor,
                    image_positions: torch.Tensor, cu_images: torch.Tensor, *, mode: str = "gated",
                    gate: torch.Tensor | None = None, visibility: str = "strict",
                    key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
                    check_metadata: bool = True) -> torch.Tensor:
    """mPLUG-Owl3 Hyper Attention: causal text attention plus cross-attention to earlier images.

    Args:
        q: ``[B, L_q, H, D]`` text queries (already RoPE'd); they are the last ``L_q`` of the ``L_k``
            positions (so decoding and chunked prefill work).
        k, v: ``[B, L_k, H_kv, D]`` text keys (RoPE'd) and values; ``H % H_kv == 0`` (GQA, never repeated).
        k_vis, v_vis: ``[N, T, H_kv, D]`` visual keys (MI-RoPE'd, see :func:`visual_kv`) and values of all
            images of the batch, sample-major, each sample's images in sequence order.
        image_positions: int ``[N]``, sequence index of each image's ``<|image|>`` token in its sample
            (strictly increasing within a sample, in ``[0, L_k)``).
        cu_images: int32 ``[B+1]``: sample b's images are ``cu_images[b]:cu_images[b+1]`` (may be empty).
        mode: ``"gated"`` (v1: 240728/1B/2B) or ``"joint"`` (v2: 241101).
        gate: gated mode only (required there, and must be None in joint mode): a ``[H*D]`` vector (the
            checkpoints' ``gate``) or any tensor broadcastable to ``[B, L_q, H, D]`` (e.g. a per-token
            ``W_gate h``); ``sigmoid(gate)`` weighs the visual part.
        visibility: ``"strict"`` (row t sees image j iff ``p_j < t``) or ``"inclusive"`` (``p_j <= t``).
        key_padding_mask: bool ``[B, L_k]``, True = keep (text keys only).
        scale: softmax scale, default ``D ** -0.5``.
        check_metadata: check the *values* of ``cu_images``/``image_positions`` (monotone, in range,
            increasing): one host synchronisation.  Pass False when the layout is known to be valid
            (e.g. decode steps reusing a layout checked at prefill); shapes and dtypes are always checked.

    Returns ``[B, L_q, H, D]``.  Rows that see no image get plain causal attention (bit-identical in
    gated mode); a row with no visible key at all gets 0.  Every floating input takes part in the
    autograd graph (an input that cannot influence the output, e.g. ``k_vis`` of a batch without images,
    gets a zero gradient on both backends).  Meta tensors give the output's shape (shape inference).
    Differentiating twice is supported on the reference backend only; the triton backward raises
    :class:`mmkernels.DoubleBackwardError` (a RuntimeError) when differentiated.

    Example::

        >>> q = torch.randn(2, 10, 4, 32); k = v = torch.randn(2, 10, 2, 32)
        >>> kv = vv = torch.randn(3, 20, 2, 32)                 # 3 images of 20 tokens
        >>> pos = torch.tensor([1, 6, 0]); cu = torch.tensor([0, 2, 3], dtype=torch.int32)
        >>> hyper_attention(q, k, v, kv, vv, pos, cu, gate=torch.zeros(4 * 32)).shape
        torch.Size([2, 10, 4, 32])
    """
    _validate(q, k, v, k_vis, v_vis, image_positions, cu_images, mode, gate, visibility, key_padding_mask, scale,
              check_metadata)
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else float(scale)
    gated = mode == "gated"
    if _is_meta(q):  # shapes only: the op's fake kernel, whatever the backend
        save = gated and _needs_grad(q, k, v, k_vis, v_vis, gate)
        return hyper_attention_fwd_op(q, k, v, k_vis, v_vis, image_positions, cu_images, gate, key_padding_mask,
                                      gated, visibility == "inclusive", scale, save)[0]
    backend = resolve_backend(q.device, q.dtype)
    if backend == "triton" and D not in TRITON_HEAD_DIMS:
        if get_backend() == "triton":
            raise ValueError(f"the triton backend supports head dims {TRITON_HEAD_DIMS}, got D={D}; "
                             "use the reference backend")
        backend = "reference"  # auto: other head dims take the reference path
    if backend == "reference":
        return hyper_attention_reference(q, k, v, k_vis, v_vis, image_positions, cu_images, mode=mode,
                                         gate=gate, visibility=visibility, key_padding_mask=key_padding_mask,
                                         scale=scale)
    save = gated and _needs_grad(q, k, v, k_vis, v_vis, gate)
    inclusive = visibility == "inclusive"
    layout = None
    B, Lq, H, _ = q.shape
    if not launch.use_decode_path(Lq, H // k.shape[2]) or _needs_grad(q, k, v, k_vis, v_vis, gate):
        # the block classification, once: the forward's tiles and then the backward's use it
        layout = hyper_attention_layout_op(image_positions, cu_images, Lq, k.shape[1], k_vis.shape[1], inclusive)
    out, _, _, _ = hyper_attention_fwd_op(q, k, v, k_vis, v_vis, image_positions, cu_images, gate,
                                          key_padding_mask, gated, inclusive, scale, save, layout)
    return out


# =========================================================================== packed samples (varlen)
#
# Three ops like the dense ones, on packed tensors (q [total_q, H, D], k/v [total_k, H_kv, D], lse
# [S, H, total_q]); the same kernels with the sample offsets read from cu_seqlens (launch.Packed).

def _packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    return launch.Packed(cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k))


def _varlen_layout_impl(image_positions, cu_images, cu_seqlens_q, cu_seqlens_k, total_q, max_seqlen_q, max_seqlen_k,
                        inclusive):
    require_triton(cu_images.device)
    return launch.hyper_layout(image_positions, cu_images, max_seqlen_q, max_seqlen_k, 0, inclusive,
                               _packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k), total_q)


def _varlen_layout_fake(image_positions, cu_images, cu_seqlens_q, cu_seqlens_k, total_q, max_seqlen_q, max_seqlen_k,
                        inclusive):
    return cu_images.new_empty((total_q + 2 * image_positions.shape[0],), dtype=torch.int32)


hyper_attention_varlen_layout_op = define_op(
    "hyper_attention_varlen_layout",
    "(Tensor image_positions, Tensor cu_images, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt total_q, "
    "SymInt max_seqlen_q, SymInt max_seqlen_k, bool inclusive) -> Tensor",
    _varlen_layout_impl, _varlen_layout_fake)


def _varlen_forward_impl(q, k, v, k_vis, v_vis, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         image_positions, cu_images, gate, gated, inclusive, scale, save_parts, layout=None):
    require_triton(q.device, q.dtype)
    return launch.hyper_forward(q, k, v, k_vis, v_vis, image_positions, cu_images, gate, None, gated, inclusive,
                                scale, save_parts, layout,
                                _packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))


def _varlen_forward_fake(q, k, v, k_vis, v_vis, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         image_positions, cu_images, gate, gated, inclusive, scale, save_parts, layout=None):
    total_q, H, _ = q.shape
    parts = (lambda: q.new_empty(q.shape)) if (save_parts and gated) else (lambda: q.new_empty(0))
    return q.new_empty(q.shape), parts(), parts(), q.new_empty((2 if gated else 1, H, total_q), dtype=torch.float32)


def _varlen_backward_impl(grad_out, q, k, v, k_vis, v_vis, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          image_positions, cu_images, gate, out, o_t, o_v, lse, gated, inclusive, scale, layout=None):
    require_triton(q.device, q.dtype)
    return launch.hyper_backward(grad_out, q, k, v, k_vis, v_vis, image_positions, cu_images, gate, None, out, o_t,
                                 o_v, lse, gated, inclusive, scale, layout,
                                 _packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))


def _varlen_backward_fake(grad_out, q, k, v, k_vis, v_vis, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          image_positions, cu_images, gate, out, o_t, o_v, lse, gated, inclusive, scale, layout=None):
    return _backward_fake(grad_out, q, k, v, k_vis, v_vis, image_positions, cu_images, gate, None, out, o_t, o_v, lse,
                          gated, inclusive, scale)


hyper_attention_varlen_fwd_op = define_op(
    "hyper_attention_varlen_fwd",
    "(Tensor q, Tensor k, Tensor v, Tensor k_vis, Tensor v_vis, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
    "SymInt max_seqlen_q, SymInt max_seqlen_k, Tensor image_positions, Tensor cu_images, Tensor? gate, bool gated, "
    "bool inclusive, float scale, bool save_parts, Tensor? layout=None) -> (Tensor, Tensor, Tensor, Tensor)",
    _varlen_forward_impl, _varlen_forward_fake)

hyper_attention_varlen_bwd_op = define_op(
    "hyper_attention_varlen_bwd",
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor k_vis, Tensor v_vis, Tensor cu_seqlens_q, "
    "Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, Tensor image_positions, Tensor cu_images, "
    "Tensor? gate, Tensor out, Tensor o_text, Tensor o_vis, Tensor lse, bool gated, bool inclusive, float scale, "
    "Tensor? layout=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    _varlen_backward_impl, _varlen_backward_fake, backward_of="hyper_attention_varlen")


def _varlen_setup_context(ctx, inputs, output):
    (q, k, v, k_vis, v_vis, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, image_positions, cu_images, gate,
     gated, inclusive, scale, save_parts, *rest) = inputs
    layout = rest[0] if rest else None
    out, o_t, o_v, lse = output
    ctx.save_for_backward(q, k, v, k_vis, v_vis, cu_seqlens_q, cu_seqlens_k, image_positions, cu_images, gate, out,
                          o_t, o_v, lse, layout)
    ctx.max_seqlen = (max_seqlen_q, max_seqlen_k)
    ctx.gated, ctx.inclusive, ctx.scale = gated, inclusive, scale
    ctx.n_inputs = len(inputs)


def _varlen_backward(ctx, grad_out, grad_ot, grad_ov, grad_lse):
    """The dense formula (:class:`HyperAttentionFunction`), per packed sample."""
    (q, k, v, k_vis, v_vis, cu_seqlens_q, cu_seqlens_k, image_positions, cu_images, gate, out, o_t, o_v, lse,
     layout) = ctx.saved_tensors
    need = ctx.needs_input_grad
    if grad_out is None or not any(need[:5] + (need[11],)):
        return (None,) * ctx.n_inputs
    dq, dk, dv, dkv, dvv, dg = hyper_attention_varlen_bwd_op(
        grad_out, q, k, v, k_vis, v_vis, cu_seqlens_q, cu_seqlens_k, *ctx.max_seqlen, image_positions, cu_images,
        gate, out, o_t, o_v, lse, ctx.gated, ctx.inclusive, ctx.scale, layout)
    grads = [g if flag else None for g, flag in zip((dq, dk, dv, dkv, dvv), need[:5])]
    dgate = dg if (ctx.gated and need[11]) else None
    return (*grads, *(None,) * 6, dgate) + (None,) * (ctx.n_inputs - 12)


torch.library.register_autograd("mmkernels::hyper_attention_varlen_fwd", _varlen_backward,
                                setup_context=_varlen_setup_context)


def _check_seqlen(name: str, value):
    """``max_seqlen_*``: a non-negative int (a SymInt under torch.compile's dynamic shapes passes as is)."""
    if isinstance(value, torch.SymInt):
        return value
    return check_int(name, value, low=0)


def _check_varlen_metadata_values(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, image_positions,
                                  cu_images, total_q: int, total_k: int, N: int) -> None:
    """Value checks of the packed layout, from one copy to the host (one sync)."""
    parts = (cu_seqlens_q, cu_seqlens_k, cu_images, image_positions)
    host = torch.cat([x.detach().reshape(-1).to(torch.int64) for x in parts]).cpu()
    cq, ck, cu, pos = host.split([x.numel() for x in parts])
    _check_offsets("cu_seqlens_q", cq, total_q, f"total_q={total_q} (q.shape[0])")
    _check_offsets("cu_seqlens_k", ck, total_k, f"total_k={total_k} (k.shape[0])")
    len_q, len_k = cq.diff(), ck.diff()
    longer = (len_q > len_k).nonzero()
    if longer.numel():
        s = int(longer[0])
        raise ValueError(f"sample {s} has L_q={int(len_q[s])} query rows (cu_seqlens_q) but only L_k={int(len_k[s])} "
                         "keys (cu_seqlens_k): a sample's queries must be the last L_q of its keys")
    for name, lengths, bound in (("max_seqlen_q", len_q, max_seqlen_q), ("max_seqlen_k", len_k, max_seqlen_k)):
        if lengths.numel() and int(lengths.max()) > bound:
            raise ValueError(f"{name}={bound} must be at least the longest sample's length, "
                             f"{int(lengths.max())} (sample {int(lengths.argmax())})")
    _check_metadata_values(pos, cu, N, len_k)


def _validate_varlen(q, k, v, k_vis, v_vis, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     image_positions, cu_images, mode, gate, visibility, scale, check_metadata):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=3, dtypes=FLOAT_DTYPES)
    for name, t in (("k_vis", k_vis), ("v_vis", v_vis)):
        check_tensor(name, t, ndim=4, dtypes=FLOAT_DTYPES)
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k),
                    ("image_positions", image_positions), ("cu_images", cu_images)):
        check_tensor(name, t, ndim=1, dtypes=INDEX_DTYPES)
    max_seqlen_q = _check_seqlen("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _check_seqlen("max_seqlen_k", max_seqlen_k)
    _check_mode(mode, visibility)
    total_q, H, _ = q.shape
    D = _check_head_dim(q)
    if k.shape[2] != D:
        raise ValueError(f"k must have shape (total_k, H_kv, D={D}) to match q, got {tuple(k.shape)}")
    total_k, Hkv = k.shape[0], k.shape[1]
    check_shape("v", v, k.shape, "the shape of k")
    _check_heads(H, Hkv)
    if cu_seqlens_q.shape[0] < 1:
        raise ValueError("cu_seqlens_q must have shape (S+1,) (S+1 offsets of S samples), got shape (0,)")
    S = cu_seqlens_q.shape[0] - 1
    if cu_seqlens_k.shape[0] != S + 1:
        raise ValueError(f"cu_seqlens_k must have shape ({S + 1},) like cu_seqlens_q (S+1 offsets), "
                         f"got {tuple(cu_seqlens_k.shape)}")
    N = _check_images(k_vis, v_vis, image_positions, cu_images, Hkv, D, S, "S")
    floats = [("q", q), ("k", k), ("v", v), ("k_vis", k_vis), ("v_vis", v_vis)]
    floats += _check_gate(mode, gate, H, D, (total_q,), "total_q")
    _check_same_kind(floats, [("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k),
                              ("image_positions", image_positions), ("cu_images", cu_images)], scale)
    if check_metadata and not torch.compiler.is_compiling() and not _is_meta(q):
        _check_varlen_metadata_values(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, image_positions,
                                      cu_images, total_q, total_k, N)


def hyper_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_vis: torch.Tensor,
                           v_vis: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, image_positions: torch.Tensor,
                           cu_images: torch.Tensor, *, mode: str = "gated", gate: torch.Tensor | None = None,
                           visibility: str = "strict", scale: float | None = None,
                           check_metadata: bool = True) -> torch.Tensor:
    """Hyper Attention over packed samples (variable lengths, flash-attn's ``cu_seqlens`` convention).

    The samples of a batch are concatenated along the token dim instead of padded.  Each sample is
    attended on its own, exactly as :func:`hyper_attention` attends one row of a ``[B, L, ...]``
    batch: its text is causal within the sample, its rows see only its own earlier images.

    Args:
        q: ``[total_q, H, D]`` text queries (already RoPE'd), sample after sample.
        k, v: ``[total_k, H_kv, D]`` text keys and values, sample after sample; ``H % H_kv == 0``.
        k_vis, v_vis: ``[N, T, H_kv, D]`` visual keys/values of all images, sample-major, each sample's
            images in sequence order.
        cu_seqlens_q, cu_seqlens_k: int32 (or int64) ``[S+1]``: sample s's queries are rows
            ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` of q and its keys rows ``cu_seqlens_k[s]:cu_seqlens_k[s+1]``
            of k.  A sample's ``L_q <= L_k`` queries are the last ``L_q`` of its ``L_k`` positions
            (``L_q < L_k``: chunked prefill); a sample may be empty.
        max_seqlen_q, max_seqlen_k: the longest sample's ``L_q`` and ``L_k`` (or any larger bound):
            they size the kernels' grid, so the host never reads the offsets.
        image_positions: int ``[N]``, sequence index of each image's ``<|image|>`` token in its own
            sample's coordinates (strictly increasing within a sample, in ``[0, L_k)`` of the sample).
        cu_images: int32 ``[S+1]``: sample s's images are ``cu_images[s]:cu_images[s+1]`` (may be empty).
        mode, visibility, scale: as in :func:`hyper_attention`.
        gate: gated mode only: a ``[H*D]`` vector or any tensor broadcastable to ``[total_q, H, D]``
            (a per-token gate gives one row per packed query).
        check_metadata: check the *values* of the offsets, lengths and image layout (monotone, ending at
            the totals, ``L_q <= L_k`` per sample, the ``max_seqlen_*`` bounds, images inside their
            sample, positions increasing): one host synchronisation.  Pass False when they are known
            to be valid; the kernels trust them.  Shapes and dtypes are always checked.

    Returns ``[total_q, H, D]``: rows ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` equal
    ``hyper_attention`` of sample s alone.  Every floating input takes part in the autograd graph.

    Example::

        >>> q = torch.randn(7, 4, 32); k = v = torch.randn(9, 2, 32)     # 2 samples: (3, 5) and (4, 4)
        >>> kv = vv = torch.randn(2, 20, 2, 32)                          # 2 images of 20 tokens
        >>> cu_q = torch.tensor([0, 3, 7], dtype=torch.int32); cu_k = torch.tensor([0, 5, 9], dtype=torch.int32)
        >>> pos = torch.tensor([1, 0]); cu = torch.tensor([0, 1, 2], dtype=torch.int32)
        >>> hyper_attention_varlen(q, k, v, kv, vv, cu_q, cu_k, 4, 5, pos, cu, mode="joint").shape
        torch.Size([7, 4, 32])
    """
    _validate_varlen(q, k, v, k_vis, v_vis, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     image_positions, cu_images, mode, gate, visibility, scale, check_metadata)
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else float(scale)
    gated = mode == "gated"
    if _is_meta(q):  # shapes only: the op's fake kernel, whatever the backend
        return hyper_attention_varlen_fwd_op(q, k, v, k_vis, v_vis, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                             max_seqlen_k, image_positions, cu_images, gate, gated,
                                             visibility == "inclusive", scale, False)[0]
    backend = resolve_backend(q.device, q.dtype)
    if backend == "triton" and D not in TRITON_HEAD_DIMS:
        if get_backend() == "triton":
            raise ValueError(f"the triton backend supports head dims {TRITON_HEAD_DIMS}, got D={D}; "
                             "use the reference backend")
        backend = "reference"
    if backend == "reference":
        return hyper_attention_varlen_reference(q, k, v, k_vis, v_vis, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                max_seqlen_k, image_positions, cu_images, mode=mode, gate=gate,
                                                visibility=visibility, scale=scale)
    save = gated and _needs_grad(q, k, v, k_vis, v_vis, gate)
    inclusive = visibility == "inclusive"
    # the block classification of every sample, once: the forward's tiles and then the backward's use it
    layout = hyper_attention_varlen_layout_op(image_positions, cu_images, cu_seqlens_q, cu_seqlens_k, q.shape[0],
                                              max_seqlen_q, max_seqlen_k, inclusive)
    out, _, _, _ = hyper_attention_varlen_fwd_op(q, k, v, k_vis, v_vis, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                 max_seqlen_k, image_positions, cu_images, gate, gated, inclusive,
                                                 scale, save, layout)
    return out


# =========================================================================== visual K/V producer

def _rope_impl(kv_proj, rstd, bias, image_positions, inv_freq, T, num_kv_heads, position_offset):
    require_triton(kv_proj.device, kv_proj.dtype)
    return launch.visual_kv_rope(kv_proj, rstd, bias, image_positions, inv_freq, T, num_kv_heads, position_offset)


def _rope_fake(kv_proj, rstd, bias, image_positions, inv_freq, T, num_kv_heads, position_offset):
    M, C = kv_proj.shape
    D = C // (2 * num_kv_heads)
    return kv_proj.new_empty((M, num_kv_heads, D)), kv_proj.new_empty((M, num_kv_heads, D))


def _rope_bwd_impl(dk_vis, dv_vis, image_positions, inv_freq, T, position_offset):
    require_triton(dk_vis.device, dk_vis.dtype)
    return launch.visual_kv_rope_backward(dk_vis, dv_vis, image_positions, inv_freq, T, position_offset)


def _rope_bwd_fake(dk_vis, dv_vis, image_positions, inv_freq, T, position_offset):
    M, Hkv, D = dk_vis.shape
    return dk_vis.new_empty((M, 2 * Hkv * D))


visual_kv_rope_op = define_op(
    "visual_kv_rope",
    "(Tensor kv_proj, Tensor? rstd, Tensor? bias, Tensor image_positions, Tensor inv_freq, int T, "
    "int num_kv_heads, int position_offset) -> (Tensor, Tensor)",
    _rope_impl, _rope_fake)

visual_kv_rope_bwd_op = define_op(
    "visual_kv_rope_bwd",
    "(Tensor dk_vis, Tensor dv_vis, Tensor image_positions, Tensor inv_freq, int T, int position_offset) -> Tensor",
    _rope_bwd_impl, _rope_bwd_fake)


def _rope_bwd_setup_context(ctx, inputs, output):
    dk_vis, _, image_positions, inv_freq, T, position_offset = inputs
    ctx.save_for_backward(image_positions, inv_freq)
    ctx.T, ctx.position_offset, ctx.num_kv_heads = T, position_offset, dk_vis.shape[1]


def _rope_bwd_backward(ctx, grad_dy):
    """The backward op is linear: ``dy = [R^-1 dk_vis ; dv_vis]`` (interleaved per head, ``R`` the
    MI-RoPE rotation), so its derivative maps ``grad_dy`` back by the forward rotation: the forward
    op itself, without norm scale or bias.  This makes ``visual_kv`` twice differentiable."""
    image_positions, inv_freq = ctx.saved_tensors
    if grad_dy is None:
        return None, None, None, None, None, None
    ddk, ddv = visual_kv_rope_op(grad_dy.contiguous(), None, None, image_positions, inv_freq, ctx.T,
                                 ctx.num_kv_heads, ctx.position_offset)
    return ddk, ddv, None, None, None, None


torch.library.register_autograd("mmkernels::visual_kv_rope_bwd", _rope_bwd_backward,
                                setup_context=_rope_bwd_setup_context)


def _rope_setup_context(ctx, inputs, output):
    kv_proj, rstd, bias, image_positions, inv_freq, T, num_kv_heads, position_offset = inputs
    ctx.save_for_backward(kv_proj if rstd is not None else None, rstd, image_positions, inv_freq)
    ctx.T, ctx.position_offset, ctx.has_bias = T, position_offset, bias is not None


def _rope_backward(ctx, dk_vis, dv_vis):
    """``y = rstd * kv_proj + bias`` -> split/rotate: dy by the inverse rotation (kernel), then
    ``d kv_proj = rstd * dy``, ``d rstd = rowsum(dy * kv_proj)``, ``d bias = colsum(dy)``."""
    kv_proj, rstd, image_positions, inv_freq = ctx.saved_tensors
    if dk_vis is None:
        dk_vis = torch.zeros_like(dv_vis)
    if dv_vis is None:
        dv_vis = torch.zeros_like(dk_vis)
    dy = visual_kv_rope_bwd_op(dk_vis, dv_vis, image_positions, inv_freq, ctx.T, ctx.position_offset)
    need = ctx.needs_input_grad
    dproj = drstd = dbias = None
    if rstd is None:
        dproj = dy if need[0] else None
    else:
        dyf = dy.float()
        dproj = (dyf * rstd[:, None]).to(dy.dtype) if need[0] else None
        drstd = (dyf * kv_proj.float()).sum(-1) if need[1] else None
    if ctx.has_bias and need[2]:
        dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype)
    return dproj, drstd, dbias, None, None, None, None, None


torch.library.register_autograd("mmkernels::visual_kv_rope", _rope_backward, setup_context=_rope_setup_context)


def visual_kv(image_embeds: torch.Tensor, norm_weight: torch.Tensor | None, v_kv_weight: torch.Tensor,
              v_kv_bias: torch.Tensor | None, image_positions: torch.Tensor, *, num_kv_heads: int,
              rope_theta: float, position_offset: int, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """mPLUG-Owl3's visual K/V producer: RMSNorm -> ``v_kv_proj`` -> MI-RoPE.

    Args:
        image_embeds: ``[N, T, Dm]`` projector outputs of all images of the batch.
        norm_weight: ``[Dm]`` the decoder layer's ``input_layernorm.weight`` (RMSNorm in float32, eps
            ``eps``), or None when ``image_embeds`` is already normalised.
        v_kv_weight, v_kv_bias: ``v_kv_proj`` = ``Linear(Dm, 2*H_kv*D, bias=True)``; output channels laid
            out ``(kv_head, {K, V}, D)`` (K and V interleaved per head).
        image_positions: int ``[N]`` sequence index of each image's ``<|image|>`` token.
        num_kv_heads: ``H_kv``.   rope_theta: the model's RoPE base (1e6 for Qwen2).
        position_offset: MI-RoPE position = ``image_positions + position_offset``: 1 for the gated
            (v1) checkpoints, 0 for the joint (v2, 241101) one.

    Returns ``(k_vis, v_vis)``, each ``[N, T, H_kv, D]``, ``D = v_kv_weight.shape[0] // (2 * H_kv)``:
    K rotated in float32 (rotate-half) at one position per image and cast back; V unrotated.

    Triton backend: the norm weight is folded into the projection (``RMSNorm(x) @ W.T =
    rstd * (x @ (W * w).T)``), so the work is one fp32 row reduction for ``rstd``, one GEMM (cuBLAS)
    and one fused kernel that applies ``rstd``, the bias, the K/V split and MI-RoPE in fp32 with a
    single rounding (its backward is the exact inverse rotation, itself differentiable, so
    ``visual_kv`` can be differentiated twice on both backends).  A one-channel input (``Dm = 1``) with a
    norm runs the reference instead: its norm gradient is all cancellation.  Meta tensors give the shapes.
    """
    check_tensor("image_embeds", image_embeds, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("v_kv_weight", v_kv_weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("image_positions", image_positions, ndim=1, dtypes=INDEX_DTYPES)
    if norm_weight is not None:
        check_tensor("norm_weight", norm_weight, ndim=1, dtypes=FLOAT_DTYPES)
    if v_kv_bias is not None:
        check_tensor("v_kv_bias", v_kv_bias, ndim=1, dtypes=FLOAT_DTYPES)
    num_kv_heads = check_int("num_kv_heads", num_kv_heads, low=1)
    position_offset = check_int("position_offset (1 for gated/v1, 0 for joint/v2)", position_offset)
    check_float("rope_theta", rope_theta, low=1.0)
    check_float("eps", eps, low=0.0)
    N, T, Dm = image_embeds.shape
    C = v_kv_weight.shape[0]
    if v_kv_weight.shape[1] != Dm:
        raise ValueError(f"v_kv_weight must have shape (2*H_kv*D, Dm={Dm}), got {tuple(v_kv_weight.shape)}")
    if C % (2 * num_kv_heads) != 0 or (C // (2 * num_kv_heads)) % 2 != 0:
        raise ValueError(f"v_kv_weight.shape[0]={C} must be 2*num_kv_heads*D with an even head dim D "
                         f"(num_kv_heads={num_kv_heads})")
    D = C // (2 * num_kv_heads)
    if v_kv_bias is not None and tuple(v_kv_bias.shape) != (C,):
        raise ValueError(f"v_kv_bias must have shape ({C},), got {tuple(v_kv_bias.shape)}")
    if norm_weight is not None and tuple(norm_weight.shape) != (Dm,):
        raise ValueError(f"norm_weight must have shape ({Dm},), got {tuple(norm_weight.shape)}")
    if image_positions.shape[0] != N:
        raise ValueError(f"image_positions must have shape ({N},) (one per image), got {tuple(image_positions.shape)}")
    floats = [("image_embeds", image_embeds), ("norm_weight", norm_weight), ("v_kv_weight", v_kv_weight),
              ("v_kv_bias", v_kv_bias)]
    if autocast_dtype(image_embeds.device) is None:
        check_same_dtype(floats)  # (under autocast the projection casts, as F.linear does)
    check_same_device(floats + [("image_positions", image_positions)])
    meta = _is_meta(image_embeds)  # shapes only: the Triton path's ops run their fake kernels
    backend = "triton" if meta else resolve_backend(image_embeds.device, image_embeds.dtype)
    # Dm = 1 with a norm: RMSNorm of one channel is x / sqrt(x^2 + eps), whose gradient (~eps) is what is
    # left of two nearly equal terms; the folded form below takes their difference after a half-precision
    # GEMM backward, which cannot resolve it (relative errors of 2-3 in fp16/bf16), so the reference runs.
    if backend == "reference" or D not in TRITON_HEAD_DIMS or (norm_weight is not None and Dm == 1):
        from .reference import visual_kv_reference
        return visual_kv_reference(image_embeds, norm_weight, v_kv_weight, v_kv_bias, image_positions,
                                   num_kv_heads=num_kv_heads, rope_theta=rope_theta,
                                   position_offset=position_offset, eps=eps)
    from .reference import rope_inv_freq
    x = image_embeds.reshape(N * T, Dm)
    rstd = None
    weight = v_kv_weight
    if norm_weight is not None:
        # RMSNorm(x) @ W.T = rstd * (x @ (W * w).T): one fp32 reduction here, the scale in the kernel
        # (Dm = 0: the projection is 0 whatever rstd is, and rstd = rsqrt(0 / 0) would be NaN)
        if Dm > 0:
            rstd = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).square() / Dm + eps)
        weight = v_kv_weight * norm_weight
    y = torch.nn.functional.linear(x, weight)
    inv_freq = rope_inv_freq(D, float(rope_theta), image_embeds.device)
    k_vis, v_vis = visual_kv_rope_op(y, rstd, v_kv_bias, image_positions, inv_freq, T, num_kv_heads,
                                     position_offset)
    return k_vis.view(N, T, num_kv_heads, D), v_vis.view(N, T, num_kv_heads, D)


# =========================================================================== text RoPE for the module

def _text_rope_impl(x, positions, inv_freq, inverse):
    require_triton(x.device, x.dtype)
    return launch.rope(x, positions, inv_freq, inverse)


def _text_rope_fake(x, positions, inv_freq, inverse):
    return x.new_empty(x.shape)


rope_op = define_op("hyper_attention_rope", "(Tensor x, Tensor positions, Tensor inv_freq, bool inverse) -> Tensor",
                    _text_rope_impl, _text_rope_fake)


def _text_rope_setup_context(ctx, inputs, output):
    _, positions, inv_freq, inverse = inputs
    ctx.save_for_backward(positions, inv_freq)
    ctx.inverse = inverse


def _text_rope_backward(ctx, grad):
    positions, inv_freq = ctx.saved_tensors
    return rope_op(grad, positions, inv_freq, not ctx.inverse), None, None, None


torch.library.register_autograd("mmkernels::hyper_attention_rope", _text_rope_backward,
                                setup_context=_text_rope_setup_context)


def text_rope(x: torch.Tensor, position_ids: torch.Tensor, theta: float) -> torch.Tensor:
    """Qwen2 text RoPE of ``x [B, L, H, D]`` at ``position_ids [B, L]`` (rotate-half, float32, cast
    back): one Triton launch on the triton backend, :func:`reference.apply_rope` otherwise."""
    from .reference import apply_rope, rope_inv_freq

    D = x.shape[-1]
    backend = "triton" if _is_meta(x) else resolve_backend(x.device, x.dtype)
    if backend == "reference" or D not in TRITON_HEAD_DIMS:
        return apply_rope(x, position_ids[..., None], theta)
    return rope_op(x, position_ids, rope_inv_freq(D, float(theta), x.device), False)
