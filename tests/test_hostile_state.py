"""crecli's own state under hostile or careless use (issue 22): outputs that would replace a
file crecli keeps, a cut served-log line, an unwritable or shared outcome store, a
settings.toml that is not UTF-8, hostile `cre log` fields, a router swapped after
startup, `--set-default` and comments, oversized manifests and endless log files.

Every case runs on fake backends; none loads a model."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from pathlib import Path

import pytest

from crecli import paths, servedlog
from support.hostile import Run, fit, refused
from support.prompts import SURE_TABLE, trace

# ---------------------------------------------------------------- 1. -o never replaces crecli's own files


def _state_files() -> dict[str, Path]:
    """Every kind of file crecli keeps, created with recognisable bytes."""
    files = {
        "store": paths.outcome_store_file(),
        "store-journal": paths.outcome_store_file().with_name("outcomes.sqlite-journal"),
        "store-lock": paths.outcome_store_file().with_name("outcomes.sqlite.lock"),
        "served": servedlog.log_path(),
        "served.2": servedlog.generation_path(servedlog.log_path(), 2),
        "served-lock": servedlog.log_path().with_name(servedlog.LOCK_NAME),
        "settings": paths.user_settings_file(),
        "bench": paths.bench_file(),
        "models.toml": paths.user_models_toml(),
        "model file": paths.models_dir() / "small.gguf",
        "embedding cache": paths.cache_dir() / "embeddings" / "vectors.sqlite",
    }
    for name, path in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if name != "models.toml":  # a models.toml with junk would break every command
            path.write_bytes(f"precious {name}\n".encode())
    return files


def _snapshot(files: dict[str, Path]) -> dict[str, bytes | None]:
    return {name: (p.read_bytes() if p.exists() else None) for name, p in files.items()}


def test_fit_output_onto_any_state_file_is_refused(cre, sums_log, tiny_models_toml, four_fakes, cre_home, tmp_path) -> None:
    files = _state_files()
    before = _snapshot(files)
    for name, path in files.items():
        run = fit(cre, sums_log, tiny_models_toml, "-o", path)
        refused(run, "which crecli keeps for itself", "Choose another file name")
    # --served: the private log must not become a world-readable zip.
    refused(fit(cre, sums_log, tiny_models_toml, "-o", files["served"], "--served"), "the served-query log")
    assert _snapshot(files) == before and four_fakes == {}


def test_every_spelling_of_the_default_store_is_refused(cre, sums_log, tiny_models_toml, four_fakes, cre_home, tmp_path) -> None:
    store = _state_files()["store"]
    before = store.read_bytes()
    symlink = tmp_path / "store-link.cre"
    symlink.symlink_to(store)
    hard = tmp_path / "store-hard.cre"
    os.link(store, hard)
    dotted = store.parent / ".." / store.parent.name / store.name
    for spelling in (store, dotted, symlink, hard):
        refused(fit(cre, sums_log, tiny_models_toml, "-o", spelling), "is an outcome store", str(store))
    assert store.read_bytes() == before and four_fakes == {}


def test_a_hard_link_to_a_model_file_is_refused(cre, sums_log, tiny_models_toml, four_fakes, cre_home, tmp_path) -> None:
    model = _state_files()["model file"]
    hard = tmp_path / "elsewhere.cre"
    os.link(model, hard)
    refused(fit(cre, sums_log, tiny_models_toml, "-o", hard), "crecli's model folder")
    # A state file that does not exist yet is matched by its path.
    paths.bench_file().unlink()
    refused(fit(cre, sums_log, tiny_models_toml, "-o", paths.bench_file()), "benchmark file")
    assert not paths.bench_file().exists() and four_fakes == {}


def test_calibrate_output_onto_state_files_is_refused(cre, saved_router, sums_log, tiny_models_toml, four_fakes, cre_home, tmp_path) -> None:
    files = _state_files()
    before = _snapshot(files)
    m = ("--models", tiny_models_toml, "--log", sums_log)
    for name in ("store", "served", "settings", "bench"):
        refused(cre("calibrate", saved_router, *m, "-o", files[name]), "which crecli keeps for itself")
    hard = tmp_path / "hard.cre"
    os.link(files["store"], hard)
    refused(cre("calibrate", saved_router, *m, "-o", hard), "is an outcome store")
    # In place: a router kept in crecli's cache folder is not rewritten there.
    cached = paths.cache_dir() / "r.cre"
    cached.write_bytes(saved_router.read_bytes())
    refused(cre("calibrate", cached, *m), "crecli's cache folder")
    # --store may be an outcome store, but not another state file.
    refused(cre("calibrate", saved_router, *m, "--store", files["served"]), "--store", "served-query log")
    assert _snapshot(files) == before and four_fakes == {}


def test_eval_plot_and_log_export_onto_state_files_are_refused(cre, saved_router, sums_log, tiny_models_toml, four_fakes, cre_home) -> None:
    files = _state_files()
    files["served"].write_bytes(b"")
    before = _snapshot(files)
    m = ("--router", saved_router, "--models", tiny_models_toml)
    for name in ("store", "bench", "settings"):
        refused(cre("eval", sums_log, *m, "--plot", files[name]), "--plot")
    for name in ("store", "served.2", "settings", "bench", "served-lock"):
        refused(cre("log", "-o", files[name]), "-o", "writing there would destroy it")
    assert _snapshot(files) == before and four_fakes == {}


def test_an_output_that_is_a_fifo_is_refused_not_replaced(cre, saved_router, sums_log, tiny_models_toml, four_fakes,
                                                        tmp_path) -> None:
    # The write renames a temp file over the name: the FIFO became a regular file.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    words = ("is not a regular file", "Choose another file name")
    refused(cre("log", "-o", fifo), "-o", *words)
    refused(fit(cre, sums_log, tiny_models_toml, "-o", fifo), "-o", *words)
    refused(cre("calibrate", saved_router, "--models", tiny_models_toml, "--log", sums_log, "-o", fifo), "-o", *words)
    assert fifo.is_fifo() and four_fakes == {}


def test_store_option_may_name_the_default_store(tmp_path: Path) -> None:
    store = paths.outcome_store_file()
    paths.ensure(store.parent)
    assert paths.check_output(store, "--store", allow="an outcome store") == store
    from crecli.errors import CreError

    with pytest.raises(CreError, match="outcome store's own file"):
        paths.check_output(store.with_name("outcomes.sqlite-wal"), "--store", allow="an outcome store")
    # An ordinary output next to crecli's files is fine.
    elsewhere = tmp_path / "router.cre"
    assert paths.check_output(elsewhere, "-o") == elsewhere


# ---------------------------------------------------------------- 2. a cut served-log line loses only itself


def _served_entry(prompt: str) -> dict:
    return servedlog.ServedLog(Path("unused"), "ask").entry(prompt, trace())


def test_an_append_after_a_cut_line_starts_a_line_of_its_own(tmp_path: Path) -> None:
    live = tmp_path / "served.jsonl"
    log = servedlog.ServedLog(live, "ask")
    assert log.append(_served_entry("first"))
    full = servedlog._line(_served_entry("cut by a full disk"))
    with live.open("ab") as fh:
        fh.write(full[: len(full) // 2])  # what a crash or a full disk leaves
    assert log.append(_served_entry("after the cut"))
    assert log.append(_served_entry("and one more"))
    reading = servedlog.read([live])
    assert [e["prompt"] for e in reading.entries] == ["first", "after the cut", "and one more"]
    assert reading.bad == 1


def test_the_reader_recovers_an_entry_glued_onto_a_cut_line(tmp_path: Path) -> None:
    live = tmp_path / "served.jsonl"
    cut = servedlog._line(_served_entry("cut"))[:40]
    good = servedlog._line(_served_entry('holds {"schema": 1, inside'))
    live.write_bytes(servedlog._line(_served_entry("before")) + cut + good + servedlog._line(_served_entry("after")))
    reading = servedlog.read([live])
    assert [e["prompt"] for e in reading.entries] == ["before", 'holds {"schema": 1, inside', "after"]
    assert reading.bad == 1


# ---------------------------------------------------------------- 3. an unwritable or full outcome store


def stopped(run: Run, *words: str) -> None:
    """Exit 1 after progress lines, ending in one `Error: ...` line naming each of `words`."""
    assert run.code == 1, run
    last = run.err.rstrip("\n").split("\n")[-1]
    assert last.startswith("Error: ") and "Traceback" not in run.err and run.out == "", run.err
    for word in words:
        assert word in last, (word, last)


def _read_only_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    """Open every store read-only, as SQLite does a file or folder it may not write (tests
    may run as root, whom permissions do not stop)."""
    from crecli import outcomes

    real = sqlite3.connect
    monkeypatch.setattr(outcomes.sqlite3, "connect", lambda path, *a, **k: real(f"file:{path}?mode=ro", uri=True))


def test_a_read_only_store_stops_a_fit_before_any_model_runs(cre, sums_log, tiny_models_toml, four_fakes, tmp_path, monkeypatch) -> None:
    from crecli.outcomes import OutcomeStore

    store = tmp_path / "outcomes.sqlite"
    OutcomeStore(store).close()
    before = store.read_bytes()
    _read_only_connect(monkeypatch)
    run = fit(cre, sums_log, tiny_models_toml, "-o", tmp_path / "r.cre", "--store", store)
    stopped(run, str(store), "cannot be written", "nothing was run", "these permissions", f"chmod u+rw {store}", "--store")
    assert four_fakes == {} and store.read_bytes() == before and not (tmp_path / "r.cre").exists()


def test_a_read_only_store_still_serves_what_it_holds(tiny_models_toml, fake_backends, tmp_path, monkeypatch) -> None:
    from crecli import config
    from crecli.outcomes import OutcomeStore, collect
    from crecli.quality import QualityCheck
    from crecli.querylog import Record

    settings = config.load(tiny_models_toml)
    records = [Record(id=f"q{i}", prompt=f"What is {i} plus {i}?", reference=[str(2 * i)], match="numeric") for i in range(3)]
    created = fake_backends({m: (lambda text, p: "4") for m in settings.ladder})
    with OutcomeStore(tmp_path / "s.sqlite") as store:
        first = collect(records, settings, store, QualityCheck(k=1))
    created.clear()
    _read_only_connect(monkeypatch)
    with OutcomeStore(tmp_path / "s.sqlite") as store:
        assert store.unwritable is not None
        assert collect(records, settings, store, QualityCheck(k=1)) == first
    assert created == {}


class _FullDisk:
    """A connection whose commits of outcome rows fail once `room` of them are in, like a disk
    that fills up (the store's small bookkeeping rows in `meta` still go in)."""

    def __init__(self, db: sqlite3.Connection, room: int) -> None:
        self.db, self.room, self.row = db, room, False

    def execute(self, *args: object) -> sqlite3.Cursor:
        self.row = self.row or "INTO outcomes" in str(args[0])
        return self.db.execute(*args)

    def commit(self) -> None:
        if self.row:
            if self.room <= 0:
                raise sqlite3.OperationalError("database or disk is full")
            self.room -= 1
        self.row = False
        self.db.commit()

    def rollback(self) -> None:
        self.row = False
        self.db.rollback()

    def close(self) -> None:
        self.db.close()


def test_a_store_that_fills_up_is_an_error_that_keeps_the_rows_recorded(
    cre, sums_log, tiny_models_toml, four_fakes, tmp_path, monkeypatch
) -> None:
    from crecli import outcomes
    from crecli.outcomes import OutcomeStore

    real_init = OutcomeStore.__init__

    def init(self: OutcomeStore, path: Path) -> None:
        real_init(self, path)
        self._db = _FullDisk(self._db, room=3)

    monkeypatch.setattr(OutcomeStore, "__init__", init)
    store = tmp_path / "outcomes.sqlite"
    run = fit(cre, sums_log, tiny_models_toml, "-o", tmp_path / "r.cre", "--store", store, "--k", "1")
    stopped(run, str(store), "database or disk is full", "the 3 recorded before it in this run are kept", "run the command again")
    assert "Traceback" not in run.err and not (tmp_path / "r.cre").exists()
    monkeypatch.setattr(OutcomeStore, "__init__", real_init)
    with outcomes.OutcomeStore(store) as again:
        assert again.count() == 3


def _damage_outcomes(store: Path) -> None:
    """Overwrite the first page of the store's `outcomes` table, as a failing disk might."""
    with sqlite3.connect(store) as db:
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'outcomes'").fetchone()[0]
        size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    with open(store, "r+b") as f:
        f.seek((root - 1) * size)
        f.write(bytes(range(256)) * (size // 256))


def test_a_damaged_store_stops_a_fit_before_clustering_with_what_to_do(
    cre, sums_log, tiny_models_toml, four_fakes, tmp_path
) -> None:
    """A damaged page gave a raw `sqlite3.DatabaseError: database disk image is malformed`
    traceback at the first lookup, after embedding and clustering had run."""
    from crecli.outcomes import OutcomeStore, Vote

    store = tmp_path / "outcomes.sqlite"
    with OutcomeStore(store) as s:
        for i in range(300):
            s.put(f"{i:064x}", "small", "", "k", 5, [Vote("an answer " * 20, 40, 0.5)])
    _damage_outcomes(store)
    run = fit(cre, sums_log, tiny_models_toml, "-o", tmp_path / "r.cre", "--store", store, "--k", "1")
    stopped(run, str(store), "cannot open the outcome store: the store is damaged", "malformed",
            f"sqlite3 {store} .recover", "the next run records outcomes afresh")
    assert "Clustering" not in run.err and four_fakes == {} and not (tmp_path / "r.cre").exists()


class _Broken:
    """A connection to a store whose reads and writes fail with `error`, as a store damaged
    after it was opened does."""

    def __init__(self, db: sqlite3.Connection, error: sqlite3.DatabaseError) -> None:
        self.db, self.error = db, error

    def execute(self, *args: object) -> sqlite3.Cursor:
        raise self.error

    def commit(self) -> None:
        raise self.error

    def rollback(self) -> None:
        self.db.rollback()

    def close(self) -> None:
        self.db.close()


@pytest.mark.parametrize("call", ["get", "put", "count", "check_rendering"])
def test_every_store_operation_names_the_cause_of_a_sqlite_error(call, tiny_models_toml, tmp_path) -> None:
    """Each read and write of a store that fails is a StoreError with the fix for its cause:
    a damaged store is moved away (a write to one advised freeing disk space), a full disk
    is freed; never a raw sqlite3 error."""
    from crecli import config
    from crecli.errors import CreError
    from crecli.outcomes import OutcomeStore, Vote

    spec = config.load(tiny_models_toml).get("small")
    calls = {"get": lambda s: s.get("a" * 64, "small", "", "k"), "count": lambda s: s.count(),
             "put": lambda s: s.put("a" * 64, "small", "", "k", 5, [Vote("4", 1, 0.5)]),
             "check_rendering": lambda s: s.check_rendering(spec, "")}
    path = tmp_path / "s.sqlite"
    for error, words, not_words in (
        (sqlite3.DatabaseError("database disk image is malformed"),
         ["the store is damaged", f"sqlite3 {path} .recover", "the next run records outcomes afresh"], ["disk space"]),
        (sqlite3.OperationalError("database or disk is full"), ["the disk is full", "Free disk space"], ["damaged"]),
    ):
        with OutcomeStore(path) as store:
            store._db = _Broken(store._db, error)
            with pytest.raises(CreError) as info:
                calls[call](store)
        message = str(info.value)
        assert type(info.value).__name__ == "StoreError", message
        assert message.startswith(f"{path}: ") and str(error) in message, message
        assert all(w in message for w in words) and not any(w in message for w in not_words), message


def test_a_store_in_a_folder_that_cannot_be_searched_gets_the_permission_advice(tmp_path, monkeypatch) -> None:
    # `Path.is_dir` raises PermissionError where the folder cannot be searched (Python only
    # swallows a missing path), which escaped `store_error` and lost the chmod advice.
    from pathlib import Path

    from crecli.outcomes import store_error

    path = tmp_path / "locked" / "outcomes.sqlite"
    real_stat = Path.stat

    def stat(self: Path, *args: object, **kwargs: object) -> object:
        if self == path:
            raise PermissionError(13, "Permission denied")
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    error = store_error(path, sqlite3.OperationalError("unable to open database file"), "cannot open it")
    assert "these permissions do not let this user read and write it" in str(error) and "chmod u+rwx" in str(error)


def test_a_store_another_program_holds_is_waited_for_then_named_never_to_be_deleted(tmp_path, monkeypatch) -> None:
    """A store held by another connection (a sqlite3 shell's BEGIN EXCLUSIVE) was "not a
    usable outcome store" to "move away or delete"; one held for writing (BEGIN IMMEDIATE)
    made `require_writable` advise making the file writable or freeing disk space."""
    from crecli import outcomes
    from crecli.errors import CreError
    from crecli.outcomes import OutcomeStore

    monkeypatch.setattr(outcomes, "BUSY_WAIT", 0.2, raising=False)
    path = tmp_path / "outcomes.sqlite"
    OutcomeStore(path).close()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    with pytest.raises(CreError) as info:
        OutcomeStore(path)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot open the outcome store: another program holds it"), message
    assert "(database is locked)" in message and "try again when that program is done" in message, message
    assert not any(w in message for w in ("delete", "move it away", "not a usable", "damaged")), message
    other.execute("ROLLBACK")
    other.execute("BEGIN IMMEDIATE")  # a writer mid-transaction: reading goes on, writing waits
    with OutcomeStore(path) as store:
        assert store.count() == 0
        with pytest.raises(CreError) as info:
            store.require_writable("small on 4 queries")
        message = str(info.value)
        assert "cannot be written, so small on 4 queries would run for nothing" in message, message
        assert "another program holds it" in message and "try again" in message, message
        assert not any(w in message for w in ("delete", "disk space", "writable")), message
        other.execute("ROLLBACK")  # done: the store is probed again, and takes the run
        store.require_writable("small on 4 queries")
    other.close()


def test_a_store_these_permissions_do_not_open_is_named_with_the_chmod_that_opens_it(tmp_path, monkeypatch) -> None:
    """A store the user may not open (mode 000 for another user) was "not a usable outcome
    store" to "move away or delete"."""
    from crecli import outcomes
    from crecli.errors import CreError
    from crecli.outcomes import OutcomeStore

    path = tmp_path / "outcomes.sqlite"
    OutcomeStore(path).close()
    real = sqlite3.connect
    if os.geteuid() == 0:  # root opens any file: open it as SQLite opens one it may not read
        monkeypatch.setattr(outcomes.sqlite3, "connect",
                            lambda p, *a, **k: real(f"file:{p}-gone?mode=ro", uri=True))
    else:
        path.chmod(0)
    try:
        with pytest.raises(CreError) as info:
            OutcomeStore(path)
    finally:
        path.chmod(0o600)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot open the outcome store: these permissions do not let"), message
    assert "(unable to open database file)" in message and f"chmod u+rw {path}" in message, message
    assert not any(w in message for w in ("delete", "move it away", "not a usable", "damaged")), message


# ---------------------------------------------------------------- 4. two commands on one store


def test_a_second_command_waits_for_the_first_and_reuses_its_work(
    tiny_models_toml, fake_backends, tmp_path, capsys
) -> None:
    import fcntl
    import threading
    import time

    from crecli import config, grading
    from crecli.models.pull import model_identity
    from crecli.outcomes import OutcomeStore, Vote, collect, prompt_sha256, settings_key
    from crecli.quality import QualityCheck
    from crecli.querylog import Record

    settings = config.load(tiny_models_toml)
    quality = QualityCheck(k=1)
    records = [Record(id=f"q{i}", prompt=f"What is {i} plus {i}?", reference=[str(2 * i)], match="numeric") for i in range(4)]
    created = fake_backends({m: (lambda text, p: "4") for m in settings.ladder})
    path = tmp_path / "outcomes.sqlite"
    OutcomeStore(path).close()
    # Another `cre fit` holds the store's lock while it runs the models.
    other = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX)
    results: dict = {}

    def second() -> None:
        with OutcomeStore(path) as store:
            results.update(collect(records, settings, store, quality))

    thread = threading.Thread(target=second)
    thread.start()
    deadline = time.monotonic() + 10
    while "is running models on this store; waiting" not in capsys.readouterr().err:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    assert created == {}  # waiting, not running
    # The first command records every outcome, then exits (its lock goes with it).
    from crecli.models.registry import counts_text_stops

    with OutcomeStore(path) as first:
        for name in settings.ladder:
            identity = model_identity(settings.get(name)) or ""
            key = settings_key(quality, grading.max_tokens_for("numeric"), text_stops=counts_text_stops(settings.get(name)))
            for r in records:
                first.put(prompt_sha256(r.prompt), name, identity, key, 5, [Vote("4", 1, 0.5)])
    os.close(other)
    thread.join(10)
    assert not thread.is_alive()
    assert created == {}  # no model was loaded: everything was recorded meanwhile
    assert len(results) == len(records) * len(settings.ladder)
    assert all(o.votes[0].seconds == 0.5 for o in results.values())


def test_a_store_reached_through_a_symlink_shares_the_stores_run_lock(tmp_path) -> None:
    """The run lock was named after the path as spelt: while one command held it on
    outcomes.sqlite, the same store opened through a symlink entered at once, with a lock
    file of its own, and both ran the same models."""
    import threading

    from crecli.outcomes import OutcomeStore

    real = tmp_path / "data" / "outcomes.sqlite"
    OutcomeStore(real).close()
    (tmp_path / "mine").mkdir()
    link = tmp_path / "mine" / "store.sqlite"
    link.symlink_to(real)
    (tmp_path / "data-link").symlink_to(tmp_path / "data")
    for other in (link, tmp_path / "data-link" / "outcomes.sqlite", tmp_path / "mine" / ".." / "data" / "outcomes.sqlite"):
        entered = threading.Event()
        with OutcomeStore(real) as first, first.running_models(), OutcomeStore(other) as second:

            def run() -> None:
                with second.running_models():
                    entered.set()

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            assert not entered.wait(0.5), f"{other} ran models while {real} held the lock"
        thread.join(10)
        assert entered.is_set() and not thread.is_alive()
        assert paths.store_lock_file(other) == real.with_name("outcomes.sqlite.lock")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["store.sqlite"]


# ---------------------------------------------------------------- 9. settings.toml that is not UTF-8


@pytest.mark.parametrize("command", [("ask", "What is 1 plus 1?"), ("batch",), ("serve",), ("eval", "log.jsonl")])
def test_settings_that_are_not_utf8_are_a_config_error(cre, command, tiny_models_toml) -> None:
    settings = paths.user_settings_file()
    settings.parent.mkdir(parents=True)
    settings.write_bytes(b'default_router = "/r\xff.cre"\n')
    run = cre(*command, "--models", tiny_models_toml)
    refused(run, str(settings), "fix or delete the file")


@pytest.mark.parametrize("command", [("ask", "What is 1 plus 1?"), ("inspect",), ("eval", "log.jsonl"), ("log",),
                                     ("models", "list"), ("models", "bench")])
def test_a_cre_home_that_is_a_file_is_named_by_every_command(cre, command, tiny_models_toml, tmp_path, monkeypatch) -> None:
    # `cre ask` said "settings.toml: cannot read it (Not a directory)", where `cre fit` named CRE_HOME.
    home = tmp_path / "home-file"
    home.write_text("not a folder")
    for value in (home, home / "sub"):
        monkeypatch.setenv("CRE_HOME", str(value))
        models = ("--models", tiny_models_toml) if command[0] != "log" else ()
        refused(cre(*command, *models), f"CRE_HOME={value} must be a folder you can write to")
    assert home.read_text() == "not a folder"


def test_a_misspelt_setting_is_a_config_error(cre, tiny_models_toml) -> None:
    # `log_query = false` left every prompt logged without a word.
    paths.ensure(paths.config_dir())
    paths.user_settings_file().write_text('log_query = false\n[team]\nname = "ops"\n')
    refused(cre("ask", "hi", "--models", tiny_models_toml), "unknown setting(s) 'log_query'", "log_queries")


def test_a_default_router_that_is_not_a_path_is_a_config_error(cre, tiny_models_toml) -> None:
    paths.ensure(paths.config_dir())
    paths.user_settings_file().write_text("default_router = 3\n")
    refused(cre("ask", "hi", "--models", tiny_models_toml), "default_router must be a file path")
    paths.user_settings_file().write_text("# nothing set\n")
    # Nothing set: the router crecli ships answers, and its models are not pulled in this home.
    refused(cre("ask", "hi", "--models", tiny_models_toml), "cre models pull")


def test_a_default_router_that_is_gone_names_the_setting(cre, tiny_models_toml, tmp_path) -> None:
    # It said "/x/gone.cre: no such router file", a path the user never typed, and not where it came from.
    paths.ensure(paths.config_dir())
    gone = tmp_path / "gone.cre"
    paths.user_settings_file().write_text(f'default_router = "{gone}"\n')
    for command in (("ask", "hi"), ("inspect",)):
        refused(cre(*command, "--models", tiny_models_toml), str(paths.user_settings_file()), "default_router", str(gone),
                "does not exist", "--set-default", "delete the default_router line")
    tmp_path.joinpath("folder.cre").mkdir()
    paths.user_settings_file().write_text(f'default_router = "{tmp_path / "folder.cre"}"\n')
    refused(cre("ask", "hi", "--models", tiny_models_toml), "default_router", "is a folder")


# ---------------------------------------------------------------- 12. --set-default keeps the rest of settings.toml


SETTINGS = """# my crecli settings
log_queries = false  # keep prompts private

# switched routers on Monday
default_router = "/old/router.cre"  # the old one

[team]
# shared
name = "ops"
"""


def test_set_default_changes_only_its_line(tmp_path: Path) -> None:
    paths.ensure(paths.config_dir())
    paths.user_settings_file().write_text(SETTINGS)
    new = tmp_path / "new.cre"
    paths.set_default_router(new)
    text = paths.user_settings_file().read_text()
    assert text == SETTINGS.replace('default_router = "/old/router.cre"  # the old one\n', f'default_router = "{new}"\n')
    assert paths.default_router() == new


def test_set_default_adds_its_line_above_the_tables(tmp_path: Path) -> None:
    paths.ensure(paths.config_dir())
    body = "# comment\nlog_queries = true\n[team]\ndefault_router = 'not the top-level key'\n"
    paths.user_settings_file().write_text(body)
    paths.set_default_router(tmp_path / "r.cre")
    text = paths.user_settings_file().read_text()
    assert text == f'# comment\nlog_queries = true\ndefault_router = "{tmp_path / "r.cre"}"\n[team]\ndefault_router = \'not the top-level key\'\n'
    assert paths.read_user_settings()["team"] == {"default_router": "not the top-level key"}
    # No file yet: one line.
    paths.user_settings_file().unlink()
    paths.set_default_router(tmp_path / "r.cre")
    assert paths.user_settings_file().read_text() == f'default_router = "{tmp_path / "r.cre"}"\n'


def test_set_default_on_a_value_it_cannot_edit_in_place_keeps_every_setting(tmp_path: Path) -> None:
    paths.ensure(paths.config_dir())
    paths.user_settings_file().write_text('default_router = """\n/multi/line.cre"""\nlog_queries = false\n')
    paths.set_default_router(tmp_path / "r.cre")
    assert paths.read_user_settings() == {"default_router": str(tmp_path / "r.cre"), "log_queries": False}


# ---------------------------------------------------------------- 10. hostile fields in the served-query log


def _hostile_log() -> Path:
    live = servedlog.log_path()
    live.parent.mkdir(parents=True, exist_ok=True)
    log = servedlog.ServedLog(live, "ask")
    entry = log.entry("a [bold]prompt[/] \x1b]0;pwned\x07", trace())
    entry.update(cluster="[/]", escalations="\x1b[2J\x1b[31mred", model="[red]m[/red]", agreement=float("nan"),
                 cost=float("inf"), command="\x9b31m")
    line = json.dumps(entry, allow_nan=True).encode() + b"\n"  # what a hand edit or another tool may write
    live.write_bytes(line + servedlog._line(log.entry("a plain one", trace())))
    return live


def test_cre_log_shows_markup_and_escapes_as_text(cre) -> None:
    _hostile_log()
    run = cre("log")
    assert run.code == 0 and "Traceback" not in run.err, run
    for raw in ("\x1b", "\x07", "\x9b"):
        assert raw not in run.out and raw not in run.err
    assert "[/]" in run.out and "\\x1b[2J" in run.out and "[red]m[/red]" in run.out


def test_cre_log_json_and_export_hold_no_nan(cre, tmp_path: Path) -> None:
    _hostile_log()
    run = cre("log", "--json")
    assert run.code == 0, run
    first = json.loads(run.out, parse_constant=lambda name: pytest.fail(f"{name} in --json output"))[0]
    assert first["agreement"] is None and first["cost"] is None and first["cluster"] == "[/]"
    out = tmp_path / "export.jsonl"
    run = cre("log", "-o", out)
    assert run.code == 0 and "Traceback" not in run.err, run
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()][1] == "a plain one"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".export")) == []


