"""Triton kernels for Partial-LoRA that are not on the shared GEMM core.

The forward GEMM (``y = x @ W0.T + b0 + scaling * S @ B.T`` on visual rows), dX and dS run on the
shared GEMM core (:mod:`mmkernels.ops._gemm`); here are the LoRA shrink, the LoRA weight gradients
dA and dB, the base weight gradient dW0, and two helpers.

Shapes (row-major views, strides passed explicitly so transposed weights need no copy):
``x [M, K]``, ``W0 [N, K]``, ``A [R, K]``, ``B [N, R]``, ``y [M, N]``, ``S [M, R]`` (the LoRA hidden
state ``dropout(x) @ A.T``, unscaled), ``im_mask [M]`` (uint8 view of the bool mask).

Tile skipping: ``tile_flags[g]`` is the number of visual rows in rows ``[g*G, (g+1)*G)`` with
``G = FLAG_ROWS = 16`` (computed once per call by ``torch.ops.mmkernels.plora_tile_flags``).  A
program whose BLOCK_M rows have no visual row does no LoRA work.  The row reductions dA and dB walk
only the visual M-tiles: :func:`_plora_visual_tiles_kernel` lists them (in order) on the device, so
their loop has no ``if`` (it is software-pipelined) and a batch without visual rows costs a launch.
Inside a visual tile the per-row mask zeroes the text rows.

Invariant: rows of ``S`` and ``dS`` are meaningful only for visual rows, so every load of them is
masked with the per-row mask; no kernel relies on what another kernel wrote to a text row.

Dropout is seeded: ``keep[m, k] = uniform(word k % 4 of Philox4x32-10(key=seed, counter=(k // 4,
m_lo, m_hi, 0))) >= p`` (:func:`mmkernels.ops._gemm.kernels.dropout_keep`; one Philox call draws four
neighbouring columns).  The row and the column group are separate counter words, so no two elements
of any ``[M, K]`` matrix share a draw.  The mask is drawn once per training step, by
:func:`_dropout_bits_kernel`, into packed bits ``keep_bits [M, cdiv(K, 32)]`` (int32; bit ``j`` of word
``w`` is column ``32 w + j``; 0 on text rows); the forward saves them, and the shrink, dA (here) and
dX (on the core) read them.  The shrink and dA zero the dropped elements of x and scale their
accumulator by ``1 / (1 - p)`` once at the end.  :func:`_dropout_mask_kernel` materialises the same
mask, unpacked, for tests.

Offsets: every ``index * stride`` product that can reach 2**31 (rows, and columns/K indices of
inputs that may be transposed or strided views) is formed in int64, and so are pointer steps.
"""
import triton
import triton.language as tl

from .._gemm.kernels import KEEP_BITS, any_row_flag, dropout_keep, keep_bits_zero, pack_keep_bits

FLAG_ROWS = 16  # rows per tile flag; every BLOCK_M is a multiple of it


