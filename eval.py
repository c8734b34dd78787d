"""
Held-out evaluation, on the concepts the model never trained on: what both worlds share (drawings from fixed
seeds, per-item summaries with standard errors, paired gains, tables), the evaluation stage, and the
pictures of a run. Each world scores its own test split: world.data.World.evaluate (the embedded world's
exact metrics) and showo.unifybench.Bench.evaluate (a real folder's UnifyBench metrics); train.held_out_eval
adds the held-out mean reward.

  python train.py --stage eval --ckpt out/rl            # any checkpoint folder or run folder
  python eval.py out/rl --compare out/null/rl           # redraw reward_vs_step.png, a null run beside

Understanding: recognition accuracy (weighted: the mean of the positive and negative accuracies, as
Yo'LLaVA reports it, so a constant "yes" or "no" scores 0.5 however unbalanced the questions), VQA accuracy,
text-only QA accuracy (greedy answers, exact match). Generation: the model first writes its reasoning, then
draws (with the run's CFG); identity (CLIP-I analogue: share of the concept's sprite drawn), alignment
(CLIP-T analogue: the request's placement), knowledge-driven score (0 / 0.5 / 1), and reasoning accuracy
(the stated fact is the right one).
"""
import argparse
import json
import math
import os
import sys

import torch
from PIL import Image

import sampling as S
from ckpt import (BadInput, amp, atomic_write, check_world_fits, checkpoint_path, from_files, load_checkpoint, load_weights,
                  read_checkpoint, resolve_ckpt, say, writable_dir)

METRICS = ["recognition", "recognition_pos", "recognition_neg", "vqa", "vqa_sampled", "textqa", "textqa_sampled",
           "identity", "alignment", "knowledge", "reasoning", "reasoning_sampled"]
EVAL_BATCH = 64  # prompts per sampling batch
RISE_K = 20      # steps averaged at each end of a run by the rise statistic


def draw(model, tok, prompts, args, generator):
    """Evaluation's drawings: the run's --cfg and --maskgit-steps, temperature 1, from a fixed seed."""
    return S.draw(model, tok, prompts, args.steps, args.cfg, args.maskgit_sampler, 1.0, generator)["codes"]


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
    sampled = S.answer(model, tok, [p for p in prompts for _ in range(args.eval_draws)], args.max_text, 1.0, g)[0]
    return S.answer(model, tok, prompts, args.max_text)[0], sampled


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




# ----------------------------------------------------------------------------- the evaluation stage

def as_trained(args, meta, keys):
    """args with the values these flags had when the checkpoint was trained (its sampling, vocabulary and
    reward), each one that differs from the command line said on the console."""
    saved = {k: v for k, v in meta.get("args", {}).items() if k in keys}
    changed = [f"{k} {v}" for k, v in saved.items() if v != getattr(args, k)]
    if changed:
        say(0, "as the checkpoint was trained: " + ", ".join(changed))
    return argparse.Namespace(**{**vars(args), **saved})


def run_eval(args, held_out_eval):
    """Held-out metrics of a checkpoint (held_out_eval: train.py's), written next to it as
    eval_<world folder>-seed<S>.json: results on another world get another file, and a file holding another
    world's results is never overwritten. With --showo-dir: run_showo_eval."""
    if args.showo_dir:
        return run_showo_eval(args, held_out_eval)
    from pretrain import world_and_tokenizer  # here: the world's own modules import this file
    path = checkpoint_path(args)
    model, meta, _ = load_checkpoint(path)
    # its sampling and its reward (the held-out mean reward is the objective it trained on)
    eargs = as_trained(args, meta, ("cfg", "steps", "maskgit_sampler", "max_text", "tasks", "group", "rewards", "rl_cfg",
                                    "temperature"))
    world, tok = world_and_tokenizer(args)
    check_world_fits(tok, model.cfg, args.data_dir, path)
    where = dict(data_dir=os.path.abspath(args.data_dir), seed=world.seed, train_concepts=len(world.train),
                 test_concepts=len(world.test))
    path = resolve_ckpt(path)
    folder = writable_dir(args.eval_dir or path, "--eval-dir" if args.eval_dir else "--ckpt (its folder holds the results; "
                          "--eval-dir puts them elsewhere)")
    out = os.path.join(folder, f"eval_{os.path.basename(where['data_dir'])}-seed{world.seed}.json")
    check_eval_file(out, where)
    say(0, f"evaluating {path} on {len(world.test_tasks)} held-out tasks")
    res = held_out_eval(model, tok, world, eargs)
    write_eval(out, where, path, res, f"held-out concepts of {args.data_dir} (seed {world.seed})")
    return res


