from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from crecli import config, embed, routerfile
from crecli.embed import LlamaEmbedder, normalize_rows, TfidfEmbedder, embed_texts, embedder_from_state, make_embedder
from crecli.errors import ConfigError, CreError, RouterFileError
from crecli.models.fake import FakeBackend

TEXTS = [
    "What is 8 plus 2?\nGive only the final answer.",
    "What is 17 plus 25?\nGive only the final answer.",
    "What is 466 times 616?\nGive only the final answer.",
    "Sort the following words alphabetically:\nList: applaud vogel gluey",
    "Sort the following words alphabetically:\nList: zebra apple mango",
    "The capital of Belgium is\nGive only the final answer.",
    "The capital of Peru is\nGive only the final answer.",
    "Is the sequence ( ) { } valid?\nOptions:\n(A) Valid\n(B) Invalid",
]

PINNED_TOML = """
schema = 1
ladder = ["small"]
[models.small]
path = "/nonexistent/small.gguf"
sha256 = "{sha}"
"""


def _roundtrip_npz(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a router file does with the arrays: .npz written and read without pickle."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def test_tfidf_vectors_are_unit_float32_rows() -> None:
    X = TfidfEmbedder(dims=4, min_df=1).fit(TEXTS).transform(TEXTS)
    assert X.dtype == np.float32
    assert X.shape == (len(TEXTS), 4)
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-5)


def test_tfidf_state_roundtrip_gives_identical_vectors_without_pickle() -> None:
    emb = TfidfEmbedder(dims=5, min_df=1, seed=3).fit(TEXTS)
    params, arrays = emb.state()
    json.dumps(params)  # params must be JSON
    assert all(a.dtype != object for a in arrays.values())
    assert arrays["word_vocab"].dtype.kind == "U"
    back = TfidfEmbedder.from_state(json.loads(json.dumps(params)), _roundtrip_npz(arrays))
    unseen = ["What is 3 plus 9?", "Sort these words: kiwi lime", "completely novel gibberish qqqq"]
    np.testing.assert_array_equal(back.transform(TEXTS + unseen), emb.transform(TEXTS + unseen))
    assert back.identity == emb.identity


def test_tfidf_identity_pins_the_fitted_state() -> None:
    a = TfidfEmbedder(dims=4, min_df=1).fit(TEXTS)
    b = TfidfEmbedder(dims=4, min_df=1).fit(TEXTS)
    c = TfidfEmbedder(dims=4, min_df=1).fit(TEXTS[:-1])
    d = TfidfEmbedder(dims=3, min_df=1).fit(TEXTS)
    assert a.identity == b.identity
    assert a.identity.startswith("tfidf:")
    assert len({a.identity, c.identity, d.identity}) == 3


def test_tfidf_dims_are_capped_by_the_data() -> None:
    emb = TfidfEmbedder(dims=256, min_df=1).fit(TEXTS)
    assert emb.dims_ == len(TEXTS) - 1
    assert emb.transform(["x"]).shape == (1, len(TEXTS) - 1)


def test_mask_digits_keeps_number_length_not_value() -> None:
    emb = TfidfEmbedder(dims=6, min_df=1, mask_digits=True).fit(TEXTS)
    X = emb.transform(["What is 12 plus 34?", "What is 56 plus 78?", "What is 123 plus 456?"])
    np.testing.assert_array_equal(X[0], X[1])
    assert not np.allclose(X[0], X[2])
    raw = TfidfEmbedder(dims=6, min_df=1, mask_digits=False).fit(TEXTS)
    Y = raw.transform(["What is 8 plus 2?", "What is 9 plus 3?"])
    assert not np.allclose(Y[0], Y[1])


def test_word_analyzer_has_no_char_block() -> None:
    emb = TfidfEmbedder(dims=4, analyzer="word", min_df=1).fit(TEXTS)
    assert len(emb.char_vocab_) == 0
    assert emb.components_.shape[1] == len(emb.word_vocab_)


