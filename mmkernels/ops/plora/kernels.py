"""Triton kernels for Partial-LoRA.

Shapes (row-major views, strides passed explicitly so transposed weights need no copy):
``x [M, K]``, ``W0 [N, K]``, ``A [R, K]``, ``B [N, R]``, ``y [M, N]``, ``S [M, R]`` (the LoRA hidden
state ``dropout(x) @ A.T``, unscaled), ``im_mask [M]`` (uint8 view of the bool mask).

Tile skipping: ``tile_flags[g]`` is the number of visual rows in rows ``[g*G, (g+1)*G)`` with
``G = FLAG_ROWS = 16`` (computed once per call by ``torch.ops.mmkernels.plora_tile_flags``).  A
program whose BLOCK_M rows cover flags ``[pid_m*BLOCK_M/G, ...)`` that are all zero does no LoRA
work.  Inside a visual tile the per-row mask zeroes the text rows.

Invariant: rows of ``S`` and ``dS`` are meaningful only for visual rows, so every load of them is
masked with the per-row mask; no kernel relies on what another kernel wrote to a text row.

Dropout is seeded: ``keep[m, k] = uniform(Philox4x32(key=seed, counter=(k, m_lo, m_hi, 0))) >= p``,
drawn in the forward shrink and redrawn, bit-identically, in the backward.  The row and the column
are separate counter words, so no two elements of any ``[M, K]`` matrix share a counter (a flat
``m*K + k`` counter wraps in 32 bits once ``M*K >= 2**32``, and rows ``m`` and ``m + 2**32/K`` then
drew the same mask).  :func:`_dropout_mask_kernel` materialises the same mask for tests.

Offsets: every ``index * stride`` product that can reach 2**31 (rows, and columns/K indices of
inputs that may be transposed or strided views) is formed in int64, and so are pointer steps.
"""
import triton
import triton.language as tl

FLAG_ROWS = 16  # rows per tile flag; every BLOCK_M is a multiple of it


