"""Image resize against PIL's bicubic filter, and the worker-to-trainer transport of packs."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from bagel.model.configs import get_model_config
from bagel.model.inputs import PackedSequence
from bagel.platform.data.config import DataConfig
from bagel.platform.data.demo import PHOTOS, load_photo
from bagel.platform.data.loader import build_data_loader
from bagel.platform.data.synthetic import write_image_dataset
from bagel.platform.data.transforms import to_tensor
from bagel.platform.data.transport import flatten_pack, unflatten_pack

TINY = get_model_config("tiny")


def _reference(image, size):
    """BAGEL's path: PIL bicubic resize of the RGB image, then value / 127.5 - 1."""
    resized = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
    return torch.from_numpy(np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)


@pytest.mark.parametrize("size", [(128, 128), (112, 84), (32, 48), (512, 300)])
def test_downscale_matches_pil_bicubic_within_one_level(size):
    """Downscales of the demo photographs: at most 1 of 255 levels off PIL, in under 0.5% of the values."""
    one_level = 1 / 127.5 + 1e-6
    for photo in PHOTOS:
        image = load_photo(photo.name, max_side=512)
        ours, reference = to_tensor(image, size), _reference(image, size)
        assert ours.shape == reference.shape == (3, size[1], size[0])
        assert ours.dtype == torch.float32
        assert ours.is_contiguous()
        difference = (ours - reference).abs()
        assert difference.max() <= one_level, photo.name
        assert (difference > 0).float().mean() < 0.005, photo.name


@pytest.mark.parametrize("size", [(640, 480), (600, 300), (96, 96)])
def test_upscale_and_same_size_are_pil_exact(size):
    """A size that grows along either axis (or stays) gives PIL's values bit for bit."""
    image = load_photo(PHOTOS[0].name, max_side=96 if size == (96, 96) else 512)
    assert torch.equal(to_tensor(image, size), _reference(image, size))


def _assert_same_pack(a: PackedSequence, b: PackedSequence) -> None:
    for f in dataclasses.fields(PackedSequence):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype, f.name
            assert x.shape == y.shape, f.name
            assert torch.equal(x, y), f.name
        elif f.name == "vae_images":
            assert len(x) == len(y) and all(torch.equal(p, q) for p, q in zip(x, y)), f.name
        else:
            assert x == y, f.name


def test_flat_pack_round_trip_is_exact(tmp_path):
    """Every field survives flatten + unflatten bit for bit, with and without VAE images."""
    uri = write_image_dataset(f"file://{tmp_path}/img", "img", 8, 2)
    config = DataConfig.from_dict({"num_workers": 0, "datasets": [{"name": "img", "uri": uri}]})
    packs = [next(build_data_loader(config, TINY, 0, 1)) for _ in range(1)]
    no_images = dataclasses.replace(packs[0], vae_images=[], vae_latent_grids=[], vae_noise_seeds=[])
    for packed in packs + [no_images]:
        flat = flatten_pack(packed)
        assert flat.buffer.dtype == torch.uint8
        assert flat.buffer.dim() == 1
        _assert_same_pack(unflatten_pack(flat), packed)


def test_worker_packs_equal_in_process_packs(tmp_path):
    """Packs built in DataLoader workers arrive identical to the ones built in the trainer process."""
    uri = write_image_dataset(f"file://{tmp_path}/img", "img", 12, 2)
    raw = {"num_workers": 1, "seed": 5, "datasets": [{"name": "img", "uri": uri}]}
    in_process = build_data_loader(DataConfig.from_dict({**raw, "num_workers": 0}), TINY, 0, 1)
    in_worker = build_data_loader(DataConfig.from_dict(raw), TINY, 0, 1)
    for _ in range(4):
        _assert_same_pack(next(in_worker), next(in_process))
    in_worker.close()
