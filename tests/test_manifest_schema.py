"""The manifest schema (`recframe.checkpoint.manifest`) on hand-made manifests: what is
accepted, what is a `CheckpointCorruptError` naming the entry."""

from __future__ import annotations

import json

import pytest

from recframe.checkpoint import CheckpointCorruptError
from recframe.checkpoint.manifest import (
    FORMAT_VERSION,
    MAX_DEPTH,
    CheckpointVersionError,
    encode_manifest,
    parse_manifest,
)


def _manifest(**extra) -> dict:
    return {
        "format": "recframe.checkpoint",
        "name": "ckpt_3",
        "step": 3,
        "world_size": 1,
        "created_unix": 1.5,
        "metrics": {"auc": 0.5},
        "files": {"data-r00000-000.bin": {"size": 32, "crc32": [7], "rank": 0}},
        "tensors": {"sparse.w": {"dtype": "float32", "shape": [2, 4], "shards": [{
            "offsets": [0, 0], "sizes": [2, 4], "chunks": [{
                "file": "data-r00000-000.bin", "offset": 0, "nbytes": 32, "rows": [0, 2],
                "crc32": 7}]}]}},
        "parts": {"sparse": {"d": [["w", {"t": "sparse.w"}]]},
                  "extra": {"d": [["note", 'a string with ]]]} and \\" and {{']]},
                  "io_state": {"0": {"d": []}}},
        **extra,
    }


def _parse(manifest: dict) -> dict:
    return parse_manifest(encode_manifest(manifest), "/run/ckpt_3/manifest.json")


def test_a_valid_manifest_round_trips_with_run_id_and_checksum():
    raw = encode_manifest(_manifest(run_id="job-42"))
    on_disk = json.loads(raw)
    assert on_disk["format_version"] == FORMAT_VERSION and len(on_disk["manifest_sha256"]) == 64
    parsed = parse_manifest(raw, "m")
    assert parsed["run_id"] == "job-42" and parsed["metrics"] == {"auc": 0.5}


@pytest.mark.parametrize("edit, entry", [
    (lambda m: m.update(run_id=5), "run_id"),
    (lambda m: m["files"].update({"../x.bin": {"size": 1}}), "../x.bin"),
    (lambda m: m["files"].update({".hidden": {"size": 1}}), ".hidden"),
    (lambda m: m["tensors"]["sparse.w"]["shards"][0]["chunks"][0].update(nbytes=31),
     "nbytes 31"),
    (lambda m: m["tensors"]["sparse.w"]["shards"][0].update(offsets=[1, 0]), "exceed"),
    (lambda m: m["tensors"]["sparse.w"]["shards"][0]["chunks"][0].update(crc32=1 << 33),
     "crc32"),
    (lambda m: m["tensors"]["sparse.w"]["shards"][0]["chunks"][0].update(rows=[0, True]),
     "rows"),
    (lambda m: m.update(incremental={"kind": "delta", "chain": ["/etc", "ckpt_3"]}), "/etc"),
    (lambda m: m.update(incremental={"kind": "delta", "chain": ["ckpt_3"]}), "base"),
    (lambda m: m.update(incremental={"kind": "other", "chain": ["ckpt_3"]}), "kind"),
    (lambda m: m["metrics"].update(auc=[1]), "auc"),
    (lambda m: m["parts"]["io_state"].update(x={"d": []}), "rank"),
    (lambda m: m["parts"].update(extra={"f": "not a number"}), "not a number"),
    (lambda m: m["parts"].update(extra={"b": "%%%"}), "base64"),
])
def test_violations_name_the_entry(edit, entry):
    manifest = _manifest()
    edit(manifest)
    with pytest.raises(CheckpointCorruptError, match="ckpt_3/manifest.json") as info:
        _parse(manifest)
    assert entry in str(info.value)


def test_depth_is_bounded_outside_strings_only():
    deep = _manifest()
    node: dict = {"l": []}
    deep["parts"]["extra"] = node
    for _ in range(MAX_DEPTH):
        node["l"].append({"l": []})
        node = node["l"][0]
    with pytest.raises(CheckpointCorruptError, match="nested deeper"):
        _parse(deep)
    # brackets inside strings (and escaped quotes) do not count
    text = _manifest()
    text["parts"]["extra"] = {"d": [["s", "[" * 10_000 + '\\"' + "{" * 10_000]]}
    assert _parse(text)["parts"]["extra"]["d"][0][1].startswith("[[[")


def test_bare_nan_is_not_json_and_nan_metrics_are_strings():
    raw = encode_manifest(_manifest(metrics={"auc": float("nan"), "x": float("-inf")}))
    assert b"NaN" not in raw and b"Infinity" not in raw
    parsed = parse_manifest(raw, "m")
    assert parsed["metrics"]["x"] == float("-inf")
    bad = raw.replace(b'"created_unix": 1.5', b'"created_unix": NaN')
    with pytest.raises(CheckpointCorruptError, match="NaN"):
        parse_manifest(bad, "m")
    with pytest.raises(ValueError, match="strict JSON"):
        encode_manifest(_manifest(created_unix=float("nan")))


def test_newer_versions_are_refused_and_version_1_needs_no_checksum():
    manifest = _manifest(format_version=FORMAT_VERSION + 1)
    with pytest.raises(CheckpointVersionError, match=f"{FORMAT_VERSION + 1}.*{FORMAT_VERSION}"):
        parse_manifest(json.dumps(manifest).encode(), "m")
    old = _manifest(format_version=1)
    assert parse_manifest(json.dumps(old).encode(), "m")["step"] == 3
    with pytest.raises(CheckpointCorruptError, match="manifest_sha256"):
        parse_manifest(json.dumps(_manifest(format_version=2)).encode(), "m")
