"""The disk tier: the per-layer store (format, resume, staleness, bad input), direct-I/O reads into the staging ring,
bitwise-identical output against the all-in-RAM and resident models, peak RSS under a host budget, and one host
copy shared by several processes."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import make_checkpoint, peak_private_growth
from offload_runtime import Engine
from offload_runtime.errors import ResourceError, StoreError
from offload_runtime.model.config import ModelArgs
from offload_runtime.residency import split_host_disk
from offload_runtime.weights import disk
from offload_runtime.weights.checkpoint import Checkpoint
from offload_runtime.weights.layout import buffer_over_bytes, layer_bytes, layer_layout
from offload_runtime.weights.store import HostLayerStore

REPO = Path(__file__).resolve().parents[1]
IDS = [3, 17, 44, 9, 81, 5, 60]


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("deep") / "m", "llama-gqa-llama3", num_hidden_layers=6, seed=3)


@pytest.fixture(scope="module")
def direct_root(tmp_path_factory) -> Path:
    """A directory on a filesystem that does direct I/O (tmpfs on older kernels does not): the test tmp dir where
    it does, else one under the repository."""
    for base in (tmp_path_factory.mktemp("direct"), REPO / ".test-disk"):
        base.mkdir(parents=True, exist_ok=True)
        probe = base / "probe.bin"
        probe.write_bytes(b"\0" * disk.ALIGN)
        ok = disk.direct_io_works(probe)
        probe.unlink()
        if ok:
            return base
    pytest.skip("no filesystem here takes O_DIRECT")


def layer_file_bytes(args: ModelArgs) -> int:
    return disk.padded_bytes(layer_bytes(args, torch.float32))


def logits_and_tokens(engine: Engine) -> tuple[torch.Tensor, list[int]]:
    from offload_runtime.model.batch import RowChunk, build_forward
    from offload_runtime.model.kv_cache import KVCache
    from offload_runtime.model.tree import Tree

    tokens = engine.generate(IDS, max_new_tokens=10, temperature=0, ignore_eos=True)[0].token_ids
    cache = KVCache(engine.target.args, 1, 64, engine.target.dtype, "cpu")
    batch = build_forward([RowChunk(0, Tree.chain(len(IDS)), IDS, range(len(IDS)), range(len(IDS)))],
                          cache.scratch_slot, None, "cpu")
    return engine.target.forward(batch, cache), tokens


@pytest.fixture(scope="module")
def references(deep) -> dict[str, tuple[torch.Tensor, list[int]]]:
    resident = Engine.from_pretrained(deep, dtype="float32", draft=False, offload=False)
    in_ram = Engine.from_pretrained(deep, dtype="float32", draft=False, offload=True, resident_layers=0)
    return {"resident": logits_and_tokens(resident), "in RAM": logits_and_tokens(in_ram)}


# --- output


@pytest.mark.parametrize("slots", [2, 3])
@pytest.mark.parametrize("host_layers,resident", [(0, 0), (2, 0), (2, 1), (3, 0)])
def test_disk_tier_equals_in_ram_and_resident_bitwise(deep, references, direct_root, slots, host_layers, resident):
    """Host budgets from 'every streamed layer on disk' to the fewest a 2-buffer ring allows (3), K = 2 and 3,
    with and without resident layers: logits (float32) and greedy tokens are the same bits as all-in-RAM streaming
    and the resident model."""
    args = ModelArgs.from_file(deep)
    per_file = layer_file_bytes(args)
    store_dir = direct_root / "equal"
    engine = Engine.from_pretrained(deep, dtype="float32", draft=False, offload=True, slots=slots,
                                    resident_layers=resident, host_memory=(2 + host_layers) * per_file,
                                    offload_dir=store_dir, quiet=True)
    r = engine.residency
    assert len(r.resident) == resident and len(r.host) == host_layers and r.prefetch == 2
    assert len(r.disk) == 6 - resident - host_layers and sorted(r.resident + r.host + r.disk) == list(range(6))
    layers = engine.target.layers
    assert layers.disk is not None and layers.disk.direct  # O_DIRECT really used on this filesystem
    assert all(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT for fd in layers.disk.fds.values())
    got = logits_and_tokens(engine)
    for name, (want_logits, want_tokens) in references.items():
        assert torch.equal(got[0], want_logits), name
        assert got[1] == want_tokens, name
    sweeps = engine.sweep_stats()
    assert len(sweeps) == 11
    # Every sweep reads each of its disk layers once, and counts them.
    assert all(s.disk_bytes == len(r.disk) * per_file for s in sweeps)
    assert all(s.disk_wait_s >= 0 for s in sweeps)
    assert layers.disk_bytes_per_sweep == len(r.disk) * per_file


@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_quantized_layers_stream_from_disk_bitwise(deep, direct_root, quantize):
    """The store holds a layer as the loader packs it (quantized on load here): the disk tier streams a quarter
    (int4) of the bytes and gives the same bits as the same quantized model all in RAM and resident."""
    from offload_runtime.model.quantization import QuantSpec

    args = ModelArgs.from_file(deep)
    spec = QuantSpec(int(quantize[3:]), 32)
    per_file = disk.padded_bytes(layer_bytes(args, torch.float32, spec))
    assert per_file < layer_file_bytes(args) / (3 if quantize == "int4" else 1.5)
    common = dict(dtype="float32", draft=False, quantize=quantize, group_size=32, quiet=True)
    resident = logits_and_tokens(Engine.from_pretrained(deep, offload=False, **common))
    in_ram = logits_and_tokens(Engine.from_pretrained(deep, offload=True, resident_layers=0, **common))
    engine = Engine.from_pretrained(deep, offload=True, resident_layers=1, host_memory=(2 + 1) * per_file,
                                    offload_dir=direct_root / f"quant-{quantize}", **common)
    r = engine.residency
    assert len(r.disk) == 4 and len(r.host) == 1
    got = logits_and_tokens(engine)
    for want in (resident, in_ram):
        assert torch.equal(got[0], want[0]) and got[1] == want[1]
    assert all(s.disk_bytes == 4 * per_file for s in engine.sweep_stats())


def test_speculative_decoding_with_a_disk_tier(deep, checkpoints, direct_root):
    plain = Engine.from_pretrained(deep, dtype="float64", draft=False, offload=False)
    spec = Engine.from_pretrained(deep, dtype="float64", draft=str(checkpoints["llama-gqa-llama3"]),
                                  tree=[-1, 0, 0, 1, 2, 3], offload=True, resident_layers=1,
                                  host_memory=3 * disk.padded_bytes(layer_bytes(plain.target.args, torch.float64)),
                                  offload_dir=direct_root / "spec64", quiet=True)
    assert len(spec.residency.disk) == 4
    a = plain.generate(IDS[:4], max_new_tokens=24, temperature=0, ignore_eos=True)[0].token_ids
    b = spec.generate(IDS[:4], max_new_tokens=24, temperature=0, ignore_eos=True)[0].token_ids
    assert a == b


def test_reads_run_ahead_between_sweeps(deep, direct_root):
    """When a sweep ends, the next sweep's first disk layers are already being read (while the draft would grow the
    tree): their reads complete with no sweep running."""
    per_file = layer_file_bytes(ModelArgs.from_file(deep))
    engine = Engine.from_pretrained(deep, dtype="float32", draft=False, offload=True, resident_layers=0,
                                    host_memory=3 * per_file, offload_dir=direct_root / "ahead", quiet=True)
    layers = engine.target.layers
    engine.generate(IDS, max_new_tokens=2, temperature=0, ignore_eos=True)
    reader = layers.disk
    assert layers._t % len(layers.streamed) == 0  # between sweeps
    # The next sweep's first loads hold slots; the disk ones already copied in are out of the reader, and the
    # reads in flight are the next disk layers of that sweep, in its order.
    copied = {layers.slot_layer[t % layers.K] for t in range(layers._t, layers._issued) if t not in layers._staged}
    in_flight = sorted(reader._reads)
    assert [reader._load_layer(d) for d in in_flight] == [i for i in reader.order if i not in copied][: reader.depth]
    deadline = time.monotonic() + 10
    while not all(reader.ready(d) for d in in_flight) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(reader.ready(d) for d in in_flight)  # done with no sweep running


def test_buffered_fallback_where_direct_io_is_refused(deep, references, tmp_path, monkeypatch):
    """A filesystem that refuses O_DIRECT (monkeypatched: EINVAL at open, as tmpfs did before Linux 6.6): one
    warning, buffered reads, the same bits."""
    def refuse(path, flags):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(disk, "_open_direct", refuse)
    monkeypatch.setattr(disk, "_warned_buffered", set())
    per_file = layer_file_bytes(ModelArgs.from_file(deep))
    with pytest.warns(RuntimeWarning, match="refuses direct I/O") as caught:
        engine = Engine.from_pretrained(deep, dtype="float32", draft=False, offload=True, resident_layers=0,
                                        host_memory=3 * per_file, offload_dir=tmp_path / "buffered", quiet=True)
        got = logits_and_tokens(engine)
    assert sum("direct I/O" in str(w.message) for w in caught) == 1
    assert not engine.target.layers.disk.direct
    assert torch.equal(got[0], references["in RAM"][0]) and got[1] == references["in RAM"][1]


# --- the store


def test_store_format_is_the_host_layout_padded_to_4k(deep, tmp_path):
    ckpt = Checkpoint(deep)
    layout = layer_layout(ckpt.args, torch.float32)
    key = disk.StoreKey("ckpt:m", "fp1", "m")
    files = disk.open_store(tmp_path / "s", key, layout, 6, ckpt, explicit=True)
    host = HostLayerStore(ckpt.args, torch.float32, list(range(6)), pin=False)
    host.fill(ckpt)
    for i in range(6):
        data = files.path(i).read_bytes()
        assert len(data) == files.file_bytes and len(data) % 4096 == 0 and files.file_bytes >= layout.nbytes
        assert data[: layout.nbytes] == host.buffers[i].view(torch.uint8).numpy().tobytes()
        assert data[layout.nbytes:] == b"\0" * (files.file_bytes - layout.nbytes)
        mapped = buffer_over_bytes(layout, files.map_layer(i))
        assert torch.equal(mapped, host.buffers[i])
    manifest = json.loads((tmp_path / "s" / "store.json").read_text())
    assert manifest["identity"] == "ckpt:m" and manifest["fingerprint"] == "fp1" and manifest["align"] == 4096
    assert manifest["file_bytes"] == files.file_bytes and manifest["n_layers"] == 6


class CountingSource:
    """A weight source that counts which layers were read, and can fail at one."""

    def __init__(self, inner, fail_at: int | None = None):
        self.inner, self.args, self.label, self.fail_at = inner, inner.args, inner.label, fail_at
        self.layers: set[int] = set()

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        i = int(name.split(".")[2])
        if i == self.fail_at:
            raise KeyboardInterrupt  # the run killed mid-build
        self.layers.add(i)
        return self.inner.read_into(name, out)


def test_store_resumes_rewrites_truncated_layers_and_rebuilds_when_stale(deep, tmp_path):
    ckpt = Checkpoint(deep)
    layout = layer_layout(ckpt.args, torch.float32)
    key = disk.StoreKey("ckpt:m", "fp1", "m")
    where = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):
        disk.open_store(where, key, layout, 6, CountingSource(ckpt, fail_at=3), explicit=True)
    assert sorted(p.name for p in where.glob("layer-*.bin")) == [f"layer-0000{i}.bin" for i in range(3)]
    (where / ".layer-00003.bin.99999.tmp").write_bytes(b"half a layer")  # what a SIGKILL mid-write leaves
    resumed = CountingSource(ckpt)
    written: list[int] = []
    files = disk.open_store(where, key, layout, 6, resumed, explicit=True, progress=lambda n: written.append(n))
    assert resumed.layers == {3, 4, 5} and written == [3]  # only what was missing, and the bar's total said so
    assert not list(where.glob(".layer-*.tmp"))  # the killed build's half-written file is gone
    good = files.path(2).read_bytes()
    with open(files.path(2), "r+b") as f:
        f.truncate(1000)
    logs: list[str] = []
    again = CountingSource(ckpt)
    disk.open_store(where, key, layout, 6, again, explicit=True, log=logs.append)
    assert again.layers == {2} and files.path(2).read_bytes() == good and "wrong size" in logs[0]
    untouched = CountingSource(ckpt)
    disk.open_store(where, key, layout, 6, untouched, explicit=True, progress=lambda n: pytest.fail("wrote"))
    assert untouched.layers == set()
    stale = CountingSource(ckpt)
    logs.clear()
    disk.open_store(where, disk.StoreKey("ckpt:m", "fp2", "m"), layout, 6, stale, explicit=True, log=logs.append)
    assert stale.layers == set(range(6)) and "rebuilding" in logs[0]


def test_store_of_another_model_or_format(deep, tmp_path):
    ckpt = Checkpoint(deep)
    layout = layer_layout(ckpt.args, torch.float32)
    where = tmp_path / "s"
    disk.open_store(where, disk.StoreKey("ckpt:a", "fpa", "a"), layout, 6, ckpt, explicit=True)
    with pytest.raises(StoreError, match=r"holds the layer store of a, not the one of b; pass --offload-dir"):
        disk.open_store(where, disk.StoreKey("ckpt:b", "fpb", "b"), layout, 6, ckpt, explicit=True)
    with pytest.raises(StoreError, match=r"holds the layer store of a as float32, not the one of a as float64"):
        disk.open_store(where, disk.StoreKey("ckpt:a", "fpa", "a"), layer_layout(ckpt.args, torch.float64), 6, ckpt,
                        explicit=True)
    # In a directory the runtime chose itself, a store that is not the one wanted is replaced.
    other = CountingSource(ckpt)
    disk.open_store(where, disk.StoreKey("ckpt:b", "fpb", "b"), layout, 6, other, explicit=False)
    assert other.layers == set(range(6))


@pytest.mark.parametrize("explicit", [True, False])
def test_files_no_manifest_accounts_for_are_never_deleted(deep, tmp_path, explicit):
    ckpt = Checkpoint(deep)
    layout = layer_layout(ckpt.args, torch.float32)
    key = disk.StoreKey("ckpt:a", "fpa", "a")
    # Layer-like files with no manifest: named like ours (layer-00003.bin) or not; and someone else's store.json.
    users = tmp_path / "users"
    users.mkdir()
    mine = {name: f"the user's {name}" for name in ("layer-00003.bin", "layer-abc.bin", "notes.txt")}
    for name, text in mine.items():
        (users / name).write_text(text)
    with pytest.raises(StoreError, match=r"holds layer-00003.bin and 1 more that no store.json of this runtime "
                                         r"accounts for; they are left alone"):
        disk.open_store(users, key, layout, 6, ckpt, explicit=explicit)
    assert {p.name: p.read_text() for p in users.iterdir() if not p.name.startswith(".")} == mine
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "store.json").write_text('{"kind": "something else"}')
    with pytest.raises(StoreError, match=r"store.json is not a layer store's manifest"):
        disk.open_store(foreign, key, layout, 6, ckpt, explicit=explicit)
    assert (foreign / "store.json").read_text() == '{"kind": "something else"}'
    # A store of ours being replaced deletes its own layer files, not a user's file beside them.
    where = tmp_path / "s"
    disk.open_store(where, disk.StoreKey("ckpt:b", "fpb", "b"), layout, 4, ckpt, explicit=False)
    (where / "layer-extra.bin").write_text("keep")
    with pytest.raises(StoreError, match=r"holds layer-extra.bin that no store.json"):
        disk.open_store(where, key, layout, 6, ckpt, explicit=False)
    (where / "layer-extra.bin").rename(where / "extra.bin")
    disk.open_store(where, key, layout, 6, ckpt, explicit=False)
    assert (where / "extra.bin").read_text() == "keep"
    assert sorted(p.name for p in where.glob("layer-*.bin")) == [f"layer-0000{i}.bin" for i in range(6)]


def test_engine_rebuilds_the_store_when_the_checkpoint_changes(tmp_path, capsys):
    path = make_checkpoint(tmp_path / "m", "llama-mha", num_hidden_layers=4, seed=1)
    per_file = layer_file_bytes(ModelArgs.from_file(path))
    kwargs = dict(dtype="float32", draft=False, offload=True, resident_layers=0, host_memory=2 * per_file)
    first = Engine.from_pretrained(path, **kwargs).generate(IDS, max_new_tokens=4, temperature=0, ignore_eos=True)
    assert "writing the layer store of m" in capsys.readouterr().err  # in the runtime home: no offload_dir given
    make_checkpoint(path, "llama-mha", num_hidden_layers=4, seed=2)  # new weights, same place
    want = Engine.from_pretrained(path, dtype="float32", draft=False, offload=False)
    want = want.generate(IDS, max_new_tokens=4, temperature=0, ignore_eos=True)[0].token_ids
    got = Engine.from_pretrained(path, **kwargs).generate(IDS, max_new_tokens=4, temperature=0, ignore_eos=True)
    assert "writing the layer store of m" in capsys.readouterr().err
    assert got[0].token_ids == want != first[0].token_ids


# --- bad input


def test_offload_dir_not_writable(deep, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    per_file = layer_file_bytes(ModelArgs.from_file(deep))
    with pytest.raises(StoreError, match=r"cannot write the layer store to .*a-file/store .*; pass --offload-dir"):
        Engine.from_pretrained(deep, dtype="float32", draft=False, offload=True, resident_layers=0,
                               host_memory=per_file, prefetch=1, offload_dir=blocker / "store")


def test_too_small_a_disk_is_refused_before_writing(deep, tmp_path, monkeypatch):
    per_file = layer_file_bytes(ModelArgs.from_file(deep))
    monkeypatch.setattr(disk, "free_bytes", lambda d: 3 * per_file)
    with pytest.raises(ResourceError, match=r"the layer store needs .* more in .* \(the whole store is .*\) but only "
                                            r".* is free there"):
        Engine.from_pretrained(deep, dtype="float32", draft=False, offload=True, resident_layers=0,
                               host_memory=2 * per_file, offload_dir=tmp_path / "s")
    assert not list((tmp_path / "s").glob("layer-*"))


def test_a_disk_filling_up_while_writing_keeps_what_was_written(deep, tmp_path, monkeypatch):
    real = os.pwritev
    calls = []

    def fill_up(fd, buffers, offset):
        calls.append(fd)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", fill_up)
    per_file = layer_file_bytes(ModelArgs.from_file(deep))
    with pytest.raises(ResourceError, match=r"filled up while writing the layer store; free space .* resumes"):
        Engine.from_pretrained(deep, dtype="float32", draft=False, offload=True, resident_layers=0,
                               host_memory=2 * per_file, offload_dir=tmp_path / "s")
    assert [p.name for p in sorted((tmp_path / "s").glob("layer-*"))] == ["layer-00000.bin", "layer-00001.bin"]
    assert not list((tmp_path / "s").glob(".layer-*"))  # no half-written file left behind


def test_host_budget_below_the_staging_ring(deep, tmp_path):
    per_file = layer_file_bytes(ModelArgs.from_file(deep))
    with pytest.raises(ResourceError, match=r"too small for the 2 staging buffers .*; give --host-memory "
                                            r"\(host_memory=\) at least .*, or lower prefetch"):
        Engine.from_pretrained(deep, dtype="float32", draft=False, offload=True, resident_layers=0,
                               host_memory=per_file, offload_dir=tmp_path / "s")
    assert not (tmp_path / "s").exists()  # refused before the store was written


def test_split_host_disk():
    streamed = (0, 2, 3, 5, 6, 7)
    assert split_host_disk(streamed, 1000, None) == (streamed, (), 0)
    assert split_host_disk(streamed, 1000, 6000) == (streamed, (), 0)  # everything fits: no ring, no disk
    host, on_disk, ring = split_host_disk(streamed, 4000, 4 * 4096)  # files padded to 4096
    assert ring == 2 and len(host) == 2 and len(on_disk) == 4 and sorted(host + on_disk) == list(streamed)
    assert on_disk == (0, 3, 5, 7)  # spread among the streamed layers, not bunched at one end
    assert split_host_disk(streamed, 4000, 2 * 4096)[1] == streamed
    with pytest.raises(ResourceError, match="too small"):
        split_host_disk(streamed, 4000, 4096)
    assert split_host_disk(streamed, 4000, 4096, prefetch=1)[1] == streamed


def test_cli_one_line_error_for_a_bad_offload_dir(tiny_pair, tmp_path):
    target, _ = tiny_pair
    blocker = tmp_path / "f"
    blocker.write_text("")
    out = subprocess.run([sys.executable, "-m", "offload_runtime.chat", "--model", str(target), "--no-draft",
                          "--device", "cpu", "--offload", "--host-memory", "300KB", "--offload-dir",
                          str(blocker / "x")], input="hi\n", capture_output=True, text=True, cwd=REPO, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: cannot write the layer store")


# --- memory


RSS_SETUP = """
from offload_runtime import Engine
from offload_runtime.weights import disk
from offload_runtime.weights.checkpoint import Checkpoint
if {buffered}:
    def refuse(path, flags):
        raise OSError(22, "Invalid argument")
    disk._open_direct = refuse
