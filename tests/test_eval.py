"""Held-out metrics on hand-built answers: recognition is the weighted (class-balanced) accuracy."""
import argparse
import math

import pytest

import torch

import data
import eval as E


def fake_tasks():
    world = data.make_world(seed=3, n_train=4, n_test=2)
    tasks = data.make_tasks(world.test, ["recognition"], 60, seed=0)
    assert {t.answer for t in tasks} == {"yes", "no"}
    return tasks


def test_constant_answer_scores_half_on_recognition(monkeypatch):
    tasks = fake_tasks()
    args = argparse.Namespace(eval_batch=16, max_text=4, eval_draws=2)
    for const in ("yes", "no"):
        monkeypatch.setattr(E, "answer", lambda model, tok, prompts, *a, **k: ([const] * len(prompts),))
        res = data.World([], [], 0, test_tasks=tasks).evaluate(_Dummy(), _TaskTok(), args)
        assert res["recognition"] == 0.5
        assert res["recognition_pos" if const == "yes" else "recognition_neg"] == 1.0


def test_perfect_answers_score_one(monkeypatch):
    tasks = fake_tasks()
    monkeypatch.setattr(E, "answer", lambda model, tok, prompts, *a, **k: ([t.answer for t in prompts],))
    res = data.World([], [], 0, test_tasks=tasks).evaluate(_Dummy(), _TaskTok(), argparse.Namespace(eval_batch=16, max_text=4, eval_draws=2))
    assert res["recognition"] == res["recognition_pos"] == res["recognition_neg"] == 1.0


class _TaskTok:
    """The "prompt" handed to the answerer is the task itself, so a fake answerer can read its truth."""
    def understanding_prompt(self, task):
        return task


class _Dummy:
    lm_head = torch.nn.Linear(1, 1)

    def eval(self):
        return self


def test_reward_rise_against_residual_noise():
    flat = [0.5, 0.6, 0.4, 0.5, 0.6, 0.4, 0.5, 0.6, 0.4, 0.5]
    r = E.reward_rise(flat)
    assert abs(r["rise"]) < 0.05 and r["residual_std"] > 0.05
    line = [0.1 * i for i in range(10)]  # a clean rise: +0.5 between the windows, no residual
    r = E.reward_rise(line)
    assert r["rise"] == pytest.approx(0.5) and r["residual_std"] < 1e-9
    noisy = [0.1 * i + (0.02 if i % 2 else -0.02) for i in range(10)]
    r = E.reward_rise(noisy)
    assert r["residual_std"] == pytest.approx(0.0211, abs=1e-3) and r["ratio"] > 20
    assert math.isnan(E.reward_rise([0.1] * 9)["rise"])  # fewer than 2 x 5 steps


def test_paired_gain_and_its_standard_error():
    before = {"vqa": 0.5, "items": {"vqa": [0.0, 1.0, 0.0, 1.0]}}
    after = {"vqa": 0.75, "items": {"vqa": [1.0, 1.0, 0.0, 1.0]}}
    gain, se = E.paired_gain(before, after, "vqa")
    assert gain == pytest.approx(0.25) and se == pytest.approx(0.25)  # differences 1, 0, 0, 0
