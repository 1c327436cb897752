"""Tests of recframe.schema: the feature schema, its YAML form, the id mappings (stable
hash), and the models built from a schema."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recframe.schema import (
    DenseColumn,
    FeatureSchema,
    IdMapping,
    SparseColumn,
    TableSpec,
    fnv1a64,
    hash_strings,
    parse_hex,
)

M64 = (1 << 64) - 1


def _ref_hash(text: str, salt: int = 0) -> int:
    """The documented hash, written out in plain Python."""
    h = 0xCBF29CE484222325
    for byte in text.encode("utf-8"):
        h = ((h ^ byte) * 0x100000001B3) & M64
    x = h ^ salt
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def _schema() -> FeatureSchema:
    return FeatureSchema(
        labels=["click"],
        weight="w",
        dense=[DenseColumn("age", transform="standardize", mean=30, std=10, fill=30),
               DenseColumn("count", transform="log1p")],
        sparse=[SparseColumn("user", mapping=IdMapping("hash", salt=7)),
                SparseColumn("item", table="item_table"),
                SparseColumn("history", table="item_table", delimiter="|")],
        tables=[TableSpec("user", 1000, 8), TableSpec("item_table", 500, 8)],
        columns=["click", "w", "age", "count", "user", "item", "history"],
    )


def test_fnv1a64_known_vectors() -> None:
    """The published FNV-1a 64 test vectors."""
    words = [b"", b"a", b"foobar"]
    data = np.frombuffer(b"".join(words), dtype=np.uint8)
    starts = np.array([0, 0, 1])
    lengths = np.array([0, 1, 6])
    got = fnv1a64(data, starts, lengths)
    assert [int(x) for x in got] == [0xCBF29CE484222325, 0xAF63DC4C8601EC8C, 0x85944171F73967E8]


def test_hash_strings_matches_the_documented_formula_and_is_pinned() -> None:
    words = ["", "a", "user_42", "ünïcödé", "x" * 300, "🙂"]
    for salt in (0, 7, (1 << 64) - 1):
        got = hash_strings(words, salt)
        assert [int(x) for x in got] == [_ref_hash(w, salt) for w in words]
    # pinned (also quoted in docs/data.md): a release that changes the mapping fails here
    assert [int(x) for x in hash_strings(["a", "user_42"])] == [
        0x02C0BDBF481420F8, 0x7EDD45A9F7249CA7]


def test_parse_hex_matches_int() -> None:
    words = [b"0", b"ff", b"DEADbeef", b"ffffffffffffffff", b"", b"12g4", b"1" * 17]
    data = np.frombuffer(b"".join(words), dtype=np.uint8)
    lengths = np.array([len(w) for w in words])
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    value, ok = parse_hex(data, starts, lengths)
    assert ok.tolist() == [True, True, True, True, False, False, False]
    assert [int(v) for v in value[:4]] == [0, 255, 0xDEADBEEF, (1 << 64) - 1]


def test_schema_round_trips_through_yaml_and_json(tmp_path) -> None:
    schema = _schema()
    for name in ("s.yaml", "s.json"):
        schema.save(str(tmp_path / name))
        again = FeatureSchema.from_file(str(tmp_path / name))
        assert again == schema
        assert again.to_dict() == schema.to_dict()
    assert FeatureSchema.from_dict(schema.to_dict()).sparse[0].mapping == IdMapping("hash", 7)


def test_yaml_short_forms(tmp_path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        "labels: label\n"
        "dense: [a, {name: b, transform: log1p}]\n"
        "sparse: [{name: u, mapping: hash}, v]\n"
        "default_num_embeddings: 100\n"
        "default_embedding_dim: 4\n"
    )
    schema = FeatureSchema.from_file(str(path))
    assert schema.labels == ["label"]
    assert schema.dense_names == ["a", "b"] and schema.dense[1].transform == "log1p"
    assert schema.sparse[0].mapping.kind == "hash"
    assert [(t.name, t.num_embeddings, t.embedding_dim) for t in schema.tables] == [
        ("u", 100, 4), ("v", 100, 4)]


@pytest.mark.parametrize("values,needle", [
    ({"sparse": ["u"], "bogus": 1}, "unknown field(s) ['bogus']"),
    ({"sparse": ["u"]}, "uses table 'u', which is not in tables"),
    ({"sparse": ["u"], "default_num_embeddings": 5, "dense": [{"name": "u"}]},
     "used more than once"),
    ({"sparse": [{"name": "u", "mapping": "md5"}], "default_num_embeddings": 5},
     "kind must be one of"),
    ({"sparse": ["u"], "default_num_embeddings": 5, "dense": [{"name": "d", "transform": "x"}]},
     "transform must be one of"),
    ({"sparse": ["u"], "default_num_embeddings": 5, "columns": ["label"]},
     "columns does not list ['u']"),
    ({"sparse": ["u"], "tables": [{"name": "u", "num_embeddings": 0}]}, "num_embeddings"),
    ({"sparse": ["u"], "default_num_embeddings": 5,
      "tables": [{"name": "zz", "num_embeddings": 3}]}, "used by no sparse column"),
])
def test_bad_schemas_name_the_problem(values, needle) -> None:
    with pytest.raises(ValueError) as info:
        FeatureSchema.from_dict(values)
    assert needle in str(info.value)


def test_schema_file_errors_name_the_file(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("sparse: [u]\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        FeatureSchema.from_file(str(path))


def test_criteo_preset() -> None:
    schema = FeatureSchema.criteo(num_embeddings=100, embedding_dim=4)
    assert len(schema.columns) == 40 and schema.columns[0] == "label"
    assert schema.feature_names[0] == "cat_0" and len(schema.tables) == 26
    assert all(c.mapping.kind == "hex" for c in schema.sparse)
    assert all(d.transform == "log1p" for d in schema.dense)


# --------------------------------------------------------------------------- models


def _batch(schema: FeatureSchema, b: int = 4):
    from recframe.data import make_kjt

    keys = schema.feature_names
    lengths = torch.tensor([[1] * b, [1] * b, [2, 0, 1, 3]])
    values = torch.randint(0, 500, (int(lengths.sum()),))
    kjt = make_kjt(keys, values, lengths)
    from recframe.readers import WeightedBatch

    return WeightedBatch(torch.randn(b, len(schema.dense)), kjt, torch.tensor([0., 1, 1, 0]),
                         torch.tensor([1., 2, 0, 1]))


@pytest.mark.parametrize("name", ["dlrm", "deepfm"])
def test_models_build_their_tables_from_the_schema(name) -> None:
    from recframe.models import build_model

    schema = _schema()
    model = build_model(name, schema=schema, **({"dense_arch": (8, 8)} if name == "dlrm" else {}))
    configs = {c.name: c for c in model.ebc.embedding_bag_configs()}
    assert set(configs) == {"user", "item_table"}
    assert configs["item_table"].feature_names == ["item", "history"]  # one shared table
    assert configs["user"].num_embeddings == 1000 and configs["item_table"].embedding_dim == 8
    assert model.num_dense == 2
    batch = _batch(schema)
    loss = model(batch)
    loss.backward()
    # the weighted mean: zero-weight samples do not count
    logits = model.logits(batch).detach()
    per = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels,
                                                               reduction="none")
    assert torch.allclose(loss.detach(), (per * batch.weights).sum() / batch.weights.sum())


def test_models_refuse_table_arguments_beside_a_schema() -> None:
    from recframe.models import DLRM

    with pytest.raises(ValueError, match="come from the schema"):
        DLRM(schema=_schema(), num_embeddings=10)
    clash = _schema()
    clash.tables[1].name = clash.sparse[1].table = clash.sparse[2].table = "items"
    with pytest.raises(ValueError, match="table name 'items'"):
        DLRM(schema=clash)
    mixed = _schema()
    mixed.tables[0].embedding_dim = 4
    with pytest.raises(ValueError, match="one embedding_dim"):
        DLRM(schema=mixed)
