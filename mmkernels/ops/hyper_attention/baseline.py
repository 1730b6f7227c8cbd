"""mPLUG-Owl3-style baseline (benchmarks and tests): Hyper Attention run the way its public code
does, written from the description in ``research/hyper_attention.md`` section 1 (not copied):

* text self-attention with ``repeat_kv`` materialised and a dense boolean causal mask (SDPA);
* a Python loop over the samples; per sample with images: ``v_kv_proj`` over the sample's images,
  K/V split with the ``(kv_head, {K, V}, D)`` channel layout, MI-RoPE on K at ``p + 1`` (gated, v1)
  or ``p`` (joint, v2), ``repeat_kv`` again, a dense ``[L, n*T]`` image-visibility mask and one
  SDPA call (v1: separate cross-attention on the rows from the first one that sees an image, mixed
  with the static gate; v2: one SDPA over ``cat([visual K ; text K])``);
* at every decoding step the producer is run again for all images (no visual K/V cache); only the
  text K/V are cached, passed explicitly (no module-level mutable state).

Parameter names match :class:`mmkernels.HyperAttention` (and mPLUG-Owl3), so the two load each
other's ``state_dict``.  RoPE tables are float32 (the original's text path casts cos/sin to the
activation dtype first; that difference is below the bf16 resolution of the comparison).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .reference import apply_rope


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, H_kv, L, D] -> [B, H_kv*n_rep, L, D]`` materialised (what the original does)."""
    if n_rep == 1:
        return x
    B, Hkv, L, D = x.shape
    return x[:, :, None].expand(B, Hkv, n_rep, L, D).reshape(B, Hkv * n_rep, L, D)


class Owl3HyperAttentionBaseline(nn.Module):
    def __init__(self, hidden_size, num_heads, num_kv_heads, head_dim=None, rope_theta=1e6, mode="gated",
                 device=None, dtype=None):
        super().__init__()
        D = head_dim or hidden_size // num_heads
        self.num_heads, self.num_key_value_heads, self.head_dim = num_heads, num_kv_heads, D
        self.rope_theta, self.mode = rope_theta, mode
        kw = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(hidden_size, num_heads * D, bias=True, **kw)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * D, bias=True, **kw)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * D, bias=True, **kw)
        self.o_proj = nn.Linear(num_heads * D, hidden_size, bias=False, **kw)
        self.v_kv_proj = nn.Linear(hidden_size, 2 * num_kv_heads * D, bias=True, **kw)
        if mode == "gated":
            self.gate = nn.Parameter(torch.zeros(num_heads * D, **kw))

    def _visual(self, img):
        """Producer for one sample's images ``[n, T, hidden]`` -> K, V ``[1, H_kv, n*T, D]`` (no RoPE yet)."""
        n, T, _ = img.shape
        kv = self.v_kv_proj(img).view(n * T, self.num_key_value_heads, 2, self.head_dim)
        k, v = kv[:, :, 0].transpose(0, 1)[None], kv[:, :, 1].transpose(0, 1)[None]
        return k, v

    def forward(self, hidden_states, position_ids, image_embeds=None, media_offset=None, past_key_value=None,
                use_cache=False):
        """``media_offset``: list (per sample) of the ``<|image|>`` sequence indices; the images of all
        samples are concatenated in ``image_embeds`` in that order.  ``past_key_value``: ``(k, v)``
        text cache ``[B, H_kv, L_past, D]``."""
        B, L, _ = hidden_states.shape
        H, Hkv, D = self.num_heads, self.num_key_value_heads, self.head_dim
        G = H // Hkv
        q = apply_rope(self.q_proj(hidden_states).view(B, L, H, D), position_ids[..., None], self.rope_theta)
        k = apply_rope(self.k_proj(hidden_states).view(B, L, Hkv, D), position_ids[..., None], self.rope_theta)
        v = self.v_proj(hidden_states).view(B, L, Hkv, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if past_key_value is not None:
            k = torch.cat([past_key_value[0], k], 2)
            v = torch.cat([past_key_value[1], v], 2)
        Lk = k.shape[2]
        t = torch.arange(Lk - L, Lk, device=q.device)
        causal = torch.arange(Lk, device=q.device)[None, :] <= t[:, None]
        kr, vr = repeat_kv(k, G), repeat_kv(v, G)
        ctx_self = F.scaled_dot_product_attention(q, kr, vr, attn_mask=causal)          # [B, H, L, D]
        outs = []
        img_start = 0
        for b in range(B):
            offs = media_offset[b] if media_offset is not None else []
            n = len(offs)
            if n == 0 or image_embeds is None:
                outs.append(ctx_self[b])
                continue
            img = image_embeds[img_start:img_start + n]
            img_start += n
            T = img.shape[1]
            kv_, vv_ = self._visual(img)                                                  # recomputed every call
            p = torch.as_tensor(offs, device=q.device)
            rope_pos = (p + (1 if self.mode == "gated" else 0)).repeat_interleave(T)
            kv_ = apply_rope(kv_, rope_pos[None, None, :], self.rope_theta)
            kv_, vv_ = repeat_kv(kv_, G), repeat_kv(vv_, G)
            if self.mode == "gated":
                c = (p[None, :] < t[:, None]).sum(1)                                     # images seen per row
                rows = torch.nonzero(c > 0).flatten()
                ctx = ctx_self[b].clone()
                if rows.numel():
                    shift = int(rows[0])
                    t2v = torch.arange(n * T, device=q.device)[None, :] // T < c[shift:, None]
                    cross = F.scaled_dot_product_attention(q[b:b + 1, :, shift:], kv_, vv_, attn_mask=t2v)[0]
                    sg = torch.sigmoid(self.gate).view(H, 1, D)
                    ctx[:, shift:] = ctx_self[b, :, shift:] * (1 - sg) + cross * sg
                outs.append(ctx)
            else:
                c = (p[None, :] <= t[:, None]).sum(1)
                t2v = torch.arange(n * T, device=q.device)[None, :] // T < c[:, None]
                mask = torch.cat([t2v, causal], 1)
                o = F.scaled_dot_product_attention(q[b:b + 1], torch.cat([kv_, kr[b:b + 1]], 2),
                                                   torch.cat([vv_, vr[b:b + 1]], 2), attn_mask=mask)[0]
                outs.append(o)
        ctx = torch.stack(outs).transpose(1, 2).reshape(B, L, H * D)
        return self.o_proj(ctx), ((k, v) if use_cache else None)
