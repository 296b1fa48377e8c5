"""Caption metrics computed exactly as pycocoevalcap's ``COCOEvalCap.evaluate()`` does, on plain dicts, offline.

Why not ``COCOEvalCap`` itself: it needs COCO-format objects keyed by COCO image ids, its PTB tokenizer and SPICE
write temporary files next to their jars inside site-packages (read-only installs break, parallel evaluations race),
and its SPICE step downloads Stanford CoreNLP on first use. Here the same steps run on ``{id: captions}`` dicts:

1. PTB tokenisation of candidates and references: the bundled Stanford CoreNLP 3.4.1 jar with
   ``-preserveLines -lowerCase`` and pycocoevalcap's own ``PUNCTUATIONS`` list (:func:`ptb_tokenize`);
2. pycocoevalcap's ``Bleu(4)`` and ``Rouge()`` classes, unchanged; its ``Cider()`` formula vectorised with numpy
   (:mod:`lavis_ext.evaluation.cider`, the same numbers to ~1e-15, 8-9x faster); its METEOR 1.5 jar with the
   same command line and line protocol (:class:`_MeteorProcess`);
3. SPICE only where the CoreNLP 3.6.0 jars are already present; it is never downloaded.

Every file (tokenizer input, SPICE input/output/cache, JVM temp files and crash logs) goes under ``work_dir``; the
JVMs only read their jars and METEOR's paraphrase table in site-packages.

Twice as fast as ``COCOEvalCap.evaluate()`` or more, with the same scores (``bench/caption_scoring.py``, 5,000
captions x 5 references; see BENCHMARKS.md). References and candidates are tokenised in one pass, not two.
METEOR, which dominates, no longer parses its whole 5.3 M-entry paraphrase table (~5.5 s) on every call: the
table is cut to the entries these references can use (:mod:`lavis_ext.evaluation.meteor_paraphrases`, the cut
METEOR's own FilterParaphrase tool makes; every statistic unchanged), its SCORE lines are streamed instead of
sent one round trip at a time, large sets are split over two JVMs, and one EVAL line carries the summed
statistics (:func:`_summed_statistics`). METEOR's normaliser runs while BLEU and ROUGE-L are computed and its
scoring while CIDEr-D is (:class:`_MeteorRun`). Without a JDK (``javac``) METEOR loads its full table as before.
The PTB tokenizer, METEOR's normaliser and METEOR itself run in JVMs that stay up between calls
(:mod:`lavis_ext.evaluation.text_server`: warm code, no JVM start per call; the tools' own code and output). What depends
on the references alone (their PTB tokens, the words METEOR's cut needs) is remembered per process
for the last few reference sets (:class:`_ReferenceMemo`): a training run scores the same validation references
every epoch, and from the second call on only the candidates are tokenised and METEOR starts scoring at once.

CIDEr-D takes its document frequencies from the references being evaluated, so scores on a subset or a small
custom set are not comparable to full-split numbers (and a single image always scores 0).
"""
from __future__ import annotations

import contextlib
import difflib
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from lavis_ext.evaluation import text_server

logger = logging.getLogger(__name__)

METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
SPICE_LIB_ENV = "LAVIS_EXT_SPICE_LIB"
SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
JAVA_INSTALL_HINT = (
    "Install a Java runtime (Java 8 or newer), e.g. `apt-get install openjdk-17-jre-headless` on Debian/Ubuntu or "
    "`conda install -c conda-forge openjdk`, and make sure `java` is on PATH."
)

