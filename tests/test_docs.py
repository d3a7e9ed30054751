"""The docs must say what the CLI does: the committed man page and completions match what
it generates, every `cre` command shown in README.md and docs/ parses, README stays a
short guide, and docs/how-it-works.md's module table matches the package."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path
from typing import Iterator

import pytest
import typer

from crecli.cli import app
from crecli.docs import click  # typer >= 0.20 vendors its own click: the one the app is built on
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


def test_man_page_documents_every_environment_variable_crecli_reads() -> None:
    # The man page's ENVIRONMENT is a hand-kept list (docs.ENVIRONMENT): CRE_LLAMA_EXTRA_BUFTS
    # was read and in the README but missing there. Every "CRE_..." string literal in the
    # package names a variable it reads.
    read = {
        node.value
        for path in (ROOT / "src" / "crecli").rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"CRE_[A-Z0-9_]+", node.value)
    }
    man = (ROOT / "man" / "cre.1").read_text()
    environment = man[man.index(".SH ENVIRONMENT"):]
    missing = [name for name in sorted(read) if f".B {name}\n" not in environment]
    assert read and not missing, f"add {missing} to docs.ENVIRONMENT"


# ---------------------------------------------------------------- commands shown in the docs

README = ROOT / "README.md"
README_MAX_LINES = 330  # "at most about 300" (issue 21), with a little slack
SHELL_BLOCKS = {"", "sh", "bash", "shell", "console"}
SEPARATORS = {"|", "||", "&&", ";", "&", "(", ")"}
REDIRECTIONS = {"<", ">", ">>", "<<", "<<<", ">&", "&>", "<&", ">|"}
_FENCE = re.compile(r"^```(\S*)\s*$")
_FD_BEFORE_REDIRECT = re.compile(r"(?<=\s)\d+(?=[<>])")  # the 2 of `2> err.log`
_INLINE = re.compile(r"(?<!`)`(cre [^`]+)`(?!`)")


def doc_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def shell_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, logical line) of every fenced shell block; `\\` continuations joined."""
    lang: str | None = None
    pending, start = "", 0
    for number, line in enumerate(text.splitlines(), 1):
        fence = _FENCE.match(line.strip())
        if fence:
            lang = fence.group(1).lower() if lang is None else None
            continue
        if lang not in SHELL_BLOCKS:
            continue
        if line.startswith("$ "):
            line = line[2:]
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def cre_invocations(line: str) -> list[list[str]]:
    """The argument lists of every `cre` command on a shell line: pipes, `&&`, `;` split it,
    leading VAR=value assignments, redirections (with their targets) and comments are dropped."""
    lexer = shlex.shlex(_FD_BEFORE_REDIRECT.sub("", line), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    tokens = iter(lexer)
    for token in tokens:
        if token in SEPARATORS:
            commands.append([])
        elif token in REDIRECTIONS:
            next(tokens, None)
        elif not commands[-1] and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", token):
            continue
        else:
            commands[-1].append(token)
    return [words[1:] for words in commands if words and words[0] == "cre"]


def check_invocation(args: list[str], strict: bool = True) -> str | None:
    """Why `cre ARGS` would not parse against the real Typer app, or None if it would.

    Nothing runs: the subcommand path is walked to the command, then its parser is run
    (`make_context`), which refuses unknown options, bad values and missing arguments.
    strict=False (inline mentions such as `cre calibrate --check deferral`, which leave out
    arguments) only checks that each option exists."""
    command: click.Command = typer.main.get_command(app)
    path = ["cre"]
    args = list(args)
    while hasattr(command, "get_command") and args and not args[0].startswith("-"):
        name = args.pop(0)
        sub = command.get_command(click.Context(command), name)  # type: ignore[attr-defined]
        if sub is None:
            return f"`{' '.join(path)}` has no subcommand {name!r}"
        command, path = sub, [*path, name]
    if strict:
        try:
            command.make_context(" ".join(path), args)
        except typer.Exit:  # --help, --version: they exist (and print, which pytest captures)
            return None
        except click.ClickException as exc:
            return f"`{' '.join(path)}`: {exc.format_message()}"
        return None
    options = {name for param in command.params if param.param_type_name == "option"
               for name in (*param.opts, *param.secondary_opts)}
    for word in args:
        if word.startswith("-") and word != "-":
            name = word.split("=", 1)[0]
            if name not in options and name not in ("-h", "--help"):
                return f"`{' '.join(path)}` has no option {name}"
    return None


def shown_commands(path: Path) -> Iterator[tuple[str, list[str], bool]]:
    """(where, args, strict) of each `cre` command in a file: fenced shell blocks strictly,
    inline `cre ...` code spans for their options only."""
    text = path.read_text()
    for number, line in shell_lines(text):
        for args in cre_invocations(line):
            yield f"{path.name}:{number}", args, True
    for number, line in enumerate(text.splitlines(), 1):
        for span in _INLINE.findall(line):
            for args in cre_invocations(span):
                yield f"{path.name}:{number}", args, False


def test_every_cre_command_in_the_docs_parses() -> None:
    checked = 0
    problems = []
    for path in doc_files():
        for where, args, strict in shown_commands(path):
            checked += 1
            why = check_invocation(args, strict)
            if why:
                problems.append(f"{where}: cre {shlex.join(args)}: {why}")
    assert checked > 20, f"found only {checked} `cre` commands in the docs: is the extraction broken?"
    assert not problems, "commands in the docs that the CLI would refuse:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "line, reason",
    [
        ("cre ask 'What is 7 plus 5?' --explian", "no such option"),
        ("cre fit examples/querylog.jsonl -o router.cre --budget 0.9", "no such option"),
        ("cre calibrat router.cre", "no subcommand"),
        ("cre models fetch", "no subcommand"),
        ("head -5 log.jsonl | cre batch --paralel 2 > out.jsonl", "no such option"),
        ("cre fit", "missing argument"),
        ("cre batch --parallel many < in.jsonl", "invalid value for '--parallel'"),
    ],
)
def test_a_wrong_command_is_caught(line: str, reason: str) -> None:
    (args,) = cre_invocations(line)
    why = check_invocation(args)
    assert why is not None and reason in why.lower(), why


