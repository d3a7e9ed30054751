"""Reports: what `cre fit`, `cre inspect`, `cre calibrate` and `cre eval` print, and the
frontier plot. Answers, traces, batch summaries and tables are `render`'s. Status goes to
stderr, data to stdout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crecli.console import out, print_json, status, warn
from crecli.models.prompting import control_markers
from crecli.console import terminal_safe
from crecli.render import cost_text, stale_speeds_note


def fit_report(report: Any, as_json: bool) -> None:
    """Summary of `cre fit`: data on stdout as JSON, or a short human summary on stderr."""
    from dataclasses import asdict

    data = asdict(report)
    data["router_path"] = str(report.router_path)
    if as_json:
        print_json(data)
        return
    total = sum(report.seconds.values())
    status(
        f"Wrote {report.router_path}: {report.n_clusters} clusters from {report.n_records} queries "
        f"({report.n_labelled} labelled, "
        + (f"{report.n_served} served, " if report.n_served else "")
        + f"{report.n_unclustered} unclustered"
        + (f", {report.n_bad} bad lines skipped" if report.n_bad else "")
        + (f", {report.n_skipped_too_long} too long for every rung's context left out" if report.n_skipped_too_long else "")
        + ")."
    )
    status(
        f"Outcomes: {report.outcomes_run} model runs now, {report.outcomes_reused} reused from the store"
        + (f", {report.outcomes_labelled} correctness labels from the log" if report.outcomes_labelled else "")
        + f"; {report.model_seconds:.0f} model-seconds recorded in all."
    )
    status("Time: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items()) + f" (total {total:.1f} s)")
    if report.truth:
        status(f"Clusters against the truth field: NMI {report.truth['nmi']:.3f}, ARI {report.truth['ari']:.3f}")
    status(f"Inspect it with `cre inspect {report.router_path}`.")


def router_dict(router: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return {
        "schema_version": router.schema_version,
        "ladder": [asdict(entry) for entry in router.ladder],
        "embedder": {"kind": router.embedder.kind, "identity": router.embedder.identity},
        "fallback_model": router.fallback_model,
        "budget": router.budget,
        "quality": router.quality.to_dict(),
        "thresholds": router.thresholds,
        "deferral": router.deferral.to_dict() if router.deferral is not None else None,
        "checks": rung_checks(router),
        "fit": router.fit.to_dict(),
        "clusters": [
            {
                "id": c.id,
                "size": c.size,
                "model": c.model,
                "answer_type": c.answer_type,
                "examples": c.examples,
                "stats": c.stats,
                "thresholds": c.thresholds,
                "exemplars": c.exemplars,
                "shots": c.shots,
                # Control-token spellings in the examples: fed to models as plain text, but
                # no honest fit writes them, so a reader should look (`exemplar_warnings`).
                "exemplar_markers": sorted({m for pair in c.exemplars for text in pair for m in control_markers(text)}),
            }
            for c in router.clusters
        ],
    }


def exemplar_warnings(router: Any) -> list[str]:
    """One line per answered example of a router that spells a chat-template control token.

    crecli tokenizes examples as text, so such a spelling cannot open a chat turn; but a
    shared router file whose examples hold `<|im_start|>system` was edited to try, and its
    examples deserve a reader's eyes.
    """
    lines = []
    for c in router.clusters:
        for i, pair in enumerate(c.exemplars):
            found = sorted({m for text in pair for m in control_markers(text)})
            if found:
                lines.append(f"cluster {c.id}, example {i + 1} spells control token(s) {', '.join(found)}: "
                             "models read it as plain text, but check where this router file came from")
    return lines


# Rows of the `cre inspect` table: a router fitted on 1,400 queries has about 20-40 clusters,
# and Rich takes seconds per thousand rows, so a router file with thousands (hand-made, or
# fitted with --min-cluster-size 2 on a huge log) is shown in part; --json has them all.
INSPECT_CLUSTERS = 200


def rung_checks(router: Any) -> dict[str, str]:
    """Each ladder model's check, as the cascade runs it (`ladder.Policy.rungs`): "agreement",
    "deferral" or "greedy" (the top rung of a deferral router)."""
    return {rung.model: rung.check for rung in router.policy().rungs()}


def quality_check_line(router: Any) -> str:
    """How each rung of `router` checks its answers, in one line for `cre inspect`: a deferral
    router's rungs without log-probabilities are shown apart, as agreement-only."""
    if router.deferral is None:
        return (f"quality check k={router.quality.k}, T={router.quality.temperature}; thresholds "
                + ", ".join(f"{m} {t:.2f}" for m, t in router.thresholds.items()))
    agreement = set(router.deferral.agreement)
    line = (f"quality check: calibrated deferral, {router.deferral.votes} vote(s) a rung; P(correct) thresholds "
            + ", ".join(f"{m} {t:.2f}" for m, t in router.thresholds.items() if m not in agreement))
    if agreement:
        line += (f"; agreement-only (no log-probabilities; k={router.quality.k}, T={router.quality.temperature}): "
                 + ", ".join(f"{m} {t:.2f}" for m, t in router.thresholds.items() if m in agreement))
    return line


