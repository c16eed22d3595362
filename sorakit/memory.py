"""Process memory: resident set size, its peak, available memory, and giving freed heap back.

Portable through psutil (Linux, macOS, Windows): the current RSS, the memory available to a
new allocation and the machine's total. Two Linux-only refinements sit behind platform
checks: the kernel's resettable high-water mark for the peak (``/proc/self/clear_refs``;
elsewhere a sampling thread), and glibc's ``malloc_trim``/``mallopt`` to hand freed heap back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
import threading

import psutil

_SELF = psutil.Process()


def rss_bytes() -> int:
    """Current resident set size of this process (not its peak)."""
    return int(_SELF.memory_info().rss)


def available_memory() -> int:
    """Memory a new allocation can get without swapping (psutil's ``available``)."""
    return int(psutil.virtual_memory().available)


def total_memory() -> int:
    """Physical memory of the machine."""
    return int(psutil.virtual_memory().total)


_libc = None


def release_memory(collect: bool = False) -> None:
    """Return free heap pages to the OS (glibc's malloc_trim); optionally run the GC first.

    Sessions are freed by reference counting as soon as they are dropped, so the (slow, when
    torch is loaded) cycle collector is not needed on the hot path.
    """
    global _libc
    if collect:
        gc.collect()
    if sys.platform.startswith("linux"):
        if _libc is None:
            try:
                _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            except OSError:
                _libc = False
        if _libc and hasattr(_libc, "malloc_trim"):
            _libc.malloc_trim(0)


_heap_bounded = False


def bound_heap(threshold: int = 1 << 20) -> None:
    """Serve allocations above ``threshold`` with mmap, so freeing them returns the memory.

    glibc otherwise raises its mmap threshold after large frees and serves later large blocks
    (repacked weights, activations) from the heap, where fragmentation keeps them: with
    sessions created and dropped every step, RSS crept up by more than the model's size before
    levelling off. A fixed threshold keeps it flat. Process-wide; set once when a budget is used.
    """
    global _heap_bounded, _libc
    if _heap_bounded or not sys.platform.startswith("linux"):
        return
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            _libc = False
    if _libc and hasattr(_libc, "mallopt"):
        _libc.mallopt(-3, int(threshold))  # M_MMAP_THRESHOLD
        _heap_bounded = True


class PeakRSS:
    """Peak resident set size since ``reset()``.

    Uses the kernel's high-water mark where it can be reset (Linux); otherwise samples RSS
    every few milliseconds in a background thread.
    """

    def __init__(self) -> None:
        self._kernel = self._can_reset()
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reset()

    @staticmethod
    def _can_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return PeakRSS._hwm() is not None
        except OSError:
            return False

    @staticmethod
    def _hwm() -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def reset(self) -> None:
        if self._kernel:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return
        self._peak = rss_bytes()
        if self._thread is None:
            self._thread = threading.Thread(target=self._sample, daemon=True, name="sorakit-rss")
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, rss_bytes())

    def peak(self) -> int:
        if self._kernel:
            return max(self._hwm() or 0, rss_bytes())
        return max(self._peak, rss_bytes())

    def close(self) -> None:
        self._stop.set()
