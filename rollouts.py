"""
Sync-GRPO's rollouts: P prompts x G rollouts of the reasoning loop (answer or state a fact, then draw
from it), sampled with Dynamic Group Scaling when on, scored by the reward ensemble; the learnability
diagnostics of a batch; the held-out evaluation, which samples the RL objective the same way.
No entry point: train.py calls collect() once per RL step.
"""
import argparse
import math
import random
import time
from dataclasses import dataclass, fields, replace
from typing import Protocol, runtime_checkable

import torch

import codebook
import data
import dgs
import eval as E
import rewards
import sampling as S
import unifybench


# Mode u asks every understanding question of the benchmark (recognition, VQA, text-only QA): trained on
# VQA alone, RL moved the shared yes/no answer and recognition fell from 0.85 to 0.51 (a constant "no").
# A plain placement request ("draw <c> in the top left") has a reasoning the model copies from the
# request, right in every rollout: a zero-variance text group, so mode r asks knowledge requests; plain
# requests stay in the held-out evaluation and the image-only ablation.
MIXES = {"both": ["recognition", "vqa", "textqa", "kgen"], "u": ["recognition", "vqa", "textqa"], "r": ["kgen"],
         "und": ["recognition", "vqa", "textqa"], "gen": ["kgen", "gen"]}


@runtime_checkable
class World(Protocol):
    """What the RL loop needs of a world; data.World (the embedded benchmark) and unifybench.Bench (a
    real UnifyBench folder) implement it."""
    codec: object  # image tokenizer: encode(images) -> codes, decode(codes) -> PIL images, grid
    test_tasks: list[data.Task]  # the held-out questions and drawing requests

    def sample_tasks(self, kinds: list[str], n: int, rng: random.Random) -> list[data.Task]:
        """n RL prompts of these task kinds about training concepts."""

    def draw_after_answer(self, task: data.Task) -> data.Task:
        """Mode u: the drawing request that follows an answer to `task`, conditioned on that answer."""

    def reward_ctx(self) -> dict:
        """What the rewards need besides the rollouts (scorers, reference images), fresh per batch."""

    def preview_score(self, gens: list[data.Task], codes: list[torch.Tensor]) -> list[float]:
        """DGS's cheap score of partly drawn images (one per request)."""

    def held_out(self) -> "World":
        """The same world drawing its RL prompts from held-out material: the held-out mean reward's."""

    def evaluate(self, model, tok, args) -> dict:
        """The held-out metrics of `model` on test_tasks, as eval.summary gives them: {metric: mean,
        "se": {metric: standard error}, "items": {metric: per-item scores}} (items paired across models)."""


def rollout_plan(task, mix, after=data.draw_after_answer):
    """(text prompt or None, what to draw or None) for one prompt of the reasoning loop.
    mode u: answer a question about an image, then draw the concept from that answer (`after`);
    mode r: state the fact the request needs, then draw; und / gen: one modality only (ablations)."""
    if mix == "und":
        return task, None
    if mix == "gen":
        return None, task
    return task, after(task) if task.kind in E.UNDERSTAND else task


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


def sample_partials(model, tok, task, gen_task, n, args, g, stop):
    """n fresh rollouts of one prompt, images sampled up to MaskGIT step (or AR token) `stop`."""
    p = Rollouts(finished=[True] * n)
    if task is not None:
        texts, toks, lp, valid = E.answer(model, tok, [tok.understanding_prompt(task)] * n, args.max_text, text_temperature(args), g)
        p = Rollouts(text=texts, toks=toks, lp=lp, mask=valid, finished=(toks == tok.eor_id).any(1).tolist())
    if gen_task is None:
        return p
    cut = args.first_sentence and task is not None and gen_task is not task  # mode u draws a new request after the answer
    reasons = [tok.encode(unifybench.first_sentence(x) if cut else x) for x in p.text] if task is not None else [[]] * n
    p.gen_prompts = [tok.generation_prompt(gen_task.concept, gen_task.question, r) for r in reasons]
    p.img = E.draw(model, tok, p.gen_prompts, rl_sampling(args), args.temperature, g, stop=stop)
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
    """The rollouts idx of a partial batch (lists and row tensors sliced alike, the drawing's too)."""
    if isinstance(p, Rollouts):
        return Rollouts(**{f.name: rows(getattr(p, f.name), idx) for f in fields(p)})
    if isinstance(p, dict):
        return {k: rows(v, idx) for k, v in p.items()}
    if torch.is_tensor(p) and p.dim() > 0:
        return p[idx]
    return [p[i] for i in idx] if isinstance(p, list) else p


