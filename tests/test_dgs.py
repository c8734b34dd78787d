"""Group advantages (exact values, exact zeros, compiled == eager), the null run's shuffle, and the DGS
sampler/controller."""
import math

import pytest
import torch

import dgs
import flags
import train as T

MODES = ("std", "nostd", "batchstd")


def test_advantages_by_hand():
    R = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    # row 0: mean 2, deviations -1 0 1, population std sqrt(2/3); row 1 is all equal
    dev = torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    group_std = math.sqrt(2.0 / 3.0)
    # whole batch: mean 7.5/6 = 1.25, squared deviations sum to 5.375, population std sqrt(5.375/6)
    batch_std = math.sqrt(5.375 / 6.0)
    want = {
        "std": torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]) / torch.tensor([[group_std + 1e-4], [1e-4]]),
        "nostd": dev,
        "batchstd": dev / (batch_std + 1e-4),
    }
    for mode in MODES:
        A = T.group_advantages(R, mode)
        torch.testing.assert_close(A, want[mode], rtol=1e-6, atol=1e-7)
        assert torch.equal(A[1], torch.zeros(3)), mode


def test_all_equal_groups_give_exact_zeros():
    # seven float32 0.1s: a naive sum/G mean is off by ~7e-9, which would leak a nonzero advantage
    R = torch.cat([torch.full((1, 7), 0.1), torch.full((1, 7), 0.3), torch.rand(1, 7)])
    for mode in MODES:
        A = T.group_advantages(R, mode)
        assert torch.equal(A[:2], torch.zeros(2, 7)), mode
        assert A[2].abs().sum() > 0
    for mode in MODES:  # whole batch equal, and single-rollout groups: 0, never NaN
        for R in (torch.full((3, 4), 0.7), torch.rand(5, 1)):
            A = T.group_advantages(R, mode)
            assert torch.equal(A, torch.zeros_like(R)), mode


def test_compiled_matches_eager():
    torch._dynamo.reset()
    fn = torch.compile(T.group_advantages.eager, dynamic=False)
    g = torch.Generator().manual_seed(0)
    R = torch.rand(6, 8, generator=g)
    R[2] = 0.1
    for mode in MODES:
        eager, comp = T.group_advantages.eager(R, mode), fn(R, mode)
        torch.testing.assert_close(comp, eager, rtol=0, atol=1e-6)
        assert torch.equal(comp[2], torch.zeros(8)), mode


def test_zero_variance_groups():
    R = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.2, 0.2, 0.2000001], [0.0, 0.0, 0.0]])
    assert dgs.zero_variance_groups(R).tolist() == [True, False, False, True]
    assert dgs.zero_variance_groups(torch.rand(3, 1)).all()


def test_update_tau_formula_clip_and_bounds():
    s = dgs.DGSState(tau=0.75)
    assert dgs.update_tau(s, 0.3) == pytest.approx(0.75 ** (1 + 0.12 * (0.25 - 0.3)), abs=1e-15)
    s = dgs.DGSState(tau=0.5)
    assert dgs.update_tau(s, 1.0) == pytest.approx(0.505, abs=1e-15)  # too many pass: up, clipped
    s = dgs.DGSState(tau=0.5)
    assert dgs.update_tau(s, 0.0) == pytest.approx(0.495, abs=1e-15)  # too few pass: down, clipped
    s = dgs.DGSState(tau=0.001)
    assert dgs.update_tau(s, 0.0) == 1e-3
    s = dgs.DGSState(tau=0.999)
    assert dgs.update_tau(s, 1.0) == 1.0 - 1e-3


def _uniform_stream(gen):
    """Callbacks whose partials are their own preview scores, drawn from Uniform(0, 1)."""
    start = lambda n: torch.rand(n, generator=gen).tolist()
    score = lambda parts: torch.tensor(parts)
    finish = lambda parts: [("done", p) for p in parts]
    return start, score, finish


def test_controller_reaches_target_rate():
    gen = torch.Generator().manual_seed(0)
    start, score, finish = _uniform_stream(gen)
    s = dgs.DGSState()
    G, groups, taus, rates = 8, 8, [s.tau], []
    for _ in range(300):
        att = above = 0
        for _ in range(groups):
            out, st = dgs_group_checked(start, score, finish, G, 16 * G, s)
            att, above = att + st["attempts"], above + st["above"]
        rates.append((above, att))
        taus.append(dgs.update_tau(s, above / att))
    steps = [b - a for a, b in zip(taus, taus[1:])]
    assert max(abs(d) for d in steps) <= s.max_step + 1e-12
    assert all(abs(d - s.max_step) < 1e-12 for d in steps[:10])  # far from target: clipped, upward
    tail = rates[-50:]
    rolling = sum(a for a, _ in tail) / sum(n for _, n in tail)
    assert abs(rolling - s.target) < 0.05
    assert abs(s.tau - 0.75) < 0.03  # Uniform scores: acceptance 1 - tau = 0.25 at tau = 0.75


def dgs_group_checked(start, score, finish, G, cap, state, batch=None):
    out, st = dgs.dgs_group(start, score, finish, G, cap, state, batch)
    assert len(out) == G and st["accepted"] + st["filled"] == G and st["attempts"] <= cap
    return out, st


