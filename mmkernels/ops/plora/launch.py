"""Host launchers for PLoRA: tile flags, block sizes, grids.

The forward GEMM, dX and dS run on the shared GEMM core (:mod:`mmkernels.ops._gemm`, roles
``plora.fwd``, ``plora.dx``, ``plora.ds``), whose per-arch table holds their block sizes.  The other
kernels' block sizes are below, fixed per kernel and GPU generation (no autotuning at run time, so the
first call costs one compile and nothing else); ``benchmarks/tune_plora.py`` measures the candidates
on a GPU and writes the winners as JSON, which ``MMKERNELS_PLORA_CONFIGS=<file>`` applies to
half-precision launches.  Under the CPU interpreter the blocks are the smallest legal ``tl.dot``
tiles (16/32) so tests stay fast.  Every BLOCK_M is a multiple of ``FLAG_ROWS``.
"""
from __future__ import annotations

import json
import os

import torch
import triton

from ..._extension import NativeOp
from ..._utils import cdiv, new_output
from ..._validation import check_int
from .._gemm import config as gemm_config
from .._gemm import kernels as gemm
from .._gemm import launch as gemm_launch
from .._gemm.launch import dot_precision, dropout_threshold
from . import kernels
from .kernels import FLAG_ROWS

# name -> dict of block sizes and launch options, for (GPU, half precision) / (GPU, fp32) / interpreter
_GPU_HALF = {
    "shrink": dict(BLOCK_M=128, BLOCK_R=128, BLOCK_K=64, num_warps=8, num_stages=3),
    "dlora_b": dict(BLOCK_N=128, BLOCK_R=64, BLOCK_M=64, num_warps=4, num_stages=3),
    "dlora_a": dict(BLOCK_R=64, BLOCK_K=128, BLOCK_M=64, num_warps=4, num_stages=3),
    "dw": dict(BLOCK_N=128, BLOCK_K=128, BLOCK_M=64, num_warps=8, num_stages=3),
    # the dropout keep-mask, drawn once per step (Philox, no MMA): 8192 draws per program
    "dropout_bits": dict(BLOCK_M=64, BLOCK_K=128, num_warps=4),
}
# With LoRA dropout the shrink and dA read the packed keep bits beside x in their main loops, so they
# have entries of their own ("<kernel>_dropout"); elsewhere they are the kernels' entries.
_GPU_HALF.update(shrink_dropout=_GPU_HALF["shrink"], dlora_a_dropout=_GPU_HALF["dlora_a"])
_GPU_FP32 = {k: dict(v, num_stages=2, **({"BLOCK_K": 32} if k.startswith("shrink") else {}))
             for k, v in _GPU_HALF.items()}
