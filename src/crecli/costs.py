"""What an answer costs, in one unit for the whole ladder.

Three units, chosen in this order:

- "price": tokens times each model's `price_per_1k_tokens` from models.toml, when every
  model has one;
- "bench-seconds": each answer's prompt at the prompt rates and its output tokens at the
  generation speed that `cre models bench` measured, when every model has been measured.
  A prompt costs one pass over the model's weights, whatever its length, plus its tokens:
  on 2 cores the 1.5B's pass is about 0.16 s, a third of a short query's prompt, while the
  270M's is 0.02 s, so pricing prompts by tokens alone made the 1.5B look cheaper against
  the small rungs than the clock says (`bench.Rates`). It is this machine's speed, but it
  does not depend on what else was running while the answers were drawn; raw seconds do,
  and a busy machine skews one model against another;
- "seconds": the model-seconds each answer took.

In every unit a model's first vote pays for the prompt and later votes only for their output
tokens, because the prompt stays in llama.cpp's cache between votes. A remote rung's every
vote pays for its prompt: each vote is a request of its own, which a provider bills in full
and a server that keeps no cache processes in full (as its answered examples are charged in
full: `ModelSpec.keeps_examples`). In bench-seconds the
first vote does not pay for the head every prompt of that model shares (the system turn and
the start of the user turn, or a base model's few-shot preamble; `cre models bench` counts
its tokens): llama.cpp reuses it from the model's previous prompt, so in steady use it is
processed once per load. Measured seconds show the same saving.

Consecutive prompts of a cluster often start alike (a task's template: "Is the following
sentence plausible?"), and llama-cpp-python keeps its last prompt in the KV cache and
evaluates only what a new prompt does not share with it. `cre batch` answers a chunk's
prompts cluster by cluster (`CHUNK_LINES`), so in bench-seconds a prompt does not pay for
the tokens it shares at its start with the previous prompt of its cluster in its chunk
(`previous_prompts`; `TokenCounts` counts them in each model's vocabulary). The 0.5B's
recorded answers to the 1,400-query log (recorded one after another in the log's order)
took 0.66-0.91 seconds per priced second over its 13 tasks priced in full, and 0.87-0.92
with what each prompt shares with the one recorded before it free (bench/reuse_by_task.py,
bench/results/reuse-by-task.txt): templated tasks looked dearer than they run, and the
cascade, which keeps many of them off the 1.5B, reported a larger saving than the clock
(docs/results.md, "Reported cost against the clock"). A single answer (`cre ask`, `cre
serve`) is priced alone, in full. The rule models the batch's order, not each rung's: see
`previous_prompts`.

Every cost crecli reports comes from here: `Pricing.price_votes` prices a rung's votes (for the
live cascade's steps, `price_trace`, and for recorded outcomes, `CostModel.votes`, which
calibration, evaluation and the benches replay), `Pricing.prefix` a cluster's answered
examples, and `share_prefixes` is the one rule for how answers share those: a model
processes a cluster's examples once and keeps them (llama.cpp's cache, and the KV snapshots
`LlamaBackend` keeps per model), so within one run (a batch, a replayed log, a single
answer) their cost is split evenly over the answers that were shown them. `estimate_strongest`
prices what always using the strongest model would have cost. `Budget` is the knob that
trades cost against accuracy; the router file stores it, and calibration ranks settings with
`Budget.rank`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Mapping, Protocol, Sequence

from crecli.errors import ConfigError, CreError, UsageError
from crecli.models import bench

if TYPE_CHECKING:
    from crecli.config import ModelSpec
    from crecli.models.backend import Backend
    from crecli.outcomes import Outcome

CostUnit = Literal["bench-seconds", "seconds", "price"]
UNITS: tuple[CostUnit, ...] = ("bench-seconds", "seconds", "price")
BUDGET_KINDS = ("retain", "max_cost")
DEFAULT_RETAIN = 0.98
# The largest "retain": a share of the strongest model's accuracy, a little over 1 asking
# for better than it. The one bound for the CLI and the router-file loader.
MAX_RETAIN = 1.5
# Ratios are compared with this slack, so a budget met exactly is not missed by rounding.
BUDGET_EPS = 1e-9

# Typical query size for costing label-only outcomes when no model has run a single
# query yet: a short BIG-bench-style question and a one-word answer.
TYPICAL_PROMPT_TOKENS = 96
TYPICAL_OUTPUT_TOKENS = 8
# Lines `cre batch` takes and reorders together: within a chunk, each rung answers its
# prompts cluster by cluster (`batch.by_cluster`), so the prompt before one on a model is
# mostly the previous prompt of its cluster in the chunk (`previous_prompts`).
CHUNK_LINES = 64


def token_cost(
    unit: str,
    prompt_tokens: float,
    output_tokens: float,
    price_per_1k_tokens: float | None = None,
    speed: "bench.Rates | None" = None,
) -> float | None:
    """Cost of reading `prompt_tokens` and writing `output_tokens`; None if its figure is unknown.

    "price": tokens times the price. Any other unit: seconds at the benchmarked rates in
    `speed` (`bench.Rates`: a prompt's pass, then its tokens at the prompt speed, and the
    output tokens at the generation speed), which is also how a model that never ran is
    priced in measured seconds. No prompt tokens, no pass: a later vote reads its prompt
    from the cache.
    """
    if unit == "price":
        return None if price_per_1k_tokens is None else (prompt_tokens + output_tokens) * price_per_1k_tokens / 1000.0
    if speed is None:
        return None
    return speed.prompt_seconds(prompt_tokens) + output_tokens / speed.tg


def check_unit(unit: str, what: str = "cost unit", error: type[CreError] = CreError) -> str:
    """`unit` when it is one of UNITS, else `error`; the one check of a cost unit's name."""
    if unit not in UNITS:
        raise error(f"{what} {unit!r}: use one of {', '.join(UNITS)}")
    return unit


