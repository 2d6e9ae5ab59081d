"""The MONAI RetinaNet detector without torchvision: training, prediction, feature maps, user weights."""

from __future__ import annotations

import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch

from comoto_cli.config import ModelConfig, TeacherConfig, load_config
from comoto_cli.errors import CheckpointError, UsageError
from comoto_cli.networks import backbones
from comoto_cli.networks.backbone import ResNetFPNBackbone
from comoto_cli.networks.backbones import backbones_help, register_backbone, registered_backbones
from comoto_cli.networks.box_nms import greedy_nms
from comoto_cli.networks.checkpoint import load_detector, save_checkpoint
from comoto_cli.networks.detector import build_detector, monai_detections
from tests.conftest import random_boxes, tiny_model_config

HEIGHT, WIDTH = 128, 64


def tiny_config(**changes) -> ModelConfig:
    return tiny_model_config(**{"returned_layers": [1, 2, 3], **changes})


def train_steps(detector, images, targets, steps: int) -> list[float]:
    """``steps`` SGD steps on one batch (training mode); the detection loss of each."""
    optimizer = torch.optim.SGD(detector.parameters(), lr=0.01, momentum=0.9)
    detector.train()
    history = []
    for _ in range(steps):
        losses, _ = detector.forward_train(images, targets)
        loss = losses["classification"] + losses["box_regression"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    return history


def lesion_batch():
    """Image 0: a bright 24 (wide) x 36 (high) ellipse; image 1: lesion-free. Boxes xyxy, x = column."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 1, HEIGHT, WIDTH, generator=generator) * 0.2
    rows = torch.arange(HEIGHT).view(HEIGHT, 1).float()
    cols = torch.arange(WIDTH).view(1, WIDTH).float()
    cx, cy, half_w, half_h = 20.0, 80.0, 12.0, 18.0
    inside = ((cols - cx) / half_w) ** 2 + ((rows - cy) / half_h) ** 2 <= 1.0
    images[0, 0][inside] += 0.8
    targets = [
        {
            "boxes": torch.tensor([[cx - half_w, cy - half_h, cx + half_w, cy + half_h]]),
            "labels": torch.zeros(1, dtype=torch.int64),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    return images, targets


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    x1, y1 = torch.max(a[0], b[0]), torch.max(a[1], b[1])
    x2, y2 = torch.min(a[2], b[2]), torch.min(a[3], b[3])
    inter = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return float(inter / (area_a + area_b - inter))


def test_no_torchvision_and_shapes():
    torch.manual_seed(0)
    detector = build_detector(tiny_config(), (HEIGHT, WIDTH))
    images, targets = lesion_batch()
    losses, features = detector.forward_train(images, targets)
    assert set(losses) == {"classification", "box_regression"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    # Default distillation map: the last ResNet stage, stride 32, 64 channels (basic blocks).
    assert detector.feature_channels == 64
    assert features.shape == (2, 64, HEIGHT // 32, WIDTH // 32)
    assert features.requires_grad
    assert isinstance(detector.backbone, ResNetFPNBackbone)
    assert list(detector.backbone(images)) == ["fpn0", "fpn1", "fpn2", "pool"]
    assert "torchvision" not in sys.modules


def test_distill_features_equal_training_map_and_fpn_level():
    torch.manual_seed(0)
    detector = build_detector(tiny_config(), (HEIGHT, WIDTH)).eval()
    images, targets = lesion_batch()
    with torch.no_grad():
        _, from_training = detector.forward_train(images, targets)
        alone = detector.distill_features(images)
    assert torch.allclose(from_training, alone)

    fpn = build_detector(tiny_config(distill_feature="fpn0"), (HEIGHT, WIDTH))
    assert fpn.feature_channels == 16
    assert fpn.distill_features(images).shape == (2, 16, HEIGHT // 4, WIDTH // 4)


def test_bottleneck_channels():
    detector = build_detector(tiny_config(backbone="resnet50"), (64, 64))
    assert detector.feature_channels == 64 * 4
    assert detector.distill_features(torch.zeros(1, 1, 64, 64)).shape == (1, 256, 2, 2)


def test_training_reduces_loss_and_predicts_in_image_pixels():
    torch.manual_seed(0)
    detector = build_detector(tiny_config(), (HEIGHT, WIDTH))
    images, targets = lesion_batch()
    history = train_steps(detector, images, targets, 40)
    assert sum(history[-5:]) / 5 < 0.3 * sum(history[:3]) / 3
    predictions = detector.predict(images)
    assert detector.training  # predict restores the mode
    assert len(predictions) == 2
    best = predictions[0]["boxes"][0]
    assert predictions[0]["scores"][0] > 0.5
    # Boxes are xyxy image pixels (x = column): the tall ellipse, not its transpose.
    assert iou(best, targets[0]["boxes"][0]) > 0.5, best
    scores = predictions[0]["scores"]
    assert torch.all(scores[:-1] >= scores[1:])
    assert predictions[1]["boxes"].shape[1] == 4


def test_lesion_free_batch_trains():
    torch.manual_seed(0)
    detector = build_detector(tiny_config(), (64, 64))
    images = torch.rand(2, 1, 64, 64)
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for _ in range(2)]
    losses, _ = detector.forward_train(images, targets)
    assert losses["box_regression"].item() == 0.0
    assert losses["classification"].item() > 0
    (losses["classification"] + losses["box_regression"]).backward()
    head_grad = detector.detector.network.classification_head.cls_logits.weight.grad
    assert head_grad is not None and head_grad.abs().sum() > 0


def test_build_validation_errors():
    with pytest.raises(UsageError, match="divisible by 32"):
        build_detector(tiny_config(), (100, 64))
    with pytest.raises(UsageError, match="divisible by 64"):
        build_detector(tiny_config(returned_layers=[1, 2, 3, 4]), (96, 64))
    with pytest.raises(UsageError, match="distill_feature"):
        build_detector(tiny_config(distill_feature="fpn7"), (64, 64))
    with pytest.raises(UsageError, match="fpn_channels"):
        build_detector(tiny_config(fpn_channels=12), (64, 64))
    detector = build_detector(tiny_config(), (64, 64))
    with pytest.raises(UsageError):
        detector.predict(torch.zeros(1, 1, 48, 64))


# ---------------------------------------------------------------------------------------------- prediction
def test_greedy_nms_equals_monai_nms():
    from monai.data.box_utils import non_max_suppression

    rng = np.random.default_rng(0)
    for trial in range(40):
        count = int(rng.integers(1, 900))
        boxes = random_boxes(rng, count, quantise=trial % 3 == 0)
        scores = rng.random(count).astype(np.float32)
        if trial % 4 == 0:
            scores = np.round(scores * 10) / 10  # score ties: the stable sort decides
        threshold = float(rng.choice([0.1, 0.22, 0.5]))
        limit = int(rng.choice([-1, 5, 100]))
        expected = non_max_suppression(torch.from_numpy(boxes), torch.from_numpy(scores), threshold,
                                       max_proposals=limit).numpy()
        np.testing.assert_array_equal(greedy_nms(boxes, scores, threshold, limit), expected)


@pytest.mark.parametrize("returned_layers", [[2, 3, 4], [1, 2, 3]])
def test_predict_equals_monai_postprocessing(returned_layers):
    torch.manual_seed(0)
    config = tiny_config(returned_layers=returned_layers, topk_candidates_per_level=40, detections_per_image=25,
                         score_threshold=0.3)
    detector = build_detector(config, (HEIGHT, WIDTH)).train()
    # An untrained RetinaNet scores every anchor near its prior (0.01); lift the classification bias so that
    # many anchors pass the score threshold and top-k, NMS and the detection cap all have work to do.
    detector.detector.network.classification_head.cls_logits.bias.data.fill_(-0.4)
    images = torch.rand(3, 1, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(1))
    reference = monai_detections(detector, images)
    predicted = detector.predict(images)
    assert detector.training  # both restore the mode
    counts = []
    for ref, got in zip(reference, predicted, strict=True):
        counts.append(len(got["scores"]))
        assert got["boxes"].dtype == got["scores"].dtype == torch.float32
        assert torch.equal(got["boxes"], ref["boxes"]) and torch.equal(got["scores"], ref["scores"])
    assert max(counts) == 25  # the detection cap was reached: top-k, NMS and the cap were exercised


# ---------------------------------------------------------------------------------------------- user weights
def test_user_weights_torchvision_style_three_channels(tmp_path):
    reference = build_detector(tiny_config(), (64, 64)).backbone.body.state_dict()
    generator = torch.Generator().manual_seed(5)
    state = {}
    for key, value in reference.items():
        if key == "conv1.weight":
            value = torch.randn(value.shape[0], 3, *value.shape[2:], generator=generator)
        elif value.is_floating_point():
            value = torch.randn(value.shape, generator=generator)
        state[f"module.{key}"] = value
    state["module.fc.weight"] = torch.randn(10, 64)
    path = tmp_path / "resnet.pt"
    torch.save(state, path)
    detector = build_detector(tiny_config(weights=path), (64, 64))
    body = detector.backbone.body.state_dict()
    assert torch.allclose(body["conv1.weight"], state["module.conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(body["layer3.1.bn2.running_var"], state["module.layer3.1.bn2.running_var"])


def test_user_weights_errors(tmp_path):
    unrelated = tmp_path / "unrelated.pt"
    torch.save({"encoder.blocks.0.weight": torch.zeros(3)}, unrelated)
    with pytest.raises(CheckpointError, match="no key matches"):
        build_detector(tiny_config(weights=unrelated), (64, 64))
    wrong_width = tmp_path / "wide.pt"
    torch.save(
        build_detector(tiny_config(width=[16, 16, 32, 64]), (64, 64)).backbone.body.state_dict(), wrong_width
    )
    with pytest.raises(CheckpointError, match="shape"):
        build_detector(tiny_config(weights=wrong_width), (64, 64))


@pytest.mark.parametrize("distill_feature", ["backbone", "fpn1"])
def test_every_parameter_is_used(distill_feature):
    # Parameters that never receive a gradient would break DistributedDataParallel: stages the model never
    # runs (layer4 when neither returned nor the distillation map) are not built at all.
    torch.manual_seed(0)
    detector = build_detector(tiny_config(distill_feature=distill_feature), (64, 64))
    images, targets = (
        torch.rand(1, 1, 64, 64),
        [{"boxes": torch.tensor([[10.0, 12.0, 40.0, 44.0]]), "labels": torch.zeros(1, dtype=torch.int64)}],
    )
    losses, features = detector.forward_train(images, targets)
    (losses["classification"] + losses["box_regression"] + features.mean()).backward()
    unused = [name for name, p in detector.named_parameters() if p.grad is None]
    assert unused == []
    has_layer4 = any(".body.layer4." in name for name, _ in detector.named_parameters())
    assert has_layer4 == (distill_feature == "backbone")


# ---------------------------------------------------------------------------------------------- plug-in backbones
class TinyConvBackbone(torch.nn.Module):
    """A plug-in backbone, the whole pattern: a module with the FeatureExtractor interface
    (comoto_cli.networks.backbones) and its registration (the ``tiny_backbone`` fixture). Two strided convolutions
    give two levels, strides 4 and 8; the coarser one is also the distillation map."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        channels = config.fpn_channels
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, channels, 3, stride=4, padding=1), torch.nn.ReLU())
        self.down = torch.nn.Sequential(torch.nn.Conv2d(channels, channels, 3, stride=2, padding=1), torch.nn.ReLU())
        self.out_channels = self.distill_channels = channels
        self.level_strides = [4, 8]
        self.distill_stride = 8

    def forward_with_distill(self, images):
        fine = self.stem(images)
        coarse = self.down(fine)
        return OrderedDict(fpn0=fine, fpn1=coarse), coarse

    def forward(self, images):
        return self.forward_with_distill(images)[0]

    def distill_only(self, images):
        return self.forward_with_distill(images)[1]


