"""
Random-weight Show-o-path folders built offline, for the tests (tiny shapes) and for a one-step run of
the full 1.3B shape on a GPU (`--shape full`):

  python tests/showo_fixture.py out/showo_random --shape full   # ~6 GB, then run the command it prints

Folders: showo/ (Show-o config.json + safetensors or .bin, keys under `showo.`), tokenizer/ (a
word-level PreTrainedTokenizerFast built here from a small vocabulary, no download, plus the Phi
config.json), magvit/, clip/ and dino/ (tiny transformers models with their image processors and, for
CLIP, the same tokenizer), data/ (a UnifyBench folder with real PNG/JPG files of odd sizes).
"""
import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from showo import magvit  # noqa: E402

CONCEPTS = {
    "bo": dict(cls="dog", info="<bo> is a small brown dog with floppy ears",
               facts=["<bo> wears a red collar", "<bo> likes the beach"],
               requests=["<bo> wearing its collar", "<bo> at its favourite place"]),
    "mug": dict(cls="cup", info="<mug> is a white cup with a blue stripe",
                facts=["<mug> holds green tea", "<mug> sits on a wooden desk"],
                requests=["<mug> full of its drink", "<mug> in its usual spot"]),
}
EXTRA_WORDS = "USER: ASSISTANT: is a the of yes no it what colour where photo on in . ?".split()
SIZES = [(37, 23), (50, 61), (29, 29)]  # odd sizes: the codec resizes and centre-crops


def write_unifybench(root, concepts=CONCEPTS):
    """concept/train/<c>/ (info, conversations, 2 PNG + 1 JPG), concept/test/<c>/ (vqa, text_only, t2i)
    and test_data/<c>.json (recognition: its own test image, yes; every other concept's, no)."""
    rng = np.random.default_rng(0)
    for name, c in concepts.items():
        train, test = Path(root, "concept", "train", name), Path(root, "concept", "test", name)
        train.mkdir(parents=True, exist_ok=True)
        test.mkdir(parents=True, exist_ok=True)
        files = []
        for i, (w, h) in enumerate(SIZES):
            f = f"{i}.{'jpg' if i == 2 else 'png'}"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(train / f)
            files.append(f)
        Image.fromarray(rng.integers(0, 256, (40, 33, 3), dtype=np.uint8)).save(test / "q.png")
        dump(train / "info.json", {"class": c["cls"], "info": c["info"], "extra_info": c["facts"]})
        ask = "query" if name == "mug" else "question"  # the released files name it `query`; both are read
        dump(train / "conversations.json", {f: [{ask: f"what colour is <{name}> ?", "answer": "brown"}] for f in files[:2]})
        dump(test / "vqa.json", [{"image": "q.png", "question": f"is <{name}> in the photo ?", "answer": "yes"}])
        dump(test / "text_only.json", [{"question": f"where is <{name}> ?", "answer": "on the desk"}])
        dump(test / "t2i_conditions.json", {"personalized_driven_generation": c["requests"],
                                            "generation": [f"a photo of <{name}> on the beach"]})
        Path(root, "test_data").mkdir(exist_ok=True)
        dump(Path(root, "test_data", f"{name}.json"), [recognition_item(name, o) for o in concepts]
             + [{"image": "", "type": "text_only", "conversations": [{"value": f"where is <{name}> ?"}, {"value": "on the desk"}]}])
    return str(root)


def recognition_item(name, shown):
    """A released-style entry: the image path is absolute on the machine that wrote the file."""
    return {"image": f"/elsewhere/UniCTokens/concept/test/{shown}/q.png", "type": "rec",
            "conversations": [{"from": "human", "value": f"<image>\nis <{name}> in the photo ?"},
                              {"from": "gpt", "value": "Yes." if shown == name else "No."}]}


def dump(path, obj):
    Path(path).write_text(json.dumps(obj, indent=1))


def vocabulary(concepts=CONCEPTS, n_dummy=0):
    """Every whitespace-separated word the tiny benchmark uses (concept tokens aside), then filler words."""
    words = set(EXTRA_WORDS)
    for c in concepts.values():
        for text in [c["cls"], c["info"], *c["facts"], *c["requests"], "what colour is ? brown the beach"]:
            words |= {w for w in text.split() if not w.startswith("<")}
    return ["<|endoftext|>", "<unk>"] + sorted(words) + [f"w{i}" for i in range(n_dummy)]


