"""mmfast.utils.io.safe_join: dataset-relative paths stay inside their root, resolved as Path.resolve does."""
from __future__ import annotations

import os

import pytest

from mmfast.utils.io import safe_join


def test_safe_join_resolves_inside_its_root_and_refuses_escapes(tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "imgs").mkdir(parents=True)
    (root / "imgs" / "a.png").write_bytes(b"x")
    outside = tmp_path / "secret"
    outside.mkdir()
    (root / "imgs" / "link").symlink_to(outside)  # a symlink inside the root that leaves it
    (root / "alias").symlink_to(root / "imgs")  # one that stays inside
    for rel in ("imgs/a.png", "imgs/./a.png", "imgs/../imgs/a.png", "alias/a.png", "imgs/missing.png", "."):
        got = safe_join(root, rel)
        assert got == (root / rel).resolve() and isinstance(got, os.PathLike)
    for rel, why in (("../secret/x.png", "escapes its root"), ("imgs/link/x.png", "escapes its root"),
                     ("imgs/../../secret", "escapes its root"), ("/etc/passwd", "is absolute"),
                     ("\\share\\x", "is absolute"), ("", "non-empty relative path")):
        with pytest.raises(ValueError, match=why):
            safe_join(root, rel, what="field 'image'")
    with pytest.raises(ValueError, match="non-empty relative path string, got None"):
        safe_join(root, None)
    # A root given relative to the working directory: resolved against the directory of each call.
    monkeypatch.chdir(tmp_path)
    assert safe_join("data", "imgs/a.png") == root / "imgs" / "a.png"
    monkeypatch.chdir(outside)
    os.makedirs("data/imgs")
    assert safe_join("data", "imgs/a.png") == outside / "data" / "imgs" / "a.png"
    # A root that is a prefix of its sibling's name does not admit the sibling.
    (tmp_path / "data2").mkdir()
    with pytest.raises(ValueError, match="escapes its root"):
        safe_join(root, "../data2/x.png")
