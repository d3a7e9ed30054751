"""The self-consistency quality check: sample k answers, vote, measure agreement.

The decision rule is a pure function of the ordered, normalised votes, so the same code
decides online (in the cascade, sampling lazily) and offline (calibration and evaluation
replay recorded votes). Vote 0 is the greedy answer; votes 1..k-1 are samples at
`temperature` with seeds from `vote_seed(prompt, i)`.

Early stopping: with `need = ceil(threshold * k)` votes required for the majority, we stop
as soon as the leading answer has `need` votes (accept) or can no longer reach it
(escalate). Agreement is the leading answer's share of the votes actually drawn. With
thresholds at or below one half, early stopping accepts the first answer to reach `need`,
so the procedure, not just the final tally, defines the decision; calibration replays the
same procedure, so what it measures is what runs.

An empty normalised answer (a model that only started explaining, or gave no option
letter) is a vote for nothing: k empty answers agree perfectly but are never accepted.
Nor does it fix a decision that needs one vote (0 < threshold <= 1/k): the votes after it
decide. So the first vote is the answer whatever it says only where `first_vote_decides`,
the one rule for streaming a top rung's greedy answer as it is generated.

The calibrated alternative (`Deferral`, a router fitted with `cre calibrate --check
deferral`): each rung's greedy answer gets P(correct) from a logistic regression on signals
the greedy pass gives for free (`deferral_features`), optionally with the agreement of a
fixed number of votes, and is kept when P(correct) reaches the rung's threshold and the
answer is not empty (`accept_deferral`). The answer is always the greedy one.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

from crecli.models.backend import DEFAULT_TOP_K, DEFAULT_TOP_P, GenParams

if TYPE_CHECKING:
    from crecli.models.backend import Signals
    from crecli.models.prompting import Shot

# The quality check's bounds, shared by the CLI's options and the router-file loader: k
# votes cost k generations per answer, and more than 64 is no check anyone runs; past a
# temperature of 5 samples are noise.
MAX_VOTES = 64
MAX_TEMPERATURE = 5.0

# The two quality checks `cre calibrate --check` chooses between. "deferral" is the default:
# it keeps the greedy answer (one generation a rung, 0.99x its cost in bench/quality_check.py)
# and predicted right answers better than five votes' agreement (docs/calibration.md).
CHECKS = ("agreement", "deferral")
DEFAULT_CHECK = "deferral"
# Votes `cre fit` records per model and query: the greedy answer alone, which is all the
# default deferral check draws; more only feed the agreement check and cost k times the
# model time of the fit.
DEFAULT_FIT_VOTES = 1

# Bump when prompt rendering, answer caps or vote seeds change: recorded votes made under
# another version are not comparable and are re-run.
PROMPT_VERSION = 2


@dataclass(frozen=True)
class QualityCheck:
    """The self-consistency check's parameters: k votes, how they are sampled, early stop."""

    k: int = 5
    temperature: float = 0.7
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    early_stop: bool = True

    def key(self) -> str:
        """Identity of the settings that change what a vote is (not the threshold)."""
        payload = {"k": self.k, "temperature": self.temperature, "top_p": self.top_p,
                   "top_k": self.top_k, "prompt_version": PROMPT_VERSION}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# The agreement check's thresholds: its default and the grid calibration sweeps.
# Agreement needed below the top rung: 3 of 5 votes.
DEFAULT_THRESHOLD = 0.6


def default_thresholds(ladder: Sequence[str]) -> dict[str, float]:
    """0.6 (3 of 5 votes agree) below the top; 0 on the top rung.

    The top rung's answer is final whatever its agreement, so its threshold only sets how
    many votes it draws for its majority; 0 means its greedy answer alone, the cheapest.
    """
    return {name: (0.0 if i == len(ladder) - 1 else DEFAULT_THRESHOLD) for i, name in enumerate(ladder)}



def threshold_grid(k: int) -> list[float]:
    """Thresholds j/k, j = 0..k: one per distinct number of agreeing votes required."""
    return [j / k for j in range(k + 1)]


@dataclass(frozen=True)
class Decision:
    answer: str  # the normalised majority answer
    index: int  # index of the first vote that gave it (to recover the raw text)
    agreement: float  # majority share among the votes used
    used: int  # votes drawn before the decision was fixed
    accept: bool  # whether the majority reached the threshold