# Hopper (sm_90): more shared memory, so deeper pipelines (measured with benchmarks/tune_plora.py).
_GPU_HALF_SM90 = {  # winners of benchmarks/tune_plora.py on an H200 (benchmarks/results/plora-h200-tuned-configs.json)
    "shrink": dict(BLOCK_M=64, BLOCK_R=128, BLOCK_K=64, num_warps=4, num_stages=4),
    "dw": dict(BLOCK_N=128, BLOCK_K=256, BLOCK_M=64, num_warps=8, num_stages=3),
    # dA's output tile is the measured one; its reduction step is 128 rows (measured: 64), since the
    # pipelined loop of runs of visual tiles now needs twice the MMA work per step to stay under 0.6
    # instructions per tensor-core clock (the H200 sweep re-measures both)
    "dlora_a": dict(BLOCK_R=64, BLOCK_K=64, BLOCK_M=128, num_warps=4, num_stages=3),
    "dlora_b": dict(BLOCK_N=64, BLOCK_R=128, BLOCK_M=64, num_warps=4, num_stages=3),
    "dropout_bits": _GPU_HALF["dropout_bits"],
    # With dropout the unpacking of the x tile's keep bits adds to the main loop: the whole of R (256
    # in the models) per program unpacks each element of x once, not R / BLOCK_R times; dA's 128 rows
    # of R unpack it twice instead of four times.  Defaults, not timed: benchmarks/tune_plora.py
    # sweeps them against the no-dropout tiles.
    "shrink_dropout": dict(BLOCK_M=64, BLOCK_R=256, BLOCK_K=64, num_warps=4, num_stages=4),
    "dlora_a_dropout": dict(BLOCK_R=128, BLOCK_K=64, BLOCK_M=128, num_warps=4, num_stages=4),
}
_INTERPRETER = {
    "shrink": dict(BLOCK_M=32, BLOCK_R=16, BLOCK_K=16),
    "dlora_b": dict(BLOCK_N=32, BLOCK_R=16, BLOCK_M=16),
    "dlora_a": dict(BLOCK_R=16, BLOCK_K=32, BLOCK_M=16),
    "dw": dict(BLOCK_N=32, BLOCK_K=32, BLOCK_M=16),
    "dropout_bits": dict(BLOCK_M=16, BLOCK_K=32),
    # (the keep bits come in words of 32 columns: BLOCK_K a multiple of 32)
    "shrink_dropout": dict(BLOCK_M=32, BLOCK_R=16, BLOCK_K=32),
}
_INTERPRETER.update(dlora_a_dropout=_INTERPRETER["dlora_a"])
# the GEMM-core roles of PLoRA (their blocks: mmkernels/ops/_gemm/config.py)
CORE_ROLES = {"fwd": "plora.fwd", "dx": "plora.dx", "ds": "plora.ds"}   # dX with dropout: plora.dx_dropout


def _load_overrides(path: str | None) -> dict:
    if not path:
        return {}
    with open(path) as f:
        table = json.load(f)
    moved = set(table) & set(CORE_ROLES)
    if moved:
        raise ValueError(f"MMKERNELS_PLORA_CONFIGS: {sorted(moved)} run on the shared GEMM core now; set their blocks "
                         f"with MMKERNELS_GEMM_CONFIGS (roles {sorted(CORE_ROLES[m] for m in moved)})")
    unknown = set(table) - set(_GPU_HALF)
    if unknown:
        raise ValueError(f"MMKERNELS_PLORA_CONFIGS: unknown kernel(s) {sorted(unknown)}; "
                         f"expected some of {sorted(_GPU_HALF)}")
    return table


_OVERRIDES = _load_overrides(os.environ.get("MMKERNELS_PLORA_CONFIGS"))


def _config(name: str, device: torch.device, dtype: torch.dtype) -> dict:
    arch = gemm_config.arch_of(device, dtype)
    if arch == "interpreter":
        return dict(_INTERPRETER[name])
    if arch == "fp32":
        return dict(_GPU_FP32[name])
    cfg = dict((_GPU_HALF_SM90 if arch == "sm90" else _GPU_HALF)[name])
    cfg.update(_OVERRIDES.get(name, {}))
    return cfg


def _tile_flags_torch(mask: torch.Tensor) -> torch.Tensor:
    groups = cdiv(mask.numel(), FLAG_ROWS)
    padded = mask.new_zeros(groups * FLAG_ROWS)
    padded[: mask.numel()] = mask
    return padded.view(groups, FLAG_ROWS).sum(1, dtype=torch.int32)


# Looked up once: the extension is loaded (or not) by the time this module is imported.
NATIVE_TILE_FLAGS_OP = NativeOp("plora_tile_flags")

