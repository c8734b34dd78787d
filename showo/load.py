"""
The Show-o path: Show-o 1.3B (model.load_showo), MAGVIT-v2 (magvit.py), Phi-1.5's tokenizer and a real
UnifyBench folder (unifybench.py), all read from local folders and set up for train.py's Sync-GRPO loop.

- `ShowoTokenizer`: a local transformers tokenizer plus Show-o's 10 special tokens, its image codes and
  the personal-concept tokens, behind tokenizer.WordTokenizer's interface, with Show-o's prompting formats:
    understanding   <|mmu|> <|soi|> image <|eoi|> <bos> "USER: \\n{context} {question} ASSISTANT:" -> answer <eos>
                    (no image: <bos> "USER: ..." as a plain language-model prompt)
    generation      <|t2i|> <bos> {context} {request}{reasoning} <eos> <|soi|> image <|eoi|>
    unconditional   <|t2i|> <bos> <eos> <|soi|> image <|eoi|>          (the CFG row)
  Show-o left-pads text to a fixed length with pads nobody attends to; positions here count real
  tokens only, which gives the same relative rotary positions, so the same outputs.
- Personal concepts as in UniCTokens: per concept an identifier <c> and k concept tokens <c_0>.., new
  rows after every existing id, initialised from the class word's rows; --concept-rows-only trains only
  those rows. (flags.py holds `--preset showo`, the paper's run.)
- `setup(args, device)`: (world, tokenizer, policy, reference) for train.rl; each missing folder or
  key fails naming its flag or file; a reward whose scorer is not given is switched off, said in one line.
"""
import copy
import importlib
import math
import os
import re
from dataclasses import replace

import torch
import torch.nn as nn

from showo import magvit
import model as M
import rewards
from showo import unifybench


class ShowoTokenizer:
    def __init__(self, path, sc):
        from transformers import AutoTokenizer
        hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        hf.add_special_tokens({"pad_token": M.SHOWO_SPECIALS[0]})  # the order Show-o's prompting adds them
        hf.add_tokens(list(M.SHOWO_SPECIALS[1:]))
        ids, layout = hf.convert_tokens_to_ids(list(M.SHOWO_SPECIALS)), M.showo_layout(sc)
        want = list(range(sc["llm_vocab_size"], layout["image_offset"]))
        if len(hf) != layout["image_offset"] or ids != want or hf.eos_token_id is None:
            raise ValueError(f"{path}: this tokenizer puts Show-o's special tokens at {ids} ({len(hf)} ids, eos "
                             f"{hf.eos_token_id}); the Show-o config (llm_vocab_size {sc['llm_vocab_size']}) needs them at "
                             f"{want[0]}..{want[-1]} and an eos token: expected Phi-1.5's tokenizer")
        self.hf, self.n_text = hf, sc["llm_vocab_size"]
        for k in ("image_offset", "codebook_size", "mask_id", "pad_id", "boi_id", "eoi_id", "mmu_id"):
            setattr(self, k, layout[k])
        self.t2i_id = hf.convert_tokens_to_ids("<|t2i|>")
        # Phi's <|endoftext|> is both bos and eos; eos ends an answer (Show-o's eot)
        self.eos_id = self.eor_id = hf.eos_token_id
        self.bos_id = hf.bos_token_id if hf.bos_token_id is not None else hf.eos_token_id
        self.n_image_tokens, self.vocab_size = sc["num_vq_tokens"], sc["vocab_size"]
        self.concept_ids, self._split = {}, None

    def add_concepts(self, names):
        """New token strings with ids after every existing one; returns their ids."""
        ids = list(range(self.vocab_size, self.vocab_size + len(names)))
        self.concept_ids.update(zip(names, ids))
        self.vocab_size += len(names)
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(self.concept_ids, key=len, reverse=True))) + ")")
        self._names = {i: s for s, i in self.concept_ids.items()}
        return ids

    def encode(self, text):
        pieces = self._split.split(text) if self._split else [text]
        ids = []
        for i, piece in enumerate(pieces):
            if piece in self.concept_ids:
                ids.append(self.concept_ids[piece])
            elif piece.strip():  # the space before a concept token belongs to no word
                ids += self.hf.encode(piece.rstrip() if i + 1 < len(pieces) else piece, add_special_tokens=False)
        return ids

    def decode(self, ids):
        """Text of the text ids and concept tokens (a concept token is a word of its own: spaced from
        its neighbours); specials and image codes are dropped."""
        pieces, run = [], []
        for i in torch.as_tensor(ids).reshape(-1).tolist():
            if i in self.concept_ids.values():
                pieces += [self.hf.decode(run, skip_special_tokens=True), self._names[i]]
                run = []
            elif i < self.n_text:
                run.append(i)
        text = ""
        for j, piece in enumerate(pieces + [self.hf.decode(run, skip_special_tokens=True)]):
            word = j % 2 == 1  # pieces alternate: text, concept token, text, ...
            if piece and text and (word or pieces[j - 1] in self.concept_ids) and not (text[-1].isspace() or piece[0].isspace()):
                text += " "
            text += piece
        return text

    def text_ids(self):
        """Every id an answer may use: Phi's text ids (eos included) and the concept tokens."""
        return torch.tensor([*range(self.n_text), *self.concept_ids.values()])

    def understanding_prompt(self, task):
        text = self.encode(f"USER: \n{task.concept.context} {task.question} ASSISTANT:")
        if task.image is None:
            return [self.bos_id] + text
        image = [self.image_offset + int(c) for c in task.image]
        return [self.mmu_id, self.boi_id, *image, self.eoi_id, self.bos_id] + text

    def generation_prompt(self, concept, request, reasoning_ids):
        text = self.encode(f"{concept.context} {request}") + list(reasoning_ids)
        return [self.t2i_id, self.bos_id] + text + [self.eos_id, self.boi_id]

    def uncond_prompt(self):
        return [self.t2i_id, self.bos_id, self.eos_id, self.boi_id]


