"""Probing from stores (the paper's Section 3): any image folder as a dataset, probes at every layer of a frozen
MLLM for every task, one MLLM forward per batch, cosine similarity per (task, layer)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from pipeline.inputs import load_records
from pipeline.llava import main as llava_main


def _jpeg(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), color).save(path)


def test_from_images_takes_nested_folders_and_says_what_it_skips(tmp_path):
    root = tmp_path / "imgs"
    _jpeg(root / "a" / "cat.jpg", (255, 0, 0))
    _jpeg(root / "b" / "cat.jpg", (0, 255, 0))  # the same name in another folder: another sample
    _jpeg(root / "b" / "deep" / "dog.png", (0, 0, 255))
    _jpeg(root / "a" / "cat.png", (9, 9, 9))  # differs from a/cat.jpg only in extension: same id, skipped
    (root / "notes.txt").write_text("not an image")
    (root / "b" / "README").write_text("no extension")
    out = tmp_path / "ds.json"
    assert llava_main(["from-images", str(root), "--out", str(out)]) == 0
    records, n = load_records(out)  # a LLaVA JSON extraction reads
    assert n == 3 and [r.id for r in records] == ["a/cat", "b/cat", "b/deep/dog"]
    assert [r.image for r in records] == ["a/cat.jpg", "b/cat.jpg", "b/deep/dog.png"]
    assert records[0].raw["conversations"][0]["value"] == "<image>\nDescribe the image in two lines."
    skipped = [json.loads(x) for x in (tmp_path / "ds.json.skipped.jsonl").read_text().splitlines()]
    assert {s["path"]: s["reason"].split(" (")[0] for s in skipped} == {
        "a/cat.png": "same id 'a/cat' as a/cat.jpg", "notes.txt": "not an image file", "b/README": "not an image file"}
    # a COCO caption file: its ids and first captions; an image it names that is not there is said
    coco = {"images": [{"id": 139, "file_name": "dog.png"}, {"id": 7, "file_name": "gone.jpg"}],
            "annotations": [{"image_id": 139, "caption": " A dog. "}, {"image_id": 139, "caption": "Another."}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    assert llava_main(["from-images", str(root), "--coco", str(tmp_path / "captions.json"), "--query", "Q?",
                       "--out", str(tmp_path / "coco.json")]) == 0
    coco_records, _ = load_records(tmp_path / "coco.json")
    assert [(r.id, r.image, r.caption()) for r in coco_records] == [("139", "b/deep/dog.png", "A dog.")]
    assert "gone.jpg" in (tmp_path / "coco.json.skipped.jsonl").read_text()
    assert llava_main(["from-images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.json")]) == 2
    assert np.asarray(Image.open(root / records[2].image)).shape == (30, 40, 3)


# ---- the probes -------------------------------------------------------------------------------------------------

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import call  # noqa: E402

from trainer.probe import run as probe_command  # noqa: E402


def test_cosine_is_the_flattened_cosine_of_each_sample():
    from trainer.probe import cosine

    g = np.random.default_rng(0)
    p, t = g.normal(size=(5, 7, 3)), g.normal(size=(5, 7, 3))
    want = [float(a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(p, t, strict=True)]
    np.testing.assert_allclose(cosine(torch.tensor(p), torch.tensor(t)).numpy(), want, rtol=1e-6)


def _learnable_store(path: Path, tiny_models: Path, tiny_teachers: Path, n: int, seed: int) -> Path:
    """A store whose targets are a fixed random projection of the tiny CLIP tower's features of each image, so a
    probe reading the MLLM's layers has something to learn."""
    import store
    from pipeline.inputs import load_records
    from pipeline.sample import generate
    from recipes.manifest import load_manifest
    from store import encodings
    from trainer.data import ImageRecipe
    from trainer.towers import load_tower

    ds = path.parent / f"{path.name}-data"
    json_path = generate(ds, num_samples=n, seed=seed)
    records, _ = load_records(json_path)
    tower_dir = str(Path(tiny_models).parent / "clip_vision_tower")
    recipe, tower = ImageRecipe.from_pretrained(tower_dir, "square"), load_tower(tower_dir, -2, torch.float32)
    g = torch.Generator().manual_seed(123)
    w_depth, w_gen = torch.randn(32, 8, generator=g), torch.randn(32, 16, generator=g)
    mean, std = torch.tensor(recipe.mean).view(1, 3, 1, 1), torch.tensor(recipe.std).view(1, 3, 1, 1)
    shapes = {"gen": (1, 16), "depth": (576, 8)}
    m = store.RunManifest(dataset={"json": str(json_path)}, num_samples=n, shard_size=8, formats=["wds"],
                          tasks={t: store.TaskLayout.for_shape(s, "fp16") for t, s in shapes.items()})
    w = store.StoreWriter.create(path, m, load_manifest(tiny_teachers).identity(["gen", "depth"]))
    for i in range(m.num_shards):
        a, b = m.shard_range(i)
        imgs = [(ds / "images" / r.image).read_bytes() for r in records[a:b]]
        x = torch.stack([torch.from_numpy(recipe(im)).permute(2, 0, 1).float() / 255 for im in imgs])
        with torch.no_grad():
            f = tower.features((x - mean) / std)  # (B, 576, 32)
        f = torch.nn.functional.layer_norm(f, f.shape[-1:])
        vals = {"depth": encodings.encode(f @ w_depth, "fp16")[0],
                "gen": encodings.encode((f.mean(1, keepdim=True) @ w_gen), "fp16")[0]}
        samples = [store.SampleResult(r.index, r.id, r.raw, r.image, im) for r, im in zip(records[a:b], imgs, strict=True)]
        w.commit_shard(store.ShardResult(i, ("gen", "depth"), samples, vals, dict.fromkeys(shapes),
                                                   {t: np.ones(b - a, bool) for t in shapes}))
    return path


