"""Fault injection (#20): every writer killed (SIGKILL) at seeded points of its file-system work
leaves its target as the whole old or the whole new content, never a mix and never a lost user
file; a reader loading while a writer saves never returns a mixed model.

A writer runs in a forked child (the parent's imports are reused: no interpreter start). The
child counts its file-system calls (``open``, ``rename``, ``link``, ``unlink``, ``rmtree``,
safetensors ``save_file``, the directory swap ...) through ``sys.setprofile`` and kills itself
at call number ``k``; a dry run gives the number of calls, and ``KILLS`` values of ``k`` are
drawn from it with a seeded generator (plus the last calls, where the swap happens). The
target is then compared with snapshots of the old and the new content (tensor bytes, config
without the save identity, every other file byte for byte)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import sys
import time

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

import hfcompress
import tiny_models as tm
from hfcompress import prune

KILLS = 5  # seeded kill points per writer, plus the last two calls
USER_README = "# My notes\nHand-written; must survive every export.\n"
_FS_CALLS = {"open", "rename", "replace", "link", "unlink", "remove", "rmdir", "mkdir", "makedirs", "rmtree",
             "copy2", "copyfile", "copytree", "symlink", "chmod", "save_file", "safe_save_file", "_exchange",
             "mkdtemp", "upload_folder", "create_commit", "preupload_lfs_files", "_upload_lfs_files"}


# -- kill machinery -----------------------------------------------------------------------------------
def _run_child(fn, kill_at: int | None) -> tuple[bool, int]:
    """Run ``fn()`` in a forked child, SIGKILLed at its ``kill_at``-th file-system call
    (never when ``None``). Returns ``(killed, calls counted)``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        count = [0]

        def profiler(frame, event, arg):
            if event == "call":
                name = frame.f_code.co_name
            elif event == "c_call":
                name = getattr(arg, "__name__", "")
            else:
                return
            if name in _FS_CALLS:
                count[0] += 1
                if count[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

        code = 0
        try:
            sys.setprofile(profiler)
            fn()
        except BaseException as e:  # noqa: BLE001 - reported through the exit code
            sys.setprofile(None)
            os.write(2, f"writer failed: {type(e).__name__}: {e}\n".encode())
            code = 3
        finally:
            sys.setprofile(None)
            os.write(write_end, str(count[0]).encode())
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end) as f:
        counted = f.read()
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True, -1
    assert os.WEXITSTATUS(status) == 0, "the writer failed without being killed"
    return False, int(counted)


def _kill_points(n_calls: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    points = set(rng.sample(range(1, n_calls + 1), min(KILLS, n_calls)))
    points |= {max(1, n_calls - 1), n_calls}  # the last calls: the swap and the clean-up
    return sorted(points)


# -- snapshots ------------------------------------------------------------------------------------------
def _snapshot(path: str) -> dict[str, str] | None:
    """Content of a directory, independent of which save wrote it (save identity ignored)."""
    if not os.path.isdir(path):
        return None
    out = {}
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d != ".cache"]  # huggingface_hub's download bookkeeping
        for fn in files:
            full = os.path.join(root, fn)
            rel = os.path.relpath(full, path)
            data = open(full, "rb").read()
            if fn.endswith(".safetensors"):
                (n,) = struct.unpack("<Q", data[:8])  # a half-written file fails here or below
                header = json.loads(data[8:8 + n])
                header.pop("__metadata__", None)
                for name, meta in sorted(header.items()):
                    b, e = meta["data_offsets"]
                    assert 8 + n + e <= len(data), f"{full}: truncated"
                    out[f"{rel}:{name}"] = hashlib.sha256(data[8 + n + b:8 + n + e]).hexdigest()
                continue
            if fn == "config.json":
                cfg = json.loads(data)
                (cfg.get("quantization_config") or {}).pop("save_id", None)
                data = json.dumps(cfg, sort_keys=True).encode()
            out[rel] = hashlib.sha256(data).hexdigest()
    return out


def _leftovers(target: str) -> list[str]:
    parent, name = os.path.split(target)
    return [e for e in os.listdir(parent) if e.startswith(f".{name}.") and e.endswith(".tmp")]


