"""One method's local-training cost, measured in a fresh process (so memory peaks never mix).

``python -m flora_lightning.bench.worker --cfg JSON --variant METHOD`` measures one method and
writes ``<cfg.out>/workers/<METHOD>.json``; its options come from :func:`write_result`'s typed
signature (jsonargparse). ``flora bench`` starts it once per method.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from flora_lightning.bench.config import BenchConfig
from flora_lightning.bench.timing import time_steps
from flora_lightning.bench.workload import build_method, preprocess, synthetic_images


def measure_method(cfg: BenchConfig, variant: str) -> dict:
    """One method's local-training cost, in this process (run it in a fresh one)."""
    import lightning as L
    import peft  # noqa: F401  (every library is loaded before the runtime's memory is read)
    import torch
    from transformers import CLIPModel  # noqa: F401

    from flora_lightning.callbacks.memory import PeakMemoryMeter, release_free_memory
    from flora_lightning.federation.step_capture import plan_capture

    load_at_start = os.getloadavg()[0]
    torch.manual_seed(cfg.seed)
    fabric = L.Fabric(accelerator=cfg.device, devices=1, precision=cfg.precision)
    meter = PeakMemoryMeter(fabric.device)
    # What the process holds before any model exists: the runtime (interpreter, libraries,
    # on CPU also CUDA libraries of a CUDA build of torch). Zero-ish on CUDA.
    release_free_memory()
    runtime = meter.current_bytes()
    t0 = time.perf_counter()
    module = build_method(variant, cfg.arch, cfg.num_classes)
    module = fabric.setup_module(module).module
    build_seconds = time.perf_counter() - t0
    cached = module.image_encoder_frozen and not variant.endswith("-uncached")
    labels = torch.arange(cfg.batch_size) % cfg.num_classes
    if cached:
        inputs, result = measure_caching(cfg, fabric, module)
    else:
        inputs, result = measure_loading(cfg, module)
    batch = fabric.to_device((inputs, labels))
    release_free_memory()
    capture = plan_capture(fabric.device, cfg.cuda_graphs, cfg.compile == "on")
    meter.start()
    result |= measure_steps(cfg, fabric, module, batch, capture)
    memory = meter.stop()
    result |= describe(module, variant, cached, capture)
    result |= {
        "peak_memory_bytes": memory.peak_bytes,
        "memory_at_start_bytes": memory.start_bytes,
        "memory_growth_bytes": memory.growth_bytes,
        "runtime_memory_bytes": runtime,
        "peak_memory_excl_runtime_bytes": max(memory.peak_bytes - runtime, 0),
        "memory_measure": memory.measure,
        "build_seconds": build_seconds,
        "load_average": [load_at_start, os.getloadavg()[0]],
    }
    if cfg.dp_sgd:  # last: it changes the parameters (and freezes FLoRA's A)
        from flora_lightning.bench.privacy import measure_dp_sgd

        result["dp_sgd"] = measure_dp_sgd(fabric, module, batch, cfg, variant, meter, runtime)
    return result


def measure_caching(cfg: BenchConfig, fabric, module) -> tuple:
    """Time what FeatureCache.build does per image (preprocess + frozen forward) in its steady
    state, then release the vision tower; returns the first batch's features and the figures.

    Caching encodes every client's partition batch after batch, so the first batch's one-off
    cost (allocator, kernel set-up) is paid once per process and is excluded here as the
    steps' warm-up is.
    """
    import torch

    n, encoded = cfg.batch_size, cfg.encoded_images
    images = synthetic_images(encoded, cfg.input_size, cfg.seed)
    warm_up = pixels_for(cfg, module, images[:n])
    flops_per_image = counted_flops(lambda: _encode(fabric, module, warm_up)) / n
    start, cpu_start = time.perf_counter(), time.process_time()
    features = torch.cat(
        [
            _encode(fabric, module, pixels_for(cfg, module, images[i : i + n]))
            for i in range(0, encoded, n)
        ]
    )
    figures = {
        "encode_seconds_per_image": (time.perf_counter() - start) / encoded,
        "encode_cpu_seconds_per_image": (time.process_time() - cpu_start) / encoded,
        "encoded_images": encoded,
        "encode_flops_per_image": flops_per_image,
        "load_seconds_per_image": 0.0,
        "load_cpu_seconds_per_image": 0.0,
    }
    inputs = features[:n].clone()
    del images, features
    module.release_image_encoder()
    return inputs, figures


