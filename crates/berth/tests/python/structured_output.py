"""Structured output through real clients: every answer to a JSON schema parses and validates with
`jsonschema`, at temperature 0 and 1, streamed and not; the openai client's `parse` with a Pydantic
model, LangChain's `with_structured_output`, Ollama's `format`, and berth's regex and grammar
extensions. Every check raises on failure; a summary line is printed at the end."""
import concurrent.futures
import json
import sys
import time
from typing import List, Literal, Optional

import jsonschema
import ollama
import openai
from pydantic import BaseModel, Field

base_url, ollama_url, model = sys.argv[1:4]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)

S = {"type": "string"}
NAME = {"type": "string", "minLength": 1, "maxLength": 24}
INT = {"type": "integer"}
NUM = {"type": "number"}
BOOL = {"type": "boolean"}


def obj(props, required=None, closed=True):
    s = {"type": "object", "properties": props, "required": list(props) if required is None else required}
    if closed:
        s["additionalProperties"] = False
    return s


SCHEMAS = {
    # Scalars at the top level.
    "string": S,
    "short_string": {"type": "string", "maxLength": 12},
    "integer": INT,
    "bounded_integer": {"type": "integer", "minimum": 10, "maximum": 99},
    "exclusive_number": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "boolean": BOOL,
    "null": {"type": "null"},
    "enum_colors": {"enum": ["red", "green", "blue"]},
    "enum_mixed": {"enum": [1, "two", 3.5, None, True]},
    "const_string": {"const": "berth"},
    "nullable": {"type": ["string", "null"], "maxLength": 16},
    # Patterns and formats.
    "zip_code": {"type": "string", "pattern": "^[0-9]{5}$"},
    "hex_color": {"type": "string", "pattern": "^#[0-9a-f]{6}$"},
    "iso_date": {"type": "string", "format": "date"},
    "email": {"type": "string", "format": "email", "maxLength": 40},
    "uuid": {"type": "string", "format": "uuid"},
    "semver": obj({"version": {"type": "string", "pattern": "^[0-9]+\\.[0-9]+\\.[0-9]+$"}}),
    # Objects: required and optional, open and closed.
    "person": obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    "person_optional_email": obj({"name": NAME, "email": {"type": "string", "format": "email", "maxLength": 40}}, required=["name"]),
    "open_object": obj({"id": INT}, closed=False),
    "empty_object": {"type": "object", "additionalProperties": False},
    "any_object": {"type": "object"},
    "all_optional": obj({"a": INT, "b": BOOL, "c": NAME}, required=[]),
    "point": obj({"x": NUM, "y": NUM}),
    "point3d": obj({"x": NUM, "y": NUM, "z": NUM}),
    "book": obj({"title": NAME, "author": NAME, "year": {"type": "integer", "minimum": 1450, "maximum": 2026},
                 "isbn": {"type": "string", "pattern": "^[0-9]{13}$"}}),
    "product": obj({"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "price": {"type": "number", "minimum": 0},
                    "in_stock": BOOL}),
    "weather": obj({"city": NAME, "celsius": {"type": "number", "minimum": -90, "maximum": 60},
                    "sky": {"enum": ["clear", "cloudy", "rain", "snow"]}}),
    "rgb": obj({"r": {"type": "integer", "minimum": 0, "maximum": 255}, "g": {"type": "integer", "minimum": 0, "maximum": 255},
                "b": {"type": "integer", "minimum": 0, "maximum": 255}}),
    "min_properties": {"type": "object", "additionalProperties": INT, "minProperties": 1, "maxProperties": 3},
    "typed_map": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 10}, "maxProperties": 4},
    "pattern_properties": {"type": "object", "patternProperties": {"^x_[a-z]+$": INT}, "additionalProperties": False,
                           "maxProperties": 3},
    # Nesting.
    "address_book": obj({"owner": NAME, "address": obj({"street": NAME, "city": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})}),
    "deep": obj({"a": obj({"b": obj({"c": obj({"d": INT})})})}),
    "order": obj({"id": INT, "customer": obj({"name": NAME, "vip": BOOL}),
                  "lines": {"type": "array", "minItems": 1, "maxItems": 3,
                            "items": obj({"sku": NAME, "qty": {"type": "integer", "minimum": 1, "maximum": 9}})}}),
    "matrix": {"type": "array", "minItems": 2, "maxItems": 2,
               "items": {"type": "array", "minItems": 2, "maxItems": 2, "items": INT}},
    # Arrays.
    "int_array": {"type": "array", "items": INT, "maxItems": 8},
    "string_array_bounded": {"type": "array", "items": NAME, "minItems": 2, "maxItems": 4},
    "exact_three": {"type": "array", "items": BOOL, "minItems": 3, "maxItems": 3},
    "empty_array": {"type": "array", "maxItems": 0},
    "tuple": {"type": "array", "prefixItems": [NAME, INT, BOOL], "items": False},
    "enum_array": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 5},
    "array_of_points": {"type": "array", "minItems": 1, "maxItems": 3, "items": obj({"x": INT, "y": INT})},
    "tags": obj({"tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,8}$"}, "minItems": 1, "maxItems": 4}}),
    # anyOf / oneOf / allOf.
    "any_of_scalars": {"anyOf": [INT, BOOL]},
    "any_of_objects": {"anyOf": [obj({"kind": {"const": "cat"}, "lives": {"type": "integer", "minimum": 1, "maximum": 9}}),
                                 obj({"kind": {"const": "dog"}, "good": BOOL})]},
    "one_of_shapes": {"oneOf": [obj({"shape": {"const": "circle"}, "r": {"type": "number", "minimum": 0}}),
                                obj({"shape": {"const": "square"}, "side": {"type": "number", "minimum": 0}})]},
    "all_of": {"allOf": [{"type": "object", "properties": {"a": INT}, "required": ["a"]},
                         {"type": "object", "properties": {"b": BOOL}, "required": ["b"]}]},
    "nullable_field": obj({"note": {"anyOf": [{"type": "string", "maxLength": 20}, {"type": "null"}]}}),
    "number_or_string": obj({"value": {"anyOf": [NUM, {"type": "string", "maxLength": 8}]}}),
    # $ref and $defs.
    "ref_defs": {"$defs": {"pt": obj({"x": INT, "y": INT})}, "type": "object",
                 "properties": {"from": {"$ref": "#/$defs/pt"}, "to": {"$ref": "#/$defs/pt"}}, "required": ["from", "to"],
                 "additionalProperties": False},
    "ref_definitions": {"definitions": {"name": NAME}, "type": "object", "properties": {"first": {"$ref": "#/definitions/name"},
                        "last": {"$ref": "#/definitions/name"}}, "required": ["first", "last"], "additionalProperties": False},
    "nested_refs": {"$defs": {"leaf": obj({"v": INT}), "pair": obj({"left": {"$ref": "#/$defs/leaf"}, "right": {"$ref": "#/$defs/leaf"}})},
                    "$ref": "#/$defs/pair"},
    "ref_array": {"$defs": {"tag": {"type": "string", "enum": ["x", "y", "z"]}}, "type": "array",
                  "items": {"$ref": "#/$defs/tag"}, "minItems": 1, "maxItems": 3},
    # Numeric bounds.
    "percent": obj({"pct": {"type": "number", "minimum": 0, "maximum": 100}}),
    "negative": obj({"n": {"type": "integer", "maximum": -1, "minimum": -1000}}),
    "multiple_of": obj({"n": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100}}),
    "lat_lon": obj({"lat": {"type": "number", "minimum": -90, "maximum": 90}, "lon": {"type": "number", "minimum": -180, "maximum": 180}}),
    # String lengths.
    "fixed_length": obj({"code": {"type": "string", "minLength": 4, "maxLength": 4}}),
    "min_length": obj({"word": {"type": "string", "minLength": 3, "maxLength": 30}}),
    # Realistic shapes apps ask for.
    "sentiment": obj({"sentiment": {"enum": ["positive", "negative", "neutral"]}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}}),
    "extraction": obj({"people": {"type": "array", "maxItems": 3, "items": obj({"name": NAME, "role": {"enum": ["author", "editor", "reader"]}})},
                       "date": {"type": "string", "format": "date"}}),
    "classification": obj({"label": {"enum": ["spam", "ham"]}, "reasons": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 2}}),
    "calendar_event": obj({"title": NAME, "start": {"type": "string", "format": "date-time"}, "minutes": {"type": "integer", "minimum": 5, "maximum": 480},
                           "attendees": {"type": "array", "items": {"type": "string", "format": "email", "maxLength": 40}, "maxItems": 3}}),
    "api_call": obj({"method": {"enum": ["GET", "POST", "PUT", "DELETE"]}, "path": {"type": "string", "pattern": "^/[a-z/]{0,20}$"},
                     "retries": {"type": "integer", "minimum": 0, "maximum": 5}}),
    "free_text_answer": obj({"answer": S}),
    "recipe": obj({"dish": NAME, "servings": {"type": "integer", "minimum": 1, "maximum": 12},
                   "ingredients": {"type": "array", "minItems": 1, "maxItems": 4, "items": obj({"item": NAME, "grams": {"type": "number", "minimum": 0}})}}),
}
assert len(SCHEMAS) >= 60, len(SCHEMAS)
for name, schema in SCHEMAS.items():
    jsonschema.Draft202012Validator.check_schema(schema)


