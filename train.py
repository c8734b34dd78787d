"""
Sync-GRPO, one RL step in one file: collect (rollouts and rewards), advantages, the loss, the update with
its optimizer step, the log. Also the entry point of every stage.

  python train.py                                       # the main job: Sync-GRPO from the committed base/ (~12 min, 2 CPU cores)
  python train.py --stage pretrain                      # the base on the embedded world (CPU, ~25 min)
  python train.py --stage eval --ckpt out/rl            # held-out metrics of a checkpoint
  torchrun --nproc_per_node=2 train.py                  # DDP: gloo on CPU, NCCL on CUDA
  python train.py --preset showo --showo-dir ... --magvit-dir ... --tokenizer-dir ... --data-dir ...  # Show-o 1.3B

Where Sync-GRPO here departs from textbook GRPO (one line each; docs/decisions.md says why):
- a rollout is two segments: the reasoning (text), then a drawing conditioned on it; each has its own advantage
  (--credit causal: text by the whole reward, image by the image reward only, which is all it affects);
- one ensemble reward scores both segments (rewards.py), the text part and the image part kept apart;
- advantages are centred in the group but scaled by the batch's std (--adv batchstd), not the group's;
- image log-probs are MaskGIT's: each token scored at the step that committed it, and only at the
  --update-steps steps whose committed tokens were least certain;
- the loss is a token mean per segment, then a mean over rollouts, per modality (text cannot drown in image);
- k3 KL to the frozen base (--beta), the log-ratio clamped to +-10 before exp (the released code's guard);
- a supervised replay term (InstructGPT's PPO-ptx, --ptx 0.3) on the embedded world;
- --mu 2 optimizer updates per rollout batch, so the PPO ratio and its clip act;
- Dynamic Group Scaling (dgs.py) is off by default: on this world its preview does not predict the reward.
"""
import contextlib
import functools
import json
import os
import random
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import dgs
import eval as E
import rewards
import sampling as S
from ckpt import (BadInput, JsonLog, all_sum, amp, atomic_write, check_world_fits, checkpoint_path, from_files, has_ckpt,
                  load_checkpoint, outputs, resolve_ckpt, restore, rng_state, run_lock, save_checkpoint, say, set_rng_state,
                  setup_dist)
from flags import MIXES, get_args
from model import GRAD_CLIP, configure_optimizer, supervised_loss
from pretrain import pretrain, pretrain_batch, world_and_tokenizer
from world import data

RL_WARMUP = 5         # optimizer updates of linear learning-rate warm-up in RL
PTX_BATCH = 16        # supervised replay examples per update (--ptx)
LOG_RATIO_CLAMP = 10  # |log pi/pi_old| bound before exp: the released code's overflow guard (inactive at the defaults)
SAMPLE_EVERY = 20     # RL steps between PNG grids of rollouts (and one at the end)

# ----------------------------------------------------------------------------- the formulas
# Each formula once, in plain torch, with its paper name. `formula` runs it through torch.compile (fused
# elementwise kernels, compiled at the first call) unless --no-compile.

COMPILE = {"on": True}  # main sets it from --compile before the first step


def formula(fn):
    fast = torch.compile(fn, dynamic=True)

    @functools.wraps(fn)
    def call(*a, **kw):
        return (fast if COMPILE["on"] else fn)(*a, **kw)
    call.eager = fn  # bench.py times the two side by side
    return call


@formula
def group_advantages(R, mode):
    """[P, G] rewards -> [P, G] advantages. std: GRPO, (R - mean_G R) / (std_G R + 1e-4); nostd: Dr. GRPO,
    R - mean_G R; batchstd: (R - mean_G R) / (std_batch R + 1e-4), as TRL's scale_rewards="batch".
    Population std (n), so a group of equal rewards gets exactly 0, never 0/0."""
    # centred on the group's first reward first: the plain mean of G equal floats can differ from the value
    # itself by rounding (seven float32 0.1s: 7e-9), so an all-equal group would get a tiny nonzero advantage
    ref = R[:, :1]
    centred = R - (ref + (R - ref).mean(dim=1, keepdim=True))
    if mode == "nostd":
        return centred
    scale = R.std(dim=1, keepdim=True, correction=0) if mode == "std" else R.std(correction=0)
    return centred / (scale + 1e-4)


