"""Compile every Triton kernel launch of an operator for real GPU targets, on a machine without a GPU.

The interpreter accepts programs a GPU compiler rejects (and vice versa), so passing on CPU is not
enough.  This script (run in a subprocess *without* ``TRITON_INTERPRET``) records every kernel launch
of the operator's launchers -- at the benchmark shapes on meta tensors (the launches
``benchmarks/codegen.py`` analyses), and at small odd shapes on CPU tensors with the GPU block
configurations -- and compiles each distinct one with ``triton.compile`` for sm_90 and sm_80
(``benchmarks/offline_compile.py``: the JIT's own argument specialisation).  Usage::

    python tests/gpu_target_compile.py plora
"""
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repository: benchmarks/, mmkernels/

from benchmarks import codegen  # noqa: E402
from benchmarks.offline_compile import SHARED_LIMIT, SM80, SM90, compile_launch, recording  # noqa: E402


@contextlib.contextmanager
def patched(obj, name, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


def compile_calls(launches, targets):
    """Compile every distinct launch for every target; fail if one needs more shared memory than a
    block may use there."""
    seen = set()
    for launch in launches:
        for target in targets:
            compiled = compile_launch(launch, target)
            if compiled.key in seen:
                continue
            seen.add(compiled.key)
            if compiled.shared > SHARED_LIMIT[target.arch]:
                raise RuntimeError(f"sm_{target.arch} {compiled.describe()} {compiled.options['num_warps']} warps "
                                   f"{compiled.options['num_stages']} stages: needs {compiled.shared} bytes of shared "
                                   f"memory, the limit is {SHARED_LIMIT[target.arch]}")
            print(f"ok  sm_{target.arch}  {compiled.describe()}  shared={compiled.shared}")


def codegen_calls(op):
    """The launches ``benchmarks/codegen.py`` analyses (the benchmark shapes, sm_90 tables): compiled here
    too, so whichever of the two checks runs second reads them from Triton's cache."""
    return [launch for case in codegen.CASES if case.op == op for _, launch in codegen.record(case)]


def plora_calls():
    """PLoRA launches (its own kernels and its GEMMs on the shared core): the benchmark shapes; small odd
    shapes with the sm_90 tables in every dtype (compiled for sm_90) and with the generic ones (compiled
    for sm_80)."""
    all_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    return [(codegen_calls("plora"), [SM90]),
            (_plora_record("sm90", all_dtypes), [SM90]),
            (_plora_record("sm80", (torch.bfloat16,)), [SM80])]


def _plora_record(arch, dtypes):
    """Launches of the PLoRA launchers with every table lookup (the core's and PLoRA's own) forced to
    ``arch`` (``config.forced_arch``: the fp32 table for float32)."""
    from mmkernels.ops._gemm import config
    from mmkernels.ops.plora import launch

    with recording() as calls, config.forced_arch(arch):
        for dtype in dtypes:
            M, K, N, r = 100, 64, 48, 32
            x = torch.randn(M, K, dtype=dtype)
            w, b = torch.randn(N, K, dtype=dtype), torch.randn(N, dtype=dtype)
            a, lb = torch.randn(r, K, dtype=dtype), torch.randn(N, r, dtype=dtype)
            mask = torch.rand(M) < 0.5
            flags = launch._tile_flags_torch(mask)
            seed = torch.tensor([3], dtype=torch.int64)
            launch.plora_forward(x, w, b, a, lb, mask, flags, 1.0, 0.1, seed)
            s = torch.zeros(M, r, dtype=dtype)
            launch.plora_backward(torch.randn(M, N, dtype=dtype), x, w, a, lb, s, mask, flags, 1.0, 0.1, seed,
                                  [True] * 5)
            launch.plora_backward(torch.randn(M, N, dtype=dtype), x, w, a, lb, s, mask, flags, 1.0, 0.0, None,
                                  [True, False, True, False, False])
        launch.dropout_keep_mask(torch.tensor([3], dtype=torch.int64), 40, 40, 0.1)
    return calls


def hyper_attention_calls():
    """Hyper Attention launches: the benchmark shapes; with the GPU block table at small odd shapes,
    every kernel (gated mode, strict, padding mask; the block classification and its class map; packed
    samples, VARLEN, forward, backward and class map) in bf16
    at D = 128 (the model's shapes), the joint forward, and the forward in fp32 at D = 128 (the largest
    shared-memory footprint), for sm_90; the bf16 and fp32 forwards for sm_80.  Kept small: each compile
    takes seconds on a CPU."""
    return [(codegen_calls("hyper_attention"), [SM90]), (_hyper_attention_record(full=True), [SM90]),
            (_hyper_attention_record(full=False), [SM80])]


def _hyper_attention_record(full):
    from mmkernels.ops.hyper_attention import launch

    gpu_config = launch._config
    with recording() as calls, \
            patched(launch, "_config", lambda name, device, dt, head_dim: gpu_config(name, torch.device("cuda"), dt,
                                                                                    head_dim)), \
            patched(launch, "decode_residency",
                    lambda device, *args, f=launch.decode_residency: f(torch.device("meta"), *args)):
        for dtype, D, every_kernel in ((torch.bfloat16, 128, full), (torch.float32, 128, False)):
            B, L, H, Hkv, N, T = 2, 40, 4, 2, 3, 9
            q = torch.randn(B, L, H, D, dtype=dtype)
            k, v = torch.randn(B, L, Hkv, D, dtype=dtype), torch.randn(B, L, Hkv, D, dtype=dtype)
            kv, vv = torch.randn(N, T, Hkv, D, dtype=dtype), torch.randn(N, T, Hkv, D, dtype=dtype)
            pos = torch.tensor([1, 5, 3], dtype=torch.int32)
            cu = torch.tensor([0, 2, 3], dtype=torch.int32)
            gate = torch.randn(H * D, dtype=dtype)
            kpm = torch.rand(B, L) > 0.2
            if every_kernel:
                launch.hyper_forward(q, k, v, kv, vv, pos, cu, None, None, False, True, D ** -0.5, False)
            out, o_t, o_v, lse = launch.hyper_forward(q, k, v, kv, vv, pos, cu, gate, kpm, True, False, D ** -0.5,
                                                      True)
            if not every_kernel:
                continue
            launch.hyper_forward(q[:, -1:], k, v, kv, vv, pos, cu, gate, kpm, True, False, D ** -0.5, False)
            launch.hyper_backward(torch.randn_like(q), q, k, v, kv, vv, pos, cu, gate, kpm, out, o_t, o_v, lse,
                                  True, False, D ** -0.5)
            launch.block_classes(launch.hyper_layout(pos, cu, L, L, T, False), cu, L, L, T, N,
                                 launch._config("fwd", None, dtype, D), launch._config("bwd", None, dtype, D))
            # packed samples (VARLEN): 7 and 33 rows of one [40, ...] row, gated, saved parts, backward, class map
            cu_seq = torch.tensor([0, 7, 40], dtype=torch.int32)
            packed = launch.Packed(cu_seq, cu_seq, 33, 33)
            pq, pk, pv = q[0], k[0], v[0]
            layout = launch.hyper_layout(pos, cu, 33, 33, T, False, packed, L)
            out, o_t, o_v, lse = launch.hyper_forward(pq, pk, pv, kv, vv, pos, cu, gate, None, True, False, D ** -0.5,
                                                      True, layout, packed)
            launch.hyper_backward(torch.randn_like(pq), pq, pk, pv, kv, vv, pos, cu, gate, None, out, o_t, o_v, lse,
                                  True, False, D ** -0.5, layout, packed)
            launch.block_classes(layout, cu, 33, 33, T, N, launch._config("fwd", None, dtype, D),
                                 launch._config("bwd", None, dtype, D), packed)
            inv_freq = torch.rand(D // 2)
            kvis, vvis = launch.visual_kv_rope(torch.randn(N * T, 2 * Hkv * D, dtype=dtype), torch.rand(N * T),
                                               torch.randn(2 * Hkv * D, dtype=dtype), pos, inv_freq, T, Hkv, 1)
            launch.visual_kv_rope_backward(kvis, vvis, pos, inv_freq, T, 1)
            launch.rope(q, torch.arange(L).expand(B, L), inv_freq, False)
    return calls


def moe_calls():
    """MoE launches (the combine kernels and the GEMMs on the shared core): the benchmark shapes; with
    the GPU tables at small odd shapes, every kernel variant (every activation, forward and backward,
    grouped_gemm) in bf16 for sm_90, the fp32 forward for sm_90, the bf16 forward and backward for sm_80
    (the core's pointer path: gathered rows and weights through cp.async, the wgrad included)."""
    from mmkernels.ops.moe.reference import ACTIVATIONS

    # every fused activation (forward and backward epilogues) for the main target; one plain and one
    # gated activation for the others, which differ only in dtype / arch, to keep the test short
    return [(codegen_calls("moe"), [SM90]),
            (_moe_record("sm90", torch.bfloat16, backward=True, activations=ACTIVATIONS), [SM90]),
            (_moe_record("sm90", torch.float32, backward=False), [SM90]),
            (_moe_record("sm80", torch.bfloat16, backward=True), [SM80])]


def _moe_record(arch, dtype, backward, activations=("gelu_tanh", "swiglu")):
    """Launches of the MoE launchers with every table lookup forced to ``arch`` (``config.forced_arch``:
    the fp32 table for float32)."""
    from mmkernels.ops._gemm import config
    from mmkernels.ops.moe import launch
    from mmkernels.ops.moe.reference import GATED_ACTIVATIONS, route_reference

    with recording() as calls, config.forced_arch(arch):
        S, H, F, E, k = 50, 64, 48, 4, 2
        x = torch.randn(S, H, dtype=dtype)
        d = route_reference(torch.randn(S, E), k, 30, None)
        w = torch.rand(S, k)
        for act in activations:
            F1 = 2 * F if act in GATED_ACTIVATIONS else F
            w1, w2 = torch.randn(E, F1, H, dtype=dtype), torch.randn(E, H, F, dtype=dtype)
            b1, b2 = None, None
            if act not in GATED_ACTIVATIONS:
                b1, b2 = torch.randn(E, F1, dtype=dtype), torch.randn(E, H, dtype=dtype)
            y, z, h, o = launch.moe_ffn_forward(x, w, d.keep, d.sorted_slots, d.expert_offsets, w1, b1, w2, b2, act)
            if backward:
                launch.moe_ffn_backward(torch.randn(S, H, dtype=dtype), x, w, d.keep, d.sorted_slots,
                                        d.expert_offsets, w1, w2, z, h, o, act,
                                        [True, True, True, b1 is not None, True, b2 is not None])
        d1 = route_reference(torch.randn(S, E), 1, 15, None)   # k = 1: combine fused into the second GEMM
        w1, w2 = torch.randn(E, F, H, dtype=dtype), torch.randn(E, H, F, dtype=dtype)
        launch.moe_ffn_forward(x, torch.rand(S, 1), d1.keep, d1.sorted_slots, d1.expert_offsets, w1, None, w2, None,
                               "gelu_tanh")
        if backward:
            offs = torch.tensor([0, 10, 10, 40, 50], dtype=torch.int32)
            b = torch.randn(E, F, H, dtype=dtype)
            launch.grouped_gemm_forward(x, b, None, offs)
            launch.grouped_gemm_backward(torch.randn(S, F, dtype=dtype), x, b, offs, [True, True, True])
    return calls


OPERATORS = {"plora": plora_calls, "hyper_attention": hyper_attention_calls, "moe": moe_calls}

if __name__ == "__main__":
    for op in sys.argv[1:] or list(OPERATORS):
        for calls, targets in OPERATORS[op]():
            compile_calls(calls, targets)
