"""METEOR's paraphrase table cut to the entries one evaluation can use, so METEOR starts in ~0.5 s instead of ~5.5 s.

Why: METEOR 1.5 parses its whole paraphrase table (``paraphrase-en.gz``: 5.3 M entries, 272 MB of text) before it
scores the first caption, on every run. That load is the largest single cost of scoring a COCO-sized split.

Why the scores cannot change. METEOR's ``ParaphraseMatcher`` records a paraphrase match only where one phrase of a
table entry occurs, word for word, in the (normalised, lower-cased) reference and the other phrase in the
hypothesis, and gives every such match probability 1; the table feeds nothing else. An entry neither of whose
phrases occurs in any reference can therefore never match, and dropping it changes no alignment. METEOR ships this
same cut as its ``FilterParaphrase`` tool (keep an entry when either phrase occurs in a reference file, for use
with ``-a``). Here the references are normalised by METEOR's own ``Normalizer`` (``java/MeteorNormalize.java``,
from the very ``SCORE`` lines METEOR will read), an entry is kept when either phrase occurs in one of them, and the
kept entries keep their order and their exact probabilities. Phrases are looked up by a 64-bit hash of their word
ids: a collision can only keep an extra entry, never drop one. ``tests/unit/test_caption_metrics.py`` checks
per-caption statistics against the full table on captions where paraphrases fire.

How: the table is parsed once into a word-id index under the cache root (``$LAVIS_EXT_CACHE``, default
``~/.cache/lavis_ext``; ~250 MB, ~10-30 s, keyed by the table's sha256), and the normaliser helper is compiled
once with ``javac``. Each evaluation then picks its entries with numpy in a fraction of a second and writes them
as a small gz that METEOR reads through its own ``-a`` option. Without ``javac`` or a writable cache,
:func:`table_for` returns ``None`` and METEOR loads its full table as before (same scores, slower).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

INDEX_VERSION = 1
_HELPER = "MeteorNormalize"
_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant: a multiplicative hash of word-id sequences
_CHUNK_ENTRIES = 500_000  # entries parsed per step while building the index (bounds the build's memory)
# METEOR splits reference lines and table phrases into words with java.util.StringTokenizer's default delimiters.
_JAVA_WORD = re.compile(r"[^ \t\n\r\f]+")
_OTHER_SPACE = re.compile(rb"[\t\r\f]")  # \r would also end a line for Java's readLine


def cache_root() -> Path:
    from lavis_ext.compat import default_cache_root

    return default_cache_root() / "meteor"


def meteor_jar() -> Path:
    from pycocoevalcap.meteor import meteor as lib

    return Path(lib.__file__).resolve().with_name(lib.METEOR_JAR)


def full_table() -> Path:
    return meteor_jar().with_name("data") / "paraphrase-en.gz"


# ----------------------------------------------------------------------------------------------------------------
# Per evaluation
# ----------------------------------------------------------------------------------------------------------------
def table_for(score_lines: Sequence[str], work_dir: str | os.PathLike, java: str, java_major: int) -> Path | None:
    """Write the paraphrase entries usable against the references of these METEOR ``SCORE`` lines to a gz.

    Args:
        score_lines: the exact ``SCORE ||| ref ||| ... ||| hyp`` lines (without newlines) METEOR will be sent.
        work_dir: folder for the table (``meteor_paraphrases_*.gz``; the caller deletes it).
        java: the Java executable METEOR will run with; java_major: its major version.

    Returns:
        The table's path for METEOR's ``-a`` option, or ``None`` when the fast path is unavailable here (no
        ``javac``, no writable cache, a failed build): METEOR then loads its full table, with the same scores.
    """
    started, name = time.perf_counter(), None
    try:
        helper_dir = _compiled_helper(java, java_major)  # first: without javac there is no index to build
        if helper_dir is None:
            return None
        index = _Index.load_or_build()
        references = _normalised_references(score_lines, work_dir, java, helper_dir)
        keep = index.entries_in(references)
        fd, name = tempfile.mkstemp(prefix="meteor_paraphrases_", suffix=".gz", dir=work_dir)
        os.close(fd)
        index.write_entries(keep, Path(name))
    except (OSError, RuntimeError, ValueError) as exc:
        if name is not None:
            Path(name).unlink(missing_ok=True)
        _warn_once(f"METEOR loads its full paraphrase table (~5 s per evaluation): {exc}")
        return None
    logger.debug("METEOR paraphrase table: %d of %d entries for %d references in %.2f s", len(keep),
                 index.num_entries, len(references), time.perf_counter() - started)
    return Path(name)


def load_index() -> _Index:
    """The paraphrase index of the installed table, built on first use (e.g. to build it ahead of timed runs)."""
    return _Index.load_or_build()


def _normalised_references(score_lines: Sequence[str], work_dir, java: str, helper_dir: Path) -> list[str]:
    classpath = os.pathsep.join([str(meteor_jar()), str(helper_dir)])
    text = "".join(line + "\n" for line in score_lines).encode()
    proc = subprocess.run(
        [java, "-XX:+IgnoreUnrecognizedVMOptions", "-XX:+UseSerialGC", "-cp", classpath, _HELPER, "en"],
        input=text, capture_output=True, cwd=work_dir,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"METEOR's normaliser failed (java exit {proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace')[-800:]}")
    return proc.stdout.decode().split("\n")[:-1]


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


# ----------------------------------------------------------------------------------------------------------------
# The normaliser helper
# ----------------------------------------------------------------------------------------------------------------
def _compiled_helper(java: str, java_major: int) -> Path | None:
    """Folder holding MeteorNormalize.class, compiled once per source, jar and Java version."""
    source = Path(__file__).with_name("java") / f"{_HELPER}.java"
    jar = meteor_jar()
    key = hashlib.sha256(source.read_bytes() + f"|{jar.stat().st_size}|{java_major}".encode()).hexdigest()[:16]
    target = cache_root() / f"helper-{key}"
    if (target / f"{_HELPER}.class").is_file():
        return target
    javac = _javac_for(java)
    if javac is None:
        _warn_once("METEOR loads its full paraphrase table (~5 s per evaluation) because `javac` was not found "
                   "next to `java` or on PATH; install a JDK (e.g. openjdk-17-jdk-headless) to cut it per evaluation")
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f"helper-{key}.", dir=target.parent))
    proc = subprocess.run([javac, "-nowarn", "-cp", str(jar), "-d", str(build), str(source)], capture_output=True)
    if proc.returncode != 0:
        shutil.rmtree(build, ignore_errors=True)
        raise RuntimeError(f"javac {source.name} failed: {proc.stderr.decode(errors='replace')[-800:]}")
    _publish(build, target)
    return target


def _javac_for(java: str) -> str | None:
    beside = Path(java).resolve().with_name("javac")
    return str(beside) if beside.is_file() else shutil.which("javac")


def _publish(build: Path, target: Path) -> None:
    """Move a finished build into place; if another process got there first, keep theirs."""
    try:
        os.replace(build, target)
    except OSError:  # target exists and is not empty: a concurrent build won
        shutil.rmtree(build, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------------------------------------------
def _phrase_hashes(word_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """64-bit hash of each phrase's word-id sequence (wrapping arithmetic), phrases given by their lengths."""
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    hashes = np.zeros(len(lengths), dtype=np.uint64)
    for k in range(int(lengths.max(initial=0))):
        has = lengths > k
        hashes[has] = hashes[has] * _HASH_MULTIPLIER + (word_ids[starts[has] + k].astype(np.uint64) + np.uint64(1))
    return hashes


