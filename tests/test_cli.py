from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from typer.testing import CliRunner

from crecli import __version__, paths
from crecli.cli import app
from crecli.models.fake import FakeBackend
from support.hostile import Run, refused

runner = CliRunner()
HEAVY = ("numpy", "umap", "hdbscan", "llama_cpp", "sklearn", "numba")


def run(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crecli", *args], capture_output=True, text=True, input=input, timeout=120
    )


def test_help_has_examples_and_exit_codes() -> None:
    for flag in ("-h", "--help"):
        result = runner.invoke(app, [flag])
        assert result.exit_code == 0
        assert "Examples:" in result.output and "Exit codes:" in result.output


def test_every_command_help_has_examples() -> None:
    # `cre models path --help` had none, unlike every other command.
    import typer.main

    def commands(group: Any, prefix: list[str]) -> list[list[str]]:  # a Typer group
        out = []
        for name, command in group.commands.items():
            out += commands(command, [*prefix, name]) if hasattr(command, "commands") else [[*prefix, name]]
        return out

    names = commands(typer.main.get_command(app), [])
    assert ["models", "path"] in names and ["ask"] in names
    for name in names:
        result = runner.invoke(app, [*name, "--help"])
        assert result.exit_code == 0 and "Examples:" in result.output, name


def test_calibrate_and_eval_store_help_says_the_fit_store_is_not_recorded() -> None:
    # "(default: the one `cre fit` uses)" read as if they found the store the fit was given;
    # a router records none, so after `cre fit --store X` they re-ran every model.
    for command in ("calibrate", "eval"):
        text = " ".join(runner.invoke(app, [command, "--help"], terminal_width=400).output.split())
        assert "the one `cre fit` uses" not in text, command
        assert "pass the same --store FILE" in text, command


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"cre {__version__}"


