"""CaseOps: a bijective, character-level text transform that factors capitalization out of the text.

The transformed text is lowercase; capitalization is written with four operator characters from the
Unicode private-use area, which a CaseOps tokenizer holds as user-defined pieces (each always one token):

    TITLE   = U+E001   the next letter run starts with a capital, the rest follows the run's own markers
    ALLCAPS = U+E002   every letter of the next run (two or more letters) is a capital
    CAPNEXT = U+E003   the next letter, inside a run, is a capital
    ESC     = U+E004   the next character is a literal operator character (or U+2581) of the original text

A *letter run* is a maximal run of case-pair letters (see "Which letters" below). What each case
pattern of a run becomes (`_` is a space, `T` `A` `C` `E` the operators; other blanks in the
"transformed" column only separate them for reading):

    pattern                          original     transformed       note
    lowercase (or no case-pair)      hello        hello             unchanged, no operator
    title case, 2+ letters           Hello        T hello
    single capital                   I            T i               a 1-letter run is title case, not all caps
    all caps, 2+ letters             NASA         A nasa
    all caps region of several runs  NEW YORK     A new_A york      one ALLCAPS per run (no region end marker)
    capital first, mixed after       McDonald     T mc C donald     TITLE for the first letter, CAPNEXT after
                                     OpenAI       T open C a C i
                                     ABc          T a C b c         (not all caps: ends lowercase)
    lowercase first, mixed after     iPhone       i C phone         CAPNEXT only
    letters split by a non-letter    Don't        T don't           apostrophe, digit, hyphen end the run:
                                     DON'T        A don'T t         "DON" and "T" are separate runs
                                     B2B          T b2T b
    operator char already in text    x<U+E001>y   x E <U+E001> y    escaped; ESC itself too (E E)
    SentencePiece's space mark U+2581 a▁b          a E ▁ b           escaped (see below)
    empty text                       ""           ""

Option op_before_space (off in the records' caseops_v1): a TITLE/ALLCAPS operator whose run follows a
space is written *before* that space, "The cat Sat" -> "T the cat T _sat" instead of "T the cat _T sat".
SentencePiece splits user-defined pieces out of the text, so in the records' form " Sat" becomes three
tokens ('▁', TITLE, 'sat'); with the operator before the space it is two (TITLE, '▁sat').

Which letters ("case pairs"). ASCII mode (default, the records' caseops_v1): A-Z <-> a-z only; every
other character is left as it is. Unicode mode (unicode_letters=True): every pair (C, c) with
C.isupper(), C.lower() == c a single lowercase character, c.upper() == C, and C and c of equal UTF-8
length. Everything else is left alone, which keeps the transform bijective and every non-operator
character the same UTF-8 length as the original character it stands for:

    Turkish İ (U+0130): lower() is 'i' + U+0307, two characters      -> left alone
    Turkish ı (dotless i): upper() is 'I', whose pair is 'i'        -> left alone (lowercase, not a pair)
    German ß: upper() is 'SS'; ẞ (U+1E9E): lower() 'ß' is 2 bytes, ẞ 3 -> both left alone
    Greek Σ <-> σ is a pair; final ς is not (its upper() Σ pairs with σ) -> 'ΟΔΟΣ' -> A οδοσ, 'ς' unchanged
    Titlecase digraphs ǅ ǈ ǋ ǲ: neither upper nor lower               -> left alone (Ǆ <-> ǆ is a pair)
    Kelvin sign K (U+212A): lower() is ASCII 'k', whose pair is 'K'  -> left alone
    Ⱥ (U+023A, 2 bytes) -> ⱥ (3 bytes): lengths differ               -> left alone

A left-alone character is not a letter for the run rules: 'STRAẞE' is the runs 'STRA' and 'E'
around 'ẞ'. The Unicode table comes from the running Python's unicodedata, so Unicode-mode shards
should be built and decoded with the same Python minor version (ASCII mode has no such dependence).

U+2581 ('▁') is escaped because SentencePiece shows every space as U+2581 and so decodes a literal
U+2581 as a space; after ESC the tokens still decode to ESC + ' ', which decode(..., from_sentencepiece=True)
reads back as U+2581, so tokens -> text is exact too. This is the only difference from the records'
lossless_caps_caseops_v1 in its default (ASCII, no option) form, which leaves U+2581 alone.

Byte accounting. Every non-operator character of the transformed text stands for exactly one original
character of the same UTF-8 length, an operator stands for nothing (0 bytes), and an escaped literal
(an operator character or U+2581) for its own 3 bytes. byte_costs() returns that per-character count; it sums to the UTF-8 length
of the original text.

decode() accepts exactly the strings encode() produces (it raises ValueError on anything else, e.g. a
dangling operator or an uppercase case-pair letter), so decode(encode(x)) == x for every string x and
encode(decode(t)) == t whenever decode(t) succeeds.

    from data.caseops import CaseOps, encode, decode     # or: import caseops (data/ on sys.path)
    t = encode("The NASA iPhone")      # '\\ue001the \\ue002nasa i\\ue003phone'
    decode(t)                          # 'The NASA iPhone'
    CaseOps(op_before_space=True).encode("The NASA")   # '\\ue001the\\ue002 nasa'
"""
from __future__ import annotations

