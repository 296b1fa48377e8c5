"""JVMs kept alive across scoring calls for the caption metrics' Java tools: Stanford's PTB tokenizer (as
pycocoevalcap runs it), METEOR's reference normaliser and METEOR itself on a cut paraphrase table
(``java/CaptionTextServer.java``).

Why: each scoring call used to start two short JVMs, one for the tokenizer and one for the normaliser, each paying
the JVM start, class loading, the tokenizer's lexer tables or the normaliser's 43,000-word map, and running cold
code, on the critical path of the call. A training run scores every epoch, and a sweep scores many runs in one
process: from the second call on, this JVM is warm (5,000 captions x 6 tokenised in ~0.25 s instead of ~0.7 s;
the normaliser ~1 s faster; METEOR scores 2,500 captions with a cut table in ~1.3 s instead of ~1.9 s, JVM
start included). The output is the command-line tools' own, byte for byte: a PTB request runs ``PTBTokenizer.main``
with pycocoevalcap's arguments, a METEOR request ``Meteor.main`` with the arguments pycocoevalcap's ``Meteor`` gives
it, on files instead of pipes (tests/unit/test_text_server.py compares them). The price is memory held between calls:
about 230 MB per JVM after COCO-sized calls (each collects its heap after a request; at most 2 GB while working, as
METEOR's own ``-Xmx2G``).

The server is compiled once with ``javac`` into the cache directory (``$LAVIS_EXT_CACHE/java``) against the
pycocoevalcap jars. Without ``javac`` (a JRE only) :func:`server_for` raises :class:`TextServerError` and callers
start the command-line tools as before. A server that dies, answers an error or stays silent past the timeout is killed and
replaced at the next request; the failed request raises :class:`TextServerError` and the caller falls back.
Requests are serialised per server; a process has up to ``SLOTS`` servers per Java executable (METEOR scores a
large set in two halves at once), each started in the process that uses it, so a forked worker starts its own.
"""
from __future__ import annotations

import atexit
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["TextServer", "TextServerError", "compiled_classes", "meteor_jar", "ptb_jar", "publish", "server_for",
           "live_pids", "timeout_for"]

_MAIN = "CaptionTextServer"
_SOURCES = ("CaptionTextServer.java", "MeteorNormalize.java")
# The client JIT only and the serial collector (one GC thread), on cores the JVMs share with the Python scorers.
# Measured over 5 calls in one process (5,000 x 5 captions, 2 cores): with the default tiered JIT the first call
# took 6.2-7.3 s (C2 compiler threads compete for the cores) and warm calls 3.3-3.5 s; with C1 only, 4.2-4.5 s
# (less than the 4.65 s of a JVM per call) and 3.6-3.9 s. A one-off evaluation is one call: C1.
# After each request the server collects its heap, and these ratios let the heap shrink to what is live, so that
# a process does not keep METEOR's working memory between calls (RSS grew by ~80 MB a call without them).
_FLAGS = ["-XX:+IgnoreUnrecognizedVMOptions", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Xmx2G",  # METEOR's
          "-XX:MinHeapFreeRatio=10", "-XX:MaxHeapFreeRatio=30"]
#: servers per process: METEOR scores a large set in two halves at once (caption_metrics._PARALLEL_METEOR_MIN)
SLOTS = 2


def timeout_for(lines: int) -> float:
    """Seconds a Java tool may take on ``lines`` input lines before it is stopped: generous, since a stuck JVM is
    the only thing it guards against (a METEOR JVM loading its full paraphrase table starts in ~6 s on 2 cores;
    scoring, tokenising or normalising costs ~1 ms a line)."""
    return 300.0 + 0.1 * lines


class TextServerError(RuntimeError):
    """A request failed: the server answered an error, died, or did not answer in time (it has been stopped)."""


def ptb_jar() -> Path:
    """pycocoevalcap's PTB tokenizer jar (Stanford CoreNLP 3.4.1)."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    return Path(ptbtokenizer.__file__).resolve().with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)


def meteor_jar() -> Path:
    """pycocoevalcap's METEOR 1.5 jar."""
    from pycocoevalcap.meteor import meteor

    return Path(meteor.__file__).resolve().with_name(meteor.METEOR_JAR)


def jars() -> list[Path]:
    """The server's class path: both jars."""
    return [ptb_jar(), meteor_jar()]


def compiled_classes(java: str) -> Path:
    """Folder of the compiled server, built once per source, jars and Java installation.

    Raises:
        TextServerError: no ``javac`` beside ``java`` or on PATH, or ``javac`` failed.
        OSError: the cache folder cannot be written.
    """
    from lavis_ext.compat import default_cache_root

    folder = Path(__file__).with_name("java")
    real_java = Path(shutil.which(java) or java).resolve()
    key_parts = [(folder / s).read_bytes() for s in _SOURCES]
    key_parts += [f"|{j.stat().st_size}".encode() for j in jars()]
    key_parts.append(f"|{real_java}|{real_java.stat().st_mtime_ns if real_java.exists() else 0}".encode())
    key = hashlib.sha256(b"".join(key_parts)).hexdigest()[:16]
    target = default_cache_root() / "java" / f"text-server-{key}"
    if (target / f"{_MAIN}.class").is_file():
        return target
    javac = _javac_for(real_java)
    if javac is None:
        raise TextServerError("`javac` was not found next to `java` or on PATH; install a JDK (e.g. "
                              "openjdk-17-jdk-headless)")
    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=target.parent))
    proc = subprocess.run([javac, "-nowarn", "-cp", os.pathsep.join(map(str, jars())), "-d", str(build),
                           *(str(folder / s) for s in _SOURCES)], capture_output=True)
    if proc.returncode != 0:
        shutil.rmtree(build, ignore_errors=True)
        raise TextServerError(f"javac {', '.join(_SOURCES)} failed: {proc.stderr.decode(errors='replace')[-800:]}")
    publish(build, target)
    return target


