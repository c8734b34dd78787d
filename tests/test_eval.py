"""Held-out metrics on hand-built answers: recognition is the weighted (class-balanced) accuracy."""
import argparse

import torch

import data
import eval as E


def fake_tasks(monkeypatch):
    # the "prompt" handed to the answerer is the task itself, so a fake answerer can read its truth
    monkeypatch.setattr(data, "understanding_prompt", lambda tok, t: t)
    world = data.make_world(seed=3, n_train=4, n_test=2)
    tasks = data.make_tasks(world.test, ["recognition"], 60, seed=0)
    assert {t.answer for t in tasks} == {"yes", "no"}
    return tasks


def test_constant_answer_scores_half_on_recognition(monkeypatch):
    tasks = fake_tasks(monkeypatch)
    args = argparse.Namespace(eval_batch=16, max_text=4, eval_draws=2)
    for const in ("yes", "no"):
        monkeypatch.setattr(E, "answer", lambda model, tok, prompts, *a, **k: ([const] * len(prompts),))
        res = E.evaluate(_Dummy(), None, tasks, args)
        assert res["recognition"] == 0.5
        assert res["recognition_pos" if const == "yes" else "recognition_neg"] == 1.0


def test_perfect_answers_score_one(monkeypatch):
    tasks = fake_tasks(monkeypatch)
    monkeypatch.setattr(E, "answer", lambda model, tok, prompts, *a, **k: ([t.answer for t in prompts],))
    res = E.evaluate(_Dummy(), None, tasks, argparse.Namespace(eval_batch=16, max_text=4, eval_draws=2))
    assert res["recognition"] == res["recognition_pos"] == res["recognition_neg"] == 1.0


class _Dummy:
    lm_head = torch.nn.Linear(1, 1)

    def eval(self):
        return self
