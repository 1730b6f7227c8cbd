"""A tiny faithful mirror of mPLUG-Owl3's HyperQwen2 language model (``modeling_hyper_qwen2.py``).

Written from the public code's semantics as recorded in ``shared/research/hyper_attention.md``
(sections 1 and 5), on transformers' own Qwen2 classes, so the wiring (``Qwen2Model``'s masks, RoPE
tables, ``Cache`` objects, ``generate``) is the real one.  What it mirrors:

* hyper layers are those with ``(layer_idx + 1) in config.hyper_layers`` (1-indexed);
* the decoder layer normalises ``image_embeds`` with the *same* ``input_layernorm`` as the text and
  hands ``image_embeds`` / ``media_offset`` to its attention only in hyper layers;
* ``HyperQwen2Attention.forward(hidden_states, attention_mask, position_ids, image_embeds, media_offset,
  past_key_value, output_attentions, use_cache)`` returns ``(out, attn_weights, past_key_value)``;
  its ``v_kv_proj`` has output channels ``(kv_head, {K, V}, D)``;
* v1 (``config.hyper_version = "v1"``: 240728 / 1B / 2B): causal self-attention, then a separate
  cross-attention to this sample's images with a ``[B, L, 2]`` ``media_offset`` (row t sees image j
  iff the image's ``<|image|>`` token is before t), MI-RoPE at ``idx + 1``, mixed with a static
  per-channel ``gate``: ``ctx * (1 - sigmoid(g)) + cross * sigmoid(g)`` from the first row that sees
  an image on; a sample whose ``media_offset[..., 1]`` is negative has no images; a one-token step
  sees all images of the sample, with the positions kept from the prompt (``visual_cache``);
* v2 (``"v2"``: 241101): ``media_offset`` is a list of per-sample ``<|image|>`` token indices, one
  softmax over ``[visual ; text]`` keys with MI-RoPE at ``idx``, row i sees image j iff
  ``i >= idx_j``, text part ``tril(q_len, kv_len)`` (top-left, as the original), a one-token step sees
  everything; the padding mask is ignored on this path (as the original); samples without images take
  plain causal attention.  (Where another sample of the batch has images, the original gives such a
  sample the same top-left ``tril(q_len, kv_len)``, which on a one-token decode step lets it see key 0
  only; mmkernels deliberately does not reproduce that.  ``config.hyper_top_left_tril = True`` makes the
  mirror do what the original does there, for the test that pins the choice.)

Like the original it recomputes ``v_kv_proj`` and MI-RoPE of every image at every step.
Attention is computed with an explicit float32 softmax in which a row with no visible key gives 0
(SDPA would give NaN there), so padded rows compare cleanly.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import (Qwen2Attention, Qwen2DecoderLayer, Qwen2ForCausalLM,
                                                      Qwen2Model)


def make_config(version: str = "v1", *, layers: int = 2, hyper_layers=(2,), hidden: int = 64, heads: int = 4,
                kv_heads: int = 2, vocab: int = 61, attn: str = "sdpa", **kw) -> Qwen2Config:
    """A tiny HyperQwen2 config (head dim ``hidden // heads`` = 16: a Triton head dim)."""
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden - 6,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, hyper_layers=list(hyper_layers), hyper_version=version, **kw)
    cfg._attn_implementation = attn
    return cfg


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _mi_rope(k, positions, theta):
    """MI-RoPE: rotate every key of image n (``k [n, T, Hkv, D]``) by ``positions[n]``, in float32
    with the ``cat(freqs, freqs)`` table, cast back (the original's ``RotaryEmbedding(use_fp32=True)``)."""
    D = k.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float32, device=k.device) / D))
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None]
    emb = torch.cat((freqs, freqs), -1)[:, None, None, :]
    work = torch.promote_types(k.dtype, torch.float32)      # float32 (float64 for a float64 model)
    kf = k.to(work)
    return (kf * emb.cos().to(work) + _rotate_half(kf) * emb.sin().to(work)).to(k.dtype)


def _attend(q, k, v, mask, scale):
    """``q [H, Lq, D]``, ``k, v [H, Lk, D]``, bool ``mask [Lq, Lk]`` (True = attend) or None; float32
    (float64 for a float64 model) softmax, a row with no visible key gives 0.  Returns ``[Lq, H*D]``."""
    work = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q.to(work), k.to(work).transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    den = p.sum(-1, keepdim=True)
    o = torch.matmul(p, v.to(work)) / torch.where(den > 0, den, torch.ones_like(den))
    return o.transpose(0, 1).reshape(q.shape[1], -1).to(q.dtype)


def _repeat(x, groups):   # repeat_kv on [Hkv, S, D]
    return x.repeat_interleave(groups, 0)