@pytest.fixture(scope="module")
def probe_setup(tmp_path_factory, tiny_models, tiny_teachers):
    from trainer.sequence import Projector

    root = tmp_path_factory.mktemp("probe")
    train = _learnable_store(root / "train", tiny_models, tiny_teachers, 32, 1)
    val = _learnable_store(root / "val", tiny_models, tiny_teachers, 16, 2)
    torch.manual_seed(0)
    proj = Projector(32, 64)  # the tiny tower's and LLM's widths
    torch.save({f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()}, root / "mm_projector.bin")
    return train, val, root / "mm_projector.bin"


def probe(args):
    return call(probe_command, args)


LEARN_STEPS = 8  # the learnable store's targets are a fixed projection of the tower's features: quick to learn


def test_probes_learn_from_the_store_with_one_mllm_forward_per_batch(tmp_path, probe_setup, tiny_models, tiny_teachers):
    train, val, proj = probe_setup
    llm = str(Path(tiny_models).parent / "llm")
    tower = str(Path(tiny_models).parent / "clip_vision_tower")
    common = ["--store", str(train), "--eval-store", str(val), "--model", llm, "--vision-tower", tower,
              "--mm-projector", str(proj), "--teachers-manifest", str(tiny_teachers), "--layers", "1,10,20",
              "--set", "global_batch_size=8", "--set", "micro_batch_size=4", "--set", "num_workers=0",
              "--set", "learning_rate=1e-2", "--set", "log_every=1", "--set", "tensorboard=false"]
    scores = {}
    for steps in (1, LEARN_STEPS):
        out = tmp_path / f"steps{steps}"
        rc, log = probe([*common, "--output-dir", str(out), "--max-steps", str(steps)])
        assert rc == 0, log
        data = json.loads((out / "probe_scores.json").read_text())
        scores[steps] = data["scores"]
        assert data["samples"] == {"gen": 16, "depth": 16}
        # one MLLM forward per micro-batch, whatever the number of probes (2 tasks x 3 layers = 6):
        # 2 per step of 8, plus the evaluation's 4 batches of 4
        assert data["mllm_forwards"] == 2 * steps + 4
        assert sorted(p.name for p in (out / "probes").iterdir()) == sorted(
            f"{t}_{x}.safetensors" for t in ("gen", "depth") for x in (1, 10, 20))
        rows = (out / "probe_scores.csv").read_text().splitlines()
        assert rows[0] == "task,layer,cosine,samples" and len(rows) == 7
        assert (out / "probe_plot.png").is_file()
    for t in ("gen", "depth"):
        for layer in ("1", "10", "20"):
            learned, barely = scores[LEARN_STEPS][t][layer], scores[1][t][layer]
            assert learned > barely + 0.05, (t, layer, barely, learned)
    rc, log = probe(["plot", str(tmp_path / "steps1"), str(tmp_path / f"steps{LEARN_STEPS}"), "--out",
                     str(tmp_path / "both.png")])
    assert rc == 0 and (tmp_path / "both.png").is_file()


