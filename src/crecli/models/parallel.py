"""Parallel sequences of one llama.cpp context on a loaded `Llama`'s weights.

`ParallelGreedy` decodes the greedy answers of many prompts at once (`cre batch
--parallel`): continuous scheduling, with the prompts' shared prefix decoded once.
`ParallelVotes` decodes one prompt's sampled votes together over its KV cells, each with
the sampler chain llama-cpp-python builds for the same settings (`sampler_chain`).
`Handoff` copies one sequence's KV cells into the `Llama`'s own cache, so that a prompt
decoded here, or a cluster's answered examples, is not processed again. Every answer
stops by llama-cpp-python's own rules (`_advance_stream`), and every prompt is fed as
`tokens.prompt_tokens`, so the sequential and parallel paths decode the same tokens.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

from crecli import cancel
from crecli.errors import BackendError, CreError, PromptTooLong
from crecli.models.backend import Generation, GenParams, context_room
from crecli.models.prompting import Rendered
from crecli.models.runtime import abort_on_cancel
from crecli.models.tokens import SignalMeter, decided_by, decoded_output, prompt_tokens, shared_prefix


@dataclass
class _Stream:
    """One answer in flight in a parallel context: a prompt's greedy answer, or one sampled vote."""

    index: int  # position in the caller's list
    prompt: list[int]
    max_tokens: int
    stop: list[bytes]
    seq: int = -1
    n_past: int = 0
    feed: list[int] = field(default_factory=list)  # tokens to decode in the next step
    out: list[int] = field(default_factory=list)
    multibyte_fix: int = 0
    seconds: float = 0.0
    meter: SignalMeter | None = None
    letters: str = ""  # a greedy answer's option letters (`GenParams.option_letters`)


def _advance_stream(llm: Any, vocab: Any, stream: _Stream, token: int) -> tuple[bytes, str] | None:
    """Take one greedy token; (text, finish_reason) once the answer is complete.

    The same stop rules, in the same order, as llama-cpp-python 0.3's `_create_completion`
    (non-streaming): an end-of-generation token stops without being counted; a stop string
    cuts the text before it; the token cap gives "length"; a token that ends inside a
    multi-byte character defers the checks, as there. After the end-of-generation check (which
    decides nothing: that token shows no text) and before the others, as `OptionEnd` stops
    `create_completion` before its token is fed: a token that decides an option answer ends
    it, uncounted.
    """
    import llama_cpp

    if llama_cpp.llama_vocab_is_eog(vocab, token):
        return llm.detokenize(stream.out, prev_tokens=stream.prompt), "stop"
    stream.out.append(token)
    text = llm.detokenize(stream.out, prev_tokens=stream.prompt)
    decided = decided_by(text, stream.letters) if stream.letters else None
    if decided is not None:
        stream.out.pop()  # never fed: the answer took no decode step for it
        return decided.encode("utf-8"), "stop"
    for k, char in enumerate(text[-3:]):
        k = 3 - k
        for num, pattern in ((2, 192), (3, 224), (4, 240)):
            if num > k and pattern & char == pattern:
                stream.multibyte_fix = num - k
    if stream.multibyte_fix > 0:
        stream.multibyte_fix -= 1
        return None
    hits = [s for s in stream.stop if s in text]
    if hits:
        return text[: text.index(hits[0])], "stop"
    if len(stream.out) >= stream.max_tokens:
        return text, "length"
    return None


def _take(llm: Any, vocab: Any, stream: _Stream, token: int, n_ctx: int) -> tuple[bytes, str] | None:
    """`_advance_stream`, and an answer whose sequence has filled its `n_ctx` cells ends
    there ("length"), where the sequential path would fail; else `token` is fed next."""
    done = _advance_stream(llm, vocab, stream, token)
    if done is None and stream.n_past >= n_ctx:
        done = (llm.detokenize(stream.out, prev_tokens=stream.prompt), "length")
    if done is None:
        stream.feed = [token]
    return done


def _output_tokens(stream: _Stream, reason: str) -> int:
    """A finished answer's output tokens (`tokens.decoded_output`): its sequence's cells hold
    its prompt and the answer tokens fed after it (`n_past`), not the token that ended it."""
    return decoded_output(len(stream.out), stream.n_past - len(stream.prompt), reason)


def _put(batch: Any, n: int, token: int, pos: int, seq: int, logits: bool) -> None:
    """Entry `n` of a llama.cpp batch: one token of one sequence."""
    batch.token[n] = token
    batch.pos[n] = pos
    batch.n_seq_id[n] = 1
    batch.seq_id[n][0] = seq
    batch.logits[n] = logits


