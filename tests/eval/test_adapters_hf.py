"""The llava-hf adapter end to end, offline: a tiny random LLaVA built from configs and saved locally."""
import json

import pytest
import torch
from PIL import Image

from mmfast.eval import pope_poll
from mmfast.eval.adapters import LlavaHFAdapter, get_adapter

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:", "Is", "there", "a", "an", "dog",
         "apple", "in", "the", "image?", "Yes", "No", "yes", "no", "One", "word."]


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    ftok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    image_proc = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    proc = LlavaProcessor(image_processor=image_proc, tokenizer=ftok, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=16)
    text = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, pad_token_id=1, bos_token_id=2,
                       eos_token_id=3, max_position_embeddings=64)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=WORDS.index("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-1, pad_token_id=1)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    d = tmp_path_factory.mktemp("tiny_llava")
    model.save_pretrained(d)
    proc.save_pretrained(d)
    return d


def _images(n):
    g = torch.Generator().manual_seed(1)
    return [Image.fromarray(torch.randint(0, 256, (20 + i, 30, 3), generator=g, dtype=torch.uint8).numpy())
            for i in range(n)]


def test_llava_hf_adapter_matches_direct_generate(tiny_llava):
    adapter = get_adapter(tiny_llava, device="cpu", max_new_tokens=4)
    assert isinstance(adapter, LlavaHFAdapter) and adapter.kind == "llava-hf"
    images = _images(3)
    questions = ["Is there a dog in the image?", "Is there an apple in the image?", "Is there a dog"]
    batched = adapter(images, questions)
    assert len(batched) == 3 and all(isinstance(t, str) for t in batched)
    # Left padding: every row of a batch answers as it would alone.
    single = [adapter([im], [q])[0] for im, q in zip(images, questions)]
    assert batched == single
    # And the adapter's prompt/decoding equals calling transformers directly.
    proc, model = adapter.processor, adapter.model
    prompt = "USER: <image>\nIs there a dog in the image? ASSISTANT:"
    assert adapter.prompt("Is there a dog in the image?") == prompt
    inputs = proc(images=images[:1], text=[prompt], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    direct = proc.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    assert single[0] == direct


def test_poll_tiny_llava_hf_cli(tiny_llava, tmp_path, capsys):
    root = tmp_path / "images"
    root.mkdir()
    ann = []
    for i, im in enumerate(_images(4)):
        im.save(root / f"{i}.png")
        ann.append({"image": f"{i}.png", "objects": [["dog", "apple"], ["apple"], ["person", "car"], ["dog"]][i]})
    ann_file = tmp_path / "objects.jsonl"
    ann_file.write_text("".join(json.dumps(a) + "\n" for a in ann))
    argv = ["--model", str(tiny_llava), "--images", str(root), "--annotations", str(ann_file), "--num-images", "4",
            "--num-positive", "1", "--settings", "random", "--out", str(tmp_path / "run"), "--device", "cpu",
            "--max-new-tokens", "3", "--prompt-suffix", " One word."]
    assert pope_poll.main(argv) == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "answers_random.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and all(r["prompt"].endswith(" One word.") for r in lines)
    scores = json.loads((tmp_path / "run" / "scores.json").read_text())
    assert scores["adapter"] == "llava-hf" and scores["results"]["random"]["n"] == 8


@pytest.mark.gpu
def test_llava_hf_adapter_cuda_bf16(tiny_llava):
    adapter = get_adapter(tiny_llava, device="cuda", dtype="bfloat16", max_new_tokens=4)
    assert next(adapter.model.parameters()).dtype == torch.bfloat16
    assert next(adapter.model.parameters()).device.type == "cuda"
    out = adapter(_images(3), ["Is there a dog in the image?"] * 3)
    assert len(out) == 3 and all(isinstance(t, str) for t in out)
