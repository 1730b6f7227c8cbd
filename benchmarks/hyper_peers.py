"""Peers of :func:`mmkernels.hyper_attention`, on the same inputs and returning the same output.

* :class:`JointFlexPeer` -- joint mode (v2): one FlexAttention call over ``[all visual keys of the
  sample ; text keys]`` with a block mask: a visual key of image ``n`` is visible to row ``t`` iff
  ``p_n < t`` (``visibility="strict"``) or ``p_n <= t`` (``"inclusive"``), a text key ``s`` iff ``s <= t``.
* :class:`GatedPeer` -- gated mode (v1): SDPA causal over the text, FlexAttention with the log-sum-exp
  over the visual keys (same visual mask), then ``(1 - sigmoid(g)) * o_text + sigmoid(g) * o_vis`` on
  the rows that see an image (finite visual lse), ``o_text`` elsewhere: the math of mmkernels' gated mode.
* :class:`DenseCausalPeer` -- dense causal SDPA over the text alone (zero images): the practical ceiling,
  with torch's default backend choice or pinned to one backend (``"flash"``, ``"cudnn"``).
* :class:`DocumentFlexPeer` -- packed samples (``hyper_attention_varlen``), joint mode: one FlexAttention
  call over all visual and packed text keys with a document mask combined with the hyper mask.
* :class:`FlashVarlenCausalPeer` -- flash-attn's ``flash_attn_varlen_func`` on the packed text alone
  (causal, no image): the text-only packed reference point, when flash-attn is installed.

Each peer is built once per image layout (the block mask is made at construction, outside any timed
region) and used as ``peer.prepare(...)`` -> tensors in the peer's own layout (``[B, H, L, D]``,
contiguous, visual keys padded per sample to the batch's largest image count and concatenated with
the text keys), ``peer.run(*prepared)`` -> output in the peer's layout (what a benchmark times), and
``peer.output(o)`` -> ``[B, L_q, H, D]`` in the inputs' dtype, as mmkernels returns it.
``peer(q, k, v, k_vis, v_vis, ...)`` chains the three (for correctness checks).

FlexAttention runs compiled (``torch.compile``) on CUDA and eagerly elsewhere (CPU: forward only, it
materialises the scores; torch has no CPU FlexAttention backward).  When FlexAttention or a feature is
missing, :func:`flex_unavailable` / ``peer.unavailable`` say why (a string), and a benchmark prints
``not measured: <reason>`` instead of crashing.

The rows are the last ``L_q`` of the ``L_k`` positions, as in mmkernels (``t = L_k - L_q + i``).
``key_padding_mask`` is not supported by the peers (the benchmarks do not use it).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F

_COMPILED: dict[str, Any] = {}


def flex_unavailable(device: torch.device | str, needs_grad: bool = False) -> str | None:
    """None when FlexAttention can run on ``device`` (with a backward if ``needs_grad``), else the reason."""
    device = torch.device(device)
    try:
        from torch.nn.attention import flex_attention as _fa  # noqa: F401
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception as e:  # older torch
        return f"FlexAttention unavailable in torch {torch.__version__} ({type(e).__name__}: {e})"
    if needs_grad and device.type == "cpu":
        return "FlexAttention has no CPU backward"
    return None


def sdpa_gqa_unavailable() -> str | None:
    """None when ``F.scaled_dot_product_attention`` accepts ``enable_gqa`` (torch >= 2.5)."""
    import inspect

    try:
        params = inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # a builtin without a signature: try a call instead
        try:
            x = torch.zeros(1, 2, 1, 1)
            F.scaled_dot_product_attention(x, x[:, :1], x[:, :1], enable_gqa=True)
            return None
        except TypeError as e:
            return f"SDPA without enable_gqa in torch {torch.__version__} ({e})"
    return None if "enable_gqa" in params else f"SDPA without enable_gqa in torch {torch.__version__}"


def _flex_fn(device: torch.device, compiled: bool | None):
    """flex_attention, ``torch.compile``d on CUDA (default) and eager elsewhere (cached per process)."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = (device.type == "cuda") if compiled is None else compiled
    if not compiled:
        return flex_attention
    if "flex" not in _COMPILED:
        # one compile per shape (dynamic=False, as the peers were first measured): a sweep needs more
        # recompiles than dynamo's default limit (8), past which it would silently fall back to eager
        import torch._dynamo

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
        _COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["flex"]


