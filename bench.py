"""
Speed and memory of nanosync's hot paths, each timed next to its slow twin in the same run.

  OMP_NUM_THREADS=1 python bench.py                  # tiny preset (train.py's default model), CPU, ~3-4 min
  OMP_NUM_THREADS=1 python bench.py --compile 0      # skip the torch.compile rows (~1 min less on a CPU)
  python bench.py --preset showo --device cuda       # Show-o 1.3B shape, random weights, bf16 autocast + SDPA
  OMP_NUM_THREADS=1 python bench.py --rl-step        # + one real train.py Sync-GRPO step: rollout/reward/update shares
  python bench.py --memory-options out/showo_random --threads 2   # only: one full-shape step per memory option
                                                     # (folder from tests/showo_fixture.py --shape full; ~8-12 min each on 2 CPU cores)

Throughput is measured on a rollout batch of --prompts x --group rows (train.py's default: 4 x 8);
the side-by-side comparisons run on one group (--group rows). Ratios > 1 mean the fast path wins:
  decode_vs_naive            static KV cache vs recomputing the whole sequence per token
  decode_vs_hf_generate      our eager decode vs transformers PhiForCausalLM.generate, same weights, greedy
  cfg_batched_vs_two_pass    MaskGIT with cond+uncond rows in one forward vs two forwards per step (the
                             two-pass twin lives here: TwoPass splits each step's forward of sample_maskgit)
  maskgit_kv_reuse_vs_recompute  MaskGIT with each distinct prompt's keys/values computed once vs the
                             whole sequence recomputed at every step (one group: G rows of one prompt)
  scorer_kv_reuse_vs_recompute   the update's scoring (train.score_batch: text + MaskGIT, forward + backward)
                             with distinct prompts run once vs every row's full sequence
  rl_step_fast_vs_slow       --rl-step: one train.py RL step (train.collect, then train.rl_update) with every
                             prompt recomputed (sampling's decode, draw, answer_hidden and maskgit_logprobs with
                             reuse_prompt=False, swapped in on the sampling module for that step only) / with
                             the fast paths, from the same weights and seed
  formulas_compiled_vs_eager train.py's loss formulas (group advantages, clip, k3, segment mean) through
                             train.formula's torch.compile vs their .eager functions
  logprob_chunked_time       chunked / full-logits log-prob + loss, forward + backward (< 1 is faster)
  logprob_chunked_memory     peak memory of the same, chunked / full
  memory_options             --memory-options: one train.py Sync-GRPO step per way of bounding the update's
                             memory (concept rows only, gradient checkpointing), each in its own process: wall
                             time, peak resident memory (a process past --memory-limit is stopped: does not
                             fit), first-update ratio deviation
Every fast path is checked against its twin in the run (equal tokens/codes, log-probs within 1e-5).
Peak memory: CUDA max_memory_allocated; CPU peak resident set (VmHWM, reset per section through
/proc/self/clear_refs). On CUDA also MFU and memory-bandwidth utilisation against the peak table.
Writes everything to --out as JSON.
"""
import argparse
import contextlib
import copy
import ctypes
import dataclasses
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

import ckpt
import dgs
import flags
import model as M
import pretrain
import sampling as S
import train
from world import codebook, tokenizer

# dense bf16 FLOP/s and HBM bytes/s; the first name contained in torch.cuda.get_device_name() wins
PEAKS = [("H200", 989e12, 4.8e12), ("H100 PCIe", 756e12, 2.0e12), ("H100", 989e12, 3.35e12),
         ("A100", 312e12, 2.0e12)]