def test_a_llava_hf_checkpoint_is_probed_as_it_is(tmp_path, probe_setup, tiny_models, tiny_teachers):
    """A transformers LlavaForConditionalGeneration (the form llava-hf/llava-1.5-7b-hf comes in)."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    train, val, _ = probe_setup
    tok = AutoTokenizer.from_pretrained(Path(tiny_models).parent / "llm")
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=3, num_attention_heads=2),
                      text_config=LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
                      vision_feature_layer=-2, image_token_index=0)
    folder = tmp_path / "llava-hf"
    LlavaForConditionalGeneration(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(folder)
    out = tmp_path / "out"
    rc, log = probe(["--store", str(train), "--eval-store", str(val), "--model", str(folder), "--output-dir", str(out),
                     "--teachers-manifest", str(tiny_teachers), "--max-steps", "2", "--set", "global_batch_size=4",
                     "--set", "micro_batch_size=4", "--set", "num_workers=0"])
    assert rc == 0, log
    data = json.loads((out / "probe_scores.json").read_text())
    assert data["layers"] == [1, 2, 3, 4] and all(v == v for s in data["scores"].values() for v in s.values())
    assert "LlavaForConditionalGeneration" in log


def test_an_olaf_pt_export_is_probed_with_its_task_tokens(tmp_path, probe_setup, trained, tiny_teachers):
    """Form (a): a trainer.pt run's export/ (its LLM, tower, projector and task tokens, pooled to 8); probing
    resumed from its step-2 checkpoint continues with the uninterrupted run's losses (trainer.pt's loop)."""
    train, val, _ = probe_setup
    common = ["--store", str(train), "--eval-store", str(val), "--model", str(trained / "export"), "--layers", "5,20",
              "--teachers-manifest", str(tiny_teachers), "--set", "global_batch_size=4", "--set", "micro_batch_size=4",
              "--set", "num_workers=0", "--set", "log_every=1", "--set", "save_every=1", "--set", "keep_checkpoints=0",
              "--set", "tensorboard=false"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    rc, log = probe([*common, "--output-dir", str(whole), "--max-steps", "3"])
    assert rc == 0, log
    assert "probing olaf PT export" in log
    import shutil

    (part / "checkpoints").mkdir(parents=True)  # the run as it was after step 2 (what a killed run leaves)
    shutil.copytree(whole / "checkpoints" / "step-000002", part / "checkpoints" / "step-000002")
    shutil.copytree(whole / "logs", part / "logs")
    rc, log = probe([*common, "--output-dir", str(part), "--max-steps", "3", "--resume"])
    assert rc == 0 and "resumed from" in log, log
    lines = lambda d: [json.loads(x) for x in (d / "logs" / "train.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = lines(whole), lines(part)
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)


def test_an_export_is_probed_with_the_sequence_pt_trained(trained, tmp_path):
    """One sequence model: probing an export feeds the LLM exactly what the PT model fed it -- the image, then
    the task tokens in PT's order (gen, depth, seg), then the text -- whether it is RUN/export or the folder
    --format ola-vlm writes for the authors (read back as theirs)."""
    from safetensors.torch import load_file

    from trainer.build import build
    from trainer.config import load_config, without_resume
    from trainer.formats import read

    cfg = load_config(recorded=without_resume(json.loads((trained / "config.json").read_text())))
    run = build(cfg, torch.device("cpu"), torch.float32)
    weights = load_file(sorted((trained / "checkpoints").glob("step-*"))[-1] / "trainable.safetensors")
    missing, _ = run.model.load_state_dict(weights, strict=False)
    assert not [k for k in missing if k.startswith(("projector.", "special_tokens."))]
    probed = read(cfg, str(trained / "export"), None, torch.float32).mllm()
    batch = next(iter(run.stream))
    with torch.no_grad():
        want, want_mask = run.model.inputs(batch)
        got, got_mask = probed.inputs(batch)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(got_mask, want_mask)
    from trainer.export import main as export

    assert export([str(trained), "--format", "ola-vlm", "--out", str(tmp_path / "ola")]) == 0
    authors = read(cfg, str(tmp_path / "ola"), None, torch.float32)
    assert authors.what.startswith("ola_llama folder")
    with torch.no_grad():
        got, _ = authors.mllm().inputs(batch)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _authors_ola_llama_folder(folder: Path, tiny_models: Path, aux_mode: str = "depth-seg-gen") -> dict:
    """A tiny model folder as the authors release OLA-VLM IFT models (shi-labs/OLA-VLM-CLIP-ViT-Llama3-8b), built
    here from their config fields and tensor names (ola_vlm/model/ola_arch.py, language_model/ola_llama.py):
    config.json with model_type ola_llama, the 4.x LLM fields, mm_* and the OLA fields; model.safetensors with
    the LLM, model.vision_tower.vision_tower.vision_model.*, model.mm_projector.{0,2}, model.special_*_tokens and
    heads their IFT keeps. Returns the tensors it wrote beyond the LLM's."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

    root = Path(tiny_models).parent
    llm = AutoModelForCausalLM.from_pretrained(root / "llm", dtype=torch.float32)
    tower_dir = root / "clip_vision_tower"
    tower = CLIPVisionModel.from_pretrained(tower_dir)
    H = llm.config.hidden_size
    g = torch.Generator().manual_seed(7)
    extra = {"model.mm_projector.0.weight": torch.randn(H, 32, generator=g) * 0.1,
             "model.mm_projector.0.bias": torch.zeros(H), "model.mm_projector.2.weight": torch.randn(H, H, generator=g) * 0.1,
             "model.mm_projector.2.bias": torch.zeros(H), "model.special_gen_tokens": torch.randn(8, H, generator=g),
             "model.special_depth_tokens": torch.randn(576, H, generator=g),
             "model.special_seg_tokens": torch.randn(576, H, generator=g),
             "image_depth_heads.0.projector.proj_in.weight": torch.randn(4, H, generator=g)}
    tensors = {k: v.contiguous() for k, v in llm.state_dict().items()}
    tensors |= {f"model.vision_tower.vision_tower.vision_model.{k}": v.contiguous() for k, v in tower.state_dict().items()}
    folder.mkdir(parents=True)
    save_file({**tensors, **extra}, folder / "model.safetensors", metadata={"format": "pt"})
    c = llm.config.to_dict()
    config = {k: v for k, v in c.items() if k not in ("rope_parameters", "dtype")}
    config |= {"model_type": "ola_llama", "architectures": ["OlaLlavaLlamaForCausalLM"], "torch_dtype": "bfloat16",
               "rope_theta": c["rope_parameters"]["rope_theta"], "rope_scaling": None,
               "mm_vision_tower": str(tower_dir), "mm_vision_select_layer": -2, "mm_projector_type": "mlp2x_gelu",
               "mm_hidden_size": 32, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
               "mm_patch_merge_type": "flat", "aux_mode": aux_mode, "num_task_tokens": 8,
               "task_token_format": "expand_emb", "image_depth": {"num_tokens": 576, "depth_layer_indices": "8-20"}}
    (folder / "config.json").write_text(json.dumps(config))
    AutoTokenizer.from_pretrained(root / "llm").save_pretrained(folder)
    return extra