def test_help_imports_nothing_heavy() -> None:
    code = (
        "import sys; from crecli.cli import app; from typer.testing import CliRunner; "
        "CliRunner().invoke(app, ['--help']); CliRunner().invoke(app, ['models', '--help']); "
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_unknown_model_name_is_bad_usage_in_one_line_naming_the_known_ones(tiny_models_toml: Path) -> None:
    # `cre ask --model gpt-9` exited 1, as an error of the settings, where a bad option value
    # exits 2; `cre models pull` and `bench` NAMES take typed names too, by the same lookup.
    for args, said in ((("ask", "hi", "--model", "gpt-9"), "Error: --model: unknown model 'gpt-9'"),
                       (("models", "pull", "small", "gpt-9"), "Error: unknown model 'gpt-9'"),
                       (("models", "bench", "gpt-9"), "Error: unknown model 'gpt-9'")):
        result = run(*args, "--models", str(tiny_models_toml))
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith(said), result.stderr
        assert "Known models: gemma-3-270m, " in result.stderr and "small, medium, large (`cre models list` shows them)" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_missing_model_file_says_how_to_fetch_it(tiny_models_toml: Path) -> None:
    result = run("ask", "hi", "--model", "small", "--models", str(tiny_models_toml))
    assert result.returncode == 1
    assert "model 'small' is not on disk" in result.stderr and "check `path`" in result.stderr


def test_ask_direct_with_fake_model(tiny_models_toml: Path, fake_backends: Callable[..., dict]) -> None:
    created = fake_backends({"medium": {"capital of France": "Paris"}})
    result = runner.invoke(app, ["ask", "What is the capital of France?", "--model", "medium", "--models", str(tiny_models_toml)])
    assert result.exit_code == 0, result.output
    assert result.stdout == "Paris\n"
    # the prompt went through the chatml template, the answer type's stop strings with it
    text, params = created["medium"].calls[0]
    assert text.startswith("<|im_start|>system") and "<|im_end|>" in params.stop


def test_ask_direct_prints_the_answer_as_the_model_wrote_it(tiny_models_toml: Path, fake_backends: Callable[..., dict]) -> None:
    fake_backends({"medium": {"slice": "xs[1:100:2]\t:x:"}})
    result = runner.invoke(app, ["ask", "Write a slice.", "--model", "medium", "--models", str(tiny_models_toml)])
    assert result.exit_code == 0, result.output
    assert result.stdout == "xs[1:100:2]\t:x:\n"


@pytest.mark.parametrize("args", [
    ("--model", "small", "--explain"), ("--model", "small", "--match", "numeric"), ("--model", "small", "--force"),
    ("--max-tokens", "5",), ("--temperature", "0.5",),
])
def test_ask_refuses_options_it_would_drop(tiny_models_toml: Path, fake_backends: Callable[..., dict], args: tuple[str, ...]) -> None:
    # --explain with --model, or --max-tokens on a routed answer, was silently ignored.
    created = fake_backends({"small": {"x": "y"}})
    result = runner.invoke(app, ["ask", "What is 1 plus 1?", *args, "--models", str(tiny_models_toml)])
    assert getattr(result.exception, "exit_code", None) == 2 and "apply" in str(result.exception), result.output
    assert created == {}


def test_ask_reads_stdin_and_prints_json(tiny_models_toml: Path, fake_backends: Callable[..., dict]) -> None:
    created = fake_backends({"small": {"12 plus 30": "42"}})
    result = runner.invoke(
        app, ["ask", "-", "--model", "small", "--models", str(tiny_models_toml), "--json"], input="What is 12 plus 30?\n"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["answer"] == "42" and data["model"] == "small" and data["output_tokens"] == 1
    assert created["small"].calls[0][0].startswith("Q: What is 3 plus 4?")  # completion template


def test_empty_prompt_is_refused() -> None:
    result = run("ask", "-", "--model", "gemma-3-270m", input="  \n")
    assert result.returncode == 1 and "prompt is empty" in result.stderr


def test_ask_from_a_closed_or_endless_stdin_is_refused_in_a_sentence() -> None:
    # `cre ask - <&-` was an AttributeError traceback; `yes | cre ask -` grew until memory ran out.
    closed = subprocess.run([sys.executable, "-m", "crecli", "ask", "-", "--model", "gemma-3-270m"],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120,
                            preexec_fn=lambda: os.close(0))
    assert closed.returncode == 2 and "stdin is closed" in closed.stderr and "Traceback" not in closed.stderr
    big = run("ask", "-", "--model", "gemma-3-270m", input="y\n" * (600 << 10))
    assert big.returncode == 1 and "the prompt is over 1 MiB" in big.stderr


def test_models_list_json_reports_missing_files() -> None:
    result = run("models", "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    # The ladder first, then the shipped model that is not on it, which a pull makes.
    assert [r["name"] for r in rows] == ["gemma-3-270m", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct",
                                         "qwen2.5-coder-0.5b-instruct-q4_0"]
    assert all(r["present"] is False and r["verified"] is False for r in rows)  # CRE_HOME is empty
    assert rows[0]["size"] == 253113024
    assert [(r["rung"], r["pullable"], r["requantize_from"]) for r in rows[2:]] == [
        (2, True, None), (None, True, "qwen2.5-coder-0.5b-instruct")]


def test_models_list_table_goes_to_stdout_hints_to_stderr() -> None:
    result = run("models", "list")
    assert "gemma-3-270m" in result.stdout and "cre models pull" in result.stderr


def test_python_dash_m_works() -> None:
    assert "Usage: cre" in run("--help").stdout or "Usage: python -m crecli" in run("--help").stdout


@pytest.mark.parametrize("routed", [False, True])
def test_prompt_argument_that_is_not_utf8_is_refused(
    routed: bool, tiny_models_toml: Path, saved_router: Path, fake_backends: Callable[..., dict], cre: Callable[..., Run]
) -> None:
    # `cre ask "$(printf 'caf\xe9?')"`: Python holds the byte as a lone surrogate, which the
    # tokenizer could not encode (a UnicodeEncodeError traceback); stdin's bytes were checked.
    created = fake_backends({"small": {"caf": "yes"}, "medium": {"caf": "yes"}, "large": {"caf": "yes"}})
    how = ["--router", str(saved_router)] if routed else ["--model", "small"]
    result = cre("ask", "caf\udce9?", *how, "--models", tiny_models_toml)
    assert result.code == 1 and result.out == "", result.err
    assert result.err.startswith("Error: the prompt argument is not UTF-8 text (character 4)")
    assert all(not backend.calls for backend in created.values())


def test_fit_seed_beyond_numpy_range_is_bad_usage(tmp_path: Path) -> None:
    # numpy's RandomState (TruncatedSVD, UMAP) takes seeds below 2**32: a larger one crashed
    # after the log was read; now Click refuses it before anything runs.
    result = runner.invoke(app, ["fit", str(tmp_path / "missing.jsonl"), "--seed", str(2**32)])
    assert result.exit_code == 2 and "4294967296" in result.output and "4294967295" in result.output, result.output


def test_stdout_that_cannot_be_written_is_one_error_line() -> None:
    # Typer ends a broken pipe quietly but re-raised other OSErrors: a traceback.
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "crecli", "models", "list", "--json"], stdout=full,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "No space left on device" in result.stderr


@pytest.mark.parametrize("args", [
    ("calibrate", "{router}", "--log", "{log}", "--retain", "0"),
    ("calibrate", "{router}", "--log", "{log}", "--retain", "0.9", "--max-cost", "0.5"),
    ("calibrate", "{router}", "--log", "{log}", "--check", "foo"),
    ("calibrate", "{router}", "--log", "{log}", "--cost-unit", "foo"),
    ("eval", "{log}", "--router", "{router}", "--cost-unit", "foo"),
    ("eval", "{log}", "--router", "{router}", "--plot", "frontier.pdf"),
    ("batch", "--router", "{router}", "--memory-budget", "0"),
    ("ask", "hi", "--model", "small", "--explain"),
    ("ask", "hi", "--router", "{router}", "--max-tokens", "5"),
    ("log", "--since", "last tuesday"),
    ("log", "--json", "-o", "{tmp}/out.jsonl"),
])
def test_bad_option_values_checked_after_click_are_bad_usage_too(
    args: tuple[str, ...], cre: Callable[..., Run], saved_router: Path, sums_log: Path, tiny_models_toml: Path,
    four_fakes: dict, tmp_path: Path,
) -> None:
    # Click's checks exit 2 and crecli's own checks of option values exited 1: one kind of
    # mistake, two codes. Now both are "2 bad usage", with crecli's one `Error:` line.
    filled = [a.format(router=saved_router, log=sums_log, tmp=tmp_path) for a in args]
    run = cre(*filled, "--models", tiny_models_toml) if args[0] != "log" else cre(*filled)
    refused(run, code=2)
    assert four_fakes == {}


def test_ask_match_takes_every_answer_type_in_any_case(
    tiny_models_toml: Path, saved_router: Path, four_fakes: dict, cre: Callable[..., Run]
) -> None:
    # `cre batch` lowercases a line's `match`; `cre ask --match Numeric` was an unknown type,
    # found only after the router loaded. contains and regex were missing from the help.
    for given, answer_type in (("Numeric", "numeric"), ("contains", "contains"), ("REGEX", "regex")):
        run = cre("ask", "What is 2 plus 2?", "--router", saved_router, "--models", tiny_models_toml,
                  "--match", given, "--json", "--no-log")
        assert run.code == 0, run
        assert json.loads(run.out)["answer_type"] == answer_type
    refused_run = cre("ask", "What is 2 plus 2?", "--router", saved_router, "--models", tiny_models_toml, "--match", "sum")
    assert refused_run.code == 2 and "exact, numeric, choice, contains, regex" in refused_run.err, refused_run
    assert "contains" in runner.invoke(app, ["ask", "--help"]).output


def test_models_path_and_pull_give_json_for_scripts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Scripts had to parse "model files:         ..." and pull's stderr lines.
    from crecli.models import pull

    where = json.loads(runner.invoke(app, ["models", "path", "--json"]).stdout)
    assert set(where) == {"shipped_models_toml", "user_models_toml", "user_models_toml_exists", "cre_models_toml",
                          "model_files"}
    assert where["cre_models_toml"] is None and where["user_models_toml_exists"] is False
    # The file that decides the ladder was left out when CRE_MODELS named it.
    mine = tmp_path / "mine.toml"
    mine.write_text("")
    monkeypatch.setenv("CRE_MODELS", str(mine))
    assert json.loads(runner.invoke(app, ["models", "path", "--json"]).stdout)["cre_models_toml"] == str(mine)
    assert f"CRE_MODELS:          {mine}" in runner.invoke(app, ["models", "path"]).stdout
    monkeypatch.delenv("CRE_MODELS")
    monkeypatch.setattr(pull, "pull_many", lambda specs, force=False: [
        ("gemma-3-270m", tmp_path / "gemma.gguf", True), ("big", "http://10.0.0.5:8080/v1", False)])
    result = runner.invoke(app, ["models", "pull", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [
        {"model": "gemma-3-270m", "remote": False, "path": str(tmp_path / "gemma.gguf"), "assembled": True},
        {"model": "big", "remote": True, "path": "http://10.0.0.5:8080/v1", "assembled": False}]


def test_fit_unknown_format_is_bad_usage(cre: Callable[..., Run], tmp_path: Path) -> None:
    # It exited 1, as a bad log does; an option value wrong in itself is bad usage (2).
    result = cre("fit", tmp_path / "log.jsonl", "--format", "xml")
    assert result.code == 2 and "--format: unknown log format 'xml'; use one of jsonl, csv, text" in result.err, result.err


def test_batch_says_a_missing_input_file_first_and_in_fits_words(
    cre: Callable[..., Run], tmp_path: Path, tiny_models_toml: Path
) -> None:
    # The router loaded first, so a router's or a model's error hid the wrong path, which
    # then read "cannot read it (No such file or directory)" with no next step.
    result = cre("batch", tmp_path / "missing.jsonl", "--router", tmp_path / "no-router.cre", "--models", tiny_models_toml)
    assert result.code == 1 and result.err.startswith(f"Error: {tmp_path / 'missing.jsonl'}: no such file; check the path")
    result = cre("batch", tmp_path, "--router", tmp_path / "no-router.cre", "--models", tiny_models_toml)
    assert result.code == 1 and "is a directory" in result.err


def test_batch_with_no_input_lines_warns_and_a_terminal_stdin_is_refused(
    cre: Callable[..., Run], saved_router: Path, tiny_models_toml: Path, tmp_path: Path,
    fake_backends: Callable[..., dict[str, FakeBackend]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # `cat missing.txt | cre batch > answers.jsonl` exited 0 with only cat's error on screen;
    # with stdin a terminal it waited under a spinner for prompts nobody typed.
    fake_backends({"small": {}, "medium": {}, "large": {}})
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = cre("batch", empty, "--router", saved_router, "--models", tiny_models_toml, "--no-log")
    assert result.code == 0 and result.out == "" and f"{empty} held no lines: nothing was answered" in result.err

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal())
    result = cre("batch", "--router", saved_router, "--models", tiny_models_toml, "--no-log")
    assert result.code == 2 and "stdin is a terminal" in result.err and "cat questions.txt | cre batch" in result.err
    monkeypatch.setattr(sys, "stdin", None)  # `cre batch <&-`: was an AttributeError traceback
    result = cre("batch", "-", "--router", saved_router, "--models", tiny_models_toml, "--no-log")
    assert result.code == 2 and "stdin is closed" in result.err


def test_models_list_says_to_pull_only_what_a_pull_fetches(tmp_path: Path) -> None:
    # A missing `path` model was told "Fetch missing models with `cre models pull`", which
    # answers "check `path` for 'mine'".
    toml = tmp_path / "models.toml"
    toml.write_text('ladder = ["gemma-3-270m", "mine"]\n[models.mine]\npath = "none.gguf"\n')
    table = runner.invoke(app, ["models", "list", "--models", str(toml)])
    assert table.exit_code == 0, table.output
    # The shipped Qwens are off this ladder, and not pulled: options, not named.
    assert "Fetch missing or bad models with `cre models pull gemma-3-270m`." in table.stderr
    assert f"mine: missing at {tmp_path / 'none.gguf'}; check `path` for 'mine' in {toml}." in table.stderr
    rows = {r["name"]: r for r in json.loads(runner.invoke(app, ["models", "list", "--models", str(toml), "--json"]).stdout)}
    assert (rows["mine"]["pullable"], rows["mine"]["fix"]) == (False, f"check `path` for 'mine' in {toml}")
    assert rows["gemma-3-270m"]["fix"] == "run `cre models pull gemma-3-270m`"
    fetch = next(line for line in table.stderr.splitlines() if "cre models pull" in line)
    assert "mine" not in fetch


def test_models_list_names_the_file_a_relative_path_resolves_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The docs said `cre models list` shows the file a relative `path` names; only --json
    # did, and the hint said "mine: missing" without where crecli had looked.
    sub = tmp_path / "sub"
    sub.mkdir()
    toml = sub / "models.toml"
    toml.write_text('[models.mine]\npath = "mine.gguf"\n')
    monkeypatch.chdir(tmp_path)  # read from the models.toml's folder, not the current one
    table = runner.invoke(app, ["models", "list", "--models", "sub/models.toml"])
    assert table.exit_code == 0, table.output
    assert f"mine: missing at {sub / 'mine.gguf'}; check `path` for 'mine' in " in table.stderr
    (sub / "mine.gguf").write_text("not a GGUF file")
    table = runner.invoke(app, ["models", "list", "--models", "sub/models.toml"])
    assert f"mine: not verified at {sub / 'mine.gguf'}; check `path`" in table.stderr


def test_models_list_shows_labels_as_written_not_as_markup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from crecli import console

    monkeypatch.setenv("COLUMNS", "400")  # wide enough that no label is cut
    monkeypatch.setattr(console, "_out", None)  # made again, at that width
    # Labels reached Rich as markup: "[imatrix]" vanished from `quant`, and `params = "7B [/]"`
    # was a MarkupError traceback.
    toml = tmp_path / "models.toml"
    toml.write_text('[models.mine]\narch = "[bold]llama[/bold]"\nparams = "7B [/]"\nquant = "Q4_K_M [imatrix]"\n'
                    'path = "mine.gguf"\n'
                    '[models.esc]\narch = "a\\u001b[31mred"\npath = "esc.gguf"\n')
    (tmp_path / "mine.gguf").write_text("not a GGUF file")
    table = runner.invoke(app, ["models", "list", "--models", str(toml)])
    assert table.exit_code == 0 and table.exception is None, table.output
    line = next(line for line in table.stdout.splitlines() if " mine " in line)
    for label in ("[bold]llama[/bold]", "7B [/]", "Q4_K_M [imatrix]", "bad: not a GGUF"):
        assert label in line, table.stdout
    # A control character in a label is shown as an escape, never sent to the terminal.
    assert "a\\x1b[31mred" in table.stdout and "\x1b" not in table.stdout


def test_models_list_shows_an_unpinned_file_as_unpinned_not_verified(tmp_path: Path) -> None:
    # A file with no sha256 pinned was shown as a green "verified", though only its GGUF
    # magic was checked.
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"GGUF" + b"a" * 64)
    toml = tmp_path / "models.toml"
    toml.write_text(f'ladder = ["mine"]\n[models.mine]\npath = "{gguf}"\n')
    table = runner.invoke(app, ["models", "list", "--models", str(toml)])
    line = next(line for line in table.stdout.splitlines() if "mine" in line)
    assert "unpinned" in line and "verified" not in line, table.stdout
    rows = json.loads(runner.invoke(app, ["models", "list", "--models", str(toml), "--json"]).stdout)
    assert [(r["name"], r["verified"], r["pinned"]) for r in rows if r["name"] == "mine"] == [("mine", True, False)]


def test_sizes_are_labelled_in_the_binary_units_they_are_counted_in() -> None:
    # 253,113,024 bytes, divided by 1024 twice, were labelled "241.4 MB" (it is 253.1 MB).
    from crecli.render import human_bytes

    assert [human_bytes(n) for n in (None, 512, 2048, 253_113_024, 1_114_000_000, 5 << 40)] == [
        "-", "512 B", "2 KiB", "241.4 MiB", "1.0 GiB", "5120.0 GiB"]
    table = runner.invoke(app, ["models", "list"])
    assert "241.4 MiB" in table.stdout and " MB " not in table.stdout, table.stdout
    # --memory-budget reads GB as GiB: its help says so.
    for command in ("batch", "serve"):
        assert "2^30 bytes" in runner.invoke(app, [command, "--help"]).stdout.replace("\n", " ")


def test_models_list_asks_to_pull_a_model_off_the_ladder_only_once_it_is_there_and_bad() -> None:
    # The shipped off-ladder Q4_0 rung is an option: a fresh machine was told to fetch it,
    # and --json gave it a `fix` the table did not print.
    assert "0.5b-instruct-q4_0" not in run("models", "list").stderr
    listed = {r["name"]: r for r in json.loads(run("models", "list", "--json").stdout)}
    assert listed["qwen2.5-coder-0.5b-instruct-q4_0"]["fix"] == "" and listed["gemma-3-270m"]["fix"]
    made = paths.models_dir() / "qwen2.5-coder-0.5b-instruct-q4_0.gguf"
    paths.ensure(made.parent)
    made.write_bytes(b"GGUF not the pinned bytes")
    assert "cre models pull gemma-3-270m qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct " \
           "qwen2.5-coder-0.5b-instruct-q4_0`" in run("models", "list").stderr
    listed = {r["name"]: r for r in json.loads(run("models", "list", "--json").stdout)}
    assert "cre models pull" in listed["qwen2.5-coder-0.5b-instruct-q4_0"]["fix"]
