"""mPLUG-Owl3's hyper attention layers -> :func:`~mmkernels.visual_kv` + :func:`~mmkernels.hyper_attention`.

A hyper layer is a Qwen2 attention (``q_proj``/``k_proj``/``v_proj``/``o_proj``) with a ``v_kv_proj``
(``Linear(hidden, 2*H_kv*D)``, channels ``(kv_head, {K, V}, D)``) and, in the v1 checkpoints
(240728 / 1B / 2B), a static per-channel ``gate [H*D]``.  The patch binds a new ``forward`` on the
instance; parameters, their objects and the ``state_dict`` are untouched.  The version is read from the
module: with a ``gate`` it is v1 (``mode="gated"``: MI-RoPE at ``idx + 1``, row t sees image j iff
``idx_j < t``), without it v2 / 241101 (``mode="joint"``: one softmax over ``[visual ; text]``, MI-RoPE
at ``idx``, ``idx_j <= t``).

The patched ``forward(hidden_states, attention_mask, position_ids, image_embeds, media_offset,
past_key_value, output_attentions, use_cache, **kwargs)`` takes the original's arguments (and
transformers 5's ``position_embeddings`` / ``cache_position``, and the cache as ``past_key_values`` or
``cache``) and returns the original's ``(output, None, past_key_value)``:

* ``image_embeds [N, T, hidden]`` arrive normalised by the decoder layer's ``input_layernorm`` (as the
  original decoder layer does); ``None`` means no visual attention at all (as the original).
* ``media_offset``, either format, in either version:

  - the v1 tensor ``[B, S, 2]``: row ``[b, t] = [first_b, first_b + c_b[t]]`` with ``c_b[t]`` the number
    of the sample's images whose ``<|image|>`` token lies before t; the sample's images are
    ``image_embeds[first_b : first_b + c_b[S-1]]`` and image j's token is at ``t_j - 1`` where ``c``
    steps from j to j+1 at ``t_j``.  A sample whose ``media_offset[b, :, 1]`` is negative
    (``-1000000``) has no images.  Raises ValueError unless: integer dtype; ``S`` is the query length
    (or, on a decode step without a cached layout, the prompt's length); per sample either all of
    ``[:, 1]`` negative or none; ``c_b[0] == 0``; ``c_b`` non-decreasing in steps of 0 or 1; the image
    range inside ``image_embeds``.  Samples may use any (even overlapping) ranges: the images are then
    gathered per sample.
  - the v2 list of B per-sample index lists/tensors: the ``<|image|>`` token index of each image,
    strictly increasing, inside the sequence; the images of all samples follow each other in
    ``image_embeds`` (a running pointer); fewer images than ``N`` leave the rest unused, more raise.

* the text K/V go through the transformers ``Cache`` (``update(k, v, layer_idx, cache_kwargs)``) as in
  the original; the visual K/V are computed once per prompt (at the step where the layer's cache is
  empty) and kept in a side table keyed by the ``Cache`` object (weakly), then reused by every
  one-token decode step; a decode step without that entry (a cache filled elsewhere) rebuilds it from
  ``image_embeds`` and the prompt's ``media_offset``.  Caches whose ``update`` returns the whole past
  (``DynamicCache``; ``StaticCache``: the filled prefix is used) work; a cache that returns fewer keys
  (sliding window) raises NotImplementedError.
* ``attention_mask``: None, a 2-D padding mask (``[B, >= L_k]``, the flash-attention convention: its
  last ``L_k`` columns), or a 4-D ``[B, 1, L, L_k']`` boolean / additive (0 and -inf or the dtype's
  min) mask; a 4-D mask must be causal plus key padding (it is checked: one host sync), or, on a packed
  row, causal within each sample; anything else (sliding windows, biases) raises ValueError.  v2 with
  images ignores it on a padded batch, like the original's joint path.  Rows that see no key at all (left padding) give 0 where the original gives
  an arbitrary value; no other row reads them.
* not supported, raising: ``output_attentions=True``; a multi-token step after the prompt while images
  are given (chunked prefill / continuation; the original's masks are undefined there); a non-default
  RoPE type without ``position_embeddings``; at plan time ``attention_dropout > 0``,
  ``use_sliding_window``, a non-default attention ``scaling``, a gate that is not a ``[H*D]`` parameter,
  projections whose shapes disagree with the heads, and anything the patched forward would bypass:
  it calls ``q_proj``/``k_proj``/``v_proj``/``o_proj`` (their hooks run) but reads ``v_kv_proj``'s
  weight into the fused producer, so hooks on ``v_kv_proj`` or any other child it does not call, a
  ``v_kv_proj`` whose forward is not ``nn.Linear``'s, and a forward set on the layer's instance.

Packed batches (several samples in one row of ``[1, L]`` tokens, as transformers'
``DataCollatorWithFlattening`` makes them) run each sample on its own through
:func:`~mmkernels.hyper_attention_varlen`: text causal within the sample, its rows seeing only its own
earlier images.  A row is packed when transformers' varlen keyword arguments ``cu_seq_lens_q/k`` (and
``max_length_q/k``) reach the layer, or, as transformers decides it, when a single prompt row has
position ids that restart (a sample starts wherever a position is not the previous one plus 1) and no
key is padded (a left-padded single prompt stays on the padded path).  Its ``media_offset`` is v1's
``[1, L, 2]`` with each token's row describing its own sample (``[first, first + #(the sample's image
tokens before it)]``, or negative for a sample without images), or v2's one list of the row's
``<|image|>`` token indices (each image belongs to the sample holding its token).  A packed row may
fill a cache (its text K/V), but a later step on that cache raises ValueError: decoding runs on padded
batches.  The original model cannot run a packed row: its attention lets the samples see each other.

Deliberate difference from the original (v2): on a one-token decode step, a sample without images in
a batch where another sample has images attends to all its keys (causal attention), where the
original's top-left ``tril(ones(1, kv_len))`` lets it see its first key only.

Beam search: the side table is not reordered with the cache; beams expanded from one prompt share
their images, so that is exact for them.
"""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .._validation import FLOAT_DTYPES, check_no_hooks, check_tensor
from ..ops.hyper_attention.function import _check_offsets, hyper_attention, hyper_attention_varlen, visual_kv
from ..ops.hyper_attention.packing import positions_from_cu_seqlens, sample_starts
from ..ops.hyper_attention.reference import rope_cos_sin, rotate_half
from ._common import find_modules

