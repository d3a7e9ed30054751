r"""A soak of `cre serve` under hostile clients (issue 22): can slow clients take it down?

Starts `cre serve` as a child process on a free loopback port, then for --seconds (180)
runs, all at once:

- normal clients (--clients, 4): one chat request after another, each on a new
  connection, as a plain OpenAI client would;
- slow-header clients (--slow-headers, 20 connections): send a request line, then one
  header line a second, forever; the server should close each after --header-timeout;
- slow-body clients (--slow-bodies, 20 connections): send whole headers, then one byte
  of a 1,000-byte body a second; the server should answer 408 after --body-timeout;
- leavers (--leavers, 2): half a body then close, or a whole request then close before
  the answer, every 0.5 s;
- a flood (--flood-burst, 40 requests at once every --flood-every, 10 s);
- a /health poll every 0.5 s, on a thread of its own so that the bench's own event loop
  does not add to what it measures.

It prints, in one table (or as JSON with --json): the normal clients' p50/p95 latency,
their errors by status, and lost requests (sent but never answered nor refused: a
connection closed without a response, or no response within the server's --timeout + 30
s); /health's p95 and max latency and any non-200; the slow clients' longest hold of a
connection; what the flood got; and the tracebacks in the server's log. Exit status 0
when the goals hold (none lost, /health always 200 in under 100 ms, slow connections
closed on time, no traceback, a clean SIGTERM exit), else 1.

    # development: `cre serve` on the tests' three-rung router with fake models
    .venv/bin/python bench/serve_soak.py --fake --seconds 30

    # the real thing (nothing else running on the machine): a router over the 270M model,
    # fitted as tests/test_real_serve.py does (a text log of prompts runs no model)
    printf 'ladder = ["gemma-3-270m"]\n' > /tmp/gemma-models.toml
    .venv/bin/python -c 'import json, sys; [print(json.loads(l)["prompt"].replace("\n", " ")) for l in open(sys.argv[1])]' \
        examples/querylog-small.jsonl > /tmp/soak-prompts.txt
    .venv/bin/cre fit /tmp/soak-prompts.txt -o /tmp/gemma.cre --models /tmp/gemma-models.toml
    .venv/bin/python bench/serve_soak.py --router /tmp/gemma.cre --models /tmp/gemma-models.toml

--fake starts the same `cre serve` command line in a child process whose model backends
are fakes that sleep --vote-ms per vote, so it measures the server, not llama.cpp. The
served-query log is left alone (--no-log). Only loopback is used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from serve_load import PROMPTS, percentile  # noqa: E402

HOST = "127.0.0.1"
try:
    from crecli.serve_options import DEFAULT_BODY_TIMEOUT, DEFAULT_HEADER_TIMEOUT
except ImportError:  # a server from before the deadlines: it has none to keep
    DEFAULT_HEADER_TIMEOUT = DEFAULT_BODY_TIMEOUT = float("inf")
HEALTH_GOAL = 0.100  # seconds: /health must answer faster than this throughout
SLACK = 3.0  # seconds a slow connection may outlive its deadline (timer, scheduling, the poll)

# The child for --fake: `cre serve` itself, with every backend a fake that sleeps per vote.
FAKE_CHILD = """
import sys, time
from crecli.models import registry
from crecli.models.fake import FakeBackend

vote = float(sys.argv[1]) / 1000

def answer(text, params):
    time.sleep(vote)
    # The small model is unsure of capitals (its sampled votes differ), so those escalate.
    if "capital" in text and params.seed:
        return f"guess {params.seed % 7}"
    return "Paris" if "capital" in text else "42"

registry.make_backend = lambda spec: FakeBackend(spec, answer)
registry.reports_signals = lambda spec: False
from crecli.cli import main

