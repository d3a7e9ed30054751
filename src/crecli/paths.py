"""Where crecli keeps its files.

Everything lives under platformdirs' per-user directories. `CRE_HOME` overrides all of
them with one folder, which tests and CI use to stay away from the real user's files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

APP = "crecli"


def _home_override() -> Path | None:
    value = os.environ.get("CRE_HOME")
    return Path(value).expanduser() if value else None


def config_dir() -> Path:
    home = _home_override()
    if home is not None:
        return home / "config"
    import platformdirs

    return Path(platformdirs.user_config_dir(APP))


def cache_dir() -> Path:
    home = _home_override()
    if home is not None:
        return home / "cache"
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP))


def data_dir() -> Path:
    home = _home_override()
    if home is not None:
        return home / "data"
    import platformdirs

    return Path(platformdirs.user_data_dir(APP))


def models_dir() -> Path:
    """Assembled GGUF files. `CRE_MODELS_DIR` lets a team share one read-only copy."""
    value = os.environ.get("CRE_MODELS_DIR")
    return Path(value).expanduser() if value else cache_dir() / "models"


def user_models_toml() -> Path:
    return config_dir() / "models.toml"


def bench_file() -> Path:
    return data_dir() / "bench.json"


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


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)  # symlinks and hard links too
        return a.resolve() == b.resolve()
    except OSError:
        return False


def check_output(
    path: Path, option: str, keep: Iterable[tuple[str, Path | None]] = (), example: str = "router.cre"
) -> Path:
    """Refuse, before any work, an output file that cannot be written or would replace an input.

    Writing a router over its own log destroys the log, and a folder that cannot be
    written in fails only at the end of an hour-long fit, so every command that writes a
    file the user names calls this first. `option` names the flag in messages ("-o");
    `keep` pairs a description ("the query log") with each file the command reads, which
    the output must not be; `example` is a file name to suggest when `path` is a folder.
    """
    from crecli.errors import CreError

    for what, other in keep:
        if other is not None and _same_file(path, Path(other)):
            raise CreError(f"{option} {path} is {what} ({other}); writing there would destroy it. Choose another file name")
    if path.is_dir():
        raise CreError(f"{option} {path} is a folder; give a file name in it, e.g. {path / example}")
    folder = path.absolute().parent
    if not folder.is_dir():
        problem = "is a file, not a folder" if folder.exists() else "does not exist"
        raise CreError(f"{option} {path}: the folder {folder} {problem}; create it first or choose another path")
    try:
        writable_dir(folder)
    except CreError:
        raise CreError(f"{option} {path}: cannot write in the folder {folder}; choose a path you can write to") from None
    return path


def read_user_settings() -> dict:
    """settings.toml as a dict ({} when there is none); a broken file is a ConfigError."""
    import tomllib

    from crecli.errors import ConfigError

    file = user_settings_file()
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read it ({exc}); fix or delete the file") from None


def write_user_settings(data: dict) -> Path:
    """Replace settings.toml atomically, so an interrupted write leaves the old file whole."""
    import tomli_w

    from crecli.errors import ConfigError

    file = user_settings_file()
    folder = writable_dir(file.parent)
    tmp = folder / f".{file.name}.tmp{os.getpid()}"
    try:
        tmp.write_text(tomli_w.dumps(data), encoding="utf-8")
        os.replace(tmp, file)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"{file}: cannot write it ({exc.strerror or exc}){_home_hint()}") from None
    return file


def check_can_set_default() -> None:
    """`--set-default` writes settings.toml after a long run: check first that it parses
    and that its folder takes a file."""
    writable_dir(config_dir())
    read_user_settings()


def set_default_router(router: Path) -> Path:
    """Record `router` as the default for `cre ask` and `cre batch`; returns settings.toml's path."""
    data = read_user_settings()
    data["default_router"] = str(router.resolve())
    return write_user_settings(data)
