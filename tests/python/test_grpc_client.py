"""Python gRPC clients against a running `llmops serve`, with no .proto
files: the Inference API is discovered through server reflection and its
messages are built from the descriptors the server returns.
"""

from __future__ import annotations

import time

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from conftest import Server

SERVICE = "llmops.v1.Inference"
HEALTH = "grpc.health.v1.Health"
PROMPT = "The whale swam"
TIMEOUT = 30  # seconds, for every call that should answer at once


@pytest.fixture(scope="module")
def channel(server: Server):
    ch = grpc.insecure_channel(server.grpc)
    grpc.channel_ready_future(ch).result(timeout=10)
    yield ch
    ch.close()


class Api:
    """The Inference service as reflection describes it."""

    def __init__(self, channel: grpc.Channel, key: str):
        self.db = ProtoReflectionDescriptorDatabase(channel)
        self.pool = descriptor_pool.DescriptorPool(self.db)
        self.service = self.pool.FindServiceByName(SERVICE)
        self.methods = {m.name: m for m in self.service.methods}
        self.channel = channel
        self.metadata = (("authorization", f"Bearer {key}"),)

    def message(self, full_name: str):
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(full_name))

    def _callable(self, name: str):
        m = self.methods[name]
        req_cls = message_factory.GetMessageClass(m.input_type)
        resp_cls = message_factory.GetMessageClass(m.output_type)
        path = f"/{SERVICE}/{name}"
        make = self.channel.unary_stream if m.server_streaming else self.channel.unary_unary
        return req_cls, make(path, request_serializer=req_cls.SerializeToString, response_deserializer=resp_cls.FromString)

    def call(self, name: str, metadata=None, **fields):
        req_cls, fn = self._callable(name)
        return fn(req_cls(**fields), metadata=self.metadata if metadata is None else metadata, timeout=TIMEOUT)

    def stream(self, name: str, timeout=TIMEOUT, **fields):
        req_cls, fn = self._callable(name)
        return fn(req_cls(**fields), metadata=self.metadata, timeout=timeout)


@pytest.fixture(scope="module")
def api(channel, server) -> Api:
    return Api(channel, server.inference_key)


def _enum(api: Api, enum_full_name: str, value_name: str) -> int:
    return api.pool.FindEnumTypeByName(enum_full_name).values_by_name[value_name].number


# ------------------------------------------------------------------ reflection


def test_reflection_v1alpha_lists_the_services(channel):
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {SERVICE, HEALTH} <= services, services


def test_reflection_v1_lists_the_services(channel):
    # v1 has the same messages as v1alpha under another service name.
    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    responses = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT))
    assert len(responses) == 1
    assert responses[0].WhichOneof("message_response") == "list_services_response"
    services = {s.name for s in responses[0].list_services_response.service}
    assert {SERVICE, HEALTH} <= services, services


def test_reflection_describes_the_inference_service(api):
    assert set(api.methods) == {"Generate", "GenerateStream", "Tokenize", "ListModels", "Embed"}
    assert api.methods["GenerateStream"].server_streaming
    assert not api.methods["Generate"].server_streaming
    assert not any(m.client_streaming for m in api.methods.values())
    req = api.methods["Generate"].input_type
    assert {"model", "prompt", "chat", "max_tokens", "sampling", "stop", "ignore_eos"} <= set(req.fields_by_name)


# ---------------------------------------------------------------------- health


def test_health_check_overall_service_and_model(channel, server):
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE, server.model, server.slow_model):
        r = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
        assert r.status == health_pb2.HealthCheckResponse.SERVING, name
    with pytest.raises(grpc.RpcError) as e:
        stub.Check(health_pb2.HealthCheckRequest(service="no-such-model"), timeout=TIMEOUT)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_watch_sends_serving(channel, server):
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", server.model):
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
        try:
            first = next(watch)
            assert first.status == health_pb2.HealthCheckResponse.SERVING, name
        finally:
            watch.cancel()
        # Cancelling a watch is a local CANCELLED, not a server failure.
        with pytest.raises(grpc.RpcError) as e:
            next(watch)
        assert e.value.code() == grpc.StatusCode.CANCELLED


# ------------------------------------------------------------------- inference


def test_list_models_matches_the_http_api(api, server):
    r = api.call("ListModels")
    cards = {m.name: m for m in r.models}
    assert {server.model, server.slow_model} <= set(cards)
    card = cards[server.model]
    assert card.ready
    status, _, body = server.request("GET", "/v1/models", key=server.inference_key)
    assert status == 200
    http = next(m for m in body["data"] if m["id"] == server.model)
    assert card.context_length == http["max_model_len"]
    assert card.version == http["version"]
    assert card.parameters == http["parameters"]


def test_tokenize_matches_the_http_api(api, server):
    r = api.call("Tokenize", model=server.model, text=PROMPT, add_special_tokens=True)
    http = server.tokenize(prompt=PROMPT, add_special_tokens=True)
    assert list(r.token_ids) == http["tokens"]
    assert len(r.tokens) == len(r.token_ids)