@dataclass
class Handoff:
    """One sequence's KV cells, copied out of the parallel context for the `Llama`'s own.

    After a wave, a prompt's sampled votes drawn one at a time run on the single-sequence
    `Llama`, whose cache holds whatever it decoded last; without this, each of them would
    process its prompt again (measured on qwen-0.5b: the votes' time tripled and the wave was
    a net loss). Restoring the cells (`llama_state_seq_set_data`) and the token list makes
    the `Llama` find the prompt cached, as if it had just decoded the greedy answer itself.
    A wave of two or more votes runs on `ParallelVotes`, which loads the same cells into its
    shared sequence (`ParallelVotes._load_prompt`).
    """

    tokens: list[int]  # what the cells hold: the prompt, then the answer tokens decoded
    data: Any  # ctypes byte buffer from llama_state_seq_get_data

    @classmethod
    def save(cls, ctx: Any, seq: int, tokens: list[int]) -> "Handoff":
        import ctypes

        import llama_cpp

        size = llama_cpp.llama_state_seq_get_size(ctx, seq)
        data = (ctypes.c_uint8 * size)()
        llama_cpp.llama_state_seq_get_data(ctx, data, size, seq)
        return cls(tokens, data)

    def restore(self, llm: Any) -> bool:
        """Put the cells into `llm`'s (sequence 0) and tell it which tokens they hold."""
        import llama_cpp

        memory = llama_cpp.llama_get_memory(llm._ctx.ctx)
        llama_cpp.llama_memory_clear(memory, True)
        llm.n_tokens = 0
        if not llama_cpp.llama_state_seq_set_data(llm._ctx.ctx, self.data, len(self.data), 0):
            return False
        llm.input_ids[: len(self.tokens)] = self.tokens
        llm.n_tokens = len(self.tokens)
        # The logits in `llm` are not this prompt's: make it decode the last prompt token again.
        llm._requires_eval = True
        return True


def _sequences_context(llm: Any, n_seq: int, n_ctx: int, n_batch: int, n_threads: int, what: str) -> Any:
    """A llama.cpp context on `llm`'s loaded weights for `n_seq` sequences and one more,
    `root`, which holds a prefix they share, in one unified KV cache of `n_ctx` cells;
    otherwise the `Llama`'s own context parameters."""
    import llama_cpp

    params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
    params.n_ctx = n_ctx
    params.n_batch = n_batch
    params.n_seq_max = n_seq + 1
    params.kv_unified = True
    params.n_threads = params.n_threads_batch = n_threads
    # llama.cpp's log goes where the `Llama`'s load sent it (`runtime.route_llama_log`).
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    if not ctx:
        raise BackendError(f"llama.cpp could not create a context for {what}")
    return ctx


