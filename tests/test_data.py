"""Tests for data.py: codec, checkers on hand-built grids, world generation, the
UnifyBench disk layout round trip with its error messages, and the tokenizer."""
import json
import random
import shutil
from dataclasses import replace
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from world import codebook  # noqa: E402
from world import data  # noqa: E402
from world.codebook import CODEBOOK, GRID, code_of, encode_image, render  # noqa: E402
from world.data import Concept, KINDS, Task, find_sprite, identity_score  # noqa: E402
from world.tokenizer import WordTokenizer  # noqa: E402
from world import worldio  # noqa: E402

RED_CIRCLE, BLUE_SQUARE = code_of("red", "circle"), code_of("blue", "square")
GREEN_CROSS, YELLOW_TRIANGLE = code_of("green", "cross"), code_of("yellow", "triangle")
C7 = Concept("<c7>", "robot", [RED_CIRCLE, BLUE_SQUARE, GREEN_CROSS, YELLOW_TRIANGLE], "red",
             ("green", "cross"), "top left")


def grid(cells):
    """64 codes, background except {(row, col): code}."""
    codes = torch.zeros(GRID * GRID, dtype=torch.long)
    for (r, c), code in cells.items():
        codes[r * GRID + c] = code
    return codes


def sprite_at(r, c, concept=C7):
    return {(r + dr, c + dc): code for (dr, dc), code in zip(data.SPRITE_OFFSETS, concept.sprite)}


def kgen(fact, concept=C7):
    return data.kgen_task(concept, fact, random.Random(0))


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    world = data.make_world(seed=3, n_train=4, n_test=2)
    worldio.write_world(world, root)
    return world, root


@pytest.fixture
def world_copy(small_world, tmp_path):
    shutil.copytree(small_world[1], tmp_path / "w")
    return tmp_path / "w"


# ---------------------------------------------------------------- codec

def test_codec_round_trip_every_code_in_every_cell():
    rng = random.Random(0)
    grids = [[(i + shift) % CODEBOOK for i in range(64)] for shift in range(CODEBOOK)]
    grids += [[rng.randrange(CODEBOOK) for _ in range(64)] for _ in range(5)]
    for codes in grids:
        image = render(codes)
        assert image.size == (64, 64) and image.mode == "RGB"
        assert encode_image(image).tolist() == codes


def test_codec_round_trip_through_png_file(tmp_path):
    codes = [(i * 7) % CODEBOOK for i in range(64)]
    render(codes).save(tmp_path / "x.png")
    assert encode_image(tmp_path / "x.png").tolist() == codes
    assert encode_image(str(tmp_path / "x.png")).tolist() == codes


def test_wrong_size_png_names_the_file(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"bad\.png: image is 32x32, expected 64x64"):
        encode_image(tmp_path / "bad.png")


# ---------------------------------------------------------------- concepts and checkers

def test_concept_texts():
    assert C7.description == ("<c7> is a red robot . its top left is a red-circle , its top right is a "
                              "blue-square , its bottom left is a green-cross , its bottom right "
                              "is a yellow-triangle .")
    assert C7.facts == ["<c7> has a red hat", "<c7> carries a green-cross",
                        "<c7> likes the top left corner"]
    assert C7.context == C7.description + " " + " . ".join(C7.facts) + " ."


