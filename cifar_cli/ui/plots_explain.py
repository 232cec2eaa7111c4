"""Figures that explain a model's mistakes and confidence: the most confidently wrong test images, Grad-CAM heat
maps over right and wrong ones, and the reliability diagram (calibration). Drawn from one evaluation pass."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure

from cifar_cli.predict.evaluate import Evaluation
from cifar_cli.predict.gradcam import gradcam
from cifar_cli.predict.inference import LoadedModel
from cifar_cli.predict.metrics import ECE_BINS, expected_calibration_error, reliability_bins

MISTAKES_SHOWN = 24
GRADCAM_EACH = 4  # right and wrong test images in gradcam.png


def most_confident_mistakes(evaluation: Evaluation, count: int) -> torch.Tensor:
    """Indices of the wrong predictions with the highest probability, highest first."""
    probabilities = evaluation.probabilities
    confidence = probabilities.max(dim=1).values
    wrong = torch.nonzero(evaluation.predicted != evaluation.targets)[:, 0]
    return wrong[confidence[wrong].argsort(descending=True)][:count]


def most_confident_right(evaluation: Evaluation, count: int) -> torch.Tensor:
    confidence = evaluation.probabilities.max(dim=1).values
    right = torch.nonzero(evaluation.predicted == evaluation.targets)[:, 0]
    return right[confidence[right].argsort(descending=True)][:count]


def mistakes_figure(evaluation: Evaluation, columns: int = 8) -> Figure:
    """The most confidently wrong test images: true class, predicted class and its probability."""
    index = most_confident_mistakes(evaluation, MISTAKES_SHOWN)
    names = evaluation.metrics["class_names"]
    rows = max(1, -(-len(index) // columns))
    figure = Figure(figsize=(columns * 1.5, rows * 1.95))
    axes = list(np.atleast_1d(figure.subplots(rows, columns)).flat)
    for axis in axes:
        axis.axis("off")
    probabilities = evaluation.probabilities
    for axis, i in zip(axes, index.tolist()):
        guess = int(evaluation.predicted[i])
        axis.imshow(evaluation.images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        axis.set_title(
            f"true {names[int(evaluation.targets[i])]}\n→ {names[guess]} {float(probabilities[i, guess]):.0%}",
            fontsize=8,
            color="red",
        )
    title = "The most confidently wrong test images" if len(index) else "No test image is misclassified"
    figure.suptitle(f"{title} (true class → prediction, probability)")
    figure.tight_layout()
    return figure


def gradcam_figure(evaluation: Evaluation, loaded: LoadedModel) -> Figure:
    """Grad-CAM heat maps of the predicted class over the most confident right and wrong test images."""
    index = torch.cat(
        [most_confident_right(evaluation, GRADCAM_EACH), most_confident_mistakes(evaluation, GRADCAM_EACH)]
    )
    images = evaluation.images[index]
    heat = gradcam(loaded.model, images, loaded.spec, evaluation.predicted[index])
    names = evaluation.metrics["class_names"]
    figure = Figure(figsize=(len(index) * 1.6, 3.6))
    axes = np.atleast_2d(figure.subplots(2, max(len(index), 1)).reshape(2, -1))
    for column, i in enumerate(index.tolist()):
        wrong = int(evaluation.predicted[i]) != int(evaluation.targets[i])
        picture = images[column].permute(1, 2, 0).numpy()
        axes[0, column].imshow(picture, interpolation="nearest")
        axes[0, column].set_title(
            f"{names[int(evaluation.targets[i])]}\n→ {names[int(evaluation.predicted[i])]}",
            fontsize=8,
            color="red" if wrong else "black",
        )
        axes[1, column].imshow(picture, interpolation="nearest")
        axes[1, column].imshow(heat[column].numpy(), cmap="jet", alpha=0.45, interpolation="bilinear")
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle("Grad-CAM of the predicted class (last convolution): confident right, then confident wrong")
    figure.tight_layout()
    return figure


def reliability_figure(evaluation: Evaluation) -> Figure:
    """Accuracy against confidence in 15 bins (the diagonal is perfect calibration), with the expected calibration
    error; after the stored temperature too, where `cifar calibrate` fitted one."""
    figure = Figure(figsize=(6, 5.5))
    axis = figure.subplots()
    width = 1 / ECE_BINS
    curves = [("softmax", 1.0, "tab:blue")]
    if evaluation.temperature != 1.0:
        curves.append((f"temperature {evaluation.temperature:.2f}", evaluation.temperature, "tab:orange"))
    for offset, (label, temperature, colour) in enumerate(curves):
        probabilities = torch.softmax(evaluation.logits.double() / temperature, dim=1)
        bins = reliability_bins(probabilities, evaluation.targets)
        ece = expected_calibration_error(probabilities, evaluation.targets)
        shown = [row for row in bins if row["count"]]
        share = width / len(curves)  # the bins' bars side by side, one per curve
        axis.bar(
            [row["lower"] + offset * share for row in shown],
            [row["accuracy"] for row in shown],
            width=share,
            align="edge",
            color=colour,
            alpha=0.75,
            label=f"{label} (ECE {ece:.2%})",
        )
    axis.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    axis.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="confidence (top probability)",
        ylabel="accuracy",
        title=f"Reliability on the test split ({len(evaluation.targets):,} images, {ECE_BINS} bins)",
    )
    axis.grid(alpha=0.3)
    axis.legend(loc="upper left")
    figure.tight_layout()
    return figure
