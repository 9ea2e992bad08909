"""The on-disk dataset format: round trip, lazy reading, atomic writing, clear errors."""
from __future__ import annotations

import json
import os

import pytest
import torch

from tmd_train.data import format as fmt
from tmd_train.data.format import DatasetFormatError, DatasetWriter, LatentDataset, load_negative, read_index

L, D = 5, 7
SHAPE = (3, 2, 4, 6)


def _batch(n: int, g: torch.Generator, kind: str = "latents") -> dict[str, torch.Tensor]:
    out = {"text_emb": torch.randn(n, L, D, generator=g), "text_mask": torch.rand(n, L, generator=g) < 0.7}
    for k in fmt.KIND_TENSORS[kind]:
        out[k] = torch.randn(n, *SHAPE, generator=g)
    return out


def _write(folder, n, g, kind="latents", shard_size=4, **kw):
    data = _batch(n, g, kind)
    prompts = [f"prompt {i}" for i in range(n)]
    neg = (torch.randn(L, D, generator=g), torch.zeros(L, dtype=torch.bool))
    with DatasetWriter(folder, kind=kind, shard_size=shard_size, **kw) as w:
        w.set_negative(*neg)
        # mixed add / add_batch, crossing shard boundaries
        w.add(prompts[0], **{k: v[0] for k, v in data.items()})
        w.add_batch(prompts[1:], **{k: v[1:] for k, v in data.items()})
    return data, prompts, neg


@pytest.mark.parametrize("kind", ["latents", "kd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_round_trip(tmp_path, gen, kind, dtype):
    n = 11
    folder = tmp_path / "ds"
    data, prompts, neg = _write(folder, n, gen, kind=kind, dtype=dtype, teacher_config={"dim": 64, "layers": 2},
                                metadata={"source": "test"})
    index = read_index(folder)
    assert index["num_samples"] == n and index["kind"] == kind
    assert [s["num_samples"] for s in index["shards"]] == [4, 4, 3]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["index.json", "prompts.jsonl", "negative.safetensors"] + [f"shard-{i:05d}.safetensors" for i in range(3)])
    assert not list(tmp_path.glob(".ds*")), "no temporary folder may remain"

    ds = LatentDataset(folder)
    assert len(ds) == n and ds.kind == kind
    assert ds.teacher_config == {"dim": 64, "layers": 2} and ds.metadata == {"source": "test"}
    assert ds.prompts == prompts
    for i in [0, 3, 4, 7, 8, 10, -1]:
        item = ds[i]
        j = i % n
        assert item["prompt"] == prompts[j] and item["index"] == j
        assert set(item) == set(fmt.KIND_TENSORS[kind]) | {"text_emb", "text_mask", "prompt", "index"}
        for k in fmt.KIND_TENSORS[kind] + ("text_emb",):
            assert item[k].dtype == dtype and item[k].shape == data[k].shape[1:]
            torch.testing.assert_close(item[k], data[k][j].to(dtype), atol=0, rtol=0)
        assert item["text_mask"].dtype == torch.bool and torch.equal(item["text_mask"], data["text_mask"][j])
    emb, mask = load_negative(folder)
    torch.testing.assert_close(emb, neg[0].to(dtype), atol=0, rtol=0)
    assert mask.dtype == torch.bool and torch.equal(mask, neg[1])
    with pytest.raises(IndexError):
        ds[n]

    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)
    batch = next(iter(loader))
    assert batch["text_emb"].shape == (4, L, D) and batch["prompt"] == prompts[:4]


def test_lazy_reading(tmp_path, gen, monkeypatch):
    folder = tmp_path / "ds"
    _write(folder, 12, gen, shard_size=3)
    opened = []
    real_open = fmt.safe_open

    def spy(path, *args, **kwargs):
        opened.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(fmt, "safe_open", spy)
    ds = LatentDataset(folder)
    assert opened == [], "opening a dataset must not open shards"
    ds[7]
    ds[6]
    assert [p.split("/")[-1] for p in opened] == ["shard-00002.safetensors"]
    ds[0]
    assert len(opened) == 2
    # pickling (DataLoader workers) drops the open handles
    import pickle
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._handles == {} and torch.equal(clone[7]["latents"], ds[7]["latents"])


