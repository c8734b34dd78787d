"""
The embedded world on disk, in UnifyBench's folder layout (see the README): writing a world, reading it
back (every file checked, errors naming the file and the missing key or wrong size), its held-out tasks,
and PNG grids of samples. No entry point: train.py writes the world on first use (ensure_world).
"""
import json
import os
import random
import re
from dataclasses import asdict, replace
from io import BytesIO
from pathlib import Path

import torch
from PIL import Image

from world.codebook import CODEBOOK, COLOURS, SHAPES, code_name, encode_image, render
from world.data import (Concept, FACT_KINDS, Friend, GEN, IMAGE_QA, KGEN, REGIONS, TEXTQA, Task, World, _ask, fact_answer,
                  gen_task, hard_negative, kgen_task, make_world, posed_scene)

N_REFERENCE = 6  # reference images under concept/train/<cname>/
INFO_KEYS = ("class", "info", "extra_info", "sprite", "hat", "carry", "corner")


def _write(path, obj):
    """Write a PIL image or image codes as a PNG, anything else as JSON, atomically."""
    if torch.is_tensor(obj) or isinstance(obj, Image.Image):
        buffer = BytesIO()
        (obj if isinstance(obj, Image.Image) else render(obj)).save(buffer, "PNG")
        content = buffer.getvalue()
    else:
        content = (json.dumps(obj, indent=1) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)  # readers never see half a file


def write_world(world, root):
    root = Path(root)
    for concept in world.concepts:
        # Seeded per concept so that one concept's files don't depend on the others'.
        rng = random.Random(f"{world.seed}/{concept.token}")
        others = [o for o in world.concepts if o.token != concept.token]
        _write_train_dir(root / "concept" / "train" / concept.name, concept, rng)
        _write_test_dir(root / "concept" / "test" / concept.name, concept, others, rng)
    # Written last: its presence marks a complete world (see ensure_world).
    _write(root / "world.json", {"seed": world.seed, "train": [c.name for c in world.train],
                                      "test": [c.name for c in world.test]})


def _write_train_dir(folder, concept, rng):
    _write(folder / "info.json", {
        "class": concept.cls, "info": concept.description, "extra_info": concept.facts,
        "sprite": concept.sprite, "hat": concept.hat, "carry": list(concept.carry),
        "corner": concept.corner} | ({"friend": asdict(concept.friend)} if concept.friend else {}))
    conversations = {}
    for i in range(N_REFERENCE):
        image, qa = posed_scene(concept, rng, with_carry=rng.random() < 0.5)
        _write(folder / f"{i}.png", image)
        conversations[f"{i}.png"] = [{"question": _ask(concept, q), "answer": a}
                                     for q, a in qa.items()]
    _write(folder / "conversations.json", conversations)


def _write_test_dir(folder, concept, others, rng):
    entries = []
    for i in range(6):  # 0-2: the concept, every question; 3-4: hard negatives; 5: another
        image, qa = posed_scene(concept, rng)
        if i >= 3:
            qa = {"recognition": "no"}
            other = [o for o in others if code_name(o.sprite[0])[0] != code_name(concept.sprite[0])[0]]
            image = (posed_scene(rng.choice(other), rng)[0] if i == 5 and other
                     else hard_negative(concept, image, rng))
        _write(folder / f"{i}.png", image)
        entries += [{"image": f"{i}.png", "question": _ask(concept, q), "answer": a}
                    for q, a in qa.items()]
    _write(folder / "vqa.json", entries)
    _write(folder / "text_only.json", [
        {"question": TEXTQA[f].format(tok=concept.token), "answer": fact_answer(concept, f)}
        for f in FACT_KINDS])
    _write(folder / "t2i_conditions.json", {
        "personalized_driven_generation": [KGEN[f].format(tok=concept.token) for f in FACT_KINDS],
        "generation": [GEN.format(tok=concept.token, region=r) for r in REGIONS]})


def _read_json(path, keys=(), kind=dict):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, kind):
        raise ValueError(f"{path}: expected a JSON {'object' if kind is dict else 'list'}")
    for key in keys:
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r}")
    return data


def _facts_valid(hat, carry, corner):
    colour, shape = carry
    return hat in COLOURS and colour in COLOURS and shape in SHAPES and corner in REGIONS


def _load_friend(info, path):
    """The optional "friend" entry of info.json: {"token", "hat", "carry", "corner"}."""
    if "friend" not in info:
        return None
    f = info["friend"]
    try:
        friend = Friend(f["token"], f["hat"], tuple(f["carry"]), f["corner"])
        valid = re.fullmatch(r"<c\d+>", friend.token) and _facts_valid(friend.hat, friend.carry, friend.corner)
    except (TypeError, ValueError, KeyError):
        valid = False
    if not valid:
        raise ValueError(f"{path}: invalid 'friend' (expected token <cK>, hat, carry [colour, shape], corner)")
    return friend


def _load_concept(folder):
    path = folder / "info.json"
    info = _read_json(path, INFO_KEYS)
    try:
        concept = Concept(f"<{folder.name}>", info["class"], [int(x) for x in info["sprite"]],
                          info["hat"], tuple(info["carry"]), info["corner"])
        valid = (len(concept.sprite) == 4 and all(0 < x < CODEBOOK for x in concept.sprite)
                 and _facts_valid(concept.hat, concept.carry, concept.corner) and isinstance(concept.cls, str))
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"{path}: invalid 'sprite', 'hat', 'carry', 'corner' or 'class'")
    # The texts are what prompts show, so they must agree with the ground truth.
    if info["info"] != concept.description or info["extra_info"] != concept.facts:
        raise ValueError(f"{path}: 'info'/'extra_info' disagree with sprite/hat/carry/corner")
    return replace(concept, friend=_load_friend(info, path))


