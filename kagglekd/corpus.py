"""The offline assets of the embedded default, and the kit's cache they live in.

* ``stdlib_corpus``: the demo corpus, the ``pydoc`` text of standard-library modules (``STDLIB_MODULES``),
  rendered in a fresh interpreter so it is the same on every run of a given Python version.
* ``train_demo_tokenizer`` / ``demo_tokenizer``: a BPE tokenizer trained on a corpus, saved so
  ``AutoTokenizer.from_pretrained(dir)`` loads it (``PRE_TOKENIZERS`` are the segmentations on offer).
* ``cache_root`` / ``staged_directory``: where cached corpora, tokenizers and models live
  (``$KAGGLEKD_CACHE`` or ``~/.cache/kagglekd``) and the atomic way a cache entry is written.

``data.load_texts("stdlib-docs")`` reads the corpus as a dataset; ``models`` builds the tiny models on it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kagglekd.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PRE_TOKENIZERS = ("bytelevel", "bytelevel-digits", "whitespace-digits")

# Bump when the corpus recipe changes so cached corpora are rebuilt (also part of data.dataset_fingerprint).
CORPUS_VERSION = 1
_TOKENIZER_VERSION = 1

# A fixed, sorted list of standard-library modules whose pydoc text makes the demo corpus. Modules that
# fail to import on a given platform / Python version are skipped, so the corpus is deterministic for a
# given Python version. Left out on purpose: side effects or noise (antigravity opens a browser, this
# prints, idlelib / tkinter / turtle* are GUI, test* are test suites, ensurepip / lib2to3 / distutils /
# pydoc_data are tooling or data dumps, ast is a page of near-identical node classes, posix / nt* /
# ntpath duplicate os / os.path, sre_* are deprecated aliases of re internals) and Windows-only modules.
STDLIB_MODULES = (
    "abc", "aifc", "argparse", "array", "asyncio", "atexit", "audioop", "base64", "bdb",
    "binascii", "bisect", "builtins", "bz2", "cProfile", "calendar", "cgi", "cgitb", "chunk", "cmath",
    "cmd", "code", "codecs", "codeop", "collections", "collections.abc", "colorsys", "compileall",
    "concurrent.futures", "configparser", "contextlib", "contextvars", "copy", "copyreg", "crypt", "csv",
    "ctypes", "curses", "curses.ascii", "dataclasses", "datetime", "dbm", "dbm.dumb", "decimal", "difflib",
    "dis", "doctest", "email", "email.headerregistry", "email.message", "email.parser", "email.policy",
    "email.utils", "enum", "errno", "faulthandler", "fcntl", "filecmp", "fileinput", "fnmatch",
    "fractions", "ftplib", "functools", "gc", "getopt", "getpass", "gettext", "glob", "graphlib", "grp",
    "gzip", "hashlib", "heapq", "hmac", "html", "html.parser", "http", "http.client", "http.cookiejar",
    "http.cookies", "http.server", "imaplib", "imghdr", "importlib", "importlib.abc", "importlib.metadata",
    "importlib.resources", "importlib.util", "inspect", "io", "ipaddress", "itertools", "json",
    "json.decoder", "json.encoder", "keyword", "linecache", "locale", "logging", "logging.config",
    "logging.handlers", "lzma", "mailbox", "mailcap", "marshal", "math", "mimetypes", "mmap",
    "modulefinder", "multiprocessing", "multiprocessing.managers", "multiprocessing.pool",
    "multiprocessing.shared_memory", "netrc", "nis", "nntplib", "numbers", "opcode", "operator",
    "optparse", "os", "os.path", "ossaudiodev", "pathlib", "pdb", "pickle", "pickletools", "pipes",
    "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile", "pstats", "pty", "pwd",
    "py_compile", "pyclbr", "pydoc", "pyexpat", "queue", "quopri", "random", "re", "readline", "reprlib",
    "resource", "rlcompleter", "runpy", "sched", "secrets", "select", "selectors", "shelve", "shlex",
    "shutil", "signal", "site", "smtplib", "sndhdr", "socket", "socketserver", "spwd", "sqlite3", "ssl",
    "stat", "statistics", "string", "stringprep", "struct", "subprocess", "sunau", "symtable", "sys",
    "sysconfig", "syslog", "tabnanny", "tarfile", "telnetlib", "tempfile", "termios", "textwrap",
    "threading", "time", "timeit", "token", "tokenize", "tomllib", "trace", "traceback", "tracemalloc",
    "tty", "types", "typing", "unicodedata", "unittest", "unittest.mock", "urllib.error", "urllib.parse",
    "urllib.request", "urllib.robotparser", "uu", "uuid", "venv", "warnings", "wave", "weakref",
    "webbrowser", "wsgiref.handlers", "wsgiref.simple_server", "wsgiref.util", "xdrlib", "xml.dom.minidom",
    "xml.etree.ElementTree", "xml.sax", "xml.sax.handler", "xmlrpc.client", "xmlrpc.server", "zipapp",
    "zipfile", "zipimport", "zlib", "zoneinfo",
)  # fmt: skip

# Runs in a fresh interpreter (see ``stdlib_corpus``): importing ~200 modules into the caller's process
# would leave side effects behind, and a fixed PYTHONHASHSEED plus an empty environment make the text
# deterministic (some defaults render ``os.environ`` or hash-ordered sets). Reads module names from
# stdin, writes one JSON record per line to argv[1].
_RENDER_SCRIPT = r"""
import contextlib, importlib, io, json, pydoc, re, sys, sysconfig, warnings