def test_friend_facts_are_shuffled_among_the_concepts_own_and_all_differ():
    friend = data.Friend("<c3>", "blue", ("red", "circle"), "bottom right")
    c = replace(C7, friend=friend)
    facts = c.context[len(c.description) + 1:-2].split(" . ")
    assert sorted(facts) == sorted(C7.facts + ["<c3> has a blue hat", "<c3> carries a red-circle",
                                               "<c3> likes the bottom right corner"])
    assert c.facts == C7.facts  # extra_info and every reference answer stay the concept's own
    concepts = data.make_world(5, 20, 4).concepts + data.random_concepts(20, 30, random.Random(1))
    assert 0 < sum(c.friend is not None for c in concepts) < len(concepts)
    for c in [c for c in concepts if c.friend]:
        f = c.friend
        assert f.token != c.token and f.hat != c.hat and f.carry[0] != c.carry[0] and f.corner != c.corner
        stated = c.context[len(c.description) + 1:-2].split(" . ")  # every fact, own and friend's, once
        assert sorted(stated) == sorted(c.facts + data._facts(f.token, f.hat, f.carry, f.corner))
    renamed = data.anonymize(data.make_world(5, 20, 4).train, 20, random.Random(0))
    assert all(c.friend is o.friend is None or (c.friend.token != c.token and c.friend.hat == o.friend.hat)
               for c, o in zip(renamed, data.make_world(5, 20, 4).train))


def test_identity_and_alignment_on_hand_built_grids():
    exact = grid(sprite_at(1, 1))
    assert find_sprite(C7, exact) == (1.0, (1, 1))
    assert identity_score(C7, exact) == 1.0
    top_left = data.gen_task(C7, "top left", random.Random(0))
    bottom_right = data.gen_task(C7, "bottom right", random.Random(0))
    assert data.alignment_score(top_left, exact) == 1.0
    assert data.alignment_score(bottom_right, exact) == 0.5
    one_wrong = grid(sprite_at(1, 1) | {(2, 2): code_of("yellow", "circle")})
    assert identity_score(C7, one_wrong) == 0.75
    assert data.alignment_score(top_left, one_wrong) == 0.0
    assert identity_score(C7, grid({})) == 0.0
    assert find_sprite(C7, grid(sprite_at(5, 4) | sprite_at(1, 1))) == (1.0, (1, 1))
    # Requests naming no place only need the sprite drawn exactly.
    assert data.alignment_score(kgen("hat"), grid(sprite_at(5, 4))) == 1.0
    assert data.alignment_score(kgen("corner"), grid(sprite_at(5, 4))) == 0.5


def test_knowledge_hat():
    task, sprite = kgen("hat"), sprite_at(2, 4)
    assert task.answer == "<c7> has a red hat"
    assert data.knowledge_score(task, grid(sprite | {(1, 4): code_of("red", "triangle")})) == 1.0
    assert data.knowledge_score(task, grid(sprite | {(1, 4): code_of("blue", "triangle")})) == 0.5
    assert data.knowledge_score(task, grid(sprite | {(1, 4): code_of("red", "square")})) == 0.0
    assert data.knowledge_score(task, grid(sprite)) == 0.0
    assert data.knowledge_score(task, grid(sprite | {(1, 5): code_of("red", "triangle")})) == 0.0
    # A slightly wrong sprite (0.75) still counts as found; two wrong cells don't.
    worse = sprite | {(1, 4): code_of("red", "triangle"), (3, 5): RED_CIRCLE}
    assert data.knowledge_score(task, grid(worse)) == 1.0
    assert data.knowledge_score(task, grid(worse | {(2, 4): BLUE_SQUARE})) == 0.0


def test_knowledge_carry():
    task, sprite = kgen("carry"), sprite_at(5, 1)  # bottom-right cell (6, 2): carry at (6, 3)
    assert data.knowledge_score(task, grid(sprite | {(6, 3): GREEN_CROSS})) == 1.0
    assert data.knowledge_score(task, grid(sprite | {(6, 3): code_of("green", "circle")})) == 0.5
    assert data.knowledge_score(task, grid(sprite | {(6, 3): code_of("blue", "cross")})) == 0.5
    assert data.knowledge_score(task, grid(sprite | {(6, 3): code_of("blue", "circle")})) == 0.0
    assert data.knowledge_score(task, grid(sprite | {(5, 3): GREEN_CROSS})) == 0.0


