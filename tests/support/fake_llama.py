"""A fake llama-cpp-python `Llama` for `LlamaBackend.complete`'s answering path, without a model.

Its vocabulary is byte pieces, so an answer's tokens can split a UTF-8 character or a stop
string anywhere. `create_completion` plays a scripted answer through llama-cpp-python
0.3's non-streaming loop (`Llama._create_completion`): the logits processors see the
prompt and the tokens evaluated so far before each token is sampled, so one step late;
an end-of-generation token stops uncounted; a token that ends inside a multi-byte
character defers the stop and length checks; a stop string cuts the text before it. Each
step's scores put the scripted token first (so it is the step's greedy token), and the
stopping criteria are asked as `Llama.generate` asks them: after a token is chosen, before it
is fed, and once more after the loop. It counts what others ask `detokenize` for, which its
own loop does not use. `n_tokens` is the context's after the answer, as there: the prompt
and the answer tokens fed, not a token that ended the answer on a stop string or the cap.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Sequence

BOS, EOS = 1, 2


class FakeLlama:
    def __init__(self, answer: Sequence[bytes | int]) -> None:
        """`answer`: the tokens the model generates, in order, each a byte piece (its id is
        made up) or BOS/EOS; past its end the model generates EOS."""
        self.pieces: dict[int, bytes] = {BOS: b"", EOS: b""}  # control tokens show nothing
        ids: dict[bytes, int] = {}
        self.answer: list[int] = []
        for piece in answer:
            if isinstance(piece, int):
                self.answer.append(piece)
                continue
            if piece not in ids:
                ids[piece] = 1000 + len(ids)
                self.pieces[ids[piece]] = piece
            self.answer.append(ids[piece])
        self.detokenize_calls = 0
        self.detokenized = 0  # tokens others asked `detokenize` to turn into text
        self.n_tokens = 0  # tokens in the context: the prompt, then each answer token fed
        self._ctx = SimpleNamespace(ctx=None)
        self._model = SimpleNamespace(token_cls=lambda: -1, token_sep=lambda: -1,
                                      add_bos_token=lambda: True, add_eos_token=lambda: False)

    def token_bos(self) -> int:
        return BOS

    def token_eos(self) -> int:
        return EOS

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """One token per byte of `text` (ids 100-355: the prompt's, not the answer's)."""
        return [BOS] * add_bos + [100 + b for b in text]

    def _text(self, tokens: Sequence[int]) -> bytes:
        # As llama-cpp-python's LlamaModel.detokenize: the pieces joined, less the leading
        # space of a list that starts with BOS.
        out = b"".join(self.pieces.get(int(t), b"") for t in tokens)
        return out[1:] if len(tokens) and int(tokens[0]) == BOS and out[:1] == b" " else out

    def detokenize(self, tokens: Sequence[int], prev_tokens: Sequence[int] | None = None, special: bool = False) -> bytes:
        self.detokenize_calls += 1
        self.detokenized += len(tokens)
        return self._text(tokens)

    def create_completion(self, prompt: list[int], max_tokens: int = 16, stop: list[str] | None = None,
                          logits_processor: Any = None, stopping_criteria: Any = None, **_: Any) -> dict:
        import numpy as np

        stops = [s.encode("utf-8") for s in stop or []]
        ids = np.zeros(len(prompt) + len(self.answer) + 1, dtype=np.intc)  # the context's input ids
        ids[: len(prompt)] = prompt
        n, completion = len(prompt), []
        text, finish, fix = b"", "length", 0
        scores = np.zeros(max(self.pieces) + 1, dtype=np.single)
        for step in range(len(self.answer) + 1):
            token = self.answer[step] if step < len(self.answer) else EOS
            scores[:] = 0.0
            scores[token] = 1.0  # the step's greedy token is the one scripted
            for processor in logits_processor or []:
                processor(ids[:n], scores)
            # As `Llama.generate` asks its stopping criteria: after sampling, before the
            # token is fed (so before the end-of-generation check), on the tokens fed so far.
            if stopping_criteria is not None and any(c(ids[:n], scores) for c in stopping_criteria):
                text, finish = self._text(completion), "stop"
                break
            if token == EOS:
                text, finish = self._text(completion), "stop"
                break
            completion.append(token)
            whole = self._text(completion)
            for k, char in enumerate(whole[-3:]):
                k = 3 - k
                for num, pattern in ((2, 192), (3, 224), (4, 240)):
                    if num > k and pattern & char == pattern:
                        fix = num - k
            ids[n], n = token, n + 1  # evaluated before the next step samples
            if fix > 0:
                fix -= 1
                continue
            hits = [s for s in stops if s in whole]
            if hits:
                text, finish = whole[: whole.index(hits[0])], "stop"
                n -= 1  # the generator is not resumed: this token is never fed
                break
            if len(completion) >= max_tokens:
                text, finish = whole, "length"
                n -= 1  # nor at the cap
                break
        self.n_tokens = n
        if stopping_criteria is not None and any(c(ids[:n], scores) for c in stopping_criteria):
            text, finish = self._text(completion), "stop"  # asked once more after the loop, as there
        return {"choices": [{"text": text.decode("utf-8", errors="ignore"), "finish_reason": finish}],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(completion)}}