@triton.jit
def _tile_is_visual(flags_ptr, n_flags, pid_m, BLOCK_M: tl.constexpr, FLAG_ROWS: tl.constexpr):
    """True if any row of M-tile ``pid_m`` is visual (reads BLOCK_M / FLAG_ROWS flags)."""
    offs = pid_m * (BLOCK_M // FLAG_ROWS) + tl.arange(0, BLOCK_M // FLAG_ROWS)
    counts = tl.load(flags_ptr + offs, mask=offs < n_flags, other=0)
    return tl.sum(counts, axis=0) > 0


@triton.jit
def _dropout_keep(seed, rows, cols, p):
    """Keep-mask [BM, BK] for elements (rows, cols) of a [M, K] matrix: Philox uniform >= p.

    The Philox counter is (col, row low word, row high word, 0) -- 128 bits, so every (row, col)
    pair has its own counter for any M (rows may be int32 or int64) and K < 2**32.  Plain 32-bit
    Philox4x32-10 (``tl.philox``, same on every Triton version) with the 64-bit seed as key.
    """
    rows64 = rows.to(tl.int64)
    row_lo = rows64.to(tl.uint32)
    row_hi = (rows64 >> 32).to(tl.uint32)
    c0, c1 = tl.broadcast(cols.to(tl.uint32)[None, :], row_lo[:, None])
    c2, _ = tl.broadcast(row_hi[:, None], c0)
    r0, _, _, _ = tl.philox(seed, c0, c1, c2, c0 * 0)
    return tl.uint_to_uniform_float(r0) >= p


@triton.jit
def _plora_shrink_kernel(
    x_ptr, a_ptr, s_ptr, mask_ptr, flags_ptr, seed_ptr,
    M, K, R, n_flags,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
    dropout_p, keep_scale,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    FLAG_ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """S = (dropout(x) @ A.T) on visual rows; 0 on text rows.

    Grid: (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R)); program (i, j) owns S[i*BM:(i+1)*BM, j*BR:(j+1)*BR]
    and runs the K loop.  A tile with no visual row stores zeros and stops.
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rcols = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    out_mask = row_ok[:, None] & (rcols[None, :] < R)
    s_ptrs = s_ptr + rows[:, None].to(tl.int64) * stride_sm + rcols[None, :] * stride_sr
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if _tile_is_visual(flags_ptr, n_flags, pid_m, BLOCK_M, FLAG_ROWS):
        visual = tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :].to(tl.int64) * stride_xk,
                        mask=(visual & row_ok)[:, None] & k_ok[None, :], other=0.0)
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, rows, ks, dropout_p)
                x = tl.where(keep, x.to(tl.float32) * keep_scale, 0.0).to(x_ptr.dtype.element_ty)
            a = tl.load(a_ptr + rcols[None, :].to(tl.int64) * stride_ar + ks[:, None].to(tl.int64) * stride_ak,
                        mask=(rcols[None, :] < R) & k_ok[:, None], other=0.0)
            acc = tl.dot(x, a, acc, input_precision=DOT_PRECISION)
    tl.store(s_ptrs, acc.to(s_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _plora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, b_ptr, y_ptr, mask_ptr, flags_ptr,
    M, N, K, R, n_flags,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr,
    stride_bn, stride_br, stride_ym, stride_yn, stride_bias,
    scaling,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FLAG_ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """y = x @ W0.T + b0, plus scaling * S @ B.T on visual rows, in one pass over y.

    Grid: one program per (BLOCK_M x BLOCK_N) tile of y, numbered in GROUP_M-row super-groups so
    that neighbouring programs share rows of x and columns of W0 in L2.  For a visual tile the
    accumulator is seeded with the LoRA expand (R extra K-steps), then the base K loop runs; a text
    tile runs the base K loop alone, so its rows are bit-identical to the plain linear.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    group_id = pid // group_size
    first_m = group_id * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_rows
    pid_n = (pid % group_size) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA:
        if _tile_is_visual(flags_ptr, n_flags, pid_m, BLOCK_M, FLAG_ROWS):
            visual = tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0
            for r0 in range(0, R, BLOCK_K):
                rs = r0 + tl.arange(0, BLOCK_K)
                r_ok = rs < R
                s = tl.load(s_ptr + rows[:, None].to(tl.int64) * stride_sm + rs[None, :] * stride_sr,
                            mask=(visual & row_ok)[:, None] & r_ok[None, :], other=0.0)
                b = tl.load(b_ptr + cols[None, :].to(tl.int64) * stride_bn + rs[:, None].to(tl.int64) * stride_br,
                            mask=col_ok[None, :] & r_ok[:, None], other=0.0)
                acc = tl.dot(s, b, acc, input_precision=DOT_PRECISION)
            acc = acc * scaling
    # Base K loop.  Row / column indices wrap (% M, % N) so the loads need no row or column mask
    # (the wrapped rows are computed and then dropped by the masked store); only a ragged K tail
    # is masked, and not at all when EVEN_K.
    rows_w = tl.max_contiguous(tl.multiple_of(rows % M, BLOCK_M), BLOCK_M)
    cols_w = tl.max_contiguous(tl.multiple_of(cols % N, BLOCK_N), BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows_w[:, None].to(tl.int64) * stride_xm + ks[None, :].to(tl.int64) * stride_xk
    w_ptrs = w_ptr + cols_w[None, :].to(tl.int64) * stride_wn + ks[:, None].to(tl.int64) * stride_wk
    x_step = tl.cast(stride_xk, tl.int64) * BLOCK_K  # int64: BLOCK_K * stride can pass 2**31
    w_step = tl.cast(stride_wk, tl.int64) * BLOCK_K
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            x = tl.load(x_ptrs, mask=ks[None, :] < K - k * BLOCK_K, other=0.0)
            w = tl.load(w_ptrs, mask=ks[:, None] < K - k * BLOCK_K, other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += x_step
        w_ptrs += w_step
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols.to(tl.int64) * stride_bias, mask=col_ok, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _plora_bwd_ds_kernel(
    dy_ptr, b_ptr, ds_ptr, mask_ptr, flags_ptr,
    M, N, R, n_flags,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_dsm, stride_dsr,
    scaling,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    FLAG_ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dS = scaling * dY @ B on visual rows.

    Grid: (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R)); the reduction runs over N.  Text tiles are skipped
    (their dS rows are never read: consumers mask by the row mask).
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    if _tile_is_visual(flags_ptr, n_flags, pid_m, BLOCK_M, FLAG_ROWS):
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rcols = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < M
        visual = tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)
            n_ok = ns < N
            dy = tl.load(dy_ptr + rows[:, None].to(tl.int64) * stride_dym + ns[None, :].to(tl.int64) * stride_dyn,
                         mask=(visual & row_ok)[:, None] & n_ok[None, :], other=0.0)
            b = tl.load(b_ptr + ns[:, None].to(tl.int64) * stride_bn + rcols[None, :].to(tl.int64) * stride_br,
                        mask=n_ok[:, None] & (rcols[None, :] < R), other=0.0)
            acc = tl.dot(dy, b, acc, input_precision=DOT_PRECISION)
        acc = acc * scaling
        ds_ptrs = ds_ptr + rows[:, None].to(tl.int64) * stride_dsm + rcols[None, :] * stride_dsr
        tl.store(ds_ptrs, acc.to(ds_ptr.dtype.element_ty), mask=row_ok[:, None] & (rcols[None, :] < R))


@triton.jit
def _plora_bwd_dlora_b_kernel(
    dy_ptr, s_ptr, db_ptr, mask_ptr, flags_ptr,
    M, N, R, n_flags,
    stride_dym, stride_dyn, stride_sm, stride_sr, stride_dbn, stride_dbr,
    scaling,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    FLAG_ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dB = scaling * dY[visual].T @ S[visual]   ([N, R], a reduction over rows).

    Grid: (cdiv(N, BLOCK_N), cdiv(R, BLOCK_R)); each program walks all M-tiles in order (so the
    result is deterministic) and skips those without a visual row.
    """
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rcols = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    n_ok = ns < N
    r_ok = rcols < R
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for pid_m in range(0, tl.cdiv(M, BLOCK_M)):
        if _tile_is_visual(flags_ptr, n_flags, pid_m, BLOCK_M, FLAG_ROWS):
            rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            visual = (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0) & row_ok
            dy_t = tl.load(dy_ptr + rows[None, :].to(tl.int64) * stride_dym + ns[:, None].to(tl.int64) * stride_dyn,
                           mask=visual[None, :] & n_ok[:, None], other=0.0)
            s = tl.load(s_ptr + rows[:, None].to(tl.int64) * stride_sm + rcols[None, :] * stride_sr,
                        mask=visual[:, None] & r_ok[None, :], other=0.0)
            acc = tl.dot(dy_t, s, acc, input_precision=DOT_PRECISION)
    acc = acc * scaling
    tl.store(db_ptr + ns[:, None] * stride_dbn + rcols[None, :] * stride_dbr,
             acc.to(db_ptr.dtype.element_ty), mask=n_ok[:, None] & r_ok[None, :])


@triton.jit
def _plora_bwd_dlora_a_kernel(
    ds_ptr, x_ptr, da_ptr, mask_ptr, flags_ptr, seed_ptr,
    M, K, R, n_flags,
    stride_dsm, stride_dsr, stride_xm, stride_xk, stride_dar, stride_dak,
    dropout_p, keep_scale,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    FLAG_ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dA = dS[visual].T @ dropout(x)[visual]   ([R, K], a reduction over rows).

    Grid: (cdiv(R, BLOCK_R), cdiv(K, BLOCK_K)); each program walks all M-tiles in order, skipping
    text tiles, and redraws the forward's dropout mask for its (rows, k) block.
    """
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    rcols = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    r_ok = rcols < R
    k_ok = ks < K
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for pid_m in range(0, tl.cdiv(M, BLOCK_M)):
        if _tile_is_visual(flags_ptr, n_flags, pid_m, BLOCK_M, FLAG_ROWS):
            rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            visual = (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0) & row_ok
            ds_t = tl.load(ds_ptr + rows[None, :].to(tl.int64) * stride_dsm + rcols[:, None] * stride_dsr,
                           mask=visual[None, :] & r_ok[:, None], other=0.0)
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :].to(tl.int64) * stride_xk,
                        mask=visual[:, None] & k_ok[None, :], other=0.0)
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, rows, ks, dropout_p)
                x = tl.where(keep, x.to(tl.float32) * keep_scale, 0.0).to(x_ptr.dtype.element_ty)
            acc = tl.dot(ds_t, x, acc, input_precision=DOT_PRECISION)
    tl.store(da_ptr + rcols[:, None] * stride_dar + ks[None, :] * stride_dak,
             acc.to(da_ptr.dtype.element_ty), mask=r_ok[:, None] & k_ok[None, :])


@triton.jit
def _plora_bwd_dx_kernel(
    dy_ptr, w_ptr, ds_ptr, a_ptr, dx_ptr, mask_ptr, flags_ptr, seed_ptr,
    M, N, K, R, n_flags,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_dsm, stride_dsr,
    stride_ar, stride_ak, stride_dxm, stride_dxk,
    dropout_p, keep_scale,
    HAS_LORA: tl.constexpr, HAS_DROPOUT: tl.constexpr, EVEN_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    FLAG_ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dX = dY @ W0, plus (dS @ A) * keep / (1 - p) on visual rows.

    Grid: one program per (BLOCK_M x BLOCK_K) tile of dX, GROUP_M-swizzled like the forward.  The
    LoRA term is computed in its own accumulator (it is multiplied by the dropout mask) and added
    only in visual tiles; text rows get exactly the base linear's input gradient.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    group_size = GROUP_M * num_pid_k
    group_id = pid // group_size
    first_m = group_id * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_rows
    pid_k = (pid % group_size) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    k_ok = ks < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    # Base reduction over N, tutorial style: wrapped row/column indices, N tail masked only.
    rows_w = tl.max_contiguous(tl.multiple_of(rows % M, BLOCK_M), BLOCK_M)
    ks_w = tl.max_contiguous(tl.multiple_of(ks % K, BLOCK_K), BLOCK_K)
    ns = tl.arange(0, BLOCK_N)
    dy_ptrs = dy_ptr + rows_w[:, None].to(tl.int64) * stride_dym + ns[None, :].to(tl.int64) * stride_dyn
    w_ptrs = w_ptr + ns[:, None].to(tl.int64) * stride_wn + ks_w[None, :].to(tl.int64) * stride_wk
    dy_step = tl.cast(stride_dyn, tl.int64) * BLOCK_N  # int64: BLOCK_N * stride can pass 2**31
    w_step = tl.cast(stride_wn, tl.int64) * BLOCK_N
    for n in range(0, tl.cdiv(N, BLOCK_N)):
        if EVEN_N:
            dy = tl.load(dy_ptrs)
            w = tl.load(w_ptrs)
        else:
            dy = tl.load(dy_ptrs, mask=ns[None, :] < N - n * BLOCK_N, other=0.0)
            w = tl.load(w_ptrs, mask=ns[:, None] < N - n * BLOCK_N, other=0.0)
        acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
        dy_ptrs += dy_step
        w_ptrs += w_step
    if HAS_LORA:
        if _tile_is_visual(flags_ptr, n_flags, pid_m, BLOCK_M, FLAG_ROWS):
            visual = (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0) & row_ok
            lora = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for r0 in range(0, R, BLOCK_N):
                rs = r0 + tl.arange(0, BLOCK_N)
                r_ok = rs < R
                ds = tl.load(ds_ptr + rows[:, None].to(tl.int64) * stride_dsm + rs[None, :] * stride_dsr,
                             mask=visual[:, None] & r_ok[None, :], other=0.0)
                a = tl.load(a_ptr + rs[:, None].to(tl.int64) * stride_ar + ks[None, :].to(tl.int64) * stride_ak,
                            mask=r_ok[:, None] & k_ok[None, :], other=0.0)
                lora = tl.dot(ds, a, lora, input_precision=DOT_PRECISION)
            if HAS_DROPOUT:
                seed = tl.load(seed_ptr)
                keep = _dropout_keep(seed, rows, ks, dropout_p)
                lora = tl.where(keep, lora * keep_scale, 0.0)
            acc += tl.where(visual[:, None], lora, 0.0)
    tl.store(dx_ptr + rows[:, None].to(tl.int64) * stride_dxm + ks[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :])


@triton.jit
def _plora_bwd_dw_kernel(
    dy_ptr, x_ptr, dw_ptr, dbias_ptr,
    M, N, K,
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_dwn, stride_dwk,
    HAS_DW: tl.constexpr, HAS_DBIAS: tl.constexpr, EVEN_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dW0 = dY.T @ x over all rows ([N, K]); db0 = column sums of dY, by the pid_k == 0 programs.

    Grid: (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K)) -- or (cdiv(N, BLOCK_N), 1) when only db0 is needed.
    Each program reduces over M in order: deterministic, no atomics.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = ns < N
    k_ok = ks < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # Reduction over rows with wrapped N / K indices; only a ragged M tail is masked.
    ns_w = tl.max_contiguous(tl.multiple_of(ns % N, BLOCK_N), BLOCK_N)
    ks_w = tl.max_contiguous(tl.multiple_of(ks % K, BLOCK_K), BLOCK_K)
    ms = tl.arange(0, BLOCK_M)
    dy_ptrs = dy_ptr + ms[None, :].to(tl.int64) * stride_dym + ns_w[:, None].to(tl.int64) * stride_dyn
    x_ptrs = x_ptr + ms[:, None].to(tl.int64) * stride_xm + ks_w[None, :].to(tl.int64) * stride_xk
    dy_step = tl.cast(stride_dym, tl.int64) * BLOCK_M  # int64: BLOCK_M * stride can pass 2**31
    x_step = tl.cast(stride_xm, tl.int64) * BLOCK_M
    for m in range(0, tl.cdiv(M, BLOCK_M)):
        if EVEN_M:
            dy_t = tl.load(dy_ptrs)
        else:
            dy_t = tl.load(dy_ptrs, mask=ms[None, :] < M - m * BLOCK_M, other=0.0)
        if HAS_DW:
            if EVEN_M:
                x = tl.load(x_ptrs)
            else:
                x = tl.load(x_ptrs, mask=ms[:, None] < M - m * BLOCK_M, other=0.0)
            acc = tl.dot(dy_t, x, acc, input_precision=DOT_PRECISION)
        if HAS_DBIAS:
            bias_acc += tl.sum(dy_t.to(tl.float32), axis=1)
        dy_ptrs += dy_step
        x_ptrs += x_step
    if HAS_DW:
        tl.store(dw_ptr + ns[:, None].to(tl.int64) * stride_dwn + ks[None, :] * stride_dwk,
                 acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])
    if HAS_DBIAS:
        if pid_k == 0:
            tl.store(dbias_ptr + ns, bias_acc.to(dbias_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _dropout_mask_kernel(seed_ptr, keep_ptr, row0, M, K, dropout_p,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Materialise rows ``[row0, row0 + M)`` of the keep-mask the PLoRA kernels draw for a given seed
    (for tests and debugging; ``row0`` may exceed 2**31, so far rows are checked without allocating
    them).

    Grid: (cdiv(M, BLOCK_M), cdiv(K, BLOCK_K)).
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    seed = tl.load(seed_ptr)
    keep = _dropout_keep(seed, rows.to(tl.int64) + row0, ks, dropout_p)
    tl.store(keep_ptr + rows[:, None].to(tl.int64) * K + ks[None, :], keep.to(tl.int8),
             mask=(rows[:, None] < M) & (ks[None, :] < K))