class Pricing:
    """A cost unit and what prices tokens in it: each model's price and benchmarked speeds."""

    def __init__(
        self,
        unit: str,
        prices: dict[str, float],
        speeds: "dict[str, bench.Rates] | None" = None,
        heads: dict[str, int] | None = None,
        remote: frozenset[str] = frozenset(),
    ) -> None:
        self.unit = check_unit(unit)
        self.prices = prices
        self.speeds = speeds or {}
        self.heads = heads or {}
        # Remote rungs: each vote is a request of its own (`OpenAIBackend`), which a provider
        # bills prompt and all; whether the server caches the prompt is not known.
        self.remote = remote

    def cached(self, model: str) -> int:
        """Prompt tokens of `model` that cost nothing in this unit (its cached head)."""
        return self.heads.get(model, 0) if self.unit == "bench-seconds" else 0

    @classmethod
    def for_models(cls, specs: Sequence["ModelSpec"], unit: str | None = None) -> "Pricing":
        """The ladder's unit (see the module docstring), or `unit` when given."""
        prices = {s.name: float(s.price_per_1k_tokens) for s in specs if s.price_per_1k_tokens is not None}
        speeds = bench.speeds(specs)
        heads = bench.cached_heads(specs)
        remote = frozenset(s.name for s in specs if s.backend == "openai")
        if unit is None:
            if specs and len(prices) == len(specs):
                unit = "price"
            elif specs and len(speeds) == len(specs):
                unit = "bench-seconds"
            else:
                unit = "seconds"
        return cls(unit, prices, speeds, heads, remote)

    @property
    def reuses(self) -> bool:
        """Whether a prompt's start shared with the one before it is free in this unit: only in
        bench-seconds, this machine's time (a provider bills every token it is sent;
        measured seconds already hold it)."""
        return self.unit == "bench-seconds"

    @property
    def by_tokens(self) -> bool:
        """Whether this unit prices token counts (so a model that did not run can be priced)."""
        return self.unit != "seconds"

    def tokens(self, model: str, prompt_tokens: float, output_tokens: float) -> float | None:
        """Cost of `model` reading and writing these many tokens; None in seconds, or unpriced."""
        if not self.by_tokens:
            return None
        return token_cost(self.unit, max(0.0, prompt_tokens - self.cached(model)), output_tokens,
                          self.prices.get(model), self.speeds.get(model))

    def price_votes(
        self, model: str, prompt_tokens: int, outputs: Sequence[float], seconds: Sequence[float], prefix_tokens: int = 0,
        reused_tokens: int = 0,
    ) -> list[float] | None:
        """The cost of each of a rung's votes, in order; None when `model` has no figure in
        this unit.

        "seconds": the model-seconds each vote took. Token units: vote 0 pays the prompt,
        less the cached head (`cached`), the shared examples' `prefix_tokens` (priced
        apart, `prefix`) and, in bench-seconds, the `reused_tokens` of its own text that
        the previous prompt of its cluster left in the cache (`TokenCounts`; at least one
        token is evaluated, as llama-cpp-python does for a prompt it holds whole), and its
        output tokens; later votes only their output tokens, because the prompt stays in
        the KV cache after the first vote. A `remote` rung's later votes pay the prompt
        again: each is a request of its own, billed and perhaps processed in full.
        """
        if not self.by_tokens:
            return list(seconds)
        price, speed = self.prices.get(model), self.speeds.get(model)
        if (self.unit == "price" and price is None) or (self.unit == "bench-seconds" and speed is None):
            return None
        prompt = max(0, prompt_tokens - self.cached(model) - prefix_tokens)
        if self.reuses:
            prompt -= min(max(0, reused_tokens), max(0, prompt - 1))
        each = model in self.remote
        return [token_cost(self.unit, prompt if i == 0 or each else 0, out, price, speed) or 0.0
                for i, out in enumerate(outputs)]

    def prefix(self, model: str, prefix_tokens: int) -> float:
        """What processing a cluster's answered examples (`prefix_tokens` of `model`'s prompt)
        once costs. 0 in "seconds": measured seconds already hold it, paid by whichever
        answer processed the examples."""
        if not prefix_tokens or not self.by_tokens:
            return 0.0
        return token_cost(self.unit, prefix_tokens, 0, self.prices.get(model), self.speeds.get(model)) or 0.0


