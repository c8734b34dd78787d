"""The Show-o path on tiny random folders built offline (tests/showo_fixture.py): checkpoint parity with
transformers (safetensors and .bin), Show-o's attention masks, MAGVIT-v2 shapes and round trip, the
UnifyBench loader on real PNG/JPG files, the tokenizer, CLIP / DINO / judge rewards, one full Sync-GRPO
step through train.main, the evaluation stage on a UnifyBench folder, and clear errors on bad folders and flags.

The tiny tokenizers are word-level PreTrainedTokenizerFast objects built from a vocabulary written by
the fixture (no download); the CLIP folder gets the same kind, with a pad token."""
import argparse
import json
import math
import os
import random
import shutil
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

import ckpt
from world import codebook
from world import data
import eval as E
import flags
from showo import magvit
import model as M
import rewards as R
import sampling as S
from showo import load as showo
import showo_fixture as F
import train as T
from showo import unifybench as U


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return F.build(tmp_path_factory.mktemp("showo"))


def tokenizer_and_config(folders):
    sc = M.showo_config(folders["showo_dir"])
    return showo.ShowoTokenizer(folders["tokenizer_dir"], sc), sc


# ----------------------------------------------------------------------------- checkpoint and masks

@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_showo_checkpoint_matches_transformers(tmp_path, folders, fmt):
    sc = M.showo_config(folders["showo_dir"])
    hf = F.write_showo(tmp_path / "showo", tmp_path / "phi", sc, fmt, seed=1)
    ours, got_sc = M.load_showo(str(tmp_path / "showo"), str(tmp_path / "phi"))
    assert got_sc == sc and ours.cfg.vocab_size == sc["vocab_size"] == hf.config.vocab_size
    n = sc["llm_vocab_size"]
    assert ours.cfg.image_offset == n + 10 and ours.cfg.mask_id == sc["vocab_size"] - 1
    assert (ours.cfg.pad_id, ours.cfg.boi_id, ours.cfg.eoi_id, ours.cfg.mmu_id) == (n, n + 1, n + 2, n + 6)
    # every row but the 10 specials (text, image codes, <mask>): no <soi>/<eoi>, so the mask stays causal
    ids = torch.cat((torch.arange(n), torch.arange(n + 10, sc["vocab_size"])))
    idx = ids[torch.randint(0, len(ids), (2, 13))]
    assert (idx >= n + 10).any()
    with torch.no_grad():
        assert (hf(idx).logits - ours.eval().logits(idx)).abs().max().item() < 1e-4
    # Show-o's names: the fixture's file holds q/k LayerNorm tensors and the model reads them
    keys = list(M.read_weights_dir(str(tmp_path / "showo")))
    assert "showo.model.layers.1.self_attn.k_layernorm.bias" in keys and ours.cfg.qk_norm
    assert torch.equal(ours.layers[1].self_attn.k_layernorm.bias, hf.model.layers[1].self_attn.k_layernorm.bias)


def test_showo_file_without_qk_norm_fails_unless_its_config_says_so(tmp_path, folders):
    sc = M.showo_config(folders["showo_dir"])
    hf = F.write_showo(tmp_path / "showo", tmp_path / "phi", sc, qk_layernorm=False)
    with pytest.raises(ValueError, match="lack per-head q/k LayerNorm.*Show-o turns it on by default"):
        M.load_showo(str(tmp_path / "showo"), str(tmp_path / "phi"))
    F.dump(tmp_path / "showo" / "config.json", {**sc, "qk_layernorm": False})
    ours, _ = M.load_showo(str(tmp_path / "showo"), str(tmp_path / "phi"))
    idx = torch.randint(0, sc["llm_vocab_size"], (1, 9))
    with torch.no_grad():
        assert not ours.cfg.qk_norm and (hf(idx).logits - ours.eval().logits(idx)).abs().max().item() < 1e-4


