"""
A FIFO of bytes that hands out exact-length pieces without re-copying what it
holds: incoming chunks are kept as they arrived and only joined when a request
spans several of them.
"""

from __future__ import annotations

from collections import deque


class ByteQueue:
    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        # Bytes of the first chunk already handed out.
        self._offset = 0
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def append(self, data: bytes) -> None:
        if data:
            self._chunks.append(bytes(data))
            self._length += len(data)

    def take(self, size: int) -> bytes:
        """
        Remove and return exactly C{size} bytes; the caller checked there are
        that many.
        """
        if size > self._length:
            raise ValueError(f"take({size}) with only {self._length} bytes queued")
        if size == 0:
            return b""
        self._length -= size
        first = self._chunks[0]
        available = len(first) - self._offset
        if size <= available:
            start = self._offset
            if size == available:
                self._chunks.popleft()
                self._offset = 0
                return first if start == 0 else first[start:]
            self._offset += size
            return first[start : start + size]
        # Slices are views, so each byte is copied once, by the join.
        pieces = []
        needed = size
        while needed:
            chunk = self._chunks[0]
            piece = memoryview(chunk)[self._offset : self._offset + needed] if self._offset or len(chunk) > needed else chunk
            pieces.append(piece)
            needed -= len(piece)
            if self._offset + len(piece) == len(chunk):
                self._chunks.popleft()
                self._offset = 0
            else:
                self._offset += len(piece)
        return b"".join(pieces)

    def takeView(self, size: int) -> "bytes | memoryview":
        """
        Like L{take}, but without copying when the C{size} bytes lie in one
        received chunk: then the result is a read-only C{memoryview} of that
        chunk (which it keeps alive). Bytes that span chunks are joined, as
        by L{take}.
        """
        if size > self._length:
            raise ValueError(f"take({size}) with only {self._length} bytes queued")
        first = self._chunks[0] if self._chunks else b""
        start = self._offset
        if 0 < size < len(first) - start or (start and size == len(first) - start):
            self._length -= size
            if size == len(first) - start:
                self._chunks.popleft()
                self._offset = 0
            else:
                self._offset += size
            return memoryview(first)[start : start + size]
        return self.take(size)

    def takeAll(self) -> bytes:
        return self.take(self._length)
