"""CLIP models: presets and open_clip configs build offline, exports reload exactly, zero-shot runs."""
import json

import pytest
import torch

pytest.importorskip("open_clip")

from mmfast.cli import main as cli_main
from mmfast.eval import zeroshot as zs
from mmfast.models.clip import model as mclip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mmfast.data.synthetic import make_world

    out = tmp_path_factory.mktemp("world")
    make_world(out, 40, 32, seed=3, media=False)
    return out


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return mclip.create_model("tiny", device="cpu", kernels=False).eval()


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    return mclip.save_pretrained(tiny, tmp_path_factory.mktemp("export") / "final")


def _embed(model):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 32, 32, generator=g)
    texts = mclip.get_tokenizer(model)(["a red star", "two cups and a car", "a photo of a fish"])
    with torch.no_grad():
        return model.encode_image(images, normalize=True), model.encode_text(texts, normalize=True)


def test_presets_and_open_clip_configs_are_listed():
    names = mclip.list_models()
    assert {"tiny", "tiny-siglip", "small"} <= set(mclip.list_presets())
    assert "ViT-B-16" in names and "RN50" in names
    cfg = mclip.model_config("tiny")
    assert cfg["vision_cfg"]["image_size"] == 32 and cfg["text_cfg"]["context_length"] <= 32


def test_tiny_forward_shapes_and_unit_norm(tiny):
    img, txt = _embed(tiny)
    assert img.shape == (3, 128) and txt.shape == (3, 128)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    assert tuple(tiny.visual.preprocess_cfg["size"]) == (32, 32)


def test_siglip_preset_has_logit_bias():
    m = mclip.create_model("tiny-siglip", device="cpu", kernels=False)
    assert m.logit_bias is not None and m.logit_bias.item() == -10.0


def test_export_reloads_with_identical_embeddings(tiny, exported):
    assert (exported / mclip.CONFIG_NAME).is_file() and (exported / mclip.WEIGHTS_NAME).is_file()
    again = mclip.create_model(None, pretrained=exported, device="cpu", kernels=False).eval()
    for a, b in zip(_embed(tiny), _embed(again)):
        assert torch.equal(a, b)
    assert again.mmfast_config["model_cfg"] == tiny.mmfast_config["model_cfg"]


def test_open_clip_reads_our_export(tiny, exported):
    import open_clip

    oc = open_clip.create_model(f"local-dir:{exported}", device="cpu").eval()
    for a, b in zip(_embed(tiny), _embed(oc)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["torch", "wrapped", "safetensors"])
def test_weights_file_formats_load(tiny, tmp_path, fmt):
    sd = tiny.state_dict()
    if fmt == "torch":
        path = tmp_path / "w.pt"
        torch.save(sd, path)
    elif fmt == "wrapped":  # open_clip training checkpoint saved from a DDP wrapper
        path = tmp_path / "epoch_1.pt"
        torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    again = mclip.create_model("tiny", pretrained=path, device="cpu", kernels=False).eval()
    for a, b in zip(_embed(tiny), _embed(again)):
        assert torch.equal(a, b)


def test_openai_torchscript_archive_loads(tmp_path):
    """OpenAI ships TorchScript archives; their state dict uses the same key names."""
    torch.manual_seed(0)
    model = mclip.create_model("tiny", device="cpu", kernels=False).eval()

    class Holder(torch.nn.Module):  # a scripted module carrying the CLIP parameters under OpenAI names
        def __init__(self, sd):
            super().__init__()
            for k, v in sd.items():
                self.register_buffer(k.replace(".", "__"), v.clone())

    holder = torch.jit.script(Holder(model.state_dict()))
    path = tmp_path / "openai.pt"
    holder.save(str(path))
    sd = {k.replace("__", "."): v for k, v in mclip.load_weights(path).items()}
    torch.save(sd, tmp_path / "converted.pt")
    again = mclip.create_model("tiny", pretrained=tmp_path / "converted.pt", device="cpu", kernels=False).eval()
    for a, b in zip(_embed(model), _embed(again)):
        assert torch.equal(a, b)


