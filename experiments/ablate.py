"""
Sync-R1's four claims in miniature: every ablation x seed through train.py, one run at a time.

  python experiments/ablate.py                      # full suite: ~50 min on the 2-core CPU (run lengths below)
  python experiments/ablate.py --quick              # smoke check: 1 seed, small world, short runs (< 10 min)
  python experiments/ablate.py --table-only         # table.md, claims.md and plots again from <out-dir>/results.json
  python experiments/ablate.py --quick -- --lr 3e-3 # everything after `--` goes to every train.py call

Variants (each RL run starts from the base of its image mode):
  base / base-ar   the pretrained bases (MaskGIT / AR), no RL
  joint            Sync-GRPO in the paper's configuration (--tasks both, DGS on, cycle reward on, CFG)
  gen-only         --tasks gen, text reward weights 0 (image reward only, no reasoning text)
  und-only         --tasks und (text only: the image reward has nothing to score)
  dgs-off          --no-dgs (the same accepted rollouts per step, no previews)
  no-text-reward   the paper's reward mix without text_bleu, tasks both
  no-cycle-reward  the paper's reward mix without cycle
  no-cfg           --rl-cfg 0 (no CFG in sampler and loss)
  ar               joint, from a base pretrained with --image-mode ar

Full-suite run lengths (defaults): one shared base per image mode (--shared-base 1, pretrained with the
first seed for 700 iters), then 8 RL variants x 3 seeds of 10 steps x 32 accepted rollouts (G 8); train.py
runs with --no-compile (same numbers; saves ~15 s of compiling per run). Estimate on the 2-core CPU:
bases ~11 min (700 iters ~4.5 min + evaluation, AR ~20% slower); per RL run ~25 s of start-up and two
held-out evaluations (~20 s each: train.py evaluates the base again, it has no flag to skip that) = 18 min for
24 runs; one step of all 8 variants ~57 s (joint 9, gen-only 7.5, und-only 1, dgs-off 6.5, no-text 9.5,
no-cycle 9.5, no-cfg 5, ar 8.5), x 3 seeds x 10 steps = 29 min. Total ~58 min (an estimate: these figures
were measured before train.py was restructured; to be re-measured). With --shared-base 0 every seed pretrains its own two bases (+ ~22 min), so the seeds also
vary the base; with the shared base they vary only RL, and the base rows have std 0.
--quick: 1 seed, a 40 + 6 concept world, bases of 100 iters, 3 RL steps x 16 rollouts, in out/ablate-quick
(7.5 min measured on the 2-core CPU while another training job ran).

Outputs in --out-dir: results.json (raw: held-out metrics, per-step reward, seconds and rollouts sampled
of every variant x seed), table.md, claims.md, reward_vs_step.png, reward_vs_rollouts.png. A run whose
eval.json exists is skipped, so a killed suite resumes; an unfinished run is started again from scratch.

Reward level: a variant reaches it at the first RL step whose mean training reward is >= its reference
+ --reward-level, the reference being the mean over seeds of the first step's reward (rollouts of the
untouched base). dgs-off uses joint's reference, so DGS on and off chase the same absolute level.
"""
import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from eval import METRICS, plot  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, where train.py is
# The paper's reward mix on the embedded world: train.py's default mix plus the cycle reward.
PAPER_REWARDS = {"text_bleu": 0.35, "identity": 0.26, "alignment": 0.13, "knowledge": 0.13, "cycle": 0.065}


def rewards(**changed):
    """train.py's --rewards spec of the paper's mix with some weights changed (the spec replaces the whole
    mix, and a later --rewards replaces an earlier one: a variant's spec wins over PAPER's)."""
    return ["--rewards", ",".join(f"{k}={v}" for k, v in {**PAPER_REWARDS, **changed}.items())]