def test_tfidf_errors() -> None:
    with pytest.raises(CreError, match="not fitted"):
        TfidfEmbedder().transform(["x"])
    with pytest.raises(CreError, match="at least 2 texts"):
        TfidfEmbedder().fit(["only one"])
    with pytest.raises(CreError, match="no words"):
        TfidfEmbedder(analyzer="word", min_df=1).fit(["!!!", "???"])
    with pytest.raises(ConfigError, match="analyzer"):
        TfidfEmbedder(analyzer="bytes").fit(TEXTS)
    # One term shared by enough prompts: TruncatedSVD's ValueError was a traceback.
    with pytest.raises(CreError, match="kept 1 term.*lower `min_df`"):
        TfidfEmbedder(analyzer="word", min_df=2).fit(["apple pie", "apple tart", "apple cake"])


def test_damaged_tfidf_state_is_refused() -> None:
    params, arrays = TfidfEmbedder(dims=4, min_df=1).fit(TEXTS).state()
    broken = dict(arrays, components_q8=arrays["components_q8"][:, :-1])
    with pytest.raises(RouterFileError, match="inconsistent"):
        TfidfEmbedder.from_state(params, broken)
    with pytest.raises(RouterFileError, match="components_scale"):
        TfidfEmbedder.from_state(params, dict(arrays, components_scale=arrays["components_scale"][:-1]))
    with pytest.raises(RouterFileError, match="components_q8"):
        TfidfEmbedder.from_state(params, dict(arrays, components_q8=arrays["components_q8"].astype(np.float32)))


def test_components_are_stored_as_int8_and_embed_as_the_fit_did() -> None:
    """The SVD's components travel as int8 with a scale per component, a quarter of float32;
    fit embeds with the same rounded numbers, so a loaded embedder gives identical vectors."""
    emb = TfidfEmbedder(dims=4, min_df=1).fit(TEXTS)
    params, arrays = emb.state()
    assert arrays["components_q8"].dtype == np.int8 and "components" not in arrays
    loaded = TfidfEmbedder.from_state(params, arrays)
    assert np.array_equal(loaded.transform(TEXTS), emb.transform(TEXTS))
    assert loaded.identity == emb.identity


def test_quantized_rows_are_within_half_a_step() -> None:
    from crecli.embed import dequantize, quantize

    rows = np.random.default_rng(0).normal(size=(5, 300)).astype(np.float32)
    rows[2] = 0.0  # an all-zero row keeps a zero scale and decodes to zeros
    codes, scale = quantize(rows)
    back = dequantize(codes, scale)
    assert codes.dtype == np.int8 and scale.shape == (5,)
    assert np.all(np.abs(back - rows) <= scale[:, None] / 2 + 1e-7)
    assert not back[2].any()


def test_routers_with_float32_components_still_load() -> None:
    """Routers written before int8 components stored them as float32 `components`."""
    emb = TfidfEmbedder(dims=4, min_df=1).fit(TEXTS)
    params, arrays = emb.state()
    old = {k: v for k, v in arrays.items() if not k.startswith("components")}
    old["components"] = emb.components_
    assert np.array_equal(TfidfEmbedder.from_state(params, old).transform(TEXTS), emb.transform(TEXTS))
    with pytest.raises(RouterFileError, match="word_idf"):
        TfidfEmbedder.from_state(params, {k: v for k, v in arrays.items() if k != "word_idf"})


@pytest.mark.parametrize("entry", [3e38, 1.5, np.nan, -np.inf])
def test_float32_components_past_a_unit_row_are_refused_at_load(entry: float) -> None:
    """A legacy float32 component of 3e38 loaded (it is finite), then overflowed in every
    projection: each prompt embedded as NaN and failed at routing, naming no file."""
    emb = TfidfEmbedder(dims=4, min_df=1).fit(TEXTS)
    params, arrays = emb.state()
    old = {k: v for k, v in arrays.items() if not k.startswith("components")}
    old["components"] = emb.components_.copy()
    old["components"][1, 2] = entry
    with pytest.raises(RouterFileError, match="not unit rows"):
        TfidfEmbedder.from_state(params, old)


