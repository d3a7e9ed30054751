"""Where crecli keeps its files.

Everything lives under platformdirs' per-user directories. `CRE_HOME` overrides all of
them with one folder, which tests and CI use to stay away from the real user's files.
"""

from __future__ import annotations

import os
from pathlib import Path

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


def settings_file() -> Path:
    """User settings written by commands, such as the default router."""
    return config_dir() / "settings.toml"


def ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
