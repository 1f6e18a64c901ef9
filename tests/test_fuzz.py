"""
Hostile bytes: every decoder, fed arbitrary bytes in arbitrary chunks, either
yields records or raises a ProtocolError of its own (never an internal
error). Prefixes of real streams make the fuzzer reach deep states.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from captures import recorded
from twisted_multifd._errors import ProtocolError
from twisted_multifd._incremental import IncrementalParser
from twisted_multifd._initpacket import parseInitPacket
from twisted_multifd._mainstream import mainStream
from twisted_multifd._packet import channelPackets
from twisted_multifd._tail import splitTail

# 300 examples each in the suite; HYPOTHESIS_PROFILE=long (tests/conftest.py) runs many more.
FUZZ = settings(
    max_examples=max(300, settings().max_examples), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _drive(parser, data, cuts):
    position = 0
    try:
        for cut in sorted(c for c in cuts if c < len(data)) + [len(data)]:
            parser.feed(data[position:cut])
            position = cut
            while parser.nextEvent() is not None:
                pass
        parser.end()
        while parser.nextEvent() is not None:
            pass
    except ProtocolError as e:
        assert not str(e).startswith("internal parser error"), str(e)


def _mutated(base: bytes):
    return st.tuples(
        st.integers(min_value=0, max_value=len(base)),
        st.lists(st.tuples(st.integers(min_value=0, max_value=len(base) - 1), st.integers(0, 255)), max_size=8),
        st.binary(max_size=64),
    ).map(lambda t: _apply(base[: t[0]], t[1], t[2]))


def _apply(data: bytes, flips, suffix):
    out = bytearray(data)
    for index, value in flips:
        if index < len(out):
            out[index] = value
    return bytes(out) + suffix


MAIN = recorded("cap10-1").streams[0][:4096]
MAIN72 = recorded("cap72-1").streams[0][:4096]
CHANNEL = recorded("cap72-1").streams[1][64 : 64 + 3 * 1344 + 8192]
CHANNEL10 = recorded("cap10-4-zstd").streams[1][64 : 64 + 20000]


@FUZZ
@given(data=st.one_of(st.binary(max_size=2048), _mutated(MAIN), _mutated(MAIN72)),
       cuts=st.lists(st.integers(0, 4200), max_size=10))
def test_mainStreamFuzz(data, cuts):
    _drive(IncrementalParser(mainStream()), data, cuts)


@FUZZ
@given(data=st.one_of(st.binary(max_size=4096), _mutated(CHANNEL), _mutated(CHANNEL10)),
       cuts=st.lists(st.integers(0, 25000), max_size=10),
       compression=st.sampled_from([None, 0, 2, 4]))
def test_multifdPacketFuzz(data, cuts, compression):
    _drive(IncrementalParser(channelPackets(4096, compression)), data, cuts)


@FUZZ
@given(data=st.binary(min_size=64, max_size=64))
def test_initPacketFuzz(data):
    try:
        packet = parseInitPacket(data)
    except ProtocolError:
        return
    assert data[:4] == b"\x11\x22\x33\x44"
    assert 0 <= packet.channelID <= 255


TAIL = recorded("cap72-1").streams[0][-(12916 + 1 + 5 + 98915):]


@FUZZ
@given(data=st.one_of(st.binary(max_size=512), _mutated(TAIL)))
def test_tailFuzz(data):
    try:
        splitTail(data)
    except ProtocolError:
        pass


def test_realTailSplits():
    tail = splitTail(TAIL)
    assert len(tail.devices) == 31 and len(tail.deviceState) == 12916


@pytest.mark.parametrize("cut", [1, 100, 5000, 12915, 12916, 12922, 50000])
def test_truncatedTailIsRefused(cut):
    with pytest.raises(ProtocolError):
        splitTail(TAIL[:cut])


def test_tailWithoutVmdesc():
    """
    Device state and the EOF byte, nothing after: a stream from a source that
    suppresses VMDESC; its sections are still walked and checked by footer.
    """
    tail = splitTail(TAIL[:12917])
    assert tail.vmdescription is None
    assert len(tail.devices) == 31


def test_hostileRamTotalIsRefusedBeforeAnyAllocation():
    """
    A block list announcing more RAM than a receiver accepts ends with a
    specific error, before any sink sets aside state for it.
    """
    from twisted_multifd._mainstream import (
        MAX_RAM_TOTAL, RAM_MEM_SIZE, SECTION_START, buildConfiguration, buildHeader, buildSectionHeader,
    )
    import struct

    data = (
        buildHeader() + buildConfiguration("pc-i440fx-10.0") + buildSectionHeader(SECTION_START, 1)
        + struct.pack(">Q", (MAX_RAM_TOTAL + 4096) | RAM_MEM_SIZE)
    )
    parser = IncrementalParser(mainStream())
    parser.feed(data)
    with pytest.raises(ProtocolError) as e:
        while parser.nextEvent() is not None:
            pass
    assert e.value.field == "block list"
    assert "more than the 1 TiB accepted" in str(e.value)


@FUZZ
@given(manifest=st.one_of(
    st.binary(max_size=300),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=6),
        max_leaves=20,
    ).map(lambda value: __import__("json").dumps(value).encode()),
))
def test_captureManifestFuzz(tmp_path_factory, manifest):
    """
    Any manifest.json: loading the capture gives a Capture or a CaptureError,
    never another exception.
    """
    from twisted_multifd import CaptureError, loadCapture

    folder = tmp_path_factory.mktemp("capture")
    (folder / "manifest.json").write_bytes(manifest)
    for strict in (True, False):
        try:
            loadCapture(str(folder), strict=strict)
        except CaptureError:
            pass


# Receiving in place (the multifd channels' read path on real sockets,
# twisted_multifd._directread): the same bytes must give the same records and
# errors as feeding them, and no buffer is set aside beyond what the parser
# may ask for in place.


def _snapshot(event):
    """
    An event as plain values: a memoryview handed out is only valid until
    the parser asks for more.
    """
    import attrs

    if attrs.has(type(event)):
        values = attrs.asdict(event, recurse=False)
        return (type(event).__name__, {k: bytes(v) if isinstance(v, memoryview) else v for k, v in values.items()})
    return (type(event).__name__, bytes(event) if isinstance(event, memoryview) else event)


def _events(parser, deliver):
    out = []
    try:
        deliver(parser, out)
        parser.end()
        while (event := parser.nextEvent()) is not None:
            out.append(_snapshot(event))
    except ProtocolError as e:
        assert not str(e).startswith("internal parser error"), str(e)
        out.append(("error", str(e)))
    return out


def _feeding(data, sizes):
    def deliver(parser, out):
        position = 0
        for size in _sizes(sizes, len(data)):
            parser.feed(data[position : position + size])
            position += size
            while (event := parser.nextEvent()) is not None:
                out.append(_snapshot(event))

    return deliver


def _receivingInPlace(data, sizes):
    from twisted_multifd._incremental import DIRECT_SMALL, VIEW_BUFFER

    def deliver(parser, out):
        position = 0
        for size in _sizes(sizes, len(data)):
            end = min(position + size, len(data))
            while position < end:
                target = parser.directBuffer()
                if target is None:
                    parser.feed(data[position:end])
                    position = end
                else:
                    assert len(target) <= max(DIRECT_SMALL, VIEW_BUFFER), len(target)
                    count = min(len(target), end - position)
                    target[:count] = data[position : position + count]
                    position += count
                    parser.directFilled(count)
                while (event := parser.nextEvent()) is not None:
                    out.append(_snapshot(event))

    return deliver


def _sizes(sizes, total):
    sizes = [s for s in sizes if s > 0] or [total or 1]
    index, delivered = 0, 0
    while delivered < total:
        size = sizes[index % len(sizes)]
        yield size
        delivered += size
        index += 1


@FUZZ
@given(data=st.one_of(st.binary(max_size=4096), _mutated(CHANNEL), _mutated(CHANNEL10)),
       sizes=st.lists(st.integers(1, 30000), min_size=1, max_size=5),
       compression=st.sampled_from([None, 0, 2, 4]))
def test_multifdPacketsReceivedInPlaceAsFed(data, sizes, compression):
    fed = _events(IncrementalParser(channelPackets(4096, compression)), _feeding(data, [len(data) or 1]))
    inPlace = _events(IncrementalParser(channelPackets(4096, compression)), _receivingInPlace(data, sizes))
    assert inPlace == fed


@FUZZ
@given(data=st.one_of(st.binary(max_size=2048), _mutated(MAIN), _mutated(MAIN72)),
       sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=5))
def test_mainStreamReceivedInPlaceAsFed(data, sizes):
    fed = _events(IncrementalParser(mainStream()), _feeding(data, [len(data) or 1]))
    inPlace = _events(IncrementalParser(mainStream()), _receivingInPlace(data, sizes))
    assert inPlace == fed
