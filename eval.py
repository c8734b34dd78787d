"""
Held-out evaluation, on the concepts the model never trained on: what both worlds share (answers and
drawings from fixed seeds, per-item summaries with standard errors, paired gains, tables, plots). Each
world scores its own test split: data.World.evaluate (the embedded world's exact metrics, below) and
unifybench.Bench.evaluate (a real folder's UnifyBench metrics); rollouts.held_out_eval adds the held-out
mean reward.

  python train.py --stage eval --ckpt out/base        # or any checkpoint folder / run folder

Understanding: recognition accuracy (weighted: the mean of the positive and negative accuracies, as
Yo'LLaVA reports it, so a constant "yes" or "no" scores 0.5 however unbalanced the questions), VQA accuracy, text-only QA accuracy
(greedy answers, exact match). Generation: the model first writes its reasoning, then draws
(MaskGIT or AR, with the run's CFG); identity (CLIP-I analogue: share of the concept's sprite drawn),
alignment (CLIP-T analogue: the request's placement), knowledge-driven score (0 / 0.5 / 1), and
reasoning accuracy (the stated fact is the right one).
"""
import math

import torch

import sampling as S

UNDERSTAND = ("recognition", "vqa", "textqa")
METRICS = ["recognition", "recognition_pos", "recognition_neg", "vqa", "vqa_sampled", "textqa", "textqa_sampled",
           "identity", "alignment", "knowledge", "reasoning", "reasoning_sampled"]


@torch.no_grad()
def answer(model, tok, prompts, max_new, temperature=0.0, generator=None):
    """Decode a text answer for each prompt; returns (strings, tokens, logprobs, valid)."""
    toks, lps, valid = S.sample_text(model, prompts, max_new, tok.text_ids(), [tok.eor_id],
                                     temperature=temperature, generator=generator)
    texts = [tok.decode(t[v & (t != tok.eor_id)]) for t, v in zip(toks, valid)]
    return texts, toks, lps, valid


@torch.no_grad()
def draw(model, tok, prompts, args, temperature, generator=None, stop=None, state=None):
    """Image codes for generation prompts (ending with <boi>), MaskGIT or AR, CFG rows batched."""
    uncond, n = [tok.uncond_prompt()] * len(prompts), tok.n_image_tokens
    if args.image_mode == "ar":
        return S.sample_ar_image(model, prompts, uncond, n, args.cfg, temperature, generator, stop, state)
    return S.sample_maskgit(model, prompts, uncond, n, args.steps, args.cfg, temperature, generator, state, stop,
                            sampler=args.maskgit_sampler, reuse_prompt=args.kv_reuse)


def batches(items, n):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def summary(items):
    """{metric: mean, "se": {metric: standard error}, "items": items} of per-item scores; recognition is
    the weighted accuracy, the mean of its positive and negative halves, where both were asked."""
    res, se = {}, {}
    if "recognition_pos" in items and "recognition_neg" in items:
        res["recognition"] = (mean(items["recognition_pos"]) + mean(items["recognition_neg"])) / 2
        se["recognition"] = 0.5 * math.hypot(stderr(items["recognition_pos"]), stderr(items["recognition_neg"]))
    for m, v in items.items():
        res[m], se[m] = mean(v), stderr(v)
    return dict(res, se=se, items=items)


def greedy_and_sampled(model, tok, tasks, args):
    """Each task's greedy answer, and --eval-draws answers sampled at temperature 1 from a fixed seed
    (k per task, consecutive)."""
    prompts = [tok.understanding_prompt(t) for t in tasks]
    g = torch.Generator(model.lm_head.weight.device).manual_seed(1)
    sampled = answer(model, tok, [p for p in prompts for _ in range(args.eval_draws)], args.max_text, 1.0, g)[0]
    return answer(model, tok, prompts, args.max_text)[0], sampled


def stderr(xs):
    """Standard error of the mean of xs (nan for fewer than 2)."""
    n = len(xs)
    if n < 2:
        return float("nan")
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def paired_gain(before, after, metric):
    """(gain, standard error) of after - before on one metric, paired item by item (the same questions
    under the same sampling noise). Recognition's weighted accuracy pairs its two halves separately."""
    if metric == "recognition":
        parts = [paired_gain(before, after, m) for m in ("recognition_pos", "recognition_neg")]
        return (parts[0][0] + parts[1][0]) / 2, 0.5 * math.hypot(parts[0][1], parts[1][1])
    if metric not in before.get("items", {}):  # a figure without items (the held-out reward's mean only)
        return after[metric] - before[metric], float("nan")
    d = [a - b for a, b in zip(after["items"][metric], before["items"][metric])]
    return mean(d), stderr(d)


