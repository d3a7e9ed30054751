from __future__ import annotations

import hashlib
import io
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from crecli import config, routerfile
from crecli.errors import RouterFileError
from crecli.quality import QualityCheck
from support.routers import BUILT_PROMPTS, SHAS, built_router, edit_manifest, members, rewrite


def test_round_trip(pinned_settings: config.ModelConfig, built_router_file: Path) -> None:
    original = built_router(pinned_settings)
    loaded = routerfile.load(built_router_file, pinned_settings)
    assert loaded.ladder == [routerfile.LadderEntry(n, SHAS[n], 1000, pinned_settings.get(n).prompt_format, 2048, 1.0)
                             for n in ("small", "medium", "large")]
    assert [e.prompt_format for e in loaded.ladder] == ["completion", "chatml", "chatml"]
    assert loaded.ladder_names == ["small", "medium", "large"]
    assert loaded.clusters == original.clusters
    assert [c.answer_type for c in loaded.clusters] == ["numeric", "choice"]
    assert loaded.clusters[0].examples == BUILT_PROMPTS[:3] and loaded.clusters[0].size == 6
    assert loaded.clusters[0].stats["small"]["shrunk_accuracy"] == 0.5
    assert (loaded.fallback_model, loaded.budget, loaded.quality) == ("large", {"kind": "retain", "value": 0.9}, QualityCheck(k=3))
    assert loaded.thresholds == {"small": 0.6, "medium": 0.6, "large": 0.0}
    assert loaded.threshold(1, "medium") == 0.9 and loaded.threshold(0, "medium") == 0.6
    assert loaded.threshold(-1, "small") == 0.6
    assert loaded.cluster(1) is loaded.clusters[1] and loaded.cluster(7) is None
    assert loaded.fit == original.fit
    assert loaded.fit.log_sha256 == "ab" * 32 and loaded.fit.cost_unit == "seconds" and loaded.fit.n_queries == 12
    probe = ["What is 8 plus 11?", "Which word is a synonym of broad? (A) big (B) small"]
    assert np.array_equal(loaded.embedder.transform(probe), original.embedder.transform(probe))
    labels, dist = loaded.assigner.predict(loaded.embedder.transform(probe))
    expected = original.assigner.predict(original.embedder.transform(probe))
    assert np.array_equal(labels, expected[0]) and np.allclose(dist, expected[1])
    assert loaded.embedder.identity == original.embedder.identity


def test_save_is_atomic_and_deterministic(pinned_settings: config.ModelConfig, built_router_file: Path) -> None:
    first = built_router_file.read_bytes()
    routerfile.save(built_router(pinned_settings), built_router_file)
    assert built_router_file.read_bytes() == first
    assert [p.name for p in built_router_file.parent.iterdir() if p.name.startswith(".router.cre")] == []
    names = set(members(built_router_file))
    assert "manifest.json" in names and all(n == "manifest.json" or n.endswith(".npy") for n in names)


def test_a_router_that_would_not_load_is_never_written(pinned_settings: config.ModelConfig, built_router_file: Path) -> None:
    # A cap past what the loader takes (`cre calibrate --max-prompt-bytes 2199023255553`):
    # the save succeeded, in place over a working router, and every command refused the file.
    from crecli.querylog import FieldMap, LogOptions

    before = built_router_file.read_bytes()
    router = built_router(pinned_settings)
    router.fit = replace(router.fit, reader=LogOptions(fields=FieldMap(max_line_bytes=(1 << 40) + 1)))
    with pytest.raises(RouterFileError, match=rf"^cannot write {built_router_file}: .*max_line_bytes.*nothing was "
                                              r"written \(a router already there is kept\)"):
        routerfile.save(router, built_router_file)
    assert built_router_file.read_bytes() == before
    assert [p.name for p in built_router_file.parent.iterdir() if p.name.startswith(".router.cre")] == []


def test_a_log_path_with_a_no_break_space_saves_and_loads(pinned_settings: config.ModelConfig, tmp_path: Path) -> None:
    # A folder named "My\u00a0Logs" (macOS puts U+202F in names): the fit saved a router that
    # every command then refused ("must be a printable string").
    router = built_router(pinned_settings)
    router.fit = replace(router.fit, log=str(tmp_path / "My\u00a0Logs\u202f\tq.jsonl"))
    path = tmp_path / "r.cre"
    routerfile.save(router, path)
    assert routerfile.load(path, pinned_settings).fit.log == str(tmp_path / "My\u00a0Logs\u202f\tq.jsonl")


