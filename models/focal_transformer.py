"""The Focal Transformer classifier and backbone; v1 (``focal``) and the fast variant (``focalv2``) differ only in
their attention module. Parameter names follow the released checkpoints."""
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.layers import DropPath, Mlp, to_2tuple, trunc_normal_
from timm.models._features import feature_take_indices

from .focal_attention import FocalWindowAttention
from .focal_layout import pooled_levels
from .layers import PatchEmbed, WindowPool, interpolate_pos_embed, pad_to_multiple
from .topk_attention import TopKFocalAttention

GLOBAL_POOLS = ("avg", "")  # timm's names: mean over the map, or none (the head sees every position)


class FocalBlock(nn.Module):
    """Pre-norm transformer block with focal attention on ``(B, H, W, C)`` maps. As in the reference, a stage whose
    configured ``resolution`` is no larger than the window uses one window of that size and no surroundings."""

    def __init__(self, dim: int, resolution: Tuple[int, int], num_heads: int, window_size: int, shift: bool,
                 expand_size: int, focal_level: int, focal_window: int, pool_method: str, variant: str,
                 top_k: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, use_layerscale: bool = False,
                 layerscale_value: float = 1e-4):
        super().__init__()
        self.dim = dim
        self.resolution = resolution
        self.shift_size = window_size // 2 if shift else 0
        if min(resolution) <= window_size:
            window_size, expand_size, self.shift_size = min(resolution), 0, 0
        self.window_size = window_size
        self.mlp_ratio = mlp_ratio
        self.pool_layers = nn.ModuleList(WindowPool(dim, window_size, k, pool_method)
                                         for k in range(pooled_levels(focal_level, pool_method)))
        self.norm1 = nn.LayerNorm(dim)
        if variant == "focal":
            self.attn = FocalWindowAttention(dim, num_heads, window_size, expand_size, self.shift_size, focal_level,
                                             focal_window, pool_method, qkv_bias, qk_scale, attn_drop, drop)
        else:
            self.attn = TopKFocalAttention(dim, num_heads, window_size, focal_level, top_k, qkv_bias, qk_scale,
                                           attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.gamma_1 = nn.Parameter(layerscale_value * torch.ones(dim)) if use_layerscale else None
        self.gamma_2 = nn.Parameter(layerscale_value * torch.ones(dim)) if use_layerscale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = x.shape
        shortcut = x
        x = pad_to_multiple(self.norm1(x), self.window_size)
        if self.shift_size:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        pooled = [pool(x) for pool in self.pool_layers]
        x = self.attn(x, pooled)
        if self.shift_size:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = x[:, :h, :w]
        if self.gamma_1 is not None:
            x = self.gamma_1 * x
        x = shortcut + self.drop_path(x)
        y = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            y = self.gamma_2 * y
        return x + self.drop_path(y)

    def flops(self) -> float:
        """The reference's multiply-add count at the configured resolution."""
        h, w = self.resolution
        ws = self.window_size
        n_windows = h * w / ws / ws
        flops = 2 * self.dim * h * w + n_windows * self.attn.flops(ws * ws, h, w)
        for pool in self.pool_layers:
            n_pooled = n_windows * 2 ** pool.level
            flops += n_pooled * self.dim * pool.pool_size ** 2 + n_pooled * self.dim * 3 * self.dim
        return flops + 2 * h * w * self.dim * self.dim * self.mlp_ratio


class FocalStage(nn.Module):
    """The blocks of one resolution, followed (except in the last stage) by a 2x downsampling embedding."""

    def __init__(self, blocks: List[FocalBlock], downsample: Optional[PatchEmbed], resolution: Tuple[int, int]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.resolution = resolution
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Runs the blocks only; the caller applies ``downsample`` so it can read the stage output first."""
        for block in self.blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def flops(self) -> float:
        flops = sum(block.flops() for block in self.blocks)
        if self.downsample is not None:
            flops += self.downsample.flops(self.resolution[0] // 2, self.resolution[1] // 2)
        return flops


class FocalTransformer(nn.Module):
    """Focal Transformer classifier (``variant`` ``focal`` or ``focalv2``) for images of any size: ``img_size``
    fixes the window geometry (and ``flops()``); other sizes pad each stage to whole windows."""

    def __init__(self, variant: str = "focal", img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 4,
                 in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, ape: bool = False,
                 patch_norm: bool = True, use_checkpoint: bool = False, use_shift: bool = False,
                 focal_stages: Sequence[int] = (0, 1, 2, 3), focal_levels: Sequence[int] = (1, 1, 1, 1),
                 focal_windows: Sequence[int] = (7, 5, 3, 1), focal_pool: str = "none", focal_topk: int = 128,
                 expand_stages: Sequence[int] = (0, 1, 2, 3), expand_sizes: Sequence[int] = (3, 3, 3, 3),
                 expand_layer: str = "all", use_conv_embed: bool = False, use_layerscale: bool = False,
                 layerscale_value: float = 1e-4, use_pre_norm: bool = False, global_pool: str = "avg",
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.variant = variant
        self.num_classes = num_classes
        self.global_pool = _check_pool(global_pool)
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (self.num_layers - 1))  # no pre-logits layer
        self.img_size = img_size
        self.in_chans = in_chans
        self.output_fmt = "NHWC"  # of forward_features, as timm's swin
        self.patches_resolution = tuple(side // patch_size for side in to_2tuple(img_size))
        self.feature_info = []

        # pre-norm belongs to the downsampling layers only: the reference stem has none
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, use_conv_embed, patch_norm, is_stem=True)
        self.absolute_pos_embed = None
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.patches_resolution), embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)

        drop_path = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        skip_expand_parity = {"all": None, "even": 0, "odd": 1}[expand_layer]
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            dim = int(embed_dim * 2 ** i)
            resolution = (self.patches_resolution[0] // 2 ** i, self.patches_resolution[1] // 2 ** i)
            expand = expand_sizes[i] if i in expand_stages else 0
            blocks = [
                FocalBlock(dim, resolution, num_heads[i], window_size, shift=use_shift and j % 2 == 1,
                           expand_size=0 if j % 2 == skip_expand_parity else expand,
                           focal_level=focal_levels[i], focal_window=focal_windows[i],
                           pool_method=focal_pool if i in focal_stages else "none", variant=variant,
                           top_k=focal_topk, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                           drop=drop_rate, attn_drop=attn_drop_rate, drop_path=drop_path[sum(depths[:i]) + j],
                           use_layerscale=use_layerscale, layerscale_value=layerscale_value)
                for j in range(depth)]
            last = i == len(depths) - 1
            downsample = None if last else PatchEmbed(2, dim, 2 * dim, use_conv_embed, True, use_pre_norm)
            self.layers.append(FocalStage(blocks, downsample, resolution))
            self.feature_info.append(dict(num_chs=dim, reduction=patch_size * 2 ** i, module=f"layers.{i}"))

        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        self.set_grad_checkpointing(use_checkpoint)
        if device is not None or dtype is not None:  # timm's factory arguments: built as usual, then moved
            self.to(device=device, dtype=dtype)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Exact names (timm's optimizer factory reads these, not the keywords)."""
        keywords = self.no_weight_decay_keywords()
        return {"absolute_pos_embed"} | {n for n, _ in self.named_parameters() if any(k in n for k in keywords)}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        return {"relative_position_bias_table"} if self.variant == "focal" else set()

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups by depth for layer-wise learning-rate decay: the stem, each block in order (a stage's
        patch merging after its blocks), the final norm; the head ranks last."""
        return dict(
            stem=r"^(?:patch_embed|absolute_pos_embed)",
            blocks=r"^layers\.(\d+)" if coarse else [
                (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                (r"^layers\.(\d+)\.downsample", (99998,)),
                (r"^norm", (99999,)),
            ])

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new head for ``num_classes`` (0: none) on the model's device and dtype."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = _check_pool(global_pool)
        like = self.patch_embed.proj.weight
        self.head = (nn.Linear(self.num_features, num_classes, device=like.device, dtype=like.dtype)
                     if num_classes > 0 else nn.Identity()).train(self.training)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.absolute_pos_embed is not None:
            pe = interpolate_pos_embed(self.absolute_pos_embed, self.patches_resolution, x.shape[1:3])
            x = x + pe.view(1, x.shape[1], x.shape[2], -1)
        return self.pos_drop(x)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm-style: stage outputs (before downsampling) as NCHW maps at strides 4, 8, 16, 32."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.layers), indices)
        intermediates = []
        x = self._embed(x)
        last = len(self.layers) - 1
        for i, stage in enumerate(self.layers):
            x = stage(x)
            if i in take:
                feat = self.norm(x) if (norm and i == last) else x
                intermediates.append(feat.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else feat)
            if stop_early and i >= max_index:
                break
            if stage.downsample is not None:
                x = stage.downsample(x)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if i == last else x), intermediates

    def prune_intermediate_layers(self, indices: Optional[Union[int, List[int]]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """timm's backbone API: drop the stages, final norm and head that ``forward_intermediates(indices)`` does
        not need."""
        take, max_index = feature_take_indices(len(self.layers), indices)
        prune_end = max_index < len(self.layers) - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()  # sized for, and applied to, the last stage only
        self.layers = self.layers[:max_index + 1]
        self.layers[-1].downsample = None
        if prune_end:  # features now end at the last kept stage; the head, sized for the final ones, goes too
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0)
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised last-stage map, ``(B, H/32, W/32, C)``."""
        x = self._embed(x)
        for stage in self.layers:
            x = stage(x)
            if stage.downsample is not None:
                x = stage.downsample(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def flops(self) -> float:
        """Multiply-adds at ``img_size`` as the reference counts them (the paper's FLOPs column)."""
        h, w = self.patches_resolution
        flops = self.patch_embed.flops(h, w)
        flops += sum(stage.flops() for stage in self.layers)
        flops += self.num_features * h * w // 2 ** self.num_layers
        return flops + self.num_features * self.num_classes


def _check_pool(global_pool: str) -> str:
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
    return global_pool


def _init_weights(module: nn.Module) -> None:
    """timm's ViT initialisation of linear layers (layer norms are made with ones and zeros already)."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
