"""`cre batch`: N lines in, N results out in input order, errors in place, resume, summary."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest
from typer.testing import CliRunner

from crecli import config, routerfile
from crecli.batch import Answered, BatchSummary, parse_size, read_done_ids, run_batch
from crecli.cli import app
from crecli.errors import BackendError, CreError, InputError, ModelLoadError, ModelNotAvailable, UsageError
from crecli.escalate import Cascade
from crecli.models.backend import GenParams
from crecli.models.fake import FakeBackend
from crecli.quality import vote_seed
from crecli.querylog import FieldMap
from crecli.routerfile import RouterFile
from support.batch_child import NOT_LIVE, batch_child
from support.hostile import Run, refused
from support.ladder import LADDER, install, scripted, user_prompt
from support.prompts import ADD, FRUIT, HARD, MIXED, PERU, TABLE, jl
from support.routers import FAR, make_router


def _run(lines: list[bytes], cascade: Cascade, out: io.StringIO | None = None, **kw: Any) -> tuple[list[dict[str, Any]], BatchSummary]:
    out = io.StringIO() if out is None else out
    summary = run_batch(lines, out, cascade, **kw)
    text = out.getvalue()
    assert text.endswith("\n") or text == ""
    return [json.loads(line) for line in text.splitlines()], summary


def test_every_line_gets_one_result_in_input_order(
    fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade
) -> None:
    install(fake_backends, TABLE)
    rows, summary = _run(MIXED, cascade, source="in.jsonl")

    assert [r["line"] for r in rows] == list(range(1, 8))
    errors = {r["line"]: r for r in rows if "error" in r}
    assert sorted(errors) == [2, 3, 4, 5]
    assert errors[2]["id"] is None and errors[2]["error"].startswith("in.jsonl:2: ")
    assert errors[3]["id"] == "x" and "missing 'prompt'" in errors[3]["error"]
    assert errors[4]["id"] is None and errors[5]["id"] is None and "empty line" in errors[5]["error"]
    good = {r["line"]: r for r in rows if "error" not in r}
    assert (good[1]["id"], good[1]["answer"], good[1]["model"], good[1]["correct"]) == ("a1", "12", "small", True)
    assert (good[6]["id"], good[6]["answer"], good[6]["model"], good[6]["cluster"]) == ("6", "Lima", "medium", 1)
    assert "correct" not in good[6]  # no reference, no verdict
    assert (good[7]["model"], good[7]["cluster"]) == ("large", -1)
    for row in good.values():
        trace = row["trace"]
        assert row["escalations"] == trace["escalations"] and row["agreement"] == trace["agreement"]
        assert row["output_tokens"] == sum(s["output_tokens"] for s in trace["steps"])
    assert (summary.lines, summary.answered, summary.errors, summary.graded, summary.correct) == (7, 3, 4, 1, 1)


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_work_is_grouped_by_rung_but_output_keeps_input_order(
    fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade, chunk_size: int
) -> None:
    log: list[tuple[str, str, GenParams]] = []
    install(fake_backends, TABLE, log)
    prompts = [PERU, HARD, FAR, ADD, FRUIT, PERU, HARD]
    rows, summary = _run([(p + "\n").encode() for p in prompts], cascade, chunk_size=chunk_size)

    assert [r["id"] for r in rows] == [str(i) for i in range(1, 8)]
    assert [r["answer"] for r in rows] == ["Lima", "17", "?", "12", "(B)", "Lima", "17"]
    # Within a chunk the ladder is climbed once: every call is on the same or a larger rung.
    start = 0
    for first in range(0, len(rows), chunk_size):
        n = sum(s["used"] for r in rows[first:first + chunk_size] for s in r["trace"]["steps"])
        rungs = [LADDER.index(m) for m, _, _ in log[start:start + n]]
        assert rungs == sorted(rungs)
        start += n
    assert start == len(log)
    # Each check's votes are consecutive calls on one (model, prompt): greedy, then vote_seed(prompt, 1), 2, ...
    checks: list[list[tuple[str, str, GenParams]]] = []
    for call in log:
        if call[2].seed == 0:
            checks.append([])
        checks[-1].append(call)
    assert len(checks) == sum(len(r["trace"]["steps"]) for r in rows)
    for calls in checks:
        assert len({(m, p) for m, p, _ in calls}) == 1
        assert [params.seed for _, _, params in calls] == [0] + [vote_seed(calls[0][1], i) for i in range(1, len(calls))]
    assert summary.escalated == 2 and summary.escalation_rate == pytest.approx(2 / 7)


def test_resume_skips_ids_already_answered(
    fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade, tmp_path: Path
) -> None:
    install(fake_backends, TABLE)
    earlier = tmp_path / "out.jsonl"
    rows, _ = _run(MIXED[:1] + MIXED[5:6], cascade)
    earlier.write_text(
        json.dumps(rows[0]) + "\n"  # line 1, id a1: done
        + json.dumps({"line": 6, "id": "6", "error": "backend failed"}) + "\n"  # an error: tried again
        + '{"line": 7, "id": "far", "answ'  # cut short by a crash: ignored
    )
    done = read_done_ids(earlier)
    digest = rows[0]["prompt_sha256"]
    assert done == {"a1": Answered(prompts={digest}, at={1})}  # "6" has no answer: its error is moot

    rows, summary = _run(MIXED, cascade, resume_ids=done)
    assert [r["line"] for r in rows] == [2, 3, 4, 5, 6, 7]
    assert (summary.lines, summary.skipped, summary.answered, summary.errors) == (7, 1, 2, 4)


def test_resume_never_lets_an_answer_stand_for_another_prompt_that_took_its_id(
    fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade, tmp_path: Path
) -> None:
    # Plain-text lines are known by their number: a line added at the top gave line 1's
    # stored answer (to "7 plus 5") to the new first question, and answered Peru twice.
    install(fake_backends, TABLE)
    first, _ = _run([ADD.encode(), PERU.encode()], cascade)
    earlier = tmp_path / "out.jsonl"
    earlier.write_text("".join(json.dumps(r) + "\n" for r in first))
    done = read_done_ids(earlier)
    rows, summary = _run([b"What is 7 times 6?", ADD.encode(), PERU.encode()], cascade, resume_ids=done,
                         source="in.txt", resume_name=str(earlier))
    errors = [r for r in rows if "error" in r]
    assert [r["line"] for r in errors] == [1, 2] and summary.skipped == 0
    assert errors[0]["error"].startswith(f"in.txt:1: id '1' was answered in {earlier} for another prompt")
    assert "new output file" in errors[0]["error"]
    assert [r["line"] for r in rows if "answer" in r] == [3]
    # The same prompts again: every line is skipped, as before.
    rows, summary = _run([ADD.encode(), PERU.encode()], cascade, resume_ids=done)
    assert rows == [] and summary.skipped == 2
    # An answer written before records kept the prompt's digest is matched by id alone.
    legacy = {k: Answered(prompts={None}) for k in done}
    rows, summary = _run([b"What is 7 times 6?"], cascade, resume_ids=legacy)
    assert rows == [] and summary.skipped == 1


def test_resume_of_an_unchanged_input_that_repeats_an_id_skips_every_line(
    fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade, tmp_path: Path
) -> None:
    # Only the last answer's digest was kept per id, so the first of two lines sharing an id
    # got "the input changed" on a rerun of the very same input.
    install(fake_backends, TABLE)
    lines = [jl(id="a", prompt=ADD), jl(id="a", prompt=PERU)]
    first, _ = _run(lines, cascade)
    earlier = tmp_path / "out.jsonl"
    earlier.write_text("".join(json.dumps(r) + "\n" for r in first))
    rows, summary = _run(lines, cascade, resume_ids=read_done_ids(earlier))
    assert rows == [] and summary.skipped == 2


def test_resume_answers_a_line_that_shares_an_answered_id_but_not_its_prompt(
    fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade, tmp_path: Path
) -> None:
    # Lines 1 and 2 share id "x"; the batch stopped with only line 1 answered. On resume line 2
    # got "the input changed" (exit 3), though its prompt was never answered.
    install(fake_backends, TABLE)
    lines = [jl(id="x", prompt=ADD), jl(id="x", prompt=PERU)]
    first, _ = _run(lines[:1], cascade)
    earlier = tmp_path / "out.jsonl"
    earlier.write_text(json.dumps(first[0]) + "\n")
    rows, summary = _run(lines, cascade, resume_ids=read_done_ids(earlier))
    assert [(r["line"], r["id"], r.get("answer"), r.get("error")) for r in rows] == [(2, "x", "Lima", None)]
    assert (summary.skipped, summary.answered, summary.errors, summary.repeated_ids) == (1, 1, 0, 1)


@pytest.mark.parametrize("chunk_size", [1, 64])
def test_resume_answers_a_line_whose_id_was_answered_only_at_a_later_line_of_the_input(
    fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade, tmp_path: Path, chunk_size: int
) -> None:
    # Lines 1 and 3 share id "x"; the batch answered line 3 and line 1 got an error record. On
    # resume line 1 got "the input changed", though the input was the same and its prompt
    # never answered. Its error record says the earlier run tried it there: it is answered.
    install(fake_backends, TABLE)
    lines = [jl(id="x", prompt=ADD), jl(id="y", prompt=FRUIT), jl(id="x", prompt=PERU), jl(id="z", prompt=PERU)]
    first, _ = _run(lines, cascade)
    earlier = tmp_path / "out.jsonl"
    earlier.write_text(json.dumps({"line": 1, "id": "x", "error": "backend failed"}) + "\n"
                       + "".join(json.dumps(r) + "\n" for r in first[1:]))
    done = read_done_ids(earlier)
    assert done["x"] == Answered(prompts={first[2]["prompt_sha256"]}, at={3}, failed={1})
    rows, summary = _run(lines, cascade, resume_ids=done, chunk_size=chunk_size)
    assert [(r["line"], r["id"], r.get("answer"), r.get("error")) for r in rows] == [(1, "x", "12", None)]
    assert (summary.skipped, summary.answered, summary.errors, summary.repeated_ids) == (3, 1, 0, 1)
    # Line 1 without a record at all: a stop wrote the answers its chunk finished, line 1's
    # not among them. Only a later line of the same chunk can then hold the id's answer:
    # line 1 waits for the chunk's later lines, and is answered once line 3 has id "x" again.
    flushed = {**done, "x": Answered(prompts=done["x"].prompts, at=done["x"].at)}
    rows, summary = _run(lines, cascade, resume_ids=flushed, chunk_size=64)
    assert [(r["line"], r.get("answer")) for r in rows] == [(1, "12")]
    # The input changed: line 3 of the chunk lacks id "x" (edited to another id, though a
    # line after it has "x"; the input ends before it), or it is in another chunk.
    cases = [([lines[0], lines[1], jl(id="w", prompt=PERU), jl(id="x", prompt=HARD)], 64), (lines[:2], 64),
             (lines[:1], 64), (lines, 2)]
    for changed, size in cases:
        rows, summary = _run(changed, cascade, resume_ids=flushed, chunk_size=size,
                             source="in.jsonl", resume_name=str(earlier))
        errors = [r for r in rows if "error" in r]
        assert [r["line"] for r in rows][:1] == [1] and [r["line"] for r in errors] == [1]
        assert errors[0]["error"].startswith(f"in.jsonl:1: id 'x' was answered in {earlier} for another prompt")
    # Answered at line 1 or before, for another prompt: the input changed, whatever follows.
    rows, summary = _run([jl(id="x", prompt=HARD), *lines[1:]], cascade, chunk_size=chunk_size,
                         resume_ids={"x": Answered(prompts={first[0]["prompt_sha256"]}, at={1})})
    assert [(r["line"], "error" in r) for r in rows] == [(1, True), (2, False), (3, False), (4, False)]


def test_resume_of_a_run_that_failed_the_first_of_each_repeated_id_writes_as_it_goes(
    fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade, tmp_path: Path
) -> None:
    # Every id on two lines, the first half failed (error records) and the second answered:
    # on resume each first line was held until its partner near the end, so nothing was
    # written until then (N/2 prompts in memory, all lost to a kill). Each is answered at once.
    install(fake_backends, TABLE)
    half = 6
    lines = [jl(id=f"q{i}", prompt=ADD) for i in range(half)] + [jl(id=f"q{i}", prompt=PERU) for i in range(half)]
    first, _ = _run(lines, cascade)
    earlier = tmp_path / "out.jsonl"
    earlier.write_text("".join(json.dumps({"line": r["line"], "id": r["id"], "error": "backend failed"}) + "\n"
                               for r in first[:half])
                       + "".join(json.dumps(r) + "\n" for r in first[half:]))
    read = 0

    def stream() -> Any:
        nonlocal read
        for line in lines:
            read += 1
            yield line

    class Out(io.StringIO):
        read_at_write: list[int]  # lines read from the input by each write

        def write(self, text: str) -> int:
            self.read_at_write.append(read)
            return super().write(text)

    out = Out()
    out.read_at_write = []
    rows, summary = _run(stream(), cascade, out=out, resume_ids=read_done_ids(earlier), chunk_size=2)  # type: ignore[arg-type]
    assert [(r["line"], r["id"], r.get("answer")) for r in rows] == [(i + 1, f"q{i}", "12") for i in range(half)]
    assert (summary.skipped, summary.answered, summary.errors) == (half, half, 0)
    assert out.read_at_write[0] <= 2  # line 1 written with its own chunk, not after line 7 was read


def test_resume_gives_an_edited_line_of_a_repeated_id_an_error_record_and_keeps_that_verdict(
    fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade, tmp_path: Path
) -> None:
    # Id "x" was answered for ADD at line 1 and PERU at line 3; line 1 (or 3) edited since.
    # Line 1 was held, line 3 released it, and it was answered: two answers at line 1 in the
    # file, where before it got "the input changed". A line with its own answer record, for
    # another prompt, was edited. And a later --resume gives it that verdict again.
    install(fake_backends, TABLE)
    lines = [jl(id="x", prompt=ADD), jl(id="y", prompt=FRUIT), jl(id="x", prompt=PERU)]
    first, _ = _run(lines, cascade)
    earlier = tmp_path / "out.jsonl"
    earlier.write_text("".join(json.dumps(r) + "\n" for r in first))
    for edited, at in (([jl(id="x", prompt=HARD), *lines[1:]], 1), ([*lines[:2], jl(id="x", prompt=HARD)], 3)):
        for _ in range(2):  # the resumed run's output appended, then resumed again
            rows, summary = _run(edited, cascade, resume_ids=read_done_ids(earlier), source="in.jsonl",
                                 resume_name=str(earlier))
            assert (summary.skipped, summary.answered, summary.errors) == (2, 0, 1)
            assert [(r["line"], r.get("input_changed")) for r in rows] == [(at, True)]
            assert rows[0]["error"].startswith(f"in.jsonl:{at}: id 'x' was answered in {earlier} for another prompt")
            with open(earlier, "a") as out:
                out.write("".join(json.dumps(r) + "\n" for r in rows))
        earlier.write_text("".join(json.dumps(r) + "\n" for r in first))
    # An error record that says the input changed is a verdict, not a line tried and failed:
    # a line added before "x" (now at line 2), answered only at line 1, keeps its error record.
    earlier.write_text(json.dumps(first[0]) + "\n" + json.dumps({"line": 2, "id": "x", "error": "changed",
                                                                 "input_changed": True}) + "\n")
    rows, summary = _run([jl(id="new", prompt=FRUIT), jl(id="x", prompt=HARD)], cascade,
                         resume_ids=read_done_ids(earlier))
    assert [(r["line"], r.get("input_changed")) for r in rows] == [(1, None), (2, True)]


def _resumed_after(record: dict[str, Any], earlier: Path, cascade: Cascade) -> list[dict[str, Any]]:
    """The rows of a run of lines "new" and "x" (line 2) resumed from `earlier`, written to
    hold an answer to "x" at line 1 for another prompt, then `record`."""
    answer = {"line": 1, "id": "x", "prompt_sha256": "0" * 64, "answer": "12"}
    earlier.write_text(json.dumps(answer) + "\n" + json.dumps(record) + "\n")
    lines = [jl(id="new", prompt=FRUIT), jl(id="x", prompt=HARD)]
    rows, _ = _run(lines, cascade, resume_ids=read_done_ids(earlier), source="in.jsonl", resume_name=str(earlier))
    return rows


def test_resume_reads_an_input_changed_record_written_before_the_flag_as_that_verdict(
    fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade, tmp_path: Path
) -> None:
    # Output of a cre before "input_changed" was written: the verdict only in its message,
    # which was read as a line tried and failed, so the edited line was answered.
    from crecli.batch import changed_since

    install(fake_backends, TABLE)
    earlier = tmp_path / "out.jsonl"
    old = {"line": 2, "id": "x", "error": f"in.jsonl:2: {changed_since(str(earlier), 'x')}"}
    tried = {"line": 2, "id": "x", "error": "in.jsonl:2: model 'small' failed: timed out"}
    for record, answered in ((old, False), (tried, True)):  # a line tried and failed is still answered
        rows = _resumed_after(record, earlier, cascade)
        assert [(r["line"], "answer" in r) for r in rows] == [(1, True), (2, answered)]
        assert answered or rows[1]["input_changed"] is True


def test_resume_reads_the_input_changed_words_only_at_the_records_own_line(
    fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade, tmp_path: Path
) -> None:
    # The verdict's words were matched anywhere in the message: an error that only quoted
    # them (a server's message, another line's head) was read as the verdict, and the line,
    # tried and failed, was never answered again.
    from crecli.batch import changed_since

    install(fake_backends, TABLE)
    earlier = tmp_path / "out.jsonl"
    words = changed_since(str(earlier), "x")
    quoted = {"line": 2, "id": "x", "error": f"in.jsonl:2: model 'small' failed: server said: in.jsonl:2: {words}"}
    other = {"line": 2, "id": "x", "error": f"in.jsonl:5: {words}"}
    own = {"line": 2, "id": "x", "error": f"c:/in 2.jsonl:2: {words}"}  # the input's name holds a colon
    for record, answered in ((quoted, True), (other, True), (own, False)):
        rows = _resumed_after(record, earlier, cascade)
        assert [(r["line"], "answer" in r) for r in rows] == [(1, True), (2, answered)], record


def test_a_repeated_id_is_counted_and_said_since_resume_matches_by_id(
    fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade, capsys: pytest.CaptureFixture[str]
) -> None:
    from crecli import render

    install(fake_backends, TABLE)
    # Line 2 has no id, so its id is its line number, "2", as line 1's explicit one; line 3 repeats it.
    rows, summary = _run([jl(id="2", prompt=ADD), jl(prompt=PERU), jl(id="2", prompt=PERU)], cascade)
    assert [r["id"] for r in rows] == ["2", "2", "2"] and summary.repeated_ids == 2
    render.batch_summary(summary, as_json=False)
    assert "2 line(s) had the id of an earlier line" in capsys.readouterr().err


def test_each_answer_is_counted_for_the_summary_as_it_finishes_not_kept_to_the_end(
    fake_backends: Callable[..., dict[str, FakeBackend]], router: RouterFile, tiny_models_toml: Path,
    bench_speeds, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The batch kept every prompt (up to a megabyte each) to tokenize them all after the
    # progress bar; now the strongest model's counts are taken as each answer finishes (in
    # bench-seconds: in measured seconds nothing compares with the strongest model).
    bench_speeds(SPEEDS)
    install(fake_backends, TABLE)
    cascade = Cascade(router, config.load(tiny_models_toml))
    events: list[str] = []
    counted = cascade.strongest_tokens
    monkeypatch.setattr(cascade, "strongest_tokens", lambda trace, prompt: (events.append(f"count {trace.id}"), counted(trace, prompt))[1])
    answer = cascade.decode_greedy
    monkeypatch.setattr(cascade, "decode_greedy", lambda pending: (events.append("decode"), answer(pending))[1])
    _run([jl(id="a", prompt=ADD), jl(id="b", prompt=ADD)], cascade, chunk_size=1)
    assert events.index("count a") < len(events) - 1 - events[::-1].index("decode")  # before line b's decode


def test_read_done_ids_needs_the_file() -> None:
    with pytest.raises(InputError, match="drop --resume"):
        read_done_ids(Path("/nonexistent/out.jsonl"))


SPEEDS = {"small": (400.0, 40.0), "medium": (200.0, 20.0), "large": (50.0, 5.0)}


def test_summary_compares_cost_with_always_the_strongest(
    fake_backends: Callable[..., dict[str, FakeBackend]], router: RouterFile, tiny_models_toml: Path, bench_speeds
) -> None:
    bench_speeds(SPEEDS)
    install(fake_backends, TABLE)
    cascade = Cascade(router, config.load(tiny_models_toml))
    rows, summary = _run([jl(prompt=p) for p in (ADD, HARD, PERU, FRUIT, FAR)], cascade)

    spent = sum(s["seconds"] for r in rows for s in r["trace"]["steps"])
    assert summary.seconds == pytest.approx(spent)
    # Both sides in bench-seconds from the answers' tokens, whatever the router recorded.
    assert summary.unit == "bench-seconds" and summary.estimated == 5
    pp, tg = {m: s[0] for m, s in SPEEDS.items()}, {m: s[1] for m, s in SPEEDS.items()}
    cascade_cost = sum(s["prompt_tokens"] / pp[s["model"]] + s["output_tokens"] / tg[s["model"]]
                       for r in rows for s in r["trace"]["steps"])
    # HARD follows ADD in their cluster and starts as it does, "What is " (two tokens to the
    # fakes): llama.cpp keeps them, so HARD's steps do not pay for them.
    assert rows[0]["trace"]["cluster"] == rows[1]["trace"]["cluster"]
    cascade_cost -= sum(2 / pp[s["model"]] for s in rows[1]["trace"]["steps"])
    assert summary.cascade_cost == pytest.approx(cascade_cost)
    # FAR starts on large, which answers it with one vote: both sides are the same answer.
    far = rows[-1]["trace"]["steps"][0]
    assert far["model"] == "large" and far["used"] == 1
    assert 0 < summary.strongest_cost and summary.cost_ratio == pytest.approx(cascade_cost / summary.strongest_cost)
    assert summary.models == {"small": 2, "medium": 2, "large": 1}
    data = summary.to_dict()
    assert data["escalation_rate"] == pytest.approx(0.2) and data["accuracy"] is None


def test_summary_says_how_long_loading_the_models_took_which_neither_side_prices(
    fake_backends: Callable[..., dict[str, FakeBackend]], router: RouterFile, tiny_models_toml: Path, bench_speeds,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A batch of the cascade loads every rung it reaches, always the strongest model one: on
    # a short batch that is what the clock saves less than the priced ratio says.
    from crecli import render

    bench_speeds(SPEEDS)
    install(fake_backends, TABLE)
    monkeypatch.setattr(FakeBackend, "load_seconds", 0.5)  # each fake "loads" in half a second
    cascade = Cascade(router, config.load(tiny_models_toml))
    _, summary = _run([jl(prompt=p) for p in (ADD, HARD, PERU, FRUIT, FAR)], cascade)
    assert summary.load_seconds == {"small": 0.5, "medium": 0.5, "large": 0.5}
    _, alone = _run([jl(prompt=FAR)], Cascade(router, config.load(tiny_models_toml)))
    assert alone.load_seconds == {"large": 0.5}  # FAR starts on large: nothing else loads
    render.batch_summary(summary, as_json=False)
    assert "+1.5 s loading 3 models, priced on neither side" in " ".join(capsys.readouterr().err.split())
    render.batch_summary(summary, as_json=True)
    assert json.loads(capsys.readouterr().err.splitlines()[-1])["load_seconds"] == {"small": 0.5, "medium": 0.5, "large": 0.5}


def test_a_prompt_pays_its_start_in_full_where_its_clusters_previous_prompt_was_in_another_chunk(
    fake_backends: Callable[..., dict[str, FakeBackend]], router: RouterFile, tiny_models_toml: Path, bench_speeds
) -> None:
    # llama.cpp keeps only the last prompt: across chunks, a cluster's prompts are apart.
    bench_speeds(SPEEDS)
    install(fake_backends, TABLE)
    pp, tg = {m: s[0] for m, s in SPEEDS.items()}, {m: s[1] for m, s in SPEEDS.items()}
    lines = [jl(prompt=p) for p in (ADD, HARD)]
    apart_rows, apart = _run(lines, Cascade(router, config.load(tiny_models_toml)), chunk_size=1)
    full = sum(s["prompt_tokens"] / pp[s["model"]] + s["output_tokens"] / tg[s["model"]]
               for r in apart_rows for s in r["trace"]["steps"])
    assert apart.cascade_cost == pytest.approx(full)
    rows, together = _run(lines, Cascade(router, config.load(tiny_models_toml)))
    assert [r["trace"]["steps"] for r in rows] == [r["trace"]["steps"] for r in apart_rows]
    assert together.cascade_cost == pytest.approx(full - sum(2 / pp[s["model"]] for s in rows[1]["trace"]["steps"]))
    assert together.strongest_cost == pytest.approx(apart.strongest_cost - 2 / pp["large"])


def test_a_batch_answered_by_the_strongest_model_alone_costs_100_percent_of_it(
    fake_backends: Callable[..., dict[str, FakeBackend]], tiny_models_toml: Path, bench_speeds
) -> None:
    """The router's stored per-cluster costs are stale (made under load); the summary must not use them."""
    stale = make_router(starts=("large", "large", "large"))
    for info in stale.clusters:
        info.stats["large"]["mean_cost"] = 50.0  # what a busy machine recorded
    stale = replace(stale, fit=routerfile.FitRecord(cost_unit="bench-seconds"))
    bench_speeds(SPEEDS)
    install(fake_backends, {"large": {ADD: ["12"], PERU: ["Lima"], FRUIT: ["(B)"], FAR: ["?"]}})
    cascade = Cascade(stale, config.load(tiny_models_toml))
    rows, summary = _run([jl(prompt=p) for p in (ADD, PERU, FRUIT, FAR)], cascade)

    assert summary.models == {"large": 4}
    assert all(len(r["trace"]["steps"]) == 1 and r["trace"]["steps"][0]["used"] == 1 for r in rows)
    assert summary.estimated == 4
    assert summary.cascade_cost == pytest.approx(summary.strongest_cost)
    assert summary.cost_ratio == pytest.approx(1.0)


