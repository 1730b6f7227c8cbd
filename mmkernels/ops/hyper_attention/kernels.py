"""Triton kernels for Hyper Attention (mPLUG-Owl3 gated / joint cross-attention with MI-RoPE).

Layouts (strides passed explicitly, so permuted views need no copy):
``q [B, L_q, H, D]``, ``k, v [B, L_k, H_kv, D]``, the visual keys/values flattened over images
``kv, vv [N*T, H_kv, D]`` (row ``n*T + s`` = token ``s`` of image ``n``), ``pos [N]`` (the
``<|image|>`` sequence index of each image), ``cu [B+1]`` (images of sample b are
``cu[b]:cu[b+1]``), ``gate`` expanded to ``[B, L_q, H, D]`` (zero strides on broadcast dims),
``kpm [B, L_k]`` (uint8 key padding mask, 1 = keep), ``lse [S, B, H, L_q]`` float32, natural log
(S = 2 rows text/visual in gated mode, 1 in joint mode).

Packed samples (``VARLEN``, flash-attn's ``cu_seqlens`` convention): the per-row and per-key tensors
are ``[1, total, ...]`` views of the packed ``[total, ...]`` ones (``lse [S, 1, H, total_q]``); sample
b's queries are rows ``cu_q[b]:cu_q[b+1]``, its keys rows ``cu_k[b]:cu_k[b+1]``, and ``L_q``, ``L_k``
are the sample's own lengths (the launch passes the largest, which size the grid).  Every kernel
below computes in a sample's own coordinates; only the offset of its first row differs
(:func:`_sample_offset`), so a packed sample runs exactly the tiles and arithmetic of the same sample
in a ``[1, L, ...]`` batch.

Query row ``i`` is at absolute position ``t = L_k - L_q + i`` (the queries are the last rows of
the keys).  Both key sets are masked by one rule, "key ``j`` is visible from row r iff
``j < lim[r]``", with

* text keys: ``lim = t + 1`` (causal), plus the key padding mask;
* visual keys of the sample, flattened from ``cu[b]*T``: ``lim = (cu[b] + c(t)) * T`` where
  ``c(t)`` = number of the sample's images with ``pos < t`` (strict) / ``pos <= t`` (inclusive).
  Positions increase within a sample, so the visible images are always a prefix, never expanded
  into a dense mask: the prefill kernels read each row's limit from the block classification's
  layout (section "block classification" below), the decode kernels count the images.

Tiles that every row of the block sees run without any mask; tiles beyond the block's last
visible key are never visited (a block of rows before the first image does no visual work).
GQA: query head ``h`` reads K/V head ``h // G``; the repeat is never materialised.

Offsets: sample, row and head indices are widened to int64 before they multiply a stride, since a
view's strides can make those products pass 2^31 elements (e.g. ``h * stride_qh`` of a head-major
``q``); only the products with the unit-sized ``stride_*d`` (below ``D * stride_d``) stay int32.

Online softmax in base 2 (``qk_scale = scale * log2(e)``), fp32 statistics and accumulators.  A
row whose running max is still -inf (no visible key yet) uses 0 as the exponent base, so masked
entries give exp2(-inf) = 0 and never NaN.
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# rows of slack after each head's packed backward statistics (>= the largest BLOCK_M_KV, checked by the
# launcher): the masked dK/dV loop reads a sample's last row tile unmasked (see ``_dkv_row_tiles``)
PACKED_STATS_PAD = 128
LN2 = 0.6931471805599453
# the same constants as kernel-side constexprs (a plain global float cannot be read inside a kernel)
_LOG2E_K = tl.constexpr(LOG2E)
_LN2_K = tl.constexpr(LN2)


@triton.jit
def _attend_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                  lo, hi, lim, kpm_base, stride_kpn, qk_scale, offs_d,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_KPM: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """Online-softmax update of ``(acc, m_i, l_i)`` with keys ``[lo, hi)`` in BLOCK_N tiles.

    ``MASKED=False``: every row sees every key of every tile (only the padding mask, if any).
    ``MASKED=True``: key j visible from row r iff ``j < lim[r]`` (and ``j < hi`` for the loads).
    """
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n64 = offs_n.to(tl.int64)
        if MASKED:
            n_ok = offs_n < hi
            k = tl.load(k_base + n64[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                        mask=n_ok[None, :], other=0.0)
            v = tl.load(v_base + n64[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=n_ok[:, None], other=0.0)
        else:
            k = tl.load(k_base + n64[None, :] * stride_kn + offs_d[:, None] * stride_kd)
            v = tl.load(v_base + n64[:, None] * stride_vn + offs_d[None, :] * stride_vd)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            # offs_n < lim, compared as (tile column) < (lim - start): the column index is a constant
            # of the loop, so the compiler does not rebuild a per-column vector each tile
            visible = tl.arange(0, BLOCK_N)[None, :] < (lim - start)[:, None]
            if HAS_KPM:
                keep = tl.load(kpm_base + n64 * stride_kpn, mask=n_ok, other=0) != 0
                visible = visible & keep[None, :]
            qk = tl.where(visible, qk, float("-inf"))
        elif HAS_KPM:
            keep = tl.load(kpm_base + n64 * stride_kpn) != 0
            qk = tl.where(keep[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_base[:, None])
        alpha = tl.math.exp2(m_i - m_base)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


# =========================================================================== block classification
#
# The hyper mask of sample b, for query row i at position t = L_k - L_q + i:
#
#   text key s:    visible iff s <= t (and key_padding_mask[b, s]);
#   visual key j:  (row j of k_vis flattened over images) visible iff cu[b]*T <= j < row_img_end[b, i] * T,
#                  row_img_end = cu[b] + the number of the sample's images at pos < t (strict) / pos <= t.
#
# Both limits grow with t (image positions increase within a sample), and the rows that see a key j
# form one suffix [first_row(j), L_q): first_row = j - (L_k - L_q) for a text key, the image's first
# seeing row for a visual key.  So for a block of rows [r0, r1) and a block of keys [k0, k1):
#
#   full     iff k1 <= limit(r0)       (every row sees every key)     -> unmasked loop
#   empty    iff k0 >= limit(r1 - 1)   (no row sees any key)          -> never visited
#   partial  otherwise                                                -> masked loop
#
# and, seen from the keys, the row blocks of a key block are empty below first_row(k0), full from
# first_row(k1 - 1) on and partial in between.  The key padding mask is handled apart from the
# classes: a column mask in both loops of the row-block programs (compiled in only when a mask is
# given) and, in the key-block programs, a zeroed gradient for the padded keys at the store.
#
# The *layout* (int32 ``[n_layout_rows + 2*N]``, written once per forward by ``_hyper_layout_kernel``
# and kept for the backward) holds the two numbers these rules need, so every kernel classifies its
# blocks with O(1) loads instead of scanning the image list:
#
#   layout[_layout_row0(b, ...) + i]  = row_img_end of query row i of sample b;
#   layout[n_layout_rows + n]         = first query row of its sample that sees image n (in [0, L_q]);
#   layout[n_layout_rows + N + n]     = the sample of image n
#
# (``n_layout_rows`` = the number of query rows, ``B * L_q``, or ``total_q`` packed).  Packed samples
# keep their rows in their own coordinates: the same numbers as each sample alone, so the classes
# are per sample.
#
# ``_layout_row0``, ``_sample_offset``, ``_stats_offset``, ``_packed_sample`` and the program mappings (``_row_program``,
# ``_dkv_program``, ``_dq_program``) are the only places that turn a sample index into row numbers.

@triton.jit
def _layout_row0(b, Lq, q0, VARLEN: tl.constexpr):
    """Index of sample b's query row 0 in the layout's per-row part: ``b * L_q`` (samples of ``L_q``
    rows), or its first packed row ``q0``."""
    if VARLEN:
        return q0
    else:
        return b.to(tl.int64) * Lq


@triton.jit
def _sample_offset(b64, row0, stride_b, stride_m, VARLEN: tl.constexpr):
    """Element offset of sample b's first row in a per-row (or per-key) tensor: ``b * stride_b`` in a
    ``[B, L, ...]`` batch, ``row0 * stride_m`` in a packed one (``row0``: the sample's first packed row)."""
    if VARLEN:
        return row0.to(tl.int64) * stride_m
    else:
        return b64 * stride_b


@triton.jit
def _stats_offset(b64, q0, stride_sb, VARLEN: tl.constexpr):
    """Element offset of sample b's first row in the backward's row statistics: ``b * stride_sb`` in a
    ``[B, L]`` batch; packed, ``16 * (cdiv(q0, 16) + b)`` (:func:`launch.packed_stats_len`): each
    sample starts 64-byte aligned, so the dK/dV loops load its lse and delta as vectors.  Every head's
    rows end with ``PACKED_STATS_PAD`` more, so the masked dK/dV loop may read a last row tile of
    any sample unmasked."""
    if VARLEN:
        return ((q0 + 15) // 16 + b64) * 16
    else:
        return b64 * stride_sb


@triton.jit
def _packed_sample(cu_q_ptr, cu_k_ptr, b):
    """Packed sample b: ``(q0, k0, L_q, L_k)``, its first query and key rows and its lengths (from the
    ``cu_seqlens`` offsets)."""
    q0 = tl.load(cu_q_ptr + b).to(tl.int32)
    k0 = tl.load(cu_k_ptr + b).to(tl.int32)
    return q0, k0, tl.load(cu_q_ptr + b + 1).to(tl.int32) - q0, tl.load(cu_k_ptr + b + 1).to(tl.int32) - k0


@triton.jit
def _hyper_layout_kernel(
    pos_ptr, cu_ptr, cu_q_ptr, cu_k_ptr, layout_ptr,
    B, Lq, Lk, N, n_layout_rows, n_row_programs,
    INCLUSIVE: tl.constexpr, VARLEN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """The layout (see above).  Grid ``(n_row_programs + cdiv(N, BLOCK_I),)``: programs below
    ``n_row_programs = B * cdiv(L_q, BLOCK_R)`` count the visible images of BLOCK_R rows of one sample
    (BLOCK_I positions compared at a time); the others find, for BLOCK_I images, their sample and
    their first seeing row.  ``VARLEN``: packed samples, ``L_q`` the longest one's (their rows past
    a shorter sample's end store nothing)."""
    pid = tl.program_id(0)
    shift = Lk - Lq
    if pid < n_row_programs:
        n_rb = tl.cdiv(Lq, BLOCK_R)
        b = pid // n_rb
        rows = (pid % n_rb) * BLOCK_R + tl.arange(0, BLOCK_R)
        if VARLEN:
            q0, _, n_rows, n_keys = _packed_sample(cu_q_ptr, cu_k_ptr, b)
            t = rows + (n_keys - n_rows)
        else:
            q0 = 0
            n_rows = Lq
            t = rows + shift
        img_lo = tl.load(cu_ptr + b).to(tl.int32)
        img_hi = tl.load(cu_ptr + b + 1).to(tl.int32)
        cnt = tl.zeros((BLOCK_R,), dtype=tl.int32)
        for n0 in range(img_lo, img_hi, BLOCK_I):
            n = n0 + tl.arange(0, BLOCK_I)
            p = tl.load(pos_ptr + n, mask=n < img_hi, other=2147483647 // 2).to(tl.int32)
            if INCLUSIVE:
                sees = p[None, :] <= t[:, None]
            else:
                sees = p[None, :] < t[:, None]
            cnt += tl.sum(sees.to(tl.int32), axis=1)
        tl.store(layout_ptr + _layout_row0(b, Lq, q0, VARLEN) + rows, img_lo + cnt, mask=rows < n_rows)
    else:
        n = (pid - n_row_programs) * BLOCK_I + tl.arange(0, BLOCK_I)
        n_ok = n < N
        p = tl.load(pos_ptr + n, mask=n_ok, other=0).to(tl.int32)
        sample = tl.zeros((BLOCK_I,), dtype=tl.int32)
        for i0 in range(0, B, BLOCK_I):   # sample of image n = number of samples ending at or before n
            i = i0 + tl.arange(0, BLOCK_I)
            ends = tl.load(cu_ptr + 1 + i, mask=i < B, other=2147483647).to(tl.int32)
            sample += tl.sum((ends[None, :] <= n[:, None]).to(tl.int32), axis=1)
        if VARLEN:   # the image's own sample's lengths
            img_q0 = tl.load(cu_q_ptr + sample, mask=n_ok, other=0).to(tl.int32)
            img_k0 = tl.load(cu_k_ptr + sample, mask=n_ok, other=0).to(tl.int32)
            img_rows = tl.load(cu_q_ptr + sample + 1, mask=n_ok, other=0).to(tl.int32) - img_q0
            img_shift = tl.load(cu_k_ptr + sample + 1, mask=n_ok, other=0).to(tl.int32) - img_k0 - img_rows
        else:
            img_rows = Lq
            img_shift = shift
        if INCLUSIVE:
            first = p - img_shift
        else:
            first = p + 1 - img_shift
        first = tl.minimum(tl.maximum(first, 0), img_rows)
        tl.store(layout_ptr + n_layout_rows + n, first, mask=n_ok)
        tl.store(layout_ptr + n_layout_rows + N + n, sample, mask=n_ok)


@triton.jit
def _row_block_key_tiles(layout_ptr, cu_ptr, b, layout_row0, Lq, Lk, row0, row_end, T, BLOCK_N: tl.constexpr):
    """Key tiles (BLOCK_N keys each) of the query rows ``[row0, row_end)`` (``row_end > row0``, all
    < L_q) of sample b (its row 0 at ``layout_row0`` in the layout), as ``(v_lo, v_mid, v_hi, t_mid, t_hi)``:

    * visual: tiles from ``v_lo`` (the sample's first visual key) up to ``v_mid`` are full, those
      from ``v_mid`` to ``v_hi`` partial; the rows' limits grow with the row, so the first row's
      limit bounds the full tiles and the last row's everything;
    * text: tiles from 0 up to ``t_mid`` (keys up to the first row's position) are full, those from
      ``t_mid`` to ``t_hi`` (one past the last row's position) partial;
    * every other tile is empty.
    """
    shift = Lk - Lq
    v_lo = tl.load(cu_ptr + b).to(tl.int32) * T
    v_full = tl.load(layout_ptr + layout_row0 + row0) * T
    v_hi = tl.load(layout_ptr + layout_row0 + (row_end - 1)) * T
    v_mid = v_lo + ((v_full - v_lo) // BLOCK_N) * BLOCK_N
    t_mid = ((row0 + shift + 1) // BLOCK_N) * BLOCK_N
    return v_lo, v_mid, v_hi, t_mid, row_end + shift


@triton.jit
def _key_block_row_tiles(row_lo, row_full, Lq, BLOCK_M: tl.constexpr):
    """Row tiles (BLOCK_M rows each, from row 0) of a key block whose keys some row from ``row_lo``
    on sees and every row from ``row_full`` on sees, as ``(r_lo, r_full, r_down, r_tail, r_up)``:
    tiles from ``r_lo`` to ``r_full`` are partial, from ``r_full`` to ``r_down`` full, from
    ``r_tail`` to ``r_up`` partial again (the short last tile, when L_q is not a multiple of
    BLOCK_M); every other tile is empty."""
    r_up = tl.cdiv(Lq, BLOCK_M) * BLOCK_M
    r_down = (Lq // BLOCK_M) * BLOCK_M
    r_lo = tl.where(row_lo >= Lq, r_up, (row_lo // BLOCK_M) * BLOCK_M)
    r_full = tl.minimum(tl.maximum(tl.cdiv(row_full, BLOCK_M) * BLOCK_M, r_lo), r_up)
    return r_lo, r_full, r_down, tl.maximum(r_full, r_down), r_up


@triton.jit
def _text_key_block_rows(key0, n_keys, shift):
    """Rows that see text keys ``[key0, key0 + n_keys)`` (row r sees key j iff ``j <= r + shift``):
    ``(row_lo, row_full)``, the first row that sees some and the first that sees all of them."""
    return tl.maximum(key0 - shift, 0), tl.maximum(key0 + n_keys - 1 - shift, 0)


@triton.jit
def _row_program(pid_m, pid_bh, n_row_blocks, H):
    """Row-block program (forward, backward preprocessing): grid ``(cdiv(L_q, BLOCK_M), B * H)``;
    the later row blocks see more keys, so they are launched first.  Returns ``(row block, b, h)``."""
    return n_row_blocks - 1 - pid_m, pid_bh // H, (pid_bh % H).to(tl.int64)


@triton.jit
def _hyper_fwd_kernel(
    q_ptr, k_ptr, v_ptr, kv_ptr, vv_ptr, cu_ptr, cu_q_ptr, cu_k_ptr, layout_ptr, gate_ptr, kpm_ptr,
    out_ptr, ot_ptr, ov_ptr, lse_ptr,
    Lq, Lk, H, G, T,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_kvn, stride_kvh, stride_kvd,
    stride_vvn, stride_vvh, stride_vvd,
    stride_gb, stride_gm, stride_gh, stride_gd,
    stride_kpb, stride_kpn,
    stride_ob, stride_om, stride_oh,
    stride_ls, stride_lb, stride_lh,
    qk_scale,
    GATED: tl.constexpr, HAS_KPM: tl.constexpr, SAVE_PARTS: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fused forward, both modes.

    Grid ``(cdiv(L_q, BLOCK_M), B * H)`` (:func:`_row_program`): a program owns query rows
    ``[i*BM, (i+1)*BM)`` of sample b, head h.  It walks the sample's visual keys (full tiles without a
    mask, then the partial ones; the layout gives both ranges), then its causal text keys (full, then
    the diagonal):

    * gated (v1): two online-softmax states, one after the other.  The visual part is normalised,
      rounded to the output dtype and written out (to ``ov``: the saved part, or the output itself as
      scratch) before the text loop, so no visual state is held in registers meanwhile; the epilogue
      reads it back and writes ``out = o_t`` if the row sees no image, else
      ``(1 - sigmoid(g)) * o_t + sigmoid(g) * o_v``.  The text state is computed exactly as for plain
      causal attention, so rows before the first image are bit-identical to it;
    * joint (v2): one state carried from the visual tiles into the text tiles (= one softmax over
      the concatenated keys, the reference's ``cat([visual K ; text K])``).

    Writes ``lse`` (natural log, -inf for a row with no visible key, whose output is 0) and, when
    ``SAVE_PARTS`` (gated training), ``o_t`` (and ``o_v``) for the backward.  ``VARLEN``: packed
    samples; the grid's ``L_q`` is the longest one's, and row blocks past a sample's end exit.
    """
    pid_m, b, h = _row_program(tl.program_id(0), tl.program_id(1), tl.num_programs(0), H)
    hk = h // G
    b64 = b.to(tl.int64)
    if VARLEN:
        q0, k0, Lq, Lk = _packed_sample(cu_q_ptr, cu_k_ptr, b)
        if pid_m * BLOCK_M >= Lq:
            return
    else:
        q0 = 0
        k0 = 0
    layout_row0 = _layout_row0(b, Lq, q0, VARLEN)

    row0 = pid_m * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    row_end = tl.minimum(row0 + BLOCK_M, Lq)
    offs_d = tl.arange(0, BLOCK_D)
    shift = Lk - Lq
    t = rows + shift
    o_offs = _sample_offset(b64, q0, stride_ob, stride_om, VARLEN) + h * stride_oh \
        + rows[:, None].to(tl.int64) * stride_om + offs_d[None, :]
    lse_offs = _sample_offset(b64, q0, stride_lb, 1, VARLEN) + h * stride_lh + rows

    q = tl.load(q_ptr + _sample_offset(b64, q0, stride_qb, stride_qm, VARLEN) + h * stride_qh
                + rows[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)

    # ---- visual keys of this sample (a per-row prefix of its images)
    v_lo, v_mid, v_hi, t_mid, t_hi = _row_block_key_tiles(layout_ptr, cu_ptr, b, layout_row0, Lq, Lk, row0, row_end,
                                                          T, BLOCK_N)
    lim_v = tl.load(layout_ptr + layout_row0 + rows, mask=row_ok, other=0) * T
    kv_base = kv_ptr + hk * stride_kvh
    vv_base = vv_ptr + hk * stride_vvh
    acc_v = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_v = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_v = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_v, m_v, l_v = _attend_tiles(acc_v, m_v, l_v, q, kv_base, vv_base, stride_kvn, stride_kvd,
                                    stride_vvn, stride_vvd, v_lo, v_mid, lim_v, kpm_ptr, 0, qk_scale, offs_d,
                                    BLOCK_N, False, False, DOT_PRECISION)
    acc_v, m_v, l_v = _attend_tiles(acc_v, m_v, l_v, q, kv_base, vv_base, stride_kvn, stride_kvd,
                                    stride_vvn, stride_vvd, v_mid, v_hi, lim_v, kpm_ptr, 0, qk_scale, offs_d,
                                    BLOCK_N, True, False, DOT_PRECISION)

    # ---- causal text keys
    if GATED:
        # Finish the visual part now and write it out (rounded to the output dtype, as the saved part
        # is): its registers are free for the text accumulator, and the epilogue reads it back.
        has_v = l_v > 0.0
        o_v = (acc_v / tl.where(has_v, l_v, 1.0)[:, None]).to(ov_ptr.dtype.element_ty)
        lse_v = tl.where(has_v, (m_v + tl.math.log2(tl.where(has_v, l_v, 1.0))) * _LN2_K, float("-inf"))
        tl.store(lse_ptr + stride_ls + lse_offs, lse_v, mask=row_ok)
        tl.store(ov_ptr + o_offs, o_v, mask=row_ok[:, None])
        acc_t = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        m_t = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    else:
        acc_t, m_t, l_t = acc_v, m_v, l_v
    lim_t = t + 1
    k_base = k_ptr + _sample_offset(b64, k0, stride_kb, stride_kn, VARLEN) + hk * stride_kh
    v_base = v_ptr + _sample_offset(b64, k0, stride_vb, stride_vn, VARLEN) + hk * stride_vh
    kpm_base = kpm_ptr + b64 * stride_kpb   # (no padding mask with packed samples)
    acc_t, m_t, l_t = _attend_tiles(acc_t, m_t, l_t, q, k_base, v_base, stride_kn, stride_kd, stride_vn,
                                    stride_vd, 0, t_mid, lim_t, kpm_base, stride_kpn, qk_scale, offs_d,
                                    BLOCK_N, False, HAS_KPM, DOT_PRECISION)
    acc_t, m_t, l_t = _attend_tiles(acc_t, m_t, l_t, q, k_base, v_base, stride_kn, stride_kd, stride_vn,
                                    stride_vd, t_mid, t_hi, lim_t, kpm_base, stride_kpn, qk_scale,
                                    offs_d, BLOCK_N, True, HAS_KPM, DOT_PRECISION)

    # ---- epilogue
    has_t = l_t > 0.0
    o_t = acc_t / tl.where(has_t, l_t, 1.0)[:, None]
    lse_t = tl.where(has_t, (m_t + tl.math.log2(tl.where(has_t, l_t, 1.0))) * _LN2_K, float("-inf"))
    tl.store(lse_ptr + lse_offs, lse_t, mask=row_ok)
    if GATED:
        # Both parts are mixed as the output dtype's values (the original model mixes two attention
        # outputs in the model dtype; the saved parts are those values), then rounded once more.
        o_t = o_t.to(ot_ptr.dtype.element_ty)
        if SAVE_PARTS:
            tl.store(ot_ptr + o_offs, o_t, mask=row_ok[:, None])
        tl.debug_barrier()   # o_v was written by other threads of this program
        o_v = tl.load(ov_ptr + o_offs, mask=row_ok[:, None], other=0.0)
        sees = tl.load(layout_ptr + layout_row0 + rows, mask=row_ok, other=0) > v_lo // T
        g = tl.load(gate_ptr + _sample_offset(b64, q0, stride_gb, stride_gm, VARLEN) + h * stride_gh
                    + rows[:, None].to(tl.int64) * stride_gm + offs_d[None, :] * stride_gd, mask=row_ok[:, None],
                    other=0.0)
        sg = 1.0 / (1.0 + tl.math.exp(-g.to(tl.float32)))
        o_t = o_t.to(tl.float32)
        out = tl.where(sees[:, None], o_t + sg * (o_v.to(tl.float32) - o_t), o_t)
    else:
        out = o_t
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


# =========================================================================== backward
#
# Per attention part x (gated: text and visual, each its own softmax; joint: one softmax over both
# key sets) with P = softmax rows (recomputed from the saved lse), dO_x the upstream gradient of
# that part's output and delta_x = rowsum(dO_x * O_x):
#
#     dV = P^T dO_x,   dP = dO_x V^T,   dS = P * (dP - delta_x),   dQ = scale * dS K,   dK = scale * dS^T Q
#
# Gated:  dO_t = dO * (1 - sigmoid(g)), dO_v = dO * sigmoid(g) on rows that see an image
# (dO_t = dO, dO_v = 0 elsewhere), and d(gate) = dO * (o_v - o_t) * sigmoid'(g) on those rows.
# Every gradient element is written by exactly one program that loops over everything it depends
# on (GQA heads included), so there are no atomics and the result is deterministic.


@triton.jit
def _lse_base2(lse):
    """``lse * log2(e)``, and +inf where ``lse = -inf`` (a row without a visible key: P = 0)."""
    return tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E_K)


@triton.jit
def _hyper_bwd_pre_kernel(
    do_ptr, out_ptr, ot_ptr, ov_ptr, gate_ptr, cu_ptr, cu_q_ptr, cu_k_ptr, layout_ptr, lse_ptr,
    dop_ptr, stats_ptr, dg_ptr,
    Lq, H,
    stride_dob, stride_dom, stride_doh, stride_dod, stride_dop,
    stride_gb, stride_gm, stride_gh, stride_gd,
    stride_ob, stride_om, stride_oh,
    stride_ls, stride_lb, stride_lh,
    stride_sp, stride_sk, stride_sb, stride_sh,
    GATED: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row statistics of the backward.  Grid ``(cdiv(L_q, BLOCK_M), B * H)``.

    ``stats [S, 2, B, H, L_q]`` float32: per part x, ``stats[x, 0] = lse_x * log2(e)`` (the base-2
    log-sum-exp the kernels' exp2 needs; +inf for a row that sees no key, so that its
    ``P = exp2(s - lse)`` is exactly 0 with or without a mask) and
    ``stats[x, 1] = delta_x = rowsum(dO_x * O_x)``.  Joint:
    one part, ``dO_x = dO``.  Gated: also the two part gradients ``dO_t``, ``dO_v`` (``dop[0]``,
    ``dop[1]``: ``[2, B, L_q, H, D]`` in the input dtype, each part laid out like ``out``, parts
    ``stride_dop`` apart) and the elementwise ``d(gate)`` in float32 (reduced to the gate's shape on
    the host).  ``VARLEN``: packed samples (``stats [S, 2, 1, H, packed_stats_len]``, each sample's rows from
    ``_stats_offset``; the parts
    ``[2, 1, total_q, H, D]``); row blocks past a sample's end exit.
    """
    pid_m, b, h = _row_program(tl.program_id(0), tl.program_id(1), tl.num_programs(0), H)
    b64 = b.to(tl.int64)
    if VARLEN:
        q0, _, Lq, _ = _packed_sample(cu_q_ptr, cu_k_ptr, b)
        if pid_m * BLOCK_M >= Lq:
            return
    else:
        q0 = 0
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    offs_d = tl.arange(0, BLOCK_D)
    r64 = rows[:, None].to(tl.int64)
    do = tl.load(do_ptr + _sample_offset(b64, q0, stride_dob, stride_dom, VARLEN) + h * stride_doh + r64 * stride_dom
                 + offs_d[None, :] * stride_dod, mask=row_ok[:, None], other=0.0).to(tl.float32)
    o_offs = _sample_offset(b64, q0, stride_ob, stride_om, VARLEN) + h * stride_oh + r64 * stride_om + offs_d[None, :]
    lse_offs = _sample_offset(b64, q0, stride_lb, 1, VARLEN) + h * stride_lh + rows
    st_offs = _stats_offset(b64, q0, stride_sb, VARLEN) + h * stride_sh + rows
    tl.store(stats_ptr + st_offs, _lse_base2(tl.load(lse_ptr + lse_offs, mask=row_ok, other=0.0)), mask=row_ok)
    if GATED:
        tl.store(stats_ptr + stride_sp + st_offs, _lse_base2(tl.load(lse_ptr + stride_ls + lse_offs, mask=row_ok,
                                                                      other=0.0)), mask=row_ok)
        img_lo = tl.load(cu_ptr + b)
        sees = (tl.load(layout_ptr + _layout_row0(b, Lq, q0, VARLEN) + rows, mask=row_ok, other=0) > img_lo)[:, None]
        g = tl.load(gate_ptr + _sample_offset(b64, q0, stride_gb, stride_gm, VARLEN) + h * stride_gh + r64 * stride_gm
                    + offs_d[None, :] * stride_gd, mask=row_ok[:, None], other=0.0).to(tl.float32)
        sg = 1.0 / (1.0 + tl.math.exp(-g))
        o_t = tl.load(ot_ptr + o_offs, mask=row_ok[:, None], other=0.0).to(tl.float32)
        o_v = tl.load(ov_ptr + o_offs, mask=row_ok[:, None], other=0.0).to(tl.float32)
        do_t = tl.where(sees, do * (1.0 - sg), do)
        do_v = tl.where(sees, do * sg, 0.0)
        do_t_lp = do_t.to(dop_ptr.dtype.element_ty)
        do_v_lp = do_v.to(dop_ptr.dtype.element_ty)
        tl.store(dop_ptr + o_offs, do_t_lp, mask=row_ok[:, None])
        tl.store(dop_ptr + stride_dop + o_offs, do_v_lp, mask=row_ok[:, None])
        tl.store(stats_ptr + stride_sk + st_offs, tl.sum(do_t_lp.to(tl.float32) * o_t, axis=1), mask=row_ok)
        tl.store(stats_ptr + stride_sp + stride_sk + st_offs, tl.sum(do_v_lp.to(tl.float32) * o_v, axis=1),
                 mask=row_ok)
        dg = tl.where(sees, do * (o_v - o_t) * sg * (1.0 - sg), 0.0)
        tl.store(dg_ptr + o_offs, dg, mask=row_ok[:, None])
    else:
        o = tl.load(out_ptr + o_offs, mask=row_ok[:, None], other=0.0).to(tl.float32)
        tl.store(stats_ptr + stride_sk + st_offs, tl.sum(do * o, axis=1), mask=row_ok)


@triton.jit
def _dq_key_tiles(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                  lo, hi, lim, kpm_base, stride_kpn, qk_scale, offs_d,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_KPM: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """``dq += dS K`` over the keys ``[lo, hi)`` of one row block.

    ``MASKED=False`` (full tiles): every row sees every key and every key is below the key set's
    end; only the padding mask, when given, masks columns.  ``MASKED=True`` (partial tiles): key j is
    visible from row r iff ``j < lim[r]`` (and kept), and keys from ``hi`` on are not loaded.
    """
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n64 = offs_n.to(tl.int64)
        if MASKED:
            n_ok = offs_n < hi
            kT = tl.load(k_base + n64[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=n_ok[None, :],
                         other=0.0)
            vT = tl.load(v_base + n64[None, :] * stride_vn + offs_d[:, None] * stride_vd, mask=n_ok[None, :],
                         other=0.0)
        else:
            kT = tl.load(k_base + n64[None, :] * stride_kn + offs_d[:, None] * stride_kd)
            vT = tl.load(v_base + n64[None, :] * stride_vn + offs_d[:, None] * stride_vd)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION)
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        if MASKED:
            visible = tl.arange(0, BLOCK_N)[None, :] < (lim - start)[:, None]     # i.e. offs_n < lim
            if HAS_KPM:
                visible = visible & (tl.load(kpm_base + n64 * stride_kpn, mask=n_ok, other=0) != 0)[None, :]
            p = tl.where(visible, p, 0.0)
        elif HAS_KPM:
            p = tl.where((tl.load(kpm_base + n64 * stride_kpn) != 0)[None, :], p, 0.0)
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _dkv_row_tiles(dk, dv, k, v, q_group, do_group, stats_group, stride_qh, stride_doh, stride_sh, stride_sk,
                   stride_qm, stride_qd, stride_dom, stride_dod, G, lo, gap_lo, gap_hi, hi, Lq, first_row, qk_scale,
                   offs_d, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, NUM_STAGES: tl.constexpr,
                   VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``dk += dS^T Q``, ``dv += P^T dO`` over the query rows ``[lo, gap_lo)`` and ``[gap_hi, hi)``
    (multiples of BLOCK_M; ``gap_lo <= gap_hi``) of each of the G query heads of the group
    (``*_group`` point at its first head; ``stats`` holds the base-2 lse, and ``stride_sk`` further
    on delta, see the preprocessing kernel): one flat loop over the (head, row tile) pairs, so the
    pipeline does not drain between heads.

    Key j (row j of ``k``) is visible from query row r iff ``r >= first_row[j]``.  ``MASKED=False``
    (full tiles): every row sees every key and every row is below L_q.  ``MASKED=True`` (partial
    tiles and the last, short row tile): the rule above, and rows from L_q on are not loaded (their
    lse reads as +inf, so their P and dS are 0).  ``NUM_STAGES``: the pipeline depth; the masked
    loop, which runs few tiles, takes 2 so that the program stays within 255 registers unspilled
    (with 3, Triton 3.6 spills a few bytes at the 7B causal shape; 3.8 does not).  ``VARLEN``: the
    sample's L_q is read from memory (no known divisibility), so a masked load of lse and delta would
    be split into single floats; they are loaded unmasked (the packed statistics have room past every
    sample's rows, see ``_stats_offset``, and are zero-initialised: every value read is finite), the
    lse of the rows from L_q on is then set to +inf, so their P and dS are 0 whatever their delta (a
    select less than the dense loop: with it, Triton 3.6 spills 4 bytes).
    """
    n_tiles = (tl.maximum(gap_lo - lo, 0) + tl.maximum(hi - gap_hi, 0)) // BLOCK_M
    first = tl.where(lo < gap_lo, lo, gap_hi)       # the first tile (the first range may be empty)
    row = first
    g = lo * 0
    for _ in tl.range(0, G * n_tiles, num_stages=NUM_STAGES):
        offs_m = tl.arange(0, BLOCK_M)
        rows = row + offs_m
        r64 = rows.to(tl.int64)
        g64 = g.to(tl.int64)
        q_base = q_group + g64 * stride_qh
        do_base = do_group + g64 * stride_doh
        lse_base = stats_group + g64 * stride_sh
        delta_base = lse_base + stride_sk
        if MASKED:
            row_ok = offs_m < Lq - row
            qT = tl.load(q_base + r64[None, :] * stride_qm + offs_d[:, None] * stride_qd, mask=row_ok[None, :],
                         other=0.0)
            do = tl.load(do_base + r64[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=row_ok[:, None],
                         other=0.0)
            if VARLEN:
                lse2 = tl.where(row_ok, tl.load(lse_base + rows), float("inf"))
                delta = tl.load(delta_base + rows)   # finite; its rows' P and dS are 0
            else:
                lse2 = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
                delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        else:
            qT = tl.load(q_base + r64[None, :] * stride_qm + offs_d[:, None] * stride_qd)
            do = tl.load(do_base + r64[:, None] * stride_dom + offs_d[None, :] * stride_dod)
            lse2 = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        sT = tl.dot(k, qT, input_precision=DOT_PRECISION)
        pT = tl.math.exp2(sT * qk_scale - lse2[None, :])
        if MASKED:   # row r sees key j iff r >= first_row[j]
            pT = tl.where(offs_m[None, :] >= (first_row - row)[:, None], pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PRECISION)
        row += BLOCK_M                       # next row tile, over the gap; past hi: the next head's first tile
        row = tl.where(row == gap_lo, gap_hi, row)
        wrap = row >= hi
        row = tl.where(wrap, first, row)
        g += wrap.to(g.dtype)
    return dk, dv


@triton.jit
def _dkv_text_block(p, B, Hkv):
    """Text dK/dV program ``p = (kb * B + b) * H_kv + hk`` -> ``(kb, b, hk)``: key block major, so
    block 0 (seen by every row: the heaviest) of every sample and head starts first."""
    return p // (B * Hkv), (p % (B * Hkv)) // Hkv, (p % Hkv).to(tl.int64)


@triton.jit
def _dkv_image_block(p, T, Hkv, BLOCK_N: tl.constexpr):
    """Visual dK/dV program ``p = (n * cdiv(T, BLOCK_N) + kb) * H_kv + hk`` (counted from the first
    visual one) -> ``(n, kb, hk)``: image major, a sample's earlier images being seen by more rows."""
    per_image = tl.cdiv(T, BLOCK_N) * Hkv
    return p // per_image, (p % per_image) // Hkv, (p % Hkv).to(tl.int64)


@triton.jit
def _dkv_program(
    p, q_ptr, k_ptr, v_ptr, kv_ptr, vv_ptr, cu_q_ptr, cu_k_ptr, layout_ptr, kpm_ptr, do_ptr, stats_ptr,
    dk_ptr, dv_ptr, dkv_ptr, dvv_ptr,
    B, Lq, Lk, H, G, T, N, n_layout_rows, n_text_programs,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_kvn, stride_kvh, stride_kvd,
    stride_vvn, stride_vvh, stride_vvd,
    stride_kpb, stride_kpn,
    stride_dob, stride_dom, stride_doh, stride_dod, stride_dop,
    stride_sp, stride_sk, stride_sb, stride_sh,
    stride_dkb, stride_dkn, stride_dkh, stride_dkvn, stride_dkvh,
    qk_scale, scale,
    GATED: tl.constexpr, HAS_KPM: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_M_MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
    STAGES_MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dK, dV of BLOCK_N keys of one K/V head: program ``p`` loops over the G query heads sharing the
    head and over every row block (of BLOCK_M rows) that sees the keys: the full ones unmasked, the
    partial ones masked, in tiles of BLOCK_M_MASKED rows (a divisor of BLOCK_M; the masked loop needs
    more registers beside the dK/dV accumulators).  ``STAGES`` / ``STAGES_MASKED``: the pipeline depth
    of the full and the masked row-tile loops.

    Programs ``p < n_text_programs`` take text key blocks, key block major (``p = (kb * B + b) *
    H_kv + hk``): block 0 is seen by every row, so the heaviest programs start first.  The others
    take visual key blocks, image major (``p - n_text_programs = (n * cdiv(T, BN) + kb) * H_kv + hk``):
    a sample's earlier images are seen by more rows.

    ``VARLEN``: packed samples; ``L_q``, ``L_k`` (the longest sample's, which size the grid) become the
    program's sample's, and a text key block past its sample's end sees no row and stores nothing.
    """
    Hkv = H // G
    shift = Lk - Lq
    if not VARLEN:
        q0 = 0
        k0 = 0
    is_text = p < n_text_programs
    # The branches only pick scalars (bases, strides, row ranges); every per-key vector is rebuilt from
    # tl.arange where it is used, so none stays live in registers across the row loops.
    if is_text:
        kb, b, hk = _dkv_text_block(p, B, Hkv)
        if VARLEN:
            q0, k0, Lq, Lk = _packed_sample(cu_q_ptr, cu_k_ptr, b)
            shift = Lk - Lq
        key0 = kb * BLOCK_N
        n_keys = tl.minimum(Lk - key0, BLOCK_N)                   # valid keys of the block
        first0, first_step = key0 - shift, 1                      # causal: row r sees key j iff j <= r + shift
        row_lo, row_full = _text_key_block_rows(key0, n_keys, shift)
        b64 = b.to(tl.int64)
        k_base = k_ptr + _sample_offset(b64, k0, stride_kb, stride_kn, VARLEN) + hk * stride_kh + key0 * stride_kn
        v_base = v_ptr + _sample_offset(b64, k0, stride_vb, stride_vn, VARLEN) + hk * stride_vh + key0 * stride_vn
        stride_k, stride_v, stride_k_d, stride_v_d = stride_kn, stride_vn, stride_kd, stride_vd
        part = p * 0                                               # the text part's dO and statistics
    else:
        n, kb, hk = _dkv_image_block(p - n_text_programs, T, Hkv, BLOCK_N)
        b = tl.load(layout_ptr + n_layout_rows + N + n)
        if VARLEN:
            q0, k0, Lq, Lk = _packed_sample(cu_q_ptr, cu_k_ptr, b)
            shift = Lk - Lq
        first = tl.load(layout_ptr + n_layout_rows + n)            # every row from here on sees the image
        key0 = kb * BLOCK_N
        n_keys = tl.minimum(T - key0, BLOCK_N)
        first0, first_step = first, 0
        row_lo = first
        row_full = first
        b64 = b.to(tl.int64)
        row0 = n.to(tl.int64) * T + key0                           # the block's first row of k_vis [N*T, H_kv, D]
        k_base = kv_ptr + hk * stride_kvh + row0 * stride_kvn
        v_base = vv_ptr + hk * stride_vvh + row0 * stride_vvn
        stride_k, stride_v, stride_k_d, stride_v_d = stride_kvn, stride_vvn, stride_kvd, stride_vvd
        part = p * 0 + (1 if GATED else 0)                          # the visual part's (the joint one: 0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_n < n_keys
    k = tl.load(k_base + offs_n[:, None] * stride_k + offs_d[None, :] * stride_k_d, mask=key_ok[:, None], other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_v + offs_d[None, :] * stride_v_d, mask=key_ok[:, None], other=0.0)
    first_row = first0 + offs_n * first_step
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    r_lo, r_full, r_down, r_tail, r_up = _key_block_row_tiles(row_lo, row_full, Lq, BLOCK_M)
    h0 = hk * G                              # the group's first query head
    q_group = q_ptr + _sample_offset(b64, q0, stride_qb, stride_qm, VARLEN) + h0 * stride_qh
    do_group = do_ptr + part * stride_dop + _sample_offset(b64, q0, stride_dob, stride_dom, VARLEN) + h0 * stride_doh
    stats_group = stats_ptr + part * stride_sp + _stats_offset(b64, q0, stride_sb, VARLEN) + h0 * stride_sh
    # the partial row tiles (the boundary, and the short last tile), then the full ones
    dk, dv = _dkv_row_tiles(dk, dv, k, v, q_group, do_group, stats_group, stride_qh, stride_doh, stride_sh, stride_sk,
                            stride_qm, stride_qd, stride_dom, stride_dod, G, r_lo, r_full, r_tail, r_up, Lq, first_row,
                            qk_scale, offs_d, BLOCK_M_MASKED, True, STAGES_MASKED, VARLEN, DOT_PRECISION)
    dk, dv = _dkv_row_tiles(dk, dv, k, v, q_group, do_group, stats_group, stride_qh, stride_doh, stride_sh, stride_sk,
                            stride_qm, stride_qd, stride_dom, stride_dod, G, r_full, r_down, r_down, r_down, Lq,
                            first_row, qk_scale, offs_d, BLOCK_M, False, STAGES, VARLEN, DOT_PRECISION)
    # The output addresses are decoded from p again (not kept in registers through the loops).
    dk = dk * scale
    keys_out = tl.arange(0, BLOCK_N)
    cols_out = tl.arange(0, BLOCK_D)
    if is_text:
        kb, b, hk = _dkv_text_block(p, B, Hkv)
        if VARLEN:   # (read again too: a register less through the loops)
            _, k0, _, Lk = _packed_sample(cu_q_ptr, cu_k_ptr, b)
        b64 = b.to(tl.int64)
        key0 = kb * BLOCK_N
        store_ok = keys_out < Lk - key0
        if HAS_KPM:   # padded text keys get a zero gradient (their P column is 0)
            keep = tl.load(kpm_ptr + b64 * stride_kpb + (key0 + keys_out).to(tl.int64) * stride_kpn, mask=store_ok,
                           other=0) != 0
            dk = tl.where(keep[:, None], dk, 0.0)
            dv = tl.where(keep[:, None], dv, 0.0)
        offs = _sample_offset(b64, k0, stride_dkb, stride_dkn, VARLEN) + hk * stride_dkh \
            + (key0 + keys_out)[:, None].to(tl.int64) * stride_dkn + cols_out[None, :]
        tl.store(dk_ptr + offs, dk.to(dk_ptr.dtype.element_ty), mask=store_ok[:, None])
        tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty), mask=store_ok[:, None])
    else:
        n, kb, hk = _dkv_image_block(p - n_text_programs, T, Hkv, BLOCK_N)
        key0 = kb * BLOCK_N
        store_ok = keys_out < T - key0
        offs = hk * stride_dkvh + (n.to(tl.int64) * T + key0 + keys_out)[:, None] * stride_dkvn + cols_out[None, :]
        tl.store(dkv_ptr + offs, dk.to(dkv_ptr.dtype.element_ty), mask=store_ok[:, None])
        tl.store(dvv_ptr + offs, dv.to(dvv_ptr.dtype.element_ty), mask=store_ok[:, None])


@triton.jit
def _dq_program(
    p, q_ptr, k_ptr, v_ptr, kv_ptr, vv_ptr, cu_ptr, cu_q_ptr, cu_k_ptr, layout_ptr, kpm_ptr, do_ptr, stats_ptr,
    dq_ptr,
    B, Lq, Lk, H, G, T,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_kvn, stride_kvh, stride_kvd,
    stride_vvn, stride_vvh, stride_vvd,
    stride_kpb, stride_kpn,
    stride_dob, stride_dom, stride_doh, stride_dod, stride_dop,
    stride_sp, stride_sk, stride_sb, stride_sh,
    stride_dqb, stride_dqm, stride_dqh,
    qk_scale, scale,
    GATED: tl.constexpr, HAS_KPM: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ of BLOCK_M rows of one query head (``p = (rb' * B + b) * H + h`` with the row blocks taken
    last first: they see the most keys).  The block walks the forward's tiles: the sample's visual
    keys (full, then partial) with the visual part's dO, lse, delta, then its causal text keys (full,
    then the diagonal) with the text part's (both parts are the one joint softmax in joint mode).
    ``VARLEN``: packed samples; ``L_q`` (the longest sample's) sizes the grid, the program's sample's
    own lengths replace it, and a row block past the sample's end does nothing."""
    n_rb = tl.cdiv(Lq, BLOCK_M)
    rb = n_rb - 1 - p // (B * H)
    b = (p % (B * H)) // H
    h = (p % H).to(tl.int64)
    hk = h // G
    b64 = b.to(tl.int64)
    if VARLEN:
        q0, k0, Lq, Lk = _packed_sample(cu_q_ptr, cu_k_ptr, b)
        active = rb * BLOCK_M < Lq
    else:
        q0 = 0
        k0 = 0
        active = True
    if active:
        row0 = rb * BLOCK_M
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < Lq
        row_end = tl.minimum(row0 + BLOCK_M, Lq)
        offs_d = tl.arange(0, BLOCK_D)
        r64 = rows[:, None].to(tl.int64)
        shift = Lk - Lq
        q = tl.load(q_ptr + _sample_offset(b64, q0, stride_qb, stride_qm, VARLEN) + h * stride_qh + r64 * stride_qm
                    + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
        do_offs = _sample_offset(b64, q0, stride_dob, stride_dom, VARLEN) + h * stride_doh + r64 * stride_dom \
            + offs_d[None, :] * stride_dod
        st_offs = _stats_offset(b64, q0, stride_sb, VARLEN) + h * stride_sh + rows
        dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

        # ---- visual keys (part 1 in gated mode)
        if GATED:
            stats_v, do_v = stats_ptr + stride_sp, do_ptr + stride_dop
        else:
            stats_v, do_v = stats_ptr, do_ptr
        do = tl.load(do_v + do_offs, mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(stats_v + st_offs, mask=row_ok, other=float("inf"))
        delta = tl.load(stats_v + stride_sk + st_offs, mask=row_ok, other=0.0)
        layout_row0 = _layout_row0(b, Lq, q0, VARLEN)
        v_lo, v_mid, v_hi, t_mid, t_hi = _row_block_key_tiles(layout_ptr, cu_ptr, b, layout_row0, Lq, Lk, row0,
                                                              row_end, T, BLOCK_N)
        lim_v = tl.load(layout_ptr + layout_row0 + rows, mask=row_ok, other=0) * T
        kv_base = kv_ptr + hk * stride_kvh
        vv_base = vv_ptr + hk * stride_vvh
        dq = _dq_key_tiles(dq, q, do, lse2, delta, kv_base, vv_base, stride_kvn, stride_kvd, stride_vvn, stride_vvd,
                           v_lo, v_mid, lim_v, kpm_ptr, 0, qk_scale, offs_d, BLOCK_N, False, False, DOT_PRECISION)
        dq = _dq_key_tiles(dq, q, do, lse2, delta, kv_base, vv_base, stride_kvn, stride_kvd, stride_vvn, stride_vvd,
                           v_mid, v_hi, lim_v, kpm_ptr, 0, qk_scale, offs_d, BLOCK_N, True, False, DOT_PRECISION)

        # ---- causal text keys (part 0)
        if GATED:
            do = tl.load(do_ptr + do_offs, mask=row_ok[:, None], other=0.0)
            lse2 = tl.load(stats_ptr + st_offs, mask=row_ok, other=float("inf"))
            delta = tl.load(stats_ptr + stride_sk + st_offs, mask=row_ok, other=0.0)
        k_base = k_ptr + _sample_offset(b64, k0, stride_kb, stride_kn, VARLEN) + hk * stride_kh
        v_base = v_ptr + _sample_offset(b64, k0, stride_vb, stride_vn, VARLEN) + hk * stride_vh
        kpm_base = kpm_ptr + b64 * stride_kpb
        dq = _dq_key_tiles(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                           0, t_mid, rows + shift + 1, kpm_base, stride_kpn, qk_scale, offs_d, BLOCK_N, False, HAS_KPM,
                           DOT_PRECISION)
        dq = _dq_key_tiles(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                           t_mid, t_hi, rows + shift + 1, kpm_base, stride_kpn, qk_scale, offs_d, BLOCK_N,
                           True, HAS_KPM, DOT_PRECISION)
        tl.store(dq_ptr + _sample_offset(b64, q0, stride_dqb, stride_dqm, VARLEN) + h * stride_dqh + r64 * stride_dqm
                 + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _hyper_bwd_kernel(
    q_ptr, k_ptr, v_ptr, kv_ptr, vv_ptr, cu_ptr, cu_q_ptr, cu_k_ptr, layout_ptr, kpm_ptr, do_ptr, stats_ptr,
    dq_ptr, dk_ptr, dv_ptr, dkv_ptr, dvv_ptr,
    B, Lq, Lk, H, G, T, N, n_layout_rows, n_text_kv_programs, n_kv_programs,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_kvn, stride_kvh, stride_kvd,
    stride_vvn, stride_vvh, stride_vvd,
    stride_kpb, stride_kpn,
    stride_dob, stride_dom, stride_doh, stride_dod, stride_dop,
    stride_sp, stride_sk, stride_sb, stride_sh,
    stride_dqb, stride_dqm, stride_dqh,
    stride_dkb, stride_dkn, stride_dkh, stride_dkvn, stride_dkvh,
    qk_scale, scale,
    GATED: tl.constexpr, HAS_KPM: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M_KV: tl.constexpr, BLOCK_M_KV_MASKED: tl.constexpr,
    BLOCK_N_KV: tl.constexpr, BLOCK_D: tl.constexpr, KV_STAGES: tl.constexpr, KV_STAGES_MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The whole backward after the row statistics, in one launch of two kinds of program.

    Grid ``(n_kv_programs + B * H * cdiv(L_q, BLOCK_M),)``: programs below ``n_kv_programs`` compute
    dK/dV of BLOCK_N_KV keys (text key blocks first, then visual ones; :func:`_dkv_program`), the
    rest dQ of BLOCK_M query rows (:func:`_dq_program`).  Each kind is ordered heaviest first, and
    the dQ programs fill in behind the dK/dV ones.  ``do`` (the part gradients) and ``stats``
    (base-2 lse and delta), both from the preprocessing kernel, hold parts 0/1 = text/visual in
    gated mode, ``stride_dop``/``stride_sp`` apart; joint mode has one part, used by both key sets
    (``do`` is then the output gradient itself).  ``VARLEN``: packed samples (``B`` of them, ``L_q`` and
    ``L_k`` the longest one's; each program reads its sample's offsets).
    """
    pid = tl.program_id(0)
    if pid < n_kv_programs:
        _dkv_program(pid, q_ptr, k_ptr, v_ptr, kv_ptr, vv_ptr, cu_q_ptr, cu_k_ptr, layout_ptr, kpm_ptr, do_ptr,
                     stats_ptr,
                     dk_ptr, dv_ptr, dkv_ptr, dvv_ptr,
                     B, Lq, Lk, H, G, T, N, n_layout_rows, n_text_kv_programs,
                     stride_qb, stride_qm, stride_qh, stride_qd,
                     stride_kb, stride_kn, stride_kh, stride_kd,
                     stride_vb, stride_vn, stride_vh, stride_vd,
                     stride_kvn, stride_kvh, stride_kvd,
                     stride_vvn, stride_vvh, stride_vvd,
                     stride_kpb, stride_kpn,
                     stride_dob, stride_dom, stride_doh, stride_dod, stride_dop,
                     stride_sp, stride_sk, stride_sb, stride_sh,
                     stride_dkb, stride_dkn, stride_dkh, stride_dkvn, stride_dkvh,
                     qk_scale, scale, GATED, HAS_KPM, VARLEN, BLOCK_M_KV, BLOCK_M_KV_MASKED, BLOCK_N_KV, BLOCK_D,
                     KV_STAGES, KV_STAGES_MASKED, DOT_PRECISION)
    else:
        _dq_program(pid - n_kv_programs, q_ptr, k_ptr, v_ptr, kv_ptr, vv_ptr, cu_ptr, cu_q_ptr, cu_k_ptr,
                    layout_ptr, kpm_ptr, do_ptr, stats_ptr, dq_ptr,
                    B, Lq, Lk, H, G, T,
                    stride_qb, stride_qm, stride_qh, stride_qd,
                    stride_kb, stride_kn, stride_kh, stride_kd,
                    stride_vb, stride_vn, stride_vh, stride_vd,
                    stride_kvn, stride_kvh, stride_kvd,
                    stride_vvn, stride_vvh, stride_vvd,
                    stride_kpb, stride_kpn,
                    stride_dob, stride_dom, stride_doh, stride_dod, stride_dop,
                    stride_sp, stride_sk, stride_sb, stride_sh,
                    stride_dqb, stride_dqm, stride_dqh,
                    qk_scale, scale, GATED, HAS_KPM, VARLEN, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)


@triton.jit
def _store_row_classes(out, v_lo, v_mid, v_hi, t_mid, t_hi, n_vis_tiles, n_text_tiles,
                       BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    """One row block's classes (:func:`_row_block_key_tiles`' ranges): its visual tiles from ``v_lo``,
    then its text tiles from key 0."""
    for i0 in range(0, n_vis_tiles, BLOCK_T):
        i = i0 + tl.arange(0, BLOCK_T)
        start = v_lo + i * BLOCK_N
        cls = tl.where(start < v_mid, 2, tl.where(start < v_hi, 1, 0))
        tl.store(out + i, cls.to(tl.int8), mask=i < n_vis_tiles)
    for i0 in range(0, n_text_tiles, BLOCK_T):
        i = i0 + tl.arange(0, BLOCK_T)
        start = i * BLOCK_N
        cls = tl.where(start < t_mid, 2, tl.where(start < t_hi, 1, 0))
        tl.store(out + n_vis_tiles + i, cls.to(tl.int8), mask=i < n_text_tiles)


@triton.jit
def _hyper_block_classes_kernel(
    layout_ptr, cu_ptr, cu_q_ptr, cu_k_ptr, row_view_ptr, key_view_ptr,
    B, Lq, Lk, T, N, n_layout_rows, n_row_programs, n_text_blocks, n_vis_tiles, n_text_tiles, n_row_tiles,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M_KV: tl.constexpr,
    BLOCK_N_KV: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """The classes (0 empty, 1 partial, 2 full) the attention kernels give their tiles, written out
    from the same rules (:func:`_row_block_key_tiles`, :func:`_key_block_row_tiles`) for tests and
    tile statistics; the attention kernels never call it.

    Programs below ``n_row_programs = B * cdiv(L_q, BLOCK_M)`` write the row-block view (forward,
    dQ): ``row_view[b, i, :]`` = the visual key tiles of row block i of sample b, counted from the
    sample's first visual key, then its text key tiles.  The others write the key-block view (dK/dV,
    BLOCK_N_KV keys x BLOCK_M_KV rows): ``key_view[kb * B + b, :]`` for text key block kb of sample
    b, then ``key_view[n_text_blocks + n * cdiv(T, BLOCK_N_KV) + kb, :]`` for key block kb of image n.
    ``VARLEN``: packed samples, each classified in its own coordinates (``L_q``, ``L_k``: the longest
    sample's; blocks past a sample's end are empty).
    """
    pid = tl.program_id(0)
    if pid < n_row_programs:
        n_rb = tl.cdiv(Lq, BLOCK_M)
        b = pid // n_rb
        row0 = (pid % n_rb) * BLOCK_M
        if VARLEN:
            q0, _, rb_rows, rb_keys = _packed_sample(cu_q_ptr, cu_k_ptr, b)
            active = row0 < rb_rows
        else:
            q0 = 0
            rb_rows = Lq
            rb_keys = Lk
            active = True
        out = row_view_ptr + pid.to(tl.int64) * (n_vis_tiles + n_text_tiles)
        if active:
            v_lo, v_mid, v_hi, t_mid, t_hi = _row_block_key_tiles(layout_ptr, cu_ptr, b,
                                                                  _layout_row0(b, rb_rows, q0, VARLEN), rb_rows,
                                                                  rb_keys, row0, tl.minimum(row0 + BLOCK_M, rb_rows), T,
                                                                  BLOCK_N)
            _store_row_classes(out, v_lo, v_mid, v_hi, t_mid, t_hi, n_vis_tiles, n_text_tiles, BLOCK_N, BLOCK_T)
        else:
            _store_row_classes(out, 0, 0, 0, 0, 0, n_vis_tiles, n_text_tiles, BLOCK_N, BLOCK_T)
    else:
        kb_all = pid - n_row_programs
        if VARLEN:
            is_image = kb_all >= n_text_blocks
            image = (kb_all - n_text_blocks) // tl.cdiv(T, BLOCK_N_KV)
            kb_sample = tl.where(is_image, tl.load(layout_ptr + n_layout_rows + N + image, mask=is_image, other=0),
                                 kb_all % B)
            _, _, kb_rows, kb_keys = _packed_sample(cu_q_ptr, cu_k_ptr, kb_sample)
        else:
            kb_rows = Lq
            kb_keys = Lk
        if kb_all < n_text_blocks:
            key0 = (kb_all // B) * BLOCK_N_KV
            row_lo, row_full = _text_key_block_rows(key0, tl.minimum(kb_keys - key0, BLOCK_N_KV), kb_keys - kb_rows)
        else:
            n = (kb_all - n_text_blocks) // tl.cdiv(T, BLOCK_N_KV)
            row_lo = tl.load(layout_ptr + n_layout_rows + n)
            row_full = row_lo
        r_lo, r_full, r_down, r_tail, r_up = _key_block_row_tiles(row_lo, row_full, kb_rows, BLOCK_M_KV)
        out = key_view_ptr + kb_all.to(tl.int64) * n_row_tiles
        for j0 in range(0, n_row_tiles, BLOCK_T):
            j = j0 + tl.arange(0, BLOCK_T)
            start = j * BLOCK_M_KV
            partial = ((start >= r_lo) & (start < r_full)) | ((start >= r_tail) & (start < r_up))
            full = (start >= r_full) & (start < r_down)
            tl.store(out + j, tl.where(full, 2, tl.where(partial, 1, 0)).to(tl.int8), mask=j < n_row_tiles)


# =========================================================================== visual K/V producer

@triton.jit
def _visual_kv_rope_kernel(
    x_ptr, rstd_ptr, bias_ptr, pos_ptr, inv_freq_ptr, a_ptr, b_ptr,
    M, T, position_offset,
    stride_xm, stride_am, stride_ah,
    FORWARD: tl.constexpr, HAS_RSTD: tl.constexpr, HAS_BIAS: tl.constexpr, HALF_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """The producer's epilogue after the ``v_kv_proj`` GEMM: RMSNorm scale, bias, K/V split and
    MI-RoPE on K, in float32, one rounding at the end (or, backward, the exact inverse rotation).

    ``x [M = N*T, 2*H_kv*D]`` is ``image_embeds @ (W * norm_weight).T`` (the norm weight folded
    into the projection) with its channels laid out ``(kv_head, {K, V}, D)``: channel ``hk*2D + d``
    is K and ``hk*2D + D + d`` is V of head ``hk``.  ``y = rstd[m] * x + bias`` (``rstd`` = the
    RMSNorm's ``1/sqrt(mean(x^2) + eps)`` per row), then every key of image ``n = m // T`` is
    rotated by ``angle_i = (pos[n] + offset) * inv_freq[i]`` (float32, the original table's single
    multiply), rotate-half convention::

        k1' = k1 cos - k2 sin,   k2' = k2 cos + k1 sin          (k1 = first D/2 channels)

    Grid ``(cdiv(M, BLOCK_M), H_kv)``.  ``FORWARD``: read ``x``, write ``a = k_vis``, ``b = v_vis``
    (``[M, H_kv, D]``).  Backward (``FORWARD=False``, no rstd/bias): read ``a = dk_vis``,
    ``b = dv_vis`` and write ``x = dy`` (interleaved), rotating K back by ``-angle``.
    """
    pid_m = tl.program_id(0)
    hk = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = (rows < M)[:, None]
    r64 = rows.to(tl.int64)[:, None]
    offs = tl.arange(0, HALF_D)[None, :]
    img = rows // T
    p = tl.load(pos_ptr + img, mask=rows < M, other=0).to(tl.float32) + position_offset
    inv_freq = tl.load(inv_freq_ptr + tl.arange(0, HALF_D))
    ang = p[:, None] * inv_freq[None, :]
    c = tl.cos(ang)
    s = tl.sin(ang)
    x_k = x_ptr + r64 * stride_xm + hk * (4 * HALF_D) + offs
    x_v = x_k + 2 * HALF_D
    a_k = a_ptr + r64 * stride_am + hk * stride_ah + offs
    b_v = b_ptr + r64 * stride_am + hk * stride_ah + offs
    if FORWARD:
        k1 = tl.load(x_k, mask=row_ok, other=0.0).to(tl.float32)
        k2 = tl.load(x_k + HALF_D, mask=row_ok, other=0.0).to(tl.float32)
        v1 = tl.load(x_v, mask=row_ok, other=0.0).to(tl.float32)
        v2 = tl.load(x_v + HALF_D, mask=row_ok, other=0.0).to(tl.float32)
        if HAS_RSTD:
            r = tl.load(rstd_ptr + rows, mask=rows < M, other=0.0)[:, None]
            k1, k2, v1, v2 = k1 * r, k2 * r, v1 * r, v2 * r
        if HAS_BIAS:
            bk = bias_ptr + hk * (4 * HALF_D) + offs
            k1 += tl.load(bk).to(tl.float32)
            k2 += tl.load(bk + HALF_D).to(tl.float32)
            v1 += tl.load(bk + 2 * HALF_D).to(tl.float32)
            v2 += tl.load(bk + 3 * HALF_D).to(tl.float32)
        tl.store(a_k, (k1 * c - k2 * s).to(a_ptr.dtype.element_ty), mask=row_ok)
        tl.store(a_k + HALF_D, (k2 * c + k1 * s).to(a_ptr.dtype.element_ty), mask=row_ok)
        tl.store(b_v, v1.to(b_ptr.dtype.element_ty), mask=row_ok)
        tl.store(b_v + HALF_D, v2.to(b_ptr.dtype.element_ty), mask=row_ok)
    else:
        g1 = tl.load(a_k, mask=row_ok, other=0.0).to(tl.float32)
        g2 = tl.load(a_k + HALF_D, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(x_k, (g1 * c + g2 * s).to(x_ptr.dtype.element_ty), mask=row_ok)
        tl.store(x_k + HALF_D, (g2 * c - g1 * s).to(x_ptr.dtype.element_ty), mask=row_ok)
        tl.store(x_v, tl.load(b_v, mask=row_ok, other=0.0), mask=row_ok)
        tl.store(x_v + HALF_D, tl.load(b_v + HALF_D, mask=row_ok, other=0.0), mask=row_ok)


# =========================================================================== decode (split-K)
#
# A decode step (or a chunk of a few rows) has too few query rows to fill the machine with row
# blocks, so the keys are split across programs instead (flash-decoding), then merged.
#
# Work of one K/V head: a list of ``n_items`` chunks of at most ``chunk`` keys.  Item ``j <
# B * n_text`` is text chunk ``j % n_text`` of sample ``j // n_text``; the items after them are the
# visual chunks, sample after sample (sample b has ``cdiv(n_b * T, chunk)``; the launcher's count is
# an upper bound for B > 1, the items past the real ones exit).  The launcher picks ``chunk`` from the
# shapes alone (no host sync) so that ``n_items * H_kv`` programs fit the GPU's resident CTA slots in
# one wave.
#
# Visible images of a row: image positions are strictly increasing within a sample and below L_k,
# so image ``img_hi - 1 - j`` sits at or before position ``L_k - 1 - j`` and every row (the last L_q
# positions) sees it when ``j >= L_q`` (strict) or ``j >= L_q - 1`` (inclusive).  Only the positions of
# the sample's last L_q (L_q - 1) images are read, in one vector load -- none at all for a one-row
# step with the inclusive rule -- instead of a loop over every image.


@triton.jit
def _decode_visual_splits(cu_ptr, B, T, chunk, BLOCK_B: tl.constexpr):
    """Per sample (a ``[BLOCK_B]`` vector, ``BLOCK_B >= B``; lanes past B are empty): its first and
    end image, its number of visual chunks and the index of its first one among all samples' visual
    chunks (exclusive prefix sum).  One vector load of ``cu``."""
    offs = tl.arange(0, BLOCK_B)
    ok = offs < B
    img_lo = tl.load(cu_ptr + offs, mask=ok, other=0)
    img_hi = tl.load(cu_ptr + offs + 1, mask=ok, other=0)
    n_chunks = tl.cdiv((img_hi - img_lo) * T, chunk)
    first = tl.cumsum(n_chunks, axis=0) - n_chunks
    return offs, img_lo, img_hi, n_chunks, first


@triton.jit
def _decode_visible_images(pos_ptr, img_lo, img_hi, t, n_uncertain, load_ok,
                           INCLUSIVE: tl.constexpr, BLOCK_W: tl.constexpr):
    """How many of the sample's images ``[img_lo, img_hi)`` rows at positions ``t`` see (a prefix):
    all but those of the last ``n_uncertain`` images that lie at or after ``t`` (after, inclusive);
    see the section comment.  ``BLOCK_W >= n_uncertain`` (0: nothing to read)."""
    n = img_hi - img_lo
    cnt = (n + tl.zeros(t.shape, tl.int32)).to(tl.int32)
    if BLOCK_W > 0:
        offs = tl.arange(0, BLOCK_W)
        ok = (offs < tl.minimum(n, n_uncertain)) & load_ok
        p = tl.load(pos_ptr + img_hi - 1 - offs, mask=ok, other=0).to(tl.int32)
        if INCLUSIVE:
            unseen = p[None, :] > t[:, None]
        else:
            unseen = p[None, :] >= t[:, None]
        cnt -= tl.sum((unseen & ok[None, :]).to(tl.int32), axis=1)
    return cnt


@triton.jit
def _decode_tiles(acc, m_i, l_i, q, k_base, v_base, k_offs, v_offs, stride_kn, stride_vn, lo, hi, n_tiles, lim,
                  full, kpm_base, kpm_offs, stride_kpn, use_kpm, qk_scale,
                  HAS_KPM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online-softmax update of ``(acc, m_i, l_i)`` (``m_i`` base 2, scaled) with keys ``[lo, hi)``:
    ``n_tiles`` BLOCK_N tiles from ``lo`` (tiles past ``hi`` load nothing and change nothing; the
    trip count is the same in every program, so the loop's bookkeeping stays in uniform registers).
    Key j is visible from row r iff ``j < lim[r]`` (``lim <= hi``) and, when ``use_kpm``,
    ``kpm[j]``.  Every row sees every key below ``full`` (``lo`` when ``use_kpm``): a tile there skips
    the mask.

    One loop serves text and visual keys (the program's bases and strides say which), so the
    software pipeline's K/V buffers are allocated once.  ``k_offs [D, BLOCK_N]``, ``v_offs
    [BLOCK_N, D]`` and ``kpm_offs [BLOCK_N]`` are a tile's element offsets from its first key
    (loop-invariant, int32 unless the launcher asks for int64); each tile moves the int64 base."""
    for it in range(0, n_tiles):
        start = lo + it * BLOCK_N
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        s64 = tl.cast(start, tl.int64)
        k = tl.load(k_base + s64 * stride_kn + k_offs, mask=n_ok[None, :], other=0.0)
        v = tl.load(v_base + s64 * stride_vn + v_offs, mask=n_ok[:, None], other=0.0)
        if HAS_KPM:  # (text keys only: a visual program skips the byte loads)
            keep = offs_n >= 0
            if use_kpm:
                keep = tl.load(kpm_base + s64 * stride_kpn + kpm_offs, mask=n_ok, other=1) != 0
        qk = tl.dot(q, k, input_precision=DOT_PRECISION)
        if start + BLOCK_N > full:
            visible = offs_n[None, :] < lim[:, None]
            if HAS_KPM:
                visible = visible & keep[None, :]
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * qk_scale - m_base[:, None])
        alpha = tl.math.exp2(m_i - m_base)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _hyper_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, kv_ptr, vv_ptr, pos_ptr, cu_ptr, kpm_ptr, part_ptr,
    B, N, Lq, Lk, G, T, chunk, n_text, n_uncertain,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_kvn, stride_kvh, stride_kvd,
    stride_vvn, stride_vvh, stride_vvd,
    stride_kpb, stride_kpn,
    qk_scale,
    INCLUSIVE: tl.constexpr, HAS_KPM: tl.constexpr, SINGLE_SAMPLE: tl.constexpr, WIDE_TILE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Split-K partials of a few query rows against one chunk of keys.

    Grid ``(n_items, H_kv)``: program (j, hk) runs item j (see the section comment) for K/V head hk.
    Its rows are the ``R = G * L_q`` (query head, query row) pairs sharing hk (row ``r`` = head
    ``hk*G + r // L_q``, query ``r % L_q``), so each K/V byte is read once per group.  It writes the
    unnormalised ``(acc [R, D], m [R], l [R])`` (base-2 max) of its chunk to
    ``part[hk, j] = [acc | m | l]`` (``R * (D + 2)`` floats), which
    :func:`_hyper_decode_merge_kernel` combines.  ``SINGLE_SAMPLE``: B = 1, whose images are all N
    (``cu = [0, N]``), so ``cu`` is not read.
    """
    item = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)  # int64: h * (a head-major view's head stride) can pass 2^31
    n_items = tl.num_programs(0)
    R = G * Lq
    text_items = B * n_text
    is_text = item < text_items
    vi = item - text_items
    # ---- which sample and keys: text items from the shapes, visual ones from cu's prefix sums
    if SINGLE_SAMPLE:
        b_vis = 0
        img_lo = 0
        img_hi = N
        v_split = vi
    else:
        offs_b, lo_b, hi_b, nc_b, first_b = _decode_visual_splits(cu_ptr, B, T, chunk, BLOCK_B)
        b_vis = tl.sum((first_b + nc_b <= vi).to(tl.int32), axis=0)  # samples whose chunks end by vi
        sel = offs_b == b_vis
        img_lo = tl.sum(tl.where(sel, lo_b, 0), axis=0)
        img_hi = tl.sum(tl.where(sel, hi_b, 0), axis=0)
        v_split = vi - tl.sum(tl.where(sel, first_b, 0), axis=0)
    b = tl.where(is_text, item // n_text, b_vis)
    if b < B:  # visual items past the real ones (B > 1: the count is an upper bound) do nothing
        b64 = b.to(tl.int64)
        r = tl.arange(0, BLOCK_M)
        row_ok = r < R
        i = r % Lq
        h = hk * G + r // Lq
        t = i + (Lk - Lq)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        if WIDE_TILE:  # a key stride so large that BLOCK_N of them pass 2^31 elements
            offs_n = offs_n.to(tl.int64)
        q = tl.load(q_ptr + b64 * stride_qb + h[:, None] * stride_qh + i[:, None].to(tl.int64) * stride_qm
                    + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
        # text: causal limit t + 1; visual: the end of the row's visible images
        t_lo = (item - b * n_text) * chunk
        t_hi = tl.minimum(t_lo + chunk, Lk)
        v_lo = img_lo * T + v_split * chunk
        v_hi = tl.minimum(v_lo + chunk, img_hi * T)
        cnt = _decode_visible_images(pos_ptr, img_lo, img_hi, t, n_uncertain, item >= text_items, INCLUSIVE,
                                     BLOCK_W)
        lo = tl.where(is_text, t_lo, v_lo)
        hi = tl.where(is_text, t_hi, v_hi)
        lim = tl.minimum(tl.where(is_text, t + 1, (img_lo + cnt) * T), hi)
        full = tl.min(tl.where(row_ok, lim, hi), axis=0)
        if HAS_KPM:  # text tiles all take the masked path
            full = tl.where(is_text, lo, full)
        k_base = tl.where(is_text, k_ptr + b64 * stride_kb + hk * stride_kh, kv_ptr + hk * stride_kvh)
        v_base = tl.where(is_text, v_ptr + b64 * stride_vb + hk * stride_vh, vv_ptr + hk * stride_vvh)
        stride_kn_ = tl.where(is_text, stride_kn, stride_kvn)
        stride_vn_ = tl.where(is_text, stride_vn, stride_vvn)
        k_offs = offs_n[None, :] * stride_kn_ + offs_d[:, None] * tl.where(is_text, stride_kd, stride_kvd)
        v_offs = offs_n[:, None] * stride_vn_ + offs_d[None, :] * tl.where(is_text, stride_vd, stride_vvd)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc, m_i, l_i = _decode_tiles(acc, m_i, l_i, q, k_base, v_base, k_offs, v_offs, stride_kn_, stride_vn_,
                                      lo, hi, chunk // BLOCK_N, lim, full, kpm_ptr + b64 * stride_kpb,
                                      offs_n * stride_kpn, stride_kpn, is_text, qk_scale,
                                      HAS_KPM, BLOCK_N, DOT_PRECISION)
        part = part_ptr + (hk * n_items + item) * (R * (BLOCK_D + 2))
        tl.store(part + r[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(part + R * BLOCK_D + r, m_i, mask=row_ok)
        tl.store(part + R * (BLOCK_D + 1) + r, l_i, mask=row_ok)


@triton.jit
def _decode_merge_part(m_s, l_s, acc_s, take):
    """Softmax merge of the partials ``take`` selects: ``(o, lse)`` with ``lse`` natural log (-inf and
    o = 0 when no key was visible).  Every partial is rescaled to the global max at once."""
    m_s = tl.where(take, m_s, float("-inf"))
    m = tl.max(m_s, axis=0)
    w = tl.math.exp2(m_s - tl.where(m == float("-inf"), 0.0, m))
    l = tl.sum(w * tl.where(take, l_s, 0.0), axis=0)
    acc = tl.sum(w[:, None] * tl.where(take[:, None], acc_s, 0.0), axis=0)
    has = l > 0.0
    o = acc / tl.where(has, l, 1.0)
    lse = tl.where(has, (m + tl.math.log2(tl.where(has, l, 1.0))) * 0.6931471805599453, float("-inf"))
    return o, lse


@triton.jit
def _hyper_decode_merge_kernel(
    part_ptr, pos_ptr, cu_ptr, gate_ptr,
    out_ptr, ot_ptr, ov_ptr, lse_ptr,
    B, N, Lq, Lk, H, G, T, chunk, n_text, n_items, n_uncertain,
    stride_gb, stride_gm, stride_gh, stride_gd,
    stride_ob, stride_om, stride_oh,
    stride_ls, stride_lb, stride_lh,
    GATED: tl.constexpr, INCLUSIVE: tl.constexpr, SAVE_PARTS: tl.constexpr, SINGLE_SAMPLE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Combine the split partials of one query row: grid ``(D / BLOCK_DM, L_q, B * H)``, program (c,
    i, bh) writes channels ``[c*BLOCK_DM, (c+1)*BLOCK_DM)`` of row i of sample ``b = bh // H``, head
    ``h = bh % H``.  Slot s of the row is its sample's text chunk s (``s < n_text``), then its visual
    chunks; every slot's (m, l, acc) is loaded at once (``BLOCK_S`` >= the slots of any sample), so
    the dependent round trips are: cu (B > 1 only), then the partials (and gate, positions), then the
    store.  Gated: the text slots into ``o_t``, the visual ones into ``o_v``, then the forward's
    epilogue; joint: all slots into one softmax.  A fixed reduction order: deterministic."""
    c = tl.program_id(0)
    i = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = (pid_bh % H).to(tl.int64)  # int64: h * (a head-major view's head stride) can pass 2^31
    b64 = b.to(tl.int64)
    hk = h // G
    R = G * Lq
    r = (h % G) * Lq + i
    if SINGLE_SAMPLE:
        img_lo = 0
        img_hi = N
        v_first = 0
    else:
        offs_b, lo_b, hi_b, nc_b, first_b = _decode_visual_splits(cu_ptr, B, T, chunk, BLOCK_B)
        sel = offs_b == b
        img_lo = tl.sum(tl.where(sel, lo_b, 0), axis=0)
        img_hi = tl.sum(tl.where(sel, hi_b, 0), axis=0)
        v_first = tl.sum(tl.where(sel, first_b, 0), axis=0)
    n_vis = tl.cdiv((img_hi - img_lo) * T, chunk)
    s = tl.arange(0, BLOCK_S)
    is_text = s < n_text
    is_vis = (s >= n_text) & (s < n_text + n_vis)
    item = tl.where(is_text, b * n_text + s, B * n_text + v_first + (s - n_text))
    part = part_ptr + (hk * n_items + item.to(tl.int64)) * (R * (BLOCK_D + 2))
    valid = is_text | is_vis
    offs_d = c * BLOCK_DM + tl.arange(0, BLOCK_DM)
    if GATED:  # (loaded first: the same round trip as the partials)
        cnt = _decode_visible_images(pos_ptr, img_lo, img_hi, tl.full((1,), Lk - Lq, tl.int32) + i, n_uncertain,
                                     True, INCLUSIVE, BLOCK_W)
        g = tl.load(gate_ptr + b64 * stride_gb + h * stride_gh + i.to(tl.int64) * stride_gm
                    + offs_d * stride_gd).to(tl.float32)
    acc_s = tl.load(part[:, None] + r * BLOCK_D + offs_d[None, :], mask=valid[:, None], other=0.0)
    m_s = tl.load(part + R * BLOCK_D + r, mask=valid, other=float("-inf"))
    l_s = tl.load(part + R * (BLOCK_D + 1) + r, mask=valid, other=0.0)
    o_offs = b64 * stride_ob + h * stride_oh + i.to(tl.int64) * stride_om + offs_d
    lse_off = b64 * stride_lb + h * stride_lh + i
    first_chunk = c == 0
    if GATED:
        o_t, lse_t = _decode_merge_part(m_s, l_s, acc_s, is_text)
        o_v, lse_v = _decode_merge_part(m_s, l_s, acc_s, is_vis)
        sg = 1.0 / (1.0 + tl.math.exp(-g))
        out = tl.where(tl.sum(cnt, axis=0) > 0, o_t + sg * (o_v - o_t), o_t)
        tl.store(lse_ptr + lse_off, lse_t, mask=first_chunk)
        tl.store(lse_ptr + stride_ls + lse_off, lse_v, mask=first_chunk)
        if SAVE_PARTS:
            tl.store(ot_ptr + o_offs, o_t.to(ot_ptr.dtype.element_ty))
            tl.store(ov_ptr + o_offs, o_v.to(ov_ptr.dtype.element_ty))
    else:
        out, lse_j = _decode_merge_part(m_s, l_s, acc_s, valid)
        tl.store(lse_ptr + lse_off, lse_j, mask=first_chunk)
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty))


# =========================================================================== text RoPE (q, k of the module)

@triton.jit
def _rope_kernel(
    x_ptr, pos_ptr, inv_freq_ptr, out_ptr,
    R, L,
    stride_xb, stride_xl, stride_xh, stride_xd,
    stride_pb, stride_pl,
    stride_ob, stride_ol, stride_oh,
    SIGN: tl.constexpr, HALF_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Rotate-half RoPE of ``x [B, L, H, D]`` at ``pos [B, L]`` in float32 (``SIGN = -1``: the
    inverse rotation, i.e. the backward).  Grid ``(cdiv(B*L, BLOCK_R), H)``::

        o1 = x1 cos - SIGN x2 sin,   o2 = x2 cos + SIGN x1 sin,   angle_i = pos * inv_freq[i]
    """
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)  # int64: h * (a head-major view's head stride) can pass 2^31
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    b = (r // L).to(tl.int64)
    l = (r % L).to(tl.int64)
    p = tl.load(pos_ptr + b * stride_pb + l * stride_pl, mask=r_ok, other=0).to(tl.float32)
    offs = tl.arange(0, HALF_D)
    ang = p[:, None] * tl.load(inv_freq_ptr + offs)[None, :]
    c = tl.cos(ang)
    s = tl.sin(ang)
    x_base = x_ptr + (b * stride_xb + l * stride_xl + h * stride_xh)[:, None] + offs[None, :] * stride_xd
    x1 = tl.load(x_base, mask=r_ok[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(x_base + HALF_D * stride_xd, mask=r_ok[:, None], other=0.0).to(tl.float32)
    o_base = out_ptr + (b * stride_ob + l * stride_ol + h * stride_oh)[:, None] + offs[None, :]
    tl.store(o_base, (x1 * c - SIGN * x2 * s).to(out_ptr.dtype.element_ty), mask=r_ok[:, None])
    tl.store(o_base + HALF_D, (x2 * c + SIGN * x1 * s).to(out_ptr.dtype.element_ty), mask=r_ok[:, None])
