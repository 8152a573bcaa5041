"""Files users hand in, edited, damaged or hostile: the config.json of an authors'-format folder and of an olaf export,
a VLoRA export's mm_projector.bin, an LLM folder's weights, a store's lease objects, an export onto a disk that
refuses the write. Each gets one line that names the file and the field (or a recorded, harmless state), never a
traceback, never a silent drop. Each case failed before its fix (reliability, round four)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from helpers import REPO, call, export_on_a_full_disk, one_error_line
from test_probe import _authors_ola_llama_folder

from trainer.errors import TrainerError

PROBE_YAML = REPO / "trainer" / "configs" / "probe.yaml"


def _cfg(store, tmp_path):
    from trainer.config import load_config

    return load_config([PROBE_YAML], {"store": str(store), "output_dir": str(tmp_path / "x"), "llm": "unused"})


def _edited(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    config = dst / "config.json"
    data = json.loads(config.read_text())
    text = edit(data)
    config.write_text(text if isinstance(text, str) else json.dumps(data))
    return dst


class Hostile:
    """A pickle that would run code when loaded: it must be refused, and the marker never written."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def authors_folder(tmp_path_factory, tiny_models):
    folder = tmp_path_factory.mktemp("authors") / "ola"
    _authors_ola_llama_folder(folder, tiny_models)
    return folder


def _drop(key):
    return lambda d: d.pop(key) and None


def _set(key, value):
    return lambda d: d.update({key: value})


AUTHORS_EDITS = {  # how the folder's config.json was edited -> what the one line must say
    "no mm_vision_tower": (_drop("mm_vision_tower"), "field 'mm_vision_tower' is missing"),
    "num_task_tokens a word": (_set("num_task_tokens", "abc"), "field 'num_task_tokens' is 'abc': it must be an integer"),
    "num_task_tokens a list": (_set("num_task_tokens", [8]), "field 'num_task_tokens' is [8]"),
    "num_task_tokens not dividing": (_set("num_task_tokens", 7), "must pool into 7 tokens"),
    "select layer a word": (_set("mm_vision_select_layer", "x"), "field 'mm_vision_select_layer' is 'x'"),
    "hidden_size a word": (_set("hidden_size", "abc"), "transformers refuses it as a llama config"),
    "hidden_size of other weights": (_set("hidden_size", 128), "cannot load the LLM"),
    "a list, not an object": (lambda d: "[]", "holds a JSON list"),
    "aux_mode 7": (_set("aux_mode", 7), "field 'aux_mode' is 7: it must be a string"),
    "aux_mode unknown task": (_set("aux_mode", "depth-warp"), "field 'aux_mode' is 'depth-warp'"),
    "aux_mode empty": (_set("aux_mode", ""), "field 'aux_mode' is ''"),
    "an aspect olaf does not do": (_set("image_aspect_ratio", "anyres"), "field 'image_aspect_ratio' is 'anyres'"),
    "a token format of no release": (_set("task_token_format", "weird"), "field 'task_token_format' is 'weird'"),
    "truncated": (lambda d: json.dumps(d)[:100], "is not readable JSON"),
}


@pytest.mark.parametrize("case", list(AUTHORS_EDITS))
def test_an_edited_authors_folder_is_one_line_naming_the_file_and_field(tmp_path, authors_folder, trainer_store, case):
    from trainer.formats import read

    edit, said = AUTHORS_EDITS[case]
    folder = _edited(authors_folder, tmp_path / "ola", edit)
    with pytest.raises(TrainerError) as e:
        read(_cfg(trainer_store, tmp_path), str(folder), None, torch.float32)
    assert said in str(e.value) and (case in ("hidden_size of other weights",) or "config.json" in str(e.value)), e.value


def test_unknown_aux_mode_is_refused_not_probed_without_task_tokens(tmp_path, authors_folder, trainer_store,
                                                                   tiny_teachers):
    """aux_mode: 7 exited 0 having dropped the folder's task tokens; through the command it is now one line."""
    from trainer.probe import run as probe

    folder = _edited(authors_folder, tmp_path / "ola", _set("aux_mode", 7))
    rc, log = call(probe, ["--store", trainer_store, "--eval-store", trainer_store, "--model", folder,
                           "--teachers-manifest", tiny_teachers, "--output-dir", tmp_path / "run", "--max-steps", "1"])
    assert rc == 2 and "field 'aux_mode' is 7" in one_error_line(log)
    assert not (tmp_path / "run" / "probe_scores.json").exists()


EXPORT_EDITS = {
    "no llm": (_drop("llm"), "field 'llm' is missing"),
    "no vision_tower": (_drop("vision_tower"), "field 'vision_tower' is missing"),
    "no task_tokens": (_drop("task_tokens"), "field 'task_tokens' gives gen: None"),
    "null": (lambda d: "null", "holds a JSON null"),
    "truncated": (lambda d: json.dumps(d)[:50], "is not readable JSON"),
    "select layer a word": (_set("mm_vision_select_layer", "second"), "field 'mm_vision_select_layer' is 'second'"),
    "another template": (_set("chat_template", "chatml"), "field 'chat_template' is 'chatml'"),
}


@pytest.mark.parametrize("case", list(EXPORT_EDITS))
def test_an_edited_olaf_export_is_one_line_naming_the_file_and_field(tmp_path, trained, trainer_store, case):
    from trainer.formats import read

    edit, said = EXPORT_EDITS[case]
    folder = _edited(trained / "export", tmp_path / "export", edit)
    with pytest.raises(TrainerError) as e:
        read(_cfg(trainer_store, tmp_path), str(folder), None, torch.float32)
    assert said in str(e.value) and "config.json" in str(e.value), e.value


