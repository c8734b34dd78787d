"""
Sync-R1's four claims measured on the embedded world: every variant x seed through train.py, paired by seed.

  python experiments/ablate.py                      # full suite: 3 seeds x 10 RL variants x 25 steps (~1 h 35 min, 2-core CPU)
  python experiments/ablate.py --quick              # smoke check: 1 seed, small world and base, 3 steps (~6 min)
  python experiments/ablate.py --table-only         # tables, claims and plots again from <out-dir>/results.json
  python experiments/ablate.py --base pretrain -- --world-seed 7   # another world: pretrain its base first (+ ~25 min)
  python experiments/ablate.py --variants joint,null --seeds 0,1   # a subset (the base row comes with any RL variant)

Everything after `--` goes to every train.py call. Each RL run is the main job's configuration (`python train.py`
at its defaults) for --rl-iters steps of --rollouts rollouts, with one thing changed:
  joint            nothing: text and drawings trained together by one ensemble reward
  null             --null-adv: advantages shuffled within each group (the same compute, no learning signal)
  gen-only         --tasks gen: reasoning-then-drawing and plain drawing prompts only (no understanding prompts)
  und-only         --tasks und: understanding prompts only (text; no drawing)
  dgs              --dgs: previews after MaskGIT step 2, groups below tau resampled (same kept rollouts per step)
  gdpo             --adv gdpo: each reward normalised within its group before the weighted sum
  only-<reward>    --rewards <reward>=1: one reward alone (text_bleu, identity, alignment, knowledge)
Every run of seed s starts from the same base and uses train.py's seed s, so its held-out evaluation draws
the same sampling noise as the base's evaluation in that run: differences are paired by seed. Matched compute:
every variant samples the same rollouts per step and makes the same updates (DGS samples more previews; its
cost is counted in rollouts sampled).

Beside the runs, in-process on checkpoints (experiments/probes.py): the base, joint and null evaluated with the
drawings sampled without CFG as well (RL samples them so; evaluation uses --cfg 1); the DGS preview / final
reward correlation at every preview step on the base and after each seed's dgs run; the variance of the
policy-gradient estimate with DGS on and off at the same kept rollouts, on the same checkpoints.

Rule, fixed before running (verdict()): a claim reproduces when the 95% t interval over seeds of its paired
difference excludes 0 in the claimed direction, is contradicted when it excludes 0 the other way, and is not
shown otherwise (one seed: no interval).

Outputs in --out-dir: results.json (raw per-seed held-out metrics, per-step rewards, rollouts sampled, probes),
table.md (every variant's paired gain over the base, null beside), claims.md (verdicts), reward_vs_step.png,
reward_vs_rollouts.png. A run whose eval.json exists and a probe whose JSON exists are skipped, so a killed suite
resumes; an unfinished run starts again from scratch.
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ckpt import atomic_write  # noqa: E402
from eval import METRICS, plot  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, where train.py is
SINGLE = ["text_bleu", "identity", "alignment", "knowledge"]  # the embedded world's default ensemble
VARIANTS = {"joint": [], "null": ["--null-adv"], "gen-only": ["--tasks", "gen"], "und-only": ["--tasks", "und"],
            "dgs": ["--dgs"], "gdpo": ["--adv", "gdpo"],
            **{f"only-{r}": ["--rewards", f"{r}=1"] for r in SINGLE}}
UND = ["recognition", "vqa", "vqa_sampled", "textqa", "textqa_sampled"]
GEN = ["identity", "alignment", "knowledge", "reasoning", "reasoning_sampled"]
DRAWN = ["identity", "alignment", "knowledge"]  # the metrics of drawings, the ones CFG changes
GROUPS = {"understanding": UND, "generation": GEN, "held-out reward": ["reward"]}
WORLD_FLAGS = ("--world-seed", "--n-train-concepts", "--n-test-concepts", "--data-dir")
FULL = dict(seeds="0,1,2", rl_iters=25, rollouts=80, group=8, base="committed", iters=3000, probe_batches=6,
            probe_prompts=16, world=["--diag-prompts", "0"])
QUICK = dict(seeds="0", rl_iters=3, rollouts=16, group=8, base="pretrain", iters=100, probe_batches=1, probe_prompts=2,
             world=["--n-train-concepts", "40", "--n-test-concepts", "6", "--eval-reward-prompts", "4", "--diag-prompts", "0"])


def get_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--out-dir", default=None, help="folder of every run and of the results (default out/ablate; --quick: out/ablate-quick)")
    a("--quick", action="store_true", help="smoke-check run lengths (QUICK): 1 seed, small world and base, 3 RL steps")
    a("--table-only", action="store_true", help="only rebuild table.md, claims.md and plots from <out-dir>/results.json")
    a("--seeds", default=None, help="comma-separated integer seeds (default 0,1,2; --quick: 0)")
    a("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    a("--base", default=None, choices=["committed", "pretrain"], help="committed = the repository's base/ (the "
      "default world only); pretrain = one base pretrained for this world with seed 0 (default: committed; --quick: pretrain)")
    a("--iters", type=int, default=None, help="pretraining optimizer steps of --base pretrain (int; default 3000, --quick 100)")
    a("--rl-iters", type=int, default=None, help="RL steps per run (int; default 30, --quick 3)")
    a("--rollouts", type=int, default=None, help="kept rollouts per RL step (int; default 80, --quick 16)")
    a("--group", type=int, default=None, help="G, rollouts per prompt (int; default 8)")
    a("--probe-batches", type=int, default=None, help="batches per gradient-variance estimate and sampler (int; default 6, --quick 1)")
    a("--probe-prompts", type=int, default=None, help="prompts x G of each preview-correlation estimate (int; default 16, --quick 2)")
    a("--reward-level", type=float, default=0.03, help="training-reward gain over the first step that counts as reached (reward units)")
    args = p.parse_args(argv)
    args.out_dir = args.out_dir or ("out/ablate-quick" if args.quick else "out/ablate")
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers such as 0,1,2, got {args.seeds!r}")
    args.variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        p.error(f"--variants: unknown or empty {bad or args.variants}; choose from {', '.join(VARIANTS)}")
    for k in ("iters", "rl_iters", "rollouts", "group", "probe_batches", "probe_prompts"):
        if getattr(args, k) <= 0:
            p.error(f"--{k.replace('_', '-')} must be a positive integer, got {getattr(args, k)}")
    args.extra = args.world + extra  # later flags win in train.py
    if args.base == "committed" and any(f in args.extra for f in WORLD_FLAGS):
        p.error("the committed base/ was pretrained on the default world; with world flags after -- use --base pretrain")
    return args


def train(cmd, run_dir, log):
    """One train.py call, its output in log; returns wall seconds. Anything unfinished is started over
    (a killed run's metrics.jsonl would repeat steps)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    t = time.time()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        raise SystemExit(f"train.py failed (exit {rc}) in {run_dir}; end of {log}:\n{open(log).read()[-3000:]}")
    wall = time.time() - t
    write_json(os.path.join(run_dir, "wall.json"), {"wall_s": wall, "cmd": cmd})
    return wall


def read_json(path, key=None):
    with open(path) as f:
        d = json.load(f)
    return d.get(key) if key else d


def write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=1).encode())


