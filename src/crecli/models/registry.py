"""From a ModelSpec to a live backend, and a pool that keeps models loaded across a batch.

Tests replace `make_backend` (see tests/conftest.py) so that no real model is touched.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

from crecli.cancel import POLL_SECONDS, Gate, check, waiting
from crecli.grading import option_letters
from crecli.models.backend import Backend
from crecli.models.prompting import stops_in_text

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


def signal_support(spec: "ModelSpec", quick: bool = False) -> str:
    """Whether `spec`'s greedy answers carry `Signals`, as `cre models list` shows it:
    "logprobs" (llama.cpp reads them from its logits; a remote rung's server returns
    log-probabilities), "none" (its server returns none) or "unknown (why)" (it could not be
    asked). A remote rung's server is asked once per process (`OpenAIBackend.signal_support`),
    within the rung's `timeout`, or `openai.PROBE_TIMEOUT` where `quick` (a listing, which a
    hung server must not hold for the rung's whole timeout)."""
    if spec.backend != "openai":
        return "logprobs"
    from crecli.models.openai import PROBE_TIMEOUT, OpenAIBackend

    return OpenAIBackend(spec).signal_support(timeout=PROBE_TIMEOUT if quick else None).label


def option_letters_for(spec: "ModelSpec", match: str | None, prompt: str) -> str:
    """The letters at which `spec`'s greedy answer to `prompt` ends (`GenParams.option_letters`):
    the prompt's offered options for a `choice` answer (`grading.option_letters`) where llama.cpp
    answers in process, else "": a remote rung's server decodes its own way and writes on, so
    its answers are asked, recorded and priced without the rule. The one rule of the live
    cascade, the recorded votes and the strongest model's estimate."""
    return option_letters(match, prompt) if spec.backend != "openai" else ""


