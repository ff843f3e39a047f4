"""The fallback's lexer: literals and comments masked in text libpg_query cannot read.

Text that pglast cannot parse (truncated by ``track_activity_query_size``, garbage, non-UTF-8,
``<insufficient privilege>``, huge) is still exported and fingerprinted
(:func:`pgflow.ops.fingerprint.fallback_info`): :func:`fallback_normalize` gives it a simple
normalization that never fails and never lets a literal through.
"""

from __future__ import annotations

import re

_WS = re.compile(r"\s+")


def fold(text: str) -> str:
    """Runs of white space as one space, none at either end."""
    return _WS.sub(" ", text).strip()


_DOLLAR_TAG = re.compile(r"\$(?:[^\W\d]\w*)?\$")
_PARAM = re.compile(r"\$\d+")
_NUMBER = re.compile(r"(?:0[xob][0-9a-f_]+|(?:\d[\d_]*)?\.?\d[\d_]*(?:e[-+]?\d+)?)\w*", re.I)
_LIST = re.compile(r"\(\s*\?(?:\s*,\s*\?)+\s*\)")
# Spaces and operators (nothing starts there), or a name (digits and $ inside it are its own).
_SIMPLE = re.compile(r"[^-/'\"$.\w\x80-\U0010ffff]+|[^\W\d][\w$]*")
_STRING_PREFIXES = frozenset("eEbBxXnN")


def _string_end(text: str, quote: int, escapes: bool) -> int:
    """Where the string literal opened at ``quote`` ends (past its closing quote, or the end).

    A backslash in a standard string is ambiguous (``standard_conforming_strings`` may be
    off on the server), so the rest of the text is treated as the literal: hidden, not guessed.
    """
    j, n = quote + 1, len(text)
    while j < n:
        ch = text[j]
        if ch == "\\":
            if not escapes:
                return n
            j += 2
        elif ch == "'":
            if text.startswith("''", j):
                j += 2
            else:
                return j + 1
        else:
            j += 1
    return n


def mask(text: str) -> str:
    """Every literal (any quoting, dollar-quoted, numbers, parameters) to ``?``, comments out.

    A small lexer for text libpg_query cannot read (truncated, garbage, not UTF-8): it never
    fails, and whatever it cannot close (a literal, a comment, a quoted name) runs to the end
    of the text and is hidden, so a secret never survives because the text was broken.
    """
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        m = _SIMPLE.match(text, i)  # spaces, operators, a whole name: most of any text
        if m:
            word, j = m.group(), m.end()
            if j < n and text[j] == "'" and word in _STRING_PREFIXES:  # E'...', B'...', X'...', N'...'
                i = _string_end(text, j, escapes=word in "eE")
                out.append("?")
            elif word in ("u", "U") and text.startswith("&'", j):  # U&'...'
                i = _string_end(text, j + 1, escapes=False)
                out.append("?")
            else:
                out.append(word)
                i = j
            continue
        c = text[i]
        if text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
            out.append(" ")
        elif text.startswith("/*", i):
            j, depth = i + 2, 1
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            i = j
            out.append(" ")
        elif c == "'":
            i = _string_end(text, i, escapes=False)
            out.append("?")
        elif c == "$" and (m := _DOLLAR_TAG.match(text, i)):
            end = text.find(m.group(0), m.end())
            i = n if end < 0 else end + len(m.group(0))
            out.append("?")
        elif c == "$" and (m := _PARAM.match(text, i)):
            i = m.end()
            out.append("?")
        elif c == '"':
            j = i + 1
            while (j := text.find('"', j)) >= 0 and text.startswith('""', j):
                j += 2
            if j < 0:  # an unclosed quoted name: whatever follows may be a literal
                out.append("?")
                i = n
            else:
                out.append(text[i : j + 1])
                i = j + 1
        elif c.isdigit() or (c == "." and i + 1 < n and text[i + 1].isdigit()):
            m = _NUMBER.match(text, i)
            i = m.end() if m else i + 1
            out.append("?")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def fallback_normalize(text: str) -> str:
    """``text`` masked (:func:`mask`), folded, lower case, with lists of ``?`` folded to ``(?)``."""
    return _LIST.sub("(?)", fold(mask(text)).lower())
