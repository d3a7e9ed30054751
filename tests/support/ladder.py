"""The fake three-rung ladder (small, medium, large) and fake answers scripted per prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from crecli.models.backend import GenParams
from crecli.models.fake import FakeBackend
from crecli.quality import vote_seed

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