def logs_shown(router: Any) -> str:
    """The logs `router` was fitted and last calibrated on, where they are by its records
    (`routerfile.fit_log_path`, `calibration_log_path`), and when, for `cre inspect`'s first
    line (`--json` has the records themselves: `fit.log`, `fit.calibration.log`)."""
    from crecli.routerfile import calibration_log_path, fit_log_path

    fit = router.fit
    shown = f"{fit_log_path(router)}, fitted {fit.date}"
    cal = fit.calibration
    if cal is not None:
        where = calibration_log_path(router)
        # A router calibrated by a crecli that did not record the log says so, not "None".
        when = f" {cal['date']}" if cal.get("date") else ""
        shown += f"; {where if where is not None else 'log not recorded'}, calibrated{when}"
    return shown


def inspect_router(router: Any, as_json: bool, here: dict[str, tuple[str, str]] | None = None) -> None:
    """`cre inspect`: the logs the router was fitted and calibrated on (`logs_shown`), its
    models (each one's file and, with `here`, its state on this machine,
    `routerfile.local_state`), then its clusters."""
    from rich.table import Table
    from rich.text import Text

    if as_json:
        shown = {name: {"state": code, "detail": words} for name, (code, words) in (here or {}).items()}
        print_json({**router_dict(router), **({"here": shown} if here is not None else {})})
        return
    ladder = router.ladder_names
    cost_label = "$" if router.fit.cost_unit == "price" else "s"
    fit = router.fit
    out().print(
        terminal_safe(
            f"Router schema {router.schema_version}: {len(router.clusters)} clusters from {fit.n_queries} queries "
            f"({logs_shown(router)}); budget {router.budget['kind']} {router.budget['value']}; "
            f"fallback {router.fallback_model}; "
            + quality_check_line(router)
        ),
        highlight=False,
        markup=False,
    )
    # A line a model, soft-wrapped: a table column would break the sha256 a teammate copies.
    out().print("Models, smallest first:", highlight=False, markup=False)
    for entry in router.ladder:
        size = f"{entry.size:,} bytes" if entry.size is not None else "size not pinned"
        # Context and repetition penalty as recorded (`LadderEntry`): absent in older routers
        # and for a remote rung left to its server.
        line = (f"  {terminal_safe(entry.name)}: sha256 {entry.sha256 or '(not pinned)'}, {size}, "
                f"prompts {entry.prompt_format or '(not recorded)'}"
                + (f", context {entry.context}" if entry.context is not None else "")
                + (f", repeat_penalty {entry.repeat_penalty:g}" if entry.repeat_penalty is not None else ""))
        if here is not None:
            line += f"; here: {terminal_safe(here.get(entry.name, ('', ''))[1])}"
        out().print(line, highlight=False, markup=False, soft_wrap=True)
    table = Table(show_lines=True)
    table.add_column("cluster", justify="right")
    table.add_column("size", justify="right")
    table.add_column("examples", ratio=3)
    # Text, not str, wherever the router's own words go: Rich would read [brackets] as markup.
    for name in ladder:
        table.add_column(Text(f"{terminal_safe(name)}\nacc (n) / cost {cost_label}"), justify="right")
    table.add_column("chosen")
    for c in router.clusters[:INSPECT_CLUSTERS]:
        cells = []
        for name in ladder:
            st = c.stats.get(name)
            if not st or not st.get("n"):
                cells.append("-")
                continue
            mark = "*" if name == c.model else ""
            shots = c.shots.get(name, 0)
            cells.append(
                f"{mark}{st['accuracy']:.2f} ({int(st['n'])})\n{cost_text(st['mean_cost'])}"
                + (f"\n{shots} example{'s' if shots > 1 else ''}" if shots else "")
            )
        examples = "\n".join("- " + terminal_safe(e.replace("\n", " ")[:90]) for e in c.examples)
        table.add_row(str(c.id), str(c.size), Text(examples), *cells, Text(terminal_safe(c.model)))
    out().print(table)
    if len(router.clusters) > INSPECT_CLUSTERS:
        status(f"Showing the first {INSPECT_CLUSTERS} of {len(router.clusters):,} clusters; "
               "`cre inspect --json` lists them all.")
    _answered_examples(router)


