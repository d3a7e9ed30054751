"""Turning results into tables, bars and JSON. Status goes to stderr, data to stdout."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Collection, Sequence

from crecli.console import err, out, print_json, status, strict_json, terminal_safe

if TYPE_CHECKING:
    from rich.text import Text

    from crecli.models.backend import Generation
    from crecli.models.bench import Speed


def stale_speeds_note(age_hours: float | None) -> str | None:
    """The line `cre batch`'s summary and `cre eval` add once the speeds pricing their
    costs are over `bench.STALE_HOURS` old (`bench.speeds_age_hours`), else None."""
    from crecli.models.bench import STALE_HOURS

    if age_hours is None or age_hours <= STALE_HOURS:
        return None
    return (f"the speeds that price these costs were measured {age_hours:.0f} h ago; if this machine's load "
            "has changed since, run `cre models bench --fresh` for a saving that follows the clock")


def human_bytes(n: int | None) -> str:
    """A byte count in binary units, labelled as such: divided by 1024, 253,113,024 bytes
    were shown as "241.4 MB", which is 241.4 MiB (253.1 MB)."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit in ("B", "KiB") else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _label(text: str) -> "Text":
    """A cell of models.toml's own text (a label, a problem quoting a path or a server's
    words), shown as written: a Text is never read as Rich markup, so `quant = "Q4_K_M
    [imatrix]"` keeps its "[imatrix]" and `params = "7B [/]"` is no MarkupError traceback,
    and terminal_safe shows control characters as escapes."""
    from rich.text import Text

    return Text(terminal_safe(text))


def cost_text(cost: float) -> str:
    """A cost as every report prints it (`cre eval`, `cre inspect`, `cre calibrate`, `cre
    batch`'s summary): 3 significant digits, not a fixed count of decimals, which printed a
    price (about 1e-4 a query at 0.002 per 1k tokens) as 0.000; bench-seconds read as before
    (0.512). Trailing zeros stay so a column's digits line up."""
    if abs(cost) >= 100:
        return f"{cost:,.0f}"  # whole units: "1.23e+03" is no way to print 1234 seconds
    return f"{cost:#.3g}".rstrip(".")  # "#" keeps "0.500"; 99.96 rounds to "100.", stripped


def models_table(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title="Model ladder (smallest first)", title_justify="left")
    # Names and states must survive a narrow or piped console whole: other columns shrink.
    widest = max((len(r["name"]) for r in rows), default=4)
    for col in ("rung", "name", "arch", "params", "quant", "size", "file", "runs on", "signals", "pass s", "pp tok/s", "tg tok/s"):
        table.add_column(
            col,
            justify="right" if col in ("rung", "size", "pass s", "pp tok/s", "tg tok/s") else "left",
            min_width=widest if col == "name" else (8 if col == "file" else None),
            no_wrap=col in ("name", "file"),
        )
    for r in rows:
        if r["backend"] == "openai":
            file_state = Text("remote", "cyan")
        elif r["verified"] and not r["pinned"]:
            file_state = Text("unpinned", "yellow")  # a GGUF file, but nothing says which one
        elif r["verified"]:
            file_state = Text("verified", "green")
        elif r["present"]:
            file_state = Text.assemble("bad: ", _label(r["problem"]), style="red")
        else:
            file_state = Text("missing", "yellow")
        table.add_row(
            str(r["rung"]) if r["rung"] is not None else "-",
            # Every cell below that holds a string from models.toml, or from a server, as a Text.
            _label(r["name"]),
            _label(r["arch"]),
            _label(r["params"]),
            _label(r["quant"]),
            human_bytes(r["size"]),
            file_state,
            _label(r["runs_on"]),
            _label(r["signals"]),
            # The prompt rate is after the pass: without it beside, it reads 1.5x too fast.
            f"{r['pass_seconds']:.3f}" if r["pass_seconds"] is not None else "-",
            f"{r['pp_tokens_per_s']:.0f}" if r["pp_tokens_per_s"] else "-",
            f"{r['tg_tokens_per_s']:.1f}" if r["tg_tokens_per_s"] else "-",
        )
    out().print(table)
    # Each row that needs doing has a `fix` (`catalog.rows`). Only a model a pull fetches is
    # told to pull, by name (a model off the ladder is not fetched by a bare `cre models
    # pull`); a `path` model is told where its path is set.
    fetch = [r["name"] for r in rows if r["fix"] and r["pullable"]]
    if fetch:
        status(f"Fetch missing or bad models with `cre models pull {' '.join(fetch)}`.")
    for r in rows:
        if r["fix"] and not r["pullable"]:
            # The file a relative `path` was resolved to (from its models.toml's folder), which
            # only --json showed: "missing" alone did not say where crecli looked.
            status(f"{r['name']}: {'missing' if not r['present'] else 'not verified'} at {r['path']}; {r['fix']}.")
    if any(r["tg_tokens_per_s"] is None and r["backend"] == "llama" for r in rows):
        status("Measure speeds with `cre models bench`.")
    if any(r["signals"] != "logprobs" and r["on_ladder"] for r in rows):
        status("A rung without signals (no log-probabilities from its server) gets the agreement check "
               "from `cre calibrate`; docs/scale.md says which server flags give them.")