# ----------------------------------------------------------------------------- concept rows

def add_rows(model, n):
    """Append n rows to the embedding and the lm_head; returns their ids. New tokens go after every
    existing id (after Show-o's <mask>), so image codes and specials keep their ids."""
    V, d = model.cfg.vocab_size, model.cfg.n_embd
    emb, head = model.embed_tokens, model.lm_head
    new_emb = nn.Embedding(V + n, d, device=emb.weight.device, dtype=emb.weight.dtype)
    new_head = nn.Linear(d, V + n, device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        new_emb.weight[:V], new_head.weight[:V], new_head.bias[:V] = emb.weight, head.weight, head.bias
    model.embed_tokens, model.lm_head = new_emb, new_head
    model.cfg = replace(model.cfg, vocab_size=V + n)
    return list(range(V, V + n))


@torch.no_grad()
def init_rows(model, rows, source_ids):
    """Embedding and lm_head rows set to the mean of those of source_ids."""
    for w in (model.embed_tokens.weight, model.lm_head.weight, model.lm_head.bias):
        w[rows] = w[source_ids].mean(0)


def add_concepts(model, tok, world, k):
    """Identifier + k concept tokens per concept into tokenizer and model; returns all their ids.
    Rows start at the class word (an untrained concept already reads as "a dog")."""
    names = []
    for c in world.concepts:
        c.soft = [f"<{c.name}_{i}>" for i in range(k)]
        names += [c.token] + c.soft
    ids = tok.add_concepts(names)
    if add_rows(model, len(ids)) != ids:
        raise ValueError("the model's vocabulary and the tokenizer's disagree; both must come from the same Show-o folder")
    for c in world.concepts:
        rows = [tok.concept_ids[s] for s in [c.token] + c.soft]
        init_rows(model, rows, tok.hf.encode(" " + c.cls, add_special_tokens=False))
    return ids


def train_rows_only(model, rows):
    """Freeze every weight but the embedding and lm_head rows of `rows`. The other rows of those two
    matrices get a zero gradient (hook) and no weight decay (`no_decay`, read by the optimizer), so
    AdamW leaves them exactly as they were."""
    keep = torch.zeros(model.cfg.vocab_size, dtype=torch.bool, device=model.lm_head.weight.device)
    keep[rows] = True
    model.requires_grad_(False)
    for p in (model.embed_tokens.weight, model.lm_head.weight, model.lm_head.bias):
        p.requires_grad_(True)
        p.no_decay = True
        p.register_hook(lambda g: g * keep.view(-1, *[1] * (g.dim() - 1)).to(g.dtype))


# ----------------------------------------------------------------------------- setup from local folders

FOLDERS = {"showo_dir": "a local Show-o checkpoint folder (config.json + *.safetensors or pytorch_model.bin)",
           "magvit_dir": "a local MAGVIT-v2 folder (Show-o's magvitv2 weights)",
           "tokenizer_dir": "a local Phi-1.5 folder (microsoft/phi-1_5: tokenizer files and config.json)",
           "data_dir": "a UnifyBench folder (concept/train/<name>/info.json ...)"}


def check_folder(args, key, what):
    path, flag = getattr(args, key), "--" + key.replace("_", "-")
    if not path:
        raise ValueError(f"{flag} is required with --showo-dir: {what}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path}: not found; expected {what}")
    return path


def load_callable(spec):
    """"module:function" -> the function (the judge hook)."""
    mod, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod), name) if mod and name else None
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--judge {spec!r}: cannot load it ({e})") from None
    if not callable(fn):
        raise ValueError(f"--judge {spec!r}: expected module:function naming a callable f(rollouts, ctx) -> list[float]")
    return fn