def test_a_number_too_large_for_a_float_reads_as_null(cre, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 1e999 was read as inf: a fresh export failed ("cannot be written as JSON"), and one
    # over an earlier export holding it was a ValueError traceback from `_entry_key`.
    live = servedlog.log_path()
    live.parent.mkdir(parents=True, exist_ok=True)
    log = servedlog.ServedLog(live, "ask")
    line = json.dumps(log.entry("huge cost", trace())).replace('"cost": ', '"cost": -1e999, "was": ', 1)
    live.write_text(line + "\n" + json.dumps(log.entry("a plain one", trace())) + "\n")
    (entry, _) = servedlog.read().entries
    assert entry["cost"] is None and entry["prompt"] == "huge cost"
    fresh, earlier = tmp_path / "fresh.jsonl", tmp_path / "earlier.jsonl"
    earlier.write_bytes(live.read_bytes())  # an earlier export holding the same entries, 1e999 and all
    for out in (fresh, earlier):
        run = cre("log", "-o", out)
        assert run.code == 0 and "Traceback" not in run.err, run
        assert [json.loads(line)["cost"] for line in out.read_text().splitlines()][0] is None
    # An entry that reads, yet cannot be compared, names its line rather than raise.
    def unkeyable(entry: dict) -> bytes:
        raise ValueError("Out of range float values are not JSON compliant")

    monkeypatch.setattr(servedlog, "_entry_key", unkeyable)
    refused(cre("log", "-o", earlier), f"-o {earlier}", "line 1 holds a value JSON cannot hold", "delete the file first")


@pytest.mark.parametrize("args", [("--json",), ("-o", "-"), (), ("--path",)])
def test_cre_log_refuses_a_closed_stdout(cre, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...]) -> None:
    # `cre log --json >&-` and `cre log -o - >&-` ended in an AttributeError traceback
    # (None.write); the table and --path printed nothing and exited 0.
    servedlog.ServedLog(servedlog.log_path(), "ask").record("a plain one", trace())
    monkeypatch.setattr(sys, "stdout", None)
    refused(cre("log", *args), "cre log", "stdout is closed", "redirect", code=2)