def base_ckpt(args):
    """The checkpoint every RL run starts from, pretrained first under --base pretrain."""
    if args.base == "committed":
        return os.path.join(ROOT, "base")
    d = os.path.join(args.out_dir, "base")
    if not os.path.isfile(os.path.join(d, "pretrain", "eval.json")):
        print(f"pretrain the base -> {d}", flush=True)
        train(["--stage", "pretrain", "--seed", "0", "--iters", str(args.iters), "--data-dir", args.data_dir,
               "--out-dir", d] + args.extra, d, os.path.join(d, "log.txt"))
    return os.path.join(d, "pretrain")


def train_flags(args, name, seed):
    """train.py's flags of one RL run (also what the in-process probes parse)."""
    return (["--ckpt", base_ckpt(args), "--seed", str(seed), "--rl-iters", str(args.rl_iters), "--rollouts",
             str(args.rollouts), "--group", str(args.group), "--data-dir", args.data_dir, "--out-dir", run_dir(args, name, seed)]
            + VARIANTS[name] + args.extra)


def run_dir(args, name, seed):
    return os.path.join(args.out_dir, "runs", name, f"s{seed}")


def run_rl(args, name, seed):
    d = run_dir(args, name, seed)
    rl = os.path.join(d, "rl")
    if not os.path.isfile(os.path.join(rl, "eval.json")):
        print(f"{name} seed {seed} -> {d}", flush=True)
        train(train_flags(args, name, seed), d, os.path.join(d, "log.txt"))
    rows = [json.loads(line) for line in open(os.path.join(rl, "metrics.jsonl"))]
    ev = read_json(os.path.join(rl, "eval.json"))
    # previews count as sampled: per step, DGS drew attempts_per_rollout x rollouts (text + preview each)
    return dict(eval=ev["sync-grpo"], base_eval=ev["base"], wall_s=read_json(os.path.join(d, "wall.json"), "wall_s"),
                reward=[r["reward"] for r in rows], sampled=[r.get("dgs_attempts_per_rollout", 1.0) * args.rollouts for r in rows],
                step_s=[r["t_rollout"] + r["t_reward"] + r["t_update"] for r in rows])


