"""The router crecli ships (src/crecli/routers/default.cre), which `cre ask` uses right after
setup. Rebuilt by bench/refit_default_router.sh; these checks fail when the ladder changes
without a refit, or when the file grows past what a mailed router should weigh."""

from __future__ import annotations

from pathlib import Path

from crecli import config, paths, routerfile
from crecli.route import route

# Issue 21: "at most about 2 MB" for a router fitted on 1,400 queries.
MAX_BYTES = 2_100_000


def test_the_shipped_router_is_there_small_and_of_the_default_ladder() -> None:
    path = paths.shipped_router()
    assert path.is_file(), "the shipped router is missing: run bench/refit_default_router.sh"
    assert path.stat().st_size <= MAX_BYTES, f"{path.stat().st_size} bytes: store less, or refit"
    settings = config.load()
    router = routerfile.load(path, settings)
    assert router.ladder_names == settings.ladder, "the ladder changed: run bench/refit_default_router.sh"
    assert [e.sha256 for e in router.ladder] == [settings.get(n).sha256 for n in settings.ladder]
    # Fitted and calibrated as README's headline is measured: one vote, the deferral check.
    assert router.quality.k == 1 and router.deferral is not None
    assert router.fit.n_queries == 1400 and router.fit.calibration is not None
    # Its log by a path relative to it, found in any clone (no workspace's absolute path):
    # `cre eval` counts the bundled logs' queries as in sample, `cre calibrate` reads it.
    assert router.fit.log is not None and not Path(router.fit.log).is_absolute()
    examples = Path(__file__).resolve().parent.parent / "examples" / "querylog-large.jsonl"
    if path.resolve().is_relative_to(examples.parent.parent):  # an editable install of this clone
        assert routerfile.fit_log_path(router) == examples


def test_the_shipped_router_knows_arithmetic_and_not_gibberish() -> None:
    router = routerfile.load(paths.shipped_router(), config.load())
    sums = route(router, "What is 12 plus 30?")
    assert sums.cluster >= 0 and sums.familiar and "plus" in router.cluster(sums.cluster).examples[0]
    far = route(router, "zqx vrbl kkwth plimf orrrg")
    assert not far.familiar and far.model == router.fallback_model
