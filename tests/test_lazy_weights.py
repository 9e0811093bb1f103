"""Bounded memory: mapped checkpoint weights, new big tensors spilled to scratch files, pages handed back."""
from __future__ import annotations

import os
import sys
import time

import pytest
import torch

pytest.importorskip("transformers")

import rewriter  # noqa: E402,F401
from rewriter import lazy_weights, rewrite  # noqa: E402
from rewriter.lazy_weights import WeightStore  # noqa: E402

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux's")


def make_checkpoint(folder, hidden=128, layers=2, vocab=512, dtype=torch.bfloat16) -> str:
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).to(dtype).save_pretrained(str(folder))
    return str(folder)


def rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    monkeypatch.setenv("REWRITE_SCRATCH", str(tmp_path / "scratch"))
    return tmp_path / "scratch"


@linux_only
def test_spilled_program_equals_the_in_memory_one(checkpoint, scratch, monkeypatch):
    spec = "lora{rank=4,init=gaussian},lora-merge"
    monkeypatch.setenv("REWRITE_SPILL_BYTES", "0")
    plain = rewrite(checkpoint, None, spec)
    monkeypatch.setenv("REWRITE_SPILL_BYTES", "4096")
    spilled = rewrite(checkpoint, None, spec, verify=True)
    store = spilled.store
    assert store is not None and store.stats["spilled"] >= 14          # 7 merged weights (+ corrections) × 2
    sd_plain, sd = plain.program.state_dict, spilled.program.state_dict
    assert sd.keys() == sd_plain.keys() and all(torch.equal(sd[k], sd_plain[k]) for k in sd)
    ranges = store.ranges()
    big = {k: t for k, t in sd.items() if t.numel() * t.element_size() >= 4096}
    assert big and all(store.file_backed(t, ranges) for t in big.values())   # mapped: shard or scratch file
    assert not os.listdir(scratch)                      # scratch files are unlinked as soon as they are mapped
    args = spilled.args
    with torch.no_grad():
        torch.testing.assert_close(spilled.module()(*args, **spilled.kwargs),
                                   plain.module()(*args, **plain.kwargs), rtol=0, atol=0)


@linux_only
def test_spill_keeps_the_tensor_object_its_grad_flag_and_ties(tmp_path, scratch):
    anchor = tmp_path / "anchor.bin"                   # any file makes the store active
    anchor.write_bytes(b"\0" * 4096)
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.randn(64, 64))
    module.alias = module.weight                       # a tie: one tensor under two names
    module.register_buffer("corr", torch.randint(-3, 3, (128, 64), dtype=torch.int8))
    module.small = torch.nn.Parameter(torch.randn(4))
    before = {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}
    weight = module.weight
    store = WeightStore([str(anchor)], spill_bytes=4096)
    moved = store.spill(module)
    assert moved == 64 * 64 * 4 + 128 * 64 and store.stats["spilled"] == 2
    assert module.weight is weight and module.alias is weight and weight.requires_grad
    assert store.file_backed(module.weight) and store.file_backed(module.corr)
    assert not store.file_backed(module.small)        # below the threshold: left alone
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k])
    assert store.spill(module) == 0                    # already on disk
    # still trainable: the mapping is private and writable (copy-on-write), the file is never written
    opt = torch.optim.SGD([module.weight], lr=0.1)
    (module.weight ** 2).sum().backward()
    opt.step()
    assert torch.allclose(module.weight.detach(), before["weight"] * 0.8)


@linux_only
def test_release_gives_the_pages_back(tmp_path):
    folder = make_checkpoint(tmp_path / "big", hidden=512, layers=2, vocab=4096)   # ~ 16 MB of bf16
    from rewriter import hf
    model, _, _ = hf.load_hf(folder)
    store = lazy_weights.store_for(model)
    assert store is not None
    store.release()
    base = rss_file_kib()
    total = sum(p.float().sum() for p in model.parameters())    # touch every weight
    touched = rss_file_kib() - base
    assert touched > 8 * 1024 and torch.isfinite(total)
    store.release()
    if not lazy_weights.pageout(*store.ranges()[0]):
        pytest.skip("this kernel has no MADV_PAGEOUT")
    assert rss_file_kib() - base < touched / 4


def test_no_spill_to_a_memory_file_system(tmp_path, monkeypatch):
    anchor = tmp_path / "anchor.bin"
    anchor.write_bytes(b"\0")
    monkeypatch.setattr(lazy_weights, "_on_tmpfs", lambda folder: True)
    assert WeightStore([str(anchor)]).spill_bytes == 0


def test_modules_without_a_checkpoint_get_no_store():
    assert lazy_weights.store_for(torch.nn.Linear(2, 2)) is None
    assert rewrite(torch.nn.Linear(8, 8), (torch.randn(2, 8),), "lora{rank=2}").store is None


