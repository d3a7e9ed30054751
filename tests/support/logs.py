"""The small example query log (80 labelled queries of several tasks), and logs of sums."""

from __future__ import annotations

import json
from pathlib import Path

SMALL_LOG = Path(__file__).resolve().parents[2] / "examples" / "querylog-small.jsonl"


def small_log_answers() -> dict[str, tuple[str, str]]:
    """{prompt: (task, first reference)} of the small log."""
    out = {}
    for line in SMALL_LOG.read_text().splitlines():
        row = json.loads(line)
        ref = row["reference"][0] if isinstance(row["reference"], list) else row["reference"]
        out[row["prompt"].strip()] = (row["meta"]["source"], ref)
    return out


def small_log_prompts() -> list[str]:
    """The small log's prompts, one line each: a plain-text log, which `cre fit` clusters
    without running a model."""
    return [json.loads(line)["prompt"].replace("\n", " ") for line in SMALL_LOG.read_text().splitlines()]


def write_sums_log(path: Path, count: int, offset: int = 0) -> Path:
    """Write `count` labelled sums as JSON lines to `path`: q{i} asks "What is i plus i + offset?".
    cre reads them as labelled JSONL only where the name ends .jsonl (or .json, .ndjson)."""
    rows = [{"id": f"q{i}", "prompt": f"What is {i} plus {i + offset}?", "reference": str(2 * i + offset), "match": "numeric"}
            for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
