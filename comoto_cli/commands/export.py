"""``comoto export CHECKPOINT --format torchscript|onnx --out F``: the detector's network for deployment."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from comoto_cli.commands.common import console
from comoto_cli.errors import UsageError

_SUFFIX_FORMATS = {".onnx": "onnx", ".pt": "torchscript", ".pth": "torchscript", ".ts": "torchscript",
                   ".torchscript": "torchscript"}


def export(
    checkpoint: Annotated[Path, typer.Argument(
        help="Trained checkpoint (best.pt of train-teacher or distill).", show_default=False)],
    out: Annotated[Path, typer.Option(
        "--out", help="File to write (the metadata goes next to it as OUT.json).", show_default=False)],
    fmt: Annotated[Optional[str], typer.Option(  # noqa: UP045 - typer needs Optional here
        "--format", help="torchscript or onnx (default: from --out's suffix, .onnx -> onnx, .pt/.ts -> "
        "torchscript). ONNX needs `pip install 'comoto-cli\\[export]'`.", show_default=False)] = None,
    height: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--height", help="Input height in pixels (default: the checkpoint's image size).", show_default=False)] = None,
    width: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--width", help="Input width in pixels (default: the checkpoint's image size).", show_default=False)] = None,
) -> None:
    """Export the network (backbone, FPN, heads) for a fixed input size: images (B, 1, H, W) -> cls_logits
    (B, N, 1) and box_regression (B, N, 4). Anchors, box coder and thresholds go into OUT.json (and the file's
    own metadata); the README's "Export" section gives the decoding recipe."""
    if fmt is None:
        fmt = _SUFFIX_FORMATS.get(out.suffix.lower())
        if fmt is None:
            raise UsageError(f"--out {out}: cannot tell the format from its suffix; give --format torchscript or onnx")
    fmt = fmt.lower()
    if fmt not in ("torchscript", "onnx"):
        raise UsageError(f"--format {fmt!r}: choose torchscript or onnx")
    from comoto_cli.inference.export import export_checkpoint, sidecar_path

    metadata = export_checkpoint(checkpoint, out, fmt, height=height, width=width)
    _, _, h, w = metadata["input"]["shape"]
    console.print(f"wrote [bold]{out}[/] ({fmt}, input (B, 1, {h}, {w}), {metadata['num_anchors']} anchors) "
                  f"and [bold]{sidecar_path(out)}[/]")
