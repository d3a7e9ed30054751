"""Labelled logs prepared for replay (`replay.Data`) without models, embedding or routing:
calibration's sweeps on synthetic outcomes, with copies of prompts and label-only rows."""

from __future__ import annotations

import random
from typing import Mapping, Sequence

from crecli.costs import CostModel
from crecli.models.backend import Signals
from crecli.outcomes import Outcome, Vote
from crecli.querylog import Record
from crecli.replay import Data, Replay
from crecli.route import RouteDecision


def synthetic_data(
    n: int,
    accuracy: Mapping[str, Sequence[float]],
    copies: int = 1,
    seed: int = 0,
    k: int = 1,
    labelled: Sequence[str] = (),
) -> Data:
    """`n` prompts, prompt j in cluster j % C (C: the length of each model's `accuracy`,
    its chance of being right per cluster), each logged `copies` times under its own id
    (q0, q1, ...: the whole log once, then again). A copy shares its prompt's recorded
    answers, as the outcome store's keying by prompt gives them; its greedy vote carries
    log-probabilities that lean toward its correctness, and its k - 1 sampled votes mostly
    agree with it. The ladder is `accuracy`'s models, cheapest first (greedy answer i costs
    1 + 2i). The `labelled` models' outcomes are correctness labels instead (`Record.labels`,
    beside the reference), which a label costs alike.
    """
    rng = random.Random(seed)
    ladder = list(accuracy)
    n_clusters = len(accuracy[ladder[0]])
    cost = {m: 1.0 + 2 * i for i, m in enumerate(ladder)}
    prompts = []
    for j in range(n):
        right = {m: rng.random() < accuracy[m][j % n_clusters] for m in ladder}
        confidence = {m: rng.gauss(-0.5 if right[m] else -2.0, 1.0) for m in ladder}
        votes = {m: [Vote("1" if right[m] else "2", 5, cost[m], Signals(confidence[m], confidence[m], None))]
                 + [Vote(("1" if right[m] else "2") if rng.random() < 0.8 else "3", 5, 0.1) for _ in range(k - 1)]
                 for m in ladder}
        prompts.append((f"prompt {j}", j % n_clusters, right, votes))
    records, routes, outcomes = [], [], {}
    for copy in range(copies):
        for j, (prompt, cluster, right, votes) in enumerate(prompts):
            rid = f"q{copy * n + j}"
            records.append(Record(id=rid, prompt=prompt, reference=["1"], match="numeric",
                                  labels={m: right[m] for m in labelled}))
            routes.append(RouteDecision(cluster, ladder[-1], 0.0, "", 0.0, True))
            for m in ladder:
                outcomes[(rid, m)] = (Outcome(rid, "sha", m, "m", "label", "label", 0, [], right[m]) if m in labelled
                                      else Outcome(rid, "sha", m, "m", "key", "run", 10, votes[m]))
    costs = CostModel("seconds", {}, cost)
    return Data(records, routes, outcomes, costs, Replay.build(outcomes, records, ladder, costs), "", [1.0] * len(records))