def test_in_measured_seconds_no_saving_is_claimed(
    fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade, monkeypatch: pytest.MonkeyPatch
) -> None:
    install(fake_backends, TABLE)
    counted: list[str] = []
    monkeypatch.setattr(cascade, "strongest_tokens", lambda trace, prompt: counted.append(prompt))
    rows, summary = _run([jl(prompt=p) for p in (ADD, HARD)], cascade)
    assert summary.unit == "seconds" and summary.estimated == 0 and summary.cost_ratio is None
    assert counted == []  # nothing to compare, so no prompt is tokenized for it


def test_price_units_cost_tokens_times_price(
    fake_backends: Callable[..., dict[str, FakeBackend]], router: RouterFile, tiny_models_toml: Path, tmp_path: Path
) -> None:
    priced = tmp_path / "priced.toml"
    priced.write_text(
        tiny_models_toml.read_text()
        .replace('path = "/nonexistent/small.gguf"', 'path = "/nonexistent/small.gguf"\nprice_per_1k_tokens = 1.0')
        .replace('path = "/nonexistent/medium.gguf"', 'path = "/nonexistent/medium.gguf"\nprice_per_1k_tokens = 2.0')
        .replace('path = "/nonexistent/large.gguf"', 'path = "/nonexistent/large.gguf"\nprice_per_1k_tokens = 4.0')
    )
    install(fake_backends, TABLE)
    cascade = Cascade(router, config.load(priced))
    rows, summary = _run([jl(prompt=ADD), jl(prompt=HARD)], cascade)

    price = {"small": 1.0, "medium": 2.0}
    expected = sum((s["prompt_tokens"] + s["output_tokens"]) * price[s["model"]] / 1000
                   for r in rows for s in r["trace"]["steps"])
    assert summary.unit == "price" and summary.cascade_cost == pytest.approx(expected)
    assert summary.estimated == 2