def test_embed_matches_the_http_api(api, server):
    EmbedInput = api.message("llmops.v1.EmbedInput")
    r = api.call("Embed", model=server.model, inputs=[EmbedInput(text=PROMPT)])
    assert len(r.embeddings) == 1
    got = list(r.embeddings[0].values)
    status, _, body = server.request(
        "POST",
        "/v1/embeddings",
        {"model": server.model, "input": PROMPT, "encoding_format": "float"},
        key=server.inference_key,
    )
    assert status == 200, body
    want = body["data"][0]["embedding"]
    assert len(got) == len(want)
    assert max(abs(x - y) for x, y in zip(got, want)) < 1e-6
    assert r.usage.prompt_tokens == body["usage"]["prompt_tokens"] == r.usage.total_tokens
    with pytest.raises(grpc.RpcError) as e:
        api.call("Embed", model=server.model, inputs=[])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_generate_stream_delivers_tokens_then_usage(api, server):
    max_tokens = 12
    messages = list(api.stream("GenerateStream", model=server.model, prompt=PROMPT, max_tokens=max_tokens, ignore_eos=True))
    *tokens, last = messages
    assert len(tokens) == max_tokens
    assert all(len(m.token_ids) == 1 for m in tokens)
    assert all(m.finish_reason == 0 and not m.HasField("usage") for m in tokens)
    assert all(m.model == server.model and m.version for m in messages)
    assert last.finish_reason == _enum(api, "llmops.v1.FinishReason", "FINISH_REASON_LENGTH")
    assert last.HasField("usage")
    prompt_tokens = server.tokenize(prompt=PROMPT)["count"]
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        prompt_tokens,
        max_tokens,
        prompt_tokens + max_tokens,
    )
    streamed = "".join(m.text for m in messages)
    ids = [m.token_ids[0] for m in tokens]
    status, _, body = server.request("POST", "/detokenize", {"model": server.model, "tokens": ids}, key=server.inference_key)
    assert status == 200, body
    assert body["prompt"] == streamed
    # The unary call and the OpenAI endpoint (both greedy) agree with the stream.
    whole = api.call("Generate", model=server.model, prompt=PROMPT, max_tokens=max_tokens, ignore_eos=True)
    assert whole.text == streamed
    assert list(whole.token_ids) == ids
    assert whole.usage.completion_tokens == max_tokens
    status, _, body = server.request(
        "POST",
        "/v1/completions",
        {"model": server.model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
        key=server.inference_key,
    )
    assert status == 200, body
    assert body["choices"][0]["text"] == streamed


def test_generate_stream_of_a_chat_with_stop(api, server):
    ChatMessages = api.message("llmops.v1.ChatMessages")
    ChatMessage = api.message("llmops.v1.ChatMessage")
    chat = ChatMessages(messages=[ChatMessage(role="user", content="Tell me about the baker.")])
    full = "".join(m.text for m in api.stream("GenerateStream", model=server.model, chat=chat, max_tokens=24, ignore_eos=True))
    words = [w for w in full.split()[1:-1] if len(w) >= 2]
    assert words, full
    stop = words[0]
    k = full.find(stop)
    messages = list(api.stream("GenerateStream", model=server.model, chat=chat, max_tokens=24, ignore_eos=True, stop=[stop]))
    assert "".join(m.text for m in messages) == full[:k], (full, stop)
    assert messages[-1].finish_reason == _enum(api, "llmops.v1.FinishReason", "FINISH_REASON_STOP")
    assert 0 < messages[-1].usage.completion_tokens < 24


def test_seeded_sampling_repeats_over_grpc(api, server):
    Sampling = api.message("llmops.v1.SamplingParams")

    def sample(seed):
        r = api.call(
            "Generate",
            model=server.model,
            prompt="Tell me about the old town.",
            max_tokens=16,
            sampling=Sampling(temperature=1.0, seed=seed),
        )
        return r.text

    a = sample(4242)
    assert sample(4242) == a
    assert len({sample(s) for s in (1, 2, 3, 4, 5)} | {a}) > 1


def test_grpc_errors_have_the_right_codes(api, server):
    with pytest.raises(grpc.RpcError) as e:
        api.call("Generate", metadata=(), model=server.model, prompt=PROMPT, max_tokens=1)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        api.call("Generate", metadata=(("authorization", "Bearer wrong"),), model=server.model, prompt=PROMPT, max_tokens=1)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        api.call("Generate", model="no-such-model", prompt=PROMPT, max_tokens=1)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    Sampling = api.message("llmops.v1.SamplingParams")
    with pytest.raises(grpc.RpcError) as e:
        list(api.stream("GenerateStream", model=server.model, prompt=PROMPT, max_tokens=1, sampling=Sampling(temperature=-1.0)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_cancelled_stream_frees_its_sequence(api, server):
    model = server.slow_model
    status, _, body = server.request("GET", "/v1/models", key=server.inference_key)
    ctx = next(m["max_model_len"] for m in body["data"] if m["id"] == model)
    max_tokens = ctx - 16
    assert max_tokens >= 4000, "the slow model needs a long context so the stream outlasts the cancel"
    generated = lambda: server.metric_sum("llmops_generation_tokens_total", model=model)  # noqa: E731
    before = generated()
    call = api.stream("GenerateStream", timeout=300, model=model, prompt="hi", max_tokens=max_tokens, ignore_eos=True)
    got = [next(call), next(call)]
    assert all(len(m.token_ids) == 1 and m.model == model for m in got)
    assert server.running(model) == 1, "the stream is running"
    call.cancel()
    with pytest.raises(grpc.RpcError) as e:
        for _ in call:
            pass
    assert e.value.code() == grpc.StatusCode.CANCELLED
    deadline = time.monotonic() + 10
    while (n := server.running(model)) != 0:
        assert time.monotonic() < deadline, f"llmops_num_requests_running{{model={model}}} is still {n} 10 s after the cancel"
        time.sleep(0.05)
    # It stopped because of the cancel, not because it ran to the end.
    assert generated() - before < max_tokens
    # And the server keeps serving.
    r = api.call("Generate", model=model, prompt="hi", max_tokens=2, ignore_eos=True)
    assert r.usage.completion_tokens == 2