def show_o_rules(idx, soi, eoi, mmu):
    """Show-o's masks as its prompting code states them: t2i = causal text, and every token from <soi>
    to <eoi> sees the whole sequence; mmu = causal, and everyone sees everything up to the first <eoi>."""
    T_ = len(idx)
    mask = torch.ones(T_, T_, dtype=torch.bool).tril()
    e = idx.index(eoi)
    if idx[0] == mmu:
        mask[:, :e + 1] = True
    else:
        mask[idx.index(soi):e + 1, :] = True
    return mask


def test_showo_layout_masks_follow_show_o():
    V, n = 40, 10
    cfg = M.Config(vocab_size=V, n_layer=1, n_head=2, n_embd=16, n_inner=32, image_offset=n + 10, codebook_size=8,
                   mask_id=V - 1, pad_id=n, boi_id=n + 1, eoi_id=n + 2, mmu_id=n + 6, layout="showo")
    m = M.UnifiedModel(cfg)
    soi, eoi, t2i, mmu, img = n + 1, n + 2, n + 5, n + 6, [n + 10, n + 13, V - 1, n + 11]
    for seq in ([t2i, 0, 3, 4, 1, soi, *img, eoi], [mmu, soi, *img, eoi, 0, 5, 6, 7]):
        got = m.omni_mask(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.bool))[0, 0]
        assert torch.equal(got, show_o_rules(seq, soi, eoi, mmu)), seq
    # left padding: pads are invisible, and the rules hold on the real tokens
    seq = [t2i, 0, 3, soi, *img, eoi]
    ids, valid = S.pad_left([seq, seq + [0, 0]], n)
    got = m.omni_mask(ids, valid)[0, 0, 2:, 2:]
    assert torch.equal(got, show_o_rules(seq, soi, eoi, mmu)) and not m.omni_mask(ids, valid)[0, 0, 3:, :2].any()


def test_maskgit_reads_show_o_t2i_layout(folders):
    """One argmax MaskGIT step = Show-o's t2i_generate on the same rows: [t2i bos text eos soi] masks [eoi],
    logits of the image positions (-(N+1):-1) over the codes, CFG (1 + w) cond - w uncond."""
    model, sc = M.load_showo(folders["showo_dir"], folders["tokenizer_dir"])
    tok = showo.ShowoTokenizer(folders["tokenizer_dir"], sc)
    c = U.Concept("<bo>", "dog", "a small brown dog", [], [])
    cond, uncond, N, w = tok.generation_prompt(c, "on the beach", []), tok.uncond_prompt(), sc["num_vq_tokens"], 2.0
    got = S.sample_maskgit(model.eval(), [cond], [uncond], N, steps=1, cfg_w=w, temperature=0)
    rows = [p + [tok.mask_id] * N + [tok.eoi_id] for p in (cond, uncond)]
    ids, valid = S.pad_left(rows, tok.pad_id)
    with torch.no_grad():
        logits = model.logits(ids, valid)[:, -(N + 1):-1, tok.image_offset:tok.image_offset + sc["codebook_size"]]
    lp = ((1 + w) * logits[0] - w * logits[1]).log_softmax(-1)
    assert torch.equal(got["codes"][0], lp.argmax(-1))
    assert (got["logprobs"][0] - lp.max(-1).values).abs().max() < 1e-5


# ----------------------------------------------------------------------------- MAGVIT-v2

def test_magvit_shapes_and_state_dict_round_trip(tmp_path):
    cfg = F.tiny_magvit_config(bits=4)
    m = F.write_magvit(tmp_path / "a", cfg, seed=3).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    codes = m.encode(x)
    assert codes.shape == (2, 16) and codes.dtype == torch.long and 0 <= codes.min() and codes.max() < 16
    assert m.decode(codes).shape == (2, 3, 16, 16)
    back = magvit.load(str(tmp_path / "a"))
    for (k, a), (k2, b) in zip(m.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert torch.equal(back.encode(x), codes) and torch.equal(back.decode(codes), m.decode(codes))
    # the lookup-free codebook: code k is the sign pattern of its bits, channel 0 the highest
    k = torch.arange(16)[None]
    assert torch.equal(m.quantize.codes(m.quantize.vectors(k, 4)), k)
    assert m.quantize.vectors(torch.tensor([[8]]), 1).flatten().tolist() == [1, -1, -1, -1]
    # released parameter names (Show-o's magvitv2 layout)
    names = set(m.state_dict())
    for key in ("encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight", "encoder.mid.attn_1.q.weight",
                "encoder.quant_conv.weight", "decoder.post_quant_conv.weight", "decoder.up.1.upsample.conv.weight",
                "decoder.up.1.block.0.nin_shortcut.weight", "encoder.down.2.block.0.nin_shortcut.weight", "decoder.conv_out.weight", "quantize.embedding"):
        assert key in names, key


def test_magvit_wrong_shape_names_the_folder(tmp_path):
    F.write_magvit(tmp_path / "m", F.tiny_magvit_config())
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(cfg, ch=64)))
    with pytest.raises(ValueError, match=str(tmp_path / "m")):
        magvit.load(str(tmp_path / "m"))


