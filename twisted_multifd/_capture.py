"""
The default sink: writes a migration into a capture directory.

Layout::

    DIR/manifest.json          written last, atomically (see below)
    DIR/ram/<name>.img         one raw image per RAM block: exactly the block's
                               used length, block offset 0 at file offset 0,
                               sparse where pages were never sent or are zero
    DIR/device-state.bin       the FULL device sections, verbatim
    DIR/vmdesc.json            the VMDESC JSON the source sent (if any)
    DIR/multifd-device-state/  QEMU 10 device-state packets, one file each

A capture is complete only if C{manifest.json} says C{"complete": true}; a
manifest is written for every migration, including failed ones (with
C{"error"}).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

from zope.interface import implementer

from ._directread import PageFile
from ._errors import MigrationError
from ._interfaces import IMigrationSink
from ._mainstream import Configuration, RamBlock
from ._packet import DeviceStatePacket, isOneRun, pageRuns
from ._records import MigrationInfo, MigrationResult
from ._tail import StreamTail

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1

# Page states in the per-block map.
_NEVER, _ZERO, _DATA = 0, 1, 2
_DATA_RUN = bytes([_DATA])


# File names stay well under NAME_MAX (255 bytes) whatever the block name
# (QEMU allows 255 bytes); the manifest maps names to files anyway.
_MAX_NAME_STEM = 120


def _safeStem(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._@-]+", "_", name).strip("._") or "block"
    if len(stem) > _MAX_NAME_STEM:
        digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:12]
        stem = f"{stem[:_MAX_NAME_STEM]}-{digest}"
    return stem


def _fileName(name: str, taken: set[str]) -> str:
    """
    A file name for a RAM block name such as C{/rom@etc/acpi/tables}.
    """
    base = _safeStem(name)
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}-{n}"
    taken.add(candidate)
    return candidate + ".img"


def writeFileAtomically(path: str, data: bytes) -> None:
    """
    Write C{data} to C{path} so that a reader sees the old file or the whole
    new one, never a part: a temporary file, fsync, rename, fsync the folder.
    If any step before the rename fails (disk full, say), the temporary file
    is removed and C{path} is as it was.
    """
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        _removeQuietly(temporary)
        raise
    _fsyncFolder(path)


def _removeQuietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsyncFolder(path: str) -> None:
    folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def captureIsComplete(directory: str) -> bool:
    """
    Whether C{directory} holds a capture whose manifest says it is complete.
    """
    try:
        with open(os.path.join(directory, MANIFEST), "rb") as f:
            return json.load(f).get("complete") is True
    except (OSError, ValueError, AttributeError):
        return False


# Start the kernel's writeback of an image after every this many bytes written
# to it, so that the fsync at the end finds most pages already on their way to
# the disk.
WRITEBACK_EVERY = 64 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2


def _loadSyncFileRange() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_syncFileRange = _loadSyncFileRange()


def _startWriteback(fd: int) -> None:
    # SYNC_FILE_RANGE_WRITE alone submits the dirty pages of the whole file
    # for writing and does not wait for them, nor does it consume a write
    # error: the fsync at the end still reports it. ctypes releases the GIL.
    _syncFileRange(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


class _EarlyWriteback:
    """
    Starts writeback of images in a worker thread, never in the reactor's
    (submitting pages can wait on the disk's queue). At most one request is
    outstanding; a kick while one runs is dropped (the next covers it, and
    the final fsync covers everything).
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    def kick(self, fd: int) -> None:
        if _syncFileRange is None:
            return
        if self._pending is not None and not self._pending.done():
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="twisted-multifd-writeback")
        self._pending = self._executor.submit(_startWriteback, fd)

    def wait(self) -> None:
        """
        Wait until no request is outstanding (before an image's fd is closed).
        """
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.exception()

    def shutdown(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


class CaptureWriteError(MigrationError):
    """
    The capture could not be written (disk full, read-only, I/O error): the
    migration ends as failed, with this as its reason.
    """


def _writeError(directory: str, what: str, e: OSError) -> CaptureWriteError:
    reason = e.strerror or str(e)
    code = f" (errno {e.errno})" if e.errno is not None else ""
    return CaptureWriteError(f"writing {what} failed: {reason}{code}", connection=f"capture {directory}")


# Space kept for the manifest from the start of a capture, so that a capture
# that fills the disk can still say so: the manifest is written into it.
MANIFEST_RESERVE = 64 * 1024
_RESERVE_NAME = ".manifest.reserve"


def _reserveSpace(path: str, size: int) -> bool:
    """
    Create C{path} with C{size} bytes allocated on disk. False if the
    filesystem cannot preallocate (the manifest is then written afresh).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, size)
        return True
    except OSError:
        _removeQuietly(path)
        return False
    finally:
        os.close(fd)


class _BlockImage:
    def __init__(self, block: RamBlock, path: str, pageSize: int,
                 writeback: _EarlyWriteback | None = None) -> None:
        self.block = block
        self.pageSize = pageSize
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(self.fd, block.length)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise
        self.pages = bytearray((block.length + pageSize - 1) // pageSize)
        self._writeback = writeback
        self._unkicked = 0

    def write(self, offsets: Sequence[int], data: Any) -> None:
        pageSize = self.pageSize
        view = memoryview(data)
        # One pwrite per run of consecutive pages: packets usually carry long
        # runs (most often the whole packet is one), and pwrite fails cleanly
        # (ENOSPC) where a mapping would SIGBUS.
        position = 0
        for start, size in pageRuns(tuple(offsets), pageSize):
            self._writeRun(start, view[position : position + size])
            position += size
        self._wrote(len(view))

    def _wrote(self, size: int) -> None:
        if self._writeback is not None:
            self._unkicked += size
            if self._unkicked >= WRITEBACK_EVERY:
                self._unkicked = 0
                self._writeback.kick(self.fd)

    def _writeRun(self, start: int, chunk: memoryview) -> None:
        fd = self.fd
        written = os.pwrite(fd, chunk, start)
        while written < len(chunk):
            written += os.pwrite(fd, chunk[written:], start + written)
        self._markData(start, len(chunk) // self.pageSize)

    def _markData(self, start: int, count: int) -> None:
        first = start // self.pageSize
        self.pages[first : first + count] = _DATA_RUN * count

    def stored(self, start: int, count: int) -> None:
        """
        C{count} pages from block offset C{start} were written into the
        image by the receiver itself.
        """
        self._markData(start, count)
        self._wrote(count * self.pageSize)

    def zero(self, offsets: Sequence[int]) -> None:
        pageSize = self.pageSize
        pages = self.pages
        for offset in offsets:
            index = offset // pageSize
            if pages[index] == _DATA:
                # A later zero version of a page written before: clear it.
                os.pwrite(self.fd, bytes(pageSize), offset)
            pages[index] = _ZERO

    def close(self) -> None:
        """
        Flush and close the image; the fd is closed whatever fails.
        """
        if self.fd >= 0:
            try:
                if self._writeback is not None:
                    self._writeback.wait()
                os.fsync(self.fd)
            finally:
                os.close(self.fd)
                self.fd = -1

    def stats(self) -> dict[str, int]:
        return {
            "pages_with_data": self.pages.count(_DATA),
            "pages_zero": self.pages.count(_ZERO),
            "pages_never_sent": self.pages.count(_NEVER),
        }


@implementer(IMigrationSink)
class CaptureWriter:
    """
    Writes one migration into C{directory} (created if needed).

    @ivar manifest: the manifest written at the end, as a dict.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.manifest: dict[str, Any] | None = None
        self._images: dict[str, _BlockImage] = {}
        self._order: list[tuple[RamBlock, str]] = []
        self._tail: StreamTail | None = None
        self._deviceStatePackets: list[dict[str, Any]] = []
        self._configuration: Configuration | None = None
        self._writeback = _EarlyWriteback()
        self._ended = False
        self._reserve: str | None = None
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise _writeError(directory, "the capture folder", e) from e
        # Never overwrite a complete capture; a failed one may be replaced.
        if captureIsComplete(directory):
            raise FileExistsError(f"{directory} already holds a complete capture")
        existing = os.path.join(directory, MANIFEST)
        try:
            if os.path.exists(existing):
                os.unlink(existing)
            reserve = os.path.join(directory, _RESERVE_NAME)
            if _reserveSpace(reserve, MANIFEST_RESERVE):
                self._reserve = reserve
        except OSError as e:
            raise _writeError(directory, "the capture folder", e) from e

    def migrationStarted(self, info: MigrationInfo) -> None:
        pass

    def configuration(self, configuration: Configuration) -> None:
        self._configuration = configuration

    def ramBlocks(self, blocks: Sequence[RamBlock], pageSize: int) -> None:
        taken: set[str] = set()
        relative = "ram/"
        try:
            os.makedirs(os.path.join(self.directory, "ram"), exist_ok=True)
            for block in blocks:
                fileName = _fileName(block.name, taken)
                relative = f"ram/{fileName}"
                self._images[block.name] = _BlockImage(
                    block, os.path.join(self.directory, relative), pageSize, self._writeback
                )
                self._order.append((block, relative))
        except OSError as e:
            raise _writeError(self.directory, relative, e) from e

    def writePages(self, block: RamBlock, offsets: Sequence[int], data: Any) -> None:
        try:
            self._images[block.name].write(offsets, data)
        except OSError as e:
            raise _writeError(self.directory, self._fileOf(block), e) from e

    # The receiver's private fast path (see twisted_multifd._directread): a
    # run of pages is spliced from the socket straight into its image, and
    # only recorded here once its packet is delivered.

    def _pageFile(self, block: RamBlock, offset: int, length: int) -> PageFile | None:
        image = self._images.get(block.name)
        if image is None or image.fd < 0:
            return None

        def failed(e: OSError) -> MigrationError:
            return _writeError(self.directory, self._fileOf(block), e)

        return PageFile(image.fd, offset, length, failed)

    def _pagesStored(self, block: RamBlock, offsets: Sequence[int]) -> None:
        self._images[block.name].stored(offsets[0], len(offsets))

    def zeroPages(self, block: RamBlock, offsets: Sequence[int]) -> None:
        try:
            self._images[block.name].zero(offsets)
        except OSError as e:
            raise _writeError(self.directory, self._fileOf(block), e) from e

    def _fileOf(self, block: RamBlock) -> str:
        for known, relative in self._order:
            if known.name == block.name:
                return relative
        return f"the image of RAM block {block.name!r}"

    def deviceStatePacket(self, packet: DeviceStatePacket) -> None:
        index = len(self._deviceStatePackets)
        name = _safeStem(packet.idstr)
        relative = f"multifd-device-state/{index:06d}-{name}-{packet.instanceID}.bin"
        try:
            os.makedirs(os.path.join(self.directory, "multifd-device-state"), exist_ok=True)
            with open(os.path.join(self.directory, relative), "wb") as f:
                f.write(packet.data)
        except OSError as e:
            raise _writeError(self.directory, relative, e) from e
        self._deviceStatePackets.append(
            {"idstr": packet.idstr, "instance_id": packet.instanceID, "flags": packet.flags, "file": relative}
        )

    def streamEnded(self, tail: StreamTail) -> None:
        self._tail = tail
        files = [("device-state.bin", tail.deviceState)]
        if tail.vmdescription is not None:
            files.append(("vmdesc.json", tail.vmdescription))
        for relative, data in files:
            try:
                with open(os.path.join(self.directory, relative), "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                raise _writeError(self.directory, relative, e) from e

    def migrationEnded(self, result: MigrationResult) -> None:
        """
        Close every image (each fd is closed even if flushing one fails), stop
        the writeback thread, then write the manifest. A complete migration
        whose images could not be flushed gets an incomplete manifest and
        raises; if the manifest itself cannot be written, there is none (the
        capture reads as incomplete) and this raises.
        """
        if self._ended:
            return
        self._ended = True
        complete, error = result.complete, result.error
        try:
            for relative, image in zip((r for _, r in self._order), self._images.values()):
                try:
                    image.close()
                except OSError as e:
                    if complete:
                        complete, error = False, str(_writeError(self.directory, relative, e))
        finally:
            self._writeback.shutdown()
        tail = self._tail
        manifest: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "complete": complete,
            "error": error,
            "machine": result.machine,
            "channels": result.info.channels,
            "uuid": result.uuid,
            "source": result.info.peer,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(result.info.startedAt)),
            "duration_seconds": round(result.duration, 3),
            "bytes_received": result.bytesReceived,
            "page_size": result.pageSize,
            "compression": result.compression,
            "flush_mode": result.flushMode,
            "zero_pages": result.zeroPages,
            "ram_blocks": [
                {"name": block.name, "length": block.length, "file": relative, **self._images[block.name].stats()}
                for block, relative in self._order
            ],
            "device_state": None if tail is None else {
                "file": "device-state.bin",
                "length": len(tail.deviceState),
                "sections": [
                    {"idstr": d.idstr, "instance_id": d.instanceID, "version": d.version,
                     "section_id": d.sectionID, "offset": d.offset, "length": d.length}
                    for d in tail.devices
                ],
            },
            "vmdesc": None if tail is None or tail.vmdescription is None else "vmdesc.json",
            "multifd_device_state": self._deviceStatePackets,
            "stream": result.stream,
        }
        try:
            self._writeManifest(json.dumps(manifest, indent=2).encode() + b"\n")
        except OSError as e:
            raise _writeError(self.directory, MANIFEST, e) from e
        self.manifest = manifest
        if result.complete and not complete:
            raise MigrationError(error or "capture incomplete")

    def _writeManifest(self, data: bytes) -> None:
        """
        Write the manifest atomically: into the space reserved at the start
        if it fits (so that a full disk does not stop it), else afresh.
        """
        path = os.path.join(self.directory, MANIFEST)
        reserve, self._reserve = self._reserve, None
        if reserve is not None:
            if len(data) <= MANIFEST_RESERVE:
                try:
                    fd = os.open(reserve, os.O_WRONLY)
                    try:
                        view = memoryview(data)
                        while view:
                            view = view[os.write(fd, view):]
                        os.ftruncate(fd, len(data))
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    os.replace(reserve, path)
                    _fsyncFolder(path)
                    return
                except OSError:
                    pass  # free the reserve and try a new file
            _removeQuietly(reserve)
        writeFileAtomically(path, data)
