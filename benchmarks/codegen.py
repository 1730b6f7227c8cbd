"""What the sm_90 code of the hot Triton kernels looks like, read without a GPU.

Every hot kernel is compiled for Hopper (``GPUTarget("cuda", 90, 32)``; Triton emits sm_90a) at the
configuration the launchers' per-arch tables pick for the benchmark shapes: the launchers run on
``meta`` tensors under a simulated H100, with every table lookup of the GEMM core (and of the
operators that read its arch) forced to the sm_90 entries (``mmkernels.ops._gemm.config.forced_arch``),
and their launches are recorded
(:mod:`benchmarks.offline_compile`, the mechanism ``tests/gpu_target_compile.py`` uses too).  Then
ptxas's ``-v`` log, the TTGIR and the SASS of each kernel are read, per kernel and per main loop, and
the structural targets in :mod:`benchmarks.codegen_targets` are checked::

    python -m benchmarks.codegen                      # the markdown table and the targets
    python -m benchmarks.codegen --only plora,moe/phi2/*   # operators, or op/case/role patterns
    python -m benchmarks.codegen --json out.json --dump DIR   # rows as JSON; TTGIR/PTX/SASS/ptxas logs
    python -m benchmarks.codegen --check              # exit 1 if a target fails or a known gap closed
    python -m benchmarks.codegen --gaps               # the failures, written as known-gap entries

Another Triton is analysed by putting it first on ``PYTHONPATH`` (the GPU machines run Triton 3.6).
On a GPU, :func:`device_rows` reads launches recorded with real tensors as that GPU compiles and loads
them (the ``-m gpu`` test in ``tests/test_codegen.py``).

The columns (counts are per warp and per iteration of the main loop: the innermost loop with the
most tensor-core work, the leanest of equals, without code a predicated forward branch skips):

* regs, spill: ptxas ``-v``; C7515: ptxas serialized the wgmma pipeline;
* smem: Triton's shared memory per CTA; CTA/SM: from 64K registers, 228 KB shared memory (1 KB
  reserved per CTA) and 64 warps, and what limits it; grid: programs and waves on 132 SMs;
* MMA: HGMMA (wgmma) or HMMA (mma.sync) shapes in the main loop, "RS" counting HGMMA with the A
  operand in registers; wgmma wait: the ``pendings`` of the waits in the loop (0: each dot waits for
  the previous one);
* loads: TMA (``UTMALDG``), cp.async (``LDGSTS``) and plain ``LDG`` in the main loop;
* bufs; wait: the shared-memory buffers of each operand the loop copies asynchronously, and the
  ``async_wait`` depth in it (0: it waits for every copy in flight at the top of each iteration);
* BAR: ``BAR`` barriers per iteration; dup: how many times a dot's work is replicated across warps
  (from the TTGIR layouts, e.g. 8 warps laid out ``[8, 1]`` on a 64-row tile compute it twice);
* instr: instructions per iteration (main loop; every MMA loop in address order after the slash);
* issue: instructions per useful tensor-core clock, HGMMA m*n*k of a warpgroup / 2048 FMA per clock
  per SM and HMMA m*n*k / 512 per clock per SM sub-partition, replicated work removed.  Each
  sub-partition issues one instruction per clock, so near or above 1 the loop cannot keep the tensor
  cores fed; about 0.2 is what a fast GEMM shows.  "worst" is the largest over the MMA loops;
* MUFU: the same ratio for MUFU (exp2, ...), at 8 clocks per warp instruction.

To add a kernel: launches of a case's launchers are picked up by themselves (row role = the kernel's
name); give the launch a role name in its case's ``roles`` below (a kernel launched more than once
in a case needs one), and add it to a target's row patterns in :mod:`benchmarks.codegen_targets`
if an existing pattern does not already cover it.  A new operator or shape is a new :class:`Case`.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import fnmatch
import json
import math
import os
import re
import sys
from typing import Callable

import torch

from . import codegen_targets

# ============================================================================================ cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark shape of an operator: ``run`` calls its launchers on meta tensors; ``roles``
    names each launch: kernel name -> the role of its 1st, 2nd, ... launch in the case (``None``: not
    analysed, e.g. a launch another case already shows).  A kernel not in ``roles`` gets its own name
    as role."""
    op: str
    name: str
    title: str
    run: Callable[[], None]
    roles: dict[str, tuple]


def _meta(*shape, dtype=torch.bfloat16, device="meta"):
    return torch.empty(*shape, dtype=dtype, device=device)


def _moe_bench():
    from mmkernels.ops.moe import launch
    E, M, N, K = 4, 32768, 10240, 2560
    offsets = _meta(E + 1, dtype=torch.int32)
    launch.grouped_gemm_forward(_meta(M, K), _meta(E, N, K), None, offsets)
    launch.grouped_gemm_backward(_meta(M, N), _meta(M, K), _meta(E, N, K), offsets, [True, True, False])