def test_cre_log_survives_a_huge_agreement_and_a_deeply_nested_trace(cre) -> None:
    # A 401-digit agreement overflowed math.isfinite; a trace nested 500 deep overflowed the
    # stack in `cre log --json`: both were tracebacks.
    live = servedlog.log_path()
    live.parent.mkdir(parents=True, exist_ok=True)
    log = servedlog.ServedLog(live, "ask")
    huge = json.dumps(log.entry("huge agreement", trace())).replace('"agreement": ', '"agreement": ' + "9" * 400 + ", \"x\": ", 1)
    deep = log.entry("deep trace", trace())
    deep_line = json.dumps(deep).replace('"trace": ', '"trace": ' + "[" * 500 + "]" * 500 + ', "was": ', 1)
    live.write_text(huge + "\n" + deep_line + "\n" + json.dumps(log.entry("a plain one", trace())) + "\n")
    for args in (("log",), ("log", "--json")):
        run = cre(*args)
        assert run.code == 0 and "Traceback" not in run.err, run
        assert "huge agreement" in run.out and "a plain one" in run.out and "deep trace" not in run.out
        assert "2 entries, 1 unreadable line(s) skipped" in run.err
    table = cre("log").out
    assert "│     - │ huge agreement" in table


def test_a_failed_export_leaves_no_temp_file(tmp_path: Path) -> None:
    from crecli.errors import InputError

    out = tmp_path / "export.jsonl"
    with pytest.raises(InputError, match="cannot be written as JSON"):
        servedlog.export([{"schema": 1, "x": float("nan")}], out, [])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- 10b. files replaced whole (`paths.atomic_write`)


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")

    def half(fh) -> None:  # noqa: ANN001
        fh.write(b"new, but not all of it")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        paths.atomic_write(target, half)

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        paths.atomic_write(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]
    paths.atomic_write(target, "néw")
    assert target.read_bytes() == "néw".encode() and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_an_atomic_write_gives_the_mode_asked_for_under_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        paths.atomic_write(tmp_path / "shared", b"x")
        paths.atomic_write(tmp_path / "private", b"x", mode=0o600)
    finally:
        os.umask(old)
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o600