def test_both_codecs_share_one_interface(folders):
    codec = magvit.MagvitCodec(magvit.load(folders["magvit_dir"]), grid=4)
    odd = Image.new("RGB", (37, 23), (200, 30, 30))
    codes = codec.encode([odd, odd.resize((50, 61))])
    assert codes.shape == (2, codec.grid ** 2) and codes.max() < codec.codebook_size
    pics = codec.decode(codes)
    assert pics[0].size == (codec.resolution, codec.resolution) == (16, 16)
    world = codebook.WorldCodec()
    c = torch.randint(0, world.codebook_size, (codebook.N_IMG,))
    assert torch.equal(world.encode(world.decode([c]))[0], c)


# ----------------------------------------------------------------------------- UnifyBench folder

def test_unifybench_folder_with_real_images_loads(folders):
    codec = magvit.MagvitCodec(magvit.load(folders["magvit_dir"]), grid=4)
    bench = U.Bench(folders["data_dir"], codec)
    assert [c.token for c in bench.concepts] == ["<bo>", "<mug>"] and bench.concepts[0].cls == "dog"
    assert len(bench.concepts[0].images) == 3  # two PNGs and a JPG of odd sizes
    kinds = [t.kind for t in bench.train_tasks]
    assert kinds.count("vqa") == 4 and kinds.count("kgen") == 4 and kinds.count("gen") == 2
    assert [t.question for t in bench.train_tasks if t.kind == "vqa"][-1] == "what colour is <mug> ?"  # key `query`
    kgen = [t for t in bench.train_tasks if t.kind == "kgen"]
    assert kgen[1].question == "<bo> at its favourite place" and kgen[1].answer == "<bo> likes the beach"
    assert {t.kind for t in bench.test_tasks} == {"recognition", "vqa", "textqa", "kgen", "gen"}
    for world in (bench, data.World([], [], 0)):  # the RL loop's world interface, as the embedded world has it
        for name in ("sample_tasks", "draw_after_answer", "reward_ctx", "preview_score", "held_out", "evaluate"):
            assert callable(getattr(type(world), name, None)), (type(world).__name__, name)
        for name in ("codec", "test_tasks"):
            assert hasattr(world, name), (type(world).__name__, name)
    tasks = bench.sample_tasks(["vqa"], 3, random.Random(0))
    assert all(t.image.shape == (16,) for t in tasks)
    after = bench.draw_after_answer(tasks[0])
    assert after.kind == "gen" and after.answer == tasks[0].answer and after.concept is tasks[0].concept
    held = bench.held_out().sample_tasks(["vqa", "kgen"], 20, random.Random(0))  # the held-out reward's prompts
    assert {t.meta["source"] for t in held if t.kind == "vqa"} == {"vqa.json"}  # the test split's questions
    assert {t.meta["source"] for t in tasks} == {"conversations.json"}  # RL's: the train split's