def test_make_embedder_from_config(tiny_models_toml: Path) -> None:
    settings = config.load(tiny_models_toml)
    emb = make_embedder(settings.embedder, settings, seed=7)
    assert isinstance(emb, TfidfEmbedder)
    assert (emb.dims, emb.seed) == (16, 7)
    default = make_embedder({}, settings)
    assert isinstance(default, TfidfEmbedder)
    assert (default.dims, default.analyzer, default.min_df, default.mask_digits) == (256, "word+char", 2, True)
    custom = make_embedder({"kind": "tfidf", "analyzer": "word", "min_df": 1, "mask_digits": False}, settings)
    assert (custom.analyzer, custom.min_df, custom.mask_digits) == ("word", 1, False)
    with pytest.raises(ConfigError, match="min_df"):
        make_embedder({"min_df": 0}, settings)
    llama = make_embedder({"kind": "llama", "model": "medium"}, settings)
    assert isinstance(llama, LlamaEmbedder) and llama.model == "medium"
    with pytest.raises(ConfigError, match="kind 'bert' is not known"):
        make_embedder({"kind": "bert"}, settings)
    with pytest.raises(ConfigError, match="unknown field"):
        make_embedder({"kind": "tfidf", "dimensions": 8}, settings)
    with pytest.raises(ConfigError, match="needs `model"):
        make_embedder({"kind": "llama"}, settings)
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        make_embedder({"kind": "llama", "model": "nope"}, settings)


def test_embedder_from_state_dispatches_on_kind(tiny_models_toml: Path) -> None:
    settings = config.load(tiny_models_toml)
    tfidf = TfidfEmbedder(dims=4, min_df=1).fit(TEXTS)
    again = embedder_from_state(*tfidf.state(), settings)
    np.testing.assert_array_equal(again.transform(TEXTS), tfidf.transform(TEXTS))
    llama = embedder_from_state(*LlamaEmbedder("small", settings).state(), settings)
    assert isinstance(llama, LlamaEmbedder) and llama.model == "small"
    with pytest.raises(RouterFileError, match="'bert' is not known"):
        embedder_from_state({"kind": "bert"}, {}, settings)


def test_llama_embedder_state_refuses_another_model_file(tmp_path: Path) -> None:
    toml = tmp_path / "pinned.toml"
    toml.write_text(PINNED_TOML.format(sha="ab" * 32))
    settings = config.load(toml)
    params, arrays = LlamaEmbedder("small", settings).state()
    assert params["sha256"] == "ab" * 32
    with pytest.raises(RouterFileError, match="pins"):
        LlamaEmbedder.from_state({**params, "sha256": "cd" * 32}, arrays, settings)


def test_a_llama_embedders_model_missing_here_is_named_as_the_routers(tiny_models_toml: Path) -> None:
    # It said "unknown model 'x'. Known models: ...", naming neither the router nor its embedder.
    settings = config.load(tiny_models_toml)
    with pytest.raises(RouterFileError, match="the router embeds prompts with model 'bge' \\(sha256 ab"):
        LlamaEmbedder.from_state({"kind": "llama", "model": "bge", "sha256": "ab" * 32}, {}, settings)


def test_a_router_embedding_with_another_model_file_blames_the_file_not_crecli(
    tiny_models_toml: Path, tmp_path: Path
) -> None:
    # An unpinned embedder model not on disk was "not the one the router was fitted with ...
    # refit the router with this crecli": the cause is the model file.
    from dataclasses import replace as dc_replace

    from support.routers import make_router

    pinned = tmp_path / "pinned.toml"
    pinned.write_text(PINNED_TOML.format(sha="ab" * 32))
    fitted = dc_replace(make_router(), embedder=LlamaEmbedder("small", config.load(pinned)))
    path = tmp_path / "router.cre"
    routerfile.save(fitted, path)
    with pytest.raises(RouterFileError) as info:
        routerfile.load(path, config.load(tiny_models_toml))
    text = str(info.value)
    assert f"the router embeds prompts with llama:small:{'ab' * 32}, and this machine's llama:small:unpinned" in text
    assert "pin its sha256" in text and "this crecli" not in text


