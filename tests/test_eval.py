"""Held-out metrics on hand-built answers: recognition is the weighted (class-balanced) accuracy."""
import argparse
import math

import pytest

import torch

from world import data
import eval as E
import sampling as S


def fake_tasks():
    world = data.make_world(seed=3, n_train=4, n_test=2)
    tasks = data.make_tasks(world.test, ["recognition"], 60, seed=0)
    assert {t.answer for t in tasks} == {"yes", "no"}
    return tasks


def test_constant_answer_scores_half_on_recognition(monkeypatch):
    tasks = fake_tasks()
    args = argparse.Namespace(max_text=4, eval_draws=2)
    for const in ("yes", "no"):
        monkeypatch.setattr(S, "answer", lambda model, tok, prompts, *a, **k: ([const] * len(prompts),))
        res = data.World([], [], 0, test_tasks=tasks).evaluate(_Dummy(), _TaskTok(), args)
        assert res["recognition"] == 0.5
        assert res["recognition_pos" if const == "yes" else "recognition_neg"] == 1.0


def test_perfect_answers_score_one(monkeypatch):
    tasks = fake_tasks()
    monkeypatch.setattr(S, "answer", lambda model, tok, prompts, *a, **k: ([t.answer for t in prompts],))
    res = data.World([], [], 0, test_tasks=tasks).evaluate(_Dummy(), _TaskTok(), argparse.Namespace(max_text=4, eval_draws=2))
    assert res["recognition"] == res["recognition_pos"] == res["recognition_neg"] == 1.0


class _TaskTok:
    """The "prompt" handed to the answerer is the task itself, so a fake answerer can read its truth."""
    def understanding_prompt(self, task):
        return task


class _Dummy:
    lm_head = torch.nn.Linear(1, 1)

    def eval(self):
        return self


def test_rise_in_standard_errors_of_the_difference():
    """Mean of the last k steps - the first k, and its standard error: residual std around a line x sqrt(2/k)."""
    flat = [0.5, 0.6, 0.4] * 20  # 60 steps of noise around 0.5
    d, se = E.rise(flat)
    assert abs(d) < 0.05 and se == pytest.approx(0.0824 * math.sqrt(2 / 20), abs=2e-3)
    line = [0.01 * i for i in range(60)]  # a clean rise: the windows' means are 40 steps apart, no residual
    d, se = E.rise(line)
    assert d == pytest.approx(0.40) and se < 1e-9
    noisy = [0.01 * i + (0.02 if i % 2 else -0.02) for i in range(60)]
    d, se = E.rise(noisy)
    resid = math.sqrt(sum(0.02 ** 2 for _ in range(60)) / 58)
    assert d == pytest.approx(0.40) and se == pytest.approx(resid * math.sqrt(2 / 20), rel=0.02)
    d, se = E.rise([0.1, 0.2, 0.3, 0.5, 0.6, 0.7])  # a short run: k shrinks to half of it
    assert d == pytest.approx(0.4)
    assert math.isnan(E.rise([0.1] * 3)[0])


def test_reward_plot_draws_one_panel_per_component_and_the_null_run(tmp_path):
    rows = [dict(step=i + 1, reward=0.5 + 0.001 * i, r_identity=0.4, r_text_bleu=0.3) for i in range(30)]
    E.plot_rewards(tmp_path / "r.png", rows, [dict(r, reward=0.5) for r in rows])
    from PIL import Image
    assert Image.open(tmp_path / "r.png").size[0] >= 3 * 4 * 100  # three panels side by side
    assert "identity" in E.rise_report(rows) and "text_bleu" in E.rise_report(rows)


def test_paired_gain_and_its_standard_error():
    before = {"vqa": 0.5, "items": {"vqa": [0.0, 1.0, 0.0, 1.0]}}
    after = {"vqa": 0.75, "items": {"vqa": [1.0, 1.0, 0.0, 1.0]}}
    gain, se = E.paired_gain(before, after, "vqa")
    assert gain == pytest.approx(0.25) and se == pytest.approx(0.25)  # differences 1, 0, 0, 0
