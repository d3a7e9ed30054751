"""Where crecli keeps its files.

Everything lives under platformdirs' per-user directories. `CRE_HOME` overrides all of
them with one folder, which tests and CI use to stay away from the real user's files.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable, Iterator

if TYPE_CHECKING:
    import re

APP = "crecli"

# How every file crecli writes spells a moment (routers' fit and calibration dates, the
# outcome store's rows, bench's runs): local time with its UTC offset, so a reader can
# compare moments written on machines in other time zones.
STAMP = "%Y-%m-%dT%H:%M:%S%z"


def stamp(when: float | None = None) -> str:
    """`when` (seconds since the epoch; now if None) as crecli's files spell it."""
    import time

    return time.strftime(STAMP, time.localtime(when))


def stamp_seconds(text: str) -> float:
    """Seconds since the epoch of a moment spelled as `stamp` spells it; ValueError if not."""
    from datetime import datetime

    return datetime.strptime(text, STAMP).timestamp()


def _home_override() -> Path | None:
    value = os.environ.get("CRE_HOME")
    return Path(value).expanduser() if value else None


def _user_dir(kind: str) -> Path:
    """`CRE_HOME/<kind>`, else platformdirs' per-user folder of that kind."""
    home = _home_override()
    if home is not None:
        _check_home(home)
        return home / kind
    import platformdirs

    return Path(getattr(platformdirs, f"user_{kind}_dir")(APP))


def _check_home(home: Path) -> None:
    """Refuse a CRE_HOME that is there and no folder, for every command alike: under a file,
    `cre ask` blamed the first file it read there ("settings.toml: cannot read it (Not a
    directory)") while `cre fit` named CRE_HOME. One that is not there yet is created when
    written to; one that cannot be looked at is said by what uses it (`ensure`, `_home_hint`)."""
    import stat

    try:
        is_dir = stat.S_ISDIR(home.stat().st_mode)
    except NotADirectoryError:
        is_dir = False  # a path through a file
    except (OSError, ValueError):
        return
    if not is_dir:
        from crecli.errors import CreError

        raise CreError(f"CRE_HOME={home} must be a folder you can write to, and it is not one; point CRE_HOME "
                       "at a folder (it is created if missing), or unset it")


def config_dir() -> Path:
    return _user_dir("config")


def cache_dir() -> Path:
    return _user_dir("cache")


def data_dir() -> Path:
    return _user_dir("data")


def models_dir() -> Path:
    """Assembled GGUF files. `CRE_MODELS_DIR` lets a team share one read-only copy."""
    value = os.environ.get("CRE_MODELS_DIR")
    return Path(value).expanduser() if value else cache_dir() / "models"


def user_models_toml() -> Path:
    return config_dir() / "models.toml"


# The served-query log (`servedlog`): the live file, its rotated generations
# served.1.jsonl .. served.3.jsonl beside it, and the lock its writers take.
SERVED_LOG = "served.jsonl"
SERVED_LOCK = "served.lock"
SERVED_GENERATIONS = 3


def served_log_file() -> Path:
    """The live served-query log (rotated generations sit beside it)."""
    return data_dir() / SERVED_LOG


def served_generation(live: Path, n: int) -> Path:
    """`served.jsonl` for 0, `served.<n>.jsonl` for older generations."""
    if n == 0:
        return live
    return live.with_name(f"{live.stem}.{n}{live.suffix}")


def bench_file() -> Path:
    return data_dir() / "bench.json"


def bench_lock_file() -> Path:
    """Held while a bench adds its run to bench.json (`models.bench.save`)."""
    return bench_file().with_name("bench.lock")


def user_settings_file() -> Path:
    """User settings written by commands, such as the default router."""
    return config_dir() / "settings.toml"


def _home_hint() -> str:
    home = _home_override()
    return f"; CRE_HOME={home} must be a folder you can write to" if home is not None else ""


