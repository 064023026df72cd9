"""Batched CLIP encoding (mmfast.models.clip.encode) equals the plain model forward (fp32 tolerance),
for tensors, image files and a folder, and texts as strings or token ids."""
from __future__ import annotations

import pytest

pytest.importorskip("open_clip")

import torch

from mmfast.models.clip import create_model, get_tokenizer, get_transforms
from mmfast.models.clip import encode as ce


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("tiny", device="cpu", kernels=True, backend="reference").eval()


def test_encode_images_equals_model_forward(model):
    x = torch.randn(37, 3, 32, 32)
    got = ce.encode_images(model, x, batch_size=16, progress=False)  # 3 batches, the last one ragged
    with torch.no_grad():
        ref = model.encode_image(x, normalize=True)
    assert got.shape == ref.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert ce.LAST_RATE["images/s"] > 0
    raw = ce.encode_images(model, x[:5], normalize=False, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(raw, model.encode_image(x[:5]), rtol=1e-5, atol=1e-5)


def test_encode_image_files_and_folder(model, tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    for i in range(5):
        arr = (torch.rand(40, 30, 3, generator=g) * 255).to(torch.uint8).numpy()
        sub = tmp_path / ("a" if i < 3 else "b")
        sub.mkdir(exist_ok=True)
        Image.fromarray(arr).save(sub / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    files = ce.list_images(tmp_path)
    assert [f.name for f in files] == ["0.png", "1.png", "2.png", "3.png", "4.png"]
    tf = get_transforms(model, is_train=False)
    with torch.no_grad():
        ref = model.encode_image(torch.stack([tf(Image.open(f).convert("RGB")) for f in files]), normalize=True)
    torch.testing.assert_close(ce.encode_images(model, tmp_path, batch_size=2, progress=False), ref,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce.encode_images(model, files, batch_size=4, progress=False), ref,
                               rtol=1e-5, atol=1e-5)


def test_encode_texts_equals_model_forward(model):
    texts = [f"a photo of {n} red stars" for n in range(11)]
    tokens = get_tokenizer(model)(texts)
    with torch.no_grad():
        ref = model.encode_text(tokens, normalize=True)
    torch.testing.assert_close(ce.encode_texts(model, texts, batch_size=4, progress=False), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce.encode_texts(model, tokens, batch_size=64, progress=False), ref,
                               rtol=1e-5, atol=1e-5)


def test_kernels_choice_keeps_the_model_patched(model, monkeypatch):
    from mmfast.models.patch import patched_rules

    rules = patched_rules(model)
    assert rules  # create_model(kernels=True) patched it
    x = torch.randn(6, 3, 32, 32)
    seen = []
    real = ce._run

    def spy(*a, **k):
        seen.append(list(patched_rules(model)))
        return real(*a, **k)

    monkeypatch.setattr(ce, "_run", spy)
    auto = ce.encode_images(model, x, progress=False)  # CPU: the rules are off for the call
    kept = ce.encode_images(model, x, progress=False, kernels=True)
    assert seen == [[], rules]
    assert patched_rules(model) == rules  # put back
    torch.testing.assert_close(auto, kept, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kernels"):
        ce.encode_images(model, x, kernels="fast")


def test_bad_inputs_name_the_argument(model, tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        ce.encode_images(model, torch.zeros(2, 3, 32, 32), batch_size=0)
    with pytest.raises(ValueError, match="images must be a"):
        ce.encode_images(model, torch.zeros(2, 32, 32))
    with pytest.raises(ValueError, match="no image files"):
        ce.encode_images(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="images="):
        ce.encode_images(model, tmp_path / "missing")
    with pytest.raises(ValueError, match="texts must be"):
        ce.encode_texts(model, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="dtype"):
        ce.encode_texts(model, ["a"], dtype=torch.int8)
