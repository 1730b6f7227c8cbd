"""The shared GEMM core (mmkernels.ops._gemm): its TMA and pointer paths, the expert isolation of its
weight gradient, the per-arch table and the torch._grouped_mm path selection."""
import contextlib
import json
from dataclasses import replace

import pytest
import torch

from mmkernels import grouped_gemm, use_backend
from mmkernels.ops._gemm import config
from mmkernels.ops._gemm import launch as gemm_launch
from mmkernels.ops.moe import launch as moe_launch
from mmkernels.ops.moe.reference import route_reference
from mmkernels.ops.plora import launch as plora_launch
from mmkernels.testing import assert_close

from conftest import KERNEL_DEVICES
from test_moe import gumbel, make_weights, run_layer

# the Triton kernels' device in this process (the interpreter on CPU, else the GPU: marked gpu)
on_kernel_device = pytest.mark.parametrize("device", KERNEL_DEVICES)


def _same(name, got, want, device):
    """Bitwise under the interpreter (both paths run the same numpy dots in the same order); on a GPU
    the TMA and cp.async kernels are different programs, so within the dtype's tolerance."""
    if device == "cpu":
        assert torch.equal(got, want), f"{name} differs between the TMA and the pointer path"
    else:
        assert_close(name, got, want.double(), got.dtype)


class _DescriptorSpy:
    """Counts the TMA descriptors the core's launchers build (a path that silently fell back to
    pointers would leave the descriptor path untested)."""

    def __init__(self, monkeypatch):
        self.count = 0
        real = gemm_launch.TensorDescriptor

        def make(*args, **kwargs):
            self.count += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(gemm_launch, "TensorDescriptor", make)
        real_ragged = gemm_launch.create_ragged_descriptor

        def make_ragged(*args, **kwargs):
            self.count += 1
            return real_ragged(*args, **kwargs)

        monkeypatch.setattr(gemm_launch, "create_ragged_descriptor", make_ragged)


def _moe_inputs(device, dtype, activation, E=4, S=41, H=32, F=48, k=2, capacity=None):
    """Inputs of one MoE expert-FFN step (fresh random values, routed by the torch reference)."""
    x = torch.randn(S, H, device=device).to(dtype)
    d = route_reference(torch.randn(S, E, device=device), k, capacity, None)
    w = torch.rand(S, k, device=device)
    w1, b1, w2, b2 = make_weights(E, H, F, activation, dtype, device)
    dy = torch.randn(S, H, device=device).to(dtype)
    return x, d, w, w1, b1, w2, b2, dy, activation


def _moe_step(inputs):
    """fwd+bwd of the MoE expert FFN through the launchers: ``[y, dx, dweights, dw1, db1, dw2, db2]``."""
    x, d, w, w1, b1, w2, b2, dy, activation = inputs
    y, z, h, o = moe_launch.moe_ffn_forward(x, w, d.keep, d.sorted_slots, d.expert_offsets, w1, b1, w2, b2, activation)
    grads = moe_launch.moe_ffn_backward(dy, x, w, d.keep, d.sorted_slots, d.expert_offsets, w1, w2, z, h, o,
                                        activation, [True, True, True, b1 is not None, True, b2 is not None])
    return [y, *grads]


@on_kernel_device
@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_moe_tma_and_pointer_paths_agree_bitwise(device, monkeypatch, activation, dtype):
    """16-byte-aligned rows take the descriptor path (weights, sorted rows, the wgrad's ragged rows);
    the pointer path computes the same blocks in the same order, so the results are the same bits."""
    inputs = _moe_inputs(device, dtype, activation, capacity=20)
    spy = _DescriptorSpy(monkeypatch)
    with_tma = _moe_step(inputs)
    assert spy.count > 0, "no TMA descriptor was built: the descriptor path is untested"
    with gemm_launch.pointer_path_only():
        n = spy.count
        pointers = _moe_step(inputs)
        assert spy.count == n
    for i, (a, b) in enumerate(zip(with_tma, pointers)):
        _same(f"output {i}", a, b, device)


