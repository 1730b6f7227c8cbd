"""``HyperAttention``: an mPLUG-Owl3 hyper layer's attention with fused kernels and a visual K/V cache."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .function import hyper_attention, text_rope, visual_kv
from .reference import MODES, VISIBILITIES


@dataclass
class HyperAttentionCache:
    """What one hyper layer keeps between steps (returned by the module, never stored in it).

    ``k``, ``v``: ``[B, L, H_kv, D]`` text keys (RoPE'd) and values of every position so far;
    ``k_vis``, ``v_vis``: ``[N, T, H_kv, D]`` visual keys (MI-RoPE'd) and values, computed once at
    prefill; ``image_positions [N]`` and ``cu_images [B+1]`` the image layout.
    """
    k: torch.Tensor
    v: torch.Tensor
    k_vis: torch.Tensor
    v_vis: torch.Tensor
    image_positions: torch.Tensor
    cu_images: torch.Tensor

    @property
    def seq_len(self) -> int:
        return self.k.shape[1]


def append_images(cache: HyperAttentionCache, k_new: torch.Tensor, v_new: torch.Tensor, positions_new: torch.Tensor,
                  cu_new: torch.Tensor):
    """Merge a cache's images with new ones (``cu_new [B+1]`` per-sample offsets of the new images),
    keeping the sample-major order: sample b's old images, then its new ones.  No host sync."""
    if cache.k_vis.shape[0] and tuple(cache.k_vis.shape[1:]) != tuple(k_new.shape[1:]):
        raise ValueError(f"new images must have the cached images' [T, H_kv, D] = {tuple(cache.k_vis.shape[1:])}, "
                         f"got {tuple(k_new.shape[1:])}")
    if cu_new.shape != cache.cu_images.shape:
        raise ValueError(f"cu_images must have shape {tuple(cache.cu_images.shape)} (B+1), got {tuple(cu_new.shape)}")
    dev = k_new.device
    cu_old, cu_n = cache.cu_images.to(torch.int64), cu_new.to(torch.int64)
    n_old, n_new = cache.k_vis.shape[0], k_new.shape[0]
    old_idx = torch.arange(n_old, device=dev)
    new_idx = torch.arange(n_new, device=dev)
    dst_old = old_idx + cu_n[torch.searchsorted(cu_old[1:], old_idx, right=True)]
    dst_new = new_idx + cu_old[torch.searchsorted(cu_n[1:], new_idx, right=True) + 1]
    merged = []
    for old, new in ((cache.k_vis, k_new), (cache.v_vis, v_new),
                     (cache.image_positions.to(positions_new.dtype), positions_new)):
        out = new.new_empty((n_old + n_new,) + tuple(new.shape[1:]))
        out[dst_old] = old
        out[dst_new] = new
        merged.append(out)
    return merged[0], merged[1], merged[2], (cu_old + cu_n).to(cache.cu_images.dtype)


class HyperAttention(nn.Module):
    """The attention of an mPLUG-Owl3 hyper layer (``HyperQwen2*Attention``) on the fused kernels.

    Parameters carry mPLUG-Owl3's names so a hyper layer's ``self_attn`` weights load unchanged:
    ``q_proj``, ``k_proj``, ``v_proj`` (Qwen2: with bias), ``o_proj`` (no bias), ``v_kv_proj``
    (``Linear(hidden, 2*H_kv*D, bias=True)``, channels ``(kv_head, {K, V}, D)``) and, in gated mode,
    ``gate`` (``[H*D]``, zeros at init).

    ``mode="gated"`` (v1: 240728/1B/2B; MI-RoPE at ``p+1``, default ``visibility="strict"``) or
    ``mode="joint"`` (v2: 241101; MI-RoPE at ``p``, default ``visibility="inclusive"``).

    ``forward(hidden_states, position_ids, image_embeds=None, image_positions=None, cu_images=None,
    past_key_value=None, use_cache=False, key_padding_mask=None, norm_weight=None)``:

    * ``hidden_states [B, L, hidden]`` and ``image_embeds [N, T, hidden]`` are already normalised by
      the decoder layer's ``input_layernorm`` (or pass its weight as ``norm_weight`` to normalise the
      images here);
    * ``position_ids [B, L]`` text RoPE positions; ``image_positions [N]`` the sequence index of each
      ``<|image|>`` token, ``cu_images [B+1]`` the per-sample image offsets;
    * ``past_key_value``: a :class:`HyperAttentionCache` from an earlier call (its visual K/V are
      reused, the producer is not run again); with ``image_embeds`` as well (a new turn with new
      images), only the new images go through the producer and are appended per sample
      (``image_positions``/``cu_images`` then describe the new images only);
    * ``key_padding_mask``: bool ``[B, L_past + L]`` (True = keep) for the text keys.

    Returns ``(output [B, L, hidden], cache or None)``.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int | None = None,
                 rope_theta: float = 1e6, mode: str = "gated", visibility: str | None = None, eps: float = 1e-6,
                 device=None, dtype=None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        visibility = visibility or ("strict" if mode == "gated" else "inclusive")
        if visibility not in VISIBILITIES:
            raise ValueError(f"visibility must be one of {VISIBILITIES}, got {visibility!r}")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        D = head_dim or hidden_size // num_heads
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, D
        self.num_key_value_heads = num_kv_heads
        self.rope_theta, self.mode, self.visibility, self.eps = float(rope_theta), mode, visibility, eps
        self.position_offset = 1 if mode == "gated" else 0
        kw = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(hidden_size, num_heads * D, bias=True, **kw)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * D, bias=True, **kw)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * D, bias=True, **kw)
        self.o_proj = nn.Linear(num_heads * D, hidden_size, bias=False, **kw)
        self.v_kv_proj = nn.Linear(hidden_size, 2 * num_kv_heads * D, bias=True, **kw)
        if mode == "gated":
            self.gate = nn.Parameter(torch.zeros(num_heads * D, **kw))

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, heads={self.num_heads}, kv_heads={self.num_key_value_heads}, "
                f"head_dim={self.head_dim}, mode={self.mode}, visibility={self.visibility}")

    def visual_kv(self, image_embeds: torch.Tensor, image_positions: torch.Tensor,
                  norm_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's visual K/V of ``image_embeds [N, T, hidden]`` (the producer, run once per image)."""
        return visual_kv(image_embeds, norm_weight, self.v_kv_proj.weight, self.v_kv_proj.bias, image_positions,
                         num_kv_heads=self.num_key_value_heads, rope_theta=self.rope_theta,
                         position_offset=self.position_offset, eps=self.eps)

    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor, image_embeds: torch.Tensor | None = None,
                image_positions: torch.Tensor | None = None, cu_images: torch.Tensor | None = None,
                past_key_value: HyperAttentionCache | None = None, use_cache: bool = False,
                key_padding_mask: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None):
        B, L, _ = hidden_states.shape
        H, Hkv, D = self.num_heads, self.num_key_value_heads, self.head_dim
        if position_ids.dim() == 1:
            position_ids = position_ids[None].expand(B, L)
        q = text_rope(self.q_proj(hidden_states).view(B, L, H, D), position_ids, self.rope_theta)
        k = text_rope(self.k_proj(hidden_states).view(B, L, Hkv, D), position_ids, self.rope_theta)
        v = self.v_proj(hidden_states).view(B, L, Hkv, D)
        if past_key_value is not None:
            k = torch.cat([past_key_value.k, k], 1)
            v = torch.cat([past_key_value.v, v], 1)
            if image_embeds is not None:  # a new turn brings new images: append them per sample
                if image_positions is None or cu_images is None:
                    raise ValueError("image_embeds needs image_positions [N] and cu_images [B+1]")
                k_new, v_new = self.visual_kv(image_embeds, image_positions, norm_weight)
                k_vis, v_vis, image_positions, cu_images = append_images(past_key_value, k_new, v_new,
                                                                         image_positions, cu_images)
            else:
                k_vis, v_vis = past_key_value.k_vis, past_key_value.v_vis
                image_positions, cu_images = past_key_value.image_positions, past_key_value.cu_images
        elif image_embeds is not None:
            if image_positions is None or cu_images is None:
                raise ValueError("image_embeds needs image_positions [N] and cu_images [B+1]")
            k_vis, v_vis = self.visual_kv(image_embeds, image_positions, norm_weight)
        else:
            k_vis = v_vis = hidden_states.new_zeros((0, 1, Hkv, D))
            image_positions = torch.zeros(0, dtype=torch.int32, device=hidden_states.device)
            cu_images = torch.zeros(B + 1, dtype=torch.int32, device=hidden_states.device)
        # A cached layout was checked at prefill; decode steps skip the host-synchronising value checks.
        o = hyper_attention(q, k, v, k_vis, v_vis, image_positions, cu_images, mode=self.mode,
                            gate=self.gate if self.mode == "gated" else None, visibility=self.visibility,
                            key_padding_mask=key_padding_mask,
                            check_metadata=past_key_value is None or image_embeds is not None)
        out = self.o_proj(o.reshape(B, L, H * D))
        cache = HyperAttentionCache(k, v, k_vis, v_vis, image_positions, cu_images) if use_cache else None
        return out, cache
