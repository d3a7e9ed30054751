from __future__ import annotations

import hashlib
import io
import json
import pickle
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from crecli import archive, config, fit, routerfile
from crecli.assign import Assigner
from crecli.choice import PRIOR_STRENGTH, Choice, ClusterStats, ModelStats, StatsTable
from crecli.costs import Budget
from crecli.fit import Plan
from crecli.quality import default_thresholds
from crecli.embed import TfidfEmbedder
from crecli.errors import RouterFileError
from crecli.quality import QualityCheck
from crecli.querylog import Record

SHAS = {"small": "1" * 64, "medium": "2" * 64, "large": "3" * 64}
PROMPTS = [f"What is {i} plus {i + 3}?" for i in range(6)] + [
    f"Which word is a synonym of {w}? (A) big (B) small" for w in ("large", "huge", "vast", "giant", "tall", "wide")
]


@pytest.fixture
def settings(tiny_models_toml: Path) -> config.ModelConfig:
    s = config.load(tiny_models_toml)
    for name, sha in SHAS.items():
        s.models[name] = replace(s.models[name], sha256=sha, size=1000)
    return s


def make_router(settings: config.ModelConfig) -> routerfile.RouterFile:
    embedder = TfidfEmbedder(dims=6).fit(PROMPTS)
    labels = [0] * 6 + [1] * 6
    assigner = Assigner(k=3).fit(embedder.transform(PROMPTS), np.array(labels))
    records = [
        Record(id=f"q{i}", prompt=p, reference=["1"], match="numeric" if i < 6 else "choice")
        for i, p in enumerate(PROMPTS)
    ]
    stats = {m: ModelStats(6, 3, 0.5, 0.5, 1.0) for m in settings.ladder}
    table = StatsTable({0: ClusterStats(0, 6, stats), 1: ClusterStats(1, 6, stats)}, ClusterStats(-1, 12, stats),
                       list(settings.ladder), PRIOR_STRENGTH)
    choice = Choice({0: "small", 1: "medium"}, "large", 0.5, 1.0, 0.5, 1.0)
    plan = Plan(table, choice, default_thresholds(settings.ladder), "seconds", None, None, None)
    router = fit.build(settings, embedder, assigner, records, labels, plan, Budget("retain", 0.9),
                       QualityCheck(k=3), routerfile.FitRecord(log_sha256="ab" * 32, n_queries=12, seed=0))
    router.clusters[1].thresholds["medium"] = 0.9
    return router


@pytest.fixture
def saved(settings: config.ModelConfig, tmp_path: Path) -> Path:
    path = tmp_path / "router.cre"
    routerfile.save(make_router(settings), path)
    return path


def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def rewrite(path: Path, entries: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)


def edit_manifest(path: Path, change: Callable[[dict[str, Any]], None], rehash: bool = True) -> None:
    entries = members(path)
    manifest = json.loads(entries["manifest.json"])
    change(manifest)
    if rehash:
        manifest["body_sha256"] = hashlib.sha256(archive.canonical(manifest["body"])).hexdigest()
    entries["manifest.json"] = json.dumps(manifest).encode()
    rewrite(path, entries)


def test_round_trip(settings: config.ModelConfig, saved: Path) -> None:
    original = make_router(settings)
    loaded = routerfile.load(saved, settings)
    assert loaded.ladder == [routerfile.LadderEntry(n, SHAS[n], 1000) for n in ("small", "medium", "large")]
    assert loaded.ladder_names == ["small", "medium", "large"]
    assert loaded.clusters == original.clusters
    assert [c.answer_type for c in loaded.clusters] == ["numeric", "choice"]
    assert loaded.clusters[0].examples == PROMPTS[:3] and loaded.clusters[0].size == 6
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


def test_save_is_atomic_and_deterministic(settings: config.ModelConfig, saved: Path) -> None:
    first = saved.read_bytes()
    routerfile.save(make_router(settings), saved)
    assert saved.read_bytes() == first
    assert [p.name for p in saved.parent.iterdir() if p.name.startswith(".router.cre")] == []
    names = set(members(saved))
    assert "manifest.json" in names and all(n == "manifest.json" or n.endswith(".npy") for n in names)


def test_refuses_a_pickle_renamed_to_router_cre(settings: config.ModelConfig, tmp_path: Path) -> None:
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
        routerfile.load(path, settings)
    assert not marker.exists()


def test_refuses_a_truncated_file(settings: config.ModelConfig, saved: Path) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(RouterFileError, match="truncated"):
        routerfile.load(saved, settings)


def test_refuses_other_files(settings: config.ModelConfig, tmp_path: Path) -> None:
    text = tmp_path / "notes.cre"
    text.write_text("hello")
    with pytest.raises(RouterFileError, match="not a zip archive"):
        routerfile.load(text, settings)
    with pytest.raises(RouterFileError, match="no such router file"):
        routerfile.load(tmp_path / "missing.cre", settings)
    other = tmp_path / "other.zip"
    rewrite(other, {"manifest.json": b'{"format": "something-else"}'})
    with pytest.raises(RouterFileError, match="format marker"):
        routerfile.load(other, settings)


