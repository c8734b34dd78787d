"""The ablation suite end to end on a tiny world and model, the table rebuilt from hand-written raw results,
and clear errors for bad flags."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from experiments import ablate
from eval import METRICS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n-train-concepts", "8", "--n-test-concepts", "2", "--n-layer", "1", "--n-embd", "32",
        "--batch", "8", "--maskgit-steps", "4", "--max-text", "8", "--mu", "1",
        "--eval-draws", "1", "--eval-reward-prompts", "2"]


def run(*argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "ablate.py"), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def table_rows(path):
    first = next(b for b in open(path).read().split("\n\n") if b.startswith("|"))  # the first table
    lines = first.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return head, {r[0]: dict(zip(head[1:], r[1:])) for r in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def test_quick_suite_end_to_end(tmp_path, capsys):
    out = tmp_path / "ablate"
    argv = ["--quick", "--out-dir", str(out), "--seeds", "0", "--iters", "10", "--rl-iters", "1", "--rollouts", "8",
            "--group", "4", "--", *TINY]
    ablate.main(argv)  # in-process: train.py still runs as subprocesses, one at a time
    res = json.loads((out / "results.json").read_text())
    assert list(res["runs"]) == ["base"] + list(ablate.VARIANTS)
    for name, by_seed in res["runs"].items():
        assert list(by_seed) == ["0"], name
        assert set(METRICS) <= set(by_seed["0"]["eval"]), name
        assert len(by_seed["0"]["reward"]) == (0 if name == "base" else 1), name
    probes = res["probes"]["0"]
    assert set(probes) == {"base_nocfg", "joint_nocfg", "null_nocfg", "base_dgs", "dgs_dgs"}
    assert list(probes["base_dgs"]["preview_corr"]) == ["1", "2", "3"]  # every preview step of T = 4
    for key in ("base_dgs", "dgs_dgs"):
        g = probes[key]["grad"]
        assert g["dgs_on"]["var"] > 0 and g["dgs_off"]["var"] > 0 and -1 <= g["cos"] <= 1
    head, rows = table_rows(out / "table.md")
    assert set(METRICS) <= set(head) and list(rows) == ["base"] + list(ablate.VARIANTS)
    for name, cells in rows.items():
        for m in METRICS:
            assert cells[m] and "nan" not in cells[m] and cells[m] != "—", (name, m, cells[m])
    text = (out / "table.md").read_text()
    assert "null" in text and "within-prompt correlation by preview step" in text and "DGS on" in text
    claims = (out / "claims.md").read_text()
    assert all(f"{i}. " in claims for i in range(1, 5)) and "not shown (one seed: no interval)" in claims
    for png in ("reward_vs_step.png", "reward_vs_rollouts.png"):
        with Image.open(out / png) as im:
            im.load()
            assert im.size[0] > 100
    capsys.readouterr()
    ablate.main(argv)  # a second call finds every eval.json and probe and measures nothing again
    printed = capsys.readouterr().out
    assert " -> " not in printed and "probe " not in printed


def evals(v, reward):
    return {**{m: v for m in METRICS}, "reward": reward}


def record(v, base_v, reward=(), sampled=()):
    """One run of a hand-written results file: held-out metrics all v (its base's all base_v), training rewards."""
    return {"eval": evals(v, v), "base_eval": evals(base_v, base_v), "reward": list(reward), "sampled": list(sampled),
            "step_s": [1.0] * len(reward)}


def test_table_and_claims_from_hand_written_results(tmp_path):
    runs = {"base": {s: {"eval": evals(b, b)} for s, b in (("0", 0.1), ("1", 0.2), ("2", 0.3))},
            "joint": {"0": record(0.5, 0.1, [0.1, 0.3], [64, 64]), "1": record(0.7, 0.2, [0.2, 0.4], [64, 96]),
                      "2": record(0.6, 0.3, [0.1, 0.1], [64, 64])},
            "null": {"0": record(0.1, 0.1, [0.1, 0.1], [64, 64]), "1": record(0.3, 0.2, [0.2, 0.2], [64, 64]),
                     "2": record(0.2, 0.3, [0.1, 0.1], [64, 64])}}
    grad = lambda off, on: {"dgs_off": {"var": off, "mean_sq": 2.0, "batches": 2}, "dgs_on": {"var": on, "mean_sq": 2.0, "batches": 2},
                            "bias_sq": 0.5, "cos": 0.9}
    probes = {s: {"base_nocfg": evals(0.1, 0.1), "joint_nocfg": evals(0.1 + d, 0.1),
                  "base_dgs": {"preview_corr": {"1": 0.1, "2": c}, "grad": grad(2.0, 1.0)}}
              for s, d, c in (("0", 0.1, 0.2), ("1", 0.2, 0.4), ("2", 0.3, 0.6))}
    (tmp_path / "results.json").write_text(json.dumps({"config": {"seeds": [0, 1, 2], "rollouts": 64}, "runs": runs, "probes": probes}))
    p = run("--table-only", "--out-dir", str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    _, rows = table_rows(tmp_path / "table.md")
    assert rows["base"]["vqa"] == "0.200 ± 0.100"      # sample std of 0.1, 0.2, 0.3
    assert rows["joint"]["identity"] == "0.600 ± 0.100"
    text, claims = (tmp_path / "table.md").read_text(), (tmp_path / "claims.md").read_text()
    # joint - its own base, seed by seed: 0.4, 0.5, 0.3 -> mean 0.4, sd 0.1, t(2) 4.303 x 0.1 / sqrt(3) = 0.248
    assert "| joint | +0.400 ± 0.248 | +0.400 ± 0.248 | +0.400 ± 0.248 |" in text
    assert "understanding: +0.400 ± 0.248 (n=3): reproduces" in claims
    # null - base: 0.0, 0.1, -0.1 -> mean 0, sd 0.1: the interval holds 0
    assert "[null - base: +0.000 ± 0.248 (n=3): no change shown]" in claims
    # drawings without CFG: 0.1, 0.2, 0.3 -> mean 0.2, sd 0.1
    assert "as RL samples them (identity, alignment, knowledge): +0.200 ± 0.248 (n=3): not shown" in claims
    assert "| base | +0.10 ± 0.00 | +0.40 ± 0.20 |" in text  # preview correlation by step, over seeds
    assert "| base | 2 ± 0 | 1 ± 0 | 0.50 ± 0.00 |" in text  # gradient variance off, on, on / off
    # level = mean first-step reward 0.133 + 0.03: seed 0 reaches it at step 2 (128 rollouts), seed 1 at step 1 (64)
    assert "| joint | +0.400 ± 0.248 | +0.400 ± 0.248 | +0.400 ± 0.248 | 1.5 ± 0.7 (2/3) | 96.0 ± 45.3 (2/3) |" in text
    x, y = ablate.curves(runs, ["joint"], True)["joint"]
    assert x == pytest.approx([64, 64 + 224 / 3]) and y == pytest.approx([0.4 / 3, 0.8 / 3])
    assert ablate.curves(runs, ["joint"], False, "null")["joint"] == ([1, 2], pytest.approx([0.0, 0.4 / 3]))  # less null's, per seed
    for png in ("reward_vs_step.png", "reward_vs_rollouts.png"):
        Image.open(tmp_path / png).verify()


@pytest.mark.parametrize("argv, msg", [(["--seeds", ""], "--seeds must be comma-separated integers"),
                                       (["--seeds", "0,x"], "--seeds must be comma-separated integers"),
                                       (["--rl-iters", "0"], "--rl-iters must be a positive integer"),
                                       (["--variants", "joint,nope"], "--variants: unknown"),
                                       (["--", "--world-seed", "7"], "use --base pretrain")])
def test_bad_flags_fail_clearly(argv, msg, capsys):
    with pytest.raises(SystemExit):
        ablate.get_args(argv)
    assert msg in capsys.readouterr().err


def test_out_dir_of_another_setup_is_refused(tmp_path):
    (tmp_path / "setup.json").write_text(json.dumps({"iters": 1}))
    with pytest.raises(SystemExit, match="use another --out-dir"):
        ablate.main(["--out-dir", str(tmp_path), "--variants", "joint"])


def test_paired_interval_and_verdict_by_hand():
    m, h, n = ablate.paired_interval([0.1, 0.2, 0.3])  # sd 0.1, se 0.0577, t(2) = 4.303
    assert (m, n) == (pytest.approx(0.2), 3) and h == pytest.approx(4.303 * 0.1 / 3 ** 0.5)
    assert ablate.verdict(m, h) == "not shown"  # the interval [-0.048, 0.448] holds 0
    assert ablate.verdict(*ablate.paired_interval([0.30, 0.31, 0.29, 0.30, 0.32])[:2]) == "reproduces"
    assert ablate.verdict(*ablate.paired_interval([-0.30, -0.31, -0.29])[:2]) == "contradicted"
    assert ablate.verdict(*ablate.paired_interval([0.5])[:2]).startswith("not shown (one seed")


def test_split_half_variance_on_a_known_answer():
    from experiments import probes
    w = torch.zeros(3, requires_grad=True)
    x = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, -1.0]])
    v, g = probes.split_half_variance(lambda rows: (x[rows] @ w).mean(), [w], [[0], [1]])
    assert v == pytest.approx(5.0) and torch.allclose(g, x.mean(0))  # ||(-2, 0, 4)||^2 / 4 = 5
    # rows ~ N(1, sigma^2 I_d), n per batch: the batch's mean gradient has trace covariance d sigma^2 / n
    gen, d, n, sigma, est = torch.Generator().manual_seed(0), 5, 8, 0.5, []
    w = torch.zeros(d, requires_grad=True)
    for _ in range(2000):
        X = 1 + sigma * torch.randn(n, d, generator=gen)
        est.append(probes.split_half_variance(lambda rows: (X[rows] @ w).mean(), [w], [list(range(4)), list(range(4, 8))])[0])
    assert sum(est) / len(est) == pytest.approx(d * sigma ** 2 / n, rel=0.1)
