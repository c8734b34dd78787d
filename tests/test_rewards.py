"""Every reward exact on hand-built cases; the ensemble's weighting, skipping and failure modes."""
import math

import pytest
import torch

from world import codebook
from world import data
import rewards as R

C = data.Concept("<c0>", "robot", [codebook.code_of("red", "circle"), codebook.code_of("blue", "square"),
                                   codebook.code_of("green", "cross"), codebook.code_of("yellow", "triangle")],
                 "purple", ("orange", "circle"), "top left")


def grid(pos=(1, 1), hat=None, sprite=None):
    g = [0] * codebook.N_IMG
    for (dr, dc), code in zip(data.SPRITE_OFFSETS, sprite or C.sprite):
        g[(pos[0] + dr) * codebook.GRID + pos[1] + dc] = code
    if hat:
        g[(pos[0] - 1) * codebook.GRID + pos[1]] = codebook.code_of(hat, "triangle")
    return torch.tensor(g)


def kgen_hat():
    return data.Task("kgen", C, "draw <c0> wearing its hat", C.facts[0], meta={"fact": "hat", "pos": (1, 1)})


def test_char_bleu_hand_cases():
    assert R.char_bleu("top left", "top left") == pytest.approx(1.0)
    assert R.char_bleu("", "abc") == 0.0
    # "ab" vs "abc": p1 = 2/2, p2 = 1/1, brevity = exp(1 - 3/2)
    assert R.char_bleu("ab", "abc") == pytest.approx(math.exp(-0.5))
    assert R.char_bleu("ba", "ab") == 0.0  # no shared bigram
    # "aab" vs "ab": p1 = 2/3 (clipped 'a'), p2 = 1/2 ('aa' misses), no brevity penalty
    assert R.char_bleu("aab", "ab") == pytest.approx(math.exp(0.7 * math.log(2 / 3) + 0.3 * math.log(1 / 2)))


def test_text_rewards():
    t = data.Task("textqa", C, "what colour is the hat of <c0> ?", "purple", meta={"fact": "hat"})
    rolls = [R.Rollout(t, text="purple"), R.Rollout(t, text=" Purple  "), R.Rollout(t, text="red"),
             R.Rollout(t, text="purple", finished=False)]
    assert R.text_exact(rolls, {}) == [1.0, 1.0, 0.0, 1.0]
    assert R.format_ok(rolls, {}) == [1.0, 1.0, 1.0, 0.0]


def test_image_rewards_hand_built():
    task = kgen_hat()
    good, wrong_hat, no_hat = grid(hat="purple"), grid(hat="red"), grid()
    one_off = grid(sprite=[C.sprite[0], C.sprite[1], C.sprite[2], codebook.code_of("red", "cross")], hat="purple")
    elsewhere = grid((5, 5), hat="purple")
    rolls = [R.Rollout(task, task, "x", c) for c in (good, wrong_hat, no_hat, one_off, elsewhere)]
    assert R.identity(rolls, {}) == [1.0, 1.0, 1.0, 0.75, 1.0]
    # graded knowledge: the fact's credit (1 / 0.5 / 0) at the best placement x the share of the sprite there
    assert R.knowledge(rolls, {}) == [1.0, 0.5, 0.0, 0.75, 1.0]
    # graded alignment: the share of the sprite at the requested placement (the unplaced default, top left)
    assert R.alignment(rolls, {}) == [1.0, 1.0, 1.0, 0.75, 0.0]
    # the exact held-out checks of the same drawings
    assert [data.knowledge_score(task, c) for c in (good, wrong_hat, no_hat, one_off, elsewhere)] == [1.0, 0.5, 0.0, 1.0, 1.0]
    assert [data.alignment_score(task, c) for c in (good, one_off, elsewhere)] == [1.0, 0.0, 1.0]
    gen = data.Task("gen", C, "draw <c0> in the bottom right", "", meta={"region": "bottom right", "pos": (6, 5)})
    half = grid((6, 5), sprite=[C.sprite[0], C.sprite[1], codebook.code_of("red", "cross"), codebook.code_of("red", "cross")])
    drawn = [grid((6, 5)), half, grid((5, 5)), grid()]
    assert R.alignment([R.Rollout(gen, gen, "", c) for c in drawn], {}) == [1.0, 0.5, 0.0, 0.0]
    assert [data.alignment_score(gen, c) for c in drawn] == [1.0, 0.0, 1.0, 0.5]
    corner = data.Task("kgen", C, "draw <c0> in its favourite corner", C.facts[2], meta={"fact": "corner", "pos": (1, 1), "region": "top left"})
    two = grid(sprite=[C.sprite[0], C.sprite[1], codebook.code_of("red", "cross"), codebook.code_of("red", "cross")])
    assert R.knowledge([R.Rollout(corner, corner, "", c) for c in (grid(), grid((2, 2)), two, grid((5, 5)))], {}) == [1.0, 0.5, 0.5, 0.0]
    assert R.knowledge([R.Rollout(gen, gen, "", grid())], {}) == [0.0]  # plain requests carry no fact
    assert R.plausibility([R.Rollout(gen, gen, "", grid()), R.Rollout(gen, gen, "", torch.zeros(64, dtype=torch.long))], {}) == [1.0, 0.0]
    assert R.identity([R.Rollout(gen)], {}) == [0.0]  # no image drawn: no image reward