def test_a_backend_failure_is_that_lines_error(
    fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade
) -> None:
    base = scripted(TABLE["medium"])

    def flaky(text: str, params: GenParams) -> str:
        if user_prompt(text) == HARD:
            raise BackendError("prompt too long")
        return base(text, params)

    install(fake_backends, TABLE)
    fake_backends({"small": scripted(TABLE["small"]), "medium": flaky})
    rows, summary = _run([jl(id="h", prompt=HARD), jl(id="p", prompt=PERU)], cascade, source="in")
    assert rows[0] == {"line": 1, "id": "h", "error": "in:1: prompt too long"}
    assert rows[1]["answer"] == "Lima" and summary.errors == 1


@pytest.mark.parametrize("error", [
    ModelNotAvailable("model 'medium' is not on disk: run `cre models pull medium`"),
    # A file llama.cpp refuses gave every line that reached the rung an error record and
    # the batch went on (exit 3), though the docs said a corrupt file stops it.
    ModelLoadError("llama.cpp could not load 'medium' from /models/medium.gguf: bad magic"),
], ids=["missing", "refused by llama.cpp"])
def test_a_model_that_cannot_answer_at_all_stops_the_batch_after_the_complete_prefix(
    fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade, error: CreError
) -> None:
    def cannot(text: str, params: GenParams) -> str:
        raise error

    fake_backends({"small": scripted(TABLE["small"]), "medium": cannot})
    out = io.StringIO()
    with pytest.raises(type(error)):
        run_batch([jl(prompt=ADD), jl(prompt=PERU)], out, cascade, chunk_size=1)
    assert [json.loads(line)["answer"] for line in out.getvalue().splitlines()] == ["12"]


