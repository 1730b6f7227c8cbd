"""Run a function on N gloo ranks in fresh processes, for the multi-process tests on CPU.

``run_ranks(fn, world_size, *args, timeout=...)`` spawns ``world_size`` processes.  Each one initialises
the default process group (gloo, a file store in a temporary directory), calls ``fn(rank, world_size,
*args)``, destroys the group and sends back its return value (something picklable and small) or its
traceback.  The caller gets the list of return values in rank order, or ``AssertionError`` carrying
every failing rank's traceback.  A rank that does not finish within ``timeout + startup`` seconds (a hung
collective) has every rank killed and fails the test: nothing can hang CI.

``fn`` must be a module-level function of an importable module (spawn pickles it by name).  The
children inherit the environment, so ``TRITON_INTERPRET=1`` from ``conftest.py`` holds in them.
"""
from __future__ import annotations

import datetime
import os
import queue as queue_module
import tempfile
import time
import traceback
from typing import Callable

import torch.multiprocessing as mp


def _entry(fn, rank, world_size, init_file, results, group_timeout, args):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)   # N ranks share a 2-core machine
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=group_timeout))
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, value))
    except BaseException:   # noqa: BLE001 - everything goes back to the test
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0, startup: float = 60.0) -> list:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, ...)]``, each run on its own gloo rank.

    ``timeout`` plus ``startup`` (seconds for the children's imports) bounds the whole call, and is also
    the process group's own timeout: the rendezvous in ``init_process_group`` waits for the slowest
    rank's imports, so a group timeout of ``timeout`` alone made a busy machine (ranks started seconds
    apart) fail in the rendezvous instead of in ``fn``."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="mmkernels-dist-") as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(fn, rank, world_size, init_file, results, timeout + startup, args),
                             daemon=True) for rank in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout + startup
        got, failures = {}, []
        try:
            while len(got) + len(failures) < world_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{fn.__name__} on {world_size} ranks: ranks "
                                         f"{sorted(set(range(world_size)) - set(got) - {r for r, _ in failures})} "
                                         f"did not finish within {timeout + startup:.0f} s (a hung collective?)"
                                         + "".join(f"\n--- rank {r} failed:\n{tb}" for r, tb in failures))
                try:
                    rank, ok, value = results.get(timeout=min(remaining, 1.0))
                except queue_module.Empty:
                    reported = set(got) | {r for r, _ in failures}
                    for r, p in enumerate(procs):   # a crashed rank (a signal, an abort) reports nothing
                        if r not in reported and p.exitcode not in (0, None):
                            failures.append((r, f"process exited with code {p.exitcode} without reporting"))
                    continue
                if ok:
                    got[rank] = value
                else:
                    failures.append((rank, value))
        finally:
            for p in procs:
                p.join(timeout=5.0)
                if p.is_alive():
                    p.kill()
                    p.join()
    if failures:
        raise AssertionError(f"{fn.__name__} on {world_size} ranks failed:"
                             + "".join(f"\n--- rank {r}:\n{tb}" for r, tb in sorted(failures)))
    return [got[r] for r in range(world_size)]


def skip_deepspeed_shm_build() -> Callable[[], None]:
    """Make DeepSpeed's communication backend skip building its shared-memory all-reduce op.

    ``deepspeed.init_distributed`` on CPU JIT-compiles ``deepspeed_shm_comm`` (about 30 s and 60 CPU-s of
    C++ on a fresh machine) for ``inference_all_reduce`` alone, which no test uses.  Call it in a rank
    (or the test process) before ``deepspeed.init_distributed`` / ``deepspeed.initialize``; it returns
    the original builder's restorer for callers that must leave DeepSpeed as they found it."""
    import importlib
    ds_torch = importlib.import_module("deepspeed.comm.torch")   # (the attribute deepspeed.comm.torch is torch)
    real = ds_torch.build_shm_op
    ds_torch.build_shm_op = lambda: None

    def restore() -> None:
        ds_torch.build_shm_op = real
    return restore
