"""`comoto predict` streams DBT volumes: frames are decoded and resized a batch at a time, never the whole volume.

The detector is a tiny untrained RetinaNet whose classification bias is lifted, so every slice yields many boxes
and top-k, NMS and volume NMS all have work to do; the tests compare numbers, not detection quality.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comoto_cli.config import InferenceConfig
from comoto_cli.data import dicom_io
from comoto_cli.inference import predict as predict_module
from comoto_cli.inference import volume as volume_module
from comoto_cli.inference.volume import DBTEX_COLUMNS, detect_volume, detections_to_dbtex, forward_batch_size
from comoto_cli.transforms.resize import resize_area
from comoto_cli.utils.csvio import read_csv
from tests.conftest import tiny_model_config

HEIGHT, WIDTH = 128, 64  # model frame
SLICES, ROWS, COLS = 10, 300, 170  # official frame: not a whole multiple of the model's size




def tiny_detector():
    from comoto_cli.networks.detector import build_detector

    torch.manual_seed(0)
    model = build_detector(tiny_model_config(detections_per_image=20), (HEIGHT, WIDTH)).eval()
    head = model.detector.network.classification_head
    last = [module for module in head.modules() if isinstance(module, torch.nn.Conv2d)][-1]
    last.bias.data.fill_(-0.4)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_detector()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    from comoto_cli.networks.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("stream_ckpt") / "best.pt"
    save_checkpoint(path, model_state=model.state_dict(), model_config=tiny_model_config(detections_per_image=20),
                    image_size=(HEIGHT, WIDTH), metadata={"note": "streaming test detector"})
    return path


def phantom(seed: int) -> np.ndarray:
    """Stored uint16 volume: a sloped background with a bright disk that drifts across the slices."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:ROWS, :COLS]
    volume = np.empty((SLICES, ROWS, COLS), np.float64)
    for index in range(SLICES):
        disk = (x - 60 - 3 * index) ** 2 + (y - 150) ** 2 <= 25 ** 2
        volume[index] = 0.3 + 0.1 * (1 - x / COLS) + 0.4 * disk + 0.03 * rng.standard_normal((ROWS, COLS))
    return np.round(np.clip(volume, 0, 1) * 4095).astype(np.uint16)


def write_volume(path, stored: np.ndarray, *, view: str = "rcc", compress: bool = False) -> None:
    from comoto_cli.synth.writer import write_dbt_dicom

    path.parent.mkdir(parents=True, exist_ok=True)
    write_dbt_dicom(path, stored, seed=0, patient_id="STREAM-1", study_instance_uid="1.2.826.0.1.3680043.10.77",
                    series_instance_uid="1.2.826.0.1.3680043.10.77.1", series_number=1, view=view,
                    window=(2048.0, 4096.0), compress=compress)


@pytest.fixture(scope="module")
def volume_path(tmp_path_factory):
    # Stored rotated (bright side right) under a left view: the official rule flips it back, which the streaming
    # reader must do exactly as the whole-volume one.
    path = tmp_path_factory.mktemp("stream_dicom") / "P1" / "1-1.dcm"
    write_volume(path, phantom(0)[:, ::-1, ::-1], view="lcc")
    assert dicom_io.open_dicom_image(path)[0].flipped
    return path


class FrameLog:
    """Records every ``DbtFrames.frames`` request (the frames asked for) and every ``read_all`` call."""

    def __init__(self, monkeypatch):
        self.requests: list[list[int]] = []
        self.read_all_calls = 0
        original_frames = dicom_io.DbtFrames.frames
        log = self

        def frames(reader, indices=None):
            wanted = list(range(reader.shape[0])) if indices is None else [int(i) for i in indices]
            log.requests.append(wanted)
            yield from original_frames(reader, indices)

        def read_all(reader):
            log.read_all_calls += 1
            raise AssertionError("predict must not read a DBT volume whole")

        monkeypatch.setattr(dicom_io.DbtFrames, "frames", frames)
        monkeypatch.setattr(dicom_io.DbtFrames, "read_all", read_all)


def run_cli(argv: list[str]) -> int:
    from comoto_cli.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return int(exit_info.value.code or 0)


# ------------------------------------------------------------------------------------------------ equality
def test_resized_volume_reads_only_its_range_and_equals_resizing_the_whole_array(volume_path, monkeypatch):
    whole, kind = dicom_io.read_dicom_image(volume_path)  # the old path: every frame, then resized at once
    assert kind == "dbt" and whole.shape == (SLICES, ROWS, COLS)
    expected = resize_area(whole, HEIGHT, WIDTH)
    log = FrameLog(monkeypatch)
    frames, kind = dicom_io.open_dicom_image(volume_path)
    source = predict_module.ResizedVolume(frames, HEIGHT, WIDTH)
    assert source.shape == (SLICES, HEIGHT, WIDTH) and len(source) == SLICES
    np.testing.assert_array_equal(source[3:7], expected[3:7])
    np.testing.assert_array_equal(source[8:20], expected[8:])  # clipped like an array slice
    np.testing.assert_array_equal(source[0:1], expected[:1])
    assert log.requests == [[3, 4, 5, 6], [8, 9], [0]]
    # The same class still serves an in-memory array (mammograms), with the same numbers.
    np.testing.assert_array_equal(predict_module.ResizedVolume(whole, HEIGHT, WIDTH)[2:5], expected[2:5])


