"""Specific Character Set (0008,0005): what the text of a dataset says, and how the node's
result objects carry it.

Reading. ``normalise`` turns whatever a modality or PACS wrote into the defined terms of
PS3.3 C.12.1.1.2: single-byte sets (``ISO_IR 100`` ... ``ISO_IR 166``, ``ISO_IR 13``), the
same with code extensions (``ISO 2022 IR 6`` ... ``ISO 2022 IR 166``), the multi-byte sets
that need code extensions (``ISO 2022 IR 87``, ``159``, ``149``, ``58``) and the stand-alone
multi-byte sets (``ISO_IR 192``, ``GB18030``, ``GBK``). Spellings seen in the field map to
them: case and blanks do not matter (``iso_ir  100``), ``ISO-IR 149`` / ``ISO2022 IR 149`` /
``ISO_IR 149`` (Korean without the code-extension form), a multi-byte set as value 1
(``ISO 2022 IR 149`` alone becomes ``\\ISO 2022 IR 149``), and codec names
(``EUC-KR``, ``KS_C_5601-1987``, ``cp949``, ``UTF-8``, ``utf8``, ``GB2312``, ``Shift_JIS``,
``latin1``, ``ISO-8859-5``, ...). A value the node cannot map leaves the set unknown.

``CharacterSet.decode`` decodes one element value itself instead of leaving it to pydicom,
whose decoder falls back to Latin-1 with only a warning ("Unknown encoding ... using
default encoding instead") for every spelling above it does not know, and reads text
without escape sequences with value 1's set only, so ``\\ISO 2022 IR 149`` text written
as plain EUC-KR (common in Korean data) came out as Latin-1 mojibake. The decoder follows
ISO 2022 as PS3.5 6.1.2.5 uses it: value 1 gives the initial G0 / G1 sets, escape
sequences (PS3.3 Tables C.12-3 and C.12-4) designate others, and CR, LF, FF, TAB, the
value separator and in PN ``^`` and ``=`` return to the initial sets. Leniently (reading a
source), when value 1 has no G1 set and exactly one double-byte G1 set (KS X 1001 or GB
2312) is declared, bytes above 0x7F before any escape belong to it, and KS X 1001 / GB 2312
are read as their Windows supersets (cp949, GBK). Strictly (checking what the node
writes), none of that applies. Text without a declared set (default repertoire) is read
byte for byte as Latin-1, as pydicom and most readers do, so non-ASCII bytes a modality
sent without declaring a set are carried to the results unchanged. Bytes the set cannot
decode become U+FFFD and the element is reported as undecodable.

``decode_dataset`` applies that to every text element (SH, LO, ST, LT, UT, UC, PN: PS3.5
6.1.2.3) of a dataset read by pydicom, in place, and replaces (0008,0005) by its defined
terms, so anything pydicom decodes later never guesses either; a spelling it understands is
also registered with pydicom, which then reads later files in it without warning.

Writing. ``prepare_source`` gives a writer a decoded copy of the first source image (the
one writers take patient and study attributes from); ``settle_output`` then picks the
character set of the built object: the source's own set (as defined terms) when pydicom's
encoder writes every text value of the object in it so that it decodes back to the same
string, else ISO_IR 192 (UTF-8), which carries any text, reported as ``OutputCharacterSet``
with ``transcoded`` and the reason. Without a declared set, only the source's own bytes pass
through unchanged; text of the writer's that is not ASCII makes it ISO_IR 192. It refuses
(``CharacterSetError``) when text the object would carry could not be decoded from the
source: the node never sends a name it had to guess.
"""

from __future__ import annotations

import codecs
import copy
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydicom import charset as pydicom_charset
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName

from inference.volume import SeriesReadError

logger = logging.getLogger(__name__)

SPECIFIC_CHARACTER_SET = BaseTag(0x00080005)
UTF8 = "ISO_IR 192"

# Value representations whose values (0008,0005) applies to (PS3.5 6.1.2.3).
TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})
# Of those, the ones where a backslash separates values.
_MULTI_VALUED_VRS = frozenset({"SH", "LO", "UC", "PN"})

_ESC = 0x1B
_CONTROL_DELIMITERS = frozenset(b"\r\n\x0c\t")


# pydicom 3.0 lacks Latin alphabet No. 9 (ISO_IR 203, PS3.3 Table C.12-2): it would write
# such text as Latin-1 with only a warning, and the two differ in eight characters (the
# euro sign among them). Registered here so the writers encode it as the standard says.
for _term in ("ISO_IR 203", "ISO 2022 IR 203"):
    pydicom_charset.python_encoding.setdefault(_term, "iso8859_15")
