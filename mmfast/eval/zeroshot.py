"""Zero-shot classification with prompt ensembling, and a linear probe, for CLIP models.

Zero-shot (Radford et al. 2021, §3.1.4): for class c and templates t_1..t_K, the classifier row is
``w_c = normalize(mean_k normalize(f_text(t_k(c))))``; an image is assigned ``argmax_c <f_img(x), w_c>``.
Templates come from open_clip's metadata (``openai_imagenet``: 80 prompts, ``simple``: 7),
``single`` ("a photo of a {}.") or a text file with one template per line containing ``{}``.

Linear probe: L2-regularised logistic regression (scikit-learn) on frozen, normalised image features;
C is picked on a held-out fifth of the training split, then refit on all of it.

Data folder layouts (``--data DIR``):
* the synthetic world: ``classes.json`` + ``zeroshot_{split}.csv`` (``filepath,label``), or else the
  COCO file ``annotations/instances_{split}.json``, labelling each image by its largest object;
* an image folder: ``DIR/{split}/CLASS/*.png`` (or ``DIR/CLASS/*`` when there is no split folder).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

from mmfast.utils.io import atomic_write_json, safe_join

SINGLE_TEMPLATE = "a photo of a {}."
_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


# --------------------------------------------------------------------------- data
def _read_classes(root: Path) -> list[str]:
    path = root / "classes.json"
    try:
        classes = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from e
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{path}: expected a non-empty JSON list of class names")
    return classes


def _from_zeroshot_csv(root: Path, path: Path, n_classes: int) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"filepath", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: header must name 'filepath' and 'label', got {reader.fieldnames}")
        for row in reader:
            try:
                label = int(row["label"])
            except (TypeError, ValueError):
                raise ValueError(f"{path} line {reader.line_num}: label {row['label']!r} is not an integer") from None
            if not 0 <= label < n_classes:
                raise ValueError(f"{path} line {reader.line_num}: label {label} outside 0..{n_classes - 1}")
            files.append(safe_join(root, row["filepath"], what=f"{path} line {reader.line_num} filepath"))
            labels.append(label)
    return files, labels


def _from_coco(root: Path, path: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """Label = category of the largest-area annotation of each image (images without one are skipped)."""
    from mmfast.utils.io import read_json

    coco = read_json(path)
    cat_name = {c["id"]: c["name"] for c in coco.get("categories", [])}
    best: dict[int, tuple[float, int]] = {}
    for a in coco.get("annotations", []):
        area = float(a.get("area", 0.0))
        if a["image_id"] not in best or area > best[a["image_id"]][0]:
            best[a["image_id"]] = (area, a["category_id"])
    files, labels = [], []
    for img in coco.get("images", []):
        if img["id"] not in best:
            continue
        name = cat_name.get(best[img["id"]][1])
        if name not in classes:
            raise ValueError(f"{path}: category {name!r} is not in classes.json")
        files.append(safe_join(root, img["file_name"], what=f"{path} file_name"))
        labels.append(classes.index(name))
    return files, labels


def load_split(data_dir: str | Path, split: str = "val") -> tuple[list[Path], list[int], list[str]]:
    """(image paths, integer labels, class names) of one split; see the module docstring for layouts."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: not a folder")
    if (root / "classes.json").is_file():
        classes = _read_classes(root)
        zs, coco = root / f"zeroshot_{split}.csv", root / "annotations" / f"instances_{split}.json"
        if zs.is_file():
            files, labels = _from_zeroshot_csv(root, zs, len(classes))
        elif coco.is_file():
            files, labels = _from_coco(root, coco, classes)
        else:
            raise FileNotFoundError(f"{root} has classes.json but neither {zs.name} nor annotations/{coco.name}")
    else:
        folder = root / split if (root / split).is_dir() else root
        classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
        if not classes:
            raise FileNotFoundError(
                f"{root}: expected classes.json + zeroshot_{split}.csv (synthetic world) or class sub-folders"
            )
        files, labels = [], []
        for k, c in enumerate(classes):
            for f in sorted((folder / c).iterdir()):
                if f.suffix.lower() in _IMAGE_EXTS:
                    files.append(f)
                    labels.append(k)
    if not files:
        raise ValueError(f"{root}: split {split!r} has no labelled images")
    return files, labels, classes


def resolve_templates(spec: str) -> list[str]:
    """``openai_imagenet`` | ``simple`` | ``single`` | a text file of templates with ``{}``."""
    if spec in ("openai_imagenet", "openai", "simple"):
        from open_clip import zero_shot_metadata as zm

        fns = zm.SIMPLE_IMAGENET_TEMPLATES if spec == "simple" else zm.OPENAI_IMAGENET_TEMPLATES
        return [fn("{}") for fn in fns]
    if spec == "single":
        return [SINGLE_TEMPLATE]
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--templates {spec!r}: expected openai_imagenet, simple, single or a template file")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    bad = [ln for ln in lines if "{}" not in ln]
    if not lines or bad:
        raise ValueError(f"{path}: every non-empty line must be a template containing '{{}}' (bad: {bad[:3]})")
    return lines


# --------------------------------------------------------------------------- features
def _load_model(model_path: str, arch: str | None, device: str, kernels: bool = False):
    from mmfast.models.clip.model import create_model

    model = create_model(arch, pretrained=model_path, device=device, kernels=kernels)
    model.eval()
    return model


@torch.no_grad()
def image_features(model, files: list[Path], batch_size: int = 256, device: str = "cpu") -> torch.Tensor:
    """Normalised image embeddings (N, E) with the model's eval transform (batched, with a progress bar and
    images/s in the log: :func:`mmfast.models.clip.encode.encode_images`)."""
    from mmfast.models.clip.encode import encode_images

    return encode_images(model, list(files), batch_size=batch_size, device=device)


