"""One exception family. The CLI turns any CreError into `Error: ...` and its class's exit
code: 1, or 2 for a UsageError (bad usage, as Click's own errors).

Messages say what went wrong and what to do next, because users read them in a terminal
with no traceback.
"""

from __future__ import annotations

from typing import Any


class CreError(Exception):
    """Base of every error crecli reports to a user."""

    exit_code: int = 1


class UsageError(CreError):
    """An option value wrong in itself (out of range, an unknown name) or options that
    conflict, found after Click parsed them: exit 2, as Click's own usage errors. A value
    that only this router or log cannot take stays a CreError (exit 1)."""

    exit_code = 2


class ConfigError(CreError):
    """A models.toml (or other settings file) is unreadable or inconsistent."""


class ModelNotAvailable(CreError):
    """A model file is missing or failed verification. `missing` names the model when the
    fix is `cre models pull`, so a caller that knows the ladder can name every model of it
    that a pull would mend at once (`models.pull.unavailable`); `state` keeps what was found
    of its file (a `models.pull.FileState`: "sha256 mismatch", which only a hash may have
    found), for that message."""

    def __init__(self, message: str, missing: str = "", state: Any = None) -> None:
        super().__init__(message)
        self.missing = missing
        self.state = state


class StoreError(CreError):
    """An outcome store could not be opened, read or written: `outcomes.store_error` names the
    cause (damage, the disk, ...) and the fix for it."""


class InputError(CreError):
    """Bad user input, usually with a `file:line:` prefix."""


class RouterFileError(CreError):
    """A router file is unreadable, tampered with, or from an unknown schema."""


class BackendError(CreError):
    """A backend (llama.cpp or a remote server) failed to answer."""


class ModelLoadError(BackendError):
    """llama.cpp could not load a model file that is there (corrupt, an architecture this build
    does not know, no memory): like a missing file, the rung cannot answer at all."""


class PromptTooLong(BackendError):
    """The prompt does not fit the model's context: the caller's to shorten, so `cre serve` answers 400.

    `public` is what a `cre serve` client is told, where the message names what only the
    server's operator should see (a remote rung's address, its server's reply)."""

    def __init__(self, message: str, public: str = "") -> None:
        super().__init__(message)
        self.public = public or message