# Characters Stanford's PTBLexer treats as line ends besides "\n" (checked on the 3.4.1 jar). pycocoevalcap only
# replaces "\n", so a caption containing one of these shifts every later caption onto the wrong id; we replace them
# with a space as well, which yields the same tokens wherever the library's output is aligned.
_JAVA_LINE_BREAKS = re.compile("[\r\x0b\x0c\u2028\u2029\n]")
_PTB_MAIN = "edu.stanford.nlp.process.PTBTokenizer"
# The tokenizer's JVM runs ~1 s: with only the client (C1) JIT compiler it takes half the CPU and wall time (5,000
# captions x 6). Tokens are strings, which no JIT tier changes. METEOR keeps the default tiered JIT: C1 alone saves
# ~15% of its CPU but makes its single-threaded paraphrase load ~60% slower, which is the critical path here.
_SHORT_JVM = ["-XX:+IgnoreUnrecognizedVMOptions", "-XX:TieredStopAtLevel=1"]  # a JVM without the option ignores it


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
def evaluate_captions(
    predictions: Mapping[Hashable, str | Sequence[str]],
    references: Mapping[Hashable, str | Sequence[str]],
    *,
    work_dir: str | os.PathLike | None = None,
    metrics: Iterable[str] = METRICS,
    spice_lib_dir: str | os.PathLike | None = None,
) -> dict:
    """Score captions with the COCO caption pipeline (PTB tokenisation, BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE).

    Args:
        predictions: ``{id: caption}`` or ``{id: [caption]}``, exactly one candidate per id. Ids are any hashables.
        references: ``{id: [ref, ...]}`` with at least one reference per id (a bare string counts as one).
        work_dir: folder for temporary files and the SPICE cache (created if missing). Default: a temporary
            directory removed afterwards. Pass a persistent folder to reuse the SPICE cache across runs.
        metrics: any of ``"BLEU"``, ``"METEOR"``, ``"ROUGE_L"``, ``"CIDEr"``, ``"SPICE"`` (case-insensitive).
        spice_lib_dir: folder holding ``stanford-corenlp-3.6.0.jar`` and ``stanford-corenlp-3.6.0-models.jar``.
            Default: ``$LAVIS_EXT_SPICE_LIB``, else pycocoevalcap's ``spice/lib``.

    Returns:
        ``{"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE": float}`` for the metrics that ran (BLEU,
        METEOR, ROUGE-L, SPICE in 0..1 as pycocoevalcap reports them; CIDEr-D as is, 10.0 for a perfect match),
        plus ``"skipped": {metric: reason}`` for requested metrics that could not run (only SPICE can be skipped).

    Raises:
        TypeError: an argument or caption has the wrong type.
        ValueError: ids differ between predictions and references, an id has no or several candidates or no
            reference, or a metric name is unknown.
        RuntimeError: Java is missing or broken, or PTB tokenisation or METEOR failed.
    """
    wanted = _parse_metrics(metrics)
    _, candidates, refs = _normalise_inputs(predictions, references)
    java, java_major = _require_java()

    with _work_dir(work_dir) as wd:
        key = REFERENCE_MEMO.key(refs)  # hashed once: every reference string of the split
        known = REFERENCE_MEMO.get(key)
        if known is None:
            gts, res = _tokenise_all(refs, candidates, wd, java)
        else:  # the references' tokens from an earlier call: only the candidates go through the tokenizer
            gts = known.gts
            res = {i: [c] for i, c in enumerate(ptb_tokenize(candidates, wd, java=java))}
        # METEOR runs in JVMs driven from threads that mostly wait; the Python scorers run here meanwhile.
        meteor = _MeteorRun(java, wd, gts, res, _meteor_timeout(len(refs)),
                            reference_word_ids=known.word_ids if known else None) if "METEOR" in wanted else None
        try:
            scores: dict = {}
            if "BLEU" in wanted:
                from pycocoevalcap.bleu.bleu import Bleu

                bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
                scores.update({f"Bleu_{n}": float(s) for n, s in enumerate(bleu, start=1)})
            if "ROUGE_L" in wanted:
                from pycocoevalcap.rouge.rouge import Rouge

                scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
            if meteor is not None:
                meteor.start_scoring()  # BLEU and ROUGE-L overlapped METEOR's normaliser
            if "CIDEr" in wanted:
                from lavis_ext.evaluation.cider import cider_scorer

                scores["CIDEr"] = cider_scorer(gts)(res)
            if meteor is not None:
                scores["METEOR"] = meteor.result()
        finally:
            if meteor is not None:
                meteor.close()  # its JVMs stop before the work dir goes
        REFERENCE_MEMO.put(key, gts, meteor.word_ids if meteor is not None else None)

        skipped: dict[str, str] = {}
        if "SPICE" in wanted:
            lib_dir = _spice_lib_dir(spice_lib_dir)
            missing = [jar for jar in SPICE_CORENLP_JARS if not (lib_dir / jar).is_file()]
            if missing:
                skipped["SPICE"] = (
                    f"Stanford CoreNLP 3.6.0 jars not found in {lib_dir} (missing: {', '.join(missing)}); download "
                    "https://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip on a machine with "
                    f"network access, copy {' and '.join(SPICE_CORENLP_JARS)} into a folder and set "
                    f"{SPICE_LIB_ENV} to it (or pass spice_lib_dir)"
                )
            else:
                try:
                    scores["SPICE"] = _spice(gts, res, lib_dir, wd, java, java_major)
                except RuntimeError as exc:
                    skipped["SPICE"] = str(exc)
                    warnings.warn(f"SPICE skipped: {exc}", RuntimeWarning, stacklevel=2)
    # pycocoevalcap's order: Bleu_1..4, METEOR, ROUGE_L, CIDEr, SPICE
    order = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"]
    results = {key: scores[key] for key in order if key in scores}
    results["skipped"] = skipped
    return results


def best_constant_caption(
    references: Mapping[Hashable, str | Sequence[str]],
    candidates: Iterable[str] | None = None,
    top_k: int = 50,
    work_dir: str | os.PathLike | None = None,
) -> tuple[str, float]:
    """Find the single caption that, predicted for every id, scores the highest CIDEr-D on these references.

    This is the floor a trained captioner must clear: a model that has collapsed to one caption scores exactly this.

    Args:
        references: ``{id: [ref, ...]}`` as for :func:`evaluate_captions`.
        candidates: captions to try. Default: the ``top_k`` most frequent references after PTB tokenisation
            (lower-cased, punctuation removed); those are returned in tokenised form.
        top_k: how many frequent references to try when ``candidates`` is None.
        work_dir: folder for the tokenizer's temporary file; default a temporary directory.

    Returns:
        ``(caption, cider)``; ties go to the earlier (more frequent) candidate.

    Raises:
        TypeError: references or candidates are not strings.
        ValueError: no references, ``top_k < 1``, or no non-empty candidate.
        RuntimeError: Java is missing or broken, or PTB tokenisation failed.
    """
    from lavis_ext.evaluation.cider import cider_scorer

    _, refs = _normalise_references(references)
    if candidates is None:
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    else:
        candidates = _check_strings(list(candidates), "candidates")
    java, _ = _require_java()

    with _work_dir(work_dir) as wd:
        key = REFERENCE_MEMO.key(refs)
        known = REFERENCE_MEMO.get(key)
        if known is not None:
            gts = known.gts
        else:
            gts = _tokenise_references(refs, wd, java)
            REFERENCE_MEMO.put(key, gts)
        if candidates is None:
            counts = Counter(r for rs in gts.values() for r in rs if r)
            raw = tokenised = [caption for caption, _ in counts.most_common(top_k)]
        else:
            raw, tokenised = candidates, ptb_tokenize(candidates, wd, java=java)
    if not raw:
        raise ValueError("no candidate caption to try: pass non-empty `candidates` or references with words in them")

    scorer = cider_scorer(gts)  # the references' side once for all candidates
    best: tuple[str, float] | None = None
    for caption, tokens in zip(raw, tokenised):
        score = scorer({i: [tokens] for i in gts})
        if best is None or score > best[1]:
            best = (caption, score)
    return best


