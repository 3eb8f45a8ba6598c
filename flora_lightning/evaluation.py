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


@torch.no_grad()
def evaluate(fabric, model, source, num_classes: int) -> dict[str, float]:
    """``test_acc`` (micro: correct / total) and mean ``test_loss`` over ``source``'s test set.

    Args:
        fabric: the launched Fabric (device, autocast).
        model: the method, set up with ``fabric``.
        source: what yields the test batches (``test_dataloader()``): the datamodule or a
            feature cache.
        num_classes: classes of the task.
    """
    model.eval()
    accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro").to(fabric.device)
    loss = MeanMetric().set_dtype(torch.float64).to(fabric.device)
    loader = fabric.setup_dataloaders(source.test_dataloader(), use_distributed_sampler=False)
    with fabric.autocast():
        classes = model.class_embeddings()
        for pixel_values, labels in loader:
            logits = model.evaluate_batch(pixel_values, classes).float()
            loss.update(F.cross_entropy(logits, labels), weight=len(labels))
            accuracy.update(logits, labels)
    return {"test_acc": float(accuracy.compute()), "test_loss": float(loss.compute())}
