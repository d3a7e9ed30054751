"""crecli's own state under hostile or careless use (issue 22): outputs that would replace a
file crecli keeps, a cut served-log line, an unwritable or shared outcome store, a
settings.toml that is not UTF-8, hostile `cre log` fields, a router swapped after
startup, `--set-default` and comments, oversized manifests and endless log files.

Every case runs on fake backends; none loads a model."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from crecli import paths, servedlog
from test_hostile_fit import Run, cre, fakes, fit, log, refused, router  # noqa: F401 - fixtures

# ---------------------------------------------------------------- 1. -o never replaces crecli's own files


def _state_files(home: Path) -> dict[str, Path]:
    """Every kind of file crecli keeps, created with recognisable bytes."""
    files = {
        "store": paths.outcome_store_file(),
        "store-journal": paths.outcome_store_file().with_name("outcomes.sqlite-journal"),
        "store-lock": paths.outcome_store_file().with_name("outcomes.sqlite.lock"),
        "served": servedlog.log_path(),
        "served.2": servedlog.generation_path(servedlog.log_path(), 2),
        "served-lock": servedlog.log_path().with_name(servedlog.LOCK_NAME),
        "settings": paths.user_settings_file(),
        "bench": paths.bench_file(),
        "models.toml": paths.user_models_toml(),
        "model file": paths.models_dir() / "small.gguf",
        "embedding cache": paths.cache_dir() / "embeddings" / "vectors.sqlite",
    }
    for name, path in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if name != "models.toml":  # a models.toml with junk would break every command
            path.write_bytes(f"precious {name}\n".encode())
    return files


def _snapshot(files: dict[str, Path]) -> dict[str, bytes | None]:
    return {name: (p.read_bytes() if p.exists() else None) for name, p in files.items()}


def test_fit_output_onto_any_state_file_is_refused(cre, log, tiny_models_toml, fakes, cre_home, tmp_path) -> None:
    files = _state_files(cre_home)
    before = _snapshot(files)
    for name, path in files.items():
        run = fit(cre, log, tiny_models_toml, "-o", path)
        refused(run, "which crecli keeps for itself", "Choose another file name")
    # --served: the private log must not become a world-readable zip.
    refused(fit(cre, log, tiny_models_toml, "-o", files["served"], "--served"), "the served-query log")
    assert _snapshot(files) == before and fakes == {}


def test_every_spelling_of_the_default_store_is_refused(cre, log, tiny_models_toml, fakes, cre_home, tmp_path) -> None:
    store = _state_files(cre_home)["store"]
    before = store.read_bytes()
    symlink = tmp_path / "store-link.cre"
    symlink.symlink_to(store)
    hard = tmp_path / "store-hard.cre"
    os.link(store, hard)
    dotted = store.parent / ".." / store.parent.name / store.name
    for spelling in (store, dotted, symlink, hard):
        refused(fit(cre, log, tiny_models_toml, "-o", spelling), "is an outcome store", str(store))
    assert store.read_bytes() == before and fakes == {}


def test_a_hard_link_to_a_model_file_is_refused(cre, log, tiny_models_toml, fakes, cre_home, tmp_path) -> None:
    model = _state_files(cre_home)["model file"]
    hard = tmp_path / "elsewhere.cre"
    os.link(model, hard)
    refused(fit(cre, log, tiny_models_toml, "-o", hard), "crecli's model folder")
    # A state file that does not exist yet is matched by its path.
    paths.bench_file().unlink()
    refused(fit(cre, log, tiny_models_toml, "-o", paths.bench_file()), "benchmark file")
    assert not paths.bench_file().exists() and fakes == {}


def test_calibrate_output_onto_state_files_is_refused(cre, router, log, tiny_models_toml, fakes, cre_home, tmp_path) -> None:
    files = _state_files(cre_home)
    before = _snapshot(files)
    m = ("--models", tiny_models_toml, "--log", log)
    for name in ("store", "served", "settings", "bench"):
        refused(cre("calibrate", router, *m, "-o", files[name]), "which crecli keeps for itself")
    hard = tmp_path / "hard.cre"
    os.link(files["store"], hard)
    refused(cre("calibrate", router, *m, "-o", hard), "is an outcome store")
    # In place: a router kept in crecli's cache folder is not rewritten there.
    cached = paths.cache_dir() / "r.cre"
    cached.write_bytes(router.read_bytes())
    refused(cre("calibrate", cached, *m), "crecli's cache folder")
    # --store may be an outcome store, but not another state file.
    refused(cre("calibrate", router, *m, "--store", files["served"]), "--store", "served-query log")
    assert _snapshot(files) == before and fakes == {}


def test_eval_plot_and_log_export_onto_state_files_are_refused(cre, router, log, tiny_models_toml, fakes, cre_home) -> None:
    files = _state_files(cre_home)
    files["served"].write_bytes(b"")
    before = _snapshot(files)
    m = ("--router", router, "--models", tiny_models_toml)
    for name in ("store", "bench", "settings"):
        refused(cre("eval", log, *m, "--plot", files[name]), "--plot")
    for name in ("store", "served.2", "settings", "bench", "served-lock"):
        refused(cre("log", "-o", files[name]), "-o", "writing there would destroy it")
    assert _snapshot(files) == before and fakes == {}


def test_store_option_may_name_the_default_store(tmp_path: Path) -> None:
    store = paths.outcome_store_file()
    paths.ensure(store.parent)
    assert paths.check_output(store, "--store", allow="an outcome store") == store
    with pytest.raises(Exception, match="outcome store's own file"):
        paths.check_output(store.with_name("outcomes.sqlite-wal"), "--store", allow="an outcome store")
    # An ordinary output next to crecli's files is fine.
    elsewhere = tmp_path / "router.cre"
    assert paths.check_output(elsewhere, "-o") == elsewhere


# ---------------------------------------------------------------- 2. a cut served-log line loses only itself


def _served_entry(prompt: str) -> dict:
    from test_servedlog import trace

    return servedlog.ServedLog(Path("unused"), "ask").entry(prompt, trace())


def test_an_append_after_a_cut_line_starts_a_line_of_its_own(tmp_path: Path) -> None:
    live = tmp_path / "served.jsonl"
    log = servedlog.ServedLog(live, "ask")
    assert log.append(_served_entry("first"))
    full = servedlog._line(_served_entry("cut by a full disk"))
    with live.open("ab") as fh:
        fh.write(full[: len(full) // 2])  # what a crash or a full disk leaves
    assert log.append(_served_entry("after the cut"))
    assert log.append(_served_entry("and one more"))
    reading = servedlog.read([live])
    assert [e["prompt"] for e in reading.entries] == ["first", "after the cut", "and one more"]
    assert reading.bad == 1


def test_the_reader_recovers_an_entry_glued_onto_a_cut_line(tmp_path: Path) -> None:
    live = tmp_path / "served.jsonl"
    cut = servedlog._line(_served_entry("cut"))[:40]
    good = servedlog._line(_served_entry('holds {"schema": 1, inside'))
    live.write_bytes(servedlog._line(_served_entry("before")) + cut + good + servedlog._line(_served_entry("after")))
    reading = servedlog.read([live])
    assert [e["prompt"] for e in reading.entries] == ["before", 'holds {"schema": 1, inside', "after"]
    assert reading.bad == 1
