"""Cut timm models into reusable, content-addressed segments.

`split_model(model, recipe)` returns the model as an ordered list of `Segment`s (stem, each
stage or block, head). Applying them in order reproduces `model(x)`. Every segment knows the
form of its output (a CNN feature map or a ViT token sequence) so that stitch layers can be
built between any two boundaries, and has an ID: the sha256 of its anchor's architecture
recipe, its index and its weights (`segment_ids`, docs/protocol.md §5.3).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from timm.layers import global_pool_nlc
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.regnet import RegNet
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer

from . import segment_ids

Form = Literal["map", "tokens", "logits"]


@dataclass(frozen=True)
class Port:
    """The form of an activation at a segment boundary (batch dimension left out)."""

    form: Form
    channels: int
    grid: tuple[int, int] = (1, 1)
    num_prefix: int = 0  # tokens before the patch tokens (CLS, registers)

    @classmethod
    def of(cls, t: torch.Tensor, form: Form, num_prefix: int = 0) -> "Port":
        """Read the port of a batched activation `t` of the given form."""
        if form == "map":
            return cls("map", t.shape[1], (t.shape[2], t.shape[3]))
        if form == "tokens":
            n = t.shape[1] - num_prefix
            side = int(round(n ** 0.5))
            if side * side != n:
                raise ValueError(f"{n} patch tokens do not form a square grid")
            return cls("tokens", t.shape[2], (side, side), num_prefix)
        return cls("logits", t.shape[-1])


class Segment(nn.Module):
    """One piece of a model: a module chain plus the form of its output, and (set by
    `split_model`) its index among the model's segments and the model's recipe."""

    def __init__(self, name: str, body: nn.Module, form: Form, num_prefix: int = 0) -> None:
        super().__init__()
        self.name, self.body, self.form, self.num_prefix = name, body, form, num_prefix
        self.index: int | None = None
        self.recipe: dict[str, Any] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def port(self, out: torch.Tensor) -> Port:
        """The port of this segment's output `out`."""
        return Port.of(out, self.form, self.num_prefix)

    def segment_id(self) -> str:
        """The segment's ID (`segment_ids.segment_id` of its recipe, index and weights)."""
        if self.recipe is None or self.index is None:
            raise ValueError(f"segment {self.name!r} has no recipe: its ID hashes the anchor's "
                             "architecture recipe, so split the model with "
                             "split_model(model, recipe=...) (the catalog entry's recipe, or "
                             "stitch_lib.zoo.recipe(spec, splits))")
        return segment_ids.segment_id(self.recipe, self.index, self.body.state_dict())


class _VitStem(nn.Module):
    """Patch embedding, prefix tokens and position embedding of a timm VisionTransformer."""

    def __init__(self, m: VisionTransformer) -> None:
        super().__init__()
        if m.pos_embed is None:
            raise ValueError("split_model supports ViTs with a learned absolute position "
                             "embedding; create the model with pos_embed='learn'")
        self.patch_embed, self.pos_drop = m.patch_embed, m.pos_drop
        self.patch_drop, self.norm_pre = m.patch_drop, m.norm_pre
        self.cls_token, self.reg_token, self.pos_embed = m.cls_token, m.reg_token, m.pos_embed
        self.no_embed_class, self.dynamic_img_size = m.no_embed_class, m.dynamic_img_size
        self.num_prefix_tokens = m.num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = VisionTransformer._pos_embed(self, self.patch_embed(x))  # timm's own code path
        return self.norm_pre(self.patch_drop(x))

    def extra_repr(self) -> str:
        return (f"no_embed_class={self.no_embed_class}, dynamic_img_size={self.dynamic_img_size}, "
                f"num_prefix_tokens={self.num_prefix_tokens}")


class _VitHead(nn.Module):
    """Final norm, token pooling and classifier of a timm VisionTransformer."""

    def __init__(self, m: VisionTransformer) -> None:
        super().__init__()
        self.norm, self.attn_pool, self.fc_norm = m.norm, m.attn_pool, m.fc_norm
        self.head_drop, self.head = m.head_drop, m.head
        self.global_pool, self.num_prefix_tokens = m.global_pool, m.num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.attn_pool is not None:
            x = self.attn_pool(x)
        else:
            x = global_pool_nlc(x, pool_type=self.global_pool,
                                num_prefix_tokens=self.num_prefix_tokens)
        return self.head(self.head_drop(self.fc_norm(x)))

    def extra_repr(self) -> str:
        return f"global_pool={self.global_pool!r}, num_prefix_tokens={self.num_prefix_tokens}"