def share_prefixes(visits: Sequence[tuple[str, float]]) -> list[float]:
    """Each visit's share of its answered examples' cost, for (prefix key, prefix cost) visits.

    The one rule for every run of answers (a batch, a replayed log, one answer alone): a model
    processes a cluster's examples once and keeps them, so their cost is split evenly over
    the visits in the run that share a key ("" : none). Why once per run and not once per
    chunk of a batch: `LlamaBackend` keeps each prefix's KV cells as a snapshot (16 per
    model) and restores them when the cluster comes back (tests/test_real_prefix.py).
    """
    counts = Counter(key for key, _ in visits if key)
    return [cost / counts[key] if key else 0.0 for key, cost in visits]


def mean_greedy_cost(answers: Iterable[tuple[float, bool, str, float]], default: float = 0.0) -> float:
    """The mean cost of greedy answers given as (own cost, too long, examples' key, examples'
    cost): each with its share of the answered examples it was shown, split over the answers
    that share them (`costs.share_prefixes`, as a run of answers pays them once), too-long ones
    left out (`mean_answer_cost`). The one rule of a mean greedy cost: a cluster's statistics
    (`choice.cluster_stats`) and the replay's baselines (`replay.greedy_cost`) alike, so
    choosing a cluster's model and scoring the choice price examples the same way."""
    answers = list(answers)
    shares = share_prefixes([(key, cost) for _, _, key, cost in answers])
    return mean_answer_cost(((own + share, too_long) for (own, too_long, _, _), share in zip(answers, shares)), default)


def mean_answer_cost(costs: Iterable[tuple[float, bool]], default: float = 0.0) -> float:
    """The mean of (cost, too long) pairs' costs, too-long ones left out; `default` where none
    is left. The one rule of every mean cost of answers: a cluster's (`choice.cluster_stats`),
    a greedy baseline's (`replay.greedy`), the oracle's.

    A too-long outcome is graded wrong at no cost: the model never ran (`cre ask` passes its
    rung over). That zero is no price of an answer: averaged in, it made a model that cannot
    take a cluster's long prompts look cheap there. Accuracy still counts it, wrong."""
    kept = [cost for cost, too_long in costs if not too_long]
    return sum(kept) / len(kept) if kept else default


