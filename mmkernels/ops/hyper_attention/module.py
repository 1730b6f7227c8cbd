"""``HyperAttention``: an mPLUG-Owl3 hyper layer's attention with fused kernels and a visual K/V cache."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..._utils import autocast_dtype
from ..._validation import check_float, check_int, check_tensor
from .function import INDEX_DTYPES, _check_offsets, hyper_attention, hyper_attention_varlen, text_rope, visual_kv
from .packing import cu_seqlens_from_starts, positions_from_cu_seqlens, sample_starts
from .reference import MODES, VISIBILITIES


@dataclass
class HyperAttentionCache:
    """What one hyper layer keeps between steps (returned by the module, never stored in it).

    ``k``, ``v``: ``[B, L, H_kv, D]`` text keys (RoPE'd) and values of every position so far;
    ``k_vis``, ``v_vis``: ``[N, T, H_kv, D]`` visual keys (MI-RoPE'd) and values, computed once at
    prefill; ``image_positions [N]`` and ``cu_images [B+1]`` the image layout.  The layout of a
    cache the module built was checked when it was built; one built or edited by hand is trusted by
    decode steps unless ``forward(..., check_metadata=True)``.
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

    def to_static(self, max_len: int, key_padding_mask: torch.Tensor | None = None) -> StaticHyperAttentionCache:
        """This cache copied into buffers of ``max_len`` text positions, for decode steps whose shapes
        and host work never change, so a step can be captured in a CUDA graph and replayed.

        ``key_padding_mask``: bool ``[B, seq_len]`` (True = keep), the prompt's mask when the prompt
        was padded; the decode tokens are always kept.  See :class:`StaticHyperAttentionCache`."""
        if isinstance(self, StaticHyperAttentionCache):
            raise TypeError("this cache is already static")
        B, L = self.k.shape[:2]
        max_len = check_int("max_len", max_len, low=max(L, 1))
        valid = torch.zeros(B, max_len, dtype=torch.bool, device=self.k.device)
        if key_padding_mask is None:
            valid[:, :L] = True
        else:
            check_tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,))
            if tuple(key_padding_mask.shape) != (B, L) or key_padding_mask.device != self.k.device:
                raise ValueError(f"key_padding_mask must be a bool [B={B}, seq_len={L}] tensor on {self.k.device} "
                                 f"(the prompt's mask), got {tuple(key_padding_mask.shape)} on "
                                 f"{key_padding_mask.device}")
            valid[:, :L] = key_padding_mask
        k, v = (t.new_zeros((B, max_len) + tuple(t.shape[2:])) for t in (self.k, self.v))
        k[:, :L], v[:, :L] = self.k, self.v
        return StaticHyperAttentionCache(k, v, self.k_vis, self.v_vis, self.image_positions, self.cu_images,
                                         length=torch.full((1,), L, dtype=torch.int64, device=self.k.device),
                                         valid=valid, filled=L)


