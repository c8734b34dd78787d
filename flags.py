"""
Every flag of train.py in named groups, with its unit or choices (`python train.py --help`), `--preset
showo`, and the checks that stop a bad value before any work, naming the flag. No entry point: train.py
calls get_args(). Parsing reads nothing of the Show-o path.
"""
import argparse
import math
import os
import sys

import rewards
from ckpt import has_ckpt

# --tasks: the task kinds each rollout mix asks. Mode u asks every understanding question of the benchmark:
# trained on VQA alone, RL moved the shared yes/no answer and recognition fell from 0.85 to 0.51. A plain
# placement request has a reasoning the model copies from the request, right in every rollout (a zero-
# variance text group), so mode r asks knowledge requests; plain requests stay in evaluation and `gen`.
MIXES = {"both": ["recognition", "vqa", "textqa", "kgen"], "u": ["recognition", "vqa", "textqa"], "r": ["kgen"],
         "und": ["recognition", "vqa", "textqa"], "gen": ["kgen", "gen"]}
EMBEDDED_REWARDS = "text_bleu=0.35,identity=0.26,alignment=0.13,knowledge=0.13"
# The paper's Show-o run, for the flags not given: G 9, CFG 5, T 50, lr 1e-6, DGS preview at step 10, and the
# released loss (every position at every scored step, token sums, R - group mean) and reward mix
# R = 0.65 (0.4 CLIP-I + 0.6 judge) + 0.35 BLEU; kept from nanosync: the text policy gradient, mu = 2.
PRESETS = {"showo": dict(group=9, rollouts=9, rl_cfg=5.0, cfg=5.0, steps=50, rl_lr=1e-6, beta=0.01, eps=0.2, dgs=True,
                         credit="joint", dgs_preview=10, max_text=64, chunk=2048, update_steps=2, bf16=True, grad_ckpt=True,
                         maskgit_sampler="showo", image_estimator="all", loss_agg="sum", adv="nostd",
                         reward_style="released", dgs_tau_rule="released", ptx=0.0, rewards="text_bleu=0.35,clip_i=0.26,judge=0.39")}


def add_run_and_model_flags(p):
    g = p.add_argument_group("run").add_argument
    g("--stage", default="rl", choices=["rl", "pretrain", "eval"], help="rl = Sync-GRPO from --ckpt; pretrain = the "
      "base on the embedded world; eval = held-out metrics of --ckpt")
    g("--data-dir", default="out/world", help="UnifyBench-layout folder; the embedded world is written here if empty "
      "(with --showo-dir: a real UnifyBench folder, only read)")
    g("--world-seed", type=int, default=1234, help="seed of the embedded world (int)")
    g("--n-train-concepts", type=int, default=150, help="concepts seen in training (int)")
    g("--n-test-concepts", type=int, default=24, help="held-out concepts, never trained on (int)")
    g("--out-dir", default="out", help="root folder of run outputs: <out-dir>/<stage>/")
    g("--ckpt", default="committed", help="the checkpoint RL starts from and --stage eval evaluates: committed = base/ "
      "in the repository (what --stage pretrain makes with its defaults), pretrain = <out-dir>/pretrain (RL pretrains "
      "it first if missing), or a checkpoint folder (step_XXXXXX) or run folder (with a `latest` file)")
    g("--seed", type=int, default=0, help="training seed (int)")
    g("--resume", action=argparse.BooleanOptionalAction, default=False, help="continue from <out-dir>/<stage>/latest")
    g("--stop-after", type=int, default=0, help="RL: checkpoint and exit after this many steps of this run (0 = run "
      "to the end; --resume continues on the same schedule)")
    g("--ckpt-every", type=int, default=250, help="steps between checkpoints (int; one at the end always)")
    g = p.add_argument_group("model and sampling").add_argument
    g("--n-layer", type=int, default=4, help="transformer blocks (int)")
    g("--n-embd", type=int, default=128, help="width (int, a multiple of 32: one attention head per 32)")
    g("--image-mode", default="maskgit", choices=["maskgit", "ar"], help="how a new model draws: Show-o MaskGIT or "
      "Janus-style AR (RL and evaluation draw as the checkpoint was trained)")
    g("--maskgit-steps", dest="steps", type=int, default=8, help="MaskGIT sampling steps T (int)")
    g("--cfg", type=float, default=1.0, help="classifier-free guidance weight w of evaluation: (1+w) cond - w uncond")
    g("--maskgit-sampler", default="plain", choices=["plain", "showo"],
      help="plain = tempered logits, confidence log p, float64 cosine counts; showo = Show-o's t2i_generate step "
           "(untempered logits, log p + Gumbel at a compounding temperature from --temperature, its float32 counts)")
    g("--temperature", type=float, default=1.0, help="rollout temperature of text and images, also the scorer's (> 0)")
    g = p.add_argument_group("pretraining").add_argument
    g("--iters", type=int, default=3000, help="optimizer steps (int); the committed base/ used 3000")
    g("--batch", type=int, default=32, help="examples per optimizer step per rank (int)")
    g("--lr", type=float, default=2e-3, help="peak learning rate (50 warm-up steps, cosine to 10%%)")


