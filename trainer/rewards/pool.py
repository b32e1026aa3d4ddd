"""A process pool that grades answers with a per-answer timeout; a hang or a crash scores 0.

math-verify bounds its work with ``signal.alarm``, which only works in a process's main thread,
so grading runs in worker processes, never in threads. Each answer gets two deadlines:

- a soft one inside the worker (``signal.setitimer``): it interrupts Python-level work (sympy's
  simplify, latex parsing) and the worker moves on to the next answer;
- a hard one in the trainer process (pebble's per-task timeout): if the soft deadline cannot fire
  (a C call that never returns to the interpreter), pebble kills the worker and starts a new one.

Either way the answer scores 0 and is counted, and the other answers keep their workers.
"""

from __future__ import annotations

import importlib.machinery
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from pebble import ProcessExpired, ProcessPool

logger = logging.getLogger(__name__)

STATUSES = ("ok", "timeout", "error", "crash")
_HEAVY_MODULES = ("numpy", "torch", "triton", "transformers", "datasets")


@dataclass(frozen=True)
class GradeOutcome:
    """Score of one graded answer and how grading ended: ``ok``, ``timeout``, ``error`` or ``crash``."""

    score: float
    status: str


class _Deadline(BaseException):
    """Raised by SIGALRM inside a worker; a BaseException so library ``except Exception`` blocks let it through."""


def _on_alarm(signum, frame):
    raise _Deadline


def _run_with_deadline(grade_fn: Callable[..., float], args: tuple, timeout_s: float) -> tuple[float, str]:
    """Worker side: ``grade_fn(*args)`` under a soft deadline of ``timeout_s`` seconds."""
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return float(grade_fn(*args)), "ok"
    except _Deadline:
        return 0.0, "timeout"
    except Exception as error:
        logger.debug("grading %r raised %r", args, error)
        return 0.0, "error"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# Grading a step's distinct answers needs a few workers, and each imports sympy and math-verify
# (~100 MB): one per core of a 224-thread node would hold ~20 GB for nothing.
MAX_DEFAULT_WORKERS = 32


def default_num_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_WORKERS))


class GradingPool:
    """Grades many argument tuples with ``grade_fn`` (a module-level function returning a score) in worker processes.

    Workers never fork the trainer process, which holds torch threads and possibly a CUDA context
    that a fork would copy in an unusable state: they fork from a fork server (spawned where there
    is none). ``grade_fn`` must be importable by module and name. ``preload`` names modules the
    fork server imports for all workers; ``initializer`` runs once per worker (logging setup, a
    first call that fills lazy caches) so the first answer does not pay for it.
    """

    def __init__(
        self,
        grade_fn: Callable[..., float],
        *,
        num_workers: int | None = None,
        timeout_s: float = 5.0,
        hard_timeout_s: float | None = None,
        initializer: Callable[[], None] | None = None,
        preload: Sequence[str] = (),
    ) -> None:
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.grade_fn = grade_fn
        self.num_workers = num_workers or default_num_workers()
        self.timeout_s = float(timeout_s)
        self.hard_timeout_s = float(hard_timeout_s) if hard_timeout_s is not None else 2.0 * self.timeout_s + 2.0
        if self.hard_timeout_s <= self.timeout_s:
            raise ValueError(f"hard_timeout_s={self.hard_timeout_s} must exceed timeout_s={self.timeout_s}")
        self._initializer = initializer
        self._preload = tuple(preload)
        self._pool: ProcessPool | None = None
        self._restore_main: Callable[[], None] = _noop

    def _ensure_pool(self) -> ProcessPool:
        if self._pool is None or not self._pool.active:
            self._restore_main = _keep_workers_from_rerunning_main(self.grade_fn)
            self._pool = ProcessPool(
                max_workers=self.num_workers,
                initializer=self._initializer,
                context=_worker_context(self.grade_fn, self._preload),
            )
        return self._pool

    def grade(self, items: Sequence[tuple]) -> list[GradeOutcome]:
        """Grade every argument tuple of ``items``; returns one outcome per item, in order."""
        if not items:
            return []
        pool = self._ensure_pool()
        futures = [
            pool.schedule(
                _run_with_deadline, args=(self.grade_fn, tuple(args), self.timeout_s), timeout=self.hard_timeout_s
            )
            for args in items
        ]
        outcomes = []
        for args, future in zip(items, futures, strict=True):
            try:
                score, status = future.result()
            except FutureTimeout:
                logger.warning(
                    "grading %r passed the hard timeout of %.1fs; its worker was killed", args, self.hard_timeout_s
                )
                score, status = 0.0, "timeout"
            except ProcessExpired as error:
                logger.warning("the worker grading %r died (%s)", args, error)
                score, status = 0.0, "crash"
            outcomes.append(GradeOutcome(score, status))
        return outcomes

    def warm_up(self, items: Sequence[tuple] = ()) -> float:
        """Start the workers (and grade ``items``) ahead of the first step; returns the seconds it took."""
        start = time.perf_counter()
        pool = self._ensure_pool()
        for future in [pool.schedule(_noop) for _ in range(self.num_workers)]:
            future.result()
        self.grade(items)
        return time.perf_counter() - start

    def close(self) -> None:
        if self._pool is not None:
            self._pool.stop()
            self._pool.join()
            self._pool = None
            self._restore_main()

    def __enter__(self) -> GradingPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _keep_workers_from_rerunning_main(grade_fn: Callable[..., float]) -> Callable[[], None]:
    """Stop every worker from re-running the caller's main script; returns the undo.

    A spawned or fork-server child re-imports ``__main__`` from its file unless the module has a
    spec named ``__main__``: a quick script without an ``if __name__ == "__main__":`` guard (or
    code piped on standard input) would then run again in every worker, start pools of its own
    and kill them ("All workers expired"). Grading functions live in importable modules, so the
    workers need nothing from ``__main__``; a grading function defined in ``__main__`` itself keeps
    the standard behaviour (and needs the guard).
    """
    main = sys.modules.get("__main__")
    if main is None or getattr(grade_fn, "__module__", None) == "__main__" or getattr(main, "__spec__", None):
        return _noop
    main.__spec__ = importlib.machinery.ModuleSpec("__main__", None)

    def restore() -> None:
        main.__spec__ = None

    return restore


def _worker_context(grade_fn: Callable[..., float], preload: Sequence[str]):
    """Forkserver where there is one, spawn elsewhere: never a fork of the trainer process itself.

    A worker re-runs the trainer's main module (multiprocessing does so for every child, and
    CPython's fork server does not preload ``__main__`` as documented), so the fork server imports
    the heavy libraries the trainer has already imported, the grading function's module and
    ``preload`` once; every worker, including one that replaces a killed worker, then forks from
    it in milliseconds instead of importing torch again (seconds per worker). The fork server is
    shared by the process: its preload list counts only if this is the first pool to start it.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    module = getattr(grade_fn, "__module__", None)
    modules = [name for name in _HEAVY_MODULES if name in sys.modules]
    modules += [*preload, module] if module and module != "__main__" else list(preload)
    context.set_forkserver_preload(modules)
    return context


def _noop() -> None:
    return None


def count_statuses(outcomes: Sequence[GradeOutcome]) -> dict[str, int]:
    """How many outcomes ended in each status (every status present, zeros included)."""
    counts = Counter(outcome.status for outcome in outcomes)
    return {status: counts.get(status, 0) for status in STATUSES}
