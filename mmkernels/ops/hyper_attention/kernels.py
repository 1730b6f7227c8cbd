"""Triton kernels for Hyper Attention (mPLUG-Owl3 gated / joint cross-attention with MI-RoPE).

Layouts (strides passed explicitly, so permuted views need no copy):
``q [B, L_q, H, D]``, ``k, v [B, L_k, H_kv, D]``, the visual keys/values flattened over images
``kv, vv [N*T, H_kv, D]`` (row ``n*T + s`` = token ``s`` of image ``n``), ``pos [N]`` (the
``<|image|>`` sequence index of each image), ``cu [B+1]`` (images of sample b are
``cu[b]:cu[b+1]``), ``gate`` expanded to ``[B, L_q, H, D]`` (zero strides on broadcast dims),
``kpm [B, L_k]`` (uint8 key padding mask, 1 = keep), ``lse [S, B, H, L_q]`` float32, natural log
(S = 2 rows text/visual in gated mode, 1 in joint mode).

Query row ``i`` is at absolute position ``t = L_k - L_q + i`` (the queries are the last rows of
the keys).  Both key sets are masked by one rule, "key ``j`` is visible from row r iff
``j < lim[r]``", with

* text keys: ``lim = t + 1`` (causal), plus the key padding mask;
* visual keys of the sample, flattened from ``cu[b]*T``: ``lim = (cu[b] + c(t)) * T`` where
  ``c(t)`` = number of the sample's images with ``pos < t`` (strict) / ``pos <= t`` (inclusive).
  Positions increase within a sample, so the visible images are always a prefix: the layout is read
  as metadata (O(n_images) scalar loads per program) and never expanded into a dense mask.

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
LN2 = 0.6931471805599453


@triton.jit
def _visible_counts(pos_ptr, img_lo, img_hi, t, INCLUSIVE: tl.constexpr):
    """Per row: how many of the sample's images (``pos[img_lo:img_hi]``) row position ``t`` sees."""
    cnt = tl.zeros(t.shape, dtype=tl.int32)
    for n in range(img_lo, img_hi):
        p = tl.load(pos_ptr + n).to(tl.int32)
        if INCLUSIVE:
            cnt += (p <= t).to(tl.int32)
        else:
            cnt += (p < t).to(tl.int32)
    return cnt


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
            visible = offs_n[None, :] < lim[:, None]
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


@triton.jit
def _visual_range(pos_ptr, cu_ptr, b, t, row_ok, T, INCLUSIVE: tl.constexpr):
    """Per-row visual limit ``lim`` and the block's key ranges: ``[lo, full)`` is seen by every
    valid row, ``[full, hi)`` needs the mask.  Also returns the per-row visible image counts."""
    img_lo = tl.load(cu_ptr + b)
    img_hi = tl.load(cu_ptr + b + 1)
    cnt = _visible_counts(pos_ptr, img_lo, img_hi, t, INCLUSIVE)
    lim = (img_lo + cnt) * T
    lo = img_lo * T
    hi = tl.max(tl.where(row_ok, lim, lo), axis=0)
    full = tl.min(tl.where(row_ok, lim, hi), axis=0)
    return cnt, lim, lo, full, hi