def pulled(results: Sequence[tuple[str, Any, bool]], unpinned: Collection[str] = (),
           requantized: Collection[str] = ()) -> None:
    """One line per model from `models.pull.pull_many`: made now (assembled, or for a model
    in `requantized`, requantized from its source), or already there; a model in `unpinned`
    (no sha256 in models.toml) is not called verified, as `cre models list` does not call it so."""
    for name, path, did in results:
        if isinstance(path, str):  # a remote rung's URL
            status(f"{name}: served at {path}; nothing to pull")
            continue
        made = "requantized" if name in requantized else "assembled"
        if name in unpinned:
            status(f"{name}: {made if did else 'already there'} at {path} (unpinned: no sha256 in "
                   "models.toml to verify it against)")
            continue
        status(f"{name}: {made + ' and verified' if did else 'already verified'} at {path}")


def bench_table(speeds: list["Speed"]) -> None:
    from rich.table import Table

    table = Table(title="Measured speed on this machine", title_justify="left")
    for col in ("model", "threads", "load s", "prompt pass s", "prompt tok/s", "gen tok/s", "runs", "spread", "repacked"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for s in speeds:
        table.add_row(
            s.model, str(s.threads), f"{s.load_seconds:.1f}", f"{s.pass_seconds:.3f}", f"{s.pp_tokens_per_s:.0f}",
            f"{s.tg_tokens_per_s:.1f}",
            str(s.pooled), f"{max(s.pp_spread, s.tg_spread):.0%}" + ("" if s.steady else " !"),
            {True: "yes", False: "no (AMX)" if s.extra_bufts is False else "no", None: "-"}[s.extra_bufts],
        )
    out().print(table)


def answer(model: str, gen: "Generation", as_json: bool) -> None:
    if as_json:
        print_json(
            {
                "model": model,
                "answer": gen.text.strip(),
                "prompt_tokens": gen.prompt_tokens,
                "output_tokens": gen.output_tokens,
                "seconds": round(gen.seconds, 4),
                "finish_reason": gen.finish_reason,
            }
        )
    else:
        answer_text(gen.text.strip())
        err().print(
            f"[dim]{model}: {gen.prompt_tokens}+{gen.output_tokens} tokens, {gen.seconds:.2f} s[/dim]",
            highlight=False,
        )


if TYPE_CHECKING:
    from crecli.batch import BatchSummary
    from crecli.trace import Trace


def _clip(text: str, width: int = 24) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= width else text[: width - 1] + "…")


