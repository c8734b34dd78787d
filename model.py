"""
The unified model: one Phi-style decoder over a joint vocabulary of text tokens, special tokens,
personal-concept tokens and discrete image codes; its optimizer and supervised loss; the loading of
released weights into it (its samplers and scorers are in sampling.py).

- Block = Phi-1.5's (parallel attention + MLP, partial rotary embeddings, LayerNorm, biases, GELU);
  parameter names match transformers' PhiForCausalLM, so `from_pretrained(dir)` loads such a folder.
- Omni-attention as in Show-o: causal over text, bidirectional inside each image block;
  `Config.image_causal=True` makes image blocks causal (autoregressive image generation).
  `Config.layout="showo"` is Show-o's own masks exactly (see `omni_mask`), so a released Show-o
  checkpoint (`load_showo`) sees the sequences it was trained on.

Image code k has id `image_offset + k`.
"""
import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import sampling as S


@dataclass
class Config:
    vocab_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_inner: int = 512
    rotary_frac: float = 0.5   # Phi's partial_rotary_factor: rotary on this share of each head
    rope_theta: float = 10000.0
    ln_eps: float = 1e-5
    gelu: str = "tanh"         # "tanh" = Phi's gelu_new, "none" = exact erf GELU
    # joint vocabulary layout
    image_offset: int = 0
    codebook_size: int = 0
    mask_id: int = -1
    pad_id: int = 0
    boi_id: int = -1           # an image block is everything between <boi> and <eoi> (or the end)
    eoi_id: int = -1
    image_causal: bool = False
    layout: str = "nanosync"   # "showo": Show-o's masks and its <eoi> after every MaskGIT image
    mmu_id: int = -1           # Show-o's <|mmu|> task token (layout "showo")
    qk_norm: bool = False      # per-head LayerNorm on queries and keys (Show-o's Phi; plain Phi-1.5 has none)


# ----------------------------------------------------------------------------- the network

def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, self.nh = cfg.n_embd, cfg.n_head
        self.hd = d // cfg.n_head
        self.rot = int(self.hd * cfg.rotary_frac)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.dense = nn.Linear(d, d)
        if cfg.qk_norm:  # names as in transformers' PhiAttention, so Show-o's tensors load as they are
            self.q_layernorm = nn.LayerNorm(self.hd, eps=cfg.ln_eps)
            self.k_layernorm = nn.LayerNorm(self.hd, eps=cfg.ln_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, cos, sin, mask, cache=None, start=0, past=None):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.nh, self.hd).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.qk_norm:  # before the rotary embedding, over each head's dims, as Show-o's Phi does
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        r = self.rot  # rotary only on the first `rot` dims of each head, as in Phi
        q = torch.cat((q[..., :r] * cos + rotate_half(q[..., :r]) * sin, q[..., r:]), dim=-1)
        k = torch.cat((k[..., :r] * cos + rotate_half(k[..., :r]) * sin, k[..., r:]), dim=-1)
        if cache is not None:  # static cache: write this chunk at [start, start+T), attend to [0, start+T)
            cache[0][:, :, start:start + T] = k
            cache[1][:, :, start:start + T] = v
            k, v = cache[0][:, :, :start + T], cache[1][:, :, :start + T]
        elif past is not None:  # a prompt's keys/values computed once (prompt_kv): no in-place write, so
            k, v = torch.cat((past[0], k), 2), torch.cat((past[1], v), 2)  # autograd may reuse them per step
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dense(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cfg.n_embd, cfg.n_inner), nn.Linear(cfg.n_inner, cfg.n_embd)
        self.approx = cfg.gelu

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approx))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.n_embd, eps=cfg.ln_eps)
        self.self_attn, self.mlp = Attention(cfg), MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, start=0, past=None):
        h = self.input_layernorm(x)  # Phi: attention and MLP read the same normed input, in parallel
        return x + self.self_attn(h, cos, sin, mask, cache, start, past) + self.mlp(h)