import functools
import re

import numpy as np

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
SPACE_MARK = "\u2581"  # SentencePiece's space symbol: a literal one in the text is escaped too
ESCAPED = frozenset(OPERATORS + (SPACE_MARK,))
_OPS_CLASS = "\ue001-\ue004"
BASE_NAME = "caseops_v1"
# scheme name -> (unicode_letters, op_before_space)
SCHEMES = {BASE_NAME: (False, False), BASE_NAME + "_opspace": (False, True),
           BASE_NAME + "_unicode": (True, False), BASE_NAME + "_unicode_opspace": (True, True)}


@functools.lru_cache(maxsize=None)
def case_pairs(unicode_letters: bool) -> dict[str, str]:
    """{uppercase: lowercase} for every case pair the transform uses (see the module docstring)."""
    if not unicode_letters:
        return {chr(c): chr(c + 32) for c in range(ord("A"), ord("Z") + 1)}
    pairs = {}
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        up = chr(cp)
        if not up.isupper():
            continue
        low = up.lower()
        if (len(low) == 1 and low != up and low.islower() and low.upper() == up
                and len(low.encode("utf-8")) == len(up.encode("utf-8")) and low not in OPERATORS):
            pairs[up] = low
    return pairs


def _char_class(chars) -> str:
    """A regex character class body for `chars` (code point ranges merged)."""
    cps = sorted(ord(c) for c in chars)
    out, i = [], 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        lo, hi = re.escape(chr(cps[i])), re.escape(chr(cps[j]))
        out.append(lo if i == j else f"{lo}-{hi}")
        i = j + 1
    return "".join(out)


