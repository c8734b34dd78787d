"""
The embedded world's word tokenizer over the joint vocabulary (specials, the world's words, concept
identifiers, then the image codes), and its prompt formats (showo.ShowoTokenizer is the Show-o twin:
the same methods, Show-o's formats). No entry point.
"""
import re

import torch

from world.codebook import CODEBOOK, COLOURS, N_IMG, SHAPES, object_word
from world.data import CLASSES, DESCRIPTION, FACTS, GEN, GEN_REASON, IMAGE_QA, KGEN, REGIONS, TEXTQA

SPECIALS = ["<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<bor>", "<eor>", "<mask>"]


def world_words():
    """Every word the world's texts use (concept tokens aside), sorted."""
    templates = [DESCRIPTION, GEN, GEN_REASON, *FACTS.values(), *TEXTQA.values(),
                 *IMAGE_QA.values(), *KGEN.values(), *REGIONS, "yes no a"]
    words = {w for t in templates for w in t.split() if "{" not in w}
    return sorted(words | set(SHAPES) | set(COLOURS) | set(CLASSES))


class WordTokenizer:
    """Closed-vocabulary whitespace tokenizer over the joint text+image vocabulary:
    ids are specials, world words, concept tokens <c0>.., then the CODEBOOK image codes
    (id = image_offset + code); object words ("red-circle") are their image codes' ids.  A
    transformers tokenizer with added concept and image tokens could fill this interface later."""

    def __init__(self, n_concepts: int, extra_words=()):
        words = sorted(set(world_words()) | set(extra_words))
        self.itos = SPECIALS + words + [f"<c{i}>" for i in range(n_concepts)]
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        (self.pad_id, self.bos_id, self.eos_id, self.boi_id, self.eoi_id, self.bor_id,
         self.eor_id, self.mask_id) = range(len(SPECIALS))
        self.n_concepts = n_concepts
        self.image_offset = self.n_text = len(self.itos)
        self.codebook_size, self.n_image_tokens = CODEBOOK, N_IMG
        self.vocab_size = self.image_offset + CODEBOOK
        self.stoi.update({object_word(c): self.image_offset + c for c in range(1, CODEBOOK)})

    def encode(self, text: str) -> list[int]:
        for word in text.split():
            if word in self.stoi:
                continue
            if re.fullmatch(r"<c\d+>", word):
                raise ValueError(f"unknown concept token {word} (this tokenizer knows "
                                 f"<c0>..<c{self.n_concepts - 1}>)")
            raise ValueError(f"unknown word {word!r} in: {text}")
        return [self.stoi[word] for word in text.split()]

    def decode(self, ids) -> str:
        """Words joined by spaces; specials dropped, image codes shown as object words."""
        ids = torch.as_tensor(ids).reshape(-1).tolist()
        return " ".join(("background" if i == self.image_offset else object_word(i - self.image_offset))
                        if i >= self.image_offset else self.itos[i] for i in ids if i >= len(SPECIALS))

    # The prompt formats (showo.ShowoTokenizer has the same three methods with Show-o's). One rollout of the
    # reasoning loop reads [bos] context (image) question [bor] answer/reasoning [eor], then for drawing
    # [bos] context request [bor] reasoning [eor] [boi] image [eoi].
    def understanding_prompt(self, task):
        """[bos] context ([boi] image [eoi]) question [bor]: the model continues with its answer and <eor>."""
        ids = [self.bos_id] + self.encode(task.concept.context)
        if task.image is not None:
            ids += [self.boi_id] + [self.image_offset + int(c) for c in task.image] + [self.eoi_id]
        return ids + self.encode(task.question) + [self.bor_id]

    def generation_prompt(self, concept, request, reasoning_ids):
        """[bos] context request [bor] reasoning [eor] [boi]: the drawing is conditioned on the reasoning."""
        return ([self.bos_id] + self.encode(concept.context + " " + request) + [self.bor_id] + list(reasoning_ids)
                + [self.eor_id, self.boi_id])

    def uncond_prompt(self):
        """The unconditional row of classifier-free guidance: no text at all."""
        return [self.bos_id, self.boi_id]

    def text_ids(self) -> torch.Tensor:
        """Every id a text answer may use: words, concept tokens, object codes and <eor>."""
        return torch.tensor([self.eor_id, *range(len(SPECIALS), self.image_offset),
                             *range(self.image_offset + 1, self.vocab_size)])
