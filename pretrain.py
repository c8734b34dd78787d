"""
Supervised pretraining of the base on the embedded world's task mix, on freshly generated concepts every
step (so the base belongs to no world), and the same examples as the RL loss's replay term (--ptx).
train.py runs it and then evaluates the base:

  OMP_NUM_THREADS=1 python train.py --stage pretrain   # the committed base/ recipe -> out/pretrain (~25 min, 2-core CPU)
  torchrun --nproc_per_node=2 train.py --stage pretrain # DDP: gloo on CPU, NCCL on CUDA
"""
import math
import os
import random
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from world import codebook
from world import data
import model as M
import sampling as S
from ckpt import JsonLog, from_files, restore, save_checkpoint, say
from world import tokenizer
from world import worldio


# Pretraining draws a task kind uniformly from this list, so recognition comes twice as often as the rest:
# at an equal share the base never learned it (a constant "yes" at every checkpoint up to 2000 steps), as
# no other task needs the image matched against the concept's description.
PRETRAIN_KINDS = ["recognition", "recognition", "vqa", "textqa", "gen", "kgen"]
WARMUP = 50     # optimizer steps of linear learning-rate warm-up
LOG_EVERY = 25  # steps between metric lines
P_UNCOND = 0.1  # share of drawing examples with the prompt dropped: CFG's unconditional branch


def world_and_tokenizer(args, rank=0):
    made = os.path.isfile(os.path.join(args.data_dir, "world.json"))
    world = from_files(worldio.ensure_world, args.data_dir, args.world_seed, args.n_train_concepts, args.n_test_concepts)
    say(rank, f"world: {'read' if made else 'wrote the embedded world to'} {args.data_dir} (seed {world.seed}, "
              f"{len(world.train)} training and {len(world.test)} held-out concepts)")
    return world, tokenizer.WordTokenizer(len(world.concepts))


def new_model(args, tok):
    cfg = M.Config(vocab_size=tok.vocab_size, n_layer=args.n_layer, n_head=args.n_embd // 32, n_embd=args.n_embd,
                   n_inner=4 * args.n_embd, image_offset=tok.image_offset, codebook_size=tok.codebook_size,
                   mask_id=tok.mask_id, pad_id=tok.pad_id, boi_id=tok.boi_id, eoi_id=tok.eoi_id,
                   image_causal=args.image_mode == "ar")
    return M.UnifiedModel(cfg)


def pretrain_example(tok, task, rng, args):
    """(ids, text targets, image targets): targets[t] is what the head at t must predict (-1 = none).
    Text is next-token; MaskGIT image targets sit at the masked positions themselves (Show-o)."""
    if task.kind in data.UNDERSTAND:
        prompt, ans = tok.understanding_prompt(task), tok.encode(task.answer) + [tok.eor_id]
        ids = prompt + ans
        text = [-1] * (len(prompt) - 1) + ans + [-1]
        return ids, text, [-1] * len(ids)
    # a few drawings without stated reasoning, so a generation-only ablation starts from a working base
    reason = tok.encode(task.answer) if rng.random() > P_UNCOND else []
    if rng.random() < P_UNCOND:  # prompt dropped: this row teaches the unconditional branch of CFG
        prompt, text = tok.uncond_prompt(), [-1, -1]
    else:
        prompt = tok.generation_prompt(task.concept, task.question, reason)
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
    ids, valid = S.pad_left([e[0] for e in examples], pad_id, device)
    tgts = [S.pad_left([[t + 1 for t in e[j]] for e in examples], 0, device)[0] - 1 for j in (1, 2)]
    return ids, valid, tgts[0], tgts[1]


def pretrain_batch(world, tok, rng, n, args, device):
    """n supervised examples of the pretraining mix on fresh random concepts (belonging to no world)."""
    # each concept needs its own identifier: a tiny world has fewer than n, and then concepts repeat
    concepts = data.random_concepts(min(n, len(world.concepts)), len(world.concepts), rng)
    tasks = data.make_tasks(concepts, PRETRAIN_KINDS, n, seed=rng.randrange(2**31))
    # half the VQA questions become mode-u drawings: draw the concept from the answer just given
    tasks = [data.draw_after_answer(t) if t.kind == "vqa" and rng.random() < 0.5 else t for t in tasks]
    return collate([pretrain_example(tok, t, rng, args) for t in tasks], tok.pad_id, device)


def pretrain(args, rank=0, world_size=1, device="cpu"):
    """--iters supervised steps of a new model; returns (world, tokenizer, model, run folder)."""
    world, tok = world_and_tokenizer(args, rank)
    run_dir = os.path.join(args.out_dir, "pretrain")
    os.makedirs(run_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    raw = new_model(args, tok).to(device)
    raw.grad_ckpt = args.grad_ckpt
    opt, sched = M.configure_optimizer(raw, args.lr, WARMUP, args.iters)
    step, seconds = 0, 0.0
    if args.resume:
        step, state = restore(run_dir, raw, opt, sched)
        seconds = state.get("seconds", 0.0)
    say(rank, f"pretraining the base: {args.iters} steps{f' from step {step}' if step else ''} -> {run_dir}")
    model = DDP(raw) if world_size > 1 else raw
    log = JsonLog(os.path.join(run_dir, "metrics.jsonl"), rank == 0, step)
    bar = tqdm(total=args.iters, initial=step, disable=rank != 0, desc="pretrain")
    t0 = time.time() - seconds  # `seconds` counts the training time of the steps logged, across resumes
    while step < args.iters:
        # data depends only on (seed, rank, step): a resumed run sees exactly the batches it would have
        rng = random.Random(f"{args.seed}/{rank}/{step}")
        raw.train()
        loss, lt, li = M.supervised_loss(model, raw, tok, pretrain_batch(world, tok, rng, args.batch, args, device))
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(raw.parameters(), M.GRAD_CLIP).item()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if step % LOG_EVERY == 0 or step == args.iters:
            log(dict(step=step, loss=loss.item(), loss_text=lt.item(), loss_image=li.item(), grad_norm=gnorm,
                     lr=sched.get_last_lr()[0], seconds=round(time.time() - t0, 1)))
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if rank == 0 and (step % args.ckpt_every == 0 or step == args.iters):
            save_checkpoint(run_dir, step, raw, dict(stage="pretrain", args=vars(args)),
                            dict(opt=opt.state_dict(), sched=sched.state_dict(), seconds=time.time() - t0))
    bar.close()
    if rank == 0:
        gen = [t for t in world.test_tasks if t.kind in ("gen", "kgen")][:16]
        save_samples(os.path.join(run_dir, "samples.png"), raw, tok, gen, args)
    return world, tok, raw, run_dir


def save_samples(path, model, tok, tasks, args):
    """PNG grid: each generation task's prompt, the model's reasoning and its drawing."""
    texts = S.answer(model, tok, [tok.understanding_prompt(t) for t in tasks], args.max_text)[0]
    prompts = [tok.generation_prompt(t.concept, t.question, tok.encode(x)) for t, x in zip(tasks, texts)]
    g = torch.Generator(model.lm_head.weight.device).manual_seed(0)
    codes = S.draw(model, tok, prompts, args.steps, args.cfg, args.maskgit_sampler, 1.0, g)["codes"]
    worldio.save_grid(path, [codebook.render(c) for c in codes], [f"{t.question} | {x}" for t, x in zip(tasks, texts)])