def ptb_tokenize(
    sentences: Sequence[str], work_dir: str | os.PathLike, *, java: str = "java"
) -> list[str]:
    """PTB-tokenise sentences the way pycocoevalcap's ``PTBTokenizer`` does, with the temp file in ``work_dir``.

    Not the library's class: ``PTBTokenizer.tokenize`` writes its input file into site-packages next to the jar and
    runs Java with that folder as cwd. Same jar, same arguments, same punctuation list; only the file location
    differs, plus the line-break fix described at ``_JAVA_LINE_BREAKS``. The tool runs in this process's caption
    text server (:mod:`lavis_ext.evaluation.text_server`: one warm JVM kept across calls) where ``javac`` could
    compile it, else in a JVM of its own with the C1-only JIT (``_SHORT_JVM``: half the time of a short-lived JVM;
    tokens are strings, which no JIT tier changes).

    Args:
        sentences: raw captions, one output per input.
        work_dir: existing folder for the temporary input file.
        java: the Java executable.

    Returns:
        Lower-cased, space-joined tokens with punctuation tokens removed, in input order.

    Raises:
        RuntimeError: Java failed or returned a different number of lines than it was given.
    """
    from pycocoevalcap.tokenizer import ptbtokenizer as lib

    if not sentences:
        return []
    text = "\n".join(_JAVA_LINE_BREAKS.sub(" ", s) for s in sentences)
    fd, tmp_path = tempfile.mkstemp(prefix="ptb_", suffix=".txt", dir=work_dir)
    out_path = tmp_path[:-len(".txt")] + ".tok"
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode())
        output = stderr = None
        try:
            server = text_server.server_for(java)
        except text_server.TextServerError as exc:  # no javac here: the command-line tool, as pycocoevalcap runs it
            server = None
            logger.debug("PTB tokenisation in a JVM of its own: %s", exc)
        if server is not None:  # a warm JVM kept across calls, running the same tool's main
            try:
                server.tokenize(tmp_path, out_path, timeout=text_server.timeout_for(len(sentences)))
                output = Path(out_path).read_bytes()
            except text_server.TextServerError as exc:
                warnings.warn(f"{exc}; tokenising in a JVM of its own", RuntimeWarning, stacklevel=2)
        if output is None:
            jar = text_server.ptb_jar()
            proc = subprocess.run(
                [java, *_SHORT_JVM, "-cp", str(jar), _PTB_MAIN, "-preserveLines", "-lowerCase", tmp_path],
                cwd=work_dir, stdin=subprocess.DEVNULL, capture_output=True,
            )
            output, stderr = proc.stdout, proc.stderr
            if proc.returncode != 0:
                raise RuntimeError(
                    f"PTB tokenisation failed (java exit {proc.returncode}): {_tail(proc.stderr)}; check that {jar} "
                    "exists (reinstall pycocoevalcap) and that `java -version` works"
                )
    finally:
        os.remove(tmp_path)
        with contextlib.suppress(FileNotFoundError):
            os.remove(out_path)
    lines = output.decode().split("\n")
    if lines and lines[-1] == "" and len(lines) == len(sentences) + 1:
        lines.pop()
    if len(lines) != len(sentences):
        raise RuntimeError(
            f"PTB tokenizer returned {len(lines)} lines for {len(sentences)} captions, so tokens cannot be matched "
            f"to ids; stderr: {_tail(stderr or b'')}"
        )
    punctuation = set(lib.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punctuation) for line in lines]


# ----------------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------------
def _parse_metrics(metrics: Iterable[str]) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    by_lower = {m.lower(): m for m in METRICS}
    chosen = set()
    for name in metrics:
        key = str(name).lower()
        if key not in by_lower:
            close = difflib.get_close_matches(key, list(by_lower), n=3, cutoff=0.4)
            hint = f"; did you mean {', '.join(repr(by_lower[c]) for c in close)}?" if close else ""
            raise ValueError(f"unknown caption metric {name!r}{hint} Valid names: {', '.join(METRICS)}")
        chosen.add(by_lower[key])
    if not chosen:
        raise ValueError(f"no metric requested; choose from {', '.join(METRICS)}")
    return tuple(m for m in METRICS if m in chosen)


def _check_strings(values: list, what: str) -> list[str]:
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{what} must be strings, got {type(bad[0]).__name__} {bad[0]!r}")
    return values


