"""The one error type for a backend that cannot run here (shared by the ops and the trainer)."""


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run on this machine, device or input; the message says what it needs."""
