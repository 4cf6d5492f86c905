"""Tool calls through real clients on SmolLM2 (whose template knows no tools: berth's generic
format, grammar-constrained): auto, required and a named function always give calls that parse and
fit their schemas; streamed parallel calls arrive in OpenAI's exact chunk shape and equal the
non-streamed answer; a tool result goes back and the model answers; LangChain's bind_tools and
Ollama's tools. Every check raises on failure."""
import json
import sys

import jsonschema
import ollama
import openai

base_url, ollama_url, model = sys.argv[1:4]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 30}}, "required": ["tz"],
        "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ask = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_calls(calls, names=("get_weather", "get_time")):
    assert calls, "no calls"
    for c in calls:
        assert c.type == "function" and c.id and c.function.name in names, c
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


# required and a named function: always a valid call, at any temperature.
for temperature in (0, 1):
    for seed in range(3):
        r = client.chat.completions.create(model=model, messages=ask, tools=TOOLS, tool_choice="required",
                                           temperature=temperature, seed=seed, max_tokens=200)
        assert r.choices[0].finish_reason == "tool_calls", r
        check_calls(r.choices[0].message.tool_calls)
        r = client.chat.completions.create(model=model, messages=ask, tools=TOOLS, temperature=temperature, seed=seed,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=200)
        check_calls(r.choices[0].message.tool_calls, names=("get_time",))

# auto: the model chooses; either way the answer parses (a call, or text).
r = client.chat.completions.create(model=model, messages=ask, tools=TOOLS, temperature=0, max_tokens=200)
m = r.choices[0].message
assert (m.tool_calls and r.choices[0].finish_reason == "tool_calls") or (m.content and not m.tool_calls), r
if m.tool_calls:
    check_calls(m.tool_calls)
# none: plain text, no calls.
r = client.chat.completions.create(model=model, messages=ask, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=20)
assert r.choices[0].message.tool_calls is None and r.choices[0].message.content, r

# Streamed parallel calls: OpenAI's chunks (an index per call; id, type and name first, then the
# arguments), reassembled exactly as the non-streamed answer of the same seed.
two = [{"role": "user", "content": "Make two tool calls: get_weather for Paris, and get_time for Asia/Tokyo."}]
parallel_seen = False
for seed in range(1, 9):
    args = dict(model=model, messages=two, tools=TOOLS, tool_choice="required", temperature=1, seed=seed, max_tokens=300)
    whole = client.chat.completions.create(**args).choices[0].message.tool_calls
    calls, finish = {}, None
    for chunk in client.chat.completions.create(stream=True, **args):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                if d.index not in calls:
                    assert d.id and d.type == "function" and d.function.name, d
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""}
                else:
                    assert d.id is None and not d.function.name, d
                    calls[d.index]["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls" and sorted(calls) == list(range(len(calls))), (finish, calls)
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [(w.function.name, w.function.arguments) for w in whole]
    parallel_seen |= len(calls) >= 2
assert parallel_seen, "no seed gave two calls in one turn"

# A tool result goes back; the model answers in text.
r = client.chat.completions.create(model=model, messages=ask, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=200)
call = r.choices[0].message.tool_calls[0]
follow = ask + [r.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "sunny"})}]
r = client.chat.completions.create(model=model, messages=follow, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=60)
assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length"), r

# Bad tool requests are 400s naming the field.
for bad, param in [(dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
                   (dict(tools=[{"type": "function", "function": {"name": "a b"}}]), "tools[0].function.name"),
                   (dict(tool_choice="required"), "tool_choice")]:
    try:
        client.chat.completions.create(model=model, messages=ask, max_tokens=5, **bad)
        raise AssertionError(f"{bad} was accepted")
    except openai.BadRequestError as e:
        assert e.body.get("param") == param, (e.body, param)

# LangChain's bind_tools.
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return "sunny"


llm = ChatOpenAI(base_url=base_url, api_key="unused", model=model, temperature=0, max_tokens=200, max_retries=0)
msg = llm.bind_tools([get_weather], tool_choice="required").invoke("What is the weather in Paris?")
assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather" and isinstance(msg.tool_calls[0]["args"], dict), msg

# Ollama's tools, plain and streamed, and a tool result sent back.
oc = ollama.Client(host=ollama_url)
r = oc.chat(model=model, messages=ask, tools=TOOLS, options={"temperature": 0, "num_predict": 200})
assert r.message.tool_calls or r.message.content, r
streamed = list(oc.chat(model=model, messages=ask, tools=TOOLS, stream=True, options={"temperature": 0, "num_predict": 200}))
stream_calls = [c for part in streamed for c in (part.message.tool_calls or [])]
assert [(c.function.name, dict(c.function.arguments)) for c in stream_calls] == \
    [(c.function.name, dict(c.function.arguments)) for c in (r.message.tool_calls or [])], (streamed, r)
if r.message.tool_calls:
    c = r.message.tool_calls[0]
    jsonschema.validate(dict(c.function.arguments), SCHEMAS[c.function.name])
    back = ask + [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": c.function.name, "arguments": dict(c.function.arguments)}}]},
                  {"role": "tool", "content": "18 degrees", "tool_name": c.function.name}]
    r = oc.chat(model=model, messages=back, options={"temperature": 0, "num_predict": 40})
    assert r.message.content, r
print("tool calls through openai, LangChain and Ollama: ok")
