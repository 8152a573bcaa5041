"""hf_vision: any vision model transformers has as a teacher (DINOv2 with or without registers, SigLIP, SigLIP2 and
CLIP's vision towers, ViT, SAM's vision encoder, ...), loaded with `AutoModel`, never with `trust_remote_code`.

Its manifest entry is as every teacher's (weights, compute_dtype, preprocess, output_shape); its `feature` says
which output is the target:

    feature:
      layer: -2            # an index into hidden_states (0: the embeddings; negative from the end), `last` (the
                           # model's last_hidden_state, as it returns it), or a list of indices with reduce: mean
      tokens: patch        # patch (class and register tokens dropped), cls, or all
      pool: [24, 24]       # optional: the patch grid resized to this grid (bilinear), row-major tokens
      reduce: mean         # with a list of layers: their mean

A checkpoint of a vision-language model (CLIP, SigLIP, SAM) is read for its vision part alone (its
`vision_config`); a model whose hidden states are maps (SAM: (B, H, W, C), its neck (B, C, H, W)) gives row-major
tokens; SigLIP2's NaFlex models get the pixels as their processor's patches, at the input's own grid. The class
and register tokens are those before the patch tokens: the sequence's length minus the patch grid's (input size /
patch size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recipes.manifest import TeacherSpec
from teachers.base import Teacher
from teachers.weights import load_auto_config, load_model, tensors_sha256

TOKENS = ("patch", "cls", "all")


def parse_feature(feature: dict, task: str) -> dict:
    """The `feature` mapping, checked: {layers: [int | 'last'], tokens, pool: (h, w) | None, reduce}."""
    where = f"teacher '{task}': feature"
    unknown = set(feature) - {"layer", "tokens", "pool", "reduce"}
    if unknown:
        raise ValueError(f"{where} has unknown keys {sorted(unknown)}; hf_vision takes layer, tokens, pool, reduce")
    layer = feature.get("layer", "last")
    layers = layer if isinstance(layer, list) else [layer]
    if not layers or not all(x == "last" or (isinstance(x, int) and not isinstance(x, bool)) for x in layers):
        raise ValueError(f"{where}.layer must be an index into hidden_states, `last`, or a list of indices, got "
                         f"{layer!r}")
    if isinstance(layer, list) and feature.get("reduce") != "mean":
        raise ValueError(f"{where}: several layers ({layer}) need reduce: mean")
    if feature.get("reduce") not in (None, "mean"):
        raise ValueError(f"{where}.reduce must be mean, got {feature.get('reduce')!r}")
    tokens = feature.get("tokens", "patch")
    if tokens not in TOKENS:
        raise ValueError(f"{where}.tokens must be one of {', '.join(TOKENS)}, got {tokens!r}")
    pool = feature.get("pool")
    if pool is not None and not (isinstance(pool, list) and len(pool) == 2 and all(isinstance(x, int) and x > 0
                                                                                   for x in pool)):
        raise ValueError(f"{where}.pool must be a grid [rows, cols], got {pool!r}")
    if pool is not None and tokens != "patch":
        raise ValueError(f"{where}: pool resizes the patch grid, so it needs tokens: patch (got {tokens})")
    return {"layers": layers, "tokens": tokens, "pool": tuple(pool) if pool else None}


def vision_class(config):
    """(the vision model class, its config) that `AutoModel` gives for `config`, or for its vision part."""
    from transformers import AutoModel

    part = getattr(config, "vision_config", None)
    if part is not None and config.model_type not in ("vision-encoder-decoder",):
        config = part
    try:
        return AutoModel._model_mapping[type(config)], config
    except KeyError:
        raise ValueError(f"transformers has no AutoModel for a {config.model_type!r} config") from None


class HFVisionTeacher(Teacher):
    architecture = "hf_vision"
    checkpoint_prefix = ""

    @classmethod
    def module_config(cls, config, spec: TeacherSpec):
        parse_feature(spec.feature, spec.task)
        return vision_class(config)

    @classmethod
    def load(cls, spec: TeacherSpec, device="cpu", dtype=torch.float32):
        """AutoConfig from the weights (a model that needs its own code is refused), its vision part built and
        filled from the checkpoint (a full vision-language checkpoint: its vision tensors, under their prefix)."""
        config = load_auto_config(spec.weights, spec.task)
        model_cls, sub = cls.module_config(config, spec)
        part = sub is not config
        model = load_model(model_cls, sub, spec.weights, spec.task, _vision_prefix(model_cls) if part else "", part)
        teacher = cls(spec, model, tensors_sha256(model.state_dict()))
        return teacher.to(device=device, dtype=dtype)

    def __init__(self, spec: TeacherSpec, model: torch.nn.Module, weights_sha256: str):
        super().__init__(spec, model, weights_sha256)
        self.feature = parse_feature(spec.feature, spec.task)
        patch = getattr(model.config, "patch_size", None)
        h, w = spec.preprocess.input_size
        self.grid = (h // patch, w // patch) if isinstance(patch, int) else None

    def _tokens(self, x: torch.Tensor, last: bool) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """(B, L, C) tokens of one output and its patch grid: a map gives row-major tokens and its own grid (SAM's
        hidden states are (B, H, W, C), its last_hidden_state, the neck's, (B, C, H, W))."""
        if x.ndim == 4:
            x = x.permute(0, 2, 3, 1) if last else x
            return x.flatten(1, 2), (x.shape[1], x.shape[2])
        return x, self.grid

    def _inputs(self, x: torch.Tensor) -> dict:
        """The model's inputs for normalised pixels (B, 3, H, W): themselves, or for SigLIP2's NaFlex models the
        patches (channels last within a patch, as its processor cuts them), their mask and their grid."""
        if self.model.config.model_type != "siglip2_vision_model":
            return {"pixel_values": x}
        p = self.model.config.patch_size
        b, c, h, w = x.shape
        nh, nw = h // p, w // p
        patches = x.reshape(b, c, nh, p, nw, p).permute(0, 2, 4, 3, 5, 1).reshape(b, nh * nw, p * p * c)
        return {"pixel_values": patches, "pixel_attention_mask": torch.ones(b, nh * nw, dtype=torch.long,
                                                                            device=x.device),
                "spatial_shapes": torch.tensor([[nh, nw]] * b, dtype=torch.long, device=x.device)}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(**self._inputs(x), output_hidden_states=True)
        picked = [self._tokens(out.last_hidden_state, True) if layer == "last" else
                  self._tokens(out.hidden_states[layer], False) for layer in self.feature["layers"]]
        grid = picked[0][1]
        tokens = torch.stack([t for t, _ in picked]).mean(0) if len(picked) > 1 else picked[0][0]
        return self._select(tokens, grid)

    def _select(self, tokens: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        kind = self.feature["tokens"]
        prefix = tokens.shape[1] - (grid[0] * grid[1] if grid else tokens.shape[1])
        if kind == "all":
            return tokens
        if kind == "cls":
            if prefix < 1:
                raise ValueError(f"teacher '{self.spec.task}': this model has no class token (tokens: cls)")
            return tokens[:, :1]
        patches = tokens[:, prefix:]
        if self.feature["pool"] is None:
            return patches
        b, _, c = patches.shape
        maps = patches.transpose(1, 2).reshape(b, c, *grid).float()
        pooled = F.interpolate(maps, size=self.feature["pool"], mode="bilinear", align_corners=False)
        return pooled.flatten(2).transpose(1, 2).to(patches.dtype)


def _vision_prefix(model_cls) -> str:
    """Where a vision-language checkpoint keeps its vision model's tensors, for the classes whose own keys do not
    already start there (SAM's vision encoder)."""
    return {"SamVisionModel": "vision_encoder."}.get(model_cls.__name__, "")

