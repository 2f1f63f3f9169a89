"""Stored page contents (the bytes of frames), sparse: what ``PhysMem.contents`` holds.

Most stored pages carry only a data tag -- the 8 bytes a simulated load/store uses (sim/invariants_data.py,
D1) -- and zeroes after it.  :class:`PageContents` keeps such a page as one ``uint64`` in an array per chunk
of ``CHUNK`` consecutive pfns (8 bytes a page, only for chunks that ever held one), and a ``bytearray`` of
``PAGE_SIZE`` only for pages with a nonzero byte past the first 8.  A 1 GiB device job that tags every page
costs 2 MiB of chunk arrays instead of 1 GiB of page buffers.

:class:`DictContents` is the reference: a ``bytearray`` per written page (the store before this one).  Both
answer the same questions with the same bytes (tests/mm/test_page_contents.py): a frame with nothing stored
reads as zeroes, and "stored" (``pfn in contents``) means only "may hold a nonzero byte" -- a page whose
bytes were all written as zeroes may or may not count as stored, which no reader can tell apart.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from hmmirror.arch.x86.pgtable import PAGE_SIZE

TAG_BYTES = 8
CHUNK_SHIFT = 12
CHUNK = 1 << CHUNK_SHIFT
_CMASK = CHUNK - 1


def _by_chunk(pfns: np.ndarray) -> list[tuple[int, Any]]:
    """``(chunk number, selector of the pfns in it)`` for the chunks ``pfns`` fall in."""
    if not pfns.size:
        return []
    lo, hi = int(pfns.min()) >> CHUNK_SHIFT, int(pfns.max()) >> CHUNK_SHIFT
    if lo == hi:
        return [(lo, slice(None))]
    ch = pfns >> CHUNK_SHIFT
    return [(c, ch == c) for c in np.unique(ch).tolist()]


class PageContents:
    """pfn -> page bytes: a tag (first 8 bytes) in a per-chunk ``uint64`` array, or a full ``bytearray``."""

    def __init__(self) -> None:
        self.tags: dict[int, np.ndarray] = {}     # chunk number -> uint64[CHUNK] (little-endian first 8 bytes)
        self.full: dict[int, bytearray] = {}      # pfn -> PAGE_SIZE bytes (its tag slot stays 0)

    # -- scalar access -------------------------------------------------------------------------------------
    def get_tag(self, pfn: int) -> int:
        """The first 8 bytes of ``pfn`` as a little-endian integer (0: nothing stored there)."""
        buf = self.full.get(pfn)
        if buf is not None:
            return int.from_bytes(buf[:TAG_BYTES], "little")
        a = self.tags.get(pfn >> CHUNK_SHIFT)
        return 0 if a is None else int(a[pfn & _CMASK])

    def set_tag(self, pfn: int, value: int) -> None:
        """Store the first 8 bytes of ``pfn`` (little-endian ``value``); the rest of the page is unchanged."""
        buf = self.full.get(pfn)
        if buf is not None:
            buf[:TAG_BYTES] = value.to_bytes(TAG_BYTES, "little")
            return
        c = pfn >> CHUNK_SHIFT
        a = self.tags.get(c)
        if a is None:
            if not value:
                return
            a = self.tags[c] = np.zeros(CHUNK, dtype=np.uint64)
        a[pfn & _CMASK] = value

    def read(self, pfn: int, offset: int = 0, length: int = PAGE_SIZE) -> bytes:
        """Bytes ``[offset, offset + length)`` of the frame (zeroes where nothing was stored)."""
        buf = self.full.get(pfn)
        if buf is not None:
            return bytes(buf[offset: offset + length])
        a = self.tags.get(pfn >> CHUNK_SHIFT)
        t = 0 if a is None else int(a[pfn & _CMASK])
        if not t or offset >= TAG_BYTES:
            return bytes(length)
        head = t.to_bytes(TAG_BYTES, "little")[offset: offset + length]
        return head + bytes(length - len(head))

    def write(self, pfn: int, offset: int, data: bytes) -> None:
        """Store ``data`` at ``offset`` of the frame."""
        buf = self.full.get(pfn)
        end = offset + len(data)
        if buf is None:
            if end <= TAG_BYTES or data.count(0, max(0, TAG_BYTES - offset)) == end - max(offset, TAG_BYTES):
                if offset < TAG_BYTES:             # everything past byte 8 stays zero: the tag is enough
                    t = bytearray(self.get_tag(pfn).to_bytes(TAG_BYTES, "little"))
                    t[offset: min(end, TAG_BYTES)] = data[: TAG_BYTES - offset]
                    self.set_tag(pfn, int.from_bytes(t, "little"))
                return
            buf = bytearray(PAGE_SIZE)
            t = self._take_tag(pfn)
            if t:
                buf[:TAG_BYTES] = t.to_bytes(TAG_BYTES, "little")
            self.full[pfn] = buf
        elif offset == 0 and end >= PAGE_SIZE and data.count(0, TAG_BYTES) == len(data) - TAG_BYTES:
            del self.full[pfn]                     # the whole page rewritten with zeroes past its tag
            self.set_tag(pfn, int.from_bytes(data[:TAG_BYTES], "little"))
            return
        buf[offset: end] = data

    def zero(self, pfn: int, offset: int, stop: int) -> None:
        """Zero bytes ``[offset, stop)`` of the frame (a partial-page truncate)."""
        buf = self.full.get(pfn)
        if buf is not None:
            buf[offset: stop] = bytes(stop - offset)
        elif offset < TAG_BYTES:
            t = self.get_tag(pfn)
            if t:
                b = bytearray(t.to_bytes(TAG_BYTES, "little"))
                b[offset: min(stop, TAG_BYTES)] = bytes(min(stop, TAG_BYTES) - offset)
                self.set_tag(pfn, int.from_bytes(b, "little"))

    def copy(self, dst: int, src: int) -> None:
        """Make ``dst`` hold what ``src`` holds."""
        buf = self.full.get(src)
        if buf is not None:
            self._take_tag(dst)
            self.full[dst] = bytearray(buf)
            return
        self.full.pop(dst, None)
        self.set_tag(dst, self.get_tag(src))

    def discard(self, pfn: int) -> None:
        """Forget the frame's bytes (it reads as zeroes)."""
        if self.full.pop(pfn, None) is None:
            self._take_tag(pfn)

    def _take_tag(self, pfn: int) -> int:
        a = self.tags.get(pfn >> CHUNK_SHIFT)
        if a is None:
            return 0
        i = pfn & _CMASK
        t = int(a[i])
        if t:
            a[i] = 0
        return t

    # -- ranges and arrays ---------------------------------------------------------------------------------
    def load_tags(self, pfns: np.ndarray) -> np.ndarray:
        """:meth:`get_tag` of every pfn of ``pfns`` (int64 array) as a ``uint64`` array."""
        out = np.zeros(pfns.shape[0], dtype=np.uint64)
        if not pfns.size:
            return out
        for c, sel in _by_chunk(pfns):
            a = self.tags.get(c)
            if a is not None:
                out[sel] = a[pfns[sel] & _CMASK]
        if self.full:
            for i, p in enumerate(pfns.tolist()):
                buf = self.full.get(p)
                if buf is not None:
                    out[i] = int.from_bytes(buf[:TAG_BYTES], "little")
        return out

    def store_tags(self, pfns: np.ndarray, values: np.ndarray) -> None:
        """:meth:`set_tag` of every pfn of ``pfns`` (distinct) to ``values`` (``uint64``)."""
        if not pfns.size:
            return
        if self.full:
            keep = np.ones(pfns.shape[0], dtype=bool)
            for i, p in enumerate(pfns.tolist()):
                buf = self.full.get(p)
                if buf is not None:
                    buf[:TAG_BYTES] = int(values[i]).to_bytes(TAG_BYTES, "little")
                    keep[i] = False
            if not keep.all():
                pfns, values = pfns[keep], values[keep]
        for c, sel in _by_chunk(pfns):
            a = self.tags.get(c)
            if a is None:
                if not values[sel].any():
                    continue
                a = self.tags[c] = np.zeros(CHUNK, dtype=np.uint64)
            a[pfns[sel] & _CMASK] = values[sel]

    def stored_in(self, lo: int, hi: int) -> list[int]:
        """The pfns of ``[lo, hi)`` that hold something (ascending)."""
        out = [p for p in self.full if lo <= p < hi] if len(self.full) < hi - lo else \
            [p for p in range(lo, hi) if p in self.full]
        for c in range(lo >> CHUNK_SHIFT, ((hi - 1) >> CHUNK_SHIFT) + 1 if hi > lo else lo >> CHUNK_SHIFT):
            a = self.tags.get(c)
            if a is None:
                continue
            base = c << CHUNK_SHIFT
            a0, a1 = max(lo, base) - base, min(hi, base + CHUNK) - base
            out.extend((base + a0 + np.flatnonzero(a[a0:a1])).tolist())
        return sorted(out)

    def drop_range(self, lo: int, hi: int) -> None:
        """Forget the bytes of every frame of ``[lo, hi)`` (a freed folio)."""
        if self.full:
            if len(self.full) < hi - lo:
                for p in [p for p in self.full if lo <= p < hi]:
                    del self.full[p]
            else:
                for p in range(lo, hi):
                    self.full.pop(p, None)
        if not self.tags or hi <= lo:
            return
        for c in range(lo >> CHUNK_SHIFT, ((hi - 1) >> CHUNK_SHIFT) + 1):
            a = self.tags.get(c)
            if a is None:
                continue
            base = c << CHUNK_SHIFT
            a0, a1 = max(lo, base) - base, min(hi, base + CHUNK) - base
            if a0 == 0 and a1 == CHUNK:
                del self.tags[c]
            else:
                a[a0:a1] = 0

    # -- the mapping view (tests, rare paths) --------------------------------------------------------------
    def __contains__(self, pfn: object) -> bool:
        if not isinstance(pfn, (int, np.integer)):
            return False
        p = int(pfn)
        if p in self.full:
            return True
        a = self.tags.get(p >> CHUNK_SHIFT)
        return a is not None and bool(a[p & _CMASK])

    def get(self, pfn: int, default: Any = None) -> Any:
        """The frame's bytes as a ``bytearray`` of ``PAGE_SIZE`` (a copy for a tag-only page: change bytes
        through :meth:`write`/:meth:`zero`, never through the returned buffer), or ``default``."""
        buf = self.full.get(pfn)
        if buf is not None:
            return buf
        t = self.get_tag(pfn)
        if not t:
            return default
        buf = bytearray(PAGE_SIZE)
        buf[:TAG_BYTES] = t.to_bytes(TAG_BYTES, "little")
        return buf

    def __getitem__(self, pfn: int) -> bytearray:
        buf = self.get(pfn)
        if buf is None:
            raise KeyError(pfn)
        return buf

    def __setitem__(self, pfn: int, data: bytes) -> None:
        self.discard(pfn)
        self.write(pfn, 0, bytes(data).ljust(PAGE_SIZE, b"\0"))

    def pop(self, pfn: int, default: Any = None) -> Any:
        buf = self.get(pfn)
        if buf is None:
            return default
        self.discard(pfn)
        return buf

    def keys(self) -> list[int]:
        out = list(self.full)
        for c, a in self.tags.items():
            out.extend(((c << CHUNK_SHIFT) + np.flatnonzero(a)).tolist())
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.full) + sum(int(np.count_nonzero(a)) for a in self.tags.values())

    def __bool__(self) -> bool:
        return bool(self.full) or any(a.any() for a in self.tags.values())

    def items(self) -> Iterator[tuple[int, bytearray]]:
        for p in self.keys():
            yield p, self[p]

    def values(self) -> Iterator[bytearray]:
        for _, v in self.items():
            yield v

    def nbytes(self) -> int:
        """Bytes the store holds (chunk arrays and page buffers)."""
        return sum(a.nbytes for a in self.tags.values()) + PAGE_SIZE * len(self.full)