SHOWO = dict(vocab=58498, codebook=8192, layers=24, width=2048, heads=32, image_tokens=1024, steps=16)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", default="tiny", choices=["tiny", "showo"],
      help="tiny = train.py's default model on the embedded world's vocabulary; showo = Show-o 1.3B shape (random weights, meant for CUDA)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: cuda if available)")
    a("--group", type=int, default=8, help="G: rollouts per prompt, and the batch of every side-by-side comparison (rows)")
    a("--prompts", type=int, default=0, help="prompts per rollout batch (0 = preset's: 4 tiny, as train.py; 1 showo)")
    a("--prompt-len", type=int, default=64, help="tokens per random prompt (int)")
    a("--new-tokens", type=int, default=64, help="text tokens decoded per row (int)")
    a("--maskgit-steps", dest="steps", type=int, default=0, help="MaskGIT steps T (0 = preset's: 8 tiny, 16 showo)")
    a("--cfg", type=float, default=1.0, help="CFG weight w of image rollouts (> 0: cond and uncond rows)")
    a("--update-steps", type=int, default=0, help="MaskGIT steps scored per update (0 = preset's: 2 tiny as train.py, 1 showo)")
    a("--layers", type=int, default=0, help="override the preset's transformer blocks (0 = preset's)")
    a("--width", type=int, default=0, help="override the preset's width (0 = preset's)")
    a("--heads", type=int, default=0, help="override the preset's attention heads (0 = preset's: width // 32 tiny, as train.py; 32 showo)")
    a("--image-tokens", type=int, default=0, help="override the preset's image tokens (0 = preset's: 64 tiny, 1024 showo)")
    a("--lp-vocab", type=int, default=58498, help="log-prob comparison: vocabulary (ids)")
    a("--lp-tokens", type=int, default=1024, help="log-prob comparison: scored tokens per row (int)")
    a("--lp-batch", type=int, default=4, help="log-prob comparison: rows (int)")
    a("--lp-width", type=int, default=0, help="log-prob comparison: hidden width (0 = 64 on CPU, 2048 on CUDA)")
    a("--chunk", type=int, default=256, help="rows per log-prob chunk in the chunked path (int)")
    a("--compile", type=int, default=1, choices=[0, 1], help="1 = also time train.py's torch.compile'd loss formulas")
    a("--rl-step", action="store_true", help="also run one train.py RL step on the tiny default, with the fast paths and "
      "with every prompt recomputed, and report time shares")
    a("--rl-base", default=None, help="--rl-step: base checkpoint to load (default: random weights)")
    a("--rl-profile", type=int, default=0, help="--rl-step: print this many top ops (by self CPU time) of the profiled fast RL step (0 = no profile)")
    a("--data-dir", default="out/world", help="--rl-step: embedded world folder (written there if missing)")
    a("--memory-options", default=None, help="folder of tests/showo_fixture.py (any shape): run only the memory-option steps on it")
    a("--memory-limit", type=float, default=22.0, help="--memory-options: stop a step past this resident memory (GB)")
    a("--reps", type=int, default=3, help="timed repeats after one warm-up; the median is reported (int)")
    a("--threads", type=int, default=0, help="torch CPU threads (0 = torch default / OMP_NUM_THREADS)")
    a("--seed", type=int, default=0, help="seed of weights, prompts and sampling (int)")
    a("--out", default="out/bench.json", help="JSON output path (folder created)")
    args = p.parse_args(argv)
    tiny = args.preset == "tiny"  # preset defaults where a flag is left at 0
    args.prompts = args.prompts or (4 if tiny else 1)
    args.steps = args.steps or (8 if tiny else SHOWO["steps"])
    args.update_steps = args.update_steps or (2 if tiny else 1)
    return args


# ----------------------------------------------------------------------------- timing and memory

def amp(dev):  # bf16 autocast on CUDA (SDPA picks the flash / memory-efficient kernels), fp32 on CPU
    return ckpt.amp(dev.type == "cuda", dev)


@contextlib.contextmanager
def formulas_compiled(on):
    """train.py's formulas through torch.compile (on) or eager inside the block; the switch restored after."""
    before = train.COMPILE["on"]
    train.COMPILE["on"] = on
    try:
        yield
    finally:
        train.COMPILE["on"] = before


# what prompt_recompute swaps: each takes reuse_prompt=False as a keyword (train.py and sampling.answer pass
# only the arguments before it); sampling.draw passes reuse_prompt to sample_maskgit itself
RECOMPUTED = ("sample_text", "draw", "answer_hidden", "maskgit_logprobs")


@contextlib.contextmanager
def prompt_recompute():
    """Inside the block every sampler and scorer that reuses a prompt's keys/values recomputes the whole
    sequence per row instead (reuse_prompt=False): text decode prefill, MaskGIT drawing, the text and
    MaskGIT scorers. The sampling module's own functions are put back after, whatever happens."""
    saved = {name: getattr(S, name) for name in RECOMPUTED}
    try:
        for name, fn in saved.items():
            setattr(S, name, functools.partial(fn, reuse_prompt=False))
        yield
    finally:
        for name, fn in saved.items():
            setattr(S, name, fn)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def proc_kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def reset_peak(dev):
    """Start a memory section; returns the MB in use now (the baseline of a peak delta)."""
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    with contextlib.suppress(OSError, AttributeError):  # freed heap back to the OS, or a section could
        ctypes.CDLL("libc.so.6").malloc_trim(0)        # reuse an earlier one's pages and read no growth
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets this process's peak RSS (VmHWM), so each section reads its own peak
    return proc_kb("VmRSS") / 1024


def peak_mb(dev):
    sync(dev)
    return torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else proc_kb("VmHWM") / 1024


def timed(fn, dev, reps):
    """(median seconds, warm-up seconds, last output): one warm-up call (compiles, fills caches), then reps."""
    times = []
    for _ in range(reps + 1):
        sync(dev)
        t = time.perf_counter()
        with amp(dev):
            out = fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:]), times[0], out


def pair(fast, slow, dev, reps):
    """Time a fast path and its slow twin: (fast s, slow s, fast warm-up s, fast output, slow output).
    The outputs to check are fp32: on CPU the timed ones, on CUDA a rerun without autocast."""
    (tf, wf, a), (ts, _, b) = timed(fast, dev, reps), timed(slow, dev, reps)
    return (tf, ts, wf) + ((fast(), slow()) if dev.type == "cuda" else (a, b))


