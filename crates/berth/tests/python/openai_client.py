"""The official openai client against a running berth server: every check raises on failure."""
import base64
import sys

import openai

base_url, model, embedder, golden_path = sys.argv[1:5]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
ask = [{"role": "user", "content": "What is the capital of France?"}]

# Plain chat.
r = client.chat.completions.create(model=model, messages=ask, max_tokens=16, temperature=0)
plain = r.choices[0].message.content
assert r.object == "chat.completion" and plain, r
assert r.choices[0].finish_reason in ("stop", "length"), r
assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0, r.usage

# Streamed at temperature 0: the joined stream equals the plain answer; one id throughout.
ids, parts, roles, finish = set(), [], [], None
for chunk in client.chat.completions.create(model=model, messages=ask, max_tokens=16, temperature=0, stream=True):
    ids.add(chunk.id)
    for c in chunk.choices:
        if c.delta.role:
            roles.append(c.delta.role)
        if c.delta.content:
            parts.append(c.delta.content)
        finish = c.finish_reason or finish
assert "".join(parts) == plain, ("".join(parts), plain)
assert len(ids) == 1 and roles[:1] == ["assistant"] and finish in ("stop", "length"), (ids, roles, finish)

# Streamed with include_usage: a final chunk with no choices and the usage.
chunks = list(client.chat.completions.create(model=model, messages=ask, max_tokens=8, stream=True,
                                              stream_options={"include_usage": True}))
assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0, chunks[-1]

# Content parts, n=2, seeds, stop.
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": [{"type": "text", "text": "Say hi"}]}],
                                   max_tokens=8, n=2, temperature=1.0, seed=11)
assert len(r.choices) == 2 and [c.index for c in r.choices] == [0, 1], r
again = client.chat.completions.create(model=model, messages=[{"role": "user", "content": [{"type": "text", "text": "Say hi"}]}],
                                       max_tokens=8, n=2, temperature=1.0, seed=11)
assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices], "seed reproducibility"
words = plain.split()
if len(words) > 2:
    cut = client.chat.completions.create(model=model, messages=ask, max_tokens=16, temperature=0, stop=[words[2]])
    assert cut.choices[0].message.content == plain[: plain.index(words[2])], (cut.choices[0].message.content, plain)
    assert cut.choices[0].finish_reason == "stop"

# Logprobs with top alternatives: sorted, never positive.
r = client.chat.completions.create(model=model, messages=ask, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
content = r.choices[0].logprobs.content
assert len(content) == r.usage.completion_tokens, content
for t in content:
    tops = [x.logprob for x in t.top_logprobs]
    assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(x <= 0 for x in tops), tops
    assert t.logprob <= 0 and t.token == t.top_logprobs[0].token

# Completions: plain, echo, list prompts, logprobs.
r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
assert r.object == "text_completion" and r.choices[0].text, r
r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=4, temperature=0, echo=True, logprobs=2)
assert r.choices[0].text.startswith("Once upon a time") and len(r.choices[0].logprobs.tokens) == 4, r
# Without max_tokens a text completion stops at OpenAI's default of 16.
r = client.completions.create(model=model, prompt="Once upon a time", extra_body={"ignore_eos": True})
assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length", r
r = client.completions.create(model=model, prompt=["One", "Two"], max_tokens=3)
assert len(r.choices) == 2, r
streamed = "".join(c.choices[0].text for c in client.completions.create(model=model, prompt="Once upon a time",
                                                                           max_tokens=8, temperature=0, stream=True) if c.choices)
assert streamed == client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0).choices[0].text

# Models.
ids = [m.id for m in client.models.list().data]
assert model in ids, ids
assert client.models.retrieve(model).id == model

# Errors clients understand.
try:
    client.chat.completions.create(model="no-such-model", messages=ask)
    raise AssertionError("an unknown model must fail")
except openai.NotFoundError as e:
    assert "no-such-model" in str(e) and model in str(e), e
try:
    client.chat.completions.create(model=model, messages=ask, top_logprobs=21, logprobs=True)
    raise AssertionError("top_logprobs 21 must fail")
except openai.BadRequestError as e:
    assert "top_logprobs" in str(e), e
try:
    client.chat.completions.create(model=model, messages=ask, response_format={"type": "xml"})
    raise AssertionError("an unknown response_format must be refused, not ignored")
except openai.BadRequestError as e:
    assert "response_format" in str(e), e
# Embeddings: the client's default (base64) and float, both equal to the float64 reference.
import json
import math

golden = json.load(open(golden_path))["items"]
texts = [g["text"] for g in golden]


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


for fmt in (None, "float"):
    kwargs = {} if fmt is None else {"encoding_format": fmt}
    r = client.embeddings.create(model=embedder, input=texts, **kwargs)
    assert len(r.data) == len(texts) and r.usage.prompt_tokens > 0, r.usage
    for d, g in zip(r.data, golden):
        assert len(d.embedding) == 384
        c = cosine(d.embedding, g["embedding"])
        assert c >= 0.9999, (fmt, g["text"], c)
one = client.embeddings.create(model=embedder, input="A man is eating food.", encoding_format="float").data[0].embedding
assert cosine(one, golden[0]["embedding"]) >= 0.9999
try:
    client.embeddings.create(model=embedder, input="x", dimensions=64)
    raise AssertionError("dimensions must be refused")
except openai.BadRequestError as e:
    assert "dimensions" in str(e), e
try:
    client.embeddings.create(model=model, input="x")
    raise AssertionError("a chat model does not embed")
except openai.BadRequestError as e:
    assert "embedding" in str(e), e
print("openai client: all checks passed")