pydicom_charset.CODES_TO_ENCODINGS.setdefault(b"\x1b-b", "iso8859_15")
pydicom_charset.ENCODINGS_TO_CODES.setdefault("iso8859_15", b"\x1b-b")


class CharacterSetError(SeriesReadError):
    """Text of a source series cannot be decoded, so no result can carry it faithfully.

    A retry would fail the same way, so the job fails at once with this reason.
    """


# --- graphic character sets (PS3.3 Tables C.12-2 to C.12-5) --------------------------------


@dataclass(frozen=True)
class _GraphicSet:
    """A graphic character set in G0 (bytes 0x21-0x7E) or G1 (bytes 0xA0-0xFF)."""

    name: str
    double: bool  # two bytes per character
    codec: str  # strict decoding
    lenient_codec: str  # decoding a source: a superset seen in the field
    designation: bytes  # for G0 double-byte sets: prefixed so the Python codec knows it


_ASCII = _GraphicSet("ISO-IR 6", False, "ascii", "ascii", b"")
_ROMAJI = _GraphicSet("JIS X 0201 Romaji", False, "shift_jis", "shift_jis", b"")
_JIS_X_0208 = _GraphicSet("JIS X 0208", True, "iso2022_jp", "iso2022_jp", b"\x1b$B")
_JIS_X_0212 = _GraphicSet("JIS X 0212", True, "iso2022_jp_2", "iso2022_jp_2", b"\x1b$(D")
_KATAKANA = _GraphicSet("JIS X 0201 Katakana", False, "shift_jis", "cp932", b"")
_KS_X_1001 = _GraphicSet("KS X 1001", True, "euc_kr", "cp949", b"")
_GB_2312 = _GraphicSet("GB 2312", True, "gb2312", "gbk", b"")


def _single(name: str, codec: str) -> _GraphicSet:
    return _GraphicSet(name, False, codec, codec, b"")


# Single-byte sets: IR number -> (G1 set, final byte of its ESC 02/13 designation).
_SINGLE_BYTE: dict[int, tuple[_GraphicSet, bytes]] = {
    100: (_single("ISO 8859-1", "latin_1"), b"A"),
    101: (_single("ISO 8859-2", "iso8859_2"), b"B"),
    109: (_single("ISO 8859-3", "iso8859_3"), b"C"),
    110: (_single("ISO 8859-4", "iso8859_4"), b"D"),
    144: (_single("ISO 8859-5", "iso8859_5"), b"L"),
    127: (_single("ISO 8859-6", "iso8859_6"), b"G"),
    126: (_single("ISO 8859-7", "iso8859_7"), b"F"),
    138: (_single("ISO 8859-8", "iso8859_8"), b"H"),
    148: (_single("ISO 8859-9", "iso8859_9"), b"M"),
    203: (_single("ISO 8859-15", "iso8859_15"), b"b"),
    166: (_single("TIS 620-2533", "tis_620"), b"T"),
}
# Multi-byte sets that exist only with code extensions: IR number -> (register, set).
_MULTI_BYTE: dict[int, tuple[int, _GraphicSet]] = {
    87: (0, _JIS_X_0208),
    159: (0, _JIS_X_0212),
    149: (1, _KS_X_1001),
    58: (1, _GB_2312),
}
# Stand-alone multi-byte sets (no code extensions) -> Python codec.
_STAND_ALONE = {UTF8: "utf-8", "GB18030": "gb18030", "GBK": "gbk"}

# Escape sequence -> (register 0 = G0 / 1 = G1, set designated).
_ESCAPES: dict[bytes, tuple[int, _GraphicSet]] = {
    b"\x1b(B": (0, _ASCII),
    b"\x1b(J": (0, _ROMAJI),
    b"\x1b$B": (0, _JIS_X_0208),
    b"\x1b$(D": (0, _JIS_X_0212),
    b"\x1b)I": (1, _KATAKANA),
    b"\x1b$)C": (1, _KS_X_1001),
    b"\x1b$)A": (1, _GB_2312),
    **{b"\x1b-" + final: (1, g1) for g1, final in _SINGLE_BYTE.values()},
}

