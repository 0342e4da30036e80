"""`bagel data demo`: a small real dataset in BAGEL's three task types.

The pictures are the real photographs that ship inside scikit-image
(`skimage.data`: an astronaut portrait, a cat, a cup of coffee, a rocket on
its launch pad, microscopy, the Hubble deep field, ...). The captions,
questions and answers below were written for these pictures in this
repository. Edit samples apply real image operations (mirror, rotate, blur,
grayscale, ...) to the photographs, and their instructions describe exactly
the operation applied, so an edit target is always correct.

Output, a few MB in all: `DEST/t2i`, `DEST/vlm` and `DEST/edit`, each with tar
shards and `manifest.json`. Pictures are stored as JPEG with the long side
at most `max_side` pixels.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable

from bagel.platform.data.shards import ShardWriter


@dataclass(frozen=True)
class Photo:
    """One photograph of skimage.data and the texts written for it."""

    name: str  # loader function in skimage.data
    color: bool  # False for grayscale photographs (no grayscale edit for them)
    captions: tuple[str, ...]  # alternative captions (t2i)
    qa: tuple[tuple[str, str], ...]  # (question, answer) pairs (vlm)


PHOTOS: tuple[Photo, ...] = (
    Photo("astronaut", True,
          ("Portrait of a smiling astronaut in an orange flight suit, holding a helmet, with a flag and a model space shuttle behind her.",
           "A woman astronaut in an orange suit poses with her white helmet in front of an American flag.",
           "Official portrait of an astronaut with short curly hair, orange pressure suit and mission patch."),
          (("What is the person wearing?", "An orange flight suit with mission patches, and she holds a white helmet."),
           ("What stands in the background on the right?", "A model of the space shuttle with its rocket boosters."))),
    Photo("brick", False,
          ("A grayscale close-up of a brick wall laid in long diagonal rows.",
           "Rows of narrow bricks with light mortar lines, photographed at an angle."),
          (("What surface is shown?", "A wall of bricks separated by mortar lines."),
           ("Is the picture in color?", "No, it is a grayscale photograph."))),
    Photo("camera", False,
          ("Black-and-white photo of a man in a dark coat looking through a camera on a tripod in a grassy field.",
           "A cameraman stands on a lawn behind his tripod camera, with buildings far in the background."),
          (("What is the man doing?", "He is looking through a camera mounted on a tripod."),
           ("Where is he standing?", "On a wide grassy field with distant buildings behind him."))),
    Photo("cell", False,
          ("A microscope image of a single bright round cell on a dark gray background.",
           "Grayscale microscopy showing one small glowing cell near the center."),
          (("How many cells are visible?", "One bright round cell."),
           ("What kind of image is this?", "A grayscale microscope image."))),
    Photo("chelsea", True,
          ("Close-up of a tabby cat with green eyes and a pink nose looking at the camera.",
           "The face of a brown striped cat with large yellow-green eyes.",
           "A curious tabby cat photographed close up, whiskers and ears in view."),
          (("What animal is this?", "A tabby cat."),
           ("What color are its eyes?", "Yellow-green."))),
    Photo("clock", False,
          ("A blurred wall clock on a plain gray background, smeared by camera motion.",
           "Grayscale photo of a round clock face blurred horizontally by motion."),
          (("Why is the object hard to read?", "The picture is blurred by motion, so the clock face is smeared."),
           ("What is the background like?", "A plain, light gray background."))),
    Photo("coffee", True,
          ("A cup of espresso on a red saucer with a spoon, on a wooden table.",
           "Top view of a coffee cup with crema, a red saucer and a small spoon on dark wood."),
          (("What drink is in the cup?", "Coffee, an espresso with crema on top."),
           ("What color is the saucer?", "Red."))),
    Photo("coins", False,
          ("Rows of old silver coins laid out on a dark background.",
           "Grayscale photo of about two dozen ancient coins arranged in a grid."),
          (("What objects are arranged in rows?", "Coins."),
           ("How are they arranged?", "In four rows on a dark background."))),
    Photo("grass", False,
          ("A dense patch of grass photographed from above in grayscale.",
           "Close-up texture of many thin blades of grass."),
          (("What texture fills the picture?", "Blades of grass."),
           ("Is there any object in the scene?", "No, only grass fills the frame."))),
    Photo("gravel", False,
          ("Grayscale close-up of small gravel stones covering the ground.",
           "A texture of many small pebbles packed together."),
          (("What covers the ground?", "Small gravel stones."),
           ("Are the stones large or small?", "Small, each only a fraction of the frame."))),
    Photo("hubble_deep_field", True,
          ("The Hubble deep field: hundreds of distant galaxies scattered across a black sky.",
           "A space telescope image full of small colorful galaxies on a dark background."),
          (("What are the small colored spots?", "Distant galaxies seen by a space telescope."),
           ("What color is the background?", "Black."))),
    Photo("immunohistochemistry", True,
          ("A stained tissue sample under a microscope, with brown-stained cell membranes and blue nuclei.",
           "Microscopy of tissue with brown immunohistochemical staining and blue counterstain."),
          (("What kind of picture is this?", "A microscope image of stained tissue."),
           ("Which colors dominate?", "Brown staining and pale blue nuclei on a light background."))),
    Photo("moon", False,
          ("A grayscale close-up of the surface of the moon with small craters.",
           "Part of the lunar surface with a few craters and dark patches."),
          (("What surface is shown?", "The surface of the moon."),
           ("What features can you see?", "Small craters and darker patches."))),
    Photo("page", False,
          ("A scanned book page titled Region-based segmentation, with a paragraph and a line of code.",
           "A page of printed text about segmentation, photographed with uneven lighting."),
          (("What is the heading of the page?", "Region-based segmentation."),
           ("Does the page contain code?", "Yes, one line of code at the bottom."))),
    Photo("retina", True,
          ("A fundus photograph of a human retina, orange-red with branching blood vessels and a bright optic disc.",
           "Medical image of the back of an eye showing blood vessels spreading from the optic disc."),
          (("What part of the body is shown?", "The retina at the back of an eye."),
           ("What are the dark red lines?", "Blood vessels."))),
    Photo("rocket", True,
          ("A rocket on its launch pad at dusk, lit by floodlights, between tall lightning towers.",
           "A white launch vehicle stands at the pad under a deep blue evening sky."),
          (("What stands in the center of the picture?", "A rocket on a launch pad."),
           ("Is it day or night?", "Dusk: the sky is deep blue and the pad is lit by lights."))),
    Photo("text", False,
          ("Handwritten numbers and symbols on a sheet of paper, photographed at an angle.",
           "Grayscale photo of handwritten arithmetic on paper."),
          (("What is written on the paper?", "Handwritten numbers and math symbols."),
           ("Is the writing printed or handwritten?", "Handwritten."))),
)


def _edit_ops() -> list[tuple[str, tuple[str, ...], Callable, bool]]:
    """(name, instruction alternatives, operation on a PIL image, needs a color photo)."""
    from PIL import ImageEnhance, ImageFilter, ImageOps

    def crop_center(im):
        w, h = im.size
        return im.crop((w // 4, h // 4, w - w // 4, h - h // 4)).resize((w, h))

    return [
        ("mirror", ("Mirror the picture horizontally.", "Flip the image from left to right."), ImageOps.mirror, False),
        ("rotate", ("Rotate the picture 90 degrees clockwise.", "Turn the image a quarter turn to the right."),
         lambda im: im.rotate(-90, expand=True), False),
        ("blur", ("Blur the whole picture.", "Make the image soft and out of focus."),
         lambda im: im.filter(ImageFilter.GaussianBlur(3)), False),
        ("brighten", ("Make the picture brighter.", "Increase the brightness of the image."),
         lambda im: ImageEnhance.Brightness(im).enhance(1.6), False),
        ("darken", ("Make the picture darker.", "Reduce the brightness of the image."),
         lambda im: ImageEnhance.Brightness(im).enhance(0.5), False),
        ("zoom", ("Zoom in on the center of the picture.", "Crop to the middle half of the image and enlarge it."),
         crop_center, False),
        ("invert", ("Invert the colors of the picture.", "Turn the image into its negative."), ImageOps.invert, False),
        ("grayscale", ("Convert the picture to black and white.", "Remove all color from the image."),
         lambda im: ImageOps.grayscale(im).convert("RGB"), True),
        ("flip", ("Flip the picture upside down.", "Mirror the image vertically."), ImageOps.flip, False),
    ]


def load_photo(name: str, max_side: int):
    """Load a skimage.data photograph as an RGB PIL image with long side <= max_side."""
    import numpy as np
    import skimage.data
    from PIL import Image

    array = np.asarray(getattr(skimage.data, name)())
    image = Image.fromarray(array).convert("RGB")
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


def _jpeg(image, quality: int = 88) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def write_demo(
    dest: str, storage_options: dict[str, Any] | None = None, max_side: int = 256, samples_per_shard: int = 4
) -> dict[str, str]:
    """Write the t2i, vlm and edit demo datasets under `dest`; return {task: manifest URI}."""
    dest = dest.rstrip("/")
    photos = [(photo, load_photo(photo.name, max_side)) for photo in PHOTOS]
    encoded = {photo.name: _jpeg(image) for photo, image in photos}
    manifests = {}

    t2i = ShardWriter(f"{dest}/t2i", "t2i", "t2i", max_samples=max(1, samples_per_shard // 2), storage_options=storage_options)
    for photo, _ in photos:
        t2i.write(photo.name, {"kind": "t2i", "captions": list(photo.captions), "images": ["jpg"]}, [(encoded[photo.name], "jpg")])
    manifests["t2i"] = t2i.close()

    vlm = ShardWriter(f"{dest}/vlm", "vlm", "vlm", max_samples=samples_per_shard, storage_options=storage_options)
    for photo, _ in photos:
        # One multi-turn conversation, and one single question per pair.
        turns = []
        for index, (question, answer) in enumerate(photo.qa):
            turns.append({"from": "human", "value": ("<image>\n" if index == 0 else "") + question})
            turns.append({"from": "gpt", "value": answer})
        image = [(encoded[photo.name], "jpg")]
        vlm.write(f"{photo.name}-chat", {"kind": "vlm", "conversations": turns, "images": ["jpg"]}, image)
        for index, (question, answer) in enumerate(photo.qa):
            conversation = [{"from": "human", "value": f"{question}\n<image>"}, {"from": "gpt", "value": answer}]
            vlm.write(f"{photo.name}-q{index}", {"kind": "vlm", "conversations": conversation, "images": ["jpg"]}, image)
    manifests["vlm"] = vlm.close()

    ops = _edit_ops()
    edit = ShardWriter(f"{dest}/edit", "edit", "edit", max_samples=samples_per_shard, storage_options=storage_options)
    for photo_index, (photo, image) in enumerate(photos):
        usable = [op for op in ops if photo.color or not op[3]]
        for chain in range(2):
            # Two different operations per chain, chosen by position so the demo is reproducible.
            first = usable[(photo_index * 2 + chain) % len(usable)]
            second = usable[(photo_index * 2 + chain + 3) % len(usable)]
            images = [image, first[2](image)]
            images.append(second[2](images[1]))
            record = {"kind": "edit", "instructions": [list(first[1]), list(second[1])], "images": ["jpg"] * 3}
            edit.write(f"{photo.name}-{first[0]}-{second[0]}", record, [(_jpeg(im), "jpg") for im in images])
    manifests["edit"] = edit.close()
    return manifests
