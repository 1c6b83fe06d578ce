"""One module per architecture; the registry picks one from the file's `general.architecture`.

Adding an architecture: one module here (an `ARCH = ArchSpec(...)` declaring what it has, a
`read_args` for its own GGUF keys and a `build_block` assembling its decoder block from the pieces
in localmoe/layers/), its entry in MODULES, a `localmoe synth` preset and an oracle test. See
docs/models.md, "Adding an architecture".
"""

from __future__ import annotations

from types import ModuleType

from . import deepseek2, gemma4, glm4moe, gpt_oss, llama, olmoe, qwen2moe, qwen3moe, qwen35moe
from .common import ArchSpec

MODULES: dict[str, ModuleType] = {
    m.ARCH.name: m for m in (qwen3moe, qwen2moe, olmoe, llama, deepseek2, glm4moe, gpt_oss, qwen35moe, gemma4)
}
ARCHITECTURES: dict[str, ArchSpec] = {name: m.ARCH for name, m in MODULES.items()}


def module_for(name: str) -> ModuleType | None:
    return MODULES.get(name)


def supported_list() -> str:
    return ", ".join(MODULES)
