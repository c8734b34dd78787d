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
import os
import random
import sys
import time

import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import dgs
import eval as E
import rewards
import showo
import unifybench
import worldio
from ckpt import (BadInput, JsonLog, all_sum, atomic_write, from_files, has_ckpt, load_checkpoint, load_weights, outputs,
                  read_checkpoint, resolve_ckpt, restore, rng_state, save_checkpoint, say, set_rng_state, setup_dist)
from flags import get_args
from loss import advantages, batch_token_mean, compiled, old_logprobs, rescored_old, score_batch, surprising_steps
from pretrain import clip_and_step, make_optimizer, pretrain, pretrain_batch, pretrain_loss, world_and_tokenizer
from rollouts import base_diagnostics, collect, diagnostics, diagnostics_table, held_out_eval


# The base the main job starts from: `python train.py --stage pretrain` with the default flags writes the
# same recipe to out/pretrain (about 25 minutes on a 2-core CPU), so the main job can spend its time on RL.
COMMITTED_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "base")


def rl_update(model, raw, ref, tok, batch, A, opt, sched, args, F, ptx=None):
    """mu optimizer updates of the Sync-GRPO loss on one rollout batch with its advantages A (plus the
    supervised replay batch `ptx` under --ptx); returns the logged statistics. `model` is what the
    gradient flows through (DDP-wrapped or not), `raw` the policy itself, `ref` the frozen base for the KL."""
    keep = ~dgs.zero_variance_groups(batch.reward()) if args.drop_zero_var else None
    adv = {k: v.flatten() for k, v in A.items()}
    steps_sel = surprising_steps(batch.img, args.steps, args.update_steps)
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
            pending.update(segment_stats(key, ratio, mask, kl, ent, a * lp.detach(), args, first=inner == 0))
        if ptx is not None:  # PPO-ptx: the pretraining loss anchors what RL does not ask against its drift
            l_ptx = pretrain_loss(model, raw, tok, ptx)[0]
            loss = loss + args.ptx * l_ptx
            pending["ptx_loss"] = l_ptx.detach().float()
        loss.backward()
        stats.update(grad_norm=clip_and_step(raw, opt, sched, args))
        pending["loss"] = loss.detach().float()
    pending.update(adv_text_mean=A["text"].mean(), adv_text_std=A["text"].std(), adv_image_mean=A["image"].mean(),
                   adv_image_std=A["image"].std())
    stats.update(zip(pending, torch.stack([v.to(pending["loss"].device) for v in pending.values()]).tolist()))
    stats.update(effective_groups=dgs.effective_fraction(batch.reward()))
    return stats


@torch.no_grad()
def segment_stats(key, ratio, mask, kl, ent, pg, args, first):
    """One segment's update statistics as 0-d tensors (read back with the rest in one host sync)."""
    r = ratio[mask]
    if not r.numel():  # the sampled MaskGIT steps committed no token (few image tokens, many steps)
        return {}
    hi = 1 + (args.eps_high or args.eps)
    s = {f"{key}_ratio_mean": r.mean(), f"{key}_ratio_min": r.min(), f"{key}_ratio_max": r.max(),
         f"{key}_clip_frac": ((r < 1 - args.eps) | (r > hi)).float().mean(),
         f"{key}_kl": batch_token_mean(kl, mask), f"{key}_entropy": batch_token_mean(ent, mask),
         f"{key}_pg_var": (pg * mask).sum(-1).var()}  # spread of per-rollout PG terms
    if first:  # on-policy: pi == pi_old up to float noise, so this must be ~0
        s[f"{key}_ratio_dev_first"] = (r - 1).abs().max()
    return {k: v.float() for k, v in s.items()}