def check_eval_file(out, where):
    """A results file of another world (or folder) is never overwritten."""
    if os.path.isfile(out):
        try:
            with open(out) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise BadInput(f"{out}: expected an earlier results file (JSON) to compare worlds with ({e})") from None
        old = old.get("world") if isinstance(old, dict) else None
        if old != where:
            raise BadInput(f"{out}: holds the results of another world ({old}); move it away to evaluate {where}")


def write_eval(out, where, checkpoint, res, title, order=None):
    """The results table on the console, and {world, checkpoint, metrics} as JSON at `out`."""
    print("\n" + table({os.path.basename(os.path.normpath(checkpoint)): res}, title, order))
    atomic_write(out, json.dumps(dict(world=where, checkpoint=checkpoint, metrics=res), indent=1).encode())
    say(0, f"wrote {out}")


def run_showo_eval(args, held_out_eval):
    """UnifyBench metrics and the held-out mean reward of Show-o on a real folder's test split: the
    --showo-dir model with fresh concept tokens, or an RL run of it (--ckpt, sampled and rewarded as it was
    trained). Written as eval_<folder>.json next to the checkpoint, or into <out-dir>/eval without one."""
    from showo import load, unifybench
    rl_run = checkpoint_path(args)  # None: Show-o itself
    path, meta, weights, _ = read_checkpoint(rl_run, load_state=False) if rl_run else (None, {}, None, None)
    keys = ("cfg", "steps", "maskgit_sampler", "max_text", "concept_tokens", "tasks", "group", "reward_style", "rewards")
    # no frozen reference and no rows-only marking: evaluation trains nothing
    eargs = as_trained(argparse.Namespace(**{**vars(args), "beta": 0.0, "concept_rows_only": False}), meta, keys)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    world, tok, policy, _ = from_files(load.setup, eargs, device)
    if weights is not None:
        load_weights(policy, weights, path)
    where = dict(data_dir=os.path.abspath(args.data_dir), concepts=[c.name for c in world.concepts])
    folder = writable_dir(args.eval_dir or path or os.path.join(args.out_dir, "eval"), "--eval-dir")
    out = os.path.join(folder, f"eval_{os.path.basename(where['data_dir'])}.json")
    check_eval_file(out, where)
    if not world.test_tasks:
        raise BadInput(f"{args.data_dir}: no test tasks (concept/test/<name>/vqa.json, text_only.json, t2i_conditions.json)")
    skipped = unifybench.skipped(world, world.test_tasks)
    if skipped:
        say(0, "skipped: " + ", ".join(f"{m} ({why})" for m, why in skipped.items()))
    checkpoint = path or os.path.abspath(args.showo_dir)
    say(0, f"evaluating {checkpoint} on {len(world.test_tasks)} test tasks (CFG {eargs.cfg}, {eargs.steps} MaskGIT steps, "
           f"{args.eval_draws} drawings per request, held-out reward on {args.eval_reward_prompts} prompts x G {eargs.group})")
    with amp(args.bf16, device):
        res = held_out_eval(policy, tok, world, eargs)
    res.update(skipped=skipped)
    write_eval(out, where, checkpoint, res, f"test split of {args.data_dir}", unifybench.METRICS + ["reward"])
    return res


# ----------------------------------------------------------------------------- pictures of a run

def save_rollouts(path, rolls, R, G, codec, n_groups=4):
    """PNG grid of the first 4 rollouts of a few groups: the target (what was asked, drawn exactly) on the
    left of each drawing, the request, the reasoning and the rollout's reward underneath."""
    from world import worldio
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