def test_knowledge_corner():
    task = kgen("corner")
    assert data.CORNER_POS["top left"] == (1, 1)
    assert data.knowledge_score(task, grid(sprite_at(1, 1))) == 1.0
    assert data.knowledge_score(task, grid(sprite_at(2, 2))) == 0.5
    assert data.knowledge_score(task, grid(sprite_at(5, 5))) == 0.0
    assert data.alignment_score(task, grid(sprite_at(2, 2))) == 1.0
    with pytest.raises(ValueError, match="kgen"):
        data.knowledge_score(data.gen_task(C7, "top left", random.Random(0)), grid({}))


def test_answer_correct_normalises_case_and_spaces():
    task = Task("textqa", C7, "what does <c7> carry ?", "a green cross")
    assert data.answer_correct(task, "  A   green Cross \n") == 1.0
    assert data.answer_correct(task, "a green cross .") == 0.0
    assert data.answer_correct(task, "a red cross") == 0.0


def test_plausibility():
    assert data.plausibility(data.gen_task(C7, "top left", random.Random(0)).target) == 1.0
    assert data.plausibility(grid({})) == 0.0
    blob = {(r, c): RED_CIRCLE for r in range(3) for c in range(3)}
    assert data.plausibility(grid(blob)) == 1 - 2 / 8  # one blob of 9 cells: 2 too many
    assert data.plausibility(torch.full((64,), RED_CIRCLE)) == 0.0


def test_hard_negative_recolours_the_sprite():
    colours = set()
    red_robot = Concept("<c7>", "robot", [code_of("red", s) for s in data.class_shapes("robot")], "blue",
                        ("green", "cross"), "top left")  # a world sprite: one colour
    for seed in range(20):
        rng = random.Random(seed)
        scene = data.make_scene(red_robot, rng, with_hat=True)
        negative = data.hard_negative(red_robot, scene, rng)
        changed = (negative != scene).nonzero().flatten().tolist()
        _, (r, c) = find_sprite(red_robot, scene)
        assert changed == sorted((r + dr) * GRID + c + dc for dr, dc in data.SPRITE_OFFSETS)
        new = {codebook.code_name(negative[i])[0] for i in changed}
        assert len(new) == 1 and "red" not in new  # one other colour for all four cells
        assert [codebook.code_name(negative[i])[1] for i in changed] == [codebook.code_name(scene[i])[1] for i in changed]
        colours |= new
        assert identity_score(red_robot, negative) < 1.0  # a stray distractor may match one cell
    assert len(colours) > 2
    world = data.make_world(0, n_train=6, n_test=0)
    tasks = data.make_tasks(world, ["recognition"], 200, seed=1)
    negatives = [t.meta["negative"] for t in tasks]
    assert 60 < negatives.count(None) < 140
    assert negatives.count("hard") >= negatives.count("other") > 0
    colour = lambda concept: codebook.code_name(concept.sprite[0])[0]
    for task in tasks:
        assert (task.answer == "yes") == (identity_score(task.concept, task.image) == 1.0)
        if task.meta["negative"]:  # a negative never shows a 2x2 block in the concept's colour
            cells = [codebook.code_name(x)[0] if x else None for x in task.image.tolist()]
            assert not any(all(cells[(r + dr) * GRID + c + dc] == colour(task.concept) for dr, dc in data.SPRITE_OFFSETS)
                           for r in range(GRID - 1) for c in range(GRID - 1))


def test_drawing_requests_fix_the_placement():
    rng = random.Random(0)
    for region in data.REGIONS:
        task = data.gen_task(C7, region, rng)
        assert task.meta["pos"] == data.CORNER_POS[region] and find_sprite(C7, task.target) == (1.0, data.CORNER_POS[region])
    for fact in data.FACT_KINDS:
        task = data.kgen_task(C7, fact, rng)
        want = data.CORNER_POS[C7.corner if fact == "corner" else "top left"]
        assert task.meta["pos"] == want and find_sprite(C7, task.target) == (1.0, want)
    for q, region in (("where", None), ("hat", "top left")):
        vqa = data.vqa_task(C7, q, rng)
        after = data.draw_after_answer(vqa)
        region = region or vqa.answer
        assert after.meta == {"region": region, "pos": data.CORNER_POS[region]}