def _normalise_references(references: Mapping) -> tuple[list, list[list[str]]]:
    if not isinstance(references, Mapping):
        raise TypeError(f"references must be a dict {{id: [caption, ...]}}, got {type(references).__name__}")
    if not references:
        raise ValueError("references is empty: nothing to evaluate")
    ids, refs = [], []
    for key, value in references.items():
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, Sequence) or not value:
            raise ValueError(
                f"references[{key!r}] must be a non-empty list of caption strings, got {value!r}"
            )
        refs.append(_check_strings(list(value), f"references[{key!r}]"))
        ids.append(key)
    return ids, refs


def _normalise_inputs(predictions: Mapping, references: Mapping) -> tuple[list, list[str], list[list[str]]]:
    if not isinstance(predictions, Mapping):
        raise TypeError(f"predictions must be a dict {{id: caption}}, got {type(predictions).__name__}")
    ids, refs = _normalise_references(references)
    no_prediction = [i for i in ids if i not in predictions]
    no_reference = [i for i in predictions if i not in references]
    if no_prediction or no_reference:
        parts = []
        if no_prediction:
            parts.append(f"{len(no_prediction)} id(s) have references but no prediction, e.g. {no_prediction[:5]!r}")
        if no_reference:
            parts.append(f"{len(no_reference)} predicted id(s) have no references, e.g. {no_reference[:5]!r}")
        raise ValueError(
            "predictions and references must have the same ids: " + "; ".join(parts)
            + ". Predict every reference id of the split, or restrict references to the predicted ids."
        )
    candidates = []
    for key in ids:
        value = predictions[key]
        if isinstance(value, str):
            candidates.append(value)
        elif isinstance(value, Sequence) and len(value) == 1 and isinstance(value[0], str):
            candidates.append(value[0])
        else:
            error = ValueError if isinstance(value, Sequence) else TypeError
            raise error(
                f"predictions[{key!r}] must be one caption string or a one-element list, got {value!r}; "
                "score one candidate per id (e.g. the top beam)"
            )
    return ids, candidates, refs


# ----------------------------------------------------------------------------------------------------------------
# Java, tokenisation, METEOR, SPICE
# ----------------------------------------------------------------------------------------------------------------
def _require_java() -> tuple[str, int]:
    """Check up front that Java runs, so users get the fix rather than a FileNotFoundError from deep inside."""
    java = shutil.which("java")
    if java is None:
        raise RuntimeError(
            "Java is needed for the PTB tokenisation of captions and for METEOR, but `java` is not on PATH. "
            + JAVA_INSTALL_HINT
        )
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"`{java} -version` failed ({exc}). {JAVA_INSTALL_HINT}") from exc
    if proc.returncode != 0:
        raise RuntimeError(
            f"`{java} -version` exited with {proc.returncode}: {_tail(proc.stderr or proc.stdout)}. "
            + JAVA_INSTALL_HINT
        )
    return java, _java_major((proc.stderr + proc.stdout).decode(errors="replace"))


def _java_major(version_text: str) -> int:
    """`java version "1.8.0_292"` -> 8, `openjdk version "17.0.15"` -> 17; 0 if unknown."""
    match = re.search(r'version "(\d+)(?:\.(\d+))?', version_text)
    if not match:
        return 0
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


@contextlib.contextmanager
def _work_dir(work_dir: str | os.PathLike | None) -> Iterator[str]:
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="lavis_ext_capeval_") as tmp:
            yield tmp
    else:
        path = Path(work_dir)
        path.mkdir(parents=True, exist_ok=True)
        yield str(path.resolve())


class _PreparedReferences:
    """What scoring derives from one reference set alone: PTB tokens (``gts``, keyed 0..n-1) and the word ids METEOR's
    paraphrase cut needs (``None`` until a call with METEOR computed them). Shared between calls: never mutate."""

    __slots__ = ("gts", "word_ids")

    def __init__(self, gts: dict[int, list[str]], word_ids=None):
        self.gts, self.word_ids = gts, word_ids


class _ReferenceMemo:
    """The last ``size`` reference sets' :class:`_PreparedReferences`, keyed by the sha256 of the raw references.

    Why: a training run scores the same validation (and test) references every epoch, and each call paid for a
    tokenizer JVM over 5x as many references as candidates and for METEOR's normaliser JVM over them again. Both
    outputs are functions of the raw references alone (the tokenizer treats every line on its own under
    ``-preserveLines``; the normaliser reads only the reference side), so a repeat call reuses them and every
    score is unchanged (tests/unit/test_caption_metrics.py compares memo and fresh calls). Thread-safe; a few MB
    per COCO-sized split.
    """

    def __init__(self, size: int = 4):
        self.size = size
        self._entries: OrderedDict[str, _PreparedReferences] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(refs: list[list[str]]) -> str:
        """The memo key of raw references (every string, in order); callers compute it once per call."""
        return hashlib.sha256(json.dumps(refs, ensure_ascii=False).encode()).hexdigest()

    def get(self, key: str) -> _PreparedReferences | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: str, gts: dict[int, list[str]], word_ids=None) -> None:
        """Remember ``gts`` (and ``word_ids`` where known; a known set is never forgotten for ``None``)."""
        with self._lock:
            old = self._entries.pop(key, None)
            if word_ids is None and old is not None:
                word_ids = old.word_ids
            if word_ids is not None:
                word_ids.flags.writeable = False
            self._entries[key] = _PreparedReferences(gts, word_ids)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


