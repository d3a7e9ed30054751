"""Would a sharper deferral check come from what the greedy pass already gives, or from the
rung below's answer? Three variants of P(correct) against the shipped one, held out, on
recorded answers.

The check acts inside a cluster: a cluster's queries start on one rung, and the check
decides which of that rung's answers to keep. The shipped model (`deferral.train_deferral`)
is one logistic regression per rung over every cluster, on the greedy pass's signals and
the cluster prior. Its AUROC over all answers is high because the prior separates the
clusters; inside a cluster it ranks answers far less well, and calibration picks
thresholds of 0. Three ways it could rank better there, each from the answers a fit
already records (the first two free at answer time):

- **answer prior**: one more feature, the logit of how often the rung's greedy answer was
  right when the rung gave that same (normalised) answer to the cluster's training queries,
  shrunk toward the cluster prior with strength `ANSWER_STRENGTH`. A model that says "A"
  to most of a two-option task is right on "A" at about the base rate, and may be right
  more often on "B".
- **cluster correction**: per (cluster, rung), a ridge logistic regression on the
  cluster's own standardised signals, offset by the shipped model's logit, so a signal
  whose meaning differs by cluster (the option margin of a model that is sure and wrong)
  gets its own weight there; ridge `CORRECTION_L2` pulls it back toward the shipped model.
- **below agreement**: for a rung above the first, one more feature: whether its greedy
  answer is the rung below's. Not free: it holds only where the rung below answered first,
  so its bound prices starts on the lowest rung alone (that rung's answers kept at t0, or
  never, a witness only, and the next rung's at t1), and takes starts on the rungs above
  from the shipped model.

Each is fitted as calibration fits (`calibrate.folds`: 5 folds, copies of a prompt kept
together; training answers' priors leave their own prompt out) and scored on the fold left
out. Printed per seed and variant:

- each rung's AUROC of P(correct) for a right greedy answer, over all answers and within a
  (cluster, fold) (`deferral.signal_report`: pooled over folds, a held-out prior ranks by
  an artefact);
- `bench/break_even.py --check`'s bound on the router's own clusters: the clusters that
  start on the strongest model where starting on a smaller rung, keeping its answers at
  P(correct) >= t, keeps 98% of the strongest model's accuracy there for less, and what
  that saves as a share of the starts' cost (t chosen per cluster on the queries it is
  scored on: a bound, for every variant alike).

    .venv/bin/python bench/check_levers.py --router ROUTER [--log LOG] [--seeds 0 1 2] [--json]

Every model's greedy answer to every query of the log must be in the outcome store (a
`cre fit LOG --k 1 -o ROUTER` leaves them there).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import break_even  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ANSWER_STRENGTH = 4.0
CORRECTION_L2 = 3.0
MIN_CLUSTER_TRAIN = 5
SIGNALS = ("min_logprob", "mean_logprob", "margin")


def _entry(data: Any, i: int, model: str) -> Any:
    """Record i's recorded greedy answer on `model` where it has the signals a deferral
    model reads (`deferral.train_deferral` trains on those alone), else None."""
    e = data.replay.entries.get((data.records[i].id, model))
    return e if e is not None and e.answers and e.signals is not None else None


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))


def _train_prior(data: Any, table: Any, train: Sequence[int], model: str) -> Callable[[int], float]:
    """A training answer's cluster prior with its own prompt's answers left out, as
    `deferral.train_deferral` builds it (`deferral.training_prior`)."""
    from crecli.deferral import training_prior

    found = [(i, e) for i in train if (e := data.replay.entries.get((data.records[i].id, model))) is not None]
    return training_prior(data, table, found, model)


def answer_counts(data: Any, train: Sequence[int], model: str) -> tuple[dict[tuple[int, str], list[float]],
                                                                         dict[tuple[int, str], list[float]]]:
    """[right, count] of `model`'s greedy answers on the training records, per (cluster,
    normalised answer), and per (cluster, prompt identity): the share of a prompt's copies
    to leave out of its own answer's count. Copies of a prompt share one recorded answer
    (the store keeps one per prompt), so they all sit in that answer's count."""
    by_answer: dict[tuple[int, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    by_prompt: dict[tuple[int, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for i in train:
        if (e := _entry(data, i, model)) is not None:
            for counts, key in ((by_answer, (data.clusters[i], e.answers[0])),
                                (by_prompt, (data.clusters[i], data.prompt_ids[i]))):
                counts[key][0] += e.correct[0]
                counts[key][1] += 1
    return by_answer, by_prompt


# A feature one variant adds: of record i's recorded answer `e` with its prior, in training
# (True: leave the answer's own prompt out of what it reads) or held out.
Extra = Callable[[int, Any, float, bool], "float | None"]


def one_more(data: Any, train: Sequence[int], test: Sequence[int], model: str, table: Any, name: str,
             extra: Extra) -> dict[Any, float]:
    """The held-out P(correct) of the shipped model's form with one more feature, `name`
    (`extra`'s value), fitted on the training records as `deferral.train_deferral` fits
    (training priors leave their own prompt out), so it judges as `Deferral.p_correct` does."""
    from crecli.deferral import _table_prior, fit_filled
    from crecli.quality import Deferral, feature_names

    prior_train = _train_prior(data, table, train, model)
    rows: list[list[float | None]] = []
    ys: list[bool] = []
    for i in train:
        if (e := _entry(data, i, model)) is not None:
            prior = prior_train(i)
            rows.append(e.features(1, prior) + [extra(i, e, prior, True)])
            ys.append(e.correct[0])
    if not rows:
        return {}
    w, b, fill = fit_filled(rows, ys, len(rows[0]))
    rule = Deferral(feature_names(1) + (name,), tuple(float(x) for x in w), b, tuple(fill), 0.0)
    prior_test = _table_prior(data, table)
    out: dict[Any, float] = {}
    for i in test:
        if (e := _entry(data, i, model)) is not None:
            prior = prior_test(i, model)
            out[(data.records[i].id, model)] = rule.p_correct(e.features(1, prior) + [extra(i, e, prior, False)])
    return out


def answer_prior(data: Any, train: Sequence[int], test: Sequence[int], model: str, table: Any) -> dict[Any, float]:
    from crecli.choice import shrink
    from crecli.quality import prior_logit

    by_answer, by_prompt = answer_counts(data, train, model)

    def value(i: int, e: Any, prior: float, training: bool) -> float:
        if data.clusters[i] < 0:
            return prior_logit(prior)
        right, n = by_answer.get((data.clusters[i], e.answers[0]), (0.0, 0.0))
        own = by_prompt[(data.clusters[i], data.prompt_ids[i])] if training else (0.0, 0.0)
        return prior_logit(shrink(right - own[0], n - own[1], prior, ANSWER_STRENGTH))

    return one_more(data, train, test, model, table, "answer_prior", value)


def _offset_logistic(x: np.ndarray, y: np.ndarray, offset: np.ndarray, l2: float, iterations: int = 50) -> np.ndarray:
    """Ridge logistic regression with a fixed offset per row (the shipped model's logit);
    the intercept is penalised too, so a cluster with few answers keeps the shipped model."""
    a = np.hstack([x, np.ones((len(x), 1))])
    beta = np.zeros(a.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ beta + offset, -30, 30)))
        step = np.linalg.solve(a.T @ (a * (p * (1 - p))[:, None]) + l2 * np.eye(len(beta)), a.T @ (p - y) + l2 * beta)
        beta -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return beta


def cluster_correction(data: Any, train: Sequence[int], test: Sequence[int], model: str, table: Any) -> dict[Any, float]:
    from crecli.deferral import _table_prior, train_deferral
    from crecli.quality import LOGPROB_FLOOR

    rule = train_deferral(data, train, table, model, 1)
    # The offset as the shipped model sees each answer: a training answer's prior leaves its
    # own prompt out (as the rule was trained), a held-out one's is the training table's.
    prior_train, prior_test = _train_prior(data, table, train, model), _table_prior(data, table)

    def signals(e: Any) -> list[float]:
        values = [getattr(e.signals, name) for name in SIGNALS]
        return [0.0 if v is None or not math.isfinite(v) else max(LOGPROB_FLOOR, v) for v in values]

    members: dict[int, list[int]] = defaultdict(list)
    for i in train:
        if data.clusters[i] >= 0 and _entry(data, i, model) is not None:
            members[data.clusters[i]].append(i)
    fitted: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for cid, idx in members.items():
        if len(idx) < MIN_CLUSTER_TRAIN:
            continue
        entries = [_entry(data, i, model) for i in idx]
        x = np.array([signals(e) for e in entries])
        mu, sd = x.mean(axis=0), x.std(axis=0)
        sd[sd < 1e-9] = 1.0
        y = np.array([e.correct[0] for e in entries], dtype=float)
        # Unclipped log-odds: the offset keeps the shipped model's ranking in the tails.
        offset = np.array([rule.logit(e.features(1, prior_train(i))) for i, e in zip(idx, entries)])
        fitted[cid] = (mu, sd, _offset_logistic((x - mu) / sd, y, offset, CORRECTION_L2))
    out: dict[Any, float] = {}
    for i in test:
        if (e := _entry(data, i, model)) is not None:
            logit = rule.logit(e.features(1, prior_test(i, model)))
            if (f := fitted.get(data.clusters[i])) is not None:
                mu, sd, beta = f
                logit += float(((np.array(signals(e)) - mu) / sd) @ beta[:-1] + beta[-1])
            out[(data.records[i].id, model)] = _sigmoid(logit)
    return out


def below_agreement(data: Any, train: Sequence[int], test: Sequence[int], model: str, table: Any) -> dict[Any, float]:
    """P(correct) with one more feature for a rung above the first: whether its greedy answer
    is the rung below's (both normalised; missing where the rung below has no answer). The
    lowest rung keeps the shipped model. Valid only where the rung below ran first: a start
    on the lower rung, whose cost the cascade pays (`witness_grids`)."""
    from crecli.deferral import _table_prior, deferral_p, train_deferral

    ladder = data.replay.ladder
    at = ladder.index(model)
    if at == 0:
        rule = train_deferral(data, train, table, model, 1)
        return deferral_p(data, test, {model: rule}, _table_prior(data, table), 1)
    below = ladder[at - 1]

    def agree(i: int, e: Any) -> float | None:
        other = data.replay.entries.get((data.records[i].id, below))
        if other is None or not other.answers:
            return None
        return 1.0 if e.answers[0] == other.answers[0] else 0.0

    return one_more(data, train, test, model, table, "agrees_below", lambda i, e, prior, training: agree(i, e))


# A threshold no P(correct) reaches: the rung answers only as a witness for the one above.
NEVER = 1.5


def witness_grids(ladder: Sequence[str]) -> dict[str, list[dict[str, float]]]:
    """`below_agreement`'s starts: on the lowest rung, its answers kept at t0 (or never: a
    witness only) and the next rung's at t1; a start on a rung above the lowest has no rung
    below that ran, so the variant does not price it (`bound` takes it from the shipped P)."""
    first, second = ladder[0], ladder[1]
    rest = ladder[2:-1]
    return {first: [{first: t0, second: t1, **{x: t1 for x in rest}}
                    for t0 in (*break_even.THRESHOLDS, NEVER) for t1 in break_even.THRESHOLDS]}


def bound(data: Any, router: Any, p: dict[Any, float], shipped: dict[Any, float] | None, start_cost: float,
          witness: bool) -> dict[str, Any]:
    """`break_even.check_summary` of the starts a variant may take: every start at its own P,
    or, for a witness variant, starts on the lowest rung at its P (`witness_grids`) and
    starts on the others at the shipped P, the cheapest start that keeps `KEEP` per cluster."""
    if not witness:
        return break_even.check_summary(break_even.with_check(data, router, p), start_cost)
    ladder = list(router.ladder_names)
    low = break_even.with_check(data, router, p, witness_grids(ladder))
    rest = break_even.with_check(data, router, shipped or {}, {m: break_even.grid(ladder, m) for m in ladder[1:-1]})
    starts = {r["cluster"]: r for r in rest}
    for row in low:
        row["starts"] += starts[row["cluster"]]["starts"]
        keeps = [s for s in row["starts"] if s["accuracy_share"] is not None and s["accuracy_share"] >= break_even.KEEP
                 and s["cost_share"] is not None]
        row["best"] = min(keeps, key=lambda s: s["cost_share"], default=None)
    return break_even.check_summary(low, start_cost)


# None: the shipped model, fitted as calibration fits it (`break_even.held_out_p`).
VARIANTS: dict[str, break_even.Fitter | None] = {
    "shipped": None, "answer prior": answer_prior, "cluster correction": cluster_correction,
    "below agreement": below_agreement}
# Variants whose P(correct) of a rung reads the answer of the rung below, so holds only on a
# start below it.
WITNESS = {"below agreement"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--router", type=Path, default=ROOT / "src" / "crecli" / "routers" / "default.cre")
    parser.add_argument("--log", type=Path, help="its labelled log (default: the router's fit log)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from crecli import calibrate, config, replay, routerfile
    from crecli.deferral import signal_report

    settings = config.load()
    router = routerfile.load(args.router, settings)
    data = replay.prepare(router, settings, calibrate.fitted_log(router, args.log))
    ladder = list(router.ladder_names)
    start_cost = break_even.starts_cost(data, router)
    runs = []
    for seed in args.seeds:
        fold_of = calibrate.fold_numbers(calibrate.folds(len(data.records), 5, seed, data.prompt_ids), len(data.records))
        shipped = None
        for name, fit in VARIANTS.items():
            p = break_even.held_out_p(data, ladder, seed=seed, fit=fit)
            shipped = p if fit is None else shipped
            report = signal_report(data, p, ladder[:-1], 1, fold_of)
            summary = bound(data, router, p, shipped, start_cost, name in WITNESS)
            runs.append({"seed": seed, "variant": name,
                         "auroc": {m: {"all": r["p_correct"]["auroc"], "within_cluster": r["p_correct"]["within_cluster"]}
                                   for m, r in report.items() if "p_correct" in r},
                         "raw_within_cluster": {m: {s: r[s]["within_cluster"] for s in SIGNALS if s in r}
                                                for m, r in report.items()},
                         "bound": summary})
            print(f"seed {seed} {name}: done", file=sys.stderr, flush=True)
    result = {"router": str(args.router), "queries": len(data.records), "keep": break_even.KEEP,
              "answer_strength": ANSWER_STRENGTH, "correction_l2": CORRECTION_L2, "runs": runs}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    small = ladder[:-1]

    def cell(figures: dict[str, float | None] | None) -> str:
        def f(x: float | None) -> str:
            return "-" if x is None else f"{x:.3f}"
        return "-" if figures is None else f"{f(figures['all'])} / {f(figures['within_cluster'])}"

    print(f"{'seed':>4} {'variant':20} " + " ".join(f"{m[:24] + ' all/within':>36}" for m in small)
          + f" {'bound: clusters':>16} {'saved':>7}")
    for r in runs:
        b = r["bound"]
        print(f"{r['seed']:>4} {r['variant']:20} " + " ".join(f"{cell(r['auroc'].get(m)):>36}" for m in small)
              + f" {b['clusters']:>16} {100 * b['saved_share_of_start_cost']:6.1f}%")

if __name__ == "__main__":
    main()
