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
    (["--eps", "inf"], "--eps must be a finite number"),
    (["--eps", "nan"], "--eps must be a finite number"),
    (["--eps", "1.5"], "--eps is the clip range of the ratio, in [0, 1)"),
    (["--beta", "nan"], "--beta must be a finite number"),
    (["--rl-lr", "inf"], "--rl-lr must be a finite number"),
    (["--rl-lr", "nan"], "--rl-lr must be a finite number"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--cfg", "inf"], "--cfg must be a finite number"),
    (["--temperature", "nan"], "--temperature must be positive"),
    (["--temperature", "inf"], "--temperature must be finite"),
    (["--rewards", "identity=nan"], "--rewards: the weight of identity must be finite"),
    (["--n-test-concepts", "1"], "--n-test-concepts must be at least 2"),
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


# ----------------------------------------------------------------------------- nothing silent, round two

def test_rl_refuses_a_checkpoint_of_another_world_naming_both(run, tmp_path):
    for n in ("10", "6"):  # more concepts (every image id shifted) and fewer (ids out of range)
        args = tiny_args(tmp_path, "--ckpt", str(run / "pretrain"), "--n-train-concepts", n,
                         "--data-dir", str(tmp_path / f"world{n}"), "--out-dir", str(tmp_path / n))
        with pytest.raises(ckpt.BadInput, match="vocabulary") as e:
            T.rl(args)
        assert str(tmp_path / f"world{n}") in str(e.value) and str(run / "pretrain" / "step_000004") in str(e.value)


def test_a_run_owns_its_folder(tmp_path, capsys):
    folder = tmp_path / "rl"
    with ckpt.run_lock(str(folder)):
        with pytest.raises(ckpt.BadInput, match=f"{folder}: in use by another run \\(process {os.getpid()}"):
            with ckpt.run_lock(str(folder)):
                pass
        with pytest.raises(ckpt.BadInput, match="in use by another run"):  # the whole job refuses, before any work
            T.main(TINY + ["--data-dir", str(tmp_path / "world"), "--out-dir", str(tmp_path), "--no-compile"])
    assert not (folder / "LOCK").exists()  # released on exit
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    folder.mkdir(exist_ok=True)
    (folder / "LOCK").write_text(json.dumps({"pid": gone.pid, "host": __import__("socket").gethostname()}))
    with ckpt.run_lock(str(folder)):  # a killed run's lock: reported and taken over
        assert json.loads((folder / "LOCK").read_text())["pid"] == os.getpid()
    assert f"left by process {gone.pid}, which is gone" in capsys.readouterr().out
    assert not (folder / "LOCK").exists()


@pytest.mark.parametrize("damage_kind", ["cut", "not_png", "empty_answer"])
def test_world_folder_damage_names_the_file(run, tmp_path, damage_kind):
    world = tmp_path / "world"
    shutil.copytree(run / "world", world)
    test_dir = world / "concept" / "test" / json.loads((world / "world.json").read_text())["test"][0]  # a held-out concept
    if damage_kind == "empty_answer":
        path = test_dir / "vqa.json"
        rows = json.loads(path.read_text())
        rows[0]["answer"] = ""
        path.write_text(json.dumps(rows))
    else:
        path = test_dir / "0.png"
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2] if damage_kind == "cut" else b"no image here")
    with pytest.raises(ckpt.BadInput, match=str(path)):
        pretrain.world_and_tokenizer(tiny_args(tmp_path, "--data-dir", str(world)))


