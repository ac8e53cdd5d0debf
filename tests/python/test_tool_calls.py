"""Tool calls and structured Responses through the official `openai` SDK:
`tool_choice` required and named enforced by the grammar (50 sampled
requests), a two-turn conversation with a `tool` result, streamed
`tool_calls` deltas that reassemble to the non-streamed answer, an unknown
tool name refused, and `client.responses.create` with a `text.format`
json_schema and a function tool. On the embedded model and on Gemma 3 270M
(`LLMOPS_TEST_STRUCTURED_MODEL`, `LLMOPS_TEST_GEMMA_MODEL`).
"""

from __future__ import annotations

import json
import os

import openai
import pytest

from conftest import Server

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a timezone.",
        "parameters": {
            "type": "object",
            "properties": {"tz": {"type": "string", "maxLength": 20}},
            "required": ["tz"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


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
    with openai.OpenAI(base_url=server.http + "/v1", api_key=server.inference_key, max_retries=0, timeout=300) as c:
        yield c


def _check_weather(args: dict) -> None:
    assert set(args) == {"city", "unit"}, args
    assert isinstance(args["city"], str) and len(args["city"]) <= 12, args
    assert args["unit"] in ("celsius", "fahrenheit"), args


def _check_time(args: dict) -> None:
    assert set(args) == {"tz"}, args
    assert isinstance(args["tz"], str) and len(args["tz"]) <= 20, args


CHECKS = {"get_weather": _check_weather, "get_time": _check_time}


def test_required_and_named_tool_choices_always_return_arguments_that_match_the_schema(client, model):
    for seed in range(50):
        named = seed % 2 == 0
        choice = {"type": "function", "function": {"name": "get_weather"}} if named else "required"
        c = client.chat.completions.create(
            model=model,
            messages=ASK,
            tools=TOOLS,
            tool_choice=choice,
            parallel_tool_calls=False,
            temperature=1.0,
            seed=seed,
            max_tokens=120,
        )
        ch = c.choices[0]
        assert ch.finish_reason == "tool_calls", (seed, ch)
        calls = ch.message.tool_calls
        assert calls and len(calls) == 1, (seed, ch.message)
        call = calls[0]
        assert call.type == "function" and call.id.startswith("call_"), call
        if named:
            assert call.function.name == "get_weather", call
        CHECKS[call.function.name](json.loads(call.function.arguments))


def test_a_two_turn_conversation_with_a_tool_result_answers_in_text(client, model):
    first = client.chat.completions.create(
        model=model,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=1.0,
        seed=7,
        max_tokens=120,
    )
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    second = client.chat.completions.create(
        model=model, messages=history, tools=TOOLS, tool_choice="none", temperature=1.0, seed=8, max_tokens=24
    )
    ch = second.choices[0]
    assert ch.message.tool_calls is None, ch
    assert isinstance(ch.message.content, str) and ch.finish_reason in ("stop", "length"), ch
    # The call and its result are in the prompt (`none` shows no tools).
    alone = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=1)
    assert second.usage.prompt_tokens > alone.usage.prompt_tokens + 10, (second.usage, alone.usage)


def _reassemble(chunks) -> tuple[str, list[tuple[str, dict]], str]:
    """Content, calls and finish reason of a raw chat stream (for `auto`,
    which may end with `length`: the SDK's stream helper refuses those)."""
    content, calls, reason = "", {}, None
    for chunk in chunks:
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for d in ch.delta.tool_calls or []:
                c = calls.setdefault(d.index, {"name": "", "arguments": ""})
                c["name"] += d.function.name or ""
                c["arguments"] += d.function.arguments or ""
            reason = ch.finish_reason or reason
    return content, [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())], reason


def test_streamed_tool_call_deltas_reassemble_to_the_non_streamed_answer(client, model):
    for seed, choice in [(1, "required"), (2, {"type": "function", "function": {"name": "get_time"}}), (5, "required")]:
        kw = dict(model=model, messages=ASK, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=120)
        whole = client.chat.completions.create(**kw).choices[0]
        with client.chat.completions.stream(**kw) as stream:
            for _ in stream:
                pass
            streamed = stream.get_final_completion().choices[0]
        assert streamed.finish_reason == whole.finish_reason == "tool_calls", (seed, streamed, whole)
        got = [(c.function.name, json.loads(c.function.arguments)) for c in streamed.message.tool_calls]
        want = [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]
        assert got == want, (seed, got, want)
    # `auto`: text or calls, whichever the model writes, the same both ways.
    for seed in range(3):
        kw = dict(model=model, messages=ASK, tools=TOOLS, tool_choice="auto", temperature=1.0, seed=seed, max_tokens=40)
        whole = client.chat.completions.create(**kw).choices[0]
        content, calls, reason = _reassemble(client.chat.completions.create(stream=True, **kw))
        want = [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls or []]
        assert calls == want and reason == whole.finish_reason, (seed, calls, reason, whole)
        assert content.strip() == (whole.message.content or "").strip(), (seed, content, whole)


