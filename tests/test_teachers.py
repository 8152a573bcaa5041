"""Teachers: batched adapters equal a straightforward per-image reference of the original recipe."""

from __future__ import annotations

import io
import math
import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from pipeline import sample
from recipes.manifest import DEFAULT_MANIFEST, ManifestError, load_manifest
from recipes.preprocess import preprocess
from teachers.registry import load_teachers
from teachers.weights import WeightsNotFound

IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def mixed_images() -> list[Image.Image]:
    """Decoded exactly as the original does: Image.open(...).convert('RGB'), over awkward inputs."""
    rng = random.Random(5)
    raw = [sample.draw_scene(sample.random_scene(rng)) for _ in range(3)]
    for kind in sample.ODD_KINDS:  # grayscale, palette, rgba, cmyk, 16-bit, 1 pixel, extreme aspect
        img, ext, _ = sample._odd_image(kind, rng)
        raw.append(img)
    out = []
    for img in raw:
        buf = io.BytesIO()
        img.save(buf, format="PNG" if img.mode not in ("CMYK",) else "JPEG")
        out.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert {im.size for im in out} >= {(1, 1)} and len({im.size for im in out}) >= 8
    return out


# ---- the reference: one image at a time, the original's code path written out -------------------------------

def ref_gen(folder, images):
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

    proc = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                 resample=3, do_center_crop=True, do_normalize=True, do_resize=True)
    model = CLIPVisionModelWithProjection.from_pretrained(folder / "gen", variant="fp16").float().eval()
    with torch.no_grad():
        return [model(proc(images=img, return_tensors="pt").pixel_values).image_embeds for img in images]


def ref_depth(folder, images, swap_rb=True):
    from transformers import DepthAnythingForDepthEstimation

    backbone = DepthAnythingForDepthEstimation.from_pretrained(folder / "depth").backbone.eval()
    emb = backbone.embeddings

    def original_interpolate(embeddings, height, width):  # DINOv2's interpolate_pos_encoding, offset 0.1
        pos = emb.position_embeddings.float()
        n = pos.shape[1] - 1
        m = math.sqrt(n)
        w0, h0 = height // 14 + 0.1, width // 14 + 0.1
        patch = F.interpolate(pos[:, 1:].reshape(1, int(m), int(m), -1).permute(0, 3, 1, 2),
                              scale_factor=(w0 / m, h0 / m), mode="bicubic", antialias=False)
        return torch.cat((pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])), dim=1)

    emb.interpolate_pos_encoding = original_interpolate
    outs = []
    for img in images:
        arr = np.array(img.resize((336, 336)))  # PIL's default filter for RGB: bicubic
        if swap_rb:
            arr = arr[..., ::-1]  # cv2.cvtColor(rgb_array, COLOR_BGR2RGB)
        x = ((arr / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).astype(np.float32)
        with torch.no_grad():
            hs = backbone(torch.from_numpy(x)[None], output_hidden_states=True).hidden_states
            feats = [backbone.layernorm(hs[i + 1])[:, 1:] for i in (4, 11, 17, 23)]
        outs.append(((feats[0] + feats[1] + feats[2] + feats[3]) / 4)[0])
    return outs


def ref_seg(folder, images):
    from transformers import OneFormerForUniversalSegmentation, OneFormerImageProcessorPil

    proc = OneFormerImageProcessorPil()  # shortest edge 800 (max 1333), bilinear, ImageNet mean/std
    model = OneFormerForUniversalSegmentation.from_pretrained(folder / "seg").eval()
    outs = []
    for img in images:
        inputs = proc(images=img.resize((768, 768)), task_inputs=["panoptic"], return_tensors="pt")
        with torch.no_grad():
            fmap = model.model.pixel_level_module.encoder(inputs["pixel_values"]).feature_maps[-1]
            fmap = F.interpolate(fmap, size=(24, 24), mode="bilinear", align_corners=False)
        outs.append(fmap.flatten(2).transpose(1, 2)[0])
    return outs


def batched(teacher, images, batch_size=4):
    outs = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.stack([preprocess(teacher.spec, im) for im in images[i:i + batch_size]]))
        outs.append(teacher(x))
    return torch.cat(outs)


