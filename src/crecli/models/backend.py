"""The one small interface every model runtime implements.

A backend has one abstract method, `complete`, on text already rendered in the model's
prompt format; `generate`, `sample_many` and `generate_many` build on it, and `embed` is
for runtimes that can embed.

The defaults call `generate` one prompt and one vote at a time. That is cheap on llama.cpp
because llama-cpp-python keeps the last evaluated tokens and processes only what follows
the longest common prefix, so a prompt's votes, and a cluster's prompts with their shared
head and answered examples, pay for what they share once. The llama.cpp backend also
overrides `sample_many`, to decode one prompt's sampled votes as parallel sequences over
its cached KV cells, and `generate_many`, to decode many prompts' greedy answers as
parallel sequences (`cre batch --parallel`); `parallel_memory` says what that costs in
memory. The OpenAI-compatible backend overrides `generate` for servers that take chat
messages.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Sequence

from crecli.errors import BackendError, CreError, PromptTooLong
from crecli.models.prompting import Rendered, Shot, render

if TYPE_CHECKING:
    from crecli.config import ModelSpec


# llama.cpp's own sampling defaults, which the quality check's sampled votes keep too.
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40


@dataclass(frozen=True)
class GenParams:
    """How one generation is drawn: its token cap, sampling (temperature 0 is greedy), seed,
    stop strings and the answered examples shown before the prompt."""

    max_tokens: int = 48
    temperature: float = 0.0
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Answered examples rendered before the prompt (`prompting.render`). They ride with the
    # parameters so that every path to a model (votes, parallel waves, remote servers)
    # renders a prompt the same way.
    shots: tuple[Shot, ...] = ()
    # A greedy answer that opens with "(" and one of these letters ends there, written "(B)"
    # (`grading.decided_option`): its option is decided, and the decode steps for ")" and
    # the end of the turn would change nothing graded. "" for every other answer. The
    # llama.cpp backend honours it; a remote server decodes its own way and writes on.
    option_letters: str = ""
    # Whether a greedy pass should report `Signals`: off where nothing reads them (a rung
    # whose check is not the deferral one), so a remote rung's server is not asked for
    # log-probabilities it would compute for nothing. It changes no token of the answer,
    # so it is not part of what makes two votes' parameters the same.
    signals: bool = field(default=True, compare=False)

    @property
    def ends_at(self) -> str:
        """The option letters this generation ends at: `option_letters` on a greedy pass,
        "" on a sampled one (its token is drawn, not the argmax an ending is judged by)."""
        return self.option_letters if self.temperature == 0.0 else ""


@dataclass(frozen=True)
class Signals:
    """What a greedy pass says about its own answer, read from logits it computes anyway.

    `min_logprob` and `mean_logprob` are over the chosen tokens (each the argmax, so its
    log-probability is the logit minus the log-sum-exp of the step). `margin` is taken at
    the first step whose chosen token is an option letter (A-Z, with or without a leading
    space): the top letter's probability minus the runner-up's, both renormalised over the
    letters; None when no step chose a letter.
    """

    min_logprob: float
    mean_logprob: float
    margin: float | None = None

    def to_list(self) -> list[float | None]:
        return [self.min_logprob, self.mean_logprob, self.margin]

    @classmethod
    def from_list(cls, data: object) -> "Signals | None":
        """The inverse of `to_list`; None for anything that is not three numbers (or null margin)."""
        if not isinstance(data, list) or len(data) != 3:
            return None
        lo, mean, margin = data
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, mean)):
            return None
        if margin is not None and (not isinstance(margin, (int, float)) or isinstance(margin, bool)):
            return None
        return cls(float(lo), float(mean), None if margin is None else float(margin))


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first place any stop string starts, and whether it was cut."""
    ends = [i for s in stop if (i := text.find(s)) >= 0]
    return (text[: min(ends)], True) if ends else (text, False)