def add_rl_flags(p):
    g = p.add_argument_group("Sync-GRPO").add_argument
    g("--tasks", default="both", choices=list(MIXES), help="rollout mix: both (modes u and r), u, r, und (text only), "
      "gen (image only)")
    g("--rl-iters", type=int, default=200, help="RL steps, one rollout batch each (int)")
    g("--rollouts", type=int, default=80, help="rollouts per RL step per rank (int, a multiple of --group)")
    g("--group", type=int, default=8, help="G: rollouts of the same prompt per group (int, >= 2)")
    g("--mu", type=int, default=2, help="optimizer updates per rollout batch (int); >1 makes the PPO ratio move")
    g("--rl-lr", type=float, default=1e-4, help="RL peak learning rate (5 warm-up updates, cosine to 10%%)")
    g("--eps", type=float, default=0.2, help="clip epsilon of the PPO ratio, both sides")
    g("--beta", type=float, default=0.01, help="k3 KL weight to the frozen base (0 = no reference forward)")
    g("--adv", default="batchstd", choices=["std", "nostd", "batchstd", "gdpo"],
      help="advantage scaling: std (GRPO: group std), nostd (Dr. GRPO), batchstd (batch std, TRL's scale_rewards=batch), "
           "gdpo (each reward component normalized in its group before the weighted sum, then the batch std)")
    g("--credit", default="causal", choices=["joint", "split", "causal"],
      help="which reward each segment's advantage comes from: joint (both: text+image reward), split (text: text reward, "
           "image: image reward), causal (text: text+image reward, image: image reward)")
    g("--ptx", type=float, default=None, help="weight of a supervised replay term (InstructGPT's PPO-ptx) on 16 fresh "
      "pretraining examples per update; default 0.3 on the embedded world, 0 with --showo-dir (nothing to replay)")
    g("--null-adv", action=argparse.BooleanOptionalAction, default=False,
      help="null run: shuffle advantages within each group (same compute, no learning signal)")
    g("--rl-cfg", type=float, default=0.0, help="CFG weight of RL rollouts and of the loss (0 = no CFG in either)")
    g("--update-steps", type=int, default=2, help="MaskGIT steps scored per update: the k of T whose committed "
      "tokens were least certain (0 = all T)")
    g = p.add_argument_group("Dynamic Group Scaling").add_argument
    g("--dgs", action=argparse.BooleanOptionalAction, default=False,
      help="preview each drawing, resample the ones below tau (off: on this world the preview does not predict the reward)")
    g("--dgs-preview", type=int, default=2, help="preview after this MaskGIT step (AR: image rows) (int)")
    g("--dgs-tau-rule", default="bounded", choices=["bounded", "released"],
      help="bounded = toward the proposed tau by at most 0.005 per batch; released = exactly +-0.005 or not at all")
    g = p.add_argument_group("rewards").add_argument
    g("--rewards", default=None, help="ensemble weights, name=weight,... (unlisted = 0); names: "
      f"{', '.join(rewards.DEFAULT_WEIGHTS)}; default {EMBEDDED_REWARDS} (with --showo-dir: text_bleu=0.35)")
    g("--reward-style", default="raw", choices=["raw", "released"],
      help="released (Show-o path): NLTK-method1 char-BLEU on raw text, mode r's normalised BLEU over all facts, "
           "CLIP-I thresholded at 0.5 and re-centred to 0.8, judge re-centred to 0.8")
    g = p.add_argument_group("variants of other implementations").add_argument
    g("--image-estimator", default="commit", choices=["commit", "commit-remask", "masked", "all"],
      help="MaskGIT log-prob terms per scored step: commit (token at its commit step), commit-remask (Mask-GRPO: plus "
           "re-masked mass), masked (every masked position), all (every position: the released code)")
    g("--loss-agg", default="grpo", choices=["grpo", "dapo", "bnpo", "dr_grpo", "sum"],
      help="token aggregation per modality: grpo (token mean per rollout, then mean), dapo/bnpo (token mean over the "
           "batch), dr_grpo (token sum / (rollouts x segment width)), sum (token sum, mean over rollouts: the released code)")