def utilisation(dev, flops, nbytes, secs):
    """MFU and bandwidth utilisation against the device's peaks (CUDA only)."""
    peak = dev.type == "cuda" and next(((f, b) for n, f, b in PEAKS if n in torch.cuda.get_device_name(dev)), None)
    if not peak:
        return {}
    return dict(mfu=flops / secs / peak[0], **({"bw_util": nbytes / secs / peak[1]} if nbytes else {}))


def fwd_flops(model, tokens, ctx):
    """~FLOPs of a forward over `tokens` positions attending to ~ctx keys: 2 per weight + attention."""
    c = model.cfg
    n = sum(p.numel() for p in model.parameters()) - model.embed_tokens.weight.numel()
    return tokens * (2 * n + 4 * c.n_layer * c.n_embd * ctx)


# ----------------------------------------------------------------------------- models and prompts

def build(args, dev):
    """(model, tokenizer, image tokens) for the preset; random weights, no training."""
    torch.manual_seed(args.seed)
    if args.preset == "tiny":
        targs = flags.get_args([])  # train.py's defaults (4 layers, width 128, a head per 32 dims, MaskGIT) unless overridden
        targs.n_layer, targs.n_embd = args.layers or targs.n_layer, args.width or targs.n_embd
        # as pretrain.world_and_tokenizer, without writing the world: the vocabulary depends on the count only
        tok = tokenizer.WordTokenizer(targs.n_train_concepts + targs.n_test_concepts)
        model = pretrain.new_model(targs, tok)
        if args.heads:  # train.py's models have one head per 32 dims; --heads overrides that
            torch.manual_seed(args.seed)
            model = M.UnifiedModel(dataclasses.replace(model.cfg, n_head=args.heads))
        return model.to(dev).eval(), tok, args.image_tokens or codebook.N_IMG
    V, K = SHOWO["vocab"], SHOWO["codebook"]
    off, d = V - K - 1, args.width or SHOWO["width"]  # Show-o: text ids, then 8192 codes, then <mask>
    tok = SimpleNamespace(pad_id=0, bos_id=1, boi_id=3, eoi_id=4, bor_id=5, eor_id=6, mask_id=V - 1, image_offset=off,
                          codebook_size=K, vocab_size=V, text_ids=lambda: torch.tensor([6, *range(8, off)]))
    cfg = M.Config(vocab_size=V, n_layer=args.layers or SHOWO["layers"], n_head=args.heads or SHOWO["heads"], n_embd=d,
                   n_inner=4 * d, image_offset=off, codebook_size=K, mask_id=V - 1, pad_id=0, boi_id=3, eoi_id=4)
    return M.UnifiedModel(cfg).to(dev).eval(), tok, args.image_tokens or SHOWO["image_tokens"]


def text_prompts(tok, n, length, g):
    """[bos] random words [bor]: plain text ids only, so no image block opens in the prompt."""
    words = tok.text_ids()[1:]  # [0] is <eor>
    return [[tok.bos_id] + words[torch.randint(len(words), (length - 2,), generator=g)].tolist() + [tok.bor_id]
            for _ in range(n)]


# ----------------------------------------------------------------------------- the slow twins

@torch.no_grad()
def naive_decode(model, prompts, max_new, allowed, temperature=0.0, generator=None):
    """S.sample_text without the cache: the whole sequence is recomputed for every new token.
    Same heads and sampling (subset_logprobs, pick); no stop tokens."""
    dev = model.lm_head.weight.device
    ids, valid = S.pad_left(prompts, model.cfg.pad_id, dev)
    allowed, toks, lps = allowed.to(dev), [], []
    rows = S.head_rows(model, allowed)  # as sample_text: the head rows gathered once, not per token
    for _ in range(max_new):
        lp = S.subset_logprobs(model, model.hidden(ids, valid)[:, -1], allowed, temperature, rows)
        j = S.pick(lp, temperature, generator=generator)
        toks.append(allowed[j])
        lps.append(lp.gather(-1, j[:, None])[:, 0])
        ids, valid = torch.cat((ids, toks[-1][:, None]), 1), torch.cat((valid, torch.ones_like(valid[:, :1])), 1)
    return torch.stack(toks, 1), torch.stack(lps, 1)


def maskgit_recompute(model, cond, uncond, n_tokens, steps, cfg_w, temperature=1.0, generator=None):
    """S.sample_maskgit recomputing the prompt at every step instead of reusing its keys/values."""
    return S.sample_maskgit(model, cond, uncond, n_tokens, steps, cfg_w, temperature, generator, reuse_prompt=False)


