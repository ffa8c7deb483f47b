"""A minimal, independent re-implementation of kakaobrain's minDALL-E, for parity tests only.

Written from minDALL-E's source semantics (dalle/models/stage1/{vqgan,layers}.py,
dalle/models/stage2/{transformer,layers}.py, dalle/models/tokenizer.py, dalle/utils/sampling.py),
with its module names, so `state_dict()` keys are the release checkpoints' keys. Nothing here is
imported from dalle_proto: the tests compare the two.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import CharBPETokenizer


# ---- tokenizer (dalle/models/tokenizer.py: build_tokenizer) -----------------------------------
def build_tokenizer(path: str, context_length: int = 64):
    tokenizer = CharBPETokenizer.from_file(vocab_filename=os.path.join(path, "bpe-16k-vocab.json"),
                                           merges_filename=os.path.join(path, "bpe-16k-merges.txt"),
                                           unk_token="[UNK]", lowercase=True, dropout=None)
    tokenizer.add_special_tokens(["[PAD]"])
    tokenizer.enable_padding(length=context_length, pad_id=tokenizer.token_to_id("[PAD]"))
    tokenizer.enable_truncation(max_length=context_length)
    return tokenizer


# ---- stage 2 (Transformer1d, minGPT style) -----------------------------------------------------
class MultiHeadSelfAttention(nn.Module):
    def __init__(self, ctx_len: int, embed_dim: int, n_heads: int, bias: bool = True):
        super().__init__()
        self.key = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.query = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.value = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.proj = nn.Linear(embed_dim, embed_dim, bias)
        self.n_heads = n_heads
        self.register_buffer("mask", torch.tril(torch.ones(ctx_len, ctx_len)).view(1, ctx_len, ctx_len),
                             persistent=False)

    def forward(self, x, use_cache=False, layer_past=None):
        B, T, C = x.shape
        x = x.transpose(0, 1).contiguous()  # (T, B, C)
        k = self.key(x).view(T, B * self.n_heads, C // self.n_heads).transpose(0, 1)  # (B*nh, T, hs)
        q = self.query(x).view(T, B * self.n_heads, C // self.n_heads).transpose(0, 1)
        v = self.value(x).view(T, B * self.n_heads, C // self.n_heads).transpose(0, 1)
        present = torch.stack([k, v]) if use_cache else None
        if layer_past is not None:
            past_key, past_value = layer_past
            k = torch.cat([past_key, k], dim=-2)
            v = torch.cat([past_value, v], dim=-2)
        att = torch.bmm(q, k.transpose(-2, -1) * (1.0 / math.sqrt(k.size(-1))))  # (B*nh, T, K)
        if not (use_cache and layer_past is not None):
            att = att.masked_fill(self.mask[:, :T, :T] == 0, float("-inf"))
        y = torch.bmm(F.softmax(att, dim=-1), v)  # (B*nh, T, hs)
        y = self.proj(y.transpose(0, 1).contiguous().view(T, B, C)).transpose(0, 1).contiguous()  # (B, T, C)
        return (y, present) if use_cache else y


class Block(nn.Module):
    def __init__(self, ctx_len: int, embed_dim: int, n_heads: int, mlp_bias: bool = True, attn_bias: bool = True):
        super().__init__()
        self.ln1 = nn.LayerNorm(embed_dim)
        self.ln2 = nn.LayerNorm(embed_dim)
        self.attn = MultiHeadSelfAttention(ctx_len, embed_dim, n_heads, attn_bias)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim, bias=mlp_bias), nn.GELU(),
                                 nn.Linear(4 * embed_dim, embed_dim, bias=mlp_bias), nn.Dropout(0.0))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))

    def sample(self, x, layer_past=None):
        attn, present = self.attn(self.ln1(x), use_cache=True, layer_past=layer_past)
        x = x + attn
        return x + self.mlp(self.ln2(x)), present


class Transformer1d(nn.Module):
    def __init__(self, vocab_size_txt: int, vocab_size_img: int, embed_dim: int, n_layers: int, n_heads: int,
                 ctx_len_img: int, ctx_len_txt: int, mlp_bias: bool = True, attn_bias: bool = True):
        super().__init__()
        self.tok_emb_img = nn.Embedding(vocab_size_img, embed_dim)
        self.tok_emb_txt = nn.Embedding(vocab_size_txt, embed_dim)
        self.pos_emb_img = nn.Embedding(ctx_len_img, embed_dim)
        self.pos_emb_txt = nn.Embedding(ctx_len_txt, embed_dim)
        self.blocks = nn.Sequential(*[Block(ctx_len_img + ctx_len_txt, embed_dim, n_heads, mlp_bias, attn_bias)
                                      for _ in range(n_layers)])
        self.ln_f = nn.LayerNorm(embed_dim)
        self.head_img = nn.Linear(embed_dim, vocab_size_img, bias=False)
        self.head_txt = nn.Linear(embed_dim, vocab_size_txt, bias=False)

    def forward(self, images, texts, pos_images, pos_texts):
        N = texts.shape[1]
        x = torch.cat([self.tok_emb_txt(texts) + self.pos_emb_txt(pos_texts),
                       self.tok_emb_img(images) + self.pos_emb_img(pos_images)], dim=1)
        x = self.ln_f(self.blocks(x))
        return self.head_img(x[:, N - 1:-1]), self.head_txt(x[:, :N - 1])  # logits_img, logits_txt

    @torch.no_grad()
    def sampling(self, images, texts, pos_images, pos_texts, past=None):
        N = texts.shape[1]
        if images is None:
            x = self.tok_emb_txt(texts) + self.pos_emb_txt(pos_texts)
            presents = []
            for block in self.blocks:
                x, present = block.sample(x, layer_past=None)
                presents.append(present)
            return self.head_img(self.ln_f(x)[:, N - 1]), presents
        x = self.tok_emb_img(images) + self.pos_emb_img(pos_images)
        past = torch.cat(past, dim=-2)  # (L, 2, B*nh, t, hs)
        presents = []
        for i, block in enumerate(self.blocks):
            x, present = block.sample(x, layer_past=past[i])
            presents.append(present)
        return self.head_img(self.ln_f(x)[:, -1]), presents


def cutoff_topk_logits(logits, k):
    v, _ = torch.topk(logits, k)
    out = logits.clone()
    out[out < v[:, [-1]]] = -float("inf")
    return out


@torch.no_grad()
def sampling(model: Transformer1d, tokens, top_k=256, softmax_temperature=1.0, max_seq_len=256):
    """dalle/utils/sampling.py: `sampling` (top-k only, fp32), with its `past` list."""
    code, past = None, None
    pos_enc_tokens = torch.arange(tokens.shape[1]).repeat((tokens.shape[0], 1))
    for cnt in range(max_seq_len):
        if code is None:
            code_, pos_code_ = None, None
        else:
            code_ = code[:, cnt - 1].unsqueeze(-1)
            pos_code_ = torch.full_like(code_, cnt - 1)
        logits, present = model.sampling(code_, tokens, pos_code_, pos_enc_tokens, past=past)
        logits = logits.to(torch.float32) / softmax_temperature
        present = torch.stack(present).clone()  # (L, 2, B*nh, t, hs)
        past = [present] if past is None else past + [present]
        probs = F.softmax(cutoff_topk_logits(logits, top_k), dim=-1)
        idx = torch.multinomial(probs, num_samples=1)
        code = idx if code is None else torch.cat([code, idx], dim=1)
    return code


# ---- stage 1 (taming's VQGAN as minDALL-E ships it) -------------------------------------------
def Normalize(c):
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


def swish(x):
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x):
        h = self.conv2(self.dropout(swish(self.norm2(self.conv1(swish(self.norm1(x)))))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = Normalize(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        w_ = torch.bmm(q.reshape(b, c, h * w).permute(0, 2, 1), k.reshape(b, c, h * w)) * (int(c) ** (-0.5))
        w_ = F.softmax(w_, dim=2).permute(0, 2, 1)
        h_ = torch.bmm(v.reshape(b, c, h * w), w_).reshape(b, c, h, w)
        return x + self.proj_out(h_)


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(c):
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
    return mid


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, in_channels, resolution, z_channels):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_ch_mult, curr_res = (1,) + tuple(ch_mult), resolution
        self.down = nn.ModuleList()
        for i_level in range(len(ch_mult)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != len(ch_mult) - 1:
                down.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(down)
        self.mid = _mid(block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, 1, 1)


class Decoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, out_ch, resolution, z_channels):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = _mid(block_in)
        self.up = nn.ModuleList()
        for i_level in reversed(range(len(ch_mult))):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample(block_in)
                curr_res *= 2
            self.up.insert(0, up)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, 1, 1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            for i_block in range(self.num_res_blocks + 1):
                h = self.up[i_level].block[i_block](h)
                if len(self.up[i_level].attn) > 0:
                    h = self.up[i_level].attn[i_block](h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, dim, n_embed):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, dim)


class VQGAN(nn.Module):
    def __init__(self, n_embed, embed_dim, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels,
                 in_channels=3, out_ch=3):
        super().__init__()
        arch = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                    resolution=resolution, z_channels=z_channels)
        self.encoder = Encoder(in_channels=in_channels, **arch)
        self.decoder = Decoder(out_ch=out_ch, **arch)
        self.quantize = VectorQuantizer(embed_dim, n_embed)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    @torch.no_grad()
    def decode_code(self, code):  # (B, h, w) -> (B, 3, H, W)
        quant = self.quantize.embedding(code).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(quant))


@torch.no_grad()
def pixels(stage1: VQGAN, codes: torch.Tensor) -> torch.Tensor:
    """Dalle.sampling's last line: codes (B, h, w) -> (B, 3, H, W) in [0, 1]."""
    return torch.clamp(stage1.decode_code(codes) * 0.5 + 0.5, 0, 1)
