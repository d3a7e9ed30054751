from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import os

import pytest

from crecli import config, paths
from crecli.errors import ConfigError


def test_shipped_ladder_is_three_models_smallest_first() -> None:
    settings = config.load()
    assert settings.ladder == ["gemma-3-270m", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"]
    sizes = [spec.size for spec in settings.ladder_specs()]
    assert sizes == sorted(sizes)
    gemma = settings.get("gemma-3-270m")
    assert gemma.prompt_format == "completion"
    assert len(gemma.chunks) == 4 and gemma.chunks[0].package.endswith("==1.0.0")
    assert len(settings.get("qwen2.5-coder-1.5b-instruct").chunks) == 22
    for spec in settings.ladder_specs():
        assert spec.sha256 and len(spec.sha256) == 64
        assert spec.n_gpu_layers == 0 and spec.context >= 2048


def test_user_file_overrides_fields_and_explicit_file_wins(tmp_path: Path) -> None:
    paths.ensure(paths.config_dir())
    paths.user_models_toml().write_text(
        '[models."qwen2.5-coder-0.5b-instruct"]\nn_gpu_layers = 99\n'
        '[models.mine]\npath = "/models/mine.gguf"\nprompt_format = "chatml"\n'
    )
    settings = config.load()
    q = settings.get("qwen2.5-coder-0.5b-instruct")
    assert q.n_gpu_layers == 99 and q.sha256  # other shipped fields survive
    assert settings.get("mine").file == Path("/models/mine.gguf")
    assert "mine" not in settings.ladder

    explicit = tmp_path / "extra.toml"
    explicit.write_text('ladder = ["gemma-3-270m", "mine"]\n[models.mine]\ncontext = 8192\n')
    settings = config.load(explicit)
    assert settings.ladder == ["gemma-3-270m", "mine"]
    assert settings.get("mine").context == 8192
    assert settings.get("mine").path == "/models/mine.gguf"


def test_a_relative_path_is_read_from_the_folder_of_the_models_toml_that_says_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `path = "mine.gguf"` beside the user's models.toml was taken from the current folder:
    # verified when cre ran in the config dir, missing from anywhere else.
    from crecli.models import catalog, pull

    paths.ensure(paths.config_dir())
    (paths.config_dir() / "mine.gguf").write_bytes(b"GGUF" + b"a" * 10)
    paths.user_models_toml().write_text('[models.mine]\npath = "mine.gguf"\n[models.up]\npath = "../up.gguf"\n')
    explicit = tmp_path / "elsewhere" / "extra.toml"  # sets only a field: the path stays the user file's
    explicit.parent.mkdir()
    explicit.write_text('[models.mine]\ncontext = 4096\n[models.near]\npath = "sub/near.gguf"\n')
    monkeypatch.chdir(tmp_path)
    settings = config.load(explicit)
    mine = settings.get("mine")
    assert mine.file == paths.config_dir() / "mine.gguf" and mine.context == 4096
    assert pull.file_state(mine).verified
    assert settings.get("up").file == paths.config_dir() / ".." / "up.gguf"
    assert settings.get("near").file == explicit.parent / "sub" / "near.gguf"
    rows = {row["name"]: row for row in catalog.rows(settings)}
    assert rows["mine"]["path"] == str(paths.config_dir() / "mine.gguf") and rows["mine"]["present"]
    # A spec built in code, with no models.toml, is taken from the current folder, as before.
    assert config.ModelSpec(name="x", path="x.gguf").file == Path("x.gguf")


def test_messages_name_the_file_that_set_the_field_they_are_about(tmp_path: Path) -> None:
    # "check `path` ... in X" named the last models.toml to touch the model, here one that
    # set only its context, not the file whose `path` was wrong.
    from crecli.models import openai, pull

    paths.ensure(paths.config_dir())
    user = paths.user_models_toml()
    user.write_text(f'[models.mine]\npath = "{tmp_path / "gone.gguf"}"\n'
                    '[models.far]\nurl = "http://127.0.0.1:9/v1"\napi_model = "qwen"\n'
                    '[models."gemma-3-270m"]\nsha256 = "' + "a" * 64 + '"\n')
    extra = tmp_path / "extra.toml"
    extra.write_text('[models.mine]\ncontext = 4096\n[models.far]\ntimeout = 30\n'
                     '[models."gemma-3-270m"]\ncontext = 4096\n')
    settings = config.load(extra)
    mine, far, gemma = settings.get("mine"), settings.get("far"), settings.get("gemma-3-270m")
    assert mine.defined_in == far.defined_in == str(extra)  # the last file to touch them
    with pytest.raises(pull.ModelNotAvailable, match="check `path` for 'mine' in (.*)$") as caught:
        pull.require_file(mine)
    assert caught.value.args[0].endswith(f"in {user}")
    assert str(pull.unavailable(mine)).endswith(f"check `path` for 'mine' in {user}")
    assert openai._advice(404, far).startswith(f"check `url` and `api_model` of 'far' in {user} ")
    assert openai._advice(401, far).endswith(f"set `api_key_env` in {user}")  # beside the url it set
    assert (mine.set_in("context"), far.set_in("timeout")) == (str(extra), str(extra))
    # Fields set by two files: each named with its own.
    assert pull._check_pins(gemma, "sha256").startswith(
        f"check `sha256` of 'gemma-3-270m' in {user}, and its `chunks` in {config.default_toml()};")
    # A source that replaces another drops its pins, and with them the files that set them.
    local = tmp_path / "local.toml"
    local.write_text('[models."gemma-3-270m"]\npath = "/x/gemma.gguf"\n')
    gemma = config.load(local).get("gemma-3-270m")
    origins = dict(gemma.origins)
    assert "sha256" not in origins and "chunks" not in origins and gemma.set_in("sha256", "path") == str(local)


def test_the_chat_format_refused_in_process_names_the_file_that_brought_the_model_here(tmp_path: Path) -> None:
    # A --models file that gives a chat server's rung a `path` drops its `url`: the refusal
    # named only the user file, which set prompt_format "chat" and was right for its `url`.
    paths.ensure(paths.config_dir())
    user = paths.user_models_toml()
    user.write_text('[models.far]\nurl = "http://127.0.0.1:9/v1"\nprompt_format = "chat"\n')
    local = tmp_path / "local.toml"
    local.write_text('[models.far]\npath = "/x/far.gguf"\n')
    with pytest.raises(ConfigError) as caught:
        config.load(local)
    assert str(caught.value).startswith(f"`prompt_format` of 'far' in {user}, and its `path` in {local}: ")
    assert 'prompt_format "chat"' in str(caught.value) and "give it a `url`" in str(caught.value)


def test_path_replaces_shipped_chunks(tmp_path: Path) -> None:
    f = tmp_path / "m.toml"
    f.write_text('[models."gemma-3-270m"]\npath = "/x/gemma.gguf"\n')
    spec = config.load(f).get("gemma-3-270m")
    assert spec.chunks == () and spec.sha256 is None and spec.file == Path("/x/gemma.gguf")


def test_a_rung_brought_back_into_this_process_drops_what_only_its_server_took(tmp_path: Path) -> None:
    # The user file made `big` remote with max_in_flight; a --models file giving it a path
    # was refused for a max_in_flight it never set, which TOML cannot unset.
    paths.ensure(paths.config_dir())
    paths.user_models_toml().write_text(
        '[models.big]\nurl = "http://127.0.0.1:8080/v1"\napi_model = "qwen"\napi_key_env = "KEY"\n'
        'max_in_flight = 8\ntimeout = 300\nrepeat_penalty = 1.0\ncontext = 4096\n'
    )
    local = tmp_path / "local.toml"
    local.write_text('[models.big]\npath = "/models/big.gguf"\n')
    spec = config.load(local).get("big")
    assert spec.backend == "llama" and spec.file == Path("/models/big.gguf") and spec.context == 4096
    assert (spec.max_in_flight, spec.timeout, spec.repeat_penalty, spec.api_model, spec.api_key_env) == (None,) * 5
    remote = tmp_path / "remote.toml"  # from one server to others: its server settings stay
    remote.write_text('[models.big]\nurl = ["http://10.0.0.1:8080/v1", "http://10.0.0.2:8080/v1"]\n')
    assert config.load(remote).get("big").max_in_flight == 8


def test_remote_rung_needs_no_file(tmp_path: Path) -> None:
    f = tmp_path / "m.toml"
    f.write_text('[models.big]\nurl = "http://127.0.0.1:8080/v1"\napi_model = "qwen"\n')
    spec = config.load(f).get("big")
    assert spec.backend == "openai" and spec.file is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("ladder = [", "not valid TOML"),
        ("schema = 7", "schema 7 is not supported"),
        ('ladder = ["nope"]', "ladder names 'nope'"),
        ('[models.x]\nprompt_format = "chatml"', "needs one of `chunks`, `path`, `url` or `requantize_from`"),
        ('[models.x]\npath = "a"\nprompt_format = "alpaca"', "prompt_format must be one of"),
        ('[models.x]\npath = "a"\ncolour = "red"', "unknown field(s): colour"),
        # "chat" leaves the template to a remote server; in this process there is none.
        ('[models.x]\npath = "a"\nprompt_format = "chat"', 'prompt_format "chat"'),
    ],
)
def test_bad_files_name_the_file_and_problem(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(f)
    assert message in str(info.value)
    assert str(f) in str(info.value) or "ladder names" in message


def test_a_llama_embedder_in_your_file_does_not_inherit_the_shipped_tfidf_settings(tmp_path: Path) -> None:
    # The shipped table's dims, analyzer... were merged in, and a llama embedder refused them.
    from crecli.embed import make_embedder

    f = tmp_path / "m.toml"
    f.write_text('[embedder]\nkind = "llama"\nmodel = "gemma-3-270m"\n')
    settings = config.load(f)
    assert settings.embedder == {"kind": "llama", "model": "gemma-3-270m"}
    assert make_embedder(settings.embedder, settings).kind == "llama"
    f.write_text('[embedder]\ndims = 64\n')  # the same kind: a field at a time, as before
    assert config.load(f).embedder["dims"] == 64 and config.load(f).embedder["kind"] == "tfidf"


def test_cre_threads_that_is_not_a_count_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from crecli.models.runtime import default_threads

    for value in ("abc", "0", "-2", "1.5"):
        monkeypatch.setenv("CRE_THREADS", value)
        with pytest.raises(ConfigError, match="CRE_THREADS"):
            default_threads()
    monkeypatch.setenv("CRE_THREADS", " 3 ")
    assert default_threads() == 3


def test_unknown_model_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="Known models: gemma-3-270m"):
        config.load().get("gpt-9")


