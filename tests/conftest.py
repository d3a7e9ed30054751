"""Shared fixtures. Every test runs with CRE_HOME in a temp dir, so no user file is touched.

Plain helpers and constants the test modules share are in the `support` package; test
modules never import each other.

Real models: only the `real_models` fixture points crecli at the user's pulled models
(otherwise the models folder is inside the test's CRE_HOME, where there are none), and a
test that uses it must be marked `real`, so that `pytest -m "not real"` runs without them.
"""

from __future__ import annotations

import os
import shutil
import tempfile

# numba reads NUMBA_CACHE_DIR once, when it is first imported, so this comes before anything
# that could import it (umap, through crecli). The cache belongs to this test session, not
# to the user's cache folder, and is shared by every test of the session: numba compiles
# UMAP's kernels once per cache dir (tens of seconds), not once per test's CRE_HOME.
NUMBA_CACHE_DIR = tempfile.mkdtemp(prefix="cre-tests-numba-")
os.environ["NUMBA_CACHE_DIR"] = NUMBA_CACHE_DIR

import random  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402

from crecli import config, paths, routerfile  # noqa: E402
from crecli.config import ModelSpec  # noqa: E402
from crecli.escalate import Cascade  # noqa: E402
from crecli.models.backend import Backend, GenParams  # noqa: E402
from crecli.models.fake import FakeBackend  # noqa: E402
from support.hostile import Run  # noqa: E402
from support.ladder import TINY_TOML  # noqa: E402
from support.logs import small_log_answers, write_sums_log  # noqa: E402
from support.routers import SHAS, built_router, make_router  # noqa: E402

# Where the user's real, pulled models are, read before any test redirects CRE_HOME.
REAL_MODELS_DIR = paths.models_dir()


def pytest_unconfigure(config: pytest.Config) -> None:
    """The session's numba cache goes with the session."""
    shutil.rmtree(NUMBA_CACHE_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def cre_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "cre-home"
    monkeypatch.setenv("CRE_HOME", str(home))
    monkeypatch.delenv("CRE_MODELS", raising=False)
    monkeypatch.delenv("CRE_MODELS_DIR", raising=False)
    return home


# ---------------------------------------------------------------- the fake ladder


@pytest.fixture
def tiny_models_toml(tmp_path: Path) -> Path:
    """A three-rung ladder of fake models (small, medium, large), used with --models."""
    path = tmp_path / "models.toml"
    path.write_text(TINY_TOML)
    return path


@pytest.fixture
def bench_speeds() -> Callable[..., None]:
    """Store (prompt, generation) tokens/s per model name, or (prompt, generation, pass
    seconds), as a `cre models bench --fresh` that measured them would (its timings left out:
    only the rates price), so costs are in bench-seconds; a later call replaces, never pools,
    them.
    `measured_at` as bench writes it (`paths.stamp`), or `hours_ago` to write that
    time; "now" is no readable time."""
    import time

    from crecli.models import bench
    from crecli.models.runtime import default_threads

    def store(speeds: dict[str, tuple[float, ...]], measured_at: str = "now", hours_ago: float | None = None) -> None:
        if hours_ago is not None:
            measured_at = paths.stamp(time.time() - hours_ago * 3600)
        for name, figures in speeds.items():
            rates = bench.Rates(*figures)
            bench.save(bench.Speed(name, None, default_threads(), pp_tokens_per_s=rates.pp, tg_tokens_per_s=rates.tg,
                                   load_seconds=1.0, pp_tokens=256, tg_tokens=64, measured_at=measured_at,
                                   pass_seconds=rates.pass_seconds), fresh=True)

    return store


@pytest.fixture
def fake_backends(monkeypatch: pytest.MonkeyPatch) -> Callable[..., dict[str, FakeBackend]]:
    """Route every backend_for() call to FakeBackends.

    Call the fixture with {model name: answers} (a dict or a function, see FakeBackend) and
    FakeBackend's keyword arguments (`seconds_per_token` may be a {model name: value} dict);
    it returns the dict of created backends, filled in as models are used.
    """
    from crecli.models import registry

    created: dict[str, FakeBackend] = {}

    def install(answers: dict[str, object] | None = None, **kwargs: object) -> dict[str, FakeBackend]:
        answers = answers or {}

        def factory(spec: ModelSpec) -> Backend:
            # seconds_per_token may be {model name: value}, so that rungs differ in cost.
            own = dict(kwargs)
            if isinstance(own.get("seconds_per_token"), dict):
                own["seconds_per_token"] = own["seconds_per_token"][spec.name]  # type: ignore[index]
            backend = FakeBackend(spec, answers.get(spec.name), **own)  # type: ignore[arg-type]
            created[spec.name] = backend
            return backend

        monkeypatch.setattr(registry, "make_backend", factory)
        monkeypatch.setattr(registry, "reports_signals", lambda spec: kwargs.get("signals") is not None)
        return created

    return install


@pytest.fixture
def skilled_fakes(monkeypatch: pytest.MonkeyPatch) -> dict[str, FakeBackend]:
    """Fakes for the small example log whose skill differs by task: "large" is always right,
    "medium" on arithmetic and multiple choice, "small" on arithmetic only. On what they
    can't do they answer at random per seed, so their votes disagree."""
    from crecli.models import registry

    skill = {"small": ("arithmetic",), "medium": ("arithmetic", "choice"), "large": ("",)}
    cost = {"small": 0.001, "medium": 0.003, "large": 0.01}
    answers = small_log_answers()
    created: dict[str, FakeBackend] = {}

    def factory(spec: ModelSpec) -> Backend:
        def answer(text: str, params: GenParams) -> str:
            prompt = next((p for p in answers if p in text), None)
            if prompt is None:
                return "I don't know"
            source, ref = answers[prompt]
            kind = "choice" if "(A)" in prompt else source
            if any(s in kind for s in skill[spec.name]):
                return ref if len(ref) > 1 or not ref.isalpha() else f"({ref})"
            rng = random.Random(f"{prompt}|{params.seed}|{spec.name}")
            return str(rng.randint(0, 9))

        backend = FakeBackend(spec, answer, seconds_per_token=cost[spec.name])
        created[spec.name] = backend
        return backend

    monkeypatch.setattr(registry, "make_backend", factory)
    monkeypatch.setattr(registry, "reports_signals", lambda spec: False)
    return created


# ---------------------------------------------------------------- routers


@pytest.fixture(scope="module")
def router() -> routerfile.RouterFile:
    """The topics router (`support.routers.make_router`), shared by a module's tests."""
    return make_router()


@pytest.fixture
def saved_router(router: routerfile.RouterFile, tmp_path: Path) -> Path:
    """The topics router saved as tmp_path/router.cre."""
    path = tmp_path / "router.cre"
    routerfile.save(router, path)
    return path


@pytest.fixture
def cascade(router: routerfile.RouterFile, tiny_models_toml: Path) -> Cascade:
    """The topics router on the fake ladder."""
    return Cascade(router, config.load(tiny_models_toml))


@pytest.fixture
def pinned_settings(tiny_models_toml: Path) -> config.ModelConfig:
    """The fake ladder with each model's sha256 (SHAS) and size pinned."""
    from dataclasses import replace

    settings = config.load(tiny_models_toml)
    for name, sha in SHAS.items():
        settings.models[name] = replace(settings.models[name], sha256=sha, size=1000)
    return settings


@pytest.fixture
def built_router_file(pinned_settings: config.ModelConfig, tmp_path: Path) -> Path:
    """`support.routers.built_router` on the pinned ladder, saved as tmp_path/router.cre."""
    path = tmp_path / "router.cre"
    routerfile.save(built_router(pinned_settings), path)
    return path


# ---------------------------------------------------------------- `cre` as users run it


@pytest.fixture
def cre(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., Run]:
    """Run `cre ARGS` through cli.main(), the real entry point (so `Error:` lines are what
    users see), in this process (so fake backends apply)."""
    from crecli import cli

    def invoke(*args: str | Path) -> Run:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["cre", *map(str, args)])
        with pytest.raises(SystemExit) as exit_:
            cli.main()
        captured = capsys.readouterr()
        code = exit_.value.code
        return Run(0 if code is None else int(code), captured.out, captured.err)

    return invoke


