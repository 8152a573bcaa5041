"""A run's parts, built from its config, once: the store (checked before any model loads), the frozen models, the
trainable model, the stream, the optimizer and the schedule. `trainer.pt` trains what this builds, `trainer.probe`
builds its probes on the same stream and schedule, the benchmarks time it. Nothing is changed after it is built."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from recipes.manifest import DEFAULT_MANIFEST, load_manifest
from recipes.weights_files import manifest_files_sha256
from store import Store, StoreError, TargetStream
from trainer.config import PTConfig, with_values
from trainer.data import ImageRecipe, PTSample, collate
from trainer.errors import TrainerError
from trainer.evaluate import HeldOut
from trainer.model import OLAPT
from trainer.sequence import Layout
from trainer.sharding import Sharded, shard_trained
from trainer.templates import PLAIN, PromptBuilder, prefix_shape, prompt_builder
from trainer.towers import load_tower


def load_or_explain(what: str, load, name: str, **kw):
    """One message instead of transformers' chained tracebacks for a model that is not there, or whose files
    cannot be what they say (a pickle where weights belong, tensors of other sizes, a config transformers
    refuses): whatever the loader raises on a user's files, the user reads which files and why."""
    try:
        return load(name, **kw)
    except Exception as e:  # noqa: BLE001  (the loader reads the user's files: every failure is theirs to fix)
        if not isinstance(e, OSError | ValueError):
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise TrainerError(f"cannot load the {what} {name!r}: its files are not a {what} olaf can load "
                               f"({type(e).__name__}: {first})") from None
        if Path(name).is_absolute() or name.startswith((".", "~")) or Path(name).exists():
            hint = f"the folder {name} does not exist" if not Path(name).exists() else "that folder is not a model"
        elif os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            hint = "HF_HUB_OFFLINE is set and it is not in the HF cache (HF_HOME): download it once online or pass a local folder"
        else:
            hint = "not found on the Hub or in the cache: check the id, your token (HF_TOKEN) and the network"
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise TrainerError(f"cannot load the {what} {name!r}: {hint} ({first})") from None


def attention_implementation(cfg: PTConfig, device: torch.device) -> str:
    if cfg.model.attn_implementation != "auto":
        return cfg.model.attn_implementation
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_frozen(cfg: PTConfig, device: torch.device, dtype: torch.dtype):
    """(tokenizer, LLM, vision tower, attention implementation), frozen, on the device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    attn = attention_implementation(cfg, device)
    tokenizer = load_or_explain("LLM tokenizer", AutoTokenizer.from_pretrained, cfg.model.llm)
    llm = load_or_explain("LLM", AutoModelForCausalLM.from_pretrained, cfg.model.llm, dtype=dtype,
                          attn_implementation=attn).to(device)
    vision = load_or_explain("vision tower", load_tower, cfg.model.vision_tower,
                             select_layer=cfg.model.vision_select_layer, dtype=dtype).to(device)
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(llm)
    llm.train()  # no dropout in these LMs; train mode is what switches checkpointing on
    return tokenizer, llm, vision, attn


def enable_checkpointing(llm) -> None:
    """Recompute the LLM's activations in the backward pass: it is frozen, but gradients flow through it to the
    projector and task tokens, so without this it keeps every layer's activations."""
    kw = {"use_reentrant": False}
    if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def add_pad_token(tokenizer, llm, token: str = "<pad>") -> int:
    """Their PT's smart_tokenizer_and_embedding_resize: a `<pad>` token when the tokenizer has none (Llama-3 has
    none), its input and output embeddings the mean of the others. Returns the pad id."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    added = tokenizer.add_special_tokens({"pad_token": token})
    llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for emb in {id(e): e for e in (llm.get_input_embeddings(), llm.get_output_embeddings())}.values():
            emb.weight[-added:] = emb.weight[:-added].mean(dim=0, keepdim=True)
    return tokenizer.pad_token_id


def expected_teachers(cfg: PTConfig, manifest_path: str | None = None) -> dict:
    """The teacher identity the store's targets must have: the trainer's manifest (or `manifest_path`), with the
    content of the weight files it names where they are on this machine (it never loads a teacher)."""
    tasks = cfg.tasks
    manifest = load_manifest(manifest_path or tasks.teachers_manifest or DEFAULT_MANIFEST, fidelity=tasks.fidelity)
    manifest.select(tasks.names)  # a task no teacher of the manifest computes: one line naming its teachers
    return manifest.identity(tasks.names, files_sha256=manifest_files_sha256(manifest, tasks.names))


def open_store(cfg: PTConfig, url: str | None = None, manifest_path: str | None = None) -> tuple[Store, dict]:
    """The store (`url`, default the config's first) and the teacher identity it must have (`manifest_path`, default
    the config's manifest), checked (tasks, done shards, teachers, at least one usable sample)."""
    expected = expected_teachers(cfg, manifest_path)
    store = Store(url or cfg.data.sources()[0][0], use_index=True)
    tasks = cfg.tasks.names
    store.require(tasks, expected_teachers=expected, allow_partial=cfg.data.allow_partial_store, formats=["wds"])
    if usable_samples(store, tasks) == 0:
        raise StoreError(f"store {store.url}: none of its {store.samples_done(tasks)} samples in done shards has "
                         f"a usable image (errors.jsonl says why): nothing to train on")
    return store, expected


def open_stores(cfg: PTConfig) -> list[Store]:
    """The run's stores (data.store, or data.stores to mix), each checked as `open_store` does; several must give
    the trained tasks' targets in one shape."""
    paths, _ = cfg.data.sources()
    stores = [open_store(cfg, p)[0] for p in paths]
    for t in cfg.tasks.names:
        shapes = {s.url: tuple(s.manifest.tasks[t].shape) for s in stores}
        if len(set(shapes.values())) > 1:
            raise StoreError(f"the stores' {t} targets have different shapes ({shapes}): a mix trains one model, "
                             f"so its stores must come from the same teachers")
    return stores


def usable_samples(store: Store, tasks) -> int:
    """Samples per epoch: those of the done shards whose image was usable."""
    return store.usable_samples(tasks)


@dataclass(frozen=True)
class Trainable:
    """What one training step needs (trainer.loop.train_step): the model, which returns its loss, its optimizer and
    schedule, the config (clipping), and where and in what it runs. The benchmarks time steps of exactly this."""

    cfg: PTConfig
    device: torch.device
    dtype: torch.dtype
    model: torch.nn.Module  # OLAPT, or trainer.probe's ProbeSet
    optimizer: torch.optim.Optimizer
    scheduler: object

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def trainable(cfg: PTConfig, model: torch.nn.Module, device, dtype, total_steps: int) -> Trainable:
    """AdamW over what trains and the cosine schedule with warm-up to `total_steps` (PT and probing alike)."""
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.learning_rate, weight_decay=cfg.optim.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.optim.warmup_ratio * total_steps), total_steps)
    return Trainable(cfg, device, dtype, model, optimizer, scheduler)


