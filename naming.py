"""The names of the output files: a model's file-name label, the layer part, and the results JSON and
HTML report paths. Light: no torch at import.
"""
from __future__ import annotations

import re
from pathlib import Path


def model_prefix(name: str, origin: str = "", resolved_path: str | None = None) -> str:
    """A file-name-safe label for a model, used in every output file's name: a hub id with '/' -> '_'
    ('state-spaces_mamba-130m-hf'); 'reference_mamba' for the shipped reference model; a local folder
    (`origin` "local") its name and the first 8 hex digits of the SHA-256 of its absolute path
    (`resolved_path`), so that folders of the same name (runA/final, runB/final) never share a file."""
    import hashlib

    p = Path(name)
    label = p.name if origin in ("local", "reference") or p.is_dir() else name.replace("/", "_")
    label = re.sub(r"[^\w.\-]+", "_", f"reference_{label}" if origin == "reference" else label) or "model"
    if origin == "local":
        where = str(Path(resolved_path or name).resolve())
        label += "-" + hashlib.sha256(where.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return label


def layer_tag(layer: int, layers: list[int] | None) -> str:
    """The results files' name part: layer3, or for --layers e.g. layers0-3_5 (runs of layers as ranges)."""
    if layers is None:
        return f"layer{layer}"
    runs, start = [], layers[0]
    for prev, cur in zip(layers, [*layers[1:], None]):
        if cur != prev + 1:
            runs.append(f"{start}-{prev}" if prev > start else f"{start}")
            start = cur
    return "layers" + "_".join(runs)


def results_path(output_dir, prefix: str, tag: str) -> Path:
    return Path(output_dir) / f"{prefix}_{tag}_results.json"


def report_path(output_dir, prefix: str, tag: str) -> Path:
    """The HTML report, beside the results JSON."""
    return Path(output_dir) / f"{prefix}_{tag}_report.html"