@pytest.fixture
def tiny_backbone():
    """``tiny-cnn`` registered for one test (registries are process-wide: it is removed afterwards)."""
    register_backbone("tiny-cnn", TinyConvBackbone)
    yield "tiny-cnn"
    backbones._BACKBONES.pop("tiny-cnn")
    ModelConfig.backbone_names.remove("tiny-cnn")


def test_a_registered_backbone_trains_predicts_and_round_trips(tiny_backbone, tmp_path):
    config = load_config(TeacherConfig, overrides={"model.backbone": tiny_backbone, "model.fpn_channels": 16,
                                                   "model.anchor_base_sizes": [16.0, 16.0]}).model
    assert tiny_backbone in backbones_help()
    torch.manual_seed(0)
    detector = build_detector(config, (HEIGHT, WIDTH))
    assert isinstance(detector.backbone, TinyConvBackbone) and detector.size_divisible == 8
    images, targets = lesion_batch()
    optimizer = torch.optim.SGD(detector.parameters(), lr=0.01)
    losses, features = detector.forward_train(images, targets)
    assert features.shape == (2, 16, HEIGHT // 8, WIDTH // 8) and detector.feature_channels == 16
    (losses["classification"] + losses["box_regression"] + features.mean()).backward()
    assert detector.backbone.stem[0].weight.grad.abs().sum() > 0
    optimizer.step()
    predictions = detector.predict(images)
    assert len(predictions) == 2 and predictions[0]["boxes"].shape[1] == 4
    assert detector.distill_features(images).shape == features.shape

    # The checkpoint stores the name; it loads wherever the backbone is registered.
    path = tmp_path / "best.pt"
    save_checkpoint(path, model_state=detector.state_dict(), model_config=config, image_size=(HEIGHT, WIDTH),
                    metadata={})
    loaded, _ = load_detector(path)
    assert isinstance(loaded.backbone, TinyConvBackbone)
    again = loaded.predict(images)
    assert all(torch.equal(a["scores"], b["scores"]) for a, b in zip(predictions, again, strict=True))
    with pytest.raises(UsageError, match="backbone 'tiny-cnn' does not load weights files"):
        build_detector(config.model_copy(update={"weights": path}), (HEIGHT, WIDTH))


def test_backbone_names_are_checked(tiny_backbone):
    # The config knows the built-in names before the registry is imported; each of them has a builder.
    assert ModelConfig.backbone_names == registered_backbones() == ["resnet18", "resnet34", "resnet50", "resnet101",
                                                                   tiny_backbone]
    with pytest.raises(UsageError, match=r"model\.backbone: Value error, unknown backbone 'vgg16'; registered: "
                                         r"resnet18, resnet34, resnet50, resnet101, tiny-cnn"):
        load_config(TeacherConfig, overrides={"model.backbone": "vgg16"})
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("resnet18", TinyConvBackbone)
    with pytest.raises(ValueError, match="lower-case"):
        register_backbone("Tiny CNN", TinyConvBackbone)


def test_a_builder_without_the_interface_is_named():
    register_backbone("not-a-backbone", lambda config: torch.nn.Linear(2, 2))
    try:
        with pytest.raises(TypeError, match="'not-a-backbone'.*without out_channels, distill_channels"):
            build_detector(tiny_config(backbone="not-a-backbone"), (64, 64))
    finally:
        backbones._BACKBONES.pop("not-a-backbone")
        ModelConfig.backbone_names.remove("not-a-backbone")


def test_flip_tta_detections_mirror_with_the_image():
    """Test-time flip merges the image's and its mirror's candidates, so the detections of a mirrored image are
    the mirrored detections of the image (up to float rounding); and no plain detection's score is lost."""
    torch.manual_seed(0)
    detector = build_detector(tiny_config(topk_candidates_per_level=40, detections_per_image=25, score_threshold=0.3),
                              (HEIGHT, WIDTH)).eval()
    detector.detector.network.classification_head.cls_logits.bias.data.fill_(-0.4)
    images = torch.rand(2, 1, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(3))
    merged = detector.predict(images, flip=True)
    mirrored = detector.predict(images.flip(-1), flip=True)
    plain = detector.predict(images)
    for got, other, alone in zip(merged, mirrored, plain, strict=True):
        boxes = other["boxes"].clone()
        boxes[:, [0, 2]] = WIDTH - other["boxes"][:, [2, 0]]
        assert len(got["scores"]) == len(other["scores"]) > 0
        torch.testing.assert_close(got["scores"], other["scores"], rtol=0, atol=1e-6)
        torch.testing.assert_close(got["boxes"], boxes, rtol=0, atol=1e-3)
        assert float(got["scores"][0]) >= float(alone["scores"][0])
        assert not torch.equal(got["boxes"], alone["boxes"])  # the mirror pass added or changed detections


def test_iou_matcher_follows_the_torchvision_rule():
    from comoto_cli.networks.detector import BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, IouMatcher

    anchors = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 12], [0, 0, 10, 20], [50, 50, 60, 60], [0, 0, 10, 14],
                            [100, 100, 104, 104]], dtype=torch.float32)
    boxes = torch.tensor([[0, 0, 10, 10], [100, 100, 130, 130]], dtype=torch.float32)
    matched = IouMatcher()(boxes, anchors)
    # IoU with box 0: 1, 10/12, 0.5, 0, 10/14 (~0.71); the small anchor inside box 1 has IoU 16/900 < 0.4 but is
    # box 1's best anchor: kept as a low-quality match.
    assert matched.tolist() == [0, 0, 0, BELOW_LOW_THRESHOLD, 0, 1]
    ignored = IouMatcher(high=0.9, low=0.6)(boxes, anchors)
    assert ignored.tolist() == [0, BETWEEN_THRESHOLDS, BELOW_LOW_THRESHOLD, BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, 1]
    assert IouMatcher()(torch.zeros((0, 4)), anchors).tolist() == [BELOW_LOW_THRESHOLD] * 6


