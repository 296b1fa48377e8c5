"""Tar shards read by hand: 512-byte headers parsed here, members grouped into samples by key.

Why not Python's ``tarfile`` (what webdataset's ``tarfile_to_samples`` and our pipeline used): a training
worker reads tens of thousands of small members a second, and tarfile spends ~27 µs on each one (a TarInfo
object, every header field converted, its stream wrapper's seek and read). At 64 px that was 55 of the
~100 µs the pipeline added to a 245 µs decode (issue 18); this reader reads the shard in 1 MiB chunks and
slices members out of them: ~6 µs a sample of two members, ~13 µs when each member has a pax header
(webdataset's TarWriter writes one for its float mtime; bench/tar_reading.py: 7.8x webdataset's reader).

What it reads, as tarfile's stream mode ``r|*`` reads it:

- ustar / GNU / v7 headers, checksum checked (unsigned or signed, as tarfile accepts), sizes in octal or
  GNU base-256; the ustar ``prefix`` joined to the name as tarfile joins it;
- GNU long names (``L``) and pax headers (``x`` per member, ``g`` for all later ones: ``path`` and ``size``),
  so names over 100 characters keep their key;
- gzip, bzip2 and xz compressed shards (detected from the first bytes, as ``r|*`` does);
- only regular members are returned (directories, links and devices are skipped); GNU sparse members raise
  :class:`TarError` naming the member, since their data is not stored in order.

How an archive ends, the distinctions ``lavis_ext.datasets.wds_pipeline`` counts as tar damage: a zero block
followed only by zeros ends cleanly; anything else raises :class:`TarError` with what happened and the
byte offset: data after the end-of-archive marker, a shard cut at a member boundary or inside a header
or member data, a damaged header (bad checksum, a size that is not a number), an empty file or one that is
not a tar. Header fields that we do not use (mode, uid, mtime, ...) are not validated: a header whose
checksum is right but whose uid is garbage is read, where tarfile would stop.
"""
from __future__ import annotations

import bz2
import lzma
import re
import zlib
from typing import BinaryIO, Iterator

__all__ = ["TarError", "iter_members", "iter_samples", "split_key"]

BLOCK = 512
CHUNK = 1 << 20
_ZERO_BLOCK = bytes(BLOCK)
# type flags (header byte 156) as ints
_REGULAR = frozenset(b"0\x007")  # regular file, old-style regular file, contiguous file (tarfile.REGULAR_TYPES)
_LONGNAME, _LONGLINK, _SPARSE, _PAX, _GLOBAL_PAX = b"LKSxg"
_GNU_TYPES = frozenset(b"LKS")  # the types whose prefix field is not a ustar prefix (tarfile.GNU_TYPES)
_EXTENDED = frozenset(b"LKxg")  # GNU long name / long link, pax per-member / global
_SUPPORTED = frozenset(b"0\x001234567LKS")  # tarfile.SUPPORTED_TYPES
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


class TarError(Exception):
    """The shard is damaged, cut short or not a tar; the message says what and at which byte."""


def split_key(name: str) -> tuple[str | None, str | None]:
    """``(key, extension)`` of a member name exactly as webdataset's ``base_plus_ext`` splits it
    (``dir/abc.seg.jpg`` -> ``("dir/abc", "seg.jpg")``; ``(None, None)`` when there is no extension)."""
    if "/" not in name:  # fast path, same answer as the regex: the key ends at the first dot
        dot = name.find(".")
        return (name[:dot], name[dot + 1:]) if dot > 0 else (None, None)
    match = _KEY.match(name)
    return (match.group(1), match.group(2)) if match else (None, None)


