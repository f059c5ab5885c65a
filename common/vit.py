"""A from-scratch Vision Transformer with timm's parameter names (MoCo v3 / DINO style).

Written out here (about 150 lines) instead of importing timm: MoCo v3 leans on timm internals and
pins an old release. The state dict keys are timm's (`patch_embed.proj`, `cls_token`, `pos_embed`,
`blocks.N.attn.qkv`, `blocks.N.mlp.fc1`, `norm`), so a trained backbone loads into timm without
renaming:
    timm.create_model("vit_small_patch16_224", num_classes=0, num_heads=12)  # our default ViT-S/16
Name the heads: timm's vit_small has 6 (DeiT), ours 12 (MoCo v3). The weights have the same shapes
either way, so a 12-head state dict loads strictly into timm's 6-head model and silently computes
something else (outputs differ by about 0.3). `vit.timm_call()` returns the exact call for any of
our ViTs.

MoCo v3 choices (Chen, Xie, He 2021, Sec. 4 and `vits.py`): fixed 2-D sin-cos position embedding,
optional frozen random patch projection ("stop-grad conv1"), uniform qkv init with the fan split
into q, k, v, xavier elsewhere.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sincos_pos_embed(grid, dim, temperature=10000.0):
    """(1, 1 + grid*grid, dim) fixed 2-D sin-cos embedding; the CLS position is all zeros (MoCo v3).

    Patch n = row * grid + col (the patches are flattened row by row). Channels: sin, cos of
    row * omega, then sin, cos of col * omega, as MoCo v3's build_2d_sincos_position_embedding
    computes them: its `meshgrid(grid_w, grid_h)` ('ij') makes the variable named grid_w the row
    index, so its "w" half is the row."""
    assert dim % 4 == 0, "the 2-D sin-cos embedding needs embed_dim divisible by 4"
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32),
                                torch.arange(grid, dtype=torch.float32), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_row = rows.flatten()[:, None] * omega[None]  # (N, dim/4)
    out_col = cols.flatten()[:, None] * omega[None]
    pe = torch.cat([out_row.sin(), out_row.cos(), out_col.sin(), out_col.cos()], dim=1)  # (N, dim)
    return torch.cat([torch.zeros(1, dim), pe])[None]


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # (B, 3, H, W) -> (B, N, dim)
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x):  # (B, T, dim) -> 3 x (B, heads, T, dim/heads)
        B, T, C = x.shape
        return (self.qkv(x).reshape(B, T, 3, self.num_heads, C // self.num_heads)
                .permute(2, 0, 3, 1, 4).unbind(0))

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        # flash / memory-efficient kernels where available
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).flatten(2))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Headless ViT: `forward(x)` is the final-normed CLS token, shape (B, embed_dim)."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=12,
                 mlp_ratio=4.0, stop_grad_patch_embed=False):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of the patch size "
                             f"{patch_size}")
        self.embed_dim, self.depth, self.patch_size = embed_dim, depth, patch_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # A parameter (not a buffer) so the key sits in the state dict exactly where timm expects
        # it; never trained.
        self.pos_embed = nn.Parameter(sincos_pos_embed(img_size // patch_size, embed_dim),
                                      requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()
        # MoCo v3 Sec. 4.1: a frozen random patch projection stabilises training
        if stop_grad_patch_embed:
            self.patch_embed.proj.weight.requires_grad_(False)
            self.patch_embed.proj.bias.requires_grad_(False)

    def _init_weights(self):
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if name.endswith("qkv"):  # treat q, k, v as three separate matrices for the fan
                    bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                    nn.init.uniform_(m.weight, -bound, bound)
                else:
                    nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=1e-6)
        # xavier over the flattened (dim, 3*p*p) kernel, as MoCo v3
        w = self.patch_embed.proj.weight
        bound = math.sqrt(6.0 / (w.shape[0] + w[0].numel()))
        nn.init.uniform_(w, -bound, bound)
        nn.init.zeros_(self.patch_embed.proj.bias)

    def tokens(self, x):  # (B, 3, H, W) -> (B, 1+N, dim): patches, CLS and position embedding
        if x.shape[-1] != x.shape[-2] \
                or (x.shape[-1] // self.patch_size) ** 2 + 1 != self.pos_embed.shape[1]:
            raise ValueError(f"input {tuple(x.shape[-2:])} does not match the position embedding "
                             f"({self.pos_embed.shape[1] - 1} patches of {self.patch_size} px)")
        x = self.patch_embed(x)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed

    def forward(self, x):
        x = self.tokens(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]

    def forward_intermediates(self, x, norm=True):
        """Returns (cls, tokens): the final-normed CLS (B, dim) and a list of `depth` tensors
        (B, 1+N, dim), the output of every block, each passed through the shared final LayerNorm
        when `norm` (SDSSL, IFACLR)."""
        x = self.tokens(x)
        tokens = []
        for block in self.blocks:
            x = block(x)
            tokens.append(self.norm(x) if norm else x)
        last = tokens[-1] if norm else self.norm(x)
        return last[:, 0], tokens

    def timm_call(self):
        """The timm call that rebuilds this ViT, so that its state dict loads strictly and computes
        the same."""
        heads, img = (self.blocks[0].attn.num_heads,
                      round((self.pos_embed.shape[1] - 1) ** 0.5) * self.patch_size)
        name = {(192, 16): "vit_tiny_patch16_224", (384, 16): "vit_small_patch16_224",
                (384, 32): "vit_small_patch32_224", (768, 16): "vit_base_patch16_224",
                (768, 32): "vit_base_patch32_224"}.get((self.embed_dim, self.patch_size)) \
            if self.depth == 12 else None
        # not a named timm model: its generic class, which has the same defaults (qkv bias, eps)
        if name is None:
            return (f"timm.models.vision_transformer.VisionTransformer(img_size={img}, "
                    f"patch_size={self.patch_size}, embed_dim={self.embed_dim}, "
                    f"depth={self.depth}, num_heads={heads}, num_classes=0)")
        return (f'timm.create_model("{name}", num_classes=0, num_heads={heads}'
                + (f", img_size={img})" if img != 224 else ")"))

    @torch.no_grad()
    def last_attention(self, x):
        """(B, heads, 1+N, 1+N) attention weights of the last block, computed explicitly (for
        visualisation)."""
        x = self.tokens(x)
        for block in self.blocks[:-1]:
            x = block(x)
        q, k, _ = self.blocks[-1].attn.qkv_heads(self.blocks[-1].norm1(x))
        return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