@linux_only
def test_save_streams_and_the_program_loads(checkpoint, scratch, tmp_path, monkeypatch):
    from torch.export.pt2_archive import _package
    original = _package._get_raw_tensor_bytes
    monkeypatch.setenv("REWRITE_SPILL_BYTES", "4096")
    result = rewrite(checkpoint, None, "lora{rank=4,init=gaussian},lora-merge")
    released = []
    monkeypatch.setattr(WeightStore, "release_tensor", lambda self, t: released.append(t.shape))
    path = tmp_path / "merged.pt2"
    result.save(str(path))
    assert _package._get_raw_tensor_bytes is original               # the hook is gone after the save
    assert len(released) >= len({id(t) for t in result.program.state_dict.values()}) - 2
    loaded = torch.export.load(str(path))
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(*result.args, **result.kwargs),
                                   result.module()(*result.args, **result.kwargs), rtol=0, atol=0)
    # a failing save leaves no hook behind and no file
    monkeypatch.setattr(torch.export, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        result.save(str(tmp_path / "broken.pt2"))
    assert _package._get_raw_tensor_bytes is original and not (tmp_path / "broken.pt2").exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".rewrite-")]    # no temporary left behind
    import zipfile
    with zipfile.ZipFile(path) as z:                   # the archive is named after the file, not a temp name
        assert {i.filename.split("/")[0] for i in z.infolist()} == {"merged"}


@linux_only
def test_converted_dtype_is_spilled_at_capture(checkpoint, scratch, monkeypatch):
    """--dtype float32 on a bf16 checkpoint makes converted copies; they move to disk before the first pass."""
    monkeypatch.setenv("REWRITE_SPILL_BYTES", "4096")
    result = rewrite(checkpoint, None, "lora{rank=2}", dtype="float32")
    store = result.store
    big = [t for t in result.program.state_dict.values() if t.numel() * t.element_size() >= 4096]
    assert store.stats["spilled"] >= len(big) > 0 and all(t.dtype == torch.float32 for t in big
                                                           if t.is_floating_point())
    assert all(store.file_backed(t) for t in big)


def test_tidying_progress_forwards_a_status_and_tidies_after_each_item():
    from rewriter.api import _tidying_progress
    calls = []

    class Store:
        def tidy(self, gm):
            calls.append(("tidy", gm))

    def progress(items, description, status=None):
        calls.append(("bar", description, status() if status else None))
        return iter(items)
    wrapped = _tidying_progress(progress, Store(), "gm")
    assert list(wrapped([1, 2], "fit", lambda: "loss 0.1")) == [1, 2]
    assert calls == [("bar", "fit", "loss 0.1"), ("tidy", "gm"), ("tidy", "gm")]
    calls.clear()
    assert list(_tidying_progress(None, Store(), "gm")([7], "fit")) == [7] and calls == [("tidy", "gm")]


@linux_only
def test_governor_bounds_file_pages_during_a_forward_run(tmp_path, monkeypatch):
    """A whole-model run (activations, --verify) touches every weight between two release points; the governor
    keeps the file-backed growth near its budget."""
    folder = make_checkpoint(tmp_path / "big", hidden=512, layers=2, vocab=4096)   # ~ 16 MB of bf16
    from rewriter import hf
    model, _, _ = hf.load_hf(folder)
    store = lazy_weights.store_for(model)
    if not lazy_weights.pageout(*store.ranges()[0]):
        pytest.skip("this kernel has no MADV_PAGEOUT")
    store.release()
    base = rss_file_kib()
    peak = 0
    with store.governed(budget=2 * 2**20, interval=0.01):
        for p in model.parameters():
            p.float().sum()
            time.sleep(0.02)                      # let the governor look between tensors
            peak = max(peak, rss_file_kib() - base)
    assert store.stats.get("governor_releases", 0) >= 1
    assert peak < 8 * 1024                         # well under the ~16 MB touched in all
    assert not any(t.name == "rewrite-pager" for t in __import__("threading").enumerate())


@linux_only
def test_spilling_between_layers_creates_no_tensor_without_a_device(checkpoint, scratch, monkeypatch):
    """Device tagging: the store tidies up inside a pass's layer loop, where the fuzzer's check sets the default
    device to meta; a tensor the store made without `device=` would land on meta."""
    from tests.fuzzing import tag_pass_devices
    spec = "lora{rank=4,init=gaussian},lora-merge,monarch{blocks=2}"
    monkeypatch.setenv("REWRITE_SPILL_BYTES", "0")
    plain = rewrite(checkpoint, None, spec)
    monkeypatch.setenv("REWRITE_SPILL_BYTES", "4096")
    with tag_pass_devices():
        tagged = rewrite(checkpoint, None, spec)
    assert tagged.store.stats["spilled"] > 0
    sd, sd_plain = tagged.program.state_dict, plain.program.state_dict
    assert all(t.device.type == "cpu" for t in sd.values())
    assert sd.keys() == sd_plain.keys() and all(torch.equal(sd[k], sd_plain[k]) for k in sd)