class _Source:
    """Bytes from ``stream`` (decompressed when its first bytes say so), read in large chunks."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        first = _read_full(stream, CHUNK)
        self.decompressor = None
        if first.startswith(b"\x1f\x8b\x08"):
            self.decompressor, self._new = zlib.decompressobj(31), (lambda: zlib.decompressobj(31))
        elif first.startswith(b"BZh"):
            self.decompressor, self._new = bz2.BZ2Decompressor(), bz2.BZ2Decompressor
        elif first.startswith(b"\xfd7zXZ\x00") or first.startswith(b"\x5d\x00\x00\x80\x00"):
            self.decompressor, self._new = lzma.LZMADecompressor(), lzma.LZMADecompressor
        self._pending = first

    def read(self) -> bytes:
        """The next chunk of (uncompressed) bytes; b"" at the end."""
        while True:
            raw, self._pending = (self._pending, b"") if self._pending else (_read_full(self.stream, CHUNK), b"")
            if self.decompressor is None or not raw:
                return raw
            out = self.decompressor.decompress(raw)
            while self.decompressor.eof and self.decompressor.unused_data:  # concatenated gzip/bz2/xz members
                rest = self.decompressor.unused_data
                self.decompressor = self._new()
                out += self.decompressor.decompress(rest)
            if out:
                return out


def _read_full(stream: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes, fewer only at the end (pipes and sockets return short reads)."""
    data = stream.read(size)
    if not data or len(data) == size:
        return data or b""
    parts, got = [data], len(data)
    while got < size:
        more = stream.read(size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _nts(field: bytes) -> str:
    end = field.find(b"\0")
    return (field if end < 0 else field[:end]).decode("utf-8", "surrogateescape")


def _number(field: bytes, what: str, offset: int) -> int:
    if field[0] in (0o200, 0o377):  # GNU base-256 (sizes of 8 GiB and more)
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0o377 else value
    end = field.find(b"\0")
    text = (field if end < 0 else field[:end]).strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise TarError(f"damaged member header at byte {offset} (its {what} field {bytes(field)!r} is not a number)") from None


def _checksum_ok(header: bytes, offset: int) -> bool:
    stored = _number(header[148:156], "checksum", offset)
    # Adler-32's low half is 1 + the byte sum mod 65521: exact for 256 bytes (at most 65280), so two calls
    # give the byte sum in C. The checksum field itself counts as 8 spaces.
    total = (zlib.adler32(header[:256]) & 0xFFFF) + (zlib.adler32(header[256:]) & 0xFFFF) - 2
    total += 256 - sum(header[148:156])
    if stored == total:
        return True
    signed = sum(b - 256 if b > 127 else b for b in header[:148] + header[156:]) + 256  # old tars: signed chars
    return stored == signed


def _pax_records(data: bytes, offset: int) -> dict[str, str]:
    length, _, rest = data.partition(b" ")
    if length.isdigit() and int(length) == len(data) and data[-1:] == b"\n" and b"=" in rest:
        # one record, the usual case (tarfile writes "NN mtime=..." for a float mtime, as webdataset's TarWriter
        # and img2dataset give it): split in C instead of the loop below
        key, _, value = rest[:-1].partition(b"=")
        return {key.decode("utf-8", "surrogateescape"): value.decode("utf-8", "surrogateescape")}
    records, pos = {}, 0
    while (match := _PAX_RECORD.match(data, pos)) is not None:
        length = int(match.group(1))
        if length == 0:
            raise TarError(f"damaged pax header at byte {offset} (a record of length 0)")
        value = data[match.end(2) + 1: match.start(1) + length - 1]
        records[match.group(2).decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def iter_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of every regular member of a tar stream, in archive order.

    Args:
        stream: a binary file object positioned at the start of the archive (a local file, a pipe or an
            http response); plain, gzip, bzip2 or xz.

    Raises:
        TarError: damage, a cut, a non-tar or an unsupported member (see the module docstring); the
            members before it have been yielded.
        OSError / EOFError / zlib.error / lzma.LZMAError: from the stream or a broken compressed stream.
    """
    source = _Source(stream)
    buf, pos, offset = source.read(), 0, 0  # offset: the archive byte at buf[pos]
    if not buf:
        raise TarError("empty file: not a tar archive")
    long_name: str | None = None
    pax: dict[str, str] = {}
    global_pax: dict[str, str] = {}
    first = True

    def take(n: int) -> bytes | None:
        """The next n bytes (None when the archive ends first); buf/pos/offset advanced."""
        nonlocal buf, pos, offset
        end = pos + n
        if end <= len(buf):
            data = buf[pos:end]
            pos, offset = end, offset + n
            return data
        parts, have = [buf[pos:]], len(buf) - pos
        while have < n:
            chunk = source.read()
            if not chunk:
                buf, pos = b"", 0
                return None
            parts.append(chunk)
            have += len(chunk)
        joined = b"".join(parts)
        buf, pos = joined, n
        offset += n
        return joined[:n]

    adler32 = zlib.adler32
    while True:
        at = offset
        if pos + BLOCK <= len(buf):  # inline fast path of take(BLOCK): this loop runs once per member
            header = buf[pos:pos + BLOCK]
            pos += BLOCK
            offset += BLOCK
        else:
            header = take(BLOCK)
            if header is None:
                if first:
                    raise TarError("not a tar archive: shorter than one 512-byte header")
                raise TarError(f"the shard ends at byte {at} without an end-of-archive marker (cut short)")
        if header == _ZERO_BLOCK:
            rest = buf[pos:]
            while True:  # the marker and the record padding are zeros; anything else is members after the end
                if rest.strip(b"\0"):
                    raise TarError(f"data after the end-of-archive marker at byte {at} (concatenated or overwritten tar)")
                rest = source.read()
                if not rest:
                    return
        # Checksum: Adler-32's low half is 1 + the byte sum mod 65521, exact for 256 bytes (at most 65280),
        # so two calls give the byte sum in C; the checksum field itself counts as 8 spaces (256).
        try:
            valid = int(header[148:156].partition(b"\0")[0], 8) == (
                (adler32(header[:256]) & 0xFFFF) + (adler32(header[256:]) & 0xFFFF) + 254 - sum(header[148:156]))
        except ValueError:
            valid = False
        if not valid:
            try:
                valid = _checksum_ok(header, at)  # the slow path: signed sums, odd field layouts
            except TarError:
                valid = False
            if not valid:
                if first:
                    raise TarError("not a tar archive: the first header's checksum is wrong")
                raise TarError(f"damaged member header at byte {at} (bad checksum)")
        first = False
        kind = header[156]
        extended = ({**global_pax, **pax} if global_pax else pax) if pax or global_pax else None
        try:
            size = int(header[124:136].partition(b"\0")[0], 8)
        except ValueError:
            size = _number(header[124:136], "size", at)  # base-256, blank, or garbage (raises)
        if extended is not None and "size" in extended and kind not in _EXTENDED:
            size = int(extended["size"])
        padded = (size + 511) & ~511
        if kind in _EXTENDED:  # their data describes the next member
            data = take(padded)
            if data is None:
                raise TarError(f"the shard ends inside the extended header at byte {at} (cut short)")
            data = data[:size]
            if kind == _LONGNAME:
                long_name = _nts(data)
            elif kind == _PAX:
                pax.update(_pax_records(data, at))
            elif kind == _GLOBAL_PAX:
                global_pax.update(_pax_records(data, at))
            continue  # kind K (long link name): links are not returned
        if extended is not None and "path" in extended:
            name = extended["path"].rstrip("/")
        elif long_name is not None:
            name = long_name
        else:
            name = header[:100].partition(b"\0")[0].decode("utf-8", "surrogateescape")
            if header[345] and kind not in _GNU_TYPES:  # a ustar prefix (first byte 0: none)
                name = _nts(header[345:500]) + "/" + name
        long_name, pax = None, {}
        if kind == _SPARSE or (extended is not None and any(k.startswith("GNU.sparse.") for k in extended)):
            raise TarError(f"member {name!r} at byte {at} is a GNU sparse file, which this reader does not support; "
                           "write the shard without --sparse")
        if kind not in _REGULAR or (kind == 0 and name.endswith("/")):  # v7 directories end in /
            # tarfile skips data only after regular members and unknown types (links, directories, devices
            # have none), so the next header is read where tarfile reads it
            if kind not in _SUPPORTED and padded and take(padded) is None:
                raise TarError(f"the shard ends inside member {name!r} at byte {at} (cut short)")
            continue
        if pos + padded <= len(buf):  # the common case: slice the member out of the chunk
            data = buf[pos:pos + size]
            pos += padded
            offset += padded
        else:
            data = take(padded)
            if data is None:
                raise TarError(f"unexpected end of data: the shard ends inside member {name!r} at byte {at} (cut short)")
            data = data[:size]
        yield name, data


def iter_samples(stream: BinaryIO, url: str) -> Iterator[dict]:
    """Samples of a tar stream: consecutive members with the same key (``KEY.ext``) in one dict, as webdataset
    groups them: ``{"__key__": KEY, "__url__": url, ext: bytes, ...}`` with lower-case extensions.

    Members without an extension and ``__name__``-style metadata members are skipped; a repeated extension
    within a sample keeps its first member. On damage the sample in progress is yielded (its members so
    far: the caller's validation sees what is missing), then the error is raised.

    Raises:
        What :func:`iter_members` raises.
    """
    current: dict | None = None
    try:
        for name, data in iter_members(stream):
            if name.startswith("__") and name.endswith("__"):
                continue
            key, ext = split_key(name)
            if key is None:
                continue
            if current is None or key != current["__key__"]:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            current.setdefault(ext.lower(), data)
    except Exception:
        if current is not None:
            yield current
        raise
    if current is not None:
        yield current
