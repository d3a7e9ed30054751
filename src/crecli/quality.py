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
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Sequence

from crecli.models.backend import GenParams

# The quality check's bounds, shared by the CLI's options and the router-file loader: k
# votes cost k generations per answer, and more than 64 is no check anyone runs; past a
# temperature of 5 samples are noise.
MAX_VOTES = 64
MAX_TEMPERATURE = 5.0

# Bump when prompt rendering, answer caps or vote seeds change: recorded votes made under
# another version are not comparable and are re-run.
PROMPT_VERSION = 2


@dataclass(frozen=True)
class QualityCheck:
    """The self-consistency check's parameters: k votes, how they are sampled, early stop."""

    k: int = 5
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    early_stop: bool = True

    def key(self) -> str:
        """Identity of the settings that change what a vote is (not the threshold)."""
        payload = {"k": self.k, "temperature": self.temperature, "top_p": self.top_p,
                   "top_k": self.top_k, "prompt_version": PROMPT_VERSION}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


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


def vote_params(quality: QualityCheck, index: int, max_tokens: int, prompt: str) -> GenParams:
    """Generation parameters of vote `index` of `prompt`: 0 is greedy, the rest sample with `vote_seed`.

    The one definition for both the live cascade (`escalate.check`) and the recorded votes
    (`outcomes.collect`): calibration tunes on exactly the votes the cascade draws.
    """
    return GenParams(
        max_tokens=max_tokens,
        temperature=0.0 if index == 0 else quality.temperature,
        top_p=quality.top_p,
        top_k=quality.top_k,
        seed=0 if index == 0 else vote_seed(prompt, index),
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