class UnifiedModel(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.final_layernorm = nn.LayerNorm(cfg.n_embd, eps=cfg.ln_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size)
        rot = int(cfg.n_embd // cfg.n_head * cfg.rotary_frac)
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, rot, 2).float() / rot)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.grad_ckpt = False  # gradient checkpointing of the blocks in training forwards
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)

    def omni_mask(self, idx, valid):
        """[B,1,T,T] bool: causal, plus bidirectional inside each contiguous image block, minus padding."""
        T, c = idx.shape[1], self.cfg
        mask = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()[None]
        if not c.image_causal:
            # blocks come from the <boi>/<eoi> markers, not from token ids: object words in text use
            # image-code ids too, and they must stay causal, exactly as the text sampler decodes them
            opened, closing = (idx == c.boi_id).cumsum(1), idx == c.eoi_id
            img = opened > closing.cumsum(1)
            # Show-o counts both markers into the block; nanosync keeps them causal
            img = img | closing if c.layout == "showo" else img & (idx != c.boi_id)
            blk = torch.where(img, opened, -1)
            mask = mask | ((blk[:, :, None] == blk[:, None, :]) & img[:, :, None])
        if c.layout == "showo":
            mask = mask | self.mmu_prefix(idx, valid)
        mask = mask & valid[:, None, :]
        # a padded query may see no key at all; letting it see itself keeps SDPA free of NaN rows
        mask = mask | torch.eye(T, dtype=torch.bool, device=idx.device)
        return mask[:, None]

    def mmu_prefix(self, idx, valid):
        """[B,1,T] bool: Show-o's understanding rows (first token <|mmu|>) attend to everything up to and
        including their first <eoi>, the task token too; other rows get nothing extra."""
        T = idx.shape[1]
        first = idx.gather(1, valid.float().argmax(1, keepdim=True))[:, 0]  # first real token (left padding)
        closing = idx == self.cfg.eoi_id
        end = torch.where(closing.any(1), closing.float().argmax(1), -1)
        cols = torch.arange(T, device=idx.device)
        return ((first == self.cfg.mmu_id)[:, None] & (cols[None] <= end[:, None]))[:, None, :]

    def rope(self, pos, dtype):
        f = pos[..., None].float() * self.inv_freq
        emb = torch.cat((f, f), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def hidden(self, idx, valid=None, pos=None, cache=None, start=0, past=None, causal=False):
        """Final-layernormed hidden states [B,T,D]. With `cache`, the chunk is written at `start` and
        attends to everything cached before it (prefill with start=0 uses the omni mask; later chunks
        are single decode steps and see every valid earlier key).
        `past`: per-layer (keys, values) of a prefix (prompt_kv); `valid` then spans prefix + chunk and the
        chunk attends to every valid prefix key and to all of itself (an image block after its prompt), or
        with causal=True to itself causally (text after its prompt)."""
        if valid is None:
            valid = torch.ones_like(idx, dtype=torch.bool)
        if pos is None:  # left padding: positions count real tokens only, same in sampler and scorer
            pos = (valid.long().cumsum(1) - 1).clamp(min=0)
        if past is not None:
            mask = valid[:, None, None, :]
            if causal:  # as omni_mask: causal over valid keys, and a padded query still sees itself
                L = valid.shape[1]
                q, k = torch.arange(L - idx.shape[1], L, device=idx.device)[:, None], torch.arange(L, device=idx.device)
                mask = (mask & (k <= q)) | (k == q)
        elif cache is None or start == 0:
            mask = self.omni_mask(idx, valid[:, -idx.shape[1]:])
        else:
            mask = valid[:, None, None, :start + idx.shape[1]].clone()
            mask[..., start:] = True
        x = self.embed_tokens(idx)
        cos, sin = self.rope(pos, x.dtype)
        for i, block in enumerate(self.layers):
            if self.grad_ckpt and cache is None and torch.is_grad_enabled():
                # keep only each block's input; its insides are recomputed in backward (1.3B on one GPU)
                x = checkpoint(block, x, cos, sin, mask, None, 0, None if past is None else past[i], use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, None if cache is None else cache[i], start, None if past is None else past[i])
        return self.final_layernorm(x)

    def forward(self, idx, valid=None, prompt=None, causal=False):
        """The trainer's entry point (through the DDP wrapper, so gradients are averaged): hidden states;
        the heads below read only the rows of lm_head they need.
        prompt=(ids, valid, src): row i of idx continues prompt row src[i], whose keys/values are computed
        once for all rows continuing it (prompt_kv); valid then covers idx only; causal: idx is text."""
        if valid is None:
            valid = torch.ones_like(idx, dtype=torch.bool)
        if prompt is None:
            return self.hidden(idx, valid)
        src = prompt[2]
        past = [(k[src], v[src]) for k, v in self.prompt_kv(prompt[0], prompt[1])]
        return self.hidden_after(past, prompt[1][src], idx, valid, causal)

    def prompt_kv(self, ids, valid):
        """Per-layer (keys, values) of prompts [B,T] that nothing after them changes (omni-attention:
        text never attends to a later image block), computed once and read by every MaskGIT step.
        In a training forward with gradient checkpointing each block runs checkpointed and hands out its
        keys and values instead of writing a shared cache: the prompt then keeps only its blocks' inputs
        (kept whole, an understanding prompt's 1,024-token image held 10 GB of activations at 1.3B)."""
        if not (self.grad_ckpt and torch.is_grad_enabled()):
            cache = self.new_cache(*ids.shape)
            self.hidden(ids, valid, cache=cache)
            return cache
        x, mask = self.embed_tokens(ids), self.omni_mask(ids, valid)
        cos, sin = self.rope((valid.long().cumsum(1) - 1).clamp(min=0), x.dtype)  # as hidden()

        def block_kv(block, x):
            kv = list(self.new_cache(*ids.shape, n_layer=1)[0])  # written in place by the block, fresh at each (re)computation
            return block(x, cos, sin, mask, kv, 0), *kv

        out = []
        for block in self.layers:
            x, k, v = checkpoint(block_kv, block, x, use_reentrant=False)
            out.append((k, v))
        return out

    def hidden_after(self, past, pre_valid, idx, valid, causal=False):
        """hidden() of chunks idx [R,L] that follow prompts whose prompt_kv is `past` (valid pre_valid):
        positions continue the prompt's, and the chunk sees every valid prompt key and all of itself
        (causal=False: an image block) or its own earlier tokens (causal=True: text)."""
        full = torch.cat((pre_valid, valid), 1)
        pos = (full.long().cumsum(1) - 1).clamp(min=0)[:, -idx.shape[1]:]
        return self.hidden(idx, full, pos=pos, past=past, causal=causal)

    def logits(self, idx, valid=None):
        return self.lm_head(self.hidden(idx, valid))

    def new_cache(self, B, T, n_layer=None):
        c, hd = self.cfg, self.cfg.n_embd // self.cfg.n_head
        p = self.lm_head.weight
        dt = p.device.type  # under autocast, keys and values come out in the autocast dtype
        kw = dict(dtype=torch.get_autocast_dtype(dt)) if torch.is_autocast_enabled(dt) else {}
        return [(p.new_zeros(B, c.n_head, T, hd, **kw), p.new_zeros(B, c.n_head, T, hd, **kw)) for _ in range(n_layer or c.n_layer)]


# ----------------------------------------------------------------------------- training

WEIGHT_DECAY = 0.1  # AdamW's, on matrices only (biases, norms and rows-only training's matrices: none)
GRAD_CLIP = 1.0     # max global gradient norm of every update, pretraining and RL


def configure_optimizer(model, lr, warmup, total):
    """AdamW (betas 0.9, 0.95) over the trainable weights, with `warmup` steps of linear warm-up and then a
    cosine decay to 10% of `lr` at step `total`."""
    params = [p for p in model.parameters() if p.requires_grad]
    # rows-only training marks its matrices no_decay: decay would move the rows it must leave alone
    decay = [p for p in params if p.dim() >= 2 and not getattr(p, "no_decay", False)]
    no_decay = [p for p in params if p.dim() < 2 or getattr(p, "no_decay", False)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))

    def lr_mult(step):
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_mult)


