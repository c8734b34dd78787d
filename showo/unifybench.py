"""
A real UnifyBench folder (the personalization benchmark of UniCTokens / Sync-R1)
for the Show-o path: its concepts and reference images, the tasks its files hold, and `Bench`, the
world train.py samples RL tasks from when it trains a real model (data.World is the embedded one).

  concept/train/<c>/info.json            {"class", "info" (dense description), "extra_info" (list of facts)}
  concept/train/<c>/conversations.json   {"<image file>": [{"question", "answer"}, ...], ...}
  concept/train/<c>/*.png|*.jpg          reference images, any size
  concept/test/<c>/vqa.json              [{"image", "question", "answer"}, ...] + the images it names
  concept/test/<c>/text_only.json        [{"question", "answer"}, ...]
  concept/test/<c>/t2i_conditions.json   {"personalized_driven_generation": [aligned with extra_info],
                                          "generation": [...] (optional)}
  test_data/<c>.json (optional)          recognition items, as UniCTokens' gen_test_data.py writes them:
                                          [{"type": "rec", "image", "conversations": [{"value": question},
                                          {"value": "Yes." / "No."}]}, ...] (its other types repeat the files above)

The test folder is optional for training. Every image is opened when the folder is read (a broken one
fails there, named) and encoded by the model's codec (resized and centre-cropped) when a task first
uses it. RL tasks: mode u asks the conversations' questions about a reference image; mode r takes the
personalized requests of t2i_conditions.json with the aligned extra_info fact as the reasoning to state.
`evaluate` measures a model on the test split (train.py --stage eval --showo-dir ...).
"""
import copy
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

import eval as E
import rewards
import sampling as S
from world import data, worldio
from world.codebook import read_rgb

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


_read = worldio._read_json  # errors name the file and the missing key


def _check_image(path):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image not found")
    read_rgb(path)  # decoded whole: a cut file fails here, named, not in the middle of a run
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
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) and entry[k].strip() for k in ("question", "answer")):
            raise ValueError(f"{path}: entry {entry!r} needs a non-empty string 'question' (or 'query') and 'answer'")
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


def said(text):
    """The yes or no an answer starts with ("Yes." -> "yes", "no, it is not" -> "no"), else ""."""
    words = re.findall(r"[a-z]+", text.lower())
    return words[0] if words and words[0] in ("yes", "no") else ""


def _locate(root, name):
    """An image a derived test file names: as written (absolute, or relative to the folder), else its
    longest tail that exists under the folder (the released files hold the writer's absolute paths)."""
    p = Path(name)
    tries = [root / p] + [root.joinpath(*p.parts[i:]) for i in range(1, len(p.parts))]
    return next((q for q in tries if q.is_file()), root / p)


def _recognition(concept, root):
    """Recognition tasks (answer "yes" / "no") from the entries of type "rec" of test_data/<c>.json."""
    path, tasks = root / "test_data" / f"{concept.name}.json", []
    if not path.is_file():
        return tasks
    for e in _read(path, kind=list):
        if isinstance(e, dict) and e.get("type") != "rec":
            continue  # vqa / text_only entries: the same questions as concept/test/<c>/, read there
        conv = e.get("conversations") if isinstance(e, dict) else None
        ok = (isinstance(e, dict) and isinstance(e.get("image"), str) and isinstance(conv, list) and len(conv) >= 2
              and all(isinstance(x, dict) and isinstance(x.get("value"), str) for x in conv[:2]))
        if not ok or not said(conv[1]["value"]):
            raise ValueError(f"{path}: entry {e!r} needs an 'image' and 'conversations' [question, answer], "
                             "the answer starting with Yes or No")
        image = _locate(root, e["image"])
        if not image.is_file():
            raise FileNotFoundError(f"{path}: image {e['image']!r} not found, as written nor under {root}")
        tasks.append(data.Task("recognition", concept, conv[0]["value"].replace("<image>", "").strip(), said(conv[1]["value"]),
                               meta={"source": path.name, "image_path": str(_check_image(image))}))
    return tasks


def load_tasks(root, concepts, split):
    """train: conversations (vqa) + t2i_conditions (kgen, gen) where the test folder has them;
    test: test_data/<c>.json's recognition items if any, vqa.json, text_only.json (textqa), t2i_conditions.json."""
    root, tasks = Path(root), []
    for c in concepts:
        train_dir, test_dir = (root / "concept" / s / c.name for s in ("train", "test"))
        if split == "train":
            tasks += _conversations(c, train_dir)
            if (test_dir / "t2i_conditions.json").is_file():
                tasks += _t2i(c, test_dir / "t2i_conditions.json")
            continue
        tasks += _recognition(c, root)
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
            self._codes[path] = self.codec.encode([read_rgb(path)])[0]
        return self._codes[path]

    def sample_tasks(self, kinds, n, rng: random.Random):
        pool = [t for t in self.train_tasks if t.kind in kinds]
        if not pool:
            raise ValueError(f"{self.root}: no training tasks of kinds {list(kinds)} (vqa from conversations.json, "
                             "kgen/gen from concept/test/<c>/t2i_conditions.json)")
        return [self.with_image(rng.choice(pool)) for _ in range(n)]

    def with_image(self, task):
        """The task with the codes of its input image, if it has one."""
        return replace(task, image=self.image_codes(task.meta["image_path"])) if "image_path" in task.meta else task

    def draw_after_answer(self, task):
        """Mode u: draw the concept, conditioned on the answer just given."""
        return data.Task("gen", task.concept, DRAW.format(tok=task.concept.token), task.answer, meta={"source": "answer"})

    def references(self, concept):
        if concept.token not in self._refs:
            self._refs[concept.token] = [read_rgb(p) for p in concept.images]
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

    def held_out(self):
        """The folder with its test split as the RL pool: the prompts of the held-out mean reward
        (UnifyBench holds out a concept's test files, not whole concepts)."""
        out = copy.copy(self)
        out.train_tasks = self.test_tasks
        return out

    def evaluate(self, model, tok, args):
        return evaluate(model, tok, self, self.test_tasks, args)


