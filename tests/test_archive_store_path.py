"""The store path's fast parse gives exactly what a full pydicom parse gives."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
import pydicom.data
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from twin_archive import IncomingInstance
from twin_archive.header import _FIELD_KEYWORDS, _text, parse, parse_fast


def _incoming(ds: Dataset) -> IncomingInstance:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    meta = DicomBytesIO()
    meta.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(meta, ds.file_meta)
    head = meta.getvalue()
    return IncomingInstance(
        file_meta=head, dataset=raw[len(head):],
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")), calling_ae="T",
    )


def _full(inc: IncomingInstance) -> tuple[dict[str, str], bool, bool]:
    ds = pydicom.dcmread(io.BytesIO(inc.file_meta + inc.dataset))
    return (
        {kw: _text(ds, kw) for kw in _FIELD_KEYWORDS},
        any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")),
        "Rows" in ds and "Columns" in ds,
    )


_TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


def _pydicom_files() -> list[str]:
    out = []
    # the package folder directly: get_testdata_files would try to download pydicom-data
    for name in sorted(str(p) for p in _TEST_FILES.rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(name)
            ds.file_meta.TransferSyntaxUID  # noqa: B018
            _incoming(ds)
        except Exception:  # noqa: BLE001 - files pydicom itself cannot rewrite
            continue
        out.append(name)
    return out


@pytest.mark.parametrize("name", _pydicom_files(), ids=lambda p: Path(p).name)
def test_fast_parse_matches_full_parse(name: str) -> None:
    inc = _incoming(pydicom.dcmread(name))
    fast = parse_fast(inc)
    fields, has_pixels, has_rc = _full(inc)
    if fast is not None:  # None means the full parse is used, trivially the same
        assert fast.fields == fields
        assert fast.has_pixels == has_pixels
        assert fast.has_rows_columns == has_rc


def _ds(ts: str, **values: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("values", [
    {"PatientID": "ID 1 ", "PatientName": "Doe^John^^", "InstanceNumber": "005"},
    {"PatientName": "Müller^Jörg", "SpecificCharacterSet": "ISO_IR 100", "PatientID": "é1"},
    {"PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう",
     "SpecificCharacterSet": ["", "ISO 2022 IR 87"], "PatientID": "x"},
    {"PatientName": "Wang^XiaoDong=王^小東", "SpecificCharacterSet": "ISO_IR 192"},
    {"StudyDescription": ["A", "B"], "Modality": "CT", "SeriesNumber": " 7"},
    {"PatientSex": "", "AccessionNumber": "", "StudyDate": "20240101", "StudyTime": "101010.5"},
])
def test_fast_parse_matches_full_parse_on_text(ts: str, values: dict[str, object]) -> None:
    ds = _ds(ts, Rows=2, Columns=2, BitsAllocated=8, BitsStored=8, HighBit=7,
             PixelRepresentation=0, SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2",
             PixelData=b"\0\1\2\3", **values)
    inc = _incoming(ds)
    fast = parse_fast(inc)
    assert fast is not None
    fields, has_pixels, has_rc = _full(inc)
    assert (fast.fields, fast.has_pixels, fast.has_rows_columns) == (fields, has_pixels, has_rc)


def test_fast_parse_defers_when_something_follows_pixel_data() -> None:
    ds = _ds(ExplicitVRLittleEndian, PatientID="P", Rows=1, Columns=1, BitsAllocated=16,
             BitsStored=16, HighBit=15, PixelRepresentation=0, SamplesPerPixel=1,
             PhotometricInterpretation="MONOCHROME2", PixelData=b"\0\0")
    inc = _incoming(ds)
    padded = IncomingInstance(
        file_meta=inc.file_meta, dataset=inc.dataset + b"\xfc\xff\xfc\xffOB\0\0\2\0\0\0\0\0",
        transfer_syntax_uid=inc.transfer_syntax_uid, sop_class_uid=inc.sop_class_uid,
        sop_instance_uid=inc.sop_instance_uid,
    )
    assert parse_fast(padded) is None
    truncated = IncomingInstance(
        file_meta=inc.file_meta, dataset=inc.dataset[:-1],
        transfer_syntax_uid=inc.transfer_syntax_uid, sop_class_uid=inc.sop_class_uid,
        sop_instance_uid=inc.sop_instance_uid,
    )
    assert parse_fast(truncated) is None


def test_fast_parse_without_pixel_data_reports_it(tmp_path: Path) -> None:
    inc = _incoming(_ds(ExplicitVRLittleEndian, PatientID="P", StudyInstanceUID=generate_uid(),
                        SeriesInstanceUID=generate_uid()))
    fast = parse_fast(inc)
    assert fast is not None and not fast.has_pixels and not fast.has_rows_columns


def test_deflated_takes_the_full_parse() -> None:
    name = str(_TEST_FILES / "image_dfl.dcm")
    inc = _incoming(pydicom.dcmread(name))
    assert parse_fast(inc) is None
    assert parse(inc).has_pixels


def _spooled(inc: IncomingInstance, tmp_path: Path, fragment: int = 16384) -> IncomingInstance:
    """The same instance as the network layer hands it over: in a spool, in fragments."""
    from twin_archive.spool import Spool

    spool = Spool(tmp_path)
    spool.write_meta(inc.file_meta)
    for at in range(0, len(inc.dataset), fragment):
        spool.write(inc.dataset[at:at + fragment])
    return IncomingInstance(file_meta=b"", dataset=b"", transfer_syntax_uid=inc.transfer_syntax_uid,
                            sop_class_uid=inc.sop_class_uid, sop_instance_uid=inc.sop_instance_uid,
                            calling_ae="T", spool=spool)


@pytest.mark.parametrize("name", _pydicom_files()[::3], ids=lambda p: Path(p).name)
def test_fast_parse_of_a_spool_matches_full_parse(name: str, tmp_path: Path) -> None:
    inc = _incoming(pydicom.dcmread(name))
    fast = parse_fast(_spooled(inc, tmp_path))
    if fast is not None:
        assert (fast.fields, fast.has_pixels, fast.has_rows_columns) == _full(inc)


def test_header_longer_than_the_spools_head_is_read_from_the_file(tmp_path: Path) -> None:
    from twin_archive.spool import HEAD_BYTES

    ds = _ds(ExplicitVRLittleEndian, PatientID="LONG", Rows=1, Columns=1, BitsAllocated=16,
             BitsStored=16, HighBit=15, PixelRepresentation=0, SamplesPerPixel=1,
             PhotometricInterpretation="MONOCHROME2", PixelData=b"\0\0")
    ds.add_new(0x00091010, "LO", "DICOM_NODE TEST")  # private creator
    ds.add_new(0x00091011, "OB", b"\x01" * (HEAD_BYTES + 1000))  # before Pixel Data
    inc = _incoming(ds)
    spooled = _spooled(inc, tmp_path)
    assert len(spooled.spool.head) == HEAD_BYTES < spooled.spool.size
    fast = parse_fast(spooled)
    assert fast is not None and fast.fields["PatientID"] == "LONG" and fast.has_pixels
    assert (fast.fields, fast.has_pixels, fast.has_rows_columns) == _full(inc)
