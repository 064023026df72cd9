"""LLaVA data: pad-to-square preprocessing, tokenized records with and without images, grouping."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from mmfast.models.llava.data import (
    CLIP_MEAN,
    CLIP_STD,
    ImageProcessor,
    LlavaSupervisedDataset,
    collate,
    modality_grouped_order,
)


def test_pad_to_square_uses_the_mean_colour():
    from PIL import Image

    proc = ImageProcessor(16, aspect="pad")
    x = proc(Image.new("RGB", (32, 8), (255, 0, 0)))  # wide: padded above and below
    assert x.shape == (3, 16, 16)
    corner = x[:, 0, 0]
    expected = torch.tensor([(round(255 * m) / 255 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    torch.testing.assert_close(corner, expected, atol=0.02, rtol=0)
    centre = x[:, 8, 8]
    torch.testing.assert_close(centre[0], torch.tensor((1 - CLIP_MEAN[0]) / CLIP_STD[0]), atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        ImageProcessor(16, aspect="stretch")
    with pytest.raises(TypeError, match="PIL image"):
        proc(torch.zeros(3, 4, 4))


def test_grouped_order_keeps_modalities_apart():
    lengths = [10, -5, 30, -7, 12, 40, -9, 8, 22, -3, 15, 17]
    order = modality_grouped_order(lengths, 2, seed=0)
    assert sorted(order) == list(range(len(lengths)))
    for k in range(0, len(order) - 1, 2):
        a, b = order[k], order[k + 1]
        assert (lengths[a] > 0) == (lengths[b] > 0), (a, b)
    assert order == modality_grouped_order(lengths, 2, seed=0)


def test_dataset_mixes_image_and_text_only_records(tmp_path):
    from PIL import Image

    from mmfast.data.llava import load_llava_json
    from mmfast.models.llava.model import build_llava

    (tmp_path / "img").mkdir()
    Image.new("RGB", (20, 30), (0, 200, 0)).save(tmp_path / "img" / "a.png")
    recs = [{"id": "1", "image": "img/a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                                 {"from": "gpt", "value": "A green square."}]},
            {"id": "2", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]}]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    llava = build_llava("tiny", kernels=False, seed=0)
    ds = LlavaSupervisedDataset(load_llava_json(tmp_path / "d.json"), llava.tokenizer, "vicuna_v1",
                                llava.image_processor, llava.n_image_tokens, 512)
    assert ds.modality_lengths()[0] > 0 > ds.modality_lengths()[1]
    batch = collate([ds[0], ds[1]], llava.pad_token_id)
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    assert int((batch["input_ids"][0] == llava.config.image_token_id).sum()) == llava.n_image_tokens
    assert int((batch["input_ids"][1] == llava.config.image_token_id).sum()) == 0
    n1 = ds[1]["input_ids"].numel()
    assert batch["attention_mask"][1].tolist() == [1] * n1 + [0] * (batch["input_ids"].shape[1] - n1)
    assert (batch["labels"][1, n1:] == -100).all()
    assert torch.isfinite(llava.loss(batch))
    bad = [{**recs[1], "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}]
    ds_bad = LlavaSupervisedDataset(bad, llava.tokenizer, "vicuna_v1", llava.image_processor, llava.n_image_tokens, 512)
    with pytest.raises(ValueError, match="record 0 .*has no image"):
        ds_bad[0]
