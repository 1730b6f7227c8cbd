"""The shared GEMM core: one persistent tile GEMM and one row-reduction GEMM, with the epilogues the
operators fuse into them.

**Row GEMM** (:func:`_gemm_kernel`): for the output rows r of group e (an expert of a MoE layer, or the
single group of a dense linear) and output columns n::

    acc[r, n] = lora_scale * sum_j L[r, j] LB[n, j]        (LORA == 1, visual rows only; see below)
              + sum_k A[arow(r), k] * B[e, n, k]
    arow(r)   = a_idx[r] // A_DIV  (A_GATHER)  or  r

then one epilogue (``EPILOGUE``):

    0 plain       C[crow(r), n] = acc + bias[e, n]        crow(r) = c_idx[r] (SCATTER_C) or r
                  (+ WEIGHTED_Y: y[crow(r), n] = w[crow(r)] * C, the k = 1 MoE combine)
    1 act fwd     Z[r, n] = acc + bias;  C[crow(r), n] = act(Z)
    2 gated fwd   two accumulators over B rows n (gate) and n + half_n (up):
                  Z[r, n] = g, Z[r, half_n + n] = u;  C[crow(r), n] = act(g) * u
    3 act bwd     C[r, n] = acc * act'(Z[r, n])
    4 gated bwd   C[r, n] = acc * u * act'(g),  C[r, half_n + n] = acc * act(g)
    5 scaled      C[r, n] = out_scale * acc

``act`` is the constexpr ``ACT``: SiLU, GELU (tanh approximation), GELU (exact, erf) or ReLU.

*Operands.*  ``B`` is addressed as ``[E, N, K]``.  On the GPU it is read through a TMA tensor
descriptor (``B_TMA``) over its memory layout: ``[E, N, K]`` with K contiguous (``B_KMAJOR``, the
weight of ``x @ W.T``) or ``[E, K, N]`` with N contiguous (the transposed view of a backward pass);
the descriptor bounds each expert's slice, so tails read zeros.  ``A`` is read through a descriptor
too (``A_TMA``) when its rows are contiguous (sorted rows, a dense input): rows past a group's end
belong to the next group but only feed output rows that are never stored.  Gathered rows
(``A_GATHER``), unaligned strides and the interpreter's odd sizes take the pointer path (``cp.async``
on sm_80/sm_90).

*Schedule.*  The grid is persistent: ``num_programs`` programs walk the output tiles ``pid,
pid + num_programs, ...``.  Tile ``t`` is an (M-tile, N-tile) pair in GROUP_M super-rows
(:func:`swizzle`, so programs running at the same time share A rows and B columns in L2).  With
``GROUPED`` the M-tiles are numbered expert after expert (``cdiv(count_e, BLOCK_M)`` each) and
:func:`find_group_tile` maps one to its expert and rows by scanning the ``E + 1`` offsets on the
device: the host only knows an upper bound on the tile count (``cdiv(M, BLOCK_M) + E``), so no
count is ever read on the host.  A tile past the last one gets a zero-trip K loop and an empty row
range (no ``if`` around the main loop: that would keep it from being software-pipelined).

*LoRA terms* (PLoRA).  ``LORA == 1``: before the main loop, the same accumulator takes
``L @ LB.T`` over ``R`` (``LB_KMAJOR``: LB is ``[N, R]``; else ``[R, N]``) on the rows whose
``row_mask`` is set, then is scaled by ``lora_scale`` (when ``LORA_SCALE``).  The LoRA loop is
zero-trip for a tile with no masked row (read from ``tile_flags``), so such a tile runs exactly the
plain GEMM (its rows are bit-identical to it) -- and it is a loop, not an ``if``: a conditionally
defined accumulator makes ptxas serialize every wgmma of the kernel (warning C7515).  ``LORA == 2``
(dropout): the same, except that the LoRA product is multiplied element by element by
``keep_scale`` times the dropout keep-mask instead of a scale: the mask the PLoRA forward drew once
(:func:`dropout_keep`), read as packed bits ``keep_bits [M, stride_keep]`` (int32 words of 32 columns,
:func:`pack_keep_bits`); the product and the bit reads sit in a loop that is zero-trip on a tile
without masked rows.
``TILE_FLAGS`` alone (``LORA == 0``) skips a whole tile without masked rows (zero-trip main loop).

**Row-reduction GEMM** (:func:`_wgrad_kernel`): the weight gradient of ``C = A @ B[e].T``::

    dB[e, n, k] = sum_{r in group e} G[grow(r), n] * A[arow(r), k]      grow / arow: optional gathers
    dbias[e, n] = sum_{r in group e} G[grow(r), n]

one program per (expert, N-tile, K-tile) of dB, reducing over the group's rows in order; the bias
sum runs once per (expert, N-tile), after the main loop, in the programs of the first K-tile (a
zero-trip loop in the others), so the main loop holds nothing but loads and the MMA.  An empty group
writes zeros.

Every output element is written by exactly one program and every reduction runs in a fixed order
(no atomics), so results are bit-reproducible run to run.  Offsets that can pass 2**31 (a row or
column index times a stride) are formed in int64.
"""
import triton
import triton.language as tl
from triton.tools.ragged_tma import load_ragged

