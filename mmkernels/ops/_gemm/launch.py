"""Host launchers of the shared GEMM core: tensor descriptors, the persistent grid, and the
``torch._grouped_mm`` helpers of the roles that can take torch's path.

No launcher reads a device value on the host: a grouped launch covers an upper bound of the tile
count and the kernel finds each tile's group from the offsets on the device (:mod:`.kernels`).
"""
from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass
from typing import Optional

import torch

from ..._interpreter import interpreter_enabled
from ..._utils import allow_tf32, cdiv
from . import config, kernels
from .kernels import ACT_SILU, EPI_PLAIN, EPI_SCALED, LORA_DROPOUT, LORA_NONE, LORA_PROLOGUE

from triton.tools.ragged_tma import create_ragged_descriptor
from triton.tools.tensor_descriptor import TensorDescriptor

_RAGGED_MAX_ROWS = 2 ** 30     # the ragged descriptor's row limit (triton.tools.ragged_tma)

# tables whose launches read contiguous operands through TMA descriptors (the interpreter emulates
# them, so the descriptor path is tested on CPU too)
TMA_ARCHS = ("sm90", "interpreter")
_TMA_OFF: list = []


@contextlib.contextmanager
def pointer_path_only():
    """Launch without tensor descriptors (every operand through pointers), e.g. to test that path."""
    _TMA_OFF.append(True)
    try:
        yield
    finally:
        _TMA_OFF.pop()


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: tf32 for float32 when torch's matmul allows it (never under the
    interpreter, which computes exact fp32), else exact."""
    return "tf32" if (dtype == torch.float32 and allow_tf32() and not interpreter_enabled()) else "ieee"


def tma_compatible(t: torch.Tensor) -> bool:
    """A TMA descriptor can address ``t``: 16-byte aligned base, unit last stride, 16-byte multiples
    for the other strides, no empty dimension."""
    if t.numel() == 0 or t.stride(-1) != 1:
        return False
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all((s * size) % 16 == 0 for s in t.stride()[:-1])


def _use_tma(arch: str) -> bool:
    return arch in TMA_ARCHS and not _TMA_OFF


_UNIFORM_SCALE = 4.6566127342e-10      # triton.language.random.uint_to_uniform_float's, for 32-bit words


def _f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def dropout_threshold(p: float) -> int:
    """The integer form of the dropout keep rule ``uniform(word) >= p`` (:func:`.kernels.dropout_keep`).

    ``uniform(word) = float32(x) * float32(scale)`` for ``x = word ^ (word >> 31)`` (the word read as
    int32), in float32 arithmetic; it is monotone in ``x``, so ``uniform(word) >= float32(p)`` exactly
    when ``x >= dropout_threshold(p)``: the least such ``x`` in ``[0, 2**31)``, found by bisection with
    the same float32 roundings (every product of two float32 values is exact in a double, so
    rounding it once to float32 is the float32 product).  ``2**31`` where no word is kept (p = 1:
    the largest uniform is ``1 - 2**-24``).
    """
    p32, scale = _f32(float(p)), _f32(_UNIFORM_SCALE)
    lo, hi = 0, 2**31
    while lo < hi:
        mid = (lo + hi) // 2
        if _f32(_f32(float(mid)) * scale) >= p32:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass
class LoRATerm:
    """The PLoRA term of a row GEMM (:mod:`.kernels`, ``LORA``): ``l [M, R]`` (rows masked by
    ``row_mask``), ``lb`` as ``[N, R]`` (``lb_kmajor``) or ``[R, N]``, and either a ``scale`` of the
    prologue or a dropout keep-mask ``keep_bits`` (int32 ``[M, cdiv(N, 32)]``, bit j of word w is column
    ``32 w + j``, as ``plora.launch.dropout_keep_bits`` draws it; the term times ``keep_scale`` and the mask).
    The launch's ``tile_flags`` say which tiles have masked rows."""
    l: torch.Tensor
    lb: torch.Tensor
    lb_kmajor: bool
    row_mask: torch.Tensor          # uint8 [M]
    scale: Optional[float] = None   # multiply the accumulator by it after the prologue
    keep_bits: Optional[torch.Tensor] = None
    keep_scale: float = 1.0


