from hypothesis import given, strategies as st

from twisted_multifd._bytequeue import ByteQueue


def test_takeNothingFromEmpty():
    assert ByteQueue().take(0) == b""


@given(
    chunks=st.lists(st.binary(max_size=50), max_size=20),
    sizes=st.lists(st.integers(min_value=0, max_value=60), max_size=30),
)
def test_takesReturnTheBytesInOrder(chunks, sizes):
    queue = ByteQueue()
    for chunk in chunks:
        queue.append(chunk)
    whole = b"".join(chunks)
    taken = []
    for size in sizes:
        if size > len(queue):
            break
        taken.append(queue.take(size))
        assert len(taken[-1]) == size
    rest = queue.takeAll()
    assert b"".join(taken) + rest == whole
    assert len(queue) == 0


@given(
    chunks=st.lists(st.binary(max_size=50), max_size=20),
    sizes=st.lists(st.tuples(st.integers(min_value=0, max_value=60), st.booleans()), max_size=30),
)
def test_takeViewMixedWithTake(chunks, sizes):
    """
    L{ByteQueue.takeView} hands out the same bytes as L{ByteQueue.take}, in
    the same order, whichever of the two is used for each request.
    """
    queue = ByteQueue()
    for chunk in chunks:
        queue.append(chunk)
    whole = b"".join(chunks)
    taken = []
    for size, view in sizes:
        if size > len(queue):
            break
        piece = queue.takeView(size) if view else queue.take(size)
        assert len(piece) == size
        taken.append(bytes(piece))
    rest = queue.takeAll()
    assert b"".join(taken) + rest == whole
    assert len(queue) == 0


def test_takeViewInsideOneChunkDoesNotCopy():
    """
    Bytes that lie in one received chunk come back as a read-only view of
    that chunk; bytes spanning chunks are joined.
    """
    chunk = b"abcdefgh"
    queue = ByteQueue()
    queue.append(chunk)
    queue.append(b"ijkl")
    head = queue.takeView(3)
    assert isinstance(head, memoryview) and head.obj is chunk and head.readonly
    assert head == b"abc"
    middle = queue.takeView(5)
    assert isinstance(middle, memoryview) and middle.obj is chunk
    assert middle == b"defgh"
    assert queue.takeView(4) == b"ijkl"
    queue.append(b"mn")
    queue.append(b"op")
    assert queue.takeView(1) == b"m"
    spanning = queue.takeView(3)
    assert spanning == b"nop" and isinstance(spanning, bytes)
    assert len(queue) == 0
