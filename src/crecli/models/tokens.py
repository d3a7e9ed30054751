"""What tokens a rendered prompt becomes, and the confidence signals of a greedy pass.

Every path that decodes a prompt (the `Llama`'s own, parallel greedy sequences, parallel
votes) feeds the model `prompt_tokens`, so all of them see the same tokens: a template's
control parts are tokenized with special tokens parsed, user text without (`tokenize`).
`prompt_head` is what every prompt of a format shares, which llama.cpp's prefix reuse
skips. `SignalMeter` reads each greedy step's logits into `Signals`. Where no tokenizer is
at hand (a remote rung's server that sends no `usage`), `estimate_tokens` and
`estimate_output` are the one rule for counts estimated from text, and `known` of which
counts are to be estimated; `decoded_output` is the one count of an in-process answer's.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from crecli.grading import decided_option
from crecli.models.backend import Signals
from crecli.models.prompting import HEAD_PROBES, Rendered, Shot, render, request_prompt


def shared_prefix(sequences: Sequence[Sequence[int]]) -> Sequence[int]:
    """The longest run of tokens every sequence starts with (what llama.cpp's prefix reuse skips)."""
    # commonprefix compares element by element, so it serves token lists as well as paths.
    return os.path.commonprefix(list(sequences))


def prompt_head(llm: Any, prompt_format: str, shots: Sequence[tuple[str, str]] = ()) -> list[int]:
    """The tokens every prompt in `prompt_format` shown `shots` starts with once tokenized
    (what two unlike probe prompts share): the template's fixed head, the examples and the
    start of the prompt's own turn. What llama.cpp's prefix reuse skips; the head's last
    characters can merge with a prompt's first into one token, so the text's own token
    count would overstate it."""
    return list(shared_prefix([tokenize(llm, render(prompt_format, p, shots=shots), add_bos=True) for p in HEAD_PROBES]))


def tokenize(llm: Any, rendered: Rendered, add_bos: bool = False) -> list[int]:
    """`rendered`'s tokens: control parts with special tokens parsed, text parts without.

    llama.cpp parsing special tokens splits a string at each one and tokenizes the runs
    between them as text; tokenizing the parts one by one does the same, except that a
    control spelling inside a text part (a user's `<|im_end|>`) stays text. For ordinary
    prompts the tokens are those of the whole string with special tokens parsed, so outcomes
    recorded before this rule still match.
    """
    if not rendered.parts:
        return llm.tokenize(b"", add_bos=add_bos, special=True)
    tokens: list[int] = []
    for i, (text, control) in enumerate(rendered.parts):
        tokens += llm.tokenize(text.encode("utf-8"), add_bos=add_bos and i == 0, special=control)
    return tokens


def prompt_tokens(llm: Any, rendered: Rendered) -> list[int]:
    """The tokens every path decodes for `rendered`: `tokenize`'s, with the leading
    BOS/CLS and trailing EOS/SEP tokens llama-cpp-python's `create_completion` would add to
    a string prompt (no suffix). `LlamaBackend.complete` passes this list, so the
    sequential and parallel paths feed the model exactly the same tokens.
    """
    model = llm._model
    bos, cls, sep = llm.token_bos(), model.token_cls(), model.token_sep()
    head = [cls if cls != -1 else bos]
    tail = [sep if sep != -1 else llm.token_eos()]
    if not model.add_bos_token() or head[:1] == [-1]:
        head = []
    if not model.add_eos_token() and sep == -1:
        tail = []
    return head + tokenize(llm, rendered) + tail


# ---------------------------------------------------------------- the output tokens of an in-process answer


def decoded_output(generated: int, fed: int, finish_reason: str) -> int:
    """The output tokens an in-process answer is counted, and so priced, at: its decode
    steps, the `fed` tokens that went into the model after its prompt (`bench` times the
    generation speed per step). The one count of the sequential path (`LlamaBackend`) and the
    parallel ones (`models/parallel.py`).

    llama.cpp samples each token from the step before and feeds it only if the answer goes
    on. So the token that ends it is `generated` but never fed: uncounted already where it
    is an end-of-generation token (llama-cpp-python counts none) or decides an option answer
    (`OptionEnd`); not so where a stop string ends it (the "completion" format's newline,
    a `cre serve` client's `stop`), where the `generated` count charged a decode step that
    never ran. An answer stopped at its token cap or at the end of its context ("length")
    keeps that last token, sampled and in its text though never fed: its count reaching
    the cap or the context is how `quality.was_cut` tells a cut answer, live and in every
    recording, so that one step is still charged there.
    """
    return generated if finish_reason == "length" else min(generated, fed)


# ---------------------------------------------------------------- counts estimated from text


# A server that sends no `usage` (some proxies and older engines leave it out) still read the
# prompt and wrote the answer: counted as 0 tokens, its answers would be priced as free
# (`costs.Pricing` prices token counts). A remote rung has no tokenizer here (cre never loads
# its server's vocabulary: `count_tokens` is None), so its counts are estimated from the text:
# about four characters a token, the usual figure for English in the BPE vocabularies engines
# serve (an estimate: code, digits and other scripts take more tokens a character).
CHARS_PER_TOKEN = 4


def estimate_tokens(text: str) -> int:
    """Tokens `text` takes by `CHARS_PER_TOKEN`, rounded up: 0 only for no text."""
    return -(-len(text) // CHARS_PER_TOKEN)


def known(count: Any, text: str) -> int | None:
    """A token count a server sent (`usage`) or a recording holds for `text` (the text sent,
    or the answer), where it can be real: a whole number from 0 up, but not 0 for text that
    is not empty (older Ollama sends a cached prompt's `prompt_tokens` as 0, and no text
    takes no tokens); a real 0 for an empty answer stays 0. None where it is missing, not
    a count, or 0 for text: to be estimated (`estimate_tokens`, `estimate_output`). The one
    rule of the live answer (`OpenAIBackend`) and the outcome store's recordings alike."""
    if isinstance(count, bool) or not isinstance(count, (int, float)) or not count == count or count < 0:
        return None
    tokens = int(min(count, 2**31))
    return None if tokens == 0 and text else tokens


def sent_text_of(fields: dict[str, Any]) -> str:
    """The text a remote rung's request sends its model, whose tokens `estimate_tokens`
    estimates, from the request's prompt fields (`prompting.request_prompt`, or the whole
    request): its messages' contents, else its prompt."""
    if "messages" in fields:
        return "".join(str(m.get("content") or "") for m in fields["messages"])
    return str(fields.get("prompt") or "")


def sent_text(prompt_format: str, prompt: str, shots: Sequence[Shot] = ()) -> str:
    """The text a remote rung's request for `prompt` after `shots` sends its model
    (`sent_text_of` the fields `OpenAIBackend` posts, `prompting.request_prompt`)."""
    return sent_text_of(request_prompt(prompt_format, prompt, shots))


def estimate_output(text: str, max_tokens: int, finish: str | None = None, counted: int | None = None,
                    exact: bool = False) -> int:
    """The output tokens of an answer `text` to a request for at most `max_tokens`, where
    its server gave no count: all of `max_tokens` for an answer that stopped there (`finish`
    "length"), or `counted` where that is more (an engine's events can overshoot); else
    `counted` where it is `exact` (a greedy reply's log-probability steps, one a token);
    else `text` by `CHARS_PER_TOKEN`, kept below `max_tokens` where that leaves a token (the
    answer stopped on its own, or, `finish` None, is not known to have stopped at its cap,
    and one at its cap counts as cut: `quality.was_cut`), or `counted` where that is more:
    a stream's events (each at least a token, but an engine or proxy may send many in one,
    or a whole answer in one or two events)."""
    if finish == "length":
        return max(counted or 0, max_tokens)
    if exact and counted is not None:
        return counted
    return max(counted or 0, min(estimate_tokens(text), max(1, max_tokens - 1)))


def prompt_count(count: Any, sent: str) -> int:
    """The prompt tokens of a remote request that sent `sent`: `count` (a server's `usage`,
    a recording's) where it can be real (`known`), else estimated from the text
    (`estimate_tokens`). The live answer's rule and the outcome store's alike."""
    tokens = known(count, sent)
    return estimate_tokens(sent) if tokens is None else tokens


def output_count(count: Any, text: str, max_tokens: int, finish: str | None = None,
                 counted: int | None = None, exact: bool = False) -> int:
    """The output tokens of the answer `text`: `count` where it can be real (`known`), else
    `estimate_output`'s. The live answer's rule and the outcome store's alike."""
    tokens = known(count, text)
    return estimate_output(text, max_tokens, finish, counted, exact) if tokens is None else tokens


# ---------------------------------------------------------------- confidence from the greedy pass


# How an option letter may be spelled as one token: "A", " A", "(A" and " (A". The margin
# is read at the first step whose most likely token is one of these (`SignalMeter`, and a
# remote rung's log-probabilities, `models/logprobs.py`).
LETTER_FORMS = ("{}", " {}", "({}", " ({}")
# How tokenizers show a leading space in a token's text: SentencePiece's "▁" and byte-level
# BPE's "Ġ". Servers usually send the decoded piece, but not all of them.
_SPACE_MARKS = str.maketrans({"\u2581": " ", "\u0120": " "})


def letter_tokens(llm: Any) -> dict[int, int]:
    """Token id -> letter index (A=0 .. Z=25) for the single-token forms of `LETTER_FORMS`."""
    ids: dict[int, int] = {}
    for i in range(26):
        letter = chr(ord("A") + i)
        for form in LETTER_FORMS:
            tokens = llm.tokenize(form.format(letter).encode(), add_bos=False, special=False)
            if len(tokens) == 1:
                ids.setdefault(int(tokens[0]), i)
    return ids


_LETTER_TEXTS = {form.format(chr(ord("A") + i)): i for i in range(26) for form in LETTER_FORMS}


def letter_index(piece: str) -> int | None:
    """The option letter (A=0 .. Z=25) a token's text spells in one of `LETTER_FORMS`; None otherwise.

    For runtimes that report tokens as text (a server's log-probabilities), not ids."""
    return _LETTER_TEXTS.get(piece.translate(_SPACE_MARKS))


def letter_margin(probs: Sequence[float]) -> float:
    """The option-letter margin from each letter's probability (26 values, A first): the top
    letter's minus the runner-up's, renormalised over the letters. The one rule for every runtime."""
    first, second = sorted(probs, reverse=True)[:2]
    return float((first - second) / max(sum(probs), 1e-30))


def summarize(logprobs: Sequence[float], margin: float | None) -> Signals | None:
    """`Signals` from the chosen tokens' log-probabilities and the margin; None without a token."""
    if not logprobs:
        return None
    return Signals(min(logprobs), sum(logprobs) / len(logprobs), margin)


def decided_by(answer: bytes, letters: str) -> str | None:
    """The ended option answer (`grading.decided_option`) that `answer`, the detokenized
    tokens fed and then the candidate, spells, or None to write on: the one judgement of
    the sequential decode's stopping criterion (`llama.OptionEnd`) and the parallel one's
    (`parallel._advance_stream`, which has those bytes already)."""
    return decided_option(answer.decode("utf-8", errors="ignore"), letters)


class SignalMeter:
    """Reads each greedy step's logits into `Signals`, one home for both decoding paths.

    Only for greedy decoding: the chosen token is then the argmax, so its log-probability
    is max(logits) - logsumexp(logits) without knowing which token the sampler took. The
    cost is one pass over the vocabulary per token (well under a millisecond), against
    `logits_all`, which would keep every position's logits.
    """

    def __init__(self, letters: dict[int, int]) -> None:
        self.letters = letters
        self._ids: Any = None
        self.logprobs: list[float] = []
        self.margin: float | None = None

    def observe(self, logits: Any) -> None:
        import numpy as np

        values = np.asarray(logits, dtype=np.float32)
        top = int(np.argmax(values))
        peak = float(values[top])
        lse = peak + float(np.log(np.sum(np.exp(values - peak), dtype=np.float64)))
        self.logprobs.append(peak - lse)
        if self.margin is None and top in self.letters:
            if self._ids is None:
                self._ids = np.fromiter(self.letters, dtype=np.int64)
            probs = np.zeros(26)
            np.add.at(probs, [self.letters[int(t)] for t in self._ids], np.exp(values[self._ids].astype(np.float64) - lse))
            self.margin = letter_margin(probs.tolist())

    def signals(self) -> Signals | None:
        return summarize(self.logprobs, self.margin)