@on_kernel_device
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_plora_tma_and_pointer_paths_agree_bitwise(device, monkeypatch, dropout):
    M, K, N, R = 96, 64, 48, 32
    x, w = torch.randn(M, K), torch.randn(N, K) / 8
    a, lb = torch.randn(R, K) / 8, torch.randn(N, R) / 8
    b = torch.randn(N)
    mask = torch.zeros(M, dtype=torch.bool)
    mask[5:70] = True   # runs of all-visual tiles and mixed tiles
    x, w, a, lb, b, mask = (t.to(device) for t in (x, w, a, lb, b, mask))
    flags = plora_launch.tile_flags(mask)
    seed = torch.tensor([7], dtype=torch.int64, device=device) if dropout else None
    gy = torch.randn(M, N, device=device)

    def step():
        y, s = plora_launch.plora_forward(x, w, b, a, lb, mask, flags, 0.5, dropout, seed)
        return [y, s, *plora_launch.plora_backward(gy, x, w, a, lb, s, mask, flags, 0.5, dropout, seed, [True] * 5)]

    spy = _DescriptorSpy(monkeypatch)
    with_tma = step()
    assert spy.count > 0
    with gemm_launch.pointer_path_only():
        pointers = step()
    for i, (p, q) in enumerate(zip(with_tma, pointers)):
        _same(f"output {i}", p, q, device)


@on_kernel_device
def test_wgrad_keeps_a_nan_row_in_its_own_experts(device):
    """A NaN row of x reaches the weight gradients of the experts it was routed to and no other: the
    rows past an expert's end (the next expert's) read as zeros, on every path."""
    S, H, F, E = 40, 32, 16, 4
    x = torch.randn(S, H, device=device)
    x[11, 3] = float("nan")
    wg = torch.randn(E, H, device=device)
    weights = make_weights(E, H, F, "gelu_tanh", torch.float32, device)
    noise = gumbel(S, E, device)
    for pointer_only in (False, True):
        with gemm_launch.pointer_path_only() if pointer_only else contextlib.nullcontext():
            y, r, leaves = run_layer(x, wg, weights, "gelu_tanh", 2, None, noise, "triton")
            y.sum().backward()
        hit = set(r.indices[11].tolist())
        assert len(hit) == 2
        w1, b1, w2, b2 = leaves[2:]
        for e in range(E):
            finite = all(bool(torch.isfinite(t.grad[e]).all()) for t in (w1, b1, w2, b2))
            assert finite == (e not in hit), f"expert {e} (row 11 went to {sorted(hit)}), pointer_only={pointer_only}"


@on_kernel_device
def test_wgrad_zero_row_experts_write_zeros(device):
    """Experts with no rows get exact zeros in dW and dbias (poisoned outputs would show NaN)."""
    M, K, N = 30, 40, 24
    offsets = torch.tensor([0, 0, 17, 17, 30, 30], dtype=torch.int32, device=device)
    g, a = torch.randn(M, N, device=device), torch.randn(M, K, device=device)
    for pointer_only in (False, True):
        with gemm_launch.pointer_path_only() if pointer_only else contextlib.nullcontext():
            db, dbias = moe_launch.grouped_wgrad("grouped.wgrad", g, a, offsets, N=N, K=K, need_db=True, need_dbias=True)
        for e in (0, 2, 4):
            assert torch.count_nonzero(db[e]) == 0 and torch.count_nonzero(dbias[e]) == 0
        ref = torch.stack([g[lo:hi].T.double() @ a[lo:hi].double() for lo, hi in ((0, 17), (17, 30))])
        assert_close("db", db[[1, 3]], ref, torch.float32)
        assert_close("dbias", dbias[[1, 3]], torch.stack([g[:17].sum(0), g[17:].sum(0)]).double(), torch.float32)


@on_kernel_device
def test_persistent_schedule_covers_every_tile(device):
    """More tiles than programs, empty groups, and rows past the last group: every tile once."""
    M, K, N = 123, 48, 40
    sizes = [0, 1, 17, 0, 33, 5, 40]
    offsets = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), device=device)
    a = torch.randn(M, K, device=device)
    b = torch.randn(len(sizes), N, K, device=device) / 7
    with use_backend("triton"):
        c = grouped_gemm(a, b, offsets)
    with use_backend("reference"):
        ref = grouped_gemm(a.double(), b.double(), offsets)
    assert_close("c", c, ref, torch.float32)
    assert torch.count_nonzero(c[int(offsets[-1]):]) == 0


# ------------------------------------------------------------------------------------ config and paths