@pytest.mark.parametrize("breakage, named", [
    (lambda d: (d / "concept/train/bo/info.json").write_text('{"class": "dog", "info": "x"}'), "info.json"),
    (lambda d: (d / "concept/train/bo/1.png").write_bytes(b"not an image"), "1.png"),
    (lambda d: (d / "concept/test/mug/t2i_conditions.json").write_text('{"personalized_driven_generation": ["one"]}'),
     "t2i_conditions.json"),
    (lambda d: (d / "concept/train/mug/conversations.json").write_text('{"9.png": [{"question": "q", "answer": "a"}]}'),
     "9.png"),
])
def test_malformed_concept_names_the_file(tmp_path, folders, breakage, named):
    root = tmp_path / "data"
    shutil.copytree(folders["data_dir"], root)
    breakage(root)
    with pytest.raises((ValueError, FileNotFoundError), match=named):
        U.Bench(root, codebook.WorldCodec())


# ----------------------------------------------------------------------------- tokenizer and prompts

def test_tokenizer_layout_concepts_and_prompts(folders):
    tok, sc = tokenizer_and_config(folders)
    n = sc["llm_vocab_size"]
    assert (tok.pad_id, tok.boi_id, tok.eoi_id, tok.t2i_id, tok.mmu_id, tok.image_offset) == (n, n + 1, n + 2, n + 5, n + 6, n + 10)
    ids = tok.add_concepts(["<bo>", "<bo_0>"])
    assert ids == [sc["vocab_size"], sc["vocab_size"] + 1] and tok.vocab_size == sc["vocab_size"] + 2
    enc = tok.encode("<bo> is <bo_0>. what colour is <bo> ?")
    assert enc[0] == ids[0] and enc[2] == ids[1] and enc.count(ids[0]) == 2 and all(i < n or i in ids for i in enc)
    assert tok.decode(enc).split() == "<bo> is <bo_0> . what colour is <bo> ?".split()
    assert set(tok.text_ids().tolist()) == set(range(n)) | set(ids)
    c = U.Concept("<bo>", "dog", "a dog", ["<bo> likes the beach"], [], soft=["<bo_0>"])
    img = data.Task("vqa", c, "what colour is <bo> ?", "brown", image=torch.arange(16))
    p = tok.understanding_prompt(img)
    assert p[:2] == [tok.mmu_id, tok.boi_id] and p[2:18] == list(range(n + 10, n + 26)) and p[18:20] == [tok.eoi_id, tok.bos_id]
    g = tok.generation_prompt(c, "a photo of <bo>", [7])
    assert g[:2] == [tok.t2i_id, tok.bos_id] and g[-3:] == [7, tok.eos_id, tok.boi_id]
    assert tok.uncond_prompt() == [tok.t2i_id, tok.bos_id, tok.eos_id, tok.boi_id]


def test_wrong_tokenizer_names_its_folder(tmp_path, folders):
    bad = F.write_tokenizer(tmp_path / "tok", F.vocabulary() + ["extra"])
    with pytest.raises(ValueError, match=str(bad)):
        showo.ShowoTokenizer(bad, M.showo_config(folders["showo_dir"]))


# ----------------------------------------------------------------------------- rewards

def test_clip_and_dino_rewards_on_tiny_models(folders):
    from transformers import CLIPModel
    refs = [Image.new("RGB", (20, 30), (250, 10, 10)), Image.new("RGB", (30, 30), (10, 10, 250))]
    c = U.Concept("<bo>", "dog", "a dog", [], [])
    gen = data.Task("gen", c, "<bo> on the beach", "")
    rolls = [R.Rollout(gen, gen, None, torch.zeros(16)), R.Rollout(gen, None, "only text"), R.Rollout(gen, gen, None, torch.ones(16))]
    drawn = lambda rs: [refs[int(r.codes[0])] if r.codes is not None and r.gen is not None else None for r in rs]
    ctx = dict(drawings=drawn, references=lambda concept: refs,
               clip=R.Embedder(folders["clip_dir"], "clip"), dino=R.Embedder(folders["dino_dir"], "image"))
    for name in ("clip_i", "dino"):
        v = R.IMAGE[name](rolls, ctx)
        e = ctx[name.split("_")[0]].images(refs)
        want = (e @ e.t()).mean(1)  # each drawing is one of the references: (1 + cos) / 2
        assert v[1] == 0.0 and v[0] == pytest.approx(want[0].item(), abs=1e-5) and v[2] == pytest.approx(want[1].item(), abs=1e-5)
        assert abs(v[0] - 1.0) > 1e-4  # not trivially 1: the other reference counts
    # CLIP-T against CLIPModel's own forward: logits_per_image = scale * cos
    clip = CLIPModel.from_pretrained(folders["clip_dir"]).eval()
    px = ctx["clip"].proc(images=[refs[0]], return_tensors="pt")["pixel_values"]
    t = ctx["clip"].tok(["a dog on the beach"], return_tensors="pt")
    with torch.no_grad():
        want = (clip(input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=px).logits_per_image / clip.logit_scale.exp()).item()
    assert R.clip_t(rolls, ctx)[0] == pytest.approx(want, abs=1e-5)
    assert R.clip_preview_score([gen], [torch.zeros(16)], ctx)[0] == pytest.approx(0.65 * R.clip_i(rolls, ctx)[0] + 0.35 * want, abs=1e-5)