def test_random_concepts_are_distinct_and_use_the_identifier_range():
    concepts = data.random_concepts(40, 50, random.Random(3))
    assert len({tuple(c.sprite) for c in concepts}) == len({c.token for c in concepts}) == 40
    assert all(0 <= int(c.name[1:]) < 50 for c in concepts)
    assert concepts == data.random_concepts(40, 50, random.Random(3))


def test_scene_layout_and_isolated_distractors():
    for seed in range(50):
        rng = random.Random(seed)
        region = data.REGIONS[seed % 4]
        beside = code_of("purple", "square")
        codes = data.make_scene(C7, rng, with_hat=True, region=region, beside=beside).tolist()
        score, (r, c) = find_sprite(C7, codes)
        assert score == 1.0 and data.region_of((r, c)) == region
        assert codes[(r - 1) * GRID + c] == code_of("red", "triangle")
        assert codes[(r + 1) * GRID + c - 1] == beside
        own = {(r + dr) * GRID + c + dc for dr, dc in data.SPRITE_OFFSETS}
        own |= {(r - 1) * GRID + c, (r + 1) * GRID + c - 1}
        distractors = [i for i in range(64) if codes[i] and i not in own]
        assert len(distractors) == 3
        for i in distractors:
            others = {j for j in range(64) if codes[j] and j != i}
            assert not (data._around(i) & others), f"distractor {i} touches something"


def test_scene_with_carried_object_has_nothing_beside():
    for seed in range(20):
        image, qa = data.posed_scene(C7, random.Random(seed), with_carry=True)
        _, (r, c) = find_sprite(C7, image)
        assert "beside" not in qa and image[(r + 1) * GRID + c + 2] == GREEN_CROSS
        assert image[(r + 1) * GRID + c - 1] == 0


# ---------------------------------------------------------------- world and tasks

def test_make_world_deterministic_unique_and_split():
    world = data.make_world(0)
    assert world == data.make_world(0)
    assert world != data.make_world(1)
    assert (len(world.train), len(world.test)) == (24, 8)
    sprites = [tuple(c.sprite) for c in world.concepts]
    assert len(set(sprites)) == len(sprites)
    assert all(len(s) == 4 and all(0 < x < CODEBOOK for x in s) for s in sprites)
    assert not {c.token for c in world.train} & {c.token for c in world.test}


def test_make_tasks_deterministic_and_consistent_with_checkers():
    world = data.make_world(0)
    tasks = data.make_tasks(world, KINDS, 300, seed=5)
    assert [(t.kind, t.question, t.answer) for t in tasks] == \
        [(t.kind, t.question, t.answer) for t in data.make_tasks(world, KINDS, 300, seed=5)]
    assert {t.kind for t in tasks} == set(KINDS)
    assert {t.concept.token for t in tasks} <= {c.token for c in world.train}
    for task in tasks:
        assert_consistent(task)
    with pytest.raises(ValueError, match="kinds"):
        data.make_tasks(world, ["painting"], 1, seed=0)


