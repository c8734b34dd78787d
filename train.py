"""
Train nanosync's unified model: supervised base pretraining, Sync-GRPO, and held-out evaluation.

  python train.py                                       # Sync-GRPO from the committed base/ (the main job, ~12 min on 2 CPU cores)
  python train.py --stage pretrain                      # base model on the embedded world (CPU, minutes)
  python train.py --stage eval --ckpt out/base          # held-out UnifyBench-style metrics
  torchrun --nproc_per_node=2 train.py --stage pretrain # DDP: gloo on CPU, NCCL on CUDA

The embedded world (data.py) is generated from --world-seed and written to --data-dir in UnifyBench
layout the first time; later runs load it from disk. Outputs go to --out-dir/<stage>: metrics.jsonl,
checkpoints (step_XXXXXX/ folders + a `latest` pointer, each written atomically), PNG sample grids.
"""
import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time

import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import dgs
import eval as E
import model as M
import rewards
import showo
import unifybench


# The base the main job starts from: `python train.py --stage pretrain` with the default flags writes the
# same recipe to out/pretrain (about 25 minutes on a 2-core CPU), so the main job can spend its time on RL.
COMMITTED_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "base")

# Mode u asks every understanding question of the benchmark (recognition, VQA, text-only QA): trained on
# VQA alone, RL moved the shared yes/no answer and recognition fell from 0.85 to 0.51 (a constant "no").
# A plain placement request ("draw <c> in the top left") has a reasoning the model copies from the
# request, right in every rollout: a zero-variance text group, so mode r asks knowledge requests; plain
# requests stay in the held-out evaluation and the image-only ablation.
MIXES = {"both": ["recognition", "vqa", "textqa", "kgen"], "u": ["recognition", "vqa", "textqa"], "r": ["kgen"],
         "und": ["recognition", "vqa", "textqa"], "gen": ["kgen", "gen"]}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--stage", default="rl", choices=["rl", "pretrain", "eval"],
      help="rl = Sync-GRPO from --base (pretraining it first on the embedded world if missing)")
    a("--data-dir", default="out/world", help="UnifyBench-layout folder; the embedded world is written here if empty "
      "(with --showo-dir: a real UnifyBench folder, only read)")
    a("--world-seed", type=int, default=1234, help="seed of the embedded world (int)")
    a("--n-train-concepts", type=int, default=150, help="concepts seen in training (int)")
    a("--n-test-concepts", type=int, default=24, help="held-out concepts, never trained on (int)")
    a("--out-dir", default="out", help="root folder of run outputs")
    a("--ckpt", default=None, help="checkpoint folder (step_XXXXXX) or run folder with a `latest` file")
    a("--seed", type=int, default=0, help="training seed (int)")
    # model
    a("--n-layer", type=int, default=4, help="transformer blocks (int)")
    a("--n-embd", type=int, default=128, help="width (int)")
    a("--n-head", type=int, default=4, help="attention heads (int)")
    a("--image-mode", default="maskgit", choices=["maskgit", "ar"], help="image generation: Show-o MaskGIT or Janus-style AR")
    # pretraining
    a("--steps", type=int, default=8, help="MaskGIT sampling steps T (int)")
    a("--cfg", type=float, default=1.0, help="classifier-free guidance weight w: (1+w)*cond - w*uncond")
    a("--maskgit-sampler", default="plain", choices=["plain", "showo"],
      help="plain = tempered logits, confidence log p, float64 cosine counts; showo = Show-o's t2i_generate step "
           "(untempered logits, log p + Gumbel at a compounding temperature, its clamped float32 counts); showo in --preset showo")
    a("--p-uncond", type=float, default=0.1, help="share of generation examples with the prompt dropped (CFG training)")
    a("--iters", type=int, default=3000, help="pretraining optimizer steps (int); the committed base/ used 3000")
    a("--batch", type=int, default=32, help="examples per optimizer step per rank (int)")
    a("--lr", type=float, default=2e-3, help="peak learning rate")
    a("--warmup", type=int, default=50, help="linear warm-up steps (int)")
    a("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    a("--grad-clip", type=float, default=1.0, help="max global gradient norm (0 = off)")
    a("--log-every", type=int, default=25, help="steps between metric lines (int)")
    a("--ckpt-every", type=int, default=250, help="steps between checkpoints (int)")
    a("--keep", type=int, default=2, help="checkpoints kept on disk (int)")
    a("--resume", action="store_true", help="continue from <out-dir>/<stage>/latest")
    a("--stop-after", type=int, default=0, help="RL: checkpoint and exit after this many steps of this run (0 = run to the end); for time-limited jobs")
    # Sync-GRPO
    a("--base", default="committed", help="base checkpoint for RL: committed = base/ in the repository (what "
      "`train.py --stage pretrain` makes with its defaults), pretrain = <out-dir>/pretrain (pretrained first if missing), "
      "or a checkpoint folder")
    a("--tasks", default="both", choices=list(MIXES), help="rollout mix: both (modes u and r), u, r, und (text only), gen (image only)")
    a("--rl-iters", type=int, default=200, help="RL steps, one rollout batch each (int)")
    a("--rollouts", type=int, default=80, help="rollouts per RL step per rank (int, multiple of --group; 10 prompts x G 8 = "
      "one of each recognition, VQA and text-only question and knowledge request)")
    a("--group", type=int, default=8, help="G: rollouts of the same prompt per group (int)")
    a("--mu", type=int, default=2, help="optimizer updates per rollout batch (int); >1 makes the PPO ratio move")
    a("--rl-lr", type=float, default=1e-4, help="RL peak learning rate")
    a("--rl-warmup", type=int, default=5, help="RL warm-up optimizer updates (int)")
    a("--eps", type=float, default=0.2, help="clip epsilon (lower side, and upper unless --eps-high)")
    a("--eps-high", type=float, default=0.0, help="clip epsilon upper side (0 = same as --eps; DAPO uses 0.28)")
    a("--beta", type=float, default=0.01, help="k3 KL weight to the frozen base (0 = no reference forward)")
    a("--adv", default="batchstd", choices=list(dgs.ADVANTAGE_MODES), help="advantage scaling: std (GRPO), nostd (Dr. GRPO), batchstd")
    a("--credit", default="causal", choices=["joint", "split", "causal"],
      help="which reward each segment's advantage comes from: joint (both: text+image reward), split (text: text reward, "
           "image: image reward), causal (text: text+image reward, image: image reward)")
    a("--ptx", type=float, default=None, help="weight of a supervised replay term in the RL loss: the pretraining loss on "
      "--ptx-batch fresh pretraining examples per update (InstructGPT's PPO-ptx; 0 = off, the paper's loss); "
      "default 0.3 on the embedded world, 0 with --showo-dir (no pretraining mix to replay)")
    a("--ptx-batch", type=int, default=16, help="pretraining examples per RL update for --ptx (int)")
    a("--null-adv", action="store_true", help="null run: shuffle advantages within each group (same compute, no learning signal)")
    a("--adv-bessel", action="store_true", help="advantage std with Bessel's correction (n-1, as TRL); default the population std (n)")
    a("--image-estimator", default="commit", choices=list(M.ESTIMATORS),
      help="MaskGIT log-prob terms per scored step: commit (token at its commit step), commit-remask (Mask-GRPO: plus "
           "re-masked mass), masked (every masked position), all (every position, the released code); all in --preset showo")
    a("--loss-agg", default="grpo", choices=list(AGGREGATIONS),
      help="token aggregation per modality: grpo (token mean per rollout, then mean), dapo/bnpo (token mean over the "
           "batch), dr_grpo (token sum / (rollouts x segment width)), sum (token sum, mean over rollouts: the released code)")
    a("--log-ratio-clamp", type=float, default=0.0, help="clamp log(pi/pi_old) to +-this before exp (0 = off; the released code: 10)")
    a("--ratio-level", default="token", choices=["token", "sequence"],
      help="PPO ratio per token, or one per segment: exp(token mean of log-ratios) (GSPO)")
    a("--w-text-loss", type=float, default=1.0, help="weight of the text-token loss (per-modality token mean)")
    a("--w-image-loss", type=float, default=1.0, help="weight of the image-token loss (per-modality token mean)")
    a("--temperature", type=float, default=1.0, help="rollout temperature, also used by the scorer")
    a("--text-temperature", type=float, default=0.0, help="temperature of text rollouts and their scorer (0 = --temperature)")
    a("--rl-cfg", type=float, default=0.0, help="CFG weight of RL rollouts and of the loss (0 = no CFG in either; "
      "evaluation keeps --cfg)")
    a("--update-steps", type=int, default=2, help="MaskGIT steps scored per update: the k of T whose committed tokens were least certain (0 = all T)")
    a("--chunk", type=int, default=0, help="rows per log-prob chunk (0 = one chunk; >0 never holds all logits)")
    a("--kv-reuse", action=argparse.BooleanOptionalAction, default=True,
      help="MaskGIT: each prompt's keys/values computed once and reused by every step, in rollouts and in the "
           "update's scoring (--no-kv-reuse recomputes the whole sequence per step; same codes and log-probs)")
    a("--step-backward", action="store_true",
      help="MaskGIT update: backpropagate one scored step at a time (each step's forward recomputed in backward), "
           "so peak memory holds one step's activations whatever --update-steps; costs one more image forward")
    a("--old-lp", default="auto", choices=["auto", "sampler", "scorer"],
      help="pi_old of the clipped ratio: sampler = log-probs stored at sampling; scorer = one no-grad scoring pass "
           "before the first update (ratio 1 there up to the scorer's own determinism; one more forward); "
           "auto = scorer under --bf16, else sampler")
    a("--no-compile", dest="compile", action="store_false", help="run the loss formulas eagerly (no torch.compile)")
    a("--dgs", type=int, default=0, choices=[0, 1], help="Dynamic Group Scaling on (1) or off (0; see the README for why off)")
    a("--dgs-preview", type=int, default=2, help="preview after this MaskGIT step (AR: image rows) (int)")
    a("--dgs-cap", type=int, default=32, help="max previews per group before filling with the best (int)")
    a("--dgs-batch", type=int, default=8, help="previews sampled per DGS round (int)")
    a("--dgs-target", type=float, default=0.25, help="target acceptance rate of previews")
    a("--diag-prompts", type=int, default=16, help="prompts (x G rollouts) of the base's learnability diagnostics before RL (0 = skip)")
    a("--dgs-tau-rule", default="bounded", choices=["bounded", "released"],
      help="bounded = toward the proposed tau by at most 0.005 per batch; released = exactly +-0.005 or not at all")
    a("--reward-style", default="raw", choices=["raw", "released"],
      help="released (Show-o path; default in --preset showo): NLTK-method1 char-BLEU on raw text, mode r's normalised "
           "BLEU over all facts, CLIP-I thresholded at 0.5 and re-centred to 0.8, judge re-centred to 0.8")
    a("--drop-zero-var", action="store_true", help="DAPO dynamic sampling: drop groups whose rewards are all equal")
    a("--eval-base", type=int, default=1, choices=[0, 1], help="RL: evaluate the base before training (1) or skip it (0)")
    a("--sample-every", type=int, default=20, help="RL steps between PNG grids of rollouts (int)")
    for name, w in rewards.DEFAULT_WEIGHTS.items():
        a(f"--w-{name.replace('_', '-')}", type=float, default=w, help=f"ensemble weight of the {name} reward (0 = off)")
    # evaluation / sampling
    a("--eval-batch", type=int, default=64, help="prompts per sampling batch in evaluation (int)")
    a("--eval-temperature", type=float, default=1.0, help="image sampling temperature in evaluation (fixed seed)")
    a("--eval-draws", type=int, default=4, help="drawings per held-out request and temperature-1 answers per question (int)")
    a("--eval-reward-prompts", type=int, default=24, help="held-out prompts (x G rollouts) for the held-out mean reward, the RL objective (0 = skip)")
    a("--max-text", type=int, default=12, help="max new text tokens per answer (int)")
    a("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    # a real model: Show-o + MAGVIT-v2 + a UnifyBench folder (--data-dir), every part from a local folder
    a("--preset", default="none", choices=["none", "showo"],
      help="showo = the paper's Show-o run (G 9, CFG 5, T 50, lr 1e-6, beta 0.01, eps 0.2, DGS preview at step 10, "
           "released reward mix); sets only the flags not given")
    a("--showo-dir", default=None, help="RL on Show-o: local checkpoint folder (config.json + *.safetensors or pytorch_model.bin)")
    a("--magvit-dir", default=None, help="local MAGVIT-v2 folder (Show-o's magvitv2 weights, optional config.json)")
    a("--tokenizer-dir", default=None, help="local Phi-1.5 folder (microsoft/phi-1_5): tokenizer files, config.json = the architecture")
    a("--clip-dir", default=None, help="local transformers CLIP folder: clip_i / clip_t rewards and the DGS preview score (none = off)")
    a("--dino-dir", default=None, help="local transformers DINO folder (AutoModel + image processor): dino reward (none = off)")
    a("--judge", default=None, help="judge reward: module:function, f(rollouts, ctx) -> list[float] in [0, 1] (none = off)")
    a("--concept-tokens", type=int, default=16, help="learned concept tokens per concept besides its identifier (int)")
    a("--concept-init", default="class", choices=["class", "image"],
      help="new rows start at the class word's rows, or (concept tokens) at the mean row of the reference images' codes")
    a("--concept-rows-only", action="store_true", help="train only the concept tokens' embedding and lm_head rows")
    a("--first-sentence", action="store_true",
      help="mode u: draw from the answer's first sentence only, as the released code cuts it (first line, up to the "
           "first '.', else '!', else '?'); off: the whole answer")
    a("--bf16", action=argparse.BooleanOptionalAction, default=False,
      help="bf16 autocast for rollouts and updates (weights and optimizer state stay fp32); on in --preset showo")
    a("--grad-ckpt", action=argparse.BooleanOptionalAction, default=False,
      help="gradient checkpointing: recompute each block's activations in backward; on in --preset showo")
    args = p.parse_args(argv)
    showo.apply_preset(p, args, argv)
    check_args(p, args)
    return args


def check_args(p, args):
    """Every number flag's bounds, checked before any work: a bad value stops with p.error naming the
    flag; a legal value that makes the run learn nothing gets a warning."""
    for k in ("iters", "batch", "steps", "n_layer", "n_embd", "n_head", "eval_batch", "max_text", "rl_iters",
              "rollouts", "group", "mu", "ptx_batch"):
        if getattr(args, k) <= 0:
            p.error(f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}")
    if args.rollouts % args.group:
        p.error(f"--rollouts ({args.rollouts}) must be a multiple of --group ({args.group}): "
                "each group is G rollouts of one prompt")
    if args.reward_style == "released" and not args.showo_dir:
        p.error("--reward-style released needs --showo-dir: its mode-r rule reads a UnifyBench concept's extra_info facts")
    if args.ptx is None:
        args.ptx = 0.0 if args.showo_dir else 0.3
    if args.ptx and args.showo_dir:
        p.error("--ptx replays the embedded world's pretraining mix; with --showo-dir there is none (use --ptx 0)")
    if args.adv_bessel and args.group < 2:
        p.error("--adv-bessel needs --group of 2 or more (Bessel's std of one reward is undefined)")
    if args.dgs and args.dgs_cap < args.group:
        p.error(f"--dgs-cap ({args.dgs_cap}) must be at least --group ({args.group})")
    if args.n_embd % args.n_head:
        p.error(f"--n-embd ({args.n_embd}) must be divisible by --n-head ({args.n_head})")
    # a zero here would divide by zero after a full step of work
    for k in ("log_every", "ckpt_every", "sample_every", "keep", "n_train_concepts", "n_test_concepts", "dgs_batch"):
        if getattr(args, k) <= 0:
            p.error(f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}")
    for k in ("lr", "rl_lr", "warmup", "rl_warmup", "weight_decay", "grad_clip", "eps", "eps_high", "beta",
              "w_text_loss", "w_image_loss", "eval_temperature", "text_temperature", "stop_after", "update_steps", "chunk", "dgs_preview",
              "concept_tokens", "threads", "ptx"):
        if getattr(args, k) < 0:
            p.error(f"--{k.replace('_', '-')} must be 0 or more, got {getattr(args, k)}")
    if not 0 <= args.p_uncond <= 1:
        p.error(f"--p-uncond is a share of examples, in [0, 1]; got {args.p_uncond}")
    if not 0 < args.dgs_target <= 1:
        p.error(f"--dgs-target is an acceptance rate, in (0, 1]; got {args.dgs_target}")
    if args.group < 2:
        p.error(f"--group must be at least 2, got {args.group}: an advantage is a reward minus its group's mean, "
                "so a group of one rollout has none")
    if args.temperature <= 0:
        p.error(f"--temperature must be positive, got {args.temperature}: at 0 the rollouts of a group are identical "
                "(every advantage 0) and the scorer divides by it")
    if args.resume and args.stage != "eval" and not has_ckpt(os.path.join(args.out_dir, args.stage)):
        p.error(f"--resume: no checkpoint in {os.path.join(args.out_dir, args.stage)} (no `latest` file); "
                "run without --resume to start this stage afresh")
    lr = {"pretrain": "lr", "rl": "rl_lr"}.get(args.stage)
    if lr and getattr(args, lr) == 0:
        warn(f"--{lr.replace('_', '-')} 0: the optimizer steps leave the weights unchanged")


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- distributed

def setup_dist():
    """(rank, world_size, device). Single process unless launched by torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return rank, dist.get_world_size(), torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")


# ----------------------------------------------------------------------------- checkpoints

class BadInput(Exception):
    """A missing or damaged input file or folder; main prints its message (which names the file and what
    was expected) as one line and exits 1. Anything else keeps its traceback: that is a bug."""


def from_files(f, *a):
    """f(*a) for data.py's readers of a world folder, whose errors on bad files name the file."""
    try:
        return f(*a)
    except (ValueError, FileNotFoundError) as e:
        raise BadInput(str(e)) from None


def atomic_write(path, blob: bytes):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def save_checkpoint(run_dir, step, model, meta, state=None, keep=2):
    """run_dir/step_XXXXXX/{model.safetensors, meta.json, state.pt}: written into a temp folder, renamed,
    then `latest` is pointed at it; a crash at any moment leaves the previous checkpoint usable."""
    name = f"step_{step:06d}"
    tmp, final = os.path.join(run_dir, name + ".tmp"), os.path.join(run_dir, name)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(dict(meta, step=step, config=M.config_dict(model.cfg)), f, indent=1)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, os.path.join(tmp, "model.safetensors"))
    shutil.copymode(os.path.join(tmp, "meta.json"), os.path.join(tmp, "model.safetensors"))  # save_file makes it 0600
    if state is not None:
        torch.save(state, os.path.join(tmp, "state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write(os.path.join(run_dir, "latest"), name.encode())
    old = sorted(d for d in os.listdir(run_dir) if d.startswith("step_") and not d.endswith(".tmp"))
    for d in old[:-keep]:
        shutil.rmtree(os.path.join(run_dir, d), ignore_errors=True)
    for d in os.listdir(run_dir):  # leftovers of a killed save (this save's own are renamed by now)
        if d.startswith("latest.tmp"):
            os.remove(os.path.join(run_dir, d))
        elif d.startswith("step_") and d.endswith(".tmp"):
            shutil.rmtree(os.path.join(run_dir, d), ignore_errors=True)
    return final


def resolve_ckpt(path):
    if path and os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            path = os.path.join(path, f.read().strip())
    if not path or not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise BadInput(f"checkpoint {path!r}: expected a folder with model.safetensors and meta.json "
                       "(a step_XXXXXX folder) or a run folder with a `latest` file")
    return path


def read_checkpoint(path, need_state=False, load_state=True):
    """(folder, meta, weights, state or None) of a checkpoint, every file checked: a damaged one is a
    BadInput naming it, rather than a library error (or NaNs that crash the sampler much later).
    load_state=False skips the optimizer state (twice the weights' size; evaluation needs none)."""
    path = resolve_ckpt(path)
    f = os.path.join(path, "meta.json")
    try:
        with open(f) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as e:
        raise BadInput(f"{f}: expected the checkpoint's metadata as JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or not isinstance(meta.get("step"), int):
        raise BadInput(f"{f}: expected a JSON object with 'step' and 'config' (the model's shape)")
    f = os.path.join(path, "model.safetensors")
    try:
        weights = load_file(f)
    except Exception as e:  # safetensors' own error type, whatever the damage
        raise BadInput(f"{f}: expected a safetensors file of the model's weights ({e})") from None
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise BadInput(f"{f}: expected finite weights, but NaN or inf in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")
    f, state = os.path.join(path, "state.pt"), None
    if load_state and os.path.isfile(f):
        try:
            state = torch.load(f, map_location="cpu", weights_only=False)
        except Exception as e:  # a truncated zip (RuntimeError), an empty file (EOFError), a pickle error...
            raise BadInput(f"{f}: expected the optimizer state saved by torch.save "
                           f"({type(e).__name__}: {str(e).split('. ')[0] or 'empty'})") from None
    if need_state and not (isinstance(state, dict) and {"opt", "sched"} <= state.keys()):
        raise BadInput(f"{f}: expected the optimizer and scheduler state (a dict with 'opt' and 'sched') to resume from")
    return path, meta, weights, state


def load_weights(model, weights, path):
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # its message lists every mismatch, one per line after a header
        first = (str(e).splitlines()[1:] or [str(e)])[0].strip()
        raise BadInput(f"{os.path.join(path, 'model.safetensors')}: expected weights of this model's shape ({first})") from None


def load_checkpoint(path, device="cpu"):
    """(model, meta, state or None) from a checkpoint folder or run folder."""
    path, meta, weights, state = read_checkpoint(path)
    try:
        model = M.UnifiedModel(M.Config(**meta["config"]))
    except TypeError as e:
        raise BadInput(f"{path}/meta.json: 'config' is not a model configuration ({e})") from None
    load_weights(model, weights, path)
    return model.to(device), meta, state


def restore(run_dir, model, opt, sched):
    """Load a run's latest weights, optimizer and scheduler in place; returns (step, saved state)."""
    path, meta, weights, state = read_checkpoint(run_dir, need_state=True)
    load_weights(model, weights, path)  # into the live model: no second copy of the weights is built
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    return meta["step"], state


def rng_state():
    return dict(python=random.getstate(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(s):
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None:
        torch.cuda.set_rng_state_all(s["cuda"])


# ----------------------------------------------------------------------------- shared pieces

def say(rank, msg):
    """One console line on what the job is doing, from the first process only."""
    if rank == 0:
        print(msg, flush=True)


def world_and_tokenizer(args, rank=0):
    made = os.path.isfile(os.path.join(args.data_dir, "world.json"))
    world = from_files(data.ensure_world, args.data_dir, args.world_seed, args.n_train_concepts, args.n_test_concepts)
    say(rank, f"world: {'read' if made else 'wrote the embedded world to'} {args.data_dir} (seed {world.seed}, "
              f"{len(world.train)} training and {len(world.test)} held-out concepts)")
    return world, data.WordTokenizer(len(world.concepts))


def new_model(args, tok):
    cfg = M.Config(vocab_size=tok.vocab_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                   n_inner=4 * args.n_embd, image_offset=tok.image_offset, codebook_size=tok.codebook_size,
                   mask_id=tok.mask_id, pad_id=tok.pad_id, boi_id=tok.boi_id, eoi_id=tok.eoi_id,
                   image_causal=args.image_mode == "ar")
    return M.UnifiedModel(cfg)


def make_optimizer(model, args, total):
    params = [p for p in model.parameters() if p.requires_grad]
    # rows-only training marks its matrices no_decay: decay would move the rows it must leave alone
    decay = [p for p in params if p.dim() >= 2 and not getattr(p, "no_decay", False)]
    no_decay = [p for p in params if p.dim() < 2 or getattr(p, "no_decay", False)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    def lr_mult(step):  # linear warm-up, then cosine decay to 10% of the peak
        if step < args.warmup:
            return (step + 1) / args.warmup
        t = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_mult)


def clip_and_step(model, opt, sched, args):
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return norm.item()


class JsonLog:
    def __init__(self, path, enabled, upto=0):
        """Rows of steps after `upto` are dropped first: a resumed run logs again the steps it redoes
        since its checkpoint, and a fresh run (upto 0) starts a fresh file; each step appears once."""
        self.f = None
        if enabled:
            kept = []
            for line in open(path) if os.path.isfile(path) else []:
                try:
                    row = json.loads(line)
                except ValueError:  # the last line, cut by a kill
                    continue
                if row.get("step", 0) <= upto:
                    kept.append(line.rstrip("\n") + "\n")
            atomic_write(path, "".join(kept).encode())
            self.f = open(path, "a")

    def __call__(self, row):
        if self.f:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()


def save_samples(path, model, tok, tasks, args):
    """PNG grid: each generation task's prompt, the model's reasoning and its drawing."""
    texts = E.answer(model, tok, [data.understanding_prompt(tok, t) for t in tasks], args.max_text)[0]
    prompts = [data.generation_prompt(tok, t.concept, t.question, tok.encode(x)) for t, x in zip(tasks, texts)]
    g = torch.Generator(model.lm_head.weight.device).manual_seed(0)
    codes = E.draw(model, tok, prompts, args, args.eval_temperature, g)["codes"]
    data.save_grid(path, [data.render(c) for c in codes], [f"{t.question} | {x}" for t, x in zip(tasks, texts)])


# ----------------------------------------------------------------------------- pretraining

# Pretraining draws a task kind uniformly from this list, so recognition comes twice as often as the rest:
# at an equal share the base never learned it (a constant "yes" at every checkpoint up to 2000 steps), as
# no other task needs the image matched against the concept's description.
PRETRAIN_KINDS = ["recognition", "recognition", "vqa", "textqa", "gen", "kgen"]


def pretrain_example(tok, task, rng, args):
    """(ids, text targets, image targets): targets[t] is what the head at t must predict (-1 = none).
    Text is next-token; MaskGIT image targets sit at the masked positions themselves (Show-o)."""
    if task.kind in E.UNDERSTAND:
        prompt, ans = data.understanding_prompt(tok, task), tok.encode(task.answer) + [tok.eor_id]
        ids = prompt + ans
        text = [-1] * (len(prompt) - 1) + ans + [-1]
        return ids, text, [-1] * len(ids)
    # a few drawings without stated reasoning, so a generation-only ablation starts from a working base
    reason = tok.encode(task.answer) if rng.random() > args.p_uncond else []
    if rng.random() < args.p_uncond:  # prompt dropped: this row teaches the unconditional branch of CFG
        prompt, text = data.uncond_prompt(tok), [-1, -1]
    else:
        prompt = data.generation_prompt(tok, task.concept, task.question, reason)
        n = len(reason) + 1  # reasoning + <eor>, predicted from the token before each
        text = [-1] * (len(prompt) - n - 2) + prompt[-n - 1:-1] + [-1, -1]
    codes = [tok.image_offset + int(c) for c in task.target]
    N = len(codes)
    if args.image_mode == "ar":
        img = [-1] * (len(prompt) - 1) + codes + [-1, -1]
        x = codes
    else:  # mask a cosine-scheduled random share of the image, predict the masked codes
        n_mask = max(1, math.ceil(N * math.cos(math.pi / 2 * rng.random())))
        masked = set(rng.sample(range(N), n_mask))
        x = [tok.mask_id if i in masked else c for i, c in enumerate(codes)]
        img = [-1] * len(prompt) + [c if i in masked else -1 for i, c in enumerate(codes)] + [-1]
    return prompt + x + [tok.eoi_id], text + [-1] * (N + 1), img


def collate(examples, pad_id, device):
    ids, valid = M.pad_left([e[0] for e in examples], pad_id, device)
    tgts = [M.pad_left([[t + 1 for t in e[j]] for e in examples], 0, device)[0] - 1 for j in (1, 2)]
    return ids, valid, tgts[0], tgts[1]


def pretrain_batch(world, tok, rng, n, args, device):
    """n supervised examples of the pretraining mix on fresh random concepts (belonging to no world)."""
    # each concept needs its own identifier: a tiny world has fewer than n, and then concepts repeat
    concepts = data.random_concepts(min(n, len(world.concepts)), len(world.concepts), rng)
    tasks = data.make_tasks(concepts, PRETRAIN_KINDS, n, seed=rng.randrange(2**31))
    # half the VQA questions become mode-u drawings: draw the concept from the answer just given
    tasks = [data.draw_after_answer(t) if t.kind == "vqa" and rng.random() < 0.5 else t for t in tasks]
    return collate([pretrain_example(tok, t, rng, args) for t in tasks], tok.pad_id, device)


def pretrain_loss(model, raw, tok, batch):
    """Supervised loss: mean NLL of text targets + mean NLL of image targets (per-modality means), and
    each mean detached for logging: tensors, not floats, so the RL update's replay term adds no host sync."""
    ids, valid, text_tgt, img_tgt = batch
    h = model(ids, valid)
    code_ids = torch.arange(tok.image_offset, tok.image_offset + tok.codebook_size)
    lp_t, _ = M.token_logprobs(raw, h, text_tgt, ids=tok.text_ids())
    lp_i, _ = M.token_logprobs(raw, h, img_tgt, ids=code_ids)
    lt, li = -lp_t.sum() / (text_tgt >= 0).sum(), -lp_i.sum() / (img_tgt >= 0).sum()
    return lt + li, lt.detach(), li.detach()


def pretrain(args, rank=0, world_size=1, device="cpu"):
    world, tok = world_and_tokenizer(args, rank)
    run_dir = os.path.join(args.out_dir, "pretrain")
    os.makedirs(run_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    raw = new_model(args, tok).to(device)
    opt, sched = make_optimizer(raw, args, args.iters)
    step, seconds = 0, 0.0
    if args.resume:
        step, state = restore(run_dir, raw, opt, sched)
        seconds = state.get("seconds", 0.0)
    say(rank, f"pretraining the base: {args.iters} steps{f' from step {step}' if step else ''} -> {run_dir}")
    model = DDP(raw) if world_size > 1 else raw
    log = JsonLog(os.path.join(run_dir, "metrics.jsonl"), rank == 0, step)
    held_out = from_files(data.load_tasks, args.data_dir, "test")
    bar = tqdm(total=args.iters, initial=step, disable=rank != 0, desc="pretrain")
    t0 = time.time() - seconds  # `seconds` counts the training time of the steps logged, across resumes
    while step < args.iters:
        # data depends only on (seed, rank, step): a resumed run sees exactly the batches it would have
        rng = random.Random(f"{args.seed}/{rank}/{step}")
        raw.train()
        loss, lt, li = pretrain_loss(model, raw, tok, pretrain_batch(world, tok, rng, args.batch, args, device))
        loss.backward()
        gnorm = clip_and_step(raw, opt, sched, args)
        step += 1
        bar.update(1)
        if step % args.log_every == 0 or step == args.iters:
            log(dict(step=step, loss=loss.item(), loss_text=lt.item(), loss_image=li.item(), grad_norm=gnorm,
                     lr=sched.get_last_lr()[0], seconds=round(time.time() - t0, 1)))
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if rank == 0 and (step % args.ckpt_every == 0 or step == args.iters):
            save_checkpoint(run_dir, step, raw, dict(stage="pretrain", args=vars(args)),
                            dict(opt=opt.state_dict(), sched=sched.state_dict(), seconds=time.time() - t0), args.keep)
    bar.close()
    if rank == 0:
        gen = [t for t in held_out if t.kind in ("gen", "kgen")][:16]
        save_samples(os.path.join(run_dir, "samples.png"), raw, tok, gen, args)
        say(rank, f"evaluating the base on {len(held_out)} held-out tasks")
        res = held_out_eval(raw, tok, world, held_out, args)
        print("\n" + E.table({"base": res}, f"held-out concepts of {args.data_dir}, base after {step} pretraining steps"))
        atomic_write(os.path.join(run_dir, "eval.json"), json.dumps(res, indent=1).encode())
        say(rank, outputs(run_dir))
    return raw


def outputs(run_dir):
    """The closing console line: what the run left in its folder."""
    names = sorted(os.listdir(run_dir))
    pngs = [n for n in names if n.startswith("rollouts_")]
    names = [n for n in names if n not in pngs and n != "latest" and not n.startswith("step_")]
    latest = resolve_ckpt(run_dir) if has_ckpt(run_dir) else None
    return (f"outputs in {run_dir}: " + ", ".join(names + ([f"{len(pngs)} rollouts_*.png"] if pngs else []))
            + (f"; latest checkpoint {os.path.basename(latest)}/" if latest else ""))


# ----------------------------------------------------------------------------- Sync-GRPO: rollouts

def rollout_plan(task, mix, after=data.draw_after_answer):
    """(text prompt or None, what to draw or None) for one prompt of the reasoning loop.
    mode u: answer a question about an image, then draw the concept from that answer (`after`);
    mode r: state the fact the request needs, then draw; und / gen: one modality only (ablations)."""
    if mix == "und":
        return task, None
    if mix == "gen":
        return None, task
    return task, after(task) if task.kind in E.UNDERSTAND else task


def sample_partials(model, tok, task, gen_task, n, args, g, stop):
    """n fresh rollouts of one prompt, images sampled up to MaskGIT step (or AR token) `stop`."""
    p = dict(text=None, toks=None, lp=None, mask=None, finished=[True] * n)
    if task is not None:
        texts, toks, lp, valid = E.answer(model, tok, [data.understanding_prompt(tok, task)] * n, args.max_text, text_temperature(args), g)
        p.update(text=texts, toks=toks, lp=lp, mask=valid, finished=(toks == tok.eor_id).any(1).tolist())
    if gen_task is None:
        return p
    cut = args.first_sentence and task is not None and gen_task is not task  # mode u draws a new request after the answer
    reasons = [tok.encode(unifybench.first_sentence(x) if cut else x) for x in p["text"]] if task is not None else [[]] * n
    p["gen_prompts"] = [data.generation_prompt(tok, gen_task.concept, gen_task.question, r) for r in reasons]
    p["img"] = E.draw(model, tok, p["gen_prompts"], rl_sampling(args), args.temperature, g, stop=stop)
    return p


def rl_sampling(args):
    return argparse.Namespace(image_mode=args.image_mode, steps=args.steps, cfg=args.rl_cfg, maskgit_sampler=args.maskgit_sampler,
                              kv_reuse=args.kv_reuse)


def text_temperature(args):
    """The temperature of text rollouts and of their log-probs (one value, so the first ratio stays 1);
    above 1 it spreads a group's answers, an exploration knob the embedded default leaves at 1."""
    return args.text_temperature or args.temperature


def image_temperature(args):
    """The temperature of the image log-probs: Show-o's sampler never tempers its logits (its
    temperature scales the Gumbel noise of the choice), so its scorer reads them at 1."""
    return 1.0 if args.maskgit_sampler == "showo" else args.temperature


def rows(p, idx):
    """The rollouts idx of a partial batch (lists and row tensors sliced alike)."""
    out = {}
    for k, v in p.items():
        if isinstance(v, dict):
            out[k] = rows(v, idx)
        elif torch.is_tensor(v) and v.dim() > 0:
            out[k] = v[idx]
        elif isinstance(v, list):
            out[k] = [v[i] for i in idx]
        else:
            out[k] = v
    return out


def cat_rows(parts):
    if not parts:
        return {}
    out = {}
    for k, v in parts[0].items():
        if isinstance(v, dict):
            out[k] = cat_rows([q[k] for q in parts])
        elif torch.is_tensor(v) and v.dim() > 0:
            out[k] = pad_cat([q[k] for q in parts])
        elif isinstance(v, list):
            out[k] = [x for q in parts for x in q[k]]
        else:
            out[k] = v
    return out


def pad_cat(ts):
    """Concatenate rows whose last dim may differ (text lengths), padding with zeros on the right."""
    L = max(t.shape[-1] for t in ts) if ts[0].dim() > 1 else None
    return torch.cat([t if L is None else torch.nn.functional.pad(t, (0, L - t.shape[-1])) for t in ts])


def sample_group(model, tok, task, mix, args, g, dgs_state, world=None):
    """G rollouts of one prompt; with DGS, previews below tau are dropped and resampled (dgs.py).
    A real world brings its own follow-up drawing of mode u and its own preview score."""
    text_task, gen_task = rollout_plan(task, mix, getattr(world, "draw_after_answer", data.draw_after_answer))
    preview_score = getattr(world, "preview_score", rewards.preview_score)
    finish_img = lambda p: dict(p, img=E.draw(model, tok, p["gen_prompts"], rl_sampling(args), args.temperature, g, state=p["img"]))
    if gen_task is None or not args.dgs:
        p = sample_partials(model, tok, text_task, gen_task, args.group, args, g, None)
        return p, text_task, gen_task, None
    preview = args.dgs_preview if args.image_mode == "maskgit" else args.dgs_preview * data.GRID
    start = lambda n: [rows(q, [i]) for q in [sample_partials(model, tok, text_task, gen_task, n, args, g, preview)] for i in range(n)]
    score = lambda ps: preview_score([gen_task] * len(ps), [q["img"]["pred"][0] for q in ps])
    finish = lambda ps: (lambda p: [rows(p, [i]) for i in range(len(ps))])(finish_img(cat_rows(ps)))
    done, stats = dgs.dgs_group(start, score, finish, args.group, args.dgs_cap, dgs_state, args.dgs_batch)
    return cat_rows(done), text_task, gen_task, stats


def recognizer(model, tok):
    """Cycle-consistency judge: the policy's own p("yes") for "is <c> in the image ?" on its drawing."""
    yes, no = tok.encode("yes")[0], tok.encode("no")[0]

    @torch.no_grad()  # on the returned judge: a reward is never differentiated
    def recognize(concepts, codes):
        tasks = [data.Task("recognition", c, data.RECOGNITION.format(tok=c.token), "yes", image=x) for c, x in zip(concepts, codes)]
        ids, valid = M.pad_left([data.understanding_prompt(tok, t) for t in tasks], tok.pad_id, model.lm_head.weight.device)
        lp = M.subset_logprobs(model, model(ids, valid)[:, -1], torch.tensor([yes, no]))
        return lp[:, 0].exp().tolist()
    return recognize


def collect(model, tok, world, args, rank, step, dgs_state):
    """One RL batch: P prompts x G rollouts, their rewards and stored rollout log-probs."""
    dev = model.lm_head.weight.device
    g = torch.Generator(dev).manual_seed(hash((args.seed, rank, step)) % 2**63)  # resume replays the same rollouts
    rng = random.Random(f"{args.seed}/{rank}/{step}")
    if hasattr(world, "sample_tasks"):  # a real folder: its concepts keep their own learned tokens
        tasks = world.sample_tasks(MIXES[args.tasks], args.rollouts // args.group, rng)
    else:
        concepts = data.anonymize(world.train, len(world.concepts), rng)
        # balanced: every step asks the same mix of kinds and variants, so the step's mean reward moves with
        # the policy, not with how many hard prompts the draw happened to pick (4 random prompts of
        # vqa/kgen/gen gave a step-to-step std of 0.08, larger than any gain)
        tasks = data.make_tasks(concepts, MIXES[args.tasks], args.rollouts // args.group, seed=rng.randrange(2**31),
                                balanced=True)
    model.eval()
    t0 = time.time()
    parts, rolls, stats = [], [], []
    for task in tasks:
        p, text_task, gen_task, st = sample_group(model, tok, task, args.tasks, args, g, dgs_state, world)
        parts.append(p)
        stats += [st] if st else []
        for i in range(args.group):
            rolls.append(rewards.Rollout(text_task or gen_task, gen_task, p["text"][i] if p["text"] else None,
                                         p["img"]["codes"][i] if "img" in p else None, p["finished"][i]))
    t1 = time.time()
    weights = {k: getattr(args, "w_" + k) for k in rewards.DEFAULT_WEIGHTS}
    ctx = {"recognize": recognizer(model, tok), "reward_style": args.reward_style,
           **(world.reward_ctx() if hasattr(world, "reward_ctx") else {})}
    r_text, r_img, comps = rewards.ensemble(rolls, weights, ctx)
    batch = cat_rows(parts)
    batch.update(r_text=r_text.view(-1, args.group), r_img=r_img.view(-1, args.group), comps=comps,
                 text_prompts=[data.understanding_prompt(tok, t) for t in tasks for _ in range(args.group)] if parts[0]["toks"] is not None else None,
                 preview=torch.tensor([s["scores"] for s in stats]) if stats else None)
    timing = dict(t_rollout=t1 - t0, t_reward=time.time() - t1)
    if stats:
        timing.update(dgs_attempts=sum(s["attempts"] for s in stats), dgs_above=sum(s["above"] for s in stats))
    return batch, rolls, timing


def diagnostics(batch, rolls, G):
    """Learnability of each reward component on one batch (dgs.learnability), the total reward's share
    of zero-variance groups, and the preview / final-reward correlation when previews were scored."""
    out = {}
    for name, v in batch["comps"].items():
        applies = torch.tensor([rewards.applies(name, r) for r in rolls]).view(-1, G)
        out[name] = dgs.learnability(v.view(-1, G), applies)
    R = batch["r_text"] + batch["r_img"]
    out["total"] = dgs.learnability(R, torch.ones_like(R, dtype=torch.bool), success=float("inf"))
    if batch.get("preview") is not None:
        out["total"]["preview_corr"] = dgs.within_group_corr(batch["preview"].float(), R)
    return out


def diagnostics_table(d):
    """Markdown table of diagnostics(): one row per reward component."""
    lines = ["| reward | groups | mean | pass@1 | pass@G | zero-variance groups |", "|---|---|---|---|---|---|"]
    for name, v in d.items():
        passes = "| — | — |" if name == "total" else f"| {v['pass1']:.3f} | {v['passG']:.3f} |"  # the total has no "full credit"
        lines.append(f"| {name} | {v['groups']} | {v['mean']:.3f} {passes} {v['zero_var']:.2f} |")
    if "preview_corr" in d.get("total", {}):
        lines.append(f"\nDGS preview / final reward, within-prompt correlation: {d['total']['preview_corr']:.3f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- Sync-GRPO: the loss

def ppo_clip(new_lp, old_lp, adv, eps_low, eps_high, log_clamp=0.0):
    """Token-level clipped surrogate (PPO / GRPO): -min(r A, clip(r, 1-eps, 1+eps_high) A), r = pi/pi_old;
    log_clamp > 0 bounds log r to +-log_clamp first (the released code's guard against overflow)."""
    d = new_lp - old_lp
    ratio = torch.exp(d.clamp(-log_clamp, log_clamp) if log_clamp else d)
    return -torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv), ratio


def k3_kl(new_lp, ref_lp):
    """k3 estimator of KL(pi || pi_ref) per token: exp(ref - new) - (ref - new) - 1 (always >= 0)."""
    d = ref_lp - new_lp
    return torch.exp(d) - d - 1


def segment_mean(x, mask):
    """Per-modality aggregation: token mean inside each rollout's segment, then mean over rollouts,
    so a long image segment cannot drown a short text segment."""
    m = mask.float()
    per = (x * m).sum(-1) / m.sum(-1).clamp(min=1)
    has = (m.sum(-1) > 0).float()
    return (per * has).sum() / has.sum().clamp(min=1)


def batch_token_mean(x, mask):
    """DAPO / BNPO aggregation: one token mean over every scored token of the batch (long rollouts weigh more)."""
    m = mask.float()
    return (x * m).sum() / m.sum().clamp(min=1)


def dr_grpo_sum(x, mask):
    """Dr. GRPO aggregation: token sum / (rollouts x segment width); the width stands in for TRL's
    max_completion_length (text: the longest answer of the batch; image: every scored column)."""
    return (x * mask).sum() / (mask.shape[0] * mask.shape[-1])


def rollout_sum(x, mask):
    """The released code's aggregation: token sum per rollout, mean over rollouts."""
    return (x * mask).sum(-1).mean()


def sequence_log_ratio(new_lp, old_lp, mask):
    """GSPO's sequence-level importance ratio, in logs: token mean of log(pi/pi_old) over the segment,
    broadcast to its tokens so the clipped surrogate acts once per segment."""
    m = mask.float()
    return (((new_lp - old_lp) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)).expand_as(new_lp)


AGGREGATIONS = {"grpo": segment_mean, "dapo": batch_token_mean, "bnpo": batch_token_mean, "dr_grpo": dr_grpo_sum,
                "sum": rollout_sum}
FORMULAS = {"advantages": dgs.group_advantages, "ppo_clip": ppo_clip, "k3_kl": k3_kl, "segment_mean": segment_mean,
            **{f"agg_{k}": f for k, f in AGGREGATIONS.items()}, "sequence_log_ratio": sequence_log_ratio}


def compiled(args):
    """The formulas, fused by torch.compile unless --no-compile."""
    return {k: torch.compile(f, dynamic=True) if args.compile else f for k, f in FORMULAS.items()}


def score_batch(trunk, raw, tok, batch, args, steps_sel):
    """Current log-probs and entropies of every sampled token: text (causal) and image (MaskGIT at the
    commit step, or AR), with the sampler's temperature, CFG and vocabulary masks."""
    out = {}
    dev = raw.lm_head.weight.device
    if batch.get("toks") is not None:
        toks, mask = batch["toks"].to(dev), batch["mask"].to(dev)
        h = M.answer_hidden(raw, batch["text_prompts"], toks, mask, tok.pad_id, trunk, args.kv_reuse)
        lp, ent = M.token_logprobs(raw, h, torch.where(mask, toks, -1), ids=tok.text_ids(), temperature=text_temperature(args), chunk=args.chunk)
        out["text"] = (lp, mask, ent)
    if batch.get("img") is not None:
        im, uncond = batch["img"], [data.uncond_prompt(tok)] * len(batch["gen_prompts"])
        if args.image_mode == "ar":
            lp, sel, ent = M.ar_image_logprobs(raw, batch["gen_prompts"], uncond, im["codes"], args.rl_cfg, args.temperature, args.chunk, trunk)
        else:
            lp, sel, ent = M.maskgit_logprobs(raw, batch["gen_prompts"], uncond, im["codes"], im["step_of"], steps_sel,
                                              args.rl_cfg, image_temperature(args), args.chunk, trunk,
                                              args.image_estimator, im["draws"], im["logprobs"], args.kv_reuse, args.step_backward)
        out["image"] = (lp, sel, ent)
    return out


def surprising_steps(img, T, k):
    """The k MaskGIT steps whose committed tokens had the largest total surprisal -log p at sampling.
    A token sampled with p ~ 1 has gradient ~ 0 (d log p / d logits = onehot - p), and MaskGIT commits
    its most confident tokens first, so the early steps carry almost nothing: on a base model, steps
    0-3 of 8 hold <2% of the batch's surprisal and the last two ~70%."""
    if not k or k >= T or img is None or "step_of" not in img:
        return list(range(T))
    sur = torch.zeros(T).index_add_(0, img["step_of"].flatten().cpu(), -img["logprobs"].flatten().float().cpu())
    return sorted(sur.topk(k).indices.tolist())


def rescored_old(raw, tok, batch, args, steps_sel):
    """{"text" / "image": pi_old} where the sampler's stored log-probs do not serve, scored once by the
    rollout policy, without gradient, before the first update. Image estimators other than commit score
    terms the sampler never stored (it keeps one log-prob per token, at its commit step; the released
    code keeps per-step log-probs). --old-lp scorer rescores both segments: under bf16 the KV-cache
    decode and the scorer's full forward round differently (text ratio 1 +- 0.016 at Show-o's shape), so
    with mu > 1 the clip would act on numerics; the scorer's own pass gives ratio 1 at the first update."""
    scorer = args.old_lp == "scorer" or (args.old_lp == "auto" and args.bf16)
    image = scorer or (args.image_estimator != "commit" and args.image_mode == "maskgit")
    part = {**batch, **({} if scorer else {"toks": None}), **({} if image else {"img": None})}
    if part.get("toks") is None and part.get("img") is None:
        return {}
    with torch.no_grad():
        return {k: v[0] for k, v in score_batch(raw, raw, tok, part, args, steps_sel).items()}


def old_logprobs(batch, key):
    return batch["lp"] if key == "text" else batch["img"]["logprobs"]


def advantages(batch, args, F, step):
    """Per-segment advantages {"text": [P*G], "image": [P*G]} under --credit: joint (both segments
    share the whole trajectory's reward), split (each its own modality's reward) or causal (image
    tokens by the image reward, which only they affect; text tokens by the whole reward, since the
    drawing depends on the reasoning). --null-adv shuffles them within groups: same compute, no signal."""
    R_text, R_img = batch["r_text"], batch["r_img"]
    text_R = R_text if args.credit == "split" else R_text + R_img
    img_R = R_img if args.credit in ("split", "causal") else R_text + R_img
    c = int(args.adv_bessel)
    A = {"text": F["advantages"](text_R, args.adv, correction=c), "image": F["advantages"](img_R, args.adv, correction=c)}
    if args.null_adv:
        A = dgs.shuffle_within_groups(A, torch.Generator().manual_seed(random.Random(f"null/{args.seed}/{step}").randrange(2**63)))
    return A


def rl_update(model, raw, ref, tok, batch, opt, sched, args, F, step, ptx=None):
    """mu optimizer updates on one rollout batch (plus the supervised replay batch `ptx` under --ptx);
    returns the logged statistics."""
    A = advantages(batch, args, F, step)
    A_text, A_img = A["text"], A["image"]
    keep = ~dgs.zero_variance_groups(batch["r_text"] + batch["r_img"]) if args.drop_zero_var else None
    adv = {k: v.flatten() for k, v in A.items()}
    steps_sel = surprising_steps(batch.get("img"), args.steps, args.update_steps)
    ref_lp = {}
    if args.beta and ref is not None:  # beta = 0 skips the reference forward entirely
        with torch.no_grad():
            ref_lp = {k: v[0] for k, v in score_batch(ref, ref, tok, batch, args, steps_sel).items()}
    rescored = rescored_old(raw, tok, batch, args, steps_sel)
    stats, pending = {}, {}  # pending: 0-d tensors read back in one host sync at the end
    raw.train()
    for inner in range(args.mu):
        scored = score_batch(model, raw, tok, batch, args, steps_sel)
        loss = 0.0
        for key, (lp, mask, ent) in scored.items():
            old = rescored.get(key, old_logprobs(batch, key)).to(lp.device)
            if keep is not None:
                mask = mask & keep.repeat_interleave(args.group)[:, None].to(mask.device)
            a = adv[key].to(lp.device)[:, None]
            new_in, old_in = (F["sequence_log_ratio"](lp, old, mask), 0.0) if args.ratio_level == "sequence" else (lp, old)
            obj, ratio = F["ppo_clip"](new_in, old_in, a, args.eps, args.eps_high or args.eps, args.log_ratio_clamp)
            kl = F["k3_kl"](lp, ref_lp[key]) if key in ref_lp else torch.zeros_like(lp)
            loss = loss + getattr(args, f"w_{key}_loss") * F[f"agg_{args.loss_agg}"](obj + args.beta * kl, mask)
            with torch.no_grad():
                r = ratio[mask]
                if not r.numel():  # the sampled MaskGIT steps committed no token (few image tokens, many steps)
                    continue
                s = {f"{key}_ratio_mean": r.mean(), f"{key}_ratio_min": r.min(), f"{key}_ratio_max": r.max(),
                     f"{key}_clip_frac": ((r < 1 - args.eps) | (r > 1 + (args.eps_high or args.eps))).float().mean(),
                     f"{key}_kl": batch_token_mean(kl, mask), f"{key}_entropy": batch_token_mean(ent, mask),
                     f"{key}_pg_var": (a * lp.detach() * mask).sum(-1).var()}  # spread of per-rollout PG terms
                if inner == 0:  # on-policy: pi == pi_old up to float noise, so this must be ~0
                    s[f"{key}_ratio_dev_first"] = (r - 1).abs().max()
                pending.update({k: v.float() for k, v in s.items()})
        if ptx is not None:  # PPO-ptx: the pretraining loss anchors what RL does not ask against its drift
            l_ptx = pretrain_loss(model, raw, tok, ptx)[0]
            loss = loss + args.ptx * l_ptx
            pending["ptx_loss"] = l_ptx.detach().float()
        loss.backward()
        stats.update(grad_norm=clip_and_step(raw, opt, sched, args))
        pending["loss"] = loss.detach().float()
    pending.update(adv_text_mean=A_text.mean(), adv_text_std=A_text.std(), adv_image_mean=A_img.mean(), adv_image_std=A_img.std())
    stats.update(zip(pending, torch.stack([v.to(pending["loss"].device) for v in pending.values()]).tolist()))
    stats.update(effective_groups=dgs.effective_fraction(batch["r_text"] + batch["r_img"]))
    return stats


def has_ckpt(path):
    try:
        resolve_ckpt(path)
        return True
    except BadInput:
        return False


def embedded_base(args, rank, world_size, device):
    """(world, tokenizer, policy, reference or None, the base's evaluation if pretrained just now) of the
    embedded world, pretraining the base if missing."""
    base = {"committed": COMMITTED_BASE, "pretrain": os.path.join(args.out_dir, "pretrain")}.get(args.base, args.base)
    base_eval = None
    if not has_ckpt(base):
        if args.base != "pretrain":
            resolve_ckpt(base)  # raises, naming the missing path
        pretrain(args, rank, world_size, device)  # embedded default: make the base once, then reuse it
        if world_size > 1:
            dist.barrier()
        if rank == 0:  # pretraining has just evaluated this very base with these flags: not again
            with open(os.path.join(base, "eval.json")) as f:
                base_eval = json.load(f)
    world, tok = world_and_tokenizer(args, rank if base_eval is None else None)  # None: pretraining said it
    policy, meta, _ = load_checkpoint(base, device)
    say(rank, f"base: {resolve_ckpt(base)} (pretrained {meta['step']} steps)")
    ref = load_checkpoint(base, device)[0].requires_grad_(False).eval() if args.beta else None
    return world, tok, policy, ref, base_eval


def amp(args, device):
    """bf16 autocast under --bf16 (weights and optimizer state stay fp32), else nothing."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()


def rl_optimizer(policy, args):
    """AdamW + warm-up/cosine with the RL learning rate, over rl_iters x mu optimizer updates."""
    return make_optimizer(policy, argparse.Namespace(**{**vars(args), "lr": args.rl_lr, "warmup": args.rl_warmup}),
                          args.rl_iters * args.mu)


def rl(args, rank=0, world_size=1, device="cpu"):
    """Sync-GRPO: held-out eval of the base, args.rl_iters RL steps, held-out eval again (embedded world;
    a real UnifyBench folder logs its reward components only)."""
    base_eval = None
    if args.showo_dir:
        world, tok, policy, ref = showo.setup(args, device, say=print if rank == 0 else lambda *a: None)
    else:
        world, tok, policy, ref, base_eval = embedded_base(args, rank, world_size, device)
    args.image_mode = "ar" if policy.cfg.image_causal else "maskgit"
    opt, sched = rl_optimizer(policy, args)
    dgs_state, step, before = dgs.DGSState(target=args.dgs_target), 0, None
    run_dir = os.path.join(args.out_dir, "rl")
    os.makedirs(run_dir, exist_ok=True)
    held_out = None if args.showo_dir else from_files(data.load_tasks, args.data_dir, "test")  # metrics need the exact world
    if args.resume:
        step, state = restore(run_dir, policy, opt, sched)
        dgs_state = dgs.DGSState.from_dict(state["dgs"])
        set_rng_state(state["rng"])
        before = state["before"]
    if rank == 0 and before is None and args.eval_base and held_out:
        before = base_eval
        if before is None:
            say(rank, f"evaluating the base on {len(held_out)} held-out tasks")
            before = held_out_eval(policy, tok, world, held_out, args)
    model = DDP(policy) if world_size > 1 else policy
    F = compiled(args)
    log = JsonLog(os.path.join(run_dir, "metrics.jsonl"), rank == 0, step)
    say(rank, f"Sync-GRPO: {args.rl_iters} steps{f' from step {step}' if step else ''} of {args.rollouts} rollouts "
              f"in groups of {args.group} -> {run_dir}")
    if args.compile:
        say(rank, "the first step also compiles the loss formulas (torch.compile; --no-compile skips it)")
    if rank == 0 and step == 0 and args.diag_prompts:
        with amp(args, device):
            diag = base_diagnostics(policy, tok, world, args)
        print(f"Learnability of the RL task mix for the base ({args.diag_prompts} prompts x G {args.group}, "
              "training concepts):\n" + diagnostics_table(diag))
        atomic_write(os.path.join(run_dir, "diagnostics.json"), json.dumps(diag, indent=1).encode())
    bar = tqdm(total=args.rl_iters, initial=step, disable=rank != 0, desc="sync-grpo")
    end = min(args.rl_iters, step + args.stop_after) if args.stop_after else args.rl_iters
    while step < end:
        with amp(args, device):
            batch, rolls, row = collect(policy, tok, world, args, rank, step, dgs_state)
        if "dgs_attempts" in row:  # DGS: tau moves once per batch, by the acceptance rate of the global batch
            att, above = all_sum([row.pop("dgs_attempts"), row.pop("dgs_above")], device)
            row.update(dgs_rho=above / att, dgs_attempts_per_rollout=att / (world_size * args.rollouts), dgs_tau=dgs_state.tau)
            (dgs.update_tau_released if args.dgs_tau_rule == "released" else dgs.update_tau)(dgs_state, above / att)
        for name, d in diagnostics(batch, rolls, args.group).items():
            row.update({f"r_{name}_{k}": v for k, v in d.items() if k != "groups"})
        t = time.time()
        ptx = pretrain_batch(world, tok, random.Random(f"ptx/{args.seed}/{rank}/{step}"), args.ptx_batch, args, device) if args.ptx else None
        with amp(args, device):
            row.update(rl_update(model, policy, ref, tok, batch, opt, sched, args, F, step, ptx))
        row["t_update"] = time.time() - t
        step += 1
        for name, v in batch["comps"].items():
            row[f"r_{name}"], row[f"r_{name}_std"] = v.mean().item(), v.std().item()
        R = batch["r_text"] + batch["r_img"]
        row.update(step=step, reward=R.mean().item(), reward_std=R.std().item(), lr=sched.get_last_lr()[0],
                   rollout_share=row["t_rollout"] / (row["t_rollout"] + row["t_reward"] + row["t_update"]))
        log(row)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.3f}")
        if rank == 0 and (step % args.sample_every == 0 or step == args.rl_iters):
            save_rollouts(os.path.join(run_dir, f"rollouts_{step:06d}.png"), rolls, R.flatten().tolist(), args.group,
                          getattr(world, "codec", data.WorldCodec()))
        if rank == 0 and (step % args.ckpt_every == 0 or step == end):
            save_checkpoint(run_dir, step, policy, dict(stage="rl", args=vars(args)),
                            dict(opt=opt.state_dict(), sched=sched.state_dict(), dgs=dgs_state.state_dict(),
                                 rng=rng_state(), step=step, before=before), args.keep)
    bar.close()
    if rank == 0 and step == args.rl_iters:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            by_step = {r["step"]: r for r in map(json.loads, f)}  # a resumed run's replayed steps: the last wins
        plot_rewards(os.path.join(run_dir, "reward_vs_step.png"), [by_step[k] for k in sorted(by_step)])
        rise = E.reward_rise([by_step[k]["reward"] for k in sorted(by_step)])
        if len(by_step) >= 10:
            say(rank, f"training reward: last 5 steps - first 5 = {rise['rise']:+.3f}, {rise['ratio']:.1f}x the residual "
                      f"step-to-step std ({rise['residual_std']:.3f})")
    if rank == 0 and step == args.rl_iters and held_out:
        say(rank, f"evaluating the RL model on {len(held_out)} held-out tasks")
        after = held_out_eval(policy, tok, world, held_out, args)
        title = f"held-out concepts of {args.data_dir}: {'the base, ' if before else ''}after {step} Sync-GRPO steps"
        print("\n" + (E.gain_table(before, after, title + ", and the paired gain") if before else E.table({"sync-grpo": after}, title)))
        cols = ({"base": before} if before else {}) | {"sync-grpo": after}
        atomic_write(os.path.join(run_dir, "eval.json"), json.dumps(cols, indent=1).encode())
    elif step < args.rl_iters:
        say(rank, f"stopped after step {step} of {args.rl_iters}; --resume continues")
    say(rank, outputs(run_dir))
    return policy


def all_sum(values, device):
    """Sum of a few numbers over all ranks (themselves when not distributed)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def held_out_eval(policy, tok, world, held_out, args):
    """UnifyBench-style held-out metrics (eval.evaluate) plus the held-out mean reward: the RL objective
    itself on --eval-reward-prompts prompts of the run's task mix about held-out concepts, G rollouts
    each, DGS off, from fixed seeds (the same for the base and the trained model: paired)."""
    t0 = time.time()
    res = E.evaluate(policy, tok, held_out, args)
    if args.eval_reward_prompts:
        hargs = argparse.Namespace(**{**vars(args), "rollouts": args.eval_reward_prompts * args.group, "dgs": 0})
        batch, _, _ = collect(policy, tok, data.World(world.test, [], world.seed), hargs, 0, -2, None)
        per_prompt = (batch["r_text"] + batch["r_img"]).mean(1).tolist()
        res["reward"], res["se"]["reward"], res["items"]["reward"] = E.mean(per_prompt), E.stderr(per_prompt), per_prompt
    res["seconds"] = round(time.time() - t0, 1)
    return res


def base_diagnostics(policy, tok, world, args):
    """Learnability of the RL task mix for the model as it is: --diag-prompts prompts x G rollouts on
    training concepts, every drawing previewed and kept (tau = -inf), so the preview / final-reward
    correlation is measured on unfiltered rollouts."""
    n = args.diag_prompts * args.group
    dargs = argparse.Namespace(**{**vars(args), "rollouts": n, "dgs": 1, "dgs_cap": args.group, "dgs_batch": args.group})
    batch, rolls, _ = collect(policy, tok, world, dargs, 0, -1, dgs.DGSState(tau=-math.inf))
    return diagnostics(batch, rolls, args.group)


def save_rollouts(path, rolls, R, G, codec, n_groups=4):
    """PNG grid of the first 4 rollouts of a few groups: the target (what was asked, drawn exactly) on the
    left of each drawing, the request, the reasoning and the rollout's reward underneath."""
    picked = [i for i in range(len(rolls)) if i % G < 4][:4 * n_groups]
    blank = torch.zeros(codec.grid ** 2, dtype=torch.long)  # no drawing: all code 0
    images = []
    for i in picked:
        r = rolls[i]
        drawn = codec.decode([r.codes if r.codes is not None else blank])[0]
        target = r.gen.target if r.gen is not None and r.gen.target is not None else None
        pair = Image.new("RGB", (2 * drawn.width + 2, drawn.height), "white")
        if target is not None:
            pair.paste(codec.decode([target])[0], (0, 0))
        pair.paste(drawn, (drawn.width + 2, 0))
        images.append(pair)
    captions = [f"R {R[i]:.2f} | {rolls[i].task.question} | {rolls[i].text or ''}" for i in picked]
    data.save_grid(path, images, captions, cols=4)


def plot_rewards(path, rows):
    """reward_vs_step.png: the training reward and each of its components, per RL step."""
    names = ["reward"] + [f"r_{n}" for n in rewards.DEFAULT_WEIGHTS if f"r_{n}" in rows[0]]
    steps = [r["step"] for r in rows]
    E.plot(path, {n: (steps, [r[n] for r in rows]) for n in names}, "RL step", "training reward (components unweighted)")


def run_eval(args):
    """Held-out metrics of a checkpoint, written next to it as eval_<world folder>-seed<S>.json: results
    on another world get another file, and a file holding another world's results is never overwritten.
    With --showo-dir: run_showo_eval."""
    if args.showo_dir:
        return run_showo_eval(args)
    model, meta, _ = load_checkpoint(args.ckpt)
    for k in ("cfg", "steps"):  # sample as the checkpoint was trained
        setattr(args, k, meta.get("args", {}).get(k, getattr(args, k)))
    args.image_mode = "ar" if model.cfg.image_causal else "maskgit"
    world, tok = world_and_tokenizer(args)
    if tok.vocab_size != model.cfg.vocab_size:
        raise BadInput(f"{args.data_dir}: its world needs a vocabulary of {tok.vocab_size} ids but the checkpoint "
                       f"{args.ckpt} has {model.cfg.vocab_size}; use the same --n-train-concepts/--n-test-concepts")
    where = dict(data_dir=os.path.abspath(args.data_dir), seed=world.seed, train_concepts=len(world.train),
                 test_concepts=len(world.test))
    out = os.path.join(resolve_ckpt(args.ckpt), f"eval_{os.path.basename(where['data_dir'])}-seed{world.seed}.json")
    check_eval_file(out, where)
    held_out = from_files(data.load_tasks, args.data_dir, "test")
    say(0, f"evaluating {resolve_ckpt(args.ckpt)} on {len(held_out)} held-out tasks")
    res = held_out_eval(model, tok, world, held_out, args)
    write_eval(out, where, resolve_ckpt(args.ckpt), res, f"held-out concepts of {args.data_dir} (seed {world.seed})")
    return res


def check_eval_file(out, where):
    """A results file of another world (or folder) is never overwritten."""
    if os.path.isfile(out):
        with open(out) as f:
            old = json.load(f).get("world")
        if old != where:
            raise BadInput(f"{out}: holds the results of another world ({old}); move it away to evaluate {where}")


def write_eval(out, where, checkpoint, res, title, order=None):
    """The results table on the console, and {world, checkpoint, metrics} as JSON at `out`."""
    print("\n" + E.table({os.path.basename(os.path.normpath(checkpoint)): res}, title, order))
    atomic_write(out, json.dumps(dict(world=where, checkpoint=checkpoint, metrics=res), indent=1).encode())
    say(0, f"wrote {out}")


def run_showo_eval(args):
    """UnifyBench metrics of Show-o on a real folder's test split (unifybench.evaluate): the --showo-dir
    model with fresh concept tokens, or an RL run of it (--ckpt, sampled as it was trained). Written as
    eval_<folder>.json next to the checkpoint, or into <out-dir>/eval without one."""
    path, meta, weights, _ = read_checkpoint(args.ckpt, load_state=False) if args.ckpt else (None, {}, None, None)
    for k in ("cfg", "steps", "maskgit_sampler", "max_text", "concept_tokens"):  # its sampling and its vocabulary
        setattr(args, k, meta.get("args", {}).get(k, getattr(args, k)))
    # no frozen reference copy; the metrics say themselves which scorers are missing
    eargs = argparse.Namespace(**{**vars(args), "beta": 0.0, "dgs": 0, "concept_rows_only": False,
                                  **{f"w_{k}": 0.0 for k in rewards.REAL_ONLY}})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    world, tok, policy, _ = from_files(showo.setup, eargs, device)
    if weights is not None:
        load_weights(policy, weights, path)
    args.image_mode = "ar" if policy.cfg.image_causal else "maskgit"
    where = dict(data_dir=os.path.abspath(args.data_dir), concepts=[c.name for c in world.concepts])
    folder = path or os.path.join(args.out_dir, "eval")
    out = os.path.join(folder, f"eval_{os.path.basename(where['data_dir'])}.json")
    check_eval_file(out, where)
    tasks = world.test_tasks
    if not tasks:
        raise BadInput(f"{args.data_dir}: no test tasks (concept/test/<name>/vqa.json, text_only.json, t2i_conditions.json)")
    skipped = unifybench.skipped(world, tasks)
    if skipped:
        say(0, "skipped: " + ", ".join(f"{m} ({why})" for m, why in skipped.items()))
    checkpoint = path or os.path.abspath(args.showo_dir)
    say(0, f"evaluating {checkpoint} on {len(tasks)} test tasks (CFG {args.cfg}, {args.steps} MaskGIT steps, "
           f"{args.eval_draws} drawings per request)")
    t0 = time.time()
    with amp(args, device):
        res = unifybench.evaluate(policy, tok, world, tasks, args)
    res.update(seconds=round(time.time() - t0, 1), skipped=skipped)
    os.makedirs(folder, exist_ok=True)
    write_eval(out, where, checkpoint, res, f"test split of {args.data_dir}", unifybench.METRICS)
    return res


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stage == "eval":
        if not args.ckpt and not args.showo_dir:
            raise SystemExit("--stage eval needs --ckpt PATH (a checkpoint folder or run folder) or --showo-dir")
        return run_eval(args)
    rank, world_size, device = setup_dist()
    try:
        return (pretrain if args.stage == "pretrain" else rl)(args, rank, world_size, device)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except BadInput as e:  # a bad file or folder: its message says which and what was expected
        sys.exit(f"error: {e}")
