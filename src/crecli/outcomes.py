"""Recorded outcomes: what every ladder model answered to every labelled query.

Three parts, in this order below: what is recorded (`Vote`, `Outcome`: plain records;
grading one is `graded`, pricing its votes `costs.CostModel`'s job); `OutcomeStore`, the
resumable SQLite store of (query, model) -> votes, tokens and seconds; and the runner,
`collect`, which has the models answer whatever the store lacks.

`collect` answers every labelled query with every ladder model, k votes each (vote 0
greedy, votes 1..k-1 sampled with seeds `quality.vote_seed(prompt, i)`: the parameters of
`quality.vote_params`, exactly as the cascade draws them; `cre fit` records k = 1 by
default), and records each vote's text, output tokens and seconds, and the greedy vote's
signals. Calibration and evaluation then replay the cascade on these recordings
(`replay`) instead of running models again.

The store is a SQLite file keyed by (prompt sha256, model, model sha256, settings key), so:
- a query is committed as soon as its k votes are in: Ctrl-C loses at most the query in
  flight, and the next run continues where the last one stopped;
- nothing is computed twice, not even two log lines with the same prompt;
- adding a model to the ladder runs only that model, and a changed model file (another
  sha256) or other quality settings (another key) are measured afresh;
- a greedy vote that ends at its option letter is keyed "-o" (`settings_key`): recorded
  before that rule, it runs again, and with k > 1 only it, the sampled votes kept;
- the votes of an in-process model whose answers end at a stop string written as text (the
  "completion" format's newline) are keyed "-s": recorded before such an answer was
  counted by its decode steps (`tokens.decoded_output`), they held one output token more,
  so they run again rather than be priced otherwise than the live cascade prices them.
A remote rung's recording made before token counts its server left out were estimated (0
prompt tokens, 0 output tokens for an answer with text) is read with them estimated by the
live answer's rule (`_estimated`), so it is priced as `cre batch` prices that rung.

Records that carry a correctness label for a model (`Record.labels`) are not run on it:
they become label-only outcomes (`source="label"`), which can choose a cluster's model
but carry no votes for the quality check. Label-only outcomes are never stored; they are
rebuilt from the log on every call, so the log stays their single source of truth.

A prompt too long for a model's context (`PromptTooLong`) does not stop the run: it
becomes a too-long outcome (`source="too_long"`) for that model, which no answer can be
drawn from. The live cascade passes such a rung over (`live.LiveSource.hold`), so the
replay does too: graded wrong, at no cost (and in no mean cost: `costs.mean_answer_cost`), and
never accepted, so the query moves up, and on the top rung it is a wrong final answer,
where `cre ask` fails. Nor are these stored: the fix, a larger `context` in models.toml,
must take effect on the next run. The other way round, a recorded answer whose prompt
tokens no longer fit a lowered `context` is taken as too long (`_fits`), not replayed, and
one whose answer overflows the room its prompt leaves there is run again; an answer the
context cut (not its token cap) is used in that run but not stored (`_context_cut`), so
the full recording is replayed again once `context` is raised. A
query too long for every rung is left out of the measuring, with a warning
(`leave_out_too_long`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shlex
import sqlite3
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

from crecli import console, grading, paths
from crecli.errors import CreError, PromptTooLong, StoreError
from crecli.models.pull import model_identity
from crecli.models import registry
from crecli.models.registry import backend_for
from crecli.models.backend import Signals, context_room
from crecli.models.tokens import output_count, prompt_count, sent_text
from crecli.quality import MAX_VOTES, vote_params, was_cut

if TYPE_CHECKING:
    from crecli.config import ModelSpec, ModelConfig
    from crecli.models.backend import Backend
    from crecli.models.registry import ModelPool
    from crecli.quality import QualityCheck
    from crecli.querylog import Record

STORE_SCHEMA = 1
# SQLite's header field naming the application a database belongs to ("crec"): set in new
# stores, so another program's database is told from ours even before its tables are read.
APPLICATION_ID = 0x63726563

OutcomeKey = tuple[str, str]  # (query id, model name)

# The store's tables, as a store is created; `_store_columns` reads their columns from here.
_TABLES = {
    "meta": "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "outcomes": (
        "CREATE TABLE IF NOT EXISTS outcomes ("
        " prompt_sha256 TEXT NOT NULL, model TEXT NOT NULL, model_sha256 TEXT NOT NULL,"
        " settings_key TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, votes TEXT NOT NULL,"
        " created TEXT NOT NULL,"
        " PRIMARY KEY (prompt_sha256, model, model_sha256, settings_key))"
    ),
}


# ---------------------------------------------------------------- what is recorded


@dataclass(frozen=True)
class Vote:
    text: str
    output_tokens: int
    seconds: float  # vote 0 includes prompt processing; later votes of an in-process rung reuse its KV cache
    signals: "Signals | None" = None  # the greedy vote's own confidence, where the runtime gives it


@dataclass
class Outcome:
    query_id: str
    prompt_sha256: str
    model: str
    model_sha256: str
    settings_key: str
    # "run": votes were recorded; "label": only a correctness label is known; "too_long": the
    # prompt does not fit the model's context, so it has no answer (`reason` says why)
    source: str
    prompt_tokens: int
    votes: list[Vote] = field(default_factory=list)
    label: bool | None = None
    # With answered examples (`shots`): the prompt tokens they add, which every prompt of the
    # cluster shares and llama.cpp reuses, and what identifies that shared prefix
    # (`shots.resolve_shots` sets both). Costs count the prefix once per run of answers
    # (`costs.share_prefixes`), not in every vote.
    prefix_tokens: int = 0
    prefix_key: str = ""
    reason: str = ""  # "too_long": the backend's own words (the prompt's tokens, the context's)


def graded(outcome: Outcome, record: "Record") -> list[bool]:
    """Correctness of each of `outcome`'s votes against `record`'s reference (a label is one
    vote; a too-long outcome one wrong one: the model cannot answer)."""
    if outcome.source == "label":
        return [bool(outcome.label)]
    if outcome.source == "too_long":
        return [False]
    if record.reference is None:
        raise CreError(f"query {record.id!r} has no reference answer, so its votes cannot be graded")
    return [grading.grade(v.text, record.reference, record.match) for v in outcome.votes]


def prompt_sha256(prompt: str, shots: Sequence[tuple[str, str]] = ()) -> str:
    """What a recording is keyed by: the prompt, and the answered examples shown before it."""
    if not shots:
        return hashlib.sha256(prompt.encode("utf-8")).hexdigest()
    body = json.dumps([prompt, [list(s) for s in shots]], ensure_ascii=False)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def settings_key(quality: "QualityCheck", max_tokens: int, option_letters: str = "", text_stops: bool = False) -> str:
    """What makes two recordings of a prompt comparable, besides the model file. A greedy
    vote that ends at its option letter (`option_letters`, which the prompt decides) is
    marked "-o": recorded before that rule, it ran on past the letter. The votes of a model
    whose answers end at a stop string written as text (`text_stops`,
    `registry.counts_text_stops`) are marked "-s": recorded before such an answer was counted
    by its decode steps (`tokens.decoded_output`), it held one output token more, which
    replayed costs would charge and live ones not."""
    return f"{quality.key()}-m{max_tokens}" + ("-o" if option_letters else "") + ("-s" if text_stops else "")


def default_store_path() -> Path:
    return paths.outcome_store_file()


def _columns(db: sqlite3.Connection, table: str) -> tuple[str, ...]:
    """The column names of `table` (one of `_TABLES`), in order."""
    return tuple(str(row[1]) for row in db.execute(f"PRAGMA table_info({table})"))


@functools.cache
def _store_columns() -> dict[str, tuple[str, ...]]:
    """Each store table's columns as crecli creates them: read from `_TABLES` made in memory,
    so what a store is recognised by cannot drift from what a store is made with."""
    db = sqlite3.connect(":memory:")
    try:
        for table in _TABLES.values():
            db.execute(table)
        return {name: _columns(db, name) for name in _TABLES}
    finally:
        db.close()


WAITING = "another cre command (fit, calibrate or eval) is running models on this store; waiting"

# SQLite's primary result codes that `store_error` tells apart.
_SQLITE_PERM, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 3, 5, 6, 8
_SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_AUTH, _SQLITE_NOTADB = 11, 13, 14, 23, 26
# How long a store another connection holds is waited for, at open and at each write,
# before that is reported (`store_error`): SQLite's busy timeout, in seconds.
BUSY_WAIT = 5.0


def store_error(path: Path, exc: sqlite3.Error, doing: str) -> StoreError:
    """The one reading of a failed SQLite call on the store at `path`, at open, read or write:
    `doing` (what failed), the cause in the user's terms, SQLite's own words, and the fix
    for that cause.

    A damaged page made `cre fit` end in a raw traceback once clustering was done, and a
    write to it advised freeing disk space; a store another program held, or one these
    permissions do not open, was called unusable, to be deleted. A lock or a permission
    is never a reason to move a store away. The cause is read from SQLite's result code,
    or from its words where an error carries none (one raised by hand)."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF  # the primary code of an extended one
    words = str(exc).lower()

    def caused(codes: set[int], *phrases: str) -> bool:
        return code in codes or any(phrase in words for phrase in phrases)

    keep = f"keep it: `sqlite3 {shlex.quote(str(path))} .recover` may save its rows"
    if caused({_SQLITE_CORRUPT}, "malformed"):
        cause, fix = "the store is damaged", f"Move it away ({keep}); the next run records outcomes afresh"
    elif caused({_SQLITE_NOTADB}, "not a database"):
        cause = "it is no SQLite database, or one damaged at its start"
        fix = (f"If crecli wrote it, move it away ({keep}) and the next run records outcomes afresh; "
               "if it is another file, give --store another file name")
    elif caused({_SQLITE_BUSY, _SQLITE_LOCKED}, "locked", "busy"):
        cause = "another program holds it"
        fix = "It may be a sqlite3 shell, a database browser or another cre: try again when that program is done with it"
    elif paths.not_a_file(path) == "is a folder":  # not `is_dir`: it raises where the folder cannot be searched
        cause, fix = "it is a folder", "Give --store a file name"
    elif caused({_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_CANTOPEN, _SQLITE_AUTH}, "readonly", "unable to open",
                "permission"):
        cause = "these permissions do not let this user read and write it"
        fix = ("Make the file readable and writable for you and its folder writable (SQLite writes a journal "
               f"beside it): `chmod u+rw {shlex.quote(str(path))}` and `chmod u+rwx {shlex.quote(str(path.parent))}`"
               " (as its owner), then run the command again; or give --store a file you can write")
    elif caused({_SQLITE_FULL}, "disk is full"):
        cause, fix = "the disk is full", "Free disk space, then run the command again"
    else:
        cause, fix = "SQLite could not use it", "Check the file and the disk it is on, or give --store another file name"
    return StoreError(f"{path}: {doing}: {cause} ({exc}). {fix}")


