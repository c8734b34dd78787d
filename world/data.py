"""A personalized benchmark in miniature: a procedural, CPU-sized UnifyBench.

Each personal concept is a 2x2 sprite of coloured shapes on an 8x8 grid of
cells, with a class word, a hat colour, an object it always carries and a
favourite corner.  This file makes a seeded world of such concepts, renders
scenes (codebook.py renders them to 64x64 PNGs), builds the five task kinds
and holds the exact checkers used for evaluation and as RL rewards
(worldio.py writes the world in UnifyBench's folder layout and reads it back;
tokenizer.py turns tasks into token ids).  Everything is deterministic given a
seed.

Geometry (rows and columns 0..7; a sprite is placed by its top-left cell):
  region = quadrant of the sprite's top-left cell (top = rows 0-3, left = cols 0-3)
  hat    = triangle in the cell directly above the sprite's top-left cell
  carry  = object in the cell directly right of the sprite's bottom-right cell
  beside = object in the cell directly left of the sprite's bottom-left cell
Sprites go at top-left rows {1,2} (top) or {5,6} (bottom) and columns {1,2}
(left) or {4,5} (right), so each lies in one quadrant and its hat, carried and
beside objects fit in the grid.  Favourite corners are the extreme positions:
top left (1,1), top right (1,5), bottom left (6,1), bottom right (6,5).
"""
import random
from dataclasses import dataclass, field, replace

import torch

import eval as E
from world.codebook import CODEBOOK, COLOURS, GRID, N_IMG, SHAPES, WorldCodec, as_list, code_name, code_of, object_text

REGIONS = ["top left", "top right", "bottom left", "bottom right"]
CLASSES = ["robot", "ghost", "bird", "plant", "cat", "dog", "fish", "frog", "owl", "fox", "bear", "mouse",
           "snail", "crab", "bee", "duck", "lion", "tiger", "wolf", "horse", "sheep", "goat", "pig", "cow",
           "deer", "seal", "whale", "shark", "snake", "bat"]
KINDS = ["recognition", "vqa", "textqa", "gen", "kgen"]
UNDERSTAND = ("recognition", "vqa", "textqa")  # the kinds answered in text; gen and kgen are drawn
FACT_KINDS = ["hat", "carry", "corner"]  # order of Concept.facts and of the kgen requests

ROWS = {"top": (1, 2), "bottom": (5, 6)}
COLS = {"left": (1, 2), "right": (4, 5)}
CORNER_POS = {"top left": (1, 1), "top right": (1, 5), "bottom left": (6, 1), "bottom right": (6, 5)}
# Where a drawing goes: one placement per region (its corner position), and the top left when the request
# names no place. Scenes to understand place the sprite anywhere in a region, but a drawing request must
# fix every cell: with 4 valid placements MaskGIT samples cells of different placements in parallel and
# scatters the sprite (no base ever drew it whole).
DRAW_POS, UNPLACED = CORNER_POS, "top left"
SPRITE_OFFSETS = [(0, 0), (0, 1), (1, 0), (1, 1)]
HAT_OFFSET, CARRY_OFFSET, BESIDE_OFFSET = (-1, 0), (1, 2), (1, -1)

# Every text of the world comes from these templates; the tokenizer's closed
# vocabulary is collected from them and the loader parses questions with them.
DESCRIPTION = ("{tok} is a {colour} {cls} . its top left is {0} , its top right is {1} , "
               "its bottom left is {2} , its bottom right is {3} .")
FACTS = {"hat": "{tok} has a {colour} hat", "carry": "{tok} carries {obj}",
         "corner": "{tok} likes the {region} corner"}
TEXTQA = {"hat": "what colour is the hat of {tok} ?", "carry": "what does {tok} carry ?",
          "corner": "which corner does {tok} like ?"}
RECOGNITION = "is {tok} in the image ?"
IMAGE_QA = {"recognition": RECOGNITION, "where": "where is {tok} ?",
            "beside": "what is beside {tok} ?", "hat": "is {tok} wearing its hat ?"}
