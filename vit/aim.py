"""AIM: Adapting Image Models for video (Yang et al., ICLR 2023), on a timm ViT in a VideoClassifier.

As in the official code (taoyang1122/adapt-image-models, ``mmaction/models/backbones/vit_clip.py``),
every block of the frozen image ViT gets three adaptations, in this order:

1. **temporal**: the tokens are regrouped so that each token position of a clip becomes a sequence
   over its ``T`` frames (the class and any other prefix tokens included), the block's own frozen
   ``norm1`` and ``attn`` run over that sequence, an adapter without skip follows, and the result
   is added to the residual stream through drop-path; the SSv2 recipe adds a second adapter, with
   skip, between ``norm1`` and the temporal attention (``second_temporal_adapter``);
2. **spatial**: an adapter with skip on the attention's output (``a + adapter(a)``), inside the
   residual branch, before LayerScale and the block's own drop-path;
3. **joint**: an adapter without skip reading ``norm2(x)``, in parallel with the MLP, scaled by
   ``joint_scale`` (0.5 for K400, 1 for SSv2) and added through drop-path.

An adapter is ``fc2(GELU(fc1(x)))`` with width ``int(dim * mlp_ratio)``; ``fc1`` keeps the
original's truncated-normal init (std 0.02, zero bias) and only ``fc2`` starts at zero, so every
branch outputs zero and the model is exactly the base model at attach. A temporal embedding
``(T, dim)``, zero at init, is added to every token of frame ``t`` after the position embedding,
before ``norm_pre`` (CLIP's ``ln_pre``). Adapters, temporal embedding and the head train.

Drop-path follows the original to the letter: its blocks run sequence-first ``(N, B·T, D)``, so
timm's per-sample mask falls on token positions; here the mask is drawn per token position,
shared by every clip and frame of the batch. The rate grows linearly from 0 in the first block to
``drop_path_rate`` in the last. The original also trains ``ln_post`` (the final norm); here it
stays frozen, as for every other vit method.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from visionpeft.config import MethodConfig, field
from visionpeft.errors import ConfigError, UnsupportedModelError
from visionpeft.vit.base import VitMethod
from visionpeft.vit.sites import LayerWrapper, Site, block_site, inner_blocks
from visionpeft.vit.surface import adapted_block, find_vit, release_block

EMBEDDINGS_ATTR = "aim_temporal_embedding"


@dataclasses.dataclass
class AIMConfig(MethodConfig):
    """AIM's K400 recipe by default; the SSv2 one is ``joint_scale=1, second_temporal_adapter=True``."""

    mlp_ratio: float = field(0.25, help="adapter width = int(model width * mlp_ratio)", gt=0)
    joint_scale: float = field(0.5, help="scale of the adapter beside the MLP: 0.5 (K400), 1 (SSv2)")
    second_temporal_adapter: bool = field(
        False, help="SSv2 recipe: a second temporal adapter (with skip) before the temporal attention"
    )
    drop_path_rate: float = field(0.2, help="drop-path of the temporal and joint branches in the last block",
                                  ge=0, lt=1)


class AimAdapter(nn.Module):
    """``fc2(GELU(fc1(x)))``, plus ``x`` when ``skip``: the original's adapter, ``fc2`` zero at init."""

    def __init__(self, dim: int, width: int, skip: bool, like: torch.Tensor) -> None:
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype}
        self.skip = skip
        self.fc1 = nn.Linear(dim, width, **kw)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(width, dim, **kw)
        nn.init.trunc_normal_(self.fc1.weight, std=0.02)
        for tensor in (self.fc1.bias, self.fc2.weight, self.fc2.bias):
            nn.init.zeros_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.fc2(self.act(self.fc1(x)))
        return x + branch if self.skip else branch


class TokenDropPath(nn.Module):
    """Drop-path with one mask per token position of ``(B·T, N, D)`` tensors, as the original draws it.

    The original applies timm's per-sample drop-path to sequence-first ``(N, B·T, D)`` tensors, so
    whole token positions are dropped for the batch; this draws the same mask on batch-first tensors.
    """

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty(1, x.shape[1], 1).bernoulli_(keep)
        return x * mask.div_(keep)