@triton.jit
def _hyper_fwd_kernel(
    q_ptr, k_ptr, v_ptr, kv_ptr, vv_ptr, pos_ptr, cu_ptr, gate_ptr, kpm_ptr,
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
    GATED: tl.constexpr, INCLUSIVE: tl.constexpr, HAS_KPM: tl.constexpr, SAVE_PARTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fused forward, both modes.

    Grid: ``(cdiv(L_q, BLOCK_M), B * H)``; program (i, bh) owns query rows ``[i*BM, (i+1)*BM)`` of
    sample ``b = bh // H``, head ``h = bh % H``.  It first walks the visible visual key tiles, then
    the causal text key tiles:

    * gated (v1): two online-softmax states, one after the other (the visual one is normalised and
      rounded to the output dtype before the text loop); epilogue
      ``out = o_t`` if the row sees no image else ``(1 - sigmoid(g)) * o_t + sigmoid(g) * o_v``
      (the text state is computed exactly as for plain causal attention, so rows before the first
      image are bit-identical to it);
    * joint (v2): one state carried from the visual tiles into the text tiles (= one softmax over
      the concatenated keys, the reference's ``cat([visual K ; text K])``).

    Writes ``lse`` (natural log, -inf for a row with no visible key, whose output is 0) and, when
    ``SAVE_PARTS`` (gated training), ``o_t``/``o_v`` for the backward.
    """
    # Later row blocks see more keys (causal text, more images): launch them first.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = (pid_bh % H).to(tl.int64)  # int64: h * (a head-major view's head stride) can pass 2^31
    hk = h // G
    b64 = b.to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    offs_d = tl.arange(0, BLOCK_D)
    shift = Lk - Lq
    t = rows + shift
    o_offs = b64 * stride_ob + h * stride_oh + rows[:, None].to(tl.int64) * stride_om + offs_d[None, :]
    lse_offs = b64 * stride_lb + h * stride_lh + rows

    q = tl.load(q_ptr + b64 * stride_qb + h * stride_qh + rows[:, None].to(tl.int64) * stride_qm
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)

    # ---- visual keys of this sample (a per-row prefix of its images)
    cnt, lim_v, v_lo, v_full, v_hi = _visual_range(pos_ptr, cu_ptr, b, t, row_ok, T, INCLUSIVE)
    kv_base = kv_ptr + hk * stride_kvh
    vv_base = vv_ptr + hk * stride_vvh
    acc_v = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_v = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_v = tl.zeros((BLOCK_M,), dtype=tl.float32)
    v_mid = v_lo + ((v_full - v_lo) // BLOCK_N) * BLOCK_N
    acc_v, m_v, l_v = _attend_tiles(acc_v, m_v, l_v, q, kv_base, vv_base, stride_kvn, stride_kvd,
                                    stride_vvn, stride_vvd, v_lo, v_mid, lim_v, kpm_ptr, 0, qk_scale, offs_d,
                                    BLOCK_N, False, False, DOT_PRECISION)
    acc_v, m_v, l_v = _attend_tiles(acc_v, m_v, l_v, q, kv_base, vv_base, stride_kvn, stride_kvd,
                                    stride_vvn, stride_vvd, v_mid, v_hi, lim_v, kpm_ptr, 0, qk_scale, offs_d,
                                    BLOCK_N, True, False, DOT_PRECISION)

    # ---- causal text keys
    if GATED:
        # Finish the visual part now (kept in the output dtype) so its fp32 accumulator is dead
        # before the text accumulator is live: one [BM, D] fp32 tile of registers, not two.
        has_v = l_v > 0.0
        o_v = (acc_v / tl.where(has_v, l_v, 1.0)[:, None]).to(out_ptr.dtype.element_ty)
        lse_v = tl.where(has_v, (m_v + tl.math.log2(tl.where(has_v, l_v, 1.0))) * 0.6931471805599453,
                         float("-inf"))
        tl.store(lse_ptr + stride_ls + lse_offs, lse_v, mask=row_ok)
        acc_t = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        m_t = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    else:
        acc_t, m_t, l_t = acc_v, m_v, l_v
    lim_t = t + 1
    t_first = pid_m * BLOCK_M + shift
    t_end = tl.minimum(pid_m * BLOCK_M + BLOCK_M, Lq) + shift  # one past the block's last key
    t_mid = ((t_first + 1) // BLOCK_N) * BLOCK_N
    k_base = k_ptr + b64 * stride_kb + hk * stride_kh
    v_base = v_ptr + b64 * stride_vb + hk * stride_vh
    kpm_base = kpm_ptr + b64 * stride_kpb
    acc_t, m_t, l_t = _attend_tiles(acc_t, m_t, l_t, q, k_base, v_base, stride_kn, stride_kd, stride_vn,
                                    stride_vd, 0, t_mid, lim_t, kpm_base, stride_kpn, qk_scale, offs_d,
                                    BLOCK_N, False, HAS_KPM, DOT_PRECISION)
    acc_t, m_t, l_t = _attend_tiles(acc_t, m_t, l_t, q, k_base, v_base, stride_kn, stride_kd, stride_vn,
                                    stride_vd, t_mid, t_end, lim_t, kpm_base, stride_kpn, qk_scale, offs_d,
                                    BLOCK_N, True, HAS_KPM, DOT_PRECISION)

    # ---- epilogue
    has_t = l_t > 0.0
    o_t = acc_t / tl.where(has_t, l_t, 1.0)[:, None]
    lse_t = tl.where(has_t, (m_t + tl.math.log2(tl.where(has_t, l_t, 1.0))) * 0.6931471805599453,
                     float("-inf"))
    tl.store(lse_ptr + lse_offs, lse_t, mask=row_ok)
    if GATED:
        g = tl.load(gate_ptr + b64 * stride_gb + h * stride_gh + rows[:, None].to(tl.int64) * stride_gm
                    + offs_d[None, :] * stride_gd, mask=row_ok[:, None], other=0.0).to(tl.float32)
        sg = 1.0 / (1.0 + tl.math.exp(-g))
        mixed = o_t + sg * (o_v.to(tl.float32) - o_t)
        out = tl.where((cnt > 0)[:, None], mixed, o_t)
        if SAVE_PARTS:
            tl.store(ot_ptr + o_offs, o_t.to(ot_ptr.dtype.element_ty), mask=row_ok[:, None])
            tl.store(ov_ptr + o_offs, o_v, mask=row_ok[:, None])
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
def _hyper_bwd_pre_kernel(
    do_ptr, out_ptr, ot_ptr, ov_ptr, gate_ptr, pos_ptr, cu_ptr,
    dot_ptr, dov_ptr, delta_ptr, dg_ptr,
    Lq, Lk, H,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_gb, stride_gm, stride_gh, stride_gd,
    stride_ob, stride_om, stride_oh,
    stride_ls, stride_lb, stride_lh,
    GATED: tl.constexpr, INCLUSIVE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row statistics of the backward.  Grid ``(cdiv(L_q, BLOCK_M), B * H)``.

    Joint: ``delta = rowsum(dO * out)``.  Gated: the two part gradients ``dO_t``, ``dO_v`` (written
    in the input dtype, contiguous ``[B, L_q, H, D]`` like ``out``), their deltas, and the
    elementwise ``d(gate)`` in float32 (reduced to the gate's shape on the host).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = (pid_bh % H).to(tl.int64)  # int64: h * (a head-major view's head stride) can pass 2^31
    b64 = b.to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    offs_d = tl.arange(0, BLOCK_D)
    r64 = rows[:, None].to(tl.int64)
    do = tl.load(do_ptr + b64 * stride_dob + h * stride_doh + r64 * stride_dom + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    o_offs = b64 * stride_ob + h * stride_oh + r64 * stride_om + offs_d[None, :]
    lse_offs = b64 * stride_lb + h * stride_lh + rows
    if GATED:
        img_lo = tl.load(cu_ptr + b)
        img_hi = tl.load(cu_ptr + b + 1)
        cnt = _visible_counts(pos_ptr, img_lo, img_hi, rows + (Lk - Lq), INCLUSIVE)
        sees = (cnt > 0)[:, None]
        g = tl.load(gate_ptr + b64 * stride_gb + h * stride_gh + r64 * stride_gm + offs_d[None, :] * stride_gd,
                    mask=row_ok[:, None], other=0.0).to(tl.float32)
        sg = 1.0 / (1.0 + tl.math.exp(-g))
        o_t = tl.load(ot_ptr + o_offs, mask=row_ok[:, None], other=0.0).to(tl.float32)
        o_v = tl.load(ov_ptr + o_offs, mask=row_ok[:, None], other=0.0).to(tl.float32)
        do_t = tl.where(sees, do * (1.0 - sg), do)
        do_v = tl.where(sees, do * sg, 0.0)
        do_t_lp = do_t.to(dot_ptr.dtype.element_ty)
        do_v_lp = do_v.to(dov_ptr.dtype.element_ty)
        tl.store(dot_ptr + o_offs, do_t_lp, mask=row_ok[:, None])
        tl.store(dov_ptr + o_offs, do_v_lp, mask=row_ok[:, None])
        tl.store(delta_ptr + lse_offs, tl.sum(do_t_lp.to(tl.float32) * o_t, axis=1), mask=row_ok)
        tl.store(delta_ptr + stride_ls + lse_offs, tl.sum(do_v_lp.to(tl.float32) * o_v, axis=1), mask=row_ok)
        dg = tl.where(sees, do * (o_v - o_t) * sg * (1.0 - sg), 0.0)
        tl.store(dg_ptr + o_offs, dg, mask=row_ok[:, None])
    else:
        o = tl.load(out_ptr + o_offs, mask=row_ok[:, None], other=0.0).to(tl.float32)
        tl.store(delta_ptr + lse_offs, tl.sum(do * o, axis=1), mask=row_ok)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
              lo, hi, lim, kpm_base, stride_kpn, qk_scale, offs_d,
              BLOCK_N: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``dq += dS @ K`` over keys ``[lo, hi)`` (key j visible from row r iff ``j < lim[r]``)."""
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n64 = offs_n.to(tl.int64)
        n_ok = offs_n < hi
        k = tl.load(k_base + n64[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=n_ok[None, :], other=0.0)
        vT = tl.load(v_base + n64[None, :] * stride_vn + offs_d[:, None] * stride_vd, mask=n_ok[None, :], other=0.0)
        visible = offs_n[None, :] < lim[:, None]
        if HAS_KPM:
            keep = tl.load(kpm_base + n64 * stride_kpn, mask=n_ok, other=0) != 0
            visible = visible & keep[None, :]
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        p = tl.where(visible, tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), tl.trans(k), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _hyper_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, kv_ptr, vv_ptr, pos_ptr, cu_ptr, kpm_ptr,
    dot_ptr, dov_ptr, lse_ptr, delta_ptr, dq_ptr,
    Lq, Lk, H, G, T,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_kvn, stride_kvh, stride_kvd,
    stride_vvn, stride_vvh, stride_vvd,
    stride_kpb, stride_kpn,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_ls, stride_lb, stride_lh,
    stride_dqb, stride_dqm, stride_dqh,
    qk_scale, scale,
    GATED: tl.constexpr, INCLUSIVE: tl.constexpr, HAS_KPM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ.  Grid ``(cdiv(L_q, BLOCK_M), B * H)``, the forward's mapping: the block walks the same
    visible visual tiles and causal text tiles.  ``dot_ptr``/``dov_ptr`` are the text/visual part
    gradients (both = dO in joint mode); ``lse``/``delta`` rows 0/1 are text/visual (row 0 only,
    shared, in joint mode)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = (pid_bh % H).to(tl.int64)  # int64: h * (a head-major view's head stride) can pass 2^31
    hk = h // G
    b64 = b.to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    offs_d = tl.arange(0, BLOCK_D)
    r64 = rows[:, None].to(tl.int64)
    shift = Lk - Lq
    t = rows + shift
    q = tl.load(q_ptr + b64 * stride_qb + h * stride_qh + r64 * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    do_offs = b64 * stride_dob + h * stride_doh + r64 * stride_dom + offs_d[None, :] * stride_dod
    lse_offs = b64 * stride_lb + h * stride_lh + rows
    do_t = tl.load(dot_ptr + do_offs, mask=row_ok[:, None], other=0.0)
    lse_t = tl.load(lse_ptr + lse_offs, mask=row_ok, other=0.0) * 1.4426950408889634
    delta_t = tl.load(delta_ptr + lse_offs, mask=row_ok, other=0.0)
    if GATED:
        do_v = tl.load(dov_ptr + do_offs, mask=row_ok[:, None], other=0.0)
        lse_v = tl.load(lse_ptr + stride_ls + lse_offs, mask=row_ok, other=0.0) * 1.4426950408889634
        delta_v = tl.load(delta_ptr + stride_ls + lse_offs, mask=row_ok, other=0.0)
    else:
        do_v, lse_v, delta_v = do_t, lse_t, delta_t
    cnt, lim_v, v_lo, v_full, v_hi = _visual_range(pos_ptr, cu_ptr, b, t, row_ok, T, INCLUSIVE)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dq = _dq_tiles(dq, q, do_v, lse_v, delta_v, kv_ptr + hk * stride_kvh, vv_ptr + hk * stride_vvh,
                   stride_kvn, stride_kvd, stride_vvn, stride_vvd, v_lo, v_hi, lim_v, kpm_ptr, 0, qk_scale,
                   offs_d, BLOCK_N, False, DOT_PRECISION)
    t_end = tl.minimum(pid_m * BLOCK_M + BLOCK_M, Lq) + shift
    dq = _dq_tiles(dq, q, do_t, lse_t, delta_t, k_ptr + b64 * stride_kb + hk * stride_kh,
                   v_ptr + b64 * stride_vb + hk * stride_vh, stride_kn, stride_kd, stride_vn, stride_vd,
                   0, t_end, t + 1, kpm_ptr + b64 * stride_kpb, stride_kpn, qk_scale, offs_d,
                   BLOCK_N, HAS_KPM, DOT_PRECISION)
    dq = dq * scale
    tl.store(dq_ptr + b64 * stride_dqb + h * stride_dqh + r64 * stride_dqm + offs_d[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkv_rows(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_qd, stride_dom, stride_dod,
              m_lo, Lq, row_first, offs_n, key_ok, qk_scale, offs_d, shift,
              BLOCK_M: tl.constexpr, CAUSAL_SHIFT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate one key tile's ``dk``/``dv`` over query rows ``[m_lo, Lq)`` of one head.

    A row r sees the tile's key j iff ``r >= row_first`` (visual: the image's first seeing row) and,
    when ``CAUSAL_SHIFT``, ``j <= r + shift`` (causal text); ``key_ok`` folds in bounds and padding.
    """
    for start in range(m_lo, Lq, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = (rows < Lq) & (rows >= row_first)
        r64 = rows.to(tl.int64)
        qT = tl.load(q_base + r64[None, :] * stride_qm + offs_d[:, None] * stride_qd, mask=row_ok[None, :], other=0.0)
        do = tl.load(do_base + r64[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=row_ok[:, None],
                     other=0.0)
        lse2 = tl.load(lse_base + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        visible = key_ok[:, None] & row_ok[None, :]
        if CAUSAL_SHIFT:
            visible = visible & (offs_n[:, None] <= rows[None, :] + shift)
        sT = tl.dot(k, qT, input_precision=DOT_PRECISION) * qk_scale
        pT = tl.where(visible, tl.math.exp2(sT - lse2[None, :]), 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _hyper_bwd_dkv_kernel(
    q_ptr, k_ptr, v_ptr, kpm_ptr, pos_ptr, cu_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    Lq, Lk, H, G, T, B,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_kpb, stride_kpn,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_lb, stride_lh,
    stride_dkb, stride_dkn, stride_dkh,
    qk_scale, scale,
    VISUAL: tl.constexpr, INCLUSIVE: tl.constexpr, HAS_KPM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dK, dV of one key set, one program per (key tile, K/V head), looping over the G query heads
    that share the head and over every query block that sees the tile (no atomics).

    * text (``VISUAL=False``): grid ``(cdiv(L_k, BLOCK_N), B * H_kv)``; ``k [B, L_k, H_kv, D]``;
      rows from the first causal one (``i >= j - (L_k - L_q)``);
    * visual: grid ``(cdiv(T, BLOCK_N), N * H_kv)``; ``k`` is ``[N, T, H_kv, D]`` (the batch dim is
      the image); the image's sample b is found from ``cu``, and its rows are those at
      positions ``t > pos[n]`` (strict) / ``t >= pos[n]`` (inclusive): one contiguous range.

    ``lse``/``delta``/``do`` are the rows of the part these keys belong to.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    Hkv = H // G
    bn = pid_bh // Hkv      # sample (text) or image (visual)
    hk = (pid_bh % Hkv).to(tl.int64)  # int64: h * (a head-major view's head stride) can pass 2^31
    shift = Lk - Lq
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    bn64 = bn.to(tl.int64)
    n64 = offs_n.to(tl.int64)
    if VISUAL:
        L_keys = T
        b = pid_n * 0
        for i in range(0, B):
            b += (tl.load(cu_ptr + i + 1) <= bn).to(tl.int32)
        p = tl.load(pos_ptr + bn).to(tl.int32)
        if INCLUSIVE:
            row_first = p - shift
        else:
            row_first = p + 1 - shift
        row_first = tl.maximum(row_first, 0)
    else:
        L_keys = Lk
        b = bn
        row_first = tl.maximum(pid_n * BLOCK_N - shift, 0)
    b64 = b.to(tl.int64)
    key_ok = offs_n < L_keys
    if HAS_KPM:
        if not VISUAL:
            key_ok = key_ok & (tl.load(kpm_ptr + b64 * stride_kpb + n64 * stride_kpn, mask=key_ok, other=0) != 0)
    kv_offs = bn64 * stride_kb + hk * stride_kh + n64[:, None] * stride_kn + offs_d[None, :] * stride_kd
    k = tl.load(k_ptr + kv_offs, mask=key_ok[:, None], other=0.0)
    v = tl.load(v_ptr + bn64 * stride_vb + hk * stride_vh + n64[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=key_ok[:, None], other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    m_lo = (row_first // BLOCK_M) * BLOCK_M
    for g in range(0, G):
        h = hk * G + g
        q_base = q_ptr + b64 * stride_qb + h * stride_qh
        do_base = do_ptr + b64 * stride_dob + h * stride_doh
        lse_base = lse_ptr + b64 * stride_lb + h * stride_lh
        delta_base = delta_ptr + b64 * stride_lb + h * stride_lh
        dk, dv = _dkv_rows(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_qd,
                           stride_dom, stride_dod, m_lo, Lq, row_first, offs_n, key_ok, qk_scale, offs_d, shift,
                           BLOCK_M, not VISUAL, DOT_PRECISION)
    out_offs = bn64 * stride_dkb + hk * stride_dkh + n64[:, None] * stride_dkn + offs_d[None, :]
    tl.store(dk_ptr + out_offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=(offs_n < L_keys)[:, None])
    tl.store(dv_ptr + out_offs, dv.to(dv_ptr.dtype.element_ty), mask=(offs_n < L_keys)[:, None])


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