# Codec names (Python's canonical name after codecs.lookup) -> (defined terms that carry
# the same repertoire, codec that decodes text written without escape sequences).
_CODEC_TERMS: dict[str, tuple[tuple[str, ...], str]] = {
    "iso8859-1": (("ISO_IR 100",), "latin_1"),
    "iso8859-2": (("ISO_IR 101",), "iso8859_2"),
    "iso8859-3": (("ISO_IR 109",), "iso8859_3"),
    "iso8859-4": (("ISO_IR 110",), "iso8859_4"),
    "iso8859-5": (("ISO_IR 144",), "iso8859_5"),
    "iso8859-6": (("ISO_IR 127",), "iso8859_6"),
    "iso8859-7": (("ISO_IR 126",), "iso8859_7"),
    "iso8859-8": (("ISO_IR 138",), "iso8859_8"),
    "iso8859-9": (("ISO_IR 148",), "iso8859_9"),
    "iso8859-15": (("ISO_IR 203",), "iso8859_15"),
    "tis-620": (("ISO_IR 166",), "tis_620"),
    "cp1252": (("ISO_IR 100",), "cp1252"),
    "utf-8": ((UTF8,), "utf-8"),
    "gb18030": (("GB18030",), "gb18030"),
    "gbk": (("GBK",), "gbk"),
    "gb2312": (("", "ISO 2022 IR 58"), "gbk"),
    "euc_kr": (("", "ISO 2022 IR 149"), "cp949"),
    "cp949": (("", "ISO 2022 IR 149"), "cp949"),
    "shift_jis": (("ISO 2022 IR 13", "ISO 2022 IR 87"), "cp932"),
    "cp932": (("ISO 2022 IR 13", "ISO 2022 IR 87"), "cp932"),
    "euc_jp": (("", "ISO 2022 IR 87"), "euc_jp"),
    "iso2022_jp": (("", "ISO 2022 IR 87"), "iso2022_jp"),
}
# Field spellings Python's codec registry does not know (compact: letters and digits only).
_CODEC_ALIASES = {
    "WINDOWS949": "cp949",
    "KSX1001": "euc_kr",
    "KSC56011989": "euc_kr",
    "WINDOWS31J": "cp932",
    "MSKANJI": "cp932",
    "UNICODE": "utf-8",
    "ISO10646": "utf-8",
    "ISO2022GBK": "gbk",  # pydicom's reading of CP 1234
    "ISO202258": "gb2312",
    "GB180302000": "gb18030",
    "GB180302005": "gb18030",
    "GB180302022": "gb18030",
    "ISO646": "ascii",
    "ISO646US": "ascii",
}
_IR_NUMBER = re.compile(r"(?:ISO)?(2022)?IR(\d+)")


@dataclass(frozen=True)
class _Term:
    """One value of (0008,0005), understood."""

    term: str  # the defined term; "" for the default repertoire
    number: int | None = None  # ISO-IR registration number, for ISO 2022 sets
    stand_alone: bool = False
    codec: str | None = None  # the source named a codec rather than a defined term
    codec_terms: tuple[str, ...] | None = None  # what carries that codec's repertoire


def _parse_value(value: str) -> _Term | None:
    """One value of (0008,0005), however spelled; None when it names no known set."""
    text = value.strip(" \x00")
    if not text:
        return _Term("")
    compact = re.sub(r"[^0-9A-Z]", "", text.upper())
    match = _IR_NUMBER.fullmatch(compact)
    if match:
        extension, number = bool(match[1]), int(match[2])
        if number == 6:
            return _Term("ISO 2022 IR 6" if extension else "", 6)
        if number == 13 or number in _SINGLE_BYTE:
            return _Term(f"ISO 2022 IR {number}" if extension else f"ISO_IR {number}", number)
        if number in _MULTI_BYTE:
            return _Term(f"ISO 2022 IR {number}", number)
        if number == 192:
            return _Term(UTF8, stand_alone=True)
        return None
    if compact in ("GB18030", "GBK"):
        return _Term(compact, stand_alone=True)
    info = None
    for codec_name in (_CODEC_ALIASES.get(compact, text), compact):  # GB-2312 -> GB2312
        try:
            info = codecs.lookup(codec_name)
            break
        except LookupError:
            continue
    if info is None:
        return None
    if not getattr(info, "_is_text_encoding", True):
        return None  # rot13, base64 and the like
    if info.name == "ascii":
        return _Term("", 6)
    terms, codec = _CODEC_TERMS.get(info.name, (None, info.name))
    if terms is not None and len(terms) == 1 and terms[0] in _STAND_ALONE:
        return _Term(terms[0], stand_alone=True)  # utf8, gbk, ...: the defined term itself
    return _Term(text, codec=codec, codec_terms=terms)


def _in_extension_form(term: _Term) -> str:
    """The code-extension spelling of a single-byte term (multi-valued values need it)."""
    if term.number is None or term.term == "":
        return term.term
    return f"ISO 2022 IR {term.number}"