def cat_rows(parts):
    """The rows of several partial batches, in order (text lengths padded to the longest)."""
    first = parts[0]
    if isinstance(first, Rollouts):
        return Rollouts(**{f.name: cat_rows([getattr(q, f.name) for q in parts]) for f in fields(first)})
    if isinstance(first, dict):
        return {k: cat_rows([q[k] for q in parts]) for k in first}
    if torch.is_tensor(first) and first.dim() > 0:
        return pad_cat(parts)
    return [x for q in parts for x in q] if isinstance(first, list) else first


def pad_cat(ts):
    """Concatenate rows whose last dim may differ (text lengths), padding with zeros on the right."""
    L = max(t.shape[-1] for t in ts) if ts[0].dim() > 1 else None
    return torch.cat([t if L is None else torch.nn.functional.pad(t, (0, L - t.shape[-1])) for t in ts])


def sample_group(model, tok, task, mix, args, g, dgs_state, world: World):
    """G rollouts of one prompt; with DGS, previews below tau are dropped and resampled (dgs.dgs_group)."""
    text_task, gen_task = rollout_plan(task, mix, world.draw_after_answer)
    if gen_task is None or not args.dgs:
        return sample_partials(model, tok, text_task, gen_task, args.group, args, g, None), text_task, gen_task, None
    preview_step = args.dgs_preview if args.image_mode == "maskgit" else args.dgs_preview * codebook.GRID

    def start(n):  # n fresh rollouts drawn up to the preview step, one Rollouts row each
        p = sample_partials(model, tok, text_task, gen_task, n, args, g, preview_step)
        return [rows(p, [i]) for i in range(n)]

    def score(partials):  # the world's cheap score of each preview
        return world.preview_score([gen_task] * len(partials), [q.img["pred"][0] for q in partials])

    def finish(partials):  # the kept previews drawn to the end, as one batch
        p = cat_rows(partials)
        p = replace(p, img=E.draw(model, tok, p.gen_prompts, rl_sampling(args), args.temperature, g, state=p.img))
        return [rows(p, [i]) for i in range(len(partials))]

    done, stats = dgs.dgs_group(start, score, finish, args.group, args.dgs_cap, dgs_state, args.dgs_batch)
    return cat_rows(done), text_task, gen_task, stats


def recognizer(model, tok):
    """Cycle-consistency judge: the policy's own p("yes") for "is <c> in the image ?" on its drawing."""
    yes, no = tok.encode("yes")[0], tok.encode("no")[0]

    @torch.no_grad()  # on the returned judge: a reward is never differentiated
    def recognize(concepts, codes):
        tasks = [data.Task("recognition", c, data.RECOGNITION.format(tok=c.token), "yes", image=x) for c, x in zip(concepts, codes)]
        ids, valid = S.pad_left([tok.understanding_prompt(t) for t in tasks], tok.pad_id, model.lm_head.weight.device)
        lp = S.subset_logprobs(model, model(ids, valid)[:, -1], torch.tensor([yes, no]))
        return lp[:, 0].exp().tolist()
    return recognize


