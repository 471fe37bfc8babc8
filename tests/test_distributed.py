"""flashloss.distributed on gloo process groups of 2 and 4 CPU processes (issue #8).

The ranks of each world size are spawned once (tests/distributed_checks.py runs every check in
every rank); each check below is one test that fails if any rank reported a failure. What the
checks assert: loss and every gradient (embeddings, logit_scale, logit_bias) equal the
single-process loss on the concatenated batch in float64 for the ring, the bidirectional ring and
the all-gather path of clip_loss, siglip_loss, info_nce and supcon_loss, with uneven local batches;
the DDP convention (rank average of the losses = single loss, embedding gradients W x the single
gradient, all-reduced scalar gradients / W = the single gradient, and a real
DistributedDataParallel model getting the single-process gradients); open_clip's ClipLoss (all four
local_loss / gather_with_grad combinations) and SigLipLoss (every dist_impl) run in the same
group give the same numbers and gradients as flashloss; mismatched D, dtype, row counts, labels,
targets or calls raise the same ValueError on every rank instead of hanging.
"""
import functools
import json
import os
import subprocess
import sys
import tempfile

import pytest

from distributed_checks import CHECKS

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
WORLD_SIZES = (2, 4)
TIMEOUT_S = 300


@functools.lru_cache(maxsize=None)
def _run_world(world: int) -> tuple:
    """Runs every check in `world` gloo processes; returns (per-rank results, error or None)."""
    tmp = tempfile.mkdtemp(prefix=f"flashloss_dist{world}_")
    init = os.path.join(tmp, "init")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([TESTS_DIR, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed blocks leave the process: RSS follows live memory
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("PYTHONWARNINGS", "ignore")
    procs = [subprocess.Popen([sys.executable, os.path.join(TESTS_DIR, "distributed_checks.py"), str(r), str(world),
                               init, os.path.join(tmp, f"rank{r}.json")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        return None, f"world size {world}: the ranks did not finish within {TIMEOUT_S} s (a hang)"
    if any(p.returncode != 0 for p in procs):
        return None, f"world size {world}: exit codes {[p.returncode for p in procs]}\n" + "\n".join(
            log[-3000:] for log in logs)
    results = []
    for r in range(world):
        with open(os.path.join(tmp, f"rank{r}.json")) as f:
            results.append(json.load(f))
    return results, None


def _results(world):
    results, error = _run_world(world)
    if error:
        raise AssertionError(error)
    return results


@pytest.mark.parametrize("check", [c for c in CHECKS if not c.startswith("record_")])
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_distributed(world, check):
    failures = {r: res.get(check, "not run") for r, res in enumerate(_results(world)) if res.get(check) != "ok"}
    assert not failures, "\n".join(f"--- rank {r}:\n{msg}" for r, msg in failures.items())


def test_ring_memory_is_a_few_local_blocks_at_any_world_size():
    """Per-rank peak extra memory of a CLIP forward+backward (fp32, 256 rows x D=2048 per rank,
    one block = 2 MiB): the ring holds a fixed number of local-sized blocks (the key block in hand,
    the next one arriving, one gradient buffer arriving and one leaving, the kernel's per-block dq
    and dk), whatever the world size; the all-gather path holds the gathered batch (2W blocks)
    and its gradient. Measured in the same processes as the checks (see distributed_checks.py)."""
    block = 256 * 2048 * 4
    for world in WORLD_SIZES:
        res = _results(world)
        assert all(r.get("record_peak_memory_ring_and_gather") == "ok" for r in res), res[0].get(
            "record_peak_memory_ring_and_gather")
        ring = max(r["recorded"]["peak_extra_ring"] for r in res) / block
        gather = min(r["recorded"]["peak_extra_gather"] for r in res) / block
        assert ring <= 7.5, f"W={world}: ring peak {ring:.1f} blocks"
        assert gather >= 2 * world, f"W={world}: all-gather peak {gather:.1f} blocks (expected >= {2 * world})"
        if world >= 4:
            assert ring < gather / 1.8, f"W={world}: ring {ring:.1f} blocks vs all-gather {gather:.1f}"


def test_without_a_process_group_the_losses_are_the_single_process_losses():
    import torch

    import flashloss
    import flashloss.distributed as fd

    gen = torch.Generator().manual_seed(0)
    img, txt = (torch.nn.functional.normalize(torch.randn(9, 5, generator=gen, dtype=torch.float64), dim=-1)
                for _ in range(2))
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 2])
    targets = torch.tensor([3, -100, 0, 8, 1, 2, 7, 6, 5])
    for impl in fd.IMPLS:
        assert torch.allclose(fd.clip_loss(img, txt, 7.0, impl=impl), flashloss.clip_loss(img, txt, 7.0))
        assert torch.allclose(fd.siglip_loss(img, txt, 5.0, -2.0, impl=impl),
                              flashloss.siglip_loss(img, txt, 5.0, -2.0))
        assert torch.allclose(fd.info_nce(img, txt, targets, impl=impl), flashloss.info_nce(img, txt, targets))
        assert torch.allclose(fd.supcon_loss(img, labels, impl=impl), flashloss.supcon_loss(img, labels))
    with pytest.raises(ValueError, match="impl must be one of"):
        fd.clip_loss(img, txt, 7.0, impl="allreduce")
    with pytest.raises(ValueError, match="impl='gather'"):
        fd.clip_loss(img, txt, 7.0, impl="ring", gather_with_grad=False)
    with pytest.raises(ValueError, match=r"image_features and text_features must have one shape"):
        fd.clip_loss(img, txt[:, :4], 7.0)  # (without a group: the single-process function's check)
    with pytest.raises(IndexError, match=r"targets must be in \[0, 9\)"):
        fd.info_nce(img, txt, torch.full((9,), 9))
    with pytest.raises(RuntimeError, match="init_process_group"):
        fd.clip_loss(img, txt, 7.0, group=object())