def test_judge_hook_loads_by_name():
    fn = showo.load_callable("showo_fixture:judge_not_dark")
    assert fn is F.judge_not_dark
    for bad in ("showo_fixture", "showo_fixture:nope", "no_such_module:f"):
        with pytest.raises(ValueError, match="--judge"):
            showo.load_callable(bad)


# ----------------------------------------------------------------------------- train.py end to end

TINY_RL = ["--rl-iters", "1", "--group", "3", "--rollouts", "6", "--maskgit-steps", "4", "--dgs-preview", "2",
           "--max-text", "6", "--no-compile", "--concept-tokens", "2", "--chunk", "0", "--ckpt-every", "1"]


def test_preset_sets_only_flags_not_given(folders):
    args = flags.get_args(["--preset", "showo", "--showo-dir", folders["showo_dir"], "--group", "3", "--rollouts", "6",
                           "--rewards", "text_bleu=0.35,clip_i=0.26,judge=0.39,clip_t=0.2"])
    assert (args.group, args.rollouts, args.steps, args.rl_cfg, args.cfg, args.rl_lr, args.beta, args.eps) == (3, 6, 50, 5.0, 5.0, 1e-6, 0.01, 0.2)
    w = args.rewards
    assert (w["clip_t"], w["clip_i"], w["judge"], w["text_bleu"], w["identity"], w["cycle"]) == (0.2, 0.26, 0.39, 0.35, 0.0, 0.0)
    assert (args.maskgit_sampler, args.image_estimator, args.loss_agg, args.adv) == ("showo", "all", "sum", "nostd")
    assert args.reward_style == "released" and args.dgs is True
    assert T.LOG_RATIO_CLAMP == 10  # the released log-ratio clamp (was the preset's --log-ratio-clamp 10; now always on)
    assert flags.get_args(["--preset", "showo", "--showo-dir", "x"]).rewards == dict(w, clip_t=0.0)  # the preset's mix
    assert args.bf16 and args.grad_ckpt and not flags.get_args(["--preset", "showo", "--showo-dir", "x", "--no-bf16"]).bf16
    plain = flags.get_args([])
    assert (plain.group, plain.steps, plain.rl_lr, plain.rewards["identity"], plain.rewards["clip_i"], plain.bf16) == (8, 8, 1e-4, 0.26, 0.0, False)
    assert (plain.maskgit_sampler, plain.image_estimator, plain.loss_agg, plain.adv) == ("plain", "commit", "grpo", "batchstd")
    assert plain.dgs is False


@pytest.mark.parametrize("choices", [[],  # the preset: Show-o's sampler, every position at every step, token sums
                                     ["--maskgit-sampler", "plain", "--image-estimator", "commit", "--loss-agg", "grpo"],
                                     ["--image-estimator", "commit-remask", "--loss-agg", "dapo"],
                                     ["--maskgit-sampler", "plain", "--image-estimator", "masked", "--loss-agg", "dr_grpo"],
                                     ["--loss-agg", "bnpo", "--adv", "std", "--reward-style", "raw"]])