def test_writer_validation(tmp_path, gen):
    folder = tmp_path / "ds"
    data = _batch(2, gen)
    with pytest.raises(ValueError, match="kind"):
        DatasetWriter(folder, kind="pixels")
    with pytest.raises(ValueError, match="shard_size"):
        DatasetWriter(folder, shard_size=0)
    w = DatasetWriter(folder)
    with pytest.raises(ValueError, match="missing \\['latents'\\]"):
        w.add_batch(["a", "b"], text_emb=data["text_emb"], text_mask=data["text_mask"])
    with pytest.raises(ValueError, match="text_mask must be bool"):
        w.add_batch(["a", "b"], **(data | {"text_mask": data["text_mask"].float()}))
    with pytest.raises(ValueError, match="leading dim 3"):
        w.add_batch(["a", "b", "c"], **data)
    with pytest.raises(ValueError, match="latents must be \\[n, C, F, H, W\\]"):
        w.add_batch(["a", "b"], **(data | {"latents": data["latents"][:, 0]}))
    with pytest.raises(ValueError, match="non-finite"):
        w.add_batch(["a", "b"], **(data | {"latents": data["latents"] * float("nan")}))
    w.add_batch(["a", "b"], **data)
    with pytest.raises(ValueError, match="per-sample shapes"):
        w.add_batch(["a", "b"], **(data | {"latents": torch.randn(2, 3, 2, 4, 5, generator=gen)}))
    with pytest.raises(ValueError, match="set_negative"):
        w.close()
    assert not folder.exists() and not list(tmp_path.iterdir()), "a failed close leaves nothing behind"


def test_exception_in_with_block_leaves_nothing(tmp_path, gen):
    folder = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="boom"), DatasetWriter(folder) as w:
        w.set_negative(torch.randn(L, D, generator=gen), torch.ones(L, dtype=torch.bool))
        w.add_batch(["a", "b"], **_batch(2, gen))
        raise RuntimeError("boom")
    assert not list(tmp_path.iterdir())


def test_existing_folder(tmp_path, gen):
    folder = tmp_path / "ds"
    _write(folder, 3, gen)
    with pytest.raises(FileExistsError, match="overwrite"):
        DatasetWriter(folder)
    data, prompts, _ = _write(folder, 5, gen, overwrite=True)
    ds = LatentDataset(folder)
    assert len(ds) == 5 and ds.prompts == prompts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_reader_errors(tmp_path, gen):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LatentDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no index.json"):
        LatentDataset(tmp_path / "empty")

    folder = tmp_path / "ds"
    _write(folder, 6, gen, shard_size=3)
    index_path = folder / "index.json"
    good = json.loads(index_path.read_text())

    def with_index(obj_or_text):
        index_path.write_text(obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text))

    with_index('{"format": "tmd-dataset", ')
    with pytest.raises(DatasetFormatError, match="corrupt"):
        LatentDataset(folder)
    with_index(good | {"format_version": 99})
    with pytest.raises(DatasetFormatError, match="format_version 99"):
        LatentDataset(folder)
    with_index(good | {"format": "other"})
    with pytest.raises(DatasetFormatError, match="not a 'tmd-dataset'"):
        LatentDataset(folder)
    with_index({k: v for k, v in good.items() if k != "shards"})
    with pytest.raises(DatasetFormatError, match="missing field 'shards'"):
        LatentDataset(folder)
    with_index(good | {"num_samples": 7})
    with pytest.raises(DatasetFormatError, match="shards hold 6"):
        LatentDataset(folder)
    with_index(good | {"kind": "kd"})
    with pytest.raises(DatasetFormatError, match="needs tensors"):
        LatentDataset(folder)
    with_index(good)
    assert len(LatentDataset(folder)) == 6

    (folder / "prompts.jsonl").write_text('{"id": 0, "prompt": "x"}\n')
    with pytest.raises(DatasetFormatError, match="1 prompts"):
        LatentDataset(folder)


def test_corrupt_or_missing_shard(tmp_path, gen):
    folder = tmp_path / "ds"
    _write(folder, 6, gen, shard_size=3)
    (folder / "shard-00001.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    ds = LatentDataset(folder)
    ds[0]  # the good shard still reads
    with pytest.raises(DatasetFormatError, match="corrupt shard shard-00001"):
        ds[4]
    (folder / "shard-00001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard-00001.safetensors .* is missing"):
        LatentDataset(folder)


def test_shard_shape_mismatch(tmp_path, gen):
    """A shard that disagrees with the index (e.g. replaced by another dataset's) is caught on open."""
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, 6, gen, shard_size=3)
    _write(b, 4, gen, shard_size=4)
    (a / "shard-00000.safetensors").write_bytes((b / "shard-00000.safetensors").read_bytes())
    with pytest.raises(DatasetFormatError, match="has shape"):
        LatentDataset(a)[0]


def test_negative_errors(tmp_path, gen):
    folder = tmp_path / "ds"
    _write(folder, 3, gen)
    (folder / "negative.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="negative.safetensors is missing"):
        load_negative(folder)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_written_files_follow_the_umask(tmp_path, gen, mask):
    """safetensors leaves its files 0600; a dataset's files get the mode a plain open() gives."""
    old = os.umask(mask)
    try:
        _write(tmp_path / "ds", 5, gen)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "ds").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p.stat().st_mode & 0o777 for p in files} == {0o666 & ~mask}