def test_every_role_has_an_entry_in_every_table():
    for arch, table in config.TABLES.items():
        assert set(table) == set(config.ROLES), arch
        for role, e in table.items():
            b = e.blocks
            assert e.path == config.TRITON and e.ctas_per_sm >= 1
            if role.endswith("wgrad"):
                assert {"BLOCK_N", "BLOCK_K", "BLOCK_M"} <= set(b)
            else:
                assert {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "EPI_SPLIT"} <= set(b)
                assert b["BLOCK_N"] % b["EPI_SPLIT"] == 0
            if role.startswith("plora"):
                assert b["BLOCK_M"] % 16 == 0   # whole 16-row tile flags


def test_forced_arch_selects_the_table_and_sm_count():
    cpu = torch.device("cpu")
    assert config.arch_of(cpu, torch.bfloat16) == "interpreter"
    assert config.num_sms(cpu) == config.INTERPRETER_PROGRAMS
    with config.forced_arch("sm90"):
        assert config.arch_of(cpu, torch.bfloat16) == "sm90" and config.arch_of(cpu, torch.float32) == "fp32"
        assert config.num_sms(cpu) == 132
        assert config.entry("moe.up", cpu, torch.bfloat16) is config.TABLES["sm90"]["moe.up"]
    with pytest.raises(ValueError, match="arch must be one of"):
        with config.forced_arch("sm70"):
            pass


@pytest.mark.parametrize("device_type,cap,dtype,widths,words", [
    ("cpu", None, torch.bfloat16, (), "need a CUDA device"),
    ("cuda", (8, 0), torch.bfloat16, (), "sm_80 it loops over the groups after a host synchronisation"),
    ("cuda", (9, 0), torch.float16, (), "take bfloat16, not float16"),
    ("cuda", (9, 0), torch.bfloat16, (64, 36), "width(s) [36]"),
])
def test_grouped_mm_unavailable_says_why(device_type, cap, dtype, widths, words):
    why = config.grouped_mm_unavailable(device_type, cap, dtype, widths)
    if not hasattr(torch, "_grouped_mm"):
        assert "has no torch._grouped_mm" in why
    else:
        assert words in why


def test_grouped_mm_usable_on_hopper_and_blackwell_in_bf16():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    for cap in ((9, 0), (10, 0)):
        assert config.grouped_mm_unavailable("cuda", cap, torch.bfloat16, (2560, 10240)) is None


def _write_overrides(tmp_path, roles, arch="sm90"):
    path = tmp_path / "gemm.json"
    path.write_text(json.dumps({"arch": arch, "commit": "0123abc", "card": "NVIDIA H200", "roles": roles}))
    return str(path)


def test_sweep_overrides_say_where_they_were_measured(tmp_path, monkeypatch):
    arch, table = config._load_overrides(_write_overrides(tmp_path, {
        "moe.up": {"path": "torch._grouped_mm"},
        "moe.wgrad": {"blocks": {"BLOCK_K": 128}, "ctas_per_sm": 2}}))
    assert arch == "sm90"
    assert table["moe.up"].path == config.GROUPED_MM
    assert table["moe.up"].source == "measured at 0123abc on NVIDIA H200"
    assert table["moe.wgrad"].blocks["BLOCK_K"] == 128 and table["moe.wgrad"].blocks["BLOCK_N"] == 128
    assert table["moe.wgrad"].ctas_per_sm == 2
    # the table's torch._grouped_mm falls back to Triton where torch's kernel is not usable, and says why
    monkeypatch.setattr(config, "_OVERRIDE_ARCH", arch)
    monkeypatch.setattr(config, "_OVERRIDES", table)
    with config.forced_arch("sm80"):
        assert config.choose("moe.up", torch.device("cpu"), torch.bfloat16).path == config.TRITON
    with config.forced_arch("sm90"):
        e = config.choose("moe.up", torch.device("cpu"), torch.bfloat16, (64, 64))
        if hasattr(torch, "_grouped_mm"):
            assert e.path == config.GROUPED_MM and e.why == ""
        e = config.choose("moe.up", torch.device("cpu"), torch.float16)
        assert e.path == config.TRITON and "measured at 0123abc" in e.why and "bfloat16" in e.why
        rows = {r["role"]: r for r in config.describe(torch.device("cpu"))}
        assert rows["moe.down"]["why"] == "default (not measured)"
        assert rows["plora.fwd"]["why"].startswith("measured at b9ce55f")