@pytest.fixture(scope="module")
def loaded(tiny_teachers):
    return load_teachers(load_manifest(tiny_teachers), ["gen", "depth", "seg"])


@pytest.fixture(scope="module")
def images():
    return mixed_images()


@pytest.mark.parametrize("task", ["gen", "depth", "seg"])
def test_batched_equals_per_image_reference(task, loaded, images, tiny_teachers):
    folder = tiny_teachers.parent
    # one target per image, stacked: gen (1, D), depth (576, D), seg (576, C) each
    ref = torch.stack({"gen": ref_gen, "depth": ref_depth, "seg": ref_seg}[task](folder, images))
    got = batched(loaded[task], images)
    assert got.shape == ref.shape == (len(images), *loaded[task].spec.output_shape)
    scale = ref.abs().max().item()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * max(scale, 1.0))


def test_preprocessing_is_bit_exact_uint8(loaded, images):
    """The CPU resizes give exactly the uint8 pixels of the original's PIL calls."""
    from transformers import CLIPImageProcessorPil, OneFormerImageProcessorPil

    clip = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
                                 do_rescale=False, do_normalize=False)
    one = OneFormerImageProcessorPil(do_rescale=False, do_normalize=False)
    for img in images:
        want_gen = clip(images=img, return_tensors="np").pixel_values[0].transpose(1, 2, 0)
        assert np.array_equal(preprocess(loaded["gen"].spec, img), want_gen.astype(np.uint8))
        assert np.array_equal(preprocess(loaded["depth"].spec, img), np.array(img.resize((336, 336))))
        want_seg = one(images=img.resize((768, 768)), task_inputs=["panoptic"], return_tensors="np")
        assert np.array_equal(preprocess(loaded["seg"].spec, img), want_seg.pixel_values[0].transpose(1, 2, 0))


def test_corrected_fidelity_swaps_back_to_rgb(tiny_teachers, images):
    original = load_manifest(tiny_teachers)
    corrected = load_manifest(tiny_teachers, fidelity="corrected")
    assert original.teachers["depth"].preprocess.channel_order == "BGR"
    assert corrected.teachers["depth"].preprocess.channel_order == "RGB"
    assert corrected.teachers["depth"].recipe_hash() != original.teachers["depth"].recipe_hash()
    assert original.teachers["depth"].quirks_applied == ("preprocess.channel_order",)
    depth = load_teachers(corrected, ["depth"])["depth"]
    ref = torch.stack(ref_depth(tiny_teachers.parent, images[:3], swap_rb=False))
    torch.testing.assert_close(batched(depth, images[:3]), ref, rtol=1e-4, atol=1e-5)
    # the other teachers have no quirk: same recipe either way
    assert corrected.teachers["seg"].recipe_hash() == original.teachers["seg"].recipe_hash()


def test_save_load_round_trip_and_weights_hash(tiny_teachers, tmp_path, loaded):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_teachers.parent, copy)
    again = load_teachers(load_manifest(copy / "teachers.yaml"), ["gen", "depth", "seg"])
    x = torch.from_numpy(np.stack([preprocess(loaded["depth"].spec, img) for img in mixed_images()[:2]]))
    for task in ("gen", "depth", "seg"):
        assert again[task].weights_sha256 == loaded[task].weights_sha256
    torch.testing.assert_close(again["depth"](x), loaded["depth"](x), rtol=0, atol=0)
    # different weights, different hash
    from teachers.tiny import build

    other = build(tmp_path / "other", seed=1)
    assert load_teachers(load_manifest(other), ["gen"])["gen"].weights_sha256 != loaded["gen"].weights_sha256


