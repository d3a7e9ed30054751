"""Routers for the tests, built in memory, and edits of a saved router file's zip members.

`make_router` is the topics router of the cascade tests: hand-assembled, three clusters of
ten prompts, no fit. `built_router` is what `fit.build` assembles from a hand-made plan,
for the router-file tests (with the `pinned_settings` fixture its ladder records sha256s).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any, Callable

from crecli import archive, config, routerfile
from crecli.quality import QualityCheck
from crecli.routerfile import ClusterInfo, RouterFile
from support.ladder import LADDER

# ---------------------------------------------------------------- the topics router

ADDITIONS = [f"What is {a} plus {b}?" for a, b in
             [(3, 4), (12, 30), (7, 5), (8, 9), (21, 4), (6, 6), (40, 2), (15, 15), (9, 1), (33, 32)]]
CAPITALS = [f"What is the capital city of {c}?" for c in
            ["France", "Italy", "Spain", "Peru", "Chile", "Japan", "Kenya", "Egypt", "Norway", "Canada"]]
CHOICES = [f"Which of these is a {w}? (A) stone (B) {w}-like thing (C) chair" for w in
           ["fruit", "tool", "bird", "fish", "tree", "car", "song", "game", "river", "metal"]]
FAR = "zzqx vrrrk blorpf xyzzyq"  # far from every cluster of the topics router


def make_router(thresholds: dict[str, float] | None = None, starts: tuple[str, str, str] = ("small", "medium", "small"),
                cluster_thresholds: dict[int, dict[str, float]] | None = None) -> RouterFile:
    """Clusters 0 (addition, numeric), 1 (capitals, exact) and 2 (choice); fallback: large."""
    import numpy as np

    from crecli.assign import Assigner
    from crecli.embed import TfidfEmbedder

    prompts = ADDITIONS + CAPITALS + CHOICES
    labels = np.repeat(np.arange(3), 10)
    # Word n-grams only: unknown words then embed to nothing, so FAR is far from everything
    # (distance 1). Every parameter is pinned so the test does not follow the defaults, and
    # the far cut-off is fixed: 30 near-identical prompts make the automatic one degenerate.
    embedder = TfidfEmbedder(dims=16, analyzer="word", min_df=1, mask_digits=True).fit(prompts)
    assigner = Assigner(k=3, max_distance=0.8).fit(embedder.transform(prompts), labels)
    types = ["numeric", "exact", "choice"]
    clusters = [
        ClusterInfo(
            id=cid, size=10, model=starts[cid], answer_type=types[cid], examples=group[:2],
            stats={m: {"n": 10.0, "correct": 5.0, "accuracy": 0.5, "shrunk_accuracy": 0.5,
                       "mean_cost": {"small": 0.1, "medium": 0.3, "large": 1.0 + cid}[m]} for m in LADDER},
            thresholds=(cluster_thresholds or {}).get(cid, {}),
        )
        for cid, group in enumerate([ADDITIONS, CAPITALS, CHOICES])
    ]
    return RouterFile(
        schema_version=routerfile.SCHEMA_VERSION,
        ladder=[routerfile.LadderEntry(m, None, None) for m in LADDER],
        embedder=embedder,
        assigner=assigner,
        clusters=clusters,
        fallback_model="large",
        budget={"kind": "retain", "value": 0.95},
        quality=QualityCheck(),
        thresholds=thresholds or {"small": 0.6, "medium": 0.6, "large": 0.0},
        fit=routerfile.FitRecord(cost_unit="seconds"),
    )


# ---------------------------------------------------------------- the router fit.build assembles

SHAS = {"small": "1" * 64, "medium": "2" * 64, "large": "3" * 64}  # what `pinned_settings` pins
BUILT_PROMPTS = [f"What is {i} plus {i + 3}?" for i in range(6)] + [
    f"Which word is a synonym of {w}? (A) big (B) small" for w in ("large", "huge", "vast", "giant", "tall", "wide")
]


def built_router(settings: config.ModelConfig) -> RouterFile:
    """BUILT_PROMPTS' two clusters (sums start on small, synonyms on medium, whose threshold
    there is 0.9), assembled by `fit.build` for `settings`' ladder."""
    import numpy as np

    from crecli import fit
    from crecli.assign import Assigner
    from crecli.choice import PRIOR_STRENGTH, Choice, ClusterStats, ModelStats, StatsTable
    from crecli.costs import Budget
    from crecli.embed import TfidfEmbedder
    from crecli.quality import default_thresholds
    from crecli.querylog import Record

    embedder = TfidfEmbedder(dims=6).fit(BUILT_PROMPTS)
    labels = [0] * 6 + [1] * 6
    assigner = Assigner(k=3).fit(embedder.transform(BUILT_PROMPTS), np.array(labels))
    records = [
        Record(id=f"q{i}", prompt=p, reference=["1"], match="numeric" if i < 6 else "choice")
        for i, p in enumerate(BUILT_PROMPTS)
    ]
    stats = {m: ModelStats(6, 3, 0.5, 0.5, 1.0) for m in settings.ladder}
    table = StatsTable({0: ClusterStats(0, 6, stats), 1: ClusterStats(1, 6, stats)}, ClusterStats(-1, 12, stats),
                       list(settings.ladder), PRIOR_STRENGTH)
    choice = Choice({0: "small", 1: "medium"}, "large", 0.5, 1.0, 0.5, 1.0)
    plan = fit.Plan(table, choice, default_thresholds(settings.ladder), "seconds", None, None, None)
    router = fit.build(settings, embedder, assigner, records, labels, plan, Budget("retain", 0.9),
                       QualityCheck(k=3), routerfile.FitRecord(log_sha256="ab" * 32, n_queries=12, seed=0))
    router.clusters[1].thresholds["medium"] = 0.9
    return router


# ---------------------------------------------------------------- editing a saved router file


def members(path: Path) -> dict[str, bytes]:
    """Every member of the router file's zip, by name."""
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def rewrite(path: Path, entries: dict[str, bytes]) -> None:
    """Write `entries` as the router file's zip, replacing what was there."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)


def edit_manifest(path: Path, change: Callable[[dict[str, Any]], None], rehash: bool = True) -> None:
    """Apply `change` to the manifest; with `rehash`, recompute its checksum as an editor can."""
    entries = members(path)
    manifest = json.loads(entries["manifest.json"])
    change(manifest)
    if rehash:
        manifest["body_sha256"] = hashlib.sha256(archive.canonical(manifest["body"])).hexdigest()
    entries["manifest.json"] = json.dumps(manifest).encode()
    rewrite(path, entries)