@dataclass(frozen=True)
class CharacterSet:
    """A Specific Character Set as the node understands it.

    ``declared``: the values as received (blank-stripped); () when absent. ``terms``: the
    same as defined terms (PS3.3 C.12.1.1.2; value 1 may be "" for the default
    repertoire), () for the default repertoire. ``writable``: the value a result writes to
    carry this text as is (single code-extension terms in their plain form), None when no
    defined term does (an unknown value, or a codec with no DICOM equivalent).
    ``known``: every value was understood. ``codec``: the source named a codec, which
    decodes its text when the text has no escape sequences. ``notes``: spelling
    corrections, one line each.
    """

    declared: tuple[str, ...] = ()
    terms: tuple[str, ...] = ()
    writable: tuple[str, ...] | None = ()
    known: bool = True
    codec: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """The declared value as DICOM writes it (values joined by a backslash)."""
        return "\\".join(self.declared) if self.declared else "(none)"

    @property
    def stand_alone_codec(self) -> str | None:
        return _STAND_ALONE.get(self.terms[0]) if len(self.terms) == 1 else None

    def _initial(self, strict: bool) -> tuple[_GraphicSet, _GraphicSet | None]:
        """G0 and G1 at the start of a value, after each delimiter."""
        first = self.terms[0] if self.terms else ""
        number = _term_number(first)
        if number == 13:
            return _ROMAJI, _KATAKANA
        if number in _SINGLE_BYTE:
            return _ASCII, _SINGLE_BYTE[number][0]
        if strict:
            return _ASCII, None
        # Lenient: G1 text written without its escape sequence, when only one
        # double-byte G1 set is declared and nothing else could be meant.
        g1_sets = [
            _MULTI_BYTE[n][1]
            for n in map(_term_number, self.terms[1:])
            if n in _MULTI_BYTE and _MULTI_BYTE[n][0] == 1
        ]
        single_g1 = [n for n in map(_term_number, self.terms[1:]) if n in _SINGLE_BYTE]
        if len(g1_sets) == 1 and not single_g1:
            return _ASCII, g1_sets[0]
        return _ASCII, None

    def decode(self, raw: bytes, vr: str, *, strict: bool = False) -> tuple[str, bool]:
        """Decode one encoded value of a text VR (backslashes included) to a string.

        Returns (text, ok); ok is False when some bytes could not be decoded (they become
        U+FFFD). ``strict`` decodes as PS3.5 6.1.2.5 reads it, for checking what the node
        writes; without it, a source's text is read with the leniency described in the
        module docstring.
        """
        raw = raw.rstrip(b"\x00")
        if not raw:
            return "", True
        codec = self.stand_alone_codec
        # A named codec reads text without escape sequences (or any text, when no defined
        # term covers it).
        named = self.codec is not None and not strict and (_ESC not in raw or not self.terms)
        if codec is None and named:
            codec = self.codec
        if codec is not None:
            return _decode_with(raw, codec)
        if _ESC not in raw and max(raw) < 0x80:
            return raw.decode("ascii"), True
        # Default repertoire: bytes above 0x7F are not defined; read them byte for byte
        # (Latin-1), as pydicom does, so they reach results unchanged. Not for a set
        # the node does not know: there they could mean anything.
        latin1 = not self.terms and self.known
        if latin1 and _ESC not in raw:
            return raw.decode("latin_1"), True
        delimiters = set(_CONTROL_DELIMITERS)
        if vr in _MULTI_VALUED_VRS:
            delimiters.add(ord("\\"))
        if vr == "PN":
            delimiters.update(b"^=")
        return _decode_iso2022(raw, self._initial(strict), delimiters, strict, latin1)

    def carries(self, text: str, vr: str) -> bool:
        """Whether pydicom, writing ``text`` (one element value) in this set, writes bytes
        that decode back to ``text`` (PS3.5 6.1.2.5, strictly). Only for sets with
        ``writable`` terms."""
        if text.isascii():
            return True  # every value 1 starts with ASCII (or JIS X 0201 Romaji) in G0
        if self.writable is None:
            return False
        encodings = pydicom_charset.convert_encodings(list(self.writable) or None)
        values = text.split("\\") if vr in _MULTI_VALUED_VRS else [text]
        for value in values:
            if not all(any(_encodable(ch, enc) for enc in encodings) for ch in value):
                return False
            encoded = (
                PersonName(value).encode(encodings)
                if vr == "PN"
                else pydicom_charset.encode_string(value, encodings)
            )
            decoded, ok = self.decode(encoded, vr, strict=True)
            if not ok or _comparable(decoded, vr) != _comparable(value, vr):
                return False
        return True


def _term_number(term: str) -> int | None:
    match = re.fullmatch(r"ISO(?:_| 2022 )IR (\d+)", term)
    return int(match[1]) if match else None


def _comparable(text: str, vr: str) -> str:
    """PN: trailing empty component groups carry no meaning (pydicom drops them)."""
    return text.rstrip("=") if vr == "PN" else text


