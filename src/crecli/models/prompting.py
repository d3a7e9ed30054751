"""Turning a user's prompt into the text a model expects.

Rendering happens here rather than through each runtime's chat template so that every
backend (llama.cpp in-process, or a remote /v1/completions server) sees the same tokens,
and prompt-prefix caching works across the k samples of the quality check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

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


# A piece of rendered text and whether it is the format's own control markup. Only the
# template writes control pieces; the prompt, the system turn and answered examples are
# always text (`control` False), which the llama.cpp backend tokenizes without parsing
# special tokens, so `<|im_end|>` typed by a user, or hidden in a router file's example,
# stays six ordinary tokens and can never open or close a chat turn.
Part = tuple[str, bool]


@dataclass(frozen=True)
class Rendered:
    """A prompt in a model's format: the text, its stop strings, and the text as `parts`."""

    text: str
    stop: tuple[str, ...]
    parts: tuple[Part, ...] = ()

    def __post_init__(self) -> None:
        if not self.parts:
            # Plain text (a test, or a caller with no template): all of it is user text.
            object.__setattr__(self, "parts", ((self.text, False),) if self.text else ())
        elif "".join(text for text, _ in self.parts) != self.text:
            raise ValueError("a rendered prompt's parts must spell its text")

    @classmethod
    def of(cls, parts: Sequence[Part], stop: tuple[str, ...]) -> "Rendered":
        """From parts in order; neighbouring parts of the same kind are joined, so text is
        tokenized in the same runs as one string split only at control markup."""
        merged: list[Part] = []
        for text, control in parts:
            if not text:
                continue
            if merged and merged[-1][1] == control:
                merged[-1] = (merged[-1][0] + text, control)
            else:
                merged.append((text, control))
        return cls("".join(text for text, _ in merged), stop, tuple(merged))

    def escaped(self) -> str:
        """The text with control-like markers in its text parts defused (`defuse`), for a
        runtime that parses special tokens in whatever text it is sent (a remote server)."""
        return "".join(text if control else defuse(text) for text, control in self.parts)


# Strings that chat templates use as control tokens: ChatML and Qwen's `<|...|>`, Llama 3's
# `<|start_header_id|>`, DeepSeek's full-width `<｜User｜>` and `<｜end▁of▁sentence｜>`,
# Gemma's `<start_of_turn>`/`<end_of_turn>`, Mistral's `[INST]`, `[SYSTEM_PROMPT]` and
# tool markers, and the usual BOS/EOS spellings. A remote server tokenizes what it is sent
# with special tokens parsed, so these are defused in user text sent to one
# (`Rendered.escaped`, `chat_messages`), and `cre inspect` flags router-file examples that
# contain them.
CONTROL_MARKER = re.compile(
    r"<\|[^<>|\s]{1,64}\|>|<\uff5c[^<>\uff5c\s]{1,64}\uff5c>|<(?:start_of_turn|end_of_turn|bos|eos|pad|unk|s|/s)>"
    r"|\[/?(?:INST|SYSTEM_PROMPT|TOOL_CALLS|AVAILABLE_TOOLS|TOOL_RESULTS|TOOL_CONTENT)\]",
    re.IGNORECASE,
)
# Inserted after a marker's first character: it splits the marker into ordinary tokens, and
# a reader sees the same text.
_DEFUSER = "\u200b"


def control_markers(text: str) -> list[str]:
    """The control-token spellings `text` contains (empty for ordinary text)."""
    return CONTROL_MARKER.findall(text)


def defuse(text: str) -> str:
    """`text` with every control-token spelling broken by a zero-width space after its first
    character, so no tokenizer that parses special tokens can read it as one.

    Until nothing is left to break: one pass breaks only the outermost spelling of a nested
    one, and `<|[INST]|>` left `[INST]` whole inside `<\u200b|[INST]|>`. Each pass breaks
    what it matched without making a new marker, and a marker holds at most one other (a
    `<|...|>` cannot hold `<` or `|`), so this ends after two or three passes."""
    while True:
        broken = CONTROL_MARKER.sub(lambda m: m.group(0)[0] + _DEFUSER + m.group(0)[1:], text)
        if broken == text:
            return text
        text = broken


