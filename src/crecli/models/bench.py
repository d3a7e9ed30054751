"""Measuring each model's speed on this machine, so cost is measured rather than guessed.

Prompt processing (pp) and token generation (tg) are timed separately, straight through
llama.cpp's eval and sample calls, because they differ by an order of magnitude and a
query's cost is a mix of both. Prompts are timed as they run: a short query's tokens after
the cached head, at two lengths, because a prompt's time is a pass over the weights,
whatever its length, plus a time per token (`Rates`). Every model is measured `repeats`
times in interleaved rounds (each model once per round, in a fresh load); the medians are
stored (the pass and the prompt rate split from the median timings of both prompts,
`split_pass`) and the spread (slowest against fastest run) is reported, because a run beside
another busy process can be several times slower and would make that model look dear.

Figures are stored per model sha256 (an unpinned model's file's own, `file_digest`) and
thread count: a re-pulled or replaced file or another `CRE_THREADS` is measured again
rather than priced with stale speeds. Each command's run
is kept beside the earlier ones measured the same way (up to POOLED_RUNS), and the stored
speed, which prices every answer, is pooled from them the same way (`_pooled`): on a shared VM the speed ratios drift
from one hour to the next by more than one run's spread, so one run's minute should not
decide a router's costs. `cre models bench --fresh` starts the pool again.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

from crecli import paths
from crecli.safejson import finite

if TYPE_CHECKING:
    from crecli.config import ModelConfig, ModelSpec

# Runs that differ by more than this (slowest against fastest) are reported as unsteady:
# quiet 2-core VMs here agree within 10-20%, runs beside a busy process differ by 2-10x.
MAX_SPREAD = 0.25
# Other work using more than this share of the CPUs before a run makes its figures suspect.
MAX_BUSY = 0.25
# Prompt tokens a measurement processes after the cached head, as a real prompt does: a
# short query. The 1,400-query BIG-bench log adds 42 tokens on average after its head (25
# to 65 for the middle 80%). At 256 tokens llama.cpp's matrix kernels ran the 1.5B
# relatively faster than at 40 (`bench/cpu_backends.py --lengths`), which priced the
# small rungs above what their answers take on the clock.
PP_TOKENS = 48
# The shorter prompt each round also times, as a share of PP_TOKENS (16 tokens at 48): the
# two lengths give a prompt's pass and its time per token (`Rates`).
PP_SHORT_SHARE = 3
# The most of the long prompt's time a pass may take, so its tokens keep a finite rate
# (`split_pass`); the 1.5B's measured pass is about a third of a 48-token prompt's time.
MAX_PASS_SHARE = 0.9
# A short prompt takes a fraction of a second, so each run times this many in a row
# (with 4, runs of the 0.5B disagreed by up to 52% on a quiet 2-core VM).
PP_ROUNDS = 8
TG_TOKENS = 64
REPEATS = 3
# Runs (`cre models bench` commands) whose medians price a model. Three measurements one
# morning priced the 0.5B at 0.52, 0.62 and 0.74 of the 1.5B per answer, which moved the
# 1,400-query headline's cost share by 2.6 points; a median of several runs moves less.
POOLED_RUNS = 5
# How long a save waits for another bench's save (a read and a write: milliseconds) before
# giving up with the figures it measured in the error.
LOCK_WAIT_SECONDS = 30.0


def short_tokens(pp_tokens: int) -> int:
    """The short prompt's length beside one of `pp_tokens` (0: too short to time one)."""
    return pp_tokens // PP_SHORT_SHARE


