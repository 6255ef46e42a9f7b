"""Run by tests/test_tp.py under `torchrun --nproc-per-node 2`: for each checkpoint of checkpoints.py,
load it split over the 2 ranks and, in one process on each rank, whole (`llama3.load(..., plain=True)`,
the checkpoint readers' own path); print one JSON line per rank and case with what the test checks:
the largest logit difference, whether greedy and seeded tokens agree, the weight bytes each holds.
Also: the resident memory a load of the medium model costs, and the engine path (rank 0 leads
batched steps, rank 1 follows)."""

import gc
import time
import json
import os
import sys

import torch
import torch.distributed as dist

import llama3
from llama3.generate import GenerationSettings, TokenGeneration
from llama3.parallel import lockstep, tp
from llama3.params import count_params, per_rank_params

paths = json.loads(sys.argv[1])
RANK = int(os.environ["RANK"])


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def report(**fields) -> None:
    for turn in range(2):  # one rank at a time, so lines never interleave
        if turn == RANK:
            print("RESULT " + json.dumps({"rank": RANK, **fields}), flush=True)
        dist.barrier()


def tokens(model, prompt, settings, rank0_samples):
    run = TokenGeneration(model, [prompt], settings)
    if rank0_samples:
        tp.sample_on_rank0(run)
    list(run)
    return run.tokens[0]


tp.init_mesh(2)
lockstep.always_inside()   # this test runs the same forwards on both ranks

# resident memory: what a split load of 60 MB of weights costs each rank (after a first load of a tiny
# model, so that imports and the process group's first buffers are not counted)
del tp.load_tp(paths["gqa-untied/hf"], 2).model
gc.collect()
before = rss_bytes()
medium = tp.load_tp(paths.pop("medium"), 2)
gc.collect()
report(case="medium", rss=rss_bytes() - before, local=tp.local_weight_bytes(medium.model),
       whole=count_params(medium.config).total * 4, planned=per_rank_params(medium.config, 2) * 4)
del medium
gc.collect()

prompt = torch.randint(0, 90, (9,), generator=torch.Generator().manual_seed(0)).tolist()
greedy = GenerationSettings(max_new_tokens=4)
seeded = GenerationSettings(max_new_tokens=4, temperature=0.9, top_p=0.95, seed=3)
for case, path in paths.items():
    begin = time.perf_counter()
    split = tp.load_tp(path, 2)
    whole = llama3.load(path, plain=True)
    with torch.inference_mode():
        x = torch.tensor([prompt])
        diff = float((split.model(x) - whole.model(x)).abs().max())
    same = all(tokens(split.model, prompt, s, True) == tokens(whole.model, prompt, s, False) for s in (greedy, seeded))
    report(case=case, seconds=time.perf_counter() - begin, diff=diff, same_tokens=same,
           local=tp.local_weight_bytes(split.model),
           whole=tp.local_weight_bytes(whole.model), planned=per_rank_params(split.config, 2) * 4)

# the engine path of chat/serve: rank 0 schedules two prompts of different lengths into batched steps
from llama3.engine import Engine  # noqa: E402

lockstep.leave()  # from here on only lead/follow may run forwards
path = paths["gqa-untied/hf"]
split, whole = tp.load_tp(path, 2), llama3.load(path, plain=True)
prompts = [prompt, prompt[:4] + prompt[:2]]
engine = lockstep.shared_engine(split.model, None)
if RANK == 0:
    got = [r.token_ids for r in engine.run(prompts, seeded)]
    lockstep.stop_followers()
    want = [r.token_ids for r in Engine(whole.model, None).run(prompts, seeded)]
    print("RESULT " + json.dumps({"rank": 0, "case": "engine", "same_tokens": got == want, "steps": engine.steps}),
          flush=True)
else:
    lockstep.follow(engine)
tp.finish()
