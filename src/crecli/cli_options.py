"""What the `cre` commands share: option types, their checks, and the router a command uses.

Imported at module level by the CLI, so kept as cheap as the CLI itself (typer only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


ModelsOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--models",
        help="An extra models.toml, applied over the shipped and user files (also: CRE_MODELS).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout for scripts.")]
RouterOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--router", "-r",
        help="Router file from `cre fit` (default: yours, set by `cre fit --set-default`; else the one crecli ships, "
        "fitted on 1,400 BIG-bench queries).",
        show_default=False,
    ),
]
CostUnitOpt = Annotated[
    Optional[str],
    typer.Option("--cost-unit", help="Price costs in 'bench-seconds', 'seconds' (as recorded) or 'price' instead of the ladder's default (price if every model has one, else bench-seconds once benchmarked, else seconds).", show_default=False),
]
SkipBadOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--skip-bad/--no-skip-bad",
        help="Skip bad log lines (and report how many) instead of stopping, or stop at the first "
        "(default: what `cre fit` was given).",
        show_default=False,
    ),
]
# `cre calibrate` and `cre eval`: a router records no store, so without --store they read
# the default one, whatever store its fit was given.
StoreOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--store",
        help="Outcome store of recorded answers (default: the one in the user data dir, which `cre fit` uses too "
        "when given no --store). A router does not record the store its fit used: after `cre fit --store FILE`, "
        "pass the same --store FILE, or every model runs again on the queries the default store lacks. A --store "
        "where no store is yet is warned about, then made.",
        show_default=False,
    ),
]
NoLogOpt = Annotated[
    bool,
    typer.Option(
        "--no-log",
        help="Keep answered prompts out of the served-query log (see `cre log`); "
        "`log_queries = false` in settings.toml turns the log off for good.",
    ),
]


def finite(value: float | None) -> float | None:
    """Option callback: click's ranges let nan and inf through."""
    import math

    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number.")
    return value


def load_models(models: Path | None):  # -> config.ModelConfig
    from crecli import config

    return config.load(models)


def resolve_router(router: Path | None) -> Path:
    """--router, else the user's default router, else the one crecli ships (`paths.router_in_use`)."""
    from crecli import paths

    return paths.router_in_use(router)[0]