def _moe_layer(H, F, activation, bias):
    from mmkernels.ops.moe import launch
    from mmkernels.ops.moe.reference import GATED_ACTIVATIONS
    E, S, k = 4, 16384, 2
    F1 = 2 * F if activation in GATED_ACTIVATIONS else F
    offsets, slots = _meta(E + 1, dtype=torch.int32), _meta(S * k, dtype=torch.int32)
    weights, keep = _meta(S, k, dtype=torch.float32), _meta(S, k, dtype=torch.bool)
    x, w1, w2 = _meta(S, H), _meta(E, F1, H), _meta(E, H, F)
    b1, b2 = (_meta(E, F1), _meta(E, H)) if bias else (None, None)
    y, z, h, o = launch.moe_ffn_forward(x, weights, keep, slots, offsets, w1, b1, w2, b2, activation)
    launch.moe_ffn_backward(_meta(S, H), x, weights, keep, slots, offsets, w1, w2, z, h, o, activation,
                            [True, True, True, bias, True, bias])


def _plora_wqkv(dropout_p=0.0):
    from mmkernels.ops.plora import launch
    M, K, N, R = 8192, 4096, 6144, 256
    x, w, a, b = _meta(M, K), _meta(N, K), _meta(R, K), _meta(N, R)
    mask = _meta(M, dtype=torch.bool)
    flags = launch.tile_flags(mask)
    seed = keep_bits = None
    if dropout_p:    # the keep-mask, drawn once (as plora_linear does) and read by the shrink, dX and dA
        seed = _meta(1, dtype=torch.int64)
        keep_bits = launch.dropout_keep_bits(mask, flags, seed, M, K, dropout_p)
    y, s = launch.plora_forward(x, w, None, a, b, mask, flags, 2.0, dropout_p, seed, keep_bits)
    launch.plora_backward(_meta(M, N), x, w, a, b, s, mask, flags, 2.0, dropout_p, seed,
                          [True, True, False, True, True], keep_bits)


# hyper attention's cases: the 7B layer (heads, K/V heads, head dim, tokens per image) and its training
# shapes (mode, text tokens, images); tests/test_codegen.py runs the same steps on a GPU
HYPER_7B = (28, 4, 128, 729)
HYPER_TRAINING = {"joint": ("joint", 2048, 32), "gated": ("gated", 2048, 32), "causal4k": ("joint", 4096, 0)}


def _hyper_layer(mode, L, images, device="meta"):
    """One training step's launches (forward with the saved parts, backward); ``device``: where the
    (uninitialised) tensors live: meta for the offline table, a GPU for :func:`device_rows`."""
    from mmkernels.ops.hyper_attention import launch
    gated = mode == "gated"
    H, Hkv, D, T = HYPER_7B
    T = T if images else 1   # as the benchmark passes zero images

    def new(*shape, dtype=torch.bfloat16):
        return _meta(*shape, dtype=dtype, device=device)
    q, k, v = new(1, L, H, D), new(1, L, Hkv, D), new(1, L, Hkv, D)
    kv, vv = new(images, T, Hkv, D), new(images, T, Hkv, D)
    pos, cu = new(images, dtype=torch.int32), new(2, dtype=torch.int32)
    gate = new(H * D) if gated else None
    # the block classification, once per forward and kept for the backward (as the public function does)
    layout = launch.hyper_layout(pos, cu, L, L, T, not gated)
    out, o_t, o_v, lse = launch.hyper_forward(q, k, v, kv, vv, pos, cu, gate, None, gated, not gated, D ** -0.5,
                                              True, layout)
    launch.hyper_backward(new(1, L, H, D), q, k, v, kv, vv, pos, cu, gate, None, out, o_t, o_v, lse, gated,
                          not gated, D ** -0.5, layout)


# packed samples (hyper_attention_varlen): the same 7B layer, 2k text tokens in 8 samples of at most 512,
# and 32 images; the kernels are the dense ones compiled with VARLEN (the offsets read from cu_seqlens)
HYPER_VARLEN = {"varlen": ("joint", 2048, 8, 512, 32), "varlen_gated": ("gated", 2048, 8, 512, 32)}


