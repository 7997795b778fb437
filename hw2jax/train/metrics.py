"""Live metrics: scalars stream to TensorBoard event files in ``<workdir>/tensorboard`` as a run
goes (``tensorboard --logdir <workdir>``), beside ``history.json``. Written by tensorboardX,
which needs only protobuf; :func:`read_scalars` reads them back without TensorBoard."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

from hw2jax.train.sharding import is_main_process


class MetricWriter:
    """Scalars by tag and step; does nothing outside process 0 (several processes share the
    work dir)."""

    def __init__(self, workdir: Path):
        self._writer = None
        if is_main_process():
            self._writer = _summary_writer_class()(
                logdir=str(Path(workdir) / "tensorboard"), flush_secs=30
            )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, float(value), int(step))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _summary_writer_class():
    """tensorboardX's SummaryWriter. tensorboardX imports torch, where it is installed, only to
    recognise torch tensors, which costs ~2 s at every start; the writer is given Python floats
    here, so torch stays out unless something else loaded it already."""
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
        try:
            import tensorboardX  # noqa: F401
        finally:
            del sys.modules["torch"]
    from tensorboardX import SummaryWriter

    return SummaryWriter


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from every event file under ``logdir``, in file order (the
    TFRecord framing: length, its CRC, the Event proto, its CRC)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            record = data[offset + 12 : offset + 12 + length]
            offset += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars
