"""What the hostile-use tests check on a `cre` run through `cli.main()` (the `cre` fixture)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass
class Run:
    """A `cre` run: exit code, stdout, stderr."""

    code: int
    out: str
    err: str


def refused(run: Run, *words: str, code: int = 1) -> None:
    """Exit `code` (1; 2 for a UsageError) with exactly one line, `Error: ...`, naming each of `words`.
    Only the warnings that a router pins no model file may come before it: the fake ladder's
    models are neither pinned nor on disk, so the routers fitted on it pin none."""
    assert run.code == code, run
    before, found, error = run.err.partition("Error: ")
    assert found and error.count("\n") == 1, run.err
    assert before == "" or (before.startswith("Warning: ") and "the router pins no sha256" in before), run.err
    assert "Traceback" not in run.err and run.out == ""
    for word in words:
        assert word in run.err, (word, run.err)


def fit(cre: Callable[..., Run], log: Path, models: Path, *args: str | Path) -> Run:
    """`cre fit LOG --models MODELS ARGS`."""
    return cre("fit", log, "--models", models, *args)


def refused_models_tables(toml: Path, cases: list[tuple[str, str]]) -> None:
    """Each (body of a `[models.remote]` table, words its ConfigError must hold)."""
    import pytest

    from crecli import config
    from crecli.errors import ConfigError

    for body, words in cases:
        toml.write_text('ladder = ["remote"]\n[models.remote]\n' + body)
        with pytest.raises(ConfigError) as info:
            config.load(toml)
        assert words in str(info.value), (body, str(info.value))