def row_gemm(role: str, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, M: int, N: int, K: int,
             b_kmajor: bool = True, offsets: Optional[torch.Tensor] = None,
             a_idx: Optional[torch.Tensor] = None, a_div: int = 1, bias: Optional[torch.Tensor] = None,
             epilogue: int = EPI_PLAIN, act: int = ACT_SILU, z: Optional[torch.Tensor] = None,
             c_idx: Optional[torch.Tensor] = None, half_n: int = 0, y: Optional[torch.Tensor] = None,
             y_weights: Optional[torch.Tensor] = None, lora: Optional[LoRATerm] = None,
             tile_flags: Optional[torch.Tensor] = None, flag_rows: int = 16, out_scale: float = 1.0) -> None:
    """``c[crow(r), n] = epilogue(lora + a[arow(r)] @ B[e].T + bias[e])`` on the Triton core.

    ``b`` is the weight in memory: ``[E, N_b, K]`` when ``b_kmajor`` (``c = a @ b[e].T``), else
    ``[E, K, N_b]`` (``c = a @ b[e]``, the transposed view of a backward pass).  ``offsets`` (int32
    ``[E + 1]``, on the device) group the ``M`` rows; None is one dense group of M rows.  The other
    arguments are the kernel's (:func:`.kernels._gemm_kernel`); ``tile_flags`` (int32, per ``flag_rows``
    rows the number of flagged rows; required with ``lora``) make a tile without flagged rows skip the
    LoRA term, or -- without ``lora`` -- the whole GEMM (its output is then 0, or the bias)."""
    if lora is not None and tile_flags is None:
        raise ValueError("a LoRA term needs the tile_flags of its row mask")
    grouped = offsets is not None
    E = offsets.numel() - 1 if grouped else 1
    if M == 0 or N == 0 or E == 0:
        return
    dev, dt = a.device, a.dtype
    arch = config.arch_of(dev, dt)
    cfg = config.entry(role, dev, dt)
    blocks = cfg.launch_options()
    BM, BN, BK = blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_K"]
    if b_kmajor:
        sbe, sbn, sbk = b.stride()
    else:
        sbe, sbk, sbn = b.stride()
    tma = _use_tma(arch)
    a_tma = tma and a_idx is None and K > 0 and tma_compatible(a)
    b_tma = tma and K > 0 and tma_compatible(b)
    plain_out = epilogue in (EPI_PLAIN, EPI_SCALED) and c_idx is None and y is None
    c_tma = tma and not grouped and plain_out and tma_compatible(c)
    a_desc = TensorDescriptor(a, list(a.shape), list(a.stride()), [BM, BK]) if a_tma else a
    if b_tma:
        block = [1, BN, BK] if b_kmajor else [1, BK, BN]
        b_desc = TensorDescriptor(b, list(b.shape), list(b.stride()), block)
    else:
        b_desc = b
    c_desc = TensorDescriptor(c, list(c.shape), list(c.stride()), [BM, BN]) if c_tma else c
    lora_mode = LORA_NONE
    if lora is not None:
        lora_mode = LORA_DROPOUT if lora.keep_bits is not None else LORA_PROLOGUE
    num_m = cdiv(M, BM) + (E if grouped else 0)
    tiles = num_m * cdiv(N, BN)
    grid = (max(1, min(tiles, config.num_sms(dev) * cfg.ctas_per_sm)),)
    zt = z if z is not None else c
    yt = y if y is not None else c
    dummy_i = offsets if grouped else (tile_flags if tile_flags is not None else c)
    R = lora.l.shape[1] if lora is not None else 0
    kernels._gemm_kernel[grid](
        a_ptr=a, a_desc=a_desc, a_idx_ptr=a_idx if a_idx is not None else dummy_i,
        b_ptr=b, b_desc=b_desc, bias_ptr=bias if bias is not None else c,
        c_ptr=c, c_desc=c_desc, z_ptr=zt, c_idx_ptr=c_idx if c_idx is not None else dummy_i,
        y_ptr=yt, w_ptr=y_weights if y_weights is not None else c,
        offs_ptr=offsets if grouped else dummy_i,
        l_ptr=lora.l if lora is not None else c, lb_ptr=lora.lb if lora is not None else c,
        row_mask_ptr=lora.row_mask if lora is not None else dummy_i,
        flags_ptr=tile_flags if tile_flags is not None else dummy_i,
        keep_bits_ptr=lora.keep_bits if lora is not None and lora.keep_bits is not None else dummy_i,
        M=M, N=N, K=K, E=E, R=R, n_flags=tile_flags.numel() if tile_flags is not None else 0, half_n=half_n,
        stride_am=a.stride(0), stride_ak=a.stride(1), stride_be=sbe, stride_bn=sbn, stride_bk=sbk,
        stride_biase=bias.stride(0) if bias is not None and bias.dim() == 2 else 0,
        stride_biasn=bias.stride(-1) if bias is not None else 0,
        stride_cm=c.stride(0), stride_cn=c.stride(1), stride_zm=zt.stride(0), stride_zn=zt.stride(1),
        stride_ym=yt.stride(0), stride_yn=yt.stride(1),
        stride_lm=lora.l.stride(0) if lora is not None else 0, stride_lr=lora.l.stride(1) if lora is not None else 0,
        stride_lbn=(lora.lb.stride(0) if lora.lb_kmajor else lora.lb.stride(1)) if lora is not None else 0,
        stride_lbr=(lora.lb.stride(1) if lora.lb_kmajor else lora.lb.stride(0)) if lora is not None else 0,
        stride_keep=lora.keep_bits.stride(0) if lora is not None and lora.keep_bits is not None else 0,
        lora_scale=float(lora.scale) if lora is not None and lora.scale is not None else 1.0,
        out_scale=float(out_scale),
        keep_scale=float(lora.keep_scale) if lora is not None else 1.0,
        GROUPED=grouped, A_GATHER=a_idx is not None, A_DIV=a_div, A_TMA=a_tma, B_TMA=b_tma, B_KMAJOR=b_kmajor,
        EVEN_K=K % BK == 0, LORA=lora_mode, LB_KMAJOR=lora.lb_kmajor if lora is not None else True,
        LORA_SCALE=lora is not None and lora.scale is not None, TILE_FLAGS=tile_flags is not None,
        FLAG_ROWS=flag_rows,
        EPILOGUE=epilogue, ACT=act, HAS_BIAS=bias is not None, SCATTER_C=c_idx is not None,
        WEIGHTED_Y=y is not None, C_TMA=c_tma,
        DOT_PRECISION=dot_precision(dt), **blocks)