def test_missing_checkpoint_errors_are_clear(tmp_path, tiny_teachers):
    data = yaml.safe_load(tiny_teachers.read_text())
    data["teachers"]["seg"]["weights"] = {"path": str(tmp_path / "nowhere")}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(WeightsNotFound, match=r"teacher 'seg'.*nowhere.*does not exist"):
        load_teachers(load_manifest(tmp_path / "m.yaml"), ["seg"])
    # an HF id that is not cached, offline: names the repo and how to get it
    real = load_manifest(DEFAULT_MANIFEST)
    with pytest.raises(WeightsNotFound) as e:
        load_teachers(real, ["depth"])
    msg = str(e.value)
    assert "depth-anything/Depth-Anything-V2-Large-hf" in msg and "huggingface-cli download" in msg
    # the wrong checkpoint for an architecture: missing tensors, not random layers
    data["teachers"]["seg"]["weights"] = {"path": str(tiny_teachers.parent / "depth")}
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(WeightsNotFound):
        load_teachers(load_manifest(tmp_path / "w.yaml"), ["seg"])


def test_unknown_teacher_and_bad_manifests(tmp_path, tiny_teachers):
    m = load_manifest(tiny_teachers)
    with pytest.raises(ManifestError, match=r"unknown teacher.*'sam'.*defines gen, depth, seg"):
        load_teachers(m, ["gen", "sam"])
    bad = yaml.safe_load(tiny_teachers.read_text())
    bad["teachers"]["depth"]["preprocess"]["ops"][0]["resample"] = "magic"
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ManifestError, match="unknown resample 'magic'"):
        load_manifest(tmp_path / "b.yaml")
    bad = yaml.safe_load(tiny_teachers.read_text())
    bad["format"] = "olaf.teachers/99"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ManifestError, match="olaf.teachers/1"):
        load_manifest(tmp_path / "c.yaml")


def test_default_manifest_matches_the_spec():
    m = load_manifest()
    assert [t for t in m.teachers] == ["gen", "depth", "seg"]
    assert m.teachers["gen"].output_shape == (1, 1024)
    assert m.teachers["depth"].output_shape == (576, 1024)
    assert m.teachers["seg"].output_shape == (576, 1536)
    assert m.teachers["depth"].feature["blocks"] == [4, 11, 17, 23]
    assert m.teachers["depth"].preprocess.channel_order == "BGR"
    assert m.teachers["seg"].preprocess.input_size == (800, 800)
    assert m.teachers["gen"].weights.subfolder == "image_encoder"


def test_full_size_configs_give_the_spec_shapes():
    """Real-size architectures (random weights, built from config objects), one real-size image each."""
    from teachers import depth, gen, seg
    from teachers.registry import ADAPTERS

    m = load_manifest()
    img = sample.draw_scene(sample.random_scene(random.Random(0)))
    for task, mod in (("gen", gen), ("depth", depth), ("seg", seg)):
        spec = m.teachers[task]
        teacher = ADAPTERS[spec.architecture].random(spec, mod.full_config())
        n_params = sum(p.numel() for p in teacher.parameters())
        assert n_params > {"gen": 6e8, "depth": 3e8, "seg": 1.9e8}[task]
        out = teacher(torch.from_numpy(preprocess(spec, img))[None])
        assert tuple(out.shape) == (1, *{"gen": (1, 1024), "depth": (576, 1024), "seg": (576, 1536)}[task])
        assert torch.isfinite(out).all()
        del teacher


def test_a_sample_that_breaks_a_teacher_fails_alone(loaded):
    from teachers.registry import TeacherSet

    class Fragile(torch.nn.Module):  # fails on any batch holding the poisoned image
        def __init__(self, inner):
            super().__init__()
            self.inner, self.spec = inner, inner.spec

        def forward(self, x):
            if (x[:, 0, 0, 0] == 7).any():
                raise RuntimeError("kernel failure")
            return self.inner(x)

    images = mixed_images()[:3]
    pixels = np.stack([preprocess(loaded["gen"].spec, im) for im in images])
    pixels[1, 0, 0, 0] = 7
    ts = TeacherSet({"gen": Fragile(loaded["gen"])}, "cpu")
    out, errors = ts.run({"gen": pixels})
    assert list(errors["gen"]) == [1] and "kernel failure" in errors["gen"][1]
    assert torch.equal(out["gen"][1], torch.zeros_like(out["gen"][1]))
    torch.testing.assert_close(out["gen"][[0, 2]], loaded["gen"](torch.from_numpy(pixels[[0, 2]])))
    out, errors = ts.run({"gen": pixels[1:2]})  # alone in its batch: recorded, not raised
    assert list(errors["gen"]) == [0]

    class NaNs(torch.nn.Module):
        spec = loaded["gen"].spec

        def forward(self, x):
            return torch.full((len(x), 1, 16), float("nan"))

    out, errors = TeacherSet({"gen": NaNs()}, "cpu").run({"gen": pixels})
    assert set(errors["gen"]) == {0, 1, 2} and "non-finite" in errors["gen"][0] and not out["gen"].isnan().any()


