"""An in-process answer's output tokens are its decode steps (`tokens.decoded_output`).

llama.cpp samples each token from the step before and feeds it only if the answer goes on.
An answer that ended on a stop string (the "completion" format's newline, a `cre serve`
client's `stop`) was counted with the token that held the stop, sampled but never fed, so
bench-seconds charged it a decode step that never ran; llama-cpp-python's own count
(`usage.completion_tokens`) and the parallel path's (`len(stream.out)`) both held it. An
end-of-generation token was never counted, and an answer at its token cap keeps its count at
the cap, which is how `quality.was_cut` tells it was cut.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pytest

from crecli import config, grading
from crecli.config import ModelSpec
from crecli.models.backend import Generation, GenParams
from crecli.models.tokens import decoded_output
from crecli.outcomes import OutcomeStore, Vote, collect, prompt_sha256, settings_key
from crecli.quality import QualityCheck, was_cut
from crecli.querylog import Record
from support.fake_llama import EOS, FakeLlama

# (the model's tokens, GenParams, text, output tokens, finish reason)
CASES = {
    "an end-of-generation token, never counted": ([b" 1", b"2", EOS], GenParams(max_tokens=16, stop=("\n",)), " 12", 2, "stop"),
    "a stop string in its own token": ([b" 1", b"2", b"\n", b"Q"], GenParams(max_tokens=16, stop=("\n",)), " 12", 2, "stop"),
    "a stop string ending a token's text": ([b" 1", b"2\n", b"Q"], GenParams(max_tokens=16, stop=("\n",)), " 12", 1, "stop"),
    "a stop string across tokens": ([b"a", b"\nQ", b":", b"b"], GenParams(max_tokens=16, stop=("\nQ:",)), "a", 2, "stop"),
    "the token cap, counted in full": ([b"a", b"b", b"c", b"d", b"e"], GenParams(max_tokens=4), "abcd", 4, "length"),
    "a stop string in the cap's token": ([b"a", b"b", b"c", b"\n"], GenParams(max_tokens=4, stop=("\n",)), "abc", 3, "stop"),
}


def _sequential(answer: Sequence[bytes | int], params: GenParams) -> Generation:
    from crecli.models.llama import LlamaBackend

    pytest.importorskip("llama_cpp")
    backend = LlamaBackend(ModelSpec(name="fake", context=8192))
    backend._llm = FakeLlama(answer)
    return backend.generate("Say it.", params)


def _parallel(answer: Sequence[bytes | int], params: GenParams, monkeypatch: pytest.MonkeyPatch) -> Generation:
    """One sequence of the parallel paths' loop (`ParallelGreedy.run`, `ParallelVotes._run`)
    without llama.cpp: each step decodes the sequence's `feed` (its cells, `n_past`, grow by
    it) and takes the token sampled from it (`_take`), until the answer ends."""
    import llama_cpp

    from crecli.models import parallel

    monkeypatch.setattr(llama_cpp, "llama_vocab_is_eog", lambda vocab, token: token == EOS)
    llm = FakeLlama(answer)
    prompt = llm.tokenize(b"Say it.", add_bos=True)
    stream = parallel._Stream(0, prompt, params.max_tokens, [s.encode() for s in params.stop], feed=list(prompt))
    for token in [*llm.answer, EOS]:
        stream.n_past += len(stream.feed)
        done = parallel._take(llm, None, stream, token, 8192)
        if done is not None:
            text, reason = done
            return Generation(text.decode(), len(prompt), parallel._output_tokens(stream, reason), 0.0, reason)
    raise AssertionError("the answer never ended")


@pytest.mark.parametrize("answer, params, text, tokens, finish", list(CASES.values()), ids=list(CASES))
def test_an_answer_counts_its_decode_steps_on_either_path(
    answer: list[bytes | int], params: GenParams, text: str, tokens: int, finish: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for gen in (_sequential(answer, params), _parallel(answer, params, monkeypatch)):
        assert (gen.text, gen.output_tokens, gen.finish_reason) == (text, tokens, finish)
        # Cut (`was_cut`) only where the cap stopped it, whatever the stop string did.
        assert was_cut(gen.output_tokens, params.max_tokens) == (finish == "length")


def test_the_one_count_keeps_a_capped_answers_last_token_and_drops_a_stopped_ones() -> None:
    assert decoded_output(5, 4, "stop") == 4  # a stop string's token, never fed
    assert decoded_output(5, 5, "stop") == 5  # an end-of-generation token: not generated, not fed
    assert decoded_output(16, 15, "length") == 16  # at the cap: what `was_cut` reads
    assert decoded_output(3, 7, "stop") == 3  # never more than the answer's own tokens


# ---------------------------------------------------------------- recordings made before


def test_recordings_counted_with_a_stop_strings_token_are_run_again_where_answers_end_on_one(
    tiny_models_toml: Path, tmp_path: Path, fake_backends, capsys: pytest.CaptureFixture[str]
) -> None:
    # "small" answers in the "completion" format, ending at its newline: a recording made before
    # holds one output token more than a fresh answer, and replayed costs would charge it where
    # `cre batch` does not. "medium" (chatml) ends at its end-of-generation token: kept.
    settings = config.load(tiny_models_toml)
    record = Record(id="q", prompt="What is 2 plus 2?", reference=["4"], match="numeric")
    quality, max_tokens = QualityCheck(k=1), grading.max_tokens_for("numeric")
    created = fake_backends({"small": lambda text, p: "4", "medium": lambda text, p: "4"})
    with OutcomeStore(tmp_path / "outcomes.sqlite") as store:
        for name in ("small", "medium"):
            store.put(prompt_sha256(record.prompt), name, "", settings_key(quality, max_tokens), 9, [Vote("4", 2, 0.5)])
        outcomes = collect([record], settings, store, quality, models=["small", "medium"])
    assert len(created["small"].calls) == 1 and "medium" not in created
    said = capsys.readouterr().err
    assert "small: 0 queries to run, 0 greedy votes to re-run for their signals, 1 again to count their output " \
           "tokens by decode steps, 0 already recorded or labelled" in said
    assert outcomes[("q", "small")].settings_key == settings_key(quality, max_tokens, text_stops=True)
    assert outcomes[("q", "small")].votes[0].output_tokens == 1
    assert outcomes[("q", "medium")].votes[0].output_tokens == 2  # as recorded