@pytest.fixture
def sums_log(tmp_path: Path) -> Path:
    """A labelled JSONL log of 12 sums, "What is i plus i?", as tmp_path/sums.jsonl. A fit
    on it runs every model (a plain-text log would run none), so `four_fakes == {}` after a
    refusal shows the refusal came before any model ran."""
    return write_sums_log(tmp_path / "sums.jsonl", 12)


@pytest.fixture
def four_fakes(fake_backends: Callable[..., dict[str, FakeBackend]]) -> dict[str, FakeBackend]:
    """Every rung answers "4"; the dict of backends used stays empty while no model runs."""
    return fake_backends({"small": lambda text, p: "4", "medium": lambda text, p: "4", "large": lambda text, p: "4"})


# ---------------------------------------------------------------- real models


@pytest.fixture
def real_models(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point crecli at the user's pulled models. Only tests marked `real` may use it."""
    if request.node.get_closest_marker("real") is None:
        pytest.fail(f"{request.node.nodeid} uses the user's real models but is not marked `real`: "
                    "add @pytest.mark.real (or `pytestmark = pytest.mark.real`), so that "
                    "`pytest -m \"not real\"` leaves it out", pytrace=False)
    monkeypatch.setenv("CRE_MODELS_DIR", str(REAL_MODELS_DIR))
    return REAL_MODELS_DIR


@pytest.fixture
def gemma(real_models: Path) -> ModelSpec:
    """gemma-3-270m's spec; skipped (failed under CRE_REQUIRE_REAL=1) when it is not pulled."""
    from crecli.models.pull import file_state

    spec = config.load().get("gemma-3-270m")
    if not file_state(spec).verified:
        if os.environ.get("CRE_REQUIRE_REAL"):
            pytest.fail("gemma-3-270m is not pulled; run `cre models pull gemma-3-270m`")
        pytest.skip("gemma-3-270m is not pulled; run `cre models pull gemma-3-270m`")
    return spec
