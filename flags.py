"""
Every flag of train.py, with its unit or choices (`python train.py --help`), and the checks that stop a
bad value before any work, naming the flag. No entry point: train.py calls get_args().
"""
import argparse
import os
import sys

import dgs
import rewards
import sampling as S
import showo
from ckpt import has_ckpt
from loss import AGGREGATIONS
from rollouts import MIXES


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
    a("--maskgit-steps", dest="steps", type=int, default=8, help="MaskGIT sampling steps T (int)")
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
    a("--image-estimator", default="commit", choices=list(S.ESTIMATORS),
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
           "so peak memory holds one step's activations whatever --update-steps; costs one more image forward "
           "(on top of --grad-ckpt with --image-estimator all it raised peak memory at 1.3B: README, Performance)")
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
    flag = {a.dest: a.option_strings[0] for a in p._actions if a.option_strings}
    for k in ("iters", "batch", "steps", "n_layer", "n_embd", "n_head", "eval_batch", "max_text", "rl_iters",
              "rollouts", "group", "mu", "ptx_batch"):
        if getattr(args, k) <= 0:
            p.error(f"{flag[k]} must be positive, got {getattr(args, k)}")
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
            p.error(f"{flag[k]} must be positive, got {getattr(args, k)}")
    for k in ("lr", "rl_lr", "warmup", "rl_warmup", "weight_decay", "grad_clip", "eps", "eps_high", "beta",
              "w_text_loss", "w_image_loss", "eval_temperature", "text_temperature", "stop_after", "update_steps", "chunk", "dgs_preview",
              "concept_tokens", "threads", "ptx"):
        if getattr(args, k) < 0:
            p.error(f"{flag[k]} must be 0 or more, got {getattr(args, k)}")
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
        warn(f"{flag[lr]} 0: the optimizer steps leave the weights unchanged")


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr, flush=True)