def test_one_sync_grpo_step_on_the_showo_path(tmp_path, folders, choices):
    argv = F.flags(folders) + ["--preset", "showo", "--out-dir", str(tmp_path), "--judge", "showo_fixture:judge_not_dark",
                               "--rewards", "text_bleu=0.35,clip_i=0.26,judge=0.39,clip_t=0.1,dino=0.1", "--no-bf16"] + TINY_RL + choices
    base = M.load_showo(folders["showo_dir"], folders["tokenizer_dir"])[0].state_dict()
    policy = T.main(argv)
    row = json.loads((tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()[-1])
    for k in ("r_text_bleu", "r_clip_i", "r_clip_t", "r_dino", "r_judge", "dgs_rho"):
        assert k in row, k
    assert "r_identity" not in row and row["text_ratio_dev_first"] < 1e-5 and row["image_ratio_dev_first"] < 1e-5
    assert (tmp_path / "rl" / "rollouts_000001.png").is_file()
    saved, meta, _ = ckpt.load_checkpoint(str(tmp_path / "rl"))
    assert meta["config"]["layout"] == "showo" and meta["config"]["vocab_size"] == base["embed_tokens.weight"].shape[0] + 6
    moved = policy.state_dict()
    assert not torch.equal(moved["layers.0.mlp.fc1.weight"], base["layers.0.mlp.fc1.weight"])  # everything trains


def test_concept_rows_only_leaves_every_other_weight(tmp_path, folders):
    argv = F.flags(folders) + ["--preset", "showo", "--out-dir", str(tmp_path), "--concept-rows-only",  # preset: bf16, grad-ckpt
                               "--rl-lr", "1e-2"] + TINY_RL
    base = M.load_showo(folders["showo_dir"], folders["tokenizer_dir"])[0].state_dict()
    after = T.main(argv).state_dict()
    V = base["embed_tokens.weight"].shape[0]
    for k, v in base.items():
        assert torch.equal(after[k][:V] if k.startswith(("embed_tokens", "lm_head")) else after[k], v), k
    assert after["embed_tokens.weight"][V:].shape[0] == 6  # 2 concepts x (identifier + 2 concept tokens)


# ----------------------------------------------------------------------------- bad folders and flags

def test_missing_folders_and_keys_name_the_flag_or_file(tmp_path, folders):
    rest = ["--out-dir", str(tmp_path)] + TINY_RL
    no_magvit = {k: v for k, v in folders.items() if k != "magvit_dir"}
    with pytest.raises(ckpt.BadInput, match="--magvit-dir is required"):  # one line from main, no traceback
        T.main(F.flags(no_magvit) + rest)
    with pytest.raises(ckpt.BadInput, match=f"--tokenizer-dir {tmp_path / 'nope'}: not found"):
        T.main(F.flags(dict(folders, tokenizer_dir=str(tmp_path / "nope"))) + rest)
    bad = tmp_path / "showo"
    shutil.copytree(folders["showo_dir"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "llm_vocab_size"}))
    with pytest.raises(ValueError, match=r"config.json: missing keys \['llm_vocab_size'\]"):
        M.load_showo(str(bad), folders["tokenizer_dir"])
    with pytest.raises(ValueError, match="no Phi architecture keys"):
        M.load_showo(folders["showo_dir"])
    with pytest.raises(FileNotFoundError, match="config.json"):
        M.load_showo(folders["showo_dir"], str(tmp_path))


def test_bad_showo_flags_fail_clearly(folders, capsys):
    with pytest.raises(SystemExit):
        flags.get_args(["--preset", "showo"])
    assert "--preset showo needs --showo-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        flags.get_args(["--showo-dir", folders["showo_dir"], "--rewards", "identity=0.3"])
    assert "--rewards identity: exact checks of the embedded world" in capsys.readouterr().err


# ----------------------------------------------------------------------------- evaluation on the test split

TINY_EVAL = ["--stage", "eval", "--maskgit-steps", "2", "--eval-draws", "2", "--max-text", "4", "--eval-reward-prompts", "2", "--group", "2"]