class CaseOps:
    """One CaseOps scheme: `unicode_letters` (case pairs beyond ASCII) and `op_before_space`.

    CaseOps() is the records' caseops_v1 (ASCII letters, operator right before its run).
    """

    def __init__(self, unicode_letters: bool = False, op_before_space: bool = False):
        self.unicode_letters, self.op_before_space = bool(unicode_letters), bool(op_before_space)
        pairs = case_pairs(self.unicode_letters)
        self._upper = frozenset(pairs)
        self._lower = frozenset(pairs.values())
        if self.unicode_letters:
            to_lower, to_upper = str.maketrans(pairs), str.maketrans({v: k for k, v in pairs.items()})
            self._lower_of = lambda s: s.translate(to_lower)
            self._upper_of = lambda s: s.translate(to_upper)
        else:  # only ASCII letters reach these: str.lower/upper are the pair maps there, and fast
            self._lower_of, self._upper_of = str.lower, str.upper
        self._letters = self._upper | self._lower
        up, low = _char_class(self._upper), _char_class(self._lower)
        # Both directions scan for the rare characters that need work (capitals, operators) with one
        # character-class regex, then handle each hit's letter run in Python.
        self._enc_hit = re.compile(f"[{_OPS_CLASS}{SPACE_MARK}{up}]")
        self._run_rest = re.compile(f"[{up}{low}]*")
        self._dec_hit = re.compile(f"[{_OPS_CLASS}{up}]")
        self._dec_run = re.compile(f"[{low}](?:{re.escape(CAPNEXT)}?[{low}])*")

    @property
    def name(self) -> str:
        return BASE_NAME + ("_unicode" if self.unicode_letters else "") + ("_opspace" if self.op_before_space else "")

    @classmethod
    def from_name(cls, name: str) -> "CaseOps":
        """The scheme called `name`: one of SCHEMES."""
        if name not in SCHEMES:
            raise ValueError(f"unknown CaseOps scheme {name!r}; known: {', '.join(SCHEMES)}")
        return cls(*SCHEMES[name])

    def __repr__(self) -> str:
        return f"CaseOps({self.name})"

    # ------------------------------------------------------------------ encode
    def _encode_run(self, w: str) -> tuple[str, str]:
        """(operator or '', lowercase body with CAPNEXTs) for a letter run `w` holding a capital."""
        low = self._lower_of(w)
        if len(w) >= 2 and w.isupper():          # every letter a capital (all run letters are cased)
            return ALLCAPS, low
        if w[0] in self._upper and (len(w) == 1 or w[1:].islower()):
            return TITLE, low
        body = low[0] + "".join(CAPNEXT + lc if oc in self._upper else lc for oc, lc in zip(w[1:], low[1:]))
        return (TITLE if w[0] in self._upper else ""), body

    def encode(self, text: str) -> str:
        """The transformed (lowercase + operators) form of `text`."""
        out, last = [], 0                        # text[:last] is done
        letters = self._letters
        for m in self._enc_hit.finditer(text):
            p = m.start()
            if p < last:                          # a capital inside a run already written
                continue
            ch = text[p]
            if ch in ESCAPED:
                out += (text[last:p], ESC, ch)
                last = p + 1
                continue
            s = p                                 # the run starts at its lowercase prefix, if any
            while s > last and text[s - 1] in letters:
                s -= 1
            e = self._run_rest.match(text, p).end()
            op, body = self._encode_run(text[s:e])
            if op and self.op_before_space and s > last and text[s - 1] == " ":
                out += (text[last:s - 1], op, " ", body)
            else:
                out += (text[last:s], op, body)
            last = e
        out.append(text[last:])
        return "".join(out)

    # ------------------------------------------------------------------ decode
    def decode(self, text: str, from_sentencepiece: bool = False) -> str:
        """The original text of a transformed `text`; ValueError if `text` is not an encode() output.

        from_sentencepiece: `text` is a SentencePiece decode of CaseOps tokens, which shows the escaped
        U+2581 of ESC + U+2581 as a space: read ESC + ' ' as U+2581 too.
        """
        out, last = [], 0
        lower = self._lower
        for m in self._dec_hit.finditer(text):
            p = m.start()
            if p < last:                          # a CAPNEXT inside a run, or an escaped literal, done
                continue
            ch = text[p]
            if ch == ESC:
                lit = text[p + 1:p + 2]
                if from_sentencepiece and lit == " ":
                    lit = SPACE_MARK
                if not lit or lit not in ESCAPED:
                    raise ValueError(f"ESC at {p} is not followed by an operator character or U+2581")
                out += (text[last:p], lit)
                last = p + 2
            elif ch == TITLE or ch == ALLCAPS:
                q, sp = p + 1, ""
                if self.op_before_space and text[q:q + 1] == " ":
                    q, sp = q + 1, " "
                elif p and (text[p - 1] in lower or (self.op_before_space and text[p - 1] == " ")):
                    raise ValueError(f"operator at {p} is not at the start of a letter run")
                run = self._dec_run.match(text, q)
                if run is None:
                    raise ValueError(f"operator U+{ord(ch):04X} at {p} has no letter run to apply to")
                w = run.group()
                letters = w.replace(CAPNEXT, "")
                if ch == ALLCAPS:
                    if len(letters) < 2 or len(letters) != len(w):
                        raise ValueError(f"ALLCAPS at {p} needs a run of 2+ letters without CAPNEXT")
                    dec = self._upper_of(w)
                else:
                    if len(letters) >= 2 and len(w) - len(letters) == len(letters) - 1:
                        raise ValueError(f"TITLE at {p} marks an all-caps run (ALLCAPS is its encoding)")
                    dec = self._capnext(self._upper_of(w[0]) + w[1:])
                out += (text[last:p], sp, dec)
                last = run.end()
            elif ch == CAPNEXT:
                s = p                             # a run with a lowercase first letter
                while s > last and text[s - 1] in lower:
                    s -= 1
                run = self._dec_run.match(text, s) if s < p else None
                if run is None or run.end() <= p + 1:
                    raise ValueError(f"CAPNEXT at {p} is not inside a letter run")
                out += (text[last:s], self._capnext(run.group()))
                last = run.end()
            else:
                raise ValueError(f"uppercase letter {ch!r} at {p}: transformed text is lowercase")
        out.append(text[last:])
        return "".join(out)

    def _capnext(self, s: str) -> str:
        parts = s.split(CAPNEXT)
        return parts[0] + "".join(self._upper_of(p[0]) + p[1:] for p in parts[1:])

    # ------------------------------------------------------------- accounting
    def byte_costs(self, text: str) -> np.ndarray:
        """Original UTF-8 bytes each character of the transformed `text` stands for (int32, one per char).

        An operator acting as one costs 0; every other character (an escaped literal operator included)
        costs its own UTF-8 length, which equals that of the original character. The sum is the UTF-8
        length of decode(text).
        """
        return byte_costs(text)


def utf8_lengths(text: str) -> np.ndarray:
    """UTF-8 length of each character of `text` (int32)."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    return (1 + (cp >= 0x80).astype(np.int32) + (cp >= 0x800) + (cp >= 0x10000)).astype(np.int32)


def acting_operators(text: str) -> np.ndarray:
    """Indices of the characters of transformed `text` that act as operators (not escaped literals)."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    idx = np.flatnonzero((cp >= 0xE001) & (cp <= 0xE004))
    if ESC not in text:
        return idx
    keep, escaped = [], False
    for i in idx.tolist():   # only texts that held operator characters get here
        if escaped and i == prev + 1:
            escaped = False  # the literal after an acting ESC
            prev = i
            continue
        keep.append(i)
        escaped, prev = text[i] == ESC, i
    return np.asarray(keep, dtype=np.int64)


def byte_costs(text: str) -> np.ndarray:
    """See CaseOps.byte_costs (the costs do not depend on the scheme)."""
    costs = utf8_lengths(text)
    costs[acting_operators(text)] = 0
    return costs


DEFAULT = CaseOps()
encode = DEFAULT.encode
decode = DEFAULT.decode
