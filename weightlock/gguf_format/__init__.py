"""GGUF files (llama.cpp, Ollama, LM Studio): the second checkpoint format.

The edit is the one the safetensors path makes (planning of displacements and the
``W_o @ d`` arithmetic live in :mod:`weightlock.plan` and are shared); only reading,
writing and the per-format checks live here:

- :mod:`.file`: a strict GGUF header parser and row-block dequantizing reader;
- :mod:`.architectures`: which llama.cpp architectures apply ``attn_output.bias``, as data;
- :mod:`.edit`: plan, compute and write a locked GGUF (``apply``);
- :mod:`.verify`: ``verify`` and ``inspect`` for GGUF files;
- :mod:`.llama_cpp`: running a GGUF in llama.cpp itself (``eval --engine llama-cpp``, tests).
"""