def supervised_loss(trunk, model, tok, batch):
    """The pretraining loss (pretrain.collate's batch): mean NLL of the text targets + mean NLL of the image
    targets (per-modality means), and each mean detached for logging: tensors, not floats, so the RL
    update's replay term adds no host sync. `trunk` is what the gradient flows through (the DDP wrapper)."""
    ids, valid, text_tgt, img_tgt = batch
    h = trunk(ids, valid)
    code_ids = torch.arange(tok.image_offset, tok.image_offset + tok.codebook_size)
    lp_t, _ = S.token_logprobs(model, h, text_tgt, ids=tok.text_ids())
    lp_i, _ = S.token_logprobs(model, h, img_tgt, ids=code_ids)
    # a small replay batch may hold no image (or no text) target: that mean is 0, not 0/0
    lt, li = -lp_t.sum() / (text_tgt >= 0).sum().clamp(min=1), -lp_i.sum() / (img_tgt >= 0).sum().clamp(min=1)
    return lt + li, lt.detach(), li.detach()


# ----------------------------------------------------------------------------- loading weights

PHI_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def read_json(path, expected):
    """A JSON object from a file; errors name the file and what was expected there."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found; expected {expected}")
    try:
        with open(path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON ({e}); expected {expected}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object ({expected})")
    return d


def config_from_phi(d, name="config.json", **layout):
    """Our Config from a transformers PhiConfig dict (old top-level rope keys or new rope_parameters)."""
    missing = [k for k in PHI_KEYS if k not in d]
    if missing:
        raise ValueError(f"{name}: missing keys {missing}; expected a PhiForCausalLM config")
    if d.get("num_key_value_heads", d["num_attention_heads"]) != d["num_attention_heads"]:
        raise ValueError(f"{name}: grouped KV heads are not supported (Phi-1.5 and Show-o use none)")
    rope = d.get("rope_parameters") or {}
    act = d.get("hidden_act", "gelu_new")
    return Config(vocab_size=d["vocab_size"], n_layer=d["num_hidden_layers"], n_head=d["num_attention_heads"],
                  n_embd=d["hidden_size"], n_inner=d["intermediate_size"],
                  rotary_frac=rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.5)),
                  rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
                  ln_eps=d.get("layer_norm_eps", 1e-5), gelu="none" if act == "gelu" else "tanh",
                  qk_norm=bool(d.get("qk_layernorm", False)), **layout)


def read_weights_dir(path):
    """Every tensor of a folder's *.safetensors files, or else of its *.bin files (PyTorch pickles,
    read with weights_only=True so a checkpoint cannot run code)."""
    from safetensors.torch import load_file
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a folder; expected *.safetensors or *.bin weight files in it")
    names = sorted(os.listdir(path))
    files = [f for f in names if f.endswith(".safetensors")] or [f for f in names if f.endswith(".bin")]
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors or *.bin weight files found")
    sd = {}
    for f in files:
        p = os.path.join(path, f)
        sd.update(load_file(p) if f.endswith(".safetensors") else torch.load(p, map_location="cpu", weights_only=True))
    return sd


def from_pretrained(path, prefix="model.", root="", config=None, qk_from=None, **layout):
    """Load a local PhiForCausalLM folder (config.json + safetensors or .bin). Never touches the network.
    root: a prefix every weight name carries (Show-o keeps its Phi under `showo.`); config: the Phi
    config dict to use instead of the folder's own config.json. The config's qk_layernorm must agree
    with the file: q/k LayerNorm tensors present <=> qk_layernorm true (qk_from: where that setting came from)."""
    name = os.path.join(path, "config.json")
    if config is None:
        config = read_json(name, "a local PhiForCausalLM checkpoint folder")
    sd = read_weights_dir(path)
    check_qk_norm(path, sd, bool(config.get("qk_layernorm", False)), qk_from or name)
    model = UnifiedModel(config_from_phi(config, name, **layout))
    ours = {}
    for k, v in sd.items():
        if not k.startswith(root):
            continue
        k = k[len(root):]
        if k.startswith(prefix):
            ours[k[len(prefix):]] = v
        elif k.startswith("lm_head."):
            ours[k] = v
    problem = load_weights(model, ours)
    if problem:
        raise ValueError(f"{path}: weights do not match the Phi layout under {root + prefix!r}: {problem}")
    return model


def check_qk_norm(path, sd, want, source):
    """The weight file decides whether q/k LayerNorm exists; a config saying otherwise is an error
    (loading without the tensors would drop them silently and shift every logit)."""
    has = any(".self_attn.q_layernorm." in k for k in sd)
    if has != want:
        raise ValueError(f"{path}: the weights {'hold' if has else 'lack'} per-head q/k LayerNorm tensors "
                         f"(...self_attn.q_layernorm.*, k_layernorm.*) but {source} says qk_layernorm "
                         f"{str(want).lower()}; use the checkpoint and config that belong together")


def load_weights(model, sd, optional=None):
    """Load sd into model; returns what did not fit ("" when everything did). Keys starting with
    `optional` may be missing (the module's own values stay)."""
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        return str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
    missing = [k for k in missing if not (optional and k.startswith(optional))]
    return f"missing {missing[:5]}, unexpected {unexpected[:5]}" if missing or unexpected else ""


# Show-o's vocabulary: Phi's llm_vocab_size text ids, then these 10 tokens in the order Show-o's
# prompting adds them (the pad token first), then codebook_size image codes, then <mask> (the last id).
SHOWO_SPECIALS = ("[PAD]", "<|soi|>", "<|eoi|>", "<|sov|>", "<|eov|>", "<|t2i|>", "<|mmu|>", "<|t2v|>", "<|v2v|>", "<|lvg|>")
SHOWO_KEYS = ("vocab_size", "llm_vocab_size", "codebook_size", "num_vq_tokens")


def showo_config(path):
    """Show-o's own config.json: the joint-vocabulary keys (the Phi architecture is not among them)."""
    name = os.path.join(path, "config.json")
    d = read_json(name, f"a Show-o checkpoint folder (config.json with {', '.join(SHOWO_KEYS)}, and weights)")
    missing = [k for k in SHOWO_KEYS if k not in d]
    if missing:
        raise ValueError(f"{name}: missing keys {missing}; expected Show-o's config with {', '.join(SHOWO_KEYS)}")
    if d.get("w_clip_vit"):
        raise ValueError(f"{name}: w_clip_vit is true; only Show-o without the CLIP-ViT understanding encoder is supported")
    if d["vocab_size"] != d["llm_vocab_size"] + len(SHOWO_SPECIALS) + d["codebook_size"] + 1:
        raise ValueError(f"{name}: vocab_size {d['vocab_size']} != llm_vocab_size + {len(SHOWO_SPECIALS)} specials "
                         f"+ codebook_size + 1 mask token")
    return d


def showo_layout(sc):
    """The Config ids of Show-o's joint vocabulary (image code k is id llm_vocab_size + 10 + k)."""
    ids = {t: sc["llm_vocab_size"] + i for i, t in enumerate(SHOWO_SPECIALS)}
    return dict(image_offset=sc["llm_vocab_size"] + len(SHOWO_SPECIALS), codebook_size=sc["codebook_size"],
                mask_id=sc["vocab_size"] - 1, pad_id=ids["[PAD]"], boi_id=ids["<|soi|>"], eoi_id=ids["<|eoi|>"],
                mmu_id=ids["<|mmu|>"], layout="showo")


def load_showo(path, phi_dir=None):
    """(model, Show-o config) from a local Show-o folder: a PhiForCausalLM kept as `showo.`, its embeddings
    resized to the joint vocabulary. The architecture comes from Show-o's config.json if it holds Phi's
    keys, else from phi_dir/config.json (a local microsoft/phi-1_5 folder, Show-o's llm_model_path)."""
    sc = showo_config(path)
    if all(k in sc for k in PHI_KEYS):
        phi = sc
    elif phi_dir is None:
        raise ValueError(f"{os.path.join(path, 'config.json')} has no Phi architecture keys {list(PHI_KEYS)}; "
                         "give the local Phi-1.5 folder whose config.json has them")
    else:
        phi = read_json(os.path.join(phi_dir, "config.json"), "Phi-1.5's config.json (a local microsoft/phi-1_5 folder)")
    # Show-o's own Phi class switches q/k LayerNorm on whatever Phi-1.5's config says (qk_layernorm false
    # there); only Show-o's config.json may switch it off
    qk = bool(sc.get("qk_layernorm", True))
    src = f"{os.path.join(path, 'config.json')} ({'its qk_layernorm key' if 'qk_layernorm' in sc else 'Show-o turns it on by default'})"
    return from_pretrained(path, root="showo.", config={**phi, "vocab_size": sc["vocab_size"], "qk_layernorm": qk},
                           qk_from=src, **showo_layout(sc)), sc


def config_dict(cfg):
    return asdict(cfg)