def test_ctrl_c_keeps_every_finished_answer_and_says_it_was_interrupted(
    fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade
) -> None:
    # Line 2 is answered on the small rung while line 1 waits for the medium one, where
    # Ctrl-C comes: line 2's answer was held back for the order, then lost with the run.
    def interrupted(text: str, params: GenParams) -> str:
        raise KeyboardInterrupt

    fake_backends({"small": scripted(TABLE["small"]), "medium": interrupted})
    rows, summary = _run([jl(id="p", prompt=PERU), jl(id="a", prompt=ADD)], cascade)
    assert [(r["id"], r["answer"]) for r in rows] == [("a", "12")]
    assert summary.interrupted and (summary.answered, summary.errors) == (1, 0)


def test_a_batch_stopped_by_a_model_error_keeps_the_answers_its_chunk_finished(
    fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade
) -> None:
    # Only Ctrl-C wrote the answers still waiting for an earlier line: a model that cannot
    # answer at all stopped the batch, and the answers of its chunk (up to 63) were lost.
    def cannot(text: str, params: GenParams) -> str:
        raise ModelNotAvailable("model 'medium' is not on disk: run `cre models pull medium`")

    fake_backends({"small": scripted(TABLE["small"]), "medium": cannot})
    out = io.StringIO()
    with pytest.raises(ModelNotAvailable):
        run_batch([jl(id="p", prompt=PERU), jl(id="a", prompt=ADD)], out, cascade)
    assert [(r["id"], r["answer"]) for r in map(json.loads, out.getvalue().splitlines())] == [("a", "12")]


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP"])
def test_sigterm_or_sighup_stops_a_batch_as_ctrl_c_does(
    saved_router: Path, tiny_models_toml: Path, tmp_path: Path, stop: str
) -> None:
    # Their default killed the process, with the answers still waiting for an earlier line
    # unwritten (SIGHUP: the ssh session that ran the batch closed).
    infile = tmp_path / "in.jsonl"
    infile.write_bytes(jl(id="p", prompt=PERU) + jl(id="a", prompt=ADD))
    answers = tmp_path / "answers.jsonl"
    with answers.open("w") as stdout:
        result = batch_child(stop, [str(infile), "--router", str(saved_router), "--models", str(tiny_models_toml),
                                    "--no-log"], stdout=stdout)
    assert result.returncode == 130, result.stderr
    assert [(r["id"], r["answer"]) for r in map(json.loads, answers.read_text().splitlines())] == [("a", "12")]
    assert "Interrupted: the lines not answered yet are left for `--resume`" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("json_summary", [False, True])
def test_a_batch_whose_terminal_hung_up_keeps_its_answers_and_exits_130(
    saved_router: Path, tiny_models_toml: Path, tmp_path: Path, json_summary: bool
) -> None:
    # The ssh session closed: SIGHUP, and the terminal that was stderr gone, so the progress
    # bar's last drawing and the summary failed (EIO) and exit 130 became 1 with a traceback.
    infile = tmp_path / "in.jsonl"
    infile.write_bytes(jl(id="p", prompt=PERU) + jl(id="a", prompt=ADD))
    answers = tmp_path / "answers.jsonl"
    with answers.open("w") as stdout:
        result = batch_child("SIGHUP", [str(infile), "--router", str(saved_router), "--models", str(tiny_models_toml),
                                        "--no-log"] + ["--json-summary"] * json_summary, stdout=stdout, hang_up=True)
    assert result.returncode != NOT_LIVE, "the child's stderr, a terminal, did not get Rich's live progress bar"
    assert result.returncode == 130
    assert [(r["id"], r["answer"]) for r in map(json.loads, answers.read_text().splitlines())] == [("a", "12")]


def test_a_stderr_whose_reader_left_mid_batch_is_dropped_and_the_answers_kept(
    saved_router: Path, tiny_models_toml: Path, tmp_path: Path
) -> None:
    # `cre batch in.jsonl > answers.jsonl 2> >(grep -m1 x)`: once stderr's reader left, a
    # progress line met a broken pipe, which Rich answers by pointing stdout (the answers
    # file) at /dev/null and exiting 1; the answers finished were flushed into /dev/null.
    infile = tmp_path / "in.jsonl"
    infile.write_bytes(jl(id="p", prompt=PERU) + jl(id="a", prompt=ADD) + b"\n")
    answers = tmp_path / "answers.jsonl"
    reader, stderr = os.pipe()
    os.close(reader)  # the reader of stderr left: every write to it fails (EPIPE)
    try:
        with answers.open("w") as stdout:
            result = batch_child(None, [str(infile), "--router", str(saved_router), "--models", str(tiny_models_toml),
                                        "--no-log"], stdout=stdout, stderr=stderr,
                                 env={"CRE_PROGRESS_INTERVAL": "0"})  # a progress line for every line answered
    finally:
        os.close(stderr)
    assert result.returncode == 3  # the empty line's error record, as with a stderr to write to
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [(r["id"], r.get("answer")) for r in rows] == [("p", "Lima"), ("a", "12"), (None, None)]


def test_a_progress_bar_that_cannot_erase_itself_as_a_stop_unwinds_leaves_it_a_stop(
    fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SIGHUP with the terminal gone: the bar's last drawing failed (EIO) as the stop unwound,
    # and that OSError, not the stop, ended the batch (exit 1, not 130).
    import contextlib

    from crecli import batch

    drawn = batch.progress

    @contextlib.contextmanager
    def on_a_terminal_gone() -> Any:
        with drawn() as bar:
            try:
                yield bar
            except KeyboardInterrupt:
                raise OSError(errno.EIO, os.strerror(errno.EIO))

    def interrupted(text: str, params: GenParams) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "progress", on_a_terminal_gone)
    fake_backends({"small": scripted(TABLE["small"]), "medium": interrupted})
    rows, summary = _run([jl(id="p", prompt=PERU), jl(id="a", prompt=ADD)], cascade)
    assert [(r["id"], r["answer"]) for r in rows] == [("a", "12")] and summary.interrupted


class _GoneStderr(io.StringIO):
    """stderr once the terminal closed (EIO) or its reader left (EPIPE): every write fails."""

    def __init__(self, errno_: int) -> None:
        super().__init__()
        self.errno_ = errno_

    def write(self, text: str) -> int:
        raise OSError(self.errno_, os.strerror(self.errno_))

    def flush(self) -> None:
        raise OSError(self.errno_, os.strerror(self.errno_))


