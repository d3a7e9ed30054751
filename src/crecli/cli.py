"""The `cre` command line: options in, calls into the modules that do the work, output rendered.

Commands stay thin: each parses its options, calls the module that owns the work (`fit`,
`calibrate`, `escalate`, `batch`, `serve`, ...) and hands the result to `render`.

Only typer and light crecli modules (option types, errors, defaults) are imported at module
level: shell completion imports this module on every Tab press, so numpy, umap, hdbscan and
llama_cpp are imported inside the commands that use them.
Every CreError becomes `Error: ...` on stderr and its exit code: 1, or 2 for a UsageError.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from crecli import __version__
from crecli.cli_models import models_app
from crecli.cli_options import (
    CostUnitOpt, JsonOpt, ModelsOpt, NoLogOpt, RouterOpt, SkipBadOpt, StoreOpt, finite, load_models, resolve_router,
)
from crecli.errors import CreError, UsageError
from crecli.costs import DEFAULT_RETAIN
from crecli.quality import DEFAULT_CHECK, DEFAULT_FIT_VOTES, MAX_TEMPERATURE, MAX_VOTES
from crecli.querylog import MAX_LINE_CAP
from crecli.serve_options import (
    DEFAULT_BODY_TIMEOUT, DEFAULT_HEADER_TIMEOUT, DEFAULT_HOST, DEFAULT_KEEP_ALIVE, DEFAULT_MAX_BODY, DEFAULT_MAX_QUEUE, DEFAULT_PORT, DEFAULT_TIMEOUT,
    MAX_SECONDS,
)

EXIT_CODES = """Exit codes: 0 success; 1 error (the message says what to do); 2 bad usage (an
unknown option, a bad option value, options that conflict); 3 `cre batch` finished but some
lines got error records; 130 interrupted (Ctrl-C; `cre batch` also by SIGTERM or SIGHUP)."""

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
app.add_typer(models_app, name="models")


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


# ---------------------------------------------------------------- fit, inspect

# numpy's RandomState, which scikit-learn's TruncatedSVD and UMAP seed from --seed, takes
# 0 to 2**32 - 1; a larger seed failed only after the log was read.
MAX_SEED = 2**32 - 1


@app.command()
def fit(
    log: Annotated[Path, typer.Argument(help="Query log: JSONL, CSV, or plain text (one prompt per line).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Router file to write.")] = Path("router.cre"),
    models: ModelsOpt = None,
    retain: Annotated[Optional[float], typer.Option(help=f"Budget: keep at least this share of the strongest model's accuracy in every cluster, at the least cost. Default {DEFAULT_RETAIN}.", show_default=False)] = None,
    max_cost: Annotated[Optional[float], typer.Option(help="Budget instead: spend at most this share of always using the strongest model, at the best accuracy.", show_default=False)] = None,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed for UMAP, sampling and splits: the same seed and log, its lines in the same order, give the same router.")] = 0,
    min_cluster_size: Annotated[Optional[int], typer.Option(min=2, help="HDBSCAN min_cluster_size (default scales with the log size).", show_default=False)] = None,
    min_samples: Annotated[Optional[int], typer.Option(min=1, help="HDBSCAN min_samples (default scales with the log size).", show_default=False)] = None,
    n_components: Annotated[int, typer.Option(min=1, help="UMAP output dimensions.")] = 8,
    n_neighbors: Annotated[Optional[int], typer.Option(min=2, help="UMAP n_neighbors (default scales with the log size).", show_default=False)] = None,
    max_fit_rows: Annotated[int, typer.Option(min=10, help="Larger logs are clustered on a sample of this many rows; the rest are assigned afterwards.")] = 20000,
    sample_per_cluster: Annotated[Optional[int], typer.Option(min=1, help="Run the models on at most N labelled queries per cluster (caps calibration cost).", show_default=False)] = None,
    k: Annotated[int, typer.Option("--k", min=1, max=MAX_VOTES, help="Votes recorded per model and query (1 greedy + k-1 samples). 1 is all the default deferral check needs; the agreement check (`cre calibrate --check agreement`) needs more, e.g. 5, and `cre calibrate --votes V` at least V, at k times the model time.")] = DEFAULT_FIT_VOTES,
    temperature: Annotated[float, typer.Option(min=0.0, max=MAX_TEMPERATURE, callback=finite, help="Sampling temperature of votes 2..k.")] = 0.7,
    fmt: Annotated[Optional[str], typer.Option("--format", help="jsonl, csv or text (default: by file extension).", show_default=False)] = None,
    prompt_field: Annotated[str, typer.Option(help="Field holding the prompt.")] = "prompt",
    reference_field: Annotated[str, typer.Option(help="Field holding the reference answer(s).")] = "reference",
    match_field: Annotated[str, typer.Option(help="Field holding the match rule.")] = "match",
    id_field: Annotated[str, typer.Option(help="Field holding the query id.")] = "id",
    labels_field: Annotated[str, typer.Option(help="Field holding known correctness labels {model: bool}.")] = "labels",
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip bad lines (and report how many) instead of stopping.")] = False,
    max_prompt_bytes: Annotated[Optional[int], typer.Option("--max-prompt-bytes", min=1, max=MAX_LINE_CAP, help="Longest log line (and so prompt) to read, in bytes; a longer line is a bad line. Default 1 MiB.", show_default=False)] = None,
    store: Annotated[Optional[Path], typer.Option(help="Outcome store (default: in the user data dir, shared by all fits).", show_default=False)] = None,
    truth_field: Annotated[Optional[str], typer.Option(help="Report NMI/ARI of the clusters against this field, e.g. meta.source, over the rows that have it (none having it is an error). Never used to route.", show_default=False)] = None,
    set_default: Annotated[bool, typer.Option("--set-default", help="Make this router the default for `cre ask`, `batch`, `serve`, `eval` and `inspect` (instead of the one crecli ships).")] = False,
    served: Annotated[bool, typer.Option("--served", help="Also cluster the prompts of your served-query log (`cre log`); they carry no labels, so they shape clusters but choose no model.")] = False,
    served_log: Annotated[Optional[list[Path]], typer.Option("--served-log", help="Also cluster the prompts of this file written by `cre log -o` (repeatable); as --served.", show_default=False)] = None,
    shots: Annotated[str, typer.Option("--shots", help="Answered examples to try per cluster and model, from the cluster's own labelled queries: '0' (none) or a list such as '0,1,3'. Each count is measured on the cluster's other queries and the best kept; the router file then holds those examples.")] = "0",
    json_: JsonOpt = False,
) -> None:
    """Cluster a labelled query log, measure every model on every cluster, write a router file.

    Interrupt it at any time: a re-run runs no model on a query it already answered (outcomes
    are stored as they come). Reading, embedding, clustering and calibration are redone.
    Then run `cre calibrate ROUTER`: it tunes the budget and the quality check held out.

    With --served, the prompts `cre ask`, `cre batch` and `cre serve` answered join the
    embedding and clustering, so clusters follow real traffic; only the log's labelled rows
    measure models and choose each cluster's model.

    Examples:

      cre fit querylog.jsonl -o router.cre

      cre fit querylog.jsonl -o router.cre --retain 0.95 --set-default

      cre fit big.jsonl --sample-per-cluster 30 --skip-bad --json

      cre fit querylog.jsonl -o router.cre --served

      cre fit querylog.jsonl -o router.cre --shots 0,1,3

      cre fit querylog.jsonl -o router.cre --k 5   # votes for `cre calibrate --check agreement`
    """
    from crecli import reports
    from crecli.fit import FitOptions, fit as run_fit
    from crecli.quality import QualityCheck
    from crecli.querylog import FORMATS, MAX_LINE_BYTES, FieldMap, unknown_format

    if fmt is not None and fmt not in FORMATS:
        # An option value wrong in itself is bad usage (exit 2), as for --match or --shots.
        raise UsageError(f"--format: {unknown_format(fmt)}")
    options = FitOptions(
        seed=seed, n_components=n_components, n_neighbors=n_neighbors,
        min_cluster_size=min_cluster_size, min_samples=min_samples, max_fit_rows=max_fit_rows,
        sample_per_cluster=sample_per_cluster, quality=QualityCheck(k=k, temperature=temperature),
        fmt=fmt, fields=FieldMap(
            prompt=prompt_field, reference=reference_field, match=match_field, id=id_field, labels=labels_field,
            max_line_bytes=max_prompt_bytes if max_prompt_bytes is not None else MAX_LINE_BYTES,
        ),
        skip_bad=skip_bad, store=store, truth_field=truth_field, set_default=set_default,
        served=served, served_logs=list(served_log or []), shots=_shot_counts(shots),
    )
    report = run_fit(log, output, load_models(models), _budget(retain, max_cost), options)
    reports.fit_report(report, json_)


def _shot_counts(text: str) -> tuple[int, ...]:
    from crecli.schema import SHOT_COUNTS

    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        counts = []
    if not counts or any(n not in SHOT_COUNTS for n in counts) or counts[0] != 0:
        raise typer.BadParameter(
            f"{text!r}: give counts from {', '.join(map(str, SHOT_COUNTS))}, 0 included, e.g. 0,1,3", param_hint="--shots"
        )
    return tuple(counts)


@app.command()
def inspect(
    router: Annotated[Optional[Path], typer.Argument(help="A router file written by `cre fit` (default: the router `cre ask` would use).", show_default=False)] = None,
    models: ModelsOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Warn instead of failing when the router's embedder model differs here (ladder models are shown, never refused).")] = False,
    json_: JsonOpt = False,
) -> None:
    """Show a router's logs, models and clusters: the logs it was fitted and last calibrated
    on (where its records put them, and when); what each model file must be (full sha256) and
    whether this machine has it; per cluster, size, example prompts, each model's accuracy and
    cost, the chosen model.

    A router whose models are missing or differ here is shown, not refused: a teammate sent
    one sees what it needs. The table shows the first 200 clusters; --json lists them all.
    Without ROUTER, the one `cre ask` would use: yours (`cre fit --set-default`), else the
    one crecli ships.

    Examples:

      cre inspect router.cre

      cre inspect                 # the default router

      cre inspect router.cre --json | jq '.clusters[] | {id, model}'
    """
    from crecli import reports, routerfile

    settings = load_models(models)
    loaded = routerfile.load(resolve_router(router), settings, force=force, check_ladder=False)
    here = {entry.name: routerfile.local_state(entry, settings) for entry in loaded.ladder}
    reports.inspect_router(loaded, json_, here)


@app.command()
def calibrate(
    router: Annotated[Path, typer.Argument(help="A router file written by `cre fit`.", show_default=False)],
    log: Annotated[Optional[Path], typer.Option(help="Labelled log to tune on (default: the log the router was fitted on, if it still holds the same bytes).", show_default=False)] = None,
    retain: Annotated[Optional[float], typer.Option(help=f"Target: accuracy at least this share of always using the strongest model, at the least cost. Default {DEFAULT_RETAIN}.", show_default=False)] = None,
    max_cost: Annotated[Optional[float], typer.Option(help="Target instead: cost at most this share of always using the strongest model, at the best accuracy.", show_default=False)] = None,
    folds: Annotated[int, typer.Option(min=2, help="Cross-validation folds for the held-out figures.")] = 5,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the fold split.")] = 0,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the tuned router here (default: update ROUTER in place).", show_default=False)] = None,
    models: ModelsOpt = None,
    store: StoreOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Warn instead of failing when local model files differ from the router's.")] = False,
    skip_bad: SkipBadOpt = None,
    max_prompt_bytes: Annotated[Optional[int], typer.Option("--max-prompt-bytes", min=1, max=MAX_LINE_CAP, help="Longest log line (and so prompt) to read, in bytes (default: what `cre fit` was given).", show_default=False)] = None,
    check: Annotated[str, typer.Option(help="Quality check: 'deferral' (a logistic P(correct) model per rung on the greedy answer's own signals; a rung without log-probabilities gets the agreement check, with a warning) or 'agreement' (self-consistency votes; needs a fit with --k above 1).")] = DEFAULT_CHECK,
    votes: Annotated[Optional[int], typer.Option(min=1, help="With --check deferral only: votes a rung draws (default 1: the greedy answer alone; more adds their agreement as a signal, and needs a fit with --k at least this). The agreement check counts every vote the fit recorded (its --k).", show_default=False)] = None,
    cost_unit: CostUnitOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Re-choose each cluster's model and each model's quality-check threshold for a target.

    Works from recorded outcomes: no model runs unless an outcome is missing. The log is
    read as `cre fit` read it (format, field names, --skip-bad, line cap; --skip-bad or
    --no-skip-bad and --max-prompt-bytes override). Each setting is
    scored held out (cross-validation) and in sample (its models chosen on all queries);
    the setting is chosen on the mean of the two. It prints the held-out accuracy-cost
    frontier, marks the chosen point, and prints the estimate it was chosen on. Every cost
    stored in the router is priced afresh from today's `cre models bench` speeds (or prices).
    The router records the log (path and sha256), so `cre eval` counts its queries as in sample.

    Examples:

      cre calibrate router.cre --retain 0.98

      cre calibrate router.cre --max-cost 0.4 -o cheap.cre --json

      cre calibrate router.cre --check agreement   # needs a fit with --k 5
    """
    from crecli import calibrate as calibration, reports

    if votes is not None and check == "agreement":
        # Said, not ignored: the agreement check has no vote count of its own to set.
        raise UsageError("--votes is for --check deferral; the agreement check counts every vote the fit "
                         "recorded (its --k): leave --votes out, or refit with another --k")
    settings, budget = load_models(models), _budget(retain, max_cost)
    cal, target = calibration.run(
        router, settings, budget, log=log, output=output, store=store, skip_bad=skip_bad, max_line_bytes=max_prompt_bytes,
        n_folds=folds, seed=seed, force=force, check=check, votes=votes or 1, unit=cost_unit,
    )
    reports.calibration(cal, target, json_)


