"""Specific Character Sets (issue 13, kind 1): every set a PACS may send is decoded where the
node uses text (database fields, routing attributes, phase keywords), and every result
object (BINARY SEG, LABELMAP SEG, RTSTRUCT) carries the source's patient and study text so
that it decodes to the same strings; a set that cannot carry it is transcoded to ISO_IR 192
and reported, and text the node cannot decode is refused, never written wrong.

Sources are the synthetic study generator's output post-processed with pydicom: (0008,0005)
set to the variant's value as a modality wrote it, and the text elements replaced by the
bytes a modality writes (escape sequences where PS3.5 wants them, none where field systems
leave them out). Expected values are Python strings written here; results are read back
with pydicom and, where its iconv build knows the set, with DCMTK (dcmdump +U8).
"""

from __future__ import annotations

import re
import subprocess
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from devkit import dciodvfy
from devkit.dcmtk import dcmtk_tool
from devkit.synth import generate_study
from dicom_node.explain import explain
from dicom_node.instance import header_attributes, parse_header
from dicom_node.rules import load_rules
from inference.charsets import CharacterSetError, normalise
from inference.labels import (
    ANATOMICAL_STRUCTURE,
    MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
    Code,
    SegmentLabel,
)
from inference.results import Algorithm
from inference.rtstruct_writer import write_rtstruct
from inference.seg_writer import write_seg
from inference.volume import sort_slices
from kernel.settings import REPO_ROOT
from kernel.uids import derived_uid

# --- how modalities write text ------------------------------------------------------------

Encoder = Callable[[str, str], bytes]  # (text, VR) -> the element's bytes


def plain(codec: str) -> Encoder:
    """The whole value in one codec, no escape sequences (single-byte and stand-alone sets,
    and field systems that label EUC-KR / GB2312 / Shift_JIS text by codec name)."""
    return lambda text, vr: text.encode(codec)


def _groups(text: str, vr: str) -> list[str]:
    """A value split at the delimiters that return ISO 2022 to value 1's sets (PS3.5
    6.1.2.5.3), delimiters kept."""
    return re.split(r"([\^=\\])" if vr == "PN" else r"(\\)", text)


def g1_escaped(escape: bytes, codec: str) -> Encoder:
    """A double-byte G1 set (KS X 1001, GB 2312) designated at the start of every group
    that needs it, as in the Korean example of PS3.5 Annex I."""

    def encode(text: str, vr: str) -> bytes:
        return b"".join(
            p.encode("ascii") if p.isascii() else escape + p.encode(codec)
            for p in _groups(text, vr)
        )

    return encode


def escaped_once(escape: bytes, codec: str) -> Encoder:
    """The escape sequence once at the start of the value, never repeated after a
    delimiter: what many Korean systems write."""
    return lambda text, vr: (escape + text.encode(codec)) if not text.isascii() else text.encode()


def jis(value1: str) -> Encoder:
    """Japanese (PS3.5 Annex H): JIS X 0208 in G0 by ESC $ B, back by ESC ( B, or by ESC ( J
    when value 1 is ISO 2022 IR 13, whose half-width katakana are single bytes in G1."""
    back = b"\x1b(J" if value1 == "ISO 2022 IR 13" else b"\x1b(B"

    def encode(text: str, vr: str) -> bytes:
        out = b""
        for part in _groups(text, vr):
            half_width = all(c.isascii() or "\uff61" <= c <= "\uff9f" for c in part)
            if half_width and value1 == "ISO 2022 IR 13":
                out += part.encode("shift_jis")
            else:
                out += part.encode("iso2022_jp").replace(b"\x1b(B", back)
        return out

    return encode


def jis_x_0212(text: str, vr: str) -> bytes:
    """JIS X 0212 (ISO 2022 IR 159, ESC $ ( D) for what JIS X 0208 lacks, such as 鷗."""
    out = b""
    for part in _groups(text, vr):
        for ch in part:
            try:
                out += ch.encode("iso2022_jp")
            except UnicodeEncodeError:
                out += ch.encode("iso2022_jp_2")
    return out.replace(b"\x1b(B\x1b$B", b"\x1b$B")


# --- the variants ---------------------------------------------------------------------------