def test_inline_mentions_check_their_options() -> None:
    assert check_invocation(["calibrate", "--check", "deferral"], strict=False) is None
    assert "no option --chek" in (check_invocation(["calibrate", "--chek", "deferral"], strict=False) or "")


def test_the_extraction_skips_what_is_not_cre(tmp_path: Path) -> None:
    text = (
        "```sh\n"
        "CRE_KEY=s3cret cre serve --api-key-env CRE_KEY \\\n"
        "  --memory-budget 4GB 2> serve.log   # a comment --not-an-option\n"
        "cre log --last 5 --json | jq -r '.[].prompt'\n"
        "pip install cre\n"
        "```\n"
        "```python\ncre ask --nonsense\n```\n"
    )
    found = [args for _, line in shell_lines(text) for args in cre_invocations(line)]
    assert found == [
        ["serve", "--api-key-env", "CRE_KEY", "--memory-budget", "4GB"],
        ["log", "--last", "5", "--json"],
    ]
    assert all(check_invocation(args) is None for args in found)


def test_readme_is_a_short_guide() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it a guide (at most {README_MAX_LINES}) and move depth to docs/"


# ---------------------------------------------------------------- docs/how-it-works.md's module table

HOW_IT_WORKS = ROOT / "docs" / "how-it-works.md"
PACKAGE = ROOT / "src" / "crecli"
_MODULE_ROW = re.compile(r"^\|\s*`([\w/]+)\.py`\s*\|")


def table_modules() -> list[str]:
    """The modules of the table under "## Modules", in order, as dotted names (`models.llama`)."""
    section = HOW_IT_WORKS.read_text().split("\n## Modules\n", 1)[1].split("\n## ", 1)[0]
    return [m.group(1).replace("/", ".") for line in section.splitlines() if (m := _MODULE_ROW.match(line))]


def package_modules() -> set[str]:
    return {
        ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"
    }


def runtime_imports(module: str) -> set[str]:
    """The crecli modules `module` imports at run time, inside functions too (not under TYPE_CHECKING)."""
    known = package_modules()
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            test = node.test
            if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                    isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if not node.module or not node.module.startswith("crecli"):
                return
            base = node.module.removeprefix("crecli").lstrip(".")
            for alias in node.names:  # `from crecli import console` names a module
                name = f"{base}.{alias.name}".lstrip(".")
                if name in known:
                    found.add(name)
            if base in known:
                found.add(base)

        def visit_Import(self, node: ast.Import) -> None:
            for alias in node.names:
                name = alias.name.removeprefix("crecli").lstrip(".")
                if name in known:
                    found.add(name)

    path = PACKAGE.joinpath(*module.split(".")).with_suffix(".py")
    Visitor().visit(ast.parse(path.read_text()))
    return found - {module}


def test_the_module_table_lists_every_module() -> None:
    listed = table_modules()
    assert len(listed) == len(set(listed)), f"a module is listed twice in docs/how-it-works.md: {listed}"
    missing, gone = package_modules() - set(listed), set(listed) - package_modules()
    assert not missing and not gone, (
        f"docs/how-it-works.md's module table is stale: add {sorted(missing)}, remove {sorted(gone)}")


def test_the_module_table_is_in_import_order() -> None:
    """The table promises that a module imports only modules in rows above it."""
    order = {name: i for i, name in enumerate(table_modules())}
    wrong = [
        f"{module} imports {dep}, which is listed below it"
        for module, row in order.items() for dep in sorted(runtime_imports(module))
        if order.get(dep, -1) > row
    ]
    assert not wrong, "reorder docs/how-it-works.md's module table (or the imports):\n" + "\n".join(wrong)


# ---------------------------------------------------------------- links between the docs

_LINK = re.compile(r"\]\(([^)\s]+)\)")


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


def test_links_between_the_docs_resolve() -> None:
    broken = []
    for path in doc_files():
        for target in _LINK.findall(path.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{path.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
                broken.append(f"{path.name}: {target} (no such heading)")
    assert not broken, "broken links in the docs:\n" + "\n".join(broken)
