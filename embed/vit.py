"""open_clip's VisionTransformer in plain torch, for the towers geovote trains itself: the same modules,
the same parameter names (a state dict moves between the two unchanged) and the same outputs (tested
against open_clip's on random weights), without importing open_clip or torchvision. Loading the bundled
model for a query then costs torch alone.

Covers what `finetune` writes from an architecture spec: a class-token ViT with learnable positions,
pre- and post-LayerNorm, GELU (or QuickGELU) MLPs, a projection; anything else in a CLIPVisionCfg
(layer scale, attentional pooling, patch dropout at eval, timm towers, ...) goes to open_clip
(`supports` says which).
"""
from __future__ import annotations

import torch
from torch import nn

DEFAULTS = {"mlp_ratio": 4.0, "ls_init_value": None, "patch_dropout": 0.0, "attentional_pool": False,
            "no_ln_pre": False, "pos_embed_type": "learnable", "final_ln_after_pool": False,
            "pool_type": "tok", "output_tokens": False, "act_kwargs": None, "norm_kwargs": None,
            "block_type": None, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
            "scale_attn_inner": False, "scale_attn": False, "scale_fc": False, "timm_model_name": None}
REQUIRED = ("width", "layers", "patch_size", "image_size")


def supports(vision_cfg: dict) -> bool:
    """Whether this module reproduces open_clip's tower for `vision_cfg` (else open_clip builds it)."""
    if not all(k in vision_cfg for k in REQUIRED):
        return False
    known = set(DEFAULTS) | set(REQUIRED) | {"head_width"}
    return set(vision_cfg) <= known and all(vision_cfg.get(k, v) == v for k, v in DEFAULTS.items()
                                            if k != "mlp_ratio")


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """open_clip's: computed in the input's dtype (matters only under autocast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return y.to(x.dtype)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int, act):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp_width))
        self.mlp.add_module("gelu", act())
        self.mlp.add_module("c_proj", nn.Linear(mlp_width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, act):
        super().__init__()
        self.resblocks = nn.ModuleList([Block(width, heads, mlp_width, act) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    """(B, 3, S, S) normalised images -> (B, output_dim) embeddings (not normalised), as open_clip's."""

    def __init__(self, embed_dim: int, vision_cfg: dict, quick_gelu: bool = False):
        super().__init__()
        width, layers = int(vision_cfg["width"]), int(vision_cfg["layers"])
        patch = int(vision_cfg["patch_size"])
        size = vision_cfg["image_size"]
        size = int(size[0] if isinstance(size, (list, tuple)) else size)
        heads = width // int(vision_cfg.get("head_width", 64))
        mlp_width = int(width * float(vision_cfg.get("mlp_ratio", 4.0)))
        self.image_size, self.output_dim = size, int(embed_dim)
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((size // patch) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_width, QuickGELU if quick_gelu else nn.GELU)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transformer(self.ln_pre(patch_tokens(self, x)))
        return self.ln_post(x[:, 0]) @ self.proj  # the class token, projected


def patch_tokens(tower: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) -> (B, 1 + patches, width): the class token and the patches, positions added, of a
    tower with `conv1`, `class_embedding` and `positional_embedding` (open_clip's names; CLIP's layout)."""
    x = tower.conv1(x)  # (B, width, S/p, S/p)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, tokens, width)
    cls = tower.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    return torch.cat([cls, x], dim=1) + tower.positional_embedding.to(x.dtype)
