"""``flora bench``: what a round of local training costs with each method, against FedFFT.

Usage::

    flora bench                           # ViT-B/32 shapes, CPU, all methods (~6 min on 2 idle cores)
    flora bench --device cuda --precision bf16-mixed
    flora bench --arch tiny --batch_size 8 --steps 1 --client_samples 32 --methods FLoRA FedFFT

The CLIP has the ViT-B/32 architecture (``transformers.CLIPConfig()`` defaults) with random
weights and the offline byte-level tokenizer; inputs are synthetic CIFAR-shaped 32x32 RGB
images that CLIP preprocessing upscales to 224. Weights and pixel values change neither speed,
memory nor bytes. For each method, in a fresh process (``python -m flora_lightning.bench
--worker METHOD``) so peak memory does not mix between methods, it

1. builds the method and, when the loop would cache frozen image features (FLoRA on the text
   tower, any method whose ``image_encoder_frozen`` is true), encodes a sample of images after
   an untimed warm-up batch, takes the time per image, then releases the vision tower as the
   loop does;
2. times local optimizer steps on one batch exactly as the loop's client fit runs them
   (median of at least ``steps``, fast methods until ``min_timed_seconds``, after ``warmup``),
   and a step on the epoch's last, smaller batch; measures the peak memory of that local training
   (CPU: peak RSS via ``/proc/self/clear_refs`` + ``VmHWM``; CUDA: ``max_memory_allocated``);
3. counts trainable parameters and communicated bytes.

From these, *extrapolated* (not run end to end): seconds per local epoch = full-batch steps x
step time + the last step; seconds per round = epoch time + the one-time caching cost (``client_samples`` x time
per encoded image) amortised over ``rounds``. The loop's own overhead is measured by running the
real :class:`~flora_lightning.loop.FederatedLoop` for 2 rounds of cached FLoRA on a tiny
synthetic dataset. Results: a printed table, ``bench.json`` and ``bench.md`` in ``--out``;
every ratio is FedFFT's number over the method's (``x`` times faster, less, fewer).
"""

from flora_lightning.bench.config import (
    CIFAR10_CLASSES,
    LOOP_OVERHEAD_TARGET,
    TARGETS,
    TEMPLATE,
    VARIANTS,
    BenchConfig,
)
from flora_lightning.bench.overhead import measure_loop_overhead
from flora_lightning.bench.report import check_targets, derive, markdown
from flora_lightning.bench.run import bench_parser, config_from, main, run_bench
from flora_lightning.bench.worker import encode_samples, measure_method, run_worker
from flora_lightning.bench.workload import (
    build_clip_bundle,
    build_method,
    caption_words,
    class_names,
    preprocess,
    synthetic_datamodule,
    synthetic_images,
)

__all__ = [
    "CIFAR10_CLASSES",
    "LOOP_OVERHEAD_TARGET",
    "TARGETS",
    "TEMPLATE",
    "VARIANTS",
    "BenchConfig",
    "bench_parser",
    "build_clip_bundle",
    "build_method",
    "caption_words",
    "check_targets",
    "class_names",
    "config_from",
    "derive",
    "encode_samples",
    "main",
    "markdown",
    "measure_loop_overhead",
    "measure_method",
    "preprocess",
    "run_bench",
    "run_worker",
    "synthetic_datamodule",
    "synthetic_images",
]