def pixels_for(cfg: BenchConfig, module, images):
    """What the loader hands the method: the decoded uint8 images (``preprocess: device``:
    the method resizes, crops and normalises them on its device, inside the timed encode or
    step) or CLIP's per-image CPU preprocessing of them (``processor``)."""
    if cfg.preprocess == "device":
        return images
    return preprocess(module.image_transform, images)


def measure_loading(cfg: BenchConfig, module) -> tuple:
    """Time what the loader does to one batch of pixels: training from pixels pays it for every
    image every epoch (the loop's default num_workers=0 does it in the training process);
    cached training paid it once. With ``preprocess: device`` the loader only hands over the
    decoded images (the transform runs in the timed step). Returns the batch and the
    figures."""
    n = cfg.batch_size
    images = synthetic_images(n, cfg.input_size, cfg.seed)
    pixels_for(cfg, module, images[:2])  # warm-up
    start, cpu_start = time.perf_counter(), time.process_time()
    pixels = pixels_for(cfg, module, images)
    figures = {
        "load_seconds_per_image": (time.perf_counter() - start) / n,
        "load_cpu_seconds_per_image": (time.process_time() - cpu_start) / n,
        "encode_seconds_per_image": 0.0,
        "encode_cpu_seconds_per_image": 0.0,
        "encoded_images": 0,
        "encode_flops_per_image": 0.0,
    }
    return pixels, figures


def measure_steps(cfg: BenchConfig, fabric, module, batch, capture) -> dict:
    """Time full-batch local steps and, when the batch size does not divide the client's
    samples (5,000 = 39 x 128 + 8), the last smaller one (not assumed to cost a full one);
    count each kind's FLOPs on one more step (torch's FlopCounterMode)."""
    args = (cfg.steps, cfg.warmup, cfg.min_timed_seconds)
    times = time_steps(fabric, module, batch, *args, capture=capture)
    remainder = cfg.client_samples % cfg.batch_size
    last, part = None, None
    if remainder:
        part = (batch[0][:remainder], batch[1][:remainder])
        last = time_steps(fabric, module, part, *args, capture=capture)
    return {
        "step_seconds": times.seconds,
        "timed_steps": times.timed_steps,
        "step_seconds_all": times.block_seconds,
        "step_cpu_seconds": times.cpu_seconds,
        "step_flops": counted_flops(lambda: _step_once(fabric, module, batch)),
        "last_step_flops": counted_flops(lambda: _step_once(fabric, module, part)) if part else 0,
        "last_batch_size": remainder,
        "last_step_seconds": last.seconds if last else 0.0,
        "last_step_cpu_seconds": last.cpu_seconds if last else 0.0,
    }


def describe(module, variant: str, cached: bool, capture) -> dict:
    """What was measured: the method, its sizes, and how its step ran."""
    from flora_lightning.strategy import state_bytes

    state = module.communicated_state()
    return {
        "method": variant,
        "cached": cached,
        "image_encoder_frozen": module.image_encoder_frozen,
        "step_runner": "eager" if capture is None else capture.what,
        "trainable_params": module.num_trainable_parameters(),
        "communicated_params": sum(t.numel() for t in state.values()),
        "bytes_per_round_per_client": state_bytes(state),
        "caption_tokens": int(module.caption_ids.shape[1]),
    }


def counted_flops(run) -> int:
    """FLOPs of ``run()`` as ``torch.utils.flop_counter.FlopCounterMode`` counts them: matmuls,
    convolutions and attention, forward and backward (not elementwise ops or Adam)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def _encode(fabric, module, pixels):
    import torch

    with torch.no_grad(), fabric.autocast():
        features = module.frozen_image_features(fabric.to_device(pixels)).float()
    if fabric.device.type == "cuda":
        torch.cuda.synchronize(fabric.device)
    return features


def _step_once(fabric, module, batch) -> None:
    """One local step with a fresh optimizer, as the timed ones (for the FLOP count)."""
    from flora_lightning.federation.local_trainer import local_step

    optimizer = fabric.setup_optimizers(module.configure_optimizers())
    module.train()
    try:
        local_step(fabric, module, optimizer, fabric.to_device(batch), 0).item()
    finally:
        module.eval()


def write_result(cfg: BenchConfig, variant: str) -> Path:
    """Measure ``variant`` in this process and write its result file; returns the file.

    Args:
        cfg: The bench's config (on the command line: JSON).
        variant: The method to measure (a name of ``cfg.methods``).
    """
    path = Path(cfg.out) / "workers" / f"{variant}.json"
    result = measure_method(cfg, variant)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


if __name__ == "__main__":
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="python -m flora_lightning.bench.worker")
    parser.add_function_arguments(write_result)
    options = parser.instantiate(parser.parse_args())
    write_result(options.cfg, options.variant)
