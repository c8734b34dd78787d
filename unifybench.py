"""
A real UnifyBench folder (the personalization benchmark of UniCTokens / Sync-R1, METHOD.md section 6)
for the Show-o path: its concepts and reference images, the tasks its files hold, and `Bench`, the
world train.py samples RL tasks from when it trains a real model (data.World is the embedded one).

  concept/train/<c>/info.json            {"class", "info" (dense description), "extra_info" (list of facts)}
  concept/train/<c>/conversations.json   {"<image file>": [{"question", "answer"}, ...], ...}
  concept/train/<c>/*.png|*.jpg          reference images, any size
  concept/test/<c>/vqa.json              [{"image", "question", "answer"}, ...] + the images it names
  concept/test/<c>/text_only.json        [{"question", "answer"}, ...]
  concept/test/<c>/t2i_conditions.json   {"personalized_driven_generation": [aligned with extra_info],
                                          "generation": [...] (optional)}

The test folder is optional for training. Every image is opened when the folder is read (a broken one
fails there, named) and encoded by the model's codec (resized and centre-cropped) when a task first
uses it. RL tasks: mode u asks the conversations' questions about a reference image; mode r takes the
personalized requests of t2i_conditions.json with the aligned extra_info fact as the reasoning to state.
"""
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

import data
import rewards

IMAGE_EXT = (".png", ".jpg", ".jpeg")
DRAW = "a photo of {tok}"  # mode u's drawing request after the answer


@dataclass
class Concept:
    token: str                  # the identifier, "<bo>"
    cls: str                    # class word, "dog"
    info: str                   # dense description
    facts: list                 # extra_info
    images: list                # reference image paths
    soft: list = field(default_factory=list)  # its learned concept tokens, "<bo_0>" ... (showo.add_concepts)

    @property
    def name(self):
        return self.token.strip("<>")

    @property
    def context(self):
        """The user context every prompt starts with: identifier bound to its concept tokens, then text."""
        bind = f"{self.token} is {''.join(self.soft)}. " if self.soft else ""
        return f"{bind}{self.info} {' '.join(self.facts)}".strip()

    def plain(self, text):
        """Text for scorers that do not know the identifier (CLIP): "<bo> on a beach" -> "a dog on a beach"."""
        return text.replace(self.token, f"a {self.cls}")


_read = data._read_json  # errors name the file and the missing key


def _check_image(path):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    return path


def load_concept(folder):
    path = folder / "info.json"
    info = _read(path, ("class", "info", "extra_info"))
    if not (isinstance(info["class"], str) and isinstance(info["info"], str) and isinstance(info["extra_info"], list)
            and all(isinstance(f, str) for f in info["extra_info"])):
        raise ValueError(f"{path}: 'class' and 'info' must be strings and 'extra_info' a list of strings")
    images = [_check_image(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXT]
    if not images:
        raise ValueError(f"{folder}: no reference images ({', '.join(IMAGE_EXT)})")
    return Concept(f"<{folder.name}>", info["class"], info["info"], info["extra_info"], images)


def load_concepts(root):
    """Every concept under concept/train, in name order."""
    base = Path(root) / "concept" / "train"
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: not found; expected a UnifyBench folder (concept/train/<name>/info.json ...)")
    concepts = [load_concept(d) for d in sorted(base.iterdir()) if d.is_dir()]
    if not concepts:
        raise ValueError(f"{base}: no concept folders")
    return concepts


def _qa(concept, path, rows, kind):
    """Tasks from (image path or None, {"question", "answer"}) rows of one file."""
    tasks = []
    for image, entry in rows:
        if isinstance(entry, dict) and "question" not in entry and "query" in entry:
            entry = {**entry, "question": entry["query"]}  # the released UnifyBench names the question `query`
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("question", "answer")):
            raise ValueError(f"{path}: entry {entry!r} needs string 'question' (or 'query') and 'answer'")
        meta = {"source": path.name} | ({"image_path": str(_check_image(image))} if image else {})
        tasks.append(data.Task(kind, concept, entry["question"], entry["answer"], meta=meta))
    return tasks


def _conversations(concept, folder):
    path = folder / "conversations.json"
    rows = []
    for image, entries in _read(path).items():
        if not isinstance(entries, list):
            raise ValueError(f"{path}: {image!r} must map to a list of question/answer entries")
        rows += [(folder / image, e) for e in entries]
    return _qa(concept, path, rows, "vqa")


