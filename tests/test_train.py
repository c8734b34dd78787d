"""The training script end to end on a tiny world and model: checkpoints, ratio == 1 at the first inner
update, compiled == eager formulas, resume == uninterrupted, DDP ranks identical, clear errors."""
import copy
import json
import math
import os
import random
import socket
import subprocess
import sys

import pytest
import torch

import ckpt
import dgs
import flags
import model as M
import pretrain
import train as T
from world import codebook, data, tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n-train-concepts", "8", "--n-test-concepts", "2", "--n-layer", "1", "--n-embd", "32",
        "--batch", "8", "--maskgit-steps", "4", "--max-text", "8",
        "--ckpt", "pretrain", "--eval-draws", "1", "--eval-reward-prompts", "2"]
RL = ["--rollouts", "8", "--group", "4", "--mu", "2", "--dgs", "--no-compile", "--update-steps", "2"]


def tiny_args(tmp, *extra, image_mode="maskgit"):
    return flags.get_args(TINY + ["--data-dir", str(tmp / "world"), "--out-dir", str(tmp), "--image-mode", image_mode] + list(extra))


@pytest.fixture(scope="module", params=["maskgit", "ar"])
def base(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    T.run_pretrain(tiny_args(tmp, "--iters", "30", "--lr", "3e-3", image_mode=request.param), 0, 1, "cpu")
    return tmp


def test_pretrain_writes_checkpoint_metrics_and_samples(base):
    run = base / "pretrain"
    assert (run / "latest").read_text().startswith("step_")
    for f in ("metrics.jsonl", "samples.png", "eval.json"):
        assert (run / f).is_file()
    model, meta, state = ckpt.load_checkpoint(str(run))
    again, _, _ = ckpt.load_checkpoint(ckpt.resolve_ckpt(str(run)))
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert meta["step"] == 30 and state["opt"]["state"]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ckpt.BadInput, match="nope"):
        ckpt.load_checkpoint(str(tmp_path / "nope"))
    args = tiny_args(tmp_path, "--ckpt", str(tmp_path / "missing_base"))
    with pytest.raises(ckpt.BadInput, match="missing_base"):
        T.rl(args)


def test_bad_flags_fail_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tiny_args(tmp_path, "--rollouts", "10", "--group", "4")
    assert "multiple of --group" in capsys.readouterr().err


def rl_batch(base, *extra):
    args = tiny_args(base, *RL, *extra)
    world, tok = pretrain.world_and_tokenizer(args)
    policy, _, _ = ckpt.load_checkpoint(str(base / "pretrain"))
    batch, rolls, _ = T.collect(policy, tok, world, args, 0, 0, dgs.DGSState(), args.rollouts // args.group)
    return args, tok, policy, batch, rolls


@pytest.mark.parametrize("mix,sampler", [("both", "plain"), ("gen", "plain"), ("gen", "showo")])
def test_ratio_is_one_at_first_inner_update(base, mix, sampler):
    """Stored rollout log-probs == training log-probs: text (at its own temperature), MaskGIT (at the commit
    step) or AR tokens; Show-o's sampler draws from untempered logits, so its scorer must read them untempered too."""
    args, tok, policy, batch, _ = rl_batch(base, "--tasks", mix, "--rl-cfg", "1.5", "--temperature", "0.9",
                                           "--maskgit-sampler", sampler)
    policy.train()
    scored = T.score_batch(policy, policy, tok, batch, args, list(range(args.steps)))
    assert ("text" in scored) == (mix == "both") and "image" in scored
    stored = T.old_logprobs(policy, tok, batch, args, list(range(args.steps)))
    for key, (lp, mask, _) in scored.items():
        old = stored[key]
        assert mask.sum() > 0
        ratio = torch.exp(lp - old)[mask]
        assert (ratio - 1).abs().max() < 1e-5, key


def test_split_half_gradients_average_to_the_batch_gradient(base):
    """The claims suite's gradient-variance probe: two halves of whole groups, each with the batch's own
    advantages, average to the gradient of the whole batch's policy-gradient loss."""
    from experiments import probes
    args, tok, policy, batch, _ = rl_batch(base, "--rollouts", "16")
    A = T.advantages(batch, args, 0)
    var, g = probes.batch_gradient(policy, tok, batch, A, args)
    steps_sel = T.surprising_steps(batch.img, args.steps, args.update_steps)
    loss = T.policy_loss(policy, policy, tok, batch, A, T.old_logprobs(policy, tok, batch, args, steps_sel), {}, args,
                         steps_sel, first=True)[0]
    params = [p for p in policy.parameters() if p.requires_grad]
    full = torch.cat([(x if x is not None else torch.zeros_like(p)).flatten()
                      for x, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params)])
    assert var > 0 and full.abs().max() > 0
    assert torch.allclose(g, full, rtol=1e-4, atol=1e-7)