def test_an_authors_ola_llama_folder_is_probed_end_to_end(tmp_path, probe_setup, tiny_models, tiny_teachers):
    """Their released form: task tokens in their aux_mode order, depth and seg pooled 576 -> 8, the tower their
    config names, their projector, `pad` aspect; the probes train with the task tokens and are evaluated without
    them (their probe_mode) unless --task-tokens keep."""
    from trainer.config import load_config
    from trainer.formats import read

    train, val, _ = probe_setup
    folder = tmp_path / "OLA-VLM-CLIP-ViT-Llama3-tiny"
    extra = _authors_ola_llama_folder(folder, tiny_models)
    cfg = load_config([Path(__file__).parents[1] / "trainer" / "configs" / "probe.yaml"],
                      {"store": str(train), "output_dir": str(tmp_path / "x"), "llm": str(folder)})
    probed = read(cfg, str(folder), None, torch.float32)
    assert probed.token_order == ("depth", "seg", "gen") and probed.image.aspect == "pad"
    assert probed.template == "llama_3" and probed.decoder.config.rope_parameters["rope_theta"] == 500000.0
    mllm, bare = probed.mllm(), probed.mllm(with_task_tokens=False)
    assert list(mllm.layout.task_slots) == ["depth", "seg", "gen"] and bare.layout.task_slots == {}
    batch = {"pixels": torch.randint(0, 255, (2, 336, 336, 3), dtype=torch.uint8),
             "prefix_ids": torch.full((2, mllm.layout.prefix), 5),
             "text_ids": torch.tensor([[5, 6, 7]] * 2), "text_mask": torch.ones(2, 3, dtype=torch.long)}
    with torch.no_grad():
        embeds, _ = mllm.inputs(batch)
        plain, _ = bare.inputs(batch)
    start = mllm.layout.prefix + mllm.layout.image
    want = torch.cat([extra["model.special_depth_tokens"].view(8, 72, -1).mean(1),
                      extra["model.special_seg_tokens"].view(8, 72, -1).mean(1), extra["model.special_gen_tokens"]])
    torch.testing.assert_close(embeds[0, start:start + 24], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cat([embeds[:, :start], embeds[:, start + 24:]], 1), plain)
    proj = torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(
        probed.tower.features(torch.zeros(1, 3, 336, 336)), extra["model.mm_projector.0.weight"])),
        extra["model.mm_projector.2.weight"])
    torch.testing.assert_close(probed.projector(probed.tower.features(torch.zeros(1, 3, 336, 336))), proj)
    for keep in ("drop", "keep"):
        out = tmp_path / f"run-{keep}"
        rc, log = probe(["--store", str(train), "--eval-store", str(val), "--model", str(folder), "--layers", "2,20",
                         "--teachers-manifest", str(tiny_teachers), "--output-dir", str(out), "--max-steps", "2",
                         "--task-tokens", keep, "--set", "global_batch_size=4", "--set", "micro_batch_size=4",
                         "--set", "num_workers=0"])
        assert rc == 0, log
        assert "ola_llama folder" in log
        data = json.loads((out / "probe_scores.json").read_text())
        assert data["protocol"]["eval_task_tokens"] == ([] if keep == "drop" else ["depth", "seg", "gen"])
        assert data["protocol"]["image_aspect"] == "pad" and data["protocol"]["eval_resize"] == 640
        assert all(v == v for s in data["scores"].values() for v in s.values())


