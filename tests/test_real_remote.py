"""A real remote rung: llama-cpp-python's own OpenAI-compatible server as the cascade's top.

The server (the `llama-cpp-python[server]` extra: FastAPI under uvicorn, no C++ server
build) runs in a child process on a loopback socket this test binds, serving gemma-3-270m's
GGUF. The ladder is ["gemma-3-270m", "remote"], with "remote" a `url` rung pointing at that
server; the router is fitted on a plain-text log, which runs no model, so every cluster
starts on the fallback, the strongest rung: `cre ask`, `cre batch` and `cre serve` all
answer through the server. Then the server dies mid-request, and the error must name the
rung, and a batch must keep the answers it had already given.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from typer.testing import CliRunner

from crecli.cli import app
from crecli.config import ModelSpec
from crecli.models.runtime import default_threads
from support.logs import small_log_prompts
from support.serving import serving

pytestmark = pytest.mark.real

ALIAS = "gemma-3-270m-served"
# A request whose prompt holds this kills the server while it holds the request: a real
# mid-request death (the reply never comes), at a point the test chooses.
DIE_MARKER = "Atlantis"

# Runs in the child with `sys.executable -c`. The server builds its `Llama` inside
# create_app, so that is where cre's buffer rule applies: on AMX CPUs a model loaded with
# llama.cpp's extra buffer types crashes at the first decode (see crecli.models.runtime).
LAUNCHER = r"""
import os, signal, socket, sys

import uvicorn
from llama_cpp.server.app import create_app
from llama_cpp.server.settings import ModelSettings, ServerSettings

from crecli.models.runtime import model_params, use_extra_bufts

fd, path, alias, n_ctx, threads, marker = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6].encode()

with model_params(use_extra_bufts()):
    api = create_app(
        server_settings=ServerSettings(host="127.0.0.1", port=0),
        model_settings=[ModelSettings(
            model=path, model_alias=alias, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
            n_gpu_layers=0, verbose=False,
        )],
    )


async def app(scope, receive, send):
    # Read the whole body first; a request naming the marker kills the process with it unanswered.
    if scope["type"] != "http" or scope["method"] != "POST":
        return await api(scope, receive, send)
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    if marker in body:
        os.kill(os.getpid(), signal.SIGKILL)
    replayed = False

    async def replay():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return await api(scope, replay, send)


server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
server.run(sockets=[socket.socket(fileno=fd)])
"""


@dataclass
class Remote:
    proc: subprocess.Popen[bytes]
    url: str  # the API root, as a `url` rung names it
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@contextmanager
def llama_server(gguf: Path, log: Path, startup_s: float = 120.0) -> Iterator[Remote]:
    """llama-cpp-python's server on a free loopback port, ready to answer; killed on exit."""
    # The parent binds the socket and hands it over, so no other process can take the port
    # between choosing it and the server listening on it.
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    cmd = [sys.executable, "-c", LAUNCHER, str(sock.fileno()), str(gguf), ALIAS, "2048", str(default_threads()), DIE_MARKER]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, pass_fds=[sock.fileno()])
    # Only the child may hold the socket: once it dies, connecting must be refused, not queued.
    sock.close()
    remote = Remote(proc, f"http://127.0.0.1:{port}/v1", log)
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama-cpp-python's server exited with {proc.returncode} while starting:\n{remote.tail()}")
            try:
                # Connections queue while the model loads; this waits for the app to accept.
                with urllib.request.urlopen(f"{remote.url}/models", timeout=5) as reply:
                    ids = [m["id"] for m in json.load(reply)["data"]]
                assert ALIAS in ids, ids
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"llama-cpp-python's server did not answer /v1/models within {startup_s:.0f} s:\n{remote.tail()}")
                time.sleep(0.2)
        yield remote
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


@dataclass
class Ladder:
    router: Path
    toml: Path
    gguf: Path


@pytest.fixture
def gemma_gguf(gemma: ModelSpec, monkeypatch: pytest.MonkeyPatch) -> Path:
    assert gemma.file is not None  # a pulled model is a local file
    pytest.importorskip("llama_cpp.server.app", reason="needs llama-cpp-python's server extra (the test extra lists it)")
    # A proxy in the environment must not intercept the loopback requests.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return gemma.file


