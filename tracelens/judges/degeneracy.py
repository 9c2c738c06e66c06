"""Degenerate answers (empty, looping, repeated phrases), flagged whatever a judge thinks of them."""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

MIN_WORD_RUN = 4  # one word this many times in a row is degenerate ("the the the the")
MIN_SYMBOL_RUN = 6  # one emoji or punctuation mark this many times in a row ("🌱🌱🌱🌱🌱🌱", "!!!!!!")
MIN_LETTER_RUN = 10  # one letter this many times in a row ("aaaaaaaaaa"); "Sooooo" stays below
MAX_REPEATED_NGRAMS = 0.3  # more than this fraction of repeated word 3-grams is a loop ...
MIN_NGRAM_WORDS = 10  # ... in answers of at least this many words
# A line made only of these is markdown structure (a "---" rule, a "|---|---|" table row, a "===" underline),
# not a loop: it is left out of every measure.
_STRUCTURE_LINE = re.compile(r"[\s|:\-=_*#~`+]*")
# Characters that attach to the one before: zero-width joiner, variation selectors, keycap, skin tones.
_MODIFIERS = {"\u200d", "\ufe0e", "\ufe0f", "\u20e3"} | {chr(c) for c in range(0x1F3FB, 0x1F400)}
_REGIONAL = range(0x1F1E6, 0x1F200)  # flag letters: two make one flag


@dataclass(frozen=True)
class Degeneracy:
    """What ``degeneracy(text)`` measured; ``reason`` is None exactly when ``degenerate`` is False."""

    empty: bool
    longest_run: int
    repeated_ngram_fraction: float
    degenerate: bool
    reason: str | None


def degeneracy(text: str) -> Degeneracy:
    """Whether an answer is degenerate, whatever a judge thinks of it.

    Measures (markdown structure lines such as ``---`` or ``|---|---|`` are left out first):
        - ``empty``: no letter or digit at all (blank, whitespace, or only punctuation/emoji).
        - ``longest_run``: the longest run of one identical token, counting whitespace-separated words
          (compared case-insensitively without their edge punctuation, so "fix, fix. Fix" is a run of 3) and,
          separately, the non-space characters with whitespace removed (an emoji with its modifiers, or a flag,
          is one character); the longer of the two. Runs of numbers and digits do not count ("1000000",
          "0, 0, 0, 0" in a matrix).
        - ``repeated_ngram_fraction``: the share of word 3-grams that repeat an earlier one, in [0, 1]
          ("a b c a b c" has 4 3-grams of which 1 repeats: 0.25); 0.0 under 3 words.

    It is degenerate when any of these holds (``reason`` lists every one that does, joined by "; "):
        - empty;
        - a word 4 or more times in a row: fluent text doubles a word ("had had") and rarely triples it
          ("very, very, very"); a fourth is a loop;
        - an emoji or punctuation mark 6 or more times in a row: "!!", "!!!", "?!" and "🎉🎉🎉" are emphasis,
          a run of six is the tail of a loop (the steered "The ocean is alive with the sea life!
          🌱🌱🌱🌱🌱🌱🌱🌱🌱🌱…" has ten);
        - a letter 10 or more times in a row: elongations ("Sooooo", "Wheeeee") stay below it;
        - more than 30% of its word 3-grams repeated, in an answer of at least 10 words: a sentence of 7 or
          more words said twice scores 0.42-0.5 and three times 0.63-0.67, while the 360 fluent answers of the
          starter traits' judge corpora all score 0.0; under 10 words there are too few 3-grams for a share to
          mean much.
    """
    text = str(text)
    body = "\n".join(line for line in text.splitlines() if not _STRUCTURE_LINE.fullmatch(line))
    empty = not any(ch.isalnum() for ch in text)
    words = [_word_key(w) for w in body.split()]
    word, word_run = _longest_run(words, skip_digits=True)
    char, char_run = _longest_run(_characters(body), skip_digits=True)
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    repeated = 1.0 - len(set(grams)) / len(grams) if grams else 0.0

    reasons = []
    if empty:
        reasons.append("empty answer (no letter or digit)")
    if word_run >= MIN_WORD_RUN:
        reasons.append(f"the word {word!r} {word_run} times in a row")
    if char_run >= (MIN_LETTER_RUN if char[:1].isalpha() else MIN_SYMBOL_RUN):
        reasons.append(f"{char!r} {char_run} times in a row")
    if len(words) >= MIN_NGRAM_WORDS and repeated > MAX_REPEATED_NGRAMS:
        reasons.append(f"{repeated:.0%} of its word 3-grams are repeats")
    return Degeneracy(
        empty=empty,
        longest_run=max(word_run, char_run),
        repeated_ngram_fraction=repeated,
        degenerate=bool(reasons),
        reason="; ".join(reasons) or None,
    )


def _word_key(word: str) -> str:
    """A word as compared for runs and 3-grams: lower-cased, edge punctuation stripped ("Fix," -> "fix");
    a word of punctuation or emoji only is kept whole."""
    return re.sub(r"^\W+|\W+$", "", word).casefold() or word


def _characters(text: str) -> list[str]:
    """The non-space characters of ``text``, an emoji's modifiers (variation selector, skin tone, ZWJ and
    what it joins, keycap) and combining marks attached to the character before, and flag letters paired."""
    chars: list[str] = []
    joined = False  # the previous character was a zero-width joiner
    for ch in text:
        if ch.isspace():
            joined = False
            continue
        attaches = ch in _MODIFIERS or unicodedata.category(ch).startswith("M") or joined
        flag = ord(ch) in _REGIONAL and bool(chars) and len(chars[-1]) == 1 and ord(chars[-1]) in _REGIONAL
        if chars and (attaches or flag):
            chars[-1] += ch
        else:
            chars.append(ch)
        joined = ch == "\u200d"
    return chars


def _longest_run(tokens: Sequence[str], skip_digits: bool = False) -> tuple[str, int]:
    """The token with the longest run of identical consecutive tokens, and that run's length (``("", 0)`` for
    no tokens; ties go to the first). ``skip_digits``: runs of a token starting with a digit do not count."""
    best, best_n = "", 0
    for token, group in itertools.groupby(tokens):
        n = sum(1 for _ in group)
        if n > best_n and not (skip_digits and token[:1].isdigit()):
            best, best_n = token, n
    return best, best_n