def test_cre_models_env_is_the_explicit_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "env.toml"
    f.write_text('ladder = ["gemma-3-270m"]\n')
    monkeypatch.setenv("CRE_MODELS", str(f))
    assert config.load().ladder == ["gemma-3-270m"]


def test_threads_default_to_a_containers_cpu_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Under `docker --cpus=2` the affinity still lists every host core: llama.cpp ran that
    # many spinning threads on two CPUs' worth of time.
    from crecli.models import runtime

    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert runtime.cpu_quota(str(tmp_path)) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert runtime.cpu_quota(str(tmp_path)) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert runtime.cpu_quota(str(tmp_path)) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert runtime.cpu_quota(str(tmp_path)) is None
    monkeypatch.delenv("CRE_THREADS", raising=False)
    monkeypatch.setattr(runtime, "cpu_quota", lambda: 1)
    assert runtime.default_threads() == 1


def test_a_cre_models_that_names_no_file_says_it_came_from_cre_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # "<path>: file not found" said nothing of a variable set long ago in a shell profile.
    monkeypatch.setenv("CRE_MODELS", str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigError, match=r"CRE_MODELS=.*gone\.toml, which does not exist; fix the path, or unset CRE_MODELS"):
        config.load()
    monkeypatch.setenv("CRE_MODELS", str(tmp_path))
    with pytest.raises(ConfigError, match="CRE_MODELS=.*which is a folder"):
        config.load()
    with pytest.raises(ConfigError, match=r"gone\.toml: file not found"):  # --models names its own file
        config.load(tmp_path / "gone.toml")
    # A home that is not there is said as before (it was a RuntimeError traceback) ...
    monkeypatch.setenv("CRE_MODELS", "~no_such_user_zz/models.toml")
    with pytest.raises(ConfigError, match="no such user's home directory"):
        config.load()
    # ... and a pipe (CRE_MODELS=<(...)) is read, as --models reads one.
    fifo = tmp_path / "models.fifo"
    os.mkfifo(fifo)
    import threading

    writer = threading.Thread(target=lambda: fifo.write_text('ladder = ["gemma-3-270m"]\n'))
    writer.start()
    monkeypatch.setenv("CRE_MODELS", str(fifo))
    assert config.load().ladder == ["gemma-3-270m"]
    writer.join(5)



