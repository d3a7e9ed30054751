"""Hostile `cre fit` / `calibrate` / `eval` invocations: each is refused before any model
runs, with one `Error:` line (exit 1) or a usage error (exit 2), never a traceback, and the
input files are left byte for byte as they were. Also: plain progress lines when stderr is
not a terminal."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from crecli import cli, console, paths, routerfile
from crecli.models.fake import FakeBackend

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


@dataclass
class Run:
    code: int
    out: str
    err: str


@pytest.fixture
def cre(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., Run]:
    """Run `cre ARGS` through cli.main(), the real entry point (so `Error:` lines are what
    users see), in this process (so fake backends apply)."""

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
def log(tmp_path: Path) -> Path:
    path = tmp_path / "v.txt"
    rows = [{"id": f"q{i}", "prompt": f"What is {i} plus {i}?", "reference": str(2 * i), "match": "numeric"} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def fakes(fake_backends: Callable[..., dict[str, FakeBackend]]) -> dict[str, FakeBackend]:
    return fake_backends({"small": lambda text, p: "4", "medium": lambda text, p: "4", "large": lambda text, p: "4"})


def refused(run: Run, *words: str) -> None:
    """Exit 1 with exactly one line, `Error: ...`, naming each of `words`."""
    assert run.code == 1, run
    assert run.err.startswith("Error: ") and run.err.count("\n") == 1, run.err
    assert "Traceback" not in run.err and run.out == ""
    for word in words:
        assert word in run.err, (word, run.err)


def fit(cre: Callable[..., Run], log: Path, models: Path, *args: str | Path) -> Run:
    return cre("fit", log, "--models", models, *args)


# ---------------------------------------------------------------- -o that would lose data


def test_output_that_is_the_log_is_refused(cre, log, tiny_models_toml, fakes, tmp_path) -> None:
    before = log.read_bytes()
    link = tmp_path / "link.cre"
    link.symlink_to(log)
    hard = tmp_path / "hard.cre"
    os.link(log, hard)
    (tmp_path / "sub").mkdir()
    for output in (log, tmp_path / "sub" / ".." / "v.txt", link, hard):
        refused(fit(cre, log, tiny_models_toml, "-o", output), "is the query log", "Choose another file name")
    assert log.read_bytes() == before and fakes == {}


def test_output_that_is_a_models_file_or_the_store_is_refused(cre, log, tiny_models_toml, fakes, tmp_path) -> None:
    toml = tiny_models_toml.read_bytes()
    refused(fit(cre, log, tiny_models_toml, "-o", tiny_models_toml), "is a models.toml")
    store = tmp_path / "outcomes.sqlite"
    store.write_bytes(b"")
    refused(fit(cre, log, tiny_models_toml, "-o", store, "--store", store), "is the outcome store")
    refused(fit(cre, log, tiny_models_toml, "-o", tmp_path / "r.cre", "--store", log), "--store", "is the query log")
    assert tiny_models_toml.read_bytes() == toml and fakes == {}


def test_output_that_is_a_folder_or_nowhere_is_refused(cre, log, tiny_models_toml, fakes, tmp_path) -> None:
    before = log.read_bytes()
    refused(fit(cre, log, tiny_models_toml, "-o", tmp_path), "is a folder", str(tmp_path / "router.cre"))
    refused(fit(cre, log, tiny_models_toml, "-o", tmp_path / "no" / "such" / "r.cre"), "does not exist")
    refused(fit(cre, log, tiny_models_toml, "-o", log / "r.cre"), "is a file, not a folder")
    assert log.read_bytes() == before and fakes == {}


def test_output_in_a_folder_that_refuses_writes_is_refused(cre, log, tiny_models_toml, fakes, tmp_path, monkeypatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    if ROOT:  # root writes through a 0o555 folder: make the folder say no the way a read-only disk does
        import tempfile

        real = tempfile.TemporaryFile

        def no_writes(*args, dir=None, **kwargs):  # type: ignore[no-untyped-def]
            if dir is not None and Path(dir) == locked:
                raise PermissionError(13, "Read-only file system")
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "TemporaryFile", no_writes)
    else:
        locked.chmod(0o555)
    try:
        refused(fit(cre, log, tiny_models_toml, "-o", locked / "r.cre"), "cannot write in the folder")
    finally:
        locked.chmod(0o755)
    assert fakes == {}


# ---------------------------------------------------------------- CRE_HOME and settings.toml


def test_cre_home_that_is_a_file_is_refused_up_front(cre, log, tiny_models_toml, fakes, tmp_path, monkeypatch) -> None:
    home = tmp_path / "home-file"
    home.write_text("not a folder")
    monkeypatch.setenv("CRE_HOME", str(home))
    run = fit(cre, log, tiny_models_toml, "-o", tmp_path / "r.cre")
    refused(run, f"CRE_HOME={home} must be a folder you can write to")
    assert home.read_text() == "not a folder" and not (tmp_path / "r.cre").exists() and fakes == {}


def test_read_only_cre_home_is_refused_up_front(cre, log, tiny_models_toml, fakes, tmp_path, cre_home, monkeypatch) -> None:
    data = cre_home / "data"
    data.mkdir(parents=True)
    import tempfile

    real = tempfile.TemporaryFile

    def no_writes(*args, dir=None, **kwargs):  # type: ignore[no-untyped-def]
        if dir is not None and Path(dir) == data:
            raise OSError(30, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", no_writes)
    refused(fit(cre, log, tiny_models_toml, "-o", tmp_path / "r.cre"), f"cannot write in {data}", "CRE_HOME=")
    assert fakes == {}


def test_broken_settings_toml_with_set_default_is_refused_up_front(cre, log, tiny_models_toml, fakes, tmp_path) -> None:
    settings = paths.user_settings_file()
    settings.parent.mkdir(parents=True)
    settings.write_bytes(b"default_router = [unclosed\n")
    run = fit(cre, log, tiny_models_toml, "-o", tmp_path / "r.cre", "--set-default")
    refused(run, str(settings), "fix or delete the file")
    assert settings.read_bytes() == b"default_router = [unclosed\n"
    assert not (tmp_path / "r.cre").exists() and fakes == {}


def test_settings_toml_is_replaced_whole(tmp_path: Path) -> None:
    paths.write_user_settings({"default_router": "/a.cre", "other": 1})
    assert paths.read_user_settings() == {"default_router": "/a.cre", "other": 1}
    assert [p.name for p in paths.user_settings_file().parent.iterdir()] == ["settings.toml"]  # no temp file left


# ---------------------------------------------------------------- options out of range


@pytest.mark.parametrize(
    "args",
    [
        ("--k", "0"), ("--k", "-1"), ("--min-samples", "-1"), ("--min-samples", "0"),
        ("--min-cluster-size", "1"), ("--n-neighbors", "1"), ("--n-components", "0"),
        ("--max-fit-rows", "0"), ("--sample-per-cluster", "0"), ("--seed", "-1"),
        ("--temperature", "-0.5"), ("--temperature", "nan"), ("--temperature", "inf"),
    ],
)
def test_fit_options_out_of_range_are_usage_errors(cre, log, tiny_models_toml, fakes, tmp_path, args) -> None:
    before = log.read_bytes()
    run = fit(cre, log, tiny_models_toml, "-o", tmp_path / "r.cre", *args)
    assert run.code == 2 and "Traceback" not in run.err, run
    assert args[0] in run.err and "Invalid value" in run.err
    assert log.read_bytes() == before and not (tmp_path / "r.cre").exists() and fakes == {}


@pytest.mark.parametrize("args", [("--retain", "0"), ("--retain", "nan"), ("--max-cost", "-1"), ("--max-cost", "inf")])
def test_fit_budget_out_of_range_is_refused(cre, log, tiny_models_toml, fakes, tmp_path, args) -> None:
    refused(fit(cre, log, tiny_models_toml, "-o", tmp_path / "r.cre", *args), args[0])
    assert fakes == {}


@pytest.mark.parametrize(
    "args",
    [
        ("ask", "hi", "--model", "small", "--max-tokens", "0"),
        ("ask", "hi", "--model", "small", "--temperature", "-1"),
        ("ask", "hi", "--model", "small", "--temperature", "nan"),
        ("models", "bench", "--pp-tokens", "0"),
        ("models", "bench", "--tg-tokens", "-5"),
    ],
)
def test_other_numeric_options_are_checked(cre, tiny_models_toml, fakes, args) -> None:
    run = cre(*args, "--models", tiny_models_toml)
    assert run.code == 2 and "Invalid value" in run.err and "Traceback" not in run.err, run
    assert fakes == {}


# ---------------------------------------------------------------- calibrate and eval outputs


@pytest.fixture
def router(tmp_path: Path) -> Path:
    from test_escalate import make_router

    path = tmp_path / "router.cre"
    routerfile.save(make_router(), path)
    return path


def test_calibrate_refuses_bad_outputs_and_options(cre, router, log, tiny_models_toml, fakes, tmp_path) -> None:
    before, router_bytes = log.read_bytes(), router.read_bytes()
    m = ("--models", tiny_models_toml, "--log", log)
    refused(cre("calibrate", router, *m, "-o", log), "is the query log")
    refused(cre("calibrate", router, *m, "-o", tmp_path), "is a folder")
    refused(cre("calibrate", router, *m, "-o", tmp_path / "gone" / "r.cre"), "does not exist")
    refused(cre("calibrate", router, *m, "--retain", "2"), "--retain")
    refused(cre("calibrate", router, *m, "--store", log), "--store", "is the query log")
    refused(cre("calibrate", router, *m, "--store", router), "--store", "is the router")
    for bad in (("--folds", "1"), ("--seed", "-1")):
        run = cre("calibrate", router, *m, *bad)
        assert run.code == 2 and bad[0] in run.err and "Traceback" not in run.err, run
    assert log.read_bytes() == before and router.read_bytes() == router_bytes and fakes == {}


def test_eval_plot_or_store_over_an_input_is_refused(cre, router, log, tiny_models_toml, fakes, tmp_path) -> None:
    before, router_bytes = log.read_bytes(), router.read_bytes()
    m = ("--router", router, "--models", tiny_models_toml)
    refused(cre("eval", log, *m, "--plot", log), "--plot", "is the log")
    refused(cre("eval", log, *m, "--plot", router), "--plot", "is the router")
    refused(cre("eval", log, *m, "--plot", tmp_path), "is a folder", "frontier.svg")
    refused(cre("eval", log, *m, "--store", log), "--store", "is the log")
    assert log.read_bytes() == before and router.read_bytes() == router_bytes and fakes == {}


# ---------------------------------------------------------------- progress off a terminal


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_plain_progress_lines_every_interval_and_at_the_end(capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    capsys.readouterr()
    with console.progress(interval=30, clock=clock) as bar:
        task = bar.add_task("gemma-3-270m", total=299, unit="queries")
        for _ in range(120):
            clock.now += 0.5  # 2 queries a second
            bar.advance(task)
    assert capsys.readouterr().err.splitlines() == [
        "gemma-3-270m: 60/299 queries, 2.0/s, about 2m00s left",
        "gemma-3-270m: 120/299 queries, 2.0/s, about 1m30s left",
        "gemma-3-270m: 120/299 queries in 1m00s",  # left early: where it stopped
    ]

    with console.progress(interval=30, clock=clock) as bar:
        task = bar.add_task("gemma-3-270m", total=10, unit="queries")
        for _ in range(10):
            clock.now += 10  # slow: 10 s a query
            bar.advance(task)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "gemma-3-270m: 3/10 queries, 10.0 s each, about 1m10s left",
        "gemma-3-270m: 6/10 queries, 10.0 s each, about 40s left",
        "gemma-3-270m: 9/10 queries, 10.0 s each, about 10s left",
        "gemma-3-270m: 10/10 queries in 1m40s",
    ]


def test_short_loops_print_nothing_and_open_ended_tasks_close(capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    capsys.readouterr()
    with console.progress(interval=30, clock=clock) as bar:
        task = bar.add_task("quick", total=5)
        for _ in range(5):
            clock.now += 1
            bar.advance(task)
    assert capsys.readouterr().err == ""  # keeps stderr clean for --json-summary and short runs

    with console.progress(interval=30, clock=clock) as bar:
        task = bar.add_task("Answering", total=None)
        for _ in range(40):
            clock.now += 1
            bar.advance(task)
    assert capsys.readouterr().err.splitlines() == ["Answering: 30 so far, 1.0/s", "Answering: 40 in 40s"]


def test_progress_interval_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv(console.PROGRESS_INTERVAL_ENV, "0")
    assert console.progress_interval() == 0
    monkeypatch.setenv(console.PROGRESS_INTERVAL_ENV, "soon")
    capsys.readouterr()
    assert console.progress_interval() == console.DEFAULT_PROGRESS_INTERVAL
    assert "CRE_PROGRESS_INTERVAL='soon' is not a number" in capsys.readouterr().err


def test_running_models_reports_progress_in_a_log(tiny_models_toml, fake_backends, tmp_path, monkeypatch, capsys) -> None:
    """What `cre fit` under nohup shows while it runs the models."""
    from crecli import config
    from crecli.outcomes import OutcomeStore, collect
    from crecli.quality import QualityCheck
    from crecli.querylog import Record

    monkeypatch.setenv(console.PROGRESS_INTERVAL_ENV, "0")
    fake_backends({"small": lambda text, p: "4"})
    records = [Record(id=f"q{i}", prompt=f"What is {i} plus {i}?", reference=[str(2 * i)], match="numeric") for i in range(3)]
    capsys.readouterr()
    with OutcomeStore(tmp_path / "o.sqlite") as store:
        collect(records, config.load(tiny_models_toml), store, QualityCheck(k=2), models=["small"])
    err = capsys.readouterr().err
    assert "small: 3 queries to run" in err
    assert "small: 1/3 queries" in err and "small: 3/3 queries in " in err