def test_shape_true_stand_ins_give_the_real_target_shapes(tmp_path):
    """`teachers.tiny --shape-true`: the real recipes and output shapes behind cheap models, loaded through the
    real loading path (so the data path can be measured at real sizes anywhere)."""
    import numpy as np

    from recipes.manifest import load_manifest
    from teachers.registry import TeacherSet
    from teachers.tiny import build

    real = load_manifest()
    m = load_manifest(build(tmp_path, shape_true=True))
    ts = TeacherSet.load(m, ["gen", "depth", "seg"])
    for t in ("gen", "depth", "seg"):
        assert m.teachers[t].output_shape == real.teachers[t].output_shape  # 1x1024, 576x1024, 576x1536
        assert m.teachers[t].preprocess == real.teachers[t].preprocess  # the decode work is the real one
    rng = np.random.default_rng(0)
    pixels = {t: rng.integers(0, 256, (2, *m.teachers[t].preprocess.input_size, 3), dtype=np.uint8) for t in ts.teachers}
    outs, errors = ts.run(pixels)
    assert {t: tuple(o.shape[1:]) for t, o in outs.items()} == {t: real.teachers[t].output_shape for t in outs}
    assert all(not e for e in errors.values()) and all(o.std() > 0 for o in outs.values())
    assert len(set(ts.weights_sha256().values())) == 3


def test_shortest_edge_sizes_follow_transformers_get_resize_output_image_size():
    """20,000 random sizes, capped or not: the output size is what transformers' own function gives (the rule
    CLIPImageProcessor and, in the original's transformers 4.x, OneFormerImageProcessor resize with)."""
    from transformers.image_transforms import get_resize_output_image_size

    from recipes.imageops import shortest_edge_size

    rng = random.Random(0)
    capped = 0
    for _ in range(20_000):
        w, h = rng.randint(1, 5000), rng.randint(1, 5000)
        size = rng.choice([224, 336, 518, 800, rng.randint(16, 1024)])
        max_size = rng.choice([None, 1333, size + rng.randint(1, 2000)])
        image = np.broadcast_to(np.zeros(1, np.uint8), (h, w, 3))  # only its shape is read
        want_h, want_w = get_resize_output_image_size(image, size, default_to_square=False, max_size=max_size,
                                                      input_data_format="channels_last")
        assert shortest_edge_size(w, h, size, max_size) == (want_w, want_h), (w, h, size, max_size)
        capped += max_size is not None and max(w, h) / min(w, h) * size > max_size
    assert capped > 2000  # the cap was exercised, not only the plain rule