def _flex_call(fn, q, k, v, block_mask, scale, want_lse: bool):
    """One flex_attention call with GQA; ``(out, lse)`` (lse None unless asked), through
    ``return_aux=AuxRequest(lse=True)`` where torch has it and ``return_lse=True`` before."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        warnings.filterwarnings("ignore", message=".*return_lse is deprecated.*")
        if not want_lse:
            return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True), None
        try:
            from torch.nn.attention.flex_attention import AuxRequest
        except ImportError:
            AuxRequest = None
        if AuxRequest is not None:
            out, aux = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True,
                          return_aux=AuxRequest(lse=True))
            return out, aux.lse
        return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True, return_lse=True)


def _layout(image_positions: torch.Tensor, cu_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-sample image positions padded to the batch's largest count: ``(pos [B, n_max] int64,
    count [B] int64, n_max)``; padding slots hold a position no row reaches (never visible)."""
    cu = cu_images.to(torch.int64).cpu()
    B = cu.numel() - 1
    counts = (cu[1:] - cu[:-1]).tolist()
    n_max = max(counts, default=0)
    big = torch.iinfo(torch.int64).max // 4
    pos = torch.full((B, max(n_max, 1)), big, dtype=torch.int64)
    ip = image_positions.to(torch.int64).cpu()
    for b in range(B):
        pos[b, :counts[b]] = ip[int(cu[b]):int(cu[b + 1])]
    return pos.to(image_positions.device), torch.tensor(counts, dtype=torch.int64, device=image_positions.device), \
        n_max


def _padded_visual(x: torch.Tensor, cu_images: torch.Tensor, n_max: int) -> torch.Tensor:
    """``[N, T, H_kv, D]`` -> ``[B, H_kv, n_max*T, D]``: each sample's images in order, zero padded."""
    cu = cu_images.to(torch.int64).cpu().tolist()
    B, (_, T, Hkv, D) = len(cu) - 1, x.shape
    out = x.new_zeros((B, n_max, T, Hkv, D))
    for b in range(B):
        out[b, :cu[b + 1] - cu[b]] = x[cu[b]:cu[b + 1]]
    return out.reshape(B, n_max * T, Hkv, D).transpose(1, 2).contiguous()


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).contiguous()


def _text_mask(L_q: int, L_k: int, device) -> torch.Tensor | None:
    """SDPA's ``is_causal`` is aligned top-left: right for L_q == L_k (None); otherwise the explicit
    bottom-right causal mask ``[L_q, L_k]`` (query i is key position L_k - L_q + i)."""
    if L_q == L_k:
        return None
    t = torch.arange(L_k - L_q, L_k, device=device)
    return torch.arange(L_k, device=device)[None, :] <= t[:, None]


def _causal_sdpa(q, k, v, text_mask, scale):
    """Causal SDPA over the text keys (GQA), with :func:`_text_mask`'s mask when L_q != L_k."""
    if text_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=text_mask, scale=scale, enable_gqa=True)


def _detached(xs, detach: bool) -> tuple:
    """``xs`` as new leaves (same requires_grad; None kept) when ``detach``, else as they are."""
    if not detach:
        return tuple(xs)
    return tuple(x if x is None else x.detach().requires_grad_(x.requires_grad) for x in xs)


class _Peer:
    name = "peer"
    unavailable: str | None = None

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        if self.unavailable:
            raise RuntimeError(f"{self.name}: {self.unavailable}")
        return self.output(self.run(*self.prepare(*args, **kwargs)))

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """The peer's ``[B, H, L_q, D]`` output as mmkernels returns it: ``[B, L_q, H, D]``, input dtype."""
        return o.transpose(1, 2).to(self.dtype)