def frames_to_time(x: torch.Tensor, frames: int) -> torch.Tensor:
    """Regroup ``(B·T, N, D)`` frame tokens as ``(B·N, T, D)``: one sequence over time per token position."""
    bt, n, d = x.shape
    if bt % frames:
        raise ValueError(f"AIM: a batch of {bt} frames is not a whole number of {frames}-frame clips")
    return x.reshape(bt // frames, frames, n, d).transpose(1, 2).reshape(-1, frames, d)


def time_to_frames(x: torch.Tensor, tokens: int) -> torch.Tensor:
    """The inverse of :func:`frames_to_time`: ``(B·N, T, D)`` back to ``(B·T, N, D)``."""
    bn, t, d = x.shape
    return x.reshape(bn // tokens, tokens, t, d).transpose(1, 2).reshape(-1, tokens, d)


class SpatialAdaptation(LayerWrapper):
    """The attention in its block's place, with AIM's spatial adapter on its output: ``a + adapter(a)``."""

    def __init__(self, base: nn.Module, adapter: AimAdapter) -> None:
        super().__init__(base)
        self.adapter = adapter

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.adapter(self.base(*args, **kwargs))


class TemporalAdaptation(nn.Module):
    """``x + drop_path(adapter(attn(norm1(x over time))))``, before the block's attention.

    ``attn`` is the attention below this adapter's :class:`SpatialAdaptation`, i.e. the frozen
    attention as it was when AIM attached; ``norm1`` is the block's.
    """

    def __init__(self, block: nn.Module, spatial: SpatialAdaptation, dim: int, width: int, frames: int,
                 second_adapter: bool, drop_path: float, like: torch.Tensor) -> None:
        super().__init__()
        self.frames = frames
        self.adapter = AimAdapter(dim, width, skip=False, like=like)
        self.adapter_in = AimAdapter(dim, width, skip=True, like=like) if second_adapter else None
        self.drop_path = TokenDropPath(drop_path)
        # Plain references, not submodules: the frozen layers stay the block's and follow its mode.
        self.__dict__["_block"] = block
        self.__dict__["_spatial"] = spatial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.__dict__["_block"].norm1(frames_to_time(x, self.frames))
        if self.adapter_in is not None:
            h = self.adapter_in(h)
        h = self.adapter(self.__dict__["_spatial"].base(h))
        return x + self.drop_path(time_to_frames(h, x.shape[1]))


class JointAdaptation(nn.Module):
    """``drop_path(scale · adapter(norm2(x)))``, added beside the block's MLP."""

    def __init__(self, block: nn.Module, dim: int, width: int, scale: float, drop_path: float,
                 like: torch.Tensor) -> None:
        super().__init__()
        self.scale = scale
        self.adapter = AimAdapter(dim, width, skip=False, like=like)
        self.drop_path = TokenDropPath(drop_path)
        self.__dict__["_block"] = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path(self.scale * self.adapter(self.__dict__["_block"].norm2(x)))


class TemporalEmbedding(nn.Module):
    """The ``(T, D)`` embedding added to every token of frame ``t``; its :meth:`add` is a pre-hook."""

    def __init__(self, frames: int, dim: int, like: torch.Tensor) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(frames, dim, device=like.device, dtype=like.dtype))

    def add(self, module: nn.Module, args: tuple) -> tuple:
        """Forward pre-hook of ``norm_pre``: add the embedding to its ``(B·T, N, D)`` input."""
        x, *rest = args
        t, d = self.embedding.shape
        if x.shape[0] % t:
            raise ValueError(f"AIM: a batch of {x.shape[0]} frames is not a whole number of {t}-frame clips")
        clips = x.view(-1, t, x.shape[1], d) + self.embedding.to(x.dtype)[None, :, None]
        return (clips.view(x.shape), *rest)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """The original's drop-path schedule: linear from 0 (first block) to ``rate`` (last block)."""
    return [float(r) for r in torch.linspace(0, rate, depth)]


class AIM(VitMethod):
    """Temporal, spatial and joint adapters in every block of an image ViT, for video."""

    name = "aim"
    description = "AIM temporal / spatial / joint adapters for video (timm ViT in a VideoClassifier); adapters + head"
    Config = AIMConfig
    needs_standard_blocks = True
    video = True
    starts_as_identity = True
    _spatial: tuple[tuple[Site, SpatialAdaptation], ...] = ()
    _hook = None

    def _width(self, dim: int) -> int:
        width = int(dim * self.config.mlp_ratio)
        if width < 1:
            raise ConfigError(f"aim.mlp_ratio: {self.config.mlp_ratio} leaves no adapter width for model width {dim}")
        return width

    def insert(self, model: nn.Module) -> None:
        vit = find_vit(model)
        if not hasattr(model, "num_frames"):
            raise UnsupportedModelError("AIM needs a VideoClassifier, which knows the number of frames")
        cfg, dim, frames = self.config, vit.embed_dim, model.num_frames
        width = self._width(dim)
        like = next(vit.blocks[0].parameters()).detach()
        rates = drop_path_rates(cfg.drop_path_rate, len(vit.blocks))
        spatial_wrappers = []
        for i, rate in enumerate(rates):
            wrapper = adapted_block(model, i)
            block, site = inner_blocks(vit)[i], block_site(vit, i, "attn")
            spatial = SpatialAdaptation(site.module, AimAdapter(dim, width, skip=True, like=like))
            site.wrap(spatial)
            spatial_wrappers.append((site, spatial))
            wrapper.before_attn[self.adapter_name] = TemporalAdaptation(
                block, spatial, dim, width, frames, cfg.second_temporal_adapter, rate, like
            )
            wrapper.beside_mlp[self.adapter_name] = JointAdaptation(block, dim, width, cfg.joint_scale, rate, like)
        self._spatial = tuple(spatial_wrappers)
        embeddings = vit._modules.get(EMBEDDINGS_ATTR)
        if embeddings is None:
            embeddings = nn.ModuleDict()
            setattr(vit, EMBEDDINGS_ATTR, embeddings)
        embeddings[self.adapter_name] = TemporalEmbedding(frames, dim, like)
        self._hook = vit.norm_pre.register_forward_pre_hook(embeddings[self.adapter_name].add)

    def remove(self, model: nn.Module, merge: bool = False) -> None:
        vit = find_vit(model)
        self._hook.remove()
        self._hook = None
        embeddings = getattr(vit, EMBEDDINGS_ATTR)
        del embeddings[self.adapter_name]
        if not len(embeddings):
            delattr(vit, EMBEDDINGS_ATTR)
        for i, (site, spatial) in reversed(list(enumerate(self._spatial))):
            site.unwrap(spatial)
            del vit.blocks[i].before_attn[self.adapter_name]
            del vit.blocks[i].beside_mlp[self.adapter_name]
            release_block(model, i)
        self._spatial = ()

    def _parts(self, model: nn.Module) -> dict[str, nn.Module]:
        """The adapter's modules by name: per block ``temporal``, ``spatial``, ``joint``; the embedding."""
        vit = find_vit(model)
        parts: dict[str, nn.Module] = {}
        for i, (_, spatial) in enumerate(self._spatial):
            block = vit.blocks[i]
            parts[f"blocks.{i}.temporal"] = block.before_attn[self.adapter_name]
            parts[f"blocks.{i}.spatial"] = spatial.adapter
            parts[f"blocks.{i}.joint"] = block.beside_mlp[self.adapter_name]
        parts["temporal_embedding"] = getattr(vit, EMBEDDINGS_ATTR)[self.adapter_name]
        return parts

    def own_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{k}.{n}": p for k, m in self._parts(model).items() for n, p in m.named_parameters()}

    def own_modules(self, model: nn.Module) -> list[nn.Module]:
        return list(self._parts(model).values())