class TwoPass:
    """The model with each per-step forward of S.sample_maskgit (`hidden`, or `hidden_after` when the prompt's
    keys/values are reused) run as two forwards, the conditional rows [:B] and then the unconditional rows
    [B:], concatenated; every other attribute (cfg, lm_head, prompt_kv, ...) is the model's own."""

    def __init__(self, model, B):
        self.model, self.B = model, B

    def __getattr__(self, name):  # only called for what the wrapper itself lacks
        if name == "model":  # not set yet (a copy in the making): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    def _split(self, fwd, rows):
        if rows <= self.B:  # no CFG: only conditional rows
            return fwd(slice(None))
        return torch.cat((fwd(slice(None, self.B)), fwd(slice(self.B, None))))

    def hidden(self, idx, valid):
        return self._split(lambda r: self.model.hidden(idx[r], valid[r]), len(idx))

    def hidden_after(self, past, pre_valid, idx, valid, causal=False):
        return self._split(lambda r: self.model.hidden_after([(k[r], v[r]) for k, v in past], pre_valid[r], idx[r],
                                                             valid[r], causal), len(idx))


def maskgit_two_pass(model, cond, uncond, n_tokens, steps, cfg_w, temperature=1.0, generator=None):
    """S.sample_maskgit with cond and uncond rows in two forwards per step instead of one batched one."""
    return S.sample_maskgit(TwoPass(model, len(cond)), cond, uncond, n_tokens, steps, cfg_w, temperature, generator)


def full_vs_chunked_loss(head, h, tgt, adv, chunk):
    """train.py's loss arithmetic on token_logprobs (its eager formulas); chunk = 0 materialises all [rows, vocab] logits."""
    lp, _ = S.token_logprobs(head, h, tgt, chunk=chunk)
    obj, _ = train.ppo_clip.eager(lp, lp.detach(), adv, 0.2)
    return train.segment_mean.eager(obj, tgt >= 0)


# ----------------------------------------------------------------------------- sections

def bench_text(model, tok, args, dev, res):
    g = torch.Generator().manual_seed(args.seed)
    P, G, N, T, allowed = args.prompts, args.group, args.new_tokens, args.prompt_len, tok.text_ids()
    rows = [p for p in text_prompts(tok, P, T, g) for _ in range(G)]
    distinct = text_prompts(tok, G, T, g)  # the comparisons decode G different prompts
    gen, base = torch.Generator(dev).manual_seed(args.seed), reset_peak(dev)
    t, _, roll = timed(lambda: S.sample_text(model, rows, N, allowed, [], 1.0, generator=gen), dev, args.reps)
    nbytes = N * (2 * sum(p.numel() for p in model.parameters()) + 8 * model.cfg.n_layer * len(rows) * model.cfg.n_embd * (T + N / 2))
    res["text_rollout"] = dict(rows=len(rows), new_tokens=N, seconds=t, tokens_per_s=len(rows) * N / t,
                               peak_mb=peak_mb(dev), baseline_mb=base,
                               **utilisation(dev, fwd_flops(model, len(rows) * (T + N), T + N / 2), nbytes, t))
    # one group, greedy: cached vs naive must agree token for token
    fast = lambda: S.sample_text(model, distinct, N, allowed, [], 0.0)
    slow = lambda: naive_decode(model, distinct, N, allowed, 0.0)
    t_fast, t_slow, _, a, b = pair(fast, slow, dev, args.reps)
    res["decode_vs_naive"] = dict(cached_s=t_fast, naive_s=t_slow, ratio=t_slow / t_fast, tokens_equal=torch.equal(a[0], b[0]),
                                  max_lp_diff=(a[1] - b[1]).abs().max().item())
    return dict(prompts=rows, toks=roll[0], lp=roll[1], mask=roll[2])


