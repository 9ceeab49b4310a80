"""What loads an output, in one place: formats never import this package.

- :mod:`.serving`: which engine serves which family's ``o_proj`` bias, as data, and the checks built on it;
- :mod:`.transformers`: the stock transformers class, built on the meta device, against the stored names;
- :mod:`.vllm`: vLLM's class on the meta device (``verify --engine vllm``); :mod:`.vllm_generate`: greedy
  generation for ``eval --engine vllm``;
- :mod:`.llama_cpp`: llama.cpp in a child process (load check, logits, generation, quantization);
- :mod:`.hooks`: the lock applied at run time by forward-pre-hooks, the reference every baked output is tested
  against.
"""
