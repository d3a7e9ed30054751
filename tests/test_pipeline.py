"""fit -> inspect -> calibrate -> eval -> ask -> batch, end to end through the CLI, on the
real small query log with fake models whose skill differs by task (`skilled_fakes`, in conftest).

"large" is always right; "medium" is right on arithmetic and multiple choice; "small" is
right on arithmetic only. On what they can't do, the fakes answer at random per seed, so
their votes disagree and the quality check has something to find.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from typer.testing import CliRunner

from crecli.cli import app
from crecli.models.fake import FakeBackend
from support.ladder import too_long_for
from support.logs import SMALL_LOG, small_log_prompts, write_sums_log

runner = CliRunner()


def invoke(*args: str, input: str | None = None) -> str:
    result = runner.invoke(app, list(args), input=input)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def test_fit_calibrate_eval_ask_batch(tmp_path: Path, tiny_models_toml: Path, skilled_fakes: dict[str, FakeBackend]) -> None:
    router = tmp_path / "router.cre"
    m = ("--models", str(tiny_models_toml))
    report = json.loads(invoke("fit", str(SMALL_LOG), "-o", str(router), *m, "--truth-field", "meta.source", "--json", "--set-default"))
    assert report["n_records"] == 80 and report["outcomes_run"] == 240
    assert report["truth"]["nmi"] > 0.8  # the clusters follow the task families
    calls = sum(len(b.calls) for b in skilled_fakes.values())

    # A second fit recomputes nothing.
    again = json.loads(invoke("fit", str(SMALL_LOG), "-o", str(router), *m, "--json"))
    assert again["outcomes_run"] == 0 and sum(len(b.calls) for b in skilled_fakes.values()) == calls

    # With 5 queries per task, shrinkage toward each model's log-wide accuracy keeps fit
    # cautious; calibration then moves the clusters a cheaper model answers as well as the
    # large one off the large model.
    cal = json.loads(invoke("calibrate", str(router), *m, "--retain", "0.98", "--folds", "4", "--json"))
    assert cal["held_out"]["accuracy"] >= 0.9 * cal["reference"]["accuracy"]
    assert cal["held_out"]["mean_cost"] < cal["reference"]["mean_cost"]
    assert sum(p["chosen"] for p in cal["frontier"]) == 1  # shown even where beaten held out

    info = json.loads(invoke("inspect", str(router), *m, "--json"))
    models = {c["model"] for c in info["clusters"]}
    assert models <= {"small", "medium", "large"} and models != {"large"}
    # Which cheap model wins a cluster depends on the cluster's size (shrinkage), and UMAP
    # draws task borders a little differently across CPUs (float order in numba): arithmetic
    # came out as one merged cluster on one machine and as four exact ones on another. What
    # holds everywhere: no cluster goes to a model that fails its recorded queries, and the
    # arithmetic clusters, which every model gets right, leave the large model.
    for c in info["clusters"]:
        assert c["stats"][c["model"]]["accuracy"] == 1.0, c
    arithmetic = [c for c in info["clusters"] if all("plus" in e or "times" in e for e in c["examples"])]
    assert arithmetic and all(c["model"] in ("small", "medium") for c in arithmetic)

    ev = json.loads(invoke("eval", str(SMALL_LOG), "--router", str(router), *m, "--plot", str(tmp_path / "p.svg"), "--json"))
    names = [p["name"] for p in ev["points"]]
    assert names[0] == "cascade (this router)" and any(n.startswith("oracle") for n in names)
    assert ev["cost_share"] < 1.0 and ev["retained"] >= 0.9
    assert (tmp_path / "p.svg").read_text().startswith("<svg")
    assert sum(len(b.calls) for b in skilled_fakes.values()) == calls  # eval replays, runs nothing
    # Scored on its own fit log: said, on stderr and in the JSON (nothing said so before).
    assert ev["in_sample"] is True
    assert all(sum(c["started_on"].values()) == c["n"] for c in ev["per_cluster"])
    shown = runner.invoke(app, ["eval", str(SMALL_LOG), "--router", str(router), *m])
    assert "Warning: 80 of 80 queries are in the router's fit or calibration log, so these figures are in sample" in shown.stderr
    # Half the fit log is in sample too: only the whole file was told apart before.
    other = tmp_path / "other.jsonl"
    other.write_text("".join(SMALL_LOG.read_text().splitlines(keepends=True)[:40]))
    half = json.loads(invoke("eval", str(other), "--router", str(router), *m, "--json"))
    assert (half["n_in_fit_log"], half["in_sample"]) == (40, True)

    # The default router set by --set-default serves ask and batch.
    assert invoke("ask", "What is 5 plus 4?\nGive only the final answer, with no explanation.", *m).strip() == "9"
    lines = [l for l in SMALL_LOG.read_text().splitlines()[:6]] + ["{bad json", ""]
    out = runner.invoke(app, ["batch", *m], input="\n".join(lines) + "\n")
    records = [json.loads(l) for l in out.stdout.splitlines()]
    assert len(records) == 8 and "error" in records[6] and "error" in records[7]
    assert out.exit_code == 3  # some lines got error records


def test_plain_text_log_is_clustered_but_not_measured(tmp_path: Path, tiny_models_toml: Path, skilled_fakes: dict[str, FakeBackend]) -> None:
    prompts = small_log_prompts()
    log = tmp_path / "prompts.txt"
    log.write_text("\n".join(prompts) + "\n")
    router = tmp_path / "plain.cre"
    m = ("--models", str(tiny_models_toml))
    report = json.loads(invoke("fit", str(log), "-o", str(router), *m, "--json"))
    assert report["n_labelled"] == 0 and report["outcomes_run"] == 0
    assert not any(b.calls for b in skilled_fakes.values())  # no model ran
    info = json.loads(invoke("inspect", str(router), *m, "--json"))
    assert len(info["clusters"]) == report["n_clusters"] > 1
    assert {c["model"] for c in info["clusters"]} == {"large"} and all(c["stats"] == {} for c in info["clusters"])


def test_fit_counts_correctness_labels_apart_from_outcomes_reused_from_the_store(
    cre: Any, tmp_path: Path, tiny_models_toml: Path, four_fakes: dict[str, FakeBackend]
) -> None:
    # A fresh store said "0 model runs now, 108 reused from the store" of a log of labels.
    log = tmp_path / "mixed.jsonl"
    rows = [{"id": f"r{i}", "prompt": f"What is {i} plus {i}?", "reference": str(2 * i), "match": "numeric"} for i in range(6)]
    rows += [{"id": f"l{i}", "prompt": f"What is {i} times {i}?", "labels": {"small": i % 2 == 0, "medium": True, "large": True}}
             for i in range(6)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = ("--models", tiny_models_toml)
    first = cre("fit", log, "-o", tmp_path / "r.cre", *m, "--json")
    assert first.code == 0, first
    counts = json.loads(first.out)
    assert (counts["outcomes_run"], counts["outcomes_reused"], counts["outcomes_labelled"]) == (18, 0, 18)
    again = cre("fit", log, "-o", tmp_path / "r.cre", *m)
    assert again.code == 0, again
    assert "Outcomes: 0 model runs now, 18 reused from the store, 18 correctness labels from the log;" in again.err
    # With --shots a label stands in every count of examples compared: it was counted in each.
    rows = [{"id": f"r{i}", "prompt": f"What is {i} plus {i}?", "reference": str(2 * i), "match": "numeric"} for i in range(12)]
    rows += [{"id": f"l{i}", "prompt": f"What is {i} times {i}?", "labels": {"small": i % 2 == 0, "medium": True, "large": True}}
             for i in range(12)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for shots in ("0", "0,1"):
        done = cre("fit", log, "-o", tmp_path / "s.cre", *m, "--json", "--shots", shots, "--store", tmp_path / f"{shots}.sqlite")
        assert done.code == 0, done
        assert json.loads(done.out)["outcomes_labelled"] == 36, shots


def test_fit_frees_its_embedder_before_any_ladder_model_runs(
    tmp_path: Path, tiny_models_toml: Path, skilled_fakes: dict[str, FakeBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A llama.cpp embedding model stayed loaded beside every ladder model; `cre fit` loads one at a time.
    from crecli import embed
    from crecli.tfidf import TfidfEmbedder

    events: list[str] = []

    class Spy(TfidfEmbedder):
        def close(self) -> None:
            events.append(f"embedder closed after {sum(len(b.calls) for b in skilled_fakes.values())} model calls")

    made = embed.make_embedder

    def spied(*args: Any, **kwargs: Any) -> TfidfEmbedder:
        embedder = made(*args, **kwargs)
        embedder.__class__ = Spy
        return embedder

    monkeypatch.setattr(embed, "make_embedder", spied)
    invoke("fit", str(SMALL_LOG), "-o", str(tmp_path / "r.cre"), "--models", str(tiny_models_toml))
    assert events == ["embedder closed after 0 model calls"] and sum(len(b.calls) for b in skilled_fakes.values()) > 0


def test_a_router_is_never_written_over_a_file_that_is_not_one(
    tmp_path: Path, tiny_models_toml: Path, skilled_fakes: dict[str, FakeBackend]
) -> None:
    # `-o test.jsonl` replaced a held-out log with the router at the end of the fit.
    held_out = tmp_path / "test.jsonl"
    held_out.write_bytes(SMALL_LOG.read_bytes())
    m = ("--models", str(tiny_models_toml))
    refused = runner.invoke(app, ["fit", str(SMALL_LOG), "-o", str(held_out), *m])
    assert "exists and is not a router file" in str(refused.exception)
    assert held_out.read_bytes() == SMALL_LOG.read_bytes() and not any(b.calls for b in skilled_fakes.values())
    router = tmp_path / "router.cre"
    first = runner.invoke(app, ["fit", str(SMALL_LOG), "-o", str(router), *m])
    again = runner.invoke(app, ["fit", str(SMALL_LOG), "-o", str(router), *m])  # a router may be replaced: refitting
    assert first.exit_code == again.exit_code == 0, (again.output, again.exception)
    # ... and is said to be, before the work, not silently at its end (`-o` defaults to router.cre).
    assert "a router file is there" not in first.stderr
    assert "a router file is there; this fit replaces it" in again.stderr.split("Embedding")[0]
    refused = runner.invoke(app, ["calibrate", str(router), "-o", str(held_out), *m])
    assert "exists and is not a router file" in str(refused.exception)
    assert held_out.read_bytes() == SMALL_LOG.read_bytes()


def test_a_zip_with_a_manifest_that_is_no_routers_is_not_replaced(tmp_path: Path) -> None:
    # Any zip holding a manifest.json (a browser extension, an app package) passed for a router.
    import zipfile

    from crecli import archive
    from crecli.errors import CreError

    extension = tmp_path / "extension.zip"
    with zipfile.ZipFile(extension, "w") as zf:
        zf.writestr("manifest.json", '{"manifest_version": 3, "name": "my extension"}')
        zf.writestr("background.js", "chrome.runtime.onInstalled.addListener(() => {});")
    with pytest.raises(CreError, match="exists and is not a router file"):
        archive.check_replaceable(extension, "-o")
    router = tmp_path / "router.cre"
    archive.write(router, {"schema_version": archive.SCHEMA_VERSION}, {})
    assert archive.check_replaceable(router, "-o")  # a router is: refitting replaces it
    assert not archive.check_replaceable(tmp_path / "new.cre", "-o")


def test_a_row_labelling_models_off_the_ladder_is_named_before_any_model_runs(
    tmp_path: Path, tiny_models_toml: Path, skilled_fakes: dict[str, FakeBackend]
) -> None:
    # Its outcomes went missing, and the fit failed after every model ran, telling the user
    # to run `cre fit` (the command that had just failed).
    log = tmp_path / "log.jsonl"
    log.write_text(SMALL_LOG.read_text() + json.dumps({"id": "old", "prompt": "What is 2 plus 2?",
                                                        "labels": {"qwen-7b": True}}) + "\n")
    refused = runner.invoke(app, ["fit", str(log), "-o", str(tmp_path / "r.cre"), "--models", str(tiny_models_toml)])
    message = str(refused.exception)
    assert "log.jsonl:81: labels qwen-7b but no reference" in message and "not on the ladder" in message, message
    assert not any(b.calls for b in skilled_fakes.values())


def test_a_store_that_is_not_one_is_refused_before_the_log_is_embedded(
    tmp_path: Path, tiny_models_toml: Path, skilled_fakes: dict[str, FakeBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store was first opened after embedding and UMAP: with a llama embedder, minutes of
    # work before the store was refused.
    from crecli import embed

    def no_embedding(*args: Any, **kw: Any) -> None:
        raise AssertionError("embedded before the store was checked")

    monkeypatch.setattr(embed, "make_embedder", no_embedding)
    store = tmp_path / "notes.sqlite"
    store.write_text("my notes, not a database\n" * 100)
    refused = runner.invoke(app, ["fit", str(SMALL_LOG), "-o", str(tmp_path / "r.cre"), "--store", str(store),
                                  "--models", str(tiny_models_toml)])
    assert "cannot open the outcome store: it is no SQLite database" in str(refused.exception), refused.exception


def test_a_bad_embedder_table_is_said_before_the_log_is_read_naming_its_file(
    tmp_path: Path, tiny_models_toml: Path, skilled_fakes: dict[str, FakeBackend]
) -> None:
    # It was said after the log was read ("Embedding 80 prompts..."), naming neither
    # models.toml nor [embedder].
    toml = tmp_path / "bad-embedder.toml"
    toml.write_text(tiny_models_toml.read_text().replace("dims = 16", "dims = 99999"))
    assert "dims = 99999" in toml.read_text()
    missing = tmp_path / "not-read.jsonl"  # never opened: the embedder is checked first
    missing.write_text("{not json\n")
    result = runner.invoke(app, ["fit", str(missing), "-o", str(tmp_path / "r.cre"), "--models", str(toml)])
    assert result.exit_code == 1
    assert f"{toml}: [embedder] tfidf dims must be an integer from 2 to 4096, not 99999" in str(result.exception)


def test_a_log_whose_answers_sit_under_another_name_is_warned_about_with_the_option_to_name_it(
    tmp_path: Path, tiny_models_toml: Path, skilled_fakes: dict[str, FakeBackend]
) -> None:
    # "answer" for "reference": the fit wrote a router that sends everything to the top
    # rung, with one status line that never named --reference-field.
    log = tmp_path / "log.jsonl"
    rows = [json.loads(line) for line in SMALL_LOG.read_text().splitlines()]
    log.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["reference"]}) + "\n" for r in rows))
    done = runner.invoke(app, ["fit", str(log), "-o", str(tmp_path / "r.cre"), "--models", str(tiny_models_toml)])
    assert done.exit_code == 0, done.output
    assert "Warning:" in done.stderr and "field 'reference'" in done.stderr and "--reference-field" in done.stderr
    assert not any(b.calls for b in skilled_fakes.values())


def test_eval_json_is_strict_json_when_costs_are_not_seconds(
    tmp_path: Path, tiny_models_toml: Path, skilled_fakes: dict[str, FakeBackend], bench_speeds: Any
) -> None:
    # Priced in bench-seconds, the model time per output token was NaN: printed "nan ms",
    # and written by --json as a bare NaN, which strict parsers (jq) refuse.
    bench_speeds({"small": (400.0, 40.0), "medium": (200.0, 20.0), "large": (100.0, 10.0)})
    router = tmp_path / "router.cre"
    m = ("--models", str(tiny_models_toml))
    invoke("fit", str(SMALL_LOG), "-o", str(router), *m)

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    ev = json.loads(invoke("eval", str(SMALL_LOG), "--router", str(router), *m, "--json"), parse_constant=refuse)
    assert ev["unit"] == "bench-seconds" and ev["tokens"]["seconds_per_output_token"] is None
    text = invoke("eval", str(SMALL_LOG), "--router", str(router), *m)
    assert "nan" not in text and "output tokens." in text


def test_eval_live_grades_a_query_known_only_by_labels_by_its_label(
    tmp_path: Path, tiny_models_toml: Path, skilled_fakes: dict[str, FakeBackend], bench_speeds: Any
) -> None:
    # With no reference, the live answer had no verdict and was counted wrong: live accuracy
    # 0 beside a replayed 1.0, and an agreement of 0.
    bench_speeds({"small": (400.0, 40.0), "medium": (200.0, 20.0), "large": (100.0, 10.0)})  # labels carry no cost
    router = tmp_path / "router.cre"
    m = ("--models", str(tiny_models_toml))
    invoke("fit", str(SMALL_LOG), "-o", str(router), *m)
    labelled = tmp_path / "labels.jsonl"
    labelled.write_text("".join(json.dumps({"id": f"l{i}", "prompt": p, "labels": {"small": True, "medium": True, "large": True}}) + "\n"
                                for i, p in enumerate(small_log_prompts()[:6])))
    ev = json.loads(invoke("eval", str(labelled), "--router", str(router), *m, "--live", "--json"))
    assert ev["live"]["replay"]["accuracy"] == 1.0 and ev["live"]["accuracy"] == 1.0 and ev["live"]["agreement"] == 1.0


def test_a_query_too_long_for_every_rung_is_left_out_of_fit_calibrate_and_eval_with_a_warning(
    cre: Any, tmp_path: Path, tiny_models_toml: Path, fake_backends: Any
) -> None:
    # One over-long line stopped the fit (and calibrate, eval) with the backend's error, after
    # every model before it had run. Here no rung fits over 1000 words; small does not fit
    # "long", and medium and large do not fit "wide" (a lower rung's context may be the larger).
    log = write_sums_log(tmp_path / "sums.jsonl", 12)
    pad = " Answer with the number alone."
    rows = [{"id": "huge", "prompt": "What is 70 plus 7?" + pad * 250, "reference": "77", "match": "numeric"},
            {"id": "long", "prompt": "What is 80 plus 8?" + pad * 20, "reference": "88", "match": "numeric"},
            {"id": "wide", "prompt": "What is 90 plus 9?" + pad * 120, "reference": "99", "match": "numeric"}]
    with log.open("a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    refused_by = {"small": "80 plus 8", "medium": "90 plus 9", "large": "90 plus 9"}

    def answer(text: str, params: Any) -> str:
        a, b = re.search(r"What is (\d+) plus (\d+)", text).groups()  # type: ignore[union-attr]
        # Small answers "wide" with nothing, so it always climbs to the top rung, which it does not fit.
        return "" if "90 plus 9" in text else str(int(a) + int(b))

    fake_backends({m: too_long_for(answer, lambda prompt, m=m: len(prompt.split()) > 1000 or refused_by[m] in prompt)
                   for m in refused_by})
    m = ("--models", tiny_models_toml)
    router = tmp_path / "r.cre"
    fit = cre("fit", log, "-o", router, *m, "--json")
    assert fit.code == 0, fit
    assert json.loads(fit.out)["n_skipped_too_long"] == 1
    assert (f"Warning: {log}:13: left out: its prompt is too long for every rung's context; shorten it, or raise "
            "`context` in models.toml (large: prompt is") in fit.err
    assert f"{log}:14" not in fit.err and f"{log}:15" not in fit.err  # some rung can answer those
    assert "too long for every rung's context left out" in cre("fit", log, "-o", router, *m).err  # the summary says it

    cal = cre("calibrate", router, *m, "--folds", "2", "--json")
    assert cal.code == 0, cal
    assert (json.loads(cal.out)["n"], json.loads(cal.out)["n_skipped_too_long"]) == (14, 1)
    assert f"{log}:13: left out" in cal.err
    ev = cre("eval", log, "--router", router, *m, "--live", "--json")
    assert ev.code == 0, ev
    report = json.loads(ev.out)
    assert (report["n"], report["n_skipped_too_long"]) == (14, 1)
    # The replay passes a rung a prompt does not fit over, as the live cascade does; and where
    # that is the top rung, both count the query wrong ("wide": `--live` failed on it).
    assert report["live"]["agreement"] == 1.0 and report["live"]["accuracy"] == 13 / 14

    # Nothing left to measure: refused, saying why and what to do.
    every = tmp_path / "every.jsonl"
    every.write_text("".join(json.dumps({"id": f"h{i}", "prompt": f"What is {i} plus {i}?" + pad * 250,
                                         "reference": str(2 * i), "match": "numeric"}) + "\n" for i in range(12)))
    refused = cre("fit", every, "-o", tmp_path / "every.cre", *m)
    assert refused.code == 1
    assert f"Error: {every}: every labelled query is too long for every rung's context" in refused.err
    assert "shorten them, or raise `context` in models.toml" in refused.err