@pytest.mark.parametrize("json_summary", [False, True])
@pytest.mark.parametrize("errno_", [errno.EIO, errno.EPIPE])
def test_a_summary_that_stderr_cannot_take_leaves_the_answers_and_exit_130(
    fake_backends: Callable[..., dict[str, FakeBackend]], saved_router: Path, tiny_models_toml: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, errno_: int, json_summary: bool
) -> None:
    # After SIGHUP the terminal was gone: the summary's write failed (EIO) after the answers
    # were written, and the run ended in a traceback with exit 1 instead of 130; Rich met a
    # broken pipe (EPIPE) by pointing stdout at /dev/null and exiting 1.
    from crecli import render

    def interrupted(text: str, params: GenParams) -> str:
        raise KeyboardInterrupt

    fake_backends({"small": scripted(TABLE["small"]), "medium": interrupted})
    summarise = render.batch_summary

    def gone(summary: BatchSummary, as_json: bool) -> None:
        with monkeypatch.context() as during:  # the test's runner reads stderr afterwards
            during.setattr(sys, "stderr", _GoneStderr(errno_))
            summarise(summary, as_json)

    monkeypatch.setattr(render, "batch_summary", gone)
    infile = tmp_path / "in.jsonl"
    infile.write_bytes(jl(id="p", prompt=PERU) + jl(id="a", prompt=ADD))
    result = _batch([str(infile), "--router", str(saved_router), "--no-log"] + ["--json-summary"] * json_summary,
                    tiny_models_toml)
    assert result.exit_code == 130 and isinstance(result.exception, SystemExit), result.exception
    assert [(r["id"], r["answer"]) for r in map(json.loads, result.stdout.splitlines())] == [("a", "12")]


def test_ctrl_c_during_an_answers_bookkeeping_keeps_that_answer(
    fake_backends: Callable[..., dict[str, FakeBackend]], router: RouterFile, tiny_models_toml: Path, bench_speeds,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The answer was written only after pricing it, whose first count of the strongest
    # model's tokens loads its vocabulary (seconds): a Ctrl-C there lost a finished answer.
    def interrupt(trace: object, prompt: str) -> None:
        raise KeyboardInterrupt

    bench_speeds(SPEEDS)  # priced by tokens, so the summary counts the strongest model's
    install(fake_backends, TABLE)
    cascade = Cascade(router, config.load(tiny_models_toml))
    monkeypatch.setattr(cascade, "strongest_tokens", interrupt)
    rows, summary = _run([jl(id="a", prompt=ADD)], cascade)
    assert [(r["id"], r["answer"]) for r in rows] == [("a", "12")] and summary.interrupted


class _Full(io.StringIO):
    """An output whose writes fail with `errno_`, as stdout on a full disk or a closed pipe."""

    def __init__(self, errno_: int) -> None:
        super().__init__()
        self.errno_ = errno_
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        raise OSError(self.errno_, os.strerror(self.errno_))


def test_results_that_cannot_be_written_stop_the_batch_saying_how_to_resume(
    fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade
) -> None:
    # An OSError from stdout other than a broken pipe left the command as a traceback.
    install(fake_backends, TABLE)
    full = _Full(errno.ENOSPC)
    with pytest.raises(CreError, match=r"cannot write the results \(No space left on device\).*--resume"):
        _run([jl(id="a", prompt=ADD)], cascade, out=full)
    assert full.writes == 1  # not tried again as the batch stops: it could follow a cut line
    # A reader that left (`| head`) is Typer's to end quietly, as before.
    with pytest.raises(BrokenPipeError):
        _run([jl(id="a", prompt=ADD)], cascade, out=_Full(errno.EPIPE))


def test_resume_appending_to_a_cut_file_starts_on_a_line_of_its_own(tmp_path: Path) -> None:
    from crecli.batch import mend_cut_line

    out = tmp_path / "answers.jsonl"
    out.write_text('{"id": "a", "answer": "12"}\n{"id": "b", "ans')  # cut by a crash
    with out.open("a") as fh:
        mend_cut_line(out, fh)
        fh.write('{"id": "b", "answer": "Lima"}\n')
    assert out.read_text().splitlines()[-1] == '{"id": "b", "answer": "Lima"}'
    with out.open("a") as fh:  # whole now: nothing added
        mend_cut_line(out, fh)
    other = tmp_path / "other.jsonl"
    with other.open("w") as fh:  # output to another file: left alone
        mend_cut_line(tmp_path / "answers.jsonl", fh)
    assert other.read_text() == "" and out.read_text().count("\n") == 3


@pytest.mark.parametrize(
    ("text", "size"),
    [("4GB", 4 << 30), ("512MB", 512 << 20), ("1.5G", 3 << 29), ("2GiB", 2 << 30), ("1000", 1000), ("64 kb", 64 << 10)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "4TB", "-1GB", "0"])
def test_parse_size_rejects_nonsense(text: str) -> None:
    with pytest.raises(UsageError, match="--memory-budget"):
        parse_size(text)


# ---------------------------------------------------------------- cre batch


def _batch(args: list[str], models_toml: Path, input: bytes | None = None) -> Any:
    return CliRunner().invoke(app, ["batch", *args, "--models", str(models_toml)], input=input)


def test_cli_batch_reads_a_file_and_exits_3_on_error_lines(
    fake_backends: Callable[..., dict[str, FakeBackend]], saved_router: Path, tiny_models_toml: Path, tmp_path: Path,
    bench_speeds,
) -> None:
    bench_speeds(SPEEDS)
    install(fake_backends, TABLE)
    infile = tmp_path / "in.jsonl"
    infile.write_bytes(b"".join(MIXED))
    result = _batch([str(infile), "--router", str(saved_router)], tiny_models_toml)
    assert result.exit_code == 3, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["line"] for r in rows] == list(range(1, 8))
    assert rows[1]["error"].startswith(f"{infile}:2: ")
    assert "7 lines: 3 answered, 4 errors" in result.stderr
    assert "accuracy 100.0% (1/1" in result.stderr and "vs always large" in result.stderr


def test_batch_summary_says_when_the_speeds_that_price_it_are_hours_old(
    fake_backends: Callable[..., dict[str, FakeBackend]], saved_router: Path, tiny_models_toml: Path, tmp_path: Path,
    bench_speeds,
) -> None:
    install(fake_backends, TABLE)
    infile = tmp_path / "in.jsonl"
    infile.write_bytes(MIXED[0])
    bench_speeds(SPEEDS, hours_ago=10)
    old = _batch([str(infile), "--router", str(saved_router)], tiny_models_toml)
    assert old.exit_code == 0, old.output
    assert "vs always large" in old.stderr and "measured 10 h ago" in old.stderr and "cre models bench --fresh" in old.stderr
    summary = json.loads(_batch([str(infile), "--router", str(saved_router), "--json-summary"],
                                tiny_models_toml).stderr.strip().splitlines()[-1])
    assert summary["unit"] == "bench-seconds" and 9.9 < summary["speeds_age_hours"] < 10.5
    bench_speeds(SPEEDS, hours_ago=1)
    recent = _batch([str(infile), "--router", str(saved_router)], tiny_models_toml)
    assert "vs always large" in recent.stderr and "h ago" not in recent.stderr


def test_cli_batch_stdin_resume_and_json_summary(
    fake_backends: Callable[..., dict[str, FakeBackend]], saved_router: Path, tiny_models_toml: Path, tmp_path: Path
) -> None:
    install(fake_backends, TABLE)
    lines = [jl(id="a", prompt=ADD), jl(id="b", prompt=PERU), jl(id="c", prompt=FRUIT)]
    first = _batch(["--router", str(saved_router), "--memory-budget", "1GB"], tiny_models_toml, b"".join(lines[:2]))
    assert first.exit_code == 0, first.output
    out = tmp_path / "out.jsonl"
    out.write_text(first.stdout)

    again = _batch(["--router", str(saved_router), "--resume", str(out), "--json-summary"], tiny_models_toml,
                   b"".join(lines))
    assert again.exit_code == 0, again.output
    assert [json.loads(line)["id"] for line in again.stdout.splitlines()] == ["c"]
    summary = json.loads(again.stderr)
    assert (summary["lines"], summary["skipped"], summary["answered"], summary["errors"]) == (3, 2, 1, 0)


