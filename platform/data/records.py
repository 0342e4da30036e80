"""Stored sample records and how each becomes an `InterleavedSample` with roles.

A shard stores a sample as one JSON record plus its encoded images (indexes
into the record's image list). Texts stay untokenised, so the tokenizer is a
training-time choice. Four kinds, the first three being BAGEL's source formats:

- "t2i": `{"kind": "t2i", "captions": [str, ...]}` with one image. Plan: one
  caption chosen at random (text, no loss, CFG-droppable), then the image as
  a noised VAE target (MSE loss).
- "vlm": `{"kind": "vlm", "conversations": [{"from": "human"|"gpt", "value": str}]}`
  with n images, one per `<image>` placeholder in human turns (images without
  placeholders go before the first human text). Human text has no loss, gpt
  turns carry CE loss, images feed the ViT. A sample without a gpt turn is
  skipped ("no_loss").
- "edit": `{"kind": "edit", "instructions": [[str, ...], ...]}` with n >= 2
  images and n - 1 instruction lists (alternatives for step i-1 -> i). The
  plan follows BAGEL's edit dataset. It picks a random start image and an end
  1-2 steps later. The source goes in as clean VAE, then ViT (both
  droppable). Each instruction is a droppable text. Intermediate targets are
  noised VAE, clean VAE (droppable) and ViT (droppable), and the final target
  is noised VAE only. For a 2-step span, with probability 0.5 the
  instructions are joined into one text and only the final image is generated.
- "interleaved": `{"kind": "interleaved", "items": [...]}`, each item either
  `{"text": str, "loss": bool, "cfg": bool}` or
  `{"image": int, "role": "vit"|"vae_noised"|"vae_clean", "cfg": bool}`.

All randomness comes from the `rng` handed in, which the loader seeds from
(data seed, epoch, the sample's global index): the same sample gets the same
plan under any parallel layout and after a resume.
"""

from __future__ import annotations

import random

import torch

from bagel.model.inputs import ImageItem, ImageRole, InterleavedSample, Item, TextItem
from bagel.platform.data.config import ImageTransformConfig
from bagel.platform.data.tokenizer import Tokenizer
from bagel.platform.data.transforms import RoleLimits, SampleError, decode_image, target_size, to_tensor

KINDS = ("t2i", "vlm", "edit", "interleaved")
IMAGE_PLACEHOLDER = "<image>"


# A planned item before images are decoded: ("text", str, loss, cfg) or ("image", index, role, cfg).
PlanItem = tuple


def _require(record: dict, field: str, kind: type) -> object:
    value = record.get(field)
    if not isinstance(value, kind) or not value:
        raise SampleError("missing_field", f"field {field!r} is missing or empty")
    return value


def _choose_text(value: object, rng: random.Random) -> str:
    """Choose one of several alternative texts (a list, a dict of alternatives, or one string)."""
    if isinstance(value, dict):
        value = [value[k] for k in sorted(value)]
    if isinstance(value, str):
        return value
    options = [v for v in value if isinstance(v, str) and v.strip()] if isinstance(value, list) else []
    if not options:
        raise SampleError("missing_field", "no usable text among the alternatives")
    return options[rng.randrange(len(options))]


def plan_record(record: dict, num_images: int, rng: random.Random) -> list[PlanItem]:
    """Return the ordered items of a record, with images referenced by index."""
    kind = record.get("kind")
    if kind == "t2i":
        caption = _choose_text(_require(record, "captions", (list, dict, str)), rng)
        if num_images < 1:
            raise SampleError("missing_field", "t2i record without an image")
        return [("text", caption, False, True), ("image", 0, ImageRole.VAE_NOISED, False)]
    if kind == "vlm":
        return _plan_vlm(_require(record, "conversations", list), num_images)
    if kind == "edit":
        return _plan_edit(_require(record, "instructions", list), num_images, rng)
    if kind == "interleaved":
        return _plan_interleaved(_require(record, "items", list), num_images)
    raise SampleError("bad_record", f"unknown kind {kind!r}; expected one of {KINDS}")


def _plan_vlm(conversations: list, num_images: int) -> list[PlanItem]:
    items: list[PlanItem] = []
    next_image = 0
    placeholders = sum(
        str(turn.get("value", "")).count(IMAGE_PLACEHOLDER) for turn in conversations if isinstance(turn, dict)
    )
    if placeholders == 0:
        items += [("image", i, ImageRole.VIT, False) for i in range(num_images)]
        next_image = num_images
    elif placeholders != num_images:
        raise SampleError("bad_record", f"{placeholders} <image> placeholders but {num_images} images")
    has_loss = False
    for turn in conversations:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise SampleError("missing_field", "conversation turn without a text 'value'")
        speaker = turn.get("from")
        if speaker == "gpt":
            if turn["value"].strip():
                items.append(("text", turn["value"], True, False))
                has_loss = True
            continue
        if speaker != "human":
            raise SampleError("bad_record", f"conversation turn from {speaker!r}; expected 'human' or 'gpt'")
        for index, piece in enumerate(turn["value"].split(IMAGE_PLACEHOLDER)):
            if index > 0:
                items.append(("image", next_image, ImageRole.VIT, False))
                next_image += 1
            if piece.strip():
                items.append(("text", piece.strip(), False, False))
    if not has_loss:
        raise SampleError("no_loss", "conversation without a gpt turn")
    return items