def previous_prompts(prompts: Sequence[str], clusters: Sequence[int], chunk: int | None = CHUNK_LINES,
                     lines: Sequence[int] | None = None) -> list[str]:
    """Per prompt of a run, in the order given, the previous prompt of its cluster in its
    chunk of `chunk` input lines (None: the run is one chunk; "" for the first of a
    cluster): the prompt a model last held before it when `cre batch` answers the chunk
    cluster by cluster. What the two share at their start (`TokenCounts.shared`) is in
    llama.cpp's cache. `lines`: each prompt's
    input line (1-based), where the run's input had lines that are not among `prompts` (a
    replayed log's unlabelled or left-out rows), so chunks start where the batch's do;
    else the prompts are the lines.

    A model of the batch, not a record of it: on a rung above the first, the prompt before
    one is the previous of its cluster that escalated there, and with `--parallel` greedy
    answers are decoded in waves; both share at most what this counts."""
    out: list[str] = []
    last: dict[int, str] = {}
    current = -1
    for i, (prompt, cluster) in enumerate(zip(prompts, clusters)):
        position = lines[i] - 1 if lines is not None else i
        at = position // chunk if chunk is not None else 0
        if at != current:
            last, current = {}, at
        out.append(last.get(cluster, ""))
        last[cluster] = prompt
    return out


class TokenCounts:
    """How many tokens two prompts share at their start in a model's vocabulary: the length
    of the common prefix of their tokens (llama.cpp reuses exactly that much), each text
    tokenized as plain text by the backend `backend_of` gives (a loaded model's, or its
    vocabulary alone: `LlamaBackend` tokenizes without weights). 0 where the backend cannot
    tokenize (a remote rung's server: whether it caches is not known, so its prompts pay in
    full) or its file cannot be read. Only a text's first COMPARED characters are tokenized
    (a template is far shorter; a megabyte prompt must not cost a megabyte's tokens), and
    the last TOKENIZED texts' tokens are kept, so a run tokenizes each prompt once per model
    and a stream's memory stays bounded."""

    TOKENIZED = 512
    COMPARED = 4096

    def __init__(self, backend_of: Callable[[str], "Backend"]) -> None:
        self.backend_of = backend_of
        self._tokens: dict[tuple[str, str], tuple[int, ...] | None] = {}
        self._own: dict[str, "Backend"] = {}

    @classmethod
    def for_specs(cls, specs: Sequence["ModelSpec"]) -> "TokenCounts":
        """Counts with a backend of its own per model (`registry.backend_for`, which loads
        only the vocabulary to count); `close` them when done."""
        by_name = {spec.name: spec for spec in specs}
        counts = cls(lambda model: counts._backend(by_name[model]))
        return counts

    def _backend(self, spec: "ModelSpec") -> "Backend":
        if spec.name not in self._own:
            from crecli.models.registry import backend_for

            self._own[spec.name] = backend_for(spec)
        return self._own[spec.name]

    def close(self) -> None:
        for backend in self._own.values():
            backend.close()
        self._own.clear()

    def __enter__(self) -> "TokenCounts":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _of(self, model: str, text: str) -> tuple[int, ...] | None:
        key = (model, text[:self.COMPARED])
        if key not in self._tokens:
            try:
                tokens = self.backend_of(model).text_tokens(key[1])
            except CreError:
                tokens = None  # an estimate must not end a run; that model pays in full
            if len(self._tokens) >= self.TOKENIZED:
                del self._tokens[next(iter(self._tokens))]  # the oldest
            self._tokens[key] = None if tokens is None else tuple(tokens)
        return self._tokens[key]

    def shared(self, model: str, before: str, prompt: str) -> int:
        """The tokens `prompt` shares at its start with `before` in `model`'s vocabulary."""
        if not before or not prompt:
            return 0
        a, b = self._of(model, before), self._of(model, prompt)
        if a is None or b is None:
            return 0
        # A text cut at COMPARED characters may end in the start of a longer token: not compared.
        n, limit = 0, min(len(a) - (len(before) > self.COMPARED), len(b) - (len(prompt) > self.COMPARED))
        while n < limit and a[n] == b[n]:
            n += 1
        return n

    def per_model(self, models: Iterable[str], before: str, prompt: str) -> dict[str, int]:
        """The tokens `prompt` shares at its start with `before` in each of `models`' vocabularies, where any."""
        out: dict[str, int] = {}
        for model in models if before else ():
            n = self.shared(model, before, prompt)
            if n:
                out[model] = n
        return out

    def of_run(self, ids: Sequence[str], prompts: Sequence[str], clusters: Sequence[int], models: Sequence[str],
               chunk: int | None = CHUNK_LINES, lines: Sequence[int] | None = None) -> dict[tuple[str, str], int]:
        """Per (query id, model), the tokens the query shares with the previous prompt of its
        cluster (`previous_prompts`) in a run of these prompts in this order; absent where none."""
        before = previous_prompts(prompts, clusters, chunk, lines)
        return {(qid, model): n for qid, prompt, b in zip(ids, prompts, before)
                for model, n in self.per_model(models, b, prompt).items()}


