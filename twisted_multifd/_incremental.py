"""
Drive a generator-based parser from bytes that arrive in arbitrary chunks.

A parser is written as a generator that yields either an C{int} (a request:
"send me exactly that many bytes") or an event (anything else), in stream
order. L{IncrementalParser} feeds it from a L{ByteQueue} and hands the events
out one at a time through L{IncrementalParser.nextEvent}, so that the caller
can stop pulling (at a sync barrier, say) and leave the remaining bytes
unparsed: nothing is read ahead of what the caller consumed.

This keeps the codecs pure (bytes in, records out, no I/O).
"""

from __future__ import annotations

from typing import Any, Generator

from ._bytequeue import ByteQueue
from ._errors import ProtocolError

ParserGenerator = Generator[Any, Any, None]


class View(int):
    """
    Request: exactly that many bytes, which may be handed over as a read-only
    C{memoryview} of a received chunk rather than copied into new C{bytes}.
    For large payloads that are only passed on (written out), never parsed.
    A driver that does not know this request may treat it as a plain C{int}.
    """

    __slots__ = ()


class PagePayload(View):
    """
    Request: the payload of a RAM packet's pages, a L{View} that also says
    where the pages belong (C{block} name and page C{offsets}), so that a
    reader able to store them itself (L{twisted_multifd._directread} splices
    them into the capture file) may take the bytes past the parser; it then
    reports them with L{IncrementalParser.externalFilled}, and the parser gets
    a L{DeliveredElsewhere} instead of the bytes. A driver that does not know
    this request treats it as a L{View}.
    """

    # An int subclass cannot have non-empty __slots__.
    block: str
    offsets: tuple[int, ...]

    def __new__(cls, size: int, block: str, offsets: tuple[int, ...]) -> "PagePayload":
        self = super().__new__(cls, size)
        self.block = block
        self.offsets = offsets
        return self


class DeliveredElsewhere:
    """
    What a parser gets for a L{PagePayload} whose bytes the reader stored
    itself: their size, not their contents.
    """

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"<{self.size} bytes delivered elsewhere>"


class _ToEnd:
    """
    Request: every remaining byte, once the stream has ended.
    """


READ_TO_END = _ToEnd()


class _Boundary:
    """
    Marker: the parser is between records (a stream that ends here ends
    cleanly).
    """


RECORD_BOUNDARY = _Boundary()


# Exact-size requests up to this size can be received in place (see
# IncrementalParser.directBuffer); larger plain requests go through the queue,
# so a hostile length field never makes us set aside memory before the bytes
# have arrived.
DIRECT_SMALL = 64 * 1024

# The least size of the buffer that View requests are received into.
VIEW_BUFFER = 512 * 1024


