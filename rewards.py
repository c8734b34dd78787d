"""
The reward ensemble of Sync-GRPO. Every reward is a plain function `r(rollouts, ctx) -> list[float]`
(one float per rollout); the ensemble is a weighted sum with weights from train.py's --w-* flags, and
every component is returned separately so it can be logged.

Text rewards score the answer / reasoning; image rewards score the drawing. The defaults follow the
released split R = 0.65 * R_img + 0.35 * R_text, R_img = 0.4 * identity + 0.6 * judge, where our
exact "judge" is alignment + knowledge + plausibility + cycle consistency. A real model's drawings
(the Show-o path) are scored instead by CLIP-I / CLIP-T / DINO from local transformers folders and a
judge callable; those are off (weight 0) on the embedded world.
"""
import math
from collections import Counter
from dataclasses import dataclass

import torch

from world import data


@dataclass
class Rollout:
    task: data.Task                 # the understanding / reasoning task; task.answer is the text reference
    gen: data.Task | None = None    # the drawing request and its ground truth (None: understanding only)
    text: str | None = None         # the sampled answer or reasoning (None: generation only)
    codes: torch.Tensor | None = None  # the drawn image codes [N_IMG]
    finished: bool = True           # the text ended with <eor> inside the length limit


# ----------------------------------------------------------------------------- text rewards

def char_bleu(candidate, reference, weights=(0.7, 0.3)):
    """Character-level BLEU with 1- and 2-grams weighted 0.7 / 0.3 (the released text score):
    brevity penalty * exp(sum_n w_n * log p_n), p_n = clipped n-gram precision; 0 if any p_n is 0."""
    c, r = candidate.strip().lower(), reference.strip().lower()
    if not c or not r:
        return 0.0
    log_p = 0.0
    for n, w in enumerate(weights, start=1):
        cand = Counter(c[i:i + n] for i in range(len(c) - n + 1))
        ref = Counter(r[i:i + n] for i in range(len(r) - n + 1))
        hits = sum(min(k, ref[g]) for g, k in cand.items())
        if hits == 0:
            return 0.0
        log_p += w * math.log(hits / sum(cand.values()))
    brevity = min(1.0, math.exp(1 - len(r) / len(c)))
    return brevity * math.exp(log_p)


def text_exact(rollouts, ctx):
    return [data.answer_correct(r.task, r.text) if r.text is not None else 0.0 for r in rollouts]


def text_bleu(rollouts, ctx):
    return [char_bleu(r.text, r.task.answer) if r.text is not None else 0.0 for r in rollouts]


def format_ok(rollouts, ctx):
    """Structure: the reasoning closed with <eor> in time, and an image was drawn when one was asked."""
    return [float(r.finished and (r.gen is None or r.codes is not None)) for r in rollouts]


# ----------------------------------------------------------------------------- image rewards

def _per_image(fn, rollouts):
    return [fn(r) if r.codes is not None and r.gen is not None else 0.0 for r in rollouts]


def identity(rollouts, ctx):
    """CLIP-I analogue: share of the concept's sprite drawn exactly at its best placement."""
    return _per_image(lambda r: data.identity_score(r.gen.concept, r.codes), rollouts)


def alignment(rollouts, ctx):
    """CLIP-T analogue, graded: share of the sprite drawn at the requested placement. (The held-out
    metric stays the exact data.alignment_score: a binary reward the base never earns gives no signal.)"""
    return _per_image(lambda r: data.alignment_graded(r.gen, r.codes), rollouts)


def knowledge(rollouts, ctx):
    """Knowledge-driven generation, graded: the fact's credit (1 / 0.5 / 0) at the best placement times
    the share of the sprite there; 0 for plain requests (held-out metric: exact data.knowledge_score)."""
    return _per_image(lambda r: data.knowledge_graded(r.gen, r.codes) if r.gen.kind == "kgen" else 0.0, rollouts)