def reward_stats(batch, rolls, G):
    """The batch's reward, each component's mean and std, and its learnability diagnostics, for the log."""
    row = {f"r_{name}_{k}": v for name, d in diagnostics(batch, rolls, G).items() for k, v in d.items() if k != "groups"}
    for name, v in batch.comps.items():
        row[f"r_{name}"], row[f"r_{name}_std"] = v.mean().item(), v.std().item()
    R = batch.reward()
    return row | dict(reward=R.mean().item(), reward_std=R.std().item())


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
    evaluates = not args.showo_dir  # a Show-o run is evaluated apart, by --stage eval (its test split at 1.3B)
    if args.resume:
        step, state = restore(run_dir, policy, opt, sched)
        dgs_state = dgs.DGSState.from_dict(state["dgs"])
        set_rng_state(state["rng"])
        before = state["before"]
    if rank == 0 and before is None and args.eval_base and evaluates:
        before = base_eval
        if before is None:
            say(rank, f"evaluating the base on {len(world.test_tasks)} held-out tasks")
            before = held_out_eval(policy, tok, world, args)
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
        row.update(reward_stats(batch, rolls, args.group))
        t = time.time()
        A = advantages(batch, args, F, step)
        ptx = pretrain_batch(world, tok, random.Random(f"ptx/{args.seed}/{rank}/{step}"), args.ptx_batch, args, device) if args.ptx else None
        with amp(args, device):
            row.update(rl_update(model, policy, ref, tok, batch, A, opt, sched, args, F, ptx))
        step += 1
        row.update(step=step, t_update=time.time() - t, lr=sched.get_last_lr()[0])
        row["rollout_share"] = row["t_rollout"] / (row["t_rollout"] + row["t_reward"] + row["t_update"])
        log(row)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.3f}")
        if rank == 0 and (step % args.sample_every == 0 or step == args.rl_iters):
            save_rollouts(os.path.join(run_dir, f"rollouts_{step:06d}.png"), rolls, batch.reward().flatten().tolist(),
                          args.group, world.codec)
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
    if rank == 0 and step == args.rl_iters and evaluates:
        say(rank, f"evaluating the RL model on {len(world.test_tasks)} held-out tasks")
        after = held_out_eval(policy, tok, world, args)
        title = f"held-out concepts of {args.data_dir}: {'the base, ' if before else ''}after {step} Sync-GRPO steps"
        print("\n" + (E.gain_table(before, after, title + ", and the paired gain") if before else E.table({"sync-grpo": after}, title)))
        cols = ({"base": before} if before else {}) | {"sync-grpo": after}
        atomic_write(os.path.join(run_dir, "eval.json"), json.dumps(cols, indent=1).encode())
    elif step < args.rl_iters:
        say(rank, f"stopped after step {step} of {args.rl_iters}; --resume continues")
    say(rank, outputs(run_dir))
    return policy


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
    worldio.save_grid(path, images, captions, cols=4)


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
    say(0, f"evaluating {resolve_ckpt(args.ckpt)} on {len(world.test_tasks)} held-out tasks")
    res = held_out_eval(model, tok, world, args)
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
    """UnifyBench metrics and the held-out mean reward (rollouts.held_out_eval) of Show-o on a real
    folder's test split: the --showo-dir model with fresh concept tokens, or an RL run of it (--ckpt,
    sampled and rewarded as it was trained). Written as eval_<folder>.json next to the checkpoint, or
    into <out-dir>/eval without one."""
    path, meta, weights, _ = read_checkpoint(args.ckpt, load_state=False) if args.ckpt else (None, {}, None, None)
    # its sampling, its vocabulary and its reward (the held-out mean reward is the objective it trained on)
    for k in ("cfg", "steps", "maskgit_sampler", "max_text", "concept_tokens", "tasks", "group", "reward_style",
              *[f"w_{name}" for name in rewards.DEFAULT_WEIGHTS]):
        setattr(args, k, meta.get("args", {}).get(k, getattr(args, k)))
    eargs = argparse.Namespace(**{**vars(args), "beta": 0.0, "dgs": 0, "concept_rows_only": False})  # no frozen reference
    device = "cuda" if torch.cuda.is_available() else "cpu"
    world, tok, policy, _ = from_files(showo.setup, eargs, device)
    if weights is not None:
        load_weights(policy, weights, path)
    eargs.image_mode = "ar" if policy.cfg.image_causal else "maskgit"
    where = dict(data_dir=os.path.abspath(args.data_dir), concepts=[c.name for c in world.concepts])
    folder = path or os.path.join(args.out_dir, "eval")
    out = os.path.join(folder, f"eval_{os.path.basename(where['data_dir'])}.json")
    check_eval_file(out, where)
    if not world.test_tasks:
        raise BadInput(f"{args.data_dir}: no test tasks (concept/test/<name>/vqa.json, text_only.json, t2i_conditions.json)")
    skipped = unifybench.skipped(world, world.test_tasks)
    if skipped:
        say(0, "skipped: " + ", ".join(f"{m} ({why})" for m, why in skipped.items()))
    checkpoint = path or os.path.abspath(args.showo_dir)
    say(0, f"evaluating {checkpoint} on {len(world.test_tasks)} test tasks (CFG {args.cfg}, {args.steps} MaskGIT steps, "
           f"{args.eval_draws} drawings per request, held-out reward on {args.eval_reward_prompts} prompts x G {args.group})")
    with amp(eargs, device):
        res = held_out_eval(policy, tok, world, eargs)
    res.update(skipped=skipped)
    os.makedirs(folder, exist_ok=True)
    write_eval(out, where, checkpoint, res, f"test split of {args.data_dir}", unifybench.METRICS + ["reward"])
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
