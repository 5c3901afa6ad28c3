"""Raw input formats: one frozen Pydantic model per format, validated at Rust speed.

Each model accepts what real datasets contain; top-level keys a model does not name are kept
(`extra="allow"`) and end up in the unified record's `meta`, so nothing is lost; so do unknown keys
inside a ShareGPT or OpenAI message (`meta["message_fields"]`), except an assistant's reasoning
(`reasoning_content`, `thinking`, `reasoning`), which is folded into its reply, and a tool result's
`name`. Tool traffic keeps its structure: calls (`tool_calls`, `function_call`, ShareGPT `function_call`
turns, `tool_call` content parts) and results (`tool`/`function`/`observation`/`ipython` messages) are
parsed by prep.toolcalls; `tools` (or OpenAI's legacy `functions`) may be a list or its JSON text. The
TypeAdapters are built once, here.

Formats and the keys that identify them (see `record_format` in prep/validate.py):

- `alpaca`: `instruction`, `input` (or Dolly's `context`), `output` (or `response`), optional
  `system` and LLaMA-Factory `history` pairs; also prompt/completion pairs (`prompt` + `completion` strings).
- `sharegpt`: `conversations: [{from, value}]` (also `{role, content}`), optional `system` and `tools`.
- `openai`: `messages: [{role, content}]`, tool roles and `tool_calls` included, optional `tools`; `content` may be
  a list of typed parts (`text`, `reasoning`, `tool_call`; OpenAI's `text` key or LLaMA-Factory's `value`); an
  assistant message's `weight` (0 or 1, OpenAI fine-tuning) says whether it is trained.
- `prompt_completion`: TRL's prompt-completion and preference records: `prompt` (text or messages; optional
  when `chosen` holds the whole conversation) and `completion` or `chosen` (text or messages); `rejected` is kept.
- `transcript`: one text field (`text` or hh-rlhf's `chosen`) holding a whole dialogue.
- `unified`: prep's own output form (schemas/conversation.py); it converts to itself.

Role names are matched case-insensitively ("Human", "GPT", "USER" are roles too), in Rust, by pattern.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, Json, TypeAdapter, model_validator
from pydantic_core import PydanticCustomError

from schemas.conversation import Message, SourceRef

FormatName = Literal["alpaca", "sharegpt", "openai", "prompt_completion", "transcript", "unified"]
FORMAT_NAMES: tuple[str, ...] = ("alpaca", "sharegpt", "openai", "prompt_completion", "transcript", "unified")

# Role aliases seen in the wild, mapped to the unified roles. A tool *result* is a `tool` message; a ShareGPT
# turn that holds a tool *call* (its value is the call as JSON) maps to TOOL_CALL, an assistant message with calls.
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant", "chatgpt", "bing", "bard", "model", "claude", "ai", "bot")
TOOL_CALL_ROLES = ("function_call", "tool_call")
TOOL_RESULT_ROLES = ("observation", "tool", "function", "ipython")
SYSTEM_ROLES = ("system", "developer")  # "developer": OpenAI's name for the system prompt of newer models
TOOL_CALL = "tool_call"  # not a unified role: the converter makes it an assistant message with `tool_calls`
ROLE_MAP: dict[str, str] = {  # lower-case role name -> unified role
    **{r: "user" for r in USER_ROLES},
    **{r: "tool" for r in TOOL_RESULT_ROLES},
    **{r: "assistant" for r in ASSISTANT_ROLES},
    **{r: TOOL_CALL for r in TOOL_CALL_ROLES},
    **{r: "system" for r in SYSTEM_ROLES},
}
TOOL_ROLES = frozenset(TOOL_CALL_ROLES + TOOL_RESULT_ROLES)
SHAREGPT_ROLES = USER_ROLES + ASSISTANT_ROLES + TOOL_CALL_ROLES + TOOL_RESULT_ROLES + ("system",)
OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")


def role_pattern(roles: tuple[str, ...]) -> str:
    """A case-insensitive regex matching exactly one of `roles` (checked by pydantic-core, in Rust).

    >>> role_pattern(("user", "gpt"))
    '^(?i:user|gpt)$'
    """
    return "^(?i:" + "|".join(roles) + ")$"


def unified_role(name: str) -> str:
    """The unified role of a validated role name, whatever its case (TOOL_CALL for a ShareGPT call turn).

    >>> unified_role("GPT"), unified_role("observation"), unified_role("function_call")
    ('assistant', 'tool', 'tool_call')
    """
    return ROLE_MAP.get(name) or ROLE_MAP[name.lower()]

# Alternative key names, used to word "missing field" errors ("output (or response)").
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "instruction": ("prompt",),
    "output": ("response", "completion"),
    "input": ("context",),
    "from": ("role",),
    "value": ("content",),
}

_RECORD = ConfigDict(frozen=True, extra="allow")
_ITEM = ConfigDict(frozen=True, extra="ignore")
_MESSAGE = ConfigDict(frozen=True, extra="allow")  # a message's unknown keys are kept, like a record's


class AlpacaRecord(BaseModel):
    """An instruction/response pair (Alpaca, Dolly `context`/`response`, GPTeacher `response`, prompt/completion).

    >>> AlpacaRecord.model_validate({"instruction": "Add", "context": "2+2", "response": "4"}).output
    '4'
    >>> AlpacaRecord.model_validate({"prompt": "Add 2+2", "completion": "4"}).instruction
    'Add 2+2'
    """

    model_config = _RECORD

    instruction: str = Field(validation_alias=AliasChoices("instruction", "prompt"))
    input: str | None = Field("", validation_alias=AliasChoices("input", "context"))
    output: str = Field(validation_alias=AliasChoices("output", "response", "completion"))
    system: str | None = None
    history: tuple[tuple[str, str], ...] = ()  # a tuple default: nothing to copy per record


class ShareGPTTurn(BaseModel):
    """One ShareGPT message: `from` (a role alias) and `value`."""

    model_config = _MESSAGE

    from_: str = Field(validation_alias=AliasChoices("from", "role"), pattern=role_pattern(SHAREGPT_ROLES))
    value: str = Field(validation_alias=AliasChoices("value", "content"))


class ShareGPTRecord(BaseModel):
    """A ShareGPT conversation, optionally with a `system` prompt and glaive-style `tools`.

    >>> ShareGPTRecord.model_validate({"conversations": [{"from": "human", "value": "hi"}]}).conversations[0].from_
    'human'
    """

    model_config = _RECORD

    conversations: list[ShareGPTTurn]
    system: str | None = None
    tools: Any = None  # a list of function specs or its JSON text; checked by the converter


class ContentPart(BaseModel):
    """One part of a list `content`: OpenAI / transformers (`{"type": "text", "text": ...}`) or LLaMA-Factory
    (`{"type": "text" | "reasoning" | "tool_call", "value": ...}`); other types (images, audio) are not text."""

    model_config = _ITEM

    type: str
    text: str | None = None
    value: Any = None

    @property
    def body(self) -> Any:
        """The part's payload: `text`, else `value`."""
        return self.text if self.text is not None else self.value