# How much of an answered example `cre inspect` shows: enough to read what a model is told.
EXEMPLAR_SHOWN_CHARS = 300


def _answered_examples(router: Any) -> None:
    """The answered examples each model is shown before a cluster's prompts, in full enough to
    audit (they come from the router file, so from whoever wrote it), flagged where they spell
    a control token."""
    from rich.text import Text

    shown = [c for c in router.clusters[:INSPECT_CLUSTERS] if c.exemplars and any(c.shots.values())]
    if not shown:
        return
    out().print(Text("\nAnswered examples shown before prompts (from the router file):", style="bold"))
    for c in shown:
        who = ", ".join(f"{terminal_safe(m)} first {n}" for m, n in c.shots.items() if n)
        out().print(Text(f"cluster {c.id} ({who}):"))
        for i, (q, a) in enumerate(c.exemplars, start=1):
            flag = sorted({m for text in (q, a) for m in control_markers(text)})
            text = Text(f"  {i}. Q: {terminal_safe(q[:EXEMPLAR_SHOWN_CHARS])}\n     A: {terminal_safe(a[:EXEMPLAR_SHOWN_CHARS])}")
            if flag:
                text.append(f"\n     ! spells control token(s) {terminal_safe(', '.join(flag))} (read as plain text)", style="bold red")
            out().print(text)
    for line in exemplar_warnings(router):
        warn(line)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def calibration(cal: Any, path: Any, as_json: bool) -> None:
    from rich.table import Table

    ref = cal.reference
    if as_json:
        data = {
            "router": str(path),
            "budget": cal.budget.to_dict(),
            "budget_met": cal.budget_met,
            "setting": cal.setting.label(),
            "thresholds": cal.thresholds,
            # Every cluster's model the router is written with: those kept from the router too.
            "cluster_models": {str(k): v for k, v in sorted({**cal.kept_models, **cal.choice.models}.items())},
            "kept_models": {str(k): v for k, v in sorted(cal.kept_models.items())},
            "held_out": cal.held_out,
            "estimate": cal.estimate,
            "in_sample": cal.in_sample,
            "reference": ref,
            "frontier": cal.frontier,
            "n": cal.n,
            "n_skipped_too_long": cal.n_skipped_too_long,
            "folds": cal.folds,
            "seconds": cal.seconds,
            "check": cal.check,
            "deferral": cal.deferral.to_dict() if cal.deferral is not None else None,
            "signals": cal.signals,
        }
        print_json(data)
        return
    table = Table(title="Accuracy-cost frontier, held out by cross-validation (* = chosen)", title_justify="left")
    for col in ("", "setting", "accuracy", "vs strongest", "cost/query", "vs strongest", "escalated"):
        table.add_column(col, justify="left" if col in ("", "setting") else "right")
    for p in cal.frontier:
        table.add_row(
            "*" if p["chosen"] else "",
            p["setting"],
            f"{p['accuracy']:.3f}",
            _pct(p["accuracy"] / ref["accuracy"]) if ref["accuracy"] else "-",
            cost_text(p["mean_cost"]),
            _pct(p["mean_cost"] / ref["mean_cost"]) if ref["mean_cost"] else "-",
            _pct(p["escalation_rate"]),
        )
    out().print(table)
    held = cal.held_out
    out().print(
        f"Chosen for {cal.budget.kind} {cal.budget.value}: {cal.setting.label()}"
        + ("" if cal.budget_met else " (budget NOT met by any setting's estimate; the closest setting was chosen)"),
        highlight=False,
    )
    guess = cal.estimate
    out().print(
        f"Chosen on its estimate (the mean of held-out and in-sample figures): accuracy {guess['accuracy']:.3f} "
        f"at {_pct(guess['mean_cost'] / ref['mean_cost']) if ref['mean_cost'] else '-'} of the strongest model's cost.",
        highlight=False,
    )
    out().print(
        f"Held out ({cal.folds}-fold cross-validation, {cal.n} queries): accuracy {held['accuracy']:.3f} "
        f"= {_pct(held['accuracy'] / ref['accuracy']) if ref['accuracy'] else '-'} of the strongest model's "
        f"{ref['accuracy']:.3f}, at {_pct(held['mean_cost'] / ref['mean_cost']) if ref['mean_cost'] else '-'} of its cost; "
        f"{_pct(held['escalation_rate'])} escalated.",
        highlight=False,
    )
    if cal.signals:
        signals = Table(title="How well each signal predicts a right greedy answer (held-out AUROC over all answers / "
                              "within a cluster, where the check acts; 0.5 is chance)", title_justify="left")
        names = sorted({name for per in cal.signals.values() for name in per})
        signals.add_column("model")
        for name in names:
            signals.add_column(name, justify="right")

        def cell(figures: dict[str, Any] | None) -> str:
            if figures is None or figures["auroc"] is None:
                return "-"
            within = figures.get("within_cluster")
            return f"{figures['auroc']:.2f} / " + ("-" if within is None else f"{within:.2f}")

        for model, per in cal.signals.items():
            signals.add_row(model, *(cell(per.get(name)) for name in names))
        out().print(signals)
    status(f"Wrote {path} ({cal.seconds:.1f} s).")


