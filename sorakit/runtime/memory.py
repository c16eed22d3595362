"""Process memory: resident set size, its peak, and giving freed heap back to the OS.

Linux reads /proc (VmHWM can be reset by writing 5 to /proc/self/clear_refs); elsewhere the
peak falls back to a sampling thread. Standard library only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
import threading

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * _PAGE
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


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
