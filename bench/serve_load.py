"""Load tests of `cre serve`: latency and throughput under concurrent clients, nothing lost.

Each client sends its next request when the last returns. A table gives, per setup and
number of clients, the answers per second, p50 and p95 latency of answers, and what did not
get an answer (429s, errors, lost). Nothing may be lost: every request must get an answer
or a 429, else the exit status is 1.

    .venv/bin/python bench/serve_load.py --fake                  # fake models in this process: 8 clients
    .venv/bin/python bench/serve_load.py --fake --sweep          # ... at 1, 4, 16 and 64 clients
    .venv/bin/python bench/serve_load.py --url http://127.0.0.1:8000 --sweep   # a running `cre serve`
    .venv/bin/python bench/serve_load.py --engine                # the real-engine comparison (below)

--engine is the issue-25 measurement, in one run, on the default ladder's real models (`cre
models pull`), with llama.cpp's `llama-server -np 4` (bench/build_llama_server.sh builds it
from llama-cpp-python's own llama.cpp sources; llama-cpp-python's server is the fallback,
and the table says which ran). At 1, 4, 16 and 64 clients, each sending the same prompts of
examples/querylog.jsonl:

  in-process      `cre serve` on the shipped router, every rung in process;
  direct          the engine serving the top rung, called directly with the requests cre
                  would send it (the prompt rendered in the rung's format);
  cre->engine     `cre serve` on a router whose every prompt starts on that engine rung
                  (routing included): against `direct`, what cre adds;
  top on engine   `cre serve` on the shipped router, its top rung on the engine;
  all on engines  `cre serve` on the shipped router, every rung on its own engine;
  replica kill    cre->engine with the rung on two engines, one killed (SIGKILL) a quarter
                  of the way through the 16-client run.

Then the goals: cre->engine adds at most 10 ms at p50 over direct; its throughput at 16
clients is at least 90% of direct's; the replica kill loses no request. Run nothing else
on the machine; 2 cores bound the absolute figures, the ratios are what count.
--overhead isolates what cre adds: a fake engine (no model, a fixed --engine-ms an answer)
serves the top rung, called directly and through `cre serve`, interleaved (each round calls
it directly first, then through cre), 5 rounds at 1 and 4 clients; it prints the median p50
difference and each arm's mean token counts. With --overhead-engine llama-server the same
interleaving runs against the real engine.
--fake builds the tests' three-rung router (tests/support/routers.py) on fake models that
sleep --vote-ms per vote, so it measures the server and not llama.cpp. Only loopback
addresses are accepted: this is not a tool to load someone else's server.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
PROMPTS = [
    "What is 12 plus 30?", "What is the capital city of France?", "What is 7 plus 5?",
    "Which of these is a fruit? (A) stone (B) fruit-like thing (C) chair", "What is the capital city of Peru?",
    "What is 8 plus 9?", "Which of these is a tool? (A) stone (B) tool-like thing (C) chair", "What is 40 plus 2?",
]
LEVELS = (1, 4, 16, 64)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


Request = tuple[str, dict[str, Any]]  # (path, JSON body)


def load(url: str, requests: list[Request], clients: int, key: str | None = None,
         during: Callable[[int], None] | None = None, usage: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Send `requests` from `clients` threads, each sending its next when the last returns;
    `during(n)` is called after each reply with the number returned so far; `usage`, when
    given, gets each answer's `usage` (its token counts)."""
    next_index, lock = [0], threading.Lock()
    results: list[tuple[int | str, float]] = []
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    def client() -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=1200) as http:
            while True:
                with lock:
                    if next_index[0] >= len(requests):
                        return
                    path, body = requests[next_index[0]]
                    next_index[0] += 1
                start = time.perf_counter()
                try:
                    reply = http.post(path, json=body)
                    status: int | str = reply.status_code
                    if usage is not None and status == 200:
                        with lock:
                            usage.append(reply.json().get("usage") or {})
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with lock:
                    results.append((status, time.perf_counter() - start))
                    returned = len(results)
                if during is not None:
                    during(returned)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    answered = [s for code, s in results if code == 200]
    return {
        "clients": clients, "sent": len(requests), "returned": len(results), "answered": len(answered),
        "refused_429": sum(1 for code, _ in results if code == 429),
        "other": sorted({str(code) for code, _ in results if code not in (200, 429)}),
        "errors": sum(1 for code, _ in results if code not in (200, 429)),
        "wall": wall, "answers_per_s": len(answered) / wall if wall else 0.0,
        "p50_ms": percentile(answered, 0.5) * 1000 if answered else None,
        "p95_ms": percentile(answered, 0.95) * 1000 if answered else None,
        "mean_ms": statistics.fmean(answered) * 1000 if answered else None,
    }


