"""The llama.cpp backend, through llama-cpp-python.

The model loads on first use, not at construction, so building a ladder is free and only
the rungs a query reaches cost memory. `n_threads` defaults to the core count: llama.cpp's
threads spin while they wait, so more threads than cores (or two models computing at once)
collapses throughput.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from crecli.errors import BackendError
from crecli.models.backend import Backend, Generation, GenParams
from crecli.models.pull import require_file

if TYPE_CHECKING:
    from crecli.config import ModelSpec


def default_threads() -> int:
    value = os.environ.get("CRE_THREADS")
    if value:
        return max(1, int(value))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence llama.cpp's C-level logging (it writes to fd 2 even with verbose=False).

    Set CRE_DEBUG=1 to see it.
    """
    if os.environ.get("CRE_DEBUG"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# What a user is told when llama.cpp dies in native code: the process is gone, so this is
# printed by the parent of a probe (`cre models bench`) or pointed to by faulthandler.
CRASH_HINT = (
    "llama.cpp crashed in native code ({how}) while loading or running {what}. "
    "On Xeons with AMX (lscpu shows amx_int8) a native llama.cpp build crashes at the first "
    "decode when weights go into its AMX buffers (ggml-org/llama.cpp#20824). cre turns those "
    "buffers off on AMX CPUs; if you forced them on, unset CRE_LLAMA_EXTRA_BUFTS. Otherwise "
    "rebuild llama-cpp-python without native CPU tuning: CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" "
    "pip install --force-reinstall --no-cache-dir llama-cpp-python. Run with CRE_DEBUG=1 to "
    "see llama.cpp's own log."
)


CPUINFO = "/proc/cpuinfo"


@lru_cache(maxsize=1)
def cpu_has_amx() -> bool:
    """Whether this CPU advertises AMX tiles (Linux /proc/cpuinfo; False where unknown)."""
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_int8" in line.split() or "amx_tile" in line.split()
    except OSError:
        pass
    return False


def use_extra_bufts() -> bool:
    """Whether llama.cpp may put weights in its extra (repacked or AMX) CPU buffer types.

    Off on AMX CPUs: there a native build routes weights into the AMX buffer type and the
    first decode segfaults (ggml-org/llama.cpp#20824). Everywhere else the repacked layouts
    stay on, because they are llama.cpp's faster CPU kernels. `CRE_LLAMA_EXTRA_BUFTS=0/1`
    overrides the choice (README, "Set up", has the measured cost of each).
    """
    forced = os.environ.get("CRE_LLAMA_EXTRA_BUFTS", "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return False
    if forced in ("1", "true", "yes", "on"):
        return True
    return not cpu_has_amx()


# llama-cpp-python's high-level `Llama` builds its llama_model_params itself and has no
# argument for `use_extra_bufts`, so the default-params factory it calls is wrapped for the
# duration of one construction. The lock keeps two threads from interleaving the swap.
_PARAMS_LOCK = threading.Lock()


@contextmanager
def _model_params(extra_bufts: bool) -> Iterator[None]:
    import llama_cpp.llama_cpp as low

    if extra_bufts or not hasattr(low.llama_model_params, "_fields_") or "use_extra_bufts" not in dict(
        low.llama_model_params._fields_
    ):
        yield
        return
    with _PARAMS_LOCK:
        original = low.llama_model_default_params

        def without_extra_bufts() -> Any:
            params = original()
            params.use_extra_bufts = False
            return params

        low.llama_model_default_params = without_extra_bufts
        try:
            yield
        finally:
            low.llama_model_default_params = original


def probe(spec: "ModelSpec", timeout: float = 300.0) -> None:
    """Load `spec` and decode a few tokens in a child process, so that a native crash is
    reported with its cause instead of killing this process with a bare segfault."""
    path = require_file(spec)
    cmd = _probe_command(path, spec)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    except subprocess.TimeoutExpired as exc:
        raise BackendError(f"loading {spec.name!r} and decoding 4 tokens took over {timeout:.0f} s; is the machine busy?") from exc
    if proc.returncode < 0:
        sig = -proc.returncode
        try:
            how = signal.Signals(sig).name
        except ValueError:
            how = f"signal {sig}"
        raise BackendError(CRASH_HINT.format(how=how, what=repr(spec.name)))
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise BackendError(f"llama.cpp could not run {spec.name!r} from {path}: {detail}")


def _probe_command(path: Path, spec: "ModelSpec") -> list[str]:
    return [sys.executable, "-m", "crecli.models.llama", str(path), str(spec.context), str(spec.n_gpu_layers)]


class LlamaBackend(Backend):
    def __init__(
        self,
        spec: "ModelSpec",
        n_threads: int | None = None,
        n_gpu_layers: int | None = None,
        n_ctx: int | None = None,
    ) -> None:
        super().__init__(spec)
        self.n_threads = n_threads or default_threads()
        self.n_gpu_layers = spec.n_gpu_layers if n_gpu_layers is None else n_gpu_layers
        self.n_ctx = n_ctx or spec.context
        self._llm: Any = None
        self._embedder: Any = None
        self.load_seconds = 0.0

    def _load(self, embedding: bool = False) -> Any:
        path = require_file(self.spec)
        try:
            from llama_cpp import Llama
        except ImportError as exc:  # pragma: no cover - install problem
            raise BackendError(f"llama-cpp-python is not importable ({exc}); reinstall crecli") from exc
        start = time.perf_counter()
        try:
            with _quiet_stderr(), _model_params(use_extra_bufts()):
                llm = Llama(
                    model_path=str(path),
                    n_ctx=self.n_ctx,
                    n_threads=self.n_threads,
                    n_threads_batch=self.n_threads,
                    n_gpu_layers=self.n_gpu_layers,
                    embedding=embedding,
                    # Mean pooling: decoder models have no CLS token worth reading.
                    **({"pooling_type": 1} if embedding else {}),
                    verbose=False,
                )
        except Exception as exc:  # llama.cpp reports load failures as bare ValueErrors
            raise BackendError(f"llama.cpp could not load {self.spec.name!r} from {path}: {exc}") from exc
        if not embedding:
            # One tiny decode allocates llama.cpp's compute buffers now, so the first real
            # query is not charged for it (costs are measured per query).
            llm.eval(llm.tokenize(b" ", add_bos=True))
            llm.reset()
        self.load_seconds += time.perf_counter() - start
        return llm

    @property
    def llm(self) -> Any:
        if self._llm is None:
            self._llm = self._load()
        return self._llm

    def _fit_max_tokens(self, n_prompt: int, wanted: int) -> int:
        room = self.n_ctx - n_prompt
        if room <= 0:
            raise BackendError(
                f"prompt is {n_prompt} tokens, which fills {self.spec.name!r}'s context of {self.n_ctx}; "
                "shorten it or raise `context` in models.toml"
            )
        return min(wanted, room)

    def complete(self, text: str, params: GenParams) -> Generation:
        llm = self.llm
        n_prompt = len(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))
        start = time.perf_counter()
        out = llm.create_completion(
            text,
            max_tokens=self._fit_max_tokens(n_prompt, params.max_tokens),
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            min_p=0.0,
            repeat_penalty=1.0,
            seed=params.seed,
            stop=list(params.stop) or None,
        )
        seconds = time.perf_counter() - start
        choice = out["choices"][0]
        usage = out.get("usage", {})
        return Generation(
            text=choice["text"],
            prompt_tokens=int(usage.get("prompt_tokens", n_prompt)),
            output_tokens=int(usage.get("completion_tokens", 0)),
            seconds=seconds,
            finish_reason=str(choice.get("finish_reason") or "stop"),
        )

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if self._embedder is None:
            self._embedder = self._load(embedding=True)
        vectors: list[list[float]] = []
        for text in texts:
            # One text per call: llama-cpp-python's batch embedding packs sequences into
            # one context, and a long text would push others out.
            vectors.append(list(self._embedder.embed(text, normalize=True, truncate=True)))
        return vectors

    def close(self) -> None:
        for attr in ("_llm", "_embedder"):
            llm = getattr(self, attr)
            if llm is not None:
                try:
                    llm.close()
                except Exception:
                    pass
                setattr(self, attr, None)


def _probe_main(argv: Sequence[str]) -> None:
    """Child side of `probe`: load the file and run a short greedy decode."""
    from crecli.config import ModelSpec

    path, context, n_gpu_layers = argv[0], int(argv[1]), int(argv[2])
    spec = ModelSpec(name=Path(path).name, path=path, context=context, n_gpu_layers=n_gpu_layers)
    backend = LlamaBackend(spec)
    try:
        llm = backend.llm
        llm.reset()
        llm.eval(llm.tokenize(b"The capital of France is", add_bos=True))
        for _ in range(4):
            llm.eval([llm.sample(temp=0.0)])
    finally:
        backend.close()


if __name__ == "__main__":
    _probe_main(sys.argv[1:])
