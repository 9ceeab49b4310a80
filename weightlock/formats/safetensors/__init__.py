"""A Hugging Face folder of ``.safetensors`` shards (plain or quantized): the format transformers, vLLM and SGLang read.

- :mod:`.folder`: open a folder (or a cached Hub id) reading headers only;
- :mod:`.plan`: every refusal before a weight byte is read (families, redeclarations, splits, merges);
- :mod:`.write`: shards reused (hardlinked or copied), the bias shard, index and config;
- :mod:`.apply`: the folder's order of work (plan, compute, stage, write, verify, publish) and its provenance
  record;
- :mod:`.inplace`: the in-place edit and ``revert``, as a journal;
- :mod:`.card`: the output's model card;
- :mod:`.verify`: the folder's own checks (engine checks are added by :mod:`weightlock.api`);
- :mod:`.describe`: ``inspect`` data for a folder;
- :mod:`.quant`: quantized ``o_proj`` layouts (AWQ, GPTQ, compressed-tensors, FP8) and their dequantizers.
"""