def check_writer(tmp_path, write_old, write_new, seed: int, target_name: str = "out",
                 user_readme: bool = True, snapshot=None) -> int:
    """Kill ``write_new`` at seeded points over a target that ``write_old`` wrote (plus a user's
    README.md); the target must be whole old or whole new after every kill. Returns the number
    of kills."""
    snapshot = snapshot or (lambda: _snapshot(target))
    target = str(tmp_path / target_name)
    pristine = str(tmp_path / "pristine")
    write_old(target)
    if user_readme:
        if os.path.isfile(os.path.join(target, "README.md")):
            os.rename(os.path.join(target, "README.md"), os.path.join(target, "ORIGINAL_README.md"))
        with open(os.path.join(target, "README.md"), "w") as f:
            f.write(USER_README)
    shutil.copytree(target, pristine, symlinks=True)
    old = snapshot()

    def restore():
        shutil.rmtree(target, ignore_errors=True)
        for e in _leftovers(target):
            shutil.rmtree(os.path.join(tmp_path, e), ignore_errors=True)
        shutil.copytree(pristine, target, symlinks=True)

    killed, n_calls = _run_child(lambda: write_new(target), None)
    assert not killed and n_calls > 0
    new = snapshot()
    assert new != old
    kills = 0
    for k in _kill_points(n_calls, seed):
        restore()
        killed, _ = _run_child(lambda: write_new(target), k)
        state = snapshot()
        assert state in (old, new), f"kill at file-system call {k}/{n_calls} left a mixed target"
        if user_readme and state == new:
            assert os.path.isfile(os.path.join(target, "ORIGINAL_README.md")) or target_name == "repo"
        kills += killed
    # the next complete write cleans what the killed ones left beside the target
    killed, _ = _run_child(lambda: write_new(target), None)
    assert not killed and snapshot() == new and _leftovers(target) == []
    return kills


# -- writers -------------------------------------------------------------------------------------------
def _rtn(seed, **kw):
    return hfcompress.quantize_(tm.llama_gqa(seed), hfcompress.RTNConfig(bits=4, group_size=32, **kw))


def test_fault_injection_save_sharded(tmp_path):
    a, b = _rtn(0), _rtn(1)
    kills = check_writer(tmp_path, lambda t: a.save_pretrained(t, max_shard_size="60KB"),
                         lambda t: b.save_pretrained(t, max_shard_size="60KB"), seed=1)
    assert kills >= 3


def test_fault_injection_prune_export(tmp_path):
    m0, m1 = tm.llama_gqa(0), tm.llama_gqa(0)
    prune.magnitude_structured(m0, 0.5, keep_first_layers=1, keep_last_layers=0)
    prune.magnitude_structured(m1, 0.25, keep_first_layers=1, keep_last_layers=0)
    kills = check_writer(tmp_path, lambda t: prune.export(m0, t), lambda t: prune.export(m1, t), seed=2)
    assert kills >= 3
    assert open(tmp_path / "out" / "ORIGINAL_README.md").read() == USER_README


def test_fault_injection_l4q_export(tmp_path):
    from hfcompress import L4QConfig

    torch.manual_seed(0)
    p0 = get_peft_model(tm.llama_gqa(0), L4QConfig(r=4, bits=4, group_size=32))
    p1 = get_peft_model(tm.llama_gqa(1), L4QConfig(r=4, bits=4, group_size=32))
    kills = check_writer(tmp_path, lambda t: hfcompress.l4q.export(p0, t), lambda t: hfcompress.l4q.export(p1, t),
                         seed=3)
    assert kills >= 3


def test_fault_injection_mos_to_lora(tmp_path):
    from hfcompress.adapters.mos import MoSConfig, to_lora

    torch.manual_seed(0)
    p0 = get_peft_model(tm.llama_gqa(0), MoSConfig(r=4, target_modules=["q_proj", "v_proj"]))
    p1 = get_peft_model(tm.llama_gqa(1), MoSConfig(r=8, target_modules=["q_proj", "v_proj"]))  # another config too
    for p in (p0, p1):  # non-zero B so the two adapters differ
        for n, w in p.named_parameters():
            if w.requires_grad:
                torch.nn.init.normal_(w, std=0.02)
    kills = check_writer(tmp_path, lambda t: to_lora(p0, t), lambda t: to_lora(p1, t), seed=4)
    assert kills >= 3


def test_fault_injection_compensate_save(tmp_path):
    orig = tm.llama_gqa(0)
    cfg = hfcompress.EoRAConfig(rank=4, method="svd")
    pm0 = hfcompress.compensate(_rtn(0), orig, cfg)
    pm1 = hfcompress.compensate(hfcompress.quantize_(tm.llama_gqa(0), hfcompress.RTNConfig(bits=3, group_size=32)),
                                orig, cfg)
    kills = check_writer(tmp_path, pm0.save_pretrained, pm1.save_pretrained, seed=5)
    assert kills >= 3


def test_fault_injection_cli_quantize(tmp_path):
    from hfcompress.cli.main import main as cli

    src = str(tmp_path / "float")
    tm.llama_gqa(0).save_pretrained(src)
    kills = check_writer(
        tmp_path, lambda t: cli(["quantize", src, "--out", t, "--method", "rtn", "--bits", "4", "--group-size", "32"]),
        lambda t: _exit_ok(cli(["quantize", src, "--out", t, "--method", "rtn", "--bits", "8", "--group-size", "32"])),
        seed=6)
    assert kills >= 3