def ask(name, schema):
    return [{"role": "system", "content": "You answer with JSON only."},
            {"role": "user", "content": f"Give an example value for `{name}` following this JSON schema: {json.dumps(schema)}"}]


def check(name, schema, temperature, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    args = dict(model=model, messages=ask(name, schema), temperature=temperature, seed=7, max_tokens=400, response_format=fmt)
    if stream:
        parts, finish = [], None
        for chunk in client.chat.completions.create(stream=True, **args):
            for c in chunk.choices:
                parts.append(c.delta.content or "")
                finish = c.finish_reason or finish
        text = "".join(parts)
    else:
        r = client.chat.completions.create(**args)
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    try:
        value = json.loads(text)
        jsonschema.validate(value, schema, cls=jsonschema.Draft202012Validator,
                            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    except Exception as e:
        return f"{name} t={temperature} stream={stream} finish={finish}: {e}\n{text[:300]!r}"
    if finish != "stop":
        return f"{name} t={temperature} stream={stream}: finish {finish}: {text[:300]!r}"
    return None


start = time.time()
jobs = [(n, s, t, st) for n, s in SCHEMAS.items() for t in (0.0, 1.0) for st in (False, True)]
with concurrent.futures.ThreadPoolExecutor(8) as pool:
    failures = [f for f in pool.map(lambda j: check(*j), jobs) if f]
assert not failures, f"{len(failures)} of {len(jobs)} answers failed:\n" + "\n".join(failures)
print(f"structured output: {len(SCHEMAS)} schemas x 2 temperatures x streamed/not: {len(jobs)} answers, "
      f"all parse and validate ({time.time() - start:.0f} s)")

# Text completions take response_format too.
r = client.completions.create(model=model, prompt="A user record as JSON:", max_tokens=200, temperature=1, seed=3,
                              extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMAS["person"]}}})
jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS["person"])

# json_object: any JSON object.
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Describe a cat in JSON."}],
                                   response_format={"type": "json_object"}, max_tokens=300, temperature=0)
if r.choices[0].finish_reason == "stop":
    assert isinstance(json.loads(r.choices[0].message.content), dict), r.choices[0].message.content


# The openai client's parse with a Pydantic model.
class Step(BaseModel):
    explanation: str = Field(max_length=60)
    output: str = Field(max_length=20)


class MathAnswer(BaseModel):
    steps: List[Step] = Field(min_length=1, max_length=3)
    final_answer: int


parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
r = parse(model=model, messages=[{"role": "user", "content": "What is 12 + 30? Show your steps."}],
          response_format=MathAnswer, temperature=0, max_tokens=400)
parsed = r.choices[0].message.parsed
assert isinstance(parsed, MathAnswer) and 1 <= len(parsed.steps) <= 3, r


# berth's extensions: a regex and a Lark grammar.
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "A phone number?"}], temperature=1,
                                   max_tokens=40, extra_body={"response_format": {"type": "regex", "regex": r"\(\d{3}\) \d{3}-\d{4}"}})
import re
assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", r.choices[0].message.content), r.choices[0].message.content
grammar = 'start: answer " because " reason\nanswer: "yes" | "no"\nreason: /[a-z ]{3,40}/'
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Is the sky blue?"}], temperature=0,
                                   max_tokens=60, extra_body={"response_format": {"type": "grammar", "grammar": grammar}})
assert re.fullmatch(r"(yes|no) because [a-z ]{3,40}", r.choices[0].message.content), r.choices[0].message.content

# What berth cannot enforce is a 400 naming it, never an ignored constraint.
for bad, word in [({"type": "array", "uniqueItems": True}, "uniqueItems"), ({"not": {"type": "null"}}, "not"),
                  ({"$ref": "https://example.com/x.json"}, "$ref")]:
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                       response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}})
        raise AssertionError(f"{bad} was accepted")
    except openai.BadRequestError as e:
        assert word in str(e) and e.body.get("param") == "response_format", e

# LangChain's with_structured_output.
from langchain_openai import ChatOpenAI


class Movie(BaseModel):
    title: str = Field(max_length=40)
    year: int = Field(ge=1900, le=2030)
    genre: Literal["drama", "comedy", "action", "horror"]
    sequel: Optional[bool] = None


llm = ChatOpenAI(base_url=base_url, api_key="unused", model=model, temperature=0, max_tokens=200, max_retries=0)
movie = llm.with_structured_output(Movie, method="json_schema").invoke("Name a famous movie.")
assert isinstance(movie, Movie), movie

# Ollama's format with a schema, and "json".
oc = ollama.Client(host=ollama_url)
r = oc.chat(model=model, messages=[{"role": "user", "content": "Name a famous movie."}],
            format=Movie.model_json_schema(), options={"temperature": 0, "num_predict": 200})
Movie.model_validate_json(r.message.content)
r = oc.generate(model=model, prompt="A JSON object about a dog:", format="json", options={"temperature": 1, "num_predict": 300})
if r.done_reason == "stop":
    assert isinstance(json.loads(r.response), dict), r.response
try:
    oc.chat(model=model, messages=[{"role": "user", "content": "hi"}], format={"type": "array", "uniqueItems": True})
    raise AssertionError("an unenforceable format was accepted")
except ollama.ResponseError as e:
    assert e.status_code == 400 and "uniqueItems" in str(e), e
print("structured output through openai parse, LangChain and Ollama: ok")
