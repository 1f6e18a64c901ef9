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