def _encodable(ch: str, encoding: str) -> bool:
    # pydicom's own per-encoding encoder, so the check matches what it will write.
    try:
        pydicom_charset._encode_string_impl(ch, encoding)
    except (UnicodeError, ValueError, LookupError):
        return False
    return True


def _decode_with(raw: bytes, codec: str) -> tuple[str, bool]:
    try:
        return raw.decode(codec), True
    except UnicodeDecodeError:
        return raw.decode(codec, errors="replace"), False


def _decode_iso2022(
    raw: bytes,
    initial: tuple[_GraphicSet, _GraphicSet | None],
    delimiters: set[int],
    strict: bool,
    default_repertoire: bool,
) -> tuple[str, bool]:
    """ISO 2022 decoding with DICOM's rules (PS3.5 6.1.2.5.3), byte by byte."""
    g0, g1 = initial
    out: list[str] = []
    ok = True
    i, n = 0, len(raw)
    while i < n:
        byte = raw[i]
        if byte == _ESC:
            for length in (4, 3):
                designated = _ESCAPES.get(raw[i : i + length])
                if designated is not None:
                    break
            if designated is None:
                out.append("\ufffd")
                ok = False
                i += 1
                continue
            register, graphic = designated
            if register == 0:
                g0 = graphic
            else:
                g1 = graphic
            i += length
            continue
        if byte < 0x80:
            if g0.double and 0x21 <= byte <= 0x7E:
                text, good = _decode_with(g0.designation + raw[i : i + 2], g0.codec)
                out.append(text)
                ok = ok and good and i + 1 < n
                i += 2
                continue
            out.append(chr(byte))
            i += 1
            if byte in delimiters:
                g0, g1 = initial
            continue
        if g1 is None:
            # Nothing designated for bytes above 0x7F. Without any declared set they are
            # read as Latin-1 (see CharacterSet.decode); with one they are undefined.
            out.append(chr(byte) if default_repertoire else "\ufffd")
            ok = ok and default_repertoire
            i += 1
            continue
        codec = g1.codec if strict else g1.lenient_codec
        # JIS X 0201 Katakana is single-byte; a lenient read takes Shift_JIS pairs too.
        sjis_pair = not strict and g1 is _KATAKANA and not 0xA1 <= byte <= 0xDF
        width = 2 if g1.double or sjis_pair else 1
        text, good = _decode_with(raw[i : i + width], codec)
        if not good or (width == 2 and i + 1 >= n):
            out.append("\ufffd")
            ok = False
            i += 1  # resynchronise on the next byte
            continue
        out.append(text)
        i += width
    return "".join(out), ok


def normalise(value: str | Sequence[str] | None) -> CharacterSet:
    """The character set a (0008,0005) value declares, in defined terms.

    ``value``: as pydicom gives it (a string, a list of strings) or None when absent.
    Never raises: a value it cannot understand gives ``known=False``; text in such a set
    decodes only where it is ASCII or carries escape sequences.
    """
    if value is None:
        declared: tuple[str, ...] = ()
    elif isinstance(value, str):
        declared = tuple(v.strip(" \x00") for v in value.split("\\"))
    else:
        declared = tuple(str(v).strip(" \x00") for v in value)
    if not any(declared):
        return CharacterSet()
    parsed = [_parse_value(v) for v in declared]
    unknown = [v for v, p in zip(declared, parsed, strict=True) if p is None]
    notes: list[str] = [f"unknown value {v!r} ignored" for v in unknown]
    meaningful = [p for p in parsed if p is not None and p.term != "" and p.number != 6]
    if not meaningful:
        return _character_set(declared, (), (), unknown, notes)

    # A stand-alone set or a named codec as the first set decides alone (PS3.5
    # 6.1.2.5.4 d); later in the list it cannot be an extension and is ignored.
    decisive = meaningful[0] if meaningful[0].stand_alone or meaningful[0].codec else None
    others = [p for p in meaningful if p is not decisive]
    if decisive is not None:
        if others:
            notes.append(f"{decisive.term!r} allows no other set; the others are ignored")
        if decisive.stand_alone:
            return _character_set(declared, (decisive.term,), (decisive.term,), unknown, notes)
        codec_terms = decisive.codec_terms
        return _character_set(
            declared,
            codec_terms or (),
            _writable(codec_terms) if codec_terms is not None else None,
            unknown,
            notes,
            codec=decisive.codec,
        )
    dropped = [p.term for p in meaningful if p.stand_alone or p.codec]
    if dropped:
        notes.append(f"{', '.join(dropped)} cannot be code extensions; ignored")
    iso = [p for p in parsed if p is not None and not (p.stand_alone or p.codec)]

    # ISO 2022: value 1 is the default repertoire ("") or a single-byte set.
    first = iso[0]
    rest = iso[1:]
    if first.number in _MULTI_BYTE:
        notes.append("value 1 (default repertoire) added before a multi-byte set")
        first, rest = _Term(""), iso
    extensions = [_in_extension_form(p) for p in rest if p.term != ""]
    value1 = _in_extension_form(first) if extensions else first.term
    extensions = [e for e in dict.fromkeys(extensions) if e != value1]
    terms = (value1, *extensions)
    if terms in (("",), ("ISO 2022 IR 6",)):
        terms = ()
    return _character_set(declared, terms, _writable(terms), unknown, notes)