@app.command("eval")
def eval_(
    log: Annotated[Path, typer.Argument(help="Labelled log (JSONL or CSV with references).", show_default=False)],
    router: RouterOpt = None,
    models: ModelsOpt = None,
    store: StoreOpt = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write an accuracy-against-cost chart (.svg, or .png with matplotlib installed).", show_default=False)] = None,
    live: Annotated[bool, typer.Option("--live", help="Also run the real cascade on every query and compare it with the replay.")] = False,
    skip_bad: SkipBadOpt = None,
    max_prompt_bytes: Annotated[Optional[int], typer.Option("--max-prompt-bytes", min=1, max=MAX_LINE_CAP, help="Longest log line (and so prompt) to read, in bytes (default: what `cre fit` was given).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Warn instead of failing when local model files differ from the router's.")] = False,
    cost_unit: CostUnitOpt = None,
    fit_log: Annotated[Optional[Path], typer.Option("--fit-log", help="The log the router was fitted on, where the recorded path is not (it must hold the same bytes: sha256).", show_default=False)] = None,
    calibration_log: Annotated[Optional[Path], typer.Option("--calibration-log", help="The log the router was last calibrated on, where the recorded path is not (it must hold the same bytes: sha256).", show_default=False)] = None,
    held_out_only: Annotated[bool, typer.Option("--held-out-only", help="Score only the queries that are in neither the router's fit log nor the log it was last calibrated on.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Measure the cascade on a labelled log against baselines: each model alone, random
    routing at equal cost, routing without the quality check, the cascade without clusters
    (every query from the smallest model, its check told nothing of its cluster), and the oracle.

    The log is read as `cre fit` read its log (format, field names, --skip-bad, line cap;
    --skip-bad or --no-skip-bad and --max-prompt-bytes override). The cascade
    is replayed on recorded, seeded votes (missing ones are collected first); --live runs it
    for real as well and reports the replay's accuracy beside it. Costs in bench-seconds are
    priced at this machine's `cre models bench` speeds; when those are over 6 hours old it
    says so, as `cre batch` does. Give it queries the router was neither fitted nor calibrated
    on: it looks each query up in the router's fit log (where the fit found it, if unchanged,
    or --fit-log) and the log `cre calibrate` last tuned it on (where that found it, if
    unchanged, or --calibration-log), and warns how many are in either, their figures in
    sample; --held-out-only leaves them out.

    Examples:

      cre eval test.jsonl --router router.cre

      cre eval test.jsonl --router router.cre --plot frontier.svg --json
    """
    from crecli import evaluate, reports

    report = evaluate.run(
        log, resolve_router(router), load_models(models), store=store, plot=plot, run_live=live,
        skip_bad=skip_bad, max_line_bytes=max_prompt_bytes, force=force, unit=cost_unit,
        fit_log=fit_log, calibration_log=calibration_log, held_out_only=held_out_only,
    )
    reports.eval_report(report, json_)
    if plot:
        reports.plot(report, plot)


def _budget(retain: float | None, max_cost: float | None):  # -> costs.Budget
    from crecli.costs import Budget

    if retain is not None and max_cost is not None:
        raise UsageError("give one budget: --retain or --max-cost, not both")
    # Budget checks its own range, the one the router-file loader checks too.
    if max_cost is not None:
        return Budget("max_cost", max_cost)
    return Budget("retain", DEFAULT_RETAIN if retain is None else retain)


# ---------------------------------------------------------------- ask


@app.command()
def ask(
    prompt: Annotated[str, typer.Argument(metavar="PROMPT", help="The prompt, quoted, or - to read it from stdin. One that starts with - goes after --: cre ask -- '-5 plus 3?'")],
    router: RouterOpt = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Answer with this model directly, skipping the router.", show_default=False)] = None,
    models: ModelsOpt = None,
    match: Annotated[Optional[str], typer.Option("--match", help="Answer type (choice, numeric, exact, contains or regex): caps the answer's length and how votes are compared. Default: the prompt's cluster's type.", show_default=False)] = None,
    explain: Annotated[bool, typer.Option("--explain", help="Write the trace to stderr: cluster, models tried, P(correct) or agreement, tokens, seconds, why it escalated.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Use the router even if the model files differ from the ones it was fitted with.")] = False,
    max_tokens: Annotated[Optional[int], typer.Option(min=1, help="Most tokens to generate (with --model; default 64).", show_default=False)] = None,
    temperature: Annotated[Optional[float], typer.Option(min=0.0, callback=finite, help="Sampling temperature, 0 is greedy (with --model; default 0).", show_default=False)] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON on stdout for scripts: the whole trace when routed.")] = False,
    no_log: NoLogOpt = False,
) -> None:
    """Answer one prompt: route it to its cluster's model and escalate while the answer is unsure.

    The answer goes to stdout. Without --model the prompt goes through a router file: it
    starts on its cluster's model and moves up the ladder while the router's quality check
    finds the answer unsure. The deferral check (what `cre calibrate` sets by default)
    escalates when the answer's estimated P(correct), from its own signals such as token
    log-probabilities, is below the rung's threshold; the agreement check (a router straight
    from `cre fit`, or calibrated with --check agreement) when too few sampled answers agree.
    A routed prompt, its answer and trace are added to the served-query log (`cre log`)
    unless --no-log is given.

    Examples:

      cre ask "What is 7 plus 5?" --router router.cre --explain

      echo "What is 12 plus 30?" | cre ask - --json | jq .steps

      cre ask "What is the capital of France?" --model qwen2.5-coder-1.5b-instruct

      cre ask "A private question" --no-log
    """
    from crecli import render

    # `cre ask ... >&-` ran every model, then ended in an AttributeError traceback.
    _refuse_closed(sys.stdout, "stdout", "cre ask writes the answer to stdout",
                   "redirect it to a file (cre ask ... > answer.txt)")
    from crecli import console

    # A Latin-1 locale failed to encode an answer such as "12 → 日本" after the models ran.
    console.utf8_stdout()
    text = _read_prompt(prompt)
    if match is not None:
        match = _match_type(match)
    if model is not None:
        # Options of the routed answer would be dropped without a word: refuse them.
        routed_only = [name for name, given in (("--router", router is not None), ("--match", match is not None),
                                                ("--explain", explain), ("--force", force)) if given]
        if routed_only:
            raise UsageError(f"{', '.join(routed_only)} apply to a routed answer and --model asks one model "
                             "directly: use one or the other, not both")
        from crecli.models.backend import GenParams
        from crecli.models.registry import generate_once

        params = GenParams(max_tokens=64 if max_tokens is None else max_tokens,
                           temperature=0.0 if temperature is None else temperature)
        [spec] = load_models(models).named([model], option="--model")  # unknown: bad usage, exit 2
        gen = generate_once(spec, text, params)
        render.answer(model, gen, json_)
        return
    if max_tokens is not None or temperature is not None:
        raise UsageError("--max-tokens and --temperature apply with --model; a routed answer takes its cap and "
                         "sampling from the router (its cluster's answer type)")
    from crecli import paths, servedlog
    from crecli.escalate import Cascade

    router_path, router_name = paths.router_in_use(router)
    served = servedlog.for_command("ask", no_log, router_path)
    with Cascade.from_file(router_path, models, force=force) as cascade:
        trace = cascade.ask(text, match=match)
        served.record(text, trace, cascade)
    render.routed_answer(trace, as_json=json_, explain=explain, router_name=router_name)


# `cre batch --parallel`: 1, because on 2 CPU cores bench/batch_throughput.py measured only
# 1.05-1.13x for 2-8 (README, "Batch") at the price of 5 of 64 greedy answers changed.
PARALLEL_DEFAULT = 1


@app.command()
def batch(
    file: Annotated[Optional[Path], typer.Argument(help="Prompts, one per line: JSONL objects or plain text (default, or -: stdin).", show_default=False)] = None,
    router: RouterOpt = None,
    models: ModelsOpt = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="An earlier output file: skip the ids it already answered for the same prompt.", show_default=False)] = None,
    memory_budget: Annotated[Optional[str], typer.Option("--memory-budget", help="Keep models loaded within this much memory, e.g. 4GB (binary units: GB, G and GiB all mean 2^30 bytes), counting each model's file, the KV cache of --parallel, its snapshots of answered examples and the context of its sampled votes; a model larger than the budget loads alone (default: no limit).", show_default=False)] = None,
    parallel: Annotated[int, typer.Option("--parallel", min=1, max=64, help="Decode the greedy answers of up to this many prompts on one model at once (1: one at a time).")] = PARALLEL_DEFAULT,
    json_summary: Annotated[bool, typer.Option("--json-summary", help="Write the summary as JSON, on stderr's last line (stdout carries the results).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Use the router even if the model files differ from the ones it was fitted with.")] = False,
    prompt_field: Annotated[str, typer.Option(help="Field holding the prompt.")] = "prompt",
    reference_field: Annotated[str, typer.Option(help="Field holding the reference answer(s).")] = "reference",
    match_field: Annotated[str, typer.Option(help="Field holding the match rule.")] = "match",
    id_field: Annotated[str, typer.Option(help="Field holding the id.")] = "id",
    max_prompt_bytes: Annotated[Optional[int], typer.Option("--max-prompt-bytes", min=1, max=MAX_LINE_CAP, help="Longest input line (and so prompt), in bytes; a longer line gets an error record. Default 1 MiB.", show_default=False)] = None,
    no_log: NoLogOpt = False,
) -> None:
    """Answer many prompts: one JSONL result per input line, in input order, on stdout.

    A JSONL line holds "prompt" and optionally "id", "reference" and "match" (then the
    result says whether the answer is correct). A bad line gets {"line", "id", "error"}
    in its place, so N lines in give N lines out. Prompts are grouped by model behind the
    scenes so each model stays loaded, and the greedy answers of up to --parallel prompts on
    one model are decoded at once (the quality check's sampled votes are decoded together
    as parallel sequences, with or without --parallel); a summary (accuracy, cost against
    always using the strongest model, escalation rate) goes to stderr at the end. The cost
    is priced at `cre models bench` speeds (a prompt's start shared with the previous prompt
    of its cluster is free: llama.cpp keeps it); the summary says when they are over 6 hours
    old, and how long loading the models took, which neither side's cost counts.

    To finish an interrupted batch, append the remaining answers to the same file:

      cre batch --resume out.jsonl < in.jsonl >> out.jsonl

    Lines already answered in out.jsonl are skipped; lines that got an error are tried again.
    A line whose id out.jsonl answered only for other prompts (the input changed since) gets
    an error record instead: answer such an input into a new file. Lines sharing an id are
    told apart by their prompts and line numbers (docs/reference.md has the rule). A
    second batch writing to the same file at once is refused, and so is output into the
    input file itself (the answers would be read back as prompts), or into a file opened
    to write before its end without appending, as 1<> and systemd's StandardOutput=file: do,
    with or without --resume (they would be written over its records, and the rest stay).
    Each answered prompt, its answer and trace are added to the served-query log (`cre log`;
    references and labels are not), unless --no-log is given.

    Examples:

      cre batch prompts.jsonl --router router.cre > answers.jsonl

      cat questions.txt | cre batch --memory-budget 2GB > answers.jsonl

      cre batch prompts.jsonl --parallel 1 > answers.jsonl   # one prompt at a time

      cre batch test.jsonl --no-log > answers.jsonl           # an evaluation, not traffic

    Exit codes: 0 every line answered; 1 error (the message says what to do; every answer
    finished before it is written, and `--resume` answers the rest); 2 bad usage; 3
    finished, but some lines got error records; 130 interrupted (Ctrl-C, SIGTERM, or SIGHUP
    where it is not ignored as under nohup): every answer finished by then is written, the
    summary says how many (unless the terminal that was stderr is gone), and `--resume`
    answers the rest.
    """
    import contextlib

    from crecli import console, render, servedlog
    from crecli.batch import (
        emptied_by_redirect, lock_output, mend_cut_line, parse_size, read_done_ids, refuse_own_output, run_batch,
        stop_on_signals,
    )
    from crecli.escalate import Cascade

    from crecli.querylog import MAX_LINE_BYTES, FieldMap

    fields = FieldMap(
        prompt=prompt_field, reference=reference_field, match=match_field, id=id_field,
        max_line_bytes=max_prompt_bytes if max_prompt_bytes is not None else MAX_LINE_BYTES,
    )
    # The input is opened before the router and its models load (and before --resume writes
    # a word), so a wrong path or a missing stdin is said first, in the words `cre fit` uses.
    # "-" is stdin, as for `cre ask -` and as the error below offers. (pathlib reads "./-"
    # as "-" too: a file of that name is given by its absolute path, or on stdin.)
    # `cre batch >&-`: refused before any model runs, which it did, to end in a traceback.
    _refuse_closed(sys.stdout, "stdout", "cre batch writes the answers to stdout",
                   "redirect it to a file (cre batch prompts.jsonl > answers.jsonl)")
    console.utf8_stdout()
    if file is None or str(file) == "-":
        _refuse_closed(sys.stdin, "stdin", "cre batch reads prompts from FILE or stdin",
                       "give a file, or pipe prompts in (cat questions.txt | cre batch > answers.jsonl)")
        if file is None and sys.stdin.isatty():
            # Nobody types a batch; one who means to says so with `-` (and ends with Ctrl-D).
            raise UsageError("cre batch reads prompts from FILE or stdin, and stdin is a terminal: give a file, "
                             "or pipe prompts in (cat questions.txt | cre batch > answers.jsonl); - reads typed lines")
        if not sys.stdin.isatty():  # a terminal ends with Ctrl-D: `cre batch -` reads typed lines
            _refuse_endless_stdin("a file of prompts as FILE, or pipe them in "
                                  "(cat questions.txt | cre batch > answers.jsonl)")
        source, stream = "<stdin>", contextlib.nullcontext(sys.stdin.buffer)
    else:
        from crecli.querylog import open_named

        source, stream = str(file), open_named(file, "a file of prompts (.jsonl or plain text), or - for stdin", pipes=True)
    # The lock first (held until the batch ends), before --resume reads what is answered:
    # while another run holds the file, its writes since this run's `>` emptied it would make
    # the file look written over, not emptied (`_opened_as`).
    with stream as lines, stop_on_signals(), lock_output(sys.stdout):
        refuse_own_output(lines, sys.stdout, source, resume)
        done = read_done_ids(resume) if resume is not None else {}
        if resume is not None:
            if emptied_by_redirect(resume, sys.stdout):
                console.warn(f"{resume} is this run's output opened with '>', which emptied it before cre ran: its "
                             "answers are gone and every line is answered again. Append with '>>' to resume.")
            mend_cut_line(resume, sys.stdout)
        budget = parse_size(memory_budget) if memory_budget is not None else None
        router_path = resolve_router(router)
        served = servedlog.for_command("batch", no_log, router_path)
        with Cascade.from_file(router_path, models, force=force, memory_budget_bytes=budget, parallel=parallel) as cascade:
            summary = run_batch(lines, sys.stdout, cascade, done, source=source, resume_name=str(resume), fields=fields,
                                served=served)

    def say() -> None:
        if not summary.lines and not summary.interrupted:
            # `cat missing.txt | cre batch > answers.jsonl`: only cat's error was on screen.
            console.warn(f"{source} held no lines: nothing was answered")
        render.batch_summary(summary, as_json=json_summary)

    # The answers are written; after SIGHUP the terminal that was stderr may be gone.
    _unless_stderr_is_gone(say)
    if summary.interrupted:
        raise typer.Exit(130)
    if summary.errors:
        raise typer.Exit(3)


# ---------------------------------------------------------------- serve


@app.command()
def serve(
    router: RouterOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on (a name binds only the first address it resolves to). Anything but loopback lets other machines connect: give it a key.")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = DEFAULT_PORT,
    models: ModelsOpt = None,
    memory_budget: Annotated[Optional[str], typer.Option("--memory-budget", help="Keep models loaded within this much memory, e.g. 4GB (binary units: GB, G and GiB all mean 2^30 bytes), counting each model's file, its snapshots of answered examples and the context of its sampled votes; a model larger than the budget loads alone (default: no limit).", show_default=False)] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", min=0, help="Requests admitted beyond what the ladder computes at once (one per loaded model, max_in_flight per remote server); more get 429 with Retry-After.")] = DEFAULT_MAX_QUEUE,
    timeout: Annotated[float, typer.Option("--timeout", min=0.001, max=MAX_SECONDS, callback=finite, help="Seconds from a request's arrival to its answer, for the whole ladder (waits included; a remote call gets the time left); then 504.")] = DEFAULT_TIMEOUT,
    max_body: Annotated[int, typer.Option("--max-body", min=1024, help="Largest request body in bytes; a larger one gets 413 before it is read.")] = DEFAULT_MAX_BODY,
    header_timeout: Annotated[float, typer.Option("--header-timeout", min=0.001, max=MAX_SECONDS, callback=finite, help="Seconds a client has to send a request's line and headers; then 408 and the connection closes.")] = DEFAULT_HEADER_TIMEOUT,
    body_timeout: Annotated[float, typer.Option("--body-timeout", min=0.001, max=MAX_SECONDS, callback=finite, help="Seconds a client has to send a request's body once its headers are in, then 408 and the connection closes; and the most a response waits for a client that takes none of it, then the connection is reset.")] = DEFAULT_BODY_TIMEOUT,
    keep_alive: Annotated[float, typer.Option("--keep-alive", min=0.001, max=MAX_SECONDS, callback=finite, help="Seconds an idle keep-alive connection stays open. Behind a load balancer, set it above the balancer's idle timeout (AWS ALB: 60), or it reuses connections being closed and clients get 502s.")] = DEFAULT_KEEP_ALIVE,
    api_key_env: Annotated[Optional[str], typer.Option("--api-key-env", help="Environment variable holding an API key; then /v1/* needs `Authorization: Bearer <key>`.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Use the router even if the model files differ from the ones it was fitted with.")] = False,
    no_log: NoLogOpt = False,
) -> None:
    """Serve the router behind an OpenAI-compatible HTTP API until SIGTERM, SIGHUP or Ctrl-C.

    Endpoints: POST /v1/chat/completions and /v1/completions, GET /v1/models, GET /health.
    Model "cre" (or the router file's name without .cre) answers through the cascade; a
    ladder model's name answers with that model alone. Responses carry `usage` and a `cre`
    object with the trace. Requests are answered at once: models stay loaded and each
    computes for one request at a time, remote rungs take max_in_flight requests per server
    (models.toml) through one connection pool, a failing server is skipped for its replicas,
    and a request that times out or whose client leaves stops its work. `stream: true` sends
    the final rung's tokens as they are generated. A field cre cannot honour (tools,
    response_format, logprobs, ...) or of the wrong type is a 400 that names it. A client gets
    --header-timeout for its headers and --body-timeout for its body, then 408; one that takes
    none of its response for --body-timeout is disconnected. /health says
    whether each model can answer (503 when none can) and never waits behind model work.
    Every response carries an X-Request-Id (the client's own when it sent a safe one).
    Model errors reach the client as a 500 quoting it (503 `rung_unavailable` when every
    server of a remote rung failed; 400 when a ladder model asked by name has its server
    refuse the request); the details go to stderr under that id. Requests answered
    through the cascade go to the served-query log (`cre log`) unless --no-log is given.
    Needs the serve extra: pip install -e '.[serve]' in your clone of crecli. Running rungs on serving engines:
    docs/scale.md.

    Examples:

      cre serve --router router.cre

      cre serve --host 0.0.0.0 --api-key-env CRE_KEY --memory-budget 4GB

      curl -s localhost:8000/v1/models
    """
    from crecli import serve as serving
    from crecli.batch import parse_size

    options = serving.ServeOptions(host=host, port=port, max_queue=max_queue, timeout=timeout, max_body=max_body,
                                   header_timeout=header_timeout, body_timeout=body_timeout, keep_alive=keep_alive)
    budget = parse_size(memory_budget) if memory_budget is not None else None
    serving.run(
        resolve_router(router), models, options, force=force, memory_budget_bytes=budget, api_key_env=api_key_env,
        no_log=no_log,
    )


# ---------------------------------------------------------------- log


@app.command("log")
def log_(
    last: Annotated[Optional[int], typer.Option("--last", "-n", min=1, help="Only the newest N entries (default: 20 in the table and with --json; all with --since or -o).", show_default=False)] = None,
    since: Annotated[Optional[str], typer.Option("--since", help="Only entries at or after this date or time, e.g. 2025-01-31 or 2025-01-31T14:00 (UTC unless it says).", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Export the entries to this JSONL file (the log's own format, for `cre fit --served-log`; - for stdout); it may replace an earlier export holding no entry this one lacks, never another file.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="With -o, replace an earlier export even if it holds entries this export lacks (rotated out of the log since).")] = False,
    path: Annotated[bool, typer.Option("--path", help="Print the log file's path and nothing else (no other option goes with it).")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the entries as a JSON array on stdout for scripts (the newest 20 unless --last or --since says otherwise; stderr says when there are more).")] = False,
) -> None:
    """Show or export the served-query log: the prompts `cre ask`, `cre batch` and `cre serve`
    answered through a router, with each answer and trace.

    The log is served.jsonl in the user data dir, rotated at 16 MiB into served.1.jsonl ..
    served.3.jsonl. Entries go to stdout (a table, --json, or -o - in the log's own format)
    or to -o FILE; the log's path and counts go to stderr. The table and --json show the
    newest 20 unless --last or --since says otherwise (stderr says when more matched); -o
    exports them all, and replaces an earlier export only if every entry it holds is in the
    new one (else it stops; --force replaces it). Turn logging off with --no-log on a
    command, or for good with `log_queries = false` in settings.toml.

    Examples:

      cre log

      cre log --last 5 --json | jq -r '.[].prompt'

      cre log --since 2025-01-01 -o traffic.jsonl

      cre fit querylog.jsonl -o router.cre --served   # cluster with the logged prompts
    """
    from crecli import render, servedlog

    if path:
        # Said, not ignored: `cre log --path --json` printed the path, which no JSON reader takes.
        given = [name for name, value in (("-o", output), ("--json", json_), ("--last", last), ("--since", since),
                                                   ("--force", force))
                 if value is not None and value is not False]
        if given:
            raise UsageError(f"--path prints the log's path and nothing else; leave out {', '.join(given)}")
        # `cre log --path >&-` printed nothing and succeeded.
        _refuse_closed(sys.stdout, "stdout", "cre log --path prints the log's path on stdout",
                       "redirect it to a file (cre log --path > where.txt)")
        typer.echo(str(servedlog.log_path()))
        return
    if output is not None and json_:
        raise UsageError("give --json (entries on stdout) or -o FILE (entries in a file), not both")
    if force and (output is None or str(output) == "-"):
        raise UsageError("--force is for -o FILE: it replaces an earlier export that holds entries this one lacks")
    if output is None or servedlog.is_stdout(output):
        # `cre log --json >&-` and `-o - >&-` ended in an AttributeError traceback (None.write),
        # and the table was dropped without a word.
        _refuse_closed(sys.stdout, "stdout", "cre log writes the entries to stdout",
                       "export them with -o FILE, or redirect stdout (cre log --json > entries.json)")
    render.served_log(servedlog.query(last=last, since=since, output=output, force=force), json_)


def _match_type(text: str) -> str:
    """--match as a known answer type, read as a log's `match` field is (`grading.match_type`)."""
    from crecli.grading import MATCH_TYPES, match_type

    match = match_type(text)
    if match is None:
        raise UsageError(f"--match {text!r}: use one of {', '.join(MATCH_TYPES)}")
    return match


def _refuse_closed(stream: object, name: str, use: str, fix: str) -> None:
    """Refuse (UsageError) a closed stdin or stdout (`<&-`, `>&-`) that a command `use`s:
    Python holds it as None, and its first read or write was an AttributeError traceback."""
    if stream is None:
        raise UsageError(f"{use}, and {name} is closed: {fix}")


def _refuse_endless_stdin(want: str) -> None:
    """Refuse stdin where a FILE of the same kind would be (`querylog.refuse_endless`): a
    device such as /dev/zero never ends. A stream with no descriptor (one in memory) ends."""
    from crecli.querylog import refuse_endless

    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return
    refuse_endless(fd, "stdin", want, pipes=True)


def _read_prompt(prompt: str) -> str:
    from crecli.safejson import SURROGATE

    if prompt == "-":
        from crecli.querylog import MAX_LINE_BYTES

        _refuse_closed(sys.stdin, "stdin", "cre ask - reads the prompt from stdin",
                       "pipe it in (echo 'What is 2 plus 2?' | cre ask -), or give it as an argument")
        # Capped as a batch line is: `yes | cre ask -` grew until memory ran out.
        data = sys.stdin.buffer.read(MAX_LINE_BYTES + 1)
        if len(data) > MAX_LINE_BYTES:
            raise CreError(f"stdin: the prompt is over {MAX_LINE_BYTES >> 20} MiB, more than any model's context "
                           "holds; shorten it")
        # A byte order mark (Notepad's) is no part of the prompt, as it is none of a batch line.
        bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
        try:
            prompt = data[bom:].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CreError(f"stdin: not UTF-8 text (byte {exc.start + bom}); convert it first, e.g. with iconv") from None
    elif (bad := SURROGATE.search(prompt)) is not None:
        # Python holds argument bytes that are not UTF-8 as lone surrogates, which no model's
        # tokenizer (nor the served-query log) can encode: refuse them as stdin's are refused.
        raise CreError(
            f"the prompt argument is not UTF-8 text (character {bad.start() + 1}); convert it first, e.g. with iconv"
        )
    if not prompt.strip():
        raise CreError("the prompt is empty; pass text or - with text on stdin")
    return prompt


def main() -> None:
    """Entry point: run the app, turning crecli's errors into one-line messages."""
    import faulthandler

    # A crash inside llama.cpp's native code kills the process before Python can report
    # it; faulthandler at least prints the Python stack (ending in a crecli/models/ module)
    # instead of a bare "Segmentation fault". `cre models bench` probes each model in a
    # child process and names the cause and the fix.
    if not faulthandler.is_enabled():
        faulthandler.enable()
    try:
        app()
    except CreError as exc:
        _silence_stdout_if_broken()
        _error(str(exc))
        sys.exit(exc.exit_code)
    except OSError as exc:
        # Typer ends a broken pipe itself (exit 1, no message) but re-raises any other
        # OSError: most often stdout that cannot take the output (a full disk, /dev/full).
        what = exc.strerror or str(exc)
        if _silence_stdout_if_broken():
            _error(f"cannot write the output to stdout ({what})")
        elif exc.filename:
            _error(f"{exc.filename}: {what}")
        else:
            # A failed write drops what was buffered, so stdout often flushes fine afterwards:
            # no file is named, but reading or writing one (stdout most likely) failed.
            _error(f"input or output failed: {what}")
        sys.exit(1)
    except KeyboardInterrupt:
        # Only Ctrl-C outside a command's run gets here: while Typer builds the command or
        # answers shell completion. During a command Typer itself turns it into exit 130,
        # without a word (`cre batch` prints its summary saying it was interrupted).
        sys.stderr.write("Interrupted.\n")
        sys.exit(130)


def _error(message: str) -> None:
    from rich.text import Text

    from crecli.console import err, terminal_safe

    # Messages quote user text (a log's field names, a server's reply): shown, never acted on.
    err().print(Text.assemble(("Error:", "bold red"), " ", terminal_safe(message)), soft_wrap=True)


def _silence_stdout_if_broken() -> bool:
    """Whether stdout cannot be written; if so it is pointed at /dev/null, since Python's
    own flush at exit would fail again and print a second error, with a traceback."""
    if sys.stdout is None:  # closed (`>&-`): nothing to flush
        return False
    try:
        sys.stdout.flush()
        return False
    except OSError:
        from crecli.console import to_devnull

        to_devnull(sys.stdout)
        return True


def _unless_stderr_is_gone(say: Callable[[], None]) -> None:
    """Call `say`, which writes to stderr, unless stderr cannot take it: after SIGHUP the
    terminal that was stderr may be gone (EIO), and a reader of stderr that left (EPIPE) is
    dropped by the console (`console.err`) but not where `say` writes to its file itself (the
    JSON summary). What stdout carries is written by then, and the exit
    code stays the command's own: not 1 with a traceback, nor the 120 of Python's own flush
    of stderr failing again at exit, which is why stderr is pointed at /dev/null then."""
    from crecli.console import to_devnull

    try:
        say()
    except OSError:
        to_devnull(sys.stderr)