REFERENCE_MEMO = _ReferenceMemo()


def _tokenise_references(refs: list[list[str]], work_dir: str, java: str) -> dict[int, list[str]]:
    """Tokenise all references in one JVM call, keyed 0..n-1 (internal keys: the scorers need no real ids)."""
    flat = ptb_tokenize([r for rs in refs for r in rs], work_dir, java=java)
    return _regroup(flat, refs)


def _regroup(flat: list[str], refs: list[list[str]]) -> dict[int, list[str]]:
    gts, start = {}, 0
    for i, rs in enumerate(refs):
        gts[i] = flat[start:start + len(rs)]
        start += len(rs)
    return gts


def _tokenise_all(
    refs: list[list[str]], candidates: list[str], work_dir: str, java: str
) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """References and candidates in ONE tokenizer JVM (pycocoevalcap starts one for each).

    The same as two calls: with ``-preserveLines`` every line is tokenised on its own, and pycocoevalcap already
    puts the captions of all images into one file, so the boundary between the last reference and the first
    candidate is one more line boundary like the others (checked against ``COCOEvalCap`` in the tests).
    """
    num_refs = sum(len(rs) for rs in refs)
    flat = ptb_tokenize([r for rs in refs for r in rs] + list(candidates), work_dir, java=java)
    return _regroup(flat[:num_refs], refs), {i: [c] for i, c in enumerate(flat[num_refs:])}


def _tail(data: bytes | str, limit: int = 800) -> str:
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    text = text.strip()
    return ("..." + text[-limit:]) if len(text) > limit else (text or "<no output>")


def _meteor_timeout(num_ids: int) -> float:
    """Seconds METEOR may take on ``num_ids`` captions (the tests shorten it to see the watchdog fire)."""
    return text_server.timeout_for(num_ids)


