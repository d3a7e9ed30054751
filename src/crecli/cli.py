"""The `cre` command line: options in, one core call, output rendered.

Only typer is imported at module level: shell completion imports this module on every Tab
press, so numpy, umap, hdbscan and llama_cpp are imported inside the commands that use them.
Every CreError becomes `Error: ...` on stderr and exit code 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from crecli import __version__
from crecli.errors import CreError

EXIT_CODES = """Exit codes: 0 success; 1 error (the message says what to do); 2 bad usage;
3 `cre batch` finished but some lines got error records; 130 interrupted (Ctrl-C)."""

app = typer.Typer(
    name="cre",
    help=(
        "Cluster, Route, Escalate: answer prompts with the cheapest local model that keeps "
        "quality.\n\n"
        "Examples:\n\n"
        "  cre models pull                      # fetch and verify the default ladder\n\n"
        "  cre ask 'What is 7 plus 5?' --model qwen2.5-coder-0.5b-instruct\n\n"
        "  cre fit querylog.jsonl -o router.cre # cluster a labelled log, choose models\n\n"
        "  cre ask 'What is 7 plus 5?' --router router.cre --explain\n\n"
        "  cre batch --router router.cre < prompts.jsonl > answers.jsonl\n\n" + EXIT_CODES
    ),
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=True,
)
models_app = typer.Typer(
    help="Manage the model ladder: pull, verify, list and benchmark GGUF models.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(models_app, name="models")

ModelsOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--models",
        help="An extra models.toml, applied over the shipped and user files (also: CRE_MODELS).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout for scripts.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cre {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Cluster, Route, Escalate."""


def _settings(models: Path | None):  # -> config.Settings
    from crecli import config

    return config.load(models)


# ---------------------------------------------------------------- models


@models_app.command("list")
def models_list(
    models: ModelsOpt = None,
    verify: Annotated[bool, typer.Option("--verify", help="Re-hash every file instead of trusting the stamp.")] = False,
    json_: JsonOpt = False,
) -> None:
    """List the models: ladder rung, size, whether the file is present and verified, speed.

    Examples:

      cre models list

      cre models list --json | jq '.[] | select(.verified | not) | .name'
    """
    from crecli.models import catalog

    rows = catalog.rows(_settings(models), deep=verify)
    if json_:
        from crecli.console import print_json

        print_json(rows)
        return
    from crecli import render

    render.models_table(rows)


@models_app.command("pull")
def models_pull(
    names: Annotated[Optional[list[str]], typer.Argument(help="Models to pull (default: the whole ladder).", show_default=False)] = None,
    models: ModelsOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if a verified file exists.")] = False,
) -> None:
    """Download, assemble and verify model files into the user cache dir.

    A verified file is left alone, so a second run does nothing; a corrupt or partial file
    is rebuilt.

    Examples:

      cre models pull

      cre models pull gemma-3-270m
    """
    from crecli import render

    settings = _settings(models)
    render.pull_models(settings, names or settings.ladder, force=force)


@models_app.command("bench")
def models_bench(
    names: Annotated[Optional[list[str]], typer.Argument(help="Models to measure (default: the ladder).", show_default=False)] = None,
    models: ModelsOpt = None,
    pp_tokens: Annotated[int, typer.Option(help="Prompt tokens to process.")] = 256,
    tg_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    json_: JsonOpt = False,
) -> None:
    """Measure prompt-processing and generation tokens/s of each model on this machine.

    Models are measured one after another, never at once. Figures are stored in the user
    data dir and used as each model's cost.

    Examples:

      cre models bench

      cre models bench qwen2.5-coder-0.5b-instruct --json
    """
    from crecli import render

    settings = _settings(models)
    speeds = render.bench_models(settings, names or settings.ladder, pp_tokens, tg_tokens)
    if json_:
        from dataclasses import asdict

        from crecli.console import print_json

        print_json([asdict(s) for s in speeds])
    else:
        render.bench_table(speeds)


@models_app.command("path")
def models_path() -> None:
    """Print where crecli reads models.toml from and where model files go."""
    from crecli import config, paths

    typer.echo(f"shipped models.toml: {config.default_toml()}")
    typer.echo(f"user models.toml:    {paths.user_models_toml()}")
    typer.echo(f"model files:         {paths.models_dir()}")


# ---------------------------------------------------------------- ask


@app.command()
def ask(
    prompt: Annotated[str, typer.Argument(help="The prompt, or - to read it from stdin.")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Answer with this model directly, skipping the router.", show_default=False)] = None,
    models: ModelsOpt = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 is greedy).")] = 0.0,
    json_: JsonOpt = False,
) -> None:
    """Answer one prompt.

    Examples:

      cre ask "What is the capital of France?" --model qwen2.5-coder-1.5b-instruct

      echo "What is 12 plus 30?" | cre ask - --model gemma-3-270m --json
    """
    from crecli import render
    from crecli.models.backend import GenParams
    from crecli.models.registry import backend_for

    text = _read_prompt(prompt)
    settings = _settings(models)
    if model is None:
        raise CreError("no --model given; routing through a router file arrives with `cre fit`")
    backend = backend_for(settings.get(model))
    try:
        gen = backend.generate(text, GenParams(max_tokens=max_tokens, temperature=temperature))
    finally:
        backend.close()
    render.answer(model, gen, json_)


def _read_prompt(prompt: str) -> str:
    if prompt == "-":
        data = sys.stdin.buffer.read()
        try:
            prompt = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CreError(f"stdin: not UTF-8 text (byte {exc.start}); convert it first, e.g. with iconv") from None
    if not prompt.strip():
        raise CreError("the prompt is empty; pass text or - with text on stdin")
    return prompt


def main() -> None:
    """Entry point: run the app, turning crecli's errors into one-line messages."""
    try:
        app()
    except CreError as exc:
        from rich.text import Text

        from crecli.console import err

        err().print(Text.assemble(("Error:", "bold red"), " ", str(exc)), soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted.\n")
        sys.exit(130)
