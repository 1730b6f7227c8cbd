"""Hyper Attention's split-K decode path (a few query rows against the text and visual keys, then a
merge): against the float64 reference and the full forward's last rows, over several split counts
(chunks that do not divide the key counts), bitwise deterministic, and the static cache equal to the
growing one step for step in half precision."""
import pytest
import torch

from mmkernels import HyperAttention, hyper_attention, hyper_attention_reference, use_backend
from mmkernels.ops.hyper_attention import launch
from mmkernels.testing import assert_close

from conftest import KERNEL_DEVICES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["float32", "float16", "bfloat16"]
B, L, H, Hkv, D, T = 3, 40, 4, 2, 16, 7


def _inputs(dtype, device, n_images=5):
    """3 samples: images at 2 and at the last position L - 1 (the last row's own: the strict rule does not
    show it to that row, the inclusive one does); no image; images at 0, 4, 5 after 3 padded keys."""
    ints = dict(dtype=torch.int32, device=device)
    if n_images:
        pos, cu = torch.tensor([2, L - 1, 0, 4, 5], **ints), torch.tensor([0, 2, 2, 5], **ints)
    else:
        pos, cu = torch.zeros(0, **ints), torch.zeros(B + 1, **ints)
    q = torch.randn(B, L, H, D, dtype=dtype, device=device)
    k, v = (torch.randn(B, L, Hkv, D, dtype=dtype, device=device) for _ in range(2))
    kv, vv = (torch.randn(n_images, T, Hkv, D, dtype=dtype, device=device) for _ in range(2))
    kpm = torch.ones(B, L, dtype=torch.bool, device=device)
    kpm[2, :3] = False
    kpm[0, 11] = False
    return q, k, v, kv, vv, pos, cu, kpm