if NATIVE_TILE_FLAGS_OP.declared:
    @torch.library.register_fake("mmkernels::plora_tile_flags")
    def _tile_flags_fake(im_mask, group_rows):
        return im_mask.new_empty(((im_mask.shape[0] + group_rows - 1) // group_rows,), dtype=torch.int32)


def tile_flags(im_mask: torch.Tensor) -> torch.Tensor:
    """Visual-row count per FLAG_ROWS-row group of the flattened mask, int32 ``[cdiv(M, 16)]``.

    One small native op (``torch.ops.mmkernels.plora_tile_flags``; a torch fallback where the
    extension has no kernel for the mask's device), no host synchronisation; computed once per call
    and shared by the forward and every backward kernel.
    """
    if NATIVE_TILE_FLAGS_OP.runs_on(im_mask.device):
        return torch.ops.mmkernels.plora_tile_flags(im_mask, FLAG_ROWS)
    return _tile_flags_torch(im_mask)


def _keep_scale(dropout_p: float) -> float:
    return 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)


def dropout_keep_bits(im_mask, flags, dropout_seed, M: int, K: int, dropout_p: float) -> torch.Tensor:
    """The dropout keep-mask of the visual rows of an ``[M, K]`` input, drawn once from ``dropout_seed``
    (:func:`kernels._dropout_bits_kernel`): int32 ``[M, cdiv(K, 32)]``, bit ``j`` of word ``w`` the keep
    decision of column ``32 w + j`` (0 on text rows), M * K / 8 bytes.  The shrink, dA and dX read it."""
    n_words = cdiv(K, gemm.KEEP_BITS)
    keep_bits = new_output((M, n_words), dtype=torch.int32, device=im_mask.device)
    if M and K:
        cfg = _config("dropout_bits", im_mask.device, torch.float16)   # (no float operand: the half entry)
        grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(K, cfg["BLOCK_K"]))
        kernels._dropout_bits_kernel[grid](dropout_seed, keep_bits, im_mask.view(torch.uint8), flags, M, K,
                                           flags.numel(), n_words, dropout_threshold(dropout_p),
                                           FLAG_ROWS=FLAG_ROWS, **cfg)
    return keep_bits


def plora_forward(x, weight, bias, lora_a, lora_b, im_mask, flags, scaling, dropout_p, dropout_seed,
                  keep_bits=None):
    """Fused forward.  ``x [M, K]``, ``im_mask [M]`` bool contiguous.  Returns ``(y [M, N], S [M, R])``.
    With dropout the shrink reads ``keep_bits`` (:func:`dropout_keep_bits`; drawn here when None)."""
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    y = new_output((M, N), dtype=x.dtype, device=x.device)
    s = new_output((M, R), dtype=x.dtype, device=x.device)
    if M == 0:
        return y, s
    mask_u8 = im_mask.view(torch.uint8)
    has_dropout = dropout_seed is not None and dropout_p > 0
    if R > 0:
        if has_dropout and keep_bits is None:
            keep_bits = dropout_keep_bits(im_mask, flags, dropout_seed, M, K, dropout_p)
        bits = keep_bits if has_dropout else flags
        cfg = _config("shrink_dropout" if has_dropout else "shrink", x.device, x.dtype)
        grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(R, cfg["BLOCK_R"]))
        kernels._plora_shrink_kernel[grid](
            x, lora_a, s, mask_u8, flags, bits,
            M, K, R, flags.numel(),
            x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), s.stride(0), s.stride(1),
            bits.stride(0) if has_dropout else 0, _keep_scale(dropout_p),
            HAS_DROPOUT=has_dropout, EVEN_K=K % cfg["BLOCK_K"] == 0, FLAG_ROWS=FLAG_ROWS,
            DOT_PRECISION=dot_precision(x.dtype), **cfg)
    if N > 0:
        # y = x @ W0.T + b0, the LoRA expand first on the tiles with a visual row (a zero-trip loop on
        # the others, whose rows are then exactly the base linear's)
        lora = gemm_launch.LoRATerm(l=s, lb=lora_b, lb_kmajor=True, row_mask=mask_u8, scale=scaling) if R else None
        gemm_launch.row_gemm("plora.fwd", x, weight.unsqueeze(0), y, M=M, N=N, K=K, bias=bias, lora=lora,
                             tile_flags=flags if R else None, flag_rows=FLAG_ROWS)
    return y, s


def _part_stages(cfg: dict) -> int:
    """The pipeline depth of dA's and dB's loop over mixed tiles (see ``_plora_bwd_dlora_b_kernel``):
    its tile index is one more load in the chain, so it needs ``2 * (num_stages - 1)`` stages of
    prefetch for its operands to get the ``num_stages - 1`` of the loop over runs."""
    return 2 * cfg.get("num_stages", 1) - 1


