"""The official clients over TLS against a running `llmops serve --tls-cert …
--admin-client-ca …`; `tests/it/tls.rs` makes the certificates, starts the
server and runs this file with:

    LLMOPS_TLS_HTTP         https://localhost:PORT
    LLMOPS_TLS_GRPC         localhost:PORT
    LLMOPS_TLS_CA           the CA that signed the server's and the client's certificates
    LLMOPS_TLS_CLIENT_CERT  a client certificate signed by that CA (PEM)
    LLMOPS_TLS_CLIENT_KEY   its key (PEM)
    LLMOPS_TLS_MODEL        a served model
    LLMOPS_TLS_ADMIN_KEY    secret of an admin key
    LLMOPS_TLS_INFERENCE_KEY  secret of an inference key
"""

from __future__ import annotations

import os
import ssl

import grpc
import openai
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

TIMEOUT = 30


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set (run `cargo test --release --test it tls`, which sets it)", pytrace=False)
    return value


HTTP = env("LLMOPS_TLS_HTTP")
GRPC = env("LLMOPS_TLS_GRPC")
CA = env("LLMOPS_TLS_CA")
CLIENT_CERT = env("LLMOPS_TLS_CLIENT_CERT")
CLIENT_KEY = env("LLMOPS_TLS_CLIENT_KEY")
MODEL = env("LLMOPS_TLS_MODEL")
ADMIN_KEY = env("LLMOPS_TLS_ADMIN_KEY")
INFERENCE_KEY = env("LLMOPS_TLS_INFERENCE_KEY")


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def tls_context(with_cert: bool) -> ssl.SSLContext:
    """Trusts the test CA only; presents the admin client certificate when asked."""
    ctx = ssl.create_default_context(cafile=CA)
    if with_cert:
        ctx.load_cert_chain(CLIENT_CERT, CLIENT_KEY)
    return ctx


def sdk(key: str, **http) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=HTTP + "/v1", api_key=key, max_retries=0, timeout=TIMEOUT, http_client=openai.DefaultHttpxClient(**http)
    )


# ---------------------------------------------------------------- the openai SDK


def test_openai_sdk_chat_and_stream_over_tls():
    client = sdk(INFERENCE_KEY, verify=tls_context(with_cert=False))
    assert MODEL in {m.id for m in client.models.list()}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=5)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens >= 1
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="Once",
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert any(c.choices and c.choices[0].text for c in chunks), chunks
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6, chunks[-1]


def test_openai_sdk_refuses_a_server_it_cannot_verify():
    # The system's roots do not know the test CA: the client must not connect.
    with pytest.raises(openai.APIConnectionError):
        sdk(INFERENCE_KEY).models.list()


def test_admin_over_https_needs_the_client_certificate():
    without = openai.DefaultHttpxClient(verify=tls_context(with_cert=False), timeout=TIMEOUT)
    r = without.get(HTTP + "/admin/v1/models", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 403, r.text
    assert r.json()["error"]["type"] == "permission_error", r.text
    assert "client certificate" in r.json()["error"]["message"]
    # Inference routes on the same connection kind still work.
    r = without.get(HTTP + "/v1/models", headers={"authorization": f"Bearer {INFERENCE_KEY}"})
    assert r.status_code == 200, r.text
    with_cert = openai.DefaultHttpxClient(verify=tls_context(with_cert=True), timeout=TIMEOUT)
    r = with_cert.get(HTTP + "/admin/v1/models", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200, r.text
    # The certificate does not replace the key's role.
    r = with_cert.get(HTTP + "/admin/v1/models", headers={"authorization": f"Bearer {INFERENCE_KEY}"})
    assert r.status_code == 403, r.text


# ---------------------------------------------------------------- grpcio


def channel(with_cert: bool) -> grpc.Channel:
    creds = (
        grpc.ssl_channel_credentials(root_certificates=read(CA), private_key=read(CLIENT_KEY), certificate_chain=read(CLIENT_CERT))
        if with_cert
        else grpc.ssl_channel_credentials(root_certificates=read(CA))
    )
    ch = grpc.secure_channel(GRPC, creds)
    grpc.channel_ready_future(ch).result(timeout=10)
    return ch


def call(ch: grpc.Channel, service: str, method: str, key: str, **fields):
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(ch))
    m = pool.FindServiceByName(service).methods_by_name[method]
    req_cls = message_factory.GetMessageClass(m.input_type)
    resp_cls = message_factory.GetMessageClass(m.output_type)
    make = ch.unary_stream if m.server_streaming else ch.unary_unary
    fn = make(f"/{service}/{method}", request_serializer=req_cls.SerializeToString, response_deserializer=resp_cls.FromString)
    return fn(req_cls(**fields), metadata=(("authorization", f"Bearer {key}"),), timeout=TIMEOUT)


def test_grpcio_reflection_and_generate_over_tls():
    ch = channel(with_cert=False)
    services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
    assert {"llmops.v1.Inference", "llmops.v1.Admin"} <= services, services
    r = call(ch, "llmops.v1.Inference", "Generate", INFERENCE_KEY, model=MODEL, prompt="Once", max_tokens=4, ignore_eos=True)
    assert r.usage.completion_tokens == 4
    streamed = list(call(ch, "llmops.v1.Inference", "GenerateStream", INFERENCE_KEY, model=MODEL, prompt="Once", max_tokens=4, ignore_eos=True))
    assert streamed[-1].usage.completion_tokens == 4
    ch.close()


def test_grpc_admin_needs_the_client_certificate():
    ch = channel(with_cert=False)
    with pytest.raises(grpc.RpcError) as e:
        call(ch, "llmops.v1.Admin", "ListModels", ADMIN_KEY)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, e.value
    assert "client certificate" in e.value.details()
    ch.close()
    ch = channel(with_cert=True)
    r = call(ch, "llmops.v1.Admin", "ListModels", ADMIN_KEY)
    assert MODEL in {m.model for m in r.models}, r
    ch.close()


def test_a_plaintext_grpc_channel_fails_cleanly():
    ch = grpc.insecure_channel(GRPC)
    with pytest.raises(grpc.RpcError) as e:
        call_plain = ch.unary_unary("/llmops.v1.Inference/ListModels", request_serializer=lambda m: m, response_deserializer=lambda b: b)
        call_plain(b"", timeout=5, metadata=(("authorization", f"Bearer {INFERENCE_KEY}"),))
    assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED), e.value
    ch.close()
