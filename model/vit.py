"""A Vision Transformer after Dosovitskiy et al., "An Image is Worth 16x16 Words" (arXiv 2010.11929).

The blocks read top to bottom like the paper (section 3.1, eq. 1-4):

    z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos             PatchEmbedder, LinearProjector
    z'_l = MSA(LN(z_{l-1})) + z_{l-1}                          ScaledDotProductAttention,
    z_l = MLP(LN(z'_l)) + z'_l                                 MultiHeadSelfAttention, MLP, EncoderBlock
    y = LN(z_L^0) -> head                                      ViT

Shapes: N batch, C channels, H x W image, p patch size, T = 1 + (H/p)(W/p) tokens,
D embed_dim, h n_heads, d qkv_dim (the width of one head).

Attention comes in three implementations behind one switch (``attention=``):

- ``"separate"``: the textbook form, ``n_heads`` heads each with its own W_q, W_k, W_v;
- ``"fused"``: one linear layer W = [W_q | W_k | W_v] for all heads, explicit softmax;
- ``"sdpa"``: the same fused projection with ``torch.nn.functional.scaled_dot_product_attention``
  (flash / memory-efficient kernels on a GPU).

They share one state-dict layout (timm's ``qkv`` layout), so a checkpoint written by one
loads into any other and ``ViT.to_attention`` converts without loss.

``stem="conv"`` puts a convolutional tokenizer (``ConvTokenizer``, after Hassani et al.'s
Compact Convolutional Transformers) in place of the linear patch projection E, for small data
sets. Its tokens lie on the same patch grid, so the position embeddings, their interpolation
and the attention after them are the paper's.

At another image size than the trained one, ``set_image_size`` interpolates the position
embeddings (the paper's way); ``forward(images, interpolate_pos_embed=True)`` does it for one
call, inside the autograd graph, which is how the trainer trains at several sizes (a model
trained so loses much less accuracy at 384). ``set_attention_scale`` multiplies every
attention logit by a factor beyond 1/sqrt(d): a model trained at 224 evaluated at 384 attends
over 577 tokens instead of 197 and may do better with sharper attention
(``components.highres`` picks the factor on the validation split).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.pos_embed import resize_pos_embed

ATTENTION_IMPLEMENTATIONS = ("separate", "fused", "sdpa")


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    height, width = size
    return (int(height), int(width))


def _grid(image_size: tuple[int, int], patch_size: int) -> tuple[int, int]:
    height, width = image_size
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"image size {height}x{width} is not divisible by the patch size {patch_size}; "
            f"choose a multiple of {patch_size}"
        )
    return (height // patch_size, width // patch_size)


class PatchEmbedder(nn.Module):
    """Cuts the image into p x p patches, flattens each to (C, p, p) order and projects it
    linearly: E, a (C p p) -> D matrix.

    (N, C, H, W) -> (N, (H/p)(W/p), C p p) -> (N, (H/p)(W/p), D)

    A reshape and one matrix product is the same function as a stride-p convolution (timm's
    form; E is its weight flattened). It was chosen for a GPU, where cuDNN's layout conversions
    and implicit GEMM for that convolution cost more than the matrix product
    (benchmarks/RESULTS.md, "Linear patch embedding").
    """

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_channels * patch_size * patch_size, embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n, c, h, w, p = *images.shape, self.patch_size
        patches = images.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return self.proj(patches.reshape(n, (h // p) * (w // p), c * p * p))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """LeCun normal, as the paper's reference code initialises E."""
        nn.init.trunc_normal_(self.proj.weight, std=math.sqrt(1.0 / self.proj.in_features) / 0.87962566103423978)
        nn.init.zeros_(self.proj.bias)


class ConvTokenizer(nn.Module):
    """Convolutions in place of the linear patch projection, after the tokenizer of Compact
    Convolutional Transformers (Hassani et al. 2021, "Escaping the Big Data Paradigm with Compact
    Transformers"): log2(p) blocks of a 3x3 convolution, a ReLU and a 3x3 max-pool of stride 2,
    D/2 channels wide but the last, D wide. The tokens lie on the patches'
    (H/p)(W/p) grid, but each sees overlapping neighbourhoods of the image and is invariant to
    small shifts: a CNN's prior, which a few thousand images cannot teach a linear projection in
    a short run.

    (N, C, H, W) -> (N, D/2, H/2, W/2) -> ... -> (N, D, H/p, W/p) -> (N, (H/p)(W/p), D)
    """

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        blocks = patch_size.bit_length() - 1
        widths = [in_channels] + [embed_dim // 2] * (blocks - 1) + [embed_dim]
        self.convs = nn.Sequential(
            *(
                nn.Sequential(
                    nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1)
                )
                for c_in, c_out in zip(widths, widths[1:])
            )
        ).to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Channels last, the kernels and the maps: oneDNN's convolutions and pools run faster so on
        # a CPU, and the last (N, D, H/p, W/p) map, stored as (N, H/p, W/p, D), is then already
        # the tokens' layout.
        maps = self.convs(images.contiguous(memory_format=torch.channels_last))
        return maps.flatten(2).transpose(1, 2)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """He normal, as CCT initialises its tokenizer."""
        for block in self.convs:
            nn.init.kaiming_normal_(block[0].weight)