def eval_report(report: Any, as_json: bool) -> None:
    from dataclasses import asdict

    from rich.table import Table

    shared = report.n_in_sample
    if report.in_sample:
        warn(f"{shared} of {report.n} queries are in the router's fit or calibration log, so these figures are in "
             "sample, not held out: evaluate on queries the fit and calibration never saw (cre calibrate's held-out "
             "figures are cross-validated)")
    elif shared:
        warn(f"{shared} of {report.n} queries are in the router's fit or calibration log: their figures are in sample "
             f"(--held-out-only scores the other {report.n - shared} alone)")
    if as_json:
        data = asdict(report)
        print_json(data)
        return
    ref = report.reference
    in_fit = f"; {shared} in the router's fit or calibration log, in sample" if shared else ""
    table = Table(title=f"cre eval: {report.n} labelled queries (cost in {report.unit} per query{in_fit})",
                  title_justify="left")
    for col in ("system", "accuracy", "vs strongest", "cost/query", "vs strongest", "escalated", "note"):
        table.add_column(col, justify="left" if col in ("system", "note") else "right")
    for p in report.points:
        table.add_row(
            p.name,
            f"{p.accuracy:.3f}",
            _pct(p.accuracy / ref["accuracy"]) if ref["accuracy"] else "-",
            cost_text(p.mean_cost),
            _pct(p.mean_cost / ref["mean_cost"]) if ref["mean_cost"] else "-",
            _pct(p.escalation_rate) if p.escalation_rate is not None else "",
            p.note,
        )
    out().print(table)
    per_token = report.tokens["seconds_per_output_token"]
    out().print(
        f"Cascade keeps {_pct(report.retained)} of the strongest model's accuracy at {_pct(report.cost_share)} "
        f"of its cost; the oracle is {100 * report.oracle_gap:.1f} points higher. "
        f"{report.tokens['output_tokens']:.0f} output tokens"
        + (f", {per_token * 1000:.0f} ms of model time per output token." if per_token is not None else "."),
        highlight=False,
    )
    stale = stale_speeds_note(report.speeds_age_hours)
    if stale:
        status(stale[0].upper() + stale[1:] + ".")
    clusters = Table(title="Per cluster", title_justify="left")
    for col in ("cluster", "n", "starts on", "accuracy", "cost/query", "escalated", "answered by"):
        clusters.add_column(col, justify="left" if col in ("starts on", "answered by") else "right")
    for c in report.per_cluster:
        clusters.add_row(
            str(c["cluster"]) if c["cluster"] >= 0 else "unclustered",
            str(c["n"]),
            # The counts wherever a query started elsewhere than on the cluster's model.
            ", ".join(f"{m} {n}" for m, n in c["started_on"].items())
            if c["started_on"] != {c["start_model"]: c["n"]} else c["start_model"],
            f"{c['accuracy']:.2f}",
            cost_text(c["mean_cost"]),
            _pct(c["escalation_rate"]),
            ", ".join(f"{m} {n}" for m, n in c["answered_by"].items() if n),
        )
    out().print(clusters)
    out().print(_ascii_scatter(report.points, ref))
    if report.live:
        live = report.live
        out().print(
            f"Live cascade on {live['n']} queries: accuracy {live['accuracy']:.3f} "
            f"(replay {live['replay']['accuracy']:.3f}; {_pct(live['agreement'])} of queries graded alike), "
            f"{live['model_seconds']:.1f} model-seconds, {live['wall_seconds']:.1f} s wall.",
            highlight=False,
        )