TEXT_OFF = rewards(text_bleu=0)
# The paper's configuration, the reference every variant changes one thing of: DGS on, CFG in rollouts and
# loss, the cycle reward on (train.py's own defaults turn these off on the embedded world; README).
PAPER = ["--dgs", "--rl-cfg", "1"] + rewards()
VARIANTS = {  # name: (image mode of its base, train.py flags; None = the base itself, no RL)
    "base": ("maskgit", None), "joint": ("maskgit", []),
    "gen-only": ("maskgit", ["--tasks", "gen"] + TEXT_OFF), "und-only": ("maskgit", ["--tasks", "und"]),
    "dgs-off": ("maskgit", ["--no-dgs"]), "no-text-reward": ("maskgit", TEXT_OFF),
    "no-cycle-reward": ("maskgit", rewards(cycle=0)), "no-cfg": ("maskgit", ["--rl-cfg", "0"]),
    "base-ar": ("ar", None), "ar": ("ar", []),
}
LEVEL_REF = {"dgs-off": "joint"}
UND, GEN = ["recognition", "vqa", "textqa"], ["identity", "alignment", "knowledge", "reasoning"]
FULL = dict(seeds="0,1,2", iters=700, rl_iters=10, rollouts=32, group=8, world=[])
QUICK = dict(seeds="0", iters=100, rl_iters=3, rollouts=16, group=8,
             world=["--n-train-concepts", "40", "--n-test-concepts", "6"])