def test_reference_matcher_and_losses_train():
    """The reference's detection rules (IoU matcher, focal alpha 0.25, L1 box loss) are switches that train."""
    torch.manual_seed(0)
    detector = build_detector(tiny_config(matcher="iou", focal_alpha=0.25, box_loss="l1"), (HEIGHT, WIDTH))
    assert isinstance(detector.detector.box_loss_func, torch.nn.L1Loss)
    assert detector.detector.cls_loss_func.alpha == 0.25
    images, targets = lesion_batch()
    history = train_steps(detector, images, targets, 30)
    assert all(np.isfinite(history)) and sum(history[-5:]) / 5 < 0.5 * sum(history[:3]) / 3


def test_reference_preset_is_one_stride_32_level_with_15_anchors_and_imagenet_input(tmp_path):
    """model.preset reference: no FPN (the heads read layer4, as wide as it), 15 anchors per cell at stride 32, a
    3-channel conv1 fed the ImageNet-normalised grey image; it trains and detects, and a 3-channel ResNet state
    dict loads into it unchanged."""
    config = tiny_model_config(preset="reference", anchor_base_sizes=[8.0, 8.0])
    assert (config.fpn, config.returned_layers, config.matcher, config.box_loss) == (False, [4], "iou", "l1")
    assert config.anchor_base_sizes == [8.0, 8.0]  # a field given explicitly wins over the preset
    torch.manual_seed(0)
    detector = build_detector(config, (HEIGHT, WIDTH))
    backbone = detector.backbone
    assert backbone.level_strides == [32] and backbone.fpn is None
    assert backbone.out_channels == config.width[3] and backbone.body.conv1.in_channels == 3
    assert detector.detector.num_anchors_per_loc == 15
    images, targets = lesion_batch()
    features, _ = backbone.forward_with_distill(images)
    assert list(features) == ["c5"] and features["c5"].shape == (2, config.width[3], HEIGHT // 32, WIDTH // 32)
    # The normalisation is the torchvision one: a mid-grey pixel (0.5) becomes (127.5 - mean) / std per channel.
    grey = torch.full((1, 1, 32, 32), 0.5)
    seen = {}
    handle = backbone.body.conv1.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0]))
    backbone.eval()
    with torch.no_grad():
        backbone(grey)
    handle.remove()
    expected = (127.5 - torch.tensor([123.675, 116.28, 103.53])) / torch.tensor([58.395, 57.12, 57.375])
    torch.testing.assert_close(seen["x"][0, :, 0, 0], expected)
    history = train_steps(detector, images, targets, 30)
    assert all(np.isfinite(history)) and sum(history[-5:]) / 5 < 0.5 * sum(history[:3]) / 3
    # A torchvision-style state dict with a 3-channel conv1 loads as it is (no summing over channels).
    state = {f"backbone.{k}": v.clone() + 1.0 for k, v in backbone.body.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "w.pt")
    backbone.load_weights(tmp_path / "w.pt")
    torch.testing.assert_close(backbone.body.conv1.weight, state["backbone.conv1.weight"])


def test_model_without_fpn_is_checked():
    with pytest.raises(ValueError, match="returned_layers to one"):
        tiny_model_config(fpn=False, returned_layers=[3, 4])
    with pytest.raises(ValueError, match="distill_feature must be 'backbone'"):
        tiny_model_config(fpn=False, returned_layers=[4], distill_feature="fpn0")
