"""Run by tests/test_tp.py under torchrun: load a tiny random model split over 2 ranks and print, per rank,
the largest logit difference from one process, whether seeded tokens agree, and the weight bytes held."""
import sys, torch
from llama3.config import ModelConfig
from llama3.model import Transformer
from llama3.llm import LLM
from llama3.checkpoint import save_checkpoint
from llama3.parallel import tp
from llama3.generate import TokenGeneration, GenerationSettings
fmt, path = sys.argv[1], sys.argv[2]
cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=96, max_seq_len=64, tie_embeddings=False)
ref = Transformer(cfg).init_weights(seed=1).eval()
import os
if os.environ["RANK"] == "0" and not os.path.exists(path): save_checkpoint(LLM(ref, cfg), path, format=fmt)
import time; time.sleep(2)
llm = tp.load_tp(path, 2)
tok = torch.randint(0, 100, (1, 10), generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    a = llm.model(tok); b = ref(tok)
g = TokenGeneration(llm.model, [tok[0].tolist()], GenerationSettings(max_new_tokens=8, temperature=0.9, seed=3))
tp.sample_on_rank0(g); list(g)
r = TokenGeneration(ref, [tok[0].tolist()], GenerationSettings(max_new_tokens=8, temperature=0.9, seed=3)); list(r)
import torch.distributed as dist
for turn in range(2):  # one rank at a time, so the lines do not interleave
    if turn == tp.rank():
        print(tp.rank(), fmt, float((a-b).abs().max()), g.tokens == r.tokens, tp.local_weight_bytes(llm.model), tp.local_weight_bytes(ref), flush=True)
    dist.barrier()
tp.finish()
