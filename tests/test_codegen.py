"""The sm_90 code of the hot kernels meets the structural targets (no GPU needed).

``python -m benchmarks.codegen --check`` compiles every hot kernel for sm_90 at the benchmark shapes
(the launches ``tests/gpu_target_compile.py`` compiles too, so one of the two reads the other's
kernels from Triton's cache), reads ptxas, TTGIR and SASS, and checks the targets and known gaps of
``benchmarks/codegen_targets.py``: a target failed without a known-gap entry fails, and so does a
known gap whose kernel now meets its target (delete the entry)."""
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from benchmarks import codegen, codegen_targets

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("op", codegen.OPS)
def test_codegen_targets(op):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "benchmarks.codegen", "--only", op, "--check", "--quiet"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    failed = proc.stdout.find("Check failed")
    assert proc.returncode == 0, (proc.stdout[failed:] if failed >= 0 else proc.stdout[-3000:]) + proc.stderr[-3000:]


def _row(key, **fields):
    op, case, role = key.split("/")
    row = dict(key=key, op=op, case=case, role=role, kernel=f"_{role}_kernel", has_mma=True, c7515=False,
               spill_stores=0, spill_loads=0, dup=1, issue=0.2, issue_worst=0.2, tma=1, loads="TMA x2",
               mma_loops=[dict(cp_async=0, tma=2, plain_loads=0, buffers=[3, 3], cp_async_wait=None, dup=1.0)])
    row.update(fields)
    return row


def test_known_gaps_are_strict(monkeypatch):
    """A failing (target, row) without a gap entry fails; with one it is expected; a gap entry whose
    row meets the target, or that matches no row, fails."""
    monkeypatch.setattr(codegen_targets, "TARGETS", [codegen_targets.Target("t.issue", ("op/*/a*",), "issue", 0.3),
                                                     codegen_targets.Target("t.tma", ("op/*/a*",), "tma")])
    fast, slow = _row("op/c/a1"), _row("op/c/a2", issue=0.9)
    monkeypatch.setattr(codegen_targets, "KNOWN_GAPS", [])
    verdict = codegen_targets.evaluate([fast, slow], ops=["op"], triton_version="3.8.0")
    assert not verdict["ok"] and verdict["problems"] == ["t.issue op/c/a2: issue 0.9 (target: main loop "
                                                         "issue/useful <= 0.3)"]
    monkeypatch.setattr(codegen_targets, "KNOWN_GAPS", [("t.issue", "op/c/a2", "0.9")])
    assert codegen_targets.evaluate([fast, slow], ops=["op"], triton_version="3.8.0")["ok"]
    # the same entry once the kernel is fast: the gap is closed, the entry must go
    verdict = codegen_targets.evaluate([fast, _row("op/c/a2")], ops=["op"], triton_version="3.8.0")
    assert not verdict["ok"] and "now meets the target" in verdict["problems"][0]
    # an entry for another Triton does not apply; an entry matching no row is stale
    monkeypatch.setattr(codegen_targets, "KNOWN_GAPS", [("t.issue", "op/c/a2", "0.9", "3.6")])
    assert not codegen_targets.evaluate([fast, slow], ops=["op"], triton_version="3.8.0")["ok"]
    assert codegen_targets.evaluate([fast, slow], ops=["op"], triton_version="3.6.0")["ok"]
    monkeypatch.setattr(codegen_targets, "KNOWN_GAPS", [("t.issue", "op/c/a2", "0.9"), ("t.issue", "op/x/*", "")])
    verdict = codegen_targets.evaluate([fast, slow], ops=["op"], triton_version="3.8.0")
    assert verdict["problems"] == ["known gap ('t.issue', 'op/x/*') matches no row: delete it"]
    # a target that matches no row (a renamed role) fails
    verdict = codegen_targets.evaluate([_row("op/c/b1")], ops=["op"], triton_version="3.8.0")
    assert any("matches no row" in p for p in verdict["problems"])


