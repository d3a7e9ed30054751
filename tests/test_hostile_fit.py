"""Hostile `cre fit` / `calibrate` / `eval` invocations: each is refused before any model
runs, with one `Error:` line (exit 1, or 2 for bad usage) or Click's usage error (exit 2), never a traceback, and the
input files are left byte for byte as they were. Also: plain progress lines when stderr is
not a terminal."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crecli import console, paths
from support.hostile import fit, refused

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


# ---------------------------------------------------------------- -o that would lose data


def test_a_fit_on_the_sums_log_runs_the_models(cre, sums_log, tiny_models_toml, four_fakes, tmp_path) -> None:
    """What makes `four_fakes == {}` below mean "refused before any model ran": on the
    same log and ladder, a fit that is not refused runs the models."""
    run = fit(cre, sums_log, tiny_models_toml, "-o", tmp_path / "r.cre")
    assert run.code == 0 and (tmp_path / "r.cre").exists(), run
    assert set(four_fakes) == {"small", "medium", "large"}


def test_a_jsonl_log_read_as_text_for_its_name_says_to_pass_format_jsonl(
    cre, sums_log, tiny_models_toml, four_fakes, tmp_path
) -> None:
    # `cre fit queries.log` holding JSONL: every JSON line, its reference too, was clustered
    # as a prompt, no model was measured, and the warning blamed the field names.
    named = tmp_path / "sums.log"
    named.write_bytes(sums_log.read_bytes())
    run = fit(cre, named, tiny_models_toml, "-o", tmp_path / "r.cre")
    assert run.code == 0 and four_fakes == {}, run
    said = " ".join(run.err.split())
    assert f"{named} was read as plain text" in said and "if it is JSONL, say so with --format jsonl" in said
    assert "--reference-field" not in said
    run = fit(cre, named, tiny_models_toml, "--format", "jsonl", "-o", tmp_path / "r2.cre")
    assert run.code == 0 and set(four_fakes) == {"small", "medium", "large"}, run


def test_output_that_is_the_log_is_refused(cre, sums_log, tiny_models_toml, four_fakes, tmp_path) -> None:
    before = sums_log.read_bytes()
    link = tmp_path / "link.cre"
    link.symlink_to(sums_log)
    hard = tmp_path / "hard.cre"
    os.link(sums_log, hard)
    (tmp_path / "sub").mkdir()
    for output in (sums_log, tmp_path / "sub" / ".." / sums_log.name, link, hard):
        refused(fit(cre, sums_log, tiny_models_toml, "-o", output), "is the query log", "Choose another file name")
    assert sums_log.read_bytes() == before and four_fakes == {}


def test_output_that_is_a_models_file_or_the_store_is_refused(cre, sums_log, tiny_models_toml, four_fakes, tmp_path) -> None:
    toml = tiny_models_toml.read_bytes()
    refused(fit(cre, sums_log, tiny_models_toml, "-o", tiny_models_toml), "is a models.toml")
    store = tmp_path / "outcomes.sqlite"
    store.write_bytes(b"")
    refused(fit(cre, sums_log, tiny_models_toml, "-o", store, "--store", store), "is the outcome store")
    refused(fit(cre, sums_log, tiny_models_toml, "-o", tmp_path / "r.cre", "--store", sums_log), "--store", "is the query log")
    assert tiny_models_toml.read_bytes() == toml and four_fakes == {}


def test_output_that_is_a_folder_or_nowhere_is_refused(cre, sums_log, tiny_models_toml, four_fakes, tmp_path) -> None:
    before = sums_log.read_bytes()
    refused(fit(cre, sums_log, tiny_models_toml, "-o", tmp_path), "is a folder", str(tmp_path / "router.cre"))
    refused(fit(cre, sums_log, tiny_models_toml, "-o", tmp_path / "no" / "such" / "r.cre"), "does not exist")
    refused(fit(cre, sums_log, tiny_models_toml, "-o", sums_log / "r.cre"), "is a file, not a folder")
    assert sums_log.read_bytes() == before and four_fakes == {}


def test_output_in_a_folder_that_refuses_writes_is_refused(cre, sums_log, tiny_models_toml, four_fakes, tmp_path, monkeypatch) -> None:
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
        refused(fit(cre, sums_log, tiny_models_toml, "-o", locked / "r.cre"), "cannot write in the folder")
    finally:
        locked.chmod(0o755)
    assert four_fakes == {}


# ---------------------------------------------------------------- CRE_HOME and settings.toml


def test_cre_home_that_is_a_file_is_refused_up_front(cre, sums_log, tiny_models_toml, four_fakes, tmp_path, monkeypatch) -> None:
    home = tmp_path / "home-file"
    home.write_text("not a folder")
    monkeypatch.setenv("CRE_HOME", str(home))
    run = fit(cre, sums_log, tiny_models_toml, "-o", tmp_path / "r.cre")
    refused(run, f"CRE_HOME={home} must be a folder you can write to")
    assert home.read_text() == "not a folder" and not (tmp_path / "r.cre").exists() and four_fakes == {}


def test_read_only_cre_home_is_refused_up_front(cre, sums_log, tiny_models_toml, four_fakes, tmp_path, cre_home, monkeypatch) -> None:
    data = cre_home / "data"
    data.mkdir(parents=True)
    import tempfile

    real = tempfile.TemporaryFile

    def no_writes(*args, dir=None, **kwargs):  # type: ignore[no-untyped-def]
        if dir is not None and Path(dir) == data:
            raise OSError(30, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", no_writes)
    refused(fit(cre, sums_log, tiny_models_toml, "-o", tmp_path / "r.cre"), f"cannot write in {data}", "CRE_HOME=")
    assert four_fakes == {}


def test_broken_settings_toml_with_set_default_is_refused_up_front(cre, sums_log, tiny_models_toml, four_fakes, tmp_path) -> None:
    settings = paths.user_settings_file()
    settings.parent.mkdir(parents=True)
    settings.write_bytes(b"default_router = [unclosed\n")
    run = fit(cre, sums_log, tiny_models_toml, "-o", tmp_path / "r.cre", "--set-default")
    refused(run, str(settings), "fix or delete the file")
    assert settings.read_bytes() == b"default_router = [unclosed\n"
    assert not (tmp_path / "r.cre").exists() and four_fakes == {}


def test_settings_toml_is_replaced_whole(tmp_path: Path) -> None:
    paths.write_user_settings({"default_router": "/a.cre", "log_queries": False, "team": {"other": 1}})
    assert paths.read_user_settings() == {"default_router": "/a.cre", "log_queries": False, "team": {"other": 1}}
    assert [p.name for p in paths.user_settings_file().parent.iterdir()] == ["settings.toml"]  # no temp file left


# ---------------------------------------------------------------- options out of range


@pytest.mark.parametrize(
    "args",
    [
        ("--k", "0"), ("--k", "-1"), ("--min-samples", "-1"), ("--min-samples", "0"),
        ("--min-cluster-size", "1"), ("--n-neighbors", "1"), ("--n-components", "0"),
        ("--max-fit-rows", "0"), ("--sample-per-cluster", "0"), ("--seed", "-1"),
        ("--temperature", "-0.5"), ("--temperature", "nan"), ("--temperature", "inf"),
        # Over what a router can record: refused only as the router was saved, after the fit.
        ("--max-prompt-bytes", "0"), ("--max-prompt-bytes", str((1 << 40) + 1)),
    ],
)
def test_fit_options_out_of_range_are_usage_errors(cre, sums_log, tiny_models_toml, four_fakes, tmp_path, args) -> None:
    before = sums_log.read_bytes()
    run = fit(cre, sums_log, tiny_models_toml, "-o", tmp_path / "r.cre", *args)
    assert run.code == 2 and "Traceback" not in run.err, run
    assert args[0] in run.err and "Invalid value" in run.err
    assert sums_log.read_bytes() == before and not (tmp_path / "r.cre").exists() and four_fakes == {}


@pytest.mark.parametrize("args", [("--retain", "0"), ("--retain", "nan"), ("--max-cost", "-1"), ("--max-cost", "inf")])
def test_fit_budget_out_of_range_is_refused(cre, sums_log, tiny_models_toml, four_fakes, tmp_path, args) -> None:
    refused(fit(cre, sums_log, tiny_models_toml, "-o", tmp_path / "r.cre", *args), args[0], code=2)
    assert four_fakes == {}


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
def test_other_numeric_options_are_checked(cre, tiny_models_toml, four_fakes, args) -> None:
    run = cre(*args, "--models", tiny_models_toml)
    assert run.code == 2 and "Invalid value" in run.err and "Traceback" not in run.err, run
    assert four_fakes == {}


# ---------------------------------------------------------------- calibrate and eval outputs


def test_calibrate_refuses_bad_outputs_and_options(cre, saved_router, sums_log, tiny_models_toml, four_fakes, tmp_path) -> None:
    before, router_bytes = sums_log.read_bytes(), saved_router.read_bytes()
    m = ("--models", tiny_models_toml, "--log", sums_log)
    refused(cre("calibrate", saved_router, *m, "-o", sums_log), "is the query log")
    refused(cre("calibrate", saved_router, *m, "-o", tmp_path), "is a folder")
    refused(cre("calibrate", saved_router, *m, "-o", tmp_path / "gone" / "r.cre"), "does not exist")
    refused(cre("calibrate", saved_router, *m, "--retain", "2"), "--retain", code=2)
    # Refused before the log is read and its missing answers run, not after.
    refused(cre("calibrate", saved_router, *m, "--check", "agreemnt"), "unknown quality check", code=2)
    refused(cre("calibrate", saved_router, *m, "--store", sums_log), "--store", "is the query log")
    refused(cre("calibrate", saved_router, *m, "--store", saved_router), "--store", "is the router")
    for bad in (("--folds", "1"), ("--seed", "-1")):
        run = cre("calibrate", saved_router, *m, *bad)
        assert run.code == 2 and bad[0] in run.err and "Traceback" not in run.err, run
    assert sums_log.read_bytes() == before and saved_router.read_bytes() == router_bytes and four_fakes == {}


def test_eval_plot_or_store_over_an_input_is_refused(cre, saved_router, sums_log, tiny_models_toml, four_fakes, tmp_path) -> None:
    before, router_bytes = sums_log.read_bytes(), saved_router.read_bytes()
    m = ("--router", saved_router, "--models", tiny_models_toml)
    refused(cre("eval", sums_log, *m, "--plot", sums_log), "--plot", "is the log")
    refused(cre("eval", sums_log, *m, "--plot", saved_router), "--plot", "is the router")
    refused(cre("eval", sums_log, *m, "--plot", tmp_path), "is a folder", "frontier.svg")
    # A plot it cannot draw is refused before the replay, not after it (--live answers first).
    refused(cre("eval", sums_log, *m, "--live", "--plot", tmp_path / "frontier.pdf"), "--plot", ".svg or .png", code=2)
    assert not (tmp_path / "frontier.pdf").exists()
    refused(cre("eval", sums_log, *m, "--store", sums_log), "--store", "is the log")
    assert sums_log.read_bytes() == before and saved_router.read_bytes() == router_bytes and four_fakes == {}


def test_eval_plot_replaces_only_a_plot_it_wrote(cre, saved_router, sums_log, tiny_models_toml, four_fakes, tmp_path) -> None:
    """`--plot diagram.svg` replaced any picture with no word."""
    from types import SimpleNamespace

    from crecli import reports

    picture = tmp_path / "diagram.svg"
    picture.write_text('<svg xmlns="http://www.w3.org/2000/svg"><text>my diagram</text></svg>')
    before = picture.read_bytes()
    m = ("--router", saved_router, "--models", tiny_models_toml)
    refused(cre("eval", sums_log, *m, "--plot", picture), "--plot", "exists and it is not a plot cre eval wrote",
            "Choose another file name, or delete the file first")
    assert picture.read_bytes() == before and four_fakes == {}
    # A plot cre eval wrote, or an empty file, may be replaced.
    from crecli.evaluate import PLOT_SOFTWARE, check_plot, is_plot

    report = SimpleNamespace(n=3, unit="seconds", points=[SimpleNamespace(name="cascade (x)", mean_cost=1.0, accuracy=0.9)])
    plot = tmp_path / "frontier.svg"
    reports.plot(report, plot)
    check_plot(plot)
    (tmp_path / "empty.svg").write_bytes(b"")
    check_plot(tmp_path / "empty.svg")

    assert is_plot(_png(b"Software\x00" + PLOT_SOFTWARE.encode()))
    assert not is_plot(_png(b"Software\x00GIMP 2.10"))


def _png(*text: bytes, width: int = 1, height: int = 1) -> bytes:
    """A PNG's chunks with the tEXt chunks `text` (b"key\\0value"), no pixels."""
    import struct
    import zlib

    chunks = [(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)), *((b"tEXt", t) for t in text),
              (b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d))
                                            for k, d in chunks)