class _Index:
    """The parsed table: entry e has phrases 2e and 2e+1, each a run of word ids, plus its probability."""

    def __init__(self, folder: Path):
        self.words = (folder / "words.bin").read_bytes().split(b"\n")
        self.word_ids = np.load(folder / "word_ids.npy", mmap_mode="r")
        self.phrase_lengths = np.load(folder / "phrase_lengths.npy")
        self.probabilities = np.load(folder / "probabilities.npy", mmap_mode="r")
        self.sorted_hashes = np.load(folder / "sorted_hashes.npy", mmap_mode="r")
        self.hash_order = np.load(folder / "hash_order.npy", mmap_mode="r")
        meta = json.loads((folder / "meta.json").read_text())
        self.max_phrase_length = int(meta["max_phrase_length"])
        self.build_seconds = float(meta["build_seconds"])
        self.word_id = {w.decode(): i for i, w in enumerate(self.words)}
        self.num_entries = len(self.probabilities)
        self._phrase_starts: np.ndarray | None = None  # computed on first use, then kept

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
            logger.info("indexing METEOR's paraphrase table once (~10-30 s) into %s", folder)
            _build_index(source, folder, digest)
        cls._loaded[digest] = index = cls(folder)
        return index

    def entries_in(self, references: Sequence[str]) -> np.ndarray:
        """Sorted ids of the entries with a phrase that occurs in one of the (normalised) references."""
        unknown = len(self.words)
        ids = []
        for line in references:
            ids.extend(self.word_id.get(w, unknown) for w in _JAVA_WORD.findall(line))
            ids.append(unknown)  # a line boundary: no phrase spans it
        tokens = np.asarray(ids, dtype=np.int64)
        if tokens.size == 0:
            return np.zeros(0, dtype=np.int64)
        # hashes of every n-gram (n <= longest phrase) made only of known words, as _phrase_hashes computes them
        known = tokens != unknown
        values = tokens.astype(np.uint64) + np.uint64(1)
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
        run_starts = np.repeat(lo - (np.cumsum(counts) - counts), counts)
        positions = run_starts + np.arange(int(counts.sum()))
        return np.unique(np.asarray(self.hash_order[positions], dtype=np.int64) // 2)

    def write_entries(self, entries: np.ndarray, path: Path) -> None:
        """The chosen entries in METEOR's table format (probability, phrase, paraphrase), in table order."""
        if self._phrase_starts is None:
            self._phrase_starts = np.zeros(len(self.phrase_lengths), dtype=np.int64)
            np.cumsum(self.phrase_lengths[:-1], out=self._phrase_starts[1:])
        phrases = np.stack([2 * entries, 2 * entries + 1], axis=1).ravel()
        lengths = self.phrase_lengths[phrases].astype(np.int64)
        offsets = np.repeat(self._phrase_starts[phrases] - (np.cumsum(lengths) - lengths), lengths)
        ids = np.asarray(self.word_ids[offsets + np.arange(int(lengths.sum()))]).tolist()
        words, out, at = self.words, [], 0
        for k, length in enumerate(lengths.tolist()):
            if k % 2 == 0:
                out.append(repr(float(self.probabilities[phrases[k] // 2])).encode())
            out.append(b" ".join([words[i] for i in ids[at:at + length]]))
            at += length
        with gzip.open(path, "wb", compresslevel=1) as f:
            f.write(b"".join(line + b"\n" for line in out))


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
    id_chunks, length_chunks, probability_chunks = [], [], []
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
            length_chunks.append(np.fromiter((p.count(b" ") + 1 for p in phrases), np.uint8, len(phrases)))
            id_chunks.append(np.fromiter(
                (word_id.setdefault(w, len(word_id)) for w in b" ".join(phrases).split(b" ")), np.int64))
            probability_chunks.append(np.array([float(x) for x in lines[0::3]], dtype=np.float64))
    for word in word_id:
        word.decode("utf-8")  # METEOR reads the table as UTF-8; a malformed word raises (no index, full table)
    word_ids = np.concatenate(id_chunks)
    lengths = np.concatenate(length_chunks)
    hashes = _phrase_hashes(word_ids, lengths)
    order = np.argsort(hashes, kind="stable")
    folder.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        (build / "words.bin").write_bytes(b"\n".join(word_id))  # dicts keep insertion order: id i is line i
        np.save(build / "word_ids.npy", word_ids.astype(np.uint16 if len(word_id) < 2**16 else np.uint32))
        np.save(build / "phrase_lengths.npy", lengths)
        np.save(build / "probabilities.npy", np.concatenate(probability_chunks))
        np.save(build / "sorted_hashes.npy", hashes[order])
        np.save(build / "hash_order.npy", order.astype(np.uint32))
        meta = {"version": INDEX_VERSION, "source": str(source), "sha256": digest, "entries": int(len(lengths) // 2),
                "words": len(word_id), "max_phrase_length": int(lengths.max(initial=0)),
                "build_seconds": round(time.perf_counter() - started, 1)}
        (build / "meta.json").write_text(json.dumps(meta, indent=1))
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    _publish(build, folder)
    logger.info("METEOR paraphrase index: %d entries, %d words in %.1f s", meta["entries"], meta["words"],
                meta["build_seconds"])
