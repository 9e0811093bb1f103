"""Data-parallel `heal` (rewriter/distributed.py): 2 processes with gloo on the CPU, launched the way torchrun
launches them (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK), against one process with the same global
batch."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available in this build")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# accum=2 over 2 ranks: each rank takes 1 micro-batch per step, so every step averages the gradients of the same
# 2 micro-batches as one process with accum=2 (tiny-gpt's static batch of 2 rows: 8 batches, 1 held out, 7 training
# batches, cycled identically — rewriter/distributed.shard). The scalings involved (1/accum, DDP's 1/W) are powers
# of two, so (g₁ + g₂)/2 and g₁/2 + g₂/2 agree bit for bit: the result equals the single process's exactly.
SPEC = "monarch{blocks=2,calibrate=8},heal{mode=both,steps=4,lr=1e-3,samples=16,seq=16,batch=4,accum=2}"
WORKER = textwrap.dedent(f"""
    import sys, torch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from rewriter import rewrite
    from rewriter.demo_models import demo_model
    model, args = demo_model("tiny-gpt")
    if len(sys.argv) > 3:                   # the tied embedding scaled: self-samples that leave something to heal
        with torch.no_grad():
            model.tok_emb.weight.mul_(float(sys.argv[3]))
    r = rewrite(model, args, passes=sys.argv[2] if len(sys.argv) > 2 else {SPEC!r}, jobs=1)
    heal = next(p for p in r.report.passes if p.name == "heal")
    site = next(s for s in heal.sites if s["site"] == "program")
    torch.save({{"state": dict(r.program.state_dict), "site": site, "messages": heal.messages}}, sys.argv[1])
    from rewriter import distributed
    distributed.close()