def _decode(q, k, v, kv, vv, pos, cu, kpm, Lq, mode, visibility, gate):
    assert launch.use_decode_path(Lq, H // Hkv)
    with use_backend("triton"):
        return hyper_attention(q[:, -Lq:], k, v, kv, vv, pos, cu, mode=mode, gate=gate, visibility=visibility,
                               key_padding_mask=kpm)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("visibility", ["strict", "inclusive"])
@pytest.mark.parametrize("mode", ["gated", "joint"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_decode_matches_reference_and_full_forward(device, dtype, mode, visibility, monkeypatch):
    """GQA 2, a left-padded sample, a sample without images, an image at the row's own position; one row
    and three rows; 1 and 8 SMs' worth of splits (chunks of 32 and 16 keys: 40 text keys and 14 / 21
    visual keys per sample are not multiples).  Every split count gives the reference's result, the full
    forward's last rows, and the same bits when run again."""
    q, k, v, kv, vv, pos, cu, kpm = _inputs(dtype, device)
    gate = torch.randn(H * D, dtype=dtype, device=device) if mode == "gated" else None
    with use_backend("triton"):
        full = hyper_attention(q, k, v, kv, vv, pos, cu, mode=mode, gate=gate, visibility=visibility,
                               key_padding_mask=kpm)
    ref = hyper_attention_reference(*(t.double() for t in (q, k, v, kv, vv)), pos, cu, mode=mode,
                                    gate=None if gate is None else gate.double(), visibility=visibility,
                                    key_padding_mask=kpm)
    for sms, chunk, rows in ((1, 32, (1, 3)), (8, 16, (1,))):
        monkeypatch.setitem(launch.DECODE_MACHINE, "cpu", (sms, None))
        cfg = launch._config("decode", q.device, dtype, D)
        slots = sms * launch.decode_residency(q.device, dtype, D, cfg)[1]
        assert launch.decode_plan(B, L, 5, T, Hkv, cfg["BLOCK_N"], slots, 64)[0] == chunk
        for Lq in rows:
            out = _decode(q, k, v, kv, vv, pos, cu, kpm, Lq, mode, visibility, gate)
            assert_close(f"decode rows[-{Lq}:] vs reference ({sms} SMs)", out, ref[:, -Lq:], dtype)
            assert_close(f"decode rows[-{Lq}:] vs full forward ({sms} SMs)", out, full[:, -Lq:].double(), dtype)
    again = _decode(q, k, v, kv, vv, pos, cu, kpm, 1, mode, visibility, gate)
    assert torch.equal(out, again), "the decode path is not deterministic"


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("mode", ["gated", "joint"])
def test_decode_one_sample_and_no_images(device, mode, monkeypatch):
    """One sample (its image layout is all of k_vis, cu is not read) and a batch without any image, in
    bf16, one and two rows, several splits."""
    monkeypatch.setitem(launch.DECODE_MACHINE, "cpu", (1, None))
    dtype = torch.bfloat16
    gate = torch.randn(H * D, dtype=dtype, device=device) if mode == "gated" else None
    for n_images in (5, 0):
        q, k, v, kv, vv, pos, cu, kpm = _inputs(dtype, device, n_images)
        if n_images:  # the first sample alone: images at 2 and L - 1
            q, k, v, kpm = q[:1], k[:1], v[:1], kpm[:1]
            kv, vv, pos, cu = kv[:2], vv[:2], pos[:2], cu[:2]
        for visibility in ("strict", "inclusive"):
            ref = hyper_attention_reference(*(t.double() for t in (q, k, v, kv, vv)), pos, cu, mode=mode,
                                            gate=None if gate is None else gate.double(), visibility=visibility,
                                            key_padding_mask=kpm)
            for Lq in (1, 2):
                out = _decode(q, k, v, kv, vv, pos, cu, kpm, Lq, mode, visibility, gate)
                assert_close(f"{n_images} images, {visibility}, rows[-{Lq}:]", out, ref[:, -Lq:], dtype)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_decode_int64_tile_offsets(device, monkeypatch):
    """The split's int64 tile offsets (used when BLOCK_N keys of some stride pass 2^31 elements) give the
    same bits as the int32 ones."""
    q, k, v, kv, vv, pos, cu, kpm = _inputs(torch.float16, device)
    gate = torch.randn(H * D, dtype=torch.float16, device=device)
    narrow = _decode(q, k, v, kv, vv, pos, cu, kpm, 2, "gated", "strict", gate)
    monkeypatch.setattr(launch, "DECODE_INT32_TILE_OFFSETS", 1)
    wide = _decode(q, k, v, kv, vv, pos, cu, kpm, 2, "gated", "strict", gate)
    assert torch.equal(narrow, wide)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("mode", ["gated", "joint"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_static_cache_equals_growing_cache_in_half_precision(device, dtype, mode):
    """Decode steps on a static cache (all max_len keys, the unfilled ones masked) equal the same steps on a
    growing cache (a different key count, so other splits) within the dtype's tolerance, against the
    growing cache's output in float64."""
    torch.manual_seed(0)
    hidden, steps = 64, 2
    layer = HyperAttention(hidden, H, Hkv, D, rope_theta=1e4, mode=mode, device=device, dtype=dtype)
    if mode == "gated":
        torch.nn.init.normal_(layer.gate)
    x = torch.randn(2, 9, hidden, device=device, dtype=dtype)
    img = torch.randn(3, T, hidden, device=device, dtype=dtype)
    ints = dict(dtype=torch.int32, device=device)
    pos, cu = torch.tensor([1, 5, 4], **ints), torch.tensor([0, 2, 3], **ints)
    kpm = torch.ones(2, 9, dtype=torch.bool, device=device)
    kpm[1, :2] = False
    pid = (kpm.long().cumsum(1) - 1).clamp(min=0)
    xs = torch.randn(2, steps, hidden, device=device, dtype=dtype)
    with torch.no_grad(), use_backend("triton"):
        _, grow = layer(x, pid, img, pos, cu, key_padding_mask=kpm, use_cache=True)
        static = grow.to_static(9 + steps + 5, key_padding_mask=kpm)
        mask = kpm
        for s in range(steps):
            step_pid = pid[:, -1:] + 1 + s
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool, device=device)], 1)
            want, grow = layer(xs[:, s:s + 1], step_pid, past_key_value=grow, key_padding_mask=mask, use_cache=True)
            got, _ = layer(xs[:, s:s + 1], step_pid, past_key_value=static)
            assert_close(f"static step {s}", got, want.double(), dtype)
