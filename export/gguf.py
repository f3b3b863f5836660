"""A GGUF checkpoint as a Hugging Face model folder that `fedpeft-export --model` reads.

transformers dequantizes a GGUF file (with the `gguf` package) into float32 weights but will not save a model
it loaded that way, so the weights move into a plain model of the same class and configuration first.
Usage: python -m export.gguf FILE.gguf OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from export.errors import ExportError


def gguf_to_folder(gguf_file: Path, out: Path) -> Path:
    """Write `gguf_file`'s model (float32) and tokenizer to `out` as a transformers folder; returns `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf_file.is_file():
        raise ExportError(f"{gguf_file} is not a file; give the path of a .gguf checkpoint.")
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    plain = type(loaded)(config)
    result = plain.load_state_dict(loaded.state_dict(), strict=False)
    if result.unexpected_keys or any("rotary" not in key for key in result.missing_keys):
        raise ExportError(f"{gguf_file}: the dequantized weights do not fit {type(loaded).__name__} "
                          f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}).")
    plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: python -m export.gguf FILE.gguf OUT_DIR")
    try:
        print(gguf_to_folder(Path(sys.argv[1]), Path(sys.argv[2])))
    except ExportError as err:
        sys.exit(f"Error: {err}")


if __name__ == "__main__":
    main()