def _writable(terms: tuple[str, ...]) -> tuple[str, ...]:
    """What a result writes for ``terms``: one single-byte code-extension term is the same
    set without extensions, and ``ISO 2022 IR 6`` alone is the default repertoire."""
    if len(terms) == 1:
        number = _term_number(terms[0])
        if number == 6:
            return ()
        if number is not None and terms[0].startswith("ISO 2022"):
            return (f"ISO_IR {number}",)
    return terms


def _character_set(
    declared: tuple[str, ...],
    terms: tuple[str, ...],
    writable: tuple[str, ...] | None,
    unknown: list[str],
    notes: list[str],
    codec: str | None = None,
) -> CharacterSet:
    if unknown:
        writable = None
    declared_text, spelled = "\\".join(declared), "\\".join(terms)
    if codec is not None:
        notes.append(f"{declared_text!r} decoded as {codec}")
    elif not unknown and declared_text != spelled:
        notes.append(f"{declared_text!r} read as {spelled!r}")
    return CharacterSet(
        declared=declared,
        terms=terms,
        writable=writable,
        known=not unknown,
        codec=codec,
        notes=tuple(notes),
    )


# --- datasets ------------------------------------------------------------------------------


@dataclass
class DecodeReport:
    """What ``decode_dataset`` found: the set and the elements it could not decode."""

    character_set: CharacterSet
    # top-level tag -> where (keyword, "Sequence > Keyword" inside items)
    undecodable: dict[BaseTag, str] = field(default_factory=dict)


def declared_value(ds: Dataset) -> str | list[str] | None:
    """(0008,0005) as the dataset holds it, without pydicom interpreting it."""
    elem = ds.get_item(SPECIFIC_CHARACTER_SET)
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, bytes):
        value = value.decode("latin_1").split("\\")
    elif isinstance(value, str):
        value = value.split("\\")
    elif value is None:
        return None
    # CS: leading and trailing spaces are not significant (padding).
    parts = [str(v).strip(" \x00") for v in value]
    return parts[0] if len(parts) == 1 else parts


def character_set_of(ds: Dataset) -> CharacterSet:
    """The character set a dataset declares (``normalise`` of its (0008,0005))."""
    return normalise(declared_value(ds))


def decode_dataset(
    ds: Dataset,
    *,
    recursive: bool = True,
    character_set: CharacterSet | None = None,
    encoded_only: bool = False,
) -> DecodeReport:
    """Decode every text element of ``ds`` in place with ``CharacterSet.decode``.

    Elements pydicom has not decoded yet (as read from a file) are decoded from their
    bytes; decoded PN values from their original bytes; other decoded values are kept.
    (0008,0005) becomes its defined terms (removed when unknown), so pydicom decodes
    anything left (private elements of implicit VR) with a set it knows. ``recursive``
    also decodes sequence items (an item's own (0008,0005) applies inside it and is then
    removed: everything is decoded). ``encoded_only`` leaves decoded PN values alone.
    Never raises for bad text: undecodable elements are reported and keep U+FFFD where
    bytes could not be read.
    """
    charset = character_set or character_set_of(ds)
    report = DecodeReport(charset)
    _teach_pydicom(charset)
    _set_terms(ds, charset)
    _decode_items(ds, charset, report, None, recursive, encoded_only)
    return report


def _teach_pydicom(charset: CharacterSet) -> None:
    """Register a spelling the node understands with pydicom, the first time it is seen.

    pydicom looks at (0008,0005) on every read and warns ("Unknown encoding ... using
    default encoding instead", also logged) for a spelling it does not know, once per
    instance received, and decodes with Latin-1 wherever it decodes text itself. Mapped to
    pydicom's own codec for the defined term meant (``ISO_IR 149`` -> ``euc_kr``, as for
    ``ISO 2022 IR 149``), it reads such files like conformant ones. Named codecs it already
    looks up itself; unknown values stay unknown (and keep warning: they are a problem).
    """
    if not charset.known or len(charset.declared) != 1 or charset.codec is not None:
        return
    spelling = charset.declared[0]
    if not spelling or spelling in pydicom_charset.python_encoding:
        return
    codec = pydicom_charset.python_encoding.get(charset.terms[-1] if charset.terms else "")
    if codec is not None:
        pydicom_charset.python_encoding[spelling] = codec