def test_a_router_whose_embedder_cut_prompts_shorter_is_refused_where_the_cut_differs(
    tiny_models_toml: Path, tmp_path: Path
) -> None:
    # Fitted where the embedding model had context 256 (prompts embedded by their first 256
    # tokens), the router loaded where it has 2048 (512) and embedded long prompts otherwise,
    # so they landed in other clusters, without a word.
    from dataclasses import replace as dc_replace

    from support.routers import make_router

    def models(context: int) -> Path:
        toml = tmp_path / f"models-{context}.toml"
        toml.write_text(tiny_models_toml.read_text() + f'[models.emb]\npath = "/nonexistent/emb.gguf"\n'
                        f'sha256 = "{"ab" * 32}"\ncontext = {context}\n')
        return toml

    fitted = dc_replace(make_router(), embedder=LlamaEmbedder("emb", config.load(models(256))))
    assert fitted.embedder.identity == f"llama:emb:{'ab' * 32}:truncate=256"
    path = tmp_path / "router.cre"
    routerfile.save(fitted, path)
    assert routerfile.load(path, config.load(models(256))).embedder.identity == fitted.embedder.identity
    with pytest.raises(RouterFileError) as info:
        routerfile.load(path, config.load(models(2048)))
    assert f"llama:emb:{'ab' * 32}:truncate=256, and this machine's llama:emb:{'ab' * 32}" in str(info.value)
    assert "the `context` it was fitted with: the router's `truncate=N` means N" in str(info.value)


def test_llama_embedder_normalises_backend_vectors(tiny_models_toml: Path, fake_backends: Callable) -> None:
    backends = fake_backends()
    emb = LlamaEmbedder("small", config.load(tiny_models_toml))
    X = emb.transform(["a", "b", "c"])
    assert X.dtype == np.float32 and X.shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-5)
    assert "small" in backends
    # No sha256 pinned and no file on disk: the identity cannot pin the vectors.
    assert emb.identity == "llama:small:unpinned"
    assert not emb.cacheable


class CountingBackend(FakeBackend):
    def __init__(self, *args: object, fail_after: int | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.embedded: list[str] = []
        self.fail_after = fail_after

    def embed(self, texts):  # type: ignore[no-untyped-def]
        if self.fail_after is not None and len(self.embedded) >= self.fail_after:
            raise CreError("simulated crash")
        self.embedded.extend(texts)
        return super().embed(texts)


@pytest.fixture
def pinned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[LlamaEmbedder, CountingBackend]]:
    from crecli.models import registry

    toml = tmp_path / "pinned.toml"
    toml.write_text(PINNED_TOML.format(sha="ab" * 32))
    settings = config.load(toml)

    def make(fail_after: int | None = None) -> tuple[LlamaEmbedder, CountingBackend]:
        backend = CountingBackend(settings.get("small"), fail_after=fail_after)
        monkeypatch.setattr(registry, "make_backend", lambda spec: backend)
        monkeypatch.setattr(registry, "reports_signals", lambda spec: False)
        return LlamaEmbedder("small", settings), backend

    return make