GEN, GEN_REASON = "draw {tok} in the {region}", "{tok} goes in the {region}"
KGEN = {"hat": "draw {tok} wearing its hat", "carry": "draw {tok} with what it carries",
        "corner": "draw {tok} in its favourite corner"}


# ---------------------------------------------------------------- concepts and world

# Share of concepts whose user context also states a friend's facts. With a friend in every context a
# 2000-step base could not yet tell the two identifiers' facts apart (text-only QA 0.32, chance 0.28).
FRIEND_SHARE = 0.5


@dataclass
class Friend:
    """Another identifier the user context states facts about. Its facts sit among the concept's own, in
    a shuffled order, so that answering or drawing from the context means reading the facts of the right
    identifier: with one fact of each kind in the context, every text task was a copy at the ceiling."""
    token: str
    hat: str
    carry: tuple[str, str]
    corner: str


def _facts(token, hat, carry, corner):
    return [FACTS[f].format(tok=token, colour=hat, obj=object_text(code_of(*carry)), region=corner)
            for f in FACT_KINDS]


@dataclass
class Concept:
    token: str  # e.g. "<c7>"
    cls: str
    sprite: list[int]  # 4 non-background codes, row-major 2x2: the concept's identity
    hat: str  # colour
    carry: tuple[str, str]  # (colour, shape)
    corner: str  # favourite region
    friend: Friend | None = None  # facts about another identifier in the same context

    @property
    def name(self):
        return self.token.strip("<>")

    @property
    def description(self):
        parts = [object_text(code) for code in self.sprite]
        return DESCRIPTION.format(*parts, tok=self.token, cls=self.cls, colour=code_name(self.sprite[0])[0])

    @property
    def facts(self):
        """The concept's own facts, in FACT_KINDS order (UnifyBench's extra_info)."""
        return _facts(self.token, self.hat, self.carry, self.corner)

    @property
    def context(self):
        facts = self.facts
        if self.friend:
            f = self.friend
            facts = facts + _facts(f.token, f.hat, f.carry, f.corner)
            random.Random(f"{self.token}/{f.token}").shuffle(facts)
        return self.description + " " + " . ".join(facts) + " ."


def fact_answer(concept, fact):
    """The textqa answer about one fact."""
    if fact == "carry":
        return object_text(code_of(*concept.carry))
    return concept.hat if fact == "hat" else concept.corner


