"""Hyper attention on packed samples (``hyper_attention_varlen``, flash-attn's ``cu_seqlens``): the packed
batch equals the same samples run one by one, in outputs and every gradient, on both backends.

Random layouts per test (from the session seed): sample lengths including 1, 0 (an empty sample) and
lengths no block size divides, 0 to 3 images per sample, chunked prefill (``L_q < L_k``) per sample.
Tiny shapes: the Triton kernels run under the interpreter on CPU."""
import dataclasses

import pytest
import torch

from mmkernels import (hyper_attention, hyper_attention_reference, hyper_attention_varlen,
                       hyper_attention_varlen_reference, use_backend)
from mmkernels.testing import assert_close

from conftest import BACKEND_DEVICES, KERNEL_DEVICES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["float32", "float16", "bfloat16"]
INT = dict(dtype=torch.int32)


@dataclasses.dataclass
class Packed:
    """A packed batch: the tensors, the metadata and the per-sample slices."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_vis: torch.Tensor
    v_vis: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    pos: torch.Tensor
    cu_img: torch.Tensor

    @property
    def args(self):
        return (self.q, self.k, self.v, self.k_vis, self.v_vis, self.cu_q, self.cu_k, self.max_q, self.max_k,
                self.pos, self.cu_img)

    def samples(self):
        """``(rows, keys, images)`` slices of each sample."""
        cq, ck, ci = self.cu_q.tolist(), self.cu_k.tolist(), self.cu_img.tolist()
        return [(slice(cq[s], cq[s + 1]), slice(ck[s], ck[s + 1]), slice(ci[s], ci[s + 1]))
                for s in range(len(cq) - 1)]


def _offsets(lengths, device):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), **INT, device=device)


def packed_case(len_k, H, Hkv, D, T, dtype, device, *, chunked=False, n_images=None):
    """Samples of ``len_k`` keys each; queries: all of them, or (``chunked``) a random number of the last
    ones (0 included); each sample gets ``n_images[s]`` (default: random 0..3) images at random positions
    of its own coordinates."""
    S = len(len_k)
    len_q = [int(torch.randint(0, lk + 1, ())) if chunked else lk for lk in len_k]
    if n_images is None:
        n_images = [int(torch.randint(0, 4, ())) for _ in range(S)]
    n_images = [min(n, lk) for n, lk in zip(n_images, len_k)]
    pos = [torch.randperm(lk)[:n].sort().values for n, lk in zip(n_images, len_k)]
    pos = torch.cat(pos).to(torch.int32).to(device) if S else torch.zeros(0, **INT, device=device)
    N = sum(n_images)
    rand = lambda *shape: torch.randn(*shape, device=device).to(dtype)  # noqa: E731
    return Packed(rand(sum(len_q), H, D), rand(sum(len_k), Hkv, D), rand(sum(len_k), Hkv, D),
                  rand(N, T, Hkv, D), rand(N, T, Hkv, D), _offsets(len_q, device), _offsets(len_k, device),
                  max(len_q, default=0), max(len_k, default=0), pos, _offsets(n_images, device))


def random_lengths(S, low=2, high=40):
    """``S`` key lengths: one of 1, the others random in [low, high] (block sizes are powers of two)."""
    lengths = torch.randint(low, high + 1, (S,)).tolist()
    lengths[int(torch.randint(0, S, ()))] = 1
    return lengths


def make_gate(kind, total_q, H, D, dtype, device):
    if kind == "vector":
        return torch.randn(H * D, device=device).to(dtype)
    return torch.randn(total_q, 1, D, device=device).to(dtype)    # per token, broadcast over heads


def run_packed(p, gate, mode, visibility, backend, dout=None):
    """``(out, grads)`` of hyper_attention_varlen on ``backend`` (grads: q, k, v, k_vis, v_vis[, gate])."""
    inputs = [p.q, p.k, p.v, p.k_vis, p.v_vis] + ([gate] if mode == "gated" else [])
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    args = (*leaves[:5], *p.args[5:])
    with use_backend(backend):
        out = hyper_attention_varlen(*args, mode=mode, gate=leaves[5] if mode == "gated" else None,
                                     visibility=visibility)
    if dout is None:
        return out, None
    out.backward(dout)
    return out, [t.grad for t in leaves]


def run_per_sample(p, gate, mode, visibility, backend, dout, dtype=None):
    """The same samples one by one through the dense ``hyper_attention`` (a batch of one each), in
    ``dtype`` (default: the inputs'); the gradients of the shared inputs add up over the samples."""
    inputs = [p.q, p.k, p.v, p.k_vis, p.v_vis] + ([gate] if mode == "gated" else [])
    leaves = [t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in inputs]
    q, k, v, kv, vv = leaves[:5]
    H, D = q.shape[1], q.shape[2]
    g = None
    if mode == "gated":
        g = leaves[5].view(H, D) if leaves[5].dim() == 1 else leaves[5]
        g = g.expand(q.shape)
    outs = []
    with use_backend(backend):
        for rows, keys, imgs in p.samples():
            cu = torch.tensor([0, imgs.stop - imgs.start], **INT, device=q.device)
            outs.append(hyper_attention(q[None, rows], k[None, keys], v[None, keys], kv[imgs], vv[imgs],
                                        p.pos[imgs], cu, mode=mode, gate=None if g is None else g[None, rows],
                                        visibility=visibility)[0])
    out = torch.cat(outs)
    out.backward(dout.to(out.dtype))
    return out, [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]


GRAD_NAMES = ["dq", "dk", "dv", "dk_vis", "dv_vis", "dgate"]


def check_packed_against_per_sample(p, gate, mode, visibility, backend, dtype):
    """Packed on ``backend`` against the per-sample float64 reference: output and every gradient."""
    dout = torch.randn(p.q.shape, device=p.q.device).to(dtype)
    out, grads = run_packed(p, gate, mode, visibility, backend, dout)
    out_ref, grads_ref = run_per_sample(p, gate, mode, visibility, "reference", dout, torch.float64)
    assert_close("out", out, out_ref, dtype)
    for name, got, ref in zip(GRAD_NAMES, grads, grads_ref):
        assert got is not None, name
        assert_close(name, got, ref, dtype)
    return out, grads


# --------------------------------------------------------------------------- packed == per sample

CASES = [("gated", "strict", "vector", False), ("gated", "inclusive", "token", True),
         ("joint", "strict", None, True), ("joint", "inclusive", None, False)]


@pytest.mark.parametrize("mode,visibility,gate_kind,chunked", CASES,
                         ids=["gated-strict-vector", "gated-inclusive-token-chunked", "joint-strict-chunked",
                              "joint-inclusive"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_packed_equals_per_sample(backend, device, dtype, mode, visibility, gate_kind, chunked):
    """Five samples (one of length 1, one without images, random lengths and image positions), GQA 2;
    in the chunked cases each sample's queries are a random number of its last positions."""
    H, Hkv, D, T = 2, 1, 16, 5
    p = packed_case(random_lengths(5), H, Hkv, D, T, dtype, device, chunked=chunked, n_images=[2, 0, 3, 1, 2])
    gate = make_gate(gate_kind, p.q.shape[0], H, D, dtype, device) if mode == "gated" else None
    check_packed_against_per_sample(p, gate, mode, visibility, backend, dtype)


@pytest.mark.parametrize("mode", ["gated", "joint"])
def test_reference_equals_left_padded_batch(mode):
    """The packed reference against an independent construction: the same samples left-padded into a dense
    ``[S, L, ...]`` batch whose key padding mask hides the padding (positions shift by the padding), chunked
    prefill included.  The padded query rows are ignored."""
    H, Hkv, D, T = 2, 1, 8, 3
    p = packed_case(random_lengths(4), H, Hkv, D, T, torch.float64, "cpu", chunked=True, n_images=[1, 2, 0, 2])
    gate = torch.randn(H * D, dtype=torch.float64) if mode == "gated" else None
    out = hyper_attention_varlen_reference(*p.args, mode=mode, gate=gate)
    S, Lq, Lk = len(p.samples()), p.max_q, p.max_k
    q = torch.zeros(S, Lq, H, D, dtype=torch.float64)
    k, v = torch.zeros(S, Lk, Hkv, D, dtype=torch.float64), torch.zeros(S, Lk, Hkv, D, dtype=torch.float64)
    kpm = torch.zeros(S, Lk, dtype=torch.bool)
    pos = p.pos.clone()
    for s, (rows, keys, imgs) in enumerate(p.samples()):
        nq, nk = rows.stop - rows.start, keys.stop - keys.start
        q[s, Lq - nq:], k[s, Lk - nk:], v[s, Lk - nk:] = p.q[rows], p.k[keys], p.v[keys]
        kpm[s, Lk - nk:] = True
        pos[imgs] += Lk - nk
    padded = hyper_attention_reference(q, k, v, p.k_vis, p.v_vis, pos, p.cu_img, mode=mode, gate=gate,
                                       key_padding_mask=kpm)
    expected = torch.cat([padded[s, Lq - (rows.stop - rows.start):] for s, (rows, _, _) in enumerate(p.samples())])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_empty_samples_and_batches(backend, device):
    """Empty samples (no query, or neither query nor key), a batch without images, an empty batch."""
    H, Hkv, D, T = 2, 1, 16, 4
    p = packed_case([6, 0, 9, 3], H, Hkv, D, T, torch.float32, device, n_images=[1, 0, 2, 0])
    p.cu_q = _offsets([6, 0, 0, 3], device)          # sample 2: keys only (L_q = 0)
    p.q = p.q[:9]
    p.max_q = 6
    check_packed_against_per_sample(p, None, "joint", "strict", backend, torch.float32)
    p = packed_case([5, 2], H, Hkv, D, T, torch.float32, device, n_images=[0, 0])
    check_packed_against_per_sample(p, torch.randn(H * D, device=device), "gated", "inclusive", backend,
                                    torch.float32)
    p = packed_case([], H, Hkv, D, T, torch.float32, device)
    leaves = [t.requires_grad_() for t in (p.q, p.k, p.v, p.k_vis, p.v_vis)]
    with use_backend(backend):
        out = hyper_attention_varlen(*p.args, mode="joint")
    assert out.shape == (0, H, D)
    out.sum().backward()
    assert all(t.grad is not None and t.grad.shape == t.shape for t in leaves)


# --------------------------------------------------------------------------- bad input

def _bad_case():
    H, Hkv, D, T = 4, 2, 16, 3
    p = packed_case([5, 3, 4], H, Hkv, D, T, torch.float32, "cpu", n_images=[2, 0, 1])
    p.pos = torch.tensor([1, 4, 2], **INT)
    return dict(q=p.q, k=p.k, v=p.v, k_vis=p.k_vis, v_vis=p.v_vis, cu_seqlens_q=p.cu_q, cu_seqlens_k=p.cu_k,
                max_seqlen_q=5, max_seqlen_k=5, image_positions=p.pos, cu_images=p.cu_img,
                gate=torch.zeros(H * D))


def _cu(values):
    return torch.tensor(values, **INT)


BAD_INPUTS = [
    ("q not 3-D", lambda a: a.update(q=a["q"][None]), ValueError, "q must be 3-D"),
    ("heads", lambda a: a.update(q=a["q"][:, :3]), ValueError, "multiple"),
    ("head dim", lambda a: a.update(k=a["k"][..., :8], v=a["v"][..., :8]), ValueError, "k must"),
    ("v shape", lambda a: a.update(v=a["v"][:-1]), ValueError, "v must"),
    ("vis head dim", lambda a: a.update(k_vis=a["k_vis"][..., :8]), ValueError, "k_vis"),
    ("cu_seqlens_k length", lambda a: a.update(cu_seqlens_k=a["cu_seqlens_k"][:3]), ValueError, "cu_seqlens_k"),
    ("cu_images length", lambda a: a.update(cu_images=a["cu_images"][:3]), ValueError,
     r"cu_images must have shape \(4,\)"),
    ("cu_seqlens_q empty", lambda a: a.update(cu_seqlens_q=_cu([])), ValueError, "cu_seqlens_q"),
    ("cu_seqlens_q float", lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].float()), TypeError, "cu_seqlens_q"),
    ("cu_seqlens_q start", lambda a: a.update(cu_seqlens_q=_cu([1, 5, 8, 12])), ValueError,
     "cu_seqlens_q must start at 0"),
    ("cu_seqlens_q not monotone", lambda a: a.update(cu_seqlens_q=_cu([0, 8, 5, 12])), ValueError,
     "cu_seqlens_q must be monotone"),
    ("cu_seqlens_q total", lambda a: a.update(cu_seqlens_q=_cu([0, 5, 8, 11])), ValueError,
     "cu_seqlens_q must end at total_q=12"),
    ("cu_seqlens_k total", lambda a: a.update(cu_seqlens_k=_cu([0, 5, 8, 13])), ValueError,
     "cu_seqlens_k must end at total_k=12"),
    ("L_q > L_k", lambda a: a.update(cu_seqlens_q=_cu([0, 4, 8, 12]), max_seqlen_q=4), ValueError,
     "sample 1 has L_q=4"),
    ("max_seqlen_q too small", lambda a: a.update(max_seqlen_q=4), ValueError, "max_seqlen_q=4"),
    ("max_seqlen_k too small", lambda a: a.update(max_seqlen_k=3), ValueError, "max_seqlen_k=3"),
    ("max_seqlen_q negative", lambda a: a.update(max_seqlen_q=-1), ValueError, "max_seqlen_q"),
    ("max_seqlen_k float", lambda a: a.update(max_seqlen_k=5.0), TypeError, "max_seqlen_k"),
    ("cu_images end", lambda a: a.update(cu_images=_cu([0, 2, 2, 2])), ValueError, "cu_images must end"),
    ("image outside its sample", lambda a: a.update(image_positions=_cu([1, 4, 4])), ValueError,
     r"sample 2: L_k=4"),
    ("negative position", lambda a: a.update(image_positions=_cu([-1, 4, 2])), ValueError, "image_positions"),
    ("positions not increasing", lambda a: a.update(image_positions=_cu([4, 1, 2])), ValueError, "increasing"),
    ("gate shape", lambda a: a.update(gate=torch.zeros(11, 4, 16)), ValueError, r"\[total_q, H, D\]"),
    ("gate missing", lambda a: a.update(gate=None), ValueError, "gate is required"),
    ("gate in joint mode", lambda a: a.update(mode="joint"), ValueError, "gate must be None"),
    ("mixed dtypes", lambda a: a.update(v=a["v"].half()), TypeError, "v has dtype"),
    ("float positions", lambda a: a.update(image_positions=a["image_positions"].float()), TypeError,
     "image_positions"),
    ("bad mode", lambda a: a.update(mode="fused"), ValueError, "mode"),
    ("bad visibility", lambda a: a.update(visibility="all"), ValueError, "visibility"),
    ("negative scale", lambda a: a.update(scale=-1.0), ValueError, "scale"),
]


@pytest.mark.parametrize("name,mutate,exc,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs(name, mutate, exc, match):
    args = _bad_case()
    args.setdefault("mode", "gated")
    mutate(args)
    names = ("q", "k", "v", "k_vis", "v_vis", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
             "image_positions", "cu_images")
    positional = [args.pop(n) for n in names]
    with pytest.raises(exc, match=match):
        hyper_attention_varlen(*positional, **args)


def test_check_metadata_false_skips_the_value_checks():
    """check_metadata=False trusts the values (no host sync); shapes and dtypes are still checked."""
    args = _bad_case()
    names = ("q", "k", "v", "k_vis", "v_vis", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
             "image_positions", "cu_images")
    positional = [args.pop(n) for n in names]
    positional[9] = _cu([4, 1, 2])                # not increasing: only the value check sees it
    with use_backend("reference"):
        hyper_attention_varlen(*positional, **args, check_metadata=False)
        with pytest.raises(ValueError, match="increasing"):
            hyper_attention_varlen(*positional, **args)


# --------------------------------------------------------------------------- the kernels

@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("mode,Hkv", [("gated", 1), ("joint", 2)])
def test_packed_is_bitwise_the_dense_kernels(device, mode, Hkv):
    """Each packed sample runs exactly the tiles and arithmetic of the same sample in a batch of one:
    output and every gradient are bitwise equal to the dense kernels' (d(gate), summed over the rows in
    another order, is close).  Queries of at least 17 rows, so that the dense runs take the same row-block
    kernels (not the split-K decode); GQA 4 and 2; chunked prefill."""
    H, D, T = 4, 16, 6
    len_k = [int(x) for x in torch.randint(20, 45, (3,))]     # sample 2's L_q = L_k - 3 >= 17
    p = packed_case(len_k, H, Hkv, D, T, torch.float16, device, n_images=[2, 0, 3])
    p.cu_q = _offsets([len_k[0], 17, len_k[2] - 3], device)         # sample 1: its last 17 rows, sample 2: 3 fewer
    p.q = torch.randn(int(p.cu_q[-1]), H, D, device=device).half()
    gate = torch.randn(H * D, device=device).half() if mode == "gated" else None
    dout = torch.randn(p.q.shape, device=device).half()
    out, grads = run_packed(p, gate, mode, "strict", "triton", dout)
    out_dense, grads_dense = run_per_sample(p, gate, mode, "strict", "triton", dout)
    assert torch.equal(out, out_dense)
    for name, a, b in zip(GRAD_NAMES, grads, grads_dense):
        if name == "dgate":
            torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("visibility", ["strict", "inclusive"])
def test_block_classification_is_per_sample(device, visibility):
    """The block classes of a packed batch are, sample by sample, those of the sample alone (the dense
    classification, checked against the dense mask in test_hyper_attention.py), in both views; the
    blocks past a sample's end are empty."""
    from mmkernels.ops.hyper_attention import launch
    from mmkernels.ops.hyper_attention.function import hyper_attention_layout_op, hyper_attention_varlen_layout_op

    T = 7
    p = packed_case([37, 1, 20, 0, 29], 2, 1, 16, T, torch.float32, device, chunked=True, n_images=[3, 1, 0, 0, 2])
    inclusive = visibility == "inclusive"
    fwd = launch._config("fwd", torch.device(device), torch.float32, 16)
    bwd = launch._config("bwd", torch.device(device), torch.float32, 16)
    packed = launch.Packed(p.cu_q, p.cu_k, p.max_q, p.max_k)
    layout = hyper_attention_varlen_layout_op(p.pos, p.cu_img, p.cu_q, p.cu_k, p.q.shape[0], p.max_q, p.max_k,
                                              inclusive)
    N = p.pos.shape[0]
    rows, keys = launch.block_classes(layout, p.cu_img, p.max_q, p.max_k, T, N, fwd, bwd, packed)
    BN, BN_KV = fwd["BLOCK_N"], bwd["BLOCK_N_KV"]
    S = len(p.samples())
    n_vis = -(-N * T // BN)
    n_text_blocks = -(-p.max_k // BN_KV) * S
    per_image = -(-T // BN_KV)
    for s, (r, k, imgs) in enumerate(p.samples()):
        Lq, Lk, n_s = r.stop - r.start, k.stop - k.start, imgs.stop - imgs.start
        cu = torch.tensor([0, n_s], **INT, device=device)
        pos = p.pos[imgs]
        dense_layout = hyper_attention_layout_op(pos, cu, Lq, Lk, T, inclusive)
        d_rows, d_keys = launch.block_classes(dense_layout, cu, Lq, Lk, T, n_s, fwd, bwd)
        want = torch.zeros_like(rows[s])
        nv, nt = -(-n_s * T // BN), -(-Lk // BN)
        want[:d_rows.shape[1], :nv] = d_rows[0, :, :nv]
        want[:d_rows.shape[1], n_vis:n_vis + nt] = d_rows[0, :, nv:]
        assert torch.equal(rows[s], want), f"sample {s}: row blocks"
        for kb in range(-(-p.max_k // BN_KV)):
            want = torch.zeros_like(keys[0])
            if kb < -(-Lk // BN_KV):
                want[:d_keys.shape[1]] = d_keys[kb]
            assert torch.equal(keys[kb * S + s], want), f"sample {s}: text key block {kb}"
        for j in range(n_s):
            for kb in range(per_image):
                got = keys[n_text_blocks + (imgs.start + j) * per_image + kb]
                want = torch.zeros_like(got)
                want[:d_keys.shape[1]] = d_keys[-(-Lk // BN_KV) + j * per_image + kb]
                assert torch.equal(got, want), f"sample {s}: image {j} key block {kb}"


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("mode", ["gated", "joint"])
def test_gpu_like_tiles(device, mode, monkeypatch):
    """The GPU's tile geometry at interpreter scale (32-row forward and dQ blocks, dK/dV blocks of 32 keys x
    32 rows with the partial rows in steps of 16): sample boundaries fall inside blocks of every kind."""
    from mmkernels.ops.hyper_attention import launch

    real = launch._config

    def config(name, dev, dt, head_dim):
        cfg = real(name, dev, dt, head_dim)
        if name == "fwd":
            cfg.update(BLOCK_M=32)
        if name == "bwd":
            cfg.update(BLOCK_M=32, BLOCK_N=16, BLOCK_N_KV=32, BLOCK_M_KV=32, BLOCK_M_KV_MASKED=16)
        return cfg
    monkeypatch.setattr(launch, "_config", config)
    H, Hkv, D, T = 4, 2, 16, 19
    p = packed_case(random_lengths(4, 20, 70), H, Hkv, D, T, torch.float32, device, chunked=True,
                    n_images=[3, 1, 0, 2])
    gate = torch.randn(H * D, device=device) if mode == "gated" else None
    check_packed_against_per_sample(p, gate, mode, "inclusive", "triton", torch.float32)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_layout_computed_once_per_training_step(device, monkeypatch):
    """The block classification of every sample is computed once; the backward reuses the forward's."""
    from mmkernels.ops.hyper_attention import launch

    calls = []
    real = launch.hyper_layout
    monkeypatch.setattr(launch, "hyper_layout", lambda *a: calls.append(a) or real(*a))
    p = packed_case([9, 4], 2, 1, 16, 3, torch.float32, device, n_images=[1, 1])
    run_packed(p, None, "joint", "strict", "triton", torch.randn(p.q.shape, device=device))
    assert len(calls) == 1


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("queries", ["chunked", "none"])
def test_opcheck(device, queries):
    """The ops against their fakes, autograd formula included; ``none``: no sample has a query row (the
    saved gated parts are then empty ``[0, H, D]`` tensors, as the fake says)."""
    p = packed_case([11, 1, 6], 2, 1, 16, 4, torch.float32, device, chunked=True, n_images=[2, 0, 1])
    if queries == "none":
        p.cu_q, p.max_q = torch.zeros_like(p.cu_q), 0
        p.q = p.q[:0].clone()
    q, k, v, kv, vv = [t.requires_grad_() for t in (p.q, p.k, p.v, p.k_vis, p.v_vis)]
    gate = torch.randn(2 * 16, device=device, requires_grad=True)
    meta = (p.cu_q, p.cu_k, p.max_q, p.max_k, p.pos, p.cu_img)
    layout = torch.ops.mmkernels.hyper_attention_varlen_layout.default(p.pos, p.cu_img, p.cu_q, p.cu_k, q.shape[0],
                                                                        p.max_q, p.max_k, False)
    torch.library.opcheck(torch.ops.mmkernels.hyper_attention_varlen_layout.default,
                          (p.pos, p.cu_img, p.cu_q, p.cu_k, q.shape[0], p.max_q, p.max_k, True))
    op = torch.ops.mmkernels.hyper_attention_varlen_fwd.default
    for args in ((q, k, v, kv, vv, *meta, None, False, True, 0.3, False),
                 (q, k, v, kv, vv, *meta, gate, True, False, 16 ** -0.5, True, layout)):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_torch_compile_dynamic_total(device):
    """torch.compile(fullgraph=True) with dynamic shapes: a second packing with other totals and lengths
    reuses the compiled graph; outputs and gradients equal eager mode.  Without duck shaping: with it,
    a random total that happens to equal a static size (the head dim 16, T) shares its symbol, is
    specialised with it, and the second packing recompiles (torch's behaviour, not the op's)."""
    import torch.fx.experimental._config as fx_config
    from torch._dynamo.testing import CompileCounterWithBackend

    H, Hkv, D, T = 2, 1, 16, 4

    def fn(q, k, v, kv, vv, cu_q, cu_k, max_q, max_k, pos, cu_img, gate):
        return hyper_attention_varlen(q, k, v, kv, vv, cu_q, cu_k, max_q, max_k, pos, cu_img, gate=gate) * 2

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counter)
    with fx_config.patch(use_duck_shape=False):
        _compile_two_packings(fn, compiled, H, Hkv, D, T, device)
    assert counter.frame_count == 1


def _compile_two_packings(fn, compiled, H, Hkv, D, T, device):
    for len_k, n_images in (([13, 6, 9], [1, 0, 2]), ([7, 20, 3], [2, 1, 0])):
        p = packed_case(len_k, H, Hkv, D, T, torch.float32, device, chunked=True, n_images=n_images)
        while p.q.shape[0] < 2 or p.max_q < 2:   # dynamo specialises sizes and ints of 0 and 1: draw again
            p = packed_case(len_k, H, Hkv, D, T, torch.float32, device, chunked=True, n_images=n_images)
        gate = torch.randn(H * D, device=device)
        results = []
        for f in (fn, compiled):
            leaves = [t.detach().clone().requires_grad_() for t in (p.q, p.k, p.v, p.k_vis, p.v_vis, gate)]
            with use_backend("triton"):
                out = f(*leaves[:5], *p.args[5:], leaves[5])
            out.backward(torch.ones_like(out))
            results.append([out] + [t.grad for t in leaves])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b)


def test_meta_tensors_give_the_shape():
    p = packed_case([5, 3], 4, 2, 16, 3, torch.float32, "cpu", n_images=[1, 1])
    q, k, v, kv, vv = (t.to("meta") for t in (p.q, p.k, p.v, p.k_vis, p.v_vis))
    meta = [t.to("meta") for t in (p.cu_q, p.cu_k)]
    out = hyper_attention_varlen(q, k, v, kv, vv, *meta, p.max_q, p.max_k, p.pos.to("meta"), p.cu_img.to("meta"),
                                 gate=torch.zeros(4 * 16, device="meta"))
    assert out.device.type == "meta" and out.shape == p.q.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is a CUDA matter")
def test_no_host_sync_with_check_metadata_false():
    """With check_metadata=False the packed forward and backward never wait for the GPU: max_seqlen_*
    size the grids, the offsets are read by the kernels only (gated mode: it launches every kernel the
    joint mode does, and the gate's reduction)."""
    mode = "gated"
    H, Hkv, D, T = 4, 2, 64, 9
    p = packed_case([33, 1, 0, 70], H, Hkv, D, T, torch.bfloat16, "cuda", chunked=True, n_images=[2, 1, 0, 3])
    leaves = [t.requires_grad_() for t in (p.q, p.k, p.v, p.k_vis, p.v_vis)]
    gate = torch.randn(H * D, device="cuda", dtype=torch.bfloat16, requires_grad=True) if mode == "gated" else None
    dout = torch.randn_like(p.q)

    def step():
        with use_backend("triton"):
            out = hyper_attention_varlen(*leaves, *p.args[5:], mode=mode, gate=gate, check_metadata=False)
        out.backward(dout)
        return out
    want = step()                                  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got, want)