KOREAN = {
    "PatientName": "Hong^Gildong=洪^吉洞=홍^길동",
    "ReferringPhysicianName": "김^희중",
    "StudyDescription": "복부 CT 조영",
    "SeriesDescription": "복부 문맥기 3mm",
    "PatientComments": "신장 종양 추적 검사",
}
JAPANESE = {
    "PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう",
    "ReferringPhysicianName": "鈴木^一郎",
    "StudyDescription": "腹部 CT 造影",
    "SeriesDescription": "門脈相 portal",
    "PatientComments": "腎臓 腫瘍",
}
KATAKANA = {**JAPANESE, "PatientName": "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"}
CHINESE = {
    "PatientName": "Wang^XiaoDong=王^小东",
    "ReferringPhysicianName": "李^明",
    "StudyDescription": "腹部增强CT",
    "SeriesDescription": "门静脉期 portal",
    "PatientComments": "肾脏肿瘤随访",
}


def _european(name: str, doctor: str, study: str, series: str, comment: str) -> dict[str, str]:
    return {
        "PatientName": name,
        "ReferringPhysicianName": doctor,
        "StudyDescription": study,
        "SeriesDescription": series,
        "PatientComments": comment,
    }


GERMAN = _european(
    "Müller^Jürgen", "Dupont^Hélène", "Abdomen Niere", "portal venös 3mm", "Größe rechts?"
)
RUSSIAN = _european(
    "Иванов^Иван", "Петров^Пётр", "КТ брюшной полости", "портальная фаза portal", "контроль"
)
GREEK = _european(
    "Διονυσιος^Παπαδοπουλος", "Νικολαου^Μαρια", "ΑΞΟΝΙΚΗ ΚΟΙΛΙΑΣ", "πυλαία φάση portal", "έλεγχος"
)
ASCII_ONLY = _european("Doe^John", "Smith^Anna", "CT ABDOMEN", "PORTAL VENOUS", "follow up")

KR = ["", "ISO 2022 IR 149"]
KR_ESCAPE = b"\x1b$)C"


@dataclass(frozen=True)
class Variant:
    id: str
    declared: str | list[str] | None  # (0008,0005) as the modality wrote it
    texts: dict[str, str]
    encode: Encoder
    written: str | list[str] | None  # (0008,0005) of the results
    transcoded: bool = False
    dcmtk_reads_source: bool = False  # conformant, and DCMTK's iconv knows the set
    phase_keyword: str | None = None


