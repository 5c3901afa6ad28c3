"""Test helpers: the real data and tokenizers in ../shared/data, as unified Conversations.

The converter is another stage; these helpers build Conversations directly from the raw JSON with the
documented mappings (Alpaca: user = instruction, or instruction + "\\n\\n" + input; ShareGPT:
human → user, gpt → assistant), skipping records that break the turn rules.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from prep.render import Template
from schemas.conversation import Conversation, Message, SourceRef, conversation_problems

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(os.environ.get("PREP_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
TOKENIZERS = DATA / "tokenizers"
TOKENIZER_NAMES = ("gpt2-dialogpt-small", "mistral-7b-instruct-v0.3", "smollm2-135m", "qwen2-1.5b-instruct-boundless")
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


@lru_cache(maxsize=None)
def alpaca(name: str = "alpaca_en_demo.json", limit: int | None = None) -> tuple[Conversation, ...]:
    """Alpaca records (`output` or `response` key) as single-turn Conversations."""
    path = DATA / "alpaca" / name
    records = json.loads(path.read_text(encoding="utf-8"))[:limit]
    out = []
    for row, r in enumerate(records):
        user = r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")
        answer = r.get("output", r.get("response", ""))
        messages = [Message(role="user", content=user), Message(role="assistant", content=answer)]
        if not conversation_problems(messages):
            out.append(_conversation(f"{path.stem}-{row}", messages, path, row, "alpaca"))
    return tuple(out)


@lru_cache(maxsize=None)
def sharegpt(limit: int | None = None, min_messages: int = 0) -> tuple[Conversation, ...]:
    """The real multi-turn ShareGPT chats (sharegpt_zh_1K_format.jsonl) that follow the turn rules."""
    path = DATA / "sharegpt" / "sharegpt_zh_1K_format.jsonl"
    out = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        turns = json.loads(line)["conversations"]
        messages = [Message(role=_SHAREGPT_ROLES[t["from"]], content=t["value"]) for t in turns]
        if len(messages) >= min_messages and not conversation_problems(messages):
            out.append(_conversation(f"sharegpt-{line_no}", messages, path, line_no, "sharegpt"))
        if limit is not None and len(out) >= limit:
            break
    return tuple(out)


@lru_cache(maxsize=None)
def kto(limit: int | None = None) -> tuple[Conversation, ...]:
    """kto_en_demo (OpenAI messages) as Conversations."""
    path = DATA / "messages" / "kto_en_demo.json"
    out = []
    for row, r in enumerate(json.loads(path.read_text(encoding="utf-8"))[:limit]):
        messages = [Message(role=m["role"], content=m["content"]) for m in r["messages"]]
        if not conversation_problems(messages):
            out.append(_conversation(f"kto-{row}", messages, path, row, "openai"))
    return tuple(out)


def with_system(conv: Conversation, system: str = "You are a careful assistant.") -> Conversation:
    """The same conversation with a system prompt in front."""
    return conv.model_copy(update={"messages": [Message(role="system", content=system), *conv.messages]})


def _conversation(cid: str, messages: list[Message], path: Path, line: int, fmt: str) -> Conversation:
    """A Conversation with its source."""
    return Conversation(id=cid, messages=messages, source=SourceRef(path=str(path), line=line, format=fmt))


@lru_cache(maxsize=None)
def tokenizer(name: str):
    """A real tokenizer from ../shared/data/tokenizers, or the embedded default for "default"."""
    from prep.tokenizer import default_tokenizer, load_tokenizer

    return default_tokenizer() if name == "default" else load_tokenizer(str(TOKENIZERS / name))


# A template written like Qwen3's: it splits a reply's <think> block off, re-renders it for the last reply and
# leaves it out of earlier ones (and writes an empty block before a last reply that has none).
THINKING_TEMPLATE = Template(
    name="tokenizer",
    chat_template=(
        "{%- for m in messages %}{%- if m.role == 'assistant' %}"
        "{%- set c = m.content %}{%- set r = '' %}"
        "{%- if '</think>' in c %}{%- set r = c.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
        "{%- set c = c.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
        "{%- if loop.last %}{{ '<|im_start|>assistant\\n<think>\\n' + r + '\\n</think>\\n\\n' + c + '<|im_end|>\\n' }}"
        "{%- else %}{{ '<|im_start|>assistant\\n' + c + '<|im_end|>\\n' }}{%- endif %}"
        "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    ),
)


def reasoning_conversations() -> tuple[list[Message], ...]:
    """One reply with reasoning; two replies with reasoning; a reasoning reply, then a last reply without."""
    from prep.convert import fold_reasoning

    one = [Message(role="user", content="2+2?"), Message(role="assistant", content=fold_reasoning("2 and 2.", "4"))]
    two = one + [Message(role="user", content="3+3?"), Message(role="assistant", content=fold_reasoning("3+3.", "6"))]
    plain_last = one + [Message(role="user", content="Thanks"), Message(role="assistant", content="You're welcome.")]
    return one, two, plain_last


# Chat templates of families without a tokenizer in ../shared, written as those models ship them: BOS printed by
# the template and contents trimmed (Llama 3), a `model` role, trimming and a raise on system messages (Gemma),
# an EOS after the last turn (Phi-3). Each goes on the real SmolLM2 tokenizer with its special tokens added.
OTHER_FAMILIES = {
    "llama3": ("{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
               "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}",
               ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>"),
    "gemma": ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
              "{% endif %}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
              "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
              "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}",
              ["<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>"),
    "phi3": ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
             "{% endfor %}{{ eos_token }}", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], None),
}


def family_tokenizer(family: str) -> Any:
    """The real SmolLM2 tokenizer given family `family`'s chat template and special tokens (OTHER_FAMILIES)."""
    from transformers import AutoTokenizer

    chat_template, specials, bos = OTHER_FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(TOKENIZERS / "smollm2-135m")
    tok.add_special_tokens({"additional_special_tokens": specials, **({"bos_token": bos} if bos else {})})
    tok.chat_template = chat_template
    return tok
