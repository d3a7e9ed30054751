"""A deterministic backend for tests: answers come from a table or a function."""

from __future__ import annotations

import hashlib
import re
import zlib
from typing import TYPE_CHECKING, Callable, Sequence

from crecli.grading import decided_option
from crecli.models.backend import Backend, Generation, GenParams, Signals
from crecli.models.prompting import Rendered

if TYPE_CHECKING:
    from crecli.config import ModelSpec

Answerer = Callable[[str, GenParams], str]
# (rendered text, params, answer) -> what a greedy pass would report about the answer
SignalMaker = Callable[[str, GenParams, str], "Signals | None"]
# An answer's first word (a token here), which alone may decide its option
# (`GenParams.option_letters`): "(B" or "(B)", not "(Bob".
_OPENING = re.compile(r"(\s*\S*)")


class FakeBackend(Backend):
    """`answers` maps a raw user prompt to its answer, or is a function of (text, params).

    Seconds are simulated from token counts so cost accounting can be tested exactly:
    `seconds_per_token` per prompt or output token. `signals`, when given, makes greedy
    generations carry `Signals`, as the llama.cpp backend's do.
    """

    def __init__(
        self,
        spec: "ModelSpec",
        answers: dict[str, str] | Answerer | None = None,
        seconds_per_token: float = 0.001,
        dims: int = 8,
        signals: SignalMaker | None = None,
    ) -> None:
        super().__init__(spec)
        self.signals = signals
        self.answers = answers or {}
        self.seconds_per_token = seconds_per_token
        self.dims = dims
        self.calls: list[tuple[str, GenParams]] = []

    def complete(self, rendered: Rendered, params: GenParams) -> Generation:
        text = rendered.text
        self.calls.append((text, params))
        if callable(self.answers):
            answer = self.answers(text, params)
        else:
            answer = next((a for p, a in self.answers.items() if p in text), "I don't know")
        prompt_tokens = self.count_tokens(rendered)
        output_tokens = min(params.max_tokens, max(1, len(answer.split())))
        if params.ends_at:
            # As the llama.cpp backend ends a greedy answer at its option letter (`OptionEnd`),
            # the deciding token unfed: a word is a token here, so no decode step at all.
            decided = decided_option(_OPENING.match(answer).group(1), params.ends_at)  # type: ignore[union-attr]
            if decided is not None:
                answer, output_tokens = decided, 0
        window = self.spec.context_window
        if window is not None:
            # As the llama.cpp backend holds an answer to the room the prompt leaves in its
            # context (`LlamaBackend._fit_max_tokens`), below its cap after a long prompt.
            output_tokens = min(output_tokens, max(0, window - prompt_tokens))
        return Generation(
            text=answer,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            seconds=(prompt_tokens + output_tokens) * self.seconds_per_token,
            signals=self.signals(text, params, answer) if self.signals and params.temperature == 0.0 and params.signals
            else None,
        )

    def count_tokens(self, rendered: Rendered) -> int:
        return max(1, len(rendered.text.split()))

    def count_text_tokens(self, text: str) -> int:
        # As `complete` counts an answer's output tokens (before its `max_tokens` cap).
        return max(1, len(text.split()))

    def text_tokens(self, text: str) -> list[int]:
        # A word a token, as `count_text_tokens` counts them.
        return [zlib.crc32(word.encode()) for word in text.split()]

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        out = []
        for t in texts:
            digest = hashlib.sha256(t.encode()).digest()
            out.append([b / 255.0 for b in digest[: self.dims]])
        return out