# ----------------------------------------------------------------------------- held-out evaluation

METRICS = ["recognition", "recognition_pos", "recognition_neg", "vqa_bleu", "vqa_exact", "textqa_bleu", "textqa_exact",
           "reasoning_bleu", "reasoning_exact", "clip_i", "clip_t", "dino", "knowledge"]
TEXT_METRIC = {"vqa": "vqa", "textqa": "textqa", "kgen": "reasoning"}  # task kind -> its text metrics' prefix
# drawing metric -> (the scorer it needs, the reward that computes it); knowledge: knowledge requests only
DRAWN = {"clip_i": ("clip", rewards.clip_i), "clip_t": ("clip", rewards.clip_t), "dino": ("dino", rewards.dino),
         "knowledge": ("judge", rewards.judge)}


@torch.no_grad()
def evaluate(model, tok, bench, tasks, args):
    """UnifyBench metrics of `tasks` (load_tasks(..., "test")), as eval.summary gives them: answers and
    each request's reasoning greedy, then --eval-draws drawings per request at temperature 1 from
    fixed seeds (an item is a question or a request: the mean over its drawings). A drawing metric whose
    scorer bench.scorers lacks is left out (`skipped` says why)."""
    model.eval()
    answers = greedy(model, tok, [bench.with_image(t) for t in tasks], args)
    items = {}
    for t, text in zip(tasks, answers):
        for name, v in text_scores(t, text).items():
            items.setdefault(name, []).append(v)
    requests = [(t, x) for t, x in zip(tasks, answers) if t.kind in ("gen", "kgen")]
    for chunk in E.batches(requests, max(1, E.EVAL_BATCH // args.eval_draws)):
        for name, v in drawing_scores(model, tok, bench, chunk, args).items():
            items.setdefault(name, []).extend(v)
    return E.summary({m: items[m] for m in METRICS if m in items})


def greedy(model, tok, tasks, args):
    """Each task's greedy answer (a drawing request's: its reasoning), E.EVAL_BATCH prompts at a time."""
    return [x for chunk in E.batches(tasks, E.EVAL_BATCH)
            for x in S.answer(model, tok, [tok.understanding_prompt(t) for t in chunk], args.max_text)[0]]


def text_scores(task, text):
    """One answer's text metrics: recognition by the yes / no it starts with; VQA, text-only QA and a
    knowledge request's stated fact by char-BLEU and exact match against the reference."""
    if task.kind == "recognition":
        return {"recognition_" + ("pos" if task.answer == "yes" else "neg"): float(said(text) == task.answer)}
    if task.kind not in TEXT_METRIC:
        return {}
    roll, name = [rewards.Rollout(task, None, text)], TEXT_METRIC[task.kind]
    return {name + "_bleu": rewards.text_bleu(roll, {})[0], name + "_exact": rewards.text_exact(roll, {})[0]}


def drawing_scores(model, tok, bench, chunk, args):
    """{metric: each request's mean over its drawings} for (request, reasoning) pairs, each drawn
    --eval-draws times conditioned on its reasoning, by every scorer given."""
    k = args.eval_draws
    prompts = [tok.generation_prompt(t.concept, t.question, tok.encode(x)) for t, x in chunk]
    g = torch.Generator(model.lm_head.weight.device).manual_seed(0)
    codes = E.draw(model, tok, [p for p in prompts for _ in range(k)], args, g)
    groups = [[rewards.Rollout(t, t, x, codes[i * k + j]) for j in range(k)] for i, (t, x) in enumerate(chunk)]
    ctx, out = bench.reward_ctx(), {}
    everyone = [r for grp in groups for r in grp]
    pics = dict(zip(map(id, everyone), ctx["drawings"](everyone)))
    ctx["drawings"] = lambda rolls: [pics[id(r)] for r in rolls]  # decoded once, for every scorer
    for name, (need, fn) in DRAWN.items():
        scored = [grp for grp in groups if name != "knowledge" or grp[0].gen.kind == "kgen"]
        if need in bench.scorers and scored:
            vals = fn([r for grp in scored for r in grp], ctx)
            out[name] = [E.mean(vals[i * k:(i + 1) * k]) for i in range(len(scored))]
    return out


def skipped(bench, tasks):
    """{metric: why these flags and this folder leave it out}."""
    out = {m: f"no {rewards.SCORER_FLAGS[need]}" for m, (need, _) in DRAWN.items() if need not in bench.scorers}
    answers = {t.answer for t in tasks if t.kind == "recognition"}
    if answers != {"yes", "no"}:
        out["recognition"] = (f"only {answers.pop()!r} items; the weighted accuracy needs both" if answers
                              else "no recognition items (test_data/<concept>.json entries of type rec)")
    return out
