"""Peak memory of a block of work: resident set size and live tensors on the CPU, the caching
allocator's peak on CUDA.

RSS cannot show what a method saves in tensors on the CPU: it counts allocator slack and pages
the allocator keeps, and at small sizes it is a few pages. `LiveTensorPeak` counts the bytes
of live tensors instead, from the PyTorch profiler's memory events (every allocation and free of
c10's CPU allocator, with a time stamp): the peak of their running sum over the block.
"""
from __future__ import annotations

import ctypes
import gc
import resource
import sys

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _CudaOrCpuPeak:
    """A context manager measuring `peak` (bytes) and `peak_mb` over a block: on CUDA the caching
    allocator's peak over what was allocated before; on the CPU what the subclass measures."""

    method = ""

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated - memory_allocated before"
        else:
            self._cpu_enter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = self._cpu_exit(*exc)
        self.peak_mb = self.peak / 2**20
        self.base_mb = self.base / 2**20
        return False


class PeakMemory(_CudaOrCpuPeak):
    """Extra memory a block of work needs over the state before it, in MiB.

    CPU: the peak resident set size (VmHWM, reset through /proc/self/clear_refs just before the
    block) minus the resident set size at that moment, after gc and malloc_trim(0) so that freed
    heap is handed back first. Without clear_refs: ru_maxrss minus the same baseline (a peak that
    happened before the block can then hide inside it). tracemalloc is not used: it does not see
    torch's allocations. CUDA: torch.cuda.max_memory_allocated minus memory_allocated before.
    """

    def _cpu_enter(self) -> None:
        _malloc_trim()
        self.hwm = _reset_hwm() and _proc_status_kb("VmHWM") is not None
        self.base = (_proc_status_kb("VmRSS") or 0) * 1024
        self.method = ("VmHWM (reset via /proc/self/clear_refs) - VmRSS before" if self.hwm
                       else "ru_maxrss - VmRSS before")

    def _cpu_exit(self, *exc) -> int:
        if self.hwm:
            peak = _proc_status_kb("VmHWM") * 1024
        else:  # ru_maxrss is in KiB on Linux, in bytes on macOS
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return peak - self.base


class LiveTensorPeak(_CudaOrCpuPeak):
    """Peak bytes of live tensors a block allocates over what was live at its start, in MiB.

    CPU: the running sum of the profiler's [memory] events (torch.profiler, profile_memory=True),
    in time order; its maximum is the peak of the block's own tensors alive at once. A free of a
    tensor allocated before the block is not reported (the allocator reports frees only of what
    it saw allocated while profiling), so a block that frees older tensors gets an upper bound.
    Allocations outside c10's allocator (e.g. a library's own scratch buffers) are not seen:
    that, and allocator slack, is what RSS adds.
    CUDA: torch.cuda.max_memory_allocated - memory_allocated before, as PeakMemory.
    The profiler slows the block down: time it separately.

        >>> with LiveTensorPeak("cpu") as live:
        ...     a = torch.empty(2**20)          # 4 MiB
        ...     b = torch.empty(2**21); del b   # 8 MiB, then freed
        >>> 12 <= live.peak_mb < 12.1
        True
    """

    def _cpu_enter(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.base, self.method = 0, "live tensors: running sum of torch.profiler memory events"
        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.prof.__enter__()

    def _cpu_exit(self, *exc) -> int:
        self.prof.__exit__(*exc)
        events = [(e.start_ns(), e.nbytes()) for e in self.prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
        del self.prof
        live = peak = 0
        for _, nbytes in sorted(events):
            live += nbytes
            peak = max(peak, live)
        self.events = len(events)
        return peak
