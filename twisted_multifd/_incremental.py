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


class IncrementalParser:
    """
    @ivar consumed: how many bytes the parser has taken so far (useful for
        error messages that name a stream offset).
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

    def feed(self, data: bytes) -> None:
        self._queue.append(data)

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
        return len(self._queue)

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
        return self._done or (self._boundary and not self._queue)

    def nextEvent(self) -> Any:
        """
        Parse up to the next event and return it, or return L{None} when more
        bytes are needed. Raises L{ProtocolError} for malformed input; after
        that the parser is finished.
        """
        while not self._done:
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
                if type(request) is View:
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