def vote_seed(prompt: str, index: int) -> int:
    """The sampling seed of vote `index` (>= 1) for `prompt`.

    Derived from the prompt, not just the index: with fixed seeds 1..k-1, vote i draws the
    same random numbers for every query, so a seed whose first draw lands in the tail makes
    vote i wrong everywhere at once (seen on qwen-0.5b: seed 1 answered "17" to 3 + 4 at
    temperature 0.3). Hashing keeps votes reproducible, so calibration's recorded votes are
    the ones `cre ask` draws, and independent across queries.
    """
    digest = hashlib.sha256(f"{index}\0{prompt.strip()}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def vote_params(
    quality: QualityCheck, index: int, max_tokens: int, prompt: str, shots: Sequence["Shot"] = (),
    option_letters: str = "",
) -> GenParams:
    """Generation parameters of vote `index` of `prompt`: 0 is greedy, the rest sample with `vote_seed`.

    `shots` are the answered examples the prompt is shown after (its cluster's, for this
    model); `option_letters` the letters at which the greedy vote ends
    (`grading.option_letters`; a sampled vote writes on). The one definition for both the
    live cascade (`escalate.check`) and the recorded votes (`outcomes.collect`): calibration
    tunes on exactly the votes the cascade draws.
    """
    return GenParams(
        max_tokens=max_tokens,
        temperature=0.0 if index == 0 else quality.temperature,
        top_p=quality.top_p,
        top_k=quality.top_k,
        seed=0 if index == 0 else vote_seed(prompt, index),
        shots=tuple((str(q), str(a)) for q, a in shots),
        option_letters=option_letters if index == 0 else "",
    )


def needed(threshold: float, k: int) -> int:
    # The epsilon keeps thresholds like 0.6 * 5 = 3.0000000000000004 from needing 4 votes.
    return max(0, math.ceil(threshold * k - 1e-9))


def decide(votes: Sequence[str], k: int, threshold: float, early_stop: bool = True) -> Decision:
    """Decide on the first `used` of `votes` (normalised answers, greedy first).

    `votes` may hold fewer than k entries only when the caller draws lazily and asks again
    with one more vote; see `done`.
    """
    if not votes:
        raise ValueError("decide() needs at least one vote")
    need = needed(threshold, k)
    counts: Counter[str] = Counter()
    first: dict[str, int] = {}
    used = 0
    for i, vote in enumerate(votes[:k]):
        counts[vote] += 1
        first.setdefault(vote, i)
        used = i + 1
        if early_stop and _fixed(counts, need, k - used):
            break
    # Empty answers never win while any real answer exists; ties go to the answer seen
    # first, which makes the greedy answer win ties.
    real = [a for a in counts if a != ""] or [""]
    top = max(real, key=lambda a: (counts[a], -first[a]))
    return Decision(
        answer=top,
        index=first[top],
        agreement=counts[top] / used,
        used=used,
        accept=top != "" and counts[top] >= need,
    )


def _fixed(counts: Counter[str], need: int, remaining: int) -> bool:
    top = max((n for a, n in counts.items() if a != ""), default=0)
    return top >= need or top + remaining < need


def done(votes: Sequence[str], k: int, threshold: float, early_stop: bool = True) -> bool:
    """Whether drawing another vote could change the decision."""
    if len(votes) >= k:
        return True
    if not early_stop or not votes:
        return False
    return _fixed(Counter(votes), needed(threshold, k), k - len(votes))


def first_vote_decides(k: int, threshold: float, early_stop: bool = True) -> bool:
    """Whether `decide`'s answer is the first vote whatever that vote says: `done` after it,
    empty or not. Only then is the greedy answer known to be final while it is generated
    (`ladder.streams_final`).

    Not whenever one vote can meet the threshold: at `needed` 1 of k > 1 an empty greedy
    answer does not, and later votes decide; without early stopping all k are drawn and
    the majority may outvote it. `_fixed` tells votes apart only by being empty, so "" and
    one non-empty answer stand for every first vote.
    """
    return all(done([vote], k, threshold, early_stop) for vote in ("", "answer"))


def wave(votes: Sequence[str], k: int, threshold: float, early_stop: bool = True) -> int:
    """How many more votes can be drawn at once without drawing one that `done` would skip.

    No decision can be fixed before this many more votes are in, whatever they say: the
    leading answer needs `needed - top` more to be accepted, and rejection needs the
    remaining votes to be too few for it. Drawing a wave together (as parallel sequences)
    thus uses exactly the votes that drawing one at a time would. 0 once `done`.
    """
    remaining = k - len(votes)
    if remaining <= 0 or done(votes, k, threshold, early_stop):
        return 0
    if not early_stop or not votes:
        return remaining
    need = needed(threshold, k)
    top = max((n for a, n in Counter(votes).items() if a != ""), default=0)
    return max(1, min(need - top, remaining + top - need + 1, remaining))


