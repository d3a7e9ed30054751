"""Routing: which cluster a new prompt belongs to, and so which model answers it first.

A prompt is embedded with the router file's own embedder and assigned to the nearest
cluster by the router's assigner (k-nearest exemplars in embedding space; no UMAP at route
time). Routing must stay cheap next to generation (under 5% of an answer's time), so the
seconds it takes are measured and reported with every decision.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from crecli.routerfile import RouterFile


@dataclass(frozen=True)
class RouteDecision:
    cluster: int  # -1: far from every cluster, or a cluster the router has no entry for
    model: str  # the rung the cascade starts on
    distance: float  # to the assigned cluster's exemplars, in the embedder's space
    reason: str
    seconds: float
    # Whether the prompt is like the labelled queries of its cluster (in a cluster, and
    # within its reach): only then does the router's record speak for its starting model.
    familiar: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def route(router: "RouterFile", prompt: str) -> RouteDecision:
    """Choose the starting model for `prompt`.

    A prompt in a known cluster starts on that cluster's calibrated model: the cheapest one
    whose recorded accuracy met the router's budget. A prompt the assigner puts in no
    cluster (-1: farther from every cluster than the distances seen at fit time), or one
    beyond its cluster's reach (farther from the cluster's exemplars than any member sits
    from its nearest other exemplar: `Assigner.reach_`), starts on `router.fallback_model`,
    which `cre fit` sets to the strongest model, so prompts unlike anything in the query log,
    or unlike every query of the cluster they land in, never get a weak model's answer on
    that cluster's record.
    """
    return route_many(router, [prompt])[0]


def route_many(router: "RouterFile", prompts: Sequence[str]) -> list[RouteDecision]:
    """`route` for many prompts with one embedder and assigner call.

    Most of an embedder call is fixed overhead (the vectorisers' setup), so routing a batch
    together costs a fraction of routing its prompts one by one (README "Cluster" has the
    measured figures). Each decision's `seconds` is an equal share of the whole call, less
    any model load the embedder did in it (a llama.cpp embedder loads its model on first
    use: `cre ask --explain` read "routing 40%").
    """
    if not prompts:
        return []
    embedder = router.embedder
    loaded = embedder.load_seconds
    start = time.perf_counter()
    vectors = embedder.transform(list(prompts))
    return route_vectors(router, vectors, start + (embedder.load_seconds - loaded))


def route_vectors(router: "RouterFile", vectors: Any, start: float | None = None) -> list[RouteDecision]:
    """Decisions for prompts already embedded with `router.embedder`.

    `start` (a `time.perf_counter()` reading) is when routing began, so embedding can be
    counted in each decision's `seconds`; by default only the assignment is.
    """
    start = time.perf_counter() if start is None else start
    assigner = router.assigner
    labels, distances = assigner.predict(vectors)
    decided = []
    for cid, distance in zip(labels, distances):
        decided.append(_decide(router, int(cid), float(distance), assigner.reach(int(cid)) if cid >= 0 else None))
    share = (time.perf_counter() - start) / max(1, len(decided))
    return [RouteDecision(cluster=c, model=m, distance=d, reason=r, seconds=share, familiar=f) for c, m, d, r, f in decided]


def _decide(router: "RouterFile", cid: int, distance: float, reach: float | None) -> tuple[int, str, float, str, bool]:
    """The decision for a prompt the assigner put in cluster `cid` (-1: none), `distance`
    from its exemplars; `reach` is the cluster's (`Assigner.reach`), None where it has none."""
    info = router.cluster(cid) if cid >= 0 else None
    if info is None:
        why = (
            f"far from every cluster (distance {distance:.3f})"
            if cid < 0
            else f"cluster {cid} is not in the router file"
        )
        return -1, router.fallback_model, distance, f"{why}: fallback to {router.fallback_model}", False
    examples = f", e.g. {info.examples[0][:60]!r}" if info.examples else ""
    beyond = reach is not None and distance > reach
    if beyond and info.model != router.fallback_model:
        return cid, router.fallback_model, distance, (
            f"cluster {cid} ({info.size} queries{examples}), but {distance:.3f} from its queries, farther than any of "
            f"them sits from the others ({reach:.3f}): its record does not vouch for {info.model}; "
            f"starts on {router.fallback_model}"), False
    return cid, info.model, distance, f"cluster {cid} ({info.size} queries{examples}) starts on {info.model}", not beyond