LOOKS_FOR = "mPLUG-Owl3 hyper attention layers (a Qwen2 attention with v_kv_proj, plus gate in v1)"

@dataclass(frozen=True)
class _Spec:
    name: str
    mode: str           # "gated" (v1) or "joint" (v2)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_type: str      # the config's text RoPE ("default": plain RoPE at rope_theta)

    @property
    def visibility(self) -> str:
        return "strict" if self.mode == "gated" else "inclusive"

    @property
    def position_offset(self) -> int:
        return 1 if self.mode == "gated" else 0


@dataclass
class _Visual:
    """One layer's visual K/V for one prompt, kept for the decode steps."""
    k_vis: torch.Tensor
    v_vis: torch.Tensor
    image_positions: torch.Tensor
    cu_images: torch.Tensor
    embeds_shape: tuple


# Cache object -> {id(layer): _Visual}.  Weak: the entries go with the cache.
_VISUAL: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


# =========================================================================== plan

def _config_value(module, config, *names):
    for name in names:
        for owner in (module, config):
            value = getattr(owner, name, None) if owner is not None else None
            if value is not None:
                return value
    return None


def _is_hyper_layer(module: nn.Module) -> bool:
    if not isinstance(getattr(module, "v_kv_proj", None), nn.Linear):
        return False
    if not all(isinstance(getattr(module, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return False
    # the original builds v_kv_proj only in hyper layers; honour an explicit flag (v1's is spelt "is_hyper_enabed")
    flag = getattr(module, "is_hyper_enabled", getattr(module, "is_hyper_enabed", True))
    return flag is not False


# The submodules the patched forward calls (their forwards and hooks run as in the original).  Every
# other submodule's call is replaced: v_kv_proj's weight goes straight into visual_kv, and the patch
# computes RoPE itself where the original may call a rotary_emb child.
_CALLED = ("q_proj", "k_proj", "v_proj", "o_proj")


def _check_replaced_calls(name: str, where: str, m: nn.Module) -> None:
    """Refuse what the patched forward would silently bypass: a forward set on the layer's instance (the
    patch would overwrite it), a ``v_kv_proj`` whose forward is not ``nn.Linear``'s, and hooks on any
    submodule the patched forward does not call."""
    if "forward" in vars(m):
        raise NotImplementedError(f"{where}: the layer has a forward set on the instance (e.g. an offloading or "
                                  "quantisation wrapper); the patch would replace it")
    v_kv = m.v_kv_proj
    if "forward" in vars(v_kv) or type(v_kv).forward is not nn.Linear.forward:
        raise NotImplementedError(
            f"{where}: v_kv_proj is a {type(v_kv).__module__}.{type(v_kv).__qualname__} with its own forward (e.g. "
            "a fake-quantised linear); the patched layer reads v_kv_proj.weight / .bias into the fused visual_kv "
            "and never calls v_kv_proj, so that forward would not run")
    for child, sub in m.named_children():
        if child not in _CALLED:
            check_no_hooks(f"{name}.{child}", sub, f"the patched forward (which calls only {', '.join(_CALLED)})",
                           error=NotImplementedError)


def _rope_type(config) -> str:
    """The config's text RoPE type: transformers 5's ``rope_parameters``, 4.x's ``rope_scaling``."""
    for attr in ("rope_parameters", "rope_scaling"):
        params = getattr(config, attr, None)
        if isinstance(params, dict):
            return str(params.get("rope_type", params.get("type", "default")))
    return "default"


def _spec(name: str, m: nn.Module) -> _Spec:
    """Everything the patched forward needs, checked now: raises naming the layer and the option."""
    where = f"hyper attention layer {name!r} ({type(m).__name__})"
    _check_replaced_calls(name, where, m)
    config = getattr(m, "config", None)
    H = _config_value(m, config, "num_heads", "num_attention_heads")
    Hkv = _config_value(m, config, "num_key_value_heads")
    if not isinstance(H, int) or not isinstance(Hkv, int) or H < 1 or Hkv < 1:
        raise ValueError(f"{where}: cannot read num_heads / num_key_value_heads (got {H!r}, {Hkv!r})")
    hidden = m.q_proj.in_features
    D = _config_value(m, config, "head_dim") or hidden // H
    if H % Hkv:
        raise ValueError(f"{where}: num_heads={H} must be a multiple of num_key_value_heads={Hkv}")
    if D % 2:
        raise ValueError(f"{where}: the head dim must be even for RoPE, got {D}")
    shapes = {"q_proj": (H * D, hidden), "k_proj": (Hkv * D, hidden), "v_proj": (Hkv * D, hidden),
              "o_proj": (hidden, H * D), "v_kv_proj": (2 * Hkv * D, hidden)}
    for proj, shape in shapes.items():
        got = tuple(getattr(m, proj).weight.shape)
        if got != shape:
            raise ValueError(f"{where}: {proj}.weight has shape {got}, expected {shape} for num_heads={H}, "
                             f"num_key_value_heads={Hkv}, head_dim={D}, hidden={hidden}")
    gate = getattr(m, "gate", None)
    if gate is None:
        mode = "joint"
    elif isinstance(gate, nn.Parameter) and gate.dim() == 1 and gate.numel() == H * D:
        mode = "gated"
    else:
        shape = tuple(gate.shape) if isinstance(gate, torch.Tensor) else type(gate).__name__
        raise NotImplementedError(f"{where}: option 'gate' is {shape}; only the v1 checkpoints' static per-channel "
                                  f"gate (an nn.Parameter of shape [{H * D}]) or no gate (v2) can be run")
    theta = _config_value(m, config, "rope_theta")
    if theta is None:
        params = getattr(config, "rope_parameters", None)
        theta = params.get("rope_theta") if isinstance(params, dict) else None
    if not isinstance(theta, (int, float)) or theta < 1:
        raise ValueError(f"{where}: cannot read rope_theta from the layer or its config (got {theta!r})")
    dropout = _config_value(m, config, "attention_dropout") or 0.0
    if dropout:
        raise NotImplementedError(f"{where}: option attention_dropout={dropout} is not supported (the fused kernels "
                                  "have no attention dropout); set it to 0.0")
    if getattr(config, "use_sliding_window", False) or getattr(m, "sliding_window", None) is not None:
        raise NotImplementedError(f"{where}: option use_sliding_window / sliding_window is not supported "
                                  "(hyper_attention is full causal attention)")
    scaling = getattr(m, "scaling", None)
    if scaling is not None and abs(float(scaling) - D ** -0.5) > 1e-12 * D ** -0.5:
        raise NotImplementedError(f"{where}: option scaling={scaling} is not supported (only head_dim**-0.5)")
    return _Spec(name, mode, H, Hkv, D, float(theta), _rope_type(config))


def _install(module: nn.Module, spec: _Spec) -> None:
    module._mmkernels_hyper = spec
    module.forward = types.MethodType(hyper_forward, module)


def count_patched(model: nn.Module) -> int:
    """How many hyper attention layers of ``model`` already run the patched forward."""
    return sum(getattr(m, "_mmkernels_hyper", None) is not None for m in model.modules())


def plan(model: nn.Module) -> list:
    """One swap per hyper attention layer of ``model`` (already patched ones are skipped); raises
    (changing nothing) for a layer that cannot be run exactly."""
    return [functools.partial(_install, module, _spec(names[0], module))
            for module, names in find_modules(model, _is_hyper_layer)
            if getattr(module, "_mmkernels_hyper", None) is None]


# =========================================================================== media_offset -> image layout

def _v1_layout(media_offset, B, S_expected, N, where):
    """The v1 ``[B, S, 2]`` tensor -> (per-sample image ranges, per-image token index)."""
    if media_offset.is_floating_point() or media_offset.is_complex() or media_offset.dtype == torch.bool:
        raise TypeError(f"{where}: media_offset must be an integer tensor, got {media_offset.dtype}")
    if media_offset.dim() != 3 or media_offset.shape[0] != B or media_offset.shape[2] != 2:
        raise ValueError(f"{where}: media_offset must have shape (B={B}, S, 2), got {tuple(media_offset.shape)}")
    S = media_offset.shape[1]
    if S_expected is not None and S != S_expected:
        raise ValueError(f"{where}: media_offset has S={S} rows but the step has {S_expected} tokens; it needs one "
                         "row per token")
    if S == 0:
        return [[] for _ in range(B)], [[] for _ in range(B)]
    mo = media_offset.detach().to("cpu", torch.int64)   # one host sync for the whole layout
    ranges, positions = [], []
    for b in range(B):
        r, p = _v1_sample(mo[b], f"media_offset[{b}]", N, where)
        ranges.append(r), positions.append(p)
    return ranges, positions


def _v1_sample(rows, rows_name, N, where):
    """One sample's v1 rows (a host ``[L_s, 2]`` tensor, named ``rows_name`` in errors) -> (its image
    range, each image's token index in the sample's own coordinates)."""
    if rows.shape[0] == 0:
        return [], []
    ends = rows[:, 1]
    neg = ends < 0
    if bool(neg.all()):
        return [], []
    if bool(neg.any()):
        raise ValueError(f"{where}: {rows_name}[:, 1] mixes negative (no images) and non-negative rows")
    first, last = int(rows[-1, 0]), int(rows[-1, 1])
    c = ends - first
    if first < 0 or last > N or last < first:
        raise ValueError(f"{where}: {rows_name}[-1] = [{first}, {last}] must be an image range inside "
                         f"image_embeds (N={N})")
    if int(c[0]) != 0:
        raise ValueError(f"{where}: {rows_name}[0, 1] - {rows_name}[-1, 0] = {int(c[0])}: the first "
                         "token cannot see an image (no <|image|> token lies before it)")
    steps = c[1:] - c[:-1]
    if bool((steps < 0).any()) or bool((steps > 1).any()):
        raise ValueError(f"{where}: {rows_name}[:, 1] must grow by 0 or 1 per token (one <|image|> token "
                         f"each), got {rows[:, 1].tolist()}")
    return list(range(first, last)), (steps.nonzero().squeeze(1)).tolist()   # t_j - 1: the <|image|> token


def _v2_layout(media_offset, B, N, Lk, where):
    """The v2 list of per-sample ``<|image|>`` token indices -> (ranges, positions)."""
    if len(media_offset) != B:
        raise ValueError(f"{where}: media_offset must hold one entry per sample (B={B}), got {len(media_offset)}")
    ranges, positions, start = [], [], 0
    for b, starts in enumerate(media_offset):
        idx = torch.as_tensor(starts).detach().to("cpu")
        if idx.is_floating_point() or idx.dtype == torch.bool or idx.dim() > 1:
            raise ValueError(f"{where}: media_offset[{b}] must be a 1-D list of integer token indices, got {starts!r}")
        idx = idx.reshape(-1).to(torch.int64)
        n = idx.numel()
        if n and (int(idx.min()) < 0 or int(idx.max()) >= Lk or bool((idx[1:] <= idx[:-1]).any())):
            raise ValueError(f"{where}: media_offset[{b}] = {idx.tolist()} must be strictly increasing token indices "
                             f"inside the sequence [0, {Lk})")
        if start + n > N:
            raise ValueError(f"{where}: media_offset names {start + n}+ images but image_embeds holds N={N}")
        ranges.append(list(range(start, start + n)))
        positions.append(idx.tolist())
        start += n
    return ranges, positions


def _layout(media_offset, B, S_expected, N, Lk, device, where):
    """``(gather index or None, images used, image_positions [N'], cu_images [B+1])``."""
    if media_offset is None:
        raise ValueError(f"{where}: image_embeds needs media_offset (which tokens see which images)")
    if isinstance(media_offset, torch.Tensor):
        ranges, positions = _v1_layout(media_offset, B, S_expected, N, where)
    elif isinstance(media_offset, (list, tuple)):
        ranges, positions = _v2_layout(media_offset, B, N, Lk, where)
    else:
        raise TypeError(f"{where}: media_offset must be a [B, S, 2] integer tensor (v1) or a list of per-sample "
                        f"image token indices (v2), got {type(media_offset).__name__}")
    pos = [p for ps in positions for p in ps]
    if pos and max(pos) >= Lk:
        raise ValueError(f"{where}: an <|image|> token index {max(pos)} lies outside the sequence [0, {Lk})")
    return _layout_tensors(ranges, positions, device)


def _layout_tensors(ranges, positions, device):
    """Per-sample image ranges and token indices -> ``(gather index or None, images used,
    image_positions [N'], cu_images [B+1])``."""
    order = [i for r in ranges for i in r]
    cu = [0]
    for r in ranges:
        cu.append(cu[-1] + len(r))
    pos = [p for ps in positions for p in ps]
    gather = None if order == list(range(len(order))) else torch.tensor(order, dtype=torch.long, device=device)
    return (gather, len(order), torch.tensor(pos, dtype=torch.int32, device=device),
            torch.tensor(cu, dtype=torch.int32, device=device))


# =========================================================================== packed rows

# transformers' flash-attention keyword arguments of a packed batch (DataCollatorWithFlattening)
_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

# Caches that hold a packed prompt's text K/V: a later step on them is refused (decoding runs on padded
# batches).  Weak: the entries go with the caches.
_PACKED_PROMPTS: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def _holds_packed_prompt(cache) -> bool:
    try:
        return _PACKED_PROMPTS.get(cache, False)
    except TypeError:                  # a cache that cannot be weakly referenced was never recorded
        return False


def _bool_mask(attention_mask):
    """A 4-D mask's ``[B|1, L, L_k']`` bool form (True = attend): bool as is, additive 0 = attend."""
    m = attention_mask[:, 0]
    return m if m.dtype == torch.bool else m == 0


def _mask_fits_packed(attention_mask, cu, L):
    """True when ``attention_mask`` is None, a 2-D mask without padding, or a 4-D mask that is causal
    (over the whole row, or within each sample of ``cu``: the mask transformers builds for a packed row)."""
    if attention_mask is None:
        return True
    if attention_mask.dim() == 2:
        return attention_mask.shape == (1, L) and bool((attention_mask != 0).all())
    if attention_mask.dim() != 4 or tuple(attention_mask.shape[:3]) != (1, 1, L) or attention_mask.shape[3] < L:
        return False
    full = _bool_mask(attention_mask)[0]                 # compared on its device: one host sync
    tokens = torch.arange(L, device=full.device)
    causal = tokens[None, :] <= tokens[:, None]
    sample = torch.searchsorted(cu[1:].to(full.device), tokens, right=True)
    document = causal & (sample[:, None] == sample[None, :])
    extra = full[:, L:].any()
    return not bool(extra | ((full[:, :L] != causal).any() & (full[:, :L] != document).any()))


def _packed_rows(kwargs, attention_mask, position_ids, B, L, past_len, device, where):
    """``None`` for a padded batch; for a packed row (one row holding several samples) ``(cu_seqlens
    int32 [S+1] on the device, the longest sample, the offsets on the host)``.

    A row is packed when transformers' varlen keyword arguments are passed (``cu_seq_lens_q/k``,
    ``max_length_q/k``), or, as transformers decides it, when a single row of a prompt step has position
    ids that restart (a sample starts wherever a position is not the previous one plus 1) and no key is
    padded; its mask must then be None, causal, or causal within each sample."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        cu_q = cu_k if cu_q is None else cu_q
        cu_k = cu_q if cu_k is None else cu_k
        for name, t in (("cu_seq_lens_q", cu_q), ("cu_seq_lens_k", cu_k)):
            check_tensor(name, t, ndim=1, dtypes=(torch.int32, torch.int64))
            if t.shape[0] < 1 or t.device != device:
                raise ValueError(f"{where}: {name} must be a (S+1,) tensor of sample offsets on {device}, got "
                                 f"shape {tuple(t.shape)} on {t.device}")
        if B != 1:
            raise ValueError(f"{where}: cu_seq_lens_q/k describe a packed row, so hidden_states must have shape "
                             f"(1, total, hidden), got batch {B}")
        if past_len:
            raise ValueError(f"{where}: a packed batch cannot continue a cache ({past_len} cached tokens); decoding "
                             "runs on padded batches")
        cq, ck = (t.detach().to("cpu", torch.int64) for t in (cu_q, cu_k))
        if not torch.equal(cq, ck):
            raise ValueError(f"{where}: cu_seq_lens_k must equal cu_seq_lens_q (a packed prompt's queries are its "
                             f"keys), got {ck.tolist()} and {cq.tolist()}")
        _check_offsets("cu_seq_lens_q", cq, L, f"the row's length L={L} (hidden_states.shape[1])")
        longest = int(cq.diff().max()) if cq.numel() > 1 else 0
        for name in ("max_length_q", "max_length_k"):
            bound = kwargs.get(name)
            if bound is not None and int(bound) < longest:
                raise ValueError(f"{where}: {name}={int(bound)} must be at least the longest sample's length, "
                                 f"{longest}")
        if not _mask_fits_packed(attention_mask, cq, L):
            raise ValueError(f"{where}: a packed row (cu_seq_lens_q/k) takes no padding mask; its attention_mask "
                             "must be None, causal, or causal within each sample")
        return cu_q.to(torch.int32), longest, cq
    if B != 1 or past_len or L < 2 or position_ids is None:
        return None
    if position_ids.numel() != L or position_ids.is_floating_point():
        return None                        # not a packed row's positions: the padded path handles them
    starts = sample_starts(position_ids.reshape(L)).to("cpu")     # one host sync, on prompt rows of batch 1 only
    if int(starts.sum()) < 2:
        return None
    firsts = starts.nonzero().squeeze(1)
    cq = torch.cat([firsts, torch.tensor([L])])
    if not _mask_fits_packed(attention_mask, cq, L):
        return None                        # padded (e.g. left padding): the padded path
    return cq.to(device=device, dtype=torch.int32), int(cq.diff().max()), cq


def _packed_layout(media_offset, cq, N, device, where):
    """A packed row's image layout: ``media_offset`` (v1 ``[1, L, 2]``, each token's row describing its own
    sample's images; or v2 ``[indices]``, the row's ``<|image|>`` token indices) -> ``(gather index or None,
    images used, image_positions [N'] in each sample's coordinates, cu_images [S+1])``."""
    S = cq.numel() - 1
    L = int(cq[-1])
    if media_offset is None:
        raise ValueError(f"{where}: image_embeds needs media_offset (which tokens see which images)")
    if isinstance(media_offset, torch.Tensor):
        if media_offset.is_floating_point() or media_offset.is_complex() or media_offset.dtype == torch.bool:
            raise TypeError(f"{where}: media_offset must be an integer tensor, got {media_offset.dtype}")
        if tuple(media_offset.shape) != (1, L, 2):
            raise ValueError(f"{where}: a packed row's media_offset must have shape (1, L={L}, 2) (one row per "
                             f"token, describing that token's own sample), got {tuple(media_offset.shape)}")
        mo = media_offset[0].detach().to("cpu", torch.int64)
        ranges, positions = [], []
        for s in range(S):
            a, b = int(cq[s]), int(cq[s + 1])
            r, p = _v1_sample(mo[a:b], f"media_offset[0, {a}:{b}] (packed sample {s})", N, where)
            ranges.append(r), positions.append(p)
        return _layout_tensors(ranges, positions, device)
    if isinstance(media_offset, (list, tuple)):
        if len(media_offset) != 1:
            raise ValueError(f"{where}: a packed row's media_offset must be a list of one entry (the <|image|> "
                             f"token indices of the whole row), got {len(media_offset)} entries")
        (order,), (idx,) = _v2_layout(media_offset, 1, N, L, where)
        idx = torch.tensor(idx, dtype=torch.int64)
        sample = torch.searchsorted(cq[1:].contiguous(), idx, right=True)       # each image's sample
        ranges = [[] for _ in range(S)]
        positions = [[] for _ in range(S)]
        for image, s, i in zip(order, sample.tolist(), idx.tolist()):
            ranges[s].append(image)
            positions[s].append(i - int(cq[s]))
        return _layout_tensors(ranges, positions, device)
    raise TypeError(f"{where}: media_offset must be a [1, L, 2] integer tensor (v1) or a list of the row's image "
                    f"token indices (v2), got {type(media_offset).__name__}")


# =========================================================================== masks, RoPE

def _key_padding_mask(attention_mask, B, L, Lk, device, where):
    """The model's mask as hyper_attention's bool ``[B, L_k]`` key padding (None: no padding)."""
    if attention_mask is None:
        return None
    check_tensor("attention_mask", attention_mask)
    if attention_mask.dim() == 2:     # [B, L_total] 1 = keep (flash-attention convention)
        if attention_mask.shape[0] != B or attention_mask.shape[1] < Lk:
            raise ValueError(f"{where}: a 2-D attention_mask must have shape (B={B}, >= L_k={Lk}), got "
                             f"{tuple(attention_mask.shape)}")
        keep = attention_mask[:, -Lk:] != 0
    elif attention_mask.dim() == 4:
        if attention_mask.shape[0] not in (1, B) or attention_mask.shape[1] != 1 or attention_mask.shape[2] != L \
                or attention_mask.shape[3] < Lk:
            raise ValueError(f"{where}: a 4-D attention_mask must have shape (B={B}, 1, L={L}, >= L_k={Lk}), got "
                             f"{tuple(attention_mask.shape)}")
        m = attention_mask[:, 0]
        if m.dtype == torch.bool:
            full = m
        else:
            full = m == 0
            low = torch.finfo(m.dtype).min / 2 if m.is_floating_point() else -1
            if bool(((m != 0) & (m > low)).any()):
                raise ValueError(f"{where}: the additive attention_mask holds values other than 0 and -inf / the "
                                 "dtype's minimum (attention biases cannot be run by hyper_attention)")
        keep = full[:, -1, :Lk]       # the last query row sees every earlier key: its row is the padding mask
        causal = torch.arange(Lk, device=m.device)[None, :] <= torch.arange(Lk - L, Lk, device=m.device)[:, None]
        expected = causal[None] & keep[:, None, :]
        live = expected.any(-1, keepdim=True)      # rows with no key at all (left padding) may hold anything
        bad = ((full[:, :, :Lk] != expected) & live).any() | (full[:, :, Lk:] & live).any()
        if bool(bad):
            raise ValueError(f"{where}: attention_mask is not a causal mask with key padding (packed sequences, a "
                             "sliding window or a custom mask); hyper_attention runs causal attention plus a key "
                             "padding mask only")
        keep = keep.expand(B, Lk)
    else:
        raise ValueError(f"{where}: attention_mask must be 2-D [B, L_k] or 4-D [B, 1, L, L_k], got shape "
                         f"{tuple(attention_mask.shape)}")
    keep = keep.to(device)
    return None if bool(keep.all()) else keep.contiguous()


def _rope(x, cos, sin):
    """Rotate ``x [B, L, h, D]`` by ``cos, sin [B|1, L, D]`` in x's dtype, as the original's
    ``apply_rotary_pos_emb`` (its cos/sin tables are cast to the activation dtype)."""
    cos, sin = cos[:, :, None].to(x.dtype), sin[:, :, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


def _text_cos_sin(spec, position_embeddings, position_ids, B, L, past_len, device, dtype, where):
    if position_embeddings is not None:          # transformers >= 4.48 / 5: the model's own tables
        return position_embeddings
    if spec.rope_type != "default":
        raise NotImplementedError(f"{where}: the config's RoPE is {spec.rope_type!r} and no position_embeddings "
                                  "were passed; the patched layer computes plain RoPE at rope_theta only (a model "
                                  "that passes its own position_embeddings, as transformers >= 4.48 does, works)")
    if position_ids is None:
        position_ids = torch.arange(past_len, past_len + L, device=device)[None]
    position_ids = position_ids.reshape(-1, L)
    cos, sin = rope_cos_sin(position_ids, spec.head_dim, spec.rope_theta)   # float32, like the original table
    return cos.to(dtype), sin.to(dtype)


# =========================================================================== forward

def _cache_of(past_key_value, kwargs, where):
    cache = past_key_value
    for alias in ("past_key_values", "cache"):
        other = kwargs.pop(alias, None)
        if other is not None:
            if cache is not None and cache is not other:
                raise ValueError(f"{where}: two different caches passed (past_key_value and {alias})")
            cache = other
    if cache is not None and not (hasattr(cache, "update") and hasattr(cache, "get_seq_length")):
        raise TypeError(f"{where}: past_key_value must be a transformers Cache (with update / get_seq_length), got "
                        f"{type(cache).__name__}; legacy tuple caches are not supported")
    return cache


def _visual(self, spec, image_embeds, media_offset, cache, past_len, B, L, Lk, device, where):
    """``(k_vis, v_vis, image_positions, cu_images)`` or None (no images): computed once per prompt."""
    check_tensor("image_embeds", image_embeds, ndim=3, dtypes=FLOAT_DTYPES)
    if image_embeds.shape[2] != self.v_kv_proj.in_features:
        raise ValueError(f"{where}: image_embeds must have shape (N, T, hidden={self.v_kv_proj.in_features}), got "
                         f"{tuple(image_embeds.shape)}")
    table = None
    if cache is not None:
        try:
            table = _VISUAL.setdefault(cache, {})
        except TypeError:      # a cache that cannot be weakly referenced: recompute at every step
            table = None
    if past_len > 0:
        if L != 1:
            raise NotImplementedError(f"{where}: a {L}-token step after {past_len} cached tokens with image_embeds "
                                      "(chunked prefill, a continuation) is not supported; the original's masks are "
                                      "only defined for the prompt and for one-token decode steps")
        entry = table.get(id(self)) if table is not None else None
        if entry is not None:
            if entry.cu_images.shape[0] != B + 1 or entry.embeds_shape != tuple(image_embeds.shape):
                raise ValueError(f"{where}: the cache's visual K/V were built for batch {entry.cu_images.shape[0] - 1} "
                                 f"and image_embeds {entry.embeds_shape}, this step has batch {B} and "
                                 f"{tuple(image_embeds.shape)}; start a new cache for a new prompt")
            return entry.k_vis, entry.v_vis, entry.image_positions, entry.cu_images
        S_expected = None                  # rebuilt from the prompt's media_offset
    else:
        S_expected = L
    N = image_embeds.shape[0]
    gather, n_used, positions, cu = _layout(media_offset, B, S_expected, N,
                                            Lk if past_len == 0 else past_len, device, where)
    if n_used == 0:
        return None
    images = image_embeds[:n_used] if gather is None else image_embeds.index_select(0, gather)
    k_vis, v_vis = visual_kv(images, None, self.v_kv_proj.weight, self.v_kv_proj.bias, positions,
                             num_kv_heads=spec.num_kv_heads, rope_theta=spec.rope_theta,
                             position_offset=spec.position_offset)
    if table is not None:
        table[id(self)] = _Visual(k_vis, v_vis, positions, cu, tuple(image_embeds.shape))
    return k_vis, v_vis, positions, cu


def hyper_forward(self, hidden_states, attention_mask=None, position_ids=None, image_embeds=None, media_offset=None,
                  past_key_value=None, output_attentions=False, use_cache=False, **kwargs):
    """The patched forward of an mPLUG-Owl3 hyper attention layer (see the module docstring)."""
    spec: _Spec = self._mmkernels_hyper
    where = f"hyper attention layer {spec.name!r}"
    cache = _cache_of(past_key_value, kwargs, where)
    if output_attentions:
        raise NotImplementedError(f"{where}: output_attentions=True is not supported by the fused hyper_attention "
                                  "(it never materialises the attention weights)")
    check_tensor("hidden_states", hidden_states, ndim=3, dtypes=FLOAT_DTYPES)
    B, L, _ = hidden_states.shape
    H, Hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    device = hidden_states.device
    past_len = 0
    if cache is not None:
        if not isinstance(getattr(self, "layer_idx", None), int):
            raise ValueError(f"{where}: the layer has no integer layer_idx, so it cannot use a Cache")
        past_len = int(cache.get_seq_length(self.layer_idx))
        if past_len and _holds_packed_prompt(cache):
            raise ValueError(f"{where}: this cache holds a packed batch (several samples in one row), which cannot "
                             "be continued; decoding runs on padded batches")
    packed = _packed_rows(kwargs, attention_mask, position_ids, B, L, past_len, device, where)
    if packed is not None and position_ids is None:
        position_ids = positions_from_cu_seqlens(packed[0], L)[None]     # each sample's own positions

    q = self.q_proj(hidden_states).view(B, L, H, D)
    k = self.k_proj(hidden_states).view(B, L, Hkv, D)
    v = self.v_proj(hidden_states).view(B, L, Hkv, D)
    cos, sin = _text_cos_sin(spec, kwargs.get("position_embeddings"), position_ids, B, L, past_len, device, q.dtype,
                             where)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    Lk = past_len + L
    if cache is not None:             # the text K/V go through the transformers Cache, [B, H_kv, L, D] as usual
        cache_kwargs = {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")}
        keys, values = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx, cache_kwargs)
        if keys.shape[-2] < Lk:
            raise NotImplementedError(f"{where}: {type(cache).__name__} returned {keys.shape[-2]} keys for "
                                      f"{Lk} positions (a sliding-window cache); only caches that keep every "
                                      "position are supported")
        k, v = keys[:, :, :Lk].transpose(1, 2), values[:, :, :Lk].transpose(1, 2)   # static caches: the filled prefix

    if packed is not None:
        return _packed_attention(self, spec, q, k, v, image_embeds, media_offset, packed, cache, where), None, cache
    visual = None
    if image_embeds is not None:
        visual = _visual(self, spec, image_embeds, media_offset, cache, past_len, B, L, Lk, device, where)
    if visual is None:
        k_vis = v_vis = q.new_zeros((0, 1, Hkv, D))
        positions = torch.zeros(0, dtype=torch.int32, device=device)
        cu = torch.zeros(B + 1, dtype=torch.int32, device=device)
    else:
        k_vis, v_vis, positions, cu = visual
    # v2's joint path ignores the padding mask (as the original); v1 and text-only steps honour it
    if spec.mode == "joint" and image_embeds is not None:
        kpm = None
    else:
        kpm = _key_padding_mask(attention_mask, B, L, Lk, device, where)
    gate = self.gate.to(q.dtype) if spec.mode == "gated" else None
    o = hyper_attention(q, k, v, k_vis, v_vis, positions, cu, mode=spec.mode, gate=gate,
                        visibility=spec.visibility, key_padding_mask=kpm, check_metadata=False)
    out = self.o_proj(o.reshape(B, L, H * D))
    return out, None, cache


def _packed_attention(self, spec, q, k, v, image_embeds, media_offset, packed, cache, where):
    """The attention of a packed row (``q [1, L, H, D]``, ``k, v [1, L, H_kv, D]``) through
    ``hyper_attention_varlen``: each sample on its own, with its own images.  ``o_proj`` applied."""
    cu_seqlens, longest, cq = packed
    _, L, H, D = q.shape
    Hkv = k.shape[2]
    if cache is not None:
        try:
            _PACKED_PROMPTS[cache] = True
        except TypeError:              # a cache that cannot be weakly referenced: nothing to remember
            pass
    positions = None
    if image_embeds is not None:
        check_tensor("image_embeds", image_embeds, ndim=3, dtypes=FLOAT_DTYPES)
        if image_embeds.shape[2] != self.v_kv_proj.in_features:
            raise ValueError(f"{where}: image_embeds must have shape (N, T, hidden={self.v_kv_proj.in_features}), "
                             f"got {tuple(image_embeds.shape)}")
        gather, n_used, positions, cu = _packed_layout(media_offset, cq, image_embeds.shape[0], q.device, where)
        if n_used:
            images = image_embeds[:n_used] if gather is None else image_embeds.index_select(0, gather)
            k_vis, v_vis = visual_kv(images, None, self.v_kv_proj.weight, self.v_kv_proj.bias, positions,
                                     num_kv_heads=spec.num_kv_heads, rope_theta=spec.rope_theta,
                                     position_offset=spec.position_offset)
        else:
            positions = None
    if positions is None:
        k_vis = v_vis = q.new_zeros((0, 1, Hkv, D))
        positions = torch.zeros(0, dtype=torch.int32, device=q.device)
        cu = torch.zeros(cq.numel(), dtype=torch.int32, device=q.device)
    gate = self.gate.to(q.dtype) if spec.mode == "gated" else None
    o = hyper_attention_varlen(q[0], k[0], v[0], k_vis, v_vis, cu_seqlens, cu_seqlens, longest, longest, positions,
                               cu, mode=spec.mode, gate=gate, visibility=spec.visibility, check_metadata=False)
    return self.o_proj(o.reshape(1, L, H * D))