@pytest.mark.parametrize("batch_size", [1, 4])
def test_streamed_predictions_equal_the_whole_array_path(model, volume_path, monkeypatch, batch_size):
    config = InferenceConfig(batch_size=batch_size, skip_edge_slices=1)
    whole, _ = dicom_io.read_dicom_image(volume_path)
    detections = detect_volume(model, resize_area(whole, HEIGHT, WIDTH), config=config, device="cpu")
    expected = detections_to_dbtex(detections, scale_y=HEIGHT / ROWS, scale_x=WIDTH / COLS, num_slices=SLICES,
                                   config=config)
    assert len(expected["Score"]) > 10  # many boxes: the comparison means something

    log = FrameLog(monkeypatch)
    results = predict_module.detect_files(model, [volume_path], config, "cpu", progress=False)
    assert log.read_all_calls == 0
    (result,) = results
    assert result.kind == "dbt" and result.image_shape == (SLICES, ROWS, COLS)
    assert list(result.rows) == list(expected)
    for name, values in expected.items():
        np.testing.assert_array_equal(result.rows[name], values, err_msg=name)


# ------------------------------------------------------------------------------------------------ streaming
def test_predict_cli_requests_at_most_a_batch_of_frames_and_never_the_whole_volume(checkpoint, volume_path,
                                                                                   tmp_path, monkeypatch):
    log = FrameLog(monkeypatch)
    out, overlays = tmp_path / "preds.csv", tmp_path / "overlays"
    assert run_cli(["predict", "--checkpoint", str(checkpoint), str(volume_path), "--out", str(out),
                    "--overlays", str(overlays), "--batch-size", "3"]) == 0
    assert log.read_all_calls == 0
    # Detection: ascending ranges of at most 3 frames that cover the volume once.
    detection = log.requests[:4]
    assert [len(request) for request in detection] == [3, 3, 3, 1]
    assert [i for request in detection for i in request] == list(range(SLICES))
    # Overlay: one request for the few slices it shows, nothing else.
    (overlay,) = log.requests[4:]
    assert 1 <= len(overlay) <= predict_module.OVERLAY_PANELS
    table = read_csv(out, [*DBTEX_COLUMNS, "path"])
    assert len(table) > 0 and set(table.text("path")) == {str(volume_path.resolve())}
    assert {int(z) for z in table.floats("Z")} >= set(overlay)  # the overlay shows slices of top detections
    assert len(list(overlays.glob("*.png"))) == 1


class RangeLog:
    """A lazy slice source recording the ranges read."""

    def __init__(self, volume: np.ndarray):
        self.volume = volume
        self.shape = volume.shape
        self.ranges: list[tuple[int, int]] = []

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(self.shape[0])
        assert step == 1
        self.ranges.append((start, stop))
        return self.volume[start:stop]


def test_detect_volume_reads_bounded_ranges_and_caps_cpu_batches_in_pixels(model, monkeypatch):
    volume = np.random.default_rng(0).random((11, HEIGHT, WIDTH), dtype=np.float32)
    source = RangeLog(volume)
    detect_volume(model, source, config=InferenceConfig(batch_size=4, skip_edge_slices=1), device="cpu")
    assert source.ranges == [(1, 5), (5, 9), (9, 10)]
    # On the CPU a pass holds at most CPU_PIXELS_PER_PASS pixels, whatever the batch size asked for.
    monkeypatch.setattr(volume_module, "CPU_PIXELS_PER_PASS", 2 * HEIGHT * WIDTH + 1)
    source = RangeLog(volume)
    detect_volume(model, source, config=InferenceConfig(batch_size=16), device="cpu")
    assert source.ranges == [(start, min(start + 2, 11)) for start in range(0, 11, 2)]


def test_forward_batch_size():
    assert forward_batch_size(16, (2048, 1024), "cpu") == 1  # the default model size: one slice per pass
    assert forward_batch_size(16, (1024, 512), "cpu") == 4
    assert forward_batch_size(3, (128, 64), "cpu") == 3
    assert forward_batch_size(16, (4096, 4096), "cpu") == 1  # never zero
    assert forward_batch_size(16, (2048, 1024), torch.device("cuda")) == 16  # GPUs take the batch asked for


# ------------------------------------------------------------------------------------------------ errors
def test_a_frame_that_fails_to_decode_mid_volume_is_one_line_naming_the_file(checkpoint, tmp_path, capsys):
    """The volume opens fine (header, frame 0); frame 6's compressed data is garbage, so decoding fails while
    the detector is streaming the volume. The user still gets one line naming the file."""
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    path = tmp_path / "P9" / "1-1.dcm"
    try:
        write_volume(path, phantom(1), view="lcc", compress=True)
    except Exception as exc:  # noqa: BLE001 - no JPEG 2000 encoder installed
        pytest.skip(f"cannot write JPEG 2000: {exc}")
    dataset = pydicom.dcmread(path)
    frames = list(generate_frames(dataset.PixelData, number_of_frames=SLICES))
    frames[6] = b"\x00" * len(frames[6])
    dataset.PixelData = encapsulate(frames)
    dataset.save_as(path)
    assert dicom_io.open_dicom_image(path)[0].shape == (SLICES, ROWS, COLS)  # opening still succeeds

    out = tmp_path / "preds.csv"
    code = run_cli(["predict", "--checkpoint", str(checkpoint), str(path), "--out", str(out), "--batch-size", "4"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and str(path.resolve()) in err and "corrupt" in err, err
    assert not out.exists()