@dataclass(frozen=True)
class PTRun(Trainable):
    """A whole run: the step's parts, the store it reads, the stream, the tokenizer, how long it runs."""

    store: Store | None = None
    tokenizer: object = None
    stream: TargetStream | None = None
    total_steps: int = 0
    pad_id: int = 0
    attn: str = "sdpa"
    sharded: Sharded | None = None  # the trained state split over the ranks (trainer.sharding)
    held_out: HeldOut | None = None  # the held-out evaluation (trainer.evaluate)


def build(cfg: PTConfig, device: torch.device, dtype: torch.dtype, rank: int = 0, world: int = 1) -> PTRun:
    stores = open_stores(cfg)
    store = stores[0]
    target_shapes = {t: tuple(store.manifest.tasks[t].shape) for t in cfg.tasks.names}
    cfg = task_settings(cfg, target_shapes)

    if "model" in (cfg.model.image_aspect, cfg.model.vision_tower, cfg.model.chat_template):
        raise TrainerError("image_aspect, vision_tower and chat_template: `model` (the probed model's) applies to "
                           "trainer.probe; PT needs square or pad, a tower and a template")
    torch.manual_seed(cfg.optim.seed)  # the same initialisation on every rank
    tokenizer, llm, vision, attn = load_frozen(cfg, device, dtype)
    if cfg.model.ntp_labels == "original":  # the original's PT adds <pad> to Llama-3 before training: V + 1 logits
        add_pad_token(tokenizer, llm)
    layout, builder = sequence_layout(cfg, tokenizer, vision)
    image = ImageRecipe.from_pretrained(cfg.model.vision_tower, cfg.model.image_aspect)
    model = OLAPT(cfg, llm, vision, target_shapes, layout, image.mean, image.std).to(device)
    sharded = shard_trained(model, world, device) if cfg.model.sharding == "fsdp" else None  # before AdamW
    return assemble(cfg, device, dtype, stores, tokenizer, model, builder, image, rank, world, attn, sharded)