def write_tokenizer(path, words, **special):
    """A word-level fast tokenizer built from `words` (nothing downloaded); <|endoftext|> is bos and eos as in Phi."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer, t.decoder = pre_tokenizers.WhitespaceSplit(), decoders.WordPiece(prefix="##")
    PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<unk>", **special).save_pretrained(path)
    return str(path)


def showo_config(n_text, bits, grid):
    K = 2 ** bits
    return {"_class_name": "Showo", "w_clip_vit": False, "llm_model_path": "microsoft/phi-1_5", "llm_vocab_size": n_text,
            "codebook_size": K, "num_vq_tokens": grid * grid, "vocab_size": n_text + 10 + K + 1, "mask_token_id": n_text + 10 + K}


def phi_config(vocab, shape="tiny"):
    from transformers import PhiConfig
    if shape == "full":  # microsoft/phi-1_5
        return PhiConfig(vocab_size=vocab, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, partial_rotary_factor=0.5, max_position_embeddings=2048)
    return PhiConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, partial_rotary_factor=0.5, max_position_embeddings=512)


def write_showo(path, phi_dir, sc, fmt="safetensors", shape="tiny", seed=0, qk_layernorm=True):
    """A random PhiForCausalLM built as Show-o builds it (its Phi with per-head q/k LayerNorm, text
    vocabulary, then embeddings resized to the joint one) and saved as Show-o does: keys under `showo.`,
    so `showo.model.layers.i.self_attn.q_layernorm.weight` etc. The Phi config goes to phi_dir as
    microsoft/phi-1_5 has it (text vocabulary, qk_layernorm false: Show-o's class turns it on), since
    Show-o's own config.json has no architecture. Returns the HF model."""
    from safetensors.torch import save_file
    from transformers import PhiForCausalLM
    torch.manual_seed(seed)
    cfg = phi_config(sc["llm_vocab_size"], shape)
    cfg.save_pretrained(phi_dir)
    cfg.qk_layernorm = qk_layernorm
    hf = PhiForCausalLM(cfg).eval()
    hf.resize_token_embeddings(sc["vocab_size"])
    if shape == "tiny":
        for p in hf.parameters():  # non-trivial norms and biases, so parity can fail
            p.data.normal_(0, 0.1)
    os.makedirs(path, exist_ok=True)
    dump(Path(path, "config.json"), sc)
    sd = {"showo." + k: v.detach().contiguous() for k, v in hf.state_dict().items()}
    if fmt == "bin":
        torch.save(sd, Path(path, "pytorch_model.bin"))
    else:
        save_file(sd, str(Path(path, "pytorch_model.safetensors")))
    return hf


def tiny_magvit_config(bits=4):
    return magvit.MagvitConfig(ch=32, enc_ch_mult=[1, 1, 2], enc_num_res_blocks=[1, 1, 1], dec_ch_mult=[1, 1, 2],
                               dec_num_res_blocks=[1, 1, 1], z_channels=bits)


def write_magvit(path, cfg, seed=0):
    torch.manual_seed(seed)
    m = magvit.MAGVITv2(cfg)
    magvit.save(m, path)
    return m


def write_clip(path, words, seed=0):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    torch.manual_seed(seed)
    write_tokenizer(path, words, pad_token="<unk>")
    text = dict(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


def write_dino(path, seed=0):
    from transformers import AutoModel, BitImageProcessor, Dinov2Config
    torch.manual_seed(seed)
    cfg = Dinov2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    AutoModel.from_config(cfg).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


def build(root, shape="tiny", fmt="safetensors"):
    """Every folder of the Show-o path under root; returns their paths by flag name."""
    root = Path(root)
    words = vocabulary(n_dummy=50295 - len(vocabulary()) if shape == "full" else 0)  # Phi-1.5: 50,295 text ids
    bits, mcfg = (13, magvit.MagvitConfig()) if shape == "full" else (4, tiny_magvit_config())
    sc = showo_config(len(words), bits, 32 if shape == "full" else 4)
    tok = write_tokenizer(root / "tokenizer", words)
    write_showo(root / "showo", tok, sc, fmt, shape)
    write_magvit(root / "magvit", mcfg)
    return {"showo_dir": str(root / "showo"), "magvit_dir": str(root / "magvit"), "tokenizer_dir": tok,
            "clip_dir": write_clip(root / "clip", vocabulary()), "dino_dir": write_dino(root / "dino"),
            "data_dir": write_unifybench(root / "data")}


def judge_not_dark(rollouts, ctx):
    """A judge for the tests: the mean brightness of each drawing (0 where nothing was drawn)."""
    return [float(np.asarray(p).mean() / 255) if p is not None else 0.0 for p in ctx["drawings"](rollouts)]


def flags(paths):
    return [x for k, v in paths.items() for x in (f"--{k.replace('_', '-')}", v)]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="output folder")
    ap.add_argument("--shape", default="tiny", choices=["tiny", "full"], help="full = Show-o 1.3B and MAGVIT-v2 shapes (about 6 GB)")
    a = ap.parse_args()
    paths = build(a.root, a.shape)
    print("PYTHONPATH=tests torchrun --nproc_per_node=1 train.py --preset showo", " ".join(flags(paths)),
          f"--judge showo_fixture:judge_not_dark --out-dir {a.root}/run --rl-iters 1 --bf16 --grad-ckpt")
