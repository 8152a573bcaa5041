"""The recipes' resizes in torch (recipes.pil_exact) against the installed Pillow itself: every pixel equal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from recipes import pil_exact
from recipes.imageops import RESAMPLE, BadImage, Op, apply_ops, decode_rgb
from recipes.manifest import load_manifest


def random_image(rng, w, h, smooth=False) -> np.ndarray:
    if smooth:  # gradients and flat areas, where rounding ties are common
        grad = (np.add.outer(np.arange(h) * 3, np.arange(w) * 2) % 256).astype(np.uint8)
        return np.stack([grad, grad[::-1], np.full_like(grad, 128)], axis=-1)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("resample", sorted(pil_exact.FILTERS))
def test_resize_equals_pillow_for_random_sizes(resample):
    rng = np.random.default_rng({"bicubic": 0, "bilinear": 1, "box": 2}[resample])
    for trial in range(60):
        w, h, ow, oh = (int(v) for v in rng.integers(1, 700, 4))
        if trial % 5 == 0:  # one axis unchanged: a single pass
            ow = w
        arr = random_image(rng, w, h, smooth=trial % 3 == 0)
        want = np.asarray(Image.fromarray(arr, "RGB").resize((ow, oh), RESAMPLE[resample]))
        got = pil_exact.resize(torch.from_numpy(arr), ow, oh, resample).numpy()
        assert got.shape == want.shape and np.array_equal(got, want), (w, h, ow, oh, resample)


def test_the_real_recipes_equal_pil_on_real_images(sample_dataset):
    json_path, images = sample_dataset
    m = load_manifest()  # the default manifest: the real recipes
    rgbs = []
    for f in sorted(images.rglob("*.*")):  # the awkward modes and the 12:1 aspect ratio included
        try:
            rgbs.append(decode_rgb(f.read_bytes()))
        except BadImage:
            continue
    assert len(rgbs) >= 20
    for spec in m.teachers.values():
        assert pil_exact.supports(spec.preprocess.ops), spec.task
        for rgb in rgbs:
            want = apply_ops(rgb, spec.preprocess.ops)
            got = pil_exact.apply_ops(torch.from_numpy(np.array(rgb)), spec.preprocess.ops).numpy()
            assert got.shape == (*spec.preprocess.input_size, 3) and np.array_equal(got, want), (spec.task, rgb.size)
    assert pil_exact.self_check({t: s.preprocess.ops for t, s in m.teachers.items()}, "cpu") == []


def test_center_crop_pads_small_images_like_imageops():
    rng = np.random.default_rng(3)
    for w, h in [(5, 300), (300, 5), (224, 224), (230, 229), (1, 1)]:
        arr = random_image(rng, w, h)
        want = apply_ops(Image.fromarray(arr, "RGB"), (Op("center_crop", {"width": 224, "height": 224}),))
        got = pil_exact.center_crop(torch.from_numpy(arr), 224, 224).numpy()
        assert np.array_equal(got, want), (w, h)


def test_pillow_13_pass_order_is_what_its_two_single_passes_give():
    """Pillow 13 runs the vertical pass first when the height shrinks by over twice the width's pixels; with
    any Pillow, a vertical-only resize followed by a horizontal-only one is exactly that order."""
    rng = np.random.default_rng(4)
    checked = 0
    for _ in range(40):
        w, h = (int(v) for v in rng.integers(50, 600, 2))
        ow, oh = int(rng.integers(20, 700)), int(rng.integers(10, max(11, h // 2)))
        if pil_exact.horizontal_first(w, h, ow, oh, pillow=13) or ow == w or oh == h:
            continue
        arr = random_image(rng, w, h)
        im = Image.fromarray(arr, "RGB")
        want = np.asarray(im.resize((w, oh), Image.Resampling.BICUBIC).resize((ow, oh), Image.Resampling.BICUBIC))
        got = pil_exact.resize(torch.from_numpy(arr), ow, oh, "bicubic", pillow=13).numpy()
        assert np.array_equal(got, want), (w, h, ow, oh)
        checked += 1
    assert checked >= 10
    assert pil_exact.horizontal_first(400, 900, 336, 336, pillow=12)  # before 13: always horizontal first
    assert not pil_exact.horizontal_first(400, 900, 336, 336, pillow=13)  # 564 > 2 * 64: vertical first


def test_filters_it_cannot_reproduce_are_refused():
    with pytest.raises(pil_exact.Unsupported, match="lanczos"):
        pil_exact.resize(torch.zeros(4, 4, 3, dtype=torch.uint8), 2, 2, "lanczos")
    assert not pil_exact.supports((Op("resize", {"width": 2, "height": 2, "resample": "nearest"}),))


def test_large_passes_are_chunked_without_changing_a_pixel(monkeypatch):
    rng = np.random.default_rng(5)
    arr = random_image(rng, 333, 500)
    whole = pil_exact.resize(torch.from_numpy(arr), 768, 768, "bicubic")
    monkeypatch.setattr(pil_exact, "GATHER_ELEMENTS", 50_000)  # a few output lines per chunk
    assert torch.equal(pil_exact.resize(torch.from_numpy(arr), 768, 768, "bicubic"), whole)


def test_device_recipes_give_the_targets_of_the_cpu_recipes(sample_dataset, tiny_teachers, monkeypatch):
    """decode (no resizes) -> recipes on the teachers' device -> teachers: the same encoded targets as the PIL
    path, also for an image the decode worker keeps resizing itself because it is too large."""
    from pipeline.extract import decode
    from pipeline.extract.compute import compute_batch
    from pipeline.inputs import load_records
    from teachers.registry import TeacherSet

    json_path, images = sample_dataset
    m = load_manifest(tiny_teachers)
    tasks = ["gen", "depth", "seg"]
    teachers = TeacherSet.load(m, tasks)
    specs = [m.teachers[t] for t in tasks]
    records, _ = load_records(json_path, image_folder=images)
    batch = records[:6]
    enc = dict.fromkeys(tasks, "fp16")
    on_cpu = compute_batch(teachers, decode.decode_batch(batch, specs), enc)
    d = decode.decode_batch(batch, specs, resize_on="device")
    assert d.pixels == {} and len(d.images) == len(d.ids) and all(isinstance(x, np.ndarray) for x in d.images)
    on_device = compute_batch(teachers, d, enc)
    sizes = sorted(int(x.shape[0] * x.shape[1]) for x in d.images)
    monkeypatch.setattr(decode, "DEVICE_RESIZE_MAX_PIXELS", sizes[len(sizes) // 2])  # half of them too large
    mixed_batch = decode.decode_batch(batch, specs, resize_on="device")
    assert any(isinstance(x, dict) for x in mixed_batch.images) and any(isinstance(x, np.ndarray)
                                                                         for x in mixed_batch.images)
    mixed = compute_batch(teachers, mixed_batch, enc)
    for got in (on_device, mixed):
        assert got.ids == on_cpu.ids
        for t in tasks:
            assert np.array_equal(got.values[t], on_cpu.values[t]), t


def test_pillow_13_is_warned_about_on_every_run():
    from pipeline.provenance import image_library_warnings

    libs = {"libjpeg_turbo": "3.0.2", "zlib": "1.3.1"}
    warned = image_library_warnings(None, {"pillow": "13.0.0", **libs})
    assert len(warned) == 1 and "pillow<13" in warned[0] and "vertically first" in warned[0]
    assert image_library_warnings(None, {"pillow": "12.3.0", **libs}) == []
