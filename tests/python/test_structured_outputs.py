"""Structured outputs through the official `openai` SDK: `chat.completions.parse`
with a Pydantic model, `response_format` json_schema / json_object, and vLLM's
`guided_regex` / `guided_choice` / `guided_grammar` (sent as `extra_body`), on
the embedded model (`LLMOPS_TEST_STRUCTURED_MODEL`), sampled at temperature 1; and on Gemma 3 270M (`LLMOPS_TEST_GEMMA_MODEL`)
when the clients test serves it.
"""

from __future__ import annotations

import json
import os
import re
import threading
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from conftest import Server


def _models() -> list[str]:
    names = [os.environ.get("LLMOPS_TEST_STRUCTURED_MODEL", "")]
    if os.environ.get("LLMOPS_TEST_GEMMA_MODEL"):
        names.append(os.environ["LLMOPS_TEST_GEMMA_MODEL"])
    return names


@pytest.fixture(scope="module", params=_models())
def model(request) -> str:
    if not request.param:
        pytest.fail("LLMOPS_TEST_STRUCTURED_MODEL is not set (run `cargo test --release --test it clients`)", pytrace=False)
    return request.param


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    with openai.OpenAI(base_url=server.http + "/v1", api_key=server.inference_key, max_retries=0, timeout=120) as c:
        yield c


class Item(BaseModel):
    name: str = Field(min_length=1, max_length=10)
    quantity: int = Field(ge=1, le=99)


class Order(BaseModel):
    size: Literal["small", "medium", "large"]
    items: list[Item] = Field(min_length=1, max_length=3)
    urgent: bool


MESSAGES = [{"role": "user", "content": "Write an order as JSON."}]


def test_parse_with_a_pydantic_model_returns_an_object_that_validates_for_twenty_sampled_requests(client, model):
    for seed in range(20):
        completion = client.chat.completions.parse(
            model=model,
            messages=MESSAGES,
            response_format=Order,
            temperature=1.0,
            seed=seed,
            max_tokens=400,
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", (seed, choice)
        order = choice.message.parsed
        assert isinstance(order, Order), (seed, choice.message.content)
        # The text itself validates too (not only what the SDK made of it).
        Order.model_validate_json(choice.message.content)


def test_a_regex_constraint_holds_over_fifty_sampled_requests(client, model):
    pattern = r"[A-Z][a-z]{2,6} [0-9]{1,3}(\.[0-9])?"
    for seed in range(50):
        c = client.completions.create(
            model=model,
            prompt="The code is",
            max_tokens=32,
            temperature=1.0,
            seed=seed,
            extra_body={"guided_regex": pattern},
        )
        text = c.choices[0].text
        assert re.fullmatch(pattern, text), (seed, text)
        assert c.choices[0].finish_reason == "stop", (seed, c.choices[0])


def test_a_choice_constraint_holds_over_fifty_sampled_requests(client, model):
    choices = ["red", "green", "blue", "dark grey"]
    seen = set()
    for seed in range(50):
        c = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Pick a colour."}],
            max_tokens=16,
            temperature=1.0,
            seed=seed,
            extra_body={"guided_choice": choices},
        )
        text = c.choices[0].message.content
        assert text in choices, (seed, text)
        assert c.choices[0].finish_reason == "stop"
        seen.add(text)
    # Sampled, not one fixed answer.
    assert len(seen) > 1, seen


NESTED_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 1000},
        "status": {"type": "string", "enum": ["open", "closed", "pending"]},
        "owner": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 8},
                "roles": {"type": "array", "items": {"type": "string", "enum": ["admin", "dev", "ops"]}, "maxItems": 3},
            },
            "required": ["name", "roles"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 2},
    },
    "required": ["id", "status", "owner", "tags"],
    "additionalProperties": False,
}


