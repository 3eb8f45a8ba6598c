"""Global evaluation: top-1 accuracy and cross-entropy of the global model on the test set.

One function for every runtime (``flora fit``, ``flora validate``/``test`` and the Flower
ServerApp). The class embeddings are computed once; similarities come from the method's
``evaluate_batch`` (in fp32, see :meth:`FederatedCLIPModule.evaluate_batch`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy


def evaluate(fabric, model, source, num_classes: int) -> dict[str, float]:
    """``test_acc`` (micro: correct / total) and mean ``test_loss`` over ``source``'s test set.

    Args:
        fabric: the launched Fabric (device, autocast).
        model: the method, set up with ``fabric``.
        source: what yields the test batches (``test_dataloader()``): the datamodule or a
            feature cache.
        num_classes: classes of the task.
    """
    return evaluate_loader(fabric, model, source.test_dataloader(), num_classes)


@torch.no_grad()
def evaluate_loader(fabric, model, loader, num_classes: int) -> dict[str, float]:
    """``test_acc`` (micro) and mean ``test_loss`` of ``model`` over the batches of ``loader``
    (the global test set, or a client's local test set in personalised evaluation)."""
    model.eval()
    accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro").to(fabric.device)
    loss = MeanMetric().set_dtype(torch.float64).to(fabric.device)
    loader = fabric.setup_dataloaders(loader, use_distributed_sampler=False)
    with fabric.autocast():
        classes = model.class_embeddings()
        for pixel_values, labels in loader:
            logits = model.evaluate_batch(pixel_values, classes).float()
            loss.update(F.cross_entropy(logits, labels), weight=len(labels))
            accuracy.update(logits, labels)
    return {"test_acc": float(accuracy.compute()), "test_loss": float(loss.compute())}