EPI_PLAIN, EPI_ACT, EPI_GATED, EPI_ACT_BWD, EPI_GATED_BWD, EPI_SCALED = 0, 1, 2, 3, 4, 5
ACT_SILU, ACT_GELU_TANH, ACT_GELU, ACT_RELU = 0, 1, 2, 3
LORA_NONE, LORA_PROLOGUE, LORA_DROPOUT = 0, 1, 2

_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_C = tl.constexpr(0.044715)
_SQRT_1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


# ------------------------------------------------------------------------------------- schedule

@triton.jit
def swizzle(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """(M-tile, N-tile) of linear tile id ``tile``: GROUP_M M-tiles are walked column by column, so
    neighbouring tiles share A rows and B columns in L2."""
    group_size = GROUP_M * num_n
    first_m = (tile // group_size) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % group_size) % group_rows
    pid_n = (tile % group_size) // group_rows
    return pid_m, pid_n


@triton.jit
def find_group_tile(offs_ptr, E, tile, BLOCK_M: tl.constexpr):
    """Group ``e``, first row and group end of M-tile ``tile`` (tiles numbered group after group,
    ``cdiv(count_e, BLOCK_M)`` each), and whether such a tile exists."""
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
def any_row_flag(flags_ptr, n_flags, row0, BLOCK_M: tl.constexpr, FLAG_ROWS: tl.constexpr):
    """True if any row of ``[row0, row0 + BLOCK_M)`` is flagged: ``flags[g]`` counts the flagged rows
    of rows ``[g * FLAG_ROWS, (g + 1) * FLAG_ROWS)`` (``row0`` is a multiple of FLAG_ROWS)."""
    offs = row0 // FLAG_ROWS + tl.arange(0, BLOCK_M // FLAG_ROWS)
    counts = tl.load(flags_ptr + offs, mask=offs < n_flags, other=0)
    return tl.sum(counts, axis=0) > 0


@triton.jit
def dropout_keep(seed, rows, col0, keep_threshold, COLS: tl.constexpr):
    """Keep-mask ``[len(rows), COLS]`` of the elements (rows, col0 + j) of a ``[M, K]`` matrix.

    The mask (the same in every kernel that draws it, and the contract of ``dropout_keep_mask``)::

        keep[m, k] = uniform(word k % 4 of Philox4x32-10(key=seed, counter=(k // 4, m_lo, m_hi, 0))) >= p

    ``m_lo`` / ``m_hi`` are the low and high 32-bit words of the row (rows may be int32 or int64) and
    ``uniform`` is Triton's ``uint_to_uniform_float``.  One Philox call gives four 32-bit words, the
    draws of four neighbouring columns; every (row, column group) has its own 128-bit counter, for any
    M and K < 2**34.  ``col0`` and COLS are multiples of 4.  ``keep_threshold`` is
    ``launch.dropout_threshold(p)`` (see :func:`_uniform_at_least`).
    """
    k0, k1, k2, k3 = _dropout_draws(seed, rows, col0, keep_threshold, COLS)
    return _interleave4(k0, k1, k2, k3)


KEEP_BITS = tl.constexpr(32)  # columns per int32 word of a packed keep-mask


@triton.jit
def pack_keep_bits(keep):
    """Pack a ``[R, C]`` keep-mask (C a multiple of 32) into ``[R, C // 32]`` int32 words: column
    ``32 w + j`` is bit ``j`` of word ``w``."""
    R: tl.constexpr = keep.shape[0]
    W: tl.constexpr = keep.shape[1] // KEEP_BITS
    bits = tl.reshape(keep.to(tl.uint32), (R, W, KEEP_BITS)) << tl.arange(0, KEEP_BITS).to(tl.uint32)[None, None, :]
    return tl.sum(bits, axis=2).to(tl.int32, bitcast=True)     # (distinct bits: the sum is their OR)


@triton.jit
def keep_bits_zero(x, words):
    """``x`` (``[R, C]``) with the elements whose bit in ``words`` (``[R, C // 32]``, packed by
    :func:`pack_keep_bits`) is 0 set to +0 (unscaled).  The bits become all-zero / all-one masks ANDed
    into x's bits: fewer instructions than a select on an i1 mask, and no arithmetic in bfloat16
    (which the CPU interpreter cannot do)."""
    keep = keep_bits_mask(words, x.shape[1])
    if tl.constexpr(x.dtype.primitive_bitwidth) == 16:
        return (x.to(tl.int16, bitcast=True) & -keep.to(tl.int16)).to(x.dtype, bitcast=True)
    else:
        return (x.to(tl.int32, bitcast=True) & -keep.to(tl.int32)).to(x.dtype, bitcast=True)


@triton.jit
def keep_bits_mask(words, COLS: tl.constexpr):
    """The bool ``[R, COLS]`` keep-mask packed in ``words`` (``[R, COLS // 32]``, :func:`pack_keep_bits`):
    each element tests its bit against a constant (no per-element shift)."""
    tl.static_assert(COLS % 32 == 0, "keep bits come in words of 32 columns: the block must be a multiple of 32")
    bit = tl.full((KEEP_BITS,), 1, tl.int32) << tl.arange(0, KEEP_BITS)
    return tl.reshape((words[:, :, None] & bit[None, None, :]) != 0, (words.shape[0], COLS))


@triton.jit
def _dropout_draws(seed, rows, col0, keep_threshold, COLS: tl.constexpr):
    """The keep decisions of columns ``col0 + 4 j + i`` (i = 0..3) as four ``[len(rows), COLS // 4]``
    tensors: word i of one Philox call per (row, column group), see :func:`dropout_keep`."""
    rows64 = rows.to(tl.int64)
    row_lo = rows64.to(tl.uint32)
    row_hi = (rows64 >> 32).to(tl.uint32)
    groups = (col0 // 4 + tl.arange(0, COLS // 4)).to(tl.uint32)
    c0, c1 = tl.broadcast(groups[None, :], row_lo[:, None])
    c2, _ = tl.broadcast(row_hi[:, None], c0)
    w0, w1, w2, w3 = philox4x32_10(seed, c0, c1, c2, c0 * 0)
    return (_uniform_at_least(w0, keep_threshold), _uniform_at_least(w1, keep_threshold),
            _uniform_at_least(w2, keep_threshold), _uniform_at_least(w3, keep_threshold))


@triton.jit
def _interleave4(v0, v1, v2, v3):
    """``[R, C]`` x 4 -> ``[R, 4 C]`` with ``out[:, 4 j + i] = v_i[:, j]``: join gives [r, j, a, b] =
    column 4 j + 2 a + b, from v_(2 a + b)."""
    return tl.reshape(tl.join(tl.join(v0, v2), tl.join(v1, v3)), (v0.shape[0], 4 * v0.shape[1]))


@triton.jit
def _uniform_at_least(word, keep_threshold):
    """``uint_to_uniform_float(word) >= p`` in integer compares.  That float is ``float32(x) *
    float32(4.6566127342e-10)`` for ``x = word`` read as int32, or ``~word`` where that is negative; it is
    monotone in x, so the rule is ``x >= T`` with ``T = keep_threshold = launch.dropout_threshold(p)``
    in ``[0, 2**31]``.  For the word as unsigned u that is ``T <= u`` (top bit clear: x = u) and
    ``u <= 2**32 - 1 - T`` (top bit set: x = 2**32 - 1 - u), two compares."""
    t = tl.cast(keep_threshold, tl.uint32)       # (a tensor even where the launch made it a constexpr)
    return (word >= t) & (word <= 0xFFFFFFFF - t)


@triton.jit
def philox4x32_10(seed, c0, c1, c2, c3):
    """Philox4x32-10 of the counter (c0, c1, c2, c3) (uint32 tensors) under the 64-bit key ``seed``:
    the same four words as ``tl.philox(seed, c0, c1, c2, c3)``, with each round's two 32x32-bit
    products formed as one 64-bit product (``mul.wide``: its high and low words in one instruction,
    where ``umulhi`` and ``mul`` take two)."""
    seed64 = seed.to(tl.uint64)
    k0 = (seed64 & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed64 >> 32).to(tl.uint32)
    for _ in tl.static_range(10):
        p0 = c2.to(tl.uint64) * 0xCD9E8D57          # PHILOX_ROUND_B
        p1 = c0.to(tl.uint64) * 0xD2511F53          # PHILOX_ROUND_A
        c0 = (p0 >> 32).to(tl.uint32) ^ c1 ^ k0
        c2 = (p1 >> 32).to(tl.uint32) ^ c3 ^ k1
        c1 = p0.to(tl.uint32)
        c3 = p1.to(tl.uint32)
        k0 = k0 + 0x9E3779B9                         # PHILOX_KEY_A
        k1 = k1 + 0xBB67AE85                         # PHILOX_KEY_B
    return c0, c1, c2, c3


# ------------------------------------------------------------------------------------- epilogues

@triton.jit
def _gelu_tanh_parts(z):
    """gelu_tanh(z) = z * sigmoid(2a), a = sqrt(2/pi) (z + 0.044715 z^3), and its derivative."""
    a = _SQRT_2_OVER_PI * (z + _GELU_C * z * z * z)
    s = tl.sigmoid(2.0 * a)                      # = (1 + tanh a) / 2
    t = 2.0 * s - 1.0                            # tanh a
    da = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * z * z)
    return z * s, s + 0.5 * z * (1.0 - t * t) * da


@triton.jit
def act_parts(z, ACT: tl.constexpr):
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


# ------------------------------------------------------------------------------------- operands

@triton.jit
def _load_b(b_desc, b_ptr, e, n0, k0, cols64, ks, k_ok, stride_be, stride_bn, stride_bk,
            B_TMA: tl.constexpr, B_KMAJOR: tl.constexpr, EVEN_K: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] operand tile ``B[e, n0:n0+BN, k0:k0+BK].T`` (as a view when K-major)."""
    if B_TMA:
        if B_KMAJOR:
            return b_desc.load([e, n0, k0]).reshape(BLOCK_N, BLOCK_K).T
        else:
            return b_desc.load([e, k0, n0]).reshape(BLOCK_K, BLOCK_N)
    else:
        # cols64 holds wrapped column indices (always in bounds; the extra columns are never stored)
        ptrs = b_ptr + e.to(tl.int64) * stride_be + cols64[None, :] * stride_bn + ks.to(tl.int64)[:, None] * stride_bk
        if EVEN_K:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=k_ok[:, None], other=0.0)


@triton.jit
def _gemm_kernel(
    # operands
    a_ptr, a_desc, a_idx_ptr, b_ptr, b_desc, bias_ptr,
    # outputs and epilogue inputs
    c_ptr, c_desc, z_ptr, c_idx_ptr, y_ptr, w_ptr,
    # grouping and the LoRA term
    offs_ptr, l_ptr, lb_ptr, row_mask_ptr, flags_ptr, keep_bits_ptr,
    # sizes
    M, N, K, E, R, n_flags, half_n,
    # strides
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_biase, stride_biasn,
    stride_cm, stride_cn, stride_zm, stride_zn, stride_ym, stride_yn,
    stride_lm, stride_lr, stride_lbn, stride_lbr, stride_keep,
    # scalars
    lora_scale, out_scale, keep_scale,
    # what to compute
    GROUPED: tl.constexpr, A_GATHER: tl.constexpr, A_DIV: tl.constexpr, A_TMA: tl.constexpr,
    B_TMA: tl.constexpr, B_KMAJOR: tl.constexpr, EVEN_K: tl.constexpr,
    LORA: tl.constexpr, LB_KMAJOR: tl.constexpr, LORA_SCALE: tl.constexpr, TILE_FLAGS: tl.constexpr,
    FLAG_ROWS: tl.constexpr,
    EPILOGUE: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, SCATTER_C: tl.constexpr,
    WEIGHTED_Y: tl.constexpr, C_TMA: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPI_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Persistent row GEMM (see the module docstring).  ``M`` is the row count (the allocated rows of
    a grouped launch).  Grid: ``min(#tiles, resident CTAs)`` programs, each walking tiles
    ``program_id, program_id + num_programs, ...``.  For the gated epilogues N is half the width of
    B / Z (``half_n``)."""
    num_n = tl.cdiv(N, BLOCK_N)
    if GROUPED:
        num_m = tl.cdiv(M, BLOCK_M) + E               # an upper bound on sum_e cdiv(count_e, BLOCK_M)
    else:
        num_m = tl.cdiv(M, BLOCK_M)
    num_tiles = num_m * num_n
    ks0 = tl.arange(0, BLOCK_K)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        pid_m, pid_n = swizzle(tile, num_m, num_n, GROUP_M)
        if GROUPED:
            e, row0, row_end, found = find_group_tile(offs_ptr, E, pid_m, BLOCK_M)
            row_end = tl.where(found, row_end, row0)  # a slot past the last tile: no rows, no K steps
            k_end = tl.where(found, K, 0)
        else:
            e = pid_m * 0
            row0 = pid_m * BLOCK_M
            row_end = M
            k_end = K
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        n0 = pid_n * BLOCK_N
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        cols64 = cols.to(tl.int64)
        if TILE_FLAGS:
            flagged = any_row_flag(flags_ptr, n_flags, row0, BLOCK_M, FLAG_ROWS)
            if LORA == 0:
                k_end = tl.where(flagged, k_end, 0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if EPILOGUE == 2:
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

        # LoRA prologue: zero-trip unless the tile has a masked row
        if LORA == 1:
            lmask = (tl.load(row_mask_ptr + rows, mask=row_ok, other=0) != 0) & row_ok
            acc = _lora_product(acc, l_ptr, lb_ptr, rows, lmask, cols64, col_ok, ks0, tl.where(flagged, R, 0), R,
                                stride_lm, stride_lr, stride_lbn, stride_lbr, LB_KMAJOR, BLOCK_K, DOT_PRECISION)
            if LORA_SCALE:  # (a tile without masked rows keeps its exact zeros)
                acc = tl.where(flagged, acc * lora_scale, acc)
        if LORA == 2:
            # with dropout each element of the term is multiplied by its keep-mask element (read from the
            # packed keep bits the forward drew); all of it sits in a loop that is zero-trip on a tile
            # without masked rows, not under an ``if`` (C7515)
            lmask = (tl.load(row_mask_ptr + rows, mask=row_ok, other=0) != 0) & row_ok
            for _ in range(0, tl.where(flagged, 1, 0)):
                acc = _lora_product(acc, l_ptr, lb_ptr, rows, lmask, cols64, col_ok, ks0, R, R,
                                    stride_lm, stride_lr, stride_lbn, stride_lbr, LB_KMAJOR, BLOCK_K, DOT_PRECISION)
                words = n0 // KEEP_BITS + tl.arange(0, BLOCK_N // KEEP_BITS)
                keep_words = tl.load(keep_bits_ptr + rows.to(tl.int64)[:, None] * stride_keep + words[None, :],
                                     mask=lmask[:, None] & (words < stride_keep)[None, :], other=0)
                keep = keep_bits_mask(keep_words, BLOCK_N)
                acc = tl.where(keep, acc * keep_scale, 0.0)

        # main loop
        # Pointer-path row and column indices that are always in bounds, so the loads of the main loop
        # need no row or column mask: rows past the group read a valid row and columns past N wrap
        # (both only feed output elements that are never stored).
        if A_GATHER:
            arow = (tl.load(a_idx_ptr + rows, mask=row_ok, other=0) // A_DIV).to(tl.int64)
        else:
            arow = tl.where(row_ok, rows, row0).to(tl.int64)
        bcols64 = tl.max_contiguous(tl.multiple_of(cols % N, BLOCK_N), BLOCK_N).to(tl.int64)
        for k0 in range(0, k_end, BLOCK_K):
            ks = k0 + ks0
            k_ok = ks < K
            if A_TMA:
                a = a_desc.load([row0, k0])
            else:
                a_ptrs = a_ptr + arow[:, None] * stride_am + ks.to(tl.int64)[None, :] * stride_ak
                if EVEN_K:
                    a = tl.load(a_ptrs)               # rows past the group read valid rows (never stored)
                else:
                    a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = _load_b(b_desc, b_ptr, e, n0, k0, bcols64, ks, k_ok, stride_be, stride_bn, stride_bk,
                        B_TMA, B_KMAJOR, EVEN_K, BLOCK_N, BLOCK_K)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            if EPILOGUE == 2:
                b_up = _load_b(b_desc, b_ptr, e, n0 + half_n, k0, bcols64 + half_n, ks, k_ok,
                               stride_be, stride_bn, stride_bk, B_TMA, B_KMAJOR, EVEN_K, BLOCK_N, BLOCK_K)
                acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)

        # epilogue
        if HAS_BIAS:
            bias_base = bias_ptr + e.to(tl.int64) * stride_biase
            acc += tl.load(bias_base + cols64 * stride_biasn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if EPILOGUE == 2:
                acc_up += tl.load(bias_base + (cols64 + half_n) * stride_biasn, mask=col_ok,
                                  other=0.0).to(tl.float32)[None, :]
        if EPILOGUE == 5:
            acc = acc * out_scale
        if C_TMA:
            c_desc.store([row0, n0], acc.to(c_desc.dtype))
        else:
            if SCATTER_C:
                crow = tl.load(c_idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
            else:
                crow = rows.to(tl.int64)
            if EPILOGUE != 2:
                acc_up = acc
            if EPI_SPLIT == 1:
                _store_tile(acc, acc_up, rows, crow, row_ok, cols, N, half_n, c_ptr, z_ptr, y_ptr, w_ptr,
                            stride_cm, stride_cn, stride_zm, stride_zn, stride_ym, stride_yn,
                            EPILOGUE, ACT, WEIGHTED_Y)
            else:  # column halves (EPI_SPLIT 2) or quarters (4), one after the other: fewer live registers
                acc0, acc1 = _halves(acc, BLOCK_M, BLOCK_N)
                up0, up1 = _halves(acc_up, BLOCK_M, BLOCK_N)
                if EPI_SPLIT == 2:
                    cols_h = n0 + tl.arange(0, BLOCK_N // 2)
                    _store_tile(acc0, up0, rows, crow, row_ok, cols_h, N, half_n, c_ptr, z_ptr, y_ptr, w_ptr,
                                stride_cm, stride_cn, stride_zm, stride_zn, stride_ym, stride_yn,
                                EPILOGUE, ACT, WEIGHTED_Y)
                    _store_tile(acc1, up1, rows, crow, row_ok, cols_h + BLOCK_N // 2, N, half_n, c_ptr, z_ptr,
                                y_ptr, w_ptr, stride_cm, stride_cn, stride_zm, stride_zn, stride_ym, stride_yn,
                                EPILOGUE, ACT, WEIGHTED_Y)
                else:
                    q0, q1 = _halves(acc0, BLOCK_M, BLOCK_N // 2)
                    q2, q3 = _halves(acc1, BLOCK_M, BLOCK_N // 2)
                    v0, v1 = _halves(up0, BLOCK_M, BLOCK_N // 2)
                    v2, v3 = _halves(up1, BLOCK_M, BLOCK_N // 2)
                    cols_q = n0 + tl.arange(0, BLOCK_N // 4)
                    _store_tile(q0, v0, rows, crow, row_ok, cols_q, N, half_n, c_ptr, z_ptr, y_ptr, w_ptr,
                                stride_cm, stride_cn, stride_zm, stride_zn, stride_ym, stride_yn,
                                EPILOGUE, ACT, WEIGHTED_Y)
                    _store_tile(q1, v1, rows, crow, row_ok, cols_q + BLOCK_N // 4, N, half_n, c_ptr, z_ptr,
                                y_ptr, w_ptr, stride_cm, stride_cn, stride_zm, stride_zn, stride_ym, stride_yn,
                                EPILOGUE, ACT, WEIGHTED_Y)
                    _store_tile(q2, v2, rows, crow, row_ok, cols_q + BLOCK_N // 2, N, half_n, c_ptr, z_ptr,
                                y_ptr, w_ptr, stride_cm, stride_cn, stride_zm, stride_zn, stride_ym, stride_yn,
                                EPILOGUE, ACT, WEIGHTED_Y)
                    _store_tile(q3, v3, rows, crow, row_ok, cols_q + 3 * (BLOCK_N // 4), N, half_n, c_ptr,
                                z_ptr, y_ptr, w_ptr, stride_cm, stride_cn, stride_zm, stride_zn, stride_ym,
                                stride_yn, EPILOGUE, ACT, WEIGHTED_Y)


@triton.jit
def _lora_product(acc, l_ptr, lb_ptr, rows, lmask, cols64, col_ok, ks0, r_end, R,
                  stride_lm, stride_lr, stride_lbn, stride_lbr,
                  LB_KMAJOR: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``acc + L[rows] @ LB.T`` over ``r < r_end`` (rows of L outside ``lmask`` read as 0)."""
    for r0 in range(0, r_end, BLOCK_K):
        rs = r0 + ks0
        r_ok = rs < R
        lt = tl.load(l_ptr + rows[:, None].to(tl.int64) * stride_lm + rs[None, :] * stride_lr,
                     mask=lmask[:, None] & r_ok[None, :], other=0.0)
        if LB_KMAJOR:
            lb = tl.load(lb_ptr + cols64[None, :] * stride_lbn + rs[:, None].to(tl.int64) * stride_lbr,
                         mask=col_ok[None, :] & r_ok[:, None], other=0.0)
        else:
            lb = tl.load(lb_ptr + rs[:, None].to(tl.int64) * stride_lbr + cols64[None, :] * stride_lbn,
                         mask=col_ok[None, :] & r_ok[:, None], other=0.0)
        acc = tl.dot(lt, lb, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _halves(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The left and right column halves of a [ROWS, COLS] tile."""
    return tl.split(tl.permute(tl.reshape(x, (ROWS, 2, COLS // 2)), (0, 2, 1)))


@triton.jit
def _store_tile(acc, acc_up, rows, crow, row_ok, cols, N, half_n, c_ptr, z_ptr, y_ptr, w_ptr,
                stride_cm, stride_cn, stride_zm, stride_zn, stride_ym, stride_yn,
                EPILOGUE: tl.constexpr, ACT: tl.constexpr, WEIGHTED_Y: tl.constexpr):
    """The pointer-path epilogue (see the module docstring) of the output columns ``cols``."""
    col_ok = cols < N
    cols64 = cols.to(tl.int64)
    out_mask = row_ok[:, None] & col_ok[None, :]
    c_ptrs = c_ptr + crow[:, None] * stride_cm + cols64[None, :] * stride_cn
    z_ptrs = z_ptr + rows[:, None].to(tl.int64) * stride_zm + cols64[None, :] * stride_zn
    if EPILOGUE == 0 or EPILOGUE == 5:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=out_mask)
        if WEIGHTED_Y:  # k = 1: slot == row, so the weighted combine is one store per row
            w = tl.load(w_ptr + crow, mask=row_ok, other=0.0)
            tl.store(y_ptr + crow[:, None] * stride_ym + cols64[None, :] * stride_yn,
                     (acc * w[:, None]).to(y_ptr.dtype.element_ty), mask=out_mask)
    elif EPILOGUE == 1:
        z = acc.to(z_ptr.dtype.element_ty)
        tl.store(z_ptrs, z, mask=out_mask)
        h, _ = act_parts(z.to(tl.float32), ACT)
        tl.store(c_ptrs, h.to(c_ptr.dtype.element_ty), mask=out_mask)
    elif EPILOGUE == 2:
        g = acc.to(z_ptr.dtype.element_ty)
        u = acc_up.to(z_ptr.dtype.element_ty)
        tl.store(z_ptrs, g, mask=out_mask)
        tl.store(z_ptrs + half_n * stride_zn, u, mask=out_mask)
        act_g, _ = act_parts(g.to(tl.float32), ACT)
        tl.store(c_ptrs, (act_g * u.to(tl.float32)).to(c_ptr.dtype.element_ty), mask=out_mask)
    elif EPILOGUE == 3:
        z = tl.load(z_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        _, dact = act_parts(z, ACT)
        tl.store(c_ptrs, (acc * dact).to(c_ptr.dtype.element_ty), mask=out_mask)
    else:
        g = tl.load(z_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        u = tl.load(z_ptrs + half_n * stride_zn, mask=out_mask, other=0.0).to(tl.float32)
        act_g, dact_g = act_parts(g, ACT)
        tl.store(c_ptrs, (acc * u * dact_g).to(c_ptr.dtype.element_ty), mask=out_mask)
        tl.store(c_ptrs + half_n * stride_cn, (acc * act_g).to(c_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _wgrad_kernel(
    g_ptr, g_desc, a_ptr, a_desc, db_ptr, dbias_ptr, a_idx_ptr, offs_ptr,
    N, K, num_k,
    stride_gm, stride_gn, stride_am, stride_ak, stride_dbe, stride_dbn, stride_dbk,
    stride_dbiase, stride_dbiasn,
    HAS_DB: tl.constexpr, HAS_DBIAS: tl.constexpr, G_TMA: tl.constexpr, A_TMA: tl.constexpr,
    A_GATHER: tl.constexpr, A_DIV: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Per-group weight (and bias) gradient, reduced over the group's rows in order.

    Grid: ``E * cdiv(N, BLOCK_N) * num_k`` (``num_k = cdiv(K, BLOCK_K)``, 1 when only dbias is wanted);
    program p owns group ``p // (n_tiles * num_k)`` and one ``[BLOCK_N, BLOCK_K]`` tile of dB.
    Rows past the group's end read as zeros in both operands (they belong to the next group: a NaN
    there must not reach this one): through a ragged TMA descriptor bounded to the group's rows
    (``G_TMA`` / ``A_TMA``), or a row mask on the pointer path.
    """
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    e = pid // (num_n * num_k)
    rest = pid % (num_n * num_k)
    pid_n = rest // num_k
    pid_k = rest % num_k
    lo = tl.load(offs_ptr + e)
    count = tl.load(offs_ptr + e + 1) - lo
    n0 = pid_n * BLOCK_N
    k0 = pid_k * BLOCK_K
    cols_n = n0 + tl.arange(0, BLOCK_N)
    cols_k = k0 + tl.arange(0, BLOCK_K)
    n_ok = cols_n < N
    k_ok = cols_k < K
    # wrapped column indices: pointer loads need no column mask (the extra columns are never stored)
    n64 = tl.max_contiguous(tl.multiple_of(cols_n % N, BLOCK_N), BLOCK_N).to(tl.int64)
    k64 = tl.max_contiguous(tl.multiple_of(cols_k % K, BLOCK_K), BLOCK_K).to(tl.int64)
    ms = tl.arange(0, BLOCK_M)
    e64 = e.to(tl.int64)
    g_ptrs = g_ptr + (lo + ms).to(tl.int64)[None, :] * stride_gm + n64[:, None] * stride_gn
    g_step = tl.cast(stride_gm, tl.int64) * BLOCK_M
    if HAS_DB:
        a_ptrs = a_ptr + (lo + ms).to(tl.int64)[:, None] * stride_am + k64[None, :] * stride_ak
        a_step = tl.cast(stride_am, tl.int64) * BLOCK_M
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for r0 in range(0, count, BLOCK_M):
            row_ok = ms < count - r0
            if G_TMA:
                g_t = load_ragged(g_desc, lo, count, [r0, n0]).T
            else:
                g_t = tl.load(g_ptrs, mask=row_ok[None, :], other=0.0)
                g_ptrs += g_step
            if A_GATHER:
                arow = (tl.load(a_idx_ptr + lo + r0 + ms, mask=row_ok, other=0) // A_DIV).to(tl.int64)
                a = tl.load(a_ptr + arow[:, None] * stride_am + k64[None, :] * stride_ak,
                            mask=row_ok[:, None], other=0.0)
            elif A_TMA:
                a = load_ragged(a_desc, lo, count, [r0, k0])
            else:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                a_ptrs += a_step
            acc = tl.dot(g_t, a, acc, input_precision=DOT_PRECISION)
        tl.store(db_ptr + e64 * stride_dbe + cols_n.to(tl.int64)[:, None] * stride_dbn
                 + cols_k.to(tl.int64)[None, :] * stride_dbk,
                 acc.to(db_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])
    if HAS_DBIAS:
        # once per (group, N-tile): the first K-tile's programs; a zero-trip loop in the others
        g_ptrs = g_ptr + (lo + ms).to(tl.int64)[None, :] * stride_gm + n64[:, None] * stride_gn
        bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for r0 in range(0, tl.where(pid_k == 0, count, 0), BLOCK_M):
            g_t = tl.load(g_ptrs, mask=(ms < count - r0)[None, :], other=0.0)
            g_ptrs += g_step
            bias_acc += tl.sum(g_t.to(tl.float32), axis=1)
        tl.store(dbias_ptr + e64 * stride_dbiase + cols_n.to(tl.int64) * stride_dbiasn,
                 bias_acc.to(dbias_ptr.dtype.element_ty), mask=n_ok & (pid_k == 0))