def load_scorers(args, device, say):
    """The scorers the flags give; a reward whose scorer is missing is switched off, in one line."""
    scorers = {}
    for key, kind in (("clip_dir", "clip"), ("dino_dir", "image")):
        if getattr(args, key):
            path = check_folder(args, key, "a local transformers folder (model, image processor" + (", tokenizer)" if kind == "clip" else ")"))
            scorers["clip" if kind == "clip" else "dino"] = rewards.Embedder(path, kind, device)
    if args.judge:
        scorers["judge"] = load_callable(args.judge)
    off = [f"{name} (no {rewards.SCORER_FLAGS[need]})" for name, need in rewards.REAL_ONLY.items()
           if args.rewards.get(name) and need not in scorers]
    for name, need in rewards.REAL_ONLY.items():  # said in one line below; the run's meta keeps what ran
        if need not in scorers:
            args.rewards[name] = 0.0
    if args.dgs and "clip" not in scorers:
        args.dgs = False
        off.append("DGS (its preview score needs --clip-dir)")
    if off:
        say("off: " + ", ".join(off))
    return scorers


def setup(args, device="cpu", say=print):
    """(world, tokenizer, policy, reference or None) for train.rl, every part from a local folder."""
    for key, what in FOLDERS.items():
        check_folder(args, key, what)
    policy, sc = M.load_showo(args.showo_dir, args.tokenizer_dir)
    tok = ShowoTokenizer(args.tokenizer_dir, sc)
    grid = math.isqrt(sc["num_vq_tokens"])
    vq = magvit.load(args.magvit_dir, device)
    if grid * grid != sc["num_vq_tokens"] or 2 ** vq.cfg.z_channels != sc["codebook_size"]:
        raise ValueError(f"{args.magvit_dir}: a codebook of {2 ** vq.cfg.z_channels} codes, but {args.showo_dir}/config.json "
                         f"wants {sc['codebook_size']} codes on a square grid of {sc['num_vq_tokens']}")
    world = unifybench.Bench(args.data_dir, magvit.MagvitCodec(vq, grid))
    rows = add_concepts(policy, tok, world, args.concept_tokens)
    policy.grad_ckpt = args.grad_ckpt
    policy.to(device)
    # the frozen reference is copied before any gradient hook; it stays fp32 (under --bf16 autocast
    # computes in bf16 anyway, and a bf16 copy would round the rotary frequencies too)
    ref = copy.deepcopy(policy).requires_grad_(False).eval() if args.beta else None
    if args.concept_rows_only:
        train_rows_only(policy, rows)
    world.scorers = load_scorers(args, device, say)
    return world, tok, policy, ref