@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('kind = "tfidf"\ndimz = 5', "[embedder] kind = 'tfidf' has unknown field(s): dimz"),
        ('kind = "bert"', "[embedder] kind 'bert' is not known; use one of tfidf, llama"),
        ('kind = "llama"', '[embedder] kind = "llama" needs `model = "<name>"`'),
        ('kind = "llama"\nmodel = "nosuch"', "[embedder] unknown model 'nosuch'. Known models: gemma-3-270m"),
        ("dims = 1", "[embedder] tfidf dims must be an integer from 2 to 4096, not 1"),
        ("min_df = true", "[embedder] tfidf min_df must be an integer >= 1, not True"),
        ("kind = [1]", "[embedder] kind [1] is not known"),
        ('kind = "llama"\nmodel = "far"\n\n[models.far]\nurl = "http://127.0.0.1:9/v1"\nprompt_format = "chat"',
         "[embedder] model 'far' is a remote rung (it has a url): the embedder runs in-process"),
    ],
)
def test_the_embedder_table_is_checked_when_models_toml_is_read(
    tmp_path: Path, table: str, message: str, cre: Callable[..., Any]
) -> None:
    # It passed `cre models list` and failed first at `cre fit`, blaming the shipped file too.
    f = tmp_path / "emb.toml"
    f.write_text(f"[embedder]\n{table}\n")
    with pytest.raises(ConfigError) as info:
        config.load(f)
    assert str(info.value).startswith(f"{f}: {message}"), str(info.value)
    assert str(config.default_toml()) not in str(info.value)
    # Not "`cre models list` shows them": it fails on this same file.
    assert "cre models list" not in str(info.value)
    listed = cre("models", "list", "--models", f)
    assert listed.code == 1 and f"Error: {f}: {message}" in listed.err


