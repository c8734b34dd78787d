"""
Sync-GRPO's loss, one formula per function with its paper name: per-segment advantages and their credit,
the clipped surrogate, the k3 KL, the token aggregations, and the scoring of the sampled tokens by the
current policy (text causally, image at each token's MaskGIT commit step). train.rl_update composes them.
"""
import random
from dataclasses import replace

import torch

import dgs
import sampling as S
from rollouts import image_temperature, text_temperature


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


def advantages(batch, args, F, step):
    """Per-segment advantages {"text": [P*G], "image": [P*G]} under --credit: joint (both segments
    share the whole trajectory's reward), split (each its own modality's reward) or causal (image
    tokens by the image reward, which only they affect; text tokens by the whole reward, since the
    drawing depends on the reasoning). --null-adv shuffles them within groups: same compute, no signal."""
    R_text, R_img = batch.r_text, batch.r_img
    text_R = R_text if args.credit == "split" else R_text + R_img
    img_R = R_img if args.credit in ("split", "causal") else R_text + R_img
    c = int(args.adv_bessel)
    A = {"text": F["advantages"](text_R, args.adv, correction=c), "image": F["advantages"](img_R, args.adv, correction=c)}
    if args.null_adv:
        A = dgs.shuffle_within_groups(A, torch.Generator().manual_seed(random.Random(f"null/{args.seed}/{step}").randrange(2**63)))
    return A


def surprising_steps(img, T, k):
    """The k MaskGIT steps whose committed tokens had the largest total surprisal -log p at sampling.
    A token sampled with p ~ 1 has gradient ~ 0 (d log p / d logits = onehot - p), and MaskGIT commits
    its most confident tokens first, so the early steps carry almost nothing: on a base model, steps
    0-3 of 8 hold <2% of the batch's surprisal and the last two ~70%."""
    if not k or k >= T or img is None or "step_of" not in img:
        return list(range(T))
    sur = torch.zeros(T).index_add_(0, img["step_of"].flatten().cpu(), -img["logprobs"].flatten().float().cpu())
    return sorted(sur.topk(k).indices.tolist())


def score_batch(trunk, raw, tok, batch, args, steps_sel):
    """Current log-probs and entropies of every sampled token: text (causal) and image (MaskGIT at the
    commit step, or AR), with the sampler's temperature, CFG and vocabulary masks."""
    out = {}
    dev = raw.lm_head.weight.device
    if batch.toks is not None:
        toks, mask = batch.toks.to(dev), batch.mask.to(dev)
        h = S.answer_hidden(raw, batch.text_prompts, toks, mask, tok.pad_id, trunk, args.kv_reuse)
        lp, ent = S.token_logprobs(raw, h, torch.where(mask, toks, -1), ids=tok.text_ids(), temperature=text_temperature(args), chunk=args.chunk)
        out["text"] = (lp, mask, ent)
    if batch.img is not None:
        im, uncond = batch.img, [tok.uncond_prompt()] * len(batch.gen_prompts)
        if args.image_mode == "ar":
            lp, sel, ent = S.ar_image_logprobs(raw, batch.gen_prompts, uncond, im["codes"], args.rl_cfg, args.temperature, args.chunk, trunk)
        else:
            lp, sel, ent = S.maskgit_logprobs(raw, batch.gen_prompts, uncond, im["codes"], im["step_of"], steps_sel,
                                              args.rl_cfg, image_temperature(args), args.chunk, trunk,
                                              args.image_estimator, im["draws"], im["logprobs"], args.kv_reuse, args.step_backward)
        out["image"] = (lp, sel, ent)
    return out


def rescored_old(raw, tok, batch, args, steps_sel):
    """{"text" / "image": pi_old} where the sampler's stored log-probs do not serve, scored once by the
    rollout policy, without gradient, before the first update. Image estimators other than commit score
    terms the sampler never stored (it keeps one log-prob per token, at its commit step; the released
    code keeps per-step log-probs). --old-lp scorer rescores both segments: under bf16 the KV-cache
    decode and the scorer's full forward round differently (text ratio 1 +- 0.016 at Show-o's shape), so
    with mu > 1 the clip would act on numerics; the scorer's own pass gives ratio 1 at the first update."""
    scorer = args.old_lp == "scorer" or (args.old_lp == "auto" and args.bf16)
    image = scorer or (args.image_estimator != "commit" and args.image_mode == "maskgit")
    part = replace(batch, toks=batch.toks if scorer else None, img=batch.img if image else None)
    if part.toks is None and part.img is None:
        return {}
    with torch.no_grad():
        return {k: v[0] for k, v in score_batch(raw, raw, tok, part, args, steps_sel).items()}


def old_logprobs(batch, key):
    return batch.lp if key == "text" else batch.img["logprobs"]
