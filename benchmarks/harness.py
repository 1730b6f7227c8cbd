"""Shared benchmark harness for every mmkernels operator (``benchmarks/bench_<op>.py``).

What lives here (operator-independent):

* :func:`machine_header` -- device, torch / triton / CUDA versions, git commit, mmkernels build_info;
* :func:`time_ms` -- ``triton.testing.do_bench`` on CUDA, ``time.perf_counter`` on CPU (warm-up calls
  outside the timed region, GC off while timing); both give a :class:`Timing`: median, 20/80 %
  quantiles and the minimum over the repetitions;
* :func:`sweep_timer` -- the tuning sweeps' quick per-candidate timer;
* :func:`pin_cpu_threads` -- every CPU timing runs with a fixed, printed torch thread count
  (``MMKERNELS_BENCH_THREADS``, default 1: on a shared machine a multi-threaded GEMM is at the mercy
  of whatever else runs, which made the same shape measure 3.7 ms in one run and 37.5 ms in another);
* :func:`peak_memory_mb` -- CUDA peak memory of one call, in MB above the memory held before it;
* :func:`ceilings` -- nominal peaks of known cards and, on CUDA, a measured ceiling (one 8192^3 bf16
  matmul, one 1 GiB device copy; cached per run);
* :func:`write_results`, :func:`print_table`, :func:`plot_sweep` -- JSON, fixed-width table, PNG;
  on CPU they name the ``mmkernels`` provider for what it runs there (:func:`provider_label`:
  ``"mmkernels, reference path (CPU)"``);
* :func:`paired_ratio`, :func:`rank_flag` -- back-to-back timing of two providers and the rule that
  flags a comparison too noisy to rank (:data:`NOISE_RULE`);
* :func:`committed_gpu_results` -- the GPU numbers committed under ``benchmarks/results`` and whether
  the kernels changed since they were measured (one line per file).

An operator benchmark module exposes ``run(args) -> dict`` returning
``{"rows": [...], "verification": [...], "ok": bool, "extra": {...}}``; :mod:`benchmarks.run` calls it.

Nothing here imports mmkernels at module level: :mod:`benchmarks.run` must be able to set
``TRITON_INTERPRET`` before mmkernels is imported.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

# do_bench budgets in *milliseconds* of GPU time (triton converts them to a repetition count from a
# first estimate).  Small on purpose: the whole GPU sweep has to fit a few minutes.
CUDA_WARMUP_MS = 10
CUDA_REP_MS = 40


def is_cuda() -> bool:
    return bool(torch.cuda.is_available())


def default_device() -> torch.device:
    return torch.device("cuda") if is_cuda() else torch.device("cpu")


def synchronize() -> None:
    if is_cuda():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- machine header

def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                   capture_output=True, text=True, timeout=10)
            suffix = "-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else ""
            return out.stdout.strip() + suffix
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("GIT_COMMIT", "unknown")


def git_commit_full() -> str:
    """The full sha of HEAD (``-dirty`` when tracked files differ): the results JSON's ``"commit"``,
    the kernels it measured."""
    short = _git_commit()
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip() + ("-dirty" if short.endswith("-dirty") else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return short


def device_name() -> str:
    if is_cuda():
        try:
            return torch.cuda.get_device_name()
        except Exception:  # pragma: no cover - defensive
            return "cuda"
    cpu = platform.processor() or platform.machine() or "cpu"
    try:  # a nicer name on Linux
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {cpu}"


def device_slug(name: str | None = None) -> str:
    """Short file-name-safe device tag: 'h100', 'h200', 'a100', ... or 'cpu'."""
    name = name or device_name()
    low = name.lower()
    if not is_cuda() or low.startswith("cpu"):
        return "cpu"
    for key in ("h200", "h100", "h800", "a100", "a800", "l40s", "l4", "a10g", "b200", "gh200"):
        if key in low:
            return key
    return re.sub(r"[^a-z0-9]+", "-", low).strip("-")[:32] or "cuda"


_HEADER: dict[str, Any] | None = None


def machine_header() -> dict[str, Any]:
    """Device, versions, commit, mmkernels.build_info() (computed once per process)."""
    global _HEADER
    if _HEADER is not None:
        return _HEADER
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    header: dict[str, Any] = {
        "device": device_name(),
        "device_slug": device_slug(),
        "cuda_available": is_cuda(),
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "git_commit": _git_commit(),
        "hostname": platform.node(),
        "timestamp": _dt.datetime.now().isoformat(timespec="seconds"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "cpu_threads": torch.get_num_threads(),
    }
    if is_cuda():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        header["sm_count"] = props.multi_processor_count
        header["device_memory_gb"] = round(props.total_memory / 2**30, 1)
        header["compute_capability"] = f"{props.major}.{props.minor}"
    try:
        import mmkernels

        header["build_info"] = mmkernels.build_info()
    except Exception as e:  # the harness must work even if mmkernels is broken
        header["build_info"] = {"error": f"{type(e).__name__}: {e}"}
    _HEADER = header
    return header


def format_header(header: dict[str, Any]) -> str:
    keys = ["device", "torch_version", "triton_version", "cuda_version", "python_version", "git_commit",
            "timestamp", "triton_interpret", "cpu_threads", "compute_capability", "sm_count",
            "device_memory_gb"]
    lines = [f"  {k:<18} {header[k]}" for k in keys if k in header]
    bi = header.get("build_info") or {}
    if bi:
        lines.append("  build_info:")
        lines.extend(f"    {k:<20} {v}" for k, v in bi.items())
    return "\n".join(lines)


# --------------------------------------------------------------------------- timing

DEFAULT_CPU_THREADS = 1


def cpu_threads_setting() -> int:
    """The torch thread count CPU timings use: ``MMKERNELS_BENCH_THREADS`` or 1."""
    raw = os.environ.get("MMKERNELS_BENCH_THREADS", "").strip()
    if not raw:
        return DEFAULT_CPU_THREADS
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"MMKERNELS_BENCH_THREADS must be a positive integer, got {raw!r}") from None
    if n < 1:
        raise ValueError(f"MMKERNELS_BENCH_THREADS must be a positive integer, got {raw!r}")
    return n


def pin_cpu_threads(n: int | None = None) -> int:
    """``torch.set_num_threads(n)`` (default :func:`cpu_threads_setting`); returns n."""
    n = cpu_threads_setting() if n is None else n
    torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """``torch.set_num_threads(n)`` inside the block (None: the count is left as it is); the count
    before the block is restored after it."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Timing(tuple):
    """``(p50, p20, p80)`` in ms -- indexable and unpackable like the plain tuple it replaces -- plus
    ``.min`` (ms), ``.reps`` (timed repetitions, warm-up excluded) and ``.threads`` (torch threads
    on CPU, None on CUDA)."""

    min: float
    reps: int
    threads: int | None

    def __new__(cls, p50: float, p20: float, p80: float, min_ms: float, reps: int, threads: int | None):
        self = super().__new__(cls, (p50, p20, p80))
        self.min, self.reps, self.threads = min_ms, reps, threads
        return self

    @property
    def median(self) -> float:
        return self[0]

    def fields(self) -> dict[str, Any]:
        """Row fields: ms (median), ms_min, ms_p20, ms_p80, reps, threads."""
        return dict(ms=self[0], ms_min=self.min, ms_p20=self[1], ms_p80=self[2], reps=self.reps,
                    threads=self.threads)


