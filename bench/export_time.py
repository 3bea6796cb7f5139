#!/usr/bin/env python3
"""Seconds of the export (quantize_within_budget: the budget search, GPTQ, compression) on the full-size model.

The weights are the dry run's (bench/artifact_size.init_model: real shapes, initial weights), the GPTQ Hessians come
from one random TRAIN_SEQ_LEN sequence, and SRC is a folder holding the train_gpt.py to time, so two versions can be
compared side by side on one machine:

    python bench/export_time.py . [KNOB=VALUE ...]
    python bench/export_time.py /tmp/old_checkout [KNOB=VALUE ...]
"""
import os
import sys
import time

src = os.path.abspath(sys.argv[1])
sys.path.insert(0, src)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import train_gpt as tg  # noqa: E402
from artifact_size import gptq_names, init_model  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
h = tg.Hyperparameters.from_env(dict(a.split("=", 1) for a in sys.argv[2:]))
model = init_model(h)
names = gptq_names(model, h, h.gptq_embed)
x = torch.randint(2, h.vocab_size, (1, h.train_seq_len), generator=torch.Generator().manual_seed(0))
t0 = time.perf_counter()
hessians = tg.collect_hessians(model, [(x, x)], names, tg.Runtime(torch.device("cpu")))
print(f"hessians {len(hessians)} in {time.perf_counter() - t0:.1f}s", flush=True)
t0 = time.perf_counter()
blob = tg.quantize_within_budget(model, h, hessians, tg.model_config(h, False), print)
print(f"export {src}: {len(blob)} bytes in {time.perf_counter() - t0:.1f}s (code {tg.code_bytes()})", flush=True)