def bench_hf(c, args, dev, res):
    """Our decode vs PhiForCausalLM.generate on identical weights: a pure-text model of the preset's shape."""
    from transformers import PhiConfig, PhiForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    hf = PhiForCausalLM(PhiConfig(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.n_inner,
                                  num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, partial_rotary_factor=c.rotary_frac,
                                  max_position_embeddings=4096, bos_token_id=None, eos_token_id=None, pad_token_id=0)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = M.from_pretrained(tmp).to(dev).eval()
    hf = hf.to(dev)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(1, c.vocab_size, (args.group, args.prompt_len), generator=g)  # equal lengths: no padding
    N, allowed = args.new_tokens, torch.arange(c.vocab_size)
    ours_fn = lambda: S.sample_text(ours, ids.tolist(), N, allowed, [], 0.0)
    hf_fn = lambda: hf.generate(ids.to(dev), attention_mask=torch.ones_like(ids).to(dev), max_new_tokens=N,
                                do_sample=False, use_cache=True, pad_token_id=0)[:, ids.shape[1]:]
    t_ours, t_hf, _, a, b = pair(ours_fn, hf_fn, dev, args.reps)
    a, b = a[0], b.to(a[0].device)
    res["decode_vs_hf_generate"] = dict(ours_s=t_ours, hf_s=t_hf, ratio=t_hf / t_ours, tokens_equal=torch.equal(a, b),
                                        token_match=(a == b).float().mean().item())


def bench_images(model, tok, n_img, args, dev, res):
    g = torch.Generator().manual_seed(args.seed + 1)
    cond = [p[:-1] + [tok.eor_id, tok.boi_id] for p in text_prompts(tok, args.prompts, args.prompt_len, g)]
    rows = [p for p in cond for _ in range(args.group)]
    unc = [tok.uncond_prompt()] * len(rows)
    gen, base = torch.Generator(dev).manual_seed(args.seed), reset_peak(dev)
    t, _, st = timed(lambda: S.sample_maskgit(model, rows, unc, n_img, args.steps, args.cfg, 1.0, gen), dev, args.reps)
    seq = args.prompt_len + 1 + n_img
    res["image_rollout"] = dict(rows=len(rows), steps=args.steps, cfg=args.cfg, seconds=t, rollouts_per_s=len(rows) / t,
                                peak_mb=peak_mb(dev), baseline_mb=base,
                                **utilisation(dev, fwd_flops(model, 2 * len(rows) * seq * args.steps, seq), 0, t))
    G, w = args.group, args.cfg or 1.0  # the comparison needs the uncond rows: CFG on
    seeded = lambda f: lambda: f(model, rows[:G], unc[:G], n_img, args.steps, w, 1.0, torch.Generator(dev).manual_seed(7))
    t_b, t_2, _, a, b = pair(seeded(S.sample_maskgit), seeded(maskgit_two_pass), dev, args.reps)
    res["cfg_batched_vs_two_pass"] = dict(batched_s=t_b, two_pass_s=t_2, ratio=t_2 / t_b, codes_equal=torch.equal(a["codes"], b["codes"]),
                                          max_lp_diff=(a["logprobs"] - b["logprobs"]).abs().max().item())
    t_r, t_c, _, a, b = pair(seeded(S.sample_maskgit), seeded(maskgit_recompute), dev, args.reps)
    res["maskgit_kv_reuse_vs_recompute"] = dict(reuse_s=t_r, recompute_s=t_c, ratio=t_c / t_r, codes_equal=torch.equal(a["codes"], b["codes"]),
                                                max_lp_diff=(a["logprobs"] - b["logprobs"]).abs().max().item())
    return dict(cond=rows, state=st)


def bench_update(model, tok, n_img, args, dev, text, img, res):
    """train.rl_update (mu = 1, no KL reference, eager formulas) on the rollout batch above: score forward,
    loss, backward, grad clip. SGD(lr=0) steps, so AdamW's state is not what is measured."""
    targs = flags.get_args(["--no-compile", "--mu", "1", "--beta", "0", "--group", str(args.group), "--rollouts",
                            str(args.prompts * args.group), "--maskgit-steps", str(args.steps), "--update-steps", str(args.update_steps),
                            "--rl-cfg", str(args.cfg)])
    P, G = args.prompts, args.group
    batch = train.Rollouts(text_prompts=text["prompts"], toks=text["toks"], lp=text["lp"], mask=text["mask"], gen_prompts=img["cond"],
                           img=img["state"], r_text=torch.rand(P, G), r_img=torch.rand(P, G))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    base = reset_peak(dev)
    step = lambda: train.rl_update(model, model, None, tok, batch, train.advantages(batch, targs, 0), opt, sched, targs)
    t, _, stats = timed(step, dev, args.reps)
    model.eval()
    seq, k = args.prompt_len + 1 + n_img, args.update_steps
    tokens = P * G * (args.prompt_len + args.new_tokens + 2 * k * seq)
    res["update"] = dict(rollouts=P * G, ms=1e3 * t, peak_mb=peak_mb(dev), baseline_mb=base,
                         ratio_dev_first=max(stats.get("text_ratio_dev_first", 0), stats.get("image_ratio_dev_first", 0)),
                         **utilisation(dev, 3 * fwd_flops(model, tokens, seq), 0, t))

    def scored(steps_sel, reuse=True):
        """train.score_batch forward + backward, reusing prompts' keys/values or (reuse=False) recomputing
        every row's whole sequence: (log-probs, gradients), both fp32."""
        def run():
            model.zero_grad(set_to_none=True)
            with contextlib.nullcontext() if reuse else prompt_recompute():
                out = train.score_batch(model, model, tok, batch, targs, steps_sel)
            sum((lp * m).sum() / m.sum().clamp(min=1) for lp, m, _ in out.values()).backward()
            return [v[0].detach().float() for v in out.values()], [p.grad.float().clone() for p in model.parameters() if p.grad is not None]
        return run

    def diff(a, b):
        return max((x - y).abs().max().item() for x, y in zip(a, b))
    sel = train.surprising_steps(batch.img, args.steps, args.update_steps)
    t_r, t_c, _, a, b = pair(scored(sel), scored(sel, reuse=False), dev, args.reps)
    res["scorer_kv_reuse_vs_recompute"] = dict(reuse_s=t_r, recompute_s=t_c, ratio=t_c / t_r, max_lp_diff=diff(a[0], b[0]),
                                               max_grad_diff=diff(a[1], b[1]))
    model.eval()


def bench_logprob(args, dev, res):
    """Chunked vs full-logits log-prob + loss, forward + backward, on a head of --lp-vocab ids."""
    V, d = args.lp_vocab, args.lp_width or (2048 if dev.type == "cuda" else 64)
    torch.manual_seed(args.seed)
    head = M.UnifiedModel(M.Config(vocab_size=V, n_layer=0, n_head=1, n_embd=d, n_inner=d)).to(dev)
    h0 = torch.randn(args.lp_batch, args.lp_tokens, d, device=dev)
    tgt = torch.randint(V, (args.lp_batch, args.lp_tokens), device=dev)
    adv = torch.randn(args.lp_batch, 1, device=dev)
    out = {}
    for name, chunk in (("chunked", args.chunk), ("full", 0)):  # chunked first: a fresh heap for it
        def step():
            head.zero_grad(set_to_none=True)
            h = h0.clone().requires_grad_()
            total = full_vs_chunked_loss(head, h, tgt, adv, chunk)
            total.backward()
            return total.detach().float(), h.grad.float()
        base = reset_peak(dev)
        t, _, o = timed(step, dev, args.reps)
        out[name] = dict(seconds=t, peak_delta_mb=peak_mb(dev) - base, result=o if dev.type != "cuda" else step())
    a, b = out["chunked"].pop("result"), out["full"].pop("result")
    res["logprob"] = dict(vocab=V, tokens=args.lp_tokens, batch=args.lp_batch, width=d, chunk=args.chunk, **out,
                          time_ratio=out["chunked"]["seconds"] / out["full"]["seconds"],
                          memory_ratio=out["chunked"]["peak_delta_mb"] / max(out["full"]["peak_delta_mb"], 1e-9),
                          max_loss_diff=(a[0] - b[0]).abs().item(), max_grad_diff=(a[1] - b[1]).abs().max().item())


FORMULAS = ("group_advantages", "ppo_clip", "k3_kl", "segment_mean")


def bench_formulas(n_img, args, dev, res):
    """train.py's formulas compiled (train.formula with train.COMPILE on) vs their .eager functions on one RL
    batch's shapes: advantages, clip, k3, segment mean, backward."""
    g = torch.Generator().manual_seed(args.seed)
    P, G = args.prompts, args.group
    R, mask = torch.rand(P, G, generator=g).to(dev), (torch.rand(P * G, n_img, generator=g) > 0.2).to(dev)
    lp0 = (-2 + 0.1 * torch.randn(P * G, n_img, generator=g)).to(dev)
    old, ref = lp0 + 0.01 * torch.randn_like(lp0), lp0 + 0.05 * torch.randn_like(lp0)

    def run(eager):
        F = {name: getattr(train, name).eager if eager else getattr(train, name) for name in FORMULAS}
        lp = lp0.clone().requires_grad_()
        A = F["group_advantages"](R, "std").flatten()[:, None]
        obj, _ = F["ppo_clip"](lp, old, A, 0.2)
        total = F["segment_mean"](obj + 0.01 * F["k3_kl"](lp, ref), mask)
        total.backward()
        return total.detach(), lp.grad
    t_e, _, a = timed(lambda: run(True), dev, max(args.reps, 5))
    with formulas_compiled(True):
        t_c, t_first, b = timed(lambda: run(False), dev, max(args.reps, 5))
    res["formulas_compiled_vs_eager"] = dict(eager_ms=1e3 * t_e, compiled_ms=1e3 * t_c, ratio=t_e / t_c, compile_s=t_first - t_c,
                                             max_diff=max((a[0] - b[0]).abs().item(), (a[1] - b[1]).abs().max().item()))


def bench_rl_step(args, res):
    """One train.py Sync-GRPO step on the tiny default (CPU): train.collect (rollouts + rewards), then
    train.advantages and train.rl_update (its optimizer step; no replay batch), eager formulas; once with the
    fast paths (train.py's defaults) and once with every prompt recomputed (prompt_recompute: sampling's
    decode, draw, answer_hidden and maskgit_logprobs with reuse_prompt=False), from the same weights and seed."""
    out = {}
    for name, slow in (("fast", False), ("slow", True)):  # fast first: it pays any first-call costs
        targs = flags.get_args(["--data-dir", args.data_dir, "--no-compile"])  # compile time is not a step's time
        world, tok = pretrain.world_and_tokenizer(targs)
        torch.manual_seed(args.seed)
        policy = ckpt.load_checkpoint(args.rl_base)[0] if args.rl_base else pretrain.new_model(targs, tok)
        ref = copy.deepcopy(policy).requires_grad_(False).eval()
        opt, sched = M.configure_optimizer(policy, targs.rl_lr, train.RL_WARMUP, targs.rl_iters * targs.mu)
        prof = torch.profiler.profile() if args.rl_profile and name == "fast" else contextlib.nullcontext()
        with prof, prompt_recompute() if slow else contextlib.nullcontext():
            batch, _, row = train.collect(policy, tok, world, targs, 0, 0, dgs.DGSState() if targs.dgs else None,
                                          targs.rollouts // targs.group)
            t = time.perf_counter()
            A = train.advantages(batch, targs, 0)
            stats = train.rl_update(policy, policy, ref, tok, batch, A, opt, sched, targs)
            row["t_update"] = time.perf_counter() - t
        if args.rl_profile and name == "fast":
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rl_profile))
        total = row["t_rollout"] + row["t_reward"] + row["t_update"]
        out[name] = dict(seconds=total, **{k[2:] + "_s": row[k] for k in ("t_rollout", "t_reward", "t_update")},
                         **{k[2:] + "_share": row[k] / total for k in ("t_rollout", "t_reward", "t_update")},
                         dgs_attempts_per_rollout=row.get("dgs_attempts_per_rollout"),
                         ratio_dev_first=max(stats.get("text_ratio_dev_first", 0), stats.get("image_ratio_dev_first", 0)))
    res["rl_step"] = dict(weights=args.rl_base or "random", **out["fast"], slow=out["slow"])
    res["rl_step_fast_vs_slow"] = dict(ratio=out["slow"]["seconds"] / out["fast"]["seconds"])


