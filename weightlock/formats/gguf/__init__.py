"""GGUF files (llama.cpp, Ollama, LM Studio).

The edit is the one every format makes (displacements and ``W_o @ d`` live in :mod:`weightlock.core.edit`); only
reading, writing and the per-format checks live here:

- :mod:`.file`: a strict GGUF header parser and row-block dequantizing reader;
- :mod:`.architectures`: which llama.cpp architectures apply ``attn_output.bias``, as data;
- :mod:`.record`: the edit record and the embedded locks, in the file's metadata;
- :mod:`.edit`: plan, compute and write a locked GGUF, copying every other byte;
- :mod:`.apply`: the order of work (plan, compute, stage, verify, publish); :mod:`.publish`: a split set published
  all or nothing;
- :mod:`.verify`: the GGUF's own checks (llama.cpp's load check is added by :mod:`weightlock.api` from
  :mod:`weightlock.engines.llama_cpp`); :mod:`.describe`: ``inspect`` data.
"""