def load_world(root) -> World:
    root = Path(root)
    index = _read_json(root / "world.json", ("seed", "train", "test"))
    load = lambda names: [_load_concept(root / "concept" / "train" / name) for name in names]
    return World(load(index["train"]), load(index["test"]), index["seed"])


def _parse(question, concept, path, kinds):
    """(kind, meta) of a question or request read from a file, by template matching."""
    generic = " ".join("{tok}" if w == concept.token else w for w in question.split())
    templates = ([("vqa" if q != "recognition" else q, {"q": q}, t) for q, t in IMAGE_QA.items()]
                 + [("textqa", {"fact": f}, t) for f, t in TEXTQA.items()]
                 + [("kgen", {"fact": f}, t) for f, t in KGEN.items()]
                 + [("gen", {"region": r}, GEN.replace("{region}", r)) for r in REGIONS])
    for kind, meta, template in templates:
        if generic == template and kind in kinds:
            return kind, meta
    raise ValueError(f"{path}: {question!r} is no {'/'.join(kinds)} question about {concept.token}")


def _qa_tasks(concept, path, rows):
    """Tasks from (image file or None, {"question", "answer"}) rows of one file."""
    tasks, images = [], {}
    for image, entry in rows:
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) and entry[k].strip() for k in ("question", "answer")):
            raise ValueError(f"{path}: entry {entry!r} needs a non-empty string 'question' and 'answer'")
        kinds = ("textqa",) if image is None else ("recognition", "vqa")
        kind, meta = _parse(entry["question"], concept, path, kinds)
        if image is not None and image not in images:
            images[image] = encode_image(path.parent / image)
        tasks.append(Task(kind, concept, entry["question"], entry["answer"],
                          image=images.get(image), meta=meta | {"source": path.name}))
    return tasks


def _t2i_tasks(concept, path):
    conditions = _read_json(path, ("personalized_driven_generation", "generation"))
    requests = conditions["personalized_driven_generation"]
    if len(requests) != len(concept.facts):
        raise ValueError(f"{path}: {len(requests)} personalized requests for "
                         f"{len(concept.facts)} extra_info facts; they must align")
    tasks = []
    for i, request in enumerate(requests + conditions["generation"]):
        rng = random.Random(f"{concept.token}/{i}")  # a stable reference drawing per request
        if i < len(requests):
            kind, meta = _parse(request, concept, path, ("kgen",))
            if meta["fact"] != FACT_KINDS[i]:
                raise ValueError(f"{path}: request {request!r} does not match extra_info[{i}]")
            task = kgen_task(concept, meta["fact"], rng)
            task.answer = concept.facts[i]  # the aligned extra_info fact
        else:
            task = gen_task(concept, _parse(request, concept, path, ("gen",))[1]["region"], rng)
        task.meta["source"] = path.name
        tasks.append(task)
    return tasks


def load_tasks(root, split: str) -> list[Task]:
    """Every task the files hold for the concepts of one split of world.json: image
    questions from conversations.json and vqa.json, textqa from text_only.json, gen/kgen
    from t2i_conditions.json.  meta["source"] names the file each task came from."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    root, tasks = Path(root), []
    world = load_world(root)
    for concept in world.train if split == "train" else world.test:
        train_dir, test_dir = (root / "concept" / s / concept.name for s in ("train", "test"))
        path = train_dir / "conversations.json"
        tasks += _qa_tasks(concept, path, [(str(image), entry) for image, entries in
                                           _read_json(path).items() for entry in entries])
        path = test_dir / "vqa.json"
        vqa = _read_json(path, kind=list)
        if not all(isinstance(e, dict) and isinstance(e.get("image"), str) for e in vqa):
            raise ValueError(f"{path}: every entry needs an 'image' file name")
        tasks += _qa_tasks(concept, path, [(entry["image"], entry) for entry in vqa])
        path = test_dir / "text_only.json"
        tasks += _qa_tasks(concept, path, [(None, entry) for entry in _read_json(path, kind=list)])
        tasks += _t2i_tasks(concept, test_dir / "t2i_conditions.json")
    return tasks


def ensure_world(root, seed, n_train=24, n_test=8) -> World:
    """Load the world under root with its held-out tasks, making and writing it first if there is none."""
    root = Path(root)
    if not (root / "world.json").exists():
        write_world(make_world(seed, n_train, n_test), root)
    world = load_world(root)
    if world.seed != seed:
        raise ValueError(f"{root / 'world.json'} holds the world of seed {world.seed}, "
                         f"not {seed}; use another root")
    return replace(world, test_tasks=load_tasks(root, "test"))  # metrics need the exact files



def save_grid(path, images, captions, cols=4, scale=2):
    """PNG grid of images (any width, e.g. a target beside a drawing) with their captions underneath
    (wrapped), for eyeballing samples."""
    from PIL import ImageDraw
    w, h = (max(i.width for i in images) * scale, max(i.height for i in images) * scale) if images else (1, 1)
    chars = max(26, w // 6)
    wrap = lambda s: [s[i:i + chars] for i in range(0, len(s), chars)][:6]
    cap_h = 6 * 11 + 4
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (w + 8), max(1, rows) * (h + cap_h)), "white")
    pen = ImageDraw.Draw(sheet)
    for i, (img, cap) in enumerate(zip(images, captions)):
        x, y = (i % cols) * (w + 8), (i // cols) * (h + cap_h)
        sheet.paste(img.resize((img.width * scale, img.height * scale), Image.NEAREST), (x, y))
        pen.multiline_text((x, y + h + 2), "\n".join(wrap(cap)), fill="black")
    _write(Path(path), sheet)
