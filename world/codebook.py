"""
The embedded world's image codec: an image is an 8x8 grid of cells, each background or one of 4 shapes
x 6 colours, so an image is exactly 64 codes out of 25 (the role a VQ tokenizer plays for Show-o).
Rendering codes to a 64x64 PNG and reading a PNG back are exact inverses (WorldCodec); object words
("red-circle") name the codes in the world's texts.
"""
import os

import numpy as np
import torch
from PIL import Image

GRID, CELL = 8, 8
N_IMG = GRID * GRID
SHAPES = ["square", "circle", "triangle", "cross"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
CODEBOOK = 1 + len(SHAPES) * len(COLOURS)

BACKGROUND_RGB = (40, 40, 40)
COLOUR_RGB = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230),
              "yellow": (230, 220, 40), "purple": (160, 60, 200), "orange": (240, 140, 30)}


def _shape_mask(shape):
    y, x = np.mgrid[0:CELL, 0:CELL] - (CELL - 1) / 2  # offsets from the cell centre
    inside = (np.abs(y) < 3) & (np.abs(x) < 3)  # a 1-px margin keeps neighbouring cells apart
    return {"square": inside, "circle": y ** 2 + x ** 2 <= 9,
            "triangle": inside & (np.abs(x) <= (y + 3.5) / 2),
            "cross": inside & ((np.abs(x) < 1) | (np.abs(y) < 1))}[shape]


def _codebook_pixels():
    pixels = np.empty((CODEBOOK, CELL, CELL, 3), np.uint8)
    pixels[:] = BACKGROUND_RGB
    for shape in SHAPES:
        for colour in COLOURS:
            pixels[code_of(colour, shape)][_shape_mask(shape)] = COLOUR_RGB[colour]
    return pixels


def code_of(colour, shape):
    return 1 + SHAPES.index(shape) * len(COLOURS) + COLOURS.index(colour)


def code_name(code):
    """(colour, shape) of a non-background code."""
    s, c = divmod(int(code) - 1, len(COLOURS))
    return COLOURS[c], SHAPES[s]


def object_text(code):
    return "a " + object_word(code)


def object_word(code):
    # one word per code ("red-circle"), and the tokenizer maps it to that image code's own id: the
    # world's texts name objects with the codebook entries, so drawing what a text describes is copying
    # tokens (which a CPU-sized model learns in minutes) instead of translating words into codes
    return "{}-{}".format(*code_name(code))


CODEBOOK_PIXELS = _codebook_pixels()  # [CODEBOOK, CELL, CELL, 3]


def as_list(codes):
    codes = torch.as_tensor(codes).reshape(-1).tolist()
    if len(codes) != N_IMG or not all(0 <= x < CODEBOOK for x in codes):
        raise ValueError(f"expected {N_IMG} image codes in [0, {CODEBOOK}), got {codes}")
    return codes


def render(codes):
    """64 codes -> 64x64 RGB image."""
    cells = CODEBOOK_PIXELS[np.array(as_list(codes)).reshape(GRID, GRID)]
    return Image.fromarray(cells.transpose(0, 2, 1, 3, 4).reshape(GRID * CELL, GRID * CELL, 3))


def read_rgb(path):
    """The RGB pixels of an image file, fully decoded here: a cut or foreign file is a ValueError naming it
    (PIL opens lazily and would otherwise fail later, naming nothing)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def encode_image(image):
    """Image or path -> LongTensor[64] of the nearest code per cell (inverts render)."""
    name = getattr(image, "filename", None) or "image"
    if isinstance(image, (str, os.PathLike)):
        name, image = str(image), read_rgb(image)
    image, side = image.convert("RGB"), GRID * CELL
    if image.size != (side, side):
        raise ValueError(f"{name}: image is {image.size[0]}x{image.size[1]}, expected "
                         f"{side}x{side} ({GRID}x{GRID} cells of {CELL} px)")
    cells = np.asarray(image, np.float64).reshape(GRID, CELL, GRID, CELL, 3)
    cells = cells.transpose(0, 2, 1, 3, 4).reshape(N_IMG, -1)
    book = CODEBOOK_PIXELS.reshape(CODEBOOK, -1).astype(np.float64)
    # Nearest by L2 rather than exact lookup, so slightly altered images still decode.
    dist = (cells ** 2).sum(1, keepdims=True) - 2 * cells @ book.T + (book ** 2).sum(1)
    return torch.from_numpy(dist.argmin(1))


class WorldCodec:
    """The image-tokenizer interface the trainer uses, here the exact codec: encode(images) -> codes
    [B, GRID*GRID], decode(codes) -> PIL images, codebook_size, grid (magvit.MagvitCodec is the other)."""
    codebook_size, grid = CODEBOOK, GRID

    def encode(self, images):
        return torch.stack([encode_image(i) for i in images])

    def decode(self, codes):
        return [render(c) for c in codes]