@linux_only
def _in_memory_then_spilling(checkpoint, monkeypatch, spec: str, spill_bytes: int):
    """The program of `spec` with nothing spilled, calibrated in several chunks of layers; afterwards tensors of
    `spill_bytes` and more are spilled."""
    from rewriter import calibration
    monkeypatch.setattr(calibration, "GRAM_BUDGET", 2 * 128 * 128 * 4)       # several chunks
    monkeypatch.setenv("REWRITE_SPILL_BYTES", "0")
    plain = rewrite(checkpoint, None, spec)
    monkeypatch.setenv("REWRITE_SPILL_BYTES", str(spill_bytes))
    return plain


def test_fitted_factors_wait_for_the_rewrite_on_disk(checkpoint, scratch, monkeypatch):
    """Calibrated monarch fits its layers chunk by chunk and rewrites only after the last chunk (every chunk sees
    the program it received), so every layer's factors wait meanwhile: on TinyLlama-1.1B ~0.7 GB of anonymous
    memory. With a weight store they wait in scratch files instead, and the program is the same as in memory."""
    from rewriter import projections
    spec = "monarch{blocks=4,calibrate=2}"
    plain = _in_memory_then_spilling(checkpoint, monkeypatch, spec, 4096)
    waiting = []
    real_apply = projections.apply

    def spy(gm, site, fac, **kwargs):
        waiting.append(fac)
        return real_apply(gm, site, fac, **kwargs)
    monkeypatch.setattr(projections, "apply", spy)
    result = rewrite(checkpoint, None, spec)
    store = result.store
    big = [t for fac in waiting for t in fac.factors.values() if t.numel() * t.element_size() >= 4096]
    assert len(waiting) == 14 and big
    ranges = store.ranges()
    assert all(store.file_backed(t, ranges) for t in big)
    sd, sd_plain = result.program.state_dict, plain.program.state_dict
    assert sd.keys() == sd_plain.keys() and all(torch.equal(sd[k], sd_plain[k]) for k in sd)


def rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon"))


@linux_only
def test_a_teacher_copy_maps_the_checkpoint_instead_of_holding_it(tmp_path, scratch):
    """heal's teacher on a memory-mapped checkpoint: its big weights are second
    private mappings of the same file bytes — equal, frozen, file-backed, costing no anonymous memory — and a
    write to either copy stays its own; a weight already changed in place is copied (to scratch), not remapped."""
    folder = make_checkpoint(tmp_path / "big", hidden=512, layers=2, vocab=4096)     # ~ 16 MB of bf16
    from rewriter import hf
    from rewriter.pass_manager import _frozen_copy
    model, _, _ = hf.load_hf(folder)
    store = lazy_weights.store_for(model)
    big = [p for p in model.parameters() if p.numel() * p.element_size() >= store.spill_bytes]
    assert len(big) >= 8
    with torch.no_grad():
        big[1].mul_(2)                                         # written in place: no longer the file's bytes
    anon, spilled = rss_anon_kib(), store.stats["spilled"]
    teacher = _frozen_copy(model, store)
    grown = rss_anon_kib() - anon
    assert store.stats["spilled"] - spilled == 1               # big[1] went to scratch; the rest are remapped
    pairs = dict(zip(map(id, model.parameters()), teacher.parameters()))
    ranges = store.ranges()
    for p in big:
        twin = pairs[id(p)]
        assert isinstance(twin, torch.nn.Parameter) and not twin.requires_grad
        assert torch.equal(twin, p) and twin.data_ptr() != p.data_ptr() and store.file_backed(twin, ranges)
    assert grown * 1024 < sum(p.numel() * p.element_size() for p in big) / 4
    before = pairs[id(big[0])].clone()
    with torch.no_grad():
        big[0].add_(1)
    assert torch.equal(pairs[id(big[0])], before)
    with torch.no_grad():
        pairs[id(big[2])].zero_()
    assert big[2].abs().sum() > 0


@linux_only
def test_heal_on_a_mapped_checkpoint_learns_from_the_original(tmp_path, scratch):
    folder = make_checkpoint(tmp_path / "ckpt", hidden=128, layers=2, vocab=512, dtype=torch.float32)
    r = rewrite(folder, None, "lowrank{ratio=0.5,calibrate=4},heal{steps=3,samples=4,seq=8,batch=2}")
    heal = next(p for p in r.report.passes if p.name == "heal")
    site = next(s for s in heal.sites if s["site"] == "program")
    assert site["loss_before"] > 0 and site["loss_after"] <= site["loss_before"]


@linux_only
def test_release_frees_pages_both_the_model_and_its_teacher_have_read(tmp_path, scratch):
    """After the model and its frozen twin have both read every weight, each page is mapped twice; the kernel's
    page-out skips such pages, so release first unmaps the twins' (clean) side. A twin still reads its bytes."""
    folder = make_checkpoint(tmp_path / "big", hidden=512, layers=2, vocab=4096)     # ~ 16 MB of bf16
    from rewriter import hf
    from rewriter.pass_manager import _frozen_copy
    model, _, _ = hf.load_hf(folder)
    store = lazy_weights.store_for(model)
    teacher = _frozen_copy(model, store)
    if not lazy_weights.pageout(*store.ranges()[0]):
        pytest.skip("this kernel has no MADV_PAGEOUT")
    store.release()
    base = rss_file_kib()
    expected = [p.float().sum() for p in teacher.parameters()]
    total = sum(expected) + sum(p.float().sum() for p in model.parameters())     # both copies read in full
    touched = rss_file_kib() - base
    assert touched > 16 * 1024 and torch.isfinite(total)
    store.release()
    assert rss_file_kib() - base < touched / 4
    assert [p.float().sum() for p in teacher.parameters()] == expected           # re-read from the file


def cached_fraction(ranges) -> float:
    """The fraction of the pages of these file mappings that are in the page cache (mincore)."""
    import ctypes
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)
    cached = total = 0
    for lo, hi in ranges:
        pages = (hi - lo + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        assert libc.mincore(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), vec) == 0
        cached += sum(b & 1 for b in vec)
        total += pages
    return cached / max(total, 1)


@linux_only
def test_release_keeps_clean_pages_cached_and_written_ones_resident(tmp_path):
    """release unmaps never-written mappings (their pages stay in the page cache: reading them again takes no
    disk read) and only pages out a mapping with pages written in place, whose values must survive."""
    folder = make_checkpoint(tmp_path / "big", hidden=512, layers=2, vocab=4096)   # ~ 16 MB of bf16
    for name in os.listdir(folder):      # written back to disk: only clean pages can leave the page cache
        with open(os.path.join(folder, name), "rb") as f:
            os.fsync(f.fileno())
    from rewriter import hf
    model, _, _ = hf.load_hf(folder)
    store = lazy_weights.store_for(model)
    params = [p for p in model.parameters() if p.numel() * p.element_size() >= 2**20]
    sums = [float(p.float().sum()) for p in params]                 # every page read once: now cached
    store.release()
    ranges = store.ranges()
    assert cached_fraction(ranges) > 0.9                             # still in the page cache (page-out: ~0)
    base = rss_file_kib()
    assert [float(p.float().sum()) for p in params] == sums
    assert rss_file_kib() - base > 8 * 1024                          # (and they were out of RSS after release)
    with torch.no_grad():
        params[0][0].add_(1)                                         # one page written: its mapping keeps it
    written = params[0].clone()
    assert any(w for *_, w in lazy_weights.file_mappings(store._paths))
    store.release()
    assert torch.equal(params[0], written)
    with store.reading():
        assert store._readers == 1
    assert store._readers == 0


@linux_only
def test_shiftadd_fits_wait_for_the_rewrite_on_disk(checkpoint, scratch, monkeypatch):
    """The same for shiftadd's packed fits (4.5 bits per weight: ~0.6 GB on TinyLlama-1.1B), same program."""
    from passes import shiftadd
    spec = "shiftadd{bits=4,group=32,calibrate=2}"
    plain = _in_memory_then_spilling(checkpoint, monkeypatch, spec, 1024)
    waiting = []
    real_replace = shiftadd.ShiftAddPass._replace

    def spy(self, gm, site, q, calibrated):
        waiting.append(q)
        return real_replace(self, gm, site, q, calibrated)
    monkeypatch.setattr(shiftadd.ShiftAddPass, "_replace", spy)
    result = rewrite(checkpoint, None, spec)
    store = result.store
    big = [t for q in waiting for t in (q.signs, q.scales, q.offsets) if t.numel() * t.element_size() >= 1024]
    assert len(waiting) == 14 and big
    ranges = store.ranges()
    assert all(store.file_backed(t, ranges) for t in big)
    sd, sd_plain = result.program.state_dict, plain.program.state_dict
    assert sd.keys() == sd_plain.keys() and all(torch.equal(sd[k], sd_plain[k]) for k in sd)
