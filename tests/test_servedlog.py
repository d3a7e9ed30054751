"""The served-query log: appending, rotation, reading past bad lines, `--no-log` and the
`log_queries` setting, entries from `cre ask`, `cre batch` and `cre serve`, `cre log`, and
`cre fit --served` (served prompts join the clustering, never the labelled rows).

Models are FakeBackends on the tiny ladder; the fit test replaces UMAP + HDBSCAN with a
k-means stand-in, so it runs in a second.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
from typer.testing import CliRunner

from crecli import config, paths, routerfile, servedlog
from crecli.cli import app
from crecli.escalate import Cascade
from crecli.models.fake import FakeBackend
from crecli.servedlog import ServedLog
from support.ladder import install
from support.prompts import ADD, PERU, SURE_TABLE, trace
from support.routers import make_router


def prompts(reading: servedlog.LogReading) -> list[str]:
    return [e["prompt"] for e in reading.entries]


def cre(*args: str | Path, input: str | bytes | None = None) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


# ---------------------------------------------------------------- append, rotate, read


def test_an_entry_holds_the_prompt_answer_and_trace(tmp_path: Path) -> None:
    log = ServedLog(tmp_path / "served.jsonl", "ask", router=None)
    log.record("What is 7 plus 5?", trace())
    log.record("second", trace("x", "large", -1))
    reading = servedlog.read([log.path])
    assert reading.bad == 0 and log.written == 2
    first, second = reading.entries
    assert first["schema"] == servedlog.SCHEMA and first["command"] == "ask"
    assert first["time"].endswith("Z") and first["time"][:2] == "20"
    assert (first["prompt"], first["answer"], first["model"], first["cluster"]) == ("What is 7 plus 5?", "12", "small", 0)
    assert first["trace"]["start_model"] == "small" and first["trace"]["fallback"] is False
    assert (second["cluster"], second["trace"]["fallback"]) == (-1, True)
    # One line per entry, nothing else.
    assert log.path.read_bytes().count(b"\n") == 2
    # The prompts are the user's: only they may read the file.
    assert log.path.stat().st_mode & 0o077 == 0


def test_the_log_rotates_by_size_and_keeps_three_old_generations(tmp_path: Path) -> None:
    live = tmp_path / "served.jsonl"
    log = ServedLog(live, "batch", max_bytes=1)  # every append finds the file full
    for n in range(1, 7):
        log.record(f"prompt {n}", trace())
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".jsonl") == [
        "served.1.jsonl", "served.2.jsonl", "served.3.jsonl", "served.jsonl"]
    assert [json.loads(p.read_text())["prompt"] for p in (live, tmp_path / "served.1.jsonl")] == ["prompt 6", "prompt 5"]
    # Oldest first across the generations; prompts 1 and 2 went with the oldest file.
    assert prompts(servedlog.read(servedlog.log_files(live))) == [f"prompt {n}" for n in range(3, 7)]


@pytest.mark.parametrize("fault", [OSError, KeyboardInterrupt])
@pytest.mark.parametrize("step", [1, 2, 3])
def test_a_rotation_cut_off_at_any_rename_loses_no_generation_but_the_oldest(
    monkeypatch: pytest.MonkeyPatch, step: int, fault: type[BaseException]
) -> None:
    # Cut off before its last rename (live -> .1), a rotation left `.1` empty; the next one
    # shifted every file there was, so the old `.2` went too: 16 MiB of prompts that were
    # not the oldest. The next rotation fills the gap instead, and reading keeps the order.
    import os

    live = servedlog.log_path()
    log = ServedLog(live, "ask", max_bytes=1)  # every append finds the file full
    for name in "ABCD":
        log.record(name, trace())  # .3 A, .2 B, .1 C, live D
    real_replace = os.replace
    calls: list[int] = []

    def replace(src: Any, dst: Any) -> None:
        calls.append(1)
        if len(calls) == step:
            raise fault("cut off")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    try:
        log.record("E", trace())
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(calls) == step  # the fault was injected, and E was not written
    # Only the oldest, due to go, may be gone; `cre log`'s reading is still oldest first.
    assert prompts(servedlog.read()) == (["A", "B", "C", "D"] if step == 1 else ["B", "C", "D"])
    log.record("F", trace())
    assert prompts(servedlog.read()) == ["B", "C", "D", "F"]
    held = {p.name: json.loads(p.read_text())["prompt"] for p in servedlog.log_files(live)}
    assert held == {"served.3.jsonl": "B", "served.2.jsonl": "C", "served.1.jsonl": "D", "served.jsonl": "F"}


def test_reading_your_log_opens_every_generation_under_the_writers_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    # Listed, then opened one by one without it, a rotation in between read a file twice
    # and skipped another. The open files stay the generations they were once listed.
    import fcntl
    import os

    live = servedlog.log_path()
    log = ServedLog(live, "ask", max_bytes=1)
    for n in range(1, 4):
        log.record(f"prompt {n}", trace())
    lock = live.with_name(servedlog.LOCK_NAME)
    held: list[bool] = []
    real_open = servedlog._open

    def opening(path: Path) -> Any:
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(fd)
        return real_open(path)

    monkeypatch.setattr(servedlog, "_open", opening)
    assert prompts(servedlog.read()) == ["prompt 1", "prompt 2", "prompt 3"]
    assert held == [True, True, True]


def test_a_file_under_the_cap_is_not_rotated(tmp_path: Path) -> None:
    log = ServedLog(tmp_path / "served.jsonl", "ask", max_bytes=1 << 20)
    for n in range(5):
        log.record(f"prompt {n}", trace())
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".jsonl"] == ["served.jsonl"]


def test_bad_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "served.jsonl"
    log = ServedLog(path, "ask")
    log.record("good one", trace())
    with path.open("ab") as fh:
        fh.write(b'{"schema": 1, "time": "2025-01-01T00:00:00Z", "prom\n')  # cut short
        fh.write(b"\xff\xfe not utf-8\n")
        fh.write(b"[1, 2]\n")
        fh.write(b'{"schema": 99, "time": "2025-01-01T00:00:00Z", "prompt": "from the future"}\n')
        fh.write(b'{"schema": 1, "time": "yesterday", "prompt": "bad time"}\n')
        fh.write(b"\n")
    log.record("good two", trace())
    reading = servedlog.read([path])
    assert prompts(reading) == ["good one", "good two"]
    assert (reading.bad, reading.total) == (5, 2)


def test_concurrent_writers_never_interleave_lines(tmp_path: Path) -> None:
    """Separate ServedLog objects (separate locks), as separate processes would have: each
    64 KB entry must arrive whole, which it does only because it is one O_APPEND write."""
    path = tmp_path / "served.jsonl"
    big = "x" * 65536

    def writer(n: int) -> None:
        log = ServedLog(path, "serve")
        for i in range(25):
            log.record(f"{n}-{i} {big}", trace())

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reading = servedlog.read([path])
    assert reading.bad == 0 and reading.total == 100
    assert sorted(p.split(" ")[0] for p in prompts(reading)) == sorted(f"{n}-{i}" for n in range(4) for i in range(25))


def test_a_write_that_fails_warns_once_and_never_raises(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    log = ServedLog(blocker / "served.jsonl", "ask")
    log.record("one", trace())
    log.record("two", trace())
    err = capsys.readouterr().err
    assert err.count("Warning:") == 1 and "cannot write the served-query log" in err
    assert log.written == 0 and log.failed


def test_an_entry_over_the_size_limit_is_not_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = ServedLog(tmp_path / "served.jsonl", "ask")
    log.record("x" * (servedlog.MAX_ENTRY_BYTES + 1), trace())
    log.record("small", trace())
    assert prompts(servedlog.read([log.path])) == ["small"]
    assert "limit" in capsys.readouterr().err


def test_a_skipped_entry_does_not_silence_a_later_write_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # One oversize or unencodable entry latched `failed`, so a full disk after it went unsaid.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    log = ServedLog(blocker / "served.jsonl", "ask")
    log.record("x" * (servedlog.MAX_ENTRY_BYTES + 1), trace())
    assert not log.append({"schema": servedlog.SCHEMA, "agreement": float("nan")})
    log.record("x" * (servedlog.MAX_ENTRY_BYTES + 1), trace())  # each skipped entry is said
    assert not log.failed
    log.record("one", trace())
    log.record("two", trace())  # a write failure is still said once
    err = capsys.readouterr().err
    assert err.count("Warning:") == 4 and err.count("limit") == 2 and "could not encode" in err
    assert err.count("cannot write the served-query log") == 1 and log.failed and log.written == 0


def test_lone_surrogates_are_replaced_so_the_line_is_utf8(tmp_path: Path) -> None:
    log = ServedLog(tmp_path / "served.jsonl", "ask")
    log.record("caf\udce9?", trace())
    assert prompts(servedlog.read([log.path])) == ["caf\ufffd?"]


# ---------------------------------------------------------------- ask, batch, serve


def test_cre_ask_logs_the_routed_answer(
    fake_backends: Callable[..., dict[str, FakeBackend]], saved_router: Path, tiny_models_toml: Path
) -> None:
    install(fake_backends, SURE_TABLE)
    result = cre("ask", ADD, "--router", saved_router, "--models", tiny_models_toml)
    assert result.exit_code == 0, result.output
    assert result.stdout == "12\n"
    reading = servedlog.read()
    assert reading.files == [paths.data_dir() / "served.jsonl"]
    (entry,) = reading.entries
    assert (entry["command"], entry["prompt"], entry["answer"], entry["model"]) == ("ask", ADD, "12", "small")
    assert (entry["cluster"], entry["escalations"], entry["agreement"]) == (0, 0, 1.0)
    assert entry["router"] == str(saved_router.resolve())
    assert entry["router_sha256"] == hashlib.sha256(saved_router.read_bytes()).hexdigest()
    steps = entry["trace"]["steps"]
    assert [s["model"] for s in steps] == ["small"]
    # The cost is the model-seconds the votes took (no bench speeds here: unit "seconds").
    assert entry["cost_unit"] == "seconds" and entry["cost"] == pytest.approx(sum(s["seconds"] for s in steps))
    assert entry["cost"] > 0


def test_no_log_and_the_setting_keep_prompts_out(
    fake_backends: Callable[..., dict[str, FakeBackend]], saved_router: Path, tiny_models_toml: Path
) -> None:
    install(fake_backends, SURE_TABLE)
    base = ("--router", saved_router, "--models", tiny_models_toml)
    assert cre("ask", ADD, "--no-log", *base).exit_code == 0
    assert not servedlog.log_path().exists()

    paths.write_user_settings({"log_queries": False})
    assert cre("ask", ADD, *base).exit_code == 0
    assert cre("batch", *base, input=ADD + "\n").exit_code == 0
    assert not servedlog.log_path().exists()

    paths.write_user_settings({"log_queries": True})
    assert cre("ask", ADD, *base).exit_code == 0
    assert prompts(servedlog.read()) == [ADD]


def test_a_setting_that_is_not_a_boolean_stops_before_answering(
    fake_backends: Callable[..., dict[str, FakeBackend]], saved_router: Path, tiny_models_toml: Path
) -> None:
    created = install(fake_backends, SURE_TABLE)
    paths.write_user_settings({"log_queries": "no"})
    result = cre("ask", ADD, "--router", saved_router, "--models", tiny_models_toml)
    assert result.exit_code == 1
    assert "log_queries must be true or false" in str(result.exception)
    assert created == {}  # no model ran
    # --no-log needs no setting at all.
    assert cre("ask", ADD, "--router", saved_router, "--models", tiny_models_toml, "--no-log").exit_code == 0


def test_an_unwritable_log_still_answers(
    fake_backends: Callable[..., dict[str, FakeBackend]], saved_router: Path, tiny_models_toml: Path
) -> None:
    install(fake_backends, SURE_TABLE)
    servedlog.log_path().mkdir(parents=True)  # a folder where the file should be: every write fails
    result = cre("batch", "--router", saved_router, "--models", tiny_models_toml, input=f"{ADD}\n{PERU}\n")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["answer"] for line in result.stdout.splitlines()] == ["12", "Lima"]
    # Once for the whole batch (the others say the topics router pins no model file).
    assert result.stderr.count("cannot write the served-query log") == 1


def test_cre_batch_logs_each_answer_but_no_reference(
    fake_backends: Callable[..., dict[str, FakeBackend]], saved_router: Path, tiny_models_toml: Path
) -> None:
    install(fake_backends, SURE_TABLE)
    lines = [json.dumps({"id": "a", "prompt": ADD, "reference": "12", "match": "numeric"}), "{not json",
             json.dumps({"id": "b", "prompt": PERU})]
    result = cre("batch", "--router", saved_router, "--models", tiny_models_toml, input="\n".join(lines) + "\n")
    assert result.exit_code == 3, result.output  # the bad line got an error record
    entries = servedlog.read().entries
    assert [(e["command"], e["prompt"], e["answer"], e["trace"]["id"]) for e in entries] == [
        ("batch", ADD, "12", "a"), ("batch", PERU, "Lima", "b")]
    assert all("reference" not in e and "labels" not in e for e in entries)


def test_cre_serve_logs_cascade_answers_only(
    fake_backends: Callable[..., dict[str, FakeBackend]], tiny_models_toml: Path, tmp_path: Path
) -> None:
    from starlette.testclient import TestClient

    from crecli.serve_app import create_app

    install(fake_backends, SURE_TABLE)
    log = ServedLog(tmp_path / "served.jsonl", "serve")
    cascade = Cascade(make_router(), config.load(tiny_models_toml))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": ADD}]
    with TestClient(create_app(cascade, served=log)) as client:
        routed = client.post("/v1/chat/completions", json={"model": "cre", "messages": chat})
        direct = client.post("/v1/completions", json={"model": "medium", "prompt": PERU})
        completion = client.post("/v1/completions", json={"model": "cre", "prompt": PERU})
    assert [r.status_code for r in (routed, direct, completion)] == [200, 200, 200]
    entries = servedlog.read([log.path]).entries
    # The ladder model asked by name skipped the router: not logged.
    assert [(e["command"], e["prompt"], e["answer"]) for e in entries] == [("serve", ADD, "12"), ("serve", PERU, "Lima")]
    assert entries[0]["cost"] == routed.json()["cre"]["cost"]


def test_cre_serve_prices_each_answer_once_for_its_response_and_its_log_entry(
    fake_backends: Callable[..., dict[str, FakeBackend]], tiny_models_toml: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 23: the response and the served-query log each priced the trace (two calls, two
    homes for one figure); the job prices it once and hands the cost to both."""
    from starlette.testclient import TestClient

    from crecli.serve_app import create_app

    from crecli import live

    install(fake_backends, SURE_TABLE)
    priced: list[Any] = []
    price_steps = live.price_steps

    def counted(pricing: Any, runs: Any) -> list[float | None]:
        priced.append(runs)
        return price_steps(pricing, runs)

    monkeypatch.setattr(live, "price_steps", counted)
    log = ServedLog(tmp_path / "served.jsonl", "serve")
    cascade = Cascade(make_router(), config.load(tiny_models_toml))
    with TestClient(create_app(cascade, served=log)) as client:
        response = client.post("/v1/completions", json={"model": "cre", "prompt": ADD})
    assert response.status_code == 200
    [entry] = servedlog.read([log.path]).entries
    assert len(priced) == 1 and entry["cost"] == response.json()["cre"]["cost"] is not None