def plausibility(rollouts, ctx):
    """No stray or broken cells."""
    return _per_image(lambda r: data.plausibility(r.codes), rollouts)


def cycle(rollouts, ctx):
    """Cycle consistency (CoRL): the policy itself is asked "is <c> in the image ?" about its own
    drawing; the reward is its probability of "yes". ctx["recognize"] runs that forward."""
    has = [i for i, r in enumerate(rollouts) if r.codes is not None and r.gen is not None]
    out = [0.0] * len(rollouts)
    if has:
        p = ctx["recognize"]([rollouts[i].gen.concept for i in has], [rollouts[i].codes for i in has])
        for i, v in zip(has, p):
            out[i] = float(v)
    return out


# ----------------------------------------------------------------------------- real-image rewards
# For a real model (the Show-o path). They read from ctx: "drawings" (rollouts -> decoded PIL drawings,
# None where nothing was drawn), "references" (concept -> its reference images) and the scorers loaded
# from local folders ("clip", "dino": Embedder) or the judge callable ("judge"). Raw cosines, as released.

class Embedder:
    """Unit-norm embeddings from a local transformers folder, never the network: kind "clip" is a
    CLIPModel (images and texts, with its tokenizer); "image" is any AutoModel image backbone (DINO),
    embedding = its pooled output (else the first token). Reference embeddings are cached per concept."""

    def __init__(self, path, kind, device="cpu"):
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel
        self.clip, self.device = kind == "clip", device
        self.model = (CLIPModel if self.clip else AutoModel).from_pretrained(path, local_files_only=True).to(device).eval()
        self.proc = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True) if self.clip else None
        self.refs = {}

    @staticmethod
    def _pooled(out):
        if torch.is_tensor(out):
            return out
        return out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state[:, 0]

    @torch.no_grad()
    def images(self, images):
        px = self.proc(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        with torch.autocast(torch.device(self.device).type, enabled=False):  # fp32 under the trainer's --bf16 too
            out = self.model.get_image_features(pixel_values=px) if self.clip else self.model(pixel_values=px)
        return torch.nn.functional.normalize(self._pooled(out).float(), dim=-1)

    @torch.no_grad()
    def texts(self, texts):
        n = self.model.config.text_config.max_position_embeddings
        t = self.tok(texts, padding=True, truncation=True, max_length=n, return_tensors="pt").to(self.device)
        with torch.autocast(torch.device(self.device).type, enabled=False):
            out = self.model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
        return torch.nn.functional.normalize(self._pooled(out).float(), dim=-1)

    def references(self, concept, ctx):
        if concept.token not in self.refs:
            self.refs[concept.token] = self.images(ctx["references"](concept))
        return self.refs[concept.token]


def _drawn(rollouts, ctx):
    """(indices of rollouts with a drawing, those drawings)."""
    pics = ctx["drawings"](rollouts)
    has = [i for i, p in enumerate(pics) if p is not None]
    return has, [pics[i] for i in has]


def _to_references(rollouts, ctx, key):
    """Mean cosine similarity of each drawing to its concept's reference images."""
    out, (has, pics) = [0.0] * len(rollouts), _drawn(rollouts, ctx)
    if has:
        emb = ctx[key]
        for i, x in zip(has, emb.images(pics)):
            out[i] = (emb.references(rollouts[i].gen.concept, ctx) @ x).mean().item()
    return out


def clip_i(rollouts, ctx):
    """CLIP-I: the drawing's CLIP image similarity to the concept's reference images."""
    return _to_references(rollouts, ctx, "clip")


def dino(rollouts, ctx):
    """DINO similarity to the reference images (identity, less fooled by style than CLIP)."""
    return _to_references(rollouts, ctx, "dino")


def clip_t(rollouts, ctx):
    """CLIP-T: the drawing's CLIP similarity to its request, the identifier read as the class word."""
    out, (has, pics) = [0.0] * len(rollouts), _drawn(rollouts, ctx)
    if has:
        g = [rollouts[i].gen for i in has]
        sim = (ctx["clip"].images(pics) * ctx["clip"].texts([x.concept.plain(x.question) for x in g])).sum(-1)
        for i, v in zip(has, sim.tolist()):
            out[i] = v
    return out


def judge(rollouts, ctx):
    """The judge hook: the callable named by --judge ("module:function"), same signature as a reward."""
    return [float(x) for x in ctx["judge"](rollouts, ctx)]


def clip_preview_score(gens, codes, ctx):
    """DGS preview score with real images, as released: 0.65 CLIP-I + 0.35 CLIP-T of the preview."""
    rolls = [Rollout(g, g, None, c) for g, c in zip(gens, codes)]
    return [0.65 * a + 0.35 * b for a, b in zip(clip_i(rolls, ctx), clip_t(rolls, ctx))]


# ----------------------------------------------------------------------------- the released shaping
# --reward-style released: the text, CLIP-I and judge scores as the released Sync-R1 code shapes them,
# restated from its formulas; the raw style above stays the default.

def nltk_char_bleu(reference, candidate, weights=(0.7, 0.3), eps=0.1):
    """The released text score: NLTK's sentence BLEU over raw characters (no lower-casing), smoothing
    method1 (a zero n-gram count becomes eps), 0 when no character matches; p_n = clipped n-gram
    hits / max(1, candidate n-grams), BP = 1 if len(cand) > len(ref) else exp(1 - len(ref)/len(cand))."""
    c, r = list(candidate), list(reference)
    logs = []
    for n, w in enumerate(weights, start=1):
        cand = Counter(tuple(c[i:i + n]) for i in range(len(c) - n + 1))
        ref = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
        hits = sum(min(k, ref[g]) for g, k in cand.items())
        if n == 1 and hits == 0:
            return 0.0
        logs.append(w * math.log((hits or eps) / max(1, sum(cand.values()))))
    brevity = 1.0 if len(c) > len(r) else math.exp(1 - len(r) / len(c))
    return brevity * math.exp(math.fsum(logs))


def released_reasoning_score(answer, facts, asked):
    """Mode r as released: char-BLEU of the reasoning against every fact, normalised to sum 1 (t),
    d = squared distance of t to the one-hot of the asked fact, x = (2 - d) / 2, reward 0 if x <= 0.5
    else 2 (x - 0.5). An exact statement scores below 1 whenever other facts share characters."""
    scores = [nltk_char_bleu(f, answer) for f in facts]
    total = sum(scores)
    t = [v / total for v in scores] if total > 0 else [0.0] * len(scores)
    d = sum((float(k == asked) - v) ** 2 for k, v in enumerate(t))
    x = (2.0 - d) / 2.0
    return 0.0 if x <= 0.5 else 2.0 * (x - 0.5)


def recentred(vals, has, mean=0.8):
    """The released per-rank shift: the scored rollouts' rewards moved so their mean is `mean`."""
    if not has:
        return vals
    shift = sum(vals[i] for i in has) / len(has) - mean
    return [v - shift if i in has else v for i, v in enumerate(vals)]


def text_bleu_released(rollouts, ctx):
    """Mode r (kgen): released_reasoning_score over the concept's facts; otherwise char-BLEU against
    the reference answer. The answer is stripped, as the released code strips its decoded text."""
    out = []
    for r in rollouts:
        if r.text is None:
            out.append(0.0)
        elif r.task.kind == "kgen":
            out.append(released_reasoning_score(r.text.strip(), r.task.concept.facts, r.task.concept.facts.index(r.task.answer)))
        else:
            out.append(nltk_char_bleu(r.task.answer, r.text.strip()))
    return out


def clip_i_released(rollouts, ctx):
    """Released CLIP-I: cosine < 0.5 gives 0, else 2 (cos - 0.5); then re-centred to mean 0.8 over the
    rank's drawings (a shift inside a group: it changes logged rewards, not group advantages)."""
    has = _drawn(rollouts, ctx)[0]
    return recentred([0.0 if v < 0.5 else 2.0 * (v - 0.5) for v in clip_i(rollouts, ctx)], has)


def judge_released(rollouts, ctx):
    """Released judge: its score / 100 (the hook already answers in [0, 1]), re-centred to mean 0.8."""
    return recentred(judge(rollouts, ctx), _drawn(rollouts, ctx)[0])


RELEASED = {"text_bleu": text_bleu_released, "clip_i": clip_i_released, "judge": judge_released}


TEXT = {"text_exact": text_exact, "text_bleu": text_bleu, "format": format_ok}
IMAGE = {"identity": identity, "alignment": alignment, "knowledge": knowledge,
         "plausibility": plausibility, "cycle": cycle, "clip_i": clip_i, "clip_t": clip_t, "dino": dino, "judge": judge}
# plausibility and cycle are off by default: on the embedded world every drawing of a pretrained base is
# plausible (all groups tie at 1.0), and the cycle reward's within-group spread is p("yes") noise (std
# ~0.003, far below identity's), so neither can rank a group's rollouts. The text reward is the paper's
# char-BLEU alone: exact match is binary, and on the base 44% of groups answered all 8 rollouts alike
# under it (19% under BLEU, which also ranks wrong answers by how close they come); exact match stays a
# held-out metric.
DEFAULT_WEIGHTS = {"text_exact": 0.0, "text_bleu": 0.35, "format": 0.0,
                   "identity": 0.26, "alignment": 0.13, "knowledge": 0.13, "plausibility": 0.0, "cycle": 0.0,
                   "clip_i": 0.0, "clip_t": 0.0, "dino": 0.0, "judge": 0.0}
WORLD_ONLY = ("identity", "alignment", "knowledge", "plausibility")  # exact checks of the embedded world
REAL_ONLY = {"clip_i": "clip", "clip_t": "clip", "dino": "dino", "judge": "judge"}  # reward -> the scorer it needs
SCORER_FLAGS = {"clip": "--clip-dir", "dino": "--dino-dir", "judge": "--judge"}  # scorer -> the train.py flag giving it


def applies(name, rollout):
    """Is reward `name` defined for this rollout? Text rewards need a text, image rewards a drawing, and
    knowledge a knowledge request; elsewhere a reward is a constant 0, which says nothing about learning."""
    if name in TEXT:
        return rollout.text is not None
    return rollout.codes is not None and rollout.gen is not None and (name != "knowledge" or rollout.gen.kind == "kgen")


def ensemble(rollouts, weights, ctx):
    """(R_text [n], R_img [n], components {name: [n]}): R_i = sum_k w_k * r_k(rollout_i), text and
    image parts kept apart for split advantages. A reward that raises or gives NaN stops the run."""
    parts, comps = {}, {}
    for group, fns in (("text", TEXT), ("image", IMAGE)):
        total = torch.zeros(len(rollouts))
        for name, fn in fns.items():
            if not weights.get(name):
                continue  # weight 0: off, not even computed
            fn = RELEASED.get(name, fn) if ctx.get("reward_style") == "released" else fn
            try:
                vals = torch.tensor(fn(rollouts, ctx), dtype=torch.float)
            except Exception as e:
                raise RuntimeError(f"reward {name!r} raised on this batch ({type(e).__name__}: {e})") from e
            bad = torch.isnan(vals).nonzero()
            if len(bad):
                i = bad[0].item()
                raise RuntimeError(f"reward {name!r} returned NaN for rollout {i} "
                                   f"({rollouts[i].task.question!r}, text {rollouts[i].text!r})")
            comps[name] = vals
            total += weights[name] * vals
        parts[group] = total
    return parts["text"], parts["image"], comps
