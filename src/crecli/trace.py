"""What the live cascade did for one prompt: a `Step` per rung it checked, and the `Trace`.

Plain records, JSON-ready (`to_dict`): what `cre ask --json` prints, `cre batch` writes per
line, `cre serve` returns in its `cre` object and the served-query log keeps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Step:
    """One rung's quality check."""

    model: str
    votes: list[str]  # raw texts, in the order drawn (greedy first)
    normalized: list[str]  # what was voted on
    agreement: float  # majority share among the votes drawn
    used: int  # votes drawn before the decision was fixed
    threshold: float
    accepted: bool  # the majority reached the threshold
    answer: str  # raw text (stripped) of the first vote that gave the majority
    prompt_tokens: int  # the prompt is processed once per model, so counted once
    output_tokens: int  # of every vote drawn
    greedy_output_tokens: int  # of the greedy vote alone: an answer without the check
    seconds: float
    why: str  # why the cascade stopped here or moved on
    p_correct: float | None = None  # the deferral model's estimate (routers calibrated with it)
    # Of prompt_tokens, the cluster's answered examples (`Backend.shot_tokens`): every prompt
    # of the cluster on this model shares them, so a batch processes them once.
    prefix_tokens: int = 0
    # The kept answer's generation stopped at its token cap or the context window
    # (finish_reason "length"): `cre serve` tells its client so, as OpenAI's API does.
    cut: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Trace:
    """Everything the cascade did for one prompt; `to_dict()` is JSON-ready."""

    id: str | None
    cluster: int
    distance: float
    route_reason: str
    route_seconds: float
    answer_type: str | None
    start_model: str
    familiar: bool = True  # `RouteDecision.familiar`: the router's log had queries like this prompt
    steps: list[Step] = field(default_factory=list)
    answer: str = ""
    model: str = ""
    agreement: float = 0.0
    p_correct: float | None = None  # of the answering rung, when the router has a deferral model
    escalations: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0  # routing plus generation; model loading is not counted
    correct: bool | None = None  # only when a reference was given
    cut: bool = False  # the answer ran out of room (`Step.cut` of the answering rung)
    # What answering cost, priced once when the answer is final (`costs.price_steps`: every
    # rung's votes, and its examples in full, as an answer alone pays them), in `cost_unit`;
    # None when a model has no figure in the unit.
    cost: float | None = None
    cost_unit: str = ""

    @property
    def fallback(self) -> bool:
        return self.cluster < 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["fallback"] = self.fallback
        return data
