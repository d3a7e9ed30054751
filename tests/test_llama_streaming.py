"""Streaming an in-process llama.cpp answer (`LlamaBackend.generate_streaming`), on a fake
`Llama` whose tokens split UTF-8 characters and stop strings (`support.fake_llama`)."""

from __future__ import annotations

from typing import Sequence

import pytest

from crecli.config import ModelSpec
from crecli.models.backend import GenParams, StopSafeEmitter
from crecli.models.llama import LlamaBackend
from support.fake_llama import BOS, FakeLlama

pytest.importorskip("llama_cpp")  # `complete` builds llama-cpp-python's processor list


def stream(answer: Sequence[bytes | int], params: GenParams) -> tuple[list[str], str, FakeLlama]:
    """The pieces `generate_streaming` hands on, the answer's text, and the fake it ran on."""
    backend = LlamaBackend(ModelSpec(name="fake", context=8192))
    backend._llm = fake = FakeLlama(answer)
    pieces: list[str] = []
    gen = backend.generate_streaming("Say it.", params, pieces.append)
    return pieces, gen.text, fake


def streamed_before(answer: Sequence[bytes | int], params: GenParams) -> tuple[list[str], str]:
    """What the stream was before it went incremental: at each step the whole answer so far
    detokenized and decoded, and what that added on top of the text of the step before
    handed to the emitter; the rest at the end."""
    backend = LlamaBackend(ModelSpec(name="fake", context=8192))
    rendered, params = backend.prepare("Say it.", params)
    llm = FakeLlama(answer)
    n_prompt = len(llm.tokenize(rendered.text.encode(), add_bos=True))
    pieces: list[str] = []
    emitter, fed = StopSafeEmitter(params.stop, pieces.append), [""]

    def observe(ids: Sequence[int], scores: object) -> object:
        if len(ids) > n_prompt:
            text = llm.detokenize(list(ids[n_prompt:])).decode("utf-8", "ignore")
            if text.startswith(fed[0]):
                emitter.add(text[len(fed[0]):])
                fed[0] = text
        return scores

    out = llm.create_completion(llm.tokenize(rendered.text.encode(), add_bos=True), max_tokens=params.max_tokens,
                                stop=list(params.stop), logits_processor=[observe])
    final = out["choices"][0]["text"]
    emitter.finish(final)
    return pieces, final


def in_bytes(text: str) -> list[bytes]:
    """`text` as one token per byte: every character past ASCII split across tokens."""
    return [bytes([b]) for b in text.encode("utf-8")]


CASES = {
    "characters split across tokens": (in_bytes("héllo wörld: 😀 costs 5 € — “done”"), GenParams(max_tokens=100)),
    "pieces that end and start mid-character": (
        [b"caf\xc3", b"\xa9 \xf0\x9f", b"\x98", b"\x80!", b" \xe2\x82\xac", b"5"], GenParams(max_tokens=100)),
    "bytes that never make a character": (
        [b"a", b"\x80", b"b\xe2\x82", b"c", b"\xff", b"d\xf0", b"\x9f\x98", b"e"], GenParams(max_tokens=100)),
    "a stop string across tokens, after a near miss": (
        in_bytes("one\nQ two\nQ: three"), GenParams(max_tokens=100, stop=("\nQ:",))),
    "a stop string with a character split across tokens": (
        in_bytes("price: 5 €, «END» not this"), GenParams(max_tokens=100, stop=("«END»",))),
    "max_tokens inside what may start a stop": (
        in_bytes("ab\nQ:cd"), GenParams(max_tokens=4, stop=("\nQ:",))),
    "max_tokens inside a character": (in_bytes("abc€def"), GenParams(max_tokens=4)),
    "an answer that starts with BOS and a space": ([BOS, b" ", b"x", b" y"], GenParams(max_tokens=100)),
    "an answer that starts with BOS, then text": ([BOS, b" hi", BOS, b" there"], GenParams(max_tokens=100)),
}


@pytest.mark.parametrize("answer, params", list(CASES.values()), ids=list(CASES))
def test_the_stream_and_the_answer_are_as_they_were(answer: list[bytes | int], params: GenParams) -> None:
    pieces, text, _ = stream(answer, params)
    before, text_before = streamed_before(answer, params)
    assert text == text_before
    assert "".join(pieces) == text
    assert pieces == before


def test_the_stream_hands_text_on_as_it_comes_not_at_the_end() -> None:
    pieces, text, _ = stream(in_bytes("héllo wörld 😀 one\nQ two\nQ: never"), GenParams(max_tokens=100, stop=("\nQ:",)))
    assert text == "héllo wörld 😀 one\nQ two"
    assert "".join(pieces) == text and len(pieces) > 10
    assert "\ufffd" not in text


def test_a_long_answer_is_detokenized_token_by_token_not_whole_at_every_step() -> None:
    # Detokenizing the whole answer at every step cost n^2/2 token lookups: two million here.
    n = 2000
    answer = [b" w", b"\xc3", b"\xa9", b"\xe2\x82", b"\xac"] * (n // 5)
    pieces, text, fake = stream(answer, GenParams(max_tokens=n))
    assert text == " w\u00e9\u20ac" * (n // 5)
    assert "".join(pieces) == text
    assert fake.detokenized <= 2 * n, f"{fake.detokenized} tokens detokenized for an answer of {n}"