def reward_rise(rewards, k=5):
    """Did the training reward rise beyond its noise? (mean of the last k steps - mean of the first k,
    the residual step-to-step std around a least-squares line through all steps, their ratio)."""
    n = len(rewards)
    if n < 2 * k:
        return dict(rise=float("nan"), residual_std=float("nan"), ratio=float("nan"))
    rise = mean(rewards[-k:]) - mean(rewards[:k])
    xm, ym = (n - 1) / 2, mean(rewards)
    slope = sum((i - xm) * (y - ym) for i, y in enumerate(rewards)) / sum((i - xm) ** 2 for i in range(n))
    resid = [y - (ym + slope * (i - xm)) for i, y in enumerate(rewards)]
    sd = math.sqrt(sum(r * r for r in resid) / (n - 2))
    return dict(rise=rise, residual_std=sd, ratio=rise / sd if sd > 0 else float("inf"))


def rows(res, order=None):
    """The metrics a result holds, in table order: `order`, by default the embedded world's metrics and
    the held-out reward last, when measured."""
    return [m for m in order or METRICS + ["reward"] if m in res]


def table(columns, title=None, order=None):
    """Markdown table: one row per metric (in `order`, see rows), one column per named result dict
    (mean ± standard error)."""
    names = list(columns)
    lines = ([f"### {title}", ""] if title else []) + ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for k in rows(columns[names[0]], order):
        cells = [f"{columns[n][k]:.3f}" + (f" ± {columns[n]['se'][k]:.3f}" if k in columns[n].get("se", {}) else "") for n in names]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gain_table(before, after, title=None):
    """Markdown table: base, after RL and the paired gain ± its standard error, per metric."""
    lines = ([f"### {title}", ""] if title else []) + ["| metric | base | RL | gain ± s.e. |", "|---|---|---|---|"]
    for k in rows(after):
        gain, se = paired_gain(before, after, k)
        lines.append(f"| {k} | {before[k]:.3f} | {after[k]:.3f} | {gain:+.3f} ± {se:.3f} |")
    return "\n".join(lines)


COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def plot(path, series, xlabel, ylabel):
    """Line chart with pillow only: series {name: (xs, ys)}, a framed plot with 5 ticks per axis, legend at right."""
    from PIL import Image, ImageDraw
    W, H, L, R, T, B = 820, 440, 70, 170, 20, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    xs = [x for s in series.values() for x in s[0]] or [0, 1]
    ys = [y for s in series.values() for y in s[1]] or [0, 1]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-3)
    px = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)
    py = lambda y: H - B - (y - y0) / (y1 - y0) * (H - T - B)
    d.rectangle([L, T, W - R, H - B], outline="black")
    for i in range(5):
        x, y = x0 + i * (x1 - x0) / 4, y0 + i * (y1 - y0) / 4
        d.line([px(x), H - B, px(x), H - B + 5], fill="black")
        d.text((px(x) - 12, H - B + 8), f"{x:.4g}", fill="black")
        d.line([L - 5, py(y), L, py(y)], fill="black")
        d.text((L - 50, py(y) - 6), f"{y:.3f}", fill="black")
    d.text(((W - R + L) / 2 - 40, H - 20), xlabel, fill="black")
    d.text((5, 3), ylabel, fill="black")
    for k, (name, (sx, sy)) in enumerate(series.items()):
        c = COLORS[k % len(COLORS)]
        if len(sx) > 1:
            d.line([(px(x), py(y)) for x, y in zip(sx, sy)], fill=c, width=2)
        for x, y in zip(sx, sy):
            d.ellipse([px(x) - 2, py(y) - 2, px(x) + 2, py(y) + 2], fill=c)
        d.line([W - R + 10, T + 10 + 16 * k, W - R + 30, T + 10 + 16 * k], fill=c, width=3)
        d.text((W - R + 35, T + 4 + 16 * k), name, fill="black")
    img.save(path)