VARIANTS = [
    # Defined terms, single-byte.
    Variant("latin1", "ISO_IR 100", GERMAN, plain("latin_1"), "ISO_IR 100",
            dcmtk_reads_source=True, phase_keyword="portal"),
    Variant("latin2", "ISO_IR 101", _european("Łódź^Paweł", "Nováková^Jana", "Brzuch",
            "portal żylna", "kontrola"), plain("iso8859_2"), "ISO_IR 101",
            dcmtk_reads_source=True),
    Variant("cyrillic", "ISO_IR 144", RUSSIAN, plain("iso8859_5"), "ISO_IR 144",
            dcmtk_reads_source=True, phase_keyword="portal"),
    Variant("greek", "ISO_IR 126", GREEK, plain("iso8859_7"), "ISO_IR 126",
            dcmtk_reads_source=True),
    Variant("arabic", "ISO_IR 127", _european("قباني^لنزار", "Smith", "CT", "portal", "متابعة"),
            plain("iso8859_6"), "ISO_IR 127", dcmtk_reads_source=True),
    Variant("hebrew", "ISO_IR 138", _european("שרון^דבורה", "Cohen", "CT", "portal", "מעקב"),
            plain("iso8859_8"), "ISO_IR 138", dcmtk_reads_source=True),
    Variant("turkish", "ISO_IR 148", _european("Öztürk^Şükrü", "Yılmaz^Ayşe", "Karın BT",
            "portal venöz", "kontrol"), plain("iso8859_9"), "ISO_IR 148",
            dcmtk_reads_source=True),
    Variant("latin9", "ISO_IR 203", _european("Œuvre^Zoë", "Dupont^Hélène", "Abdomen 100 €",
            "portal", "ŒŸ"), plain("iso8859_15"), "ISO_IR 203"),
    Variant("thai", "ISO_IR 166", _european("สมชาย^ใจดี", "Smith", "CT ช่องท้อง", "portal",
            "ติดตาม"), plain("tis_620"), "ISO_IR 166", dcmtk_reads_source=True),
    Variant("katakana-ir13", "ISO_IR 13", {**ASCII_ONLY, "PatientName": "ﾔﾏﾀﾞ^ﾀﾛｳ"},
            plain("shift_jis"), "ISO_IR 13", dcmtk_reads_source=True),
    # Stand-alone multi-byte sets.
    Variant("utf8-korean", "ISO_IR 192", KOREAN, plain("utf-8"), "ISO_IR 192",
            dcmtk_reads_source=True, phase_keyword="문맥"),
    Variant("gb18030", "GB18030", CHINESE, plain("gb18030"), "GB18030",
            dcmtk_reads_source=True, phase_keyword="portal"),
    Variant("gbk", "GBK", CHINESE, plain("gbk"), "GBK", dcmtk_reads_source=True),
    # Code extensions.
    Variant("korean-ir149", KR, KOREAN, g1_escaped(KR_ESCAPE, "euc_kr"), KR,
            dcmtk_reads_source=True, phase_keyword="문맥"),
    Variant("korean-escape-once", KR, KOREAN, escaped_once(KR_ESCAPE, "euc_kr"), KR,
            phase_keyword="문맥"),
    Variant("korean-no-escape", KR, KOREAN, plain("euc_kr"), KR, phase_keyword="문맥"),
    Variant("korean-ir149-alone", "ISO 2022 IR 149", KOREAN, g1_escaped(KR_ESCAPE, "euc_kr"),
            KR, phase_keyword="문맥"),
    Variant("korean-ir6-ir149", ["ISO 2022 IR 6", "ISO 2022 IR 149"], KOREAN,
            g1_escaped(KR_ESCAPE, "euc_kr"), ["ISO 2022 IR 6", "ISO 2022 IR 149"]),
    Variant("japanese-ir6-ir87", ["ISO 2022 IR 6", "ISO 2022 IR 87"], JAPANESE,
            jis("ISO 2022 IR 6"), ["ISO 2022 IR 6", "ISO 2022 IR 87"], phase_keyword="portal"),
    Variant("japanese-empty-ir87", ["", "ISO 2022 IR 87"], JAPANESE, jis(""),
            ["", "ISO 2022 IR 87"]),
    Variant("japanese-ir159", ["ISO 2022 IR 6", "ISO 2022 IR 87", "ISO 2022 IR 159"],
            {**JAPANESE, "PatientName": "Mori^Ougai=森^鷗外"}, jis_x_0212,
            ["ISO 2022 IR 6", "ISO 2022 IR 87", "ISO 2022 IR 159"]),
    Variant("japanese-ir13-ir87", ["ISO 2022 IR 13", "ISO 2022 IR 87"], KATAKANA,
            jis("ISO 2022 IR 13"), ["ISO 2022 IR 13", "ISO 2022 IR 87"]),
    Variant("latin1-extension-alone", "ISO 2022 IR 100", GERMAN, plain("latin_1"), "ISO_IR 100"),
    Variant("none-ascii", None, ASCII_ONLY, plain("ascii"), None),
    Variant("ir6-ascii", "ISO_IR 6", ASCII_ONLY, plain("ascii"), None),
    # Spellings seen in the field.
    Variant("iso_ir-149", "ISO_IR 149", KOREAN, plain("euc_kr"), KR, phase_keyword="문맥"),
    Variant("iso-ir-149", "ISO-IR 149", KOREAN, plain("euc_kr"), KR),
    Variant("iso2022-ir-149", "ISO2022 IR 149", KOREAN, plain("euc_kr"), KR),
    Variant("euc-kr", "EUC-KR", KOREAN, plain("euc_kr"), KR, phase_keyword="문맥"),
    Variant("ks_c_5601-1987", "KS_C_5601-1987", KOREAN, plain("euc_kr"), KR),
    Variant("utf-8", "UTF-8", KOREAN, plain("utf-8"), "ISO_IR 192", phase_keyword="문맥"),
    Variant("utf8-lowercase", "utf8", CHINESE, plain("utf-8"), "ISO_IR 192"),
    Variant("lowercase-spaces", " iso_ir  100 ", GERMAN, plain("latin_1"), "ISO_IR 100"),
    Variant("latin1-codec-name", "latin1", GERMAN, plain("latin_1"), "ISO_IR 100"),
    Variant("iso-8859-5", "ISO-8859-5", RUSSIAN, plain("iso8859_5"), "ISO_IR 144"),
    Variant("shift_jis", "Shift_JIS", JAPANESE, plain("cp932"),
            ["ISO 2022 IR 13", "ISO 2022 IR 87"]),
    # Sets the results cannot keep: transcoded to ISO_IR 192, and reported.
    Variant("gb2312", "GB2312", CHINESE, plain("gb2312"), "ISO_IR 192", transcoded=True),
    Variant("chinese-ir58", ["", "ISO 2022 IR 58"], CHINESE,
            g1_escaped(b"\x1b$)A", "gb2312"), "ISO_IR 192", transcoded=True),
    Variant("cp949-only-syllable", "EUC-KR", {**KOREAN, "PatientName": "Kim^Ttom=金^똠=김^똠"},
            plain("cp949"), "ISO_IR 192", transcoded=True),
    Variant("unknown-set-ascii-text", "X-UNKNOWN-SET", ASCII_ONLY, plain("ascii"),
            "ISO_IR 192", transcoded=True),
]  # fmt: skip