def held_back(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """What of `text`, generated so far, is sure to stay in the answer: cut at the first stop
    string (True when cut), and without a tail that may be the start of one."""
    cut, stopped = cut_at_stop(text, stops)
    if stopped:
        return cut, True
    # No tail longer than the text: a stop's prefix longer than what was generated cannot end it.
    held = max((k for s in stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - held], False


class StopSafeEmitter:
    """Hands `emit` the text generated, as it grows, never past what `stops` may yet cut
    (`held_back`): what a runtime streams is then always a prefix of the answer.

    Each piece costs its own length and the stops', not the answer's so far: only the tail
    held back (shorter than the longest stop) can hold the start of a stop string, so it is
    all that is scanned again. A stream's every token otherwise cost time in proportion to
    the whole answer (on `cre serve`'s event loop, for a remote rung)."""

    def __init__(self, stops: Sequence[str], emit: Callable[[str], None]) -> None:
        self.stops, self.emit = tuple(stops), emit
        self.done = False
        self._held = ""  # generated, not sent: a tail that may be the start of a stop string
        self._sent: list[str] = []  # the pieces handed to `emit`

    @property
    def sent(self) -> str:
        """The text handed to `emit` so far."""
        if len(self._sent) > 1:
            self._sent = ["".join(self._sent)]
        return self._sent[0] if self._sent else ""

    def add(self, piece: str) -> None:
        """`piece`: the text generated since the last call."""
        if self.done or not piece:
            return
        text = self._held + piece
        safe, self.done = held_back(text, self.stops)
        self._held = "" if self.done else text[len(safe):]
        if safe:
            self._out(safe)

    def finish(self, final: str) -> None:
        """`final`: the answer's whole text, as the runtime returned it (cut at `stops` here
        too, for a runtime that did not)."""
        self._rest(cut_at_stop(final, self.stops)[0])
        self.done = True

    def _out(self, safe: str) -> None:
        """Hand on `safe`, text sure to stay in the answer (a subclass may hold some back)."""
        self._emit(safe)

    def _emit(self, piece: str) -> None:
        self._sent.append(piece)
        self.emit(piece)

    def _rest(self, final: str) -> None:
        """Send what of `final`, the answer's whole text, is not sent yet."""
        sent = self.sent
        if len(final) > len(sent) and final.startswith(sent):
            self._emit(final[len(sent):])


def context_room(n_prompt: int, n_ctx: int, model: str) -> int:
    """The tokens an answer has left in `model`'s context of `n_ctx` after a prompt of
    `n_prompt`; PromptTooLong where none is (the prompt fills it). The one rule of whether a
    prompt fits: the llama.cpp backend's before it answers (`LlamaBackend._fit_max_tokens`,
    and each sequence of `cre batch --parallel`), and `outcomes.collect`'s for a recorded
    answer after `context` was lowered (its prompt too long, or its answer past the room
    left: run again)."""
    room = n_ctx - n_prompt
    if room <= 0:
        raise PromptTooLong(
            f"prompt is {n_prompt} tokens, which fills {model!r}'s context of {n_ctx}; "
            "shorten it or raise `context` in models.toml"
        )
    return room


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    output_tokens: int
    seconds: float
    finish_reason: str = "stop"
    signals: Signals | None = None  # greedy passes of runtimes that expose logits only


class Backend(abc.ABC):
    # Seconds spent loading the model's weights (a runtime that loads none, as a remote rung,
    # keeps 0): a cost of the run, not of any answer (`ModelPool.load_seconds`).
    load_seconds: float = 0.0

    def __init__(self, spec: "ModelSpec") -> None:
        self.spec = spec

    @abc.abstractmethod
    def complete(self, rendered: Rendered, params: GenParams) -> Generation:
        """Continue `rendered` (a prompt already in the model's prompt format).

        Only its control parts may become special tokens (`Rendered.parts`): user text and
        answered examples are text, whatever they spell."""

    def prepare(self, prompt: str, params: GenParams) -> tuple[Rendered, GenParams]:
        """`prompt` in the model's prompt format, and `params` with the format's stop strings added."""
        rendered = render(self.spec.prompt_format, prompt, shots=params.shots)
        return rendered, replace(params, stop=tuple(dict.fromkeys((*params.stop, *rendered.stop))))

    def generate(self, prompt: str, params: GenParams = GenParams()) -> Generation:
        return self.complete(*self.prepare(prompt, params))

    def generate_streaming(self, prompt: str, params: GenParams, emit: Callable[[str], None]) -> Generation:
        """`generate`, handing the answer's text to `emit` as it is generated: pieces that join
        into `Generation.text`. This default hands it over whole at the end; a remote rung
        passes its server's stream through."""
        gen = self.generate(prompt, params)
        if gen.text:
            emit(gen.text)
        return gen

    def count_tokens(self, rendered: Rendered) -> int | None:
        """Prompt tokens that `rendered` (a prompt in the model's prompt format) takes, as
        `complete` would count them; None where the runtime cannot tell without running."""
        return None

    def count_text_tokens(self, text: str) -> int | None:
        """Tokens `text` takes as plain text in this model's vocabulary (an answer, say);
        None where `count_tokens` cannot tell."""
        whole, empty = self.count_tokens(Rendered(text, ())), self.count_tokens(Rendered("", ()))
        return None if whole is None or empty is None else max(0, whole - empty)

    def text_tokens(self, text: str) -> Sequence[int] | None:
        """`text`'s tokens as plain text in this model's vocabulary, special tokens as text;
        None where the runtime cannot tell without running (what two prompts share in it:
        `costs.TokenCounts`)."""
        return None

    def shot_tokens(self, prompt: str, params: GenParams, prompt_tokens: int) -> int:
        """Of `prompt_tokens`, the prompt tokens a generation of `prompt` with `params.shots`
        reported, the answered examples' share: those less the tokens without them; 0
        without examples, for a model that does not keep them (`ModelSpec.keeps_examples`),
        or where `count_tokens` cannot tell."""
        if not params.shots or not self.spec.keeps_examples:
            return 0
        without = self.count_tokens(self.prepare(prompt, replace(params, shots=()))[0])
        return 0 if without is None else max(0, prompt_tokens - without)

    def generate_many(
        self, prompts: Sequence[str], params: Sequence[GenParams], parallel: int = 1
    ) -> list[Generation | CreError]:
        """One generation per prompt, in order; an entry is the error that prompt alone raised.

        `parallel` is how many prompts a runtime may decode at once; this default decodes
        them one after another with `generate`, so its answers, token counts and seconds are
        exactly those of `generate`.
        """
        out: list[Generation | CreError] = []
        for prompt, p in zip(prompts, params, strict=True):
            try:
                out.append(self.generate(prompt, p))
            except CreError as exc:
                out.append(exc)
        return out

    def parallel_memory(self, parallel: int) -> int:
        """Bytes that decoding `parallel` sequences at once adds to this model's memory (0: nothing)."""
        return 0

    def cache_memory(self) -> int:
        """Bytes of caches this model holds now beside its context (0: none), such as
        snapshots of answered examples' KV cells; they grow while it answers."""
        return 0

    def sample(self, prompt: str, params: GenParams, seeds: Sequence[int]) -> list[Generation]:
        """One sample of `prompt` per seed (see `sample_many`)."""
        return self.sample_many(prompt, [replace(params, seed=seed) for seed in seeds])

    def sample_many(self, prompt: str, params: Sequence[GenParams]) -> list[Generation]:
        """One generation of `prompt` per entry of `params` (the quality check's votes), in order.

        This default draws them back to back: consecutive calls with the same prompt let
        llama.cpp reuse the prompt's KV cache, so only the first pays for the prompt. The
        llama.cpp backend decodes them as parallel sequences over the shared prompt instead.
        """
        return [self.generate(prompt, p) for p in params]

    def refusal(self) -> str | None:
        """Why this backend's model will not be loaded now, known without trying (a load its
        runtime refused, not tried again yet); None when nothing stands against it."""
        return None

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        raise BackendError(f"model {self.spec.name!r} ({self.spec.backend} backend) cannot embed")

    def close(self) -> None:
        """Free the model's memory. Safe to call twice."""