def test_an_unmarked_matplotlib_png_is_refused_with_how_to_proceed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PNG plot of a crecli from before the mark carries only matplotlib's own Software
    text, as any chart matplotlib saves at 7 x 5 inches and 120 dpi does: it stays refused,
    and the refusal said only "delete the file first", with no word on why cre's own plot was
    no plot of cre's. It now says, and gives the command."""
    import importlib.util

    from crecli import evaluate
    from crecli.errors import CreError

    find_spec = importlib.util.find_spec  # PNG plots need matplotlib, which the tests lack
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "matplotlib" else find_spec(name, *a))
    old = tmp_path / "old frontier.png"
    old.write_bytes(_png(b"Software\x00Matplotlib version3.8.4, https://matplotlib.org/", width=840, height=600))
    before = old.read_bytes()
    with pytest.raises(CreError) as caught:
        evaluate.check_plot(old)
    message = str(caught.value)
    assert "matplotlib saved it with no crecli mark, as cre eval did before it marked its PNG plots" in message
    assert message.endswith(f"delete it (`rm -- '{old}'`) and run again; otherwise choose another file name")
    assert old.read_bytes() == before
    # Another PNG keeps the refusal every other file gets.
    other = tmp_path / "photo.png"
    other.write_bytes(_png(b"Software\x00GIMP 2.10"))
    with pytest.raises(CreError, match="it is not a plot cre eval wrote; .*Choose another file name, or delete"):
        evaluate.check_plot(other)


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