def test_refuses_a_tampered_array(settings: config.ModelConfig, saved: Path) -> None:
    entries = members(saved)
    buf = io.BytesIO()
    np.save(buf, np.zeros((12, 6), dtype=np.float32))
    entries["assigner/exemplars.npy"] = buf.getvalue()
    rewrite(saved, entries)
    with pytest.raises(RouterFileError, match="assigner/exemplars.npy"):
        routerfile.load(saved, settings)


def test_refuses_a_tampered_manifest(settings: config.ModelConfig, saved: Path) -> None:
    def cheaper(manifest: dict[str, Any]) -> None:
        manifest["body"]["clusters"][1]["model"] = "small"

    edit_manifest(saved, cheaper, rehash=False)
    with pytest.raises(RouterFileError, match="modified"):
        routerfile.load(saved, settings)


def test_refuses_an_unknown_schema_version(settings: config.ModelConfig, saved: Path) -> None:
    def future(manifest: dict[str, Any]) -> None:
        manifest["schema_version"] = manifest["body"]["schema_version"] = 2

    edit_manifest(saved, future)
    with pytest.raises(RouterFileError, match="schema version 2.*upgrade crecli"):
        routerfile.load(saved, settings)


@pytest.mark.parametrize("name", ["../evil.npy", "embedder/run.py", "/etc/passwd", "assigner/x.npy"])
def test_refuses_unexpected_members(settings: config.ModelConfig, saved: Path, name: str) -> None:
    entries = members(saved)
    entries[name] = b"x"
    rewrite(saved, entries)
    with pytest.raises(RouterFileError, match="members|refusing"):
        routerfile.load(saved, settings)


def test_refuses_object_arrays_even_with_matching_hashes(settings: config.ModelConfig, saved: Path) -> None:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    evil = buf.getvalue()
    entries = members(saved)
    entries["assigner/classes.npy"] = evil
    rewrite(saved, entries)

    def consistent(manifest: dict[str, Any]) -> None:
        entry = manifest["body"]["assigner"]["arrays"]["classes"]
        entry.update(sha256=hashlib.sha256(evil).hexdigest(), size=len(evil), dtype="|O", shape=[2])

    edit_manifest(saved, consistent)
    with pytest.raises(RouterFileError, match="without pickle"):
        routerfile.load(saved, settings)


def test_a_model_with_another_sha256_is_refused_unless_forced(
    settings: config.ModelConfig, saved: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings.models["medium"] = replace(settings.models["medium"], sha256="f" * 64)
    with pytest.raises(RouterFileError, match="model 'medium' is not the file the router was fitted with.*--force"):
        routerfile.load(saved, settings)
    loaded = routerfile.load(saved, settings, force=True)
    assert loaded.clusters[1].model == "medium"
    assert "Warning" in capsys.readouterr().err


def test_a_model_missing_from_models_toml_is_refused(settings: config.ModelConfig, saved: Path) -> None:
    renamed = replace(settings.models.pop("medium"), name="qwen-local")
    with pytest.raises(RouterFileError, match="needs model 'medium'.*no models.toml defines"):
        routerfile.load(saved, settings, force=True)
    settings.models["qwen-local"] = renamed
    with pytest.raises(RouterFileError, match="'qwen-local' has that sha256, so rename it"):
        routerfile.load(saved, settings)


def test_models_are_matched_by_sha256_not_path(settings: config.ModelConfig, saved: Path) -> None:
    for name in settings.ladder:
        settings.models[name] = replace(settings.models[name], path=f"/elsewhere/{name}.gguf")
    assert routerfile.load(saved, settings).fallback_model == "large"


def test_unpinned_local_models_are_identified_by_their_file(tiny_models_toml: Path, tmp_path: Path) -> None:
    settings = config.load(tiny_models_toml)
    for name in settings.ladder:
        gguf = tmp_path / f"{name}.gguf"
        gguf.write_bytes(name.encode())
        settings.models[name] = replace(settings.models[name], path=str(gguf))
    path = tmp_path / "r.cre"
    routerfile.save(make_router(settings), path)
    assert routerfile.load(path, settings).ladder[0].sha256 == hashlib.sha256(b"small").hexdigest()
    (tmp_path / "small.gguf").write_bytes(b"changed!")
    with pytest.raises(RouterFileError, match="model 'small' is not the file"):
        routerfile.load(path, settings)


def test_refuses_an_inconsistent_router(settings: config.ModelConfig, saved: Path) -> None:
    def off_ladder(manifest: dict[str, Any]) -> None:
        manifest["body"]["clusters"][0]["model"] = "huge"
        del manifest["body"]["thresholds"]["small"]

    edit_manifest(saved, off_ladder)
    with pytest.raises(RouterFileError, match="huge are not on its ladder; no threshold for small"):
        routerfile.load(saved, settings)


def test_refuses_a_malformed_manifest(settings: config.ModelConfig, saved: Path) -> None:
    edit_manifest(saved, lambda m: m["body"].pop("clusters"))
    with pytest.raises(RouterFileError, match="malformed.*'clusters'"):
        routerfile.load(saved, settings)