class JointFlexPeer(_Peer):
    """Joint mode: FlexAttention over ``[visual keys of the sample (padded) ; text keys]`` with the
    hyper block mask (see the module docstring)."""

    name = "flex_joint"

    def __init__(self, image_positions: torch.Tensor, cu_images: torch.Tensor, L_q: int, L_k: int, T: int, *,
                 visibility: str = "inclusive", scale: float | None = None, device=None,
                 compiled: bool | None = None, needs_grad: bool = False):
        device = torch.device(device or image_positions.device)
        self.unavailable = flex_unavailable(device, needs_grad)
        self.scale, self.T, self.L_q, self.L_k = scale, T, L_q, L_k
        self.cu_images = cu_images
        self.pos, self.counts, self.n_max = _layout(image_positions, cu_images)
        if self.unavailable:
            return
        from torch.nn.attention.flex_attention import create_block_mask

        NV, off, pos = self.n_max * T, L_k - L_q, self.pos
        inclusive = visibility == "inclusive"
        n_clamp = max(self.n_max - 1, 0)

        def mask_mod(b, h, q_idx, kv_idx):
            t = q_idx + off
            p = pos[b, torch.clamp(kv_idx // max(T, 1), max=n_clamp)]
            vis = (p <= t) if inclusive else (p < t)
            return torch.where(kv_idx < NV, vis, (kv_idx - NV) <= t)

        B = self.pos.shape[0]
        self.block_mask = create_block_mask(mask_mod, B, None, L_q, NV + L_k, device=device)
        self.fn = _flex_fn(device, compiled)

    def prepare(self, q, k, v, k_vis, v_vis, *, detach: bool = False):
        self.dtype = q.dtype
        kk = torch.cat([_padded_visual(k_vis, self.cu_images, self.n_max), _heads_first(k)], 2)
        vv = torch.cat([_padded_visual(v_vis, self.cu_images, self.n_max), _heads_first(v)], 2)
        return _detached((_heads_first(q), kk, vv), detach)

    def run(self, q, k, v):
        return _flex_call(self.fn, q, k, v, self.block_mask, self.scale, want_lse=False)[0]


class GatedPeer(_Peer):
    """Gated mode: SDPA causal over the text + FlexAttention (with lse) over the visual keys + the gate
    combine on the rows that see an image."""

    name = "sdpa+flex_gated"

    def __init__(self, image_positions: torch.Tensor, cu_images: torch.Tensor, L_q: int, L_k: int, T: int, *,
                 visibility: str = "strict", scale: float | None = None, device=None,
                 compiled: bool | None = None, needs_grad: bool = False):
        device = torch.device(device or image_positions.device)
        self.unavailable = flex_unavailable(device, needs_grad) or sdpa_gqa_unavailable()
        self.scale, self.T, self.L_q, self.L_k = scale, T, L_q, L_k
        self.cu_images = cu_images
        self.pos, self.counts, self.n_max = _layout(image_positions, cu_images)
        self.text_mask = _text_mask(L_q, L_k, device)
        if self.unavailable or self.n_max == 0:
            return
        from torch.nn.attention.flex_attention import create_block_mask

        off, pos, inclusive, n_clamp = L_k - L_q, self.pos, visibility == "inclusive", self.n_max - 1

        def mask_mod(b, h, q_idx, kv_idx):
            p = pos[b, torch.clamp(kv_idx // max(T, 1), max=n_clamp)]
            return (p <= q_idx + off) if inclusive else (p < q_idx + off)

        B = self.pos.shape[0]
        self.block_mask = create_block_mask(mask_mod, B, None, L_q, self.n_max * T, device=device)
        self.fn = _flex_fn(device, compiled)

    def prepare(self, q, k, v, k_vis, v_vis, gate, *, detach: bool = False):
        """``gate``: as mmkernels takes it, ``[H*D]`` or broadcastable to ``[B, L_q, H, D]``."""
        self.dtype = q.dtype
        B, Lq, H, D = q.shape
        if gate.dim() == 1 and gate.numel() == H * D:                  # the checkpoints' [H*D] gate
            g = gate.view(1, H, 1, D)                                  # broadcasts over [B, H, L_q, D]
        else:
            g = gate.expand(B, Lq, H, D).transpose(1, 2)               # [B, H, L_q, D], a view
        xs = [_heads_first(q), _heads_first(k), _heads_first(v)]
        if self.n_max:
            xs += [_padded_visual(k_vis, self.cu_images, self.n_max), _padded_visual(v_vis, self.cu_images, self.n_max)]
        else:
            xs += [None, None]
        xs.append(g)
        return _detached(xs, detach)

    def run(self, q, k, v, k_vis, v_vis, gate):
        o_t = _causal_sdpa(q, k, v, self.text_mask, self.scale)
        if not self.n_max:                                           # no image anywhere: plain causal
            return o_t
        o_v, lse = _flex_call(self.fn, q, k_vis, v_vis, self.block_mask, self.scale, want_lse=True)
        sees = torch.isfinite(lse)[..., None]                         # [B, H, L_q, 1]: row sees an image
        work = torch.promote_types(o_t.dtype, torch.float32)            # the combine in >= fp32, as mmkernels
        s = torch.sigmoid(gate.to(work))
        mixed = ((1 - s) * o_t.to(work) + s * o_v.to(work)).to(o_t.dtype)
        return torch.where(sees, mixed, o_t)


SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION"}   # DenseCausalPeer's backend names


def sdpa_backend_unavailable(backend: str | None) -> str | None:
    """None when SDPA can be pinned to ``backend`` (``torch.nn.attention.SDPBackend``), else the reason."""
    if backend is None:
        return None
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401
    except Exception as e:
        return f"torch {torch.__version__} cannot pin an SDPA backend ({type(e).__name__}: {e})"
    if not hasattr(SDPBackend, SDPA_BACKENDS[backend]):
        return f"torch {torch.__version__} has no SDPBackend.{SDPA_BACKENDS[backend]}"
    return None


class DenseCausalPeer(_Peer):
    """Dense causal SDPA over the text (zero images): the practical ceiling.

    ``backend``: None lets torch pick (what ``F.scaled_dot_product_attention`` does by default), or
    ``"flash"`` / ``"cudnn"`` pins ``SDPBackend.FLASH_ATTENTION`` / ``SDPBackend.CUDNN_ATTENTION``
    (``sdpa_kernel``; a backend that cannot run the shape raises, and the benchmark says "not
    measured").  The cuDNN peer gets its K/V heads repeated to the query heads in :meth:`prepare`
    (outside any timed region), so it does not depend on cuDNN accepting ``enable_gqa``."""

    name = "sdpa_causal"

    def __init__(self, L_q: int, L_k: int, *, scale: float | None = None, device=None, backend: str | None = None):
        if backend is not None and backend not in SDPA_BACKENDS:
            raise ValueError(f"backend must be None or one of {sorted(SDPA_BACKENDS)}, got {backend!r}")
        self.backend = backend
        self.name = "sdpa_causal" if backend is None else f"sdpa_{backend}"
        self.unavailable = sdpa_gqa_unavailable() or sdpa_backend_unavailable(backend)
        self.scale = scale
        self.text_mask = _text_mask(L_q, L_k, device)

    def prepare(self, q, k, v, *, detach: bool = False):
        self.dtype = q.dtype
        q, k, v = _heads_first(q), _heads_first(k), _heads_first(v)
        if self.backend == "cudnn" and k.shape[1] != q.shape[1]:
            g = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        return _detached((q, k, v), detach)

    def run(self, q, k, v):
        if self.backend is None:
            return _causal_sdpa(q, k, v, self.text_mask, self.scale)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[self.backend])]):
            return _causal_sdpa(q, k, v, self.text_mask, self.scale)


# --------------------------------------------------------------------------- packed samples (varlen)

def _packed_index(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[S+1]`` offsets -> per packed row ``(sample, index in its sample)`` (int64, on the offsets' device)."""
    cu = cu_seqlens.to(torch.int64)
    lengths = cu.diff()
    sample = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
    return sample, torch.arange(sample.numel(), device=cu.device) - cu[sample]


def flash_varlen_unavailable() -> str | None:
    """None when flash-attn's ``flash_attn_varlen_func`` can be imported, else the reason."""
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception as e:
        return f"flash-attn is not installed ({type(e).__name__}: {e})"
    return None


class DocumentFlexPeer(_Peer):
    """Packed samples in joint mode (:func:`mmkernels.hyper_attention_varlen`): one FlexAttention call over
    ``[all visual keys ; all packed text keys]`` with a document mask combined with the hyper mask:
    row ``t`` of sample ``s`` (its position in its own sample) sees a text key of sample ``s`` at
    position ``<= t`` and image ``n`` of sample ``s`` iff ``p_n < t`` (strict) or ``p_n <= t``
    (inclusive).  Inputs and output as ``hyper_attention_varlen`` takes and returns them
    (``[total_q, H, D]``)."""

    name = "flex_document"

    def __init__(self, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, image_positions: torch.Tensor,
                 cu_images: torch.Tensor, T: int, *, visibility: str = "inclusive", scale: float | None = None,
                 device=None, compiled: bool | None = None, needs_grad: bool = False):
        device = torch.device(device or cu_seqlens_q.device)
        self.unavailable = flex_unavailable(device, needs_grad)
        self.scale = scale
        if self.unavailable:
            return
        from torch.nn.attention.flex_attention import create_block_mask

        q_doc, q_pos = _packed_index(cu_seqlens_q.to(device))
        k_doc, k_pos = _packed_index(cu_seqlens_k.to(device))
        lq, lk = cu_seqlens_q.to(device, torch.int64).diff(), cu_seqlens_k.to(device, torch.int64).diff()
        q_pos = q_pos + (lk - lq)[q_doc]                      # the rows are the last L_q of each sample's L_k
        img_doc, _ = _packed_index(cu_images.to(device))
        img_pos = image_positions.to(device, torch.int64)
        N, total_q, total_k = img_pos.numel(), q_doc.numel(), k_doc.numel()
        NV, inclusive, n_clamp, k_clamp = N * T, visibility == "inclusive", max(N - 1, 0), max(total_k - 1, 0)
        if N == 0:   # index tensors of one (never-selected) entry keep the lookups in range
            img_doc, img_pos = torch.full((1,), -1, device=device), torch.zeros(1, dtype=torch.int64, device=device)
        if total_k == 0:
            k_doc, k_pos = torch.full((1,), -1, device=device), torch.zeros(1, dtype=torch.int64, device=device)

        def mask_mod(b, h, q_idx, kv_idx):
            s, t = q_doc[q_idx], q_pos[q_idx]
            n = torch.clamp(kv_idx // max(T, 1), max=n_clamp)
            p = img_pos[n]
            vis = (img_doc[n] == s) & ((p <= t) if inclusive else (p < t))
            j = torch.clamp(kv_idx - NV, min=0, max=k_clamp)
            text = (k_doc[j] == s) & (k_pos[j] <= t)
            return torch.where(kv_idx < NV, vis, text)

        # on CUDA the mask is built compiled: a packed training batch's [total_q, N*T + total_k] mask
        # (tens of thousands squared) would not fit in memory materialised, as the eager path does
        self.block_mask = create_block_mask(mask_mod, 1, None, total_q, NV + total_k, device=device,
                                            _compile=device.type == "cuda")
        self.fn = _flex_fn(device, compiled)

    def prepare(self, q, k, v, k_vis, v_vis, *, detach: bool = False):
        """``q [total_q, H, D]``, ``k, v [total_k, H_kv, D]``, ``k_vis, v_vis [N, T, H_kv, D]`` ->
        ``[1, H, total_q, D]`` and the concatenated keys/values ``[1, H_kv, N*T + total_k, D]``."""
        self.dtype = q.dtype
        Hkv, D = k.shape[1], k.shape[2]

        def keys(vis, text):
            return torch.cat([vis.reshape(-1, Hkv, D), text]).transpose(0, 1).unsqueeze(0).contiguous()
        return _detached((q.transpose(0, 1).unsqueeze(0).contiguous(), keys(k_vis, k), keys(v_vis, v)), detach)

    def run(self, q, k, v):
        return _flex_call(self.fn, q, k, v, self.block_mask, self.scale, want_lse=False)[0]

    def output(self, o: torch.Tensor) -> torch.Tensor:
        return o[0].transpose(0, 1).to(self.dtype)


class FlashVarlenCausalPeer(_Peer):
    """flash-attn's ``flash_attn_varlen_func`` on the packed text alone (causal within each sample,
    bottom-right aligned when ``L_q < L_k``; no image): what a text-only packed batch costs with the
    library the ``cu_seqlens`` convention comes from.  Inputs as ``hyper_attention_varlen`` takes them."""

    name = "flash_varlen_causal"

    def __init__(self, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                 max_seqlen_k: int, *, scale: float | None = None):
        self.unavailable = flash_varlen_unavailable()
        self.cu_q, self.cu_k = cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32)
        self.max_q, self.max_k, self.scale = max_seqlen_q, max_seqlen_k, scale

    def prepare(self, q, k, v, *, detach: bool = False):
        self.dtype = q.dtype
        return _detached((q, k, v), detach)

    def run(self, q, k, v):
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, self.cu_q, self.cu_k, self.max_q, self.max_k,
                                      softmax_scale=self.scale, causal=True)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        return o.to(self.dtype)