def _quantiles(samples: Sequence[float], qs: Sequence[float]) -> list[float]:
    s = sorted(samples)
    out = []
    for q in qs:  # linear interpolation, like torch.quantile
        pos = q * (len(s) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out.append(s[lo] + (s[hi] - s[lo]) * (pos - lo))
    return out


def cpu_time_ms(fn: Callable[[], Any], warmup: int = 2, min_reps: int = 5, max_reps: int = 25,
                min_time_s: float = 0.25, grad_to_none: Iterable[torch.Tensor] | None = None) -> Timing:
    """:class:`Timing` of ``fn`` on CPU with the current torch thread count (pinned by the caller,
    see :func:`pin_cpu_threads`): ``warmup`` untimed calls, then at least ``min_reps`` timed calls
    and until ``min_time_s`` has passed (at most ``max_reps``), each call timed on its own, with the
    garbage collector off while timing."""
    grads = list(grad_to_none or [])

    def clear():
        for t in grads:
            t.grad = None

    for _ in range(warmup):
        clear()
        fn()
    samples: list[float] = []
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() - start < min_time_s):
            clear()
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    p50, p20, p80 = _quantiles(samples, (0.5, 0.2, 0.8))
    return Timing(p50, p20, p80, min(samples), len(samples), torch.get_num_threads())


