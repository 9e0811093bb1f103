"""Per-layer work through PassContext.map_layers: here, in a worker pool, on a device — the same results."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest
import torch

from rewriter import parallel, params, rewrite
from rewriter.errors import InternalError, UserError
from rewriter.matchers.linear import find_linears
from rewriter.pass_base import Contract, Pass
from rewriter.parallel import Executor, pack, unpack


# ---- module-level functions (a worker finds them by name) ---------------------------------------------------
def fit_lowrank(w: torch.Tensor, rank: int, seed: int):
    """A per-layer fit with the ingredients of the real ones: a seeded perturbation, an SVD, an eigh, a matmul."""
    gen = torch.Generator().manual_seed(int(seed))
    x = w.float() + 1e-3 * torch.randn(w.shape, generator=gen)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    evals, _ = torch.linalg.eigh(x.t() @ x)
    approx = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return approx.to(w.dtype), {"tail": float(s[rank:].square().sum()), "top": evals[-2:], "name": "svd"}


def fail_on_second(index: int):
    if index == 1:
        raise ValueError("layer 1 is bad")
    return index


@dataclass(frozen=True)
class ProjectViaMapLayers(Pass):
    """A test pass that projects every linear weight through map_layers (as the issue-13 passes do)."""

    name = "test-project"
    contract = Contract.APPROXIMATE
    rank: int = 4

    def run(self, ctx) -> None:
        sites = find_linears(ctx.gm)
        items = [(s.weight_out_in(ctx.gm).detach(), self.rank, i) for i, s in enumerate(sites)]
        for site, (approx, info) in zip(sites, ctx.map_layers(fit_lowrank, items, "projecting")):
            params.set_tensor(ctx.gm, site.weight_name, approx if site.layout == "out_in" else approx.t())
            ctx.site(site.name, tail=info["tail"])


def _items(n=6, shape=(256, 512), dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(shape, generator=gen).to(dtype), 8, i) for i in range(n)]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


# ---- the executor ------------------------------------------------------------------------------------------------
def test_pool_and_here_are_bit_identical(monkeypatch):
    monkeypatch.setattr(parallel, "POOL_MIN_BYTES", 0)     # small items, still through the pool
    items = _items()
    with parallel.session(jobs=1) as one:
        here = one.map(fit_lowrank, items)
    with parallel.session(jobs=2) as two:
        pooled = two.map(fit_lowrank, items)
    assert one.stats["pool_items"] == 0 and two.stats["pool_items"] == len(items)
    assert _same(here, pooled)
    assert here[0][0].dtype == torch.bfloat16 and here[0][0].shape == (256, 512)


def test_results_keep_item_order_and_window_bounds_memory(monkeypatch):
    monkeypatch.setattr(parallel, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(parallel, "IN_FLIGHT_PER_JOB", 1)
    items = [(torch.full((4,), float(i)), 1, i) for i in range(7)]
    seen = []

    def progress(it):
        for item in it:
            seen.append(item[2])
            yield item
    with parallel.session(jobs=2) as ex:
        out = ex.map(fit_lowrank_vector, items, progress)
    assert [int(o) for o in out] == list(range(7)) and seen == list(range(7))


def fit_lowrank_vector(v: torch.Tensor, rank: int, seed: int):
    return v[0].clone()


def test_worker_errors_reach_the_caller(monkeypatch):
    monkeypatch.setattr(parallel, "POOL_MIN_BYTES", 0)
    with parallel.session(jobs=2) as ex:
        with pytest.raises(ValueError, match="layer 1 is bad"):
            ex.map(fail_on_second, [(i,) for i in range(3)])
    with pytest.raises(ValueError, match="layer 1 is bad"):
        Executor().map(fail_on_second, [(i,) for i in range(3)])


def test_pool_refuses_functions_it_cannot_send(monkeypatch):
    monkeypatch.setattr(parallel, "POOL_MIN_BYTES", 0)
    with parallel.session(jobs=2) as ex:
        with pytest.raises(TypeError, match="module-level function"):
            ex.map(lambda x: x, [(torch.ones(2),), (torch.ones(2),)])
    # in this process a closure is fine (nothing is pickled)
    assert Executor(jobs=1).map(lambda x: x * 2, [(torch.ones(2),)])[0].tolist() == [2.0, 2.0]


def test_small_work_stays_in_this_process():
    with parallel.session(jobs=2) as ex:
        ex.map(fit_lowrank, _items(n=2, shape=(8, 8)))
    assert ex.stats["pool_items"] == 0 and ex._pool is None


def test_here_runs_with_one_thread_and_restores_the_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threads = Executor().map(_thread_count, [(0,)])
        assert threads == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _thread_count(_):
    return torch.get_num_threads()


def test_dataclass_results_come_back_whole(monkeypatch):
    from rewriter.projections import Factored, monarch_project
    monkeypatch.setattr(parallel, "POOL_MIN_BYTES", 0)
    items = [(w.float(), 4) for w, _, _ in _items(n=3, shape=(64, 96))]
    with parallel.session(jobs=2) as ex:
        pooled = ex.map(monarch_project, items)
    here = Executor().map(monarch_project, items)
    assert all(isinstance(f, Factored) for f in pooled) and ex.stats["pool_items"] == 3
    assert all(a.factors.keys() == b.factors.keys() and all(torch.equal(a.factors[k], b.factors[k])
                                                            for k in a.factors) and a.info == b.info
               for a, b in zip(here, pooled))


def test_pack_round_trip_without_shared_memory():
    value = {"w": torch.randn(3, 5).to(torch.bfloat16), "c": torch.tensor([-3, 4], dtype=torch.int8),
             "m": torch.tensor([True, False]), "e": torch.empty(0, 4), "t": (torch.ones(2, requires_grad=True), 7),
             "s": "name", "n": None}
    back = unpack(pack(value))
    assert _same({k: v for k, v in back.items() if k != "t"}, {k: v for k, v in value.items() if k != "t"})
    assert back["t"][0].requires_grad and back["t"][1] == 7
    assert not value["w"].is_shared()          # packing copied bytes; the caller's storage was left alone


def test_device_plumbing_creates_no_tensor_without_a_device():
    """Every tensor the executor makes names its device: with the default device set to meta, a tensor created
    without `device=` would land there and the results below would not be real CPU tensors."""
    items = _items(n=2, shape=(16, 8))
    expected = Executor().map(fit_lowrank, items)
    torch.set_default_device("meta")
    try:
        unpacked = unpack(pack(items))
        moved = Executor(device=torch.device("cpu"))._on_device(_identity, items[0], torch.device("cpu"))
        empty = unpack(pack((torch.empty(0, 3, device="cpu"),)))
    finally:
        torch.set_default_device(None)
    assert all(t.device.type == "cpu" for t in parallel._tensors(unpacked)) and _same(unpacked, items)
    assert moved[0].device.type == "cpu" and empty[0].device.type == "cpu"
    assert _same(Executor().map(fit_lowrank, unpacked), expected)


def _identity(*item):
    return item


def test_results_go_back_to_the_items_device():
    item = (torch.ones(2, 3), 2)
    out = Executor(device=torch.device("meta"))._on_device(_shape_of, item, torch.device("meta"))
    assert out == (2, 3)
    assert parallel.home_device(item).type == "cpu" and parallel.home_device((1, "x")).type == "cpu"


def _shape_of(t, n):
    assert t.device.type == "meta"     # the work ran on the requested device
    return tuple(t.shape)


def test_bad_jobs_and_missing_gpu_are_user_errors():
    with pytest.raises(UserError, match="--jobs"):
        with parallel.session(jobs=0):
            pass
    with pytest.raises(UserError, match="bad --device"):
        parallel.check_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            parallel.check_device("cuda")


def test_main_module_is_hidden_only_while_workers_start():
    main = sys.modules["__main__"]
    had_file, file = hasattr(main, "__file__"), getattr(main, "__file__", None)
    spec = getattr(main, "__spec__", None)
    with parallel._main_module_hidden():
        assert getattr(main, "__file__", None) is None and main.__spec__ is None
    assert hasattr(main, "__file__") == had_file and getattr(main, "__file__", None) == file
    assert main.__spec__ is spec


# ---- through a pass, the API and the CLI -------------------------------------------------------------------------
def _stack():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(96, 128), torch.nn.GELU(), torch.nn.Linear(128, 96),
                               torch.nn.GELU(), torch.nn.Linear(96, 64)), (torch.randn(4, 96),)


def test_map_layers_in_a_pass_gives_the_same_program_for_any_jobs(monkeypatch):
    monkeypatch.setattr(parallel, "POOL_MIN_BYTES", 0)
    model, args = _stack()
    one = rewrite(model, args, ProjectViaMapLayers(rank=4), jobs=1)
    two = rewrite(model, args, ProjectViaMapLayers(rank=4), jobs=2)
    sd1, sd2 = one.program.state_dict, two.program.state_dict
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert [s["tail"] for s in one.report.passes[0].sites] == [s["tail"] for s in two.report.passes[0].sites]
    assert not torch.equal(sd1["0.weight"], model[0].weight)       # it did project


def test_a_pass_with_a_closure_is_an_internal_error_in_a_pool(monkeypatch):
    monkeypatch.setattr(parallel, "POOL_MIN_BYTES", 0)

    @dataclass(frozen=True)
    class ClosurePass(Pass):
        name = "test-closure"
        contract = Contract.APPROXIMATE

        def run(self, ctx) -> None:
            ctx.map_layers(lambda w: w, [(s.weight_out_in(ctx.gm),) for s in find_linears(ctx.gm)], "x")

    model, args = _stack()
    with pytest.raises(InternalError, match="module-level function"):
        rewrite(model, args, ClosurePass(), jobs=2)


def test_cli_jobs_and_device_flags(capsys):
    from rewriter.cli import main
    assert main(["demo:tiny-gpt", "--pass", "lora{rank=2}", "--jobs", "0"]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err
    assert main(["demo:tiny-gpt", "--pass", "lora{rank=2}", "--device", "tpu"]) == 2
    assert "use cpu, cuda or cuda:N" in capsys.readouterr().err
    assert main(["demo:tiny-gpt", "--pass", "lora{rank=2}", "--device", "mps"]) == 2
    assert "only cpu and cuda" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["demo:tiny-gpt", "--pass", "lora{rank=2}", "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "no CUDA device" in err and "\n" not in err.strip()
    assert main(["demo:tiny-gpt", "--pass", "lora{rank=2}", "--jobs", "2", "--device", "cpu", "-q"]) == 0
