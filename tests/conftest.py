"""Shared fixtures. Every test runs with CRE_HOME in a temp dir, so no user file is touched."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

from crecli import paths
from crecli.config import ModelSpec
from crecli.models.backend import Backend
from crecli.models.fake import FakeBackend

# Where the user's real, pulled models are, read before any test redirects CRE_HOME.
REAL_MODELS_DIR = paths.models_dir()
# numba compiles UMAP's kernels once per cache dir (tens of seconds): keep one cache for the
# whole run rather than one per test's CRE_HOME.
os.environ.setdefault("NUMBA_CACHE_DIR", str(paths.cache_dir() / "numba"))

TINY_TOML = """
schema = 1
ladder = ["small", "medium", "large"]

[embedder]
kind = "tfidf"
dims = 16

[models.small]
path = "/nonexistent/small.gguf"
prompt_format = "completion"
[models.medium]
path = "/nonexistent/medium.gguf"
[models.large]
path = "/nonexistent/large.gguf"
"""


@pytest.fixture(autouse=True)
def cre_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "cre-home"
    monkeypatch.setenv("CRE_HOME", str(home))
    monkeypatch.delenv("CRE_MODELS", raising=False)
    monkeypatch.delenv("CRE_MODELS_DIR", raising=False)
    return home


@pytest.fixture
def tiny_models_toml(tmp_path: Path) -> Path:
    """A three-rung ladder of fake models (small, medium, large), used with --models."""
    path = tmp_path / "models.toml"
    path.write_text(TINY_TOML)
    return path


@pytest.fixture
def bench_speeds() -> Callable[[dict[str, tuple[float, float]]], None]:
    """Store (prompt, generation) tokens/s per model name as `cre models bench --fresh`
    would, so costs are in bench-seconds; a later call replaces, never pools, them."""
    from crecli.models import bench
    from crecli.models.runtime import default_threads

    def store(speeds: dict[str, tuple[float, float]]) -> None:
        for name, (pp, tg) in speeds.items():
            bench.save(bench.Speed(name, None, default_threads(), pp_tokens_per_s=pp, tg_tokens_per_s=tg,
                                   load_seconds=1.0, pp_tokens=256, tg_tokens=64, measured_at="now"), fresh=True)

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
def real_models(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point crecli at the user's pulled models (tests marked `real` use them)."""
    monkeypatch.setenv("CRE_MODELS_DIR", str(REAL_MODELS_DIR))
    return REAL_MODELS_DIR