class Rates(NamedTuple):
    """What a model's answer costs in seconds on this machine: `pass_seconds` for a prompt
    pass, whatever its length, plus its tokens at `pp` tokens/s, and each output token at
    `tg` tokens/s (`costs.token_cost`).

    Why a pass: a short prompt's time is mostly reading the weights once, not its tokens.
    On a 2-core Xeon the 1.5B took 0.17 s for 4 prompt tokens and 0.46 s for 48 (0.165 s
    plus 6.5 ms a token, least squares over 4-128 tokens), the 0.5B 0.04 s plus 4.6 ms and
    gemma 0.02 s plus 1.5 ms (`bench/prompt_pass.py`, bench/results/prompt-pass.json). Priced at 48 tokens' average rate
    instead, a 25-token query cost the 1.5B a quarter less than its clock, and its answers
    took 1.11-1.27 s a priced second in `bench/cost_vs_clock.py` against 0.90-1.14 for the
    small rungs' (bench/results/cost-vs-clock-fresh-seed0-letters.json, `by_model`). Speeds
    measured before passes were (`Speed.pp_short_tokens` None) have a pass of 0 and their
    average rate: re-measure every model of a ladder together, or its rungs are priced two
    ways.
    """

    pp: float
    tg: float
    pass_seconds: float = 0.0

    def prompt_seconds(self, tokens: float) -> float:
        """What a prompt of `tokens` new tokens costs: a pass, then its tokens; none, no pass
        (a later vote reads its prompt from the cache). The one formula of a prompt's price."""
        return self.pass_seconds + tokens / self.pp if tokens > 0 else 0.0


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
    # Relative spread of the repeated runs: (fastest - slowest) / median, per phase; the
    # prompt's is the larger of the long and the short prompt's.
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
    # Each pooled run's own figures, oldest first (`_run_record`: {"pp_tokens_per_s",
    # "tg_tokens_per_s", "pass_seconds", "short_seconds", "long_seconds", "measured_at"});
    # the figures above are pooled from them once stored (`save`). Empty for a measurement
    # not stored yet.
    runs: list[dict[str, Any]] = field(default_factory=list)
    # Seconds a prompt pass costs whatever its length (`Rates`), from timing a prompt of
    # `pp_short_tokens` beside one of `pp_tokens`; `pp_tokens_per_s` is then the rate of the
    # tokens after it. 0.0 and None: measured before passes were, or with a `pp_tokens` too
    # short to time a third of it (the average rate at `pp_tokens`).
    pass_seconds: float = 0.0
    pp_short_tokens: int | None = None
    # The median seconds the short and the long prompt took, which the pass and the rate
    # are split from (`split_pass`), and runs pool by; None before passes were measured.
    short_seconds: float | None = None
    long_seconds: float | None = None
    # The model's `n_gpu_layers` when measured: a run with layers on a GPU is no sample of the
    # CPU's speed, so runs pool only with the same offload (`_earlier_runs`). A bench.json
    # written before this was recorded has none: read as 0, the CPU default those runs had.
    n_gpu_layers: int = 0

    @property
    def rates(self) -> Rates:
        return Rates(self.pp_tokens_per_s, self.tg_tokens_per_s, self.pass_seconds)

    @property
    def mean_pp(self) -> float:
        """Tokens/s over a whole prompt of `pp_tokens`, its pass included: what compares with
        a measurement that split off no pass."""
        return self.pp_tokens / self.rates.prompt_seconds(self.pp_tokens)

    @property
    def steady(self) -> bool:
        return not self.warnings

    @property
    def pooled(self) -> int:
        """How many runs the figures are pooled from (`_pooled`)."""
        return max(1, len(self.runs))