@torch.no_grad()
def zeroshot_classifier(model, classes: list[str], templates: list[str], device: str = "cpu") -> torch.Tensor:
    """(E, C): per class, the mean of the normalised template embeddings, renormalised."""
    from mmfast.models.clip.encode import encode_texts

    prompts = [t.format(c) for c in classes for t in templates]
    emb = encode_texts(model, prompts, device=device).reshape(len(classes), len(templates), -1)  # (C, K, E)
    w = emb.mean(1)
    return (w / w.norm(dim=-1, keepdim=True)).T


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    res = {}
    for k in ks:
        k_eff = min(k, logits.shape[1])
        hit = (logits.topk(k_eff, dim=1).indices == labels[:, None]).any(1)
        res[f"top{k}"] = hit.float().mean().item()
    return res


def zeroshot_eval(model, data_dir, templates="openai_imagenet", split="val", batch_size=256, device="cpu",
                  limit: int | None = None) -> dict:
    """Zero-shot top-1/top-5 of ``model`` on a split; ``templates`` is a spec or a list of templates."""
    files, labels, classes = load_split(data_dir, split)
    if limit:
        files, labels = files[:limit], labels[:limit]
    tmpl = resolve_templates(templates) if isinstance(templates, str) else list(templates)
    feats = image_features(model, files, batch_size, device)  # (N, E)
    w = zeroshot_classifier(model, classes, tmpl, device)  # (E, C)
    acc = topk_accuracy(feats @ w, torch.tensor(labels, device=feats.device))
    return {**acc, "n": len(files), "classes": len(classes), "templates": len(tmpl)}


def linear_probe(model, data_dir, train_split="train", eval_split="val", batch_size=256, device="cpu",
                 limit: int | None = None, seed: int = 0) -> dict:
    """Logistic regression on frozen features: C chosen on a held-out fifth of train, refit on all."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    tr_files, tr_y, classes = load_split(data_dir, train_split)
    ev_files, ev_y, _ = load_split(data_dir, eval_split)
    if limit:
        tr_files, tr_y, ev_files, ev_y = tr_files[:limit], tr_y[:limit], ev_files[:limit], ev_y[:limit]
    xtr = image_features(model, tr_files, batch_size, device).cpu().numpy()
    xev = image_features(model, ev_files, batch_size, device).cpu().numpy()
    ytr, yev = np.asarray(tr_y), np.asarray(ev_y)
    perm = np.random.default_rng(seed).permutation(len(ytr))
    n_hold = max(1, len(ytr) // 5)
    hold, fit = perm[:n_hold], perm[n_hold:]
    best_c, best_acc = 1.0, -1.0
    for c in (0.1, 1.0, 10.0, 100.0):
        clf = LogisticRegression(C=c, max_iter=1000).fit(xtr[fit], ytr[fit])
        acc = float((clf.predict(xtr[hold]) == ytr[hold]).mean())
        if acc > best_acc:
            best_c, best_acc = c, acc
    clf = LogisticRegression(C=best_c, max_iter=1000).fit(xtr, ytr)
    proba = torch.from_numpy(clf.predict_proba(xev))
    # predict_proba columns follow clf.classes_, which may omit classes absent from train.
    logits = torch.full((len(yev), len(classes)), -1.0, dtype=proba.dtype)
    logits[:, torch.from_numpy(clf.classes_).long()] = proba
    return {**topk_accuracy(logits, torch.from_numpy(yev)), "n_train": len(ytr), "n": len(yev), "C": best_c}


# --------------------------------------------------------------------------- CLI
def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="exported model folder or weights file (with --arch)")
    p.add_argument("--arch", default=None, help="architecture name when --model is a weights file")
    p.add_argument("--data", required=True, help="dataset folder (see module docstring)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images of each split")
    p.add_argument("--out", default=None, help="also write the result as JSON here")


def _device(d: str | None) -> str:
    return d or ("cuda" if torch.cuda.is_available() else "cpu")


def _finish(name: str, result: dict, out: str | None) -> int:
    print(json.dumps(result))
    if out:
        atomic_write_json(out, result)
    return 0


def _run(a: argparse.Namespace, cmd: str, evaluate) -> int:
    """``mmfast eval <cmd>``: load the model, ``evaluate(model, device)``, print (and write) the result
    with the seconds it took; status 2 (after saying why) on a missing file or a bad value."""
    dev = _device(a.device)
    try:
        t0 = time.perf_counter()
        model = _load_model(a.model, a.arch, dev)
        result = evaluate(model, dev)
    except (FileNotFoundError, ValueError) as e:
        print(f"mmfast eval {cmd}: {e}", file=sys.stderr)
        return 2
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return _finish(cmd, result, a.out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmfast eval zeroshot", description="zero-shot classification with prompt ensembling")
    _common_args(p)
    p.add_argument("--split", default="val")
    p.add_argument("--templates", default="openai_imagenet", help="openai_imagenet | simple | single | FILE")
    a = p.parse_args(argv)
    return _run(a, "zeroshot",
                lambda model, dev: zeroshot_eval(model, a.data, a.templates, a.split, a.batch_size, dev, a.limit))


def linear_probe_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmfast eval linear-probe", description="logistic regression on frozen image features")
    _common_args(p)
    p.add_argument("--train-split", default="train")
    p.add_argument("--split", default="val", help="evaluation split")
    a = p.parse_args(argv)
    return _run(a, "linear-probe",
                lambda model, dev: linear_probe(model, a.data, a.train_split, a.split, a.batch_size, dev, a.limit))