def test_recognition_items_of_the_released_test_files(folders):
    tasks = U.load_tasks(folders["data_dir"], U.load_concepts(folders["data_dir"]), "test")
    rec = [t for t in tasks if t.kind == "recognition"]
    assert [(t.concept.token, t.answer) for t in rec] == [("<bo>", "yes"), ("<bo>", "no"), ("<mug>", "no"), ("<mug>", "yes")]
    assert rec[0].question == "is <bo> in the photo ?"
    assert rec[1].meta["image_path"] == str(Path(folders["data_dir"], "concept", "test", "mug", "q.png"))  # found here
    assert sum(t.kind == "textqa" for t in tasks) == 2  # the file's text_only entries are text_only.json's, read once


def test_yes_no_rule():
    assert [U.said(x) for x in ("Yes.", "no, it is not", "I do not know", "Nope", "")] == ["yes", "no", "", "", ""]


def test_weighted_recognition_bleu_and_exact_on_hand_built_answers(monkeypatch):
    c = U.Concept("<bo>", "dog", "a dog", [], [])
    ask = lambda kind, answer: data.Task(kind, c, "q", answer)
    scripted = [(ask("recognition", "yes"), "Yes."), (ask("recognition", "yes"), "yes it is"), (ask("recognition", "yes"), "No."),
                (ask("recognition", "no"), "No, it is not."), (ask("recognition", "no"), "I do not know"),
                (ask("vqa", "brown"), "Brown "), (ask("vqa", "on the desk"), "the desk"),
                (ask("textqa", "on the desk"), "on the desk"), (ask("textqa", "brown"), "")]
    monkeypatch.setattr(U, "greedy", lambda model, tok, tasks, args: [x for _, x in scripted])
    bench = types.SimpleNamespace(with_image=lambda t: t, scorers={})
    res = U.evaluate(torch.nn.Linear(1, 1), None, bench, [t for t, _ in scripted], argparse.Namespace(eval_draws=2))
    assert res["recognition_pos"] == pytest.approx(2 / 3) and res["recognition_neg"] == 0.5
    assert res["recognition"] == pytest.approx((2 / 3 + 0.5) / 2)  # weighted: each half counts the same
    assert res["se"]["recognition"] == pytest.approx(0.5 * math.hypot(E.stderr([1, 1, 0]), E.stderr([1, 0])))
    bleu = math.exp(1 - 11 / 8)  # "the desk" against "on the desk": every 1- and 2-gram matches; the brevity penalty
    assert res["vqa_bleu"] == pytest.approx((1 + bleu) / 2) and res["vqa_exact"] == 0.5
    assert res["textqa_bleu"] == res["textqa_exact"] == 0.5
    assert list(res["se"]) == ["recognition", "recognition_pos", "recognition_neg", "vqa_bleu", "vqa_exact",
                               "textqa_bleu", "textqa_exact"]  # no request: no drawing metric


def test_eval_stage_on_the_showo_path(tmp_path, folders, capsys):
    T.main(F.flags(folders) + TINY_EVAL + ["--out-dir", str(tmp_path), "--judge", "showo_fixture:judge_not_dark"])
    saved = json.loads((tmp_path / "eval" / "eval_data.json").read_text())
    assert saved["world"] == {"data_dir": folders["data_dir"], "concepts": ["bo", "mug"]}
    assert saved["checkpoint"] == os.path.abspath(folders["showo_dir"])
    res = saved["metrics"]
    assert list(res["se"]) == U.METRICS + ["reward"] and res["skipped"] == {}
    assert all(0 <= res[m] <= 1 for m in U.METRICS + ["reward"] if m not in ("clip_i", "clip_t", "dino"))
    assert len(res["items"]["knowledge"]) == 4 and len(res["items"]["clip_i"]) == 6  # kgen requests; kgen + plain
    out = capsys.readouterr().out
    assert "| knowledge |" in out and "skipped" not in out
    bare = {k: v for k, v in folders.items() if k not in ("clip_dir", "dino_dir")}
    res = T.main(F.flags(bare) + TINY_EVAL + ["--out-dir", str(tmp_path / "bare")])
    assert set(U.METRICS) - set(res["se"]) == {"clip_i", "clip_t", "dino", "knowledge"}
    assert ("skipped: clip_i (no --clip-dir), clip_t (no --clip-dir), dino (no --dino-dir), knowledge (no --judge)"
            in capsys.readouterr().out)