def test_an_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path: Path) -> None:
    """A 0600 file (an export, settings.toml) came back 0644 from a rewrite: the temp file
    took 0o666 & ~umask and was renamed over it."""
    private, shared = tmp_path / "private", tmp_path / "shared"
    for path, mode in ((private, 0o600), (shared, 0o664)):
        path.write_bytes(b"old")
        path.chmod(mode)
    old = os.umask(0o022)
    try:
        paths.atomic_write(private, b"new")
        paths.atomic_write(shared, b"new", mode=0o600)  # the user opened it up: it stays so
        paths.write_user_settings({"log_queries": True})
        paths.user_settings_file().chmod(0o600)
        paths.update_user_setting("log_queries", False)
    finally:
        os.umask(old)
    assert private.stat().st_mode & 0o777 == 0o600 and private.read_bytes() == b"new"
    assert shared.stat().st_mode & 0o777 == 0o664
    assert paths.user_settings_file().stat().st_mode & 0o777 == 0o600


def test_a_new_log_export_is_private_like_the_log(tmp_path: Path) -> None:
    """The export holds the log's prompts; the log is 0600, the export was 0644."""
    out = tmp_path / "export.jsonl"
    old = os.umask(0o022)
    try:
        servedlog.export([], out, [])
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o600


@pytest.mark.skipif(os.name == "nt", reason="POSIX modes")
def test_a_file_written_by_name_can_replace_a_read_only_one(tmp_path: Path) -> None:
    """`atomic_path` gave its temp file the old file's mode before the writer opened it by
    name: for a 0444 model a non-root llama.cpp got "permission denied". The owner can write
    it while the block runs; the old mode is the new file's when it ends."""
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old")
    target.chmod(0o444)
    with paths.atomic_path(target) as tmp:
        assert tmp.stat().st_mode & 0o777 == 0o644  # the old mode, and its owner's write bit
        tmp.write_bytes(b"new")  # by name, as llama.cpp opens it
    assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o444
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