def _ragged_descriptor(t: torch.Tensor, block: list):
    """A TMA descriptor over the rows of ``t`` that a kernel bounds to one group's rows at each load
    (``triton.tools.ragged_tma``: reads outside the group are zeros)."""
    return create_ragged_descriptor(t, block)


def wgrad(role: str, g: torch.Tensor, a: torch.Tensor, offsets: torch.Tensor, db: torch.Tensor,
          dbias: torch.Tensor, *, N: int, K: int, need_db: bool, need_dbias: bool,
          a_idx: Optional[torch.Tensor] = None, a_div: int = 1) -> None:
    """``db[e] = g[rows of e].T @ a[arow(rows of e)]`` (``[E, N, K]``, ``arow = a_idx // a_div`` or the
    row) and ``dbias[e] = g[rows of e].sum(0)`` on the Triton core (:func:`.kernels._wgrad_kernel`), for
    the wanted outputs; an empty group writes zeros."""
    E = offsets.numel() - 1
    if need_db and K == 0:      # nothing to write in db; dbias alone
        need_db = False
    if not (need_db or need_dbias) or E == 0 or N == 0:
        return
    dev, dt = g.device, g.dtype
    cfg = config.entry(role, dev, dt)
    blocks = cfg.launch_options()
    BN, BK, BM = blocks["BLOCK_N"], blocks["BLOCK_K"], blocks["BLOCK_M"]
    tma = _use_tma(config.arch_of(dev, dt)) and need_db and g.shape[0] <= _RAGGED_MAX_ROWS
    if tma and a_idx is not None and tma_compatible(a):
        # gathered rows would be cp.async loads whose addresses come from an index load in the same
        # loop (a shallow pipeline): gather them once into group order, then read both through TMA
        a = a.index_select(0, a_idx.long() // a_div) if a_div != 1 else a.index_select(0, a_idx.long())
        a_idx = None
    g_tma = tma and tma_compatible(g)
    a_tma = tma and a_idx is None and tma_compatible(a)
    num_k = cdiv(K, BK) if need_db else 1
    grid = (E * cdiv(N, BN) * num_k,)
    kernels._wgrad_kernel[grid](
        g_ptr=g, g_desc=_ragged_descriptor(g, [BM, BN]) if g_tma else g,
        a_ptr=a, a_desc=_ragged_descriptor(a, [BM, BK]) if a_tma else a,
        db_ptr=db if need_db else g, dbias_ptr=dbias if need_dbias else g,
        a_idx_ptr=a_idx if a_idx is not None else offsets, offs_ptr=offsets, N=N, K=max(K, 1), num_k=num_k,
        stride_gm=g.stride(0), stride_gn=g.stride(1), stride_am=a.stride(0), stride_ak=a.stride(1),
        stride_dbe=db.stride(0) if need_db else 0, stride_dbn=db.stride(1) if need_db else 0,
        stride_dbk=db.stride(2) if need_db else 0,
        stride_dbiase=dbias.stride(0) if need_dbias else 0, stride_dbiasn=dbias.stride(1) if need_dbias else 0,
        HAS_DB=need_db, HAS_DBIAS=need_dbias, G_TMA=g_tma, A_TMA=a_tma, A_GATHER=a_idx is not None, A_DIV=a_div,
        DOT_PRECISION=dot_precision(dt), **blocks)


# ----------------------------------------------------------------------------- torch._grouped_mm path

def group_ends(offsets: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm``'s ``offs``: the int32 end of each group (our offsets without the 0)."""
    return offsets[1:].to(torch.int32).contiguous()


def row_groups(offsets: torch.Tensor, M: int) -> torch.Tensor:
    """Group of each of the M rows (E for rows past the last group), on the device, no sync."""
    return torch.searchsorted(offsets[1:].to(torch.int64).contiguous(),
                              torch.arange(M, device=offsets.device), right=True)


def torch_grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, b_kmajor: bool) -> torch.Tensor:
    """``a[rows of e] @ b[e].T`` (``b_kmajor``, b ``[E, N, K]``) or ``a[rows of e] @ b[e]`` (b ``[E, K, N]``)
    with ``torch._grouped_mm``; rows past the last group are unspecified."""
    return torch._grouped_mm(a, b.transpose(-2, -1) if b_kmajor else b, offs=group_ends(offsets))


def torch_grouped_wgrad(g: torch.Tensor, a: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``[E, N, K]``: ``g[rows of e].T @ a[rows of e]`` with ``torch._grouped_mm`` (2-D x 2-D); an empty
    group is zeroed explicitly (torch's kernel has left garbage there on some GPUs)."""
    db = torch._grouped_mm(g.t(), a, offs=group_ends(offsets))
    counts = offsets[1:] - offsets[:-1]
    return torch.where((counts > 0)[:, None, None], db, torch.zeros((), dtype=db.dtype, device=db.device))