STEMS = {"linear": PatchEmbedder, "conv": ConvTokenizer}


def check_stem(stem: str, patch_size: int) -> None:
    """Raises ValueError, saying what to choose, for an unknown stem or one that cannot make
    tokens of this patch size."""
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
    if stem == "conv" and (patch_size < 2 or patch_size & (patch_size - 1)):
        raise ValueError(
            f"the convolutional tokenizer halves the image log2(patch size) times, so it needs a power-of-2 patch "
            f"size from 2 on, not {patch_size}"
        )


class LinearProjector(nn.Module):
    """Patch vectors with the learned class token prepended and position embeddings added.

    (N, C, H, W) -> (N, 1 + (H/p)(W/p), D)

    The position embeddings belong to one patch grid; ``set_grid`` resizes them to another
    by 2D interpolation, as the paper does for fine-tuning at a higher resolution. With
    ``interpolate_pos_embed``, images on another grid get them interpolated for that call
    only, inside the autograd graph: training at several sizes trains the one set of them.
    """

    def __init__(
        self, image_size, patch_size: int, in_channels: int, embed_dim: int, dropout_rate: float, stem: str = "linear"
    ):
        super().__init__()
        self.patch_size = patch_size
        self.grid = _grid(_pair(image_size), patch_size)
        self.patch_embedder = STEMS[stem](patch_size, in_channels, embed_dim)
        self.class_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], embed_dim))
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, images: torch.Tensor, interpolate_pos_embed: bool = False) -> torch.Tensor:
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        divisible = not (images.shape[-2] % self.patch_size or images.shape[-1] % self.patch_size)
        if not divisible or (grid != self.grid and not interpolate_pos_embed):
            height, width = images.shape[-2:]
            size = height if height == width else (height, width)
            raise ValueError(
                f"this ViT's position embeddings are for {self.grid[0] * self.patch_size}x"
                f"{self.grid[1] * self.patch_size} images (a {self.grid[0]}x{self.grid[1]} patch grid), "
                f"got {height}x{width}: call model.set_image_size({size}) to interpolate them to the "
                f"new size (the paper's way), or resize the images to the size the model was trained at"
                + ("" if divisible else f" (any size must be a multiple of the patch size {self.patch_size})")
            )
        patches = self.patch_embedder(images)
        class_token = self.class_token.expand(patches.shape[0], -1, -1)
        pos_embed = resize_pos_embed(self.pos_embed, self.grid, grid)  # itself on the model's own grid
        return self.dropout(torch.cat([class_token, patches], dim=1) + pos_embed)

    @torch.no_grad()
    def set_grid(self, grid: tuple[int, int], mode: str = "bicubic", antialias: bool = True) -> None:
        resized = resize_pos_embed(self.pos_embed.data, self.grid, grid, mode=mode, antialias=antialias)
        self.pos_embed = nn.Parameter(resized)
        self.grid = tuple(grid)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: nn.Dropout, scale: float) -> torch.Tensor:
    """softmax(scale Q K^T) V over the last two dimensions, scale = s / sqrt(d) (the paper's s = 1):
    (..., T, d) -> (..., T, d)."""
    scores = (q * scale) @ k.transpose(-2, -1)
    return dropout(scores.softmax(dim=-1)) @ v


class ScaledDotProductAttention(nn.Module):
    """One attention head with its own W_q, W_k, W_v.

    (N, T, D) -> (N, T, d)
    """

    def __init__(self, embed_dim: int, qkv_dim: int, dropout_rate: float):
        super().__init__()
        self.q = nn.Linear(embed_dim, qkv_dim)
        self.k = nn.Linear(embed_dim, qkv_dim)
        self.v = nn.Linear(embed_dim, qkv_dim)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        return attend(self.q(x), self.k(x), self.v(x), self.dropout, scale)