def test_embed_texts_caches_on_disk_and_embeds_nothing_twice(pinned: Callable, cre_home: Path) -> None:
    emb, backend = pinned()
    texts = ["one", "two", "one", "three", "four", "five"]
    first = embed_texts(emb, texts, batch_size=2)
    assert backend.embedded == ["one", "two", "three", "four", "five"]  # duplicates once
    assert first.shape == (6, 8) and first.dtype == np.float32
    np.testing.assert_array_equal(first[0], first[2])
    assert embed.cache_path().is_file()
    assert str(embed.cache_path()).startswith(str(cre_home))

    emb2, backend2 = pinned()
    again = embed_texts(emb2, texts + ["six"], batch_size=2)
    assert backend2.embedded == ["six"]
    np.testing.assert_array_equal(again[:6], first)
    np.testing.assert_array_equal(again, emb2.transform(texts + ["six"]))


def test_cached_vectors_are_keyed_by_the_tokens_of_a_text_the_model_embeds(
    pinned: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    # llama.cpp embeds a text's first min(context, 512) tokens (`embed_truncation`): the same
    # model file with context 128 and with 256 shared cached vectors of texts cut at other
    # lengths. Contexts of 512 and more cut alike, so they share them.
    texts = ["one", "two"]
    cases = ((128, 128, True), (256, 256, True), (512, 512, True), (4096, 512, False))
    for context, _, again in cases:
        emb, backend = pinned()
        emb.settings.models["small"] = replace(emb.spec, context=context)
        embed_texts(emb, texts)
        assert backend.embedded == (texts if again else []), context
    for context, cut, _ in cases:  # the identity a router records and checks holds the cut too
        emb.settings.models["small"] = replace(emb.spec, context=context)
        # ... and at the usual cut of 512 it is as it was before the cut was in it.
        base = f"llama:small:{'ab' * 32}"
        assert emb.identity == (base if cut == 512 else f"{base}:truncate={cut}") and emb.cache_key == emb.identity


def test_embed_texts_resumes_after_a_crash(pinned: Callable) -> None:
    emb, _ = pinned(fail_after=4)
    texts = [f"text {i}" for i in range(10)]
    with pytest.raises(CreError, match="simulated"):
        embed_texts(emb, texts, batch_size=2)
    emb2, backend2 = pinned()
    embed_texts(emb2, texts, batch_size=2)
    assert backend2.embedded == texts[4:]  # the first two batches were kept


def test_embed_texts_without_cache_and_for_tfidf(pinned: Callable) -> None:
    emb, backend = pinned()
    embed_texts(emb, ["a", "b"], cache=False)
    embed_texts(emb, ["a", "b"], cache=False)
    assert backend.embedded == ["a", "b", "a", "b"]
    assert not embed.cache_path().exists()

    tfidf = TfidfEmbedder(dims=4, min_df=1).fit(TEXTS)
    X = embed_texts(tfidf, TEXTS, batch_size=3)
    np.testing.assert_array_equal(X, tfidf.transform(TEXTS))
    assert not embed.cache_path().exists()  # tfidf is never cached (see TfidfEmbedder.cacheable)
    assert embed_texts(tfidf, []).shape[0] == 0


def test_an_unusable_cache_warns_and_embeds_anyway(pinned: Callable, capsys: pytest.CaptureFixture[str]) -> None:
    """The cache only saves time: a cache path that is a folder (unopenable) or a database
    that refuses writes must not stop `cre ask` or `cre fit`."""
    emb, backend = pinned()
    embed.cache_path().parent.mkdir(parents=True)
    embed.cache_path().mkdir()  # sqlite cannot open a folder
    X = embed_texts(emb, ["a", "b"])
    assert X.shape == (2, 8) and backend.embedded == ["a", "b"]
    assert "embedding cache" in capsys.readouterr().err


def test_a_damaged_cache_row_warns_and_embeds_anyway(pinned: Callable, capsys: pytest.CaptureFixture[str]) -> None:
    # A blob of the wrong length raised from numpy, out of `cre ask`, with a traceback.
    import sqlite3

    emb, _ = pinned()
    embed_texts(emb, ["a", "b"])
    with sqlite3.connect(embed.cache_path()) as conn:
        conn.execute("UPDATE vectors SET vector = ?", (b"\x00\x01\x02",))
    emb2, backend2 = pinned()
    X = embed_texts(emb2, ["a", "b"])
    assert X.shape == (2, 8) and backend2.embedded == ["a", "b"]
    assert "could not be read" in capsys.readouterr().err


def test_a_cache_that_refuses_writes_warns_once(pinned: Callable, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import sqlite3

    def refuse(*args: object) -> None:
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(embed, "_store", refuse)
    emb, backend = pinned()
    X = embed_texts(emb, [f"t{i}" for i in range(6)], batch_size=2)
    assert X.shape == (6, 8) and len(backend.embedded) == 6
    assert capsys.readouterr().err.count("cannot write the embedding cache") == 1


@pytest.mark.parametrize("field, value", [("min_df", True), ("dims", True), ("dims", 10**6), ("mask_digits", 1)])
def test_tfidf_settings_refuse_bools_for_numbers_and_huge_dims(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        embed.make_embedder({"kind": "tfidf", field: value}, config.load())


EDGE_TEXTS = ["", "   ", "a", "I", "x y", "What  is\t12 plus\n\n30?", "Ünïcödé wörds, naïve café!", "12345 678", "(A) yes (B) no",
              "word " * 50, "tab\tand\u00a0nbsp", "emoji 🙂 and \u2028 separator"]


@pytest.mark.parametrize(("analyzer", "mask_digits"), [("word+char", True), ("word", False)])
def test_transform_matches_scikit_learn(analyzer: str, mask_digits: bool) -> None:
    """Route-time TF-IDF is computed without scikit-learn; it must give the rows
    TfidfVectorizer gives with the same vocabulary and idf."""
    import json
    from pathlib import Path

    import scipy.sparse as sp

    log = Path(__file__).resolve().parents[1] / "examples" / "querylog.jsonl"
    texts = [json.loads(line)["prompt"] for line in log.read_text().splitlines()]
    emb = TfidfEmbedder(analyzer=analyzer, mask_digits=mask_digits).fit(texts)
    vecs = emb._vectorizers()
    for vec, vocab, idf in zip(vecs, (emb.word_vocab_, emb.char_vocab_), (emb.word_idf_, emb.char_idf_)):
        vec.vocabulary = {str(t): i for i, t in enumerate(vocab.tolist())}
        vec.idf_ = idf
    probe = texts[:200] + EDGE_TEXTS
    X = sp.hstack([v.transform(probe) for v in vecs]).tocsr()
    want = normalize_rows(X @ emb.components_.T)
    assert np.allclose(emb.transform(probe), want, atol=1e-6)


def test_analyzers_list_the_terms_scikit_learn_lists() -> None:
    from crecli.embed import _mask_digits, char_terms, word_terms

    vecs = TfidfEmbedder()._vectorizers()  # their preprocessor masks digits, as ours does
    word, char = (v.build_analyzer() for v in vecs)
    for text in EDGE_TEXTS + ["What is the capital of France?", "Which of these is a color?\n(A) table\n(B) blue"]:
        assert sorted(word_terms(_mask_digits(text))) == sorted(word(text))
        assert sorted(char_terms(_mask_digits(text))) == sorted(char(text))


def test_routing_imports_neither_scikit_learn_nor_scipy(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Importing scikit-learn takes 1-2 s on 2 cores: a one-off `cre ask` must not pay it."""
    import subprocess
    import sys

    emb = TfidfEmbedder(dims=4, min_df=1).fit(TEXTS)
    params, arrays = emb.state()
    np.savez(tmp_path / "state.npz", **arrays)
    code = (
        "import json, sys, numpy as np\n"
        "from crecli.embed import TfidfEmbedder\n"
        f"arrays = dict(np.load({str(tmp_path / 'state.npz')!r}))\n"
        f"emb = TfidfEmbedder.from_state(json.loads({json.dumps(json.dumps(params))}), arrays)\n"
        "emb.transform(['What is 2 plus 2?'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