# Copied into every result object (the SEG's own SeriesDescription is not the source's).
CARRIED = ("PatientName", "ReferringPhysicianName", "StudyDescription", "PatientComments")
# (0008,0005) values DCMTK 3.6.7 with glibc iconv converts (not IR 87/159/58, ISO_IR 203).
DCMTK_SETS = {
    *(f"ISO_IR {n}" for n in (100, 101, 109, 110, 126, 127, 138, 144, 148, 166, 13, 192)),
    "GB18030",
    "GBK",
    "\\ISO 2022 IR 149",
    "ISO 2022 IR 6\\ISO 2022 IR 149",
}

KIDNEY = Code("64033007", "SCT", "Kidney")
NEOPLASM = Code("108369006", "SCT", "Neoplasm")
LABELS = [
    SegmentLabel(1, "kidney", ANATOMICAL_STRUCTURE, KIDNEY, (185, 102, 83)),
    SegmentLabel(2, "kidney tumor", MORPHOLOGICALLY_ABNORMAL_STRUCTURE, NEOPLASM, (255, 0, 0)),
]
ALGORITHM = Algorithm(name="tumor", version="charset-test")
RESULT_TYPES = ("BINARY", "LABELMAP", "RTSTRUCT")


def _raw(keyword: str, value: bytes) -> RawDataElement:
    if len(value) % 2:
        value += b" "
    tag = Tag(tag_for_keyword(keyword))
    return RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)


