"""Lists the tensors of a GGUF file with llama.cpp's own reader (PyPI `gguf`):
one JSON object {name: type} on stdout, plus the architecture."""
import json
import sys

from gguf import GGUFReader

reader = GGUFReader(sys.argv[1])
arch = reader.fields["general.architecture"]
arch = bytes(arch.parts[arch.data[0]]).decode()
print(json.dumps({"architecture": arch, "tensors": {t.name: t.tensor_type.name.lower() for t in reader.tensors}}))
