"""Turning results into tables, bars and JSON. Status goes to stderr, data to stdout."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from crecli.console import err, out, print_json, progress, status, warn

if TYPE_CHECKING:
    from crecli.config import Settings
    from crecli.models.backend import Generation
    from crecli.models.bench import Speed


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit in ("B", "KB") else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def models_table(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title="Model ladder (smallest first)", title_justify="left")
    # Names and states must survive a narrow or piped console whole: other columns shrink.
    widest = max((len(r["name"]) for r in rows), default=4)
    for col in ("rung", "name", "arch", "params", "quant", "size", "file", "pp tok/s", "tg tok/s"):
        table.add_column(
            col,
            justify="right" if col in ("rung", "size", "pp tok/s", "tg tok/s") else "left",
            min_width=widest if col == "name" else (8 if col == "file" else None),
            no_wrap=col in ("name", "file"),
        )
    for r in rows:
        if r["backend"] == "openai":
            file_state = "[cyan]remote[/cyan]"
        elif r["verified"]:
            file_state = "[green]verified[/green]"
        elif r["present"]:
            file_state = f"[red]bad: {r['problem']}[/red]"
        else:
            file_state = "[yellow]missing[/yellow]"
        table.add_row(
            str(r["rung"]) if r["rung"] is not None else "-",
            r["name"],
            r["arch"],
            r["params"],
            r["quant"],
            human_bytes(r["size"]),
            file_state,
            f"{r['pp_tokens_per_s']:.0f}" if r["pp_tokens_per_s"] else "-",
            f"{r['tg_tokens_per_s']:.1f}" if r["tg_tokens_per_s"] else "-",
        )
    out().print(table)
    if any(not r["verified"] for r in rows):
        status("Fetch missing models with `cre models pull`.")
    if any(r["tg_tokens_per_s"] is None and r["backend"] == "llama" for r in rows):
        status("Measure speeds with `cre models bench`.")


def pull_models(settings: "Settings", names: Sequence[str], force: bool = False) -> None:
    from crecli.models.pull import pull

    specs = [settings.get(n) for n in names]
    with progress(transient=False) as bar:
        for spec in specs:
            task = bar.add_task(f"{spec.name}", total=spec.size)
            path, did = pull(spec, progress=lambda n, t=task: bar.advance(t, n), force=force)
            bar.update(task, completed=spec.size)
            status(f"{spec.name}: {'assembled and verified' if did else 'already verified'} at {path}")


def bench_models(settings: "Settings", names: Sequence[str], pp_tokens: int, tg_tokens: int) -> list["Speed"]:
    from crecli.models import bench

    speeds = []
    for name in names:
        spec = settings.get(name)
        if spec.backend != "llama":
            warn(f"{name}: remote models are not benchmarked; set price_per_1k_tokens instead")
            continue
        status(f"Measuring {name} ({pp_tokens} prompt tokens, {tg_tokens} generated)...")
        speed = bench.measure(spec, pp_tokens=pp_tokens, tg_tokens=tg_tokens)
        bench.save(speed)
        speeds.append(speed)
    return speeds


def bench_table(speeds: list["Speed"]) -> None:
    from rich.table import Table

    table = Table(title="Measured speed on this machine", title_justify="left")
    for col in ("model", "threads", "load s", "prompt tok/s", "gen tok/s"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for s in speeds:
        table.add_row(s.model, str(s.threads), f"{s.load_seconds:.1f}", f"{s.pp_tokens_per_s:.0f}", f"{s.tg_tokens_per_s:.1f}")
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
        out().print(gen.text.strip(), markup=False, highlight=False)
        err().print(
            f"[dim]{model}: {gen.prompt_tokens}+{gen.output_tokens} tokens, {gen.seconds:.2f} s[/dim]",
            highlight=False,
        )