def test_cli_batch_dash_reads_stdin(
    fake_backends: Callable[..., dict[str, FakeBackend]], saved_router: Path, tiny_models_toml: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `cre batch -` opened a file named "-", though the refusal of a device offers "- for stdin".
    install(fake_backends, TABLE)
    monkeypatch.chdir(tmp_path)  # no file named "-" here
    result = _batch(["-", "--router", str(saved_router)], tiny_models_toml, jl(id="a", prompt=ADD))
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["a"]


def _no_model(text: str, params: GenParams) -> str:
    pytest.fail("a model ran")


@pytest.mark.parametrize("how", ["in >> in", "< in >> in", "in 1<> in", "< in 1<> in"])
def test_an_input_that_is_also_stdout_is_refused_before_any_model_runs(
    fake_backends: Callable[..., dict[str, FakeBackend]], saved_router: Path, tiny_models_toml: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, cre: Callable[..., Run], how: str,
) -> None:
    # `cre batch loop.jsonl >> loop.jsonl` read its own answers back as prompts once past the
    # first chunk: the file grew until the disk was full (70 MB in 10 s).
    fake_backends({m: _no_model for m in LADDER})
    loop = tmp_path / "loop.jsonl"
    loop.write_bytes(jl(id="a", prompt=ADD) * 70)
    before = loop.read_bytes()
    named = not how.startswith("<")
    with loop.open("r") as stdin, loop.open("a" if ">>" in how else "r+") as stdout:
        if not named:
            monkeypatch.setattr(sys, "stdin", stdin)
        monkeypatch.setattr(sys, "stdout", stdout)
        result = cre("batch", *([loop] if named else []), "--router", saved_router, "--models", tiny_models_toml)
    refused(result, "is also stdout", "Write the answers to another file", code=2)
    assert (f"Error: {loop} is also stdout" if named else f"Error: stdin ({loop}) is also stdout") in result.err
    assert loop.read_bytes() == before


def _one_line_no_model_may_run(fake_backends: Callable[..., dict[str, FakeBackend]], tmp_path: Path) -> Path:
    """An input of one prompt, on a ladder whose every model fails the test if it runs."""
    fake_backends({m: _no_model for m in LADDER})
    infile = tmp_path / "in.jsonl"
    infile.write_bytes(jl(id="a", prompt=ADD))
    return infile


def test_a_resume_file_that_is_the_input_is_refused(
    fake_backends: Callable[..., dict[str, FakeBackend]], saved_router: Path, tiny_models_toml: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, cre: Callable[..., Run],
) -> None:
    # It was read as an output with nothing answered, and every line answered again.
    infile = _one_line_no_model_may_run(fake_backends, tmp_path)
    result = cre("batch", infile, "--resume", infile, "--router", saved_router, "--models", tiny_models_toml)
    refused(result, f"--resume {infile} is the input too", "cre batch --resume answers.jsonl", code=2)
    with infile.open("r") as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        result = cre("batch", "--resume", infile, "--router", saved_router, "--models", tiny_models_toml)
    refused(result, f"--resume {infile} is the input too", code=2)


def test_a_closed_stdout_is_refused_before_any_model_runs(
    fake_backends: Callable[..., dict[str, FakeBackend]], saved_router: Path, tiny_models_toml: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, cre: Callable[..., Run],
) -> None:
    # `cre batch in.jsonl >&-` ran the models, then ended in an AttributeError traceback (None.write).
    infile = _one_line_no_model_may_run(fake_backends, tmp_path)
    monkeypatch.setattr(sys, "stdout", None)
    result = cre("batch", infile, "--router", saved_router, "--models", tiny_models_toml)
    refused(result, "cre batch writes the answers to stdout, and stdout is closed", "> answers.jsonl", code=2)


def test_a_reference_without_match_leaves_the_answer_type_to_the_cluster(
    fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade
) -> None:
    # It defaulted to exact, as a query log's row does: the line was answered with exact's
    # output cap (and a choice prompt lost its stop at the option letter), and "12" against
    # "12.0" was wrong, where the same line without a reference ran as its cluster's numeric.
    created = install(fake_backends, TABLE)
    rows, _ = _run([jl(prompt=ADD, reference="12.0"), jl(prompt=ADD), jl(prompt=ADD, reference="12.0", match="exact"),
                    jl(prompt=ADD, reference="Paris")], cascade)
    graded, bare, exact, unreadable = rows
    assert graded["trace"]["answer_type"] == bare["trace"]["answer_type"] == "numeric"
    assert graded["answer"] == bare["answer"] == "12" and graded["correct"] is True
    assert exact["trace"]["answer_type"] == "exact" and exact["correct"] is False  # a match given is kept
    # A reference the cluster's type cannot read is compared as text, not an error record
    # that throws the answer away.
    assert "error" not in unreadable and unreadable["answer"] == "12" and unreadable["correct"] is False
    # A reference that no answer type can match is still a bad line, refused before any model runs.
    calls = sum(len(b.calls) for b in created.values())
    [blank], _ = _run([jl(prompt=ADD, reference="  ")], cascade)
    assert "error" in blank and "answer" not in blank
    assert sum(len(b.calls) for b in created.values()) == calls


def test_field_names_can_be_mapped(fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade) -> None:
    install(fake_backends, TABLE)
    fields = FieldMap(prompt="question", reference="gold", id="key")
    rows, summary = _run([jl(key="k1", question=ADD, gold=["12"], match="numeric"), jl(id="x", prompt=ADD)], cascade, fields=fields)
    assert rows[0]["id"] == "k1" and rows[0]["answer"] == "12" and rows[0]["correct"] is True
    assert "missing 'question' field" in rows[1]["error"]


def test_a_ctrl_c_while_the_output_flushes_writes_no_line_twice() -> None:
    # Records were dropped from the writer only after the flush: a Ctrl-C while it blocked
    # (a full pipe) left them queued, and `flush_ready` wrote them a second time.
    from crecli.batch import _OrderedWriter

    class SlowPipe(io.StringIO):
        flushes = 0

        def flush(self) -> None:
            SlowPipe.flushes += 1
            if SlowPipe.flushes == 1:
                raise KeyboardInterrupt

    out = SlowPipe()
    writer = _OrderedWriter(out, first=1)
    with pytest.raises(KeyboardInterrupt):
        writer.put(1, {"id": "a", "answer": "12"})
    writer.flush_ready()
    assert [json.loads(line)["id"] for line in out.getvalue().splitlines()] == ["a"]


def _stopped_in_line_1(out: Any, one: dict[str, Any], two: dict[str, Any], four: dict[str, Any]) -> None:
    """Have an `_OrderedWriter` on `out` take the records of lines 2 and 4, then line 1's,
    whose write `out` stops (KeyboardInterrupt), then flush what is ready, as the batch's
    stop does."""
    from crecli.batch import _OrderedWriter

    writer = _OrderedWriter(out, first=1)
    writer.put(2, two)  # waits for line 1
    writer.put(4, four)  # waits for line 3, which the stop leaves unanswered
    with pytest.raises(KeyboardInterrupt):
        writer.put(1, one)
    writer.flush_ready()


def test_a_stop_raised_as_the_output_takes_the_records_writes_no_line_twice() -> None:
    # SIGTERM while the write blocked on a slow pipe: the handler's KeyboardInterrupt came
    # out of the write after it had taken the records, before they were dropped from the
    # writer, and `flush_ready` wrote them a second time.
    class SlowPipe(io.StringIO):
        writes = 0

        def write(self, text: str) -> int:
            written = super().write(text)
            SlowPipe.writes += 1
            if SlowPipe.writes == 1:
                raise KeyboardInterrupt
            return written

    out = SlowPipe()
    _stopped_in_line_1(out, {"id": "a", "answer": "1"}, {"id": "b", "answer": "2"}, {"id": "d", "answer": "4"})
    # The write may have been cut (see below): the records after it start a line, here blank.
    assert [json.loads(line)["id"] for line in out.getvalue().splitlines() if line] == ["a", "b", "d"]


def test_a_stop_that_cuts_a_write_short_leaves_the_next_record_whole_and_the_cut_line_to_resume(
    fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade, tmp_path: Path
) -> None:
    # A second signal while a large write blocked on a slow pipe ended it (EINTR) after part
    # of the text: the rest was lost, and `flush_ready` wrote the next record onto the cut
    # line, so --resume lost both.
    class SlowPipe(io.StringIO):
        cut = True

        def write(self, text: str) -> int:
            if SlowPipe.cut:
                SlowPipe.cut = False
                super().write(text[:len(text) - 10])  # "a" whole, "b" cut inside its answer
                raise KeyboardInterrupt
            return super().write(text)

    install(fake_backends, TABLE)
    lines = [jl(id="a", prompt=ADD), jl(id="b", prompt=PERU), jl(id="c", prompt=FRUIT), jl(id="d", prompt=ADD)]
    first, _ = _run(lines, cascade)
    out = SlowPipe()
    _stopped_in_line_1(out, first[0], first[1], first[3])
    earlier = tmp_path / "out.jsonl"
    earlier.write_text(out.getvalue())
    assert [line[:11] for line in out.getvalue().splitlines()] == ['{"id": "a",', '{"id": "b",', '{"id": "d",']
    rows, summary = _run(lines, cascade, resume_ids=read_done_ids(earlier))
    assert [(r["id"], r["answer"]) for r in rows] == [("b", "Lima"), ("c", "(B)")]  # the cut line answered again
    assert summary.skipped == 2


def test_a_stop_whose_write_took_none_or_all_of_the_text_leaves_no_blank_line_in_a_file(tmp_path: Path) -> None:
    # After a stop inside a write, `flush_ready` began with a newline whenever the write had
    # not returned, though it usually took none of the text (EINTR before any byte) or all
    # of it: a blank line in the JSONL file. A regular file is read back instead.
    class Stopping(io.TextIOWrapper):
        takes: str  # "none" or "all" of the text, on the first write only
        writes = 0

        def write(self, text: str) -> int:
            self.writes += 1
            if self.writes == 1:
                if self.takes == "all":
                    super().write(text)
                    super().flush()
                raise KeyboardInterrupt
            return super().write(text)

    for takes in ("none", "all"):
        path = tmp_path / f"{takes}.jsonl"
        with Stopping(open(path, "wb"), encoding="utf-8") as out:
            out.takes = takes
            _stopped_in_line_1(out, {"id": "a", "answer": "1"}, {"id": "b", "answer": "2"}, {"id": "d", "answer": "4"})
        ids = [json.loads(line)["id"] for line in path.read_text().split("\n")[:-1]]  # a blank line fails here
        assert ids == (["a", "b", "d"] if takes == "all" else ["d"]), takes


def test_a_resume_file_emptied_by_the_shell_is_told_apart_from_one_appended_to(tmp_path: Path) -> None:
    # `cre batch --resume out.jsonl > out.jsonl`: the shell empties the file before cre runs,
    # and every line was answered again without a word.
    from crecli.batch import emptied_by_redirect

    resume = tmp_path / "out.jsonl"
    resume.write_text("")
    with open(resume, "w") as out:
        assert emptied_by_redirect(resume, out)
    with open(resume, "a") as out:
        assert not emptied_by_redirect(resume, out)
    with open(tmp_path / "other.jsonl", "w") as out:
        assert not emptied_by_redirect(resume, out)
    assert not emptied_by_redirect(resume, io.StringIO())


def test_a_resume_file_opened_read_write_is_not_called_emptied_but_refused(tmp_path: Path) -> None:
    # `--resume out.jsonl 1<> out.jsonl`: `1<>` empties nothing, yet the warning said '>' had
    # emptied it; and the run wrote its answers from the file's start over the ones it held.
    from crecli.batch import emptied_by_redirect, refuse_own_output

    resume = tmp_path / "out.jsonl"
    resume.write_text(json.dumps({"line": 1, "id": "a", "answer": "12"}) + "\n")
    before = resume.read_bytes()
    with open(resume, "r+") as out:
        assert not emptied_by_redirect(resume, out)
        with pytest.raises(UsageError, match=rf"stdout is the --resume file {resume}, opened to write before its end "
                                             rf"without appending \(as '1<>'.*written over the ones it holds.*>> {resume}$"):
            refuse_own_output(io.BytesIO(jl(id="a", prompt=ADD)), out, "<stdin>", resume)
    assert resume.read_bytes() == before
    for mode in ("a", "w"):  # appended to, or emptied already (warned): not refused
        with open(resume, mode) as out:
            refuse_own_output(io.BytesIO(jl(id="a", prompt=ADD)), out, "<stdin>", resume)


def test_a_resume_file_opened_to_write_over_its_answers_is_refused_whatever_its_flags(tmp_path: Path) -> None:
    # systemd's `StandardOutput=file:out.jsonl` (and `exec 3>out.jsonl` once others appended,
    # or a driver's os.open without O_TRUNC) opens it to write only, from its start, emptying
    # nothing: the flags of `>`, so the warning said its answers were gone, and the run wrote
    # over them unrefused.
    from crecli.batch import emptied_by_redirect, refuse_own_output

    resume = tmp_path / "out.jsonl"
    resume.write_text(json.dumps({"line": 1, "id": "a", "answer": "12"}) + "\n")
    before = resume.read_bytes()
    with open(os.open(resume, os.O_WRONLY), "w") as out:
        assert not emptied_by_redirect(resume, out)
        with pytest.raises(UsageError, match=rf"stdout is the --resume file {resume}, opened to write before its end"
                                             rf".*StandardOutput=file:.*written over the ones it holds.*>> {resume}$"):
            refuse_own_output(io.BytesIO(jl(id="a", prompt=ADD)), out, "<stdin>", resume)
    assert resume.read_bytes() == before


def test_a_resume_file_opened_read_write_at_its_end_is_neither_refused_nor_called_emptied(tmp_path: Path) -> None:
    # A driver that opens the output read-write and seeks to its end appends as `>>` does,
    # yet read-write was refused as `1<>`.
    from crecli.batch import emptied_by_redirect, mend_cut_line, refuse_own_output

    resume = tmp_path / "out.jsonl"
    resume.write_text(json.dumps({"line": 1, "id": "a", "answer": "12"}))  # its last line cut
    with open(resume, "r+") as out:
        out.seek(0, os.SEEK_END)
        assert not emptied_by_redirect(resume, out)
        refuse_own_output(io.BytesIO(jl(id="a", prompt=ADD)), out, "<stdin>", resume)
        mend_cut_line(resume, out)
        out.write(json.dumps({"line": 2, "id": "b", "answer": "3"}) + "\n")
    assert set(read_done_ids(resume)) == {"a", "b"}  # appended after the cut line, mended
    # The shell's `>>` leaves the position at the start (Python's "a" seeks to the end): it
    # is the append flag, not the position, that says where the writes go.
    with open(os.open(resume, os.O_WRONLY | os.O_APPEND), "w") as out:
        assert not emptied_by_redirect(resume, out)
        refuse_own_output(io.BytesIO(jl(id="a", prompt=ADD)), out, "<stdin>", resume)


@pytest.mark.parametrize("how", ["1<>", "file:"])
def test_a_first_run_opened_to_write_over_a_file_is_refused(tmp_path: Path, how: str) -> None:
    # `cre batch new.jsonl 1<> answers.jsonl`, or systemd's `StandardOutput=file:`, without
    # --resume: the run wrote from the file's start, emptying nothing, and an earlier run's
    # longer output kept its last records after the new ones, behind a garbage line; a later
    # --resume read them as answers.
    from crecli.batch import refuse_own_output

    out = tmp_path / "answers.jsonl"
    out.write_text(json.dumps({"line": 1, "id": "old", "answer": "12"}) + "\n")
    before = out.read_bytes()
    with open(out, "r+") if how == "1<>" else open(os.open(out, os.O_WRONLY), "w") as stdout:
        with pytest.raises(UsageError, match=rf"stdout \({out}\) is opened to write before its end without appending"
                                             rf".*those past them would stay, mixed in.*> {out}$"):
            refuse_own_output(io.BytesIO(jl(id="a", prompt=ADD)), stdout, "<stdin>", None)
    assert out.read_bytes() == before
    for mode in ("a", "w"):  # appended to, or emptied by `>`: written as asked
        with open(out, mode) as stdout:
            refuse_own_output(io.BytesIO(jl(id="a", prompt=ADD)), stdout, "<stdin>", None)
    with open(out, "r+") as stdout:  # empty now (`w` above): nothing to write over
        refuse_own_output(io.BytesIO(jl(id="a", prompt=ADD)), stdout, "<stdin>", None)


def test_a_batch_lock_ends_with_its_run_though_a_parent_keeps_the_output_open(tmp_path: Path) -> None:
    # A driver's `subprocess.run(["cre", "batch", ...], stdout=fh)` twice on one open `fh`
    # (or a shell's `exec 3>>out.jsonl`): the lock was taken on stdout's open file, which the
    # parent still held, so it outlived the first run and the second was refused as
    # "another cre batch is writing".
    import subprocess

    from crecli.batch import lock_output

    out = tmp_path / "out.jsonl"
    out.write_text("")
    child = "import sys\nfrom crecli.batch import lock_output\nheld = lock_output(sys.stdout)\n"  # held until it exits
    with open(out, "a") as shared:
        subprocess.run([sys.executable, "-c", child], stdout=shared, check=True)
        with open(out, "a") as mine:
            with lock_output(mine):
                # Held while its context lasts: a second lock on the file, in this process
                # too, is refused.
                with open(out, "a") as other, pytest.raises(CreError, match="another cre batch is writing"):
                    lock_output(other)
        with open(out, "a") as mine:
            lock_output(mine).__exit__(None, None, None)  # released as its context ends: free again


def test_a_batch_writes_utf8_whatever_the_locale(
    fake_backends: Callable[..., dict[str, FakeBackend]], saved_router: Path, tiny_models_toml: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, cre: Callable[..., Run],
) -> None:
    # LANG=en_US.ISO-8859-1: stdout was Latin-1, and the first answer outside it ended the
    # run in a traceback (UnicodeEncodeError), its chunk's answers unwritten.
    fake_backends({m: (lambda text, p: "12 \u2192 \u65e5\u672c") for m in LADDER})
    infile = tmp_path / "in.jsonl"
    infile.write_bytes(jl(id="a", prompt=ADD))
    out = tmp_path / "out.jsonl"
    with open(out, "w", encoding="latin-1") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        result = cre("batch", infile, "--router", saved_router, "--models", tiny_models_toml, "--no-log")
    assert result.code == 0, result.err
    record = json.loads(out.read_bytes().decode("utf-8"))
    assert record["id"] == "a" and "\u65e5\u672c" in json.dumps(record["trace"], ensure_ascii=False)


@pytest.mark.parametrize(("mode", "said"), [("w", True), ("r+", False)])
def test_an_input_that_is_stdout_is_called_emptied_only_when_it_was(tmp_path: Path, mode: str, said: bool) -> None:
    # `cre batch in.jsonl 1<> in.jsonl` with in.jsonl empty: `1<>` emptied nothing, yet the
    # refusal said the shell's '>' had.
    from crecli.batch import refuse_own_output

    loop = tmp_path / "loop.jsonl"
    loop.write_text("")
    with loop.open("rb") as stdin, loop.open(mode) as stdout:
        with pytest.raises(UsageError, match="is also stdout") as refused:
            refuse_own_output(stdin, stdout, str(loop), None)
    assert ("the shell's '>' emptied it" in str(refused.value)) is said


def test_the_json_summary_is_strict_json(capsys: pytest.CaptureFixture[str]) -> None:
    # As every JSON crecli writes: a figure that cannot be computed is null, never a bare NaN.
    from crecli import render

    summary = BatchSummary(unit="bench-seconds", strongest_model="large")
    summary.cascade_cost = float("nan")
    render.batch_summary(summary, as_json=True)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))["cascade_cost"] is None


