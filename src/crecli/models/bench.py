"""Measuring each model's speed on this machine, so cost is measured rather than guessed.

Prompt processing (pp) and token generation (tg) are timed separately, straight through
llama.cpp's eval and sample calls, because they differ by an order of magnitude and a
query's cost is a mix of both. Figures are stored per model sha256 and thread count.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from crecli import paths
from crecli.config import ModelSpec


@dataclass
class Speed:
    model: str
    sha256: str | None
    threads: int
    pp_tokens_per_s: float
    tg_tokens_per_s: float
    load_seconds: float
    pp_tokens: int
    tg_tokens: int
    measured_at: str


_PROMPT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. "
)


def measure(spec: ModelSpec, pp_tokens: int = 256, tg_tokens: int = 64) -> Speed:
    from crecli.models.llama import LlamaBackend

    backend = LlamaBackend(spec)
    try:
        llm = backend.llm
        tokens = llm.tokenize((_PROMPT * 64).encode(), add_bos=True)[:pp_tokens]
        llm.reset()
        llm.eval(tokens[:8])  # warm-up: first decode allocates buffers
        llm.reset()
        start = time.perf_counter()
        llm.eval(tokens)
        pp_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(tg_tokens):
            token = llm.sample(temp=0.0)
            llm.eval([token])
        tg_s = time.perf_counter() - start
        return Speed(
            model=spec.name,
            sha256=spec.sha256,
            threads=backend.n_threads,
            pp_tokens_per_s=len(tokens) / pp_s,
            tg_tokens_per_s=tg_tokens / tg_s,
            load_seconds=backend.load_seconds,
            pp_tokens=len(tokens),
            tg_tokens=tg_tokens,
            measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
    finally:
        backend.close()


def load_all() -> dict[str, dict[str, Any]]:
    try:
        return json.loads(paths.bench_file().read_text())
    except (OSError, ValueError):
        return {}


def save(speed: Speed) -> None:
    data = load_all()
    data[speed.model] = asdict(speed)
    path = paths.bench_file()
    paths.ensure(path.parent)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def stored(spec: ModelSpec) -> dict[str, Any] | None:
    """The stored figures for this exact file (a re-pulled or changed model is re-measured)."""
    entry = load_all().get(spec.name)
    if entry and entry.get("sha256") == spec.sha256:
        return entry
    return None