def probe(args, path, fn):
    """fn()'s result, cached in <out-dir>/probes/<path>.json (a killed suite does not measure it again)."""
    f = os.path.join(args.out_dir, "probes", path + ".json")
    if not os.path.isfile(f):
        os.makedirs(os.path.dirname(f), exist_ok=True)
        print(f"probe {path}", flush=True)
        write_json(f, fn())
    return read_json(f)


def probes(args, runs, seed):
    """The in-process measurements of one seed (see the top): no-CFG evaluations, preview correlations, gradient noise."""
    from experiments import probes as P  # torch and the model: imported only when something is measured
    pargs, world, tok = P.setup(train_flags(args, "joint", seed))
    ckpt = lambda name: os.path.join(run_dir(args, name, seed), "rl")
    out = {"base_nocfg": probe(args, f"s{seed}/base_nocfg", lambda: P.held_out(P.load(base_ckpt(args)), tok, world, pargs, 0.0))}
    for name in ("joint", "null"):
        if name in runs:
            out[f"{name}_nocfg"] = probe(args, f"s{seed}/{name}_nocfg", lambda: P.held_out(P.load(ckpt(name)), tok, world, pargs, 0.0))
    measure = lambda path: dict(preview_corr=P.preview_corr(P.load(path), tok, world, pargs, args.probe_prompts),
                                grad=P.grad_noise(P.load(path), tok, world, pargs, args.probe_batches))
    out["base_dgs"] = probe(args, f"s{seed}/base_dgs", lambda: measure(base_ckpt(args)))
    if "dgs" in runs:
        out["dgs_dgs"] = probe(args, f"s{seed}/dgs_dgs", lambda: measure(ckpt("dgs")))
    return out


def to_level(runs, gain):
    """Steps / rollouts sampled to a training reward of the variant's mean first-step reward + gain (None: not
    reached). Under DGS the training reward is that of the kept rollouts: compare held-out metrics, not this."""
    for name, by_seed in runs.items():
        ref = [r["reward"][0] for r in by_seed.values() if r.get("reward")]
        level = statistics.fmean(ref) + gain if ref else None
        for r in by_seed.values():
            hit = next((i for i, x in enumerate(r.get("reward", [])) if level is not None and x >= level), None)
            r.update(steps_to_level=None if hit is None else hit + 1,
                     rollouts_to_level=None if hit is None else sum(r["sampled"][:hit + 1]))
    return runs


def main(argv=None):
    args = get_args(argv)
    if args.table_only:
        return report(args.out_dir, args.reward_level)
    os.makedirs(args.out_dir, exist_ok=True)
    args.data_dir = os.path.join(args.out_dir, "world")
    check_same_setup(args)
    base_ckpt(args)  # pretrained first, under --base pretrain
    runs, extra, t0 = {"base": {}, **{n: {} for n in args.variants}}, {}, time.time()
    for seed in args.seeds:  # seed by seed: a suite stopped early still holds complete seeds
        for name in args.variants:
            runs[name][str(seed)] = run_rl(args, name, seed)
        runs["base"][str(seed)] = dict(eval=runs[args.variants[0]][str(seed)]["base_eval"], reward=[], sampled=[], step_s=[])
        extra[str(seed)] = probes(args, {n: runs[n] for n in args.variants}, seed)
        config = {k: v for k, v in vars(args).items() if k != "table_only"}
        write_json(os.path.join(args.out_dir, "results.json"), {"config": config, "runs": runs, "probes": extra})
    print(f"suite done in {time.time() - t0:.0f} s")
    report(args.out_dir, args.reward_level)