def test_refuses_a_pickle_renamed_to_router_cre(pinned_settings: config.ModelConfig, tmp_path: Path) -> None:
    class Payload:
        def __init__(self, marker: Path) -> None:
            self.marker = marker

        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(self.marker), "w"))

    # The payload is live: unpickling it really creates its marker file.
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(Payload(proof))).close()
    assert proof.exists()

    marker = tmp_path / "pwned"
    path = tmp_path / "router.cre"
    path.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(RouterFileError, match="pickle"):
        routerfile.load(path, pinned_settings)
    assert not marker.exists()


def test_refuses_a_truncated_file(pinned_settings: config.ModelConfig, built_router_file: Path) -> None:
    data = built_router_file.read_bytes()
    built_router_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(RouterFileError, match="truncated"):
        routerfile.load(built_router_file, pinned_settings)


def test_refuses_other_files(pinned_settings: config.ModelConfig, tmp_path: Path) -> None:
    text = tmp_path / "notes.cre"
    text.write_text("hello")
    with pytest.raises(RouterFileError, match="not a zip archive"):
        routerfile.load(text, pinned_settings)
    with pytest.raises(RouterFileError, match="no such router file"):
        routerfile.load(tmp_path / "missing.cre", pinned_settings)
    other = tmp_path / "other.zip"
    rewrite(other, {"manifest.json": b'{"format": "something-else"}'})
    with pytest.raises(RouterFileError, match="format marker"):
        routerfile.load(other, pinned_settings)


def test_refuses_a_tampered_array(pinned_settings: config.ModelConfig, built_router_file: Path) -> None:
    entries = members(built_router_file)
    buf = io.BytesIO()
    np.save(buf, np.zeros((12, 6), dtype=np.float32))
    entries["assigner/exemplars.npy"] = buf.getvalue()
    rewrite(built_router_file, entries)
    with pytest.raises(RouterFileError, match="assigner/exemplars.npy"):
        routerfile.load(built_router_file, pinned_settings)


def test_refuses_a_tampered_manifest(pinned_settings: config.ModelConfig, built_router_file: Path) -> None:
    def cheaper(manifest: dict[str, Any]) -> None:
        manifest["body"]["clusters"][1]["model"] = "small"

    edit_manifest(built_router_file, cheaper, rehash=False)
    with pytest.raises(RouterFileError, match="modified"):
        routerfile.load(built_router_file, pinned_settings)


def test_refuses_an_unknown_schema_version(pinned_settings: config.ModelConfig, built_router_file: Path) -> None:
    def future(manifest: dict[str, Any]) -> None:
        manifest["schema_version"] = manifest["body"]["schema_version"] = 2

    edit_manifest(built_router_file, future)
    with pytest.raises(RouterFileError, match="schema version 2.*upgrade crecli"):
        routerfile.load(built_router_file, pinned_settings)


@pytest.mark.parametrize("name", ["../evil.npy", "embedder/run.py", "/etc/passwd", "assigner/x.npy"])
def test_refuses_unexpected_members(pinned_settings: config.ModelConfig, built_router_file: Path, name: str) -> None:
    entries = members(built_router_file)
    entries[name] = b"x"
    rewrite(built_router_file, entries)
    with pytest.raises(RouterFileError, match="members|refusing"):
        routerfile.load(built_router_file, pinned_settings)


def test_refuses_object_arrays_even_with_matching_hashes(
    pinned_settings: config.ModelConfig, built_router_file: Path
) -> None:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    evil = buf.getvalue()
    entries = members(built_router_file)
    entries["assigner/classes.npy"] = evil
    rewrite(built_router_file, entries)

    def consistent(manifest: dict[str, Any]) -> None:
        entry = manifest["body"]["assigner"]["arrays"]["classes"]
        entry.update(sha256=hashlib.sha256(evil).hexdigest(), size=len(evil), dtype="|O", shape=[2])

    edit_manifest(built_router_file, consistent)
    with pytest.raises(RouterFileError, match="without pickle"):
        routerfile.load(built_router_file, pinned_settings)