def _javac_for(java: Path) -> str | None:
    beside = java.with_name("javac")
    return str(beside) if beside.is_file() else shutil.which("javac")


def publish(build: Path, target: Path) -> None:
    """Move a finished build folder into place; if another process got there first, keep theirs."""
    try:
        os.replace(build, target)
    except OSError:  # target exists and is not empty: a concurrent build won
        shutil.rmtree(build, ignore_errors=True)


class TextServer:
    """The running server: :meth:`tokenize` and :meth:`normalize` block until the output file is complete."""

    def __init__(self, java: str, classes: Path):
        self.java, self.classes = java, classes
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._stderr = None

    def tokenize(self, input_file: str | Path, output_file: str | Path, timeout: float) -> None:
        """``PTBTokenizer -preserveLines -lowerCase input_file`` with its standard output in ``output_file``."""
        self._request(["PTB", str(input_file), str(output_file)], timeout)

    def normalize(self, language: str, words_file: str | Path, input_file: str | Path, output_file: str | Path,
                  timeout: float) -> None:
        """METEOR's normalised reference words of the SCORE lines in ``input_file`` as word ids (MeteorNormalize)."""
        self._request(["NORM", language, str(words_file), str(input_file), str(output_file)], timeout)

    def meteor(self, args: list[str], input_file: str | Path, output_file: str | Path, timeout: float) -> None:
        """METEOR's command line (``Meteor.main(args)``) with ``input_file`` as its standard input and its standard
        output in ``output_file``; with ``-stdio`` it scores the file's SCORE / EVAL lines and returns at its end."""
        self._request(["METEOR", str(input_file), str(output_file), *args], timeout)

    def _request(self, fields: list[str], timeout: float) -> None:
        if any("\t" in f or "\n" in f for f in fields):
            raise TextServerError(f"a tab or newline in a request field: {fields!r}")
        with self._lock:
            proc = self._running()
            timer = threading.Timer(timeout, proc.kill)
            timer.daemon = True
            timer.start()
            try:
                proc.stdin.write(("\t".join(fields) + "\n").encode())
                proc.stdin.flush()
                answer = proc.stdout.readline().decode(errors="replace").strip()
            except (OSError, ValueError) as exc:
                answer = f"ERROR {exc!r}"
            finally:
                timer.cancel()
            if answer == "OK":
                return
            if not answer or proc.poll() is not None:  # dead or killed by the timer: the next request starts anew
                self._stop()
                why = f"did not answer within {timeout:g} s" if not answer else f"died ({answer})"
                raise TextServerError(f"the caption text server {why}; java stderr: {self._stderr_tail()}")
            raise TextServerError(f"the caption text server failed: {answer[len('ERROR '):][:1500]}")

    def _running(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            classpath = os.pathsep.join([*map(str, jars()), str(self.classes)])
            self._stderr = tempfile.TemporaryFile()  # noqa: SIM115  (open for the JVM's lifetime)
            self._proc = subprocess.Popen([self.java, *_FLAGS, "-cp", classpath, _MAIN], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=self._stderr)
        return self._proc

    def _stderr_tail(self) -> str:
        if self._stderr is None or self._stderr.closed:
            return "<none>"
        self._stderr.seek(0)
        return self._stderr.read()[-800:].decode(errors="replace").strip() or "<empty>"

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=5)  # stdin closed: the server's loop ends
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        """Stop the JVM (idempotent); a later request starts a new one."""
        with self._lock:
            self._stop()
            if self._stderr is not None:
                self._stderr.close()


_servers: dict[tuple, TextServer | TextServerError] = {}
_servers_lock = threading.Lock()


def server_for(java: str, slot: int = 0) -> TextServer:
    """This process's server number ``slot`` (``0 <= slot < SLOTS``) for ``java`` and the cache folder, compiled on
    first use.

    Raises:
        TextServerError: it cannot be compiled here (the reason: no ``javac``, a failed build, an unwritable cache);
            remembered, so later calls raise at once.
    """
    from lavis_ext.compat import default_cache_root

    if not 0 <= slot < SLOTS:
        raise ValueError(f"slot {slot} is outside 0..{SLOTS - 1}")
    key = (java, os.getpid(), str(default_cache_root()), slot)  # a forked child starts its own JVM
    with _servers_lock:
        if key not in _servers:
            try:
                _servers[key] = TextServer(java, compiled_classes(java))
            except (OSError, TextServerError) as exc:
                _servers[key] = TextServerError(f"the caption text server cannot be built: {exc}")
        found = _servers[key]
    if isinstance(found, TextServerError):
        raise found
    return found


def live_pids() -> set[int]:
    """Process ids of this process's running servers: JVMs kept up between calls on purpose (a benchmark counts
    their CPU time, a test tells them from leaked ones)."""
    with _servers_lock:
        found = list(_servers.values())
    return {s._proc.pid for s in found if isinstance(s, TextServer) and s._proc is not None and s._proc.poll() is None}


@atexit.register
def _close_all() -> None:
    for (_, pid, _, _), server in _servers.items():
        if isinstance(server, TextServer) and pid == os.getpid():
            server.close()
