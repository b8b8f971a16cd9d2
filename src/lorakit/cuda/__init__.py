"""The CUDA backend's place (filled by the GPU work; nothing registered yet).

A backend registers an object with the methods of :class:`lorakit.backend.Backend` for its device type
(``lorakit.backend.register("cuda", ...)``) when its package is imported, and offers ``accelerate(model)`` /
``restore(model)`` for what it changes; see ``lorakit/cpu/`` for the CPU one. Until then CUDA tensors take the
core's generic path everywhere (``LoraLinear``'s base output plus the low-rank update, PyTorch's products).
"""

__all__: list[str] = []