def _plan_edit(instructions: list, num_images: int, rng: random.Random) -> list[PlanItem]:
    if num_images < 2 or len(instructions) != num_images - 1:
        raise SampleError(
            "bad_record", f"edit record with {num_images} images and {len(instructions)} instructions (needs n and n-1, n >= 2)"
        )
    start = rng.randrange(num_images - 1)
    end = start + 1 + rng.randrange(min(2, num_images - 1 - start))
    texts = [_choose_text(instructions[i], rng) for i in range(start, end)]
    items: list[PlanItem] = [("image", start, ImageRole.VAE_CLEAN, True), ("image", start, ImageRole.VIT, True)]
    if end - start == 2 and rng.random() < 0.5:
        return items + [("text", " ".join(texts), False, True), ("image", end, ImageRole.VAE_NOISED, False)]
    for step, text in enumerate(texts):
        target = start + 1 + step
        items.append(("text", text, False, True))
        items.append(("image", target, ImageRole.VAE_NOISED, False))
        if target != end:
            items += [("image", target, ImageRole.VAE_CLEAN, True), ("image", target, ImageRole.VIT, True)]
    return items


def _plan_interleaved(raw_items: list, num_images: int) -> list[PlanItem]:
    items: list[PlanItem] = []
    for raw in raw_items:
        if not isinstance(raw, dict):
            raise SampleError("bad_record", "interleaved item is not an object")
        if "text" in raw:
            items.append(("text", str(raw["text"]), bool(raw.get("loss", False)), bool(raw.get("cfg", False))))
        elif "image" in raw:
            index = raw["image"]
            if not isinstance(index, int) or not 0 <= index < num_images:
                raise SampleError("missing_field", f"image index {index!r} out of range ({num_images} images)")
            try:
                role = ImageRole(raw.get("role", "vit"))
            except ValueError as error:
                raise SampleError("bad_record", str(error)) from error
            items.append(("image", index, role, bool(raw.get("cfg", False))))
        else:
            raise SampleError("missing_field", "interleaved item without 'text' or 'image'")
    return items


def build_sample(
    sample_id: str,
    dataset: str,
    record: dict,
    images: dict[int, bytes],
    rng: random.Random,
    tokenizer: Tokenizer,
    transforms: dict[ImageRole, ImageTransformConfig],
    limits: dict[ImageRole, RoleLimits],
    max_text_chars: int,
    shrink: float = 1.0,
) -> InterleavedSample:
    """Plan, tokenise and decode one record; raise SampleError(reason) when it is unusable.

    `max_text_chars` rejects absurdly long text before tokenising it ("too_long").
    `shrink` (<= 1) scales every image down beyond the resize rules.
    """
    num_images = len(record["images"]) if isinstance(record.get("images"), list) else len(images)
    plan = plan_record(record, num_images, rng)
    used = sorted({entry[1] for entry in plan if entry[0] == "image"})
    missing = [i for i in used if i not in images]
    if missing:
        raise SampleError("missing_field", f"image members {missing} are missing from the shard")
    decoded = {i: decode_image(images[i]) for i in used}
    num_placed = sum(1 for entry in plan if entry[0] == "image")
    # An image placed twice at the same size (e.g. as ViT and VAE input) is
    # resized once; each item gets its own copy of the pixels.
    resized: dict[tuple[int, tuple[int, int]], torch.Tensor] = {}
    items: list[Item] = []
    for entry in plan:
        if entry[0] == "text":
            _, text, loss, cfg = entry
            if len(text) > max_text_chars:
                raise SampleError("too_long", f"text of {len(text)} characters")
            ids = tokenizer.encode(text)
            if not ids:
                continue
            items.append(TextItem(token_ids=ids, loss=loss, cfg_droppable=cfg))
        else:
            _, index, role, cfg = entry
            image = decoded[index]
            size = target_size(image.width, image.height, transforms[role], limits[role], num_placed, shrink)
            key = (index, size)
            if key in resized:
                pixels = resized[key].clone()
            else:
                pixels = resized[key] = to_tensor(image, size)
            items.append(ImageItem(pixels=pixels, role=role, cfg_droppable=cfg))
    if not items:
        raise SampleError("missing_field", "record yields no items")
    return InterleavedSample(sample_id=sample_id, items=items, dataset=dataset)