def ensure(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from crecli.errors import CreError

        raise CreError(f"cannot create the folder {path} ({exc.strerror or exc}){_home_hint()}") from None
    return path


def writable_dir(path: Path) -> Path:
    """`ensure(path)`, then prove a file can be created in it.

    A read-only folder or disk says so only when written to: for `cre fit` that is after
    the whole run, so commands probe the folders they will write in before any work.
    """
    import tempfile

    from crecli.errors import CreError

    ensure(path)
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise CreError(f"cannot write in {path} ({exc.strerror or exc}){_home_hint()}") from None
    return path


# An orphan older than this is removed even when its pid is alive again (pids are reused).
STALE_TEMP_SECONDS = 3600.0


def atomic_write(path: Path, data: bytes | str | Callable[[BinaryIO], None], *, mode: int = 0o666,
                 clean_stale: bool = False) -> None:
    """Replace `path` with `data`, so that a reader finds the old file or the new one, never a part.

    `data` is bytes, text (written as UTF-8), or a function that writes to the open binary
    file; an exception it raises abandons the write. The bytes go to a temp file in the same
    folder, `.NAME.PID@HOST.RANDOM.tmp`, created with O_EXCL (so a file or link planted under that
    name is never written through) and `mode`, which the umask filters: the default 0o666
    gives what any file the user creates gets, 0o600 keeps a private file private. A file
    being replaced keeps its own mode instead, as `cp` onto it would: a 0600 export or
    settings.toml must not turn 0644 by being rewritten, and one the user opened up stays
    open. A `path` that is a symlink of this user's (or root's) is followed to the file it
    names, which is the one replaced (its temp file sits beside it, in its folder): the link
    stays a link, and whoever reads the target reads the new file (`written_path`; another
    user's link is not followed). The temp file is fsynced, renamed over the
    file, and the folder fsynced, so the rename survives a power cut. On any failure (Ctrl-C
    included) the temp file is removed and the file is as it was; an OSError is raised as
    it came, for the caller to phrase. The folder must exist.

    `clean_stale` first removes the temp files that earlier writes of `path` left when they
    were killed (`remove_stale_temps`), for files rewritten often in shared folders.
    """
    with _replacing(path, mode, clean_stale, by_name=False) as (_, fh):
        if callable(data):
            data(fh)
        else:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)


@contextmanager
def atomic_path(path: Path, *, mode: int = 0o666, clean_stale: bool = False) -> Iterator[Path]:
    """`atomic_write` for a writer that takes a file name, not an open file (llama.cpp's
    quantizer): the block is given the temp file's path, writes it by that name and may read
    it back to check it; when the block ends, the file takes `path`'s place as `atomic_write`'s
    does (the mode, a link followed, the fsyncs, the rename), and an exception the block
    raises removes it and leaves `path` as it was. Its bytes are written once, where they
    stay: a scratch file copied into `atomic_write` wrote a model twice.

    The writer must write the file it is given in place (truncate and write, as fopen "wb"
    and std::ofstream do), not put another file under its name: the mode is set on, and the
    fsync made through, the file created here with O_EXCL, so one that is not that file when
    the block ends (a link planted under the temp name, a writer that renamed its own file
    over it) is refused, an OSError, and published nowhere. While the block runs the file keeps
    its owner's write bit, which the writer's own open needs (a 0444 file being replaced
    gave llama.cpp "permission denied"); the replaced file's mode is set when it ends."""
    with _replacing(path, mode, clean_stale, by_name=True) as (tmp, _):
        yield tmp