class ParallelGreedy:
    """Greedy answers of many prompts, decoded as parallel sequences of one llama.cpp context.

    The context is built on the loaded model of a `Llama` (weights are shared, not copied)
    with `n_seq` sequences (plus `root`, see `_decode_shared_prefix`) in one unified KV
    cache of `n_seq * n_ctx_seq` cells, and otherwise the `Llama`'s own context parameters.
    Unified, because llama.cpp refuses to move a sequence's cells between caches of
    different stream counts (`n_stream mismatch`), and `Handoff` moves them into the
    `Llama`'s single-stream cache; each sequence is still held to `n_ctx_seq` tokens, as
    the `Llama` holds one prompt.

    Scheduling is continuous: a sequence that finishes frees its slot and the next prompt's
    tokens enter the very next `llama_decode`, alongside the other sequences' next tokens.
    Each sequence reads its own logits row (`llama_get_logits_ith` at the index of its last
    token in the batch); the greedy token is the first argmax, as llama.cpp's greedy
    sampler picks it. Each step's wall time is split across the sequences in it in
    proportion to the tokens each fed, so a prompt's `seconds` carry its prompt processing.
    """

    def __init__(self, llm: Any, n_seq: int, n_ctx_seq: int, n_threads: int, name: str) -> None:
        import llama_cpp

        self.llm = llm
        self.name = name  # the model's, for a prompt that does not fit its context
        self.n_seq = n_seq
        self.n_ctx_seq = n_ctx_seq
        # A step may hold several whole prompts; llama.cpp splits it into n_ubatch pieces.
        self.ctx = _sequences_context(
            llm, n_seq, n_seq * n_ctx_seq, n_seq * n_ctx_seq, n_threads,
            f"{n_seq} parallel sequences of {n_ctx_seq} tokens; lower --parallel",
        )
        self.vocab = llm._model.vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.root = n_seq
        self.capacity = n_seq * n_ctx_seq
        self.batch = llama_cpp.llama_batch_init(self.capacity, 0, 1)

    def _decode_shared_prefix(self, streams: list[_Stream], memory: Any) -> int:
        """Decode the prompts' common leading tokens once, into sequence `root`; their length.

        Every prompt of one model starts with the same template (the chat system prompt, the
        few-shot preamble), which the sequential path also decodes once: llama-cpp-python
        keeps it from the previous prompt. Each sequence then starts as a copy of `root`
        (`llama_memory_seq_cp`, which in a unified cache only tags the cells) and decodes
        the rest of its prompt. Its time is shared equally by the prompts.
        """
        import llama_cpp

        if len(streams) < 2:
            return 0
        first = streams[0].prompt
        # At least one token of every prompt is left to decode, for its logits.
        length = min(len(shared_prefix([s.prompt for s in streams])), min(len(s.prompt) for s in streams) - 1)
        if length <= 0:
            return 0
        start = time.perf_counter()
        batch = self.batch
        for i, token in enumerate(first[:length]):
            _put(batch, i, token, i, self.root, False)
        batch.n_tokens = length
        rc = llama_cpp.llama_decode(self.ctx, batch)
        if rc != 0:
            raise BackendError(f"llama.cpp could not decode the prompts' shared prefix (llama_decode returned {rc})")
        share = (time.perf_counter() - start) / len(streams)
        for s in streams:
            s.seconds += share
        return length

    def close(self) -> None:
        import llama_cpp

        if self.ctx is not None:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None

    def run(
        self,
        prompts: Sequence[Rendered],
        params: Sequence[GenParams],
        keep: dict[str, "Handoff"] | None = None,
        letters: dict[int, int] | None = None,
    ) -> list[Generation | CreError]:
        """Greedy completions of `prompts` (rendered); an entry is an error for a prompt
        that does not fit the per-sequence context (as `LlamaBackend.complete` raises it).

        With `keep`, each finished sequence's KV cells are copied out into it, by rendered
        text, before its slot is reused (see `Handoff`)."""
        import numpy as np
        import llama_cpp

        llm = self.llm
        results: list[Generation | CreError] = [BackendError("not decoded")] * len(prompts)
        queue: deque[_Stream] = deque()
        for i, (rendered, p) in enumerate(zip(prompts, params)):
            tokens = prompt_tokens(llm, rendered)
            try:  # each sequence holds n_ctx_seq cells: the one rule of a prompt that fits
                room = context_room(len(tokens), self.n_ctx_seq, self.name)
            except PromptTooLong as exc:
                results[i] = exc
                continue
            stops = [s.encode("utf-8") for s in p.stop]
            queue.append(_Stream(i, tokens, min(p.max_tokens, room) if p.max_tokens > 0 else room, stops,
                                 meter=SignalMeter(letters) if letters is not None else None,
                                 letters=p.ends_at))
        memory = llama_cpp.llama_get_memory(self.ctx)
        llama_cpp.llama_memory_clear(memory, True)
        shared = self._decode_shared_prefix(list(queue), memory)
        free = list(range(self.n_seq - 1, -1, -1))
        active: list[_Stream] = []
        batch = self.batch
        while queue or active:
            start = time.perf_counter()
            while queue and free:
                stream = queue.popleft()
                stream.seq = free.pop()
                if shared:
                    llama_cpp.llama_memory_seq_cp(memory, self.root, stream.seq, -1, -1)
                stream.n_past = shared
                stream.feed = stream.prompt[shared:]
                active.append(stream)
            n = 0
            rows: list[int] = []
            for stream in active:
                for j, token in enumerate(stream.feed):
                    _put(batch, n, token, stream.n_past + j, stream.seq, j == len(stream.feed) - 1)
                    n += 1
                rows.append(n - 1)
            batch.n_tokens = n
            rc = llama_cpp.llama_decode(self.ctx, batch)
            if rc != 0:
                raise BackendError(f"llama.cpp could not decode {len(active)} parallel sequences (llama_decode returned {rc})")
            fed = [len(stream.feed) for stream in active]
            still: list[_Stream] = []
            finished: list[tuple[_Stream, bytes, str]] = []
            for stream, row in zip(active, rows):
                stream.n_past += len(stream.feed)
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,))
                if stream.meter is not None:
                    stream.meter.observe(logits)
                done = _take(llm, self.vocab, stream, int(np.argmax(logits)), self.n_ctx_seq)
                if done is None:
                    still.append(stream)
                else:
                    finished.append((stream, *done))
            # Each step's wall time is shared by the sequences in it, in proportion to the
            # tokens each fed: a prompt's first step carries its prompt processing.
            elapsed = time.perf_counter() - start
            total = sum(fed)
            for stream, k in zip(active, fed):
                stream.seconds += elapsed * k / total
            for stream, text, reason in finished:
                if keep is not None:
                    keep[prompts[stream.index].text] = Handoff.save(self.ctx, stream.seq, (stream.prompt + stream.out)[: stream.n_past])
                llama_cpp.llama_memory_seq_rm(memory, stream.seq, -1, -1)
                free.append(stream.seq)
                results[stream.index] = Generation(
                    text=text.decode("utf-8", errors="ignore"),
                    prompt_tokens=len(stream.prompt),
                    output_tokens=_output_tokens(stream, reason),
                    seconds=stream.seconds,
                    finish_reason=reason,
                    signals=stream.meter.signals() if stream.meter is not None else None,
                )
            active = still
        return results


