"""Triton kernels for the mixture-of-experts layer: grouped GEMMs over experts plus the combine.

Row spaces (S rows, k choices per row, E experts):

* **slot space** ``[S*k]``: slot ``s*k + j`` is choice j of row s (the layout of ``o`` and ``do``);
* **sorted space** ``[S*k]``: the slots re-ordered so that expert e's *kept* slots are the rows
  ``offsets[e] .. offsets[e+1]`` (``sorted_slots[r]`` is the slot at sorted row r; dropped slots
  come after ``offsets[E]`` and are never touched).  Hidden activations ``Z``/``H`` live here.

No kernel reads a count on the host: the grouped GEMM grid has ``cdiv(S*k, BLOCK_M) + E`` programs
along M (an upper bound on ``sum_e cdiv(count_e, BLOCK_M)``) and each program finds its expert and
first row by scanning the ``E + 1`` offsets (:func:`_find_tile`); programs past the last tile do
nothing (an empty row range and a zero-trip K loop).

Every output element is written by exactly one program and every reduction runs in a fixed order
(no atomics), so results are bit-reproducible run to run.

Grouped GEMM (:func:`_grouped_mm_kernel`), for sorted rows r of group e::

    acc[r, n] = sum_k A[arow(r), k] * B[e, n, k]        arow(r) = a_idx[r] // a_div  (GATHER_A) or r

with the epilogue chosen by ``EPILOGUE``:

    0 plain       C[crow(r), n] = acc + bias[e, n]         crow(r) = c_idx[r] (SCATTER_C) or r
                  (+ WEIGHTED_Y, k = 1 only: y[crow(r), n] = w[crow(r)] * C, the combine fused)
    1 act fwd     Z[r, n] = acc + bias;  C[crow(r), n] = act(Z)
    2 gated fwd   two accumulators over B rows n (gate) and n + F (up):
                  Z[r, n] = g, Z[r, F + n] = u;  C[crow(r), n] = act(g) * u
    3 act bwd     acc = dH;  C[r, n] = dH * act'(Z[r, n])
    4 gated bwd   acc = dH;  C[r, n] = dH * u * act'(g),  C[r, F + n] = dH * act(g)

``act`` is the constexpr ``ACT`` (:func:`_act_parts`): SiLU, GELU (tanh approximation), GELU (exact,
erf) or ReLU -- so ``swiglu`` is epilogue 2 with SiLU, ``geglu`` epilogue 2 with GELU, and so on.

Weight gradient (:func:`_grouped_wgrad_kernel`): ``dB[e, n, k] = sum_{r in group e} G[grow(r), n] *
A[arow(r), k]`` and ``dbias[e, n] = sum_r G[grow(r), n]``, one program per (e, n-tile, k-tile) looping
over the group's rows (an empty group writes zeros).

Combine (:func:`_moe_combine_kernel`, k >= 2): ``y[s] = sum_j keep[s, j] * w[s, j] * o[s*k + j]`` in j
order, fp32 accumulation.  It is a separate pass: a row's k slots come from different programs, and
summing them in the GEMM epilogue would need atomics.  Its backward
(:func:`_moe_combine_bwd_kernel`) writes ``do[s*k+j] = keep * w * dy[s]`` and
``dw[s, j] = keep * <dy[s], o[s*k+j]>``.
"""
import triton
import triton.language as tl

EPI_PLAIN, EPI_GELU, EPI_SWIGLU, EPI_GELU_BWD, EPI_SWIGLU_BWD = 0, 1, 2, 3, 4   # 1-4: any ACT below
EPI_ACT, EPI_GATED, EPI_ACT_BWD, EPI_GATED_BWD = EPI_GELU, EPI_SWIGLU, EPI_GELU_BWD, EPI_SWIGLU_BWD
ACT_SILU, ACT_GELU_TANH, ACT_GELU, ACT_RELU = 0, 1, 2, 3

