"""Fitting the deferral check: one logistic P(correct) model per rung, and how well it ranks answers.

`train_deferral` fits a rung's model on recorded greedy answers (their signals, the
cluster prior and, with more votes, their agreement: `quality.deferral_features`);
`deferral_p` applies a router's models to recorded answers, as the live check does, for
the replay; `signal_report` scores every signal held out (AUROC). The rule that uses a
model's P(correct) is `quality.accept_deferral`, shared with the live cascade.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Hashable, Mapping, Sequence

from crecli.choice import StatsTable, cluster_prior, shrink
from crecli.quality import Deferral, blend_prior, feature_names, greedy_agreement, judge_deferral

if TYPE_CHECKING:
    from crecli.outcomes import OutcomeKey
    from crecli.replay import Data, _Entry


# Ridge penalty on the standardised weights: with a few hundred labelled answers per rung
# it barely moves a weight the data supports, and keeps a feature that is constant in the
# training folds (the margin on a log without choice queries) at zero.
L2 = 1.0


def fit_logistic(x: Any, y: Any, l2: float = L2, iterations: int = 50) -> tuple[Any, float]:
    """Ridge logistic regression by Newton's method; weights and bias on the raw features.

    Features are standardised for the fit (so one penalty suits every scale) and the
    weights mapped back, so the stored model is a plain dot product. The bias gets a
    token penalty, which keeps it finite when every training answer was right (or wrong).
    """
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = x.shape
    mu = x.mean(axis=0) if n else np.zeros(d)
    sd = x.std(axis=0) if n else np.ones(d)
    sd[sd < 1e-9] = 1.0
    a = np.hstack([(x - mu) / sd, np.ones((n, 1))])
    reg = np.full(d + 1, l2)
    reg[-1] = 1e-3
    beta = np.zeros(d + 1)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ beta, -30, 30)))
        grad = a.T @ (p - y) + reg * beta
        hess = a.T @ (a * (p * (1 - p))[:, None]) + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    weights = beta[:d] / sd
    return weights, float(beta[d] - np.sum(beta[:d] * mu / sd))


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve of `scores` for predicting `labels` (ties count half);
    None when either class is absent."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    ranked = sorted((s, y) for s, y in zip(scores, labels))
    # Mann-Whitney U from average ranks.
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        mean_rank = (i + j + 1) / 2
        rank_sum += mean_rank * sum(1 for _, y in ranked[i:j] if y)
        i = j
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def _blended(data: Data, table: StatsTable, i: int, model: str, cluster: float) -> float:
    """Record i's `cluster` prior for `model` blended with the model's log-wide accuracy by
    how far its cluster's record speaks for it (`Data.trust`), as the router's `priors`
    blend them live: the P(correct) model is trained (`train_deferral`) and applied
    (`_table_prior`) on the same prior."""
    weight = data.trust[i] if data.trust else 1.0
    return blend_prior(cluster, table.overall.models[model].accuracy, weight)


def _table_prior(data: Data, table: StatsTable) -> Callable[[int, str], float]:
    """`deferral_p`'s prior for calibration: record i's cluster prior for a model in
    `table`, blended by distance (`_blended`)."""
    return lambda i, model: _blended(data, table, i, model, cluster_prior(table, data.clusters[i], model))


def _loo_prior(table: StatsTable, cid: int, model: str, correct: float, count: int = 1) -> float:
    """The cluster prior of a training answer with its prompt's `count` answers in the
    cluster (`correct` of them right) left out.

    A training answer's own label must not feed its prior, or the fitted model would trust
    the prior more than it deserves on prompts it has not seen; nor may its copies' labels
    (the same prompt under other ids, answered alike: `_copies`)."""
    info = table.clusters.get(cid) if cid >= 0 else None
    if info is None:
        return table.overall.models[model].accuracy
    st = info.models[model]
    return shrink(st.correct - correct, st.n - count, table.overall.models[model].accuracy, table.strength(model))


def _copies(data: Data, found: Sequence[tuple[int, _Entry]]) -> dict[tuple[int, str], tuple[float, int]]:
    """Per (cluster, prompt identity): how many of the records of `found` (each record's
    index with its recorded outcome on one model) are there, and how many of those greedy
    answers are right, as `choice.cluster_stats` counts them into the table
    `train_deferral` reads its priors from."""
    out: dict[tuple[int, str], tuple[float, int]] = {}
    for i, entry in found:
        key = (data.clusters[i], data.prompt_ids[i])
        right, count = out.get(key, (0.0, 0))
        out[key] = (right + entry.correct[0], count + 1)
    return out


def train_deferral(data: Data, idx: Sequence[int], table: StatsTable, model: str, votes: int) -> Deferral:
    """`model`'s deferral model, fitted on the recorded answers of the records `idx`.

    Where some answers carry log-probabilities, only those train it: the others will be
    judged by the agreement check, never by this model (`quality.judge_deferral`)."""
    rows: list[list[float | None]] = []
    ys: list[bool] = []
    found = [(i, e) for i in idx if (e := data.replay.entries.get((data.records[i].id, model))) is not None]
    entries = [(i, e) for i, e in found if e.answers]
    if any(e.signals is not None for _, e in entries):
        entries = [(i, e) for i, e in entries if e.signals is not None]
    prior_of = training_prior(data, table, found, model)
    for i, entry in entries:
        rows.append(entry.features(votes, prior_of(i)))
        ys.append(entry.correct[0])
    names = feature_names(votes)
    weights, bias, fill = fit_filled(rows, ys, len(names))
    return Deferral(names, tuple(float(w) for w in weights), bias, tuple(fill), table.overall.models[model].accuracy)


def training_prior(data: Data, table: StatsTable, found: Sequence[tuple[int, _Entry]], model: str) -> Callable[[int], float]:
    """The prior of a training answer of `found` (each record's index with its recorded
    outcome on `model`, all of them, as `table` counts them): its cluster's shrunk accuracy
    with its own prompt's answers left out (`_loo_prior`, `_copies`), blended by distance
    (`_blended`)."""
    copies = _copies(data, found)
    return lambda i: _blended(data, table, i, model, _loo_prior(table, data.clusters[i], model,
                                                                *copies[(data.clusters[i], data.prompt_ids[i])]))


def fit_filled(rows: Sequence[Sequence[float | None]], ys: Sequence[bool], width: int) -> tuple[Any, float, list[float]]:
    """`fit_logistic` on `rows` of `width` features whose missing values (None) are filled
    with their column's mean over the rows that have one (0 where none has); the weights,
    the bias and those fill values, which the model keeps for answers missing a feature.
    No rows: zero weights and bias."""
    fill = []
    for j in range(width):
        seen = [r[j] for r in rows if r[j] is not None]
        fill.append(sum(seen) / len(seen) if seen else 0.0)  # type: ignore[arg-type]
    filled = [[f if v is None else v for v, f in zip(r, fill)] for r in rows]
    weights, bias = fit_logistic(filled, ys) if rows else ([0.0] * width, 0.0)
    return weights, bias, fill


def deferral_p(
    data: Data, idx: Sequence[int], rules: Mapping[str, Deferral], prior_of: Callable[[int, str], float], votes: int
) -> dict[OutcomeKey, float]:
    """Each (record, model)'s P(correct) under `rules`, as the live check computes it
    (`quality.judge_deferral`); `prior_of(i, model)` is record i's prior for `model`. An
    answer its rule cannot judge (recorded without the log-probabilities it reads) has none:
    the replay runs the agreement check on it, as the live check would."""
    out: dict[OutcomeKey, float] = {}
    for i in idx:
        rid = data.records[i].id
        for model, rule in rules.items():
            entry = data.replay.entries.get((rid, model))
            if entry is not None and entry.answers:
                p = judge_deferral(rule, entry.signals, entry.answers[:votes], entry.cut, prior_of(i, model))
                if p is not None:
                    out[(rid, model)] = p
    return out


def within_auroc(scores: Sequence[float], labels: Sequence[bool], groups: Sequence[Hashable]) -> tuple[float | None, int]:
    """The AUROC of `scores` inside each group of `groups`, pooled: the share of (right,
    wrong) pairs of the same group that the scores order right (ties half), so a group
    weighs by its pairs, and a group of one class (no pairs) not at all. Also how many
    answers the groups with pairs hold. (None, 0) when no group has both."""
    by: dict[Hashable, tuple[list[float], list[bool]]] = {}
    for s, y, g in zip(scores, labels, groups):
        col = by.setdefault(g, ([], []))
        col[0].append(s)
        col[1].append(y)
    total = pairs = 0.0
    count = 0
    for col in by.values():
        a = auroc(*col)
        if a is not None:
            right = sum(col[1])
            weight = right * (len(col[1]) - right)
            total += a * weight
            pairs += weight
            count += len(col[0])
    return (total / pairs if pairs else None), count


def signal_report(
    data: Data, p_held_out: Mapping[OutcomeKey, float], ladder: Sequence[str], votes: int,
    fold_of: Sequence[int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per model: held-out AUROC, for predicting that the greedy answer is right, of the
    deferral model's P(correct) and of each raw signal, beside vote agreement.

    Over all answers, the AUROC mostly says which clusters a model is good at, which the
    router already knows from its cluster statistics. The check acts inside a cluster (it
    judges the answers of the queries a cluster sends to a rung), so each figure comes
    with `within_cluster` (`within_auroc`: its AUROC inside each cluster, pooled over the
    clusters' pairs) and `within_cluster_n` (the answers of the clusters that have both
    right and wrong ones). With `fold_of` (record i's cross-validation fold) the groups are
    (cluster, fold): a held-out P(correct) carries its fold's cluster prior, which is lower
    where the fold holds more of the cluster's right answers (the other folds hold fewer),
    so pooling a cluster's folds ranks by that artefact, not by the answer (seen on the
    480-query examples/querylog.jsonl, seed 0: 0.53 pooled against 0.67 by fold, for the 0.5B).
    The raw signals carry no prior, but are grouped alike so the columns compare.
    Unclustered queries are left out of the within-cluster figures."""
    report: dict[str, dict[str, Any]] = {}
    for model in ladder:
        cols: dict[str, tuple[list[float], list[bool], list[Hashable]]] = {}

        def add(name: str, value: float | None, y: bool, group: Hashable) -> None:
            if value is not None:
                col = cols.setdefault(name, ([], [], []))
                col[0].append(value)
                col[1].append(y)
                col[2].append(group)

        for i, record in enumerate(data.records):
            entry = data.replay.entries.get((record.id, model))
            if entry is None or not entry.answers:
                continue
            y = entry.correct[0]
            group = (data.clusters[i], fold_of[i] if fold_of is not None else 0) if data.clusters[i] >= 0 else None
            add("p_correct", p_held_out.get((record.id, model)), y, group)
            if entry.signals is not None:
                add("min_logprob", entry.signals.min_logprob, y, group)
                add("mean_logprob", entry.signals.mean_logprob, y, group)
                add("margin", entry.signals.margin, y, group)
            if len(entry.answers) > 1:
                add(f"agreement of {len(entry.answers)} votes", greedy_agreement(entry.answers), y, group)
        report[model] = {}
        for name, (scores, ys, groups) in cols.items():
            clustered = [(s, y, g) for s, y, g in zip(scores, ys, groups) if g is not None]
            within, within_n = within_auroc(*zip(*clustered)) if clustered else (None, 0)  # type: ignore[arg-type]
            report[model][name] = {"auroc": auroc(scores, ys), "n": len(scores),
                                   "within_cluster": within, "within_cluster_n": within_n}
        if "p_correct" in cols:
            # What acting on this rung's doubt could buy: how many answers fall below
            # P(correct) 0.5, and how often those are right, against the rest.
            ps, ys, _ = cols["p_correct"]
            low = [y for p, y in zip(ps, ys) if p < 0.5]
            high = [y for p, y in zip(ps, ys) if p >= 0.5]
            report[model]["p_correct"].update(
                doubtful_share=len(low) / len(ps),
                doubtful_accuracy=sum(low) / len(low) if low else None,
                confident_accuracy=sum(high) / len(high) if high else None,
            )
    return report