# ---------------------------------------------------------------- the calibrated deferral rule

# Inputs of a rung's deferral model, in order. All come free with the greedy answer:
# its weakest and mean token log-probability, the option-letter margin (choice answers),
# whether the answer is empty or was cut short (`was_cut`), and the logit of the cluster's
# shrunk accuracy for this model (its prior). "agreement", the share of the rung's votes
# that agree with the greedy answer, is added only when the router draws votes.
SIGNAL_FEATURES = ("min_logprob", "mean_logprob", "margin", "empty_or_cut", "prior")
# Of those, the ones read from the greedy pass's log-probabilities (`Signals`), which a
# runtime may not give (a server that returns no log-probabilities).
LOGPROB_FEATURES = ("min_logprob", "mean_logprob", "margin")
VOTE_FEATURE = "agreement"
# Log-probabilities below this carry no more information and would let one odd token
# dominate a linear model; priors are kept off 0 and 1 for the same reason.
LOGPROB_FLOOR = -20.0
PRIOR_CLIP = 0.02


def feature_names(votes: int) -> tuple[str, ...]:
    return SIGNAL_FEATURES + ((VOTE_FEATURE,) if votes > 1 else ())


def _logprob(value: float) -> float | None:
    """A log-probability as a feature: floored at LOGPROB_FLOOR (-inf, a token the model gave
    no chance, included), None where it is NaN, which is no reading at all (max(-20, nan)
    gave -20, the lowest confidence there is)."""
    return None if math.isnan(value) else max(LOGPROB_FLOOR, value)


def prior_logit(prior: float) -> float:
    """The deferral model's "prior" feature: the logit of an accuracy kept PRIOR_CLIP off 0 and 1."""
    p = min(1 - PRIOR_CLIP, max(PRIOR_CLIP, prior))
    return math.log(p / (1 - p))


def greedy_agreement(answers: Sequence[str]) -> float:
    """The share of the normalised votes `answers` (greedy first) that agree with the greedy one."""
    return sum(a == answers[0] for a in answers) / len(answers)


def was_cut(output_tokens: int, max_tokens: int, prompt_tokens: int = 0, context: int | None = None) -> bool:
    """Whether an answer of `output_tokens` stopped because it ran out of room, not because it
    was done: it reached its token cap `max_tokens`, or with its `prompt_tokens` it filled the
    model's `context` window (the in-process runtime stops it there, below the cap, after a
    long prompt: `ModelSpec.context_window`). `context` None or 0 (a remote rung, whose
    server's window is unknown) leaves the cap alone to tell.

    Token counts, not the runtime's finish reason: recorded votes keep the counts, so the
    live check (`live.LiveVotes`) and the replay (`replay.Replay.build`) decide alike from
    the same inputs.
    """
    if output_tokens >= max_tokens:
        return True
    return context is not None and context > 0 and prompt_tokens + output_tokens >= context


def deferral_features(
    signals: "Signals | None",
    answers: Sequence[str],
    cut: bool,
    prior: float,
) -> list[float | None]:
    """The deferral model's inputs for one rung, in `feature_names(len(answers))` order.

    `answers` are the normalised votes drawn, greedy first; `cut` says the greedy answer
    ran out of room (`was_cut`: its token cap or the context window). A missing signal (a
    runtime that does not report one, or a margin where no option letter was chosen) is
    None; the model fills it in. The one definition for the live check (`escalate.check`)
    and calibration's replay.
    """
    greedy = answers[0] if answers else ""
    lo = mean = margin = None
    if signals is not None:
        lo, mean = _logprob(signals.min_logprob), _logprob(signals.mean_logprob)
        # A NaN margin (NaN logits) made P(correct) NaN, below every threshold: missing instead.
        margin = signals.margin if signals.margin is not None and math.isfinite(signals.margin) else None
    values: list[float | None] = [lo, mean, margin, 1.0 if (greedy == "" or cut) else 0.0, prior_logit(prior)]
    if len(answers) > 1:
        values.append(greedy_agreement(answers))
    return values