def test_pipelined_check():
    check = codegen_targets.CHECKS["pipelined"].test
    loop = dict(cp_async=2, tma=0, plain_loads=0, buffers=[3, 3], cp_async_wait=2, dup=1.0)
    assert check(_row("op/c/a", mma_loops=[loop]), 3)[0]
    assert not check(_row("op/c/a", mma_loops=[dict(loop, cp_async_wait=0)]), 3)[0]      # waits for every copy
    assert not check(_row("op/c/a", mma_loops=[dict(loop, buffers=[1, 2])]), 3)[0]       # single-buffered operand
    assert not check(_row("op/c/a", mma_loops=[dict(loop, cp_async=0)]), 2)[0]           # plain loads
    assert check(_row("op/c/a", mma_loops=[dict(loop, cp_async=0, tma=2, buffers=[2])]), 3)[0]   # TMA


# ----------------------------------------------------------------------- the readers, on small excerpts

def test_read_ptxas():
    log = ("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized ...\n"
           "ptxas info    : Function properties for _k\n"
           "    32 bytes stack frame, 24 bytes spill stores, 16 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 32 bytes cumulative stack size\n")
    assert codegen.read_ptxas(log) == dict(regs=255, stack=32, spill_stores=24, spill_loads=16, static_smem=0,
                                           c7515=True)


SASS = """
        /*0100*/                   LDGSTS.E.BYPASS.LTC128B.128 [R1], desc[UR4][R2.64] ;
        /*0110*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0120*/              @P0 BRA 0x140 ;
        /*0130*/                   STG.E [R2.64], R3 ;
        /*0140*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0150*/              @P1 BRA 0x100 ;
        /*0160*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0170*/                   MUFU.EX2 R5, R5 ;
        /*0180*/              @P2 BRA 0x160 ;
        /*0190*/                   EXIT ;
"""


def test_read_sass():
    mma, other = codegen.read_sass(SASS)
    assert [l["range"] for l in mma] == [(0x100, 0x150), (0x160, 0x180)] and other == []
    first, second = mma
    # the STG a predicated forward branch skips is not counted
    assert first["counts"]["instr"] == 5 and first["counts"]["STG"] == 0
    assert (first["counts"]["LDGSTS"], first["counts"]["BAR"], first["shapes"]) == (1, 1, ["HGMMA 64x128x16"])
    assert first["tensor_clk"] == 64 * 128 * 16 / 2048
    assert second["tensor_clk"] == 16 * 8 * 16 / 512 and second["counts"]["MUFU"] == 1


# a TMA main loop whose mbarrier wait retries out of line (after the persistent loop's back-edge)
SASS_TMA = """
        /*0100*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR9+0x34000], R13 ;
        /*0110*/              @!P0 BRA 0x1a0 ;
        /*0120*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR24], R24, gsb0 ;
        /*0130*/                   UTMALDG.3D [UR8], [UR30] ;
        /*0140*/              @!P1 BRA 0x100 ;
        /*0150*/                   STG.E [R2.64], R3 ;
        /*0160*/               @P2 EXIT ;
        /*0170*/                   BRA 0x80 ;
        /*0180*/                   NOP ;
        /*0190*/                   NOP ;
        /*01a0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR9+0x34000], R13 ;
        /*01b0*/              @!P0 BRA 0x1a0 ;
        /*01c0*/                   BRA 0x120 ;
"""


def test_read_sass_out_of_line_wait():
    """The jump back from the out-of-line retry of an mbarrier wait closes no loop: the TMA loop is the
    only MMA loop (the persistent tile loop around it holds a nested MMA loop)."""
    mma, _ = codegen.read_sass(SASS_TMA)
    assert [l["range"] for l in mma] == [(0x100, 0x140)]
    assert (mma[0]["counts"]["instr"], mma[0]["counts"]["TMA"], mma[0]["counts"]["HGMMA"]) == (5, 1, 1)