def add_evaluation_and_showo_flags(p):
    g = p.add_argument_group("evaluation").add_argument
    g("--eval-dir", default=None, help="folder of --stage eval's results file (default: beside the checkpoint; "
      "with --showo-dir and no --ckpt: <out-dir>/eval)")
    g("--eval-draws", type=int, default=4, help="drawings per held-out request and temperature-1 answers per question (int)")
    g("--eval-reward-prompts", type=int, default=24, help="held-out prompts (x G rollouts) of the held-out mean "
      "reward, the RL objective (0 = skip)")
    g("--max-text", type=int, default=12, help="max new text tokens per answer (int)")
    g("--diag-prompts", type=int, default=16, help="prompts (x G rollouts) of the base's learnability diagnostics "
      "before RL (0 = skip)")
    g = p.add_argument_group("performance").add_argument
    g("--chunk", type=int, default=0, help="rows per log-prob chunk (0 = one chunk; >0 never holds all logits)")
    g("--compile", action=argparse.BooleanOptionalAction, default=True, help="fuse the loss formulas with torch.compile")
    g("--bf16", action=argparse.BooleanOptionalAction, default=False, help="bf16 autocast for rollouts and updates "
      "(weights and optimizer state stay fp32; pi_old then comes from one scoring pass, so the first ratio is 1)")
    g("--grad-ckpt", action=argparse.BooleanOptionalAction, default=False,
      help="gradient checkpointing: recompute each block's activations in backward")
    g = p.add_argument_group("Show-o (every part from a local folder)").add_argument
    g("--preset", default="none", choices=["none", "showo"], help="showo = the paper's Show-o run (flags.PRESETS), "
      "for the flags not given")
    g("--showo-dir", default=None, help="RL on Show-o: local checkpoint folder (config.json + *.safetensors or pytorch_model.bin)")
    g("--magvit-dir", default=None, help="local MAGVIT-v2 folder (Show-o's magvitv2 weights, optional config.json)")
    g("--tokenizer-dir", default=None, help="local Phi-1.5 folder (microsoft/phi-1_5): tokenizer files, config.json")
    g("--clip-dir", default=None, help="local transformers CLIP folder: clip_i / clip_t rewards and the DGS preview score")
    g("--dino-dir", default=None, help="local transformers DINO folder (AutoModel + image processor): dino reward")
    g("--judge", default=None, help="judge reward: module:function, f(rollouts, ctx) -> list[float] in [0, 1]")
    g("--concept-tokens", type=int, default=16, help="learned concept tokens per concept besides its identifier (int)")
    g("--concept-rows-only", action=argparse.BooleanOptionalAction, default=False,
      help="train only the concept tokens' embedding and lm_head rows")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_and_model_flags(p)
    add_rl_flags(p)
    add_evaluation_and_showo_flags(p)
    args = p.parse_args(argv)
    given = given_flags(p, argv)
    for k, v in PRESETS.get(args.preset, {}).items():
        if k not in given:
            setattr(args, k, v)
    if args.ptx is None:  # the one default that depends on the world
        args.ptx = 0.0 if args.showo_dir else 0.3
    args.rewards = parse_rewards(p, args.rewards or ("text_bleu=0.35" if args.showo_dir else EMBEDDED_REWARDS))
    check_args(p, args)
    return args


def given_flags(p, argv):
    """The dests the command line set (a second parse in which no flag has a default)."""
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return vars(p.parse_args(argv))


