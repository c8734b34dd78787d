"""
The unified model's samplers and scorers: text (KV-cache decode), MaskGIT images (with CFG and prompt
K/V reuse) and autoregressive images, each returning the log-probs of what it sampled, and the scorers
that recompute those log-probs with gradients for the RL update. Samplers and scorers call the same
head functions (`subset_logprobs` for text, `code_logprobs` for image codes), so temperature, CFG and
the allowed vocabulary always agree and the PPO ratio is exactly 1 at the first inner update.

Image code k has id `image_offset + k`. Prompts are python lists of ids; samplers left-pad them.
Scorers take `trunk=` (the DDP-wrapped model) so training forwards go through the wrapper.
"""
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------- log-prob heads
# One function per modality turns hidden states into the log-probs the policy samples from; the
# samplers and the scorers both call it, so temperature, CFG and the vocabulary mask always agree.

def head_rows(model, ids):
    """The lm_head rows of the allowed ids, gathered once (and cast once under autocast) so a decode
    loop does not copy them every token: at Show-o's vocabulary that copy is ~0.5 GB per step."""
    w, b = model.lm_head.weight[ids], model.lm_head.bias[ids]
    if torch.is_autocast_enabled(w.device.type):  # the cast autocast would redo per matmul (w is no leaf)
        w = w.to(torch.get_autocast_dtype(w.device.type))
    return w, b


def subset_logprobs(model, h, ids, temperature=1.0, rows=None):
    """log_softmax over the allowed ids only (allowed-vocabulary mask), reading just those head rows.
    rows: head_rows(model, ids) precomputed by a sampler; the same numbers either way."""
    w, b = rows if rows is not None else (model.lm_head.weight[ids], model.lm_head.bias[ids])
    return F.log_softmax((h @ w.t() + b).float() / (temperature or 1.0), dim=-1)


def code_logprobs(model, hc, hu, cfg_w, temperature=1.0):
    """log-probs over image codes with classifier-free guidance: (1+w)*cond - w*uncond (Show-o's CFG)."""
    c = model.cfg
    w, b = model.lm_head.weight[c.image_offset:c.image_offset + c.codebook_size], model.lm_head.bias[c.image_offset:c.image_offset + c.codebook_size]
    logits = (hc @ w.t() + b).float()
    if cfg_w:
        logits = (1 + cfg_w) * logits - cfg_w * (hu @ w.t() + b).float()
    return F.log_softmax(logits / (temperature or 1.0), dim=-1)


def picked_and_entropy(lp, t):
    """[rows, 2]: log-prob of target t and the entropy of each row's distribution."""
    return torch.stack((lp.gather(-1, t[:, None])[:, 0], -(lp.exp() * lp).sum(-1)), -1)


def _chunked(fn, n, chunk, *xs):
    """Apply fn to row-chunks of xs; with grad on, each chunk is recomputed in backward (checkpoint),
    so [rows, vocab] logits are never all alive at once, forward or backward."""
    if not chunk or n <= chunk:
        return fn(*xs)
    outs = []
    for i in range(0, n, chunk):
        part = [x[i:i + chunk] if x is not None else None for x in xs]
        outs.append(checkpoint(fn, *part, use_reentrant=False) if torch.is_grad_enabled() else fn(*part))
    return torch.cat(outs)


def unique_prompts(seqs, device=None):
    """(distinct prompts in first-seen order, src [len(seqs)]: each row's index among them): a group's G
    rollouts and every unconditional CFG row share a prompt, whose keys/values are then computed once."""
    seen = {}
    src = [seen.setdefault(tuple(s), len(seen)) for s in seqs]
    return [list(s) for s in seen], torch.tensor(src, dtype=torch.long, device=device)


