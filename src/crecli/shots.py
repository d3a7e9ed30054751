"""Answered examples per (cluster, model): `cre fit --shots`.

Each cluster's exemplars are some of its own labelled queries (`pick_exemplars`); every other
query of the cluster is answered after the first n of them for each count tried, and each
(cluster, model) keeps the count with the most right answers (`choose_shots`). The outcomes
recorded after examples carry the tokens the examples add (`resolve_shots`), which costs
share across the answers shown them (`costs.share_prefixes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from crecli import console, grading
from crecli.models.prompting import shots_of
from crecli.outcomes import graded

if TYPE_CHECKING:
    from crecli.config import ModelConfig
    from crecli.outcomes import Outcome, OutcomeKey, OutcomeStore
    from crecli.quality import QualityCheck
    from crecli.querylog import Record


Shots = tuple[tuple[str, str], ...]


def exemplar_answer(record: "Record") -> str | None:
    """The answer an exemplar shows: its reference in the form the system prompt asks for
    ("(B)", a plain number, the text); None when it cannot be one (a regex, no reference)."""
    if not record.reference or record.match is None:
        return None
    return grading.bare_answer(record.reference[0], record.match)


def pick_exemplars(records: Sequence["Record"], n: int) -> list["Record"]:
    """Up to `n` of a cluster's labelled `records` to show as answered examples, in log order.

    Distinct answers come first (different option letters, different numbers), so the
    examples do not teach one answer; prompts or answers over the router file's caps are
    never chosen.
    """
    from crecli.schema import SHOT_ANSWER_CHARS, SHOT_PROMPT_CHARS

    usable = []
    for r in records:
        answer = exemplar_answer(r)
        if answer is not None and len(r.prompt.strip()) <= SHOT_PROMPT_CHARS and len(answer) <= SHOT_ANSWER_CHARS:
            usable.append((r, answer))
    chosen: list["Record"] = []
    seen: set[str] = set()
    for r, answer in usable:
        if len(chosen) < n and answer not in seen:
            chosen.append(r)
            seen.add(answer)
    for r, _ in usable:
        if len(chosen) < n and r not in chosen:
            chosen.append(r)
    return chosen


def resolve_shots(
    base: Mapping[OutcomeKey, Outcome],
    shown: Mapping[OutcomeKey, Outcome],
    shots: Mapping[OutcomeKey, Shots],
    keeps: Callable[[str], bool] = lambda model: True,
) -> dict[OutcomeKey, Outcome]:
    """The outcome each (query, model) answers with: `shown[key]` (recorded after the
    examples `shots[key]`) where it has examples, else `base[key]`.

    An outcome with examples carries the tokens they add (its prompt tokens less the plain
    prompt's), and a key naming the model and the examples, so costs count the shared
    prefix once per batch (`prefix_shares`); only for a model that `keeps` them (by name:
    `ModelSpec.keeps_examples`), else they stay in its prompt tokens, charged in full. A
    too-long outcome after the examples carries neither: the model never processed them.
    """
    from crecli.outcomes import prompt_sha256

    out: dict[OutcomeKey, Outcome] = {}
    for key, outcome in base.items():
        examples = shots.get(key, ())
        if not examples or key not in shown:
            out[key] = outcome
            continue
        with_shots = shown[key]
        # A prompt the examples make too long for the model: live, the rung is passed over
        # before it processes them, so it shares no examples' cost (`costs.share_prefixes`).
        if not keeps(key[1]) or with_shots.source == "too_long":
            out[key] = with_shots
            continue
        out[key] = replace(
            with_shots,
            prefix_tokens=max(0, with_shots.prompt_tokens - outcome.prompt_tokens),
            prefix_key=f"{key[1]}:{prompt_sha256('', examples)[:16]}",
        )
    return out


@dataclass
class ShotPlan:
    """What `choose_shots` decided: each cluster's exemplars and each model's count."""

    exemplars: dict[int, list[list[str]]]  # cluster -> [[prompt, answer], ...]
    counts: dict[int, dict[str, int]]  # cluster -> model -> shots shown (0 left out)
    held_out: set[str]  # ids of the exemplar queries: they never answer with examples of their own
    accuracy: dict[int, dict[str, dict[int, tuple[int, int]]]]  # cluster -> model -> shots -> (right, n)
    # shots -> the outcomes compared: 0 the plain ones, each other count those after that many examples
    answered: dict[int, Mapping[OutcomeKey, Outcome]] = field(default_factory=dict)
    # Models that do not keep the examples between answers (`ModelSpec.keeps_examples`).
    unkept: frozenset[str] = frozenset()

    def shots(self, cid: int, model: str) -> Shots:
        return shots_of(self.exemplars.get(cid, []), self.counts.get(cid, {}).get(model, 0))

    def apply(
        self, records: Sequence["Record"], clusters: Mapping[str, int], ladder: Sequence[str]
    ) -> tuple[list["Record"], dict[OutcomeKey, Outcome]]:
        """The records left once the exemplar queries are out, and the outcome each answers
        with under this plan (`resolve_shots`), from the outcomes the choice compared."""
        kept = [r for r in records if r.id not in self.held_out]
        wanted = {(r.id, m): self.shots(clusters[r.id], m) for r in kept for m in ladder}
        wanted = {key: examples for key, examples in wanted.items() if examples}
        base = {key: o for key, o in self.answered[0].items() if key[0] not in self.held_out}
        shown = {key: o for key, examples in wanted.items() if (o := self.answered[len(examples)].get(key)) is not None}
        return kept, resolve_shots(base, shown, wanted, lambda model: model not in self.unkept)


def choose_shots(
    records: Sequence["Record"],
    clusters: Mapping[str, int],
    settings: "ModelConfig",
    store: "OutcomeStore",
    quality: "QualityCheck",
    base: Mapping[OutcomeKey, Outcome],
    counts: Sequence[int],
) -> ShotPlan:
    """Per (cluster, model), how many answered examples (one of `counts`) to show, by held-out accuracy.

    Each cluster's exemplars are `pick_exemplars` of its records. Every other record of the
    cluster is answered with the first n of them for each n in `counts` (the store records
    these, grouped by cluster), and the n with the most right answers wins; ties go to
    fewer examples, the cheaper prompt. An exemplar query, or one with an exemplar's prompt
    under another id, is never scored on its own examples; it is left out of the choice.
    """
    from crecli import outcomes as outcomes_mod

    ladder = list(settings.ladder)
    top = max(counts)
    members: dict[int, list["Record"]] = {}
    for r in records:
        if clusters[r.id] >= 0:
            members.setdefault(clusters[r.id], []).append(r)
    exemplars: dict[int, list[list[str]]] = {}
    held_out: set[str] = set()
    for cid, group in sorted(members.items()):
        chosen = pick_exemplars(group, top)
        # Too few examples to show the most, or too few queries left to score them on.
        if len(chosen) < top or len(group) - len(chosen) < 2:
            continue
        exemplars[cid] = [[r.prompt.strip(), str(exemplar_answer(r))] for r in chosen]
        held_out.update(r.id for r in chosen)
    # A query whose prompt is an example's, under another id, would be scored after seeing
    # its own answer: out too, by the rule `replay.prepare` applies to a router's examples.
    shown_prompts = {prompt for examples in exemplars.values() for prompt, _ in examples}
    held_out.update(r.id for r in records if r.prompt.strip() in shown_prompts)
    scored = [r for r in records if clusters[r.id] in exemplars and r.id not in held_out]
    shown: dict[int, Mapping[OutcomeKey, Outcome]] = {0: base}
    if not exemplars:
        # Said: "Answering 0 queries after 3 answered example(s)" was all a fit whose clusters
        # were all too small (`--sample-per-cluster 4`, a mostly unlabelled log) printed.
        console.warn(f"--shots {','.join(map(str, counts))}: no cluster has {top} labelled queries to show and 2 more "
                     f"to score them on ({top + 2} in all), so the router shows no answered examples; give fewer "
                     "examples, or more labelled queries a cluster")
    for n in sorted(set(counts) - {0}) if exemplars else ():
        wanted = {(r.id, m): shots_of(exemplars[clusters[r.id]], n) for r in scored for m in ladder}
        console.status(f"Answering {len(scored)} queries after {n} answered example(s) of their cluster...")
        shown[n] = outcomes_mod.collect(scored, settings, store, quality, shots=wanted)
    accuracy: dict[int, dict[str, dict[int, tuple[int, int]]]] = {}
    chosen_counts: dict[int, dict[str, int]] = {}
    by_id = {r.id: r for r in scored}
    for cid in exemplars:
        ids = [r.id for r in scored if clusters[r.id] == cid]
        for m in ladder:
            tally: dict[int, tuple[int, int]] = {}
            for n, found in shown.items():
                # A prompt the examples make too long for the model counts as a wrong answer.
                runs = [found[(i, m)] for i in ids if (i, m) in found and found[(i, m)].source != "label"]
                tally[n] = (sum(graded(o, by_id[o.query_id])[0] for o in runs), len(runs))
            accuracy.setdefault(cid, {})[m] = tally
            if len({n for _, n in tally.values()}) != 1:
                continue  # some answers are labels only: no fair comparison
            best = max(sorted(tally), key=lambda n: tally[n][0])  # first of equals: fewer examples
            if best:
                chosen_counts.setdefault(cid, {})[m] = best
    unkept = frozenset(m for m in ladder if not settings.get(m).keeps_examples)
    return ShotPlan(exemplars, chosen_counts, held_out, accuracy, shown, unkept)