def collect(model, tok, world: World, args, rank, step, dgs_state):
    """One RL batch: P prompts x G rollouts, their rewards and stored rollout log-probs."""
    dev = model.lm_head.weight.device
    g = torch.Generator(dev).manual_seed(hash((args.seed, rank, step)) % 2**63)  # resume replays the same rollouts
    rng = random.Random(f"{args.seed}/{rank}/{step}")
    tasks = world.sample_tasks(MIXES[args.tasks], args.rollouts // args.group, rng)
    model.eval()
    t0 = time.time()
    parts, rolls, stats = [], [], []
    for task in tasks:
        p, text_task, gen_task, st = sample_group(model, tok, task, args.tasks, args, g, dgs_state, world)
        parts.append(p)
        stats += [st] if st else []
        for i in range(args.group):
            rolls.append(rewards.Rollout(text_task or gen_task, gen_task, p.text[i] if p.text else None,
                                         p.img["codes"][i] if p.img is not None else None, p.finished[i]))
    t1 = time.time()
    weights = {k: getattr(args, "w_" + k) for k in rewards.DEFAULT_WEIGHTS}
    ctx = {"recognize": recognizer(model, tok), "reward_style": args.reward_style, **world.reward_ctx()}
    r_text, r_img, comps = rewards.ensemble(rolls, weights, ctx)
    batch = replace(cat_rows(parts), r_text=r_text.view(-1, args.group), r_img=r_img.view(-1, args.group), comps=comps,
                    text_prompts=[tok.understanding_prompt(t) for t in tasks for _ in range(args.group)] if parts[0].toks is not None else None,
                    preview=torch.tensor([s["scores"] for s in stats]) if stats else None)
    timing = dict(t_rollout=t1 - t0, t_reward=time.time() - t1)
    if stats:
        timing.update(dgs_attempts=sum(s["attempts"] for s in stats), dgs_above=sum(s["above"] for s in stats))
    return batch, rolls, timing


def diagnostics(batch, rolls, G):
    """Learnability of each reward component on one batch (dgs.learnability), the total reward's share
    of zero-variance groups, and the preview / final-reward correlation when previews were scored."""
    out = {}
    for name, v in batch.comps.items():
        applies = torch.tensor([rewards.applies(name, r) for r in rolls]).view(-1, G)
        out[name] = dgs.learnability(v.view(-1, G), applies)
    R = batch.reward()
    out["total"] = dgs.learnability(R, torch.ones_like(R, dtype=torch.bool), success=float("inf"))
    if batch.preview is not None:
        out["total"]["preview_corr"] = dgs.within_group_corr(batch.preview.float(), R)
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


def base_diagnostics(policy, tok, world, args):
    """Learnability of the RL task mix for the model as it is: --diag-prompts prompts x G rollouts on
    training concepts, every drawing previewed and kept (tau = -inf), so the preview / final-reward
    correlation is measured on unfiltered rollouts."""
    n = args.diag_prompts * args.group
    dargs = argparse.Namespace(**{**vars(args), "rollouts": n, "dgs": 1, "dgs_cap": args.group, "dgs_batch": args.group})
    batch, rolls, _ = collect(policy, tok, world, dargs, 0, -1, dgs.DGSState(tau=-math.inf))
    return diagnostics(batch, rolls, args.group)


def held_out_eval(policy, tok, world: World, args):
    """The world's held-out metrics (World.evaluate) plus the held-out mean reward: the RL objective
    itself on --eval-reward-prompts prompts of the run's task mix drawn from held-out material, G rollouts
    each, DGS off, from fixed seeds (the same for the base and the trained model: paired)."""
    t0 = time.time()
    res = world.evaluate(policy, tok, args)
    if args.eval_reward_prompts:
        hargs = argparse.Namespace(**{**vars(args), "rollouts": args.eval_reward_prompts * args.group, "dgs": 0})
        batch, _, _ = collect(policy, tok, world.held_out(), hargs, 0, -2, None)
        per_prompt = batch.reward().mean(1).tolist()
        res["reward"], res["se"]["reward"], res["items"]["reward"] = E.mean(per_prompt), E.stderr(per_prompt), per_prompt
    res["seconds"] = round(time.time() - t0, 1)
    return res