class OutcomeStore:
    """SQLite file of recorded votes; one row per (prompt, model, model file, settings).

    Opening probes whether the store takes a write (`writable`), so a read-only file or a
    full disk is reported before any model runs (`require_writable`), not after an hour
    of answers that could not be recorded; a store only read from may be read-only. It
    also checks the file's structure (`_check_intact`), so a damaged store is reported
    before clustering and model runs, not at the lookup that reaches its bad page. Every
    SQLite error of the store's, at open, read or write, is a `StoreError` (`store_error`).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.recorded = 0  # rows this process has committed
        self.unreadable = 0  # rows `get` could not read, and so ran again
        # Fresh runs this process used but did not commit (cut by the context window:
        # `_context_cut`), so a summary of what ran counts them beside `recorded`.
        self.unstored = 0
        paths.ensure(self.path.parent)
        try:
            self._db = sqlite3.connect(str(self.path), timeout=BUSY_WAIT)
            other = self._other_database()
            if other is not None:
                self._db.close()
                raise CreError(
                    f"{self.path}: {other}, not an outcome store; crecli would write its own tables into it. "
                    "Give --store a new file name (or an outcome store crecli wrote), or leave --store out "
                    "to use the default store; nothing was changed"
                )
            found = self._schema()  # before anything is created: another schema's store is left as it is
            if found is not None and found != str(STORE_SCHEMA):
                self._db.close()
                raise CreError(
                    f"{self.path}: outcome store schema {found} is not the one this crecli writes "
                    f"({STORE_SCHEMA}). Move it away or delete it to record outcomes afresh."
                )
            self._check_intact()  # before anything is written to it
            for table in _TABLES.values():
                self._db.execute(table)
            if found is None:  # a new store (or one whose first open was cut short): mark it ours
                self._db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(STORE_SCHEMA),))
            self._db.commit()
        except sqlite3.DatabaseError as exc:
            self._close_quietly()
            raise store_error(self.path, exc, "cannot open the outcome store") from None
        self.unwritable = self._probe_write()

    @property
    def ran(self) -> int:
        """Fresh runs this process has used: committed (`recorded`) or not (`unstored`)."""
        return self.recorded + self.unstored

    def _other_database(self) -> str | None:
        """What the open database is instead of an outcome store, or None where it is one, or
        new (no tables yet), or one whose first open was cut short (only the store's tables).
        Reads only: nothing is written to a file refused here.

        A file without crecli's `application_id` (new, or made before stores were marked)
        is taken as a store only where its tables are the store's, with the store's columns
        (`_store_columns`). `--store app.db` had the store's tables and a meta row added to
        another program's database, by `cre eval` too, which only reads; and one whose only
        table was named `outcomes` (`trial, result`) was marked as a store, given `meta`,
        and then failed at the first lookup with a traceback."""
        app = self._db.execute("PRAGMA application_id").fetchone()[0]
        if app not in (0, APPLICATION_ID):
            return f"a SQLite database of another program (application_id {app:#x})"
        tables = sorted(name for (name,) in self._db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite!_%' ESCAPE '!'"))
        if not tables or app == APPLICATION_ID:
            return None
        shown = ", ".join(tables[:5]) + (f" and {len(tables) - 5} more" if len(tables) > 5 else "")
        if not set(tables) <= set(_TABLES):
            return f"a SQLite database holding other tables ({shown})"
        columns = {table: _columns(self._db, table) for table in tables}
        if "meta" in columns and columns["meta"] != _store_columns()["meta"]:
            return f"a SQLite database whose meta table has other columns ({', '.join(columns['meta'])})"
        if self._schema() not in (None, str(STORE_SCHEMA)):
            # A store of another schema (said next; its `outcomes` may differ), but not
            # another program's `meta` table alone with a schema row of its own:
            # `outcomes` would be added to it before the schema was read.
            return None if "outcomes" in tables else f"a SQLite database holding other tables ({shown})"
        if "outcomes" in columns and columns["outcomes"] != _store_columns()["outcomes"]:
            return f"a SQLite database whose outcomes table has other columns ({', '.join(columns['outcomes'])})"
        return None  # a store, or one whose first open stopped after creating its first tables

    def _schema(self) -> str | None:
        """The store's schema row (`meta`'s 'schema'), or None where there is none."""
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        except sqlite3.OperationalError as exc:
            if not str(exc).startswith("no such"):  # a lock or a disk error is no missing table
                raise
            return None  # no meta table, or another program's of another shape
        return str(row[0]) if row is not None else None

    def _check_intact(self) -> None:
        """Raise SQLite's corruption error where `PRAGMA quick_check` finds the file damaged.

        It reads every page once: about 12 ms for 20,000 recordings (14 MiB) in the page
        cache, 0.2 s from disk; 1.3 s from disk for 81 MiB. Without it, a damaged page
        stopped a fit at the first lookup that reached it, after clustering, or for a
        later model, after the models before it had run."""
        found = [str(row[0]) for row in self._db.execute("PRAGMA quick_check(1)")]
        if found != ["ok"]:
            # Its first line names the database ("*** in database main ***"); the next, the damage.
            lines = [line for text in found for line in text.splitlines() if not line.startswith("***")]
            raise sqlite3.DatabaseError(f"database disk image is malformed: {lines[0] if lines else found[0]}")

    def _probe_write(self) -> sqlite3.DatabaseError | None:
        """Why the store cannot take a write (read-only file or folder, full disk), or None.

        A real write of one meta row, committed: SQLite opens a read-only file without
        complaint and says so only at the first write.
        """
        try:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('opened', ?)", (paths.stamp(),))
            self._db.commit()
        except sqlite3.DatabaseError as exc:
            self._rollback()
            return exc
        return None

    @contextmanager
    def _failing(self, doing: str) -> Iterator[None]:
        """A SQLite error inside, rolled back, becomes the store's error (`store_error`)."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            self._rollback()
            raise store_error(self.path, exc, doing) from None

    def check_rendering(self, spec: "ModelSpec", identity: str) -> None:
        """Refuse a model whose prompts are now rendered otherwise than its recorded answers'.

        Rows are keyed by prompt, model file and sampling settings, not by models.toml's
        `prompt_format` (or a remote rung's `repeat_penalty`): after changing it, a fit reused
        every answer of the old rendering and described a format the router no longer uses.
        The first use of a (model, file) records its rendering in `meta`; a store from before
        this check takes the rendering of that first use."""
        rendering = f"{spec.prompt_format} repeat_penalty={spec.repeat_penalty}"
        key = f"rendering {spec.name} {identity}"
        with self._failing("cannot read the outcome store"):
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            if self.unwritable is None:
                try:
                    self._db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, rendering))
                    self._db.commit()
                except sqlite3.Error:
                    self._rollback()
            return
        if row[0] != rendering:
            raise CreError(
                f"{self.path}: holds answers of {spec.name} rendered as {row[0]!r}; models.toml now says "
                f"{rendering!r}, and the recorded answers would stand for it. Give --store a new file to "
                "measure it afresh, or set it back"
            )

    def _rollback(self) -> None:
        try:
            self._db.rollback()
        except sqlite3.Error:
            pass

    def _close_quietly(self) -> None:
        db = getattr(self, "_db", None)  # none where connecting itself failed
        if db is not None:
            try:
                db.close()
            except sqlite3.Error:
                pass

    def require_writable(self, what: str) -> None:
        """Stop, before `what` runs, when its answers could not be recorded.

        A store found unwritable at open is probed again first: the program that held it
        then may be done by now, after the log was embedded and clustered."""
        if self.unwritable is not None:
            self.unwritable = self._probe_write()
        if self.unwritable is not None:
            raise store_error(
                self.path, self.unwritable, f"the outcome store cannot be written, so {what} would run for nothing "
                "(nothing was run)")

    @contextmanager
    def running_models(self) -> Iterator[None]:
        """Held while models run into this store, so a second command on the same store waits
        and then reuses what the first recorded instead of running it again.

        An advisory flock on a lock file beside the store: the system releases it when
        the holder exits, killed or not. Where there is no flock, or the lock file cannot
        be made, commands run unlocked, as before.
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            yield
            return
        try:
            fd = os.open(paths.store_lock_file(self.path), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            yield
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                console.status(WAITING)
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def get(self, prompt_sha: str, model: str, model_sha: str, key: str) -> tuple[int, list[Vote]] | None:
        with self._failing("cannot read the outcome store"):
            row = self._db.execute(
                "SELECT prompt_tokens, votes FROM outcomes"
                " WHERE prompt_sha256 = ? AND model = ? AND model_sha256 = ? AND settings_key = ?",
                (prompt_sha, model, model_sha, key),
            ).fetchone()
        if row is None:
            return None
        try:
            votes = []
            for item in json.loads(row[1]):
                # Rows written before greedy signals were recorded hold three fields.
                text, tokens, seconds = item[:3]
                signals = Signals.from_list(item[3]) if len(item) > 3 else None
                votes.append(Vote(str(text), int(tokens), float(seconds), signals))
            return int(row[0]), votes
        except (ValueError, TypeError, IndexError, KeyError, RecursionError, OverflowError):
            # Damage inside a row that `quick_check` cannot see (its bytes, not the file's
            # pages): the row is as good as never recorded, so its model runs again and the
            # new row replaces it, rather than a raw traceback ending the run.
            if not self.unreadable:
                console.warn(f"{self.path}: a recorded outcome could not be read (a damaged row); its model runs "
                             "again for it, as for any other such row, and the new answer replaces it")
            self.unreadable += 1
            return None

    def put(self, prompt_sha: str, model: str, model_sha: str, key: str, prompt_tokens: int, votes: Sequence[Vote]) -> None:
        """Record one query's votes and commit at once (the unit of resumption)."""
        payload = json.dumps(
            [[v.text, v.output_tokens, v.seconds, *([v.signals.to_list()] if v.signals else [])] for v in votes],
            ensure_ascii=False,
        )
        # Rows committed before stay: each query is its own transaction, and a run again
        # continues from them.
        with self._failing(f"cannot record an outcome (the {self.recorded} recorded before it in this run are kept)"):
            self._db.execute(
                "INSERT OR REPLACE INTO outcomes VALUES (?, ?, ?, ?, ?, ?, ?)",
                (prompt_sha, model, model_sha, key, prompt_tokens, payload, paths.stamp()),
            )
            self._db.commit()
        self.recorded += 1

    def count(self) -> int:
        """Recorded (prompt, model, model file, settings) rows."""
        with self._failing("cannot read the outcome store"):
            return int(self._db.execute("SELECT COUNT(*) FROM outcomes").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "OutcomeStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_measurable(records: Sequence["Record"], ladder: Sequence[str]) -> None:
    """Refuse, before any model runs, a record with labels but no reference that does not
    label every ladder model: nothing can measure the others on it (`collect` gives it no
    outcome there). It failed later, after every model ran, with a raw KeyError (`cre eval`,
    `cre calibrate`) or advice to run `cre fit` (`cre fit`); labels of an old ladder's models
    are the usual cause."""
    short = next((r for r in records if r.reference is None and not set(ladder) <= set(r.labels)), None)
    if short is not None:
        unknown = sorted(set(short.labels) - set(ladder))
        raise CreError(
            f"{short.source or short.id}: labels {', '.join(sorted(short.labels))} but no reference, so "
            f"{', '.join(m for m in ladder if m not in short.labels)} cannot be measured on it"
            + (f" ({', '.join(unknown)} not on the ladder)" if unknown else "")
            + "; add a `reference`, or a label for every model of the ladder"
        )


# Rows left out as too long named one by one, at most; the rest are counted.
TOO_LONG_SHOWN = 10


def leave_out_too_long(
    records: Sequence["Record"], results: Mapping[OutcomeKey, Outcome], ladder: Sequence[str], log: Path
) -> list["Record"]:
    """`records` less those whose prompt is too long for every ladder model's context (each
    of their outcomes `source="too_long"`), each left out named on stderr with why and what
    to do; refused when that leaves none.

    One over-long line stopped an hours-long `cre fit` (or `cre eval`, `cre calibrate`) with
    an error, after every model before it had run. A query too long for some rungs only is
    kept: those rungs cannot answer it, and the replay passes them over as `cre ask` does."""
    kept: list["Record"] = []
    left: list[tuple["Record", str]] = []
    for record in records:
        found = [results.get((record.id, model)) for model in ladder]
        reasons = [o.reason for o in found if o is not None and o.source == "too_long"]
        if reasons and len(reasons) == len(found):
            left.append((record, reasons[-1]))  # the top rung's: the largest context, as a rule
        else:
            kept.append(record)
    if not left:
        return kept
    fix = "shorten it, or raise `context` in models.toml"
    if not kept:
        first, why = left[0]
        raise CreError(
            f"{log}: every labelled query is too long for every rung's context, so no model can be measured "
            f"(first: {first.source or repr(first.id)}: {why}); shorten them, or raise `context` in models.toml"
        )
    for record, why in left[:TOO_LONG_SHOWN]:
        console.warn(f"{record.source or f'{log}: query {record.id!r}'}: left out: its prompt is too long for every "
                     f"rung's context; {fix} ({ladder[-1]}: {why})")
    if len(left) > TOO_LONG_SHOWN:
        console.warn(f"{log}: {len(left) - TOO_LONG_SHOWN} more queries left out, too long for every rung's context")
    return kept


# ---------------------------------------------------------------- the runner: models answer what the store lacks


@dataclass
class _Job:
    record: "Record"
    prompt_sha: str
    key: str
    max_tokens: int
    recorded: tuple[int, list[Vote]] | None = None  # votes to keep; only the greedy one is re-run
    shots: tuple[tuple[str, str], ...] = ()
    option_letters: str = ""  # where its greedy vote ends (`grading.option_letters`)
    text_stops: bool = False  # its model's answers can end at a stop string (`settings_key`, "-s")
    recount: bool = False  # run again, whole, only because it was recorded before "-s"
    # Re-run only for the greedy vote's signals (`recorded` lacks them): done only by a
    # recording that has them. Not so for one recorded before `option_letters` applied.
    for_signals: bool = False


def collect(
    records: Sequence["Record"],
    settings: "ModelConfig",
    store: OutcomeStore,
    quality: "QualityCheck",
    models: Sequence[str] | None = None,
    pool: "ModelPool | None" = None,
    shots: Mapping[OutcomeKey, Sequence[tuple[str, str]]] | None = None,
) -> dict[OutcomeKey, Outcome]:
    """Outcomes of every record on every model (default: the ladder), running only what is missing.

    `shots[(record id, model)]`, where given, are the answered examples shown before that
    prompt on that model; the recording is keyed by them too. Prompts that share examples
    run one after another, so llama.cpp reuses the shared prefix as `cre batch` does.

    Model-major: each model is loaded once, answers all its pending queries, and is closed
    before the next one loads (with `pool`, the pool decides when to close it instead).
    Records without a reference and without a label for a model get no outcome for it:
    there would be nothing to grade. A prompt too long for a model's context gets a
    too-long outcome there, not stored (see the module's doc), and the run goes on.
    """
    names = list(models) if models is not None else list(settings.ladder)
    results: dict[OutcomeKey, Outcome] = {}
    for name in names:
        spec = settings.get(name)
        identity = model_identity(spec) or ""
        store.check_rendering(spec, identity)
        text_stops = registry.counts_text_stops(spec)
        pending: list[_Job] = []
        stale: list[_Job] = []
        for record in records:
            examples = tuple((str(q), str(a)) for q, a in (shots or {}).get((record.id, name), ()))
            psha = prompt_sha256(record.prompt, examples)
            if name in record.labels:
                results[(record.id, name)] = Outcome(
                    query_id=record.id, prompt_sha256=psha, model=name, model_sha256=identity,
                    settings_key="label", source="label", prompt_tokens=0, votes=[],
                    label=bool(record.labels[name]),
                )
                continue
            if record.reference is None:
                continue
            max_tokens = grading.max_tokens_for(record.match)
            letters = registry.option_letters_for(spec, record.match, record.prompt)
            job = _Job(record, psha, settings_key(quality, max_tokens, letters, text_stops), max_tokens, shots=examples,
                       option_letters=letters, text_stops=text_stops)
            found = _fits(spec, _recorded(store, spec, identity, quality, job))
            if found is None:
                if letters and quality.k > 1:
                    # Recorded before a greedy vote ended at its option letter ("-o"): only
                    # the greedy vote changes, so the sampled ones are kept, as for signals.
                    earlier = _fits(spec, _recorded(store, spec, identity, quality, replace(job, option_letters="")))
                    job.recorded = earlier if isinstance(earlier, tuple) else None
                if text_stops and job.recorded is None:
                    # Recorded before "-s" (and perhaps "-o"): every vote's count may change,
                    # so all run again; said apart, since nothing else about them did.
                    older = replace(job, text_stops=False)
                    job.recount = any(_recorded(store, spec, identity, quality, j) is not None
                                      for j in [older] + ([replace(older, option_letters="")] if letters else []))
                pending.append(job)
                continue
            results[(record.id, name)] = _outcome(job, name, identity, found)
            if not isinstance(found, str) and found[1] and found[1][0].signals is None:
                job.recorded, job.for_signals = found, True
                stale.append(job)
        rerun = 0
        if stale and registry.reports_signals(spec):
            # Recorded before greedy signals were: the greedy vote alone is run again, and
            # the sampled votes, which do not depend on it, are kept.
            pending.extend(stale)
            rerun = len(stale)
        if pending:
            reused = sum(1 for key in results if key[1] == name) - rerun
            # Greedy votes run again only to end at their option letter, sampled votes kept.
            ending = sum(1 for j in pending if j.recorded is not None and not j.for_signals)
            at_letter = f", {ending} to end at their option letter" if ending else ""
            recount = sum(1 for j in pending if j.recount)
            recounted = f", {recount} again to count their output tokens by decode steps" if recount else ""
            console.status(
                f"{name}: {len(pending) - rerun - ending - recount} queries to run, {rerun} greedy votes to re-run for "
                f"their signals{at_letter}{recounted}, {reused} already recorded or labelled"
            )
            store.require_writable(f"{name} on {len(pending)} queries")
            # Stable: within one set of examples, log order.
            pending.sort(key=lambda j: json.dumps(j.shots, ensure_ascii=False))
            with store.running_models():
                _run_model(spec, identity, pending, store, quality, pool, results)
    return results


def _recorded(
    store: OutcomeStore, spec: "ModelSpec", identity: str, quality: "QualityCheck", job: _Job
) -> tuple[int, list[Vote]] | None:
    """The first k votes of a recording of `job`'s prompt on `spec` with k or more votes,
    their missing token counts estimated (`_estimated`), else None.

    Votes are prefix-stable: vote i's seed depends only on the prompt and i, so the first k
    of a k'-vote recording (same sampling settings) are exactly what a k-vote run draws. A
    greedy-only router (k = 1) thus reuses every recording a 5-vote fit made.
    """
    for more in range(quality.k, MAX_VOTES + 1):
        key = settings_key(replace(quality, k=more), job.max_tokens, job.option_letters, job.text_stops)
        found = store.get(job.prompt_sha, spec.name, identity, key)
        if found is not None:
            return _estimated(spec, job, found[0], found[1][: quality.k])
    return None


def _estimated(spec: "ModelSpec", job: _Job, prompt_tokens: int, votes: list[Vote]) -> tuple[int, list[Vote]]:
    """A remote rung's recording with the token counts its server left out estimated, as a
    live answer's are (`tokens.prompt_count`, `tokens.output_count`). Recorded before they were, such a recording holds 0
    prompt tokens and 0 for each answer with text, and is reused as it is (nothing in its
    key changed): calibration and `cre eval` priced that rung's answers as free where `cre
    batch` prices them above 0. A vote's finish reason is not recorded, so it is estimated
    as an answer that stopped on its own."""
    if spec.backend != "openai":
        return prompt_tokens, votes
    sent = sent_text(spec.prompt_format, job.record.prompt, job.shots)
    return (prompt_count(prompt_tokens, sent),
            [replace(v, output_tokens=output_count(v.output_tokens, v.text, job.max_tokens)) for v in votes])


def _fits(spec: "ModelSpec", found: tuple[int, list[Vote]] | None) -> tuple[int, list[Vote]] | str | None:
    """`found`, a recording of `spec`'s; why its prompt no longer fits the model's context;
    or None (to be run again) where a vote's answer overflows the room the prompt leaves
    there. Both by `backend.context_room`, the rule the llama.cpp backend refuses a prompt
    and cuts an answer by.

    The store key leaves `context` out, so a recording made before it was lowered was
    replayed as an answer while `cre ask` passes the rung over, or in full while live the
    answer stops where the context is full; kept in the store, the recording counts again
    once `context` is raised (a run again answer the context cut is not stored:
    `_context_cut`). An
    answer that fills the room exactly is what the model gives with this context (cut at
    it), so it is replayed, not run again on every run. A remote rung's window is unknown
    here: its server says."""
    window = spec.context_window
    if found is None or window is None:
        return found
    try:
        room = context_room(found[0], window, spec.name)
    except PromptTooLong as exc:
        return str(exc)
    return None if any(vote.output_tokens > room for vote in found[1]) else found


def _context_cut(spec: "ModelSpec", job: _Job, prompt_tokens: int, votes: list[Vote]) -> bool:
    """Whether a vote of a fresh run stopped because its prompt and answer filled `spec`'s
    context, below its token cap (`quality.was_cut` by the window, not by the cap).

    Such a run is used in this one but not stored: the store key leaves `context` out, so
    stored it replaced the full recording a larger context made, and once `context` was
    raised again `_fits` passed it and `was_cut` judged it by the new window, so the cut
    answer was replayed as complete. An answer cut by its cap is the same in every context."""
    window = spec.context_window
    return any(was_cut(v.output_tokens, job.max_tokens, prompt_tokens, window)
               and not was_cut(v.output_tokens, job.max_tokens) for v in votes)


def _outcome(job: _Job, model: str, identity: str, found: tuple[int, list[Vote]] | str) -> Outcome:
    """The outcome of `job` on `model`: its recorded or fresh (prompt tokens, votes), or,
    where `found` is why its prompt does not fit the model's context, a too-long one."""
    if isinstance(found, str):
        return Outcome(
            query_id=job.record.id, prompt_sha256=job.prompt_sha, model=model, model_sha256=identity,
            settings_key=job.key, source="too_long", prompt_tokens=0, votes=[], reason=found,
        )
    return Outcome(
        query_id=job.record.id, prompt_sha256=job.prompt_sha, model=model, model_sha256=identity,
        settings_key=job.key, source="run", prompt_tokens=found[0], votes=found[1],
    )


def _run_model(
    spec: "ModelSpec",
    identity: str,
    jobs: list[_Job],
    store: OutcomeStore,
    quality: "QualityCheck",
    pool: "ModelPool | None",
    results: dict[OutcomeKey, Outcome],
) -> None:
    """Run `jobs` on one model, under the store's lock (`OutcomeStore.running_models`).

    Each job is looked up in the store again just before it runs: another command that
    held the lock may have recorded it meanwhile. The model loads at the first job that
    still needs it, so a command that waited loads nothing when all was done for it.
    """
    backend: Backend | None = None
    # Two log lines with the same prompt and answer cap share one recording (or one refusal).
    done: dict[tuple[str, str], tuple[int, list[Vote]] | str] = {}
    try:
        with console.progress() as bar:
            task = bar.add_task(f"{spec.name}", total=len(jobs), unit="queries")
            for job in jobs:
                cached = done.get((job.prompt_sha, job.key)) or _fits(
                    spec, _recorded_since(store, job, spec, identity, quality))
                if cached is None:
                    if backend is None:
                        backend = pool.get(spec) if pool is not None else backend_for(spec)
                    try:
                        cached = _votes(backend, job, quality)
                    except PromptTooLong as exc:
                        # The model cannot answer it; the others go on (see the module's doc).
                        cached = str(exc)
                    else:
                        if not _context_cut(spec, job, *cached):
                            store.put(job.prompt_sha, spec.name, identity, job.key, *cached)
                        else:
                            store.unstored += 1
                done[(job.prompt_sha, job.key)] = cached
                results[(job.record.id, spec.name)] = _outcome(job, spec.name, identity, cached)
                bar.advance(task)
    finally:
        if pool is None and backend is not None:
            backend.close()


def _recorded_since(
    store: OutcomeStore, job: _Job, spec: "ModelSpec", identity: str, quality: "QualityCheck"
) -> tuple[int, list[Vote]] | None:
    """A recording of `job` made since it was found missing (by another command), or None.

    A job re-run only for the greedy vote's signals (`_Job.for_signals`) counts as done only
    by a recording that has them.
    """
    found = _recorded(store, spec, identity, quality, job)
    if found is None or (job.for_signals and (not found[1] or found[1][0].signals is None)):
        return None
    return found


def _votes(backend: "Backend", job: _Job, quality: "QualityCheck") -> tuple[int, list[Vote]]:
    """The cascade's k votes (`quality.vote_params`) on the cached prompt: the greedy one, then
    the sampled ones in one `Backend.sample_many` call.

    A job with `recorded` votes runs the greedy vote alone and keeps the sampled ones: each
    sampled vote's seed depends only on the prompt and its index (`quality.vote_seed`).
    """
    prompt = job.record.prompt
    count = 1 if job.recorded is not None else quality.k
    params = [vote_params(quality, i, job.max_tokens, prompt, job.shots, job.option_letters) for i in range(count)]
    # The calls the live check makes: the greedy vote, then the sampled ones together.
    gens = [backend.generate(prompt, params[0]), *(backend.sample_many(prompt, params[1:]) if count > 1 else [])]
    votes = [Vote(g.text, g.output_tokens, g.seconds, g.signals) for g in gens]
    if job.recorded is not None:
        votes += job.recorded[1][1 : quality.k]
    return gens[0].prompt_tokens, votes


# ---------------------------------------------------------------- which records to run


def sample_records(records: Sequence["Record"], labels: Sequence[int], n: int, seed: int = 0) -> list["Record"]:
    """At most `n` labelled records per cluster (unclustered, -1, counts as one group).

    Measuring every model on every query is the expensive part of fitting; a few dozen
    queries per cluster pin down each cluster's accuracies well enough to choose its model.
    The choice is seeded, and the records keep their log order.
    """
    if len(records) != len(labels):
        raise ValueError(f"{len(records)} records but {len(labels)} cluster labels")
    if n < 1:
        raise ValueError("sample_records needs n >= 1")
    groups: dict[int, list[int]] = defaultdict(list)
    for i, (record, label) in enumerate(zip(records, labels)):
        if record.labelled:
            groups[int(label)].append(i)
    rng = random.Random(seed)
    keep: set[int] = set()
    for label in sorted(groups):
        members = groups[label]
        keep.update(members if len(members) <= n else rng.sample(members, n))
    return [records[i] for i in sorted(keep)]
