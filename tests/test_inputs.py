"""Bad inputs and interrupted runs on a tiny world: damaged checkpoint files and world folders give one
message naming the file, number flags are bounded up front, --resume needs a checkpoint, a resumed run
logs each step once, --stage eval keeps one result file per world, a killed save leaves nothing behind."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt
import eval as E
from world import data
import flags
import pretrain
import train as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n-train-concepts", "8", "--n-test-concepts", "2", "--n-layer", "1", "--n-embd", "32",
        "--batch", "8", "--maskgit-steps", "4", "--max-text", "8",
        "--ckpt", "pretrain", "--eval-draws", "1", "--eval-reward-prompts", "2"]


def tiny_args(tmp, *extra):
    return flags.get_args(TINY + ["--data-dir", str(tmp / "world"), "--out-dir", str(tmp)] + list(extra))


@pytest.fixture(scope="module", autouse=True)
def log_every_step():
    """Pretraining writes a metric line every step here (was --log-every 1 in TINY; now pretrain.LOG_EVERY)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrain, "LOG_EVERY", 1)
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory, log_every_step):
    """A 4-step pretraining run with checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("run")
    pretrain.pretrain(tiny_args(tmp, "--iters", "4", "--ckpt-every", "2"))
    return tmp


def steps_logged(path):
    return [json.loads(line)["step"] for line in open(path)]


def test_resumed_pretraining_logs_each_step_once(run, tmp_path):
    shutil.copytree(run, tmp_path, dirs_exist_ok=True)
    (tmp_path / "pretrain" / "latest").write_text("step_000002")  # killed after step 4's log, before its save
    pretrain.pretrain(tiny_args(tmp_path, "--stage", "pretrain", "--iters", "4", "--ckpt-every", "2", "--resume"))
    rows = [json.loads(line) for line in open(tmp_path / "pretrain" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["seconds"] >= rows[1]["seconds"]  # the clock carries on from the checkpoint
    pretrain.pretrain(tiny_args(tmp_path, "--iters", "2"))  # a fresh run starts a fresh log
    assert steps_logged(tmp_path / "pretrain" / "metrics.jsonl") == [1, 2]


def damage(folder, what):
    f = folder / {"safetensors_cut": "model.safetensors", "safetensors_garbled": "model.safetensors",
                  "nan": "model.safetensors", "meta_cut": "meta.json", "meta_no_config": "meta.json",
                  "state_cut": "state.pt"}[what]
    blob = f.read_bytes()
    if what.endswith("_cut"):
        f.write_bytes(blob[:len(blob) // 2])
    elif what == "safetensors_garbled":
        f.write_bytes(bytes(b ^ 0x5A for b in blob))
    elif what == "meta_no_config":
        meta = json.loads(blob)
        del meta["config"]
        f.write_text(json.dumps(meta))
    else:
        w = load_file(f)
        w["lm_head.weight"][0, 0] = float("nan")
        save_file(w, f)
    return f.name


@pytest.mark.parametrize("what", ["safetensors_cut", "safetensors_garbled", "nan", "meta_cut", "meta_no_config", "state_cut"])
def test_damaged_checkpoint_names_its_file(run, tmp_path, what):
    folder = tmp_path / "pretrain" / "step_000004"
    shutil.copytree(run / "pretrain" / "step_000004", folder)
    (tmp_path / "pretrain" / "latest").write_text("step_000004")
    name = damage(folder, what)
    with pytest.raises(ckpt.BadInput, match=f"{name}: expected"):
        ckpt.load_checkpoint(str(folder))
    with pytest.raises(ckpt.BadInput, match=f"{name}: expected"):
        pretrain.pretrain(tiny_args(tmp_path, "--stage", "pretrain", "--iters", "6", "--data-dir", str(run / "world"), "--resume"))


def test_bad_file_is_one_line_and_exit_1(run, tmp_path):
    folder = tmp_path / "step_000004"
    shutil.copytree(run / "pretrain" / "step_000004", folder)
    damage(folder, "meta_cut")
    world = tmp_path / "world"
    shutil.copytree(run / "world", world)
    (world / "world.json").write_text('{"seed": 12')
    for argv in (["--stage", "eval", "--ckpt", str(folder), "--data-dir", str(run / "world")],
                 ["--stage", "pretrain", "--data-dir", str(world), "--out-dir", str(tmp_path)]):
        p = subprocess.run([sys.executable, "train.py", *TINY, *argv], cwd=ROOT, capture_output=True, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
        assert p.returncode == 1 and "Traceback" not in p.stderr
        line = p.stderr.strip().splitlines()[-1]
        assert line.startswith("error: ") and ("meta.json: expected" in line or "world.json: malformed JSON" in line), p.stderr


@pytest.mark.parametrize("argv, message", [
    (["--ckpt-every", "0"], "--ckpt-every must be positive"),
    (["--maskgit-steps", "0"], "--maskgit-steps must be positive"),
    (["--lr=-1e-3"], "--lr must be a finite number, 0 or more"),
    (["--rl-lr=-1e-4"], "--rl-lr must be a finite number, 0 or more"),
    (["--eps=-0.5"], "--eps must be a finite number, 0 or more"),
    (["--group", "1", "--rollouts", "4"], "--group must be at least 2"),
    (["--temperature", "0"], "--temperature must be positive"),
    (["--ptx=-0.3"], "--ptx must be a finite number, 0 or more"),
    (["--ptx", "0.3", "--showo-dir", "somewhere"], "--ptx replays the embedded world's pretraining mix"),
])
def test_number_flags_are_bounded(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        tiny_args(tmp_path, *argv)
    assert message in capsys.readouterr().err


def test_useless_learning_rate_warns(tmp_path, capsys):
    tiny_args(tmp_path, "--rl-lr", "0")
    assert "warning: --rl-lr 0" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["pretrain", "rl"])
def test_resume_without_checkpoint_names_the_folder(tmp_path, capsys, stage):
    with pytest.raises(SystemExit):
        tiny_args(tmp_path, "--stage", stage, "--resume")
    assert f"--resume: no checkpoint in {tmp_path / stage}" in capsys.readouterr().err


def test_stage_eval_keeps_one_result_per_world(run, tmp_path):
    folder = run / "pretrain" / "step_000004"
    other = tmp_path / "seven" / "world"  # the same folder name, another seed
    E.run_eval(tiny_args(tmp_path, "--stage", "eval", "--ckpt", str(folder), "--data-dir", str(run / "world")), T.held_out_eval)
    E.run_eval(tiny_args(tmp_path, "--stage", "eval", "--ckpt", str(folder), "--data-dir", str(other), "--world-seed", "7"),
               T.held_out_eval)
    a, b = (json.loads((folder / f"eval_world-seed{s}.json").read_text()) for s in (1234, 7))
    assert a["world"]["seed"] == 1234 and b["world"]["seed"] == 7
    assert a["world"]["data_dir"] == str(run / "world") and set(a["metrics"]) >= {"recognition", "identity"}
    assert not (folder / "eval.json").exists()
    shutil.copytree(other, tmp_path / "copy" / "world")  # same name and seed, another folder: refused
    with pytest.raises(ckpt.BadInput, match="another world"):
        E.run_eval(tiny_args(tmp_path, "--stage", "eval", "--ckpt", str(folder), "--data-dir", str(tmp_path / "copy" / "world"),
                             "--world-seed", "7"), T.held_out_eval)
    assert json.loads((folder / "eval_world-seed7.json").read_text()) == b


def test_save_cleans_a_killed_save_and_keeps_normal_modes(tmp_path):
    run_dir = tmp_path / "rl"
    run_dir.mkdir()
    (run_dir / "latest.tmp4242").write_text("step_000001")
    (run_dir / "step_000001.tmp").mkdir()
    args = tiny_args(tmp_path)
    model = pretrain.new_model(args, pretrain.world_and_tokenizer(args)[1])
    final = ckpt.save_checkpoint(str(run_dir), 2, model, {}, dict(x=torch.zeros(1)))
    assert sorted(os.listdir(run_dir)) == ["latest", "step_000002"]
    modes = {f: os.stat(os.path.join(final, f)).st_mode & 0o777 for f in os.listdir(final)}
    assert len(set(modes.values())) == 1, modes


def test_main_job_evaluates_the_base_once_and_says_each_phase(tmp_path, monkeypatch, capsys):
    calls, evaluate = [], data.World.evaluate
    monkeypatch.setattr(data.World, "evaluate", lambda *a: calls.append(1) or evaluate(*a))
    T.rl(tiny_args(tmp_path, "--iters", "2", "--rl-iters", "1", "--rollouts", "4", "--group", "4", "--mu", "1",
                   "--no-dgs", "--no-compile"))
    out = capsys.readouterr().out
    assert len(calls) == 2  # the base right after pretraining, the RL model at the end
    for phase in ("world:", "pretraining the base", "evaluating the base", "Sync-GRPO:", "evaluating the RL model",
                  "after 1 Sync-GRPO steps", "Learnability of the RL task mix",
                  f"outputs in {tmp_path / 'rl'}: diagnostics.json, eval.json, metrics.jsonl, reward_vs_step.png"):
        assert phase in out, phase
    assert json.loads((tmp_path / "rl" / "eval.json").read_text())["base"] == json.loads((tmp_path / "pretrain" / "eval.json").read_text())