def timer_description(on_cuda: bool) -> str:
    """What :func:`time_ms` does on this device, for table headers and the JSON config."""
    if on_cuda:
        return (f"triton.testing.do_bench(warmup={CUDA_WARMUP_MS}ms, rep={CUDA_REP_MS}ms), warm-up untimed; "
                "min and median of the repetitions")
    n = torch.get_num_threads()
    return (f"time.perf_counter, {n} torch thread{'s' if n != 1 else ''}, 2 untimed warm-up calls, "
            "min and median of 5-25 timed calls, GC off while timing")


def cuda_time_ms(fn: Callable[[], Any], grad_to_none: Iterable[torch.Tensor] | None = None,
                 warmup: int = CUDA_WARMUP_MS, rep: int = CUDA_REP_MS) -> Timing:
    """:class:`Timing` via ``triton.testing.do_bench`` (triton 3.6 signature:
    ``do_bench(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean")``;
    warmup and rep are budgets in ms, the warm-up is not timed).  do_bench synchronises and
    flushes L2 itself."""
    from triton.testing import do_bench

    grads = list(grad_to_none) if grad_to_none is not None else None
    res = do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grads, quantiles=[0.5, 0.2, 0.8, 0.0])
    p50, p20, p80, p0 = (float(v) for v in res)
    return Timing(p50, p20, p80, p0, -1, None)


def time_ms(fn: Callable[[], Any], grad_to_none: Iterable[torch.Tensor] | None = None,
            **kwargs) -> Timing:
    """:class:`Timing` on the current device (CUDA: do_bench; CPU: perf_counter, see :func:`cpu_time_ms`)."""
    if is_cuda():
        return cuda_time_ms(fn, grad_to_none=grad_to_none, **kwargs)
    return cpu_time_ms(fn, grad_to_none=grad_to_none, **kwargs)