def test_applies_marks_where_a_reward_is_defined():
    hat, gen = kgen_hat(), data.Task("gen", C, "draw <c0> in the top left", "", meta={"region": "top left", "pos": (1, 1)})
    drawn, text_only = R.Rollout(gen, gen, "x", grid()), R.Rollout(hat, None, "x", None)
    assert [R.applies(n, drawn) for n in ("text_exact", "identity", "alignment", "knowledge")] == [True, True, True, False]
    assert R.applies("knowledge", R.Rollout(hat, hat, "x", grid()))
    assert [R.applies(n, text_only) for n in ("text_exact", "identity", "knowledge")] == [True, False, False]


def test_cycle_reward_uses_the_policy_judge():
    task = kgen_hat()
    seen = []

    def recognize(concepts, codes):
        seen.append((concepts, codes))
        return [0.9 for _ in codes]
    out = R.cycle([R.Rollout(task, task, "x", grid()), R.Rollout(task)], {"recognize": recognize})
    assert out == [pytest.approx(0.9), 0.0]
    assert len(seen[0][1]) == 1 and seen[0][0][0] is C


def test_ensemble_weights_and_split():
    task = kgen_hat()
    rolls = [R.Rollout(task, task, C.facts[0], grid(hat="purple")), R.Rollout(task, task, "no", grid(hat="red"))]
    w = {"text_exact": 0.5, "identity": 0.25, "knowledge": 1.0}
    r_text, r_img, comps = R.ensemble(rolls, w, {})
    assert set(comps) == {"text_exact", "identity", "knowledge"}  # weight 0 or absent: not computed
    assert r_text.tolist() == [0.5, 0.0]
    assert r_img.tolist() == [1.25, 0.75]


def test_nan_or_raising_reward_stops_with_its_name(monkeypatch):
    task = kgen_hat()
    rolls = [R.Rollout(task, task, "a", grid()), R.Rollout(task, task, "b", grid())]
    monkeypatch.setitem(R.IMAGE, "identity", lambda rs, ctx: [0.0, float("nan")])
    with pytest.raises(RuntimeError, match="identity.*rollout 1"):
        R.ensemble(rolls, {"identity": 1.0}, {})
    monkeypatch.setitem(R.IMAGE, "identity", lambda rs, ctx: 1 / 0)
    with pytest.raises(RuntimeError, match="identity"):
        R.ensemble(rolls, {"identity": 1.0}, {})


def test_preview_score():
    gen = data.Task("gen", C, "draw <c0> in the top left", "", meta={"region": "top left", "pos": (1, 1)})
    assert data.World([], [], 0).preview_score([gen, gen], [grid(), grid((5, 5))]) == [pytest.approx(1.0), pytest.approx(0.65)]


def test_released_char_bleu_by_hand():
    """NLTK sentence BLEU on characters, weights 0.7/0.3, method1 smoothing (eps 0.1), by hand."""
    B = R.nltk_char_bleu
    assert B("abd", "abc") == pytest.approx((2 / 3) ** 0.7 * (1 / 2) ** 0.3)  # equal lengths: BP 1
    assert B("ba", "ab") == pytest.approx(0.1 ** 0.3)                         # no bigram hit: 0.1 / 1
    assert B("aaaa", "a") == pytest.approx(math.exp(1 - 4) * 0.1 ** 0.3)      # no bigram at all, BP e^-3
    assert B("a", "A") == 0.0 and B("abc", "") == 0.0                          # raw characters; no unigram hit
    assert B("ab", "ab ") == pytest.approx((2 / 3) ** 0.7 * (1 / 2) ** 0.3)   # not stripped: the space counts
    assert B("abc", "abc") == pytest.approx(1.0)


def test_released_reasoning_rule_by_hand():
    facts = ["ab", "cd"]
    assert R.released_reasoning_score("ab", facts, 0) == pytest.approx(1.0)  # no shared characters: t is one-hot
    assert R.released_reasoning_score("ab", facts, 1) == 0.0                 # d = 2, x = 0
    # shared characters: t = (1, b) / (1 + b), d = 2 (b / (1 + b))^2, reward = 2 ((2 - d) / 2 - 0.5)
    b = R.nltk_char_bleu("ac", "ab")
    t1 = b / (1 + b)
    assert R.released_reasoning_score("ab", ["ab", "ac"], 0) == pytest.approx(2 * ((2 - 2 * t1 ** 2) / 2 - 0.5))
    assert R.released_reasoning_score("zz", facts, 0) == 0.0                 # nothing matches: t = 0, d = 1, x = 0.5


def test_released_clip_i_and_judge_shaping(monkeypatch):
    rolls = [R.Rollout(None, object(), None, torch.zeros(4)) for _ in range(3)] + [R.Rollout(None, None)]
    ctx = {"drawings": lambda rs: [1, 1, 1, None]}
    monkeypatch.setattr(R, "clip_i", lambda rs, c: [0.4, 0.6, 0.9, 0.0])  # raw cosines of three drawings
    got = R.clip_i_released(rolls, ctx)
    shaped = [0.0, 0.2, 0.8]  # < 0.5 -> 0, else 2 (cos - 0.5); then mean 0.8 over the three drawings
    assert got[:3] == pytest.approx([v - (sum(shaped) / 3 - 0.8) for v in shaped]) and got[3] == 0.0
    judged = R.judge_released(rolls, dict(ctx, judge=lambda rs, c: [0.5, 0.7, 0.9, 0.0]))
    assert judged[:3] == pytest.approx([0.6, 0.8, 1.0])
