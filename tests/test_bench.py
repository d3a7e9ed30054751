"""`cre models bench` bookkeeping: speeds keyed by file and thread count, unsteady runs
flagged and re-measured, and the crash probe run before any measurement. No model runs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from crecli import config
from crecli.config import ModelSpec
from crecli.models import bench, llama


def _speed(name: str = "m", sha: str | None = "a" * 64, threads: int = 2, **kw: object) -> bench.Speed:
    base = dict(pp_tokens_per_s=100.0, tg_tokens_per_s=10.0, load_seconds=0.5, pp_tokens=256, tg_tokens=64, measured_at="now")
    base.update(kw)
    return bench.Speed(name, sha, threads, **base)  # type: ignore[arg-type]


def test_speeds_are_stored_per_file_and_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ModelSpec(name="m", sha256="a" * 64)
    bench.save(_speed(threads=2))
    monkeypatch.setenv("CRE_THREADS", "2")
    assert bench.stored(spec)["tg_tokens_per_s"] == 10.0
    assert bench.speeds([spec]) == {"m": (100.0, 10.0)}
    monkeypatch.setenv("CRE_THREADS", "3")  # another thread count: measure again
    assert bench.stored(spec) is None and bench.speeds([spec]) == {}
    monkeypatch.setenv("CRE_THREADS", "2")
    assert bench.stored(replace(spec, sha256="b" * 64)) is None  # another file: measure again


def test_a_broken_bench_file_reads_as_nothing_measured(cre_home: Path) -> None:
    from crecli import paths

    paths.ensure(paths.bench_file().parent)
    for text in ("[1, 2]", "{not json", '{"m@2": {"pp_tokens_per_s": "fast"}}'):
        paths.bench_file().write_text(text)
        assert bench.stored(ModelSpec(name="m"), threads=2) is None


def test_check_flags_disagreeing_runs_and_a_busy_machine() -> None:
    assert bench.check(_speed(repeats=3, pp_spread=0.05, tg_spread=0.1, busy_share=0.05)) == []
    [spread] = bench.check(_speed(repeats=3, tg_spread=0.6))
    assert "disagree by 60%" in spread
    [busy] = bench.check(_speed(busy_share=0.9))
    assert "90% of the CPUs" in busy


def test_run_probes_first_and_measures_an_unsteady_model_again(tiny_models_toml: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = config.load(tiny_models_toml)
    calls: list[str] = []
    results = iter([_speed("small", None, repeats=3, tg_spread=0.9), _speed("small", None, repeats=3, tg_spread=0.01)])

    def fake_measure(spec: ModelSpec, **kw: object) -> bench.Speed:
        calls.append(f"measure {spec.name}")
        speed = next(results)
        speed.warnings = bench.check(speed)
        return speed

    monkeypatch.setattr(llama, "probe", lambda spec: calls.append(f"probe {spec.name}"))
    monkeypatch.setattr(bench, "measure", fake_measure)
    [speed] = bench.run(settings, ["small"])
    assert calls == ["probe small", "measure small", "measure small"]
    assert speed.steady and bench.stored(settings.get("small"), threads=2) is not None


def test_run_stops_at_a_crashing_probe(tiny_models_toml: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from crecli.errors import BackendError

    def crash(spec: ModelSpec) -> None:
        raise BackendError(llama.CRASH_HINT.format(how="SIGSEGV", what=repr(spec.name)))

    monkeypatch.setattr(llama, "probe", crash)
    monkeypatch.setattr(bench, "measure", lambda *a, **k: pytest.fail("measured after a crash"))
    with pytest.raises(BackendError, match="AMX"):
        bench.run(config.load(tiny_models_toml), ["small"])