class OpenAIMessage(BaseModel):
    """One OpenAI chat message; assistant tool calls may come without content."""

    model_config = _MESSAGE

    role: str = Field(pattern=role_pattern(OPENAI_ROLES))
    content: str | list[ContentPart] | None = None
    tool_calls: Any = None  # a list of calls; checked by the converter (invalid_tool_call)
    function_call: Any = None  # the legacy single call
    tool_call_id: str | None = None
    weight: Literal[0, 1] | None = None  # OpenAI fine-tuning: 0 = do not train this assistant message


class OpenAIRecord(BaseModel):
    """An OpenAI chat-format record: `messages: [{role, content}]`.

    >>> OpenAIRecord.model_validate({"messages": [{"role": "user", "content": "hi"}]}).messages[0].role
    'user'
    """

    model_config = _RECORD

    messages: list[OpenAIMessage]
    tools: Any = None  # [{"type": "function", "function": {...}}] or bare specs, or its JSON text
    functions: Any = None  # the legacy name of `tools` (bare specs)


class PromptCompletionRecord(BaseModel):
    """TRL's prompt-completion and preference records, standard (text) or conversational (OpenAI-style messages).

    >>> r = PromptCompletionRecord.model_validate({"prompt": [{"role": "user", "content": "Sky?"}],
    ...                                            "chosen": [{"role": "assistant", "content": "Blue."}]})
    >>> r.chosen[0].content, r.completion
    ('Blue.', None)
    """

    model_config = _RECORD

    prompt: str | list[OpenAIMessage] | None = None
    completion: str | list[OpenAIMessage] | None = None
    chosen: str | list[OpenAIMessage] | None = None
    tools: Any = None

    @model_validator(mode="after")
    def _needs_answer(self) -> PromptCompletionRecord:
        if self.completion is None and self.chosen is None:
            raise PydanticCustomError("missing", "Field required: 'completion' (or 'chosen')")
        return self


class TranscriptRecord(BaseModel):
    """A whole dialogue in one string: `text`, or hh-rlhf's `chosen` (its `rejected` is kept in meta).

    >>> TranscriptRecord.model_validate({"chosen": "\\n\\nHuman: hi\\n\\nAssistant: hello"}).key
    'chosen'
    """

    model_config = _RECORD

    text: str | None = None
    chosen: str | None = None
    rejected: str | None = None

    @model_validator(mode="after")
    def _needs_text(self) -> TranscriptRecord:
        if self.text is None and self.chosen is None:
            raise PydanticCustomError("missing", "Field required: 'text' (or 'chosen')")
        return self

    @property
    def key(self) -> str:
        """The field that holds the transcript: `text` when present, else `chosen`."""
        return "text" if self.text is not None else "chosen"


class UnifiedRecord(BaseModel):
    """prep's own output read back (JSONL, or Parquet where `meta` is a JSON string).

    >>> UnifiedRecord.model_validate({"id": "a", "messages": [], "meta": '{"k": 1}'}).meta
    {'k': 1}
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    source: SourceRef | None = None
    messages: list[Message]
    meta: dict[str, Any] | Json[dict[str, Any]] = Field(default_factory=dict)
    tools: list[dict[str, Any]] | Json[list[dict[str, Any]]] | None = None


RawRecord = AlpacaRecord | ShareGPTRecord | OpenAIRecord | PromptCompletionRecord | TranscriptRecord | UnifiedRecord

RAW_MODELS: dict[str, type[BaseModel]] = {
    "alpaca": AlpacaRecord,
    "sharegpt": ShareGPTRecord,
    "openai": OpenAIRecord,
    "prompt_completion": PromptCompletionRecord,
    "transcript": TranscriptRecord,
    "unified": UnifiedRecord,
}
# One adapter per record and one per batch (a list), so a clean batch is validated in one Rust call.
RECORD_ADAPTERS: dict[str, TypeAdapter[Any]] = {name: TypeAdapter(m) for name, m in RAW_MODELS.items()}
BATCH_ADAPTERS: dict[str, TypeAdapter[Any]] = {name: TypeAdapter(list[m]) for name, m in RAW_MODELS.items()}