def test_serve_run_honours_no_log(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`cre serve --no-log` reaches the app as a disabled log."""
    from crecli import serve

    seen: list[ServedLog | None] = []

    class Stop(Exception):
        pass

    def fake_forever(cascade: Any, options: Any, sock: Any, name: Any = None, served: Any = None) -> None:
        seen.append(served)
        raise Stop

    class FakeCascade:
        ladder = ["small"]
        specs = {"small": config.ModelSpec(name="small", url="http://127.0.0.1:9/v1")}  # usable: no warning

        def __enter__(self) -> "FakeCascade":
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(serve, "serve_forever", fake_forever)
    monkeypatch.setattr("crecli.escalate.Cascade.from_file", classmethod(lambda cls, *a, **k: FakeCascade()))
    for no_log in (True, False):
        with pytest.raises(Stop):
            serve.run(tmp_path / "r.cre", options=serve.ServeOptions(port=0), no_log=no_log)
    assert [s.enabled for s in seen if s is not None] == [False, True]
    assert seen[1] is not None and seen[1].command == "serve"


# ---------------------------------------------------------------- cre log


def fill(n: int, start_day: int = 1) -> None:
    log = ServedLog(servedlog.log_path(), "ask")
    for i in range(n):
        entry = log.entry(f"question {i:02d}", trace(f"answer {i:02d}"))
        entry["time"] = f"2025-01-{start_day + i:02d}T12:00:00.000Z"
        assert log.append(entry)


def test_cre_log_shows_the_newest_20_and_the_path() -> None:
    fill(25)
    result = cre("log")
    assert result.exit_code == 0, result.output
    assert "question 24" in result.stdout and "question 05" in result.stdout and "question 04" not in result.stdout
    assert str(servedlog.log_path()) in result.stderr and "25 entries" in result.stderr
    assert "Showing the newest 20" in result.stderr
    assert cre("log", "--path").stdout == f"{servedlog.log_path()}\n"


def test_cre_log_json_last_and_since() -> None:
    fill(25)
    last = cre("log", "--last", "2", "--json")
    assert last.exit_code == 0, last.output
    assert [e["prompt"] for e in json.loads(last.stdout)] == ["question 23", "question 24"]
    since = json.loads(cre("log", "--since", "2025-01-23", "--json").stdout)
    assert [e["prompt"] for e in since] == ["question 22", "question 23", "question 24"]
    assert "--since" in str(cre("log", "--since", "last tuesday").exception)


def test_cre_log_last_too_large_for_a_deque_shows_every_entry() -> None:
    # `--last 99999999999999999999` was an OverflowError traceback from deque(maxlen=...).
    fill(3)
    huge = str(10**20)
    for args in (("--json",), ()):
        result = cre("log", "--last", huge, *args)
        assert result.exit_code == 0 and result.exception is None, result.output
        assert all(f"question {i:02d}" in result.stdout for i in range(3)) and "Showing the newest" not in result.stderr
    assert len(servedlog.read(last=10**20).entries) == 3


def test_cre_log_json_says_on_stderr_that_it_shows_only_the_newest_20() -> None:
    # --json gave the newest 20 of 25 with no word of the other 5.
    fill(25)
    result = cre("log", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 20  # stdout is still one JSON array
    assert "Showing the newest 20; --last N for more" in result.stderr
    everything = cre("log", "--json", "--last", "25")
    assert len(json.loads(everything.stdout)) == 25 and "Showing the newest" not in everything.stderr


def test_cre_log_path_with_another_option_is_bad_usage(tmp_path: Path) -> None:
    # --path printed the path and dropped -o, --json, --last and --since without a word.
    from crecli.errors import UsageError

    fill(3)
    for extra in (["-o", str(tmp_path / "x.jsonl")], ["--json"], ["--last", "2"], ["--since", "2025-01-02"]):
        result = cre("log", "--path", *extra)
        assert isinstance(result.exception, UsageError) and extra[0] in str(result.exception), (extra, result.output)
        assert result.stdout == ""
    assert not (tmp_path / "x.jsonl").exists()


def test_cre_log_exports_a_slice_that_fit_can_read(tmp_path: Path) -> None:
    fill(10)
    out = tmp_path / "export.jsonl"
    result = cre("log", "--since", "2025-01-06", "-o", out)
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and f"Wrote 5 entries to {out}" in result.stderr
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == [f"question {i:02d}" for i in range(5, 10)]
    assert prompts(servedlog.read([out])) == [f"question {i:02d}" for i in range(5, 10)]
    # Never over the log itself, and not both kinds of output at once.
    over = cre("log", "-o", servedlog.log_path())
    assert over.exit_code == 1 and "is the served-query log" in str(over.exception)
    assert cre("log", "-o", out, "--json").exit_code == 1


def test_cre_log_exports_to_stdout_with_a_dash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `-o -` wrote a file named "-"; it is stdout, as `cre batch -` reads stdin.
    fill(3)
    monkeypatch.chdir(tmp_path)
    result = cre("log", "-o", "-")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "-").exists()
    assert [json.loads(line)["prompt"] for line in result.stdout.splitlines()] == ["question 00", "question 01", "question 02"]
    assert "Wrote 3 entries to stdout." in result.stderr
    # The log's own format, so the piped export reads back as one.
    (tmp_path / "piped.jsonl").write_text(result.stdout)
    assert prompts(servedlog.read([tmp_path / "piped.jsonl"])) == ["question 00", "question 01", "question 02"]


def test_cre_log_export_replaces_only_an_earlier_export(tmp_path: Path) -> None:
    # `-o queries.jsonl` replaced a query log (or notes) with the export, even of 0 entries.
    fill(3)
    query_log = tmp_path / "queries.jsonl"
    query_log.write_text('{"prompt": "What is 2 plus 2?", "reference": "4"}\n')
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    for precious in (query_log, notes):
        before = precious.read_bytes()
        refused = cre("log", "-o", precious)
        assert refused.exit_code == 1 and "line 1 is not a served-log entry" in str(refused.exception)
        assert "Choose another file name, or delete the file first" in str(refused.exception)
        assert precious.read_bytes() == before
    # An earlier export, or an empty file, is replaced.
    export, empty = tmp_path / "export.jsonl", tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    for target in (export, export, empty):
        assert cre("log", "-o", target).exit_code == 0
        assert len(servedlog.read([target]).entries) == 3
    # One line that is not an entry, even after good ones, makes it another file.
    with export.open("a") as fh:
        fh.write("my notes\n")
    refused = cre("log", "-o", export)
    assert refused.exit_code == 1 and "line 4 is not a served-log entry" in str(refused.exception)


def test_cre_log_export_never_drops_entries_of_an_earlier_one_without_force(tmp_path: Path) -> None:
    # After the log rotated old entries away (past 64 MiB), `cre log -o FILE` replaced the
    # earlier export, perhaps their only copy, with fewer entries or none, without a word.
    fill(5)
    export = tmp_path / "export.jsonl"
    assert cre("log", "-o", export).exit_code == 0
    before = export.read_bytes()
    for live in servedlog.log_files():
        live.unlink()  # rotated away
    fill(2, start_day=20)
    for narrower in (("--since", "2025-01-04"), ("--last", "1"), ()):
        refused = cre("log", *narrower, "-o", export)
        assert refused.exit_code == 1, refused.output
        message = str(refused.exception)
        assert f"-o {export} is an earlier export, and 5 of its 5 entries are not in this one" in message
        assert "Write to another file name, or give --force to replace it" in message
        assert export.read_bytes() == before
    # An export that keeps every entry of the earlier one replaces it; --force replaces any.
    fill(5)  # the old entries are back (say, from a backup)
    assert cre("log", "-o", export).exit_code == 0
    assert len(servedlog.read([export]).entries) == 7
    forced = cre("log", "--last", "1", "-o", export, "--force")
    assert forced.exit_code == 0, forced.output
    assert len(servedlog.read([export]).entries) == 1
    assert "--force is for -o FILE" in str(cre("log", "--force").exception)
    assert "--force is for -o FILE" in str(cre("log", "-o", "-", "--force").exception)


def test_cre_log_on_an_empty_log_and_with_logging_off() -> None:
    empty = cre("log")
    assert empty.exit_code == 0 and empty.stdout == "" and "Nothing logged yet" in empty.stderr
    paths.write_user_settings({"log_queries": False})
    assert "Logging is off" in cre("log").stderr


# ---------------------------------------------------------------- cre fit --served


class KMeansClusterer:
    """Stands in for UMAP + HDBSCAN: two k-means clusters; records how many rows it saw."""

    rows: list[int] = []

    def __init__(self, n_components: int = 8, **kwargs: Any) -> None:
        self.n_components = n_components

    def fit(self, X: Any) -> "KMeansClusterer":
        import numpy as np
        from sklearn.cluster import KMeans

        from crecli.assign import Assigner

        KMeansClusterer.rows.append(len(X))
        labels = KMeans(n_clusters=2, n_init=10, random_state=0).fit_predict(X)
        if labels[0] != 0:  # cluster 0 is the one holding the log's first row
            labels = 1 - labels
        self.labels_ = labels.astype(np.int64)
        self.n_clusters_ = 2
        self.assigner_ = Assigner(k=3).fit(X, self.labels_)
        self.n_neighbors_, self.min_cluster_size_, self.min_samples_ = 5, 5, 2
        self.n_components_ = self.n_components
        self.fit_index_ = np.arange(len(X))
        return self


def test_fit_clusters_served_prompts_but_measures_only_labelled_rows(
    fake_backends: Callable[..., dict[str, FakeBackend]], tiny_models_toml: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from crecli import cluster

    monkeypatch.setattr(cluster, "QueryClusterer", KMeansClusterer)
    KMeansClusterer.rows = []
    created = fake_backends({m: (lambda text, p: "4") for m in ("small", "medium", "large")})

    log_path = tmp_path / "labelled.jsonl"
    adds = [f"What is {i} plus {i + 1}?" for i in range(12)]
    log_path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p, "reference": str(2 * i + 1), "match": "numeric"}) + "\n"
                                for i, p in enumerate(adds)))
    capitals = [f"Name the zorblax city of country number {i} on the map" for i in range(20)]
    served = ServedLog(servedlog.log_path(), "serve")
    for p in capitals:
        served.record(p, trace("Paris", "medium", 1))
    served.record(capitals[0], trace())  # asked twice: clustered once
    served.record(adds[0], trace())  # already in the fit log: the log's row counts
    # A hand-edited entry with labels and a reference is still served traffic, never labelled.
    entry = served.entry("Name the zorblax city of Atlantis on the map", trace())
    entry.update(reference="Poseidonis", labels={"small": True}, match="exact")
    served.append(entry)
    with servedlog.log_path().open("ab") as fh:
        fh.write(b'{"schema": 1, "cut sh\n')

    out = tmp_path / "router.cre"
    result = cre("fit", log_path, "-o", out, "--models", tiny_models_toml, "--served", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["n_records"], report["n_served"], report["n_labelled"]) == (33, 21, 12)
    assert KMeansClusterer.rows == [33]  # the served prompts were embedded and clustered
    assert "Adding 21 served prompts to the clustering (2 repeated, 1 unreadable line(s) left out)" in result.stderr

    # Models ran on the labelled log rows only.
    asked = {text for backend in created.values() for text, _ in backend.calls}
    assert any(adds[3] in text for text in asked)
    assert not any("zorblax" in text for text in asked)

    router = routerfile.load(out, config.load(tiny_models_toml))
    assert router.fit.n_labelled == 12 and router.fit.n_queries == 33
    by_size = {c.size: c for c in router.clusters}
    assert set(by_size) == {12, 21}
    # The served-only cluster has no measurements: it starts on the fallback model.
    assert by_size[21].stats == {} and by_size[21].model == router.fallback_model == "large"
    assert by_size[12].stats and all(s["n"] == 12 for s in by_size[12].stats.values())

    # An export (`cre log -o`) feeds a fit the same way, from any machine.
    export = tmp_path / "traffic.jsonl"
    assert cre("log", "-o", export).exit_code == 0
    again = cre("fit", log_path, "-o", tmp_path / "r2.cre", "--models", tiny_models_toml, "--served-log", export, "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["n_served"] == 21
    missing = cre("fit", log_path, "-o", tmp_path / "r3.cre", "--models", tiny_models_toml,
                  "--served-log", tmp_path / "nope.jsonl")
    assert missing.exit_code == 1 and "--served-log" in str(missing.exception)


def test_fit_refuses_a_served_log_that_holds_no_entry_and_warns_of_an_empty_one(
    fake_backends: Callable[..., dict[str, FakeBackend]], tiny_models_toml: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A query log (or a router) given as --served-log was read as unreadable lines, and the
    # fit went on: "Adding 0 served prompts ... (12 unreadable line(s) left out)".
    from crecli import cluster

    monkeypatch.setattr(cluster, "QueryClusterer", KMeansClusterer)
    created = fake_backends({m: (lambda text, p: "4") for m in ("small", "medium", "large")})
    log_path = tmp_path / "labelled.jsonl"
    log_path.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "reference": str(2 * i)}) + "\n"
                                for i in range(12)))
    other = tmp_path / "other-queries.jsonl"
    other.write_text(log_path.read_text())
    wrong = cre("fit", log_path, "-o", tmp_path / "r.cre", "--models", tiny_models_toml, "--served-log", other)
    assert wrong.exit_code == 1 and created == {}
    assert f"--served-log {other}: none of its 12 line(s) is a served-query log entry" in str(wrong.exception)
    assert "cre log -o FILE" in str(wrong.exception) and not (tmp_path / "r.cre").exists()
    # An empty export (of an empty log) is no mistake: said, and the fit goes on.
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    result = cre("fit", log_path, "-o", tmp_path / "r.cre", "--models", tiny_models_toml, "--served-log", empty)
    assert result.exit_code == 0, result.output
    assert f"--served-log {empty} holds no entries" in result.stderr


def test_fit_without_served_ignores_the_log(
    fake_backends: Callable[..., dict[str, FakeBackend]], tiny_models_toml: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from crecli import cluster

    monkeypatch.setattr(cluster, "QueryClusterer", KMeansClusterer)
    KMeansClusterer.rows = []
    fake_backends({m: (lambda text, p: "4") for m in ("small", "medium", "large")})
    log_path = tmp_path / "labelled.jsonl"
    log_path.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "reference": str(2 * i)}) + "\n"
                                for i in range(12)))
    served = ServedLog(servedlog.log_path(), "ask")
    for i in range(5):
        served.record(f"served prompt {i}", trace())
    result = cre("fit", log_path, "-o", tmp_path / "r.cre", "--models", tiny_models_toml, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_served"] == 0 and KMeansClusterer.rows == [12]


def test_a_lock_held_by_a_stopped_process_costs_one_entry_not_the_answer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # A `cre batch` stopped with Ctrl-Z while it held the log's lock made every later writer
    # wait on flock for good: a `cre serve` request that had its answer hung, past its timeout.
    import fcntl
    import os

    monkeypatch.setattr(servedlog, "LOCK_WAIT_SECONDS", 0.3, raising=False)
    log = ServedLog(tmp_path / "served.jsonl", "serve")
    lock = os.open(tmp_path / servedlog.LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # another open file: flock holds it against this process too
    wrote: list[bool] = []
    writer = threading.Thread(target=lambda: wrote.append(log.append({"prompt": "held"})), daemon=True)
    try:
        writer.start()
        writer.join(15)
        assert not writer.is_alive(), "the writer still waits for the lock"
    finally:
        os.close(lock)  # lets a writer that waited go on
        writer.join(15)
    assert wrote == [False]
    assert "is held by another process (waited 0 s; a stopped cre?)" in capsys.readouterr().err
    # Still held: the next entries try once and are skipped at once, not after another wait.
    monkeypatch.setattr(servedlog, "LOCK_WAIT_SECONDS", 30.0)
    lock = os.open(tmp_path / servedlog.LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        writer = threading.Thread(target=lambda: wrote.append(log.append({"prompt": "held too"})), daemon=True)
        writer.start()
        writer.join(15)
        assert not writer.is_alive(), "a second entry waited for the lock again"
    finally:
        os.close(lock)
        writer.join(35)
    assert wrote == [False, False]
    assert capsys.readouterr().err == ""  # said once for the whole wait, not for each skipped entry
    log._lock_busy_until = 0.0  # as LOCK_RETRY_SECONDS later
    assert log.append({"prompt": "free"}) is True
    # A lock that was held is not a lasting failure: a later one (a full disk) is still said.
    assert not log.failed
    assert [json.loads(line)["prompt"] for line in (tmp_path / "served.jsonl").read_text().splitlines()] == ["free"]