def counts_text_stops(spec: "ModelSpec") -> bool:
    """Whether `spec` answers in process in a format whose answers can end at a stop string
    written as text (`prompting.stops_in_text`): such an answer was counted one output token
    more than its decode steps until `tokens.decoded_output`, so the outcome store marks its
    recordings ("-s", `outcomes.settings_key`) and runs those made before again. A remote
    rung's counts are its server's, which that change left alone."""
    return spec.backend != "openai" and stops_in_text(spec.prompt_format)


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

    The budget counts GGUF file sizes (pinned in models.toml, else read from the disk), a
    fair proxy for resident memory with mmap, plus, when `parallel` > 1, the KV cache of
    each model's parallel context (`Backend.parallel_memory`), plus the caches the loaded
    models hold at that moment (`Backend.cache_memory`: snapshots of answered examples).
    When a new model would exceed it, the least recently used idle models are closed first.
    A model's caches grow while it answers, so the budget is checked each time a model is
    asked for, not held at every instant.

    `get` is for sequential callers (`cre ask`, `cre batch`). `lease` is for callers on
    several threads (`cre serve`): a loaded model computes for one caller at a time (its
    `Gate`, first come, first served), while different models compute at once, so a small
    model's answer never waits behind a large one's. A model in use is never closed to make
    room: a caller that needs the room waits for it to be free. A remote rung has no gate:
    its server takes many requests, bounded by the rung's own `max_in_flight`.
    """

    def __init__(self, memory_budget_bytes: int | None = None, parallel: int = 1) -> None:
        self.budget = memory_budget_bytes
        self.parallel = max(1, parallel)
        self._loaded: OrderedDict[str, Backend] = OrderedDict()
        self._costs: dict[str, int] = {}
        self._cond = threading.Condition()
        self._gates: dict[str, Gate] = {}
        self._busy: Counter[str] = Counter()  # leases held, per model
        # Load seconds of the models closed so far (evicted for room, or at `close`).
        self._closed_load_seconds: Counter[str] = Counter()

    def cost(self, backend: Backend) -> int:
        """Bytes `backend` is counted for against the budget: its file (`ModelSpec.file_bytes`;
        0 where that is unknown, as for a file not pulled yet) and its parallel KV cache."""
        return (backend.spec.file_bytes or 0) + backend.parallel_memory(self.parallel)

    def get(self, spec: "ModelSpec") -> Backend:
        with self._cond:
            return self._load(spec)

    def gate(self, spec: "ModelSpec") -> Gate | None:
        """The gate a caller of `lease` passes to compute on `spec`'s model; None for a remote rung."""
        if spec.backend == "openai":
            return None
        with self._cond:
            gate = self._gates.get(spec.name)
            if gate is None:  # made once per model, not on every lease
                gate = self._gates[spec.name] = Gate(1)
            return gate

    @contextmanager
    def lease(self, spec: "ModelSpec") -> Iterator[Backend]:
        """`spec`'s backend, loaded within the budget and held by this caller alone (a remote
        rung's is shared) until the block ends. A wait ends early when the caller's request
        gives up (`cancel.Cancelled`)."""
        gate = self.gate(spec)
        if gate is not None:
            gate.acquire()
        try:
            # A job waiting for the gate (above) or for memory (`_load`) computes nothing:
            # queued, not running, on /health.
            with self._cond, waiting():
                backend = self._load(spec, wait=True)
                self._busy[spec.name] += 1
            try:
                yield backend
            finally:
                with self._cond:
                    self._busy[spec.name] -= 1
                    self._cond.notify_all()
        finally:
            if gate is not None:
                gate.release()

    def _load(self, spec: "ModelSpec", wait: bool = False) -> Backend:  # with the lock held
        if spec.name in self._loaded:
            self._loaded.move_to_end(spec.name)
            return self._loaded[spec.name]
        # Constructing a backend loads nothing (models load on first use), so its cost can
        # be known before older models make room for it.
        backend = backend_for(spec)
        cost = self.cost(backend) if self.budget is not None else 0
        # A backend that holds no memory (a remote rung) needs no room: it waited behind a
        # local model's decode and then closed it, where the pool was over its budget.
        while self.budget is not None and cost > 0:
            # Caches that grew while the loaded models answered count as they stand now.
            used = sum(self._costs.values()) + sum(b.cache_memory() for b in self._loaded.values())
            # Only models that hold memory free any: closing an idle remote rung frees none.
            idle = [name for name in self._loaded
                    if not self._busy[name] and (self._costs.get(name, 0) or self._loaded[name].cache_memory())]
            while idle and used + cost > self.budget:
                name = idle.pop(0)
                old = self._loaded.pop(name)
                used -= self._costs.pop(name) + old.cache_memory()
                self._closed_load_seconds[name] += old.load_seconds
                old.close()
            # Only models in use that hold memory free any when done: a busy remote rung holds none.
            holding = any(n and self._costs.get(name, 0) for name, n in self._busy.items())
            if used + cost <= self.budget or not wait or not holding:
                break  # it fits, or nothing will free more (a model over the budget alone loads anyway)
            # Models in use will be free soon: wait for one rather than go over the budget.
            self._cond.wait(POLL_SECONDS)
            check()
        self._loaded[spec.name] = backend
        self._costs[spec.name] = cost
        return backend

    def loaded(self, name: str) -> Backend | None:
        """The backend of model `name` when the pool holds it; loads nothing, and takes no
        lock: /health calls it on the event loop, which must never wait behind a load or the
        teardown of an evicted model, both done under the lock (one dict read is atomic)."""
        return self._loaded.get(name)

    def load_seconds(self) -> dict[str, float]:
        """Seconds each model spent loading while in this pool, closed ones included (a model
        evicted and loaded again counts both loads); models that loaded nothing are left out.
        No answer's price carries them: a run of the cascade loads each rung it reaches, where
        always the strongest model would load one (`cre batch`'s summary)."""
        with self._cond:
            seconds = Counter(self._closed_load_seconds)
            for name, backend in self._loaded.items():
                seconds[name] += backend.load_seconds
        return {name: value for name, value in seconds.items() if value > 0}

    def close(self) -> None:
        with self._cond:
            while self._loaded:
                name, backend = self._loaded.popitem()
                self._costs.pop(name, None)
                self._closed_load_seconds[name] += backend.load_seconds
                backend.close()

    def __enter__(self) -> "ModelPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