@formula
def ppo_clip(new_lp, old_lp, adv, eps):
    """Token-level clipped surrogate (PPO / GRPO): -min(r A, clip(r, 1-eps, 1+eps) A), r = pi/pi_old, with
    log r clamped to +-LOG_RATIO_CLAMP first."""
    ratio = torch.exp((new_lp - old_lp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    return -torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv), ratio


@formula
def k3_kl(new_lp, ref_lp):
    """k3 estimator of KL(pi || pi_ref) per token: exp(ref - new) - (ref - new) - 1 (always >= 0)."""
    d = ref_lp - new_lp
    return torch.exp(d) - d - 1


@formula
def segment_mean(x, mask):
    """GRPO's aggregation per modality: token mean inside each rollout's segment, then mean over the rollouts
    that have one, so a long image segment cannot drown a short text segment."""
    m = mask.float()
    per = (x * m).sum(-1) / m.sum(-1).clamp(min=1)
    has = (m.sum(-1) > 0).float()
    return (per * has).sum() / has.sum().clamp(min=1)


@formula
def batch_token_mean(x, mask):
    """DAPO / BNPO aggregation: one token mean over every scored token of the batch (long rollouts weigh more)."""
    m = mask.float()
    return (x * m).sum() / m.sum().clamp(min=1)


@formula
def dr_grpo_sum(x, mask):
    """Dr. GRPO aggregation: token sum / (rollouts x segment width). The width is the batch's longest answer
    (text) or every scored column (image); TRL divides by its fixed max_completion_length instead."""
    return (x * mask).sum() / (mask.shape[0] * mask.shape[-1])


@formula
def rollout_sum(x, mask):
    """The released code's aggregation: token sum per rollout, mean over rollouts."""
    return (x * mask).sum(-1).mean()


@formula
def gdpo_advantages(comps, weights):
    """GDPO's decoupled normalization: each reward component normalized within its group first, then the
    weighted sum, scaled by its batch std: sum_k w_k (r_k - mean_G r_k) / (std_G r_k + 1e-4), then / (std_batch
    + 1e-4). comps [K, P, G] unweighted components, weights [K]. A component with a wide spread can no longer
    drown one with a narrow spread that ranks the group just as well."""
    ref = comps[:, :, :1]
    centred = comps - (ref + (comps - ref).mean(dim=2, keepdim=True))  # exact zeros for tied groups, as above
    A = (weights[:, None, None] * centred / (comps.std(dim=2, keepdim=True, correction=0) + 1e-4)).sum(0)
    return A / (A.std(correction=0) + 1e-4)


def aggregate(x, mask, how):
    """--loss-agg: how a segment's per-token losses become one number."""
    if how == "grpo":
        return segment_mean(x, mask)
    if how in ("dapo", "bnpo"):
        return batch_token_mean(x, mask)
    return dr_grpo_sum(x, mask) if how == "dr_grpo" else rollout_sum(x, mask)


# ----------------------------------------------------------------------------- collect: rollouts and rewards

@dataclass
class Rollouts:
    """A batch of N = P prompts x G rollouts (rows group by group), or some rows of one while sampling.
    A segment the mix has not (no text in --tasks gen, no drawing in --tasks und) stays None."""
    finished: list[bool] | None = None  # [N] the answer ended with <eor> (True without text)
    text: list[str] | None = None  # [N] the answers / reasoning, decoded
    toks: torch.Tensor | None = None  # [N, L] long: the answers' token ids, right-padded
    lp: torch.Tensor | None = None  # [N, L] their log-probs at sampling: pi_old of the text tokens
    mask: torch.Tensor | None = None  # [N, L] bool: real answer tokens (<eor> included)
    text_prompts: list[list[int]] | None = None  # [N] the understanding prompt each answer continues
    gen_prompts: list[list[int]] | None = None  # [N] the drawing prompt, reasoning included
    img: dict | None = None  # the sampler's drawing (sampling.sample_maskgit / sample_ar_image): "codes" [N, n_img] long,
    # "logprobs" [N, n_img] (pi_old of each image token), MaskGIT's "step_of" [N, n_img] (its commit step),
    # "draws" and "pred" (the state a DGS preview resumes from)
    r_text: torch.Tensor | None = None  # [P, G] text part of the ensemble reward
    r_img: torch.Tensor | None = None  # [P, G] image part of the ensemble reward
    comps: dict | None = None  # reward name -> [N] unweighted component values
    preview: torch.Tensor | None = None  # [P, G] DGS preview scores, when DGS ran

    def reward(self):
        """[P, G] the whole ensemble reward R."""
        return self.r_text + self.r_img


def rollout_plan(task, mix, after):
    """(text prompt or None, what to draw or None) for one prompt of the reasoning loop.
    mode u: answer a question about an image, then draw the concept from that answer (`after`);
    mode r: state the fact the request needs, then draw; und / gen: one modality only (ablations)."""
    if mix == "und":
        return task, None
    if mix == "gen":
        return None, task
    return task, after(task) if task.kind in data.UNDERSTAND else task


def sample_partials(model, tok, task, gen_task, n, args, g, stop):
    """n fresh rollouts of one prompt, images sampled up to MaskGIT step (or AR token) `stop`."""
    p = Rollouts(finished=[True] * n)
    if task is not None:
        texts, toks, lp, valid = S.answer(model, tok, [tok.understanding_prompt(task)] * n, args.max_text, args.temperature, g)
        p = Rollouts(text=texts, toks=toks, lp=lp, mask=valid, finished=(toks == tok.eor_id).any(1).tolist())
    if gen_task is None:
        return p
    reasons = [tok.encode(x) for x in p.text] if task is not None else [[]] * n
    p.gen_prompts = [tok.generation_prompt(gen_task.concept, gen_task.question, r) for r in reasons]
    p.img = draw_rollouts(model, tok, p.gen_prompts, args, g, stop=stop)
    return p


def draw_rollouts(model, tok, prompts, args, g, stop=None, state=None):
    """RL's drawings: --rl-cfg, --maskgit-steps, --maskgit-sampler, --temperature."""
    return S.draw(model, tok, prompts, args.steps, args.rl_cfg, args.maskgit_sampler, args.temperature, g, stop, state)


def sample_group(model, tok, task, args, g, dgs_state, world):
    """G rollouts of one prompt; with DGS (dgs_state given), previews below tau are dropped and resampled."""
    text_task, gen_task = rollout_plan(task, args.tasks, world.draw_after_answer)
    if gen_task is None or dgs_state is None:
        return sample_partials(model, tok, text_task, gen_task, args.group, args, g, None), text_task, gen_task, None
    preview_step = args.dgs_preview * (world.codec.grid if model.cfg.image_causal else 1)  # AR: image rows

    def start(n):  # n fresh rollouts drawn up to the preview step, one Rollouts row each
        p = sample_partials(model, tok, text_task, gen_task, n, args, g, preview_step)
        return [dgs.rows(p, [i]) for i in range(n)]

    def score(partials):  # the world's cheap score of each preview
        return world.preview_score([gen_task] * len(partials), [q.img["pred"][0] for q in partials])

    def finish(partials):  # the kept previews drawn to the end, as one batch
        p = dgs.cat_rows(partials)
        p = replace(p, img=draw_rollouts(model, tok, p.gen_prompts, args, g, state=p.img))
        return [dgs.rows(p, [i]) for i in range(len(partials))]

    done, stats = dgs.dgs_group(start, score, finish, args.group, dgs.CAP_PER_G * args.group, dgs_state)
    return dgs.cat_rows(done), text_task, gen_task, stats


def recognizer(model, tok):
    """The cycle reward's judge: the policy's own p("yes") for "is <c> in the image ?" on its drawing."""
    yes, no = tok.encode("yes")[0], tok.encode("no")[0]

    @torch.no_grad()  # on the returned judge: a reward is never differentiated
    def recognize(concepts, codes):
        tasks = [data.Task("recognition", c, data.RECOGNITION.format(tok=c.token), "yes", image=x) for c, x in zip(concepts, codes)]
        ids, valid = S.pad_left([tok.understanding_prompt(t) for t in tasks], tok.pad_id, model.lm_head.weight.device)
        lp = S.subset_logprobs(model, model(ids, valid)[:, -1], torch.tensor([yes, no]))
        return lp[:, 0].exp().tolist()
    return recognize


def collect(model, tok, world, args, rank, step, dgs_state, n_prompts):
    """One RL batch: n_prompts prompts x G rollouts, their rewards and the log-probs stored at sampling.
    DGS runs when dgs_state is given."""
    dev = model.lm_head.weight.device
    g = torch.Generator(dev).manual_seed(hash((args.seed, rank, step)) % 2**63)  # resume replays the same rollouts
    tasks = world.sample_tasks(MIXES[args.tasks], n_prompts, random.Random(f"{args.seed}/{rank}/{step}"))
    model.eval()
    t0 = time.time()
    parts, rolls, stats = [], [], []
    for task in tasks:
        p, text_task, gen_task, st = sample_group(model, tok, task, args, g, dgs_state, world)
        parts.append(p)
        stats += [st] if st else []
        for i in range(args.group):
            rolls.append(rewards.Rollout(text_task or gen_task, gen_task, p.text[i] if p.text else None,
                                         p.img["codes"][i] if p.img is not None else None, p.finished[i]))
    t1 = time.time()
    ctx = {"recognize": recognizer(model, tok), "reward_style": args.reward_style, **world.reward_ctx()}
    r_text, r_img, comps = rewards.ensemble(rolls, args.rewards, ctx)
    batch = replace(dgs.cat_rows(parts), r_text=r_text.view(-1, args.group), r_img=r_img.view(-1, args.group), comps=comps,
                    text_prompts=[tok.understanding_prompt(t) for t in tasks for _ in range(args.group)] if parts[0].toks is not None else None,
                    preview=torch.tensor([s["scores"] for s in stats]) if stats else None)
    timing = dict(t_rollout=t1 - t0, t_reward=time.time() - t1)
    if stats:
        timing.update(dgs_attempts=sum(s["attempts"] for s in stats), dgs_above=sum(s["above"] for s in stats))
    return batch, rolls, timing


# ----------------------------------------------------------------------------- advantages

def advantages(batch, args, step):
    """Per-segment advantages {"text": [P, G], "image": [P, G]} under --credit: joint (both segments share
    the whole reward), split (each its own modality's reward) or causal (image tokens by the image reward,
    which only they affect; text tokens by the whole reward, since the drawing depends on the reasoning).
    --null-adv permutes each group's advantages (one permutation for both segments): the same compute and
    update sizes, but no link between a rollout and its own reward."""
    text_R = batch.r_text if args.credit == "split" else batch.r_text + batch.r_img
    img_R = batch.r_img if args.credit in ("split", "causal") else batch.r_text + batch.r_img
    if args.adv == "gdpo":  # the same credit, component by component
        image_only = args.credit in ("split", "causal")
        A = {"text": decoupled(batch, args, [k for k in batch.comps if args.credit != "split" or k in rewards.TEXT]),
             "image": decoupled(batch, args, [k for k in batch.comps if not image_only or k in rewards.IMAGE])}
    else:
        A = {"text": group_advantages(text_R, args.adv), "image": group_advantages(img_R, args.adv)}
    if args.null_adv:
        g = torch.Generator().manual_seed(random.Random(f"null/{args.seed}/{step}").randrange(2**63))
        perm = torch.rand(text_R.shape, generator=g).argsort(dim=1)
        A = {k: v.gather(1, perm.to(v.device)) for k, v in A.items()}
    return A


def decoupled(batch, args, names):
    """--adv gdpo's advantages [P, G] from the named components of the batch's reward (zeros if none)."""
    P, G = batch.r_text.shape
    if not names:
        return torch.zeros(P, G)
    comps = torch.stack([batch.comps[k].view(P, G) for k in names])
    return gdpo_advantages(comps, torch.tensor([args.rewards[k] for k in names]))


# ----------------------------------------------------------------------------- the loss: current log-probs

def surprising_steps(img, T, k):
    """The k MaskGIT steps whose committed tokens had the largest total surprisal -log p at sampling.
    A token sampled with p ~ 1 has gradient ~ 0 (d log p / d logits = onehot - p), and MaskGIT commits its
    most confident tokens first, so the early steps carry almost nothing: on a base model, steps 0-3 of 8
    hold <2% of the batch's surprisal and the last two ~70%."""
    if not k or k >= T or img is None or "step_of" not in img:
        return list(range(T))
    sur = torch.zeros(T).index_add_(0, img["step_of"].flatten().cpu(), -img["logprobs"].flatten().float().cpu())
    return sorted(sur.topk(k).indices.tolist())


def score_batch(trunk, raw, tok, batch, args, steps_sel):
    """{"text" / "image": (log-probs, mask, entropies)} of every sampled token under the current policy: text
    causally, images at each token's MaskGIT commit step (or AR), with the sampler's temperature, CFG and
    vocabulary. `trunk` is what the gradient flows through (the DDP wrapper), `raw` the policy itself."""
    out = {}
    dev = raw.lm_head.weight.device
    if batch.toks is not None:
        toks, mask = batch.toks.to(dev), batch.mask.to(dev)
        h = S.answer_hidden(raw, batch.text_prompts, toks, mask, tok.pad_id, trunk)
        lp, ent = S.token_logprobs(raw, h, torch.where(mask, toks, -1), ids=tok.text_ids(), temperature=args.temperature, chunk=args.chunk)
        out["text"] = (lp, mask, ent)
    if batch.img is not None:
        im, uncond = batch.img, [tok.uncond_prompt()] * len(batch.gen_prompts)
        if raw.cfg.image_causal:
            lp, sel, ent = S.ar_image_logprobs(raw, batch.gen_prompts, uncond, im["codes"], args.rl_cfg, args.temperature, args.chunk, trunk)
        else:  # Show-o's sampler never tempers its logits (its temperature scales the Gumbel noise)
            temperature = 1.0 if args.maskgit_sampler == "showo" else args.temperature
            lp, sel, ent = S.maskgit_logprobs(raw, batch.gen_prompts, uncond, im["codes"], im["step_of"], steps_sel,
                                              args.rl_cfg, temperature, args.chunk, trunk, args.image_estimator,
                                              im["draws"], im["logprobs"])
        out["image"] = (lp, sel, ent)
    return out


def old_logprobs(raw, tok, batch, args, steps_sel):
    """{"text" / "image": pi_old}: the log-probs stored at sampling, or where they do not serve, one no-grad
    scoring pass by the rollout policy before the first update. Image estimators other than commit score
    terms the sampler never stored (one log-prob per token, at its commit step). Under bf16 the KV-cache
    decode and the scorer's full forward round differently (text ratio 1 +- 0.016 at Show-o's shape), so
    under --bf16 the scorer rescores both segments: ratio exactly 1 at the first update."""
    scorer = args.bf16
    image = scorer or (args.image_estimator != "commit" and not raw.cfg.image_causal)
    part = replace(batch, toks=batch.toks if scorer else None, img=batch.img if image else None)
    with torch.no_grad():
        rescored = {k: v[0] for k, v in score_batch(raw, raw, tok, part, args, steps_sel).items()}
    stored = {"text": batch.lp, "image": batch.img["logprobs"] if batch.img is not None else None}
    return {k: rescored.get(k, stored[k]) for k in ("text", "image") if stored[k] is not None}


# ----------------------------------------------------------------------------- the update

def rl_update(model, raw, ref, tok, batch, A, opt, sched, args, ptx=None):
    """--mu optimizer updates of the Sync-GRPO loss on one rollout batch with its advantages A (plus the
    supervised replay batch `ptx`); returns the logged statistics. `model` is what the gradient flows
    through (DDP-wrapped or not), `raw` the policy itself, `ref` the frozen base for the KL (or None)."""
    steps_sel = surprising_steps(batch.img, args.steps, args.update_steps)
    ref_lp = {}
    if args.beta and ref is not None:  # beta = 0 skips the reference forward entirely
        with torch.no_grad():
            ref_lp = {k: v[0] for k, v in score_batch(ref, ref, tok, batch, args, steps_sel).items()}
    old = old_logprobs(raw, tok, batch, args, steps_sel)
    stats, pending = {}, {}  # pending: 0-d tensors read back in one host sync at the end
    raw.train()
    for inner in range(args.mu):
        loss, seg = policy_loss(model, raw, tok, batch, A, old, ref_lp, args, steps_sel, first=inner == 0)
        pending.update(seg)
        if ptx is not None:  # PPO-ptx: the pretraining loss anchors what RL does not ask against its drift
            l_ptx = supervised_loss(model, raw, tok, ptx)[0]
            loss = loss + args.ptx * l_ptx
            pending["ptx_loss"] = l_ptx.detach().float()
        loss.backward()
        stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(raw.parameters(), GRAD_CLIP).item()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        pending["loss"] = loss.detach().float()
    pending.update(adv_text_mean=A["text"].mean(), adv_text_std=A["text"].std(), adv_image_mean=A["image"].mean(),
                   adv_image_std=A["image"].std())
    stats.update(zip(pending, torch.stack([v.to(pending["loss"].device) for v in pending.values()]).tolist()))
    stats["effective_groups"] = 1.0 - dgs.zero_variance_groups(batch.reward()).float().mean().item()
    return stats


def policy_loss(model, raw, tok, batch, A, old, ref_lp, args, steps_sel, first=False):
    """The Sync-GRPO loss of a batch under the current policy: per segment (text, image) the clipped surrogate
    plus beta x the k3 KL, aggregated per modality (--loss-agg), summed; and its statistics (0-d tensors)."""
    loss, stats = 0.0, {}
    for key, (lp, mask, ent) in score_batch(model, raw, tok, batch, args, steps_sel).items():
        a = A[key].flatten().to(lp.device)[:, None]
        obj, ratio = ppo_clip(lp, old[key].to(lp.device), a, args.eps)
        kl = k3_kl(lp, ref_lp[key]) if key in ref_lp else torch.zeros_like(lp)
        loss = loss + aggregate(obj + args.beta * kl, mask, args.loss_agg)
        stats.update(segment_stats(key, ratio, mask, kl, ent, args.eps, first))
    return loss, stats


@torch.no_grad()
def segment_stats(key, ratio, mask, kl, ent, eps, first):
    """One segment's update statistics as 0-d tensors (read back with the rest in one host sync)."""
    r = ratio[mask]
    if not r.numel():  # the sampled MaskGIT steps committed no token (few image tokens, many steps)
        return {}
    s = {f"{key}_ratio_mean": r.mean(), f"{key}_ratio_min": r.min(), f"{key}_ratio_max": r.max(),
         f"{key}_clip_frac": ((r < 1 - eps) | (r > 1 + eps)).float().mean(),
         f"{key}_kl": batch_token_mean.eager(kl, mask), f"{key}_entropy": batch_token_mean.eager(ent, mask)}
    if first:  # on-policy: pi == pi_old up to float noise, so this must be ~0
        s[f"{key}_ratio_dev_first"] = (r - 1).abs().max()
    return {k: v.float() for k, v in s.items()}


def reward_stats(batch, rolls, G):
    """The batch's reward, each component's mean and std, and its learnability diagnostics, for the log."""
    row = {f"r_{name}_{k}": v for name, d in dgs.diagnostics(batch, rolls, G).items() for k, v in d.items() if k != "groups"}
    for name, v in batch.comps.items():
        row[f"r_{name}"], row[f"r_{name}_std"] = v.mean().item(), v.std().item()
    R = batch.reward()
    return row | dict(reward=R.mean().item(), reward_std=R.std().item())


# ----------------------------------------------------------------------------- the loop

def rl(args, rank=0, world_size=1, device="cpu"):
    """Sync-GRPO: held-out evaluation of the base, --rl-iters steps, held-out evaluation again (a Show-o run
    is evaluated apart, by --stage eval on its test split)."""
    world, tok, policy, ref, before = setup_policy(args, rank, world_size, device)
    opt, sched = configure_optimizer(policy, args.rl_lr, RL_WARMUP, args.rl_iters * args.mu)
    dgs_state, step = dgs.DGSState() if args.dgs else None, 0
    run_dir = os.path.join(args.out_dir, "rl")
    os.makedirs(run_dir, exist_ok=True)
    if args.resume:
        step, state = restore(run_dir, policy, opt, sched)
        dgs_state = dgs.DGSState(**state["dgs"]) if args.dgs and state["dgs"] else dgs_state  # --dgs decides
        set_rng_state(state["rng"])
        before = state["before"]
    if rank == 0 and before is None and not args.showo_dir:
        say(rank, f"evaluating the base on {len(world.test_tasks)} held-out tasks")
        before = held_out_eval(policy, tok, world, args)
    model = DDP(policy) if world_size > 1 else policy
    log = JsonLog(os.path.join(run_dir, "metrics.jsonl"), rank == 0, step)
    say(rank, f"Sync-GRPO: {args.rl_iters} steps{f' from step {step}' if step else ''} of {args.rollouts} rollouts "
              f"in groups of {args.group} -> {run_dir}\n  rewards {', '.join(f'{k}={w:g}' for k, w in args.rewards.items() if w)}; "
              f"replay (--ptx) {args.ptx:g}")
    if rank == 0 and step == 0 and args.diag_prompts:
        base_diagnostics(policy, tok, world, args, device, run_dir)
    bar = tqdm(total=args.rl_iters, initial=step, disable=rank != 0, desc="sync-grpo")
    end = min(args.rl_iters, step + args.stop_after) if args.stop_after else args.rl_iters
    while step < end:
        with amp(args.bf16, device):
            batch, rolls, row = collect(policy, tok, world, args, rank, step, dgs_state, args.rollouts // args.group)
        if "dgs_attempts" in row:  # DGS ran: tau moves once per batch, by the acceptance rate of the global batch
            att, above = all_sum([row.pop("dgs_attempts"), row.pop("dgs_above")], device)
            row.update(dgs_rho=above / att, dgs_attempts_per_rollout=att / (world_size * args.rollouts), dgs_tau=dgs_state.tau)
            (dgs.update_tau_released if args.dgs_tau_rule == "released" else dgs.update_tau)(dgs_state, above / att)
        row.update(reward_stats(batch, rolls, args.group))
        t = time.time()
        A = advantages(batch, args, step)
        ptx = pretrain_batch(world, tok, random.Random(f"ptx/{args.seed}/{rank}/{step}"), PTX_BATCH, args, device) if args.ptx else None
        with amp(args.bf16, device):
            row.update(rl_update(model, policy, ref, tok, batch, A, opt, sched, args, ptx))
        step += 1
        row.update(step=step, t_update=time.time() - t, lr=sched.get_last_lr()[0])
        row["rollout_share"] = row["t_rollout"] / (row["t_rollout"] + row["t_reward"] + row["t_update"])
        log(row)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.3f}")
        if rank == 0 and (step % SAMPLE_EVERY == 0 or step == args.rl_iters):
            E.save_rollouts(os.path.join(run_dir, f"rollouts_{step:06d}.png"), rolls, batch.reward().flatten().tolist(),
                            args.group, world.codec)
        if rank == 0 and (step % args.ckpt_every == 0 or step == end):
            save_checkpoint(run_dir, step, policy, dict(stage="rl", args=vars(args)),
                            dict(opt=opt.state_dict(), sched=sched.state_dict(), rng=rng_state(), step=step, before=before,
                                 dgs=dgs_state.state_dict() if dgs_state else None))
    bar.close()
    if rank == 0:
        end_of_run(policy, tok, world, args, step, before, run_dir)
    return policy


def setup_policy(args, rank, world_size, device):
    """(world, tokenizer, policy, frozen reference or None, the base's evaluation if pretrained just now):
    Show-o with fresh concept tokens under --showo-dir, else the embedded world's base (pretrained first
    when --ckpt pretrain has none yet)."""
    if args.showo_dir:
        from showo import load  # imported only here: the default job never loads the Show-o path
        return (*from_files(load.setup, args, device, print if rank == 0 else lambda *a: None), None)
    base = checkpoint_path(args)
    base_eval = None
    if not has_ckpt(base):
        if args.ckpt != "pretrain":
            resolve_ckpt(base)  # raises, naming the missing path
        with run_lock(base) if rank == 0 else contextlib.nullcontext():
            run_pretrain(args, rank, world_size, device)  # embedded default: make the base once, then reuse it
        if world_size > 1:
            dist.barrier()
        if rank == 0:  # pretraining has just evaluated this very base with these flags: not again
            with open(os.path.join(base, "eval.json")) as f:
                base_eval = json.load(f)
    world, tok = world_and_tokenizer(args, rank if base_eval is None else None)  # None: pretraining said it
    policy, meta, _ = load_checkpoint(base, device)
    if args.ckpt == "pretrain" and meta["step"] < meta.get("args", {}).get("iters", 0):
        raise BadInput(f"{resolve_ckpt(base)}: a pretraining stopped at step {meta['step']} of {meta['args']['iters']}; "
                       "finish it first with --stage pretrain --resume (same flags)")
    check_world_fits(tok, policy.cfg, args.data_dir, resolve_ckpt(base))
    policy.grad_ckpt = args.grad_ckpt
    say(rank, f"base: {resolve_ckpt(base)} (pretrained {meta['step']} steps)")
    ref = load_checkpoint(base, device)[0].requires_grad_(False).eval() if args.beta else None
    return world, tok, policy, ref, base_eval


def end_of_run(policy, tok, world, args, step, before, run_dir):
    """The run's picture and rise statistic, its held-out evaluation against the base, its outputs line."""
    if step < args.rl_iters:
        say(0, f"stopped after step {step} of {args.rl_iters}; --resume continues")
        return say(0, outputs(run_dir))
    logged = E.read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    E.plot_rewards(os.path.join(run_dir, "reward_vs_step.png"), logged)
    say(0, E.rise_report(logged))
    if not args.showo_dir:
        say(0, f"evaluating the RL model on {len(world.test_tasks)} held-out tasks")
        after = held_out_eval(policy, tok, world, args)
        title = f"held-out concepts of {args.data_dir}: the base, after {step} Sync-GRPO steps, and the paired gain"
        print("\n" + E.gain_table(before, after, title))
        atomic_write(os.path.join(run_dir, "eval.json"), json.dumps({"base": before, "sync-grpo": after}, indent=1).encode())
    say(0, outputs(run_dir))


# ----------------------------------------------------------------------------- diagnostics and evaluation

def base_diagnostics(policy, tok, world, args, device, run_dir):
    """Learnability of the RL task mix for the model as it is: --diag-prompts prompts x G rollouts on training
    concepts, every drawing previewed and kept (tau = -inf), so the preview / final-reward correlation is
    measured on unfiltered rollouts."""
    with amp(args.bf16, device):
        batch, rolls, _ = collect(policy, tok, world, args, 0, -1, dgs.DGSState(tau=-float("inf")), args.diag_prompts)
    diag = dgs.diagnostics(batch, rolls, args.group)
    print(f"Learnability of the RL task mix for the base ({args.diag_prompts} prompts x G {args.group}, "
          "training concepts):\n" + dgs.diagnostics_table(diag))
    atomic_write(os.path.join(run_dir, "diagnostics.json"), json.dumps(diag, indent=1).encode())


def held_out_eval(policy, tok, world, args):
    """The world's held-out metrics (World.evaluate) plus the held-out mean reward: the RL objective itself
    on --eval-reward-prompts prompts of the run's task mix drawn from held-out material, G rollouts each,
    DGS off, from fixed seeds (the same for the base and the trained model: paired)."""
    t0 = time.time()
    res = world.evaluate(policy, tok, args)
    if args.eval_reward_prompts:
        batch, _, _ = collect(policy, tok, world.held_out(), args, 0, -2, None, args.eval_reward_prompts)
        per_prompt = batch.reward().mean(1).tolist()
        res["reward"], res["se"]["reward"], res["items"]["reward"] = E.mean(per_prompt), E.stderr(per_prompt), per_prompt
    res["seconds"] = round(time.time() - t0, 1)
    return res


def run_pretrain(args, rank, world_size, device):
    """The pretraining stage: the base, then its held-out evaluation next to it (eval.json)."""
    world, tok, raw, run_dir = pretrain(args, rank, world_size, device)
    if rank == 0:
        say(rank, f"evaluating the base on {len(world.test_tasks)} held-out tasks")
        res = held_out_eval(raw, tok, world, args)
        print("\n" + E.table({"base": res}, f"held-out concepts of {args.data_dir}, the base after {args.iters} pretraining steps"))
        atomic_write(os.path.join(run_dir, "eval.json"), json.dumps(res, indent=1).encode())
        say(rank, outputs(run_dir))
    return raw


def main(argv=None):
    args = get_args(argv)
    COMPILE["on"] = args.compile
    rank, world_size, device = (0, 1, "cpu") if args.stage == "eval" else setup_dist()
    run_dir = os.path.join(args.out_dir, args.stage)
    try:
        if args.stage == "eval":
            return E.run_eval(args, held_out_eval)
        with contextlib.ExitStack() as lock:  # the run owns its folder: rank 0 holds the lock for all ranks
            failed = None
            if rank == 0:
                try:
                    lock.enter_context(run_lock(run_dir))
                except BadInput as e:
                    failed = e
            if world_size > 1 and all_sum([float(failed is not None)], device)[0]:  # every rank stops, none hangs
                raise failed or BadInput(f"{run_dir}: rank 0 could not take the run's folder")
            if failed:
                raise failed
            return (run_pretrain if args.stage == "pretrain" else rl)(args, rank, world_size, device)
    except KeyboardInterrupt:
        latest = resolve_ckpt(run_dir) if args.stage != "eval" and has_ckpt(run_dir) else None
        sys.exit(f"interrupted: the last checkpoint is {latest}; the same command with --resume continues from it"
                 if latest else "interrupted: evaluation writes its results only at the end; nothing was written"
                 if args.stage == "eval" else f"interrupted before the first checkpoint of {run_dir}; nothing to resume")
    finally:
        if world_size > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except BadInput as e:  # a bad file or folder: its message says which and what was expected
        sys.exit(f"error: {e}")
