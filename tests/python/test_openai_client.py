"""The official `openai` Python SDK against a running `llmops serve`.

Every client is built with `max_retries=0` so an error reaches the test as
the SDK's own exception on the first answer, and so a 429 is not hidden by
the SDK's retries.
"""

from __future__ import annotations

import time

import openai
import pytest

from conftest import Server

COMPLETION_PROMPT = "The whale swam"
# Away from the training text, so temperature 1 has choices to make.
SAMPLING_PROMPT = "Tell me about the old town."
CHAT_MESSAGES = [
    {"role": "system", "content": "You are a quiet lighthouse keeper."},
    {"role": "user", "content": "Tell me about the old town."},
]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    with openai.OpenAI(base_url=server.http + "/v1", api_key=server.inference_key, max_retries=0, timeout=60) as c:
        yield c


def _client(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http + "/v1", api_key=key, max_retries=0, timeout=60)


def _greedy_completion(client, server, prompt=COMPLETION_PROMPT, max_tokens=24, **kw):
    return client.completions.create(model=server.model, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


def _pick_stop(text: str) -> tuple[str, int]:
    """A stop string taken from the middle of `text` (a word that is neither
    the first nor the last) and where its first occurrence starts."""
    words = text.split()
    assert len(words) >= 3, f"the model's output is too short to pick a stop string from: {text!r}"
    for w in words[1:-1]:
        if len(w) < 2:
            continue
        k = text.find(w)
        if k > 0 and k + len(w) < len(text.rstrip()):
            return w, k
    pytest.fail(f"no usable stop word in {text!r}")


# --------------------------------------------------------------------- models


def test_models_list_has_the_served_model(client, server):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert server.model in ids, ids
    m = next(m for m in models.data if m.id == server.model)
    assert m.object == "model"
    assert m.owned_by == "llmops"


# ------------------------------------------------------------ chat completions


def test_chat_completion_counts_tokens_like_the_tokenizer(client, server):
    r = client.chat.completions.create(
        model=server.model,
        messages=CHAT_MESSAGES,
        max_tokens=7,
        temperature=0,
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.model == server.model
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.index == 0
    assert c.message.role == "assistant"
    assert isinstance(c.message.content, str) and c.message.content != ""
    assert c.finish_reason == "length"
    want_prompt = server.tokenize(messages=CHAT_MESSAGES)["count"]
    assert r.usage.prompt_tokens == want_prompt
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == want_prompt + 7
    # One log-probability per generated token.
    assert len(c.logprobs.content) == 7


def test_chat_accepts_content_parts_and_max_completion_tokens(client, server):
    parts = [
        {"role": "system", "content": [{"type": "text", "text": CHAT_MESSAGES[0]["content"]}]},
        {"role": "user", "content": [{"type": "text", "text": CHAT_MESSAGES[1]["content"]}]},
    ]
    r = client.chat.completions.create(
        model=server.model,
        messages=parts,
        max_completion_tokens=5,
        temperature=0,
        user="client-test",
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    # Parts are the same conversation as plain strings.
    assert r.usage.prompt_tokens == server.tokenize(messages=CHAT_MESSAGES)["count"]
    plain = client.chat.completions.create(
        model=server.model, messages=CHAT_MESSAGES, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].message.content == plain.choices[0].message.content


def test_responses_carry_the_request_id(client, server):
    raw = client.chat.completions.with_raw_response.create(
        model=server.model, messages=CHAT_MESSAGES, max_tokens=1, extra_headers={"x-request-id": "client-test-42"}
    )
    assert raw.headers["x-request-id"] == "client-test-42"
    assert raw.parse().usage.completion_tokens <= 1


def test_chat_streaming_matches_the_whole_answer(client, server):
    whole = client.chat.completions.create(model=server.model, messages=CHAT_MESSAGES, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(
        model=server.model,
        messages=CHAT_MESSAGES,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len(chunks) >= 3
    assert len({ch.id for ch in chunks}) == 1, "every chunk carries the same id"
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert text == whole.choices[0].message.content
    # The usage chunk comes last, with no choices, and agrees with the whole answer.
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(ch.usage is None for ch in chunks[:-1])


def test_chat_streaming_without_include_usage_sends_no_usage(client, server):
    chunks = list(
        client.chat.completions.create(model=server.model, messages=CHAT_MESSAGES, max_tokens=4, temperature=0, stream=True)
    )
    assert chunks and all(ch.usage is None for ch in chunks)
    assert all(ch.choices for ch in chunks)


def test_chat_stop_ends_the_answer_before_the_stop_string(client, server):
    base = client.chat.completions.create(
        model=server.model, messages=CHAT_MESSAGES, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    full = base.choices[0].message.content
    stop, k = _pick_stop(full)
    for stops in (stop, ["\u2603never\u2603", stop]):
        r = client.chat.completions.create(
            model=server.model,
            messages=CHAT_MESSAGES,
            max_tokens=24,
            temperature=0,
            stop=stops,
            extra_body={"ignore_eos": True},
        )
        assert r.choices[0].finish_reason == "stop", (full, stops, r.choices[0])
        assert r.choices[0].message.content == full[:k], (full, stops)
        assert 0 < r.usage.completion_tokens < 24
    chunks = list(
        client.chat.completions.create(
            model=server.model,
            messages=CHAT_MESSAGES,
            max_tokens=24,
            temperature=0,
            stop=[stop],
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full[:k], (full, stop)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_seed_reproduces_sampled_text(client, server):
    def sample(seed, **kw):
        r = client.chat.completions.create(
            model=server.model, messages=CHAT_MESSAGES, max_tokens=16, temperature=1, seed=seed, **kw
        )
        return r.choices[0].message.content

    a, b = sample(1234), sample(1234)
    assert a == b
    # Streaming with the same seed gives the same text too.
    chunks = client.chat.completions.create(
        model=server.model, messages=CHAT_MESSAGES, max_tokens=16, temperature=1, seed=1234, stream=True
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == a
    # The seed matters: other seeds do not all give the same text.
    others = {sample(s) for s in (1, 2, 3, 4, 5)}
    assert len(others | {a}) > 1, "temperature 1 with different seeds always gave the same text"


def test_chat_n_2_returns_two_choices_and_counts_both(client, server):
    kw = dict(model=server.model, messages=CHAT_MESSAGES, max_tokens=6, temperature=1, seed=77, n=2)
    r = client.chat.completions.create(**kw, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.prompt_tokens == server.tokenize(messages=CHAT_MESSAGES)["count"]
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    again = client.chat.completions.create(**kw, extra_body={"ignore_eos": True})
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    # Streamed, the deltas of each index add up to the same two texts.
    chunks = list(
        client.chat.completions.create(
            **kw, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
        )
    )
    texts = {0: "", 1: ""}
    finished = {}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished[c.index] = c.finish_reason
    assert finished == {0: "length", 1: "length"}
    assert [texts[0], texts[1]] == [c.message.content for c in r.choices]
    assert chunks[-1].usage.completion_tokens == 12


# ----------------------------------------------------------------- completions


def test_completion_counts_tokens_like_the_tokenizer(client, server):
    r = _greedy_completion(client, server, max_tokens=9, logprobs=1, extra_body={"ignore_eos": True})
    assert r.object == "text_completion"
    assert r.model == server.model
    assert len(r.choices) == 1
    assert r.choices[0].finish_reason == "length"
    assert isinstance(r.choices[0].text, str) and r.choices[0].text != ""
    want_prompt = server.tokenize(prompt=COMPLETION_PROMPT)["count"]
    assert r.usage.prompt_tokens == want_prompt
    assert r.usage.completion_tokens == 9
    assert r.usage.total_tokens == want_prompt + 9
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 9
    assert "".join(lp.tokens) == r.choices[0].text


def test_completion_default_max_tokens_is_16(client, server):
    r = client.completions.create(model=server.model, prompt=COMPLETION_PROMPT, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 16


def test_completion_finish_reason_agrees_with_max_tokens(client, server):
    # Without ignore_eos the model may end on its own; either way the
    # count and the reason must agree.
    for max_tokens in (1, 5, 20):
        r = _greedy_completion(client, server, max_tokens=max_tokens)
        c = r.choices[0]
        if c.finish_reason == "length":
            assert r.usage.completion_tokens == max_tokens
        else:
            assert c.finish_reason == "stop"
            assert r.usage.completion_tokens <= max_tokens


def test_completion_streaming_matches_the_whole_answer(client, server):
    whole = _greedy_completion(client, server, max_tokens=20)
    chunks = list(
        client.completions.create(
            model=server.model,
            prompt=COMPLETION_PROMPT,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({ch.id for ch in chunks}) == 1
    assert all(ch.object == "text_completion" for ch in chunks)
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == whole.choices[0].text
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_completion_stop_ends_the_text_before_the_stop_string(client, server):
    full = _greedy_completion(client, server, max_tokens=24, extra_body={"ignore_eos": True}).choices[0].text
    stop, k = _pick_stop(full)
    r = _greedy_completion(client, server, max_tokens=24, stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop", (full, stop)
    assert r.choices[0].text == full[:k], (full, stop)
    assert 0 < r.usage.completion_tokens < 24
    chunks = list(
        client.completions.create(
            model=server.model,
            prompt=COMPLETION_PROMPT,
            max_tokens=24,
            temperature=0,
            stop=stop,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full[:k], (full, stop)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"


def test_completion_seed_reproduces_sampled_text(client, server):
    def sample(seed):
        r = client.completions.create(
            model=server.model, prompt=SAMPLING_PROMPT, max_tokens=16, temperature=1, seed=seed
        )
        return r.choices[0].text

    a, b = sample(99), sample(99)
    assert a == b
    assert len({sample(s) for s in (10, 11, 12, 13, 14)} | {a}) > 1


def test_completion_n_2(client, server):
    r = client.completions.create(
        model=server.model, prompt=COMPLETION_PROMPT, max_tokens=5, temperature=1, seed=5, n=2, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.prompt_tokens == server.tokenize(prompt=COMPLETION_PROMPT)["count"]
    assert r.usage.completion_tokens == 10


# ---------------------------------------------------------------------- errors


def test_a_missing_or_wrong_key_is_an_authentication_error(server):
    with _client(server, server.inference_key) as c:
        with pytest.raises(openai.AuthenticationError) as e:
            c.chat.completions.create(
                model=server.model, messages=CHAT_MESSAGES, max_tokens=1, extra_headers={"Authorization": openai.Omit()}
            )
        assert e.value.status_code == 401
        assert e.value.type == "authentication_error"
    with _client(server, "not-a-key") as c:
        with pytest.raises(openai.AuthenticationError) as e:
            c.chat.completions.create(model=server.model, messages=CHAT_MESSAGES, max_tokens=1)
        assert e.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            c.completions.create(model=server.model, prompt="x", max_tokens=1, stream=True)
        with pytest.raises(openai.AuthenticationError):
            c.models.list()


def test_the_inference_role_cannot_use_the_admin_api(server):
    with _client(server, server.inference_key) as c:
        with pytest.raises(openai.PermissionDeniedError) as e:
            c.get(server.http + "/admin/v1/serving", cast_to=object)
        assert e.value.status_code == 403
    with _client(server, server.admin_key) as c:
        assert isinstance(c.get(server.http + "/admin/v1/serving", cast_to=object), (dict, list))


def test_an_unknown_model_is_not_found(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=CHAT_MESSAGES, max_tokens=1)
    assert e.value.code == "model_not_found"
    assert e.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1, stream=True)


def test_invalid_sampling_is_a_bad_request(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=server.model, messages=CHAT_MESSAGES, max_tokens=1, temperature=-1)
    assert e.value.param == "temperature"
    assert e.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=server.model, prompt="x", max_tokens=1, temperature=-1, stream=True)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=server.model, prompt="x", max_tokens=1, top_p=1.5)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=server.model, messages=CHAT_MESSAGES, max_tokens=1, n=0)


def _context(client, server) -> int:
    status, _, body = server.request("GET", "/v1/models", key=server.inference_key)
    assert status == 200
    return next(m["max_model_len"] for m in body["data"] if m["id"] == server.model)


def test_a_prompt_over_the_context_is_a_bad_request(client, server):
    ctx = _context(client, server)
    long_prompt = "the old bell " * ctx
    assert server.tokenize(prompt=long_prompt)["count"] > ctx
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model, prompt=long_prompt, max_tokens=1)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": long_prompt}], max_tokens=1, stream=True
        )
    assert e.value.code == "context_length_exceeded"
    # A short prompt asking for more than the context holds.
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=server.model, prompt="The", max_tokens=ctx + 1)


def test_an_oversized_body_is_413(client, server):
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=server.model, prompt="x" * (5 << 20), max_tokens=1)
    assert e.value.status_code == 413


def test_a_key_over_its_request_rate_gets_rate_limit_errors(server):
    with _client(server, server.limited_key) as c:
        for i in range(server.limited_rpm):
            r = c.completions.create(model=server.model, prompt="The", max_tokens=1)
            assert r.usage.completion_tokens == 1, i
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=server.model, prompt="The", max_tokens=1)
        assert e.value.status_code == 429
        assert e.value.code == "rate_limit_exceeded"
        assert int(e.value.response.headers["retry-after"]) >= 1
        # Streaming requests are limited the same way.
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model=server.model, messages=CHAT_MESSAGES, max_tokens=1, stream=True)
    # Other keys are not affected.
    with _client(server, server.inference_key) as c:
        assert c.completions.create(model=server.model, prompt="The", max_tokens=1).usage.completion_tokens == 1


def _wait_for(what: str, predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.02)


def test_a_burst_over_the_queue_limit_gets_rate_limit_errors(client, server):
    # Long streams on the slow model, opened without being read: the first
    # max_running run, the next max_waiting wait, the one after is refused.
    # Each stream lasts seconds; the test moves on as soon as the engine has
    # taken up the previous ones.
    model = server.slow_model

    def open_stream():
        return client.completions.create(
            model=model, prompt="hi", max_tokens=4000, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )

    def count(name):
        return server.metric_sum(name, model=model)

    streams = []
    try:
        for i in range(server.max_running):
            streams.append(open_stream())
            _wait_for(f"{i + 1} running", lambda: count("llmops_num_requests_running") == i + 1)
        for i in range(server.max_waiting):
            streams.append(open_stream())
            _wait_for(f"{i + 1} waiting", lambda: count("llmops_num_requests_waiting") == i + 1)
        with pytest.raises(openai.RateLimitError) as e:
            streams.append(open_stream())
        assert e.value.status_code == 429
        assert e.value.code == "server_overloaded"
        assert e.value.type == "rate_limit_error"
        assert int(e.value.response.headers["retry-after"]) >= 1
        # The admitted streams deliver.
        first = next(iter(streams[0]))
        assert first.id.startswith("cmpl-")
        assert first.model == model
    finally:
        for s in streams:
            s.close()
    # Closing the streams cancels them: the autouse fixture checks the
    # engine goes idle (long before 4 × 4000 tokens could have been made).


# ----------------------------------------------------------------- embeddings

EMBED_TEXTS = [
    "The whale swam under the grey sea at dawn.",
    "The baker opened his shop at six every morning.",
    "In the spring the river rose and covered the low fields.",
]


def _cosine(a, b) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na = sum(x * x for x in a) ** 0.5
    nb = sum(y * y for y in b) ** 0.5
    return dot / (na * nb)


def _floats(client, server, inputs, **kw):
    r = client.embeddings.create(model=server.model, input=inputs, encoding_format="float", **kw)
    return r, [d.embedding for d in sorted(r.data, key=lambda d: d.index)]


def test_embeddings_are_unit_vectors_and_a_text_is_its_own_nearest(client, server):
    r, rows = _floats(client, server, EMBED_TEXTS)
    assert r.object == "list" and len(rows) == len(EMBED_TEXTS)
    assert [d.index for d in r.data] == [0, 1, 2]
    width = len(rows[0])
    assert width > 1 and all(len(v) == width for v in rows)
    for v in rows:
        assert abs(sum(x * x for x in v) - 1.0) < 1e-4
    assert abs(_cosine(rows[0], rows[0]) - 1.0) < 1e-6
    # Different texts give different vectors.
    assert _cosine(rows[0], rows[1]) < 0.9999
    expected = sum(server.tokenize(prompt=t)["count"] for t in EMBED_TEXTS)
    assert r.usage.prompt_tokens == expected
    assert r.usage.total_tokens == expected


def test_an_embedding_does_not_depend_on_its_batch_or_its_place_in_it(client, server):
    _, batch = _floats(client, server, EMBED_TEXTS)
    _, reversed_batch = _floats(client, server, list(reversed(EMBED_TEXTS)))
    for i, text in enumerate(EMBED_TEXTS):
        _, alone = _floats(client, server, text)
        other = reversed_batch[len(EMBED_TEXTS) - 1 - i]
        assert max(abs(x - y) for x, y in zip(batch[i], alone[0])) < 1e-5
        assert max(abs(x - y) for x, y in zip(batch[i], other)) < 1e-5


def test_base64_embeddings_decode_to_the_float_result(client, server):
    # The SDK asks base64 when no format is given and decodes it itself.
    sdk = client.embeddings.create(model=server.model, input=EMBED_TEXTS[0])
    _, floats = _floats(client, server, EMBED_TEXTS[0])
    assert len(sdk.data[0].embedding) == len(floats[0])
    assert max(abs(x - y) for x, y in zip(sdk.data[0].embedding, floats[0])) < 1e-7
    # Raw: little-endian f32, as OpenAI sends it.
    import base64
    import struct

    status, _, body = server.request(
        "POST",
        "/v1/embeddings",
        {"model": server.model, "input": EMBED_TEXTS[0], "encoding_format": "base64"},
        key=server.inference_key,
    )
    assert status == 200, body
    raw = base64.b64decode(body["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert list(decoded) == [float(x) for x in struct.unpack(f"<{len(floats[0])}f", struct.pack(f"<{len(floats[0])}f", *floats[0]))]


def test_embeddings_take_token_arrays_and_truncate_to_dimensions(client, server):
    ids = server.tokenize(prompt=EMBED_TEXTS[0])["tokens"]
    _, by_text = _floats(client, server, EMBED_TEXTS[0])
    _, by_ids = _floats(client, server, [ids, ids[:3]])
    assert max(abs(x - y) for x, y in zip(by_text[0], by_ids[0])) < 1e-5
    _, short = _floats(client, server, EMBED_TEXTS[0], dimensions=4)
    assert len(short[0]) == 4
    assert abs(sum(x * x for x in short[0]) - 1.0) < 1e-5
    norm = sum(x * x for x in by_text[0][:4]) ** 0.5
    assert max(abs(x - y / norm) for x, y in zip(short[0], by_text[0][:4])) < 1e-5


def test_bad_embedding_requests_are_openai_errors(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=server.model, input="", encoding_format="float")
    assert e.value.param == "input"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=server.model, input=["x"] * 2049, encoding_format="float")
    assert e.value.param == "input"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=server.model, input="x", dimensions=0, encoding_format="float")
    assert e.value.param == "dimensions"
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="no-such-model", input="x")
    assert e.value.code == "model_not_found"


# ------------------------------------------------------------------ responses

RESPONSE_INPUT = "Tell me about the old town."


def test_responses_create_answers_with_text_and_usage(client, server):
    r = client.responses.create(
        model=server.model,
        input=RESPONSE_INPUT,
        instructions="You are a quiet lighthouse keeper.",
        max_output_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.object == "response"
    assert r.id.startswith("resp_")
    assert r.status in ("completed", "incomplete")
    assert r.output_text and r.output[0].role == "assistant"
    assert r.usage.output_tokens <= 12
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
        assert r.usage.output_tokens == 12


def test_responses_stream_sends_the_event_sequence_and_the_same_text(client, server):
    kw = dict(model=server.model, input=RESPONSE_INPUT, max_output_tokens=16, temperature=1.0, extra_body={"seed": 7, "ignore_eos": True})
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    last = "response.incomplete" if whole.status == "incomplete" else "response.completed"
    head = [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    tail = [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        last,
    ]
    assert kinds[:4] == head, kinds
    assert kinds[-4:] == tail, kinds
    assert set(kinds[4:-4]) == {"response.output_text.delta"}, kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == whole.output_text
    assert events[-4].text == whole.output_text
    assert events[-1].response.output_text == whole.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens


def test_previous_response_id_continues_the_conversation(client, server):
    eos = {"ignore_eos": True}
    first = client.responses.create(
        model=server.model, input=RESPONSE_INPUT, max_output_tokens=8, temperature=0, extra_body=eos
    )
    second = client.responses.create(
        model=server.model,
        input="And the harbour?",
        previous_response_id=first.id,
        max_output_tokens=8,
        temperature=0,
        extra_body=eos,
    )
    assert second.previous_response_id == first.id
    # The second turn's prompt is the whole conversation: the same as a chat
    # completion given both turns.
    chat = client.chat.completions.create(
        model=server.model,
        messages=[
            {"role": "user", "content": RESPONSE_INPUT},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "And the harbour?"},
        ],
        max_tokens=8,
        temperature=0,
        extra_body=eos,
    )
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.output_text == chat.choices[0].message.content
    assert client.responses.retrieve(first.id).output_text == first.output_text


def test_a_response_not_stored_cannot_be_continued(client, server):
    r = client.responses.create(model=server.model, input=RESPONSE_INPUT, max_output_tokens=4, temperature=0, store=False)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=server.model, input="more", previous_response_id=r.id, max_output_tokens=4)
    assert e.value.param == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_responses_refuse_a_malformed_text_format_or_tool_by_name(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(
            model=server.model,
            input="x",
            text={"format": {"type": "xml"}},
        )
    assert e.value.param == "text.format"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(
            model=server.model,
            input="x",
            tools=[{"type": "function", "name": "f f", "parameters": {"type": "object"}}],
        )
    assert e.value.param == "tools"