def _ascii_scatter(points: list[Any], ref: dict[str, float], width: int = 60, height: int = 14) -> str:
    """A compact accuracy-against-cost view for the terminal; letters key the systems.

    Points sharing a cell are drawn in order and the cascade last, so its letter is the one
    seen (random routing at equal cost shares its column, and was drawn over it); a letter
    drawn over is keyed as behind the one shown. The top and bottom rows are labelled with
    their accuracy: the bottom is 0.05 under the lowest point, not 0."""
    from crecli.evaluate import CASCADE

    xs = [p.mean_cost for p in points]
    ys = [p.accuracy for p in points]
    x0, x1 = 0.0, max(xs) * 1.05 or 1.0
    y0, y1 = max(0.0, min(ys) - 0.05), min(1.0, max(ys) + 0.05)
    grid = [[" "] * width for _ in range(height)]
    cells = []
    for p in points:
        col = int((p.mean_cost - x0) / (x1 - x0) * (width - 1))
        row = height - 1 - int((p.accuracy - y0) / ((y1 - y0) or 1) * (height - 1))
        cells.append((row, col))
    letters = [chr(ord("A") + i) for i in range(len(points))]
    for i in sorted(range(len(points)), key=lambda i: points[i].name == CASCADE):
        row, col = cells[i]
        grid[row][col] = letters[i]
    keys = []
    for ch, p, (row, col) in zip(letters, points, cells):
        shown = grid[row][col]
        keys.append(f"{ch} {p.name}" + (f" (behind {shown})" if shown != ch else ""))
    top, bottom = f"{y1:.2f}", f"{y0:.2f}"
    margin = max(len(top), len(bottom)) + 1
    labels = {0: top, height - 1: bottom}
    lo, hi = cost_text(x0), cost_text(x1)
    lines = ["accuracy"] + [labels.get(i, "").rjust(margin) + "|" + "".join(r) for i, r in enumerate(grid)] + [
        " " * margin + "+" + "-" * width,
        # The right label ends under the last column, which is x1's.
        " " * (margin + 1) + lo + " " * max(1, width - len(lo) - len(hi)) + hi + "  cost/query",
    ]
    return "\n".join(lines + [" " * (margin + 1) + "; ".join(keys)])


