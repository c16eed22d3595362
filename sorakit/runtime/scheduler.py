"""CI-DL: one scheduler runs every chain of block graphs under a memory budget.

Concurrent Inference with Dynamic Loading (On-device Sora, section 3), done properly:

* **Measured costs.** Each graph's resident cost is the RSS its session adds once it has
  run (its weights paged in or repacked), and its working memory is the extra peak during a
  run. Before a graph has run, its file size stands in.
* **Residency by budget.** Graphs used most often in the current generation stay resident
  across steps while the resident set, plus room to stream the rest two at a time, plus
  the largest working memory, fits the budget. The set is recomputed whenever the usage
  changes (e.g. the switch from TDTM to plain blocks), so it cannot drift.
* **No budget ("unlimited")** means no limit of sorakit's own, not more memory than the
  machine has: graphs stay resident while physical memory holds them (all of them on a
  machine that can), and when a phase needs the room, the graphs of finished phases are the
  first released (e.g. a 19 GB fp32 T5 once the prompts are encoded).
* **Prefetch.** While graph i runs, the next non-resident graph's session is built in a
  background thread (ORT releases the GIL). A prefetch error is raised in the caller when
  that graph is needed (or at the end of the call); a prefetch that is no longer wanted
  is cancelled with ORT's load-cancellation flag.
* **Accounting.** Loads, bytes loaded, load time hidden behind compute vs exposed, and the
  peak RSS are reported per call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sorakit.bundle.io import Bundle
from sorakit.bundle.manifest import GraphEntry
from sorakit.errors import BudgetError, SorakitError
from sorakit.memory import PeakRSS, available_memory, bound_heap, release_memory, rss_bytes
from sorakit.runtime.session import ORT, SessionFactory, shrink_arena_options
from sorakit.units import human_bytes

log = logging.getLogger(__name__)


@dataclass
class GraphCost:
    file_bytes: int
    resident: int | None = None  # measured RSS of the session after its first run
    working: int | None = None  # measured extra peak during a run
    load_s: float | None = None  # measured session creation time (first load, alone)
    run_s: float | None = None  # measured first run time

    @property
    def estimate(self) -> int:
        return self.resident if self.resident is not None else self.file_bytes


def io_estimate(g: GraphEntry) -> int:
    """Working memory of a graph before it has run: four times its static inputs and outputs."""
    io = 0
    for t in g.inputs + g.outputs:
        if all(isinstance(d, int) for d in t.shape):
            io += int(np.prod(t.shape)) * (8 if t.dtype == "int64" else 4)
    return 4 * io


def graph_bytes(bundle: Bundle, g: GraphEntry) -> int:
    return sum(bundle.path(f).stat().st_size for f in g.files())


def minimum_budget(bundle: Bundle, graphs: list[GraphEntry]) -> int:
    """The smallest budget that runs these graphs one at a time, before anything was measured."""
    return max(graph_bytes(bundle, g) + io_estimate(g) for g in graphs)


@dataclass
class SchedulerStats:
    loads: int = 0
    bytes_loaded: int = 0
    load_seconds: float = 0.0
    load_hidden: float = 0.0  # load time that overlapped compute
    load_exposed: float = 0.0  # time the caller waited for a session
    run_seconds: float = 0.0
    prefetches: int = 0
    prefetch_cancelled: int = 0
    thread_policy: str = "all cores"
    peak_rss: int = 0
    base_rss: int = 0
    resident: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Prefetch:
    """A session being built in a background thread."""

    def __init__(self, scheduler: BlockScheduler, graph: GraphEntry):
        self.graph = graph
        self.session = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.options = scheduler.stream_options(graph)
        self.seconds = 0.0
        self.started = time.perf_counter()
        self._scheduler = scheduler
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"prefetch-{graph.name}")
        self.thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            self.session = self._scheduler._create(self.graph, self.options)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            self.error = e
        self.seconds = time.perf_counter() - t0

    def cancel(self) -> None:
        self.cancelled = True
        self.options.cancel()

    def wait(self) -> float:
        t0 = time.perf_counter()
        self.thread.join()
        return time.perf_counter() - t0


class BlockScheduler:
    def __init__(
        self,
        bundle: Bundle,
        factory: SessionFactory,
        budget: int | None = None,
        prefetch: bool = True,
        engine_of: Callable[[GraphEntry], str] | None = None,
    ):
        self.bundle = bundle
        self.factory = factory
        self.engine_of = engine_of or (lambda g: ORT)
        self.budget = budget
        self.prefetch_enabled = prefetch
        if budget is not None:
            bound_heap()  # streamed sessions must give their memory back exactly
        self.sessions: dict[str, Any] = {}
        self.costs: dict[str, GraphCost] = {}
        self.resident: set[str] = set()
        self.usage: dict[str, int] = {}
        self.order: list[GraphEntry] = list(bundle.manifest.all_graphs())
        self.active: set[str] = set()
        self._pending: _Prefetch | None = None
        self._peak = PeakRSS()
        self.stats = SchedulerStats()
        for g in bundle.manifest.all_graphs():
            self.costs[g.name] = GraphCost(graph_bytes(bundle, g))

    # -- budget planning -----------------------------------------------------------------------
    def working_estimate(self, g: GraphEntry) -> int:
        c = self.costs[g.name]
        return c.working if c.working is not None else io_estimate(g)

    def minimum_budget(self, graphs: list[GraphEntry]) -> int:
        """The smallest budget that runs these graphs one at a time."""
        return max(self.costs[g.name].estimate + self.working_estimate(g) for g in graphs)

    def check_budget(self, graphs: list[GraphEntry], base: int = 0) -> None:
        """Refuse a budget below the largest graph plus its working memory (``base``: what the
        process used before the budget's graphs, added to the figures in the message)."""
        if self.budget is None:
            return
        need = self.minimum_budget(graphs)
        if self.budget < need:
            largest = max(graphs, key=lambda g: self.costs[g.name].estimate)
            raise BudgetError(
                f"memory budget {human_bytes(self.budget + base)} leaves {human_bytes(self.budget)} beside what the "
                f"process uses already, below the largest block ({largest.name}, "
                f"{human_bytes(self.costs[largest.name].estimate)} plus working memory); the smallest workable budget "
                f"is about {human_bytes(need + base)}"
            )

    def set_usage(self, usage: dict[str, int], order: list[GraphEntry], active: list[GraphEntry] | None = None) -> None:
        """Re-plan residency from how often graphs will still run in this call.

        ``active`` are the graphs of the current phase (e.g. the denoising chain): the budget
        must hold the resident set, room to stream the active graphs that are not resident
        (two at a time with prefetch), and the largest working memory among them. Graphs of
        later phases, or not mentioned at all, stay resident only while there is room left.
        """
        self.usage = dict(usage)
        seen = {g.name for g in order}
        self.order = list(order) + [g for g in self.order if g.name not in seen]
        self.active = {g.name for g in (active if active is not None else order) if usage.get(g.name, 0) > 0}
        self._plan()

    # share of the physical room (available memory plus what our sessions hold) that an
    # unbudgeted run fills: the rest is left to the inputs, outputs and the rest of the machine
    ROOM_SHARE = 0.9

    def room(self) -> int:
        """Memory our graphs could hold without a budget: what is available now plus what
        the sessions held already occupy."""
        held = sum(self.costs[n].estimate for n in self.sessions)
        return int((available_memory() + held) * self.ROOM_SHARE)

    def limit(self) -> int:
        """The memory the graphs' sessions may use: the budget, or without one, the room."""
        return self.budget if self.budget is not None else self.room()

    def _plan(self) -> None:
        names = [g.name for g in self.order]
        by_name = {g.name: g for g in self.order}
        limit = self.limit()
        active = self.active or set(names)
        working = max((self.working_estimate(by_name[n]) for n in active), default=0)
        if self.budget is None and sum(self.costs[n].estimate for n in names) + working <= limit:
            self.resident = set(names)  # unbudgeted and the machine holds everything
        else:
            ranked = sorted(names, key=lambda n: (n not in active, -self.usage.get(n, 0), names.index(n)))
            chosen: list[str] = []
            for n in ranked:
                trial = chosen + [n]
                streamed = [self.costs[m].estimate for m in active if m not in trial]
                reserve = sum(sorted(streamed)[-2:]) if self.prefetch_enabled else max(streamed, default=0)
                if sum(self.costs[m].estimate for m in trial) + reserve + working <= limit:
                    chosen = trial
            self.resident = set(chosen)
        for name in [n for n in self.sessions if n not in self.resident]:
            self._release(name)
        self.stats.resident = sorted(self.resident, key=names.index)

    # -- sessions -------------------------------------------------------------------------------
    def stream_threads(self) -> int | None:
        """Intra-op threads for sessions of streamed graphs, chosen from measurements.

        Building the next session overlaps the current run only if a core is free for it. That
        pays when loading takes longer than computing (e.g. Core ML compiling a model, or a slow
        disk); when runs dominate, taking a core from every run costs more than the overlap
        saves. So: one core fewer for streamed sessions only if their measured mean load time
        exceeds their mean run time, else all cores.
        """
        import os

        cores = self.factory.defaults.threads or os.cpu_count() or 1
        streamed = [self.costs[n] for n in self.active if n not in self.resident]
        measured = [c for c in streamed if c.load_s is not None and c.run_s is not None]
        if cores < 2 or not measured:
            self.stats.thread_policy = "all cores"
            return None
        mean_load = sum(c.load_s for c in measured) / len(measured)
        mean_run = sum(c.run_s for c in measured) / len(measured)
        if mean_load > mean_run:
            self.stats.thread_policy = f"{cores - 1} of {cores} cores while prefetching (loads outlast runs)"
            return cores - 1
        self.stats.thread_policy = "all cores (runs outlast loads)"
        return None

    def stream_options(self, g: GraphEntry):
        """Options of a streamed graph's session: the streaming thread count, no weight prepacking.

        Measured on a real-size STDiT3 block pair (2 cores, 170 MB): prepacking costs 0.27-0.33 s
        at load and saves 0.15-0.2 s per run, so it pays only for sessions that run many times
        (resident ones).
        """
        return self.factory.options(threads=self.stream_threads(), prepack=False, engine=self.engine_of(g))

    def load_options(self, g: GraphEntry):
        """Options of a session built on demand: a streamed graph's (see ``stream_options``); a
        graph that runs once in this call skips weight prepacking too, since repacking costs more
        than it saves in one run (a real-size int8 T5 layer on the prompt's tokens: 0.40 s to
        build with it, 0.01 s without, as ONNX Runtime then maps the weights from the file; the
        run takes 0.09 s instead of 0.015 s); the rest, ONNX Runtime's defaults."""
        if g.name not in self.resident and self.costs[g.name].load_s is not None:
            return self.stream_options(g)
        if self.usage and self.usage.get(g.name, 0) <= 1:
            return self.factory.options(prepack=False, engine=self.engine_of(g))
        return None

    def _create(self, g: GraphEntry, options=None):
        self.bundle.verify_graph_files(g)
        return self.factory.create(self.bundle.path(g.file), options or self.factory.options(engine=self.engine_of(g)))

    def _acquire(self, g: GraphEntry):
        if g.name in self.sessions:
            return self.sessions[g.name]
        p = self._pending
        if p is not None and p.graph.name == g.name:
            waited = p.wait()
            self._pending = None
            if p.error is not None:
                raise p.error
            self.stats.load_exposed += waited
            self.stats.load_hidden += max(0.0, p.seconds - waited)
            self._count_load(g, p.seconds)
            self.sessions[g.name] = p.session
            return p.session
        t0 = time.perf_counter()
        sess = self._create(g, self.load_options(g))
        dt = time.perf_counter() - t0
        if self.costs[g.name].load_s is None:
            self.costs[g.name].load_s = dt
        self.stats.load_exposed += dt
        self._count_load(g, dt)
        self.sessions[g.name] = sess
        return sess

    def _count_load(self, g: GraphEntry, seconds: float) -> None:
        self.stats.loads += 1
        self.stats.bytes_loaded += self.costs[g.name].file_bytes
        self.stats.load_seconds += seconds

    def _release(self, name: str) -> None:
        sess = self.sessions.pop(name, None)
        if sess is not None:
            del sess
            release_memory()

    def _can_prefetch(self, g: GraphEntry, running: GraphEntry) -> bool:
        if not self.prefetch_enabled or g.name in self.sessions:
            return False
        if self.costs[g.name].resident is None:
            return False  # first load of a graph is measured alone, without a prefetch beside it
        held = sum(self.costs[n].estimate for n in self.sessions)
        extra = 0 if running.name in self.sessions else self.costs[running.name].estimate
        return held + extra + self.costs[g.name].estimate + self.working_estimate(running) <= self.limit()

    def _start_prefetch(self, g: GraphEntry | None, running: GraphEntry) -> None:
        if g is None or self._pending is not None or not self._can_prefetch(g, running):
            return
        self._pending = _Prefetch(self, g)
        self.stats.prefetches += 1

    def cancel_prefetch(self) -> None:
        p, self._pending = self._pending, None
        if p is None:
            return
        p.cancel()
        p.thread.join()
        self.stats.prefetch_cancelled += 1
        if p.session is not None:
            del p.session
            release_memory()

    # -- running ---------------------------------------------------------------------------------
    def run(self, g: GraphEntry, ctx: dict[str, np.ndarray], then: GraphEntry | None = None) -> None:
        """Run one graph on ``ctx`` (inputs by name, outputs written back), prefetching ``then``."""
        first = self.costs[g.name].resident is None
        if first:
            release_memory()
        before = rss_bytes()
        sess = self._acquire(g)
        self._start_prefetch(then, g)
        feeds = {}
        for t in g.inputs:
            if t.name not in ctx:
                raise SorakitError(f"graph {g.name} needs input {t.name!r}, which no earlier graph produced")
            feeds[t.name] = ctx[t.name]
        loaded = rss_bytes()
        self._peak.reset()
        t0 = time.perf_counter()
        if self._phase_ends(g, then):
            # the phase's last run: give the shared arena's memory back for the next phase
            outs = sess.run([o.name for o in g.outputs], feeds, shrink_arena_options())
        else:
            outs = sess.run([o.name for o in g.outputs], feeds)
        self.stats.run_seconds += time.perf_counter() - t0
        peak = self._peak.peak()
        self.stats.peak_rss = max(self.stats.peak_rss, peak)
        after = rss_bytes()
        for o, v in zip(g.outputs, outs):
            ctx[o.binds or o.name] = v
        if first:
            c = self.costs[g.name]
            c.run_s = time.perf_counter() - t0
            c.resident = max(after - before - sum(v.nbytes for v in outs), loaded - before, 0)
            c.working = max(peak - after, 0)
            if self.usage:
                self._plan()
        if g.name not in self.resident:
            self._release(g.name)

    def _phase_ends(self, g: GraphEntry, then: GraphEntry | None) -> bool:
        """True when ``g`` runs on ORT with the shared arena and nothing of its phase follows."""
        if self.factory.defaults.arena != "shared" or self.engine_of(g) != ORT:
            return False
        return then is None or (bool(self.active) and then.name not in self.active)

    def run_chain(self, graphs: list[GraphEntry], ctx: dict[str, np.ndarray], then: GraphEntry | None = None) -> None:
        for i, g in enumerate(graphs):
            self.run(g, ctx, graphs[i + 1] if i + 1 < len(graphs) else then)

    # -- call boundaries ---------------------------------------------------------------------------
    def begin(self) -> None:
        self.stats = SchedulerStats(base_rss=rss_bytes())
        self.stats.resident = sorted(self.resident)
        self._peak.reset()

    def end(self) -> SchedulerStats:
        """Finish a call: cancel a prefetch nobody will use, surface prefetch errors."""
        p, self._pending = self._pending, None
        if p is not None:
            finished = not p.thread.is_alive()
            p.cancel()
            p.thread.join()
            self.stats.prefetch_cancelled += 1
            if p.session is not None:
                del p.session
            if finished and p.error is not None:
                raise p.error  # it failed on its own, before anyone cancelled it
        for name in [n for n in self.sessions if n not in self.resident]:
            self._release(name)
        self.stats.peak_rss = max(self.stats.peak_rss, self._peak.peak())
        return self.stats

    def close(self) -> None:
        self.cancel_prefetch()
        for name in list(self.sessions):
            self._release(name)
        self.resident.clear()