def test_weights_path_honours_the_subfolder_and_unexpected_tensors_are_refused(tmp_path, tiny_teachers, loaded):
    from safetensors.torch import load_file, save_file

    data = yaml.safe_load(tiny_teachers.read_text())
    source = tiny_teachers.parent / "depth"

    def manifest_for(weights: dict, name: str):
        d = json_copy(data)
        d["teachers"]["depth"]["weights"] = weights
        (tmp_path / name).write_text(yaml.safe_dump(d))
        return load_manifest(tmp_path / name)

    # path + subfolder: the checkpoint is in path/subfolder, and only there
    shutil.copytree(source, tmp_path / "pkg" / "depth_here")
    got = load_teachers(manifest_for({"path": str(tmp_path / "pkg"), "subfolder": "depth_here"}, "a.yaml"), ["depth"])
    assert got["depth"].weights_sha256 == loaded["depth"].weights_sha256
    with pytest.raises(WeightsNotFound, match="depth_there does not exist"):
        load_teachers(manifest_for({"path": str(tmp_path / "pkg"), "subfolder": "depth_there"}, "b.yaml"), ["depth"])
    # a tensor in the backbone's own namespace that fits nothing: another variant, refused and named
    tensors = load_file(source / "model.safetensors")
    prefix = next(k for k in tensors if k.startswith("backbone.")).split(".")[:2]  # e.g. backbone.encoder
    for name, extra in (("inside", ".".join(prefix) + ".extra_layer.weight"), ("outside", "elsewhere.weight")):
        folder = tmp_path / name
        shutil.copytree(source, folder)
        save_file({**tensors, extra: torch.zeros(3)}, folder / "model.safetensors")
        m = manifest_for({"path": str(folder)}, f"{name}.yaml")
        if name == "inside":
            with pytest.raises(WeightsNotFound, match=r"1 unexpected tensor.*extra_layer"):
                load_teachers(m, ["depth"])
        else:  # the checkpoint's other parts (head, neck, ...) are not the teacher's: ignored by design
            assert load_teachers(m, ["depth"])["depth"].weights_sha256 == loaded["depth"].weights_sha256


def json_copy(d):
    import json

    return json.loads(json.dumps(d))


def test_each_teacher_runs_in_its_own_compute_dtype(tmp_path, tiny_teachers, images):
    """The released manifest declares the original's dtypes (gen float16; depth, seg bfloat16); a run resolves
    them per device, loads each teacher in its own, and the identity records what was used, which readers
    compare."""
    from recipes.manifest import compute_dtypes
    from store import teacher_mismatches

    real = load_manifest(DEFAULT_MANIFEST)
    assert {t: s.compute_dtype for t, s in real.teachers.items()} == {"gen": "float16", "depth": "bfloat16",
                                                                     "seg": "bfloat16"}
    tasks = ["gen", "depth", "seg"]
    assert compute_dtypes(real, tasks, "cuda") == {"gen": "float16", "depth": "bfloat16", "seg": "bfloat16"}
    assert compute_dtypes(real, tasks, "cpu") == dict.fromkeys(tasks, "float32")
    assert compute_dtypes(real, tasks, "cuda", "float32") == dict.fromkeys(tasks, "float32")
    # honoured: every teacher in its own dtype, outputs within that dtype's rounding of float32
    m = load_manifest(tiny_teachers)
    mixed = {"gen": torch.float32, "depth": torch.bfloat16, "seg": torch.float32}
    got, ref = load_teachers(m, tasks, dtype=mixed), load_teachers(m, tasks)
    for t in tasks:
        assert {p.dtype for p in got[t].parameters()} == {mixed[t]}
    x = torch.from_numpy(np.stack([preprocess(m.teachers["depth"], img) for img in images[:2]]))
    a, b = got["depth"](x).float(), ref["depth"](x).float()
    rel = ((a - b).norm() / b.norm()).item()
    assert 1e-4 < rel < 3e-2, rel  # bfloat16 rounding: not float32, not garbage
    # recorded: the identity holds the dtypes a run used; another dtype than expected is a mismatch
    used = m.identity(tasks, compute_dtypes={"gen": "float32", "depth": "bfloat16", "seg": "float32"})
    assert used["teachers"]["depth"]["compute_dtype"] == "bfloat16"
    bad, _ = teacher_mismatches(used, m.identity(tasks), tasks)
    assert bad == [bad[0]] and "depth: computed in bfloat16, expected float32" in bad[0]
    old = m.identity(tasks)
    for v in old["teachers"].values():
        del v["compute_dtype"]  # a store from before dtypes were recorded: accepted, with a note
    bad, notes = teacher_mismatches(old, m.identity(tasks), tasks)
    assert bad == [] and len(notes) == 3 and "does not record the dtype" in notes[0]
