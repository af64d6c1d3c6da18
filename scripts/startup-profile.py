"""CPU-time breakdown of `difftune train` up to its first optimizer step, in one process:
    PYTHONPATH=src python scripts/startup-profile.py CONFIG.yaml [key=value ...]
(BENCHMARKS.md section 4)."""
import sys, time, json
T0 = time.process_time(); W0 = time.time()
marks = []
def mark(name): marks.append((name, time.process_time(), time.time()))
import torch; mark("import torch")
import accelerate, diffusers, transformers, peft; import diffusers.optimization; mark("import accelerate, diffusers, transformers, peft")
from difftune import train as T
from difftune.families import base
from difftune.data import cache
from difftune.config import load_config
mark("import difftune")
def wrap(obj, name, label):
    f = getattr(obj, name)
    def g(*a, **k):
        mark(f"before {label}"); r = f(*a, **k); mark(label); return r
    setattr(obj, name, g)
wrap(base.Family, "load", "load parts")
wrap(T, "attach_method", "attach LoRA")
wrap(cache.PromptFeatures, "table", "encode prompts")
wrap(cache.ImageFeatures, "prepare", "encode images")
from torch.optim.optimizer import register_optimizer_step_post_hook
done = []
def hook(*a):
    if not done: mark("first optimizer step"); done.append(1)
register_optimizer_step_post_hook(hook)
cfg = load_config(sys.argv[1], sys.argv[2:])
T.train(cfg, log=lambda *a: None)
prev_c, prev_w = T0, W0
for name, c, w in marks:
    if name.startswith("before "):
        print(f"  (other work before {name[7:]}: {c - prev_c:.2f} s CPU)")
    else:
        print(f"{name:45s} {c - prev_c:6.2f} s CPU   {w - prev_w:6.2f} s wall")
    prev_c, prev_w = c, w
    if name == "first optimizer step": break
print(f"TOTAL to first step: {[c for n,c,w in marks if n=='first optimizer step'][0] - T0:.2f} s CPU")
