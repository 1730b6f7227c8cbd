"""Compile every Triton kernel launch of an operator for real GPU targets, on a machine without a GPU.

The interpreter accepts programs a GPU compiler rejects (and vice versa), so passing on CPU is not
enough.  This script (run in a subprocess *without* ``TRITON_INTERPRET``) replaces each
``@triton.jit`` kernel in a kernels module with a recorder, runs the operator's launchers on CPU
tensors with the GPU block configurations, and hands every recorded launch -- its argument types
and constexprs -- to ``triton.compile`` for sm_80 and sm_90.  Usage::

    python tests/gpu_target_compile.py plora
"""
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
        torch.int64: "*i64", torch.int32: "*i32", torch.int8: "*i8", torch.uint8: "*u8", torch.bool: "*i1"}
_OPTIONS = ("num_warps", "num_stages", "num_ctas")


class Recorder:
    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.calls.append((self.fn, args, kwargs))
        return record


def record_launches(kernels_module) -> list:
    """Swap every launchable kernel (``*_kernel``) of a kernels module for a Recorder; return the list
    its launches will be appended to."""
    calls = []
    for name in dir(kernels_module):
        obj = getattr(kernels_module, name)
        if isinstance(obj, Recorder):
            obj = obj.fn
        if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
            setattr(kernels_module, name, Recorder(obj, calls))
    return calls


def signature(fn, args, kwargs):
    """Argument types, constexprs and alignment attributes as Triton's JIT would specialise them:
    an integer equal to 1 becomes a constant, pointers and integers divisible by 16 are marked so
    (which is what lets the pipeliner use 16-byte async copies)."""
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in kwargs:
            sig[name] = "constexpr"
            constexprs[(i,)] = kwargs[name]
            continue
        value = args[i]
        if isinstance(value, torch.Tensor):
            sig[name] = _PTR[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                sig[name] = "constexpr"
                constexprs[(i,)] = 1
                continue
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
    return sig, constexprs, attrs


# Shared memory a block may use (bytes): sm_80 (A100) 163 KB, sm_90 (H100/H200) 227 KB.
SHARED_LIMIT = {80: 166912, 90: 232448}


def compile_calls(calls, targets):
    seen = set()
    for fn, args, kwargs in calls:
        const_kwargs = {k: v for k, v in kwargs.items() if k not in _OPTIONS}
        sig, constexprs, attrs = signature(fn, args, const_kwargs)
        options = {k: kwargs[k] for k in _OPTIONS if k in kwargs}
        key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted(constexprs.items())),
               tuple(sorted(attrs)), tuple(options.items()))
        if key in seen:
            continue
        seen.add(key)
        for target in targets:
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                                      target=target, options=options)
            shared = compiled.metadata.shared
            pointer = [v for v in sig.values() if v.startswith("*")][0]
            if shared > SHARED_LIMIT[target.arch]:
                raise RuntimeError(f"sm_{target.arch} {fn.__name__} {pointer} {options}: needs {shared} bytes of "
                                   f"shared memory, the limit is {SHARED_LIMIT[target.arch]}")
            print(f"ok  sm_{target.arch}  {fn.__name__}  {pointer}  shared={shared}")


SM90, SM80 = GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)


def plora_calls():
    """PLoRA launches recorded twice: with the sm_90 block table (compiled for sm_90) and with the
    generic table (compiled for sm_80)."""
    from mmkernels.ops.plora import launch

    all_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    return [(_plora_record(launch._GPU_HALF_SM90, all_dtypes), [SM90]),
            (_plora_record(launch._GPU_HALF, (torch.bfloat16,)), [SM80])]


def _plora_record(half_table, dtypes):
    from mmkernels.ops.plora import kernels, launch

    calls = record_launches(kernels)
    for dtype in dtypes:
        table = launch._GPU_FP32 if dtype == torch.float32 else half_table
        launch._config = lambda name, device, dt, table=table: dict(table[name])
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
                              [False, False, True, False, False])
    launch.dropout_keep_mask(torch.tensor([3], dtype=torch.int64), 40, 40, 0.1)
    return calls