def _check_nested(v: dict) -> None:
    assert set(v) == {"id", "status", "owner", "tags"}, v
    assert isinstance(v["id"], int) and 0 <= v["id"] <= 1000, v
    assert v["status"] in ("open", "closed", "pending"), v
    assert set(v["owner"]) == {"name", "roles"}, v
    assert isinstance(v["owner"]["name"], str) and len(v["owner"]["name"]) <= 8, v
    assert all(r in ("admin", "dev", "ops") for r in v["owner"]["roles"]) and len(v["owner"]["roles"]) <= 3, v
    assert 1 <= len(v["tags"]) <= 2 and all(isinstance(t, str) and len(t) <= 6 for t in v["tags"]), v


def test_a_schema_with_nested_objects_arrays_enums_and_required_fields_holds(client, model):
    for seed in range(10):
        c = client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            max_tokens=300,
            temperature=1.0,
            seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "ticket", "schema": NESTED_SCHEMA, "strict": True}},
        )
        assert c.choices[0].finish_reason == "stop", c.choices[0]
        _check_nested(json.loads(c.choices[0].message.content))


def test_json_object_and_a_lark_grammar_constrain_completions_too(client, model):
    c = client.completions.create(
        model=model,
        prompt="{",
        max_tokens=200,
        temperature=1.0,
        seed=3,
        extra_body={"response_format": {"type": "json_object"}},
    )
    # Any object: unbounded, so it may run out of tokens (then a prefix).
    if c.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(c.choices[0].text), dict), c.choices[0].text
    else:
        assert c.choices[0].finish_reason == "length" and c.choices[0].text.startswith("{"), c.choices[0]
    grammar = 'start: "say " WORD "!"\nWORD: /[a-z]{1,5}/\n'
    c = client.completions.create(
        model=model, prompt="x", max_tokens=20, temperature=1.0, seed=4, extra_body={"guided_grammar": grammar}
    )
    assert re.fullmatch(r"say [a-z]{1,5}!", c.choices[0].text), c.choices[0].text


def test_a_schema_that_cannot_compile_is_a_400_naming_the_problem(client, model, server):
    before = server.metric_sum("llmops_structured_compile_failures_total", model=model)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            max_tokens=10,
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}},
        )
    assert e.value.status_code == 400
    assert "response_format" in str(e.value), e.value
    assert "missing" in str(e.value), e.value
    assert server.metric_sum("llmops_structured_compile_failures_total", model=model) == before + 1


def test_a_one_megabyte_schema_is_a_400(client, model):
    props = {f"field_{i:06d}": {"type": "string", "description": "x" * 40} for i in range(16_000)}
    schema = {"type": "object", "properties": props}
    assert len(json.dumps(schema)) > 1_000_000
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            max_tokens=10,
            response_format={"type": "json_schema", "json_schema": {"name": "huge", "schema": schema}},
        )
    assert "at most" in str(e.value), e.value


def test_a_grammar_that_cannot_finish_within_max_tokens_ends_with_length_while_others_are_served(client, model, server):
    result = {}

    def long_one():
        result["c"] = client.completions.create(
            model=model, prompt="x", max_tokens=40, temperature=1.0, seed=1, extra_body={"guided_regex": "[a-z]{500}"}
        )

    t = threading.Thread(target=long_one)
    t.start()
    other = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, temperature=1.0, seed=2)
    assert other.choices[0].message.content is not None
    t.join(timeout=120)
    assert not t.is_alive()
    c = result["c"].choices[0]
    assert c.finish_reason == "length", c
    assert re.fullmatch("[a-z]+", c.text), c.text


def test_structured_requests_and_mask_times_are_counted(client, model, server):
    before = server.metric_sum("llmops_structured_requests_total", model=model, kind="choice")
    client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=8, temperature=1.0, seed=9, extra_body={"guided_choice": ["a", "b"]}
    )
    samples = server.metrics()
    assert server.metric_sum("llmops_structured_requests_total", samples, model=model, kind="choice") == before + 1
    assert server.metric_sum("llmops_structured_mask_seconds_count", samples, model=model) > 0