def sweep_timer(device: torch.device, warmup: int = 10, rep: int = 40) -> Callable[[Callable[[], Any]], float]:
    """The tuning sweeps' timer (``benchmarks/tune_*.py``): milliseconds of one candidate.  On CUDA a
    short ``do_bench`` mean (a sweep ranks many candidates; the winners are re-timed by the benchmarks);
    on CPU one untimed call, then one timed call: under the interpreter a sweep only proves it runs."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=warmup, rep=rep))

    def cpu(fn: Callable[[], Any]) -> float:
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return cpu


def mode_call(forward: Callable[[], Any], mode: str, dy: torch.Tensor | None = None) -> Callable[[], Any]:
    """What one timed call of ``forward`` in a benchmark mode runs: ``"fwd"`` under no_grad,
    ``"fwd+bwd"`` as ``forward().backward(dy)``."""
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return forward()
        return call
    return lambda: forward().backward(dy)


def time_mode(forward: Callable[[], Any], mode: str, dy: torch.Tensor | None = None,
              leaves: Iterable[torch.Tensor] = ()) -> Timing:
    """:func:`time_ms` of ``forward`` in a benchmark mode (:func:`mode_call`), with the ``leaves``'
    gradients cleared before each ``"fwd+bwd"`` call."""
    if mode == "fwd":
        return time_ms(mode_call(forward, mode))
    return time_ms(mode_call(forward, mode, dy), grad_to_none=list(leaves))


# --------------------------------------------------------------------------- paired runs and noise

PAIRED_REPS = 7
PAIRED_MIN_SAMPLE_MS = 5.0   # a paired sample repeats a faster call until it lasts about this long
NOISE_RULE = (f"rank: each comparison is also timed in {PAIRED_REPS} back-to-back pairs (the two calls of a pair "
              "see the same load); a ratio whose paired samples' 20-80 % range contains 1.00 cannot rank the "
              "two providers on this machine and is flagged 'noisy'")


class PairedRatio(float):
    """``t(base) / t(ours)`` from back-to-back pairs: the median of the per-pair ratios (the float
    value), their 20 % and 80 % quantiles ``.p20`` / ``.p80`` and the ``.samples``."""

    p20: float
    p80: float
    samples: list[float]

    def __new__(cls, samples: Sequence[float]):
        p50, p20, p80 = _quantiles(samples, (0.5, 0.2, 0.8))
        self = super().__new__(cls, p50)
        self.p20, self.p80, self.samples = p20, p80, list(samples)
        return self

    @property
    def noisy(self) -> bool:
        """The :data:`NOISE_RULE`: the paired samples do not agree on which of the two is faster."""
        return self.p20 <= 1.0 <= self.p80

    def inverse(self) -> "PairedRatio":
        """``t(ours) / t(base)`` from the same pairs."""
        return PairedRatio([1.0 / r for r in self.samples])


def paired_ratio(fn_ours: Callable[[], Any], fn_base: Callable[[], Any], leaves: Iterable[torch.Tensor] = (),
                 reps: int = PAIRED_REPS) -> PairedRatio:
    """``t(base) / t(ours)`` over ``reps`` rounds, the two sides of a round timed back to back (their
    order alternating between rounds), after one untimed call of each; the ``leaves``' gradients are
    cleared before every call.  A side of a round repeats its call so that it lasts about
    :data:`PAIRED_MIN_SAMPLE_MS` (sub-millisecond calls are otherwise timer noise).  On a shared CPU a
    burst of load from another process hits both sides of a round alike, so the per-round ratios are
    far steadier than a ratio of two separate medians."""
    grads = list(leaves)
    calls = 1

    def once(fn):
        synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            for t in grads:
                t.grad = None
            fn()
        synchronize()
        return time.perf_counter() - t0

    fastest = min(once(fn_ours), once(fn_base))  # warm-up
    calls = max(1, min(100, math.ceil(PAIRED_MIN_SAMPLE_MS * 1e-3 / max(fastest, 1e-9))))
    ratios = []
    for i in range(reps):
        if i % 2:
            base = once(fn_base)
            ours = once(fn_ours)
        else:
            ours = once(fn_ours)
            base = once(fn_base)
        ratios.append(base / ours)
    return PairedRatio(ratios)


def rank_flag(**comparisons: PairedRatio | None) -> str:
    """The ``rank`` column: ``""`` when every given comparison can be ranked, else ``"noisy: <names>"``
    (the comparisons whose paired runs do not agree, :data:`NOISE_RULE`)."""
    noisy = [name.replace("_", " ") for name, r in comparisons.items() if r is not None and r.noisy]
    return f"noisy: {', '.join(noisy)}" if noisy else ""


def profiler_device_time_attr(evt: Any) -> str:
    """The self device-time attribute of a ``torch.profiler`` average (``FunctionEventAvg``): it was
    renamed across torch versions (``self_device_time_total``, earlier ``self_cuda_time_total``)."""
    return "self_device_time_total" if hasattr(evt, "self_device_time_total") else "self_cuda_time_total"


def peak_memory_mb(fn: Callable[[], Any], grad_to_none: Iterable[torch.Tensor] | None = None
                   ) -> float | None:
    """Peak CUDA memory of one call of ``fn`` (e.g. one fwd+bwd), in MB (1e6 bytes) above what was
    allocated just before it (the inputs).  None on CPU.  Grads in ``grad_to_none`` are cleared
    first, so the gradients the call allocates count."""
    if not is_cuda():
        return None
    for t in grad_to_none or []:
        t.grad = None
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - baseline
    for t in grad_to_none or []:
        t.grad = None
    return peak / 1e6


# --------------------------------------------------------------------------- ceilings

# Nominal dense peaks (no sparsity) keyed by a lower-case substring of the device name; first match
# wins, so more specific keys come first.  bf16 TFLOP/s, HBM TB/s.
CARD_CEILINGS: dict[str, dict[str, float]] = {
    "h200": {"bf16_tflops": 989.0, "hbm_tbps": 4.8},
    "h100 pcie": {"bf16_tflops": 756.0, "hbm_tbps": 2.0},
    "h100": {"bf16_tflops": 989.0, "hbm_tbps": 3.35},  # SXM
    "a100": {"bf16_tflops": 312.0, "hbm_tbps": 2.0},
}


def nominal_ceiling(name: str | None = None) -> dict[str, float] | None:
    low = (name or device_name()).lower()
    for key, value in CARD_CEILINGS.items():
        if key in low:
            return dict(value, source=f"nominal ({key})")
    return None


_MEASURED: dict[str, float] | None = None


def measured_ceiling() -> dict[str, float] | None:
    """On CUDA: achieved bf16 TFLOP/s of one 8192^3 matmul and GB/s of a 1 GiB device-to-device
    copy (read + write counted), best of the do_bench repetitions, measured once per process (a
    tuned GEMM can still land slightly above 100 %).  None on CPU."""
    global _MEASURED
    if not is_cuda():
        return None
    if _MEASURED is not None:
        return _MEASURED
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    from triton.testing import do_bench

    # best time, not the median: a ceiling should be the most the card did (clocks vary run to run)
    mm_ms = float(do_bench(lambda: torch.matmul(a, b), warmup=25, rep=150, return_mode="min"))
    del a, b
    nbytes = 2**30
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    cp_ms = float(do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="min"))
    del src, dst
    torch.cuda.empty_cache()
    _MEASURED = {
        "bf16_tflops": 2 * n**3 / (mm_ms * 1e-3) / 1e12,
        "hbm_tbps": 2 * nbytes / (cp_ms * 1e-3) / 1e12,
        "matmul_8192_ms": mm_ms,
        "copy_1GiB_ms": cp_ms,
    }
    return _MEASURED


def ceilings(measure: bool = True) -> dict[str, Any]:
    """{"nominal": {...} | None, "measured": {...} | None, "reference": the one % is taken against}."""
    nominal = nominal_ceiling()
    measured = measured_ceiling() if measure else None
    ref = None
    if measured:
        ref = dict(bf16_tflops=measured["bf16_tflops"], hbm_tbps=measured["hbm_tbps"], source="measured")
    elif nominal:
        ref = nominal
    return {"nominal": nominal, "measured": measured, "reference": ref}


def pct_of(value: float | None, ceiling: float | None) -> float | None:
    if value is None or not ceiling:
        return None
    return 100.0 * value / ceiling


# --------------------------------------------------------------------------- rows, table, files

def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12 if ms > 0 else float("nan")


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9 if ms > 0 else float("nan")


def provider_label(provider: str, on_cuda: bool | None = None) -> str:
    """The name tables, plots and the results JSON give a provider.  On CPU, mmkernels' default backend
    runs the plain-PyTorch reference path (the Triton kernels run on CPU only under Triton's
    interpreter, in the verification tables), so an ``mmkernels*`` provider becomes
    ``"<provider>, reference path (CPU)"`` (``"..., Triton interpreter (CPU)"`` under
    ``MMKERNELS_BACKEND=triton``).  Other providers keep their names."""
    on_cuda = is_cuda() if on_cuda is None else on_cuda
    if on_cuda or not str(provider).startswith("mmkernels") or ", " in str(provider):
        return provider
    import mmkernels

    path = "Triton interpreter" if mmkernels.get_backend() == "triton" else "reference path"
    return f"{provider}, {path} (CPU)"


def labelled_rows(rows: Sequence[Any]) -> list[Any]:
    """``rows`` with each dict's ``provider`` given its :func:`provider_label` (copies; the rows the
    benchmark modules compute with keep their plain names)."""
    return [dict(r, provider=provider_label(r["provider"])) if isinstance(r, dict) and "provider" in r else r
            for r in rows]


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str | None]]) -> str:
    """Fixed-width table (:func:`mmkernels.verify.format_table`, imported late: see the module docstring)."""
    from mmkernels.verify import format_table as _format_table

    return _format_table(rows, columns)


def print_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str | None]]) -> None:
    """The table, providers labelled (:func:`provider_label`); under a table with a ``rank`` column, the
    rule it applies (:data:`NOISE_RULE`)."""
    print(f"\n== {title} ==")
    print(format_table(labelled_rows(rows), columns) if rows else "(no rows)", flush=True)
    if any(key == "rank" for key, _, _ in columns) and any(r.get("rank") is not None for r in rows):
        print(NOISE_RULE, flush=True)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (rows, titles, the results JSON)."""
    return str(dtype).replace("torch.", "")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.dtype):
        return dtype_name(obj)
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def result_paths(op: str, out_dir: str | Path | None = None, stamp: str | None = None) -> dict[str, Path]:
    out = Path(out_dir) if out_dir else RESULTS_DIR
    slug = device_slug()
    stamp = stamp or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return {
        "json": out / f"{op}-{slug}-{stamp}.json",
        "json_latest": out / f"{op}-{slug}-latest.json",
        "png_latest": out / f"{op}-{slug}-latest.png",
    }


