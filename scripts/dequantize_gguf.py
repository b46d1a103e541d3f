#!/usr/bin/env python3
"""Writes an f32 copy of a GGUF file: the same metadata, every tensor dequantized with gguf-py.

scripts/compare_llama_cpp.py scores this copy with both engines when asked (--dequantized): with
no quantized matmul there is no 8-bit rounding of activations, so the two engines should agree on
every arg max, which separates "the same model math" from the noise of quantized arithmetic.

    dequantize_gguf.py IN.gguf OUT.gguf
"""
import sys

import gguf
import numpy as np


def main(src, dst):
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dst, arch=arch)
    for field in reader.fields.values():
        # The writer adds the architecture and the GGUF.* header fields itself; file_type changes.
        if field.name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE) or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, values.reshape(tuple(int(d) for d in reversed(tensor.shape))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