sys.argv = ["cre", *sys.argv[2:]]
main()
"""


@dataclass
class Results:
    sent: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    lost: int = 0
    lost_why: Counter[str] = field(default_factory=Counter)
    health: list[tuple[float, int | str]] = field(default_factory=list)
    slow_header_holds: list[float] = field(default_factory=list)
    slow_header_replies: Counter[str] = field(default_factory=Counter)
    slow_body_holds: list[float] = field(default_factory=list)
    slow_body_replies: Counter[str] = field(default_factory=Counter)
    leavers: int = 0
    flood: Counter[str] = field(default_factory=Counter)


def request(path: str, body: bytes, key: str | None) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"POST {path} HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def chat(i: int, model: str) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}).encode()


def status_of(reply: bytes) -> int | None:
    try:
        return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.") else None
    except (IndexError, ValueError):
        return None


async def exchange(port: int, raw: bytes, timeout: float) -> bytes:
    """Send `raw` on a new connection; the whole reply, read until the server closes."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


class Soak:
    def __init__(self, args: argparse.Namespace, port: int) -> None:
        self.args, self.port, self.r = args, port, Results()
        self.stop = asyncio.Event()
        self.answer_timeout = args.timeout + 30

    async def normal(self, i: int) -> None:
        n = i
        while not self.stop.is_set():
            n += 1
            self.r.sent += 1
            start = time.perf_counter()
            try:
                reply = await exchange(self.port, request("/v1/chat/completions", chat(n, self.args.model),
                                                          self.args.api_key), self.answer_timeout)
            except asyncio.TimeoutError:
                self.r.lost += 1
                self.r.lost_why["no reply in time"] += 1
                continue
            except OSError as exc:
                self.r.lost += 1
                self.r.lost_why[type(exc).__name__] += 1
                continue
            status = status_of(reply)
            if status is None:
                self.r.lost += 1
                self.r.lost_why["closed without a reply"] += 1
            elif status == 200:
                self.r.latencies.append(time.perf_counter() - start)
            else:
                self.r.errors[str(status)] += 1
                await asyncio.sleep(0.5)  # as a client backs off after a refusal

    async def slow(self, body: bool) -> None:
        holds, replies = ((self.r.slow_body_holds, self.r.slow_body_replies) if body
                          else (self.r.slow_header_holds, self.r.slow_header_replies))
        while not self.stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(HOST, self.port)
            except OSError as exc:
                replies[f"connect failed: {type(exc).__name__}"] += 1
                await asyncio.sleep(1)
                continue
            opened = time.perf_counter()
            head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\n"
            if body:
                # Whole headers, with the key: the body is the slow part.
                head = request("/v1/chat/completions", b"", self.args.api_key).replace(
                    b"Content-Length: 0", b"Content-Length: 1000") + b"{"
            writer.write(head)
            reply = b""
            try:
                while not self.stop.is_set():
                    try:
                        reply = await asyncio.wait_for(reader.read(65536), 1.0)
                        break  # a reply, or b"": the server closed it
                    except asyncio.TimeoutError:
                        writer.write(b" " if body else b"X-Slow: 1\r\n")
                        await writer.drain()
                else:
                    writer.close()
                    return  # the soak ended first: not a hold to count
            except OSError:
                pass
            holds.append(time.perf_counter() - opened)
            status = status_of(reply)
            replies[str(status or "closed")] += 1
            writer.close()
            if status != 408:
                await asyncio.sleep(0.5)  # refused at once: do not spin

    async def leaver(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            data = request("/v1/chat/completions", chat(i + n, self.args.model), self.args.api_key)
            try:
                reader, writer = await asyncio.open_connection(HOST, self.port)
                # Half the body, or all of it and gone before the answer.
                writer.write(data[: len(data) - 20] if n % 2 else data)
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.close()
                self.r.leavers += 1
            except OSError:
                pass
            await asyncio.sleep(0.5)

    async def flood(self) -> None:
        n = 0
        while not self.stop.is_set():
            burst = []
            for _ in range(self.args.flood_burst):
                n += 1
                burst.append(exchange(self.port, request("/v1/chat/completions", chat(n, self.args.model),
                                                         self.args.api_key), self.answer_timeout))
            for reply in await asyncio.gather(*burst, return_exceptions=True):
                self.r.flood[type(reply).__name__ if isinstance(reply, BaseException)
                             else str(status_of(reply) or "closed")] += 1
            try:
                await asyncio.wait_for(self.stop.wait(), self.args.flood_every)
            except asyncio.TimeoutError:
                pass

    def poll_health(self, done: threading.Event) -> None:
        """/health every 0.5 s with a blocking socket, on its own thread."""
        raw = b"GET /health HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n"
        while not done.is_set():
            start = time.perf_counter()
            try:
                with socket.create_connection((HOST, self.port), timeout=10) as conn:
                    conn.sendall(raw)
                    reply = b""
                    while chunk := conn.recv(65536):
                        reply += chunk
                outcome: int | str = status_of(reply) or "closed"
            except OSError as exc:
                outcome = type(exc).__name__
            took = time.perf_counter() - start
            self.r.health.append((took, outcome))
            done.wait(max(0.0, 0.5 - took))

    async def run(self) -> Results:
        a = self.args
        tasks = [asyncio.create_task(self.normal(i)) for i in range(a.clients)]
        tasks += [asyncio.create_task(self.slow(False)) for _ in range(a.slow_headers)]
        tasks += [asyncio.create_task(self.slow(True)) for _ in range(a.slow_bodies)]
        tasks += [asyncio.create_task(self.leaver(i * 1000)) for i in range(a.leavers)]
        if a.flood_burst:
            tasks.append(asyncio.create_task(self.flood()))
        done = threading.Event()
        poller = threading.Thread(target=self.poll_health, args=(done,), daemon=True)
        poller.start()
        start = time.monotonic()
        while (left := a.seconds - (time.monotonic() - start)) > 0:
            await asyncio.sleep(min(left, 30))
            print(f"serve_soak: {time.monotonic() - start:.0f} s: {len(self.r.latencies)} answered, "
                  f"{self.r.lost} lost, /health max {max((h for h, _ in self.r.health), default=0) * 1000:.0f} ms",
                  file=sys.stderr)
        self.stop.set()  # requests in flight finish; no new ones start
        await asyncio.gather(*tasks)
        done.set()
        poller.join(15)
        return self.r


# ---------------------------------------------------------------- the server


def fake_setup(folder: Path) -> tuple[Path, Path]:
    """The tests' three-rung router saved to a file, and a models.toml of GGUF-headed files
    (so that /health finds the rungs ready; the fakes never read them)."""
    sys.path.insert(0, str(ROOT / "tests"))
    os.environ["CRE_HOME"] = str(folder / "home")
    from support.ladder import ready_ladder  # type: ignore[import-not-found]
    from support.routers import make_router  # type: ignore[import-not-found]

    from crecli import routerfile

    toml = ready_ladder(folder)
    router = folder / "soak.cre"
    routerfile.save(make_router(), router)
    return router, toml


def start_server(args: argparse.Namespace, folder: Path) -> tuple[subprocess.Popen[str], int, list[str]]:
    command = ["serve", "--router", str(args.router), "--host", HOST, "--port", "0", "--no-log",
               "--timeout", f"{args.timeout:g}", "--max-queue", str(args.max_queue)]
    if args.models:
        command += ["--models", str(args.models)]
    for option, value in (("--header-timeout", args.header_timeout), ("--body-timeout", args.body_timeout)):
        if value is not None:  # else the server's default (and a server without the option still runs)
            command += [option, f"{value:g}"]
    env = dict(os.environ)
    if args.api_key:
        env["CRE_SOAK_KEY"] = args.api_key
        command += ["--api-key-env", "CRE_SOAK_KEY"]
    if args.fake:
        argv = [sys.executable, "-c", FAKE_CHILD, str(args.vote_ms), *command]
        env["CRE_HOME"] = str(folder / "home")
    else:
        argv = [sys.executable, "-m", "crecli", *command]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    log: list[str] = []
    port = None
    for line in proc.stderr:  # the first line names the port, once the router is loaded
        log.append(line)
        if " on http://" in line:
            port = int(line.split(" on http://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
            break
    if port is None:
        proc.wait(30)
        raise SystemExit("cre serve did not start:\n" + "".join(log))
    # Keep reading its log, so that a full pipe never blocks it.
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
    deadline = time.monotonic() + 600  # the first model may load slowly
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=5) as conn:
                conn.sendall(b"GET /health HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
                if conn.recv(64).startswith(b"HTTP/1.1 "):
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("cre serve did not answer /health:\n" + "".join(log))
        time.sleep(0.2)
    return proc, port, log


# ---------------------------------------------------------------- the report


def on_time(holds: list[float], connections: int, deadline: float, wall: float) -> bool:
    """Every slow connection the server closed was closed by its deadline, and, when the soak
    outlasted the deadline, some were closed at all (a server that never closes any fails)."""
    if connections and not math.isfinite(deadline):
        return False  # a server without the deadline
    if not connections or wall < deadline + SLACK:
        return all(h <= deadline + SLACK for h in holds)
    return bool(holds) and all(h <= deadline + SLACK for h in holds)


def report(r: Results, args: argparse.Namespace, exit_code: int | None, log: list[str], wall: float) -> dict[str, Any]:
    lat = r.latencies
    health_lat = [h for h, _ in r.health]
    health_bad = Counter(str(s) for _, s in r.health if s != 200)
    tracebacks = sum("Traceback" in line for line in log)
    summary: dict[str, Any] = {
        "server": "fake models" if args.fake else str(args.router),
        "seconds": round(wall, 1),
        "normal": {
            "clients": args.clients, "sent": r.sent, "answered": len(lat), "errors": dict(r.errors), "lost": r.lost,
            "lost_why": dict(r.lost_why),
            "p50_s": round(percentile(lat, 0.5), 3) if lat else None,
            "p95_s": round(percentile(lat, 0.95), 3) if lat else None,
            "max_s": round(max(lat), 3) if lat else None,
            "mean_s": round(statistics.fmean(lat), 3) if lat else None,
        },
        "health": {"polls": len(r.health), "p95_ms": round(percentile(health_lat, 0.95) * 1000, 1) if health_lat else None,
                   "max_ms": round(max(health_lat) * 1000, 1) if health_lat else None, "not_200": dict(health_bad)},
        "slow_headers": {"connections": args.slow_headers, "held": len(r.slow_header_holds),
                         "longest_hold_s": round(max(r.slow_header_holds), 1) if r.slow_header_holds else None,
                         "replies": dict(r.slow_header_replies), "deadline_s": args.header_deadline},
        "slow_bodies": {"connections": args.slow_bodies, "held": len(r.slow_body_holds),
                        "longest_hold_s": round(max(r.slow_body_holds), 1) if r.slow_body_holds else None,
                        "replies": dict(r.slow_body_replies), "deadline_s": args.body_deadline},
        "leavers": {"left": r.leavers},
        "flood": {"burst": args.flood_burst, "every_s": args.flood_every, "replies": dict(r.flood)},
        "server_log": {"tracebacks": tracebacks, "exit_code_after_sigterm": exit_code},
    }
    goals = {
        "none lost": r.lost == 0,
        "normal clients answered": bool(lat),
        f"/health always 200 in < {HEALTH_GOAL * 1000:.0f} ms": bool(health_lat) and not health_bad
        and max(health_lat) < HEALTH_GOAL,
        "slow headers closed on time": on_time(r.slow_header_holds, args.slow_headers, args.header_deadline, wall),
        # A body's deadline counts from its headers, which come at once here.
        "slow bodies closed on time": on_time(r.slow_body_holds, args.slow_bodies, args.body_deadline, wall),
        "no traceback in the server's log": tracebacks == 0,
        "clean exit on SIGTERM": exit_code == 0,
    }
    summary["goals"] = goals
    return summary


def print_table(s: dict[str, Any]) -> None:
    n, h = s["normal"], s["health"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f} ms"

    rows = [
        ("server", s["server"]), ("duration", f"{s['seconds']} s"),
        ("normal clients", f"{n['clients']}: {n['sent']} sent, {n['answered']} answered"),
        ("  latency", f"p50 {ms(n['p50_s'])}, p95 {ms(n['p95_s'])}, max {ms(n['max_s'])}"),
        ("  errors", ", ".join(f"{k}: {v}" for k, v in sorted(n["errors"].items())) or "none"),
        ("  lost", f"{n['lost']}" + (f" ({', '.join(f'{k}: {v}' for k, v in n['lost_why'].items())})" if n["lost"] else "")),
        ("/health", f"{h['polls']} polls, p95 {h['p95_ms']} ms, max {h['max_ms']} ms, not 200: {h['not_200'] or 'none'}"),
    ]
    for kind in ("slow_headers", "slow_bodies"):
        k = s[kind]
        rows.append((kind.replace("_", " "), f"{k['connections']} at a time: {k['held']} closed by the server, longest "
                     f"hold {k['longest_hold_s']} s (deadline {k['deadline_s']:g} s); replies {k['replies'] or 'none'}"))
    rows += [
        ("leavers", f"{s['leavers']['left']} requests abandoned"),
        ("flood", f"{s['flood']['burst']} at once every {s['flood']['every_s']:g} s: {s['flood']['replies'] or 'none'}"),
        ("server log", f"{s['server_log']['tracebacks']} tracebacks; exit {s['server_log']['exit_code_after_sigterm']} "
                       "after SIGTERM"),
    ]
    rows += [(("goal" if i == 0 else ""), f"{'ok  ' if ok else 'FAIL'} {name}") for i, (name, ok) in enumerate(s["goals"].items())]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--router", type=Path, help="the router file `cre serve` loads")
    where.add_argument("--fake", action="store_true", help="the tests' router on fake models (for development)")
    parser.add_argument("--models", type=Path, help="an extra models.toml for `cre serve` (default: none)")
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--clients", type=int, default=4, help="normal clients")
    parser.add_argument("--slow-headers", type=int, default=20, help="slow-header connections at a time")
    parser.add_argument("--slow-bodies", type=int, default=20, help="slow-body connections at a time")
    parser.add_argument("--leavers", type=int, default=2, help="clients that leave mid-request")
    parser.add_argument("--flood-burst", type=int, default=40, help="requests in each flood burst (0: no flood)")
    parser.add_argument("--flood-every", type=float, default=10.0, help="seconds between flood bursts")
    parser.add_argument("--model", default="cre", help="the model normal clients ask for")
    parser.add_argument("--api-key", default=None, help="run the server with this key, and send it")
    parser.add_argument("--timeout", type=float, default=300.0, help="the server's --timeout")
    parser.add_argument("--max-queue", type=int, default=16, help="the server's --max-queue")
    parser.add_argument("--header-timeout", type=float, default=None, help="the server's --header-timeout (default: its own)")
    parser.add_argument("--body-timeout", type=float, default=None, help="the server's --body-timeout (default: its own)")
    parser.add_argument("--vote-ms", type=float, default=20.0, help="--fake: milliseconds each fake vote takes")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args()
    args.header_deadline = args.header_timeout or DEFAULT_HEADER_TIMEOUT
    args.body_deadline = args.body_timeout or DEFAULT_BODY_TIMEOUT
    if not (1 <= args.clients <= 64 and 0 <= args.slow_headers <= 500 and 0 <= args.slow_bodies <= 500
            and 0 <= args.leavers <= 20 and 0 <= args.flood_burst <= 500 and 1 <= args.seconds <= 3600):
        parser.error("keep it bounded: 1-64 clients, 0-500 slow connections of each kind, 0-20 leavers, "
                     "bursts of 0-500, 1-3600 s")

    with tempfile.TemporaryDirectory(prefix="cre-serve-soak-") as tmp:
        folder = Path(tmp)
        if args.fake:
            args.router, args.models = fake_setup(folder)
        proc, port, log = start_server(args, folder)
        print(f"serve_soak: cre serve on {HOST}:{port} for {args.seconds:g} s", file=sys.stderr)
        start = time.monotonic()
        try:
            results = asyncio.run(Soak(args, port).run())
        finally:
            wall = time.monotonic() - start
            proc.send_signal(signal.SIGTERM)
            try:
                exit_code: int | None = proc.wait(args.timeout + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                exit_code = None
        time.sleep(0.2)  # the log reader's last lines
    summary = report(results, args, exit_code, log, wall)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_table(summary)
    if summary["server_log"]["tracebacks"]:
        sys.stderr.write("".join(line for line in log if "Traceback" in line or "Error" in line)[:4000])
    return 0 if all(summary["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