MEMORY_OPTIONS = {  # name -> train.py flags (--bf16: pi_old from one scoring pass, so the first ratio is 1)
    "rows + ckpt": ["--concept-rows-only", "--grad-ckpt"],
    "ckpt, every weight trained": ["--no-concept-rows-only", "--grad-ckpt"],
}


def bench_memory_options(args, res):
    """One Sync-GRPO step of train.py --preset showo (bf16, 2 rollouts, G 2, beta 0, mu 1, --maskgit-steps,
    --update-steps) on a tests/showo_fixture.py folder per memory option, each in a fresh process so that
    its peak resident memory (ru_maxrss of that child) is its own."""
    root, out = os.path.abspath(args.memory_options), {}
    folders = {k: os.path.join(root, name) for k, name in (("showo-dir", "showo"), ("magvit-dir", "magvit"),
               ("tokenizer-dir", "tokenizer"), ("clip-dir", "clip"), ("dino-dir", "dino"), ("data-dir", "data"))}
    if not all(os.path.isdir(f) for f in folders.values()):
        raise SystemExit(f"--memory-options {root}: expected the folders of tests/showo_fixture.py ({', '.join(folders)})")
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.path.join(here, "tests"))  # the fixture's judge
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    for name, extra in MEMORY_OPTIONS.items():
        run_dir = tempfile.mkdtemp(prefix="memopt")
        cmd = [sys.executable, os.path.join(here, "train.py"), "--preset", "showo", "--bf16", "--beta", "0",
               "--group", "2", "--rollouts", "2", "--no-dgs", "--mu", "1", "--rl-iters", "1", "--no-compile",
               "--diag-prompts", "0", "--maskgit-steps", str(args.steps), "--update-steps", str(args.update_steps),
               "--judge", "showo_fixture:judge_not_dark", "--out-dir", run_dir,
               *[x for k, v in folders.items() for x in ("--" + k, v)], *extra]
        t0, fits = time.time(), True
        with open(os.path.join(run_dir, "log.txt"), "w+") as log:
            child = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            while not (done := os.wait4(child.pid, os.WNOHANG))[0]:
                # the limit is checked from outside: an out-of-memory kill could take the machine with it
                with contextlib.suppress(OSError, StopIteration), open(f"/proc/{child.pid}/status") as f:
                    if next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) > args.memory_limit * 2**20:
                        child.kill()
                        fits = False
                time.sleep(0.5)
            child.returncode = os.waitstatus_to_exitcode(done[1])
            log.seek(0)
            tail = log.read()[-2000:]
        row = dict(flags=" ".join(extra), seconds=round(time.time() - t0, 1), fits=fits, peak_gb=done[2].ru_maxrss / 2**20)
        metrics = os.path.join(run_dir, "rl", "metrics.jsonl")
        if fits and child.returncode == 0 and os.path.isfile(metrics):
            with open(metrics) as f:
                m = json.loads(f.readline())
            row.update({k: m[k] for k in ("t_rollout", "t_reward", "t_update", "text_ratio_dev_first", "image_ratio_dev_first")})
        elif fits:
            row["error"] = tail
        out[name] = row
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"{name:52s}", f"does not fit: stopped past {row['peak_gb']:.1f} GB after {row['seconds']:.0f} s" if not fits else
              f"failed: {row['error'].strip().splitlines()[-1]}" if "error" in row else
              f"{row['seconds']:5.0f} s, peak {row['peak_gb']:4.1f} GB (rollouts {row['t_rollout']:.0f} s, update {row['t_update']:.0f} s); "
              f"first-update ratio deviation text {row['text_ratio_dev_first']:.1e}, image {row['image_ratio_dev_first']:.1e}", flush=True)
    res["memory_options"] = out


