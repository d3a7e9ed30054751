"""The fake three-rung ladder (small, medium, large), fake answers scripted per prompt, and
the sums ladder: ten sums the fakes answer, walked live for comparing with their replay."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Container

from crecli import config
from crecli.errors import PromptTooLong
from crecli.escalate import Cascade
from crecli.models.backend import GenParams, Signals
from crecli.models.fake import FakeBackend
from crecli.quality import DeferralCheck, QualityCheck, vote_seed
from crecli.querylog import Record
from crecli.route import RouteDecision
from crecli.routerfile import SCHEMA_VERSION, FitRecord, LadderEntry, RouterFile

LADDER = ["small", "medium", "large"]

# The ladder's models.toml (the `tiny_models_toml` fixture): no model file exists, so only
# fake backends can answer.
TINY_TOML = """
schema = 1
ladder = ["small", "medium", "large"]

[embedder]
kind = "tfidf"
dims = 16

[models.small]
path = "/nonexistent/small.gguf"
prompt_format = "completion"
[models.medium]
path = "/nonexistent/medium.gguf"
[models.large]
path = "/nonexistent/large.gguf"
"""


def ready_ladder(folder: Path, missing: tuple[str, ...] = ()) -> Path:
    """The fake ladder's models.toml, with a GGUF-headed file for each rung but `missing`, so
    that /health finds them ready (the fakes never read them)."""
    text = TINY_TOML
    for name in LADDER:
        if name not in missing:
            (folder / f"{name}.gguf").write_bytes(b"GGUF" + bytes(28))
            text = text.replace(f"/nonexistent/{name}.gguf", str(folder / f"{name}.gguf"))
    (folder / "models.toml").write_text(text)
    return folder / "models.toml"


def user_prompt(text: str) -> str:
    """The user's prompt inside a rendered prompt (chatml or the few-shot completion format)."""
    if "<|im_start|>user\n" in text:
        return text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    return text.rsplit("Q: ", 1)[1].rsplit("\nA:", 1)[0]


def scripted(votes: dict[str, list[str]], log: list[tuple[str, str, GenParams]] | None = None,
             model: str = "", default: str = "I don't know") -> Callable[[str, GenParams], str]:
    """An answerer returning votes[prompt][i] for vote i (recovered from its seed): vote 0 is greedy."""

    def answer(text: str, params: GenParams) -> str:
        prompt = user_prompt(text)
        if log is not None:
            log.append((model, prompt, params))
        options = votes.get(prompt)
        if not options:
            return default
        index = 0 if not params.seed else next(i for i in range(1, 64) if vote_seed(prompt, i) == params.seed)
        return options[index % len(options)]

    return answer


def install(fake_backends: Callable[..., dict[str, FakeBackend]], table: dict[str, dict[str, list[str]]],
            log: list[tuple[str, str, GenParams]] | None = None) -> dict[str, FakeBackend]:
    """Script every rung through the `fake_backends` fixture: table[model][prompt] are its votes."""
    return fake_backends({m: scripted(table.get(m, {}), log, m) for m in LADDER})


# ---------------------------------------------------------------- the sums ladder
# Ten sums that the fake rungs get right on some prompts and wrong (or empty) on others, each
# walked from a fixed start, for the tests that compare a live walk with its replay.

SUMS = [f"What is {a} plus {b}?" for a, b in [(1, 2), (3, 4), (5, 5), (7, 1), (2, 9), (6, 6), (8, 3), (4, 4), (9, 9), (0, 5)]]
STARTS = ["small", "small", "medium", "small", "large", "small", "medium", "small", "small", "medium"]


def sum_answer(model: str) -> Callable[[str, GenParams], str]:
    """`model`'s fake answerer for SUMS: right on some, noisy on others; sampled votes vary with their seed."""
    def answer(text: str, params: GenParams) -> str:
        prompt = next(p for p in SUMS if p in text)
        a, b = (int(w) for w in prompt.removeprefix("What is ").removesuffix("?").split(" plus "))
        right = (a + b) % {"small": 3, "medium": 2, "large": 1}[model] != 1 or model == "large"
        if params.temperature == 0.0:
            return str(a + b) if right else ("" if (a * b) % 4 == 0 else str(a + b + 1))
        return str(a + b + random.Random(f"{model}|{prompt}|{params.seed}").choice([0, 0, 1]))
    return answer


def too_long_for(answer: Callable[[str, GenParams], str], prompts: Container[str] | Callable[[str], bool]
                 ) -> Callable[[str, GenParams], str]:
    """`answer`, refusing each prompt of `prompts` (or each one it holds true of) as one that
    does not fit the model's context, with the error llama.cpp's backend raises then
    (`LlamaBackend._fit_max_tokens`)."""
    def refusing(text: str, params: GenParams) -> str:
        prompt = user_prompt(text)
        if prompts(prompt) if callable(prompts) else prompt in prompts:
            raise PromptTooLong(f"prompt is {len(text.split())} tokens, which fills the model's context; "
                                "shorten it or raise `context` in models.toml")
        return answer(text, params)
    return refusing


def sum_signals(text: str, params: GenParams, answer: str) -> Signals:
    """The fake log-probabilities of a sum's answer: the longer the answer, the less sure."""
    return Signals(-0.1 - 0.3 * len(answer), -0.05 * len(answer), None)


def sum_records() -> list[Record]:
    """SUMS as labelled records q0..q9, each with its right total."""
    return [Record(id=f"q{i}", prompt=p, reference=[str(eval(p[8:-1].replace("plus", "+")))], match="numeric")
            for i, p in enumerate(SUMS)]


def bare_router(quality: QualityCheck, thresholds: dict[str, float], deferral: DeferralCheck | None) -> RouterFile:
    """A router of LADDER with no embedder and no clusters: only its checks and thresholds matter."""
    return RouterFile(
        schema_version=SCHEMA_VERSION, ladder=[LadderEntry(m, None, None) for m in LADDER], embedder=None,  # type: ignore[arg-type]
        assigner=None, clusters=[], fallback_model="large", budget={"kind": "retain", "value": 0.98},  # type: ignore[arg-type]
        quality=quality, thresholds=thresholds, fit=FitRecord(), deferral=deferral,
    )


def walk_live(router: RouterFile, settings: config.ModelConfig, records: list[Record],
              starts: list[str] = STARTS) -> list[Any]:
    """Each record walked up the ladder live from its start in `starts`; their traces."""
    traces = []
    with Cascade(router, settings) as cascade:
        for record, start in zip(records, starts):
            decision = RouteDecision(-1, start, 0.0, "test", 0.0)
            pending = cascade.begin(record.prompt, record.match, record.reference, id=record.id, decision=decision)
            while not cascade.advance(pending):
                pass
            traces.append(pending.trace)
    return traces