@dataclass
class StaticHyperAttentionCache(HyperAttentionCache):
    """A :class:`HyperAttentionCache` in fixed buffers (made by :meth:`HyperAttentionCache.to_static`),
    for generation under ``torch.no_grad()`` / ``torch.inference_mode()``.

    ``k``, ``v`` are ``[B, max_len, H_kv, D]``, of which the first ``length`` positions are filled;
    ``valid [B, max_len]`` marks the keys a row may attend (the prompt's mask, then each decode
    token).  A decode step (one token per sample, no new images, no ``key_padding_mask``) writes its
    K/V at position ``length`` and advances ``length`` *in place*, on the device: the step's kernel
    launches, shapes and host work are the same every time, so it can be captured in a CUDA graph and
    replayed (update the captured ``hidden_states`` / ``position_ids`` tensors in place between
    replays).  The step attends over all ``max_len`` positions with the unfilled ones masked out, so
    ``max_len`` should be what the generation needs, not more.

    ``filled`` counts the eager steps on the host, so an eager step past ``max_len`` raises
    ``ValueError``; a replayed graph does not run Python, so a replay past ``max_len`` cannot raise:
    its output is NaN instead (checked on the device, without a host sync) and nothing is written."""
    length: torch.Tensor = None
    valid: torch.Tensor = None
    filled: int = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    @property
    def seq_len(self) -> int:
        """The filled positions (reads ``length`` from the device: a host sync)."""
        return int(self.length)


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
    past_key_value=None, use_cache=False, key_padding_mask=None, norm_weight=None, check_metadata=None)``:

    * ``hidden_states [B, L, hidden]`` and ``image_embeds [N, T, hidden]`` are already normalised by
      the decoder layer's ``input_layernorm`` (or pass its weight as ``norm_weight`` to normalise the
      images here);
    * ``position_ids [B, L]`` (or ``[1, L]``, ``[L]``: shared by the batch) text RoPE positions, any
      integer dtype; ``image_positions [N]`` the sequence index of each ``<|image|>`` token,
      ``cu_images [B+1]`` the per-sample image offsets (both only together with ``image_embeds``);
    * ``past_key_value``: a :class:`HyperAttentionCache` from an earlier call of this layer on the same
      batch (its visual K/V are reused, the producer is not run again); with ``image_embeds`` as well
      (a new turn with new images), only the new images go through the producer and are appended per
      sample (``image_positions``/``cu_images`` then describe the new images only).  The cache's
      shapes, dtype and device are checked; its image layout was checked when it was built, so decode
      steps skip the host-synchronising value checks;
    * a :class:`StaticHyperAttentionCache` (``cache.to_static(max_len)``) instead takes decode steps
      of one token in fixed buffers, updated in place and returned, with no host sync (CUDA graphs);
    * ``key_padding_mask``: bool ``[B, L_past + L]`` (True = keep) for the text keys;
    * ``check_metadata``: None (default) checks the values of a new image layout (prefill, new images:
      one host sync) and trusts the cached one on decode steps; True always checks, False never
      (see :func:`mmkernels.hyper_attention`).

    Packed samples (keyword-only ``packed``, ``cu_seqlens``, ``max_seqlen``): ``hidden_states [1, total,
    hidden]`` holds several samples one after the other, each attended on its own (causal within the
    sample, its rows see only its own earlier images), as :func:`mmkernels.hyper_attention_varlen` does:

    * ``cu_seqlens`` int ``[S+1]``: sample s is tokens ``cu_seqlens[s]:cu_seqlens[s+1]`` (may be empty);
      ``position_ids`` may then be None (each sample's positions from 0);
    * or ``packed=True`` without ``cu_seqlens``: the samples are read from ``position_ids`` ``[1, total]``
      (or ``[total]``) that restart at each sample, as transformers' ``DataCollatorWithFlattening``
      makes them (a sample starts wherever a position is not the previous one plus 1).  The offsets are
      derived on the device; the number of samples S is ``cu_images.shape[0] - 1`` when images are
      given, and is read from the device (one host sync) otherwise;
    * ``max_seqlen``: the longest sample's length, or any larger bound.  It sizes the kernels' grid:
      without it the bound is ``total`` (no host sync, but the grid then has about ``total / longest``
      times the programs it needs, the extra ones exiting at once), unless ``check_metadata`` reads the
      offsets anyway, which then gives the exact value;
    * images per sample: ``image_embeds [N, T, hidden]`` sample-major, ``image_positions`` in each
      sample's own coordinates, ``cu_images [S+1]``;
    * the text RoPE uses ``position_ids`` as given: pass each sample's own positions (restarting);
    * a packed forward keeps no cache: ``use_cache``, ``past_key_value`` and ``key_padding_mask`` raise
      ValueError (decode on padded ``[B, L]`` batches);
    * ``check_metadata`` None or True checks the packed layout's values (the number of samples, the
      offsets, the images inside their samples); False trusts them (no host sync when images are given).

    Returns ``(output [B, L, hidden], cache or None)`` (packed: ``([1, total, hidden], None)``).
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
        hidden_size, num_heads, num_kv_heads = (check_int(name, value, low=1) for name, value in (
            ("hidden_size", hidden_size), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)))
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        if head_dim is None:
            if hidden_size % num_heads != 0:
                raise ValueError(f"hidden_size={hidden_size} must be a multiple of num_heads={num_heads} when "
                                 "head_dim is not given")
            D = hidden_size // num_heads
        else:
            D = check_int("head_dim", head_dim, low=1)
        if D % 2 != 0:
            raise ValueError(f"the head dim must be even (RoPE rotates channel i with channel i + D/2), got "
                             f"head_dim={D}" + ("" if head_dim is not None else
                                                f" (hidden_size={hidden_size} / num_heads={num_heads})"))
        check_float("rope_theta", rope_theta, low=1.0)
        check_float("eps", eps, low=0.0)
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

    @staticmethod
    def _position_ids(position_ids, B: int, L: int, device) -> torch.Tensor:
        """``position_ids`` as ``[B, L]``: ``[L]`` and ``[1, L]`` are shared by every sample."""
        check_tensor("position_ids", position_ids)
        if position_ids.is_floating_point() or position_ids.is_complex() or position_ids.dtype == torch.bool:
            raise TypeError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
        if position_ids.device != device:
            raise ValueError(f"position_ids is on {position_ids.device} but hidden_states is on {device}")
        shape = tuple(position_ids.shape)
        if shape == (L,):
            return position_ids[None].expand(B, L)
        if shape == (1, L):
            return position_ids.expand(B, L)
        if shape != (B, L):
            raise ValueError(f"position_ids must have shape (B={B}, L={L}), (1, L) or (L,) to match hidden_states, "
                             f"got {shape}")
        return position_ids

    @staticmethod
    def _packed_position_ids(position_ids, total: int, device) -> torch.Tensor:
        """A packed row's ``position_ids`` (``[1, total]`` or ``[total]``) as ``[total]``."""
        check_tensor("position_ids", position_ids)
        if position_ids.is_floating_point() or position_ids.is_complex() or position_ids.dtype == torch.bool:
            raise TypeError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
        if position_ids.device != device:
            raise ValueError(f"position_ids is on {position_ids.device} but hidden_states is on {device}")
        if tuple(position_ids.shape) not in ((total,), (1, total)):
            raise ValueError(f"position_ids of a packed batch must have shape (1, total={total}) or (total,), "
                             f"got {tuple(position_ids.shape)}")
        return position_ids.reshape(total)

    @staticmethod
    def _count_samples(starts: torch.Tensor) -> tuple[int, int]:
        """``(number of samples, longest sample)`` of a packed row's sample starts (one host sync)."""
        if starts.shape[0] == 0:
            return 0, 0
        sample_of_token = torch.cumsum(starts, 0) - 1
        lengths = torch.zeros_like(sample_of_token).scatter_add_(0, sample_of_token, torch.ones_like(sample_of_token))
        found, longest = torch.stack([starts.sum(), lengths.max()]).tolist()
        return int(found), int(longest)

    def _packed_forward(self, hidden_states, position_ids, image_embeds, image_positions, cu_images, past_key_value,
                        use_cache, key_padding_mask, norm_weight, check_metadata, cu_seqlens, max_seqlen):
        """``forward`` on a packed row (see the class docstring): ``(output [1, total, hidden], None)``."""
        B, total, _ = hidden_states.shape
        H, Hkv, D = self.num_heads, self.num_key_value_heads, self.head_dim
        dev = hidden_states.device
        if B != 1:
            raise ValueError(f"a packed batch is one row holding every sample: hidden_states must have shape "
                             f"(1, total, hidden), got {tuple(hidden_states.shape)}")
        if past_key_value is not None or use_cache:
            raise ValueError("a packed forward keeps no cache (use_cache=True and past_key_value are not supported "
                             "with packed samples); decode on a padded [B, L] batch")
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask cannot be combined with packed samples: a packed row has no "
                             "padding (leave the padding tokens out of it)")
        if image_embeds is None and (image_positions is not None or cu_images is not None):
            raise ValueError("image_positions and cu_images describe image_embeds: pass image_embeds with them")
        if image_embeds is not None:
            if image_positions is None or cu_images is None:
                raise ValueError("image_embeds needs image_positions [N] and cu_images [S+1] (the images of each "
                                 "packed sample, positions in the sample's own coordinates)")
            check_tensor("cu_images", cu_images, ndim=1, dtypes=INDEX_DTYPES)
        if max_seqlen is not None:
            max_seqlen = check_int("max_seqlen", max_seqlen, low=0)
        check = True if check_metadata is None else bool(check_metadata)
        if cu_seqlens is not None:
            check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=INDEX_DTYPES)
            if cu_seqlens.shape[0] < 1 or cu_seqlens.device != dev:
                raise ValueError(f"cu_seqlens must be a [S+1] tensor of sample offsets on {dev}, got shape "
                                 f"{tuple(cu_seqlens.shape)} on {cu_seqlens.device}")
            S = cu_seqlens.shape[0] - 1
            if check and dev.type != "meta" and not torch.compiler.is_compiling():
                # named for this argument (the op checks them again as cu_seqlens_q/k)
                offsets = cu_seqlens.detach().to("cpu", torch.int64)
                _check_offsets("cu_seqlens", offsets, total, f"total={total} (hidden_states.shape[1])")
                longest = int(offsets.diff().max()) if S else 0
                if max_seqlen is not None and max_seqlen < longest:
                    raise ValueError(f"max_seqlen={max_seqlen} must be at least the longest sample's length, "
                                     f"{longest}")
                max_seqlen = longest if max_seqlen is None else max_seqlen
            if position_ids is None:      # each sample's own positions, from 0
                position_ids = positions_from_cu_seqlens(cu_seqlens, total)
            else:
                position_ids = self._packed_position_ids(position_ids, total, dev)
        else:
            if position_ids is None:
                raise ValueError("a packed batch needs cu_seqlens, or position_ids that restart at each sample")
            position_ids = self._packed_position_ids(position_ids, total, dev)
            starts = sample_starts(position_ids)
            S = None if cu_images is None else cu_images.shape[0] - 1   # the images fix it: no host sync
            if S is None and dev.type == "meta":
                raise ValueError("on the meta device the number of packed samples cannot be read from "
                                 "position_ids: pass cu_seqlens (or images with cu_images)")
            if S is None or (check and dev.type != "meta"):
                # the number of samples and the longest one, in one host sync
                found, longest = self._count_samples(starts)
                if S is not None and found != S:
                    raise ValueError(f"position_ids restart {found} time(s) (a sample starts wherever a position is "
                                     f"not the previous one plus 1) but cu_images has {S} samples "
                                     f"(shape {tuple(cu_images.shape)})")
                S = found
                if max_seqlen is None:
                    max_seqlen = longest
            cu_seqlens = cu_seqlens_from_starts(starts, S)
        if max_seqlen is None:
            max_seqlen = total                # a bound that needs no host sync (see the class docstring)
        q, k, v = self._qkv(hidden_states, position_ids[None], None)
        if image_embeds is not None:
            k_vis, v_vis = self.visual_kv(image_embeds, image_positions, norm_weight)
        else:
            k_vis = v_vis = q.new_zeros((0, 1, Hkv, D))
            image_positions = torch.zeros(0, dtype=torch.int32, device=dev)
            cu_images = torch.zeros(S + 1, dtype=torch.int32, device=dev)
        o = hyper_attention_varlen(q[0], k[0], v[0], k_vis, v_vis, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                   image_positions, cu_images, mode=self.mode,
                                   gate=self.gate.to(q.dtype) if self.mode == "gated" else None,
                                   visibility=self.visibility, check_metadata=check)
        return self.o_proj(o.reshape(1, total, H * D)), None

    def _check_cache(self, cache, B: int, hidden_states: torch.Tensor) -> None:
        """A cache from this layer for this batch: its text K/V and visual K/V shapes, dtype and device."""
        if not isinstance(cache, HyperAttentionCache):
            raise TypeError(f"past_key_value must be a HyperAttentionCache (returned with use_cache=True), "
                            f"got {type(cache).__name__}")
        Hkv, D = self.num_key_value_heads, self.head_dim
        for name in ("k", "v", "k_vis", "v_vis"):
            t = getattr(cache, name)
            check_tensor(f"past_key_value.{name}", t, ndim=4)
            if name in ("k", "v") and (t.shape[0] != B or tuple(t.shape[2:]) != (Hkv, D)):
                raise ValueError(f"past_key_value.{name} must have shape (B={B}, L_past, H_kv={Hkv}, D={D}) (a cache "
                                 f"of this layer for this batch), got {tuple(t.shape)}")
            if name in ("k_vis", "v_vis") and tuple(t.shape[2:]) != (Hkv, D):
                raise ValueError(f"past_key_value.{name} must have shape (N, T, H_kv={Hkv}, D={D}), "
                                 f"got {tuple(t.shape)}")
            if t.device != hidden_states.device:
                raise ValueError(f"past_key_value.{name} is on {t.device} but hidden_states is on "
                                 f"{hidden_states.device}")
        if cache.v.shape != cache.k.shape or cache.v_vis.shape != cache.k_vis.shape:
            raise ValueError(f"past_key_value: v {tuple(cache.v.shape)} / v_vis {tuple(cache.v_vis.shape)} must have "
                             f"the shapes of k {tuple(cache.k.shape)} / k_vis {tuple(cache.k_vis.shape)}")
        check_tensor("past_key_value.cu_images", cache.cu_images, ndim=1)
        check_tensor("past_key_value.image_positions", cache.image_positions, ndim=1)
        if cache.cu_images.shape[0] != B + 1 or cache.image_positions.shape[0] != cache.k_vis.shape[0]:
            raise ValueError(f"past_key_value's image layout must have cu_images of shape ({B + 1},) and one "
                             f"image_positions entry per cached image ({cache.k_vis.shape[0]}), got "
                             f"{tuple(cache.cu_images.shape)} and {tuple(cache.image_positions.shape)}")

    def _qkv(self, hidden_states, position_ids, cache):
        """``q [B, L, H, D]`` and ``k``, ``v [B, L, H_kv, D]`` of ``hidden_states`` (q, k rotated by the text
        RoPE at ``position_ids``); ``TypeError`` if ``cache`` holds K/V of another dtype."""
        B, L, _ = hidden_states.shape
        H, Hkv, D = self.num_heads, self.num_key_value_heads, self.head_dim
        q = text_rope(self.q_proj(hidden_states).view(B, L, H, D), position_ids, self.rope_theta)
        k = text_rope(self.k_proj(hidden_states).view(B, L, Hkv, D), position_ids, self.rope_theta)
        v = self.v_proj(hidden_states).view(B, L, Hkv, D)
        if cache is not None and (cache.k.dtype != k.dtype or cache.k_vis.dtype != k.dtype):
            raise TypeError(f"past_key_value holds {cache.k.dtype} text / {cache.k_vis.dtype} visual K/V but this "
                            f"step computes {k.dtype}")
        return q, k, v

    def _static_step(self, hidden_states, position_ids, cache: StaticHyperAttentionCache, image_embeds,
                     key_padding_mask, check_metadata):
        """One decode step on a static cache: write this token's K/V at ``cache.length``, attend over the
        whole buffer with the unfilled positions masked, advance ``cache.length``; no host sync and the
        same launches every step.  The row sits at the buffer's last position for the kernels, which
        changes nothing: every filled key precedes it, and every image of the prompt precedes it too."""
        B, L, _ = hidden_states.shape
        H, D = self.num_heads, self.head_dim
        if L != 1:
            raise ValueError(f"a static cache takes one token per sample per step (decode), got hidden_states with "
                             f"L={L}; run longer chunks through a growing cache, then convert it with to_static()")
        if image_embeds is not None or key_padding_mask is not None:
            raise ValueError("a static cache's decode step takes no image_embeds and no key_padding_mask (the "
                             "prompt's mask is kept in the cache; new images need a growing cache)")
        length, valid, dev = cache.length, cache.valid, hidden_states.device
        if not (isinstance(length, torch.Tensor) and isinstance(valid, torch.Tensor)
                and tuple(length.shape) == (1,) and length.dtype == torch.int64 and length.device == dev
                and tuple(valid.shape) == (B, cache.max_len) and valid.dtype == torch.bool and valid.device == dev):
            raise ValueError(f"past_key_value is a StaticHyperAttentionCache without a length (int64 [1]) and a valid "
                             f"(bool [B={B}, max_len={cache.max_len}]) on {dev} (make one with "
                             "HyperAttentionCache.to_static)")
        if torch.is_grad_enabled():
            # The step writes its K/V into the cache in place, and the attention reads the cache: with any
            # input of the attention requiring grad, autograd would save the buffers it later overwrites
            # (backward then fails with "modified by an inplace operation", possibly many steps later).
            attention_inputs = [("hidden_states", hidden_states)]
            attention_inputs += [(f"{proj}.{n}", p) for proj in ("q_proj", "k_proj", "v_proj")
                                 for n, p in getattr(self, proj).named_parameters()]
            if self.mode == "gated":
                attention_inputs.append(("gate", self.gate))
            attention_inputs += [(f"past_key_value.{n}", getattr(cache, n)) for n in ("k", "v", "k_vis", "v_vis")]
            grad = [name for name, t in attention_inputs if t.requires_grad]
            if grad:
                raise RuntimeError(f"a static cache is written in place, which autograd cannot differentiate "
                                   f"through, and {', '.join(grad)} require grad: run decode steps under "
                                   "torch.no_grad() or torch.inference_mode()")
        if cache.filled >= cache.max_len:
            raise ValueError(f"the static cache is full: max_len={cache.max_len} positions are filled")
        q, k, v = self._qkv(hidden_states, position_ids, cache)
        # Past the end (only a replayed graph gets here): write nothing, poison the output.
        full = cache.length >= cache.max_len
        at = cache.length.clamp(max=cache.max_len - 1)
        keep = torch.where(full, cache.k.index_select(1, at), k), torch.where(full, cache.v.index_select(1, at), v)
        cache.k.index_copy_(1, at, keep[0])
        cache.v.index_copy_(1, at, keep[1])
        cache.valid.index_fill_(1, at, True)
        o = hyper_attention(q, cache.k, cache.v, cache.k_vis, cache.v_vis, cache.image_positions, cache.cu_images,
                            mode=self.mode, gate=self.gate.to(q.dtype) if self.mode == "gated" else None,
                            visibility=self.visibility, key_padding_mask=cache.valid,
                            check_metadata=bool(check_metadata))
        out = self.o_proj(o.reshape(B, 1, H * D))
        out = out.masked_fill(full, float("nan"))
        cache.length.add_((~full).to(torch.int64))
        cache.filled += 1
        return out, cache

    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor | None,
                image_embeds: torch.Tensor | None = None, image_positions: torch.Tensor | None = None,
                cu_images: torch.Tensor | None = None, past_key_value: HyperAttentionCache | None = None,
                use_cache: bool = False, key_padding_mask: torch.Tensor | None = None,
                norm_weight: torch.Tensor | None = None, check_metadata: bool | None = None, *,
                packed: bool | None = None, cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None):
        check_tensor("hidden_states", hidden_states, ndim=3)
        B, L, hidden = hidden_states.shape
        H, Hkv, D = self.num_heads, self.num_key_value_heads, self.head_dim
        if hidden != self.hidden_size:
            raise ValueError(f"hidden_states must have shape (B, L, hidden_size={self.hidden_size}), "
                             f"got {tuple(hidden_states.shape)}")
        weight = self.q_proj.weight
        if hidden_states.device != weight.device:
            raise ValueError(f"hidden_states is on {hidden_states.device} but the layer's parameters are on "
                             f"{weight.device}")
        if hidden_states.dtype != weight.dtype and autocast_dtype(hidden_states.device) is None:
            raise TypeError(f"hidden_states has dtype {hidden_states.dtype} but the layer's parameters have "
                            f"{weight.dtype} (convert one, or run under torch.autocast)")
        if packed is None:
            packed = cu_seqlens is not None
        elif not isinstance(packed, bool):
            raise TypeError(f"packed must be a bool or None, got {type(packed).__name__}")
        if packed:
            return self._packed_forward(hidden_states, position_ids, image_embeds, image_positions, cu_images,
                                        past_key_value, use_cache, key_padding_mask, norm_weight, check_metadata,
                                        cu_seqlens, max_seqlen)
        if cu_seqlens is not None or max_seqlen is not None:
            raise ValueError("cu_seqlens and max_seqlen describe a packed batch: they cannot be combined with "
                             "packed=False")
        position_ids = self._position_ids(position_ids, B, L, hidden_states.device)
        if past_key_value is not None:
            self._check_cache(past_key_value, B, hidden_states)
        if isinstance(past_key_value, StaticHyperAttentionCache):
            return self._static_step(hidden_states, position_ids, past_key_value, image_embeds, key_padding_mask,
                                     check_metadata)
        if image_embeds is None and (image_positions is not None or cu_images is not None):
            raise ValueError("image_positions and cu_images describe image_embeds: pass image_embeds with them "
                             "(a cached layout is reused from past_key_value)")
        q, k, v = self._qkv(hidden_states, position_ids, past_key_value)
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
            k_vis = v_vis = q.new_zeros((0, 1, Hkv, D))   # q's dtype: the projections' (autocast's) one
            image_positions = torch.zeros(0, dtype=torch.int32, device=hidden_states.device)
            cu_images = torch.zeros(B + 1, dtype=torch.int32, device=hidden_states.device)
        # A cached layout was checked at prefill; decode steps skip the host-synchronising value checks
        # unless asked to (check_metadata=True, e.g. for a cache built or edited by hand).
        if check_metadata is None:
            check_metadata = past_key_value is None or image_embeds is not None
        o = hyper_attention(q, k, v, k_vis, v_vis, image_positions, cu_images, mode=self.mode,
                            gate=self.gate.to(q.dtype) if self.mode == "gated" else None, visibility=self.visibility,
                            key_padding_mask=key_padding_mask,
                            check_metadata=bool(check_metadata))
        out = self.o_proj(o.reshape(B, L, H * D))
        cache = HyperAttentionCache(k, v, k_vis, v_vis, image_positions, cu_images) if use_cache else None
        return out, cache