class HyperQwen2Attention(Qwen2Attention):
    """mPLUG-Owl3's hyper attention (v1 gated or v2 joint) on transformers' ``Qwen2Attention``."""

    def __init__(self, config, layer_idx, is_hyper_enabled=False):
        super().__init__(config, layer_idx)
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.rope_theta = config.rope_parameters["rope_theta"]
        self.version = config.hyper_version
        self.is_hyper_enabled = is_hyper_enabled
        if is_hyper_enabled:
            self.v_kv_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim * 2, bias=True)
            if self.version == "v1":
                self.gate = nn.Parameter(torch.zeros(self.num_heads * self.head_dim))
            self.visual_cache = {}
        self.top_left_tril = bool(getattr(config, "hyper_top_left_tril", False))

    # ----------------------------------------------------------------- masks
    @staticmethod
    def _text_mask(attention_mask, B, L, Lk, device):
        """bool ``[B, L, Lk]``, True = attend: the model's 4-D mask, or causal (queries last) + a 2-D padding mask."""
        causal = (torch.arange(Lk, device=device)[None, :] <= torch.arange(Lk - L, Lk, device=device)[:, None])
        if attention_mask is None:
            return causal.expand(B, L, Lk)
        if attention_mask.dim() == 2:
            return causal[None] & attention_mask[:, -Lk:].bool()[:, None, :]
        m = attention_mask[:, 0, :, :Lk]
        return m if m.dtype == torch.bool else (m == 0)

    def _kv(self, images):
        """``v_kv_proj`` split with the ``(kv_head, {K, V}, D)`` channel layout -> ``[n, T, Hkv, D]`` each."""
        n, T, _ = images.shape
        kv = self.v_kv_proj(images).view(n, T, self.num_key_value_heads, 2, self.head_dim)
        return kv[..., 0, :], kv[..., 1, :]

    # ----------------------------------------------------------------- v1
    def _cross_v1(self, q, image_embeds, media_offset, ctx):
        """q ``[B, H, L, D]`` (RoPE'd), ctx ``[B, L, H*D]`` the self-attention output."""
        B, H, L, D = q.shape
        T = image_embeds.shape[1]
        G = H // self.num_key_value_heads
        if L == 1:                       # generation: every image of the sample is visible
            mo = media_offset[:, -1:]
        else:
            mo = media_offset
            self.visual_cache["media_offset"] = media_offset
        assert mo.shape[1] == L, (mo.shape, L)
        k_all, v_all = self._kv(image_embeds)
        gate = torch.sigmoid(self.gate)
        out = ctx.clone()
        for b in range(B):
            if bool((mo[b, :, 1] < 0).any()):
                continue                 # a sample without images: pure self-attention
            first, last = (int(x) for x in mo[b, -1])
            n = last - first
            prompt_c = self.visual_cache["media_offset"][b, :, 1] - first
            pos = (prompt_c[1:] - prompt_c[:-1]).nonzero().squeeze(1) + 1      # idx_j + 1
            assert pos.numel() == n, (pos, n)
            kb = _mi_rope(k_all[first:last], pos, self.rope_theta).reshape(n * T, -1, D).transpose(0, 1)
            vb = v_all[first:last].reshape(n * T, -1, D).transpose(0, 1)
            if L == 1:
                shift, mask = 0, None
            else:
                c = mo[b, :, 1] - first
                shift = int(c.nonzero()[0])
                img_of_key = torch.arange(n * T, device=q.device) // T
                mask = img_of_key[None, :] < c[shift:, None]
            o = _attend(q[b, :, shift:], _repeat(kb, G), _repeat(vb, G), mask, self.scaling)
            out[b, shift:] = ctx[b, shift:] * (1 - gate) + o * gate
        return out

    # ----------------------------------------------------------------- v2
    def _joint_v2(self, q, k, v, image_embeds, media_offset):
        B, H, L, D = q.shape
        Lk = k.shape[2]
        T = image_embeds.shape[1]
        G = H // self.num_key_value_heads
        k_all, v_all = self._kv(image_embeds)
        start, outs = 0, []
        causal = torch.arange(Lk, device=q.device)[None, :] <= torch.arange(Lk - L, Lk, device=q.device)[:, None]
        for b, starts in enumerate(media_offset):
            starts = torch.as_tensor(starts, device=q.device).long()
            n = starts.numel()
            if n == 0:
                text = torch.ones(L, Lk, dtype=torch.bool, device=q.device).tril() if self.top_left_tril else causal
                outs.append(_attend(q[b], _repeat(k[b], G), _repeat(v[b], G), text, self.scaling))
                continue
            if L == 1:
                mask = None
            else:
                t2v = (torch.arange(L, device=q.device)[:, None] >= starts[None, :]).repeat_interleave(T, 1)
                mask = torch.cat([t2v, torch.ones(L, Lk, dtype=torch.bool, device=q.device).tril()], 1)
            kb = _mi_rope(k_all[start:start + n], starts, self.rope_theta).reshape(n * T, -1, D).transpose(0, 1)
            vb = v_all[start:start + n].reshape(n * T, -1, D).transpose(0, 1)
            start += n
            kk = torch.cat([_repeat(kb, G), _repeat(k[b], G)], 1)
            vv = torch.cat([_repeat(vb, G), _repeat(v[b], G)], 1)
            outs.append(_attend(q[b], kk, vv, mask, self.scaling))
        return torch.stack(outs)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, image_embeds=None, media_offset=None,
                past_key_value=None, output_attentions=False, use_cache=False, position_embeddings=None, **kwargs):
        B, L, _ = hidden_states.shape
        H, Hkv, D = self.num_heads, self.num_key_value_heads, self.head_dim
        q = self.q_proj(hidden_states).view(B, L, H, D).transpose(1, 2)
        k = self.k_proj(hidden_states).view(B, L, Hkv, D).transpose(1, 2)
        v = self.v_proj(hidden_states).view(B, L, Hkv, D).transpose(1, 2)
        cos, sin = position_embeddings
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if past_key_value is not None:
            k, v = past_key_value.update(k, v, self.layer_idx, {"sin": sin, "cos": cos})
        Lk = k.shape[2]
        G = H // Hkv
        if self.is_hyper_enabled and image_embeds is not None and self.version == "v2":
            ctx = self._joint_v2(q, k, v, image_embeds, media_offset)
        else:
            mask = self._text_mask(attention_mask, B, L, Lk, hidden_states.device)
            ctx = torch.stack([_attend(q[b], _repeat(k[b], G), _repeat(v[b], G), mask[b], self.scaling)
                               for b in range(B)])
            if self.is_hyper_enabled and image_embeds is not None:
                ctx = self._cross_v1(q, image_embeds, media_offset, ctx)
        return self.o_proj(ctx), None, past_key_value


