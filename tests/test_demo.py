"""The quickstart job: runs every method given, sets them against full, prints and writes what it says."""

from __future__ import annotations

import json

import pytest

from kvtier import demo


@pytest.mark.embedded
def test_demo_runs_methods_side_by_side(embedded, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "load", lambda *a, **k: embedded)
    out = tmp_path / "demo.json"
    result = demo.run(methods="offload,freekv:budget=384", context_tokens=700, max_new_tokens=6, out=str(out),
                      progress=False)
    labels = [r["method"] for r in result["rows"]]
    assert labels == ["full", "offload", "freekv:budget=384"], "full is added first as the baseline"
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["offload"]["same_tokens_as_full"] is True
    assert rows["offload"]["h2d_bytes"] > 0 and rows["full"]["h2d_bytes"] == 0
    assert rows["freekv:budget=384"]["device_kv_bytes"] < rows["full"]["device_kv_bytes"]
    assert json.loads(out.read_text())["rows"][2]["options"] == {"budget": 384}
    table = demo.format_table(result)
    for label in labels:
        assert label in table
    assert "not a speed result" in table


def test_demo_rejects_unknown_methods():
    with pytest.raises(ValueError, match="unknown method"):
        demo.run(methods="full,nope")
