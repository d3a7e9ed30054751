"""Measuring each model's speed on this machine, so cost is measured rather than guessed.

Prompt processing (pp) and token generation (tg) are timed separately, straight through
llama.cpp's eval and sample calls, because they differ by an order of magnitude and a
query's cost is a mix of both. Each is measured `repeats` times in one load; the median is
stored and the spread (slowest against fastest run) is reported, because a run beside
another busy process can be several times slower and would make that model look dear.

Figures are stored per model sha256 and thread count: a re-pulled file or another
`CRE_THREADS` is measured again rather than priced with stale speeds.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from crecli import paths
from crecli.config import ModelSpec

if TYPE_CHECKING:
    from crecli.config import ModelConfig

# Runs that differ by more than this (slowest against fastest) are reported as unsteady:
# quiet 2-core VMs here agree within 10-20%, runs beside a busy process differ by 2-10x.
MAX_SPREAD = 0.25
# Other work using more than this share of the CPUs before a run makes its figures suspect.
MAX_BUSY = 0.25


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
    # Relative spread of the repeated runs: (fastest - slowest) / median, per phase.
    pp_spread: float = 0.0
    tg_spread: float = 0.0
    repeats: int = 1
    # Share of the CPUs that other work used just before the run: above ~0.25 the figures
    # are probably low.
    busy_share: float | None = None
    extra_bufts: bool | None = None
    # Prompt tokens every rendered prompt shares (`prompting.HEAD_PROBES`), which llama.cpp
    # keeps cached between prompts; None when measured before this was recorded.
    head_tokens: int | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def steady(self) -> bool:
        return not self.warnings


_PROMPT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. "
)


def _spread(values: Sequence[float]) -> float:
    mid = statistics.median(values)
    return (max(values) - min(values)) / mid if mid > 0 else 0.0


def _busy_share(seconds: float = 0.5) -> float | None:
    """Share of all CPU time that other work used over `seconds`, read from /proc/stat
    while this process sleeps. Not the load average: that still counts the model measured
    a moment ago by this very command."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields) - idle, sum(fields)

    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):  # not Linux
        return None
    return (busy1 - busy0) / (total1 - total0) if total1 > total0 else None


def measure(spec: ModelSpec, pp_tokens: int = 256, tg_tokens: int = 64, repeats: int = 3) -> Speed:
    from crecli.models.llama import LlamaBackend, use_extra_bufts

    busy = _busy_share()
    backend = LlamaBackend(spec)
    try:
        llm = backend.llm
        head = cached_head_tokens(llm, spec.prompt_format)
        tokens = llm.tokenize((_PROMPT * 64).encode(), add_bos=True)[:pp_tokens]
        llm.reset()
        llm.eval(tokens[:8])  # warm-up: first decode allocates buffers
        pp_rates, tg_rates = [], []
        for _ in range(max(1, repeats)):
            llm.reset()
            start = time.perf_counter()
            llm.eval(tokens)
            pp_rates.append(len(tokens) / (time.perf_counter() - start))
            start = time.perf_counter()
            for _ in range(tg_tokens):
                token = llm.sample(temp=0.0)
                llm.eval([token])
            tg_rates.append(tg_tokens / (time.perf_counter() - start))
        speed = Speed(
            model=spec.name,
            sha256=spec.sha256,
            threads=backend.n_threads,
            pp_tokens_per_s=statistics.median(pp_rates),
            tg_tokens_per_s=statistics.median(tg_rates),
            load_seconds=backend.load_seconds,
            pp_tokens=len(tokens),
            tg_tokens=tg_tokens,
            measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            pp_spread=_spread(pp_rates),
            tg_spread=_spread(tg_rates),
            repeats=len(pp_rates),
            busy_share=busy,
            extra_bufts=use_extra_bufts(),
            head_tokens=head,
        )
    finally:
        backend.close()
    speed.warnings = check(speed)
    return speed


def cached_head_tokens(llm: Any, prompt_format: str) -> int:
    """How many leading tokens two different prompts in this format share once tokenized,
    which is what llama.cpp's prefix reuse skips (the head's last characters can merge with
    the prompt's first into one token, so the text's own token count would overstate it)."""
    from crecli.models.llama import shared_prefix
    from crecli.models.prompting import HEAD_PROBES, render

    return len(shared_prefix([llm.tokenize(render(prompt_format, p).text.encode(), add_bos=True, special=True)
                              for p in HEAD_PROBES]))