def test_calibrate_and_eval_skip_bad_lines_or_not_whatever_the_fit_did(
    cre, router, saved_router, tiny_models_toml, four_fakes, tmp_path
) -> None:
    # The error said "pass --skip-bad", which `cre calibrate` lacked, and `cre eval --skip-bad`
    # could only turn skipping on: a router fitted with --skip-bad could not be made to stop.
    from dataclasses import replace

    from crecli import routerfile
    from crecli.querylog import LogOptions
    from support.logs import write_sums_log

    log = write_sums_log(tmp_path / "bad.jsonl", 12)
    log.write_text(log.read_text() + "{not json\n")
    m = ("--models", tiny_models_toml)
    refused(cre("calibrate", saved_router, *m, "--log", log, "--folds", "2"), "bad.jsonl:13", "--skip-bad")
    run = cre("calibrate", saved_router, *m, "--log", log, "--folds", "2", "--skip-bad", "-o", tmp_path / "c.cre")
    assert run.code == 0 and "Skipped 1 bad line" in run.err, run
    skipping = tmp_path / "skipping.cre"
    routerfile.save(replace(router, fit=replace(router.fit, reader=LogOptions(skip_bad=True))), skipping)
    assert cre("eval", log, "--router", skipping, *m).code == 0
    refused(cre("eval", log, "--router", skipping, *m, "--no-skip-bad"), "bad.jsonl:13", "--skip-bad")
    run = cre("calibrate", skipping, *m, "--log", log, "--folds", "2", "--no-skip-bad", "-o", tmp_path / "d.cre")
    refused(run, "bad.jsonl:13")


