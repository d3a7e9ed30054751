"""The llama.cpp backend, through llama-cpp-python.

The model loads on first use, not at construction, so building a ladder is free and only
the rungs a query reaches cost memory. `n_threads` defaults to the core count: llama.cpp's
threads spin while they wait, so more threads than cores (or two models computing at once)
collapses throughput.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
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
            with _quiet_stderr():
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