def check_same_setup(args):
    """Resuming skips finished runs, so every run in one out-dir must share the run lengths and train.py flags."""
    keys = ("base", "iters", "rl_iters", "rollouts", "group", "probe_batches", "probe_prompts", "extra")
    now, path = {k: getattr(args, k) for k in keys}, os.path.join(args.out_dir, "setup.json")
    if os.path.isfile(path) and read_json(path) != now:
        raise SystemExit(f"{args.out_dir} holds runs made with {read_json(path)}, not {now}; use another --out-dir")
    write_json(path, now)


# ----------------------------------------------------------------------------- the report, from results.json alone

# two-sided 95% quantiles of Student's t by degrees of freedom (n seeds - 1)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def paired_interval(diffs):
    """(mean, half-width of its 95% t interval, n) of per-seed paired differences; half-width nan under 2 seeds."""
    n = len(diffs)
    if n < 2:
        return (diffs[0] if diffs else float("nan")), float("nan"), n
    return statistics.fmean(diffs), T975.get(n - 1, 1.96) * statistics.stdev(diffs) / n ** 0.5, n


def verdict(mean, half, words=("reproduces", "contradicted", "not shown")):
    """The rule, fixed before running: the claim reproduces when the 95% interval of the paired difference
    excludes 0 in the claimed direction (> 0), is contradicted when it excludes 0 the other way, and is not
    shown otherwise (also with one seed: no interval)."""
    if half != half:  # nan
        return f"{words[2]} (one seed: no interval)"
    return words[0] if mean - half > 0 else words[1] if mean + half < 0 else words[2]


def score(ev, metrics):
    return statistics.fmean(ev[m] for m in metrics)


def diffs(res, a, b, metrics, where="runs"):
    """Per-seed differences a - b of the mean over `metrics`; a / b name a run or, with where="probes", a
    probe's evaluation (e.g. joint_nocfg). b = "base" is the base as run a evaluated it: the held-out reward
    is measured on a's own task mix and reward. Seeds where either is missing are left out."""
    def get(n, s, of=None):
        if where == "probes":
            return res["probes"].get(s, {}).get(n)
        if n == "base" and of:
            return res["runs"].get(of, {}).get(s, {}).get("base_eval")
        return res["runs"].get(n, {}).get(s, {}).get("eval")
    seeds = [s for s in res["probes"] if get(a, s) and get(b, s, a)]
    return [score(get(a, s), metrics) - score(get(b, s, a), metrics) for s in seeds]


def fmt(d, words=("reproduces", "contradicted", "not shown")):
    m, h, n = paired_interval(d)
    return f"{m:+.3f} ± {h:.3f} (n={n}): {verdict(m, h, words)}" if n else "not run"