Checkpoint({path!r})  # warm imports and code paths outside the measurement
"""
RSS_MEASURED = """
engine = Engine.from_pretrained({path!r}, dtype="float32", draft=False, offload=True, resident_layers=0,
                                max_seq_len=16, host_memory={budget}, offload_dir={store!r}, progress=False,
                                quiet=True)
engine.generate([3, 4, 5], max_new_tokens=3, temperature=0, ignore_eos=True)
r = engine.residency
result = dict(disk=len(r.disk), host=len(r.host), direct=engine.target.layers.disk.direct)
"""


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("big") / "big", "llama-mha", hidden_size=384,
                           intermediate_size=1024, num_hidden_layers=24, num_attention_heads=6, num_key_value_heads=6,
                           vocab_size=4096)


@pytest.mark.parametrize("buffered", [False, True])
def test_peak_rss_stays_within_the_host_budget(big, direct_root, buffered):
    """A model ~6x the host budget B: peak RSS while writing the store, loading and decoding grows by less than B
    (host layers and staging ring) plus the CPU's "device" part (two slots, embeddings and head) and a constant,
    with direct reads and with buffered ones."""
    args = ModelArgs.from_file(big)
    size = sum(f.stat().st_size for f in big.glob("*.safetensors"))
    per_file = layer_file_bytes(args)
    budget = 4 * per_file  # 2 staging buffers + 2 host layers, of 24
    assert size > 6 * budget
    store = direct_root / f"rss-{buffered}"  # written in the measured process: the build counts too
    fields = dict(path=str(big), budget=budget, store=str(store), buffered=buffered)
    rss = peak_private_growth(RSS_SETUP.format(**fields), RSS_MEASURED.format(**fields), cwd=REPO)
    assert rss["host"] == 2 and rss["disk"] == 22 and rss["direct"] is not buffered
    device_part = 2 * layer_bytes(args, torch.float32) + args.global_numel() * 4
    grown = rss["grown"]
    assert grown < budget + device_part + 24e6, (grown, budget, device_part, size)


SHARE_SCRIPT = """
import json, os, sys, time
from offload_runtime import Engine
engine = Engine.from_pretrained({path!r}, dtype="float32", draft=False, offload=True, resident_layers=0,
                                offload_dir={store!r}, progress=False)
