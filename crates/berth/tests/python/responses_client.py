"""The openai client's Responses API and the OpenAI Agents SDK against berth: create, stream,
retrieve, delete, previous_response_id, text.format, function tools, stored responses kept per key;
and an agent that calls a Python function tool through berth. Every check raises on failure."""
import asyncio
import json
import sys

import jsonschema
import openai

base_url, model, key, other_key = sys.argv[1:5]
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=300)

# Create, then retrieve the stored response.
r = client.responses.create(model=model, input="What is the capital of France?", instructions="Be brief.",
                            max_output_tokens=24, temperature=0)
assert r.object == "response" and r.id.startswith("resp") and r.status in ("completed", "incomplete"), r
assert r.output_text and r.output[0].type == "message" and r.usage.input_tokens > 0, r
again = client.responses.retrieve(r.id)
assert again.id == r.id and again.output_text == r.output_text, again

# Stream: the events, and the same text as the plain answer.
events, deltas, final = [], [], None
with client.responses.stream(model=model, input="What is the capital of France?", instructions="Be brief.",
                             max_output_tokens=24, temperature=0) as s:
    for e in s:
        events.append(e.type)
        if e.type == "response.output_text.delta":
            deltas.append(e.delta)
    final = s.get_final_response()
assert events[0] == "response.created" and events[-1] in ("response.completed", "response.incomplete"), events
for kind in ("response.output_item.added", "response.content_part.added", "response.output_text.done", "response.output_item.done"):
    assert kind in events, (kind, events)
assert "".join(deltas) == final.output_text == r.output_text, (deltas, final.output_text, r.output_text)

# previous_response_id continues the stored conversation.
follow = client.responses.create(model=model, previous_response_id=r.id, input="And of Germany?", max_output_tokens=16,
                                 temperature=0)
assert follow.previous_response_id == r.id and follow.usage.input_tokens > r.usage.input_tokens, follow

# text.format with a JSON schema.
schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20}},
          "required": ["city", "country"], "additionalProperties": False}
j = client.responses.create(model=model, input="Name a city.", max_output_tokens=100, temperature=1,
                            text={"format": {"type": "json_schema", "name": "place", "schema": schema, "strict": True}})
jsonschema.validate(json.loads(j.output_text), schema)

# Function tools: a call, its output sent back by previous_response_id, and the answer.
tools = [{"type": "function", "name": "get_weather", "description": "The weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"],
                         "additionalProperties": False}, "strict": True}]
c = client.responses.create(model=model, input="What is the weather in Paris?", tools=tools, tool_choice="required",
                            max_output_tokens=200, temperature=0)
calls = [o for o in c.output if o.type == "function_call"]
assert calls and calls[0].name == "get_weather" and json.loads(calls[0].arguments)["city"], c
done = client.responses.create(model=model, previous_response_id=c.id, tools=tools, tool_choice="none", max_output_tokens=30,
                               temperature=0, input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 degrees, sunny"}])
assert done.output_text, done
# Streamed function call arguments.
kinds = [e.type for e in client.responses.create(model=model, input="What is the weather in Paris?", tools=tools,
                                                 tool_choice="required", max_output_tokens=200, temperature=0, stream=True)]
assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds, kinds

# Another key sees none of these; store=false keeps nothing; delete removes.
stranger = openai.OpenAI(base_url=base_url, api_key=other_key, max_retries=0)
for attempt in (lambda: stranger.responses.retrieve(r.id), lambda: stranger.responses.delete(r.id),
                lambda: stranger.responses.create(model=model, previous_response_id=r.id, input="hi", max_output_tokens=4)):
    try:
        attempt()
        raise AssertionError("another key reached a stored response")
    except openai.NotFoundError:
        pass
unstored = client.responses.create(model=model, input="hi", max_output_tokens=4, store=False)
try:
    client.responses.retrieve(unstored.id)
    raise AssertionError("store=false was stored")
except openai.NotFoundError:
    pass
client.responses.delete(r.id)
try:
    client.responses.retrieve(r.id)
    raise AssertionError("a deleted response was found")
except openai.NotFoundError:
    pass

# The OpenAI Agents SDK: an agent calls a Python function through berth.
from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

set_tracing_disabled(True)
called = []


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    called.append(city)
    return f"It is sunny in {city}."


agent = Agent(
    name="weather",
    instructions="Answer questions about the weather with the get_weather tool.",
    tools=[get_weather],
    model=OpenAIResponsesModel(model=model, openai_client=openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)),
    model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=200),
    tool_use_behavior="stop_on_first_tool",
)
result = asyncio.run(Runner.run(agent, "What is the weather in Paris?"))
assert called and result.final_output == f"It is sunny in {called[0]}.", (called, result.final_output)
print(f"responses API and openai-agents: ok (the agent called get_weather({called[0]!r}))")