def test_probe_prompts_carry_no_answer_text_by_default(tmp_path, probe_setup, tiny_models, tiny_teachers):
    """from-images --coco puts each image's caption in its record; the probes must not read it: training prompts
    answer with their fixed "n", evaluation prompts end at the assistant header (eval_probe_dsg.py)."""
    from trainer.config import load_config
    from trainer.probe import build_probe
    from trainer.templates import question_and_caption

    train, _, proj = probe_setup
    root = Path(tiny_models).parent
    cfg = load_config([Path(__file__).parents[1] / "trainer" / "configs" / "probe.yaml"],
                      {"store": str(train), "output_dir": str(tmp_path / "x"), "llm": str(root / "llm"),
                       "vision_tower": str(root / "clip_vision_tower"), "teachers_manifest": str(tiny_teachers),
                       "tasks": "gen,depth"}, ["num_workers=0", "global_batch_size=4", "micro_batch_size=4"])
    pr = build_probe(cfg, str(root / "llm"), str(proj), [1], torch.device("cpu"), torch.float32, 0, 1)
    tok = pr.run.tokenizer
    records = [s["record"] for s in pr.run.store.iter_decoded(0, ["gen"], compact=True)]
    assert records
    for record in records:
        question, caption = question_and_caption(record)
        assert len(caption.split()) >= 3  # the sample's captions are sentences: a leak would be visible
        train_text = tok.decode(pr.run.stream.map_fn.builder(record).text_ids)
        eval_text = tok.decode(pr.eval_builder(record).text_ids)
        assert caption not in train_text and caption not in eval_text
        assert train_text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nn<|eot_id|>"), train_text
        assert eval_text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n"), eval_text
        assert question in eval_text
    # the switch: each record's own answer, for whoever wants the leak on purpose
    cfg.probe.answer = "record"
    pr = build_probe(cfg, str(root / "llm"), str(proj), [1], torch.device("cpu"), torch.float32, 0, 1)
    assert caption in tok.decode(pr.run.stream.map_fn.builder(record).text_ids)