def get_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--out-dir", default=None, help="folder of every run and of the results (default out/ablate; --quick: out/ablate-quick)")
    a("--quick", action="store_true", help="smoke-check run lengths (see QUICK): 1 seed, small world, 3 RL steps")
    a("--table-only", action="store_true", help="only rebuild table.md, claims.md and plots from <out-dir>/results.json")
    a("--seeds", default=None, help="comma-separated integer seeds (default 0,1,2; --quick: 0)")
    a("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    a("--iters", type=int, default=None, help="pretraining optimizer steps per base (int; default 700, --quick 100)")
    a("--rl-iters", type=int, default=None, help="RL steps per run (int; default 10, --quick 3)")
    a("--rollouts", type=int, default=None, help="accepted rollouts per RL step (int; default 32, --quick 16)")
    a("--group", type=int, default=None, help="G, rollouts per prompt (int; default 8)")
    a("--shared-base", type=int, default=1, choices=[0, 1],
      help="1 = one base per image mode for all seeds (pretrained with the first seed); 0 = one per seed and mode")
    a("--reward-level", type=float, default=None, help="reward gain (reward units) over the variant's first-step "
      "mean reward that counts as reached (default 0.03; --table-only: the one in results.json)")
    a("--compile", action="store_true", help="let train.py torch.compile its loss formulas (same numbers, slower start)")
    a("--train-args", default="", help="extra train.py flags for every run, one quoted string (also: after --)")
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
    for k in ("iters", "rl_iters", "rollouts", "group"):
        if getattr(args, k) <= 0:
            p.error(f"--{k.replace('_', '-')} must be a positive integer, got {getattr(args, k)}")
    args.extra = args.world + shlex.split(args.train_args) + extra  # later flags win in train.py
    return args


def train(cmd, run_dir, log):
    """One train.py call, its output in log; returns wall seconds. Anything unfinished is started over
    (no checkpoint to resume: a killed run's metrics.jsonl would repeat steps)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    t = time.time()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = open(log).read()[-3000:]
        raise SystemExit(f"train.py failed (exit {rc}) in {run_dir}; end of {log}:\n{tail}")
    wall = time.time() - t
    with open(os.path.join(run_dir, "wall.json"), "w") as f:
        json.dump({"wall_s": wall, "cmd": cmd}, f)
    return wall


def read_json(path, key=None):
    with open(path) as f:
        d = json.load(f)
    return d.get(key) if key else d


def base_dir(args, mode, seed):
    name = f"{mode}-shared" if args.shared_base else f"{mode}-s{seed}"
    return os.path.join(args.out_dir, "bases", name)


def run_base(args, mode, seed):
    d = base_dir(args, mode, seed)
    if not os.path.isfile(os.path.join(d, "pretrain", "eval.json")):
        print(f"pretrain {mode} base (seed {seed}) -> {d}", flush=True)
        train(["--stage", "pretrain", "--image-mode", mode, "--seed", str(seed), "--iters", str(args.iters),
               "--data-dir", args.data_dir, "--out-dir", d] + args.extra, d, os.path.join(d, "log.txt"))
    return dict(eval=read_json(os.path.join(d, "pretrain", "eval.json")), wall_s=read_json(os.path.join(d, "wall.json"), "wall_s"),
                base=d, reward=[], step_s=[], sampled=[])


def check_same_setup(args):
    """Resuming skips finished runs, so every run in one out-dir must share the run lengths and train.py flags."""
    keys = ("iters", "rl_iters", "rollouts", "group", "shared_base", "compile", "extra")
    now, path = {k: getattr(args, k) for k in keys}, os.path.join(args.out_dir, "setup.json")
    if os.path.isfile(path) and read_json(path) != now:
        raise SystemExit(f"{args.out_dir} holds runs made with {read_json(path)}, not {now}; use another --out-dir")
    with open(path, "w") as f:
        json.dump(now, f)


def run_rl(args, name, seed):
    mode, flags = VARIANTS[name]
    base, d = base_dir(args, mode, seed), os.path.join(args.out_dir, "runs", name, f"s{seed}")
    rl = os.path.join(d, "rl")
    if not os.path.isfile(os.path.join(rl, "eval.json")):
        print(f"{name} seed {seed} -> {d}", flush=True)
        cmd = ["--ckpt", os.path.join(base, "pretrain"), "--seed", str(seed), "--rl-iters", str(args.rl_iters),
               "--rollouts", str(args.rollouts), "--group", str(args.group), "--data-dir", args.data_dir, "--out-dir", d]
        train(cmd + ([] if args.compile else ["--no-compile"]) + PAPER + flags + args.extra, d, os.path.join(d, "log.txt"))
    rows = [json.loads(line) for line in open(os.path.join(rl, "metrics.jsonl"))]
    with open(os.path.join(rl, "latest")) as f:
        rollouts = read_json(os.path.join(rl, f.read().strip(), "meta.json"))["args"]["rollouts"]
    mean = lambda k: statistics.fmean([r[k] for r in rows]) if rows and k in rows[0] else None
    # previews count as sampled: per step, DGS drew attempts_per_rollout x rollouts (text + preview each)
    return dict(eval=read_json(os.path.join(rl, "eval.json"), "sync-grpo"), wall_s=read_json(os.path.join(d, "wall.json"), "wall_s"),
                base=base, reward=[r["reward"] for r in rows], sampled=[r.get("dgs_attempts_per_rollout", 1.0) * rollouts for r in rows],
                step_s=[r["t_rollout"] + r["t_reward"] + r["t_update"] for r in rows],
                sampled_per_accepted=mean("dgs_attempts_per_rollout") or 1.0)


def to_level(runs, gain):
    """Add steps / rollouts sampled / seconds to reach the reward level to every RL record (None = not reached)."""
    for name, by_seed in runs.items():
        ref = [r["reward"][0] for r in runs.get(LEVEL_REF.get(name, name), by_seed).values() if r.get("reward")]
        level = statistics.fmean(ref) + gain if ref else None
        for r in by_seed.values():
            hit = next((i for i, x in enumerate(r.get("reward", [])) if level is not None and x >= level), None)
            r.update(level=level, steps_to_level=None if hit is None else hit + 1,
                     rollouts_to_level=None if hit is None else sum(r["sampled"][:hit + 1]),
                     seconds_to_level=None if hit is None else sum(r["step_s"][:hit + 1]))
    return runs


def stat(vals, fmt="{:.3f}"):
    """'mean ± std' (sample std over seeds); '—' if none; '(k/n)' appended when only k of n reached."""
    got = [v for v in vals if v is not None]
    if not got:
        return "—"
    s = fmt.format(statistics.fmean(got)) + (" ± " + fmt.format(statistics.stdev(got)) if len(got) > 1 else "")
    return s + (f" ({len(got)}/{len(vals)})" if len(got) < len(vals) else "")


def col(runs, name, key, sub=None):
    return [(r[key] or {}).get(sub) if sub else r.get(key) for r in runs[name].values()]


def mean(runs, name, key, sub=None):
    got = [v for v in col(runs, name, key, sub) if v is not None]
    return statistics.fmean(got) if got else None


def table(res):
    runs = res["runs"]
    head = METRICS + ["reward level", "steps to level", "rollouts to level", "RL s to level", "run wall s"]
    lines = ["| variant | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for n in runs:
        cells = [stat(col(runs, n, "eval", m)) for m in METRICS]
        cells += [next((f"{v:.3f}" for v in col(runs, n, "level") if v is not None), "—")]  # one per variant
        cells += [stat(col(runs, n, k), "{:.1f}") for k in ("steps_to_level", "rollouts_to_level", "seconds_to_level", "wall_s")]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", f"Cells: mean ± std over seeds {res['config']['seeds']}; reward level = mean first-step training reward "
              f"(dgs-off: joint's) + {res['config']['reward_level']}; — = not reached, (k/n) = reached in k of n seeds.", "",
              "| DGS | rollouts sampled per accepted | steps to level | rollouts to level |", "|---|---|---|---|"]
    for label, n in (("on (joint)", "joint"), ("off (dgs-off)", "dgs-off")):
        if n in runs:
            keys = ("sampled_per_accepted", "steps_to_level", "rollouts_to_level")
            lines.append(f"| {label} | " + " | ".join(stat(col(runs, n, k), "{:.1f}") for k in keys) + " |")
    return "\n".join(lines) + "\n"


# two-sided 95% quantiles of Student's t by degrees of freedom (n seeds - 1)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def paired_interval(diffs):
    """(mean, half-width of its 95% t interval, n) of per-seed paired differences; half-width nan under 2 seeds."""
    n = len(diffs)
    if n < 2:
        return (diffs[0] if diffs else float("nan")), float("nan"), n
    return statistics.fmean(diffs), T975.get(n - 1, 1.96) * statistics.stdev(diffs) / n ** 0.5, n


def verdict(mean, half):
    """The rule, fixed before running: the claim reproduces when the 95% interval of the paired difference
    excludes 0 in the claimed direction (> 0), is contradicted when it excludes 0 the other way, and is not
    shown otherwise (also with one seed: no interval)."""
    if half != half:  # nan
        return "not shown (one seed: no interval)"
    return "reproduces" if mean - half > 0 else "contradicted" if mean + half < 0 else "not shown"


def paired(runs, a, b, metrics):
    """Per-seed differences a - b of the mean over `metrics` (seeds both ran), as paired_interval."""
    seeds = [s for s in runs[a] if s in runs[b]]
    group = lambda r: statistics.fmean(r["eval"][m] for m in metrics)
    return paired_interval([group(runs[a][s]) - group(runs[b][s]) for s in seeds])


def claims(res):
    """Each claim: its paired difference over seeds with a 95% interval, and the verdict under the rule."""
    runs, out = res["runs"], []
    need = lambda *ns: all(n in runs for n in ns)
    line = lambda label, a, b, ms: (lambda m, h, n: f"{label}: {m:+.3f} ± {h:.3f} (n={n}): {verdict(m, h)}")(*paired(runs, a, b, ms))
    if need("joint", "base"):
        out.append("1. RL improves both (joint - base, mean held-out metric): " + line("understanding", "joint", "base", UND)
                   + "; " + line("generation", "joint", "base", GEN))
    if need("joint", "gen-only", "und-only"):
        out.append("2. Synergy: " + line("joint - gen-only on generation", "joint", "gen-only", GEN) + "; "
                   + line("joint - und-only on understanding", "joint", "und-only", UND))
    if need("joint", "dgs-off"):
        out.append(f"3. DGS: steps to the reward level on {stat(col(runs, 'joint', 'steps_to_level'), '{:.1f}')} vs off "
                   f"{stat(col(runs, 'dgs-off', 'steps_to_level'), '{:.1f}')}; rollouts sampled to it on "
                   f"{stat(col(runs, 'joint', 'rollouts_to_level'), '{:.0f}')} vs off {stat(col(runs, 'dgs-off', 'rollouts_to_level'), '{:.0f}')}. "
                   "No verdict yet: the variance of the policy-gradient estimate is not measured here.")
    if need("joint", "no-text-reward", "no-cycle-reward"):
        out.append("4. Ensemble reward: " + "; ".join(line(f"joint - {n}", "joint", n, UND + GEN) for n in ("no-text-reward", "no-cycle-reward")))
    head = (f"Paired differences over seeds {res['config']['seeds']} (same base, same evaluation noise), mean ± the "
            "half-width of the 95% t interval. Rule: reproduces if the interval excludes 0 in the claimed direction.\n\n")
    return head + "\n".join(out) + "\n"


def curves(runs, by_rollouts):
    """Mean over seeds of the per-step reward, against the step or the cumulative rollouts sampled."""
    out = {}
    for name, by_seed in runs.items():
        rs = [r for r in by_seed.values() if r.get("reward")]
        if rs:
            n = min(len(r["reward"]) for r in rs)
            y = [statistics.fmean(r["reward"][i] for r in rs) for i in range(n)]
            x = [statistics.fmean(sum(r["sampled"][:i + 1]) for r in rs) for i in range(n)] if by_rollouts else list(range(1, n + 1))
            out[name] = (x, y)
    return out


def report(out_dir, gain=None):
    """table.md, claims.md and both plots from results.json alone; the reward level is recomputed from the curves."""
    res = read_json(os.path.join(out_dir, "results.json"))
    res["config"]["reward_level"] = res["config"]["reward_level"] if gain is None else gain
    to_level(res["runs"], res["config"]["reward_level"])
    text, summary = table(res), claims(res)
    for name, s in (("table.md", text), ("claims.md", summary)):
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(s)
    plot(os.path.join(out_dir, "reward_vs_step.png"), curves(res["runs"], False), "RL step", "mean training reward")
    plot(os.path.join(out_dir, "reward_vs_rollouts.png"), curves(res["runs"], True), "rollouts sampled (previews included)", "mean training reward")
    print(text + "\n" + summary)


def main(argv=None):
    args = get_args(argv)
    if args.table_only:
        return report(args.out_dir, args.reward_level)
    os.makedirs(args.out_dir, exist_ok=True)
    args.data_dir = os.path.join(args.out_dir, "world")
    args.reward_level = 0.03 if args.reward_level is None else args.reward_level
    check_same_setup(args)
    runs, t0 = {}, time.time()
    for name in args.variants:  # a base is pretrained when a variant first needs it, then reused
        runs[name] = {}
        for seed in args.seeds:
            mode, flags = VARIANTS[name]
            base = run_base(args, mode, args.seeds[0] if args.shared_base else seed)
            runs[name][str(seed)] = base if flags is None else run_rl(args, name, seed)
    config = {k: v for k, v in vars(args).items() if k not in ("table_only",)}
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump({"config": config, "runs": to_level(runs, args.reward_level)}, f, indent=1)
    print(f"suite done in {time.time() - t0:.0f} s")
    report(args.out_dir)


if __name__ == "__main__":
    main()