def answer_hidden(model, prompts, toks, mask, pad_id, trunk=None, reuse_prompt=True):
    """Hidden states [B,L,D] whose row t predicts answer token toks[:, t] after prompts (id lists); mask:
    the valid answer tokens. reuse_prompt: each distinct prompt but its last token runs once (prompt_kv),
    the last token and the answer per row; False runs prompt + answer per row. Same numbers either way."""
    dev = toks.device
    if not reuse_prompt:
        ids, valid = pad_left(prompts, pad_id, dev)
        T, L = ids.shape[1], toks.shape[1]
        return (trunk or model)(torch.cat((ids, toks), 1), torch.cat((valid, mask), 1))[:, T - 1:T + L - 1]
    uniq, src = unique_prompts([p[:-1] for p in prompts], dev)
    pre, pre_valid = pad_left(uniq, pad_id, dev)
    idx = torch.cat((torch.tensor([p[-1] for p in prompts], device=dev)[:, None], toks), 1)
    valid = torch.cat((torch.ones_like(mask[:, :1]), mask), 1)
    return (trunk or model)(idx, valid, (pre, pre_valid, src), causal=True)[:, :-1]


def pad_left(seqs, pad_id, device=None):
    """List of id lists -> (ids [B,T], valid [B,T]) left-padded, so every row ends at the same column."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    valid = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s):] = torch.tensor(s)
            valid[i, T - len(s):] = True
    return ids.to(device), valid.to(device)


def token_logprobs(model, h, targets, ids=None, temperature=1.0, chunk=0):
    """Scoring head: log-prob of targets[b,t] under the head at position t of hidden states h
    (caller shifts for next-token prediction; -1 = ignore). `ids` restricts the softmax to an
    allowed vocabulary. Returns (lp [B,T] with 0 at ignored places, ent [B,T] entropy there)."""
    dev = h.device
    sel = targets >= 0
    ids = torch.arange(model.cfg.vocab_size, device=dev) if ids is None else ids.to(dev)
    lookup = torch.full((model.cfg.vocab_size,), -1, dtype=torch.long, device=dev)
    lookup[ids] = torch.arange(len(ids), device=dev)
    tgt = lookup[targets[sel]]
    if (tgt < 0).any():
        raise ValueError("token_logprobs: a target id lies outside the allowed vocabulary")

    def fn(hs, t):
        return picked_and_entropy(subset_logprobs(model, hs, ids, temperature), t)

    out = _chunked(fn, int(sel.sum()), chunk, h[sel], tgt)
    lp = torch.zeros(targets.shape, device=dev).masked_scatter(sel, out[:, 0])
    ent = torch.zeros(targets.shape, device=dev).masked_scatter(sel, out[:, 1])
    return lp, ent


# ----------------------------------------------------------------------------- text sampling

@torch.no_grad()
def sample_text(model, prompts, max_new, allowed, stop_ids, temperature=1.0, generator=None, reuse_prompt=True):
    """Batched KV-cache decoding. prompts: list of id lists. allowed: LongTensor of ids the text may use.
    Greedy when temperature == 0. Log-probs are those of the tempered, vocabulary-masked distribution.
    reuse_prompt: each distinct prompt is prefilled once and its cache rows copied (a group's G rollouts
    share one prompt); same tokens, log-probs within float noise.
    Returns tokens [B,N], logprobs [B,N], valid [B,N] (False after a row's stop token)."""
    dev = model.lm_head.weight.device
    ids, valid = pad_left(prompts, model.cfg.pad_id, dev)
    B, T = ids.shape
    allowed = allowed.to(dev)
    stop = torch.tensor(stop_ids, device=dev)
    L = T + max_new
    cache = model.new_cache(B, L)
    if reuse_prompt:
        uniq, src = unique_prompts(prompts, dev)
        part = model.new_cache(len(uniq), T)  # width T too: the longest prompt is among the distinct ones
        h = model.hidden(*pad_left(uniq, model.cfg.pad_id, dev), cache=part)[src, -1]
        for (k, v), (pk, pv) in zip(cache, part):
            k[:, :, :T], v[:, :, :T] = pk[src], pv[src]
    else:
        h = model.hidden(ids, valid, cache=cache)[:, -1]
    pos = valid.sum(1, keepdim=True)
    valid = torch.cat((valid, torch.zeros(B, L - T, dtype=torch.bool, device=dev)), 1)
    toks = torch.full((B, max_new), model.cfg.pad_id, dtype=torch.long, device=dev)
    lps = torch.zeros(B, max_new, device=dev)
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    rows = head_rows(model, allowed)
    for t in range(max_new):
        lp = subset_logprobs(model, h, allowed, temperature, rows)
        j = pick(lp, temperature, generator)
        tok = torch.where(alive, allowed[j], model.cfg.pad_id)
        toks[:, t], lps[:, t], valid[:, T + t] = tok, lp.gather(-1, j[:, None])[:, 0] * alive, alive
        alive = alive & ~torch.isin(tok, stop)
        if t == max_new - 1 or not alive.any():  # a host sync per token; the decode is short
            break
        h = model.hidden(tok[:, None], valid[:, :T + t + 1], pos=pos + t, cache=cache, start=T + t)[:, -1]
    return toks, lps, valid[:, T:T + max_new]


def pick(lp, temperature, generator=None):
    """Index sampled from log-probs lp [..., K] (argmax when temperature == 0)."""
    if not temperature:
        return lp.argmax(-1)
    p = lp.exp().reshape(-1, lp.shape[-1])
    return torch.multinomial(p, 1, generator=generator).view(lp.shape[:-1])


# ----------------------------------------------------------------------------- answers and drawings

@torch.no_grad()
def answer(model, tok, prompts, max_new, temperature=0.0, generator=None):
    """Decode a text answer for each prompt; returns (strings, tokens, logprobs, valid)."""
    toks, lps, valid = sample_text(model, prompts, max_new, tok.text_ids(), [tok.eor_id], temperature, generator)
    texts = [tok.decode(t[v & (t != tok.eor_id)]) for t, v in zip(toks, valid)]
    return texts, toks, lps, valid


@torch.no_grad()
def draw(model, tok, prompts, steps, cfg, sampler, temperature, generator=None, stop=None, state=None, reuse_prompt=True):
    """Image codes for generation prompts (ending with <boi>): MaskGIT (`steps`, `sampler`) or AR, as the
    model was trained, with classifier-free guidance `cfg` (its rows batched with the conditional ones)."""
    uncond, n = [tok.uncond_prompt()] * len(prompts), tok.n_image_tokens
    if model.cfg.image_causal:
        return sample_ar_image(model, prompts, uncond, n, cfg, temperature, generator, stop, state)
    return sample_maskgit(model, prompts, uncond, n, steps, cfg, temperature, generator, state, stop, sampler, reuse_prompt)


# ----------------------------------------------------------------------------- MaskGIT images

def keep_masked(step, steps, n):
    """Cosine schedule: how many of n image tokens stay masked after 0-indexed `step` of `steps`."""
    return int(n * math.cos(math.pi / 2 * (step + 1) / steps))


def cfg_prompts(cond, uncond, cfg_w):
    # conditional and unconditional rows go through ONE batched forward
    return cond + uncond if cfg_w else cond


def close_image(c, rows, valid):
    """(rows, valid, k): Show-o's generation rows end with <eoi> after the image (its image tokens
    attend to it), so k = 1 token follows the image; nanosync's rows end at the image (k = 0)."""
    if c.layout != "showo":
        return rows, valid, 0
    eoi = torch.full((len(rows), 1), c.eoi_id, dtype=rows.dtype, device=rows.device)
    return torch.cat((rows, eoi), 1), torch.cat((valid, torch.ones_like(eoi, dtype=torch.bool)), 1), 1


def split_prompt(c, prompts, reuse, dev):
    """(prefix ids, prefix valid, src, head ids, head valid) of prompts ending with <boi>, left-padded:
    the prefix, one row per distinct prompt (src: each row's), is what no image position changes (its
    keys/values can be reused, prompt_kv); the head, one row per prompt, goes with the image. Show-o's
    <soi> belongs to its image block (it attends to the image), so it is the head there; reuse=False
    puts the whole prompt in the head (everything recomputed)."""
    uniq, src = unique_prompts(prompts, dev) if reuse else (prompts, torch.arange(len(prompts), device=dev))
    ids, valid = pad_left(uniq, c.pad_id, dev)
    T = ids.shape[1]
    k = T if not reuse else 1 if c.layout == "showo" else 0
    return ids[:, :T - k], valid[:, :T - k], src, ids[src, T - k:], valid[src, T - k:]


def showo_commits(n, steps):
    """Show-o's MaskGIT schedule (t2i_generate): tokens committed at each step. After step s, with
    r = (s+1)/T, floor(n cos(pi/2 r)) stay masked, computed in float32 as Show-o does and clamped to
    [1, #unknown - 1] (at least one committed while two remain, at least one left masked); its last
    step still returns a code for every position, so the one left masked is committed there."""
    unknown, out = n, []
    for s in range(steps):
        r = torch.tensor((s + 1) / steps)  # float32, like Show-o's torch.tensor(ratio)
        keep = int(torch.floor(n * torch.cos(r * (math.pi * 0.5))))
        keep = 0 if s == steps - 1 else max(1, min(unknown - 1, keep))
        out.append(unknown - keep)
        unknown = keep
    return out


def showo_choice_temperature(step, steps, tau0=1.0):
    """Show-o's Gumbel temperature at 0-indexed `step`: tau <- tau (1 - r) before each step's choice,
    compounding from tau0 (T = 50: 0.31 at step 9, below 1e-3 after step 25)."""
    tau = tau0
    for j in range(step + 1):
        tau *= 1.0 - (j + 1) / steps
    return tau


def gumbel(like, generator=None):
    """Standard Gumbel noise -log(-log u), u ~ U(0,1), both logs clamped at 1e-20 as in Show-o."""
    u = torch.rand(like.shape, generator=generator, device=like.device)
    return -torch.log((-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20))


@torch.no_grad()
def sample_maskgit(model, cond, uncond, n_tokens, steps, cfg_w=0.0, temperature=1.0, generator=None,
                   state=None, stop=None, sampler="plain", reuse_prompt=True):
    """MaskGIT: start all-masked; each step predicts every masked token, commits the most confident
    (confidence = log-prob of the sampled code), re-masks the rest on a cosine schedule.
    prompts end with <boi>. `stop=k` returns after k steps; pass the returned state back to finish.
    state: codes [B,N] (-1 = still masked), logprobs [B,N] (at the commit step), step_of [B,N]
    (commit step of each token), pred [B,N] (full current prediction: the DGS preview), draws [B,T,N]
    (what each step sampled at every position; visible ones keep their code), step.
    sampler="showo" is Show-o's t2i_generate step: logits never tempered (`temperature` is instead
    the starting Gumbel temperature tau0), confidence = log p + tau_s * Gumbel, tau_s from
    showo_choice_temperature, commit counts from showo_commits.
    reuse_prompt: the prompts' keys/values are computed once (prompt_kv) and every step runs only the
    image block (same codes, log-probs within float noise); False recomputes the whole sequence per step."""
    c, dev = model.cfg, model.lm_head.weight.device
    B, N = len(cond), n_tokens
    if state is None:
        state = dict(codes=torch.full((B, N), -1, dtype=torch.long, device=dev), logprobs=torch.zeros(B, N, device=dev),
                     step_of=torch.full((B, N), -1, dtype=torch.long, device=dev), pred=None, step=0,
                     draws=torch.full((B, steps, N), -1, dtype=torch.int32, device=dev))
    pre, pre_valid, src, ids, valid = split_prompt(c, cfg_prompts(cond, uncond, cfg_w), reuse_prompt, dev)
    kv = [(k_[src], v_[src]) for k_, v_ in model.prompt_kv(pre, pre_valid)] if reuse_prompt else None
    pre_valid = pre_valid[src]
    ones = torch.ones(len(ids), N, dtype=torch.bool, device=dev)

    def fwd(inp, v):  # one step's forward, conditional and unconditional rows batched
        return model.hidden(inp, v) if kv is None else model.hidden_after(kv, pre_valid, inp, v)

    codes, lps, step_of = state["codes"].clone(), state["logprobs"].clone(), state["step_of"].clone()
    draws, showo = state["draws"].clone(), sampler == "showo"
    logit_t = 1.0 if showo else temperature
    for s in range(state["step"], steps if stop is None else min(stop, steps)):
        x = torch.where(codes >= 0, codes + c.image_offset, c.mask_id)
        inp, v, k = close_image(c, torch.cat((ids, x.repeat(len(ids) // B, 1)), 1), torch.cat((valid, ones), 1))
        img = slice(inp.shape[1] - k - N, inp.shape[1] - k)
        h = fwd(inp, v)[:, img]
        lp = code_logprobs(model, h[:B], h[B:], cfg_w, logit_t)
        drawn = pick(lp, logit_t, generator=generator)
        klp = lp.gather(-1, drawn[..., None])[..., 0]
        masked = codes < 0
        draws[:, s] = torch.where(masked, drawn, codes).int()
        if showo:
            n_commit = showo_commits(N, steps)[s]
            conf = klp + showo_choice_temperature(s, steps, temperature) * gumbel(klp, generator)
        else:  # from the schedule, not masked.sum(): no host sync per step
            n_commit = (keep_masked(s - 1, steps, N) if s else N) - keep_masked(s, steps, N)
            conf = klp
        conf = conf.masked_fill(~masked, -float("inf"))
        commit = torch.zeros_like(masked).scatter(1, conf.topk(n_commit, dim=1).indices, True)
        codes = torch.where(commit, drawn, codes)
        lps = torch.where(commit, klp, lps)
        step_of = torch.where(commit, s, step_of)
        state = dict(codes=codes, logprobs=lps, step_of=step_of, pred=torch.where(masked, drawn, codes), step=s + 1, draws=draws)
    return state


ESTIMATORS = ("commit", "commit-remask", "masked", "all")


def estimator_terms(estimator, step_of, s):
    """[S,B,N] bool: which positions an image log-prob estimator scores at each step s ([S,1,1]).
    commit         the token committed at s (Mask-GRPO's "newly unmasked" tokens; nanosync's default)
    commit-remask  commit, plus every position re-masked at s (Mask-GRPO's default estimator)
    masked         every position still masked when step s starts (its sample of that step)
    all            every position at every step, visible ones included (the released Sync-R1 code)"""
    if estimator == "commit":
        return step_of[None] == s
    if estimator in ("commit-remask", "masked"):
        return step_of[None] >= s
    if estimator == "all":
        return (step_of[None] >= -1) & (s >= 0)
    raise ValueError(f"unknown image log-prob estimator {estimator!r}; choose one of {ESTIMATORS}")


def maskgit_logprobs(model, cond, uncond, codes, step_of, steps_sel, cfg_w=0.0, temperature=1.0, chunk=0, trunk=None,
                     estimator="commit", draws=None, commit_lp=None, reuse_prompt=True):
    """Scorer for MaskGIT rollouts: for each step s in steps_sel, rebuild that step's input (tokens
    committed before s, the rest masked) and read the log-prob of each token committed at s.
    Returns (lp [B,N], sel [B,N] bool, ent [B,N]).
    Other estimators (`estimator_terms`) score several terms per position, so they return one column
    per (step, position): lp, sel, ent [B, S*N]. masked / all read each step's own sample (`draws`
    [B,T,N] from the sampler); commit-remask scores a position re-masked at s by the log of the mass
    its distribution puts below that step's lowest committed log-prob (`commit_lp` [B,N], the
    sampler's), i.e. the probability that a fresh draw there would not have been kept.
    reuse_prompt: each prompt's keys/values computed once for all its scored steps (as the sampler)."""
    c, dev = model.cfg, model.lm_head.weight.device
    B, N = codes.shape
    pre, pre_valid, src, ids, valid = split_prompt(c, cfg_prompts(cond, uncond, cfg_w), reuse_prompt, dev)
    S = len(steps_sel)
    s = torch.as_tensor(steps_sel, device=dev).view(S, 1, 1)
    x = torch.where(step_of[None] < s, codes[None] + c.image_offset, c.mask_id).reshape(S * B, N)
    r = len(ids) // B  # 2 rows per rollout with CFG: [cond; uncond]
    L = ids.shape[1]  # 0 when the whole prompt is reused (nanosync layout)
    rows = torch.cat((ids.view(r, 1, B, L).expand(r, S, B, L).reshape(r * S * B, L),
                      x.view(1, S * B, N).expand(r, -1, -1).reshape(r * S * B, N)), 1)
    vrows = torch.cat((valid.view(r, 1, B, L).expand(r, S, B, L).reshape(r * S * B, L),
                       torch.ones(r * S * B, N, dtype=torch.bool, device=dev)), 1)
    rows, vrows, k = close_image(c, rows, vrows)
    order = torch.arange(r * S * B, device=dev).view(r, S, B)
    prompt = (pre, pre_valid, src[(order // (S * B) * B + order % B).flatten()]) if reuse_prompt else None
    h = (trunk or model)(rows, vrows, prompt)[:, rows.shape[1] - k - N:rows.shape[1] - k].reshape(r, S, B, N, -1)
    hit = estimator_terms(estimator, step_of, s)  # [S,B,N]: commit scores the token committed at step s at s
    if estimator == "commit":
        def fn(hc, hu, t):
            return picked_and_entropy(code_logprobs(model, hc, hu, cfg_w, temperature), t)

        out = _chunked(fn, int(hit.sum()), chunk, h[0][hit], h[1][hit] if r == 2 else None, codes[None].expand(S, -1, -1)[hit])
        lp = torch.zeros(S, B, N, device=dev).masked_scatter(hit, out[:, 0]).sum(0)
        ent = torch.zeros(S, B, N, device=dev).masked_scatter(hit, out[:, 1]).sum(0)
        return lp, hit.any(0), ent
    return maskgit_terms(model, h, r, hit, s, codes, step_of, cfg_w, temperature, chunk, estimator, draws, commit_lp)


def maskgit_terms(model, h, r, hit, s, codes, step_of, cfg_w, temperature, chunk, estimator, draws, commit_lp):
    """The several-terms-per-position estimators of maskgit_logprobs, one column per (step, position)."""
    S, B, N = hit.shape
    committed = step_of[None] == s
    if estimator == "commit-remask":
        target = codes[None].expand(S, -1, -1)
        # the step's lowest kept confidence (plain sampler: confidence = log p); +inf where none was kept
        thr = torch.where(committed, commit_lp[None], float("inf")).amin(-1, keepdim=True).expand(S, B, N)
    else:
        target = draws.permute(1, 0, 2)[s[:, 0, 0]].long()  # [S,B,N]: that step's sample, or the visible code
        thr = torch.full((S, B, N), float("inf"), device=h.device)
    remask = hit & ~committed & (estimator == "commit-remask")

    def fn(hc, hu, t, th, rm):
        lp = code_logprobs(model, hc, hu, cfg_w, temperature)
        out = picked_and_entropy(lp, t)
        low = lp < th[:, None]
        some = low.any(-1) & torch.isfinite(th)  # rows with no mass below, or a step that kept nothing: no term
        below = torch.logsumexp(torch.where(low | ~some[:, None], lp, -float("inf")), -1)  # finite, so no NaN gradient
        val = torch.where(rm, torch.where(some, below, -float("inf")), out[:, 0])
        return torch.stack((val, out[:, 1]), -1)

    out = _chunked(fn, int(hit.sum()), chunk, h[0][hit], h[1][hit] if r == 2 else None, target[hit], thr[hit], remask[hit])
    lp = torch.zeros(S, B, N, device=h.device).masked_scatter(hit, out[:, 0])
    ent = torch.zeros(S, B, N, device=h.device).masked_scatter(hit, out[:, 1])
    sel = hit & torch.isfinite(lp)  # a re-masked term with no mass below the threshold has none to score
    cols = lambda x: x.permute(1, 0, 2).reshape(B, S * N)
    return cols(torch.where(sel, lp, 0.0)), cols(sel), cols(ent)


# ----------------------------------------------------------------------------- autoregressive images

@torch.no_grad()
def sample_ar_image(model, cond, uncond, n_tokens, cfg_w=0.0, temperature=1.0, generator=None, stop=None, state=None):
    """Janus-style: image codes left to right with the KV cache (needs Config.image_causal), CFG rows in
    the same batch. `stop=k` returns after k tokens (the DGS preview = the first k/GRID rows); a state
    passed back is continued by prefilling prompt + its codes, so states of any rows can be merged."""
    c, dev = model.cfg, model.lm_head.weight.device
    if not c.image_causal:
        raise ValueError("autoregressive image sampling needs a model trained with image_causal=True")
    B = len(cond)
    if state is None:
        state = dict(codes=torch.full((B, n_tokens), -1, dtype=torch.long, device=dev),
                     logprobs=torch.zeros(B, n_tokens, device=dev), step=0)
    codes, lps, t0 = state["codes"].clone(), state["logprobs"].clone(), state["step"]
    end = n_tokens if stop is None else min(stop, n_tokens)
    ids, valid = pad_left(cfg_prompts(cond, uncond, cfg_w), c.pad_id, dev)
    r, T = len(ids) // B, ids.shape[1]
    ids = torch.cat((ids, (codes[:, :t0] + c.image_offset).repeat(r, 1)), 1)
    valid = torch.cat((valid, torch.ones(len(ids), n_tokens, dtype=torch.bool, device=dev)), 1)
    pos = valid[:, :T].sum(1, keepdim=True)
    cache = model.new_cache(len(ids), T + n_tokens)
    h = model.hidden(ids, valid[:, :ids.shape[1]], cache=cache)[:, -1]
    for t in range(t0, end):
        lp = code_logprobs(model, h[:B], h[B:], cfg_w, temperature)
        k = pick(lp, temperature, generator=generator)
        codes[:, t], lps[:, t] = k, lp.gather(-1, k[:, None])[:, 0]
        if t < end - 1:
            tok = (k + c.image_offset).repeat(r)[:, None]
            h = model.hidden(tok, valid[:, :T + t + 1], pos=pos + t, cache=cache, start=T + t)[:, -1]
    # the preview of a partial AR image: rows not drawn yet read as background (code 0)
    return dict(codes=codes, logprobs=lps, step=end, pred=codes.clamp(min=0))


def ar_image_logprobs(model, cond, uncond, codes, cfg_w=0.0, temperature=1.0, chunk=0, trunk=None):
    """Scorer for AR image rollouts: causal log-probs of the codes with the sampler's CFG."""
    c, dev = model.cfg, model.lm_head.weight.device
    B, N = codes.shape
    ids, valid = pad_left(cfg_prompts(cond, uncond, cfg_w), c.pad_id, dev)
    r = len(ids) // B
    x = (codes + c.image_offset).repeat(r, 1)
    h = (trunk or model)(torch.cat((ids, x), 1), torch.cat((valid, torch.ones_like(x, dtype=torch.bool)), 1))
    h = h[:, -N - 1:-1]  # the head at t-1 predicts code t

    def fn(hc, hu, t):
        return picked_and_entropy(code_logprobs(model, hc, hu, cfg_w, temperature), t)

    out = _chunked(fn, B * N, chunk, h[:B].reshape(B * N, -1), h[B:].reshape(B * N, -1) if r == 2 else None, codes.reshape(-1))
    return out[:, 0].view(B, N), torch.ones(B, N, dtype=torch.bool, device=dev), out[:, 1].view(B, N)
