"""The LightningModule every federated method shares: CLIP, captions, loss, evaluation, state.

A method (FLoRA, FedFFT, ...) is a small subclass that decides which parameters train (and so
travel) and, if needed, the forward/loss. The :class:`~flora_lightning.federation.loop.FederatedLoop` only
talks to this interface:

- :meth:`configure_model` loads CLIP and freezes/wraps it;
- :meth:`configure_task` gives class names and the caption template;
- :meth:`training_step` returns the local loss for a batch ``(pixel_values, labels)``;
- :meth:`communicated_state` / :meth:`load_communicated_state`: exactly what clients send/receive;
- :meth:`evaluate_batch`: zero-shot style logits over the classes for a test batch.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from flora_lightning.clip.backbone import CLIPBundle, image_features, load_clip, text_features
from flora_lightning.methods.settings import OptimizerConfig


def fp32(tensor: torch.Tensor):
    """Autocast off on ``tensor``'s device: what runs inside stays in the dtype it is given.

    Evaluation computes the final image-class similarity in fp32 under it, so bf16/fp16
    rounding of the logits cannot flip the argmax of near-ties.
    """
    return torch.autocast(device_type=tensor.device.type, enabled=False)


class FederatedCLIPModule(L.LightningModule):
    """Base of all methods: CLIP plus a federated-learning contract.

    Args:
        name_or_path: HF hub id or local folder of a ``CLIPModel`` checkpoint, or
            ``flora-offline/tiny-clip`` for the built-in offline model.
        optimizer: local optimizer settings (Adam).
    """

    method_name = "base"

    def __init__(
        self,
        name_or_path: str = "openai/clip-vit-base-patch32",
        optimizer: OptimizerConfig = OptimizerConfig(),
    ) -> None:
        super().__init__()
        if not name_or_path:
            raise ValueError("model.name_or_path is empty; give a hub id or a local folder.")
        self.name_or_path = name_or_path
        self.optimizer_config = optimizer
        self.clip: torch.nn.Module | None = None
        self.tokenizer = None
        self.image_transform = None
        self.device_preprocess = None
        self.class_names: list[str] = []
        self.register_buffer("caption_ids", torch.zeros(0, 0, dtype=torch.long), persistent=False)
        self.register_buffer("caption_mask", torch.zeros(0, 0, dtype=torch.long), persistent=False)

    # ------------------------------------------------------------------ setup
    def configure_model(self) -> None:
        """Load CLIP once, freeze it, then let the method choose its trainable part."""
        if self.clip is not None:
            return
        bundle = load_clip(self.name_or_path)
        self._attach(bundle)

    def _attach(self, bundle: CLIPBundle) -> None:
        self.clip = bundle.model
        self.tokenizer = bundle.tokenizer
        self.image_transform = bundle.image_transform
        self.device_preprocess = bundle.device_preprocess
        self.clip.requires_grad_(False)
        self.clip.eval()
        self.setup_trainable()

    def setup_trainable(self) -> None:
        """Wrap or unfreeze what the method trains. Subclasses override."""
        raise NotImplementedError

    def configure_task(self, class_names: list[str], template: str) -> None:
        """Tokenise one caption per class, e.g. ``"a photo of a {}."``."""
        self.class_names = list(class_names)
        captions = [template.format(name) for name in class_names]
        tokens = self.tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
        device = self.caption_ids.device
        self.caption_ids = tokens["input_ids"].to(device)
        self.caption_mask = tokens["attention_mask"].to(device)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        cfg = self.optimizer_config
        params = self.optimized_parameters()
        fused = cfg.fused
        if fused is None:  # one kernel per step on CUDA; torch's default on CPU
            fused = bool(params) and params[0].is_cuda
        return torch.optim.Adam(
            params,
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            fused=fused or None,  # None: torch's default implementation
        )

    # ----------------------------------------------------------- federation
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.trainable_named_parameters()]

    def trainable_named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def optimized_parameters(self) -> list[torch.nn.Parameter]:
        """What the local optimizer updates: the communicated parameters, unless a method
        communicates one it does not train (FedFFT's ``logit_scale``)."""
        return self.trainable_parameters()

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def communicated_state(self) -> dict[str, torch.Tensor]:
        """A detached copy of exactly the tensors a client sends (its trainable parameters)."""
        return {n: p.detach().clone() for n, p in self.trainable_named_parameters()}

    @torch.no_grad()
    def load_communicated_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a global/client state into the live parameters (names must match exactly)."""
        params = dict(self.trainable_named_parameters())
        if set(state) != set(params):
            missing, extra = set(params) - set(state), set(state) - set(params)
            raise KeyError(
                f"communicated state does not match {type(self).__name__}'s trainable "
                f"parameters: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
            )
        for name, param in params.items():
            param.copy_(state[name].to(device=param.device, dtype=param.dtype))

    def train(self, mode: bool = True):
        """Only the trainable part switches to train mode; frozen CLIP stays in eval."""
        super().train(mode)
        if self.clip is not None:
            self.clip.eval()
            if mode:
                self.train_submodules()
        return self

    def train_submodules(self) -> None:
        """Put the method's trainable modules in train mode (e.g. LoRA dropout). Override."""

    # ------------------------------------------------------------- compute
    def class_text_features(self, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised caption embeddings for ``labels`` (all classes when ``None``).

        Each distinct caption is encoded once per call, not once per image.
        """
        if labels is None:
            return F.normalize(
                text_features(self.clip, self.caption_ids, self.caption_mask), dim=-1
            )
        unique, inverse = torch.unique(labels, return_inverse=True)
        feats = text_features(self.clip, self.caption_ids[unique], self.caption_mask[unique])
        return F.normalize(feats, dim=-1)[inverse]

    @property
    def image_encoder_frozen(self) -> bool:
        """True when image features are a fixed function of the pixels (cacheable)."""
        return False

    def clip_model(self) -> torch.nn.Module:
        """The underlying ``CLIPModel`` (unwrapped from peft if needed)."""
        return self.clip.get_base_model() if hasattr(self.clip, "get_base_model") else self.clip

    cached_features_kind: str | None = None
    """Names what :meth:`frozen_image_features` returns when it is not the default normalised
    embedding (e.g. FedAA's raw projection), so a disk feature cache keeps them apart."""

    def prepare_images(self, images):
        """What the vision tower reads: decoded uint8 images (``data.preprocess: device``; a
        batch ``[B, 3, H, W]`` or a list of ``[3, H, W]`` of mixed sizes) are resized, cropped
        and normalised here, in one batch on the device they were moved to, as the checkpoint's
        processor does (:class:`~flora_lightning.clip.preprocess.DevicePreprocess`); float
        pixels and cached features pass through unchanged."""
        if torch.is_tensor(images) and images.dtype != torch.uint8:
            return images
        if self.device_preprocess is None:
            raise RuntimeError(
                f"{type(self).__name__} got decoded uint8 images (data.preprocess=device) but "
                "was built without its checkpoint's DevicePreprocess (CLIPBundle."
                "device_preprocess); load it with load_clip or set --data.preprocess processor."
            )
        return self.device_preprocess(images)

    def frozen_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised CLIP image embeddings: what frozen-feature caching stores."""
        pixels = self.prepare_images(pixel_values)
        return F.normalize(image_features(self.clip_model(), pixels), dim=-1)

    def image_inputs_to_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` (float, or uint8 for :meth:`prepare_images`) are encoded;
        cached features ``[B, D]`` pass through."""
        images = self.prepare_images(images)
        if images.dim() == 2:
            return images
        if next(self.clip_model().vision_model.parameters()).is_meta:
            raise RuntimeError(
                "the vision tower was released after feature caching "
                "(trainer.release_image_encoder=true); build a new model to encode pixels."
            )
        return self.frozen_image_features(images)

    def release_image_encoder(self) -> None:
        """Free the vision tower's memory once all image features are cached."""
        self.clip_model().vision_model.to("meta")

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """The image embedding the loss and evaluation use (methods may add a trainable part)."""
        return self.image_inputs_to_features(images)

    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def contrastive_loss(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """CLIP's symmetric in-batch loss: image i is paired with caption i (its class caption)."""
        logits = self.logit_scale() * img @ txt.T
        target = torch.arange(len(img), device=img.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.contrastive_loss(
            self.encode_images(pixel_values), self.class_text_features(labels)
        )

    def training_step(self, batch, batch_idx: int = 0) -> torch.Tensor:
        pixel_values, labels = batch
        return self(pixel_values, labels)

    @torch.no_grad()
    def class_embeddings(self) -> torch.Tensor:
        """What evaluation compares images with; computed once per evaluation."""
        return self.class_text_features()

    @torch.no_grad()
    def evaluate_batch(self, pixel_values: torch.Tensor, class_embeddings: torch.Tensor):
        """Zero-shot style logits ``[batch, num_classes]`` against the class embeddings.

        The encoders run under the precision's autocast; the similarity itself is fp32.
        """
        images = self.encode_images(pixel_values)
        with fp32(images):
            return self.logit_scale().float() * images.float() @ class_embeddings.float().T

    # -------------------------------------------------------------- export
    def export(self, folder: str) -> None:
        """Write the final trained part in a standard format (method specific)."""
        from safetensors.torch import save_file

        save_file(
            {k: v.contiguous().cpu() for k, v in self.communicated_state().items()},
            f"{folder}/model.safetensors",
        )


def build_model_from_bundle(module: FederatedCLIPModule, bundle: CLIPBundle) -> FederatedCLIPModule:
    """Attach an already loaded CLIP (tests and benchmarks reuse one load)."""
    module._attach(bundle)
    return module
