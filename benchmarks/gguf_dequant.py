"""Write the bundled Q4_1 GGUF dequantized to F32 or F16, so that llama.cpp runs the same weights
as eeserve and transformers (which dequantize the same file) at the same precision.

    python benchmarks/gguf_dequant.py --type f32 --out /tmp/smollm2-f32.gguf

All metadata is copied (``general.file_type`` set to the new type); 2-D tensors are written in the
requested type, 1-D ones (norms) stay F32 as llama.cpp's own converter writes them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np

FILE_TYPES = {"f32": (gguf.LlamaFileType.ALL_F32, np.float32), "f16": (gguf.LlamaFileType.MOSTLY_F16, np.float16)}


def dequantize_gguf(src: Path, dst: Path, kind: str) -> Path:
    """Write ``src`` to ``dst`` with every tensor dequantized to ``kind`` (``f32`` / ``f16``).

    Raises:
        ValueError: ``kind`` is not one of ``FILE_TYPES``.
    """
    if kind not in FILE_TYPES:
        raise ValueError(f"kind must be one of {', '.join(FILE_TYPES)}, got {kind!r}")
    file_type, np_type = FILE_TYPES[kind]
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, f.contents(), vtype, sub)
    writer.add_file_type(int(file_type))
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)  # float32, numpy order (reversed gguf shape)
        data = data.astype(np_type if data.ndim > 1 else np.float32)
        writer.add_tensor(t.name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def main() -> None:
    from eeserve.model.loader import alias_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="alias or .gguf path")
    ap.add_argument("--type", choices=sorted(FILE_TYPES), default="f32")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    src = Path(a.model) if a.model.endswith(".gguf") else alias_path(a.model)
    print(dequantize_gguf(src, Path(a.out), a.type))


if __name__ == "__main__":
    main()