def test_rollout_groups_share_their_prompt(base):
    args, _, _, batch, rolls = rl_batch(base)
    for i in range(0, len(rolls), args.group):
        assert len({id(r.task) for r in rolls[i:i + args.group]}) == 1
    assert batch.r_text.shape == (len(rolls) // args.group, args.group)


def test_compiled_formulas_equal_eager():
    torch.manual_seed(0)
    new, old, ref = torch.randn(6, 9) * 0.3, torch.randn(6, 9) * 0.3, torch.randn(6, 9) * 0.3
    adv, mask = torch.randn(6, 1), torch.rand(6, 9) > 0.3
    R = torch.randn(4, 5)
    outs = []
    for on in (False, True):
        T.COMPILE["on"] = on
        obj, ratio = T.ppo_clip(new, old, adv, 0.2)
        outs.append((obj, ratio, T.k3_kl(new, ref), T.segment_mean(obj, mask), T.group_advantages(R, "std"),
                     *(T.aggregate(obj, mask, how) for how in ("dapo", "dr_grpo", "sum"))))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-6)


def test_clipped_surrogate_and_kl_by_hand():
    new, old = torch.log(torch.tensor([[1.5, 0.5, 1.1]])), torch.zeros(1, 3)
    obj, ratio = T.ppo_clip(new, old, torch.tensor([[1.0]]), 0.2)
    assert torch.allclose(obj, -torch.tensor([[1.2, 0.5, 1.1]]))  # positive A: the upside is clipped
    obj, _ = T.ppo_clip(new, old, torch.tensor([[-1.0]]), 0.2)
    assert torch.allclose(obj, torch.tensor([[1.5, 0.8, 1.1]]))   # negative A: the downside is clipped
    kl = T.k3_kl(torch.tensor([0.0, 0.0]), torch.log(torch.tensor([1.0, 2.0])))
    assert torch.allclose(kl, torch.tensor([0.0, 2 - torch.log(torch.tensor(2.0)) - 1]))
    x, m = torch.tensor([[1.0, 3.0, 100.0], [4.0, 0.0, 0.0]]), torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    assert T.segment_mean(x, m).item() == pytest.approx((2.0 + 4.0) / 2)


def test_loss_aggregations_by_hand():
    """Per-token losses of two rollouts (3 and 1 scored tokens, width 3), aggregated as TRL's loss_type does."""
    x, m = torch.tensor([[1.0, 3.0, 2.0], [4.0, 7.0, 7.0]]), torch.tensor([[1, 1, 1], [1, 0, 0]]).bool()
    want = {"grpo": (2.0 + 4.0) / 2, "dapo": 10.0 / 4, "bnpo": 10.0 / 4, "dr_grpo": 10.0 / (2 * 3), "sum": (6.0 + 4.0) / 2}
    for k in want:  # every --loss-agg choice has its hand-computed value here
        assert flags.get_args(["--loss-agg", k]).loss_agg == k
    for k, v in want.items():
        assert T.aggregate(x, m, k).item() == pytest.approx(v), k


