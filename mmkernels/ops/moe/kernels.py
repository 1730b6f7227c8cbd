"""Triton kernels of the mixture-of-experts layer that are not GEMMs: the weighted combine and its
backward.  The grouped GEMMs (gather -> expert GEMM -> activation, expert GEMM -> scatter, their
backward and the weight gradients) run on the shared GEMM core (:mod:`mmkernels.ops._gemm`).

Row spaces (S rows, k choices per row, E experts):

* **slot space** ``[S*k]``: slot ``s*k + j`` is choice j of row s (the layout of ``o``);
* **sorted space** ``[S*k]``: the slots re-ordered so that expert e's *kept* slots are the rows
  ``offsets[e] .. offsets[e+1]`` (``sorted_slots[r]`` is the slot at sorted row r, a permutation of
  all S*k slots; dropped slots come after ``offsets[E]`` and are never touched by a GEMM).  Hidden
  activations ``Z``/``H`` and the output gradient ``dO`` of the backward live here.

Combine (:func:`_moe_combine_kernel`, k >= 2): ``y[s] = sum_j keep[s, j] * w[s, j] * o[s*k + j]`` in j
order, fp32 accumulation.  It is a separate pass: a row's k slots come from different GEMM tiles,
and summing them in the GEMM epilogue would need atomics.  Its backward
(:func:`_moe_combine_bwd_kernel`) walks the *sorted* rows: ``dO[r] = keep * w[t] * dy[t // k]`` and
``dw[t] = keep * <dy[t // k], o[t]>`` for the slot ``t = sorted_slots[r]``, so the backward GEMMs read
``dO`` in sorted order, contiguously (no gather in their main loops).

Every output element is written by exactly one program and every reduction runs in a fixed order
(no atomics), so results are bit-reproducible run to run.
"""
import triton
import triton.language as tl

@triton.jit
def _moe_combine_kernel(
    o_ptr, w_ptr, keep_ptr, y_ptr, S, H, k,
    stride_om, stride_oh, stride_ym, stride_yh,
    HAS_WEIGHT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """``y[s] = sum_j keep[s, j] * w[s, j] * o[s*k + j]`` (j in order, fp32).  Grid: (cdiv(S, BLOCK_S),
    cdiv(H, BLOCK_H)).  Dropped slots are never read, so their rows of ``o`` may hold anything."""
    pid_s = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < S
    col_ok = cols < H
    cols64 = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_S, BLOCK_H), dtype=tl.float32)
    for j in range(0, k):
        slot = rows.to(tl.int64) * k + j
        kept = tl.load(keep_ptr + slot, mask=row_ok, other=0) != 0
        o = tl.load(o_ptr + slot[:, None] * stride_om + cols64[None, :] * stride_oh,
                    mask=(kept & row_ok)[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + slot, mask=kept & row_ok, other=0.0)
            o = o * w[:, None]
        acc += o
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols64[None, :] * stride_yh,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _moe_combine_bwd_kernel(
    dy_ptr, o_ptr, w_ptr, keep_ptr, slots_ptr, do_ptr, dw_ptr, S, H, k,
    stride_dym, stride_dyh, stride_om, stride_oh, stride_dom, stride_doh,
    HAS_DW: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """For sorted rows r (slot ``t = sorted_slots[r]``, row ``s = t // k``): ``dO[r] = keep[t] * w[t] *
    dy[s]`` (zeros for a dropped slot) and ``dw[t] = keep[t] * <dy[s], o[t]>`` (fp32, H reduced in
    order).  ``sorted_slots`` is a permutation of the S*k slots, so every row of dO and every slot of
    dw is written once.  Grid: (cdiv(S*k, BLOCK_S),); each program loops over H."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    row_ok = rows < S * k
    slot = tl.load(slots_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    kept = (tl.load(keep_ptr + slot, mask=row_ok, other=0) != 0) & row_ok
    w = tl.load(w_ptr + slot, mask=kept, other=0.0)
    src = slot // k
    dot = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        col_ok = cols < H
        cols64 = cols.to(tl.int64)
        dy = tl.load(dy_ptr + src[:, None] * stride_dym + cols64[None, :] * stride_dyh,
                     mask=kept[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        tl.store(do_ptr + rows[:, None].to(tl.int64) * stride_dom + cols64[None, :] * stride_doh,
                 (dy * w[:, None]).to(do_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
        if HAS_DW:
            o = tl.load(o_ptr + slot[:, None] * stride_om + cols64[None, :] * stride_oh,
                        mask=kept[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            dot += tl.sum(dy * o, axis=1)
    if HAS_DW:
        tl.store(dw_ptr + slot, tl.where(kept, dot, 0.0), mask=row_ok)
