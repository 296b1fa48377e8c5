"""Caption metrics computed exactly as pycocoevalcap's ``COCOEvalCap.evaluate()`` does, on plain dicts, offline.

Why not ``COCOEvalCap`` itself: it needs COCO-format objects keyed by COCO image ids, its PTB tokenizer and SPICE
write temporary files next to their jars inside site-packages (read-only installs break, parallel evaluations race),
and its SPICE step downloads Stanford CoreNLP on first use. Here the same steps run on ``{id: captions}`` dicts:

1. PTB tokenisation of candidates and references: the bundled Stanford CoreNLP 3.4.1 jar with
   ``-preserveLines -lowerCase`` and pycocoevalcap's own ``PUNCTUATIONS`` list (:func:`ptb_tokenize`);
2. pycocoevalcap's ``Bleu(4)``, ``Meteor()``, ``Rouge()`` and ``Cider()`` classes, unchanged;
3. SPICE only where the CoreNLP 3.6.0 jars are already present; it is never downloaded.

Every file (tokenizer input, SPICE input/output/cache, JVM temp files) goes under ``work_dir``. The METEOR JVM only
reads its jar and paraphrase table in site-packages, so pycocoevalcap's class is used as is and closed after use.

CIDEr-D takes its document frequencies from the references being evaluated, so scores on a subset or a small
custom set are not comparable to full-split numbers (and a single image always scores 0).
"""
from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections import Counter
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

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
        gts = _tokenise_references(refs, wd, java)
        res = {i: [c] for i, c in enumerate(ptb_tokenize(candidates, wd, java=java))}

        results: dict = {}
        skipped: dict[str, str] = {}
        if "BLEU" in wanted:
            from pycocoevalcap.bleu.bleu import Bleu

            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            results.update({f"Bleu_{n}": float(s) for n, s in enumerate(bleu, start=1)})
        if "METEOR" in wanted:
            results["METEOR"] = _meteor(gts, res)
        if "ROUGE_L" in wanted:
            from pycocoevalcap.rouge.rouge import Rouge

            results["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
        if "CIDEr" in wanted:
            from pycocoevalcap.cider.cider import Cider

            results["CIDEr"] = float(Cider().compute_score(gts, res)[0])
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
                    results["SPICE"] = _spice(gts, res, lib_dir, wd, java, java_major)
                except RuntimeError as exc:
                    skipped["SPICE"] = str(exc)
                    warnings.warn(f"SPICE skipped: {exc}", RuntimeWarning, stacklevel=2)
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
    from pycocoevalcap.cider.cider import Cider

    _, refs = _normalise_references(references)
    if candidates is None:
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    else:
        candidates = _check_strings(list(candidates), "candidates")
    java, _ = _require_java()

    with _work_dir(work_dir) as wd:
        gts = _tokenise_references(refs, wd, java)
        if candidates is None:
            counts = Counter(r for rs in gts.values() for r in rs if r)
            raw = tokenised = [caption for caption, _ in counts.most_common(top_k)]
        else:
            raw, tokenised = candidates, ptb_tokenize(candidates, wd, java=java)
    if not raw:
        raise ValueError("no candidate caption to try: pass non-empty `candidates` or references with words in them")

    best: tuple[str, float] | None = None
    for caption, tokens in zip(raw, tokenised):
        score = float(Cider().compute_score(gts, {i: [tokens] for i in gts})[0])
        if best is None or score > best[1]:
            best = (caption, score)
    return best


def ptb_tokenize(
    sentences: Sequence[str], work_dir: str | os.PathLike, *, java: str = "java"
) -> list[str]:
    """PTB-tokenise sentences the way pycocoevalcap's ``PTBTokenizer`` does, with the temp file in ``work_dir``.

    Not the library's class: ``PTBTokenizer.tokenize`` writes its input file into site-packages next to the jar and
    runs Java with that folder as cwd. Same jar, same command, same punctuation list; only the file location
    differs, plus the line-break fix described at ``_JAVA_LINE_BREAKS``.

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
    jar = Path(lib.__file__).resolve().with_name(lib.STANFORD_CORENLP_3_4_1_JAR)
    text = "\n".join(_JAVA_LINE_BREAKS.sub(" ", s) for s in sentences)
    fd, tmp_path = tempfile.mkstemp(prefix="ptb_", suffix=".txt", dir=work_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode())
        proc = subprocess.run(
            [java, "-cp", str(jar), _PTB_MAIN, "-preserveLines", "-lowerCase", tmp_path],
            cwd=work_dir, stdin=subprocess.DEVNULL, capture_output=True,
        )
    finally:
        os.remove(tmp_path)
    if proc.returncode != 0:
        raise RuntimeError(
            f"PTB tokenisation failed (java exit {proc.returncode}): {_tail(proc.stderr)}; check that {jar} exists "
            "(reinstall pycocoevalcap) and that `java -version` works"
        )
    lines = proc.stdout.decode().split("\n")
    if lines and lines[-1] == "" and len(lines) == len(sentences) + 1:
        lines.pop()
    if len(lines) != len(sentences):
        raise RuntimeError(
            f"PTB tokenizer returned {len(lines)} lines for {len(sentences)} captions, so tokens cannot be matched "
            f"to ids; stderr: {_tail(proc.stderr)}"
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


def _tokenise_references(refs: list[list[str]], work_dir: str, java: str) -> dict[int, list[str]]:
    """Tokenise all references in one JVM call, keyed 0..n-1 (internal keys: the scorers need no real ids)."""
    flat = ptb_tokenize([r for rs in refs for r in rs], work_dir, java=java)
    gts, start = {}, 0
    for i, rs in enumerate(refs):
        gts[i] = flat[start:start + len(rs)]
        start += len(rs)
    return gts


def _tail(data: bytes | str, limit: int = 800) -> str:
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    text = text.strip()
    return ("..." + text[-limit:]) if len(text) > limit else (text or "<no output>")


def _meteor_timeout(num_ids: int) -> float:
    """Seconds METEOR may take (JVM start with the paraphrase table is ~7 s on 2 cores; scoring is ~ms per id)."""
    return 300.0 + 0.1 * num_ids


def _meteor(gts: dict, res: dict) -> float:
    """Run pycocoevalcap's Meteor (its JVM only reads in site-packages) with a watchdog, and always stop the JVM.

    The library's class reads its answers with blocking ``readline``: a JVM that dies or stalls would hang the
    caller forever, so a timer kills it after :func:`_meteor_timeout` seconds.
    """
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    proc = meteor.meteor_p
    fired = threading.Event()

    def kill() -> None:
        fired.set()
        proc.kill()

    timeout = _meteor_timeout(len(gts))
    timer = threading.Timer(timeout, kill)
    timer.daemon = True
    timer.start()
    error: Exception | None = None
    try:
        score, _ = meteor.compute_score(gts, res)
    except (ValueError, OSError) as exc:  # EOF (float('')) or a broken pipe: the JVM is gone
        error = exc
    finally:
        timer.cancel()
        stderr = _close_meteor(meteor)
    if error is not None:
        why = f"did not answer within {timeout:g} s" if fired.is_set() else f"failed ({error!r})"
        raise RuntimeError(f"METEOR {why}; java stderr: {_tail(stderr)}") from error
    return float(score)


def _close_meteor(meteor) -> bytes:
    """Stop Meteor's JVM now (the library only does it in ``__del__``) and return its stderr.

    ``Meteor.__del__`` acquires ``meteor.lock``; ``compute_score`` leaves that lock held when it raises, which
    would deadlock garbage collection, so the lock is replaced by a fresh one once the process is gone.
    """
    proc = meteor.meteor_p
    with contextlib.suppress(OSError):
        proc.stdin.close()
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=60)
    stderr = b""
    with contextlib.suppress(OSError, ValueError):
        stderr = proc.stderr.read()
    for stream in (proc.stdout, proc.stderr):
        with contextlib.suppress(OSError):
            stream.close()
    meteor.lock = threading.Lock()
    return stderr


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
