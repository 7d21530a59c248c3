"""Text domains scored in bits per byte, all from what this Python ships (no download).

  python   the standard library's `.py` sources (test directories and the documentation
           module `pydoc_data` left out), one item per file
  prose    English: the language reference and library topics of `pydoc_data.topics` (the
           text of `help()`), one item per paragraph
  unicode  the Unicode character database: lines `U+00E9 LATIN SMALL LETTER E WITH ACUTE Ll`,
           one item per block of 256 code points
"""

from __future__ import annotations

import functools
import unicodedata

from jmoe.data.corpus import EXCLUDED_DIRS, stdlib_root, walk_files
from jmoe.evals.base import Task, register_task


@functools.lru_cache(maxsize=1)
def python_items() -> tuple[str, ...]:
    """The standard library's sources, one string per file (sorted paths)."""
    root = stdlib_root()
    files = walk_files(root, (".py",), EXCLUDED_DIRS | {"pydoc_data"})
    out = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            out.append(text)
    return tuple(out)


@functools.lru_cache(maxsize=1)
def prose_items() -> tuple[str, ...]:
    """The paragraphs of the `help()` topics, topics in name order."""
    from pydoc_data.topics import topics

    return tuple(p.strip() for k in sorted(topics) for p in topics[k].split("\n\n") if p.strip())


@functools.lru_cache(maxsize=1)
def unicode_items() -> tuple[str, ...]:
    """One string per block of 256 code points with names: a line per named character."""
    out = []
    for block in range(0x110000 // 256):
        lines = []
        for cp in range(block * 256, block * 256 + 256):
            name = unicodedata.name(chr(cp), "")
            if name:
                lines.append(f"U+{cp:04X} {name} {unicodedata.category(chr(cp))}")
        if lines:
            out.append("\n".join(lines))
    return tuple(out)


register_task(Task("python", "bits_per_byte", "Python source of the standard library", items=lambda: list(python_items())))
register_task(Task("prose", "bits_per_byte", "English documentation prose (pydoc topics)", items=lambda: list(prose_items())))
register_task(Task("unicode", "bits_per_byte", "Unicode character names and categories", items=lambda: list(unicode_items())))