_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_C = tl.constexpr(0.044715)
_SQRT_1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _find_tile(offs_ptr, E, tile, BLOCK_M: tl.constexpr):
    """Expert ``e``, first sorted row and group end of M-tile ``tile`` (tiles numbered expert after
    expert, ``cdiv(count_e, BLOCK_M)`` each), and whether such a tile exists."""
    lo = tl.load(offs_ptr)
    zero = lo * 0                                  # int32 scalars (loop-carried types must not change)
    first = zero
    e_sel = zero
    row0 = zero
    row_end = zero
    found = zero != 0
    for e in range(0, E):
        hi = tl.load(offs_ptr + e + 1)
        n_tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
        hit = (tile >= first) & (tile < first + n_tiles)
        e_sel = tl.where(hit, e, e_sel)
        row0 = tl.where(hit, lo + (tile - first) * BLOCK_M, row0)
        row_end = tl.where(hit, hi, row_end)
        found = found | hit
        first += n_tiles
        lo = hi
    return e_sel, row0, row_end, found


@triton.jit
def _gelu_tanh_parts(z):
    """gelu_tanh(z) = z * sigmoid(2a), a = sqrt(2/pi) (z + 0.044715 z^3), and its derivative."""
    a = _SQRT_2_OVER_PI * (z + _GELU_C * z * z * z)
    s = tl.sigmoid(2.0 * a)                      # = (1 + tanh a) / 2
    t = 2.0 * s - 1.0                            # tanh a
    da = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * z * z)
    return z * s, s + 0.5 * z * (1.0 - t * t) * da


@triton.jit
def _act_parts(z, ACT: tl.constexpr):
    """``(act(z), act'(z))`` in fp32 for the constexpr ``ACT`` (the unused half is dead code):

    * SiLU: ``z * sigmoid(z)``, derivative ``s (1 + z (1 - s))``;
    * GELU tanh: :func:`_gelu_tanh_parts`;
    * GELU exact: ``z * Phi(z)``, ``Phi(z) = (1 + erf(z / sqrt 2)) / 2``, derivative ``Phi(z) + z phi(z)``;
    * ReLU: ``max(z, 0)``, derivative ``1[z > 0]`` (0 at z = 0, as torch's).
    """
    if ACT == 0:
        s = tl.sigmoid(z)
        return z * s, s * (1.0 + z * (1.0 - s))
    elif ACT == 1:
        return _gelu_tanh_parts(z)
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(z * _SQRT_1_2))
        return z * cdf, cdf + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    else:
        pos = z > 0.0
        return tl.where(pos, z, 0.0), tl.where(pos, 1.0, 0.0)