def write_results(op: str, payload: dict[str, Any], out_dir: str | Path | None = None,
                  keep_timestamped: bool = True) -> list[Path]:
    """Write ``{"op", "machine", **payload}`` to ``<op>-<slug>-<timestamp>.json`` and
    ``<op>-<slug>-latest.json`` under ``out_dir`` (default benchmarks/results), providers labelled
    (:func:`provider_label`).  Returns the paths."""
    paths = result_paths(op, out_dir)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    payload = {k: labelled_rows(v) if isinstance(v, list) else v for k, v in payload.items()}
    doc = _jsonable({"op": op, "commit": git_commit_full(), "machine": machine_header(), **payload})
    text = json.dumps(doc, indent=1, sort_keys=False) + "\n"
    written = []
    targets = [paths["json"], paths["json_latest"]] if keep_timestamped else [paths["json_latest"]]
    for p in targets:
        p.write_text(text)
        written.append(p)
    return written


def plot_sweep(op: str, rows: Sequence[dict[str, Any]], *, panel_keys: Sequence[str], x_key: str, y_key: str,
               series_key: str, title: str, y_label: str, x_label: str | None = None,
               hlines: dict[str, float] | None = None, out_dir: str | Path | None = None,
               panel_title: Callable[[tuple], str] | None = None) -> Path | None:
    """One PNG per operator sweep: a grid of panels (one per distinct value of ``panel_keys``; the
    first key picks the grid row), ``x_key`` on the x axis, one line per ``series_key``.  ``hlines``
    maps a label to a y value drawn in every panel whose first panel key matches the label prefix
    before ':' (or every panel if the label has no ':').  Returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # pragma: no cover
        print(f"(no plot: matplotlib unavailable: {e})")
        return None
    rows = [r for r in labelled_rows(rows) if r.get(y_key) is not None]
    if not rows:
        return None
    first_vals = list(dict.fromkeys(r[panel_keys[0]] for r in rows))
    rest = list(dict.fromkeys(tuple(r[k] for k in panel_keys[1:]) for r in rows))
    nrows, ncols = len(first_vals), max(1, len(rest))
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(8.0, 4.2 * ncols + 0.6), 3.2 * nrows + 1.6),
                             squeeze=False)
    series_vals = list(dict.fromkeys(r[series_key] for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, fv in enumerate(first_vals):
        for j, rv in enumerate(rest):
            ax = axes[i][j]
            key = (fv, *rv)
            sub = [r for r in rows if tuple(r[k] for k in panel_keys) == key]
            xs_all = sorted(dict.fromkeys(r[x_key] for r in sub), key=lambda v: (isinstance(v, str), v))
            for s_idx, sv in enumerate(series_vals):
                pts = sorted(((r[x_key], r[y_key]) for r in sub if r[series_key] == sv),
                             key=lambda p: (isinstance(p[0], str), p[0]))
                if not pts:
                    continue
                xs = [xs_all.index(p[0]) for p in pts]
                ax.plot(xs, [p[1] for p in pts], marker="o", label=str(sv), color=colors[s_idx % len(colors)])
            ax.set_xticks(range(len(xs_all)))
            ax.set_xticklabels([str(x) for x in xs_all], fontsize=8)
            for label, y in (hlines or {}).items():
                prefix, _, text = label.partition(":")
                if text and prefix != str(fv):
                    continue
                ax.axhline(y, color="gray", linestyle="--", linewidth=1)
                ax.annotate(text or label, (1, y), xycoords=("axes fraction", "data"), xytext=(-2, 2),
                            textcoords="offset points", ha="right", fontsize=7, color="gray")
            ax.set_title(panel_title(key) if panel_title else ", ".join(map(str, key)), fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.tick_params(labelsize=8)
            if j == 0:
                ax.set_ylabel(y_label, fontsize=9)
            if i == nrows - 1:
                ax.set_xlabel(x_label or x_key, fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for a in axes.flat:
        h, l = a.get_legend_handles_labels()
        for hh, ll in zip(h, l):
            if ll not in labels:
                handles.append(hh)
                labels.append(ll)
    fig.legend(handles, labels, loc="lower center", fontsize=8, ncol=max(1, min(6, len(labels))), frameon=False)
    hdr = machine_header()
    fig.suptitle(f"{title}\n{hdr['device']} | torch {hdr['torch_version']} | triton {hdr['triton_version']} "
                 f"| commit {hdr['git_commit']}", fontsize=9)
    height = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, 0.45 / height, 1, 1 - 0.5 / height))
    path = result_paths(op, out_dir)["png_latest"]
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def geomean(values: Iterable[float]) -> float:
    vals = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else float("nan")


def error_line(e: BaseException, limit: int = 200) -> str:
    """``"<ExceptionType>: <first line of its message, at most limit characters>"``: the reason a
    "not measured" row or a failed case gives."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:limit]}"