def fit_remote_ladder(tmp_path: Path, gguf: Path, url: str) -> Ladder:
    """A ladder with the server as its top rung, and a router fitted without running a model."""
    toml = tmp_path / "models.toml"
    toml.write_text(
        'ladder = ["gemma-3-270m", "remote"]\n\n'
        "[models.remote]\n"
        f'url = "{url}"\n'
        f'api_model = "{ALIAS}"\n'
        # cre renders gemma's few-shot prompt itself and posts it to /v1/completions, so the
        # remote rung sees exactly the text the local rung would.
        'prompt_format = "completion"\n'
        # llama-cpp-python's server penalises repeated tokens unless told; in process, none.
        "repeat_penalty = 1.0\n"
    )
    log = tmp_path / "prompts.txt"
    log.write_text("\n".join(small_log_prompts()) + "\n")
    router = tmp_path / "remote.cre"
    result = CliRunner().invoke(app, ["fit", str(log), "-o", str(router), "--models", str(toml), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["outcomes_run"] == 0  # a text log runs no model
    return Ladder(router, toml, gguf)


def cre(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`cre` in a child process, as a user runs it (exit code and stderr as main() sets them)."""
    return subprocess.run(
        [sys.executable, "-m", "crecli", *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=dict(os.environ)
    )


def test_ask_batch_and_serve_answer_through_a_real_remote_rung(gemma_gguf: Path, tmp_path: Path) -> None:
    openai = pytest.importorskip("openai")
    from crecli.escalate import Cascade

    with llama_server(gemma_gguf, tmp_path / "server.log") as remote:
        ladder = fit_remote_ladder(tmp_path, gemma_gguf, remote.url)
        where = ["--router", str(ladder.router), "--models", str(ladder.toml)]

        asked = cre("ask", "What is the capital of France?", *where, "--json")
        assert asked.returncode == 0, asked.stderr + remote.tail()
        trace = json.loads(asked.stdout)
        assert trace["model"] == "remote" and trace["start_model"] == "remote", trace
        assert "paris" in trace["answer"].lower(), trace

        lines = ["What is the capital of France?", "What is the capital of Italy?", "What is 2 plus 2?"]
        batched = cre("batch", *where, stdin="\n".join(lines) + "\n")
        assert batched.returncode == 0, batched.stderr + remote.tail()
        records = [json.loads(line) for line in batched.stdout.splitlines()]
        assert [r["line"] for r in records] == [1, 2, 3]
        assert all(r["trace"]["model"] == "remote" for r in records), records
        assert "paris" in records[0]["answer"].lower() and "rome" in records[1]["answer"].lower(), records

        with Cascade.from_file(ladder.router, ladder.toml) as cascade, serving(cascade) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
            reply = client.chat.completions.create(
                model="cre", messages=[{"role": "user", "content": "What is the capital of France?"}]
            )
            assert "paris" in reply.choices[0].message.content.lower()
            assert reply.model_extra["cre"]["model"] == "remote" and reply.usage.completion_tokens > 0


def test_a_remote_rung_that_dies_mid_request_is_named_and_the_batch_keeps_its_answers(
    gemma_gguf: Path, tmp_path: Path
) -> None:
    with llama_server(gemma_gguf, tmp_path / "server-ask.log") as remote:
        ladder = fit_remote_ladder(tmp_path, gemma_gguf, remote.url)
        where = ["--router", str(ladder.router), "--models", str(ladder.toml)]
        asked = cre("ask", f"What is the capital of {DIE_MARKER}?", *where)
        assert remote.proc.wait(30) == -signal.SIGKILL, remote.tail()
    assert asked.returncode == 1, asked.stdout + asked.stderr
    assert asked.stderr.startswith("Error: ") and "Traceback" not in asked.stderr, asked.stderr
    message = " ".join(asked.stderr.split())  # rich wraps long lines
    assert f"model 'remote' at {remote.url}/completions" in message and "connection broke" in message, message

    # The ladder's url is fixed at fit time, so the second server gets its own ladder.
    with llama_server(gemma_gguf, tmp_path / "server-batch.log") as remote:
        (tmp_path / "second").mkdir()
        ladder = fit_remote_ladder(tmp_path / "second", gemma_gguf, remote.url)
        where = ["--router", str(ladder.router), "--models", str(ladder.toml)]
        lines = [
            "What is the capital of France?",
            "What is the capital of Italy?",
            f"What is the capital of {DIE_MARKER}?",  # the server dies holding this one
            "What is the capital of Spain?",
            "What is 2 plus 2?",
        ]
        batched = cre("batch", *where, stdin="\n".join(lines) + "\n")
        assert remote.proc.wait(30) == -signal.SIGKILL, remote.tail()
    assert batched.returncode == 3, batched.stderr
    records = [json.loads(line) for line in batched.stdout.splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5]  # N lines in, N lines out
    assert "paris" in records[0]["answer"].lower() and "rome" in records[1]["answer"].lower(), records
    assert all(r["trace"]["model"] == "remote" for r in records[:2])
    assert "connection broke" in records[2]["error"] and "'remote'" in records[2]["error"], records[2]
    for r in records[3:]:  # the server is gone: later lines cannot connect, and say so
        assert "error" in r and f"model 'remote' at {remote.url}/completions: cannot connect" in r["error"], r

    # And a plain `cre ask` against the dead server names the rung and says to start it.
    asked = cre("ask", "What is the capital of France?", *where)
    assert asked.returncode == 1 and "Traceback" not in asked.stderr, asked.stderr
    message = " ".join(asked.stderr.split())
    assert message.startswith("Error: model 'remote' at") and "cannot connect" in message, message
