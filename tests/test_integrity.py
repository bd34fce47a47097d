"""Checkpoint integrity (#20 items 2, 4, 5): every save has an identity in config.json and in each
shard's safetensors metadata; a load that sees shards of another save refuses, naming the shard;
per-tensor SHA-256 digests catch flipped bytes (``hfcompress verify DIR``, opt-in at load);
damaged headers name the file and the problem; temporary folders of killed saves are cleaned by
the next save."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import time

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hfcompress
import tiny_models as tm
from hfcompress.cli.main import main as cli
from hfcompress.integrity import DIGESTS_KEY, SAVE_ID_KEY, CheckpointError, verify, verify_on_load

RTN = dict(bits=4, group_size=32)


def _quantized(seed: int = 0):
    return hfcompress.quantize_(tm.llama_gqa(seed), hfcompress.RTNConfig(**RTN))


def _shards(path) -> list[str]:
    return sorted(str(p) for p in path.iterdir() if p.name.endswith(".safetensors"))


def _metadata(file: str) -> dict:
    with safe_open(file, "pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def two_sharded(tmp_path_factory):
    """Two saves of different models with the same shard layout."""
    root = tmp_path_factory.mktemp("two")
    a, b = root / "a", root / "b"
    _quantized(0).save_pretrained(a, max_shard_size="60KB")
    _quantized(1).save_pretrained(b, max_shard_size="60KB")
    return a, b


def test_integrity_save_identity_in_config_and_every_shard(two_sharded):
    a, b = two_sharded
    ids = []
    for d in (a, b):
        save_id = json.loads((d / "config.json").read_text())["quantization_config"]["save_id"]
        shards = _shards(d)
        assert len(shards) >= 3
        for shard in shards:
            meta = _metadata(shard)
            assert meta[SAVE_ID_KEY] == save_id
            digests = json.loads(meta[DIGESTS_KEY])
            with safe_open(shard, "pt") as f:
                assert set(digests) == set(f.keys())
        ids.append(save_id)
    assert ids[0] != ids[1]


def test_integrity_streamed_quantize_has_identity_and_digests(tmp_path):
    """hfcompress.quantize(directory, ...) (streamed block by block) records the save identity in
    config.json and every shard, with digests of every tensor: verify passes, catches a flipped
    byte, and a shard of another streamed save is refused at load."""
    src = tmp_path / "float"
    tm.llama_gqa(0).save_pretrained(src)
    tm.char_tokenizer().save_pretrained(src)
    cfg = dict(bits=4, group_size=32, n_samples=4, seq_len=32)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:  # the same model twice: two saves, two identities
        hfcompress.quantize(str(src), hfcompress.GPTQConfig(**cfg), out_dir=str(out),
                            max_shard_size="60KB")
    ids = []
    for out in outs:
        save_id = json.loads((out / "config.json").read_text())["quantization_config"]["save_id"]
        shards = _shards(out)
        assert len(shards) >= 2
        for shard in shards:
            meta = _metadata(shard)
            assert meta[SAVE_ID_KEY] == save_id
            with safe_open(shard, "pt") as f:
                assert set(json.loads(meta[DIGESTS_KEY])) == set(f.keys())
        report = verify(out)
        assert report.ok, report.problems
        assert report.tensors == sum(len(json.loads(_metadata(s)[DIGESTS_KEY])) for s in shards)
        ids.append(save_id)
    assert ids[0] != ids[1]
    mixed = tmp_path / "mixed"
    shutil.copytree(outs[0], mixed)
    foreign = _shards(outs[1])[0]
    shutil.copy(foreign, mixed / os.path.basename(foreign))
    with pytest.raises(CheckpointError, match=rf"{os.path.basename(foreign)} belongs to another save"):
        AutoModelForCausalLM.from_pretrained(mixed)
    with safe_open(_shards(outs[0])[0], "pt") as f:
        name = next(k for k in f.keys() if k.endswith(".weight"))
    _flip_byte(_shards(outs[0])[0], name)
    problems = verify(outs[0]).problems
    assert len(problems) == 1 and name in problems[0]


def test_integrity_mixed_shards_refused_naming_the_shard(two_sharded, tmp_path):
    a, b = two_sharded
    mixed = tmp_path / "mixed"
    shutil.copytree(a, mixed)
    foreign = _shards(b)[1]
    shutil.copy(foreign, mixed / os.path.basename(foreign))
    with pytest.raises(CheckpointError, match=rf"{os.path.basename(foreign)} belongs to another save"):
        AutoModelForCausalLM.from_pretrained(mixed)


def test_integrity_single_file_config_of_another_save_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _quantized(0).save_pretrained(a)
    _quantized(1).save_pretrained(b)
    shutil.copy(b / "config.json", a / "config.json")
    with pytest.raises(CheckpointError, match="model.safetensors belongs to another save.*being written while it was read"):
        AutoModelForCausalLM.from_pretrained(a)


def _flip_byte(file: str, tensor: str) -> None:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    begin, end = header[tensor]["data_offsets"]
    pos = 8 + n + (begin + end) // 2
    with open(file, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x40]))


def test_integrity_verify_catches_flipped_bytes(tmp_path, capsys):
    d = tmp_path / "ckpt"
    _quantized(0).save_pretrained(d)
    assert cli(["verify", str(d)]) == 0
    assert verify(d).ok
    _flip_byte(str(d / "model.safetensors"), "model.layers.0.mlp.down_proj.weight_scale")
    assert cli(["verify", str(d)]) == 1
    err = capsys.readouterr().err
    assert "model.layers.0.mlp.down_proj.weight_scale" in err and "model.safetensors" in err
    report = verify(d)
    assert len(report.problems) == 1


def test_integrity_verify_on_load_opt_in(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    _quantized(0).save_pretrained(d)
    _flip_byte(str(d / "model.safetensors"), "model.layers.1.self_attn.q_proj.weight")
    AutoModelForCausalLM.from_pretrained(d)  # off by default: no hashing at load
    previous = verify_on_load()
    verify_on_load(True)
    try:
        with pytest.raises(CheckpointError, match="model.layers.1.self_attn.q_proj.weight.*recorded digest"):
            AutoModelForCausalLM.from_pretrained(d)
    finally:
        verify_on_load(previous)


def _damage(file: str, how: str) -> None:
    data = open(file, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    if how == "truncated":
        data = data[:5]
    elif how == "length":
        data = struct.pack("<Q", len(data) * 4) + data[8:]
    elif how == "utf8":
        data = data[:8] + b"\xff\xfe" + data[10:]
    elif how == "json":
        data = data[:8] + b"[" + data[9:]
    elif how == "short_data":
        data = data[:-16]
    open(file, "wb").write(data)


@pytest.mark.parametrize("how,problem", [
    ("truncated", "shorter than the 8-byte header"),
    ("length", "header length field"),
    ("utf8", "not UTF-8"),
    ("json", "not valid JSON"),
    ("short_data", "do not fit"),
])
def test_integrity_damaged_header_names_file_and_problem(tmp_path, how, problem):
    d = tmp_path / "ckpt"
    _quantized(0).save_pretrained(d)
    _damage(str(d / "model.safetensors"), how)
    with pytest.raises(CheckpointError) as e:
        AutoModelForCausalLM.from_pretrained(d)
    assert str(d / "model.safetensors") in str(e.value) and problem in str(e.value)
    report = verify(d)
    assert not report.ok and problem in report.problems[0]


def test_integrity_killed_save_temp_folders_cleaned_by_next_save(tmp_path):
    """Saves killed (SIGKILL) while writing leave .<name>.*.tmp folders; the next save removes them."""
    from hfcompress.hub.atomic import clean_stale_

    d = tmp_path / "ckpt"
    model = _quantized(0)
    model.save_pretrained(d)
    import transformers.modeling_utils as mu

    for _ in range(3):
        pid = os.fork()
        if pid == 0:  # child: die while the first shard is being written
            try:
                def die(*a, **k):
                    os.kill(os.getpid(), signal.SIGKILL)
                mu.safe_save_file = die
                model.save_pretrained(d)
            finally:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    leaked = [p for p in os.listdir(tmp_path) if p.startswith(".ckpt.") and p.endswith(".tmp")]
    assert len(leaked) == 1  # each killed save already removed the one before it; the last one is left
    # a temporary folder a live writer holds is not touched
    import fcntl
    live = tmp_path / ".ckpt.live.tmp"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        model.save_pretrained(d)
        left = sorted(p for p in os.listdir(tmp_path) if p.startswith(".ckpt."))
        assert left == [".ckpt.live.tmp"]
    finally:
        os.close(fd)
    assert clean_stale_(d) == [str(live)]
    assert verify(d).ok


def test_integrity_save_temp_folder_is_locked_before_clean_up_can_see_it(tmp_path, monkeypatch):
    """A save's temporary folder is made under a ``.new`` name the clean-up leaves alone while young,
    locked, then renamed to ``.tmp``: a concurrent save's clean-up never finds it unlocked. An
    unlocked ``.new`` folder older than a minute (a save killed in that instant) is removed."""
    from hfcompress.hub import atomic

    d = tmp_path / "ckpt"
    young = tmp_path / ".ckpt.abc.new"
    young.mkdir()
    old = tmp_path / ".ckpt.def.new"
    old.mkdir()
    past = time.time() - 2 * atomic._NEW_STALE_S
    os.utime(old, (past, past))
    assert atomic.clean_stale_(d) == [str(old)]
    assert young.is_dir()

    seen = {}
    real_rename = os.rename

    def spy(src, dst):  # a concurrent clean-up at the moment of the rename: the folder is locked
        if str(src).endswith(atomic._NEW):
            seen["locked"] = atomic._try_lock(src) is None
            seen["cleaned"] = atomic.clean_stale_(d)
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", spy)
    atomic.atomic_save(d, lambda tmp: open(os.path.join(tmp, "a.txt"), "w").write("x"))
    assert seen == {"locked": True, "cleaned": []}
    assert (d / "a.txt").read_text() == "x"
    assert young.is_dir()  # still young: not ours to remove
