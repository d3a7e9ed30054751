"""Routing a prompt to its cluster's starting model, or to the fallback when it is far from all."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Sequence

import pytest

from crecli.route import RouteDecision, route, route_many
from crecli.routerfile import RouterFile
from support.routers import FAR, make_router


@pytest.fixture(scope="module")
def router() -> RouterFile:
    return make_router(starts=("small", "medium", "large"))


@pytest.mark.parametrize(
    ("prompt", "cluster", "model"),
    [
        ("What is 41 plus 17?", 0, "small"),  # not in the log: assigned by its neighbours
        ("What is the capital city of Brazil?", 1, "medium"),
        ("Which of these is a cat? (A) stone (B) cat-like thing (C) chair", 2, "large"),
    ],
)
def test_prompts_start_on_their_clusters_model(router: RouterFile, prompt: str, cluster: int, model: str) -> None:
    decision = route(router, prompt)
    assert (decision.cluster, decision.model) == (cluster, model)
    assert decision.reason.startswith(f"cluster {cluster} (10 queries, e.g. ")
    assert decision.reason.endswith(f"starts on {model}")
    assert -1e-6 <= decision.distance < router.assigner.threshold_
    assert decision.seconds > 0
    assert decision.familiar


def test_a_prompt_far_from_every_cluster_goes_to_the_fallback(router: RouterFile) -> None:
    decision = route(replace(router, fallback_model="medium"), FAR)
    assert (decision.cluster, decision.model) == (-1, "medium")
    assert decision.distance > router.assigner.threshold_
    assert decision.reason == f"far from every cluster (distance {decision.distance:.3f}): fallback to medium"
    assert not decision.familiar


def test_a_prompt_beyond_its_clusters_reach_starts_on_the_fallback(router: RouterFile) -> None:
    """In cluster 1 by its neighbours, but farther from them than any capitals question sits
    from another: the cluster's record (medium is adequate) says nothing about it."""
    reach = router.assigner.reach(1)
    assert reach is not None and 0 < reach < router.assigner.threshold_
    near, beyond = route(router, "What is the river of the city?"), route(router, "Which river runs through the capital?")
    assert near.cluster == beyond.cluster == 1
    assert near.distance <= reach < beyond.distance < router.assigner.threshold_
    assert near.model == "medium" and beyond.model == "large"
    assert near.familiar and not beyond.familiar
    assert f"farther than any of them sits from the others ({reach:.3f})" in beyond.reason
    assert beyond.reason.endswith("starts on large")


class _FixedAssigner:
    """Puts every prompt in one cluster, at distance 0.1."""

    def __init__(self, label: int) -> None:
        self.label = label

    def predict(self, X: Sequence[Sequence[float]]) -> tuple[list[int], list[float]]:
        return [self.label] * len(X), [0.1] * len(X)

    def reach(self, label: int) -> float | None:
        return None  # as `Assigner.reach` for a cluster it does not know


def test_a_cluster_the_router_does_not_know_goes_to_the_fallback(router: RouterFile) -> None:
    decision = route(replace(router, assigner=_FixedAssigner(7)), "What is 1 plus 1?")
    assert (decision.cluster, decision.model) == (-1, "large")
    assert decision.reason == "cluster 7 is not in the router file: fallback to large"


def test_decision_is_json_ready(router: RouterFile) -> None:
    decision = route(router, "What is 2 plus 2?")
    data = json.loads(json.dumps(decision.to_dict()))
    assert set(data) == {"cluster", "model", "distance", "reason", "seconds", "familiar"}
    assert RouteDecision(**data) == decision


def test_routing_many_prompts_at_once_decides_as_one_at_a_time(router: RouterFile) -> None:
    prompts = ["What is 41 plus 17?", FAR, "What is the capital city of Brazil?", "What is 2 plus 2?"]
    together = route_many(router, prompts)
    alone = [route(router, p) for p in prompts]
    assert [(d.cluster, d.model, d.reason) for d in together] == [(d.cluster, d.model, d.reason) for d in alone]
    assert [d.distance for d in together] == pytest.approx([d.distance for d in alone], abs=1e-6)
    assert len({d.seconds for d in together}) == 1  # an equal share of one call
    assert route_many(router, []) == []


def test_routing_seconds_leave_out_the_embedders_model_load(router: RouterFile) -> None:
    # A llama.cpp embedder loads its model inside its first transform: `cre ask --explain`
    # counted the load as routing ("routing 40%").
    import time

    class LoadsOnFirstUse:
        kind = "llama"

        def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
            self.inner, self.load_seconds = inner, 0.0

        def transform(self, texts):  # type: ignore[no-untyped-def]
            if not self.load_seconds:
                time.sleep(0.3)
                self.load_seconds = 0.3
            return self.inner.transform(texts)

    slow = replace(router, embedder=LoadsOnFirstUse(router.embedder))
    assert route(slow, "What is 2 plus 2?").seconds < 0.15
    assert route_many(slow, ["What is 2 plus 2?", "What is 3 plus 4?"])[0].seconds < 0.15