def assert_consistent(task):
    """The stored answer / target agrees with what the checkers see."""
    concept = task.concept
    if task.kind in ("recognition", "vqa"):
        assert (task.image is None, task.target is None) == (False, True)
        assert data.plausibility(task.image) == 1.0
    if task.kind == "recognition":
        assert (task.answer == "yes") == (identity_score(concept, task.image) == 1.0)
    elif task.kind == "vqa":
        score, (r, c) = find_sprite(concept, task.image)
        q = task.meta["q"]
        hat = task.image[(r - 1) * GRID + c] == code_of(concept.hat, "triangle")
        expected = {"where": lambda: data.region_of((r, c)), "hat": lambda: "yes" if hat else "no",
                    "beside": lambda: codebook.object_text(task.image[(r + 1) * GRID + c - 1])}
        assert score == 1.0 and task.answer == expected[q]()
    elif task.kind == "textqa":
        assert task.image is None and task.answer == data.fact_answer(concept, task.meta["fact"])
    else:
        assert task.image is None and data.plausibility(task.target) == 1.0
        assert identity_score(concept, task.target) == 1.0
        assert data.alignment_score(task, task.target) == 1.0
    if task.kind == "gen":
        assert task.answer == f"{concept.token} goes in the {task.meta['region']}"
    if task.kind == "kgen":
        assert data.knowledge_score(task, task.target) == 1.0
        assert task.answer == concept.facts[data.FACT_KINDS.index(task.meta["fact"])]


# ---------------------------------------------------------------- disk layout

def test_write_load_round_trip(small_world):
    world, root = small_world
    assert worldio.load_world(root) == world
    info = json.loads((root / "concept/train/c0/info.json").read_text())
    assert info["info"] == world.train[0].description
    assert info["extra_info"] == world.train[0].facts
    cond = json.loads((root / "concept/test/c0/t2i_conditions.json").read_text())
    assert len(cond["personalized_driven_generation"]) == len(info["extra_info"])
    assert json.loads((root / "world.json").read_text()) == {
        "seed": 3, "train": ["c0", "c1", "c2", "c3"], "test": ["c4", "c5"]}
    for split, concepts in (("train", world.train), ("test", world.test)):
        tasks = worldio.load_tasks(root, split)
        assert {t.kind for t in tasks} == set(KINDS)
        assert {t.concept.token for t in tasks} == {c.token for c in concepts}
        assert {t.meta["source"] for t in tasks} == {
            "conversations.json", "vqa.json", "text_only.json", "t2i_conditions.json"}
        for task in tasks:
            assert_consistent(task)
        recognition = [t.answer for t in tasks if t.kind == "recognition"]
        assert recognition.count("no") >= 3 * len(concepts)


def test_write_world_is_deterministic(small_world, tmp_path):
    world, root = small_world
    worldio.write_world(world, tmp_path)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            assert path.read_bytes() == (tmp_path / path.relative_to(root)).read_bytes(), path
    assert not list(tmp_path.rglob("*.tmp"))


def test_missing_info_json_names_the_path(world_copy):
    (world_copy / "concept/train/c1/info.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"c1[/\\]info\.json"):
        worldio.load_world(world_copy)


def test_info_json_missing_key_names_file_and_key(world_copy):
    path = world_copy / "concept/train/c2/info.json"
    info = json.loads(path.read_text())
    del info["extra_info"]
    path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"c2[/\\]info\.json: missing key 'extra_info'"):
        worldio.load_world(world_copy)


def test_malformed_or_inconsistent_info_json(world_copy):
    path = world_copy / "concept/train/c0/info.json"
    good = path.read_text()
    path.write_text(good[:-10])
    with pytest.raises(ValueError, match=r"c0[/\\]info\.json: malformed JSON"):
        worldio.load_world(world_copy)
    info = json.loads(good)
    info["hat"] = "blue" if info["hat"] != "blue" else "red"
    path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"info\.json: 'info'/'extra_info' disagree"):
        worldio.load_world(world_copy)
    info = json.loads(good)
    info["friend"] = {"token": "<c1>", "hat": "red", "carry": ["red"], "corner": "top left"}
    path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"c0[/\\]info\.json: invalid 'friend'"):
        worldio.load_world(world_copy)


