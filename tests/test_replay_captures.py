"""
Real QEMU 7.2 and 10.0 connections (recorded byte for byte) played into the
receiver over in-memory transports (L{twisted_multifd.testing.MigrationPump}),
in every connection order that matters and in many chunkings: the captured
pc.ram must equal the source's memory.
"""

from __future__ import annotations

import itertools
import json
import os

import pytest
from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock

from captures import CAPTURE_NAMES, recorded
from twisted_multifd import CaptureWriter, MigrationReceiverFactory
from twisted_multifd._incremental import IncrementalParser
from twisted_multifd._mainstream import mainStream
from twisted_multifd._packet import channelPackets
from twisted_multifd.testing import MigrationPump


def _receive(tmp_path, name, order, chunks, **factoryArgs):
    migration = recorded(name)
    results = []
    factory = MigrationReceiverFactory(
        lambda info: CaptureWriter(str(tmp_path)),
        channels=migration.channels,
        clock=Clock(),
        onMigrationEnded=results.append,
        **factoryArgs,
    )
    MigrationPump(factory, migration.streams, order=order, chunkSizes=chunks).flush()
    assert len(results) == 1, "the migration did not end"
    return migration, results[0], json.load(open(tmp_path / "manifest.json"))


def _orders(n):
    natural = list(range(n + 1))
    return [natural, natural[::-1], [*natural[1:], 0]]


@pytest.mark.parametrize(
    "name,order,chunk",
    [
        (name, order, chunk)
        for name in CAPTURE_NAMES
        for order in _orders(recorded(name).channels)
        for chunk in (4093, 65536, 1 << 20)
    ],
)
def test_recordedMigrationIsCapturedExactly(tmp_path, name, order, chunk):
    migration, result, manifest = _receive(tmp_path, name, order, chunk)
    assert result.error is None and result.complete
    assert manifest["complete"] is True
    assert manifest["error"] is None
    assert manifest["machine"].startswith("pc-i440fx-")
    assert manifest["channels"] == migration.channels
    assert manifest["uuid"] == "00000000-0000-0000-0000-000000000000"
    blocks = {b["name"]: b for b in manifest["ram_blocks"]}
    assert blocks["pc.ram"]["length"] == 64 * 1024 * 1024
    with open(tmp_path / blocks["pc.ram"]["file"], "rb") as f:
        assert f.read() == migration.memory
    for block in manifest["ram_blocks"]:
        assert os.path.getsize(tmp_path / block["file"]) == block["length"]
        assert block["pages_never_sent"] == 0
    assert manifest["device_state"]["length"] == 12916
    assert os.path.getsize(tmp_path / "device-state.bin") == 12916
    assert json.load(open(tmp_path / "vmdesc.json"))["page_size"] == 4096


@pytest.mark.parametrize(
    "name,flushMode,zeroPages",
    [
        ("cap72-4", "per-section", "main"),
        ("cap10-4", "per-round", "multifd"),
        ("cap10-4-zstd", "per-round", "multifd"),
    ],
)
def test_conventionsAreRecorded(tmp_path, name, flushMode, zeroPages):
    _, _, manifest = _receive(tmp_path, name, list(range(5)), 65536)
    assert manifest["flush_mode"] == flushMode
    assert manifest["zero_pages"] == zeroPages
    assert manifest["compression"] == ("zstd" if "zstd" in name else "none")
    assert manifest["stream"]["version"] == 3
    if name.startswith("cap10"):
        assert manifest["stream"]["commands"] == ["SWITCHOVER_START"]


def test_everyOrderOfFourChannels(tmp_path):
    """
    All 120 connection orders of a 4-channel 7.2 migration.
    """
    migration = recorded("cap72-4")
    for n, order in enumerate(itertools.permutations(range(5))):
        folder = tmp_path / str(n)
        _, result, _ = _receive(folder, "cap72-4", list(order), 65536)
        assert result.complete, (order, result.error)
        with open(folder / "ram" / "pc.ram.img", "rb") as f:
            assert f.read() == migration.memory


def test_smallChunksEverywhere(tmp_path):
    """
    Every connection delivered in odd small pieces.
    """
    migration, result, _ = _receive(tmp_path, "cap10-4-zstd", [4, 0, 2, 1, 3], [997, 1, 3, 5, 7])
    assert result.complete, result.error


def test_explicitCompressionMustMatch(tmp_path):
    migration, result, manifest = _receive(tmp_path, "cap10-4-zstd", list(range(5)), 65536, compression="zlib")
    assert not result.complete
    assert "compression is zstd, expected zlib" in result.error
    assert manifest["complete"] is False


def _events(parser, data, cuts):
    events = []
    position = 0
    for cut in sorted(cuts) + [len(data)]:
        parser.feed(data[position:cut])
        position = cut
        while (event := parser.nextEvent()) is not None:
            events.append(event)
    parser.end()
    while (event := parser.nextEvent()) is not None:
        events.append(event)
    return events


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(CAPTURE_NAMES),
    cuts=st.lists(st.integers(min_value=0, max_value=300_000), max_size=40),
)
def test_mainStreamParsesAlikeInAnyChunking(name, cuts):
    data = recorded(name).streams[0]
    whole = _events(IncrementalParser(mainStream()), data, [])
    assert _events(IncrementalParser(mainStream()), data, [c for c in cuts if c < len(data)]) == whole


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(CAPTURE_NAMES),
    cuts=st.lists(st.integers(min_value=0, max_value=700_000), max_size=40),
)
def test_multifdChannelParsesAlikeInAnyChunking(name, cuts):
    data = recorded(name).streams[1][64:]
    whole = _events(IncrementalParser(channelPackets(4096)), data, [])
    parser = IncrementalParser(channelPackets(4096))
    assert _events(parser, data, [c for c in cuts if c < len(data)]) == whole
    assert parser.atBoundary
