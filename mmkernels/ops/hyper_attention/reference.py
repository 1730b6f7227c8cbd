"""Pure-PyTorch reference for mPLUG-Owl3's Hyper Attention (gated cross-attention with MI-RoPE).

What it reproduces (see ``/work/shared/research/hyper_attention.md`` sections 1 and 5): per sample
``b`` the text queries ``q [L_q, H, D]`` are the *last* ``L_q`` positions of the ``L_k`` text
keys, so query row ``i`` sits at absolute position ``t = L_k - L_q + i``.  The sample's images
``n = cu_images[b] .. cu_images[b+1]-1`` each carry ``T`` visual keys/values and the sequence index
``p_n`` of their ``<|image|>`` token.

* text attention: causal (key ``s <= t``) and, if given, ``key_padding_mask[b, s]`` (True = keep);
* visual attention: row ``t`` sees image ``n`` iff ``p_n < t`` (``"strict"``, mPLUG-Owl3
  240728/1B/2B) or ``p_n <= t`` (``"inclusive"``, 241101);
* ``mode="gated"`` (v1): ``out = o_text`` on rows that see no image, else
  ``(1 - sigmoid(g)) * o_text + sigmoid(g) * o_vis``;
* ``mode="joint"`` (v2): one softmax over the visible visual keys and the causal text keys.

The original code does this with dense boolean masks, ``repeat_kv`` and one SDPA call per sample; so
does this reference (it is the readable statement of the math, not a fast path).  A row with no
visible key at all (e.g. a padded query whose text keys are all masked and that sees no image) gets
a zero output and ``lse = -inf`` instead of SDPA's NaN.

Scores, softmax and accumulation run in float32 for half inputs and in the input dtype otherwise
(float64 for the tolerance references).  RoPE angles are always built in float32, exactly like the
original ``RotaryEmbedding(use_fp32=True)`` table, so a float64 reference rotates by the same angles
the kernels use.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("gated", "joint")
VISIBILITIES = ("strict", "inclusive")


# --------------------------------------------------------------------------- RoPE / RMSNorm

def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """``1 / theta ** (2i / D)`` for ``i < D/2``, float32 (the original's ``inv_freq``)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[*positions.shape, D]`` (rotate-half layout ``cat(freqs, freqs)``), float32."""
    inv_freq = rope_inv_freq(head_dim, theta, positions.device)
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate ``x [..., D]`` by ``positions`` (broadcast against ``x.shape[:-1]``), rotate-half
    convention, computed in float32 (float64 for float64 inputs) and cast back."""
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta)
    work = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(work)
    out = xf * cos.to(work) + rotate_half(xf) * sin.to(work)
    return out.to(x.dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Qwen2RMSNorm: normalise in float32 (float64 for float64), cast back, then multiply by the weight."""
    work = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(work)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


# --------------------------------------------------------------------------- visual K/V producer

def visual_kv_reference(image_embeds: torch.Tensor, norm_weight: torch.Tensor | None, v_kv_weight: torch.Tensor,
                        v_kv_bias: torch.Tensor | None, image_positions: torch.Tensor, *, num_kv_heads: int,
                        rope_theta: float, position_offset: int, eps: float = 1e-6
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm -> ``v_kv_proj`` -> split with the interleaved ``(kv_head, {K, V}, D)`` channel layout
    -> MI-RoPE on K at position ``image_positions[n] + position_offset`` for all T keys of image n.

    ``image_embeds [N, T, Dm]``; ``norm_weight [Dm]`` or None (already normalised);
    ``v_kv_weight [2*H_kv*D, Dm]``.  Returns ``(k_vis, v_vis)``, each ``[N, T, H_kv, D]``.
    """
    N, T, _ = image_embeds.shape
    D = v_kv_weight.shape[0] // (2 * num_kv_heads)
    h = image_embeds if norm_weight is None else rms_norm_reference(image_embeds, norm_weight, eps)
    kv = F.linear(h, v_kv_weight, v_kv_bias).view(N, T, num_kv_heads, 2, D)
    k, v = kv[..., 0, :], kv[..., 1, :]
    pos = (image_positions.to(torch.int64) + position_offset).view(N, 1, 1)
    return apply_rope(k, pos, rope_theta), v.contiguous()


# --------------------------------------------------------------------------- attention

def _masked_attention(q, k, v, mask, scale):
    """Softmax attention with a boolean mask; rows with no visible key give 0 and lse -inf.

    ``q [H, Lq, D]``, ``k, v [H, Lk, D]``, ``mask [Lq, Lk]``.  Returns ``(o [H, Lq, D], lse [H, Lq])``.
    """
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if k.shape[-2] == 0:  # no key at all (a sample without images): o = 0, lse = -inf.  Built from the
        # empty scores so q, k and v stay in the autograd graph with zero gradients, as on the kernels.
        return torch.matmul(s, v), s.sum(-1) + float("-inf")
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    has = l > 0
    o = torch.matmul(p, v) / torch.where(has, l, torch.ones_like(l))
    lse = torch.where(has, torch.log(torch.where(has, l, torch.ones_like(l))) + m, torch.full_like(l, float("-inf")))
    return o, lse.squeeze(-1)


def visible_image_counts(image_positions: torch.Tensor, cu_images: torch.Tensor, b: int, t: torch.Tensor,
                         visibility: str) -> torch.Tensor:
    """Number of sample ``b``'s images visible from absolute positions ``t`` (a prefix of its list)."""
    lo, hi = int(cu_images[b]), int(cu_images[b + 1])
    pos = image_positions[lo:hi].to(t.device, torch.int64)
    if visibility == "strict":
        return (pos[None, :] < t[:, None]).sum(1)
    return (pos[None, :] <= t[:, None]).sum(1)


def hyper_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_vis: torch.Tensor,
                              v_vis: torch.Tensor, image_positions: torch.Tensor, cu_images: torch.Tensor, *,
                              mode: str = "gated", gate: torch.Tensor | None = None, visibility: str = "strict",
                              key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
                              return_lse: bool = False):
    """Reference Hyper Attention; shapes as :func:`mmkernels.hyper_attention`.

    With ``return_lse`` also returns ``lse [S, B, H, L_q]`` (natural log; ``S = 2`` rows
    text/visual in gated mode, ``S = 1`` joint), -inf where a row has no visible key.
    """
    B, Lq, H, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    T = k_vis.shape[1]
    G = H // Hkv
    scale = D ** -0.5 if scale is None else scale
    work = torch.promote_types(q.dtype, torch.float32)
    t = torch.arange(Lk - Lq, Lk, device=q.device)
    s_idx = torch.arange(Lk, device=q.device)
    causal = s_idx[None, :] <= t[:, None]
    outs, lses = [], []
    if gate is not None and gate.dim() == 1 and gate.numel() == H * D:
        gate = gate.view(H, D)
    for b in range(B):
        qb = q[b].transpose(0, 1).to(work)                               # [H, Lq, D]
        kb = k[b].transpose(0, 1).to(work).repeat_interleave(G, 0)       # repeat_kv, as the original
        vb = v[b].transpose(0, 1).to(work).repeat_interleave(G, 0)
        tmask = causal if key_padding_mask is None else causal & key_padding_mask[b].to(torch.bool)[None, :]
        lo, hi = int(cu_images[b]), int(cu_images[b + 1])
        n_b = hi - lo
        counts = visible_image_counts(image_positions, cu_images, b, t, visibility)      # [Lq]
        kv_ = k_vis[lo:hi].reshape(n_b * T, Hkv, D).transpose(0, 1).to(work).repeat_interleave(G, 0)
        vv_ = v_vis[lo:hi].reshape(n_b * T, Hkv, D).transpose(0, 1).to(work).repeat_interleave(G, 0)
        img_of_key = torch.arange(n_b * T, device=q.device) // max(T, 1)
        vmask = img_of_key[None, :] < counts[:, None]                                    # [Lq, n_b*T]
        if mode == "joint":
            o, lse = _masked_attention(qb, torch.cat([kv_, kb], 1), torch.cat([vv_, vb], 1),
                                       torch.cat([vmask, tmask], 1), scale)
            lses.append(lse[None])
        else:
            o_t, lse_t = _masked_attention(qb, kb, vb, tmask, scale)
            o_v, lse_v = _masked_attention(qb, kv_, vv_, vmask, scale)
            g = gate.to(work).expand(B, Lq, H, D)[b].transpose(0, 1)                    # [H, Lq, D]
            sg = torch.sigmoid(g)
            mixed = (1 - sg) * o_t + sg * o_v
            o = torch.where((counts > 0)[None, :, None], mixed, o_t)
            lses.append(torch.stack([lse_t, lse_v]))
        outs.append(o.transpose(0, 1))
    if B:
        out = torch.stack(outs).to(q.dtype)
    else:  # an empty batch: still a function of every input (zero gradients), like the kernels
        out = q.new_zeros(q.shape)
        for x in (q, k, v, k_vis, v_vis, gate):
            if x is not None and x.requires_grad:
                out = out + x.reshape(-1)[:0].sum().to(q.dtype)
    if return_lse:
        S = 1 if mode == "joint" else 2
        lse = torch.stack(lses, 1) if B else q.new_empty((S, 0, H, Lq), dtype=torch.float32)
        return out, lse
    return out


def hyper_attention_varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_vis: torch.Tensor,
                                     v_vis: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                                     max_seqlen_q: int, max_seqlen_k: int, image_positions: torch.Tensor,
                                     cu_images: torch.Tensor, *, mode: str = "gated", gate: torch.Tensor | None = None,
                                     visibility: str = "strict", scale: float | None = None) -> torch.Tensor:
    """Reference of :func:`mmkernels.hyper_attention_varlen` (packed samples, shapes as there): each
    sample ``s`` run on its own through :func:`hyper_attention_reference`.

    Its queries ``q[cu_seqlens_q[s]:cu_seqlens_q[s+1]]`` are the last rows of its keys
    ``k[cu_seqlens_k[s]:cu_seqlens_k[s+1]]``, its images ``cu_images[s]:cu_images[s+1]`` with their
    positions in the sample's own coordinates; the gate (a ``[H*D]`` vector or broadcastable to
    ``[total_q, H, D]``) is taken at the sample's rows.  ``max_seqlen_*`` are accepted for the same
    signature and not needed here.  Returns ``[total_q, H, D]``.
    """
    total_q, H, D = q.shape
    if gate is not None:
        gate = gate.view(H, D) if (gate.dim() == 1 and gate.numel() == H * D) else gate
        gate = gate.expand(total_q, H, D)
    cq, ck, ci = (x.detach().to("cpu", torch.int64).tolist() for x in (cu_seqlens_q, cu_seqlens_k, cu_images))
    outs = []
    for s in range(len(cq) - 1):
        rows, keys, imgs = slice(cq[s], cq[s + 1]), slice(ck[s], ck[s + 1]), slice(ci[s], ci[s + 1])
        cu = torch.tensor([0, ci[s + 1] - ci[s]], dtype=torch.int64)
        outs.append(hyper_attention_reference(
            q[None, rows], k[None, keys], v[None, keys], k_vis[imgs], v_vis[imgs], image_positions[imgs], cu,
            mode=mode, gate=None if gate is None else gate[None, rows], visibility=visibility, scale=scale)[0])
    out = torch.cat(outs) if outs else q.new_zeros(q.shape)
    # every floating input stays in the graph (zero gradients where it cannot matter), as on the kernels
    for x in (q, k, v, k_vis, v_vis, gate):
        if x is not None and x.requires_grad:
            out = out + x.reshape(-1)[:0].sum().to(out.dtype)
    return out