@pytest.fixture(scope="module")
def vlora_export(tmp_path_factory, trainer_store, tiny_models, tiny_teachers):
    from test_vlora import vlora_args

    from trainer.pt import run as trainer

    out = tmp_path_factory.mktemp("vlora") / "run"
    rc, log = call(trainer, vlora_args(trainer_store, tiny_models, tiny_teachers, out, "--max-steps", "1"))
    assert rc == 0, log
    return out / "export"


def _llm_folder(tmp_path: Path, tiny_models: Path, hidden: int, weights: str = "safetensors") -> Path:
    """A Llama folder beside the tiny one (its tokenizer): another width, or a pickle where its weights belong."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = Path(tiny_models).parent / "llm"
    folder = tmp_path / f"llm-{hidden}-{weights}"
    cfg = LlamaConfig.from_pretrained(src)
    cfg.hidden_size, cfg.intermediate_size = hidden, 2 * hidden
    LlamaForCausalLM(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(src).save_pretrained(folder)
    if weights == "pickle":
        for f in folder.glob("*.safetensors"):
            f.unlink()
        with open(folder / "pytorch_model.bin", "wb") as f:
            pickle.dump(Hostile(tmp_path / "ran"), f)
    return folder


def test_a_vlora_export_with_bad_weights_or_settings_is_one_line(tmp_path, vlora_export, trainer_store, tiny_models):
    from trainer.formats import read

    cfg = _cfg(trainer_store, tmp_path)

    def refused(folder, said):
        with pytest.raises(TrainerError) as e:
            read(cfg, str(folder), None, torch.float32)
        assert said in str(e.value), e.value

    garbage = _edited(vlora_export, tmp_path / "garbage", lambda d: None)
    (garbage / "mm_projector.bin").write_bytes(os.urandom(4096))
    refused(garbage, "mm_projector.bin is not the generator its config.json describes: not a file of tensors")
    pickled = _edited(vlora_export, tmp_path / "pickled", lambda d: None)
    with open(pickled / "mm_projector.bin", "wb") as f:
        pickle.dump(Hostile(tmp_path / "ran"), f)
    refused(pickled, "mm_projector.bin is not the generator its config.json describes: not a file of tensors")
    assert not (tmp_path / "ran").exists()
    rank = _edited(vlora_export, tmp_path / "rank", lambda d: d["vlora"].update(vlora_rank=8))
    refused(rank, "mm_projector.bin is not the generator its config.json describes: size mismatch")
    huge = _edited(vlora_export, tmp_path / "huge", lambda d: d["vlora"].update(vlora_rank=200000, vlora_llm_dim=65536))
    refused(huge, "vlora.vlora_llm_dim is 65536 but the LLM gives 64")
    deep = _edited(vlora_export, tmp_path / "deep", lambda d: d["vlora"].update(vlora_depth=1_000_000))
    refused(deep, "GB in float32) and this machine has")
    typed = _edited(vlora_export, tmp_path / "typed", lambda d: d["vlora"].update(weights_sep="maybe"))
    refused(typed, "vlora.weights_sep must be true or false, got 'maybe'")
    wide = _edited(vlora_export, tmp_path / "wide", lambda d: d.update(llm=str(_llm_folder(tmp_path, tiny_models, 32))))
    refused(wide, "vlora.vlora_llm_dim is 64 but the LLM gives 32")
    pickled_llm = _llm_folder(tmp_path, tiny_models, 64, weights="pickle")
    refused(_edited(vlora_export, tmp_path / "pllm", lambda d: d.update(llm=str(pickled_llm))), "cannot load the LLM")
    assert not (tmp_path / "ran").exists()


# ---- leases: a damaged one is a lapsed one, shown as damaged -------------------------------------------------


@pytest.mark.parametrize("body", ['{"owner": "h:1:a", "expires": "soon"}', '{"owner": "h:1:a", "expires": null}',
                                  '{"owner": "h:1:a"}', '{"owner": "h:1:a", "expires": 1e300}', '[1]', 'not json'])
def test_a_damaged_lease_holds_nothing_and_is_shown_as_damaged(tmp_path, body, capsys):
    from test_store import create

    import store
    from pipeline import inspect
    from store import layout

    url = str(tmp_path / "s")
    w = create(url)
    w.loc.write_bytes(layout.lease_name(1), body.encode())
    leases = store.Leases(w.loc)
    assert leases.holder(1) is None and leases.all()[1]["damaged"] and not leases.all()[1]["live"]
    assert inspect.main([url, "summary"]) == 0 and "shard 1: damaged (it holds nothing" in capsys.readouterr().out
    assert leases.take(1) and leases.holder(1)["owner"] == leases.owner  # the next run takes the shard
    w.loc.write_bytes(layout.lease_name(1), body.encode())
    assert inspect.main([url, "unlease", "1"]) == 0 and "removed the damaged lease" in capsys.readouterr().out
    assert leases.all() == {}


# ---- an export onto a disk that refuses the write ------------------------------------------------------------


def test_an_export_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, trained):
    """The disk refuses the write (here a file-size limit of 64 kB for the exporting process: the same write
    failure as ENOSPC, without a full disk): one line, and no partial export at --out."""
    # 1 kB: mm_projector.bin, the first file torch.save writes (llava and vlora alike), is refused
    for fmt, size in (("llava", 65536), ("ola-vlm", 65536), ("llava", 1024)):
        out = tmp_path / fmt
        p = export_on_a_full_disk(trained, fmt, out, size)
        assert p.returncode == 2, p.stdout + p.stderr
        line = one_error_line(p.stderr)
        assert f"writing the export to {out} failed" in line and "nothing of it was left" in line, line
        assert not out.exists() and not list(tmp_path.glob(f".{fmt}.tmp-*"))
