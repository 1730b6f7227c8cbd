"""A tiny InternLM-XComposer2 language model: InternLM2 decoder layers whose five projections are ``PLoRA``.

Written from the public model code's semantics (``modeling_internlm2.py`` of InternLM-XComposer2, see
``shared/research/plora.md`` section 1), not copied:

* ``InternLM2ForCausalLM``-style wiring: ``model.tok_embeddings`` -> ``model.layers[i]`` -> ``model.norm`` ->
  ``output`` (the LM head, a plain ``nn.Linear``: not PLoRA).
* Each decoder layer: ``x + attention(attention_norm(x))``, then ``x + feed_forward(ffn_norm(x))`` (RMSNorm).
* Attention: one packed ``wqkv`` PLoRA whose output is laid out per KV group as ``(kv_heads, q_per_kv + 2,
  head_dim)`` (the group's queries, then its key, then its value), rotary embeddings, grouped-query causal
  attention, then the ``wo`` PLoRA.
* Feed-forward: ``w2(silu(w1(x, im_mask)) * w3(x, im_mask), im_mask)``.
* ``im_mask`` ([B, N] bool, True on image tokens) is threaded through every layer into every PLoRA call;
  without one the model builds an all-False mask (as XComposer2 does), so decode steps take PLoRA's
  "no visual token" path.

The ``PLoRA`` class itself is :class:`mmkernels.ops.plora.baseline.XComposerPLoRA` (the published forward).
``generate`` is a hand-written greedy loop with a per-layer K/V cache (the original is remote code).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmkernels.ops.plora.baseline import XComposerPLoRA as PLoRA


@dataclass
class Config:
    vocab_size: int = 61
    hidden_size: int = 64
    intermediate_size: int = 88
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    bias: bool = True            # config.bias: wqkv / wo only (InternLM2-7B has False; True covers b0)
    lora_r: int = 8
    lora_alpha: int = 16         # scaling 2.0 (the checkpoints use r = alpha; any value must pass through)
    lora_dropout: float = 0.05   # XComposer2's default; 0 gives the ``lambda x: x`` identity


class RMSNorm(nn.Module):
    def __init__(self, hidden, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(q, k, positions, theta):
    """Rotary embedding of ``q``/``k`` [B, heads, N, D] at integer ``positions`` [N]."""
    d = q.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=q.device) / d)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _plora(cfg, fan_in, fan_out, bias):
    return PLoRA(fan_in, fan_out, bias=bias, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                 lora_dropout=cfg.lora_dropout, lora_len=5)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.q_per_kv = cfg.num_attention_heads // cfg.num_key_value_heads
        qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * self.head_dim
        self.wqkv = _plora(cfg, cfg.hidden_size, qkv, cfg.bias)
        self.wo = _plora(cfg, cfg.num_attention_heads * self.head_dim, cfg.hidden_size, cfg.bias)

    def forward(self, x, im_mask, past=None):
        B, N, _ = x.shape
        cfg, D = self.cfg, self.head_dim
        qkv = self.wqkv(x, im_mask).view(B, N, cfg.num_key_value_heads, self.q_per_kv + 2, D)
        q = qkv[..., :self.q_per_kv, :].reshape(B, N, cfg.num_attention_heads, D).transpose(1, 2)
        k = qkv[..., -2, :].transpose(1, 2)            # [B, kv_heads, N, D]
        v = qkv[..., -1, :].transpose(1, 2)
        start = 0 if past is None else past[0].shape[2]
        q, k = _rope(q, k, torch.arange(start, start + N, device=x.device), cfg.rope_theta)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        present = (k, v)
        k = k.repeat_interleave(self.q_per_kv, dim=1)  # repeat_kv
        v = v.repeat_interleave(self.q_per_kv, dim=1)
        scores = q @ k.transpose(-1, -2) / D ** 0.5
        total = k.shape[2]
        causal = torch.ones(N, total, dtype=torch.bool, device=x.device).tril(diagonal=start)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        out = (scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v).transpose(1, 2).reshape(B, N, -1)
        return self.wo(out, im_mask), present


class FeedForward(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.w1 = _plora(cfg, cfg.hidden_size, cfg.intermediate_size, False)
        self.w3 = _plora(cfg, cfg.hidden_size, cfg.intermediate_size, False)
        self.w2 = _plora(cfg, cfg.intermediate_size, cfg.hidden_size, False)

    def forward(self, x, im_mask):
        return self.w2(F.silu(self.w1(x, im_mask)) * self.w3(x, im_mask), im_mask)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, im_mask, past=None):
        h, present = self.attention(self.attention_norm(x), im_mask, past)
        x = x + h
        return x + self.feed_forward(self.ffn_norm(x), im_mask), present


class InternLM2Model(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, im_mask=None, past_key_values=None):
        x = self.tok_embeddings(input_ids)
        if im_mask is None:   # XComposer2: torch.zeros(inputs_embeds.shape[:2]).bool()
            im_mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        presents = []
        for i, layer in enumerate(self.layers):
            x, present = layer(x, im_mask, None if past_key_values is None else past_key_values[i])
            presents.append(present)
        return self.norm(x), presents


class InternLM2ForCausalLM(nn.Module):
    """``forward(input_ids, im_mask=None, labels=None) -> (logits, loss)``; ``generate`` is greedy."""

    def __init__(self, cfg: Config | None = None, **overrides):
        super().__init__()
        self.config = cfg or Config(**overrides)
        self.model = InternLM2Model(self.config)
        self.output = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)

    def forward(self, input_ids, im_mask=None, labels=None, past_key_values=None, return_cache=False):
        hidden, presents = self.model(input_ids, im_mask, past_key_values)
        logits = self.output(hidden).float()
        loss = None
        if labels is not None:   # causal LM: token t predicts token t + 1
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return (logits, loss, presents) if return_cache else (logits, loss)

    @torch.no_grad()
    def generate(self, input_ids, im_mask=None, max_new_tokens=4):
        """Greedy decoding with a K/V cache: the prompt (with its image tokens) once, then one text token
        per step (an all-False ``im_mask``, as in XComposer2's decode steps)."""
        logits, _, cache = self(input_ids, im_mask, return_cache=True)
        tokens = input_ids
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat((tokens, nxt), dim=1)
            step_mask = torch.zeros_like(nxt, dtype=torch.bool)
            logits, _, cache = self(nxt, step_mask, past_key_values=cache, return_cache=True)
        return tokens


def build(seed=0, **overrides) -> InternLM2ForCausalLM:
    """A float32 model with random weights: every parameter N(0, 0.1), norms near 1, and Plora_B nonzero
    (the LoRA path is otherwise untested)."""
    torch.manual_seed(seed)
    model = InternLM2ForCausalLM(**overrides)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.1)
    return model


def image_mask(batch, seq, spans):
    """``[batch, seq]`` bool: True on the image-token span ``spans[b] = (start, stop)`` of each sample
    (None for a text-only sample)."""
    m = torch.zeros(batch, seq, dtype=torch.bool)
    for b, span in enumerate(spans):
        if span is not None:
            m[b, span[0]:span[1]] = True
    return m