DROPPED_SECTIONS = {"DATA", "FILE", "MODULE REFERENCE", "VERSION", "AUTHOR", "CREDITS", "DATE"}
SECTION = re.compile(r"^[A-Z][A-Z ]+$")
PATHS = sorted({p for p in (sysconfig.get_paths().get("stdlib"), sys.prefix, sys.base_prefix,
                            sys.exec_prefix, sys.executable) if p and len(p) > 1}, key=len, reverse=True)

def clean(text):
    kept, dropping = [], False
    for line in text.split("\n"):
        if SECTION.match(line):
            dropping = line in DROPPED_SECTIONS
        if not dropping:
            kept.append(line)
    text = "\n".join(kept)
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", text)
    text = re.sub(r"environ\(\{.*?\}\)", "environ({...})", text)
    for path in PATHS:
        text = text.replace(path, "<python>")
    return text.strip() + "\n"

names = json.load(sys.stdin)
with open(sys.argv[1], "w", encoding="utf-8") as out:
    for name in names:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
                text = pydoc.render_doc(module, renderer=pydoc.plaintext)
        except BaseException:  # a module that cannot import here is skipped, by design
            continue
        out.write(json.dumps({"module": name, "text": clean(text)}, ensure_ascii=False) + "\n")
"""


# ----------------------------------------------------------------------------- the cache


def cache_root() -> Path:
    """The kit's cache directory: ``$KAGGLEKD_CACHE`` if set, else ``~/.cache/kagglekd`` (created)."""
    root = os.environ.get("KAGGLEKD_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "kagglekd"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def staged_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp directory beside ``final``; on success rename it to ``final`` atomically.

    Readers never see a half-written directory. If ``final`` already exists when the rename happens
    (a concurrent build finished first), that one is kept and the staged copy is discarded.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield staging
        try:
            os.rename(staging, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------- stdlib corpus


def stdlib_corpus(cache_dir: str | os.PathLike | None = None) -> Path:
    """Build (once) the offline demo corpus and return the path of its JSONL file.

    One ``{"module": name, "text": pydoc_text}`` record per importable module of ``STDLIB_MODULES``:
    real English prose and code signatures that nobody in this project wrote. The DATA / FILE sections
    (values of module globals, install paths) are dropped and memory addresses scrubbed, so the text is
    the same on every run of a given Python version. About 4 MB; building it takes a few seconds.
    """
    directory = Path(cache_dir) if cache_dir is not None else cache_root() / "corpus"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    path = directory / f"stdlib-docs-py{version}-v{CORPUS_VERSION}.jsonl"
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    logger.info("Building the stdlib-docs corpus from pydoc text of %d modules", len(STDLIB_MODULES))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    # An almost empty environment: nothing of the caller's (paths, tokens) can leak into the text.
    env = {"PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8", "LANG": "C.UTF-8", "PATH": os.defpath}
    try:
        with tempfile.TemporaryDirectory() as workdir:
            result = subprocess.run(
                [sys.executable, "-s", "-c", _RENDER_SCRIPT, tmp],  # not -I: it would ignore PYTHONHASHSEED
                input=json.dumps(sorted(STDLIB_MODULES)),
                capture_output=True,
                text=True,
                env=env,
                cwd=workdir,
                timeout=600,
            )
        if result.returncode != 0:
            raise RuntimeError(f"building the stdlib corpus failed:\n{result.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    with path.open(encoding="utf-8") as handle:
        modules = sum(1 for _ in handle)
    logger.info("stdlib-docs corpus: %d modules, %.1f MB -> %s", modules, path.stat().st_size / 1e6, path)
    return path


def _iter_corpus_texts(corpus_path: Path, text_column: str = "text"):
    """Yield the documents of a JSONL corpus (the ``text`` field) or of a plain-text file (the whole file)."""
    with Path(corpus_path).open(encoding="utf-8") as handle:
        if Path(corpus_path).suffix == ".jsonl":
            for line in handle:
                if line.strip():
                    yield json.loads(line)[text_column]
        else:
            yield handle.read()


# ----------------------------------------------------------------------------- demo tokenizer


def _build_bpe(pre_tokenizer: str, vocab_size: int):
    """An untrained ``tokenizers.Tokenizer`` and its trainer for one of ``PRE_TOKENIZERS``.

    * ``"bytelevel"``: GPT-2 style. Text is mapped to bytes (shown as printable characters, ``Ġ`` = space),
      so every string is representable without an unknown token.
    * ``"bytelevel-digits"``: byte-level with every digit its own pre-token, as Qwen's tokenizer splits them:
      the cross-tokenizer demo's teacher (different vocabulary and pre-tokenisation, same byte spelling).
    * ``"whitespace-digits"``: SentencePiece / Llama style. Spaces become ``▁`` and start a word, every
      digit is its own pre-token, and characters outside the vocabulary fall back to ``<0xNN>`` byte tokens.
      Same corpus, different segmentation: the pair exercises cross-tokenizer distillation.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if pre_tokenizer in ("bytelevel", "bytelevel-digits"):
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        if pre_tokenizer == "bytelevel-digits":
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
            )
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        return tokenizer, trainer
    if pre_tokenizer == "whitespace-digits":
        byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
        tokenizer = Tokenizer(models.BPE(byte_fallback=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
                pre_tokenizers.Digits(individual_digits=True),
            ]
        )
        tokenizer.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")]
        )
        # The byte tokens are trained in as "special" so they get ids; they are turned into ordinary
        # vocabulary entries afterwards (see train_demo_tokenizer), as in Llama's tokenizer.
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=[EOS_TOKEN, *byte_tokens],
            show_progress=False,
        )
        return tokenizer, trainer
    raise ConfigError(
        f"Unknown pre_tokenizer {pre_tokenizer!r}; choose one of {', '.join(PRE_TOKENIZERS)}.",
        field="tokenizer",
    )


def _demote_byte_tokens(tokenizer):
    """Keep ``<0xNN>`` byte-fallback tokens as plain vocabulary entries, not special tokens.

    Special tokens are dropped by ``decode(skip_special_tokens=True)``, which would lose every character
    spelled with byte fallback.
    """
    from tokenizers import Tokenizer

    state = json.loads(tokenizer.to_str())
    state["added_tokens"] = [t for t in state["added_tokens"] if t["content"] == EOS_TOKEN]
    return Tokenizer.from_str(json.dumps(state))


def train_demo_tokenizer(
    corpus_path: str | os.PathLike,
    vocab_size: int = 4096,
    out_dir: str | os.PathLike | None = None,
    *,
    pre_tokenizer: str = "bytelevel",
) -> Path:
    """Train a BPE tokenizer on a corpus and save it so ``AutoTokenizer.from_pretrained(dir)`` loads it.

    ``corpus_path`` is a JSONL file with a ``text`` field (like ``stdlib_corpus()``) or a plain-text file.
    ``<|endoftext|>`` (id 0) is the bos, eos, unk and pad token; encoding adds no special tokens.
    ``pre_tokenizer`` is ``"bytelevel"`` (GPT-2 style) or ``"whitespace-digits"`` (Metaspace + single digits
    + byte fallback, Llama style). Both round-trip any UTF-8 text. Cached: with ``out_dir=None`` the
    tokenizer lives in ``cache_root()/tokenizers/<corpus>-<pre_tokenizer>-v<vocab_size>`` and an existing
    one is returned at once. Returns the directory.
    """
    from transformers import PreTrainedTokenizerFast

    corpus_path = Path(corpus_path)
    if not corpus_path.is_file():
        raise DataError(f"Tokenizer corpus {corpus_path} does not exist.", path=str(corpus_path))
    if out_dir is None:
        name = f"{corpus_path.stem}-{pre_tokenizer}-v{vocab_size}-t{_TOKENIZER_VERSION}"
        out_dir = cache_root() / "tokenizers" / name
    out_dir = Path(out_dir)
    if (out_dir / "tokenizer.json").exists():
        return out_dir

    tokenizer, trainer = _build_bpe(pre_tokenizer, vocab_size)
    logger.info("Training a %s BPE tokenizer (vocab %d) on %s", pre_tokenizer, vocab_size, corpus_path)
    tokenizer.train_from_iterator(_iter_corpus_texts(corpus_path), trainer=trainer)
    if pre_tokenizer == "whitespace-digits":
        tokenizer = _demote_byte_tokens(tokenizer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000_000,  # documents are packed, never truncated by the tokenizer
    )
    with staged_directory(out_dir) as staging:
        wrapped.save_pretrained(staging)
    logger.info("Saved tokenizer (%d tokens) to %s", len(wrapped), out_dir)
    return out_dir


def demo_tokenizer(vocab_size: int = 4096, *, pre_tokenizer: str = "bytelevel") -> Path:
    """The stdlib-docs corpus plus a tokenizer trained on it, both cached. Returns the tokenizer dir."""
    return train_demo_tokenizer(stdlib_corpus(), vocab_size, pre_tokenizer=pre_tokenizer)