def test_output_folders_that_cannot_be_written_are_named(run, tmp_path):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    with pytest.raises(ckpt.BadInput, match=f"--out-dir {afile / 'pretrain'}: cannot write there"):
        T.main(TINY + ["--stage", "pretrain", "--data-dir", str(run / "world"), "--out-dir", str(afile)])
    calls = []
    with pytest.raises(ckpt.BadInput, match=f"--eval-dir {afile}: cannot write there"):  # checked before evaluating
        E.run_eval(tiny_args(tmp_path, "--stage", "eval", "--ckpt", str(run / "pretrain"), "--data-dir", str(run / "world"),
                             "--eval-dir", str(afile)), lambda *a: calls.append(a))
    assert not calls
    E.run_eval(tiny_args(tmp_path, "--stage", "eval", "--ckpt", str(run / "pretrain"), "--data-dir", str(run / "world"),
                         "--eval-dir", str(tmp_path / "results"), "--eval-reward-prompts", "0"), T.held_out_eval)
    assert (tmp_path / "results" / "eval_world-seed1234.json").is_file()  # elsewhere, as asked


def test_a_full_disk_is_named_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    args = tiny_args(tmp_path)
    model = pretrain.new_model(args, pretrain.world_and_tokenizer(args)[1])
    ckpt.save_checkpoint(str(tmp_path / "rl"), 1, model, {}, dict(x=torch.zeros(1)))

    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ckpt.BadInput, match=f"{tmp_path / 'rl' / 'step_000002.tmp'}: could not write it .*disk full"):
        ckpt.save_checkpoint(str(tmp_path / "rl"), 2, model, {}, dict(x=torch.zeros(1)))
    assert sorted(os.listdir(tmp_path / "rl")) == ["latest", "step_000001"]
    assert ckpt.resolve_ckpt(str(tmp_path / "rl")).endswith("step_000001")


def test_ctrl_c_says_where_the_checkpoint_is_and_how_to_resume(run, tmp_path, monkeypatch):
    shutil.copytree(run / "pretrain", tmp_path / "pretrain")

    def interrupted(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(T, "run_pretrain", interrupted)
    with pytest.raises(SystemExit) as e:
        T.main(TINY + ["--stage", "pretrain", "--data-dir", str(run / "world"), "--out-dir", str(tmp_path)])
    assert str(tmp_path / "pretrain" / "step_000004") in str(e.value.code) and "--resume" in str(e.value.code)
    assert not (tmp_path / "pretrain" / "LOCK").exists()


def test_replay_loss_is_finite_without_image_targets(tmp_path):
    args = tiny_args(tmp_path)
    world, tok = pretrain.world_and_tokenizer(args)
    model = pretrain.new_model(args, tok)
    tasks = data.make_tasks(world, ["textqa"], 4, seed=0)  # answers only: no image target in the batch
    batch = pretrain.collate([pretrain.pretrain_example(tok, t, None, args) for t in tasks], tok.pad_id, "cpu")
    loss, lt, li = ckpt.M.supervised_loss(model, model, tok, batch)
    loss.backward()
    assert torch.isfinite(loss) and li.item() == 0.0 and lt.item() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_missing_showo_folder_on_the_rl_path_is_one_line(tmp_path):
    with pytest.raises(ckpt.BadInput, match=f"--showo-dir {tmp_path / 'nope'}: not found"):
        T.main(["--showo-dir", str(tmp_path / "nope"), "--out-dir", str(tmp_path), "--no-compile"])


def test_rl_refuses_an_unfinished_pretraining_and_a_damaged_results_file(run, tmp_path):
    shutil.copytree(run / "pretrain", tmp_path / "pretrain")
    (tmp_path / "pretrain" / "latest").write_text("step_000002")  # killed after its first save
    with pytest.raises(ckpt.BadInput, match="stopped at step 2 of 4; finish it first with --stage pretrain --resume"):
        T.rl(tiny_args(tmp_path, "--iters", "4", "--data-dir", str(run / "world")))
    folder = tmp_path / "pretrain" / "step_000004"
    (folder / "eval_world-seed1234.json").write_text('{"world": ')
    with pytest.raises(ckpt.BadInput, match="eval_world-seed1234.json: expected an earlier results file"):
        E.run_eval(tiny_args(tmp_path, "--stage", "eval", "--ckpt", str(folder), "--data-dir", str(run / "world")),
                   T.held_out_eval)