@pytest.mark.skipif(os.name == "nt", reason="POSIX links")
def test_a_temp_file_swapped_for_a_link_while_written_by_name_is_published_nowhere(tmp_path: Path) -> None:
    """Between `atomic_path`'s exclusive create and the writer's open by name, a link planted
    under the temp name (a group-writable folder) takes the writer's bytes elsewhere: what
    the name holds then is not the file made here, so it is refused, never renamed into place."""
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"theirs")
    with pytest.raises(OSError, match="replaced while it was written"):
        with paths.atomic_path(target) as tmp:
            tmp.unlink()
            tmp.symlink_to(elsewhere)
            tmp.write_bytes(b"new")
    assert target.read_bytes() == b"old" and not target.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "model.gguf"]


def test_an_output_that_is_a_symlink_replaces_its_target(tmp_path: Path) -> None:
    """`cre log -o link.jsonl` (link -> shared/export.jsonl) swapped the link for a regular
    file and left the shared export stale; routers and settings.toml the same."""
    shared = tmp_path / "shared"
    shared.mkdir()
    target = shared / "export.jsonl"
    servedlog.export([], target, [])
    target.chmod(0o640)
    link = tmp_path / "link.jsonl"
    link.symlink_to(Path("shared") / "export.jsonl")  # relative, as `ln -s` is often used
    entry = {"schema": servedlog.SCHEMA, "time": "2025-01-01T00:00:00.000Z", "prompt": "What is 2 plus 2?"}
    servedlog.export([entry], link, [])
    assert link.is_symlink() and servedlog.read([target]).entries == [entry]
    assert target.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.jsonl", "shared"]
    assert [p.name for p in shared.iterdir()] == ["export.jsonl"]  # no temp file left
    # A dangling link is created at its target; a link to an input is still refused.
    dangling = tmp_path / "dangling"
    dangling.symlink_to(shared / "new.bin")
    paths.atomic_write(dangling, b"x")
    assert dangling.is_symlink() and (shared / "new.bin").read_bytes() == b"x"
    with pytest.raises(Exception, match="the query log"):
        paths.check_output(link, "-o", [("the query log", target)])


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="giving a link to another user needs root")
def test_a_link_another_user_owns_is_not_followed(tmp_path: Path) -> None:
    # A link planted in a shared folder (/tmp) to name one of this user's files: followed, the
    # write would replace that file; not followed, it replaces the link (where the folder lets it).
    mine = tmp_path / "mine.txt"
    mine.write_text("keep")
    planted = tmp_path / "export.jsonl"
    planted.symlink_to(mine)
    os.lchown(planted, 4242, 4242)
    assert paths.written_path(planted) == planted.absolute()
    paths.atomic_write(planted, b"new")
    assert mine.read_text() == "keep" and not planted.is_symlink() and planted.read_bytes() == b"new"
    os.lchown(mine, 0, 0)
    own = tmp_path / "own.jsonl"
    own.symlink_to(mine)
    assert paths.written_path(own) == mine.resolve()