""")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, world: int, timeout: float = 240, spec: str = SPEC, embedding_scale: float | None = None):
    """Run WORKER in `world` processes (torchrun's environment); returns each rank's saved result."""
    for attempt in range(3):                        # a port taken between choosing it and binding it: retry
        port = _free_port()
        procs, outs = [], []
        for r in range(world):
            env = dict(os.environ, PYTHONPATH=ROOT, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                       WORLD_SIZE=str(world), LOCAL_RANK=str(r), OMP_NUM_THREADS="1")
            outs.append(tmp_path / f"w{world}_r{r}_{attempt}.pt")
            extra = [] if embedding_scale is None else [str(embedding_scale)]
            procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(outs[-1]), spec, *extra], env=env,
                                          cwd=ROOT,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        logs = []
        try:
            for p in procs:
                logs.append(p.communicate(timeout=timeout))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
                p.communicate()
            pytest.fail(f"a rank of the {world}-process heal did not finish within {timeout} s (hang?)")
        codes = [p.returncode for p in procs]
        if all(c == 0 for c in codes):
            return [torch.load(o, weights_only=False) for o in outs]
        if not any("address already in use" in err.lower() for _, err in logs):
            break
    pytest.fail(f"exit codes {codes}\n" + "\n".join(err[-3000:] for _, err in logs))


def test_two_ranks_end_identical_and_match_one_process(tmp_path):
    ranks = _launch(tmp_path, 2)
    (single,) = _launch(tmp_path, 1)
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys() == single["state"].keys()
    for k in a:                                                  # every rank ends with the same parameters
        assert torch.equal(a[k], b[k]), k
    s2, s1 = ranks[0]["site"], single["site"]
    assert s2["ranks"] == 2 and "ranks" not in s1
    assert s2["steps"] == s1["steps"] == 4
    assert s2["loss_before"] == s1["loss_before"]               # the same calibration data, rank 0's
    assert s2["loss_after_layer"] == s1["loss_after_layer"]     # the layer stage runs on rank 0, then broadcast
    # the same global batch per step (and exact scalings, see SPEC): the same training, bit for bit
    assert s2["train_loss_first"] == s1["train_loss_first"] and s2["train_loss_last"] == s1["train_loss_last"]
    assert s2["loss_after"] == s1["loss_after"]
    for k in a:
        assert torch.equal(a[k], single["state"][k]), k
    assert any("held-out KL" in m for m in ranks[0]["messages"])


def test_shard_takes_every_wth_position_of_the_cycled_sequence(monkeypatch):
    from rewriter import distributed
    batches = list("abc")                   # 3 batches, 2 ranks: one process cycles a b c a b c …
    monkeypatch.setenv("WORLD_SIZE", "2")
    got = {}
    for r in (0, 1):
        monkeypatch.setenv("RANK", str(r))
        got[r] = distributed.shard(batches, accum=2)
    assert got[0] == (["a", "c", "b"], 1) and got[1] == (["b", "a", "c"], 1)
    monkeypatch.setenv("RANK", "0")
    assert distributed.shard(batches, accum=3)[1] == 2          # global batch 4 > 3 (documented)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.shard(batches, accum=3) == (batches, 3)


def test_trained_parameters_the_loss_does_not_reach_do_not_stall_ddp(tmp_path):
    # train=all trains every floating-point parameter, some of which the monarch program no longer reads: DDP
    # (static_graph) must find them instead of failing the reduction, and the ranks still end identical
    a, b = (r["state"] for r in _launch(tmp_path, 2, spec="monarch{blocks=2},heal{steps=2,train=all,lr=1e-5,"
                                                          "samples=8,seq=16,batch=4}"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


SHARDED = "heal{mode=e2e,steps=4,lr=1e-3,samples=16,seq=16,batch=4,accum=2,shard=true,units=4"


@pytest.mark.parametrize("spec", [
    "monarch{blocks=2,calibrate=0}," + SHARDED + ",train=all}",   # data-free factors; the tied embedding trains too
    "shiftadd{bits=4,calibrate=0}," + SHARDED + "}",              # scales trained through straight-through ops
    "softplus-attn{fit_steps=0}," + SHARDED + "}",                # LoRA branches added for training, merged after
    # (fit_steps=0: with its projections fitted softplus-attn leaves this tiny model nothing to heal)
], ids=["monarch-train-all", "shiftadd", "softplus-lora"])
def test_sharded_heal_trains_as_one_process_does_holding_half_of_every_tensor(tmp_path, spec):
    # FSDP (rewriter/fsdp.py): each rank holds half of every tensor of the training copies (student and teacher),
    # in 4 units gathered one at a time; the gradients are reduce-scattered (averaged) where DDP all-reduces
    # them, so with the scalings of SPEC the two ranks end with the program one process trains, bit for bit.
    # The embedding scaled by 0.2 leaves something to heal (test_heal._healable).
    ranks = _launch(tmp_path, 2, spec=spec, embedding_scale=0.2)
    (single,) = _launch(tmp_path, 1, spec=spec, embedding_scale=0.2)
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys() == single["state"].keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    s2, s1 = ranks[0]["site"], single["site"]
    assert s2["shard_units"] == 4 and "shard_units" not in s1
    assert 0.45 <= s2["shard_fraction"] <= 0.55
    assert s2["steps"] == s1["steps"] == 4 and s2["loss_before"] == s1["loss_before"]
    assert s2["loss_after"] < 0.7 * s2["loss_before"]           # it trained, and the training was kept
    assert s2["train_loss_first"] == s1["train_loss_first"] and s2["train_loss_last"] == s1["train_loss_last"]
    assert s2["loss_after"] == s1["loss_after"]
    for k in a:
        assert torch.equal(a[k], single["state"][k]), k
    assert any("shard=true" in m for m in single["messages"])     # one process: said, and trained unsharded


def test_a_program_that_writes_in_place_is_refused_for_sharding():
    # FSDP hooks each unit's outputs for backward; an in-place write into one would bypass the hook (wrong gradients)
    from torch.fx.experimental.proxy_tensor import make_fx
    from rewriter import fsdp
    from rewriter.errors import UserError
    def split_of(fn):
        root = torch.nn.Module()
        root.add_module("submod_0", make_fx(fn)(torch.ones(3)))
        return root
    with pytest.raises(UserError, match="writes in place"):
        fsdp._refuse_in_place(split_of(lambda x: x.mul_(2)))
    fsdp._refuse_in_place(split_of(lambda x: x * 2))
