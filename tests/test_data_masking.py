"""SimMIM mask generator: exact masked count, token geometry, determinism per (seed, epoch, key)."""
import numpy as np
import pytest
import torch

from echocare_dist.data.masking import MaskGenerator

KEYS = [f"{i:016x}" for i in range(400)]


@pytest.mark.parametrize("img,mask_patch,patch,ratio", [(256, 32, 4, 0.5), (256, 32, 2, 0.5), (64, 16, 2, 0.6),
                                                        (192, 32, 4, 0.3)])
def test_exact_count_and_token_geometry(img, mask_patch, patch, ratio):
    gen = MaskGenerator(img, mask_patch, patch, ratio, seed=0)
    units = (img // mask_patch) ** 2
    expected = int(np.floor(ratio * units + 0.5))
    m = gen.token_masks(KEYS[:64], epoch=0)
    assert m.dtype == torch.uint8 and tuple(m.shape) == (64, img // patch, img // patch)
    scale = mask_patch // patch
    # Every mask unit is a constant scale x scale block of tokens ...
    blocks = m.reshape(64, img // mask_patch, scale, img // mask_patch, scale)
    assert (blocks == blocks[:, :, :1, :, :1]).all()
    # ... and exactly round(ratio * units) units are masked in every sample.
    assert (blocks[:, :, 0, :, 0].sum((1, 2)) == expected).all()


def test_deterministic_per_key_and_epoch_and_seed():
    gen = MaskGenerator(64, 16, 2, 0.5, seed=3)
    a = gen.unit_masks(KEYS[:50], epoch=2)
    shuffled = KEYS[:50][::-1]
    b = gen.unit_masks(shuffled, epoch=2)[::-1]
    assert np.array_equal(a, b), "a sample's mask must not depend on its batch neighbours"
    assert not np.array_equal(a, gen.unit_masks(KEYS[:50], epoch=3)), "each epoch draws new masks"
    assert not np.array_equal(a, MaskGenerator(64, 16, 2, 0.5, seed=4).unit_masks(KEYS[:50], epoch=2))


def test_units_masked_uniformly():
    gen = MaskGenerator(256, 32, 4, 0.5, seed=0)
    freq = gen.unit_masks(KEYS, epoch=0).mean(0)  # 400 samples: each unit masked ~50 % of the time
    assert abs(freq.mean() - 0.5) < 1e-9
    assert freq.min() > 0.38 and freq.max() < 0.62


def test_geometry_errors():
    with pytest.raises(ValueError, match="multiple"):
        MaskGenerator(250, 32, 4, 0.5)
    with pytest.raises(ValueError, match="multiple"):
        MaskGenerator(256, 32, 3, 0.5)
