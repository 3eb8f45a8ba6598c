"""``flora bench``: what a round of local training costs with each method, against FedFFT.

Usage::

    flora bench                           # ViT-B/32 shapes, CPU, all methods (~6 min on 2 idle cores)
    flora bench --device cuda --precision bf16-mixed
    flora bench --arch tiny --batch_size 8 --steps 1 --client_samples 32 --methods '[FLoRA, FedFFT]'

The CLIP has the ViT-B/32 architecture (``transformers.CLIPConfig()`` defaults) with random
weights and the offline byte-level tokenizer; inputs are synthetic CIFAR-shaped 32x32 RGB
images that CLIP preprocessing upscales to 224. Weights and pixel values change neither speed,
memory nor bytes. For each method, in a fresh process (``python -m
flora_lightning.bench.worker``) so peak memory does not mix between methods, it

1. builds the method and, when the loop would cache frozen image features (FLoRA on the text
   tower, any method whose ``image_encoder_frozen`` is true), encodes a sample of images after
   an untimed warm-up batch, takes the time per image, then releases the vision tower as the
   loop does;
2. times local optimizer steps on one batch exactly as the loop's client fit runs them, with
   ``torch.utils.benchmark.Timer.blocked_autorange`` (median over at least ``steps`` steps and
   ``min_timed_seconds``, after ``warmup``; see :mod:`flora_lightning.bench.timing`),
   and a step on the epoch's last, smaller batch; measures the peak memory of that local training
   (CPU: peak RSS via ``/proc/self/clear_refs`` + ``VmHWM``; CUDA: ``max_memory_allocated``);
3. counts trainable parameters and communicated bytes.

From these, *extrapolated* (not run end to end): seconds per local epoch = full-batch steps x
step time + the last step; seconds per round = epoch time + the one-time caching cost
(``client_samples`` x time per encoded image) amortised over ``rounds``. The loop's own
overhead is measured by running the real :class:`~flora_lightning.federation.loop.FederatedLoop` for 2
rounds of cached FLoRA on a tiny synthetic dataset. Results: ``bench.json`` (the data) and
``bench.md`` (rendered from it with ``report_template.md``) in ``--out``, the table printed;
every ratio is FedFFT's number over the method's (``x`` times faster, less, fewer).

The public API is :func:`run_bench` and :class:`BenchConfig`; the parts live in their modules
(``config``, ``workload``, ``timing``, ``worker``, ``overhead``, ``report``, ``run``).
"""

from flora_lightning.bench.config import BenchConfig
from flora_lightning.bench.run import run_bench

__all__ = ["BenchConfig", "run_bench"]