def _set_terms(ds: Dataset, charset: CharacterSet) -> None:
    if charset.known and charset.terms:
        terms = list(charset.terms)
        ds.SpecificCharacterSet = terms[0] if len(terms) == 1 else terms
    elif SPECIFIC_CHARACTER_SET in ds:
        del ds[SPECIFIC_CHARACTER_SET]


def _decode_items(
    ds: Dataset,
    charset: CharacterSet,
    report: DecodeReport,
    parent: tuple[BaseTag, str] | None,
    recursive: bool,
    encoded_only: bool,
) -> None:
    for tag in list(ds.keys()):
        if tag == SPECIFIC_CHARACTER_SET or tag.group == 0x7FE0:
            continue
        elem = ds.get_item(tag)
        vr = _vr_of(elem, tag)
        if vr == "SQ":
            if not recursive:
                continue
            try:
                items = ds[tag].value
            except Exception:  # noqa: BLE001 - a broken sequence is reported, not fatal
                _undecodable(report, tag, parent)
                continue
            where = (parent[0], f"{parent[1]} > {_name(tag)}") if parent else (tag, _name(tag))
            for item in items:
                item_charset = charset
                if SPECIFIC_CHARACTER_SET in item:
                    item_charset = character_set_of(item)
                    del item[SPECIFIC_CHARACTER_SET]
                _decode_items(item, item_charset, report, where, recursive, encoded_only)
            continue
        if vr not in TEXT_VRS:
            continue
        raw = _raw_bytes(elem, encoded_only)
        if raw is None:
            continue
        try:
            text, ok = charset.decode(raw, vr)
            ds[tag] = _element(tag, vr, text)
        except Exception:  # noqa: BLE001 - never let one odd value stop a dataset
            ok = False
        if not ok:
            _undecodable(report, tag, parent)


def _vr_of(elem: DataElement | RawDataElement, tag: BaseTag) -> str | None:
    if elem.VR:
        return str(elem.VR)
    if tag.is_private:
        return None
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def _raw_bytes(elem: DataElement | RawDataElement, encoded_only: bool) -> bytes | None:
    """The encoded value, when it is still available."""
    if isinstance(elem, RawDataElement):
        return elem.value or b""
    value = elem.value
    if (
        not encoded_only
        and isinstance(value, PersonName)
        and isinstance(value.original_string, bytes)
    ):
        return value.original_string
    if isinstance(value, bytes):
        return value
    return None


def _element(tag: BaseTag, vr: str, text: str) -> DataElement:
    if vr in _MULTI_VALUED_VRS and "\\" in text:
        value: str | list[str] = [v.rstrip(" \x00") for v in text.split("\\")]
    else:
        value = text.rstrip(" \x00")
    return DataElement(tag, vr, value, validation_mode=pydicom_config.IGNORE)


def _name(tag: BaseTag) -> str:
    return keyword_for_tag(tag) or str(tag)


def _undecodable(report: DecodeReport, tag: BaseTag, parent: tuple[BaseTag, str] | None) -> None:
    if parent is None:
        report.undecodable[tag] = _name(tag)
    else:
        report.undecodable.setdefault(parent[0], f"{parent[1]} > {_name(tag)}")


# --- writers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedSource:
    """Source images for a writer: the first one decoded (a copy), the others as given."""

    images: list[Dataset]
    report: DecodeReport
    series_uid: str

    @property
    def character_set(self) -> CharacterSet:
        return self.report.character_set


@dataclass(frozen=True)
class OutputCharacterSet:
    """The character set a result was written in, and why.

    ``source``: the source's (0008,0005) as received; ``written``: the result's ("" for
    none); ``transcoded``: the text could not be carried in the source's set and was
    written as ISO_IR 192 instead (``reason`` says why, naming attributes, never values).
    """

    source: str
    written: str
    transcoded: bool = False
    reason: str | None = None

    def describe(self) -> str:
        if self.transcoded:
            return f"text transcoded from {self.source} to {self.written}: {self.reason}"
        return f"text kept in {self.written or 'the default repertoire'}"


def prepare_source(source_images: Sequence[Dataset]) -> PreparedSource:
    """``source_images`` with the first one replaced by a decoded copy (``decode_dataset``):
    writers take patient and study attributes from it. The caller's datasets are not
    changed (workers share them between jobs)."""
    if not source_images:
        raise ValueError("no source images given")
    first = copy.deepcopy(source_images[0])
    report = decode_dataset(first)
    series_uid = str(first.get("SeriesInstanceUID", "?"))
    return PreparedSource([first, *source_images[1:]], report, series_uid)