def test_the_probing_manifests_are_pt_s_with_the_authors_probing_changes(tmp_path):
    """ola_vlm_probe.yaml: PT's recipes but depth's last block alone (base_probe_vlm: feat[-1][0]);
    ola_vlm_probe_eval.yaml: that, every recipe starting with a 640x640 bicubic resize, depth and seg in float32
    (eval_probe_dsg.py). Checked against ola_vlm.yaml's own text, so a change there reaches both."""
    import copy

    import yaml

    from recipes.manifest import (
        DEFAULT_MANIFEST,
        PROBE_EVAL_MANIFEST,
        PROBE_MANIFEST,
        ManifestError,
        load_manifest,
        parse_manifest,
    )

    pt_raw = yaml.safe_load(DEFAULT_MANIFEST.read_text())
    want = copy.deepcopy(pt_raw)
    want["teachers"]["depth"]["feature"]["blocks"] = [23]
    want["name"] = "ola_vlm_probe"
    probe, pt = load_manifest(PROBE_MANIFEST), load_manifest(DEFAULT_MANIFEST)
    assert {t: s.recipe() for t, s in probe.teachers.items()} == \
        {t: s.recipe() for t, s in parse_manifest(want).teachers.items()}
    assert probe.teachers["gen"].recipe_hash() == pt.teachers["gen"].recipe_hash()
    assert probe.teachers["depth"].recipe_hash() != pt.teachers["depth"].recipe_hash()
    want["name"] = "ola_vlm_probe_eval"
    for t, spec in want["teachers"].items():
        spec["preprocess"]["ops"].insert(0, {"op": "resize", "height": 640, "width": 640, "resample": "bicubic"})
        if t != "gen":
            spec["compute_dtype"] = "float32"
    ev = load_manifest(PROBE_EVAL_MANIFEST)
    expected = parse_manifest(want)
    assert {t: (s.recipe(), s.compute_dtype) for t, s in ev.teachers.items()} == \
        {t: (s.recipe(), s.compute_dtype) for t, s in expected.teachers.items()}
    assert ev.teachers["gen"].compute_dtype == "float16"
    # a circle of extends, and prepend_ops without ops to prepend to, are refused by name
    (tmp_path / "a.yaml").write_text("format: olaf.teachers/1\nextends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("format: olaf.teachers/1\nextends: a.yaml\n")
    with pytest.raises(ManifestError, match="circle"):
        load_manifest(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text(f"format: olaf.teachers/1\nextends: {PROBE_MANIFEST}\nprepend_ops: oops\n")
    with pytest.raises(ManifestError, match="prepend_ops"):
        load_manifest(tmp_path / "c.yaml")


def test_an_authors_convnext_folder_s_tower_is_reloaded_from_the_folder(tmp_path):
    """Their load_pretrained_model reloads a ConvNeXt tower from the checkpoint's vision_tower tensors
    (reload_from_ckpt): the folder's trunk and head.norm replace what the tower's own checkpoint holds."""
    from types import SimpleNamespace

    from trainer.fields import JsonFile
    from trainer.formats.ola_vlm import PREFIX
    from trainer.formats.ola_vlm import authors_tower as _authors_tower
    from trainer.tiny import build_convnext_tower
    from trainer.towers import load_tower

    name = build_convnext_tower(tmp_path / "convnext")
    held = {PREFIX["tower"] + k: v + 1.0 for k, v in load_tower(name, -2, torch.float32).export_state().items()}
    (tmp_path / "config.json").write_text(json.dumps({"mm_vision_tower": name}))
    tower, used = _authors_tower(SimpleNamespace(model=SimpleNamespace(vision_tower="model")), JsonFile(tmp_path / "config.json"), held,
                                 torch.float32)
    assert used == name
    got = tower.export_state()
    assert set(got) == {k[len(PREFIX["tower"]):] for k in held}
    assert all(torch.equal(got[k[len(PREFIX["tower"]):]], v) for k, v in held.items())