def task_settings(cfg: PTConfig, shapes: dict[str, tuple]) -> PTConfig:
    """The config with every trained task's settings (a task beyond OLA-VLM's three: the defaults its target's shape
    implies, TasksSection.with_defaults), checked against the targets: a grid's predictor makes one token per
    special token, so their number is the target's."""
    try:
        cfg = with_values(cfg, tasks=cfg.tasks.with_defaults(shapes))
    except ValueError as e:
        raise TrainerError(str(e)) from None
    for t in cfg.tasks.names:
        tokens = shapes[t][0]
        if tokens > 1 and cfg.tasks.special_tokens[t] != tokens:
            raise TrainerError(f"tasks.special_tokens.{t}: the predictor makes {cfg.tasks.special_tokens[t]} tokens, "
                               f"the store's {t} targets have {tokens}: leave it out (it follows the target) or "
                               f"give {tokens}")
    return cfg


def sequence_layout(cfg: PTConfig, tokenizer, vision) -> tuple[Layout, object]:
    """The layout of [prefix | image | task tokens | text] and the prompt builder that fills it: a chat template
    with the image tokens, or VLoRA's plain text with its masked placeholder and no image tokens."""
    keep = cfg.vlora.get("placeholder", "keep") == "keep"
    prefix, masked = prefix_shape(tokenizer, cfg.model.chat_template, keep)
    image = 0 if cfg.model.chat_template == PLAIN else vision.num_tokens
    layout = Layout.of(prefix, image, {t: cfg.tasks.task_tokens[t] for t in cfg.tasks.names}, masked=masked)
    original = {"label_header_end": True} if cfg.model.ntp_labels == "original" else {}  # llama_3 only (config)
    return layout, prompt_builder(tokenizer, cfg.model.chat_template, cfg.model.max_length - layout.text_start, keep,
                                  **original)


def assemble(cfg: PTConfig, device, dtype, stores: Store | list[Store], tokenizer, model, builder: PromptBuilder,
             image: ImageRecipe, rank: int, world: int, attn: str, sharded: Sharded | None = None) -> PTRun:
    """A run from its model: the stream of the stores' targets for `cfg.tasks.names` (each has passed open_store's
    checks; several are mixed by data.mix) to the run's last step, AdamW over what trains, the cosine schedule (PT
    and probing alike)."""
    stores = stores if isinstance(stores, list) else [stores]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    opt, tasks = cfg.optim, cfg.tasks.names
    per_epoch = sum(usable_samples(s, tasks) for s in stores)  # a mix keeps the stores' total
    total_steps = opt.max_steps or max(1, math.ceil(opt.epochs * per_epoch / opt.global_batch_size))
    store = stores[0]
    stream = TargetStream(stores, tasks, global_batch=opt.global_batch_size, micro_batch=opt.micro_batch_size,
                          seed=opt.seed, chunk=cfg.data.order_chunk, mix=cfg.data.order_mix, rank=rank, world_size=world,
                          map_fn=PTSample(builder, image, tasks, store.manifest.tasks),
                          collate_fn=partial(collate, pad_id=pad_id), stop_step=total_steps,
                          weights=cfg.data.sources()[1] if len(stores) > 1 else None)
    step = trainable(cfg, model, device, dtype, total_steps)
    held_out = held_out_of(cfg, store, PTSample(builder, image, tasks, store.manifest.tasks),
                           partial(collate, pad_id=pad_id), rank, world) if cfg.run.eval_every else None
    return PTRun(**vars(step), store=store, tokenizer=tokenizer, stream=stream, total_steps=total_steps,
                 pad_id=pad_id, attn=attn, sharded=sharded, held_out=held_out)


def held_out_of(cfg: PTConfig, store: Store, map_fn, collate_fn, rank: int, world: int) -> HeldOut:
    """The held-out evaluation of data.eval_store (checked as the training stores are, its targets in their
    shapes), read in the run's order and micro-batches."""
    ev = open_store(cfg, cfg.data.eval_store)[0]
    for t in cfg.tasks.names:
        if tuple(ev.manifest.tasks[t].shape) != tuple(store.manifest.tasks[t].shape):
            raise StoreError(f"eval store {ev.url}: its {t} targets are {tuple(ev.manifest.tasks[t].shape)}, the "
                             f"training store's {tuple(store.manifest.tasks[t].shape)}: evaluate on a store of the "
                             f"same teachers")
    mb = cfg.optim.micro_batch_size
    stream = TargetStream(ev, cfg.tasks.names, global_batch=mb, micro_batch=mb, seed=cfg.optim.seed,
                          chunk=cfg.data.order_chunk, mix=cfg.data.order_mix, rank=0, world_size=1,
                          map_fn=map_fn, collate_fn=collate_fn)
    return HeldOut(stream, cfg.run.eval_samples, mb, rank, world)