@contextmanager
def _replacing(path: Path, mode: int, clean_stale: bool, by_name: bool) -> Iterator[tuple[Path, BinaryIO]]:
    """The temp file that takes `path`'s place when the block ends, by its path and open for
    writing: `atomic_write` says how, for it and `atomic_path` alike. `by_name`: the block
    writes the file by its name (`atomic_path`), not through the open file."""
    import secrets

    # Replacing the link itself would leave its target, say a shared export, stale.
    path = written_path(path)
    if clean_stale:
        remove_stale_temps(path)
    # The pid in the name lets a later write tell an orphan (its writer was killed) from a
    # write still in progress, on the same host (`host_tag`: in a folder shared between
    # machines another host's pid says nothing here); the random part keeps two writes in
    # one process apart.
    tmp = path.parent / f".{path.name}.{os.getpid()}@{host_tag()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            old = _stat(path)
            # Permission bits only: a set-id bit kept on new contents is what the kernel itself
            # clears when such a file is written. Set before any byte is written, so a private
            # file's new contents are never readable by more than its old ones were.
            kept = old.st_mode & 0o777 if old is not None and hasattr(os, "fchmod") else None  # not on Windows
            if kept is not None:
                os.fchmod(fh.fileno(), kept | (0o200 if by_name else 0))
            yield tmp, fh
            if by_name and not os.path.samestat(os.fstat(fh.fileno()), os.lstat(tmp)):
                raise OSError(errno.EEXIST, "the temp file was replaced while it was written", str(tmp))
            if by_name and kept is not None:
                os.fchmod(fh.fileno(), kept)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def remove_stale_temps(path: Path) -> None:
    """Delete temp files that interrupted `atomic_write`s of `path` left behind (kill -9, power loss).

    Matches `.NAME.PID@HOST.RANDOM.tmp` (and `.NAME.PID.RANDOM.tmp` and `.NAME.RANDOM.tmp`,
    which earlier crecli wrote): removed when older than STALE_TEMP_SECONDS, or when written
    on this host (or before hosts were in the name) by a pid no longer running. A write from
    another host sharing the folder is left to the age rule: its pid means nothing here. Only
    regular files: a link or folder under such a name is not ours to delete.
    """
    import re
    import stat

    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:(\d{{1,10}})(?:@([0-9a-f]{{8}}))?\.)?[A-Za-z0-9_]{{6,32}}\.tmp$")
    # A pid without a host was written here, before hosts were in the name.
    for entry in orphans(path.parent, pattern, stat.S_ISREG, STALE_TEMP_SECONDS, unnamed_host=host_tag()):
        try:
            entry.unlink()
        except OSError:
            pass


def orphans(folder: Path, pattern: "re.Pattern[str]", kind: Callable[[int], bool], max_age: float,
            unnamed_host: str | None = None) -> list[Path]:
    """The entries of `folder` whose names match `pattern` (groups: pid, host, either absent),
    of `kind` (`stat.S_ISREG`, `stat.S_ISDIR`: a link is never one), left by a process that
    is gone (`orphaned`); a name with a pid but no host counts as `unnamed_host`'s."""
    import time

    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    now = time.time()
    found = []
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None:
            continue
        try:
            st = entry.lstat()
        except OSError:
            continue
        pid, host = match.group(1), match.group(2)
        if kind(st.st_mode) and orphaned(int(pid) if pid else None, host or unnamed_host, now - st.st_mtime, max_age):
            found.append(entry)
    return found


def orphaned(pid: int | None, host: str | None, age: float, max_age: float) -> bool:
    """Whether what a process left under a `PID@HOST` name (a temp file, a download folder)
    belongs to one that is gone: this host's once its pid no longer runs, and anything once
    older than `max_age` seconds (another host's pid means nothing here, and a pid may be
    reused). Containers that share a host name and a folder but not their pids could take
    each other's for gone: give each its own cache dir."""
    if pid is not None and host == host_tag() and not process_running(pid):
        return True
    return age > max_age


def host_tag() -> str:
    """This machine in a temp file's name: 8 hex digits of its host name's sha256."""
    import hashlib
    import socket

    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def process_running(pid: int) -> bool:
    """Whether `pid` may still be writing; when unsure, yes (the age rule cleans up later)."""
    # os.kill(pid, 0) terminates the process on Windows, and pid 0 means our own group.
    if pid == os.getpid() or pid <= 0 or os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # PermissionError: alive, another user's
    return True


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform lets a folder be opened or synced.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def outcome_store_file() -> Path:
    """The outcome store every fit shares unless `--store` names another."""
    return data_dir() / "outcomes.sqlite"


# SQLite's own files beside a store; they and the store's lock file are part of the store.
STORE_SIDECARS = ("-journal", "-wal", "-shm")


