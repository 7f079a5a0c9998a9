"""One exception type per failure kind; callers tell failures apart by type, never by message.

===========================  ==============================================  ==========
type                         when                                            CLI exit
===========================  ==============================================  ==========
:class:`ConfigError`         a setting is invalid, names the key             2
:class:`NonFiniteError`      a loss, gradient, Hessian-vector product or a   3 (train),
                             statistic's input is NaN or infinite            2 (probe)
:class:`Interrupted`         SIGTERM/SIGINT; the run was checkpointed        130 / 143
:class:`CorruptCheckpointError`   a checkpoint fails its SHA-256 check       2
:class:`UnloadableCheckpointError`  a checkpoint cannot be unpickled safely  2
===========================  ==============================================  ==========

``ConfigError``, ``NonFiniteError`` and both checkpoint errors derive from
:class:`ValueError` (bad input), so code that catches ``ValueError`` keeps
working; a refused output directory is the built-in :class:`FileExistsError`.
This module imports nothing, so every layer may raise these.

>>> issubclass(NonFiniteError, ValueError), issubclass(NonFiniteError, FloatingPointError)
(True, True)
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "CorruptCheckpointError",
    "Interrupted",
    "NonFiniteError",
    "UnloadableCheckpointError",
]


class ConfigError(ValueError):
    """A setting is invalid (unknown key, wrong type, bad value, not available here).

    The message names the key: ``config: bad value for 'eta': -1.0 (...)``.
    """


class NonFiniteError(ValueError, FloatingPointError):
    """A loss, gradient, Hessian-vector product or statistic input is NaN or infinite.

    Raised before anything is changed: a training step that meets one applies no
    update, a probe returns nothing. The message names the component (and the
    parameters, where known).
    """


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived; the run was checkpointed at a component boundary.

    Attributes
    ----------
    signum : int
        The signal number (the CLI exits with ``128 + signum``).
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


class CorruptCheckpointError(ValueError):
    """A checkpoint whose SHA-256 sidecar is missing or does not match its bytes."""


class UnloadableCheckpointError(ValueError):
    """A checkpoint that passes its checksum but cannot be unpickled safely.

    ``torch.load(weights_only=True)`` refused it: it holds objects other than
    tensors and plain containers (a pickle from elsewhere, or a malicious one),
    or it is not a torch file at all. It is never loaded with full unpickling.
    """