def test_a_second_batch_writing_to_the_same_file_is_refused(tmp_path: Path) -> None:
    # Two `--resume out.jsonl >> out.jsonl` runs at once read the same answered ids, answered
    # the same lines twice and could interleave their records.
    import subprocess
    import sys

    from crecli.batch import lock_output

    out = tmp_path / "out.jsonl"
    out.write_text("")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(out)!r}, 'a'); fcntl.flock(f.fileno(), fcntl.LOCK_EX); print('locked', flush=True); time.sleep(30)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with open(out, "a") as mine:
            with pytest.raises(CreError, match="another cre batch is writing to .*out.jsonl"):
                lock_output(mine)
    finally:
        holder.kill()
        holder.wait()
    with open(out, "a") as mine:
        lock_output(mine)  # free again
    lock_output(io.StringIO())  # no file behind it: nothing to lock


def test_a_second_batch_refused_after_its_redirect_emptied_the_file_says_so_and_resume_reads_what_follows(
    tmp_path: Path,
) -> None:
    # `cre batch ... > held.jsonl` while another run held it: the shell had emptied the file
    # before cre refused, yet the message said only "let it finish". And the first run, writing
    # on at its old offset, left NULs before its next answer, which --resume could not read.
    import subprocess

    from crecli.batch import lock_output

    out = tmp_path / "held.jsonl"
    def line(id: str) -> str:
        return json.dumps({"id": id, "answer": "12"}) + "\n"

    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys\n"
        f"f = open({str(out)!r}, 'w'); fcntl.flock(f.fileno(), fcntl.LOCK_EX)\n"
        f"f.write({line('a')!r}); f.flush(); print('locked', flush=True)\n"
        f"sys.stdin.readline(); f.write({line('b')!r}); f.flush()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with open(out, "w") as mine:  # `> held.jsonl`: emptied before lock_output runs
            with pytest.raises(CreError, match=rf"'>' emptied it before cre could refuse: the answers that run wrote so "
                                               rf"far are gone.*cre batch --resume {out} prompts.jsonl >> {out}$"):
                lock_output(mine)
        holder.communicate("go on\n", timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert out.read_bytes().startswith(b"\0")
    assert read_done_ids(out) == {"b": Answered(prompts={None})}


def test_a_second_batch_whose_redirect_emptied_a_file_the_first_wrote_to_since_is_told_so_with_or_without_resume(
    saved_router: Path, tiny_models_toml: Path, tmp_path: Path,
) -> None:
    # `cre batch [--resume held.jsonl] in.jsonl > held.jsonl` while another run held it, which
    # wrote at its old offset as this one started: the file no longer empty, the position 0
    # read as `1<>`'s, so --resume got the "written over" refusal (and the advice to append),
    # and without it the refusal said only that the file was busy, not that `>` emptied it.
    import subprocess

    from crecli.batch import lock_output

    out = tmp_path / "held.jsonl"
    infile = tmp_path / "in.jsonl"
    infile.write_bytes(jl(id="a", prompt=ADD))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys\n"
        f"f = open({str(out)!r}, 'w'); fcntl.flock(f.fileno(), fcntl.LOCK_EX)\n"
        "f.write('{\"id\": \"a\", \"answer\": \"12\"}\\n'); f.flush(); print('locked', flush=True)\n"
        "while sys.stdin.readline():\n"
        "    f.write('{\"id\": \"b\", \"answer\": \"3\"}\\n'); f.flush(); print('wrote', flush=True)\n")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdin is not None and holder.stdout is not None
    said = rf"'>' emptied it before cre could refuse: the answers that run wrote so far are gone.*--resume {out} "
    try:
        assert holder.stdout.readline().strip() == "locked"
        for resume in ([], ["--resume", str(out)]):
            with open(out, "w") as mine:  # `> held.jsonl`, and the first run writes on meanwhile
                holder.stdin.write("go on\n")
                holder.stdin.flush()
                assert holder.stdout.readline().strip() == "wrote"
                assert out.stat().st_size > 0
                if not resume:
                    with pytest.raises(CreError, match=said):
                        lock_output(mine)
                result = batch_child(None, [*resume, str(infile), "--router", str(saved_router), "--models",
                                            str(tiny_models_toml), "--no-log"], stdout=mine)
            assert result.returncode == 1 and re.search(said, " ".join(result.stderr.split())), result.stderr
    finally:
        holder.kill()
        holder.wait()


