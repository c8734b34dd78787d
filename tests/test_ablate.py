"""The ablation suite end to end on a tiny world and model, the table rebuilt from hand-written raw results,
and clear errors for bad flags."""
import json
import os
import subprocess
import sys

import pytest
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
    lines = [line for line in open(path).read().split("\n\n")[0].splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return head, {r[0]: dict(zip(head[1:], r[1:])) for r in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def test_quick_suite_end_to_end(tmp_path, capsys):
    out = tmp_path / "ablate"
    argv = ["--quick", "--out-dir", str(out), "--seeds", "0", "--iters", "10", "--rl-iters", "1", "--rollouts", "8",
            "--group", "4", "--", *TINY]
    ablate.main(argv)  # in-process: train.py still runs as subprocesses, one at a time
    res = json.loads((out / "results.json").read_text())
    assert list(res["runs"]) == list(ablate.VARIANTS)
    for name, by_seed in res["runs"].items():
        assert list(by_seed) == ["0"], name
        assert set(METRICS) <= set(by_seed["0"]["eval"]), name
        assert len(by_seed["0"]["reward"]) == (0 if name.startswith("base") else 1), name
    head, rows = table_rows(out / "table.md")
    assert set(METRICS) <= set(head) and list(rows) == list(ablate.VARIANTS)
    for name, cells in rows.items():
        for m in METRICS:
            assert cells[m] and "nan" not in cells[m] and cells[m] != "—", (name, m, cells[m])
    assert "DGS" in (out / "table.md").read_text()
    claims = (out / "claims.md").read_text()
    assert all(f"{i}. " in claims for i in range(1, 5)) and "not shown (one seed: no interval)" in claims
    for png in ("reward_vs_step.png", "reward_vs_rollouts.png"):
        with Image.open(out / png) as im:
            im.load()
            assert im.size[0] > 100
    capsys.readouterr()
    ablate.main(argv)  # a second call finds every eval.json and runs nothing again
    assert " -> " not in capsys.readouterr().out  # neither a base nor an RL run was started


def record(v, reward=(), sampled=()):
    return {"eval": {m: v for m in METRICS}, "wall_s": 10.0 * v, "reward": list(reward), "sampled": list(sampled),
            "step_s": [1.0] * len(reward)}


def test_table_only_from_hand_written_results(tmp_path):
    runs = {"base": {"0": record(0.1), "1": record(0.2), "2": record(0.3)},
            "joint": {"0": record(0.5, [0.1, 0.3], [64, 64]), "1": record(0.7, [0.2, 0.4], [64, 96])}}
    (tmp_path / "results.json").write_text(json.dumps({"config": {"seeds": [0, 1, 2], "reward_level": 0.03}, "runs": runs}))
    p = run("--table-only", "--out-dir", str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    _, rows = table_rows(tmp_path / "table.md")
    assert rows["base"]["vqa"] == "0.200 ± 0.100"       # sample std of 0.1, 0.2, 0.3
    assert rows["joint"]["identity"] == "0.600 ± 0.141"  # sample std of 0.5, 0.7 = 0.1414
    # level = mean first-step reward 0.15 + 0.03: seed 0 reaches it at step 2 (128 rollouts), seed 1 at step 1 (64)
    assert rows["joint"]["reward level"] == "0.180" and rows["base"]["steps to level"] == "—"
    assert rows["joint"]["steps to level"] == "1.5 ± 0.7" and rows["joint"]["rollouts to level"] == "96.0 ± 45.3"
    assert rows["base"]["run wall s"] == "2.0 ± 1.0"
    # paired over seeds 0 and 1: 0.5 - 0.1, 0.7 - 0.2 -> mean 0.45, sd 0.0707, t(1) 12.706 x 0.05 = 0.635
    assert "understanding: +0.450 ± 0.635 (n=2): not shown" in (tmp_path / "claims.md").read_text()
    x, y = ablate.curves(runs, True)["joint"]
    assert x == [64, 144] and y == pytest.approx([0.15, 0.35])
    for png in ("reward_vs_step.png", "reward_vs_rollouts.png"):
        Image.open(tmp_path / png).verify()
    assert run("--table-only", "--out-dir", str(tmp_path), "--reward-level", "0.2").returncode == 0
    assert table_rows(tmp_path / "table.md")[1]["joint"]["steps to level"] == "2.0 (1/2)"  # level 0.35: only 0.4 reaches it


@pytest.mark.parametrize("argv, msg", [(["--seeds", ""], "--seeds must be comma-separated integers"),
                                       (["--seeds", "0,x"], "--seeds must be comma-separated integers"),
                                       (["--rl-iters", "0"], "--rl-iters must be a positive integer"),
                                       (["--variants", "joint,nope"], "--variants: unknown")])
def test_bad_flags_fail_clearly(argv, msg, capsys):
    with pytest.raises(SystemExit):
        ablate.get_args(argv)
    assert msg in capsys.readouterr().err


def test_out_dir_of_another_setup_is_refused(tmp_path):
    (tmp_path / "setup.json").write_text(json.dumps({"iters": 1}))
    with pytest.raises(SystemExit, match="use another --out-dir"):
        ablate.main(["--out-dir", str(tmp_path), "--variants", "base"])


def test_paired_interval_and_verdict_by_hand():
    m, h, n = ablate.paired_interval([0.1, 0.2, 0.3])  # sd 0.1, se 0.0577, t(2) = 4.303
    assert (m, n) == (pytest.approx(0.2), 3) and h == pytest.approx(4.303 * 0.1 / 3 ** 0.5)
    assert ablate.verdict(m, h) == "not shown"  # the interval [-0.048, 0.448] holds 0
    assert ablate.verdict(*ablate.paired_interval([0.30, 0.31, 0.29, 0.30, 0.32])[:2]) == "reproduces"
    assert ablate.verdict(*ablate.paired_interval([-0.30, -0.31, -0.29])[:2]) == "contradicted"
    assert ablate.verdict(*ablate.paired_interval([0.5])[:2]).startswith("not shown (one seed")
