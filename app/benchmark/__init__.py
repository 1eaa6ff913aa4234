"""`vlserve bench serve`: a load client for any OpenAI-compatible server, as `vllm bench serve`.

  dataset.py   random prompts (random letters + fresh random-pixel images) -> request bodies,
               encoded (PNG, base64, JSON) before the clock starts
  requests.py  one streamed request -> RequestResult (TTFT, inter-token gaps, usage token counts)
  metrics.py   RequestResults -> vLLM's result block and result JSON
  serve.py     the flags, the load (concurrency cap, Poisson arrivals), printing and saving

Imports nothing of the server: it talks HTTP only, so it measures vLLM the same way it measures us.
"""
