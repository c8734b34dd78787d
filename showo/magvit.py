"""
MAGVIT-v2, the image tokenizer of Show-o, in plain torch: a convolutional encoder, a lookup-free
quantizer (LFQ: each of the z channels' signs is one bit of the code, 13 bits = 8,192 codes) and a
convolutional decoder. Parameter names match Show-o's released `magvitv2` checkpoint, so `load(dir)`
reads it from a local folder (*.safetensors or pytorch_model.bin). A 512x512 image is 32x32 = 1,024
codes (four 2x downsamplings).

`MagvitCodec` puts it behind the same small interface as the embedded world's exact codec
(`codebook.WorldCodec`): encode(images) -> codes [B, grid*grid], decode(codes) -> images,
codebook_size, grid.
"""
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import model as M


@dataclass
class MagvitConfig:
    """Show-o's magvitv2 shape (its config.json holds no architecture, so these are the defaults)."""
    ch: int = 128
    enc_ch_mult: list = field(default_factory=lambda: [1, 2, 2, 4, 4])
    enc_num_res_blocks: list = field(default_factory=lambda: [4, 3, 4, 3, 4])
    dec_ch_mult: list = field(default_factory=lambda: [1, 1, 2, 2, 4])
    dec_num_res_blocks: list = field(default_factory=lambda: [4, 4, 3, 4, 3])
    z_channels: int = 13   # bits per code: codebook 2**13 = 8192

    @property
    def downsample(self):
        return 2 ** (len(self.enc_ch_mult) - 1)