def recode(
    files: list[Path],
    folder: Path,
    declared: str | list[str] | None,
    raw_texts: dict[str, bytes],
) -> list[Path]:
    """Copies of ``files`` whose (0008,0005) and text elements hold exactly these bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path in files:
        ds = pydicom.dcmread(path)
        if declared is None:
            del ds.SpecificCharacterSet
        else:
            value = declared if isinstance(declared, str) else "\\".join(declared)
            ds[0x00080005] = _raw("SpecificCharacterSet", value.encode("ascii"))
        for keyword, raw in raw_texts.items():
            ds[tag_for_keyword(keyword)] = _raw(keyword, raw)
        # Tell pydicom the file already is in this set, so that it writes the raw bytes as
        # they are instead of decoding and re-encoding them (it may not know the spelling:
        # that is the point).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.set_original_encoding(*ds.original_encoding, ds._character_set)
        target = folder / path.name
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


def encoded_texts(variant: Variant) -> dict[str, bytes]:
    return {
        keyword: variant.encode(text, dictionary_VR(tag_for_keyword(keyword)))
        for keyword, text in variant.texts.items()
    }


@pytest.fixture(scope="module")
def synthetic_series(tmp_path_factory) -> list[Path]:
    study = generate_study(
        tmp_path_factory.mktemp("charset-study"),
        seed=31,
        phases="P",
        rows=16,
        columns=16,
        pixel_spacing_mm=20.0,
        slices=3,
    )
    return study.series[0].files


@pytest.fixture(scope="module")
def label_map() -> np.ndarray:
    labels = np.zeros((3, 16, 16), np.uint8)
    labels[0:3, 4:12, 4:12] = 1
    labels[1, 6:9, 6:9] = 2
    return labels


@pytest.fixture(scope="module")
def sources(synthetic_series, tmp_path_factory) -> Callable[[Variant], list[Path]]:
    """variant -> its source series (written once per module)."""
    made: dict[str, list[Path]] = {}

    def files_for(variant: Variant) -> list[Path]:
        if variant.id not in made:
            folder = tmp_path_factory.mktemp(f"src-{variant.id}")
            made[variant.id] = recode(
                synthetic_series, folder, variant.declared, encoded_texts(variant)
            )
        return made[variant.id]

    return files_for


def _each(variants: list[Variant]):
    return pytest.mark.parametrize("variant", variants, ids=lambda v: v.id)


def _same(keyword: str, got: object, expected: str) -> bool:
    # PN: trailing empty component groups carry no meaning.
    got = str(got) if got is not None else ""
    return got.rstrip("=") == expected.rstrip("=") if keyword.endswith("Name") else got == expected


def _dcmtk_texts(path: Path) -> dict[str, str]:
    """Text elements as DCMTK decodes them to UTF-8 (dcmdump +U8), by keyword."""
    exe = dcmtk_tool("dcmdump")
    if exe is None:
        pytest.fail("DCMTK dcmdump is not installed (apt-get install dcmtk)")
    proc = subprocess.run(
        [exe, "+U8", "+P", "0010,0010", "+P", "0008,0090", "+P", "0008,1030",
         "+P", "0010,4000", "+P", "0008,103e", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    texts = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"\([0-9a-f,]+\) \w\w \[(.*)\]\s+#.*\s(\w+)$", line.strip())
        if m:
            texts[m[2]] = m[1]
    return texts


def _declared_text(value: str | list[str] | None) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else "\\".join(value)


# --- reading: defined terms, decoding, the receive path and routing -------------------------


@pytest.mark.parametrize(
    ("declared", "terms"),
    [
        ("ISO_IR 100", ("ISO_IR 100",)),
        (" iso_ir  100 ", ("ISO_IR 100",)),
        ("ISO IR 144", ("ISO_IR 144",)),
        ("ISO_IR 192", ("ISO_IR 192",)),
        ("UTF-8", ("ISO_IR 192",)),
        ("utf8", ("ISO_IR 192",)),
        ("GB18030", ("GB18030",)),
        ("gbk", ("GBK",)),
        ("ISO 2022 GBK", ("GBK",)),
        (["", "ISO 2022 IR 149"], ("", "ISO 2022 IR 149")),
        ("\\ISO 2022 IR 149", ("", "ISO 2022 IR 149")),
        ("ISO 2022 IR 149", ("", "ISO 2022 IR 149")),
        ("ISO_IR 149", ("", "ISO 2022 IR 149")),
        ("ISO-IR 149", ("", "ISO 2022 IR 149")),
        ("ISO2022 IR 149", ("", "ISO 2022 IR 149")),
        ("iso 2022 ir 149", ("", "ISO 2022 IR 149")),
        ("EUC-KR", ("", "ISO 2022 IR 149")),
        ("KS_C_5601-1987", ("", "ISO 2022 IR 149")),
        ("GB2312", ("", "ISO 2022 IR 58")),
        ("GB-2312", ("", "ISO 2022 IR 58")),
        ("GB18030-2005", ("GB18030",)),
        ("cp949", ("", "ISO 2022 IR 149")),
        ("KS X 1001", ("", "ISO 2022 IR 149")),
        ("ISO-8859-1", ("ISO_IR 100",)),
        ("ISO_IR 87", ("", "ISO 2022 IR 87")),
        (
            ["ISO 2022 IR 6", "ISO 2022 IR 87", "ISO 2022 IR 159"],
            ("ISO 2022 IR 6", "ISO 2022 IR 87", "ISO 2022 IR 159"),
        ),
        ("US-ASCII", ()),
        (["ISO 2022 IR 6", "ISO 2022 IR 87"], ("ISO 2022 IR 6", "ISO 2022 IR 87")),
        (["ISO_IR 13", "ISO 2022 IR 87"], ("ISO 2022 IR 13", "ISO 2022 IR 87")),
        (["ISO 2022 IR 100", "ISO 2022 IR 144"], ("ISO 2022 IR 100", "ISO 2022 IR 144")),
        ("ISO 2022 IR 100", ("ISO 2022 IR 100",)),
        ("\\ISO_IR 192", ("ISO_IR 192",)),
        ("ISO_IR 6", ()),
        ("ISO 2022 IR 6", ()),
        (None, ()),
        ("", ()),
    ],
)
def test_spellings_normalise_to_defined_terms(declared, terms):
    charset = normalise(declared)
    assert charset.known
    assert charset.terms == terms


def test_unknown_set_is_known_as_unknown():
    charset = normalise("X-UNKNOWN-SET")
    assert not charset.known and charset.writable is None
    assert charset.decode(b"CT ABDOMEN", "LO") == ("CT ABDOMEN", True)
    text, ok = charset.decode("홍길동".encode("euc_kr"), "PN")
    assert not ok and "\ufffd" in text


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("chrArab.dcm", "قباني^لنزار"),
        ("chrFren.dcm", "Buc^Jérôme"),
        ("chrGerm.dcm", "Äneas^Rüdiger"),
        ("chrGreek.dcm", "Διονυσιος"),
        ("chrH31.dcm", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
        ("chrH32.dcm", "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"),
        ("chrHbrw.dcm", "שרון^דבורה"),
        ("chrI2.dcm", "Hong^Gildong=洪^吉洞=홍^길동"),
        ("chrRuss.dcm", "Люкceмбypг"),
        ("chrX1.dcm", "Wang^XiaoDong=王^小東"),
        ("chrX2.dcm", "Wang^XiaoDong=王^小东"),
    ],
)
def test_standard_examples_decode(name, expected, tmp_path):
    """PS3.5 Annexes H, I, J and the other sets, as pydicom ships them; through the same
    path the routing rules and the web API use."""
    from pydicom.data import get_charset_files

    attrs = header_attributes(get_charset_files(name)[0])
    assert _same("PatientName", attrs["PatientName"], expected)


@_each(VARIANTS)
def test_receive_path_decodes_every_variant(variant, sources, recwarn):
    """parse_header (database fields) and header_attributes (routing rules, web API)."""
    files = sources(variant)
    header = parse_header(files[0].read_bytes())
    assert _same("PatientName", header.patient_name, variant.texts["PatientName"])
    assert header.series_description == variant.texts["SeriesDescription"]
    assert header.study_description == variant.texts["StudyDescription"]
    attrs = header_attributes(files[0])
    for keyword, text in variant.texts.items():
        assert _same(keyword, attrs[keyword], text), keyword
    declared = variant.declared
    assert attrs.get("SpecificCharacterSet") == (
        declared.strip() if isinstance(declared, str) else declared
    )
    # pydicom never decoded any of it with a wrong set (it may still warn on reading a
    # spelling it does not know: that is not decoding).
    assert not [w for w in recwarn if "decode" in str(w.message).lower()]


@_each([v for v in VARIANTS if v.dcmtk_reads_source])
def test_dcmtk_reads_the_test_sources_the_same_way(variant, sources):
    """The hand-made source bytes are what DCMTK, an independent decoder, reads too."""
    texts = _dcmtk_texts(sources(variant)[0])
    for keyword in ("PatientName", "StudyDescription", "SeriesDescription"):
        assert _same(keyword, texts[keyword], variant.texts[keyword]), keyword


@_each([v for v in VARIANTS if v.phase_keyword])
def test_phase_comes_from_the_decoded_description(variant, sources):
    rules = load_rules(REPO_ROOT / "routing_rules.yaml")
    (item,) = explain(rules, [sources(variant)[0].parent])
    assert item["phase"] == "P"
    assert any(f"contains {variant.phase_keyword!r} (P)" in r for r in item["reasons"])


# --- writing: BINARY SEG, LABELMAP SEG, RTSTRUCT -----------------------------------------


@dataclass
class Written:
    path: Path
    transcoded: list = field(default_factory=list)


def write_result(
    result_type: str, files: list[Path], label_map: np.ndarray, folder: Path
) -> Written:
    """The writer as the job runner calls it, on headers read as the worker reads them."""
    _, headers = sort_slices(files)
    series_uid = str(headers[0].SeriesInstanceUID)
    transcoded: list = []
    common = dict(
        path=folder / f"{result_type}.dcm",
        algorithm=ALGORITHM,
        series_instance_uid=derived_uid(series_uid, result_type, "series"),
        sop_instance_uid=derived_uid(series_uid, result_type, "sop"),
        series_number=901,
        series_description="AI tumor charset-test",
        on_transcode=transcoded.append,
    )
    if result_type == "RTSTRUCT":
        path = write_rtstruct(headers, label_map, LABELS, **common)
    else:
        path = write_seg(headers, label_map, LABELS, seg_type=result_type, **common)
    return Written(path, transcoded)


@pytest.mark.parametrize("result_type", RESULT_TYPES)
@_each(VARIANTS)
def test_results_carry_the_source_text(variant, sources, label_map, result_type, tmp_path):
    files = sources(variant)
    written = write_result(result_type, files, label_map, tmp_path)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom reads the result without guessing
        result = pydicom.dcmread(written.path)
        for keyword in CARRIED:
            assert _same(keyword, result.get(keyword), variant.texts[keyword]), keyword
    declared = result.get("SpecificCharacterSet")
    declared = declared if declared is None or isinstance(declared, str) else list(declared)
    assert declared == variant.written

    assert bool(written.transcoded) == variant.transcoded
    if variant.transcoded:
        (report,) = written.transcoded
        assert report.written == "ISO_IR 192" and report.reason
        assert "Hong" not in report.reason and "Kim" not in report.reason  # no names

    written_set = _declared_text(variant.written)
    if written_set in DCMTK_SETS:
        texts = _dcmtk_texts(written.path)
        for keyword in ("PatientName", "StudyDescription"):
            assert _same(keyword, texts[keyword], variant.texts[keyword]), keyword
    errors = dciodvfy.validate_file(written.path)
    if written_set in DCIODVFY_UNCHECKED_SETS:
        # dicom3tools cannot check these repertoires (Latin-9 it does not know at all) and
        # flags every byte above 0x7F; it says the same of the source CT itself.
        assert [e for e in dciodvfy.validate_file(files[0]) if re.search(REPERTOIRE, e)]
        errors = [e for e in errors if not re.search(REPERTOIRE, e)]
    assert errors == []


DCIODVFY_UNCHECKED_SETS = {"ISO_IR 203", "ISO_IR 13", "GBK"}
REPERTOIRE = r"Character invalid for character repertoire|invalid data values for Value Repr"


def test_the_source_set_is_kept_when_it_can_carry_the_text(sources, label_map, tmp_path):
    """The bytes of a conformant Korean source come back byte for byte."""
    (variant,) = [v for v in VARIANTS if v.id == "korean-ir149"]
    written = write_result("BINARY", sources(variant), label_map, tmp_path)
    raw = pydicom.dcmread(written.path).get_item(0x00100010).value
    assert raw.rstrip(b" ") == encoded_texts(variant)["PatientName"]


# --- refusing what cannot be decoded ------------------------------------------------------


@pytest.fixture(scope="module")
def undecodable_sources(synthetic_series, tmp_path_factory) -> dict[str, list[Path]]:
    base = tmp_path_factory.mktemp("undecodable")
    korean_name = "홍^길동".encode("euc_kr")
    return {
        "unknown-set": recode(
            synthetic_series, base / "unknown", "X-UNKNOWN-SET", {"PatientName": korean_name}
        ),
        "invalid-utf8": recode(
            synthetic_series, base / "utf8", "ISO_IR 192", {"PatientName": b"Hong^\xc3\x28"}
        ),
        "bad-escape-ir149": recode(
            synthetic_series, base / "escape", KR, {"StudyDescription": b"CT \x1b$)Z\xb1\xe6"}
        ),
    }


@pytest.mark.parametrize("result_type", RESULT_TYPES)
@pytest.mark.parametrize(
    ("source", "attribute"),
    [
        ("unknown-set", "PatientName"),
        ("invalid-utf8", "PatientName"),
        ("bad-escape-ir149", "StudyDescription"),
    ],
)
def test_text_that_cannot_be_decoded_is_refused(
    undecodable_sources, label_map, result_type, source, attribute, tmp_path
):
    with pytest.raises(CharacterSetError) as raised:
        write_result(result_type, undecodable_sources[source], label_map, tmp_path)
    message = str(raised.value)
    assert attribute in message and "Specific Character Set" in message
    assert "홍" not in message and "Hong" not in message  # names are not logged
    assert not list(tmp_path.glob("*.dcm"))


def test_undecodable_text_no_result_carries_is_no_reason_to_refuse(
    synthetic_series, label_map, tmp_path
):
    """The source's own SeriesDescription and InstitutionName are not in any result."""
    files = recode(
        synthetic_series,
        tmp_path / "src",
        "ISO_IR 192",
        {"SeriesDescription": b"CT \xff\xfe", "InstitutionName": b"\xc3\x28"},
    )
    for result_type in RESULT_TYPES:
        written = write_result(result_type, files, label_map, tmp_path)
        assert pydicom.dcmread(written.path).SpecificCharacterSet == "ISO_IR 192"