def settle_output(ds: Dataset, source: PreparedSource, what: str) -> OutputCharacterSet:
    """Set (0008,0005) of the built object ``ds`` (a ``what``: "Segmentation", ...).

    Keeps the source's set when it carries every text value of ``ds`` (``carries``), else
    writes ISO_IR 192. Non-ASCII PN values are renewed, so pydicom encodes them in the set
    chosen (it would reuse bytes cached by an earlier encoding). One pass over ``ds``:
    ~0.1 s for a SEG of 1,500 frames.

    Raises
    ------
    CharacterSetError
        When text ``ds`` carries from the source could not be decoded.
    """
    charset = source.character_set
    # Non-ASCII text values by path of tags; anything still encoded (copied before
    # decoding) is decoded with the source's set on the way.
    leftover = DecodeReport(charset)
    texts: list[tuple[tuple[BaseTag, ...], str, str]] = []
    _gather_texts(ds, charset, leftover, (), texts)
    undecodable = {
        tag: where
        for tag, where in source.report.undecodable.items()
        if any(path[0] == tag and "\ufffd" in text for path, _, text in texts)
    } | leftover.undecodable
    if undecodable:
        raise CharacterSetError(
            f"series {source.series_uid}: {', '.join(sorted(undecodable.values()))} "
            f"cannot be decoded with its Specific Character Set {charset.text!r}"
            + ("" if charset.known else " (not a character set the node knows)")
            + f"; no {what} is written, as it would carry wrong text"
        )
    reason: str | None = None
    failing: list[str] = []
    if charset.writable is None:
        reason = (
            f"{charset.text!r} is not a character set the node knows"
            if not charset.known
            else f"{charset.text!r} has no DICOM defined term"
        )
    elif not charset.writable:
        # Default repertoire: non-ASCII bytes the source sent without declaring a set pass
        # through unchanged (see CharacterSet.decode); any other non-ASCII text does not.
        from_source: list[tuple[tuple[BaseTag, ...], str, str]] = []
        _gather_texts(source.images[0], charset, DecodeReport(charset), (), from_source)
        undeclared = {text for _, _, text in from_source}
        failing = sorted({_path_name(p) for p, _, text in texts if text not in undeclared})
    else:
        carrier = normalise(list(charset.writable))
        failing = sorted({_path_name(p) for p, vr, text in texts if not carrier.carries(text, vr)})
    if reason is None and failing:
        carrier_text = "\\".join(charset.writable or ()) or "the default repertoire"
        reason = f"{carrier_text} cannot carry {', '.join(failing)}"
    written = (UTF8,) if reason is not None else (charset.writable or ())
    if written:
        ds.SpecificCharacterSet = written[0] if len(written) == 1 else list(written)
    elif SPECIFIC_CHARACTER_SET in ds:
        del ds[SPECIFIC_CHARACTER_SET]
    result = OutputCharacterSet(
        source=charset.text,
        written="\\".join(written),
        transcoded=reason is not None,
        reason=reason,
    )
    if result.transcoded:
        logger.warning("%s for series %s: %s", what, source.series_uid, result.describe())
    return result


def _gather_texts(
    ds: Dataset,
    charset: CharacterSet,
    report: DecodeReport,
    path: tuple[BaseTag, ...],
    texts: list[tuple[tuple[BaseTag, ...], str, str]],
) -> None:
    """Append (path, VR, text) of every non-ASCII text value of ``ds``, recursively."""
    for tag in list(ds.keys()):
        elem = ds.get_item(tag)
        vr = _vr_of(elem, tag)
        if vr == "SQ":
            for item in ds[tag].value:
                _gather_texts(item, charset, report, (*path, tag), texts)
            continue
        if vr not in TEXT_VRS or tag == SPECIFIC_CHARACTER_SET:
            continue
        raw = _raw_bytes(elem, encoded_only=True)
        if raw is not None:
            text, ok = charset.decode(raw, vr)
            ds[tag] = _element(tag, vr, text)
            if not ok:
                _undecodable(report, tag, (path[0], _path_name(path)) if path else None)
        elem = ds[tag]
        value = elem.value
        values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
        non_ascii = [str(v) for v in values if v is not None and not str(v).isascii()]
        if not non_ascii:
            continue
        texts.extend(((*path, tag), vr, text) for text in non_ascii)
        if vr == "PN":
            elem.value = [str(v) for v in values] if len(values) > 1 else str(values[0])


def _path_name(path: tuple[BaseTag, ...]) -> str:
    return " > ".join(_name(tag) for tag in path)