@dataclass(frozen=True)
class Deferral:
    """One rung's P(correct) model: a logistic regression on `deferral_features`.

    Plain numbers, so a router file carries it without executing anything: `weights`
    pair with `features`, and `fill` is each feature's training mean, used where a value
    is missing. `prior` is the model's accuracy over the fit's log, the prior for a prompt
    that lands in no cluster.
    """

    features: tuple[str, ...]
    weights: tuple[float, ...]
    bias: float
    fill: tuple[float, ...]
    prior: float

    @property
    def uses_signals(self) -> bool:
        """Whether the model weighs the greedy pass's log-probabilities (`LOGPROB_FEATURES`):
        an answer that came without them cannot be judged by it (`judge_deferral`). A model
        fitted on answers that never had them weighs them 0."""
        return any(w != 0.0 for name, w in zip(self.features, self.weights) if name in LOGPROB_FEATURES)

    def logit(self, values: Sequence[float | None]) -> float:
        """The log-odds of a right answer for `values` (`deferral_features`), a missing one
        (None) read as its training mean."""
        if len(values) != len(self.weights):
            raise ValueError(f"the deferral model takes {len(self.weights)} features, got {len(values)}")
        return self.bias + sum(w * (f if v is None else v) for w, v, f in zip(self.weights, values, self.fill))

    def p_correct(self, values: Sequence[float | None]) -> float:
        z = self.logit(values)
        # A numerically safe logistic: exp of a large positive z would overflow.
        return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))

    def to_dict(self) -> dict[str, object]:
        return {"features": list(self.features), "weights": list(self.weights), "bias": self.bias,
                "fill": list(self.fill), "prior": self.prior}


def judge_deferral(
    rule: Deferral, signals: "Signals | None", answers: Sequence[str], cut: bool, prior: float
) -> float | None:
    """A rung's P(correct) for its greedy answer under `rule`, or None when `rule` weighs
    log-probabilities and the answer came without any (a server that returns none).

    None sends the rung to the agreement check (`ladder.checking`): filling the missing signals
    with their training means would judge every such answer alike, a blind check. The one
    definition for the live check (`live.LiveVotes`) and calibration's replay (`deferral.deferral_p`).
    """
    if signals is None and rule.uses_signals:
        return None
    return rule.p_correct(deferral_features(signals, answers, cut, prior))


def trust(distance: float | None, radius: float | None, far: float) -> float:
    """How much a cluster's record speaks for a prompt `distance` from its nearest exemplar.

    1 within the cluster's `radius` (`assign.RADIUS_QUANTILE` of its members' distances to
    their nearest other exemplar), falling
    linearly to 0 at `far`, the distance past which a prompt joins no cluster. A prompt
    unlike any query of its cluster (a task the log never had) then gets the model's
    log-wide prior instead of the cluster's (`blend_prior`). 1 when either is unknown.
    """
    if distance is None or radius is None or distance <= radius:
        return 1.0
    if far <= radius or distance >= far:
        return 0.0
    return (far - distance) / (far - radius)


def blend_prior(cluster: float, overall: float, weight: float) -> float:
    """The deferral prior: the cluster's shrunk accuracy, trusted by `weight` (`trust`), else the log-wide one."""
    return weight * cluster + (1.0 - weight) * overall


def blend_priors(cluster: Mapping[str, float], overall: Mapping[str, float], weight: float) -> dict[str, float]:
    """Each model's deferral prior for one prompt: its `cluster` accuracy blended with its
    `overall` one (`blend_prior`) by `weight`, how far the cluster's record speaks for the
    prompt (`trust`); `overall` alone for a model the cluster has no record of."""
    return {m: blend_prior(cluster[m], o, weight) if m in cluster else o for m, o in overall.items()}


def accept_deferral(p_correct: float, threshold: float, greedy: str) -> bool:
    """The deferral rule: keep the rung's greedy answer when P(correct) reaches the
    threshold, and never when the normalised greedy answer `greedy` is empty.

    An empty answer is graded wrong whatever its P(correct), and the agreement check never
    accepts one either; without this, threshold 0 (which calibration picks in most folds)
    kept empty answers that the next rung could have answered.
    """
    return greedy != "" and p_correct >= threshold


@dataclass(frozen=True)
class DeferralCheck:
    """A router's calibrated check: `votes` votes a rung (1: the greedy answer alone) and
    one `Deferral` per ladder model below the top, whose answer is always final.

    `agreement` names the rungs below the top that run the agreement check instead (k votes,
    the router's agreement threshold for them): their runtime gives no log-probabilities (a
    server that returns none), so a deferral model would have nothing to read but the prior."""

    votes: int
    models: dict[str, Deferral]
    agreement: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        # Written only when there is one, so routers without such rungs keep their bytes.
        return {"votes": self.votes, "models": {m: d.to_dict() for m, d in self.models.items()},
                **({"agreement": list(self.agreement)} if self.agreement else {})}
