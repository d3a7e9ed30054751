"""The committed man page and completions must match what the CLI generates."""

from __future__ import annotations

from pathlib import Path

from crecli.docs import generate

ROOT = Path(__file__).resolve().parents[1]


def test_man_page_and_completions_are_current() -> None:
    stale = [
        str(path.relative_to(ROOT))
        for path, text in generate(ROOT).items()
        if not path.is_file() or path.read_text() != text
    ]
    assert not stale, f"regenerate with `python -m crecli.docs`: {stale} are stale"


def test_man_page_documents_every_command_and_exit_codes() -> None:
    man = (ROOT / "man" / "cre.1").read_text()
    for command in ("cre ask", "cre models pull", "cre models list", "cre models bench"):
        assert f'.SS "{command}"' in man
    assert ".SH EXIT STATUS" in man and "130 interrupted" in man