def test_never_accepting_stream_terminates_at_cap():
    calls = []
    start = lambda n: calls.append(n) or [0.0] * n
    out, st = dgs_group_checked(start, torch.tensor, lambda p: list(p), 4, 10, dgs.DGSState(), batch=3)
    assert calls == [3, 3, 3, 1]  # the last round is cut so attempts land exactly on cap
    assert st == dict(attempts=10, above=0, accepted=0, filled=4, rho=0.0, scores=[0.0] * 4)


def test_fill_takes_best_rejected_previews():
    gen = torch.Generator().manual_seed(1)
    seen = []

    def start(n):
        seen.extend(0.4 * torch.rand(n, generator=gen))  # always below tau = 0.5
        return [float(x) for x in seen[-n:]]

    out, st = dgs_group_checked(start, torch.tensor, lambda p: list(p), 5, 20, dgs.DGSState())
    assert st["attempts"] == 20 and st["filled"] == 5
    assert out == sorted((float(x) for x in seen), reverse=True)[:5]


def test_order_counters_finish_once_and_state_dict():
    scores = iter([0.9, 0.1, 0.5, 0.7, 0.2, 0.4])  # 0.5 == tau is rejected (strictly above only)
    start = lambda n: [next(scores) for _ in range(n)]
    finished = []
    finish = lambda p: finished.append(list(p)) or [("done", x) for x in p]
    s = dgs.DGSState()
    out, st = dgs.dgs_group(start, torch.tensor, finish, 3, 6, s, batch=2)
    assert finished == [[0.9, 0.7, 0.5]]  # once; accepted in order, then the best rejected
    assert out == [("done", 0.9), ("done", 0.7), ("done", 0.5)]
    assert st.pop("scores") == pytest.approx([0.9, 0.7, 0.5])  # the finished rollouts' preview scores
    assert st == dict(attempts=6, above=2, accepted=2, filled=1, rho=2 / 6)
    # surplus: one round of 4 has 3 above tau; 2 are kept, but rho counts all 3
    scores = iter([0.6, 0.7, 0.8, 0.1])
    out, st = dgs.dgs_group(start, torch.tensor, finish, 2, 8, s, batch=4)
    assert len(finished) == 2 and finished[-1] == [0.6, 0.7]
    assert st.pop("scores") == pytest.approx([0.6, 0.7])
    assert st == dict(attempts=4, above=3, accepted=2, filled=0, rho=0.75)
    assert (s.attempts, s.accepted, s.tau) == (10, 5, 0.5)  # counters add up; tau untouched
    with pytest.raises(ValueError, match="cap"):
        dgs.dgs_group(start, torch.tensor, finish, 4, 3, s)
    dgs.update_tau(s, 0.31)
    d = s.state_dict()
    assert type(d) is dict and dgs.DGSState(**d) == s
    assert dgs.DGSState(**d).state_dict() == d


def test_learnability_on_a_hand_built_batch():
    # 4 groups of G = 3; the last group is not a knowledge request (applies False): it is left out
    v = torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    applies = torch.tensor([[True] * 3, [True] * 3, [True] * 3, [False] * 3])
    d = dgs.learnability(v, applies)
    assert d["groups"] == 3
    assert d["mean"] == pytest.approx(4.5 / 9)
    assert d["pass1"] == pytest.approx(4 / 9)  # full credit only: 0.5 is no success
    assert d["passG"] == pytest.approx(2 / 3)
    assert d["zero_var"] == pytest.approx(2 / 3)  # all-0 and all-1 groups teach nothing
    assert dgs.learnability(v, torch.zeros(4, 3, dtype=torch.bool))["groups"] == 0


def test_within_group_correlation_ignores_prompt_difficulty():
    # across prompts x and y rise together, within each prompt they are opposed: -1, not +1
    x = torch.tensor([[0.0, 1.0], [10.0, 11.0]])
    y = torch.tensor([[1.0, 0.0], [11.0, 10.0]])
    assert dgs.within_group_corr(x, y) == pytest.approx(-1.0)
    assert dgs.within_group_corr(x, x + 5) == pytest.approx(1.0)


def test_null_advantages_keep_each_groups_multiset():
    batch = T.Rollouts(r_text=torch.randn(6, 8), r_img=torch.randn(6, 8))
    A = T.advantages(batch, flags.get_args([]), 0)
    B = T.advantages(batch, flags.get_args(["--null-adv"]), 0)
    for k in A:
        assert torch.equal(A[k].sort(dim=1).values, B[k].sort(dim=1).values)
        assert not torch.equal(A[k], B[k])
    # one permutation for both segments: a rollout's text and image advantages move together
    idx = (A["text"][:, :, None] == B["text"][:, None, :]).float().argmax(1)
    assert torch.equal(A["image"].gather(1, idx), B["image"])


def test_released_tau_rule_moves_exactly_one_step_or_not_at_all():
    for rho, want in [(0.0, 0.495), (0.25, 0.5), (0.13, 0.5), (0.36, 0.5), (1.0, 0.505)]:
        s = dgs.DGSState(tau=0.5)
        assert dgs.update_tau_released(s, rho) == pytest.approx(want), rho
    s, b = dgs.DGSState(tau=0.5), dgs.DGSState(tau=0.5)
    dgs.update_tau(s, 0.2)  # the bounded rule moves inside the dead band
    assert s.tau != 0.5 and dgs.update_tau_released(b, 0.2) == 0.5