def explain_trace(trace: "Trace", router_name: str = "the router") -> None:
    """The cascade's trace, readable, on stderr. `router_name` says which router answered,
    for the hint given when the prompt was unlike its log."""
    from rich.markup import escape

    e = err()
    where = f"cluster {trace.cluster}" if trace.cluster >= 0 else "no cluster (fallback)"
    e.print(f"[bold]route[/bold]  {where}, distance {trace.distance:.3f}, {trace.route_seconds * 1000:.1f} ms: "
            f"{escape(trace.route_reason)}", highlight=False)
    if not trace.familiar:
        e.print(
            f"[bold]hint[/bold]   {escape(router_name)} was fitted on a log with no queries like this one, so it "
            f"started on the strongest model, {escape(trace.start_model)}, rather than trust a cheaper one it never "
            "saw answer such prompts. To route prompts like it cheaply, fit a router on a labelled log of your own: "
            "cre fit LOG -o router.cre && cre calibrate router.cre",
            highlight=False,
        )
    e.print(f"       answer type {trace.answer_type or 'unknown (generic normaliser)'}", highlight=False)
    for n, step in enumerate(trace.steps, start=1):
        verdict = "[green]accepted[/green]" if step.accepted else "[yellow]not sure[/yellow]"
        e.print(
            f"[bold]step {n}[/bold] {escape(step.model)}: {verdict}, {escape(step.why)}; "
            f"{step.prompt_tokens}+{step.output_tokens} tokens, {step.seconds:.2f} s",
            highlight=False,
        )
        e.print("       votes: " + escape(", ".join(_clip(v) for v in step.normalized)), highlight=False)
    share = trace.route_seconds / trace.seconds if trace.seconds > 0 else 0.0
    e.print(
        f"[bold]answer[/bold] from {escape(trace.model)} after {trace.escalations} escalation(s): "
        f"{trace.prompt_tokens}+{trace.output_tokens} tokens, {trace.seconds:.2f} s "
        f"(routing {share:.1%})"
        + ("" if trace.correct is None else f", {'correct' if trace.correct else 'wrong'}"),
        highlight=False,
    )


def routed_answer(trace: "Trace", as_json: bool, explain: bool, router_name: str = "the router") -> None:
    if explain:
        explain_trace(trace, router_name)
    if as_json:
        print_json(trace.to_dict())
        return
    answer_text(trace.answer)
    if not explain:
        err().print(
            f"[dim]{trace.model} ({trace.escalations} escalation(s), "
            + (f"P(correct) {trace.p_correct:.2f}" if trace.p_correct is not None else f"agreement {trace.agreement:.2f}")
            + f"): "
            f"{trace.prompt_tokens}+{trace.output_tokens} tokens, {trace.seconds:.2f} s[/dim]",
            highlight=False,
        )


def batch_summary(summary: "BatchSummary", as_json: bool) -> None:
    """The end-of-batch summary, on stderr (stdout carries the results)."""
    if as_json:
        e = err()
        # As every JSON crecli writes: a figure that cannot be computed is null, never NaN.
        e.file.write(strict_json(summary.to_dict(), ensure_ascii=False) + "\n")
        e.file.flush()
        return
    lines = [
        ("Interrupted: the lines not answered yet are left for `--resume`. " if summary.interrupted else "")
        + f"{summary.lines} lines: {summary.answered} answered, {summary.errors} errors"
        + (f", {summary.skipped} skipped (already in --resume file)" if summary.skipped else ""),
    ]
    if summary.repeated_ids:
        lines.append(f"{summary.repeated_ids} line(s) had the id of an earlier line: `--resume` can tell such lines "
                     "apart only by their prompts, so give each line its own `id` before resuming")
    if summary.accuracy is not None:
        lines.append(f"accuracy {summary.accuracy:.1%} ({summary.correct}/{summary.graded} lines with a reference)")
    if summary.escalation_rate is not None:
        mix = ", ".join(f"{name} {count}" for name, count in summary.models.items())
        lines.append(f"escalated {summary.escalation_rate:.1%} of answers; answered by: {mix}")
    loads = (f", +{sum(summary.load_seconds.values()):.1f} s loading {len(summary.load_seconds)} "
             f"model{'s' if len(summary.load_seconds) != 1 else ''}, priced on neither side" if summary.load_seconds else "")
    lines.append(
        f"cost {summary.seconds:.1f} model-seconds (+{summary.route_seconds:.2f} s routing{loads})"
    )
    if summary.cost_ratio is not None:
        unit = {"seconds": "model-seconds", "bench-seconds": "bench-seconds"}.get(summary.unit, "price units")
        lines.append(
            f"vs always {summary.strongest_model}: {cost_text(summary.cascade_cost)} against an estimated "
            f"{cost_text(summary.strongest_cost)} {unit} ({summary.cost_ratio:.0%}) on {summary.estimated} answers; "
            f"both priced from the answers' tokens, the estimate as {summary.strongest_model}'s greedy answer"
        )
        stale = stale_speeds_note(summary.speeds_age_hours)
        if stale:
            lines.append(stale)
    elif summary.answered and summary.unit == "seconds":
        lines.append(
            f"no comparison with always using {summary.strongest_model}: run `cre models bench` "
            "so answers are priced by their tokens"
        )
    for line in lines:
        status(line)


