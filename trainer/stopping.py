"""Stopping a run on a signal with a checkpoint, as a cluster asks before it preempts a job.

The first SIGTERM or SIGUSR1 (Slurm: ``#SBATCH --signal=USR1@600`` sends it ten minutes before
the time limit) asks the run to stop at the end of the current RL step: ``Trainer.run`` saves a
resumable checkpoint there and raises :class:`RunStopped`; ``--resume auto`` continues from it. A
second signal of either kind ends the process at once, as without a handler. Under ``torchrun``
the ranks agree at every step boundary (one all-reduce), so they stop at the same step even when
the signal reached only some of them.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class RunStopped(Exception):
    """The run stopped on a signal after step ``step``, with its checkpoint at ``checkpoint``."""

    def __init__(self, signal_name: str | None, step: int, checkpoint: Path) -> None:
        self.signal_name = signal_name
        self.step = step
        self.checkpoint = checkpoint
        cause = signal_name or "a signal another rank received"
        super().__init__(
            f"stopped on {cause} after RL step {step}; checkpoint {checkpoint} (resume with --resume auto)"
        )

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process a signal ended."""
        number = getattr(signal, self.signal_name or "SIGTERM", signal.SIGTERM)
        return 128 + int(number)


class StopSignals:
    """While entered (in the main thread), the first stop signal sets :attr:`received` (its name)
    instead of ending the process; a second one ends it. Restores the previous handlers on exit."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            logger.debug("not the main thread: stop signals keep their handlers")
            return self
        for name in STOP_SIGNALS:
            number = getattr(signal, name, None)
            if number is not None:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame) -> None:
        name = signal.Signals(number).name
        if self.received is not None:  # the second signal: end now, as the default action does
            logger.warning("%s again: stopping now, without a checkpoint of this step", name)
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
            return
        self.received = name
        logger.warning("%s: the run stops after this RL step with a checkpoint (send it again to stop now)", name)

    def __exit__(self, *exc_info) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()