def _t2i(concept, path):
    """kgen tasks (request + the aligned extra_info fact to state) and gen tasks (answer: the description)."""
    cond = _read(path, ("personalized_driven_generation",))
    requests, plain = cond["personalized_driven_generation"], cond.get("generation", [])
    if not isinstance(requests, list) or not isinstance(plain, list) or not all(isinstance(r, str) for r in requests + plain):
        raise ValueError(f"{path}: 'personalized_driven_generation' and 'generation' must be lists of strings")
    if len(requests) != len(concept.facts):
        raise ValueError(f"{path}: {len(requests)} personalized requests for {len(concept.facts)} extra_info facts; "
                         "they must align index by index")
    meta = {"source": path.name}
    return ([data.Task("kgen", concept, r, f, meta=dict(meta)) for r, f in zip(requests, concept.facts)]
            + [data.Task("gen", concept, r, concept.info, meta=dict(meta)) for r in plain])


def load_tasks(root, concepts, split):
    """train: conversations (vqa) + t2i_conditions (kgen, gen) where the test folder has them;
    test: vqa.json, text_only.json (textqa), t2i_conditions.json."""
    root, tasks = Path(root), []
    for c in concepts:
        train_dir, test_dir = (root / "concept" / s / c.name for s in ("train", "test"))
        if split == "train":
            tasks += _conversations(c, train_dir)
            if (test_dir / "t2i_conditions.json").is_file():
                tasks += _t2i(c, test_dir / "t2i_conditions.json")
            continue
        if not test_dir.is_dir():
            continue
        path = test_dir / "vqa.json"
        vqa = _read(path, kind=list)
        if not all(isinstance(e, dict) and isinstance(e.get("image"), str) for e in vqa):
            raise ValueError(f"{path}: every entry needs an 'image' file name")
        tasks += _qa(c, path, [(test_dir / e["image"], e) for e in vqa], "vqa")
        path = test_dir / "text_only.json"
        tasks += _qa(c, path, [(None, e) for e in _read(path, kind=list)], "textqa")
        tasks += _t2i(c, test_dir / "t2i_conditions.json")
    return tasks


class Bench:
    """The world train.py draws RL tasks from for a real folder: its tasks (images encoded by the
    codec on first use), the drawing that follows an answer in mode u, the DGS preview score and the
    reward context. `scorers` ("clip", "dino", "judge") are set by showo.setup from local folders."""

    def __init__(self, root, codec):
        self.root, self.codec = Path(root), codec
        self.concepts = load_concepts(root)
        self.train_tasks = load_tasks(root, self.concepts, "train")
        self.test_tasks = load_tasks(root, self.concepts, "test")  # read so a malformed file fails early
        self.scorers, self._codes, self._refs = {}, {}, {}

    def image_codes(self, path):
        if path not in self._codes:
            with Image.open(path) as im:
                self._codes[path] = self.codec.encode([im.convert("RGB")])[0]
        return self._codes[path]

    def sample_tasks(self, kinds, n, rng: random.Random):
        pool = [t for t in self.train_tasks if t.kind in kinds]
        if not pool:
            raise ValueError(f"{self.root}: no training tasks of kinds {list(kinds)} (vqa from conversations.json, "
                             "kgen/gen from concept/test/<c>/t2i_conditions.json)")
        picked = [rng.choice(pool) for _ in range(n)]
        return [replace(t, image=self.image_codes(t.meta["image_path"])) if "image_path" in t.meta else t for t in picked]

    def draw_after_answer(self, task):
        """Mode u: draw the concept, conditioned on the answer just given."""
        return data.Task("gen", task.concept, DRAW.format(tok=task.concept.token), task.answer, meta={"source": "answer"})

    def references(self, concept):
        if concept.token not in self._refs:
            self._refs[concept.token] = [Image.open(p).convert("RGB") for p in concept.images]
        return self._refs[concept.token]

    def reward_ctx(self):
        """A fresh context per batch: drawings are decoded once and shared by every image reward."""
        decoded = {}

        def drawings(rollouts):
            if id(rollouts) not in decoded:
                has = [i for i, r in enumerate(rollouts) if r.codes is not None and r.gen is not None]
                pics = dict(zip(has, self.codec.decode([rollouts[i].codes for i in has]) if has else []))
                decoded[id(rollouts)] = (rollouts, [pics.get(i) for i in range(len(rollouts))])  # holds the list: ids stay unique
            return decoded[id(rollouts)][1]
        return dict(drawings=drawings, references=self.references, **self.scorers)

    def preview_score(self, gens, codes):
        return rewards.clip_preview_score(gens, codes, self.reward_ctx())