def test_an_unknown_tool_name_in_tool_choice_is_a_400(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model,
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "launch_rocket"}},
            max_tokens=8,
        )
    assert e.value.status_code == 400
    assert "launch_rocket" in str(e.value) and "tool_choice" in str(e.value), e.value


def test_responses_create_with_a_json_schema_text_format_returns_json_for_the_schema(client, model):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "rain": {"type": "boolean"}},
        "required": ["city", "rain"],
        "additionalProperties": False,
    }
    for seed in range(5):
        r = client.responses.create(
            model=model,
            input="Describe the weather in Oslo as JSON.",
            text={"format": {"type": "json_schema", "name": "weather", "schema": schema, "strict": True}},
            temperature=1.0,
            max_output_tokens=80,
            extra_body={"seed": seed},
        )
        assert r.status == "completed", r
        v = json.loads(r.output_text)
        assert set(v) == {"city", "rain"} and isinstance(v["rain"], bool), v
        assert r.text.format.type == "json_schema"


def test_responses_create_with_a_function_tool_returns_a_function_call_and_takes_its_output(client, model):
    tool = {"type": "function", **WEATHER["function"]}
    r = client.responses.create(
        model=model,
        input="What is the weather in Paris?",
        tools=[tool],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=1.0,
        max_output_tokens=120,
        extra_body={"seed": 5},
    )
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) >= 1, r.output
    _check_weather(json.loads(calls[0].arguments))
    follow = client.responses.create(
        model=model,
        previous_response_id=r.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temperature": 21}'}],
        tools=[tool],
        tool_choice="none",
        max_output_tokens=16,
        extra_body={"seed": 6},
    )
    assert follow.status in ("completed", "incomplete"), follow
    assert all(o.type == "message" for o in follow.output), follow.output


def test_responses_streamed_with_a_function_tool_end_with_the_same_call_as_the_whole_response(client, model):
    tool = {"type": "function", **TIME["function"]}
    kw = dict(
        model=model,
        input="What time is it in Tokyo?",
        tools=[tool],
        tool_choice={"type": "function", "name": "get_time"},
        temperature=1.0,
        max_output_tokens=80,
        extra_body={"seed": 11},
    )
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1, kinds
    want = [o for o in whole.output if o.type == "function_call"][0]
    assert json.loads(done[0].arguments) == json.loads(want.arguments)
    final = [o for o in events[-1].response.output if o.type == "function_call"][0]
    assert final.name == "get_time" and final.arguments == done[0].arguments


def test_responses_streamed_with_tools_send_text_as_it_comes_and_match_the_whole_response(client, model):
    # `auto`: the model may answer in text; that text streams token by
    # token (a call would be held until the output is whole).
    kw = dict(
        model=model,
        input="Say hello to the user in a few words.",
        tools=[{"type": "function", **WEATHER["function"]}],
        tool_choice="auto",
        temperature=0.0,
        max_output_tokens=24,
    )
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"], kinds
    assert kinds[-1] in ("response.completed", "response.incomplete"), kinds
    final = events[-1].response
    assert [o.type for o in final.output] == [o.type for o in whole.output], (final.output, whole.output)
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    messages = [o for o in final.output if o.type == "message"]
    if messages:
        text = messages[0].content[0].text
        assert "".join(d.delta for d in deltas) == text
        assert text == [o for o in whole.output if o.type == "message"][0].content[0].text
        # Streamed as it came: more than one delta, the first long before the end.
        assert len(deltas) > 1, kinds
        assert kinds.index("response.output_text.delta") < kinds.index("response.output_text.done") - 1, kinds
    else:
        assert not deltas, kinds
        assert all(o.type == "function_call" for o in final.output), final.output