class DictContents(dict):
    """The reference store: ``pfn -> bytearray(PAGE_SIZE)`` for every page a write reached, with
    :class:`PageContents`' methods written the plain way."""

    def get_tag(self, pfn: int) -> int:
        buf = dict.get(self, pfn)
        return 0 if buf is None else int.from_bytes(buf[:TAG_BYTES], "little")

    def set_tag(self, pfn: int, value: int) -> None:
        self.write(pfn, 0, value.to_bytes(TAG_BYTES, "little"))

    def read(self, pfn: int, offset: int = 0, length: int = PAGE_SIZE) -> bytes:
        data = dict.get(self, pfn)
        if data is None:
            return bytes(length)
        return bytes(data[offset: offset + length])

    def write(self, pfn: int, offset: int, data: bytes) -> None:
        buf = dict.get(self, pfn)
        if buf is None:
            buf = self[pfn] = bytearray(PAGE_SIZE)
        buf[offset: offset + len(data)] = data

    def zero(self, pfn: int, offset: int, stop: int) -> None:
        buf = dict.get(self, pfn)
        if buf is not None:
            buf[offset: stop] = bytes(stop - offset)

    def copy(self, dst: int, src: int) -> None:  # type: ignore[override]
        data = dict.get(self, src)
        if data is None:
            dict.pop(self, dst, None)
        else:
            self[dst] = bytearray(data)

    def discard(self, pfn: int) -> None:
        dict.pop(self, pfn, None)

    def load_tags(self, pfns: np.ndarray) -> np.ndarray:
        return np.array([self.get_tag(p) for p in pfns.tolist()], dtype=np.uint64)

    def store_tags(self, pfns: np.ndarray, values: np.ndarray) -> None:
        for p, v in zip(pfns.tolist(), values.tolist()):
            self.set_tag(p, v)

    def stored_in(self, lo: int, hi: int) -> list[int]:
        return sorted(p for p in self if lo <= p < hi)

    def drop_range(self, lo: int, hi: int) -> None:
        if hi - lo <= len(self):
            for p in range(lo, hi):
                dict.pop(self, p, None)
        else:
            for p in [p for p in self if lo <= p < hi]:
                del self[p]

    def nbytes(self) -> int:
        return sum(len(b) for b in dict.values(self))