def test_an_embedder_error_names_the_file_that_set_the_field_at_fault(tmp_path: Path) -> None:
    paths.ensure(paths.config_dir())
    paths.user_models_toml().write_text('[embedder]\nkind = "llama"\n')
    explicit = tmp_path / "m.toml"
    explicit.write_text('[embedder]\nmodel = "nosuch"\n')
    with pytest.raises(ConfigError, match=f"^{explicit}: \\[embedder\\] unknown model 'nosuch'"):
        config.load(explicit)
    explicit.write_text('[embedder]\nmodel = "gemma-3-270m"\n')  # the user file's kind, this file's model
    assert config.load(explicit).embedder == {"kind": "llama", "model": "gemma-3-270m"}
    paths.user_models_toml().write_text('[embedder]\ndims = 1\n')
    with pytest.raises(ConfigError, match=f"^{paths.user_models_toml()}: \\[embedder\\] tfidf dims"):
        config.load()


def test_reading_models_toml_imports_nothing_heavy(tmp_path: Path) -> None:
    # The embedder check runs as models.toml is read, by `cre ask` too: no numpy, no llama.cpp.
    import subprocess
    import sys

    f = tmp_path / "m.toml"
    f.write_text('[embedder]\nkind = "llama"\nmodel = "gemma-3-270m"\n')
    code = (f"import sys; from crecli import config; config.load(__import__('pathlib').Path({str(f)!r})); "
            "print([m for m in ('numpy', 'llama_cpp', 'sklearn') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_undefined_ladder_name_is_blamed_on_the_file_that_set_the_ladder(tmp_path: Path) -> None:
    paths.ensure(paths.config_dir())
    paths.user_models_toml().write_text('ladder = ["gemma-3-270m", "big"]\n')
    extra = tmp_path / "extra.toml"
    extra.write_text('[models.other]\npath = "o.gguf"\n')  # read last, but it set no ladder
    with pytest.raises(ConfigError) as info:
        config.load(extra)
    assert str(info.value).startswith(f"{paths.user_models_toml()}: ladder names 'big', which no models.toml defines")
    assert str(extra) not in str(info.value) and str(config.default_toml()) not in str(info.value)


def test_a_requantized_model_knows_its_source_and_is_pulled(tmp_path: Path) -> None:
    extra = tmp_path / "q.toml"
    extra.write_text('[models.small-q]\nrequantize_from = "qwen2.5-coder-0.5b-instruct"\nquant = "Q4_0"\n'
                     'prompt_format = "chatml"\n')
    settings = config.load(extra)
    derived = settings.get("small-q")
    assert derived.source == settings.get("qwen2.5-coder-0.5b-instruct")
    assert derived.pullable and derived.file == paths.models_dir() / "small-q.gguf"
    # A later file's `path` takes its place, as one source replaces another.
    mine = tmp_path / "mine.toml"
    mine.write_text(f'[models.small-q]\npath = "{tmp_path / "q.gguf"}"\n')
    monkey = config.load  # the user file is read first, the explicit one last
    paths.ensure(paths.config_dir())
    paths.user_models_toml().write_text(extra.read_text())
    moved = monkey(mine).get("small-q")
    assert moved.source is None and not moved.pullable and moved.requantize_from is None


@pytest.mark.parametrize("text, message", [
    ('requantize_from = "nosuch"\nquant = "Q4_0"', r"`requantize_from` of 'q' in .*q.toml names 'nosuch', which no "
                                                  r"models.toml defines"),
    ('requantize_from = "q"\nquant = "Q4_0"', "names 'q', itself"),
    ('requantize_from = "far"\nquant = "Q4_0"', "names 'far', a remote rung"),
    ('requantize_from = "gemma-3-270m"\nquant = "Q4_K_M"', r"`quant` and `requantize_from` of 'q' in .*q.toml: model 'q' is requantized "
                                                         r"from 'gemma-3-270m', so `quant` is the type it is made in: "
                                                         r"one of Q4_0, Q8_0, got \"Q4_K_M\""),
    ('requantize_from = "gemma-3-270m"', "one of Q4_0, Q8_0, got \"\\?\""),
    ('requantize_from = "gemma-3-270m"\nquant = "Q4_0"\npath = "/x.gguf"', "keep only one of `chunks`, `path`, `url` "
                                                                          "or `requantize_from`"),
    ('requantize_from = "../etc"\nquant = "Q4_0"', "requantize_from must be the name of another model"),
    # It blamed the model's `chunks`, which it has none of.
    ('requantize_from = "gemma-3-270m"\nquant = "Q4_0"\nprompt_format = "chat"', "but its `requantize_from` runs it"),
])
def test_a_requantized_model_is_checked_when_models_toml_is_read(tmp_path: Path, text: str, message: str) -> None:
    extra = tmp_path / "q.toml"
    # On the ladder: off it, a source no file is made from stops only its pull (next test).
    extra.write_text(f'ladder = ["gemma-3-270m", "q"]\n[models.far]\nurl = "http://127.0.0.1:9/v1"\napi_model = "m"\n'
                     f'[models.q]\n{text}\n')
    with pytest.raises(ConfigError, match=message):
        config.load(extra)


def test_a_remote_source_stops_only_a_pull_of_the_model_requantized_from_it(tmp_path: Path) -> None:
    # Serving the 0.5B from a server was refused by every command once the shipped models.toml
    # defined its Q4_0, off the ladder, as requantized from it.
    from crecli.models import pull

    remote = tmp_path / "remote.toml"
    remote.write_text('[models."qwen2.5-coder-0.5b-instruct"]\nurl = "http://127.0.0.1:9/v1"\napi_model = "q"\n'
                      'prompt_format = "chat"\n')
    derived = config.load(remote).get("qwen2.5-coder-0.5b-instruct-q4_0")
    assert derived.source is None
    with pytest.raises(ConfigError, match="names 'qwen2.5-coder-0.5b-instruct', a remote rung, which has no file"):
        pull.pull(derived)
    # On the ladder it is refused as the file is read, as any other bad field.
    remote.write_text('ladder = ["gemma-3-270m", "qwen2.5-coder-0.5b-instruct-q4_0"]\n' + remote.read_text())
    with pytest.raises(ConfigError, match="names 'qwen2.5-coder-0.5b-instruct', a remote rung"):
        config.load(remote)


def test_a_requantized_model_takes_what_no_file_set_for_it_from_its_source(tmp_path: Path) -> None:
    extra = tmp_path / "q.toml"
    extra.write_text('[models.gemma-q]\nrequantize_from = "gemma-3-270m"\nquant = "Q8_0"\ncontext = 4096\n')
    derived, gemma = config.load(extra).get("gemma-q"), config.load().get("gemma-3-270m")
    # A base model's requantized file given the ChatML template answered as if it were chat.
    assert (derived.prompt_format, derived.arch, derived.params, derived.n_gpu_layers) == (
        "completion", "gemma3", "270M", gemma.n_gpu_layers)
    assert derived.context == 4096 and derived.set_in("prompt_format") == str(config.default_toml())


@pytest.mark.parametrize("text, pinned", [
    ('[models."qwen2.5-coder-0.5b-instruct-q4_0"]\ncontext = 4096\n', True),
    ('[models."qwen2.5-coder-0.5b-instruct-q4_0"]\nquant = "Q8_0"\n', False),
    ('[models."qwen2.5-coder-0.5b-instruct"]\npath = "/models/mine.gguf"\n', False),
    ('[models."qwen2.5-coder-0.5b-instruct"]\nsha256 = "' + "ab" * 32 + '"\n', False),
    ('[models."qwen2.5-coder-0.5b-instruct-q4_0"]\nquant = "Q8_0"\nsha256 = "' + "cd" * 32 + '"\n', True),
])
def test_a_later_file_that_changes_what_a_requantized_model_is_made_from_drops_its_pins(
    tmp_path: Path, text: str, pinned: bool
) -> None:
    # The shipped pins are of the Q4_0 of the shipped 0.5B: kept, every pull of a Q8_0 or of
    # another 0.5B missed them and blamed llama.cpp.
    extra = tmp_path / "mine.toml"
    extra.write_text(text)
    derived = config.load(extra).get("qwen2.5-coder-0.5b-instruct-q4_0")
    assert (derived.sha256 is not None) is pinned and (derived.size is not None) is (pinned and "sha256 =" not in text)


@pytest.mark.parametrize("text, message", [
    ("default_router = " + "[" * 5000 + "]" * 5000, "arrays or tables nested too deeply to read"),
    ("log_queries = " + "9" * 5000, "an integer with more than 4300 digits"),
    ("default_router = [", "not valid TOML"),
])
def test_settings_toml_that_tomllib_cannot_parse_is_a_config_error(text: str, message: str) -> None:
    # settings.toml was read as models.toml was: only a TOMLDecodeError was caught, so deep
    # nesting (RecursionError) or an over-long integer (ValueError) was a traceback.
    paths.ensure(paths.config_dir())
    paths.user_settings_file().write_text(text)
    with pytest.raises(ConfigError) as info:
        paths.read_user_settings()
    assert str(info.value).startswith(f"{paths.user_settings_file()}: {message}")
    assert str(info.value).endswith("; fix or delete the file")