def test_bad_task_files_name_the_file(world_copy):
    Image.new("RGB", (48, 64)).save(world_copy / "concept/train/c0/2.png")
    with pytest.raises(ValueError, match=r"c0[/\\]2\.png: image is 48x64, expected 64x64"):
        worldio.load_tasks(world_copy, "train")
    path = world_copy / "concept/test/c4/text_only.json"
    path.write_text(json.dumps([{"question": "how old is <c4> ?", "answer": "two"}]))
    with pytest.raises(ValueError, match=r"text_only\.json: 'how old is <c4> \?'"):
        worldio.load_tasks(world_copy, "test")
    with pytest.raises(ValueError, match="split"):
        worldio.load_tasks(world_copy, "val")


def test_ensure_world_writes_once_then_loads(tmp_path):
    world = worldio.ensure_world(tmp_path, seed=9, n_train=2, n_test=1)
    assert world == data.make_world(9, 2, 1)
    stamp = (tmp_path / "world.json").stat().st_mtime_ns
    assert worldio.ensure_world(tmp_path, seed=9) == world
    assert (tmp_path / "world.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="seed 9"):
        worldio.ensure_world(tmp_path, seed=10)


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_layout():
    tok = WordTokenizer(n_concepts=32)
    assert tok.itos[:8] == ["<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<bor>", "<eor>", "<mask>"]
    assert (tok.pad_id, tok.bos_id, tok.eor_id, tok.mask_id) == (0, 1, 6, 7)
    assert tok.itos[tok.image_offset - 32:tok.image_offset] == [f"<c{i}>" for i in range(32)]
    assert tok.n_text == tok.image_offset and tok.codebook_size == CODEBOOK
    assert tok.vocab_size == tok.image_offset + CODEBOOK
    allowed = set(tok.text_ids().tolist())
    assert tok.eor_id in allowed and tok.eos_id not in allowed and tok.image_offset not in allowed
    assert allowed == {tok.eor_id, *range(8, tok.image_offset), *range(tok.image_offset + 1, tok.vocab_size)}
    assert tok.encode("a red-circle") == [tok.stoi["a"], tok.image_offset + code_of("red", "circle")]
    ids = tok.encode("<c3> has a red hat") + [tok.eor_id, tok.image_offset + 5, tok.pad_id]
    assert tok.decode(ids) == "<c3> has a red hat purple-square"
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids)


def test_tokenizer_errors_name_the_token():
    tok = WordTokenizer(n_concepts=32)
    with pytest.raises(ValueError, match=r"unknown concept token <c99> \(this tokenizer knows "
                                         r"<c0>\.\.<c31>\)"):
        tok.encode("is <c99> in the image ?")
    with pytest.raises(ValueError, match=r"unknown word 'xyz' in: draw xyz"):
        tok.encode("draw xyz")


def test_tokenizer_round_trips_every_text(small_world):
    world, root = small_world
    full = data.make_world(0)
    tok = WordTokenizer(len(full.concepts))
    tasks = data.make_tasks(full.concepts, KINDS, 400, seed=2) + worldio.load_tasks(root, "test")
    texts = [c.context for c in full.concepts] + [s for t in tasks for s in (t.question, t.answer)]
    for text in texts:
        ids = tok.encode(text)
        # words and concepts are text ids; object words are their image codes' ids (never background)
        assert all(0 <= i < tok.n_text or tok.image_offset < i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert set(tok.encode(text)) <= set(tok.text_ids().tolist())


def test_balanced_tasks_repeat_one_composition():
    world = data.make_world(0)
    for seed in range(3):
        tasks = data.make_tasks(world, ["vqa", "kgen"], 12, seed=seed, balanced=True)
        asked = [(t.kind, t.meta.get("q") or t.meta.get("fact")) for t in tasks]
        assert asked[:6] == asked[6:] == [("vqa", "where"), ("vqa", "beside"), ("vqa", "hat"),
                                          ("kgen", "hat"), ("kgen", "carry"), ("kgen", "corner")]
        for task in tasks:
            assert_consistent(task)
