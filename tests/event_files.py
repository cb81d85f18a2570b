"""Reads TensorBoard event files back, independently of the writer.

Independent of the writer (tensorboardX) and of TensorBoard's own reader
(tensorboard's EventAccumulator, which test_report.py checks against this
one), the TFRecord framing is read here from its specification:

    uint64 length (little endian)
    uint32 masked CRC-32C of the 8 length bytes
    bytes  data[length]              one serialized `Event` protocol buffer
    uint32 masked CRC-32C of data

masked(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8 (mod 2**32). Both CRCs are
checked with the CRC-32C below (not tensorboardX's), so a torn or corrupt
file fails. The `Event` message is decoded with the proto definitions that
ship with tensorboardX: they are the file format's schema, not its writer.
"""
from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np

_CRC32C_TABLE = []
for _byte in range(256):
    _crc = _byte
    for _ in range(8):
        _crc = (_crc >> 1) ^ (0x82F63B78 if _crc & 1 else 0)   # Castagnoli, reflected
    _CRC32C_TABLE.append(_crc)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(path) -> list[bytes]:
    """The data of every TFRecord in `path`, CRCs checked."""
    blob = Path(path).read_bytes()
    records, offset = [], 0
    while offset < len(blob):
        header = blob[offset:offset + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", blob[offset + 8:offset + 12])
        assert length_crc == masked_crc(header), f"{path}: bad length CRC at byte {offset}"
        data = blob[offset + 12:offset + 12 + length]
        (data_crc,) = struct.unpack("<I", blob[offset + 12 + length:offset + 16 + length])
        assert len(data) == length and data_crc == masked_crc(data), \
            f"{path}: bad data CRC at byte {offset}"
        records.append(data)
        offset += 16 + length
    return records


def read_events(logdir) -> dict:
    """{"scalars": {tag: [(step, value)]}, "images": {tag: [(step, (H, W, 3) uint8)]}}
    over every event file in `logdir`, in file then record order."""
    from PIL import Image
    from tensorboardX.proto import event_pb2

    files = sorted(Path(logdir).glob("events.out.tfevents.*"))
    assert files, f"no event file in {logdir}"
    scalars, images = {}, {}
    for path in files:
        for record in read_records(path):
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
                elif value.HasField("image"):
                    png = Image.open(io.BytesIO(value.image.encoded_image_string))
                    assert png.format == "PNG"
                    pixels = np.asarray(png.convert("RGB"))
                    assert pixels.shape == (value.image.height, value.image.width, 3)
                    images.setdefault(value.tag, []).append((event.step, pixels))
    return {"scalars": scalars, "images": images}
