"""The CPU stage of extraction: read, decode and preprocess one batch of records for every teacher.

A pure function, run in Ray CPU workers (and by tests and the single-process reference as it is). Each sample
fails alone: a missing, empty, truncated, non-image, bomb or escaping file, or a text-only record, becomes a
recorded reason, and its neighbours in the batch go on. Good samples come out, in batch order, either as one
uint8 array per teacher (n_ok, H, W, 3) (`resize_on="cpu"`: the recipes ran here, with PIL) or as the decoded
RGB image of each (`resize_on="device"`: the teachers' device runs the recipes, bit-exactly, recipes.pil_exact;
an image over DEVICE_RESIZE_MAX_PIXELS is still resized here, so that one huge image cannot exhaust the device).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from pipeline.inputs import Record, read_blobs
from recipes.imageops import DEFAULT_MAX_PIXELS, BadImage, check_ops, decode_rgb, read_image_bytes
from recipes.manifest import TeacherSpec
from recipes.preprocess import preprocess
from store import SampleResult, committed_images

RESIZE_ON = ("cpu", "device")
DEVICE_RESIZE_MAX_PIXELS = 16_000_000  # larger images are resized by the decode worker even with resize_on=device


@dataclass
class DecodedBatch:
    pixels: dict[str, np.ndarray]  # task -> uint8 (n_ok, H, W, 3): row k is sample ids[k] (resize_on="cpu")
    samples: list[SampleResult]  # every sample of the batch, in order (good and bad)
    seconds: float  # CPU time spent, for the starvation report
    # resize_on="device": row k is sample ids[k], as its decoded uint8 (h, w, 3) image, or {task: resized (H, W, 3)}
    images: list | None = None

    @property
    def ids(self) -> list[str]:
        """The ids of the pixel rows: the good samples, in batch order."""
        return [s.id for s in self.samples if s.error is None]

    def pixel_payload(self) -> dict:
        """What the teachers get: the pixels (or images) with the id of every row."""
        if self.images is not None:
            return {"ids": self.ids, "images": self.images}
        return {"ids": self.ids, "pixels": self.pixels}

    def without_pixels(self) -> DecodedBatch:
        """What the writer gets: the samples (ids, records, image bytes, errors), no pixels."""
        return DecodedBatch({}, self.samples, self.seconds)


def _fetch(records: list[Record]) -> dict[int, bytes | BadImage]:
    """The batch's images, by position, from where each record says (`Record.at`): a committed shard's from the
    store (one range read each), an input tar's by range (a compressed tar's in one decompressing pass), a parquet
    file's column (one read per row group), a folder's file. A record with a problem or no image is not read."""
    out: dict[int, bytes | BadImage] = {}
    usable = [k for k, r in enumerate(records) if r.problem is None and r.image is not None and r.at is not None]
    by_kind = {kind: [k for k in usable if records[k].at[0] == kind] for kind in ("store", "tar", "folder", "parquet")}
    for shard in sorted({records[k].at[1:3] for k in by_kind["store"]}):
        ks = [k for k in by_kind["store"] if records[k].at[1:3] == shard]
        got = committed_images(shard[0], shard[1], [records[k].at[3:] for k in ks], [records[k].id for k in ks])
        out.update({k: BadImage("the committed shard holds no image for it (it was a bad sample)") if data is None
                    else data for k, data in zip(ks, got, strict=True)})
    out.update(zip(by_kind["tar"], read_blobs([records[k].at for k in by_kind["tar"]]), strict=True))
    if by_kind["parquet"]:
        from pipeline.parquet import read_images

        out.update(zip(by_kind["parquet"], read_images([records[k].at for k in by_kind["parquet"]]), strict=True))
    for k in by_kind["folder"]:
        _, root, rel = records[k].at
        try:
            out[k] = read_image_bytes(root, rel)
        except BadImage as e:
            out[k] = e
    return out


def decode_batch(records: list[Record], specs: list[TeacherSpec], max_pixels: int = DEFAULT_MAX_PIXELS,
                 resize_on: str = "cpu") -> DecodedBatch:
    if resize_on not in RESIZE_ON:
        raise ValueError(f"resize_on must be one of {RESIZE_ON}, got {resize_on!r}")
    t0 = time.process_time()
    samples: list[SampleResult] = []
    arrays: dict[str, list[np.ndarray]] = {s.task: [] for s in specs}
    images: list = []
    fetched = _fetch(records)
    for k, rec in enumerate(records):
        data, error = None, None
        try:
            if rec.problem is not None:
                raise BadImage(f"unusable record: {rec.problem}")
            if rec.image is None:
                raise BadImage("text-only record (no 'image' field): no targets to compute")
            if k not in fetched:
                raise BadImage("the input says nowhere where its image is")
            data = fetched[k]
            if isinstance(data, BadImage):
                bad, data = data, None
                raise bad
            rgb = decode_rgb(data, max_pixels=max_pixels)
            for spec in specs:  # sizes only: a recipe that would blow an image up is refused before any pixel
                check_ops(spec.preprocess.ops, rgb.width, rgb.height)
            if resize_on == "device" and rgb.width * rgb.height <= DEVICE_RESIZE_MAX_PIXELS:
                image = np.asarray(rgb)  # the device runs the recipes
            else:
                image = {spec.task: preprocess(spec, rgb) for spec in specs}
        except BadImage as e:
            error = str(e)
        except Exception as e:  # anything else a hostile file can provoke stays this sample's problem
            error = f"preprocessing failed: {type(e).__name__}: {e}"
        if error is None:
            if resize_on == "device":
                images.append(image)
            else:
                for task, arr in image.items():
                    arrays[task].append(arr)
        samples.append(SampleResult(index=rec.index, id=rec.id, record=rec.raw, image=rec.image,
                                    image_bytes=data, error=error))
    if resize_on == "device":
        return DecodedBatch({}, samples, time.process_time() - t0, images)
    pixels = {}
    for s in specs:
        h, w = s.preprocess.input_size
        pixels[s.task] = np.stack(arrays[s.task]) if arrays[s.task] else np.zeros((0, h, w, 3), np.uint8)
    return DecodedBatch(pixels, samples, time.process_time() - t0)