# --- more patient and study text: multi-valued names, long text, code sequences ---------

MORE_TEXT = {
    "korean": (KR, "김^철수\\Kim^Chulsoo", "고혈압, 당뇨", "복부 전산화 단층촬영"),
    "japanese": (
        ["ISO 2022 IR 6", "ISO 2022 IR 87"],
        "山田^花子\\やまだ^はなこ",
        "高血圧",
        "腹部CT",
    ),
    "utf8": ("ISO_IR 192", "Müller^Jürgen\\王^小东", "고혈압 高血圧", "복부 CT"),
    "gb18030": ("GB18030", "王^小东\\Wang^XiaoDong", "高血压", "腹部增强CT"),
    "cyrillic": ("ISO_IR 144", "Иванов^Иван\\Ivanov^Ivan", "гипертония", "КТ брюшной полости"),
}


@pytest.mark.parametrize("name", sorted(MORE_TEXT))
@pytest.mark.parametrize("result_type", RESULT_TYPES)
def test_names_history_and_code_meanings_are_carried(
    name, result_type, synthetic_series, label_map, tmp_path
):
    """OtherPatientNames (several PN values), AdditionalPatientHistory (LT) and a
    ProcedureCodeSequence item's CodeMeaning, written by pydicom's own encoder."""
    declared, other_names, history, meaning = MORE_TEXT[name]
    files = []
    for path in synthetic_series:
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = declared
        ds.OtherPatientNames = other_names.split("\\")
        ds.AdditionalPatientHistory = history
        item = pydicom.Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "CTABD", "99X", meaning
        ds.ProcedureCodeSequence = [item]
        files.append(tmp_path / path.name)
        ds.save_as(files[-1], enforce_file_format=True)
    written = write_result(result_type, files, label_map, tmp_path)
    assert not written.transcoded
    result = pydicom.dcmread(written.path)
    assert "\\".join(str(n) for n in result.OtherPatientNames) == other_names
    assert result.AdditionalPatientHistory == history
    assert result.ProcedureCodeSequence[0].CodeMeaning == meaning
    assert dciodvfy.validate_file(written.path) == []


