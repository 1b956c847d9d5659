"""The attention record: what `amg report` draws pruning from, without a model or data set.

The suite saves one record per model beside its CSVs (`results/models/<model>/`): the
unpruned model's head entropies on its calibration images, a sample query image at the
model's input size, and the one-shot plans it made (in original numbering).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from amg.benchmark.results import ReportError, safe_name
from amg.files import write_atomic, write_text_atomic

RECORDS_DIR = "models"
RECORD_FILE = "attention.json"
SAMPLE_FILE = "sample.png"


@dataclass
class AttentionRecord:
    model: str  # preset name
    checkpoint: str
    img_size: tuple[int, int]
    grid: tuple[int, int]  # patch rows, columns
    stride: int  # pixels between patch positions
    entropy: list[list[float]]  # [block][head], bits, unpruned model on the calibration images
    plans: dict[str, dict[str, Any]] = field(default_factory=dict)  # config_id -> PrunePlan dict

    @property
    def key(self) -> str:
        return safe_name(f"{self.model}-{Path(self.checkpoint).stem}")


def save_record(record: AttentionRecord, sample: np.ndarray, results_dir: str | Path) -> Path:
    """Write `record` (merging plans already recorded for the same model) and `sample` ([H,W,3] uint8)."""
    folder = Path(results_dir) / RECORDS_DIR / record.key
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RECORD_FILE
    if path.is_file():
        try:
            record.plans = {**load_record(folder).plans, **record.plans}
        except ReportError:
            pass  # an unreadable old record is replaced, not merged
    image = Image.fromarray(sample)
    write_atomic(folder / SAMPLE_FILE, lambda stream: image.save(stream, format="PNG"))
    text = json.dumps(asdict(record), indent=1) + "\n"
    return write_text_atomic(path, text)


def load_record(folder: str | Path) -> AttentionRecord:
    path = Path(folder) / RECORD_FILE
    try:
        values = json.loads(path.read_text())
        record = AttentionRecord(**values)
    except (OSError, json.JSONDecodeError, TypeError) as error:
        raise ReportError(f"{path} is not an attention record: {error}") from error
    record.img_size, record.grid = tuple(record.img_size), tuple(record.grid)
    return record


def find_records(results_dir: str | Path) -> list[Path]:
    return sorted(p.parent for p in (Path(results_dir) / RECORDS_DIR).glob(f"*/{RECORD_FILE}"))
