"""`cre batch --parallel`: greedy votes of one rung decoded together, everything else as before.

Fakes stand in for the models (the real llama.cpp engine is checked in
test_real_parallel.py): what is checked here is the grouping by rung, that the
results are the sequential path's, line for line, and the memory accounting.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest
from typer.testing import CliRunner

from crecli import config
from crecli.batch import run_batch
from crecli.cli import app
from crecli.config import ModelSpec
from crecli.errors import BackendError, CreError
from crecli.escalate import Cascade
from crecli.models import registry
from crecli.models.backend import Backend, Generation, GenParams
from crecli.models.fake import FakeBackend
from crecli.models.registry import ModelPool
from crecli.routerfile import RouterFile
from support.ladder import scripted
from support.prompts import ADD, FRUIT, HARD, MIXED, PERU, TABLE, jl
from support.routers import FAR


class ParallelFake(FakeBackend):
    """A FakeBackend that logs each `generate_many` call (its prompts and `parallel`)."""

    waves: list[tuple[str, list[str], int]] = []

    def generate_many(self, prompts: Sequence[str], params: Sequence[GenParams], parallel: int = 1) -> list[Generation | CreError]:
        ParallelFake.waves.append((self.spec.name, list(prompts), parallel))
        return super().generate_many(prompts, params, parallel)

    def parallel_memory(self, parallel: int) -> int:
        return 100 * parallel if parallel > 1 else 0


@pytest.fixture
def parallel_fakes(monkeypatch: pytest.MonkeyPatch) -> Callable[..., dict[str, ParallelFake]]:
    ParallelFake.waves = []
    created: dict[str, ParallelFake] = {}

    def install(table: dict[str, dict[str, list[str]]], fail: Callable[[str], bool] = lambda text: False) -> dict[str, ParallelFake]:
        def factory(spec: ModelSpec) -> Backend:
            answer = scripted(table.get(spec.name, {}), None, spec.name)

            def answerer(text: str, params: GenParams) -> str:
                if fail(text):
                    raise BackendError("prompt is too long for this model")
                return answer(text, params)

            created[spec.name] = ParallelFake(spec, answerer)
            return created[spec.name]

        monkeypatch.setattr(registry, "make_backend", factory)
        monkeypatch.setattr(registry, "reports_signals", lambda spec: False)
        return created

    return install


def _run(lines: list[bytes], router: RouterFile, models: Path, parallel: int, **kw: Any) -> list[dict[str, Any]]:
    cascade = Cascade(router, config.load(models), ModelPool(parallel=parallel))
    out = io.StringIO()
    run_batch(lines, out, cascade, **kw)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def _timeless(record: dict[str, Any]) -> dict[str, Any]:
    """A result without the clock: routing time is measured, not simulated, by the fakes."""
    record = json.loads(json.dumps(record))
    record.pop("seconds", None)
    for key in ("seconds", "route_seconds"):
        record.get("trace", {}).pop(key, None)
    return record


LINES = MIXED + [(p + "\n").encode() for p in (HARD, PERU, FAR, ADD, FRUIT, HARD, FAR)]


@pytest.mark.parametrize("parallel", [2, 4, 64])
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_parallel_results_are_the_sequential_results_line_for_line(
    parallel_fakes: Callable[..., dict[str, ParallelFake]], router: RouterFile, tiny_models_toml: Path,
    parallel: int, chunk_size: int,
) -> None:
    parallel_fakes(TABLE)
    sequential = _run(LINES, router, tiny_models_toml, 1, chunk_size=chunk_size)
    assert ParallelFake.waves == []  # --parallel 1 is today's path: no generate_many at all
    together = _run(LINES, router, tiny_models_toml, parallel, chunk_size=chunk_size)
    assert [_timeless(r) for r in together] == [_timeless(r) for r in sequential]
    assert [r["line"] for r in together] == list(range(1, len(LINES) + 1))


def test_each_wave_holds_the_prompts_of_one_rung_of_one_chunk(
    parallel_fakes: Callable[..., dict[str, ParallelFake]], router: RouterFile, tiny_models_toml: Path
) -> None:
    parallel_fakes(TABLE)
    prompts = [PERU, HARD, FAR, ADD, FRUIT, PERU, HARD, FAR]
    rows = _run([(p + "\n").encode() for p in prompts], router, tiny_models_toml, 4)

    assert [r["answer"] for r in rows] == ["Lima", "17", "?", "12", "(B)", "Lima", "17", "?"]
    waves = ParallelFake.waves
    # Rung 0 (small) first: the prompts starting there; then medium: those starting there and
    # the two HARD ones that escalated; then large: the two FAR ones (fallback).
    assert [(m, n) for m, _, n in waves] == [("small", 4), ("medium", 4), ("large", 4)]
    assert sorted(waves[0][1]) == sorted([HARD, ADD, FRUIT, HARD])
    assert sorted(waves[1][1]) == sorted([PERU, PERU, HARD, HARD])
    assert sorted(waves[2][1]) == [FAR, FAR]


def test_a_prompt_alone_on_its_rung_is_not_a_wave(
    parallel_fakes: Callable[..., dict[str, ParallelFake]], router: RouterFile, tiny_models_toml: Path
) -> None:
    parallel_fakes(TABLE)
    rows = _run([(p + "\n").encode() for p in (PERU, ADD)], router, tiny_models_toml, 4)
    assert [r["answer"] for r in rows] == ["Lima", "12"]
    assert ParallelFake.waves == []


def test_a_prompt_that_fails_in_the_wave_gets_its_own_error_record_in_place(
    parallel_fakes: Callable[..., dict[str, ParallelFake]], router: RouterFile, tiny_models_toml: Path
) -> None:
    parallel_fakes(TABLE, fail=lambda text: "Peru" in text)
    prompts = [ADD, PERU, FRUIT, PERU, HARD]
    for parallel in (1, 4):
        rows = _run([jl(id=str(i), prompt=p) for i, p in enumerate(prompts)], router, tiny_models_toml, parallel)
        assert [r["id"] for r in rows] == ["0", "1", "2", "3", "4"]
        assert [("error" in r) for r in rows] == [False, True, False, True, False]
        assert "too long" in rows[1]["error"] and rows[1]["line"] == 2
        assert [r.get("answer") for r in rows] == ["12", None, "(B)", None, "17"]


def test_default_generate_many_is_generate_in_a_loop_with_errors_in_place(tiny_models_toml: Path) -> None:
    spec = config.load(tiny_models_toml).get("small")

    def answer(text: str, params: GenParams) -> str:
        if "bad" in text:
            raise BackendError("no")
        return "ok"

    backend = FakeBackend(spec, answer)
    params = [GenParams(max_tokens=4)] * 3
    out = backend.generate_many(["good one", "bad one", "good two"], params, parallel=8)
    assert isinstance(out[1], BackendError)
    assert [g.text for g in (out[0], out[2])] == ["ok", "ok"]  # type: ignore[union-attr]
    assert out[0] == backend.generate("good one", params[0])


def _small_and_medium_of_1000_bytes(models_toml: Path) -> tuple[ModelSpec, ModelSpec]:
    """The fixture ladder's small and medium models, each pinned as a 1000-byte file, so a
    memory budget says which fit beside which."""
    from dataclasses import replace

    settings = config.load(models_toml)
    return replace(settings.get("small"), size=1000), replace(settings.get("medium"), size=1000)


def test_memory_budget_counts_the_parallel_kv_cache(
    parallel_fakes: Callable[..., dict[str, ParallelFake]], tiny_models_toml: Path
) -> None:
    parallel_fakes({})
    small, medium = _small_and_medium_of_1000_bytes(tiny_models_toml)
    # Two files of 1000 bytes fit in 2400; with --parallel 4 each also needs 400 of KV cache.
    pool = ModelPool(2400, parallel=1)
    pool.get(small), pool.get(medium)
    assert list(pool._loaded) == ["small", "medium"]
    pool = ModelPool(2400, parallel=4)
    pool.get(small), pool.get(medium)
    assert list(pool._loaded) == ["medium"] and pool.cost(pool._loaded["medium"]) == 1400


def test_memory_budget_counts_a_model_given_by_path_alone_by_its_file_on_disk(
    parallel_fakes: Callable[..., dict[str, ParallelFake]], tiny_models_toml: Path, tmp_path: Path
) -> None:
    # No `size` in models.toml: the file's bytes on disk are counted, not nothing.
    parallel_fakes({})
    big = tmp_path / "big.gguf"
    big.write_bytes(b"GGUF" + bytes(4996))
    settings = config.load(tiny_models_toml)
    from dataclasses import replace

    small = replace(settings.get("small"), path=str(big))
    assert small.size is None
    assert ModelPool(1024).cost(ModelPool(1024).get(small)) == 5000
    pool = ModelPool(6000)
    pool.get(small), pool.get(replace(settings.get("medium"), path=str(big)))
    assert list(pool._loaded) == ["medium"]  # two files of 5000 do not fit in 6000
    # A file that is not there (not pulled yet) is counted as before, as nothing.
    assert ModelPool(1024).cost(ModelPool(1024).get(settings.get("large"))) == 0


def test_the_pool_counts_every_load_of_a_model_evicted_and_closed_ones_too(
    parallel_fakes: Callable[..., dict[str, ParallelFake]], tiny_models_toml: Path
) -> None:
    parallel_fakes({})
    small, medium = _small_and_medium_of_1000_bytes(tiny_models_toml)
    pool = ModelPool(1500)  # one model at a time
    pool.get(small).load_seconds = 0.5
    pool.get(medium).load_seconds = 2.0  # small is evicted for it
    pool.get(small).load_seconds = 0.25  # and medium for small, loaded again
    assert list(pool._loaded) == ["small"]
    assert pool.load_seconds() == {"small": 0.75, "medium": 2.0}
    pool.close()
    assert pool.load_seconds() == {"small": 0.75, "medium": 2.0}
    assert ModelPool().load_seconds() == {}  # nothing loaded, nothing listed


def test_cli_parallel_option(tiny_models_toml: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["batch", "--models", str(tiny_models_toml), "--parallel", "0"])
    assert result.exit_code == 2 and "--parallel" in result.output
    result = runner.invoke(app, ["batch", "--help"])
    assert "--parallel" in result.output


def test_memory_budget_counts_the_caches_models_hold_when_the_next_is_asked_for(
    parallel_fakes: Callable[..., dict[str, ParallelFake]], tiny_models_toml: Path
) -> None:
    parallel_fakes({})
    small, medium = _small_and_medium_of_1000_bytes(tiny_models_toml)
    for held, loaded in ((0, ["small", "medium"]), (500, ["medium"])):
        pool = ModelPool(2400)
        # small's answered-example snapshots hold `held` bytes by the time medium is asked
        # for: two files of 1000 fit in 2400, but not with 500 more.
        pool.get(small).cache_memory = lambda held=held: held  # type: ignore[method-assign]
        pool.get(medium)
        assert list(pool._loaded) == loaded