def parse_rewards(p, spec):
    """"name=weight,..." -> {every reward name: weight}, unlisted names 0."""
    weights = dict.fromkeys(rewards.DEFAULT_WEIGHTS, 0.0)
    for item in filter(None, spec.split(",")):
        name, _, w = item.partition("=")
        if name.strip() not in weights:
            p.error(f"--rewards: unknown reward {name.strip()!r}; names: {', '.join(weights)}")
        try:
            weights[name.strip()] = float(w)
        except ValueError:
            p.error(f"--rewards: expected name=weight, got {item!r}")
        if not math.isfinite(weights[name.strip()]) or weights[name.strip()] < 0:
            p.error(f"--rewards: the weight of {name.strip()} must be finite and 0 or more, got {w}")
    return weights


def check_args(p, args):
    """Every number flag's bounds, checked before any work: a bad value stops with p.error naming the flag;
    a legal value that makes the run learn nothing gets a warning."""
    flag = {a.dest: a.option_strings[0] for a in p._actions if a.option_strings}
    for k in ("iters", "batch", "steps", "n_layer", "n_embd", "max_text", "rl_iters", "rollouts", "group", "mu",
              "ckpt_every", "n_train_concepts", "n_test_concepts", "eval_draws", "temperature"):
        if not getattr(args, k) > 0:  # `not > 0` also refuses NaN
            p.error(f"{flag[k]} must be positive, got {getattr(args, k)}")
    for k in ("lr", "rl_lr", "eps", "beta", "cfg", "rl_cfg", "ptx", "stop_after", "update_steps", "chunk", "dgs_preview",
              "concept_tokens", "eval_reward_prompts", "diag_prompts"):
        v = getattr(args, k)
        if not (v >= 0 and math.isfinite(v)):
            p.error(f"{flag[k]} must be a finite number, 0 or more; got {v}")
    if not math.isfinite(args.temperature):
        p.error(f"--temperature must be finite, got {args.temperature}")
    if args.rollouts % args.group:
        p.error(f"--rollouts ({args.rollouts}) must be a multiple of --group ({args.group}): "
                "each group is G rollouts of one prompt")
    if args.group < 2:
        p.error(f"--group must be at least 2, got {args.group}: an advantage is a reward minus its group's mean, "
                "so a group of one rollout has none")
    if args.n_test_concepts < 2:
        p.error(f"--n-test-concepts must be at least 2, got {args.n_test_concepts}: each held-out concept's friend "
                "needs an identifier of another held-out concept")
    if not args.eps < 1:
        p.error(f"--eps is the clip range of the ratio, in [0, 1); got {args.eps}")
    if args.n_embd % 32:
        p.error(f"--n-embd must be a multiple of 32 (one attention head per 32 dims), got {args.n_embd}")
    if args.preset == "showo" and not args.showo_dir:  # before the checks of the preset's own values
        p.error("--preset showo needs --showo-dir (and --magvit-dir, --tokenizer-dir, --data-dir)")
    if args.reward_style == "released" and not args.showo_dir:
        p.error("--reward-style released needs --showo-dir: its mode-r rule reads a UnifyBench concept's extra_info facts")
    if args.ptx and args.showo_dir:
        p.error("--ptx replays the embedded world's pretraining mix; with --showo-dir there is none (use --ptx 0)")
    if args.showo_dir:
        world_only = [k for k in rewards.WORLD_ONLY if args.rewards[k]]
        if world_only:
            p.error(f"--rewards {', '.join(world_only)}: exact checks of the embedded world; a real model uses "
                    "clip_i, clip_t, dino, judge")
        if args.ckpt != "committed" and args.stage == "rl":
            p.error(f"--ckpt {args.ckpt}: RL on Show-o starts from --showo-dir (with fresh concept tokens); "
                    "--ckpt names an RL run of it only for --stage eval")
    if args.resume and args.stage != "eval" and not has_ckpt(os.path.join(args.out_dir, args.stage)):
        p.error(f"--resume: no checkpoint in {os.path.join(args.out_dir, args.stage)} (no `latest` file); "
                "run without --resume to start this stage afresh")
    lr = {"pretrain": "lr", "rl": "rl_lr"}.get(args.stage)
    if lr and getattr(args, lr) == 0:
        warn(f"{flag[lr]} 0: the optimizer steps leave the weights unchanged")


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr, flush=True)