def worst(items: Iterable[Any], better: str, key: Callable[[Any], float | None] | None = None) -> Any:
    """The worst of ``items`` for a target where ``better`` is ``"higher"`` (the minimum) or ``"lower"``
    (the maximum), by ``key`` (default: the item itself); items whose key is None (not measured) are
    skipped; None when nothing is left."""
    key = key or (lambda v: v)
    pool = [v for v in items if key(v) is not None]
    if not pool:
        return None
    return min(pool, key=key) if better == "higher" else max(pool, key=key)


def target(id: str, value: float | None, goal: float, better: str, what: str) -> dict[str, Any]:
    """One entry of a results JSON's ``"targets"`` list: ``{id, value, goal, better, met, target}``.

    ``value`` is the worst case over the target's shapes (None when nothing was measured: not met);
    ``better`` is ``"higher"`` (met when value >= goal) or ``"lower"`` (value <= goal); ``target`` is the
    human-readable line that :func:`print_targets` prints."""
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', got {better!r}")
    met = value is not None and (value >= goal if better == "higher" else value <= goal)
    return {"id": id, "value": None if value is None else round(float(value), 4), "goal": goal, "better": better,
            "met": bool(met), "target": what}


def print_targets(op: str, targets: list[dict], on_cuda: bool, cpu_note: str) -> None:
    """The MET / NOT MET lines of an operator's GPU targets (gpu_check.sh greps them)."""
    print(f"\n== {op} targets ==")
    if on_cuda:
        for t in targets:
            print(f"  [{'MET' if t['met'] else 'NOT MET':>7}] {t['target']}: {t['value']}")
    else:
        print(f"  targets are GPU-only ({cpu_note})")


