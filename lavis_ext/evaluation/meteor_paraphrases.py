"""METEOR's paraphrase table cut to the entries one evaluation can use, so METEOR starts in well under the ~5.5 s
it takes to parse the whole table.

Why: METEOR 1.5 parses its whole paraphrase table (``paraphrase-en.gz``: 5.3 M entries, 272 MB of text) before it
scores the first caption, on every run. That load is the largest single cost of scoring a COCO-sized split.

Why the scores cannot change. METEOR's ``ParaphraseMatcher`` records a paraphrase match only where one phrase of a
table entry occurs, word for word, in the (normalised, lower-cased) reference and the other phrase in the
hypothesis, and gives every such match probability 1; ``ParaphraseTransducer`` reads the probability line and
ignores it, and the table feeds nothing else. An entry neither of whose phrases occurs in any reference can
therefore never match, and dropping it changes no alignment. METEOR ships this same cut as its ``FilterParaphrase``
tool (keep an entry when either phrase occurs in a reference file, for use with ``-a``). Here the references'
words come from METEOR's own ``Normalizer`` and ``StringTokenizer`` (``java/MeteorNormalize.java``, fed the very
``SCORE`` lines METEOR will read), an entry is kept when either phrase occurs in one of them, and the kept entries
are byte-exact copies of the table's lines, in table order. Phrases are looked up by a 64-bit hash of their word
ids: a collision can only keep an extra entry, never drop one. ``tests/unit/test_meteor_paraphrases.py`` checks
that the cut equals FilterParaphrase's output and that every per-caption statistic equals the full table's on
captions where paraphrases fire.

How: the table is parsed once into an index under the cache root (``$LAVIS_EXT_CACHE``, default
``~/.cache/lavis_ext``; ~320 MB, ~30 s, keyed by the table's sha256), and the normaliser runs in the process's
caption text server (:mod:`lavis_ext.evaluation.text_server`, compiled once with ``javac``, warm across calls).
Each evaluation then picks its entries with numpy and writes them as a stored (uncompressed) gz that METEOR reads
through its own ``-a`` option: ~10^4 entries for a small caption vocabulary, ~10^5-10^6 for a large
one (a 14,500-word set of 25,000 sentences kept 13% of the table; METEOR then starts in ~1.2 s). Without
``javac`` or a writable cache, METEOR loads its full table as before (same scores, slower), with a warning.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lavis_ext.evaluation import text_server
from lavis_ext.evaluation.text_server import meteor_jar

logger = logging.getLogger(__name__)

INDEX_VERSION = 4
_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant: a multiplicative hash of word-id sequences
_CHUNK_ENTRIES = 500_000  # entries parsed per step while building the index (bounds the build's memory)
# METEOR splits reference lines and table phrases into words with java.util.StringTokenizer's default delimiters.
_OTHER_SPACE = re.compile(rb"[\t\r\f]")  # \r would also end a line for Java's readLine


def cache_root() -> Path:
    from lavis_ext.compat import default_cache_root

    return default_cache_root() / "meteor"


def full_table() -> Path:
    return meteor_jar().with_name("data") / "paraphrase-en.gz"


# ----------------------------------------------------------------------------------------------------------------
# Per evaluation
# ----------------------------------------------------------------------------------------------------------------
def table_for(score_lines: Sequence[str], work_dir: str | os.PathLike, java: str) -> Path | None:
    """Write the paraphrase entries usable against the references of these METEOR ``SCORE`` lines to a gz.

    Args:
        score_lines: the exact ``SCORE ||| ref ||| ... ||| hyp`` lines (without newlines) METEOR will be sent.
        work_dir: folder for the table (``meteor_paraphrases_*.gz``; the caller deletes it).
        java: the Java executable METEOR will run with.

    Returns:
        The table's path for METEOR's ``-a`` option, or ``None`` when the fast path is unavailable here (no
        ``javac``, no writable cache, a failed build): METEOR then loads its full table, with the same scores.
    """
    cutter = TableCutter.create(java)
    if cutter is None:
        return None
    word_ids = cutter.reference_word_ids(score_lines, work_dir)
    return None if word_ids is None else cutter.write(word_ids, work_dir)


def load_index() -> _Index:
    """The paraphrase index of the installed table, built on first use (e.g. to build it ahead of timed runs)."""
    return _Index.load_or_build()


class TableCutter:
    """:func:`table_for` in two steps, so that a caller can overlap them with its own work.

    :meth:`reference_word_ids` mostly waits on a JVM (METEOR's normaliser; the GIL is free meanwhile) and
    :meth:`write` is a short burst of numpy. Every failure returns ``None`` with a warning: METEOR then loads its
    full table, with the same scores.
    """

    def __init__(self, server: text_server.TextServer, index: _Index):
        self.server, self.index = server, index

    @classmethod
    def create(cls, java: str) -> TableCutter | None:
        """A cutter, or ``None`` where the cut is unavailable (no ``javac``, no writable cache, a failed build)."""
        try:
            server = text_server.server_for(java)  # first: without javac there is no index to build
            return cls(server, _Index.load_or_build())
        except (OSError, RuntimeError, ValueError) as exc:
            _warn_once(f"METEOR loads its full paraphrase table (~5 s per evaluation): {exc}")
            return None

    def reference_word_ids(self, score_lines: Sequence[str], work_dir: str | os.PathLike) -> np.ndarray | None:
        """Index word ids of the words METEOR sees in each reference, -1 for other words and between references."""
        fd, name = tempfile.mkstemp(prefix="meteor_score_lines_", suffix=".txt", dir=work_dir)
        ids_file = Path(name).with_suffix(".ids")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write("".join(line + "\n" for line in score_lines).encode())
            self.server.normalize("en", self.index.words_file, name, ids_file,
                                  timeout=text_server.timeout_for(len(score_lines)))
            ids = ids_file.read_bytes()
        except (OSError, text_server.TextServerError) as exc:
            _warn_once(f"METEOR loads its full paraphrase table: its normaliser failed ({exc})")
            return None
        finally:
            Path(name).unlink(missing_ok=True)
            ids_file.unlink(missing_ok=True)
        if len(ids) % 4:
            _warn_once(f"METEOR loads its full paraphrase table: its normaliser wrote {len(ids)} bytes, not whole ids")
            return None
        return np.frombuffer(ids, dtype=">i4").astype(np.int64)

    def write(self, word_ids: np.ndarray, work_dir: str | os.PathLike) -> Path | None:
        """The cut table for these reference words, as a gz in ``work_dir`` (the caller deletes it)."""
        started = time.perf_counter()
        fd, name = tempfile.mkstemp(prefix="meteor_paraphrases_", suffix=".gz", dir=work_dir)
        os.close(fd)
        try:
            keep = self.index.entries_in(word_ids)
            self.index.write_entries(keep, Path(name))
        except (OSError, ValueError) as exc:
            Path(name).unlink(missing_ok=True)
            _warn_once(f"METEOR loads its full paraphrase table: the cut failed ({exc})")
            return None
        logger.debug("METEOR paraphrase table: %d of %d entries in %.2f s", len(keep), self.index.num_entries,
                     time.perf_counter() - started)
        return Path(name)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


# ----------------------------------------------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------------------------------------------
def _phrase_hashes(word_ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """64-bit hash of each phrase's word-id sequence (wrapping arithmetic); phrase i is
    ``word_ids[starts[i]:starts[i] + lengths[i]]``."""
    hashes = np.zeros(len(lengths), dtype=np.uint64)
    for k in range(int(lengths.max(initial=0))):
        has = lengths > k
        hashes[has] = hashes[has] * _HASH_MULTIPLIER + (word_ids[starts[has] + k].astype(np.uint64) + np.uint64(1))
    return hashes


class _Index:
    """The parsed table: entry e has phrases 2e and 2e+1, each a run of word ids, plus its probability line."""

    def __init__(self, folder: Path):
        self.words_file = folder / "words.txt"
        self.words = self.words_file.read_bytes().split(b"\n")
        self.word_ids = np.load(folder / "word_ids.npy", mmap_mode="r")
        self.phrase_lengths = np.load(folder / "phrase_lengths.npy", mmap_mode="r")
        self.phrase_starts = np.load(folder / "phrase_starts.npy", mmap_mode="r")
        # uint8: every probability line with its "\n", then every word followed by a space
        self.text = np.load(folder / "text.npy", mmap_mode="r")
        self.probability_ends = np.load(folder / "probability_ends.npy", mmap_mode="r")
        self.sorted_hashes = np.load(folder / "sorted_hashes.npy", mmap_mode="r")
        self.hash_order = np.load(folder / "hash_order.npy", mmap_mode="r")
        meta = json.loads((folder / "meta.json").read_text())
        self.max_phrase_length = int(meta["max_phrase_length"])
        self.build_seconds = float(meta["build_seconds"])
        self.num_entries = len(self.probability_ends)
        self._word_lengths = np.array([len(w) + 1 for w in self.words], dtype=np.int64)  # with the space
        self._word_ends = int(self.probability_ends[-1]) + np.cumsum(self._word_lengths)

    _loaded: dict[str, _Index] = {}

    @classmethod
    def load_or_build(cls) -> _Index:
        """The index for the installed table: from memory, else from the cache, else built (once per table)."""
        source = full_table()
        digest = _table_digest(source)
        if digest in cls._loaded:
            return cls._loaded[digest]
        folder = cache_root() / f"paraphrase-en-v{INDEX_VERSION}-{digest[:16]}"
        if not (folder / "meta.json").is_file():
            logger.info("indexing METEOR's paraphrase table once (~30-45 s) into %s", folder)
            _build_index(source, folder, digest)
        cls._loaded[digest] = index = cls(folder)
        return index

    def entries_in(self, word_ids: np.ndarray) -> np.ndarray:
        """Sorted ids of the entries with a phrase that occurs in a reference, given as word ids with -1 between
        references and for words outside the table (no phrase contains those or spans two references)."""
        tokens = word_ids
        if tokens.size == 0:
            return np.zeros(0, dtype=np.int64)
        # hashes of every n-gram (n <= longest phrase) made only of known words, as _phrase_hashes computes them
        known = tokens >= 0
        values = np.where(known, tokens, 0).astype(np.uint64) + np.uint64(1)
        query = []
        hashes = np.zeros(len(tokens), dtype=np.uint64)
        valid = np.ones(len(tokens), dtype=bool)
        for n in range(1, self.max_phrase_length + 1):
            m = len(tokens) - n + 1
            if m <= 0:
                break
            hashes = hashes[:m] * _HASH_MULTIPLIER + values[n - 1:]
            valid = valid[:m] & known[n - 1:]
            query.append(hashes[valid])
        query = np.unique(np.concatenate(query))
        lo = np.searchsorted(self.sorted_hashes, query, side="left")
        counts = np.searchsorted(self.sorted_hashes, query, side="right") - lo
        lo, counts = lo[counts > 0], counts[counts > 0]
        # every position of every matching run [lo, lo + count) of equal hashes
        return np.unique(np.asarray(self.hash_order[_runs(lo, counts)], dtype=np.int64) // 2)

    def write_entries(self, entries: np.ndarray, path: Path) -> None:
        """The chosen entries in METEOR's table format (probability, phrase, paraphrase lines), in table order.

        Byte-exact copies of the table's lines, gathered with numpy (a Python loop would take seconds when a
        large vocabulary keeps ~10^6 entries): each entry is its probability line, then the words of its two
        phrases, each word followed by a space except the last of a phrase, which is followed by a newline.
        """
        entries = np.asarray(entries, dtype=np.int64)
        phrases = np.stack([2 * entries, 2 * entries + 1], axis=1).ravel()
        lengths = self.phrase_lengths[phrases].astype(np.int64)
        starts = self.phrase_starts[phrases].astype(np.int64)
        words = np.asarray(self.word_ids[_runs(starts, lengths)], dtype=np.int64)
        # pieces in output order: per entry, its probability line, then its words
        per_entry = 1 + lengths[0::2] + lengths[1::2]
        first = np.cumsum(per_entry) - per_entry
        is_probability = np.zeros(int(per_entry.sum()), dtype=bool)
        is_probability[first] = True
        prob_ends = np.asarray(self.probability_ends[entries], dtype=np.int64)
        prob_starts = np.where(entries > 0, np.asarray(self.probability_ends[np.maximum(entries - 1, 0)],
                                                       dtype=np.int64), 0)
        piece_start = np.empty(len(is_probability), dtype=np.int64)
        piece_length = np.empty(len(is_probability), dtype=np.int64)
        piece_start[is_probability] = prob_starts
        piece_length[is_probability] = prob_ends - prob_starts
        word_lengths = self._word_lengths[words]
        piece_start[~is_probability] = self._word_ends[words] - word_lengths
        piece_length[~is_probability] = word_lengths
        out = np.asarray(self.text[_runs(piece_start, piece_length)])
        # the byte after each phrase's last word: "\n", not " "
        piece_ends = np.cumsum(piece_length)
        word_pieces = np.flatnonzero(~is_probability)
        out[piece_ends[word_pieces[np.cumsum(lengths) - 1]] - 1] = ord("\n")
        with gzip.open(path, "wb", compresslevel=0) as f:  # stored: METEOR reads it the same, we skip deflate
            f.write(out.tobytes())


def _runs(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ranges [start, start + length) as one index array."""
    total = int(lengths.sum())
    return np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(total)


