"""Render chat templates the way Hugging Face transformers does (jinja2's immutable sandbox with
trim_blocks, lstrip_blocks and loop controls; raise_exception, strftime_now and transformers'
tojson), for the conversations given, and print the results as JSON: the reference berth's
template engine is held to (tests/peer_templates.rs).

usage: render_templates.py TEMPLATES_DIR CONVERSATIONS_JSON
output: {template file: {conversation: {"text": ...} | {"error": ...}}}
"""

import json
import sys
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class AssistantTracker(Extension):
    # transformers' {% generation %} ... {% endgeneration %}: renders its body.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(fmt):
    return datetime.now().strftime(fmt)


def environment():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[AssistantTracker, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def main():
    templates = Path(sys.argv[1])
    conversations = json.loads(Path(sys.argv[2]).read_text())
    env = environment()
    out = {}
    for path in sorted(templates.glob("*.jinja")):
        results = {}
        try:
            template = env.from_string(path.read_text())
        except Exception as e:  # noqa: BLE001 - every failure is a result
            results = {name: {"error": f"compile: {e}"} for name in conversations}
        else:
            for name, conv in conversations.items():
                ctx = dict(conv.get("extra", {}))
                ctx.update(
                    messages=conv["messages"],
                    add_generation_prompt=conv["add_generation_prompt"],
                    bos_token=conv["bos_token"],
                    eos_token=conv["eos_token"],
                )
                try:
                    results[name] = {"text": template.render(**ctx)}
                except Exception as e:  # noqa: BLE001
                    results[name] = {"error": f"{type(e).__name__}: {e}"}
        out[path.name] = results
    json.dump(out, sys.stdout, ensure_ascii=False)


main()