def pedantic_cpu(benchmark, fn, rounds: int, setup=None, warmup_rounds: int = 2):
    """``benchmark.pedantic`` on CPU with the thread count pinned (:func:`cpu_threads_setting`, restored
    afterwards and recorded in ``extra_info``), ``warmup_rounds`` untimed rounds first, and the
    result of the last round returned.  Under ``--benchmark-disable`` (``make test``) it is a smoke
    test: ``fn`` runs once, nothing is timed or printed."""
    threads = cpu_threads_setting()
    benchmark.extra_info["threads"] = threads
    with cpu_threads(threads):
        return benchmark.pedantic(fn, setup=setup, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)


def cpu_benchmark_case(benchmark, forward, mode: str, dy, leaves, rounds: int):
    """Time ``forward`` (``"fwd"``: under no_grad; ``"fwd+bwd"``: with ``backward(dy)``) with
    pytest-benchmark (:func:`pedantic_cpu`), clearing the leaves' gradients before each round;
    return one more output (gradients fresh) for the caller's correctness check."""
    def clear():
        for t in leaves:
            t.grad = None

    def fn():
        if mode == "fwd":
            with torch.no_grad():
                return forward()
        y = forward()
        y.backward(dy)
        return y

    pedantic_cpu(benchmark, fn, rounds=rounds, setup=clear)
    clear()
    return fn()


