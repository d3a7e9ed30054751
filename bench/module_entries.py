"""How many times one prompt's path enters each crecli module, for `cre ask` and one `cre serve` request.

Issue 23's goal: following one prompt through `cre ask`, or one `cre serve` request, enters
each module at most twice. An entry is a function of one crecli module calling into another
crecli module (calls within a module, and to the standard library or other packages, do not
count), and one call of a function counts its calls into one module once however many there are
(a function called twice, as one per rung, counts twice; comprehensions are calls of their own):
`schema.check_body` checking a hundred fields through `fields.Field` is one entry into
`fields`, as `cli.ask` calling `Cascade.from_file`, `ask` and `close` is one into `escalate`.
Counted from the router loaded (loading it is the command's setup, not the prompt's path):
for `cre ask`, routing, the climb, pricing, the served-query log and the output; for `cre
serve`, one chat request through the app. Models are fakes (the package's `FakeBackend`),
so this runs anywhere in seconds; the router is the shipped default. The prompt is answered
on the rung it starts on (`rungs judged` below). "ask, climbing" follows a query of the
shipped log that starts on the first rung, with fake models whose answers below the top are
empty (no check keeps one), so it climbs all three rungs: the walk is the same one loop
(`ladder.walk`), but each rung leases its model, draws its votes and is judged anew, so the
modules below the engine are entered once per rung. "by calling function" counts that path
with each calling function's entries into a module once, however many rungs called it.

    .venv/bin/python bench/module_entries.py [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any, Callable

PROMPT = "What is 12 plus 30?"
RUNGS: dict[str, int] = {}  # rungs the prompt was judged on


def crecli_module(frame: FrameType | None) -> str | None:
    name = frame.f_globals.get("__name__", "") if frame is not None else ""
    return name if name.startswith("crecli.") or name == "crecli" else None


class Entries:
    """Counts entries into crecli modules on every thread started after it is installed,
    while `active`."""

    def __init__(self) -> None:
        import threading

        self.active = False
        self.seen: set[tuple[int, str]] = set()  # (calling frame, module entered)
        # Every calling frame seen, kept alive so that no later frame reuses its id and has its
        # entries taken for ones already counted.
        self.frames: list[FrameType] = []
        self.entries: Counter[str] = Counter()
        self.calls: list[str] = []  # each entry, as caller -> callee
        # (calling function, module entered): a function that enters a module on every rung
        # counts once here; `by_site` counts these per module.
        self.sites: set[tuple[Any, str]] = set()
        sys.setprofile(self.profile)
        threading.setprofile(self.profile)

    def profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call" or not self.active:
            return
        here = crecli_module(frame)
        # Code a dataclass generates (a record's __init__, __eq__) is data, not a module's logic.
        if here is None or frame.f_code.co_filename == "<string>":
            return
        caller = frame.f_back
        # Skip frames of other packages between crecli frames (typer, starlette, anyio, ...).
        while caller is not None and crecli_module(caller) is None and caller.f_back is not None:
            caller = caller.f_back
        if caller is None or crecli_module(caller) in (None, here):
            return
        key = (id(caller), here)
        if key not in self.seen:
            self.seen.add(key)
            self.frames.append(caller)
            self.entries[here] += 1
            self.calls.append(f"{crecli_module(caller)}.{caller.f_code.co_name} -> {here}.{frame.f_code.co_name}")
            self.sites.add((caller.f_code, here))

    def count(self, run: Callable[[], Any]) -> Counter[str]:
        self.seen.clear()
        self.frames = []
        self.entries = Counter()
        self.calls = []
        self.sites = set()
        self.active = True
        try:
            run()
        finally:
            self.active = False
        return self.entries

    def by_site(self) -> Counter[str]:
        return Counter(module for _, module in self.sites)


def fake_models() -> None:
    """Fake models: the ladder's top answers "42", the others an empty answer, which no
    check keeps, so a prompt that starts below the top climbs every rung above its start."""
    from crecli import config
    from crecli.models import registry
    from crecli.models.fake import FakeBackend

    top = config.load().ladder[-1]
    registry.make_backend = lambda spec: FakeBackend(  # type: ignore[assignment]
        spec, lambda text, params: "42" if spec.name == top else "")


def climbing_prompt() -> str:
    """A query of the shipped log that the shipped router starts on the ladder's first rung."""
    from crecli import config, paths, routerfile
    from crecli.querylog import read_log
    from crecli.route import route_many

    settings = config.load()
    router = routerfile.load(paths.shipped_router(), settings)
    prompts = [r.prompt for r in read_log(Path(__file__).resolve().parents[1] / "examples" / "querylog.jsonl").records]
    for prompt, decision in zip(prompts, route_many(router, prompts)):
        if decision.model == settings.ladder[0] and decision.familiar:
            return prompt
    raise SystemExit("no query of examples/querylog.jsonl starts on the first rung")


def ask_once(prompt: str = PROMPT, name: str = "ask") -> Callable[[], None]:
    """What `cre ask` does for its prompt once the router is loaded: route, climb the
    ladder, price, log, render."""
    from crecli import paths, render, servedlog
    from crecli.escalate import Cascade

    cascade = Cascade.from_file(paths.shipped_router())
    served = servedlog.ServedLog(Path(paths.data_dir()) / "served.jsonl", "ask")

    def once() -> None:
        trace = cascade.ask(prompt)
        RUNGS[name] = len(trace.steps)
        served.record(prompt, trace, cascade)
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            render.routed_answer(trace, as_json=True, explain=False)

    once()  # warm: the first prompt loads the fake models
    return once


def serve_once() -> Callable[[], None]:
    from starlette.testclient import TestClient

    from crecli import paths
    from crecli.escalate import Cascade
    from crecli.serve_app import create_app

    cascade = Cascade.from_file(paths.shipped_router())
    client = TestClient(create_app(cascade))
    client.__enter__()

    def request() -> None:
        response = client.post("/v1/chat/completions", json={"model": "cre", "messages": [{"role": "user", "content": PROMPT}]})
        assert response.status_code == 200, response.text
        RUNGS["serve"] = len(response.json()["cre"]["steps"])

    request()  # warm: the first request loads the fake models
    return request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--calls", action="store_true", help="list every entry, caller -> callee")
    args = parser.parse_args()
    import os
    import tempfile

    os.environ["CRE_HOME"] = tempfile.mkdtemp(prefix="cre-entries-")  # no user file is touched
    fake_models()
    entries = Entries()  # before any thread of the server starts
    ask = entries.count(ask_once())
    ask_calls = entries.calls
    climb = entries.count(ask_once(climbing_prompt(), "ask, climbing"))
    climb_calls, climb_sites = entries.calls, entries.by_site()
    serve = entries.count(serve_once())
    if args.calls:
        for name, calls in (("ask", ask_calls), ("ask, climbing", climb_calls), ("serve", entries.calls)):
            print(f"== {name}")
            print("\n".join(calls))
    result = {"ask": dict(ask.most_common()), "ask, climbing": dict(climb.most_common()),
              "ask, climbing, by calling function": dict(climb_sites.most_common()),
              "serve": dict(serve.most_common()), "rungs": dict(RUNGS)}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    for name in ("ask", "ask, climbing", "ask, climbing, by calling function", "serve"):
        counts = result[name]
        over = {m: n for m, n in counts.items() if n > 2}
        print(f"{name}: {len(counts)} modules entered; most entered: "
              + ", ".join(f"{m} {n}" for m, n in list(counts.items())[:8])
              + (f"; over 2: {over}" if over else "; none over 2") + f"; rungs judged: {RUNGS[name.split(', by')[0]]}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
