"""A deterministic corpus of real English sentences: Python standard-library docstrings.

Sentences are read at run time with :func:`inspect.getdoc` from a fixed list of stdlib
modules and their public classes and functions (sorted by name), split into sentences, and
kept if they are plain prose of 6 to 40 words. The result depends only on the Python
version's docstrings, not on the machine or on import order; nothing is downloaded.

Example:
    >>> sentences = stdlib_sentences(256)
    >>> len(sentences), sentences[0][:30]
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Iterable, Iterator

MODULES = (
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
    # Appended later (the sentences above keep their order): more calibration text.
    "multiprocessing", "concurrent.futures", "http.server", "urllib.request", "xml.etree.ElementTree",
    "pydoc", "doctest", "ssl", "importlib", "importlib.metadata", "zipimport", "tracemalloc", "cProfile",
    "pstats", "pdb", "bdb", "code", "codeop", "compileall", "contextvars", "graphlib", "keyword",
    "linecache", "netrc", "plistlib", "py_compile", "pyclbr", "reprlib", "rlcompleter", "runpy", "stat",
    "symtable", "sysconfig", "tabnanny", "unittest.mock", "zoneinfo", "asyncio.tasks", "asyncio.streams",
    "email.message", "email.utils", "logging.handlers", "xmlrpc.client", "http.cookiejar", "http.cookies",
    "wsgiref.simple_server", "sqlite3.dbapi2", "json.decoder", "json.encoder", "collections.abc", "os.path",
)

_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PROSE = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'()\-]*[A-Za-z0-9)][.!?]$")


def _docstrings(module_names: Iterable[str]) -> Iterator[str]:
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


def _sentences(doc: str) -> Iterator[str]:
    for paragraph in doc.split("\n\n"):
        text = " ".join(paragraph.split())
        for sentence in _SPLIT.split(text):
            if 6 <= len(sentence.split()) <= 40 and _PROSE.match(sentence):
                yield sentence


def stdlib_sentences(count: int, exclude: Iterable[str] = (), modules: Iterable[str] = MODULES) -> list[str]:
    """The first ``count`` distinct prose sentences of the stdlib docstrings, in a fixed order.

    Args:
      count: number of sentences wanted (fewer are returned if the docstrings run out).
      exclude: sentences to leave out (e.g. a held-out evaluation set).
      modules: stdlib modules to read, in order.

    Returns:
      A list of at most ``count`` sentences.
    """
    seen = set(exclude)
    out: list[str] = []
    for doc in _docstrings(modules):
        for s in _sentences(doc):
            if s not in seen:
                seen.add(s)
                out.append(s)
                if len(out) == count:
                    return out
    return out