class HyperQwen2DecoderLayer(Qwen2DecoderLayer):
    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.is_hyper_enabled = (layer_idx + 1) in config.hyper_layers
        self.self_attn = HyperQwen2Attention(config, layer_idx, is_hyper_enabled=self.is_hyper_enabled)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, image_embeds=None, media_offset=None, cache=None, **kwargs):
        cache = cache if cache is not None else past_key_values     # transformers 5.24 / 5.17 names
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        if image_embeds is not None and self.is_hyper_enabled:     # shared LayerNorm
            image_embeds = self.input_layernorm(image_embeds)
        else:
            image_embeds = media_offset = None
        # transformers' varlen keyword arguments of a packed batch reach the attention, as in transformers'
        # own Qwen2 decoder layer (the mirrored attention ignores them; a patched one reads them)
        varlen = {k: kwargs[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
                  if kwargs.get(k) is not None}
        hidden_states, _, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                             position_ids=position_ids, image_embeds=image_embeds,
                                             media_offset=media_offset, past_key_value=cache,
                                             output_attentions=False, use_cache=use_cache,
                                             position_embeddings=position_embeddings, **varlen)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class HyperQwen2Model(Qwen2Model):
    def __init__(self, config):
        super().__init__(config)
        self.layers = nn.ModuleList([HyperQwen2DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.post_init()


class HyperQwen2ForCausalLM(Qwen2ForCausalLM):
    """``forward(input_ids, ..., image_embeds=[N, T, hidden], media_offset=...)``; ``generate`` threads both."""

    def __init__(self, config):
        super().__init__(config)
        self.model = HyperQwen2Model(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, image_embeds=None, media_offset=None, **kwargs):
        # named here so generate() accepts them as model inputs and passes them at every step
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, image_embeds=image_embeds,
                               media_offset=media_offset, **kwargs)


def build(version: str = "v1", *, seed: int = 0, dtype=torch.float32, **kw) -> HyperQwen2ForCausalLM:
    """A random tiny model; every parameter (the v1 gate too) gets non-trivial random values."""
    torch.manual_seed(seed)
    model = HyperQwen2ForCausalLM(make_config(version, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate"):
                p.normal_(0.0, 1.0)
            elif name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype).eval()


def v1_media_offset(image_token_idx, L: int, first_image: int = 0) -> torch.Tensor:
    """One sample's v1 ``media_offset [L, 2]`` (ms-swift's ``mplug_owl3`` template): row t is
    ``[first, first + #(image tokens before t)]``; a sample without images gets -1000000."""
    idx = torch.as_tensor(list(image_token_idx), dtype=torch.long)
    if idx.numel() == 0:
        return torch.full((L, 2), -1000000, dtype=torch.long)
    count = (torch.arange(L)[:, None] > idx[None, :]).sum(1)
    return torch.stack([torch.full((L,), first_image, dtype=torch.long), first_image + count], -1)