def read_metrics(path):
    """The rows of a run's metrics.jsonl in step order (a resumed run's replayed steps: the last wins)."""
    with open(path) as f:
        by_step = {r["step"]: r for r in map(json.loads, f)}
    return [by_step[k] for k in sorted(by_step)]


def curves(rows):
    """{name: per-step values} of the training reward and each of its logged components (unweighted)."""
    import rewards  # here: rewards imports the world, whose modules import this file
    names = ["reward"] + [f"r_{n}" for n in rewards.DEFAULT_WEIGHTS if f"r_{n}" in rows[0]]
    return {n: [r[n] for r in rows] for n in names}


def rise(ys, k=RISE_K):
    """(mean of the last k values - mean of the first k, its standard error): the residual std around a
    least-squares line through all values, x sqrt(2 / k). A single step's std is the wrong yardstick for a
    mean of k steps. k shrinks to half the run when it is shorter than 2k; (nan, nan) under 4 steps."""
    n = len(ys)
    k = min(k, n // 2)
    if k < 2:
        return float("nan"), float("nan")
    xm, ym = (n - 1) / 2, mean(ys)
    slope = sum((i - xm) * (y - ym) for i, y in enumerate(ys)) / sum((i - xm) ** 2 for i in range(n))
    sd = math.sqrt(sum((y - ym - slope * (i - xm)) ** 2 for i, y in enumerate(ys)) / max(1, n - 2))
    return mean(ys[-k:]) - mean(ys[:k]), sd * math.sqrt(2 / k)


def rise_report(rows):
    """One console line: the rise of the training reward and of each component, in standard errors."""
    k = min(RISE_K, len(rows) // 2)
    if k < 2:
        return f"training reward: {len(rows)} steps, too few for the rise statistic (it needs 4)"
    parts = []
    for name, ys in curves(rows).items():
        d, se = rise(ys)
        parts.append(f"{name.removeprefix('r_')} {d:+.3f} ({d / se:+.1f} s.e.)" if se > 0 else f"{name.removeprefix('r_')} {d:+.3f}")
    return f"training reward, mean of the last {k} steps - the first {k}: " + ", ".join(parts)


def plot_rewards(path, rows, null_rows=None, window=10):
    """reward_vs_step.png: one panel per curve (the reward, then each component), raw per-step values faint
    and a `window`-step moving average bold; a null run's rows, when given, drawn beside in grey."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    runs = [("run", rows, "tab:blue")] + ([("null run", null_rows, "tab:gray")] if null_rows else [])
    names = list(curves(rows))
    cols = min(3, len(names))
    fig, axes = plt.subplots(-(-len(names) // cols), cols, figsize=(4.2 * cols, 2.8 * -(-len(names) // cols)), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for label, rs, color in runs:
            steps, ys = [r["step"] for r in rs if name in r], [r[name] for r in rs if name in r]
            if not ys:
                continue
            smooth = [mean(ys[max(0, i - window + 1):i + 1]) for i in range(len(ys))]
            ax.plot(steps, ys, color=color, alpha=0.3, linewidth=0.8, label=f"{label}, per step")
            ax.plot(steps, smooth, color=color, linewidth=2, label=f"{label}, {window}-step mean")
        ax.set_title(name.removeprefix("r_") + (" (ensemble)" if name == "reward" else ""), fontsize=10)
        ax.set_xlabel("RL step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("training reward per RL step (components unweighted)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(path, series, xlabel, ylabel):
    """A line chart: series {name: (xs, ys)} on one axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description="Redraw a run's reward_vs_step.png and print its rise statistic.")
    p.add_argument("run", help="an RL run folder (holds metrics.jsonl), e.g. out/rl")
    p.add_argument("--compare", default=None, help="a null run's folder, drawn beside (e.g. out/null/rl)")
    args = p.parse_args(argv)
    rows = read_metrics(os.path.join(args.run, "metrics.jsonl"))
    null = read_metrics(os.path.join(args.compare, "metrics.jsonl")) if args.compare else None
    plot_rewards(os.path.join(args.run, "reward_vs_step.png"), rows, null)
    print(rise_report(rows) + ("\nnull run: " + rise_report(null) if null else ""))
    print(f"wrote {os.path.join(args.run, 'reward_vs_step.png')}")


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
