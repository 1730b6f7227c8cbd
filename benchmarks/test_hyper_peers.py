"""The hyper attention peers (``benchmarks/hyper_peers.py``) compute what mmkernels computes: each is compared
with :func:`mmkernels.hyper_attention_reference` on CPU at tiny, odd shapes (FlexAttention eager,
forward only: torch has no CPU FlexAttention backward), with GQA, two samples with different image
counts (one with none), chunked prefill (L_q < L_k) and both visibility rules."""
from __future__ import annotations

import pytest
import torch

from mmkernels import hyper_attention_reference

from . import hyper_peers as P

pytestmark = pytest.mark.skipif(P.flex_unavailable("cpu") is not None, reason=str(P.flex_unavailable("cpu")))

H, HKV, D, T = 4, 2, 16, 5


def _inputs(dtype, Lq, Lk, positions, cu, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, N = len(cu) - 1, len(positions)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    q, k, v = r(B, Lq, H, D), r(B, Lk, HKV, D), r(B, Lk, HKV, D)
    kv, vv = r(N, T, HKV, D), r(N, T, HKV, D)
    return q, k, v, kv, vv, torch.tensor(positions, dtype=torch.int32), torch.tensor(cu, dtype=torch.int32)


# (L_q, L_k, positions, cu_images): sample 0 has 3 images (one at position 0), sample 1 none / one
LAYOUTS = [(13, 13, [0, 4, 9], [0, 3, 3]), (6, 13, [2, 7, 12, 5], [0, 3, 4])]
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=2e-5, atol=2e-5)}


# one well-chosen set instead of the full cross product (each case costs ~1 s of eager FlexAttention)
CASES = [(torch.float64, LAYOUTS[0], "strict"), (torch.float64, LAYOUTS[1], "inclusive"),
         (torch.float32, LAYOUTS[1], "strict"), (torch.float32, LAYOUTS[0], "inclusive")]


@pytest.mark.parametrize("dtype,layout,visibility", CASES, ids=["f64-prefill-strict", "f64-chunked-inclusive",
                                                                "f32-chunked-strict", "f32-prefill-inclusive"])
def test_peers_match_reference(dtype, layout, visibility):
    Lq, Lk, positions, cu = layout
    q, k, v, kv, vv, pos, cu_t = _inputs(dtype, Lq, Lk, positions, cu)
    gate = torch.randn(H * D, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    ref_j = hyper_attention_reference(q, k, v, kv, vv, pos, cu_t, mode="joint", visibility=visibility)
    ref_g = hyper_attention_reference(q, k, v, kv, vv, pos, cu_t, mode="gated", gate=gate, visibility=visibility)
    joint = P.JointFlexPeer(pos, cu_t, Lq, Lk, T, visibility=visibility)
    gated = P.GatedPeer(pos, cu_t, Lq, Lk, T, visibility=visibility)
    torch.testing.assert_close(joint(q, k, v, kv, vv), ref_j, **TOL[dtype])
    torch.testing.assert_close(gated(q, k, v, kv, vv, gate), ref_g, **TOL[dtype])


def test_gated_peer_per_token_gate_and_no_images():
    """A per-token gate broadcast to [B, L_q, H, D]; a batch without images is plain causal attention
    (the gated peer skips FlexAttention, the dense peer is SDPA)."""
    Lq = Lk = 11
    q, k, v, kv, vv, pos, cu = _inputs(torch.float64, Lq, Lk, [3, 8], [0, 2])
    gate = torch.randn(1, Lq, H, D, dtype=torch.float64)
    ref = hyper_attention_reference(q, k, v, kv, vv, pos, cu, mode="gated", gate=gate)
    torch.testing.assert_close(P.GatedPeer(pos, cu, Lq, Lk, T)(q, k, v, kv, vv, gate), ref)
    e_pos, e_cu = torch.zeros(0, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
    e_kv = kv[:0]
    ref0 = hyper_attention_reference(q, k, v, e_kv, e_kv, e_pos, e_cu, mode="gated", gate=gate)
    torch.testing.assert_close(P.GatedPeer(e_pos, e_cu, Lq, Lk, T)(q, k, v, e_kv, e_kv, gate), ref0)
    torch.testing.assert_close(P.DenseCausalPeer(Lq, Lk)(q, k, v), ref0)
    ref0j = hyper_attention_reference(q, k, v, e_kv, e_kv, e_pos, e_cu, mode="joint")
    torch.testing.assert_close(P.JointFlexPeer(e_pos, e_cu, Lq, Lk, T)(q, k, v, e_kv, e_kv), ref0j)


def test_unavailable_reason():
    """A peer that cannot run says why (CPU FlexAttention has no backward) and raises if called."""
    _, _, _, _, _, pos, cu = _inputs(torch.float32, 4, 4, [1], [0, 1])
    peer = P.JointFlexPeer(pos, cu, 4, 4, T, needs_grad=True, device="cpu")
    assert peer.unavailable and "backward" in peer.unavailable
    with pytest.raises(RuntimeError, match="backward"):
        peer(*_inputs(torch.float32, 4, 4, [1], [0, 1])[:5])


def test_document_flex_peer_matches_varlen_reference():
    """Packed samples (one empty, one without images, one chunked: L_q < L_k): the document-mask peer
    equals hyper_attention_varlen's reference, both visibility rules."""
    from mmkernels import hyper_attention_varlen_reference

    g = torch.Generator().manual_seed(2)
    len_q, len_k, n_img = [4, 0, 6, 3], [7, 0, 6, 3], [2, 0, 0, 1]
    i32 = dict(dtype=torch.int32)
    cu_q = torch.tensor([0, 4, 4, 10, 13], **i32)
    cu_k = torch.tensor([0, 7, 7, 13, 16], **i32)
    pos, cu_img = torch.tensor([1, 5, 2], **i32), torch.tensor([0, 2, 2, 2, 3], **i32)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = r(sum(len_q), H, D), r(sum(len_k), HKV, D), r(sum(len_k), HKV, D)
    kv, vv = r(sum(n_img), T, HKV, D), r(sum(n_img), T, HKV, D)
    for visibility in ("strict", "inclusive"):
        ref = hyper_attention_varlen_reference(q, k, v, kv, vv, cu_q, cu_k, 6, 7, pos, cu_img, mode="joint",
                                               visibility=visibility)
        peer = P.DocumentFlexPeer(cu_q, cu_k, pos, cu_img, T, visibility=visibility)
        torch.testing.assert_close(peer(q, k, v, kv, vv), ref, **TOL[torch.float64])


def test_flash_varlen_peer_says_why_it_cannot_run():
    cu = torch.tensor([0, 3], dtype=torch.int32)
    peer = P.FlashVarlenCausalPeer(cu, cu, 3, 3)
    if P.flash_varlen_unavailable() is None:
        pytest.skip("flash-attn is installed (it runs on CUDA only)")
    assert peer.unavailable and "flash-attn" in peer.unavailable
