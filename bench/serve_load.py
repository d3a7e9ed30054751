"""A bounded load test of `cre serve`: 8 concurrent clients send 64 requests in all to loopback.

It reports p50/p95 latency and throughput, and counts answers, 429s (queue full) and
anything else. Nothing may be lost: every request must get an answer or a 429, else the
exit status is 1.

    .venv/bin/python bench/serve_load.py --fake                 # an in-process server on fake models
    .venv/bin/python bench/serve_load.py --fake --max-queue 2   # a small queue: expect 429s
    .venv/bin/python bench/serve_load.py --url http://127.0.0.1:8000   # a running `cre serve`

--fake builds the tests' three-rung router (tests/support/routers.py) on fake models that
sleep --vote-ms per vote, so it measures the server (parsing, queueing, one worker thread,
HTTP) and not llama.cpp. Against a real `cre serve`, run nothing else on the machine.
Only loopback addresses are accepted: this is not a tool to load someone else's server.
"""

from __future__ import annotations

import argparse
import ipaddress
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "What is 12 plus 30?", "What is the capital city of France?", "What is 7 plus 5?",
    "Which of these is a fruit? (A) stone (B) fruit-like thing (C) chair", "What is the capital city of Peru?",
    "What is 8 plus 9?", "Which of these is a tool? (A) stone (B) tool-like thing (C) chair", "What is 40 plus 2?",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def load(url: str, clients: int, total: int, model: str, key: str | None) -> dict[str, Any]:
    """`total` requests from `clients` threads, each sending its next request when the last returns."""
    next_index, lock = [0], threading.Lock()
    results: list[tuple[int | str, float]] = []
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    def client() -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=600) as http:
            while True:
                with lock:
                    if next_index[0] >= total:
                        return
                    i = next_index[0]
                    next_index[0] += 1
                body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
                start = time.perf_counter()
                try:
                    status: int | str = http.post("/v1/chat/completions", json=body).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with lock:
                    results.append((status, time.perf_counter() - start))

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    answered = [s for code, s in results if code == 200]
    return {
        "sent": total, "returned": len(results), "answered": len(answered),
        "refused_429": sum(1 for code, _ in results if code == 429),
        "other": sorted({str(code) for code, _ in results if code not in (200, 429)}),
        "wall": wall, "latencies": answered,
    }


def fake_server(max_queue: int, vote_ms: float) -> tuple[str, Any]:
    """An in-process `cre serve` on the tests' fake ladder; returns its URL and a stop function."""
    sys.path.insert(0, str(ROOT / "tests"))
    import os
    import tempfile

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--fake", action="store_true", help="start an in-process server on fake models")
    where.add_argument("--url", help="a running `cre serve` on loopback, e.g. http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--model", default="cre")
    parser.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer`")
    parser.add_argument("--max-queue", type=int, default=16, help="--fake: the server's queue")
    parser.add_argument("--vote-ms", type=float, default=5.0, help="--fake: milliseconds each fake vote takes")
    args = parser.parse_args()
    if not (1 <= args.clients <= 64 and 1 <= args.requests <= 1024):
        parser.error("keep it bounded: 1-64 clients, 1-1024 requests")

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
    try:
        r = load(url, args.clients, args.requests, args.model, args.api_key)
    finally:
        if stop is not None:
            stop()
    lat = r["latencies"]
    mode = f"fake models, {args.vote_ms:g} ms a vote, max-queue {args.max_queue}" if args.fake else url
    print(f"cre serve load ({mode}): {args.clients} clients, {r['sent']} requests in {r['wall']:.2f} s")
    print(f"  answered {r['answered']}, 429 {r['refused_429']}, other {r['other'] or 'none'}, "
          f"lost {r['sent'] - r['returned']}")
    if lat:
        print(f"  latency of answers: p50 {percentile(lat, 0.5) * 1000:.0f} ms, p95 {percentile(lat, 0.95) * 1000:.0f} ms, "
              f"mean {statistics.fmean(lat) * 1000:.0f} ms")
        print(f"  throughput: {len(lat) / r['wall']:.1f} answers/s")
    ok = r["returned"] == r["sent"] and not r["other"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