def check(speed: Speed) -> list[str]:
    """Reasons to distrust a measurement (empty when it looks steady)."""
    problems = []
    if speed.repeats > 1 and max(speed.pp_spread, speed.tg_spread) > MAX_SPREAD:
        problems.append(
            f"{speed.model}: the {speed.repeats} runs disagree by {max(speed.pp_spread, speed.tg_spread):.0%} "
            f"(more than {MAX_SPREAD:.0%}); something else is probably using the CPU"
        )
    if speed.busy_share is not None and speed.busy_share > MAX_BUSY:
        problems.append(f"{speed.model}: other work used {speed.busy_share:.0%} of the CPUs just before the run")
    return problems


def _key(sha256: str | None, name: str, threads: int) -> str:
    return f"{sha256 or name}@{threads}"


def load_all() -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(paths.bench_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save(speed: Speed) -> None:
    data = load_all()
    entry = asdict(speed)
    data[_key(speed.sha256, speed.model, speed.threads)] = entry
    path = paths.bench_file()
    paths.ensure(path.parent)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def stored(spec: ModelSpec, threads: int | None = None) -> dict[str, Any] | None:
    """The stored figures for this exact file and thread count, or None.

    A re-pulled or changed model, or another `CRE_THREADS`, is re-measured rather than
    priced with speeds that no longer hold.
    """
    from crecli.models.llama import default_threads

    entry = load_all().get(_key(spec.sha256, spec.name, threads or default_threads()))
    if not isinstance(entry, dict):
        return None
    try:
        if float(entry["pp_tokens_per_s"]) > 0 and float(entry["tg_tokens_per_s"]) > 0:
            return entry
    except (KeyError, TypeError, ValueError):
        pass
    return None


def speeds(specs: Sequence[ModelSpec]) -> dict[str, tuple[float, float]]:
    """(prompt, generation) tokens/s of each model that `cre models bench` measured."""
    out = {}
    for spec in specs:
        entry = stored(spec)
        if entry:
            out[spec.name] = (float(entry["pp_tokens_per_s"]), float(entry["tg_tokens_per_s"]))
    return out


def cached_heads(specs: Sequence[ModelSpec]) -> dict[str, int]:
    """Each measured model's cached head, in tokens (0 where the measurement predates it)."""
    out = {}
    for spec in specs:
        entry = stored(spec)
        if entry:
            head = entry.get("head_tokens")
            out[spec.name] = int(head) if isinstance(head, int) and not isinstance(head, bool) and head >= 0 else 0
    return out


def run(settings: "ModelConfig", names: Sequence[str], pp_tokens: int = 256, tg_tokens: int = 64, repeats: int = 3) -> list[Speed]:
    """Probe, measure and store each named local model, one after another.

    The probe runs first in a child process, so a llama.cpp crash in native code becomes
    an error that names the cause and the fix instead of killing `cre`. An unsteady
    measurement is taken once more; if it is still unsteady it is stored with a warning,
    because a re-run on a quiet machine is the only real fix.
    """
    from crecli.console import status, warn
    from crecli.models.llama import probe

    results = []
    for name in names:
        spec = settings.get(name)
        if spec.backend != "llama":
            warn(f"{name}: remote models are not benchmarked; set price_per_1k_tokens instead")
            continue
        status(f"Checking that llama.cpp runs {name}...")
        probe(spec)
        status(f"Measuring {name} ({pp_tokens} prompt tokens, {tg_tokens} generated, {repeats} runs)...")
        speed = measure(spec, pp_tokens=pp_tokens, tg_tokens=tg_tokens, repeats=repeats)
        if not speed.steady:
            status(f"{name}: unsteady figures ({'; '.join(speed.warnings)}); measuring again")
            speed = measure(spec, pp_tokens=pp_tokens, tg_tokens=tg_tokens, repeats=repeats)
        for problem in speed.warnings:
            warn(f"{problem}. Stored anyway: re-run `cre models bench {name}` on a quiet machine, "
                 "since costs are computed from these speeds")
        save(speed)
        results.append(speed)
    return results