def test_a_model_with_another_sha256_is_refused_unless_forced(
    pinned_settings: config.ModelConfig, built_router_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pinned_settings.models["medium"] = replace(pinned_settings.models["medium"], sha256="f" * 64)
    with pytest.raises(RouterFileError, match="model 'medium' is not the file the router was fitted with.*--force"):
        routerfile.load(built_router_file, pinned_settings)
    loaded = routerfile.load(built_router_file, pinned_settings, force=True)
    assert loaded.clusters[1].model == "medium"
    assert "Warning" in capsys.readouterr().err


def test_a_rung_moved_to_a_server_is_told_which_sha256_to_pin_and_remote_identities_show_whole(
    pinned_settings: config.ModelConfig, built_router_file: Path
) -> None:
    # A teammate serving the fitted file from a server got "pins sha256 f1e2...": nothing
    # said pinning it on the remote rung is how to vouch for it; and two remote identities
    # were cut to 12 characters, "remote:http:…" against "remote:http:…".
    from crecli.models.pull import model_identity

    wanted = pinned_settings.models["medium"].sha256
    pinned_settings.models["medium"] = replace(pinned_settings.models["medium"], sha256=None, size=None,
                                               url="http://10.0.0.2:8000/v1", api_model="qwen")
    with pytest.raises(RouterFileError) as info:
        routerfile.load(built_router_file, pinned_settings)
    assert f'pin sha256 = "{wanted}" on [models.medium]' in str(info.value)
    assert "the local one is remote:http://10.0.0.2:8000/v1#qwen" in str(info.value)
    pinned_settings.models["medium"] = replace(pinned_settings.models["medium"], sha256=wanted)
    assert routerfile.load(built_router_file, pinned_settings).ladder[1].name == "medium"  # pinned: vouched for
    assert model_identity(pinned_settings.models["medium"]) == wanted


def test_a_rung_whose_prompts_render_otherwise_here_is_warned_about(
    pinned_settings: config.ModelConfig, built_router_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A teammate serving the same weights behind a chat server (prompt_format "chat": the
    # server's template) got the router's thresholds, tuned on other prompts, with no word.
    routerfile.load(built_router_file, pinned_settings)
    assert capsys.readouterr().err == ""
    pinned_settings.models["medium"] = replace(pinned_settings.models["medium"], prompt_format="chat")
    routerfile.load(built_router_file, pinned_settings)
    err = capsys.readouterr().err
    assert "model 'medium' was fitted with prompt_format 'chatml', and has prompt_format 'chat' here" in err
    assert "cre calibrate" in err and "'small'" not in err


def test_a_rung_that_answers_with_other_settings_here_is_warned_about_by_name(
    pinned_settings: config.ModelConfig, built_router_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Only the prompt format was compared: a teammate whose models.toml gives a rung another
    # context (which caps an answer at what the prompt leaves of it), or serves it from a
    # server with its own repetition penalty, got thresholds tuned on other answers with no word.
    pinned_settings.models["small"] = replace(pinned_settings.models["small"], context=512)
    medium = pinned_settings.models["medium"]
    pinned_settings.models["medium"] = replace(medium, url="http://10.0.0.2:8000/v1", repeat_penalty=1.1)
    routerfile.load(built_router_file, pinned_settings)
    err = " ".join(capsys.readouterr().err.split())  # unwrapped
    assert "model 'small' was fitted with context 2048, and has context 512 here" in err
    # Its server's own context is unknown, so only the penalty it was given is compared.
    assert "model 'medium' was fitted with repeat_penalty 1.0, and has repeat_penalty 1.1 here" in err
    # A smaller context is mended in models.toml: calibrate would reuse the answers recorded
    # at the fitted context (the outcome store does not key them by it).
    assert "give it context = 2048 or more in models.toml" in err
    assert "'large'" not in err and err.count("cre calibrate") == 1
    here = routerfile.local_state(routerfile.load(built_router_file, pinned_settings).ladder[0], pinned_settings)
    assert here[1].endswith("; fitted with context 2048, and has context 512 here: give it context = 2048 or more "
                            "in models.toml (a prompt and answer that fit 2048 tokens may be cut or refused here)")
    capsys.readouterr()
    # A larger context changes no answer: nothing to say.
    pinned_settings.models["small"] = replace(pinned_settings.models["small"], context=8192)
    pinned_settings.models["medium"] = medium
    routerfile.load(built_router_file, pinned_settings)
    assert capsys.readouterr().err == ""


def test_settings_changed_by_several_models_toml_files_are_each_named_with_its_file(
    pinned_settings: config.ModelConfig, built_router_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The warning named the file that set the first changed setting only: a context set in
    # another file was shown as set in the first.
    small = pinned_settings.models["small"]
    other = "chatml" if small.prompt_format == "completion" else "completion"
    pinned_settings.models["small"] = replace(small, prompt_format=other, context=512,
                                              origins=(("context", "b.toml"), ("prompt_format", "a.toml")))
    routerfile.load(built_router_file, pinned_settings)
    err = " ".join(capsys.readouterr().err.split())  # unwrapped
    assert f"and has prompt_format {other!r}, context 512 here (`prompt_format` of 'small' in a.toml, and its " \
           "`context` in b.toml)" in err


def test_a_rung_moved_behind_a_server_is_not_warned_about_for_its_unknown_context(
    pinned_settings: config.ModelConfig, built_router_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # docs/scale.md moves a rung behind a serving engine without a refit: its context and
    # penalty are the server's own, unknown here, and a warning on every load would say
    # nothing anyone could act on but a recalibration.
    medium = pinned_settings.models["medium"]
    pinned_settings.models["medium"] = replace(medium, url="http://10.0.0.2:8000/v1")
    routerfile.load(built_router_file, pinned_settings)
    assert capsys.readouterr().err == ""


def test_a_router_from_before_the_settings_were_recorded_loads_without_a_word(
    pinned_settings: config.ModelConfig, built_router_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def older(manifest: dict[str, Any]) -> None:
        for entry in manifest["body"]["ladder"]:
            del entry["prompt_format"], entry["context"], entry["repeat_penalty"]

    medium = pinned_settings.models["medium"]
    edit_manifest(built_router_file, older)
    pinned_settings.models["medium"] = replace(medium, prompt_format="chat", context=512)
    loaded = routerfile.load(built_router_file, pinned_settings)
    assert [(e.prompt_format, e.context, e.repeat_penalty) for e in loaded.ladder] == [(None, None, None)] * 3
    assert capsys.readouterr().err == ""
    assert routerfile.local_state(loaded.ladder[1], pinned_settings)[1] == "not on disk yet: cre models pull (or fix its path)"

    # One that recorded the prompt format only is compared on it alone.
    pinned_settings.models["medium"] = medium
    routerfile.save(built_router(pinned_settings), built_router_file)
    edit_manifest(built_router_file, lambda m: [(e.pop("context"), e.pop("repeat_penalty")) for e in m["body"]["ladder"]])
    pinned_settings.models["medium"] = replace(medium, context=4096)
    routerfile.load(built_router_file, pinned_settings)
    assert capsys.readouterr().err == ""


def test_a_model_missing_from_models_toml_is_refused(pinned_settings: config.ModelConfig, built_router_file: Path) -> None:
    renamed = replace(pinned_settings.models.pop("medium"), name="qwen-local")
    with pytest.raises(RouterFileError, match="needs model 'medium'.*no models.toml defines"):
        routerfile.load(built_router_file, pinned_settings, force=True)
    pinned_settings.models["qwen-local"] = renamed
    with pytest.raises(RouterFileError, match="'qwen-local' has that sha256, so rename it"):
        routerfile.load(built_router_file, pinned_settings)


def test_models_are_matched_by_sha256_not_path(pinned_settings: config.ModelConfig, built_router_file: Path) -> None:
    for name in pinned_settings.ladder:
        pinned_settings.models[name] = replace(pinned_settings.models[name], path=f"/elsewhere/{name}.gguf")
    assert routerfile.load(built_router_file, pinned_settings).fallback_model == "large"


def test_unpinned_local_models_are_identified_by_their_file(tiny_models_toml: Path, tmp_path: Path) -> None:
    settings = config.load(tiny_models_toml)
    for name in settings.ladder:
        gguf = tmp_path / f"{name}.gguf"
        gguf.write_bytes(name.encode())
        settings.models[name] = replace(settings.models[name], path=str(gguf))
    path = tmp_path / "r.cre"
    routerfile.save(built_router(settings), path)
    assert routerfile.load(path, settings).ladder[0].sha256 == hashlib.sha256(b"small").hexdigest()
    (tmp_path / "small.gguf").write_bytes(b"changed!")
    with pytest.raises(RouterFileError, match="model 'small' is not the file"):
        routerfile.load(path, settings)


def test_a_local_model_the_router_pins_no_file_for_is_warned_about_once(
    pinned_settings: config.ModelConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A fit from labels alone, its models neither pinned nor on disk, records no sha256: the
    # router then ran whatever file a teammate's models.toml named, without a word.
    router = built_router(pinned_settings)
    router.ladder[0] = replace(router.ladder[0], sha256=None)
    path = tmp_path / "unpinned.cre"
    routerfile.save(router, path)
    capsys.readouterr()
    routerfile.load(path, pinned_settings)
    err = " ".join(capsys.readouterr().err.split())  # unwrapped
    assert err.count("Warning:") == 1 and "the router pins no sha256 for model 'small'" in err
    assert "put it at its `path`" in err and "cre fit" in err and "'medium'" not in err  # the fake is no download
    routerfile.load(path, pinned_settings, force=True)  # once a process: a second load says nothing
    assert capsys.readouterr().err == ""
    # A rung served remotely here has no file to pin (as a server's own settings go unwarned).
    remote = tmp_path / "remote.cre"
    routerfile.save(router, remote)
    capsys.readouterr()
    pinned_settings.models["small"] = replace(pinned_settings.models["small"], url="http://10.0.0.2:8000/v1")
    routerfile.load(remote, pinned_settings)
    assert capsys.readouterr().err == ""


def test_ask_json_warns_about_an_unpinned_router_on_stderr_only_and_inspect_shows_it(
    tiny_models_toml: Path, saved_router: Path, four_fakes: dict, cre: Callable[..., Any]
) -> None:
    import json

    asked = cre("ask", "What is 2 plus 2?", "--router", saved_router, "--models", tiny_models_toml, "--json", "--no-log")
    assert asked.code == 0, asked
    assert json.loads(asked.out)["answer"] == "4"  # stdout stays JSON
    err = " ".join(asked.err.split())
    assert err.count("Warning:") == 3 and all(f"pins no sha256 for model '{n}'" in err for n in ("small", "medium", "large"))
    # `cre inspect` shows the state instead of warning about it.
    shown = cre("inspect", saved_router, "--models", tiny_models_toml, "--json")
    assert shown.code == 0 and "Warning" not in shown.err, shown
    data = json.loads(shown.out)
    assert [e["sha256"] for e in data["ladder"]] == [None] * 3
    assert data["here"]["small"] == {"state": "missing", "detail": "not on disk yet: cre models pull (or fix its path)"}
    assert "sha256 (not pinned)" in cre("inspect", saved_router, "--models", tiny_models_toml).out


def test_refuses_an_inconsistent_router(pinned_settings: config.ModelConfig, built_router_file: Path) -> None:
    def off_ladder(manifest: dict[str, Any]) -> None:
        manifest["body"]["clusters"][0]["model"] = "huge"
        del manifest["body"]["thresholds"]["small"]

    edit_manifest(built_router_file, off_ladder)
    with pytest.raises(RouterFileError, match="huge are not on its ladder; no threshold for small"):
        routerfile.load(built_router_file, pinned_settings)


def test_refuses_a_malformed_manifest(pinned_settings: config.ModelConfig, built_router_file: Path) -> None:
    edit_manifest(built_router_file, lambda m: m["body"].pop("clusters"))
    with pytest.raises(RouterFileError, match="malformed.*'clusters'"):
        routerfile.load(built_router_file, pinned_settings)


def test_each_models_output_length_is_optional_and_checked(pinned_settings: config.ModelConfig, built_router_file: Path) -> None:
    loaded = routerfile.load(built_router_file, pinned_settings)
    assert loaded.clusters[0].stats["large"]["mean_output_tokens"] == 0.0

    def strip(m: dict[str, Any]) -> None:
        for cluster in m["body"]["clusters"]:
            for stats in cluster["stats"].values():
                del stats["mean_output_tokens"]

    # A router written before the figure was recorded loads; the batch summary then
    # estimates the strongest model's output from the answer.
    edit_manifest(built_router_file, strip)
    old = routerfile.load(built_router_file, pinned_settings)
    assert "mean_output_tokens" not in old.clusters[0].stats["large"] and old.typical_output(0, "large") is None

    edit_manifest(built_router_file, lambda m: m["body"]["clusters"][0]["stats"]["large"].update(mean_output_tokens=-1.0))
    with pytest.raises(RouterFileError, match="mean_output_tokens"):
        routerfile.load(built_router_file, pinned_settings)


def test_inspect_shows_what_a_router_needs_instead_of_refusing_it(
    pinned_settings: config.ModelConfig, built_router_file: Path, tiny_models_toml: Path
) -> None:
    # A teammate sent a router could not inspect it while a model was missing or another file
    # (even with --force), and the table showed no sha256 to pin or pull.
    import json

    from typer.testing import CliRunner

    from crecli.cli import app

    toml = tiny_models_toml.read_text()
    for name in ("small", "large"):  # small: the router's file (not on disk); large: another; medium: none
        sha = SHAS[name] if name == "small" else "9" * 64
        toml = toml.replace(f"[models.{name}]\n", f'[models.{name}]\nsha256 = "{sha}"\n')
    mine = built_router_file.parent / "mine.toml"
    mine.write_text(toml.replace("[models.medium]\n", "[models.medium_other]\n").replace('"medium"', '"medium_other"'))
    result = CliRunner().invoke(app, ["inspect", str(built_router_file), "--models", str(mine), "--json"])
    assert result.exit_code == 0, result.output
    here = json.loads(result.stdout)["here"]
    assert here["small"] == {"state": "missing", "detail": "not on disk yet: cre models pull (or fix its path)"}
    assert here["medium"] == {"state": "absent", "detail": "not in models.toml: add it"}
    assert here["large"]["state"] == "other" and here["large"]["detail"].startswith("another file here (sha256 999999999999…)")
    table = CliRunner().invoke(app, ["inspect", str(built_router_file), "--models", str(mine)]).stdout
    assert SHAS["medium"] in table  # the whole sha256, to pin or to find the file by


def test_inspect_shows_the_logs_the_router_was_fitted_and_calibrated_on(
    router: routerfile.RouterFile, tiny_models_toml: Path, tmp_path: Path, cre: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `cre inspect` named the fit log alone: the log `cre calibrate --log` tuned the router's
    # cluster models and thresholds on (which `cre eval` counts as in sample) went unshown.
    import json

    from crecli.querylog import LogOptions

    calibration = {"date": "2025-02-03 04:05:06", "log": "../dev.jsonl", "log_sha256": "cd" * 32,
                   "reader": LogOptions().to_dict()}
    fit = replace(router.fit, log="../log.jsonl", log_sha256="ab" * 32, date="2025-01-02 03:04:05",
                  calibration=calibration)
    path = tmp_path / "sub" / "router.cre"
    path.parent.mkdir()
    monkeypatch.chdir(path.parent)  # what a router not read from a file records is relative to
    routerfile.save(replace(router, fit=fit), path)
    m = ("--models", tiny_models_toml)

    shown = cre("inspect", path, *m)
    assert shown.code == 0, shown
    text = " ".join(shown.out.split())
    # Where each is, by the router's record (relative to its folder), and when.
    assert f"({tmp_path / 'log.jsonl'}, fitted 2025-01-02 03:04:05; " in text
    assert f"; {tmp_path / 'dev.jsonl'}, calibrated 2025-02-03 04:05:06)" in text
    data = json.loads(cre("inspect", path, *m, "--json").out)
    assert (data["fit"]["log"], data["fit"]["log_sha256"]) == ("../log.jsonl", "ab" * 32)
    assert {k: data["fit"]["calibration"][k] for k in ("log", "log_sha256", "reader")} == {
        k: calibration[k] for k in ("log", "log_sha256", "reader")}

    # Calibrated by a crecli that did not record the log: said so; never calibrated: nothing.
    older = {k: v for k, v in calibration.items() if k not in ("log", "log_sha256", "reader")}
    routerfile.save(replace(router, fit=replace(fit, calibration=older)), path)
    assert "; log not recorded, calibrated 2025-02-03 04:05:06)" in " ".join(cre("inspect", path, *m).out.split())
    routerfile.save(replace(router, fit=replace(fit, calibration=None)), path)
    assert "calibrated" not in cre("inspect", path, *m).out