def test_state_writers_never_write_through_a_link_at_a_temp_name(tmp_path: Path) -> None:
    """settings.toml, bench.json and `cre log -o` used fixed temp names (`.NAME.tmpPID`,
    `NAME.PID.tmp`): a link planted there made the write land in the link's target."""
    from crecli.models import bench

    export = tmp_path / "export.jsonl"
    settings, speeds = paths.user_settings_file(), paths.bench_file()
    planted = {
        settings.parent / f".{settings.name}.tmp{os.getpid()}": lambda: paths.write_user_settings({"a": 1}),
        speeds.with_suffix(f".{os.getpid()}.tmp"): lambda: bench.save(bench.Speed(
            "m", None, 1, pp_tokens_per_s=1.0, tg_tokens_per_s=1.0, load_seconds=1.0, pp_tokens=1, tg_tokens=1,
            measured_at="now")),
        export.parent / f".{export.name}.tmp{os.getpid()}": lambda: servedlog.export([{"schema": 1}], export, []),
    }
    for n, (link, write) in enumerate(planted.items()):
        victim = tmp_path / f"victim{n}"
        victim.write_text("keep")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(victim)
        write()
        assert victim.read_text() == "keep", link
    for written in (settings, speeds, export):
        assert written.is_file() and not written.is_symlink(), written


