"""End to end: openai SDK -> gateway -> queue -> worker -> vLLM on all-MiniLM-L6-v2."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

# Every test here runs on both queue stores (the session gateways on memory and on Redis).
from tests.support.backends import client, embed_worker, gateway, http, store  # noqa: F401
from tests.support.stack import MODEL, PROMPTS, cosine, unit


def _vectors(resp) -> np.ndarray:  # type: ignore[no-untyped-def]
    assert [d.index for d in resp.data] == list(range(len(resp.data)))
    return np.array([d.embedding for d in resp.data], dtype=np.float32)


def test_200_sts_sentences_match_transformers_float32(client, reference, stsb_sentences):
    resp = client.embeddings.create(model=MODEL, input=stsb_sentences, encoding_format="float")
    got = _vectors(resp)
    want = unit(reference.raw(stsb_sentences))
    assert got.shape == (200, 384)
    cos = cosine(got, want)
    assert cos.min() >= 0.999, f"worst cosine {cos.min():.6f} at {int(cos.argmin())}"
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    assert resp.model == MODEL
    n = sum(reference.n_tokens(stsb_sentences))
    assert resp.usage.prompt_tokens == n
    assert resp.usage.total_tokens == n


def test_one_sentence_per_step_gives_the_vectors_of_a_large_step(client, reference, stsb_sentences):
    """A request of one sentence is an engine step of ~12 tokens, which a CPU host runs on one
    intra-op thread (``one_thread_step_tokens``, 128 unset); 200 sentences (~2,800 tokens) run
    on all: the vectors are the same."""
    texts = stsb_sentences[:8]
    alone = np.array(
        [
            _vectors(client.embeddings.create(model=MODEL, input=t, encoding_format="float"))[0]
            for t in texts
        ]
    )
    together = _vectors(
        client.embeddings.create(model=MODEL, input=stsb_sentences, encoding_format="float")
    )[:8]
    assert cosine(alone, together).min() >= 0.99999
    assert cosine(alone, unit(reference.raw(texts))).min() >= 0.999


def test_base64_equals_float(client, http, stsb_sentences):
    texts = stsb_sentences[:16]
    floats = _vectors(client.embeddings.create(model=MODEL, input=texts, encoding_format="float"))
    # The SDK decodes base64 itself; check the raw wire bytes too.
    raw = http.post(
        "/v1/embeddings", json={"model": MODEL, "input": texts, "encoding_format": "base64"}
    ).json()
    wire = np.array(
        [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]]
    )
    # Without encoding_format the SDK asks for base64 and decodes it with numpy.
    sdk = _vectors(client.embeddings.create(model=MODEL, input=texts))
    explicit = client.embeddings.create(model=MODEL, input=texts, encoding_format="base64")
    assert np.array_equal(wire, floats)
    assert np.array_equal(sdk, floats)
    assert explicit.data[0].embedding == raw["data"][0]["embedding"]


def test_normalize_false_returns_raw_pooled_vector(http, reference, stsb_sentences):
    texts = stsb_sentences[:8]
    body = http.post(
        "/v1/embeddings", json={"model": MODEL, "input": texts, "normalize": False}
    ).json()
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    want = reference.raw(texts)
    norms = np.linalg.norm(got, axis=1)
    assert not np.allclose(norms, 1.0, atol=1e-2)
    assert np.allclose(norms, np.linalg.norm(want, axis=1), rtol=1e-3)
    assert cosine(got, want).min() >= 0.999


@pytest.mark.parametrize("dims", [128, 256])
def test_matryoshka_dimensions_truncate_then_normalize(client, reference, stsb_sentences, dims):
    texts = stsb_sentences[:8]
    got = _vectors(
        client.embeddings.create(model=MODEL, input=texts, dimensions=dims, encoding_format="float")
    )
    assert got.shape == (8, dims)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    want = unit(reference.raw(texts)[:, :dims])
    assert cosine(got, want).min() >= 0.999


def test_unsupported_dimensions_is_a_clear_400(http):
    r = http.post("/v1/embeddings", json={"model": MODEL, "input": "hello", "dimensions": 100})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "invalid_dimensions"
    assert "100" in err["message"] and "128" in err["message"]


def test_token_array_inputs_match_text(client, reference, stsb_sentences):
    texts = stsb_sentences[:4]
    ids = reference.tok(texts)["input_ids"]
    by_text = _vectors(client.embeddings.create(model=MODEL, input=texts, encoding_format="float"))
    by_ids = _vectors(client.embeddings.create(model=MODEL, input=ids, encoding_format="float"))
    one = _vectors(client.embeddings.create(model=MODEL, input=ids[0], encoding_format="float"))
    assert cosine(by_text, by_ids).min() >= 0.99999
    assert np.allclose(one[0], by_ids[0], atol=1e-6)


def test_opt_in_truncation(http, reference):
    text = "the quick brown fox jumps over the lazy dog " * 60  # ~540 tokens > 256
    r = http.post(
        "/v1/embeddings", json={"model": MODEL, "input": text, "truncate_prompt_tokens": 100}
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 100
    r = http.post(
        "/v1/embeddings",
        json={"model": MODEL, "input": [text, "short"], "truncate_prompt_tokens": 256},
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 256 + reference.n_tokens(["short"])[0]
    # the same truncation as Hugging Face's (special tokens kept), the reference's max_length
    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    assert cosine(got, reference.raw([text, "short"])).min() >= 0.9999


def test_models_lists_the_served_model(client):
    models = {m.id: m for m in client.models.list().data}
    assert MODEL in models
    card = models[MODEL].model_dump()
    # it scores pairs too; every worker tokenizes (TEI's /tokenize, /decode)
    assert card["tasks"] == ["embed", "score", "tokenize"]
    assert card["score_type"] == "bi-encoder"
    assert card["max_model_len"] == 256
    assert card["workers"] >= 1


def test_prompt_template_with_strings_and_objects(http, reference, stsb_sentences):
    """Fireworks' ``prompt_template``: a string input is field ``text``; each object gives its
    fields; the rendered text is what gets embedded (reference: the same text formatted here)."""
    a, b, c = stsb_sentences[:3]
    r = http.post(
        "/v1/embeddings", json={"model": MODEL, "input": [a, b], "prompt_template": "query: {text}"}
    )
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    want_texts = [f"query: {a}", f"query: {b}"]
    assert cosine(got, unit(reference.raw(want_texts))).min() >= 0.999
    assert r.json()["usage"]["prompt_tokens"] == sum(reference.n_tokens(want_texts))

    objects = [{"title": "Sentence one", "body": a}, {"title": "Sentence two", "body": c}]
    r = http.post(
        "/v1/embeddings",
        json={"model": MODEL, "input": objects, "prompt_template": "{title}\n\n{{ body | lower }}"},
    )
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    want = unit(reference.raw([f"Sentence one\n\n{a.lower()}", f"Sentence two\n\n{c.lower()}"]))
    assert cosine(got, want).min() >= 0.999
    one = http.post(
        "/v1/embeddings",
        json={
            "model": MODEL,
            "input": objects[0],
            "prompt_template": "{title}\n\n{{ body | lower }}",
        },
    )
    assert np.allclose(one.json()["data"][0]["embedding"], got[0], atol=1e-5)


def test_prompt_template_truncate_tokens(http, reference):
    text = "the quick brown fox jumps over the lazy dog " * 60  # ~540 tokens > 256
    r = http.post(
        "/v1/embeddings",
        json={
            "model": MODEL,
            "input": [{"body": text}],
            "prompt_template": "{{ truncate_tokens(body, 10) }}",
        },
    )
    assert r.status_code == 200, r.text
    want = "the quick brown fox jumps over the lazy dog the"  # its first 10 tokens
    assert r.json()["usage"]["prompt_tokens"] == 12  # [CLS] + 10 + [SEP]
    got = np.array(r.json()["data"][0]["embedding"], dtype=np.float32)
    assert cosine(got, unit(reference.raw([want])[0])) >= 0.999
    # Default: as many tokens as the model takes, so an over-long field fits.
    r = http.post(
        "/v1/embeddings",
        json={"model": MODEL, "input": text, "prompt_template": "{{ truncate_tokens(text) }}"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 256


@pytest.mark.parametrize(
    "body,status,param,needle",
    [
        (
            {
                "input": [{"title": "t", "body": "b"}, {"title": "t"}],
                "prompt_template": "{title} {body}",
            },
            400,
            "input",
            "input[1]: prompt_template: 'body' is undefined",
        ),
        (
            {"input": "x", "prompt_template": "{{ text "},
            400,
            "prompt_template",
            "syntax error on line 1",
        ),
        ({"input": {"title": "t"}}, 400, "input", "'prompt_template'"),
        ({"input": [[1, 2, 3]], "prompt_template": "{text}"}, 400, "prompt_template", "token-id"),
        (
            {"input": "x", "prompt_template": "{{ text.__class__.__mro__ }}"},
            400,
            "input",
            "not allowed",
        ),
        (
            {"input": [{"a": "x"}, {}], "prompt_template": "{a}"},
            400,
            "input",
            "input[1] is an empty object",
        ),
        ({"input": {"a": ""}, "prompt_template": "{a}"}, 400, "input", "rendered an empty prompt"),
    ],
)
def test_prompt_template_errors(http, body, status, param, needle):
    r = http.post("/v1/embeddings", json={"model": MODEL, **body})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert needle in err["message"], err


def test_the_voyageai_sdk_fields_are_honoured_or_refused(gateway, embed_worker, reference):
    """The ``voyageai`` SDK unchanged: ``output_dimension`` and ``output_dtype`` honoured,
    ``truncation`` (the SDK's default: true) truncates to the model's context, false refuses
    an over-long text, ``input_type`` picks the model's named prompt; nothing dropped."""
    import voyageai

    from devstack import localstack as ls

    vo = voyageai.Client(api_key=ls.API_KEY, base_url=gateway.url + "/v1", timeout=120)
    long = "the quick brown fox jumps over the lazy dog " * 60  # ~540 tokens > 256
    texts = ["A man is playing a guitar.", "A dog runs in the park.", long]
    got = np.array(vo.embed(texts, model=MODEL, output_dimension=128).embeddings)
    assert got.shape == (3, 128)
    assert cosine(got, unit(reference.raw(texts)[:, :128])).min() >= 0.999  # truncated at 256
    ints = vo.embed(texts[:2], model=MODEL, output_dtype="int8").embeddings
    assert all(isinstance(v, int) and -128 <= v <= 127 for v in ints[0]) and len(ints[0]) == 384
    query = np.array(vo.embed(texts[:2], model=MODEL, input_type="query").embeddings)
    assert (
        cosine(query, unit(reference.raw([PROMPTS["query"] + t for t in texts[:2]]))).min() >= 0.999
    )
    # the SDK reads Voyage's error shape ({"detail"}); OpenAI's reaches it as the message
    with pytest.raises(voyageai.error.APIError, match=r"256.*HTTP response code was 400"):
        vo.embed([long], model=MODEL, truncation=False)


def test_named_prompts_embed_as_the_prompted_text(http, reference):
    """``prompt_name`` (TEI) and ``input_type`` (Cohere's names) put the worker's configured
    prompt before each text: the vector of the prompted text (vs ``transformers``), not of the
    text alone; ``GET /v1/models`` shows the prompts; an unknown name is a 400 listing them."""
    texts = ["A man is playing a guitar.", "A dog runs in the park."]
    bare = unit(reference.raw(texts))
    for fields, name in (
        ({"prompt_name": "query"}, "query"),
        ({"input_type": "search_document"}, "document"),
    ):
        r = http.post("/v1/embeddings", json={"model": MODEL, "input": texts, **fields})
        assert r.status_code == 200, r.text
        got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
        prompted = [PROMPTS[name] + t for t in texts]
        assert cosine(got, unit(reference.raw(prompted))).min() >= 0.999
        assert cosine(got, bare).max() < 0.99  # not the text alone
        assert r.json()["usage"]["prompt_tokens"] == sum(reference.n_tokens(prompted))
    card = next(m for m in http.get("/v1/models").json()["data"] if m["id"] == MODEL)
    assert card["prompts"] == PROMPTS and card["default_prompt_name"] is None
    bad = http.post("/v1/embeddings", json={"model": MODEL, "input": "x", "prompt_name": "poem"})
    assert bad.status_code == 400 and "its prompts: document, query" in bad.text


def test_the_cohere_sdk_embeds(gateway, embed_worker, reference):
    """The ``cohere`` SDK unchanged (``ClientV2.embed`` on ``/v2/embed``): ``input_type`` picks
    the named prompt, ``output_dimension`` the matryoshka size, several ``embedding_types``
    from one vector; the vectors of the prompted texts (vs ``transformers``)."""
    import cohere

    from devstack import localstack as ls

    co = cohere.ClientV2(api_key=ls.API_KEY, base_url=gateway.url, timeout=120)
    texts = ["A man is playing a guitar.", "A dog runs in the park."]
    r = co.embed(
        model=MODEL,
        texts=texts,
        input_type="search_query",
        output_dimension=128,
        embedding_types=["float", "ubinary"],
    )
    got = np.array(r.embeddings.float_, dtype=np.float32)
    want = unit(reference.raw([PROMPTS["query"] + t for t in texts])[:, :128])
    assert got.shape == (2, 128) and cosine(got, want).min() >= 0.999
    assert r.embeddings.ubinary == np.packbits(got > 0, axis=-1).tolist()
    assert r.meta.billed_units.input_tokens == sum(
        reference.n_tokens([PROMPTS["query"] + t for t in texts])
    )


def test_teis_client_embeds_without_a_model(gateway, embed_worker, reference, monkeypatch):
    """``huggingface_hub.InferenceClient`` unchanged (``feature_extraction`` posts TEI's body
    to ``/``, naming no model: the gateway's ``--default-model``), and TEI's ``/embed`` with
    ``prompt_name`` and ``truncate``: vectors vs ``transformers``."""
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient

    from devstack import localstack as ls

    # the tests' HF_HUB_OFFLINE (no hub downloads) would block the client's calls to this host
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)

    texts = ["A man is playing a guitar.", "A dog runs in the park."]
    hf = InferenceClient(base_url=gateway.url, api_key=ls.API_KEY, timeout=120)
    got = np.asarray(hf.feature_extraction(texts), dtype=np.float32)
    assert got.shape == (2, 384) and cosine(got, reference.raw(texts)).min() >= 0.999
    long = "the quick brown fox jumps over the lazy dog " * 60
    body = {"inputs": [texts[0], long], "prompt_name": "query", "truncate": True}
    with httpx.Client(base_url=gateway.url, timeout=120) as c:
        r = c.post("/embed", json=body, headers={"Authorization": f"Bearer {ls.API_KEY}"})
    assert r.status_code == 200, r.text
    want = reference.raw([PROMPTS["query"] + texts[0], PROMPTS["query"] + long])
    assert cosine(np.array(r.json(), dtype=np.float32), want).min() >= 0.999