def _table_digest(source: Path) -> str:
    """sha256 of the table, remembered per (path, size, mtime) so that it is hashed once, not per evaluation."""
    stat = source.stat()
    stamp = cache_root() / "digests.json"
    key = f"{source}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        known = json.loads(stamp.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        digest = hashlib.sha256()
        with open(source, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        known[key] = digest.hexdigest()
        stamp.parent.mkdir(parents=True, exist_ok=True)
        tmp = stamp.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, stamp)
    return known[key]


def _build_index(source: Path, folder: Path, digest: str) -> None:
    """Parse paraphrase-en.gz (lines: probability, phrase, paraphrase) into the arrays _Index reads."""
    started = time.perf_counter()
    word_id: dict[bytes, int] = {}
    id_chunks, length_chunks, probability_chunks = [], [], []  # probabilities: the lines' bytes, "\n" included
    with gzip.open(source, "rb") as f:
        while True:
            lines = [f.readline() for _ in range(3 * _CHUNK_ENTRIES)]
            lines = [line.rstrip(b"\n") for line in lines if line]
            if not lines:
                break
            if len(lines) % 3:
                raise ValueError(f"{source}: truncated entry at the end (lines come in threes)")
            phrases = [p for pair in zip(lines[1::3], lines[2::3]) for p in pair]
            # words are split on single spaces here and by StringTokenizer in METEOR: make sure both agree
            if any(not p or b"  " in p or p[:1] == b" " or p[-1:] == b" " or _OTHER_SPACE.search(p) for p in phrases):
                raise ValueError(f"{source}: a phrase with a word boundary other than one space; cannot index it")
            if any(b"\r" in line for line in lines[0::3]):
                raise ValueError(f"{source}: a carriage return would split a line for METEOR; cannot index it")
            length_chunks.append(np.fromiter((p.count(b" ") + 1 for p in phrases), np.uint8, len(phrases)))
            id_chunks.append(np.fromiter(
                (word_id.setdefault(w, len(word_id)) for w in b" ".join(phrases).split(b" ")), np.int64))
            probability_chunks.append(b"".join(line + b"\n" for line in lines[0::3]))
    for word in word_id:
        word.decode("utf-8")  # METEOR reads the table as UTF-8; a malformed word raises (no index, full table)
    word_ids = np.concatenate(id_chunks)
    lengths = np.concatenate(length_chunks)
    starts = np.cumsum(lengths, dtype=np.int64) - lengths
    hashes = _phrase_hashes(word_ids, starts, lengths)
    order = np.argsort(hashes, kind="stable")
    folder.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        (build / "words.txt").write_bytes(b"\n".join(word_id))  # dicts keep insertion order: id i is line i
        np.save(build / "word_ids.npy", word_ids.astype(np.uint16 if len(word_id) < 2**16 else np.uint32))
        np.save(build / "phrase_lengths.npy", lengths)
        np.save(build / "phrase_starts.npy", starts.astype(np.uint32 if len(word_ids) < 2**32 else np.int64))
        probability_text = b"".join(probability_chunks)
        np.save(build / "text.npy", np.frombuffer(probability_text + b"".join(w + b" " for w in word_id), np.uint8))
        line_ends = np.flatnonzero(np.frombuffer(probability_text, dtype=np.uint8) == ord("\n")) + 1
        np.save(build / "probability_ends.npy", line_ends.astype(np.int64))
        np.save(build / "sorted_hashes.npy", hashes[order])
        np.save(build / "hash_order.npy", order.astype(np.uint32))
        meta = {"version": INDEX_VERSION, "source": str(source), "sha256": digest, "entries": int(len(lengths) // 2),
                "words": len(word_id), "max_phrase_length": int(lengths.max(initial=0)),
                "build_seconds": round(time.perf_counter() - started, 1)}
        (build / "meta.json").write_text(json.dumps(meta, indent=1))
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    text_server.publish(build, folder)
    logger.info("METEOR paraphrase index: %d entries, %d words in %.1f s", meta["entries"], meta["words"],
                meta["build_seconds"])