@pytest.mark.parametrize("roles,words", [
    ({"moe.nope": {}}, "unknown role"),
    ({"plora.fwd": {"path": "torch._grouped_mm"}}, "cannot take path"),
])
def test_bad_overrides_are_rejected(tmp_path, roles, words):
    with pytest.raises(ValueError, match=words):
        config._load_overrides(_write_overrides(tmp_path, roles))
    with pytest.raises(ValueError, match="'arch' must be one of"):
        config._load_overrides(_write_overrides(tmp_path, {}, arch="sm70"))


def _grouped_mm_runs(device, dtype):
    try:
        a, b = torch.randn(8, 16, device=device, dtype=dtype), torch.randn(2, 16, 8, device=device, dtype=dtype)
        torch._grouped_mm(a, b, offs=torch.tensor([3, 8], dtype=torch.int32, device=device))
        return True
    except Exception:   # no such op, or no kernel for this device / dtype in this torch
        return False


@on_kernel_device
@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
def test_torch_grouped_mm_path_matches_the_triton_path(device, monkeypatch, activation):
    """The torch._grouped_mm path of every MoE and grouped_gemm role (forced here, also on CPU where this
    torch has the op) computes what the Triton core computes, with dropped slots and an empty expert."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if not _grouped_mm_runs(device, dtype):
        pytest.skip(f"torch._grouped_mm does not run on {device} in {dtype} with this torch")
    inputs = _moe_inputs(device, dtype, activation, capacity=12)
    M, K, N = 45, 40, 32
    offsets = torch.tensor([0, 20, 20, 37, 41], device=device, dtype=torch.int32)
    a, b, bias = (torch.randn(M, K, device=device).to(dtype), (torch.randn(4, N, K, device=device) / 6).to(dtype),
                  torch.randn(4, N, device=device).to(dtype))

    def run():
        c = moe_launch.grouped_gemm_forward(a, b, bias, offsets)
        return [*_moe_step(inputs), c,
                *moe_launch.grouped_gemm_backward(torch.ones_like(c), a, b, offsets, [True, True, True])]

    triton_run = run()
    real_choose = config.choose

    def choose(role, dev, dt, widths=()):
        e = real_choose(role, dev, dt, widths)
        return replace(e, path=config.GROUPED_MM) if role in config.GROUPED_MM_ROLES else e

    monkeypatch.setattr(config, "choose", choose)
    torch_run = run()
    for i, (got, want) in enumerate(zip(torch_run, triton_run)):
        assert_close(f"output {i}", got, want.double(), dtype)
    c, db = torch_run[7], torch_run[9]
    assert torch.count_nonzero(c[41:]) == 0 and torch.count_nonzero(db[1]) == 0


# ------------------------------------------------------------------------------------ PLoRA visual tiles

@on_kernel_device
@pytest.mark.parametrize("pattern", ["none", "all", "span", "two_images", "scattered"])
def test_plora_visual_tiles_lists_runs_and_mixed_tiles(device, pattern):
    M, bm = 150, 32
    mask = torch.zeros(M, dtype=torch.bool)
    if pattern == "all":
        mask[:] = True
    elif pattern == "span":
        mask[7:120] = True
    elif pattern == "two_images":
        mask[0:64] = True
        mask[96:150] = True
    elif pattern == "scattered":
        mask = torch.rand(M) < 0.3
    flags = plora_launch.tile_flags(mask.to(device))
    run_start, run_end, part, counts = (t.cpu() for t in plora_launch.visual_tiles(flags, M, bm))
    tiles = [mask[t * bm:(t + 1) * bm] for t in range((M + bm - 1) // bm)]
    full = [t for t, rows in enumerate(tiles) if len(rows) == bm and bool(rows.all())]
    mixed = [t for t, rows in enumerate(tiles) if bool(rows.any()) and t not in full]
    n_runs, n_part = counts.tolist()
    listed = [t for j in range(n_runs) for t in range(int(run_start[j]), int(run_end[j]))]
    assert listed == full
    assert all(int(run_end[j]) < int(run_start[j + 1]) for j in range(n_runs - 1))   # maximal runs
    assert part[:n_part].tolist() == mixed