@triton.jit
def _grouped_mm_kernel(
    a_ptr, b_ptr, bias_ptr, c_ptr, z_ptr, a_idx_ptr, c_idx_ptr, offs_ptr, y_ptr, w_ptr,
    M_ALLOC, N, K, E, a_div, half_n,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_biase, stride_biasn,
    stride_cm, stride_cn, stride_zm, stride_zn, stride_ym, stride_yn,
    EPILOGUE: tl.constexpr, GATHER_A: tl.constexpr, SCATTER_C: tl.constexpr, HAS_BIAS: tl.constexpr,
    WEIGHTED_Y: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grouped GEMM with fused gather / activation / scatter (see the module docstring).

    Grid: ``(cdiv(M_ALLOC, BLOCK_M) + E) * cdiv(N, BLOCK_N)`` programs over (M-tile slot, N-tile),
    numbered in GROUP_M-tile super-groups; the expert and rows of an M-tile slot are found by
    scanning the offsets.
    For the gated epilogues (2, 4) N is F (half the width of B / Z / C) and ``half_n`` = F.
    """
    pid = tl.program_id(0)
    num_t = tl.cdiv(M_ALLOC, BLOCK_M) + E
    num_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_n                    # GROUP_M M-tiles walked column by column: the
    first_t = (pid // group_size) * GROUP_M         # programs in flight share A rows and B columns
    group_rows = min(num_t - first_t, GROUP_M)      # in L2 (as in a plain tiled GEMM)
    tile = first_t + (pid % group_size) % group_rows
    pid_n = (pid % group_size) // group_rows
    e, row0, row_end, found = _find_tile(offs_ptr, E, tile, BLOCK_M)
    # No `if found:` around the main loop (it would keep the K loop from being software-pipelined):
    # a program past the last tile gets an empty row range and a zero-trip K loop instead.
    row_end = tl.where(found, row_end, row0)
    k_end = tl.where(found, K, 0)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    # int64 column offsets: a stride times an index can pass 2**31 on a strided view (e.g. expert
    # weights that are a permuted slice of a larger tensor)
    cols64 = cols.to(tl.int64)
    if GATHER_A:
        arow = (tl.load(a_idx_ptr + rows, mask=row_ok, other=0) // a_div).to(tl.int64)
    else:
        arow = rows.to(tl.int64)
    b_base = b_ptr + e.to(tl.int64) * stride_be
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if EPILOGUE == 2:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        ks64 = ks.to(tl.int64)
        a = tl.load(a_ptr + arow[:, None] * stride_am + ks64[None, :] * stride_ak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_base + cols64[None, :] * stride_bn + ks64[:, None] * stride_bk,
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if EPILOGUE == 2:
            b_up = tl.load(b_base + (cols64[None, :] + half_n) * stride_bn + ks64[:, None] * stride_bk,
                           mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        bias_base = bias_ptr + e.to(tl.int64) * stride_biase
        acc += tl.load(bias_base + cols64 * stride_biasn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if EPILOGUE == 2:
            acc_up += tl.load(bias_base + (cols64 + half_n) * stride_biasn, mask=col_ok,
                              other=0.0).to(tl.float32)[None, :]
    if SCATTER_C:
        crow = tl.load(c_idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        crow = rows.to(tl.int64)
    out_mask = row_ok[:, None] & col_ok[None, :]
    c_ptrs = c_ptr + crow[:, None] * stride_cm + cols64[None, :] * stride_cn
    z_ptrs = z_ptr + rows[:, None].to(tl.int64) * stride_zm + cols64[None, :] * stride_zn
    if EPILOGUE == 0:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=out_mask)
        if WEIGHTED_Y:  # k = 1: slot == row, so the weighted combine is one store per row, no atomics
            w = tl.load(w_ptr + crow, mask=row_ok, other=0.0)
            tl.store(y_ptr + crow[:, None] * stride_ym + cols64[None, :] * stride_yn,
                     (acc * w[:, None]).to(y_ptr.dtype.element_ty), mask=out_mask)
    elif EPILOGUE == 1:
        z = acc.to(z_ptr.dtype.element_ty)
        tl.store(z_ptrs, z, mask=out_mask)
        h, _ = _act_parts(z.to(tl.float32), ACT)
        tl.store(c_ptrs, h.to(c_ptr.dtype.element_ty), mask=out_mask)
    elif EPILOGUE == 2:
        g = acc.to(z_ptr.dtype.element_ty)
        u = acc_up.to(z_ptr.dtype.element_ty)
        tl.store(z_ptrs, g, mask=out_mask)
        tl.store(z_ptrs + half_n * stride_zn, u, mask=out_mask)
        act_g, _ = _act_parts(g.to(tl.float32), ACT)
        h = act_g * u.to(tl.float32)
        tl.store(c_ptrs, h.to(c_ptr.dtype.element_ty), mask=out_mask)
    elif EPILOGUE == 3:
        z = tl.load(z_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        _, dact = _act_parts(z, ACT)
        tl.store(c_ptrs, (acc * dact).to(c_ptr.dtype.element_ty), mask=out_mask)
    else:
        g = tl.load(z_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        u = tl.load(z_ptrs + half_n * stride_zn, mask=out_mask, other=0.0).to(tl.float32)
        act_g, dact_g = _act_parts(g, ACT)
        dg = acc * u * dact_g
        tl.store(c_ptrs, dg.to(c_ptr.dtype.element_ty), mask=out_mask)
        tl.store(c_ptrs + half_n * stride_cn, (acc * act_g).to(c_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _grouped_wgrad_kernel(
    g_ptr, a_ptr, db_ptr, dbias_ptr, g_idx_ptr, a_idx_ptr, offs_ptr,
    N, K, num_k, g_div, a_div,
    stride_gm, stride_gn, stride_am, stride_ak, stride_dbe, stride_dbn, stride_dbk,
    stride_dbiase, stride_dbiasn,
    HAS_DB: tl.constexpr, HAS_DBIAS: tl.constexpr, GATHER_G: tl.constexpr, GATHER_A: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Per-expert weight (and bias) gradient, reduced over the expert's rows in order.

    Grid: ``E * cdiv(N, BLOCK_N) * num_k`` (``num_k = cdiv(K, BLOCK_K)``, 1 when only dbias is wanted);
    program p owns expert ``p // (n_tiles * k_tiles)`` and one ``[BLOCK_N, BLOCK_K]`` tile of dB.
    """
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    e = pid // (num_n * num_k)
    rest = pid % (num_n * num_k)
    pid_n = rest // num_k
    pid_k = rest % num_k
    lo = tl.load(offs_ptr + e)
    hi = tl.load(offs_ptr + e + 1)
    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = cols_n < N
    k_ok = cols_k < K
    n64 = cols_n.to(tl.int64)                       # int64 offsets (strided views, see _grouped_mm_kernel)
    k64 = cols_k.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < hi
        if GATHER_G:
            grow = (tl.load(g_idx_ptr + rows, mask=row_ok, other=0) // g_div).to(tl.int64)
        else:
            grow = rows.to(tl.int64)
        g = tl.load(g_ptr + grow[:, None] * stride_gm + n64[None, :] * stride_gn,
                    mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        if HAS_DB:
            if GATHER_A:
                arow = (tl.load(a_idx_ptr + rows, mask=row_ok, other=0) // a_div).to(tl.int64)
            else:
                arow = rows.to(tl.int64)
            a = tl.load(a_ptr + arow[:, None] * stride_am + k64[None, :] * stride_ak,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(tl.trans(g), a, acc, input_precision=DOT_PRECISION)
        if HAS_DBIAS:
            acc_bias += tl.sum(g.to(tl.float32), axis=0)
    e64 = e.to(tl.int64)
    if HAS_DB:
        tl.store(db_ptr + e64 * stride_dbe + n64[:, None] * stride_dbn + k64[None, :] * stride_dbk,
                 acc.to(db_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])
    if HAS_DBIAS:
        tl.store(dbias_ptr + e64 * stride_dbiase + n64 * stride_dbiasn,
                 acc_bias.to(dbias_ptr.dtype.element_ty), mask=n_ok & (pid_k == 0))


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
    dy_ptr, o_ptr, w_ptr, keep_ptr, do_ptr, dw_ptr, S, H, k,
    stride_dym, stride_dyh, stride_om, stride_oh, stride_dom, stride_doh,
    HAS_DW: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """``do[s*k+j] = keep * w[s, j] * dy[s]`` (zeros for dropped slots) and ``dw[s, j] = keep *
    <dy[s], o[s*k+j]>`` (fp32, H reduced in order).  Grid: (cdiv(S, BLOCK_S),); each program loops
    over j and over H."""
    pid_s = tl.program_id(0)
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    row_ok = rows < S
    for j in range(0, k):
        slot = rows.to(tl.int64) * k + j
        kept = (tl.load(keep_ptr + slot, mask=row_ok, other=0) != 0) & row_ok
        w = tl.load(w_ptr + slot, mask=kept, other=0.0)
        dot = tl.zeros((BLOCK_S,), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            col_ok = cols < H
            cols64 = cols.to(tl.int64)
            dy = tl.load(dy_ptr + rows[:, None].to(tl.int64) * stride_dym + cols64[None, :] * stride_dyh,
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            g = tl.where(kept[:, None], dy * w[:, None], 0.0)
            tl.store(do_ptr + slot[:, None] * stride_dom + cols64[None, :] * stride_doh,
                     g.to(do_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
            if HAS_DW:
                o = tl.load(o_ptr + slot[:, None] * stride_om + cols64[None, :] * stride_oh,
                            mask=kept[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
                dot += tl.sum(dy * o, axis=1)
        if HAS_DW:
            tl.store(dw_ptr + slot, tl.where(kept, dot, 0.0), mask=row_ok)
