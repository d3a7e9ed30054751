"""Turning a user's prompt into the text a model expects.

Rendering happens here rather than through each runtime's chat template so that every
backend (llama.cpp in-process, or a remote /v1/completions server) sees the same tokens,
and prompt-prefix caching works across the k samples of the quality check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

# An answered example shown before the prompt: (prompt, answer). `cre fit --shots` takes
# them from a cluster's labelled queries (`RouterFile.shots`).
Shot = tuple[str, str]

SYSTEM = (
    "You are a precise assistant. Reply with only the final answer: a number, a word, "
    "a short phrase, or an option letter such as (B). Do not explain."
)

# Base models have no chat template: a few-shot preamble teaches the answer format.
# The examples cover the answer types crecli grades (numbers, option letters, short text).
FEW_SHOT = """Q: What is 3 plus 4?
A: 7

Q: What is the capital of Italy?
A: Rome

Q: Which of these is a fruit?
(A) stone
(B) apple
(C) chair
A: (B)

Q: What is the opposite of "hot"?
A: cold

{shots}Q: {prompt}
A:"""


def shots_of(exemplars: Sequence[Sequence[str]], n: int) -> tuple[Shot, ...]:
    """The first `n` of a cluster's exemplars ([prompt, answer] pairs) as the shots a model is shown."""
    return tuple((str(q), str(a)) for q, a in exemplars[:n])


@dataclass(frozen=True)
class Rendered:
    text: str
    stop: tuple[str, ...]


def render(prompt_format: str, prompt: str, system: str = SYSTEM, shots: Sequence[Shot] = ()) -> Rendered:
    """`prompt` in `prompt_format`, after the answered examples `shots`.

    The shots come before the prompt and after the fixed head, so every prompt of a cluster
    shares the head and its shots: llama.cpp reuses that prefix between consecutive prompts.
    """
    prompt = prompt.strip()
    if prompt_format == "completion":
        # One line per answer: a base model that is not stopped at the newline writes the
        # next question itself.
        examples = "".join(f"Q: {q.strip()}\nA: {a.strip()}\n\n" for q, a in shots)
        return Rendered(FEW_SHOT.format(shots=examples, prompt=prompt), ("\n",))
    if prompt_format == "chatml":
        turns = "".join(
            f"<|im_start|>user\n{q.strip()}<|im_end|>\n<|im_start|>assistant\n{a.strip()}<|im_end|>\n"
            for q, a in shots
        )
        text = (
            f"<|im_start|>system\n{system}<|im_end|>\n{turns}"
            f"<|im_start|>user\n{prompt}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
        return Rendered(text, ("<|im_end|>", "<|endoftext|>"))
    if prompt_format == "chat":
        # Remote chat servers apply their own template; the openai backend sends messages
        # (`chat_messages`).
        return Rendered(prompt, ())
    raise ValueError(f"unknown prompt format {prompt_format!r}")


def chat_messages(prompt: str, system: str = SYSTEM, shots: Sequence[Shot] = ()) -> list[dict[str, str]]:
    """The "chat" format's messages: the system turn, each shot as a user/assistant pair, the prompt."""
    messages = [{"role": "system", "content": system}]
    for q, a in shots:
        messages += [{"role": "user", "content": q.strip()}, {"role": "assistant", "content": a.strip()}]
    return messages + [{"role": "user", "content": prompt.strip()}]


# Two prompts unlike each other: what their renderings share is the head every prompt in
# that format starts with (the system turn and the start of the user turn, or a base model's
# few-shot preamble). llama.cpp keeps a model's last prompt in its KV cache and reuses the
# longest common prefix, so in steady use the head is processed once per load, not per prompt;
# `cre models bench` counts its tokens (`bench.cached_head_tokens`) and costs leave them out.
HEAD_PROBES = ("What is 2 plus 2?", "(A) yes (B) no")