@dataclass
class World:
    """The embedded world. Also the world interface of the RL loop (rollouts.World), which a real
    UnifyBench folder (unifybench.Bench) implements too."""
    train: list[Concept]
    test: list[Concept]  # held out: never seen in training
    seed: int
    test_tasks: list["Task"] = field(default_factory=list, compare=False, repr=False)  # read from the folder (worldio)
    codec = WorldCodec()  # not a field: one exact codec for every world

    @property
    def concepts(self):
        return self.train + self.test

    def sample_tasks(self, kinds, n, rng):
        """n RL prompts about training concepts under fresh identifiers, balanced: every step asks the
        same mix of kinds and variants, so the step's mean reward moves with the policy, not with how
        many hard prompts the draw happened to pick (4 random prompts of vqa/kgen/gen gave a step-to-step
        std of 0.08, larger than any gain)."""
        concepts = anonymize(self.train, len(self.concepts), rng)
        return make_tasks(concepts, kinds, n, seed=rng.randrange(2**31), balanced=True)

    def draw_after_answer(self, task):
        return draw_after_answer(task)

    def reward_ctx(self):
        """Nothing: the exact rewards read everything they need from the task."""
        return {}

    def preview_score(self, gens, codes):
        """The cheap DGS scorer on a preview: 0.65 identity + 0.35 alignment, the released CLIP mix
        (0.65 image-to-reference + 0.35 image-to-prompt) with our exact analogues."""
        return [0.65 * identity_score(g.concept, c) + 0.35 * alignment_graded(g, c) for g, c in zip(gens, codes)]

    def held_out(self):
        """The RL task mix about the held-out concepts: the prompts of the held-out mean reward."""
        return World(self.test, [], self.seed)

    @torch.no_grad()
    def evaluate(self, model, tok, args):
        """Every held-out metric over test_tasks: its mean, its standard error and its per-item scores
        (for paired comparisons). Text greedy, and sampled at temperature 1 (--eval-draws samples per
        question); each drawing request drawn --eval-draws times at temperature 1. Every sample comes
        from a fixed seed, so two models are compared under the same sampling noise (argmax MaskGIT commits
        background everywhere first and draws near-empty images, so drawings are always sampled). An item is
        a question or a request: the mean over its samples, so the standard error counts prompts, not
        correlated draws."""
        model.eval()
        k, mean = args.eval_draws, E.mean
        items = {m: [] for m in E.METRICS if m != "recognition"}
        und = [t for t in self.test_tasks if t.kind in UNDERSTAND]
        gen = [t for t in self.test_tasks if t.kind in ("gen", "kgen")]
        for chunk in E.batches(und, E.EVAL_BATCH):
            texts, sampled = E.greedy_and_sampled(model, tok, chunk, args)
            for i, (t, text) in enumerate(zip(chunk, texts)):
                ok = answer_correct(t, text)
                if t.kind == "recognition":
                    items["recognition_neg" if t.answer == "no" else "recognition_pos"].append(ok)
                else:
                    items[t.kind].append(ok)
                    items[t.kind + "_sampled"].append(mean(answer_correct(t, x) for x in sampled[i * k:(i + 1) * k]))
        for chunk in E.batches(gen, max(1, E.EVAL_BATCH // k)):
            texts, sampled = E.greedy_and_sampled(model, tok, chunk, args)
            draw_prompts = [tok.generation_prompt(t.concept, t.question, tok.encode(x)) for t, x in zip(chunk, texts)]
            g = torch.Generator(model.lm_head.weight.device).manual_seed(0)
            codes = E.draw(model, tok, [p for p in draw_prompts for _ in range(k)], args, g)
            for i, (t, text) in enumerate(zip(chunk, texts)):
                drawn = codes[i * k:(i + 1) * k]
                items["identity"].append(mean(identity_score(t.concept, c) for c in drawn))
                items["alignment"].append(mean(alignment_score(t, c) for c in drawn))
                if t.kind == "kgen":
                    items["knowledge"].append(mean(knowledge_score(t, c) for c in drawn))
                    items["reasoning"].append(answer_correct(t, text))
                    items["reasoning_sampled"].append(mean(answer_correct(t, x) for x in sampled[i * k:(i + 1) * k]))
        return E.summary(items)


# One 2x2 shape pattern per class, all distinct (drawn without replacement from the 4^4 patterns), so
# two concepts of one colour never share a sprite.
_PATTERNS = random.Random("shapes").sample([(a, b, c, d) for a in SHAPES for b in SHAPES for c in SHAPES
                                            for d in SHAPES], len(CLASSES))


def class_shapes(cls):
    """The 2x2 shape pattern every concept of a class shares."""
    return list(_PATTERNS[CLASSES.index(cls)])


def make_world(seed: int, n_train: int = 24, n_test: int = 8) -> World:
    """A concept's sprite is its class's shape pattern in its own colour, so an unseen concept can be
    drawn from its description (class and colour) by rules learned on others: copying four arbitrary
    cells from text is a skill a CPU-sized model does not pick up within minutes."""
    rng = random.Random(seed)
    looks = [(cls, colour) for cls in CLASSES for colour in COLOURS]
    if n_train + n_test > len(looks):
        raise ValueError(f"at most {len(looks)} concepts have distinct sprites, asked for {n_train + n_test}")
    n = n_train + n_test
    concepts = [_concept(f"<c{i}>", look, rng, n) for i, look in enumerate(rng.sample(looks, n))]
    return World(concepts[:n_train], concepts[n_train:], seed)


def _concept(token, look, rng, n_ids):
    """A concept of this look with random facts, and a friend (another identifier below n_ids) whose facts
    all differ from its own, so that reading the wrong one is always wrong. The friend is drawn even when
    FRIEND_SHARE leaves it out, so that every concept consumes the same random numbers."""
    friend_token = _other_id(token, n_ids, rng)
    cls, colour = look
    hat, carry, corner = rng.choice(COLOURS), (rng.choice(COLOURS), rng.choice(SHAPES)), rng.choice(REGIONS)
    friend = Friend(friend_token, rng.choice([c for c in COLOURS if c != hat]),
                    (rng.choice([c for c in COLOURS if c != carry[0]]), rng.choice(SHAPES)),
                    rng.choice([r for r in REGIONS if r != corner]))
    friend = friend if rng.random() < FRIEND_SHARE else None
    return Concept(token, cls, [code_of(colour, s) for s in class_shapes(cls)], hat, carry, corner, friend)


def _other_id(token, n_ids, rng):
    """An identifier <cK> (K < n_ids) other than token."""
    return rng.choice([f"<c{i}>" for i in range(n_ids) if f"<c{i}>" != token])


def random_concepts(n, n_ids, rng):
    """n fresh concepts (distinct looks, random facts) under identifiers drawn from <c0>..<c{n_ids-1}>:
    what the base is pretrained on, so that it belongs to no world and serves every world seed. Every
    world's concepts, held-out ones included, are new to it as concepts (a look with its own facts)."""
    looks = rng.sample([(cls, colour) for cls in CLASSES for colour in COLOURS], n)
    tokens = [f"<c{i}>" for i in rng.sample(range(n_ids), n)]
    return [_concept(t, look, rng, n_ids) for t, look in zip(tokens, looks)]


# ---------------------------------------------------------------- scenes

def region_positions(region):
    if region not in REGIONS:
        raise ValueError(f"unknown region {region!r}; expected one of {REGIONS}")
    vertical, horizontal = region.split()
    return [(r, c) for r in ROWS[vertical] for c in COLS[horizontal]]


def region_of(pos):
    return ("top" if pos[0] < GRID // 2 else "bottom") + (" left" if pos[1] < GRID // 2 else " right")


def _around(i):
    """Cell i and its 8-neighbours."""
    r, c = divmod(i, GRID)
    return {y * GRID + x for y in range(max(r - 1, 0), min(r + 2, GRID))
            for x in range(max(c - 1, 0), min(c + 2, GRID))}


def _cell(grid, pos, offset):
    r, c = pos[0] + offset[0], pos[1] + offset[1]
    return grid[r * GRID + c] if 0 <= r < GRID and 0 <= c < GRID else 0


def make_scene(concept, rng, with_hat=False, with_carry=False, region=None, distractors=3,
               beside=None, pos=None):
    """Codes[64]: the sprite at pos (default: random, inside region if given), optionally
    its hat, carried object and an object (code) beside it, plus isolated distractors."""
    r, c = pos or rng.choice(region_positions(region) if region else
                             [p for name in REGIONS for p in region_positions(name)])
    grid = [0] * N_IMG
    placed = list(zip(SPRITE_OFFSETS, concept.sprite))
    placed += [(HAT_OFFSET, code_of(concept.hat, "triangle"))] if with_hat else []
    placed += [(CARRY_OFFSET, code_of(*concept.carry))] if with_carry else []
    placed += [(BESIDE_OFFSET, beside)] if beside else []
    for (dr, dc), code in placed:
        grid[(r + dr) * GRID + c + dc] = code
    # Distractors never touch anything, so none can pass for a hat, a carried or
    # beside object or a sprite cell.
    blocked = set().union(*[_around(i) for i in range(N_IMG) if grid[i]])
    free = [i for i in range(N_IMG) if i not in blocked]
    rng.shuffle(free)
    for i in free:
        if distractors > 0 and i not in blocked:
            grid[i] = rng.randrange(1, CODEBOOK)
            blocked |= _around(i)
            distractors -= 1
    return torch.tensor(grid)


def hard_negative(concept, codes, rng):
    """The same scene with the sprite recoloured: a look-alike of the same class in another colour.
    (A single changed cell was too subtle: a CPU-sized base answered recognition with one constant.)"""
    score, (r, c) = find_sprite(concept, codes)
    if score < 1:
        raise ValueError(f"hard_negative needs {concept.token}'s sprite drawn exactly")
    grid = as_list(codes)
    colour = rng.choice([x for x in COLOURS if x != code_name(concept.sprite[0])[0]])
    for dr, dc in SPRITE_OFFSETS:
        i = (r + dr) * GRID + c + dc
        grid[i] = code_of(colour, code_name(grid[i])[1])
    return torch.tensor(grid)


# ---------------------------------------------------------------- tasks

@dataclass
class Task:
    kind: str  # "recognition" | "vqa" | "textqa" | "gen" | "kgen"
    concept: Concept
    question: str  # question, or drawing request for gen/kgen
    answer: str  # reference answer; for gen/kgen the reasoning statement
    image: torch.Tensor | None = None  # input image codes (recognition, vqa)
    target: torch.Tensor | None = None  # one valid reference drawing (gen, kgen)
    meta: dict = field(default_factory=dict)


def posed_scene(concept, rng, with_carry=False):
    """A scene of the concept and the answer to each IMAGE_QA question it supports."""
    region, hat = rng.choice(REGIONS), rng.random() < 0.5
    # With a carried object next to it, "what is beside" would be ambiguous.
    beside = None if with_carry else rng.randrange(1, CODEBOOK)
    image = make_scene(concept, rng, with_hat=hat, with_carry=with_carry, region=region,
                       beside=beside)
    qa = {"recognition": "yes", "where": region, "hat": "yes" if hat else "no"}
    return image, qa | ({"beside": object_text(beside)} if beside else {})


def _ask(concept, q):
    return IMAGE_QA[q].format(tok=concept.token)


def recognition_task(concept, pool, rng):
    """Half negatives: two thirds of those (all when pool has no concept of another colour) are the
    concept recoloured, the rest another concept of another colour."""
    image, _ = posed_scene(concept, rng, with_carry=rng.random() < 0.5)
    negative = None
    if rng.random() < 0.5:
        others = [o for o in pool if code_name(o.sprite[0])[0] != code_name(concept.sprite[0])[0]]
        negative = "other" if others and rng.random() < 1 / 3 else "hard"
        image = (posed_scene(rng.choice(others), rng)[0] if negative == "other"
                 else hard_negative(concept, image, rng))
    return Task("recognition", concept, _ask(concept, "recognition"), "no" if negative else "yes",
                image=image, meta={"negative": negative})


def vqa_task(concept, q, rng):
    image, qa = posed_scene(concept, rng)
    return Task("vqa", concept, _ask(concept, q), qa[q], image=image, meta={"q": q})


def textqa_task(concept, fact):
    return Task("textqa", concept, TEXTQA[fact].format(tok=concept.token),
                fact_answer(concept, fact), meta={"fact": fact})


def gen_task(concept, region, rng):
    return Task("gen", concept, GEN.format(tok=concept.token, region=region),
                GEN_REASON.format(tok=concept.token, region=region),
                target=make_scene(concept, rng, distractors=0, pos=DRAW_POS[region]),
                meta={"region": region, "pos": DRAW_POS[region]})


def kgen_task(concept, fact, rng):
    corner = fact == "corner"
    pos = DRAW_POS[concept.corner if corner else UNPLACED]
    target = make_scene(concept, rng, with_hat=fact == "hat", with_carry=fact == "carry", distractors=0, pos=pos)
    return Task("kgen", concept, KGEN[fact].format(tok=concept.token),
                concept.facts[FACT_KINDS.index(fact)], target=target,
                meta={"fact": fact, "pos": pos} | ({"region": concept.corner} if corner else {}))


def anonymize(concepts, n_ids, rng):
    """Copies of the concepts under fresh identifiers drawn from <c0>..<c{n_ids-1}> (their friends' too).
    An identifier is a name bound by the user context: training under shuffled names teaches the model to
    read the context instead of memorizing ids, and no identifier a held-out concept uses is left untrained."""
    tokens = [f"<c{i}>" for i in rng.sample(range(n_ids), len(concepts))]
    return [replace(c, token=t, friend=c.friend and replace(c.friend, token=_other_id(t, n_ids, rng)))
            for c, t in zip(concepts, tokens)]


VARIANTS = {"recognition": [None], "vqa": ["where", "beside", "hat"], "textqa": FACT_KINDS, "gen": REGIONS,
            "kgen": FACT_KINDS}  # what each task kind can ask


def make_tasks(world_or_concepts, kinds, n, seed, balanced=False):
    """n tasks, concept drawn uniformly for each. The kind and its variant (VARIANTS) are drawn uniformly,
    or with balanced=True cycle through every (kind, variant) in a fixed order, so that every batch of a
    multiple of that many tasks has the same composition and its mean reward does not jump with the luck
    of the draw (an RL step's training reward). A World means its train split."""
    concepts = (world_or_concepts.train if isinstance(world_or_concepts, World)
                else list(world_or_concepts))
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    if not concepts or not kinds or set(kinds) - set(KINDS):
        raise ValueError(f"make_tasks needs concepts and kinds from {KINDS}, got {kinds}")
    rng = random.Random(seed)
    slots = [(k, v) for k in kinds for v in VARIANTS[k]]
    tasks = []
    for i in range(n):
        if balanced:
            (kind, variant), concept = slots[i % len(slots)], rng.choice(concepts)
        else:
            kind, concept = rng.choice(kinds), rng.choice(concepts)
            variant = rng.choice(VARIANTS[kind]) if kind != "recognition" else None
        tasks.append(_task(kind, variant, concept, concepts, rng))
    return tasks


def _task(kind, variant, concept, pool, rng):
    if kind == "recognition":
        return recognition_task(concept, pool, rng)
    if kind == "vqa":
        return vqa_task(concept, variant, rng)
    if kind == "textqa":
        return textqa_task(concept, variant)
    return (gen_task if kind == "gen" else kgen_task)(concept, variant, rng)


# ---------------------------------------------------------------- checkers

def answer_correct(task, text):
    """1.0 if text equals the reference answer up to case and whitespace, else 0.0."""
    return float(" ".join(text.lower().split()) == " ".join(task.answer.lower().split()))


def find_sprite(concept, codes):
    """(fraction of the 4 sprite cells matching, (row, col)) at the best placement of the
    sprite's top-left cell; ties go to the first in row-major order."""
    grid, best = as_list(codes), (-1.0, (0, 0))
    for pos in [(r, c) for r in range(GRID - 1) for c in range(GRID - 1)]:
        share = _sprite_share(concept, grid, pos)
        if share > best[0]:
            best = (share, pos)
    return best


def _sprite_share(concept, grid, pos):
    return sum(_cell(grid, pos, off) == code for off, code in zip(SPRITE_OFFSETS, concept.sprite)) / 4


def identity_score(concept, codes):
    """CLIP-I analogue: the find_sprite score."""
    return find_sprite(concept, codes)[0]


def alignment_score(task, codes):
    """CLIP-T analogue for gen/kgen.  A request naming a place (gen: its region; kgen
    corner: the favourite corner's quadrant) scores 1.0 if the sprite is drawn exactly
    (all 4 cells) in that quadrant, 0.5 if drawn exactly elsewhere, else 0.0.  The kgen
    hat/carry requests name no place: 1.0 if the sprite is drawn exactly, else 0.0."""
    if task.kind not in ("gen", "kgen"):
        raise ValueError(f"alignment_score is for gen/kgen tasks, not {task.kind}")
    score, pos = find_sprite(task.concept, codes)
    if score < 1:
        return 0.0
    return 1.0 if region_of(pos) == task.meta.get("region", region_of(pos)) else 0.5


def knowledge_score(task, codes):
    """Is a kgen task's extra fact drawn?  0 unless the sprite is found (score >= 0.75).
    hat: 1 for a right-coloured triangle above the sprite's top-left cell, 0.5 for a
    triangle of another colour.  carry: 1 for the right object right of its bottom-right
    cell, 0.5 for right colour or right shape only.  corner: 1 at the exact corner
    position, 0.5 elsewhere in the corner's quadrant."""
    if task.kind != "kgen":
        raise ValueError(f"knowledge_score is for kgen tasks, not {task.kind}")
    grid = as_list(codes)
    score, pos = find_sprite(task.concept, grid)
    return _fact_credit(task, grid, pos) if score >= 0.75 else 0.0


def sprite_at(concept, codes, pos):
    """Share of the concept's 4 sprite cells drawn exactly with the top-left cell at pos."""
    return _sprite_share(concept, as_list(codes), pos)


def alignment_graded(task, codes):
    """Partial-credit alignment for RL: identity at the requested placement (task.meta["pos"]), so a
    drawing with 3 of 4 cells in place earns 0.75 where the exact alignment_score gives 0."""
    return sprite_at(task.concept, codes, task.meta["pos"])


def knowledge_graded(task, codes):
    """Partial-credit knowledge for RL: the fact's credit at the best placement (as knowledge_score,
    1 / 0.5 / 0) times the share of the sprite found there, with no all-or-nothing sprite gate."""
    if task.kind != "kgen":
        raise ValueError(f"knowledge_graded is for kgen tasks, not {task.kind}")
    score, pos = find_sprite(task.concept, codes)
    return score * _fact_credit(task, as_list(codes), pos)


def _fact_credit(task, grid, pos):
    concept, fact = task.concept, task.meta["fact"]
    if fact == "corner":
        if pos == CORNER_POS[concept.corner]:
            return 1.0
        return 0.5 if region_of(pos) == concept.corner else 0.0
    code = _cell(grid, pos, HAT_OFFSET if fact == "hat" else CARRY_OFFSET)
    want = (concept.hat, "triangle") if fact == "hat" else tuple(concept.carry)
    got = code_name(code) if code else (None, None)
    if got == want:
        return 1.0
    partial = got[1] == "triangle" if fact == "hat" else got[0] == want[0] or got[1] == want[1]
    return 0.5 if partial else 0.0


def plausibility(codes):
    """FID analogue for one image: 1.0 when it looks like the benchmark's images, i.e.
    n = 4..12 non-background cells and no 8-connected blob over 7 cells (sprite, hat,
    carried and beside object), falling linearly otherwise:
        excess = 2*max(0, 4-n) + max(0, n-12) + sum over blobs of max(0, size-7)
        plausibility = max(0, 1 - excess/8)"""
    grid = as_list(codes)
    n = sum(1 for x in grid if x)
    excess = 2 * max(0, 4 - n) + max(0, n - 12)
    seen = set()
    for start in range(N_IMG):
        if grid[start] and start not in seen:
            blob, frontier = {start}, [start]
            while frontier:
                grow = {j for j in _around(frontier.pop()) if grid[j]} - blob
                blob |= grow
                frontier += grow
            seen |= blob
            excess += max(0, len(blob) - 7)
    return max(0.0, 1.0 - excess / 8)


DRAW = "draw {tok}"  # mode u's drawing request: the place comes from the answer, not the request


def draw_after_answer(task):
    """Mode u: after answering a question about an image, draw the concept conditioned on the answer:
    in the region where it stood after a "where" question (a correct answer tells the place), else at
    the unplaced default."""
    region = region_of(find_sprite(task.concept, task.image)[1]) if task.meta.get("q") == "where" else UNPLACED
    pos = DRAW_POS[region]
    target = make_scene(task.concept, random.Random(0), distractors=0, pos=pos)
    return Task("gen", task.concept, DRAW.format(tok=task.concept.token), task.answer, target=target,
                meta={"region": region, "pos": pos})
