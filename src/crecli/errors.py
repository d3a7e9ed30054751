"""One exception family. The CLI turns any CreError into `Error: ...` and exit code 1.

Messages say what went wrong and what to do next, because users read them in a terminal
with no traceback.
"""

from __future__ import annotations


class CreError(Exception):
    """Base of every error crecli reports to a user."""

    exit_code: int = 1


class ConfigError(CreError):
    """A models.toml (or other settings file) is unreadable or inconsistent."""


class ModelNotAvailable(CreError):
    """A model file is missing or failed verification."""


class InputError(CreError):
    """Bad user input, usually with a `file:line:` prefix."""


class RouterFileError(CreError):
    """A router file is unreadable, tampered with, or from an unknown schema."""


class BackendError(CreError):
    """A backend (llama.cpp or a remote server) failed to answer."""


class PromptTooLong(BackendError):
    """The prompt does not fit the model's context: the caller's to shorten, so `cre serve` answers 400."""