TTGIR = """
#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], instrShape = [16, 32, 16]}>
module {
  tt.func public @k() {
    %a = ttg.local_alloc : () -> !ttg.memdesc<3x64x64xbf16, #shared, #smem, mutable>
    %b = ttg.local_alloc : () -> !ttg.memdesc<1x64x32xbf16, #shared, #smem, mutable>
    %b_0 = ttg.memdesc_index %b[%c0_i32] : !ttg.memdesc<1x64x32xbf16> -> !ttg.memdesc<64x32xbf16>
    %r:2 = scf.for %i = %c0 to %n step %c1 iter_args(%acc = %cst) -> (tensor<64x32xf32, #mma>) {
      %w = ttg.async_wait %t {num = 1 : i32}
      %x_1 = ttg.memdesc_index %a[%i] : !ttg.memdesc<3x64x64xbf16> -> !ttg.memdesc<64x64xbf16>
      %c = ttg.async_copy_global_to_local %p, %b_0 : tensor<64x32x!tt.ptr<bf16>> -> <64x32xbf16>
      %d = ttng.warp_group_dot %x_1, %b_0, %acc {isAsync = true} : !ttg.memdesc<64x64xbf16> * !ttg.memdesc<64x32xbf16> -> tensor<64x32xf32, #mma>
      %e = ttng.warp_group_dot_wait %d {pendings = 1 : i32} : tensor<64x32xf32, #mma>
      scf.yield %e : tensor<64x32xf32, #mma>
    }
    %s:2 = scf.for %j = %c0 to %n step %c1 iter_args(%acc = %cst) -> (tensor<64x32xf32, #mma>) {
      %x_1 = arith.addi %j, %j : i32
      %v = tt.load %q : tensor<64x32x!tt.ptr<bf16>>
      %d = ttng.warp_group_dot %y, %z, %acc : tensor<64x64xbf16> * tensor<64x32xbf16> -> tensor<64x32xf32, #mma>
      scf.yield %d : tensor<64x32xf32, #mma>
    }
    tt.return
  }
}
"""


def test_read_ttgir():
    tg = codegen.read_ttgir(TTGIR)
    assert tg["dup"] == 2                       # 8 warps x 16 rows cover 128 rows of a 64-row dot
    first, second = tg["loops"]
    assert (first["buffers"], first["cp_async"], first["cp_async_wait"], first["wgmma_wait"]) == ([1, 3], 1, [1], [1])
    # the second loop's %x_1 is its own value, not the first loop's view of %a
    assert (second["buffers"], second["cp_async"], second["plain_loads"]) == ([], 0, 1)
    assert first["dup"] == second["dup"] == 2.0


def test_device_row():
    """A compiled kernel read back as the driver loaded it: its constexprs by name, the driver's register
    and spill counts, the TTGIR reader's replication and buffers."""
    fn = types.SimpleNamespace(arg_names=["x_ptr", "n", "BLOCK_M", "BLOCK_N"])
    kernel = types.SimpleNamespace(src=types.SimpleNamespace(fn=fn, constants={(2,): 64, (3,): 32}),
                                   asm={"ttgir": TTGIR}, n_regs=168, n_spills=0,
                                   metadata=types.SimpleNamespace(num_warps=8, num_stages=3, shared=4096))
    assert codegen.device_row("_k", kernel) == dict(kernel="_k", blocks="M=64 N=32", warps=8, stages=3, regs=168,
                                                    spill_bytes=0, smem_kb=4.0, dup=2, buffers=[[1, 3], []])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_hyper_attention_compiled_on_this_gpu():
    """The hyper attention training steps of the codegen cases (the 7B layer, dense and packed), launched with real tensors
    on this GPU, compiled for it and loaded by its driver: no kernel spills (the driver's count) and no
    dot is replicated across warps -- the targets hyper.no_spills and hyper.dup1 on the GPU's own
    compile, beside the offline table."""
    from benchmarks.offline_compile import recording

    with recording() as launches:
        for mode, L, images in codegen.HYPER_TRAINING.values():
            codegen._hyper_layer(mode, L, images, device="cuda")
        for args in codegen.HYPER_VARLEN.values():   # packed samples: the VARLEN kernels
            codegen._hyper_varlen_layer(*args, device="cuda")
    rows = codegen.device_rows(launches)
    assert {r["kernel"] for r in rows} >= {"_hyper_layout_kernel", "_hyper_fwd_kernel", "_hyper_bwd_pre_kernel",
                                            "_hyper_bwd_kernel"}
    bad = [r for r in rows if r["spill_bytes"] or r["dup"] > 1]
    assert not bad, bad