def test_an_atomic_write_may_remove_orphans_of_killed_writes(tmp_path: Path) -> None:
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "model.gguf"
    orphan = tmp_path / f".model.gguf.{dead.pid}.0123abcd.tmp"
    live = tmp_path / f".model.gguf.{os.getpid()}.feedf00d.tmp"
    for p in (orphan, live):
        p.write_bytes(b"partial")
    paths.atomic_write(target, b"x")
    assert orphan.exists()  # only when asked
    paths.atomic_write(target, b"x", clean_stale=True)
    assert not orphan.exists() and live.exists()


# ---------------------------------------------------------------- 11a. the router that answered gets the credit


def test_served_entries_credit_the_router_as_loaded(fake_backends, tiny_models_toml, tmp_path: Path) -> None:
    import hashlib

    from crecli import routerfile
    from crecli.escalate import Cascade
    from support.ladder import install
    from support.routers import make_router

    install(fake_backends, SURE_TABLE)
    path = tmp_path / "router.cre"
    routerfile.save(make_router(), path)
    loaded = hashlib.sha256(path.read_bytes()).hexdigest()
    served = servedlog.for_command("serve", router=path)
    with Cascade.from_file(path, tiny_models_toml) as cascade:
        # Replaced after startup, before the first answer (a refit, a copy over it).
        path.write_bytes(b"another router entirely")
        trace = cascade.ask("What is 7 plus 5?")
        served.record("What is 7 plus 5?", trace, cascade)
    (entry,) = servedlog.read().entries
    assert entry["router_sha256"] == loaded


# ---------------------------------------------------------------- 12. files that never end


def _endless() -> Path:
    if not Path("/dev/zero").exists():  # pragma: no cover - not POSIX
        pytest.skip("no /dev/zero")
    return Path("/dev/zero")


def _in_time(run_it) -> Run:  # type: ignore[no-untyped-def]
    """Run `run_it()`; fail the test, not hang it, if it is still reading after 20 s."""
    import signal

    def late(signum: int, frame: object) -> None:
        raise AssertionError("still reading an endless file after 20 s")

    previous = signal.signal(signal.SIGALRM, late)
    signal.alarm(20)
    try:
        return run_it()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_log_readers_refuse_a_device(cre, saved_router, tiny_models_toml, four_fakes, tmp_path) -> None:
    zero = _endless()
    m = ("--models", tiny_models_toml)
    refused(_in_time(lambda: cre("eval", zero, "--router", saved_router, *m)), "/dev/zero: is a device", "regular file")
    refused(_in_time(lambda: fit(cre, zero, tiny_models_toml, "-o", tmp_path / "r.cre")), "is a device")
    refused(_in_time(lambda: cre("calibrate", saved_router, "--log", zero, *m)), "is a device")
    refused(_in_time(lambda: cre("batch", zero, "--router", saved_router, *m)), "is a device")
    refused(_in_time(lambda: cre("batch", "--resume", zero, "--router", saved_router, *m)), "is a device")
    assert four_fakes == {}