def _hyper_varlen_layer(mode, total, samples, max_len, images, device="meta"):
    """One packed training step's launches (as :func:`_hyper_layer`).  The offsets are valid (equal samples
    of ``total // samples`` tokens, ``images // samples`` images each), so the launches can run on a GPU."""
    from mmkernels.ops.hyper_attention import launch
    gated = mode == "gated"
    H, Hkv, D, T = HYPER_7B

    def new(*shape, dtype=torch.bfloat16):
        return _meta(*shape, dtype=dtype, device=device)

    def steps(n, step):
        return torch.arange(n, dtype=torch.int32, device=device) * step
    q, k, v = new(total, H, D), new(total, Hkv, D), new(total, Hkv, D)
    kv, vv = new(images, T, Hkv, D), new(images, T, Hkv, D)
    per_sample = images // samples
    pos, cu = steps(images, 1) % per_sample * (total // samples // per_sample), steps(samples + 1, per_sample)
    cu_seq = steps(samples + 1, total // samples)
    packed = launch.Packed(cu_seq, cu_seq, max_len, max_len)
    gate = new(H * D) if gated else None
    layout = launch.hyper_layout(pos, cu, max_len, max_len, T, not gated, packed, total)
    out, o_t, o_v, lse = launch.hyper_forward(q, k, v, kv, vv, pos, cu, gate, None, gated, not gated, D ** -0.5,
                                              True, layout, packed)
    launch.hyper_backward(new(total, H, D), q, k, v, kv, vv, pos, cu, gate, None, out, o_t, o_v, lse, gated,
                          not gated, D ** -0.5, layout, packed)


def _hyper_decode():
    from mmkernels.ops.hyper_attention import launch
    (H, Hkv, D, T), L, images = HYPER_7B, 2048, 32
    q, k, v = _meta(1, 1, H, D), _meta(1, L, Hkv, D), _meta(1, L, Hkv, D)
    kv, vv = _meta(images, T, Hkv, D), _meta(images, T, Hkv, D)
    launch.hyper_forward(q, k, v, kv, vv, _meta(images, dtype=torch.int32), _meta(2, dtype=torch.int32), _meta(H * D),
                         None, True, False, D ** -0.5, False)


def _hyper_producers():
    from mmkernels.ops.hyper_attention import launch
    (H, Hkv, D, T), L, images = HYPER_7B, 2048, 32
    pos, inv_freq = _meta(images, dtype=torch.int32), _meta(D // 2, dtype=torch.float32)
    k_vis, v_vis = launch.visual_kv_rope(_meta(images * T, 2 * Hkv * D), _meta(images * T, dtype=torch.float32),
                                         _meta(2 * Hkv * D), pos, inv_freq, T, Hkv, 1)
    launch.visual_kv_rope_backward(k_vis, v_vis, pos, inv_freq, T, 1)
    launch.rope(_meta(1, L, H, D), torch.arange(L, device="meta").expand(1, L), inv_freq, False)


# The backward is one launch of two kinds of program (kernels._hyper_bwd_kernel): its row holds the
# dK/dV programs' MMA loops (partial row tiles, then full ones), then the dQ programs' (visual full,
# visual partial, text full, text diagonal), in address order.  In the causal case (no image) the
# preprocessing kernel is the joint one, so only the joint and gated cases show it.
_HYPER_ROLES = {"_hyper_layout_kernel": ("layout",), "_hyper_fwd_kernel": ("fwd",),
                "_hyper_bwd_pre_kernel": ("bwd_pre",), "_hyper_bwd_kernel": ("bwd",)}

CASES = [
    Case("moe", "bench", "grouped GEMM 32768x10240x2560, 4 experts (the grouped-GEMM benchmark)", _moe_bench,
         {"_gemm_kernel": ("gemm", "gemm_dA"), "_wgrad_kernel": ("gemm_dB",)}),
    Case("moe", "phi2", "phi-2 experts (E 4, H 2560, F 10240, gelu_tanh, biases), 16k tokens top-2, fwd+bwd",
         lambda: _moe_layer(2560, 10240, "gelu_tanh", True),
         {"_gemm_kernel": ("fc1", "fc2", "dZ", "dX"), "_wgrad_kernel": ("dW2", "dW1"),
          "_moe_combine_kernel": ("combine", "combine_dX"), "_moe_combine_bwd_kernel": ("combine_bwd",)}),
    Case("moe", "swiglu", "StableLM-2 SwiGLU experts (H 2048, F 5632, no bias), 16k tokens top-2, fwd+bwd",
         lambda: _moe_layer(2048, 5632, "swiglu", False),
         {"_gemm_kernel": ("gate_up", None, "dGU", None), "_wgrad_kernel": ("dW2", "dW1"),
          "_moe_combine_kernel": (None, None), "_moe_combine_bwd_kernel": (None,)}),
    Case("plora", "wqkv", "InternLM2-7B wqkv: 8192 tokens, 4096->6144, r 256, no bias, no dropout, fwd+bwd",
         _plora_wqkv,
         {"_plora_shrink_kernel": ("shrink",), "_gemm_kernel": ("fwd", "dS", "dX"), "_plora_bwd_dw_kernel": ("dW0",),
          # the visual-tile list is launched for dA's and dB's tile heights: one row shows it
          "_plora_visual_tiles_kernel": ("visual_tiles", None), "_plora_bwd_dlora_a_kernel": ("dA",),
          "_plora_bwd_dlora_b_kernel": ("dB",)}),
    Case("plora", "dropout", "the same in training with the models' LoRA dropout 0.05 (the launches that differ: "
         "the keep-mask drawn once, packed in bits, which the shrink, dX and dA read)",
         lambda: _plora_wqkv(dropout_p=0.05),
         {"_dropout_bits_kernel": ("keep_bits",), "_plora_shrink_kernel": ("shrink",), "_gemm_kernel": (None, None, "dX"), "_plora_bwd_dw_kernel": (None,),
          "_plora_visual_tiles_kernel": (None, None), "_plora_bwd_dlora_a_kernel": ("dA",),
          "_plora_bwd_dlora_b_kernel": (None,)}),
    Case("hyper_attention", "joint", "7B layer (H 28, H_kv 4, D 128, T 729), joint mode, 2k text + 32 images, "
         "fwd+bwd", lambda: _hyper_layer(*HYPER_TRAINING["joint"]), _HYPER_ROLES),
    Case("hyper_attention", "gated", "the same in gated mode (partial outputs saved for training)",
         lambda: _hyper_layer(*HYPER_TRAINING["gated"]), _HYPER_ROLES),
    Case("hyper_attention", "causal4k", "dense causal attention (no image), 4k tokens, fwd+bwd",
         lambda: _hyper_layer(*HYPER_TRAINING["causal4k"]), _HYPER_ROLES),
    Case("hyper_attention", "varlen", "packed samples (hyper_attention_varlen): the joint case's 2k text in 8 "
         "samples of at most 512, 32 images, fwd+bwd", lambda: _hyper_varlen_layer(*HYPER_VARLEN["varlen"]),
         _HYPER_ROLES),
    Case("hyper_attention", "varlen_gated", "the same in gated mode",
         lambda: _hyper_varlen_layer(*HYPER_VARLEN["varlen_gated"]), _HYPER_ROLES),
    Case("hyper_attention", "decode", "one query row after 2k text + 32 images (gated, inference)", _hyper_decode,
         {"_hyper_decode_split_kernel": ("split",), "_hyper_decode_merge_kernel": ("merge",)}),
    Case("hyper_attention", "producer", "the elementwise producers: MI-RoPE of 32 images' K/V (with RMSNorm scale "
         "and bias; and its backward), RoPE of 2k text queries", _hyper_producers,
         {"_visual_kv_rope_kernel": ("visual_kv_rope", "visual_kv_rope_bwd"), "_rope_kernel": ("rope",)}),
]
OPS = sorted({c.op for c in CASES})


def _default_role(kernel: str) -> str:
    return re.sub(r"_kernel$", "", kernel.lstrip("_"))


def record(case: Case):
    """``[(role, Launch)]`` of one case, in launch order (roles ``None`` dropped).  Raises if the
    case's ``roles`` no longer match its launches (a kernel launched a different number of times)."""
    from mmkernels.ops._gemm import config as gemm_config

    from .offline_compile import H100, recording, simulated_gpu
    # the GEMM core and the operators' own tables read the sm_90 entries (meta tensors have no arch)
    with simulated_gpu(H100), gemm_config.forced_arch("sm90", H100.sms), recording() as launches:
        try:
            case.run()
        except Exception as e:
            raise RuntimeError(f"benchmarks/codegen.py: case {case.op}/{case.name} could not run its launchers on "
                               f"meta tensors ({e!r}); update the case for the launcher's new signature") from e
    counts = collections.Counter(l.name for l in launches)
    stale = {name: (len(roles), counts.get(name, 0)) for name, roles in case.roles.items()
             if len(roles) != counts.get(name, 0)}
    if stale:
        raise RuntimeError(f"benchmarks/codegen.py: the roles of case {case.op}/{case.name} do not match its launches "
                           f"(kernel: roles given, launches recorded): {stale}; update Case.roles")
    seen = collections.Counter()
    out = []
    for launch in launches:
        roles = case.roles.get(launch.name)
        role = roles[seen[launch.name]] if roles else _default_role(launch.name)
        if roles is None and counts[launch.name] > 1:
            role = f"{role}#{seen[launch.name] + 1}"
        seen[launch.name] += 1
        if role is not None:
            out.append((role, launch))
    return out


# =========================================================================================== readers

def read_ptxas(log: str) -> dict:
    """Registers, spills, stack, static shared memory and the C7515 warning from ``ptxas -v``."""
    def number(pattern, default=0):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else default
    return dict(regs=number(r"Used (\d+) registers", None), stack=number(r"(\d+) bytes stack frame"),
                spill_stores=number(r"(\d+) bytes spill stores"), spill_loads=number(r"(\d+) bytes spill loads"),
                static_smem=number(r"(\d+) bytes smem"), c7515="C7515" in log)


_LAYOUT = re.compile(r"^(#mma\d*) = #ttg\.nvidia_mma<\{versionMajor = (\d+).*?warpsPerCTA = \[([\d, ]+)\]"
                     r".*?instrShape = \[([\d, ]+)\]", re.M)
_ALLOC = re.compile(r"^\s*(%[\w.]+) = ttg\.local_alloc\s*(?:%[\w.]+\s*)?:.*?->\s*!ttg\.memdesc<(\d+(?:x\d+)+)x\w+")
_VIEW = re.compile(r"^\s*(%[\w.]+)(?::\d+)? = ttg\.memdesc_\w+ (%[\w.]+)")   # a view (index, subview, trans)


def _dot(line: str, layouts: dict):
    """(m*n*k, replication) of a dot: its result ``tensor<MxNxf32, #mma>`` and A operand ``<MxK...>``.
    The layout's warps cover ``warpsPerCTA * instrShape[:2]`` (16 rows per warp); a dot smaller than
    that is computed by several warps at once."""
    res = re.search(r"->\s*tensor<(\d+)x(\d+)xf32, (#mma\d*)>", line)
    a = re.search(r":\s*(?:!ttg\.memdesc|tensor)<(\d+)x(\d+)x", line)
    if not (res and a and res.group(3) in layouts):
        return None
    M, N, K = int(res.group(1)), int(res.group(2)), int(a.group(2))
    (wm, wn), (im, in_) = layouts[res.group(3)]
    return M * N * K, max(1, wm * im // M) * max(1, wn * in_ // N)


def read_ttgir(text: str) -> dict:
    """The loops that hold a dot (innermost ``scf.for`` bodies, in text order): their dots and
    replication, async copies (cp.async, TMA), plain loads, the buffers of the shared-memory allocations
    they index, and the wait depths; plus the largest replication of any dot in the kernel."""
    layouts = {name: ([int(x) for x in wpc.split(",")][:2], [int(x) for x in shape.split(",")][:2])
               for name, _, wpc, shape in _LAYOUT.findall(text)}
    # Shared-memory operand buffers: a [buffers, rows, cols] allocation, and every view of it (e.g. the
    # slot a loop copies into) -> (allocation, buffers).  Names are scoped: sibling loop bodies reuse
    # them, so a loop sees the function's names and its own (and those of the loops around it).
    top: dict = {}
    loops, stack, depth, dup = [], [], 0, 1

    def lookup(name):
        for _, _, names in reversed(stack):
            if name in names:
                return names[name]
        return top.get(name)

    for line in text.splitlines():
        s = line.strip()
        names = stack[-1][2] if stack else top
        m = _ALLOC.match(line)
        if m and m.group(2).count("x") >= 2:
            names[m.group(1)] = (m.group(1), int(m.group(2).split("x")[0]))
        m = _VIEW.match(line)
        if m and lookup(m.group(2)):
            names[m.group(1)] = lookup(m.group(2))
        is_dot = "ttng.warp_group_dot " in s or re.search(r"= tt\.dot ", s)
        dot = _dot(s, layouts) if is_dot else None
        if dot:
            dup = max(dup, dot[1])
        if "scf.for" in s and s.endswith("{"):
            loops.append(dict(dots=[], cp_async=0, tma=0, plain_loads=0, buffers=set(), cp_async_wait=[],
                              wgmma_wait=[]))
            stack.append((depth + line.count("{") - line.count("}"), loops[-1], {}))
        elif stack:
            loop = stack[-1][1]
            if dot:
                loop["dots"].append(dot)
            if "ttg.async_copy_global_to_local" in s:
                loop["cp_async"] += 1
            if "async_tma_copy_global_to_local" in s or "tt.descriptor_load" in s:
                loop["tma"] += 1
            if re.search(r"= tt\.load ", s):
                loop["plain_loads"] += 1
            for name in re.findall(r"%[\w.]+", s):
                if lookup(name):
                    loop["buffers"].add(lookup(name))
            m = re.search(r"ttg\.async_wait .*\{num = (\d+)", s)
            if m:
                loop["cp_async_wait"].append(int(m.group(1)))
            m = re.search(r"warp_group_dot_wait .*pendings = (\d+)", s)
            if m:
                loop["wgmma_wait"].append(int(m.group(1)))
        depth += line.count("{") - line.count("}")
        while stack and depth < stack[-1][0]:
            stack.pop()
    mma_loops = []
    for loop in loops:
        if not loop["dots"]:
            continue
        fma = sum(f for f, _ in loop["dots"])
        loop["dup"] = round(sum(f * d for f, d in loop["dots"]) / fma, 2)
        loop["buffers"] = sorted(b for _, b in loop["buffers"])
        mma_loops.append(loop)
    return dict(loops=mma_loops, dup=dup)


_SASS = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T\d]+\s+)?([A-Z][\w.]*)\s*([^;]*);")


def _classes(op: str, operands: str) -> list[str]:
    base = op.split(".")[0]
    if base == "HGMMA":
        return ["HGMMA", "HGMMA_RS"] if re.match(r"R\d+, R\d+", operands) else ["HGMMA"]
    if base in ("LDS", "LDSM") and operands.startswith("RZ, [RZ]"):
        return []
    if base == "WARPGROUP" and "DEPBAR" in op:
        return ["WGMMA_WAIT"]
    return [{"UTMALDG": "TMA", "UBLKCP": "TMA", "LDSM": "LDS", "STL": "LOCAL", "LDL": "LOCAL", "SYNCS": "MBAR",
             "RED": "ATOM", "REDG": "ATOM", "ATOMG": "ATOM", "ATOMS": "ATOM"}.get(base, base)]


def _mma_shape(op: str):
    """(shape text, m*n*k, HGMMA?) of an MMA opcode: ``HGMMA.64x128x16.F32.BF16`` (a warpgroup's) or
    ``HMMA.16816.F32.BF16`` (a warp's m16 n8 k16)."""
    m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op)
    if m:
        return "x".join(m.groups()), math.prod(int(g) for g in m.groups()), True
    m = re.match(r"HMMA\.((\d\d)(\d)(\d+))", op)
    if m:
        return m.group(1), int(m.group(2)) * int(m.group(3)) * int(m.group(4)), False
    return None


def read_sass(text: str) -> tuple[list[dict], list[dict]]:
    """Per-iteration counts of the innermost SASS loops (back-edges) that issue MMAs, in address
    order, and of the innermost loops without MMAs that load from global memory.  Code inside a loop
    that a predicated forward branch jumps over (e.g. a persistent kernel's once-per-tile epilogue) is
    left out, unless the MMAs themselves sit in it.

    ptxas places the retry loop of an mbarrier wait (TMA) out of line: ``@!P BRA retry`` in the loop,
    and the retry block ends with an unconditional ``BRA`` back to the instruction after that branch.
    That backward jump closes no loop of its own, so it is not taken for a back-edge."""
    ins = [(int(m.group(1), 16), bool(m.group(2)), m.group(3), m.group(4).strip())
           for m in map(_SASS.match, text.splitlines()) if m]
    branches = {a: (p, int(t, 16)) for a, p, op, operands in ins if op.startswith("BRA")
                for t in re.findall(r"0x([0-9a-f]+)", operands)[:1]}

    def detour_return(a, t):   # the unconditional jump back from an out-of-line block
        predicated, _ = branches[a]
        before = branches.get(t - 16)    # the instruction before the target (16-byte instructions)
        return not predicated and before is not None and before[0] and t < before[1] <= a

    loops = sorted({(t, a) for a, (_, t) in branches.items() if t < a and not detour_return(a, t)})

    def counts(lo, hi, straight):
        skipped = [(a, int(t, 16)) for a, p, op, operands in ins if straight and p and lo <= a < hi
                   and op.startswith("BRA") for t in re.findall(r"0x([0-9a-f]+)", operands)[:1]
                   if a < int(t, 16) <= hi]
        c, shapes, clk = collections.Counter(), set(), 0.0
        for a, _, op, operands in ins:
            if lo <= a <= hi and not any(s < a < e for s, e in skipped):
                c["instr"] += 1
                for k in _classes(op, operands):
                    c[k] += 1
                shape = _mma_shape(op)
                if shape:
                    shapes.add(("HGMMA " if shape[2] else "HMMA ") + shape[0])
                    clk += shape[1] / 2048 if shape[2] else shape[1] / 512
        return c, shapes, clk

    mma, other = [], []
    for lo, hi in loops:
        full, shapes, clk = counts(lo, hi, False)
        nested = [(a, b) for a, b in loops if (a, b) != (lo, hi) and lo <= a and b <= hi]
        if not clk:
            c = counts(lo, hi, True)[0]
            if not nested and c["LDG"] + c["LDGSTS"] + c["TMA"]:
                other.append(dict(range=(lo, hi), counts=c, shapes=[], tensor_clk=0.0))
            continue
        if any(counts(a, b, False)[2] for a, b in nested):
            continue   # not innermost: a nested loop holds MMAs
        c, _, clk_straight = counts(lo, hi, True)
        if clk_straight != clk:
            c = full
        mma.append(dict(range=(lo, hi), counts=c, shapes=sorted(shapes), tensor_clk=clk))
    return mma, other


# ========================================================================================== analysis

def _occupancy(regs: int, smem: int, warps: int, machine) -> tuple[int, str]:
    regs_per_warp = max(8, -(-regs // 8) * 8) * 32
    limits = {"warps": machine.warps_per_sm // warps,      # on a tie, the first limit is named
              "smem": machine.smem_per_sm // (smem + machine.smem_reserved_per_cta),
              "regs": (machine.regs_per_sm // regs_per_warp) // warps, "CTAs": machine.ctas_per_sm}
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def _blocks(kwargs: dict) -> str:
    return " ".join(f"{k[6:]}={v}" for k, v in kwargs.items() if k.startswith("BLOCK_")) + (
        f" CHUNK={kwargs['CHUNK']}" if "CHUNK" in kwargs else "")


def analyse(case: Case, role: str, compiled, dump: str | None = None) -> dict:
    """One table row: the compiled launch read back."""
    from .offline_compile import H100, ptxas_log, sass
    kernel, launch = compiled.kernel, compiled.launch
    log, ttgir, sass_text = ptxas_log(compiled), kernel.asm["ttgir"], sass(compiled)
    if dump:
        os.makedirs(dump, exist_ok=True)
        stem = os.path.join(dump, f"{case.op}-{case.name}-{role}".replace("/", "_"))
        for ext, text in (("ttgir", ttgir), ("ptx", kernel.asm["ptx"]), ("sass", sass_text), ("ptxas.log", log)):
            with open(f"{stem}.{ext}", "w") as f:
                f.write(text)
    p, tg, (loops, load_loops) = read_ptxas(log), read_ttgir(ttgir), read_sass(sass_text)
    md = kernel.metadata
    smem = md.shared + p["static_smem"]
    ctas, limiter = _occupancy(p["regs"] or 0, smem, md.num_warps, H100)
    # SASS and TTGIR MMA loops correspond in order when there are as many of each; otherwise every
    # SASS loop takes the TTGIR loop with the most dots (its replication, buffers and waits)
    tg_loops = tg["loops"]
    fallback = max(tg_loops, key=lambda l: len(l["dots"]), default=None)
    for i, loop in enumerate(loops):
        loop["ttgir"] = tg_loops[i] if len(tg_loops) == len(loops) else fallback
        dup = loop["ttgir"]["dup"] if loop["ttgir"] else 1.0
        loop["useful_clk"] = loop["tensor_clk"] / dup
        loop["issue"] = round(loop["counts"]["instr"] / loop["useful_clk"], 2)
    main = min(loops, key=lambda l: (-l["tensor_clk"], l["counts"]["instr"]), default=None)
    # without an MMA loop, the busiest loop that loads from global memory stands for the main loop
    load_loop = max(load_loops, key=lambda l: l["counts"]["instr"], default=None) if main is None else None
    c = (main or load_loop or {}).get("counts", collections.Counter())
    t = main["ttgir"] if main and main["ttgir"] else {}
    mma = "none" if load_loop else "-"
    if main:
        mma = "/".join(s.split(" ")[1] for s in main["shapes"])
        mma = ("HGMMA " if c["HGMMA"] else "HMMA ") + mma + (f" ({c['HGMMA_RS']} RS)" if c["HGMMA_RS"] else "")
    loads = ", ".join(f"{name} x{c[k]}" for k, name in (("TMA", "TMA"), ("LDGSTS", "LDGSTS"), ("LDG", "LDG")) if c[k])
    return dict(
        key=f"{case.op}/{case.name}/{role}", op=case.op, case=case.name, role=role, kernel=launch.name,
        blocks=_blocks(launch.kwargs), warps=md.num_warps, stages=md.num_stages,
        regs=p["regs"], spill_stores=p["spill_stores"], spill_loads=p["spill_loads"], c7515=p["c7515"],
        smem_kb=round(smem / 1024, 1), ctas_per_sm=ctas, occupancy_limit=limiter,
        grid=launch.programs, waves=round(launch.programs / (H100.sms * max(ctas, 1)), 2),
        has_mma=main is not None, mma=mma, loads=loads or "-",
        wgmma_wait=sorted(set(t.get("wgmma_wait", []))), buffers=t.get("buffers", []),
        cp_async_wait=min(t["cp_async_wait"]) if t.get("cp_async_wait") else None,
        bar=c["BAR"], mbar=c["MBAR"], local=c["LOCAL"], mufu=c["MUFU"], tma=c["TMA"],
        dup=tg["dup"], dup_main=t.get("dup", 1.0),
        instr=c["instr"] or None, loop_instrs=[l["counts"]["instr"] for l in loops],
        loop_issue=[l["issue"] for l in loops],
        tensor_clk=round(main["tensor_clk"], 1) if main else None,
        useful_clk=round(main["useful_clk"], 1) if main else None,
        issue=main["issue"] if main else None, issue_worst=max((l["issue"] for l in loops), default=None),
        mufu_useful=round(c["MUFU"] * 8 / main["useful_clk"], 2) if main else None,
        mma_loops=[dict(cp_async=l["cp_async"], tma=l["tma"], plain_loads=l["plain_loads"], buffers=l["buffers"],
                        cp_async_wait=min(l["cp_async_wait"]) if l["cp_async_wait"] else None, dup=l["dup"])
                   for l in tg_loops],
        title=case.title)


def run_cases(cases, only=(), dump=None, progress=None) -> list[dict]:
    """Record, compile and read every selected launch; one row per distinct compiled kernel (a launch
    compiling to the same kernel as an earlier row adds nothing)."""
    from .offline_compile import SM90, compile_launch
    rows, seen = [], set()
    for case in cases:
        for role, launch in record(case):
            key = f"{case.op}/{case.name}/{role}"
            if only and not _selected(key, launch.name, only):
                continue
            compiled = compile_launch(launch, SM90)
            if compiled.key in seen:
                continue
            seen.add(compiled.key)
            rows.append(analyse(case, role, compiled, dump))
            if progress:
                progress(f"{key}: {launch.name}")
    return rows


def _selected(key: str, kernel: str, only) -> bool:
    op = key.split("/")[0]
    return any(o == op or fnmatch.fnmatchcase(key, o) or fnmatch.fnmatchcase(f"{key.rsplit('/', 1)[0]}/{kernel}", o)
               for o in only)


# ================================================================ what a GPU compiles (device side)

def device_row(name: str, kernel) -> dict:
    """One compiled kernel as a driver loaded it: block sizes, warps, stages, registers and spilled bytes
    (the driver's counts), shared memory, and from its TTGIR (:func:`read_ttgir`) the replication of its
    dots (dup) and the buffers of each MMA loop."""
    names = kernel.src.fn.arg_names
    consts = {names[k[0]]: v for k, v in kernel.src.constants.items() if len(k) == 1}
    tg = read_ttgir(kernel.asm["ttgir"])
    md = kernel.metadata
    return dict(kernel=name, blocks=_blocks(consts), warps=md.num_warps, stages=md.num_stages,
                regs=getattr(kernel, "n_regs", None), spill_bytes=getattr(kernel, "n_spills", None),
                smem_kb=round(md.shared / 1024, 1), dup=tg["dup"], buffers=[l["buffers"] for l in tg["loops"]])


def device_rows(launches) -> list[dict]:
    """The device-side complement of the table: launches recorded with real tensors on this process's
    GPU, each compiled for that GPU -- the JIT's own specialisation of those tensors, so the kernel a
    real launch runs -- and loaded by its driver, as :func:`device_row` (one per distinct kernel)."""
    import triton

    from .offline_compile import compile_launch
    target = triton.runtime.driver.active.get_current_target()
    rows, seen = [], set()
    for launch in launches:
        compiled = compile_launch(launch, target)
        if compiled.key in seen:
            continue
        seen.add(compiled.key)
        compiled.kernel._init_handles()   # loads the binary: the driver's register and spill counts
        rows.append(device_row(launch.name, compiled.kernel))
    return rows


# ============================================================================================ output

def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v) if v else "-"
    return str(v)


COLUMNS = [
    ("row", lambda r: r["key"]), ("kernel", lambda r: r["kernel"]), ("blocks", lambda r: r["blocks"]),
    ("w/st", lambda r: f"{r['warps']}/{r['stages']}"), ("regs", lambda r: r["regs"]),
    ("spill st/ld B", lambda r: f"{r['spill_stores']}/{r['spill_loads']}"), ("smem KB", lambda r: r["smem_kb"]),
    ("CTA/SM", lambda r: f"{r['ctas_per_sm']} ({r['occupancy_limit']})"),
    ("grid (waves)", lambda r: f"{r['grid']} ({r['waves']})"), ("C7515", lambda r: "**yes**" if r["c7515"] else "no"),
    ("main-loop MMA", lambda r: r["mma"]), ("wgmma wait", lambda r: _fmt(r["wgmma_wait"])),
    ("loads/it", lambda r: r["loads"]),
    ("bufs; wait", lambda r: f"{'/'.join(map(str, r['buffers'])) or '-'}; {_fmt(r['cp_async_wait'])}"),
    ("BAR/it", lambda r: r["bar"]), ("dup", lambda r: r["dup"]),
    ("instr/it", lambda r: f"{_fmt(r['instr'])}" + (f" ({'/'.join(map(str, r['loop_instrs']))})"
                                                      if len(r["loop_instrs"]) > 1 else "")),
    ("issue/useful (worst)", lambda r: f"{_fmt(r['issue'])}" + (f" ({r['issue_worst']})"
                                                                 if len(r["loop_instrs"]) > 1 else "")),
    ("MUFU/useful", lambda r: _fmt(r["mufu_useful"])),
]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(get(r)).replace("|", "/") for _, get in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def header() -> dict:
    import triton
    from .harness import git_commit_full
    from .offline_compile import H100
    return dict(commit=git_commit_full(), triton_version=triton.__version__, torch_version=torch.__version__,
                target="sm_90a", machine=f"{H100.sms} SMs x (64K regs, 228 KB smem, 64 warps)")


def report(rows: list[dict], ops, only) -> tuple[str, dict]:
    """The markdown (header, table, targets) and the JSON document."""
    import triton
    head = header()
    # only some rows of an operator (an op/case/role pattern): a target or gap may match none of them
    partial = any("/" in o for o in only)
    verdict = codegen_targets.evaluate(rows, ops=ops, triton_version=triton.__version__, partial=partial)
    text = [f"sm_90a code of the hot kernels: triton {head['triton_version']}, torch {head['torch_version']}, "
            f"commit {head['commit']}; occupancy for {head['machine']}", "", markdown_table(rows), "",
            codegen_targets.format_verdict(verdict)]
    cases = {f"{c.op}/{c.name}": c.title for c in CASES if c.op in ops}
    return "\n".join(text), dict(header=head, cases=cases, rows=rows, targets=verdict)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.codegen", description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated operators (" + ", ".join(OPS) + ") or op/case/role "
                    "patterns (fnmatch, e.g. 'moe/phi2/dW*', 'hyper_attention/*/_hyper_bwd_*')")
    ap.add_argument("--json", help="write the rows, the cases and the target verdicts here")
    ap.add_argument("--dump", help="write each kernel's TTGIR, PTX, SASS and ptxas log into this folder")
    ap.add_argument("--check", action="store_true", help="exit 1 if a target fails or a known gap is met")
    ap.add_argument("--gaps", action="store_true", help="print every failing (target, row) as a known-gap entry")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    if "mmkernels" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1 (the interpreter replaces the kernels at import)")
    os.environ.pop("TRITON_INTERPRET", None)
    only = tuple(o.strip() for o in args.only.split(",") if o.strip())
    ops = [op for op in OPS if not only or any(fnmatch.fnmatchcase(op, o.split("/")[0]) for o in only)]
    unknown = [o for o in only if not any(fnmatch.fnmatchcase(op, o.split("/")[0]) for op in OPS)]
    if unknown:
        ap.error(f"--only: {unknown} name no operator; expected some of {OPS} or op/case/role patterns")
    progress = None if args.quiet else (lambda s: print(f"compiled {s}", file=sys.stderr, flush=True))
    rows = run_cases([c for c in CASES if c.op in ops], only, args.dump, progress)
    text, doc = report(rows, ops, only)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
    if args.gaps:
        print("\n" + codegen_targets.format_gap_entries(doc["targets"]))
    if args.check and not doc["targets"]["ok"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