def chat_requests(model: str, prompts: list[str], n: int) -> list[Request]:
    return [("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]})
            for i in range(n)]


def table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:,.0f} ms"

    lines = ["| setup | clients | answers/s | p50 | p95 | answered | 429 | errors | lost |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows:
        lines.append(f"| {name} | {r['clients']} | {r['answers_per_s']:.2f} | {ms(r['p50_ms'])} | {ms(r['p95_ms'])} | "
                     f"{r['answered']} | {r['refused_429']} | {r['errors']} | {r['sent'] - r['returned']} |")
    return "\n".join(lines)


def ok(r: dict[str, Any]) -> bool:
    return r["returned"] == r["sent"] and not r["other"]


# ---------------------------------------------------------------- fake models, in this process

def fake_server(max_queue: int, vote_ms: float) -> tuple[str, Any]:
    """An in-process `cre serve` on the tests' fake ladder; returns its URL and a stop function."""
    os.environ["CRE_HOME"] = tempfile.mkdtemp(prefix="cre-serve-load-")
    from support.ladder import TINY_TOML  # type: ignore[import-not-found]
    from support.routers import make_router  # type: ignore[import-not-found]

    from crecli import config, serve, serve_app
    from crecli.escalate import Cascade
    from crecli.models import registry
    from crecli.models.fake import FakeBackend

    def answerer(name: str) -> Any:
        def answer(text: str, params: Any) -> str:
            time.sleep(vote_ms / 1000)
            # The small model is unsure of capitals (its votes differ), so those escalate.
            if name == "small" and "capital" in text and params.seed:
                return f"guess {params.seed % 7}"
            return "Paris" if "capital" in text else "42"

        return answer

    registry.make_backend = lambda spec: FakeBackend(spec, answerer(spec.name))  # type: ignore[assignment]
    toml = Path(os.environ["CRE_HOME"]) / "models.toml"
    toml.write_text(TINY_TOML)
    cascade = Cascade(make_router(), config.load(toml))
    options = serve.ServeOptions(max_queue=max_queue, timeout=120)
    sock = serve.listen("127.0.0.1", 0)
    server = serve.make_server(serve_app.create_app(cascade, options), options, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join(30)
        cascade.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


# ---------------------------------------------------------------- real engines

def log_prompts(n: int) -> list[str]:
    """`n` prompts spread over examples/querylog.jsonl's tasks."""
    from crecli.querylog import read_log  # the one reader of query logs, as `cre fit` reads them

    prompts = [r.prompt for r in read_log(ROOT / "examples" / "querylog.jsonl").records]
    step = max(1, len(prompts) // n)
    return prompts[::step][:n]


@contextmanager
def cre_serve(router: Path, models: Path | None, home: Path, log: Path, force: bool = False,
              max_queue: int = 64) -> Iterator[str]:
    """`cre serve` in a child process on a free port (its own CRE_HOME, the pulled models)."""
    from crecli import paths

    from support.engines import free_port  # type: ignore[import-not-found]

    port = free_port()
    env = {**os.environ, "CRE_HOME": str(home), "CRE_MODELS_DIR": str(paths.models_dir())}
    cmd = [sys.executable, "-m", "crecli", "serve", "--router", str(router), "--port", str(port),
           "--max-queue", str(max_queue), "--timeout", "1200"]
    cmd += ["--models", str(models)] if models is not None else []
    cmd += ["--force"] if force else []
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"cre serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code in (200, 503):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"cre serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def remote_toml(path: Path, urls: dict[str, str | list[str]], ladder: list[str], max_in_flight: int) -> Path:
    """The default models.toml's `ladder`, with the rungs in `urls` served by those engines
    (their prompt format kept: cre renders it and posts to /v1/completions)."""
    from crecli import config

    settings = config.load()
    text = f"ladder = {json.dumps(ladder)}\n"
    for name, where in urls.items():
        spec = settings.get(name)
        text += (f'[models."{name}"]\nurl = {json.dumps(where)}\napi_model = "served"\n'
                 f'prompt_format = "{spec.prompt_format}"\ncontext = {spec.context}\nmax_in_flight = {max_in_flight}\n'
                 # Greedy as in process: llama-cpp-python's server penalises repeats unless told.
                 'repeat_penalty = 1.0\n')
    path.write_text(text)
    return path


def fit_all_on(top: str, url: str, prompts: list[str], folder: Path) -> tuple[Path, Path]:
    """A router whose every prompt starts on `top`, served at `url`: a ladder of the default
    bottom rung and the engine rung, fitted on the prompts as plain text (no model runs:
    every cluster starts on the strongest rung)."""
    from crecli import config

    bottom = config.load().ladder[0]
    toml = remote_toml(folder / "one-engine.toml", {top: url}, [bottom, top], 4)
    text = folder / "prompts.txt"
    text.write_text("\n".join(p.replace("\n", " ") for p in prompts) + "\n")
    router = folder / "one-engine.cre"
    env = {**os.environ, "CRE_HOME": str(folder / "home")}
    done = subprocess.run([sys.executable, "-m", "crecli", "fit", str(text), "-o", str(router), "--models", str(toml)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"cre fit failed:\n{done.stderr[-3000:]}")
    return router, toml


def direct_requests(top: str, prompts: list[str], n: int) -> list[Request]:
    """The requests cre sends the top rung for these prompts, greedy as its answer is:
    the prompt rendered in the rung's format, its stop strings, the answer type's token cap
    (here the largest, as no cluster says otherwise)."""
    from crecli import config, grading
    from crecli.models.prompting import render
    from crecli.quality import QualityCheck, vote_params

    spec = config.load().get(top)
    out = []
    for i in range(n):
        prompt = prompts[i % len(prompts)]
        rendered = render(spec.prompt_format, prompt)
        # The greedy vote's sampling settings, from the rule cre's own requests follow.
        params = vote_params(QualityCheck(), 0, grading.max_tokens_for(None), prompt)
        out.append(("/v1/completions", {"model": "served", "prompt": rendered.escaped(), "temperature": params.temperature,
                                        "max_tokens": params.max_tokens, "top_p": params.top_p, "seed": params.seed,
                                        "stop": list(rendered.stop), "repeat_penalty": 1.0}))
    return out


def engine_run(args: argparse.Namespace) -> int:
    from crecli import config, paths

    from support.engines import engine  # type: ignore[import-not-found]

    settings = config.load()
    ladder = settings.ladder
    top = args.engine_model or ladder[-1]
    for name in ladder:
        spec = settings.get(name)
        if spec.file is None or not spec.file.is_file():
            print(f"{name} is not pulled: run `cre models pull`", file=sys.stderr)
            return 2
    prompts = log_prompts(max(50, args.requests))
    levels = [c for c in LEVELS if c <= args.max_clients]
    work = Path(tempfile.mkdtemp(prefix="cre-serve-engine-"))
    shipped = paths.shipped_router()
    rows: list[tuple[str, dict[str, Any]]] = []
    kinds: set[str] = set()

    def sweep(name: str, url: str, requests: list[Request]) -> None:
        for clients in levels:
            r = load(url, requests, clients)
            rows.append((name, r))
            print(table([(name, r)]).splitlines()[-1], file=sys.stderr, flush=True)

    n = args.requests
    print(f"work folder {work}; {n} requests a run", file=sys.stderr)
    with cre_serve(shipped, None, work / "home-a", work / "serve-a.log") as url:
        sweep("in-process", url, chat_requests("cre", prompts, n))

    top_file = settings.get(top).file
    with engine(top_file, work / "engine-top.log", parallel=args.parallel, kind=args.engine_kind) as eng:
        kinds.add(eng.kind)
        # The engine's URL is its API root (".../v1"); the requests carry their whole path.
        sweep("direct", eng.url.removesuffix("/v1"), direct_requests(top, prompts, n))
        router, toml = fit_all_on(top, eng.url, prompts, work)
        with cre_serve(router, toml, work / "home-b0", work / "serve-b0.log", force=True) as url:
            sweep("cre->engine", url, chat_requests("cre", prompts, n))
        toml_top = remote_toml(work / "top.toml", {top: eng.url}, ladder, args.parallel)
        with cre_serve(shipped, toml_top, work / "home-b1", work / "serve-b1.log", force=True) as url:
            sweep("top on engine", url, chat_requests("cre", prompts, n))

    with ExitStack() as stack:
        urls = {}
        for name in ladder:
            e = stack.enter_context(engine(settings.get(name).file, work / f"engine-{name}.log", parallel=args.parallel,
                                           kind=args.engine_kind))
            urls[name] = e.url
            kinds.add(e.kind)
        toml_all = remote_toml(work / "all.toml", urls, ladder, args.parallel)
        with cre_serve(shipped, toml_all, work / "home-b2", work / "serve-b2.log", force=True) as url:
            sweep("all on engines", url, chat_requests("cre", prompts, n))

    with engine(top_file, work / "replica-a.log", parallel=args.parallel, kind=args.engine_kind) as first, \
            engine(top_file, work / "replica-b.log", parallel=args.parallel, kind=args.engine_kind) as second:
        (work / "kill").mkdir()
        router, _ = fit_all_on(top, first.url, prompts, work / "kill")
        toml = remote_toml(work / "kill" / "two.toml", {top: [first.url, second.url]}, [ladder[0], top], args.parallel)
        killed = [False]

        def kill_at_a_quarter(returned: int) -> None:
            if not killed[0] and returned >= n // 4:
                killed[0] = True
                first.kill()

        with cre_serve(router, toml, work / "home-kill", work / "serve-kill.log", force=True) as url:
            r = load(url, chat_requests("cre", prompts, n), 16, during=kill_at_a_quarter)
        rows.append(("replica kill", r))

    print(f"\n`cre serve` under load: {n} requests a run, engines: {', '.join(sorted(kinds))} "
          f"(-np {args.parallel}), top rung {top}\n")
    print(table(rows))
    by = {(name, r["clients"]): r for name, r in rows}
    print("\nGoals:")
    verdicts = []
    p50 = [(c, by[("cre->engine", c)]["p50_ms"], by[("direct", c)]["p50_ms"]) for c in levels
           if ("cre->engine", c) in by and ("direct", c) in by]
    for clients, mine, theirs in p50:
        if mine is not None and theirs is not None:
            met = mine - theirs <= 10.0
            verdicts.append(met)
            print(f"  {clients:>2} clients: cre adds {mine - theirs:+.1f} ms at p50 over the engine "
                  f"({'met' if met else 'NOT met'}: at most 10 ms)")
    if ("cre->engine", 16) in by and ("direct", 16) in by and by[("direct", 16)]["answers_per_s"]:
        share = by[("cre->engine", 16)]["answers_per_s"] / by[("direct", 16)]["answers_per_s"]
        verdicts.append(share >= 0.9)
        print(f"  16 clients: throughput {share:.0%} of the engine's own ({'met' if share >= 0.9 else 'NOT met'}: at least 90%)")
    kill = by.get(("replica kill", 16))
    if kill is not None:
        lost = kill["sent"] - kill["answered"]
        verdicts.append(lost == 0)
        print(f"  replica kill: {lost} of {kill['sent']} requests without an answer ({'met' if lost == 0 else 'NOT met'}: none)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": [{"setup": name, **r} for name, r in rows],
                                               "engines": sorted(kinds), "top": top, "requests": n}, indent=2))
    return 0 if all(ok(r) for _, r in rows) and all(verdicts) else 1


def overhead_run(args: argparse.Namespace) -> int:
    """What `cre serve` adds to a remote rung's answer, with the engine's own time held fixed.

    The engine is the tests' fake OpenAI server (tests/support/fake_openai.py): it answers
    every request after `--engine-ms`, using no CPU meanwhile, so the difference between
    calling it through `cre serve` and calling it directly is cre's own work (the request
    read and checked, routing, the ladder walk, the call to the engine, pricing, the log,
    the response) and not a model's. With `--overhead-engine` a real engine serves the rung
    instead, and each arm's mean token counts show that both sent it the same work. Each of
    `--rounds` rounds at each client count runs direct, then through cre, always in that
    order, so a slow drift hits both alike (an effect of going first is not balanced); the
    p50 difference is the median over rounds.
    """
    from support.engines import engine  # type: ignore[import-not-found]
    from support.fake_openai import FakeOpenAI  # type: ignore[import-not-found]

    prompts = log_prompts(max(50, args.requests))
    work = Path(tempfile.mkdtemp(prefix="cre-serve-overhead-"))
    from crecli import config

    settings = config.load()
    top = args.engine_model or settings.ladder[-1]
    rows: list[tuple[str, dict[str, Any]]] = []
    added: dict[int, list[float]] = {}
    tokens: dict[str, list[dict[str, Any]]] = {"direct": [], "cre": []}
    real = args.overhead_engine is not None
    kind = "fake engine" if not real else "engine"
    with ExitStack() as stack:
        if real:
            served = stack.enter_context(engine(settings.get(top).file, work / "engine.log", parallel=args.parallel,
                                                kind=args.overhead_engine))
            kind = served.kind
            engine_url = served.url
        else:
            fake = stack.enter_context(FakeOpenAI())
            fake.delay = args.engine_ms / 1000
            engine_url = fake.url
        router, toml = fit_all_on(top, engine_url, prompts, work)
        url = stack.enter_context(cre_serve(router, toml, work / "home", work / "serve.log", force=True))
        direct = direct_requests(top, prompts, args.requests)
        through = chat_requests("cre", prompts, args.requests)
        load(url, through[:4], 1)  # warm: the first request loads what cre loads once
        for clients in args.overhead_clients:
            for _ in range(args.rounds):
                d = load(engine_url.removesuffix("/v1"), direct, clients, usage=tokens["direct"])
                c = load(url, through, clients, usage=tokens["cre"])
                rows += [(f"direct ({kind})", d), (f"cre->{kind}", c)]
                if d["p50_ms"] is not None and c["p50_ms"] is not None:
                    added.setdefault(clients, []).append(c["p50_ms"] - d["p50_ms"])
                print(table(rows[-2:]).splitlines()[-1], file=sys.stderr, flush=True)
    what = f"a fake engine answering in {args.engine_ms:g} ms" if not real else f"{kind} serving {top}"
    print(f"cre serve against {what}; {args.requests} requests a run, {args.rounds} rounds")
    print(table(rows))
    summary = {c: statistics.median(v) for c, v in added.items()}
    means = {arm: {k: statistics.fmean(u.get(k, 0) for u in got) for k in ("prompt_tokens", "completion_tokens")}
             for arm, got in tokens.items() if got}
    for arm, m in means.items():
        print(f"{arm}: mean prompt tokens {m['prompt_tokens']:.1f}, completion tokens {m['completion_tokens']:.1f}")
    for clients, ms in summary.items():
        print(f"cre adds {ms:.1f} ms at p50 with {clients} client(s) (median of {len(added[clients])} rounds; "
              f"rounds: {', '.join(f'{x:.1f}' for x in added[clients])})")
    if args.json:
        Path(args.json).write_text(json.dumps({"engine": what, "engine_ms": None if real else args.engine_ms,
                                               "rows": [r for _, r in rows], "added_p50_ms": summary,
                                               "added_by_round": added, "mean_usage": means}, indent=2))
    return 0 if all(ok(r) for _, r in rows) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--fake", action="store_true", help="start an in-process server on fake models")
    where.add_argument("--url", help="a running `cre serve` on loopback, e.g. http://127.0.0.1:8000")
    where.add_argument("--engine", action="store_true", help="the real-engine comparison (see above)")
    where.add_argument("--overhead", action="store_true",
                       help="what cre serve adds, against a fake engine of fixed answer time (see above)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--sweep", action="store_true", help="run at 1, 4, 16 and 64 clients instead of --clients")
    parser.add_argument("--requests", type=int, default=64, help="requests a run (--engine: 48 is the issue's)")
    parser.add_argument("--model", default="cre")
    parser.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer`")
    parser.add_argument("--max-queue", type=int, default=16, help="--fake: the server's queue")
    parser.add_argument("--vote-ms", type=float, default=5.0, help="--fake: milliseconds each fake vote takes")
    parser.add_argument("--engine-model", default=None, help="--engine: the rung put on an engine (default: the top)")
    parser.add_argument("--engine-kind", default="auto", choices=("auto", "llama-server", "python"),
                        help="--engine: llama-server, or llama-cpp-python's server (auto: llama-server when built)")
    parser.add_argument("--parallel", type=int, default=4, help="--engine: the engines' parallel slots (-np)")
    parser.add_argument("--max-clients", type=int, default=64, help="--engine/--sweep: the largest client count run")
    parser.add_argument("--engine-ms", type=float, default=200.0, help="--overhead: the fake engine's answer time")
    parser.add_argument("--rounds", type=int, default=5, help="--overhead: direct/cre pairs at each client count")
    parser.add_argument("--overhead-engine", default=None, choices=("llama-server", "python"),
                        help="--overhead: serve the top rung with this real engine instead of the fake")
    parser.add_argument("--overhead-clients", type=int, nargs="+", default=[1, 4], help="--overhead: client counts")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    if not (1 <= args.clients <= 64 and 1 <= args.requests <= 1024):
        parser.error("keep it bounded: 1-64 clients, 1-1024 requests")
    if args.engine:
        return engine_run(args)
    if args.overhead:
        return overhead_run(args)

    stop = None
    if args.fake:
        url, stop = fake_server(args.max_queue, args.vote_ms)
    else:
        host = urlsplit(args.url).hostname or ""
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            parser.error(f"--url must be a loopback address, got {host!r}")
        url = args.url.rstrip("/")
    levels = [c for c in LEVELS if c <= args.max_clients] if args.sweep else [args.clients]
    rows = []
    try:
        for clients in levels:
            rows.append(("cre serve", load(url, chat_requests(args.model, PROMPTS, args.requests), clients, args.api_key)))
    finally:
        if stop is not None:
            stop()
    mode = f"fake models, {args.vote_ms:g} ms a vote, max-queue {args.max_queue}" if args.fake else url
    print(f"cre serve load ({mode}): {args.requests} requests a run")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([r for _, r in rows], indent=2))
    return 0 if all(ok(r) for _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