def test_text_pydicom_cannot_write_back_in_the_source_set_is_transcoded(
    synthetic_series, label_map, tmp_path
):
    """Korean on two lines: after the line break PS3.5 6.1.2.5.3 wants the escape sequence
    again, which pydicom does not write; the result is UTF-8, reported, and reads right."""
    history = "고혈압\r\n당뇨"
    raw = b"\r\n".join(KR_ESCAPE + line.encode("euc_kr") for line in history.split("\r\n"))
    files = recode(synthetic_series, tmp_path / "src", KR, {"AdditionalPatientHistory": raw})
    for result_type in ("BINARY", "RTSTRUCT"):
        written = write_result(result_type, files, label_map, tmp_path)
        (report,) = written.transcoded
        assert "AdditionalPatientHistory" in report.reason
        result = pydicom.dcmread(written.path)
        assert result.SpecificCharacterSet == "ISO_IR 192"
        assert result.AdditionalPatientHistory == history


def test_no_finding_seg_carries_the_source_text(sources, tmp_path):
    (variant,) = [v for v in VARIANTS if v.id == "korean-no-escape"]
    _, headers = sort_slices(sources(variant))
    path = write_seg(
        headers,
        np.zeros((3, 16, 16), np.uint8),
        LABELS,
        path=tmp_path / "empty.dcm",
        algorithm=ALGORITHM,
        series_instance_uid=derived_uid("empty", "series"),
        sop_instance_uid=derived_uid("empty", "sop"),
        series_number=902,
        series_description="AI tumor no finding",
        allow_empty=True,
    )
    result = pydicom.dcmread(path)
    assert list(result.SpecificCharacterSet) == KR
    assert _same("PatientName", result.PatientName, KOREAN["PatientName"])
    assert dciodvfy.validate_file(path) == []


