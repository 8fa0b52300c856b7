"""Writes the frozen text corpora of ``qetjax/bench/corpora/`` (run once; the files are committed).

Text read from the running Python's docstrings changes with the Python version, and so would
every table computed on it; the benchmarks therefore read these files, never live docstrings.

* ``minilm_sentences.json``: the MiniLM benchmark's sentences, exactly as the former live code
  (``qetjax.bench.corpus.stdlib_sentences`` before it read this file) produced them, in order.
* ``stdlib_eval.txt`` / ``stdlib_calib.txt``: the causal-LM perplexity corpus and its disjoint
  calibration text: the docstrings (module, then public classes and functions, by name) of two
  disjoint lists of stdlib modules, each docstring once, separated by blank lines.

Usage:
    python scripts/freeze_corpora.py            # writes the files (Python 3.11 was used)
    python scripts/freeze_corpora.py --check    # verifies the MiniLM file against live docstrings
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "qetjax" / "bench" / "corpora"

# The MiniLM corpus: the module list and filters of the former live corpus code, verbatim.
MINILM_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "bz2", "calendar", "cmd",
    "codecs", "collections", "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "dis", "email", "enum", "filecmp", "fnmatch", "fractions",
    "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html",
    "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale",
    "logging", "lzma", "mailbox", "mimetypes", "numbers", "operator", "optparse", "os", "pathlib",
    "pickle", "pickletools", "platform", "poplib", "pprint", "queue", "quopri", "random", "re",
    "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket",
    "socketserver", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "types",
    "typing", "unittest", "urllib.parse", "uuid", "warnings", "wave", "weakref", "webbrowser",
    "xml.dom.minidom", "zipfile", "zlib",
    "multiprocessing", "concurrent.futures", "http.server", "urllib.request", "xml.etree.ElementTree",
    "pydoc", "doctest", "ssl", "importlib", "importlib.metadata", "zipimport", "tracemalloc", "cProfile",
    "pstats", "pdb", "bdb", "code", "codeop", "compileall", "contextvars", "graphlib", "keyword",
    "linecache", "netrc", "plistlib", "py_compile", "pyclbr", "reprlib", "rlcompleter", "runpy", "stat",
    "symtable", "sysconfig", "tabnanny", "unittest.mock", "zoneinfo", "asyncio.tasks", "asyncio.streams",
    "email.message", "email.utils", "logging.handlers", "xmlrpc.client", "http.cookiejar", "http.cookies",
    "wsgiref.simple_server", "sqlite3.dbapi2", "json.decoder", "json.encoder", "collections.abc", "os.path",
)

# The causal-LM corpora: two disjoint module lists.
EVAL_MODULES = (
    "argparse", "collections", "functools", "itertools", "pathlib", "subprocess", "typing", "logging",
    "unittest.case", "email.message", "json", "csv", "datetime", "decimal", "fractions", "statistics",
    "random", "string", "textwrap", "difflib", "heapq", "bisect", "enum", "dataclasses", "contextlib",
    "tarfile", "zipfile", "shutil", "tempfile", "threading", "queue", "socket", "selectors", "ssl",
    "http.client", "urllib.parse", "urllib.request", "xml.etree.ElementTree", "inspect", "ast",
)
CALIB_MODULES = (
    "abc", "array", "base64", "bz2", "calendar", "cmd", "codecs", "colorsys", "configparser", "copy",
    "dis", "filecmp", "fnmatch", "ftplib", "getopt", "gettext", "glob", "gzip", "hashlib", "hmac",
    "imaplib", "io", "ipaddress", "locale", "lzma", "mailbox", "mimetypes", "numbers", "operator",
    "optparse", "os", "pickle", "pickletools", "platform", "poplib", "pprint", "quopri", "re", "sched",
    "secrets", "shelve", "shlex", "signal", "smtplib", "socketserver", "sqlite3", "struct", "timeit",
    "tokenize", "trace", "traceback", "types", "uuid", "warnings", "wave", "weakref", "pydoc", "doctest",
)

_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PROSE = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'()\-]*[A-Za-z0-9)][.!?]$")


def docstrings(module_names: Iterable[str]) -> Iterator[str]:
    """Module docstring, then the public classes' and functions' docstrings (sorted by name)."""
    for name in module_names:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        yield inspect.getdoc(module) or ""
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                yield inspect.getdoc(obj) or ""


def minilm_sentences() -> list[str]:
    """Every distinct prose sentence of 6-40 words, in order (the former live corpus)."""
    seen: set[str] = set()
    out = []
    for doc in docstrings(MINILM_MODULES):
        for paragraph in doc.split("\n\n"):
            text = " ".join(paragraph.split())
            for sentence in _SPLIT.split(text):
                if 6 <= len(sentence.split()) <= 40 and _PROSE.match(sentence) and sentence not in seen:
                    seen.add(sentence)
                    out.append(sentence)
    return out


def llm_text(modules: Iterable[str], exclude: set[str]) -> str:
    """The modules' distinct non-empty docstrings (none in ``exclude``), blank-line separated."""
    out = []
    for doc in docstrings(modules):
        doc = doc.strip()
        if doc and doc not in exclude:
            exclude.add(doc)
            out.append(doc)
    return "\n\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare the MiniLM file to live docstrings")
    args = parser.parse_args()
    sentences = minilm_sentences()
    path = OUT / "minilm_sentences.json"
    if args.check:
        frozen = json.loads(path.read_text("utf-8"))["sentences"]
        same = frozen == sentences
        print(f"{len(frozen)} frozen, {len(sentences)} live: {'identical' if same else 'DIFFERENT'}")
        return 0 if same else 1
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"python": sys.version.split()[0], "modules": list(MINILM_MODULES), "sentences": sentences}
    path.write_text(json.dumps(meta, indent=0, ensure_ascii=False) + "\n", "utf-8")
    seen: set[str] = set()
    (OUT / "stdlib_eval.txt").write_text(llm_text(EVAL_MODULES, seen), "utf-8")
    (OUT / "stdlib_calib.txt").write_text(llm_text(CALIB_MODULES, seen), "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