def _seq(*modules: nn.Module) -> nn.Sequential:
    return nn.Sequential(*modules)


def _split_resnet(m: ResNet) -> list[Segment]:
    segs = [Segment("stem", _seq(m.conv1, m.bn1, m.act1, m.maxpool), "map")]
    segs += [Segment(n, getattr(m, n), "map") for n in ("layer1", "layer2", "layer3", "layer4")]
    return segs + [Segment("head", _seq(m.global_pool, m.fc), "logits")]


def _split_mobilenetv3(m: MobileNetV3) -> list[Segment]:
    segs = [Segment("stem", _seq(m.conv_stem, m.bn1), "map")]
    segs += [Segment(f"blocks.{i}", b, "map") for i, b in enumerate(m.blocks)]
    head = _seq(m.global_pool, m.conv_head, m.norm_head, m.act2, m.flatten, m.classifier)
    return segs + [Segment("head", head, "logits")]


def _split_efficientnet(m: EfficientNet) -> list[Segment]:
    segs = [Segment("stem", _seq(m.conv_stem, m.bn1), "map")]
    segs += [Segment(f"blocks.{i}", b, "map") for i, b in enumerate(m.blocks)]
    head = _seq(m.conv_head, m.bn2, m.global_pool, m.classifier)
    return segs + [Segment("head", head, "logits")]


def _split_convnext(m: ConvNeXt) -> list[Segment]:
    segs = [Segment("stem", m.stem, "map")]
    segs += [Segment(f"stages.{i}", s, "map") for i, s in enumerate(m.stages)]
    return segs + [Segment("head", _seq(m.norm_pre, m.head), "logits")]


def _split_regnet(m: RegNet) -> list[Segment]:
    segs = [Segment("stem", m.stem, "map")]
    segs += [Segment(n, getattr(m, n), "map") for n in ("s1", "s2", "s3", "s4")]
    return segs + [Segment("head", _seq(m.final_conv, m.head), "logits")]


def _split_vit(m: VisionTransformer) -> list[Segment]:
    if type(m) is not VisionTransformer:
        raise ValueError(f"split_model does not support {type(m).__name__} (a ViT variant "
                         "with extra tokens or heads); use a plain VisionTransformer/DeiT")
    p = m.num_prefix_tokens
    segs = [Segment("stem", _VitStem(m), "tokens", p)]
    segs += [Segment(f"blocks.{i}", b, "tokens", p) for i, b in enumerate(m.blocks)]
    return segs + [Segment("head", _VitHead(m), "logits")]


_ADAPTERS = {
    ResNet: _split_resnet, MobileNetV3: _split_mobilenetv3, EfficientNet: _split_efficientnet,
    ConvNeXt: _split_convnext, RegNet: _split_regnet, VisionTransformer: _split_vit,
}
SUPPORTED_FAMILIES = tuple(cls.__name__ for cls in _ADAPTERS)


def model_family(model: nn.Module) -> str:
    """The supported family a model belongs to ('ResNet', 'VisionTransformer', ...)."""
    for cls in _ADAPTERS:
        if isinstance(model, cls):
            return cls.__name__
    raise ValueError(f"split_model has no adapter for the {type(model).__name__} family; "
                     f"supported families: {', '.join(SUPPORTED_FAMILIES)}")


def split_model(model: nn.Module, recipe: dict[str, Any] | None = None) -> list[Segment]:
    """Ordered segments of a timm model; running them in sequence reproduces `model(x)`.
    `recipe` (how the model was created: `stitch_lib.assemble.from_recipe`) is what segment
    IDs need; without it the segments run but have no ID."""
    family = model_family(model)
    if recipe is not None:
        recipe = segment_ids.check_recipe(recipe)
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        if arch is not None and recipe["model"].split(".")[0] != arch:
            raise ValueError(f"recipe model {recipe['model']!r} is not this model's "
                             f"architecture {arch!r}; pass the recipe the model was created from")
    segments = next(fn for cls, fn in _ADAPTERS.items() if cls.__name__ == family)(model)
    for k, s in enumerate(segments):
        s.index, s.recipe = k, recipe
    return segments


def is_transformer(segments: list[Segment]) -> bool:
    """True when the segments come from a ViT (token boundaries)."""
    return segments[0].form == "tokens"
