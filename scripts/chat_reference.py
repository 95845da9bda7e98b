#!/usr/bin/env python3
"""The reference renderings of the chat templates in peft/chat/testdata, made with Python's own
jinja2 configured as Hugging Face transformers configures it for apply_chat_template
(transformers/utils/chat_template_utils.py: an ImmutableSandboxedEnvironment with
trim_blocks=True, lstrip_blocks=True and the loopcontrols extension; a tojson filter that is
json.dumps with ensure_ascii=False; raise_exception and strftime_now globals; tools=None and
documents=None passed; the tokenizer's special tokens passed by name).

    /usr/bin/python3 scripts/chat_reference.py      # writes peft/chat/testdata/expected.json

For every template and conversation it records the rendered text, or the error the template
raises, and where each assistant message's text lies in it. Those spans are found here by
searching the rendered text for the message as the template writes it (Llama 3 trims it,
DeepSeek-R1 drops the reasoning before </think>, Qwen3 moves it into a <think> block) followed
by the template's end-of-turn marker, and taking the span from the end of the assistant header
before it: not how peft/chat finds them (it renders the conversation's prefixes), so the two
check each other. Offsets are in UTF-8 bytes. Needs jinja2 (Debian: python3-jinja2).
"""

import datetime
import json
import os

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = os.path.dirname(os.path.abspath(__file__))
TESTDATA = os.path.join(os.path.dirname(HERE), "peft", "chat", "testdata")

# The clock strftime_now reads: fixed, so that the Go test can pass the same time.
NOW = datetime.datetime(2026, 3, 7, 9, 30, 0)


def environment():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: NOW.strftime(fmt)
    return env


# name: (template source, special tokens, how the template writes an assistant message, the
# header that opens an assistant turn, end-of-turn marker)
def templates():
    def read(name):
        with open(os.path.join(TESTDATA, "templates", name), encoding="utf-8") as f:
            return f.read()

    with open(os.path.join(TESTDATA, "deepseek-r1-distill-qwen", "tokenizer_config.json"), encoding="utf-8") as f:
        deepseek = json.load(f)
    return {
        "llama3.2": (read("llama3.2.jinja"), {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, str.strip, "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
        "qwen2.5": (read("qwen2.5.jinja"), {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, None, "<|im_start|>assistant\n", "<|im_end|>"),
        "qwen3": (read("qwen3.jinja"), {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
                  lambda c: c.split("</think>")[-1].lstrip("\n"), "<|im_start|>assistant\n", "<|im_end|>"),
        "smollm2": (read("smollm2.jinja"), {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>"}, None, "<|im_start|>assistant\n", "<|im_end|>"),
        "mistral": (read("mistral.jinja"), {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, None, "[/INST]", "</s>"),
        "deepseek-r1-distill-qwen": (
            deepseek["chat_template"],
            {"bos_token": deepseek["bos_token"]["content"], "eos_token": deepseek["eos_token"]["content"], "pad_token": deepseek["pad_token"]["content"]},
            lambda c: c.split("</think>")[-1],
            "<｜Assistant｜>",
            deepseek["eos_token"]["content"],
        ),
    }


CONVERSATIONS = {
    "one_turn": ([{"role": "user", "content": "What is the capital of France?"}], True),
    "multi_turn": (
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Name a prime."},
            {"role": "assistant", "content": "7"},
        ],
        False,
    ),
    "no_system": (
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "  4\n"},
            {"role": "user", "content": "¿Y 3+3? 日本語 🙂"},
        ],
        True,
    ),
    "unicode": (
        [
            {"role": "user", "content": "Café naïve — 東京 🚀\n\n  spaced  "},
            {"role": "assistant", "content": "Überall: ça va? 123 4567\n\n😀"},
        ],
        False,
    ),
    "reasoning": (
        [
            {"role": "user", "content": "Why?"},
            {"role": "assistant", "content": "<think>the user asks why</think>Because."},
        ],
        False,
    ),
}

# Variables passed besides messages, by template (Llama 3.2 is also rendered without date_string,
# so that it reads strftime_now).
VARIABLES = {"llama3.2": [{"date_string": "26 Jul 2024"}, {}]}


def spans(text, messages, written, header, marker):
    """Byte spans of each assistant turn after its header, up to its end-of-turn marker, in order."""
    out, at = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        body = written(m["content"]) if written else m["content"]
        found = text.index(body + marker, at)
        start = text.rindex(header, at, found + 1) + len(header)
        end = found + len(body) + len(marker)
        out.append([len(text[:start].encode()), len(text[:end].encode())])
        at = end
    return out


def main():
    env = environment()
    cases = []
    for name, (source, special, written, header, marker) in templates().items():
        compiled = env.from_string(source)
        for variables in VARIABLES.get(name, [{}]):
            for conv, (messages, gen) in CONVERSATIONS.items():
                case = {"template": name, "conversation": conv, "messages": messages, "add_generation_prompt": gen,
                        "variables": variables, "special_tokens": special}
                try:
                    text = compiled.render(messages=messages, tools=None, documents=None, add_generation_prompt=gen, **special, **variables)
                except jinja2.exceptions.TemplateError as e:
                    case["error"] = str(e)
                    cases.append(case)
                    continue
                case["text"] = text
                case["assistant_spans"] = spans(text, messages, written, header, marker)
                cases.append(case)
    out = {"now": NOW.isoformat(), "jinja2": jinja2.__version__, "cases": cases}
    with open(os.path.join(TESTDATA, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"{len(cases)} cases, {sum('error' in c for c in cases)} raise an error")


if __name__ == "__main__":
    main()