# Sequences the votes context holds at first: the 4 sampled votes of a k=5 check.
VOTE_SEQUENCES = 4


def sampler_chain(params: GenParams) -> Any:
    """The sampler chain llama-cpp-python's `create_completion` builds for `complete`'s
    settings at temperature > 0: top-k, typical (1.0: a no-op), top-p, min-p 0, temperature,
    and a draw seeded with `params.seed`. (Its repeat-penalty sampler, at 1.0, changes nothing.)"""
    import llama_cpp

    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    for sampler in (
        llama_cpp.llama_sampler_init_top_k(params.top_k),
        llama_cpp.llama_sampler_init_typical(1.0, 1),
        llama_cpp.llama_sampler_init_top_p(params.top_p, 1),
        llama_cpp.llama_sampler_init_min_p(0.0, 1),
        llama_cpp.llama_sampler_init_temp(params.temperature),
        llama_cpp.llama_sampler_init_dist(params.seed if params.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED),
    ):
        llama_cpp.llama_sampler_chain_add(chain, sampler)
    return chain


class ParallelVotes:
    """The sampled votes of one prompt, decoded as parallel sequences over its KV cells.

    The prompt's cells come from the `Llama`, which holds them after the greedy vote
    (`llama_state_seq_get_data`/`set_data` into sequence `root`, the reverse of `Handoff`),
    or from the prompt's `Handoff` after a parallel greedy wave; only when neither holds them
    are they decoded here. Each vote's sequence starts as a copy of
    `root` up to the prompt's last token, which every sequence then decodes for its own
    first logits, in one batch; from there each step decodes one token per live sequence.
    Each sequence samples with its own chain (`sampler_chain`). A step's wall time is split
    across its sequences as `ParallelGreedy` splits it.
    """

    def __init__(self, llm: Any, n_seq: int, n_ctx: int, n_threads: int) -> None:
        import llama_cpp

        self.llm = llm
        self.n_seq = n_seq
        self.n_ctx = n_ctx
        # The prompt once, plus every sequence's answer: at most the Llama's own context in all.
        self.ctx = _sequences_context(llm, n_seq, 2 * n_ctx, max(n_ctx, n_seq), n_threads, f"{n_seq} parallel votes")
        self.vocab = llm._model.vocab
        self.root = n_seq
        self.batch = llama_cpp.llama_batch_init(max(n_ctx, n_seq), 0, 1)
        self.held: list[int] = []  # the tokens `root` holds

    def close(self) -> None:
        import llama_cpp

        if self.ctx is not None:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None

    def _load_prompt(self, tokens: list[int], handoff: "Handoff | None" = None) -> float:
        """Make `root` hold `tokens[:-1]`; the seconds it took. The cells come from the
        `Llama` where it holds the prompt, else from `handoff` (the prompt's cells from a
        parallel greedy wave, `cre batch --parallel`), else are decoded here."""
        import llama_cpp

        head = tokens[:-1]
        if self.held == head:
            return 0.0
        start = time.perf_counter()
        memory = llama_cpp.llama_get_memory(self.ctx)
        llama_cpp.llama_memory_clear(memory, True)
        self.held = []
        llm = self.llm
        n = len(head)
        cells = None
        if llm.n_tokens >= n and list(llm.input_ids[:n]) == head:
            cells = Handoff.save(llm._ctx.ctx, 0, list(llm.input_ids[: llm.n_tokens]))
        elif handoff is not None and handoff.tokens[:n] == head:
            # After a parallel wave the `Llama` holds none of its prompts: without this, every
            # prompt's votes decoded it again, the cost the handoff exists to save.
            cells = handoff
        if cells is not None:
            # The answer's cells past the prompt go; a memory that cannot drop a tail
            # (recurrent models) would leave them for every vote to see, so it is decoded instead.
            if llama_cpp.llama_state_seq_set_data(self.ctx, cells.data, len(cells.data), self.root) \
                    and llama_cpp.llama_memory_seq_rm(memory, self.root, n, -1):
                self.held = head
                return time.perf_counter() - start
            llama_cpp.llama_memory_clear(memory, True)
        batch = self.batch
        for i, token in enumerate(head):
            _put(batch, i, token, i, self.root, False)
        batch.n_tokens = n
        if n and llama_cpp.llama_decode(self.ctx, batch) != 0:
            raise BackendError("llama.cpp could not decode the prompt for its votes")
        self.held = head
        return time.perf_counter() - start

    def run(self, tokens: list[int], params: Sequence[GenParams], handoff: "Handoff | None" = None) -> list[Generation]:
        """Every vote's answer; a request that gives up (`cre serve`) stops them mid-decode."""
        with abort_on_cancel(self.ctx, cancel.current()):
            return self._run(tokens, params, handoff)

    def _run(self, tokens: list[int], params: Sequence[GenParams], handoff: "Handoff | None") -> list[Generation]:
        import llama_cpp

        llm = self.llm
        memory = llama_cpp.llama_get_memory(self.ctx)
        share = self._load_prompt(tokens, handoff) / len(params)
        n_prompt = len(tokens)
        streams: list[_Stream] = []
        chains = []
        for i, p in enumerate(params):
            room = self.n_ctx - n_prompt
            stream = _Stream(i, tokens, min(p.max_tokens, room) if p.max_tokens > 0 else room,
                             [s.encode("utf-8") for s in p.stop], seq=i, n_past=n_prompt - 1, feed=[tokens[-1]])
            stream.seconds = share
            llama_cpp.llama_memory_seq_rm(memory, i, -1, -1)
            llama_cpp.llama_memory_seq_cp(memory, self.root, i, -1, -1)
            streams.append(stream)
            chains.append(sampler_chain(p))
        results: list[Generation | None] = [None] * len(params)
        active = list(streams)
        batch = self.batch
        try:
            while active:
                cancel.check()  # a request that gave up stops its votes here (`cre serve`)
                start = time.perf_counter()
                for n, stream in enumerate(active):
                    _put(batch, n, stream.feed[0], stream.n_past, stream.seq, True)
                batch.n_tokens = len(active)
                rc = llama_cpp.llama_decode(self.ctx, batch)
                if rc != 0:
                    raise BackendError(f"llama.cpp could not decode {len(active)} parallel votes (llama_decode returned {rc})")
                still = []
                finished: list[tuple[_Stream, bytes, str]] = []
                for row, stream in enumerate(active):
                    stream.n_past += 1
                    token = int(llama_cpp.llama_sampler_sample(chains[stream.index], self.ctx, row))
                    done = _take(llm, self.vocab, stream, token, self.n_ctx)
                    if done is None:
                        still.append(stream)
                    else:
                        finished.append((stream, *done))
                # Every sequence fed one token: the step's time is shared equally.
                elapsed = (time.perf_counter() - start) / len(active)
                for stream in active:
                    stream.seconds += elapsed
                for stream, out, reason in finished:
                    results[stream.index] = Generation(
                        text=out.decode("utf-8", errors="ignore"), prompt_tokens=n_prompt,
                        output_tokens=_output_tokens(stream, reason), seconds=stream.seconds, finish_reason=reason,
                    )
                    llama_cpp.llama_memory_seq_rm(memory, stream.seq, -1, -1)
                active = still
        finally:
            for chain in chains:
                llama_cpp.llama_sampler_free(chain)
            # Votes cut short (a cancel, an abort) keep their cells otherwise; a later run of
            # fewer votes would not clear them, and the cache would fill.
            for stream in active:
                llama_cpp.llama_memory_seq_rm(memory, stream.seq, -1, -1)
        return [r for r in results if r is not None]