def visual_tiles(flags: torch.Tensor, M: int, block_m: int):
    """Where the visual rows are, per ``block_m``-row tile (:func:`kernels._plora_visual_tiles_kernel`):
    ``(run_start, run_end, part, counts)``, int32, computed on the device from the tile flags (no host
    synchronisation)."""
    n_tiles = cdiv(M, block_m)
    run_start, run_end, part = (torch.empty(n_tiles, dtype=torch.int32, device=flags.device) for _ in range(3))
    counts = torch.empty(2, dtype=torch.int32, device=flags.device)
    kernels._plora_visual_tiles_kernel[(1,)](flags, flags.numel(), run_start, run_end, part, counts, n_tiles,
                                             FLAGS_PER_TILE=block_m // FLAG_ROWS, FLAG_ROWS=FLAG_ROWS,
                                             BLOCK=min(1024, triton.next_power_of_2(max(n_tiles, 1))))
    return run_start, run_end, part, counts


def plora_backward(grad_y, x, weight, lora_a, lora_b, lora_hidden, im_mask, flags, scaling,
                   dropout_p, dropout_seed, output_mask, keep_bits=None):
    """Gradients ``(dx, dW0, db0, dA, dB)``; an entry whose ``output_mask`` is False comes back as a
    zero-size tensor (the op schema has fixed arity).  With dropout dA and dX read the forward's
    ``keep_bits`` (:func:`dropout_keep_bits`; drawn here again when None)."""
    need_dx, need_dw, need_dbias, need_da, need_db = (bool(v) for v in output_mask)
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    dev, dt = x.device, x.dtype
    grad_y = grad_y.contiguous() if grad_y.stride(-1) != 1 else grad_y
    mask_u8 = im_mask.view(torch.uint8)
    has_dropout = dropout_seed is not None and dropout_p > 0
    keep_scale = _keep_scale(dropout_p)
    precision = dot_precision(dt)
    if has_dropout and keep_bits is None and (need_dx or need_da) and M > 0 and R > 0:
        keep_bits = dropout_keep_bits(im_mask, flags, dropout_seed, M, K, dropout_p)

    def empty():  # a fresh zero-size tensor per unrequested output (outputs must not alias)
        return x.new_empty(0)

    ds = None
    if (need_dx or need_da) and M > 0 and R > 0:
        # dS = scaling * dY @ B on the tiles with a visual row (text rows of dS are never read)
        ds = new_output((M, R), dtype=dt, device=dev)
        gemm_launch.row_gemm("plora.ds", grad_y, lora_b.unsqueeze(0), ds, M=M, N=R, K=N, b_kmajor=False,
                             epilogue=gemm.EPI_SCALED, out_scale=scaling, tile_flags=flags, flag_rows=FLAG_ROWS)

    dx = empty()
    if need_dx:
        dx = new_output((M, K), dtype=dt, device=dev)
        if M > 0 and K > 0:
            # dX = dY @ W0 (+ dS @ A on visual rows: in the same accumulator first, or -- with dropout,
            # whose mask multiplies the LoRA term alone -- in its own after the base loop)
            lora = None
            if ds is not None:
                lora = gemm_launch.LoRATerm(l=ds, lb=lora_a, lb_kmajor=False, row_mask=mask_u8,
                                            keep_bits=keep_bits if has_dropout else None, keep_scale=keep_scale)
            role = "plora.dx_dropout" if lora is not None and has_dropout else "plora.dx"
            gemm_launch.row_gemm(role, grad_y, weight.unsqueeze(0), dx, M=M, N=K, K=N, b_kmajor=False,
                                 lora=lora, tile_flags=flags if lora is not None else None, flag_rows=FLAG_ROWS)

    dw, dbias = empty(), empty()
    if need_dw or need_dbias:
        dw = new_output((N, K), dtype=dt, device=dev) if need_dw else empty()
        dbias = new_output((N,), dtype=dt, device=dev) if need_dbias else empty()
        if N > 0 and K > 0:  # (the kernel wraps column indices % K: K = 0 must not launch it)
            cfg = _config("dw", dev, dt)
            grid = (cdiv(N, cfg["BLOCK_N"]), cdiv(K, cfg["BLOCK_K"]) if need_dw else 1)
            kernels._plora_bwd_dw_kernel[grid](
                grad_y, x, dw if need_dw else grad_y, dbias if need_dbias else grad_y, M, N, K,
                grad_y.stride(0), grad_y.stride(1), x.stride(0), x.stride(1),
                dw.stride(0) if need_dw else 0, dw.stride(1) if need_dw else 0,
                HAS_DW=need_dw, HAS_DBIAS=need_dbias, EVEN_M=M % cfg["BLOCK_M"] == 0,
                DOT_PRECISION=precision, **cfg)
        if need_dbias and K == 0:  # no dW0/dB0 launch: db0 still needs its column sums
            dbias.copy_(grad_y.sum(0, dtype=torch.float32))

    tile_lists = {}

    def listed(block_m):  # the visual tiles of block_m rows (one small launch per distinct block_m)
        if block_m not in tile_lists:
            tile_lists[block_m] = visual_tiles(flags, M, block_m)
        return tile_lists[block_m]

    da = empty()
    if need_da:
        da = new_output((R, K), dtype=dt, device=dev)
        if R > 0 and K > 0:
            if M == 0:
                da.zero_()
            else:
                cfg = _config("dlora_a_dropout" if has_dropout else "dlora_a", dev, dt)
                grid = (cdiv(R, cfg["BLOCK_R"]), cdiv(K, cfg["BLOCK_K"]))
                bits = keep_bits if has_dropout else flags
                kernels._plora_bwd_dlora_a_kernel[grid](
                    ds, x, da, mask_u8, *listed(cfg["BLOCK_M"]), bits, M, K, R,
                    ds.stride(0), ds.stride(1), x.stride(0), x.stride(1), da.stride(0), da.stride(1),
                    bits.stride(0) if has_dropout else 0, keep_scale,
                    HAS_DROPOUT=has_dropout, DOT_PRECISION=precision, PART_STAGES=_part_stages(cfg), **cfg)

    dlb = empty()
    if need_db:
        dlb = new_output((N, R), dtype=dt, device=dev)
        if N > 0 and R > 0:
            if M == 0:
                dlb.zero_()
            else:
                cfg = _config("dlora_b", dev, dt)
                grid = (cdiv(N, cfg["BLOCK_N"]), cdiv(R, cfg["BLOCK_R"]))
                kernels._plora_bwd_dlora_b_kernel[grid](
                    grad_y, lora_hidden, dlb, mask_u8, *listed(cfg["BLOCK_M"]), M, N, R,
                    grad_y.stride(0), grad_y.stride(1), lora_hidden.stride(0), lora_hidden.stride(1),
                    dlb.stride(0), dlb.stride(1), float(scaling), DOT_PRECISION=precision,
                    PART_STAGES=_part_stages(cfg), **cfg)
    return dx, dw, dbias, da, dlb


def dropout_keep_mask(dropout_seed: torch.Tensor, M: int, K: int, dropout_p: float,
                      row_offset: int = 0) -> torch.Tensor:
    """The bool keep-mask that the kernels draw from ``dropout_seed`` for rows
    ``[row_offset, row_offset + M)`` of an ``[*, K]`` input, as ``[M, K]`` (for tests)."""
    row_offset = check_int("row_offset", row_offset, low=0, high=2**62 - 1)
    keep = new_output((M, K), dtype=torch.int8, device=dropout_seed.device)
    if M and K:
        block_m = min(32, triton.next_power_of_2(M))  # ~1024 elements per program, few rows or many
        block_k = max(4, min(1024 // block_m, triton.next_power_of_2(K)))   # a multiple of 4 (dropout_keep)
        grid = (cdiv(M, block_m), cdiv(K, block_k))
        kernels._dropout_mask_kernel[grid](dropout_seed, keep, row_offset, M, K, dropout_threshold(dropout_p),
                                           BLOCK_M=block_m, BLOCK_K=block_k)
    return keep.bool()
