"""Stopping a run on a signal with a checkpoint, as a cluster asks before it preempts a job.

The first stop signal (``train.stop_signals``, default SIGUSR1; Slurm: ``#SBATCH
--signal=USR1@600`` for a trainer started by ``srun``) asks the run to stop at its next boundary:
after the RL step in progress (before a periodic evaluation), after the SFT warm-up, or after the
starting evaluation. ``Trainer.run`` saves a resumable checkpoint there and raises
:class:`RunStopped`; ``--resume auto`` continues from it. A second signal ends the process at
once, even while it waits inside a collective or a long native call (a thread watches the
signals as they arrive; Python runs its own handlers only between bytecodes of the main thread).
Under ``torchrun`` the ranks agree at every boundary (one all-reduce of the signal number), so
they stop at the same point even when the signal reached only some of them. SIGTERM keeps its
default action unless listed: torchrun sends it to end the ranks left after one crashed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

STOP_SIGNALS = ("SIGUSR1",)


class RunStopped(Exception):
    """The run stopped on signal ``signal_number`` after RL step ``step``; ``checkpoint`` is where
    it continues from (None: nothing was trained yet, a new run starts over)."""

    def __init__(self, signal_number: int, step: int, checkpoint: Path | None, auto: bool = True) -> None:
        """``auto``: ``checkpoint`` is in the run folder, where ``--resume auto`` finds it."""
        self.signal_number = signal_number
        self.step = step
        self.checkpoint = checkpoint
        if checkpoint is None:
            where = "nothing trained to save: run the same command again"
        else:
            where = f"checkpoint {checkpoint} (continue with --resume {'auto' if auto else checkpoint})"
        super().__init__(f"stopped on {self.signal_name} after RL step {step}; {where}")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal_number).name

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process a signal ended."""
        return 128 + self.signal_number


class StopSignals:
    """While entered (in the main thread), the first of the signals ``names`` sets
    :attr:`received` (its number) instead of ending the process; a second one ends it at once
    (exit status 128 + its number). Restores the previous handlers and wakeup fd on exit."""

    def __init__(self, names: Sequence[str] = STOP_SIGNALS) -> None:
        self.names = tuple(names)
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._previous_wakeup = -1
        self._wakeup_set = False
        self._pipe: tuple[int, int] | None = None
        self._watcher: threading.Thread | None = None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            logger.debug("not the main thread: stop signals keep their handlers")
            return self
        numbers = [getattr(signal, name) for name in self.names if hasattr(signal, name)]
        if not numbers:
            return self
        read_end, write_end = os.pipe()
        self._pipe = (read_end, write_end)
        try:
            os.set_blocking(write_end, False)
            # The C-level handler writes one byte per delivered signal to this pipe at once,
            # whatever the main thread is doing; the Python-level handler itself does nothing.
            self._previous_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
            self._wakeup_set = True
            for number in numbers:
                self._previous[number] = signal.signal(number, _ignore)
            self._watcher = threading.Thread(target=self._watch, args=(read_end, set(numbers)), daemon=True)
            self._watcher.start()
        except BaseException:
            self._restore()  # nothing half-installed: the signals act as before
            self._close()
            raise
        _active.append(self)
        return self

    def _watch(self, read_end: int, numbers: set[int]) -> None:
        while True:
            try:
                data = os.read(read_end, 64)
            except OSError:
                return
            if not data:  # the write end closed: __exit__
                return
            if self._previous_wakeup >= 0:  # whoever watched before (e.g. asyncio) still hears its signals
                with contextlib.suppress(OSError):
                    os.write(self._previous_wakeup, data)
            for number in data:
                if number in numbers:
                    self._handle(number)

    def _handle(self, number: int) -> None:
        name = signal.Signals(number).name
        if self.received is not None:  # the second signal: end now, as the default action does
            _die(number, f"{name} again: stopping now, without a checkpoint of this step")
            return
        self.received = number
        logger.warning("%s: the run stops at the end of this step with a checkpoint (send it again to stop now)", name)

    def _restore(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()
        if self._wakeup_set:
            signal.set_wakeup_fd(self._previous_wakeup)
            self._wakeup_set = False

    def _close(self) -> None:
        if self._pipe is None:
            return
        read_end, write_end = self._pipe
        os.close(write_end)  # the watcher reads end-of-file and returns
        if self._watcher is not None and self._watcher.is_alive():
            self._watcher.join(timeout=5)
        if self._watcher is None or not self._watcher.is_alive():  # else it may still read: leave it open
            os.close(read_end)
        self._pipe = None

    def __exit__(self, *exc_info) -> None:
        if self._pipe is None:
            return
        if self in _active:
            _active.remove(self)
        self._restore()
        self._close()


_active: list[StopSignals] = []


def _reset_in_child() -> None:
    """A process forked (without exec) while signals are watched gets the previous handlers back:
    it has no watcher thread, would ignore SIGTERM (``multiprocessing.Pool.terminate`` sends it)
    and would report its signals through the parent's pipe."""
    for watched in reversed(_active):
        watched._restore()
        if watched._pipe is not None:
            for end in watched._pipe:
                os.close(end)
        watched._pipe = None
    _active.clear()


os.register_at_fork(after_in_child=_reset_in_child)


def _ignore(number: int, frame) -> None:
    """The Python-level handler: the watcher thread acts on the wakeup byte instead."""


def _die(number: int, message: str) -> None:
    """End the process at once with exit status 128 + ``number``, from any thread: no logging (a
    handler's lock may be held by the stuck main thread), only a line on stderr."""
    with contextlib.suppress(OSError):
        os.write(2, f"{message}\n".encode())
    os._exit(128 + number)