def store_lock_file(store: Path) -> Path:
    """The lock file a command holds while it runs models into `store` (`OutcomeStore.running_models`):
    beside the file `store` leads to, through any symlinks (as SQLite names its journal).

    Named after the path as spelt, a store opened through a symlink took a lock of its own
    while another command held the store's, and both ran the same models. A hard link is
    not covered: its name is another file name with a lock of its own (SQLite's journal
    too, which is why SQLite warns against hard-linked databases)."""
    real = _resolved(Path(store))
    return real.with_name(real.name + ".lock")


# What an outcome store is called in `Owned.what` (and so in `check_output(allow=...)`), and
# in the `keep` pairs callers pass for the store a command uses.
OWNED_STORE = "an outcome store"
KEEP_STORE = "the outcome store"


@dataclass(frozen=True)
class Owned:
    """A file (or, with `tree`, a whole folder) crecli keeps for itself."""

    what: str
    path: Path
    tree: bool = False


def owned_files(stores: Iterable[Path | None] = ()) -> list[Owned]:
    """Every file crecli owns, and the folders it owns whole: the one list a user-named
    output is checked against (`check_output`).

    `stores` adds outcome stores given with `--store` to the default one. Model files and
    caches (the embedding cache, verified stamps, numba's) are owned as folders, since
    their file names come and go.
    """
    owned: list[Owned] = []
    for store in (outcome_store_file(), *(Path(s) for s in stores if s is not None)):
        owned.append(Owned(OWNED_STORE, store))
        owned += [Owned("an outcome store's own file", store.with_name(store.name + s)) for s in STORE_SIDECARS]
        owned.append(Owned("an outcome store's lock file", store_lock_file(store)))
    live = served_log_file()
    owned += [Owned("the served-query log", served_generation(live, n)) for n in range(SERVED_GENERATIONS + 1)]
    owned.append(Owned("the served-query log's lock file", live.with_name(SERVED_LOCK)))
    owned += [
        Owned("crecli's settings.toml", user_settings_file()),
        Owned("crecli's benchmark file", bench_file()),
        Owned("crecli's benchmark file's lock file", bench_lock_file()),
        Owned("the user models.toml", user_models_toml()),
        Owned("crecli's model folder", models_dir(), tree=True),
        Owned("crecli's cache folder", cache_dir(), tree=True),
    ]
    return owned


def not_a_file(path: Path) -> str | None:
    """None where `path` is a regular file; else what it is instead, phrased for an error
    ("not found", "is a folder", "is not a regular file", "cannot be looked at (Permission
    denied)"). `Path.is_file` raises on a folder the user may not enter, or a name too long,
    where a user should read a sentence, not a traceback."""
    import stat

    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL in the name
        return "not found"
    except OSError as exc:
        return f"cannot be looked at ({exc.strerror or exc})"
    if stat.S_ISDIR(st.st_mode):
        return "is a folder"
    return None if stat.S_ISREG(st.st_mode) else "is not a regular file"


def written_path(path: Path) -> Path:
    """The file a write of `path` replaces (`atomic_write`): the file a symlink names, so
    the link stays and its target is updated; `path` itself where it is no link, or a link
    owned by another user (neither root nor this one). Such a link, planted in a shared
    folder such as /tmp to name one of this user's files, is not followed: the rename then
    meets the link, which a sticky folder does not let this user replace."""
    import stat

    try:
        link = os.lstat(path)
    except OSError:
        return Path(os.path.realpath(path))
    if stat.S_ISLNK(link.st_mode) and hasattr(os, "getuid") and link.st_uid not in (0, os.getuid()):
        return Path(path).absolute()
    return Path(os.path.realpath(path))


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()  # follows symlinks, as a write would
    except (OSError, ValueError):
        return None


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return path.absolute()


def _same_file(a: Path, b: Path) -> bool:
    """Whether writing `a` writes `b`: the same inode where both exist (symlinks and hard
    links included), else the same resolved path."""
    sa, sb = _stat(a), _stat(b)
    if sa is not None and sb is not None:
        return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
    return _resolved(a) == _resolved(b)


# A hard link into an owned folder is found by scanning it; the scan stops here, which
# the model and cache folders (a few dozen files) never reach.
_TREE_SCAN_LIMIT = 10_000