def test_teis_tokenize_and_decode_use_the_workers_tokenizer(http, reference):
    """``/tokenize`` and ``/decode`` (no model named) answered by the real worker's tokenizer:
    the ids ``transformers``' tokenizer gives, UTF-8 byte offsets covering each token's text,
    the named prompt before the text; the ids decode back, and embedding those ids gives the
    text's vector."""
    text = "Héllo wörld: a guitar."
    r = http.post("/tokenize", json={"inputs": [text, "x"], "prompt_name": "query"})
    assert r.status_code == 200, r.text
    tokens, short = r.json()
    prompted = PROMPTS["query"] + text
    assert [t["id"] for t in tokens] == reference.tok(prompted)["input_ids"]
    assert tokens[0] == {"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None}
    data = prompted.encode()
    assert all(data[t["start"] : t["stop"]].decode() == t["text"] for t in tokens[1:-1])
    assert [t["text"] for t in short] == ["[CLS]", "query", ":", "x", "[SEP]"]
    ids = [t["id"] for t in tokens]
    r = http.post("/decode", json={"ids": [ids, ids[1:3]]})
    assert r.status_code == 200, r.text
    assert r.json() == [reference.tok.decode(ids, skip_special_tokens=True), "query :"]
    by_ids = http.post("/v1/embeddings", json={"model": MODEL, "input": [ids]})
    by_text = http.post("/v1/embeddings", json={"model": MODEL, "input": prompted})
    vectors = [np.array(x.json()["data"][0]["embedding"]) for x in (by_ids, by_text)]
    assert cosine(vectors[0][None], vectors[1][None]).min() >= 0.99999
    bad = http.post("/decode", json={"ids": [reference.tok.vocab_size]})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_token_ids"


def test_a_text_cut_at_its_start_embeds_as_its_end(http, reference):
    """``truncation_side: start`` (Cohere's ``START``, TEI's ``Left``) keeps the end of an
    over-long text: the vector of ``transformers`` on the left-truncated tokens, not the
    start's."""
    head = "the quick brown fox jumps over the lazy dog " * 40  # ~360 tokens
    text = head + "A completely different ending about guitars and music."
    r = http.post(
        "/v1/embeddings",
        json={"model": MODEL, "input": text, "truncation": True, "truncation_side": "start"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 256
    got = np.array([r.json()["data"][0]["embedding"]], dtype=np.float32)
    side = reference.tok.truncation_side
    reference.tok.truncation_side = "left"
    try:
        want = reference.raw([text])
    finally:
        reference.tok.truncation_side = side
    assert cosine(got, want).min() >= 0.999
    assert cosine(got, reference.raw([text])).max() < 0.99  # not the start's vector
