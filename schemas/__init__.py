"""Pydantic models of prep: raw input formats, the unified conversation, rejects and configs.

Imports pydantic and the standard library only, never `prep`.
"""

from schemas.conversation import ROLES, Conversation, Message, Role, SourceRef, content_hash, conversation_problems
from schemas.reject import ErrorDetail, Reject

__all__ = [
    "ROLES",
    "Conversation",
    "ErrorDetail",
    "Message",
    "Reject",
    "Role",
    "SourceRef",
    "content_hash",
    "conversation_problems",
]
