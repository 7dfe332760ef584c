"""A shipped vision-language data set: rows of handwritten-looking digit images with
questions about them, generated deterministically (no download, no extra package).

Images: each digit 0-9 is a 5x7 bitmap glyph, drawn with a random stroke thickness,
shear, shift, intensity and pixel noise onto a square canvas whose side is drawn from
``[8, 26]`` pixels, and stored as a binary PGM file (``P5 <w> <h> 255\\n`` + bytes), the
way an image data set stores encoded files. A sample holds 1-8 such images (at most
``max_images``) and one of four questions whose answer has 1-15 characters:

=============================  ==========================
prompt                         answer
=============================  ==========================
``what digits, left to right?``  ``3 7 1``
``what digits, right to left?``  ``1 7 3``
``first digit?``                 ``3``
``how many images?``             ``3``
=============================  ==========================

so both image count and text length vary from sample to sample, as in real VLM data.

Splits: ``train`` and ``heldout`` draw from disjoint random streams (every glyph
rendering, size and composition of a held-out sample is new). Sample ``i`` of a split is
a pure function of ``(split, i)``; ``spec`` gives its image count, sizes and text
without rendering anything, so every rank can plan a step from metadata alone.

Preprocessing (``decode_pgm`` -> ``resize_square`` -> ``patchify``; ``tokenize``): an
image is decoded (a corrupt file is an error naming the sample), resized to the nearest
side in ``{8, 16, 24}`` (1, 4 or 9 patches of 8x8 pixels) and cut into patches; text is
bytes plus special tokens, with one ``IMAGE`` placeholder token per image (the tower
turns an image's 1-9 patches into one token).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PATCH = 8
SIDES = (8, 16, 24)
MAX_PATCHES = (SIDES[-1] // PATCH) ** 2
IMAGE, BOS, EOS, PAD = 256, 257, 258, 259
VOCAB = 264
QUESTIONS = ("what digits, left to right?", "what digits, right to left?", "first digit?",
             "how many images?")
_SPLIT_SEED = {"train": 1_000_003, "heldout": 7_777_777}

_FONT = {  # 5x7 glyphs, one string of 5 bits per row
    0: ["01110", "10001", "10011", "10101", "11001", "10001", "01110"],
    1: ["00100", "01100", "00100", "00100", "00100", "00100", "01110"],
    2: ["01110", "10001", "00001", "00010", "00100", "01000", "11111"],
    3: ["11110", "00001", "00001", "01110", "00001", "00001", "11110"],
    4: ["00010", "00110", "01010", "10010", "11111", "00010", "00010"],
    5: ["11111", "10000", "11110", "00001", "00001", "10001", "01110"],
    6: ["00110", "01000", "10000", "11110", "10001", "10001", "01110"],
    7: ["11111", "00001", "00010", "00100", "01000", "01000", "01000"],
    8: ["01110", "10001", "10001", "01110", "10001", "10001", "01110"],
    9: ["01110", "10001", "10001", "01111", "00001", "00010", "01100"],
}
_GLYPHS = torch.tensor([[[int(c) for c in row] for row in _FONT[d]] for d in range(10)],
                       dtype=torch.float32)  # [10, 7, 5]


@dataclass(frozen=True)
class SampleSpec:
    split: str
    index: int
    digits: tuple[int, ...]
    sides: tuple[int, ...]
    question: int

    @property
    def prompt(self) -> str:
        return QUESTIONS[self.question]

    @property
    def answer(self) -> str:
        d = [str(x) for x in self.digits]
        return [" ".join(d), " ".join(reversed(d)), d[0], str(len(d))][self.question]

    @property
    def patches(self) -> tuple[int, ...]:
        """Patches per image after preprocessing (the encoder's work)."""
        return tuple((resized_side(s) // PATCH) ** 2 for s in self.sides)

    @property
    def seq_len(self) -> int:
        """Tokens: BOS + one token per image + prompt + answer + EOS."""
        return 1 + len(self.digits) + len(self.prompt) + len(self.answer) + 1

    @property
    def answer_tokens(self) -> int:
        return len(self.answer) + 1  # + EOS


def _gen(split: str, index: int, salt: int = 0) -> torch.Generator:
    if split not in _SPLIT_SEED:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return torch.Generator().manual_seed(_SPLIT_SEED[split] * 7919 + index * 104_729 + salt)


def spec(split: str, index: int, max_images: int = 8) -> SampleSpec:
    """Sample ``index`` of ``split``: its digits, image sides and question (no pixels)."""
    if not 1 <= max_images <= 8:
        raise ValueError(f"max_images must be in [1, 8], got {max_images}")
    g = _gen(split, index)
    n = int(torch.randint(1, max_images + 1, (1,), generator=g))
    digits = tuple(int(x) for x in torch.randint(0, 10, (n,), generator=g))
    sides = tuple(int(x) for x in torch.randint(8, 27, (n,), generator=g))
    question = int(torch.randint(0, len(QUESTIONS), (1,), generator=g))
    return SampleSpec(split, index, digits, sides, question)


def render(s: SampleSpec, k: int) -> bytes:
    """Image ``k`` of sample ``s`` as a PGM file."""
    g = _gen(s.split, s.index, salt=k + 1)
    side = s.sides[k]
    glyph = _GLYPHS[s.digits[k]]
    if float(torch.rand((), generator=g)) < 0.5:  # thicker stroke
        glyph = F.max_pool2d(glyph[None, None], (1, 2), stride=1, padding=(0, 1))[0, 0, :, :5]
    frac = 0.6 + 0.25 * float(torch.rand((), generator=g))  # glyph height / canvas side
    shear = (float(torch.rand((), generator=g)) - 0.5) * 0.5
    shift = (torch.rand(2, generator=g) - 0.5) * 0.3
    theta = torch.tensor([[7.0 / (5.0 * frac), shear, float(shift[0])],
                          [0.0, 1.0 / frac, float(shift[1])]])
    grid = F.affine_grid(theta[None], [1, 1, side, side], align_corners=False)
    img = F.grid_sample(glyph[None, None], grid, align_corners=False, padding_mode="zeros")[0, 0]
    img = img * (0.6 + 0.4 * float(torch.rand((), generator=g)))
    img = (img + 0.08 * torch.randn(side, side, generator=g)).clamp(0, 1)
    pixels = (img * 255).round().to(torch.uint8)
    return f"P5 {side} {side} 255\n".encode() + bytes(pixels.flatten().tolist())


def decode_pgm(data: bytes, where: str) -> torch.Tensor:
    """float32 [h, w] in [0, 1]; a malformed file raises naming ``where``."""
    try:
        head, body = data.split(b"\n", 1)
        magic, w, h, maxval = head.split()
        w, h, maxval = int(w), int(h), int(maxval)
    except ValueError:
        raise ValueError(f"{where}: corrupt image (not a binary PGM header: {data[:20]!r})") from None
    if magic != b"P5" or maxval != 255 or not (1 <= w <= 4096 and 1 <= h <= 4096):
        raise ValueError(f"{where}: corrupt image (header {head!r}; need P5, 8-bit, 1-4096 px)")
    if len(body) != w * h:
        raise ValueError(f"{where}: corrupt image ({len(body)} pixel bytes for {w}x{h} = {w * h})")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(h, w).float() / 255.0


def resized_side(side: int) -> int:
    return min(SIDES, key=lambda s: (abs(s - side), s))


def resize_square(img: torch.Tensor) -> torch.Tensor:
    side = resized_side(max(img.shape))
    return F.interpolate(img[None, None], size=(side, side), mode="bilinear",
                         align_corners=False, antialias=True)[0, 0]


def patchify(img: torch.Tensor) -> torch.Tensor:
    """[side, side] -> [(side/8)^2, 64] row-major patches of the image standardized to
    mean 0, std 1 (per image)."""
    img = (img - img.mean()) / (img.std() + 1e-3)
    p = img.unfold(0, PATCH, PATCH).unfold(1, PATCH, PATCH)  # [r, c, 8, 8]
    return p.reshape(-1, PATCH * PATCH)


def preprocess_images(s: SampleSpec, images: list[bytes] | None = None) -> list[torch.Tensor]:
    """Decode, resize and patchify every image of ``s`` (``images``: its files, default
    rendered). Returns one [patches, 64] tensor per image."""
    files = images if images is not None else [render(s, k) for k in range(len(s.digits))]
    out = []
    for k, data in enumerate(files):
        img = decode_pgm(data, f"sample {s.split}/{s.index} image {k}")
        out.append(patchify(resize_square(img)))
    return out


def tokenize(s: SampleSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [seq_len], targets [seq_len]): targets[t] is the token at t+1 where it is part
    of the answer (answer bytes and EOS), else -100."""
    img = [IMAGE] * len(s.digits)
    prompt, answer = list(s.prompt.encode()), list(s.answer.encode())
    ids = torch.tensor([BOS, *img, *prompt, *answer, EOS], dtype=torch.int64)
    targets = torch.full_like(ids, -100)
    start = 1 + len(img) + len(prompt)  # position of the first answer token
    targets[start - 1:-1] = ids[start:]
    return ids, targets


def check_fits(specs: list[SampleSpec], context: int) -> None:
    """Every sample fits the LLM context; else an error naming the sample and numbers."""
    for s in specs:
        if s.seq_len > context:
            raise ValueError(f"sample {s.split}/{s.index} needs {s.seq_len} tokens "
                             f"({len(s.digits)} image tokens + text) "
                             f"but the LLM context is {context}")