def _in_tree(path: Path, tree: Path) -> bool:
    """Whether `path` lies in the folder `tree`, or is a hard link to a file in it."""
    root = _resolved(tree)
    if _resolved(path).is_relative_to(root):
        return True
    st = _stat(path)
    if st is None or st.st_nlink < 2 or not root.is_dir():
        return False
    seen = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            seen += 1
            other = _stat(Path(folder) / name)
            if other is not None and (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                return True
            if seen >= _TREE_SCAN_LIMIT:
                return False
    return False


def owner_of(path: Path, stores: Iterable[Path | None] = (), allow: str | None = None) -> Owned | None:
    """The owned file (`owned_files`) that writing `path` would write over, or None.

    `allow` names the one kind an output may be (`--store` may be an outcome store).
    """
    for owned in owned_files(stores):
        if owned.what == allow:
            continue
        if _in_tree(path, owned.path) if owned.tree else _same_file(path, owned.path):
            return owned
    return None


def check_output(
    path: Path,
    option: str,
    keep: Iterable[tuple[str, Path | None]] = (),
    example: str = "router.cre",
    allow: str | None = None,
) -> Path:
    """Refuse, before any work, an output file that cannot be written, would replace an
    input, or would replace a file crecli owns.

    Writing a router over its own log destroys the log, and a folder that cannot be
    written in fails only at the end of an hour-long fit, so every command that writes a
    file the user names calls this first. `option` names the flag in messages ("-o");
    `keep` pairs a description ("the query log") with each file the command reads, which
    the output must not be; `example` is a file name to suggest when `path` is a folder.
    A path that exists and is not a regular file (a folder, a FIFO, a device) is refused.
    A symlink is judged by the file it names, and the folder that must take a file is
    that file's, where `atomic_write` writes.
    Every file in `owned_files` (the outcome stores, including any in `keep`, the
    served-query log, settings, benchmarks, models and caches) is refused too, however
    the path reaches it; `allow` exempts one kind (`--store` may be an OWNED_STORE). The
    stores in `keep` must be described as KEEP_STORE.
    """
    from crecli.errors import CreError

    keep = list(keep)
    for what, other in keep:
        if other is not None and _same_file(path, Path(other)):
            raise CreError(f"{option} {path} is {what} ({other}); writing there would destroy it. Choose another file name")
    stores = [Path(other) for what, other in keep if other is not None and what == KEEP_STORE]
    owned = owner_of(path, stores, allow=allow)
    if owned is not None:
        where = f"is in {owned.what} ({owned.path})" if owned.tree else f"is {owned.what} ({owned.path})"
        raise CreError(
            f"{option} {path} {where}, which crecli keeps for itself; writing there would destroy it. "
            "Choose another file name"
        )
    path_is = not_a_file(path)
    if path_is == "is a folder":
        raise CreError(f"{option} {path} is a folder; give a file name in it, e.g. {path / example}")
    if path_is == "is not a regular file":
        # `atomic_write` renames its temp file over the name: a FIFO or device node there
        # would be swapped for a regular file, never written through.
        raise CreError(f"{option} {path} is not a regular file (a pipe, socket or device); writing there would "
                       "replace it. Choose another file name")
    if path_is is not None and path_is.startswith("cannot"):  # the write would fail too, after the work
        raise CreError(f"{option} {path} {path_is}; choose another path")
    folder = written_path(path).parent  # where `atomic_write` puts its temp file: a link's target's
    folder_is = not_a_file(folder)
    if folder_is != "is a folder":
        problem = {None: "is a file, not a folder", "not found": "does not exist",
                   "is not a regular file": "is not a folder"}.get(folder_is, folder_is)
        raise CreError(f"{option} {path}: the folder {folder} {problem}; create it first or choose another path")
    try:
        writable_dir(folder)
    except CreError:
        raise CreError(f"{option} {path}: cannot write in the folder {folder}; choose a path you can write to") from None
    return path


def parse_toml(text: str, file: Path, fix: str) -> dict:
    """`text`, read from `file`, parsed as TOML; any TOML it cannot read is a ConfigError that
    names `file` and ends with `fix`.

    Here, not in `config`, so settings.toml (read here) and models.toml (`config._read`) share
    it: `config` imports this module. Not only TOMLDecodeError: tomllib recurses once per
    nesting level, so `x = [[[[...` some thousand deep was a RecursionError traceback, and an
    integer of more than `sys.get_int_max_str_digits()` digits a ValueError one.
    """
    import sys
    import tomllib

    from crecli.errors import ConfigError

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        problem = f"not valid TOML: {exc}"
    except RecursionError:
        problem = "arrays or tables nested too deeply to read"
    except ValueError as exc:  # TOMLDecodeError is one too, caught above
        # Python's own words name `sys.set_int_max_str_digits()`, no fix for a file's reader.
        problem = (f"an integer with more than {sys.get_int_max_str_digits()} digits" if "digits" in str(exc)
                   else f"cannot read it ({exc})")
    raise ConfigError(f"{file}: {problem}; {fix}")


def read_user_settings() -> dict:
    """settings.toml as a dict ({} when there is none); a broken file is a ConfigError."""
    from crecli.errors import ConfigError

    file = user_settings_file()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read it ({exc}); fix or delete the file") from None
    data = parse_toml(text, file, "fix or delete the file")
    # A misspelt `log_queries = false` would leave every prompt logged without a word. Tables
    # are your own (crecli reads only the top level, and `--set-default` keeps them).
    unknown = sorted(k for k, v in data.items() if k not in SETTINGS and not isinstance(v, dict))
    if unknown:
        raise ConfigError(f"{file}: unknown setting(s) {', '.join(map(repr, unknown))}; crecli reads "
                          f"{' and '.join(SETTINGS)}; fix or delete the line(s)")
    return data


DEFAULT_ROUTER = "default_router"  # the settings.toml key `cre fit --set-default` writes
LOG_QUERIES = "log_queries"  # false turns the served-query log off (`servedlog.enabled`)
SETTINGS = (DEFAULT_ROUTER, LOG_QUERIES)


def default_router() -> Path | None:
    """The router `cre fit --set-default` recorded in settings.toml, or None when none is set.

    A settings.toml that cannot be read, or a value that is not a path, is a ConfigError.
    """
    from crecli.errors import ConfigError

    value = read_user_settings().get(DEFAULT_ROUTER)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(
            f"{user_settings_file()}: {DEFAULT_ROUTER} must be a file path in quotes, got {value!r}; fix or delete the line"
        )
    return Path(value).expanduser()


def shipped_router() -> Path:
    """The router crecli ships: fitted and calibrated on examples/querylog-large.jsonl (1,400
    BIG-bench queries, 16 tasks) with the default ladder by bench/refit_default_router.sh."""
    from importlib.resources import files

    return Path(str(files("crecli") / "routers" / "default.cre"))


SHIPPED_ROUTER_NAME = "the default router shipped with crecli (fitted on 1,400 BIG-bench queries of 16 tasks)"


def router_in_use(router: Path | None) -> tuple[Path, str]:
    """The router a command answers with, and how to name it to a user: `router` when given,
    else the default `cre fit --set-default` recorded, else the one crecli ships, so `cre
    ask` answers through the cascade right after setup."""
    if router is not None:
        return router, str(router)
    default = default_router()
    if default is not None:
        what = not_a_file(default)
        if what is not None:
            # Said here, not by the router loader: its "no such router file" named a path
            # the user never typed, and not the setting to change.
            from crecli.errors import ConfigError

            what = "does not exist" if what == "not found" else what
            raise ConfigError(
                f"{user_settings_file()}: {DEFAULT_ROUTER} = {str(default)!r}, which {what}; pass --router FILE, "
                f"make another the default with `cre fit LOG -o router.cre --set-default`, or delete the "
                f"{DEFAULT_ROUTER} line to answer with the router crecli ships"
            )
        return default, f"your default router {default}"
    shipped = shipped_router()
    if not shipped.is_file():
        from crecli.errors import CreError

        raise CreError(
            f"no router given, no default router set, and the router crecli ships is missing ({shipped}): "
            "pass --router FILE, fit one with `cre fit LOG -o router.cre --set-default`, or reinstall crecli"
        )
    return shipped, SHIPPED_ROUTER_NAME


def write_user_settings(data: dict) -> Path:
    """Replace settings.toml with `data` (comments and layout are not kept; see
    `update_user_setting` for a change that keeps them)."""
    import tomli_w

    return _replace_settings_text(tomli_w.dumps(data))


def _replace_settings_text(text: str) -> Path:
    """Write settings.toml atomically, so an interrupted write leaves the old file whole."""
    from crecli.errors import ConfigError

    file = user_settings_file()
    writable_dir(file.parent)
    try:
        atomic_write(file, text)
    except OSError as exc:
        raise ConfigError(f"{file}: cannot write it ({exc.strerror or exc}){_home_hint()}") from None
    return file


def _with_key(text: str, key: str, line: str) -> str:
    """`text` with the top-level `key = ...` line replaced by `line`, or `line` added before
    the first table; everything else (comments, order, other keys) as it was."""
    import re

    pattern = re.compile(rf"""^[ \t]*(?:{re.escape(key)}|"{re.escape(key)}"|'{re.escape(key)}')[ \t]*=""")
    lines = text.splitlines(keepends=True)
    for i, old in enumerate(lines):
        if old.lstrip().startswith("["):
            break  # past the top level: keys below belong to a table
        if pattern.match(old):
            lines[i] = line
            return "".join(lines)
    else:
        i = len(lines)
    if i and not lines[i - 1].endswith("\n"):
        lines[i - 1] += "\n"
    lines.insert(i, line)
    return "".join(lines)


def update_user_setting(key: str, value: str | bool | int | float) -> Path:
    """Set one top-level key of settings.toml, keeping the rest of the file as written.

    Only that key's line changes (or one line is added). The edit is checked by parsing
    the result: if it does not read back as the old settings with the one key changed (a
    value spread over several lines, say), the file is rewritten from its parsed data,
    which keeps every setting but not the comments.
    """
    import tomli_w

    from crecli.errors import ConfigError

    data = read_user_settings()  # a broken file is a ConfigError before anything is written
    try:
        text = user_settings_file().read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        raise ConfigError(f"{user_settings_file()}: cannot read it ({exc.strerror or exc}); fix or delete the file") from None
    wanted = {**data, key: value}
    edited = _with_key(text, key, tomli_w.dumps({key: value}))
    try:
        same = parse_toml(edited, user_settings_file(), "") == wanted
    except ConfigError:  # any TOML tomllib cannot read: rewrite the file whole
        same = False
    return _replace_settings_text(edited if same else tomli_w.dumps(wanted))


def check_can_set_default() -> None:
    """`--set-default` writes settings.toml after a long run: check first that it parses
    and that its folder takes a file."""
    writable_dir(config_dir())
    read_user_settings()


def set_default_router(router: Path) -> Path:
    """Record `router` as the default for `cre ask`, `batch`, `serve`, `eval` and `inspect`; returns settings.toml's path.

    Only the `default_router` line of settings.toml changes: comments and other settings
    stay as the user wrote them.
    """
    return update_user_setting(DEFAULT_ROUTER, str(router.resolve()))


class LockBusy(TimeoutError):
    """A lock stayed held past the wait (`exclusive`); not any other ETIMEDOUT (an NFS
    write), which is a failure like the rest."""


@contextmanager
def exclusive(lock_file: Path, wait: float) -> Iterator[None]:
    """An exclusive lock between `cre` processes on `lock_file`, where the platform has
    flock; `LockBusy` (an OSError) after `wait` seconds (0 tries once). The system releases
    it when the holder exits, killed or not, so a stopped `cre` never leaves it stuck."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: the races it prevents are then possible but rare
        yield
        return
    import errno
    import time

    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockBusy(errno.ETIMEDOUT, f"its lock {lock_file} is held by another process "
                                   f"(waited {wait:.0f} s; a stopped cre?)") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing releases the lock