def served_log(reading: Any, as_json: bool) -> None:
    """`cre log`: entries on stdout (a table, or JSON), the log's place and counts on stderr."""
    from rich.table import Table
    from rich.text import Text

    entries = reading.entries
    where = f"Served-query log: {reading.live}"
    if len(reading.files) > 1:
        where += f" (and {len(reading.files) - 1} rotated file(s))"
    counts = f"{reading.total} entries" + (f", {reading.bad} unreadable line(s) skipped" if reading.bad else "")
    status(f"{where}; {counts}.")
    if reading.enabled is False:
        status("Logging is off: settings.toml has log_queries = false.")
    if reading.output is not None:
        from crecli.servedlog import is_stdout

        where = "stdout" if is_stdout(reading.output) else reading.output
        status(f"Wrote {len(entries)} entries to {where}.")
        return
    if as_json:
        print_json(entries)
        _more_entries(reading)  # on stderr, so stdout stays one JSON array
        return
    if not entries:
        status("No entries to show." if reading.total else "Nothing logged yet: `cre ask`, `cre batch` and `cre serve` add to it.")
        return
    table = Table()
    for col in ("time (UTC)", "command", "model", "cluster", "esc", "agree", "prompt", "answer"):
        table.add_column(col, justify="right" if col in ("cluster", "esc", "agree") else "left",
                         no_wrap=col in ("time (UTC)", "command"), ratio=2 if col in ("prompt", "answer") else None)
    def cell(value: Any, width: int = 120) -> Text:
        # Every field is the log's text, which anyone who can write the file controls: a
        # Text is never read as Rich markup (`[/]`), and terminal_safe shows escapes.
        return Text(terminal_safe(" ".join(str("" if value is None else value).split())[:width]))

    def fraction(value: Any) -> Text:
        # The file's value, so any JSON number: an integer too large for a float is not a
        # fraction of votes either.
        if type(value) not in (int, float):
            return Text("-")
        try:
            value = float(value)
        except OverflowError:
            return Text("-")
        return Text(f"{value:.2f}" if math.isfinite(value) else "-")

    for e in entries:
        table.add_row(
            cell(str(e.get("time", ""))[:19].replace("T", " ")),
            cell(e.get("command")),
            cell(e.get("model")),
            cell(e.get("cluster"), 12),
            cell(e.get("escalations"), 12),
            fraction(e.get("agreement")),
            cell(e.get("prompt")),
            cell(e.get("answer"), 80),
        )
    out().print(table)
    _more_entries(reading)


def _more_entries(reading: Any) -> None:
    """Say that `cre log` shows only the newest entries (20 by default), where more matched."""
    if len(reading.entries) < reading.matched:
        status(f"Showing the newest {len(reading.entries)}; --last N for more, -o FILE to export.")


def answer_text(text: str) -> None:
    """An answer on stdout, one line after it, as the model wrote it.

    Not through Rich: even with markup off it turns `:100:` into an emoji (so `a[1:100:2]`
    lost its slice) and tabs into spaces, and an answer is data a script reads.
    On a terminal its control characters are shown as escapes (`terminal_safe`): a model,
    or a remote rung, must not recolour or rewrite the reader's screen. Piped, the text goes
    out as it is, but for lone surrogates (a remote rung's JSON can hold them), which no
    encoding can write.
    """
    import sys

    shown = terminal_safe(text) if sys.stdout.isatty() else text.encode("utf-8", "replace").decode("utf-8")
    sys.stdout.write(shown + "\n")
    sys.stdout.flush()