def hyper_attention_calls():
    """Hyper Attention launches with the GPU block table: every kernel (gated mode, strict, padding
    mask; the block classification and its class map) in bf16 at D = 128 (the model's shapes), the
    joint forward, and the forward in fp32 at D = 128 (the largest shared-memory footprint), for
    sm_90; the bf16 and fp32 forwards for sm_80.  Kept small: each compile takes seconds on a CPU."""
    return [(_hyper_attention_record(full=True), [SM90]), (_hyper_attention_record(full=False), [SM80])]


def _hyper_attention_record(full):
    from mmkernels.ops.hyper_attention import kernels, launch

    calls = record_launches(kernels)
    if not hasattr(launch, "_cpu_config"):
        launch._cpu_config = launch._config
        launch._config = lambda name, device, dt, head_dim: launch._cpu_config(name, torch.device("cuda"), dt,
                                                                                head_dim)
        launch.DECODE_SPLIT_KEYS = dict(launch.DECODE_SPLIT_KEYS, cpu=launch.DECODE_SPLIT_KEYS["gpu"])
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
        for gated, inclusive, mask in ((True, False, kpm),):
            g = gate if gated else None
            out, o_t, o_v, lse = launch.hyper_forward(q, k, v, kv, vv, pos, cu, g, mask, gated, inclusive,
                                                      D ** -0.5, True)
            if not every_kernel:
                continue
            launch.hyper_forward(q[:, -1:], k, v, kv, vv, pos, cu, g, mask, gated, inclusive, D ** -0.5, False)
            launch.hyper_backward(torch.randn_like(q), q, k, v, kv, vv, pos, cu, g, mask, out, o_t, o_v, lse,
                                  gated, inclusive, D ** -0.5)
            launch.block_classes(launch.hyper_layout(pos, cu, L, L, T, inclusive), cu, L, L, T, N,
                                 launch._config("fwd", None, dtype, D), launch._config("bwd", None, dtype, D))
        if every_kernel:
            inv_freq = torch.rand(D // 2)
            kvis, vvis = launch.visual_kv_rope(torch.randn(N * T, 2 * Hkv * D, dtype=dtype), torch.rand(N * T),
                                               torch.randn(2 * Hkv * D, dtype=dtype), pos, inv_freq, T, Hkv, 1)
            launch.visual_kv_rope_backward(kvis, vvis, pos, inv_freq, T, 1)
            launch.rope(q, torch.arange(L).expand(B, L), inv_freq, False)
    return calls


def moe_calls():
    """MoE launches with the GPU block tables: every kernel variant (both activations, forward and
    backward, grouped_gemm) in bf16 for sm_90; the fp32 forward for sm_90; the bf16 forward for sm_80."""
    from mmkernels.ops.moe.reference import ACTIVATIONS

    # every fused activation (forward and backward epilogues) for the main target; one plain and one
    # gated activation for the others, which differ only in dtype / arch, to keep the test short
    return [(_moe_record(torch.bfloat16, backward=True, activations=ACTIVATIONS), [SM90]),
            (_moe_record(torch.float32, backward=False), [SM90]),
            (_moe_record(torch.bfloat16, backward=False), [SM80])]


def _moe_record(dtype, backward, activations=("gelu_tanh", "swiglu")):
    from mmkernels.ops.moe import kernels, launch
    from mmkernels.ops.moe.reference import GATED_ACTIVATIONS, route_reference

    calls = record_launches(kernels)
    table = launch._GPU_FP32 if dtype == torch.float32 else launch._GPU_HALF
    launch._config = lambda name, device, dt, table=table: dict(table[name])
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
            launch.moe_ffn_backward(torch.randn(S, H, dtype=dtype), x, w, d.keep, d.sorted_slots, d.expert_offsets,
                                    w1, w2, z, h, o, act, [True, True, True, b1 is not None, True, b2 is not None])
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
    ops = sys.argv[1:] or list(OPERATORS)
    for op in ops:
        for calls, targets in OPERATORS[op]():
            compile_calls(calls, targets)