def test_advantages_and_log_ratio_clamp_by_hand():
    R = torch.tensor([[0.0, 1.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    std = T.group_advantages(R, "std")
    assert torch.allclose(std[0], (R[0] - 1.5) / (R[0].std(correction=0) + 1e-4))  # population std, as documented
    assert torch.equal(std[1], torch.zeros(4))  # an all-equal group: exactly 0, not rounding noise
    assert torch.allclose(T.group_advantages(R, "nostd")[0], R[0] - 1.5)
    assert torch.allclose(T.group_advantages(R, "batchstd")[0], (R[0] - 1.5) / (R.std(correction=0) + 1e-4))
    _, ratio = T.ppo_clip(torch.tensor([[20.0, -20.0, 0.5]]), torch.zeros(1, 3), torch.ones(1, 1), 0.2)
    assert torch.allclose(ratio, torch.exp(torch.tensor([[10.0, -10.0, 0.5]])))  # log-ratio clamped to +-10


@pytest.mark.parametrize("extra", [["--image-estimator", "commit-remask", "--loss-agg", "dapo"],
                                   ["--image-estimator", "masked", "--loss-agg", "dr_grpo", "--maskgit-sampler", "showo"],
                                   ["--image-estimator", "all", "--loss-agg", "sum"],
                                   ["--loss-agg", "bnpo", "--adv", "std"]])
def test_every_estimator_and_aggregation_trains_with_ratio_one_first(base, extra):
    args, tok, policy, batch, _ = rl_batch(base, "--tasks", "both", "--rl-cfg", "1.5", *extra)
    opt, sched = rl_optimizer(policy, args)
    before = [p.detach().clone() for p in policy.parameters()]
    A = T.advantages(batch, args, 0)
    stats = T.rl_update(policy, policy, None, tok, batch, A, opt, sched, args)
    assert stats["image_ratio_dev_first"] < 1e-5 and stats["text_ratio_dev_first"] < 1e-5
    assert math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def rl_optimizer(policy, args):
    return M.configure_optimizer(policy, args.rl_lr, T.RL_WARMUP, args.rl_iters * args.mu)


def params(path):
    model, meta, _ = ckpt.load_checkpoint(str(path))
    return meta["step"], model.state_dict()


def test_resume_equals_uninterrupted_run(base, tmp_path):
    common = ["--ckpt", str(base / "pretrain"), "--rl-iters", "4", "--ckpt-every", "2"]
    T.rl(tiny_args(base, *RL, *common, "--out-dir", str(tmp_path / "a")))
    T.rl(tiny_args(base, *RL, *common, "--out-dir", str(tmp_path / "b"), "--stop-after", "3"))
    assert params(tmp_path / "b" / "rl")[0] == 3
    (tmp_path / "b" / "rl" / "latest").write_text("step_000002")  # killed after step 3's log, before its save
    T.rl(tiny_args(base, *RL, *common, "--out-dir", str(tmp_path / "b"), "--resume"))
    (sa, a), (sb, b) = params(tmp_path / "a" / "rl"), params(tmp_path / "b" / "rl")
    assert sa == sb == 4
    for k in a:
        assert torch.equal(a[k], b[k]), k
    logged = [json.loads(line)["step"] for line in open(tmp_path / "b" / "rl" / "metrics.jsonl")]
    assert logged == [1, 2, 3, 4]  # the redone step 3 is logged once


DDP_SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import ckpt, flags, train as T
args = flags.get_args({argv!r})
rank, world, device = ckpt.setup_dist()
policy = T.rl(args, rank, world, device)
torch.save(policy.state_dict(), {out!r} + f"/rank{{rank}}.pt")
dist.destroy_process_group()
"""


def test_ddp_two_cpu_ranks_stay_identical(base, tmp_path):
    if base.name.startswith("ar"):
        pytest.skip("one image mode is enough for the DDP check")
    argv = TINY + RL + ["--data-dir", str(base / "world"), "--out-dir", str(tmp_path), "--ckpt", str(base / "pretrain"),
                        "--rl-iters", "3"]
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(root=ROOT, argv=argv, out=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with socket.socket() as sock:  # a free port: a fixed one fails the test whenever anything else holds it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                    str(script)], check=True, env=env, cwd=ROOT, timeout=300)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    base_sd = ckpt.load_checkpoint(str(base / "pretrain"))[0].state_dict()
    assert any(not torch.equal(r0[k], base_sd[k]) for k in r0)  # training moved the weights
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k


def test_reward_rises_on_a_trivial_task(base, monkeypatch):
    """Learning signal: text-only RL where the reward is "the answer starts with yes"; a fixed seed, and
    the mean reward of the last steps must clearly beat that of the first ones."""
    if base.name.startswith("ar"):
        pytest.skip("text-only: the image mode does not matter")
    import json
    import rewards
    monkeypatch.setitem(rewards.TEXT, "text_exact", lambda rolls, ctx: [float((r.text or "").split()[:1] == ["yes"]) for r in rolls])
    T.rl(tiny_args(base, *RL, "--rewards", "text_exact=1", "--ckpt", str(base / "pretrain"), "--tasks", "und",
                   "--rl-iters", "20", "--rl-lr", "1e-2", "--beta", "0", "--rollouts", "16", "--seed", "3"))
    rows = [json.loads(line) for line in open(base / "rl" / "metrics.jsonl")]
    first, last = [r["reward"] for r in rows[:5]], [r["reward"] for r in rows[-5:]]
    assert sum(last) / 5 > sum(first) / 5 + 0.2, (first, last)


def test_rollout_plan_mode_u_draws_after_every_understanding_question():
    """Mode u answers recognition, VQA and text-only questions, then draws the concept from the answer;
    mode r draws the knowledge request itself; und draws nothing, gen answers nothing."""
    world = data.make_world(3, 4, 1)
    wide = data.make_world(3, 4, 3)
    held = wide.held_out().sample_tasks(flags.MIXES["both"], 8, random.Random(0))  # the held-out reward's prompts
    assert {tuple(t.concept.sprite) for t in held} <= {tuple(c.sprite) for c in wide.test}  # held-out concepts, fresh ids
    tasks = data.make_tasks(world, flags.MIXES["both"], 10, seed=0, balanced=True)
    assert sorted({t.kind for t in tasks}) == sorted(flags.MIXES["both"])
    for t in tasks:
        text, gen = T.rollout_plan(t, "both", data.draw_after_answer)
        assert text is t
        if t.kind == "kgen":
            assert gen is t
        else:
            assert gen.kind == "gen" and gen.concept == t.concept and gen.answer == t.answer and gen.target is not None
        assert T.rollout_plan(t, "und", None) == (t, None) and T.rollout_plan(t, "gen", None) == (None, t)


def test_update_scores_the_steps_with_the_most_surprisal():
    # step 0 commits near-certain tokens (no gradient), steps 1 and 3 the uncertain ones
    img = dict(step_of=torch.tensor([[0, 0, 1, 2, 3, 3], [0, 1, 1, 2, 2, 3]]),
               logprobs=torch.tensor([[-0.01, -0.01, -2.0, -0.1, -1.0, -0.5], [-0.01, -0.5, -0.5, -0.2, -0.2, -3.0]]))
    assert T.surprising_steps(img, 4, 2) == [1, 3]   # surprisal per step: 0.03, 3.0, 0.5, 4.5
    assert T.surprising_steps(img, 4, 3) == [1, 2, 3]
    assert T.surprising_steps(img, 4, 0) == [0, 1, 2, 3]
    assert T.surprising_steps(None, 4, 2) == [0, 1, 2, 3]  # AR images have no steps


@pytest.mark.parametrize("credit", ["joint", "split", "causal", "null"])
def test_ratio_is_one_at_first_inner_update_for_every_advantage_mode(base, credit):
    mode = ["--null-adv"] if credit == "null" else ["--credit", credit]
    args, tok, policy, batch, _ = rl_batch(base, *mode, "--beta", "0")
    opt, sched = rl_optimizer(policy, args)
    A = T.advantages(batch, args, 0)
    stats = T.rl_update(policy, policy, None, tok, batch, A, opt, sched, args)
    assert stats["text_ratio_dev_first"] < 1e-5 and stats["image_ratio_dev_first"] < 1e-5


def test_ptx_adds_its_weighted_pretraining_loss_and_keeps_ratio_one(base):
    """--ptx w: the update's loss is the RL loss + w x the pretraining loss of the replay batch, and the
    replay term leaves pi_old alone (ratio 1 at the first inner update)."""
    args, tok, policy, batch, _ = rl_batch(base, "--beta", "0", "--mu", "1", "--ptx", "0.5")
    world, _ = pretrain.world_and_tokenizer(args)
    ptx = pretrain.pretrain_batch(world, tok, random.Random(0), 4, args, "cpu")
    twin = copy.deepcopy(policy)
    expected = M.supervised_loss(policy, policy, tok, ptx)[0].item()
    A = T.advantages(batch, args, 0)
    with_ptx = T.rl_update(policy, policy, None, tok, batch, A, *rl_optimizer(policy, args), args, ptx)
    without = T.rl_update(twin, twin, None, tok, batch, A, *rl_optimizer(twin, args), args)
    assert with_ptx["ptx_loss"] == pytest.approx(expected, rel=1e-5)
    assert with_ptx["loss"] - without["loss"] == pytest.approx(0.5 * expected, rel=1e-4)
    assert with_ptx["text_ratio_dev_first"] < 1e-5 and with_ptx["image_ratio_dev_first"] < 1e-5
    assert "ptx_loss" not in without
    # the replay term is differentiated, not only added to the logged loss: the two updates differ
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), twin.parameters()))


def test_advantage_credit_modes_by_hand():
    # one group of G = 2: the text reward favours rollout 0, the image reward rollout 1 (twice as much)
    batch = T.Rollouts(r_text=torch.tensor([[1.0, 0.0]]), r_img=torch.tensor([[0.0, 2.0]]))
    sign = lambda credit: {k: torch.sign(v).flatten().tolist() for k, v in
                           T.advantages(batch, flags.get_args(["--credit", credit, "--adv", "nostd"]), 0).items()}
    assert sign("joint") == {"text": [-1, 1], "image": [-1, 1]}   # both by the total 1 vs 2
    assert sign("split") == {"text": [1, -1], "image": [-1, 1]}   # each by its own modality
    assert sign("causal") == {"text": [-1, 1], "image": [-1, 1]}  # text by the total, image by the image reward
    A = T.advantages(batch, flags.get_args(["--credit", "causal", "--adv", "nostd"]), 0)
    assert A["image"].tolist() == [[-1.0, 1.0]] and A["text"].tolist() == [[-0.5, 0.5]]


def test_bf16_first_ratio_is_one_with_the_scorers_old_logprobs(base):
    """Under bf16 the KV-cache decode and the scorer's full forward round differently; under --bf16 pi_old
    comes from the scorer's own no-grad pass, so the first ratio is exactly 1."""
    args, tok, policy, batch, _ = rl_batch(base, "--tasks", "both", "--rl-cfg", "1.5", "--bf16", "--mu", "1", "--beta", "0")
    opt, sched = rl_optimizer(policy, args)
    with ckpt.amp(True, "cpu"):
        A = T.advantages(batch, args, 0)
        stats = T.rl_update(policy, policy, None, tok, batch, A, opt, sched, args)
    assert max(stats["text_ratio_dev_first"], stats["image_ratio_dev_first"]) < 1e-6


def test_cycle_reward_runs_without_autograd():
    world, tok = data.make_world(0, 8, 2), tokenizer.WordTokenizer(10)
    model = pretrain.new_model(flags.get_args(TINY[:8]), tok)
    seen = []
    model.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    ps = T.recognizer(model, tok)(world.concepts[:2], [torch.zeros(codebook.N_IMG, dtype=torch.long)] * 2)
    assert seen == [False] and len(ps) == 2 and all(0 <= p <= 1 for p in ps)


def test_committed_base_fits_the_default_world_and_flags():
    """The main job starts from base/: it must load and fit the default world's vocabulary and shape flags."""
    model, meta, _ = ckpt.load_checkpoint(ckpt.COMMITTED_BASE)
    args = flags.get_args([])
    tok = tokenizer.WordTokenizer(args.n_train_concepts + args.n_test_concepts)
    assert model.cfg.vocab_size == tok.vocab_size and model.cfg.image_offset == tok.image_offset
    assert (model.cfg.n_layer, model.cfg.n_embd, model.cfg.n_head) == (args.n_layer, args.n_embd, args.n_embd // 32)
    assert meta["step"] == args.iters and not model.cfg.image_causal
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())


def test_gdpo_normalizes_each_reward_before_the_sum():
    """Two components of one group, one 10x wider than the other: summed raw, the wide one decides the order;
    normalized per component first (--adv gdpo), both count."""
    wide, narrow = torch.tensor([0.0, 10.0, 0.0, 10.0]), torch.tensor([1.0, 0.0, 0.0, 0.0])
    A = T.gdpo_advantages(torch.stack([wide, narrow])[:, None], torch.tensor([0.5, 0.5]))[0]
    z = lambda r: (r - r.mean()) / (r.std(correction=0) + 1e-4)
    want = 0.5 * z(wide) + 0.5 * z(narrow)  # [0.366, 0.211, -0.789, 0.211]
    assert torch.allclose(A, want / (want.std(correction=0) + 1e-4), atol=1e-5)
    assert A[0] > A[1] == A[3] > A[2]
    raw = T.group_advantages((0.5 * wide + 0.5 * narrow)[None], "batchstd")[0]
    assert raw[0] < raw[1]  # the raw sum ranks rollout 0 below 1: the narrow component is drowned
    batch = T.Rollouts(r_text=torch.zeros(1, 4), r_img=(0.5 * wide + 0.5 * narrow)[None],
                       comps={"identity": wide, "alignment": narrow})
    args = flags.get_args(["--adv", "gdpo", "--rewards", "identity=0.5,alignment=0.5"])
    adv = T.advantages(batch, args, 0)
    assert torch.allclose(adv["image"][0], A, atol=1e-6) and torch.allclose(adv["text"][0], A, atol=1e-6)  # causal credit