@pytest.mark.parametrize("args", [("-",), ()])
@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_batch_refuses_a_device_on_stdin_as_it_does_for_file(
    cre, saved_router, tiny_models_toml, four_fakes, monkeypatch, args, device
) -> None:
    # `cre batch - < /dev/zero` read until killed, where `cre batch /dev/zero` was refused.
    if not Path(device).exists():  # pragma: no cover - not POSIX
        pytest.skip(f"no {device}")
    with open(device) as stdin:  # text, as sys.stdin is
        monkeypatch.setattr(sys, "stdin", stdin)
        run = _in_time(lambda: cre("batch", *args, "--router", saved_router, "--models", tiny_models_toml))
    refused(run, "stdin: is a device, not a regular file", "pass a file of prompts as FILE, or pipe them in")
    assert four_fakes == {}


@pytest.mark.parametrize("kind", ["pipe", "terminal"])
def test_batch_still_reads_stdin_from_a_pipe_or_a_terminal(
    cre, saved_router, tiny_models_toml, four_fakes, monkeypatch, kind
) -> None:
    if kind == "pipe":
        reader, writer = os.pipe()
        os.write(writer, b"What is 2 plus 2?\n")
        os.close(writer)
    else:  # typed lines, ended with Ctrl-D
        import pty

        writer, reader = pty.openpty()
        os.write(writer, b"What is 2 plus 2?\n\x04")
    with open(reader) as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        assert sys.stdin.isatty() == (kind == "terminal")
        run = _in_time(lambda: cre("batch", "-", "--router", saved_router, "--models", tiny_models_toml))
    if kind == "terminal":
        os.close(writer)
    assert run.code == 0, run
    assert [json.loads(line)["answer"] for line in run.out.splitlines()] == ["4"]


@pytest.mark.parametrize("args", [(), ("-",), ("/dev/null",)], ids=["stdin", "dash", "file"])
def test_batch_reads_dev_null_as_an_empty_input(
    cre, saved_router, tiny_models_toml, four_fakes, monkeypatch, args
) -> None:
    # `cre batch < /dev/null` (cron, systemd) was refused as a device once stdin was checked:
    # /dev/null ends at once, so it is an empty input, warned about as one.
    if not Path("/dev/null").exists():  # pragma: no cover - not POSIX
        pytest.skip("no /dev/null")
    with open("/dev/null") as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        run = _in_time(lambda: cre("batch", *args, "--router", saved_router, "--models", tiny_models_toml))
    assert run.code == 0 and run.out == "", run
    assert four_fakes == {}


def test_a_served_log_that_is_a_device_is_refused(tmp_path: Path) -> None:
    from crecli.errors import InputError

    with pytest.raises(InputError, match="is a device"):
        _in_time(lambda: servedlog.read([_endless()]))


def test_batch_input_may_still_come_through_a_pipe(tmp_path: Path) -> None:
    from crecli.querylog import open_input

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)  # keeps the open for reading from blocking
    try:
        with open_input(fifo, "x", pipes=True):
            pass
        from crecli.errors import InputError

        with pytest.raises(InputError, match="is a pipe, not a regular file.*save it to a file first"):
            open_input(fifo, "x")
    finally:
        os.close(writer)


# ---------------------------------------------------------------- 12. an oversized manifest, a router of many clusters


def test_a_manifest_over_8_mib_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    import zipfile

    from crecli import routerfile
    from crecli.errors import RouterFileError

    path = tmp_path / "big.cre"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", b" " * ((8 << 20) + 1))  # deflates to a few KB
    assert path.stat().st_size < 100_000
    with pytest.raises(RouterFileError, match="over the limit of 8 MiB"):
        routerfile.load(path, force=True)


def test_a_real_manifest_is_far_under_the_cap(tmp_path: Path) -> None:
    import zipfile

    from crecli import archive, routerfile
    from support.routers import make_router

    path = tmp_path / "r.cre"
    routerfile.save(make_router(), path)
    with zipfile.ZipFile(path) as zf:
        assert zf.getinfo("manifest.json").file_size * 50 < archive.MAX_MANIFEST_BYTES


def test_inspect_shows_a_bounded_table_of_a_router_with_thousands_of_clusters(capsys) -> None:
    from dataclasses import replace

    from crecli import reports
    from support.routers import make_router

    router = make_router()
    many = [replace(router.clusters[i % len(router.clusters)], id=i) for i in range(reports.INSPECT_CLUSTERS + 50)]
    reports.inspect_router(replace(router, clusters=many), as_json=False)
    captured = capsys.readouterr()
    assert f"Showing the first {reports.INSPECT_CLUSTERS} of {len(many)} clusters" in captured.err
    assert "`cre inspect --json` lists them all" in captured.err
    reports.inspect_router(replace(router, clusters=many), as_json=True)
    assert len(json.loads(capsys.readouterr().out)["clusters"]) == len(many)


def test_paths_that_cannot_be_looked_at_are_errors_not_tracebacks(cre, saved_router, sums_log, tiny_models_toml, four_fakes, tmp_path) -> None:
    # Path.is_file and is_dir raise, rather than answer False, for a name too long or a
    # folder the user may not enter (EACCES, which root in CI cannot meet): the same path.
    long = tmp_path / ("x" * 300 + ".jsonl")
    m = ("--models", tiny_models_toml)
    refused(cre("fit", long, *m), str(long)[:40], "too long")
    refused(cre("inspect", tmp_path / ("r" * 300 + ".cre"), *m), "cannot be looked at", "too long")
    refused(cre("fit", sums_log, *m, "-o", long.with_suffix(".cre")), "-o", "cannot")
    refused(cre("fit", sums_log, *m, "-o", long / "r.cre"), "-o", "cannot be looked at", "too long")
    refused(cre("eval", sums_log, "--router", saved_router, *m, "--plot", long / "p.svg"), "--plot", "cannot be looked at")
    assert four_fakes == {}
    assert paths.not_a_file(sums_log) is None and paths.not_a_file(tmp_path) == "is a folder"
    assert paths.not_a_file(tmp_path / "none") == "not found" and paths.not_a_file(Path("/dev/null")) == "is not a regular file"