class PricedStep(Protocol):
    """What pricing needs of a live cascade step (`escalate.Step`)."""

    model: str
    prompt_tokens: int
    output_tokens: int
    seconds: float
    prefix_tokens: int
    votes: Sequence[str]  # the votes drawn: each a request of its own on a remote rung


def prefix_key(model: str, cluster: int) -> str:
    """What identifies the answered examples a step was shown: its model and cluster."""
    return f"{model}@{cluster}"


# A step's visit to a cluster's answered examples: (prefix key, what processing them costs);
# ("", 0.0) for a step shown none. `share_prefixes` splits each key's cost over its visits.
Visit = tuple[str, float]


def step_parts(
    pricing: Pricing, cluster: int, steps: Sequence[PricedStep], reused: Mapping[str, int] | None = None
) -> tuple[float | None, list[Visit]]:
    """One answer's own cost (every step's votes, `Pricing.price_votes`; a step's output
    tokens are a sum and each output token costs the same, so one figure prices them all,
    with the prompt paid once, or once a vote drawn where each vote pays it (a remote rung);
    None where a model has no figure in the unit) and each step's visit to its examples, which the run
    the answer belongs to shares (`share_prefixes`). `reused`: per model, the tokens the
    prompt shares with the previous prompt of its cluster (`TokenCounts`), none for an
    answer priced alone."""
    total: float | None = 0.0
    visits: list[Visit] = []
    for step in steps:
        if not step.votes:
            # A rung passed over (its prompt too long, its server unavailable, its model not
            # loadable) drew no vote: it costs nothing, as the replay prices a too-long outcome
            # (`CostModel.votes`). Its seconds are a load's or a wait's, which "seconds" charged.
            visits.append(("", 0.0))
            continue
        # The later votes as output-free votes: each pays what a vote pays besides its output
        # (nothing on a local rung, its prompt again on a remote one), as the replay prices them.
        later = len(step.votes) - 1
        votes = pricing.price_votes(step.model, step.prompt_tokens, [step.output_tokens, *[0] * later],
                                    [step.seconds, *[0.0] * later], step.prefix_tokens, (reused or {}).get(step.model, 0))
        total = None if votes is None or total is None else total + sum(votes)
        if step.prefix_tokens and pricing.by_tokens:
            visits.append((prefix_key(step.model, cluster), pricing.prefix(step.model, step.prefix_tokens)))
        else:
            visits.append(("", 0.0))
    return total, visits


def price_parts(parts: Sequence[tuple[float | None, Sequence[Visit]]]) -> list[float | None]:
    """Each answer's cost in a run, from its (own cost, visits) (`step_parts`): its own cost
    and its visits' shares of their examples, `share_prefixes` over the whole run."""
    shares = iter(share_prefixes([visit for _, visits in parts for visit in visits]))
    out: list[float | None] = []
    for own, visits in parts:
        extra = sum(next(shares) for _ in visits)  # taken even for an unpriced answer: in step
        out.append(None if own is None else own + extra)
    return out


def price_steps(
    pricing: Pricing, runs: Sequence[tuple[int, Sequence[PricedStep]]], reused: Sequence[Mapping[str, int]] | None = None
) -> list[float | None]:
    """Each trace's cost in a run of traces, given as (cluster, steps), with each one's
    `reused` tokens per model (`step_parts`, then `price_parts`); None where a model has no
    figure in the unit."""
    return price_parts([step_parts(pricing, cluster, steps, reused[i] if reused else None)
                        for i, (cluster, steps) in enumerate(runs)])


class RunTotal:
    """What `price_parts` sums to over a run's counted answers, added as each answer
    finishes, in memory that grows with the (model, cluster) keys, not with the answers: `cre
    batch` reads a stream of any length and keeps no answer for its summary.

    `share_prefixes`' rule, summed: a key's cost is split evenly over every visit to it in
    the run, so the counted visits pay (their costs) / (the key's visits). An answer left
    out of the sum (`counted` False: the other side of a comparison could not price it)
    still visited its examples, so it still takes its share of them."""

    def __init__(self) -> None:
        self.own = 0.0
        self._visits: Counter[str] = Counter()
        self._counted: dict[str, float] = {}

    def add(self, own: float | None, visits: Sequence[Visit], counted: bool = True) -> None:
        counted = counted and own is not None  # an answer `price_parts` gives None is not summed
        for key, cost in visits:
            if key:
                self._visits[key] += 1
                if counted:
                    self._counted[key] = self._counted.get(key, 0.0) + cost
        if counted:
            self.own += own  # type: ignore[operator]

    @property
    def total(self) -> float:
        return self.own + sum(cost / self._visits[key] for key, cost in self._counted.items())