def test_undecodable_text_fails_the_job_at_once():
    """The worker child treats it as an input error: a retry would fail the same way."""
    from inference.child import is_input_error

    assert is_input_error(CharacterSetError("series 1.2.3: PatientName cannot be decoded"))


def test_undeclared_non_ascii_bytes_pass_through_unchanged(synthetic_series, label_map, tmp_path):
    """Without (0008,0005) non-ASCII bytes are not defined; the node reads them as Latin-1
    like pydicom and most PACS and hands them on byte for byte, so a PACS shows the result
    as it shows the images. Text of the writer's own is never written that way."""
    name = "Hong^\xc8\xab".encode("latin_1")  # EUC-KR bytes of a site that declares nothing
    files = recode(synthetic_series, tmp_path / "src", None, {"PatientName": name})
    written = write_result("BINARY", files, label_map, tmp_path)
    assert not written.transcoded
    result = pydicom.dcmread(written.path)
    assert "SpecificCharacterSet" not in result
    assert result.get_item(0x00100010).value.rstrip(b" ") == name

    _, headers = sort_slices(files)
    reports: list = []
    path = write_seg(
        headers,
        label_map,
        LABELS,
        path=tmp_path / "own-text.dcm",
        algorithm=ALGORITHM,
        series_instance_uid=derived_uid("own", "series"),
        sop_instance_uid=derived_uid("own", "sop"),
        series_number=903,
        series_description="AI tumour 5 µm",
        on_transcode=reports.append,
    )
    (report,) = reports
    assert "SeriesDescription" in report.reason
    result = pydicom.dcmread(path)
    assert result.SpecificCharacterSet == "ISO_IR 192"
    assert result.SeriesDescription == "AI tumour 5 µm"
    assert str(result.PatientName) == name.decode("latin_1")
