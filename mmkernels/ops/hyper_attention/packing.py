"""Packed rows (several samples concatenated along the token dim, flash-attn's ``cu_seqlens``): the sample
offsets and positions the module and the mPLUG-Owl3 patch derive on the device.

A packed row is what transformers' ``DataCollatorWithFlattening`` produces: ``[1, total]`` tokens whose
position ids restart at every sample.  A sample starts at the first token and wherever a position is
not the previous one plus 1 (transformers' own rule for packed rows, ``find_packed_sequence_indices``),
so a sample of one token is recognised too.
"""
from __future__ import annotations

import torch


def sample_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """bool ``[total]``: True where a sample starts in a packed row of positions ``[total]``."""
    starts = torch.ones(position_ids.shape, dtype=torch.bool, device=position_ids.device)
    starts[1:] = position_ids[1:] != position_ids[:-1] + 1
    return starts


def cu_seqlens_from_starts(starts: torch.Tensor, num_samples: int) -> torch.Tensor:
    """int32 ``[num_samples + 1]`` offsets of the samples that ``starts`` marks, without a host sync.

    ``num_samples`` must be the number of marked starts (the caller knows it from elsewhere, e.g. the
    images' ``cu_images``, or reads it and checks it).  Otherwise the offsets still end at the total:
    with more starts, the surplus samples merge into the last one; with fewer, the last samples are
    empty."""
    sample_of_token = torch.cumsum(starts, 0) - 1                  # non-decreasing, 0 at token 0
    wanted = torch.arange(num_samples, device=starts.device, dtype=sample_of_token.dtype)
    firsts = torch.searchsorted(sample_of_token, wanted)          # the first token of each sample (or the total)
    total = torch.full((1,), starts.shape[0], dtype=firsts.dtype, device=starts.device)
    return torch.cat([firsts, total]).to(torch.int32)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """int64 ``[total]``: each token's index within its own sample (positions restarting at 0)."""
    cu = cu_seqlens.to(torch.int64)
    tokens = torch.arange(total, device=cu.device)
    sample_of_token = torch.searchsorted(cu[1:].contiguous(), tokens, right=True)   # in [0, S]: cu has S+1
    return tokens - cu[sample_of_token]