def test_a_second_batch_refused_through_a_read_write_redirect_does_not_say_it_emptied_the_file(
    tmp_path: Path,
) -> None:
    # `cre batch ... 1<> held.jsonl` while another run held it: `1<>` empties nothing, yet the
    # refusal said this run's '>' had emptied the file and the other run's answers were gone.
    import subprocess

    from crecli.batch import lock_output

    out = tmp_path / "held.jsonl"
    out.write_text(json.dumps({"id": "a", "answer": "12"}) + "\n")
    before = out.read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, time\n"
        f"f = open({str(out)!r}, 'a'); fcntl.flock(f.fileno(), fcntl.LOCK_EX); print('locked', flush=True); time.sleep(30)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with open(out, "r+") as mine:  # `1<> held.jsonl`
            with pytest.raises(CreError, match=r"it holds its lock\): let it finish, or write this run elsewhere") as refused:
                lock_output(mine)
        assert "emptied" not in str(refused.value) and out.read_bytes() == before
    finally:
        holder.kill()
        holder.wait()


def test_an_output_line_is_strict_json_even_with_a_float_that_is_not_finite() -> None:
    # A NaN P(correct) was written as a bare NaN, which a strict JSON reader refuses.
    from crecli import batch

    line = batch._json_line({"id": "1", "p_correct": float("nan"), "trace": [{"seconds": float("inf")}]})
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {
        "id": "1", "p_correct": None, "trace": [{"seconds": None}]}


@pytest.mark.parametrize("text", [
    '{"id": "q1", "prompt": "What is 12 plus 30?", "reference": "42"}\n',  # the input, given for the output
    "What is 12 plus 30?\nWhat is 7 plus 5?\n",
])
def test_a_resume_file_that_holds_no_batch_records_is_refused(tmp_path: Path, text: str) -> None:
    # `--resume prompts.jsonl < prompts.jsonl >> answers.jsonl`: read as "nothing answered",
    # it answered every line again after the first run's answers, exit 0, without a word.
    given = tmp_path / "prompts.jsonl"
    given.write_text(text)
    with pytest.raises(InputError, match="holds no `cre batch` answer or error records"):
        read_done_ids(given)


def test_a_resume_file_with_only_a_cut_line_or_nothing_reads_as_nothing_answered(tmp_path: Path) -> None:
    # A first run that crashed inside its first record, or wrote none: resumed from the start.
    for text in ('{"line": 1, "id": "a", "answ', "", "\n"):
        earlier = tmp_path / "out.jsonl"
        earlier.write_text(text)
        assert read_done_ids(earlier) == {}


@pytest.mark.parametrize("ref", ["a{4294967296}", "(" * 1000 + ")" * 1000])
def test_a_regex_reference_python_cannot_compile_is_that_lines_error(
    fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade, ref: str,
) -> None:
    # re.compile raised OverflowError / RecursionError, not re.error: a traceback that left the
    # rest of the batch unanswered.
    install(fake_backends, TABLE)
    rows, summary = _run([jl(id="r", prompt=ADD, reference=ref, match="regex"), jl(id="a", prompt=ADD)],
                         cascade, source="in")
    assert [r["line"] for r in rows] == [1, 2]
    assert "regular expression" in rows[0]["error"] and rows[1]["answer"] == "12"
    assert (summary.errors, summary.answered) == (1, 1)


def test_an_embedder_model_that_cannot_load_stops_the_batch(
    fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # It wrote an error record for every line, retrying the load each chunk, and exit 3.
    install(fake_backends, TABLE)

    def missing(prompts: list[str]) -> list[Any]:
        raise ModelNotAvailable("model 'emb' is not on disk: run `cre models pull emb`", missing="emb")

    monkeypatch.setattr(cascade, "route_many", missing)
    out = io.StringIO()
    with pytest.raises(ModelNotAvailable):
        run_batch([jl(id=str(i), prompt=ADD) for i in range(130)], out, cascade)
    assert out.getvalue() == ""


def test_resume_skips_a_nul_gap_without_holding_it(tmp_path: Path) -> None:
    # A second run's '>' emptied the file under a run still writing: the gap of NULs, as long
    # as all it had written, has no newline, and was read as one line held whole.
    import tracemalloc

    path = tmp_path / "out.jsonl"
    with open(path, "wb") as fh:
        fh.truncate(64 << 20)  # sparse: the gap '>' leaves
        fh.seek(0, os.SEEK_END)
        fh.write(b'{"id": "a", "line": 1, "prompt_sha256": "d", "answer": "12"}\n')
    tracemalloc.start()
    done = read_done_ids(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert done == {"a": Answered(prompts={"d"}, at={1})}
    assert peak < 8 << 20