@triton.jit
def _plora_shrink_kernel(
    x_ptr, a_ptr, s_ptr, mask_ptr, flags_ptr, keep_bits_ptr,
    M, K, R, n_flags,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr, stride_keep,
    keep_scale,
    HAS_DROPOUT: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    FLAG_ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """S = (dropout(x) @ A.T) on visual rows; 0 on text rows.

    Grid: (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R)); program (i, j) owns S[i*BM:(i+1)*BM, j*BR:(j+1)*BR]
    and runs the K loop (rows of A past R wrap: they feed columns of S that are never stored; with
    ``EVEN_K`` no load has a column mask).  A tile with no visual row stores zeros and stops.  With
    dropout the x tile's keep bits (``keep_bits [M, stride_keep]``, :func:`_dropout_bits_kernel`) are read beside it.
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rcols = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    out_mask = row_ok[:, None] & (rcols[None, :] < R)
    s_ptrs = s_ptr + rows[:, None].to(tl.int64) * stride_sm + rcols[None, :] * stride_sr
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if any_row_flag(flags_ptr, n_flags, pid_m * BLOCK_M, BLOCK_M, FLAG_ROWS):
        row_sel = (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)[:, None]   # visual rows (< M)
        rs64 = tl.max_contiguous(tl.multiple_of(rcols % R, BLOCK_R), BLOCK_R).to(tl.int64)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :].to(tl.int64) * stride_xk
            a_ptrs = a_ptr + rs64[None, :] * stride_ar + ks[:, None].to(tl.int64) * stride_ak
            if EVEN_K:    # (no column mask: every load of the loop is masked by rows only)
                x = tl.load(x_ptrs, mask=row_sel, other=0.0)
                a = tl.load(a_ptrs)
            else:
                x = tl.load(x_ptrs, mask=row_sel & (ks < K)[None, :], other=0.0)
                a = tl.load(a_ptrs, mask=(ks < K)[:, None], other=0.0)
            if HAS_DROPOUT:
                words = k0 // KEEP_BITS + tl.arange(0, BLOCK_K // KEEP_BITS)
                keep_ptrs = keep_bits_ptr + rows[:, None].to(tl.int64) * stride_keep + words[None, :]
                if EVEN_K:
                    keep = tl.load(keep_ptrs, mask=row_sel, other=0)
                else:
                    keep = tl.load(keep_ptrs, mask=row_sel & (words < stride_keep)[None, :], other=0)
                x = keep_bits_zero(x, keep)
            acc = tl.dot(x, a, acc, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            acc = acc * keep_scale    # the kept elements' 1 / (1 - p), once per output element
    tl.store(s_ptrs, acc.to(s_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _plora_visual_tiles_kernel(flags_ptr, n_flags, run_start_ptr, run_end_ptr, part_ptr, counts_ptr, n_tiles,
                               FLAGS_PER_TILE: tl.constexpr, FLAG_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Where the visual rows are, at the granularity of M-tiles of ``FLAGS_PER_TILE * FLAG_ROWS`` rows:

    * the runs of consecutive tiles whose rows are all visual: tiles ``[run_start[j], run_end[j])`` for
      ``j < counts[0]``, in order;
    * the tiles with some visual and some text rows: ``part[0 .. counts[1])``, in order.

    One program; running prefix sums over blocks of tiles (a tile's neighbours are re-read from the
    flags, so the blocks need no carried state)."""
    offs = tl.arange(0, BLOCK)
    groups = tl.arange(0, FLAGS_PER_TILE)
    n_runs = tl.sum(offs * 0, axis=0)
    n_ends = n_runs
    n_part = n_runs
    for t0 in range(0, n_tiles, BLOCK):
        tiles = t0 + offs
        full = _tile_is_full(flags_ptr, n_flags, tiles, n_tiles, groups, FLAGS_PER_TILE, FLAG_ROWS)
        full_prev = _tile_is_full(flags_ptr, n_flags, tiles - 1, n_tiles, groups, FLAGS_PER_TILE, FLAG_ROWS)
        full_next = _tile_is_full(flags_ptr, n_flags, tiles + 1, n_tiles, groups, FLAGS_PER_TILE, FLAG_ROWS)
        flag_idx = tiles[:, None] * FLAGS_PER_TILE + groups[None, :]
        counts = tl.sum(tl.load(flags_ptr + flag_idx, mask=flag_idx < n_flags, other=0), axis=1)
        part = (counts > 0) & ~full & (tiles < n_tiles)
        starts = full & ~full_prev
        ends = full & ~full_next
        tl.store(run_start_ptr + n_runs + tl.cumsum(starts.to(tl.int32), axis=0) - 1, tiles, mask=starts)
        tl.store(run_end_ptr + n_ends + tl.cumsum(ends.to(tl.int32), axis=0) - 1, tiles + 1, mask=ends)
        tl.store(part_ptr + n_part + tl.cumsum(part.to(tl.int32), axis=0) - 1, tiles, mask=part)
        n_runs += tl.sum(starts.to(tl.int32), axis=0)
        n_ends += tl.sum(ends.to(tl.int32), axis=0)
        n_part += tl.sum(part.to(tl.int32), axis=0)
    tl.store(counts_ptr, n_runs)
    tl.store(counts_ptr + 1, n_part)


@triton.jit
def _tile_is_full(flags_ptr, n_flags, tiles, n_tiles, groups, FLAGS_PER_TILE: tl.constexpr, FLAG_ROWS: tl.constexpr):
    """Whether each M-tile in ``tiles`` (any int vector; out-of-range tiles are not) has only visual rows."""
    flag_idx = tiles[:, None] * FLAGS_PER_TILE + groups[None, :]
    ok = (tiles >= 0) & (tiles < n_tiles)
    counts = tl.sum(tl.load(flags_ptr + flag_idx, mask=ok[:, None] & (flag_idx < n_flags), other=0), axis=1)
    return ok & (counts == FLAGS_PER_TILE * FLAG_ROWS)


@triton.jit
def _plora_bwd_dlora_b_kernel(
    dy_ptr, s_ptr, db_ptr, mask_ptr, run_start_ptr, run_end_ptr, part_ptr, counts_ptr,
    M, N, R,
    stride_dym, stride_dyn, stride_sm, stride_sr, stride_dbn, stride_dbr,
    scaling,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PART_STAGES: tl.constexpr,
):
    """dB = scaling * dY[visual].T @ S[visual]   ([N, R], a reduction over rows).

    Grid: (cdiv(N, BLOCK_N), cdiv(R, BLOCK_R)).  Each program reduces, in a fixed order (so the result
    is deterministic), over the M-tiles :func:`_plora_visual_tiles_kernel` lists: first the tiles with
    some text rows, whose text rows are masked out of both operands (a NaN in a text row of dY must
    not reach dB), then the runs of all-visual tiles -- plain loops over consecutive rows with no
    mask.  Text-only tiles are never read.  Column indices wrap (``% N``, ``% R``) so the loads need
    no column mask.

    Both loops are software-pipelined.  The first loads each tile's index before its operands (one
    level of indirection), and Triton's pipeliner divides a loop's ``num_stages - 1`` stages of
    prefetch among the levels of such a chain; ``PART_STAGES = 2 * num_stages - 1`` (set by the
    launcher) gives its operand loads the prefetch distance of the second loop.
    """
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rcols = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    ns64 = tl.max_contiguous(tl.multiple_of(ns % N, BLOCK_N), BLOCK_N).to(tl.int64)
    rs64 = tl.max_contiguous(tl.multiple_of(rcols % R, BLOCK_R), BLOCK_R).to(tl.int64)
    ms = tl.arange(0, BLOCK_M)
    dy_step = tl.cast(stride_dym, tl.int64) * BLOCK_M     # int64: BLOCK_M * stride can pass 2**31
    s_step = tl.cast(stride_sm, tl.int64) * BLOCK_M
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for i in tl.range(0, tl.load(counts_ptr + 1), num_stages=PART_STAGES):
        rows = tl.load(part_ptr + i) * BLOCK_M + ms
        visual = tl.load(mask_ptr + rows, mask=rows < M, other=0) != 0
        rows64 = rows.to(tl.int64)
        dy_t = tl.load(dy_ptr + rows64[None, :] * stride_dym + ns64[:, None] * stride_dyn,
                       mask=visual[None, :], other=0.0)
        s = tl.load(s_ptr + rows64[:, None] * stride_sm + rs64[None, :] * stride_sr, mask=visual[:, None], other=0.0)
        acc = tl.dot(dy_t, s, acc, input_precision=DOT_PRECISION)
    for j in range(0, tl.load(counts_ptr)):
        t_start = tl.load(run_start_ptr + j)
        rows64 = (t_start * BLOCK_M + ms).to(tl.int64)
        dy_ptrs = dy_ptr + rows64[None, :] * stride_dym + ns64[:, None] * stride_dyn
        s_ptrs = s_ptr + rows64[:, None] * stride_sm + rs64[None, :] * stride_sr
        for t in range(t_start, tl.load(run_end_ptr + j)):
            acc = tl.dot(tl.load(dy_ptrs), tl.load(s_ptrs), acc, input_precision=DOT_PRECISION)
            dy_ptrs += dy_step
            s_ptrs += s_step
    acc = acc * scaling
    tl.store(db_ptr + ns[:, None].to(tl.int64) * stride_dbn + rcols[None, :] * stride_dbr,
             acc.to(db_ptr.dtype.element_ty), mask=(ns < N)[:, None] & (rcols < R)[None, :])


@triton.jit
def _plora_bwd_dlora_a_kernel(
    ds_ptr, x_ptr, da_ptr, mask_ptr, run_start_ptr, run_end_ptr, part_ptr, counts_ptr, keep_bits_ptr,
    M, K, R,
    stride_dsm, stride_dsr, stride_xm, stride_xk, stride_dar, stride_dak, stride_keep,
    keep_scale,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PART_STAGES: tl.constexpr,
):
    """dA = dS[visual].T @ dropout(x)[visual]   ([R, K], a reduction over rows).

    Grid: (cdiv(R, BLOCK_R), cdiv(K, BLOCK_K)); the listed M-tiles as in :func:`_plora_bwd_dlora_b_kernel`
    (the visual tiles with text rows, masked out of both operands, then the runs of all-visual tiles
    unmasked; ``PART_STAGES`` as there); with dropout the forward's keep bits of each (rows, k) block
    are read beside x.  Column indices wrap (the keep words past K read as 0: those columns are never
    stored).
    """
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    rcols = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rs64 = tl.max_contiguous(tl.multiple_of(rcols % R, BLOCK_R), BLOCK_R).to(tl.int64)
    ks64 = tl.max_contiguous(tl.multiple_of(ks % K, BLOCK_K), BLOCK_K).to(tl.int64)
    ms = tl.arange(0, BLOCK_M)
    ds_step = tl.cast(stride_dsm, tl.int64) * BLOCK_M
    x_step = tl.cast(stride_xm, tl.int64) * BLOCK_M
    words = pid_k * (BLOCK_K // KEEP_BITS) + tl.arange(0, BLOCK_K // KEEP_BITS)
    words_ok = words < stride_keep
    keep_step = tl.cast(stride_keep, tl.int64) * BLOCK_M
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for i in tl.range(0, tl.load(counts_ptr + 1), num_stages=PART_STAGES):
        rows = tl.load(part_ptr + i) * BLOCK_M + ms
        visual = tl.load(mask_ptr + rows, mask=rows < M, other=0) != 0
        rows64 = rows.to(tl.int64)
        ds_t = tl.load(ds_ptr + rows64[None, :] * stride_dsm + rs64[:, None] * stride_dsr,
                       mask=visual[None, :], other=0.0)
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + ks64[None, :] * stride_xk, mask=visual[:, None], other=0.0)
        if HAS_DROPOUT:
            keep = tl.load(keep_bits_ptr + rows64[:, None] * stride_keep + words[None, :],
                           mask=visual[:, None] & words_ok[None, :], other=0)
            x = keep_bits_zero(x, keep)
        acc = tl.dot(ds_t, x, acc, input_precision=DOT_PRECISION)
    for j in range(0, tl.load(counts_ptr)):
        t_start = tl.load(run_start_ptr + j)
        rows64 = (t_start * BLOCK_M + ms).to(tl.int64)
        ds_ptrs = ds_ptr + rows64[None, :] * stride_dsm + rs64[:, None] * stride_dsr
        x_ptrs = x_ptr + rows64[:, None] * stride_xm + ks64[None, :] * stride_xk
        keep_ptrs = keep_bits_ptr + rows64[:, None] * stride_keep + words[None, :]
        for t in range(t_start, tl.load(run_end_ptr + j)):
            x = tl.load(x_ptrs)
            if HAS_DROPOUT:
                x = keep_bits_zero(x, tl.load(keep_ptrs, mask=words_ok[None, :], other=0))
            acc = tl.dot(tl.load(ds_ptrs), x, acc, input_precision=DOT_PRECISION)
            ds_ptrs += ds_step
            x_ptrs += x_step
            keep_ptrs += keep_step
    if HAS_DROPOUT:
        acc = acc * keep_scale
    tl.store(da_ptr + rcols[:, None] * stride_dar + ks[None, :] * stride_dak,
             acc.to(da_ptr.dtype.element_ty), mask=(rcols < R)[:, None] & (ks < K)[None, :])


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
def _dropout_bits_kernel(seed_ptr, keep_bits_ptr, mask_ptr, flags_ptr, M, K, n_flags, stride_keep, keep_threshold,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, FLAG_ROWS: tl.constexpr):
    """Draw the dropout keep-mask of the visual rows once, packed: bit ``j`` of
    ``keep_bits[m, w]`` (int32 ``[M, stride_keep]``, ``stride_keep = cdiv(K, 32)``) is ``keep[m, 32 w + j]``
    (:func:`dropout_keep`) on visual rows, 0 on text rows and past K.

    Grid: (cdiv(M, BLOCK_M), cdiv(K, BLOCK_K)); program (i, j) writes the words of rows
    ``[i*BM, (i+1)*BM)`` and columns ``[j*BK, (j+1)*BK)``.  A tile with no visual row draws nothing and
    stores zeros.
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    words = pid_k * (BLOCK_K // KEEP_BITS) + tl.arange(0, BLOCK_K // KEEP_BITS)
    row_ok = rows < M
    packed = tl.zeros((BLOCK_M, BLOCK_K // KEEP_BITS), dtype=tl.int32)
    if any_row_flag(flags_ptr, n_flags, pid_m * BLOCK_M, BLOCK_M, FLAG_ROWS):
        visual = tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0
        ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        keep = dropout_keep(tl.load(seed_ptr), rows, pid_k * BLOCK_K, keep_threshold, BLOCK_K)
        packed = pack_keep_bits(keep & visual[:, None] & (ks < K)[None, :])
    tl.store(keep_bits_ptr + rows[:, None].to(tl.int64) * stride_keep + words[None, :], packed,
             mask=row_ok[:, None] & (words < stride_keep)[None, :])


@triton.jit
def _dropout_mask_kernel(seed_ptr, keep_ptr, row0, M, K, keep_threshold,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Materialise rows ``[row0, row0 + M)`` of the keep-mask the PLoRA kernels draw for a given seed
    (for tests and debugging; ``row0`` may exceed 2**31, so far rows are checked without allocating
    them).

    Grid: (cdiv(M, BLOCK_M), cdiv(K, BLOCK_K)).
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    seed = tl.load(seed_ptr)
    keep = dropout_keep(seed, rows.to(tl.int64) + row0, tl.program_id(1) * BLOCK_K, keep_threshold, BLOCK_K)
    tl.store(keep_ptr + rows[:, None].to(tl.int64) * K + ks[None, :], keep.to(tl.int8),
             mask=(rows[:, None] < M) & (ks[None, :] < K))