def test_bad_names_and_paths_give_clear_errors(tmp_path, tiny):
    with pytest.raises(ValueError, match="unknown CLIP model 'no-such-model'"):
        mclip.create_model("no-such-model", device="cpu")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        mclip.create_model("tiny", pretrained="laion2b_s34b_b88k", device="cpu")
    with pytest.raises(ValueError, match="pass the architecture name"):
        torch.save(tiny.state_dict(), tmp_path / "w.pt")
        mclip.create_model(None, pretrained=tmp_path / "w.pt", device="cpu")
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        mclip.create_model(None, pretrained=tmp_path, device="cpu")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / mclip.CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="malformed JSON"):
        mclip.create_model(None, pretrained=tmp_path / "bad", device="cpu")
    with pytest.raises(ValueError, match="does not match architecture"):
        mclip.create_model("small", pretrained=tmp_path / "w.pt", device="cpu")
    with pytest.raises(ValueError, match="precision"):
        mclip.create_model("tiny", device="cpu", precision="fp8")


def test_classifier_is_renormalised_template_mean(tiny):
    classes, templates = ["circle", "star"], ["a photo of a {}.", "a drawing of the {}.", "{}"]
    w = zs.zeroshot_classifier(tiny, classes, templates)
    tok = mclip.get_tokenizer(tiny)
    with torch.no_grad():
        e = tiny.encode_text(tok([t.format("star") for t in templates]), normalize=True)
    expected = e.mean(0) / e.mean(0).norm()
    torch.testing.assert_close(w[:, 1], expected)
    torch.testing.assert_close(w.norm(dim=0), torch.ones(2))


def test_templates_resolve_from_open_clip_metadata(tmp_path):
    assert len(zs.resolve_templates("openai_imagenet")) == 80
    assert len(zs.resolve_templates("simple")) == 7
    assert zs.resolve_templates("single") == ["a photo of a {}."]
    f = tmp_path / "t.txt"
    f.write_text("a {} icon\n\nthe {}\n")
    assert zs.resolve_templates(str(f)) == ["a {} icon", "the {}"]
    f.write_text("no placeholder\n")
    with pytest.raises(ValueError, match="containing"):
        zs.resolve_templates(str(f))
    with pytest.raises(FileNotFoundError, match="openai_imagenet"):
        zs.resolve_templates("nope")


def test_coco_fallback_labels_match_zeroshot_csv(world, tmp_path):
    files, labels, classes = zs.load_split(world, "val")
    import shutil

    copy = tmp_path / "w"
    shutil.copytree(world, copy)
    (copy / "zeroshot_val.csv").unlink()
    files2, labels2, classes2 = zs.load_split(copy, "val")
    assert classes2 == classes and labels2 == labels
    assert [f.name for f in files2] == [f.name for f in files]


def test_zeroshot_cli_matches_manual_computation(world, exported, tiny, capsys, tmp_path):
    out = tmp_path / "zs.json"
    rc = cli_main(["eval", "zeroshot", "--model", str(exported), "--data", str(world), "--templates", "single",
                   "--device", "cpu", "--out", str(out)])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == json.loads(out.read_text())
    files, labels, classes = zs.load_split(world, "val")
    feats = zs.image_features(tiny, files)
    w = zs.zeroshot_classifier(tiny, classes, ["a photo of a {}."])
    manual = ((feats @ w).argmax(1) == torch.tensor(labels)).float().mean().item()
    assert result["top1"] == pytest.approx(manual)
    assert result["n"] == len(files) and result["templates"] == 1 and result["top1"] <= result["top5"]


def test_linear_probe_cli_runs(world, exported, capsys):
    rc = cli_main(["eval", "linear-probe", "--model", str(exported), "--data", str(world), "--device", "cpu"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0 and result["n"] == 8 and result["n_train"] == 32


def test_zeroshot_cli_bad_inputs(world, exported, tmp_path, capsys):
    assert cli_main(["eval", "zeroshot", "--model", str(tmp_path / "missing"), "--data", str(world)]) == 2
    assert "not a local file or directory" in capsys.readouterr().err
    assert cli_main(["eval", "zeroshot", "--model", str(exported), "--data", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert cli_main(["eval", "zeroshot", "--model", str(exported), "--data", str(world), "--templates", "x"]) == 2
    assert "--templates" in capsys.readouterr().err
