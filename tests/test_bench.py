"""`cre models bench` bookkeeping: speeds keyed by file and thread count, unsteady runs
flagged and re-measured, and the crash probe run before any measurement. No model runs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from crecli import config, paths
from crecli.config import ModelSpec
from crecli.models import bench, llama, runtime, tokens


def _speed(name: str = "m", sha: str | None = "a" * 64, threads: int = 2, **kw: object) -> bench.Speed:
    base = dict(pp_tokens_per_s=100.0, tg_tokens_per_s=10.0, load_seconds=0.5, pp_tokens=256, tg_tokens=64, measured_at="now")
    base.update(kw)
    return bench.Speed(name, sha, threads, **base)  # type: ignore[arg-type]


def test_speeds_are_stored_per_file_and_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ModelSpec(name="m", sha256="a" * 64)
    bench.save(_speed(threads=2))
    monkeypatch.setenv("CRE_THREADS", "2")
    assert bench.stored(spec)["tg_tokens_per_s"] == 10.0
    assert bench.speeds([spec]) == {"m": (100.0, 10.0, 0.0)}
    monkeypatch.setenv("CRE_THREADS", "3")  # another thread count: measure again
    assert bench.stored(spec) is None and bench.speeds([spec]) == {}
    monkeypatch.setenv("CRE_THREADS", "2")
    assert bench.stored(replace(spec, sha256="b" * 64)) is None  # another file: measure again


def test_two_benches_saving_at_once_keep_both_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each save read bench.json, added its run and wrote the file back: a second save that
    # read before the first wrote put back a file without the first one's run.
    import threading
    import time

    read = bench._stored_for_update
    other: list[threading.Thread] = []

    def slow_read(path: Path) -> dict:
        data = read(path)
        if not other:  # the first save: another starts while this one holds what it read
            other.append(threading.Thread(target=bench.save, args=(_speed("n", "b" * 64),)))
            other[0].start()
            time.sleep(0.3)
        return data

    monkeypatch.setattr(bench, "_stored_for_update", slow_read)
    bench.save(_speed("m"))
    other[0].join(10)
    assert sorted(v["model"] for v in json.loads(paths.bench_file().read_text()).values()) == ["m", "n"]


def test_a_save_that_waits_too_long_for_the_lock_says_what_it_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    from crecli.errors import CreError

    monkeypatch.setattr(bench, "LOCK_WAIT_SECONDS", 0.0)
    paths.ensure(paths.bench_file().parent)
    with paths.exclusive(paths.bench_lock_file(), 0):
        with pytest.raises(CreError, match=r"held by another process.*m measured a 0.000 s prompt pass, 100.0 prompt and 10.0 generated"):
            bench.save(_speed("m"))
    assert not paths.bench_file().exists()


def test_stored_speed_is_the_median_of_the_runs_measured_the_same_way(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRE_THREADS", "2")
    spec = ModelSpec(name="m", sha256="a" * 64)
    for i, (pp, tg) in enumerate([(100.0, 10.0), (300.0, 30.0), (200.0, 5.0)]):
        stored = bench.save(_speed(pp_tokens_per_s=pp, tg_tokens_per_s=tg, measured_at=f"t{i}"))
    assert (stored.pp_tokens_per_s, stored.tg_tokens_per_s, stored.pooled) == (200.0, 10.0, 3)
    assert bench.speeds([spec]) == {"m": (200.0, 10.0, 0.0)}
    assert [r["measured_at"] for r in bench.stored(spec)["runs"]] == ["t0", "t1", "t2"]  # type: ignore[index]
    for i in range(bench.POOLED_RUNS):  # only the newest POOLED_RUNS count
        stored = bench.save(_speed(pp_tokens_per_s=50.0, measured_at=f"u{i}"))
    assert stored.pp_tokens_per_s == 50.0 and stored.pooled == bench.POOLED_RUNS
    # Measured another way (prompt length), or asked afresh: this run alone.
    assert bench.save(_speed(pp_tokens_per_s=80.0, pp_tokens=48)).pooled == 1
    assert bench.save(_speed(pp_tokens_per_s=90.0, pp_tokens=48)).pp_tokens_per_s == 85.0
    fresh = bench.save(_speed(pp_tokens_per_s=70.0, pp_tokens=48), fresh=True)
    assert (fresh.pp_tokens_per_s, fresh.pooled) == (70.0, 1)


def test_runs_with_another_gpu_offload_are_not_pooled(monkeypatch: pytest.MonkeyPatch) -> None:
    # Runs were pooled whatever `n_gpu_layers` they ran with: a run with every layer on a GPU
    # and one on the CPU gave a median that was neither machine's speed.
    monkeypatch.setenv("CRE_THREADS", "2")
    bench.save(_speed(pp_tokens_per_s=100.0))
    on_gpu = bench.save(_speed(pp_tokens_per_s=3000.0, n_gpu_layers=-1))
    assert (on_gpu.pooled, on_gpu.pp_tokens_per_s, on_gpu.n_gpu_layers) == (1, 3000.0, -1)
    assert bench.save(_speed(pp_tokens_per_s=2000.0, n_gpu_layers=-1)).pooled == 2  # the same offload pools
    assert json.loads(paths.bench_file().read_text())[f"{'a' * 64}@2"]["n_gpu_layers"] == -1
    assert bench.save(_speed(pp_tokens_per_s=100.0, n_gpu_layers=10)).pooled == 1  # another layer count
    # A measurement records the offload its model ran with.
    monkeypatch.setattr(bench, "_run_once", lambda spec, pp, tg: bench._Run(10.0, 5, pp, 0.1, 2, pp // 3, 0.23, 0.39))
    monkeypatch.setattr(bench, "_busy_share", lambda: 0.0)
    [measured] = bench.measure_all([ModelSpec(name="m", sha256="a" * 64, n_gpu_layers=-1)], repeats=1)
    assert measured.n_gpu_layers == -1


def test_a_bench_file_from_before_offload_was_recorded_pools_as_cpu_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    # bench.json entries written before `n_gpu_layers` was stored ran with the default, 0.
    monkeypatch.setenv("CRE_THREADS", "2")
    spec = ModelSpec(name="m", sha256="a" * 64)
    for i in range(2):
        bench.save(_speed(pp_tokens_per_s=100.0 + 100 * i))
    data = json.loads(paths.bench_file().read_text())
    del data[f"{'a' * 64}@2"]["n_gpu_layers"]
    paths.bench_file().write_text(json.dumps(data))
    assert bench.speeds([spec]) == {"m": (150.0, 10.0, 0.0)}  # still read and priced
    assert bench.save(_speed(pp_tokens_per_s=300.0)).pooled == 3
    data[f"{'a' * 64}@2"]["n_gpu_layers"] = True  # a hand edit: no layer count, kept apart
    paths.bench_file().write_text(json.dumps(data))
    assert bench.save(_speed(pp_tokens_per_s=300.0, n_gpu_layers=1)).pooled == 1
    paths.bench_file().write_text(json.dumps({f"{'a' * 64}@2": {**data[f"{'a' * 64}@2"], "n_gpu_layers": 0}}))
    assert bench.save(_speed(pp_tokens_per_s=300.0, n_gpu_layers=-1)).pooled == 1


def _timed(short: float, long: float, **kw: object) -> bench.Speed:
    """A measurement whose 16- and 48-token prompts took `short` and `long` seconds."""
    fixed, pp = bench.split_pass(16, short, 48, long)
    return _speed(pp_tokens=48, pp_short_tokens=16, short_seconds=short, long_seconds=long, pass_seconds=fixed,
                  pp_tokens_per_s=pp, **kw)


def test_a_prompts_pass_is_pooled_from_the_runs_timings_and_priced_once_per_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    from crecli.costs import Pricing, token_cost

    monkeypatch.setenv("CRE_THREADS", "2")
    spec = ModelSpec(name="m", sha256="a" * 64)
    # Noise moves a run's pass and rate together: (0 s, 100/s) and (0.36 s, 400/s) both took
    # 0.48 s for 48 tokens. Pooled from the timings, 48 tokens still cost 0.48 s; separate
    # medians of pass and rate (0.18 s, 250/s) would have priced them 22% lower.
    bench.save(_timed(0.16, 0.48))
    stored = bench.save(_timed(0.40, 0.48))
    assert stored.pooled == 2 and stored.pass_seconds + 48 / stored.pp_tokens_per_s == pytest.approx(0.48)
    for short, long in ((0.23, 0.39), (0.23, 0.39), (0.23, 0.39)):
        stored = bench.save(_timed(short, long))
    # The median timings of the last five runs (0.23 and 0.39 s): a 0.15 s pass and 200/s.
    assert stored.pass_seconds == pytest.approx(0.15) and stored.pp_tokens_per_s == pytest.approx(200.0)
    bench.save(_timed(0.25, 0.45), fresh=True)  # 6.25 ms a token after a 0.15 s pass
    assert bench.speeds([spec]) == {"m": (pytest.approx(160.0), 10.0, pytest.approx(0.15))}
    pricing = Pricing.for_models([spec])
    # 60 prompt tokens: a pass and 60 tokens at 160/s; 10 output tokens at 10/s.
    assert pricing.tokens("m", 60, 10) == pytest.approx(0.15 + 60 / 160 + 1.0)
    # A later vote reads its prompt from the cache: no pass.
    assert pricing.price_votes("m", 60, [10, 10], [0.0, 0.0]) == pytest.approx([1.525, 1.0])
    # Answered examples are a prompt pass of their own (`LlamaBackend._warm_prefix`).
    assert pricing.prefix("m", 100) == pytest.approx(0.15 + 100 / 160)
    # Rates with no pass, as speeds stored before passes were.
    assert token_cost("bench-seconds", 60, 10, speed=bench.Rates(100.0, 10.0)) == pytest.approx(1.6)
    # Measured before passes were: not pooled with runs that measured one.
    before_passes = bench.save(_speed(pp_tokens=48))  # differs from the entry in pp_short_tokens alone
    assert before_passes.pooled == 1 and bench.speeds([spec])["m"].pass_seconds == 0.0


def test_runs_stored_without_both_timings_never_pool_with_a_split_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    # 86f4fdf stored pp_short_tokens with no timings: such runs are dropped, not pooled (the
    # split needs both timings of every run).
    monkeypatch.setenv("CRE_THREADS", "2")
    bench.save(_timed(0.23, 0.39))
    data = json.loads(paths.bench_file().read_text())
    [entry] = data.values()
    entry["runs"][0]["short_seconds"] = None
    paths.bench_file().write_text(json.dumps(data))
    stored = bench.save(_timed(0.25, 0.45))
    assert stored.pooled == 1 and stored.pass_seconds == pytest.approx(0.15)
    # A speed carrying a short length but no timings (not one `measure_all` makes) pools as
    # before passes were, each figure's median, rather than failing on the missing timings.
    odd = bench.save(_speed(pp_tokens=48, pp_short_tokens=16, pass_seconds=0.1))
    assert odd.pooled == 2 and odd.pass_seconds == pytest.approx((0.15 + 0.1) / 2)


def test_a_measurement_splits_the_pass_from_the_median_timings_and_flags_a_noisy_short_prompt(
    tiny_models_toml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = config.load(tiny_models_toml)
    # The long prompt takes 0.39 s every round; the short one 0.23 s, once 0.40 s (noise).
    shorts = iter([0.23, 0.40, 0.23] * 2)

    def fake_run(spec: ModelSpec, pp_tokens: int, tg_tokens: int) -> bench._Run:
        return bench._Run(10.0, 5, pp_tokens, 0.1, 2, pp_tokens // bench.PP_SHORT_SHARE, next(shorts), 0.39)

    monkeypatch.setattr(llama, "probe", lambda spec: None)
    monkeypatch.setattr(bench, "_run_once", fake_run)
    monkeypatch.setattr(bench, "_busy_share", lambda: 0.0)
    [speed] = bench.run(settings, ["small"], repeats=3)
    # The medians (0.23 and 0.39 s) split: a 0.15 s pass, then 200 tokens/s.
    assert speed.pass_seconds == pytest.approx(0.15) and speed.pp_tokens_per_s == pytest.approx(200.0)
    # The long prompt never varied; the short one's 74% spread alone makes the run unsteady.
    assert speed.pp_spread == pytest.approx(bench.spread([16 / 0.23, 16 / 0.40, 16 / 0.23]))
    assert not speed.steady and "prompt timings disagree" in speed.warnings[0]


@pytest.mark.parametrize("bad", [float("nan"), -1.0, True, "0.1", None,
                                 pytest.param(10**400, id="10**400")])
def test_a_stored_pass_that_is_not_a_time_is_never_priced(monkeypatch: pytest.MonkeyPatch, bad: object) -> None:
    monkeypatch.setenv("CRE_THREADS", "2")
    spec = ModelSpec(name="m", sha256="a" * 64)
    bench.save(_timed(0.23, 0.39))
    data = json.loads(paths.bench_file().read_text())
    [entry] = data.values()
    entry["runs"][0]["pass_seconds"] = bad
    paths.bench_file().write_text(json.dumps(data))
    # A run with one is dropped from the pool; the next run pools alone.
    assert bench.save(_timed(0.23, 0.39)).pooled == 1
    data = json.loads(paths.bench_file().read_text())
    [entry] = data.values()
    entry["pass_seconds"] = bad
    paths.bench_file().write_text(json.dumps(data))
    # The entry's own: the model counts as not measured, rather than priced with it.
    assert bench.stored(spec) is None and bench.speeds([spec]) == {}


def test_split_pass_finds_a_prompts_pass_and_rate_and_holds_the_long_prompts_time() -> None:
    # 0.15 s a pass and 5 ms a token: 16 tokens take 0.23 s, 48 take 0.39 s.
    fixed, pp = bench.split_pass(16, 0.23, 48, 0.39)
    assert fixed == pytest.approx(0.15) and pp == pytest.approx(200.0)
    # Noise that puts the short prompt above the long one: no pass, the long prompt's rate.
    assert bench.split_pass(16, 0.40, 48, 0.39) == (0.0, pytest.approx(48 / 0.39))
    # A pass past the long prompt's time is clamped, and the rest of that time buys the tokens.
    fixed, pp = bench.split_pass(16, 0.389, 48, 0.39)
    assert fixed == pytest.approx(0.9 * 0.39) and fixed + 48 / pp == pytest.approx(0.39)
    assert bench.split_pass(0, 0.0, 48, 0.48) == (0.0, pytest.approx(100.0))  # nothing short timed


def test_a_measurement_times_a_short_and_a_long_prompt_and_splits_off_the_pass(
    tiny_models_toml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A model whose prompt takes 0.1 s a pass plus 2 ms a token and whose output takes 0.05 s a
    # token, on a clock that only its evals move.
    clock = [0.0]

    class FakeLlama:
        n_tokens = 0

        def tokenize(self, text: bytes, add_bos: bool = True) -> list[int]:
            return list(range(len(text.split())))

        def reset(self) -> None:
            self.n_tokens = 0

        def eval(self, toks: list[int]) -> None:
            clock[0] += 0.05 if len(toks) == 1 else 0.1 + 0.002 * len(toks)

        def sample(self, temp: float) -> int:
            return 1

    class FakeBackend:
        def __init__(self, spec: ModelSpec) -> None:
            self.llm, self.n_ctx, self.load_seconds, self.n_threads = FakeLlama(), 4096, 0.1, 2

        def close(self) -> None:
            pass

    monkeypatch.setattr(llama, "LlamaBackend", FakeBackend)
    monkeypatch.setattr(tokens, "prompt_head", lambda llm, fmt, *a: [7] * 5)
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    run = bench._run_once(config.load(tiny_models_toml).get("small"), 48, 8)
    assert (run.pp_tokens, run.pp_short, run.head) == (48, 16, 5)
    assert (run.short_seconds, run.long_seconds, run.tg) == (pytest.approx(0.132), pytest.approx(0.196), pytest.approx(20.0))
    assert bench.split_pass(16, run.short_seconds, 48, run.long_seconds) == (pytest.approx(0.1), pytest.approx(500.0))


def test_the_speeds_age_is_the_oldest_pooled_run_until_a_fresh_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setenv("CRE_THREADS", "2")
    spec = ModelSpec(name="m", sha256="a" * 64)
    ago = lambda hours: paths.stamp(time.time() - hours * 3600)
    bench.save(_speed(measured_at=ago(10)))
    bench.save(_speed(measured_at=ago(1)))
    # The stored median still pools the run of 10 h ago: the speeds are that old.
    assert 9.9 < bench.speeds_age_hours([spec], "bench-seconds") < 10.1
    assert bench.speeds_age_hours([spec], "seconds") is None  # nothing measured prices seconds
    bench.save(_speed(measured_at=ago(1)), fresh=True)
    assert 0.9 < bench.speeds_age_hours([spec], "bench-seconds") < 1.1
    bench.save(_speed(measured_at="now"))  # a time bench never writes: no age rather than a wrong one
    assert bench.speeds_age_hours([spec], "bench-seconds") is None
    assert bench.speeds_age_hours([ModelSpec(name="n", sha256="b" * 64)], "bench-seconds") is None  # never measured


def test_a_bench_file_from_before_pooling_counts_as_one_run_and_bad_runs_are_dropped(cre_home: Path) -> None:
    import json

    from crecli import paths

    old = {k: v for k, v in vars(_speed(pp_tokens_per_s=100.0)).items() if k != "runs"}
    paths.ensure(paths.bench_file().parent)
    paths.bench_file().write_text(json.dumps({f"{'a' * 64}@2": old}))
    assert bench.save(_speed(pp_tokens_per_s=200.0)).pp_tokens_per_s == 150.0
    data = json.loads(paths.bench_file().read_text())
    data[f"{'a' * 64}@2"]["runs"] += [{"pp_tokens_per_s": -1, "tg_tokens_per_s": 10}, "junk",
                                      {"pp_tokens_per_s": True, "tg_tokens_per_s": 10.0}]
    paths.bench_file().write_text(json.dumps(data))
    stored = bench.save(_speed(pp_tokens_per_s=400.0))
    assert stored.pooled == 3 and stored.pp_tokens_per_s == 200.0


def test_a_broken_bench_file_reads_as_nothing_measured(cre_home: Path) -> None:
    from crecli import paths

    paths.ensure(paths.bench_file().parent)
    for text in ("[1, 2]", "{not json", '{"m@2": {"pp_tokens_per_s": "fast"}}'):
        paths.bench_file().write_text(text)
        assert bench.stored(ModelSpec(name="m"), threads=2) is None


def test_a_run_saved_over_a_broken_bench_file_keeps_the_broken_one_aside(
    cre_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Rewriting it with only the model just measured would drop every other model's speeds.
    paths.ensure(paths.bench_file().parent)
    broken = '{"other@2": {"pp_tokens_per_s": 50.0, "tg_tokens_per_s": 5.0},}'  # a hand edit's trailing comma
    paths.bench_file().write_text(broken)
    bench.save(_speed())
    [aside] = paths.bench_file().parent.glob("bench.json.*.unreadable")
    assert aside.read_text() == broken and aside.name in capsys.readouterr().err
    assert list(json.loads(paths.bench_file().read_text())) == [f"{'a' * 64}@2"]


def test_a_run_saved_over_a_bench_file_that_is_not_utf8_keeps_it_aside(cre_home: Path) -> None:
    # It raised at save time, after every model was measured, and the figures were lost.
    paths.ensure(paths.bench_file().parent)
    paths.bench_file().write_bytes(b'{"caf\xe9@2": {}}')
    bench.save(_speed())
    [aside] = paths.bench_file().parent.glob("bench.json.*.unreadable")
    assert aside.read_bytes() == b'{"caf\xe9@2": {}}'
    assert list(json.loads(paths.bench_file().read_text())) == [f"{'a' * 64}@2"]


def test_check_flags_disagreeing_runs_and_a_busy_machine() -> None:
    assert bench.check(_speed(repeats=3, pp_spread=0.05, tg_spread=0.1, busy_share=0.05)) == []
    [spread] = bench.check(_speed(repeats=3, tg_spread=0.6))
    assert "disagree by 60%" in spread
    [busy] = bench.check(_speed(busy_share=0.9))
    assert "90% of the CPUs" in busy


def test_run_probes_first_then_measures_in_interleaved_rounds_and_again_when_unsteady(
    tiny_models_toml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = config.load(tiny_models_toml)
    calls: list[str] = []
    # small's second round runs at half speed in the first pass: unsteady, so every model
    # is measured once more and the second pass is stored.
    rates = {"small": iter([200.0, 100.0, 200.0, 210.0, 200.0, 190.0]), "medium": iter([50.0] * 6)}

    def fake_run(spec: ModelSpec, pp_tokens: int, tg_tokens: int) -> bench._Run:
        calls.append(spec.name)
        # No short prompt timed: the long one's rate, no pass.
        return bench._Run(10.0, 5, pp_tokens, 0.1, 2, 0, 0.0, pp_tokens / next(rates[spec.name]))

    monkeypatch.setattr(llama, "probe", lambda spec: calls.append(f"probe {spec.name}"))
    monkeypatch.setattr(bench, "_run_once", fake_run)
    monkeypatch.setattr(bench, "_busy_share", lambda: 0.0)
    speeds = bench.run(settings, ["small", "medium"], repeats=3)
    assert calls == ["probe small", "probe medium"] + ["small", "medium"] * 6
    assert [s.model for s in speeds] == ["small", "medium"] and all(s.steady for s in speeds)
    assert speeds[0].pp_tokens_per_s == pytest.approx(200.0) and speeds[0].repeats == 3 and speeds[0].head_tokens == 5
    assert bench.stored(settings.get("small"), threads=2)["pp_tokens_per_s"] == pytest.approx(200.0)  # type: ignore[index]


def test_run_stops_at_a_crashing_probe(tiny_models_toml: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from crecli.errors import BackendError

    def crash(spec: ModelSpec) -> None:
        raise BackendError(runtime.CRASH_HINT.format(how="SIGSEGV", what=repr(spec.name)))

    monkeypatch.setattr(llama, "probe", crash)
    monkeypatch.setattr(bench, "measure", lambda *a, **k: pytest.fail("measured after a crash"))
    with pytest.raises(BackendError, match="AMX"):
        bench.run(config.load(tiny_models_toml), ["small"])


def test_run_looks_every_name_up_before_probing_any(tiny_models_toml: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A typo in the last name was said only after each earlier model had been probed. A
    # typed name: bad usage (`ModelConfig.named`).
    from crecli.errors import UsageError

    monkeypatch.setattr(llama, "probe", lambda spec: pytest.fail(f"probed {spec.name} before every name was checked"))
    with pytest.raises(UsageError, match="nope"):
        bench.run(config.load(tiny_models_toml), ["small", "nope"])


class _Tokenizer:
    """Splits on spaces, one token per word plus a BOS: enough to find a shared head."""

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> list[int]:
        return ([0] if add_bos else []) + [hash(w) & 0xFFFF for w in text.decode().split(" ")]


def test_cached_head_is_what_two_unlike_prompts_share_once_tokenized() -> None:
    from crecli.models.prompting import render

    head = bench.cached_head_tokens(_Tokenizer(), "chatml")
    a = tokens.tokenize(_Tokenizer(), render("chatml", "What is 2 plus 2?"), add_bos=True)
    # The system turn and "<|im_start|>user\nWhat": the first prompt word merges with the
    # turn's last line under this toy tokenizer, so only whole shared words count.
    assert 5 < head < len(a)
    assert bench.cached_head_tokens(_Tokenizer(), "chat") == 1  # only the BOS: a remote template is unknown


def test_bench_seconds_leave_out_the_cached_head_and_other_units_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    from crecli.costs import CostModel, Pricing
    from crecli.outcomes import Outcome, Vote

    spec = ModelSpec(name="m", sha256="a" * 64)
    monkeypatch.setenv("CRE_THREADS", "2")
    bench.save(_speed(head_tokens=40))
    assert bench.cached_heads([spec]) == {"m": 40}
    pricing = Pricing.for_models([spec])
    assert pricing.unit == "bench-seconds" and pricing.cached("m") == 40
    # 100 prompt tokens, 40 cached: 60 at 100 tokens/s, and 10 output tokens at 10/s.
    assert pricing.tokens("m", 100, 10) == pytest.approx(0.6 + 1.0)
    assert pricing.tokens("m", 30, 0) == 0.0  # a prompt shorter than the head costs nothing to read
    outcome = Outcome("q", "p", "m", "a" * 64, "k", "run", 100, [Vote("4", 10, 9.0), Vote("4", 10, 1.0)])
    costs = CostModel.build([outcome], [spec])
    assert costs.votes(outcome) == pytest.approx([1.6, 1.0])  # later votes never paid for the prompt
    seconds = CostModel.build([outcome], [spec], unit="seconds")
    assert seconds.cached("m") == 0 and seconds.votes(outcome) == [9.0, 1.0]
    bench.save(_speed())  # measured before heads were: nothing left out
    assert bench.cached_heads([spec]) == {"m": 0} and Pricing.for_models([spec]).tokens("m", 100, 10) == pytest.approx(2.0)


def test_an_unpinned_models_speeds_follow_its_file_not_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Keyed by name, a file replaced under an unpinned name was priced with the old file's speeds.
    monkeypatch.setenv("CRE_THREADS", "2")
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    spec = ModelSpec(name="mine", path=gguf)
    bench.save(_speed("mine", bench.file_digest(spec)))
    assert bench.file_digest(spec) is not None and bench.stored(spec)["tg_tokens_per_s"] == 10.0  # type: ignore[index]
    gguf.write_bytes(b"GGUF" + b"\1" * 80)  # another model under the same name
    assert bench.stored(spec) is None and bench.speeds([spec]) == {}
    assert bench.file_digest(ModelSpec(name="gone", path=tmp_path / "missing.gguf")) is None


def test_a_remote_rung_is_never_priced_with_this_cpus_speeds(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pinning a local file's sha256 on a rung moved to a server (how a router accepts it)
    # made the server's answers priced at this CPU's measured speed of that file.
    monkeypatch.setenv("CRE_THREADS", "2")
    bench.save(_speed("m", "a" * 64))
    local = ModelSpec(name="m", sha256="a" * 64)
    assert bench.stored(local) is not None
    remote = ModelSpec(name="m", sha256="a" * 64, url="http://10.0.0.2:8000/v1", api_model="m")
    assert bench.stored(remote) is None and bench.speeds([remote]) == {}


def test_a_bench_of_remote_models_only_prints_no_table(tmp_path: Path) -> None:
    # It printed an empty "Measured speed on this machine" table on stdout, exit 0.
    from typer.testing import CliRunner

    from crecli.cli import app

    toml = tmp_path / "models.toml"
    toml.write_text('ladder = ["big"]\n[models.big]\nurl = "http://127.0.0.1:9/v1"\napi_model = "qwen"\n')
    table = CliRunner().invoke(app, ["models", "bench", "--models", str(toml)])
    assert table.exit_code == 0, table.output
    assert table.stdout == "" and "Nothing to measure here" in table.stderr
    assert "big: remote models are not benchmarked" in table.stderr
    listed = CliRunner().invoke(app, ["models", "bench", "--models", str(toml), "--json"])
    assert listed.exit_code == 0 and json.loads(listed.stdout) == [] and "Nothing to measure here" in listed.stderr


def test_a_bench_that_leaves_a_rung_priced_without_a_pass_says_which(
    tiny_models_toml: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = config.load(tiny_models_toml)
    monkeypatch.setenv("CRE_THREADS", "2")
    monkeypatch.setattr(llama, "probe", lambda spec: None)
    monkeypatch.setattr(bench, "_run_once", lambda spec, pp, tg: bench._Run(10.0, 5, pp, 0.1, 2, pp // 3, 0.23, 0.39))
    monkeypatch.setattr(bench, "_busy_share", lambda: 0.0)
    medium = settings.get("medium")
    bench.save(replace(_speed("medium", medium.sha256, threads=2), pp_tokens=48))  # measured by an older cre
    bench.run(settings, ["small"], repeats=1)
    err = capsys.readouterr().err
    assert "medium still priced without a prompt pass" in err and "cre models bench medium" in err
    bench.run(settings, ["small", "medium"], repeats=1)  # every rung measured alike: nothing to say
    assert "without a prompt pass" not in capsys.readouterr().err


def test_a_model_named_twice_is_measured_and_stored_once(
    tiny_models_toml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `cre models bench small small` measured small twice and stored the one run as two of
    # the runs its speed pools.
    settings = config.load(tiny_models_toml)
    calls: list[str] = []
    monkeypatch.setenv("CRE_THREADS", "2")
    monkeypatch.setattr(llama, "probe", lambda spec: calls.append(f"probe {spec.name}"))
    monkeypatch.setattr(bench, "_run_once", lambda spec, pp, tg: calls.append(spec.name) or bench._Run(
        10.0, 5, pp, 0.1, 2, pp // 3, 0.23, 0.39))
    monkeypatch.setattr(bench, "_busy_share", lambda: 0.0)
    speeds = bench.run(settings, ["small", "medium", "small"], repeats=1)
    assert calls == ["probe small", "probe medium", "small", "medium"]
    assert [s.model for s in speeds] == ["small", "medium"] and len(speeds[0].runs) == 1
    assert len(bench.stored(settings.get("small"), threads=2)["runs"]) == 1  # type: ignore[index]


def test_models_pull_names_each_model_once(tmp_path: Path) -> None:
    # `cre models pull` shares the lookup (`ModelConfig.named`): a name given twice was pulled twice.
    from typer.testing import CliRunner

    from crecli.cli import app

    toml = tmp_path / "models.toml"
    toml.write_text('ladder = ["big"]\n[models.big]\nurl = "http://127.0.0.1:9/v1"\napi_model = "qwen"\n')
    result = CliRunner().invoke(app, ["models", "pull", "big", "big", "--models", str(toml), "--json"])
    assert result.exit_code == 0, result.output
    assert [r["model"] for r in json.loads(result.stdout)] == ["big"]
    assert config.load(toml).named(["big", "big"]) == [config.load(toml).get("big")]
    assert [s.name for s in config.load(toml).named()] == ["big"]  # no names: the ladder


def test_a_bench_that_meets_a_model_a_pull_would_mend_names_every_such_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # It named the first model whose file was missing, and the next bench stopped at the next.
    from crecli.errors import ModelNotAvailable
    from crecli.models import pull

    settings = config.load()
    gemma, small, large = settings.ladder_specs()
    assert gemma.file is not None
    gemma.file.parent.mkdir(parents=True, exist_ok=True)
    gemma.file.write_bytes(b"junk")  # the 0.5B and 1.5B not there
    monkeypatch.setattr(llama, "probe", lambda spec: pull.require_file(spec) and None)
    with pytest.raises(ModelNotAvailable) as caught:
        bench.run(settings, [gemma.name, large.name])
    assert str(caught.value).startswith(f"model {gemma.name!r} failed verification (size 4 != expected")
    assert str(caught.value).endswith(f", and {large.name!r} is not on disk: run `cre models pull {gemma.name} {large.name}`")
