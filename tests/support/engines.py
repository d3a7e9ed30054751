"""Real serving engines for the tests marked `real` (test_real_scale.py) and `bench/serve_load.py --engine`.

`engine(...)` starts one OpenAI-compatible server on a GGUF, on a free loopback port, and
stops it on exit:

- llama.cpp's own `llama-server`, built from the sources of the installed llama-cpp-python
  by `bench/build_llama_server.sh` (found at $CRE_LLAMA_SERVER, else at the script's
  default place), with `-np` parallel slots for continuous batching;
- else, or with kind="python", llama-cpp-python's own server (`python -m llama_cpp.server`,
  the test extra has it), which answers one request at a time. `logprobs=False` starts it
  without `logits_all`, so it gives no log-probabilities (the "server without them" case).

On AMX CPUs both load the model with llama.cpp's extra buffer types off, as cre does
(`crecli.models.runtime.use_extra_bufts`; `--no-repack` for llama-server).
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

from crecli.models.runtime import default_threads, use_extra_bufts

# Where bench/build_llama_server.sh puts its build unless told otherwise.
DEFAULT_BUILD = Path.home() / ".cache" / "crecli-llama-server" / "build"
ALIAS = "served"

# Runs in the child with `sys.executable -c`: llama-cpp-python's server on a socket the
# parent bound, its Llama built with cre's buffer rule.
PYTHON_SERVER = r"""
import socket, sys

import uvicorn
from llama_cpp.server.app import create_app
from llama_cpp.server.settings import ModelSettings, ServerSettings

from crecli.models.runtime import model_params, use_extra_bufts

fd, path, alias, n_ctx, threads, logits_all = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1"
with model_params(use_extra_bufts()):
    app = create_app(
        server_settings=ServerSettings(host="127.0.0.1", port=0),
        model_settings=[ModelSettings(model=path, model_alias=alias, n_ctx=n_ctx, n_threads=threads,
                                      n_threads_batch=threads, n_gpu_layers=0, logits_all=logits_all, verbose=False)],
    )
uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[socket.socket(fileno=fd)])
"""


def llama_server_binary() -> Path | None:
    """The llama-server to use: $CRE_LLAMA_SERVER, else the build script's default output."""
    named = os.environ.get("CRE_LLAMA_SERVER")
    for candidate in ([Path(named)] if named else []) + [DEFAULT_BUILD / "bin" / "llama-server"]:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclass
class Engine:
    proc: subprocess.Popen[bytes]
    url: str  # the API root, ending in /v1
    kind: str  # "llama-server" or "llama_cpp.server"
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown; connections it held break."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


@contextmanager
def engine(gguf: Path, log: Path, parallel: int = 4, context: int = 2048, threads: int | None = None,
           logprobs: bool = True, kind: str = "auto", startup_s: float = 180.0) -> Iterator[Engine]:
    """An engine serving `gguf` as model "served"; `context` tokens per parallel slot."""
    threads = threads or default_threads()
    binary = llama_server_binary() if kind in ("auto", "llama-server") else None
    if kind == "llama-server" and binary is None:
        raise RuntimeError("no llama-server: run bench/build_llama_server.sh or set CRE_LLAMA_SERVER")
    if binary is not None and logprobs:
        port = free_port()
        cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-a", ALIAS,
               "-np", str(parallel), "-c", str(context * parallel), "-t", str(threads), "-tb", str(threads),
               "-ngl", "0", "--no-webui",
               # Flash attention as the in-process runtime has it (off): with llama-server's
               # "auto", 41 of 50 greedy answers matched in-process ones; with it off, 45.
               "-fa", "off"]
        if not use_extra_bufts():
            cmd.append("--no-repack")
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        found = Engine(proc, f"http://127.0.0.1:{port}/v1", "llama-server", log)
        ready = f"http://127.0.0.1:{port}/health"
    else:
        sock = socket.create_server(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        cmd = [sys.executable, "-c", PYTHON_SERVER, str(sock.fileno()), str(gguf), ALIAS, str(context), str(threads),
               "1" if logprobs else "0"]
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, pass_fds=[sock.fileno()])
        sock.close()  # only the child holds it: once it dies, connecting is refused
        found = Engine(proc, f"http://127.0.0.1:{port}/v1", "llama_cpp.server", log)
        ready = f"{found.url}/models"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{found.kind} exited with {proc.returncode} while starting:\n{found.tail()}")
            try:
                with urllib.request.urlopen(ready, timeout=5) as reply:
                    json.load(reply)
                break
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{found.kind} did not get ready within {startup_s:.0f} s:\n{found.tail()}") from None
                time.sleep(0.2)
        yield found
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