def test_fault_injection_export_compressed_tensors(tmp_path):
    """hfcompress export --to compressed-tensors over an earlier export (with a user's README)."""
    from hfcompress.cli.main import main as cli

    src = {}
    for seed in (0, 1):
        src[seed] = str(tmp_path / f"q{seed}")
        _rtn(seed, zero_point="int").save_pretrained(src[seed])  # exportable: integer zeros
    kills = check_writer(tmp_path, lambda t: _exit_ok(cli(["export", src[0], "--to", "compressed-tensors", "--out", t])),
                         lambda t: _exit_ok(cli(["export", src[1], "--to", "compressed-tensors", "--out", t])), seed=8)
    assert kills >= 3
    assert open(tmp_path / "out" / "ORIGINAL_README.md").read() == USER_README


def test_fault_injection_export_from_memory_cleans_scratch(tmp_path, monkeypatch):
    """export_compressed_tensors(model_in_memory, out) saves the model into a scratch directory
    first; an export killed midway leaves it behind only until the next one."""
    import tempfile

    from hfcompress.convert import export_compressed_tensors

    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    a, b = _rtn(0, zero_point="int"), _rtn(1, zero_point="int")  # exportable: integer zeros
    kills = check_writer(tmp_path, lambda t: export_compressed_tensors(a, t), lambda t: export_compressed_tensors(b, t),
                         seed=9, user_readme=False)
    assert kills >= 3
    assert os.listdir(systmp) == []


def test_fault_injection_cli_convert_gptq(tmp_path):
    """hfcompress convert --from gptq over an earlier conversion."""
    from hfcompress.cli.main import main as cli

    fixtures = os.path.join(os.path.dirname(__file__), "fixtures", "gptq")
    srcs = [os.path.join(fixtures, c) for c in ("w4-sym-noact-g16-gptq", "w4-asym-act-g16-gptq")]
    kills = check_writer(tmp_path, lambda t: _exit_ok(cli(["convert", srcs[0], "--from", "gptq", "--out", t])),
                         lambda t: _exit_ok(cli(["convert", srcs[1], "--from", "gptq", "--out", t])), seed=10)
    assert kills >= 3


def _exit_ok(code):
    assert code == 0


def test_fault_injection_push(tmp_path, local_hub, monkeypatch):
    """A push killed anywhere leaves the Hub repo at the old or the new commit, whole, and what it
    left in the temporary folder is removed by the next push."""
    import tempfile

    from huggingface_hub import HfApi, snapshot_download

    systmp = tmp_path / "systmp"  # the temporary folder of the pushing processes
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    a, b = _rtn(0), _rtn(1)
    repo = "fault-push"
    a.push_to_hub(repo)
    repo_id = f"{HfApi().whoami()['name']}/{repo}"
    seen = []

    def remote():
        d = snapshot_download(repo_id, local_dir=str(tmp_path / f"dl{len(seen)}"))
        seen.append(d)
        return _snapshot(d)

    old = remote()
    killed, n_calls = _run_child(lambda: b.push_to_hub(repo), None)
    assert not killed
    new = remote()
    assert new != old
    rng = random.Random(7)
    left_behind = 0
    for k in sorted(rng.sample(range(1, n_calls + 1), min(KILLS, n_calls))):
        a.push_to_hub(repo)  # back to the old content
        assert remote() == old
        _run_child(lambda: b.push_to_hub(repo), k)
        assert remote() in (old, new), f"push killed at call {k}/{n_calls} left a mixed repo"
        left_behind += bool(os.listdir(systmp))
    assert left_behind >= 1, "no kill landed while a push held files in the temporary folder"
    killed, _ = _run_child(lambda: b.push_to_hub(repo), None)  # a complete push cleans up after the killed ones
    assert not killed and remote() == new
    assert os.listdir(systmp) == []


def test_fault_injection_concurrent_reader_never_mixed(tmp_path):
    """A writer saves two models in turn while this process loads: every load is exactly one of
    them, or an error that says the checkpoint was being written."""
    from hfcompress.integrity import CheckpointError

    a, b = _rtn(0), _rtn(1)
    target = str(tmp_path / "ckpt")
    a.save_pretrained(target, max_shard_size="60KB")
    x = tm.inputs()
    with torch.no_grad():
        ref = {"a": a(x).logits, "b": b(x).logits}
    pid = os.fork()
    if pid == 0:
        try:
            deadline = time.monotonic() + 30
            i = 0
            while time.monotonic() < deadline:
                (b if i % 2 == 0 else a).save_pretrained(target, max_shard_size="60KB")
                i += 1
        finally:
            os._exit(0)
    loads = refused = 0
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and loads < 40:
            try:
                m = AutoModelForCausalLM.from_pretrained(target)
            except CheckpointError as e:
                assert "being written while it was read" in str(e)
                refused += 1
                continue
            except OSError as e:  # a shard the index named was replaced by the next save's layout
                assert target in str(e) or "safetensors" in str(e), e
                refused += 1
                continue
            with torch.no_grad():
                got = m(x).logits
            assert torch.equal(got, ref["a"]) or torch.equal(got, ref["b"]), "a load returned a mixed model"
            loads += 1
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert loads >= 3, (loads, refused)