tokens = engine.generate([3, 4, 5, 6], max_new_tokens=4, temperature=0, ignore_eos=True)[0].token_ids
open({ready!r} + str(os.getpid()), "w").close()
while len([p for p in os.listdir({flags!r}) if p.startswith("ready")]) < 2:
    time.sleep(0.05)
shared = private = 0
lines = open("/proc/self/smaps").read().splitlines()
mapping = None
for line in lines:
    if "-" in line.split()[0] and len(line.split()) >= 5:
        mapping = line.split()[-1] if len(line.split()) >= 6 else ""
    elif mapping and mapping.startswith({store!r}) and line.startswith(("Shared_Clean:", "Private_Clean:")):
        kb = int(line.split()[1]) * 1024
        shared += kb if line.startswith("Shared") else 0
        private += kb if line.startswith("Private") else 0
print(json.dumps({{"tokens": tokens, "shared": shared, "private": private,
                  "host": len(engine.residency.host)}}))
open({done!r} + str(os.getpid()), "w").close()
while len([p for p in os.listdir({flags!r}) if p.startswith("done")]) < 2:
    time.sleep(0.05)
"""


def test_processes_share_one_host_copy(deep, tmp_path):
    """Two processes start together on one offload dir (as torchrun ranks do): one writes the store while the other
    waits for it, both map the host layers from it, and the pages are shared, not copied per process."""
    store, flags = tmp_path.resolve() / "store", tmp_path / "flags"
    flags.mkdir()
    script = SHARE_SCRIPT.format(path=str(deep), store=str(store), flags=str(flags), ready=str(flags / "ready"),
                                 done=str(flags / "done"))
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=REPO) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert sum("writing the layer store" in o[1] for o in outs) == 1  # written once
    want = Engine.from_pretrained(deep, dtype="float32", draft=False, offload=False)
    want = want.generate([3, 4, 5, 6], max_new_tokens=4, temperature=0, ignore_eos=True)[0].token_ids
    per_file = layer_file_bytes(ModelArgs.from_file(deep))
    for r in results:
        assert r["tokens"] == want and r["host"] == 6
        assert r["shared"] >= 6 * per_file and r["private"] == 0, r


def test_pinning_fails_safe_without_cuda(deep, tmp_path):
    """Asked to page-lock (as on CUDA) where the driver cannot: one warning each, pageable memory, same bytes."""
    if torch.cuda.is_available():
        pytest.skip("this machine can pin")
    args = ModelArgs.from_file(deep)
    ckpt = Checkpoint(deep)
    layout = layer_layout(args, torch.float32)
    files = disk.open_store(tmp_path / "s", disk.StoreKey("k", "f", "m"), layout, 6, ckpt, explicit=True)
    host = HostLayerStore(args, torch.float32, [0, 1], pin=True)
    with pytest.warns(RuntimeWarning, match="shared mapping .* refused"):
        disk.map_host_layers(host, files)
    assert not host.pinned and torch.equal(host.buffers[1].view(torch.uint8),
                                           torch.frombuffer(bytearray(files.path(1).read_bytes()), dtype=torch.uint8)
                                           [: layout.nbytes])
    with pytest.warns(RuntimeWarning, match="staging buffers was refused"):
        reader = disk.DiskReader(files, [2, 3, 4], depth=2, threads=2, pin=True)
    assert not reader.pinned and reader.wait(0).layer == 2
    reader.close()


@pytest.mark.gpu
@pytest.mark.parametrize("slots", [2, 3])
@pytest.mark.parametrize("host_layers", [0, 2])
def test_disk_tier_equals_resident_bitwise_on_cuda(deep, direct_root, slots, host_layers):
    """On CUDA: staging buffers and the shared mapping page-locked (read-only registration), copies on the copy
    stream ordered by events, reads refilling a buffer only after its copy's event: the same bits as resident."""
    per_file = disk.padded_bytes(layer_bytes(ModelArgs.from_file(deep), torch.float16))
    base = Engine.from_pretrained(deep, device="cuda", dtype="float16", draft=False, offload=False)
    engine = Engine.from_pretrained(deep, device="cuda", dtype="float16", draft=False, offload=True, slots=slots,
                                    resident_layers=0, host_memory=(2 + host_layers) * per_file,
                                    offload_dir=direct_root / "cuda16", quiet=True)
    layers = engine.target.layers
    assert len(engine.residency.disk) == 6 - host_layers and layers.disk.pinned
    assert host_layers == 0 or layers.store.pinned
    want = base.generate(IDS, max_new_tokens=12, temperature=0, ignore_eos=True)[0].token_ids
    assert engine.generate(IDS, max_new_tokens=12, temperature=0, ignore_eos=True)[0].token_ids == want
    sweeps = engine.sweep_stats()
    assert all(s.disk_bytes == len(engine.residency.disk) * per_file and s.wall_s > 0 for s in sweeps)


def test_a_residency_without_a_split_streams_from_host_ram(deep):
    """Residency(offload, resident, slots, budget) as callers wrote it before the disk tier: every non-resident
    layer comes from host RAM."""
    from offload_runtime.residency import Residency
    from offload_runtime.weights.loader import build_model

    model = build_model(Checkpoint(deep), torch.device("cpu"), torch.float32, Residency(True, (1, 4), 2, None))
    assert model.layers.store.layer_ids == [0, 2, 3, 5] and model.layers.disk is None
    assert Residency(True, (1,), 2, None).split(3).host == (0, 2)
    assert Residency(True, (1,), 2, None, host=(0,), disk=(2,), prefetch=1).split(3).host == (0,)
