"""Pydantic models of prep: raw input formats, the unified conversation, rejects and configs.

Imports pydantic and the standard library only, never `prep`.
"""

from schemas.config import ConvertConfig
from schemas.conversation import ROLES, Conversation, Message, Role, SourceRef, content_hash, conversation_problems
from schemas.raw import (
    BATCH_ADAPTERS,
    FORMAT_NAMES,
    RAW_MODELS,
    RECORD_ADAPTERS,
    AlpacaRecord,
    OpenAIRecord,
    PromptCompletionRecord,
    RawRecord,
    ShareGPTRecord,
    TranscriptRecord,
    UnifiedRecord,
)
from schemas.reject import ErrorDetail, Reject

__all__ = [
    "BATCH_ADAPTERS",
    "FORMAT_NAMES",
    "RAW_MODELS",
    "RECORD_ADAPTERS",
    "ROLES",
    "AlpacaRecord",
    "Conversation",
    "ConvertConfig",
    "ErrorDetail",
    "Message",
    "OpenAIRecord",
    "PromptCompletionRecord",
    "RawRecord",
    "Reject",
    "Role",
    "ShareGPTRecord",
    "SourceRef",
    "TranscriptRecord",
    "UnifiedRecord",
    "content_hash",
    "conversation_problems",
]