def estimate_strongest(
    pricing: Pricing, model: str, prompt_tokens: int | None, output_tokens: float, prefix_tokens: int = 0,
    reused_tokens: int = 0,
) -> float | None:
    """What the strongest `model`'s greedy answer to a prompt costs, its answered examples
    (`prefix_tokens` of the prompt) left out for the caller to share by `share_prefixes`,
    and its shared start's `reused_tokens` for free (`Pricing.price_votes`);
    None in "seconds" (a model that did not run took no time to measure) or when its
    prompt's tokens are unknown. The caller counts the tokens with the strongest model's own
    tokenizer and prompt format (`escalate.Cascade.strongest_tokens`), or takes them from its
    own step where it ran."""
    if prompt_tokens is None or not pricing.by_tokens:
        return None
    votes = pricing.price_votes(model, prompt_tokens, [output_tokens], [0.0], prefix_tokens, reused_tokens)
    return None if votes is None else sum(votes)


class CostModel(Pricing):
    """The cost of each vote of a recorded outcome, in one unit for the whole ladder.

    Label-only outcomes have no measured cost. They are charged the model's mean measured
    cost of a greedy answer over its recorded outcomes; a model with none is costed from its
    `cre models bench` rates (`bench.Rates`: a prompt pass, prompt and generation tokens per
    second) at typical token
    counts: the mean over all recorded outcomes of any model, or TYPICAL_PROMPT_TOKENS and
    TYPICAL_OUTPUT_TOKENS when nothing has been recorded. Price units use the same token
    counts times the price. Only the greedy vote of a label-only outcome can be costed: it
    has no other votes.
    """

    def __init__(
        self,
        unit: str,
        prices: dict[str, float],
        label_cost: dict[str, float],
        speeds: "dict[str, bench.Rates] | None" = None,
        heads: dict[str, int] | None = None,
        reused: Mapping[tuple[str, str], int] | None = None,
        remote: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(unit, prices, speeds, heads, remote)
        self.label_cost = label_cost
        # Per (query id, model), the tokens of the query's start that the previous prompt of
        # its cluster left in the cache, in the run the outcomes are replayed as
        # (`TokenCounts.of_run`); none: every prompt pays in full.
        self.reused = dict(reused or {})

    @classmethod
    def build(cls, outcomes: Iterable["Outcome"], specs: Sequence["ModelSpec"] = (), unit: str | None = None,  # type: ignore[override]
              reused: Mapping[tuple[str, str], int] | None = None) -> "CostModel":
        outcomes = list(outcomes)
        pricing = Pricing.for_models(specs, unit)
        if pricing.unit == "price":
            unpriced = sorted({o.model for o in outcomes} - set(pricing.prices))
            if unpriced:
                raise ConfigError(
                    f"cost unit 'price' needs price_per_1k_tokens for every model; missing for "
                    f"{', '.join(unpriced)}. Add it in models.toml, or use the measured seconds."
                )
        model = cls(pricing.unit, pricing.prices, {}, pricing.speeds, pricing.heads, reused, pricing.remote)
        runs = [o for o in outcomes if o.source == "run" and o.votes]
        needs = sorted({o.model for o in outcomes if o.source == "label"})
        if needs:
            typical = (
                (sum(o.prompt_tokens for o in runs) / len(runs), sum(o.votes[0].output_tokens for o in runs) / len(runs))
                if runs
                else (float(TYPICAL_PROMPT_TOKENS), float(TYPICAL_OUTPUT_TOKENS))
            )
            for name in needs:
                model.label_cost[name] = model._estimate(name, [o for o in runs if o.model == name], typical)
        return model

    def _estimate(self, name: str, runs: list["Outcome"], typical: tuple[float, float]) -> float:
        if runs:
            return sum(self.votes(o)[0] for o in runs) / len(runs)
        cost = token_cost(self.unit, max(0.0, typical[0] - self.cached(name)), typical[1],
                          self.prices.get(name), self.speeds.get(name))
        if cost is None:
            raise CreError(
                f"no cost is known for {name!r}: every outcome of it is a label and it has no "
                f"benchmark. Run `cre models bench {name}`, or let it answer some queries."
            )
        return cost

    def votes(self, outcome: "Outcome") -> list[float]:
        """Cost of each recorded vote in order (`Pricing.price_votes`: vote 0 carries the prompt);
        a label-only outcome's one "vote" costs the model's `label_cost`, a too-long one's
        nothing (the model never ran: `cre ask` passes its rung over before it does)."""
        if outcome.source == "label":
            return [self.label_cost[outcome.model]]
        if outcome.source == "too_long":
            return [0.0]
        costs = self.price_votes(outcome.model, outcome.prompt_tokens, [v.output_tokens for v in outcome.votes],
                                 [v.seconds for v in outcome.votes], outcome.prefix_tokens,
                                 self.reused.get((outcome.query_id, outcome.model), 0))
        if costs is None:
            fix = ("has no price_per_1k_tokens in models.toml" if self.unit == "price"
                   else f"has no benchmark; run `cre models bench {outcome.model}`")
            raise ConfigError(f"model {outcome.model!r} {fix}")
        return costs

    def prefix_of(self, outcome: "Outcome") -> float:
        """What processing the outcome's shared examples (`Outcome.prefix_tokens`) costs once
        (`Pricing.prefix`; 0 in "seconds", where recorded seconds already hold it, paid by the
        first prompt of its cluster that ran: outcomes are recorded grouped by examples)."""
        return self.prefix(outcome.model, outcome.prefix_tokens)

    def of(self, outcome: "Outcome", used_votes: int = 1) -> float:
        return sum(self.votes(outcome)[:used_votes])


@dataclass(frozen=True)
class Budget:
    """The one knob of calibration.

    - `Budget("retain", 0.98)`: keep quality. Each cluster starts on the cheapest model whose
      shrunk accuracy on that cluster is at least 0.98 x the strongest (top-rung) model's
      shrunk accuracy there; if none is (possible for values above 1), the most accurate one.
    - `Budget("max_cost", 0.5)`: cap cost. The most accurate assignment whose total cost stays
      within 0.5 x the cost of sending every query to the strongest model. Every cluster
      starts on its cheapest model; then, greedily, the upgrade (cluster, better model) with
      the most accuracy gained per unit of extra cost that still fits the budget is taken,
      until none fits.
    """

    kind: str = "retain"
    value: float = DEFAULT_RETAIN

    def __post_init__(self) -> None:
        import math

        if self.kind not in BUDGET_KINDS:
            raise CreError(f"unknown budget kind {self.kind!r}; use one of {', '.join(BUDGET_KINDS)}")
        option = "--retain" if self.kind == "retain" else "--max-cost"
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise UsageError(f"{option} {self.value!r}: give a finite number")
        high = MAX_RETAIN if self.kind == "retain" else 1.0
        if not 0 < self.value <= high:
            if self.kind == "retain":
                raise UsageError(f"--retain {self.value}: a share of the strongest model's accuracy, above 0 and at "
                                 f"most {MAX_RETAIN}, e.g. {DEFAULT_RETAIN}")
            raise UsageError(f"--max-cost {self.value}: a share of always using the strongest model's cost, above 0 "
                             "and at most 1")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}

    def rank(self, accuracy: float, cost: float, reference_accuracy: float, reference_cost: float) -> tuple[bool, float, float]:
        """How well a setting with this accuracy and cost meets the budget: higher is better.

        The reference is always using the strongest model, with `cost` in the same terms
        (both totals, or both means). Settings that meet the budget come first: among
        them the cheapest for "retain" (ties: the more accurate), the most accurate for
        "max_cost" (ties: the cheaper). A setting that misses it ranks by closeness: the
        more accurate for "retain", the cheaper for "max_cost". The first element is
        whether the budget is met.
        """
        if self.kind == "retain":
            met = accuracy >= self.value * reference_accuracy - BUDGET_EPS
            return (met, -cost, accuracy) if met else (met, accuracy, -cost)
        met = cost <= self.value * reference_cost + BUDGET_EPS
        return (met, accuracy, -cost) if met else (met, -cost, accuracy)
