"""mmfast demo: stage table and the merged, atomic summary file."""
import json

from mmfast import demo


def test_stages_are_a_list_other_parts_can_extend():
    names = [s.name for s in demo.STAGES]
    assert names[:3] == ["clip_world", "clip_train", "clip_eval"]
    assert all(callable(s.run) for s in demo.STAGES)


def test_summary_merges_with_existing_keys(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"llava_pope_f1": 0.7, "clip_zeroshot_top1": 0.1}))
    merged = demo.write_summary(path, {"clip_zeroshot_top1": 0.6, "clip_train_seconds": 12.0})
    assert merged == {"llava_pope_f1": 0.7, "clip_zeroshot_top1": 0.6, "clip_train_seconds": 12.0}
    assert json.loads(path.read_text()) == merged
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left behind
    path.write_text("{truncated")
    assert demo.write_summary(path, {"a": 1}) == {"a": 1}


def test_only_selected_stages_run(tmp_path, monkeypatch, capsys):
    calls = []
    stages = [demo.Stage("one", lambda ctx: calls.append("one") or {"k1": 1}),
              demo.Stage("two", lambda ctx: calls.append("two") or {"k2": 2})]
    monkeypatch.setattr(demo, "STAGES", stages)
    assert demo.main(["--out", str(tmp_path), "--only", "two"]) == 0
    assert calls == ["two"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["k2"] == 2 and "k1" not in summary and "demo_seconds" in summary
    assert demo.main(["--out", str(tmp_path), "--only", "three"]) == 2
    assert "unknown stage" in capsys.readouterr().err