# ---------------------------------------------------------------- --truth-field


def test_truth_field_no_row_has_is_refused_before_any_model_runs(cre, tiny_models_toml, four_fakes, tmp_path) -> None:
    """A misspelt --truth-field was the text "None" on every row: exit 0, "NMI 0.000, ARI 0.000"."""
    import json

    log = tmp_path / "sources.jsonl"
    log.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"What is {i} plus {i}?", "reference": str(2 * i),
                                       "meta": {"source": "sums"}}) + "\n" for i in range(12)))
    run = fit(cre, log, tiny_models_toml, "-o", tmp_path / "r.cre", "--truth-field", "meta.sorce")
    refused(run, "--truth-field meta.sorce", "no row of", "meta.source")
    assert not (tmp_path / "r.cre").exists() and four_fakes == {}


def test_truth_field_only_some_rows_have_is_scored_on_those(cre, tiny_models_toml, four_fakes, tmp_path) -> None:
    import json

    log = tmp_path / "sources.jsonl"
    rows = [{"id": f"q{i}", "prompt": f"What is {i} plus {i}?", "reference": str(2 * i), "match": "numeric",
             **({"meta": {"source": "sums"}} if i < 9 else {})} for i in range(12)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = fit(cre, log, tiny_models_toml, "-o", tmp_path / "r.cre", "--truth-field", "meta.source", "--json")
    assert run.code == 0, run
    assert "Warning: --truth-field meta.source: 3 of 12 rows" in run.err and "over the other 9" in run.err
    assert set(json.loads(run.out)["truth"]) == {"nmi", "ari"}


# ---------------------------------------------------------------- calibrate --votes


def test_calibrate_votes_with_the_agreement_check_is_bad_usage(cre, saved_router, tiny_models_toml, four_fakes) -> None:
    # --votes was dropped without a word: the agreement check counts every vote the fit recorded.
    run = cre("calibrate", saved_router, "--models", tiny_models_toml, "--check", "agreement", "--votes", "3")
    refused(run, "--votes is for --check deferral", "(its --k)", code=2)
    assert four_fakes == {}


def test_calibrate_votes_beyond_the_routers_votes_names_what_to_do(cre, router, tiny_models_toml, four_fakes, tmp_path) -> None:
    # Exit 1 (the count is good in itself; this router records fewer), with the range and the fix.
    from dataclasses import replace

    from crecli import routerfile
    from crecli.quality import QualityCheck

    greedy = tmp_path / "greedy.cre"
    routerfile.save(replace(router, quality=QualityCheck(k=1)), greedy)
    run = cre("calibrate", greedy, "--models", tiny_models_toml, "--votes", "3")
    refused(run, "--votes 3: the router records 1 vote(s) a query; use 1, or refit with --k 3 or more")
    assert four_fakes == {}


def test_eval_and_calibrate_say_a_missing_log_before_loading_the_router(cre, saved_router, tiny_models_toml, four_fakes,
                                                                        tmp_path) -> None:
    # The router loaded first and printed its warnings, then the wrong path was said.
    missing = tmp_path / "missing.jsonl"
    for run in (cre("eval", missing, "-r", saved_router, "--models", tiny_models_toml),
                cre("calibrate", saved_router, "--log", missing, "--models", tiny_models_toml)):
        refused(run, f"{missing}: no such file; check the path")
        assert run.err.startswith("Error: "), run.err
    run = cre("eval", tmp_path, "-r", saved_router, "--models", tiny_models_toml)
    refused(run, f"{tmp_path}: is a directory; pass a query log file")
    assert run.err.startswith("Error: ") and four_fakes == {}


def test_an_unlabelled_log_is_refused_in_words_for_calibrate_and_eval_alike(cre, saved_router, tiny_models_toml,
                                                                           four_fakes, tmp_path) -> None:
    # `cre calibrate` said there were no labelled queries "to evaluate on".
    log = tmp_path / "plain.jsonl"
    log.write_text("".join(f'{{"prompt": "What is {i} plus {i}?"}}\n' for i in range(12)))
    for run in (cre("calibrate", saved_router, "--log", log, "--models", tiny_models_toml),
                cre("eval", log, "-r", saved_router, "--models", tiny_models_toml)):
        refused(run, f"{log}: no labelled queries (a 'reference' or 'labels' field), so no model can be scored on it")
        assert "evaluate" not in run.err
    assert four_fakes == {}


@pytest.mark.parametrize(("option", "value"), [("--id-field", ""), ("--labels-field", "x" * 200),
                                               ("--match-field", "a\tb")])
def test_field_names_no_router_can_record_are_refused_before_models_run(
    cre, sums_log, tiny_models_toml, four_fakes, tmp_path, option, value
) -> None:
    # The router's loader reads its field names as printable names of 1 to 128 characters:
    # the save refused these after every model had run.
    run = fit(cre, sums_log, tiny_models_toml, option, value, "-o", tmp_path / "r.cre")
    refused(run, option, "the router records the field names", code=2)
    assert four_fakes == {}


def test_a_log_named_in_non_utf8_bytes_is_refused_before_models_run(
    cre, sums_log, tiny_models_toml, four_fakes, tmp_path
) -> None:
    named = Path(os.fsdecode(os.fsencode(tmp_path) + b"/sums-\xe9.jsonl"))
    named.write_bytes(sums_log.read_bytes())
    refused(fit(cre, named, tiny_models_toml, "-o", tmp_path / "r.cre"), "not UTF-8", "rename the file")
    assert four_fakes == {}


def test_set_default_with_a_non_utf8_router_name_is_refused_before_models_run(
    cre, sums_log, tiny_models_toml, four_fakes, tmp_path
) -> None:
    # settings.toml could not record the name: a UnicodeEncodeError traceback after the fit.
    out = Path(os.fsdecode(os.fsencode(tmp_path) + b"/r\xe9.cre"))
    refused(fit(cre, sums_log, tiny_models_toml, "-o", out, "--set-default"), "--set-default", code=2)
    assert four_fakes == {}


def test_format_text_given_is_not_blamed_on_the_logs_name(cre, sums_log, tiny_models_toml, four_fakes, tmp_path) -> None:
    run = fit(cre, sums_log, tiny_models_toml, "--format", "text", "-o", tmp_path / "r.cre")
    said = " ".join(run.err.split())
    assert run.code == 0 and "--format text was given" in said and "its name does not end in" not in said


def test_shots_no_cluster_can_try_are_warned_about(cre, sums_log, tiny_models_toml, four_fakes, tmp_path) -> None:
    # "Answering 0 queries after 3 answered example(s)" was all it said.
    run = fit(cre, sums_log, tiny_models_toml, "--shots", "0,3", "--sample-per-cluster", "4", "-o", tmp_path / "r.cre")
    said = " ".join(run.err.split())
    assert run.code == 0, run
    assert "Answering 0 queries" not in said and "--shots 0,3: no cluster has 3 labelled queries" in said
