"""The model: what MisoTTS is, independent of how requests are served.

``config`` (flavors and ``config.json``), ``transformer`` (backbone + depth decoder maths over a
static KV cache), ``sampling`` (top-k with counter-based noise), ``weights`` (strict checkpoint
loading), ``tokenizer`` (Llama-3.2 text), ``codec`` (Mimi), ``watermark`` (SilentCipher),
``sources`` (local directory or Hugging Face Hub) and ``bandwidth`` (the memory-traffic floor of a
frame step). Nothing here knows about requests, streams or frameworks.
"""