# --------------------------------------------------------------------------- committed GPU numbers

def _kernel_paths(op: str) -> list[str]:
    """Where an operator's kernels live (git pathspecs): its package, its CPU and CUDA native sources."""
    return [f"mmkernels/ops/{op}", f"csrc/{op}", f":(glob)csrc/cuda/{op}_*"]


def committed_gpu_results(op: str) -> list[dict[str, Any]]:
    """The GPU results of ``op`` committed under ``benchmarks/results`` (``<op>-<card>-latest.json``):
    per file ``{file, device, commit, stale, line}``.  ``stale`` is True when the operator's kernels
    (:func:`_kernel_paths`) differ between the commit the numbers were measured at and the working
    tree, None when that commit is not in this clone's history; ``line`` says it in one line."""
    out = []
    for path in sorted(RESULTS_DIR.glob(f"{op}-*-latest.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        machine = doc.get("machine") or {}
        if not machine.get("cuda_available"):
            continue
        commit = (doc.get("commit") or machine.get("git_commit") or "").removesuffix("-dirty")
        stale = None
        if commit:
            try:
                r = subprocess.run(["git", "diff", "--quiet", commit, "--", *_kernel_paths(op)], cwd=REPO_ROOT,
                                   capture_output=True, timeout=30)
                stale = {0: False, 1: True}.get(r.returncode)
            except (OSError, subprocess.SubprocessError):
                stale = None
        rel = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path
        short = commit[:7] or "an unknown commit"
        status = {True: f"stale: the {op} kernels changed since", False: "current kernels",
                  None: "commit not in this clone's history"}[stale]
        out.append(dict(file=str(rel), device=machine.get("device"), commit=commit or None, stale=stale,
                        line=f"{machine.get('device', 'GPU')} numbers ({rel}): measured at {short}; {status}"))
    return out