def norm(c):
    return nn.GroupNorm(32, c, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map (1x1 convolutions)."""

    def __init__(self, c):
        super().__init__()
        self.norm = norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (p(h).flatten(2).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(y.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right and bottom only, as the released model


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def level(blocks, **extra):
    """One resolution level, laid out as the checkpoint names it: .block[i], .attn (empty), extras."""
    m = nn.Module()
    m.block, m.attn = nn.ModuleList(blocks), nn.ModuleList()
    for k, v in extra.items():
        setattr(m, k, v)
    return m


def middle(c):
    m = nn.Module()
    m.block_1, m.attn_1, m.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
    return m


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        mult, ch = [1] + cfg.enc_ch_mult, cfg.ch
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i, n in enumerate(cfg.enc_num_res_blocks):
            cin, cout = ch * mult[i], ch * mult[i + 1]
            blocks = [ResnetBlock(cin if j == 0 else cout, cout) for j in range(n)]
            last = i == len(cfg.enc_num_res_blocks) - 1
            self.down.append(level(blocks, **({} if last else {"downsample": Downsample(cout)})))
        c = ch * cfg.enc_ch_mult[-1]
        self.mid = middle(c)
        self.norm_out, self.conv_out = norm(c), nn.Conv2d(c, cfg.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for lv in self.down:
            for b in lv.block:
                h = b(h)
            if hasattr(lv, "downsample"):
                h = lv.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.quant_conv(self.conv_out(F.silu(self.norm_out(h))))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, mult = cfg.ch, cfg.dec_ch_mult
        c = ch * mult[-1]
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = middle(c)
        ups = []
        for i in reversed(range(len(mult))):  # built top-down, stored bottom-up: up[i] is level i
            blocks = []
            for _ in range(cfg.dec_num_res_blocks[i]):
                blocks.append(ResnetBlock(c, ch * mult[i]))
                c = ch * mult[i]
            ups.insert(0, level(blocks, **({"upsample": Upsample(c)} if i else {})))
        self.up = nn.ModuleList(ups)
        self.norm_out, self.conv_out = norm(c), nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(self.post_quant_conv(z))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for lv in reversed(self.up):
            for b in lv.block:
                h = b(h)
            if hasattr(lv, "upsample"):
                h = lv.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LFQuantizer(nn.Module):
    """Lookup-free quantization: code = the bits (channel 0 first) of the signs of the z channels."""

    def __init__(self, bits):
        super().__init__()
        power = 2 ** torch.arange(bits - 1, -1, -1)
        self.register_buffer("embedding", ((torch.arange(2 ** bits)[:, None] // power) % 2).float() * 2 - 1)
        self.register_buffer("power_vals", power)

    def codes(self, z):
        """[B, z, H, W] -> [B, H*W] codes, row-major over the grid."""
        return ((z > 0).long() * self.power_vals.view(1, -1, 1, 1)).sum(1).flatten(1)

    def vectors(self, codes, grid):
        """[B, N] codes -> [B, z, grid, grid] of +-1."""
        return self.embedding[codes].view(len(codes), grid, grid, -1).permute(0, 3, 1, 2)


class MAGVITv2(nn.Module):
    def __init__(self, cfg=None):
        super().__init__()
        self.cfg = cfg or MagvitConfig()
        self.encoder, self.decoder = Encoder(self.cfg), Decoder(self.cfg)
        self.quantize = LFQuantizer(self.cfg.z_channels)

    @torch.no_grad()
    def encode(self, pixels):
        """[B, 3, H, W] in [-1, 1] -> [B, (H/16)*(W/16)] codes."""
        return self.quantize.codes(self.encoder(pixels))

    @torch.no_grad()
    def decode(self, codes):
        """[B, N] codes (N a square) -> [B, 3, H, W] in about [-1, 1]."""
        grid = int(round(codes.shape[1] ** 0.5))
        return self.decoder(self.quantize.vectors(codes, grid).to(self.quantize.embedding.dtype))


# ----------------------------------------------------------------------------- loading

def load(path, device="cpu"):
    """MAGVITv2 from a local folder: weights (*.safetensors or *.bin) and an optional config.json whose
    MagvitConfig keys override Show-o's shape (the released config.json has none, only class names)."""
    name = os.path.join(path, "config.json")
    given = M.read_json(name, "MAGVIT-v2's config") if os.path.isfile(name) else {}
    keys = MagvitConfig.__dataclass_fields__
    cfg = MagvitConfig(**{k: v for k, v in given.items() if k in keys})
    model = MAGVITv2(cfg)
    problem = M.load_weights(model, M.read_weights_dir(path), optional="quantize.")  # the LFQ buffers are fixed
    if problem:
        raise ValueError(f"{path}: weights do not match MAGVIT-v2 of shape {asdict(cfg)}: {problem} (set the shape in {name})")
    return model.to(device).eval()


def save(model, path):
    """The folder `load` reads: model.safetensors and config.json (for tests and random-weight runs)."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(asdict(model.cfg), f)


# ----------------------------------------------------------------------------- the codec interface

def to_pixels(image, resolution):
    """PIL image of any size -> [3, r, r] in [-1, 1]: shorter side resized to r (bilinear), centre crop,
    as Show-o's image transform."""
    image = image.convert("RGB")
    w, h = image.size
    s = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BILINEAR)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)


class MagvitCodec:
    """encode(PIL images of any size) -> LongTensor [B, grid*grid]; decode(codes) -> PIL images."""

    def __init__(self, model, grid):
        self.model, self.grid = model, grid
        self.codebook_size = 2 ** model.cfg.z_channels
        self.resolution = grid * model.cfg.downsample

    def encode(self, images):
        dev = self.model.quantize.embedding.device
        with torch.autocast(dev.type, enabled=False):  # fp32 whatever the trainer's autocast: signs near 0 stay put
            return self.model.encode(torch.stack([to_pixels(i, self.resolution) for i in images]).to(dev)).cpu()

    def decode(self, codes):
        dev = self.model.quantize.embedding.device
        codes = torch.stack([torch.as_tensor(c) for c in codes]) if isinstance(codes, (list, tuple)) else codes
        with torch.autocast(dev.type, enabled=False):
            x = self.model.decode(codes.reshape(-1, self.grid * self.grid).to(dev))
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in x]
