"""The official ollama client against a running berth server: every check raises on failure."""
import sys

import ollama

host, model = sys.argv[1], sys.argv[2]
client = ollama.Client(host=host, timeout=120)

r = client.chat(model=model, messages=[{"role": "user", "content": "Say hello."}], options={"num_predict": 8, "temperature": 0})
assert r.message.role == "assistant" and r.message.content and r.done, r
parts = [p.message.content for p in client.chat(model=model, messages=[{"role": "user", "content": "Say hello."}],
                                                   options={"num_predict": 8, "temperature": 0}, stream=True)]
assert "".join(parts) == r.message.content, (parts, r.message.content)

g = client.generate(model=model, prompt="Why is the sky blue?", options={"num_predict": 8, "temperature": 0})
assert g.response and g.done and g.eval_count > 0, g
# The conversation as token ids (`context`): prompt and answer, and a follow-up continues from it.
assert g.context and len(g.context) == g.prompt_eval_count + g.eval_count, g
follow = client.generate(model=model, prompt="Say it shorter.", context=g.context, options={"num_predict": 4, "temperature": 0})
assert follow.prompt_eval_count > len(g.context) and follow.context[:len(g.context)] == g.context, follow
try:
    client.generate(model=model, prompt="hi", context=[10**9])
    raise AssertionError("a context outside the vocabulary must fail")
except ollama.ResponseError as e:
    assert e.status_code == 400 and "context" in e.error, e.error
g = client.generate(model=model, prompt="Once upon a time", raw=True, options={"num_predict": 4})
assert g.response and not g.context, g

e = client.embed(model="ai/minilm:latest", input=["A man is eating food.", "A man is eating a piece of bread."])
assert len(e.embeddings) == 2 and len(e.embeddings[0]) == 384, e
cos = sum(a * b for a, b in zip(*e.embeddings))
assert abs(cos - 0.755) < 0.01, cos
# The legacy embeddings() both official clients still offer.
legacy = client.embeddings(model="ai/minilm:latest", prompt="A man is eating food.")
assert len(legacy.embedding) == 384 and abs(sum(a * b for a, b in zip(legacy.embedding, e.embeddings[0])) - 1) < 1e-4, legacy

names = [m.model for m in client.list().models]
assert model in names, names
shown = client.show(model)
assert shown.details.family == "llama" and "im_start" in (shown.template or ""), shown
running = {m.model: m for m in client.ps().models}
assert model in running, running
# Ollama's names for a running model's figures.
assert running[model].size > 0 and running[model].expires_at and running[model].details.family == "llama", running
try:
    client.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    raise AssertionError("an unknown model must fail")
except ollama.ResponseError as e:
    # Ollama's error shape: the client's .error is the message itself, not an object.
    assert e.status_code == 404 and isinstance(e.error, str) and "no-such-model" in e.error, e.error
# Pull from a registry and delete (the test passes the registry's reference as a third argument).
if len(sys.argv) > 3:
    pulled = sys.argv[3]
    assert client.pull(pulled).status == "success"
    assert pulled in [m.model for m in client.list().models]
    client.delete(pulled)
    assert pulled not in [m.model for m in client.list().models]
    try:
        client.delete(pulled)
        raise AssertionError("deleting a missing model must fail")
    except ollama.ResponseError as e:
        assert e.status_code == 404, e
    # Copy (another name in the store) and push (to the registry under a new tag), then pull it back.
    pushed = pulled.rsplit(":", 1)[0] + ":pushed"
    client.copy(model, pushed)
    assert pushed in [m.model for m in client.list().models]
    assert client.push(pushed, insecure=True).status == "success"
    client.delete(pushed)
    assert client.pull(pushed, insecure=True).status == "success"
    try:
        client.copy("no-such-model", "other")
        raise AssertionError("copying a missing model must fail")
    except ollama.ResponseError as e:
        assert e.status_code == 404 and "no-such-model" in e.error, e.error
# Create from an uploaded GGUF (what `ollama create -f Modelfile` does) and from a model of the store.
if len(sys.argv) > 4:
    import urllib.error, urllib.request
    template = ("{# made by create #}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    digest = client.create_blob(sys.argv[4])
    assert client.create(model="made/by-create:v1", files={"model.gguf": digest}, template=template,
                         license="MIT").status == "success"
    assert "made by create" in client.show("made/by-create:v1").template
    r = client.chat(model="made/by-create:v1", messages=[{"role": "user", "content": "Say hello."}],
                    options={"num_predict": 4, "temperature": 0})
    assert r.message.content, r
    assert client.create(model="alias/of-smollm2:v1", from_=model).status == "success"
    assert "alias/of-smollm2:v1" in [m.model for m in client.list().models]
    for kwargs, field in [({"from_": model, "system": "You are terse."}, "system"),
                          ({"files": {"model.gguf": "sha256:" + "0" * 64}}, "upload it first"),
                          ({"from_": model, "quantize": "q4_K_M"}, "quantise"),
                          ({"from_": "no-such-model"}, "no-such-model")]:
        try:
            client.create(model="refused:v1", **kwargs)
            raise AssertionError(f"create with {kwargs} must fail")
        except ollama.ResponseError as e:
            assert e.status_code in (400, 404) and field in e.error, (kwargs, e.error)
    # Bytes that do not match the digest they are uploaded under are refused and never stored.
    wrong = urllib.request.Request(f"{host}/api/blobs/sha256:{'1' * 64}", data=b"not those bytes", method="POST")
    try:
        urllib.request.urlopen(wrong)
        raise AssertionError("a blob with the wrong digest must fail")
    except urllib.error.HTTPError as e:
        assert e.code == 400 and "digest" in e.read().decode(), e
    head = urllib.request.Request(f"{host}/api/blobs/sha256:{'1' * 64}", method="HEAD")
    try:
        urllib.request.urlopen(head)
        raise AssertionError("the refused blob must not be there")
    except urllib.error.HTTPError as e:
        assert e.code == 404, e
print("ollama client: all checks passed")