def table(res):
    runs, lines = res["runs"], []
    head = METRICS + ["reward"]
    lines += ["Held-out metrics, mean ± std over seeds:", "", "| variant | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for n in runs:
        lines.append(f"| {n} | " + " | ".join(stat([r["eval"].get(m) for r in runs[n].values()]) for m in head) + " |")
    lines += ["", "Paired gain over the base (variant - base, seed by seed), mean ± half-width of the 95% t interval; "
              "the null run shows the size of a difference that noise alone produces:", "",
              "| variant | " + " | ".join(GROUPS) + " | steps to level | rollouts sampled to level |", "|---" * (len(GROUPS) + 3) + "|"]
    for n in runs:
        if n != "base":
            cells = [(lambda m, h, k: f"{m:+.3f} ± {h:.3f}")(*paired_interval(diffs(res, n, "base", ms))) for ms in GROUPS.values()]
            cells += [stat([r.get(k) for r in runs[n].values()], "{:.1f}") for k in ("steps_to_level", "rollouts_to_level")]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", dgs_table(res)]) + "\n"


def stat(vals, f="{:.3f}"):
    """'mean ± std' (sample std over seeds); '—' if none; '(k/n)' appended when only k of n are there (not
    reached, or nan: a correlation over groups without variance)."""
    got = [v for v in vals if v is not None and v == v]
    if not got:
        return "—"
    s = f.format(statistics.fmean(got)) + (" ± " + f.replace("+", "").format(statistics.stdev(got)) if len(got) > 1 else "")
    return s + (f" ({len(got)}/{len(vals)})" if len(got) < len(vals) else "")


def dgs_table(res):
    """What DGS needs (the preview predicting the reward) and what it does to the gradient estimate."""
    pr = res["probes"]
    at = [(label, key) for label, key in (("base", "base_dgs"), ("after the dgs run", "dgs_dgs")) if any(key in p for p in pr.values())]
    if not at:
        return ""
    steps = sorted({k for p in pr.values() for key in ("base_dgs",) if key in p for k in p[key]["preview_corr"]}, key=int)
    lines = ["DGS preview / final reward, within-prompt correlation by preview step (mean ± std over seeds):", "",
             "| model | " + " | ".join(f"step {k}" for k in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for label, key in at:
        lines.append(f"| {label} | " + " | ".join(stat([p[key]["preview_corr"].get(k) for p in pr.values() if key in p], "{:+.2f}")
                                            for k in steps) + " |")
    lines += ["", "Variance of the policy-gradient estimate of one batch (trace, ||g1 - g2||^2 / 4 over two halves), DGS on "
              "and off at the same kept rollouts (mean ± std over seeds); bias^2 = ||mean_on - mean_off||^2 less the noise "
              "part, relative to ||mean_off||^2:", "",
              "| model | variance, DGS off | variance, DGS on | on / off | ||mean gradient||^2 off | bias^2 / ||mean off||^2 | cos(mean on, mean off) |",
              "|---|---|---|---|---|---|---|"]
    for label, key in at:
        g = [p[key]["grad"] for p in pr.values() if key in p]
        lines.append(f"| {label} | " + " | ".join(stat(v, f) for v, f in (
            ([x["dgs_off"]["var"] for x in g], "{:.3g}"), ([x["dgs_on"]["var"] for x in g], "{:.3g}"),
            ([x["dgs_on"]["var"] / x["dgs_off"]["var"] for x in g], "{:.2f}"), ([x["dgs_off"]["mean_sq"] for x in g], "{:.3g}"),
            ([x["bias_sq"] / x["dgs_off"]["mean_sq"] for x in g], "{:+.2f}"), ([x["cos"] for x in g], "{:+.2f}"))) + " |")
    return "\n".join(lines) + "\n"


def log_var_ratio(res, key):
    """Per-seed log(variance off / on) at one probe: > 0 when DGS lowers the gradient estimate's variance."""
    return [math.log(p[key]["grad"]["dgs_off"]["var"] / p[key]["grad"]["dgs_on"]["var"]) for p in res["probes"].values() if key in p]


def claims(res):
    """Each claim: its paired difference over seeds with a 95% interval, the verdict under the rule, the null beside."""
    runs, out = res["runs"], []
    has = lambda *ns: all(n in runs for n in ns)
    null = lambda ms: f" [null - base: {fmt(diffs(res, 'null', 'base', ms), ('rises', 'falls', 'no change shown'))}]" if has("null") else ""
    if has("joint"):
        out.append("1. RL improves both (joint - base). " + "; ".join(f"{g}: {fmt(diffs(res, 'joint', 'base', ms))}{null(ms)}"
                                                                     for g, ms in GROUPS.items())
                   + f"; drawings sampled without CFG, as RL samples them ({', '.join(DRAWN)}): "
                   + fmt(diffs(res, "joint_nocfg", "base_nocfg", DRAWN, "probes"))
                   + (f" [null: {fmt(diffs(res, 'null_nocfg', 'base_nocfg', DRAWN, 'probes'), ('rises', 'falls', 'no change shown'))}]" if has("null") else "")
                   + f"; with the evaluation's CFG: {fmt(diffs(res, 'joint', 'base', DRAWN))}.")
    if has("joint", "gen-only", "und-only"):
        out.append(f"2. Synergy at matched compute. Generation, joint - gen-only: {fmt(diffs(res, 'joint', 'gen-only', GEN))}; "
                   f"understanding, joint - und-only: {fmt(diffs(res, 'joint', 'und-only', UND))}.{null(GEN + UND)}")
    if has("joint", "dgs"):
        spent = lambda n: statistics.fmean(sum(r["sampled"]) / len(r["sampled"]) / res["config"]["rollouts"] for r in runs[n].values())
        out.append(f"3. DGS (dgs - joint, the same steps and kept rollouts; DGS sampled {spent('dgs'):.2f} previews per kept "
                   f"rollout). Held-out reward: {fmt(diffs(res, 'dgs', 'joint', ['reward']))}; generation: "
                   f"{fmt(diffs(res, 'dgs', 'joint', GEN))}; understanding: {fmt(diffs(res, 'dgs', 'joint', UND))}. "
                   f"Gradient variance, log(off / on) after the dgs run: {fmt(log_var_ratio(res, 'dgs_dgs'), ('lower with DGS', 'higher with DGS', 'no difference shown'))}"
                   f"; on the base: {fmt(log_var_ratio(res, 'base_dgs'), ('lower with DGS', 'higher with DGS', 'no difference shown'))}.")
    if has("joint"):
        every = UND + GEN
        parts = [f"joint - {n}: {fmt(diffs(res, 'joint', n, every))}" for n in runs if n.startswith("only-")]
        if has("gdpo"):
            parts.append(f"gdpo - joint: {fmt(diffs(res, 'gdpo', 'joint', every), ('gdpo better', 'gdpo worse', 'no difference shown'))}")
        if parts:
            out.append("4. Ensemble reward, mean of every held-out metric. " + "; ".join(parts) + f".{null(every)}")
    head = (f"Paired differences over seeds {', '.join(res['probes'])} (same base, same evaluation noise), mean ± the half-width "
            "of the 95% t interval. Rule: reproduces if the interval excludes 0 in the claimed direction, contradicted "
            "if it excludes 0 the other way, not shown otherwise.\n\n")
    return head + "\n\n".join(out) + "\n"


def curves(runs, names, by_rollouts, minus=None):
    """Mean over seeds of the per-step training reward of `names` (less run `minus`'s at the same seed and step:
    the same prompts, so their noise cancels), against the step or the cumulative rollouts sampled."""
    out = {}
    for name in (n for n in names if n in runs and n != minus):
        rs = {s: r for s, r in runs[name].items() if r.get("reward") and (minus is None or s in runs.get(minus, {}))}
        if rs:
            n = min(len(r["reward"]) for r in rs.values())
            ref = lambda s, i: runs[minus][s]["reward"][i] if minus else 0.0
            y = [statistics.fmean(r["reward"][i] - ref(s, i) for s, r in rs.items()) for i in range(n)]
            x = [statistics.fmean(sum(r["sampled"][:i + 1]) for r in rs.values()) for i in range(n)] if by_rollouts else list(range(1, n + 1))
            out[name] = (x, y)
    return out


def report(out_dir, gain):
    """table.md, claims.md and both plots from results.json alone (the level recomputed with `gain`)."""
    res = read_json(os.path.join(out_dir, "results.json"))
    to_level(res["runs"], gain)
    text, summary = table(res), claims(res)
    for name, s in (("table.md", text), ("claims.md", summary)):
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(s)
    same = ["joint", "dgs", "gdpo"]  # runs trained on the null run's ensemble: the same prompts, comparable rewards
    minus = "null" if "null" in res["runs"] else None
    label = "training reward" + (" - null's, same prompts" if minus else "")
    plot(os.path.join(out_dir, "reward_vs_step.png"), curves(res["runs"], same, False, minus), "RL step", label)
    plot(os.path.join(out_dir, "reward_vs_rollouts.png"), curves(res["runs"], same[:2], True, minus),
         "rollouts sampled (DGS previews included)", label)
    print(text + "\n" + summary)


if __name__ == "__main__":
    main()