def render(prompt_format: str, prompt: str, system: str = SYSTEM, shots: Sequence[Shot] = ()) -> Rendered:
    """`prompt` in `prompt_format`, after the answered examples `shots`.

    The shots come before the prompt and after the fixed head, so every prompt of a cluster
    shares the head and its shots: llama.cpp reuses that prefix between consecutive prompts.
    Only the template's own markup is a control part (`Rendered.parts`).
    """
    prompt = prompt.strip()
    if prompt_format == "completion":
        # One line per answer: a base model that is not stopped at the newline writes the
        # next question itself. A base model's preamble has no control markup at all.
        examples = "".join(f"Q: {q.strip()}\nA: {a.strip()}\n\n" for q, a in shots)
        return Rendered.of([(FEW_SHOT.format(shots=examples, prompt=prompt), False)], ("\n",))
    if prompt_format == "chatml":
        start, end = ("<|im_start|>", True), ("<|im_end|>", True)
        parts: list[Part] = [start, (f"system\n{system}", False), end, ("\n", False)]
        for q, a in shots:
            parts += [start, (f"user\n{q.strip()}", False), end, ("\n", False),
                      start, (f"assistant\n{a.strip()}", False), end, ("\n", False)]
        parts += [start, (f"user\n{prompt}", False), end, ("\n", False), start, ("assistant\n", False)]
        return Rendered.of(parts, ("<|im_end|>", "<|endoftext|>"))
    if prompt_format == "chat":
        # Remote chat servers apply their own template; the openai backend sends messages
        # (`chat_messages`).
        return Rendered.of([(prompt, False)], ())
    raise ValueError(f"unknown prompt format {prompt_format!r}")


def stops_in_text(prompt_format: str) -> bool:
    """Whether an answer in `prompt_format` can end at a stop string the model writes as text
    (the "completion" format's newline), not only at its template's control tokens (chatml's
    `<|im_end|>`), which a model of that template samples as its end-of-generation token and
    which detokenize to no text. Where it can, the answer's last token is sampled but never
    fed (`tokens.decoded_output`)."""
    return any(not CONTROL_MARKER.fullmatch(stop) for stop in render(prompt_format, "").stop)


def chat_messages(prompt: str, system: str = SYSTEM, shots: Sequence[Shot] = ()) -> list[dict[str, str]]:
    """The "chat" format's messages: the system turn, each shot as a user/assistant pair, the prompt.

    The server applies its own template and tokenizes the result with special tokens
    parsed, so control-token spellings in the text are defused (`defuse`)."""
    messages = [{"role": "system", "content": defuse(system)}]
    for q, a in shots:
        messages += [{"role": "user", "content": defuse(q.strip())}, {"role": "assistant", "content": defuse(a.strip())}]
    return messages + [{"role": "user", "content": defuse(prompt.strip())}]


def completion_prompt(rendered: Rendered) -> dict[str, Any]:
    """A completion request's prompt field: `rendered` with the control spellings in its text
    defused (`Rendered.escaped`), since the server parses special tokens in the text it is sent."""
    return {"prompt": rendered.escaped()}


def request_prompt(prompt_format: str, prompt: str, shots: Sequence[Shot] = ()) -> dict[str, Any]:
    """The fields of a remote rung's request that carry `prompt` after `shots`: the "chat"
    format's `messages` (`chat_messages`: the server applies its own template), else the
    prompt rendered in `prompt_format` (`completion_prompt`). The one home of what
    `OpenAIBackend` posts for a prompt (`_request`) and what the outcome store estimates a recording's prompt tokens
    from (`tokens.sent_text`)."""
    if prompt_format == "chat":
        return {"messages": chat_messages(prompt, shots=shots)}
    return completion_prompt(render(prompt_format, prompt, shots=shots))


# Two prompts unlike each other: what their renderings share is the head every prompt in
# that format starts with (the system turn and the start of the user turn, or a base model's
# few-shot preamble). llama.cpp keeps a model's last prompt in its KV cache and reuses the
# longest common prefix, so in steady use the head is processed once per load, not per prompt;
# `cre models bench` counts its tokens (`bench.cached_head_tokens`) and costs leave them out.
HEAD_PROBES = ("What is 2 plus 2?", "(A) yes (B) no")