_PROMPT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. "
)


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how far repeated measurements disagree."""
    mid = _median(values)
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


@dataclass
class _Run:
    """One load of one model: its prompt timings, its generation rate, and what the load showed."""

    tg: float
    head: int
    pp_tokens: int
    load_seconds: float
    threads: int
    pp_short: int
    # Mean seconds a prompt of `pp_short` and of `pp_tokens` new tokens took.
    short_seconds: float
    long_seconds: float


def split_pass(n_short: int, short_seconds: float, n_long: int, long_seconds: float) -> tuple[float, float]:
    """(pass seconds, prompt tokens/s) from a prompt of `n_short` tokens that took
    `short_seconds` and one of `n_long` that took `long_seconds` (`Rates`).

    The line through the two points, held so that the longer prompt costs what it took: a
    pass below 0, or above MAX_PASS_SHARE of the longer prompt's time (noise, on a busy
    machine), is clamped, and the rate is what the rest of that time buys. So a measurement
    that finds no pass prices as before passes were measured. The one place a pass is
    split off: a run's rounds and pooled runs are split from their median timings, since
    separate medians of a pass and a rate, which noise moves together, match no timing.
    """
    if n_short <= 0 or short_seconds <= 0:  # no short prompt timed: no pass, exactly
        return 0.0, n_long / long_seconds
    per_token = (long_seconds - short_seconds) / (n_long - n_short) if n_long > n_short else 0.0
    fixed = long_seconds - n_long * per_token if per_token > 0 else 0.0
    fixed = min(max(fixed, 0.0), MAX_PASS_SHARE * long_seconds)
    return fixed, n_long / (long_seconds - fixed)


def _run_once(spec: "ModelSpec", pp_tokens: int, tg_tokens: int) -> _Run:
    """Load `spec`, time PP_ROUNDS prompts of `pp_tokens` new tokens after its cached head
    (the chat template's fixed start, which llama.cpp reuses from the previous prompt), each
    beside one of `pp_tokens // PP_SHORT_SHARE` (`split_pass`), then `tg_tokens` greedy
    tokens after the last long one, and unload it."""
    from crecli.models.llama import LlamaBackend
    from crecli.models.tokens import prompt_head

    backend = LlamaBackend(spec)
    try:
        llm = backend.llm
        first = prompt_head(llm, spec.prompt_format)
        tokens = llm.tokenize((_PROMPT * 64).encode(), add_bos=not first)[:pp_tokens]
        need = len(first) + len(tokens) + tg_tokens
        if need > backend.n_ctx:
            # llama.cpp would stop mid-measurement with a bare RuntimeError from its decode.
            from crecli.errors import CreError

            raise CreError(
                f"{spec.name}: measuring {len(tokens)} prompt and {tg_tokens} generated tokens after its "
                f"{len(first)}-token head needs a context of {need}, and its `context` is {backend.n_ctx}; lower "
                f"--pp-tokens or --tg-tokens, or raise `context` in {spec.set_in('context')}"
            )
        llm.reset()
        if first:
            llm.eval(first)
        llm.eval(tokens[:8])  # warm-up: first decode allocates buffers
        short = short_tokens(len(tokens))
        elapsed = {short: 0.0, len(tokens): 0.0}
        for _ in range(PP_ROUNDS):
            # Short, then long, so the generation below follows a long prompt, as before.
            for n in (short, len(tokens)) if short else (len(tokens),):
                llm.n_tokens = len(first)  # as if the previous prompt had shared only the head
                start = time.perf_counter()
                llm.eval(tokens[:n])
                elapsed[n] += time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(tg_tokens):
            token = llm.sample(temp=0.0)
            llm.eval([token])
        tg = tg_tokens / (time.perf_counter() - start)
        return _Run(tg, len(first), len(tokens), backend.load_seconds, backend.n_threads, short,
                    elapsed[short] / PP_ROUNDS, elapsed[len(tokens)] / PP_ROUNDS)
    finally:
        backend.close()


def measure_all(
    specs: Sequence["ModelSpec"], pp_tokens: int = PP_TOKENS, tg_tokens: int = TG_TOKENS, repeats: int = REPEATS,
    progress: Callable[[str], None] | None = None,
) -> list[Speed]:
    """Time each model `repeats` times, interleaved: round r measures every model once
    before round r+1 starts, each in a fresh load (one model in memory at a time).

    Why interleaved: costs compare models, and a shared VM's speed drifts over minutes.
    Measured one model after another, the 0.5B's prompt speed against the 1.5B's ranged
    from 1.13x to 2.05x over six runs in one morning; in rounds, a slow minute slows every
    model alike (`bench/speed_ratios.py` compares the two orders).
    """
    from crecli.models.runtime import use_extra_bufts

    busy = _busy_share()
    runs: dict[str, list[_Run]] = {spec.name: [] for spec in specs}
    for r in range(max(1, repeats)):
        for spec in specs:
            if progress is not None:
                short = f" and {short_tokens(pp_tokens)}" if short_tokens(pp_tokens) else ""
                progress(f"Round {r + 1}/{max(1, repeats)}: {spec.name} ({pp_tokens}{short} prompt tokens after its "
                         f"cached head, {tg_tokens} generated)...")
            runs[spec.name].append(_run_once(spec, pp_tokens, tg_tokens))
    out = []
    for spec in specs:
        done = runs[spec.name]
        tg_rates = [x.tg for x in done]
        short_s, long_s = _median([x.short_seconds for x in done]), _median([x.long_seconds for x in done])
        fixed, pp = split_pass(done[0].pp_short, short_s, done[0].pp_tokens, long_s)
        speed = Speed(
            model=spec.name,
            sha256=file_digest(spec),
            threads=done[0].threads,
            pp_tokens_per_s=pp,
            tg_tokens_per_s=_median(tg_rates),
            load_seconds=_median([x.load_seconds for x in done]),
            pp_tokens=done[0].pp_tokens,
            tg_tokens=tg_tokens,
            measured_at=paths.stamp(),
            # Of both prompts' rates: the short one's alone decides how much of a prompt is pass.
            pp_spread=max(spread([x.pp_tokens / x.long_seconds for x in done]),
                          spread([x.pp_short / x.short_seconds for x in done]) if done[0].pp_short else 0.0),
            tg_spread=spread(tg_rates),
            repeats=len(done),
            busy_share=busy,
            extra_bufts=use_extra_bufts(),
            head_tokens=done[0].head,
            pass_seconds=fixed,
            # No short prompt timed (`pp_tokens` under PP_SHORT_SHARE): priced as before passes were.
            pp_short_tokens=done[0].pp_short or None,
            short_seconds=short_s if done[0].pp_short else None,
            long_seconds=long_s if done[0].pp_short else None,
            n_gpu_layers=spec.n_gpu_layers,
        )
        speed.warnings = check(speed)
        out.append(speed)
    return out


def measure(spec: "ModelSpec", pp_tokens: int = PP_TOKENS, tg_tokens: int = TG_TOKENS, repeats: int = REPEATS) -> Speed:
    """One model's speed (`measure_all` of it alone)."""
    return measure_all([spec], pp_tokens, tg_tokens, repeats)[0]


def cached_head_tokens(llm: Any, prompt_format: str) -> int:
    """How many leading tokens two different prompts in this format share once tokenized
    (`tokens.prompt_head`), which is what llama.cpp's prefix reuse skips."""
    from crecli.models.tokens import prompt_head

    return len(prompt_head(llm, prompt_format))


def check(speed: Speed) -> list[str]:
    """Reasons to distrust a measurement (empty when it looks steady)."""
    problems = []
    if speed.repeats > 1 and max(speed.pp_spread, speed.tg_spread) > MAX_SPREAD:
        # Which timings: a prompt's (either length) or generation's, to tell noise on short
        # prompts apart from a machine that slowed throughout.
        which = "prompt" if speed.pp_spread >= speed.tg_spread else "generation"
        problems.append(
            f"{speed.model}: the {speed.repeats} runs' {which} timings disagree by "
            f"{max(speed.pp_spread, speed.tg_spread):.0%} (more than {MAX_SPREAD:.0%}); something else is probably "
            "using the CPU"
        )
    if speed.busy_share is not None and speed.busy_share > MAX_BUSY:
        problems.append(f"{speed.model}: other work used {speed.busy_share:.0%} of the CPUs just before the run")
    return problems


def _key(sha256: str | None, name: str, threads: int) -> str:
    return f"{sha256 or name}@{threads}"


def file_digest(spec: "ModelSpec") -> str | None:
    """The sha256 a model's speeds are stored under: the pinned one, else its file's own
    (hashed once, then read from the stamp while size and mtime hold), so a file replaced
    under an unpinned name is measured again instead of priced with the old file's speeds.
    None for a model with no file here (its name keys it)."""
    if spec.sha256 or spec.file is None:
        return spec.sha256
    from crecli.models.pull import file_state

    return file_state(spec).sha256


def load_all(file: Path | None = None) -> dict[str, dict[str, Any]]:
    """Every stored speed, keyed by model file and thread count: this machine's bench.json,
    or `file` (a copy kept beside measurements priced with it, bench/results/speeds.json)."""
    try:
        data = json.loads((file or paths.bench_file()).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _rate(value: Any) -> float | None:
    """A stored tokens/s figure, or None when it is not a positive finite number."""
    number = finite(value)
    return number if number is not None and number > 0 else None


def _seconds(value: Any) -> float | None:
    """A stored time in seconds, or None when it is not a finite number >= 0."""
    number = finite(value)
    return number if number is not None and number >= 0 else None


def pass_of(entry: dict[str, Any]) -> float | None:
    """A stored entry's or run's prompt pass (`Rates.pass_seconds`): 0 where it was measured
    before passes were, None where the stored value is not a time."""
    return _seconds(entry.get("pass_seconds", 0.0))


def _run_record(pp: float, tg: float, measured_at: str, pass_seconds: float,
                short_seconds: float | None, long_seconds: float | None) -> dict[str, Any]:
    """One pooled run as `Speed.runs` and bench.json keep it."""
    return {"pp_tokens_per_s": pp, "tg_tokens_per_s": tg, "pass_seconds": pass_seconds,
            "short_seconds": short_seconds, "long_seconds": long_seconds, "measured_at": measured_at}


def _earlier_runs(entry: Any, speed: Speed) -> list[dict[str, Any]]:
    """The runs stored for this file and thread count that can pool with `speed`: measured
    the same way (prompt and generation tokens, the short prompt's length, cached head,
    weight repacking, GPU offload), with both prompts' timings where `speed` split off a
    pass. A file written before runs were pooled counts as one run."""
    if not isinstance(entry, dict):
        return []
    same = all(entry.get(k) == getattr(speed, k)
               for k in ("pp_tokens", "tg_tokens", "head_tokens", "extra_bufts", "pp_short_tokens"))
    # Runs stored before offload was recorded ran with the default, 0: on the CPU.
    offload = entry.get("n_gpu_layers", 0)
    if not same or isinstance(offload, bool) or offload != speed.n_gpu_layers:
        return []
    runs = entry.get("runs")
    if not isinstance(runs, list):
        runs = [entry]
    kept = []
    for run in runs:
        if not isinstance(run, dict):
            continue
        pp, tg, fixed = _rate(run.get("pp_tokens_per_s")), _rate(run.get("tg_tokens_per_s")), pass_of(run)
        short, long = _rate(run.get("short_seconds")), _rate(run.get("long_seconds"))
        if pp is None or tg is None or fixed is None or (speed.pp_short_tokens and (short is None or long is None)):
            continue
        kept.append(_run_record(pp, tg, str(run.get("measured_at", "")), fixed, short, long))
    return kept


def _pooled(speed: Speed, runs: list[dict[str, Any]]) -> Speed:
    """`speed` with the figures of `runs` (`_run_record`s, its own last): the median
    generation rate, and the pass and prompt rate split from the median timings of both
    prompts (`split_pass`); runs measured before passes were, each figure's median."""
    tg = _median([r["tg_tokens_per_s"] for r in runs])
    # `_earlier_runs` keeps only runs with both timings; a speed built without them (not by
    # `measure_all`) pools as before passes were.
    if speed.pp_short_tokens and all(r["short_seconds"] and r["long_seconds"] for r in runs):
        short, long = _median([r["short_seconds"] for r in runs]), _median([r["long_seconds"] for r in runs])
        fixed, pp = split_pass(speed.pp_short_tokens, short, speed.pp_tokens, long)
        return replace(speed, runs=runs, pp_tokens_per_s=pp, tg_tokens_per_s=tg, pass_seconds=fixed,
                       short_seconds=short, long_seconds=long)
    return replace(speed, runs=runs, pp_tokens_per_s=_median([r["pp_tokens_per_s"] for r in runs]),
                   tg_tokens_per_s=tg, pass_seconds=_median([r["pass_seconds"] for r in runs]))


def _stored_for_update(path: Path) -> dict[str, Any]:
    """bench.json's figures, to add a run to. A file that does not parse (a hand edit gone
    wrong) is set aside as `bench.json.<time>.unreadable`, with a warning, rather than rewritten
    with only the models just measured: every other model's speeds stay readable there."""
    import os

    from crecli.console import warn
    from crecli.errors import CreError

    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise CreError(f"cannot read {path} ({exc.strerror}); fix or remove it, then run `cre models bench` again") from None
    try:
        # Bytes that are not UTF-8 are set aside as bad JSON is: refused, they threw away a
        # bench that had just finished measuring every model (this runs when it saves).
        data = json.loads(raw.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError is one
        data = None
    if isinstance(data, dict):
        return data
    # Named by the moment, so a second broken file does not replace the first one set aside.
    aside = path.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}.unreadable")
    try:
        os.replace(path, aside)
    except OSError as exc:
        raise CreError(f"{path} does not parse and cannot be set aside ({exc.strerror or exc}); fix or remove it") from None
    warn(f"{path} did not parse as crecli's speeds; kept it as {aside} and started a new one")
    return {}


def save(speed: Speed, fresh: bool = False) -> Speed:
    """Store `speed` as the newest run of its model and return what is stored: the last
    POOLED_RUNS runs measured the same way pooled (`_pooled`; only this one when `fresh`)."""
    from crecli.errors import CreError

    path = paths.bench_file()
    paths.ensure(path.parent)
    try:
        # Read, add and write under one lock: two benches saving at once each rewrote the
        # file from what they had read, and the one that wrote first lost its run.
        with paths.exclusive(paths.bench_lock_file(), LOCK_WAIT_SECONDS):
            data = _stored_for_update(path)
            key = _key(speed.sha256, speed.model, speed.threads)
            runs = [] if fresh else _earlier_runs(data.get(key), speed)
            runs = [*runs, _run_record(speed.pp_tokens_per_s, speed.tg_tokens_per_s, speed.measured_at,
                                       speed.pass_seconds, speed.short_seconds, speed.long_seconds)][-POOLED_RUNS:]
            pooled = _pooled(speed, runs)
            data[key] = asdict(pooled)
            paths.atomic_write(path, json.dumps(data, indent=2))
    except OSError as exc:
        raise CreError(
            f"could not write {path} ({exc.strerror or exc}); {speed.model} measured a {speed.pass_seconds:.3f} s "
            f"prompt pass, {speed.pp_tokens_per_s:.1f} prompt and {speed.tg_tokens_per_s:.1f} generated tokens/s"
        ) from None
    return pooled


def stored(spec: ModelSpec, threads: int | None = None, file: Path | None = None) -> dict[str, Any] | None:
    """The stored figures for this exact file and thread count, or None.

    A re-pulled or changed model, or another `CRE_THREADS`, is re-measured rather than
    priced with speeds that no longer hold.
    """
    from crecli.models.runtime import default_threads

    if spec.url:
        # Served elsewhere, priced by its price or its clock: never by this CPU's speeds of a
        # local file that its pinned sha256 may name.
        return None
    entry = load_all(file).get(_key(file_digest(spec), spec.name, threads or default_threads()))
    if not isinstance(entry, dict):
        return None
    if (_rate(entry.get("pp_tokens_per_s")) is not None and _rate(entry.get("tg_tokens_per_s")) is not None
            and pass_of(entry) is not None):
        return entry
    return None


# Past this age a batch's summary and `cre eval` say how old the speeds are. Why hours: on
# this project's shared 2-core VM the 1.5B's generation fell from 11.4 to 8.4 tokens/s
# within a working day, and the cost share it prices moved 6 points against the clock
# (docs/results.md).
STALE_HOURS = 6.0


def last_measured(specs: Sequence[ModelSpec]) -> float | None:
    """When the oldest run behind `specs`' stored speeds was measured (seconds since the
    epoch): each stored speed is pooled from up to POOLED_RUNS runs, and the oldest of
    them still weighs in until `cre models bench --fresh` starts the pool again. None where
    a model has no figures, or no readable time."""
    times = []
    for spec in specs:
        entry = stored(spec) or {}
        runs = entry.get("runs")
        for run in runs if isinstance(runs, list) and runs else [entry]:
            try:
                times.append(paths.stamp_seconds(str(run["measured_at"])))
            except (KeyError, TypeError, ValueError):
                return None
    return min(times) if times else None


def speeds_age_hours(specs: Sequence[ModelSpec], unit: str) -> float | None:
    """Hours since the oldest run behind the speeds that price `unit` (`last_measured`):
    only "bench-seconds" are priced by them; None for other units or a model with no time.
    `cre batch` and `cre eval` both report it (`render.stale_speeds_note`)."""
    if unit != "bench-seconds":
        return None
    measured = last_measured(specs)
    return None if measured is None else max(0.0, time.time() - measured) / 3600


def speeds(specs: Sequence[ModelSpec], file: Path | None = None) -> dict[str, Rates]:
    """The rates (`Rates`) of each model that `cre models bench` measured (in `file` when
    given, see `load_all`); a pass of 0 where they were measured before passes were."""
    out: dict[str, Rates] = {}
    for spec in specs:
        entry = stored(spec, file=file)
        if entry:
            out[spec.name] = Rates(float(entry["pp_tokens_per_s"]), float(entry["tg_tokens_per_s"]), pass_of(entry) or 0.0)
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


def run(
    settings: "ModelConfig", names: Sequence[str], pp_tokens: int = PP_TOKENS, tg_tokens: int = TG_TOKENS,
    repeats: int = REPEATS, fresh: bool = False,
) -> list[Speed]:
    """Probe each named local model (once, however often it is named), measure them all in
    interleaved rounds (`measure_all`), store the figures as each model's newest run, and
    return what is stored: its pooled runs (`save`; only this run when `fresh`).

    The probe runs first in a child process, so a llama.cpp crash in native code becomes
    an error that names the cause and the fix instead of killing `cre`. If any model's
    figures are unsteady, all are measured once more, so the stored ones still come from
    the same rounds; still unsteady ones are stored with a warning, because a re-run on a
    quiet machine is the only real fix.
    """
    from crecli.console import status, warn
    from crecli.models.llama import probe
    from crecli.models.pull import naming_all_missing

    paths.writable_dir(paths.bench_file().parent)  # before minutes of measuring, not after
    # Every name looked up first, as `pull` does: a typo in the last name was said only after
    # each earlier model had been loaded in a child process. Each once (`named`): a model
    # named twice was measured twice and stored as two of the runs its speed pools.
    named = settings.named(names)
    specs = []
    for spec in named:
        if spec.backend != "llama":
            warn(f"{spec.name}: remote models are not benchmarked; set price_per_1k_tokens instead")
            continue
        status(f"Checking that llama.cpp runs {spec.name}...")
        # Every model named that a pull would mend, not only the first: the next bench
        # stopped at the next one.
        with naming_all_missing(named):
            probe(spec)
        specs.append(spec)
    if not specs:
        return []
    speeds = measure_all(specs, pp_tokens, tg_tokens, repeats, progress=status)
    unsteady = [w for s in speeds for w in s.warnings]
    if unsteady:
        status(f"Unsteady figures ({'; '.join(unsteady)}); measuring every model again")
        speeds = measure_all(specs, pp_tokens, tg_tokens, repeats, progress=status)
    for speed in speeds:
        for problem in speed.warnings:
            warn(f"{problem}. Stored anyway: re-run `cre models bench {speed.model}` on a quiet machine, "
                 "since costs are computed from these speeds")
    stored_now = [save(speed, fresh) for speed in speeds]
    # Rungs measured before passes were price by tokens alone beside these: the ladder's
    # costs would compare two rules, silently.
    older = []
    for spec in settings.ladder_specs():
        entry = stored(spec) if spec.name not in names else None
        if entry is not None and entry.get("pp_short_tokens") is None:
            older.append(spec.name)
    if older and any(s.pp_short_tokens for s in stored_now):
        warn(f"{', '.join(older)} still priced without a prompt pass (measured by an older cre); run "
             f"`cre models bench {' '.join(older)}` so every rung is priced the same way")
    return stored_now