def test_eval_of_an_rl_checkpoint_writes_next_to_it_and_keeps_other_results(tmp_path, folders, monkeypatch):
    T.main(F.flags(folders) + ["--preset", "showo", "--out-dir", str(tmp_path), "--no-bf16"] + TINY_RL)
    argv = F.flags(folders) + TINY_EVAL + ["--ckpt", str(tmp_path / "rl"), "--no-bf16"]  # its 2 concept tokens come from the run
    seen, held_out_eval = [], T.held_out_eval
    monkeypatch.setattr(T, "held_out_eval", lambda policy, tok, world, a: seen.append(a) or held_out_eval(policy, tok, world, a))
    T.main(argv)
    # the held-out reward is the run's objective: its G and reward weights, not this command's (G 2, no CLIP-I)
    assert (seen[0].group, seen[0].rewards["clip_i"], seen[0].rewards["text_bleu"]) == (3, 0.26, 0.35)
    step = tmp_path / "rl" / "step_000001"
    saved = json.loads((step / "eval_data.json").read_text())
    assert saved["checkpoint"] == str(step) and "clip_i" in saved["metrics"]
    assert len(saved["metrics"]["items"]["reward"]) == 2  # --eval-reward-prompts 2
    (step / "eval_data.json").write_text(json.dumps({"world": {"data_dir": "/other/data"}}))
    with pytest.raises(ckpt.BadInput, match="holds the results of another world"):
        T.main(argv)


@pytest.mark.parametrize("breakage, named", [
    (lambda d: (d / "concept/test/bo/vqa.json").write_text('[{"image": "q.png", "question": "q"}]'), "vqa.json"),
    (lambda d: (d / "concept/test/mug/text_only.json").write_text('[{"question": "q", "answer": '), "text_only.json"),
    (lambda d: F.dump(d / "test_data/bo.json", [dict(F.recognition_item("bo", "bo"), conversations=[{"value": "q"}, {"value": "Maybe."}])]),
     "bo.json"),
    (lambda d: F.dump(d / "test_data/mug.json", [dict(F.recognition_item("mug", "mug"), image="/elsewhere/gone.png")]), "mug.json"),
])
def test_malformed_test_file_names_it(tmp_path, folders, breakage, named):
    root = tmp_path / "data"
    shutil.copytree(folders["data_dir"], root)
    breakage(root)
    with pytest.raises(ckpt.BadInput, match=named):
        T.main(F.flags(dict(folders, data_dir=str(root))) + TINY_EVAL + ["--out-dir", str(tmp_path)])


def test_mode_u_and_r_draw_from_the_whole_answer(monkeypatch, folders):
    """The drawing prompt holds the whole answer (--first-sentence, which cut mode u's at its first sentence, is gone)."""
    tok, _ = tokenizer_and_config(folders)
    tok.add_concepts(["<bo>"])
    c = U.Concept("<bo>", "dog", "a dog", ["<bo> likes the beach"], [])
    vqa = data.Task("vqa", c, "what colour is <bo> ?", "brown", image=torch.arange(16))
    kgen = data.Task("kgen", c, "<bo> at its favourite place", "<bo> likes the beach")
    after = data.Task("gen", c, U.DRAW.format(tok="<bo>"), "brown")
    answer = "brown . it likes the beach"
    monkeypatch.setattr(T.S, "answer", lambda model, tok, prompts, *a: ([answer] * len(prompts), torch.zeros(len(prompts), 1), None, None))
    drawn = []
    monkeypatch.setattr(T.S, "draw", lambda model, tok, prompts, *a, **k: drawn.append(prompts[0]))
    for task, gen, kept in ((vqa, after, answer), (kgen, kgen, answer)):
        T.sample_partials(None, tok, task, gen, 1, flags.get_args([]), None, None)
        assert drawn[-1][-2 - len(tok.encode(kept)):-2] == tok.encode(kept), task.kind  # then <eos> <soi>
