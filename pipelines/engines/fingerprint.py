"""Content fingerprints of local model folders, for stage configs.

A stage config names its model by spec (`hf:/models/policy`); without more, new weights saved to
the same path would let `--resume` reuse outputs of the old weights. `model_fingerprint` hashes the
files at the top of a local folder: small files (config, tokenizer, chat template) in full, and for
each weight file its size plus its first and last MiB; run records (our train manifest and metrics,
HF trainer state) and subfolders (trainer checkpoints) are left out. That reads at most a few MiB
per file, is the same on every machine that holds a copy (no paths or mtimes), and changes whenever
training rewrites the weights. Hub ids and remote endpoints return None: nothing local to hash.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipelines.engines.spec import parse_spec, resolve

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SAMPLE_BYTES = 1 << 20
SMALL_FILE_BYTES = 4 << 20
RUN_RECORDS = frozenset({"train_manifest.json", "train_metrics.parquet", "scope_tiny.json",
                         "trainer_state.json", "training_args.bin", "README.md"})


def folder_fingerprint(folder: str | Path) -> str:
    """16-hex-digit fingerprint of a model folder's files (see the module docstring)."""
    root = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.iterdir() if p.is_file()):
        rel = path.name
        if rel.startswith(".") or rel in RUN_RECORDS:
            continue
        size = path.stat().st_size
        if not rel.endswith(WEIGHT_SUFFIXES) and size > SMALL_FILE_BYTES:
            continue  # logs, optimizer states and the like do not change the model
        digest.update(f"{rel}\0{size}\0".encode())
        with open(path, "rb") as fh:
            if size <= 2 * SAMPLE_BYTES:
                digest.update(fh.read())
            else:
                digest.update(fh.read(SAMPLE_BYTES))
                fh.seek(size - SAMPLE_BYTES)
                digest.update(fh.read(SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def model_fingerprint(spec: str, role: str = "generation") -> str | None:
    """Fingerprint of the local model folder a spec names, or None (hub id, endpoint, rule)."""
    path = resolve(parse_spec(spec, role)).model_path
    if path is None:
        return None
    folder = Path(path).expanduser()
    return folder_fingerprint(folder) if folder.is_dir() else None
