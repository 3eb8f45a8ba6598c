"""``SpeedupVsFFT``: how much faster a local optimizer step is than full fine-tuning's.

At fit start, on one client batch, it times ``steps`` local steps (forward, backward, Adam step,
exactly as the loop's client fit does them) of

- the method being trained, on what the loop feeds it: cached image features when frozen-feature
  caching is on, pixels otherwise;
- full fine-tuning: a :class:`~flora_lightning.methods.FedFFT` on a deep copy of the same CLIP
  (LoRA merged away, every parameter trainable, CLIP's contrastive loss) on the batch's pixels.
  When the method already released its vision tower (caching), the copy gets a freshly
  initialised one: weights do not change the time of a step.

and reports ``speedup_vs_fft = fft_step_seconds / method_step_seconds`` (medians over the timed
steps, after ``warmup`` untimed ones). The method's trainable state, the RNG and the loop's
optimizer states are left as they were; the copy is freed afterwards.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch

from flora_lightning.callbacks.base import Callback
from flora_lightning.federation.local_trainer import local_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepTimes:
    """Per timed step: wall-clock seconds and the process's CPU seconds (all threads).

    On a CPU shared with other jobs, wall time grows with their load; CPU time much less.
    """

    wall: list[float]
    cpu: list[float]

    @property
    def median_wall(self) -> float:
        return statistics.median(self.wall)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu)


def time_local_steps(
    fabric, module, batch, steps: int, warmup: int = 1, min_seconds: float = 0.0
) -> StepTimes:
    """Times of each of ``steps`` timed local optimizer steps, after ``warmup`` untimed ones.

    With ``min_seconds``, fast steps are timed until that much time was timed too (at most
    100 steps), so a median of many short steps is not left to a handful of samples.

    A step is :func:`flora_lightning.federation.local_trainer.local_step`, what :meth:`LocalTrainer.fit` runs
    per batch: ``training_step`` under the Fabric precision autocast, ``fabric.backward``, Adam
    step, ``zero_grad``. The module's
    parameters change; callers that need them back restore them.

    Args:
        fabric: a launched Fabric (device, precision).
        module: a configured method (task set, on ``fabric.device``).
        batch: ``(inputs, labels)``: pixels ``[B, 3, H, W]`` or cached features ``[B, D]``.
        steps: timed steps (>= 1).
        warmup: untimed steps first (allocator and kernel warm-up).
        min_seconds: keep timing until the timed steps add up to this (>= ``steps`` steps).
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0 (got {steps}, {warmup}).")
    batch = fabric.to_device(batch)
    optimizer = fabric.setup_optimizers(module.configure_optimizers())
    module.train()
    times = StepTimes(wall=[], cpu=[])
    try:
        i = 0
        while i < warmup + steps or (sum(times.wall) < min_seconds and i < warmup + 100):
            _sync(fabric.device)
            t0, c0 = time.perf_counter(), time.process_time()
            loss = local_step(fabric, module, optimizer, batch, i)
            loss.item()  # waits for the step, as the loop's loss bookkeeping does
            _sync(fabric.device)
            if i >= warmup:
                times.wall.append(time.perf_counter() - t0)
                times.cpu.append(time.process_time() - c0)
            i += 1
    finally:
        module.eval()
    return times


def full_finetuning_copy(module):
    """A :class:`FedFFT` on a deep copy of ``module``'s CLIP, ready for the same task.

    LoRA adapters are merged into the copy (a plain ``CLIPModel`` remains); a vision tower that
    was released to the meta device is rebuilt from its config with fresh random weights.
    """
    from flora_lightning.clip.backbone import CLIPBundle
    from flora_lightning.methods import FedFFT
    from flora_lightning.methods.base import build_model_from_bundle

    if hasattr(module.clip, "merge_and_unload"):  # peft: merge on a copy, keep the original
        clip = copy.deepcopy(module.clip).merge_and_unload()
    else:
        clip = copy.deepcopy(module.clip_model())
    device = module.caption_ids.device
    if any(p.is_meta for p in clip.vision_model.parameters()):
        clip.vision_model = type(clip.vision_model)(clip.config.vision_config)
    fft = FedFFT(name_or_path=module.name_or_path, optimizer=module.optimizer_config)
    bundle = CLIPBundle(clip, module.tokenizer, module.image_transform, module.device_preprocess)
    build_model_from_bundle(fft, bundle)
    fft.class_names = list(module.class_names)
    fft.caption_ids = module.caption_ids.clone()
    fft.caption_mask = module.caption_mask.clone()
    return fft.to(device)


class SpeedupVsFFT(Callback):
    """Times local steps of the method and of full fine-tuning at fit start (see module doc).

    Logs ``speed/method_step_seconds``, ``speed/fft_step_seconds`` and ``speed/speedup_vs_fft``
    (plus both steps' process CPU seconds) to TensorBoard (step 0) and adds the same keys
    without the ``speed/`` prefix to the summary.

    Args:
        steps: timed local steps of each (the median is reported).
        warmup: untimed steps before them.
        client_id: the client whose first batch is used.
    """

    def __init__(self, steps: int = 3, warmup: int = 1, client_id: int = 0) -> None:
        if steps < 1 or warmup < 0 or client_id < 0:
            raise ValueError(
                f"SpeedupVsFFT needs steps >= 1, warmup >= 0, client_id >= 0 "
                f"(got {steps}, {warmup}, {client_id})."
            )
        self.steps = steps
        self.warmup = warmup
        self.client_id = client_id
        self.result: dict[str, float] = {}

    def _batches(self, loop):
        """The client's first ``batch_size`` samples: as pixels, and as the loop feeds them."""
        data = getattr(loop, "datamodule", None) or getattr(loop.feature_cache, "data", None)
        if data is None:
            raise RuntimeError("SpeedupVsFFT needs the loop's datamodule (loop.datamodule).")
        dataset = data.client_dataset(self.client_id)
        n = min(data.batch_size, len(dataset))
        pixels = data.collate([dataset[i] for i in range(n)])
        if loop.feature_cache is None:
            return pixels, pixels
        features, labels = loop.feature_cache.features[str(self.client_id)]
        return (features[:n], labels[:n]), pixels

    def on_fit_start(self, loop, model) -> None:
        fabric = loop.fabric
        method_batch, pixel_batch = self._batches(loop)
        snapshot = model.communicated_state()
        devices = [fabric.device] if fabric.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            method = time_local_steps(fabric, model, method_batch, self.steps, self.warmup)
            model.load_communicated_state(snapshot)
            fft = full_finetuning_copy(model)
            full = time_local_steps(fabric, fft, pixel_batch, self.steps, self.warmup)
        del fft
        if fabric.device.type == "cuda":
            torch.cuda.empty_cache()
        method_s, fft_s = method.median_wall, full.median_wall
        self.result = {
            "method_step_seconds": method_s,
            "fft_step_seconds": fft_s,
            "speedup_vs_fft": fft_s / method_s,
            # process CPU time: steadier than wall time on a CPU shared with other jobs
            "method_step_cpu_seconds": method.median_cpu,
            "fft_step_cpu_seconds": full.median_cpu,
        }
        fabric.log_dict({f"speed/{k}": v for k, v in self.result.items()}, step=0)
        fabric.print(
            f"SpeedupVsFFT: {model.method_name} step {method_s:.4f}s, FedFFT step {fft_s:.4f}s "
            f"({self.result['speedup_vs_fft']:.1f}x)."
        )

    def summary_fields(self, loop, summary: dict) -> dict:
        return dict(self.result)