def plot(report: Any, path: Path) -> None:
    """Accuracy against cost for the cascade and every baseline, written whole or not at all
    (`paths.atomic_write`): SVG by hand, PNG via matplotlib."""
    from crecli import paths
    from crecli.errors import CreError
    from crecli.evaluate import check_plot

    check_plot(path)
    try:
        if path.suffix.lower() == ".png":
            paths.atomic_write(path, _png(report))
        else:
            paths.atomic_write(path, _svg(report))
    except OSError as exc:
        raise CreError(f"could not write --plot {path} ({exc.strerror or exc}); the report above is complete") from exc
    status(f"Wrote {path}")


def _png(report: Any) -> bytes:
    import io

    from crecli.errors import CreError
    from crecli.evaluate import PLOT_SOFTWARE, PLOT_TITLE

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # installed (`check_plot` found it) but broken
        raise CreError(f"PNG plots need a working matplotlib ({exc}); or write .svg, which needs nothing") from None

    fig, ax = plt.subplots(figsize=(7, 5))
    for p in report.points:
        ax.scatter([p.mean_cost], [p.accuracy], s=60 if p.name.startswith("cascade (") else 30)
        ax.annotate(p.name, (p.mean_cost, p.accuracy), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel(f"mean cost per query ({report.unit})")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{PLOT_TITLE}{report.n} queries")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, metadata={"Software": PLOT_SOFTWARE})  # `is_plot`'s mark
    plt.close(fig)
    return buf.getvalue()


def _svg(report: Any, w: int = 720, h: int = 480, pad: int = 60) -> str:
    from html import escape

    from crecli.evaluate import PLOT_TITLE

    xs = [p.mean_cost for p in report.points]
    ys = [p.accuracy for p in report.points]
    x1 = max(xs) * 1.1 or 1.0
    y0, y1 = max(0.0, min(ys) - 0.05), min(1.0, max(ys) + 0.05)

    def sx(x: float) -> float:
        return pad + x / x1 * (w - 2 * pad)

    def sy(y: float) -> float:
        return h - pad - (y - y0) / ((y1 - y0) or 1) * (h - 2 * pad)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
        f'<text x="{w / 2}" y="{h - 15}" text-anchor="middle">mean cost per query ({escape(report.unit)})</text>',
        f'<text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" text-anchor="middle">accuracy</text>',
        f'<text x="{w / 2}" y="25" text-anchor="middle" font-size="14">{PLOT_TITLE}{report.n} queries</text>',
    ]
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        xv = x1 * i / 4
        parts.append(f'<text x="{pad - 5}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.2f}</text>')
        parts.append(f'<text x="{sx(xv):.1f}" y="{h - pad + 15}" text-anchor="middle">{cost_text(xv)}</text>')
    for p in report.points:
        main = p.name.startswith("cascade (")
        parts.append(
            f'<circle cx="{sx(p.mean_cost):.1f}" cy="{sy(p.accuracy):.1f}" r="{6 if main else 4}" '
            f'fill="{"crimson" if main else "steelblue"}"/>'
        )
        parts.append(f'<text x="{sx(p.mean_cost) + 7:.1f}" y="{sy(p.accuracy) - 5:.1f}">{escape(p.name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
