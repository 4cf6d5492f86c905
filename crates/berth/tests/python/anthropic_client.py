"""The official anthropic SDK against berth's Messages API: create, stream (the SDK checks the event
sequence as it assembles the message), stop sequences, tools with a tool_result round trip, streamed
tool input, count_tokens, and errors in Anthropic's shape. Every check raises on failure."""
import json
import sys

import anthropic
import jsonschema

base_url, model, key = sys.argv[1:4]
# The SDK (2.x) no longer types sampling parameters; the API still takes them in the body.
client = anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=0, timeout=300)
ask = [{"role": "user", "content": "What is the capital of France?"}]

# Create.
m = client.messages.create(model=model, max_tokens=24, messages=ask, extra_body={"temperature": 0}, system="Be brief.")
assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg"), m
assert m.content[0].type == "text" and m.content[0].text, m
assert m.stop_reason in ("end_turn", "max_tokens") and m.usage.input_tokens > 0 and m.usage.output_tokens > 0, m

# Stream: the SDK assembles the events into the same message.
with client.messages.stream(model=model, max_tokens=24, messages=ask, extra_body={"temperature": 0}, system="Be brief.") as s:
    text = "".join(s.text_stream)
    final = s.get_final_message()
assert text == m.content[0].text == final.content[0].text, (text, m.content[0].text)
assert final.stop_reason == m.stop_reason and final.usage.output_tokens == m.usage.output_tokens, final
streamed = list(client.messages.create(model=model, max_tokens=8, messages=ask, stream=True))
events = [e.type for e in streamed]
assert events[0] == "message_start" and events[-1] == "message_stop" and "message_delta" in events, events
# The prompt's size is told up front, as Anthropic's own stream does.
assert streamed[0].message.usage.input_tokens > 0, streamed[0]
assert events.index("content_block_start") < events.index("content_block_delta") < events.index("content_block_stop"), events

# Stop sequences: the answer stops before the sequence, and says which.
words = m.content[0].text.split()
if len(words) > 2:
    r = client.messages.create(model=model, max_tokens=24, messages=ask, extra_body={"temperature": 0}, system="Be brief.",
                               stop_sequences=[words[2]])
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == words[2], r
    assert r.content[0].text == m.content[0].text[: m.content[0].text.index(words[2])], r

# Content blocks and a multi-turn conversation.
r = client.messages.create(model=model, max_tokens=16, extra_body={"temperature": 0}, messages=[
    {"role": "user", "content": [{"type": "text", "text": "Hi! "}, {"type": "text", "text": "Who are you?"}]},
    {"role": "assistant", "content": "I am an assistant."},
    {"role": "user", "content": "Say more."}])
assert r.content[0].text, r

# Tools: a forced call, its result sent back, and the answer.
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"],
           "additionalProperties": False}
tools = [{"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER}]
weather = [{"role": "user", "content": "What is the weather in Paris?"}]
r = client.messages.create(model=model, max_tokens=200, extra_body={"temperature": 0}, messages=weather, tools=tools,
                           tool_choice={"type": "any"})
uses = [b for b in r.content if b.type == "tool_use"]
assert r.stop_reason == "tool_use" and uses and uses[0].name == "get_weather" and uses[0].id.startswith("toolu_"), r
jsonschema.validate(uses[0].input, WEATHER)
named = client.messages.create(model=model, max_tokens=200, extra_body={"temperature": 1}, messages=weather, tools=tools,
                               tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True})
assert [b.name for b in named.content if b.type == "tool_use"] == ["get_weather"], named
follow = weather + [{"role": "assistant", "content": [b.model_dump() for b in r.content]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                                  "content": json.dumps({"temperature": 18, "sky": "sunny"})}]}]
r2 = client.messages.create(model=model, max_tokens=40, extra_body={"temperature": 0}, messages=follow, tools=tools,
                            tool_choice={"type": "none"})
assert r2.content[0].type == "text" and r2.content[0].text and r2.stop_reason in ("end_turn", "max_tokens"), r2

# Streamed tool use: the SDK assembles the input from input_json_delta events.
with client.messages.stream(model=model, max_tokens=200, extra_body={"temperature": 0}, messages=weather, tools=tools,
                            tool_choice={"type": "any"}) as s:
    streamed = s.get_final_message()
assert [(b.name, b.input) for b in streamed.content if b.type == "tool_use"] == [(u.name, u.input) for u in uses], streamed
assert streamed.stop_reason == "tool_use", streamed

# count_tokens equals the prompt the model reads.
n = client.messages.count_tokens(model=model, messages=ask, system="Be brief.").input_tokens
assert n == m.usage.input_tokens, (n, m.usage)
assert client.messages.count_tokens(model=model, messages=weather, tools=tools).input_tokens > \
    client.messages.count_tokens(model=model, messages=weather).input_tokens

# Errors in Anthropic's shape, as the SDK's own exceptions.
try:
    client.messages.create(model="no-such-model", max_tokens=8, messages=ask)
    raise AssertionError("an unknown model must fail")
except anthropic.NotFoundError as e:
    assert e.body["type"] == "error" and e.body["error"]["type"] == "not_found_error", e.body
try:
    client.messages.create(model=model, max_tokens=8, messages=ask, extra_body={"temperature": 1.5})
    raise AssertionError("temperature 1.5 must fail")
except anthropic.BadRequestError as e:
    assert e.body["error"]["type"] == "invalid_request_error" and "temperature" in e.body["error"]["message"], e.body
try:
    anthropic.Anthropic(base_url=base_url, api_key="berth-wrong", max_retries=0).messages.create(
        model=model, max_tokens=8, messages=ask)
    raise AssertionError("a wrong key must fail")
except anthropic.AuthenticationError as e:
    assert e.body["error"]["type"] == "authentication_error", e.body
print("anthropic SDK: create, stream, stop sequences, tools, count_tokens, errors: ok")