class MultiHeadSelfAttention(nn.Module):
    """h heads side by side, concatenated and projected back to the model width.

    (N, T, D) -> (N, T, D)

    ``attention`` picks how the heads are computed (see the module docstring). Whatever it
    is, the state dict holds one ``qkv`` layer of shape (3 h d, D): rows are [Q heads; K
    heads; V heads], each head d rows, the layout of timm and of the fused implementations.
    """

    def __init__(
        self,
        embed_dim: int,
        qkv_dim: int,
        n_heads: int,
        dropout_rate: float,
        attention: str,
        attention_scale: float = 1.0,
    ):
        super().__init__()
        if attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {attention!r}")
        self.attention, self.n_heads, self.qkv_dim = attention, n_heads, qkv_dim
        self.dropout_rate = dropout_rate
        self.scale = attention_scale * qkv_dim**-0.5  # of Q K^T
        if attention == "separate":
            self.heads = nn.ModuleList(
                ScaledDotProductAttention(embed_dim, qkv_dim, dropout_rate) for _ in range(n_heads)
            )
            self._register_state_dict_hook(_heads_to_qkv_state)
            self._register_load_state_dict_pre_hook(_qkv_state_to_heads, with_module=True)
        else:
            self.qkv = nn.Linear(embed_dim, 3 * n_heads * qkv_dim)
            self.attn_dropout = nn.Dropout(dropout_rate)
        self.proj = nn.Linear(n_heads * qkv_dim, embed_dim)
        self.proj_dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attention == "separate":
            heads = torch.cat([head(x, self.scale) for head in self.heads], dim=-1)
        else:
            batch, tokens, _ = x.shape
            q, k, v = self.qkv(x).view(batch, tokens, 3, self.n_heads, self.qkv_dim).permute(2, 0, 3, 1, 4)
            if self.attention == "sdpa":
                dropout = self.dropout_rate if self.training else 0.0
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale)
            else:
                out = attend(q, k, v, self.attn_dropout, self.scale)
            heads = out.transpose(1, 2).reshape(batch, tokens, self.n_heads * self.qkv_dim)
        return self.proj_dropout(self.proj(heads))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Xavier-uniform on the fused (3 h d, D) matrix, so every implementation starts alike."""
        weight = torch.empty(3 * self.n_heads * self.qkv_dim, self.proj.out_features, device=self.proj.weight.device)
        nn.init.xavier_uniform_(weight)
        self.load_state_dict({**self.state_dict(), "qkv.weight": weight, "qkv.bias": torch.zeros_like(weight[:, 0])})
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)


_QKV = ("q", "k", "v")


def _heads_to_qkv_state(module: MultiHeadSelfAttention, state: dict, prefix: str, _local_metadata) -> None:
    """State-dict hook of the separate implementation: per-head q/k/v -> one ``qkv`` layer."""
    for kind in ("weight", "bias"):
        parts = [state.pop(f"{prefix}heads.{h}.{name}.{kind}") for name in _QKV for h in range(module.n_heads)]
        state[f"{prefix}qkv.{kind}"] = torch.cat(parts, dim=0)
    for key in [key for key in state if key.startswith(f"{prefix}proj.")]:
        state[key] = state.pop(key)  # the fused implementations' key order: qkv, then proj


def _qkv_state_to_heads(module: MultiHeadSelfAttention, state: dict, prefix: str, *_args) -> None:
    """Load pre-hook of the separate implementation: one ``qkv`` layer -> per-head q/k/v."""
    for kind in ("weight", "bias"):
        key = f"{prefix}qkv.{kind}"
        if key not in state:
            continue  # load_state_dict reports the missing keys itself
        chunks = state.pop(key).chunk(3 * module.n_heads, dim=0)
        for index, chunk in enumerate(chunks):
            name, head = _QKV[index // module.n_heads], index % module.n_heads
            state[f"{prefix}heads.{head}.{name}.{kind}"] = chunk


class MLP(nn.Module):
    """The paper's two-layer MLP with a GELU non-linearity.

    (N, T, D) -> (N, T, D)
    """

    def __init__(self, embed_dim: int, mlp_hidden_size: int, dropout_rate: float):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, mlp_hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_hidden_size, embed_dim)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drops a residual branch for whole samples.

    (N, ...) -> (N, ...), scaled by 1 / keep probability while training.
    """

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class EncoderBlock(nn.Module):
    """One pre-norm Transformer encoder block (eq. 2 and 3 of the paper).

    (N, T, D) -> (N, T, D)
    """

    def __init__(
        self, embed_dim, qkv_dim, mlp_hidden_size, n_heads, dropout_rate, drop_path_rate, attention, attention_scale
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dim, eps=1e-6)
        self.attn = MultiHeadSelfAttention(embed_dim, qkv_dim, n_heads, dropout_rate, attention, attention_scale)
        self.norm2 = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mlp = MLP(embed_dim, mlp_hidden_size, dropout_rate)
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """The Vision Transformer: projector, ``n_layers`` encoder blocks, a head on the class token.

    (N, C, H, W) -> (N, n_classes) logits

    ``drop_path_rate`` is the stochastic-depth rate of the last block, rising linearly from 0
    at the first (as in DeiT). ``attention_scale`` multiplies the attention logits beyond
    1/sqrt(d): 1 as trained, see ``set_attention_scale``. ``stem``: how images become tokens,
    "linear" (the paper's patch projection, ``PatchEmbedder``) or "conv" (``ConvTokenizer``).
    ``config`` holds every constructor argument, so ``ViT(**model.config)`` rebuilds the
    architecture of a checkpoint.
    """

    def __init__(
        self,
        image_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        embed_dim: int = 192,
        qkv_dim: int = 64,
        mlp_hidden_size: int = 768,
        n_layers: int = 12,
        n_heads: int = 3,
        n_classes: int = 1000,
        dropout_rate: float = 0.0,
        attention: str = "sdpa",
        drop_path_rate: float = 0.0,
        attention_scale: float = 1.0,
        stem: str = "linear",
    ):
        super().__init__()
        check_stem(stem, patch_size)
        image_size = _pair(image_size)
        self.config = dict(
            image_size=list(image_size),
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=embed_dim,
            qkv_dim=qkv_dim,
            mlp_hidden_size=mlp_hidden_size,
            n_layers=n_layers,
            n_heads=n_heads,
            n_classes=n_classes,
            dropout_rate=dropout_rate,
            attention=attention,
            drop_path_rate=drop_path_rate,
            attention_scale=attention_scale,
            stem=stem,
        )
        self.projector = LinearProjector(image_size, patch_size, in_channels, embed_dim, dropout_rate, stem)
        self.blocks = nn.Sequential(
            *(
                EncoderBlock(
                    embed_dim,
                    qkv_dim,
                    mlp_hidden_size,
                    n_heads,
                    dropout_rate,
                    drop_path_rate * i / max(n_layers - 1, 1),
                    attention,
                    attention_scale,
                )
                for i in range(n_layers)
            )
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, n_classes)
        self.reset_parameters()

    def forward(self, images: torch.Tensor, interpolate_pos_embed: bool = False) -> torch.Tensor:
        """``interpolate_pos_embed``: images of another size than the model's (a multiple of the
        patch size) are taken, the position embeddings bicubically interpolated to their grid for
        this call (how the trainer trains at several sizes); without it they are an error."""
        tokens = self.blocks(self.projector(images, interpolate_pos_embed))
        return self.head(self.norm(tokens[:, 0]))

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.config["image_size"])

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The initialisation of the paper's reference code (big_vision / timm's ``jax`` mode):
        LeCun-normal patch embedding (a convolutional tokenizer: He normal), Xavier-uniform linear
        layers (Q, K, V as one fused matrix whatever the implementation), tiny MLP biases,
        N(0, 0.02) position embeddings, a zero class token and a zero head."""
        self.projector.patch_embedder.reset_parameters()
        nn.init.normal_(self.projector.pos_embed, std=0.02)
        nn.init.zeros_(self.projector.class_token)
        for block in self.blocks:
            block.attn.reset_parameters()
            for linear in (block.mlp.fc1, block.mlp.fc2):
                nn.init.xavier_uniform_(linear.weight)
            nn.init.normal_(block.mlp.fc1.bias, std=1e-6)
            nn.init.normal_(block.mlp.fc2.bias, std=1e-6)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def to_attention(self, attention: str) -> ViT:
        """A new ViT computing the same function with another attention implementation."""
        other = ViT(**{**self.config, "attention": attention})
        other.load_state_dict(self.state_dict())
        parameter = next(self.parameters())
        return other.to(device=parameter.device, dtype=parameter.dtype).train(self.training)

    def set_image_size(self, image_size, mode: str = "bicubic", antialias: bool = True) -> ViT:
        """Switches the model to another input size for good by interpolating the position
        embeddings of the patch grid (the class token's embedding is kept). Returns self."""
        image_size = _pair(image_size)
        self.projector.set_grid(_grid(image_size, self.config["patch_size"]), mode=mode, antialias=antialias)
        self.config["image_size"] = list(image_size)
        return self

    def set_attention_scale(self, factor: float) -> ViT:
        """Multiplies the attention logits of every block by ``factor`` beyond 1/sqrt(d) (1: the
        paper's attention); kept in ``config``, so a checkpoint rebuilds with it. Returns self."""
        self.config["attention_scale"] = float(factor)
        for block in self.blocks:
            block.attn.scale = factor * block.attn.qkv_dim**-0.5
        return self

    @classmethod
    def from_timm(cls, timm_model: nn.Module, attention: str = "sdpa") -> ViT:
        """Our ViT with the function of a timm ``VisionTransformer`` (class token, token
        pooling, no register tokens, no layer scale, pre-norm), e.g. to start from its
        pretrained weights."""
        from model.timm_convert import config_from_timm, state_dict_from_timm

        model = cls(**config_from_timm(timm_model), attention=attention)
        model.load_state_dict(state_dict_from_timm(timm_model))
        return model