# ----------------------------------------------------------------------------- main

TARGETS = {"decode_vs_naive": (">=", 3.0), "decode_vs_hf_generate": (">=", 1.5), "cfg_batched_vs_two_pass": (">=", 1.5),
           "maskgit_kv_reuse_vs_recompute": (">=", 1.5), "scorer_kv_reuse_vs_recompute": (">=", 1.0),
           "rl_step_fast_vs_slow": (">=", 2.0), "logprob_chunked_memory": ("<=", 0.35), "logprob_chunked_time": ("<=", 1.2),
           "formulas_compiled_vs_eager": (">=", 1.0)}


def main(argv=None):
    with formulas_compiled(False):  # eager formulas except where bench_formulas compares: compile time is no step's
        return run_all(get_args(argv))


def run_all(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    res = dict(args=vars(args), device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               threads=torch.get_num_threads())
    if args.memory_options:
        bench_memory_options(args, res)
        return write_json(res, args.out)
    model, tok, n_img = build(args, dev)
    res["model"] = dict(n_layer=model.cfg.n_layer, n_embd=model.cfg.n_embd, n_head=model.cfg.n_head, vocab=model.cfg.vocab_size,
                        image_tokens=n_img, params=sum(p.numel() for p in model.parameters()))
    text = bench_text(model, tok, args, dev, res)
    img = bench_images(model, tok, n_img, args, dev, res)
    bench_update(model, tok, n_img, args, dev, text, img, res)
    cfg = model.cfg
    del model, text, img
    bench_hf(cfg, args, dev, res)  # the preset's shape with a pure-text vocabulary, fresh HF weights
    bench_logprob(args, dev, res)
    if args.compile:
        bench_formulas(n_img, args, dev, res)
    if args.rl_step:
        bench_rl_step(args, res)
    res["logprob_chunked_time"], res["logprob_chunked_memory"] = ({"ratio": res["logprob"][k]} for k in ("time_ratio", "memory_ratio"))
    res["ratios"] = {k: res[k]["ratio"] if k in res else None for k in TARGETS}
    res["targets"] = {k: dict(target=f"{op} {v}", met=None if r is None else (r >= v if op == ">=" else r <= v))
                      for (k, (op, v)), r in zip(TARGETS.items(), res["ratios"].values())}
    report(res)
    return write_json(res, args.out)


def write_json(res, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {path}")
    return res


def report(res):
    m, tr, ir, up, lp = res["model"], res["text_rollout"], res["image_rollout"], res["update"], res["logprob"]
    print(f"{res['device']}, {res['threads']} threads; model {m['n_layer']}x{m['n_embd']}, vocab {m['vocab']}, {m['params'] / 1e6:.1f}M params")
    print(f"text rollouts  {tr['tokens_per_s']:9.1f} tokens/s   ({tr['rows']} rows x {tr['new_tokens']} tokens, peak {tr['peak_mb']:.0f} MB)")
    print(f"image rollouts {ir['rollouts_per_s']:9.2f} rollouts/s ({ir['rows']} rows, T={ir['steps']}, cfg {ir['cfg']}, peak {ir['peak_mb']:.0f} MB)")
    print(f"update         {up['ms']:9.1f} ms/batch   ({up['rollouts']} rollouts, peak {up['peak_mb']:.0f} MB)")
    for k in ("text_rollout", "image_rollout", "update"):
        if "mfu" in res[k]:
            print(f"  {k}: MFU {res[k]['mfu']:.3f}" + (f", bandwidth {res[k]['bw_util']:.3f}" if "bw_util" in res[k] else ""))
    print(f"log-prob+loss  chunked {lp['chunked']['seconds']:.3f} s / {lp['chunked']['peak_delta_mb']:.0f} MB, full {lp['full']['seconds']:.3f} s"
          f" / {lp['full']['peak_delta_mb']:.0f} MB (V={lp['vocab']}, {lp['batch']}x{lp['tokens']}, d={lp['width']})")
    for (k, t), r in zip(res["targets"].items(), res["ratios"].values()):
        same = {c: res[k][c] for c in ("tokens_equal", "codes_equal", "max_lp_diff", "max_grad_diff", "time_ratio")
                if c in res.get(k, {})}
        print(f"{k:27s}", "skipped" if r is None else f"{r:7.3f}  (target {t['target']}: {'met' if t['met'] else 'NOT met'})",
              *(f"{c}={v:.3g}" if isinstance(v, float) else f"{c}={v}" for c, v in same.items()))
    if "rl_step" in res:
        s = res["rl_step"]
        for name, r in (("fast paths", s), ("prompts recomputed", s["slow"])):
            print(f"rl step, {name} ({s['weights']} weights) {r['seconds']:.1f} s: rollout {r['rollout_s']:.1f} s ({r['rollout_share']:.2f}),"
                  f" reward {r['reward_s']:.1f} s ({r['reward_share']:.2f}), update {r['update_s']:.1f} s ({r['update_share']:.2f});"
                  f" first-update ratio deviation {r['ratio_dev_first']:.1e}")


if __name__ == "__main__":
    main()
