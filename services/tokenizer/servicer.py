"""The Tokenizer gRPC servicer: protos in, domain calls, protos out."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, TypeVar

import grpc
from lmesh.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

from services.common.errors import InvalidArgument
from services.common.rpc import first_message
from services.tokenizer.text import ChatMessage, IncrementalDetokenizer

if TYPE_CHECKING:
    from services.tokenizer.loader import TokenizerCache

T = TypeVar("T")

# Inputs above this size are tokenized in a worker thread so one huge request does not stall every stream.
OFF_LOOP_CHARS = 64 * 1024
# What rendering one chat message costs, counted in characters of content.
MESSAGE_RENDER_CHARS = 64
# Characters that large encodes and decodes may hold at once: a token costs the tokenizers library ~100 bytes
# while it encodes, so eight 4 MB prompts at once took 4 GB. A larger job runs alone.
LARGE_WORK_CHARS = 1 << 20


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_malloc_trim = _find_malloc_trim()


def _release_freed_memory() -> None:
    """Hands memory freed by a large encode back to the system: glibc keeps it in the worker thread's arena,
    and the process would otherwise stay at its peak for good."""
    if _malloc_trim is not None:
        _malloc_trim(0)


class WorkBudget:
    """Bounds the characters that large jobs hold at once; a job larger than the budget waits for it whole."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._used = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def reserve(self, size: int) -> AsyncIterator[None]:
        size = min(size, self._capacity)
        async with self._changed:
            await self._changed.wait_for(lambda: self._used + size <= self._capacity)
            self._used += size
        try:
            yield
        finally:
            async with self._changed:
                self._used -= size
                self._changed.notify_all()


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self, models: TokenizerCache, large_work_chars: int = LARGE_WORK_CHARS) -> None:
        self._models = models
        self._large_work = WorkBudget(large_work_chars)

    async def _run(self, size: int, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)`, in a worker thread within the large-work budget when `size` (characters or ids) is large."""
        if size <= OFF_LOOP_CHARS:
            return fn(*args)

        def work() -> T:
            try:
                return fn(*args)
            finally:
                _release_freed_memory()

        async with self._large_work.reserve(size):
            return await asyncio.to_thread(work)

    async def Encode(self, request: tokenizer_pb2.EncodeRequest,
                     context: grpc.aio.ServicerContext) -> tokenizer_pb2.EncodeResponse:
        tokenizer = await self._models.get(request.model)
        ids = await self._run(len(request.text), tokenizer.encode, request.text, request.add_special_tokens)
        return tokenizer_pb2.EncodeResponse(token_ids=ids)

    async def Decode(self, request: tokenizer_pb2.DecodeRequest,
                     context: grpc.aio.ServicerContext) -> tokenizer_pb2.DecodeResponse:
        tokenizer = await self._models.get(request.model)
        text = await self._run(len(request.token_ids), tokenizer.decode, request.token_ids, request.skip_special_tokens)
        return tokenizer_pb2.DecodeResponse(text=text)

    async def CountTokens(self, request: tokenizer_pb2.CountTokensRequest,
                          context: grpc.aio.ServicerContext) -> tokenizer_pb2.CountTokensResponse:
        tokenizer = await self._models.get(request.model)
        count = await self._run(len(request.text), tokenizer.count, request.text)
        return tokenizer_pb2.CountTokensResponse(token_count=count)

    async def ApplyChatTemplate(self, request: tokenizer_pb2.ApplyChatTemplateRequest,
                                context: grpc.aio.ServicerContext) -> tokenizer_pb2.ApplyChatTemplateResponse:
        tokenizer = await self._models.get(request.model)
        messages = [ChatMessage(role=m.role, content=m.content) for m in request.messages]
        # Each message costs the template a render of its own, however short: 400,000 empty turns are a few MB
        # but seconds of work.
        size = sum(len(m.content) + MESSAGE_RENDER_CHARS for m in messages)
        text, ids = await self._run(size, tokenizer.apply_chat_template, messages, request.add_generation_prompt,
                                    request.max_prompt_tokens)
        return tokenizer_pb2.ApplyChatTemplateResponse(text=text, token_ids=ids)

    async def GetVocabulary(self, request: tokenizer_pb2.GetVocabularyRequest,
                            context: grpc.aio.ServicerContext) -> tokenizer_pb2.GetVocabularyResponse:
        tokenizer = await self._models.get(request.model)
        vocabulary = await asyncio.to_thread(tokenizer.vocabulary)  # built once per version, off the loop
        return tokenizer_pb2.GetVocabularyResponse(model=tokenizer.name, token_bytes=vocabulary.token_bytes,
                                                   special_token_ids=vocabulary.special_token_ids)

    async def DetokenizeStream(
        self, request_iterator: AsyncIterator[tokenizer_pb2.DetokenizeStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[tokenizer_pb2.DetokenizeStreamResponse]:
        requests = aiter(request_iterator)
        start = await first_message(requests, "start")
        tokenizer = await self._models.get(start.model)
        detokenizer = IncrementalDetokenizer(tokenizer, start.skip_special_tokens)
        index = 0
        async for message in requests:
            index += 1
            kind = message.WhichOneof("kind")
            if kind == "start":
                raise InvalidArgument("start", f"message {index} carries start; only the first may")
            if kind != "tokens":
                raise InvalidArgument("tokens", f"message {index} carries no tokens")
            ids = message.tokens.token_ids
            delta = await self._run(len(ids), detokenizer.push, ids, "tokens.token_ids")
            yield tokenizer_pb2.DetokenizeStreamResponse(delta=delta)
        yield tokenizer_pb2.DetokenizeStreamResponse(delta=detokenizer.flush(), final=True)