# METEOR with a cut table spends its time scoring, on cores it shares with the Python scorers and a second METEOR
# JVM: the serial collector and the client JIT alone (no C2 compiler threads) halve its CPU time for a few percent
# more wall time on its own (the full-table load keeps the defaults: it is faster with C2). Neither touches a score.
_CUT_TABLE_JVM = ["-XX:+IgnoreUnrecognizedVMOptions", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"]
# Below this many captions one JVM scores faster than two (each JVM costs ~0.4 s to start with a cut table).
_PARALLEL_METEOR_MIN = 1000


class _MeteorRun:
    """Corpus METEOR of ``res`` against ``gts`` with pycocoevalcap's jar, arguments and SCORE lines, in steps.

    The paraphrase table is cut to the entries these references can use (:mod:`meteor_paraphrases`: METEOR
    starts in ~0.5 s instead of ~5.5 s, with the same scores). The cut needs the references' words from METEOR's
    own normaliser (a JVM, started here in a thread); the caller runs a Python scorer meanwhile, then calls
    :meth:`start_scoring`, which cuts the table (a short burst that would crawl while another thread holds the
    GIL) and starts scoring in threads, in the warm METEOR servers kept across calls (:class:`_ServedMeteor`).
    For large sets the SCORE lines go to two of them, whose statistics are joined in the original order. Where
    the table cannot be cut (no ``javac``), one JVM of its own loads the full table at once, as pycocoevalcap's
    does. Given ``reference_word_ids`` (remembered from an earlier call on the same
    references, :class:`_ReferenceMemo`), there is no normaliser to wait for and scoring starts at once.
    """

    def __init__(self, java: str, work_dir: str, gts: dict, res: dict, timeout: float,
                 reference_word_ids=None):
        from lavis_ext.evaluation import meteor_paraphrases

        self.java, self.work_dir, self.timeout = java, work_dir, timeout
        self.lines = _meteor_score_lines(gts, res)
        self.processes: list[_MeteorProcess | _ServedMeteor] = []
        self.table: Path | None = None
        self.word_ids = reference_word_ids  # the references' words for the cut (given, or from the normaliser)
        self._scoring: list[_Job] | None = None
        self._cutter = meteor_paraphrases.TableCutter.create(java)
        self._words = None
        if self._cutter is not None and self.word_ids is None:
            self._words = _Job(self._cutter.reference_word_ids, self.lines, work_dir)
        else:  # nothing to wait for: start scoring now, beside the caller's Python scorers
            self.start_scoring()

    def start_scoring(self) -> None:
        """Cut the table (if it can be cut), start the JVM(s) and send them the SCORE lines (idempotent)."""
        if self._scoring is not None:
            return
        if self._words is not None:
            self.word_ids = self._words.result()
        word_ids = self.word_ids if self._cutter is not None else None
        self.table = self._cutter.write(word_ids, self.work_dir) if word_ids is not None else None
        parallel = (self.table is not None and len(self.lines) >= _PARALLEL_METEOR_MIN
                    and (os.cpu_count() or 1) >= 2)
        if self.table is not None:  # warm METEOR JVMs kept across calls (text_server); a JVM each where they fail
            self.processes = [_ServedMeteor(self.java, self.work_dir, self.timeout, self.table, slot)
                              for slot in range(2 if parallel else 1)]
        else:
            self.processes = [_MeteorProcess(self.java, self.work_dir, self.timeout, None)]
        half = len(self.lines) // 2 if parallel else len(self.lines)
        parts = [self.lines[:half], self.lines[half:]][:len(self.processes)]
        self._scoring = [_Job(p.statistics, part) for p, part in zip(self.processes, parts)]

    def result(self) -> float:
        self.start_scoring()
        stats = [line for job in self._scoring for line in job.result()]
        return self.processes[0].evaluate(stats)

    def close(self) -> None:
        if self._words is not None:
            self._words.join()
        for process in self.processes:
            process.close()
        for job in self._scoring or []:
            job.join()
        if self.table is not None:
            self.table.unlink(missing_ok=True)


def _summed_statistics(stats: list[str]) -> str | None:
    """METEOR's EVAL total of statistics lines as one line, or None unless every value is a whole number < 2**52.

    A line holds lengths (test, reference), function words (test, reference), then per module stage the matched
    content and function words (test, reference, test, reference), then chunks and matched words (test,
    reference). ``MeteorStats.addStats`` sums every field, except that a segment matched completely in one chunk
    adds no chunk; that rule is applied here. Whole numbers make every sum exact in any order.
    """
    import numpy as np

    rows = [line.split() for line in stats]
    width = len(rows[0]) if rows else 0
    stages = (width - 7) // 4
    if stages < 1 or width != 7 + 4 * stages or any(len(row) != width for row in rows):
        return None
    try:
        values = np.array(rows, dtype=np.float64)
    except ValueError:
        return None
    if not np.all(np.isfinite(values)) or np.any(values != np.round(values)) or np.any(np.abs(values) >= 2**52):
        return None
    matched = values[:, 4:4 + 4 * stages]
    test_total = matched[:, 0::4].sum(axis=1) + matched[:, 2::4].sum(axis=1)
    reference_total = matched[:, 1::4].sum(axis=1) + matched[:, 3::4].sum(axis=1)
    chunks = 4 + 4 * stages
    whole = (test_total == values[:, 0]) & (reference_total == values[:, 1]) & (values[:, chunks] == 1)
    values[whole, chunks] = 0
    return " ".join(repr(float(total)) for total in values.sum(axis=0))


def _meteor_score_lines(gts: dict, res: dict) -> list[str]:
    """The SCORE lines ``Meteor._stat`` sends, one per id in ``gts`` order, without the newline."""
    lines = []
    for i in gts:
        hypothesis = res[i][0].replace("|||", "").replace("  ", " ")  # as Meteor._stat
        lines.append(" ||| ".join(("SCORE", " ||| ".join(gts[i]), hypothesis)))
    return lines


_METEOR_ARGS = ["-", "-", "-stdio", "-l", "en", "-norm"]  # pycocoevalcap's Meteor command line


class _ServedMeteor:
    """:class:`_MeteorProcess`'s two steps run by METEOR's own ``Meteor.main`` (same arguments, the cut table via
    ``-a``) in a warm JVM kept across calls (:mod:`lavis_ext.evaluation.text_server`), on files instead of pipes.

    Why: a new METEOR JVM per call spent ~0.5 s starting (JVM, jar, its synonym and stem tables) before it scored
    its first caption, on the critical path of every call; warm servers scored 5,000 x 5 new-reference calls in
    3.3 s against 4.2 s with a JVM per call (interleaved A/B, tiered JIT; with the client JIT the servers use,
    3.6-3.9 s, and a first call of 4.2-4.5 s instead of 6.2-7.3 s: ``text_server._FLAGS``). The SCORE lines and
    the one EVAL line are the ones :class:`_MeteorProcess` sends, answered by the same code, so the statistics and
    the score are the same (tests compare them). EVAL reads no paraphrase: it runs with an empty table, whose
    scorer is quick to build. Where the server fails, the step runs in a :class:`_MeteorProcess` of its own
    instead, with a warning.
    """

    def __init__(self, java: str, work_dir: str, timeout: float, paraphrase_table: Path, slot: int):
        self.java, self.work_dir, self.timeout, self.table = java, work_dir, timeout, paraphrase_table
        self.server = text_server.server_for(java, slot)

    def _run(self, lines: list[str], table: Path) -> list[str]:
        fd, name = tempfile.mkstemp(prefix="meteor_in_", suffix=".txt", dir=self.work_dir)
        out = Path(name).with_suffix(".out")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write("".join(line + "\n" for line in lines).encode())
            self.server.meteor([*_METEOR_ARGS, "-a", str(table)], name, out, self.timeout)
            return out.read_text(encoding="utf-8").splitlines()
        finally:
            Path(name).unlink(missing_ok=True)
            out.unlink(missing_ok=True)

    def _in_own_process(self, step: str, exc: Exception, run):
        """``run(process)`` on a METEOR JVM of its own (closed after), once the server failed ``step``."""
        warnings.warn(f"{exc}; METEOR's {step} runs in a JVM of its own", RuntimeWarning, stacklevel=3)
        process = _MeteorProcess(self.java, self.work_dir, self.timeout, self.table)
        try:
            return run(process)
        finally:
            process.close()

    def statistics(self, lines: list[str]) -> list[str]:
        """METEOR's statistics line for each SCORE line. Raises RuntimeError as :meth:`_MeteorProcess.statistics`."""
        try:
            stats = self._run(lines, self.table)
        except text_server.TextServerError as exc:
            return self._in_own_process("scoring", exc, lambda process: process.statistics(lines))
        if len(stats) != len(lines) or (lines and not stats[-1].strip()):
            raise RuntimeError(f"METEOR answered {len(stats)} statistics lines for {len(lines)} captions")
        return [line.strip() for line in stats]

    def evaluate(self, stats: list[str]) -> float:
        """The corpus score by METEOR's EVAL command, as :meth:`_MeteorProcess.evaluate` sends it."""
        summed = _summed_statistics(stats)
        eval_line = "EVAL" + "".join(f" ||| {s}" for s in (stats if summed is None else [summed]))
        empty = Path(self.work_dir) / "meteor_empty_paraphrases.gz"
        with gzip.open(empty, "wb", compresslevel=0):
            pass
        try:
            answer = self._run([eval_line], empty)
        except text_server.TextServerError as exc:
            return self._in_own_process("EVAL", exc, lambda process: process.evaluate(stats))
        finally:
            empty.unlink(missing_ok=True)
        return float(answer[-1].strip())  # per-line scores, then the total

    def close(self) -> None:
        """Nothing to stop: the server stays up for the next call."""


class _MeteorProcess:
    """pycocoevalcap's METEOR 1.5 JVM, same jar, arguments and line protocol, driven without round trips.

    ``Meteor.compute_score`` sends one ``SCORE`` line per image and waits for its statistics before sending the
    next (thousands of pipe round trips), then one ``EVAL`` line with all statistics. Here every ``SCORE`` line is
    written by a feeder thread while the statistics are read back as they come (:meth:`statistics`), then one
    ``EVAL`` line (:meth:`evaluate`, which sums the statistics where that is exact): the JVM sees the same SCORE
    lines in the same order and reaches the same total, so the scores are identical (tested against
    ``COCOEvalCap``). Other differences, none of which touches a score: with ``paraphrase_table`` METEOR reads
    that cut table through its own ``-a`` option and runs with the serial collector and the client JIT
    (``_CUT_TABLE_JVM``: its CPU time matters when two JVMs and the Python scorers share the cores); its working
    directory is ``work_dir`` (a crash log lands there, not in site-packages) and its stderr goes to an anonymous
    temporary file there; the Java executable is the one :func:`_require_java` found; and a watchdog kills it
    after ``timeout`` seconds, because the protocol reads with blocking ``readline`` and a dead or stuck JVM
    would otherwise hang the caller.
    """

    def __init__(self, java: str, work_dir: str, timeout: float, paraphrase_table: Path | None = None):
        jar = text_server.meteor_jar()
        extra = [] if paraphrase_table is None else ["-a", str(paraphrase_table)]
        flags = [] if paraphrase_table is None else _CUT_TABLE_JVM
        self.timeout = timeout
        self._stderr = tempfile.TemporaryFile(dir=work_dir)  # noqa: SIM115  (open for the JVM's lifetime)
        self._stderr_bytes = b""
        self.proc = subprocess.Popen(
            [java, *flags, "-jar", "-Xmx2G", str(jar), *_METEOR_ARGS, *extra],
            cwd=work_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
        )
        self._fired = threading.Event()
        self._timer = threading.Timer(timeout, self._kill)
        self._timer.daemon = True
        self._timer.start()

    def _kill(self) -> None:
        self._fired.set()
        self.proc.kill()

    def score(self, gts: dict, res: dict) -> float:
        """Corpus METEOR of ``res`` (one tokenised caption per key) against ``gts`` (tokenised references)."""
        return self.evaluate(self.statistics(_meteor_score_lines(gts, res)))

    def statistics(self, lines: list[str]) -> list[str]:
        """METEOR's statistics line for each SCORE line (sent all at once by a feeder thread).

        Raises:
            RuntimeError: the JVM died, answered garbage, or did not answer within the timeout.
        """
        payload = "".join(line + "\n" for line in lines).encode()
        feed_error: list[BaseException] = []

        def feed() -> None:
            try:
                self.proc.stdin.write(payload)
                self.proc.stdin.flush()
            except (OSError, ValueError) as exc:  # the JVM is gone; the reader reports it
                feed_error.append(exc)

        feeder = threading.Thread(target=feed, name="meteor-feed", daemon=True)
        feeder.start()
        with self._reporting_failures():
            stats = [self.proc.stdout.readline().decode().strip() for _ in lines]
            feeder.join()
            if feed_error:
                raise feed_error[0]
            if lines and not stats[-1]:
                raise ValueError("no statistics line")  # EOF: the JVM is gone
        return stats

    def evaluate(self, stats: list[str]) -> float:
        """The corpus score from statistics lines, by METEOR's EVAL command.

        pycocoevalcap sends every statistics line; METEOR parses each with a ``java.util.Scanner`` (~0.8 s for
        5,000 lines), adds them up (``MeteorStats.addStats``) and scores the total. The fields are word and match
        counts, so when every value is a whole number the total is exact in any order: one EVAL line holding it
        (:func:`_summed_statistics`) gives METEOR the very same total, and score, at once. Otherwise every line
        is sent, as pycocoevalcap does.
        """
        summed = _summed_statistics(stats)
        lines = stats if summed is None else [summed]
        with self._reporting_failures():
            self.proc.stdin.write(("EVAL" + "".join(f" ||| {s}" for s in lines) + "\n").encode())
            self.proc.stdin.flush()
            for _ in lines:  # per-line scores, unused
                float(self.proc.stdout.readline().strip())
            return float(self.proc.stdout.readline().strip())

    @contextlib.contextmanager
    def _reporting_failures(self):
        try:
            yield
        except (ValueError, OSError) as exc:  # EOF (float(b'')) or a broken pipe: the JVM is gone
            self.close()  # first, so that stderr is complete
            why = f"did not answer within {self.timeout:g} s" if self._fired.is_set() else f"failed ({exc!r})"
            raise RuntimeError(f"METEOR {why}; java stderr: {_tail(self.stderr_text())}") from exc

    def stderr_text(self) -> bytes:
        """What the JVM wrote to stderr (complete once :meth:`close` has run)."""
        if self._stderr.closed:
            return self._stderr_bytes
        with contextlib.suppress(OSError, ValueError):
            self._stderr.seek(0)
            return self._stderr.read()
        return b""

    def close(self) -> None:
        """Stop the JVM now, keep its stderr and release pipes and files (idempotent)."""
        self._timer.cancel()
        proc = self.proc
        with contextlib.suppress(OSError, ValueError):
            proc.stdin.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        with contextlib.suppress(OSError):
            proc.stdout.close()
        if not self._stderr.closed:
            self._stderr_bytes = self.stderr_text()
            self._stderr.close()


class _Job(threading.Thread):
    """A function run in a thread whose result or exception :meth:`result` hands back."""

    def __init__(self, fn, *args):
        super().__init__(name=f"job-{getattr(fn, '__name__', 'fn')}", daemon=True)
        self._fn, self._args = fn, args
        self._value = None
        self._error: Exception | None = None
        self.start()

    def run(self) -> None:
        try:
            self._value = self._fn(*self._args)
        except Exception as exc:  # noqa: BLE001  (re-raised in the caller by result())
            self._error = exc

    def result(self):
        self.join()
        if self._error is not None:
            raise self._error
        return self._value


def _spice_lib_dir(spice_lib_dir: str | os.PathLike | None) -> Path:
    if spice_lib_dir is not None:
        return Path(spice_lib_dir)
    if os.environ.get(SPICE_LIB_ENV):
        return Path(os.environ[SPICE_LIB_ENV])
    return _pycocoevalcap_spice_dir() / "lib"


def _pycocoevalcap_spice_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pycocoevalcap.spice.spice")  # finds the file; the module is not executed
    return Path(spec.origin).resolve().parent


# Java >= 9 blocks the reflection SPICE's FST cache serializer needs
# (InaccessibleObjectException, tylin/coco-caption#59).
_SPICE_ADD_OPENS = [
    f"--add-opens=java.base/{pkg}=ALL-UNNAMED"
    for pkg in ("java.lang", "java.util", "java.util.concurrent", "java.math", "java.net", "java.text", "java.io",
                "java.nio")
]
_SPICE_SCORE = re.compile(r"All tuples\s+f-score:\s*(\S+) \(SPICE metric\)")


def _spice(gts: dict, res: dict, lib_dir: Path, work_dir: str, java: str, java_major: int) -> float:
    """Run the bundled spice-1.0.jar with input, cache and JVM temp files under ``work_dir``.

    UNTESTED with real jars: the CoreNLP 3.6.0 jars cannot be obtained offline, so only the failure path
    (jars present but unusable) is covered by the tests. Differences from pycocoevalcap's ``Spice`` class, each on
    purpose: files live under ``work_dir``, not in site-packages; the CoreNLP jars come from ``lib_dir`` via
    ``-cp``; ``--add-opens`` on Java >= 9 for the cache; and the score is read from the jar's printed summary
    (3 decimals, macro-average over images with a defined F-score) because ``-out`` pretty-prints its JSON
    through the Nashorn JavaScript engine, which Java 15 removed (so pycocoevalcap's class fails on Java >= 15).
    """
    spice_dir = _pycocoevalcap_spice_dir()
    root = Path(work_dir)
    cache, tmp = root / "spice_cache", root / "spice_tmp"
    cache.mkdir(exist_ok=True)
    tmp.mkdir(exist_ok=True)
    in_file = tmp / "spice_input.json"
    with open(in_file, "w", encoding="utf-8") as f:
        json.dump([{"image_id": i, "test": res[i][0], "refs": gts[i]} for i in sorted(gts)], f)
    classpath = os.pathsep.join(
        [str(spice_dir / "spice-1.0.jar"), *(str(lib_dir / jar) for jar in SPICE_CORENLP_JARS),
         str(spice_dir / "lib" / "*")]
    )
    cmd = [java, "-Xmx8G", f"-Djava.io.tmpdir={tmp}", *(_SPICE_ADD_OPENS if java_major >= 9 else []),
           "-cp", classpath, "edu.anu.spice.SpiceScorer", str(in_file), "-cache", str(cache), "-subset"]
    proc = subprocess.run(cmd, cwd=tmp, stdin=subprocess.DEVNULL, capture_output=True)
    in_file.unlink()
    out = proc.stdout.decode(errors="replace")
    match = _SPICE_SCORE.search(out)
    if proc.returncode != 0 or not match:
        raise RuntimeError(
            f"SPICE failed (java exit {proc.returncode}) with CoreNLP jars from {lib_dir}: "
            f"{_tail(proc.stderr or proc.stdout)}"
        )
    return float(match.group(1).replace(",", "."))  # the jar formats with the JVM's locale
