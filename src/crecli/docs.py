"""Generate shell completions and the man page from the CLI itself.

Run `python -m crecli.docs` after changing a command or option; tests/test_docs.py fails
when the committed files in completions/ and man/ no longer match what this produces.
"""

from __future__ import annotations

from pathlib import Path

import typer

try:  # typer >= 0.20 vendors click
    from typer import _click as click
except ImportError:  # pragma: no cover
    import click  # type: ignore[no-redef]

from crecli import __version__
from crecli.cli import EXIT_CODES, app

SHELLS = {"bash": "cre.bash", "zsh": "_cre", "fish": "cre.fish"}
ENVIRONMENT = {
    "CRE_HOME": "Keep all of crecli's config, cache and data under this one folder.",
    "CRE_MODELS": "An extra models.toml, as if given with --models.",
    "CRE_MODELS_DIR": "Where assembled model files live (default: the user cache dir).",
    "CRE_THREADS": "llama.cpp threads (default: the number of usable cores, or the cgroup CPU quota where lower).",
    "CRE_LLAMA_EXTRA_BUFTS": "0 or 1: keep llama.cpp's extra (repacked or AMX) CPU buffer types off or on "
    "(default: off on CPUs with AMX, where they crash the first decode; on elsewhere).",
    "CRE_DEBUG": "Show llama.cpp's own log output.",
    "CRE_PROGRESS_INTERVAL": "Seconds between plain progress lines when stderr is not a terminal (default: 30).",
}


def _command() -> click.Command:
    return typer.main.get_command(app)


def completion(shell: str) -> str:
    # The same script `cre --show-completion SHELL` prints; it calls back into `cre`, so it
    # completes commands and options of whatever version is installed.
    from typer._completion_shared import get_completion_script

    return get_completion_script(prog_name="cre", complete_var="_CRE_COMPLETE", shell=shell)


def _esc(text: str) -> str:
    text = text.replace("\\", "\\\\").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in text.splitlines())


def _paragraphs(text: str) -> str:
    blocks = [b.strip("\n") for b in text.strip().split("\n\n") if b.strip()]
    out = []
    for block in blocks:
        if block.startswith("  "):
            out.append(".PP\n.nf\n" + _esc("\n".join(l[2:] for l in block.splitlines())) + "\n.fi")
        else:
            out.append(".PP\n" + _esc(" ".join(l.strip() for l in block.splitlines())))
    return "\n".join(out)


def _options(cmd: click.Command, ctx: click.Context) -> str:
    lines = []
    for param in cmd.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        name, help_text = record
        lines.append(f".TP\n.B {_esc(name)}\n{_esc(help_text)}")
    return "\n".join(lines)


def _walk(cmd: click.Command, path: list[str], parent: click.Context | None) -> list[str]:
    ctx = click.Context(cmd, info_name=path[-1], parent=parent)
    sections = []
    if len(path) > 1:
        usage = " ".join(cmd.collect_usage_pieces(ctx))
        sections.append(f'.SS "{_esc(" ".join(path))}"\n.B {_esc(" ".join(path))} {_esc(usage)}\n{_paragraphs(cmd.help or "")}')
        opts = _options(cmd, ctx)
        if opts:
            sections.append(opts)
    if hasattr(cmd, "list_commands"):  # a group (typer and click name the class differently)
        for name in sorted(cmd.list_commands(ctx)):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                sections.extend(_walk(sub, [*path, name], ctx))
    return sections


def manpage() -> str:
    cmd = _command()
    ctx = click.Context(cmd, info_name="cre")
    env = "\n".join(f".TP\n.B {k}\n{_esc(v)}" for k, v in ENVIRONMENT.items())
    return "\n".join(
        [
            f'.TH CRE 1 "" "cre {__version__}" "User Commands"',
            ".SH NAME",
            "cre \\- answer prompts with the cheapest local model that keeps quality",
            ".SH SYNOPSIS",
            ".B cre\n[\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
            ".SH DESCRIPTION",
            _paragraphs(cmd.help or ""),
            ".SH OPTIONS",
            _options(cmd, ctx),
            ".SH COMMANDS",
            *_walk(cmd, ["cre"], None),
            ".SH EXIT STATUS",
            _paragraphs(EXIT_CODES),
            ".SH ENVIRONMENT",
            env,
            ".SH FILES",
            ".TP\n.B models.toml\nThe model ladder: shipped defaults, then the user file in the config dir "
            "(see \\fBcre models path\\fR), then \\fB\\-\\-models\\fR.",
            "",
        ]
    )


def generate(root: Path) -> dict[Path, str]:
    files = {root / "man" / "cre.1": manpage()}
    for shell, name in SHELLS.items():
        files[root / "completions" / name] = completion(shell)
    return files


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m crecli.docs", description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", type=Path, default=Path.cwd(), help="the repository root (default: .)")
    root = parser.parse_args().root
    for path, text in generate(root).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