class IncrementalParser:
    """
    @ivar consumed: how many bytes the parser has taken so far (useful for
        error messages that name a stream offset).

    Bytes reach the parser in one of two ways, which may be mixed: L{feed}
    queues chunks that were already received, while L{directBuffer} and
    L{directFilled} let a reader receive the rest of the pending request in
    place (C{recv_into}), with no intermediate C{bytes} and, for a L{View}
    request, into one buffer reused from request to request.
    """

    def __init__(self, generator: ParserGenerator) -> None:
        self._queue = ByteQueue()
        self._generator = generator
        self._request: Any = next(generator)
        self._eventPending = False
        self._ended = False
        self._done = False
        self._boundary = False
        self.consumed = 0
        # The request being received in place, and how much of it has come.
        self._direct: memoryview | None = None
        self._filled = 0
        self._viewBuffer = bytearray()
        self._smallBuffer = bytearray()
        # A request completed in place, not yet handed to the parser.
        self._completed: Any = None
        # Bytes of the pending PagePayload stored by the reader itself.
        self._external = 0

    def feed(self, data: bytes) -> None:
        assert not self._external, "bytes fed in the middle of a payload delivered elsewhere"
        if self._direct is not None:
            # Whatever was received in place comes first.
            self._queue.append(bytes(self._direct[: self._filled]))
            self._direct = None
            self._filled = 0
        self._queue.append(data)

    def directBuffer(self) -> memoryview | None:
        """
        Where to receive the next bytes in place: a writable view of the rest
        of the pending exact-size request, or L{None} when that is not
        possible (an event is waiting to be taken, the queue already holds the
        whole request, the request is not for an exact size, or it is a plain
        request larger than L{DIRECT_SMALL}); then use L{feed}.

        After receiving C{n} bytes into it, call L{directFilled}. The bytes of
        a L{View} request are handed to the parser as a read-only view of a
        buffer that the next L{View} request reuses: like a view of a queued
        chunk, it is only valid until the parser asks for more.
        """
        if self._external:
            return None
        if self._direct is None:
            request = self._exactRequest()
            if request is None:
                return None
            queued = len(self._queue)
            if queued >= request:
                return None
            if isinstance(request, View):
                if len(self._viewBuffer) < request:
                    # Sized for a whole multifd packet of 4 KiB pages at
                    # least, so that it is not regrown packet after packet.
                    self._viewBuffer = bytearray(max(request, VIEW_BUFFER))
                target = memoryview(self._viewBuffer)[:request]
            elif request <= DIRECT_SMALL:
                if len(self._smallBuffer) < request:
                    self._smallBuffer = bytearray(DIRECT_SMALL)
                target = memoryview(self._smallBuffer)[:request]
            else:
                return None
            if queued:
                # Bytes received earlier (by the sniffer, say) come first.
                target[:queued] = self._queue.takeAll()
            self._direct = target
            self._filled = queued
        return self._direct[self._filled :]

    def directFilled(self, count: int) -> bool:
        """
        C{count} bytes were received into the view L{directBuffer} returned.

        @return: whether that completed the request (so that
            L{nextEvent} may now have something).
        """
        assert self._direct is not None
        self._filled += count
        if self._filled < len(self._direct):
            return False
        received, request = self._direct, self._request
        self._direct = None
        self._filled = 0
        # Handed to the parser by the next nextEvent, so that its errors are
        # raised where they always are.
        self._completed = received.toreadonly() if isinstance(request, View) else bytes(received)
        return True

    def pendingPagePayload(self) -> PagePayload | None:
        """
        The pending request if it is a L{PagePayload} of which no byte has
        been received yet (so that a reader may take all of it past the
        parser), else L{None}.
        """
        if self._direct is not None or self._external or len(self._queue):
            return None
        request = self._exactRequest()
        if type(request) is PagePayload:
            return request
        return None

    def externalFilled(self, count: int) -> bool:
        """
        C{count} more bytes of the pending L{PagePayload} (see
        L{pendingPagePayload}) were received and stored by the reader itself.

        @return: whether that completed the request; the parser then gets a
            L{DeliveredElsewhere} for it.
        """
        request = self._request
        assert type(request) is PagePayload and self._direct is None
        self._external += count
        if self._external < request:
            return False
        assert self._external == request, "more bytes delivered elsewhere than the payload has"
        self._external = 0
        self._completed = DeliveredElsewhere(int(request))
        return True

    def wanted(self) -> int:
        """
        How many more bytes the pending exact-size request needs beyond what
        is held, or 0 if that is not known (the parser waits for the end of
        the stream, or is not waiting for bytes at all).
        """
        request = self._exactRequest()
        if request is None:
            return 0
        return max(0, request - len(self._queue) - self._filled - self._external)

    def _exactRequest(self) -> int | None:
        """
        The pending request if the parser waits for an exact number of
        bytes (nothing else to hand out first), else L{None}.
        """
        request = self._request
        if self._done or self._eventPending or self._completed is not None or not isinstance(request, int):
            return None
        return request

    def end(self) -> None:
        """
        The stream has ended: no more bytes will be fed.
        """
        self._ended = True

    @property
    def buffered(self) -> int:
        """
        Bytes received but not yet parsed.
        """
        completed = 0 if self._completed is None else len(self._completed)
        return len(self._queue) + self._filled + self._external + completed

    @property
    def done(self) -> bool:
        """
        The parser has reached the end of its grammar.
        """
        return self._done

    @property
    def atBoundary(self) -> bool:
        """
        True when no partial record is held: the parser is done, or waits for
        the first bytes of a new record with none buffered.
        """
        return self._done or (self._boundary and not self.buffered)

    def nextEvent(self) -> Any:
        """
        Parse up to the next event and return it, or return L{None} when more
        bytes are needed. Raises L{ProtocolError} for malformed input; after
        that the parser is finished.
        """
        while not self._done:
            if self._completed is not None:
                value, self._completed = self._completed, None
                self._boundary = False
                self.consumed += len(value)
                self._advance(value)
                continue
            if self._eventPending:
                self._eventPending = False
                self._advance(None)
                continue
            request = self._request
            if request is RECORD_BOUNDARY:
                self._boundary = True
                self._advance(None)
            elif isinstance(request, int):
                if len(self._queue) < request:
                    return None
                self._boundary = False
                self.consumed += request
                if isinstance(request, View):
                    self._advance(self._queue.takeView(request))
                else:
                    self._advance(self._queue.take(request))
            elif request is READ_TO_END:
                if not self._ended:
                    return None
                self._boundary = False
                data = self._queue.takeAll()
                self.consumed += len(data)
                self._advance(data)
            else:
                self._eventPending = True
                return request
        return None

    def _advance(self, value: Any) -> None:
        try:
            self._request = self._generator.send(value)
        except StopIteration:
            self._done = True
        except ProtocolError:
            self._done = True
            raise
        except Exception as e:  # a codec bug must still end as a clear error
            self._done = True
            raise ProtocolError(f"internal parser error: {e!r}") from e
