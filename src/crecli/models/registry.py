"""From a ModelSpec to a live backend, and a pool that keeps models loaded across a batch.

Tests replace `make_backend` (see tests/conftest.py) so that no real model is touched.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Callable

from crecli.models.backend import Backend

if TYPE_CHECKING:
    from crecli.config import ModelSpec
    from crecli.models.backend import Generation, GenParams


def _default_factory(spec: "ModelSpec") -> Backend:
    if spec.backend == "openai":
        from crecli.models.openai import OpenAIBackend

        return OpenAIBackend(spec)
    from crecli.models.llama import LlamaBackend

    return LlamaBackend(spec)


make_backend: Callable[["ModelSpec"], Backend] = _default_factory


def signal_support(spec: "ModelSpec") -> str:
    """Whether `spec`'s greedy answers carry `Signals`, as `cre models list` shows it:
    "logprobs" (llama.cpp reads them from its logits; a remote rung's server returns
    log-probabilities), "none" (its server returns none) or "unknown (why)" (it could not be
    asked). A remote rung's server is asked once per process (`OpenAIBackend.signal_support`)."""
    if spec.backend != "openai":
        return "logprobs"
    from crecli.models.openai import OpenAIBackend

    return OpenAIBackend(spec).signal_support().label


def _default_reports_signals(spec: "ModelSpec") -> bool:
    return signal_support(spec) == "logprobs"


# Whether `make_backend(spec)` gives greedy `Signals`, answered without running a model (a
# remote rung's server may be asked once); tests that replace `make_backend` replace this with it.
reports_signals: Callable[["ModelSpec"], bool] = _default_reports_signals


def backend_for(spec: "ModelSpec") -> Backend:
    # Looked up at call time so a test's monkeypatch of `make_backend` takes effect.
    return make_backend(spec)


def generate_once(spec: "ModelSpec", prompt: str, params: "GenParams") -> "Generation":
    """One answer from one model, loaded for it and closed after (`cre ask --model`)."""
    backend = backend_for(spec)
    try:
        return backend.generate(prompt, params)
    finally:
        backend.close()


class ModelPool:
    """Loaded backends, most recently used last, within a memory budget.

    The budget counts GGUF file sizes, a fair proxy for resident memory with mmap, plus,
    when `parallel` > 1, the KV cache of each model's parallel context
    (`Backend.parallel_memory`), plus the caches the loaded models hold at that moment
    (`Backend.cache_memory`: snapshots of answered examples). When a new model would
    exceed it, the least recently used models are closed first. A model's caches grow while
    it answers, so the budget is checked each time a model is asked for, not held at every
    instant. Only one model computes at a time: callers are sequential, by
    design (llama.cpp threads spin).
    """

    def __init__(self, memory_budget_bytes: int | None = None, parallel: int = 1) -> None:
        self.budget = memory_budget_bytes
        self.parallel = max(1, parallel)
        self._loaded: OrderedDict[str, Backend] = OrderedDict()
        self._costs: dict[str, int] = {}

    def cost(self, backend: Backend) -> int:
        """Bytes `backend` is counted for against the budget."""
        return (backend.spec.size or 0) + backend.parallel_memory(self.parallel)

    def get(self, spec: "ModelSpec") -> Backend:
        if spec.name in self._loaded:
            self._loaded.move_to_end(spec.name)
            return self._loaded[spec.name]
        # Constructing a backend loads nothing (models load on first use), so its cost can
        # be known before older models make room for it.
        backend = backend_for(spec)
        cost = self.cost(backend) if self.budget is not None else 0
        if self.budget is not None:
            # Caches that grew while the loaded models answered count as they stand now.
            used = sum(self._costs.values()) + sum(b.cache_memory() for b in self._loaded.values())
            while self._loaded and used + cost > self.budget:
                name, old = self._loaded.popitem(last=False)
                used -= self._costs.pop(name) + old.cache_memory()
                old.close()
        self._loaded[spec.name] = backend
        self._costs[spec.name] = cost
        return backend

    def loaded(self, name: str) -> Backend | None:
        """The backend of model `name` when the pool holds it; loads nothing."""
        return self._loaded.get(name)

    def close(self) -> None:
        while self._loaded:
            name, backend = self._loaded.popitem()
            self._costs.pop(name, None)
            backend.close()

    def __enter__(self) -> "ModelPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
