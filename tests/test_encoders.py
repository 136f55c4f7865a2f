"""Encoder layer over open_clip, exercised with the tiny random-init config."""

import numpy as np
import pytest
from PIL import Image

from retrieval.errors import ModelSpecError, OfflineWeightsError
from retrieval.models.registry import load_encoder
from retrieval.modelspec import ModelIdentity, parse_spec


def _images(n, size=(48, 40)):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def test_shapes_dtype_and_unit_norm(tiny_encoder):
    t = tiny_encoder.encode_texts(["a red square", "two blue circles", "a cat"])
    i = tiny_encoder.encode_images(_images(4))
    assert t.shape == (3, 64) and i.shape == (4, 64)
    assert t.dtype == np.float32 and i.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(i, axis=1), 1.0, atol=1e-5)
    assert tiny_encoder.encode_texts([]).shape == (0, 64)


def test_deterministic_across_loads(tiny_encoder):
    again = load_encoder("tiny-clip:none", device="cpu")
    texts = ["hello world", "a photo of a dog"]
    np.testing.assert_allclose(tiny_encoder.encode_texts(texts), again.encode_texts(texts), atol=1e-6)
    imgs = _images(2)
    np.testing.assert_allclose(tiny_encoder.encode_images(imgs), again.encode_images(imgs), atol=1e-6)
    assert tiny_encoder.identity == again.identity


def test_batch_equals_single_calls(tiny_encoder):
    imgs = _images(5)
    texts = [f"caption number {i}" for i in range(5)]
    batch_i = tiny_encoder.encode_images(imgs, batch_size=5)
    batch_t = tiny_encoder.encode_texts(texts, batch_size=5)
    single_i = np.concatenate([tiny_encoder.encode_images([im]) for im in imgs])
    single_t = np.concatenate([tiny_encoder.encode_texts([t]) for t in texts])
    np.testing.assert_allclose(batch_i, single_i, atol=1e-5)
    np.testing.assert_allclose(batch_t, single_t, atol=1e-5)


def test_paths_and_pil_give_same_vectors(tiny_encoder, tmp_path):
    im = _images(1, size=(64, 64))[0]
    p = tmp_path / "x.png"
    im.save(p)
    np.testing.assert_allclose(tiny_encoder.encode_images([p]), tiny_encoder.encode_images([im]), atol=1e-6)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_local_checkpoint_round_trip(tmp_path, suffix):
    import torch

    tiny_encoder = load_encoder("tiny-clip:none", device="cpu")  # a private copy: its weights get changed
    model = tiny_encoder.model
    with torch.no_grad():  # make the weights differ from the seeded random init
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    texts = ["a local checkpoint"]
    imgs = _images(2)
    expected_t = tiny_encoder.encode_texts(texts)
    expected_i = tiny_encoder.encode_images(imgs)
    loaded = load_encoder(f"tiny-clip:{path}", device="cpu")
    np.testing.assert_allclose(loaded.encode_texts(texts), expected_t, atol=1e-5)
    np.testing.assert_allclose(loaded.encode_images(imgs), expected_i, atol=1e-5)
    assert loaded.identity.weights_sha256 and len(loaded.identity.weights_sha256) == 64
    assert loaded.identity.pretrained == path.name
    # different weights, different identity: a mismatch is detectable
    assert not loaded.identity.matches(load_encoder("tiny-clip:none", device="cpu").identity)
    # the model was built without random init (the checkpoint overwrites it); torch's init is back afterwards
    t = torch.zeros(10_000)
    torch.nn.init.normal_(t)
    assert float(t.std()) > 0.5


def test_checkpoint_missing_a_parameter_is_refused(tmp_path):
    """Building for a checkpoint skips random init, so a parameter the file lacks must never be left as
    uninitialised memory: strict loading refuses the file instead."""
    from safetensors.torch import save_file

    state = {
        k: v.detach().clone().contiguous()
        for k, v in load_encoder("tiny-clip:none", device="cpu").model.state_dict().items()
    }
    state.pop(next(k for k in state if k.startswith("visual.")))
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelSpecError, match="do not fit") as e:
        load_encoder(f"tiny-clip:{path}", device="cpu")
    assert "\n" not in str(e.value)


def test_vit_b32_random_init_dim_512():
    enc = load_encoder("ViT-B-32:none", device="cpu")
    t = enc.encode_texts(["a dog"])
    i = enc.encode_images(_images(1, size=(300, 200)))
    assert t.shape == (1, 512) and i.shape == (1, 512)
    np.testing.assert_allclose(np.linalg.norm(np.concatenate([t, i]), axis=1), 1.0, atol=1e-5)
    assert enc.identity.dim == 512 and enc.image_size == 224


def test_offline_error_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineWeightsError) as e:
        load_encoder("ViT-B-32:laion2b_s34b_b79k", device="cpu", cache_dir="/nonexistent-cache-dir-for-test")
    msg = str(e.value)
    assert "\n" not in msg
    assert "ViT-B-32:laion2b_s34b_b79k" in msg
    assert "--model starter" in msg and "ARCH:/path/to/weights" in msg


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("", "empty"),
        ("NoSuchArch:none", "unknown open_clip architecture"),
        ("ViT-B-32:no_such_tag", "unknown pretrained tag"),
        ("tiny-clip:/nonexistent/weights.safetensors", "weights file not found"),
        ("tiny-clip", "names no weights"),
    ],
)
def test_bad_specs(spec, fragment):
    with pytest.raises(ModelSpecError, match=fragment):
        load_encoder(spec, device="cpu")


@pytest.mark.parametrize(
    "suffix, content",
    [
        (".safetensors", b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": trunc'),  # a cut-off download
        (".pt", b"not a pickle at all"),
        (".bin", b""),
    ],
)
def test_corrupt_weights_file_is_a_one_line_error(tmp_path, suffix, content):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(content)
    with pytest.raises(ModelSpecError, match="cannot load weights") as e:
        load_encoder(f"tiny-clip:{path}", device="cpu")
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_weights_of_another_architecture_do_not_fit(tmp_path):
    from safetensors.torch import save_file

    other = load_encoder("tiny-clip-b:none", device="cpu").model
    path = tmp_path / "other.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(ModelSpecError, match="do not fit architecture tiny-clip"):
        load_encoder(f"tiny-clip:{path}", device="cpu")


def test_unavailable_device_is_a_user_error():
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ModelSpecError, match="CUDA is not available"):
            load_encoder("tiny-clip:none", device="cuda")
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        with pytest.raises(ModelSpecError, match="MPS backend is not available"):
            load_encoder("tiny-clip:none", device="mps")


def test_spec_parsing_and_identity_matching():
    assert str(parse_spec("ViT-B-32")) == "ViT-B-32:laion2b_s34b_b79k"
    assert parse_spec("starter").is_starter
    assert parse_spec("tiny-clip:none").is_random
    a = ModelIdentity("x:/a/w.pt", "x", "w.pt", "abc", 64)
    moved = ModelIdentity("x:/b/w.pt", "x", "w.pt", "abc", 64)
    other = ModelIdentity("x:/a/w.pt", "x", "w.pt", "def", 64)
    assert a.matches(moved) and not a.matches(other)
    assert ModelIdentity.from_dict(a.to_dict()) == a
